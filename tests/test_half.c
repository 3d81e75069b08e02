/* The 16-bit float codecs of sim/base/half.h, which both the trace format (float16 datasets)
 * and the safetensors reader (F16 and BF16 weights) use, checked exhaustively: every one of the
 * 65536 half patterns widens to the value IEEE binary16 gives it (computed here independently
 * with ldexp) and narrows back to itself; every interval between adjacent halves rounds to the
 * nearer end, and a midpoint to the even one; the overflow edge (65504, just below 65520,
 * 65520), subnormals and signed zeros; and every bfloat16 pattern widens to the float32 that is
 * its upper half. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "sim/base/half.h"

static uint32_t bits_of(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

/* binary16 by its definition: (-1)^s 2^(e-15) (1 + m/1024), subnormals 2^-14 (m/1024). */
static double half_value(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(m | 0x400, e - 25);
    return s ? -v : v;
}

static void test_every_half_widens_exactly_and_round_trips(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = float_from_half((uint16_t)h);
        int sign = (h & 0x8000u) != 0;
        assert_int_equal(signbit(f) != 0, sign);
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) {
            /* NaN: widening keeps sign and payload; narrowing gives the quiet NaN 0x7e00 of the
             * same sign (the payload is not kept). */
            assert_true(isnan(f));
            assert_int_equal(bits_of(f), (sign ? 0x80000000u : 0) | 0x7f800000u |
                                             ((h & 0x3ffu) << 13));
            assert_int_equal(half_from_float(f), (h & 0x8000u) | 0x7e00u);
            continue;
        }
        double want = half_value((uint16_t)h);
        assert_true((double)f == want);
        assert_int_equal(half_from_float(f), h); /* -0 and the infinities included */
    }
}

/* Between two adjacent finite halves a < b (same sign, a nearer zero): a float just above the
 * midpoint rounds to b, just below to a, and the midpoint itself (exact in float32: a half has
 * 11 significant bits) to the one with an even mantissa. */
static void test_every_interval_rounds_to_nearest_even(void **state)
{
    (void)state;
    for (uint32_t sign = 0; sign <= 0x8000u; sign += 0x8000u)
        for (uint32_t a = 0; a < 0x7bffu; a++) {
            uint16_t ha = (uint16_t)(sign | a), hb = (uint16_t)(sign | (a + 1));
            float fa = float_from_half(ha), fb = float_from_half(hb);
            float mid = (float)(((double)fa + (double)fb) / 2);
            assert_true((double)mid == ((double)fa + (double)fb) / 2);
            assert_int_equal(half_from_float(mid), (a & 1) ? hb : ha);
            assert_int_equal(half_from_float(nextafterf(mid, fa)), ha);
            assert_int_equal(half_from_float(nextafterf(mid, fb)), hb);
        }
}

static void test_edges(void **state)
{
    (void)state;
    /* The largest finite half, and the overflow threshold halfway to the next step. */
    assert_int_equal(half_from_float(65504.0f), 0x7bff);
    assert_int_equal(half_from_float(65519.99f), 0x7bff);
    assert_int_equal(half_from_float(nextafterf(HALF_OVERFLOW, 0)), 0x7bff);
    assert_int_equal(half_from_float(HALF_OVERFLOW), 0x7c00);
    assert_int_equal(half_from_float(-HALF_OVERFLOW), 0xfc00);
    assert_int_equal(half_from_float(1e30f), 0x7c00);
    assert_int_equal(half_from_float(INFINITY), 0x7c00);
    assert_int_equal(half_from_float(-INFINITY), 0xfc00);
    assert_int_equal(half_from_float(NAN) & 0x7fff, 0x7e00);
    assert_true(isinf(float_from_half(0x7c00)) && float_from_half(0x7c00) > 0);
    /* Subnormals: the smallest is 2^-24; half of it is a tie that goes to zero (even), anything
     * above that tie to 2^-24; 3 * 2^-25 ties between 1 and 2 units and goes to 2. */
    assert_int_equal(half_from_float(0x1p-24f), 0x0001);
    assert_true(float_from_half(0x0001) == 0x1p-24f);
    assert_int_equal(half_from_float(0x1p-25f), 0x0000);
    assert_int_equal(half_from_float(-0x1p-25f), 0x8000);
    assert_int_equal(half_from_float(nextafterf(0x1p-25f, 1)), 0x0001);
    assert_int_equal(half_from_float(3 * 0x1p-25f), 0x0002);
    assert_int_equal(half_from_float(1e-10f), 0x0000);
    /* The largest subnormal and the smallest normal, and the tie between them. */
    assert_int_equal(half_from_float(1023 * 0x1p-24f), 0x03ff);
    assert_int_equal(half_from_float(0x1p-14f), 0x0400);
    assert_int_equal(half_from_float(0x1p-14f - 0x1p-25f), 0x0400);
    /* Normal ties: 1 + 2^-11 lies between 1 and 1 + 2^-10 and goes to 1 (even); 2049 between
     * 2048 and 2050 goes to 2048, 2051 to 2052. */
    assert_int_equal(half_from_float(1.0f + 0x1p-11f), 0x3c00);
    assert_int_equal(half_from_float(1.0f + 3 * 0x1p-11f), 0x3c02);
    assert_int_equal(half_from_float(2049.0f), 0x6800);
    assert_int_equal(half_from_float(2051.0f), 0x6802);
    /* A carry out of the mantissa bumps the exponent: just below 2, rounding up, is 2. */
    assert_int_equal(half_from_float(nextafterf(2.0f, 0)), 0x4000);
    assert_int_equal(half_from_float(-0.0f), 0x8000);
    assert_int_equal(half_from_float(0.0f), 0x0000);
}

static void test_every_bfloat16_widens_exactly(void **state)
{
    (void)state;
    for (uint32_t b = 0; b < 65536; b++)
        assert_int_equal(bits_of(float_from_bf16((uint16_t)b)), b << 16);
    assert_true(float_from_bf16(0x3f80) == 1.0f);
    assert_true(float_from_bf16(0xc000) == -2.0f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_half_widens_exactly_and_round_trips),
        cmocka_unit_test(test_every_interval_rounds_to_nearest_even),
        cmocka_unit_test(test_edges),
        cmocka_unit_test(test_every_bfloat16_widens_exactly),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
