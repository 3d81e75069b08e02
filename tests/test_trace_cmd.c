/* `kvsim trace` end to end on tiny checkpoints: the trace it writes holds exactly what a re-run
 * of the forward pass computes (tokens, greedy continuation, Q/K/V, the model's attention rows),
 * its metadata follows the prompt markup, `kvsim check` accepts it, and bad input is one line
 * naming the file. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "sim/format/trace.h"
#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"
#include "traces/model/forward.h"
#include "traces/model/model.h"
#include "traces/model/tokenizer.h"

typedef struct {
    char *dir;
    TinyCheckpoint *ck;
} Env;

static int setup(void **state)
{
    Env *env = kv_calloc(1, sizeof *env);
    env->dir = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.seed = 21;
    env->ck = tiny_ckpt_write(env->dir, &spec);
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    Env *env = *state;
    tiny_ckpt_free(env->ck);
    scratch_remove(env->dir);
    free(env);
    return 0;
}

static void write_text(const char *path, const char *text)
{
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

/* ---- The re-run: the same forward pass, driven by the test ---- */

typedef struct {
    int L, Hq, Hkv, D, T;
    float *q, *k, *v; /* [L][H][T][D] */
    int every, last_prompt;
    float *rows; /* [L][n_rows][Hq][T], zero beyond each row's position */
    int n_rows;
    int32_t rows_at[64];
} Rerun;

static void rerun_qkv(void *user, int layer, int t0, int n, const float *q, const float *k,
                      const float *v)
{
    Rerun *r = user;
    for (int part = 0; part < 3; part++) {
        int heads = part ? r->Hkv : r->Hq;
        float *dst = part == 0 ? r->q : part == 1 ? r->k : r->v;
        const float *src = part == 0 ? q : part == 1 ? k : v;
        for (int h = 0; h < heads; h++)
            memcpy(dst + (((size_t)layer * heads + h) * r->T + t0) * r->D,
                   src + (size_t)h * n * r->D, (size_t)n * r->D * sizeof(float));
    }
}

static int rerun_wants(void *user, int position)
{
    Rerun *r = user;
    return position >= r->last_prompt && (position - r->last_prompt) % r->every == 0;
}

static void rerun_attention(void *user, int layer, int position, const float *probs)
{
    Rerun *r = user;
    int row = (position - r->last_prompt) / r->every;
    if (layer == 0) {
        r->rows_at[row] = position;
        r->n_rows = row + 1;
    }
    for (int h = 0; h < r->Hq; h++)
        memcpy(r->rows + (((size_t)layer * 64 + row) * r->Hq + h) * r->T,
               probs + (size_t)h * (position + 1), (size_t)(position + 1) * sizeof(float));
}

/* Greedy decoding written here: the largest logit, the lowest id on ties; stops before eos. */
static int greedy(const float *logits, int vocab)
{
    int best = 0;
    for (int i = 1; i < vocab; i++)
        best = logits[i] > logits[best] ? i : best;
    return best;
}

/* Runs prompt + up to max_new greedy tokens with the given chunk; fills tokens, returns T. */
static int rerun(const char *dir, const int32_t *prompt, int n_prompt, int max_new, int chunk,
                 int every, int eos, int32_t *tokens, Rerun *r)
{
    KvErr err = {{0}};
    Model *m = model_load(dir, &err);
    if (!m)
        fail_msg("%s", err.msg);
    const ModelConfig *c = &m->config;
    int T_max = n_prompt + max_new;
    *r = (Rerun){.L = c->n_layers, .Hq = c->n_q_heads, .Hkv = c->n_kv_heads, .D = c->head_dim,
                 .T = T_max, .every = every, .last_prompt = n_prompt - 1};
    r->q = kv_calloc((size_t)r->L * r->Hq * T_max * r->D, sizeof(float));
    r->k = kv_calloc((size_t)r->L * r->Hkv * T_max * r->D, sizeof(float));
    r->v = kv_calloc((size_t)r->L * r->Hkv * T_max * r->D, sizeof(float));
    r->rows = kv_calloc((size_t)r->L * 64 * r->Hq * T_max, sizeof(float));
    RunState *s = run_state_new(m, T_max, chunk);
    ForwardObserver obs = {r, rerun_qkv, rerun_wants, rerun_attention};
    memcpy(tokens, prompt, (size_t)n_prompt * sizeof *tokens);
    const float *logits = forward_prompt(s, prompt, n_prompt, &obs);
    int T = n_prompt;
    for (int i = 0; i < max_new; i++) {
        int next = greedy(logits, c->vocab_size);
        if (next == eos)
            break;
        tokens[T++] = next;
        logits = forward_tokens(s, &tokens[T - 1], 1, 1, &obs);
    }
    run_state_free(s);
    model_free(m);
    return T;
}

static void rerun_free(Rerun *r)
{
    free(r->q);
    free(r->k);
    free(r->v);
    free(r->rows);
}

