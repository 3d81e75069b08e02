/* metric_table.h — the metrics of `kvsim run` as one table, and the CSV columns that follow
 * from it.
 *
 * Each metric is one line of sim/replay/metrics.def:
 *   KIND_METRIC(ID, name, format, applies, layers, summary, layers.csv, steps.csv)
 * KIND says where the engine records it (Results, sim/replay/engine.h), and gives its slot index:
 *   HEAD_METRIC   per (policy, layer, evaluated step, query head), a float: slot HM_ID
 *   STEP_METRIC   per (policy, layer, evaluated step), a double: slot SM_ID
 *   TOTAL_METRIC  per (policy, layer), summed over every decode step, a double: slot TM_ID
 *   TURN_METRIC   TURN_METRIC(ID, name, format, applies): a column of turns.csv, one value per
 *                 (policy, turn), reduced by report.c from the engine's turn records: slot TU_ID
 * format   COUNT: an exact count (bytes, tokens), written by csv_put_count (means of counts
 *          included); NUM: a measured value or a rate, written by csv_put_num.
 * applies  ALWAYS: every slot holds a finite value; every reduction takes every slot, so a NaN
 *          (a bug) is never averaged away: it reaches the writer, which refuses it.
 *          WHERE (turn metrics): empty in the rows where it does not apply (NaN).
 *          PROBES: only at probe steps, and NaN (does not apply) where no needle token precedes
 *          the step; values off probe steps are ignored, reductions skip what does not apply,
 *          and a value where nothing applies is an empty field.
 * layers   how the layers of one evaluated step combine: MEAN (a per-layer quantity: head
 *          metrics, cache tokens per KV head) or SUM (the model's: bytes, fetched tokens). A
 *          head metric must be MEAN, a total SUM.
 * summary  the statistics of summary.csv, ST_* bits of MetricStat. A head or step metric's are
 *          MEAN, the quantiles, MIN and MAX: over every (layer, step, query head) slot for a
 *          head metric, every (layer, step) slot for a MEAN step metric, and the per-step sums
 *          of the layers for a SUM step metric. A total's are SUM, PER_STEP and PER_RESTORED, of
 *          its sum over layers: as is, / (decode steps x layers), / the sum of
 *          TM_RESTORED_TOKENS (does not apply when nothing was restored).
 * layers.csv, steps.csv  the suffix of the metric's column in that file, NULL for no column (a
 *          total has none). layers.csv: the mean over evaluated steps (a head metric: and query
 *          heads) of one layer; steps.csv: one evaluated step, its layers combined as `layers`
 *          says (a head metric: the mean over query heads first).
 *
 * Every file starts with its key columns, then, in the order of metrics.def's lines, the
 * metrics' columns:
 *   summary.csv  policy, type, then per metric one column per statistic of its summary set, in
 *                MetricStat order, named name + the statistic's suffix: _mean, _p5, _p50, _p95,
 *                _min, _max, none (SUM, PER_RESTORED), _per_step
 *   layers.csv   policy, layer, then name + layers.csv suffix for each metric that has one
 *   steps.csv    policy, step, decode_index, then name + steps.csv suffix likewise
 *   turns.csv    policy, turn, then each turn metric's name
 * The reductions are sim/replay/report.c's. tests/test_metrics_table.c checks the rules above, that
 * column names are unique within a file, and that docs/metrics.md lists exactly these columns. */
#ifndef KVSIM_METRIC_TABLE_H
#define KVSIM_METRIC_TABLE_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { METRIC_HEAD, METRIC_STEP, METRIC_TOTAL, METRIC_TURN } MetricKind;
typedef enum { METRIC_NUM, METRIC_COUNT } MetricFormat;
typedef enum { APPLIES_ALWAYS, APPLIES_PROBES, APPLIES_WHERE } MetricApplies;
typedef enum { LAYERS_MEAN, LAYERS_SUM } MetricLayers;

/* The summary statistics, in the order of their columns. */
typedef enum {
    STAT_MEAN,
    STAT_P5, /* quantiles: GSL's interpolation over the sorted values */
    STAT_P50,
    STAT_P95,
    STAT_MIN,
    STAT_MAX,
    STAT_SUM,          /* totals only */
    STAT_PER_STEP,     /* totals only */
    STAT_PER_RESTORED, /* totals only */
    N_STATS
} MetricStat;

