#include "sim/report.h"

#include <gsl/gsl_sort.h>
#include <gsl/gsl_statistics_double.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/csv.h"

/* Two kinds of reduction. A head metric (mass, recall, output error), a cache size or a byte
 * count exists at every evaluated step and is finite (the engine stops on a non-finite mass
 * or output error), so it is reduced plainly: a NaN there would be a bug, and it propagates
 * into the result, where the CSV writer refuses it instead of hiding it. Needle survival does
 * not apply everywhere (NaN off probe steps and before any needle token): only it skips NaN.
 * The restore errors are NaN (do not apply) when nothing was restored. */

/* Mean of every value; NaN if there are none or one is NaN. */
static double mean_all(const double *x, size_t n)
{
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += x[i];
    return n ? sum / n : NAN;
}

/* Maximum of every value; NaN if there are none or one is NaN. */
static double max_all(const double *x, size_t n)
{
    double m = n ? x[0] : NAN;
    for (size_t i = 0; i < n; i++) {
        if (isnan(x[i]))
            return NAN;
        if (x[i] > m)
            m = x[i];
    }
    return m;
}

/* Quantiles of every value (sorted copy; GSL's interpolation); NaN if there are none or one
 * is NaN. */
static void quantiles_all(const double *x, size_t n, const double *q, double *out, int nq)
{
    bool has_nan = false;
    for (size_t i = 0; i < n; i++)
        has_nan |= isnan(x[i]);
    if (n == 0 || has_nan) {
        for (int i = 0; i < nq; i++)
            out[i] = NAN;
        return;
    }
    double *sorted = kv_malloc(n * sizeof *sorted);
    memcpy(sorted, x, n * sizeof *sorted);
    gsl_sort(sorted, 1, n);
    for (int i = 0; i < nq; i++)
        out[i] = gsl_stats_quantile_from_sorted_data(sorted, 1, n, q[i]);
    free(sorted);
}

/* Mean of the values that apply (not NaN); NaN (does not apply) if none does. */
static double mean_applicable(const double *x, size_t n)
{
    double sum = 0;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!isnan(x[i])) {
            sum += x[i];
            k++;
        }
    return k ? sum / k : NAN;
}

static double min_applicable(const double *x, size_t n)
{
    double m = NAN;
    for (size_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (isnan(m) || x[i] < m))
            m = x[i];
    return m;
}

/* One head metric of one policy over every layer, step and head, in storage order. */
static double *gather_head(const Results *r, int pi, int metric, size_t *n)
{
    *n = (size_t)r->n_layers * r->n_evals * r->n_q_heads;
    double *x = kv_malloc((*n ? *n : 1) * sizeof *x);
    size_t i = 0;
    for (int l = 0; l < r->n_layers; l++)
        for (int e = 0; e < r->n_evals; e++)
            for (int h = 0; h < r->n_q_heads; h++)
                x[i++] = results_head(r, pi, l, e, h)[metric];
    return x;
}

/* A step metric summed over layers (bytes, tokens) or averaged over layers (cache tokens), per
 * evaluated step: a plain reduction. */
static double step_over_layers(const Results *r, int pi, int e, int metric, bool sum)
{
    double acc = 0;
    for (int l = 0; l < r->n_layers; l++)
        acc += results_step(r, pi, l, e)[metric];
    return sum ? acc : acc / r->n_layers;
}

/* Needle survival at evaluated step e, mean over the layers where it applies; NaN (does not
 * apply) off probe steps and where no needle token precedes the step. */
static double needles_at_step(const Results *r, int pi, int e)
{
    if (!r->eval_probe[e])
        return NAN;
    double *x = kv_malloc((size_t)r->n_layers * sizeof *x);
    for (int l = 0; l < r->n_layers; l++)
        x[l] = results_step(r, pi, l, e)[SM_NEEDLE_SURVIVAL];
    double v = mean_applicable(x, (size_t)r->n_layers);
    free(x);
    return v;
}

