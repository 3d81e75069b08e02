#include "traces/cmd/eval_cmd.h"

#include <cblas.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/args.h"
#include "sim/replay/config.h"
#include "sim/base/csv.h"
#include "sim/base/pool.h"
#include "sim/base/progress.h"
#include "sim/replay/report.h"
#include "traces/eval/eval.h"
#include "traces/model/model.h"
#include "traces/model/safetensors.h"
#include "traces/cmd/trace_cmd.h"

/* Generated tokens beyond the longest answer's own token count, by default: the continuation
 * may tokenize differently (a leading space, a merge across the answer's end). */
enum { EXTRA_NEW_TOKENS = 8 };

typedef struct {
    char *name;   /* NAME of NAME.txt */
    char *answer; /* the expected answer, trimmed */
    PromptMarkup markup;
    PromptTokens tokens;
} EvalPrompt;

/* What one policy did on one prompt. */
typedef struct {
    bool applicable;
    bool correct;
    char *answer; /* the answer span of the continuation (see answer_span) */
    int n_generated;
    double device_bytes, host_bytes;
} Outcome;

typedef struct {
    const Model *model;
    const Tokenizer *tok;
    const RunConfig *rc;
    const PolicySpec *policies;
    int n_policies;
    EvalPrompt *prompts;
    int n_prompts;
    int max_new;
    Outcome *outcomes; /* [prompt][policy] */
    int32_t **tokens;  /* [thread]: the decode's output buffer, max_new tokens */
    Progress progress; /* (prompt, policy) pairs finished */
} EvalJob;

static bool is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

/* ---- Inputs ---- */

/* The first line of NAME.answer, surrounding whitespace trimmed; anything but whitespace after
 * it is an error (an answer is one line). */
static char *read_answer(const char *path, KvErr *err)
{
    size_t len;
    char *text = kv_read_input(path, 0, &len, err);
    if (!text)
        return NULL;
    size_t start = 0;
    while (start < len && text[start] != '\n' && is_space(text[start]))
        start++;
    size_t end = start;
    while (end < len && text[end] != '\n')
        end++;
    for (size_t i = end; i < len; i++)
        if (!is_space(text[i])) {
            free(text);
            kv_fail(err, "%s:2: expected the answer on one line, found more text after it", path);
            return NULL;
        }
    while (end > start && is_space(text[end - 1]))
        end--;
    if (end == start) {
        free(text);
        kv_fail(err, "%s: empty answer (expected one line of text)", path);
        return NULL;
    }
    char *answer = kv_malloc(end - start + 1);
    memcpy(answer, text + start, end - start);
    answer[end - start] = '\0';
    free(text);
    return answer;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The NAME of every NAME.txt in dir, sorted bytewise (the order of every output). */
static char **list_prompts(const char *dir, int *n, KvErr *err)
{
    DIR *d = opendir(dir);
    if (!d) {
        kv_fail(err, "%s: cannot open the prompts directory: %s", dir, strerror(errno));
        return NULL;
    }
    char **names = NULL;
    int cap = 0;
    *n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t len = strlen(e->d_name);
        if (len <= 4 || strcmp(e->d_name + len - 4, ".txt") != 0)
            continue;
        if (*n == cap)
            names = kv_realloc(names, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *names);
        names[*n] = kv_malloc(len - 3);
        memcpy(names[*n], e->d_name, len - 4);
        names[(*n)++][len - 4] = '\0';
    }
    closedir(d);
    if (*n == 0) {
        free(names);
        kv_fail(err, "%s: no prompts (expected NAME.txt files, each with its NAME.answer)", dir);
        return NULL;
    }
    qsort(names, (size_t)*n, sizeof *names, compare_names);
    return names;
}

static void prompts_free(EvalPrompt *p, int n)
{
    for (int i = 0; p && i < n; i++) {
        free(p[i].name);
        free(p[i].answer);
        prompt_markup_free(&p[i].markup);
        prompt_tokens_free(&p[i].tokens);
    }
    free(p);
}

