/* policy.h — the one interface every eviction policy implements.
 *
 * A policy is one .c file that defines a `const PolicyType` and adds one line, POLICY(name), to
 * policies/registry.def. Whoever drives it never knows which algorithm it drives.
 *
 * One module drives policies, sim/driver/driver.h, for open-loop replay of a trace (`kvsim run`,
 * sim/replay/engine.h) and for closed-loop decoding, where the model generates from what the policy
 * keeps (`kvsim eval`, traces/eval/eval.h). For each (configured policy, layer) it creates one Policy
 * instance, which keeps one cache (KVCache) per KV head of the layer. Calls, in order,
 * following the spans of meta->spans (sim/format/trace.h):
 *
 *   create(params, layer, env)   the policy sets its `base` fields, including what it needs
 *   for each span, in order:
 *     a prefill span [a, b): its tokens arrive on top of whatever the caches hold (nothing for
 *     the first span, the prompt; later spans are later turns' messages). It is fed in chunks
 *     [c0, c1) of `prefill_chunk` tokens ([run] prefill_chunk; 0 = the whole span at once; the
 *     last chunk may be shorter). For each chunk:
 *       prefill(p, prefill_view)  the chunk's queries have attended over the caches plus the
 *                                 chunk's own tokens (causal); admit the chunk's tokens the
 *                                 policy keeps and evict what it wants to. A policy that
 *                                 compresses once after prefill (kvpress) waits for the span's
 *                                 last chunk (prefill_view->last_chunk); one that compresses
 *                                 during prefill (TriCache, the MLX ports) may evict after
 *                                 every chunk
 *       memory(p, m)              the memory after the chunk's eviction
 *     a decode run [a, b): for t = a .. b-1 (closed loop: the tokens fed, which may stop early)
 *       step(p, step_view)        token t arrives: admit it and decide what query t attends over
 *       [replay: query t attends over each KV head's cache, metrics are recorded; closed loop: the
 *        model's query t attends over them and the layer's output goes on from that attention]
 *       observe(p, step_view, attn) the attention query t really computed over the caches
 *                                   (softmax renormalised on the cache), for scores and eviction
 *       memory(p, m)               the memory after this step's eviction
 *   destroy(p)
 * The first span is a prefill span; a prefill span after a decode run starts from what the
 * policy kept ([run] history = persist; with reencode the driver creates the instances anew and
 * feeds the whole history [0, b) as one span instead: driver_restart, sim/driver/driver.h). A single prompt (every version 1 trace) is one prefill span [0, P) and one decode
 * run [P, T); fed whole (prefill_chunk = 0) it is one prefill call, as before spans existed.
 *
 * Budget. max_slots (below) bounds every decode attention. The queries of a prefill chunk attend
 * over the caches plus the whole chunk, which no budget bounds; docs/policies.md states for each
 * policy what its caches hold after a chunk (most: at most budget - 1 slots after every chunk,
 * so that the next token fits; a kvpress-style one: only after a span's last chunk).
 *
 * Information rules. A policy may read q, k, v and the metadata of positions <= t (the past and
 * the present), where at a prefill chunk t is the chunk's last position, chunk_end - 1, and at
 * create nothing of any position exists yet. Only policies whose `base.is_oracle` is set may
 * read step_view->full_attn or decode_mass (the true attention, or the future): those are upper
 * bounds, not methods.
 *
 * Closed loop. The LayerView's arrays have room for the whole run: n_tokens is that capacity
 * (input tokens, most tokens generated for each question), not the number of tokens that will
 * be fed, and n_prompt is the first prefill span. Its rows exist as they are produced:
 *   - at the prefill of a span [a, b), q, k and v of [0, b) (closed loop feeds each span whole,
 *     one chunk; with history = persist a later span's queries attended over the policy's caches
 *     plus the span, with reencode the history [0, b) was encoded again with the full cache);
 *   - at step t and observe of t, q, k and v of [0, t] (the model computed position t's before
 *     step, and wrote its K/V into the run's cache whatever the policy decides);
 *   - the metadata of [0, t] (t: the last position fed). Positions after the first answer
 *     depend on what the policy answered, so a later position's segment and token exist only
 *     once it is fed; meta->spans and meta->needles describe the first span only.
 * Every other row holds unspecified values (another policy's decode of the same prompt): what
 * the rule above forbids does not exist there. full_attn (oracles) is query t's true attention
 * over [0, t] of the run's keys. decode_mass never exists: the future depends on the policy
 * itself, so a policy that sets want_decode_mass does not apply in closed loop; nor does one that
 * sets want_trace (it needs other layers' rows, which closed loop computes later or never). The run may stop
 * after any step (end of sequence, a settled answer).
 *
 * GQA. A KV head g serves query heads [g*group, (g+1)*group). A policy that scores tokens from
 * attention must combine all query heads of the group and document the reduction it uses. */
