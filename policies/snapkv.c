/* snapkv — SnapKV (kvpress): a prefill span is compressed once, when it is complete, to the
 * tokens its last `observation` queries attend to most, plus those queries' own tokens (the
 * observation window). Before the span's last chunk, chunks are admitted whole.
 *
 * Score of a cached token j before the window: the attention the window's queries give it (over
 * the cache and the span's last chunk), summed over the window's queries and over the query heads
 * of the KV group, then max-pooled over the `kernel` neighbours centred on j in the cache's
 * position order (so that a token's neighbours survive with it; for the prompt, its positions);
 * `pool = avg` averages instead, zero-padded at the ends (the sum over the neighbours in range
 * divided by kernel), as kvpress and the SnapKV reference do.
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

typedef struct {
    int budget;
    int observation;
    int kernel;
    int decode;
    int pool;
} SnapkvParams;

typedef struct {
    Policy base;
    SnapkvParams prm;
    int group, n_tokens;
    /* Oldest position of the sliding part (every KV head's is the same), P - observation at
     * first: the pinned prompt tokens all lie before it. */
    int tail_oldest;
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
    float *summed = kv_malloc((size_t)c1 * sizeof *summed);
    float *head_sum = kv_malloc((size_t)c1 * sizeof *head_sum);
    double *score = kv_malloc((size_t)c1 * sizeof *score);
    double *pooled = kv_malloc((size_t)c1 * sizeof *pooled);
    double *pooled_at = kv_malloc((size_t)c1 * sizeof *pooled_at); /* by position */
    int32_t *candidates = kv_malloc((size_t)c1 * sizeof *candidates);
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        if (c->n <= s->prm.budget - 1)
            continue;
        /* Sum over the window's queries of each head, then over the group's heads. */
        for (int j = 0; j < prefix; j++)
            summed[j] = 0.0f;
        for (int i = 0; i < s->group; i++) {
            int h = g * s->group + i;
            rank_sum_rows(pv->obs_attn + (size_t)h * W * c1, W, prefix, c1, 1.0f, head_sum);
            for (int j = 0; j < prefix; j++)
                summed[j] += head_sum[j];
        }
        /* The candidates: the cached positions before the window, ascending (every position
         * before it for the prompt); neighbours are neighbours in that order. */
        int n = kvcache_positions(c, candidates);
        while (n > 0 && candidates[n - 1] >= prefix)
            n--;
        for (int i = 0; i < n; i++)
            score[i] = summed[candidates[i]];
        pool_scores(score, n, s->prm.kernel, s->prm.pool, pooled);
        for (int i = 0; i < n; i++)
            pooled_at[candidates[i]] = pooled[i];
        rank_keep_best(candidates, n, keep, pooled_at);
        kvcache_clear(c);
        for (int i = 0; i < keep && i < n; i++)
            kvcache_add(c, candidates[i]);
        for (int j = prefix; j < c1; j++)
            kvcache_add(c, j);
    }
    free(pooled_at);
    free(summed);
    free(head_sum);
    free(score);
    free(pooled);
    free(candidates);
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

static void snapkv_destroy(Policy *p)
{
    Snapkv *s = (Snapkv *)p;
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
};
