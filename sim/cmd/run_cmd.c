#include "sim/cmd/run_cmd.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/args.h"
#include "sim/base/provenance.h"
#include "sim/replay/config.h"
#include "sim/replay/report.h"

/* Policies given the same budget should hold about as many tokens: one line on stderr when the
 * mean cache sizes (summary.csv's cache_tokens_mean, tokens per KV head) of the policies the
 * run's budget applies to are more than 5% apart, naming the smallest and the largest. full
 * and a policy whose section sets its own budget are not compared; an oracle given the budget
 * is. */
static void warn_unequal_caches(const RunConfig *rc, const PolicySummary *s, int budget)
{
    int lo = -1, hi = -1;
    for (int k = 0; k < rc->engine.n_policies; k++) {
        if (!config_policy_budgeted(rc, k))
            continue;
        double t = s[k].step[SM_CACHE_TOKENS][STAT_MEAN];
        if (lo < 0 || t < s[lo].step[SM_CACHE_TOKENS][STAT_MEAN])
            lo = k;
        if (hi < 0 || t > s[hi].step[SM_CACHE_TOKENS][STAT_MEAN])
            hi = k;
    }
    if (lo < 0)
        return;
    double a = s[lo].step[SM_CACHE_TOKENS][STAT_MEAN], b = s[hi].step[SM_CACHE_TOKENS][STAT_MEAN];
    if (b <= 1.05 * a)
        return;
    fprintf(stderr, "kvsim run: warning: at budget %d the policies' mean caches are more than 5%% "
            "apart: %s holds %.1f tokens per KV head, %s %.1f (cache_tokens_mean; compare them "
            "with care, docs/config.md)\n", budget, rc->engine.policies[lo].label, a,
            rc->engine.policies[hi].label, b);
}

/* The layers the policies compress ([run] sliding_layers, sim/driver/driver.h), as ranges:
 * "0-3,5"; returns how many. */
static int compressed_layers(const TraceMeta *m, SlidingLayers sliding, char *out, size_t len)
{
    int n = 0;
    size_t at = 0;
    out[0] = '\0';
    for (int l = 0; l < m->n_layers; l++) {
        if (!driver_compresses(m->window[l], sliding))
            continue;
        int e = l;
        while (e + 1 < m->n_layers && driver_compresses(m->window[e + 1], sliding))
            e++;
        if (at < len)
            at += (size_t)(e > l ? snprintf(out + at, len - at, "%s%d-%d", n ? "," : "", l, e)
                                 : snprintf(out + at, len - at, "%s%d", n ? "," : "", l));
        n += e - l + 1;
        l = e;
    }
    return n;
}

static bool has_sliding_layers(const TraceMeta *m)
{
    for (int l = 0; l < m->n_layers; l++)
        if (m->window[l] > 0)
            return true;
    return false;
}

/* run.json beside the CSVs: the config, the trace and every calibration trace (path, size,
 * SHA-256), seed and threads; on a trace with sliding-window layers, [run] sliding_layers and
 * the layers the policies compressed. */
static int write_provenance(Provenance *prov, const RunConfig *rc, const TraceMeta *m, int budget,
                            int threads_used, KvErr *err)
{
    if (provenance_config(prov, rc->config_path, err) != 0 ||
        provenance_input(prov, "trace", rc->trace_path, err) != 0)
        return -1;
    for (int i = 0; i < rc->engine.n_policies; i++) {
        const char *cal = config_calibration(rc, i);
        if (cal && provenance_input(prov, "calibration", cal, err) != 0)
            return -1;
    }
    if (rc->ratio > 0)
        provenance_number(prov, "ratio", rc->ratio);
    if (budget) /* [run] budget, or what the ratio gave */
        provenance_number(prov, "budget", budget);
    provenance_number(prov, "seed", (double)rc->engine.seed);
    provenance_number(prov, "threads", rc->engine.threads);
    provenance_number(prov, "threads_used", threads_used);
    provenance_string(prov, "out", rc->out_dir);
    if (has_sliding_layers(m)) { /* which layers the budget applied to */
        char layers[4096];
        compressed_layers(m, rc->engine.sliding_layers, layers, sizeof layers);
        provenance_string(prov, "sliding_layers", sliding_layers_name(rc->engine.sliding_layers));
        provenance_string(prov, "compressed_layers", layers);
    }
    return provenance_write(prov, rc->out_dir, err);
}

