/* stats.h — the statistics of a table of exact answers (kvsim eval, docs/eval.md "Outputs"):
 * a confidence interval on a proportion and a paired test of two policies on the same
 * questions, both on GSL's distributions; and the bootstrap interval of a mean over a dataset
 * of traces (kvsim run over many traces, docs/metrics.md "Datasets"). */
#ifndef KVSIM_STATS_H
#define KVSIM_STATS_H

#include <stdint.h>

/* The Wilson score interval of `successes` out of `n` trials at 95% confidence (z the 0.975
 * quantile of the standard normal): never outside [0, 1], and not empty at 0 or n successes,
 * unlike the normal approximation. n must be positive (0 <= successes <= n). */
void wilson_interval(int successes, int n, double *lo, double *hi);

/* The exact McNemar test of two policies answering the same questions: `b` questions only the
 * first answered correctly, `c` only the second (the discordant pairs; questions both or
 * neither answered tell nothing about which is better). Under the null hypothesis that both
 * are equally good, b ~ Binomial(b + c, 1/2); returns the two-sided p-value
 * min(1, 2 P(X <= min(b, c))), which is 1 when there is no discordant pair. */
double mcnemar_exact_p(int b, int c);

/* The resamples of a nonparametric bootstrap over n items: `resamples` draws of n item indices
 * with replacement, from GSL's MT19937 seeded with `seed`, so the same (n, resamples, seed)
 * always gives the same draws; every statistic bootstrapped with one Bootstrap uses the same
 * draws (the paired differences resample whole items: both sides of a pair together). */
typedef struct {
    int n, resamples;
    uint32_t *idx; /* [resamples][n] */
} Bootstrap;

void bootstrap_init(Bootstrap *b, int n, int resamples, uint64_t seed);
void bootstrap_free(Bootstrap *b);

/* The mean of x[0..n) and its 95% percentile bootstrap interval: the 2.5% and 97.5% quantiles
 * (GSL's interpolation) of the means of the resamples, each computed as x[0] plus the mean of
 * the deviations from x[0], summed in draw order. When every x is the same value, mean = lo =
 * hi = that value exactly. x must be finite. */
void bootstrap_mean_ci(const Bootstrap *b, const double *x, double *mean, double *lo,
                       double *hi);

#endif
