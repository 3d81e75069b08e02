/* oracle_topk — upper bound for query-aware retrieval: at every step the cache is the `budget`
 * keys with the highest true attention of the current query.
 *
 * Score of token j <= t for KV head g: the sum over the group's query heads of query t's true
 * attention (sv->full_attn) on j. The group's mean retained mass is (1/group) times the sum of
 * these scores over the cached tokens, so the top `budget` by this sum maximise it exactly: no
 * method that attends over at most `budget` real tokens can retain more. Nothing is ever lost:
 * every step chooses afresh among all tokens [0, t] (ties: the later position), the current one
 * included only if it ranks. The state after a prefill chunk does not matter; after every chunk
 * (of any span) it holds the last budget - 1 tokens. An oracle: it reads the true attention,
 * which no method can. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"
#include "policies/rank.h"

extern const PolicyType policy_oracle_topk;

typedef struct {
    int budget;
} OracleTopkParams;

typedef struct {
    Policy base;
    int budget, group, n_tokens;
    float *summed;       /* [T] scratch */
    double *score;       /* [T] scratch */
    int32_t *candidates; /* [T] scratch */
    uint8_t *chosen;     /* [T] scratch */
    int room;            /* min(budget, T): the most a cache holds */
    int32_t *order;      /* [n_kv_heads][room]: each cache's positions in keep order */
    int order_t;         /* the step `order` is of (-1: none yet) */
} OracleTopk;

