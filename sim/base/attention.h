/* attention.h — exact causal attention over a block of consecutive queries, with OpenBLAS.
 *
 * Queries i0 .. i0+B-1 of one head attend over keys [lo(i), i]: one sgemm for the logits
 * (B x (i0+B)), a causal row softmax, one sgemm for the outputs. lo(i) = 0 on a global layer
 * (window = 0) and max(0, i - window + 1) on a sliding-window layer of `window` keys. The engine
 * uses it for the prompt (blockwise, never a T x T matrix) and for the decode steps. */
#ifndef KVSIM_ATTENTION_H
#define KVSIM_ATTENTION_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "sim/base/pool.h"

/* p: [B][ld] with ld >= i0+B; on return row b holds the probabilities over keys
 * [lo(i0+b), i0+b] and zeros elsewhere up to column i0+B-1. o (may be NULL): [B][D] outputs. row_max/row_z: the max scaled
 * logit and the normaliser of each row (so a key outside the trace can be weighted later).
 * softcap > 0: each logit is soft-capped first, softcap_logitf (Gemma 2); row_max is then the
 * max capped logit. Every function below that takes `softcap` means the same. */
void attention_block(const float *q, int B, int i0, const float *k, const float *v, int D,
                     float scale, float softcap, int window, float *p, int ld, float *o,
                     float *row_max, float *row_z);

/* A logit soft-capped: cap * tanh(logit / cap) (geometry.h's attn_softcap_logit, in float). */
static inline float softcap_logitf(float logit, float cap)
{
    return cap * tanhf(logit / cap);
}

/* The softmax step alone: row b of s has first_len + b logits (scaled by `scale`), of which the
 * last `window` are valid when window > 0 (the others become zero), all when window = 0. */
void softmax_causal_rows(float *s, int rows, int ld, int first_len, float scale, int window,
                         float *row_max, float *row_z);

/* The two implementations softmax_causal_rows chooses between (softmax.c): the compiler's
 * vectorisation of the plain loops, cloned for AVX2, and, on GCC for x86-64 and a CPU with
 * AVX-512, the same arithmetic written with AVX-512 (softmax_avx512.c). They agree bit for bit
 * (test_softmax). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SOFTMAX_HAS_AVX512 1
#else
#define SOFTMAX_HAS_AVX512 0
#endif
void softmax_causal_rows_vectorised(float *s, int rows, int ld, int first_len, float scale,
                                    int window, float *row_max, float *row_z);
#if SOFTMAX_HAS_AVX512
void softmax_causal_rows_avx512(float *s, int rows, int ld, int first_len, float scale,
                                int window, float *row_max, float *row_z);
/* softmax_avx512.c's inlined 16-lane expf against glibc's (_ZGVeN16v_expf), bit for bit, on
 * the floats whose bits are first, first + step, ... up to last: how many differ. */
long exp16_mismatches(uint32_t first, uint32_t last, uint32_t step);
#endif

/* The first key query t attends over on a layer with this window (0 = global: key 0): the one
 * statement of the attended range [attn_first_key(window, t), t], for these kernels and for
 * every layer above (sim/format/geometry.h). */
static inline int attn_first_key(int window, int t)
{
    return window > 0 && t >= window ? t - window + 1 : 0;
}

/* Prompt queries per attention_block in prompt_statistics. */
enum { PROMPT_STATS_BLOCK = 128 };

/* The prompt attention statistics of a PrefillView (policies/policy.h) for one layer (a
 * sliding-window layer when window > 0), computed
 * blockwise (never a P x P matrix). q is [n_q_heads][stride][D] and k [n_q_heads/group][stride][D]
 * (rows [0, n_prompt) are read; stride is the layer's token capacity). When not NULL,
 * mass [n_q_heads][n_prompt] is accumulated into (the caller zeroes it) and obs
 * [n_q_heads][obs_rows][n_prompt] receives the rows of the last obs_rows prompt queries, zero
 * beyond each query. The query heads are spread over pool (NULL: this thread alone); each head
 * is computed the same way whichever thread takes it. Returns the floating-point operations
 * done (attention_block_flops of each block). Used by replay and by `kvsim eval`. */
double prompt_statistics(const float *q, const float *k, int n_q_heads, int group, int stride,
                         int n_prompt, int D, float scale, float softcap, int window,
                         float *mass, float *obs,
                         int obs_rows, Pool *pool);

/* The same column sums over the queries [q_begin, q_end) of every query head (one decode run),
 * in blocks of PROMPT_STATS_BLOCK from q_begin: dmass [n_q_heads][stride] is accumulated into
 * (the caller zeroes it once, then adds the runs in order). What oracle_future knows
 * (PrefillView.decode_mass). */
double decode_mass(const float *q, const float *k, int n_q_heads, int group, int stride,
                   int q_begin, int q_end, int D, float scale, float softcap, int window,
                   float *dmass,
                   Pool *pool);

/* The exact attention of the B <= rows_cap consecutive queries t0 .. t0+B-1 of every query head
 * (the replay engine's decode steps), one attention_block per head, heads spread over pool
 * (NULL: this thread alone). q [n_q_heads][stride][D], k and v [n_q_heads/group][stride][D].
 * Out: probs [B][n_q_heads][stride] (row (b, h) as attention_block's p), out
 * [n_q_heads][rows_cap][D], row_max and row_z [n_q_heads][rows_cap]. Returns the
 * floating-point operations done, both products. */
double attention_rows(const float *q, const float *k, const float *v, int n_q_heads, int group,
                      int stride, int D, float scale, float softcap, int window, int t0, int B,
                      int rows_cap,
                      float *probs, float *out, float *row_max, float *row_z, Pool *pool);

/* Floating-point operations of attention_block (both products), for throughput figures. */
double attention_block_flops(int B, int i0, int D, int with_output);

#endif
