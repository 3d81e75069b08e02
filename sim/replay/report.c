#include "sim/replay/report.h"

#include <gsl/gsl_sort.h>
#include <gsl/gsl_statistics_double.h>
#include <math.h>
#include <stdint.h>
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

/* ---- One policy's slots, read back from the spill (engine.h) ----
 *
 * The reductions below are those of every slot in memory, in the same order: a head metric's
 * mean over query heads per (layer, step), its summary over every (layer, step, query head)
 * slot, its turn means, all streamed over its column in (layer, step, head) order; the
 * quantiles from exact order statistics (select_ranks); the rest from the step records and
 * head means of one policy, in memory while its rows are written. */

enum {
    CHUNK_EVALS = 1024,              /* evaluated steps of head slots read at once */
    QUANTILES = 3,                   /* STAT_P5, STAT_P50, STAT_P95 */
    MAX_RANKS = 2 * QUANTILES,       /* each quantile interpolates two order statistics */
    DIGITS = 1 << 16,                /* a key is selected 16 bits at a time, in two passes */
};

typedef struct {
    const Results *r;
    int pi;
    double *rec;       /* [L][E][STEP_RECORD] */
    double *head_mean; /* [L][E][N_HEAD_METRICS]: the mean over query heads (off probe too) */
    double *turn_sum;  /* [n_turns][N_HEAD_METRICS]: a turn's head slots summed, and counted */
    size_t *turn_n;
    double head_stat[N_HEAD_METRICS][N_STATS]; /* summary.csv's, when summarized */
} PolicyData;

