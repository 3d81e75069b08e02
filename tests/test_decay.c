/* decay: evicts the lowest accumulated-attention / ln(age + e) score first, never the pinned
 * system segment nor the local window, and never holds more than `budget` tokens. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

/* Marks tokens [0, n_system) as the system segment (0) and the rest as the first turn. */
static void set_system(Fixture *fx, int n_system)
{
    for (int j = 0; j < fx->L.n_tokens; j++)
        fx->meta.segments[j] = j < n_system ? 0 : 1;
}

/* A reference of the policy's bookkeeping, written from the definition: accumulated attention of
 * each (KV head, position), from the prompt's full attention and then from each query's
 * attention over the cache it attended. */
typedef struct {
    Fixture *fx;
    int budget, local, n_pinned;
    double *acc;      /* [Hkv][T] */
    bool *was_cached; /* [Hkv][T]: the cache at the previous step */
    bool has_prev;
    int evictions;
} DecayCheck;

static double ref_score(const DecayCheck *dc, int g, int pos, int t)
{
    return dc->acc[(size_t)g * dc->fx->L.n_tokens + pos] / log(t - pos + exp(1.0));
}

/* Adds query t's attention over cache g (softmax on the cache, per query head) to acc. */
static void ref_accumulate(DecayCheck *dc, const Policy *p, int t)
{
    const LayerView *L = &dc->fx->L;
    int D = L->head_dim, T = L->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        double *logit = kv_malloc((size_t)c->n * sizeof *logit);
        for (int i = 0; i < L->group; i++) {
            const float *q = L->q + ((size_t)(g * L->group + i) * T + t) * D;
            double mx = -INFINITY, z = 0;
            for (int s = 0; s < c->n; s++) {
                const float *k = L->k + ((size_t)g * T + c->pos[s]) * D;
                double dot = 0;
                for (int d = 0; d < D; d++)
                    dot += (double)q[d] * k[d];
                logit[s] = dot * L->attn_scale;
                mx = fmax(mx, logit[s]);
            }
            for (int s = 0; s < c->n; s++)
                z += (logit[s] = exp(logit[s] - mx));
            for (int s = 0; s < c->n; s++)
                dc->acc[(size_t)g * T + c->pos[s]] += logit[s] / z;
        }
        free(logit);
    }
}

static void check_decay(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    DecayCheck *dc = ud;
    int T = dc->fx->L.n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= dc->budget);
        /* Eviction stops at budget − 1 before admitting t: a full cache is exactly at budget. */
        assert_int_equal(c->n, t + 1 < dc->budget ? t + 1 : dc->budget);
        for (int j = 0; j < dc->n_pinned; j++)
            assert_true(kvcache_has(c, j));
        for (int j = t - dc->local + 1; j <= t; j++)
            assert_true(kvcache_has(c, j));
        /* What left since the previous step (or the prompt, at the first step) scored no higher
         * than anything evictable that stayed, at the time of the eviction (query t − 1). */
        bool *prev = dc->was_cached + (size_t)g * T;
        double worst_evicted = -INFINITY, best_kept_floor = INFINITY;
        int evicted = 0;
        for (int j = 0; j < t; j++) {
            if (!dc->has_prev && j >= dc->fx->L.n_prompt)
                break;
            bool before = dc->has_prev ? prev[j] : true;
            if (!before)
                continue;
            bool evictable = j >= dc->n_pinned && j < t + 1 - dc->local;
            double s = ref_score(dc, g, j, t - 1);
            if (!kvcache_has(c, j)) {
                assert_true(evictable);
                worst_evicted = fmax(worst_evicted, s);
                evicted++;
            } else if (evictable) {
                best_kept_floor = fmin(best_kept_floor, s);
            }
        }
        if (evicted > 0)
            assert_true(worst_evicted <= best_kept_floor * (1 + 1e-5) + 1e-12);
        dc->evictions += evicted;
        for (int j = 0; j < T; j++)
            prev[j] = kvcache_has(c, j);
    }
    dc->has_prev = true;
    ref_accumulate(dc, p, t);
}

/* Runs decay over a random layer with an n_system-token system segment; returns how many
 * system tokens it evicted. */
