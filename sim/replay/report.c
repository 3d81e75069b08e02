#include "sim/replay/report.h"

#include <gsl/gsl_sort.h>
#include <gsl/gsl_statistics_double.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>


/* The reductions of sim/replay/metric_table.h. A metric that applies everywhere (mass, recall, output
 * error, cache size, bytes) exists at every evaluated step and is finite (the engine stops on a
 * non-finite one), so it is reduced plainly: a NaN there would be a bug, and it propagates into
 * the result, where the CSV writer refuses it instead of hiding it. Only a metric that applies
 * at probe steps (needle survival) skips NaN, and the restore errors are NaN (do not apply) when
 * nothing was restored. */

/* Sum (mean_all: mean) of every value, in order; NaN if there are none or one is NaN. */
static double sum_all(const double *x, size_t n)
{
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += x[i];
    return n ? sum : NAN;
}

static double mean_all(const double *x, size_t n)
{
    return n ? sum_all(x, n) / n : NAN;
}

/* Minimum (max_of: maximum) of every value, the first of equals; NaN if there are none or one
 * is NaN. */
static double extreme_all(const double *x, size_t n, bool max_of)
{
    double m = n ? x[0] : NAN;
    for (size_t i = 0; i < n; i++) {
        if (isnan(x[i]))
            return NAN;
        if (max_of ? x[i] > m : x[i] < m)
            m = x[i];
    }
    return m;
}

/* The quantile statistics of `stats` (GSL's interpolation over a sorted copy); NaN if there
 * are no values or one is NaN. */
static void quantiles_all(const double *x, size_t n, unsigned stats, double *out)
{
    bool has_nan = false;
    for (size_t i = 0; i < n; i++)
        has_nan |= isnan(x[i]);
    double *sorted = NULL;
    if (n > 0 && !has_nan) {
        sorted = kv_malloc(n * sizeof *sorted);
        memcpy(sorted, x, n * sizeof *sorted);
        gsl_sort(sorted, 1, n);
    }
    for (int s = 0; s < N_STATS; s++)
        if ((stats & (1u << s)) && !isnan(metric_stat_quantile((MetricStat)s)))
            out[s] = sorted ? gsl_stats_quantile_from_sorted_data(
                                  sorted, 1, n, metric_stat_quantile((MetricStat)s))
                            : NAN;
    free(sorted);
}

/* The statistics `stats` (MEAN, quantiles, MIN, MAX, SUM) of x[0..n) into out[MetricStat]: of
 * every value, or, when skip_nan, of those that apply (x is compacted in place; none: NaN). */
static void reduce(double *x, size_t n, bool skip_nan, unsigned stats, double *out)
{
    if (skip_nan) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (!isnan(x[i]))
                x[k++] = x[i];
        n = k;
    }
    if (stats & ST_MEAN)
        out[STAT_MEAN] = mean_all(x, n);
    if (stats & (ST_P5 | ST_P50 | ST_P95))
        quantiles_all(x, n, stats, out);
    if (stats & ST_MIN)
        out[STAT_MIN] = extreme_all(x, n, false);
    if (stats & ST_MAX)
        out[STAT_MAX] = extreme_all(x, n, true);
    if (stats & ST_SUM)
        out[STAT_SUM] = sum_all(x, n);
}

static double reduce_one(double *x, size_t n, bool skip_nan, MetricStat stat)
{
    double out[N_STATS];
    reduce(x, n, skip_nan, 1u << stat, out);
    return out[stat];
}

static bool skips_nan(const Metric *m)
{
    return m->applies != APPLIES_ALWAYS;
}

/* How the layers of one evaluated step combine. */
static MetricStat layer_stat(const Metric *m)
{
    return m->layers == LAYERS_SUM ? STAT_SUM : STAT_MEAN;
}

/* A metric that applies at probe steps has no value at evaluated step e: it is not one. */
static bool off_probe(const Results *r, const Metric *m, int e)
{
    return m->applies == APPLIES_PROBES && !r->eval_probe[e];
}

