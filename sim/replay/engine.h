/* engine.h — open-loop replay of a trace through many policies side by side.
 *
 * For every layer (a unit of work for the thread pool, sim/base/pool.h), the engine reads that
 * layer's Q/K/V and drives one instance of every configured policy over it with the policy
 * driver (sim/driver/driver.h: instances, prefill statistics, callbacks, memory), through the
 * trace's spans in order: each prefill span in chunks of prefill_chunk tokens, each decode run
 * step by step (the protocol of policies/policy.h). Metrics are recorded at decode steps only
 * (every eval_every-th step of each decode run, and the probes inside decode runs). What the
 * engine adds is the attention: it computes the true attention of every decode query once
 * (OpenBLAS, blocks of decode steps batched into sgemm) and shares it with all policies (the
 * oracles' full_attn, the metrics): each policy's query attends only over its own cache,
 * renormalised there. Metrics land in per-(policy, layer, step, head) slots, written to a
 * temporary file block by block (the spill, below), and are reduced in a fixed order, so
 * results are byte-identical at any thread count. Each instance takes the decode steps of a
 * block one at a time: its step, the attention over each of its caches and its metrics, its
 * observation. With more threads than layers, the threads beyond one per layer share the work
 * inside a layer (the read of Q, K and V; the attention and the prompt statistics by query head;
 * the prefills by instance; the decode steps of a block by instance, each instance through the
 * whole block on one thread).
 * Memory per worker (at most one per layer): one layer's Q/K/V, plus the attention rows of a
 * block of decode steps (64 x query heads x tokens floats: 0.7 of the Q/K/V at 32 query heads
 * and 8 KV heads), each instance's attention over its caches (query heads x its cache) and
 * the values again as halves (1/6 of the Q/K/V at 32/8 heads: used by the output errors when
 * every value is exactly a half, as in a float16 trace), and the metrics of one block of decode
 * steps until they go to the spill; bench_replay reports the peak against the Q/K/V. */
#ifndef KVSIM_ENGINE_H
#define KVSIM_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "policies/policy.h"
#include "sim/driver/driver.h"
#include "sim/replay/metric_table.h"
#include "sim/format/trace.h"

/* RunHistory ([run] history) is sim/driver/driver.h's: replay and eval both follow it. */

/* The turns of a trace: turn 0 is the first span (the prompt) and the decode run after it, turn
 * k the k-th later prefill span and the spans after it up to the next prefill span. Sizes and
 * costs of the turn's prefill, the same for every policy (docs/metrics.md, turns.csv). */
enum { TURN_DISTANCES = 4 }; /* needle survival by turn distance 0, 1, 2 and 3 or more */
typedef struct {
    int prefill_start, context_tokens; /* the prefill span [prefill_start, context_tokens) */
    int decode_steps;                  /* decode steps of the turn */
    int prefill_tokens;                /* tokens computed by the turn's prefill */
    int served_tokens;                 /* history tokens not computed again */
    double attn_flops, dense_flops;    /* dense_flops NaN: the model's size is unknown */
    double prefix_bytes_per_layer;     /* prefix: the uncompressed segment-0 K/V of one layer */
} RunTurn;

typedef struct {
    int threads;    /* 0 = all cores; at most layers x max(query heads, policies) are used */
    int topk;       /* k of recall@k */
    int eval_every; /* record metrics every N steps of each decode run (probe steps always) */
    int kv_bits;    /* device precision of K and V */
    int prefill_chunk; /* tokens per prefill chunk; 0 = each prefill span at once */
    RunHistory history; /* what a later turn's prefill span starts from (RunHistory) */
    SlidingLayers sliding_layers; /* the policies on sliding-window layers (SlidingLayers) */
    double prefill_tflops; /* prefill throughput for turns.csv's prefill_seconds; 0 = none */
    uint64_t seed;
    bool progress;  /* progress with ETA on stderr */
    bool spill_file; /* the spill in a file even when it is small enough for memory (tests) */
    int n_policies;
    PolicySpec *policies;
} EngineConfig;

typedef struct {
    int n_policies, n_layers, n_q_heads, n_kv_heads, n_prompt, n_tokens;
    int n_evals;
    int32_t *eval_step; /* [n_evals] decode positions t, ascending */
    bool *eval_probe;   /* [n_evals] a probe is checked at this step */
    char (*label)[64];  /* [n_policies] */
    const PolicyType **type;
    bool *is_oracle;
    /* The metrics' slots, one per line of sim/replay/metrics.def (HM_*, SM_*, TM_*:
     * metric_table.h). The per-(layer, evaluated step) slots, per query head or not, are not held
     * in memory: they grow with layers x decode steps (x query heads), and what the CSVs keep
     * of them are reductions, so they go to a temporary file (the spill, below) as each block
     * of decode steps of a layer is done, and the report reads them back (report.c). Only the
     * totals, per (policy, layer), stay here. */
    double *total; /* [policy][layer][N_TOTAL_METRICS] */
    char *spill_mem; /* the spill (results_spill_open): in memory when it is small, */
    int spill_fd;    /* else an unlinked temporary file; neither: none */
    int spill_first, spill_policies; /* policy pi is the file's policy spill_first + pi, of
                                      * spill_policies (a results_view shares the file) */
    int n_steps;   /* decode steps replayed, over every decode run (T - P for one prompt) */
    /* The turns (RunTurn) and what each policy carries into them. */
    int n_turns;
    RunTurn *turns;       /* [n_turns] */
    double prefill_tflops; /* EngineConfig's */
    int32_t *eval_turn;   /* [n_evals] the turn of each evaluated step */
    double *turn_bytes;   /* [policy][layer][turn] device bytes held when the turn's prefill starts */
    double wall_seconds;
    /* Timings, summed over workers (not part of any output file: they vary run to run). */
    double attention_seconds; /* the shared exact attention: decode rows, prompt statistics */
    double attention_flops;
    double metric_seconds;     /* metrics and the renormalised attention over the caches */
    double policy_seconds[64]; /* each policy's own callbacks (first 64 policies) */
    int threads_used;
} Results;

