/* Each metric against values computed by hand on a 3-token example. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "sim/replay/metrics.h"

/* One query head, scale 1, q = (1, 0); keys (0,0), (1,0), (2,0): logits 0, 1, 2.
 * Values (1,0), (0,1), (1,1). */
static const float q[2] = {1, 0};
static const float keys[3][2] = {{0, 0}, {1, 0}, {2, 0}};
static const float values[3][2] = {{1, 0}, {0, 1}, {1, 1}};

typedef struct {
    float p[3];
    float o_full[2];
    FullRow row;
    KVCache cache;
    TraceMeta meta;
} Example;

static void example_init(Example *x)
{
    double z = 1 + exp(1) + exp(2);
    x->p[0] = (float)(1 / z);
    x->p[1] = (float)(exp(1) / z);
    x->p[2] = (float)(exp(2) / z);
    x->o_full[0] = x->p[0] + x->p[2];
    x->o_full[1] = x->p[1] + x->p[2];
    x->row = (FullRow){
        .t = 2, .head_dim = 2, .scale = 1.0f, .q = q, .p = x->p, .logit_max = 2.0f,
        .logit_z = (float)(z / exp(2)), .k = &keys[0][0], .v = &values[0][0],
        .o_full = x->o_full,
    };
    kvcache_init(&x->cache, 3, 2);
}

static void test_retained_mass_and_renormalised_attention(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    kvcache_add(&x.cache, 0);
    kvcache_add(&x.cache, 2);
    float attn[2];
    CacheAttention ca = cache_attention(&x.cache, &x.row, attn);
    double z = 1 + exp(1) + exp(2);
    assert_float_equal(ca.retained_mass, (1 + exp(2)) / z, 1e-6);
    /* Renormalised on {0, 2}: 1/(1+e^2) and e^2/(1+e^2), in slot order. */
    assert_float_equal(attn[0], 1 / (1 + exp(2)), 1e-6);
    assert_float_equal(attn[1], exp(2) / (1 + exp(2)), 1e-6);
    /* All three keys: mass 1 exactly, attention = p. */
    kvcache_add(&x.cache, 1);
    float all[3];
    ca = cache_attention(&x.cache, &x.row, all);
    assert_float_equal(ca.retained_mass, 1.0, 1e-12);
    assert_float_equal(all[2], exp(1) / z, 1e-6);
    kvcache_free(&x.cache);
}

static void test_large_cache_uses_complement_consistently(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    kvcache_add(&x.cache, 1);
    kvcache_add(&x.cache, 2); /* two of three: the complement path */
    CacheAttention ca = cache_attention(&x.cache, &x.row, NULL);
    double z = 1 + exp(1) + exp(2);
    assert_float_equal(ca.retained_mass, (exp(1) + exp(2)) / z, 1e-6);
    kvcache_free(&x.cache);
}

static void test_recall_at_k(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    kvcache_add(&x.cache, 0);
    kvcache_add(&x.cache, 2);
    int32_t top[3];
    topk_indices(x.p, 3, 1, top);
    assert_int_equal(top[0], 2);
    assert_float_equal(recall_at_k(&x.cache, top, 1), 1.0, 0);
    topk_indices(x.p, 3, 2, top); /* {2, 1}: only 2 is cached */
    assert_float_equal(recall_at_k(&x.cache, top, 2), 0.5, 0);
    topk_indices(x.p, 3, 3, top);
    assert_float_equal(recall_at_k(&x.cache, top, 3), 2.0 / 3.0, 1e-12);
    /* Ties go to the lower index. */
    const float tied[4] = {0.25f, 0.5f, 0.125f, 0.125f};
    topk_indices(tied, 4, 3, top);
    int has2 = top[0] == 2 || top[1] == 2 || top[2] == 2;
    int has3 = top[0] == 3 || top[1] == 3 || top[2] == 3;
    assert_true(has2 && !has3);
    kvcache_free(&x.cache);
}