#ifndef KVSIM_POLICY_H
#define KVSIM_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sim/format/trace.h"
#include "sim/base/util.h"

/* ---- Parameters: declared as a table, parsed and validated by the config loader ---- */
typedef enum { PARAM_INT, PARAM_DOUBLE, PARAM_BOOL, PARAM_ENUM, PARAM_STRING } ParamKind;

#define PARAM_STRING_MAX 512

typedef struct {
    const char *key;     /* INI key */
    ParamKind kind;      /* int -> int, double -> double, bool -> bool, enum -> int, string -> char[PARAM_STRING_MAX] */
    size_t offset;       /* offsetof(the policy's params struct, field) */
    const char *dflt;    /* default, as it would be written in the INI file */
    double min, max;     /* inclusive range for int and double */
    const char *choices; /* enum: "a|b|c" (value = index) */
    const char *help;    /* one line, shown by `kvsim policies` */
} ParamSpec;

/* ---- What a policy instance sees ---- */

/* One layer of the run: a trace's in replay, the model's in closed loop (rows: above). */
typedef struct {
    const TraceMeta *meta; /* tokens, positions, segments, needles, probes, rope */
    int layer;
    int n_q_heads, n_kv_heads, group; /* group = n_q_heads / n_kv_heads */
    int head_dim;
    int n_tokens, n_prompt; /* T, P */
    float attn_scale;
    float attn_softcap; /* > 0: logits soft-capped, softcap_logitf (sim/base/attention.h) */
    int window; /* 0: query t attends keys [0, t]; W > 0 (sliding window): [max(0, t-W+1), t] */
    const double *rope_inv_freq; /* [head_dim/2] this layer's RoPE frequencies (points into meta;
                                  * the layout, every layer's, is meta->rope_layout) */
    const float *q; /* [n_q_heads][T][head_dim] post-RoPE */
    const float *k; /* [n_kv_heads][T][head_dim] post-RoPE */
    const float *v; /* [n_kv_heads][T][head_dim] */
    /* The trace being replayed (open loop), NULL in closed loop and where a policy is driven on
     * a hand-built layer: a policy that needs another layer's rows (trig granularity = kvhead)
     * reads them with trace_read_layer, under the information rules below. */
    Trace *trace;
} LayerView;

/* The one builder of a LayerView: layer `layer` of `meta`, its scale, window and RoPE from the
 * layer's geometry (trace_layer_geometry), over rows [0, meta->n_tokens) of q, k and v. */
LayerView layer_view_make(const TraceMeta *meta, int layer, const float *q, const float *k,
                          const float *v);

typedef struct {
    uint64_t seed; /* derived from the run seed, the policy label and the layer */
    int kv_bits;   /* precision of K and V on the device (16 = fp16) */
} PolicyEnv;

