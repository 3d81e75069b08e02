/* bench_replay — replay throughput on a trace shaped like a 1B model, against OpenBLAS itself.
 *
 * Builds (once, then reuses) a synthetic trace of 16 layers, 32 query heads, 8 KV heads,
 * head_dim 64, 4096 prompt + 512 decode tokens, and a 1-layer trace of the same shape, and in
 * the same run measures:
 *   - OpenBLAS sgemm's single-thread rate on 1024^3 (the reference), in rounds with the two
 *     below;
 *   - the shared exact attention on one layer, one thread, in the functions the engine calls
 *     (sim/base/attention.h): the prompt statistics (prompt_statistics: mass and 32 observation
 *     rows) and the decode rows (attention_rows, blocks of 64 steps, both products). Flops are
 *     counted the same way for both (attention_block_flops). Rates are in thread CPU time, as
 *     sgemm's: on a shared machine wall time measures the neighbours;
 *   - the replay of BASELINE-CONFIG (`full` and `window`) with 1 and 2 threads: the speed-up
 *     across layers, and (in a child process, getrusage) the peak resident memory of the
 *     2-thread replay against the bytes of one layer's Q/K/V (the engine holds one layer per
 *     worker);
 *   - the 1-layer trace replayed with POLICIES-CONFIG (configs/ta512.ini: every policy kind)
 *     with 1 and 2 threads: the speed-up of the work units inside a layer, and that both give
 *     identical numbers;
 *   - (with POLICIES-CONFIG) every policy's own bookkeeping time, and the metrics' time (recall's
 *     top-k, the renormalised attention over each policy's caches, the output errors), next to
 *     the shared exact-attention time, 16 layers, 2 threads.
 *   - (with POLICIES-CONFIG) long context: traces of 2 layers, 32/8 heads, head_dim 128, 4k, 8k,
 *     16k and 32k prompt tokens + 1024 decode steps (written once next to TRACE), replayed
 *     with 2 threads: how the replay grows with the prompt; at 32k, the wall time against the
 *     shared attention's time per worker, and the prompt statistics (one KV head's query heads,
 *     one thread) against sgemm's rate measured in the same run.
 *   - (with POLICIES-CONFIG's policies) the results a 32-layer, 32-query-head, 32768-step
 *     replay would hold resident (results_bytes of that shape; nothing replayed), and what
 *     goes to the spill on disk (the per-head metric slots and the step records).
 * Targets: each attention rate >= 70% of sgemm's; 2 threads >= 1.7x faster than 1, on 16
 * layers and on 1; each policy's bookkeeping below the shared attention; the metrics <= 25% of
 * the shared attention; the 2-thread replay's peak resident memory <= one layer's Q/K/V per
 * worker plus the results' arrays; the results resident for the 32-layer, 32768-step
 * replay < 1 GiB; at 32k tokens, the replay's wall time <= 2x the shared attention's and the
 * prompt statistics >= 70% of sgemm. Exit status 1 when a target is missed.
 * Usage: bench_replay [TRACE.h5] [BASELINE-CONFIG] [POLICIES-CONFIG] */
#include <cblas.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "sim/base/attention.h"
#include "sim/replay/config.h"
#include "sim/replay/engine.h"
#include "sim/replay/report.h"
#include "sim/cmd/synth.h"

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* OpenBLAS sgemm on n x n matrices, one call: GFLOP/s. */
typedef struct {
    int n;
    float *a, *b, *c;
} Gemm;

static void gemm_init(Gemm *g, int n)
{
    g->n = n;
    g->a = kv_malloc((size_t)n * n * sizeof(float));
    g->b = kv_malloc((size_t)n * n * sizeof(float));
    g->c = kv_calloc((size_t)n * n, sizeof(float)); /* touched: no page faults in the timing */
    for (size_t i = 0; i < (size_t)n * n; i++) {
        g->a[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
        g->b[i] = (float)((i * 104729) % 1000) / 1000.0f - 0.5f;
    }
}

static double gemm_rate(const Gemm *g)
{
    int n = g->n;
    double t0 = cpu_seconds();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, g->a, n, g->b, n, 0.0f,
                g->c, n);
    return 2.0 * n * n * (double)n / (cpu_seconds() - t0) / 1e9;
}

