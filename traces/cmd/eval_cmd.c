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
#include "sim/base/provenance.h"
#include "sim/base/stats.h"
#include "sim/replay/report.h"
#include "traces/eval/eval.h"
#include "traces/model/model.h"
#include "traces/model/safetensors.h"
#include "traces/cmd/trace_cmd.h"

/* Generated tokens beyond the longest answer's own token count, by default: the continuation
 * may tokenize differently (a leading space, a merge across the answer's end). */
enum { EXTRA_NEW_TOKENS = 8 };

/* One expected answer: a line of NAME.answer. */
typedef struct {
    char *text;    /* trimmed */
    int fact_turn; /* the turn (segment) holding the fact asked about; -1: not given */
} Expected;

typedef struct {
    char *name; /* NAME of NAME.txt or NAME.json */
    char *file; /* NAME.txt or NAME.json */
    int n_questions;   /* eval_questions(): one answer per generation point */
    Expected *answers; /* [n_questions] */
    int *turns;        /* [n_questions]: each question's turn (question_turns) */
    int group;         /* index of markup.group in the sorted groups of the set (prompt_groups) */
    PromptMarkup markup;
    PromptTokens tokens;
} EvalPrompt;

/* What one policy answered to one question. */
typedef struct {
    bool correct;
    char *answer; /* the answer span of the continuation (see answer_span) */
    int n_generated;
} Reply;

/* What one policy did on one prompt. */
typedef struct {
    bool applicable;
    Reply *replies; /* [n_questions] */
    double device_bytes, host_bytes; /* after the last answer */
} Outcome;

typedef struct {
    const Model *model;
    const Tokenizer *tok;
    const RunConfig *rc;
    const PolicySpec *policies;
    int n_policies;
    EvalPrompt *prompts;
    int n_prompts;
    int max_new;       /* per question */
    int max_questions; /* of any prompt */
    Outcome *outcomes; /* [prompt][policy] */
    int32_t **tokens;  /* [thread]: the decode's output buffer, max_questions x max_new */
    Progress progress; /* (prompt, policy) pairs finished */
} EvalJob;

static bool is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

/* ---- Inputs ---- */

/* NAME.answer: one line per question, in order (a single prompt has one). A line is the
 * expected answer, surrounding whitespace trimmed, optionally followed by a tab and the turn that
 * holds the fact asked about (an integer from 0 to the question's turn), for accuracy by turn
 * distance. Blank lines after the last answer are ignored. turns[q] is question q's turn. */
static Expected *read_answers(const char *path, int n_questions, const int *turns, KvErr *err)
{
    size_t len;
    char *text = kv_read_input(path, 0, &len, err);
    if (!text)
        return NULL;
    Expected *ans = kv_calloc((size_t)n_questions, sizeof *ans);
    int n = 0, line = 0, rc = 0;
    for (size_t pos = 0; pos < len && rc == 0;) {
        size_t end = pos;
        while (end < len && text[end] != '\n')
            end++;
        line++;
        size_t a = pos, b = end;
        pos = end + 1;
        while (a < b && is_space(text[a]))
            a++;
        if (a == b) {
            /* blank: allowed only after the last answer */
            for (size_t i = pos; i < len && rc == 0; i++)
                if (!is_space(text[i]))
                    rc = kv_fail(err, "%s:%d: empty answer (expected one non-empty line per "
                                 "question)", path, line);
            break;
        }
        if (n == n_questions) {
            rc = kv_fail(err, "%s:%d: more answers than the prompt's %d question%s (one line per "
                         "[[generate]], then the final answer)", path, line, n_questions,
                         n_questions == 1 ? "" : "s");
            break;
        }
        size_t tab = a;
        while (tab < b && text[tab] != '\t')
            tab++;
        ans[n].fact_turn = -1;
        if (tab < b) {
            char *endp;
            size_t f = tab + 1;
            while (f < b && is_space(text[f]))
                f++;
            errno = 0;
            long turn = f < b ? strtol(text + f, &endp, 10) : -1;
            while (f < b && endp < text + b && is_space(*endp))
                endp++;
            if (f == b || errno || endp != text + b || turn < 0 || turn > turns[n]) {
                rc = kv_fail(err, "%s:%d: after the tab, expected the turn of the fact asked about "
                             "(an integer from 0 to the question's turn, %d)", path, line,
                             turns[n]);
                break;
            }
            ans[n].fact_turn = (int)turn;
            b = tab;
        }
        while (b > a && is_space(text[b - 1]))
            b--;
        if (b == a) {
            rc = kv_fail(err, "%s:%d: empty answer before the tab", path, line);
            break;
        }
        ans[n].text = kv_malloc(b - a + 1);
        memcpy(ans[n].text, text + a, b - a);
        ans[n++].text[b - a] = '\0';
    }
    if (rc == 0 && n < n_questions)
        rc = kv_fail(err, "%s: %d answer%s for the prompt's %d question%s (one line per "
                     "[[generate]], then the final answer)", path, n, n == 1 ? "" : "s",
                     n_questions, n_questions == 1 ? "" : "s");
    free(text);
    if (rc != 0) {
        for (int i = 0; i < n_questions; i++)
            free(ans[i].text);
        free(ans);
        return NULL;
    }
    return ans;
}