/* One prefill chunk and its attention statistics, computed by the driver only when an instance
 * asks for them.
 *
 * The statistics are those of the chunk's queries i in [chunk_start, chunk_end) over what this
 * instance holds: for query head h, the slots of its KV head's cache as they are when the chunk
 * arrives (a slot's alt_kv K where set, so a synthetic slot takes part with its own K) plus the
 * chunk's tokens [chunk_start, i] (causal), a key outside the layer's window excluded (a
 * synthetic slot never is), softmax renormalised over that set, as a decode query's attention
 * over the cache is. Each instance gets the numbers of its own caches (they differ per instance
 * and per KV head). The arrays are indexed by position, [0, chunk_end): a position neither cached
 * nor in the chunk gets 0; a synthetic slot has no position, so what a row gives it is not
 * reported (that row sums to 1 minus it). For the first chunk of the first span the caches are
 * empty: these are the prompt's causal attention over [0, chunk_end). */
typedef struct {
    const LayerView *L;
    int span_start, span_end;   /* the prefill span [a, b) */
    int chunk_start, chunk_end; /* this chunk [c0, c1), inside the span */
    bool last_chunk;            /* chunk_end == span_end: the span is complete */
    /* [n_q_heads][chunk_end]: sum over the chunk's queries i of p_i(j); NULL unless
     * base.want_prefill_mass. */
    const float *prefill_mass;
    /* [n_q_heads][obs_rows][chunk_end]: the attention rows of the chunk's last obs_rows queries
     * (query chunk_end-obs_rows+r in row r), obs_rows = min(want_prefill_rows, chunk tokens);
     * NULL unless want_prefill_rows > 0. */
    const float *obs_attn;
    int obs_rows;
    /* [n_q_heads][T]: sum over every decode step t of every decode run of p_t(j), the true
     * attention over [0, t] (oracle_future only); the same array at every chunk. */
    const float *decode_mass;
} PrefillView;

typedef struct {
    const LayerView *L;
    int t; /* the decode step: the new token's index and the query's */
    /* [n_q_heads][T]: the true attention of query t over [0, t] (zero beyond); oracles only. */
    const float *full_attn;
} StepView;

/* ---- The cache of one KV head ----
 * A list of slots. A slot holds a trace position whose K and V come from the trace, or, when
 * alt_kv[i] is set, an approximation of them (e.g. a dequantized restored token: pos >= 0) or a
 * synthetic entry (pos = -1, e.g. a summary of skipped tokens). Query t attends over all slots.
 * Membership of real positions is O(1) through slot_of. Slot order is the policy's; removal
 * moves the last slot into the hole. */
typedef struct {
    int n;          /* slots in use */
    int cap;
    int head_dim;
    int32_t *pos;   /* [cap] */
    float **alt_kv; /* [cap] NULL, or 2*head_dim floats (k then v) owned by the cache */
    int32_t *slot_of; /* [n_tokens]: slot index of a position, -1 if not cached */
    int n_tokens;
    int n_alt;        /* slots with alt_kv set; the other n - n_alt hold exact trace K/V */
    /* [cap]: a stamp of each alt_kv write, unique in this cache (kvcache_add_alt takes the next
     * of alt_clock), so that whoever wrote an alt slot can tell whether it was written since */
    uint64_t *alt_stamp;
    uint64_t alt_clock;
} KVCache;

void kvcache_init(KVCache *c, int n_tokens, int head_dim);
void kvcache_free(KVCache *c);
static inline bool kvcache_has(const KVCache *c, int pos) { return c->slot_of[pos] >= 0; }
/* Adds a real position with the trace's K and V (no-op if already cached). */
void kvcache_add(KVCache *c, int pos);
/* Adds a slot with approximate or synthetic K,V (copied); pos = -1 for synthetic. If pos is
 * already cached, its slot takes the new K,V. Returns the slot index. */
int kvcache_add_alt(KVCache *c, int pos, const float *k, const float *v);
void kvcache_remove(KVCache *c, int pos);   /* real position; no-op if absent */
void kvcache_remove_slot(KVCache *c, int slot);
/* Removes every slot (a policy that rebuilds its cache at a prefill chunk). */
void kvcache_clear(KVCache *c);
/* The cache holds exactly the real positions pos[0, n) (distinct), in that slot order, with the
 * trace's K and V: what removing every slot and adding them in order gives, in O(old n + n). */
