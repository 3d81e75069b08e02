/* decay — TriCache's attention-driven eviction. Each cached token accumulates the attention
 * probability the queries of its KV group give it; its score is accumulated / ln(age + e), with
 * age = t − position. After query t has attended, each KV head's cache is trimmed to budget − 1
 * tokens by dropping the lowest scores, so that admitting token t + 1 keeps |cache| <= budget.
 * Never dropped: the pinned system-prompt segment and the tokens that will be in query t + 1's
 * local window (the last `local` tokens). TriCache compresses during prefill: a prefill chunk's
 * queries add their attention (over the cache and the chunk: prefill mass) to what the tokens
 * they see have accumulated, the chunk is admitted and the cache trimmed as after query
 * chunk_end − 1, after every chunk of every span. The system segment is pinned as its tokens
 * arrive. `gqa` reduces the group's query heads: sum (the default, above), mean or max. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"
#include "policies/rank.h"

extern const PolicyType policy_decay;

typedef struct {
    int budget;
    int local;
    bool pin_system;
    int gqa;
} DecayParams;

typedef struct {
    double score;
    int pos;
} Candidate;

typedef struct {
    Policy base;
    DecayParams prm;
    int n_tokens, group;
    bool *pinned;      /* [T] system-segment prompt tokens, never evicted */
    int pin_room;      /* tokens that may still be pinned */
    double *acc;       /* [n_kv_heads][T] attention mass accumulated over the group's heads */
    double *inv_decay; /* [T] 1 / ln(age + e) by age */
    Candidate *cand;   /* scratch: room for every slot of a cache */
    float *reduced;    /* [T] scratch (gqa = max) */
} Decay;

static const ParamSpec decay_params[] = {
    {"budget", PARAM_INT, offsetof(DecayParams, budget), "8192", 2, 1 << 30, NULL,
     "tokens per KV head at attention time (TriCache max_memory_tokens)"},
    {"local", PARAM_INT, offsetof(DecayParams, local), "1024", 1, 1 << 30, NULL,
     "last tokens never evicted, the current one included (TriCache local window)"},
    {"pin_system", PARAM_BOOL, offsetof(DecayParams, pin_system), "true", 0, 0, NULL,
     "never evict the system-prompt segment (segment 0), up to budget - local tokens"},
    {"gqa", PARAM_ENUM, offsetof(DecayParams, gqa), "sum", 0, 0, RANK_GQA_CHOICES,
     "reduction over the group's query heads: sum, mean or max"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int decay_validate(const void *params, KvErr *err)
{
    const DecayParams *prm = params;
    if (prm->local >= prm->budget)
        return kv_fail(err,
                       "decay: local = %d must be below budget = %d (the local window is kept "
                       "inside the budget, with room for at least one scored token)",
                       prm->local, prm->budget);
    return 0;
}

static Policy *decay_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    Decay *d = kv_calloc(1, sizeof *d);
    policy_base_init(&d->base, &policy_decay, L);
    d->base.want_prefill_mass = true;
    d->prm = *(const DecayParams *)params;
    d->n_tokens = L->n_tokens;
    d->group = L->group;
    d->pinned = kv_calloc((size_t)L->n_tokens, sizeof *d->pinned);
    d->acc = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *d->acc);
    d->inv_decay = kv_malloc((size_t)L->n_tokens * sizeof *d->inv_decay);
    d->reduced = kv_malloc((size_t)L->n_tokens * sizeof *d->reduced);
    /* Before a trim a cache holds at most every position once. */
    d->cand = kv_malloc((size_t)L->n_tokens * sizeof *d->cand);
    const double e = exp(1.0);
    for (int age = 0; age < L->n_tokens; age++)
        d->inv_decay[age] = 1.0 / log(age + e);
    /* Pinning more than budget − local tokens would leave no room for the local window. */
    d->pin_room = d->prm.pin_system ? d->prm.budget - d->prm.local : 0;
    return &d->base;
}