static EvalPrompt *load_prompts(const char *dir, const Model *model, const Tokenizer *tok,
                                const char *model_dir, int *n, KvErr *err)
{
    char **names = list_prompts(dir, n, err);
    if (!names)
        return NULL;
    EvalPrompt *prompts = kv_calloc((size_t)*n, sizeof *prompts);
    int rc = 0;
    for (int i = 0; i < *n; i++) {
        prompts[i].name = names[i];
        if (rc != 0)
            continue;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s.answer", dir, names[i]);
        if (access(path, F_OK) != 0) {
            rc = kv_fail(err, "%s/%s.txt: no expected answer (%s is missing)", dir, names[i], path);
            continue;
        }
        if (!(prompts[i].answer = read_answer(path, err))) {
            rc = -1;
            continue;
        }
        snprintf(path, sizeof path, "%s/%s.txt", dir, names[i]);
        rc = prompt_file_load(path, tok, model, model_dir, &prompts[i].markup, &prompts[i].tokens,
                              err);
        if (rc == 0 && prompts[i].tokens.n_tokens == 0)
            rc = kv_fail(err, "%s: the prompt has no tokens", path);
        /* One prefill and [[decode]]'s forced tokens: a conversation is not evaluated here. */
        const PromptTokens *pt = &prompts[i].tokens;
        if (rc == 0 && (pt->n_spans > 2 || (pt->n_spans == 2 && pt->spans[1].kind != PROMPT_FORCED)))
            rc = kv_fail(err, "%s: a prompt of several turns (%d spans: later user messages, "
                         "assistant messages or [[generate]]); kvsim eval takes one prompt and "
                         "its [[decode]] text", path, pt->n_spans);
    }
    free(names);
    if (rc != 0) {
        prompts_free(prompts, *n);
        return NULL;
    }
    return prompts;
}

/* ---- Answers ----
 * The continuation's text (decoded generated tokens, EOS excluded) with its leading whitespace
 * skipped; its answer span is its first strlen(expected) bytes (all of it when shorter). The
 * prompt is answered correctly when the span equals the expected answer. */

/* The decoder writes U+FFFD for bytes that do not (yet) form a character: a text ending in it
 * may still change when the next token completes the character. */
static bool ends_unsettled(const char *text)
{
    size_t n = strlen(text);
    return n >= 3 && !memcmp(text + n - 3, "\xEF\xBF\xBD", 3);
}

static const char *skip_space(const char *s)
{
    while (*s && is_space(*s))
        s++;
    return s;
}

typedef struct {
    const Tokenizer *tok;
    const int32_t *tokens; /* the decode's output buffer */
    size_t answer_len;
} AnswerWatch;

/* Stops generating once the continuation holds a whole answer span that the next token cannot
 * change. */
static int answer_complete(void *user, int index, int32_t token, const float *logits)
{
    (void)token, (void)logits;
    const AnswerWatch *w = user;
    char *text = tokenizer_decode(w->tok, w->tokens, index + 1);
    bool complete = strlen(skip_space(text)) >= w->answer_len && !ends_unsettled(text);
    free(text);
    return complete;
}

static char *answer_span(const Tokenizer *tok, const int32_t *tokens, int n, size_t answer_len)
{
    char *text = tokenizer_decode(tok, tokens, n);
    const char *start = skip_space(text);
    size_t len = strlen(start) < answer_len ? strlen(start) : answer_len;
    char *span = kv_malloc(len + 1);
    memcpy(span, start, len);
    span[len] = '\0';
    free(text);
    return span;
}

/* ---- The work: one prompt at a time per worker, every policy on it ---- */

static int eval_prompt(EvalJob *job, int pi, int32_t *tokens, KvErr *err)
{
    const EvalPrompt *p = &job->prompts[pi];
    char origin[4400];
    snprintf(origin, sizeof origin, "prompt %s", p->name);
    EvalPrefill *pf = eval_prefill(job->model, &p->tokens, p->markup.last_segment, job->max_new,
                                   origin, err);
    if (!pf)
        return -1;
    AnswerWatch watch = {job->tok, tokens, strlen(p->answer)};
    EvalHooks hooks = {.user = &watch, .on_token = answer_complete};
    for (int k = 0; k < job->n_policies; k++) {
        EvalDecode d;
        if (eval_decode(pf, &job->policies[k], job->rc->engine.seed, job->rc->engine.kv_bits,
                        job->tok, &hooks, tokens, &d, err) != 0) {
            eval_prefill_free(pf);
            return -1;
        }
        Outcome *o = &job->outcomes[(size_t)pi * job->n_policies + k];
        o->applicable = d.applicable;
        if (d.applicable) {
            o->answer = answer_span(job->tok, tokens, d.n_generated, watch.answer_len);
            o->correct = !strcmp(o->answer, p->answer);
            o->n_generated = d.n_generated;
            o->device_bytes = d.device_bytes;
            o->host_bytes = d.host_bytes;
        }
        progress_add(&job->progress, 1);
    }
    eval_prefill_free(pf);
    return 0;
}

/* Prompt pi, every policy on it; the pool reports the lowest failing prompt, the one a single
 * thread would report. */