static void test_output_error(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    kvcache_add(&x.cache, 0);
    kvcache_add(&x.cache, 2);
    float attn[3], scratch[8];
    double err;
    cache_attention(&x.cache, &x.row, attn);
    /* o_S = (p0 v0 + p2 v2) / (p0 + p2) = (1, e^2/(1+e^2)). */
    double z = 1 + exp(1) + exp(2);
    double p0 = 1 / z, p1 = exp(1) / z, p2 = exp(2) / z;
    double os0 = 1, os1 = exp(2) / (1 + exp(2));
    double of0 = p0 + p2, of1 = p1 + p2;
    double want = sqrt((os0 - of0) * (os0 - of0) + (os1 - of1) * (os1 - of1)) /
                  sqrt(of0 * of0 + of1 * of1);
    assert_true(output_errors_needed(&x.cache, 2));
    output_errors(&x.cache, &x.row, 1, attn, scratch, &err);
    assert_float_equal(err, want, 1e-5);
    /* The full cache reproduces the full output, with nothing to compute. */
    kvcache_add(&x.cache, 1);
    assert_false(output_errors_needed(&x.cache, 2));
    cache_attention(&x.cache, &x.row, attn);
    output_errors(&x.cache, &x.row, 1, attn, scratch, &err);
    assert_float_equal(err, 0.0, 0);
    kvcache_free(&x.cache);
}

static void test_alt_slot_weighs_with_its_own_key(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    /* Position 1 restored with an approximate key (2,0) and value (0,2); position 0 exact. */
    kvcache_add(&x.cache, 0);
    const float k_alt[2] = {2, 0}, v_alt[2] = {0, 2};
    kvcache_add_alt(&x.cache, 1, k_alt, v_alt);
    float attn[2];
    CacheAttention ca = cache_attention(&x.cache, &x.row, attn);
    double z = 1 + exp(1) + exp(2);
    /* Exact mass counts position 0 only; the alt slot weighs exp(2)/z. */
    assert_float_equal(ca.retained_mass, 1 / z, 1e-6);
    assert_float_equal(ca.denominator, (1 + exp(2)) / z, 1e-6);
    assert_float_equal(attn[1], exp(2) / (1 + exp(2)), 1e-6);
    /* o_S = (1*(1,0) + e^2*(0,2)) / (1 + e^2) */
    double os0 = 1 / (1 + exp(2)), os1 = 2 * exp(2) / (1 + exp(2));
    double of0 = (1 + exp(2)) / z, of1 = (exp(1) + exp(2)) / z;
    double want = sqrt((os0 - of0) * (os0 - of0) + (os1 - of1) * (os1 - of1)) /
                  sqrt(of0 * of0 + of1 * of1);
    float scratch[6];
    double err;
    assert_true(output_errors_needed(&x.cache, 2));
    output_errors(&x.cache, &x.row, 1, attn, scratch, &err);
    assert_float_equal(err, want, 1e-5);
    /* recall counts the restored position as present */
    int32_t top[2];
    topk_indices(x.p, 3, 2, top);
    assert_float_equal(recall_at_k(&x.cache, top, 2), 0.5, 0);
    kvcache_free(&x.cache);
}

/* A cache that holds less than FLT_MIN of the row: the float32 probabilities of its keys are
 * zero or subnormal, and the renormalised attention must come from the logits. Logits 0, -200,
 * -201 (query (1, 0), keys (0,0), (-200,0), (-201,0)): p1 = e^-200 underflows to 0 in float. */
static void test_renormalisation_exact_when_the_cache_underflows(void **state)
{
    (void)state;
    static const float qq[2] = {1, 0};
    static const float kk[3][2] = {{0, 0}, {-200, 0}, {-201, 0}};
    static const float vv[3][2] = {{1, 0}, {0, 1}, {0, 3}};
    double z = 1 + exp(-200) + exp(-201);
    float p[3] = {(float)(1 / z), (float)(exp(-200) / z), (float)(exp(-201) / z)};
    assert_true(p[1] == 0.0f && p[2] == 0.0f); /* the premise: float32 underflows */
    float o_full[2] = {1, 0};
    FullRow row = {.t = 2, .head_dim = 2, .scale = 1.0f, .q = qq, .p = p, .logit_max = 0.0f,
                   .logit_z = (float)z, .k = &kk[0][0], .v = &vv[0][0], .o_full = o_full};
    KVCache c;
    kvcache_init(&c, 3, 2);
    kvcache_add(&c, 2);
    kvcache_add(&c, 1);
    float attn[2];
    cache_attention(&c, &row, attn);
    /* softmax(-201, -200) in slot order */
    assert_float_equal(attn[0], 1 / (1 + exp(1)), 1e-6);
    assert_float_equal(attn[1], exp(1) / (1 + exp(1)), 1e-6);
    /* o_S = (1/(1+e)) (0,3) + (e/(1+e)) (0,1); o_full = (1, 0) */
    float scratch[8];
    double err;
    output_errors(&c, &row, 1, attn, scratch, &err);
    double os1 = (3 + exp(1)) / (1 + exp(1));
    assert_true(isfinite(err));
    assert_float_equal(err, sqrt(1 + os1 * os1), 1e-5);
    kvcache_free(&c);
}

