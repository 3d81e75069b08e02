/* Closed-loop decoding with live eviction (traces/eval/eval.h) on a tiny random checkpoint: with a
 * cache that holds everything it is the plain forward pass (same logits, same tokens), forced
 * tokens after a [[decode]] split included; with a small window each layer's attention is
 * exactly the softmax over the window's positions, at forced steps too, so that eviction reaches
 * the first generated token; alt slots are attended with their own K/V; an oracle of the future
 * is not applicable. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"
#include "traces/eval/eval.h"
#include "traces/model/forward.h"
#include "traces/model/model.h"

enum { N_PROMPT = 14, MAX_NEW = 8, VOCAB = 300 };
/* Where a [[decode]] marker splits the prompt in the tests of forced tokens. */
enum { N_PREFILLED = 9 };

typedef struct {
    char *dir;
    TinyCheckpoint *ck;
    Model *model;
    PromptTokens prompt;
} Env;

/* The prompt's spans: prefill [0, n_prompt), then forced tokens up to n_tokens. */
static void set_split(PromptTokens *p, int n_prompt)
{
    static PromptSpan spans[2];
    p->n_prompt = n_prompt;
    spans[0] = (PromptSpan){PROMPT_PREFILL, 0, n_prompt};
    spans[1] = (PromptSpan){PROMPT_FORCED, n_prompt, p->n_tokens};
    p->spans = spans;
    p->n_spans = n_prompt < p->n_tokens ? 2 : 1;
}

static int setup(void **state)
{
    Env *env = kv_calloc(1, sizeof *env);
    env->dir = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.seed = 7;
    env->ck = tiny_ckpt_write(env->dir, &spec);
    KvErr err;
    env->model = model_load(env->dir, &err);
    assert_non_null(env->model);
    env->prompt.n_tokens = N_PROMPT;
    set_split(&env->prompt, N_PROMPT);
    env->prompt.tokens = kv_malloc(N_PROMPT * sizeof(int32_t));
    env->prompt.segments = kv_calloc(N_PROMPT, sizeof(int32_t));
    for (int t = 0; t < N_PROMPT; t++)
        env->prompt.tokens[t] = (int32_t)((t * 37 + 11) % 256);
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    Env *env = *state;
    model_free(env->model);
    free(env->prompt.tokens);
    free(env->prompt.segments);
    tiny_ckpt_free(env->ck);
    scratch_remove(env->dir);
    free(env);
    return 0;
}

/* A policy of `type` with "key=value ..." parameters. */
static PolicySpec make_spec(const char *label, const char *type, const char *params)
{
    PolicySpec spec;
    memset(&spec, 0, sizeof spec);
    snprintf(spec.label, sizeof spec.label, "%s", label);
    spec.type = policy_find(type);
    assert_non_null(spec.type);
    spec.params = kv_calloc(1, spec.type->params_size);
    policy_params_defaults(spec.type, spec.params);
    char buf[256];
    snprintf(buf, sizeof buf, "%s", params);
    for (char *kv = strtok(buf, " "); kv; kv = strtok(NULL, " ")) {
        char *eq = strchr(kv, '=');
        assert_non_null(eq);
        *eq = '\0';
        KvErr err;
        assert_int_equal(policy_param_set(spec.type, spec.params, kv, eq + 1, &err), 0);
    }
    return spec;
}

/* ---- The plain forward pass, greedy: the reference for caches that hold everything ---- */

typedef struct {
    int n;
    int32_t tokens[MAX_NEW];
    float logits[MAX_NEW][VOCAB]; /* the logits each token was chosen from */
} Generation;

static void plain_generate(const Env *env, Generation *g)
{
    RunState *s = run_state_new(env->model, N_PROMPT + MAX_NEW, 8);
    const float *logits = forward_prompt(s, env->prompt.tokens, N_PROMPT, NULL);
    g->n = 0;
    while (g->n < MAX_NEW) {
        int next = argmax_token(logits, VOCAB);
        memcpy(g->logits[g->n], logits, sizeof g->logits[0]);
        g->tokens[g->n++] = next;
        if (g->n == MAX_NEW)
            break;
        logits = forward_tokens(s, &g->tokens[g->n - 1], 1, 1, NULL);
    }
    run_state_free(s);
}

