#include "sim/replay/dataset.h"

#include <glob.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/stats.h"

static void path_list_add(PathList *list, const char *path)
{
    if (list->n == list->cap) {
        list->cap = list->cap ? 2 * list->cap : 8;
        list->v = kv_realloc(list->v, (size_t)list->cap * sizeof *list->v);
    }
    list->v[list->n++] = kv_strdup(path);
}

int path_list_expand(PathList *list, const char *pattern, const char *where, KvErr *err)
{
    if (!strpbrk(pattern, "*?[")) {
        path_list_add(list, pattern); /* a missing file is trace_open's to report */
        return 0;
    }
    glob_t g;
    int rc = glob(pattern, 0, NULL, &g); /* unreadable directories: no match there */
    if (rc == GLOB_NOMATCH)
        return kv_fail(err, "%s: '%s' matches no file (expected a trace path or a glob(3) "
                       "pattern matching at least one trace)", where, pattern);
    if (rc != 0) {
        globfree(&g);
        return kv_fail(err, "%s: '%s': cannot expand the pattern (%s)", where, pattern,
                       rc == GLOB_NOSPACE ? "out of memory" : "a directory cannot be read");
    }
    for (size_t i = 0; i < g.gl_pathc; i++)
        path_list_add(list, g.gl_pathv[i]);
    globfree(&g);
    return 0;
}

void path_list_free(PathList *list)
{
    for (int i = 0; i < list->n; i++)
        free(list->v[i]);
    free(list->v);
    memset(list, 0, sizeof *list);
}

/* One statistic of the dataset level: NaN mean where the column does not apply on every
 * trace. */
typedef struct {
    double mean, lo, hi;
} Interval;

struct Dataset {
    int n_policies, n_cols, n_traces, cap;
    MetricColumn cols[METRIC_MAX_COLUMNS]; /* summary.csv's metric columns, in file order */
    char (*label)[64];                     /* [n_policies] */
    const char **type;                     /* [n_policies] type names */
    char (*name)[256];                     /* [n_traces] base names */
    double *v;                             /* [trace][policy][col] */
    int reference;                         /* -1: none */
    Interval *mean, *diff;                 /* [policy][col], after dataset_finish */
};

Dataset *dataset_new(const Results *r)
{
    Dataset *d = kv_calloc(1, sizeof *d);
    MetricColumn all[METRIC_MAX_COLUMNS];
    int n = metric_output_columns(OUT_SUMMARY, all);
    for (int i = 0; i < n; i++)
        if (all[i].metric)
            d->cols[d->n_cols++] = all[i];
    d->n_policies = r->n_policies;
    d->label = kv_calloc((size_t)r->n_policies, sizeof *d->label);
    d->type = kv_calloc((size_t)r->n_policies, sizeof *d->type);
    for (int p = 0; p < r->n_policies; p++) {
        memcpy(d->label[p], r->label[p], sizeof d->label[p]);
        d->type[p] = r->type[p]->name;
    }
    d->reference = -1;
    return d;
}

static double *value(const Dataset *d, int t, int p, int c)
{
    return d->v + ((size_t)t * d->n_policies + p) * d->n_cols + c;
}

void dataset_add(Dataset *d, const char *name, const Results *r, const PolicySummary *s)
{
    if (d->n_traces == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 8;
        d->name = kv_realloc(d->name, (size_t)d->cap * sizeof *d->name);
        d->v = kv_realloc(d->v, (size_t)d->cap * d->n_policies * d->n_cols * sizeof *d->v);
    }
    int t = d->n_traces++;
    snprintf(d->name[t], sizeof d->name[t], "%s", name);
    for (int p = 0; p < d->n_policies; p++)
        for (int c = 0; c < d->n_cols; c++)
            *value(d, t, p, c) = p < r->n_policies ? report_summary_value(&s[p], &d->cols[c])
                                                   : NAN;
}

int dataset_traces(const Dataset *d)
{
    return d->n_traces;
}

/* The interval of x over the traces, or NaN when one of them is NaN (does not apply). */
static Interval interval_of(const Bootstrap *b, const double *x)
{
    for (int t = 0; t < b->n; t++)
        if (isnan(x[t]))
            return (Interval){NAN, NAN, NAN};
    Interval iv;
    bootstrap_mean_ci(b, x, &iv.mean, &iv.lo, &iv.hi);
    return iv;
}

void dataset_finish(Dataset *d, int reference, uint64_t seed)
{
    int T = d->n_traces, P = d->n_policies, C = d->n_cols;
    d->reference = reference;
    free(d->mean);
    free(d->diff);
    d->mean = kv_calloc((size_t)P * C, sizeof *d->mean);
    d->diff = kv_calloc((size_t)P * C, sizeof *d->diff);
    Bootstrap b;
    bootstrap_init(&b, T, DATASET_RESAMPLES, seed);
    double *x = kv_malloc((size_t)(T ? T : 1) * sizeof *x);
    for (int p = 0; p < P; p++)
        for (int c = 0; c < C; c++) {
            for (int t = 0; t < T; t++)
                x[t] = *value(d, t, p, c);
            d->mean[(size_t)p * C + c] = interval_of(&b, x);
            if (reference < 0)
                continue;
            /* x - x is exactly 0: the reference's own difference is a zero-width interval */
            for (int t = 0; t < T; t++)
                x[t] = *value(d, t, p, c) - *value(d, t, reference, c);
            d->diff[(size_t)p * C + c] = interval_of(&b, x);
        }
    free(x);
    bootstrap_free(&b);
}

static void put_interval(CsvFile *c, Interval iv)
{
    if (isnan(iv.mean)) {
        csv_put_empty(c);
        csv_put_empty(c);
        csv_put_empty(c);
        return;
    }
    csv_put_num(c, iv.mean);
    csv_put_num(c, iv.lo);
    csv_put_num(c, iv.hi);
}

