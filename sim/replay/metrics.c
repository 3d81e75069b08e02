#include "sim/replay/metrics.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool slot_is_exact(const KVCache *c, int slot)
{
    return c->pos[slot] >= 0 && c->alt_kv[slot] == NULL;
}

/* Every key [0, t] present with its exact K/V: attention over the cache is the full row. */
static bool cache_is_complete(const KVCache *c, int t)
{
    return c->n_alt == 0 && c->n == t + 1;
}

/* A slot of a position before the query's window: the model gives it no attention. Synthetic
 * slots (no position) are attended. */
static bool slot_outside(const KVCache *c, int slot, const FullRow *row)
{
    return c->pos[slot] >= 0 && c->pos[slot] < attn_first_key(row->window, row->t);
}

/* Logit of slot i: scale * q . k, with the slot's own key for alt slots. */
static double slot_logit(const KVCache *c, int slot, const FullRow *row)
{
    const float *k = c->alt_kv[slot] ? c->alt_kv[slot]
                                     : row->k + (size_t)c->pos[slot] * row->head_dim;
    return (double)row->scale * cblas_sdot(row->head_dim, row->q, 1, k, 1);
}

/* The renormalised attention as a softmax of the logits over the cache (double precision). */
static void softmax_over_cache(const KVCache *c, const FullRow *row, float *attn)
{
    double mx = -INFINITY, z = 0;
    double *logit = kv_malloc((size_t)c->n * sizeof *logit);
    for (int i = 0; i < c->n; i++) {
        logit[i] = slot_outside(c, i, row) ? -INFINITY : slot_logit(c, i, row);
        if (logit[i] > mx)
            mx = logit[i];
    }
    for (int i = 0; i < c->n; i++) {
        logit[i] = logit[i] == -INFINITY ? 0.0 : exp(logit[i] - mx);
        z += logit[i];
    }
    for (int i = 0; i < c->n; i++)
        attn[i] = z > 0 ? (float)(logit[i] / z) : 0.0f;
    free(logit);
}

CacheAttention cache_attention(const KVCache *c, const FullRow *row, float *attn)
{
    CacheAttention ca = {0, 0};
    double alt_total = 0;
    int n_exact = c->n - c->n_alt;
    if (n_exact == row->t + 1) {
        ca.retained_mass = 1.0; /* every key present: the renormalisation is the identity */
    } else if (n_exact > (row->t + 1) / 2) {
        /* Large caches: subtract what is missing, scanning the (smaller) complement. */
        double missing = 0;
        for (int j = 0; j <= row->t; j++) {
            int s = c->slot_of[j];
            if (s < 0 || c->alt_kv[s])
                missing += row->p[j];
        }
        ca.retained_mass = 1.0 - missing;
    } else {
        for (int i = 0; i < c->n; i++)
            if (slot_is_exact(c, i))
                ca.retained_mass += row->p[c->pos[i]];
    }
    /* The shares from the full row, while each is a normal number relative to it. */
    bool exact = true;
    double exact_total = 0; /* summed directly: 1 - missing loses a small cache's share */
    for (int i = 0; i < c->n; i++) {
        double w;
        if (slot_outside(c, i, row)) {
            w = 0.0; /* before the window: no attention, exactly */
        } else if (c->alt_kv[i]) {
            /* exp(s - max) / Z: the alt key's weight in units of the full row. */
            w = exp(slot_logit(c, i, row) - row->logit_max) / row->logit_z;
            alt_total += w;
            exact &= w >= FLT_MIN && w <= 1.0 / FLT_EPSILON;
        } else {
            w = row->p[c->pos[i]];
            exact_total += w;
            exact &= w >= FLT_MIN;
        }
        if (attn)
            attn[i] = (float)w;
    }
    ca.denominator = exact_total + alt_total;
    if (!attn || c->n == 0)
        return ca;
    if (exact && ca.denominator > 0) {
        float inv = (float)(1.0 / ca.denominator);
        cblas_sscal(c->n, inv, attn, 1);
    } else {
        softmax_over_cache(c, row, attn);
    }
    return ca;
}

/* Min-heap on (value, -index): the root is the weakest of the current top-k. */
static bool weaker(const float *p, int32_t a, int32_t b)
{
    return p[a] < p[b] || (p[a] == p[b] && a > b);
}

