/* dataset.h — `kvsim run` over many traces (docs/metrics.md, "Datasets"): every trace replayed
 * through the same policies, each trace's summary (the columns of summary.csv) kept as one row
 * per (trace, policy), and the dataset level computed from those rows: per policy and summary
 * column, the mean over traces with its 95% bootstrap interval, and the paired difference to a
 * reference policy (the policy minus the reference, trace by trace) with its interval. The
 * bootstrap resamples traces (sim/base/stats.h: GSL's MT19937 seeded by [run] seed), the same
 * draws for every policy and column, so the files are byte-identical from run to run and, the
 * summaries being so, at any thread count.
 *
 * Files: traces.csv (the per-trace rows), dataset.csv (means and intervals), paired.csv (the
 * differences to the reference; not written when there is no reference). */
#ifndef KVSIM_DATASET_H
#define KVSIM_DATASET_H

#include <stdint.h>
#include <stdio.h>

#include "sim/replay/report.h"

/* Bootstrap resamples of every interval. */
enum { DATASET_RESAMPLES = 10000 };

/* A list of trace paths, in order (owned strings). */
typedef struct {
    int n, cap;
    char **v;
} PathList;

/* Appends `pattern` to list: as it is when it holds none of glob(3)'s metacharacters (* ? [),
 * else every path glob(3) matches, in glob's sorted order. A pattern matching no file is an
 * error "<where>: '<pattern>' matches no file (expected ...)", `where` naming the config line
 * or option it came from. */
int path_list_expand(PathList *list, const char *pattern, const char *where, KvErr *err);
void path_list_free(PathList *list);

typedef struct Dataset Dataset;

/* An empty dataset over the policies of r (their labels and types). */
Dataset *dataset_new(const Results *r);
/* Adds one trace: its summary s[r->n_policies] from report_summarize, the policies in the order
 * dataset_new saw them; `name` (the trace file's base name) labels its rows. */
void dataset_add(Dataset *d, const char *name, const Results *r, const PolicySummary *s);
int dataset_traces(const Dataset *d);

/* Computes the means, the intervals and the paired differences to policy `reference` (-1: none)
 * from the traces added so far, with the bootstrap seeded by `seed`. Call it before the
 * writers below. */
void dataset_finish(Dataset *d, int reference, uint64_t seed);

/* traces.csv, dataset.csv and paired.csv (with a reference) in out_dir, as one set. */
int dataset_write_csv(const Dataset *d, const char *out_dir, KvErr *err);
/* The dataset table on stdout: a few columns of dataset.csv and paired.csv per policy. */
void dataset_print_table(const Dataset *d, FILE *out);

/* The mean of summary column `column` (its name in summary.csv) for policy `policy` and its
 * interval; paired: the difference to the reference instead. Returns -1 when there is no such
 * column, when the value does not apply on every trace, or (paired) without a reference. */
int dataset_value(const Dataset *d, int policy, const char *column, bool paired, double *mean,
                  double *lo, double *hi);

void dataset_free(Dataset *d);

#endif
