/* offload — FixedSize's CPU offload: the device tier is `hybrid` truncation at `budget`; evicted
 * tokens go to a host tier of `host_budget` tokens per KV head (oldest offload dropped first),
 * quantized to `bits` (4 or 8) with min-max affine quantization per `group` elements. A host
 * token whose mean importance over its last `importance_window` observations exceeds
 * `threshold` is moved back (at most `max_restore` per step, highest mean first) holding its
 * dequantized K and V, so the quantization error shows in the attention output.
 *
 * Observations. A token is observed at each step it spends in the device cache: the group's
 * attention it received (the group's query heads reduced by `gqa`: sum by default, as hybrid);
 * a prefill chunk counts as one
 * observation of every token it sees (the cache's and its own), the group's attention averaged
 * over the chunk's queries that see the token. On the host nobody attends to it, so its history
 * is frozen there: its mean at offload time decides, once, whether it is ever restored.
 *
 * Prefill chunks (of any span) are admitted and truncated as `hybrid` does, evicted tokens going
 * to the host tier; nothing is restored at prefill. The transfers of a span's chunks are
 * reported with the next decode step (with the prompt's, as before).
 *
 * Budget. Restored tokens take importance-ranked slots (they come back for their importance) and
 * are not evicted in the step that restores them, so at most min(max_restore, importance slots)
 * come back per step and the cache still never exceeds `budget`.
 *
 * The host tier stores only positions: a token's quantized form is a function of its own K and
 * V, so it is quantized when restored, from the trace. Re-offloading a restored token quantizes
 * the original again; its dequantized values would land on the same grid.
 *
 * coupling = fixedsize: FixedSize offloads only the tokens of its skip mask, which exists only
 * with include_skipped: the device tier then also holds hybrid's synthetic slot, the mean of
 * every evicted key and value (one of the budget's slots), and the host tier is unquantized
 * unless quantize = on (FixedSize's `quantize` defaults to off); an unquantized restored token
 * comes back exact. */
#include <cblas.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "policies/hybrid.h"
#include "policies/rank.h"

extern const PolicyType policy_offload;

typedef struct {
    int budget;
    double ratio;
    int host_budget;
    int bits;
    int group;
    int importance_window;
    double threshold;
    int max_restore;
    int coupling;
    int quantize;
    int gqa;
} OffloadParams;

enum { COUPLING_OFFLOAD = 0, COUPLING_FIXEDSIZE = 1 };
enum { QUANTIZE_AUTO = 0, QUANTIZE_ON = 1, QUANTIZE_OFF = 2 };

/* One KV head's host tier: a FIFO of positions linked through next/prev by position. */
typedef struct {
    int32_t *next, *prev; /* [n_tokens], -1 at the ends */
    int32_t oldest, newest;
    int count;
    float *frozen_mean;  /* [n_tokens]: mean importance when offloaded */
    int32_t *restorable; /* host positions whose frozen mean exceeds the threshold */
    int n_restorable;
    /* Importance history of every position still on the device or on the host: a ring of the
     * last importance_window observations; NULL before the first and after the final drop. */
    float **history;       /* [n_tokens] */
    int32_t *observations; /* [n_tokens]: observations recorded so far */
} HostTier;

typedef struct {
    Policy base;
    OffloadParams prm;
    int group, head_dim, kv_bits;
    int keep_real, recent, restore_cap;
    bool summary;   /* coupling = fixedsize: one synthetic slot, the mean of the evicted tokens */
    bool quantized; /* the host tier's tokens are quantized */
    double *skipped_sum; /* [n_kv_heads][2 * head_dim] (summary): sums of the evicted K and V */
    int *skipped_count;  /* [n_kv_heads] */
    float *summary_kv;   /* [2 * head_dim] */
    double host_token_bytes;
    HostTier *host;      /* [n_kv_heads] */
    HybridScratch scratch;
    float *restored_kv;  /* [2 * head_dim]: dequantized K then V */
    float *difference;   /* [head_dim] */
    MemReport report;    /* the transfer counters of the current step */
    bool report_holds_prefill;
} Offload;

