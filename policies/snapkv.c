/* snapkv — SnapKV (kvpress): a prefill span is compressed once, when it is complete, to the
 * tokens its last `observation` queries attend to most, plus those queries' own tokens (the
 * observation window). Before the span's last chunk, chunks are admitted whole.
 *
 * Score of a cached token j before the window: the attention the window's queries give it (over
 * the cache and the span's last chunk), summed over the window's queries and over the query heads
 * of the KV group, then max-pooled over the `kernel` neighbours centred on j in the cache's
 * position order (so that a token's neighbours survive with it; for the prompt, its positions);
 * `pool = avg` averages instead, zero-padded at the ends (the sum over the neighbours in range
 * divided by kernel), as kvpress and the SnapKV reference do. `order = pool_reduce` pools each
 * query head's window sums first and then reduces the group (kvpress's SnapKVPress.score: per
 * head `avg_pool1d`, then the group's mean); the default `reduce_pool` reduces the group first.
 * With pool = avg and gqa = sum or mean the two orders rank alike; with max they differ.
 * The window is the last min(observation, last chunk's tokens) queries. The cache is cut to
 * budget - 1 tokens: the window and the best budget - 1 - window tokens before it (ties: the
 * later position). Decode, `decode = window` (the default): the chosen tokens before the window
 * stay until the next span's compression, and the rest of the budget is a sliding window that
 * starts with the observation window and then takes each new token, evicting its oldest token
 * after the attention, so that |cache| <= budget at every attention. `decode = grow` is the
 * published method: nothing is evicted after a span and the cache grows by one token per step. */
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"
#include "policies/rank.h"

extern const PolicyType policy_snapkv;

enum { SNAPKV_DECODE_WINDOW = 0, SNAPKV_DECODE_GROW = 1 };
enum { SNAPKV_POOL_MAX = 0, SNAPKV_POOL_AVG = 1 };
enum { SNAPKV_REDUCE_POOL = 0, SNAPKV_POOL_REDUCE = 1 };

typedef struct {
    int budget;
    int observation;
    int kernel;
    int decode;
    int pool;
    int gqa;
    int order;
} SnapkvParams;

typedef struct {
    Policy base;
    SnapkvParams prm;
    int group, n_tokens;
    /* Oldest position of the sliding part (every KV head's is the same), P - observation at
     * first: the pinned prompt tokens all lie before it. */
    int tail_oldest;
    /* [T] scratch of one compression */
    float *summed, *head_sum;
    double *score, *pooled, *pooled_at;
    double *reduced; /* order = pool_reduce: the group's reduction of its heads' pooled scores */
    int32_t *candidates;
} Snapkv;

