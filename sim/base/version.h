/* version.h — the version of this kvsim build, for run.json (docs/metrics.md, "Provenance"):
 * `git describe --always --dirty --tags` of the source tree when it was built ("-dirty": with
 * uncommitted changes), or "unknown" when built outside a git checkout. The definition is
 * generated into the build directory at every build (cmake/version.cmake). */
#ifndef KVSIM_VERSION_H
#define KVSIM_VERSION_H

const char *kvsim_version(void);

#endif