/* Head or step metric m of policy pi at layer l and evaluated step e (a head metric: the mean
 * over query heads, heads[n_q_heads] is scratch); NaN where it does not apply. */
static double value_at(const Results *r, int pi, const Metric *m, int l, int e, double *heads)
{
    if (off_probe(r, m, e))
        return NAN;
    if (m->kind == METRIC_STEP)
        return results_step(r, pi, l, e)[m->slot];
    for (int h = 0; h < r->n_q_heads; h++)
        heads[h] = results_head(r, pi, l, e, h)[m->slot];
    return reduce_one(heads, (size_t)r->n_q_heads, skips_nan(m), STAT_MEAN);
}

/* m's layers combined at evaluated step e (x[n_layers] is scratch). */
static double at_step(const Results *r, int pi, const Metric *m, int e, double *x, double *heads)
{
    for (int l = 0; l < r->n_layers; l++)
        x[l] = value_at(r, pi, m, l, e, heads);
    return reduce_one(x, (size_t)r->n_layers, skips_nan(m), layer_stat(m));
}

/* The statistics of metric m in a policy's summary, indexed by MetricStat. */
static const double *summary_row(const PolicySummary *s, const Metric *m)
{
    return m->kind == METRIC_HEAD   ? s->head[m->slot]
           : m->kind == METRIC_STEP ? s->step[m->slot]
                                    : s->total[m->slot];
}

/* A total of policy pi summed over layers. */
static double total_over_layers(const Results *r, int pi, int slot)
{
    double sum = 0;
    for (int l = 0; l < r->n_layers; l++)
        sum += results_total(r, pi, l)[slot];
    return sum;
}

/* The summary statistics of metric m (x and heads: scratch, sized for every slot). */
static void summarize_metric(const Results *r, int pi, const Metric *m, double *x,
                             double *heads, double *out)
{
    int L = r->n_layers, E = r->n_evals, H = r->n_q_heads;
    size_t n = 0;
    if (m->kind == METRIC_TOTAL) {
        double tot = total_over_layers(r, pi, m->slot);
        double restored = total_over_layers(r, pi, TM_RESTORED_TOKENS);
        if (m->summary & ST_SUM)
            out[STAT_SUM] = tot;
        if (m->summary & ST_PER_STEP)
            out[STAT_PER_STEP] = tot / ((double)r->n_steps * r->n_layers);
        if (m->summary & ST_PER_RESTORED)
            out[STAT_PER_RESTORED] = restored > 0 ? tot / restored : NAN;
        return;
    }
    if (m->kind == METRIC_HEAD) { /* every (layer, step, query head) slot */
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++)
                for (int h = 0; h < H; h++)
                    x[n++] = off_probe(r, m, e) ? NAN : results_head(r, pi, l, e, h)[m->slot];
    } else if (m->layers == LAYERS_MEAN) { /* every (layer, step) slot */
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++)
                x[n++] = value_at(r, pi, m, l, e, heads);
    } else { /* the per-step sums over layers */
        double *layer = x + E;
        for (int e = 0; e < E; e++)
            x[n++] = at_step(r, pi, m, e, layer, heads);
    }
    reduce(x, n, skips_nan(m), m->summary, out);
}

void report_summarize(const Results *r, PolicySummary *out)
{
    int L = r->n_layers, E = r->n_evals, H = r->n_q_heads;
    /* The largest sample: every (layer, step, head) slot; or E per-step values + L layers. */
    size_t cap = (size_t)L * E * H + (size_t)E + (size_t)L + 1;
    double *x = kv_malloc(cap * sizeof *x);
    double *heads = kv_malloc((size_t)H * sizeof *heads);
    for (int pi = 0; pi < r->n_policies; pi++) {
        for (int i = 0; i < N_METRICS; i++) {
            const Metric *m = &metric_table[i];
            if (m->kind == METRIC_TURN)
                continue; /* turns.csv's, per turn */
            double *row = (double *)summary_row(&out[pi], m); /* out is ours to fill */
            for (int st = 0; st < N_STATS; st++)
                row[st] = NAN;
            if (m->summary)
                summarize_metric(r, pi, m, x, heads, row);
        }
    }
    free(x);
    free(heads);
}

