/* The softmax's two implementations (sim/base/attention.h) follow one order of operations bit
 * for bit: every row length from 1 to past four 16-lane chunks plus each tail, windows, values
 * with ties and signed zeros, rows whose maximum is +0 or -0; and the AVX-512 code's inlined
 * expf against glibc's. Every CSV kvsim writes depends on it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/base/attention.h"

enum { MAX_ROWS = 9, MAX_FIRST = 80, LD = MAX_FIRST + MAX_ROWS + 8 };

#if SOFTMAX_HAS_AVX512
static uint64_t rng = 88172645463325252ull;
static uint32_t next_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

/* Logits of one of several kinds: spread, few distinct values (ties), zeros of both signs
 * among negatives (a maximum of +-0), large (underflowing exponentials). */
static float logit(int kind)
{
    switch (kind) {
    case 0: return (float)(next_u32() % 200001) / 1000.0f - 100.0f;
    case 1: return (float)(next_u32() % 5) - 2.0f;
    case 2: return next_u32() % 3 == 0 ? (next_u32() % 2 ? 0.0f : -0.0f)
                                       : -(float)(next_u32() % 1000) / 100.0f;
    default: return (float)(next_u32() % 2000001) / 10.0f - 100000.0f;
    }
}

typedef void SoftmaxFn(float *, int, int, int, float, int, float *, float *);

static void compare(SoftmaxFn *ref, SoftmaxFn *impl)
{
    static float a[MAX_ROWS * LD], b[MAX_ROWS * LD];
    float ma[MAX_ROWS], za[MAX_ROWS], mb[MAX_ROWS], zb[MAX_ROWS];
    const int windows[] = {0, 1, 5, 16, 37};
    const float scales[] = {0.125f, 1.0f, 0.0883883476f};
    int cases = 0;
    for (int first = 1; first <= MAX_FIRST; first++)
        for (int rows = 1; rows <= MAX_ROWS; rows += 4)
            for (int w = 0; w < 5; w++)
                for (int kind = 0; kind < 4; kind++) {
                    for (int i = 0; i < MAX_ROWS * LD; i++)
                        a[i] = b[i] = logit(kind);
                    float scale = scales[(first + kind) % 3];
                    ref(a, rows, LD, first, scale, windows[w], ma, za);
                    impl(b, rows, LD, first, scale, windows[w], mb, zb);
                    if (memcmp(a, b, sizeof a) || memcmp(ma, mb, (size_t)rows * sizeof *ma) ||
                        memcmp(za, zb, (size_t)rows * sizeof *za))
                        fail_msg("rows differ: first_len %d, rows %d, window %d, kind %d", first,
                                 rows, windows[w], kind);
                    cases++;
                }
    assert_int_equal(cases, MAX_FIRST * 3 * 5 * 4);
}

#include <immintrin.h>

__m128 _ZGVbN4v_expf(__m128 x);
__m256 _ZGVdN8v_expf(__m256 x);

#define AVX2 __attribute__((target("avx2")))

/* The order softmax_avx512.c promises, as GCC vectorises softmax.c's loops for AVX2 (-O3
 * -ffast-math): the maximum from x[lo] over 8-lane chunks, then one 4-lane chunk, then single
 * elements; the exponentials by the 8-lane expf over 8-lane chunks into one accumulator, then
 * the 4-lane expf on one 4-lane chunk, then scalar expf; 4 lanes reduced as (v0+v2)+(v1+v3). */
AVX2 static float ref_sum4(__m128 v)
{
    __m128 t = _mm_add_ps(_mm_movehl_ps(v, v), v);
    return _mm_cvtss_f32(_mm_add_ss(_mm_shuffle_ps(t, t, 0x55), t));
}

AVX2 static float ref_max4(__m128 v)
{
    __m128 t = _mm_max_ps(_mm_movehl_ps(v, v), v);
    return _mm_cvtss_f32(_mm_max_ss(_mm_shuffle_ps(t, t, 0x55), t));
}

