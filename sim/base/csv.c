#include "sim/base/csv.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static void csv_error(CsvFile *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Keeps the first error; the rest of the file is still formatted but never committed. */
static void csv_error(CsvFile *c, const char *fmt, ...)
{
    if (c->error[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
}

/* The name of column i of the header, into out. */
static void column_name(const CsvFile *c, int i, char *out, size_t n)
{
    const char *p = c->header;
    for (int k = 0; k < i && p; k++)
        p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL;
    if (!p) {
        snprintf(out, n, "%d (beyond the header)", i + 1);
        return;
    }
    snprintf(out, n, "%.*s", (int)strcspn(p, ","), p);
}

static void not_finite(CsvFile *c, double v)
{
    char col[64];
    column_name(c, c->field, col, sizeof col);
    csv_error(c, "data row %ld%s%s%s, column %s: the value is %g, not a finite number (a bug: "
              "please report it with the inputs)",
              c->row + 1, c->row_key[0] ? " (" : "", c->row_key, c->row_key[0] ? ")" : "", col,
              v);
}

/* Starts a field: the separator unless it is the first of its row. */
static FILE *next_field(CsvFile *c)
{
    if (c->field++ > 0)
        fputc(',', c->af.fp);
    return c->af.fp;
}

int csv_create(CsvFile *c, const char *dir, const char *name, const char *header, KvErr *err)
{
    memset(c, 0, sizeof *c);
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (atomic_open(&c->af, path, err) != 0)
        return -1;
    c->header = header;
    c->n_columns = 1;
    for (const char *p = header; *p; p++)
        c->n_columns += *p == ',';
    fputs(header, c->af.fp);
    fputc('\n', c->af.fp);
    return 0;
}

void csv_put_text(CsvFile *c, const char *s)
{
    if (c->field == 0)
        snprintf(c->row_key, sizeof c->row_key, "%s", s);
    FILE *f = next_field(c);
    if (!strpbrk(s, ",\"\r\n")) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"')
            fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

void csv_put_int(CsvFile *c, long long v)
{
    fprintf(next_field(c), "%lld", v);
}

/* Starts a number's field; false (after recording the error) when it is not finite. */
static bool finite_field(CsvFile *c, double v)
{
    if (!isfinite(v))
        not_finite(c, v);
    next_field(c);
    return isfinite(v);
}

void csv_put_num(CsvFile *c, double v)
{
    if (finite_field(c, v))
        fprintf(c->af.fp, "%.9g", v == 0 ? 0.0 : v); /* 0.0: never "-0" */
}

void csv_put_count(CsvFile *c, double v)
{
    if (finite_field(c, v))
        fprintf(c->af.fp, v == floor(v) ? "%.0f" : "%.3f", v == 0 ? 0.0 : v);
}

void csv_put_empty(CsvFile *c)
{
    next_field(c);
}

void csv_put_optional(CsvFile *c, double v)
{
    if (isnan(v))
        csv_put_empty(c);
    else
        csv_put_num(c, v);
}

void csv_end_row(CsvFile *c)
{
    if (c->field != c->n_columns)
        csv_error(c, "data row %ld%s%s%s: %d fields, the header has %d (a bug: please report it)",
                  c->row + 1, c->row_key[0] ? " (" : "", c->row_key, c->row_key[0] ? ")" : "",
                  c->field, c->n_columns);
    fputc('\n', c->af.fp);
    c->row++;
    c->field = 0;
    c->row_key[0] = '\0';
}

/* Finishes the temporary file: closed and checked, not yet renamed (removed on error). */
static int csv_close(CsvFile *c, KvErr *err)
{
    if (c->error[0]) {
        atomic_abort(&c->af);
        return kv_fail(err, "%s: %s", c->af.path, c->error);
    }
    if (c->field != 0) {
        atomic_abort(&c->af);
        return kv_fail(err, "%s: data row %ld was not ended (a bug: please report it)", c->af.path,
                       c->row + 1);
    }
    return atomic_close(&c->af, err);
}

int csv_commit(CsvFile *c, KvErr *err)
{
    return csv_commit_set(&c, 1, err);
}

int csv_commit_set(CsvFile *const *files, int n, KvErr *err)
{
    int closed = 0;
    for (; closed < n; closed++)
        if (csv_close(files[closed], err) != 0)
            break;
    if (closed < n) {
        /* csv_close removed the failed one; the others, closed or not, are discarded. */
        for (int i = 0; i < n; i++)
            if (i != closed)
                atomic_abort(&files[i]->af);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (atomic_publish(&files[i]->af, err) != 0)
            return -1;
    return 0;
}
