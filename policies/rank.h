/* rank.h — choosing tokens by score, the same way in every score-based policy, and the sum of
 * attention rows over a GQA group or an observation window that those scores start from.
 *
 * Scores are doubles indexed by trace position. The order is total and deterministic: a higher
 * score is better, and between equal scores the later position is better, so that on a tie the
 * older token is the one evicted. Results never depend on memory addresses or sort stability. */
#ifndef KVSIM_RANK_H
#define KVSIM_RANK_H

#include <stdint.h>

#include "policies/policy.h"

/* Reorders pos[0, n) so that pos[0, k) are the k best positions by score[pos] (k >= n keeps
 * all). Order inside each part is unspecified but deterministic. Average O(n). */
void rank_keep_best(int32_t *pos, int n, int k, const double *score);

/* Sorts pos[0, n) best first (the order above, which is total: the result is unique). O(n): an
 * LSD radix sort on the score's bits and the position. */
void rank_sort_best(int32_t *pos, int n, const double *score);

/* The slot of `c` holding the worst real position by score[pos] among those <= max_pos;
 * -1 when there is none. */
int rank_worst_slot(const KVCache *c, const double *score, int max_pos);

/* Group reduction of attention rows: out[j] = weight * sum over r < rows of a[r*lda + j],
 * j < n (CBLAS saxpy per row). */
void rank_sum_rows(const float *a, int rows, int n, int lda, float weight, float *out);

/* The reduction over a GQA group's query heads of their scores: an enum parameter `gqa` with
 * these choices (its value is the index), each attention-driven policy's default being the
 * reduction it used before the option existed. */
enum { RANK_GQA_SUM = 0, RANK_GQA_MEAN = 1, RANK_GQA_MAX = 2 };
#define RANK_GQA_CHOICES "sum|mean|max"

/* out[j] = the reduction (RANK_GQA_*) over r < rows of a[r*lda + j], j < n. Sum is
 * rank_sum_rows with weight 1, mean with weight 1/rows (the same floats). */
void rank_reduce_rows(const float *a, int rows, int n, int lda, int gqa, float *out);

#endif
