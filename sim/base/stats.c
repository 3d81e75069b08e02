#include "sim/base/stats.h"

#include <gsl/gsl_cdf.h>
#include <math.h>

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