static double max_rel_diff(const float *got, const float *want, size_t n)
{
    double worst = 0, largest = 0;
    for (size_t i = 0; i < n; i++) {
        worst = fmax(worst, fabs((double)got[i] - want[i]));
        largest = fmax(largest, fabs(want[i]));
    }
    return largest > 0 ? worst / largest : worst;
}

/* Every layer's stored Q/K/V (the re-run's first T tokens) and attention rows, the trace's row
 * skip_rows + i against the re-run's row i. */
static void compare_trace_with_rerun(Trace *tr, const Rerun *r, double tol, int skip_rows)
{
    const TraceMeta *m = trace_meta(tr);
    int T = m->n_tokens;
    float *q = kv_malloc((size_t)r->Hq * T * r->D * sizeof(float));
    float *k = kv_malloc((size_t)r->Hkv * T * r->D * sizeof(float));
    float *v = kv_malloc((size_t)r->Hkv * T * r->D * sizeof(float));
    float *rows = kv_malloc((size_t)r->Hq * (m->n_attn_rows ? m->n_attn_rows : 1) * T * sizeof(float));
    KvErr err = {{0}};
    for (int l = 0; l < r->L; l++) {
        if (trace_read_layer(tr, l, q, k, v, &err) != 0)
            fail_msg("%s", err.msg);
        for (int part = 0; part < 3; part++) {
            int heads = part ? r->Hkv : r->Hq;
            const float *got = part == 0 ? q : part == 1 ? k : v;
            const float *want = part == 0 ? r->q : part == 1 ? r->k : r->v;
            for (int h = 0; h < heads; h++)
                assert_true(max_rel_diff(got + (size_t)h * T * r->D,
                                         want + (((size_t)l * heads + h) * r->T) * r->D,
                                         (size_t)T * r->D) <= tol);
        }
        if (m->n_attn_rows == 0)
            continue;
        if (trace_read_attn_rows(tr, l, rows, &err) != 0)
            fail_msg("%s", err.msg);
        for (int h = 0; h < r->Hq; h++)
            for (int row = skip_rows; row < m->n_attn_rows; row++)
                assert_true(max_rel_diff(rows + ((size_t)h * m->n_attn_rows + row) * T,
                                         r->rows + (((size_t)l * 64 + row - skip_rows) * r->Hq +
                                                    h) * r->T,
                                         (size_t)T) <= tol);
    }
    free(q);
    free(k);
    free(v);
    free(rows);
}