static const ParamSpec offload_params[] = {
    {"budget", PARAM_INT, offsetof(OffloadParams, budget), "1024", 2, 1 << 30, NULL,
     "slots of one KV head's device cache at attention time"},
    {"ratio", PARAM_DOUBLE, offsetof(OffloadParams, ratio), "0.5", 0, 1, NULL,
     "share of the device budget kept by importance (restored tokens included)"},
    {"host_budget", PARAM_INT, offsetof(OffloadParams, host_budget), "16384", 0, 1 << 30, NULL,
     "host-tier tokens per KV head; the oldest offload is dropped beyond it (0 = no host tier)"},
    {"bits", PARAM_INT, offsetof(OffloadParams, bits), "8", 4, 8, NULL,
     "host-tier quantization: 4 or 8 bits per element"},
    {"group", PARAM_INT, offsetof(OffloadParams, group), "64", 0, 1 << 20, NULL,
     "elements per quantization scale along head_dim (0 = one scale per K or V vector)"},
    {"importance_window", PARAM_INT, offsetof(OffloadParams, importance_window), "100", 1,
     1 << 20, NULL, "observations of a token's importance averaged for restoration"},
    {"threshold", PARAM_DOUBLE, offsetof(OffloadParams, threshold), "0.1", 0, 1e30, NULL,
     "a host token whose mean importance exceeds this is restored"},
    {"max_restore", PARAM_INT, offsetof(OffloadParams, max_restore), "100", 0, 1 << 30, NULL,
     "most tokens restored per step and KV head"},
    {"coupling", PARAM_ENUM, offsetof(OffloadParams, coupling), "offload", 0, 0,
     "offload|fixedsize",
     "offload: every evicted token, no summary slot; fixedsize: as FixedSize, offloading comes "
     "with the mean-of-evicted summary slot"},
    {"quantize", PARAM_ENUM, offsetof(OffloadParams, quantize), "auto", 0, 0, "auto|on|off",
     "host tier quantized to `bits`: auto = on with coupling = offload, off with fixedsize "
     "(FixedSize's default)"},
    {"gqa", PARAM_ENUM, offsetof(OffloadParams, gqa), "sum", 0, 0, RANK_GQA_CHOICES,
     "reduction of the group's query heads' attention (observations and prefill): sum, mean or "
     "max"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int offload_validate(const void *params, KvErr *err)
{
    const OffloadParams *prm = params;
    if (prm->bits != 4 && prm->bits != 8)
        return kv_fail(err, "bits = %d: expected 4 or 8", prm->bits);
    return 0;
}

/* Host bytes of one token: K and V codes at `bits` per element, plus a float32 scale and a
 * float32 minimum (the zero point) per quantization group of each vector. */
static double host_token_bytes(int head_dim, int bits, int group)
{
    int groups = group > 0 ? (head_dim + group - 1) / group : 1;
    return 2.0 * (head_dim * bits / 8.0 + groups * 2.0 * sizeof(float));
}

/* out = x after min-max affine quantization to `bits` per `group` elements and back:
 * scale = (max - min) / (2^bits - 1), code = round((x - min) / scale) (which is FixedSize's
 * round(x / scale + zero_point) with zero_point = -min / scale), x~ = min + code * scale. */
static void quantize_round_trip(const float *x, int n, int bits, int group, float *out)
{
    int top_code = (1 << bits) - 1;
    int width = group > 0 ? group : n;
    for (int start = 0; start < n; start += width) {
        int end = start + width < n ? start + width : n;
        float lo = x[start], hi = x[start];
        for (int i = start + 1; i < end; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        float scale = (hi - lo) / (float)top_code;
        for (int i = start; i < end; i++) {
            if (scale == 0.0f) { /* a constant group is stored exactly by its minimum */
                out[i] = lo;
                continue;
            }
            float code = rintf((x[i] - lo) / scale);
            code = code < 0 ? 0 : code > top_code ? (float)top_code : code;
            out[i] = lo + code * scale;
        }
    }
}

static Policy *offload_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    Offload *o = kv_calloc(1, sizeof *o);
    policy_base_init(&o->base, &policy_offload, L);
    o->prm = *(const OffloadParams *)params;
    o->group = L->group;
    o->head_dim = L->head_dim;
    o->kv_bits = env->kv_bits;
    o->summary = o->prm.coupling == COUPLING_FIXEDSIZE;
    o->quantized = o->prm.quantize == QUANTIZE_ON ||
                   (o->prm.quantize == QUANTIZE_AUTO && !o->summary);
    int reserved = o->summary;
    int by_importance = hybrid_importance_slots(o->prm.budget, o->prm.ratio, reserved);
    o->keep_real = o->prm.budget - 1 - reserved;
    o->recent = o->keep_real - by_importance;
    o->restore_cap = o->prm.max_restore < by_importance ? o->prm.max_restore : by_importance;
    o->host_token_bytes = o->quantized
                              ? host_token_bytes(L->head_dim, o->prm.bits, o->prm.group)
                              : kv_entry_bytes(1, L->head_dim, env->kv_bits);
    if (o->summary) {
        o->skipped_sum = kv_calloc((size_t)L->n_kv_heads * 2 * L->head_dim, sizeof(double));
        o->skipped_count = kv_calloc((size_t)L->n_kv_heads, sizeof(int));
        o->summary_kv = kv_malloc(2 * (size_t)L->head_dim * sizeof(float));
    }
    /* The prompt's attention ranks the prompt and is every prompt token's first observation;
     * without importance slots nothing can be restored and the ranking does not matter. */
    o->base.want_prefill_mass = by_importance > 0;
    int T = L->n_tokens;
    o->host = kv_calloc((size_t)L->n_kv_heads, sizeof *o->host);
    for (int g = 0; g < L->n_kv_heads; g++) {
        HostTier *ht = &o->host[g];
        ht->next = kv_malloc((size_t)T * sizeof *ht->next);
        ht->prev = kv_malloc((size_t)T * sizeof *ht->prev);
        ht->frozen_mean = kv_calloc((size_t)T, sizeof *ht->frozen_mean);
        ht->restorable = kv_malloc((size_t)T * sizeof *ht->restorable);
        ht->history = kv_calloc((size_t)T, sizeof *ht->history);
        ht->observations = kv_calloc((size_t)T, sizeof *ht->observations);
        ht->oldest = ht->newest = -1;
    }
    o->restored_kv = kv_malloc(2 * (size_t)L->head_dim * sizeof(float));
    o->difference = kv_malloc((size_t)L->head_dim * sizeof(float));
    return &o->base;
}

static void record_observation(Offload *o, HostTier *ht, int pos, float importance)
{
    int window = o->prm.importance_window;
    if (!ht->history[pos])
        ht->history[pos] = kv_malloc((size_t)window * sizeof(float));
    ht->history[pos][ht->observations[pos] % window] = importance;
    ht->observations[pos]++;
}

static float history_mean(const Offload *o, const HostTier *ht, int pos)
{
    int n = ht->observations[pos] < o->prm.importance_window ? ht->observations[pos]
                                                              : o->prm.importance_window;
    if (n == 0)
        return 0.0f;
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += ht->history[pos][i];
    return (float)(sum / n);
}

static void host_unlink(HostTier *ht, int pos)
{
    int before = ht->prev[pos], after = ht->next[pos];
    if (before >= 0)
        ht->next[before] = after;
    else
        ht->oldest = after;
    if (after >= 0)
        ht->prev[after] = before;
    else
        ht->newest = before;
    ht->count--;
}

static void drop_restorable(HostTier *ht, int pos)
{
    for (int i = 0; i < ht->n_restorable; i++)
        if (ht->restorable[i] == pos) {
            ht->restorable[i] = ht->restorable[--ht->n_restorable];
            return;
        }
}

/* Forgets a token for good: nothing can bring it back. */
static void forget(HostTier *ht, int pos)
{
    free(ht->history[pos]);
    ht->history[pos] = NULL;
    ht->observations[pos] = 0;
}

/* Moves an evicted token of KV head g to the host tier, dropping the oldest beyond host_budget. */
static void offload_token(Offload *o, HostTier *ht, int pos)
{
    if (o->prm.host_budget == 0) {
        forget(ht, pos);
        return;
    }
    ht->prev[pos] = ht->newest;
    ht->next[pos] = -1;
    if (ht->newest >= 0)
        ht->next[ht->newest] = pos;
    else
        ht->oldest = pos;
    ht->newest = pos;
    ht->count++;
    ht->frozen_mean[pos] = history_mean(o, ht, pos);
    if (ht->frozen_mean[pos] > o->prm.threshold)
        ht->restorable[ht->n_restorable++] = pos;
    o->report.to_host_bytes += o->host_token_bytes;
    if (ht->count > o->prm.host_budget) {
        int dropped = ht->oldest;
        host_unlink(ht, dropped);
        if (ht->frozen_mean[dropped] > o->prm.threshold)
            drop_restorable(ht, dropped);
        forget(ht, dropped);
    }
}

/* ||a - b|| / ||b||, or ||a - b|| when b is zero. */
static double relative_error(Offload *o, const float *approx, const float *exact)
{
    int D = o->head_dim;
    memcpy(o->difference, approx, (size_t)D * sizeof(float));
    cblas_saxpy(D, -1.0f, exact, 1, o->difference, 1);
    double norm = cblas_snrm2(D, exact, 1), error = cblas_snrm2(D, o->difference, 1);
    return norm > 0 ? error / norm : error;
}

/* Brings back the restorable host tokens of KV head g with the highest frozen means, up to the
 * step's cap, with their dequantized K and V; each new slot gets importance +inf so that the
 * truncation of this step keeps it. The scratch must have room for the new slots. */
static void restore_tokens(Offload *o, const LayerView *L, int g)
{
    HostTier *ht = &o->host[g];
    int n = ht->n_restorable;
    int n_restore = n < o->restore_cap ? n : o->restore_cap;
    if (n_restore == 0)
        return;
    HybridRank *rank = o->scratch.rank;
    for (int i = 0; i < n; i++)
        rank[i] = (HybridRank){ht->frozen_mean[ht->restorable[i]], ht->restorable[i]};
    hybrid_rank_sort(rank, n);
    ht->n_restorable = n - n_restore;
    for (int i = 0; i < n - n_restore; i++)
        ht->restorable[i] = rank[i].pos;
    int D = o->head_dim;
    KVCache *c = &o->base.cache[g];
    for (int i = n - n_restore; i < n; i++) {
        int pos = rank[i].pos;
        host_unlink(ht, pos);
        o->report.restored_tokens += 1;
        o->report.to_device_bytes += o->host_token_bytes;
        if (!o->quantized) { /* a full-precision host copy comes back exact */
            kvcache_add(c, pos);
            o->scratch.importance[c->slot_of[pos]] = INFINITY;
            continue;
        }
        const float *k = L->k + ((size_t)g * L->n_tokens + pos) * D;
        const float *v = L->v + ((size_t)g * L->n_tokens + pos) * D;
        quantize_round_trip(k, D, o->prm.bits, o->prm.group, o->restored_kv);
        quantize_round_trip(v, D, o->prm.bits, o->prm.group, o->restored_kv + D);
        int slot = kvcache_add_alt(c, pos, o->restored_kv, o->restored_kv + D);
        o->scratch.importance[slot] = INFINITY;
        o->report.restore_k_err += relative_error(o, o->restored_kv, k);
        o->report.restore_v_err += relative_error(o, o->restored_kv + D, v);
    }
}

/* coupling = fixedsize: KV head g's synthetic slot becomes the mean of every K and V it has
 * evicted (hybrid's include_skipped = mean). */
static void write_summary(Offload *o, const LayerView *L, int g, int n_evicted)
{
    KVCache *c = &o->base.cache[g];
    int D = o->head_dim;
    double *sum = o->skipped_sum + (size_t)g * 2 * D;
    for (int i = 0; i < n_evicted; i++) {
        int pos = o->scratch.evicted[i];
        const float *k = L->k + ((size_t)g * L->n_tokens + pos) * D;
        const float *v = L->v + ((size_t)g * L->n_tokens + pos) * D;
        for (int d = 0; d < D; d++) {
            sum[d] += k[d];
            sum[D + d] += v[d];
        }
        o->skipped_count[g]++;
    }
    for (int slot = 0; slot < c->n; slot++)
        if (c->pos[slot] < 0) {
            kvcache_remove_slot(c, slot);
            break;
        }
    for (int d = 0; d < 2 * D; d++)
        o->summary_kv[d] = (float)(sum[d] / o->skipped_count[g]);
    kvcache_add_alt(c, -1, o->summary_kv, o->summary_kv + D);
}

static void truncate_head(Offload *o, const LayerView *L, int g, int newest)
{
    KVCache *c = &o->base.cache[g];
    int n_evicted = hybrid_select_evictions(c, o->scratch.importance, newest, o->keep_real,
                                            o->recent, &o->scratch);
    for (int i = 0; i < n_evicted; i++) {
        kvcache_remove(c, o->scratch.evicted[i]);
        offload_token(o, &o->host[g], o->scratch.evicted[i]);
    }
    if (o->summary && n_evicted > 0)
        write_summary(o, L, g, n_evicted);
}

static void offload_prefill(Policy *p, const PrefillView *pv)
{
    Offload *o = (Offload *)p;
    int c0 = pv->chunk_start, c1 = pv->chunk_end;
    if (!o->report_holds_prefill) /* the last decode step's transfers were reported */
        memset(&o->report, 0, sizeof o->report);
    float *by_position = kv_calloc((size_t)c1, sizeof *by_position);
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        HostTier *ht = &o->host[g];
        for (int j = c0; j < c1; j++)
            kvcache_add(c, j);
        if (pv->prefill_mass) {
            rank_reduce_rows(pv->prefill_mass + (size_t)g * o->group * c1, o->group, c1, c1,
                             o->prm.gqa, by_position);
            /* One observation on the scale of a decode step's: the mean over the chunk's
             * c1 - max(j, c0) queries that see token j (the prompt fed whole: P - j). Slots in
             * position order, so that the histories do not depend on the slot order. */
            for (int j = 0; j < c1; j++)
                if (kvcache_has(c, j))
                    record_observation(o, ht, j, by_position[j] / (float)(c1 - (j > c0 ? j : c0)));
        }
        hybrid_scratch_reserve(&o->scratch, c->n);
        for (int slot = 0; slot < c->n; slot++) /* the synthetic slot never competes */
            o->scratch.importance[slot] = c->pos[slot] >= 0 ? by_position[c->pos[slot]] : 0.0f;
        truncate_head(o, pv->L, g, c1 - 1);
    }
    free(by_position);
    /* The span's transfers are reported with the next decode step. */
    o->report_holds_prefill = true;
}

static void offload_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void offload_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    Offload *o = (Offload *)p;
    if (!o->report_holds_prefill)
        memset(&o->report, 0, sizeof o->report);
    o->report_holds_prefill = false;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        HostTier *ht = &o->host[g];
        int n_restorable = ht->n_restorable;
        hybrid_scratch_reserve(&o->scratch, c->n + (n_restorable > 0 ? n_restorable : 0));
        rank_reduce_rows(attn[g], o->group, c->n, c->n, o->prm.gqa, o->scratch.importance);
        for (int slot = 0; slot < c->n; slot++)
            if (c->pos[slot] >= 0)
                record_observation(o, ht, c->pos[slot], o->scratch.importance[slot]);
        restore_tokens(o, sv->L, g);
        truncate_head(o, sv->L, g, sv->t);
    }
}

