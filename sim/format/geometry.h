/* geometry.h — the attention geometry of one layer: the one place kvsim states how a query
 * attends.
 *
 * For each layer: the scale of the logits (softmax(attn_scale · q·k)), their soft-capping
 * (Gemma 2: cap · tanh(logit / cap) before the softmax), the attended range (every
 * earlier key on a global layer, the last `window` keys on a sliding-window layer) and RoPE (the
 * pair layout and each pair's inverse frequency). A model's config gives it
 * (traces/model/model.h, model_describe), the trace stores it (trace.h: TraceMeta, format version
 * 2), and everything downstream reads it from there: LayerView (policies/policy.h,
 * layer_view_make), the replay engine's true attention, the metrics, `kvsim check`, the forward
 * pass. Nothing else writes 1/sqrt(head_dim) or assumes that query t attends over [0, t]. */
#ifndef KVSIM_GEOMETRY_H
#define KVSIM_GEOMETRY_H

#include "sim/base/attention.h" /* attn_first_key: the keys a query attends */

typedef enum { ROPE_HALF = 0, ROPE_INTERLEAVED = 1 } RopeLayout;

typedef struct {
    double attn_scale;  /* softmax(attn_scale * q.k) */
    double attn_softcap; /* > 0: softmax(c * tanh(attn_scale * q.k / c)) (attn_softcap_logit) */
    int window;         /* 0: global, query t attends keys [0, t]; W > 0: [max(0, t-W+1), t] */
    RopeLayout rope_layout;
    int head_dim;
    const double *rope_inv_freq; /* [head_dim/2], after any RoPE scaling */
} LayerGeometry;

/* The scale of standard dot-product attention, 1/sqrt(head_dim): the default of every model
 * kvsim knows and of synthetic traces. */
double attn_scale_default(int head_dim);

/* A logit after the layer's soft-capping (cap <= 0: unchanged): cap * tanh(logit / cap). The
 * one statement of it; sim/base/attention.h applies the same to float rows. */
double attn_softcap_logit(double logit, double cap);

/* Unscaled RoPE inverse frequencies: out[f] = theta^(-2f/head_dim), f < head_dim/2. */
void rope_default_inv_freq(double theta, int head_dim, double *out);
/* Index of the two components of pair f in a head vector for the given layout:
 * half: (f, f + D/2); interleaved: (2f, 2f+1). */
void rope_pair(RopeLayout layout, int head_dim, int f, int *i0, int *i1);
/* Rotates one head vector in place by angle position * inv_freq[f] for every pair f
 * (a negative position rotates back). */
void rope_apply(float *x, int head_dim, RopeLayout layout, const double *inv_freq,
                double position);

#endif
