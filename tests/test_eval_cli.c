/* `kvsim eval` end to end on a tiny random checkpoint: answers defined as what the plain
 * forward pass generates are all found by full and by a window that holds every token, the
 * CSVs are the same at any thread count, oracle_future is reported as not applicable, and bad
 * input is one line and exit status 2. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "sim/base/sha256.h"
#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"
#include "traces/model/forward.h"
#include "traces/model/model.h"
#include "traces/cmd/trace_cmd.h"

enum { N_PROMPTS = 3, ANSWER_TOKENS = 4, PLAIN_NEW = 12, N_CANDIDATES = 60 };

/* Candidate prompt k, some with needle and probe markup, half with the last words after a
 * [[decode]] marker (forced through each policy's cache). */
static void candidate_text(int k, char *out, size_t len)
{
    static const char *const words[] = {"the", "thin", "tin", "in", "then", "other", "hat"};
    const char *a = words[k % 7], *b = words[(k / 7) % 7], *c = words[(k * 3 + 1) % 7];
    const char *split = k % 4 < 2 ? "[[decode]]" : "";
    if (k % 2)
        snprintf(out, len, "[[needle]]%s %s[[/needle]] the %s in[[probe]]%s %s %s", a, b, c,
                 split, a, c);
    else
        snprintf(out, len, "%s %s the%s %s %s", b, a, split, c, b);
}

typedef struct {
    char *model;   /* checkpoint + tokenizer */
    char *prompts; /* NAME.txt + NAME.answer */
    char *out;
    TinyCheckpoint *ck;
    char answers[N_PROMPTS][64];
} Env;

/* The greedy continuation of the plain forward pass: text[k] is the decoded text of its first
 * k tokens (k = 0 .. n). */
typedef struct {
    int n;
    char *text[PLAIN_NEW + 1];
} Continuation;

/* A prompt file read as eval reads it, with the model and tokenizer it was read with. */
typedef struct {
    Model *model;
    Tokenizer *tok;
    PromptMarkup markup;
    PromptTokens tokens;
} LoadedPrompt;

static void load_prompt(const char *model_dir, const char *prompt_path, LoadedPrompt *lp)
{
    KvErr err;
    memset(lp, 0, sizeof *lp);
    lp->model = model_load(model_dir, &err);
    assert_non_null(lp->model);
    lp->tok = checkpoint_tokenizer_load(model_dir, &err);
    assert_non_null(lp->tok);
    assert_int_equal(prompt_file_load(prompt_path, lp->tok, lp->model, model_dir, &lp->markup,
                                      &lp->tokens, &err),
                     0);
}

static void loaded_prompt_free(LoadedPrompt *lp)
{
    prompt_tokens_free(&lp->tokens);
    prompt_markup_free(&lp->markup);
    tokenizer_free(lp->tok);
    model_free(lp->model);
}

static void plain_continuation(const char *model_dir, const char *prompt_path, Continuation *c)
{
    LoadedPrompt lp;
    load_prompt(model_dir, prompt_path, &lp);
    Model *model = lp.model;
    Tokenizer *tok = lp.tok;
    PromptTokens tokens = lp.tokens;
    int P = tokens.n_tokens;
    RunState *s = run_state_new(model, P + PLAIN_NEW, 16);
    const float *logits = forward_prompt(s, tokens.tokens, P, NULL);
    int32_t out[PLAIN_NEW];
    c->n = 0;
    while (c->n < PLAIN_NEW) {
        int next = argmax_token(logits, model->config.vocab_size);
        if (is_end_of_sequence(&model->config, tok, next))
            break;
        out[c->n++] = next;
        if (c->n < PLAIN_NEW)
            logits = forward_tokens(s, &out[c->n - 1], 1, 1, NULL);
    }
    for (int k = 0; k <= c->n; k++)
        c->text[k] = tokenizer_decode(tok, out, k);
    run_state_free(s);
    loaded_prompt_free(&lp);
}

static size_t trimmed_len(const char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    return strlen(s);
}

/* The expected answer of a continuation: the bytes of its whole text (after the leading
 * whitespace) that the first ANSWER_TOKENS tokens produced, up to any control character and
 * without trailing spaces; "" when its first two tokens already produce all of it (the test
 * wants answers that need decode steps under eviction). */