static void gemm_free(Gemm *g)
{
    free(g->a);
    free(g->b);
    free(g->c);
}

/* The shared exact attention of layer 0, one thread: prompt statistics and decode rows, and
 * sgemm's rate, in `reps` rounds of all three, the best of each: a neighbour's load on a shared
 * machine then falls on all three alike. */
static void attention_rates(Trace *tr, int reps, double *sgemm, double *stats_rate,
                            double *rows_rate)
{
    const TraceMeta *m = trace_meta(tr);
    size_t T = (size_t)m->n_tokens, D = (size_t)m->head_dim, Hq = (size_t)m->n_q_heads;
    size_t Hkv = (size_t)m->n_kv_heads;
    int P = m->n_prompt, W = 32, group = m->n_q_heads / m->n_kv_heads;
    enum { ROWS = 64 };
    float *q = kv_malloc(Hq * T * D * sizeof(float));
    float *k = kv_malloc(Hkv * T * D * sizeof(float));
    float *v = kv_malloc(Hkv * T * D * sizeof(float));
    float *mass = kv_malloc(Hq * (size_t)P * sizeof(float));
    float *obs = kv_malloc(Hq * (size_t)W * P * sizeof(float));
    float *probs = kv_malloc(ROWS * Hq * T * sizeof(float));
    float *out = kv_malloc(Hq * ROWS * D * sizeof(float));
    float *row_max = kv_malloc(Hq * ROWS * sizeof(float));
    float *row_z = kv_malloc(Hq * ROWS * sizeof(float));
    KvErr err;
    if (trace_read_layer(tr, 0, q, k, v, &err) != 0) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
    float scale = (float)m->attn_scale;
    Gemm gemm;
    gemm_init(&gemm, 1024);
    gemm_rate(&gemm); /* OpenBLAS's buffers */
    *sgemm = *stats_rate = *rows_rate = 0;
    for (int r = 0; r < reps; r++) {
        double g = gemm_rate(&gemm);
        if (g > *sgemm)
            *sgemm = g;
        memset(mass, 0, Hq * (size_t)P * sizeof(float));
        double t0 = cpu_seconds();
        double flops = prompt_statistics(q, k, m->n_q_heads, group, (int)T, P, (int)D, scale, 0.0f,
                                         0, mass, obs, W, NULL);
        double rate = flops / (cpu_seconds() - t0) / 1e9;
        if (rate > *stats_rate)
            *stats_rate = rate;
        t0 = cpu_seconds();
        flops = 0;
        for (int t = P; t < (int)T; t += ROWS) {
            int B = (int)T - t < ROWS ? (int)T - t : ROWS;
            flops += attention_rows(q, k, v, m->n_q_heads, group, (int)T, (int)D, scale, 0.0f, 0, t, B,
                                    ROWS, probs, out, row_max, row_z, NULL);
        }
        rate = flops / (cpu_seconds() - t0) / 1e9;
        if (rate > *rows_rate)
            *rows_rate = rate;
    }
    free(q);
    free(k);
    free(v);
    free(mass);
    free(obs);
    free(probs);
    free(out);
    free(row_max);
    free(row_z);
    gemm_free(&gemm);
}

/* Writes the synthetic trace sp describes to path, once (an existing file is kept). */
static void write_once(const char *path, const SynthParams *sp)
{
    struct stat st;
    if (stat(path, &st) == 0)
        return;
    KvErr err;
    fprintf(stderr, "bench_replay: writing %s (%d layers, %d/%d heads, head_dim %d, %d+%d "
            "tokens)...\n", path, sp->n_layers, sp->n_q_heads, sp->n_kv_heads, sp->head_dim,
            sp->n_prompt, sp->n_decode);
    double t0 = now_seconds();
    if (synth_write(sp, path, &err) != 0) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
    fprintf(stderr, "bench_replay: trace written in %.1f s\n", now_seconds() - t0);
}