Results *engine_run(Trace *tr, const EngineConfig *cfg, KvErr *err);

void results_free(Results *r);

/* The spill of a Results: every (policy, layer, evaluated step) slot, in one temporary file
 * ($TMPDIR, else /tmp; unlinked as soon as it is created, so it goes when the process does),
 * or in memory when it takes at most SPILL_MEMORY_MAX bytes (a small replay: its files are then
 * not subject to the disk, nor to a file size limit, on account of the spill), read and written
 * at fixed offsets (any thread, any order: each slot is written once):
 *   head slots, per (policy, head metric) one column [layer][eval][query head] of floats: a
 *     column is what summary.csv's mean and quantiles of that metric stream over;
 *   then per (policy, layer, evaluated step) one record of STEP_RECORD doubles: the step
 *     metrics (SM_*), then needle survival by turn distance (STEP_NEEDLE + d: at a probe step,
 *     of the needles of the turn d turns before, the last distance d or more; NaN where no
 *     needle of that distance precedes the step, and off probe steps).
 * results_spill_open makes the file for r's counts (n_policies, n_layers, n_q_heads, n_evals);
 * the engine calls it, and so can a test that fills a Results by hand. A read or write that
 * fails (a full disk) is an error of the write functions; the read functions, which run after a
 * replay on a file already written, end the process with a one-line message (exit 2). */
enum { STEP_NEEDLE = N_STEP_METRICS, STEP_RECORD = N_STEP_METRICS + TURN_DISTANCES };
#ifndef SPILL_MEMORY_MAX
#define SPILL_MEMORY_MAX (64.0 * (1 << 20))
#endif
/* to_file: a file whatever the size (tests of the file). Every slot reads as 0 until written. */
int results_spill_open(Results *r, bool to_file, KvErr *err);
/* Head metric `slot` of policy pi, layer l, evaluated steps [e0, e0 + n): [n][n_q_heads]. */
int results_write_heads(const Results *r, int pi, int slot, int layer, int e0, int n,
                        const float *in, KvErr *err);
void results_read_heads(const Results *r, int pi, int slot, int layer, int e0, int n, float *out);
/* The step records of policy pi, layer l, evaluated steps [e0, e0 + n): [n][STEP_RECORD]. */
int results_write_steps(const Results *r, int pi, int layer, int e0, int n, const double *in,
                        KvErr *err);
void results_read_steps(const Results *r, int pi, int layer, int e0, int n, double *out);
/* One value of each (tests, checks): head metric `slot` at query head h; field `field` of a
 * step record. */
float results_head_at(const Results *r, int pi, int layer, int e, int h, int slot);
double results_step_at(const Results *r, int pi, int layer, int e, int field);
/* The same to write (a Results filled by hand); -1 and err when the write fails. */
int results_set_head_at(const Results *r, int pi, int layer, int e, int h, int slot, float v,
                        KvErr *err);
int results_set_step_at(const Results *r, int pi, int layer, int e, int field, double v,
                        KvErr *err);

/* Whether a and b (of the same shape) hold the same bits in every slot: head slots, step
 * records, totals (a replay at another thread count must). */
bool results_same(const Results *a, const Results *b);

/* Memory: results_bytes and results_report_bytes (report.h) say what a Results holds
 * resident. */
/* The spill's bytes (the per-head slots and the step records of every policy); of them, those
 * a replay of r's shape holds in memory (all of them up to SPILL_MEMORY_MAX, else none). */
double results_spill_bytes(const Results *r);
double results_spill_resident_bytes(const Results *r);
/* The per-head slots' bytes, the part of the spill that grows with query heads: what the
 * replay held in memory before the spill. */
double results_head_bytes(const Results *r);

static inline double *results_total(const Results *r, int pol, int layer)
{
    return r->total + ((size_t)pol * r->n_layers + layer) * N_TOTAL_METRICS;
}

/* Policy pi of r alone, as a run of that one policy would have returned it: a shallow copy that
 * shares r's arrays (never results_free it). The slots of every array are laid out policy
 * first, and an instance's results depend on nothing but its own spec and the trace, so the
 * reports of the view are those of a run of policy pi alone (`kvsim sweep` writes each cell
 * from one). The timings stay r's. */
static inline Results results_view(const Results *r, int pi)
{
    Results v = *r;
    size_t per_layer = (size_t)pi * r->n_layers;
    v.n_policies = 1;
    v.label = r->label + pi;
    v.type = r->type + pi;
    v.is_oracle = r->is_oracle + pi;
    v.spill_first = r->spill_first + pi;
    v.total = results_total(r, pi, 0);
    v.turn_bytes = r->turn_bytes + per_layer * r->n_turns;
    return v;
}

#endif
