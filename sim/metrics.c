#include "sim/metrics.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool slot_is_exact(const KVCache *c, int slot)
{
    return c->pos[slot] >= 0 && c->alt_kv[slot] == NULL;
}

static int exact_count(const KVCache *c)
{
    int n = 0;
    for (int i = 0; i < c->n; i++)
        n += slot_is_exact(c, i);
    return n;
}

/* Weight of an alt slot relative to the full row's normaliser: exp(s - max) / Z. */
static double alt_weight(const KVCache *c, int slot, const FullRow *row)
{
    float dot = cblas_sdot(row->head_dim, row->q, 1, c->alt_kv[slot], 1);
    return exp((double)row->scale * dot - row->logit_max) / row->logit_z;
}

CacheAttention cache_attention(const KVCache *c, const FullRow *row, float *attn)
{
    CacheAttention ca = {0, 0};
    double alt_total = 0;
    int n_exact = exact_count(c);
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
    for (int i = 0; i < c->n; i++) {
        if (c->alt_kv[i]) {
            double w = alt_weight(c, i, row);
            alt_total += w;
            if (attn)
                attn[i] = (float)w;
        } else if (attn) {
            attn[i] = row->p[c->pos[i]];
        }
    }
    ca.denominator = ca.retained_mass + alt_total;
    if (attn && ca.denominator > 0) {
        float inv = (float)(1.0 / ca.denominator);
        cblas_sscal(c->n, inv, attn, 1);
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
    for (int j = k; j < n; j++) {
        if (weaker(p, out[0], j)) {
            out[0] = j;
            sift_down(p, out, k, 0);
        }
    }
}

double recall_at_k(const KVCache *c, const int32_t *topk, int k)
{
    int hit = 0;
    for (int i = 0; i < k; i++)
        hit += kvcache_has(c, topk[i]);
    return (double)hit / k;
}

double output_error(const KVCache *c, const FullRow *row, CacheAttention ca)
{
    int D = row->head_dim;
    float *num = kv_calloc((size_t)D, sizeof *num); /* sum of weight * value over the cache */
    float *diff = kv_malloc((size_t)D * sizeof *diff);
    int n_exact = exact_count(c);
    if (n_exact > (row->t + 1) / 2) {
        /* sum over exact slots = o_full - sum over the complement */
        cblas_scopy(D, row->o_full, 1, num, 1);
        for (int j = 0; j <= row->t; j++) {
            int s = c->slot_of[j];
            if (s < 0 || c->alt_kv[s])
                cblas_saxpy(D, -row->p[j], row->v + (size_t)j * D, 1, num, 1);
        }
    } else {
        for (int i = 0; i < c->n; i++)
            if (slot_is_exact(c, i))
                cblas_saxpy(D, row->p[c->pos[i]], row->v + (size_t)c->pos[i] * D, 1, num, 1);
    }
    for (int i = 0; i < c->n; i++)
        if (c->alt_kv[i])
            cblas_saxpy(D, (float)alt_weight(c, i, row), c->alt_kv[i] + D, 1, num, 1);
    double err = NAN;
    if (ca.denominator > 0) {
        cblas_scopy(D, row->o_full, 1, diff, 1);
        cblas_saxpy(D, (float)(-1.0 / ca.denominator), num, 1, diff, 1);
        double norm_full = cblas_snrm2(D, row->o_full, 1);
        err = norm_full > 0 ? cblas_snrm2(D, diff, 1) / norm_full : 0.0;
    }
    free(num);
    free(diff);
    return err;
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
