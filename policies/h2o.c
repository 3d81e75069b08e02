/* h2o — Heavy-Hitter Oracle: the `recent` most recent tokens (the current one included) plus
 * the `heavy` tokens outside that window with the highest accumulated attention.
 *
 * heavy = floor(budget * heavy_ratio), recent = budget - heavy. A token's score is the sum, over
 * every query that attended over it so far and over the query heads of its KV group, of the
 * attention that query computed over the actual cache (a real engine sees nothing else). A
 * prefill chunk's queries add their attention over the cache and the chunk (prefill_mass) to
 * the scores of the tokens they see, and after every chunk (of any span) the cache and the
 * chunk are cut to budget - 1 tokens, the last recent - 1 kept, so that the next token fits: the
 * state query chunk_end - 1's eviction would leave. Eviction follows the attention: after query
 * t attended, the cache is cut to budget - 1 by dropping, one at a time, the lowest-scored token
 * outside the next step's recent window (ties: the older). With `accumulate = mean` a token is
 * ranked by its score divided by the number of queries that saw it (kvpress's
 * ObservedAttentionPress): the chunk's queries i >= j inside the layer's window, and each decode
 * query that attended over it with j inside its window. `gqa` reduces a query's attention over
 * the group's query heads: sum (the default, above), mean or max (for a prefill chunk: of each
 * head's sum over the chunk's queries). */
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"
#include "policies/rank.h"
#include "sim/base/attention.h"

extern const PolicyType policy_h2o;

enum { H2O_ACCUMULATE_SUM = 0, H2O_ACCUMULATE_MEAN = 1 };

typedef struct {
    int budget;
    double heavy_ratio;
    int accumulate;
    int gqa;
} H2oParams;

typedef struct {
    Policy base;
    int budget, heavy, recent;
    int group, n_tokens, window, gqa;
    double *score;      /* [n_kv_heads][T] accumulated attention, group sum */
    /* accumulate = mean only (NULL otherwise): [n_kv_heads][T] the queries that saw each token,
     * and score / seen, by which tokens are then ranked. */
    double *seen, *mean;
    float *slot_score;  /* [T] scratch: one query's group-summed attention per slot */
    int32_t *candidates; /* [T] scratch */
} H2o;

static const ParamSpec h2o_params[] = {
    {"budget", PARAM_INT, offsetof(H2oParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time, the current one included"},
    {"heavy_ratio", PARAM_DOUBLE, offsetof(H2oParams, heavy_ratio), "0.5", 0, 1, NULL,
     "share of the budget given to heavy hitters; the rest is the recent window"},
    {"accumulate", PARAM_ENUM, offsetof(H2oParams, accumulate), "sum", 0, 0, "sum|mean",
     "sum: attention summed over the queries (H2O); mean: divided by the queries that saw the "
     "token (kvpress ObservedAttentionPress)"},
    {"gqa", PARAM_ENUM, offsetof(H2oParams, gqa), "sum", 0, 0, RANK_GQA_CHOICES,
     "reduction of a query's attention over the KV group's query heads: sum, mean or max"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int heavy_count(const H2oParams *prm)
{
    return (int)(prm->budget * prm->heavy_ratio);
}

static int h2o_validate(const void *params, KvErr *err)
{
    const H2oParams *prm = params;
    if (prm->budget - heavy_count(prm) < 1)
        return kv_fail(err,
                       "heavy_ratio = %g leaves no recent slot of budget = %d: the current token "
                       "needs one (use heavy_ratio < 1)",
                       prm->heavy_ratio, prm->budget);
    return 0;
}

static Policy *h2o_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    const H2oParams *prm = params;
    H2o *h = kv_calloc(1, sizeof *h);
    policy_base_init(&h->base, &policy_h2o, L);
    h->base.want_prefill_mass = true;
    h->budget = prm->budget;
    h->heavy = heavy_count(prm);
    h->recent = prm->budget - h->heavy;
    h->group = L->group;
    h->n_tokens = L->n_tokens;
    h->window = L->window;
    h->gqa = prm->gqa;
    h->score = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *h->score);
    if (prm->accumulate == H2O_ACCUMULATE_MEAN) {
        h->seen = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *h->seen);
        h->mean = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *h->mean);
    }
    h->slot_score = kv_malloc((size_t)L->n_tokens * sizeof *h->slot_score);
    h->candidates = kv_malloc((size_t)L->n_tokens * sizeof *h->candidates);
    return &h->base;
}

/* The scores tokens are ranked by: the accumulated attention, or its mean over the viewers. */
static const double *rank_by(const H2o *h, int g)
{
    return (h->mean ? h->mean : h->score) + (size_t)g * h->n_tokens;
}