static int eval_task(void *ctx, int pi, int slot, KvErr *err)
{
    EvalJob *job = ctx;
    return eval_prompt(job, pi, job->tokens[slot], err);
}

static int run_job(EvalJob *job, int threads, bool progress, KvErr *err)
{
    /* Parallelism is across prompts; BLAS inside a worker stays single-threaded, so every
     * number is computed the same way at any thread count. */
    openblas_set_num_threads(1);
    Pool *pool = pool_create(pool_threads_for(threads, job->n_prompts));
    job->tokens = kv_calloc((size_t)pool_size(pool), sizeof *job->tokens);
    for (int i = 0; i < pool_size(pool); i++)
        job->tokens[i] = kv_malloc((size_t)job->max_new * sizeof **job->tokens);
    progress_begin(&job->progress, progress, "eval", "prompt-policy decodes",
                   (long)job->n_prompts * job->n_policies);
    int rc = pool_for(pool, job->n_prompts, eval_task, job, err);
    progress_end(&job->progress);
    for (int i = 0; i < pool_size(pool); i++)
        free(job->tokens[i]);
    free(job->tokens);
    pool_free(pool);
    return rc;
}

/* ---- Outputs ---- */

/* Not applicable (a policy that needs the future): the numbers are NaN, which the table on
 * stdout prints as "-"; eval.csv has empty fields (write_eval_csv tests `applicable`). */
typedef struct {
    bool applicable;
    int prompts, correct, agree;
    double accuracy, agreement, device_bytes, host_bytes, generated;
} PolicyScore;

/* Reduced in prompt order: the same numbers at any thread count. full is the reference
 * policy's index. */
static void score_policies(const EvalJob *job, int full, PolicyScore *s)
{
    for (int k = 0; k < job->n_policies; k++) {
        PolicyScore *ps = &s[k];
        memset(ps, 0, sizeof *ps);
        ps->applicable = job->outcomes[k].applicable;
        ps->prompts = job->n_prompts;
        for (int i = 0; i < job->n_prompts && ps->applicable; i++) {
            const Outcome *o = &job->outcomes[(size_t)i * job->n_policies + k];
            const Outcome *f = &job->outcomes[(size_t)i * job->n_policies + full];
            ps->correct += o->correct;
            ps->agree += !strcmp(o->answer, f->answer);
            ps->device_bytes += o->device_bytes;
            ps->host_bytes += o->host_bytes;
            ps->generated += o->n_generated;
        }
        if (ps->applicable) {
            ps->accuracy = (double)ps->correct / ps->prompts;
            ps->agreement = (double)ps->agree / ps->prompts;
            ps->device_bytes /= ps->prompts;
            ps->host_bytes /= ps->prompts;
            ps->generated /= ps->prompts;
        } else {
            ps->accuracy = ps->agreement = ps->device_bytes = ps->host_bytes = NAN;
            ps->generated = NAN;
        }
    }
}

/* A policy that does not apply in closed loop has empty fields from `correct` on. */
static int write_eval_csv(const EvalJob *job, const PolicyScore *s, const char *dir, KvErr *err)
{
    CsvFile c;
    if (csv_create(&c, dir, "eval.csv",
                   "policy,type,prompts,correct,accuracy,agreement_with_full,device_bytes_mean,"
                   "host_bytes_mean,generated_tokens_mean",
                   err) != 0)
        return -1;
    for (int k = 0; k < job->n_policies; k++) {
        csv_put_text(&c, job->policies[k].label);
        csv_put_text(&c, job->policies[k].type->name);
        csv_put_int(&c, s[k].prompts);
        if (s[k].applicable) {
            csv_put_int(&c, s[k].correct);
            csv_put_num(&c, s[k].accuracy);
            csv_put_num(&c, s[k].agreement);
            csv_put_count(&c, s[k].device_bytes);
            csv_put_count(&c, s[k].host_bytes);
            csv_put_num(&c, s[k].generated);
        } else {
            for (int i = 0; i < 6; i++)
                csv_put_empty(&c);
        }
        csv_end_row(&c);
    }
    return csv_commit(&c, err);
}

