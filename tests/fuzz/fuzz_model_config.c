/* A model's config.json (traces/model/model.c) and its RoPE scaling: any bytes load or fail with one
 * line; a loaded config gives finite, positive inverse frequencies. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "traces/model/model.h"
#include "tests/fuzz/support.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write("config.json", data, size);
    ModelConfig cfg;
    KvErr err;
    if (model_config_load(path, &cfg, &err) != 0) {
        if (strchr(err.msg, '\n'))
            __builtin_trap();
        return 0;
    }
    if (cfg.head_dim <= 0 || cfg.head_dim > 4096)
        return 0; /* sizes are the forward pass's to check, with the weights */
    double *inv = kv_malloc((size_t)cfg.head_dim / 2 * sizeof *inv + sizeof *inv);
    model_rope_inv_freq(&cfg, 4096, inv);
    for (int i = 0; i < cfg.head_dim / 2; i++)
        if (!isfinite(inv[i]) || inv[i] <= 0)
            __builtin_trap();
    free(inv);
    return 0;
}
