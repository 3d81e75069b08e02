#include "sim/cmd/sweep_cmd.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim/base/args.h"
#include "sim/base/provenance.h"
#include "sim/base/sha256.h"
#include "sim/replay/config.h"
#include "sim/replay/report.h"
#include "sim/replay/sweep.h"

/* `--trace` may be repeated: every occurrence is taken out of argv (into traces[]) before the
 * table parser, which takes each option once, sees the rest. Returns the new argc, or -1 with
 * a message. */
static int take_traces(int argc, char **argv, char **kept, const char **traces, int *n_traces,
                       KvErr *err)
{
    int n = 0;
    *n_traces = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *value = NULL;
        if (i > 0 && !strcmp(a, "--trace")) {
            if (i + 1 >= argc)
                return kv_fail(err, "%s: --trace: missing value", argv[0]);
            value = argv[++i];
        } else if (i > 0 && !strncmp(a, "--trace=", 8)) {
            value = a + 8;
        } else {
            kept[n++] = argv[i];
            continue;
        }
        if (*n_traces == SWEEP_MAX_TRACES)
            return kv_fail(err, "%s: --trace: more than %d traces", argv[0], SWEEP_MAX_TRACES);
        traces[(*n_traces)++] = value;
    }
    return n;
}

static int config_sha256(const char *path, char hex[65], KvErr *err)
{
    long long size;
    return sha256_file(path, hex, &size, err);
}

/* The instance of a sweep pass that serves cell c: full (no budget) is one instance for all of
 * its budgets, as its results do not depend on one. */
typedef struct {
    PolicySpec *specs; /* [n] */
    int n;
    int *instance; /* [cells of the pass] */
} Pass;

static void pass_free(Pass *ps)
{
    for (int i = 0; i < ps->n; i++)
        free(ps->specs[i].params);
    free(ps->specs);
    free(ps->instance);
    memset(ps, 0, sizeof *ps);
}

/* The budget of value v on a trace of n_prompt prompt tokens, and the words for its messages. */
static int value_budget(const SweepPlan *plan, const RunConfig *rc, int v, int n_prompt,
                        const char *trace, char *given, size_t n)
{
    if (!plan->ratios) {
        snprintf(given, n, "kvsim sweep --budgets: %d", plan->budget[v]);
        return plan->budget[v];
    }
    RunConfig at = *rc; /* config_ratio_budget's rounding, one place for it */
    at.ratio = plan->ratio[v];
    int b = config_ratio_budget(&at, n_prompt);
    snprintf(given, n, "kvsim sweep --ratios: %s of the %d-token prompt of %s is %d",
             plan->value[v], n_prompt, trace, b);
    return b;
}

/* The instances of trace t for the cells [first, end) that are to run (todo[c - first]). */
static int build_pass(const SweepPlan *plan, const RunConfig *rc, int t, int n_prompt, int first,
                      int end, const bool *todo, Pass *ps, KvErr *err)
{
    memset(ps, 0, sizeof *ps);
    ps->specs = kv_calloc((size_t)(end - first), sizeof *ps->specs);
    ps->instance = kv_calloc((size_t)(end - first), sizeof *ps->instance);
    int full_instance[SWEEP_MAX_POLICIES];
    for (int i = 0; i < SWEEP_MAX_POLICIES; i++)
        full_instance[i] = -1;
    for (int c = first; c < end; c++) {
        int ct, pol, v;
        sweep_cell(plan, c, &ct, &pol, &v);
        ps->instance[c - first] = -1;
        if (ct != t || !todo[c - first])
            continue;
        const PolicySpec *src = &rc->engine.policies[pol];
        if (!config_policy_has_budget(rc, pol) && full_instance[pol] >= 0) {
            ps->instance[c - first] = full_instance[pol];
            continue;
        }
        PolicySpec *spec = &ps->specs[ps->n];
        *spec = *src;
        spec->params = kv_malloc(src->type->params_size);
        memcpy(spec->params, src->params, src->type->params_size);
        ps->instance[c - first] = ps->n++;
        if (!config_policy_has_budget(rc, pol)) {
            full_instance[pol] = ps->instance[c - first];
            continue;
        }
        char given[4400];
        int b = value_budget(plan, rc, v, n_prompt, plan->trace_path[t], given, sizeof given);
        if (config_sweep_budget(rc, pol, spec, b, given, err) != 0)
            return -1;
    }
    return 0;
}

