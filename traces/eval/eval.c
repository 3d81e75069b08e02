/* Closed-loop decoding with live eviction: see eval.h for what it promises. */
#include "traces/eval/eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/attention.h"
#include "traces/model/checkpoint.h"

struct EvalPrefill {
    const Model *model;
    int n_prompt, n_input, max_tokens; /* P (prefilled), N = P + forced, T = N + max_new */
    RunState *state;
    float *q;             /* [n_layers][Hq][T][D]: the run's post-RoPE queries */
    float *prompt_logits; /* [vocab] */
    TraceMeta meta;       /* what LayerView.meta promises, for the run's T tokens */
    LayerView *layers;    /* [n_layers]; k and v point into the run's cache */
    /* Scratch of one decode. */
    float *full_attn;     /* [Hq][T]: the current query's true attention, for oracles */
};

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

EvalPrefill *eval_prefill(const Model *model, const PromptTokens *prompt, int last_segment,
                          int max_new, const char *origin, KvErr *err)
{
    const ModelConfig *c = &model->config;
    int P = prompt->n_prompt, N = prompt->n_tokens, T = N + max_new;
    if (c->sliding_window && T > c->sliding_window) {
        kv_fail(err, "%s: %d tokens with the answer: longer than the model's sliding_window %d "
                "(not supported)", origin, T, c->sliding_window);
        return NULL;
    }
    size_t D = (size_t)c->head_dim, Hq = (size_t)c->n_q_heads;
    EvalPrefill *pf = kv_calloc(1, sizeof *pf);
    pf->model = model;
    pf->n_prompt = P;
    pf->n_input = N;
    pf->max_tokens = T;
    pf->state = run_state_new(model, T, P < 128 ? P : 128);
    pf->q = kv_calloc((size_t)c->n_layers * Hq * T * D, sizeof(float));
    pf->full_attn = kv_calloc(Hq * T, sizeof(float));

    TraceMeta *m = &pf->meta; /* the geometry the forward pass computes with */
    trace_meta_init(m, &pf->state->geometry, T, P, prompt->n_needles, prompt->n_probes, 0);
    for (int t = 0; t < T; t++) {
        m->segments[t] = t < N ? prompt->segments[t] : last_segment;
        m->tokens[t] = t < N ? prompt->tokens[t] : 0; /* generated ones as they come */
    }
    if (m->n_needles)
        memcpy(m->needles, prompt->needles, (size_t)m->n_needles * 2 * sizeof *m->needles);
    if (m->n_probes)
        memcpy(m->probes, prompt->probes, (size_t)m->n_probes * sizeof *m->probes);

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
    free(pf);
}

/* ---- One policy's decode ---- */

typedef struct {
    EvalPrefill *pf;
    PolicyDriver *drv;  /* [n_layers]: each layer's one instance of the policy */
    const EvalHooks *hooks;
    int t;              /* the token being fed */
} DecodeRun;

/* Query t's true attention over every position fed, [Hq][T] zero beyond t: what an oracle
 * reads in replay. */
static void true_attention(EvalPrefill *pf, const LayerView *L, int t)
{
    int T = L->n_tokens, D = L->head_dim;
    float row_max, row_z;
    for (int h = 0; h < L->n_q_heads; h++) {
        float *row = pf->full_attn + (size_t)h * T;
        attention_block(L->q + ((size_t)h * T + t) * D, 1, t,
                        L->k + (size_t)(h / L->group) * T * D, NULL, D, L->attn_scale, L->window,
                        row, T, NULL, &row_max, &row_z);
        memset(row + t + 1, 0, (size_t)(T - t - 1) * sizeof(float));
    }
}

/* In each layer, once the new token's Q/K/V exist: keep Q, then the policy admits the token and
 * decides what it attends over. */
static void decode_qkv(void *user, int layer, int t0, int n, const float *q, const float *k,
                       const float *v)
{
    DecodeRun *run = user;
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
    DecodeRun *run = user;
    const KVCache *c = &run->drv[layer].inst[0]->cache[kv_head];
    return (SlotList){.n = c->n, .pos = c->pos, .alt_kv = c->alt_kv};
}