/* The 1B-shaped trace: n_layers layers, 32/8 heads, head_dim 64, 4096 + 512 tokens. */
static void make_trace(const char *path, int n_layers)
{
    SynthParams sp;
    synth_defaults(&sp);
    sp.seed = 7;
    sp.n_layers = n_layers;
    sp.n_q_heads = 32;
    sp.n_kv_heads = 8;
    sp.head_dim = 64;
    sp.n_prompt = 4096;
    sp.n_decode = 512;
    sp.dtype = TRACE_F16;
    write_once(path, &sp);
}

/* The long-context traces: 2 layers, 32/8 heads, head_dim 128, n_prompt + 1024 decode tokens,
 * no stored attention rows (at 32k tokens they would outweigh the Q/K/V). */
enum { LONG_DECODE = 1024 };

static void make_long_trace(const char *path, int n_prompt)
{
    SynthParams sp;
    synth_defaults(&sp);
    sp.seed = 11;
    sp.n_layers = 2;
    sp.n_q_heads = 32;
    sp.n_kv_heads = 8;
    sp.head_dim = 128;
    sp.n_prompt = n_prompt;
    sp.n_decode = LONG_DECODE;
    sp.attn_rows_every = 0;
    sp.dtype = TRACE_F16;
    write_once(path, &sp);
}

static Trace *open_trace(const char *path)
{
    KvErr err;
    Trace *tr = trace_open(path, &err);
    if (!tr) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
    return tr;
}

