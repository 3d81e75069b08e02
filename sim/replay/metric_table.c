/* The metric table and the columns it gives each file: see metric_table.h. */
#include "sim/replay/metric_table.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* One line of metrics.def as a Metric (after the kind and the slot, the line's own fields). */
#define METRIC_ROW(KIND, SLOT, NAME, FORMAT, APPLIES, LAYERS, SUMMARY, LAYERS_CSV, STEPS_CSV)   \
    {.name = NAME, .kind = KIND, .slot = SLOT, .format = METRIC_##FORMAT,                        \
     .applies = APPLIES_##APPLIES, .layers = LAYERS_##LAYERS, .summary = SUMMARY,                \
     .layers_suffix = LAYERS_CSV, .steps_suffix = STEPS_CSV},
#define HEAD_METRIC(ID, ...) METRIC_ROW(METRIC_HEAD, HM_##ID, __VA_ARGS__)
#define STEP_METRIC(ID, ...) METRIC_ROW(METRIC_STEP, SM_##ID, __VA_ARGS__)
#define TOTAL_METRIC(ID, ...) METRIC_ROW(METRIC_TOTAL, TM_##ID, __VA_ARGS__)
/* A turn metric's line names only what turns.csv needs: no statistic, no other file. */
#define TURN_METRIC(ID, NAME, FORMAT, APPLIES)                                                   \
    METRIC_ROW(METRIC_TURN, TU_##ID, NAME, FORMAT, APPLIES, SUM, 0, NULL, NULL)
const Metric metric_table[N_METRICS] = {
#include "sim/replay/metrics.def"
};

const Metric *metric_of(MetricKind kind, int slot)
{
    for (int i = 0; i < N_METRICS; i++)
        if (metric_table[i].kind == kind && metric_table[i].slot == slot)
            return &metric_table[i];
    abort(); /* every slot has its line: a bug */
}

static const struct {
    const char *suffix; /* of the column's name */
    double quantile;    /* NaN: not a quantile */
} stats[N_STATS] = {
    [STAT_MEAN] = {"_mean", NAN},
    [STAT_P5] = {"_p5", 0.05},
    [STAT_P50] = {"_p50", 0.50},
    [STAT_P95] = {"_p95", 0.95},
    [STAT_MIN] = {"_min", NAN},
    [STAT_MAX] = {"_max", NAN},
    [STAT_SUM] = {"", NAN},
    [STAT_PER_STEP] = {"_per_step", NAN},
    [STAT_PER_RESTORED] = {"", NAN},
};

double metric_stat_quantile(MetricStat stat)
{
    return stats[stat].quantile;
}

static const struct {
    const char *file;
    const char *keys[METRIC_MAX_KEYS]; /* NULL-terminated when fewer */
} outputs[N_OUTPUTS] = {
    [OUT_SUMMARY] = {"summary.csv", {"policy", "type"}},
    [OUT_LAYERS] = {"layers.csv", {"policy", "layer"}},
    [OUT_STEPS] = {"steps.csv", {"policy", "step", "decode_index"}},
    [OUT_TURNS] = {"turns.csv", {"policy", "turn"}},
};

const char *metric_output_file(MetricOutput out)
{
    return outputs[out].file;
}

static MetricColumn *add_column(MetricColumn *col, const char *name, const char *suffix,
                                const Metric *m, MetricStat stat, bool optional)
{
    snprintf(col->name, sizeof col->name, "%s%s", name, suffix);
    col->metric = m;
    col->stat = stat;
    col->optional = optional;
    return col + 1;
}

int metric_output_columns(MetricOutput out, MetricColumn cols[METRIC_MAX_COLUMNS])
{
    MetricColumn *c = cols;
    for (int k = 0; k < METRIC_MAX_KEYS && outputs[out].keys[k]; k++)
        c = add_column(c, outputs[out].keys[k], "", NULL, STAT_MEAN, false);
    for (int i = 0; i < N_METRICS; i++) {
        const Metric *m = &metric_table[i];
        bool partial = m->applies != APPLIES_ALWAYS;
        if (out == OUT_TURNS || m->kind == METRIC_TURN) {
            if (out == OUT_TURNS && m->kind == METRIC_TURN)
                c = add_column(c, m->name, "", m, STAT_MEAN, partial);
        } else if (out == OUT_SUMMARY) {
            for (int s = 0; s < N_STATS; s++)
                if (m->summary & (1u << s))
                    c = add_column(c, m->name, stats[s].suffix, m, (MetricStat)s,
                                   partial || s == STAT_PER_RESTORED);
        } else {
            const char *suffix = out == OUT_LAYERS ? m->layers_suffix : m->steps_suffix;
            if (suffix)
                c = add_column(c, m->name, suffix, m, STAT_MEAN, partial);
        }
    }
    return (int)(c - cols);
}

void metric_output_header(MetricOutput out, char header[METRIC_HEADER_MAX])
{
    MetricColumn cols[METRIC_MAX_COLUMNS];
    int n = metric_output_columns(out, cols);
    size_t len = 0;
    header[0] = '\0';
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(header + len, METRIC_HEADER_MAX - len, "%s%s", i ? "," : "",
                                cols[i].name);
}
