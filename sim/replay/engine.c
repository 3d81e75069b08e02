/* The replay engine: see engine.h for what it promises. */
#include "sim/replay/engine.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/attention.h"
#include "sim/base/half.h"
#include "sim/base/pool.h"
#include "sim/base/progress.h"
#include "sim/replay/metrics.h"

/* Decode steps whose attention is computed by one sgemm per head. */
enum { DECODE_BLOCK = 64 };

/* Threads: the layers are the work units of a pool of workers (sim/base/pool.h), at most one
 * per layer; when there are more threads than layers, each worker gets a team (a pool of its
 * own) that shares the work inside its layer: the read of its Q, K and V; the prompt statistics
 * and the policies' prefills (sim/driver/driver.h); per block of decode steps, the exact
 * attention by query head, the top-k of the evaluated steps by query head, then the policy
 * instances by unit (an instance, or the instances that step together: driver_step_group),
 * each thread of the team taking a share of the units (plan_shares) through every step of the
 * block, at each step every unit of its share in turn: its step, its attention over its caches
 * and the metrics, its observation. Instances are independent given the block's attention
 * (each writes only its own slots), so the team meets three times per block of decode steps,
 * not at every step. */
typedef struct Worker Worker;

typedef struct {
    Trace *tr;
    const TraceMeta *meta;
    const EngineConfig *cfg;
    Results *res;
    int32_t *eval_of_step; /* [T]: evaluated-step index of a decode step, or -1 */
    int32_t *turn_of;      /* [T]: the turn of each position (engine.h, RunTurn) */
    Pool *layers;          /* the workers: item = layer */
    Worker *workers;       /* [pool_size(layers)] */
    Progress progress;     /* layer-steps done */
} Job;

/* What one thread of a team needs for itself while it computes metrics. */
typedef struct {
    float *scratch;        /* value rows and outputs for output_errors, nested_metrics */
    size_t scratch_cap;
    int32_t *order;        /* [T]: a nest's largest cache in keep order (attend_nest) */
    int32_t *rank_of;      /* [T]: nested_metrics' look-up */
    double metric_seconds;
} Lane;

/* Per-worker buffers, allocated once and reused for every layer the worker takes. */
struct Worker {
    Pool *team;             /* the threads that work on this worker's layer (itself included) */
    Lane *lanes;            /* [pool_size(team)] */
    float *q, *k, *v;
    uint16_t *v16;          /* [Hkv][T][D]: v as halves, when every value is one (v16_ok) */
    bool v16_ok;
    float *probs;           /* [DECODE_BLOCK][Hq][T]: full attention rows of a block of steps */
    float *out;             /* [Hq][DECODE_BLOCK][D]: full attention outputs */
    float *row_max, *row_z; /* [Hq][DECODE_BLOCK] */
    int32_t *topk;          /* [DECODE_BLOCK][Hq][topk] */
    float **attn;           /* [n_policies][Hkv] -> [group][slots]: each instance's attention */
    int *attn_cap;          /* over its caches at the current step */
    double attention_seconds, attention_flops; /* the shared exact attention, prompt included */
    double *policy_seconds; /* [n_policies]: the policies' own callbacks */
    /* The metrics of the evaluated steps [e0, e0 + ne) of the current block, until they go to
     * the spill (flush_block). */
    int e0, ne;
    float *heads;           /* [n_policies][N_HEAD_METRICS][DECODE_BLOCK][Hq] */
    double *steps;          /* [n_policies][DECODE_BLOCK][STEP_RECORD] */
};

static void worker_init(Worker *w, const TraceMeta *m, const EngineConfig *cfg, int team)
{
    size_t T = (size_t)m->n_tokens, D = (size_t)m->head_dim;
    size_t Hq = (size_t)m->n_q_heads, Hkv = (size_t)m->n_kv_heads;
    memset(w, 0, sizeof *w);
    w->team = pool_create(team);
    w->lanes = kv_calloc((size_t)pool_size(w->team), sizeof *w->lanes);
    for (int i = 0; i < pool_size(w->team); i++) {
        w->lanes[i].order = kv_malloc(T * sizeof(int32_t));
        w->lanes[i].rank_of = kv_calloc(T, sizeof(int32_t));
    }
    w->attn = kv_calloc((size_t)cfg->n_policies * Hkv, sizeof *w->attn);
    w->attn_cap = kv_calloc((size_t)cfg->n_policies * Hkv, sizeof *w->attn_cap);
    w->q = kv_malloc(Hq * T * D * sizeof(float));
    w->k = kv_malloc(Hkv * T * D * sizeof(float));
    w->v = kv_malloc(Hkv * T * D * sizeof(float));
    w->v16 = kv_malloc(Hkv * T * D * sizeof *w->v16);
    w->probs = kv_malloc((size_t)DECODE_BLOCK * Hq * T * sizeof(float));
    w->out = kv_malloc(Hq * DECODE_BLOCK * D * sizeof(float));
    w->row_max = kv_malloc(Hq * DECODE_BLOCK * sizeof(float));
    w->row_z = kv_malloc(Hq * DECODE_BLOCK * sizeof(float));
    w->topk = kv_malloc((size_t)DECODE_BLOCK * Hq * (size_t)cfg->topk * sizeof(int32_t));
    w->policy_seconds = kv_calloc((size_t)cfg->n_policies, sizeof(double));
    w->heads = kv_malloc((size_t)cfg->n_policies * N_HEAD_METRICS * DECODE_BLOCK * Hq *
                         sizeof *w->heads);
    w->steps = kv_malloc((size_t)cfg->n_policies * DECODE_BLOCK * STEP_RECORD * sizeof *w->steps);
}

static void worker_free(Worker *w, int n_attn)
{
    for (int i = 0; i < n_attn; i++)
        free(w->attn[i]);
    free(w->attn);
    free(w->attn_cap);
    for (int i = 0; i < pool_size(w->team); i++) {
        free(w->lanes[i].scratch);
        free(w->lanes[i].order);
        free(w->lanes[i].rank_of);
    }
    free(w->lanes);
    pool_free(w->team);
    free(w->q);
    free(w->k);
    free(w->v);
    free(w->v16);
    free(w->probs);
    free(w->out);
    free(w->row_max);
    free(w->row_z);
    free(w->topk);
    free(w->policy_seconds);
    free(w->heads);
    free(w->steps);
}

/* Where the current block keeps head metric `slot` of instance pi at evaluated step e. */
static float *block_heads(const Worker *w, int n_q_heads, int pi, int slot, int e)
{
    return w->heads +
           (((size_t)pi * N_HEAD_METRICS + slot) * DECODE_BLOCK + (e - w->e0)) * n_q_heads;
}
static double *block_steps(const Worker *w, int pi, int e)
{
    return w->steps + ((size_t)pi * DECODE_BLOCK + (e - w->e0)) * STEP_RECORD;
}

