/* report.h — the outputs of `kvsim run`: summary.csv, layers.csv, steps.csv, turns.csv (columns
 * and units in docs/metrics.md) and the aligned summary table on stdout. The columns of each file and how
 * each is reduced from the engine's per-slot results are sim/replay/metric_table.h's, from the table
 * sim/replay/metrics.def. Every number is reduced in a fixed order, so the files are byte-identical
 * whatever the thread count. The CSV conventions (quoting, number formats, empty = does not
 * apply) are sim/base/csv.h's; the four files are written as one set (csv_commit_set). */
#ifndef KVSIM_REPORT_H
#define KVSIM_REPORT_H

#include <stdbool.h>
#include <stdio.h>

#include "sim/base/csv.h"
#include "sim/replay/engine.h"

/* Per-policy summary statistics, the values of summary.csv: for each metric (by kind and slot,
 * sim/replay/metric_table.h), the statistics its line in sim/replay/metrics.def names, indexed by MetricStat
 * (the others are NaN). NaN in a statistic that may not apply means it does not. */
typedef struct {
    double head[N_HEAD_METRICS][N_STATS];
    double step[N_STEP_METRICS][N_STATS];
    double total[N_TOTAL_METRICS][N_STATS];
} PolicySummary;

/* Bytes for the tables on stdout: "512 B", "1.5 KiB", "4.0 MiB", "1.25 GiB"; "-" for NaN. */
void format_bytes(double bytes, char *out, size_t n);

/* What a Results holds resident, from its counts alone (n_policies, n_layers, n_q_heads,
 * n_evals, n_turns: a Results holding only those gives the bytes a replay of that shape needs):
 * the evaluated steps, the turns, the totals, the spill when it is small enough to stay in
 * memory (engine.h, results_spill_resident_bytes: at most SPILL_MEMORY_MAX) and the report's
 * largest working set (results_report_bytes). Beyond that none of it grows with query heads:
 * the per-head slots of a larger replay stay in the spill's file. */
double results_bytes(const Results *r);
/* The report's working set, held while summary.csv, layers.csv, steps.csv and turns.csv are
 * computed, one policy at a time: its step records and per-(layer, evaluated step) head means
 * read back from the spill, the scratch of the reductions, a chunk of head slots and the
 * counters of the quantiles' selection. It grows with layers x evaluated steps, never with
 * query heads or policies. */
double results_report_bytes(const Results *r);

/* Fills out[n_policies]; the writers below take that summary so it is computed once. */
void report_summarize(const Results *r, PolicySummary *out);
int report_write_csv(const Results *r, const PolicySummary *s, const char *out_dir, KvErr *err);
void report_print_table(const Results *r, const PolicySummary *s, FILE *out);

/* Summary.csv's value of metric column `col` (metric_output_columns(OUT_SUMMARY)) in s. */
double report_summary_value(const PolicySummary *s, const MetricColumn *col);
/* A metric column's field as the files above write it: empty where an optional value does not
 * apply (NaN), else in the metric's format (a count or a number). */
void report_put_field(CsvFile *c, const MetricColumn *col, double v);

/* Policies given the same budget should hold about as many tokens (docs/config.md, "Equal
 * budgets, unequal caches"): of the policies k with compare[k] set and tokens[k] a number
 * (summary.csv's cache_tokens_mean: tokens per KV head; over a dataset, its mean over the
 * traces), the smallest and the largest. When the largest is more than 5% above the smallest,
 * writes one line on f, "kvsim COMMAND: warning: at AT the policies' mean caches are more than
 * 5% apart: ..." naming both (AT names the budget: "budget 512"), and returns true. The one
 * check of `kvsim run` (per run, per dataset) and `kvsim sweep` (per budget of each trace):
 * full and a policy that keeps its own budget are the callers' to leave out. */
bool report_warn_unequal_caches(FILE *f, const char *command, const PolicySpec *policies, int n,
                                const bool *compare, const double *tokens, const char *at);

#endif
