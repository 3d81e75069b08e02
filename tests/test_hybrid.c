/* hybrid's defining properties: ratio 0 is a window, otherwise the cache is the recent part plus
 * the best of the rest by the group's attention (computed here independently), never over
 * budget, and include_skipped adds one slot summarising exactly the evicted tokens. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"
#include "tests/support/group_attention.h"

/* ---- ratio 0 against the window policy ---- */

typedef struct {
    int n_kv, T, P;
    bool *member; /* [step][n_kv][T]: cache membership at attention time */
    int *size;    /* [step][n_kv] */
    bool recording;
    int steps;
} Recording;

static void record_or_compare(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    Recording *r = ud;
    int step = t - r->P;
    for (int g = 0; g < r->n_kv; g++) {
        const KVCache *c = &p->cache[g];
        bool *row = r->member + ((size_t)step * r->n_kv + g) * r->T;
        if (r->recording) {
            for (int j = 0; j < r->T; j++)
                row[j] = j <= t && kvcache_has(c, j);
            r->size[step * r->n_kv + g] = c->n;
        } else {
            for (int j = 0; j <= t; j++)
                assert_int_equal(kvcache_has(c, j), row[j]);
            assert_int_equal(c->n, r->size[step * r->n_kv + g]);
        }
    }
    r->steps++;
}

static void check_ratio0_is_window(int n_prompt, int budget)
{
    int T = 50;
    Fixture *fx = fixture_new(4, 2, 8, T, n_prompt);
    fixture_randomize(fx, 11, 1.0);
    Recording r = {.n_kv = 2, .T = T, .P = n_prompt, .recording = true};
    r.member = kv_calloc((size_t)(T - n_prompt) * 2 * T, sizeof *r.member);
    r.size = kv_calloc((size_t)(T - n_prompt) * 2, sizeof *r.size);
    char params[128];
    snprintf(params, sizeof params, "window=%d sinks=0", budget);
    Policy *window = fixture_policy(fx, "window", params, 7);
    fixture_run(fx, window, T, record_or_compare, &r);
    window->type->destroy(window);

    r.recording = false;
    r.steps = 0;
    snprintf(params, sizeof params, "budget=%d ratio=0", budget);
    Policy *hybrid = fixture_policy(fx, "hybrid", params, 7);
    fixture_run(fx, hybrid, T, record_or_compare, &r);
    assert_int_equal(r.steps, T - n_prompt);
    hybrid->type->destroy(hybrid);
    free(r.member);
    free(r.size);
    fixture_free(fx);
}

static void test_ratio0_equals_window(void **state)
{
    (void)state;
    check_ratio0_is_window(20, 8); /* the prompt itself is cut */
    check_ratio0_is_window(3, 8);  /* the cache fills during decode */
}

/* ---- the split, checked against an independent computation of the importance ---- */

/* keep[] := the `recent` largest positions of cand plus the n_imp others of highest score. */
static void expected_truncation(const int *cand, const double *score, int n, int recent,
                                int n_imp, bool *keep)
{
    bool *taken = kv_calloc((size_t)n, sizeof *taken);
    for (int r = 0; r < recent; r++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || cand[i] > cand[best]))
                best = i;
        taken[best] = true;
    }
    for (int r = 0; r < n_imp; r++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || score[i] > score[best]))
                best = i;
        taken[best] = true;
    }
    for (int i = 0; i < n; i++)
        keep[cand[i]] = taken[i];
    free(taken);
}

typedef struct {
    Fixture *fx;
    int budget, n_imp;
    bool *expected; /* [n_kv][T]: the cache the next step must attend over, new token aside */
    int steps;
} SplitCheck;

