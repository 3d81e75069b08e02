/* Deterministic selection by score (rank.h). */
#include "policies/rank.h"

#include <cblas.h>
#include <stdbool.h>
#include <stddef.h>

static inline bool better(const double *score, int32_t a, int32_t b)
{
    return score[a] > score[b] || (score[a] == score[b] && a > b);
}

static inline void swap_pos(int32_t *pos, int i, int j)
{
    int32_t tmp = pos[i];
    pos[i] = pos[j];
    pos[j] = tmp;
}

void rank_keep_best(int32_t *pos, int n, int k, const double *score)
{
    if (k <= 0 || k >= n)
        return;
    /* Quickselect for the k-th best (index k-1): everything before it better, after it worse.
     * Positions are distinct, so the order is strict and the chosen set is unique. */
    int lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        /* Median of three as pivot, moved to hi, keeps sorted inputs (the common case: positions
         * in order) from degrading to quadratic time. */
        if (better(score, pos[mid], pos[lo]))
            swap_pos(pos, mid, lo);
        if (better(score, pos[hi], pos[lo]))
            swap_pos(pos, hi, lo);
        if (better(score, pos[mid], pos[hi]))
            swap_pos(pos, mid, hi);
        int32_t pivot = pos[hi];
        int store = lo;
        for (int i = lo; i < hi; i++)
            if (better(score, pos[i], pivot))
                swap_pos(pos, i, store++);
        swap_pos(pos, store, hi);
        if (store == target)
            return;
        if (store < target)
            lo = store + 1;
        else
            hi = store - 1;
    }
}

int rank_worst_slot(const KVCache *c, const double *score, int max_pos)
{
    int worst = -1;
    for (int s = 0; s < c->n; s++) {
        int32_t p = c->pos[s];
        if (p < 0 || p > max_pos)
            continue;
        if (worst < 0 || better(score, c->pos[worst], p))
            worst = s;
    }
    return worst;
}

void rank_sum_rows(const float *a, int rows, int n, int lda, float weight, float *out)
{
    for (int j = 0; j < n; j++)
        out[j] = 0.0f;
    /* rows is a GQA group or an observation window: a few saxpy calls over long rows. */
    for (int r = 0; r < rows && n > 0; r++)
        cblas_saxpy(n, weight, a + (size_t)r * lda, 1, out, 1);
}

void rank_reduce_rows(const float *a, int rows, int n, int lda, int gqa, float *out)
{
    if (gqa != RANK_GQA_MAX) {
        rank_sum_rows(a, rows, n, lda, gqa == RANK_GQA_MEAN ? 1.0f / (float)rows : 1.0f, out);
        return;
    }
    for (int j = 0; j < n; j++)
        out[j] = rows > 0 ? a[j] : 0.0f;
    for (int r = 1; r < rows; r++)
        for (int j = 0; j < n; j++)
            if (a[(size_t)r * lda + j] > out[j])
                out[j] = a[(size_t)r * lda + j];
}