static Trace *open_trace(const char *path)
{
    KvErr err = {{0}};
    Trace *tr = trace_open(path, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    return tr;
}

#define N_PROMPT 21

static void prompt_ids(int32_t *ids)
{
    for (int i = 0; i < N_PROMPT; i++)
        ids[i] = (int32_t)((i * 53 + 7) % 300);
}

/* The prompt's ids as a --tokens file in dir (one line, separated by spaces); its path. */
static const char *write_prompt_ids(const char *dir, const int32_t *prompt)
{
    char text[512] = "";
    for (int i = 0; i < N_PROMPT; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "%d ", prompt[i]);
    const char *tokens_path = scratch_path(dir, "prompt.ids", 0);
    write_text(tokens_path, text);
    return tokens_path;
}

static void test_tokens_trace_matches_rerun(void **state)
{
    Env *env = *state;
    int32_t prompt[N_PROMPT], expected[N_PROMPT + 7];
    prompt_ids(prompt);
    char text[512] = "";
    for (int i = 0; i < N_PROMPT; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "%d%s", prompt[i],
                 i % 5 == 4 ? "\n" : " ");
    const char *tokens_path = scratch_path(env->dir, "prompt.ids", 0);
    write_text(tokens_path, text);
    const char *out = scratch_path(env->dir, "t.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --tokens '%s' --out '%s' --max-new 7 "
                                 "--attn-rows 3 --chunk 8 --threads 1", env->dir, tokens_path, out);

    Rerun r;
    int T = rerun(env->dir, prompt, N_PROMPT, 7, 8, 3, -1, expected, &r);
    assert_int_equal(T, N_PROMPT + 7);
    /* stdout: the generated ids (no tokenizer in the checkpoint). */
    char want_out[256] = "";
    for (int t = N_PROMPT; t < T; t++)
        snprintf(want_out + strlen(want_out), sizeof want_out - strlen(want_out), "%s%d",
                 t > N_PROMPT ? " " : "", expected[t]);
    strcat(want_out, "\n");
    assert_string_equal(run.out, want_out);
    kvsim_run_free(&run);

    Trace *tr = open_trace(out);
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_tokens, T);
    assert_int_equal(m->n_prompt, N_PROMPT);
    assert_int_equal(m->n_layers, 2);
    assert_int_equal(m->n_q_heads, 4);
    assert_int_equal(m->n_kv_heads, 2);
    assert_int_equal(m->head_dim, 16);
    assert_int_equal(m->rope_layout, ROPE_HALF);
    assert_float_equal(m->attn_scale, 0.25, 1e-12);
    assert_int_equal(trace_dtype(tr), TRACE_F32);
    for (int t = 0; t < T; t++) {
        assert_int_equal(m->tokens[t], expected[t]);
        assert_int_equal(m->positions[t], t);
        assert_int_equal(m->segments[t], 0);
    }
    assert_int_equal(m->n_needles, 0);
    /* Default probes: the last prompt token and every decode step. */
    assert_int_equal(m->n_probes, T - N_PROMPT + 1);
    for (int i = 0; i < m->n_probes; i++)
        assert_int_equal(m->probes[i], N_PROMPT - 1 + i);
    /* Attention rows at the last prompt token and every third decode step. */
    assert_int_equal(m->n_attn_rows, 3);
    assert_int_equal(r.n_rows, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(m->attn_rows_at[i], N_PROMPT - 1 + 3 * i);
    /* Version 2: every layer global with the config's frequencies, one prompt then one decode
     * run, the model's size from the config. */
    assert_int_equal(m->version, 2);
    for (int l = 0; l < m->n_layers; l++) {
        LayerGeometry g = trace_layer_geometry(m, l);
        assert_int_equal(g.window, 0);
        for (int f = 0; f < 8; f++)
            assert_float_equal(g.rope_inv_freq[f], pow(10000.0, -2.0 * f / 16), 1e-15);
    }
    assert_int_equal(m->n_spans, 2);
    assert_int_equal(m->spans[0].kind, SPAN_PREFILL);
    assert_int_equal(m->spans[0].end, N_PROMPT);
    assert_int_equal(m->spans[1].kind, SPAN_DECODE);
    assert_int_equal(m->spans[1].end, T);
    assert_int_equal(m->hidden_size, 64);
    assert_int_equal(m->intermediate_size, 96);
    assert_int_equal(m->vocab_size, 300);
    /* per layer: norms 2x64, q 64x64, k and v 32x64 each, o 64x64, MLP 3x64x96; embeddings and
     * the LM head 300x64 each; the final norm 64 */
    int64_t per_layer = 2 * 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 96;
    assert_true(m->n_params == 2 * per_layer + 2 * 300 * 64 + 64);
    compare_trace_with_rerun(tr, &r, 1e-6, 0);
    trace_close(tr);
    rerun_free(&r);

    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
    /* Only the trace is left: no temporary files. */
    assert_int_equal(scratch_count(env->dir), 2 + 1 + 1); /* config, weights, ids, trace */
}

static void test_f16_trace_passes_check(void **state)
{
    Env *env = *state;
    int32_t prompt[N_PROMPT], expected[N_PROMPT + 4];
    prompt_ids(prompt);
    const char *tokens_path = write_prompt_ids(env->dir, prompt);
    const char *out = scratch_path(env->dir, "t16.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --tokens '%s' --out '%s' --max-new 4 "
                                 "--attn-rows 1 --dtype f16", env->dir, tokens_path, out);
    kvsim_run_free(&run);
    Rerun r;
    int T = rerun(env->dir, prompt, N_PROMPT, 4, 128, 1, -1, expected, &r);
    Trace *tr = open_trace(out);
    assert_int_equal(trace_dtype(tr), TRACE_F16);
    assert_int_equal(trace_meta(tr)->n_tokens, T);
    assert_int_equal(trace_meta(tr)->n_attn_rows, 5);
    compare_trace_with_rerun(tr, &r, 1e-3, 0); /* half precision: 11-bit mantissa */
    trace_close(tr);
    rerun_free(&r);
    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
}

/* A random Qwen3-MoE checkpoint in BF16 (weights kept 16-bit): `kvsim trace` stores what the
 * forward pass computes, `kvsim check` accepts the trace and `kvsim run configs/ta512.ini`
 * replays it through every policy of the config. */
static void test_qwen3_moe_trace_check_run(void **state)
{
    (void)state;
    char *dir = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.architecture = "Qwen3MoeForCausalLM";
    spec.n_experts = 4;
    spec.n_experts_per_tok = 2;
    spec.moe_intermediate_size = 32;
    spec.norm_topk_prob = 1;
    spec.dtype = TINY_BF16;
    spec.seed = 23;
    TinyCheckpoint *ck = tiny_ckpt_write(dir, &spec);
    int32_t prompt[N_PROMPT], expected[N_PROMPT + 6];
    prompt_ids(prompt);
    const char *tokens_path = write_prompt_ids(dir, prompt);
    const char *out = scratch_path(dir, "moe.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --tokens '%s' --out '%s' --max-new 6 "
                                "--attn-rows 2", dir, tokens_path, out);
    kvsim_run_free(&run);
    Rerun r;
    int T = rerun(dir, prompt, N_PROMPT, 6, 128, 2, -1, expected, &r);
    Trace *tr = open_trace(out);
    assert_int_equal(trace_meta(tr)->n_tokens, T);
    assert_memory_equal(trace_meta(tr)->tokens, expected, (size_t)T * sizeof *expected);
    compare_trace_with_rerun(tr, &r, 1e-5, 0);
    trace_close(tr);
    rerun_free(&r);
    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    run = run_kvsim_ok("run '%s/configs/ta512.ini' --trace '%s' --out '%s' --quiet", src, out,
                       scratch_path(dir, "ta", 2));
    kvsim_run_free(&run);
    char summary[8400];
    snprintf(summary, sizeof summary, "%s/summary.csv", scratch_path(dir, "ta", 2));
    FILE *fp = fopen(summary, "r");
    assert_non_null(fp);
    int lines = 0;
    for (int ch; (ch = fgetc(fp)) != EOF;)
        lines += ch == '\n';
    fclose(fp);
    assert_int_equal(lines, 1 + 13); /* the header and one row per policy of the config */
    char cmd[8500];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", scratch_path(dir, "ta", 2));
    run = run_command(cmd);
    kvsim_run_free(&run);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* A longrope checkpoint whose run (21 + 4 tokens) is longer than its original context (16): the
 * trace records the frequencies divided by the long factors, the attention factor
 * sqrt(1 + ln(512 / 16) / ln 16) = 1.5 and a summary of the scaling; `kvsim check` accepts it. */
static void test_longrope_trace_records_factors(void **state)
{
    (void)state;
    char *dir = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    static const double long_f[8] = {1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0};
    spec.rope_scaling = "{\"rope_type\": \"longrope\", "
                        "\"short_factor\": [1, 1, 1, 1, 1, 1, 1, 1], "
                        "\"long_factor\": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]}";
    spec.original_max_position_embeddings = 16;
    spec.seed = 24;
    TinyCheckpoint *ck = tiny_ckpt_write(dir, &spec);
    int32_t prompt[N_PROMPT], expected[N_PROMPT + 4];
    prompt_ids(prompt);
    const char *tokens_path = write_prompt_ids(dir, prompt);
    const char *out = scratch_path(dir, "long.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --tokens '%s' --out '%s' --max-new 4", dir,
                                tokens_path, out);
    kvsim_run_free(&run);
    Rerun r;
    int T = rerun(dir, prompt, N_PROMPT, 4, 128, 1000, -1, expected, &r);
    Trace *tr = open_trace(out);
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_tokens, T);
    assert_true(fabs(m->rope_attention_factor - 1.5) < 1e-12);
    assert_non_null(strstr(m->rope_scaling, "longrope"));
    for (int l = 0; l < m->n_layers; l++)
        for (int f = 0; f < 8; f++) {
            double want = 1.0 / (long_f[f] * pow(10000.0, 2.0 * f / 16));
            assert_true(fabs(trace_layer_geometry(m, l).rope_inv_freq[f] - want) <= 1e-12 * want);
        }
    compare_trace_with_rerun(tr, &r, 1e-6, 0);
    trace_close(tr);
    rerun_free(&r);
    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

static void test_generation_stops_at_eos(void **state)
{
    Env *env = *state;
    int32_t prompt[N_PROMPT], free_run[N_PROMPT + 8], stopped[N_PROMPT + 8];
    prompt_ids(prompt);
    Rerun r;
    rerun(env->dir, prompt, N_PROMPT, 8, 128, 4, -1, free_run, &r);
    rerun_free(&r);
    /* Declare the fourth generated token the model's EOS: generation stops before it (or
     * earlier, should the same id come sooner). */
    int eos = free_run[N_PROMPT + 3];
    char value[32];
    snprintf(value, sizeof value, "%d", eos);
    tiny_ckpt_set_config(env->dir, "eos_token_id", value);
    int T = rerun(env->dir, prompt, N_PROMPT, 8, 128, 4, eos, stopped, &r);
    assert_true(T <= N_PROMPT + 3);

    const char *tokens_path = write_prompt_ids(env->dir, prompt);
    const char *out = scratch_path(env->dir, "eos.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --tokens '%s' --out '%s' --max-new 8 "
                                 "--attn-rows 4", env->dir, tokens_path, out);
    assert_int_equal(count_lines(run.out), 1);
    kvsim_run_free(&run);
    Trace *tr = open_trace(out);
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_tokens, T);
    for (int t = 0; t < T; t++)
        assert_int_equal(m->tokens[t], stopped[t]);
    assert_int_equal(m->n_probes, T - N_PROMPT + 1);
    compare_trace_with_rerun(tr, &r, 1e-6, 0);
    trace_close(tr);
    rerun_free(&r);
}

/* Encodes text with the checkpoint's tokenizer (the piece-by-piece rule of the markup). */
static int encode(const char *dir, const char *text, int32_t *out)
{
    char json[4096], cfg[4096];
    snprintf(json, sizeof json, "%s/tokenizer.json", dir);
    snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
    KvErr err = {{0}};
    Tokenizer *tok = tokenizer_load(json, cfg, &err);
    if (!tok)
        fail_msg("%s", err.msg);
    int32_t *ids;
    int n;
    if (tokenizer_encode(tok, text, strlen(text), &ids, &n, &err) != 0)
        fail_msg("%s", err.msg);
    memcpy(out, ids, (size_t)n * sizeof *ids);
    free(ids);
    tokenizer_free(tok);
    return n;
}

static void test_prompt_markup_in_trace(void **state)
{
    Env *env = *state;
    tiny_ckpt_write_tokenizer(env->dir);
    const char *prompt_path = scratch_path(env->dir, "chat.json", 0);
    write_text(prompt_path,
               "[{\"role\": \"system\", \"content\": \"Be brief.\"},\n"
               " {\"role\": \"user\", \"content\": \"The pin is [[needle]]4711[[/needle]].\"},\n"
               " {\"role\": \"assistant\", \"content\": \"Noted[[probe]].\"},\n"
               " {\"role\": \"user\", \"content\": \"The pin?\"}]\n");
    /* The pieces as the markup splits them: segment by segment, needle apart, the assistant's
     * content (forced, a decode run) apart from its header (the end of the first prefill). */
    const char *pieces[] = {"System: Be brief.\n\n", "User: The pin is ", "4711",
                            ".\n\nAssistant:", " Noted", ".", "\n\n",
                            "User: The pin?\n\nAssistant:"};
    const int piece_segment[] = {0, 1, 1, 1, 1, 1, 1, 2};
    int32_t want[256], seg[256], ends[8];
    int n = 0, needle_start = 0, needle_end = 0, probe = 0;
    want[n] = TINY_BOS;
    seg[n++] = 0;
    for (int p = 0; p < 8; p++) {
        if (p == 2)
            needle_start = n;
        int got = encode(env->dir, pieces[p], want + n);
        for (int i = 0; i < got; i++)
            seg[n + i] = piece_segment[p];
        n += got;
        ends[p] = n;
        if (p == 2)
            needle_end = n;
        if (p == 4)
            probe = n - 1;
    }
    const char *out = scratch_path(env->dir, "chat.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --prompt '%s' --out '%s' --max-new 3",
                                 env->dir, prompt_path, out);
    Trace *tr = open_trace(out);
    const TraceMeta *m = trace_meta(tr);
    /* Prefill to "Assistant:", the forced " Noted.", the next turn prefilled on top of the
     * cache, then the answer. */
    assert_int_equal(m->n_prompt, ends[3]);
    assert_true(m->n_tokens <= n + 3);
    assert_int_equal(m->n_spans, m->n_tokens > n ? 4 : 3);
    const int span_kind[] = {SPAN_PREFILL, SPAN_DECODE, SPAN_PREFILL, SPAN_DECODE};
    const int span_end[] = {ends[3], ends[5], n, m->n_tokens};
    for (int i = 0; i < m->n_spans; i++) {
        assert_int_equal(m->spans[i].kind, span_kind[i]);
        assert_int_equal(m->spans[i].end, span_end[i]);
    }
    for (int t = 0; t < n; t++) {
        assert_int_equal(m->tokens[t], want[t]);
        assert_int_equal(m->segments[t], seg[t]);
    }
    for (int t = n; t < m->n_tokens; t++)
        assert_int_equal(m->segments[t], 2); /* the answer continues the last turn */
    assert_int_equal(m->n_needles, 1);
    assert_int_equal(m->needles[0], needle_start);
    assert_int_equal(m->needles[1], needle_end);
    assert_int_equal(m->n_probes, 1);
    assert_int_equal(m->probes[0], probe);
    /* stdout is the decoded continuation. */
    char json[4096];
    snprintf(json, sizeof json, "%s/tokenizer.json", env->dir);
    KvErr err = {{0}};
    Tokenizer *tok = tokenizer_load(json, NULL, &err);
    char *text = tokenizer_decode(tok, m->tokens + n, m->n_tokens - n);
    char *line = kv_malloc(strlen(text) + 2);
    sprintf(line, "%s\n", text);
    assert_string_equal(run.out, line);
    free(line);
    free(text);
    tokenizer_free(tok);
    trace_close(tr);
    kvsim_run_free(&run);
}

/* With [[decode]] the trace's prompt ends at the marker; the forced tokens are decode positions
 * whose Q/K/V are those of a plain forward pass over the whole text, then generation goes on. */
static void test_decode_marker_in_trace(void **state)
{
    Env *env = *state;
    tiny_ckpt_write_tokenizer(env->dir);
    const char *prompt_path = scratch_path(env->dir, "forced.txt", 0);
    write_text(prompt_path, "the thin tin [[needle]]in the hat[[/needle]] then other"
                            "[[decode]] the hat in? then");
    const char *pieces[] = {"the thin tin ", "in the hat", " then other", " the hat in? then"};
    int32_t input[256];
    int n_input = 0, n_prompt = 0, needle_start = 0, needle_end = 0;
    input[n_input++] = TINY_BOS;
    for (int p = 0; p < 4; p++) {
        if (p == 1)
            needle_start = n_input;
        n_input += encode(env->dir, pieces[p], input + n_input);
        if (p == 1)
            needle_end = n_input;
        if (p == 2)
            n_prompt = n_input;
    }
    assert_true(n_input - n_prompt >= 4);
    const char *out = scratch_path(env->dir, "forced.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --prompt '%s' --out '%s' --max-new 5 "
                                 "--attn-rows 1000 --chunk 4 --threads 1", env->dir, prompt_path, out);

    /* The plain forward pass over every token of the text, rows from the last forced token. */
    int32_t expected[256];
    Rerun r;
    int T = rerun(env->dir, input, n_input, 5, 8, 1, TINY_EOS, expected, &r);
    Trace *tr = open_trace(out);
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_prompt, n_prompt);
    assert_int_equal(m->n_tokens, T);
    assert_true(T > n_input);
    for (int t = 0; t < T; t++)
        assert_int_equal(m->tokens[t], expected[t]);
    assert_int_equal(m->n_needles, 1);
    assert_int_equal(m->needles[0], needle_start);
    assert_int_equal(m->needles[1], needle_end);
    /* Default probes: the last prompt token, every forced and every generated token. */
    assert_int_equal(m->n_probes, T - n_prompt + 1);
    for (int i = 0; i < m->n_probes; i++)
        assert_int_equal(m->probes[i], n_prompt - 1 + i);
    /* Attention rows at the last prompt token and at the last forced token. */
    assert_int_equal(m->n_attn_rows, 2);
    assert_int_equal(m->attn_rows_at[0], n_prompt - 1);
    assert_int_equal(m->attn_rows_at[1], n_input - 1);
    /* Forced tokens go through one at a time, the plain pass in chunks: rounding apart. */
    compare_trace_with_rerun(tr, &r, 1e-5, 1);
    /* stdout is what follows the forced text. */
    char json[4096];
    snprintf(json, sizeof json, "%s/tokenizer.json", env->dir);
    KvErr err = {{0}};
    Tokenizer *tok = tokenizer_load(json, NULL, &err);
    char *text = tokenizer_decode(tok, expected + n_input, T - n_input);
    char *line = kv_malloc(strlen(text) + 2);
    sprintf(line, "%s\n", text);
    assert_string_equal(run.out, line);
    free(line);
    free(text);
    tokenizer_free(tok);
    kvsim_run_free(&run);
    trace_close(tr);
    rerun_free(&r);

    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
}

