/* press.h — kvpress's ScorerPress in kvsim: a per-token score computed from the keys alone, a
 * prefill span compressed once, when it is complete, to its best tokens, and snapkv's decode.
 *
 * A policy built on it (knorm, keydiff) is its score function and a PolicyType whose callbacks
 * are the ones below; the parameters (PressParams, press_params) and the budget rule are shared.
 *
 * Prefill. Chunks are admitted whole; at a span's last chunk the last min(window, span length)
 * positions (the window: kvpress compresses the context and appends the question after it) are
 * kept, and the cached positions before them compete for budget - 1 - |window| slots by the
 * score (higher kept; ties: the later position). A cache of at most budget - 1 tokens is not
 * cut. The score reads nothing but keys, so the choice does not depend on the chunking.
 * Decode, as snapkv's: with `decode = window` the chosen tokens before the window stay until the
 * next span's compression and the rest of the budget slides (the window, then each new token,
 * its oldest evicted after the attention), so |cache| <= budget at every attention; with
 * `decode = grow` (kvpress: compression at prefill only) nothing is evicted during decode. */
#ifndef KVSIM_PRESS_H
#define KVSIM_PRESS_H

#include <stddef.h>
#include <stdint.h>

#include "policies/policy.h"

enum { PRESS_DECODE_WINDOW = 0, PRESS_DECODE_GROW = 1 };

typedef struct {
    int budget;
    int window;
    int decode;
} PressParams;

/* The table of PressParams; a press with more parameters (a struct that starts with
 * PressParams) lists PRESS_PARAM_SPECS first in its own table. */
#define PRESS_PARAM_SPECS                                                                        \
    {"budget", PARAM_INT, offsetof(PressParams, budget), "512", 1, 1 << 30, NULL,                \
     "tokens per KV head at attention time, the current one included"},                          \
        {"window", PARAM_INT, offsetof(PressParams, window), "32", 0, 1 << 30, NULL,             \
         "last tokens of a span kept at its compression (the question); the decode window "      \
         "starts with them"},                                                                     \
        {"decode", PARAM_ENUM, offsetof(PressParams, decode), "window", 0, 0, "window|grow",     \
         "window: recent tokens beyond the budget evicted oldest first; grow: no decode "        \
         "eviction"}

extern const ParamSpec press_params[];

/* Writes score_at[cand[i]] for i < n: the score of KV head g's cached positions cand[0, n) (the
 * candidates of one compression, ascending); higher is kept. `params` are the policy's own (a
 * struct that starts with PressParams); pv is the span's last chunk. May read what the
 * information rules allow at that chunk (policies/policy.h): the keys of the candidates (knorm,
 * keydiff), the span's queries (expected_attention). */
typedef void (*PressScoreFn)(const void *params, const PrefillView *pv, int g, const int32_t *cand,
                             int n, double *score_at);

int press_validate(const void *params, KvErr *err);
/* params: the type's own struct (type->params_size bytes, PressParams first), copied. */
Policy *press_create(const PolicyType *type, PressScoreFn score, const void *params,
                     const LayerView *L);
void press_prefill(Policy *p, const PrefillView *pv);
void press_step(Policy *p, const StepView *sv);
void press_observe(Policy *p, const StepView *sv, const float *const *attn);
void press_destroy(Policy *p);
long press_max_slots(const void *params, const LayerView *L, int t);

/* The presses' scores for the wrappers (policies/wrap.h): every press exposes them. */
extern const PolicyScorer press_scorer;

#endif
