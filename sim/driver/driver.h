/* driver.h — drives the policy instances of one layer through the protocol of
 * policies/policy.h: the one place that protocol is written, for open-loop replay
 * (sim/replay/engine.c) and for closed-loop eval (traces/eval/eval.c).
 *
 * A PolicyDriver holds one instance of each of n policies over one LayerView. The driver:
 *  - creates instance i of specs[i] with its seed, policy_instance_seed(run_seed, label, layer);
 *  - at each prefill chunk, computes exactly the statistics each instance asks for
 *    (PrefillView): prefill_mass when it wants it, the rows of the chunk's last
 *    min(want_prefill_rows, chunk tokens) queries and no other, decode_mass only for an oracle
 *    that wants it (open loop only, computed once). At the first chunk of the first span every
 *    cache is empty and every instance's statistics are the same numbers: computed once and
 *    shared (prompt_statistics, sim/base/attention.h). At a later chunk each instance's are
 *    computed over its own caches, never shared;
 *  - calls prefill, step and observe, and records each instance's memory (MemReport) after each
 *    prefill chunk and after each observe;
 *  - times each instance's callbacks, and the statistics it computed;
 *  - for an instance with kv_quant, applies its quantization layer (policies/kvquant.h) after
 *    the policy's prefill, step and observe, so that what the queries attend over holds the
 *    dequantized K/V, and reports its device bytes with the quantized slots at their quantized
 *    size.
 * The caller supplies what differs between replay and eval: the LayerView's Q/K/V, the true
 * attention of each decode query (read by oracles only), and the attention each instance's query
 * computed over that instance's caches.
 *
 * Calls, in order:
 *   driver_create(d, L, specs, n, run_seed, kv_bits, sliding, live, err)
 *   for each span of L->meta->spans, in order (policies/policy.h):
 *     a prefill span [a, b), for each chunk [c0, c1) (driver_chunk_end):
 *       driver_prefill(d, a, b, c0, c1)  the rows [0, c1) of L exist
 *     a decode run [a, b), for each decode step t in it, for each instance i (in any order):
 *       driver_step(d, i, t, full_attn)  the rows of position t exist in L
 *       [caller: query t attends over each of d->inst[i]'s caches]
 *       driver_observe(d, i, attn)       attn as PolicyType.observe takes it
 *   driver_free(d)
 * In closed loop (live) the rules of policies/policy.h on which rows of L exist when apply; a
 * policy that needs the future (want_decode_mass) or other layers' rows of a trace (want_trace)
 * cannot run there: driver_create says so. */
#ifndef KVSIM_DRIVER_H
#define KVSIM_DRIVER_H

#include <stdbool.h>
#include <stdint.h>

#include "policies/kvquant.h"
#include "policies/policy.h"
#include "sim/base/pool.h"

/* [run] history: what the policies hold when a prefill span follows a decode run (a later
 * turn). persist: the caches they kept, the span's tokens arrive on top (a serving engine that
 * keeps the KV cache between turns). reencode: nothing; the instances are created anew and the
 * whole history [0, end of the span) is prefilled as one span over the full cache, then
 * compressed (an application that keeps no cache, re-encoding the conversation every turn).
 * prefix: as reencode for the policies (the same calls, the same metrics), but the tokens of
 * segment 0 (the system prompt) count as served from a persisted, uncompressed prefix cache: in
 * turns.csv they are not computed again and their K/V bytes are carried into the turn (the
 * phase-1 prefix cache of a local assistant). */
typedef enum { HISTORY_PERSIST = 0, HISTORY_REENCODE = 1, HISTORY_PREFIX = 2 } RunHistory;
/* Its name in [run] history ("persist", "reencode", "prefix"), and the mode of a name (-1: none). */
const char *run_history_name(RunHistory h);
int run_history_parse(const char *name);

/* [run] sliding_layers: what the policies do on a sliding-window layer (a layer whose queries
 * attend over the last W keys only, LayerView.window = W > 0). skip: the layer keeps its window,
 * as a serving engine's rotating buffer of W tokens does, and is not compressed: every policy's
 * instance there is the rotating buffer (policy `window` with window = W, sinks = 0), so the
 * budget applies to the global layers alone (the TriAttention MLX port's choice). compress: the
 * policies drive the sliding layers too, with the same budget per layer. */
typedef enum { SLIDING_SKIP = 0, SLIDING_COMPRESS = 1 } SlidingLayers;
const char *sliding_layers_name(SlidingLayers s);
int sliding_layers_parse(const char *name); /* -1: neither */
/* Whether the policies compress a layer of this window (rather than keep its window). */
static inline bool driver_compresses(int window, SlidingLayers sliding)
{
    return window == 0 || sliding == SLIDING_COMPRESS;
}

typedef struct {
    char label[64];         /* [policy.LABEL] */
    const PolicyType *type;
    void *params;           /* the type's parameter struct */
    KvQuantSpec quant;      /* kv_quant and its keys: the precision of what the policy keeps
                             * (policies/kvquant.h); zero: none */
} PolicySpec;