/* Two turns in plain text: the first prefilled then answered greedily, the second prefilled on
 * top of the cache (generated tokens included) and answered. Each prefill span holds exactly
 * its turn's tokens; the answers are those of fresh single runs over the same history; the
 * Q/K/V are those of one plain forward pass over the whole sequence (attention is causal over a
 * full cache, so turns change nothing the model sees); kvsim check passes on rows taken inside
 * the second turn's prefill chunks. */
static void test_two_turns_in_trace(void **state)
{
    Env *env = *state;
    tiny_ckpt_write_tokenizer(env->dir);
    const char *prompt_path = scratch_path(env->dir, "turns.txt", 0);
    write_text(prompt_path, "the thin tin [[needle]]in the hat[[/needle]] then?[[generate]]"
                            " the hat in? then the thin[[generate]]\n");
    const char *pieces[] = {"the thin tin ", "in the hat", " then?", " the hat in? then the thin"};
    int32_t turn1[256], turn2[256];
    int n1 = 0, needle_start = 0, needle_end = 0;
    turn1[n1++] = TINY_BOS;
    for (int p = 0; p < 3; p++) {
        if (p == 1)
            needle_start = n1;
        n1 += encode(env->dir, pieces[p], turn1 + n1);
        if (p == 1)
            needle_end = n1;
    }
    int n2 = encode(env->dir, pieces[3], turn2);
    const char *out = scratch_path(env->dir, "turns.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --prompt '%s' --out '%s' --max-new 3 "
                                 "--attn-rows 2 --chunk 4 --threads 1", env->dir, prompt_path, out);

    /* The first answer: a fresh run of turn 1 alone. */
    int32_t seq[256];
    Rerun r;
    int g1 = rerun(env->dir, turn1, n1, 3, 8, 1000, TINY_EOS, seq, &r) - n1;
    rerun_free(&r);
    memcpy(seq + n1 + g1, turn2, (size_t)n2 * sizeof *seq);
    int input = n1 + g1 + n2;
    /* The second answer and every Q/K/V: one plain pass over the whole history. */
    int32_t expected[256];
    int T = rerun(env->dir, seq, input, 3, 8, 1000, TINY_EOS, expected, &r);
    Trace *tr = open_trace(out);
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_tokens, T);
    assert_true(g1 > 0 && T > input); /* both turns answered: four spans */
    for (int t = 0; t < T; t++)
        assert_int_equal(m->tokens[t], expected[t]);
    /* Prefill tokens per turn are exactly the spans' lengths. */
    TraceSpan want[4];
    int n_want = 0;
    want[n_want++] = (TraceSpan){SPAN_PREFILL, 0, n1};
    if (g1 > 0)
        want[n_want++] = (TraceSpan){SPAN_DECODE, n1, n1 + g1};
    want[n_want++] = (TraceSpan){SPAN_PREFILL, n1 + g1, input};
    if (T > input)
        want[n_want++] = (TraceSpan){SPAN_DECODE, input, T};
    assert_int_equal(m->n_spans, n_want);
    for (int i = 0; i < n_want; i++) {
        assert_int_equal(m->spans[i].kind, want[i].kind);
        assert_int_equal(m->spans[i].start, want[i].start);
        assert_int_equal(m->spans[i].end, want[i].end);
    }
    assert_int_equal(m->n_prompt, n1);
    /* Turns: BOS 0, turn 1 and its answer 1, turn 2 and its answer 2; the needle in turn 1. */
    for (int t = 0; t < T; t++)
        assert_int_equal(m->segments[t], t == 0 ? 0 : t < n1 + g1 ? 1 : 2);
    assert_int_equal(m->n_needles, 1);
    assert_int_equal(m->needles[0], needle_start);
    assert_int_equal(m->needles[1], needle_end);
    /* Default probes: the last token of each prefill span and every decode step. */
    int k = 0;
    for (int i = 0; i < n_want; i++)
        for (int t = want[i].kind == SPAN_PREFILL ? want[i].end - 1 : want[i].start;
             t < want[i].end; t++, k++)
            assert_int_equal(m->probes[k], t);
    assert_int_equal(m->n_probes, k);
    compare_trace_with_rerun(tr, &r, 1e-5, m->n_attn_rows); /* Q/K/V only */
    /* Rows from the last prompt token on, every second position, prefill chunks included. */
    assert_int_equal(m->n_attn_rows, (T - n1) / 2 + 1);
    for (int i = 0; i < m->n_attn_rows; i++)
        assert_int_equal(m->attn_rows_at[i], n1 - 1 + 2 * i);
    /* stdout: each answer on its line. */
    char json[4096];
    snprintf(json, sizeof json, "%s/tokenizer.json", env->dir);
    KvErr err = {{0}};
    Tokenizer *tok = tokenizer_load(json, NULL, &err);
    char *a1 = tokenizer_decode(tok, expected + n1, g1);
    char *a2 = tokenizer_decode(tok, expected + input, T - input);
    char *lines = kv_malloc(strlen(a1) + strlen(a2) + 3);
    sprintf(lines, "%s\n%s\n", a1, a2);
    assert_string_equal(run.out, lines);
    free(lines);
    free(a1);
    free(a2);
    tokenizer_free(tok);
    kvsim_run_free(&run);
    trace_close(tr);
    rerun_free(&r);

    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
}

