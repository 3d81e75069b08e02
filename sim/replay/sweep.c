#include "sim/replay/sweep.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim/replay/metric_table.h"

/* ---- The plan ---- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int sweep_parse_values(SweepPlan *plan, const char *list, bool ratios, KvErr *err)
{
    const char *opt = ratios ? "--ratios" : "--budgets";
    double v[SWEEP_MAX_VALUES];
    int n = 0;
    const char *s = list;
    for (;;) {
        size_t len = strcspn(s, ",");
        char item[64], esc[160];
        if (len == 0 || len >= sizeof item)
            return kv_fail(err, "%s %s: item %d is %s (expected a comma-separated list of %s)",
                           opt, kv_escape(list, strlen(list), esc, sizeof esc), n + 1,
                           len ? "too long" : "empty",
                           ratios ? "ratios in (0, 1]" : "positive integers");
        memcpy(item, s, len);
        item[len] = 0;
        char *end;
        errno = 0;
        double x;
        if (ratios) {
            x = strtod(item, &end);
            if (*end || errno || !(x > 0 && x <= 1))
                return kv_fail(err, "%s: '%s' is not a ratio in (0, 1] (share of the prompt kept)",
                               opt, kv_escape(item, len, esc, sizeof esc));
        } else {
            long b = strtol(item, &end, 10);
            if (*end || errno || b < 1 || b > 1000000000 || item[0] == '+' || item[0] == ' ')
                return kv_fail(err, "%s: '%s' is not a positive integer (tokens per KV head)",
                               opt, kv_escape(item, len, esc, sizeof esc));
            x = (double)b;
        }
        if (n == SWEEP_MAX_VALUES)
            return kv_fail(err, "%s: more than %d values", opt, SWEEP_MAX_VALUES);
        v[n++] = x;
        if (!s[len])
            break;
        s += len + 1;
    }
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    plan->ratios = ratios;
    plan->n_values = n;
    for (int i = 0; i < n; i++) {
        plan->budget[i] = ratios ? 0 : (int)v[i];
        plan->ratio[i] = ratios ? v[i] : 0;
        if (ratios)
            snprintf(plan->value[i], sizeof plan->value[i], "%g", v[i]);
        else
            snprintf(plan->value[i], sizeof plan->value[i], "%d", (int)v[i]);
        if (i > 0 && !strcmp(plan->value[i], plan->value[i - 1]))
            return kv_fail(err, "%s: %s is given twice", opt, plan->value[i]);
    }
    return 0;
}

int sweep_add_trace(SweepPlan *plan, const char *path, KvErr *err)
{
    if (plan->n_traces == SWEEP_MAX_TRACES)
        return kv_fail(err, "%s: more than %d traces", path, SWEEP_MAX_TRACES);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    if (n > 3 && !strcmp(base + n - 3, ".h5"))
        n -= 3;
    char esc[300];
    if (n == 0 || n > 200 || strcspn(base, ",\"\n\t") < n)
        return kv_fail(err, "%s: the file name '%s' cannot name a trace of the sweep (expected "
                       "1 to 200 bytes, no comma, quote, tab or newline)", path,
                       kv_escape(base, strlen(base), esc, sizeof esc));
    char *name = kv_malloc(n + 1);
    memcpy(name, base, n);
    name[n] = 0;
    for (int t = 0; t < plan->n_traces; t++)
        if (!strcmp(plan->trace_name[t], name)) {
            kv_fail(err, "%s: a trace named '%s' is already in the sweep (%s): expected traces "
                    "of distinct file names", path, kv_escape(name, n, esc, sizeof esc),
                    plan->trace_path[t]);
            free(name);
            return -1;
        }
    plan->trace_path = kv_realloc(plan->trace_path, (size_t)(plan->n_traces + 1) * sizeof(char *));
    plan->trace_name = kv_realloc(plan->trace_name, (size_t)(plan->n_traces + 1) * sizeof(char *));
    plan->trace_path[plan->n_traces] = kv_strdup(path);
    plan->trace_name[plan->n_traces] = name;
    plan->n_traces++;
    return 0;
}

void sweep_plan_free(SweepPlan *plan)
{
    for (int t = 0; t < plan->n_traces; t++) {
        free(plan->trace_path[t]);
        free(plan->trace_name[t]);
    }
    free(plan->trace_path);
    free(plan->trace_name);
    plan->trace_path = plan->trace_name = NULL;
    plan->n_traces = 0;
}

void sweep_shard_range(const SweepPlan *p, int *first, int *end)
{
    long long n = sweep_n_cells(p);
    *first = (int)(n * p->shard / p->n_shards);
    *end = (int)(n * (p->shard + 1) / p->n_shards);
}

void sweep_cell_dir(const SweepPlan *p, const char *out, int c, char *buf, size_t n)
{
    int t, pol, v;
    sweep_cell(p, c, &t, &pol, &v);
    snprintf(buf, n, "%s/cells/t%d/p%d/%c%s", out, t, pol, p->ratios ? 'r' : 'b', p->value[v]);
}

bool sweep_cell_done(const SweepPlan *p, const char *out, int c)
{
    char dir[4400], path[4600];
    sweep_cell_dir(p, out, c, dir, sizeof dir);
    for (int o = 0; o < N_OUTPUTS; o++) {
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, metric_output_file((MetricOutput)o));
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            return false;
    }
    return true;
}

/* ---- sweep.txt ---- */

