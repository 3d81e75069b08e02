/* h2o's defining property: at every attention the cache is the recent window plus, of the
 * older tokens, those of highest accumulated attention (accumulate = sum) or of highest mean
 * attention over the queries that saw them (accumulate = mean), checked against scores the test
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
    double *seen;  /* [Hkv][T] the queries that saw each token; NULL: rank by the sum */
    int32_t *prev; /* [Hkv][T] 1 if cached at the previous attention */
    int steps;
} H2oCheck;

/* What the policy ranks token j of KV head g by. */
static double rank_score(const H2oCheck *hc, int g, int j)
{
    size_t at = (size_t)g * hc->fx->L.n_tokens + j;
    return hc->seen ? hc->score[at] / hc->seen[at] : hc->score[at];
}

/* Scores of the prompt: causal attention mass of every prompt query, summed over the group;
 * seen (may be NULL): the prompt queries that saw each token, P - j. */
static void prompt_scores(const Fixture *fx, double *score, double *seen)
{
    const LayerView *L = &fx->L;
    float *row = malloc((size_t)L->n_q_heads * L->n_tokens * sizeof *row);
    for (int i = 0; i < L->n_prompt; i++) {
        fixture_full_attn(fx, i, row);
        for (int h = 0; h < L->n_q_heads; h++)
            for (int j = 0; j <= i; j++)
                score[(size_t)(h / L->group) * L->n_tokens + j] += row[(size_t)h * L->n_tokens + j];
    }
    for (int g = 0; seen && g < L->n_kv_heads; g++)
        for (int j = 0; j < L->n_prompt; j++)
            seen[(size_t)g * L->n_tokens + j] = L->n_prompt - j;
    free(row);
}

static void check_h2o(int t, const Policy *p, const float *full_attn, void *ud)
{
    H2oCheck *hc = ud;
    const LayerView *L = &hc->fx->L;
    int T = L->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= hc->budget);
        if (t + 1 >= hc->budget)
            assert_int_equal(c->n, hc->budget);
        /* The recent window (t - recent, t] is whole. */
        for (int j = t - hc->recent + 1; j <= t; j++)
            if (j >= 0)
                assert_true(kvcache_has(c, j));
        /* Of the older tokens, none dropped scores above one kept. A sum only grows while a
         * token is kept, so that holds for every token ever dropped; a kept token's mean can
         * fall, so with the mean it holds for the tokens the last eviction chose among (those
         * cached at the previous attention; at the first step, the prompt). */
        double lowest_kept = 1e300, highest_dropped = -1e300;
        int kept_old = 0;
        const int32_t *prev = hc->prev + (size_t)g * T;
        for (int j = 0; j <= t - hc->recent; j++) {
            double sj = rank_score(hc, g, j);
            bool competed = !hc->seen || (t == L->n_prompt ? j < t : prev[j]);
            if (kvcache_has(c, j)) {
                kept_old++;
                if (sj < lowest_kept)
                    lowest_kept = sj;
            } else if (competed && sj > highest_dropped) {
                highest_dropped = sj;
            }
        }
        for (int j = 0; j < T; j++)
            hc->prev[(size_t)g * T + j] = kvcache_has(c, j);
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
    for (int g = 0; hc->seen && g < p->n_kv_heads; g++)
        for (int s = 0; s < p->cache[g].n; s++)
            hc->seen[(size_t)g * T + p->cache[g].pos[s]] += 1;
    hc->steps++;
}

static void run_h2o(int budget, const char *params, int heavy, int P, uint64_t seed,
                    double sigma)
{
    Fixture *fx = fixture_new(4, 2, 8, 120, P);
    fixture_randomize(fx, seed, sigma);
    Policy *p = fixture_policy(fx, "h2o", params, 7);
    H2oCheck hc = {fx, budget, heavy, budget - heavy, NULL, NULL, NULL, 0};
    hc.score = calloc((size_t)2 * 120, sizeof *hc.score);
    hc.prev = calloc((size_t)2 * 120, sizeof *hc.prev);
    if (strstr(params, "accumulate=mean"))
        hc.seen = calloc((size_t)2 * 120, sizeof *hc.seen);
    prompt_scores(fx, hc.score, hc.seen);
    fixture_run(fx, p, 120, check_h2o, &hc);
    assert_int_equal(hc.steps, 120 - P);
    free(hc.score);
    free(hc.seen);
    free(hc.prev);
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

/* accumulate = mean ranks by the attention per query that saw the token. */
static void test_h2o_mean_over_viewers(void **state)
{
    (void)state;
    run_h2o(16, "budget=16 heavy_ratio=0.5 accumulate=mean", 8, 40, 1, 1.0);
    run_h2o(16, "budget=16 heavy_ratio=0.5 accumulate=mean", 8, 40, 2, 2.5);
    run_h2o(16, "budget=16 heavy_ratio=0.5 accumulate=mean", 8, 6, 5, 2.0);
    run_h2o(20, "budget=20 heavy_ratio=0.3 accumulate=mean", 6, 40, 3, 1.5);
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
        cmocka_unit_test(test_h2o_mean_over_viewers),
        cmocka_unit_test(test_h2o_keeps_planted_heavy_hitter),
        cmocka_unit_test(test_h2o_rejects_no_recent_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
