/* The key-scored presses (knorm, keydiff; policies/press.h): after a span's compression the cache
 * is the window plus, of the tokens before it, those of best score by the test's own formula
 * (knorm: -||k||; keydiff: -cos(k, mean unit key of the candidates)); during decode those stay
 * and the rest of the budget slides (decode = window) or nothing is evicted (decode = grow); the
 * choice does not depend on the prefill chunking. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

enum { HQ = 4, HKV = 2, D = 8, T = 120 };

typedef void (*ScoreFn)(const Fixture *fx, int g, int n, double *score);

static double key_norm(const Fixture *fx, int g, int j)
{
    const float *k = fx->k + ((size_t)g * T + j) * D;
    double sq = 0;
    for (int d = 0; d < D; d++)
        sq += (double)k[d] * k[d];
    return sqrt(sq);
}

/* score[j] for j < n: the prompt tokens before the window are the candidates. */
static void knorm_scores(const Fixture *fx, int g, int n, double *score)
{
    for (int j = 0; j < n; j++)
        score[j] = -key_norm(fx, g, j);
}

static void keydiff_scores(const Fixture *fx, int g, int n, double *score)
{
    double anchor[D] = {0};
    for (int j = 0; j < n; j++)
        for (int d = 0; d < D; d++)
            anchor[d] += fx->k[((size_t)g * T + j) * D + d] / key_norm(fx, g, j) / n;
    double an = 0;
    for (int d = 0; d < D; d++)
        an += anchor[d] * anchor[d];
    an = sqrt(an);
    for (int j = 0; j < n; j++) {
        double dot = 0;
        for (int d = 0; d < D; d++)
            dot += fx->k[((size_t)g * T + j) * D + d] * anchor[d];
        score[j] = -dot / (key_norm(fx, g, j) * an);
    }
}

typedef struct {
    const Fixture *fx;
    ScoreFn score;
    int budget, window;
    bool grow;
    int32_t *pinned; /* [Hkv][T] 1 if kept from before the window at the first step */
    int steps;
} PressCheck;

static void check_press(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    PressCheck *pc = ud;
    int P = pc->fx->L.n_prompt, prefix = P - pc->window;
    bool cut = P > pc->budget - 1;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        int32_t *pinned = pc->pinned + (size_t)g * T;
        if (t == P) {
            /* The window and the new token are whole. */
            for (int j = prefix; j <= P; j++)
                assert_true(kvcache_has(c, j));
            if (!cut) {
                assert_int_equal(c->n, P + 1);
            } else {
                assert_int_equal(c->n, pc->budget);
                /* Of the tokens before the window, none dropped scores above one kept. */
                double *score = malloc((size_t)prefix * sizeof *score);
                pc->score(pc->fx, g, prefix, score);
                double lowest_kept = INFINITY, highest_dropped = -INFINITY;
                int kept = 0;
                for (int j = 0; j < prefix; j++) {
                    if (kvcache_has(c, j)) {
                        kept++;
                        lowest_kept = fmin(lowest_kept, score[j]);
                    } else {
                        highest_dropped = fmax(highest_dropped, score[j]);
                    }
                }
                assert_int_equal(kept, pc->budget - 1 - pc->window);
                assert_true(lowest_kept >= highest_dropped - 1e-9);
                free(score);
            }
            for (int j = 0; j < prefix; j++)
                pinned[j] = kvcache_has(c, j);
        }
        /* The tokens before the window are those chosen at the compression. */
        for (int j = 0; j < prefix; j++)
            assert_int_equal(kvcache_has(c, j), pinned[j]);
        if (pc->grow) {
            for (int j = prefix; j <= t; j++)
                assert_true(kvcache_has(c, j));
        } else {
            /* The sliding part is the most recent tokens, as many as the budget leaves. */
            assert_true(c->n <= pc->budget);
            int n_pinned = 0;
            for (int j = 0; j < prefix; j++)
                n_pinned += pinned[j];
            int room = pc->budget - n_pinned;
            for (int j = prefix; j <= t; j++)
                assert_int_equal(kvcache_has(c, j), j > t - room);
        }
    }
    pc->steps++;
}

/* Runs `type` with `params` over a random layer; returns the cache positions of KV head 0 and
 * 1 at the end in *out ([HKV][T] flags). */