static const ParamSpec oracle_topk_params[] = {
    {"budget", PARAM_INT, offsetof(OracleTopkParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static Policy *oracle_topk_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    OracleTopk *o = kv_calloc(1, sizeof *o);
    policy_base_init(&o->base, &policy_oracle_topk, L);
    o->base.is_oracle = true;
    o->budget = ((const OracleTopkParams *)params)->budget;
    o->group = L->group;
    o->n_tokens = L->n_tokens;
    o->summed = kv_malloc((size_t)L->n_tokens * sizeof *o->summed);
    o->score = kv_malloc((size_t)L->n_tokens * sizeof *o->score);
    o->candidates = kv_malloc((size_t)L->n_tokens * sizeof *o->candidates);
    o->chosen = kv_calloc((size_t)L->n_tokens, sizeof *o->chosen);
    o->room = o->budget < L->n_tokens ? o->budget : L->n_tokens;
    o->order = kv_malloc((size_t)L->n_kv_heads * o->room * sizeof *o->order);
    o->order_t = -1;
    return &o->base;
}

static void oracle_topk_prefill(Policy *p, const PrefillView *pv)
{
    OracleTopk *o = (OracleTopk *)p;
    int c1 = pv->chunk_end;
    int first = c1 - (o->budget - 1) > 0 ? c1 - (o->budget - 1) : 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        kvcache_clear(&p->cache[g]);
        for (int j = first; j < c1; j++)
            kvcache_add(&p->cache[g], j);
    }
}

/* KV head g's scores of query t's keys [0, n) into o->score, and o->candidates = 0 .. n-1. */
static void score_keys(OracleTopk *o, const StepView *sv, int g, int n)
{
    rank_sum_rows(sv->full_attn + (size_t)g * o->group * o->n_tokens, o->group, n, o->n_tokens,
                  1.0f, o->summed);
    for (int j = 0; j < n; j++) {
        o->score[j] = o->summed[j];
        o->candidates[j] = j;
    }
}

/* Cache g holds best[0, keep) (what rank_keep_best chose), nothing else. */
static void keep_chosen(OracleTopk *o, int g, const int32_t *best, int keep)
{
    KVCache *c = &o->base.cache[g];
    for (int i = 0; i < keep; i++)
        o->chosen[best[i]] = 1;
    /* Drop what is no longer chosen (backwards: removal moves the last slot into the hole),
     * then add what is newly chosen, in the order chosen (the slot order follows it). */
    for (int s = c->n - 1; s >= 0; s--)
        if (c->pos[s] < 0 || !o->chosen[c->pos[s]])
            kvcache_remove_slot(c, s);
    for (int i = 0; i < keep; i++) {
        kvcache_add(c, best[i]);
        o->chosen[best[i]] = 0;
    }
}

static int keep_at(const OracleTopk *o, int n)
{
    return n < o->budget ? n : o->budget;
}

/* KV head g's cache in keep order: the first `keep` of o->candidates (rank_keep_best's choice),
 * sorted best first. */
static int32_t *sorted_choice(OracleTopk *o, int g, int keep)
{
    int32_t *order = o->order + (size_t)g * o->room;
    for (int i = 0; i < keep; i++)
        order[i] = o->candidates[i];
    rank_sort_best(order, keep, o->score);
    return order;
}

static void oracle_topk_step(Policy *p, const StepView *sv)
{
    OracleTopk *o = (OracleTopk *)p;
    int n = sv->t + 1, keep = keep_at(o, n);
    for (int g = 0; g < p->n_kv_heads; g++) {
        score_keys(o, sv, g, n);
        rank_keep_best(o->candidates, n, keep, o->score);
        sorted_choice(o, g, keep);
        keep_chosen(o, g, o->candidates, keep);
    }
    o->order_t = sv->t;
}

/* Instances of any budgets at once (a sweep's): the scores are the same row for all, and the
 * caches nest, so one score row, one selection for the largest budget and one sort of its
 * choice serve every budget: instance i keeps the first keep_i positions of that order. Each
 * cache then holds what its own step would leave it; only its slot order may differ, which
 * nothing reads (a nest is scored in keep order, and has no kv_quant). */
static void oracle_topk_step_many(Policy *const *ps, int n_inst, const StepView *sv)
{
    int n = sv->t + 1, big = 0;
    for (int i = 1; i < n_inst; i++)
        if (((OracleTopk *)ps[i])->budget > ((OracleTopk *)ps[big])->budget)
            big = i;
    OracleTopk *o = (OracleTopk *)ps[big];
    int most = keep_at(o, n);
    for (int g = 0; g < o->base.n_kv_heads; g++) {
        score_keys(o, sv, g, n);
        rank_keep_best(o->candidates, n, most, o->score);
        const int32_t *order = sorted_choice(o, g, most);
        for (int i = 0; i < n_inst; i++) {
            OracleTopk *oi = (OracleTopk *)ps[i];
            int keep = keep_at(oi, n);
            kvcache_assign(&oi->base.cache[g], order, keep); /* slots in keep order */
            if (oi != o) /* its own keep order: the first keep of the group's */
                memcpy(oi->order + (size_t)g * oi->room, order, (size_t)keep * sizeof *order);
        }
    }
    for (int i = 0; i < n_inst; i++)
        ((OracleTopk *)ps[i])->order_t = sv->t;
}

/* Keep order (policy.h): the cached positions by score, best first, as the step sorted them.
 * Every instance holds the first keep_at(t + 1) of all positions [0, t] in that order, whatever
 * its budget. */
static int oracle_topk_keep_order(Policy *p, const StepView *sv, int g, int32_t *pos)
{
    OracleTopk *o = (OracleTopk *)p;
    int n = p->cache[g].n;
    if (o->order_t != sv->t)
        return -1; /* not stepped to this step: no order to give */
    memcpy(pos, o->order + (size_t)g * o->room, (size_t)n * sizeof *pos);
    return n;
}

static void oracle_topk_destroy(Policy *p)
{
    OracleTopk *o = (OracleTopk *)p;
    free(o->summed);
    free(o->score);
    free(o->candidates);
    free(o->chosen);
    free(o->order);
    policy_base_free(p);
    free(o);
}

static long oracle_topk_max_slots(const void *params, const LayerView *L, int t)
{
    const OracleTopkParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const oracle_topk_conformance[] = {"budget=32", "budget=24", NULL};

const PolicyType policy_oracle_topk = {
    .name = "oracle_topk",
    .description = "oracle: the budget keys of highest true attention at every step",
    .params_size = sizeof(OracleTopkParams),
    .params = oracle_topk_params,
    .create = oracle_topk_create,
    .prefill = oracle_topk_prefill,
    .step = oracle_topk_step,
    .step_many = oracle_topk_step_many,
    .nest_param = "budget",
    .keep_order = oracle_topk_keep_order,
    .destroy = oracle_topk_destroy,
    .max_slots = oracle_topk_max_slots,
    .conformance = oracle_topk_conformance,
};