static int record_token(void *user, int question, int index, int32_t token, const float *logits)
{
    Generation *g = user;
    assert_int_equal(question, 0);
    assert_int_equal(index, g->n);
    g->tokens[g->n] = token;
    memcpy(g->logits[g->n++], logits, sizeof g->logits[0]);
    return 0;
}

static double rel_diff(const float *a, const float *b, int n)
{
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* [run] sliding_layers for check_same_as_plain's runs. */
static SlidingLayers same_as_plain_sliding = SLIDING_SKIP;

static void check_same_as_plain(Env *env, const char *type, const char *params)
{
    Generation plain, live = {0};
    plain_generate(env, &plain);
    EvalPrefill *pf = eval_prefill(env->model, &env->prompt, 0, MAX_NEW, HISTORY_PERSIST);
    eval_set_sliding_layers(pf, same_as_plain_sliding);
    PolicySpec spec = make_spec("p", type, params);
    EvalHooks hooks = {.user = &live, .on_token = record_token};
    int32_t out[MAX_NEW];
    EvalDecode d;
    KvErr err;
    assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, &d, &err), 0);
    assert_true(d.applicable);
    int n_forced = env->prompt.n_tokens - env->prompt.n_prompt;
    assert_int_equal(d.n_generated, MAX_NEW);
    assert_int_equal(d.forced_steps, n_forced);
    assert_int_equal(d.decode_steps, n_forced + MAX_NEW - 1);
    assert_int_equal(live.n, plain.n);
    for (int i = 0; i < plain.n; i++) {
        assert_int_equal(out[i], plain.tokens[i]);
        assert_int_equal(live.tokens[i], plain.tokens[i]);
        assert_true(rel_diff(live.logits[i], plain.logits[i], VOCAB) <= 1e-5);
    }
    /* A second decode from the same prefill starts from the same state. */
    Generation again = {0};
    hooks.user = &again;
    assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, &d, &err), 0);
    for (int i = 0; i < plain.n; i++)
        assert_int_equal(again.tokens[i], plain.tokens[i]);
    free(spec.params);
    eval_prefill_free(pf);
}

static void test_full_is_the_plain_forward(void **state)
{
    check_same_as_plain(*state, "full", "");
}

static void test_window_holding_everything_is_the_plain_forward(void **state)
{
    check_same_as_plain(*state, "window", "window=64 sinks=0");
}

/* A model whose every layer slides over 6 keys (Mistral), then a Gemma 2 (layers 0 and 2 slide;
 * soft-capped logits), run for 22 tokens: with sliding_layers = skip each sliding layer keeps its
 * rotating buffer of 6 (whatever the policy), and with compress a policy that keeps everything is
 * attended only inside the window: all are the plain forward pass. On Gemma 2 the global layers
 * need a policy that keeps everything too (window 64). */
static void test_sliding_window_model_runs_past_its_window(void **state)
{
    Env *env = *state;
    Model *global = env->model;
    for (int m = 0; m < 2; m++) {
        char *dir = scratch_create();
        TinyCheckpointSpec spec = tiny_ckpt_default_spec();
        spec.architecture = m ? "Gemma2ForCausalLM" : "MistralForCausalLM";
        spec.sliding_window = 6;
        spec.seed = 9;
        if (m) {
            spec.n_layers = 4;
            spec.query_pre_attn_scalar = 24;
            spec.attn_softcap = 5.0;
            spec.final_softcap = 3.0;
        }
        TinyCheckpoint *ck = tiny_ckpt_write(dir, &spec);
        KvErr err;
        env->model = model_load(dir, &err);
        assert_non_null(env->model);
        check_same_as_plain(env, m ? "window" : "random", m ? "window=64 sinks=0" : "budget=2");
        same_as_plain_sliding = SLIDING_COMPRESS;
        check_same_as_plain(env, "full", "");
        same_as_plain_sliding = SLIDING_SKIP;
        model_free(env->model);
        tiny_ckpt_free(ck);
        scratch_remove(dir);
    }
    env->model = global;
}

