/* full — keeps every token: the reference every other policy is measured against.
 * Memory is accounted like mlx-lm's unbounded KV cache, whose buffer grows in steps of `step`
 * tokens (256): allocated bytes run ahead of live bytes. A prefill chunk, of any span, is
 * admitted whole. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"

extern const PolicyType policy_full;

typedef struct {
    int step;
} FullParams;

typedef struct {
    Policy base;
    int step;
    int head_dim, kv_bits;
} Full;

static const ParamSpec full_params[] = {
    {"step", PARAM_INT, offsetof(FullParams, step), "256", 1, 1 << 20, NULL,
     "allocation granularity of the growing buffer, in tokens"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static Policy *full_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    Full *f = kv_calloc(1, sizeof *f);
    policy_base_init(&f->base, &policy_full, L);
    f->step = ((const FullParams *)params)->step;
    f->head_dim = L->head_dim;
    f->kv_bits = env->kv_bits;
    return &f->base;
}

static void full_prefill(Policy *p, const PrefillView *pv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        for (int j = pv->chunk_start; j < pv->chunk_end; j++)
            kvcache_add(&p->cache[g], j);
}

static void full_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void full_memory(const Policy *p, MemReport *m)
{
    const Full *f = (const Full *)p;
    double live = 0, allocated = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        int n = p->cache[g].n;
        live += n;
        allocated += ceil((double)n / f->step) * f->step;
    }
    m->device_bytes = kv_entry_bytes(live, f->head_dim, f->kv_bits);
    m->allocated_bytes = kv_entry_bytes(allocated, f->head_dim, f->kv_bits);
}

static void full_destroy(Policy *p)
{
    policy_base_free(p);
    free(p);
}

static long full_max_slots(const void *params, const LayerView *L, int t)
{
    (void)params;
    (void)L;
    return (long)t + 1;
}

static const char *const full_conformance[] = {"step=16", "step=5", NULL};

const PolicyType policy_full = {
    .name = "full",
    .description = "keeps every token (the reference); buffer grows in steps of `step` tokens",
    .params_size = sizeof(FullParams),
    .params = full_params,
    .create = full_create,
    .prefill = full_prefill,
    .step = full_step,
    .memory = full_memory,
    .destroy = full_destroy,
    .max_slots = full_max_slots,
    .conformance = full_conformance,
};
