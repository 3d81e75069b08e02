/* report.h — the outputs of `kvsim run`: summary.csv, layers.csv, steps.csv (columns and units
 * in docs/metrics.md) and the aligned summary table on stdout. Every number is reduced in a
 * fixed order from the engine's per-slot results, so the files are byte-identical whatever the
 * thread count. The CSV conventions (quoting, number formats, empty = does not apply) are
 * sim/csv.h's; each CSV is written to a temporary name and renamed. */
#ifndef KVSIM_REPORT_H
#define KVSIM_REPORT_H

#include <stdio.h>

#include "sim/engine.h"

/* Per-policy aggregates, as in summary.csv. */
typedef struct {
    double mass_mean, mass_p5, mass_p50, mass_p95;
    double recall_mean;
    double out_err_mean, out_err_p50, out_err_p95;
    double cache_tokens_mean, cache_tokens_max;
    double device_bytes_mean, device_bytes_max, allocated_bytes_max;
    double host_bytes_mean, host_bytes_max;
    double to_host_bytes, to_device_bytes;
    double fetched_tokens_per_step, restored_tokens;
    double restore_k_err, restore_v_err;
    double needle_survival_mean, needle_survival_min;
} PolicySummary;

/* Bytes for the tables on stdout: "512 B", "1.5 KiB", "4.0 MiB", "1.25 GiB"; "-" for NaN. */
void format_bytes(double bytes, char *out, size_t n);

/* Fills out[n_policies]; the writers below take that summary so it is computed once. */
void report_summarize(const Results *r, PolicySummary *out);
int report_write_csv(const Results *r, const PolicySummary *s, const char *out_dir, KvErr *err);
void report_print_table(const Results *r, const PolicySummary *s, FILE *out);

#endif
