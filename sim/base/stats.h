/* stats.h — the statistics of a table of exact answers (kvsim eval, docs/eval.md "Outputs"):
 * a confidence interval on a proportion and a paired test of two policies on the same
 * questions. Both on GSL's distributions. */
#ifndef KVSIM_STATS_H
#define KVSIM_STATS_H

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

#endif