static void answer_of(const Continuation *c, char *answer, size_t cap)
{
    answer[0] = '\0';
    if (c->n < ANSWER_TOKENS)
        return;
    const char *full = c->text[c->n];
    while (*full == ' ' || *full == '\t' || *full == '\n' || *full == '\r')
        full++;
    size_t len = trimmed_len(c->text[ANSWER_TOKENS]), k = 0;
    while (k < len && k + 1 < cap && (unsigned char)full[k] >= ' ' && full[k] != 0x7f)
        k++;
    while (k > 0 && full[k - 1] == ' ')
        k--;
    if (k <= trimmed_len(c->text[2]))
        return;
    memcpy(answer, full, k);
    answer[k] = '\0';
}

static int setup(void **state)
{
    Env *env = kv_calloc(1, sizeof *env);
    env->model = scratch_create();
    env->prompts = scratch_create();
    env->out = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.seed = 5;
    env->ck = tiny_ckpt_write(env->model, &spec);
    tiny_ckpt_write_tokenizer(env->model);
    /* Prompts whose answer needs a few decode steps. The reference continuation prefills the
     * whole text, forced part included. */
    int found = 0, found_forced = 0;
    for (int k = 0; k < N_CANDIDATES && found < N_PROMPTS; k++) {
        char name[32], text_in[256];
        snprintf(name, sizeof name, "p%d.txt", found);
        candidate_text(k, text_in, sizeof text_in);
        scratch_write(scratch_path(env->prompts, name, 0), text_in);
        Continuation c;
        plain_continuation(env->model, scratch_path(env->prompts, name, 0), &c);
        answer_of(&c, env->answers[found], sizeof env->answers[found]);
        for (int i = 0; i <= c.n; i++)
            free(c.text[i]);
        if (!env->answers[found][0])
            continue;
        found_forced += strstr(text_in, "[[decode]]") != NULL;
        snprintf(name, sizeof name, "p%d.answer", found);
        char line[80];
        snprintf(line, sizeof line, "%s\n", env->answers[found++]);
        scratch_write(scratch_path(env->prompts, name, 0), line);
    }
    assert_int_equal(found, N_PROMPTS);
    assert_true(found_forced > 0);
    remove(scratch_path(env->prompts, "p3.txt", 0)); /* a last candidate without an answer */
    scratch_write(scratch_path(env->out, "eval.ini", 0),
               "[run]\nthreads = 1\n"
               "[policy.full]\ntype = full\n"
               "[policy.wide]\ntype = window\nwindow = 256\nsinks = 0\n"
               "[policy.w3]\ntype = window\nwindow = 2\nsinks = 1\n"
               "[policy.future]\ntype = oracle_future\nbudget = 3\n");
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    Env *env = *state;
    tiny_ckpt_free(env->ck);
    scratch_remove(env->model);
    scratch_remove(env->prompts);
    scratch_remove(env->out);
    free(env);
    return 0;
}

static KvsimRun eval_run(const Env *env, const char *config, const char *model,
                         const char *prompts, const char *out, const char *extra)
{
    char args[20000];
    snprintf(args, sizeof args, "eval %s --model %s --prompts %s --out %s --quiet %s", config,
             model, prompts, out, extra);
    (void)env;
    return run_kvsim(args);
}

/* The row of `label` in eval.csv, split at commas into fields[]. */
static int csv_row(const char *csv, const char *label, char fields[][64], int max)
{
    size_t len = strlen(label);
    const char *line = csv;
    while (line && !(strncmp(line, label, len) == 0 && line[len] == ','))
        line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL;
    if (!line)
        return 0;
    int n = 0;
    const char *p = line;
    while (n < max) {
        size_t k = strcspn(p, ",\n");
        snprintf(fields[n++], 64, "%.*s", (int)k, p);
        if (p[k] != ',')
            break;
        p += k + 1;
    }
    return n;
}

static int occurrences(const char *s, const char *what)
{
    int n = 0;
    for (const char *p = s; (p = strstr(p, what)); p++)
        n++;
    return n;
}