/* The turn (segment) of each question of a tokenized prompt: at a generation point, the segment
 * of the token before it; the final generation's, last_segment. */
static int *question_turns(const PromptTokens *pt, int last_segment)
{
    int *turns = kv_malloc((size_t)eval_questions(pt) * sizeof *turns), q = 0;
    for (int s = 0; s < pt->n_spans; s++)
        if (pt->spans[s].kind == PROMPT_GENERATE)
            turns[q++] = pt->segments[pt->spans[s].start - 1];
    turns[q] = last_segment;
    return turns;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The prompt file's extension: ".txt" or ".json" (a chat, or text: prompt_file_load decides by
 * the contents), else NULL. */
static const char *prompt_extension(const char *file)
{
    size_t len = strlen(file);
    if (len > 4 && !strcmp(file + len - 4, ".txt"))
        return ".txt";
    if (len > 5 && !strcmp(file + len - 5, ".json"))
        return ".json";
    return NULL;
}

/* Every NAME.txt and NAME.json in dir, sorted bytewise (the order of every output); two files of
 * one NAME are an error. A NAME.json without NAME.answer beside it is not a prompt but data (the
 * held-out set's index.json), left alone; a NAME.txt without one is an error later. */
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
        const char *ext = prompt_extension(e->d_name);
        if (!ext)
            continue;
        if (!strcmp(ext, ".json")) {
            char answer[4400];
            snprintf(answer, sizeof answer, "%s/%.*s.answer", dir,
                     (int)(strlen(e->d_name) - strlen(ext)), e->d_name);
            if (access(answer, F_OK) != 0)
                continue;
        }
        if (*n == cap)
            names = kv_realloc(names, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *names);
        names[(*n)++] = kv_strdup(e->d_name);
    }
    closedir(d);
    if (*n == 0) {
        free(names);
        kv_fail(err, "%s: no prompts (expected NAME.txt or NAME.json files, each with its "
                "NAME.answer)", dir);
        return NULL;
    }
    qsort(names, (size_t)*n, sizeof *names, compare_names);
    for (int i = 0; i < *n; i++)
        for (int j = i + 1; j < *n; j++) {
            size_t a = strlen(names[i]) - strlen(prompt_extension(names[i]));
            size_t b = strlen(names[j]) - strlen(prompt_extension(names[j]));
            if (a == b && !memcmp(names[i], names[j], a)) {
                kv_fail(err, "%s: two prompts named %.*s (%s and %s; expected one file per NAME)",
                        dir, (int)a, names[i], names[i], names[j]);
                for (int k = 0; k < *n; k++)
                    free(names[k]);
                free(names);
                return NULL;
            }
        }
    return names;
}