void kvcache_assign(KVCache *c, const int32_t *pos, int n);
/* Writes the real positions held to out (room for c->n), ascending; returns how many. */
int kvcache_positions(const KVCache *c, int32_t *out);
/* Number of slots holding real positions (pos >= 0). */
int kvcache_real_count(const KVCache *c);

/* ---- Memory accounting, reported after each step's eviction (per layer, all KV heads) ---- */
typedef struct {
    double device_bytes;    /* live K+V bytes on the accelerator */
    double allocated_bytes; /* device bytes allocated (>= live; engines grow buffers in steps) */
    double host_bytes;      /* second-tier bytes (offloaded, possibly quantized) */
    double to_host_bytes;   /* moved device -> host during this step */
    double to_device_bytes; /* moved host -> device during this step */
    double fetched_tokens;  /* tokens brought from the host tier for this step */
    double restored_tokens; /* tokens restored from the host tier this step */
    double restore_k_err;   /* sum over tokens restored this step of ||k~ - k|| / ||k|| */
    double restore_v_err;   /* likewise for v */
} MemReport;

/* Device bytes of `tokens` cached entries (K and V) of head_dim at kv_bits. */
double kv_entry_bytes(double tokens, int head_dim, int kv_bits);

/* ---- The instance base: every policy struct starts with `Policy base;` ---- */
typedef struct PolicyType PolicyType;

typedef struct {
    const PolicyType *type;
    int n_kv_heads;
    KVCache *cache; /* [n_kv_heads] */
    bool is_oracle;
    /* What the driver must compute for this instance (set by create). */
    bool want_prefill_mass;
    int want_prefill_rows;
    bool want_decode_mass;
    /* Needs other layers' rows of the trace (LayerView.trace), which only a replay has: such an
     * instance does not apply in closed loop, where create sets this and allocates nothing
     * else (trig's granularity = kvhead). */
    bool want_trace;
} Policy;

/* ---- Per-token scores, for the wrappers that allocate a budget across heads and layers ----
 * A policy that compresses a prefill span once, when it is complete, to the best of the cached
 * positions before a window of the span's last positions (kvpress's ScorerPress: snapkv and the
 * presses of policies/press.h) may expose that choice, so that a wrapper (adakv, pyramid:
 * policies/wrap.h) drives the same frame with its own number of tokens per head. The wrapper
 * creates an instance of the inner policy for its scores and never calls its other callbacks. */
typedef struct {
    /* The parameters' frame: the budget (tokens per KV head at attention, the current one
     * included), the most window positions a compression keeps, and whether decode grows
     * (nothing evicted) or slides (the window, then each new token; the oldest evicted). */
    void (*frame)(const void *params, int *budget, int *window, bool *grow);
    /* The window of this compression (pv: a span's last chunk): its last positions kept. */
    int (*window_at)(const Policy *p, const PrefillView *pv);
    /* score_at[cand[i]], i < n: KV head g's scores of its cached positions cand[0, n) before
     * the window (ascending), higher kept. Scores of one layer's KV heads are on one scale
     * (adakv compares them across heads). */
    void (*score)(Policy *p, const PrefillView *pv, int g, const int32_t *cand, int n,
                  double *score_at);
} PolicyScorer;

