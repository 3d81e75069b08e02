#include "sim/cmd/run_cmd.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/args.h"
#include "policies/kvquant.h"
#include "sim/base/provenance.h"
#include "sim/replay/config.h"
#include "sim/replay/dataset.h"
#include "sim/replay/report.h"

/* The policies compared by report_warn_unequal_caches: with a [run] budget or ratio, those it
 * applies to (full and a policy whose section sets its own budget are not; an oracle given the
 * budget is); without one, every policy that has a budget (all but full), at the budgets its
 * section sets or its defaults, which differ from policy to policy. `at` names the budget
 * ("budget 512"). */
static void warn_unequal_caches(const RunConfig *rc, const double *tokens, const char *at)
{
    int n = rc->engine.n_policies;
    bool *compare = kv_malloc((size_t)n * sizeof *compare);
    for (int k = 0; k < n; k++)
        compare[k] = rc->budget_line ? config_policy_budgeted(rc, k)
                                     : config_policy_has_budget(rc, k);
    report_warn_unequal_caches(stderr, "run", rc->engine.policies, n, compare, tokens, at);
    free(compare);
}

/* The layers the policies compress ([run] sliding_layers, sim/driver/driver.h), as ranges
 * ("0-3,5") in out, their count in *n; NULL when the trace has no sliding-window layer (every
 * layer is compressed, and run.json and the report say nothing about it). */
static const char *compressed_layers(const TraceMeta *m, SlidingLayers sliding, char *out,
                                     size_t len, int *n)
{
    bool sliding_layer = false;
    size_t at = 0;
    *n = 0;
    out[0] = '\0';
    for (int l = 0; l < m->n_layers; l++) {
        sliding_layer = sliding_layer || m->window[l] > 0;
        if (!driver_compresses(m->window[l], sliding))
            continue;
        int e = l;
        while (e + 1 < m->n_layers && driver_compresses(m->window[e + 1], sliding))
            e++;
        if (at < len)
            at += (size_t)(e > l ? snprintf(out + at, len - at, "%s%d-%d", *n ? "," : "", l, e)
                                 : snprintf(out + at, len - at, "%s%d", *n ? "," : "", l));
        *n += e - l + 1;
        l = e;
    }
    return sliding_layer ? out : NULL;
}

/* run.json beside the CSVs: the config, every trace and every calibration trace (path, size,
 * SHA-256), seed and threads; on traces with sliding-window layers, [run] sliding_layers and the
 * layers the policies compressed (`compressed`, compressed_layers()'s ranges; NULL otherwise). */
static int write_provenance(Provenance *prov, const RunConfig *rc, const PathList *traces,
                            int budget, int threads_used, const char *compressed, KvErr *err)
{
    if (provenance_config(prov, rc->config_path, err) != 0)
        return -1;
    for (int t = 0; t < traces->n; t++)
        if (provenance_input(prov, "trace", traces->v[t], err) != 0)
            return -1;
    for (int i = 0; i < rc->engine.n_policies; i++) {
        const char *cal = config_calibration(rc, i);
        if (cal && provenance_input(prov, "calibration", cal, err) != 0)
            return -1;
    }
    if (rc->ratio > 0)
        provenance_number(prov, "ratio", rc->ratio);
    if (budget) /* [run] budget, or what the ratio gave (one trace) */
        provenance_number(prov, "budget", budget);
    if (traces->n > 1)
        provenance_number(prov, "bootstrap_resamples", DATASET_RESAMPLES);
    provenance_number(prov, "seed", (double)rc->engine.seed);
    provenance_number(prov, "threads", rc->engine.threads);
    provenance_number(prov, "threads_used", threads_used);
    provenance_string(prov, "out", rc->out_dir);
    if (compressed) { /* which layers the budget applied to */
        provenance_string(prov, "sliding_layers", sliding_layers_name(rc->engine.sliding_layers));
        provenance_string(prov, "compressed_layers", compressed);
    }
    return provenance_write(prov, rc->out_dir, err);
}

/* The traces of the run: each --trace, else [trace] path, a glob(3) pattern expanded
 * (sim/replay/dataset.h). */
