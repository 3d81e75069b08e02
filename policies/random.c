/* random — uniform random eviction: the floor every policy must beat.
 *
 * Once the cache is full, after each attention one cached token, drawn uniformly (the current
 * one included), is evicted so that |cache| <= budget at every attention. After every prefill
 * chunk (of any span) the cached tokens and the chunk's are cut to a uniform random subset of
 * budget - 1 of them (the prompt fed whole: a subset of the prompt). Each KV head draws
 * independently, from one GSL Mersenne Twister per instance seeded with env->seed: the same
 * seed gives the same choices. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>

#include "policies/policy.h"

extern const PolicyType policy_random;

typedef struct {
    int budget;
} RandomParams;

typedef struct {
    Policy base;
    int budget;
    gsl_rng *rng;
} RandomPolicy;

static const ParamSpec random_params[] = {
    {"budget", PARAM_INT, offsetof(RandomParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time, the current one included"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static Policy *random_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    RandomPolicy *r = kv_calloc(1, sizeof *r);
    policy_base_init(&r->base, &policy_random, L);
    r->budget = ((const RandomParams *)params)->budget;
    r->rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (!r->rng) {
        kv_fail(err, "random: out of memory allocating a random number generator");
        policy_base_free(&r->base);
        free(r);
        return NULL;
    }
    gsl_rng_set(r->rng, (unsigned long)env->seed);
    return &r->base;
}

static void random_prefill(Policy *p, const PrefillView *pv)
{
    RandomPolicy *r = (RandomPolicy *)p;
    int c1 = pv->chunk_end;
    /* The candidates, ascending: what is cached (all before the chunk), then the chunk. */
    int32_t *held = kv_malloc((size_t)c1 * sizeof *held);
    int32_t *kept = kv_malloc((size_t)c1 * sizeof *kept);
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        int n = kvcache_positions(c, held);
        for (int j = pv->chunk_start; j < c1; j++)
            held[n++] = j;
        int keep = n < r->budget - 1 ? n : r->budget - 1;
        if (keep > 0)
            gsl_ran_choose(r->rng, kept, (size_t)keep, held, (size_t)n, sizeof *held);
        kvcache_clear(c);
        for (int i = 0; i < keep; i++)
            kvcache_add(c, kept[i]);
    }
    free(held);
    free(kept);
}

static void random_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void random_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)sv;
    (void)attn;
    RandomPolicy *r = (RandomPolicy *)p;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        while (c->n > r->budget - 1 && c->n > 0)
            kvcache_remove_slot(c, (int)gsl_rng_uniform_int(r->rng, (unsigned long)c->n));
    }
}

static void random_destroy(Policy *p)
{
    RandomPolicy *r = (RandomPolicy *)p;
    gsl_rng_free(r->rng);
    policy_base_free(p);
    free(r);
}

static long random_max_slots(const void *params, const LayerView *L, int t)
{
    const RandomParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const random_conformance[] = {"budget=32", "budget=24", NULL};

const PolicyType policy_random = {
    .name = "random",
    .description = "uniform random eviction at the budget (seeded): the floor",
    .params_size = sizeof(RandomParams),
    .params = random_params,
    .create = random_create,
    .prefill = random_prefill,
    .step = random_step,
    .observe = random_observe,
    .destroy = random_destroy,
    .max_slots = random_max_slots,
    .conformance = random_conformance,
};
