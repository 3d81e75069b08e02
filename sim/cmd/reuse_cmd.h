/* reuse_cmd.h — `kvsim reuse` (a request log through persisted KV caches of every scope,
 * policy and capacity asked for) and `kvsim synth-workload` (a synthetic chat request log);
 * docs/reuse.md. */
#ifndef KVSIM_REUSE_CMD_H
#define KVSIM_REUSE_CMD_H

#include <stdint.h>

#include "sim/base/util.h"

/* Parses a comma-separated list of sizes in bytes ("512MiB,4GiB,1e9"; suffixes KB MB GB TB
 * (powers of 1000), KiB MiB GiB TiB (of 1024), none: bytes) into out[max]; returns the count,
 * or -1 with "OPTION: ..." in err. */
int parse_byte_sizes(const char *option, const char *list, int64_t *out, int max, KvErr *err);

int cmd_reuse(int argc, char **argv);
int cmd_synth_workload(int argc, char **argv);

#endif