static int list_traces(const RunConfig *rc, const ArgStrings *given, PathList *traces,
                       KvErr *err)
{
    for (int i = 0; i < given->n; i++)
        if (path_list_expand(traces, given->v[i], "--trace", err) != 0)
            return -1;
    if (given->n)
        return 0;
    if (!rc->trace_path[0])
        return kv_fail(err, "%s: no trace: set [trace] path or pass --trace", rc->config_path);
    char where[4200];
    snprintf(where, sizeof where, "%s:%d: [trace] path", rc->config_path, rc->trace_line);
    return path_list_expand(traces, rc->trace_path, where, err);
}

/* Replays one trace through every policy of rc: the budget a ratio gives for it (*budget),
 * the model checks, the replay. Returns the results, or NULL with err set. */
static Results *replay_trace(RunConfig *rc, Trace *tr, const char *path, int *budget,
                             KvErr *err)
{
    const TraceMeta *tm = trace_meta(tr); /* e.g. a trig calibration trace of another model */
    *budget = rc->budget;
    if (rc->ratio > 0) { /* the share of the trace's first prefill span */
        char context[4200];
        snprintf(context, sizeof context, "the %d-token prompt of %s", tm->n_prompt, path);
        *budget = config_ratio_budget(rc, tm->n_prompt);
        if (config_apply_budget(rc, rc->engine.policies, *budget, context, err) != 0)
            return NULL;
    }
    if (config_check_model(rc, path, tm->n_layers, tm->n_q_heads, tm->head_dim,
                           tm->rope_layout, err) != 0)
        return NULL;
    return engine_run(tr, &rc->engine, err);
}

/* One trace: summary.csv, layers.csv, steps.csv, turns.csv and run.json, the table on
 * stdout. */
static int run_single(RunConfig *rc, const PathList *traces, Provenance *prov, int quiet,
                      KvErr *err)
{
    const char *path = traces->v[0];
    Trace *tr = trace_open(path, err);
    if (!tr)
        return -1;
    int budget;
    Results *res = replay_trace(rc, tr, path, &budget, err);
    int status = res ? 0 : -1;
    PolicySummary *summary = NULL;
    const TraceMeta *m = trace_meta(tr);
    char layers[4096];
    int n_compressed;
    const char *compressed =
        compressed_layers(m, rc->engine.sliding_layers, layers, sizeof layers, &n_compressed);
    if (res) {
        summary = kv_calloc((size_t)res->n_policies, sizeof *summary);
        report_summarize(res, summary);
        if (report_write_csv(res, summary, rc->out_dir, err) != 0 ||
            write_provenance(prov, rc, traces, budget, res->threads_used, compressed, err) != 0) {
            status = -1;
        } else if (!quiet) {
            printf("trace %s: %s, %d layers, %d+%d tokens; %d policies, %d threads, %.1fs\n",
                   path, m->model, m->n_layers, m->n_prompt, m->n_tokens - m->n_prompt,
                   res->n_policies, res->threads_used, res->wall_seconds);
            if (budget)
                printf("budget %d tokens per KV head for every policy without its own (%s)\n",
                       budget, rc->ratio > 0 ? "[run] ratio of the prompt" : "[run] budget");
            if (compressed)
                printf("sliding_layers = %s: the policies compress %d of %d layers (%s)%s\n",
                       sliding_layers_name(rc->engine.sliding_layers), n_compressed,
                       m->n_layers, n_compressed ? layers : "none", n_compressed < m->n_layers
                           ? "; the sliding-window layers keep their window (rotating buffer)"
                           : "");
            report_print_table(res, summary, stdout);
            printf("wrote %s/summary.csv, layers.csv, steps.csv, turns.csv, run.json\n",
                   rc->out_dir);
        }
    }
    if (status == 0) {
        double *tokens = kv_malloc((size_t)res->n_policies * sizeof *tokens);
        for (int k = 0; k < res->n_policies; k++)
            tokens[k] = summary[k].step[SM_CACHE_TOKENS][STAT_MEAN];
        char at[64];
        if (rc->budget_line)
            snprintf(at, sizeof at, "budget %d", budget);
        else
            snprintf(at, sizeof at, "their own budgets (no [run] budget)");
        warn_unequal_caches(rc, tokens, at);
        free(tokens);
    }
    free(summary);
    results_free(res);
    trace_close(tr);
    return status;
}