/* The command fails with status 2 and one line on stderr containing every fragment, and leaves
 * no output behind. */
static void expect_failure(const Env *env, const char *args, const char *const *fragments)
{
    int before = scratch_count(env->dir);
    KvsimRun run = run_kvsim(args);
    assert_int_equal(run.status, 2);
    assert_int_equal(count_lines(run.err), 1);
    for (const char *const *f = fragments; *f; f++)
        if (!strstr(run.err, *f))
            fail_msg("error '%s' does not mention '%s'", run.err, *f);
    kvsim_run_free(&run);
    assert_int_equal(scratch_count(env->dir), before);
}

static void test_bad_input(void **state)
{
    Env *env = *state;
    const char *ids = scratch_path(env->dir, "ids.txt", 0);
    const char *out = scratch_path(env->dir, "never.h5", 1);
    const char *prompt = scratch_path(env->dir, "p.txt", 2);
    char args[4096];
    write_text(prompt, "hello");

    write_text(ids, "1 2 3\n4 x5 6\n");
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s'", env->dir, ids, out);
    expect_failure(env, args, (const char *[]){"ids.txt:2", "x5", NULL});

    write_text(ids, "1 2 300\n");
    expect_failure(env, args, (const char *[]){"ids.txt", "300", "vocab_size", NULL});

    /* --prompt needs the tokenizer, which this checkpoint does not have. */
    snprintf(args, sizeof args, "trace --model '%s' --prompt '%s' --out '%s'", env->dir, prompt,
             out);
    expect_failure(env, args, (const char *[]){"tokenizer.json", NULL});

    /* A tokenizer.json that is there must be readable, even with --tokens. */
    write_text(ids, "1 2 3\n");
    write_text(scratch_path(env->dir, "tokenizer.json", 3), "{\"model\": {\"type\": \"BPE\"");
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s'", env->dir, ids, out);
    expect_failure(env, args, (const char *[]){"tokenizer.json", NULL});
    unlink(scratch_path(env->dir, "tokenizer.json", 3));

    tiny_ckpt_set_config(env->dir, "architectures", "[\"FalconForCausalLM\"]");
    expect_failure(env, args, (const char *[]){"config.json", "FalconForCausalLM",
                                               "MistralForCausalLM", NULL});

    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s'", env->dir, ids);
    expect_failure(env, args, (const char *[]){"--out", NULL});
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s' --dtype bf16",
             env->dir, ids, out);
    expect_failure(env, args, (const char *[]){"--dtype", "bf16", NULL});
}

