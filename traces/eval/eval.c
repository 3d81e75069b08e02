/* Closed-loop decoding with live eviction: see eval.h for what it promises. */
#include "traces/eval/eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/attention.h"
#include "traces/model/checkpoint.h"

/* One KV head's slots for a token of a persisted later span. */
typedef struct {
    int cap;
    int32_t *pos;
    float **alt;
} SpanSlots;

struct EvalPrefill {
    const Model *model;
    const PromptTokens *prompt;
    RunHistory history;
    SlidingLayers sliding; /* the policies on sliding-window layers (default skip) */
    int last_segment;
    int n_prompt, max_new; /* P: the first span, prefilled once */
    int n_questions;
    int max_tokens;        /* T = input tokens + n_questions x max_new: any run fits */
    RunState *state;
    float *q;             /* [n_layers][Hq][T][D]: the run's post-RoPE queries */
    float *prompt_logits; /* [vocab]: after the first span */
    TraceMeta meta;       /* what LayerView.meta promises, for the run's T positions */
    LayerView *layers;    /* [n_layers]; k and v point into the run's cache */
    /* Scratch of one run. */
    float *full_attn;     /* [Hq][T]: the current query's true attention, for oracles */
    SpanSlots *span;      /* [n_kv_heads]: a persisted span's slots (span_slots) */
};

void eval_set_sliding_layers(EvalPrefill *pf, SlidingLayers sliding)
{
    pf->sliding = sliding;
}

int eval_questions(const PromptTokens *prompt)
{
    int n = 1;
    for (int s = 0; s < prompt->n_spans; s++)
        n += prompt->spans[s].kind == PROMPT_GENERATE;
    return n;
}

/* The prefill observer: keeps each layer's queries (the cache keeps K and V). */
static void keep_queries(void *user, int layer, int t0, int n, const float *q, const float *k,
                         const float *v)
{
    (void)k, (void)v;
    EvalPrefill *pf = user;
    const ModelConfig *c = &pf->model->config;
    size_t T = (size_t)pf->max_tokens, D = (size_t)c->head_dim;
    for (int h = 0; h < c->n_q_heads; h++)
        memcpy(pf->q + (((size_t)layer * c->n_q_heads + h) * T + (size_t)t0) * D,
               q + (size_t)h * n * D, (size_t)n * D * sizeof(float));
}

/* The metadata of positions [P, T) before a run: each input token at its prompt index, the rest
 * in the final generation's segment (a single prompt's run fills exactly these; in a
 * conversation, positions after the first answer are rewritten as they are fed). The same start
 * for every policy. */
static void reset_run_meta(EvalPrefill *pf)
{
    const PromptTokens *p = pf->prompt;
    TraceMeta *m = &pf->meta;
    for (int t = pf->n_prompt; t < pf->max_tokens; t++) {
        m->segments[t] = t < p->n_tokens ? p->segments[t] : pf->last_segment;
        m->tokens[t] = t < p->n_tokens ? p->tokens[t] : 0;
    }
}

