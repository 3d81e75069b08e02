/* INI loading on inih. inih reports lines only for syntax errors, so the file is fed to it
 * through a line-counting reader: every key, section and error is known by its line. */
#include "sim/config.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define MAX_POLICIES 64

typedef struct {
    FILE *fp;
    int line;           /* number of the line inih is processing */
    char section[128];  /* current section as seen by the reader */
    int section_line;
    bool line_too_long;
} LineReader;

typedef struct {
    char label[64];
    int line;          /* line of the section header */
    const PolicyType *type;
    int type_line;
    /* key=value pairs seen before type= */
    int n_pending;
    char pending_key[32][64];
    char pending_value[32][256];
    int pending_line[32];
} PolicySection;

typedef struct {
    LineReader reader;
    RunConfig *rc;
    KvErr err;
    int err_line; /* first error, 0 = none */
    int n_sections;
    PolicySection sections[MAX_POLICIES];
    bool seen_trace_path;
} Loader;

static int fail_at(Loader *ld, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static PolicySection *policy_section(Loader *ld, const char *label, int line);

/* A section header is checked here, where its line is known, so that an empty or misspelt
 * section is reported too (inih only calls the handler for keys). */
static void section_started(Loader *ld, const char *name, int line)
{
    if (!strncmp(name, "policy.", 7))
        policy_section(ld, name + 7, line);
    else if (strcmp(name, "trace") && strcmp(name, "run"))
        fail_at(ld, line, "unknown section [%s] (expected [trace], [run] or [policy.LABEL])", name);
}

static char *read_line(char *str, int num, void *stream)
{
    Loader *ld = stream;
    LineReader *r = &ld->reader;
    char *s = fgets(str, num, r->fp);
    if (!s)
        return NULL;
    r->line++;
    size_t len = strlen(s);
    if (len == (size_t)num - 1 && s[len - 1] != '\n' && !feof(r->fp))
        r->line_too_long = true;
    /* Track section headers here: inih does not tell the handler where a section starts. */
    const char *p = s;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '[') {
        const char *end = strchr(p, ']');
        if (end && (size_t)(end - p - 1) < sizeof r->section) {
            memcpy(r->section, p + 1, (size_t)(end - p - 1));
            r->section[end - p - 1] = '\0';
            r->section_line = r->line;
            section_started(ld, r->section, r->line);
        }
    }
    return s;
}

static int fail_at(Loader *ld, int line, const char *fmt, ...)
{
    if (ld->err_line == 0) {
        char msg[sizeof ld->err.msg];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        ld->err_line = line;
        kv_fail(&ld->err, "%s:%d: %s", ld->rc->config_path, line, msg);
    }
    return 0; /* tells inih there was an error */
}

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
    if (!strcmp(key, "out")) {
        if (strlen(value) >= sizeof ld->rc->out_dir)
            return fail_at(ld, line, "out: path too long");
        strcpy(ld->rc->out_dir, value);
    } else if (!strcmp(key, "threads")) {
        if (parse_int(value, 0, 1024, &v))
            return fail_at(ld, line, "threads = '%s': expected an integer in [0, 1024] (0 = all cores)", value);
        e->threads = (int)v;
    } else if (!strcmp(key, "topk")) {
        if (parse_int(value, 1, 1 << 20, &v))
            return fail_at(ld, line, "topk = '%s': expected a positive integer", value);
        e->topk = (int)v;
    } else if (!strcmp(key, "eval_every")) {
        if (parse_int(value, 1, INT_MAX, &v))
            return fail_at(ld, line, "eval_every = '%s': expected a positive integer", value);
        e->eval_every = (int)v;
    } else if (!strcmp(key, "kv_bits")) {
        if (parse_int(value, 1, 32, &v))
            return fail_at(ld, line, "kv_bits = '%s': expected an integer in [1, 32]", value);
        e->kv_bits = (int)v;
    } else if (!strcmp(key, "seed")) {
        if (parse_int(value, 0, LONG_MAX, &v))
            return fail_at(ld, line, "seed = '%s': expected a non-negative integer", value);
        e->seed = (uint64_t)v;
    } else {
        return fail_at(ld, line, "unknown key '%s' in [run] (expected threads, out, topk, eval_every, kv_bits or seed)", key);
    }
    return 1;
}

static PolicySection *policy_section(Loader *ld, const char *label, int line)
{
    for (int i = 0; i < ld->n_sections; i++)
        if (ld->sections[i].line == line)
            return &ld->sections[i];
    for (int i = 0; i < ld->n_sections; i++)
        if (!strcmp(ld->sections[i].label, label)) {
            fail_at(ld, line, "duplicate section [policy.%s] (first at line %d)", label, ld->sections[i].line);
            return NULL;
        }
    if (ld->n_sections == MAX_POLICIES) {
        fail_at(ld, line, "too many policies (at most %d)", MAX_POLICIES);
        return NULL;
    }
    if (!label[0] || strlen(label) >= sizeof ld->sections[0].label) {
        fail_at(ld, line, "[policy.LABEL]: expected a label of 1 to %zu characters",
                sizeof ld->sections[0].label - 1);
        return NULL;
    }
    PolicySection *ps = &ld->sections[ld->n_sections++];
    memset(ps, 0, sizeof *ps);
    strcpy(ps->label, label);
    ps->line = line;
    return ps;
}

static int apply_param(Loader *ld, PolicySection *ps, void *params, const char *key,
                       const char *value, int line)
{
    KvErr perr;
    if (policy_param_set(ps->type, params, key, value, &perr) != 0)
        return fail_at(ld, line, "[policy.%s] %s", ps->label, perr.msg);
    return 1;
}

