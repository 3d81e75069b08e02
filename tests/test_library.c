/* The defining properties of the policy library's newer members, each against the test's own
 * arithmetic:
 *   expected_attention  keeps the tokens the predicted future query attends to most: queries
 *                       whose pre-RoPE form is one vector u predict the query rope(u, P); queries
 *                       +-u (mean 0, covariance u u^T) predict the keys of largest |k . rope(u, P)|;
 *   adakv               one budget per layer: the heads together keep H * K, each at least
 *                       floor(alpha * K), the rest the best scores of all heads; alpha = 1 is the
 *                       inner alone; decode keeps the layer within H * budget;
 *   pyramid             layer l keeps KVCache-Factory's max - l * steps (the same total), a short
 *                       prompt every layer the inner's K (the inner alone);
 *   gqa                 the group reductions: sum, mean (h2o's choice is unchanged) and max
 *                       (snapkv keeps the best window sums of the group's best head);
 *   r_kv                with lambda = 1 keeps the window's most attended tokens (group max of
 *                       the logits, softmax, mean over the window); with lambda = 0 drops the
 *                       redundant ones (near copies of one key, but the last copy); the cache
 *                       grows to budget + buffer and is cut back to budget. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "policies/rank.h"
#include "policies/wrap.h"
#include "sim/format/geometry.h"
#include "sim/replay/config.h"
#include "tests/support/fixture.h"
#include "tests/support/scratch.h"

enum { HQ = 4, HKV = 2, D = 8, T = 120 };

static double dot(const float *a, const float *b)
{
    double s = 0;
    for (int d = 0; d < D; d++)
        s += (double)a[d] * b[d];
    return s;
}

static double key_norm(Fixture *fx, int g, int j)
{
    return sqrt(dot(fx_k(fx, g, j), fx_k(fx, g, j)));
}

/* Of the prompt's positions [lo, hi) of KV head g, every kept one scores at least as high as
 * every dropped one; returns how many are kept. */
static int check_kept_best(const Policy *p, int g, int lo, int hi, const double *score)
{
    double lowest_kept = INFINITY, highest_dropped = -INFINITY;
    int kept = 0;
    for (int j = lo; j < hi; j++) {
        if (kvcache_has(&p->cache[g], j)) {
            kept++;
            lowest_kept = fmin(lowest_kept, score[j]);
        } else {
            highest_dropped = fmax(highest_dropped, score[j]);
        }
    }
    assert_true(lowest_kept >= highest_dropped - 1e-12);
    return kept;
}

/* ---- expected_attention ---- */

static const float U[D] = {1.5f, -0.5f, 0.25f, 2.0f, -1.0f, 0.75f, 0.5f, -1.25f};

/* Prompt queries of every head: rope(sign_i * u, i); returns the predicted query rope(u, P). */
static void plant_queries(Fixture *fx, int P, bool alternate, float *predicted)
{
    for (int h = 0; h < HQ; h++)
        for (int i = 0; i < P; i++) {
            float *q = fx_q(fx, h, i);
            for (int d = 0; d < D; d++)
                q[d] = alternate && i % 2 ? -U[d] : U[d];
            rope_apply(q, D, ROPE_HALF, fx->L.rope_inv_freq, (double)i);
        }
    memcpy(predicted, U, sizeof U);
    rope_apply(predicted, D, ROPE_HALF, fx->L.rope_inv_freq, (double)P);
}

static void test_expected_attention_follows_the_predicted_query(void **state)
{
    (void)state;
    enum { P = 80, B = 24, W = 4 };
    double score[T];
    float predicted[D];
    for (int alternate = 0; alternate <= 1; alternate++) {
        Fixture *fx = fixture_new(HQ, HKV, D, T, P);
        fixture_randomize(fx, 11 + (uint64_t)alternate, 1.0);
        plant_queries(fx, P, alternate, predicted);
        /* One future position: the rotation to position P exactly. Mean u: the keys of largest
         * k . rope(u, P); mean 0 and covariance u u^T: those of largest |k . rope(u, P)|. */
        Policy *p = fixture_policy(fx, "expected_attention",
                                   alternate ? "budget=24 window=4 future=1 sinks=0 vnorm=false"
                                             : "budget=24 window=4 future=1 sinks=0 vnorm=false "
                                               "covariance=false",
                                   7);
        fixture_run(fx, p, P + 1, NULL, NULL);
        for (int g = 0; g < HKV; g++) {
            for (int j = 0; j < P - W; j++) {
                double x = dot(fx_k(fx, g, j), predicted);
                score[j] = alternate ? fabs(x) : x;
            }
            assert_int_equal(check_kept_best(p, g, 0, P - W, score), B - 1 - W);
        }
        p->type->destroy(p);
        fixture_free(fx);
    }
}