/* One metric column's field: empty where it does not apply, else by the metric's format. */
void report_put_field(CsvFile *c, const MetricColumn *col, double v)
{
    if (col->optional && isnan(v))
        csv_put_empty(c);
    else if (col->metric->format == METRIC_COUNT)
        csv_put_count(c, v);
    else
        csv_put_num(c, v);
}

double report_summary_value(const PolicySummary *s, const MetricColumn *col)
{
    return summary_row(s, col->metric)[col->stat];
}

/* The rows of one file after its header: key fields, then its metric columns (metric_table.h). */
typedef void RowWriter(const Results *r, const PolicySummary *s, const MetricColumn *cols,
                       int n_cols, CsvFile *c);

static void summary_rows(const Results *r, const PolicySummary *s, const MetricColumn *cols,
                         int n_cols, CsvFile *c)
{
    for (int pi = 0; pi < r->n_policies; pi++) {
        csv_put_text(c, r->label[pi]);
        csv_put_text(c, r->type[pi]->name);
        for (int i = 0; i < n_cols; i++)
            if (cols[i].metric)
                report_put_field(c, &cols[i], summary_row(&s[pi], cols[i].metric)[cols[i].stat]);
        csv_end_row(c);
    }
}

/* Per policy and layer: the mean over evaluated steps. */
static void layers_rows(const Results *r, const PolicySummary *s, const MetricColumn *cols,
                        int n_cols, CsvFile *c)
{
    (void)s;
    int E = r->n_evals;
    double *x = kv_malloc((size_t)(E ? E : 1) * sizeof *x);
    double *heads = kv_malloc((size_t)r->n_q_heads * sizeof *heads);
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int l = 0; l < r->n_layers; l++) {
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, l);
            for (int i = 0; i < n_cols; i++) {
                const Metric *m = cols[i].metric;
                if (!m)
                    continue;
                for (int e = 0; e < E; e++)
                    x[e] = value_at(r, pi, m, l, e, heads);
                report_put_field(c, &cols[i], reduce_one(x, (size_t)E, skips_nan(m), STAT_MEAN));
            }
            csv_end_row(c);
        }
    free(x);
    free(heads);
}

/* Per policy and evaluated step: the layers combined. */
static void steps_rows(const Results *r, const PolicySummary *s, const MetricColumn *cols,
                       int n_cols, CsvFile *c)
{
    (void)s;
    double *x = kv_malloc((size_t)r->n_layers * sizeof *x);
    double *heads = kv_malloc((size_t)r->n_q_heads * sizeof *heads);
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int e = 0; e < r->n_evals; e++) {
            int t = r->eval_step[e];
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, t);
            csv_put_int(c, t - r->n_prompt);
            for (int i = 0; i < n_cols; i++)
                if (cols[i].metric)
                    report_put_field(c, &cols[i], at_step(r, pi, cols[i].metric, e, x, heads));
            csv_end_row(c);
        }
    free(x);
    free(heads);
}

/* Head metric `slot` of policy pi over the evaluated steps of turn k: the mean over every
 * (layer, step, query head) slot, in that order; NaN when the turn has no evaluated step. */
static double turn_head_mean(const Results *r, int pi, int k, int slot)
{
    double sum = 0;
    size_t n = 0;
    for (int l = 0; l < r->n_layers; l++)
        for (int e = 0; e < r->n_evals; e++)
            if (r->eval_turn[e] == k)
                for (int h = 0; h < r->n_q_heads; h++, n++)
                    sum += results_head(r, pi, l, e, h)[slot];
    return n ? sum / n : NAN;
}

/* Needle survival at turn distance d over the probe steps of turn k: the mean over the (layer,
 * probe step) slots where it applies; NaN where none does. */