/* Renames the cell's temporary directory tmp into place as dir, removing whatever an earlier
 * sweep left there (without --resume it was removed; with it, the cell was not done, so at most
 * a stale copy is there). */
static int replace_cell(const char *tmp, const char *dir, KvErr *err)
{
    for (int o = 0; o < N_OUTPUTS; o++) {
        char old[4600];
        snprintf(old, sizeof old, "%s/%s", dir, metric_output_file((MetricOutput)o));
        unlink(old);
    }
    rmdir(dir);
    if (rename(tmp, dir) != 0)
        return kv_fail(err, "%s: cannot rename into %s: %s", tmp, dir, strerror(errno));
    return 0;
}

/* Writes cell c from instance pi of res: the files of a run of that policy alone, into a
 * temporary directory renamed into place, so a cell is there whole or not at all. *tokens: its
 * cache_tokens_mean (summary.csv). */
static int write_cell(const SweepPlan *plan, const char *out, int c, const Results *res, int pi,
                      double *tokens, KvErr *err)
{
    char dir[4400], tmp[4500];
    sweep_cell_dir(plan, out, c, dir, sizeof dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    Results view = results_view(res, pi);
    PolicySummary summary;
    report_summarize(&view, &summary);
    *tokens = summary.step[SM_CACHE_TOKENS][STAT_MEAN];
    if (make_dirs(tmp, err) != 0 || report_write_csv(&view, &summary, tmp, err) != 0)
        return -1;
    return replace_cell(tmp, dir, err);
}

/* The check of `kvsim run` (report_warn_unequal_caches) at each value of trace t: the policies
 * the sweep gives the budget to (every one but full) whose cells this pass ran, tokens[c -
 * first] each cell's cache_tokens_mean. One line per value where they are more than 5% apart. */
static void warn_unequal_caches(const SweepPlan *plan, const RunConfig *rc, int t, int n_prompt,
                                int first, int end, const Pass *ps, const double *tokens)
{
    int n = plan->n_policies;
    bool compare[SWEEP_MAX_POLICIES];
    double at_value[SWEEP_MAX_POLICIES];
    for (int v = 0; v < plan->n_values; v++) {
        for (int pol = 0; pol < n; pol++) {
            int c = (t * n + pol) * plan->n_values + v;
            compare[pol] = c >= first && c < end && ps->instance[c - first] >= 0 &&
                           config_policy_has_budget(rc, pol);
            at_value[pol] = compare[pol] ? tokens[c - first] : NAN;
        }
        char at[4400], of[4200] = "";
        if (plan->n_traces > 1)
            snprintf(of, sizeof of, " on %s", plan->trace_name[t]);
        if (plan->ratios) {
            RunConfig r = *rc;
            r.ratio = plan->ratio[v];
            snprintf(at, sizeof at, "ratio %s (budget %d)%s", plan->value[v],
                     config_ratio_budget(&r, n_prompt), of);
        } else {
            snprintf(at, sizeof at, "budget %d%s", plan->budget[v], of);
        }
        report_warn_unequal_caches(stderr, "sweep", rc->engine.policies, n, compare, at_value,
                                   at);
    }
}

/* Field `index` of a CSV row kvsim wrote (csv.h: a text field quoted when it holds a comma,
 * its quotes doubled) into out; false when the row has fewer fields. */
static bool row_field(const char *row, int index, char *out, size_t n)
{
    const char *r = row;
    for (int f = 0;; f++) {
        size_t len = 0;
        if (*r == '"') { /* quoted: up to the quote not doubled */
            for (r++; *r && !(r[0] == '"' && r[1] != '"'); r += r[0] == '"' ? 2 : 1)
                if (f == index && len + 1 < n)
                    out[len++] = *r;
            r += *r == '"';
        } else {
            for (; *r && *r != ',' && *r != '\n'; r++)
                if (f == index && len + 1 < n)
                    out[len++] = *r;
        }
        if (f == index) {
            out[len] = '\0';
            return true;
        }
        if (*r != ',')
            return false;
        r++;
    }
}

/* The check of `kvsim sweep` (warn_unequal_caches above) over the merged cells, whose shards
 * each saw only their own: per trace and value, every policy but full, from the cells'
 * summary.csv (type and cache_tokens_mean). A cell that cannot be read is left out. */
static void merge_warn_unequal_caches(const SweepPlan *plan, const char *out)
{
    int n = plan->n_policies;
    PolicySpec specs[SWEEP_MAX_POLICIES];
    bool compare[SWEEP_MAX_POLICIES];
    double tokens[SWEEP_MAX_POLICIES];
    memset(specs, 0, sizeof specs);
    for (int pol = 0; pol < n; pol++)
        snprintf(specs[pol].label, sizeof specs[pol].label, "%s", plan->label[pol]);
    for (int t = 0; t < plan->n_traces; t++)
        for (int v = 0; v < plan->n_values; v++) {
            for (int pol = 0; pol < n; pol++) {
                char dir[4400], path[4500], type[64], num[64];
                int c = (t * n + pol) * plan->n_values + v;
                sweep_cell_dir(plan, out, c, dir, sizeof dir);
                snprintf(path, sizeof path, "%s/summary.csv", dir);
                KvErr err;
                size_t len;
                char *text = kv_read_input(path, 0, &len, &err);
                const char *row = text ? strchr(text, '\n') : NULL;
                int col = -1, type_col = -1;
                for (int f = 0; text && row_field(text, f, num, sizeof num) && f < 64; f++) {
                    col = strcmp(num, "cache_tokens_mean") ? col : f;
                    type_col = strcmp(num, "type") ? type_col : f;
                }
                const PolicyType *pt = NULL;
                compare[pol] = row && col >= 0 && type_col >= 0 &&
                               row_field(row + 1, type_col, type, sizeof type) &&
                               (pt = policy_find(type)) && config_type_has_budget(pt) &&
                               row_field(row + 1, col, num, sizeof num);
                tokens[pol] = compare[pol] ? strtod(num, NULL) : NAN;
                free(text);
            }
            char at[4400], of[4200] = "";
            if (plan->n_traces > 1)
                snprintf(of, sizeof of, " on %s", plan->trace_name[t]);
            snprintf(at, sizeof at, "%s %s%s", plan->ratios ? "ratio" : "budget",
                     plan->value[v], of);
            report_warn_unequal_caches(stderr, "merge", specs, n, compare, tokens, at);
        }
}

static int sweep_usage_error(const char *msg)
{
    fprintf(stderr, "kvsim: sweep: %s\n", msg);
    return 2;
}

int cmd_sweep(int argc, char **argv)
{
    const char *budgets = NULL, *ratios = NULL, *out = NULL, *shard = NULL, *trace_help = NULL;
    int threads = -1, resume = 0, quiet = 0;
    const ArgSpec specs[] = {
        {"budgets", ARG_STRING, &budgets, 0, 0, NULL,
         "budgets in tokens per KV head, comma-separated (e.g. 64,128,256,512,1024)"},
        {"ratios", ARG_STRING, &ratios, 0, 0, NULL,
         "shares of each trace's prompt kept, comma-separated (instead of --budgets)"},
        {"trace", ARG_STRING, &trace_help, 0, 0, NULL,
         "a trace to replay; repeat it for several (overrides [trace] path)"},
        {"out", ARG_STRING, &out, 0, 0, NULL, "output directory (default: [run] out + /sweep)"},
        {"threads", ARG_INT, &threads, 0, 1024, NULL,
         "worker threads, 0 = all cores (overrides [run] threads)"},
        {"resume", ARG_FLAG, &resume, 0, 0, NULL, "keep the finished cells of OUT, run the rest"},
        {"shard", ARG_STRING, &shard, 0, 0, NULL,
         "I/N: run share I (0 <= I < N) of the cells only (kvsim merge joins the shares)"},
        {"quiet", ARG_FLAG, &quiet, 0, 0, NULL, "no report, no progress"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage =
        "sweep CONFIG.ini --budgets B,B,... | --ratios R,R,... [options]\n"
        "  Replays each trace through every [policy.LABEL] of CONFIG at every budget, all of a\n"
        "  trace's (policy, budget) cells in one pass, and writes OUT/bB/*.csv (those of a\n"
        "  `kvsim run` at B) and OUT/summary.csv (docs/sweeps.md). Results are identical at any\n"
        "  thread count, shard count or resumption.";
    KvErr err;
    char **kept = kv_calloc((size_t)argc + 1, sizeof *kept);
    const char **traces = kv_calloc(SWEEP_MAX_TRACES, sizeof *traces);
    int n_traces = 0;
    int kept_argc = take_traces(argc, argv, kept, traces, &n_traces, &err);
    const char *positional[1];
    int status = kept_argc < 0 ? (fprintf(stderr, "kvsim: %s\n", err.msg), 2)
                               : args_start(kept_argc, kept, specs, usage, positional, 1);
    free(kept);
    if (status >= 0) {
        free(traces);
        return status;
    }
    if (!budgets == !ratios) {
        free(traces);
        return sweep_usage_error(budgets ? "--budgets and --ratios given (expected one of them)"
                                         : "expected --budgets B,B,... or --ratios R,R,...");
    }
    SweepPlan plan;
    memset(&plan, 0, sizeof plan);
    plan.n_shards = 1;
    if (shard) {
        char extra;
        if (sscanf(shard, "%d/%d%c", &plan.shard, &plan.n_shards, &extra) != 2 ||
            plan.n_shards < 1 || plan.shard < 0 || plan.shard >= plan.n_shards) {
            char esc[160], msg[300];
            snprintf(msg, sizeof msg, "--shard '%s': expected I/N with 0 <= I < N",
                     kv_escape(shard, strlen(shard), esc, sizeof esc));
            free(traces);
            return sweep_usage_error(msg);
        }
    }
    if (sweep_parse_values(&plan, budgets ? budgets : ratios, ratios != NULL, &err) != 0) {
        free(traces);
        return sweep_usage_error(err.msg);
    }

    const char *config_path = positional[0];
    Provenance *prov = provenance_begin(argc, argv);
    RunConfig rc;
    if (config_load(config_path, &rc, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        free(traces);
        provenance_free(prov);
        return 2;
    }
    status = 2;
    Trace *tr = NULL;
    bool *todo = NULL;
    char out_dir[4200];
    if (out)
        snprintf(out_dir, sizeof out_dir, "%s", out);
    else
        snprintf(out_dir, sizeof out_dir, "%s/sweep", rc.out_dir);
    if (threads >= 0)
        rc.engine.threads = threads;
    if (n_traces == 0 && rc.trace_path[0])
        traces[n_traces++] = rc.trace_path;
    if (n_traces == 0) {
        fprintf(stderr, "kvsim: %s: no trace: set [trace] path or pass --trace\n", config_path);
        goto done;
    }
    if (config_sha256(config_path, plan.config_sha256, &err) != 0)
        goto fail;
    for (int t = 0; t < n_traces; t++)
        if (sweep_add_trace(&plan, traces[t], &err) != 0)
            goto fail;
    plan.n_policies = rc.engine.n_policies;
    for (int i = 0; i < plan.n_policies; i++)
        memcpy(plan.label[i], rc.engine.policies[i].label, sizeof plan.label[i]);

    /* Every cell's parameters are checked on every trace before any work, so that every shard
     * fails alike on a budget a policy cannot take. */
    int *n_prompt = kv_calloc((size_t)plan.n_traces, sizeof *n_prompt);
    for (int t = 0; t < plan.n_traces; t++) {
        if (!(tr = trace_open(plan.trace_path[t], &err))) {
            free(n_prompt);
            goto fail;
        }
        const TraceMeta *m = trace_meta(tr);
        n_prompt[t] = m->n_prompt;
        int bad = config_check_model(&rc, plan.trace_path[t], m->n_layers, m->n_q_heads,
                                     m->head_dim, m->rope_layout, &err);
        trace_close(tr);
        tr = NULL;
        bool all[SWEEP_MAX_POLICIES * SWEEP_MAX_VALUES];
        for (int k = 0; k < plan.n_policies * plan.n_values; k++)
            all[k] = true;
        Pass check;
        int first = t * plan.n_policies * plan.n_values;
        if (!bad)
            bad = build_pass(&plan, &rc, t, n_prompt[t], first,
                             first + plan.n_policies * plan.n_values, all, &check, &err);
        pass_free(&check);
        if (bad) {
            free(n_prompt);
            goto fail;
        }
    }

    /* OUT: a fresh sweep removes the cells and the summary of an earlier one; --resume keeps
     * them if OUT holds this very sweep. */
    if (make_dirs(out_dir, &err) != 0 || dir_writable(out_dir, &err) != 0) {
        free(n_prompt);
        goto fail;
    }
    char plan_path[4300];
    snprintf(plan_path, sizeof plan_path, "%s/sweep.txt", out_dir);
    struct stat st;
    if (resume && stat(plan_path, &st) == 0) {
        SweepPlan old;
        if (sweep_plan_read(&old, out_dir, &err) != 0) {
            free(n_prompt);
            goto fail;
        }
        bool same = sweep_plan_same(&old, &plan);
        sweep_plan_free(&old);
        if (!same) {
            kv_fail(&err, "%s: another sweep (config, values, traces or policies differ): "
                    "expected this sweep's directory to --resume (or run without --resume)",
                    plan_path);
            free(n_prompt);
            goto fail;
        }
    } else if (sweep_remove_cells(out_dir, &err) != 0) {
        free(n_prompt);
        goto fail;
    } else { /* an earlier sweep's table would outlive its cells */
        char old_summary[4300];
        snprintf(old_summary, sizeof old_summary, "%s/summary.csv", out_dir);
        if (unlink(old_summary) != 0 && errno != ENOENT) {
            kv_fail(&err, "%s: cannot remove: %s", old_summary, strerror(errno));
            free(n_prompt);
            goto fail;
        }
    }
    if (sweep_plan_write(&plan, out_dir, &err) != 0) {
        free(n_prompt);
        goto fail;
    }

    int first, end;
    sweep_shard_range(&plan, &first, &end);
    todo = kv_calloc((size_t)(end - first) + 1, sizeof *todo);
    int n_todo = 0, n_kept = 0;
    for (int c = first; c < end; c++) {
        todo[c - first] = !(resume && sweep_cell_done(&plan, out_dir, c));
        n_todo += todo[c - first];
        n_kept += !todo[c - first];
    }
    bool progress = !quiet && isatty(STDERR_FILENO);
    if (!quiet) {
        printf("sweep %s: %d policies x %d %s x %d trace%s = %d cells", config_path,
               plan.n_policies, plan.n_values, plan.ratios ? "ratios" : "budgets", plan.n_traces,
               plan.n_traces > 1 ? "s" : "", sweep_n_cells(&plan));
        if (plan.n_shards > 1)
            printf("; shard %d/%d: cells %d to %d", plan.shard, plan.n_shards, first, end - 1);
        if (n_kept)
            printf("; %d already done (--resume)", n_kept);
        printf("\n");
        fflush(stdout);
    }
    double started = now_seconds();
    int threads_used = 0, cells_done = 0;
    for (int t = 0; t < plan.n_traces && n_todo > 0; t++) {
        Pass ps;
        if (build_pass(&plan, &rc, t, n_prompt[t], first, end, todo, &ps, &err) != 0) {
            pass_free(&ps);
            free(n_prompt);
            goto fail;
        }
        if (ps.n == 0) {
            pass_free(&ps);
            continue;
        }
        if (!(tr = trace_open(plan.trace_path[t], &err))) {
            pass_free(&ps);
            free(n_prompt);
            goto fail;
        }
        EngineConfig ec = rc.engine;
        ec.policies = ps.specs;
        ec.n_policies = ps.n;
        ec.progress = progress;
        if (progress) { /* the pass's own line (engine.h) has its ETA; this one the sweep's */
            fprintf(stderr, "trace %d/%d %s: %d instances in one pass", t + 1, plan.n_traces,
                    plan.trace_path[t], ps.n);
            double elapsed = now_seconds() - started;
            if (cells_done > 0)
                fprintf(stderr, " (sweep: %d/%d cells, %.0fs elapsed, ETA %.0fs)", cells_done,
                        n_todo, elapsed, elapsed * (n_todo - cells_done) / cells_done);
            fprintf(stderr, "\n");
        }
        Results *res = engine_run(tr, &ec, &err);
        int cells = 0, bad = res == NULL;
        double *tokens = kv_calloc((size_t)(end - first) + 1, sizeof *tokens);
        for (int c = first; c < end && !bad; c++)
            if (ps.instance[c - first] >= 0) {
                bad = write_cell(&plan, out_dir, c, res, ps.instance[c - first],
                                 &tokens[c - first], &err);
                cells++;
            }
        if (!bad)
            warn_unequal_caches(&plan, &rc, t, n_prompt[t], first, end, &ps, tokens);
        free(tokens);
        if (!bad && !quiet) {
            printf("trace %s: %d cells, %d instances, one pass, %d threads, %.1fs\n",
                   plan.trace_path[t], cells, ps.n, res->threads_used, res->wall_seconds);
            fflush(stdout);
        }
        cells_done += cells;
        if (res)
            threads_used = res->threads_used;
        results_free(res);
        pass_free(&ps);
        trace_close(tr);
        tr = NULL;
        if (bad) {
            free(n_prompt);
            goto fail;
        }
    }
    free(n_prompt);

    /* The reader's files, once every cell is there (always, unsharded). */
    bool complete = true;
    for (int c = 0; c < sweep_n_cells(&plan) && complete; c++)
        complete = sweep_cell_done(&plan, out_dir, c);
    if (complete && sweep_assemble(&plan, out_dir, &err) != 0)
        goto fail;
    if (provenance_config(prov, config_path, &err) != 0)
        goto fail;
    for (int t = 0; t < plan.n_traces; t++)
        if (provenance_input(prov, "trace", plan.trace_path[t], &err) != 0)
            goto fail;
    provenance_string(prov, plan.ratios ? "ratios" : "budgets", budgets ? budgets : ratios);
    provenance_number(prov, "seed", (double)rc.engine.seed);
    provenance_number(prov, "threads", rc.engine.threads);
    provenance_number(prov, "threads_used", threads_used);
    provenance_number(prov, "shard", plan.shard);
    provenance_number(prov, "shards", plan.n_shards);
    provenance_number(prov, "cells_run", n_todo);
    provenance_number(prov, "cells_kept", n_kept);
    provenance_string(prov, "out", out_dir);
    if (provenance_write(prov, out_dir, &err) != 0)
        goto fail;
    if (!quiet) {
        if (complete)
            printf("wrote %s/summary.csv and %s/%c*/ (%d cells run, %.1fs)\n", out_dir, out_dir,
                   plan.ratios ? 'r' : 'b', n_todo, now_seconds() - started);
        else
            printf("wrote %d cells into %s/cells (%.1fs); kvsim merge joins the shards\n", n_todo,
                   out_dir, now_seconds() - started);
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvsim: %s\n", err.msg);
done:
    if (tr)
        trace_close(tr);
    free(todo);
    sweep_plan_free(&plan);
    config_free(&rc);
    free(traces);
    provenance_free(prov);
    return status;
}

/* Copies SRC's cell c into OUT (a temporary directory renamed into place). */
static int copy_cell(const SweepPlan *plan, const char *src, const char *out, int c, KvErr *err)
{
    char from[4400], dir[4400], tmp[4500];
    sweep_cell_dir(plan, src, c, from, sizeof from);
    sweep_cell_dir(plan, out, c, dir, sizeof dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    if (make_dirs(tmp, err) != 0)
        return -1;
    for (int o = 0; o < N_OUTPUTS; o++) {
        char a[4600], b[4700];
        snprintf(a, sizeof a, "%s/%s", from, metric_output_file((MetricOutput)o));
        snprintf(b, sizeof b, "%s/%s", tmp, metric_output_file((MetricOutput)o));
        size_t len;
        char *text = kv_read_input(a, 0, &len, err);
        if (!text)
            return -1;
        AtomicFile af;
        if (atomic_open(&af, b, err) != 0) {
            free(text);
            return -1;
        }
        fwrite(text, 1, len, af.fp);
        free(text);
        if (atomic_commit(&af, err) != 0)
            return -1;
    }
    return replace_cell(tmp, dir, err);
}

int cmd_merge(int argc, char **argv)
{
    const char *out = NULL;
    const ArgSpec specs[] = {
        {"out", ARG_STRING, &out, 0, 0, NULL, "the directory of the joined sweep (required)"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage =
        "merge --out OUT DIR...\n"
        "  Joins the directories of the shards of one sweep (kvsim sweep --shard I/N --out DIR)\n"
        "  into OUT: exactly the files one unsharded sweep writes (docs/cluster.md).";
    const char **dirs = kv_calloc((size_t)argc + 1, sizeof *dirs);
    int n_dirs = 0;
    KvErr err;
    int parsed = args_parse(argc, argv, specs, dirs, argc, &n_dirs, &err);
    if (parsed == 1) {
        args_usage(stdout, usage, specs);
        free(dirs);
        return 0;
    }
    if (parsed < 0 || n_dirs == 0 || !out) {
        fprintf(stderr, "kvsim: %s\n", parsed < 0 ? err.msg
                        : !out ? "merge: --out OUT is required (kvsim merge --help)"
                               : "merge: expected the shards' directories (kvsim merge --help)");
        free(dirs);
        return 2;
    }
    Provenance *prov = provenance_begin(argc, argv);
    SweepPlan plan, other;
    memset(&plan, 0, sizeof plan);
    int status = 2, missing = 0, first_missing = -1;
    if (sweep_plan_read(&plan, dirs[0], &err) != 0)
        goto fail;
    for (int d = 1; d < n_dirs; d++) {
        if (sweep_plan_read(&other, dirs[d], &err) != 0)
            goto fail;
        bool same = sweep_plan_same(&plan, &other);
        sweep_plan_free(&other);
        if (!same) {
            kv_fail(&err, "%s/sweep.txt: another sweep than %s/sweep.txt (config, values, traces "
                    "or policies differ): expected shards of one sweep", dirs[d], dirs[0]);
            goto fail;
        }
    }
    int n = sweep_n_cells(&plan);
    int *from = kv_calloc((size_t)n, sizeof *from);
    for (int c = 0; c < n; c++) {
        from[c] = -1;
        for (int d = 0; d < n_dirs && from[c] < 0; d++)
            if (sweep_cell_done(&plan, dirs[d], c))
                from[c] = d;
        if (from[c] < 0 && missing++ == 0)
            first_missing = c;
    }
    if (missing) {
        int t, pol, v;
        sweep_cell(&plan, first_missing, &t, &pol, &v);
        kv_fail(&err, "merge: %d of %d cells are in none of the directories, the first: %s at "
                "%s %s on %s (cell %d; expected the directories of every shard)", missing, n,
                plan.label[pol], plan.ratios ? "ratio" : "budget", plan.value[v],
                plan.trace_path[t], first_missing);
        free(from);
        goto fail;
    }
    plan.shard = 0;
    plan.n_shards = 1;
    if (make_dirs(out, &err) != 0 || dir_writable(out, &err) != 0) {
        free(from);
        goto fail;
    }
    /* OUT's cells are replaced: it must not be one of the shards' directories. */
    struct stat so, sd;
    for (int d = 0; d < n_dirs; d++)
        if (stat(out, &so) == 0 && stat(dirs[d], &sd) == 0 && so.st_dev == sd.st_dev &&
            so.st_ino == sd.st_ino) {
            kv_fail(&err, "merge: --out %s is the shard directory %s (expected a directory of "
                    "its own)", out, dirs[d]);
            free(from);
            goto fail;
        }
    if (sweep_remove_cells(out, &err) != 0 || sweep_plan_write(&plan, out, &err) != 0) {
        free(from);
        goto fail;
    }
    for (int c = 0; c < n; c++)
        if (copy_cell(&plan, dirs[from[c]], out, c, &err) != 0) {
            free(from);
            goto fail;
        }
    free(from);
    if (sweep_assemble(&plan, out, &err) != 0)
        goto fail;
    merge_warn_unequal_caches(&plan, out);
    for (int d = 0; d < n_dirs; d++)
        provenance_string(prov, "shard_dir", dirs[d]);
    provenance_string(prov, "out", out);
    if (provenance_write(prov, out, &err) != 0)
        goto fail;
    printf("merged %d cells from %d director%s into %s/summary.csv and %s/%c*/\n", n, n_dirs,
           n_dirs == 1 ? "y" : "ies", out, out, plan.ratios ? 'r' : 'b');
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvsim: %s\n", err.msg);
done:
    sweep_plan_free(&plan);
    free(dirs);
    provenance_free(prov);
    return status;
}
