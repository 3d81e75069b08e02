/* r_kv — R-KV (redundancy-aware KV cache compression for reasoning models): during decode the
 * cache grows to budget + buffer tokens and is then cut back to budget, keeping the last `window`
 * tokens and the best of the others by attention importance minus key redundancy.
 *
 * A compression of KV head g's cache (n tokens in position order, the window its last `window`):
 *   importance: for each window query i and each cached key j outside the window, the logits
 *     attn_scale * q_h,i . k_j reduced over the group's query heads h (`gqa`: max, R-KV's
 *     default, mean or sum), a softmax over those keys, the mean over the window's queries, then
 *     max-pooled over the `kernel` neighbours in cache order;
 *   redundancy: S = the cosine similarities of the n cached keys (k / (||k|| + 1e-8)), diagonal 0;
 *     in each row i the entry of its last column j with S[i][j] > threshold (column 0 when there
 *     is none) set to 0; red(j) = the softmax over j of the column means (1/n) sum_i S[i][j];
 *   score(j) = lambda * importance(j) - (1 - lambda) * red(j); the window and the best
 *     budget - window tokens outside it by score are kept (ties: the later position).
 * Decode: after query t attended, a cache of budget + buffer tokens or more is compressed (the
 * window: [t - window + 1, t]), so a cache holds at most budget + buffer slots at an attention.
 * Prefill: chunks are admitted whole; at a span's last chunk a cache of more than budget tokens is
 * compressed the same way (the window: the span's last tokens), so that a long prompt starts the
 * decode at the budget. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"
#include "policies/rank.h"

extern const PolicyType policy_r_kv;

typedef struct {
    int budget;
    int window;
    int kernel;
    double lambda;
    int buffer;
    double threshold;
    int gqa;
} RkvParams;

static const ParamSpec r_kv_params[] = {
    {"budget", PARAM_INT, offsetof(RkvParams, budget), "512", 2, 1 << 30, NULL,
     "tokens per KV head after a compression (window included)"},
    {"window", PARAM_INT, offsetof(RkvParams, window), "8", 1, 1 << 20, NULL,
     "last tokens kept at a compression, whose queries score the others (window_size)"},
    {"kernel", PARAM_INT, offsetof(RkvParams, kernel), "7", 1, 1 << 20, NULL,
     "width of the max-pooling of the importance over neighbouring tokens (odd)"},
    {"lambda", PARAM_DOUBLE, offsetof(RkvParams, lambda), "0.07", 0, 1, NULL,
     "weight of the importance; 1 - lambda weighs the redundancy (mix_lambda)"},
    {"buffer", PARAM_INT, offsetof(RkvParams, buffer), "128", 1, 1 << 30, NULL,
     "tokens the cache grows by between compressions"},
    {"threshold", PARAM_DOUBLE, offsetof(RkvParams, threshold), "0.5", -1, 1, NULL,
     "cosine above which a key's last similar key is not counted against it"},
    {"gqa", PARAM_ENUM, offsetof(RkvParams, gqa), "max", 0, 0, RANK_GQA_CHOICES,
     "reduction of the group's query heads' logits (R-KV's pooling: max)"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

typedef struct {
    Policy base;
    RkvParams prm;
    const LayerView *L;
    /* scratch of one compression, n <= T cached tokens */
    int32_t *pos;   /* [T] cached positions, ascending */
    double *score;  /* [T] by position */
    double *imp, *pooled, *colmean; /* [T] */
    double *row;    /* [T] one row of the similarity matrix */
    float *logit;   /* [group][T] */
    float *reduced; /* [T] */
    double *unit;   /* [T][D] unit keys */
} Rkv;

static int r_kv_validate(const void *params, KvErr *err)
{
    const RkvParams *prm = params;
    if (prm->kernel % 2 == 0)
        return kv_fail(err, "kernel = %d: expected an odd width (a window centred on the token)",
                       prm->kernel);
    if (prm->window >= prm->budget)
        return kv_fail(err,
                       "window = %d must be below budget = %d: a compression keeps the window "
                       "and chooses the rest",
                       prm->window, prm->budget);
    return 0;
}

static Policy *r_kv_create(const void *params, const LayerView *L, const PolicyEnv *env,
                           KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    Rkv *r = kv_calloc(1, sizeof *r);
    policy_base_init(&r->base, &policy_r_kv, L);
    r->prm = *(const RkvParams *)params;
    r->L = L;
    size_t T = (size_t)L->n_tokens;
    r->pos = kv_malloc(T * sizeof *r->pos);
    r->score = kv_malloc(T * sizeof *r->score);
    r->imp = kv_malloc(T * sizeof *r->imp);
    r->pooled = kv_malloc(T * sizeof *r->pooled);
    r->colmean = kv_malloc(T * sizeof *r->colmean);
    r->row = kv_malloc(T * sizeof *r->row);
    r->logit = kv_malloc((size_t)L->group * T * sizeof *r->logit);
    r->reduced = kv_malloc(T * sizeof *r->reduced);
    r->unit = kv_malloc(T * (size_t)L->head_dim * sizeof *r->unit);
    return &r->base;
}

static const float *key_of(const LayerView *L, int g, int pos)
{
    return L->k + ((size_t)g * L->n_tokens + pos) * L->head_dim;
}

/* Cuts KV head g's cache to the budget: its last `window` positions (the newest) and the best
 * of the others by score. */
