/* tova's defining property: each step, once the cache is full, the token evicted is the one the
 * current query attended to least (mean over the group's heads, or over the layer's). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

typedef struct {
    const Fixture *fx;
    int budget;
    bool layer;
    uint8_t *prev;  /* [Hkv][T] previous step's cache membership */
    double *score;  /* [Hkv][T] previous query's mean attention over its cache */
    int prev_t, evictions;
} TovaCheck;

/* The previous query's scores, which the test computes from the true rows renormalised on the
 * cache it attended over, must put the evicted token at the bottom. */
static void check_tova(int t, const Policy *p, const float *full_attn, void *ud)
{
    TovaCheck *tc = ud;
    const LayerView *L = &tc->fx->L;
    int T = L->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= tc->budget);
        if (t + 1 >= tc->budget)
            assert_int_equal(c->n, tc->budget);
        assert_true(kvcache_has(c, t));
        if (tc->layer)
            for (int s = 0; s < c->n; s++)
                assert_true(kvcache_has(&p->cache[0], c->pos[s]));
        if (tc->prev_t < 0)
            continue;
        const uint8_t *prev = tc->prev + (size_t)g * T;
        const double *score = tc->score + (size_t)g * T;
        int evicted = -1, gone = 0;
        double lowest = 1e300;
        for (int j = 0; j <= tc->prev_t; j++) {
            if (!prev[j])
                continue;
            lowest = score[j] < lowest ? score[j] : lowest;
            if (!kvcache_has(c, j)) {
                evicted = j;
                gone++;
            }
        }
        /* At most one token leaves per step; when one does, it is the least attended. */
        assert_true(gone <= 1);
        if (tc->prev_t + 1 >= tc->budget) {
            assert_int_equal(gone, 1);
            assert_true(score[evicted] <= lowest + 1e-6);
            tc->evictions++;
        }
    }
    /* Record this step's cache and the scores its query gives it. */
    memset(tc->prev, 0, (size_t)p->n_kv_heads * T);
    memset(tc->score, 0, (size_t)p->n_kv_heads * T * sizeof *tc->score);
    int heads_per_score = tc->layer ? L->n_q_heads : L->group;
    for (int h = 0; h < L->n_q_heads; h++) {
        int g = h / L->group;
        const KVCache *c = &p->cache[g];
        double mass = fixture_mass(tc->fx, p, full_attn, h);
        for (int s = 0; s < c->n; s++) {
            double a = full_attn[(size_t)h * T + c->pos[s]] / mass / heads_per_score;
            if (tc->layer)
                for (int g2 = 0; g2 < L->n_kv_heads; g2++)
                    tc->score[(size_t)g2 * T + c->pos[s]] += a;
            else
                tc->score[(size_t)g * T + c->pos[s]] += a;
        }
    }
    for (int g = 0; g < p->n_kv_heads; g++)
        for (int s = 0; s < p->cache[g].n; s++)
            tc->prev[(size_t)g * T + p->cache[g].pos[s]] = 1;
    tc->prev_t = t;
}

static int run_tova(uint64_t seed, double sigma, int budget, bool layer)
{
    Fixture *fx = fixture_new(6, 2, 8, 100, 30);
    fixture_randomize(fx, seed, sigma);
    char params[64];
    snprintf(params, sizeof params, "budget=%d heads=%s", budget, layer ? "layer" : "group");
    Policy *p = fixture_policy(fx, "tova", params, 7);
    TovaCheck tc = {fx, budget, layer, NULL, NULL, -1, 0};
    tc.prev = calloc((size_t)2 * 100, 1);
    tc.score = calloc((size_t)2 * 100, sizeof *tc.score);
    fixture_run(fx, p, 100, check_tova, &tc);
    free(tc.prev);
    free(tc.score);
    p->type->destroy(p);
    fixture_free(fx);
    return tc.evictions;
}

static void test_tova_evicts_least_attended(void **state)
{
    (void)state;
    /* Full from the first step: one eviction per KV head after each of steps 30..98. */
    assert_int_equal(run_tova(1, 1.0, 12, false), 2 * 69);
    assert_int_equal(run_tova(2, 2.5, 12, false), 2 * 69);
    assert_int_equal(run_tova(3, 1.5, 12, true), 2 * 69);
    /* A budget above the prompt: evictions start once the cache fills (after step 49). */
    assert_int_equal(run_tova(4, 1.5, 50, false), 2 * (98 - 49 + 1));
}

/* The prompt is cut to the budget - 1 tokens the last prompt query attends to most. */
static void test_tova_prompt_cut_by_last_query(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(2, 1, 8, 40, 30);
    fixture_randomize(fx, 6, 0.2);
    const int chosen[3] = {2, 11, 17};
    for (int i = 0; i < 3; i++)
        fx_k(fx, 0, chosen[i])[0] = 5.0f;
    for (int h = 0; h < 2; h++)
        fx_q(fx, h, 29)[0] = 5.0f;
    Policy *p = fixture_policy(fx, "tova", "budget=4", 7);
    fixture_run(fx, p, 30, NULL, NULL);
    assert_int_equal(p->cache[0].n, 3);
    for (int i = 0; i < 3; i++)
        assert_true(kvcache_has(&p->cache[0], chosen[i]));
    p->type->destroy(p);
    fixture_free(fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tova_evicts_least_attended),
        cmocka_unit_test(test_tova_prompt_cut_by_last_query),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
