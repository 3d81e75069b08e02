/* eval.h — closed-loop decoding with live eviction: a model generates while a policy decides,
 * layer by layer and KV head by KV head, what each new token attends over (docs/eval.md).
 *
 * A prompt's first prefill span is prefilled once with the full cache (eval_prefill); any number
 * of policies then run the rest of the prompt from that same state, one after the other
 * (eval_decode rewinds the run to the end of that span). The rest is the prompt's spans in order
 * (PromptTokens.spans): forced tokens ([[decode]]'s text, an assistant message given in a chat)
 * are fed one decode step each through the policy's cache; at a generation point ([[generate]],
 * and after the last input token) the model answers greedily, one question per generation point;
 * a later prefill span (a later turn) arrives on top of what the run holds, as [run] history says
 * (RunHistory, sim/driver/driver.h):
 *   persist   the policy's caches carry over: the span's tokens are fed one at a time, each
 *             query attending over the policy's caches as they were at the end of the last
 *             turn plus the span's tokens so far (what a serving engine that keeps the
 *             compressed cache computes), then the span is the policy's prefill span [a, b);
 *   reencode  the instances start anew and the whole history [0, b) (the policy's own earlier
 *   prefix    answers included) is encoded with the full cache, then prefilled into them as
 *             one span (an application that keeps no cache). The first span's K/V are
 *             the shared prefill's (the same full-cache computation), so only [P, b) is computed
 *             again. prefix drives the policies as reencode does (as in replay: the two differ
 *             only in turns.csv's accounting of the served system prompt), so its answers are
 *             reencode's.
 * A run's positions after the first generation depend on what the policy answered (each answer's
 * tokens stay in the history); the run's arrays are sized for every generation at max_new.
 *
 * The policies are driven as in replay, by the same module (sim/driver/driver.h, closed loop): one
 * instance per layer over a LayerView whose arrays have room for the whole run and whose rows
 * fill in as tokens are fed (the closed-loop rules of policies/policy.h); prefill with the
 * statistics it asks for, each prefill span fed whole (one chunk: chunked prefill, where a
 * chunk's queries attend through the policy's cache, is replay only and `kvsim eval` refuses
 * [run] prefill_chunk > 0); then, for each token t fed as a decode step, in each layer: step(),
 * the attention of query t restricted to the instance's slots (exact K/V from the run's cache, or
 * the slot's alt_kv), observe() with that attention ([group][n] per KV head, softmax over the
 * slots) and memory(). What eval adds is where Q/K/V and that attention come from: the model's
 * forward pass. A new token's K/V always enter the run's cache at its position; the policy
 * decides whether a slot refers to it.
 *
 * Oracles that read the true attention (oracle_topk) get the full row of the current query over
 * every position fed. A policy that needs the future (want_decode_mass: oracle_future) or other
 * layers' rows of a trace (want_trace: trig with granularity = kvhead) cannot run in closed
 * loop: eval_decode reports it as not applicable. */
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

/* What the policies do on the model's sliding-window layers ([run] sliding_layers,
 * sim/driver/driver.h); skip unless set. */
void eval_set_sliding_layers(EvalPrefill *pf, SlidingLayers sliding);

/* The questions of a prompt: its generation points (PROMPT_GENERATE spans), then the final
 * generation after the last input token. */
int eval_questions(const PromptTokens *prompt);

/* Prefills the first span, prompt->tokens[0, n_prompt) (at least one, ids < vocab), with the
 * full cache, keeping every layer's Q, for runs of the rest of the prompt with up to max_new
 * (>= 1) tokens generated at each question; history says what a later prefill span starts from.
 * prompt is kept (not copied) until eval_prefill_free. last_segment: the segment the final
 * generation continues (PromptMarkup.last_segment). Runs of any length (a sliding-window
 * layer's attention is its window). */
EvalPrefill *eval_prefill(const Model *model, const PromptTokens *prompt, int last_segment,
                          int max_new, RunHistory history);
void eval_prefill_free(EvalPrefill *pf);

typedef struct {
    void *user;
    /* After layer `layer`'s attention of query t, before observe(): inst->cache is what the
     * query attended over, probs[g] that attention ([group][cache[g].n]) and attn_out the
     * attention outputs [Hq][D]. May be NULL. */
    void (*on_layer)(void *user, int layer, int t, const Policy *inst, const LayerView *L,
                     const float *const *probs, const float *attn_out);
    /* Token number `index` (0 first) of the answer to question `question` (eval_questions'
     * order) was chosen from `logits`; returns nonzero to stop that answer after it. May be
     * NULL. */
    int (*on_token)(void *user, int question, int index, int32_t token, const float *logits);
} EvalHooks;

/* One question's answer. */
typedef struct {
    int turn;            /* the segment its generation continues (the question's turn) */
    int position;        /* the run position of its first generated token */
    int n_generated;     /* its tokens in out_tokens (EOS excluded) */
    bool stopped_at_eos;
} EvalAnswer;

typedef struct {
    bool applicable;     /* false: the policy needs the future or a trace (nothing was
                          * generated) */
    int n_generated;     /* tokens generated, over every question (EOS excluded) */
    bool stopped_at_eos; /* the last question's answer stopped at an end of sequence */
    /* The layers' MemReport after the last decode step (after prefill when none), summed. */
    double device_bytes, host_bytes;
    int decode_steps;    /* tokens fed as decode steps through the policy's cache */
    int forced_steps;    /* of which forced (the prompt's, not generated) */
    int prefill_tokens;  /* tokens computed by later prefill spans (persist: the spans; reencode,
                          * prefix: the history after the first span, again at every turn) */
} EvalDecode;

/* The rest of the prompt under one policy (instances seeded as in replay:
 * policy_instance_seed(run_seed, spec->label, layer)), each question answered greedily with up to
 * max_new tokens. An answer stops at an EOS of the model or tokenizer (tok may be NULL; the EOS is
 * not fed, the run goes on with the next input token), at max_new, or when hooks->on_token asks;
 * its last token is fed when input follows. out_tokens has room for eval_questions() x max_new:
 * question q's answer at out_tokens + q * max_new. answers (may be NULL) receives
 * eval_questions() entries. Returns -1 with a message when the policy cannot be created for
 * this prompt. */
int eval_decode(EvalPrefill *pf, const PolicySpec *spec, uint64_t run_seed, int kv_bits,
                const Tokenizer *tok, const EvalHooks *hooks, int32_t *out_tokens,
                EvalAnswer *answers, EvalDecode *out, KvErr *err);

#endif
