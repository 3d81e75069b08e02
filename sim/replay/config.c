/* INI loading on inih. The whole file is read first (a regular file only: a FIFO or a directory
 * is refused) and handed to inih one line at a time by a reader that
 *   - numbers the lines itself (a UTF-8 byte-order mark at the start is skipped, not counted),
 *   - checks each physical line: no NUL byte, no control character but tab, valid UTF-8, not
 *     longer than inih's line buffer (so that inih never splits a line in two),
 *   - classifies it exactly as inih will (blank, comment, [section] or key = value) and rejects
 *     what inih would reject or silently ignore, so that the first error is reported at its
 *     line and parsing stops there,
 *   - tracks the section: inih does not tell the handler where a section starts and cuts its
 *     name to 49 characters, so the handler uses the reader's full name and line instead.
 * The handler checks that inih agrees with the reader on every key line. */
#include "sim/replay/config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/text.h"

#define MAX_POLICIES 64
#define MAX_KEYS 64 /* per section: keys before type= wait, so they are bounded */
#define MAX_CONFIG_BYTES (1 << 20)
#define LABEL_MAX (sizeof((PolicySpec *)0)->label - 1)

typedef struct {
    char *key;
    char *value;
    int line;
} KeyEntry;

typedef struct {
    int n, cap;
    KeyEntry *v;
} KeyList;

typedef struct {
    int line;     /* of the [policy.LABEL] header */
    KeyList keys; /* every key of the section in file order; those before type= wait for it */
} PolicySection;

/* Where each policy and each of its keys were written (RunConfig.source). */
struct ConfigSource {
    PolicySection sections[MAX_POLICIES];
};

typedef enum { LINE_BLANK, LINE_COMMENT, LINE_SECTION, LINE_KEY } LineKind;
typedef enum { SEC_NONE, SEC_TRACE, SEC_RUN, SEC_POLICY } SectionKind;

typedef struct {
    const char *buf; /* the whole file */
    size_t len, pos;
    int line;        /* number of the line inih is processing */
    LineKind kind;   /* of that line */
    bool handled;    /* inih called the handler for it (key lines) */
    SectionKind sec; /* the current section */
    char section[512];
    int policy; /* index of the current [policy.LABEL] section */
} LineReader;

typedef struct {
    LineReader reader;
    RunConfig *rc;
    KvErr err;
    bool failed; /* err holds the first error */
    int n_sections;
    int trace_line, run_line; /* of [trace] and [run], 0 = not seen */
    KeyList plain_keys;       /* the keys of the current [trace] or [run] section */
} Loader;

static void vfail_at(Loader *ld, int line, const char *fmt, va_list ap)
{
    if (ld->failed)
        return; /* the first error is the one reported */
    char msg[sizeof ld->err.msg];
    vsnprintf(msg, sizeof msg, fmt, ap);
    ld->failed = true;
    kv_fail(&ld->err, "%s:%d: %s", ld->rc->config_path, line, msg);
}

