/* The statistics of kvsim eval's tables against values computed by hand from their formulas:
 * the Wilson score interval and the exact McNemar test (docs/eval.md, "Outputs"); and the
 * bootstrap interval of a dataset's mean (docs/metrics.md, "Datasets"). */
#include <gsl/gsl_statistics_double.h>
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

/* The bootstrap: the same draws from the same seed, an interval around the mean, and the
 * known answers: identical values give a zero-width interval at that value, a difference of a
 * series with itself is exactly 0. */
static void test_bootstrap(void **state)
{
    (void)state;
    const double x[8] = {0.91, 0.85, 0.97, 0.88, 0.93, 0.79, 0.95, 0.90};
    Bootstrap a, b;
    bootstrap_init(&a, 8, 2000, 7);
    bootstrap_init(&b, 8, 2000, 7);
    assert_memory_equal(a.idx, b.idx, 8 * 2000 * sizeof *a.idx);
    double m, lo, hi, m2, lo2, hi2;
    bootstrap_mean_ci(&a, x, &m, &lo, &hi);
    bootstrap_mean_ci(&b, x, &m2, &lo2, &hi2);
    assert_true(m == m2 && lo == lo2 && hi == hi2);
    assert_close(m, 7.18 / 8);
    assert_true(lo < m && m < hi);
    /* about the normal interval of the mean, m +- 1.96 s / sqrt(n) (s = 0.0583): within 30% */
    double half = 1.96 * gsl_stats_sd(x, 1, 8) / sqrt(8);
    assert_true(fabs((hi - lo) / 2 - half) < 0.3 * half);
    assert_true(lo > 0.79 && hi < 0.97); /* inside the range of the data */
    /* another seed: other draws, the same interval within a resampling error */
    Bootstrap c;
    bootstrap_init(&c, 8, 2000, 8);
    assert_memory_not_equal(a.idx, c.idx, 8 * 2000 * sizeof *a.idx);
    bootstrap_mean_ci(&c, x, &m2, &lo2, &hi2);
    assert_true(m2 == m && fabs(lo2 - lo) < 0.01 && fabs(hi2 - hi) < 0.01);
    bootstrap_free(&c);
    /* identical values: mean = lo = hi exactly */
    const double same[8] = {0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1};
    bootstrap_mean_ci(&a, same, &m, &lo, &hi);
    assert_true(m == 0.1 && lo == 0.1 && hi == 0.1);
    /* a series minus itself */
    double d[8];
    for (int i = 0; i < 8; i++)
        d[i] = x[i] - x[i];
    bootstrap_mean_ci(&a, d, &m, &lo, &hi);
    assert_true(m == 0 && lo == 0 && hi == 0);
    /* one item: every resample is that item */
    Bootstrap one;
    bootstrap_init(&one, 1, 100, 0);
    bootstrap_mean_ci(&one, &x[2], &m, &lo, &hi);
    assert_true(m == 0.97 && lo == 0.97 && hi == 0.97);
    bootstrap_free(&one);
    bootstrap_free(&a);
    bootstrap_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wilson),
        cmocka_unit_test(test_mcnemar),
        cmocka_unit_test(test_bootstrap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