static const char PLAN_MAGIC[] = "kvsim sweep 1";

int sweep_plan_write(const SweepPlan *p, const char *out, KvErr *err)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/sweep.txt", out);
    AtomicFile af;
    if (atomic_open(&af, path, err) != 0)
        return -1;
    fprintf(af.fp, "%s\nconfig_sha256 %s\n%s ", PLAN_MAGIC, p->config_sha256,
            p->ratios ? "ratios" : "budgets");
    for (int v = 0; v < p->n_values; v++)
        fprintf(af.fp, "%s%s", v ? "," : "", p->value[v]);
    fprintf(af.fp, "\ntraces %d\n", p->n_traces);
    for (int t = 0; t < p->n_traces; t++)
        fprintf(af.fp, "trace %s\t%s\n", p->trace_name[t], p->trace_path[t]);
    fprintf(af.fp, "policies %d\n", p->n_policies);
    for (int i = 0; i < p->n_policies; i++)
        fprintf(af.fp, "policy %s\n", p->label[i]);
    if (p->n_shards > 1)
        fprintf(af.fp, "shard %d/%d\n", p->shard, p->n_shards);
    return atomic_commit(&af, err);
}

/* Reads "KEY " at the start of *s, returns the rest of the line (NUL-terminated in place) and
 * advances *s past it; NULL when the line does not start with key. */
static char *take_line(char **s, const char *key)
{
    size_t k = strlen(key);
    if (strncmp(*s, key, k) != 0)
        return NULL;
    char *v = *s + k, *nl = strchr(v, '\n');
    if (!nl)
        return NULL;
    *nl = 0;
    *s = nl + 1;
    return v;
}