static void decode_attention(void *user, int layer, const float *const *probs)
{
    DecodeRun *run = user;
    PolicyDriver *drv = &run->drv[layer];
    if (run->hooks && run->hooks->on_layer)
        run->hooks->on_layer(run->hooks->user, layer, run->t, drv->inst[0], drv->L, probs,
                             run->pf->state->attn_out);
    driver_observe(drv, 0, probs);
}

/* Creates each layer's instance of the policy, then prefills them. Returns 1 when the policy
 * needs the future, -1 on error, 0 when ready; on a nonzero return nothing is left to free. */
static int prefill_instances(EvalPrefill *pf, const PolicySpec *spec, uint64_t run_seed,
                             int kv_bits, PolicyDriver *drv, KvErr *err)
{
    int n_layers = pf->model->config.n_layers;
    for (int l = 0; l < n_layers; l++) {
        int ready = driver_create(&drv[l], &pf->layers[l], spec, 1, run_seed, kv_bits, true, err);
        if (ready != 0) {
            while (l-- > 0)
                driver_free(&drv[l]);
            return ready;
        }
    }
    /* The prompt is the run's one prefill span, fed whole: its queries attended over the full
     * cache in one forward pass (eval.h: chunked prefill is replay only). */
    for (int l = 0; l < n_layers; l++)
        driver_prefill(&drv[l], 0, pf->n_prompt, 0, pf->n_prompt);
    return 0;
}

int eval_decode(EvalPrefill *pf, const PolicySpec *spec, uint64_t run_seed, int kv_bits,
                const Tokenizer *tok, const EvalHooks *hooks, int32_t *out_tokens,
                EvalDecode *out, KvErr *err)
{
    const ModelConfig *c = &pf->model->config;
    int n_layers = c->n_layers, P = pf->n_prompt, N = pf->n_input;
    int max_new = pf->max_tokens - N;
    memset(out, 0, sizeof *out);
    PolicyDriver *drv = kv_calloc((size_t)n_layers, sizeof *drv);
    int ready = prefill_instances(pf, spec, run_seed, kv_bits, drv, err);
    if (ready != 0) {
        free(drv);
        return ready < 0 ? -1 : 0;
    }
    out->applicable = true;

    DecodeRun run = {.pf = pf, .drv = drv, .hooks = hooks};
    ForwardObserver observer = {.user = &run, .on_qkv = decode_qkv};
    CacheSelector selector = {.user = &run, .slots = decode_slots,
                              .on_attention = decode_attention};
    pf->state->n_cached = P; /* rewind: every policy starts from the prefilled prompt */
    const float *logits = pf->prompt_logits;
    /* The forced tokens: decode steps through the policy's cache like generated ones, but the
     * token fed is the text's, not the model's choice. */
    for (int t = P; t < N; t++) {
        run.t = t;
        logits = forward_token_selected(pf->state, pf->meta.tokens[t], t == N - 1, &observer,
                                        &selector);
        out->forced_steps++;
        out->decode_steps++;
    }
    while (out->n_generated < max_new) {
        int next = argmax_token(logits, c->vocab_size);
        if (is_end_of_sequence(c, tok, next)) {
            out->stopped_at_eos = true;
            break;
        }
        out_tokens[out->n_generated++] = next;
        int stop = hooks && hooks->on_token &&
                   hooks->on_token(hooks->user, out->n_generated - 1, next, logits);
        if (stop || out->n_generated == max_new)
            break;
        run.t = N + out->n_generated - 1;
        pf->meta.tokens[run.t] = next;
        logits = forward_token_selected(pf->state, next, 1, &observer, &selector);
        out->decode_steps++;
    }
    for (int l = 0; l < n_layers; l++) {
        out->device_bytes += drv[l].mem[0].device_bytes;
        out->host_bytes += drv[l].mem[0].host_bytes;
        driver_free(&drv[l]);
    }
    free(drv);
    return 0;
}