static double head_mean_at(const Results *r, int pi, int l, int e, int metric)
{
    double acc = 0;
    for (int h = 0; h < r->n_q_heads; h++)
        acc += results_head(r, pi, l, e, h)[metric];
    return acc / r->n_q_heads;
}

void report_summarize(const Results *r, PolicySummary *out)
{
    static const double q3[3] = {0.05, 0.50, 0.95};
    int E = r->n_evals;
    double *per_step = kv_malloc((size_t)(E ? E : 1) * sizeof *per_step);
    double *per_layer_step = kv_malloc((size_t)r->n_layers * (E ? E : 1) * sizeof *per_layer_step);
    for (int pi = 0; pi < r->n_policies; pi++) {
        PolicySummary *s = &out[pi];
        memset(s, 0, sizeof *s);
        size_t n;
        double qv[3];
        double *x = gather_head(r, pi, HM_MASS, &n);
        s->mass_mean = mean_all(x, n);
        quantiles_all(x, n, q3, qv, 3);
        s->mass_p5 = qv[0], s->mass_p50 = qv[1], s->mass_p95 = qv[2];
        free(x);
        x = gather_head(r, pi, HM_RECALL, &n);
        s->recall_mean = mean_all(x, n);
        free(x);
        x = gather_head(r, pi, HM_OUT_ERR, &n);
        s->out_err_mean = mean_all(x, n);
        quantiles_all(x, n, q3, qv, 3);
        s->out_err_p50 = qv[1], s->out_err_p95 = qv[2];
        free(x);

        size_t k = 0;
        for (int l = 0; l < r->n_layers; l++)
            for (int e = 0; e < E; e++)
                per_layer_step[k++] = results_step(r, pi, l, e)[SM_CACHE_TOKENS];
        s->cache_tokens_mean = mean_all(per_layer_step, k);
        s->cache_tokens_max = max_all(per_layer_step, k);

        for (int e = 0; e < E; e++)
            per_step[e] = step_over_layers(r, pi, e, SM_DEVICE_BYTES, true);
        s->device_bytes_mean = mean_all(per_step, (size_t)E);
        s->device_bytes_max = max_all(per_step, (size_t)E);
        for (int e = 0; e < E; e++)
            per_step[e] = step_over_layers(r, pi, e, SM_ALLOCATED_BYTES, true);
        s->allocated_bytes_max = max_all(per_step, (size_t)E);
        for (int e = 0; e < E; e++)
            per_step[e] = step_over_layers(r, pi, e, SM_HOST_BYTES, true);
        s->host_bytes_mean = mean_all(per_step, (size_t)E);
        s->host_bytes_max = max_all(per_step, (size_t)E);

        double tot[N_TOTAL_METRICS] = {0};
        for (int l = 0; l < r->n_layers; l++)
            for (int m = 0; m < N_TOTAL_METRICS; m++)
                tot[m] += results_total(r, pi, l)[m];
        s->to_host_bytes = tot[TM_TO_HOST_BYTES];
        s->to_device_bytes = tot[TM_TO_DEVICE_BYTES];
        s->fetched_tokens_per_step = tot[TM_FETCHED_TOKENS] / ((double)r->n_steps * r->n_layers);
        s->restored_tokens = tot[TM_RESTORED_TOKENS];
        s->restore_k_err = tot[TM_RESTORED_TOKENS] > 0 ? tot[TM_RESTORE_K_ERR] / tot[TM_RESTORED_TOKENS] : NAN;
        s->restore_v_err = tot[TM_RESTORED_TOKENS] > 0 ? tot[TM_RESTORE_V_ERR] / tot[TM_RESTORED_TOKENS] : NAN;

        /* Over layers and probe steps: elsewhere survival is NaN (does not apply). */
        k = 0;
        for (int l = 0; l < r->n_layers; l++)
            for (int e = 0; e < E; e++)
                per_layer_step[k++] =
                    r->eval_probe[e] ? results_step(r, pi, l, e)[SM_NEEDLE_SURVIVAL] : NAN;
        s->needle_survival_mean = mean_applicable(per_layer_step, k);
        s->needle_survival_min = min_applicable(per_layer_step, k);
    }
    free(per_step);
    free(per_layer_step);
}