/* With a [[decode]] split, forced steps through a cache that keeps everything are the plain
 * forward pass over the whole text (which prefills every token). */
static void test_forced_tokens_with_full_are_the_plain_forward(void **state)
{
    Env *env = *state;
    set_split(&env->prompt, N_PREFILLED);
    check_same_as_plain(env, "full", "");
    check_same_as_plain(env, "window", "window=64 sinks=0");
}

/* ---- Restricted attention against a scalar computation ---- */

typedef struct {
    int window, sinks; /* > 0: the slots must be exactly these positions */
    int layers_checked, alt_layers, restricted_differs;
    double worst;      /* largest error of the attention outputs */
} AttnCheck;

/* Scalar attention of query head h (query t) over a list of keys and values. */
static void scalar_attention(const LayerView *L, int h, int t, int n, const float *const *keys,
                             const float *const *values, double *p, double *out)
{
    int D = L->head_dim;
    const float *q = L->q + ((size_t)h * L->n_tokens + t) * D;
    double max = -INFINITY, z = 0;
    for (int j = 0; j < n; j++) {
        double dot = 0;
        for (int d = 0; d < D; d++)
            dot += (double)q[d] * keys[j][d];
        p[j] = dot * L->attn_scale; /* the layer's geometry */
        if (p[j] > max)
            max = p[j];
    }
    for (int j = 0; j < n; j++)
        z += p[j] = exp(p[j] - max);
    for (int d = 0; d < D; d++)
        out[d] = 0;
    for (int j = 0; j < n; j++) {
        p[j] /= z;
        for (int d = 0; d < D; d++)
            out[d] += p[j] * values[j][d];
    }
}

static void check_layer(void *user, int layer, int t, const Policy *inst, const LayerView *L,
                        const float *const *probs, const float *attn_out)
{
    (void)layer;
    AttnCheck *chk = user;
    int T = L->n_tokens, D = L->head_dim, G = L->group;
    for (int g = 0; g < L->n_kv_heads; g++) {
        const KVCache *c = &inst->cache[g];
        const float *keys[256], *values[256];
        int n = c->n;
        assert_true(n > 0 && n <= 256);
        if (chk->window > 0) {
            /* What the window must hold, derived from its definition, not from the cache. */
            int expect = 0;
            for (int j = 0; j <= t; j++)
                if (j < chk->sinks || j > t - chk->window) {
                    assert_true(kvcache_has(c, j));
                    expect++;
                }
            assert_int_equal(n, expect);
        }
        if (c->n_alt > 0)
            chk->alt_layers++;
        for (int i = 0; i < n; i++) {
            const float *alt = c->alt_kv[i];
            assert_true(alt || (c->pos[i] >= 0 && c->pos[i] <= t));
            keys[i] = alt ? alt : L->k + ((size_t)g * T + c->pos[i]) * D;
            values[i] = alt ? alt + D : L->v + ((size_t)g * T + c->pos[i]) * D;
        }
        for (int i = 0; i < G; i++) {
            int h = g * G + i;
            double p[256], out[64], norm = 0, err = 0;
            scalar_attention(L, h, t, n, keys, values, p, out);
            for (int j = 0; j < n; j++)
                assert_true(fabs(probs[g][i * n + j] - p[j]) <= 1e-5);
            for (int d = 0; d < D; d++) {
                norm += out[d] * out[d];
                err += (attn_out[h * D + d] - out[d]) * (attn_out[h * D + d] - out[d]);
            }
            double rel = sqrt(err / norm);
            if (rel > chk->worst)
                chk->worst = rel;
            /* The unrestricted attention over every position would be something else. */
            const float *all_k[256], *all_v[256];
            for (int j = 0; j <= t; j++) {
                all_k[j] = L->k + ((size_t)g * T + j) * D;
                all_v[j] = L->v + ((size_t)g * T + j) * D;
            }
            double p_all[256], out_all[64], diff = 0;
            scalar_attention(L, h, t, t + 1, all_k, all_v, p_all, out_all);
            for (int d = 0; d < D; d++)
                diff += (out_all[d] - out[d]) * (out_all[d] - out[d]);
            if (sqrt(diff / norm) > 1e-3)
                chk->restricted_differs++;
        }
    }
    chk->layers_checked++;
}