static void test_accuracy_and_determinism(void **state)
{
    Env *env = *state;
    char config[4096];
    snprintf(config, sizeof config, "%s", scratch_path(env->out, "eval.ini", 0));
    char *out2 = scratch_create();
    KvsimRun r = eval_run(env, config, env->model, env->prompts, env->out, "--threads 1");
    assert_int_equal(r.status, 0);
    /* the prompts without [[decode]] are named in one warning (setup made at least one with it;
     * those without are answered from the full-cache prefill) */
    char names[256] = "";
    for (int i = 0; i < N_PROMPTS; i++) {
        char name[32];
        snprintf(name, sizeof name, "p%d.txt", i);
        char *text = scratch_read(scratch_path(env->prompts, name, 0));
        if (!strstr(text, "[[decode]]"))
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s",
                     names[0] ? ", " : "", name);
        free(text);
    }
    if (names[0]) {
        char want[512];
        snprintf(want, sizeof want, "kvsim eval: warning: %s: %s: a question is read in the "
                 "full-cache prefill", env->prompts, names);
        assert_int_equal(count_lines(r.err), 1);
        assert_non_null(strstr(r.err, want));
    } else {
        assert_string_equal(r.err, "");
    }
    kvsim_run_free(&r);
    r = eval_run(env, config, env->model, env->prompts, out2, "--threads 2");
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);

    char *csv1 = scratch_read(scratch_path(env->out, "eval.csv", 0));
    char *csv2 = scratch_read(scratch_path(out2, "eval.csv", 1));
    char *per1 = scratch_read(scratch_path(env->out, "eval_prompts.csv", 2));
    char *per2 = scratch_read(scratch_path(out2, "eval_prompts.csv", 3));
    assert_string_equal(csv1, csv2);
    assert_string_equal(per1, per2);
    /* run.json: the config, the checkpoint's files and every prompt with its answers, each
     * with its size and SHA-256 */
    char *json = scratch_read(scratch_path(out2, "run.json", 0));
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    assert_string_equal(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "command"), 1)
                            ->valuestring,
                        "eval");
    assert_true(cJSON_GetObjectItemCaseSensitive(j, "threads")->valuedouble == 2);
    const cJSON *in = cJSON_GetObjectItemCaseSensitive(j, "inputs");
    int roles[3] = {0, 0, 0};
    for (int i = 0; i < cJSON_GetArraySize(in); i++) {
        const cJSON *f = cJSON_GetArrayItem(in, i);
        const char *role = cJSON_GetObjectItemCaseSensitive(f, "role")->valuestring;
        const char *path = cJSON_GetObjectItemCaseSensitive(f, "path")->valuestring;
        roles[0] += !strcmp(role, "model");
        roles[1] += !strcmp(role, "prompt");
        roles[2] += !strcmp(role, "answers");
        char hex[65];
        long long size;
        KvErr err;
        assert_int_equal(sha256_file(path, hex, &size, &err), 0);
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(f, "sha256")->valuestring, hex);
        assert_true(cJSON_GetObjectItemCaseSensitive(f, "bytes")->valuedouble == size);
    }
    assert_true(roles[0] >= 2); /* config.json, model.safetensors, tokenizer.json, ... */
    assert_int_equal(roles[1], N_PROMPTS);
    assert_int_equal(roles[2], N_PROMPTS);
    cJSON_Delete(j);
    free(json);
    assert_int_equal(count_lines(csv1), 1 + 4);
    /* 3 prompts for each applicable policy (answers may hold quoted line breaks) */
    assert_int_equal(occurrences(per1, "\nfull,p"), 3);
    assert_int_equal(occurrences(per1, "\nwide,p"), 3);
    assert_int_equal(occurrences(per1, "\nw3,p"), 3);
    assert_int_equal(occurrences(per1, "\nfuture,"), 0);

    char f[20][64];
    assert_int_equal(csv_row(csv1, "full", f, 20), 16);
    assert_string_equal(f[1], "full");
    assert_string_equal(f[2], "3"); /* prompts */
    assert_string_equal(f[3], "3"); /* questions: one each */
    assert_string_equal(f[4], "3");
    assert_string_equal(f[5], "1");
    assert_string_equal(f[6], "0.438502968"); /* Wilson 95% of 3/3, by hand */
    assert_string_equal(f[7], "1");
    assert_string_equal(f[8], "1"); /* agreement with itself */
    /* against itself: no discordant question, p = 1 */
    assert_string_equal(f[12], "0");
    assert_string_equal(f[13], "0");
    assert_string_equal(f[14], "1");
    assert_int_equal(csv_row(csv1, "wide", f, 20), 16);
    assert_string_equal(f[5], "1");
    assert_string_equal(f[8], "1");
    assert_string_equal(f[15], "1"); /* the best policy (3/3, first in config order) itself */
    /* the small window: a number of correct answers in [0, 3], its accuracy that over 3, the
     * Wilson interval of that, and the exact McNemar test against full, which answers all 3:
     * min(1, 2 P(X <= 0)) for X ~ Binomial(3 - correct, 1/2). wide is the best (3/3) too. */
    assert_int_equal(csv_row(csv1, "w3", f, 20), 16);
    int correct = atoi(f[4]);
    assert_true(correct >= 0 && correct <= 3);
    assert_true(fabs(atof(f[5]) - correct / 3.0) < 1e-5);
    static const char *const wilson_lo[4] = {"0", "0.0614919447", "0.207659601", "0.438502968"};
    static const char *const wilson_hi[4] = {"0.561497032", "0.792340399", "0.938508055", "1"};
    static const char *const p_value[4] = {"0.25", "0.5", "1", "1"};
    assert_string_equal(f[6], wilson_lo[correct]);
    assert_string_equal(f[7], wilson_hi[correct]);
    assert_string_equal(f[12], "0");
    assert_int_equal(atoi(f[13]), 3 - correct);
    assert_string_equal(f[14], p_value[correct]);
    assert_string_equal(f[15], p_value[correct]);
    /* device bytes: 3 slots x 2 KV heads x 2 layers x (K+V of 16 dims at 16 bits) */
    assert_true(fabs(atof(f[9]) - 3 * 2 * 2 * 64.0) < 1e-9);
    assert_int_equal(csv_row(csv1, "future", f, 20), 16);
    assert_string_equal(f[1], "oracle_future");
    assert_string_equal(f[2], "3");
    assert_string_equal(f[3], "3");
    for (int i = 4; i < 16; i++) /* correct .. vs_best_p: does not apply */
        assert_string_equal(f[i], "");
    /* every answer full gave is the expected one, in the per-prompt file */
    for (int i = 0; i < N_PROMPTS; i++)
        assert_non_null(strstr(per1, env->answers[i]));
    free(csv1);
    free(csv2);
    free(per1);
    free(per2);
    scratch_remove(out2);
}

