/* window — StreamingLLM: the first `sinks` tokens plus the last `window` tokens (the current one
 * included). With sinks = 0 it is the plain rotating ring buffer. Equivalent to mlx-lm's
 * RotatingKVCache(max_size = window + sinks, keep = sinks). Prefill chunks, of any span, stream
 * through the same rule token by token, so the cache after a chunk does not depend on the
 * chunking: the sinks and the last `window` tokens.
 *
 * rerotate = true: StreamingLLM's position shift. Its keys are rotated at their index in the
 * cache, and the query at the index after the last, so query t sees key j at distance
 * (cache index of t) - (cache index of j) rather than t - j. The trace's keys and queries are
 * post-RoPE at their true positions; the query cannot be rotated (the replay attends with the
 * trace's), so each decode step rotates every key whose cache distance differs from its true
 * distance by the difference, which gives the same logits (q_t . R(a) k = q_t rotated back by a
 * . k): under this rule those are the sinks, once the window has moved away from them. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"
#include "sim/format/geometry.h"

extern const PolicyType policy_window;

typedef struct {
    int window;
    int sinks;
    bool rerotate;
} WindowParams;

typedef struct {
    Policy base;
    WindowParams prm;
    int32_t *sorted; /* [T] scratch: the cached positions, ascending (= cache index order) */
    uint8_t *rotated; /* [n_kv_heads][T]: 1 where this policy holds a re-rotated key */
    float *kv;       /* [2 * head_dim] scratch: one re-rotated key and its value */
} Window;

static const ParamSpec window_params[] = {
    {"window", PARAM_INT, offsetof(WindowParams, window), "508", 1, 1 << 30, NULL,
     "recent tokens kept, the current one included"},
    {"sinks", PARAM_INT, offsetof(WindowParams, sinks), "4", 0, 1 << 30, NULL,
     "initial tokens kept forever (attention sinks)"},
    {"rerotate", PARAM_BOOL, offsetof(WindowParams, rerotate), "false", 0, 0, NULL,
     "true: keys at their index in the cache for each decode query, as StreamingLLM's position "
     "shift (approximate keys); false: at their trace positions"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static Policy *window_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    Window *w = kv_calloc(1, sizeof *w);
    policy_base_init(&w->base, &policy_window, L);
    w->prm = *(const WindowParams *)params;
    if (w->prm.rerotate) {
        w->sorted = kv_malloc((size_t)L->n_tokens * sizeof *w->sorted);
        w->kv = kv_malloc(2 * (size_t)L->head_dim * sizeof *w->kv);
        w->rotated = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, 1);
    }
    return &w->base;
}

/* The cache as it stands once token `t` has been admitted: sinks and (t - window, t]. */
static void window_admit(Window *w, int t)
{
    for (int g = 0; g < w->base.n_kv_heads; g++) {
        KVCache *c = &w->base.cache[g];
        kvcache_add(c, t);
        int leaving = t - w->prm.window;
        if (leaving >= w->prm.sinks)
            kvcache_remove(c, leaving);
    }
}

static void window_prefill(Policy *p, const PrefillView *pv)
{
    Window *w = (Window *)p;
    for (int j = pv->chunk_start; j < pv->chunk_end; j++)
        window_admit(w, j);
}

/* rerotate: query t sits at cache index n - 1 and the key of cache index i at i (the cache
 * ordered by position): a key whose position distance t - j differs from its index distance
 * n - 1 - i is rotated forward by the difference; the others hold the trace's exact key. */
static void rerotate_keys(Window *w, const LayerView *L, int t)
{
    int D = L->head_dim;
    const int32_t *position = L->meta->positions;
    for (int g = 0; g < w->base.n_kv_heads; g++) {
        KVCache *c = &w->base.cache[g];
        uint8_t *rotated = w->rotated + (size_t)g * L->n_tokens;
        int n = kvcache_positions(c, w->sorted);
        for (int i = 0; i < n; i++) {
            int j = w->sorted[i];
            double shift = (double)(position[t] - position[j]) - (n - 1 - i);
            if (shift == 0) {
                if (rotated[j]) { /* back at its true distance: the trace's K and V */
                    kvcache_remove(c, j);
                    kvcache_add(c, j);
                    rotated[j] = 0;
                }
                continue;
            }
            rotated[j] = 1;
            memcpy(w->kv, L->k + ((size_t)g * L->n_tokens + j) * D, (size_t)D * sizeof *w->kv);
            memcpy(w->kv + D, L->v + ((size_t)g * L->n_tokens + j) * D, (size_t)D * sizeof *w->kv);
            rope_apply(w->kv, D, L->meta->rope_layout, L->rope_inv_freq, shift);
            kvcache_add_alt(c, j, w->kv, w->kv + D);
        }
    }
}

static void window_step(Policy *p, const StepView *sv)
{
    Window *w = (Window *)p;
    window_admit(w, sv->t);
    if (w->prm.rerotate)
        rerotate_keys(w, sv->L, sv->t);
}

/* Keep order (policy.h): the sinks, oldest first, then the window, newest first. A window of
 * W + 1 holds what one of W holds plus the next older token, and the sinks come first in both;
 * rerotate does not nest (its keys depend on the cache's size). */
static bool window_nests(const void *params)
{
    return !((const WindowParams *)params)->rerotate;
}

static int window_keep_order(Policy *p, const StepView *sv, int g, int32_t *pos)
{
    Window *w = (Window *)p;
    (void)g; /* every KV head holds the same positions */
    /* What window_admit leaves: the sinks below t + 1, then t, t - 1, ... down to the oldest
     * of the window. */
    int n = 0;
    for (int j = 0; j < w->prm.sinks && j <= sv->t; j++)
        pos[n++] = j;
    for (int j = sv->t; j >= w->prm.sinks && j > sv->t - w->prm.window; j--)
        pos[n++] = j;
    return n;
}

static void window_destroy(Policy *p)
{
    Window *w = (Window *)p;
    free(w->sorted);
    free(w->kv);
    free(w->rotated);
    policy_base_free(p);
    free(p);
}

static long window_max_slots(const void *params, const LayerView *L, int t)
{
    const WindowParams *prm = params;
    (void)L;
    (void)t;
    return (long)prm->window + prm->sinks;
}

static const char *const window_conformance[] = {"window=28", "window=32 sinks=0",
                                                 "window=24 rerotate=true", NULL};

const PolicyType policy_window = {
    .name = "window",
    .description = "StreamingLLM: `sinks` initial tokens plus the last `window` tokens",
    .params_size = sizeof(WindowParams),
    .params = window_params,
    .create = window_create,
    .prefill = window_prefill,
    .step = window_step,
    .destroy = window_destroy,
    .max_slots = window_max_slots,
    .conformance = window_conformance,
    .nest_param = "window",
    .nests = window_nests,
    .keep_order = window_keep_order,
};
