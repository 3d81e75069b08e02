/* `kvsim run` over a dataset of traces end to end (docs/metrics.md, "Datasets"): three small
 * synthetic traces given by a glob in [trace] path and by repeated --trace, at 1 and 2 threads,
 * give the same traces.csv, dataset.csv and paired.csv; the dataset means are the means of the
 * per-trace rows, inside their bootstrap intervals; a policy identical to the reference has a
 * paired difference of exactly 0; identical traces give zero-width intervals; a glob matching no
 * file and an unknown reference are one-line errors with exit status 2. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/scratch.h"

static char *dir;
static char trace[3][1024];
static char config[1024];

/* full and its twin, two budgeted policies and the floor: five policies */
static const char *const policies =
    "[policy.full]\ntype = full\n"
    "[policy.twin]\ntype = full\n"
    "[policy.window]\ntype = window\nwindow = 60\nsinks = 4\n"
    "[policy.h2o]\ntype = h2o\nbudget = 64\n"
    "[policy.random]\ntype = random\nbudget = 64\n";
enum { N_POLICIES = 5 };

static int setup(void **state)
{
    (void)state;
    dir = scratch_create();
    for (int t = 0; t < 3; t++) {
        snprintf(trace[t], sizeof trace[t], "%s/t%d.h5", dir, t + 1);
        KvsimRun r = run_kvsim_ok("synth --out '%s' --seed %d --layers 2 --q-heads 4 --kv-heads 2 "
                                  "--head-dim 32 --prompt 256 --decode 24 --needles 2",
                                  trace[t], 11 + t);
        kvsim_run_free(&r);
    }
    snprintf(config, sizeof config, "%s/ds.ini", dir);
    char text[4096];
    snprintf(text, sizeof text, "[trace]\npath = %s/t*.h5\n[run]\nseed = 3\n%s", dir, policies);
    scratch_write(config, text);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    free(dir);
    return 0;
}

static char *read_out(const char *sub, const char *file)
{
    char path[2200];
    snprintf(path, sizeof path, "%s/%s/%s", dir, sub, file);
    return scratch_read(path);
}

/* Field i (0-based) of a CSV line without quotes, into out; "" past the end. */
static void field(const char *line, int i, char *out, size_t n)
{
    for (; i > 0 && line; i--) {
        line = strpbrk(line, ",\n");
        line = line && *line == ',' ? line + 1 : NULL;
    }
    size_t len = line ? strcspn(line, ",\n") : 0;
    snprintf(out, n, "%.*s", (int)(len < n ? len : n - 1), line ? line : "");
}

/* The line of `csv` whose first fields are a and b, or NULL. */
static const char *row(const char *csv, int col_a, const char *a, int col_b, const char *b)
{
    for (const char *line = csv; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL) {
        char fa[128], fb[128];
        field(line, col_a, fa, sizeof fa);
        field(line, col_b, fb, sizeof fb);
        if (!strcmp(fa, a) && !strcmp(fb, b))
            return line;
    }
    return NULL;
}

static double num(const char *line, int i)
{
    char f[64];
    field(line, i, f, sizeof f);
    assert_true(f[0] != '\0');
    return strtod(f, NULL);
}

/* The column of `name` in the header line of csv. */
static int column(const char *csv, const char *name)
{
    for (int i = 0;; i++) {
        char f[128];
        field(csv, i, f, sizeof f);
        if (!f[0])
            fail_msg("no column %s", name);
        if (!strcmp(f, name))
            return i;
    }
}