static int write_prompts_csv(const EvalJob *job, int full, const char *dir, KvErr *err)
{
    CsvFile c;
    if (csv_create(&c, dir, "eval_prompts.csv",
                   "policy,prompt,correct,agrees_with_full,generated_tokens,device_bytes,"
                   "host_bytes,answer,expected",
                   err) != 0)
        return -1;
    for (int k = 0; k < job->n_policies; k++)
        for (int i = 0; i < job->n_prompts; i++) {
            const Outcome *o = &job->outcomes[(size_t)i * job->n_policies + k];
            const Outcome *f = &job->outcomes[(size_t)i * job->n_policies + full];
            if (!o->applicable)
                continue;
            csv_put_text(&c, job->policies[k].label);
            csv_put_text(&c, job->prompts[i].name);
            csv_put_int(&c, o->correct);
            csv_put_int(&c, !strcmp(o->answer, f->answer));
            csv_put_int(&c, o->n_generated);
            csv_put_count(&c, o->device_bytes);
            csv_put_count(&c, o->host_bytes);
            csv_put_text(&c, o->answer);
            csv_put_text(&c, job->prompts[i].answer);
            csv_end_row(&c);
        }
    return csv_commit(&c, err);
}

static void print_table(const EvalJob *job, const PolicyScore *s, FILE *out)
{
    int w = 6;
    for (int k = 0; k < job->n_policies; k++)
        if ((int)strlen(job->policies[k].label) > w)
            w = (int)strlen(job->policies[k].label);
    fprintf(out, "%-*s  %-13s %8s %8s %7s %10s %10s\n", w, "policy", "type", "correct",
            "accuracy", "agree", "device", "host");
    for (int k = 0; k < job->n_policies; k++) {
        char dev[32], host[32], correct[32], acc[16], agree[16];
        format_bytes(s[k].device_bytes, dev, sizeof dev);
        format_bytes(s[k].host_bytes, host, sizeof host);
        if (s[k].applicable) {
            snprintf(correct, sizeof correct, "%d/%d", s[k].correct, s[k].prompts);
            snprintf(acc, sizeof acc, "%.3f", s[k].accuracy);
            snprintf(agree, sizeof agree, "%.3f", s[k].agreement);
        } else {
            snprintf(correct, sizeof correct, "n/a");
            snprintf(acc, sizeof acc, "-");
            snprintf(agree, sizeof agree, "-");
        }
        fprintf(out, "%-*s  %-13s %8s %8s %7s %10s %10s\n", w, job->policies[k].label,
                job->policies[k].type->name, correct, acc, agree, dev, host);
    }
}

/* ---- The command ---- */

/* The reference policy: the first of type full, else one added in front labelled "full". */
static int reference_policy(RunConfig *rc, PolicySpec **policies, int *n, KvErr *err)
{
    const EngineConfig *e = &rc->engine;
    for (int k = 0; k < e->n_policies; k++)
        if (!strcmp(e->policies[k].type->name, "full")) {
            *policies = e->policies;
            *n = e->n_policies;
            return k;
        }
    for (int k = 0; k < e->n_policies; k++)
        if (!strcmp(e->policies[k].label, "full"))
            return kv_fail(err, "%s: [policy.full] is not of type full, and eval needs a full "
                           "reference: rename it or add one of type full", rc->config_path);
    *n = e->n_policies + 1;
    *policies = kv_calloc((size_t)*n, sizeof **policies);
    const PolicyType *full = policy_find("full");
    strcpy((*policies)[0].label, "full");
    (*policies)[0].type = full;
    (*policies)[0].params = kv_calloc(1, full->params_size);
    policy_params_defaults(full, (*policies)[0].params);
    memcpy(*policies + 1, e->policies, (size_t)e->n_policies * sizeof **policies);
    return 0;
}

typedef struct {
    const char *config, *model_dir, *prompts_dir, *out_dir;
    int threads, max_new, quiet;
} EvalOptions;