/* The block's metrics to the spill: per instance, each head metric's rows and the step
 * records, each one contiguous run of the file. */
static int flush_block(Job *job, const Worker *w, int layer, KvErr *err)
{
    const Results *r = job->res;
    for (int pi = 0; pi < r->n_policies && w->ne > 0; pi++) {
        for (int slot = 0; slot < N_HEAD_METRICS; slot++)
            if (results_write_heads(r, pi, slot, layer, w->e0, w->ne,
                                    block_heads(w, r->n_q_heads, pi, slot, w->e0), err) != 0)
                return -1;
        if (results_write_steps(r, pi, layer, w->e0, w->ne, block_steps(w, pi, w->e0), err) != 0)
            return -1;
    }
    return 0;
}

/* Instance pi's attention buffer for KV head g, for `need` floats. */
static float *attn_buffer(Worker *w, int n_kv_heads, int pi, int g, int need)
{
    size_t i = (size_t)pi * n_kv_heads + g;
    if (w->attn_cap[i] < need) {
        w->attn_cap[i] = need + need / 2 + 64;
        w->attn[i] = kv_realloc(w->attn[i], (size_t)w->attn_cap[i] * sizeof(float));
    }
    return w->attn[i];
}

static void ensure_scratch(Lane *ln, size_t need)
{
    if (ln->scratch_cap < need) {
        ln->scratch_cap = need + need / 2;
        ln->scratch = kv_realloc(ln->scratch, ln->scratch_cap * sizeof(float));
    }
}

/* Query t's attention over one KV head's cache, for each head of its group: the metrics at an
 * evaluated step, and the renormalised attention the policy observes. */
/* A metric value that is not finite is a bug in a policy or in kvsim, never a result: the run
 * stops with an error naming where it appeared. */
static int check_finite(Job *job, int pi, int layer, int t, const char *metric, int head,
                        double v, KvErr *err)
{
    if (isfinite(v))
        return 0;
    char where[32] = "";
    if (head >= 0)
        snprintf(where, sizeof where, ", query head %d", head);
    return kv_fail(err, "%s: policy %s, layer %d, step %d%s: %s = %g is not finite",
                   trace_path(job->tr), job->cfg->policies[pi].label, layer, t, where, metric,
                   v);
}

/* check_finite for head metric `slot` (its name looked up only when the value is not finite:
 * this runs for every head, policy and step). */
static int check_head_finite(Job *job, int pi, int layer, int t, int slot, int head, double v,
                             KvErr *err)
{
    if (isfinite(v))
        return 0;
    return check_finite(job, pi, layer, t, metric_of(METRIC_HEAD, slot)->name, head, v, err);
}

/* The full rows of KV head g's query heads at step t (step b of the block), into rows[group]. */
static void full_rows(const Worker *w, const LayerView *L, int g, int t, int b, FullRow *rows)
{
    int T = L->n_tokens, D = L->head_dim, G = L->group, Hq = L->n_q_heads;
    for (int i = 0; i < G; i++) {
        int h = g * G + i;
        rows[i] = (FullRow){
            .t = t, .head_dim = D, .scale = L->attn_scale, .softcap = L->attn_softcap,
            .window = L->window,
            .q = L->q + ((size_t)h * T + t) * D,
            .p = w->probs + ((size_t)b * Hq + h) * T,
            .logit_max = w->row_max[h * DECODE_BLOCK + b],
            .logit_z = w->row_z[h * DECODE_BLOCK + b],
            .k = L->k + (size_t)g * T * D,
            .v = L->v + (size_t)g * T * D,
            .v16 = w->v16_ok ? w->v16 + (size_t)g * T * D : NULL,
            .o_full = w->out + ((size_t)h * DECODE_BLOCK + b) * D,
        };
    }
}

static int attend_kv_head(Job *job, Worker *w, Lane *ln, const LayerView *L, int pi,
                          const KVCache *c, int g, int t, int b, int e, bool observe, KvErr *err)
{
    const EngineConfig *cfg = job->cfg;
    int D = L->head_dim, G = L->group, Hq = L->n_q_heads;
    int k = cfg->topk < t + 1 ? cfg->topk : t + 1;
    bool want_err = e >= 0 && output_errors_needed(c, t);
    bool quantized = cfg->policies[pi].quant.kind != KVQ_NONE;
    bool want_attn = observe || want_err || (quantized && e >= 0);
    FullRow rows[G];
    CacheAttention ca[G];
    double out_err[G];
    float *attn = want_attn ? attn_buffer(w, L->n_kv_heads, pi, g, G * c->n) : NULL;
    full_rows(w, L, g, t, b, rows);
    /* recall@k's look-ups of the top-k positions in the cache, fetched now: they are scattered
     * over the cache's slot_of, and the attention and output errors below take long enough to
     * bring them in. */
    if (e >= 0)
        for (int i = 0; i < G; i++) {
            const int32_t *top = w->topk + ((size_t)b * Hq + g * G + i) * cfg->topk;
            for (int j = 0; j < k; j++)
                __builtin_prefetch(c->slot_of + top[j]);
        }
    cache_attention_heads(c, rows, G, attn, ca);
    if (e < 0)
        return 0;
    if (quantized) /* the mass includes the quantization error (docs/metrics.md) */
        for (int i = 0; i < G; i++)
            ca[i].retained_mass = overlap_mass(c, &rows[i], attn + (size_t)i * c->n);
    for (int i = 0; i < G; i++)
        out_err[i] = 0.0;
    if (want_err) {
        ensure_scratch(ln, (size_t)(c->n + G) * D);
        output_errors(c, rows, G, attn, ln->scratch, out_err);
    }
    for (int i = 0; i < G; i++) {
        int h = g * G + i;
        float *mass = block_heads(w, Hq, pi, HM_MASS, e) + h;
        float *out = block_heads(w, Hq, pi, HM_OUT_ERR, e) + h;
        *mass = (float)ca[i].retained_mass;
        block_heads(w, Hq, pi, HM_RECALL, e)[h] =
            (float)recall_at_k(c, w->topk + ((size_t)b * Hq + h) * cfg->topk, k);
        *out = (float)out_err[i];
        if (check_head_finite(job, pi, L->layer, t, HM_MASS, h, *mass, err) != 0 ||
            check_head_finite(job, pi, L->layer, t, HM_OUT_ERR, h, *out, err) != 0)
            return -1;
    }
    return 0;
}

/* One block of decode steps [t0, t0+B) of one layer, for the team's parallel parts. */
typedef struct {
    Job *job;
    Worker *w;
    PolicyDriver *drv;
    int t0, B;
    int *fail_b;    /* [n_policies]: the step at which instance pi failed, or B */
    KvErr *errs;    /* [n_policies] */
    int *order;     /* [n_units]: the units' first instances, the costliest in the last block
                     * first */
    double *cost;   /* [n_policies]: each unit's seconds in the block, on its first instance */
    int *share_units, *share_at, *share_len; /* plan_shares: each thread's units */
} Block;