static void sift_down(const float *p, int32_t *heap, int k, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && weaker(p, heap[l], heap[m]))
            m = l;
        if (r < k && weaker(p, heap[r], heap[m]))
            m = r;
        if (m == i)
            return;
        int32_t tmp = heap[i];
        heap[i] = heap[m];
        heap[m] = tmp;
        i = m;
    }
}

void topk_indices(const float *p, int n, int k, int32_t *out)
{
    for (int i = 0; i < k; i++)
        out[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--)
        sift_down(p, out, k, i);
    /* Every index in the heap is below j, so j enters only if p[j] beats the weakest strictly
     * (on a tie the lower index wins). Most entries of an attention row do not: test eight at
     * a time against the current threshold, a loop the compiler vectorises. */
    float threshold = p[out[0]];
    int j = k;
    for (; j + 8 <= n; j += 8) {
        int any = 0;
        for (int i = 0; i < 8; i++)
            any |= p[j + i] > threshold;
        if (!any)
            continue;
        for (int i = j; i < j + 8; i++)
            if (p[i] > p[out[0]]) {
                out[0] = i;
                sift_down(p, out, k, 0);
            }
        threshold = p[out[0]];
    }
    for (; j < n; j++)
        if (p[j] > p[out[0]]) {
            out[0] = j;
            sift_down(p, out, k, 0);
        }
}

double recall_at_k(const KVCache *c, const int32_t *topk, int k)
{
    int hit = 0;
    for (int i = 0; i < k; i++)
        hit += kvcache_has(c, topk[i]);
    return (double)hit / k;
}

bool output_errors_needed(const KVCache *c, int t)
{
    return !cache_is_complete(c, t);
}

void output_errors(const KVCache *c, const FullRow *rows, int n_heads, const float *attn,
                   float *scratch, double *err)
{
    int D = rows[0].head_dim, n = c->n;
    if (cache_is_complete(c, rows[0].t)) {
        for (int i = 0; i < n_heads; i++)
            err[i] = 0.0; /* the renormalisation is the identity: o_S = o_full */
        return;
    }
    /* Gather the cache's values once for the whole group, then one sgemm: out = attn . V_S. */
    float *values = scratch, *out = scratch + (size_t)n * D;
    for (int i = 0; i < n; i++) {
        const float *v = c->alt_kv[i] ? c->alt_kv[i] + D : rows[0].v + (size_t)c->pos[i] * D;
        memcpy(values + (size_t)i * D, v, (size_t)D * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_heads, D, n, 1.0f, attn, n, values,
                D, 0.0f, out, D);
    for (int h = 0; h < n_heads; h++) {
        float *o = out + (size_t)h * D;
        cblas_saxpy(D, -1.0f, rows[h].o_full, 1, o, 1);
        double norm_full = cblas_snrm2(D, rows[h].o_full, 1);
        err[h] = norm_full > 0 ? cblas_snrm2(D, o, 1) / norm_full : 0.0;
    }
}

double needle_survival(const KVCache *c, const TraceMeta *meta, int t)
{
    int total = 0, kept = 0;
    for (int n = 0; n < meta->n_needles; n++) {
        int end = meta->needles[2 * n + 1] < t + 1 ? meta->needles[2 * n + 1] : t + 1;
        for (int j = meta->needles[2 * n]; j < end; j++) {
            total++;
            kept += kvcache_has(c, j);
        }
    }
    return total ? (double)kept / total : NAN;
}

void needle_survival_by_turn(const KVCache *c, const TraceMeta *meta, const int32_t *turn_of,
                             int t, int n_dist, double *out)
{
    int total[n_dist], kept[n_dist];
    for (int d = 0; d < n_dist; d++)
        total[d] = kept[d] = 0;
    for (int n = 0; n < meta->n_needles; n++) {
        int start = meta->needles[2 * n];
        if (start > t)
            continue; /* a needle of a later turn, or later in this one */
        int d = turn_of[t] - turn_of[start];
        d = d < n_dist - 1 ? d : n_dist - 1;
        int end = meta->needles[2 * n + 1] < t + 1 ? meta->needles[2 * n + 1] : t + 1;
        for (int j = start; j < end; j++) {
            total[d]++;
            kept[d] += kvcache_has(c, j);
        }
    }
    for (int d = 0; d < n_dist; d++)
        out[d] = total[d] ? (double)kept[d] / total[d] : NAN;
}