struct PolicyType {
    const char *name;        /* the value of type= */
    const char *description; /* one line */
    size_t params_size;      /* sizeof the policy's parameter struct */
    const ParamSpec *params; /* terminated by an entry with key == NULL */
    /* Checks parameter combinations the table cannot express; may be NULL. */
    int (*validate)(const void *params, KvErr *err);
    /* Returns NULL with a one-line message for input that only shows at this point (e.g. a
     * calibration file that does not fit the layer); parameters are already validated. */
    Policy *(*create)(const void *params, const LayerView *L, const PolicyEnv *env, KvErr *err);
    void (*prefill)(Policy *p, const PrefillView *pv);
    void (*step)(Policy *p, const StepView *sv);
    /* attn[g] is [group][cache[g].n]: query head g*group+i's attention over cache g's slots,
     * in slot order. May be NULL when the policy does not use attention. */
    void (*observe)(Policy *p, const StepView *sv, const float *const *attn);
    /* May be NULL: the driver then reports live slots at env.kv_bits, allocated = live. */
    void (*memory)(const Policy *p, MemReport *m);
    void (*destroy)(Policy *p);

    /* ---- The contract the conformance suite (tests/test_conformance.c) checks ----
     * The most slots (real and synthetic) one KV head's cache may hold when decode query t
     * attends (t in any decode run), for these parameters: the policy's documented budget. */
    long (*max_slots)(const void *params, const LayerView *L, int t);
    /* Parameter settings ("key=value ...", NULL-terminated) the suite runs on its small traces
     * (a prompt of about a hundred tokens): the defaults scaled to them first, then settings
     * that between them give every int, double, bool and enum parameter a non-default value. */
    const char *const *conformance;

    /* ---- Optional ---- */
    /* The per-token scores a wrapper drives (above); NULL: the policy exposes none. */
    const PolicyScorer *scorer;
    /* Steps n instances of this type, all of one layer at one decode step (sv: the step view
     * each would get), leaving every one exactly as n calls of step would (for a type whose
     * caches nest, the slot order aside: nothing reads it), while doing what they have in common
     * once (oracle_topk: one selection and one sort for every budget, `kvsim sweep`). NULL: step alone. Called instead of step only by a driver that shares
     * steps (PolicyDriver.share_steps, sim/driver/driver.h), for the instances of the type that
     * have no kv_quant; p[0] may use its own scratch for the shared work. */
    void (*step_many)(Policy *const *p, int n, const StepView *sv);
    /* Nested caches (window, oracle_topk): instances whose parameters differ only in
     * `nest_param` (the one that sizes the cache) keep, at every decode step, caches that nest
     * in one order: keep_order writes the positions of KV head g's cache in its keep order
     * (sv: the instance's step, after step) and returns their number, cache[g].n, and an
     * instance of the same nest whose cache holds m slots holds exactly the first m positions
     * of that order. The replay scores every instance of such a type in keep order (a lone one
     * too), so that a sweep scores all budgets of a nest from one pass over the largest cache
     * (sim/replay/metrics.h: nested_metrics) with the bits each would get alone. `nests`, when
     * set, says whether given parameters nest at all (window with rerotate does not); NULL:
     * always. Only for instances without kv_quant, of a type without observe, whose caches
     * hold real positions with their exact K/V. NULL nest_param: the caches do not nest. */
    const char *nest_param;
    bool (*nests)(const void *params);
    int (*keep_order)(Policy *p, const StepView *sv, int g, int32_t *pos); /* may use scratch */
    /* A key the params table does not list (a wrapper's inner policy's parameters); NULL:
     * such a key is an error. Same contract as policy_param_set. */
    int (*set_extra)(void *params, const char *key, const char *value, KvErr *err);
};

/* Base helpers for create/destroy: allocate and free the per-KV-head caches. */
void policy_base_init(Policy *p, const PolicyType *type, const LayerView *L);
void policy_base_free(Policy *p);

/* ---- Registry (policies/registry.c, listed in policies/registry.def) ---- */
const PolicyType *policy_find(const char *name);
const PolicyType *const *policy_types(int *count);

/* Parameter handling, shared by the config loader and the tests. */
void policy_params_defaults(const PolicyType *type, void *params);
/* Parses `value` into the field of `key`. Returns -1 with a message (without file/line: the
 * caller prefixes them) for an unknown key, a malformed value or one out of range. */
int policy_param_set(const PolicyType *type, void *params, const char *key, const char *value,
                     KvErr *err);

#endif