/* Step b of instance pi, after its step: its attention over each of its caches, KV head by KV
 * head, and the metrics; on the first KV head that fails, fail_b[pi] = b and errs[pi]. */
static void attend_step(Block *bl, Lane *ln, int pi, int b)
{
    Job *job = bl->job;
    const LayerView *L = bl->drv->L;
    Policy *inst = bl->drv->inst[pi];
    int t = bl->t0 + b, e = job->eval_of_step[t];
    bool observe = inst->type->observe != NULL;
    if (!(observe || e >= 0))
        return;
    double t1 = now_seconds();
    for (int g = 0; g < L->n_kv_heads; g++)
        if (attend_kv_head(job, bl->w, ln, L, pi, &inst->cache[g], g, t, b, e, observe,
                           &bl->errs[pi]) != 0) {
            bl->fail_b[pi] = b;
            break;
        }
    ln->metric_seconds += now_seconds() - t1;
}

/* Step b of the instances members[0, n) of one nest (driver_nests; a lone one: n = 1), after
 * their steps: at an evaluated step, each KV head's caches scored together in keep order
 * (nested_metrics) from the largest one's order, the others' caches being its first slots. On
 * a value that is not finite, fail_b and errs of the instance it belongs to. */
static void attend_nest(Block *bl, Lane *ln, const int *members, int n, int b)
{
    Job *job = bl->job;
    const EngineConfig *cfg = job->cfg;
    PolicyDriver *drv = bl->drv;
    const LayerView *L = drv->L;
    Worker *w = bl->w;
    int t = bl->t0 + b, e = job->eval_of_step[t];
    if (e < 0)
        return; /* nothing observes: the attention matters only where it is scored */
    double t1 = now_seconds();
    int G = L->group, Hq = L->n_q_heads, D = L->head_dim;
    int k = cfg->topk < t + 1 ? cfg->topk : t + 1;
    int sizes[n], size_of[n], n_sizes;
    double mass[n * G], err[n * G], recall[n * G];
    FullRow rows[G];
    for (int g = 0; g < L->n_kv_heads; g++) {
        /* The members' distinct sizes, ascending, and each member's among them. */
        int big = members[0];
        n_sizes = 0;
        for (int j = 0; j < n; j++) {
            int m = drv->inst[members[j]]->cache[g].n, at = 0;
            if (m > drv->inst[big]->cache[g].n)
                big = members[j];
            while (at < n_sizes && sizes[at] < m)
                at++;
            if (at == n_sizes || sizes[at] != m) {
                memmove(sizes + at + 1, sizes + at, (size_t)(n_sizes - at) * sizeof *sizes);
                sizes[at] = m;
                n_sizes++;
            }
        }
        for (int j = 0; j < n; j++) {
            int m = drv->inst[members[j]]->cache[g].n;
            size_of[j] = 0;
            while (sizes[size_of[j]] != m)
                size_of[j]++;
        }
        Policy *largest = drv->inst[big];
        int ordered = largest->type->keep_order(largest, &drv->sv[big], g, ln->order);
        if (ordered != sizes[n_sizes - 1]) { /* a policy's bug: say so rather than score it */
            kv_fail(&bl->errs[big], "%s: policy %s, layer %d, step %d: keep order of %d positions "
                    "for a cache of %d", trace_path(job->tr), cfg->policies[big].label, L->layer,
                    t, ordered, sizes[n_sizes - 1]);
            bl->fail_b[big] = b;
            break;
        }
        full_rows(w, L, g, t, b, rows);
        ensure_scratch(ln, nested_scratch_floats(sizes[n_sizes - 1], n_sizes, G, D));
        nested_metrics(ln->order, sizes, n_sizes, rows, G,
                       w->topk + ((size_t)b * Hq + g * G) * cfg->topk, cfg->topk, k,
                       ln->scratch, ln->rank_of, mass, err, recall);
        for (int j = 0; j < n; j++) {
            int pi = members[j];
            if (bl->fail_b[pi] < bl->B)
                continue;
            for (int i = 0; i < G; i++) {
                int h = g * G + i;
                size_t at = (size_t)size_of[j] * G + i;
                float *mp = block_heads(w, Hq, pi, HM_MASS, e) + h;
                float *op = block_heads(w, Hq, pi, HM_OUT_ERR, e) + h;
                *mp = (float)mass[at];
                *op = (float)err[at];
                block_heads(w, Hq, pi, HM_RECALL, e)[h] = (float)recall[at];
                if (check_head_finite(job, pi, L->layer, t, HM_MASS, h, *mp, &bl->errs[pi]) !=
                        0 ||
                    check_head_finite(job, pi, L->layer, t, HM_OUT_ERR, h, *op,
                                      &bl->errs[pi]) != 0) {
                    bl->fail_b[pi] = b;
                    break;
                }
            }
        }
    }
    ln->metric_seconds += now_seconds() - t1;
}

/* Step b of instance pi, after its attention: needle survival (the cache as it attended),
 * observe, memory. */