/* Disk full while the trace is written (a file size limit, SIGXFSZ ignored, so writes fail
 * with EFBIG): one line naming the output and the reason, exit 2, no core dump or signal, no
 * file left (the query spill is unlinked, the trace's temporary removed). It used to segfault
 * in HDF5's shutdown after the error. */
/* A bad conversation: one line naming the file and the message, exit 2, nothing written. */
static void test_bad_conversation(void **state)
{
    Env *env = *state;
    tiny_ckpt_write_tokenizer(env->dir);
    const char *prompt = scratch_path(env->dir, "bad.json", 0);
    const char *out = scratch_path(env->dir, "never.h5", 1);
    char args[4096];
    snprintf(args, sizeof args, "trace --model '%s' --prompt '%s' --out '%s'", env->dir, prompt,
             out);
    static const char *const cases[][2] = {
        {"[{\"role\": \"system\", \"content\": \"a\"}, {\"role\": \"system\", \"content\": \"b\"}]",
         "message 2: only the first message may be 'system'"},
        {"[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"\"}]",
         "message 2: an empty turn"},
        {"[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"},"
         " {\"role\": \"user\", \"content\": \"c [[generate]]\"}]",
         "message 3: [[generate]] in a user message"},
        {"[{\"role\": \"user\", \"content\": \"a [[needle]]b\"},"
         " {\"role\": \"user\", \"content\": \"c[[/needle]]\"}]",
         "message 1: line 1: [[needle]] is never closed"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        write_text(prompt, cases[i][0]);
        expect_failure(env, args, (const char *[]){"bad.json", cases[i][1], NULL});
    }
}