static void compress(Rkv *r, int g)
{
    const LayerView *L = r->L;
    KVCache *c = &r->base.cache[g];
    int D = L->head_dim, W = r->prm.window, G = L->group;
    int n = kvcache_positions(c, r->pos), m = n - W; /* m candidates before the window */
    /* Importance: the window's queries over the candidates. */
    for (int j = 0; j < m; j++)
        r->imp[j] = 0.0;
    for (int w = 0; w < W; w++) {
        int i = r->pos[m + w];
        for (int a = 0; a < G; a++) {
            const float *q = L->q + ((size_t)(g * G + a) * L->n_tokens + i) * D;
            for (int j = 0; j < m; j++) {
                const float *k = key_of(L, g, r->pos[j]);
                double s = 0;
                for (int d = 0; d < D; d++)
                    s += (double)q[d] * k[d];
                r->logit[(size_t)a * m + j] = (float)(L->attn_scale * s);
            }
        }
        rank_reduce_rows(r->logit, G, m, m, r->prm.gqa, r->reduced);
        float top = -INFINITY;
        for (int j = 0; j < m; j++)
            top = r->reduced[j] > top ? r->reduced[j] : top;
        double sum = 0;
        for (int j = 0; j < m; j++)
            sum += exp((double)r->reduced[j] - top);
        for (int j = 0; j < m; j++)
            r->imp[j] += exp((double)r->reduced[j] - top) / sum / W;
    }
    int half = r->prm.kernel / 2;
    for (int j = 0; j < m; j++) {
        double best = r->imp[j];
        for (int i = j - half; i <= j + half; i++)
            if (i >= 0 && i < m && r->imp[i] > best)
                best = r->imp[i];
        r->pooled[j] = best;
    }
    /* Redundancy over all n cached keys. */
    for (int i = 0; i < n; i++) {
        const float *k = key_of(L, g, r->pos[i]);
        double norm = 0;
        for (int d = 0; d < D; d++)
            norm += (double)k[d] * k[d];
        norm = sqrt(norm) + 1e-8;
        for (int d = 0; d < D; d++)
            r->unit[(size_t)i * D + d] = k[d] / norm;
    }
    for (int j = 0; j < n; j++)
        r->colmean[j] = 0.0;
    for (int i = 0; i < n; i++) {
        double *S = r->row; /* row i, by cache index */
        int last = 0;
        for (int j = 0; j < n; j++) {
            double s = 0;
            if (j != i)
                for (int d = 0; d < D; d++)
                    s += r->unit[(size_t)i * D + d] * r->unit[(size_t)j * D + d];
            S[j] = s;
            if (s > r->prm.threshold)
                last = j;
        }
        S[last] = 0.0;
        for (int j = 0; j < n; j++)
            r->colmean[j] += S[j] / n;
    }
    double top = -INFINITY, sum = 0;
    for (int j = 0; j < n; j++)
        top = r->colmean[j] > top ? r->colmean[j] : top;
    for (int j = 0; j < n; j++)
        sum += exp(r->colmean[j] - top);
    double lambda = r->prm.lambda;
    for (int j = 0; j < m; j++)
        r->score[r->pos[j]] =
            lambda * r->pooled[j] - (1 - lambda) * exp(r->colmean[j] - top) / sum;
    int keep = r->prm.budget - W;
    rank_keep_best(r->pos, m, keep, r->score);
    for (int j = keep; j < m; j++)
        kvcache_remove(c, r->pos[j]);
}

static void r_kv_prefill(Policy *p, const PrefillView *pv)
{
    Rkv *r = (Rkv *)p;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        for (int j = pv->chunk_start; j < pv->chunk_end; j++)
            kvcache_add(c, j);
        if (pv->last_chunk && c->n > r->prm.budget)
            compress(r, g);
    }
}

static void r_kv_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void r_kv_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)sv;
    (void)attn;
    Rkv *r = (Rkv *)p;
    for (int g = 0; g < p->n_kv_heads; g++)
        if (p->cache[g].n >= r->prm.budget + r->prm.buffer)
            compress(r, g);
}

static void r_kv_destroy(Policy *p)
{
    Rkv *r = (Rkv *)p;
    free(r->pos);
    free(r->score);
    free(r->imp);
    free(r->pooled);
    free(r->colmean);
    free(r->row);
    free(r->logit);
    free(r->reduced);
    free(r->unit);
    policy_base_free(p);
    free(r);
}

static long r_kv_max_slots(const void *params, const LayerView *L, int t)
{
    const RkvParams *prm = params;
    (void)L;
    (void)t;
    return (long)prm->budget + prm->buffer;
}

static const char *const r_kv_conformance[] = {
    "budget=24 window=4 buffer=8",
    "budget=24 window=6 buffer=5 kernel=3 lambda=0.5 gqa=mean",
    "budget=20 window=2 buffer=1 kernel=1 threshold=0.2 gqa=sum",
    NULL,
};

const PolicyType policy_r_kv = {
    .name = "r_kv",
    .description = "R-KV: compressed every buffer decode tokens by attention importance minus "
                   "key redundancy",
    .params_size = sizeof(RkvParams),
    .params = r_kv_params,
    .validate = r_kv_validate,
    .create = r_kv_create,
    .prefill = r_kv_prefill,
    .step = r_kv_step,
    .observe = r_kv_observe,
    .destroy = r_kv_destroy,
    .max_slots = r_kv_max_slots,
    .conformance = r_kv_conformance,
};