static void observe_step(Block *bl, Lane *ln, int pi, int b)
{
    Job *job = bl->job;
    Results *res = job->res;
    PolicyDriver *drv = bl->drv;
    const LayerView *L = drv->L;
    int t = bl->t0 + b, e = job->eval_of_step[t];
    Policy *inst = drv->inst[pi];
    double t1 = now_seconds();
    double cache_tokens = 0, needles = NAN;
    for (int g = 0; g < L->n_kv_heads; g++)
        cache_tokens += inst->cache[g].n;
    if (e >= 0 && res->eval_probe[e]) {
        /* The needles the probe query could attend to: the cache as it attended, before
         * observe() evicts for the next step. Mean over KV heads. */
        double sum = 0;
        int counted = 0;
        for (int g = 0; g < L->n_kv_heads; g++) {
            double s = needle_survival(&inst->cache[g], L->meta, t);
            if (!isnan(s)) {
                sum += s;
                counted++;
            }
        }
        needles = counted ? sum / counted : NAN;
        /* The same by turn distance: each distance the mean over the KV heads that have needle
         * tokens of it before t. */
        double by[TURN_DISTANCES], sums[TURN_DISTANCES] = {0};
        int heads[TURN_DISTANCES] = {0};
        for (int g = 0; g < L->n_kv_heads; g++) {
            needle_survival_by_turn(&inst->cache[g], L->meta, job->turn_of, t, TURN_DISTANCES,
                                    by);
            for (int d = 0; d < TURN_DISTANCES; d++)
                if (!isnan(by[d])) {
                    sums[d] += by[d];
                    heads[d]++;
                }
        }
        double *nt = block_steps(bl->w, pi, e) + STEP_NEEDLE;
        for (int d = 0; d < TURN_DISTANCES; d++)
            nt[d] = heads[d] ? sums[d] / heads[d] : NAN;
    }
    ln->metric_seconds += now_seconds() - t1;
    driver_observe(drv, pi, (const float *const *)bl->w->attn + (size_t)pi * L->n_kv_heads);

    const MemReport mem = drv->mem[pi];
    double *tot = results_total(res, pi, L->layer);
    tot[TM_TO_HOST_BYTES] += mem.to_host_bytes;
    tot[TM_TO_DEVICE_BYTES] += mem.to_device_bytes;
    tot[TM_FETCHED_TOKENS] += mem.fetched_tokens;
    tot[TM_RESTORED_TOKENS] += mem.restored_tokens;
    tot[TM_RESTORE_K_ERR] += mem.restore_k_err;
    tot[TM_RESTORE_V_ERR] += mem.restore_v_err;
    if (e >= 0) {
        double *sm = block_steps(bl->w, pi, e);
        sm[SM_CACHE_TOKENS] = cache_tokens / L->n_kv_heads;
        sm[SM_DEVICE_BYTES] = mem.device_bytes;
        sm[SM_ALLOCATED_BYTES] = mem.allocated_bytes;
        sm[SM_HOST_BYTES] = mem.host_bytes;
        sm[SM_FETCHED_TOKENS] = mem.fetched_tokens;
        sm[SM_NEEDLE_SURVIVAL] = needles;
    }
    static const char *const mem_name[] = {"device_bytes", "allocated_bytes", "host_bytes",
                                           "to_host_bytes", "to_device_bytes", "fetched_tokens",
                                           "restored_tokens", "restore_k_err", "restore_v_err"};
    const double mem_value[] = {mem.device_bytes, mem.allocated_bytes, mem.host_bytes,
                                mem.to_host_bytes, mem.to_device_bytes, mem.fetched_tokens,
                                mem.restored_tokens, mem.restore_k_err, mem.restore_v_err};
    for (size_t i = 0; i < sizeof mem_value / sizeof mem_value[0]; i++)
        if (check_finite(job, pi, L->layer, t, mem_name[i], -1, mem_value[i], &bl->errs[pi]) !=
            0) {
            bl->fail_b[pi] = b;
            break;
        }
}

/* Step b of one unit (an instance, or the instances that step together: driver_step_group, by
 * its first instance): each instance's step, then its attention over its caches and the
 * metrics, then its observation. Returns false once one of its instances has failed (fail_b,
 * errs): the unit stops there, as the run then does. */
static bool unit_step(Block *bl, Lane *ln, int first, int b)
{
    PolicyDriver *drv = bl->drv;
    const LayerView *L = drv->L;
    const int *members;
    int n = driver_step_group(drv, first, &members);
    if (n == 1)
        members = &first;
    bool nest = driver_nests(drv, first); /* a group nests when its first does */
    for (int j = 0; j < n; j++)
        driver_step(drv, members[j], bl->t0 + b,
                    bl->w->probs + (size_t)b * L->n_q_heads * L->n_tokens);
    if (nest)
        attend_nest(bl, ln, members, n, b);
    else
        for (int j = 0; j < n; j++)
            attend_step(bl, ln, members[j], b);
    bool failed = false;
    for (int j = 0; j < n; j++) {
        int pi = members[j];
        if (bl->fail_b[pi] == bl->B)
            observe_step(bl, ln, pi, b);
        failed |= bl->fail_b[pi] < bl->B;
    }
    return !failed;
}

/* One thread's share of the block's units (share_units[share_at[item], + share_len[item])),
 * step by step: at each step every unit of the share in turn, so that the step's attention
 * rows, which every unit reads, are read while they are still in the core's cache, not once per
 * unit from memory. Units are independent (each writes only its instances' slots): the order
 * in which one thread interleaves them changes no number. */
static int share_block(void *ctx, int item, int slot, KvErr *err)
{
    (void)err;
    Block *bl = ctx;
    Lane *ln = &bl->w->lanes[slot];
    const int *units = bl->share_units + bl->share_at[item];
    int n = bl->share_len[item];
    bool going[n > 0 ? n : 1];
    for (int u = 0; u < n; u++)
        going[u] = true;
    for (int b = 0; b < bl->B; b++)
        for (int u = 0; u < n; u++)
            if (going[u]) {
                double c0 = now_seconds();
                going[u] = unit_step(bl, ln, units[u], b);
                bl->cost[units[u]] += now_seconds() - c0;
            }
    return 0;
}

/* The threads' shares of the units: each unit, costliest first (order), to the share with the
 * least cost so far (then the fewest units, then the lowest index). Only the threads' share of
 * the work depends on it, never a number. */
static int plan_shares(Block *bl, int n_units, int n_threads)
{
    int n_share = n_threads < n_units ? n_threads : n_units;
    double load[n_share > 0 ? n_share : 1];
    int count[n_share > 0 ? n_share : 1], of[n_units > 0 ? n_units : 1];
    for (int k = 0; k < n_share; k++) {
        load[k] = 0;
        count[k] = 0;
    }
    for (int i = 0; i < n_units; i++) {
        int best = 0;
        for (int k = 1; k < n_share; k++)
            if (load[k] < load[best] || (load[k] == load[best] && count[k] < count[best]))
                best = k;
        of[i] = best;
        load[best] += bl->cost[bl->order[i]];
        count[best]++;
    }
    for (int k = 0, at = 0; k < n_share; k++) {
        bl->share_at[k] = at;
        bl->share_len[k] = 0;
        for (int i = 0; i < n_units; i++)
            if (of[i] == k)
                bl->share_units[at + bl->share_len[k]++] = bl->order[i];
        at += bl->share_len[k];
    }
    return n_share;
}

/* The top-k keys of the true attention of every evaluated step of the block, for query head h. */
static int block_topk(void *ctx, int h, int slot, KvErr *err)
{
    (void)err;
    Block *bl = ctx;
    const Worker *w = bl->w;
    const EngineConfig *cfg = bl->job->cfg;
    int T = bl->job->meta->n_tokens, Hq = bl->job->meta->n_q_heads;
    double k0 = now_seconds();
    for (int b = 0; b < bl->B; b++) {
        int t = bl->t0 + b;
        if (bl->job->eval_of_step[t] < 0)
            continue;
        int k = cfg->topk < t + 1 ? cfg->topk : t + 1;
        topk_indices(w->probs + ((size_t)b * Hq + h) * T, t + 1, k,
                     w->topk + ((size_t)b * Hq + h) * cfg->topk);
    }
    w->lanes[slot].metric_seconds += now_seconds() - k0;
    return 0;
}