EvalPrefill *eval_prefill(const Model *model, const PromptTokens *prompt, int last_segment,
                          int max_new, RunHistory history)
{
    const ModelConfig *c = &model->config;
    int P = prompt->n_prompt, Q = eval_questions(prompt);
    int T = prompt->n_tokens + Q * max_new;
    size_t D = (size_t)c->head_dim, Hq = (size_t)c->n_q_heads;
    EvalPrefill *pf = kv_calloc(1, sizeof *pf);
    pf->model = model;
    pf->prompt = prompt;
    pf->history = history;
    pf->last_segment = last_segment;
    pf->n_prompt = P;
    pf->max_new = max_new;
    pf->n_questions = Q;
    pf->max_tokens = T;
    pf->state = run_state_new(model, T, P < 128 ? P : 128);
    pf->q = kv_calloc((size_t)c->n_layers * Hq * T * D, sizeof(float));
    pf->full_attn = kv_calloc(Hq * T, sizeof(float));
    pf->span = kv_calloc((size_t)c->n_kv_heads, sizeof *pf->span);

    /* The needles of the first span only: later positions depend on the policy's answers (no
     * policy reads needles; they are the trace's, for metrics). */
    int n_needles = 0;
    while (n_needles < prompt->n_needles && prompt->needles[2 * n_needles + 1] <= P)
        n_needles++;
    int n_probes = 0;
    while (n_probes < prompt->n_probes && prompt->probes[n_probes] < P)
        n_probes++;
    TraceMeta *m = &pf->meta; /* the geometry the forward pass computes with */
    trace_meta_init(m, &pf->state->geometry, T, P, n_needles, n_probes, 0);
    memcpy(m->segments, prompt->segments, (size_t)P * sizeof *m->segments);
    memcpy(m->tokens, prompt->tokens, (size_t)P * sizeof *m->tokens);
    reset_run_meta(pf);
    if (n_needles)
        memcpy(m->needles, prompt->needles, (size_t)n_needles * 2 * sizeof *m->needles);
    if (n_probes)
        memcpy(m->probes, prompt->probes, (size_t)n_probes * sizeof *m->probes);

    pf->layers = kv_calloc((size_t)c->n_layers, sizeof *pf->layers);
    for (int l = 0; l < c->n_layers; l++)
        pf->layers[l] = layer_view_make(m, l, pf->q + (size_t)l * Hq * T * D,
                                        run_state_keys(pf->state, l, 0),
                                        run_state_values(pf->state, l, 0));

    ForwardObserver keep = {.user = pf, .on_qkv = keep_queries};
    const float *logits = forward_prompt(pf->state, prompt->tokens, P, &keep);
    pf->prompt_logits = kv_malloc((size_t)c->vocab_size * sizeof(float));
    memcpy(pf->prompt_logits, logits, (size_t)c->vocab_size * sizeof(float));
    return pf;
}

void eval_prefill_free(EvalPrefill *pf)
{
    if (!pf)
        return;
    run_state_free(pf->state);
    free(pf->q);
    free(pf->prompt_logits);
    trace_meta_free(&pf->meta);
    free(pf->layers);
    free(pf->full_attn);
    for (int g = 0; g < pf->model->config.n_kv_heads; g++) {
        free(pf->span[g].pos);
        free(pf->span[g].alt);
    }
    free(pf->span);
    free(pf);
}

/* ---- One policy's run ---- */

typedef struct {
    EvalPrefill *pf;
    PolicyDriver *drv;  /* [n_layers]: each layer's one instance of the policy */
    const EvalHooks *hooks;
    int t;              /* the position being fed */
    int span_start;     /* persist: the later prefill span being fed, from this position */
    EvalDecode *out;
} PolicyRun;

/* Query t's true attention over every position fed, [Hq][T] zero beyond t: what an oracle
 * reads in replay. */
static void true_attention(EvalPrefill *pf, const LayerView *L, int t)
{
    int T = L->n_tokens, D = L->head_dim;
    float row_max, row_z;
    for (int h = 0; h < L->n_q_heads; h++) {
        float *row = pf->full_attn + (size_t)h * T;
        attention_block(L->q + ((size_t)h * T + t) * D, 1, t,
                        L->k + (size_t)(h / L->group) * T * D, NULL, D, L->attn_scale, L->attn_softcap,
                        L->window, row, T, NULL, &row_max, &row_z);
        memset(row + t + 1, 0, (size_t)(T - t - 1) * sizeof(float));
    }
}

/* A decode step, in each layer once the new token's Q/K/V exist: keep Q, then the policy admits
 * the token and decides what it attends over. */
static void decode_qkv(void *user, int layer, int t0, int n, const float *q, const float *k,
                       const float *v)
{
    PolicyRun *run = user;
    keep_queries(run->pf, layer, t0, n, q, k, v);
    PolicyDriver *drv = &run->drv[layer];
    const float *full_attn = NULL;
    if (drv->inst[0]->is_oracle) {
        true_attention(run->pf, drv->L, t0);
        full_attn = run->pf->full_attn;
    }
    driver_step(drv, 0, t0, full_attn);
}

static SlotList decode_slots(void *user, int layer, int kv_head)
{
    PolicyRun *run = user;
    const KVCache *c = &run->drv[layer].inst[0]->cache[kv_head];
    return (SlotList){.n = c->n, .pos = c->pos, .alt_kv = c->alt_kv};
}

static void decode_attention(void *user, int layer, const float *const *probs)
{
    PolicyRun *run = user;
    PolicyDriver *drv = &run->drv[layer];
    if (run->hooks && run->hooks->on_layer)
        run->hooks->on_layer(run->hooks->user, layer, run->t, drv->inst[0], drv->L, probs,
                             run->pf->state->attn_out);
    driver_observe(drv, 0, probs);
}

