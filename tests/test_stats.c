/* The statistics of kvsim eval's tables against values computed by hand from their formulas:
 * the Wilson score interval and the exact McNemar test (docs/eval.md, "Outputs"). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "sim/base/stats.h"

static void assert_close(double got, double want)
{
    if (fabs(got - want) > 1e-9) {
        print_error("got %.12g, want %.12g\n", got, want);
        fail();
    }
}

/* p = s/n, z = 1.959963984540054: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n) */
static void test_wilson(void **state)
{
    (void)state;
    double lo, hi;
    wilson_interval(37, 40, &lo, &hi); /* full's 37 of the 40 held-out prompts */
    assert_close(lo, 0.801357664757);
    assert_close(hi, 0.974163974225);
    wilson_interval(1, 3, &lo, &hi);
    assert_close(lo, 0.061491944720);
    assert_close(hi, 0.792340399198);
    /* the ends: an interval that is not empty, and bounds exactly 0 and 1 */
    wilson_interval(0, 10, &lo, &hi);
    assert_true(lo == 0);
    assert_close(hi, 0.277532799863);
    wilson_interval(10, 10, &lo, &hi);
    assert_close(lo, 0.722467200137);
    assert_true(hi == 1);
    /* symmetric: s of n and n - s of n mirror each other */
    double lo2, hi2;
    wilson_interval(7, 20, &lo, &hi);
    wilson_interval(13, 20, &lo2, &hi2);
    assert_close(lo, 1 - hi2);
    assert_close(hi, 1 - lo2);
}

/* Two-sided: min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2) */
static void test_mcnemar(void **state)
{
    (void)state;
    assert_close(mcnemar_exact_p(5, 1), 0.21875);        /* 2 (1 + 6) / 64 */
    assert_close(mcnemar_exact_p(1, 5), 0.21875);        /* symmetric */
    assert_close(mcnemar_exact_p(0, 7), 0.015625);       /* 2 / 128 */
    assert_close(mcnemar_exact_p(10, 2), 0.03857421875); /* 2 (1 + 12 + 66) / 4096 */
    assert_close(mcnemar_exact_p(3, 3), 1);              /* capped at 1 */
    assert_close(mcnemar_exact_p(0, 0), 1);              /* no discordant pair */
    assert_close(mcnemar_exact_p(0, 1), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wilson),
        cmocka_unit_test(test_mcnemar),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