/* The instances by decreasing cost in the last block (ties by index), so that the team does
 * not wait at the end of a block for a costly instance taken last. Only the threads' share of
 * the work depends on it, never a number. */
static void order_by_cost(int *order, const double *cost, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0; j--) {
            int a = order[j - 1], b = order[j];
            if (cost[b] > cost[a] || (cost[b] == cost[a] && b < a)) {
                order[j - 1] = b;
                order[j] = a;
            } else {
                break;
            }
        }
}

/* The decode run [a, b_end) of one layer: the true attention of its steps, a block at a time
 * (query heads spread over the worker's team), then the top-k keys of the evaluated steps and
 * every policy instance through the block's steps (instances spread over the team). */
static int decode_run(Job *job, Worker *w, PolicyDriver *drv, int a, int b_end, KvErr *err)
{
    const TraceMeta *m = job->meta;
    const LayerView *L = drv->L;
    int T = m->n_tokens, D = m->head_dim, Hq = m->n_q_heads, layer = L->layer;
    int n_pol = job->cfg->n_policies;
    bool failed = false;
    int *fail_b = kv_malloc((size_t)n_pol * sizeof *fail_b);
    KvErr *errs = kv_malloc((size_t)n_pol * sizeof *errs);
    int *order = kv_malloc((size_t)n_pol * sizeof *order);
    double *cost = kv_calloc((size_t)n_pol, sizeof *cost);
    int *share_units = kv_malloc((size_t)n_pol * sizeof *share_units);
    int *share_at = kv_malloc((size_t)n_pol * sizeof *share_at);
    int *share_len = kv_malloc((size_t)n_pol * sizeof *share_len);
    int n_units = 0; /* the units (unit_step): each by its first instance */
    for (int pi = 0; pi < n_pol; pi++) {
        const int *members;
        if (driver_step_group(drv, pi, &members) > 0)
            order[n_units++] = pi;
    }
    for (int t0 = a; t0 < b_end && !failed && !pool_failed_below(job->layers, layer);
         t0 += DECODE_BLOCK) {
        int B = b_end - t0 < DECODE_BLOCK ? b_end - t0 : DECODE_BLOCK;
        double a0 = now_seconds();
        w->attention_flops += attention_rows(w->q, w->k, w->v, Hq, L->group, T, D, L->attn_scale,
                                             L->attn_softcap,
                                             L->window, t0, B, DECODE_BLOCK, w->probs, w->out,
                                             w->row_max, w->row_z, w->team);
        w->attention_seconds += now_seconds() - a0;
        /* A logit that overflows float (|q.k| * scale beyond 3.4e38) leaves a row that is
         * not a distribution: the trace is out of range, and no metric can be computed. */
        for (int h = 0; h < Hq && !failed; h++)
            for (int b = 0; b < B && !failed; b++)
                if (!isfinite(w->row_max[h * DECODE_BLOCK + b]) ||
                    !isfinite(w->row_z[h * DECODE_BLOCK + b])) {
                    kv_fail(err, "%s: layer %d, step %d, query head %d: the attention logits "
                            "are not finite (Q or K too large for float32 at attn_scale %g)",
                            trace_path(job->tr), layer, t0 + b, h, L->attn_scale);
                    failed = true;
                }
        if (failed)
            break;

        Block bl = {job, w, drv, t0, B, fail_b, errs, order, cost, share_units, share_at,
                    share_len};
        int n_share = plan_shares(&bl, n_units, pool_size(w->team)); /* by the last costs */
        for (int pi = 0; pi < n_pol; pi++) {
            fail_b[pi] = B;
            cost[pi] = 0;
        }
        /* The block's evaluated steps: consecutive indices from the first of them. Needle
         * survival is written at probe steps only: NaN elsewhere. */
        w->e0 = -1;
        w->ne = 0;
        for (int b = 0; b < B; b++) {
            int e = job->eval_of_step[t0 + b];
            if (e >= 0 && w->ne++ == 0)
                w->e0 = e;
        }
        for (int pi = 0; pi < n_pol; pi++)
            for (int i = 0; i < w->ne; i++)
                for (int d = 0; d < TURN_DISTANCES; d++)
                    block_steps(w, pi, w->e0 + i)[STEP_NEEDLE + d] = NAN;
        pool_for(w->team, Hq, block_topk, &bl, NULL);
        pool_for(w->team, n_share, share_block, &bl, NULL);
        /* The first failure (lowest step, then lowest instance: what one thread taking the
         * steps in turn, and at each the instances in turn, would meet first) ends the run. */
        int first = -1;
        for (int pi = 0; pi < n_pol; pi++)
            if (fail_b[pi] < B && (first < 0 || fail_b[pi] < fail_b[first]))
                first = pi;
        order_by_cost(order, cost, n_units);
        if (first >= 0) {
            *err = errs[first];
            failed = true;
        } else if (flush_block(job, w, layer, err) != 0) {
            failed = true;
        }
        progress_add(&job->progress, B);
    }
    free(fail_b);
    free(errs);
    free(order);
    free(cost);
    free(share_units);
    free(share_at);
    free(share_len);
    return failed ? -1 : 0;
}

/* The layer's Q (item 0), K (1) or V (2), read into the worker's buffers by the threads of its
 * team (the trace's reads are safe from any thread): with more threads than layers, a layer
 * that nothing else overlaps is not read by one thread alone. With V, the values as halves for
 * the output errors, where that loses nothing (a float16 trace): half the bytes to read from
 * the scattered rows of a cache. */
typedef struct {
    Job *job;
    Worker *w;
    int layer;
} ReadJob;

static int read_part(void *ctx, int item, int slot, KvErr *err)
{
    (void)slot;
    ReadJob *rj = ctx;
    Worker *w = rj->w;
    const TraceMeta *m = rj->job->meta;
    if (trace_read_layer(rj->job->tr, rj->layer, item == 0 ? w->q : NULL,
                         item == 1 ? w->k : NULL, item == 2 ? w->v : NULL, err) != 0)
        return -1;
    if (item != 2)
        return 0;
    size_t n_v = (size_t)m->n_kv_heads * m->n_tokens * m->head_dim;
    w->v16_ok = true;
    for (size_t i = 0; i < n_v && w->v16_ok; i++) {
        w->v16[i] = half_from_float(w->v[i]);
        w->v16_ok = float_from_half(w->v16[i]) == w->v[i] &&
                    !signbit(w->v[i]) == !(w->v16[i] >> 15); /* -0 stays -0 */
    }
    return 0;
}

