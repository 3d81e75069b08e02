/* keydiff — kvpress's KeyDiffPress: the tokens whose keys are least similar to the mean key are
 * kept. With the candidates C of a compression (policies/press.h) and KV head g's keys k_j,
 * anchor = (1/|C|) sum_{j in C} k_j / ||k_j||, score(j) = -cos(k_j, anchor); a key of norm 0
 * (or a zero anchor) has cosine 0. Compression and decode: policies/press.h. */
#include <math.h>
#include <stdlib.h>

#include "policies/press.h"

extern const PolicyType policy_keydiff;

/* Below this norm a vector counts as zero (torch's F.normalize clamps its norm at 1e-12). */
static const double KEYDIFF_EPS = 1e-12;

static const float *key_of(const LayerView *L, int g, int pos)
{
    return L->k + ((size_t)g * L->n_tokens + pos) * L->head_dim;
}

static double norm_of(const float *k, int D)
{
    double sq = 0;
    for (int d = 0; d < D; d++)
        sq += (double)k[d] * k[d];
    return sqrt(sq);
}

static void keydiff_score(const void *params, const PrefillView *pv, int g, const int32_t *cand,
                          int n, double *score_at)
{
    (void)params;
    const LayerView *L = pv->L;
    int D = L->head_dim;
    double *anchor = kv_calloc((size_t)D, sizeof *anchor);
    for (int i = 0; i < n; i++) {
        const float *k = key_of(L, g, cand[i]);
        double norm = norm_of(k, D);
        if (norm < KEYDIFF_EPS)
            continue;
        for (int d = 0; d < D; d++)
            anchor[d] += k[d] / norm / n;
    }
    double anchor_norm = 0;
    for (int d = 0; d < D; d++)
        anchor_norm += anchor[d] * anchor[d];
    anchor_norm = sqrt(anchor_norm);
    for (int i = 0; i < n; i++) {
        const float *k = key_of(L, g, cand[i]);
        double norm = norm_of(k, D), dot = 0;
        for (int d = 0; d < D; d++)
            dot += k[d] * anchor[d];
        double denom = norm * anchor_norm;
        score_at[cand[i]] = denom < KEYDIFF_EPS ? 0.0 : -dot / denom;
    }
    free(anchor);
}

static Policy *keydiff_create(const void *params, const LayerView *L, const PolicyEnv *env,
                              KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    return press_create(&policy_keydiff, keydiff_score, params, L);
}

static const char *const keydiff_conformance[] = {
    "budget=32 window=8",
    "budget=32 window=0 decode=grow",
    NULL,
};

const PolicyType policy_keydiff = {
    .name = "keydiff",
    .description = "span compressed to the keys least similar to the mean key (kvpress KeyDiffPress)",
    .params_size = sizeof(PressParams),
    .params = press_params,
    .validate = press_validate,
    .create = keydiff_create,
    .prefill = press_prefill,
    .step = press_step,
    .observe = press_observe,
    .destroy = press_destroy,
    .max_slots = press_max_slots,
    .conformance = keydiff_conformance,
    .scorer = &press_scorer,
};