static void test_glob_and_repeated_trace_agree(void **state)
{
    (void)state;
    KvsimRun r1 = run_kvsim_ok("run '%s' --out '%s/g1' --threads 1", config, dir);
    assert_non_null(strstr(r1.out, "dataset of 3 traces"));
    assert_non_null(strstr(r1.out, "trace 3/3"));
    kvsim_run_free(&r1);
    KvsimRun r2 = run_kvsim_ok("run '%s' --trace '%s' --trace '%s' --trace '%s' --out '%s/g2' "
                               "--threads 2 --quiet", config, trace[0], trace[1], trace[2], dir);
    assert_string_equal(r2.out, "");
    kvsim_run_free(&r2);
    const char *files[3] = {"traces.csv", "dataset.csv", "paired.csv"};
    for (int i = 0; i < 3; i++) {
        char *a = read_out("g1", files[i]), *b = read_out("g2", files[i]);
        assert_true(a[0] != '\0');
        assert_string_equal(a, b);
        free(a);
        free(b);
    }
    char *summary = read_out("g1", "summary.csv"); /* a dataset writes no single-trace files */
    assert_string_equal(summary, "");
    free(summary);

    char *traces = read_out("g1", "traces.csv"), *ds = read_out("g1", "dataset.csv");
    char *paired = read_out("g1", "paired.csv");
    assert_int_equal(count_lines(traces), 1 + 3 * N_POLICIES);
    assert_non_null(strstr(traces, "\n0,t1.h5,full,full,"));
    assert_non_null(strstr(traces, "\n2,t3.h5,random,random,"));
    int mass = column(traces, "mass_mean");
    const char *labels[N_POLICIES] = {"full", "twin", "window", "h2o", "random"};
    for (int p = 0; p < N_POLICIES; p++) {
        /* the dataset mean is the mean of the three traces' values */
        double sum = 0;
        for (int t = 0; t < 3; t++) {
            char idx[8];
            snprintf(idx, sizeof idx, "%d", t);
            const char *line = row(traces, 0, idx, 2, labels[p]);
            assert_non_null(line);
            sum += num(line, mass);
        }
        const char *line = row(ds, 0, labels[p], 2, "mass_mean");
        assert_non_null(line);
        assert_int_equal((int)num(line, 3), 3);
        double m = num(line, 4), lo = num(line, 5), hi = num(line, 6);
        assert_true(fabs(m - sum / 3) < 1e-8);
        assert_true(lo <= m && m <= hi);
        if (p >= 2) /* the budgeted policies: below the full cache on some trace */
            assert_true(m < 1);
    }
    /* paired: the twin of the reference differs by exactly 0; every other policy has rows; the
     * reference none */
    assert_null(row(paired, 0, "full", 2, "mass_mean"));
    const char *twin = row(paired, 0, "twin", 2, "mass_mean");
    assert_non_null(twin);
    char f[64];
    field(twin, 1, f, sizeof f);
    assert_string_equal(f, "full");
    assert_true(num(twin, 4) == 0 && num(twin, 5) == 0 && num(twin, 6) == 0);
    const char *w = row(paired, 0, "window", 2, "mass_mean");
    const char *wm = row(ds, 0, "window", 2, "mass_mean"), *fm = row(ds, 0, "full", 2, "mass_mean");
    assert_true(fabs(num(w, 4) - (num(wm, 4) - num(fm, 4))) < 1e-8);
    assert_true(num(w, 5) <= num(w, 4) && num(w, 4) <= num(w, 6) && num(w, 6) < 0);
    assert_int_equal(count_lines(paired), 1 + (N_POLICIES - 1) * (count_lines(ds) - 1) / N_POLICIES);
    free(traces);
    free(ds);
    free(paired);
}

/* The same trace three times: every interval has zero width, at the trace's own value. */
static void test_identical_traces_zero_width(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("run '%s' --trace '%s' --trace '%s' --trace '%s' --out '%s/same' "
                              "--quiet", config, trace[1], trace[1], trace[1], dir);
    kvsim_run_free(&r);
    char *ds = read_out("same", "dataset.csv"), *traces = read_out("same", "traces.csv");
    int n = 0;
    for (const char *line = strchr(ds, '\n') + 1; *line; line = strchr(line, '\n') + 1) {
        char mean[64], lo[64], hi[64];
        field(line, 4, mean, sizeof mean);
        field(line, 5, lo, sizeof lo);
        field(line, 6, hi, sizeof hi);
        assert_string_equal(lo, mean);
        assert_string_equal(hi, mean);
        n += mean[0] != '\0';
    }
    assert_true(n > 10 * N_POLICIES); /* most columns apply */
    const char *h2o = row(ds, 0, "h2o", 2, "mass_mean");
    double v = num(row(traces, 0, "0", 2, "h2o"), column(traces, "mass_mean"));
    assert_true(fabs(num(h2o, 4) - v) < 1e-8);
    free(ds);
    free(traces);
}

static void test_errors(void **state)
{
    (void)state;
    char ini[1100], text[4096], args[4400];
    snprintf(ini, sizeof ini, "%s/nomatch.ini", dir);
    snprintf(text, sizeof text, "[trace]\npath = %s/none*.h5\n%s", dir, policies);
    scratch_write(ini, text);
    snprintf(args, sizeof args, "run '%s' --out '%s/e1'", ini, dir);
    run_kvsim_fails(args, "nomatch.ini:2: [trace] path", "none*.h5' matches no file", NULL);
    snprintf(args, sizeof args, "run '%s' --trace '%s' --trace '%s/zz?.h5' --out '%s/e2'", config,
             trace[0], dir, dir);
    run_kvsim_fails(args, "--trace", "zz?.h5' matches no file", NULL);
    snprintf(ini, sizeof ini, "%s/ref.ini", dir);
    snprintf(text, sizeof text, "[run]\nreference = nope\n%s", policies);
    scratch_write(ini, text);
    snprintf(args, sizeof args, "run '%s' --trace '%s' --out '%s/e3'", ini, trace[0], dir);
    run_kvsim_fails(args, "ref.ini:2: reference = 'nope': no [policy.nope]", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_glob_and_repeated_trace_agree),
        cmocka_unit_test(test_identical_traces_zero_width),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