/* Many traces: each replayed in turn, its summary kept; traces.csv, dataset.csv, paired.csv
 * (sim/replay/dataset.h) and run.json, the dataset table on stdout. */
static int run_dataset(RunConfig *rc, const PathList *traces, Provenance *prov, int quiet,
                       KvErr *err)
{
    Dataset *ds = NULL;
    int threads_used = 0, status = 0;
    char layers[4096];
    const char *compressed = NULL; /* the first trace's; a dataset is of one model */
    for (int t = 0; t < traces->n && status == 0; t++) {
        const char *path = traces->v[t];
        Trace *tr = trace_open(path, err);
        if (!tr) {
            status = -1;
            break;
        }
        int budget;
        Results *res = replay_trace(rc, tr, path, &budget, err);
        if (!res) {
            status = -1;
        } else {
            PolicySummary *summary = kv_calloc((size_t)res->n_policies, sizeof *summary);
            report_summarize(res, summary);
            if (!ds) {
                ds = dataset_new(res);
                int n_compressed;
                compressed = compressed_layers(trace_meta(tr), rc->engine.sliding_layers,
                                               layers, sizeof layers, &n_compressed);
            }
            const char *base = strrchr(path, '/');
            dataset_add(ds, base ? base + 1 : path, res, summary);
            threads_used = res->threads_used > threads_used ? res->threads_used : threads_used;
            if (!quiet) {
                const TraceMeta *m = trace_meta(tr);
                printf("trace %d/%d %s: %s, %d layers, %d+%d tokens", t + 1, traces->n, path,
                       m->model, m->n_layers, m->n_prompt, m->n_tokens - m->n_prompt);
                if (budget)
                    printf(", budget %d", budget);
                printf("; %.1fs\n", res->wall_seconds);
            }
            free(summary);
        }
        results_free(res);
        trace_close(tr);
    }
    if (status == 0) {
        dataset_finish(ds, config_reference(rc), rc->engine.seed);
        if (dataset_write_csv(ds, rc->out_dir, err) != 0 ||
            write_provenance(prov, rc, traces, rc->ratio > 0 ? 0 : rc->budget, threads_used,
                             compressed, err) != 0) {
            status = -1;
        } else if (!quiet) {
            dataset_print_table(ds, stdout);
            printf("wrote %s/traces.csv, dataset.csv, %srun.json\n", rc->out_dir,
                   config_reference(rc) >= 0 ? "paired.csv, " : "");
        }
    }
    if (status == 0) {
        int n = rc->engine.n_policies;
        double *tokens = kv_malloc((size_t)n * sizeof *tokens);
        for (int k = 0; k < n; k++) {
            double lo, hi;
            if (dataset_value(ds, k, "cache_tokens_mean", false, &tokens[k], &lo, &hi) != 0)
                tokens[k] = NAN;
        }
        char at[80];
        if (rc->ratio > 0)
            snprintf(at, sizeof at, "ratio %g (means over %d traces)", rc->ratio, traces->n);
        else if (rc->budget_line)
            snprintf(at, sizeof at, "budget %d (means over %d traces)", rc->budget, traces->n);
        else
            snprintf(at, sizeof at, "their own budgets (no [run] budget; means over %d traces)",
                     traces->n);
        warn_unequal_caches(rc, tokens, at);
        free(tokens);
    }
    dataset_free(ds);
    return status;
}