int sweep_plan_read(SweepPlan *p, const char *out, KvErr *err)
{
    memset(p, 0, sizeof *p);
    char path[4200];
    snprintf(path, sizeof path, "%s/sweep.txt", out);
    size_t len;
    char *text = kv_read_input(path, 1 << 24, &len, err);
    if (!text)
        return -1;
    char *s = text, *v;
    int n = 0, line = 1;
    KvErr verr;
    const char *what = "kvsim sweep 1";
    if (!(v = take_line(&s, PLAN_MAGIC)) || *v)
        goto bad;
    line++;
    what = "config_sha256 HEX";
    if (!(v = take_line(&s, "config_sha256 ")) || strlen(v) != 64)
        goto bad;
    memcpy(p->config_sha256, v, 65);
    line++;
    what = "budgets LIST or ratios LIST";
    bool ratios = strncmp(s, "ratios ", 7) == 0;
    if (!(v = take_line(&s, ratios ? "ratios " : "budgets ")) ||
        sweep_parse_values(p, v, ratios, &verr) != 0)
        goto bad;
    line++;
    what = "traces N";
    if (!(v = take_line(&s, "traces ")) || sscanf(v, "%d", &n) != 1 || n < 1 ||
        n > SWEEP_MAX_TRACES)
        goto bad;
    for (int t = 0; t < n; t++) {
        line++;
        what = "trace NAME<tab>PATH";
        char *tab;
        if (!(v = take_line(&s, "trace ")) || !(tab = strchr(v, '\t')) ||
            sweep_add_trace(p, tab + 1, &verr) != 0 ||
            (size_t)(tab - v) != strlen(p->trace_name[t]) ||
            strncmp(v, p->trace_name[t], (size_t)(tab - v)) != 0)
            goto bad;
    }
    line++;
    what = "policies N";
    if (!(v = take_line(&s, "policies ")) || sscanf(v, "%d", &p->n_policies) != 1 ||
        p->n_policies < 1 || p->n_policies > SWEEP_MAX_POLICIES)
        goto bad;
    for (int i = 0; i < p->n_policies; i++) {
        line++;
        what = "policy LABEL";
        if (!(v = take_line(&s, "policy ")) || strlen(v) >= sizeof p->label[i])
            goto bad;
        strcpy(p->label[i], v);
    }
    p->n_shards = 1;
    if (*s) {
        line++;
        what = "shard I/N or the end";
        if (!(v = take_line(&s, "shard ")) || sscanf(v, "%d/%d", &p->shard, &p->n_shards) != 2 ||
            p->n_shards < 1 || p->shard < 0 || p->shard >= p->n_shards || *s)
            goto bad;
    }
    free(text);
    return 0;
bad:
    free(text);
    sweep_plan_free(p);
    return kv_fail(err, "%s:%d: malformed (expected %s, as kvsim sweep writes it)", path, line,
                   what);
}

bool sweep_plan_same(const SweepPlan *a, const SweepPlan *b)
{
    if (a->ratios != b->ratios || a->n_values != b->n_values || a->n_traces != b->n_traces ||
        a->n_policies != b->n_policies || strcmp(a->config_sha256, b->config_sha256))
        return false;
    for (int v = 0; v < a->n_values; v++)
        if (strcmp(a->value[v], b->value[v]))
            return false;
    for (int t = 0; t < a->n_traces; t++)
        if (strcmp(a->trace_name[t], b->trace_name[t]) || strcmp(a->trace_path[t], b->trace_path[t]))
            return false;
    for (int i = 0; i < a->n_policies; i++)
        if (strcmp(a->label[i], b->label[i]))
            return false;
    return true;
}

/* ---- Files ---- */

static int remove_tree(const char *path, KvErr *err)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : kv_fail(err, "%s: cannot remove: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d)
            return kv_fail(err, "%s: cannot read: %s", path, strerror(errno));
        struct dirent *e;
        int rc = 0;
        while (rc == 0 && (e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            size_t n = strlen(path) + strlen(e->d_name) + 2;
            char *child = kv_malloc(n);
            snprintf(child, n, "%s/%s", path, e->d_name);
            rc = remove_tree(child, err);
            free(child);
        }
        closedir(d);
        if (rc != 0)
            return -1;
        if (rmdir(path) != 0)
            return kv_fail(err, "%s: cannot remove: %s", path, strerror(errno));
        return 0;
    }
    if (unlink(path) != 0)
        return kv_fail(err, "%s: cannot remove: %s", path, strerror(errno));
    return 0;
}

int sweep_remove_cells(const char *out, KvErr *err)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/cells", out);
    return remove_tree(path, err);
}

/* A cell's file: its header line and its rows (everything after the header), NUL-terminated;
 * rows end with a newline. */
typedef struct {
    char *text;
    size_t header_len; /* up to and including the header's newline */
} CellFile;