enum {
    ST_MEAN = 1u << STAT_MEAN,
    ST_P5 = 1u << STAT_P5,
    ST_P50 = 1u << STAT_P50,
    ST_P95 = 1u << STAT_P95,
    ST_MIN = 1u << STAT_MIN,
    ST_MAX = 1u << STAT_MAX,
    ST_SUM = 1u << STAT_SUM,
    ST_PER_STEP = 1u << STAT_PER_STEP,
    ST_PER_RESTORED = 1u << STAT_PER_RESTORED,
};

/* The slot indices HM_ID, SM_ID, TM_ID, TU_ID: each kind in the order of metrics.def's lines
 * (which #undef-s the four macros at its end). */
#define METRIC_SKIP(...)
#define HEAD_METRIC(ID, ...) HM_##ID,
#define STEP_METRIC METRIC_SKIP
#define TOTAL_METRIC METRIC_SKIP
#define TURN_METRIC METRIC_SKIP
enum {
#include "sim/replay/metrics.def"
    N_HEAD_METRICS
};
#define HEAD_METRIC METRIC_SKIP
#define STEP_METRIC(ID, ...) SM_##ID,
#define TOTAL_METRIC METRIC_SKIP
#define TURN_METRIC METRIC_SKIP
enum {
#include "sim/replay/metrics.def"
    N_STEP_METRICS
};
#define HEAD_METRIC METRIC_SKIP
#define STEP_METRIC METRIC_SKIP
#define TOTAL_METRIC(ID, ...) TM_##ID,
#define TURN_METRIC METRIC_SKIP
enum {
#include "sim/replay/metrics.def"
    N_TOTAL_METRICS
};
#define HEAD_METRIC METRIC_SKIP
#define STEP_METRIC METRIC_SKIP
#define TOTAL_METRIC METRIC_SKIP
#define TURN_METRIC(ID, ...) TU_##ID,
enum {
#include "sim/replay/metrics.def"
    N_TURN_METRICS
};
#undef METRIC_SKIP

enum { N_METRICS = N_HEAD_METRICS + N_STEP_METRICS + N_TOTAL_METRICS + N_TURN_METRICS };

typedef struct {
    const char *name;
    MetricKind kind;
    int slot; /* HM_, SM_ or TM_ index, by kind */
    MetricFormat format;
    MetricApplies applies;
    MetricLayers layers;
    unsigned summary;          /* ST_* bits */
    const char *layers_suffix; /* NULL: no column in layers.csv */
    const char *steps_suffix;  /* NULL: no column in steps.csv */
} Metric;

/* The lines of metrics.def, in order. */
extern const Metric metric_table[N_METRICS];

/* The metric recorded in slot `slot` of `kind`. */
const Metric *metric_of(MetricKind kind, int slot);
/* 0.05, 0.50, 0.95 for the quantiles; NaN for the other statistics. */
double metric_stat_quantile(MetricStat stat);

/* ---- The files of `kvsim run` and their columns ---- */

typedef enum { OUT_SUMMARY, OUT_LAYERS, OUT_STEPS, OUT_TURNS, N_OUTPUTS } MetricOutput;

enum {
    METRIC_NAME_MAX = 48, /* a column name, its NUL included */
    METRIC_MAX_KEYS = 3,  /* key columns of a file */
    METRIC_MAX_COLUMNS = METRIC_MAX_KEYS + N_METRICS * N_STATS,
    METRIC_HEADER_MAX = METRIC_MAX_COLUMNS * METRIC_NAME_MAX,
};

typedef struct {
    char name[METRIC_NAME_MAX];
    const Metric *metric; /* NULL for a key column */
    MetricStat stat;      /* summary.csv: the statistic */
    bool optional;        /* may not apply: empty where it does not (NaN) */
} MetricColumn;

/* "summary.csv", "layers.csv", "steps.csv", "turns.csv". */
const char *metric_output_file(MetricOutput out);
/* The columns of `out`, key columns first, in file order; returns how many. */
int metric_output_columns(MetricOutput out, MetricColumn cols[METRIC_MAX_COLUMNS]);
/* The header row of `out`: the column names separated by commas. */
void metric_output_header(MetricOutput out, char header[METRIC_HEADER_MAX]);

#endif
