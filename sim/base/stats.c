#include "sim/base/stats.h"

#include <gsl/gsl_cdf.h>
#include <gsl/gsl_rng.h>
#include <gsl/gsl_sort.h>
#include <gsl/gsl_statistics_double.h>
#include <math.h>
#include <stdlib.h>

#include "sim/base/util.h"

void wilson_interval(int successes, int n, double *lo, double *hi)
{
    const double z = gsl_cdf_ugaussian_Pinv(0.975);
    double p = (double)successes / n, z2n = z * z / n;
    double center = (p + z2n / 2) / (1 + z2n);
    double half = z / (1 + z2n) * sqrt(p * (1 - p) / n + z2n / (4.0 * n));
    /* At 0 or n successes the bound is exactly 0 or 1; rounding must not move it past. */
    *lo = successes == 0 ? 0 : fmax(0, center - half);
    *hi = successes == n ? 1 : fmin(1, center + half);
}

double mcnemar_exact_p(int b, int c)
{
    int n = b + c, k = b < c ? b : c;
    if (n == 0)
        return 1;
    return fmin(1, 2 * gsl_cdf_binomial_P((unsigned)k, 0.5, (unsigned)n));
}

void bootstrap_init(Bootstrap *b, int n, int resamples, uint64_t seed)
{
    b->n = n;
    b->resamples = resamples;
    b->idx = kv_malloc((size_t)resamples * (size_t)(n > 0 ? n : 1) * sizeof *b->idx);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, (unsigned long)seed);
    for (size_t i = 0; i < (size_t)resamples * (size_t)n; i++)
        b->idx[i] = (uint32_t)gsl_rng_uniform_int(rng, (unsigned long)n);
    gsl_rng_free(rng);
}

void bootstrap_free(Bootstrap *b)
{
    free(b->idx);
    b->idx = NULL;
}

void bootstrap_mean_ci(const Bootstrap *b, const double *x, double *mean, double *lo, double *hi)
{
    /* Sums of the deviations from x[0]: identical values give exactly x[0], where a plain sum
     * of n copies divided by n may round away from it. */
    double sum = 0;
    for (int i = 0; i < b->n; i++)
        sum += x[i] - x[0];
    *mean = x[0] + sum / b->n;
    double *means = kv_malloc((size_t)b->resamples * sizeof *means);
    for (int r = 0; r < b->resamples; r++) {
        const uint32_t *draw = b->idx + (size_t)r * b->n;
        double s = 0;
        for (int i = 0; i < b->n; i++)
            s += x[draw[i]] - x[0];
        means[r] = x[0] + s / b->n;
    }
    gsl_sort(means, 1, (size_t)b->resamples);
    *lo = gsl_stats_quantile_from_sorted_data(means, 1, (size_t)b->resamples, 0.025);
    *hi = gsl_stats_quantile_from_sorted_data(means, 1, (size_t)b->resamples, 0.975);
    free(means);
}
