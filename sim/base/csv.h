/* csv.h — the CSV conventions of every file kvsim writes (summary.csv, layers.csv, steps.csv,
 * eval.csv, eval_prompts.csv; docs/metrics.md, "Files"):
 *
 * - RFC 4180: one header row, fields separated by ',', rows ended by '\n'. A text field
 *   (label, type name, prompt name, answer) is enclosed in double quotes, its quotes doubled,
 *   when it holds a comma, a double quote, a CR or a LF; otherwise it is written as is.
 * - A measured value is "%.9g" (round-trips a float32, never more than 9 significant digits).
 * - A count (bytes, tokens) is "%.0f" when it is a whole number: every digit, no exponent.
 *   A mean of counts that is not a whole number is "%.3f".
 * - A value that does not apply (needle survival off probe steps, restore error without
 *   restores, ...) is an empty field. Nothing else may be missing: a NaN or an infinity
 *   reaching csv_put_num or csv_put_count is a bug upstream. The file then is not written,
 *   and csv_commit fails with one line naming the file, the row and the column.
 *
 * Every file is written under a temporary name and renamed into place by csv_commit. */
#ifndef KVSIM_CSV_H
#define KVSIM_CSV_H

#include <stdbool.h>

#include "sim/base/util.h"

typedef struct {
    AtomicFile af;
    const char *header; /* the header row (not copied: it must outlive the commit) */
    int n_columns;
    int field;          /* fields written in the current row so far */
    long row;           /* data rows ended so far */
    char row_key[64];   /* the current row's first field when it is text (the policy label) */
    char error[512];    /* the first error, "" when none */
} CsvFile;

/* Opens DIR/NAME for atomic writing and writes the header row (column names separated by
 * commas, none of which needs quoting). */
int csv_create(CsvFile *c, const char *dir, const char *name, const char *header, KvErr *err);

/* One field each, in column order; the separator is written as needed. */
void csv_put_text(CsvFile *c, const char *s);
void csv_put_int(CsvFile *c, long long v);
void csv_put_num(CsvFile *c, double v);   /* "%.9g"; must be finite */
void csv_put_count(CsvFile *c, double v); /* "%.0f" if whole, else "%.3f"; must be finite */
void csv_put_empty(CsvFile *c);           /* the value does not apply */
/* A value whose "does not apply" is NaN: NaN is an empty field, anything else csv_put_num. */
void csv_put_optional(CsvFile *c, double v);
/* Ends the row; a row with more or fewer fields than the header is an error. */
void csv_end_row(CsvFile *c);

/* Renames the file into place, or, after an error, removes it and reports that error. */
int csv_commit(CsvFile *c, KvErr *err);
/* The files of one output set, all or none: each is finished and checked, and only when every
 * one is complete are they renamed into place; otherwise every temporary is removed and the
 * first error reported (the files already there stay as they were). */
int csv_commit_set(CsvFile *const *files, int n, KvErr *err);

#endif