/* Both hooks at once: the attention check and the generated tokens' logits. */
typedef struct {
    AttnCheck *chk;
    Generation *gen;
} CheckAndRecord;

static void checked_layer(void *user, int layer, int t, const Policy *inst, const LayerView *L,
                          const float *const *probs, const float *attn_out)
{
    check_layer(((CheckAndRecord *)user)->chk, layer, t, inst, L, probs, attn_out);
}

static int recorded_token(void *user, int question, int index, int32_t token,
                          const float *logits)
{
    return record_token(((CheckAndRecord *)user)->gen, question, index, token, logits);
}

static void run_checked(Env *env, const char *type, const char *params, AttnCheck *chk,
                        EvalDecode *d)
{
    EvalPrefill *pf = eval_prefill(env->model, &env->prompt, 0, MAX_NEW, HISTORY_PERSIST);
    PolicySpec spec = make_spec("p", type, params);
    EvalHooks hooks = {.user = chk, .on_layer = check_layer};
    int32_t out[MAX_NEW];
    KvErr err;
    assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, d, &err), 0);
    free(spec.params);
    eval_prefill_free(pf);
}

static void test_small_window_attends_exactly_its_positions(void **state)
{
    AttnCheck chk = {.window = 3, .sinks = 1};
    EvalDecode d;
    run_checked(*state, "window", "window=3 sinks=1", &chk, &d);
    assert_true(d.applicable);
    /* every decode step, every layer */
    assert_int_equal(chk.layers_checked, d.decode_steps * 2);
    assert_true(d.decode_steps == MAX_NEW - 1);
    assert_true(chk.worst <= 1e-5);
    assert_true(chk.restricted_differs > 0);
    /* 4 slots per KV head, 2 KV heads, 2 layers, 16-bit K and V of head_dim 16 */
    assert_true(fabs(d.device_bytes - 2 * 2 * 4 * 2 * 16 * 2.0) < 1e-9);
}

/* With a [[decode]] split the forced tokens attend over the window only, so the logits the first
 * generated token is chosen from are the window's own; without the split they are the prefill's,
 * the same for every policy. */
static void test_forced_tokens_attend_over_the_window(void **state)
{
    Env *env = *state;
    Generation first[2][2] = {{{0}}}; /* [split?][full, window] */
    for (int split = 0; split < 2; split++) {
        set_split(&env->prompt, split ? N_PREFILLED : N_PROMPT);
        EvalPrefill *pf = eval_prefill(env->model, &env->prompt, 0, MAX_NEW, HISTORY_PERSIST);
        for (int k = 0; k < 2; k++) {
            PolicySpec spec = k ? make_spec("w", "window", "window=3 sinks=1")
                                : make_spec("f", "full", "");
            AttnCheck chk = {.window = k ? 3 : 0, .sinks = k ? 1 : 0};
            CheckAndRecord both = {&chk, &first[split][k]};
            EvalHooks hooks = {.user = &both, .on_layer = checked_layer,
                               .on_token = recorded_token};
            int32_t out[MAX_NEW];
            EvalDecode d;
            KvErr err;
            assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, &d, &err), 0);
            assert_int_equal(d.forced_steps, split ? N_PROMPT - N_PREFILLED : 0);
            /* Every forced and generated step, every layer, was checked. */
            assert_int_equal(chk.layers_checked, d.decode_steps * 2);
            assert_true(chk.worst <= 1e-5);
            if (k == 1)
                assert_true(chk.restricted_differs > 0);
            free(spec.params);
        }
        eval_prefill_free(pf);
    }
    /* Without the split the first token's logits are the prefill's for both. */
    assert_true(rel_diff(first[0][1].logits[0], first[0][0].logits[0], VOCAB) == 0);
    assert_int_equal(first[0][1].tokens[0], first[0][0].tokens[0]);
    /* With it the window's differ from full's, here enough to change the first token. */
    assert_true(rel_diff(first[1][1].logits[0], first[1][0].logits[0], VOCAB) > 1e-2);
    assert_int_not_equal(first[1][1].tokens[0], first[1][0].tokens[0]);
}