/* A persisted later span's token t: its query attends over the policy's caches as the last turn
 * left them (the span has not been admitted yet) plus the span's tokens [span_start, t]. */
static SlotList span_slots(void *user, int layer, int kv_head)
{
    PolicyRun *run = user;
    EvalPrefill *pf = run->pf;
    const KVCache *c = &run->drv[layer].inst[0]->cache[kv_head];
    SpanSlots *sl = &pf->span[kv_head];
    int n = c->n + (run->t - run->span_start + 1);
    if (n > sl->cap) {
        sl->cap = n > 2 * sl->cap ? n : 2 * sl->cap;
        sl->pos = kv_realloc(sl->pos, (size_t)sl->cap * sizeof *sl->pos);
        sl->alt = kv_realloc(sl->alt, (size_t)sl->cap * sizeof *sl->alt);
    }
    memcpy(sl->pos, c->pos, (size_t)c->n * sizeof *sl->pos);
    memcpy(sl->alt, c->alt_kv, (size_t)c->n * sizeof *sl->alt);
    for (int i = c->n, j = run->span_start; j <= run->t; i++, j++) {
        sl->pos[i] = j;
        sl->alt[i] = NULL;
    }
    return (SlotList){.n = n, .pos = sl->pos, .alt_kv = sl->alt};
}

/* Feeds token `token` at position run->t as a decode step through the policy's caches. */
static const float *feed_step(PolicyRun *run, int32_t token, int segment, int want_logits)
{
    EvalPrefill *pf = run->pf;
    pf->meta.tokens[run->t] = token;
    pf->meta.segments[run->t] = segment;
    ForwardObserver observer = {.user = run, .on_qkv = decode_qkv};
    CacheSelector selector = {.user = run, .slots = decode_slots,
                              .on_attention = decode_attention};
    run->out->decode_steps++;
    return forward_token_selected(pf->state, token, want_logits, &observer, &selector);
}

/* A later prefill span: the prompt's input tokens [i0, i1) (at least one) at run positions
 * [a, a + i1 - i0). *logits: after its last token. */
static int feed_span(PolicyRun *run, int i0, int i1, int a, const float **logits, KvErr *err)
{
    EvalPrefill *pf = run->pf;
    const PromptTokens *p = pf->prompt;
    int n_layers = pf->model->config.n_layers, b = a + (i1 - i0);
    for (int i = i0; i < i1; i++) {
        pf->meta.tokens[a + i - i0] = p->tokens[i];
        pf->meta.segments[a + i - i0] = p->segments[i];
    }
    if (pf->history == HISTORY_PERSIST) {
        /* One token at a time, each query through the caches (eval.h). */
        ForwardObserver keep = {.user = pf, .on_qkv = keep_queries};
        CacheSelector selector = {.user = run, .slots = span_slots};
        run->span_start = a;
        for (run->t = a; run->t < b; run->t++)
            *logits = forward_token_selected(pf->state, p->tokens[i0 + run->t - a],
                                             run->t == b - 1, &keep, &selector);
        run->out->prefill_tokens += b - a;
        for (int l = 0; l < n_layers; l++)
            driver_prefill(&run->drv[l], a, b, a, b);
        return 0;
    }
    /* reencode, prefix: [0, P) is the shared full-cache prefill; [P, b) is encoded again over the
     * full cache, then the new instances take the whole history as one span. */
    ForwardObserver keep = {.user = pf, .on_qkv = keep_queries};
    pf->state->n_cached = pf->n_prompt;
    *logits = forward_prompt(pf->state, pf->meta.tokens + pf->n_prompt, b - pf->n_prompt, &keep);
    run->out->prefill_tokens += b - pf->n_prompt;
    for (int l = 0; l < n_layers; l++) {
        if (driver_restart(&run->drv[l], err) != 0)
            return -1;
        driver_prefill(&run->drv[l], 0, b, 0, b);
    }
    return 0;
}

/* Answers question `qi` greedily from `logits` (the last fed token's), its tokens fed from
 * position run->t on; `more_input`: the prompt goes on after it, so its last token is fed too.
 * Returns the tokens generated (EOS excluded). */