AVX2 static void reference(float *s, int rows, int ld, int first_len, float scale, int window,
                           float *row_max, float *row_z)
{
    for (int b = 0; b < rows; b++) {
        float *x = s + (size_t)b * ld;
        int n = first_len + b, lo = window > 0 && n > window ? n - window : 0;
        for (int j = 0; j < lo; j++)
            x[j] = 0.0f;
        float *r = x + lo, m = r[0];
        int cnt = n - lo - 1, j = 0;
        const float *y = r + 1;
        if (cnt >= 8) {
            __m256 acc = _mm256_set1_ps(m);
            for (; j + 8 <= cnt; j += 8)
                acc = _mm256_max_ps(acc, _mm256_loadu_ps(y + j));
            __m128 hi = _mm256_extractf128_ps(acc, 1), lo4 = _mm256_castps256_ps128(acc);
            if (cnt - j >= 4) {
                m = ref_max4(_mm_max_ps(_mm_max_ps(lo4, hi), _mm_loadu_ps(y + j)));
                j += 4;
            } else {
                m = ref_max4(_mm_max_ps(hi, lo4));
            }
        } else if (cnt >= 4) {
            m = ref_max4(_mm_max_ps(_mm_set1_ps(m), _mm_loadu_ps(y)));
            j = 4;
        }
        for (; j < cnt; j++)
            m = _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(m), _mm_set_ss(y[j])));
        float mx = m * scale, z = 0.0f;
        int len = n - lo;
        __m128 s4 = _mm_setzero_ps();
        j = 0;
        if (len >= 8) {
            __m256 acc = _mm256_setzero_ps();
            for (; j + 8 <= len; j += 8) {
                __m256 a = _mm256_mul_ps(_mm256_loadu_ps(r + j), _mm256_set1_ps(scale));
                __m256 e = _ZGVdN8v_expf(_mm256_sub_ps(a, _mm256_set1_ps(mx)));
                _mm256_storeu_ps(r + j, e);
                acc = _mm256_add_ps(acc, e);
            }
            s4 = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
            z = ref_sum4(s4);
        }
        if (len - j >= 4) {
            __m128 a = _mm_mul_ps(_mm_loadu_ps(r + j), _mm_set1_ps(scale));
            __m128 e = _ZGVbN4v_expf(_mm_sub_ps(a, _mm_set1_ps(mx)));
            _mm_storeu_ps(r + j, e);
            z = ref_sum4(_mm_add_ps(e, s4));
            j += 4;
        }
        for (; j < len; j++) {
            float e = expf(r[j] * scale - mx);
            r[j] = e;
            z += e;
        }
        float inv = 1.0f / z;
        for (j = 0; j < len; j++)
            r[j] *= inv;
        for (j = n; j < first_len + rows - 1; j++)
            x[j] = 0.0f;
        row_max[b] = mx;
        row_z[b] = z;
    }
}
#endif

static void test_avx512_matches_reference(void **state)
{
    (void)state;
#if SOFTMAX_HAS_AVX512
    if (!__builtin_cpu_supports("avx512f"))
        skip();
    compare(reference, softmax_causal_rows_avx512);
#else
    skip();
#endif
}

/* What makes every CSV the same on a CPU with AVX-512 as before it had its own code: the
 * compiler vectorised softmax.c's loops in the order the reference follows. Only in an
 * optimised build without sanitizers, the build whose numbers are compared (instrumentation
 * changes how the loops are vectorised). */
static void test_vectorised_matches_reference(void **state)
{
    (void)state;
#if SOFTMAX_HAS_AVX512 && defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__)
    if (!__builtin_cpu_supports("avx2"))
        skip();
    compare(reference, softmax_causal_rows_vectorised);
#else
    skip();
#endif
}

/* softmax_avx512.c's inlined 16-lane expf is glibc's, bit for bit: on every float of the
 * polynomial's domain that a softmax passes ([-87.34, -0], 1.1e9 floats; every 13th in a build
 * that is not optimised or is sanitised, where the whole would take minutes), and on a sample of
 * the rest (where both take glibc's call). */
static void test_inline_exp_matches_glibc(void **state)
{
    (void)state;
#if SOFTMAX_HAS_AVX512
    if (!__builtin_cpu_supports("avx512f"))
        skip();
#if defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__)
    uint32_t step = 1;
#else
    uint32_t step = 13;
#endif
    assert_int_equal(exp16_mismatches(0x80000000u, 0xc2aead00u, step), 0);
    assert_int_equal(exp16_mismatches(0xc2aead00u, 0xffffffffu, 4099), 0); /* to -inf, NaNs */
    assert_int_equal(exp16_mismatches(0x00000000u, 0x7fffffffu, 4099), 0); /* positives */
#else
    skip();
#endif
}

/* A row is a distribution: the check above compares two implementations, this one that they
 * compute a softmax at all. */
static void test_rows_are_distributions(void **state)
{
    (void)state;
    float s[3 * 8] = {1, 2, 9, 9, 9, 9, 9, 9, 0, 0, 0, 9, 9, 9, 9, 9, -1, 5, 5, 2, 9, 9, 9, 9};
    float mx[3], z[3];
    softmax_causal_rows(s, 3, 8, 2, 1.0f, 0, mx, z);
    for (int b = 0; b < 3; b++) {
        float sum = 0;
        for (int j = 0; j < 2 + b; j++)
            sum += s[b * 8 + j];
        assert_float_equal(sum, 1.0f, 1e-6);
        for (int j = 2 + b; j < 4; j++)
            assert_float_equal(s[b * 8 + j], 0.0f, 0); /* masked: zero up to first_len+rows-1 */
    }
    assert_float_equal(s[1], 1.0f / (1.0f + expf(-1.0f)), 1e-6);
    assert_float_equal(mx[2], 5.0f, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_avx512_matches_reference),
        cmocka_unit_test(test_vectorised_matches_reference),
        cmocka_unit_test(test_inline_exp_matches_glibc),
        cmocka_unit_test(test_rows_are_distributions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