/* The first `sinks` tokens stay; with vnorm, a token whose value is zero is dropped whatever
 * its key. */
static void test_expected_attention_sinks_and_value_norm(void **state)
{
    (void)state;
    enum { P = 80 };
    float predicted[D];
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, 13, 1.0);
    plant_queries(fx, P, false, predicted);
    /* Token 40 is the one the predicted query attends to most, but carries no value. */
    for (int g = 0; g < HKV; g++) {
        for (int d = 0; d < D; d++) {
            fx_k(fx, g, 40)[d] = 4.0f * predicted[d];
            fx_v(fx, g, 40)[d] = 0.0f;
        }
    }
    Policy *p = fixture_policy(fx, "expected_attention", "budget=24 window=4 sinks=3", 7);
    fixture_run(fx, p, P + 1, NULL, NULL);
    for (int g = 0; g < HKV; g++) {
        for (int j = 0; j < 3; j++)
            assert_true(kvcache_has(&p->cache[g], j));
        assert_false(kvcache_has(&p->cache[g], 40));
    }
    p->type->destroy(p);
    p = fixture_policy(fx, "expected_attention", "budget=24 window=4 sinks=3 vnorm=false", 7);
    fixture_run(fx, p, P + 1, NULL, NULL);
    for (int g = 0; g < HKV; g++)
        assert_true(kvcache_has(&p->cache[g], 40));
    p->type->destroy(p);
    fixture_free(fx);
}

/* ---- adakv ---- */

typedef struct {
    int budget;
} LayerBudget;

/* Decode: the layer never holds more than H * budget slots at an attention. */
static void check_layer_budget(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)t;
    (void)full_attn;
    const LayerBudget *lb = ud;
    int total = 0;
    for (int g = 0; g < p->n_kv_heads; g++)
        total += p->cache[g].n;
    assert_true(total <= p->n_kv_heads * lb->budget);
}

static void test_adakv_shares_the_layer_budget(void **state)
{
    (void)state;
    enum { P = 90, B = 30, W = 6, K = B - 1 - W };
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, 17, 1.0);
    /* Head 1's keys are long: by knorm's score (-||k||) every one of them is worse than any
     * of head 0's, so head 1 keeps its floor and head 0 the rest. */
    for (int j = 0; j < T; j++)
        for (int d = 0; d < D; d++)
            fx_k(fx, 1, j)[d] *= 10.0f;
    double score[HKV][T];
    for (int g = 0; g < HKV; g++)
        for (int j = 0; j < T; j++)
            score[g][j] = -key_norm(fx, g, j);
    static const double ALPHAS[] = {0.2, 0.5, 0.0};
    for (int a = 0; a < 3; a++) {
        char params[96];
        snprintf(params, sizeof params, "inner=knorm budget=%d window=%d alpha=%g", B, W,
                 ALPHAS[a]);
        Policy *p = fixture_policy(fx, "adakv", params, 7);
        fixture_run(fx, p, P, NULL, NULL);
        int floor_k = (int)(ALPHAS[a] * K);
        int kept1 = check_kept_best(p, 1, 0, P - W, score[1]);
        int kept0 = check_kept_best(p, 0, 0, P - W, score[0]);
        assert_int_equal(kept1, floor_k);
        assert_int_equal(kept0, HKV * K - floor_k);
        for (int g = 0; g < HKV; g++)
            for (int j = P - W; j < P; j++)
                assert_true(kvcache_has(&p->cache[g], j));
        p->type->destroy(p);
        /* A fresh instance through the decode. */
        p = fixture_policy(fx, "adakv", params, 7);
        LayerBudget lb = {B};
        fixture_run(fx, p, T, check_layer_budget, &lb);
        p->type->destroy(p);
    }
    fixture_free(fx);
}

