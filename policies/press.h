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

#include <stdint.h>

#include "policies/policy.h"

enum { PRESS_DECODE_WINDOW = 0, PRESS_DECODE_GROW = 1 };

typedef struct {
    int budget;
    int window;
    int decode;
} PressParams;

extern const ParamSpec press_params[];

/* Writes score_at[cand[i]] for i < n: the score of KV head g's cached positions cand[0, n) (the
 * candidates of one compression, ascending); higher is kept. May read the keys of the
 * candidates only. */
typedef void (*PressScoreFn)(const LayerView *L, int g, const int32_t *cand, int n,
                             double *score_at);

int press_validate(const void *params, KvErr *err);
Policy *press_create(const PolicyType *type, PressScoreFn score, const void *params,
                     const LayerView *L);
void press_prefill(Policy *p, const PrefillView *pv);
void press_step(Policy *p, const StepView *sv);
void press_observe(Policy *p, const StepView *sv, const float *const *attn);
void press_destroy(Policy *p);
long press_max_slots(const void *params, const LayerView *L, int t);

#endif
