/* hybrid — FixedSize's truncation: a fixed `budget`; a token's importance is the attention it
 * received from the current step's queries of its KV group (sum over the group's heads). When
 * the cache is over budget, `ratio` of the budget is kept by importance, the rest are the most
 * recent tokens, the newest always. ratio = 1 is FixedSize's plain `attention` strategy,
 * ratio = 0 a sliding window. include_skipped adds one synthetic slot holding the mean of every
 * evicted key and value, which counts toward the budget (FixedSize's current code). Its first
 * version summed them instead; kvsim does not offer that: the sum's logit grows with every
 * eviction until the slot takes all of the attention, every real token's share is 0 and
 * eviction degenerates to oldest-first.
 *
 * Timing: like FixedSize, a step attends first and truncates after (in observe), with that
 * step's attention; the cache is cut to budget - 1 so that the next token fits. A prefill chunk
 * (of any span) is admitted and then truncated the same way, newest = its last token, a token's
 * importance being the attention the chunk's queries gave it (over the cache and the chunk,
 * summed over the queries and the group's heads). `gqa` reduces the group's heads: sum (the
 * default, above), mean or max. */
#include <cblas.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "policies/hybrid.h"
#include "policies/rank.h"

extern const PolicyType policy_hybrid;

/* ---- The shared truncation rule ---- */