static const ParamSpec snapkv_params[] = {
    {"budget", PARAM_INT, offsetof(SnapkvParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time, the current one included"},
    {"observation", PARAM_INT, offsetof(SnapkvParams, observation), "32", 1, 1 << 30, NULL,
     "last prompt queries whose attention selects the prompt tokens (kept themselves)"},
    {"kernel", PARAM_INT, offsetof(SnapkvParams, kernel), "7", 1, 1 << 20, NULL,
     "width of the max-pooling over neighbouring tokens' scores (odd)"},
    {"decode", PARAM_ENUM, offsetof(SnapkvParams, decode), "window", 0, 0, "window|grow",
     "window: recent tokens beyond the budget evicted oldest first; grow: no decode eviction"},
    {"pool", PARAM_ENUM, offsetof(SnapkvParams, pool), "max", 0, 0, "max|avg",
     "pooling of the neighbours' scores: max, or avg (zero-padded mean over kernel, kvpress's)"},
    {"gqa", PARAM_ENUM, offsetof(SnapkvParams, gqa), "sum", 0, 0, RANK_GQA_CHOICES,
     "reduction of the group's query heads' window sums: sum, mean or max"},
    {"order", PARAM_ENUM, offsetof(SnapkvParams, order), "reduce_pool", 0, 0,
     "reduce_pool|pool_reduce",
     "reduce_pool: the group's reduction, then pooling; pool_reduce: each head pooled, then "
     "reduced (kvpress's order)"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int snapkv_validate(const void *params, KvErr *err)
{
    const SnapkvParams *prm = params;
    if (prm->kernel % 2 == 0)
        return kv_fail(err, "kernel = %d: expected an odd width (a window centred on the token)",
                       prm->kernel);
    if (prm->observation >= prm->budget)
        return kv_fail(err,
                       "observation = %d must be below budget = %d: the window and the new "
                       "token must fit in the budget",
                       prm->observation, prm->budget);
    return 0;
}

static Policy *snapkv_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    Snapkv *s = kv_calloc(1, sizeof *s);
    policy_base_init(&s->base, &policy_snapkv, L);
    s->prm = *(const SnapkvParams *)params;
    s->base.want_prefill_rows = s->prm.observation;
    s->group = L->group;
    s->n_tokens = L->n_tokens;
    size_t T = (size_t)L->n_tokens;
    s->summed = kv_malloc(T * sizeof *s->summed);
    s->head_sum = kv_malloc(T * sizeof *s->head_sum);
    s->score = kv_malloc(T * sizeof *s->score);
    s->pooled = kv_malloc(T * sizeof *s->pooled);
    s->pooled_at = kv_malloc(T * sizeof *s->pooled_at);
    s->reduced = kv_malloc(T * sizeof *s->reduced);
    s->candidates = kv_malloc(T * sizeof *s->candidates);
    return &s->base;
}

/* pooled[j] over i in [j - kernel/2, j + kernel/2] ∩ [0, n): the max of score[i] (pool = max),
 * or their sum divided by kernel (pool = avg: the neighbours outside [0, n) count as zeros). */
static void pool_scores(const double *score, int n, int kernel, int pool, double *pooled)
{
    int half = kernel / 2;
    for (int j = 0; j < n; j++) {
        int lo = j - half < 0 ? 0 : j - half;
        int hi = j + half >= n ? n - 1 : j + half;
        double best = score[lo], sum = score[lo];
        for (int i = lo + 1; i <= hi; i++) {
            if (score[i] > best)
                best = score[i];
            sum += score[i];
        }
        pooled[j] = pool == SNAPKV_POOL_AVG ? sum / kernel : best;
    }
}

/* score_at[cand[i]]: the pooled score of KV head g's candidates cand[0, n) (the cached
 * positions before the observation window, ascending) at a span's last chunk. */
static void snapkv_scores(Snapkv *s, const PrefillView *pv, int g, const int32_t *cand, int n,
                          double *score_at)
{
    int c1 = pv->chunk_end, W = pv->obs_rows;
    int prefix = c1 - W; /* positions before the observation window */
    float *summed = s->summed, *head_sum = s->head_sum;
    if (s->prm.order == SNAPKV_POOL_REDUCE) {
        /* Each head's window sums pooled over the candidates' order, then the group's
         * reduction of the pooled scores. */
        double *reduced = s->reduced;
        for (int h0 = 0; h0 < s->group; h0++) {
            rank_sum_rows(pv->obs_attn + (size_t)(g * s->group + h0) * W * c1, W, prefix, c1,
                          1.0f, head_sum);
            for (int i = 0; i < n; i++)
                s->score[i] = head_sum[cand[i]];
            pool_scores(s->score, n, s->prm.kernel, s->prm.pool, s->pooled);
            for (int i = 0; i < n; i++)
                reduced[i] = h0 == 0 ? s->pooled[i]
                             : s->prm.gqa == RANK_GQA_MAX
                                 ? (s->pooled[i] > reduced[i] ? s->pooled[i] : reduced[i])
                                 : reduced[i] + s->pooled[i];
        }
        for (int i = 0; i < n; i++)
            score_at[cand[i]] = s->prm.gqa == RANK_GQA_MEAN ? reduced[i] / s->group : reduced[i];
        return;
    }
    /* Sum over the window's queries of each head, then the group's reduction over its heads. */
    for (int j = 0; j < prefix; j++)
        summed[j] = 0.0f;
    for (int i = 0; i < s->group; i++) {
        int h = g * s->group + i;
        rank_sum_rows(pv->obs_attn + (size_t)h * W * c1, W, prefix, c1, 1.0f, head_sum);
        if (s->prm.gqa == RANK_GQA_MAX)
            for (int j = 0; j < prefix; j++)
                summed[j] = i == 0 || head_sum[j] > summed[j] ? head_sum[j] : summed[j];
        else
            for (int j = 0; j < prefix; j++)
                summed[j] += head_sum[j];
    }
    if (s->prm.gqa == RANK_GQA_MEAN)
        for (int j = 0; j < prefix; j++)
            summed[j] /= (float)s->group;
    /* Neighbours are neighbours in the candidates' order (every position before the window for
     * the prompt). */
    for (int i = 0; i < n; i++)
        s->score[i] = summed[cand[i]];
    pool_scores(s->score, n, s->prm.kernel, s->prm.pool, s->pooled);
    for (int i = 0; i < n; i++)
        score_at[cand[i]] = s->pooled[i];
}

static void snapkv_prefill(Policy *p, const PrefillView *pv)
{
    Snapkv *s = (Snapkv *)p;
    int c1 = pv->chunk_end, W = pv->obs_rows;
    for (int g = 0; g < p->n_kv_heads; g++)
        for (int j = pv->chunk_start; j < c1; j++)
            kvcache_add(&p->cache[g], j);
    if (!pv->last_chunk)
        return; /* compressed once, when the span is complete */
    int prefix = c1 - W; /* positions before the observation window */
    s->tail_oldest = prefix;
    int keep = s->prm.budget - 1 - W;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        if (c->n <= s->prm.budget - 1)
            continue;
        /* The candidates: the cached positions before the window, ascending. */
        int n = kvcache_positions(c, s->candidates);
        while (n > 0 && s->candidates[n - 1] >= prefix)
            n--;
        snapkv_scores(s, pv, g, s->candidates, n, s->pooled_at);
        rank_keep_best(s->candidates, n, keep, s->pooled_at);
        kvcache_clear(c);
        for (int i = 0; i < keep && i < n; i++)
            kvcache_add(c, s->candidates[i]);
        for (int j = prefix; j < c1; j++)
            kvcache_add(c, j);
    }
}

static void snapkv_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void snapkv_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)attn;
    Snapkv *s = (Snapkv *)p;
    if (s->prm.decode == SNAPKV_DECODE_GROW)
        return;
    /* The sliding part holds every position in [tail_oldest, t]: evicting its oldest keeps it
     * contiguous, so the oldest is always the next position. */
    while (p->cache[0].n > s->prm.budget - 1 && s->tail_oldest <= sv->t) {
        for (int g = 0; g < p->n_kv_heads; g++)
            kvcache_remove(&p->cache[g], s->tail_oldest);
        s->tail_oldest++;
    }
}