static int answer(PolicyRun *run, int qi, int segment, const float *logits, const Tokenizer *tok,
                  bool more_input, int32_t *out_tokens, EvalAnswer *ans)
{
    EvalPrefill *pf = run->pf;
    const ModelConfig *c = &pf->model->config;
    const EvalHooks *hooks = run->hooks;
    int32_t *toks = out_tokens + (size_t)qi * pf->max_new;
    EvalAnswer a = {.turn = segment, .position = run->t};
    while (a.n_generated < pf->max_new) {
        int next = argmax_token(logits, c->vocab_size);
        if (is_end_of_sequence(c, tok, next)) {
            a.stopped_at_eos = true;
            break;
        }
        toks[a.n_generated++] = next;
        int stop = hooks && hooks->on_token &&
                   hooks->on_token(hooks->user, qi, a.n_generated - 1, next, logits);
        bool last = stop || a.n_generated == pf->max_new;
        if (last && !more_input)
            break;
        logits = feed_step(run, next, segment, 1);
        run->t++;
        if (last)
            break;
    }
    run->out->n_generated += a.n_generated;
    run->out->stopped_at_eos = a.stopped_at_eos;
    if (ans)
        ans[qi] = a;
    return a.n_generated;
}

/* Creates each layer's instance of the policy, then prefills them with the first span. Returns
 * 1 when the policy needs the future, -1 on error, 0 when ready; on a nonzero return nothing is
 * left to free. */
static int prefill_instances(EvalPrefill *pf, const PolicySpec *spec, uint64_t run_seed,
                             int kv_bits, PolicyDriver *drv, KvErr *err)
{
    int n_layers = pf->model->config.n_layers;
    for (int l = 0; l < n_layers; l++) {
        int ready = driver_create(&drv[l], &pf->layers[l], spec, 1, run_seed, kv_bits,
                                  pf->sliding, true, err);
        if (ready != 0) {
            while (l-- > 0)
                driver_free(&drv[l]);
            return ready;
        }
    }
    /* The first span, fed whole: its queries attended over the full cache in one forward pass
     * (eval.h: chunked prefill is replay only). */
    for (int l = 0; l < n_layers; l++)
        driver_prefill(&drv[l], 0, pf->n_prompt, 0, pf->n_prompt);
    return 0;
}

int eval_decode(EvalPrefill *pf, const PolicySpec *spec, uint64_t run_seed, int kv_bits,
                const Tokenizer *tok, const EvalHooks *hooks, int32_t *out_tokens,
                EvalAnswer *answers, EvalDecode *out, KvErr *err)
{
    const PromptTokens *p = pf->prompt;
    int n_layers = pf->model->config.n_layers;
    memset(out, 0, sizeof *out);
    PolicyDriver *drv = kv_calloc((size_t)n_layers, sizeof *drv);
    reset_run_meta(pf);
    int ready = prefill_instances(pf, spec, run_seed, kv_bits, drv, err);
    if (ready != 0) {
        free(drv);
        return ready < 0 ? -1 : 0;
    }
    out->applicable = true;

    PolicyRun run = {.pf = pf, .drv = drv, .hooks = hooks, .t = pf->n_prompt, .out = out};
    pf->state->n_cached = pf->n_prompt; /* rewind: every policy starts from the first span */
    const float *logits = pf->prompt_logits;
    int qi = 0, rc = 0;
    /* The spans after the first: input token i is at run position i + shift, shift being the
     * tokens answered so far. */
    for (int s = 1; s < p->n_spans && rc == 0; s++) {
        const PromptSpan *sp = &p->spans[s];
        int shift = run.t - sp->start;
        if (sp->kind == PROMPT_GENERATE) {
            int seg = p->segments[sp->start - 1];
            answer(&run, qi++, seg, logits, tok, true, out_tokens, answers);
        } else if (sp->kind == PROMPT_FORCED) {
            /* Decode steps through the policy's cache like generated ones, but the token fed is
             * the text's, not the model's choice. */
            for (int i = sp->start; i < sp->end; i++, run.t++) {
                logits = feed_step(&run, p->tokens[i], p->segments[i], i == sp->end - 1);
                out->forced_steps++;
            }
        } else {
            rc = feed_span(&run, sp->start, sp->end, sp->start + shift, &logits, err);
            run.t = sp->end + shift;
        }
    }
    if (rc == 0)
        answer(&run, qi, pf->last_segment, logits, tok, false, out_tokens, answers);
    for (int l = 0; l < n_layers; l++) {
        out->device_bytes += drv[l].mem[0].device_bytes;
        out->host_bytes += drv[l].mem[0].host_bytes;
        driver_free(&drv[l]);
    }
    free(drv);
    return rc;
}