static void run_press(const char *type, ScoreFn score, const char *params, int budget,
                      int window, bool grow, int P, uint64_t seed, int chunk, int32_t *out)
{
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, seed, 1.0);
    fx->prefill_chunk = chunk;
    Policy *p = fixture_policy(fx, type, params, 7);
    PressCheck pc = {fx, score, budget, window, grow, NULL, 0};
    pc.pinned = calloc((size_t)HKV * T, sizeof *pc.pinned);
    fixture_run(fx, p, T, check_press, &pc);
    assert_int_equal(pc.steps, T - P);
    for (int g = 0; g < HKV; g++)
        for (int j = 0; j < T; j++)
            out[(size_t)g * T + j] = kvcache_has(&p->cache[g], j);
    free(pc.pinned);
    p->type->destroy(p);
    fixture_free(fx);
}

static void check_type(const char *type, ScoreFn score)
{
    int32_t *whole = malloc((size_t)HKV * T * sizeof *whole);
    int32_t *chunked = malloc((size_t)HKV * T * sizeof *chunked);
    /* A long prompt, cut at its end; the same cache whatever the chunking. */
    run_press(type, score, "budget=24 window=6", 24, 6, false, 60, 1, 0, whole);
    run_press(type, score, "budget=24 window=6", 24, 6, false, 60, 1, 7, chunked);
    assert_memory_equal(whole, chunked, (size_t)HKV * T * sizeof *whole);
    run_press(type, score, "budget=16 window=0", 16, 0, false, 50, 2, 0, whole);
    run_press(type, score, "budget=20 window=4 decode=grow", 20, 4, true, 70, 3, 0, whole);
    run_press(type, score, "budget=20 window=4 decode=grow", 20, 4, true, 70, 3, 9, chunked);
    assert_memory_equal(whole, chunked, (size_t)HKV * T * sizeof *whole);
    /* A short prompt is kept whole; its tokens before the window stay pinned. */
    run_press(type, score, "budget=40 window=8", 40, 8, false, 20, 4, 0, whole);
    free(whole);
    free(chunked);
}

static void test_knorm_keeps_smallest_key_norms(void **state)
{
    (void)state;
    check_type("knorm", knorm_scores);
}

static void test_keydiff_keeps_keys_least_like_the_mean(void **state)
{
    (void)state;
    check_type("keydiff", keydiff_scores);
}

/* Planted keys: knorm drops a key of large norm and keeps a small one; keydiff keeps the one
 * key that points away from all the others and drops one that points along them. */
static void test_planted_keys(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(2, 1, D, 60, 40);
    fixture_randomize(fx, 5, 0.2);
    for (int j = 0; j < 60; j++)
        fx_k(fx, 0, j)[0] += 1.0f; /* every key points roughly along channel 0 */
    fx_k(fx, 0, 3)[0] = 20.0f;     /* the largest norm, and the most like the mean */
    fx_k(fx, 0, 7)[0] = -1.0f;     /* pointing away from the mean */
    for (int d = 0; d < D; d++)
        fx_k(fx, 0, 11)[d] = 0.01f; /* the smallest norm */
    Policy *p = fixture_policy(fx, "knorm", "budget=16 window=4", 7);
    fixture_run(fx, p, 41, NULL, NULL);
    assert_false(kvcache_has(&p->cache[0], 3));
    assert_true(kvcache_has(&p->cache[0], 11));
    p->type->destroy(p);
    p = fixture_policy(fx, "keydiff", "budget=16 window=4", 7);
    fixture_run(fx, p, 41, NULL, NULL);
    assert_true(kvcache_has(&p->cache[0], 7));
    assert_false(kvcache_has(&p->cache[0], 3));
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_rejects_window_at_budget(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("knorm");
    assert_non_null(type);
    void *prm = calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(policy_param_set(type, prm, "budget", "32", &err), 0);
    assert_int_equal(policy_param_set(type, prm, "window", "32", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "window"));
    assert_int_equal(policy_param_set(type, prm, "window", "31", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_knorm_keeps_smallest_key_norms),
        cmocka_unit_test(test_keydiff_keeps_keys_least_like_the_mean),
        cmocka_unit_test(test_planted_keys),
        cmocka_unit_test(test_rejects_window_at_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
