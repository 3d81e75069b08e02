/* forward.h — the transformer forward pass over a growing KV cache.
 *
 * forward_tokens() feeds up to chunk_size tokens at the next positions: the prompt goes through
 * in chunks as matrix-matrix products (activations [chunk][hidden] x weights^T, attention of the
 * chunk against the whole cache with a causal mask), a decode step is a chunk of one and uses
 * matrix-vector products. Every product goes through OpenBLAS CBLAS. Memory is the weights, the
 * KV cache for max_tokens tokens and one chunk's activations.
 *
 * The math is HF's for the supported architectures (traces/model/model.h): embeddings (times
 * embed_scale, Gemma), pre-norm RMSNorm (by (1 + w) for Gemma), q/k/v projections (+ bias),
 * per-head q/k RMSNorm (Qwen3, Gemma 3), RoPE in the rotate_half layout at positions 0, 1, 2,
 * ..., with each layer's frequencies, softmax(attn_scale · q·k) (soft-capped, Gemma 2) over the
 * keys the layer's geometry lets the query attend (model_describe: every earlier key, or the last
 * sliding_window of them), o projection (normed, Gemma), residual, RMSNorm, feed-forward (a gated
 * MLP, SwiGLU or GeGLU for Gemma, or top-k routed SwiGLU experts in a mixture-of-experts layer:
 * traces/model/moe.h; output normed, Gemma), residual; final RMSNorm, the LM head and the final
 * soft-capping (Gemma 2). Which of these apply is the model's flags and parameters (ModelConfig),
 * never its architecture's name. Weight matrices are multiplied in the checkpoint's precision
 * (traces/model/matrix.h).
 *
 * An observer sees what a trace stores, as it is computed: each layer's post-RoPE Q/K/V of the
 * chunk and, at the positions it asks for, the softmax probabilities of the attention itself. */
#ifndef KVSIM_FORWARD_H
#define KVSIM_FORWARD_H

#include <stdint.h>

#include "traces/model/model.h"

typedef struct {
    void *user;
    /* Post-RoPE q [Hq][n][D], k and v [Hkv][n][D] of the tokens at positions [t0, t0+n) of one
     * layer. May be NULL. */
    void (*on_qkv)(void *user, int layer, int t0, int n, const float *q, const float *k,
                   const float *v);
    /* Whether on_attention should see the query at `position`. May be NULL (never). */
    int (*wants_attention)(void *user, int position);
    /* The attention probabilities of the query at `position` in one layer:
     * probs [Hq][position + 1], each row summing to 1. */
    void (*on_attention)(void *user, int layer, int position, const float *probs);
} ForwardObserver;

/* The keys one KV head attends over in a restricted decode step: n slots, slot i holding cache
 * row pos[i] (a position already fed, or the new token's), or, when alt_kv[i] is not NULL, the
 * key alt_kv[i][0, D) and value alt_kv[i][D, 2D) instead (then pos[i] may be -1). This is a
 * policy's KVCache (policies/policy.h) as the forward pass sees it. */
typedef struct {
    int n;
    const int32_t *pos;
    float *const *alt_kv;
} SlotList;

/* Restricts each layer's attention of a decode step to slot lists, per KV head: the slots are
 * attended as given, except that a slot holding a position before the layer's window gets
 * probability 0 (as the model, and the replay's metrics, give it; the output is zero when no
 * slot is left). In each layer
 * the new token's K/V are written to the cache at its position and ForwardObserver.on_qkv is
 * called first (a caller can decide the slots from them), then slots() for every KV head, then
 * on_attention() with what each query head really attended. */
typedef struct {
    void *user;
    SlotList (*slots)(void *user, int layer, int kv_head);
    /* probs[g] is [group][slots(g).n]: query head g*group+i's softmax over KV head g's slots,
     * in slot order. May be NULL. */
    void (*on_attention)(void *user, int layer, const float *const *probs);
} CacheSelector;

