/* h2o's defining property: at every attention the cache is the recent window plus, of the
 * older tokens, those of highest accumulated attention, checked against scores the test
 * accumulates itself from the true attention rows. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

typedef struct {
    const Fixture *fx;
    int budget, heavy, recent;
    double *score; /* [Hkv][T] the test's own accumulated attention, group sum */
    int steps;
} H2oCheck;

/* Scores of the prompt: causal attention mass of every prompt query, summed over the group. */
static void prompt_scores(const Fixture *fx, double *score)
{
    const LayerView *L = &fx->L;
    float *row = malloc((size_t)L->n_q_heads * L->n_tokens * sizeof *row);
    for (int i = 0; i < L->n_prompt; i++) {
        fixture_full_attn(fx, i, row);
        for (int h = 0; h < L->n_q_heads; h++)
            for (int j = 0; j <= i; j++)
                score[(size_t)(h / L->group) * L->n_tokens + j] += row[(size_t)h * L->n_tokens + j];
    }
    free(row);
}

static void check_h2o(int t, const Policy *p, const float *full_attn, void *ud)
{
    H2oCheck *hc = ud;
    const LayerView *L = &hc->fx->L;
    int T = L->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        const double *score = hc->score + (size_t)g * T;
        assert_true(c->n <= hc->budget);
        if (t + 1 >= hc->budget)
            assert_int_equal(c->n, hc->budget);
        /* The recent window (t - recent, t] is whole. */
        for (int j = t - hc->recent + 1; j <= t; j++)
            if (j >= 0)
                assert_true(kvcache_has(c, j));
        /* Of the older tokens, none dropped scores above one kept. */
        double lowest_kept = 1e300, highest_dropped = -1e300;
        int kept_old = 0;
        for (int j = 0; j <= t - hc->recent; j++) {
            if (kvcache_has(c, j)) {
                kept_old++;
                if (score[j] < lowest_kept)
                    lowest_kept = score[j];
            } else if (score[j] > highest_dropped) {
                highest_dropped = score[j];
            }
        }
        assert_true(kept_old <= hc->heavy);
        if (kept_old > 0)
            assert_true(lowest_kept >= highest_dropped - 1e-5);
    }
    /* Accumulate what this query computed over the cache: the true row renormalised on it. */
    for (int h = 0; h < L->n_q_heads; h++) {
        int g = h / L->group;
        double mass = fixture_mass(hc->fx, p, full_attn, h);
        const KVCache *c = &p->cache[g];
        for (int s = 0; s < c->n; s++)
            hc->score[(size_t)g * T + c->pos[s]] += full_attn[(size_t)h * T + c->pos[s]] / mass;
    }
    hc->steps++;
}

static void run_h2o(int budget, const char *params, int heavy, int P, uint64_t seed,
                    double sigma)
{
    Fixture *fx = fixture_new(4, 2, 8, 120, P);
    fixture_randomize(fx, seed, sigma);
    Policy *p = fixture_policy(fx, "h2o", params, 7);
    H2oCheck hc = {fx, budget, heavy, budget - heavy, NULL, 0};
    hc.score = calloc((size_t)2 * 120, sizeof *hc.score);
    prompt_scores(fx, hc.score);
    fixture_run(fx, p, 120, check_h2o, &hc);
    assert_int_equal(hc.steps, 120 - P);
    free(hc.score);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_h2o_recent_window_plus_heavy_hitters(void **state)
{
    (void)state;
    /* A long prompt, cut at prefill end. */
    run_h2o(16, "budget=16 heavy_ratio=0.5", 8, 40, 1, 1.0);
    run_h2o(16, "budget=16 heavy_ratio=0.5", 8, 40, 2, 2.5);
    /* A short prompt: the choices rest on the attention accumulated during decode. */
    run_h2o(16, "budget=16 heavy_ratio=0.5", 8, 6, 5, 2.0);
    run_h2o(16, "budget=16 heavy_ratio=0.25", 4, 10, 6, 1.0);
    /* floor(20 * 0.3) = 6 heavy, 14 recent. */
    run_h2o(20, "budget=20 heavy_ratio=0.3", 6, 40, 3, 1.5);
    /* No heavy hitters: a plain window of `budget` tokens. */
    run_h2o(10, "budget=10 heavy_ratio=0", 0, 40, 4, 1.0);
}

/* A token every query attends to survives the whole run although it is old; a prompt token
 * no query attends to is gone once the prompt is cut. */
static void test_h2o_keeps_planted_heavy_hitter(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(2, 1, 8, 100, 30);
    fixture_randomize(fx, 5, 0.3);
    for (int t = 0; t < 100; t++)
        for (int h = 0; h < 2; h++)
            fx_q(fx, h, t)[0] = 4.0f;
    fx_k(fx, 0, 3)[0] = 4.0f;   /* the heavy hitter */
    fx_k(fx, 0, 5)[0] = -4.0f;  /* never attended */
    Policy *p = fixture_policy(fx, "h2o", "budget=12 heavy_ratio=0.5", 7);
    fixture_run(fx, p, 100, NULL, NULL);
    assert_true(kvcache_has(&p->cache[0], 3));
    assert_false(kvcache_has(&p->cache[0], 5));
    assert_int_equal(p->cache[0].n, 11); /* budget - 1 after the last eviction */
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_h2o_rejects_no_recent_slot(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("h2o");
    assert_non_null(type);
    void *prm = calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(policy_param_set(type, prm, "heavy_ratio", "1", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "heavy_ratio"));
    assert_int_equal(policy_param_set(type, prm, "heavy_ratio", "0.99", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_h2o_recent_window_plus_heavy_hitters),
        cmocka_unit_test(test_h2o_keeps_planted_heavy_hitter),
        cmocka_unit_test(test_h2o_rejects_no_recent_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