static int eval_main(const EvalOptions *o, KvErr *err)
{
    RunConfig rc;
    if (config_load(o->config, &rc, err) != 0)
        return -1;
    if (config_check_closed_loop(&rc, err) != 0) {
        config_free(&rc);
        return -1;
    }
    if (o->out_dir)
        snprintf(rc.out_dir, sizeof rc.out_dir, "%s", o->out_dir);
    Model *model = NULL;
    Tokenizer *tok = NULL;
    EvalPrompt *prompts = NULL;
    PolicySpec *policies = NULL;
    Outcome *outcomes = NULL;
    PolicyScore *scores = NULL;
    int n_prompts = 0, n_policies = 0, rc_status = -1;
    int full = reference_policy(&rc, &policies, &n_policies, err);
    if (full < 0)
        goto done;
    if (!(model = model_load(o->model_dir, err)) ||
        config_check_model(&rc, o->model_dir, model->config.n_layers, model->config.n_q_heads,
                           model->config.head_dim, ROPE_HALF, err) != 0 || /* as eval.c runs it */
        !(tok = checkpoint_tokenizer_load(o->model_dir, err)) ||
        !(prompts = load_prompts(o->prompts_dir, model, tok, o->model_dir, &n_prompts, err)))
        goto done;
    int max_new = o->max_new;
    if (max_new == 0)
        for (int i = 0; i < n_prompts; i++) {
            int32_t *ids;
            int n;
            if (tokenizer_encode(tok, prompts[i].answer, strlen(prompts[i].answer), &ids, &n,
                                 err) != 0)
                goto done;
            free(ids);
            if (n + EXTRA_NEW_TOKENS > max_new)
                max_new = n + EXTRA_NEW_TOKENS;
        }
    if (policies != rc.engine.policies && !o->quiet)
        fprintf(stderr, "kvsim eval: no policy of type full in %s: added one, labelled full, "
                "as the reference\n", o->config);

    outcomes = kv_calloc((size_t)n_prompts * n_policies, sizeof *outcomes);
    EvalJob job = {.model = model, .tok = tok, .rc = &rc, .policies = policies,
                   .n_policies = n_policies, .prompts = prompts, .n_prompts = n_prompts,
                   .max_new = max_new, .outcomes = outcomes};
    double started = now_seconds();
    int threads = o->threads >= 0 ? o->threads : rc.engine.threads;
    if (run_job(&job, threads, !o->quiet && isatty(STDERR_FILENO), err) != 0)
        goto done;
    scores = kv_calloc((size_t)n_policies, sizeof *scores);
    score_policies(&job, full, scores);
    if (make_dirs(rc.out_dir, err) != 0 || write_eval_csv(&job, scores, rc.out_dir, err) != 0 ||
        write_prompts_csv(&job, full, rc.out_dir, err) != 0)
        goto done;
    if (!o->quiet) {
        printf("eval %s: %s, %d prompts, %d policies, up to %d new tokens, %.1fs\n", o->config,
               o->model_dir, n_prompts, n_policies, max_new, now_seconds() - started);
        print_table(&job, scores, stdout);
        for (int k = 0; k < n_policies; k++)
            if (!scores[k].applicable)
                printf("%s: not applicable in closed loop (%s needs the future of the run, "
                       "which depends on the policy itself)\n", policies[k].label,
                       policies[k].type->name);
        printf("wrote %s/eval.csv, eval_prompts.csv\n", rc.out_dir);
    }
    rc_status = 0;
done:
    for (int i = 0; outcomes && i < n_prompts * n_policies; i++)
        free(outcomes[i].answer);
    free(outcomes);
    free(scores);
    if (policies && policies != rc.engine.policies) {
        free(policies[0].params);
        free(policies);
    }
    prompts_free(prompts, n_prompts);
    if (tok)
        tokenizer_free(tok);
    model_free(model);
    config_free(&rc);
    return rc_status;
}

int cmd_eval(int argc, char **argv)
{
    EvalOptions o = {.threads = -1};
    const ArgSpec specs[] = {
        {"model", ARG_STRING, &o.model_dir, 0, 0, NULL,
         "Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)"},
        {"prompts", ARG_STRING, &o.prompts_dir, 0, 0, NULL,
         "directory of NAME.txt prompts, each with its NAME.answer"},
        {"out", ARG_STRING, &o.out_dir, 0, 0, NULL, "output directory (default: [run] out)"},
        {"threads", ARG_INT, &o.threads, -1, 1024, NULL,
         "prompts evaluated in parallel; 0 = all cores, -1 = [run] threads"},
        {"max-new", ARG_INT, &o.max_new, 0, 1 << 20, NULL,
         "most generated tokens per prompt; 0 = longest answer's tokens + 8"},
        {"quiet", ARG_FLAG, &o.quiet, 0, 0, NULL, "no table, no progress"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage = "eval CONFIG.ini --model DIR --prompts DIR [options]\n"
                        "  Decodes every prompt greedily under each policy of CONFIG evicting from "
                        "the live KV cache,\n  and reports exact-answer accuracy next to full "
                        "(docs/eval.md).";
    const char *positional[1];
    int status = args_start(argc, argv, specs, usage, positional, 1);
    if (status >= 0)
        return status;
    KvErr err;
    if (!o.model_dir || !o.prompts_dir) {
        fprintf(stderr, "kvsim: eval: needs CONFIG.ini, --model DIR and --prompts DIR "
                        "(kvsim eval --help)\n");
        return 2;
    }
    o.config = positional[0];
    if (eval_main(&o, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    return 0;
}