int dataset_write_csv(const Dataset *d, const char *out_dir, KvErr *err)
{
    if (make_dirs(out_dir, err) != 0)
        return -1;
    /* The headers outlive the files (CsvFile keeps a pointer for its error messages). */
    char traces_header[METRIC_HEADER_MAX + 64];
    snprintf(traces_header, sizeof traces_header, "trace,name,policy,type");
    for (int c = 0; c < d->n_cols; c++) {
        size_t len = strlen(traces_header);
        snprintf(traces_header + len, sizeof traces_header - len, ",%s", d->cols[c].name);
    }
    static const char dataset_header[] = "policy,type,metric,traces,mean,ci_lo,ci_hi";
    static const char paired_header[] = "policy,reference,metric,traces,mean_diff,ci_lo,ci_hi";
    CsvFile files[3];
    CsvFile *set[3] = {&files[0], &files[1], &files[2]};
    int n_files = d->reference >= 0 ? 3 : 2;
    int C = d->n_cols;

    if (csv_create(set[0], out_dir, "traces.csv", traces_header, err) != 0)
        return -1;
    for (int t = 0; t < d->n_traces; t++)
        for (int p = 0; p < d->n_policies; p++) {
            csv_put_int(set[0], t);
            csv_put_text(set[0], d->name[t]);
            csv_put_text(set[0], d->label[p]);
            csv_put_text(set[0], d->type[p]);
            for (int c = 0; c < C; c++)
                report_put_field(set[0], &d->cols[c], *value(d, t, p, c));
            csv_end_row(set[0]);
        }
    if (csv_create(set[1], out_dir, "dataset.csv", dataset_header, err) != 0) {
        atomic_abort(&set[0]->af);
        return -1;
    }
    for (int p = 0; p < d->n_policies; p++)
        for (int c = 0; c < C; c++) {
            csv_put_text(set[1], d->label[p]);
            csv_put_text(set[1], d->type[p]);
            csv_put_text(set[1], d->cols[c].name);
            csv_put_int(set[1], d->n_traces);
            put_interval(set[1], d->mean[(size_t)p * C + c]);
            csv_end_row(set[1]);
        }
    if (n_files == 3) {
        if (csv_create(set[2], out_dir, "paired.csv", paired_header, err) != 0) {
            atomic_abort(&set[0]->af);
            atomic_abort(&set[1]->af);
            return -1;
        }
        for (int p = 0; p < d->n_policies; p++) {
            if (p == d->reference)
                continue;
            for (int c = 0; c < C; c++) {
                csv_put_text(set[2], d->label[p]);
                csv_put_text(set[2], d->label[d->reference]);
                csv_put_text(set[2], d->cols[c].name);
                csv_put_int(set[2], d->n_traces);
                put_interval(set[2], d->diff[(size_t)p * C + c]);
                csv_end_row(set[2]);
            }
        }
    }
    return csv_commit_set(set, n_files, err);
}

static int column_index(const Dataset *d, const char *column)
{
    for (int c = 0; c < d->n_cols; c++)
        if (!strcmp(d->cols[c].name, column))
            return c;
    return -1;
}

int dataset_value(const Dataset *d, int policy, const char *column, bool paired, double *mean,
                  double *lo, double *hi)
{
    int c = column_index(d, column);
    if (c < 0 || !d->mean || (paired && d->reference < 0))
        return -1;
    Interval iv = (paired ? d->diff : d->mean)[(size_t)policy * d->n_cols + c];
    if (isnan(iv.mean))
        return -1;
    *mean = iv.mean;
    *lo = iv.lo;
    *hi = iv.hi;
    return 0;
}

/* "0.912 [0.901, 0.925]", or "-" where the value does not apply. */
static void format_interval(const Dataset *d, int p, const char *column, bool paired, char *out,
                            size_t n)
{
    double m, lo, hi;
    if (dataset_value(d, p, column, paired, &m, &lo, &hi) != 0)
        snprintf(out, n, "-");
    else if (fabs(m) >= 100)
        snprintf(out, n, "%.1f [%.1f, %.1f]", m, lo, hi);
    else if (paired)
        snprintf(out, n, "%+.3f [%+.3f, %+.3f]", m, lo, hi);
    else
        snprintf(out, n, "%.3f [%.3f, %.3f]", m, lo, hi);
}

void dataset_print_table(const Dataset *d, FILE *out)
{
    char ref[80];
    snprintf(ref, sizeof ref, "mass - %s", d->reference >= 0 ? d->label[d->reference] : "(none)");
    fprintf(out, "dataset of %d traces: means with 95%% bootstrap intervals (%d resamples)\n",
            d->n_traces, DATASET_RESAMPLES);
    fprintf(out, "%-16s %-28s %-28s %-28s %s\n", "policy", "mass", "recall", ref,
            "cache tokens");
    for (int p = 0; p < d->n_policies; p++) {
        char mass[64], recall[64], diff[64], cache[64];
        format_interval(d, p, "mass_mean", false, mass, sizeof mass);
        format_interval(d, p, "recall_mean", false, recall, sizeof recall);
        format_interval(d, p, "mass_mean", true, diff, sizeof diff);
        format_interval(d, p, "cache_tokens_mean", false, cache, sizeof cache);
        fprintf(out, "%-16s %-28s %-28s %-28s %s\n", d->label[p], mass, recall,
                d->reference >= 0 ? diff : "-", cache);
    }
}

void dataset_free(Dataset *d)
{
    if (!d)
        return;
    free(d->label);
    free(d->type);
    free(d->name);
    free(d->v);
    free(d->mean);
    free(d->diff);
    free(d);
}