/* A synthetic slot whose logit is far above the row's maximum (a sum of many keys): its weight
 * relative to the full row overflows, the renormalised attention must still be finite and
 * sum to 1. Logits: exact key 2 -> 2, alt key (1000, 0) -> 1000. */
static void test_renormalisation_finite_for_an_overwhelming_alt_slot(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    kvcache_add(&x.cache, 2);
    const float k_alt[2] = {1000, 0}, v_alt[2] = {0, 1};
    kvcache_add_alt(&x.cache, -1, k_alt, v_alt);
    float attn[2];
    cache_attention(&x.cache, &x.row, attn);
    assert_true(isfinite(attn[0]) && isfinite(attn[1]));
    assert_float_equal(attn[0], exp(2 - 1000), 1e-30);
    assert_float_equal(attn[1], 1.0, 1e-7);
    kvcache_free(&x.cache);
}

static void test_needle_survival(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    kvcache_add(&x.cache, 0);
    kvcache_add(&x.cache, 2);
    int32_t needles[4] = {0, 2, 2, 3};
    x.meta.n_needles = 2;
    x.meta.needles = needles;
    assert_float_equal(needle_survival(&x.cache, &x.meta, 2), 2.0 / 3.0, 1e-12);
    assert_float_equal(needle_survival(&x.cache, &x.meta, 1), 0.5, 1e-12); /* only 0, 1 exist */
    x.meta.n_needles = 0;
    assert_true(isnan(needle_survival(&x.cache, &x.meta, 2)));
    kvcache_free(&x.cache);
}

/* A sliding-window layer of 2 keys: query 2 attends over keys 1 and 2 only, so p = (0, e, e^2) /
 * (e + e^2). A cached key 0 gets no attention, exactly (not the share a softmax over the cache
 * would give it), whether exact or approximate; a cache of key 0 alone attends nothing. */
static void test_window_excludes_keys_before_it(void **state)
{
    (void)state;
    Example x;
    example_init(&x);
    double z = exp(1) + exp(2);
    x.p[0] = 0.0f;
    x.p[1] = (float)(exp(1) / z);
    x.p[2] = (float)(exp(2) / z);
    x.row.window = 2;
    x.row.logit_z = (float)(z / exp(2));
    kvcache_add(&x.cache, 0);
    kvcache_add(&x.cache, 2);
    float attn[3];
    CacheAttention ca = cache_attention(&x.cache, &x.row, attn);
    assert_float_equal(ca.retained_mass, exp(2) / z, 1e-6);
    assert_true(attn[0] == 0.0f);
    assert_float_equal(attn[1], 1.0, 1e-6);
    /* key 0 approximate: still outside the window */
    const float alt[4] = {5, 0, 1, 1};
    kvcache_add_alt(&x.cache, 0, alt, alt + 2);
    ca = cache_attention(&x.cache, &x.row, attn);
    for (int i = 0; i < x.cache.n; i++)
        assert_float_equal(attn[i], x.cache.pos[i] == 2 ? 1.0 : 0.0, 1e-6);
    /* nothing inside the window: no attention at all */
    kvcache_remove(&x.cache, 2);
    ca = cache_attention(&x.cache, &x.row, attn);
    assert_int_equal(x.cache.n, 1);
    assert_true(attn[0] == 0.0f);
    assert_float_equal(ca.retained_mass, 0.0, 1e-12);
    kvcache_free(&x.cache);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_retained_mass_and_renormalised_attention),
        cmocka_unit_test(test_window_excludes_keys_before_it),
        cmocka_unit_test(test_large_cache_uses_complement_consistently),
        cmocka_unit_test(test_recall_at_k),
        cmocka_unit_test(test_output_error),
        cmocka_unit_test(test_alt_slot_weighs_with_its_own_key),
        cmocka_unit_test(test_renormalisation_exact_when_the_cache_underflows),
        cmocka_unit_test(test_renormalisation_finite_for_an_overwhelming_alt_slot),
        cmocka_unit_test(test_needle_survival),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