/* A float's bits as a key whose unsigned order is the floats' order (NaN excepted). */
static uint32_t float_key(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

static float key_float(uint32_t k)
{
    uint32_t u = (k & 0x80000000u) ? k & 0x7fffffffu : ~k;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The slots of head metric `slot` of pd's policy in (layer, step, query head) order: calls
 * visit(ctx, l, e, values[n_q_heads]) per (layer, evaluated step). */
typedef void HeadVisit(void *ctx, int l, int e, const float *heads);
static void stream_heads(const PolicyData *pd, int slot, float *buf, HeadVisit *visit, void *ctx)
{
    const Results *r = pd->r;
    for (int l = 0; l < r->n_layers; l++)
        for (int e0 = 0; e0 < r->n_evals; e0 += CHUNK_EVALS) {
            int n = r->n_evals - e0 < CHUNK_EVALS ? r->n_evals - e0 : CHUNK_EVALS;
            results_read_heads(r, pd->pi, slot, l, e0, n, buf);
            for (int i = 0; i < n; i++)
                visit(ctx, l, e0 + i, buf + (size_t)i * r->n_q_heads);
        }
}

/* The first pass over a head metric's column. */
typedef struct {
    PolicyData *pd;
    const Metric *m;
    bool skip_nan, select;
    double sum, min, max; /* of the values in the sample (reduce's, streamed) */
    size_t n;
    bool has_nan;
    size_t *hist; /* [DIGITS]: the sample's keys by their high 16 bits, when select */
} HeadPass;

static void head_pass_visit(void *ctx, int l, int e, const float *heads)
{
    HeadPass *hp = ctx;
    PolicyData *pd = hp->pd;
    const Results *r = pd->r;
    bool off = off_probe(r, hp->m, e);
    double mean = 0, unused_sum = 0;
    size_t unused_n = 0;
    size_t turn = r->n_turns > 0 ? (size_t)r->eval_turn[e] * N_HEAD_METRICS + hp->m->slot : 0;
    double *tsum = r->n_turns > 0 ? pd->turn_sum + turn : &unused_sum; /* no turns: none */
    size_t *tn = r->n_turns > 0 ? pd->turn_n + turn : &unused_n;
    for (int h = 0; h < r->n_q_heads; h++) {
        mean += heads[h];
        *tsum += heads[h];
        ++*tn;
        double x = off ? NAN : heads[h];
        if (hp->skip_nan && isnan(x))
            continue;
        hp->sum += x;
        if (hp->n == 0) { /* extreme_all's: the first value, then each smaller (larger) one */
            hp->min = hp->max = x;
        } else {
            if (x < hp->min)
                hp->min = x;
            if (x > hp->max)
                hp->max = x;
        }
        hp->has_nan |= isnan(x);
        hp->n++;
        if (hp->select && !isnan(x))
            hp->hist[float_key(heads[h]) >> 16]++;
    }
    pd->head_mean[((size_t)l * r->n_evals + e) * N_HEAD_METRICS + hp->m->slot] =
        mean / r->n_q_heads;
}

/* The second pass of the selection: the low 16 bits of the keys in the ranks' high buckets. */
typedef struct {
    const Results *r;
    const Metric *m;
    int n_buckets;
    uint32_t bucket[MAX_RANKS];
    size_t *hist; /* [n_buckets][DIGITS] */
} LowPass;

static void low_pass_visit(void *ctx, int l, int e, const float *heads)
{
    (void)l;
    LowPass *lp = ctx;
    if (off_probe(lp->r, lp->m, e))
        return;
    for (int h = 0; h < lp->r->n_q_heads; h++) {
        if (isnan(heads[h]))
            continue;
        uint32_t k = float_key(heads[h]);
        for (int i = 0; i < lp->n_buckets; i++)
            if (k >> 16 == lp->bucket[i])
                lp->hist[(size_t)i * DIGITS + (k & 0xffffu)]++;
    }
}

/* The bucket of hist[DIGITS] holding the element of rank *rank (0-based), and *rank within it. */
static uint32_t bucket_of_rank(const size_t *hist, size_t *rank)
{
    uint32_t d = 0;
    while (*rank >= hist[d]) {
        *rank -= hist[d];
        d++;
    }
    return d;
}

/* GSL's gsl_stats_quantile_from_sorted_data at the quantile statistics of `stats`, from the
 * exact order statistics of the sample (the n values of the first pass, whose high-bit
 * histogram is hist): the two it interpolates are found by a second pass over the column. */
static void select_quantiles(PolicyData *pd, const Metric *m, size_t n, const size_t *hist,
                             float *buf, double *out)
{
    size_t ranks[MAX_RANKS];
    int n_ranks = 0;
    for (int s = 0; s < N_STATS; s++) {
        double f = metric_stat_quantile((MetricStat)s);
        if (!(m->summary & (1u << s)) || isnan(f))
            continue;
        size_t lhs = (size_t)(int)(f * (n - 1));
        ranks[n_ranks++] = lhs;
        if (lhs + 1 < n)
            ranks[n_ranks++] = lhs + 1;
    }
    LowPass lp = {.r = pd->r, .m = m};
    size_t within[MAX_RANKS];
    int which[MAX_RANKS];
    for (int i = 0; i < n_ranks; i++) {
        within[i] = ranks[i];
        uint32_t b = bucket_of_rank(hist, &within[i]);
        which[i] = -1;
        for (int j = 0; j < lp.n_buckets; j++)
            if (lp.bucket[j] == b)
                which[i] = j;
        if (which[i] < 0) {
            which[i] = lp.n_buckets;
            lp.bucket[lp.n_buckets++] = b;
        }
    }
    lp.hist = kv_calloc((size_t)lp.n_buckets * DIGITS, sizeof *lp.hist);
    stream_heads(pd, m->slot, buf, low_pass_visit, &lp);
    double value[MAX_RANKS];
    for (int i = 0; i < n_ranks; i++) {
        uint32_t lo = bucket_of_rank(lp.hist + (size_t)which[i] * DIGITS, &within[i]);
        value[i] = key_float(lp.bucket[which[i]] << 16 | lo);
    }
    free(lp.hist);
    int i = 0;
    for (int s = 0; s < N_STATS; s++) {
        double f = metric_stat_quantile((MetricStat)s);
        if (!(m->summary & (1u << s)) || isnan(f))
            continue;
        const double index = f * (n - 1);
        const size_t lhs = (int)index;
        const double delta = index - lhs;
        if (lhs == n - 1) {
            out[s] = value[i++];
        } else {
            out[s] = (1 - delta) * value[i] + delta * value[i + 1];
            i += 2;
        }
    }
}

/* Policy pi's slots: its step records, and its head metrics streamed (summary statistics too
 * when `summarize`). */
static void policy_load(PolicyData *pd, const Results *r, int pi, bool summarize)
{
    size_t LE = (size_t)r->n_layers * r->n_evals;
    pd->r = r;
    pd->pi = pi;
    pd->rec = kv_malloc((LE * STEP_RECORD + 1) * sizeof *pd->rec);
    pd->head_mean = kv_malloc((LE * N_HEAD_METRICS + 1) * sizeof *pd->head_mean);
    pd->turn_sum = kv_calloc((size_t)r->n_turns * N_HEAD_METRICS + 1, sizeof *pd->turn_sum);
    pd->turn_n = kv_calloc((size_t)r->n_turns * N_HEAD_METRICS + 1, sizeof *pd->turn_n);
    for (int l = 0; l < r->n_layers; l++)
        results_read_steps(r, pi, l, 0, r->n_evals, pd->rec + (size_t)l * r->n_evals * STEP_RECORD);
    float *buf = kv_malloc((size_t)CHUNK_EVALS * r->n_q_heads * sizeof *buf);
    size_t *hist = summarize ? kv_malloc(DIGITS * sizeof *hist) : NULL;
    for (int slot = 0; slot < N_HEAD_METRICS; slot++) {
        const Metric *m = metric_of(METRIC_HEAD, slot);
        double *out = pd->head_stat[slot];
        for (int st = 0; st < N_STATS; st++)
            out[st] = NAN;
        HeadPass hp = {.pd = pd, .m = m, .skip_nan = skips_nan(m), .min = NAN, .max = NAN};
        hp.select = summarize && (m->summary & (ST_P5 | ST_P50 | ST_P95));
        if (hp.select) {
            memset(hist, 0, DIGITS * sizeof *hist);
            hp.hist = hist;
        }
        stream_heads(pd, slot, buf, head_pass_visit, &hp);
        if (!summarize)
            continue;
        bool none = hp.n == 0;
        if (m->summary & ST_MEAN)
            out[STAT_MEAN] = none ? NAN : hp.sum / hp.n;
        if (m->summary & ST_SUM)
            out[STAT_SUM] = none ? NAN : hp.sum;
        if (m->summary & ST_MIN)
            out[STAT_MIN] = none || hp.has_nan ? NAN : hp.min;
        if (m->summary & ST_MAX)
            out[STAT_MAX] = none || hp.has_nan ? NAN : hp.max;
        if (hp.select && !none && !hp.has_nan)
            select_quantiles(pd, m, hp.n, hist, buf, out);
    }
    free(hist);
    free(buf);
}

static void policy_free(PolicyData *pd)
{
    free(pd->rec);
    free(pd->head_mean);
    free(pd->turn_sum);
    free(pd->turn_n);
}

double results_report_bytes(const Results *r)
{
    double LE = (double)r->n_layers * r->n_evals;
    return (LE * (STEP_RECORD + N_HEAD_METRICS) + LE + r->n_evals + r->n_layers) *
               sizeof(double) +                                    /* records, means, scratch */
           (double)r->n_turns * N_HEAD_METRICS * (sizeof(double) + sizeof(size_t)) +
           (double)CHUNK_EVALS * r->n_q_heads * sizeof(float) +   /* a chunk of head slots */
           (double)r->n_q_heads * sizeof(double) +
           (1.0 + MAX_RANKS) * DIGITS * sizeof(size_t) +          /* the selection's counters */
           sizeof(PolicyData);
}

double results_bytes(const Results *r)
{
    return (double)r->n_evals * (sizeof *r->eval_step + sizeof *r->eval_probe +
                                 sizeof *r->eval_turn) +
           (double)r->n_policies * r->n_layers *
               (N_TOTAL_METRICS * sizeof *r->total + r->n_turns * sizeof *r->turn_bytes) +
           (double)r->n_turns * sizeof *r->turns +
           (double)r->n_policies * (sizeof *r->label + sizeof *r->type + sizeof *r->is_oracle) +
           sizeof *r + results_spill_resident_bytes(r) + results_report_bytes(r);
}

/* Head or step metric m of pd's policy at layer l and evaluated step e (a head metric: the
 * mean over query heads); NaN where it does not apply. */
static double value_at(const PolicyData *pd, const Metric *m, int l, int e)
{
    const Results *r = pd->r;
    if (off_probe(r, m, e))
        return NAN;
    size_t le = (size_t)l * r->n_evals + e;
    if (m->kind == METRIC_STEP)
        return pd->rec[le * STEP_RECORD + m->slot];
    return pd->head_mean[le * N_HEAD_METRICS + m->slot];
}

/* m's layers combined at evaluated step e (x[n_layers] is scratch). */
static double at_step(const PolicyData *pd, const Metric *m, int e, double *x)
{
    for (int l = 0; l < pd->r->n_layers; l++)
        x[l] = value_at(pd, m, l, e);
    return reduce_one(x, (size_t)pd->r->n_layers, skips_nan(m), layer_stat(m));
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

/* The summary statistics of metric m (x: scratch, sized for every (layer, step) slot). */
static void summarize_metric(const PolicyData *pd, const Metric *m, double *x, double *out)
{
    const Results *r = pd->r;
    int L = r->n_layers, E = r->n_evals;
    size_t n = 0;
    if (m->kind == METRIC_TOTAL) {
        double tot = total_over_layers(r, pd->pi, m->slot);
        double restored = total_over_layers(r, pd->pi, TM_RESTORED_TOKENS);
        if (m->summary & ST_SUM)
            out[STAT_SUM] = tot;
        if (m->summary & ST_PER_STEP)
            out[STAT_PER_STEP] = tot / ((double)r->n_steps * r->n_layers);
        if (m->summary & ST_PER_RESTORED)
            out[STAT_PER_RESTORED] = restored > 0 ? tot / restored : NAN;
        return;
    }
    if (m->kind == METRIC_HEAD) { /* every (layer, step, query head) slot: streamed */
        memcpy(out, pd->head_stat[m->slot], N_STATS * sizeof *out);
        return;
    }
    if (m->layers == LAYERS_MEAN) { /* every (layer, step) slot */
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++)
                x[n++] = value_at(pd, m, l, e);
    } else { /* the per-step sums over layers */
        double *layer = x + E;
        for (int e = 0; e < E; e++)
            x[n++] = at_step(pd, m, e, layer);
    }
    reduce(x, n, skips_nan(m), m->summary, out);
}

void report_summarize(const Results *r, PolicySummary *out)
{
    int L = r->n_layers, E = r->n_evals;
    /* The largest sample: every (layer, step) slot; or E per-step values + L layers. */
    size_t cap = (size_t)L * E + (size_t)E + (size_t)L + 1;
    double *x = kv_malloc(cap * sizeof *x);
    for (int pi = 0; pi < r->n_policies; pi++) {
        PolicyData pd;
        policy_load(&pd, r, pi, true);
        for (int i = 0; i < N_METRICS; i++) {
            const Metric *m = &metric_table[i];
            if (m->kind == METRIC_TURN)
                continue; /* turns.csv's, per turn */
            double *row = (double *)summary_row(&out[pi], m); /* out is ours to fill */
            for (int st = 0; st < N_STATS; st++)
                row[st] = NAN;
            if (m->summary)
                summarize_metric(&pd, m, x, row);
        }
        policy_free(&pd);
    }
    free(x);
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
    for (int pi = 0; pi < r->n_policies; pi++) {
        PolicyData pd;
        policy_load(&pd, r, pi, false);
        for (int l = 0; l < r->n_layers; l++) {
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, l);
            for (int i = 0; i < n_cols; i++) {
                const Metric *m = cols[i].metric;
                if (!m)
                    continue;
                for (int e = 0; e < E; e++)
                    x[e] = value_at(&pd, m, l, e);
                report_put_field(c, &cols[i], reduce_one(x, (size_t)E, skips_nan(m), STAT_MEAN));
            }
            csv_end_row(c);
        }
        policy_free(&pd);
    }
    free(x);
}

/* Per policy and evaluated step: the layers combined. */
static void steps_rows(const Results *r, const PolicySummary *s, const MetricColumn *cols,
                       int n_cols, CsvFile *c)
{
    (void)s;
    double *x = kv_malloc((size_t)r->n_layers * sizeof *x);
    for (int pi = 0; pi < r->n_policies; pi++) {
        PolicyData pd;
        policy_load(&pd, r, pi, false);
        for (int e = 0; e < r->n_evals; e++) {
            int t = r->eval_step[e];
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, t);
            csv_put_int(c, t - r->n_prompt);
            for (int i = 0; i < n_cols; i++)
                if (cols[i].metric)
                    report_put_field(c, &cols[i], at_step(&pd, cols[i].metric, e, x));
            csv_end_row(c);
        }
        policy_free(&pd);
    }
    free(x);
}