static void load_config(const char *path, RunConfig *rc)
{
    KvErr err;
    if (config_load(path, rc, &err) != 0) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
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

/* Every policy of ta512 on the same trace: each policy's own bookkeeping (its callbacks) and the
 * metrics (with each policy's renormalised attention over its caches) against the shared
 * exact-attention computation they ride on. *metric_share: metrics / shared attention. */
static bool report_policies(Trace *tr, const char *config_path, double *metric_share)
{
    RunConfig rc;
    load_config(config_path, &rc);
    Results *r = replay(tr, &rc, 2);
    *metric_share = r->metric_seconds / r->attention_seconds;
    printf("\n%s, 16 layers, 2 threads: wall %.2f s; shared exact attention %.2f s (prompt "
           "statistics included), metrics %.2f s = %.0f%% of it (thread-seconds)\n",
           config_path, r->wall_seconds, r->attention_seconds, r->metric_seconds,
           100 * *metric_share);
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

/* The results a long study would hold: a 32-layer model with 32 query heads, one prompt and a
 * 32768-step decode evaluated at every step, through n_policies policies (results_bytes of
 * that geometry: nothing is replayed). Target: what they hold resident under 1 GiB (the
 * per-head slots, which grow with layers x steps x query heads, go to the spill on disk). */
static bool report_results_memory(int n_policies, const char *config_path)
{
    enum { BIG_LAYERS = 32, BIG_HEADS = 32, BIG_STEPS = 32768 };
    Results big = {.n_policies = n_policies, .n_layers = BIG_LAYERS, .n_q_heads = BIG_HEADS,
                   .n_evals = BIG_STEPS, .n_turns = 1};
    double resident = results_bytes(&big), report = results_report_bytes(&big);
    double spill = results_spill_bytes(&big), head = results_head_bytes(&big);
    bool ok = resident < (double)(1 << 30);
    printf("results of a %d-layer, %d-query-head, %d-step replay through %s (%d policies): "
           "resident %.1f MiB (of which the report's working set, one policy at a time, "
           "%.1f MiB); on disk in the spill %.2f GiB, of which the per-head metric slots "
           "%.2f GiB\n",
           BIG_LAYERS, BIG_HEADS, BIG_STEPS, config_path, n_policies, resident / (1 << 20),
           report / (1 << 20), spill / (1 << 30), head / (1 << 30));
    printf("target results resident for that replay < 1 GiB: %.1f MiB, %s\n",
           resident / (1 << 20), ok ? "met" : "MISSED");
    return ok;
}

/* The prompt statistics of one KV head's query heads on layer 0 of tr, one thread: GFLOP/s
 * (thread CPU time). */
static double stats_rate_of(Trace *tr)
{
    const TraceMeta *m = trace_meta(tr);
    size_t T = (size_t)m->n_tokens, D = (size_t)m->head_dim, Hq = (size_t)m->n_q_heads;
    size_t Hkv = (size_t)m->n_kv_heads;
    int P = m->n_prompt, W = 32, group = m->n_q_heads / m->n_kv_heads;
    float *q = kv_malloc(Hq * T * D * sizeof(float));
    float *k = kv_malloc(Hkv * T * D * sizeof(float));
    float *v = kv_malloc(Hkv * T * D * sizeof(float));
    float *mass = kv_calloc((size_t)group * P, sizeof(float));
    float *obs = kv_malloc((size_t)group * W * P * sizeof(float));
    KvErr err;
    if (trace_read_layer(tr, 0, q, k, v, &err) != 0) {
        fprintf(stderr, "bench_replay: %s\n", err.msg);
        exit(2);
    }
    double t0 = cpu_seconds();
    double flops = prompt_statistics(q, k, group, group, (int)T, P, (int)D, (float)m->attn_scale,
                                     0.0f, 0, mass, obs, W, NULL);
    double rate = flops / (cpu_seconds() - t0) / 1e9;
    free(q);
    free(k);
    free(v);
    free(mass);
    free(obs);
    return rate;
}

/* The long-context benchmark: the traces of 4k to 32k prompt tokens (written next to the 1B
 * trace) through POLICIES-CONFIG with 2 threads, how the replay grows; at 32k, the replay's
 * wall time against the shared attention's (per thread), and the prompt statistics' rate
 * against sgemm's. */
static bool report_long_context(const char *trace_path, const char *config_path)
{
    static const int prompts[] = {4096, 8192, 16384, 32768};
    enum { N_LONG = sizeof prompts / sizeof prompts[0] };
    char path[4200];
    Results *r = NULL;
    Trace *tr = NULL;
    printf("\nlong context: 2 layers, 32/8 heads, head_dim 128, + %d decode steps, %s, 2 threads\n",
           LONG_DECODE, config_path);
    double first_wall = 0;
    for (int i = 0; i < N_LONG; i++) {
        snprintf(path, sizeof path, "%.4000s.long%dk.h5", trace_path, prompts[i] / 1024);
        make_long_trace(path, prompts[i]);
        if (tr)
            trace_close(tr);
        tr = open_trace(path);
        RunConfig rc;
        load_config(config_path, &rc);
        results_free(r);
        r = replay(tr, &rc, 2);
        config_free(&rc);
        double policies = 0;
        for (int pi = 0; pi < r->n_policies && pi < 64; pi++)
            policies += r->policy_seconds[pi];
        if (i == 0)
            first_wall = r->wall_seconds;
        printf("    %5d prompt tokens: wall %7.2f s (%5.2fx the 4k replay); shared attention "
               "%7.2f s, metrics %6.2f s, policies %6.2f s (thread-seconds)\n",
               prompts[i], r->wall_seconds, r->wall_seconds / first_wall, r->attention_seconds,
               r->metric_seconds, policies);
    }
    int workers = r->n_layers < r->threads_used ? r->n_layers : r->threads_used;
    double attention_wall = r->attention_seconds / workers;
    double gemm = 0;
    Gemm g;
    gemm_init(&g, 1024);
    gemm_rate(&g);
    double stats = stats_rate_of(tr);
    for (int rep = 0; rep < 3; rep++) {
        double x = gemm_rate(&g);
        gemm = x > gemm ? x : gemm;
    }
    gemm_free(&g);
    bool ok_wall = r->wall_seconds <= 2 * attention_wall, ok_stats = stats >= 0.7 * gemm;
    printf("    at 32k: wall %.2f s = %.2fx the shared attention per worker (%.2f s); prompt "
           "statistics %.1f GFLOP/s = %.0f%% of sgemm's %.1f (one KV head's query heads, "
           "1 thread)\n",
           r->wall_seconds, r->wall_seconds / attention_wall, attention_wall, stats,
           100 * stats / gemm, gemm);
    printf("target long context: replay wall <= 2x the shared attention: %.2fx, %s\n",
           r->wall_seconds / attention_wall, ok_wall ? "met" : "MISSED");
    printf("target long context: prompt statistics >= 70%% of sgemm: %.0f%%, %s\n",
           100 * stats / gemm, ok_stats ? "met" : "MISSED");
    results_free(r);
    trace_close(tr);
    return ok_wall && ok_stats;
}

/* A replay with `threads` threads in a child process: its wall time, and its peak resident
 * memory (getrusage of the children: the only child, so nothing this process allocated after
 * the fork counts). */
static void replay_in_child(Trace *tr, RunConfig *rc, int threads, double *wall, long *peak_kib)
{
    int fd[2];
    if (pipe(fd) != 0) {
        perror("bench_replay: pipe");
        exit(2);
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("bench_replay: fork");
        exit(2);
    }
    if (pid == 0) {
        close(fd[0]);
        Results *r = replay(tr, rc, threads);
        ssize_t n = write(fd[1], &r->wall_seconds, sizeof r->wall_seconds);
        _exit(n == (ssize_t)sizeof r->wall_seconds ? 0 : 2);
    }
    close(fd[1]);
    ssize_t n = read(fd[0], wall, sizeof *wall);
    close(fd[0]);
    int status;
    struct rusage ru;
    if (waitpid(pid, &status, 0) != pid || getrusage(RUSAGE_CHILDREN, &ru) != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        n != (ssize_t)sizeof *wall) {
        fprintf(stderr, "bench_replay: the replay in the child process failed\n");
        exit(2);
    }
    *peak_kib = ru.ru_maxrss;
}

int main(int argc, char **argv)
{
    const char *trace_path = argc > 1 ? argv[1] : "bench-1b.h5";
    const char *config_path = argc > 2 ? argv[2] : "bench/replay.ini";
    const char *policies_config = argc > 3 ? argv[3] : NULL;
    char one_layer_path[4096];
    snprintf(one_layer_path, sizeof one_layer_path, "%.4000s.1layer.h5", trace_path);
    make_trace(trace_path, 16);
    make_trace(one_layer_path, 1);
    Trace *tr = open_trace(trace_path), *tr1 = open_trace(one_layer_path);
    RunConfig rc, rc1;
    load_config(config_path, &rc);
    load_config(policies_config ? policies_config : config_path, &rc1);
    const TraceMeta *m = trace_meta(tr);

    /* The child first, while this process holds little that the child would inherit. */
    double two_wall;
    long peak_kib;
    replay_in_child(tr, &rc, 2, &two_wall, &peak_kib);
    openblas_set_num_threads(1);
    double gemm, stats_rate, rows_rate;
    attention_rates(tr, 5, &gemm, &stats_rate, &rows_rate);
    Results *one = replay(tr, &rc, 1);
    double speedup = one->wall_seconds / two_wall;
    double policy_total = 0;
    for (int pi = 0; pi < one->n_policies; pi++)
        policy_total += one->policy_seconds[pi];
    Results *l1 = replay(tr1, &rc1, 1), *l2 = replay(tr1, &rc1, 2);
    double speedup1 = l1->wall_seconds / l2->wall_seconds;
    bool same1 = results_same(l1, l2);
    double qkv_bytes = (double)(m->n_q_heads + 2 * m->n_kv_heads) * m->n_tokens * m->head_dim *
                       sizeof(float);
    /* The bound: one layer's Q/K/V per worker (a 2-thread replay of 16 layers has two)
     * plus the results, which `one` (the same configuration and trace) holds. */
    int two_workers = m->n_layers < 2 ? m->n_layers : 2;
    double mem_bound = two_workers * qkv_bytes + results_bytes(one);
    bool ok_memory = peak_kib * 1024.0 <= mem_bound;

    printf("trace: %s  (%d layers, %d q heads, %d kv heads, head_dim %d, %d prompt + %d decode)\n",
           trace_path, m->n_layers, m->n_q_heads, m->n_kv_heads, m->head_dim, m->n_prompt,
           m->n_tokens - m->n_prompt);
    printf("config: %s (%d policies)\n\n", config_path, one->n_policies);
    printf("OpenBLAS sgemm 1024^3, 1 thread        %8.1f GFLOP/s (thread CPU time)\n", gemm);
    printf("exact attention, prompt statistics     %8.1f GFLOP/s = %3.0f%% of sgemm (one layer, "
           "1 thread)\n", stats_rate, 100 * stats_rate / gemm);
    printf("exact attention, decode rows           %8.1f GFLOP/s = %3.0f%% of sgemm (one layer, "
           "1 thread)\n", rows_rate, 100 * rows_rate / gemm);
    printf("in the replay, 1 thread                %8.1f GFLOP/s  (%.1f GFLOP in %.2f s wall)\n",
           one->attention_flops / one->attention_seconds / 1e9, one->attention_flops / 1e9,
           one->attention_seconds);
    printf("replay wall time, 1 thread             %8.2f s  (shared attention %.2f s, metrics "
           "%.2f s, policy callbacks %.2f s)\n",
           one->wall_seconds, one->attention_seconds, one->metric_seconds, policy_total);
    for (int pi = 0; pi < one->n_policies; pi++)
        printf("    %-31s %8.2f s\n", one->label[pi], one->policy_seconds[pi]);
    printf("replay wall time, 2 threads            %8.2f s  speed-up %.2fx\n", two_wall, speedup);
    printf("peak memory of the 2-thread replay     %8.1f MiB = %.2f x one layer's Q/K/V "
           "(%.1f MiB) = %.2f per thread; results %.1f MiB\n",
           peak_kib / 1024.0, peak_kib * 1024.0 / qkv_bytes, qkv_bytes / (1 << 20),
           peak_kib * 1024.0 / qkv_bytes / 2, results_bytes(one) / (1 << 20));
    printf("\n1 layer (%s, %d policies): 1 thread %.2f s, 2 threads %.2f s, speed-up %.2fx; "
           "results %s\n",
           policies_config ? policies_config : config_path, l1->n_policies, l1->wall_seconds,
           l2->wall_seconds, speedup1, same1 ? "identical" : "DIFFERENT");

    bool ok_stats = stats_rate >= 0.7 * gemm, ok_rows = rows_rate >= 0.7 * gemm;
    bool ok_speedup = speedup >= 1.7, ok_speedup1 = speedup1 >= 1.7 && same1;
    double metric_share = 0;
    bool ok_policies = policies_config ? report_policies(tr, policies_config, &metric_share) : true;
    bool ok_metrics = metric_share <= 0.25;
    printf("\ntarget prompt statistics >= 70%% of sgemm:  %s\n", ok_stats ? "met" : "MISSED");
    printf("target decode rows >= 70%% of sgemm:        %s\n", ok_rows ? "met" : "MISSED");
    printf("target 2 threads >= 1.7x, 16 layers:       %s\n", ok_speedup ? "met" : "MISSED");
    printf("target 2 threads >= 1.7x, 1 layer:         %s\n", ok_speedup1 ? "met" : "MISSED");
    if (policies_config) {
        printf("target each policy's bookkeeping < shared attention: %s\n",
               ok_policies ? "met" : "MISSED");
        printf("target metrics <= 25%% of the shared attention (16 layers, %s): %.0f%%, %s\n",
               policies_config, 100 * metric_share, ok_metrics ? "met" : "MISSED");
    }
    printf("target peak memory <= %d x one layer's Q/K/V + results (%.1f MiB): %.1f MiB, %s\n",
           two_workers, mem_bound / (1 << 20), peak_kib / 1024.0, ok_memory ? "met" : "MISSED");
    bool ok_results = report_results_memory(rc1.engine.n_policies,
                                            policies_config ? policies_config : config_path);
    bool ok_long = policies_config ? report_long_context(trace_path, policies_config) : true;
    results_free(one);
    results_free(l1);
    results_free(l2);
    config_free(&rc);
    config_free(&rc1);
    trace_close(tr);
    trace_close(tr1);
    return ok_stats && ok_rows && ok_speedup && ok_speedup1 && ok_policies && ok_metrics &&
                   ok_memory && ok_results && ok_long
               ? 0
               : 1;
}
