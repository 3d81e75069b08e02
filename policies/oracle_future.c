/* oracle_future — upper bound (greedy, see docs/policies.md) for eviction-only methods:
 * permanent eviction that knows the future.
 *
 * Score of a cached token j for KV head g after query t: its remaining attention mass, the sum
 * over the group's query heads and over the decode queries still to come (t, T) of their true
 * attention on j. It starts as the engine's decode_mass (all decode queries) and each observed
 * true row is subtracted as the steps pass, so it is exact. After query t attended, the cache is
 * cut to budget - 1 by evicting, one at a time, the token of least remaining mass (ties: the
 * older), the current one included; evicted tokens never come back. After every prefill chunk (of
 * any span) the cache and the chunk are cut to the budget - 1 tokens of most remaining mass
 * (ties: the later); prefill queries are not decode queries, so they take nothing from it. An
 * oracle: it reads the future, which no method can. */
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"
#include "policies/rank.h"

extern const PolicyType policy_oracle_future;

typedef struct {
    int budget;
} OracleFutureParams;

typedef struct {
    Policy base;
    int budget, group, n_tokens;
    double *remaining;   /* [n_kv_heads][T] future attention mass, group sum */
    float *summed;       /* [T] scratch */
    int32_t *candidates; /* [T] scratch */
} OracleFuture;

static const ParamSpec oracle_future_params[] = {
    {"budget", PARAM_INT, offsetof(OracleFutureParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time, the current one included"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static Policy *oracle_future_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    OracleFuture *o = kv_calloc(1, sizeof *o);
    policy_base_init(&o->base, &policy_oracle_future, L);
    o->base.is_oracle = true;
    o->base.want_decode_mass = true;
    o->budget = ((const OracleFutureParams *)params)->budget;
    o->group = L->group;
    o->n_tokens = L->n_tokens;
    o->remaining = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *o->remaining);
    o->summed = kv_malloc((size_t)L->n_tokens * sizeof *o->summed);
    o->candidates = kv_malloc((size_t)L->n_tokens * sizeof *o->candidates);
    return &o->base;
}

static void oracle_future_prefill(Policy *p, const PrefillView *pv)
{
    OracleFuture *o = (OracleFuture *)p;
    int T = o->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        double *remaining = o->remaining + (size_t)g * T;
        if (pv->chunk_start == 0) { /* the first chunk: the whole future is still to come */
            rank_sum_rows(pv->decode_mass + (size_t)g * o->group * T, o->group, T, T, 1.0f,
                          o->summed);
            for (int j = 0; j < T; j++)
                remaining[j] = o->summed[j];
        }
        /* The candidates, ascending: what is cached (all before the chunk), then the chunk. */
        int n = kvcache_positions(c, o->candidates);
        for (int j = pv->chunk_start; j < pv->chunk_end; j++)
            o->candidates[n++] = j;
        int keep = n < o->budget - 1 ? n : o->budget - 1;
        rank_keep_best(o->candidates, n, keep, remaining);
        kvcache_clear(c);
        for (int i = 0; i < keep; i++)
            kvcache_add(c, o->candidates[i]);
    }
}

static void oracle_future_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void oracle_future_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)attn;
    OracleFuture *o = (OracleFuture *)p;
    int n = sv->t + 1, T = o->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        double *remaining = o->remaining + (size_t)g * T;
        /* Only cached tokens can ever matter again: evicted ones never return. */
        rank_sum_rows(sv->full_attn + (size_t)g * o->group * T, o->group, n, T, 1.0f, o->summed);
        for (int s = 0; s < c->n; s++)
            if (c->pos[s] >= 0)
                remaining[c->pos[s]] -= o->summed[c->pos[s]];
        while (c->n > o->budget - 1) {
            int worst = rank_worst_slot(c, remaining, sv->t);
            if (worst < 0)
                break;
            kvcache_remove_slot(c, worst);
        }
    }
}

static void oracle_future_destroy(Policy *p)
{
    OracleFuture *o = (OracleFuture *)p;
    free(o->remaining);
    free(o->summed);
    free(o->candidates);
    policy_base_free(p);
    free(o);
}

static long oracle_future_max_slots(const void *params, const LayerView *L, int t)
{
    const OracleFutureParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const oracle_future_conformance[] = {"budget=32", "budget=24", NULL};

const PolicyType policy_oracle_future = {
    .name = "oracle_future",
    .description = "oracle: permanent eviction of the token of least remaining future attention",
    .params_size = sizeof(OracleFutureParams),
    .params = oracle_future_params,
    .create = oracle_future_create,
    .prefill = oracle_future_prefill,
    .step = oracle_future_step,
    .observe = oracle_future_observe,
    .destroy = oracle_future_destroy,
    .max_slots = oracle_future_max_slots,
    .conformance = oracle_future_conformance,
};
