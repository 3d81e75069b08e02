/* Each metric against values computed by hand on a 3-token example. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <cblas.h>
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/attention.h"
#include "sim/base/half.h"
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

/* A reproducible pseudo-random float in [0, 1). */
static float rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)(*s >> 40) / (float)(1 << 24);
}

static int by_index(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static const float *sort_row; /* the row by_strength compares in */
static int by_strength(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (sort_row[x] != sort_row[y])
        return sort_row[x] > sort_row[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* topk_indices on long rows (where it bounds the k-th value before selecting) gives the set a
 * full sort by (value, lower index) gives: rows that grow towards their end, random rows, rows
 * of few distinct values (ties), flat rows and a single spike. */
static void test_topk_matches_a_full_sort(void **state)
{
    (void)state;
    enum { N = 5000 };
    static float p[N];
    static int32_t all[N], got[64];
    uint64_t seed = 1;
    const int lens[] = {7, 64, 300, 1000, 4097, N}, ks[] = {1, 3, 32, 64};
    for (int pattern = 0; pattern < 5; pattern++)
        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++)
            for (size_t ki = 0; ki < sizeof ks / sizeof *ks; ki++) {
                int n = lens[li], k = ks[ki];
                if (k > n)
                    continue;
                for (int j = 0; j < n; j++) {
                    float r = rnd(&seed);
                    p[j] = pattern == 0   ? (float)j * 1e-4f + r * 1e-3f /* growing */
                           : pattern == 1 ? r
                           : pattern == 2 ? (float)(int)(r * 4) / 4 /* four values: ties */
                           : pattern == 3 ? 0.5f                    /* flat */
                                          : (j == n / 3 ? 1.0f : 0.0f); /* a spike */
                }
                topk_indices(p, n, k, got);
                for (int j = 0; j < n; j++)
                    all[j] = j;
                sort_row = p;
                qsort(all, (size_t)n, sizeof *all, by_strength);
                qsort(all, (size_t)k, sizeof *all, by_index);
                qsort(got, (size_t)k, sizeof *got, by_index);
                assert_memory_equal(got, all, (size_t)k * sizeof *got);
            }
}

/* A random cache of n slots over T positions (alt slots with their own K and V every
 * alt_every-th slot, 0: none), and a full row per head whose p sums to 1. */
typedef struct {
    KVCache c;
    float *q, *k, *v, *p, *o_full;
    uint16_t *v16; /* the values as halves (each value one), when asked for */
    FullRow rows[12];
} RandomCase;

static void random_case(RandomCase *x, int T, int D, int n_heads, int n, int alt_every,
                        bool halves, uint64_t seed)
{
    kvcache_init(&x->c, T, D);
    x->q = malloc((size_t)n_heads * D * sizeof(float));
    x->k = malloc((size_t)T * D * sizeof(float));
    x->v = malloc((size_t)T * D * sizeof(float));
    x->p = malloc((size_t)n_heads * T * sizeof(float));
    x->o_full = malloc((size_t)n_heads * D * sizeof(float));
    x->v16 = halves ? malloc((size_t)T * D * sizeof *x->v16) : NULL;
    for (int i = 0; i < T * D; i++) {
        x->k[i] = rnd(&seed) - 0.5f;
        x->v[i] = rnd(&seed) - 0.5f;
        if (halves) {
            x->v16[i] = half_from_float(x->v[i]);
            x->v[i] = float_from_half(x->v16[i]);
        }
    }
    for (int h = 0; h < n_heads; h++) {
        double z = 0;
        for (int j = 0; j < T; j++)
            z += x->p[(size_t)h * T + j] = rnd(&seed) + 1e-3f;
        for (int j = 0; j < T; j++)
            x->p[(size_t)h * T + j] = (float)(x->p[(size_t)h * T + j] / z);
        for (int d = 0; d < D; d++) {
            x->q[h * D + d] = rnd(&seed) - 0.5f;
            x->o_full[h * D + d] = rnd(&seed) - 0.5f;
        }
        x->rows[h] = (FullRow){.t = T - 1, .head_dim = D, .scale = 0.125f, .q = x->q + h * D,
                               .p = x->p + (size_t)h * T, .logit_max = 1.0f, .logit_z = 4.0f,
                               .k = x->k, .v = x->v, .v16 = x->v16,
                               .o_full = x->o_full + h * D};
    }
    float *kv = malloc(2 * (size_t)D * sizeof(float));
    for (int i = 0; x->c.n < n; i++) {
        int pos = (int)(rnd(&seed) * T);
        if (kvcache_has(&x->c, pos))
            continue;
        if (alt_every && i % alt_every == 0) {
            for (int d = 0; d < 2 * D; d++)
                kv[d] = rnd(&seed) - 0.5f;
            kvcache_add_alt(&x->c, pos, kv, kv + D);
        } else {
            kvcache_add(&x->c, pos);
        }
    }
    free(kv);
}

static void random_case_free(RandomCase *x)
{
    kvcache_free(&x->c);
    free(x->q);
    free(x->k);
    free(x->v);
    free(x->p);
    free(x->o_full);
    free(x->v16);
}

/* cache_attention_heads gives every head exactly (bit for bit) what cache_attention gives it
 * alone, for every group size, with and without alt slots. */
static void test_cache_attention_heads_as_one_head_each(void **state)
{
    (void)state;
    enum { T = 900, D = 16 };
    for (int n_heads = 1; n_heads <= 9; n_heads++)
        for (int alt_every = 0; alt_every <= 7; alt_every += 7) {
            RandomCase x;
            random_case(&x, T, D, n_heads, 400, alt_every, false,
                        (uint64_t)n_heads * 31 + alt_every);
            float *attn = malloc((size_t)n_heads * x.c.n * sizeof(float));
            float *one = malloc((size_t)x.c.n * sizeof(float));
            CacheAttention ca[12];
            cache_attention_heads(&x.c, x.rows, n_heads, attn, ca);
            for (int h = 0; h < n_heads; h++) {
                CacheAttention want = cache_attention(&x.c, &x.rows[h], one);
                assert_memory_equal(&ca[h].retained_mass, &want.retained_mass, sizeof(double));
                assert_memory_equal(&ca[h].denominator, &want.denominator, sizeof(double));
                assert_memory_equal(attn + (size_t)h * x.c.n, one, (size_t)x.c.n * sizeof(float));
                cache_attention_heads(&x.c, &x.rows[h], 1, NULL, &want); /* the mass alone */
                assert_memory_equal(&ca[h].retained_mass, &want.retained_mass, sizeof(double));
            }
            free(attn);
            free(one);
            random_case_free(&x);
        }
}

/* The output error of every group size (kvsim's loop below 12 heads, sgemm from 12) against a
 * double-precision sum; and, where OpenBLAS is the 0.3.21 build whose Haswell sgemm the loop
 * repeats, bit for bit against that sgemm over the gathered values (what earlier versions
 * computed). Caches of 1 to 1500 slots: one block of slots, two, several. */
static void test_output_errors_against_a_double_sum_and_sgemm(void **state)
{
    (void)state;
    enum { T = 1600 };
    openblas_set_num_threads(1); /* as the engine calls it */
    bool haswell_0321 = strcmp(openblas_get_corename(), "Haswell") == 0 &&
                        strncmp(openblas_get_config(), "OpenBLAS 0.3.21 ", 16) == 0;
    const int sizes[] = {1, 7, 8, 9, 319, 320, 500, 641, 1500}, dims[] = {64, 40};
    for (int n_heads = 1; n_heads <= 12; n_heads++)
        for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
            for (size_t di = 0; di < 2 * sizeof dims / sizeof *dims; di++) {
                /* the second half: no alt slot and every value a half (read as halves) */
                bool halves = di >= sizeof dims / sizeof *dims;
                int n = sizes[si], D = dims[di % (sizeof dims / sizeof *dims)];
                RandomCase x;
                random_case(&x, T, D, n_heads, n, halves ? 0 : 5, halves,
                            (uint64_t)(n_heads * 1000 + n + D));
                float *attn = malloc((size_t)n_heads * n * sizeof(float));
                float *scratch = malloc((size_t)(n + n_heads) * D * sizeof(float));
                float *values = malloc((size_t)n * D * sizeof(float));
                float *out = malloc((size_t)n_heads * D * sizeof(float));
                CacheAttention ca[12];
                double err[12];
                cache_attention_heads(&x.c, x.rows, n_heads, attn, ca);
                output_errors(&x.c, x.rows, n_heads, attn, scratch, err);
                if (halves) { /* the same bits as from the float32 values */
                    double from_floats[12];
                    for (int h = 0; h < n_heads; h++)
                        x.rows[h].v16 = NULL;
                    output_errors(&x.c, x.rows, n_heads, attn, scratch, from_floats);
                    assert_memory_equal(err, from_floats, (size_t)n_heads * sizeof *err);
                }
                for (int i = 0; i < n; i++)
                    memcpy(values + (size_t)i * D,
                           x.c.alt_kv[i] ? x.c.alt_kv[i] + D : x.v + (size_t)x.c.pos[i] * D,
                           (size_t)D * sizeof(float));
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_heads, D, n, 1.0f, attn,
                            n, values, D, 0.0f, out, D);
                for (int h = 0; h < n_heads; h++) {
                    double diff = 0, full = 0;
                    for (int d = 0; d < D; d++) {
                        double o = 0;
                        for (int i = 0; i < n; i++)
                            o += (double)attn[(size_t)h * n + i] * values[(size_t)i * D + d];
                        double f = x.rows[h].o_full[d];
                        diff += (o - f) * (o - f);
                        full += f * f;
                    }
                    assert_float_equal(err[h], sqrt(diff / full), 1e-5 * sqrt(diff / full));
                    if (!haswell_0321)
                        continue;
                    float *o = out + (size_t)h * D;
                    cblas_saxpy(D, -1.0f, x.rows[h].o_full, 1, o, 1);
                    double norm_full = cblas_snrm2(D, x.rows[h].o_full, 1);
                    double sgemm_err = cblas_snrm2(D, o, 1) / norm_full;
                    if (memcmp(&err[h], &sgemm_err, sizeof(double)) != 0)
                        print_error("heads %d, slots %d, head_dim %d, head %d: %.17g, "
                                    "sgemm %.17g\n",
                                    n_heads, n, D, h, err[h], sgemm_err);
                    assert_memory_equal(&err[h], &sgemm_err, sizeof(double));
                }
                free(attn);
                free(scratch);
                free(values);
                free(out);
                random_case_free(&x);
            }
}

/* ---- Nested caches (nested_metrics) against the slot-order functions ---- */

/* A row whose caches nest: n_heads query heads over one KV head's T keys, query t = T - 1, on
 * a layer of `window` keys (0: global). Each head's p is dyadic (integer weights over a power
 * of two, exact in float, so every sum of them is exact in double and the mass is the same
 * whichever way a cache's p are added) and zero before the window; `bad[h]` >= 0: head h's p
 * at that position is a subnormal (a share below FLT_MIN). o_full = sum_j p_j v_j. */
typedef struct {
    int T, D, n_heads, k, stride;
    float *q, *kk, *v, *p, *o_full;
    int32_t *topk; /* [n_heads][stride]: each head's top-k positions */
    FullRow rows[4];
} NestRow;

static void nest_row(NestRow *x, int T, int D, int n_heads, int window, const int *bad,
                     uint64_t seed)
{
    *x = (NestRow){.T = T, .D = D, .n_heads = n_heads, .k = 8, .stride = 11};
    x->q = malloc((size_t)n_heads * D * sizeof(float));
    x->kk = malloc((size_t)T * D * sizeof(float));
    x->v = malloc((size_t)T * D * sizeof(float));
    x->p = malloc((size_t)n_heads * T * sizeof(float));
    x->o_full = malloc((size_t)n_heads * D * sizeof(float));
    x->topk = malloc((size_t)n_heads * x->stride * sizeof(int32_t));
    for (int i = 0; i < T * D; i++) {
        x->kk[i] = 4 * (rnd(&seed) - 0.5f);
        x->v[i] = rnd(&seed) - 0.5f;
    }
    int t = T - 1, first = attn_first_key(window, t);
    int32_t *weight = malloc((size_t)T * sizeof *weight);
    for (int h = 0; h < n_heads; h++) {
        float *p = x->p + (size_t)h * T;
        int64_t total = 0, pow2 = 1;
        for (int j = 0; j < T; j++) {
            weight[j] = j < first || j == bad[h] ? 0 : 1 + (int32_t)(rnd(&seed) * 4096);
            total += weight[j];
        }
        while (pow2 < total)
            pow2 *= 2;
        weight[t] += (int32_t)(pow2 - total); /* the weights sum to a power of two */
        for (int j = 0; j < T; j++)
            p[j] = (float)weight[j] / (float)pow2;
        if (bad[h] >= 0)
            p[bad[h]] = 1e-42f; /* subnormal */
        for (int d = 0; d < D; d++) {
            x->q[h * D + d] = rnd(&seed) - 0.5f;
            double o = 0;
            for (int j = first; j <= t; j++)
                o += (double)p[j] * x->v[(size_t)j * D + d];
            x->o_full[h * D + d] = (float)o;
        }
        topk_indices(p, T, x->k, x->topk + (size_t)h * x->stride);
        x->rows[h] = (FullRow){.t = t, .head_dim = D, .scale = 0.25f, .window = window,
                               .q = x->q + h * D, .p = p, .logit_max = 1.0f, .logit_z = 4.0f,
                               .k = x->kk, .v = x->v, .o_full = x->o_full + h * D};
    }
    free(weight);
}

static void nest_row_free(NestRow *x)
{
    free(x->q);
    free(x->kk);
    free(x->v);
    free(x->p);
    free(x->o_full);
    free(x->topk);
}

/* nested_metrics of sizes[0, n_sizes) over `order`, into mass/err/recall [n_sizes][n_heads];
 * rank_of filled first with garbage: in range [0, T) (garbage 0) or any int (1). */
static void nested_run(const NestRow *x, const int32_t *order, const int *sizes, int n_sizes,
                       int garbage, uint64_t seed, double *mass, double *err, double *recall)
{
    int n = sizes[n_sizes - 1];
    float *scratch = malloc(nested_scratch_floats(n, n_sizes, x->n_heads, x->D) * sizeof(float));
    int32_t *rank_of = malloc((size_t)x->T * sizeof *rank_of);
    for (int j = 0; j < x->T; j++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        rank_of[j] = garbage == 0 ? (int32_t)((seed >> 33) % (uint64_t)x->T)
                                  : (int32_t)(uint32_t)(seed >> 32);
    }
    nested_metrics(order, sizes, n_sizes, x->rows, x->n_heads, x->topk, x->stride, x->k,
                   scratch, rank_of, mass, err, recall);
    free(scratch);
    free(rank_of);
}

/* The slot-order figures of the cache order[0, n), its slots added in that order: mass and
 * recall as cache_attention_heads and recall_at_k give them, the error as output_errors (0 when
 * it has nothing to compute, as the engine takes it). */
static void slot_order_metrics(const NestRow *x, const int32_t *order, int n, double *mass,
                               double *err, double *recall)
{
    KVCache c;
    kvcache_init(&c, x->T, x->D);
    for (int i = 0; i < n; i++)
        kvcache_add(&c, order[i]);
    float *attn = malloc((size_t)x->n_heads * (n > 0 ? n : 1) * sizeof(float));
    float *scratch = malloc((size_t)(n + x->n_heads) * x->D * sizeof(float));
    CacheAttention ca[4];
    cache_attention_heads(&c, x->rows, x->n_heads, attn, ca);
    if (output_errors_needed(&c, x->T - 1)) {
        output_errors(&c, x->rows, x->n_heads, attn, scratch, err);
    } else {
        for (int h = 0; h < x->n_heads; h++)
            err[h] = 0.0;
    }
    for (int h = 0; h < x->n_heads; h++) {
        mass[h] = ca[h].retained_mass;
        recall[h] = recall_at_k(&c, x->topk + (size_t)h * x->stride, x->k);
    }
    free(attn);
    free(scratch);
    kvcache_free(&c);
}

/* Checks nested_metrics on the nest sizes[0, n_sizes) (at most MAX_NEST) of `order`:
 *   - each size's figures against the slot-order functions on a cache of its positions: the
 *     mass to 1e-12 relative (the dyadic p make both sums exact), the error to 1e-5 absolute
 *     or 1e-4 relative (float sums in another order), the recall exactly;
 *   - a size's doubles bit for bit the same whichever sizes are scored with it: each size alone,
 *     and every suffix of the sizes from it;
 *   - the same bits whatever rank_of holds (in-range garbage, any ints). */
enum { MAX_NEST = 8 };
static void check_nest(const NestRow *x, const int32_t *order, const int *sizes, int n_sizes)
{
    int H = x->n_heads;
    double mass[MAX_NEST * 4], err[MAX_NEST * 4], recall[MAX_NEST * 4];
    nested_run(x, order, sizes, n_sizes, 0, 1, mass, err, recall);
    for (int s = 0; s < n_sizes; s++) {
        double m[4], e[4], r[4];
        slot_order_metrics(x, order, sizes[s], m, e, r);
        for (int h = 0; h < H; h++) {
            size_t at = (size_t)s * H + h;
            if (!(fabs(mass[at] - m[h]) <= 1e-12 * fabs(m[h])) ||
                !(fabs(err[at] - e[h]) <= 1e-5 || fabs(err[at] - e[h]) <= 1e-4 * fabs(e[h])) ||
                recall[at] != r[h])
                fail_msg("size %d, head %d: nested mass %.17g err %.17g recall %.17g, slot order "
                         "%.17g %.17g %.17g", sizes[s], h, mass[at], err[at], recall[at], m[h],
                         e[h], r[h]);
        }
        /* alone, and with the larger sizes only */
        for (int suffix = 0; suffix < 2; suffix++) {
            int n_sub = suffix ? n_sizes - s : 1;
            double m2[MAX_NEST * 4], e2[MAX_NEST * 4], r2[MAX_NEST * 4];
            nested_run(x, order, sizes + s, n_sub, 1, 99 + (uint64_t)s, m2, e2, r2);
            assert_memory_equal(m2, mass + (size_t)s * H, (size_t)H * sizeof(double));
            assert_memory_equal(e2, err + (size_t)s * H, (size_t)H * sizeof(double));
            assert_memory_equal(r2, recall + (size_t)s * H, (size_t)H * sizeof(double));
        }
    }
    /* every size again, with rank_of holding any ints */
    double m3[MAX_NEST * 4], e3[MAX_NEST * 4], r3[MAX_NEST * 4];
    nested_run(x, order, sizes, n_sizes, 1, 7, m3, e3, r3);
    assert_memory_equal(m3, mass, (size_t)n_sizes * H * sizeof(double));
    assert_memory_equal(e3, err, (size_t)n_sizes * H * sizeof(double));
    assert_memory_equal(r3, recall, (size_t)n_sizes * H * sizeof(double));
}

/* order[0, n): n distinct positions of [0, T), the first `lead` of them `front` (given), the
 * rest random ones in random order. */
static void random_order(int32_t *order, int n, int T, const int32_t *front, int lead,
                         uint64_t seed)
{
    int32_t *all = malloc((size_t)T * sizeof *all);
    for (int j = 0; j < T; j++)
        all[j] = j;
    for (int i = 0; i < lead; i++) /* the given ones first */
        for (int j = i; j < T; j++)
            if (all[j] == front[i]) {
                all[j] = all[i];
                all[i] = front[i];
                break;
            }
    for (int j = T - 1; j > lead; j--) {
        int i = lead + (int)(rnd(&seed) * (float)(j - lead + 1));
        i = i > j ? j : i;
        int32_t tmp = all[i];
        all[i] = all[j];
        all[j] = tmp;
    }
    memcpy(order, all, (size_t)n * sizeof *order);
    free(all);
}

/* A global row, 4 heads, head_dim 44 (the 32- and 8-wide loops and the scalar tail), a nest of
 * caches of some positions; then 3 heads, head_dim 64, the largest cache every key (mass exactly
 * 1, error exactly 0, as the slot-order functions also give). */
static void test_nested_metrics_global(void **state)
{
    (void)state;
    const int no_bad[4] = {-1, -1, -1, -1};
    NestRow x;
    int32_t order[600];
    nest_row(&x, 600, 44, 4, 0, no_bad, 11);
    random_order(order, 400, 600, NULL, 0, 12);
    check_nest(&x, order, (const int[]){1, 37, 150, 400}, 4);
    nest_row_free(&x);

    nest_row(&x, 300, 64, 3, 0, no_bad, 13);
    random_order(order, 300, 300, NULL, 0, 14);
    const int sizes[] = {10, 149, 200, 299, 300};
    check_nest(&x, order, sizes, 5);
    double mass[5 * 3], err[5 * 3], recall[5 * 3];
    nested_run(&x, order, sizes, 5, 0, 3, mass, err, recall);
    for (int h = 0; h < 3; h++) {
        assert_true(mass[4 * 3 + h] == 1.0 && err[4 * 3 + h] == 0.0 && recall[4 * 3 + h] == 1.0);
        assert_true(err[3 * 3 + h] > 0.0); /* one key short */
    }
    nest_row_free(&x);
}

/* A head's figures do not depend on the heads scored with it, nor on how the values are read:
 * four heads together (on AVX-512 CPUs, four heads per read of a value row; with v16, the
 * values read as halves) give each head, bit for bit, what it gets scored alone (one head: the
 * one-head loop), head_dim 64 and 80 (the 64-wide and 16-wide passes). */
static void test_nested_metrics_heads_alone_or_together(void **state)
{
    (void)state;
    const int no_bad[4] = {-1, -1, -1, -1};
    const int sizes[] = {5, 64, 200, 333};
    for (int dim = 64; dim <= 80; dim += 16) {
        NestRow x;
        int32_t order[400];
        nest_row(&x, 400, dim, 4, 0, no_bad, 31 + dim);
        for (int i = 0; i < 400 * dim; i++) /* values exactly halves: v16 is the same floats */
            x.v[i] = float_from_half(half_from_float(x.v[i]));
        uint64_t seed = 35;
        for (int i = 0; i < 4 * 400; i++) /* full mantissas: the products round */
            x.p[i] *= 0.75f + 0.5f * rnd(&seed);
        random_order(order, 333, 400, NULL, 0, 32);
        uint16_t *v16 = malloc((size_t)400 * dim * sizeof *v16);
        for (int i = 0; i < 400 * dim; i++)
            v16[i] = half_from_float(x.v[i]);
        for (int halves = 0; halves < 2; halves++) {
            for (int h = 0; h < 4; h++)
                x.rows[h].v16 = halves ? v16 : NULL;
            double mass[4 * 4], err[4 * 4], recall[4 * 4];
            nested_run(&x, order, sizes, 4, 0, 33, mass, err, recall);
            for (int h = 0; h < 4; h++) {
                NestRow one = x;
                one.n_heads = 1;
                one.rows[0] = x.rows[h];
                one.topk = x.topk + (size_t)h * x.stride;
                double m1[4], e1[4], r1[4];
                nested_run(&one, order, sizes, 4, 0, 34, m1, e1, r1);
                for (int s = 0; s < 4; s++) {
                    assert_memory_equal(&m1[s], &mass[s * 4 + h], sizeof(double));
                    assert_memory_equal(&e1[s], &err[s * 4 + h], sizeof(double));
                    assert_memory_equal(&r1[s], &recall[s * 4 + h], sizeof(double));
                }
                assert_true(e1[3] > 0.0 && m1[3] < 1.0);
            }
        }
        free(v16);
        nest_row_free(&x);
    }
}

/* A sliding-window row (120 keys of 500): the order starts with positions before the window,
 * which get no attention (a cache of them alone: mass 0, error 1); the size that first holds
 * every key of the window has mass exactly 1 and error exactly 0, though it holds keys before
 * the window too and not all of them. */
static void test_nested_metrics_window(void **state)
{
    (void)state;
    enum { T = 500, W = 120 };
    const int no_bad[4] = {-1, -1, -1, -1};
    int first = attn_first_key(W, T - 1);
    NestRow x;
    int32_t order[T];
    nest_row(&x, T, 40, 4, W, no_bad, 21);
    const int32_t front[3] = {0, 7, first - 1};
    random_order(order, T, T, front, 3, 22);
    int full_at = 0; /* the size that first holds the whole window */
    for (int i = 0; i < T; i++)
        if (order[i] >= first)
            full_at = i + 1;
    assert_true(full_at > 71 && full_at < T);
    const int sizes[] = {3, 70, full_at - 1, full_at, T};
    check_nest(&x, order, sizes, 5);
    double mass[5 * 4], err[5 * 4], recall[5 * 4];
    nested_run(&x, order, sizes, 5, 0, 5, mass, err, recall);
    for (int h = 0; h < 4; h++) {
        assert_true(mass[h] == 0.0 && err[h] == 1.0 && recall[h] == 0.0);
        assert_true(mass[3 * 4 + h] == 1.0 && err[3 * 4 + h] == 0.0);
        assert_true(mass[4 * 4 + h] == 1.0 && err[4 * 4 + h] == 0.0);
        assert_true(mass[2 * 4 + h] < 1.0 && err[2 * 4 + h] > 0.0);
    }
    nest_row_free(&x);
}

/* A share below FLT_MIN inside the nest: caches up to it renormalise the full row's p, caches
 * past it take the softmax of the logits over the cache (as cache_attention does); head 0's
 * subnormal comes early in the order, head 1's later, head 2 has none. */
static void test_nested_metrics_underflow(void **state)
{
    (void)state;
    enum { T = 200 };
    NestRow x;
    int32_t order[T];
    random_order(order, T, T, NULL, 0, 31);
    const int bad[4] = {order[30], order[90], -1, -1};
    nest_row(&x, T, 16, 3, 0, bad, 32);
    /* the premise: a share that is not a normal float (the slot-order functions take the
     * fallback there too) */
    assert_true(x.rows[0].p[order[30]] > 0.0f && x.rows[0].p[order[30]] < FLT_MIN);
    check_nest(&x, order, (const int[]){20, 30, 31, 90, 91, 150}, 6);
    check_nest(&x, order, (const int[]){31, 91, 150, 199, 200}, 5);
    nest_row_free(&x);
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
        cmocka_unit_test(test_topk_matches_a_full_sort),
        cmocka_unit_test(test_cache_attention_heads_as_one_head_each),
        cmocka_unit_test(test_output_errors_against_a_double_sum_and_sgemm),
        cmocka_unit_test(test_nested_metrics_global),
        cmocka_unit_test(test_nested_metrics_heads_alone_or_together),
        cmocka_unit_test(test_nested_metrics_window),
        cmocka_unit_test(test_nested_metrics_underflow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