typedef struct {
    const Model *model;
    int max_tokens; /* KV cache capacity */
    int chunk_size; /* most tokens per forward_tokens() call */
    /* Tokens fed so far = position of the next token. Setting it back to an earlier count
     * rewinds the run: the cache rows before it are untouched, later ones are fed again. */
    int n_cached;
    /* The attention geometry, from model_describe(config, max_tokens): the scale, each layer's
     * window and RoPE frequencies. */
    TraceModel geometry;
    int rope_tables_layer; /* the layer whose frequencies rope_cos/rope_sin hold, -1: none */

    /* One chunk's activations. */
    float *residual;    /* [chunk][hidden] the residual stream */
    float *normed;      /* [chunk][hidden] RMSNorm output, then projection outputs to add */
    float *q_proj;      /* [chunk][Hq*D] token-major as the projection writes it */
    float *k_proj;      /* [chunk][Hkv*D] */
    float *v_proj;      /* [chunk][Hkv*D] */
    float *q_heads;     /* [Hq][chunk][D] head-major, normed and rotated */
    float *k_heads;     /* [Hkv][chunk][D] */
    float *v_heads;     /* [Hkv][chunk][D] */
    float *attn_out;    /* [chunk][Hq*D] */
    float *scores;      /* [chunk][max_tokens] one head's scores, then probabilities */
    float *gate;        /* [chunk][intermediate] */
    float *up;          /* [chunk][intermediate] */
    double *rope_cos;   /* [chunk][D/2] */
    double *rope_sin;   /* [chunk][D/2] */
    float *probs;       /* attention rows being gathered for the observer */
    float *slot_kv;     /* one KV head's slot keys then values, [2][slots][D], when selected */
    float *slot_probs;  /* [Hq][slots of its KV head] when selected */
    size_t slot_kv_cap, slot_probs_cap;
    float *logits;      /* [vocab] of the last token fed */
    float *matrix_scratch; /* 16-bit weights converted a block at a time (matrix_linear) */
    struct MoeScratch *moe; /* the experts' scratch when some layer has them, else NULL */

    /* The KV cache, [n_layers][Hkv][max_tokens][D] each: exactly the trace's K and V layout. */
    float *key_cache;
    float *value_cache;
} RunState;

/* A run of at most max_tokens tokens, its geometry from model_describe (RoPE scaling of the
 * "dynamic" type depends on max_tokens). */
RunState *run_state_new(const Model *model, int max_tokens, int chunk_size);
void run_state_free(RunState *s);

/* Feeds n tokens (1 <= n <= chunk_size, n_cached + n <= max_tokens, ids < vocab_size) at
 * positions [n_cached, n_cached + n). Returns the logits of the last one when want_logits,
 * else NULL (the LM head is skipped). observer may be NULL. */
const float *forward_tokens(RunState *s, const int32_t *tokens, int n, int want_logits,
                            const ForwardObserver *observer);

/* One decode step (the token at position n_cached) whose attention, in every layer and KV head,
 * covers only the slots the selector gives; otherwise the same computation as forward_tokens
 * with n = 1. observer->wants_attention is not consulted (the selector gets the attention). */
const float *forward_token_selected(RunState *s, int32_t token, int want_logits,
                                    const ForwardObserver *observer,
                                    const CacheSelector *selector);

/* Feeds any number of tokens in chunks of chunk_size; returns the logits of the last one. */
const float *forward_prompt(RunState *s, const int32_t *tokens, int n,
                            const ForwardObserver *observer);

/* Greedy choice: the index of the largest logit, the lowest on ties. */
int argmax_token(const float *logits, int vocab_size);

/* The cache of one layer and KV head: [max_tokens][D], rows [0, n_cached) valid. */
const float *run_state_keys(const RunState *s, int layer, int kv_head);
const float *run_state_values(const RunState *s, int layer, int kv_head);

#endif