static void test_alt_slots_are_attended_with_their_own_kv(void **state)
{
    AttnCheck chk = {0};
    EvalDecode d;
    run_checked(*state, "hybrid", "budget=5 ratio=0.4 include_skipped=mean", &chk, &d);
    assert_true(d.applicable);
    assert_int_equal(chk.layers_checked, d.decode_steps * 2);
    assert_true(chk.alt_layers > 0);
    assert_true(chk.worst <= 1e-5);
}

/* oracle_topk sees the true attention of the current query: its cache is the top `budget`. */
static void check_topk(void *user, int layer, int t, const Policy *inst, const LayerView *L,
                       const float *const *probs, const float *attn_out)
{
    (void)layer, (void)probs, (void)attn_out;
    int *checked = user;
    int T = L->n_tokens, D = L->head_dim, G = L->group;
    for (int g = 0; g < L->n_kv_heads; g++) {
        double score[64] = {0};
        for (int i = 0; i < G; i++) {
            int h = g * G + i;
            const float *kk[64], *vv[64];
            for (int j = 0; j <= t; j++)
                kk[j] = vv[j] = L->k + ((size_t)g * T + j) * D;
            double p[64], out[64];
            scalar_attention(L, h, t, t + 1, kk, vv, p, out);
            for (int j = 0; j <= t; j++)
                score[j] += p[j];
        }
        const KVCache *c = &inst->cache[g];
        assert_int_equal(c->n, 4);
        double least_kept = INFINITY, most_dropped = 0;
        for (int j = 0; j <= t; j++) {
            if (kvcache_has(c, j) && score[j] < least_kept)
                least_kept = score[j];
            if (!kvcache_has(c, j) && score[j] > most_dropped)
                most_dropped = score[j];
        }
        assert_true(least_kept >= most_dropped - 1e-5);
    }
    (*checked)++;
}

static void test_oracle_topk_reads_the_live_attention(void **state)
{
    Env *env = *state;
    EvalPrefill *pf = eval_prefill(env->model, &env->prompt, 0, MAX_NEW, HISTORY_PERSIST);
    PolicySpec spec = make_spec("o", "oracle_topk", "budget=4");
    int checked = 0;
    EvalHooks hooks = {.user = &checked, .on_layer = check_topk};
    int32_t out[MAX_NEW];
    EvalDecode d;
    KvErr err;
    assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, &d, &err), 0);
    assert_int_equal(checked, d.decode_steps * 2);
    assert_true(checked > 0);
    free(spec.params);
    eval_prefill_free(pf);
}

/* Decodes the prompt with policy `type` (params as make_spec takes them): whether it applies in
 * closed loop, and then that it generated something, or nothing. */
static void expect_applicable(Env *env, const char *type, const char *params, bool applicable)
{
    EvalPrefill *pf = eval_prefill(env->model, &env->prompt, 0, MAX_NEW, HISTORY_PERSIST);
    PolicySpec spec = make_spec("p", type, params);
    int32_t out[MAX_NEW];
    EvalDecode d;
    KvErr err;
    assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, NULL, out, NULL, &d, &err), 0);
    assert_int_equal(d.applicable, applicable);
    assert_int_equal(d.n_generated > 0, applicable);
    free(spec.params);
    eval_prefill_free(pf);
}

static void test_oracle_future_is_not_applicable(void **state)
{
    expect_applicable(*state, "oracle_future", "budget=4", false);
}

/* trig with granularity = kvhead scores every layer's keys at each prune, which only a replay
 * has: not applicable in closed loop, where the plain per-head trig runs. */
static void test_trig_kvhead_is_not_applicable(void **state)
{
    Env *env = *state;
    assert_true(env->model->config.n_layers > 1);
    expect_applicable(env, "trig",
                      "budget=6 divide_length=2 protect_initial=1 protect_recent=2 "
                      "granularity=kvhead", false);
    expect_applicable(env, "trig",
                      "budget=6 divide_length=2 protect_initial=1 protect_recent=2 "
                      "granularity=head", true);
}

