#include "traces/cmd/trace_cmd.h"

#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/args.h"
#include "sim/base/progress.h"
#include "sim/format/trace.h"
#include "traces/model/forward.h"
#include "traces/model/model.h"
#include "traces/model/prompt.h"
#include "traces/model/safetensors.h"
#include "traces/model/tokenizer.h"

typedef struct {
    const char *model_dir;
    const char *prompt_path;
    const char *tokens_path;
    const char *out_path;
    int max_new;
    TraceDtype dtype;
    int threads; /* -1: OpenBLAS's default */
    int attn_every;
    int chunk_size;
} TraceOptions;

/* ---- Input tokens ---- */

static int read_token_file(const char *path, int32_t **ids, int *n, KvErr *err)
{
    size_t len;
    char *text = kv_read_input(path, 0, &len, err);
    if (!text)
        return -1;
    int cap = 256, line = 1;
    *n = 0;
    *ids = kv_malloc((size_t)cap * sizeof **ids);
    for (const char *p = text; *p;) {
        if (isspace((unsigned char)*p)) {
            line += *p++ == '\n';
            continue;
        }
        const char *start = p;
        while (*p && !isspace((unsigned char)*p))
            p++;
        char *end;
        errno = 0;
        long id = strtol(start, &end, 10);
        if (errno || end != p || id < 0 || id > INT32_MAX) {
            kv_fail(err, "%s:%d: '%.*s' is not a token id (expected a non-negative integer)",
                    path, line, (int)(p - start > 40 ? 40 : p - start), start);
            free(text);
            free(*ids);
            *ids = NULL;
            return -1;
        }
        if (*n == cap)
            *ids = kv_realloc(*ids, (size_t)(cap *= 2) * sizeof **ids);
        (*ids)[(*n)++] = (int32_t)id;
    }
    free(text);
    if (*n == 0) {
        free(*ids);
        *ids = NULL;
        return kv_fail(err, "%s: no token ids", path);
    }
    return 0;
}

/* The tokenizer of the checkpoint: required with --prompt, optional with --tokens (used only to
 * print the generated text), but a tokenizer.json that is there must load. */
static int load_tokenizer(const TraceOptions *o, Tokenizer **tok, KvErr *err)
{
    char json_path[4096];
    snprintf(json_path, sizeof json_path, "%s/tokenizer.json", o->model_dir);
    *tok = NULL;
    if (o->tokens_path && access(json_path, F_OK) != 0)
        return 0;
    *tok = checkpoint_tokenizer_load(o->model_dir, err);
    return *tok ? 0 : -1;
}

/* ---- What the run records for the trace ----
 *
 * The trace's token count is known only when generation stops (EOS may come early), but the
 * trace writer needs it up front. K and V stay in the KV cache anyway; Q is spilled to an
 * unlinked temporary file next to the output, [layer][q head][max_tokens][D], and attention rows
 * are kept in memory (each [n_layers][Hq][position + 1]). The trace is written once generation
 * has stopped. */
typedef struct {
    int fd;
    int n_layers, n_q_heads, head_dim, max_tokens;
    int io_error; /* errno of the first failed spill write */
    int last_prompt, attn_every;
    int last_forced; /* the last token of the forced run being fed, -1 before any */
    int n_rows;
    int32_t *row_positions;
    float **rows; /* [n_rows] -> [n_layers][Hq][position + 1] */
} TraceRecorder;