static int policy_key(Loader *ld, const char *label, const char *key, const char *value, int line)
{
    PolicySection *ps = policy_section(ld, label, ld->reader.section_line);
    if (!ps)
        return 0;
    EngineConfig *e = &ld->rc->engine;
    int idx = (int)(ps - ld->sections);
    if (!strcmp(key, "type")) {
        if (ps->type)
            return fail_at(ld, line, "[policy.%s] type given twice", label);
        ps->type = policy_find(value);
        if (!ps->type) {
            char known[1024] = "";
            int n;
            const PolicyType *const *all = policy_types(&n);
            for (int i = 0; i < n; i++) {
                if (i)
                    strncat(known, ", ", sizeof known - strlen(known) - 1);
                strncat(known, all[i]->name, sizeof known - strlen(known) - 1);
            }
            return fail_at(ld, line, "[policy.%s] unknown policy type '%s' (known: %s)", label, value, known);
        }
        ps->type_line = line;
        PolicySpec *spec = &e->policies[idx];
        strcpy(spec->label, label);
        spec->type = ps->type;
        spec->params = kv_calloc(1, ps->type->params_size);
        policy_params_defaults(ps->type, spec->params);
        for (int i = 0; i < ps->n_pending; i++)
            if (!apply_param(ld, ps, spec->params, ps->pending_key[i], ps->pending_value[i], ps->pending_line[i]))
                return 0;
        return 1;
    }
    if (!ps->type) {
        if (ps->n_pending == 32 || strlen(key) >= 64 || strlen(value) >= 256)
            return fail_at(ld, line, "[policy.%s] too many or too long keys before type=", label);
        strcpy(ps->pending_key[ps->n_pending], key);
        strcpy(ps->pending_value[ps->n_pending], value);
        ps->pending_line[ps->n_pending++] = line;
        return 1;
    }
    return apply_param(ld, ps, e->policies[idx].params, key, value, line);
}

static int handler(void *user, const char *section, const char *key, const char *value)
{
    Loader *ld = user;
    int line = ld->reader.line;
    if (!strcmp(section, "trace")) {
        if (strcmp(key, "path"))
            return fail_at(ld, line, "unknown key '%s' in [trace] (expected path)", key);
        if (strlen(value) >= sizeof ld->rc->trace_path)
            return fail_at(ld, line, "path: too long");
        strcpy(ld->rc->trace_path, value);
        ld->seen_trace_path = true;
        return 1;
    }
    if (!strcmp(section, "run"))
        return run_key(ld, key, value, line);
    if (!strncmp(section, "policy.", 7))
        return policy_key(ld, section + 7, key, value, line);
    return fail_at(ld, line, "unknown section [%s] (expected [trace], [run] or [policy.LABEL])", section);
}

int config_load(const char *path, RunConfig *rc, KvErr *err)
{
    memset(rc, 0, sizeof *rc);
    if (strlen(path) >= sizeof rc->config_path)
        return kv_fail(err, "%s: path too long", path);
    strcpy(rc->config_path, path);
    EngineConfig *e = &rc->engine;
    e->threads = 0;
    e->topk = 32;
    e->eval_every = 1;
    e->kv_bits = 16;
    e->seed = 0;
    e->policies = kv_calloc(MAX_POLICIES, sizeof *e->policies);

    Loader *ld = kv_calloc(1, sizeof *ld);
    ld->rc = rc;
    ld->reader.fp = fopen(path, "r");
    if (!ld->reader.fp) {
        int saved = errno;
        free(ld);
        config_free(rc);
        return kv_fail(err, "%s: cannot read config: %s", path, strerror(saved));
    }
    ini_allow_multiline = false; /* an indented line is an error, not a silent continuation */
    int rcode = ini_parse_stream(read_line, ld, handler, ld);
    fclose(ld->reader.fp);
    if (ld->reader.line_too_long && !ld->err_line)
        fail_at(ld, rcode > 0 ? rcode : ld->reader.line, "line too long (at most %d characters)", INI_MAX_LINE - 3);
    if (rcode > 0 && !ld->err_line)
        fail_at(ld, rcode, "malformed line (expected [section], key = value, or a ; comment)");
    for (int i = 0; !ld->err_line && i < ld->n_sections; i++) {
        PolicySection *ps = &ld->sections[i];
        if (!ps->type) {
            fail_at(ld, ps->line, "[policy.%s] has no type= (one of the names `kvsim policies` lists)", ps->label);
            break;
        }
        KvErr verr;
        if (ps->type->validate && ps->type->validate(e->policies[i].params, &verr) != 0)
            fail_at(ld, ps->line, "[policy.%s] %s", ps->label, verr.msg);
    }
    if (!ld->err_line && ld->n_sections == 0) /* an empty file has no line 1: report line 1 */
        fail_at(ld, ld->reader.line > 0 ? ld->reader.line : 1,
                "no [policy.LABEL] section: nothing to compare");
    e->n_policies = ld->n_sections;
    if (!ld->err_line && !rc->out_dir[0]) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        size_t n = strcspn(base, ".");
        snprintf(rc->out_dir, sizeof rc->out_dir, "results/%.*s", (int)n, base);
    }
    if (ld->err_line) {
        *err = ld->err;
        free(ld);
        config_free(rc);
        return -1;
    }
    free(ld);
    return 0;
}

void config_free(RunConfig *rc)
{
    if (rc->engine.policies)
        for (int i = 0; i < MAX_POLICIES; i++)
            free(rc->engine.policies[i].params);
    free(rc->engine.policies);
    rc->engine.policies = NULL;
    rc->engine.n_policies = 0;
}
