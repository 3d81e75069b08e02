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
    int32_t *best0;      /* [T] scratch: this instance's choice in oracle_topk_step_many */
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
    o->best0 = kv_malloc((size_t)L->n_tokens * sizeof *o->best0);
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

static void oracle_topk_step(Policy *p, const StepView *sv)
{
    OracleTopk *o = (OracleTopk *)p;
    int n = sv->t + 1, keep = keep_at(o, n);
    for (int g = 0; g < p->n_kv_heads; g++) {
        score_keys(o, sv, g, n);
        rank_keep_best(o->candidates, n, keep, o->score);
        keep_chosen(o, g, o->candidates, keep);
    }
}

/* Instances of any budgets at once (a sweep's): the scores are the same row for all, so one
 * score and one selection for every budget (rank_keep_best_many gives each budget's choice in
 * the order its own rank_keep_best would), then each instance's cache as its step leaves it. */
static void oracle_topk_step_many(Policy *const *ps, int n_inst, const StepView *sv)
{
    OracleTopk *o = (OracleTopk *)ps[0];
    int n = sv->t + 1;
    int keep[n_inst];
    int32_t *best[n_inst];
    for (int i = 0; i < n_inst; i++) {
        OracleTopk *oi = (OracleTopk *)ps[i];
        keep[i] = keep_at(oi, n);
        /* instance 0's candidates are the selection's working array: its choice goes apart */
        best[i] = i == 0 ? o->best0 : oi->candidates;
    }
    for (int g = 0; g < o->base.n_kv_heads; g++) {
        score_keys(o, sv, g, n);
        rank_keep_best_many(o->candidates, n, keep, n_inst, o->score, best);
        for (int i = 0; i < n_inst; i++)
            keep_chosen((OracleTopk *)ps[i], g, best[i], keep[i]);
    }
}

/* Keep order (policy.h): the cached positions by score, best first. Every instance holds the
 * first keep_at(t + 1) of all positions [0, t] in that order, whatever its budget. */
static int oracle_topk_keep_order(Policy *p, const StepView *sv, int g, int32_t *pos)
{
    OracleTopk *o = (OracleTopk *)p;
    const KVCache *c = &p->cache[g];
    int n = 0;
    for (int s = 0; s < c->n; s++) /* in slot order: the sort below orders them */
        pos[n++] = c->pos[s];
    score_keys(o, sv, g, sv->t + 1);
    rank_sort_best(pos, n, o->score);
    return n;
}

static void oracle_topk_destroy(Policy *p)
{
    OracleTopk *o = (OracleTopk *)p;
    free(o->summed);
    free(o->score);
    free(o->candidates);
    free(o->chosen);
    free(o->best0);
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