static void snapkv_frame(const void *params, int *budget, int *window, bool *grow)
{
    const SnapkvParams *prm = params;
    *budget = prm->budget;
    *window = prm->observation;
    *grow = prm->decode == SNAPKV_DECODE_GROW;
}

static int snapkv_window_at(const Policy *p, const PrefillView *pv)
{
    (void)p;
    return pv->obs_rows;
}

static void snapkv_score(Policy *p, const PrefillView *pv, int g, const int32_t *cand, int n,
                         double *score_at)
{
    snapkv_scores((Snapkv *)p, pv, g, cand, n, score_at);
}

static const PolicyScorer snapkv_scorer = {
    .frame = snapkv_frame,
    .window_at = snapkv_window_at,
    .score = snapkv_score,
};

static void snapkv_destroy(Policy *p)
{
    Snapkv *s = (Snapkv *)p;
    free(s->summed);
    free(s->head_sum);
    free(s->score);
    free(s->pooled);
    free(s->pooled_at);
    free(s->reduced);
    free(s->candidates);
    policy_base_free(p);
    free(s);
}

static long snapkv_max_slots(const void *params, const LayerView *L, int t)
{
    const SnapkvParams *prm = params;
    return prm->decode == SNAPKV_DECODE_GROW ? (long)prm->budget + t - L->n_prompt : prm->budget;
}

static const char *const snapkv_conformance[] = {
    "budget=32 observation=8 kernel=3",
    "budget=32 observation=4 kernel=1 decode=grow",
    "budget=32 observation=8 kernel=5 pool=avg",
    "budget=32 observation=8 kernel=3 gqa=max",
    "budget=32 observation=8 kernel=5 gqa=max order=pool_reduce",
    "budget=32 observation=8 kernel=5 pool=avg gqa=mean order=pool_reduce",
    "budget=32 observation=8 kernel=3 gqa=mean decode=grow",
    NULL,
};

const PolicyType policy_snapkv = {
    .name = "snapkv",
    .description = "prompt compressed by the observation window's pooled attention; decode window",
    .params_size = sizeof(SnapkvParams),
    .params = snapkv_params,
    .validate = snapkv_validate,
    .create = snapkv_create,
    .prefill = snapkv_prefill,
    .step = snapkv_step,
    .observe = snapkv_observe,
    .destroy = snapkv_destroy,
    .max_slots = snapkv_max_slots,
    .conformance = snapkv_conformance,
    .scorer = &snapkv_scorer,
};
