/* window — StreamingLLM: the first `sinks` tokens plus the last `window` tokens (the current one
 * included). With sinks = 0 it is the plain rotating ring buffer. Equivalent to mlx-lm's
 * RotatingKVCache(max_size = window + sinks, keep = sinks). Prefill chunks, of any span, stream
 * through the same rule token by token, so the cache after a chunk does not depend on the
 * chunking: the sinks and the last `window` tokens. */
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"

extern const PolicyType policy_window;

typedef struct {
    int window;
    int sinks;
} WindowParams;

typedef struct {
    Policy base;
    WindowParams prm;
} Window;

static const ParamSpec window_params[] = {
    {"window", PARAM_INT, offsetof(WindowParams, window), "508", 1, 1 << 30, NULL,
     "recent tokens kept, the current one included"},
    {"sinks", PARAM_INT, offsetof(WindowParams, sinks), "4", 0, 1 << 30, NULL,
     "initial tokens kept forever (attention sinks)"},
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

static void window_step(Policy *p, const StepView *sv)
{
    window_admit((Window *)p, sv->t);
}

static void window_destroy(Policy *p)
{
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

static const char *const window_conformance[] = {"window=28", "window=32 sinks=0", NULL};

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
};
