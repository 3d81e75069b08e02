/* pyramid — PyramidKV: budgets that shrink with depth, the same total, around an inner
 * policy's per-token scores (policies/wrap.h: `inner = snapkv` and the inner's parameters; any
 * policy that exposes per-token scores). KVCache-Factory's PyramidKVCluster.update_kv
 * (pyramidkv/pyramidkv_utils.py), the rule kvpress's PyramidKVPress cites.
 *
 * With the inner's budget B and window Wp (its parameter), K = B - 1 - Wp tokens per head
 * before the window on average, L layers, and n candidates (cached positions before this
 * compression's window W) per KV head:
 *   n + W < 2K (short input): every layer keeps K, as the inner alone;
 *   otherwise min = floor(K / beta), max = 2K - min; if max >= n: max = n, min = 2K - max;
 *   steps = floor((max - min) / (L - 1)); layer l keeps K_l = max - l * steps,
 * so layer 0 keeps the most and the layers together keep about L * K. Layer l's budget is
 * B_l = K_l + Wp + 1 tokens per KV head, used as the inner uses B: at the compression each head
 * keeps its B_l - 1 - W best candidates (not cut when they fit), and in decode its sliding part
 * loses its oldest position once the head holds B_l slots at an attention. */
#include <stddef.h>
#include <stdlib.h>

#include "policies/wrap.h"

extern const PolicyType policy_pyramid;

static const ParamSpec pyramid_params[] = {
    {"inner", PARAM_STRING, offsetof(WrapParams, inner), "", 0, 0, NULL,
     "required, before the inner's parameters: the scorer (snapkv, knorm, keydiff, "
     "expected_attention)"},
    {"beta", PARAM_INT, offsetof(WrapParams, beta), "20", 1, 1 << 20, NULL,
     "steepness: the deepest layer keeps about K / beta, K the mean tokens before the window"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

/* K_l of layer `layer` of n_layers for n candidates and this compression's window W. */
static long layer_keep(long K, int beta, int layer, int n_layers, long n, int W)
{
    if (n + W < 2 * K)
        return K;
    long min_num = K / beta, max_num = 2 * K - min_num;
    if (max_num >= n) {
        max_num = n;
        min_num = 2 * K - max_num;
    }
    long steps = n_layers > 1 ? (max_num - min_num) / (n_layers - 1) : 0;
    return max_num - layer * steps;
}

static void pyramid_alloc(Wrap *w, const PrefillView *pv, int W)
{
    (void)pv;
    int H = w->base.n_kv_heads;
    long K = w->budget - 1 - w->window, n = 0;
    for (int g = 0; g < H; g++)
        n = w->n[g] > n ? w->n[g] : n;
    long B_l = layer_keep(K, w->prm.beta, w->layer, w->n_layers, n, W) + w->window + 1;
    w->cap = (long)H * (B_l - 1);
    for (int g = 0; g < H; g++)
        w->keep[g] = (int)(B_l - 1 - W);
}

static Policy *pyramid_create(const void *params, const LayerView *L, const PolicyEnv *env,
                              KvErr *err)
{
    return wrap_create(&policy_pyramid, pyramid_alloc, params, L, env, err);
}

/* Layer 0's budget at its largest (uncapped), at least B: every layer's bound. */
static long pyramid_max_slots(const void *params, const LayerView *L, int t)
{
    const WrapParams *prm = params;
    int B, W;
    bool grow;
    wrap_frame(prm, &B, &W, &grow);
    long K = B - 1 - W, bound = 2 * K - K / prm->beta + W + 1;
    if (bound < B)
        bound = B;
    return grow ? bound + t - L->n_prompt : bound;
}

static const char *const pyramid_conformance[] = {
    "inner=snapkv budget=32 observation=8 kernel=3",
    "inner=snapkv budget=24 observation=4 kernel=1 beta=2 decode=grow",
    "inner=knorm budget=32 window=8 beta=4",
    "inner=expected_attention budget=32 window=4 beta=1",
    NULL,
};

const PolicyType policy_pyramid = {
    .name = "pyramid",
    .description = "PyramidKV: the inner scorer with budgets that shrink with depth, same total",
    .params_size = sizeof(WrapParams),
    .params = pyramid_params,
    .validate = wrap_validate,
    .create = pyramid_create,
    .prefill = wrap_prefill,
    .step = wrap_step,
    .observe = wrap_observe,
    .destroy = wrap_destroy,
    .max_slots = pyramid_max_slots,
    .conformance = pyramid_conformance,
    .set_extra = wrap_set_extra,
};