static void offload_memory(const Policy *p, MemReport *m)
{
    const Offload *o = (const Offload *)p;
    double live = 0, host = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        live += p->cache[g].n;
        host += o->host[g].count;
    }
    *m = o->report;
    m->device_bytes = kv_entry_bytes(live, o->head_dim, o->kv_bits);
    m->allocated_bytes = m->device_bytes;
    m->host_bytes = host * o->host_token_bytes;
}

int offload_host_tokens(const Policy *p, int kv_head, int32_t *out)
{
    const Offload *o = (const Offload *)p;
    const HostTier *ht = &o->host[kv_head];
    int n = 0;
    for (int pos = ht->oldest; pos >= 0; pos = ht->next[pos])
        out[n++] = pos;
    return n;
}

static void offload_destroy(Policy *p)
{
    Offload *o = (Offload *)p;
    for (int g = 0; g < p->n_kv_heads; g++) {
        HostTier *ht = &o->host[g];
        for (int pos = 0; pos < p->cache[g].n_tokens; pos++)
            free(ht->history[pos]);
        free(ht->next);
        free(ht->prev);
        free(ht->frozen_mean);
        free(ht->restorable);
        free(ht->history);
        free(ht->observations);
    }
    free(o->host);
    hybrid_scratch_free(&o->scratch);
    free(o->restored_kv);
    free(o->difference);
    free(o->skipped_sum);
    free(o->skipped_count);
    free(o->summary_kv);
    policy_base_free(p);
    free(o);
}