/* The rows of `csv` whose first field is `label`, in order, concatenated. */
static char *rows_of(const char *csv, const char *label)
{
    size_t len = strlen(label), n = 0;
    char *out = kv_calloc(strlen(csv) + 1, 1);
    for (const char *line = csv; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t k = end ? (size_t)(end - line + 1) : strlen(line);
        if (!strncmp(line, label, len) && line[len] == ',') {
            memcpy(out + n, line, k);
            n += k;
        }
        line = end ? end + 1 : NULL;
    }
    return out;
}

/* Conversations: one question per generation point, each answered through the same evolving
 * cache. Answers are whatever the model says (the expected ones are arbitrary): what is checked
 * is the bookkeeping and that a cache that holds everything answers as full does in every
 * history mode, persist and reencode alike. */
static void test_conversations(void **state)
{
    Env *env = *state;
    char *conv = scratch_create(), *out[3] = {scratch_create(), scratch_create(), scratch_create()};
    scratch_write(scratch_path(conv, "c0.txt", 0),
                  "the thin tin in the hat[[generate]] then the other tin[[generate]] the hat "
                  "in[[generate]]");
    scratch_write(scratch_path(conv, "c0.answer", 1), "tin\t1\nhat\t1\nin\t2\n");
    scratch_write(scratch_path(conv, "c1.txt", 0), "other hat[[generate]] thin tin");
    scratch_write(scratch_path(conv, "c1.answer", 1), "the\nthe\t2\n");
    char cfg[2][4096];
    static const char *const modes[2] = {"persist", "reencode"};
    for (int m = 0; m < 2; m++) {
        char name[32], text[512];
        snprintf(name, sizeof name, "conv_%s.ini", modes[m]);
        snprintf(cfg[m], sizeof cfg[m], "%s", scratch_path(env->out, name, 0));
        snprintf(text, sizeof text,
                 "[run]\nthreads = 1\nhistory = %s\n"
                 "[policy.full]\ntype = full\n"
                 "[policy.wide]\ntype = window\nwindow = 256\nsinks = 0\n"
                 "[policy.w3]\ntype = window\nwindow = 2\nsinks = 1\n", modes[m]);
        scratch_write(cfg[m], text);
    }
    const char *runs[3][2] = {{cfg[0], "--threads 1"}, {cfg[0], "--threads 2"},
                              {cfg[1], "--threads 2"}};
    for (int r = 0; r < 3; r++) {
        KvsimRun k = eval_run(env, runs[r][0], env->model, conv, out[r], runs[r][1]);
        assert_int_equal(k.status, 0);
        kvsim_run_free(&k);
    }
    char *csv[3], *per[3], *turns[3];
    for (int r = 0; r < 3; r++) {
        csv[r] = scratch_read(scratch_path(out[r], "eval.csv", 0));
        per[r] = scratch_read(scratch_path(out[r], "eval_prompts.csv", 1));
        turns[r] = scratch_read(scratch_path(out[r], "eval_turns.csv", 2));
    }
    /* any thread count */
    assert_string_equal(csv[0], csv[1]);
    assert_string_equal(per[0], per[1]);
    assert_string_equal(turns[0], turns[1]);
    /* 2 prompts, 5 questions: 3 generation points in c0 (the trailing marker is the final
     * one), 2 in c1 */
    char f[20][64];
    for (int r = 0; r < 3; r += 2) {
        assert_int_equal(csv_row(csv[r], "full", f, 20), 16);
        assert_string_equal(f[2], "2");
        assert_string_equal(f[3], "5");
        assert_string_equal(f[8], "1");
        int correct = atoi(f[4]);
        assert_true(fabs(atof(f[5]) - correct / 5.0) < 1e-6);
        /* a window holding every token answers every question as full does: no discordant
         * question */
        assert_int_equal(csv_row(csv[r], "wide", f, 20), 16);
        assert_string_equal(f[8], "1");
        assert_string_equal(f[12], "0");
        assert_string_equal(f[13], "0");
        assert_string_equal(f[14], "1");
        assert_int_equal(occurrences(per[r], "\nfull,c0,"), 3);
        assert_int_equal(occurrences(per[r], "\nfull,c1,"), 2);
    }
    /* question, turn, distance of each row: c0's turns 1, 2, 3 with facts in 1, 1, 2; c1's
     * turns 1 and 2, the first without a fact turn */
    assert_non_null(strstr(per[0], "\nfull,c0,0,1,0,"));
    assert_non_null(strstr(per[0], "\nfull,c0,1,2,1,"));
    assert_non_null(strstr(per[0], "\nfull,c0,2,3,1,"));
    assert_non_null(strstr(per[0], "\nfull,c1,0,1,,"));
    assert_non_null(strstr(per[0], "\nfull,c1,1,2,0,"));
    assert_int_equal(strncmp(turns[0], "policy,type,history,by,value,questions,correct,accuracy,"
                             "accuracy_lo,accuracy_hi,agreement_with_full\n", 99), 0);
    /* by turn: 2 questions at turns 1 and 2, 1 at turn 3; by distance: 2 at 0 and 2 at 1 */
    assert_non_null(strstr(turns[0], "\nfull,full,persist,turn,1,2,"));
    assert_non_null(strstr(turns[0], "\nfull,full,persist,turn,2,2,"));
    assert_non_null(strstr(turns[0], "\nfull,full,persist,turn,3,1,"));
    assert_non_null(strstr(turns[0], "\nfull,full,persist,distance,0,2,"));
    assert_non_null(strstr(turns[0], "\nfull,full,persist,distance,1,2,"));
    assert_null(strstr(turns[0], "distance,2,"));
    assert_non_null(strstr(turns[2], "\nw3,window,reencode,distance,1,2,"));
    /* full: the same answers, tokens and bytes whether the cache persists or is re-encoded */
    char *full_p = rows_of(per[0], "full"), *full_r = rows_of(per[2], "full");
    assert_true(strlen(full_p) > 0);
    assert_string_equal(full_p, full_r);
    free(full_p);
    free(full_r);
    for (int r = 0; r < 3; r++) {
        free(csv[r]);
        free(per[r]);
        free(turns[r]);
        scratch_remove(out[r]);
    }
    scratch_remove(conv);
}