static void prompts_free(EvalPrompt *p, int n)
{
    for (int i = 0; p && i < n; i++) {
        free(p[i].name);
        free(p[i].file);
        for (int q = 0; p[i].answers && q < p[i].n_questions; q++)
            free(p[i].answers[q].text);
        free(p[i].answers);
        free(p[i].turns);
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
        prompts[i].file = names[i];
        size_t stem = strlen(names[i]) - strlen(prompt_extension(names[i]));
        prompts[i].name = kv_malloc(stem + 1);
        memcpy(prompts[i].name, names[i], stem);
        prompts[i].name[stem] = '\0';
        if (rc != 0)
            continue;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s.answer", dir, prompts[i].name);
        if (access(path, F_OK) != 0) {
            rc = kv_fail(err, "%s/%s: no expected answer (%s is missing)", dir, names[i], path);
            continue;
        }
        char txt[4400];
        snprintf(txt, sizeof txt, "%s/%s", dir, names[i]);
        rc = prompt_file_load(txt, tok, model, model_dir, &prompts[i].markup, &prompts[i].tokens,
                              err);
        if (rc == 0 && prompts[i].tokens.n_tokens == 0)
            rc = kv_fail(err, "%s: the prompt has no tokens", txt);
        if (rc != 0)
            continue;
        const PromptTokens *pt = &prompts[i].tokens;
        /* A generation point needs the token before it (its logits) */
        if (pt->n_spans > 1 && pt->spans[1].kind == PROMPT_GENERATE && pt->spans[1].start == 0)
            rc = kv_fail(err, "%s: [[generate]] before any token", txt);
        prompts[i].n_questions = eval_questions(pt);
        prompts[i].turns = question_turns(pt, prompts[i].markup.last_segment);
        if (rc == 0 && !(prompts[i].answers = read_answers(path, prompts[i].n_questions,
                                                           prompts[i].turns, err)))
            rc = -1;
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
    const int32_t *tokens; /* the decode's output buffer: [question][max_new] */
    int max_new;
    const Expected *answers;
} AnswerWatch;

/* Stops an answer once its continuation holds a whole answer span that the next token cannot
 * change. */
static int answer_complete(void *user, int question, int index, int32_t token,
                           const float *logits)
{
    (void)token, (void)logits;
    const AnswerWatch *w = user;
    char *text = tokenizer_decode(w->tok, w->tokens + (size_t)question * w->max_new, index + 1);
    bool complete = strlen(skip_space(text)) >= strlen(w->answers[question].text) &&
                    !ends_unsettled(text);
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

/* Under [run] ratio, the policies as they run on prompt p: a copy of job->policies with the
 * budget the ratio gives for the prompt's first prefill span (its n_prompt, as a trace's);
 * NULL without a ratio (job->policies run as they are). On an error, *rc = -1. */
static PolicySpec *prompt_policies(const EvalJob *job, const EvalPrompt *p, int *rc, KvErr *err)
{
    const RunConfig *cfg = job->rc;
    if (!(cfg->ratio > 0))
        return NULL;
    PolicySpec *specs = kv_malloc((size_t)job->n_policies * sizeof *specs);
    for (int k = 0; k < job->n_policies; k++) {
        specs[k] = job->policies[k];
        specs[k].params = kv_malloc(specs[k].type->params_size);
        memcpy(specs[k].params, job->policies[k].params, specs[k].type->params_size);
    }
    char context[4400];
    snprintf(context, sizeof context, "the %d-token prompt %s", p->tokens.n_prompt, p->file);
    /* the config's policies follow the added reference, if any */
    int first = job->policies == cfg->engine.policies ? 0 : 1;
    if (config_apply_budget(cfg, specs + first, config_ratio_budget(cfg, p->tokens.n_prompt),
                            context, err) != 0)
        *rc = -1;
    return specs;
}

static int eval_prompt(EvalJob *job, int pi, int32_t *tokens, KvErr *err)
{
    const EvalPrompt *p = &job->prompts[pi];
    EvalPrefill *pf = eval_prefill(job->model, &p->tokens, p->markup.last_segment, job->max_new,
                                   job->rc->engine.history);
    eval_set_sliding_layers(pf, job->rc->engine.sliding_layers);
    AnswerWatch watch = {job->tok, tokens, job->max_new, p->answers};
    EvalHooks hooks = {.user = &watch, .on_token = answer_complete};
    EvalAnswer *ans = kv_calloc((size_t)p->n_questions, sizeof *ans);
    int rc = 0;
    PolicySpec *own = prompt_policies(job, p, &rc, err);
    const PolicySpec *specs = own ? own : job->policies;
    for (int k = 0; k < job->n_policies && rc == 0; k++) {
        EvalDecode d;
        if (eval_decode(pf, &specs[k], job->rc->engine.seed, job->rc->engine.kv_bits,
                        job->tok, &hooks, tokens, ans, &d, err) != 0) {
            rc = -1;
            break;
        }
        Outcome *o = &job->outcomes[(size_t)pi * job->n_policies + k];
        o->applicable = d.applicable;
        if (d.applicable) {
            o->replies = kv_calloc((size_t)p->n_questions, sizeof *o->replies);
            for (int q = 0; q < p->n_questions; q++) {
                Reply *r = &o->replies[q];
                r->answer = answer_span(job->tok, tokens + (size_t)q * job->max_new,
                                        ans[q].n_generated, strlen(p->answers[q].text));
                r->correct = !strcmp(r->answer, p->answers[q].text);
                r->n_generated = ans[q].n_generated;
            }
            o->device_bytes = d.device_bytes;
            o->host_bytes = d.host_bytes;
        }
        progress_add(&job->progress, 1);
    }
    for (int k = 0; own && k < job->n_policies; k++)
        free(own[k].params);
    free(own);
    free(ans);
    eval_prefill_free(pf);
    return rc;
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
        job->tokens[i] = kv_malloc((size_t)job->max_questions * job->max_new *
                                   sizeof **job->tokens);
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

/* A policy's score over a set of questions. Not applicable (a policy that needs the future): the
 * numbers are NaN, which the table on stdout prints as "-"; the CSVs have empty fields. */
typedef struct {
    bool applicable;
    int prompts, questions, correct, agree;
    double accuracy, accuracy_lo, accuracy_hi; /* and its Wilson 95% interval */
    double agreement, device_bytes, host_bytes, generated;
} PolicyScore;

/* Which questions a score counts: every one, those of a turn, those at a distance, those of a
 * prompt group. */
typedef enum { BY_ALL, BY_TURN, BY_DISTANCE, BY_GROUP } ScoreBy;

static bool question_counts(const EvalPrompt *p, int q, ScoreBy by, int value)
{
    switch (by) {
    case BY_TURN:
        return p->turns[q] == value;
    case BY_DISTANCE:
        return p->answers[q].fact_turn >= 0 && p->turns[q] - p->answers[q].fact_turn == value;
    case BY_GROUP:
        return p->group == value;
    default:
        return true;
    }
}

/* Policy k's score over the questions `by` selects, reduced in prompt order: the same numbers at
 * any thread count. full is the reference policy's index. Bytes are means over prompts (at
 * each prompt's last answer), generated tokens a mean over questions. */
static void score_policy(const EvalJob *job, int k, int full, ScoreBy by, int value,
                         PolicyScore *ps)
{
    memset(ps, 0, sizeof *ps);
    ps->applicable = job->outcomes[k].applicable;
    for (int i = 0; i < job->n_prompts; i++) {
        const EvalPrompt *p = &job->prompts[i];
        const Outcome *o = &job->outcomes[(size_t)i * job->n_policies + k];
        const Outcome *f = &job->outcomes[(size_t)i * job->n_policies + full];
        int counted = 0;
        for (int q = 0; q < p->n_questions; q++) {
            if (!question_counts(p, q, by, value))
                continue;
            counted++;
            if (!ps->applicable)
                continue;
            ps->correct += o->replies[q].correct;
            ps->agree += !strcmp(o->replies[q].answer, f->replies[q].answer);
            ps->generated += o->replies[q].n_generated;
        }
        ps->questions += counted;
        ps->prompts += counted > 0;
        if (counted && ps->applicable) {
            ps->device_bytes += o->device_bytes;
            ps->host_bytes += o->host_bytes;
        }
    }
    if (ps->applicable && ps->questions > 0) {
        ps->accuracy = (double)ps->correct / ps->questions;
        wilson_interval(ps->correct, ps->questions, &ps->accuracy_lo, &ps->accuracy_hi);
        ps->agreement = (double)ps->agree / ps->questions;
        ps->device_bytes /= ps->prompts;
        ps->host_bytes /= ps->prompts;
        ps->generated /= ps->questions;
    } else {
        ps->accuracy = ps->agreement = ps->device_bytes = ps->host_bytes = NAN;
        ps->accuracy_lo = ps->accuracy_hi = NAN;
        ps->generated = NAN;
    }
}

/* The columns from `correct` on; empty where the policy does not apply in closed loop. */
static void put_score(CsvFile *c, const PolicyScore *s, bool with_bytes)
{
    if (!s->applicable) {
        for (int i = 0; i < (with_bytes ? 8 : 5); i++)
            csv_put_empty(c);
        return;
    }
    csv_put_int(c, s->correct);
    csv_put_num(c, s->accuracy);
    csv_put_num(c, s->accuracy_lo);
    csv_put_num(c, s->accuracy_hi);
    csv_put_num(c, s->agreement);
    if (with_bytes) {
        csv_put_count(c, s->device_bytes);
        csv_put_count(c, s->host_bytes);
        csv_put_num(c, s->generated);
    }
}

/* Policy k against policy ref on the same questions (both applicable), those `by` selects:
 * `better` questions k answered correctly and ref did not, `worse` the reverse, and the exact
 * McNemar p-value of the difference. */
typedef struct {
    int better, worse;
    double p;
} Paired;

static Paired paired_test(const EvalJob *job, int k, int ref, ScoreBy by, int value)
{
    Paired r = {0, 0, NAN};
    for (int i = 0; i < job->n_prompts; i++) {
        const Outcome *o = &job->outcomes[(size_t)i * job->n_policies + k];
        const Outcome *f = &job->outcomes[(size_t)i * job->n_policies + ref];
        for (int q = 0; q < job->prompts[i].n_questions; q++) {
            if (!question_counts(&job->prompts[i], q, by, value))
                continue;
            r.better += o->replies[q].correct && !f->replies[q].correct;
            r.worse += !o->replies[q].correct && f->replies[q].correct;
        }
    }
    r.p = mcnemar_exact_p(r.better, r.worse);
    return r;
}

/* The best policy: the highest accuracy of the applicable policies other than the reference,
 * the first in config order among equals; -1 when there is none. */
static int best_policy(const EvalJob *job, const PolicyScore *s, int full)
{
    int best = -1;
    for (int k = 0; k < job->n_policies; k++)
        if (k != full && s[k].applicable && (best < 0 || s[k].correct > s[best].correct))
            best = k;
    return best;
}

static int write_eval_csv(const EvalJob *job, const PolicyScore *s, int full, const char *dir,
                          KvErr *err)
{
    CsvFile c;
    if (csv_create(&c, dir, "eval.csv",
                   "policy,type,prompts,questions,correct,accuracy,accuracy_lo,accuracy_hi,"
                   "agreement_with_full,device_bytes_mean,host_bytes_mean,generated_tokens_mean,"
                   "vs_full_better,vs_full_worse,vs_full_p,vs_best_p",
                   err) != 0)
        return -1;
    int best = best_policy(job, s, full);
    for (int k = 0; k < job->n_policies; k++) {
        csv_put_text(&c, job->policies[k].label);
        csv_put_text(&c, job->policies[k].type->name);
        csv_put_int(&c, s[k].prompts);
        csv_put_int(&c, s[k].questions);
        put_score(&c, &s[k], true);
        if (s[k].applicable) {
            Paired vs_full = paired_test(job, k, full, BY_ALL, 0);
            csv_put_int(&c, vs_full.better);
            csv_put_int(&c, vs_full.worse);
            csv_put_num(&c, vs_full.p);
            if (best >= 0)
                csv_put_num(&c, paired_test(job, k, best, BY_ALL, 0).p);
            else
                csv_put_empty(&c);
        } else {
            for (int i = 0; i < 4; i++)
                csv_put_empty(&c);
        }
        csv_end_row(&c);
    }
    return csv_commit(&c, err);
}

/* The distinct values `by` takes over every question (distances: only where NAME.answer gives
 * the fact's turn), ascending, into vals (room for every question); returns their count. */
static int score_keys(const EvalJob *job, ScoreBy by, int *vals)
{
    int n = 0;
    for (int i = 0; i < job->n_prompts; i++) {
        const EvalPrompt *p = &job->prompts[i];
        for (int q = 0; q < p->n_questions; q++) {
            if (by == BY_DISTANCE && p->answers[q].fact_turn < 0)
                continue;
            int v = by == BY_TURN ? p->turns[q] : p->turns[q] - p->answers[q].fact_turn;
            int j = 0;
            while (j < n && vals[j] < v)
                j++;
            if (j < n && vals[j] == v)
                continue;
            memmove(vals + j + 1, vals + j, (size_t)(n - j) * sizeof *vals);
            vals[j] = v;
            n++;
        }
    }
    return n;
}

/* eval_turns.csv: policy x question turn, then policy x turn distance (where given). */
static int write_turns_csv(const EvalJob *job, int full, const char *dir, KvErr *err)
{
    CsvFile c;
    if (csv_create(&c, dir, "eval_turns.csv",
                   "policy,type,history,by,value,questions,correct,accuracy,accuracy_lo,accuracy_hi,"
                   "agreement_with_full",
                   err) != 0)
        return -1;
    int n_questions = 0;
    for (int i = 0; i < job->n_prompts; i++)
        n_questions += job->prompts[i].n_questions;
    int *vals = kv_malloc((size_t)n_questions * sizeof *vals);
    static const ScoreBy bys[] = {BY_TURN, BY_DISTANCE};
    static const char *const by_names[] = {"turn", "distance"};
    for (int b = 0; b < 2; b++) {
        int n_vals = score_keys(job, bys[b], vals);
        for (int k = 0; k < job->n_policies; k++)
            for (int v = 0; v < n_vals; v++) {
                PolicyScore ps;
                score_policy(job, k, full, bys[b], vals[v], &ps);
                csv_put_text(&c, job->policies[k].label);
                csv_put_text(&c, job->policies[k].type->name);
                csv_put_text(&c, run_history_name(job->rc->engine.history));
                csv_put_text(&c, by_names[b]);
                csv_put_int(&c, vals[v]);
                csv_put_int(&c, ps.questions);
                put_score(&c, &ps, false);
                csv_end_row(&c);
            }
    }
    free(vals);
    return csv_commit(&c, err);
}

/* The distinct [[group=NAME]]s of the prompts, sorted bytewise ("": the prompts without one,
 * first when there are such), into names (room for every prompt); sets each prompt's group
 * index and returns the count. */
static int prompt_groups(EvalJob *job, const char **names)
{
    int n = 0;
    for (int i = 0; i < job->n_prompts; i++) {
        const char *g = job->prompts[i].markup.group;
        int j = 0;
        while (j < n && strcmp(names[j], g) < 0)
            j++;
        if (j < n && !strcmp(names[j], g))
            continue;
        memmove(names + j + 1, names + j, (size_t)(n - j) * sizeof *names);
        names[j] = g;
        n++;
    }
    for (int i = 0; i < job->n_prompts; i++)
        for (int j = 0; j < n; j++)
            if (!strcmp(names[j], job->prompts[i].markup.group))
                job->prompts[i].group = j;
    return n;
}

/* eval_groups.csv: policy x prompt group, with the paired test against full inside the group;
 * written when a prompt names a group. Returns 1 when written, 0 when not, -1 on error. */
static int write_groups_csv(EvalJob *job, int full, const char *dir, KvErr *err)
{
    const char **names = kv_malloc((size_t)job->n_prompts * sizeof *names);
    int n = prompt_groups(job, names);
    if (n == 1 && !names[0][0]) { /* no prompt names a group: no file, not an older one */
        free(names);
        char path[4400];
        snprintf(path, sizeof path, "%s/eval_groups.csv", dir);
        if (unlink(path) != 0 && errno != ENOENT)
            return kv_fail(err, "%s: cannot remove the file of an older run (%s)", path,
                           strerror(errno));
        return 0;
    }
    CsvFile c;
    if (csv_create(&c, dir, "eval_groups.csv",
                   "policy,type,group,prompts,questions,correct,accuracy,accuracy_lo,accuracy_hi,"
                   "agreement_with_full,vs_full_better,vs_full_worse,vs_full_p",
                   err) != 0) {
        free(names);
        return -1;
    }
    for (int k = 0; k < job->n_policies; k++)
        for (int g = 0; g < n; g++) {
            PolicyScore ps;
            score_policy(job, k, full, BY_GROUP, g, &ps);
            csv_put_text(&c, job->policies[k].label);
            csv_put_text(&c, job->policies[k].type->name);
            if (names[g][0])
                csv_put_text(&c, names[g]);
            else
                csv_put_empty(&c);
            csv_put_int(&c, ps.prompts);
            csv_put_int(&c, ps.questions);
            put_score(&c, &ps, false);
            if (ps.applicable) {
                Paired vs_full = paired_test(job, k, full, BY_GROUP, g);
                csv_put_int(&c, vs_full.better);
                csv_put_int(&c, vs_full.worse);
                csv_put_num(&c, vs_full.p);
            } else {
                for (int i = 0; i < 3; i++)
                    csv_put_empty(&c);
            }
            csv_end_row(&c);
        }
    free(names);
    return csv_commit(&c, err) != 0 ? -1 : 1;
}

static int write_prompts_csv(const EvalJob *job, int full, const char *dir, KvErr *err)
{
    CsvFile c;
    if (csv_create(&c, dir, "eval_prompts.csv",
                   "policy,prompt,question,turn,distance,correct,agrees_with_full,"
                   "generated_tokens,device_bytes,host_bytes,answer,expected",
                   err) != 0)
        return -1;
    for (int k = 0; k < job->n_policies; k++)
        for (int i = 0; i < job->n_prompts; i++) {
            const EvalPrompt *p = &job->prompts[i];
            const Outcome *o = &job->outcomes[(size_t)i * job->n_policies + k];
            const Outcome *f = &job->outcomes[(size_t)i * job->n_policies + full];
            if (!o->applicable)
                continue;
            for (int q = 0; q < p->n_questions; q++) {
                const Reply *r = &o->replies[q];
                csv_put_text(&c, job->policies[k].label);
                csv_put_text(&c, p->name);
                csv_put_int(&c, q);
                csv_put_int(&c, p->turns[q]);
                if (p->answers[q].fact_turn >= 0)
                    csv_put_int(&c, p->turns[q] - p->answers[q].fact_turn);
                else
                    csv_put_empty(&c);
                csv_put_int(&c, r->correct);
                csv_put_int(&c, !strcmp(r->answer, f->replies[q].answer));
                csv_put_int(&c, r->n_generated);
                csv_put_count(&c, o->device_bytes);
                csv_put_count(&c, o->host_bytes);
                csv_put_text(&c, r->answer);
                csv_put_text(&c, p->answers[q].text);
                csv_end_row(&c);
            }
        }
    return csv_commit(&c, err);
}

static void print_table(const EvalJob *job, const PolicyScore *s, int full, FILE *out)
{
    int w = 6;
    for (int k = 0; k < job->n_policies; k++)
        if ((int)strlen(job->policies[k].label) > w)
            w = (int)strlen(job->policies[k].label);
    /* Accuracy by turn distance, when the answers give the facts' turns and more than one
     * distance occurs. */
    int n_questions = 0;
    for (int i = 0; i < job->n_prompts; i++)
        n_questions += job->prompts[i].n_questions;
    int *dist = kv_malloc((size_t)n_questions * sizeof *dist);
    int n_dist = score_keys(job, BY_DISTANCE, dist);
    if (n_dist < 2)
        n_dist = 0;
    int tw = 13; /* the type column: 13, or the longest type name */
    for (int k = 0; k < job->n_policies; k++)
        if ((int)strlen(job->policies[k].type->name) > tw)
            tw = (int)strlen(job->policies[k].type->name);
    fprintf(out, "%-*s  %-*s %8s %8s %-15s %7s %8s %10s %10s", w, "policy", tw, "type", "correct",
            "accuracy", "95% interval", "agree", "p(full)", "device", "host");
    for (int d = 0; d < n_dist; d++)
        fprintf(out, "    d=%-2d", dist[d]);
    fputc('\n', out);
    for (int k = 0; k < job->n_policies; k++) {
        char dev[32], host[32], correct[32], acc[16], ci[40], agree[16], p[16];
        format_bytes(s[k].device_bytes, dev, sizeof dev);
        format_bytes(s[k].host_bytes, host, sizeof host);
        if (s[k].applicable) {
            snprintf(correct, sizeof correct, "%d/%d", s[k].correct, s[k].questions);
            snprintf(acc, sizeof acc, "%.3f", s[k].accuracy);
            snprintf(ci, sizeof ci, "[%.3f, %.3f]", s[k].accuracy_lo, s[k].accuracy_hi);
            snprintf(agree, sizeof agree, "%.3f", s[k].agreement);
            snprintf(p, sizeof p, "%.3g", paired_test(job, k, full, BY_ALL, 0).p);
        } else {
            snprintf(correct, sizeof correct, "n/a");
            snprintf(acc, sizeof acc, "-");
            snprintf(ci, sizeof ci, "-");
            snprintf(agree, sizeof agree, "-");
            snprintf(p, sizeof p, "-");
        }
        fprintf(out, "%-*s  %-*s %8s %8s %-15s %7s %8s %10s %10s", w, job->policies[k].label,
                tw, job->policies[k].type->name, correct, acc, ci, agree, p, dev, host);
        for (int d = 0; d < n_dist; d++) {
            PolicyScore ps;
            score_policy(job, k, full, BY_DISTANCE, dist[d], &ps);
            if (ps.applicable)
                fprintf(out, "  %6.3f", ps.accuracy);
            else
                fprintf(out, "  %6s", "-");
        }
        fputc('\n', out);
    }
    free(dist);
}

/* ---- The command ---- */
/* Whether some question of the prompt is read in a prefill over the full cache, so that every
 * policy answers it from the same state as full: the span just before its generation point (or
 * before the end) is prefilled, not fed through the policy's cache, and it is the first span
 * (the shared prefill) or a later one that the history mode re-encodes over the full cache. A
 * later span under persist is fed through each policy's caches. */
static bool question_in_full_prefill(const PromptTokens *pt, RunHistory history)
{
    for (int s = 1; s <= pt->n_spans; s++) {
        if (s < pt->n_spans && pt->spans[s].kind != PROMPT_GENERATE)
            continue;
        if (pt->spans[s - 1].kind == PROMPT_PREFILL && (s == 1 || history != HISTORY_PERSIST))
            return true;
    }
    return false;
}

/* One line on stderr naming (at most 3 of) the prompts with such a question. */
static void warn_full_prefill(const EvalPrompt *prompts, int n, const char *dir,
                              RunHistory history)
{
    int found = 0;
    char names[1024] = "";
    for (int i = 0; i < n; i++) {
        if (!question_in_full_prefill(&prompts[i].tokens, history))
            continue;
        if (found++ < 3) {
            size_t len = strlen(names);
            snprintf(names + len, sizeof names - len, "%s%s", len ? ", " : "",
                     prompts[i].file);
        }
    }
    if (found == 0)
        return;
    char more[32] = "";
    if (found > 3)
        snprintf(more, sizeof more, " and %d more", found - 3);
    fprintf(stderr, "kvsim eval: warning: %s: %s%s: a question is read in the full-cache prefill "
            "(no [[decode]] before it in its turn), so every policy answers it as full does "
            "(docs/eval.md)\n", dir, names, more);
}

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
    int budget; /* --budget: every policy at one budget of a sweep (0: the config's) */
    int argc; /* the command line, for run.json */
    char **argv;
} EvalOptions;

/* The checkpoint's files that the run reads (its *.json and *.safetensors), in bytewise order. */
static int model_inputs(Provenance *prov, const char *dir, KvErr *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return kv_fail(err, "%s: cannot open the model directory: %s", dir, strerror(errno));
    char **names = NULL;
    int n = 0, cap = 0, rc = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t len = strlen(e->d_name);
        bool json = len > 5 && !strcmp(e->d_name + len - 5, ".json");
        bool st = len > 12 && !strcmp(e->d_name + len - 12, ".safetensors");
        if (!json && !st)
            continue;
        if (n == cap)
            names = kv_realloc(names, (size_t)(cap = cap ? 2 * cap : 8) * sizeof *names);
        names[n++] = kv_strdup(e->d_name);
    }
    closedir(d);
    if (n > 0)
        qsort(names, (size_t)n, sizeof *names, compare_names);
    for (int i = 0; i < n; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (rc == 0 && provenance_input(prov, "model", path, err) != 0)
            rc = -1;
        free(names[i]);
    }
    free(names);
    return rc;
}

/* run.json beside the CSVs: the config, the checkpoint's files, every prompt and its answers,
 * every calibration trace (path, size, SHA-256), seed and threads. */
static int write_provenance(Provenance *prov, const EvalOptions *o, const RunConfig *rc,
                            const EvalPrompt *prompts, int n_prompts, int threads,
                            KvErr *err)
{
    if (provenance_config(prov, rc->config_path, err) != 0 ||
        model_inputs(prov, o->model_dir, err) != 0)
        return -1;
    for (int i = 0; i < n_prompts; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", o->prompts_dir, prompts[i].file);
        if (provenance_input(prov, "prompt", path, err) != 0)
            return -1;
        snprintf(path, sizeof path, "%s/%s.answer", o->prompts_dir, prompts[i].name);
        if (provenance_input(prov, "answers", path, err) != 0)
            return -1;
    }
    for (int i = 0; i < rc->engine.n_policies; i++) {
        const char *cal = config_calibration(rc, i);
        if (cal && provenance_input(prov, "calibration", cal, err) != 0)
            return -1;
    }
    if (rc->ratio > 0) /* each prompt's budget is floor(ratio x its n_prompt) */
        provenance_number(prov, "ratio", rc->ratio);
    if (rc->budget)
        provenance_number(prov, "budget", rc->budget);
    provenance_number(prov, "seed", (double)rc->engine.seed);
    provenance_number(prov, "threads", threads);
    provenance_number(prov, "threads_used", pool_threads_for(threads, n_prompts));
    provenance_string(prov, "out", rc->out_dir);
    return provenance_write(prov, rc->out_dir, err);
}

static int eval_main(const EvalOptions *o, Provenance *prov, KvErr *err)
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
    if (o->budget > 0) { /* as a cell of `kvsim sweep --budgets` sets each policy */
        char given[64];
        snprintf(given, sizeof given, "kvsim eval --budget %d", o->budget);
        for (int i = 0; i < rc.engine.n_policies; i++)
            if (config_sweep_budget(&rc, i, &rc.engine.policies[i], o->budget, given, err) != 0) {
                config_free(&rc);
                return -1;
            }
        rc.ratio = 0; /* the budget replaces the config's ratio or budget */
        rc.budget = o->budget;
    }
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
    int max_new = o->max_new, max_questions = 0;
    for (int i = 0; i < n_prompts; i++) {
        if (prompts[i].n_questions > max_questions)
            max_questions = prompts[i].n_questions;
        for (int q = 0; q < prompts[i].n_questions && o->max_new == 0; q++) {
            const char *a = prompts[i].answers[q].text;
            int32_t *ids;
            int n;
            if (tokenizer_encode(tok, a, strlen(a), &ids, &n, err) != 0)
                goto done;
            free(ids);
            if (n + EXTRA_NEW_TOKENS > max_new)
                max_new = n + EXTRA_NEW_TOKENS;
        }
    }
    warn_full_prefill(prompts, n_prompts, o->prompts_dir, rc.engine.history);
    if (policies != rc.engine.policies && !o->quiet)
        fprintf(stderr, "kvsim eval: no policy of type full in %s: added one, labelled full, "
                "as the reference\n", o->config);

    outcomes = kv_calloc((size_t)n_prompts * n_policies, sizeof *outcomes);
    EvalJob job = {.model = model, .tok = tok, .rc = &rc, .policies = policies,
                   .n_policies = n_policies, .prompts = prompts, .n_prompts = n_prompts,
                   .max_new = max_new, .max_questions = max_questions,
                   .outcomes = outcomes};
    double started = now_seconds();
    int threads = o->threads >= 0 ? o->threads : rc.engine.threads;
    if (run_job(&job, threads, !o->quiet && isatty(STDERR_FILENO), err) != 0)
        goto done;
    scores = kv_calloc((size_t)n_policies, sizeof *scores);
    for (int k = 0; k < n_policies; k++)
        score_policy(&job, k, full, BY_ALL, 0, &scores[k]);
    int grouped = 0;
    if (make_dirs(rc.out_dir, err) != 0 || write_eval_csv(&job, scores, full, rc.out_dir, err) != 0 ||
        write_prompts_csv(&job, full, rc.out_dir, err) != 0 ||
        write_turns_csv(&job, full, rc.out_dir, err) != 0 ||
        (grouped = write_groups_csv(&job, full, rc.out_dir, err)) < 0 ||
        write_provenance(prov, o, &rc, prompts, n_prompts, threads, err) != 0)
        goto done;
    if (!o->quiet) {
        printf("eval %s: %s, %d prompts, %d policies, up to %d new tokens, %.1fs\n", o->config,
               o->model_dir, n_prompts, n_policies, max_new, now_seconds() - started);
        print_table(&job, scores, full, stdout);
        for (int k = 0; k < n_policies; k++)
            if (!scores[k].applicable)
                printf("%s: not applicable in closed loop (%s needs what only a replay of a "
                       "trace has: the future of the run, which depends on the policy itself, "
                       "or every layer's keys at each step)\n", policies[k].label,
                       policies[k].type->name);
        printf("wrote %s/eval.csv, eval_prompts.csv, eval_turns.csv, %srun.json\n", rc.out_dir,
               grouped ? "eval_groups.csv, " : "");
    }
    rc_status = 0;
done:
    for (int i = 0; outcomes && i < n_prompts * n_policies; i++) {
        int nq = prompts[i / n_policies].n_questions;
        for (int q = 0; outcomes[i].replies && q < nq; q++)
            free(outcomes[i].replies[q].answer);
        free(outcomes[i].replies);
    }
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
         "directory of NAME.txt or NAME.json prompts, each with its NAME.answer"},
        {"out", ARG_STRING, &o.out_dir, 0, 0, NULL, "output directory (default: [run] out)"},
        {"threads", ARG_INT, &o.threads, -1, 1024, NULL,
         "prompts evaluated in parallel; 0 = all cores, -1 = [run] threads"},
        {"max-new", ARG_INT, &o.max_new, 0, 1 << 20, NULL,
         "most generated tokens per prompt; 0 = longest answer's tokens + 8"},
        {"budget", ARG_INT, &o.budget, 1, 1e9, NULL,
         "every policy at this budget, as kvsim sweep sets it (docs/sweeps.md)"},
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
    Provenance *prov = provenance_begin(argc, argv);
    int rc = eval_main(&o, prov, &err);
    provenance_free(prov);
    if (rc != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    return 0;
}