/* Head metric `slot` over the evaluated steps of turn k: the mean over every (layer, step,
 * query head) slot, in that order (summed as the column streamed); NaN when the turn has no
 * evaluated step. */
static double turn_head_mean(const PolicyData *pd, int k, int slot)
{
    size_t i = (size_t)k * N_HEAD_METRICS + slot;
    return pd->turn_n[i] ? pd->turn_sum[i] / pd->turn_n[i] : NAN;
}

/* Needle survival at turn distance d over the probe steps of turn k: the mean over the (layer,
 * probe step) slots where it applies; NaN where none does. */
static double turn_needles(const PolicyData *pd, int k, int d)
{
    const Results *r = pd->r;
    double sum = 0;
    int n = 0;
    for (int l = 0; l < r->n_layers; l++)
        for (int e = 0; e < r->n_evals; e++) {
            double v = pd->rec[((size_t)l * r->n_evals + e) * STEP_RECORD + STEP_NEEDLE + d];
            if (r->eval_turn[e] == k && r->eval_probe[e] && !isnan(v)) {
                sum += v;
                n++;
            }
        }
    return n ? sum / n : NAN;
}

/* Turn metric `slot` of policy pi at turn k (docs/metrics.md, turns.csv). */
static double turn_value(const PolicyData *pd, int k, int slot)
{
    const Results *r = pd->r;
    int pi = pd->pi;
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
        return turn_head_mean(pd, k, HM_MASS);
    case TU_RECALL:
        return turn_head_mean(pd, k, HM_RECALL);
    case TU_OUT_ERR:
        return turn_head_mean(pd, k, HM_OUT_ERR);
    case TU_NEEDLE_D0:
    case TU_NEEDLE_D1:
    case TU_NEEDLE_D2:
    case TU_NEEDLE_D3:
        return turn_needles(pd, k, slot - TU_NEEDLE_D0);
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
    for (int pi = 0; pi < r->n_policies; pi++) {
        PolicyData pd;
        policy_load(&pd, r, pi, false);
        for (int k = 0; k < r->n_turns; k++) {
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, k);
            for (int i = 0; i < n_cols; i++)
                if (cols[i].metric)
                    report_put_field(c, &cols[i], turn_value(&pd, k, cols[i].metric->slot));
            csv_end_row(c);
        }
        policy_free(&pd);
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
