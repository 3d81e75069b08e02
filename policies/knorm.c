/* knorm — kvpress's KnormPress: the tokens whose keys have the smallest L2 norm are kept,
 * score(j) = -||k_j||, a key-only score (RoPE rotates pairs of channels, so it keeps the norm
 * and the score does not depend on the position). Compression and decode: policies/press.h. */
#include <math.h>

#include "policies/press.h"

extern const PolicyType policy_knorm;

static void knorm_score(const void *params, const PrefillView *pv, int g, const int32_t *cand,
                        int n, double *score_at)
{
    (void)params;
    const LayerView *L = pv->L;
    int D = L->head_dim;
    for (int i = 0; i < n; i++) {
        const float *k = L->k + ((size_t)g * L->n_tokens + cand[i]) * D;
        double sq = 0;
        for (int d = 0; d < D; d++)
            sq += (double)k[d] * k[d];
        score_at[cand[i]] = -sqrt(sq);
    }
}

static Policy *knorm_create(const void *params, const LayerView *L, const PolicyEnv *env,
                            KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    return press_create(&policy_knorm, knorm_score, params, L);
}

static const char *const knorm_conformance[] = {
    "budget=32 window=8",
    "budget=32 window=0 decode=grow",
    NULL,
};

const PolicyType policy_knorm = {
    .name = "knorm",
    .description = "span compressed to the keys of smallest L2 norm (kvpress KnormPress)",
    .params_size = sizeof(PressParams),
    .params = press_params,
    .validate = press_validate,
    .create = knorm_create,
    .prefill = press_prefill,
    .step = press_step,
    .observe = press_observe,
    .destroy = press_destroy,
    .max_slots = press_max_slots,
    .conformance = knorm_conformance,
    .scorer = &press_scorer,
};