static long offload_max_slots(const void *params, const LayerView *L, int t)
{
    const OffloadParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const offload_conformance[] = {
    "budget=32 host_budget=48 group=8",
    "budget=32 host_budget=48 group=8 ratio=1 bits=4",
    "budget=32 host_budget=48 group=8 importance_window=4 threshold=0.02 max_restore=1",
    "budget=32 host_budget=48 group=8 coupling=fixedsize threshold=0.02",
    "budget=32 host_budget=48 group=8 coupling=fixedsize quantize=on threshold=0.02",
    "budget=32 host_budget=48 group=8 quantize=off threshold=0.02",
    "budget=32 host_budget=48 group=8 threshold=0.02 gqa=max",
    "budget=32 host_budget=48 group=8 threshold=0.01 gqa=mean",
    NULL,
};

const PolicyType policy_offload = {
    .name = "offload",
    .description = "FixedSize CPU offload: hybrid device tier, quantized host tier, restoration "
                   "of tokens with high mean importance",
    .params_size = sizeof(OffloadParams),
    .params = offload_params,
    .validate = offload_validate,
    .create = offload_create,
    .prefill = offload_prefill,
    .step = offload_step,
    .observe = offload_observe,
    .memory = offload_memory,
    .destroy = offload_destroy,
    .max_slots = offload_max_slots,
    .conformance = offload_conformance,
};
