#include "sim/report.h"

#include <gsl/gsl_sort.h>
#include <gsl/gsl_statistics_double.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Mean of the non-NaN values; NaN if there are none. */
static double mean_finite(const double *x, size_t n)
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

static double min_finite(const double *x, size_t n)
{
    double m = NAN;
    for (size_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (isnan(m) || x[i] < m))
            m = x[i];
    return m;
}

static double max_finite(const double *x, size_t n)
{
    double m = NAN;
    for (size_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (isnan(m) || x[i] > m))
            m = x[i];
    return m;
}

/* Quantiles of the non-NaN values (sorted copy; GSL's interpolation). */
static void quantiles(const double *x, size_t n, const double *q, double *out, int nq)
{
    double *sorted = kv_malloc((n ? n : 1) * sizeof *sorted);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!isnan(x[i]))
            sorted[k++] = x[i];
    gsl_sort(sorted, 1, k);
    for (int i = 0; i < nq; i++)
        out[i] = k ? gsl_stats_quantile_from_sorted_data(sorted, 1, k, q[i]) : NAN;
    free(sorted);
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

/* A step metric summed over layers (bytes) or averaged over layers, per evaluated step. */
static double step_over_layers(const Results *r, int pi, int e, int metric, bool sum)
{
    double acc = 0;
    int k = 0;
    for (int l = 0; l < r->n_layers; l++) {
        double v = results_step(r, pi, l, e)[metric];
        if (!isnan(v)) {
            acc += v;
            k++;
        }
    }
    if (k == 0)
        return NAN;
    return sum ? acc : acc / k;
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
        s->mass_mean = mean_finite(x, n);
        quantiles(x, n, q3, qv, 3);
        s->mass_p5 = qv[0], s->mass_p50 = qv[1], s->mass_p95 = qv[2];
        free(x);
        x = gather_head(r, pi, HM_RECALL, &n);
        s->recall_mean = mean_finite(x, n);
        free(x);
        x = gather_head(r, pi, HM_OUT_ERR, &n);
        s->out_err_mean = mean_finite(x, n);
        quantiles(x, n, q3, qv, 3);
        s->out_err_p50 = qv[1], s->out_err_p95 = qv[2];
        free(x);

        size_t k = 0;
        for (int l = 0; l < r->n_layers; l++)
            for (int e = 0; e < E; e++)
                per_layer_step[k++] = results_step(r, pi, l, e)[SM_CACHE_TOKENS];
        s->cache_tokens_mean = mean_finite(per_layer_step, k);
        s->cache_tokens_max = max_finite(per_layer_step, k);

        for (int e = 0; e < E; e++)
            per_step[e] = step_over_layers(r, pi, e, SM_DEVICE_BYTES, true);
        s->device_bytes_mean = mean_finite(per_step, (size_t)E);
        s->device_bytes_max = max_finite(per_step, (size_t)E);
        for (int e = 0; e < E; e++)
            per_step[e] = step_over_layers(r, pi, e, SM_ALLOCATED_BYTES, true);
        s->allocated_bytes_max = max_finite(per_step, (size_t)E);
        for (int e = 0; e < E; e++)
            per_step[e] = step_over_layers(r, pi, e, SM_HOST_BYTES, true);
        s->host_bytes_mean = mean_finite(per_step, (size_t)E);
        s->host_bytes_max = max_finite(per_step, (size_t)E);

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

        k = 0;
        for (int l = 0; l < r->n_layers; l++)
            for (int e = 0; e < E; e++)
                per_layer_step[k++] = results_step(r, pi, l, e)[SM_NEEDLE_SURVIVAL];
        s->needle_survival_mean = mean_finite(per_layer_step, k);
        s->needle_survival_min = min_finite(per_layer_step, k);
    }
    /* Gap to the best oracle bound present in the run. */
    double best = NAN;
    for (int pi = 0; pi < r->n_policies; pi++)
        if (r->is_oracle[pi] && (isnan(best) || out[pi].mass_mean > best))
            best = out[pi].mass_mean;
    for (int pi = 0; pi < r->n_policies; pi++)
        out[pi].mass_gap_to_oracle = isnan(best) ? NAN : best - out[pi].mass_mean;
    free(per_step);
    free(per_layer_step);
}

void csv_put_num(FILE *f, double v)
{
    if (isnan(v))
        fputs(",NaN", f);
    else
        fprintf(f, ",%.6g", v);
}

int csv_create(AtomicFile *af, const char *dir, const char *name, const char *header,
               KvErr *err)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (atomic_open(af, path, err) != 0)
        return -1;
    fputs(header, af->fp);
    fputc('\n', af->fp);
    return 0;
}