int cmd_run(int argc, char **argv)
{
    const char *out = NULL;
    static ArgStrings trace_args; /* large: not on the stack */
    trace_args.n = 0;
    int threads = -1, quiet = 0;
    const ArgSpec specs[] = {
        {"trace", ARG_STRINGS, &trace_args, 0, 0, NULL,
         "a trace to replay, or a glob(3) pattern; repeat for a dataset (overrides [trace] path)"},
        {"out", ARG_STRING, &out, 0, 0, NULL, "output directory (overrides [run] out)"},
        {"threads", ARG_INT, &threads, 0, 1024, NULL,
         "worker threads, 0 = all cores (overrides [run] threads)"},
        {"quiet", ARG_FLAG, &quiet, 0, 0, NULL, "no table, no progress"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage =
        "run CONFIG.ini [options]\n"
        "  Replays the trace through every [policy.LABEL] of CONFIG and writes summary.csv,\n"
        "  layers.csv and steps.csv (docs/metrics.md). Over many traces (--trace repeated, or a\n"
        "  glob in [trace] path) it writes traces.csv, dataset.csv and paired.csv instead: the\n"
        "  dataset means with 95% bootstrap intervals. Results are identical at any thread count.";
    const char *positional[1];
    int status = args_start(argc, argv, specs, usage, positional, 1);
    if (status >= 0)
        return status;
    const char *config_path = positional[0];
    Provenance *prov = provenance_begin(argc, argv);

    RunConfig rc;
    KvErr err;
    PathList traces = {0};
    if (config_load(config_path, &rc, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        provenance_free(prov);
        return 2;
    }
    if (out)
        snprintf(rc.out_dir, sizeof rc.out_dir, "%s", out);
    if (threads >= 0)
        rc.engine.threads = threads;
    rc.engine.progress = !quiet && isatty(STDERR_FILENO);
    status = 0;
    /* The traces and the output directory are checked before the replay, not after it. */
    if (list_traces(&rc, &trace_args, &traces, &err) != 0 || make_dirs(rc.out_dir, &err) != 0 ||
        dir_writable(rc.out_dir, &err) != 0)
        status = -1;
    else if (traces.n == 1)
        status = run_single(&rc, &traces, prov, quiet, &err);
    else
        status = run_dataset(&rc, &traces, prov, quiet, &err);
    if (status != 0)
        fprintf(stderr, "kvsim: %s\n", err.msg);
    path_list_free(&traces);
    config_free(&rc);
    provenance_free(prov);
    return status ? 2 : 0;
}

int cmd_policies(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    int n;
    const PolicyType *const *all = policy_types(&n);
    for (int i = 0; i < n; i++) {
        printf("%s — %s\n", all[i]->name, all[i]->description);
        for (const ParamSpec *s = all[i]->params; s && s->key; s++) {
            char range[64] = "";
            if (s->kind == PARAM_ENUM)
                snprintf(range, sizeof range, "%s", s->choices);
            else if ((s->kind == PARAM_INT || s->kind == PARAM_DOUBLE) && s->max >= 1e6)
                snprintf(range, sizeof range, ">= %g", s->min);
            else if (s->kind == PARAM_INT || s->kind == PARAM_DOUBLE)
                snprintf(range, sizeof range, "[%g, %g]", s->min, s->max);
            printf("    %-18s = %-10s %-22s %s\n", s->key, s->dflt, range, s->help);
        }
        if (all[i]->set_extra)
            printf("    (and the inner policy's parameters)\n");
        if (all[i]->scorer)
            printf("    (exposes per-token scores: may be the inner of adakv and pyramid)\n");
    }
    /* The quantization layer every type takes (policies/kvquant.h, config.c quant_key). */
    printf("every type — the precision of the K/V it keeps (docs/policies.md, kv_quant)\n");
    printf("    %-18s = %-10s %-22s %s\n", "kv_quant", "none", KVQ_CHOICES,
           "KIVI (keys per channel, values per token, full-precision residual) or mlx-lm's "
           "QuantizedKVCache (affine, per token)");
    printf("    %-18s = %-10s %-22s %s\n", "kv_quant_group", "0", "[0, 1048576]",
           "values per scale and zero point; 0: the scheme's (KIVI 32, mlx 64)");
    printf("    %-18s = %-10d %-22s %s\n", "kv_quant_residual", KVQ_DEFAULT_RESIDUAL,
           "[1, 1048576]", "KIVI: the recent tokens kept at full precision (residual_length)");
    return 0;
}