static double turn_needles(const Results *r, int pi, int k, int d)
{
    double sum = 0;
    int n = 0;
    for (int l = 0; l < r->n_layers; l++)
        for (int e = 0; e < r->n_evals; e++) {
            double v = results_needle_turn(r, pi, l, e)[d];
            if (r->eval_turn[e] == k && r->eval_probe[e] && !isnan(v)) {
                sum += v;
                n++;
            }
        }
    return n ? sum / n : NAN;
}

/* Turn metric `slot` of policy pi at turn k (docs/metrics.md, turns.csv). */
static double turn_value(const Results *r, int pi, int k, int slot)
{
    const RunTurn *tu = &r->turns[k];
    switch (slot) {
    case TU_PREFILL_START:
        return tu->prefill_start;
    case TU_CONTEXT_TOKENS:
        return tu->context_tokens;
    case TU_DECODE_STEPS:
        return tu->decode_steps;
    case TU_PREFILL_TOKENS:
        return tu->prefill_tokens;
    case TU_SERVED_TOKENS:
        return tu->served_tokens;
    case TU_SERVED_SHARE:
        return (double)tu->served_tokens / tu->context_tokens;
    case TU_ATTN_FLOPS:
        return tu->attn_flops;
    case TU_DENSE_FLOPS:
        return tu->dense_flops;
    case TU_PREFILL_SECONDS:
        return r->prefill_tflops > 0 ? (tu->attn_flops + tu->dense_flops) /
                                           (r->prefill_tflops * 1e12)
                                     : NAN;
    case TU_KV_BYTES_IN: {
        double sum = 0;
        for (int l = 0; l < r->n_layers; l++)
            sum += r->turn_bytes[((size_t)pi * r->n_layers + l) * r->n_turns + k];
        return sum;
    }
    case TU_MASS:
        return turn_head_mean(r, pi, k, HM_MASS);
    case TU_RECALL:
        return turn_head_mean(r, pi, k, HM_RECALL);
    case TU_OUT_ERR:
        return turn_head_mean(r, pi, k, HM_OUT_ERR);
    case TU_NEEDLE_D0:
    case TU_NEEDLE_D1:
    case TU_NEEDLE_D2:
    case TU_NEEDLE_D3:
        return turn_needles(r, pi, k, slot - TU_NEEDLE_D0);
    }
    abort(); /* every turn metric has its case: a bug */
}

/* Per policy and turn. */
static void turns_rows(const Results *r, const PolicySummary *s, const MetricColumn *cols,
                       int n_cols, CsvFile *c)
{
    (void)s;
    _Static_assert(TU_NEEDLE_D3 - TU_NEEDLE_D0 + 1 == TURN_DISTANCES,
                   "a needle_survival_dD column per turn distance");
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int k = 0; k < r->n_turns; k++) {
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, k);
            for (int i = 0; i < n_cols; i++)
                if (cols[i].metric)
                    report_put_field(c, &cols[i], turn_value(r, pi, k, cols[i].metric->slot));
            csv_end_row(c);
        }
}

static RowWriter *const row_writer[N_OUTPUTS] = {
    [OUT_SUMMARY] = summary_rows,
    [OUT_LAYERS] = layers_rows,
    [OUT_STEPS] = steps_rows,
    [OUT_TURNS] = turns_rows,
};