int cmd_run(int argc, char **argv)
{
    const char *trace = NULL, *out = NULL;
    int threads = -1, quiet = 0;
    const ArgSpec specs[] = {
        {"trace", ARG_STRING, &trace, 0, 0, NULL, "the trace to replay (overrides [trace] path)"},
        {"out", ARG_STRING, &out, 0, 0, NULL, "output directory (overrides [run] out)"},
        {"threads", ARG_INT, &threads, 0, 1024, NULL,
         "worker threads, 0 = all cores (overrides [run] threads)"},
        {"quiet", ARG_FLAG, &quiet, 0, 0, NULL, "no table, no progress"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage =
        "run CONFIG.ini [options]\n"
        "  Replays the trace through every [policy.LABEL] of CONFIG and writes summary.csv,\n"
        "  layers.csv and steps.csv (docs/metrics.md). Results are identical at any thread count.";
    const char *positional[1];
    int status = args_start(argc, argv, specs, usage, positional, 1);
    if (status >= 0)
        return status;
    const char *config_path = positional[0];
    Provenance *prov = provenance_begin(argc, argv);

    RunConfig rc;
    KvErr err;
    if (config_load(config_path, &rc, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        provenance_free(prov);
        return 2;
    }
    if (trace)
        snprintf(rc.trace_path, sizeof rc.trace_path, "%s", trace);
    if (out)
        snprintf(rc.out_dir, sizeof rc.out_dir, "%s", out);
    if (threads >= 0)
        rc.engine.threads = threads;
    rc.engine.progress = !quiet && isatty(STDERR_FILENO);
    if (!rc.trace_path[0]) {
        fprintf(stderr, "kvsim: %s: no trace: set [trace] path or pass --trace\n", config_path);
        config_free(&rc);
        provenance_free(prov);
        return 2;
    }

    Trace *tr = trace_open(rc.trace_path, &err);
    if (!tr) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        config_free(&rc);
        provenance_free(prov);
        return 2;
    }
    const TraceMeta *tm = trace_meta(tr); /* e.g. a trig calibration trace of another model */
    int budget = rc.budget;
    if (rc.ratio > 0) { /* the share of the trace's first prefill span */
        char context[4200];
        snprintf(context, sizeof context, "the %d-token prompt of %s", tm->n_prompt,
                 rc.trace_path);
        budget = config_ratio_budget(&rc, tm->n_prompt);
        if (config_apply_budget(&rc, rc.engine.policies, budget, context, &err) != 0) {
            fprintf(stderr, "kvsim: %s\n", err.msg);
            trace_close(tr);
            config_free(&rc);
            provenance_free(prov);
            return 2;
        }
    }
    if (config_check_model(&rc, rc.trace_path, tm->n_layers, tm->n_q_heads, tm->head_dim,
                           tm->rope_layout, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        trace_close(tr);
        config_free(&rc);
        provenance_free(prov);
        return 2;
    }
    /* The output directory is checked before the replay, not after it. */
    if (make_dirs(rc.out_dir, &err) != 0 || dir_writable(rc.out_dir, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        trace_close(tr);
        config_free(&rc);
        provenance_free(prov);
        return 2;
    }
    Results *res = engine_run(tr, &rc.engine, &err);
    PolicySummary *summary = NULL;
    status = 0;
    if (!res) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        status = 2;
    } else {
        summary = kv_calloc((size_t)res->n_policies, sizeof *summary);
        report_summarize(res, summary);
        if (report_write_csv(res, summary, rc.out_dir, &err) != 0 ||
            write_provenance(prov, &rc, trace_meta(tr), budget, res->threads_used, &err) != 0) {
            fprintf(stderr, "kvsim: %s\n", err.msg);
            status = 2;
        } else if (!quiet) {
            const TraceMeta *m = trace_meta(tr);
            printf("trace %s: %s, %d layers, %d+%d tokens; %d policies, %d threads, %.1fs\n",
                   rc.trace_path, m->model, m->n_layers, m->n_prompt, m->n_tokens - m->n_prompt,
                   res->n_policies, res->threads_used, res->wall_seconds);
            if (budget)
                printf("budget %d tokens per KV head for every policy without its own (%s)\n",
                       budget, rc.ratio > 0 ? "[run] ratio of the prompt" : "[run] budget");
            if (has_sliding_layers(m)) {
                char layers[4096];
                int n = compressed_layers(m, rc.engine.sliding_layers, layers, sizeof layers);
                printf("sliding_layers = %s: the policies compress %d of %d layers (%s)%s\n",
                       sliding_layers_name(rc.engine.sliding_layers), n, m->n_layers,
                       n ? layers : "none", n < m->n_layers
                           ? "; the sliding-window layers keep their window (rotating buffer)"
                           : "");
            }
            report_print_table(res, summary, stdout);
            printf("wrote %s/summary.csv, layers.csv, steps.csv, turns.csv, run.json\n", rc.out_dir);
        }
    }
    if (status == 0 && budget)
        warn_unequal_caches(&rc, summary, budget);
    free(summary);
    results_free(res);
    trace_close(tr);
    config_free(&rc);
    provenance_free(prov);
    return status;
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
    }
    return 0;
}
