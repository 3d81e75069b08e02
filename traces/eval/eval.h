/* eval.h — closed-loop decoding with live eviction: a model generates while a policy decides,
 * layer by layer and KV head by KV head, what each new token attends over (docs/eval.md).
 *
 * A prompt is prefilled once with the full cache (eval_prefill); any number of policies then
 * decode from that same state, one after the other (eval_decode rewinds the run to the end of
 * the prompt). With a [[decode]] marker only the text before it is prefilled; the tokens after
 * it (forced) are fed first in every decode, one step each through the policy's cache, as a
 * question arriving in a later turn of a chat is; then generation starts.
 *
 * The policies are driven as in replay, by the same module (sim/driver/driver.h, closed loop): one
 * instance per layer over a LayerView whose arrays have room for the whole run and whose rows
 * fill in as tokens are fed (the closed-loop rules of policies/policy.h); prefill with the
 * prompt statistics it asks for, the prompt being one prefill span fed whole (one chunk: the
 * model's prompt pass attends over the full cache, so chunked prefill, where a chunk's queries
 * attend through the policy's cache, is replay only and `kvsim eval` refuses [run]
 * prefill_chunk > 0); then, for each fed token t, in each layer: step(), the
 * attention of query t restricted to the instance's slots (exact K/V from the run's cache, or
 * the slot's alt_kv), observe() with that attention ([group][n] per KV head, softmax over the
 * slots) and memory(). What eval adds is where Q/K/V and that attention come from: the model's
 * forward pass. The new token's K/V always enter the run's cache at its position; the policy
 * decides whether a slot refers to it.
 *
 * Oracles that read the true attention (oracle_topk) get the full row of the current query over
 * every position fed. A policy that needs the future (want_decode_mass: oracle_future) cannot
 * run in closed loop: eval_decode reports it as not applicable. */
#ifndef KVSIM_EVAL_H
#define KVSIM_EVAL_H

#include <stdbool.h>
#include <stdint.h>

#include "policies/policy.h"
#include "sim/driver/driver.h"
#include "traces/model/forward.h"
#include "traces/model/prompt.h"
#include "traces/model/tokenizer.h"

typedef struct EvalPrefill EvalPrefill;

/* Prefills prompt->tokens[0, n_prompt) (at least one, ids < vocab) with the full cache, keeping
 * every layer's prompt Q, for decodes of the forced tokens [n_prompt, n_tokens) and up to
 * max_new generated tokens (>= 1). last_segment: the segment generated tokens continue
 * (PromptMarkup.last_segment). origin names the prompt in errors (a run longer than the
 * model's sliding window). */
EvalPrefill *eval_prefill(const Model *model, const PromptTokens *prompt, int last_segment,
                          int max_new, const char *origin, KvErr *err);
void eval_prefill_free(EvalPrefill *pf);

typedef struct {
    void *user;
    /* After layer `layer`'s attention of query t, before observe(): inst->cache is what the
     * query attended over, probs[g] that attention ([group][cache[g].n]) and attn_out the
     * attention outputs [Hq][D]. May be NULL. */
    void (*on_layer)(void *user, int layer, int t, const Policy *inst, const LayerView *L,
                     const float *const *probs, const float *attn_out);
    /* Generated token number `index` (0 first, after the forced tokens) was chosen from
     * `logits`; returns nonzero to stop generating after it. May be NULL. */
    int (*on_token)(void *user, int index, int32_t token, const float *logits);
} EvalHooks;

typedef struct {
    bool applicable;     /* false: the policy needs the future (nothing was generated) */
    int n_generated;     /* tokens written to out_tokens (EOS excluded) */
    bool stopped_at_eos;
    /* The layers' MemReport after the last decode step (after prefill when none), summed. */
    double device_bytes, host_bytes;
    int decode_steps;    /* tokens fed through the policy's cache: forced, then generated */
    int forced_steps;    /* of which forced (the prompt's tokens after [[decode]]) */
} EvalDecode;

/* The forced tokens, then greedy decoding of up to max_new tokens under one policy (instances
 * seeded as in replay: policy_instance_seed(run_seed, spec->label, layer)). Generation stops at
 * an EOS of the model or tokenizer (tok may be NULL), at max_new, or when hooks->on_token asks.
 * out_tokens has room for max_new and receives the generated tokens only.
 * Returns -1 with a message when the policy cannot be created for this prompt. */
int eval_decode(EvalPrefill *pf, const PolicySpec *spec, uint64_t run_seed, int kv_bits,
                const Tokenizer *tok, const EvalHooks *hooks, int32_t *out_tokens,
                EvalDecode *out, KvErr *err);

#endif