static int write_summary(const Results *r, const PolicySummary *s, CsvFile *c, const char *dir,
                         KvErr *err)
{
    if (csv_create(c, dir, "summary.csv",
                   "policy,type,mass_mean,mass_p5,mass_p50,mass_p95,recall_mean,out_err_mean,"
                   "out_err_p50,out_err_p95,cache_tokens_mean,cache_tokens_max,device_bytes_mean,"
                   "device_bytes_max,allocated_bytes_max,host_bytes_mean,host_bytes_max,"
                   "to_host_bytes,to_device_bytes,fetched_tokens_per_step,restored_tokens,"
                   "restore_k_err,restore_v_err,needle_survival_mean,needle_survival_min",
                   err) != 0)
        return -1;
    for (int pi = 0; pi < r->n_policies; pi++) {
        const PolicySummary *p = &s[pi];
        csv_put_text(c, r->label[pi]);
        csv_put_text(c, r->type[pi]->name);
        const double head[] = {p->mass_mean,    p->mass_p5,     p->mass_p50,
                               p->mass_p95,     p->recall_mean, p->out_err_mean,
                               p->out_err_p50,  p->out_err_p95, p->cache_tokens_mean,
                               p->cache_tokens_max};
        for (size_t i = 0; i < sizeof head / sizeof head[0]; i++)
            csv_put_num(c, head[i]);
        const double bytes[] = {p->device_bytes_mean, p->device_bytes_max, p->allocated_bytes_max,
                                p->host_bytes_mean,   p->host_bytes_max,   p->to_host_bytes,
                                p->to_device_bytes};
        for (size_t i = 0; i < sizeof bytes / sizeof bytes[0]; i++)
            csv_put_count(c, bytes[i]);
        csv_put_num(c, p->fetched_tokens_per_step);
        csv_put_count(c, p->restored_tokens);
        /* Empty where they do not apply: no token restored, no probe step with needle tokens
         * before it. */
        if (p->restored_tokens > 0) {
            csv_put_num(c, p->restore_k_err);
            csv_put_num(c, p->restore_v_err);
        } else {
            csv_put_empty(c);
            csv_put_empty(c);
        }
        csv_put_optional(c, p->needle_survival_mean);
        csv_put_optional(c, p->needle_survival_min);
        csv_end_row(c);
    }
    return 0;
}

static int write_layers(const Results *r, CsvFile *c, const char *dir, KvErr *err)
{
    if (csv_create(c, dir, "layers.csv",
                   "policy,layer,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,"
                   "device_bytes_mean,host_bytes_mean,needle_survival_mean",
                   err) != 0)
        return -1;
    int E = r->n_evals;
    double *x = kv_malloc((size_t)(E ? E : 1) * sizeof *x);
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int l = 0; l < r->n_layers; l++) {
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, l);
            for (int m = 0; m < N_HEAD_METRICS; m++) {
                for (int e = 0; e < E; e++)
                    x[e] = head_mean_at(r, pi, l, e, m);
                csv_put_num(c, mean_all(x, (size_t)E));
            }
            for (int e = 0; e < E; e++)
                x[e] = results_step(r, pi, l, e)[SM_CACHE_TOKENS];
            csv_put_num(c, mean_all(x, (size_t)E));
            for (int e = 0; e < E; e++)
                x[e] = results_step(r, pi, l, e)[SM_DEVICE_BYTES];
            csv_put_count(c, mean_all(x, (size_t)E));
            for (int e = 0; e < E; e++)
                x[e] = results_step(r, pi, l, e)[SM_HOST_BYTES];
            csv_put_count(c, mean_all(x, (size_t)E));
            for (int e = 0; e < E; e++)
                x[e] = r->eval_probe[e] ? results_step(r, pi, l, e)[SM_NEEDLE_SURVIVAL] : NAN;
            csv_put_optional(c, mean_applicable(x, (size_t)E));
            csv_end_row(c);
        }
    free(x);
    return 0;
}