static int rank_cmp(const void *a, const void *b)
{
    const HybridRank *x = a, *y = b;
    if (x->importance != y->importance)
        return x->importance < y->importance ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

void hybrid_rank_sort(HybridRank *rank, int n)
{
    qsort(rank, (size_t)n, sizeof *rank, rank_cmp);
}

int hybrid_importance_slots(int budget, double ratio, int reserved)
{
    int by_ratio = (int)floor(budget * ratio);
    int most = budget - 2 - reserved;
    return by_ratio < most ? by_ratio : most;
}

void hybrid_scratch_reserve(HybridScratch *s, int n)
{
    if (n <= s->cap)
        return;
    s->cap = n;
    s->importance = kv_realloc(s->importance, (size_t)n * sizeof *s->importance);
    s->rank = kv_realloc(s->rank, (size_t)n * sizeof *s->rank);
    s->evicted = kv_realloc(s->evicted, (size_t)n * sizeof *s->evicted);
}

void hybrid_scratch_free(HybridScratch *s)
{
    free(s->importance);
    free(s->rank);
    free(s->evicted);
    memset(s, 0, sizeof *s);
}

int hybrid_select_evictions(const KVCache *c, const float *importance, int newest, int keep_real,
                            int recent, HybridScratch *s)
{
    int excess = kvcache_real_count(c) - keep_real;
    if (excess <= 0)
        return 0;
    /* The recent part is every cached position >= boundary. The cached positions near the newest
     * are contiguous (each arriving token enters the recent part), so this scan is O(recent). */
    int boundary = newest + 1, found = 0;
    while (found < recent && boundary > 0)
        found += kvcache_has(c, --boundary);
    int n_cand = 0;
    for (int slot = 0; slot < c->n; slot++)
        if (c->pos[slot] >= 0 && c->pos[slot] < boundary)
            s->rank[n_cand++] = (HybridRank){importance[slot], c->pos[slot]};
    /* keep_real >= recent guarantees n_cand >= excess. One eviction per step is the steady
     * state: a linear scan for it, a sort for the bulk cases (prefill, restorations). */
    if (excess == 1) {
        int lowest = 0;
        for (int i = 1; i < n_cand; i++)
            if (rank_cmp(&s->rank[i], &s->rank[lowest]) < 0)
                lowest = i;
        s->evicted[0] = s->rank[lowest].pos;
        return 1;
    }
    hybrid_rank_sort(s->rank, n_cand);
    for (int i = 0; i < excess; i++)
        s->evicted[i] = s->rank[i].pos;
    return excess;
}

/* ---- The hybrid policy ---- */

enum { SKIPPED_OFF = 0, SKIPPED_MEAN = 1 };

typedef struct {
    int budget;
    double ratio;
    int include_skipped;
    int gqa;
} HybridParams;

typedef struct {
    Policy base;
    HybridParams prm;
    int group, head_dim;
    int keep_real; /* real tokens left by a truncation */
    int recent;    /* of which the most recent, the newest included */
    double *skipped_sum; /* [n_kv_heads][2 * head_dim]: sums of the evicted keys, then values */
    int *skipped_count;  /* [n_kv_heads] */
    float *summary;      /* [2 * head_dim]: the synthetic slot being written */
    HybridScratch scratch;
} Hybrid;

static const ParamSpec hybrid_params[] = {
    {"budget", PARAM_INT, offsetof(HybridParams, budget), "1024", 2, 1 << 30, NULL,
     "slots of one KV head's cache at attention time, the synthetic one included"},
    {"ratio", PARAM_DOUBLE, offsetof(HybridParams, ratio), "0.5", 0, 1, NULL,
     "share of the budget kept by importance; the rest are the most recent tokens"},
    {"include_skipped", PARAM_ENUM, offsetof(HybridParams, include_skipped), "off", 0, 0,
     "off|mean", "one synthetic slot holding the mean of the evicted keys and values"},
    {"gqa", PARAM_ENUM, offsetof(HybridParams, gqa), "sum", 0, 0, RANK_GQA_CHOICES,
     "reduction of the group's query heads' attention: sum, mean or max"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int hybrid_validate(const void *params, KvErr *err)
{
    const HybridParams *prm = params;
    int reserved = prm->include_skipped != SKIPPED_OFF;
    if (prm->budget < 2 + reserved)
        return kv_fail(err,
                       "budget = %d: expected at least %d (the arriving token, the newest "
                       "token%s)",
                       prm->budget, 2 + reserved, reserved ? " and the skipped-token slot" : "");
    return 0;
}

static Policy *hybrid_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    Hybrid *h = kv_calloc(1, sizeof *h);
    policy_base_init(&h->base, &policy_hybrid, L);
    h->prm = *(const HybridParams *)params;
    h->group = L->group;
    h->head_dim = L->head_dim;
    int reserved = h->prm.include_skipped != SKIPPED_OFF;
    int by_importance = hybrid_importance_slots(h->prm.budget, h->prm.ratio, reserved);
    h->keep_real = h->prm.budget - 1 - reserved;
    h->recent = h->keep_real - by_importance;
    /* The prefill attention is only needed if a prefill chunk may have to be cut by importance. */
    h->base.want_prefill_mass = by_importance > 0 && L->n_tokens > h->keep_real;
    if (reserved) {
        h->skipped_sum = kv_calloc((size_t)L->n_kv_heads * 2 * L->head_dim, sizeof(double));
        h->skipped_count = kv_calloc((size_t)L->n_kv_heads, sizeof(int));
        h->summary = kv_malloc(2 * (size_t)L->head_dim * sizeof(float));
    }
    return &h->base;
}

/* Rewrites the synthetic slot of KV head g from the running sums of its evicted tokens. */
static void hybrid_write_summary(Hybrid *h, int g)
{
    KVCache *c = &h->base.cache[g];
    for (int slot = 0; slot < c->n; slot++)
        if (c->pos[slot] < 0) {
            kvcache_remove_slot(c, slot);
            break;
        }
    const double *sum = h->skipped_sum + (size_t)g * 2 * h->head_dim;
    double divisor = h->skipped_count[g];
    for (int d = 0; d < 2 * h->head_dim; d++)
        h->summary[d] = (float)(sum[d] / divisor);
    kvcache_add_alt(c, -1, h->summary, h->summary + h->head_dim);
}

/* Truncates KV head g's cache, importance[slot] given, `newest` the latest token. */
static void hybrid_truncate(Hybrid *h, const LayerView *L, int g, const float *importance,
                            int newest)
{
    KVCache *c = &h->base.cache[g];
    int n_evicted = hybrid_select_evictions(c, importance, newest, h->keep_real, h->recent,
                                            &h->scratch);
    if (n_evicted == 0)
        return;
    int D = h->head_dim;
    for (int i = 0; i < n_evicted; i++) {
        int pos = h->scratch.evicted[i];
        kvcache_remove(c, pos);
        if (h->prm.include_skipped == SKIPPED_OFF)
            continue;
        const float *k = L->k + ((size_t)g * L->n_tokens + pos) * D;
        const float *v = L->v + ((size_t)g * L->n_tokens + pos) * D;
        double *sum = h->skipped_sum + (size_t)g * 2 * D;
        for (int d = 0; d < D; d++) {
            sum[d] += k[d];
            sum[D + d] += v[d];
        }
        h->skipped_count[g]++;
    }
    if (h->prm.include_skipped != SKIPPED_OFF)
        hybrid_write_summary(h, g);
}

static void hybrid_prefill(Policy *p, const PrefillView *pv)
{
    Hybrid *h = (Hybrid *)p;
    const LayerView *L = pv->L;
    int c1 = pv->chunk_end;
    float *by_position = kv_calloc((size_t)c1, sizeof *by_position);
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        for (int j = pv->chunk_start; j < c1; j++)
            kvcache_add(c, j);
        if (kvcache_real_count(c) <= h->keep_real)
            continue;
        hybrid_scratch_reserve(&h->scratch, c->n);
        /* Without the prefill attention the ranking does not matter: nothing but the recent
         * part is kept (see hybrid_create). */
        if (pv->prefill_mass)
            rank_reduce_rows(pv->prefill_mass + (size_t)g * h->group * c1, h->group, c1, c1,
                             h->prm.gqa, by_position);
        /* The synthetic slot never competes (hybrid_select_evictions). */
        for (int slot = 0; slot < c->n; slot++)
            h->scratch.importance[slot] = c->pos[slot] >= 0 ? by_position[c->pos[slot]] : 0.0f;
        hybrid_truncate(h, L, g, h->scratch.importance, c1 - 1);
    }
    free(by_position);
}

static void hybrid_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void hybrid_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    Hybrid *h = (Hybrid *)p;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        if (kvcache_real_count(c) <= h->keep_real)
            continue;
        hybrid_scratch_reserve(&h->scratch, c->n);
        rank_reduce_rows(attn[g], h->group, c->n, c->n, h->prm.gqa, h->scratch.importance);
        hybrid_truncate(h, sv->L, g, h->scratch.importance, sv->t);
    }
}

static void hybrid_destroy(Policy *p)
{
    Hybrid *h = (Hybrid *)p;
    hybrid_scratch_free(&h->scratch);
    free(h->skipped_sum);
    free(h->skipped_count);
    free(h->summary);
    policy_base_free(p);
    free(h);
}

static long hybrid_max_slots(const void *params, const LayerView *L, int t)
{
    const HybridParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const hybrid_conformance[] = {
    "budget=32",
    "budget=32 ratio=1",
    "budget=32 ratio=0",
    "budget=32 include_skipped=mean",
    "budget=32 gqa=max",
    "budget=32 gqa=mean include_skipped=mean",
    NULL,
};

const PolicyType policy_hybrid = {
    .name = "hybrid",
    .description = "FixedSize truncation: `ratio` of the budget by this step's attention, the rest "
                   "recent",
    .params_size = sizeof(HybridParams),
    .params = hybrid_params,
    .validate = hybrid_validate,
    .create = hybrid_create,
    .prefill = hybrid_prefill,
    .step = hybrid_step,
    .observe = hybrid_observe,
    .destroy = hybrid_destroy,
    .max_slots = hybrid_max_slots,
    .conformance = hybrid_conformance,
};
