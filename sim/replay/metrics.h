/* metrics.h — what one query's attention over one cache is worth (docs/metrics.md).
 *
 * Every function here scores one query head at one decode step against one KV head's cache:
 * the engine calls them for every policy, layer, query head and evaluated step, and the tests
 * check them against hand-computed values. */
#ifndef KVSIM_METRICS_H
#define KVSIM_METRICS_H

#include <stdbool.h>
#include <stdint.h>

#include "policies/policy.h"

/* The full (uncompressed) attention of one query head at step t, as the engine computed it. */
typedef struct {
    int t;              /* the query: keys [attn_first_key(window, t), t] */
    int head_dim;
    float scale;        /* attn_scale */
    float softcap;      /* > 0: the logits are soft-capped (softcap_logitf) */
    int window;         /* the layer's: 0 global, W > 0 the last W keys (geometry.h) */
    const float *q;     /* [D] the query */
    const float *p;     /* [t+1] softmax over the keys attended (zero before the window) */
    float logit_max;    /* max_j of the logit scale*q.k_j (soft-capped when softcap > 0) */
    float logit_z;      /* sum_j exp(logit_j - logit_max) */
    const float *k;     /* [T][D] the KV head's keys from the trace */
    const float *v;     /* [T][D] the KV head's values from the trace */
    const uint16_t *v16; /* NULL, or v as halves (each value exactly a half: the same floats) */
    const float *o_full; /* [D] sum_j p_j v_j */
} FullRow;

/* The attention the query really computes over a cache, in slot order. */
typedef struct {
    double retained_mass; /* sum of p over the cache's real, exact slots */
    double denominator;   /* the exact slots' p summed slot by slot + the alt slots' weights */
} CacheAttention;

/* Retained attention mass and the renormalised attention over the cache's slots: attn[i] is
 * slot i's share (sums to 1). attn may be NULL when only the mass is wanted. Slots holding
 * approximate K/V (alt_kv) get their weight from their own key. A slot holding a position
 * before the query's window (a sliding-window layer) gets no attention, as in the model; when no
 * slot is attended at all, attn is zero.
 *
 * The renormalised attention is exact for any cache: it is p_j / sum_cache p while every cached
 * probability is a normal float (the float32 full row then carries each share to float
 * precision), and otherwise a softmax of the logits scale*q.k over the cache's slots alone, so a
 * cache that holds less than FLT_MIN of the row, or alt slots whose logit exceeds the row's
 * maximum, still gets the distribution the query computes over it. */
CacheAttention cache_attention(const KVCache *c, const FullRow *row, float *attn);

/* cache_attention for n_heads query heads sharing cache c (rows[h] each head's full row; attn
 * [n_heads][c->n] or NULL), into out[n_heads]: every number as cache_attention gives it, the
 * heads' sums computed side by side. Without attn only the retained mass is computed (the
 * denominators are 0). */
void cache_attention_heads(const KVCache *c, const FullRow *rows, int n_heads, float *attn,
                           CacheAttention *out);

/* The retained mass of a cache with quantized K/V (kv_quant): sum over the slots holding real
 * positions j of min(p_t(j), attn[slot]), the overlap of the true attention with the attention
 * the query computes over the cache (attn from cache_attention). For a cache of exact slots
 * alone this is the retained mass (each cached p_t(j) is at most its renormalised share), so
 * the figure reduces to it; a quantized key's logit error moves attention between slots, and
 * what moves away from the true distribution is lost. */
double overlap_mass(const KVCache *c, const FullRow *row, const float *attn);

/* Indices of the k largest p[0..n) (ties: lower index first), in out[0..k). Requires k <= n. */
void topk_indices(const float *p, int n, int k, int32_t *out);

/* recall@k = |cache ∩ top-k| / k, counting real positions cached (exact or approximate). */
double recall_at_k(const KVCache *c, const int32_t *topk, int k);

/* Whether output_errors has anything to compute: false when the cache holds every key [0, t]
 * with its exact K/V (the error is then 0 by definition, and the attention is not needed). */
bool output_errors_needed(const KVCache *c, int t);

/* Relative output error ||o_S - o_full|| / ||o_full|| of n_heads query heads sharing cache c,
 * where o_S is the attention output over the cache (alt slots with their own K and V).
 * attn is [n_heads][c->n], each head's normalised attention from cache_attention; rows[h] its
 * full row. scratch holds (c->n + n_heads) * head_dim floats. Writes err[n_heads].
 *
 * o_S is float32 arithmetic in a fixed order (cache_outputs in metrics.c): for fewer than 12
 * heads kvsim's own loop, which adds in the order of OpenBLAS 0.3.21's Haswell sgemm (the
 * kernel earlier versions called, so their results stay bit for bit); from 12 heads, sgemm. */
void output_errors(const KVCache *c, const FullRow *rows, int n_heads, const float *attn,
                   float *scratch, double *err);

/* Nested caches (policies/policy.h: keep_order), scored together: cache s holds the positions
 * order[0, sizes[s]) (sizes ascending, at most n_sizes of them) with their exact K/V, and the
 * n_heads query heads rows[h] share them. For each cache s and head h, at [s * n_heads + h]:
 * mass[] its retained mass, err[] its relative output error, recall[] its recall@k against
 * topk[h * topk_stride ...] (k positions): the quantities cache_attention_heads, output_errors
 * and recall_at_k give (a cache holding every attended key: mass 1, error 0; the fallback to a
 * softmax of the logits over the cache as there), with every sum taken in keep order:
 *   mass = sum_i p[order[i]] (double), o_S = (sum_i fmaf(p, v) in float) * (float)(1 / mass),
 * so that a cache's figures do not depend on which other caches of the nest are scored with it,
 * and the sums of a larger cache continue those of a smaller one: one pass over the largest
 * cache scores them all. scratch: nested_scratch_floats floats; rank_of: t + 1 int32s (any
 * contents). */
size_t nested_scratch_floats(int n_max, int n_sizes, int n_heads, int head_dim);
void nested_metrics(const int32_t *order, const int *sizes, int n_sizes, const FullRow *rows,
                    int n_heads, const int32_t *topk, int topk_stride, int k, float *scratch,
                    int32_t *rank_of, double *mass, double *err, double *recall);

/* Fraction of needle tokens at positions <= t that the cache holds; NaN if there are none. */
double needle_survival(const KVCache *c, const TraceMeta *meta, int t);
/* The same by turn distance: out[d] for the needle tokens at positions <= t whose needle starts
 * in turn turn_of[t] - d (the last distance, n_dist - 1: that many turns back or more); NaN
 * where there are none. turn_of[T]: the turn of each position. */
void needle_survival_by_turn(const KVCache *c, const TraceMeta *meta, const int32_t *turn_of,
                             int t, int n_dist, double *out);

#endif
