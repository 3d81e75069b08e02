/* tova — Token Omission Via Attention: once the cache is full, each step evicts the token the
 * current query attends to least.
 *
 * Score of a cached token: the attention query t computed over the actual cache, averaged over
 * the query heads of the KV group (`heads = group`, the default: each KV head chooses for
 * itself), or over all query heads of the layer (`heads = layer`: one choice for every KV head,
 * as the reference implementation does). Every cached token is a candidate, the current one
 * included. Eviction follows the attention: after query t attended, the cache is cut to
 * budget - 1 (ties: the older token goes), so that |cache| <= budget at every attention. After
 * every prefill chunk (of any span) the cache and the chunk are cut to budget - 1 by the same
 * rule applied to the chunk's last query's attention (over the cache and the chunk). With
 * `heads = group`, `gqa` is the reduction over the group's query heads: mean (the default,
 * above), sum or max; `heads = layer` averages over the layer's query heads. */
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"
#include "policies/rank.h"

extern const PolicyType policy_tova;

enum { TOVA_HEADS_GROUP = 0, TOVA_HEADS_LAYER = 1 };

typedef struct {
    int budget;
    int heads;
    int gqa;
} TovaParams;

typedef struct {
    Policy base;
    TovaParams prm;
    int group, n_q_heads, n_tokens;
    double *score;       /* [n_kv_heads][T] (layer mode: [T]) current query's attention */
    float *slot_score;   /* [T] scratch */
    int32_t *candidates; /* [T] scratch */
} Tova;

static const ParamSpec tova_params[] = {
    {"budget", PARAM_INT, offsetof(TovaParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time, the current one included"},
    {"heads", PARAM_ENUM, offsetof(TovaParams, heads), "group", 0, 0, "group|layer",
     "attention averaged over the KV head's group (group) or over the whole layer (layer)"},
    {"gqa", PARAM_ENUM, offsetof(TovaParams, gqa), "mean", 0, 0, RANK_GQA_CHOICES,
     "heads = group: reduction over the group's query heads: mean, sum or max"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int tova_validate(const void *params, KvErr *err)
{
    const TovaParams *prm = params;
    if (prm->heads == TOVA_HEADS_LAYER && prm->gqa != RANK_GQA_MEAN)
        return kv_fail(err, "gqa applies to heads = group (heads = layer averages over the "
                            "layer's query heads): expected gqa = mean");
    return 0;
}

/* The scores of one query's attention rows a ([group][lda]) over n keys into out. */
static void reduce(const Tova *v, const float *a, int n, int lda, float *out)
{
    if (v->prm.heads == TOVA_HEADS_LAYER)
        rank_sum_rows(a, v->group, n, lda, 1.0f / (float)v->n_q_heads, out);
    else
        rank_reduce_rows(a, v->group, n, lda, v->prm.gqa, out);
}

static Policy *tova_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    Tova *v = kv_calloc(1, sizeof *v);
    policy_base_init(&v->base, &policy_tova, L);
    v->prm = *(const TovaParams *)params;
    v->base.want_prefill_rows = 1;
    v->group = L->group;
    v->n_q_heads = L->n_q_heads;
    v->n_tokens = L->n_tokens;
    v->score = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *v->score);
    v->slot_score = kv_malloc((size_t)L->n_tokens * sizeof *v->slot_score);
    v->candidates = kv_malloc((size_t)L->n_tokens * sizeof *v->candidates);
    return &v->base;
}

/* The scores KV head g chooses by: its own, or in layer mode the one array of the layer. */
static double *scores_of(Tova *v, int g)
{
    return v->score + (v->prm.heads == TOVA_HEADS_LAYER ? 0 : (size_t)g * v->n_tokens);
}

static void tova_prefill(Policy *p, const PrefillView *pv)
{
    Tova *v = (Tova *)p;
    int c1 = pv->chunk_end;
    bool layer = v->prm.heads == TOVA_HEADS_LAYER;
    /* obs_attn holds one row per query head: the chunk's last query's attention, zero on the
     * positions its KV head does not hold. */
    for (int g = 0; g < p->n_kv_heads; g++) {
        double *score = scores_of(v, g);
        reduce(v, pv->obs_attn + (size_t)g * v->group * c1, c1, c1, v->slot_score);
        for (int j = 0; j < c1; j++)
            score[j] = (layer && g > 0 ? score[j] : 0.0) + v->slot_score[j];
    }
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        /* The candidates, ascending: what is cached (all before the chunk), then the chunk. */
        int n = kvcache_positions(c, v->candidates);
        for (int j = pv->chunk_start; j < c1; j++)
            v->candidates[n++] = j;
        int keep = n < v->prm.budget - 1 ? n : v->prm.budget - 1;
        rank_keep_best(v->candidates, n, keep, scores_of(v, g));
        kvcache_clear(c);
        for (int i = 0; i < keep; i++)
            kvcache_add(c, v->candidates[i]);
    }
}

static void tova_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void tova_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    Tova *v = (Tova *)p;
    bool layer = v->prm.heads == TOVA_HEADS_LAYER;
    if (p->cache[0].n <= v->prm.budget - 1)
        return;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        double *score = scores_of(v, g);
        reduce(v, attn[g], c->n, c->n, v->slot_score);
        for (int s = 0; s < c->n; s++)
            if (c->pos[s] >= 0)
                score[c->pos[s]] = (layer && g > 0 ? score[c->pos[s]] : 0.0) + v->slot_score[s];
    }
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        const double *score = scores_of(v, g);
        while (c->n > v->prm.budget - 1) {
            int worst = rank_worst_slot(c, score, sv->t);
            if (worst < 0)
                break;
            kvcache_remove_slot(c, worst);
        }
    }
}

static void tova_destroy(Policy *p)
{
    Tova *v = (Tova *)p;
    free(v->score);
    free(v->slot_score);
    free(v->candidates);
    policy_base_free(p);
    free(v);
}

static long tova_max_slots(const void *params, const LayerView *L, int t)
{
    const TovaParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const tova_conformance[] = {"budget=32", "budget=32 heads=layer",
                                               "budget=32 gqa=max", "budget=32 gqa=sum", NULL};

const PolicyType policy_tova = {
    .name = "tova",
    .description = "evicts the token the current query attends to least (group-mean attention)",
    .params_size = sizeof(TovaParams),
    .params = tova_params,
    .validate = tova_validate,
    .create = tova_create,
    .prefill = tova_prefill,
    .step = tova_step,
    .observe = tova_observe,
    .destroy = tova_destroy,
    .max_slots = tova_max_slots,
    .conformance = tova_conformance,
};