/* accumulate = mean: `viewers` more queries saw token j of KV head g (its score is updated). */
static void see(H2o *h, int g, int j, double viewers)
{
    size_t at = (size_t)g * h->n_tokens + j;
    h->seen[at] += viewers;
    h->mean[at] = h->seen[at] > 0 ? h->score[at] / h->seen[at] : 0.0;
}

/* The chunk's queries i that see token j: j <= i, and j inside query i's window
 * (i <= j + window - 1 on a sliding-window layer). */
static double chunk_viewers(const H2o *h, const PrefillView *pv, int j)
{
    long lo = j > pv->chunk_start ? j : pv->chunk_start, hi = pv->chunk_end;
    if (h->window > 0 && (long)j + h->window < hi)
        hi = (long)j + h->window;
    return hi > lo ? (double)(hi - lo) : 0.0;
}

static void h2o_prefill(Policy *p, const PrefillView *pv)
{
    H2o *h = (H2o *)p;
    int c1 = pv->chunk_end;
    /* After a chunk the cache is what it would be after query c1-1's eviction: the last
     * recent-1 tokens and the best of the others by accumulated attention, budget - 1 in all. */
    int window_start = c1 - (h->recent - 1);
    if (window_start < 0)
        window_start = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        double *score = h->score + (size_t)g * h->n_tokens;
        rank_reduce_rows(pv->prefill_mass + (size_t)g * h->group * c1, h->group, c1, c1, h->gqa,
                         h->slot_score);
        /* The candidates, ascending: what is cached (all before the chunk), then the chunk. */
        int n = kvcache_positions(c, h->candidates), n_old = 0;
        for (int j = pv->chunk_start; j < c1; j++)
            h->candidates[n++] = j;
        for (int i = 0; i < n; i++) {
            score[h->candidates[i]] += h->slot_score[h->candidates[i]];
            n_old += h->candidates[i] < window_start;
        }
        if (h->mean)
            for (int i = 0; i < n; i++)
                see(h, g, h->candidates[i], chunk_viewers(h, pv, h->candidates[i]));
        int keep = n <= h->budget - 1 ? n_old : h->budget - 1 - (n - n_old);
        rank_keep_best(h->candidates, n_old, keep, rank_by(h, g));
        kvcache_clear(c);
        for (int i = 0; i < keep && i < n_old; i++)
            kvcache_add(c, h->candidates[i]);
        for (int i = n_old; i < n; i++)
            kvcache_add(c, h->candidates[i]);
    }
}

static void h2o_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void h2o_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    H2o *h = (H2o *)p;
    /* Tokens after this one stay in the next step's recent window (t+1-recent, t+1]. */
    int last_candidate = sv->t + 1 - h->recent;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        double *score = h->score + (size_t)g * h->n_tokens;
        rank_reduce_rows(attn[g], h->group, c->n, c->n, h->gqa, h->slot_score);
        for (int s = 0; s < c->n; s++)
            if (c->pos[s] >= 0)
                score[c->pos[s]] += h->slot_score[s];
        if (h->mean) {
            int first = attn_first_key(h->window, sv->t);
            for (int s = 0; s < c->n; s++)
                if (c->pos[s] >= 0)
                    see(h, g, c->pos[s], c->pos[s] >= first ? 1.0 : 0.0);
        }
        while (c->n > h->budget - 1) {
            int worst = rank_worst_slot(c, rank_by(h, g), last_candidate);
            if (worst < 0)
                break;
            kvcache_remove_slot(c, worst);
        }
    }
}

static void h2o_destroy(Policy *p)
{
    H2o *h = (H2o *)p;
    free(h->score);
    free(h->seen);
    free(h->mean);
    free(h->slot_score);
    free(h->candidates);
    policy_base_free(p);
    free(h);
}

static long h2o_max_slots(const void *params, const LayerView *L, int t)
{
    const H2oParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const h2o_conformance[] = {"budget=32", "budget=32 heavy_ratio=0.25",
                                              "budget=32 accumulate=mean",
                                              "budget=32 gqa=max", "budget=32 gqa=mean", NULL};

const PolicyType policy_h2o = {
    .name = "h2o",
    .description = "heavy hitters by accumulated attention plus a recent window",
    .params_size = sizeof(H2oParams),
    .params = h2o_params,
    .validate = h2o_validate,
    .create = h2o_create,
    .prefill = h2o_prefill,
    .step = h2o_step,
    .observe = h2o_observe,
    .destroy = h2o_destroy,
    .max_slots = h2o_max_slots,
    .conformance = h2o_conformance,
};
