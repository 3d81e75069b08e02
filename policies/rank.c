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

/* Byte `byte` of an item's sort key: 0-3 the position's, 4-11 the score's. */
static inline unsigned key_byte(const SortItem *x, int byte)
{
    return byte < 4 ? x->pos >> (8 * byte) & 255 : x->score >> (8 * (byte - 4)) & 255;
}

void rank_sort_best(int32_t *pos, int n, const double *score)
{
    if (n < 2)
        return;
    SortItem *a = kv_malloc(2 * (size_t)n * sizeof *a), *b = a + n, *mem = a;
    /* Every byte's counts in one read; a byte that is the same in every item moves nothing. */
    uint32_t count[12][256] = {{0}};
    for (int i = 0; i < n; i++) {
        a[i] = (SortItem){~order_key(score[pos[i]]), ~(uint32_t)pos[i]};
        for (int byte = 0; byte < 12; byte++)
            count[byte][key_byte(&a[i], byte)]++;
    }
    for (int byte = 0; byte < 12; byte++) { /* LSD: stable passes, least significant first */
        uint32_t *c = count[byte];
        if (c[key_byte(&a[0], byte)] == (uint32_t)n)
            continue;
        for (uint32_t d = 0, at = 0; d < 256; d++) {
            uint32_t k = c[d];
            c[d] = at;
            at += k;
        }
        for (int i = 0; i < n; i++)
            b[c[key_byte(&a[i], byte)]++] = a[i];
        SortItem *tmp = a;
        a = b;
        b = tmp;
    }
    for (int i = 0; i < n; i++)
        pos[i] = (int32_t)~a[i].pos;
    free(mem);
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