/* Random keys: beyond each head's floor, the kept tokens are the best of both heads together. */
static void test_adakv_global_top_k(void **state)
{
    (void)state;
    enum { P = 90, B = 30, W = 6, K = B - 1 - W };
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, 19, 1.0);
    for (int j = 0; j < T; j++)
        for (int d = 0; d < D; d++)
            fx_k(fx, 1, j)[d] *= 1.3f; /* the heads' scores overlap but differ */
    double score[HKV][T];
    for (int g = 0; g < HKV; g++)
        for (int j = 0; j < T; j++)
            score[g][j] = -key_norm(fx, g, j);
    Policy *p = fixture_policy(fx, "adakv", "inner=knorm budget=30 window=6 alpha=0.2", 7);
    fixture_run(fx, p, P, NULL, NULL);
    int floor_k = (int)(0.2 * K), kept[HKV];
    double lowest_kept = INFINITY, highest_dropped = -INFINITY;
    for (int g = 0; g < HKV; g++) {
        kept[g] = check_kept_best(p, g, 0, P - W, score[g]);
        assert_true(kept[g] >= floor_k);
        /* The head's floor_k best are its floor; the others compete across heads. */
        double kept_score[T];
        int n = 0;
        for (int j = 0; j < P - W; j++)
            if (kvcache_has(&p->cache[g], j))
                kept_score[n++] = score[g][j];
        for (int i = 0; i < n; i++) {
            int better = 0;
            for (int k = 0; k < n; k++)
                better += kept_score[k] > kept_score[i];
            if (better >= floor_k)
                lowest_kept = fmin(lowest_kept, kept_score[i]);
        }
        for (int j = 0; j < P - W; j++)
            if (!kvcache_has(&p->cache[g], j))
                highest_dropped = fmax(highest_dropped, score[g][j]);
    }
    assert_int_equal(kept[0] + kept[1], HKV * K);
    assert_int_not_equal(kept[0], kept[1]); /* the allocation is not uniform here */
    assert_true(lowest_kept >= highest_dropped);
    p->type->destroy(p);
    fixture_free(fx);
}

/* The caches of KV heads 0 and 1 after running to t_end, as flags [HKV][T]. */
static void run_flags(Fixture *fx, const char *type, const char *params, int t_end, int32_t *out)
{
    Policy *p = fixture_policy(fx, type, params, 7);
    fixture_run(fx, p, t_end, NULL, NULL);
    for (int g = 0; g < HKV; g++)
        for (int j = 0; j < T; j++)
            out[(size_t)g * T + j] = kvcache_has(&p->cache[g], j);
    p->type->destroy(p);
}

static void test_wrappers_reduce_to_the_inner(void **state)
{
    (void)state;
    int32_t a[HKV * T], b[HKV * T];
    /* adakv with alpha = 1: every head keeps K, as snapkv alone. */
    Fixture *fx = fixture_new(HQ, HKV, D, T, 90);
    fixture_randomize(fx, 23, 1.0);
    run_flags(fx, "snapkv", "budget=30 observation=6 kernel=3", T, a);
    run_flags(fx, "adakv", "inner=snapkv budget=30 observation=6 kernel=3 alpha=1", T, b);
    assert_memory_equal(a, b, sizeof a);
    /* pyramid on a short prompt (n + W < 2K): every layer keeps K, as knorm alone. */
    fixture_free(fx);
    fx = fixture_new(HQ, HKV, D, T, 40);
    fixture_randomize(fx, 29, 1.0);
    fx->meta.n_layers = 4;
    fx->L.layer = 3;
    run_flags(fx, "knorm", "budget=30 window=6", T, a);
    run_flags(fx, "pyramid", "inner=knorm budget=30 window=6", T, b);
    assert_memory_equal(a, b, sizeof a);
    fx->meta.n_layers = 1;
    fixture_free(fx);
}

/* ---- pyramid ---- */

