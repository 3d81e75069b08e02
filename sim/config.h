/* config.h — the INI run configuration of `kvsim run` (see configs/ and docs/config.md).
 *
 *   [trace]  path = FILE.h5
 *   [run]    threads = 0  out = DIR  topk = 32  eval_every = 1  kv_bits = 16  seed = 0
 *   [policy.LABEL]  type = NAME  <the type's parameters>   (one section per policy)
 *
 * Every error (unknown section or key, malformed value, unknown policy type, duplicate label,
 * missing type) is one line "FILE:LINE: what is wrong (what was expected)". */
#ifndef KVSIM_CONFIG_H
#define KVSIM_CONFIG_H

#include "sim/engine.h"

typedef struct {
    char config_path[4096];
    char trace_path[4096]; /* relative paths are relative to the working directory */
    char out_dir[4096];    /* default: results/<config file name without .ini> */
    EngineConfig engine;
} RunConfig;

int config_load(const char *path, RunConfig *rc, KvErr *err);
void config_free(RunConfig *rc);

#endif
