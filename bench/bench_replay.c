/* bench_replay — replay throughput on a trace shaped like a 1B model, against OpenBLAS itself.
 *
 * Builds (once, then reuses) a synthetic trace of 16 layers, 32 query heads, 8 KV heads,
 * head_dim 64, 4096 prompt + 512 decode tokens, and in the same run measures:
 *   - OpenBLAS sgemm's single-thread rate on 1024^3 (the reference);
 *   - the replay of `full` and `window` with 1 thread: wall time, and the rate of the shared
 *     full-attention computation (both products, per decode block);
 *   - the same replay with 2 threads: the speed-up.
 *   - optionally (third argument, configs/ta512.ini) every policy's own bookkeeping time next to
 *     the shared exact-attention time.
 * Targets: attention rate >= 50% of sgemm's; 2 threads >= 1.7x faster than 1; each policy's
 * bookkeeping below the shared attention. Exit status 1 when a target is missed.
 * Usage: bench_replay [TRACE.h5] [BASELINE-CONFIG] [POLICIES-CONFIG] */
#include <cblas.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sim/replay/config.h"
#include "sim/replay/engine.h"
#include "sim/cmd/synth.h"

static double sgemm_rate(int n, int reps)
{
    float *a = kv_malloc((size_t)n * n * sizeof(float));
    float *b = kv_malloc((size_t)n * n * sizeof(float));
    float *c = kv_malloc((size_t)n * n * sizeof(float));
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
        b[i] = (float)((i * 104729) % 1000) / 1000.0f - 0.5f;
    }
    double best = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now_seconds();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f,
                    c, n);
        double rate = 2.0 * n * n * (double)n / (now_seconds() - t0) / 1e9;
        if (rate > best)
            best = rate;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

static Results *replay(Trace *tr, RunConfig *rc, int threads)
{
    KvErr err;
    rc->engine.threads = threads;
    rc->engine.progress = false;
    Results *r = engine_run(tr, &rc->engine, &err);
    if (!r) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
    return r;
}

/* Every policy of ta512 on the same trace: each policy's own bookkeeping (its callbacks) against
 * the shared exact-attention computation it rides on. */
static bool report_policies(Trace *tr, const char *config_path)
{
    RunConfig rc;
    KvErr err;
    if (config_load(config_path, &rc, &err) != 0) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
    Results *r = replay(tr, &rc, 2);
    printf("\n%s, 2 threads: wall %.2f s; shared exact attention %.2f s (prompt statistics "
           "included), metrics %.2f s (thread-seconds)\n",
           config_path, r->wall_seconds, r->attention_seconds, r->metric_seconds);
    bool all_below = true;
    for (int pi = 0; pi < r->n_policies; pi++) {
        bool below = r->policy_seconds[pi] < r->attention_seconds;
        all_below &= below;
        printf("    %-16s %-14s bookkeeping %7.2f s  = %5.1f%% of the shared attention\n",
               r->label[pi], r->type[pi]->name, r->policy_seconds[pi],
               100 * r->policy_seconds[pi] / r->attention_seconds);
    }
    results_free(r);
    config_free(&rc);
    return all_below;
}

int main(int argc, char **argv)
{
    const char *trace_path = argc > 1 ? argv[1] : "bench-1b.h5";
    const char *config_path = argc > 2 ? argv[2] : "bench/replay.ini";
    const char *policies_config = argc > 3 ? argv[3] : NULL;
    KvErr err;
    struct stat st;
    if (stat(trace_path, &st) != 0) {
        SynthParams sp;
        synth_defaults(&sp);
        sp.seed = 7;
        sp.n_layers = 16;
        sp.n_q_heads = 32;
        sp.n_kv_heads = 8;
        sp.head_dim = 64;
        sp.n_prompt = 4096;
        sp.n_decode = 512;
        sp.dtype = TRACE_F16;
        fprintf(stderr, "bench_replay: writing %s (16 layers, 32/8 heads, 4096+512 tokens)...\n",
                trace_path);
        double t0 = now_seconds();
        if (synth_write(&sp, trace_path, &err) != 0) {
            fprintf(stderr, "bench_replay: %s\n", err.msg);
            return 2;
        }
        fprintf(stderr, "bench_replay: trace written in %.1f s\n", now_seconds() - t0);
    }
    Trace *tr = trace_open(trace_path, &err);
    if (!tr) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        return 2;
    }
    RunConfig rc;
    if (config_load(config_path, &rc, &err) != 0) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        return 2;
    }
    const TraceMeta *m = trace_meta(tr);

    openblas_set_num_threads(1);
    double gemm = sgemm_rate(1024, 5);
    Results *one = replay(tr, &rc, 1);
    Results *two = replay(tr, &rc, 2);
    double attn_rate = one->attention_flops / one->attention_seconds / 1e9;
    double speedup = one->wall_seconds / two->wall_seconds;
    double policy_total = 0;
    for (int pi = 0; pi < one->n_policies; pi++)
        policy_total += one->policy_seconds[pi];

    printf("trace: %s  (%d layers, %d q heads, %d kv heads, head_dim %d, %d prompt + %d decode)\n",
           trace_path, m->n_layers, m->n_q_heads, m->n_kv_heads, m->head_dim, m->n_prompt,
           m->n_tokens - m->n_prompt);
    printf("config: %s (%d policies)\n\n", config_path, one->n_policies);
    printf("OpenBLAS sgemm 1024^3, 1 thread     %8.1f GFLOP/s\n", gemm);
    printf("exact attention, 1 thread           %8.1f GFLOP/s  (%.1f GFLOP in %.2f s) = %.0f%% of sgemm\n",
           attn_rate, one->attention_flops / 1e9, one->attention_seconds, 100 * attn_rate / gemm);
    printf("replay wall time, 1 thread          %8.2f s  (shared attention %.2f s, metrics %.2f s, "
           "policy callbacks %.2f s)\n",
           one->wall_seconds, one->attention_seconds, one->metric_seconds, policy_total);
    for (int pi = 0; pi < one->n_policies; pi++)
        printf("    %-28s %8.2f s\n", one->label[pi], one->policy_seconds[pi]);
    printf("replay wall time, 2 threads         %8.2f s  speed-up %.2fx\n", two->wall_seconds, speedup);

    bool ok_rate = attn_rate >= 0.5 * gemm, ok_speedup = speedup >= 1.7;
    bool ok_policies = policies_config ? report_policies(tr, policies_config) : true;
    printf("\ntarget attention >= 50%% of sgemm:  %s\n", ok_rate ? "met" : "MISSED");
    printf("target 2 threads >= 1.7x:          %s\n", ok_speedup ? "met" : "MISSED");
    if (policies_config)
        printf("target each policy's bookkeeping < shared attention: %s\n",
               ok_policies ? "met" : "MISSED");
    results_free(one);
    results_free(two);
    config_free(&rc);
    trace_close(tr);
    return ok_rate && ok_speedup && ok_policies ? 0 : 1;
}