static void test_pyramid_budgets_shrink_with_depth(void **state)
{
    (void)state;
    enum { P = 100, B = 40, W = 8, K = B - 1 - W, LAYERS = 4 };
    /* KVCache-Factory with n = P - W = 92 candidates: min = 31 / 20 = 1, max = 61 (< 92),
     * steps = 60 / 3 = 20: layers keep 61, 41, 21, 1 (124 = 4 * 31 together). */
    static const int KEEP[LAYERS] = {61, 41, 21, 1};
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, 31, 1.0);
    fx->meta.n_layers = LAYERS;
    double score[T];
    int total = 0;
    for (int l = 0; l < LAYERS; l++) {
        fx->L.layer = l;
        Policy *p = fixture_policy(fx, "pyramid", "inner=knorm budget=40 window=8", 7);
        fixture_run(fx, p, P, NULL, NULL);
        for (int g = 0; g < HKV; g++) {
            for (int j = 0; j < T; j++)
                score[j] = -key_norm(fx, g, j);
            assert_int_equal(check_kept_best(p, g, 0, P - W, score), KEEP[l]);
        }
        total += KEEP[l];
        /* Decode (a fresh instance): the layer's budget is KEEP[l] + W + 1 per head. */
        p->type->destroy(p);
        p = fixture_policy(fx, "pyramid", "inner=knorm budget=40 window=8", 7);
        LayerBudget lb = {KEEP[l] + W + 1};
        fixture_run(fx, p, T, check_layer_budget, &lb);
        assert_int_equal(p->cache[0].n, KEEP[l] + W);
        p->type->destroy(p);
    }
    assert_int_equal(total, LAYERS * K);
    fx->meta.n_layers = 1;
    fixture_free(fx);
}

/* ---- gqa ---- */

static void test_reduce_rows(void **state)
{
    (void)state;
    const float a[] = {1, 5, 2, 9, /* row 1 */ 3, 1, 2, -1};
    float out[4];
    rank_reduce_rows(a, 2, 3, 4, RANK_GQA_SUM, out);
    assert_true(out[0] == 4 && out[1] == 6 && out[2] == 4);
    rank_reduce_rows(a, 2, 3, 4, RANK_GQA_MEAN, out);
    assert_true(out[0] == 2 && out[1] == 3 && out[2] == 2);
    rank_reduce_rows(a, 2, 3, 4, RANK_GQA_MAX, out);
    assert_true(out[0] == 3 && out[1] == 5 && out[2] == 2);
}

/* snapkv with gqa = max keeps the tokens of largest max over the group's heads of the window's
 * summed attention (kernel 1: no pooling); on this layer that differs from the sum's choice. */
static void test_snapkv_gqa_max(void **state)
{
    (void)state;
    enum { P = 80, B = 20, W = 6 };
    int32_t sum_flags[HKV * T], max_flags[HKV * T];
    /* A layer on which the two reductions choose differently (so that the test tells them
     * apart): the first of a few seeds. */
    Fixture *fx = NULL;
    for (uint64_t seed = 37; seed < 57 && !fx; seed++) {
        fx = fixture_new(HQ, HKV, D, T, P);
        fixture_randomize(fx, seed, 2.0);
        run_flags(fx, "snapkv", "budget=20 observation=6 kernel=1", P, sum_flags);
        run_flags(fx, "snapkv", "budget=20 observation=6 kernel=1 gqa=max", P, max_flags);
        if (!memcmp(sum_flags, max_flags, sizeof sum_flags)) {
            fixture_free(fx);
            fx = NULL;
        }
    }
    assert_non_null(fx);
    float *attn = malloc((size_t)HQ * T * sizeof *attn);
    double win[HQ][T];
    memset(win, 0, sizeof win);
    for (int i = P - W; i < P; i++) {
        fixture_full_attn(fx, i, attn);
        for (int h = 0; h < HQ; h++)
            for (int j = 0; j < P - W; j++)
                win[h][j] += attn[(size_t)h * T + j];
    }
    free(attn);
    Policy *p = fixture_policy(fx, "snapkv", "budget=20 observation=6 kernel=1 gqa=max", 7);
    fixture_run(fx, p, P, NULL, NULL);
    double score[T];
    for (int g = 0; g < HKV; g++) {
        for (int j = 0; j < P - W; j++)
            score[j] = fmax(win[2 * g][j], win[2 * g + 1][j]);
        assert_int_equal(check_kept_best(p, g, 0, P - W, score), B - 1 - W);
    }
    p->type->destroy(p);
    /* mean = sum / group: the same choice as the sum. */
    run_flags(fx, "snapkv", "budget=20 observation=6 kernel=1 gqa=mean", P, max_flags);
    assert_memory_equal(sum_flags, max_flags, sizeof sum_flags);
    run_flags(fx, "h2o", "budget=20", T, sum_flags);
    run_flags(fx, "h2o", "budget=20 gqa=mean", T, max_flags);
    assert_memory_equal(sum_flags, max_flags, sizeof sum_flags);
    fixture_free(fx);
}

