/* Deterministic selection by score (rank.h). */
#include "policies/rank.h"

#include <cblas.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

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

/* One quickselect partition of pos[lo, hi] (lo < hi), as rank_keep_best makes it; returns
 * where the pivot lands. */
static int partition_range(int32_t *pos, int lo, int hi, const double *score)
{
    int mid = lo + (hi - lo) / 2;
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
    return store;
}

void rank_keep_best(int32_t *pos, int n, int k, const double *score)
{
    if (k <= 0 || k >= n)
        return;
    /* Quickselect for the k-th best (index k-1): everything before it better, after it worse.
     * Positions are distinct, so the order is strict and the chosen set is unique. */
    int lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        int store = partition_range(pos, lo, hi, score);
        if (store == target)
            return;
        if (store < target)
            lo = store + 1;
        else
            hi = store - 1;
    }
}

/* An unsigned key that orders doubles as < does, equal doubles equal keys (-0 taken as +0, so
 * that they tie as in `better`; no NaN among scores). */
static inline uint64_t order_key(double x)
{
    uint64_t u;
    x = x == 0 ? 0.0 : x;
    memcpy(&u, &x, sizeof u);
    return u >> 63 ? ~u : u | (uint64_t)1 << 63;
}

typedef struct {
    uint64_t score; /* ~order_key(score): ascending = best first */
    uint32_t pos;   /* ~position: ascending = later first */
} SortItem;

/* One stable counting pass of an LSD radix sort on byte `byte` (0-3: pos, 4-11: score) from
 * src to dst; false (nothing moved) when every item has the same byte there. */
static bool radix_pass(const SortItem *src, SortItem *dst, int n, int byte)
{
    size_t count[256] = {0};
    for (int i = 0; i < n; i++)
        count[byte < 4 ? src[i].pos >> (8 * byte) & 255 : src[i].score >> (8 * (byte - 4)) & 255]++;
    for (int d = 0; d < 256; d++)
        if (count[d] == (size_t)n)
            return false;
    for (size_t d = 0, at = 0; d < 256; d++) {
        size_t c = count[d];
        count[d] = at;
        at += c;
    }
    for (int i = 0; i < n; i++)
        dst[count[byte < 4 ? src[i].pos >> (8 * byte) & 255
                           : src[i].score >> (8 * (byte - 4)) & 255]++] = src[i];
    return true;
}

void rank_sort_best(int32_t *pos, int n, const double *score)
{
    if (n < 2)
        return;
    SortItem *a = kv_malloc(2 * (size_t)n * sizeof *a), *b = a + n;
    for (int i = 0; i < n; i++)
        a[i] = (SortItem){~order_key(score[pos[i]]), ~(uint32_t)pos[i]};
    for (int byte = 0; byte < 12; byte++)
        if (radix_pass(a, b, n, byte)) {
            SortItem *tmp = a;
            a = b;
            b = tmp;
        }
    for (int i = 0; i < n; i++)
        pos[i] = (int32_t)~a[i].pos;
    free(a < b ? a : b);
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
