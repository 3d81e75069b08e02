/* adakv — AdaKV (kvpress AdaKVPress): one budget per layer, shared by its KV heads, around an
 * inner policy's per-token scores (policies/wrap.h: `inner = snapkv` and the inner's
 * parameters; any policy that exposes per-token scores).
 *
 * At a span's compression with window W (the inner's) and the inner's budget B, the layer keeps
 * H * K candidates, K = B - 1 - W, H the KV heads: each head first keeps its floor(alpha * K)
 * best candidates (fewer if it has fewer), then the remaining slots go to the best of all the
 * other candidates of all heads by score (ties: the later position, then the lower head), so a
 * head whose scores are concentrated gives slots to one whose scores are spread. A layer whose
 * candidates fit (at most H * K) is not cut. Scores are compared across heads as the inner
 * gives them (snapkv: attention mass; the presses: their own scales). Decode as the inner's,
 * with the layer's budget: the sliding part loses its oldest position in every head while the
 * layer holds more than H * (B - 1) slots. Memory: each head's real size (a head may hold up to
 * B + (H - 1)(B - 1) slots at an attention; the layer at most H * B). */
#include <stddef.h>
#include <stdlib.h>

#include "policies/wrap.h"

extern const PolicyType policy_adakv;

static const ParamSpec adakv_params[] = {
    {"inner", PARAM_STRING, offsetof(WrapParams, inner), "", 0, 0, NULL,
     "required, before the inner's parameters: the scorer (snapkv, knorm, keydiff, "
     "expected_attention)"},
    {"alpha", PARAM_DOUBLE, offsetof(WrapParams, alpha), "0.2", 0, 1, NULL,
     "each head's floor, a share of the mean number of tokens a head keeps (alpha_safeguard)"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

typedef struct {
    double score;
    int32_t pos;
    int head;
} Entry;

/* Best first: higher score, then the later position, then the lower head. */
static int entry_cmp(const void *a, const void *b)
{
    const Entry *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    if (x->pos != y->pos)
        return x->pos > y->pos ? -1 : 1;
    return (x->head > y->head) - (x->head < y->head);
}

static void adakv_alloc(Wrap *w, const PrefillView *pv, int W)
{
    int H = w->base.n_kv_heads;
    long K = w->budget - 1 - W, total = 0;
    w->cap = (long)H * (w->budget - 1);
    for (int g = 0; g < H; g++) {
        total += w->n[g];
        w->keep[g] = w->n[g];
    }
    if (total <= (long)H * K)
        return; /* the layer's candidates fit */
    Entry *all = kv_malloc((size_t)total * sizeof *all);
    size_t m = 0;
    for (int g = 0; g < H; g++) {
        wrap_scores(w, pv, g);
        for (int i = 0; i < w->n[g]; i++)
            all[m++] = (Entry){w->score[g][w->cand[g][i]], w->cand[g][i], g};
    }
    qsort(all, m, sizeof *all, entry_cmp);
    /* The global order restricted to one head is that head's order (rank.h's), so counting
     * per head here and keeping each head's best keep[g] chooses the same tokens. */
    int floor_k = (int)(w->prm.alpha * (double)K);
    long rest = (long)H * K;
    bool *forced = kv_calloc(m, sizeof *forced);
    for (int g = 0; g < H; g++)
        w->keep[g] = 0;
    for (size_t i = 0; i < m; i++)
        if (w->keep[all[i].head] < floor_k) {
            w->keep[all[i].head]++;
            forced[i] = true;
            rest--;
        }
    for (size_t i = 0; i < m && rest > 0; i++)
        if (!forced[i]) {
            w->keep[all[i].head]++;
            rest--;
        }
    free(forced);
    free(all);
}

static Policy *adakv_create(const void *params, const LayerView *L, const PolicyEnv *env,
                            KvErr *err)
{
    return wrap_create(&policy_adakv, adakv_alloc, params, L, env, err);
}

static long adakv_max_slots(const void *params, const LayerView *L, int t)
{
    int B, W;
    bool grow;
    wrap_frame(params, &B, &W, &grow);
    long bound = B + (long)(L->n_kv_heads - 1) * (B - 1);
    return grow ? bound + t - L->n_prompt : bound;
}

static const char *const adakv_conformance[] = {
    "inner=snapkv budget=32 observation=8 kernel=3",
    "inner=snapkv budget=32 observation=4 kernel=1 alpha=0.5 decode=grow",
    "inner=knorm budget=32 window=8 alpha=0",
    "inner=keydiff budget=24 window=4 alpha=1",
    "inner=expected_attention budget=32 window=8",
    NULL,
};

const PolicyType policy_adakv = {
    .name = "adakv",
    .description = "AdaKV: the inner scorer's tokens chosen per layer across its KV heads, with "
                   "a per-head floor",
    .params_size = sizeof(WrapParams),
    .params = adakv_params,
    .validate = wrap_validate,
    .create = adakv_create,
    .prefill = wrap_prefill,
    .step = wrap_step,
    .observe = wrap_observe,
    .destroy = wrap_destroy,
    .max_slots = adakv_max_slots,
    .conformance = adakv_conformance,
    .set_extra = wrap_set_extra,
};