static void expect_one_line_error(KvsimRun r, const char *needle);

/* The first prefill span of a prompt file, as eval tokenizes it. */
static int n_prompt_of(const char *model_dir, const char *prompt_path)
{
    LoadedPrompt lp;
    load_prompt(model_dir, prompt_path, &lp);
    int n = lp.tokens.n_prompt;
    loaded_prompt_free(&lp);
    return n;
}

/* [run] ratio in eval: each prompt's budget is floor(ratio x its n_prompt). At ratio 1 a window
 * without sinks holds exactly n_prompt tokens at the last answer (all of them after the
 * prefill, the last n_prompt once decode steps slide it), so each prompt's device bytes are
 * n_prompt x 2 KV heads x 2 layers x 64 bytes; a ratio that leaves no room is an error that
 * names the prompt. */
static void test_ratio_per_prompt(void **state)
{
    Env *env = *state;
    char *out = scratch_create();
    char cfg[4096];
    snprintf(cfg, sizeof cfg, "%s", scratch_path(out, "ratio.ini", 0));
    scratch_write(cfg, "[run]\nthreads = 1\nratio = 1\n"
                       "[policy.full]\ntype = full\n"
                       "[policy.w]\ntype = window\nsinks = 0\n");
    KvsimRun r = eval_run(env, cfg, env->model, env->prompts, out, "");
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    char *per = scratch_read(scratch_path(out, "eval_prompts.csv", 1));
    for (int i = 0; i < N_PROMPTS; i++) {
        char name[32], row[64];
        snprintf(name, sizeof name, "p%d.txt", i);
        int n = n_prompt_of(env->model, scratch_path(env->prompts, name, 2));
        snprintf(row, sizeof row, "\nw,p%d,0,", i);
        const char *line = strstr(per, row);
        assert_non_null(line);
        /* policy, prompt, question, turn, distance, correct, agrees, generated, device_bytes */
        char f[20][64];
        assert_true(csv_row(line + 1, "w", f, 20) >= 9);
        assert_int_equal(atoll(f[8]), (long long)n * 2 * 2 * 64);
    }
    free(per);
    /* (a prompt whose question is fed through the cache: no warning before the error) */
    char *one = scratch_create();
    scratch_write(scratch_path(one, "b.txt", 0), "the thin[[decode]] tin");
    scratch_write(scratch_path(one, "b.answer", 0), "tin\n");
    scratch_write(cfg, "[run]\nthreads = 1\nratio = 0.01\n[policy.w]\ntype = window\n");
    r = eval_run(env, cfg, env->model, one, out, "");
    expect_one_line_error(r, "ratio.ini:3: [policy.w] window = -4");
    r = eval_run(env, cfg, env->model, one, out, "");
    expect_one_line_error(r, "(from [run] ratio = 0.01: budget 0 of the ");
    r = eval_run(env, cfg, env->model, one, out, "");
    expect_one_line_error(r, "-token prompt b.txt)");
    scratch_remove(one);
    scratch_remove(out);
}