static int process_layer(Job *job, Worker *w, int layer, KvErr *err)
{
    const TraceMeta *m = job->meta;
    const EngineConfig *cfg = job->cfg;
    ReadJob rj = {job, w, layer};
    if (pool_for(w->team, 3, read_part, &rj, err) != 0) /* the first of Q, K, V that fails */
        return -1;
    LayerView L = layer_view_make(m, layer, w->q, w->k, w->v);
    L.trace = job->tr;

    int n_pol = cfg->n_policies;
    PolicyDriver drv;
    if (driver_create(&drv, &L, cfg->policies, n_pol, cfg->seed, cfg->kv_bits,
                      cfg->sliding_layers, false, err) != 0)
        return -1;
    drv.pool = w->team;
    drv.share_steps = true; /* every instance steps at every step (decode_run) */
    if (layer == 0) /* one writer: only one worker takes layer 0 */
        for (int pi = 0; pi < n_pol; pi++)
            job->res->is_oracle[pi] = drv.inst[pi]->is_oracle;

    /* The spans in order (policies/policy.h): a prefill span chunk by chunk, a decode run step
     * by step. */
    bool failed = false;
    for (int s = 0; s < m->n_spans && !failed && !pool_failed_below(job->layers, layer); s++) {
        const TraceSpan *sp = &m->spans[s];
        if (sp->kind == SPAN_DECODE) {
            failed = decode_run(job, w, &drv, sp->start, sp->end, err) != 0;
            continue;
        }
        /* What each policy carries into the turn: its device bytes (persist), nothing
         * (reencode), the uncompressed system prompt (prefix). Turn 0 starts from nothing. */
        int turn = job->turn_of[sp->start];
        for (int pi = 0; pi < n_pol && s > 0; pi++)
            job->res->turn_bytes[((size_t)pi * m->n_layers + layer) * job->res->n_turns + turn] =
                cfg->history == HISTORY_PERSIST  ? drv.mem[pi].device_bytes
                : cfg->history == HISTORY_PREFIX ? job->res->turns[turn].prefix_bytes_per_layer
                                                 : 0;
        int a = sp->start; /* persist: the span's tokens on top of what the policies kept */
        /* prefix drives the policies as reencode does: only turns.csv's accounting differs */
        if (s > 0 && cfg->history != HISTORY_PERSIST) {
            if (driver_restart(&drv, err) != 0) {
                failed = true;
                break;
            }
            a = 0; /* reencode: the whole history, from nothing */
        }
        for (int c0 = a; c0 < sp->end;) {
            int c1 = driver_chunk_end(c0, sp->end, cfg->prefill_chunk);
            driver_prefill(&drv, a, sp->end, c0, c1);
            c0 = c1;
        }
    }
    w->attention_seconds += drv.stats_seconds;
    w->attention_flops += drv.stats_flops;

    for (int pi = 0; pi < n_pol; pi++)
        w->policy_seconds[pi] += drv.seconds[pi];
    driver_free(&drv);
    return failed ? -1 : 0;
}

static int layer_task(void *ctx, int layer, int slot, KvErr *err)
{
    Job *job = ctx;
    return process_layer(job, &job->workers[slot], layer, err);
}

/* Evaluated steps: in every decode run, every eval_every-th step from its first, plus the decode
 * steps that are probes. A probe inside a prefill span says nothing about eviction: a prefill
 * chunk attends over the cache plus the whole chunk, which no budget bounds, so it is not
 * evaluated. */
static void plan_evaluations(Results *r, const TraceMeta *m, int eval_every, int32_t *eval_of_step)
{
    int T = m->n_tokens;
    bool *probe = kv_calloc((size_t)T, sizeof *probe);
    int32_t *run_start = kv_malloc((size_t)T * sizeof *run_start); /* -1: a prefill position */
    for (int s = 0; s < m->n_spans; s++)
        for (int t = m->spans[s].start; t < m->spans[s].end; t++)
            run_start[t] = m->spans[s].kind == SPAN_DECODE ? m->spans[s].start : -1;
    for (int i = 0; i < m->n_probes; i++)
        if (run_start[m->probes[i]] >= 0)
            probe[m->probes[i]] = true;
    r->eval_step = kv_malloc((size_t)(r->n_steps + 1) * sizeof *r->eval_step);
    r->eval_probe = kv_malloc((size_t)(r->n_steps + 1) * sizeof *r->eval_probe);
    r->n_evals = 0;
    for (int t = 0; t < T; t++) {
        eval_of_step[t] = -1;
        if (run_start[t] >= 0 && ((t - run_start[t]) % eval_every == 0 || probe[t])) {
            eval_of_step[t] = r->n_evals;
            r->eval_step[r->n_evals] = t;
            r->eval_probe[r->n_evals] = probe[t] && m->n_needles > 0;
            r->n_evals++;
        }
    }
    free(probe);
    free(run_start);
}

/* The turns (RunTurn) and the turn of each position: a new turn at every prefill span after
 * the first. The prefill of turn k over [a, b) computes the queries of
 *   turn 0, persist: [a, b);  reencode: [0, b);  prefix: the positions of [0, b) outside
 *   segment 0 (the system prompt is served from the prefix cache),
 * each over every key it attends (docs/metrics.md, turns.csv, gives the cost formulas). */
static void plan_turns(Results *r, const TraceMeta *m, const EngineConfig *cfg, int32_t *turn_of)
{
    int n = 0;
    for (int s = 0; s < m->n_spans; s++)
        n += m->spans[s].kind == SPAN_PREFILL;
    r->n_turns = n;
    r->turns = kv_calloc((size_t)n, sizeof *r->turns);
    int k = -1;
    for (int s = 0; s < m->n_spans; s++) {
        const TraceSpan *sp = &m->spans[s];
        if (sp->kind == SPAN_PREFILL) {
            k++;
            r->turns[k].prefill_start = sp->start;
            r->turns[k].context_tokens = sp->end;
        } else {
            r->turns[k].decode_steps += sp->end - sp->start;
        }
        for (int t = sp->start; t < sp->end; t++)
            turn_of[t] = k;
    }
    bool dense_known = m->hidden_size > 0 && m->intermediate_size > 0;
    double hidden = m->hidden_size, inter = m->intermediate_size, D = m->head_dim;
    /* per token and layer: the Q, K, V and O projections and a gated MLP (gate, up, down) */
    double dense_per_token =
        2.0 * hidden * D * (2.0 * m->n_q_heads + 2.0 * m->n_kv_heads) + 6.0 * hidden * inter;
    for (k = 0; k < n; k++) {
        RunTurn *tu = &r->turns[k];
        int a = tu->prefill_start, b = tu->context_tokens;
        int from = k == 0 || cfg->history == HISTORY_PERSIST ? a : 0;
        int served_seg0 = 0;
        double keys = 0; /* sum over layers and computed queries of the keys attended */
        int computed = 0;
        for (int t = from; t < b; t++) {
            if (k > 0 && cfg->history == HISTORY_PREFIX && m->segments[t] == 0) {
                served_seg0++;
                continue;
            }
            computed++;
            for (int l = 0; l < m->n_layers; l++) {
                int W = m->window ? m->window[l] : 0;
                keys += t + 1 - attn_first_key(W, t);
            }
        }
        tu->prefill_tokens = computed;
        tu->served_tokens = k == 0                           ? 0
                            : cfg->history == HISTORY_PERSIST ? a
                            : cfg->history == HISTORY_PREFIX  ? served_seg0
                                                              : 0;
        tu->attn_flops = 4.0 * m->n_q_heads * D * keys;
        tu->dense_flops = dense_known ? dense_per_token * m->n_layers * computed : NAN;
        tu->prefix_bytes_per_layer =
            cfg->history == HISTORY_PREFIX
                ? kv_entry_bytes((double)served_seg0 * m->n_kv_heads, m->head_dim, cfg->kv_bits)
                : 0;
    }
}