/* Lowest score first; equal scores evict the older token first. */
static int candidate_cmp(const void *a, const void *b)
{
    const Candidate *x = a, *y = b;
    if (x->score != y->score)
        return x->score < y->score ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* After query t: trims KV head g's cache to budget − 1 tokens, keeping pinned tokens and the
 * tokens of query t + 1's local window, positions [t + 2 − local, t]. */
static void decay_evict(Decay *d, int g, int t)
{
    KVCache *c = &d->base.cache[g];
    int excess = c->n - (d->prm.budget - 1);
    if (excess <= 0)
        return;
    const double *acc = d->acc + (size_t)g * d->n_tokens;
    int first_local = t + 2 - d->prm.local;
    Candidate *cand = d->cand;
    int n = 0;
    for (int s = 0; s < c->n; s++) {
        int pos = c->pos[s];
        if (pos < 0 || pos >= first_local || d->pinned[pos])
            continue;
        cand[n++] = (Candidate){acc[pos] * d->inv_decay[t - pos], pos};
    }
    if (excess > n)
        excess = n; /* cannot happen: pinned + local <= budget − 1 by construction */
    if (excess == 1) {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (candidate_cmp(&cand[i], &cand[best]) < 0)
                best = i;
        kvcache_remove(c, cand[best].pos);
    } else if (excess > 1) {
        qsort(cand, (size_t)n, sizeof *cand, candidate_cmp);
        for (int i = 0; i < excess; i++)
            kvcache_remove(c, cand[i].pos);
    }
}

/* acc[pos[j]] += the group's reduction of rows a ([group][lda]) at j < n; pos NULL: pos[j] = j,
 * and a negative pos[j] is skipped. Sum adds each head's row in turn (as before the option). */
static void accumulate(Decay *d, double *acc, const float *a, int n, int lda, const int32_t *pos)
{
    if (d->prm.gqa == RANK_GQA_MAX) {
        rank_reduce_rows(a, d->group, n, lda, RANK_GQA_MAX, d->reduced);
        for (int j = 0; j < n; j++)
            if (!pos || pos[j] >= 0)
                acc[pos ? pos[j] : j] += d->reduced[j];
        return;
    }
    double w = d->prm.gqa == RANK_GQA_MEAN ? 1.0 / d->group : 1.0;
    for (int i = 0; i < d->group; i++) {
        const float *row = a + (size_t)i * lda;
        for (int j = 0; j < n; j++)
            if (!pos || pos[j] >= 0)
                acc[pos ? pos[j] : j] += d->prm.gqa == RANK_GQA_MEAN ? row[j] * w : row[j];
    }
}

static void decay_prefill(Policy *p, const PrefillView *pv)
{
    Decay *d = (Decay *)p;
    int c1 = pv->chunk_end;
    for (int j = pv->chunk_start; j < c1 && d->pin_room > 0; j++)
        if (pv->L->meta->segments[j] == 0) {
            d->pinned[j] = true;
            d->pin_room--;
        }
    for (int g = 0; g < p->n_kv_heads; g++) {
        double *acc = d->acc + (size_t)g * d->n_tokens;
        /* Zero where the chunk's queries saw nothing: evicted positions gain nothing. */
        accumulate(d, acc, pv->prefill_mass + (size_t)g * d->group * c1, c1, c1, NULL);
        for (int j = pv->chunk_start; j < c1; j++)
            kvcache_add(&p->cache[g], j);
        decay_evict(d, g, c1 - 1);
    }
}

static void decay_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void decay_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    Decay *d = (Decay *)p;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        double *acc = d->acc + (size_t)g * d->n_tokens;
        accumulate(d, acc, attn[g], c->n, c->n, c->pos);
        decay_evict(d, g, sv->t);
    }
}

static void decay_destroy(Policy *p)
{
    Decay *d = (Decay *)p;
    free(d->pinned);
    free(d->acc);
    free(d->inv_decay);
    free(d->cand);
    free(d->reduced);
    policy_base_free(p);
    free(d);
}

static long decay_max_slots(const void *params, const LayerView *L, int t)
{
    const DecayParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const decay_conformance[] = {
    "budget=32 local=8",
    "budget=32 local=8 pin_system=false",
    "budget=32 local=8 gqa=max",
    "budget=32 local=8 gqa=mean",
    NULL,
};

const PolicyType policy_decay = {
    .name = "decay",
    .description = "TriCache eviction: accumulated attention / ln(age + e), system prompt and "
                   "last `local` tokens kept",
    .params_size = sizeof(DecayParams),
    .params = decay_params,
    .validate = decay_validate,
    .create = decay_create,
    .prefill = decay_prefill,
    .step = decay_step,
    .observe = decay_observe,
    .destroy = decay_destroy,
    .max_slots = decay_max_slots,
    .conformance = decay_conformance,
};