static void expect_prefill(SplitCheck *sc)
{
    Fixture *fx = sc->fx;
    int T = fx->L.n_tokens, P = fx->L.n_prompt, Hq = fx->L.n_q_heads, group = fx->L.group;
    float *row = kv_malloc((size_t)Hq * T * sizeof *row);
    double *mass = kv_calloc((size_t)fx->L.n_kv_heads * P, sizeof *mass);
    for (int i = 0; i < P; i++) {
        fixture_full_attn(fx, i, row);
        for (int h = 0; h < Hq; h++)
            for (int j = 0; j <= i; j++)
                mass[(size_t)(h / group) * P + j] += row[(size_t)h * T + j];
    }
    int *cand = kv_malloc((size_t)P * sizeof *cand);
    for (int j = 0; j < P; j++)
        cand[j] = j;
    for (int g = 0; g < fx->L.n_kv_heads; g++) {
        bool *keep = sc->expected + (size_t)g * T;
        memset(keep, 0, (size_t)T * sizeof *keep);
        if (P <= sc->budget - 1)
            for (int j = 0; j < P; j++)
                keep[j] = true;
        else
            expected_truncation(cand, mass + (size_t)g * P, P, sc->budget - 1 - sc->n_imp,
                                sc->n_imp, keep);
    }
    free(cand);
    free(mass);
    free(row);
}

static void check_split(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    SplitCheck *sc = ud;
    Fixture *fx = sc->fx;
    int T = fx->L.n_tokens;
    if (t == fx->L.n_prompt)
        expect_prefill(sc);
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        bool *keep = sc->expected + (size_t)g * T;
        keep[t] = true;
        assert_true(c->n <= sc->budget);
        int n_expected = 0;
        for (int j = 0; j < T; j++) {
            assert_int_equal(kvcache_has(c, j), keep[j]);
            n_expected += keep[j];
        }
        assert_int_equal(c->n, n_expected);
        /* What the truncation after this step must leave. */
        memset(keep, 0, (size_t)T * sizeof *keep);
        if (c->n <= sc->budget - 1) {
            for (int s = 0; s < c->n; s++)
                keep[c->pos[s]] = true;
            continue;
        }
        double *score = kv_malloc((size_t)c->n * sizeof *score);
        int *cand = kv_malloc((size_t)c->n * sizeof *cand);
        group_attention_over_cache(fx, c, g, t, score);
        for (int s = 0; s < c->n; s++)
            cand[s] = c->pos[s];
        expected_truncation(cand, score, c->n, sc->budget - 1 - sc->n_imp, sc->n_imp, keep);
        free(score);
        free(cand);
    }
    sc->steps++;
}

static void run_split(int budget, const char *ratio, int n_imp, int n_prompt)
{
    int T = 70;
    Fixture *fx = fixture_new(6, 2, 8, T, n_prompt);
    fixture_randomize(fx, 5, 1.5);
    char params[128];
    snprintf(params, sizeof params, "budget=%d ratio=%s", budget, ratio);
    Policy *p = fixture_policy(fx, "hybrid", params, 7);
    SplitCheck sc = {.fx = fx, .budget = budget, .n_imp = n_imp};
    sc.expected = kv_calloc((size_t)2 * T, sizeof *sc.expected);
    fixture_run(fx, p, T, check_split, &sc);
    assert_int_equal(sc.steps, T - n_prompt);
    free(sc.expected);
    p->type->destroy(p);
    fixture_free(fx);
}

/* ratio 1: the newest token plus the budget - 2 others of highest importance (plus the arriving
 * token at attention time): FixedSize's `attention` strategy. */
static void test_ratio1_keeps_top_importance_and_newest(void **state)
{
    (void)state;
    run_split(10, "1", 8, 24);
    run_split(10, "1", 8, 4);
}

/* ratio 0.5 of a budget of 12: 6 by importance, 5 recent (the newest included) + the arriving. */
static void test_half_ratio_splits_recent_and_importance(void **state)
{
    (void)state;
    run_split(12, "0.5", 6, 30);
    run_split(12, "0.3", 3, 30); /* floor(12 * 0.3) = 3 */
}

/* ---- include_skipped ---- */

typedef struct {
    Fixture *fx;
    int budget;
    int with_summary; /* steps that had the synthetic slot */
} SkippedCheck;