/* Records the error at `line` unless one is recorded already; returns 0 (an error, to inih). */
static int fail_at(Loader *ld, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail_at(Loader *ld, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail_at(ld, line, fmt, ap);
    va_end(ap);
    return 0;
}

/* The same, returning -1 (an error, to the reader's helpers). */
static int reject(Loader *ld, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int reject(Loader *ld, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail_at(ld, line, fmt, ap);
    va_end(ap);
    return -1;
}

/* File content inside a message: one line, cut to fit. */
#define ESC(s, buf) kv_escape((s), strlen(s), (buf), sizeof(buf))

static void keys_free(KeyList *k)
{
    for (int i = 0; i < k->n; i++) {
        free(k->v[i].key);
        free(k->v[i].value);
    }
    free(k->v);
    memset(k, 0, sizeof *k);
}

static void keys_add(KeyList *k, const char *key, const char *value, int line)
{
    if (k->n == k->cap) {
        k->cap = k->cap ? 2 * k->cap : 8;
        k->v = kv_realloc(k->v, (size_t)k->cap * sizeof *k->v);
    }
    k->v[k->n++] = (KeyEntry){kv_strdup(key), kv_strdup(value), line};
}

static const KeyEntry *keys_find(const KeyList *k, const char *key)
{
    for (int i = 0; i < k->n; i++)
        if (!strcmp(k->v[i].key, key))
            return &k->v[i];
    return NULL;
}

/* ---- Sections ---- */

static PolicySection *current_policy(Loader *ld)
{
    return &ld->rc->source->sections[ld->reader.policy];
}

/* A policy section is complete when the next section starts or the file ends: it must have a
 * type, and the type's validate() must accept the combination of parameters. */
static void finish_section(Loader *ld)
{
    LineReader *r = &ld->reader;
    if (ld->failed || r->sec != SEC_POLICY)
        return;
    PolicySection *ps = current_policy(ld);
    PolicySpec *spec = &ld->rc->engine.policies[r->policy];
    char label[96], msg[sizeof ld->err.msg];
    ESC(spec->label, label);
    if (!spec->type) {
        fail_at(ld, ps->line, "[policy.%s] has no type= (one of the names `kvsim policies` lists)",
                label);
        return;
    }
    KvErr verr;
    if ((spec->type->validate && spec->type->validate(spec->params, &verr) != 0) ||
        kvq_validate(&spec->quant, &verr) != 0)
        fail_at(ld, ps->line, "[policy.%s] %s", label, ESC(verr.msg, msg));
}

static void section_started(Loader *ld, const char *name, int line)
{
    LineReader *r = &ld->reader;
    finish_section(ld);
    if (ld->failed)
        return;
    keys_free(&ld->plain_keys);
    r->sec = SEC_NONE;
    char e[160];
    if (!strcmp(name, "trace") || !strcmp(name, "run")) {
        int *first = name[0] == 't' ? &ld->trace_line : &ld->run_line;
        if (*first) {
            fail_at(ld, line, "duplicate section [%s] (first at line %d)", name, *first);
            return;
        }
        *first = line;
        r->sec = name[0] == 't' ? SEC_TRACE : SEC_RUN;
        return;
    }
    if (strncmp(name, "policy.", 7)) {
        fail_at(ld, line, "unknown section [%s] (expected [trace], [run] or [policy.LABEL])",
                ESC(name, e));
        return;
    }
    const char *label = name + 7;
    size_t n = strlen(label);
    if (n == 0 || n > LABEL_MAX || isspace((unsigned char)label[0]) ||
        isspace((unsigned char)label[n - 1])) {
        fail_at(ld, line,
                "[policy.%s]: expected a label of 1 to %zu characters without leading or "
                "trailing spaces (this one has %zu)",
                ESC(label, e), LABEL_MAX, n);
        return;
    }
    EngineConfig *eng = &ld->rc->engine;
    for (int i = 0; i < ld->n_sections; i++)
        if (!strcmp(eng->policies[i].label, label)) {
            fail_at(ld, line, "duplicate section [policy.%s] (first at line %d)", ESC(label, e),
                    ld->rc->source->sections[i].line);
            return;
        }
    if (ld->n_sections == MAX_POLICIES) {
        fail_at(ld, line, "too many policies (at most %d)", MAX_POLICIES);
        return;
    }
    r->policy = ld->n_sections++;
    memcpy(eng->policies[r->policy].label, label, n + 1);
    eng->policies[r->policy].quant.residual = KVQ_DEFAULT_RESIDUAL;
    current_policy(ld)->line = line;
    r->sec = SEC_POLICY;
}

/* ---- The line reader ---- */

/* A line of text: UTF-8 without NUL bytes or control characters (tab aside). A NUL would end
 * the line for inih and hide what follows it; a control character could end a message's line. */
static int check_text(Loader *ld, const char *line, size_t n)
{
    const unsigned char *s = (const unsigned char *)line;
    for (size_t i = 0; i < n;) {
        size_t len;
        int32_t cp = utf8_next(s + i, n - i, &len);
        if (cp < 0)
            return reject(ld, ld->reader.line, "invalid UTF-8 at column %zu (expected UTF-8 text)",
                           i + 1);
        if (cp == 0)
            return reject(ld, ld->reader.line, "NUL byte at column %zu (expected text)", i + 1);
        if ((cp < 0x20 && cp != '\t') || (cp >= 0x7F && cp <= 0x9F))
            return reject(ld, ld->reader.line,
                           "control character U+%04X at column %zu (expected text)",
                           (unsigned)cp, i + 1);
        if (cp == 0xFEFF) /* invisible: it would make "type" another key */
            return reject(ld, ld->reader.line,
                          "byte-order mark at column %zu (expected one only at the start of the "
                          "file)",
                          i + 1);
        i += len;
    }
    return 0;
}

/* Classifies the line (n bytes at s) as inih will and starts a section on a header. inih
 * strips white space, takes ; and # in the first column as comments, and ends a section name
 * at ']' and a key at '=' or ':', unless a ';' after white space (an inline comment) comes
 * first. */
static int classify(Loader *ld, const char *s, size_t n)
{
    LineReader *r = &ld->reader;
    size_t b = 0, e = n;
    while (b < e && isspace((unsigned char)s[b]))
        b++;
    while (e > b && isspace((unsigned char)s[e - 1]))
        e--;
    if (b == e) {
        r->kind = LINE_BLANK;
        return 0;
    }
    if (s[b] == ';' || s[b] == '#') {
        r->kind = LINE_COMMENT;
        return 0;
    }
    const char *stops = s[b] == '[' ? "]" : "=:";
    size_t i = s[b] == '[' ? b + 1 : b;
    bool was_space = false;
    while (i < e && !strchr(stops, s[i]) && !(was_space && s[i] == ';')) {
        was_space = isspace((unsigned char)s[i]);
        i++;
    }
    if (s[b] == '[') {
        if (i == e || s[i] != ']')
            return reject(ld, r->line, "malformed section header (expected [NAME])");
        size_t j = i + 1;
        while (j < e && isspace((unsigned char)s[j]))
            j++;
        if (j < e && s[j] != ';' && s[j] != '#')
            return reject(ld, r->line,
                           "text after the section header (expected a ; comment or nothing)");
        size_t len = i - b - 1;
        if (len >= sizeof r->section)
            return reject(ld, r->line, "section name too long");
        memcpy(r->section, s + b + 1, len);
        r->section[len] = '\0';
        r->kind = LINE_SECTION;
        section_started(ld, r->section, r->line);
        return ld->failed ? -1 : 0;
    }
    if (i == e || (s[i] != '=' && s[i] != ':'))
        return reject(ld, r->line,
                       "malformed line (expected [section], key = value, or a ; comment)");
    if (i == b)
        return reject(ld, r->line, "no key before '%c' (expected key = value)", s[i]);
    r->kind = LINE_KEY;
    return 0;
}

static char *read_line(char *str, int num, void *stream)
{
    Loader *ld = stream;
    LineReader *r = &ld->reader;
    if (r->kind == LINE_KEY && !r->handled) /* inih did not take a line the reader accepted */
        fail_at(ld, r->line, "malformed line (expected [section], key = value, or a ; comment)");
    if (ld->failed || r->pos >= r->len)
        return NULL; /* stops inih at the first error */
    const char *s = r->buf + r->pos;
    const char *nl = memchr(s, '\n', r->len - r->pos);
    size_t n = nl ? (size_t)(nl - s) : r->len - r->pos;
    r->pos += n + (nl != NULL);
    r->line++;
    r->kind = LINE_BLANK;
    r->handled = false;
    if (n > 0 && s[n - 1] == '\r')
        n--;
    if (r->line == 1 && n >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) { /* byte-order mark */
        s += 3;
        n -= 3;
    }
    if (check_text(ld, s, n) != 0)
        return NULL;
    /* inih needs room for the line, "\r\n" and the terminator; longer lines it would cut */
    if (num < 3 || n > (size_t)num - 3) {
        fail_at(ld, r->line, "line too long: %zu bytes (at most %d)", n, num - 3);
        return NULL;
    }
    memcpy(str, s, n);
    str[n] = '\n';
    str[n + 1] = '\0';
    if (classify(ld, str, n) != 0)
        return NULL;
    return str;
}

/* ---- Keys ---- */

static int parse_int(const char *value, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end != '\0' || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int run_key(Loader *ld, const char *key, const char *value, int line)
{
    EngineConfig *e = &ld->rc->engine;
    long v;
    char ev[160], ek[96];
    ESC(value, ev);
    if (!strcmp(key, "out")) {
        if (!value[0])
            return fail_at(ld, line, "out is empty (expected a directory)");
        if (strlen(value) >= sizeof ld->rc->out_dir)
            return fail_at(ld, line, "out: path too long");
        strcpy(ld->rc->out_dir, value);
    } else if (!strcmp(key, "threads")) {
        if (parse_int(value, 0, 1024, &v))
            return fail_at(ld, line, "threads = '%s': expected an integer in [0, 1024] (0 = all cores)", ev);
        e->threads = (int)v;
    } else if (!strcmp(key, "topk")) {
        if (parse_int(value, 1, 1 << 20, &v))
            return fail_at(ld, line, "topk = '%s': expected a positive integer", ev);
        e->topk = (int)v;
    } else if (!strcmp(key, "eval_every")) {
        if (parse_int(value, 1, INT_MAX, &v))
            return fail_at(ld, line, "eval_every = '%s': expected a positive integer", ev);
        e->eval_every = (int)v;
    } else if (!strcmp(key, "kv_bits")) {
        if (parse_int(value, 1, 32, &v))
            return fail_at(ld, line, "kv_bits = '%s': expected an integer in [1, 32]", ev);
        e->kv_bits = (int)v;
    } else if (!strcmp(key, "seed")) {
        if (parse_int(value, 0, LONG_MAX, &v))
            return fail_at(ld, line, "seed = '%s': expected a non-negative integer", ev);
        e->seed = (uint64_t)v;
    } else if (!strcmp(key, "prefill_chunk")) {
        if (parse_int(value, 0, INT_MAX, &v))
            return fail_at(ld, line, "prefill_chunk = '%s': expected a non-negative integer (0 = each prefill span at once)", ev);
        e->prefill_chunk = (int)v;
        ld->rc->prefill_chunk_line = line;
    } else if (!strcmp(key, "history")) {
        int h = run_history_parse(value);
        if (h >= 0)
            e->history = (RunHistory)h;
        else
            return fail_at(ld, line, "history = '%s': expected persist, reencode or prefix", ev);
    } else if (!strcmp(key, "sliding_layers")) {
        int sl = sliding_layers_parse(value);
        if (sl < 0)
            return fail_at(ld, line, "sliding_layers = '%s': expected skip or compress", ev);
        e->sliding_layers = (SlidingLayers)sl;
    } else if (!strcmp(key, "prefill_tflops")) {
        char *end;
        errno = 0;
        double d = strtod(value, &end);
        if (errno || end == value || *end != '\0' || !isfinite(d) || d < 0)
            return fail_at(ld, line, "prefill_tflops = '%s': expected a finite number >= 0 (0 = no prefill time in turns.csv)", ev);
        e->prefill_tflops = d;
    } else if (!strcmp(key, "budget") || !strcmp(key, "ratio")) {
        bool is_budget = key[0] == 'b';
        if (ld->rc->budget_line)
            return fail_at(ld, line, "%s: [run] %s is given at line %d (expected budget or ratio, "
                           "not both)", key, ld->rc->budget ? "budget" : "ratio",
                           ld->rc->budget_line);
        if (is_budget) {
            if (parse_int(value, 1, 1 << 30, &v))
                return fail_at(ld, line, "budget = '%s': expected a positive integer (tokens per KV head)", ev);
            ld->rc->budget = (int)v;
        } else {
            char *end;
            errno = 0;
            double d = strtod(value, &end);
            if (errno || end == value || *end != '\0' || !(d > 0 && d <= 1))
                return fail_at(ld, line, "ratio = '%s': expected a number in (0, 1] (the share of the context kept)", ev);
            ld->rc->ratio = d;
        }
        ld->rc->budget_line = line;
    } else if (!strcmp(key, "reference")) {
        if (!value[0] || strlen(value) >= sizeof ld->rc->reference)
            return fail_at(ld, line, "reference = '%s': expected the label of a [policy.LABEL] "
                           "section", ev);
        strcpy(ld->rc->reference, value);
        ld->rc->reference_line = line;
    } else {
        return fail_at(ld, line, "unknown key '%s' in [run] (expected threads, out, topk, eval_every, kv_bits, seed, prefill_chunk, history, sliding_layers, prefill_tflops, budget, ratio or reference)",
                       ESC(key, ek));
    }
    return 1;
}

static int trace_key(Loader *ld, const char *key, const char *value, int line)
{
    char ek[96];
    if (strcmp(key, "path"))
        return fail_at(ld, line, "unknown key '%s' in [trace] (expected path)", ESC(key, ek));
    if (!value[0])
        return fail_at(ld, line, "path is empty (expected a trace file)");
    if (strlen(value) >= sizeof ld->rc->trace_path)
        return fail_at(ld, line, "path: too long");
    strcpy(ld->rc->trace_path, value);
    ld->rc->trace_line = line;
    return 1;
}

/* The keys every policy section takes, whatever its type: the quantization layer under the
 * policy (policies/kvquant.h). Returns 1 when `key` is one of them and was parsed into
 * spec->quant, 0 when it is not one, -1 with a message for a bad value. */
static int quant_key(PolicySpec *spec, const char *key, const char *value, KvErr *err)
{
    if (!strcmp(key, "kv_quant")) {
        int kind = kvq_parse(value);
        if (kind < 0)
            return kv_fail(err, "kv_quant = '%s': expected one of " KVQ_CHOICES, value);
        spec->quant.kind = kind;
        return 1;
    }
    bool group = !strcmp(key, "kv_quant_group");
    if (!group && strcmp(key, "kv_quant_residual"))
        return 0;
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end || v < (group ? 0 : 1) || v > (1 << 20))
        return kv_fail(err, "%s = '%s': expected an integer in [%d, %d]", key, value,
                       group ? 0 : 1, 1 << 20);
    *(group ? &spec->quant.group : &spec->quant.residual) = (int)v;
    return 1;
}

static int apply_param(Loader *ld, PolicySpec *spec, const KeyEntry *k)
{
    KvErr perr;
    char label[96], msg[sizeof ld->err.msg];
    int q = quant_key(spec, k->key, k->value, &perr);
    if (q < 0)
        return fail_at(ld, k->line, "[policy.%s] %s", ESC(spec->label, label), ESC(perr.msg, msg));
    if (q > 0)
        return 1;
    if (policy_param_set(spec->type, spec->params, k->key, k->value, &perr) != 0)
        return fail_at(ld, k->line, "[policy.%s] %s", ESC(spec->label, label), ESC(perr.msg, msg));
    return 1;
}

/* The key is already recorded in the section's list; keys before type= are applied with it. */
static int policy_key(Loader *ld, const char *key, const char *value, int line)
{
    PolicySection *ps = current_policy(ld);
    PolicySpec *spec = &ld->rc->engine.policies[ld->reader.policy];
    if (strcmp(key, "type"))
        return spec->type ? apply_param(ld, spec, &ps->keys.v[ps->keys.n - 1]) : 1;
    char label[96], ev[160];
    spec->type = policy_find(value);
    if (!spec->type) {
        char known[1024] = "";
        int n;
        const PolicyType *const *all = policy_types(&n);
        for (int i = 0; i < n; i++) {
            if (i)
                strncat(known, ", ", sizeof known - strlen(known) - 1);
            strncat(known, all[i]->name, sizeof known - strlen(known) - 1);
        }
        return fail_at(ld, line, "[policy.%s] unknown policy type '%s' (known: %s)",
                       ESC(spec->label, label), ESC(value, ev), known);
    }
    spec->params = kv_calloc(1, spec->type->params_size);
    policy_params_defaults(spec->type, spec->params);
    for (int i = 0; i < ps->keys.n; i++)
        if (strcmp(ps->keys.v[i].key, "type") && !apply_param(ld, spec, &ps->keys.v[i]))
            return 0;
    return 1;
}

static int handler(void *user, const char *section, const char *key, const char *value)
{
    Loader *ld = user;
    LineReader *r = &ld->reader;
    int line = r->line;
    if (ld->failed)
        return 0;
    /* inih and the reader must agree: a key line, once, in the section the reader tracks
     * (inih's copy of the name may be cut short) */
    if (r->kind != LINE_KEY || r->handled || strncmp(r->section, section, strlen(section)))
        return fail_at(ld, line, "malformed line (expected [section], key = value, or a ; comment)");
    r->handled = true;
    char ek[96];
    if (r->sec == SEC_NONE)
        return fail_at(ld, line, "key '%s' before any section (expected [trace], [run] or [policy.LABEL] first)",
                       ESC(key, ek));
    KeyList *keys = r->sec == SEC_POLICY ? &current_policy(ld)->keys : &ld->plain_keys;
    const KeyEntry *first = keys_find(keys, key);
    char es[160];
    if (first)
        return fail_at(ld, line, "key '%s' given twice in [%s] (first at line %d)", ESC(key, ek),
                       ESC(r->section, es), first->line);
    /* inih ends a value at " ;" only: "out = dir # note" would be the directory "dir # note" */
    for (const char *p = value; *p; p++)
        if (*p == '#' && p > value && isspace((unsigned char)p[-1]))
            return fail_at(ld, line,
                           "'%s': a '#' after a space in the value (a comment after a value starts "
                           "with ' ;')",
                           ESC(key, ek));
    if (keys->n == MAX_KEYS)
        return fail_at(ld, line, "too many keys in [%s] (at most %d)", ESC(r->section, es),
                       MAX_KEYS);
    keys_add(keys, key, value, line);
    switch (r->sec) {
    case SEC_TRACE:
        return trace_key(ld, key, value, line);
    case SEC_RUN:
        return run_key(ld, key, value, line);
    default:
        return policy_key(ld, key, value, line);
    }
}

/* ---- Loading ---- */

int config_load(const char *path, RunConfig *rc, KvErr *err)
{
    memset(rc, 0, sizeof *rc);
    if (strlen(path) >= sizeof rc->config_path)
        return kv_fail(err, "%s: path too long", path);
    size_t len;
    char *text = kv_read_input(path, MAX_CONFIG_BYTES, &len, err);
    if (!text)
        return -1;
    strcpy(rc->config_path, path);
    EngineConfig *e = &rc->engine;
    e->threads = 0;
    e->topk = 32;
    e->eval_every = 1;
    e->kv_bits = 16;
    e->seed = 0;
    e->prefill_chunk = 0;
    e->history = HISTORY_PERSIST;
    e->sliding_layers = SLIDING_SKIP;
    e->policies = kv_calloc(MAX_POLICIES, sizeof *e->policies);
    rc->source = kv_calloc(1, sizeof *rc->source);

    Loader *ld = kv_calloc(1, sizeof *ld);
    ld->rc = rc;
    ld->reader.buf = text;
    ld->reader.len = len;
    /* The reader handles the byte-order mark and rejects indented continuation lines; inih's
     * other options keep their defaults, which the reader mirrors. */
    ini_allow_multiline = false;
    ini_allow_bom = false;
    ini_allow_inline_comments = true;
    ini_allow_no_value = false;
    ini_stop_on_first_error = false;
    int rcode = ini_parse_stream(read_line, ld, handler, ld);
    if (!ld->failed && ld->reader.kind == LINE_KEY && !ld->reader.handled)
        fail_at(ld, ld->reader.line, "malformed line (expected [section], key = value, or a ; comment)");
    if (!ld->failed && rcode > 0) /* not expected: the reader stops inih before any error */
        fail_at(ld, rcode, "malformed line (expected [section], key = value, or a ; comment)");
    if (!ld->failed && rcode < 0)
        fail_at(ld, ld->reader.line, "cannot parse (inih error %d)", rcode);
    finish_section(ld);
    if (!ld->failed && ld->n_sections == 0) /* an empty file has no line 1: report line 1 */
        fail_at(ld, ld->reader.line > 0 ? ld->reader.line : 1,
                "no [policy.LABEL] section: nothing to compare");
    e->n_policies = ld->n_sections;
    if (!ld->failed && rc->reference_line && config_reference(rc) < 0) {
        char er[160];
        fail_at(ld, rc->reference_line, "reference = '%s': no [policy.%s] section (expected the "
                "label of a policy)", ESC(rc->reference, er), er);
    }
    if (!ld->failed && rc->budget && config_apply_budget(rc, e->policies, rc->budget, NULL,
                                                         &ld->err) != 0)
        ld->failed = true;
    if (!ld->failed && !rc->out_dir[0]) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        size_t n = strcspn(base, ".");
        snprintf(rc->out_dir, sizeof rc->out_dir, "results/%.*s", (int)n, base);
    }
    keys_free(&ld->plain_keys);
    free(text);
    bool failed = ld->failed;
    if (failed)
        *err = ld->err;
    free(ld);
    if (failed) {
        config_free(rc);
        return -1;
    }
    return 0;
}

/* ---- Checks against the simulated model ---- */

static const char *layout_name(RopeLayout l)
{
    return l == ROPE_HALF ? "half" : "interleaved";
}

int config_check_closed_loop(const RunConfig *rc, KvErr *err)
{
    if (rc->engine.prefill_chunk > 0)
        return kv_fail(err, "%s:%d: prefill_chunk = %d: closed loop prefills the prompt in one "
                       "pass (expected 0; chunked prefill is for `kvsim run`)",
                       rc->config_path, rc->prefill_chunk_line, rc->engine.prefill_chunk);
    return 0;
}

const char *config_calibration(const RunConfig *rc, int i)
{
    const PolicySpec *spec = &rc->engine.policies[i];
    const ParamSpec *p = spec->type->params;
    while (p && p->key && !(p->kind == PARAM_STRING && !strcmp(p->key, "calibration")))
        p++;
    if (!p || !p->key)
        return NULL;
    const char *cal = (const char *)spec->params + p->offset;
    return strcmp(cal, "online") ? cal : NULL;
}

int config_check_model(const RunConfig *rc, const char *model, int n_layers, int n_q_heads,
                       int head_dim, RopeLayout rope_layout, KvErr *err)
{
    for (int i = 0; i < rc->engine.n_policies; i++) {
        const PolicySpec *spec = &rc->engine.policies[i];
        const char *cal = config_calibration(rc, i);
        if (!cal)
            continue;
        const PolicySection *ps = &rc->source->sections[i];
        const KeyEntry *k = keys_find(&ps->keys, "calibration");
        int line = k ? k->line : ps->line;
        char label[96], ec[160];
        ESC(spec->label, label);
        ESC(cal, ec);
        KvErr terr;
        Trace *tr = trace_open(cal, &terr);
        if (!tr)
            return kv_fail(err, "%s:%d: [policy.%s] calibration: %s", rc->config_path, line,
                           label, terr.msg);
        const TraceMeta *m = trace_meta(tr);
        bool fits = m->n_layers >= n_layers && m->n_q_heads == n_q_heads &&
                    m->head_dim == head_dim && m->rope_layout == rope_layout;
        if (!fits)
            kv_fail(err,
                    "%s:%d: [policy.%s] calibration = %s: a trace of %d layers, %d query heads, "
                    "head_dim %d, rope_layout %s; %s has %d layers, %d query heads, head_dim %d, "
                    "rope_layout %s (expected a trace of the same model)",
                    rc->config_path, line, label, ec, m->n_layers, m->n_q_heads, m->head_dim,
                    layout_name(m->rope_layout), model, n_layers, n_q_heads, head_dim,
                    layout_name(rope_layout));
        trace_close(tr);
        if (!fits)
            return -1;
    }
    return 0;
}

/* ---- One budget for every policy ---- */

/* The key that holds a type's budget: the one a section sets to choose its own. */
static const char *budget_key(const PolicyType *type)
{
    if (!strcmp(type->name, "window"))
        return "window";
    for (const ParamSpec *p = type->params; p && p->key; p++)
        if (p->kind == PARAM_INT && !strcmp(p->key, "budget"))
            return "budget";
    if (type->set_extra) /* a wrapper (policies/wrap.h): its inner policy's budget */
        return "budget";
    return NULL; /* full: keeps every token */
}

bool config_policy_budgeted(const RunConfig *rc, int i)
{
    const PolicySpec *spec = &rc->engine.policies[i];
    const char *key = budget_key(spec->type);
    return rc->budget_line && key && !keys_find(&rc->source->sections[i].keys, key);
}

int config_reference(const RunConfig *rc)
{
    const EngineConfig *e = &rc->engine;
    const char *want = rc->reference[0] ? rc->reference : "full";
    for (int i = 0; i < e->n_policies; i++)
        if (!strcmp(e->policies[i].label, want))
            return i;
    if (rc->reference[0])
        return -1;
    for (int i = 0; i < e->n_policies; i++)
        if (!strcmp(e->policies[i].type->name, "full"))
            return i;
    return -1;
}

int config_ratio_budget(const RunConfig *rc, int n_prompt)
{
    return (int)floor(rc->ratio * n_prompt);
}

static int int_param(const PolicySpec *spec, const char *key)
{
    for (const ParamSpec *p = spec->type->params; p && p->key; p++)
        if (!strcmp(p->key, key))
            return *(const int *)((const char *)spec->params + p->offset);
    return 0;
}

/* A budget of B tokens per KV head as the type's parameters, the sweep's scaling
 * (docs/sweeps.md): a parameter that is a share of the budget at 512 in configs/ta512.ini is
 * the same share of B. Returns the number of key = value pairs written into out. */
typedef struct {
    const char *key;
    int value;
} BudgetParam;

static int budget_params(const PolicySpec *spec, int B, BudgetParam out[4])
{
    const char *name = spec->type->name;
    int quarter = B / 4, cap = quarter < 128 ? quarter : 128;
    if (!strcmp(name, "window")) { /* the sinks (the section's or the default) come first */
        out[0] = (BudgetParam){"window", B - int_param(spec, "sinks")};
        return 1;
    }
    out[0] = (BudgetParam){"budget", B};
    if (!strcmp(name, "decay")) { /* local < budget: a quarter for the recent tokens */
        out[1] = (BudgetParam){"local", quarter};
        return 2;
    }
    if (!strcmp(name, "abit")) { /* span < budget - local; max_split: half the span */
        out[1] = (BudgetParam){"local", quarter};
        out[2] = (BudgetParam){"span", quarter};
        out[3] = (BudgetParam){"max_split", B / 8};
        return 4;
    }
    if (!strcmp(name, "trig")) { /* protect_initial + protect_recent < budget; the prune period
                                  * shrinks with the budget, so the cache stays near it */
        out[1] = (BudgetParam){"divide_length", cap};
        out[2] = (BudgetParam){"protect_recent", cap};
        return 3;
    }
    return 1;
}

/* Sets spec (policy i's, or a copy) to `budget` tokens per KV head by budget_params. A
 * parameter the section sets stays unless `rescale` (the section's budget-like parameters are
 * then taken as its design at its own budget and all scaled to the new one). An error is
 * "FILE:LINE: [policy.X] what (from `given`)". */
static int set_budget(const RunConfig *rc, int i, PolicySpec *spec, int budget, bool rescale,
                      int line, const char *given, KvErr *err)
{
    const KeyList *keys = &rc->source->sections[i].keys;
    BudgetParam bp[4];
    int n = budget_params(spec, budget, bp);
    char label[96], msg[sizeof err->msg];
    ESC(spec->label, label);
    KvErr perr;
    for (int j = 0; j < n; j++) {
        if (j > 0 && !rescale && keys_find(keys, bp[j].key)) /* the section's own value stays */
            continue;
        char value[32];
        snprintf(value, sizeof value, "%d", bp[j].value);
        if (policy_param_set(spec->type, spec->params, bp[j].key, value, &perr) != 0)
            return kv_fail(err, "%s:%d: [policy.%s] %s (from %s)", rc->config_path, line, label,
                           ESC(perr.msg, msg), given);
    }
    if (spec->type->validate && spec->type->validate(spec->params, &perr) != 0)
        return kv_fail(err, "%s:%d: [policy.%s] %s (from %s)", rc->config_path, line, label,
                       ESC(perr.msg, msg), given);
    return 0;
}

int config_apply_budget(const RunConfig *rc, PolicySpec *specs, int budget, const char *context,
                        KvErr *err)
{
    char given[256];
    if (rc->budget)
        snprintf(given, sizeof given, "[run] budget = %d", budget);
    else
        snprintf(given, sizeof given, "[run] ratio = %g: budget %d of %s", rc->ratio, budget,
                 context ? context : "the context");
    for (int i = 0; i < rc->engine.n_policies; i++)
        if (config_policy_budgeted(rc, i) &&
            set_budget(rc, i, &specs[i], budget, false, rc->budget_line, given, err) != 0)
            return -1;
    return 0;
}

bool config_type_has_budget(const PolicyType *type)
{
    return budget_key(type) != NULL;
}

bool config_policy_has_budget(const RunConfig *rc, int i)
{
    return config_type_has_budget(rc->engine.policies[i].type);
}

int config_sweep_budget(const RunConfig *rc, int i, PolicySpec *spec, int budget,
                        const char *given, KvErr *err)
{
    if (!config_policy_has_budget(rc, i))
        return 0;
    const PolicySection *ps = &rc->source->sections[i];
    bool own = keys_find(&ps->keys, budget_key(spec->type)) != NULL;
    return set_budget(rc, i, spec, budget, own, ps->line, given, err);
}

void config_free(RunConfig *rc)
{
    if (rc->engine.policies)
        for (int i = 0; i < MAX_POLICIES; i++)
            free(rc->engine.policies[i].params);
    free(rc->engine.policies);
    rc->engine.policies = NULL;
    rc->engine.n_policies = 0;
    if (rc->source)
        for (int i = 0; i < MAX_POLICIES; i++)
            keys_free(&rc->source->sections[i].keys);
    free(rc->source);
    rc->source = NULL;
}
