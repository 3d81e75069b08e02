#include "sim/run_cmd.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/config.h"
#include "sim/report.h"

static void run_usage(FILE *out)
{
    fprintf(out,
            "usage: kvsim run CONFIG.ini [--trace TRACE.h5] [--out DIR] [--threads N] [--quiet]\n"
            "  Replays the trace through every [policy.LABEL] of CONFIG and writes summary.csv,\n"
            "  layers.csv and steps.csv to DIR (default: [run] out, else results/CONFIG-NAME).\n"
            "  --threads 0 uses all cores. Results are identical at any thread count.\n");
}

int cmd_run(int argc, char **argv)
{
    const char *config_path = NULL, *trace = NULL, *out = NULL;
    int threads = -1;
    bool quiet = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            run_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) {
            quiet = true;
        } else if ((!strcmp(a, "--trace") || !strcmp(a, "--out") || !strcmp(a, "--threads"))) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kvsim run: %s needs a value\n", a);
                return 2;
            }
            const char *v = argv[++i];
            if (!strcmp(a, "--trace")) {
                trace = v;
            } else if (!strcmp(a, "--out")) {
                out = v;
            } else {
                char *end;
                errno = 0;
                long n = strtol(v, &end, 10);
                if (errno || *end || end == v || n < 0 || n > 1024) {
                    fprintf(stderr, "kvsim run: --threads '%s': expected an integer in [0, 1024]\n", v);
                    return 2;
                }
                threads = (int)n;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "kvsim run: unknown option '%s' (kvsim run --help)\n", a);
            return 2;
        } else if (!config_path) {
            config_path = a;
        } else {
            fprintf(stderr, "kvsim run: unexpected argument '%s' (one CONFIG expected)\n", a);
            return 2;
        }
    }
    if (!config_path) {
        fprintf(stderr, "kvsim run: missing CONFIG.ini (usage: kvsim run --help)\n");
        return 2;
    }

    RunConfig rc;
    KvErr err;
    if (config_load(config_path, &rc, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
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
        return 2;
    }

    Trace *tr = trace_open(rc.trace_path, &err);
    if (!tr) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        config_free(&rc);
        return 2;
    }
    Results *res = engine_run(tr, &rc.engine, &err);
    int status = 0;
    if (!res) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        status = 2;
    } else if (report_write_csv(res, rc.out_dir, &err) != 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        status = 2;
    } else {
        const TraceMeta *m = trace_meta(tr);
        if (!quiet) {
            printf("trace %s: %s, %d layers, %d+%d tokens; %d policies, %d threads, %.1fs\n",
                   rc.trace_path, m->model, m->n_layers, m->n_prompt, m->n_tokens - m->n_prompt,
                   res->n_policies, res->threads_used, res->wall_seconds);
            report_print_table(res, stdout);
            printf("wrote %s/summary.csv, layers.csv, steps.csv\n", rc.out_dir);
        }
    }
    results_free(res);
    trace_close(tr);
    config_free(&rc);
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