static int write_steps(const Results *r, CsvFile *c, const char *dir, KvErr *err)
{
    if (csv_create(c, dir, "steps.csv",
                   "policy,step,decode_index,mass_mean,recall_mean,out_err_mean,"
                   "cache_tokens_mean,device_bytes,allocated_bytes,host_bytes,fetched_tokens,"
                   "needle_survival",
                   err) != 0)
        return -1;
    double *x = kv_malloc((size_t)r->n_layers * sizeof *x);
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int e = 0; e < r->n_evals; e++) {
            int t = r->eval_step[e];
            csv_put_text(c, r->label[pi]);
            csv_put_int(c, t);
            csv_put_int(c, t - r->n_prompt);
            for (int m = 0; m < N_HEAD_METRICS; m++) {
                for (int l = 0; l < r->n_layers; l++)
                    x[l] = head_mean_at(r, pi, l, e, m);
                csv_put_num(c, mean_all(x, (size_t)r->n_layers));
            }
            csv_put_num(c, step_over_layers(r, pi, e, SM_CACHE_TOKENS, false));
            csv_put_count(c, step_over_layers(r, pi, e, SM_DEVICE_BYTES, true));
            csv_put_count(c, step_over_layers(r, pi, e, SM_ALLOCATED_BYTES, true));
            csv_put_count(c, step_over_layers(r, pi, e, SM_HOST_BYTES, true));
            csv_put_count(c, step_over_layers(r, pi, e, SM_FETCHED_TOKENS, true));
            csv_put_optional(c, needles_at_step(r, pi, e));
            csv_end_row(c);
        }
    free(x);
    return 0;
}

int report_write_csv(const Results *r, const PolicySummary *s, const char *out_dir, KvErr *err)
{
    if (make_dirs(out_dir, err) != 0)
        return -1;
    /* One set: none of the three replaces an older file unless all three are complete. */
    CsvFile files[3];
    CsvFile *set[3] = {&files[0], &files[1], &files[2]};
    int opened = 0;
    if (write_summary(r, s, set[0], out_dir, err) == 0) {
        opened = 1;
        if (write_layers(r, set[1], out_dir, err) == 0) {
            opened = 2;
            if (write_steps(r, set[2], out_dir, err) == 0)
                return csv_commit_set(set, 3, err);
        }
    }
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
    int w = 6;
    for (int pi = 0; pi < r->n_policies; pi++)
        if ((int)strlen(r->label[pi]) > w)
            w = (int)strlen(r->label[pi]);
    fprintf(out, "%-*s  %-13s %7s %7s %7s %8s %8s %10s %10s %7s\n", w, "policy", "type", "mass",
            "mass_p5", "recall", "out_err", "tokens", "device", "host", "needle");
    for (int pi = 0; pi < r->n_policies; pi++) {
        const PolicySummary *p = &s[pi];
        char dev[32], host[32], needle[16];
        format_bytes(p->device_bytes_mean, dev, sizeof dev);
        format_bytes(p->host_bytes_mean, host, sizeof host);
        fmt_num(p->needle_survival_mean, "%.3f", needle, sizeof needle);
        fprintf(out, "%-*s  %-13s %7.4f %7.4f %7.4f %8.4f %8.1f %10s %10s %7s\n", w, r->label[pi],
                r->type[pi]->name, p->mass_mean, p->mass_p5, p->recall_mean, p->out_err_mean,
                p->cache_tokens_mean, dev, host, needle);
    }
}