Results *engine_run(Trace *tr, const EngineConfig *cfg, KvErr *err)
{
    const TraceMeta *m = trace_meta(tr);
    int n_steps = 0;
    for (int s = 0; s < m->n_spans; s++)
        if (m->spans[s].kind == SPAN_DECODE)
            n_steps += m->spans[s].end - m->spans[s].start;
    if (n_steps == 0) {
        if (m->n_spans == 1)
            kv_fail(err, "%s: the trace has no decode steps (n_prompt = n_tokens = %d)",
                    trace_path(tr), m->n_tokens);
        else
            kv_fail(err, "%s: the trace has no decode steps (its %d spans are all prefill)",
                    trace_path(tr), m->n_spans);
        return NULL;
    }
    Results *r = kv_calloc(1, sizeof *r);
    r->n_policies = cfg->n_policies;
    r->n_layers = m->n_layers;
    r->n_q_heads = m->n_q_heads;
    r->n_kv_heads = m->n_kv_heads;
    r->n_prompt = m->n_prompt;
    r->n_tokens = m->n_tokens;
    r->n_steps = n_steps;
    r->label = kv_calloc((size_t)cfg->n_policies, sizeof *r->label);
    r->type = kv_calloc((size_t)cfg->n_policies, sizeof *r->type);
    r->is_oracle = kv_calloc((size_t)cfg->n_policies, sizeof *r->is_oracle);
    for (int pi = 0; pi < cfg->n_policies; pi++) {
        memcpy(r->label[pi], cfg->policies[pi].label, sizeof r->label[pi]);
        r->type[pi] = cfg->policies[pi].type;
    }
    Job job = {.tr = tr, .meta = m, .cfg = cfg, .res = r};
    job.eval_of_step = kv_malloc((size_t)m->n_tokens * sizeof *job.eval_of_step);
    plan_evaluations(r, m, cfg->eval_every, job.eval_of_step);
    job.turn_of = kv_malloc((size_t)m->n_tokens * sizeof *job.turn_of);
    plan_turns(r, m, cfg, job.turn_of);
    r->prefill_tflops = cfg->prefill_tflops;
    r->eval_turn = kv_malloc((size_t)(r->n_evals + 1) * sizeof *r->eval_turn);
    for (int e = 0; e < r->n_evals; e++)
        r->eval_turn[e] = job.turn_of[r->eval_step[e]];
    r->turn_bytes = kv_calloc((size_t)cfg->n_policies * m->n_layers * r->n_turns,
                              sizeof *r->turn_bytes);
    r->total = kv_calloc((size_t)cfg->n_policies * m->n_layers * N_TOTAL_METRICS, sizeof *r->total);
    if (results_spill_open(r, cfg->spill_file, err) != 0) {
        free(job.eval_of_step);
        free(job.turn_of);
        results_free(r);
        return NULL;
    }

    /* Workers: one per layer at most; the threads beyond go to the workers' teams, the first
     * threads % workers teams one larger. */
    /* Inside a layer, at most max(query heads, policies) things can run at once. */
    int per_layer = m->n_q_heads > cfg->n_policies ? m->n_q_heads : cfg->n_policies;
    int threads = pool_threads_for(cfg->threads, m->n_layers * per_layer);
    int n_workers = threads < m->n_layers ? threads : m->n_layers;
    r->threads_used = threads;
    /* Parallelism is the pool's; BLAS inside a worker stays single-threaded. */
    openblas_set_num_threads(1);

    double started = now_seconds();
    job.layers = pool_create(n_workers);
    n_workers = pool_size(job.layers);
    job.workers = kv_malloc((size_t)n_workers * sizeof *job.workers);
    for (int i = 0; i < n_workers; i++)
        worker_init(&job.workers[i], m, cfg, threads / n_workers + (i < threads % n_workers));
    progress_begin(&job.progress, cfg->progress, "replay", "layer-steps",
                   (long)m->n_layers * r->n_steps);
    KvErr first_err;
    bool failed = pool_for(job.layers, m->n_layers, layer_task, &job, &first_err) != 0;
    progress_end(&job.progress);
    r->wall_seconds = now_seconds() - started;
    for (int i = 0; i < n_workers; i++) {
        Worker *w = &job.workers[i];
        r->attention_seconds += w->attention_seconds;
        r->attention_flops += w->attention_flops;
        for (int j = 0; j < pool_size(w->team); j++)
            r->metric_seconds += w->lanes[j].metric_seconds;
        for (int pi = 0; pi < cfg->n_policies && pi < 64; pi++)
            r->policy_seconds[pi] += w->policy_seconds[pi];
        worker_free(w, cfg->n_policies * m->n_kv_heads);
    }
    free(job.workers);
    pool_free(job.layers);
    free(job.eval_of_step);
    free(job.turn_of);
    if (failed) {
        *err = first_err;
        results_free(r);
        return NULL;
    }
    return r;
}

/* ---- The spill ---- */

int results_spill_open(Results *r, bool to_file, KvErr *err)
{
    r->spill_first = 0;
    r->spill_policies = r->n_policies;
    if (!to_file && results_spill_resident_bytes(r) > 0) {
        r->spill_mem = kv_calloc((size_t)results_spill_bytes(r) + 1, 1);
        return 0;
    }
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir)
        dir = "/tmp";
    char path[4096];
    snprintf(path, sizeof path, "%s/kvsim-results-XXXXXX", dir);
    int fd = mkstemp(path);
    if (fd < 0)
        return kv_fail(err, "%s: cannot create the results' temporary file: %s", path,
                       strerror(errno));
    unlink(path); /* the file lives while fd does */
    r->spill_fd = fd;
    /* Its full size at once, sparse: a slot never written reads as zero, as calloc's would. */
    if (ftruncate(fd, (off_t)results_spill_bytes(r)) != 0)
        return kv_fail(err, "%s: cannot size the results' temporary file to %.0f bytes: %s",
                       path, results_spill_bytes(r), strerror(errno));
    return 0;
}