/* ---- r_kv ---- */

static void test_r_kv_importance(void **state)
{
    (void)state;
    enum { P = 60, B = 24, W = 4, M = P - W };
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, 41, 1.5);
    Policy *p = fixture_policy(fx, "r_kv", "budget=24 window=4 kernel=1 lambda=1 buffer=10", 7);
    fixture_run(fx, p, P, NULL, NULL);
    for (int g = 0; g < HKV; g++) {
        double imp[T] = {0};
        for (int i = P - W; i < P; i++) {
            double logit[M], top = -INFINITY, sum = 0;
            for (int j = 0; j < M; j++) {
                logit[j] = -INFINITY;
                for (int a = 0; a < 2; a++) /* group max */
                    logit[j] = fmax(logit[j],
                                    fx->L.attn_scale * dot(fx_q(fx, 2 * g + a, i), fx_k(fx, g, j)));
                top = fmax(top, logit[j]);
            }
            for (int j = 0; j < M; j++)
                sum += exp(logit[j] - top);
            for (int j = 0; j < M; j++)
                imp[j] += exp(logit[j] - top) / sum / W;
        }
        assert_int_equal(check_kept_best(p, g, 0, M, imp), B - W);
        assert_int_equal(p->cache[g].n, B);
    }
    /* Decode (a fresh instance): at most budget + buffer slots at an attention. */
    p->type->destroy(p);
    p = fixture_policy(fx, "r_kv", "budget=24 window=4 kernel=1 lambda=1 buffer=10", 7);
    LayerBudget lb = {B + 10};
    fixture_run(fx, p, T, check_layer_budget, &lb);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_r_kv_drops_redundant_keys(void **state)
{
    (void)state;
    enum { P = 60, B = 24, W = 4 };
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, 43, 1.0);
    /* Positions 10..39: near copies of one key. */
    for (int g = 0; g < HKV; g++)
        for (int j = 10; j < 40; j++)
            for (int d = 0; d < D; d++)
                fx_k(fx, g, j)[d] = U[d] + 0.01f * fx_k(fx, g, j)[d];
    Policy *p = fixture_policy(fx, "r_kv", "budget=24 window=4 lambda=0", 7);
    fixture_run(fx, p, P, NULL, NULL);
    for (int g = 0; g < HKV; g++) {
        assert_int_equal(p->cache[g].n, B);
        /* Each copy's row zeroes its last similar column: the last copy (39) is not counted
         * as redundant, every other copy is, and goes first. */
        for (int j = 10; j < 39; j++)
            assert_false(kvcache_has(&p->cache[g], j));
    }
    p->type->destroy(p);
    /* With lambda = 1 the redundancy does not count: copies the window attends to stay. */
    p = fixture_policy(fx, "r_kv", "budget=24 window=4 lambda=1", 7);
    fixture_run(fx, p, P, NULL, NULL);
    int copies = 0;
    for (int g = 0; g < HKV; g++)
        for (int j = 10; j < 39; j++)
            copies += kvcache_has(&p->cache[g], j);
    assert_true(copies > 0);
    p->type->destroy(p);
    fixture_free(fx);
}

/* A wrapper in a config: the inner's keys in any order after inner =, [run] budget sets the
 * inner's budget unless the section does, and a bad inner key fails at its line. */
static void test_wrapper_config(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "w.ini", 0);
    scratch_write(path, "[run]\nbudget = 256\n"
                        "[policy.a]\ntype = adakv\ninner = snapkv\nobservation = 16\nalpha = 0.5\n"
                        "[policy.b]\ntype = pyramid\ninner = knorm\nbudget = 128\nwindow = 8\n");
    RunConfig rc;
    KvErr err;
    if (config_load(path, &rc, &err) != 0)
        fail_msg("%s", err.msg);
    int budget[2], window[2];
    bool grow;
    for (int i = 0; i < 2; i++)
        wrap_frame(rc.engine.policies[i].params, &budget[i], &window[i], &grow);
    assert_int_equal(budget[0], 256);
    assert_int_equal(window[0], 16);
    assert_int_equal(budget[1], 128);
    assert_int_equal(window[1], 8);
    assert_true(((const WrapParams *)rc.engine.policies[0].params)->alpha == 0.5);
    config_free(&rc);
    scratch_write(path, "[policy.a]\ntype = adakv\ninner = knorm\nbudget = 64\nkernel = 3\n");
    assert_int_equal(config_load(path, &rc, &err), -1);
    assert_non_null(strstr(err.msg, ":5:"));
    assert_non_null(strstr(err.msg, "unknown key 'kernel'"));
    scratch_remove(dir);
}

