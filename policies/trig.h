/* trig.h — TriAttention's trigonometric key score, shared by the `trig` policy and its tests.
 *
 * Calibration gives, per query head h and RoPE pair f, the complex mean E[q_f] of the pre-RoPE
 * query pair and the mean modulus E|q_f|. The score of a cached post-RoPE key k at current
 * position t is
 *
 *   S(k) = mean_δ Σ_f |E q_f|·|k_f|·cos(ω_f (t+δ) + arg E q_f − arg k_f)
 *          + Σ_f (E|q_f| − |E q_f|)·|k_f|,        δ ∈ {2^0, 2^1, …, 2^16}.
 *
 * Since arg k_f = arg k_f(pre-RoPE) + ω_f p, the cosine only depends on t + δ − p: keys are never
 * rotated back. The mean over δ is folded into one complex weight per pair, so scoring n keys
 * for several query heads is two matrix products. */
#ifndef KVSIM_POLICIES_TRIG_H
#define KVSIM_POLICIES_TRIG_H

#include <stdint.h>

#include "sim/format/trace.h"

#define TRIG_N_OFFSETS 17 /* δ = 2^0 … 2^16 */

typedef struct {
    int n_q_heads, head_dim;
    RopeLayout pairing; /* which two dimensions of a head vector form pair f */
    int *pair_re, *pair_im; /* [head_dim/2]: the dimensions of pair f under `pairing` */
    double *inv_freq;       /* [head_dim/2] ω_f */
    /* [head_dim/2]: mean over δ of e^{i ω_f δ} */
    double *offset_re, *offset_im;
    /* [n_q_heads][head_dim/2]: E q_f (real, imaginary part) and E|q_f|, pre-RoPE queries */
    double *mean_re, *mean_im, *mean_abs;
    /* The sums behind the means, over the n_used queries accumulated so far. */
    double *sum_re, *sum_im, *sum_abs;
    long n_used;
} TrigScorer;

/* Sets up a scorer with zero statistics; inv_freq ([head_dim/2]) is copied. */
void trig_scorer_init(TrigScorer *s, int n_q_heads, int head_dim, RopeLayout pairing,
                      const double *inv_freq);
void trig_scorer_free(TrigScorer *s);

/* Replaces the statistics with those of the pre-RoPE queries of tokens [0, n_used): q is
 * [n_q_heads][n_tokens][head_dim], post-RoPE as the trace stores it, and each token j is
 * rotated back by positions[j] with the RoPE that produced it (q_layout, q_inv_freq), which may
 * differ from the scorer's pairing. n_used >= 1. */
void trig_scorer_calibrate(TrigScorer *s, const float *q, int n_tokens, int n_used,
                           const int32_t *positions, RopeLayout q_layout,
                           const double *q_inv_freq);
/* Adds the queries of tokens [j0, j1) to those the statistics already hold (none after init):
 * the means become those of every query accumulated, summed in the order they came, so that
 * accumulating [0, n) in pieces gives the statistics calibrate gives for [0, n). j1 > j0. */
void trig_scorer_accumulate(TrigScorer *s, const float *q, int n_tokens, int j0, int j1,
                            const int32_t *positions, RopeLayout q_layout,
                            const double *q_inv_freq);

/* Scores n post-RoPE keys (rows of keys, [n][head_dim]) at current position t for query heads
 * [h0, h0 + nh): out is [nh][n], S(k) of each head before any normalisation. */
void trig_scorer_score(const TrigScorer *s, int h0, int nh, const float *keys, int n, double t,
                       float *out);

#endif