static int write_all(int fd, const void *buf, size_t len, off_t offset)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t got = pwrite(fd, p, len, offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        p += got, len -= (size_t)got, offset += got;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len, off_t offset)
{
    char *p = buf;
    while (len > 0) {
        ssize_t got = pread(fd, p, len, offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        p += got, len -= (size_t)got, offset += got;
    }
    return 0;
}

static off_t spill_offset(const TraceRecorder *rec, int layer, int head, int t)
{
    return (off_t)((((size_t)layer * rec->n_q_heads + head) * rec->max_tokens + t) *
                   rec->head_dim * sizeof(float));
}

static void record_qkv(void *user, int layer, int t0, int n, const float *q, const float *k,
                       const float *v)
{
    (void)k, (void)v; /* the KV cache keeps them */
    TraceRecorder *rec = user;
    size_t head_bytes = (size_t)n * rec->head_dim * sizeof(float);
    for (int h = 0; h < rec->n_q_heads && !rec->io_error; h++)
        if (write_all(rec->fd, q + (size_t)h * n * rec->head_dim, head_bytes,
                      spill_offset(rec, layer, h, t0)) != 0)
            rec->io_error = errno ? errno : EIO;
}

/* The last prompt token, then every attn_every-th position after it (decode steps, and the
 * prefill tokens of later turns), and the last token of each forced run: the question's last
 * query, the one that must find what the prompt holds. */
static int wants_row(void *user, int position)
{
    const TraceRecorder *rec = user;
    if (rec->attn_every == 0 || position < rec->last_prompt)
        return 0;
    return (position - rec->last_prompt) % rec->attn_every == 0 || position == rec->last_forced;
}

static void record_attention(void *user, int layer, int position, const float *probs)
{
    TraceRecorder *rec = user;
    size_t per_layer = (size_t)rec->n_q_heads * (position + 1);
    /* A later turn's prefill chunk holds several rows, visited layer by layer: find the row. */
    int r = rec->n_rows - 1;
    while (r >= 0 && rec->row_positions[r] > position)
        r--;
    if (r >= 0 && rec->row_positions[r] == position) {
        memcpy(rec->rows[r] + (size_t)layer * per_layer, probs, per_layer * sizeof(float));
        return;
    }
    rec->row_positions = kv_realloc(rec->row_positions,
                                    (size_t)(rec->n_rows + 1) * sizeof *rec->row_positions);
    rec->rows = kv_realloc(rec->rows, (size_t)(rec->n_rows + 1) * sizeof *rec->rows);
    rec->row_positions[rec->n_rows] = position;
    rec->rows[rec->n_rows++] = kv_calloc(per_layer * rec->n_layers, sizeof(float));
    memcpy(rec->rows[rec->n_rows - 1] + (size_t)layer * per_layer, probs,
           per_layer * sizeof(float));
}

static void recorder_free(TraceRecorder *rec)
{
    if (rec->fd >= 0)
        close(rec->fd);
    for (int r = 0; r < rec->n_rows; r++)
        free(rec->rows[r]);
    free(rec->rows);
    free(rec->row_positions);
}

/* An unlinked temporary file in the output's directory (same file system, so the disk that
 * takes the trace takes the spill). */
static int open_spill(const char *out_path, KvErr *err)
{
    char templ[4200];
    snprintf(templ, sizeof templ, "%s.q-XXXXXX", out_path);
    int fd = mkstemp(templ);
    if (fd < 0)
        return kv_fail(err, "%s: cannot create a temporary file next to it: %s", out_path,
                       strerror(errno));
    unlink(templ);
    return fd;
}

/* ---- The trace ---- */

static void describe_generator(int argc, char **argv, char *out, size_t outlen)
{
    size_t at = (size_t)snprintf(out, outlen, "kvsim trace");
    for (int i = 1; i < argc && at < outlen; i++)
        at += (size_t)snprintf(out + at, outlen - at, " %s", argv[i]);
    if (at >= outlen && outlen > 4)
        memcpy(out + outlen - 4, "...", 4); /* free text; a long command line is cut */
}

static void model_name(const char *dir, char *out, size_t outlen)
{
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/')
        len--;
    size_t start = len;
    while (start > 0 && dir[start - 1] != '/')
        start--;
    snprintf(out, outlen, "%.*s", (int)(len - start), dir + start);
}

typedef struct {
    const Model *model;
    const RunState *state;
    TraceRecorder *rec;
    const int32_t *tokens;
    const int32_t *segments; /* [n_tokens] */
    int n_tokens, n_prompt;
    const PromptTokens *prompt; /* needles, probes; NULL with --tokens */
    const int32_t *where;       /* [input token] its position in the run */
    int n_spans;
    const TraceSpan *spans;
} TraceContent;

static void fill_meta(const TraceContent *c, int argc, char **argv, const TraceOptions *o,
                      TraceMeta *m)
{
    char model[256], generator[256];
    model_name(o->model_dir, model, sizeof model);
    describe_generator(argc, argv, generator, sizeof generator);
    /* The geometry the forward pass computed with: the one description of the model. */
    TraceModel desc = c->state->geometry;
    desc.model = model;
    desc.generator = generator;
    const PromptTokens *p = c->prompt;
    int marked_probes = p && p->n_probes > 0;
    /* Default probes: the last token of every prefill span (the first: the last prompt token)
     * and every decode step, forced ones included. */
    int n_default = 0;
    for (int s = 0; s < c->n_spans; s++)
        n_default += c->spans[s].kind == SPAN_PREFILL ? 1 : c->spans[s].end - c->spans[s].start;
    trace_meta_init(m, &desc, c->n_tokens, c->n_prompt, p ? p->n_needles : 0,
                    marked_probes ? p->n_probes : n_default, c->rec->n_rows);
    trace_meta_set_spans(m, c->n_spans, c->spans);
    memcpy(m->tokens, c->tokens, (size_t)c->n_tokens * sizeof *m->tokens);
    memcpy(m->segments, c->segments, (size_t)c->n_tokens * sizeof *m->segments);
    for (int i = 0; p && i < p->n_needles; i++) {
        m->needles[2 * i] = c->where[p->needles[2 * i]];
        m->needles[2 * i + 1] = c->where[p->needles[2 * i + 1] - 1] + 1;
    }
    if (marked_probes) {
        for (int i = 0; i < m->n_probes; i++)
            m->probes[i] = c->where[p->probes[i]];
    } else {
        int i = 0;
        for (int s = 0; s < c->n_spans; s++)
            for (int t = c->spans[s].kind == SPAN_PREFILL ? c->spans[s].end - 1 : c->spans[s].start;
                 t < c->spans[s].end; t++)
                m->probes[i++] = t;
    }
    memcpy(m->attn_rows_at, c->rec->row_positions, (size_t)m->n_attn_rows * sizeof(int32_t));
}

/* Writes every layer: Q from the spill, K and V from the cache, the attention rows padded with
 * zeros to [Hq][T]. */
static int write_trace(const TraceContent *c, const TraceMeta *meta, TraceDtype dtype,
                       const char *out_path, KvErr *err)
{
    TraceWriter *w = trace_writer_create(out_path, meta, dtype, err);
    if (!w)
        return -1;
    const ModelConfig *cfg = &c->model->config;
    int T = c->n_tokens, D = cfg->head_dim, Hq = cfg->n_q_heads, Hkv = cfg->n_kv_heads;
    float *q = kv_malloc((size_t)Hq * T * D * sizeof(float));
    float *k = kv_malloc((size_t)Hkv * T * D * sizeof(float));
    float *v = kv_malloc((size_t)Hkv * T * D * sizeof(float));
    float *rows = kv_malloc((size_t)Hq * T * sizeof(float));
    int rc = 0;
    for (int layer = 0; layer < cfg->n_layers && rc == 0; layer++) {
        for (int h = 0; h < Hq && rc == 0; h++)
            if (read_all(c->rec->fd, q + (size_t)h * T * D, (size_t)T * D * sizeof(float),
                         spill_offset(c->rec, layer, h, 0)) != 0)
                rc = kv_fail(err, "%s: cannot read back the temporary query file: %s", out_path,
                             strerror(errno ? errno : EIO));
        for (int g = 0; g < Hkv; g++) {
            memcpy(k + (size_t)g * T * D, run_state_keys(c->state, layer, g),
                   (size_t)T * D * sizeof(float));
            memcpy(v + (size_t)g * T * D, run_state_values(c->state, layer, g),
                   (size_t)T * D * sizeof(float));
        }
        if (rc == 0)
            rc = trace_writer_put_qkv(w, layer, 0, T, q, k, v, err);
        for (int r = 0; r < c->rec->n_rows && rc == 0; r++) {
            int n_keys = c->rec->row_positions[r] + 1;
            const float *src = c->rec->rows[r] + (size_t)layer * Hq * n_keys;
            memset(rows, 0, (size_t)Hq * T * sizeof(float));
            for (int h = 0; h < Hq; h++)
                memcpy(rows + (size_t)h * T, src + (size_t)h * n_keys, n_keys * sizeof(float));
            rc = trace_writer_put_attn_row(w, layer, r, rows, err);
        }
    }
    free(q);
    free(k);
    free(v);
    free(rows);
    if (rc != 0) {
        trace_writer_abort(w);
        return -1;
    }
    return trace_writer_finish(w, err);
}

/* ---- The command ---- */

typedef struct {
    Model *model;
    Tokenizer *tok;
    PromptMarkup markup;
    PromptTokens prompt;
    int32_t *tokens;   /* [max_tokens]: the input's tokens with the generated ones in place */
    int32_t *segments; /* [max_tokens] */
    int32_t *where;    /* [n_input]: each input token's position in the run */
    int n_spans;
    TraceSpan *spans;  /* the trace's spans, as fed */
    int n_forced;
    int n_outputs;     /* generation points that ran, each with its [start, end) in outputs */
    int32_t *outputs;
    RunState *state;
    TraceRecorder rec;
} TraceRun;

static void trace_run_free(TraceRun *r)
{
    run_state_free(r->state);
    recorder_free(&r->rec);
    free(r->tokens);
    free(r->segments);
    free(r->where);
    free(r->spans);
    free(r->outputs);
    prompt_tokens_free(&r->prompt);
    prompt_markup_free(&r->markup);
    if (r->tok)
        tokenizer_free(r->tok);
    model_free(r->model);
}


/* Appends n tokens of `kind` to the trace's spans: a prefill span of its own, decode steps
 * (forced or generated) joining the decode run before them. */
static void add_span(TraceRun *r, SpanKind kind, int start, int n)
{
    if (n == 0)
        return;
    if (kind == SPAN_DECODE && r->n_spans && r->spans[r->n_spans - 1].kind == SPAN_DECODE) {
        r->spans[r->n_spans - 1].end += n;
        return;
    }
    r->spans = kv_realloc(r->spans, (size_t)(r->n_spans + 1) * sizeof *r->spans);
    r->spans[r->n_spans++] = (TraceSpan){kind, start, start + n};
}

/* Greedy decoding from `logits` after the token at position pos - 1, up to max_new tokens or
 * EOS, in `segment`; returns the number generated and fed. */
static int generate_turn(TraceRun *r, const TraceOptions *o, const float *logits, int pos,
                         int segment, const ForwardObserver *obs, Progress *dp)
{
    int n_generated = 0;
    while (n_generated < o->max_new) {
        int next = argmax_token(logits, r->model->config.vocab_size);
        if (is_end_of_sequence(&r->model->config, r->tok, next))
            break;
        r->tokens[pos + n_generated] = next;
        r->segments[pos + n_generated++] = segment;
        /* The last token is fed for its Q/K/V; nothing is sampled after it. */
        logits = forward_tokens(r->state, &r->tokens[pos + n_generated - 1], 1,
                                n_generated < o->max_new, obs);
        progress_add(dp, 1);
    }
    r->outputs = kv_realloc(r->outputs, (size_t)(r->n_outputs + 1) * 2 * sizeof *r->outputs);
    r->outputs[2 * r->n_outputs] = pos;
    r->outputs[2 * r->n_outputs++ + 1] = pos + n_generated;
    add_span(r, SPAN_DECODE, pos, n_generated);
    return n_generated;
}

/* Feeds the input's spans in order: a prefill span in chunks on top of the cache, forced tokens
 * one decode step each, greedy generation at each generation point and after the last input
 * token. Returns the number of tokens in the run. */
static int generate(TraceRun *r, const TraceOptions *o, const PromptTokens *in, int final_segment,
                    double *prefill_s, double *decode_s)
{
    ForwardObserver obs = {&r->rec, record_qkv, wants_row, record_attention};
    bool interactive = isatty(STDERR_FILENO);
    int n_prefill = 0, n_decode = 0;
    for (int s = 0; s < in->n_spans; s++)
        if (in->spans[s].kind == PROMPT_PREFILL)
            n_prefill += in->spans[s].end - in->spans[s].start;
        else
            n_decode += in->spans[s].end - in->spans[s].start + o->max_new;
    /* One progress line: a single prompt's prefill, then its decode; a conversation's tokens
     * as they are fed, whatever their kind. */
    int single = in->n_spans == 1 || (in->n_spans == 2 && in->spans[1].kind == PROMPT_FORCED);
    Progress pp, dp;
    progress_begin(&pp, interactive, single ? "prefill" : "trace", "tokens",
                   single ? n_prefill : n_prefill + n_decode + o->max_new);
    Progress *dpp = single ? &dp : &pp;
    int decoding = !single; /* dp begun */
    double prefill_time = 0, decode_time = 0;
    const float *logits = NULL;
    int pos = 0;
    for (int s = 0; s < in->n_spans; s++) {
        const PromptSpan *sp = &in->spans[s];
        double t0 = now_seconds();
        for (int i = sp->start; i < sp->end; i++) {
            r->where[i] = pos + i - sp->start;
            r->tokens[r->where[i]] = in->tokens[i];
            r->segments[r->where[i]] = in->segments ? in->segments[i] : 0;
        }
        if (sp->kind == PROMPT_PREFILL) {
            int n_span = sp->end - sp->start;
            for (int at = 0; at < n_span; at += r->state->chunk_size) {
                int n = n_span - at < r->state->chunk_size ? n_span - at : r->state->chunk_size;
                logits = forward_tokens(r->state, r->tokens + pos + at, n, at + n == n_span, &obs);
                progress_add(&pp, n);
            }
            add_span(r, SPAN_PREFILL, pos, n_span);
            pos += n_span;
            prefill_time += now_seconds() - t0;
        } else if (sp->kind == PROMPT_FORCED) {
            if (!decoding) {
                progress_end(&pp);
                progress_begin(&dp, interactive, "decode", "tokens", n_decode + o->max_new);
                decoding = 1;
            }
            r->rec.last_forced = pos + sp->end - sp->start - 1;
            for (int t = sp->start; t < sp->end; t++, pos++) {
                logits = forward_tokens(r->state, &r->tokens[pos], 1, t == sp->end - 1, &obs);
                progress_add(dpp, 1);
            }
            add_span(r, SPAN_DECODE, pos - (sp->end - sp->start), sp->end - sp->start);
            r->n_forced += sp->end - sp->start;
            decode_time += now_seconds() - t0;
        } else {
            pos += generate_turn(r, o, logits, pos, r->segments[pos - 1], &obs, dpp);
            decode_time += now_seconds() - t0;
        }
    }
    if (!decoding) {
        progress_end(&pp);
        progress_begin(&dp, interactive, "decode", "tokens", n_decode + o->max_new);
    }
    double t0 = now_seconds();
    pos += generate_turn(r, o, logits, pos, final_segment, &obs, dpp);
    decode_time += now_seconds() - t0;
    progress_end(dpp);
    *prefill_s = prefill_time;
    *decode_s = decode_time;
    return pos;
}

static void print_generated(const TraceRun *r, const int32_t *ids, int n)
{
    if (r->tok) {
        char *text = tokenizer_decode(r->tok, ids, n);
        printf("%s\n", text);
        free(text);
        return;
    }
    for (int i = 0; i < n; i++)
        printf("%s%d", i ? " " : "", ids[i]);
    printf("\n");
}

static int trace_main(int argc, char **argv, const TraceOptions *o, TraceRun *r, KvErr *err)
{
    if (o->threads >= 0)
        openblas_set_num_threads(o->threads ? o->threads : openblas_get_num_procs());
    if (!(r->model = model_load(o->model_dir, err)) || load_tokenizer(o, &r->tok, err) != 0)
        return -1;
    const ModelConfig *cfg = &r->model->config;
    if (o->prompt_path) {
        if (prompt_file_load(o->prompt_path, r->tok, r->model, o->model_dir, &r->markup,
                             &r->prompt, err) != 0)
            return -1;
    } else {
        if (read_token_file(o->tokens_path, &r->prompt.tokens, &r->prompt.n_tokens, err) != 0)
            return -1;
        r->prompt.n_prompt = r->prompt.n_tokens;
        r->prompt.spans = kv_malloc(sizeof *r->prompt.spans);
        r->prompt.spans[0] = (PromptSpan){PROMPT_PREFILL, 0, r->prompt.n_tokens};
        r->prompt.n_spans = 1;
    }
    const int32_t *prompt_ids = r->prompt.tokens;
    int n_prompt = r->prompt.n_prompt, n_input = r->prompt.n_tokens;
    const char *source = o->prompt_path ? o->prompt_path : o->tokens_path;
    for (int t = 0; t < n_input; t++)
        if (prompt_ids[t] >= cfg->vocab_size)
            return kv_fail(err, "%s: token %d is id %d, beyond the model's vocab_size %d", source,
                           t, prompt_ids[t], cfg->vocab_size);
    /* Every generation point, and the final one, may add max_new tokens. */
    long n_points = 1;
    for (int s = 0; s < r->prompt.n_spans; s++)
        n_points += r->prompt.spans[s].kind == PROMPT_GENERATE;
    if ((long)n_input + n_points * o->max_new > INT_MAX / 2)
        return kv_fail(err, "%s: too many tokens", source);
    int max_tokens = n_input + (int)n_points * o->max_new;
    if (cfg->max_position_embeddings && max_tokens > cfg->max_position_embeddings)
        fprintf(stderr, "kvsim trace: warning: %d tokens exceed max_position_embeddings %d\n",
                max_tokens, cfg->max_position_embeddings);

    r->tokens = kv_malloc((size_t)max_tokens * sizeof *r->tokens);
    r->segments = kv_malloc((size_t)max_tokens * sizeof *r->segments);
    r->where = kv_malloc((size_t)n_input * sizeof *r->where);
    r->rec = (TraceRecorder){.fd = -1, .n_layers = cfg->n_layers, .n_q_heads = cfg->n_q_heads,
                             .head_dim = cfg->head_dim, .max_tokens = max_tokens,
                             .last_prompt = n_prompt - 1, .attn_every = o->attn_every,
                             .last_forced = -1};
    if ((r->rec.fd = open_spill(o->out_path, err)) < 0)
        return -1;
    int chunk = o->chunk_size < n_prompt ? o->chunk_size : n_prompt;
    r->state = run_state_new(r->model, max_tokens, chunk);

    double prefill_s, decode_s;
    int n_tokens = generate(r, o, &r->prompt, o->prompt_path ? r->markup.last_segment : 0,
                            &prefill_s, &decode_s);
    if (r->rec.io_error)
        return kv_fail(err, "%s: cannot write the temporary query file: %s", o->out_path,
                       strerror(r->rec.io_error));

    double write_start = now_seconds();
    TraceContent content = {r->model, r->state, &r->rec, r->tokens, r->segments, n_tokens,
                            n_prompt, o->prompt_path ? &r->prompt : NULL, r->where, r->n_spans,
                            r->spans};
    TraceMeta meta;
    fill_meta(&content, argc, argv, o, &meta);
    int rc = write_trace(&content, &meta, o->dtype, o->out_path, err);
    trace_meta_free(&meta);
    if (rc != 0)
        return -1;
    double write_s = now_seconds() - write_start;

    /* What each generation point produced, one line each (one line for a single prompt). */
    int n_prefilled = 0, n_generated = n_tokens - n_input;
    for (int s = 0; s < r->n_spans; s++)
        if (r->spans[s].kind == SPAN_PREFILL)
            n_prefilled += r->spans[s].end - r->spans[s].start;
    for (int g = 0; g < r->n_outputs; g++)
        print_generated(r, r->tokens + r->outputs[2 * g], r->outputs[2 * g + 1] - r->outputs[2 * g]);
    int n_decoded = r->n_forced + n_generated;
    if (r->n_spans > 2)
        fprintf(stderr, "kvsim trace: %d generations in %d spans\n", r->n_outputs, r->n_spans);
    fprintf(stderr, "kvsim trace: %d prompt + %d forced + %d generated tokens; prefill %.1f "
                    "tok/s, decode %.1f tok/s; trace written in %.2f s\n", n_prompt,
            r->n_forced, n_generated, prefill_s > 0 ? n_prefilled / prefill_s : 0,
            decode_s > 0 ? n_decoded / decode_s : 0, write_s);
    return 0;
}

int cmd_trace(int argc, char **argv)
{
    TraceOptions o = {.max_new = 32, .dtype = TRACE_F32, .threads = -1, .attn_every = 16,
                      .chunk_size = 128};
    int dtype = 0;
    const ArgSpec specs[] = {
        {"model", ARG_STRING, &o.model_dir, 0, 0, NULL,
         "Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)"},
        {"prompt", ARG_STRING, &o.prompt_path, 0, 0, NULL,
         "text, or a JSON chat; markup [[needle]]...[[/needle]], [[probe]], [[decode]], "
         "[[generate]]"},
        {"tokens", ARG_STRING, &o.tokens_path, 0, 0, NULL,
         "whitespace-separated token ids, used as given (no BOS added)"},
        {"out", ARG_STRING, &o.out_path, 0, 0, NULL, "the trace to write"},
        {"max-new", ARG_INT, &o.max_new, 0, 1 << 20, NULL,
         "most tokens generated greedily (stops at EOS)"},
        {"dtype", ARG_CHOICE, &dtype, 0, 0, "f32|f16", "precision of the stored Q/K/V"},
        {"threads", ARG_INT, &o.threads, 0, 1024, NULL,
         "OpenBLAS threads, 0 = all cores (default: OpenBLAS's own)"},
        {"attn-rows", ARG_INT, &o.attn_every, 0, INT_MAX, NULL,
         "the model's attention at the last prompt token, every K-th position after it and the "
         "last token of each forced run (0 = none)"},
        {"chunk", ARG_INT, &o.chunk_size, 1, 1 << 16, NULL, "prompt tokens per prefill step"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage =
        "trace --model DIR (--prompt FILE | --tokens FILE) --out TRACE.h5 [options]\n"
        "  Runs the checkpoint on the prompt ([[decode]]: the text after it is fed token by\n"
        "  token, as decode steps; a chat's turns, or [[generate]], each through the cache),\n"
        "  greedy-decodes, writes the post-RoPE Q/K/V of every token\n"
        "  fed through the model as a kvsim trace and prints the generated text (token ids\n"
        "  without a tokenizer). See docs/generator.md.";
    const char *positional[1];
    int status = args_start(argc, argv, specs, usage, positional, 0);
    if (status >= 0)
        return status;
    o.dtype = dtype == 1 ? TRACE_F16 : TRACE_F32;
    if (!o.model_dir || !o.out_path || !o.prompt_path == !o.tokens_path) {
        fprintf(stderr, "kvsim: trace: needs --model, --out and one of --prompt or --tokens "
                        "(kvsim trace --help)\n");
        return 2;
    }
    TraceRun run;
    memset(&run, 0, sizeof run);
    run.rec.fd = -1;
    KvErr err = {{0}};
    int rc = trace_main(argc, argv, &o, &run, &err);
    trace_run_free(&run);
    if (rc != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    return 0;
}