int report_write_csv(const Results *r, const PolicySummary *s, const char *out_dir, KvErr *err)
{
    if (make_dirs(out_dir, err) != 0)
        return -1;
    /* One set: none of the files replaces an older one unless all are complete. The headers
     * outlive the files (CsvFile keeps a pointer for its error messages). */
    CsvFile files[N_OUTPUTS];
    CsvFile *set[N_OUTPUTS];
    char header[N_OUTPUTS][METRIC_HEADER_MAX];
    MetricColumn cols[METRIC_MAX_COLUMNS];
    int opened = 0;
    for (; opened < N_OUTPUTS; opened++) {
        MetricOutput o = (MetricOutput)opened;
        set[o] = &files[o];
        metric_output_header(o, header[o]);
        if (csv_create(set[o], out_dir, metric_output_file(o), header[o], err) != 0)
            break;
        row_writer[o](r, s, cols, metric_output_columns(o, cols), set[o]);
    }
    if (opened == N_OUTPUTS)
        return csv_commit_set(set, N_OUTPUTS, err);
    for (int i = 0; i < opened; i++)
        atomic_abort(&files[i].af);
    return -1;
}

void format_bytes(double b, char *out, size_t n)
{
    if (isnan(b))
        snprintf(out, n, "-");
    else if (b >= 1 << 30)
        snprintf(out, n, "%.2f GiB", b / (1 << 30));
    else if (b >= 1 << 20)
        snprintf(out, n, "%.1f MiB", b / (1 << 20));
    else if (b >= 1 << 10)
        snprintf(out, n, "%.1f KiB", b / (1 << 10));
    else
        snprintf(out, n, "%.0f B", b);
}

static void fmt_num(double v, const char *fmt, char *out, size_t n)
{
    if (isnan(v))
        snprintf(out, n, "-");
    else
        snprintf(out, n, fmt, v);
}

void report_print_table(const Results *r, const PolicySummary *s, FILE *out)
{
    int w = 6, tw = 13; /* the type column: 13, or the longest type name */
    for (int pi = 0; pi < r->n_policies; pi++) {
        if ((int)strlen(r->label[pi]) > w)
            w = (int)strlen(r->label[pi]);
        if ((int)strlen(r->type[pi]->name) > tw)
            tw = (int)strlen(r->type[pi]->name);
    }
    fprintf(out, "%-*s  %-*s %7s %7s %7s %8s %8s %10s %10s %7s\n", w, "policy", tw, "type", "mass",
            "mass_p5", "recall", "out_err", "tokens", "device", "host", "needle");
    for (int pi = 0; pi < r->n_policies; pi++) {
        const PolicySummary *p = &s[pi];
        char dev[32], host[32], needle[16];
        format_bytes(p->step[SM_DEVICE_BYTES][STAT_MEAN], dev, sizeof dev);
        format_bytes(p->step[SM_HOST_BYTES][STAT_MEAN], host, sizeof host);
        fmt_num(p->step[SM_NEEDLE_SURVIVAL][STAT_MEAN], "%.3f", needle, sizeof needle);
        fprintf(out, "%-*s  %-*s %7.4f %7.4f %7.4f %8.4f %8.1f %10s %10s %7s\n", w, r->label[pi],
                tw, r->type[pi]->name, p->head[HM_MASS][STAT_MEAN], p->head[HM_MASS][STAT_P5],
                p->head[HM_RECALL][STAT_MEAN], p->head[HM_OUT_ERR][STAT_MEAN],
                p->step[SM_CACHE_TOKENS][STAT_MEAN], dev, host, needle);
    }
}

bool report_warn_unequal_caches(FILE *f, const char *command, const PolicySpec *policies, int n,
                                const bool *compare, const double *tokens, const char *at)
{
    int lo = -1, hi = -1;
    for (int k = 0; k < n; k++) {
        if (!compare[k] || isnan(tokens[k]))
            continue;
        if (lo < 0 || tokens[k] < tokens[lo])
            lo = k;
        if (hi < 0 || tokens[k] > tokens[hi])
            hi = k;
    }
    if (lo < 0)
        return false;
    double a = tokens[lo], b = tokens[hi];
    if (b <= 1.05 * a)
        return false;
    fprintf(f, "kvsim %s: warning: at %s the policies' mean caches are more than 5%% apart: %s "
            "holds %.1f tokens per KV head, %s %.1f (cache_tokens_mean; compare them with care, "
            "docs/config.md)\n", command, at, policies[lo].label, a, policies[hi].label, b);
    return true;
}