void csv_put_text(FILE *f, const char *s)
{
    fputc(',', f);
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

static int write_summary(const Results *r, const PolicySummary *s, const char *dir, KvErr *err)
{
    AtomicFile af;
    if (csv_create(&af, dir, "summary.csv",
                   "policy,type,mass_mean,mass_p5,mass_p50,mass_p95,recall_mean,out_err_mean,"
                   "out_err_p50,out_err_p95,cache_tokens_mean,cache_tokens_max,device_bytes_mean,"
                   "device_bytes_max,allocated_bytes_max,host_bytes_mean,host_bytes_max,"
                   "to_host_bytes,to_device_bytes,fetched_tokens_per_step,restored_tokens,"
                   "restore_k_err,restore_v_err,needle_survival_mean,needle_survival_min,"
                   "mass_gap_to_oracle",
                   err) != 0)
        return -1;
    FILE *f = af.fp;
    for (int pi = 0; pi < r->n_policies; pi++) {
        const PolicySummary *p = &s[pi];
        fprintf(f, "%s,%s", r->label[pi], r->type[pi]->name);
        const double v[] = {p->mass_mean, p->mass_p5, p->mass_p50, p->mass_p95, p->recall_mean,
                            p->out_err_mean, p->out_err_p50, p->out_err_p95, p->cache_tokens_mean,
                            p->cache_tokens_max, p->device_bytes_mean, p->device_bytes_max,
                            p->allocated_bytes_max, p->host_bytes_mean, p->host_bytes_max,
                            p->to_host_bytes, p->to_device_bytes, p->fetched_tokens_per_step,
                            p->restored_tokens, p->restore_k_err, p->restore_v_err,
                            p->needle_survival_mean, p->needle_survival_min, p->mass_gap_to_oracle};
        for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
            csv_put_num(f, v[i]);
        fputc('\n', f);
    }
    return atomic_commit(&af, err);
}

static int write_layers(const Results *r, const char *dir, KvErr *err)
{
    AtomicFile af;
    if (csv_create(&af, dir, "layers.csv",
                   "policy,layer,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,"
                   "device_bytes_mean,host_bytes_mean,needle_survival_mean",
                   err) != 0)
        return -1;
    FILE *f = af.fp;
    int E = r->n_evals;
    double *x = kv_malloc((size_t)(E ? E : 1) * sizeof *x);
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int l = 0; l < r->n_layers; l++) {
            fprintf(f, "%s,%d", r->label[pi], l);
            for (int m = 0; m < N_HEAD_METRICS; m++) {
                for (int e = 0; e < E; e++)
                    x[e] = head_mean_at(r, pi, l, e, m);
                csv_put_num(f, mean_finite(x, (size_t)E));
            }
            static const int step_cols[] = {SM_CACHE_TOKENS, SM_DEVICE_BYTES, SM_HOST_BYTES,
                                            SM_NEEDLE_SURVIVAL};
            for (size_t c = 0; c < sizeof step_cols / sizeof step_cols[0]; c++) {
                for (int e = 0; e < E; e++)
                    x[e] = results_step(r, pi, l, e)[step_cols[c]];
                csv_put_num(f, mean_finite(x, (size_t)E));
            }
            fputc('\n', f);
        }
    free(x);
    return atomic_commit(&af, err);
}

static int write_steps(const Results *r, const char *dir, KvErr *err)
{
    AtomicFile af;
    if (csv_create(&af, dir, "steps.csv",
                   "policy,step,decode_index,mass_mean,recall_mean,out_err_mean,"
                   "cache_tokens_mean,device_bytes,allocated_bytes,host_bytes,fetched_tokens,"
                   "needle_survival",
                   err) != 0)
        return -1;
    FILE *f = af.fp;
    double *x = kv_malloc((size_t)r->n_layers * sizeof *x);
    for (int pi = 0; pi < r->n_policies; pi++)
        for (int e = 0; e < r->n_evals; e++) {
            int t = r->eval_step[e];
            fprintf(f, "%s,%d,%d", r->label[pi], t, t - r->n_prompt);
            for (int m = 0; m < N_HEAD_METRICS; m++) {
                for (int l = 0; l < r->n_layers; l++)
                    x[l] = head_mean_at(r, pi, l, e, m);
                csv_put_num(f, mean_finite(x, (size_t)r->n_layers));
            }
            csv_put_num(f, step_over_layers(r, pi, e, SM_CACHE_TOKENS, false));
            csv_put_num(f, step_over_layers(r, pi, e, SM_DEVICE_BYTES, true));
            csv_put_num(f, step_over_layers(r, pi, e, SM_ALLOCATED_BYTES, true));
            csv_put_num(f, step_over_layers(r, pi, e, SM_HOST_BYTES, true));
            csv_put_num(f, step_over_layers(r, pi, e, SM_FETCHED_TOKENS, true));
            csv_put_num(f, r->eval_probe[e] ? step_over_layers(r, pi, e, SM_NEEDLE_SURVIVAL, false) : NAN);
            fputc('\n', f);
        }
    free(x);
    return atomic_commit(&af, err);
}

int report_write_csv(const Results *r, const PolicySummary *s, const char *out_dir, KvErr *err)
{
    if (make_dirs(out_dir, err) != 0)
        return -1;
    if (write_summary(r, s, out_dir, err) != 0 || write_layers(r, out_dir, err) != 0)
        return -1;
    return write_steps(r, out_dir, err);
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