/* on_token stops generation; the stop is the caller's. */
static int stop_after_three(void *user, int question, int index, int32_t token,
                            const float *logits)
{
    (void)user, (void)question, (void)token, (void)logits;
    return index == 2;
}

static void test_generation_stops_when_asked(void **state)
{
    Env *env = *state;
    EvalPrefill *pf = eval_prefill(env->model, &env->prompt, 0, MAX_NEW, HISTORY_PERSIST);
    PolicySpec spec = make_spec("f", "full", "");
    EvalHooks hooks = {.on_token = stop_after_three};
    int32_t out[MAX_NEW];
    EvalDecode d;
    KvErr err;
    assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, &d, &err), 0);
    assert_int_equal(d.n_generated, 3);
    assert_int_equal(d.decode_steps, 2);
    free(spec.params);
    eval_prefill_free(pf);
}

/* ---- Conversations ---- */

enum { TURN1 = 6, ANSWER1 = 2 }; /* the first turn's tokens, and its answer's */

/* Stops the first answer after ANSWER1 tokens and records the second's tokens and logits. */
static int conversation_token(void *user, int question, int index, int32_t token,
                              const float *logits)
{
    if (question == 0)
        return index == ANSWER1 - 1;
    return record_token(user, 0, index, token, logits);
}

/* The prompt as a conversation of two turns: [0, TURN1) prefilled, a question, then
 * [TURN1, N_PROMPT) prefilled on top, then the final question. */
static PromptSpan conversation_spans[3] = {{PROMPT_PREFILL, 0, TURN1},
                                           {PROMPT_GENERATE, TURN1, TURN1},
                                           {PROMPT_PREFILL, TURN1, N_PROMPT}};

static void set_conversation(PromptTokens *p)
{
    p->spans = conversation_spans;
    p->n_spans = 3;
    p->n_prompt = TURN1;
    for (int t = 0; t < N_PROMPT; t++)
        p->segments[t] = t < TURN1 ? 1 : 2;
}

/* A conversation with a cache that holds everything is the plain forward pass over the whole
 * dialogue (first turn, the model's own first answer, the second turn), whether the cache
 * persists or the history is re-encoded; the bookkeeping of positions and prefill tokens
 * follows the spans. */