/* The warning about questions read in the full-cache prefill: at most 3 names then "and N more";
 * a later turn without [[decode]] counts only where the history is re-encoded (under persist
 * its prefill is fed through each policy's caches); no warning when every question is fed
 * through the cache. */
static void test_full_prefill_warning(void **state)
{
    Env *env = *state;
    char *dir = scratch_create(), *one = scratch_create(), *out = scratch_create();
    for (int i = 0; i < 4; i++) {
        char name[32];
        snprintf(name, sizeof name, "a%d.txt", i);
        scratch_write(scratch_path(dir, name, 0), "the thin tin in the hat");
        snprintf(name, sizeof name, "a%d.answer", i);
        scratch_write(scratch_path(dir, name, 0), "tin\n");
    }
    scratch_write(scratch_path(dir, "b.txt", 0), "the thin[[decode]] tin");
    scratch_write(scratch_path(dir, "b.answer", 0), "tin\n");
    scratch_write(scratch_path(dir, "c.txt", 0),
                  "the thin[[decode]] tin[[generate]] then the other");
    scratch_write(scratch_path(dir, "c.answer", 0), "tin\nhat\n");
    scratch_write(scratch_path(one, "b.txt", 0), "the thin[[decode]] tin");
    scratch_write(scratch_path(one, "b.answer", 0), "tin\n");
    char cfg[2][4096];
    static const char *const modes[2] = {"persist", "reencode"};
    for (int m = 0; m < 2; m++) {
        char name[32], text[256];
        snprintf(name, sizeof name, "warn_%s.ini", modes[m]);
        snprintf(cfg[m], sizeof cfg[m], "%s", scratch_path(out, name, 0));
        snprintf(text, sizeof text, "[run]\nhistory = %s\n[policy.w3]\ntype = window\n"
                 "window = 2\nsinks = 1\n", modes[m]);
        scratch_write(cfg[m], text);
    }
    static const char *const more[2] = {"and 1 more", "and 2 more"};
    for (int m = 0; m < 2; m++) {
        KvsimRun r = eval_run(env, cfg[m], env->model, dir, out, "");
        assert_int_equal(r.status, 0);
        char want[512];
        snprintf(want, sizeof want, "kvsim eval: warning: %s: a0.txt, a1.txt, a2.txt %s: ", dir,
                 more[m]);
        assert_int_equal(count_lines(r.err), 1);
        assert_non_null(strstr(r.err, want));
        kvsim_run_free(&r);
    }
    KvsimRun r = eval_run(env, cfg[1], env->model, one, out, "");
    assert_int_equal(r.status, 0);
    assert_string_equal(r.err, "");
    kvsim_run_free(&r);
    scratch_remove(dir);
    scratch_remove(one);
    scratch_remove(out);
}

/* A JSON chat as NAME.json: read as kvsim trace reads a chat, one question per generation
 * point (here a [[generate]] assistant message, then the final answer). */