/* decay (the fixture is all system prompt: pinning off), hybrid, h2o, tova, expected_attention,
 * r_kv: gqa = mean chooses as the sum (group 2 halves exactly; tova's default is the mean), and
 * another reduction chooses differently on some layer (the option reaches the choice). */
static void test_gqa_reaches_every_scorer(void **state)
{
    (void)state;
    static const struct {
        const char *type, *base, *alt_same, *alt_diff;
    } CASES[] = {
        {"decay", "budget=24 local=6 pin_system=false", "budget=24 local=6 pin_system=false gqa=mean",
         "budget=24 local=6 pin_system=false gqa=max"},
        {"hybrid", "budget=24", "budget=24 gqa=mean", "budget=24 gqa=max"},
        {"h2o", "budget=24", "budget=24 gqa=mean", "budget=24 gqa=max"},
        {"tova", "budget=24 gqa=sum", "budget=24", "budget=24 gqa=max"},
        {"expected_attention", "budget=24 window=4", NULL, "budget=24 window=4 gqa=max"},
        {"r_kv", "budget=24 window=4 buffer=6", NULL, "budget=24 window=4 buffer=6 gqa=mean"},
    };
    int32_t a[HKV * T], b[HKV * T];
    for (size_t c = 0; c < sizeof CASES / sizeof CASES[0]; c++) {
        bool differs = false;
        for (uint64_t seed = 51; seed < 61 && !differs; seed++) {
            Fixture *fx = fixture_new(HQ, HKV, D, T, 70);
            fixture_randomize(fx, seed, 2.0);
            run_flags(fx, CASES[c].type, CASES[c].base, T, a);
            if (CASES[c].alt_same) {
                run_flags(fx, CASES[c].type, CASES[c].alt_same, T, b);
                assert_memory_equal(a, b, sizeof a);
            }
            run_flags(fx, CASES[c].type, CASES[c].alt_diff, T, b);
            differs = memcmp(a, b, sizeof a) != 0;
            fixture_free(fx);
        }
        if (!differs)
            fail_msg("%s: %s chooses as %s on every layer tried", CASES[c].type,
                     CASES[c].alt_diff, CASES[c].base);
    }
}

static void test_wrapper_errors(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("adakv");
    void *prm = calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(policy_param_set(type, prm, "inner", "h2o", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "per-token scores"));
    assert_int_equal(policy_param_set(type, prm, "inner", "knorm", &err), 0);
    assert_int_equal(policy_param_set(type, prm, "observation", "8", &err), -1);
    assert_non_null(strstr(err.msg, "observation"));
    policy_params_defaults(type, prm);
    assert_int_equal(policy_param_set(type, prm, "inner", "knorm", &err), 0);
    assert_int_equal(policy_param_set(type, prm, "budget", "64", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "window", "64", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_int_equal(policy_param_set(type, prm, "window", "8", &err), 0); /* replaces it */
    assert_int_equal(type->validate(prm, &err), 0);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expected_attention_follows_the_predicted_query),
        cmocka_unit_test(test_expected_attention_sinks_and_value_norm),
        cmocka_unit_test(test_adakv_shares_the_layer_budget),
        cmocka_unit_test(test_adakv_global_top_k),
        cmocka_unit_test(test_wrappers_reduce_to_the_inner),
        cmocka_unit_test(test_pyramid_budgets_shrink_with_depth),
        cmocka_unit_test(test_reduce_rows),
        cmocka_unit_test(test_snapkv_gqa_max),
        cmocka_unit_test(test_gqa_reaches_every_scorer),
        cmocka_unit_test(test_r_kv_importance),
        cmocka_unit_test(test_r_kv_drops_redundant_keys),
        cmocka_unit_test(test_wrapper_errors),
        cmocka_unit_test(test_wrapper_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