static void test_conversation_with_full_is_the_plain_forward(void **state)
{
    Env *env = *state;
    PromptTokens *p = &env->prompt;
    set_conversation(p);
    assert_int_equal(eval_questions(p), 2);

    /* The plain run: turn 1, its greedy answer, turn 2, then the greedy second answer. */
    int n = N_PROMPT + ANSWER1;
    int32_t dialogue[N_PROMPT + ANSWER1];
    RunState *s = run_state_new(env->model, n + MAX_NEW, 8);
    const float *logits = forward_prompt(s, p->tokens, TURN1, NULL);
    memcpy(dialogue, p->tokens, TURN1 * sizeof *dialogue);
    for (int i = 0; i < ANSWER1; i++) {
        dialogue[TURN1 + i] = argmax_token(logits, VOCAB);
        logits = forward_tokens(s, &dialogue[TURN1 + i], 1, 1, NULL);
    }
    memcpy(dialogue + TURN1 + ANSWER1, p->tokens + TURN1, (N_PROMPT - TURN1) * sizeof *dialogue);
    logits = forward_prompt(s, dialogue + TURN1 + ANSWER1, N_PROMPT - TURN1, NULL);
    Generation plain = {0};
    while (plain.n < MAX_NEW) {
        int next = argmax_token(logits, VOCAB);
        memcpy(plain.logits[plain.n], logits, sizeof plain.logits[0]);
        plain.tokens[plain.n++] = next;
        logits = forward_tokens(s, &plain.tokens[plain.n - 1], 1, 1, NULL);
    }
    run_state_free(s);

    static const RunHistory modes[] = {HISTORY_PERSIST, HISTORY_REENCODE, HISTORY_PREFIX};
    for (int m = 0; m < 3; m++)
        for (int k = 0; k < 2; k++) {
            EvalPrefill *pf = eval_prefill(env->model, p, 2, MAX_NEW, modes[m]);
            PolicySpec spec = k ? make_spec("w", "window", "window=64 sinks=0")
                                : make_spec("f", "full", "");
            Generation live = {0};
            EvalHooks hooks = {.user = &live, .on_token = conversation_token};
            int32_t out[2 * MAX_NEW];
            EvalAnswer ans[2];
            EvalDecode d;
            KvErr err;
            assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, ans, &d, &err), 0);
            assert_int_equal(ans[0].n_generated, ANSWER1);
            assert_int_equal(ans[0].turn, 1);
            assert_int_equal(ans[0].position, TURN1);
            assert_int_equal(ans[1].turn, 2);
            assert_int_equal(ans[1].position, N_PROMPT + ANSWER1);
            assert_int_equal(ans[1].n_generated, MAX_NEW);
            assert_int_equal(d.n_generated, ANSWER1 + MAX_NEW);
            /* persist computes the new turn's tokens; reencode every token after the first span */
            assert_int_equal(d.prefill_tokens, modes[m] == HISTORY_PERSIST
                                                   ? N_PROMPT - TURN1
                                                   : N_PROMPT - TURN1 + ANSWER1);
            /* the first answer's tokens are all fed (the second turn follows), the last
             * answer's but its last */
            assert_int_equal(d.decode_steps, ANSWER1 + MAX_NEW - 1);
            for (int i = 0; i < ANSWER1; i++)
                assert_int_equal(out[i], dialogue[TURN1 + i]);
            for (int i = 0; i < MAX_NEW; i++) {
                assert_int_equal(out[MAX_NEW + i], plain.tokens[i]);
                assert_true(rel_diff(live.logits[i], plain.logits[i], VOCAB) <= 1e-5);
            }
            free(spec.params);
            eval_prefill_free(pf);
        }
    set_split(p, N_PROMPT);
    memset(p->segments, 0, N_PROMPT * sizeof *p->segments);
}

/* A small window that persists: the second turn's tokens attend over what the window kept plus
 * the turn so far, so its answer differs from the re-encoded history's, which attends over
 * everything; a window holding every token gives the same answer both ways (above). */
static void test_persisted_window_is_not_the_reencoded_one(void **state)
{
    Env *env = *state;
    PromptTokens *p = &env->prompt;
    set_conversation(p);
    Generation g[2] = {{0}};
    for (int m = 0; m < 2; m++) {
        EvalPrefill *pf = eval_prefill(env->model, p, 2, MAX_NEW,
                                       m ? HISTORY_REENCODE : HISTORY_PERSIST);
        PolicySpec spec = make_spec("w", "window", "window=2 sinks=1");
        EvalHooks hooks = {.user = &g[m], .on_token = conversation_token};
        int32_t out[2 * MAX_NEW];
        EvalDecode d;
        KvErr err;
        assert_int_equal(eval_decode(pf, &spec, 0, 16, NULL, &hooks, out, NULL, &d, &err), 0);
        /* after the last step: sinks + window slots, 2 KV heads, 2 layers, K+V of 16 dims */
        assert_true(fabs(d.device_bytes - 3 * 2 * 2 * 64.0) < 1e-9);
        free(spec.params);
        eval_prefill_free(pf);
    }
    assert_true(rel_diff(g[0].logits[0], g[1].logits[0], VOCAB) > 1e-3);
    set_split(p, N_PROMPT);
    memset(p->segments, 0, N_PROMPT * sizeof *p->segments);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_full_is_the_plain_forward, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sliding_window_model_runs_past_its_window, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_window_holding_everything_is_the_plain_forward,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_forced_tokens_with_full_are_the_plain_forward,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_small_window_attends_exactly_its_positions, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_forced_tokens_attend_over_the_window, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_alt_slots_are_attended_with_their_own_kv, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_oracle_topk_reads_the_live_attention, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_oracle_future_is_not_applicable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_trig_kvhead_is_not_applicable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_generation_stops_when_asked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conversation_with_full_is_the_plain_forward, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_persisted_window_is_not_the_reencoded_one, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
