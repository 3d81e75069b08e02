/* Request logs (sim/reuse/reqlog.c): any bytes as a log must load or fail with one line, never
 * crash, read out of bounds or leak; a log that loads replays through every scope and policy
 * at a few capacities with cached tokens between 0 and the prompt tokens, nothing cached under
 * scope none, a host tier adding hits without changing the device's work, and the one-pass
 * LRU curve and the lru streamed from the file equal to the LRU replays; with a cost, TTFT
 * quantiles ordered and >= 0, FLOPs saved >= 0; compressed conversation entries within the
 * capacity. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sim/reuse/reqlog.h"
#include "sim/reuse/reuse.h"
#include "tests/fuzz/support.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write("log.jsonl", data, size);
    ReqLog log;
    KvErr err;
    if (reqlog_load(path, REQLOG_AUTO, 4, false, &log, &err) != 0) {
        if (strchr(err.msg, '\n'))
            __builtin_trap(); /* errors are one line */
        return 0;
    }
    int64_t *curve = reuse_lru_curve(&log);
    const int64_t caps[] = {0, 1, 2, 5, 1000};
    for (int s = 0; s < N_SCOPES; s++) {
        uint32_t *nu = reuse_next_use(&log, (ReuseScope)s);
        for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
            int64_t lru = 0;
            for (int p = 0; p < N_POLICIES; p++) {
                ReuseResult res;
                reuse_simulate(&log, (ReuseScope)s, (ReusePolicy)p, caps[c], nu, &res);
                if (res.hit_tokens < 0 || res.hit_tokens > res.prompt_tokens ||
                    res.blocks_peak > caps[c] || res.requests != log.n)
                    __builtin_trap();
                if (s == SCOPE_NONE && res.hit_tokens != 0)
                    __builtin_trap();
                /* with a host tier of 3 blocks: the device does exactly what it did alone (the host
                 * only catches its evictions), so at least its hits */
                ReuseResult tiered;
                reuse_simulate_host(&log, (ReuseScope)s, (ReusePolicy)p, caps[c], 3, nu, &tiered);
                if (tiered.host_hit_tokens < 0 || tiered.host_hit_tokens > tiered.hit_tokens ||
                    tiered.hit_tokens > tiered.prompt_tokens || tiered.host_blocks_peak > 3 ||
                    tiered.hit_tokens < res.hit_tokens || tiered.evictions != res.evictions ||
                    tiered.blocks_end != res.blocks_end)
                    __builtin_trap();
                if (s == SCOPE_PREFIX && p == POL_LRU) {
                    lru = res.hit_tokens;
                    int64_t k = caps[c] < (int64_t)log.n_blocks ? caps[c] : (int64_t)log.n_blocks;
                    if (curve[k] != lru)
                        __builtin_trap();
                    ReuseResult streamed;
                    if (reuse_stream_lru(path, REQLOG_AUTO, 4, caps[c], &streamed, &err) != 0 ||
                        streamed.hit_tokens != lru || streamed.evictions != res.evictions)
                        __builtin_trap();
                }
                ReuseCost cost = {.prefill_tps = 0, .flops_per_s = 1e12, .params = 1e6,
                                  .attn_dim = 64, .block_bytes = 4096, .host_bw = 1e9};
                ReuseOptions opt = {.scope = (ReuseScope)s, .policy = (ReusePolicy)p,
                                    .capacity_blocks = caps[c], .host_blocks = 2,
                                    .compress = 0.5, .next_use = nu, .cost = &cost};
                ReuseResult costed;
                reuse_run(&log, &opt, &costed);
                if (costed.hit_tokens > costed.prompt_tokens || costed.blocks_peak > caps[c] ||
                    !(costed.flops_saved >= -1e-6 * (costed.flops + 1)) ||
                    (log.n > 0 && !(costed.ttft_q[0] >= 0)))
                    __builtin_trap();
                for (int q = 1; q < REUSE_TTFT_Q && log.n > 0; q++)
                    if (!(costed.ttft_q[q] >= costed.ttft_q[q - 1]) || !isfinite(costed.ttft_q[q]))
                        __builtin_trap();
            }
        }
        free(nu);
    }
    free(curve);
    reqlog_free(&log);
    return 0;
}