static void check_skipped(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    SkippedCheck *sk = ud;
    int D = sk->fx->L.head_dim;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= sk->budget);
        int synthetic = -1, n_synthetic = 0;
        for (int s = 0; s < c->n; s++)
            if (c->pos[s] < 0) {
                synthetic = s;
                n_synthetic++;
            }
        double *k_total = kv_calloc((size_t)D, sizeof *k_total);
        double *v_total = kv_calloc((size_t)D, sizeof *v_total);
        int n_skipped = 0;
        for (int j = 0; j < t; j++)
            if (!kvcache_has(c, j)) {
                for (int d = 0; d < D; d++) {
                    k_total[d] += fx_k(sk->fx, g, j)[d];
                    v_total[d] += fx_v(sk->fx, g, j)[d];
                }
                n_skipped++;
            }
        assert_int_equal(n_synthetic, n_skipped > 0 ? 1 : 0);
        if (n_skipped > 0) {
            assert_non_null(c->alt_kv[synthetic]);
            double divisor = n_skipped;
            for (int d = 0; d < D; d++) {
                assert_float_equal(c->alt_kv[synthetic][d], k_total[d] / divisor, 1e-4);
                assert_float_equal(c->alt_kv[synthetic][D + d], v_total[d] / divisor, 1e-4);
            }
            sk->with_summary++;
        }
        free(k_total);
        free(v_total);
    }
}

static void run_skipped(const char *mode)
{
    int T = 45, P = 4, budget = 8;
    Fixture *fx = fixture_new(4, 2, 8, T, P);
    fixture_randomize(fx, 9, 1.0);
    char params[128];
    snprintf(params, sizeof params, "budget=%d include_skipped=%s", budget, mode);
    Policy *p = fixture_policy(fx, "hybrid", params, 7);
    SkippedCheck sk = {.fx = fx, .budget = budget};
    fixture_run(fx, p, T, check_skipped, &sk);
    /* Real tokens get budget - 2 = 6 slots after a truncation: step 6 ends with 7 of them, so
     * from step 7 on both heads carry a summary. */
    assert_int_equal(sk.with_summary, 2 * (T - (budget - 1)));
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_include_skipped_mean_adds_one_summary_slot(void **state)
{
    (void)state;
    run_skipped("mean");
}

static void check_no_synthetic(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)t;
    (void)full_attn;
    int budget = *(int *)ud;
    for (int g = 0; g < p->n_kv_heads; g++) {
        assert_true(p->cache[g].n <= budget);
        assert_int_equal(kvcache_real_count(&p->cache[g]), p->cache[g].n);
    }
}

static void test_skipped_off_has_no_synthetic_slot(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(4, 2, 8, 40, 25);
    fixture_randomize(fx, 2, 1.0);
    int budget = 9;
    Policy *p = fixture_policy(fx, "hybrid", "budget=9 ratio=0.7", 7);
    fixture_run(fx, p, 40, check_no_synthetic, &budget);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_validate_rejects_budget_without_room(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("hybrid");
    assert_non_null(type);
    void *prm = kv_calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(policy_param_set(type, prm, "include_skipped", "mean", &err), 0);
    assert_int_equal(policy_param_set(type, prm, "budget", "2", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "budget"));
    assert_int_equal(policy_param_set(type, prm, "budget", "3", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "include_skipped", "median", &err), -1);
    /* FixedSize's first version (a sum) is not offered: its slot swamps the softmax. */
    assert_int_equal(policy_param_set(type, prm, "include_skipped", "sum", &err), -1);
    assert_int_equal(policy_param_set(type, prm, "ratio", "1.5", &err), -1);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ratio0_equals_window),
        cmocka_unit_test(test_ratio1_keeps_top_importance_and_newest),
        cmocka_unit_test(test_half_ratio_splits_recent_and_importance),
        cmocka_unit_test(test_include_skipped_mean_adds_one_summary_slot),
        cmocka_unit_test(test_skipped_off_has_no_synthetic_slot),
        cmocka_unit_test(test_validate_rejects_budget_without_room),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