static size_t spill_column(const Results *r)
{
    return (size_t)r->n_layers * r->n_evals * r->n_q_heads;
}

static off_t head_offset(const Results *r, int pi, int slot, int layer, int e)
{
    size_t col = (size_t)(r->spill_first + pi) * N_HEAD_METRICS + slot;
    return (off_t)((col * spill_column(r) + ((size_t)layer * r->n_evals + e) * r->n_q_heads) *
                   sizeof(float));
}

static off_t step_offset(const Results *r, int pi, int layer, int e)
{
    size_t heads = (size_t)r->spill_policies * N_HEAD_METRICS * spill_column(r) * sizeof(float);
    size_t rec = ((size_t)(r->spill_first + pi) * r->n_layers + layer) * r->n_evals + e;
    return (off_t)(heads + rec * STEP_RECORD * sizeof(double));
}

/* n bytes at offset `at` of the spill, all of them (pread and pwrite may do part). */
static int spill_io(const Results *r, bool write, void *buf, size_t n, off_t at)
{
    char *p = buf;
    if (r->spill_mem) {
        memcpy(write ? r->spill_mem + at : p, write ? p : r->spill_mem + at, n);
        return 0;
    }
    while (n > 0) {
        ssize_t k = write ? pwrite(r->spill_fd, p, n, at) : pread(r->spill_fd, p, n, at);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            if (k == 0)
                errno = write ? ENOSPC : EIO; /* nothing written; a read past the end */
            return -1;
        }
        p += k;
        n -= (size_t)k;
        at += k;
    }
    return 0;
}

static int spill_write(const Results *r, const void *in, size_t n, off_t at, KvErr *err)
{
    if (spill_io(r, true, (void *)in, n, at) != 0)
        return kv_fail(err, "the results' temporary file ($TMPDIR, else /tmp): cannot write "
                       "%zu bytes: %s", n, strerror(errno));
    return 0;
}

static void spill_read(const Results *r, void *out, size_t n, off_t at)
{
    if (spill_io(r, false, out, n, at) != 0) {
        fprintf(stderr, "kvsim: the results' temporary file: cannot read %zu bytes: %s\n", n,
                strerror(errno));
        exit(2);
    }
}

int results_write_heads(const Results *r, int pi, int slot, int layer, int e0, int n,
                        const float *in, KvErr *err)
{
    return spill_write(r, in, (size_t)n * r->n_q_heads * sizeof *in,
                       head_offset(r, pi, slot, layer, e0), err);
}

void results_read_heads(const Results *r, int pi, int slot, int layer, int e0, int n, float *out)
{
    spill_read(r, out, (size_t)n * r->n_q_heads * sizeof *out, head_offset(r, pi, slot, layer, e0));
}

int results_write_steps(const Results *r, int pi, int layer, int e0, int n, const double *in,
                        KvErr *err)
{
    return spill_write(r, in, (size_t)n * STEP_RECORD * sizeof *in,
                       step_offset(r, pi, layer, e0), err);
}

void results_read_steps(const Results *r, int pi, int layer, int e0, int n, double *out)
{
    spill_read(r, out, (size_t)n * STEP_RECORD * sizeof *out, step_offset(r, pi, layer, e0));
}

float results_head_at(const Results *r, int pi, int layer, int e, int h, int slot)
{
    float v;
    spill_read(r, &v, sizeof v, head_offset(r, pi, slot, layer, e) + (off_t)(h * sizeof v));
    return v;
}

double results_step_at(const Results *r, int pi, int layer, int e, int field)
{
    double v;
    spill_read(r, &v, sizeof v, step_offset(r, pi, layer, e) + (off_t)(field * sizeof v));
    return v;
}

bool results_same(const Results *a, const Results *b)
{
    if (a->n_policies != b->n_policies || a->n_layers != b->n_layers ||
        a->n_evals != b->n_evals || a->n_q_heads != b->n_q_heads)
        return false;
    size_t nh = (size_t)a->n_evals * a->n_q_heads, ns = (size_t)a->n_evals * STEP_RECORD;
    float *ha = kv_malloc((nh + 1) * sizeof *ha), *hb = kv_malloc((nh + 1) * sizeof *hb);
    double *sa = kv_malloc((ns + 1) * sizeof *sa), *sb = kv_malloc((ns + 1) * sizeof *sb);
    bool same = !memcmp(a->total, b->total, (size_t)a->n_policies * a->n_layers *
                                                N_TOTAL_METRICS * sizeof *a->total);
    for (int pi = 0; pi < a->n_policies && same; pi++)
        for (int l = 0; l < a->n_layers && same; l++) {
            for (int slot = 0; slot < N_HEAD_METRICS && same; slot++) {
                results_read_heads(a, pi, slot, l, 0, a->n_evals, ha);
                results_read_heads(b, pi, slot, l, 0, b->n_evals, hb);
                same = !memcmp(ha, hb, nh * sizeof *ha);
            }
            results_read_steps(a, pi, l, 0, a->n_evals, sa);
            results_read_steps(b, pi, l, 0, b->n_evals, sb);
            same = same && !memcmp(sa, sb, ns * sizeof *sa);
        }
    free(ha);
    free(hb);
    free(sa);
    free(sb);
    return same;
}

int results_set_head_at(const Results *r, int pi, int layer, int e, int h, int slot, float v,
                        KvErr *err)
{
    return spill_write(r, &v, sizeof v,
                       head_offset(r, pi, slot, layer, e) + (off_t)(h * sizeof v), err);
}

int results_set_step_at(const Results *r, int pi, int layer, int e, int field, double v,
                        KvErr *err)
{
    return spill_write(r, &v, sizeof v, step_offset(r, pi, layer, e) + (off_t)(field * sizeof v),
                       err);
}

/* ---- Memory ---- */

double results_head_bytes(const Results *r)
{
    return (double)r->n_policies * r->n_layers * r->n_evals * r->n_q_heads * N_HEAD_METRICS *
           sizeof(float);
}

double results_spill_bytes(const Results *r)
{
    return results_head_bytes(r) +
           (double)r->n_policies * r->n_layers * r->n_evals * STEP_RECORD * sizeof(double);
}

double results_spill_resident_bytes(const Results *r)
{
    double bytes = results_spill_bytes(r);
    return bytes <= SPILL_MEMORY_MAX ? bytes : 0;
}

void results_free(Results *r)
{
    if (!r)
        return;
    if (r->spill_fd > 0)
        close(r->spill_fd);
    free(r->spill_mem);
    free(r->eval_step);
    free(r->eval_probe);
    free(r->label);
    free(r->type);
    free(r->is_oracle);
    free(r->total);
    free(r->turns);
    free(r->eval_turn);
    free(r->turn_bytes);
    free(r);
}