static void test_disk_full_while_writing(void **state)
{
    Env *env = *state;
    int32_t prompt[N_PROMPT];
    prompt_ids(prompt);
    const char *tokens_path = write_prompt_ids(env->dir, prompt);
    const char *out = scratch_path(env->dir, "full.h5", 1);
    int before = scratch_count(env->dir), writer_failed = 0;
    /* The whole trace's size, then limits in 512-byte blocks (dash's ulimit -f unit) from the
     * first block to the last: the query spill (~14 KB) fails below ~28. */
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' trace --model '%s' --tokens '%s' --out '%s' --max-new 7 "
             "--attn-rows 3", getenv("KVSIM_BIN"), env->dir, tokens_path, out);
    KvsimRun whole = run_command(cmd);
    assert_int_equal(whole.status, 0);
    kvsim_run_free(&whole);
    FILE *fp = fopen(out, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    int blocks = (int)((ftell(fp) + 511) / 512);
    fclose(fp);
    unlink(out);
    const int limits[] = {8, blocks / 2, blocks * 3 / 4, blocks - 1};
    for (size_t i = 0; i < sizeof limits / sizeof *limits; i++) {
        snprintf(cmd, sizeof cmd, "ulimit -f %d; trap '' XFSZ; exec '%s' trace --model '%s' "
                 "--tokens '%s' --out '%s' --max-new 7 --attn-rows 3", limits[i],
                 getenv("KVSIM_BIN"), env->dir, tokens_path, out);
        KvsimRun run = run_command(cmd);
        if (run.status != 2 || count_lines(run.err) != 1 || !strstr(run.err, "full.h5") ||
            !strstr(run.err, "File too large"))
            fail_msg("limit %d blocks: status %d, stderr: %s", limits[i], run.status, run.err);
        writer_failed += strstr(run.err, "temporary query file") == NULL;
        kvsim_run_free(&run);
        assert_int_equal(scratch_count(env->dir), before);
    }
    assert_true(writer_failed > 0); /* the trace writer's error, not only the spill's */
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_tokens_trace_matches_rerun), T(test_f16_trace_passes_check),
        T(test_qwen3_moe_trace_check_run), T(test_longrope_trace_records_factors),
        T(test_generation_stops_at_eos), T(test_prompt_markup_in_trace),
        T(test_decode_marker_in_trace), T(test_two_turns_in_trace), T(test_bad_input),
        T(test_bad_conversation), T(test_disk_full_while_writing),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