static int run_decay_check(int n_prompt, int budget, int local, int n_system, bool pin)
{
    const int T = 120;
    Fixture *fx = fixture_new(4, 2, 8, T, n_prompt);
    fixture_randomize(fx, 11, 1.0);
    set_system(fx, n_system);
    /* Queries share a component along e0 and system keys point against it: the system tokens
     * are cold, the first to go unless pinned (token 0 excepted: query 0 sees only it). */
    for (int h = 0; h < 4; h++)
        for (int t = 0; t < T; t++)
            fx_q(fx, h, t)[0] += 3.0f;
    for (int g = 0; g < 2; g++)
        for (int j = 0; j < n_system; j++)
            fx_k(fx, g, j)[0] -= 3.0f;
    char params[128];
    snprintf(params, sizeof params, "budget=%d local=%d pin_system=%s", budget, local,
             pin ? "true" : "false");
    Policy *p = fixture_policy(fx, "decay", params, 7);
    DecayCheck dc = {.fx = fx, .budget = budget, .local = local, .n_pinned = pin ? n_system : 0};
    dc.acc = kv_calloc((size_t)2 * T, sizeof *dc.acc);
    dc.was_cached = kv_calloc((size_t)2 * T, sizeof *dc.was_cached);
    /* The prompt's accumulated attention: every prompt query's full attention. */
    float *row = kv_malloc((size_t)4 * T * sizeof *row);
    for (int i = 0; i < n_prompt; i++) {
        fixture_full_attn(fx, i, row);
        for (int h = 0; h < 4; h++)
            for (int j = 0; j <= i; j++)
                dc.acc[(size_t)(h / 2) * T + j] += row[(size_t)h * T + j];
    }
    free(row);
    fixture_run(fx, p, T, check_decay, &dc);
    /* Every decode step past the budget evicts exactly one token per KV head. */
    assert_true(dc.evictions >= 2 * (T - budget));
    int system_evicted = 0;
    for (int g = 0; g < 2; g++)
        for (int j = 0; j < n_system; j++)
            system_evicted += !kvcache_has(&p->cache[g], j);
    free(dc.acc);
    free(dc.was_cached);
    p->type->destroy(p);
    fixture_free(fx);
    return system_evicted;
}

static void test_decay_evicts_lowest_score_keeps_pinned_and_local(void **state)
{
    (void)state;
    /* The prompt overflows the budget: trimmed at prefill. */
    assert_int_equal(run_decay_check(40, 24, 6, 5, true), 0);
    /* The cache fills during decoding. */
    assert_int_equal(run_decay_check(10, 24, 6, 5, true), 0);
    /* Unpinned, system tokens are scored like any other, and some go. */
    assert_true(run_decay_check(30, 16, 4, 5, false) > 0);
}

/* Hand-built scores: every query points along e0; the system tokens 0..3 have keys along −e0
 * (cold), tokens 6 and 9 along +e0 (hot: they take nearly all the attention of every query that
 * sees them), every other key is zero. */
static void check_hot_cold(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    int *steps = ud;
    const KVCache *c = &p->cache[0];
    assert_int_equal(c->n, 10);
    assert_true(kvcache_has(c, 6));
    assert_true(kvcache_has(c, 9));
    for (int j = 0; j < 4; j++)
        assert_true(kvcache_has(c, j)); /* cold, but pinned */
    for (int j = t - 2; j <= t; j++)
        assert_true(kvcache_has(c, j));
    /* 10 = 4 pinned + 3 local + the 2 hot tokens + 1 more. */
    int others = 0;
    for (int j = 4; j <= t - 3; j++)
        others += kvcache_has(c, j) && j != 6 && j != 9;
    assert_int_equal(others, 1);
    (*steps)++;
}

static void test_decay_known_scores(void **state)
{
    (void)state;
    const int T = 60, P = 16;
    Fixture *fx = fixture_new(2, 1, 4, T, P);
    set_system(fx, 4);
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < T; t++)
            fx_q(fx, h, t)[0] = 4.0f;
    for (int j = 0; j < 4; j++)
        fx_k(fx, 0, j)[0] = -2.0f;
    fx_k(fx, 0, 6)[0] = 2.0f;
    fx_k(fx, 0, 9)[0] = 2.0f;
    Policy *p = fixture_policy(fx, "decay", "budget=10 local=3", 7);
    int steps = 0;
    fixture_run(fx, p, T, check_hot_cold, &steps);
    assert_int_equal(steps, T - P);
    p->type->destroy(p);
    fixture_free(fx);
}

static void check_long_system(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    (void)ud;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= 20);
        /* Only budget − local = 12 system tokens can be pinned: the first ones. */
        for (int j = 0; j < 12; j++)
            assert_true(kvcache_has(c, j));
        for (int j = t - 7; j <= t; j++)
            assert_true(kvcache_has(c, j));
    }
}

static void test_decay_system_longer_than_budget(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(4, 2, 8, 80, 40);
    fixture_randomize(fx, 5, 1.0);
    set_system(fx, 30);
    Policy *p = fixture_policy(fx, "decay", "budget=20 local=8", 7);
    fixture_run(fx, p, 80, check_long_system, NULL);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_decay_rejects_local_not_below_budget(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("decay");
    assert_non_null(type);
    void *prm = kv_calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(type->validate(prm, &err), 0); /* defaults: local 1024 < budget 8192 */
    assert_int_equal(policy_param_set(type, prm, "budget", "512", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "local = 1024"));
    assert_non_null(strstr(err.msg, "budget = 512"));
    assert_int_equal(policy_param_set(type, prm, "local", "128", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decay_evicts_lowest_score_keeps_pinned_and_local),
        cmocka_unit_test(test_decay_known_scores),
        cmocka_unit_test(test_decay_system_longer_than_budget),
        cmocka_unit_test(test_decay_rejects_local_not_below_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