static void test_json_chat_prompt(void **state)
{
    Env *env = *state;
    char *dir = scratch_create(), *out = scratch_create();
    char config[4096];
    snprintf(config, sizeof config, "%s", scratch_path(env->out, "eval.ini", 0));
    scratch_write(scratch_path(dir, "chat.json", 0),
                  "[{\"role\": \"user\", \"content\": \"the thin tin\"}, "
                  "{\"role\": \"assistant\", \"content\": \"[[generate]]\"}, "
                  "{\"role\": \"user\", \"content\": \"[[decode]]the hat\"}]");
    scratch_write(scratch_path(dir, "chat.answer", 1), "tin\nhat\n");
    KvsimRun r = eval_run(env, config, env->model, dir, out, "");
    if (r.status != 0)
        fail_msg("%s", r.err);
    kvsim_run_free(&r);
    char *per = scratch_read(scratch_path(out, "eval_prompts.csv", 0));
    assert_int_equal(occurrences(per, "\nfull,chat,"), 2);
    assert_non_null(strstr(per, "\nfull,chat,1,2,")); /* the second question, in turn 2 */
    free(per);
    scratch_remove(dir);
    scratch_remove(out);
}

/* The prompts of setup with [[group=...]] markers (p0 and p1 "a", p2 "b"): the same answers as
 * without them (the marker and its line break are removed), and eval_groups.csv breaks
 * eval.csv's counts down by group, each with its Wilson interval and McNemar test vs full. A
 * set without groups writes no eval_groups.csv. */
static void test_prompt_groups(void **state)
{
    Env *env = *state;
    char *dir = scratch_create(), *out = scratch_create();
    char config[4096];
    snprintf(config, sizeof config, "%s", scratch_path(env->out, "eval.ini", 0));
    for (int i = 0; i < N_PROMPTS; i++) {
        char name[32], answer[32], text[512];
        snprintf(name, sizeof name, "p%d.txt", i);
        snprintf(answer, sizeof answer, "p%d.answer", i);
        char *body = scratch_read(scratch_path(env->prompts, name, 0));
        snprintf(text, sizeof text, "[[group=%s]]\n%s", i < 2 ? "a" : "b", body);
        scratch_write(scratch_path(dir, name, 1), text);
        free(body);
        char *ans = scratch_read(scratch_path(env->prompts, answer, 0));
        scratch_write(scratch_path(dir, answer, 1), ans);
        free(ans);
    }
    /* a JSON file without an answer is data beside the prompts, not a prompt */
    scratch_write(scratch_path(dir, "index.json", 0), "{\"p0\": {\"tokens\": 12}}\n");
    KvsimRun r = eval_run(env, config, env->model, dir, out, "");
    if (r.status != 0)
        fail_msg("%s", r.err);
    kvsim_run_free(&r);
    char *groups = scratch_read(scratch_path(out, "eval_groups.csv", 0));
    char *all = scratch_read(scratch_path(out, "eval.csv", 1));
    assert_non_null(strstr(groups, "policy,type,group,prompts,questions,correct,accuracy,"
                                   "accuracy_lo,accuracy_hi,agreement_with_full,vs_full_better,"
                                   "vs_full_worse,vs_full_p\n"));
    assert_non_null(strstr(groups, "\nfull,full,a,2,2,"));
    assert_non_null(strstr(groups, "\nfull,full,b,1,1,"));
    static const char *const labels[] = {"full", "wide", "w3"};
    for (int k = 0; k < 3; k++) {
        char fields[16][64], row[80];
        int correct = 0;
        for (int g = 0; g < 2; g++) {
            snprintf(row, sizeof row, "\n%s,%s,%c,", labels[k], k ? "window" : "full", 'a' + g);
            const char *line = strstr(groups, row);
            assert_non_null(line);
            assert_int_equal(csv_row(line + 1, labels[k], fields, 16), 13);
            correct += atoi(fields[5]);
            double acc = atof(fields[6]), lo = atof(fields[7]), hi = atof(fields[8]);
            assert_true(lo <= acc && acc <= hi && lo >= 0 && hi <= 1);
            assert_true(hi > lo); /* one or two questions: a wide interval */
            if (k == 0) /* full against itself: no discordant pair */
                assert_string_equal(fields[12], "1");
        }
        assert_true(csv_row(all, labels[k], fields, 16) >= 5);
        assert_int_equal(correct, atoi(fields[4])); /* the groups add up to eval.csv */
    }
    /* the closed-loop-inapplicable policy has empty fields */
    assert_non_null(strstr(groups, "\nfuture,oracle_future,a,2,2,,,,,,,,\n"));
    free(groups);
    free(all);
    /* without groups: no eval_groups.csv, not even an older one */
    r = eval_run(env, config, env->model, env->prompts, out, "");
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    char *none = scratch_read(scratch_path(out, "eval_groups.csv", 0));
    assert_string_equal(none, "");
    free(none);
    scratch_remove(dir);
    scratch_remove(out);
}

