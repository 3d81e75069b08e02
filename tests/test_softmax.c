/* The softmax's two implementations (sim/base/attention.h) agree bit for bit: every row length
 * from 1 to past two 16-lane chunks plus each tail, windows, values with ties and signed zeros,
 * and rows whose maximum is +0 or -0. Every CSV kvsim writes depends on it. */
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

static void compare(void (*impl)(float *, int, int, int, float, int, float *, float *))
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
                    softmax_causal_rows_vectorised(a, rows, LD, first, scale, windows[w], ma, za);
                    impl(b, rows, LD, first, scale, windows[w], mb, zb);
                    if (memcmp(a, b, sizeof a) || memcmp(ma, mb, (size_t)rows * sizeof *ma) ||
                        memcmp(za, zb, (size_t)rows * sizeof *za))
                        fail_msg("rows differ: first_len %d, rows %d, window %d, kind %d", first,
                                 rows, windows[w], kind);
                    cases++;
                }
    assert_int_equal(cases, MAX_FIRST * 3 * 5 * 4);
}

static void test_avx512_matches_vectorised(void **state)
{
    (void)state;
#if SOFTMAX_HAS_AVX512
    if (!__builtin_cpu_supports("avx512f"))
        skip();
    compare(softmax_causal_rows_avx512);
#else
    skip();
#endif
}

static void test_dispatch_matches_vectorised(void **state)
{
    (void)state;
    compare(softmax_causal_rows);
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
        cmocka_unit_test(test_avx512_matches_vectorised),
        cmocka_unit_test(test_dispatch_matches_vectorised),
        cmocka_unit_test(test_rows_are_distributions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
