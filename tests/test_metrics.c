/* Each metric against values computed by hand on a 3-token example. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