static void expect_one_line_error(KvsimRun r, const char *needle)
{
    assert_int_equal(r.status, 2);
    assert_int_equal(count_lines(r.err), 1);
    assert_non_null(strstr(r.err, needle));
    assert_string_equal(r.out, "");
    kvsim_run_free(&r);
}

static void test_errors(void **state)
{
    Env *env = *state;
    char config[4096], bad[4096];
    snprintf(config, sizeof config, "%s", scratch_path(env->out, "eval.ini", 0));
    snprintf(bad, sizeof bad, "%s", scratch_path(env->out, "bad.ini", 2));
    char *empty = scratch_create(), *missing = scratch_create();
    scratch_write(scratch_path(missing, "lonely.txt", 0), "the thin tin");
    scratch_write(bad, "[policy.x]\ntype = nosuch\n");
    char chunked[4096];
    snprintf(chunked, sizeof chunked, "%s", scratch_path(env->out, "chunked.ini", 2));
    scratch_write(chunked, "[run]\nseed = 1\nprefill_chunk = 16\n[policy.full]\ntype = full\n");

    expect_one_line_error(eval_run(env, config, "/nonexistent-model", env->prompts, env->out, ""),
                          "/nonexistent-model");
    expect_one_line_error(eval_run(env, config, env->model, "/nonexistent-prompts", env->out, ""),
                          "/nonexistent-prompts");
    expect_one_line_error(eval_run(env, config, env->model, empty, env->out, ""), "no prompts");
    expect_one_line_error(eval_run(env, config, env->model, missing, env->out, ""),
                          "lonely.answer");
    expect_one_line_error(eval_run(env, bad, env->model, env->prompts, env->out, ""), "nosuch");
    /* Closed loop prefills the prompt in one pass: chunked prefill is refused at its key. */
    expect_one_line_error(eval_run(env, chunked, env->model, env->prompts, env->out, ""),
                          "chunked.ini:3: prefill_chunk = 16: closed loop prefills the prompt in one "
                          "pass");
    remove(chunked);
    /* A conversation's answer file: one line per question, a fact's turn within range. */
    char *turns = scratch_create();
    scratch_write(scratch_path(turns, "two.txt", 0), "the thin tin? [[generate]] the tin?");
    scratch_write(scratch_path(turns, "two.answer", 1), "tin\n");
    expect_one_line_error(eval_run(env, config, env->model, turns, env->out, ""),
                          "two.answer: 1 answer for the prompt's 2 questions");
    scratch_write(scratch_path(turns, "two.answer", 1), "tin\ntin\nthe\n");
    expect_one_line_error(eval_run(env, config, env->model, turns, env->out, ""),
                          "two.answer:3: more answers than the prompt's 2 questions");
    scratch_write(scratch_path(turns, "two.answer", 1), "tin\t2\ntin\n");
    expect_one_line_error(eval_run(env, config, env->model, turns, env->out, ""),
                          "two.answer:1: after the tab, expected the turn of the fact asked about "
                          "(an integer from 0 to the question's turn, 1)");
    scratch_write(scratch_path(turns, "two.answer", 1), "tin\n\ntin\n");
    expect_one_line_error(eval_run(env, config, env->model, turns, env->out, ""),
                          "two.answer:2: empty answer");
    /* NAME.json and NAME.txt of one NAME */
    scratch_write(scratch_path(turns, "two.answer", 1), "tin\ntin\n");
    scratch_write(scratch_path(turns, "two.json", 2), "[{\"role\": \"user\", \"content\": \"the\"}]");
    expect_one_line_error(eval_run(env, config, env->model, turns, env->out, ""),
                          "two prompts named two (two.json and two.txt");
    scratch_remove(turns);
    KvsimRun r = run_kvsim("eval --model x");
    expect_one_line_error(r, "eval");
    remove(bad);
    scratch_remove(empty);
    scratch_remove(missing);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accuracy_and_determinism),
        cmocka_unit_test(test_conversations),
        cmocka_unit_test(test_json_chat_prompt),
        cmocka_unit_test(test_prompt_groups),
        cmocka_unit_test(test_full_prefill_warning),
        cmocka_unit_test(test_ratio_per_prompt),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