typedef struct {
    const LayerView *L;
    int n;           /* instances */
    Policy **inst;   /* [n]: the instance of specs[i] */
    MemReport *mem;  /* [n]: instance i's memory after its prefill, then after each observe */
    double *seconds; /* [n]: time in instance i's callbacks (prefill, step, observe, memory) */
    double stats_seconds, stats_flops; /* the statistics computed for prefill */
    Pool *pool; /* NULL, or set by the caller after driver_create: spreads the prefill (the
                 * statistics by query head, then the instances' prefills) over its threads;
                 * results do not depend on it */
    /* Set by the caller after driver_create: the instances without kv_quant of a type with
     * step_many (policies/policy.h) form groups (a sweep's budgets of one policy), one per nest
     * for a type whose caches nest (driver_nests), when there are two or more. A group of a
     * type with step_many steps by one step_many call at the driver_step of its first instance
     * (the others' driver_step then does nothing); the members of a nest also attend together
     * (sim/replay/engine.c). Results do not depend on it; the caller must then call driver_step
     * for every instance at every step, and observe only once every driver_step of the step
     * has returned. */
    bool share_steps;
    /* The driver's own. */
    bool live;
    int kv_bits;
    StepView *sv; /* [n]: the step each instance is in, between driver_step and driver_observe */
    float *decode_mass; /* [n_q_heads][T], once an oracle has asked for it */
    const PolicySpec *specs; /* [n]: what driver_restart creates again */
    KvQuantState **quant;    /* [n]: instance i's quantization layer, NULL without kv_quant */
    uint64_t run_seed;
    int *share_first; /* [n]: the first instance of i's group of shared steps, or -1 */
    int *share_idx;   /* [n]: the groups' instances, each group's together from its first's */
    int *share_at;    /* [n]: where group i's instances start in share_idx (i its first) */
    int *share_len;   /* [n]: how many (i its first) */
    Policy **share_inst; /* [n]: scratch, laid out as share_idx */
    PolicySpec *own_specs;   /* [n] the rotating buffers of a skipped sliding layer, or NULL */
    void *own_params;        /* their parameters */
} PolicyDriver;

/* Creates the instances of specs[0, n) for layer L->layer, in order, with PolicyEnv seed
 * policy_instance_seed(run_seed, label, layer) and kv_bits; on a sliding-window layer that
 * `sliding` skips (!driver_compresses), instance i is the layer's rotating buffer instead, under
 * specs[i]'s label. live: closed loop, where the rows of L fill in as tokens are fed. Returns 0
 * when ready; 1 when live and an instance wants the future or a trace (want_decode_mass,
 * want_trace: not applicable, instances after it are not created); -1 with the create
 * callback's message. On a nonzero return nothing is left to free. */
int driver_create(PolicyDriver *d, const LayerView *L, const PolicySpec *specs, int n,
                  uint64_t run_seed, int kv_bits, SlidingLayers sliding, bool live, KvErr *err);
/* Chunk [chunk_start, chunk_end) of the prefill span [span_start, span_end) arrives: computes the
 * statistics each instance asks for, calls every instance's prefill and records its memory. */
void driver_prefill(PolicyDriver *d, int span_start, int span_end, int chunk_start, int chunk_end);
/* The end of the chunk that starts at chunk_start in a prefill span ending at span_end, chunks of
 * prefill_chunk tokens (0: the rest of the span at once). */
static inline int driver_chunk_end(int chunk_start, int span_end, int prefill_chunk)
{
    return prefill_chunk > 0 && span_end - chunk_start > prefill_chunk ? chunk_start + prefill_chunk
                                                                        : span_end;
}
/* Token t arrives at instance i: its step callback. full_attn is the true attention of query t,
 * [n_q_heads][n_tokens] zero beyond t, passed on to oracles only (may be NULL when instance i
 * is not an oracle). */
void driver_step(PolicyDriver *d, int i, int t, const float *full_attn);
/* With share_steps: the instances whose steps driver_step(d, i, ...) takes, i the first of
 * them: their count, and *members the instances in order (i first) when there are two or more
 * (NULL when i steps alone: 1); 0 when i steps with an earlier instance's group (its
 * driver_step does nothing). Without share_steps every instance steps alone (1). A caller that
 * spreads the instances over threads keeps each group on one thread, its first's driver_step
 * before the others' observe. */
int driver_step_group(const PolicyDriver *d, int i, const int **members);
/* Whether instance i's caches nest (policy.h: nest_param, nests, keep_order) and it has no
 * kv_quant: the replay then scores it in keep order, alone or with its nest. */
bool driver_nests(const PolicyDriver *d, int i);
/* After query t attended over instance i's caches: its observe callback (when it has one) with
 * attn[g] = [group][cache[g].n], then its memory into d->mem[i]. */
void driver_observe(PolicyDriver *d, int i, const float *const *attn);
/* Destroys the instances. */
/* Destroys every instance and creates it again, with the same parameters and seed, holding
 * nothing: what a later turn starts from when the history is re-encoded ([run] history =
 * reencode, sim/replay/engine.h). The caller then prefills the whole history as one span
 * [0, b). The memory records, times and decode_mass are kept. Returns -1 with the create
 * callback's message (the driver must then still be freed). */
int driver_restart(PolicyDriver *d, KvErr *err);
void driver_free(PolicyDriver *d);

/* The seed of the instance of policy `label` for `layer` (PolicyEnv.seed): the same in every
 * command that drives policies, so a policy makes the same random choices everywhere. */
uint64_t policy_instance_seed(uint64_t run_seed, const char *label, int layer);
/* The instance's memory after a step: its memory() callback, or, when it has none, its live
 * slots at kv_bits (allocated = live). */
void policy_memory_report(const Policy *inst, int head_dim, int kv_bits, MemReport *mem);
/* The memory of instance i as the driver records it: policy_memory_report, less the bytes its
 * quantization layer saves (device and allocated bytes). */
void driver_memory_report(const PolicyDriver *d, int i, MemReport *mem);

#endif