static int read_cell_file(const SweepPlan *p, const char *out, int c, MetricOutput o,
                          CellFile *f, KvErr *err)
{
    char dir[4400], path[4600];
    sweep_cell_dir(p, out, c, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/%s", dir, metric_output_file(o));
    size_t len;
    f->text = kv_read_input(path, 0, &len, err);
    if (!f->text)
        return -1;
    char *nl = memchr(f->text, '\n', len);
    if (!nl || f->text[len - 1] != '\n' || strlen(f->text) != len) {
        kv_fail(err, "%s: not a CSV file of kvsim run (expected a header line and rows, each "
                "ending with a newline)", path);
        free(f->text);
        return -1;
    }
    f->header_len = (size_t)(nl - f->text) + 1;
    return 0;
}

/* Cells' rows of value v of trace t, policies in order, into DIR/NAME for each output; appends
 * the summary rows, each led by `lead`, to *summary (with its header the first time). */
static int assemble_value(const SweepPlan *p, const char *out, const char *dir, int t, int v,
                          const char *lead, AtomicFile *summary, bool *summary_header,
                          KvErr *err)
{
    if (make_dirs(dir, err) != 0)
        return -1;
    for (int o = 0; o < N_OUTPUTS; o++) {
        char path[4600];
        snprintf(path, sizeof path, "%s/%s", dir, metric_output_file((MetricOutput)o));
        AtomicFile af;
        if (atomic_open(&af, path, err) != 0)
            return -1;
        CellFile first = {0};
        for (int pol = 0; pol < p->n_policies; pol++) {
            int c = (t * p->n_policies + pol) * p->n_values + v;
            CellFile f;
            if (read_cell_file(p, out, c, (MetricOutput)o, &f, err) != 0) {
                free(first.text);
                atomic_abort(&af);
                return -1;
            }
            if (pol == 0) {
                first = f;
                fwrite(f.text, 1, f.header_len, af.fp);
                if (o == OUT_SUMMARY && !*summary_header) {
                    fprintf(summary->fp, "%s%s,", p->n_traces > 1 ? "trace," : "",
                            p->ratios ? "ratio" : "budget");
                    fwrite(f.text, 1, f.header_len, summary->fp);
                    *summary_header = true;
                }
            } else if (f.header_len != first.header_len ||
                       memcmp(f.text, first.text, f.header_len) != 0) {
                char d[4400];
                sweep_cell_dir(p, out, c, d, sizeof d);
                kv_fail(err, "%s/%s: header differs from that of the first policy's cell",
                        d, metric_output_file((MetricOutput)o));
                free(f.text);
                free(first.text);
                atomic_abort(&af);
                return -1;
            }
            const char *rows = f.text + f.header_len;
            fputs(rows, af.fp);
            if (o == OUT_SUMMARY)
                for (const char *r = rows; *r;) {
                    const char *nl = strchr(r, '\n');
                    fprintf(summary->fp, "%s", lead);
                    fwrite(r, 1, (size_t)(nl - r) + 1, summary->fp);
                    r = nl + 1;
                }
            if (pol > 0)
                free(f.text);
        }
        free(first.text);
        if (atomic_commit(&af, err) != 0)
            return -1;
    }
    return 0;
}

int sweep_assemble(const SweepPlan *p, const char *out, KvErr *err)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/summary.csv", out);
    AtomicFile summary;
    if (atomic_open(&summary, path, err) != 0)
        return -1;
    bool header = false;
    for (int t = 0; t < p->n_traces; t++)
        for (int v = 0; v < p->n_values; v++) {
            char dir[4400], lead[300];
            if (p->n_traces > 1) {
                snprintf(dir, sizeof dir, "%s/%s/%c%s", out, p->trace_name[t],
                         p->ratios ? 'r' : 'b', p->value[v]);
                snprintf(lead, sizeof lead, "%s,%s,", p->trace_name[t], p->value[v]);
            } else {
                snprintf(dir, sizeof dir, "%s/%c%s", out, p->ratios ? 'r' : 'b', p->value[v]);
                snprintf(lead, sizeof lead, "%s,", p->value[v]);
            }
            if (assemble_value(p, out, dir, t, v, lead, &summary, &header, err) != 0) {
                atomic_abort(&summary);
                return -1;
            }
        }
    return atomic_commit(&summary, err);
}
