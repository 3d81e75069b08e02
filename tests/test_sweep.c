/* `kvsim sweep` and `kvsim merge` end to end through the built binary: each cell's CSVs are a
 * standalone `kvsim run` of that policy at that budget (byte for byte), configs/ta512.ini swept
 * gives the parameters docs/sweeps.md tabulates, the files do not depend on the thread count,
 * --resume keeps finished cells, shards joined by merge are the unsharded sweep's files, several
 * traces and ratios, and one-line errors with exit status 2 for bad flags. */
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "tests/support/scratch.h"

static char *dir;
static char trace_a[1100], trace_b[1100], config[1100], config_dir[1100];

/* Policies without budgets of their own: what [run] budget = B sets is what the sweep sets. */
static const char CONFIG[] =
    "[run]\nthreads = 0\nseed = 3\n"
    "[policy.full]\ntype = full\n"
    "[policy.window]\ntype = window\nsinks = 4\n"
    "[policy.h2o]\ntype = h2o\nheavy_ratio = 0.5\n"
    "[policy.random]\ntype = random\n"
    "[policy.snapkv]\ntype = snapkv\nobservation = 16\n"
    "[policy.decay]\ntype = decay\n"
    "[policy.oracle_topk]\ntype = oracle_topk\n";

static int setup(void **state)
{
    (void)state;
    dir = scratch_create();
    const char *src = getenv("KVSIM_SOURCE_DIR");
    snprintf(config_dir, sizeof config_dir, "%s/configs", src ? src : ".");
    snprintf(trace_a, sizeof trace_a, "%s/a.h5", dir);
    snprintf(trace_b, sizeof trace_b, "%s/b.h5", dir);
    snprintf(config, sizeof config, "%s/sweep.ini", dir);
    scratch_write(config, CONFIG);
    KvsimRun r = run_kvsim_ok("synth --out '%s' --seed 5 --layers 2 --q-heads 4 --kv-heads 2 "
                              "--head-dim 32 --prompt 384 --decode 48 --needles 4 --system 16",
                              trace_a);
    kvsim_run_free(&r);
    r = run_kvsim_ok("synth --out '%s' --seed 6 --layers 2 --q-heads 4 --kv-heads 2 "
                     "--head-dim 32 --prompt 320 --decode 40 --needles 3 --system 16", trace_b);
    kvsim_run_free(&r);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    free(dir);
    return 0;
}

static const char *const FILES[4] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv"};

static void assert_same_file(const char *a, const char *b)
{
    char *x = scratch_read(a), *y = scratch_read(b);
    if (strcmp(x, y) != 0)
        fail_msg("%s and %s differ", a, b);
    assert_true(strlen(x) > 0);
    free(x);
    free(y);
}

/* Every file of two directories the same, run.json (times, command lines) apart. */
static void assert_same_tree(const char *a, const char *b)
{
    char cmd[2600];
    snprintf(cmd, sizeof cmd, "diff -r -x run.json '%s' '%s' >/dev/null", a, b);
    if (system(cmd) != 0)
        fail_msg("the files of %s and %s differ", a, b);
}

static bool exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Each budget's files are those of `kvsim run` with [run] budget = B: the same bytes. */
static void test_cells_equal_standalone_runs(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 128,64 --out '%s/s' --quiet",
                              config, trace_a, dir);
    assert_string_equal(r.out, "");
    kvsim_run_free(&r);
    int budgets[2] = {64, 128};
    for (int i = 0; i < 2; i++) {
        char ini[1200], text[2048], a[1300], b[1300];
        snprintf(ini, sizeof ini, "%s/run%d.ini", dir, budgets[i]);
        snprintf(text, sizeof text, "%s", CONFIG);
        char *run = strstr(text, "seed = 3\n") + strlen("seed = 3\n");
        char rest[2048];
        snprintf(rest, sizeof rest, "%s", run);
        snprintf(run, sizeof text - (size_t)(run - text), "budget = %d\n%s", budgets[i], rest);
        scratch_write(ini, text);
        r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/r%d' --quiet", ini, trace_a, dir,
                         budgets[i]);
        kvsim_run_free(&r);
        for (int f = 0; f < 4; f++) {
            snprintf(a, sizeof a, "%s/s/b%d/%s", dir, budgets[i], FILES[f]);
            snprintf(b, sizeof b, "%s/r%d/%s", dir, budgets[i], FILES[f]);
            assert_same_file(a, b);
        }
    }
    /* summary.csv: budget, then the run's columns; rows by budget, then policy order */
    char *s = scratch_read(scratch_path(dir, "s/summary.csv", 0));
    assert_int_equal(strncmp(s, "budget,policy,type,", 19), 0);
    assert_int_equal(count_lines(s), 1 + 2 * 7);
    char *row = strchr(s, '\n') + 1;
    assert_int_equal(strncmp(row, "64,full,full,", 13), 0);
    assert_non_null(strstr(s, "\n128,oracle_topk,oracle_topk,"));
    assert_null(strstr(strstr(s, "\n128,"), "\n64,")); /* budgets ascending */
    free(s);
}

/* The policies whose larger budgets keep supersets, at 20 budgets in one pass (the instances
 * of oracle_topk stepping together, sharing one selection: policies/policy.h, step_many), the
 * smallest and one beyond the trace's 432 tokens included: every cell is the bytes of its own
 * `kvsim run`. */
static void test_many_budgets_equal_standalone_runs(void **state)
{
    (void)state;
    static const char NESTED[] = "[run]\nthreads = 0\nseed = 3\n"
                                 "[policy.window]\ntype = window\nsinks = 4\n"
                                 "[policy.oracle_topk]\ntype = oracle_topk\n";
    enum { NB = 20 };
    int budgets[NB];
    char list[256] = "";
    for (int i = 0; i < NB; i++) {
        budgets[i] = i < NB - 1 ? 5 + 21 * i : 500;
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%d", i ? "," : "",
                 budgets[i]);
    }
    char ini[1200];
    snprintf(ini, sizeof ini, "%s/nested.ini", dir);
    scratch_write(ini, NESTED);
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets %s --out '%s/nested' --quiet",
                              ini, trace_a, list, dir);
    kvsim_run_free(&r);
    for (int i = 0; i < NB; i++) {
        char one[1200], text[512], a[1300], b[1300];
        snprintf(one, sizeof one, "%s/nested%d.ini", dir, budgets[i]);
        snprintf(text, sizeof text,
                 "[run]\nthreads = 0\nseed = 3\nbudget = %d\n%s", budgets[i],
                 strstr(NESTED, "[policy."));
        scratch_write(one, text);
        r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/nested_r%d' --quiet", one, trace_a,
                         dir, budgets[i]);
        kvsim_run_free(&r);
        for (int f = 0; f < 4; f++) {
            snprintf(a, sizeof a, "%s/nested/b%d/%s", dir, budgets[i], FILES[f]);
            snprintf(b, sizeof b, "%s/nested_r%d/%s", dir, budgets[i], FILES[f]);
            assert_same_file(a, b);
        }
    }
    char *s = scratch_read(scratch_path(dir, "nested/summary.csv", 0));
    assert_int_equal(count_lines(s), 1 + 2 * NB);
    free(s);
}

/* Policies given the same budget that hold more than 5% apart: the warning of `kvsim run`
 * (report_warn_unequal_caches), one line per budget, naming the smallest and the largest; trig
 * holds more than its budget between its prunes, window and oracle_topk hold exactly theirs
 * (full is never compared), so that pair gives no warning. The shards of that sweep each see
 * only their cells; `kvsim merge` makes the check over all of them: the sweep's very lines
 * (the window's label holds a comma, quoted in the cells' CSVs). */
static void test_unequal_caches_warn_per_budget(void **state)
{
    (void)state;
    char ini[1200];
    snprintf(ini, sizeof ini, "%s/unequal.ini", dir);
    scratch_write(ini, "[run]\nseed = 3\n[policy.full]\ntype = full\n"
                       "[policy.win,dow]\ntype = window\nsinks = 4\n"
                       "[policy.trig]\ntype = trig\n");
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,256,128 --out '%s/unequal' "
                              "--quiet", ini, trace_a, dir);
    assert_int_equal(count_lines(r.err), 3);
    static const char *const at[3] = {"64", "128", "256"};
    const char *line = r.err;
    for (int i = 0; i < 3; i++) { /* budgets ascending */
        char want[200];
        snprintf(want, sizeof want, "kvsim sweep: warning: at budget %s the policies' mean "
                 "caches are more than 5%% apart: win,dow holds %s.0 tokens per KV head, trig ",
                 at[i], at[i]);
        assert_int_equal(strncmp(line, want, strlen(want)), 0);
        line = strchr(line, '\n') + 1;
    }
    for (int i = 0; i < 3; i++) {
        KvsimRun sh = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,256,128 --shard %d/3 "
                                   "--out '%s/unequal%d' --quiet", ini, trace_a, i, dir, i);
        kvsim_run_free(&sh);
    }
    KvsimRun m = run_kvsim_ok("merge --out '%s/unequal_m' '%s/unequal0' '%s/unequal1' "
                              "'%s/unequal2'", dir, dir, dir, dir);
    const char *a = r.err, *b = m.err;
    for (int i = 0; i < 3; i++) { /* "kvsim merge: " and the rest of the sweep's line */
        assert_int_equal(strncmp(b, "kvsim merge: ", 13), 0);
        size_t len = (size_t)(strchr(a, '\n') - a) - 13;
        assert_int_equal(strncmp(b + 13, a + 13, len + 1), 0);
        a = strchr(a, '\n') + 1;
        b = strchr(b, '\n') + 1;
    }
    assert_string_equal(b, "");
    kvsim_run_free(&m);
    kvsim_run_free(&r);

    snprintf(ini, sizeof ini, "%s/equal.ini", dir);
    scratch_write(ini, "[run]\nseed = 3\n[policy.full]\ntype = full\n"
                       "[policy.window]\ntype = window\nsinks = 4\n"
                       "[policy.oracle_topk]\ntype = oracle_topk\n");
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,256,128 --out '%s/equal' --quiet",
                     ini, trace_a, dir);
    assert_string_equal(r.err, "");
    kvsim_run_free(&r);
}

/* configs/ta512.ini sets every policy's budget at 512: the sweep scales each policy whole, so
 * that budget 512 is the config as written (the standalone run of it). */
static void test_ta512_at_its_own_budget(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("sweep '%s/ta512.ini' --trace '%s' --budgets 64,512 --out '%s/ta' "
                              "--threads 2", config_dir, trace_a, dir);
    assert_non_null(strstr(r.out, "13 policies x 2 budgets x 1 trace = 26 cells"));
    /* full once for both budgets: 25 instances in the one pass */
    assert_non_null(strstr(r.out, "26 cells, 25 instances, one pass"));
    kvsim_run_free(&r);
    r = run_kvsim_ok("run '%s/ta512.ini' --trace '%s' --out '%s/ta_run' --quiet", config_dir,
                     trace_a, dir);
    kvsim_run_free(&r);
    char a[1300], b[1300];
    for (int f = 0; f < 4; f++) {
        snprintf(a, sizeof a, "%s/ta/b512/%s", dir, FILES[f]);
        snprintf(b, sizeof b, "%s/ta_run/%s", dir, FILES[f]);
        assert_same_file(a, b);
    }
    /* at 64 the mean caches of the budgeted policies are near 64 (trig, pruned periodically,
     * holds more: docs/sweeps.md) */
    char *s = scratch_read(scratch_path(dir, "ta/b64/summary.csv", 0));
    assert_non_null(strstr(s, "\nwindow,window,"));
    free(s);
}

static void test_identical_at_any_thread_count(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,96 --out '%s/t1' --threads 1 "
                              "--quiet", config, trace_a, dir);
    kvsim_run_free(&r);
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,96 --out '%s/t2' --threads 2 --quiet",
                     config, trace_a, dir);
    kvsim_run_free(&r);
    char a[1200], b[1200];
    snprintf(a, sizeof a, "%s/t1", dir);
    snprintf(b, sizeof b, "%s/t2", dir);
    assert_same_tree(a, b);
}

/* A shard's cells, then --resume of the whole sweep: the shard's cells are kept (not run
 * again) and the files are those of one sweep. */
static void test_resume_skips_finished_cells(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,80,96 --out '%s/full' --quiet",
                              config, trace_a, dir);
    kvsim_run_free(&r);
    /* a whole sweep first: the share after it (without --resume) starts afresh */
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,80,96 --out '%s/res' --quiet",
                     config, trace_a, dir);
    kvsim_run_free(&r);
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,80,96 --out '%s/res' --shard 0/3",
                     config, trace_a, dir);
    assert_non_null(strstr(r.out, "shard 0/3: cells 0 to 6"));
    assert_non_null(strstr(r.out, "kvsim merge joins the shards"));
    kvsim_run_free(&r);
    assert_false(exists(scratch_path(dir, "res/summary.csv", 0)));
    assert_false(exists(scratch_path(dir, "res/cells/t0/p3/b64", 0))); /* not its share */
    /* a cell's file, marked: resume must keep it as it is */
    const char *cell = scratch_path(dir, "res/cells/t0/p1/b64/turns.csv", 1);
    char *before = scratch_read(cell);
    assert_true(strlen(before) > 0);
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,80,96 --out '%s/res' --resume",
                     config, trace_a, dir);
    assert_non_null(strstr(r.out, "7 already done (--resume)"));
    assert_non_null(strstr(r.out, "14 cells, 14 instances")); /* full: not deduplicated across */
    kvsim_run_free(&r);
    char a[1200], b[1200];
    snprintf(a, sizeof a, "%s/full", dir);
    snprintf(b, sizeof b, "%s/res", dir);
    assert_same_tree(a, b);
    /* everything done: a resume runs nothing, keeps every cell as it is (a marked one shows
     * it) and assembles the files from them */
    char marked[1300];
    snprintf(marked, sizeof marked, "%smarked\n", before);
    scratch_write(cell, marked);
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,80,96 --out '%s/res' --resume",
                     config, trace_a, dir);
    assert_non_null(strstr(r.out, "21 already done"));
    assert_null(strstr(r.out, "one pass"));
    kvsim_run_free(&r);
    char *after = scratch_read(cell);
    assert_string_equal(after, marked);
    free(after);
    char *turns = scratch_read(scratch_path(dir, "res/b64/turns.csv", 0));
    assert_non_null(strstr(turns, "\nmarked\n"));
    free(turns);
    scratch_write(cell, before);
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64,80,96 --out '%s/res' --resume --quiet",
                     config, trace_a, dir);
    kvsim_run_free(&r);
    assert_same_tree(a, b);
    /* a resume of another sweep in that directory is refused */
    char args[4000];
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64,80 --out '%s/res' --resume",
             config, trace_a, dir);
    run_kvsim_fails(args, "res/sweep.txt", "another sweep", NULL);
    free(before);
}

/* Three shards joined by merge: every file the unsharded sweep wrote, byte for byte, over two
 * traces (a `trace` column, a directory per trace). */
static void test_shards_merge_to_the_unsharded_files(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --trace '%s' --budgets 64,128 "
                              "--out '%s/whole' --quiet", config, trace_a, trace_b, dir);
    kvsim_run_free(&r);
    for (int i = 0; i < 3; i++) {
        r = run_kvsim_ok("sweep '%s' --trace '%s' --trace '%s' --budgets 64,128 --out '%s/sh%d' "
                         "--shard %d/3 --quiet", config, trace_a, trace_b, dir, i, i);
        kvsim_run_free(&r);
    }
    r = run_kvsim_ok("merge --out '%s/merged' '%s/sh2' '%s/sh0' '%s/sh1'", dir, dir, dir, dir);
    assert_non_null(strstr(r.out, "merged 28 cells from 3 directories"));
    kvsim_run_free(&r);
    char a[1200], b[1200];
    snprintf(a, sizeof a, "%s/whole", dir);
    snprintf(b, sizeof b, "%s/merged", dir);
    assert_same_tree(a, b);
    assert_true(exists(scratch_path(dir, "merged/a/b64/steps.csv", 0)));
    assert_true(exists(scratch_path(dir, "merged/b/b128/layers.csv", 0)));
    char *s = scratch_read(scratch_path(dir, "merged/summary.csv", 0));
    assert_int_equal(strncmp(s, "trace,budget,policy,type,", 25), 0);
    assert_int_equal(count_lines(s), 1 + 2 * 2 * 7);
    assert_non_null(strstr(s, "\nb,128,decay,decay,"));
    free(s);

    /* a missing shard, and a shard of another sweep */
    char args[4000];
    snprintf(args, sizeof args, "merge --out '%s/m2' '%s/sh0' '%s/sh2'", dir, dir, dir);
    run_kvsim_fails(args, "merge:", "cells are in none of the directories", NULL);
    r = run_kvsim_ok("sweep '%s' --trace '%s' --budgets 64 --out '%s/other' --shard 1/3 --quiet",
                     config, trace_a, dir);
    kvsim_run_free(&r);
    snprintf(args, sizeof args, "merge --out '%s/m3' '%s/sh0' '%s/other'", dir, dir, dir);
    run_kvsim_fails(args, "other/sweep.txt", "another sweep", NULL);
    snprintf(args, sizeof args, "merge --out '%s/sh1' '%s/sh0' '%s/sh1' '%s/sh2'", dir, dir, dir,
             dir);
    run_kvsim_fails(args, "sh1 is the shard directory", NULL);
    assert_true(exists(scratch_path(dir, "sh1/cells", 0))); /* untouched */
    snprintf(args, sizeof args, "merge '%s/sh0'", dir);
    run_kvsim_fails(args, "--out OUT is required", NULL);
    snprintf(args, sizeof args, "merge --out '%s/m4' '%s'", dir, dir);
    run_kvsim_fails(args, "sweep.txt", NULL);
}

/* --ratios: each cell as `kvsim run` with [run] ratio = r. */
static void test_ratios_equal_standalone_runs(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("sweep '%s' --trace '%s' --ratios 0.25 --out '%s/rat' --quiet",
                              config, trace_a, dir);
    kvsim_run_free(&r);
    char ini[1200], text[2048];
    snprintf(ini, sizeof ini, "%s/ratio.ini", dir);
    snprintf(text, sizeof text, "[run]\nratio = 0.25\n%s", CONFIG + strlen("[run]\n"));
    scratch_write(ini, text);
    r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/rat_run' --quiet", ini, trace_a, dir);
    kvsim_run_free(&r);
    char a[1300], b[1300];
    for (int f = 0; f < 4; f++) {
        snprintf(a, sizeof a, "%s/rat/r0.25/%s", dir, FILES[f]);
        snprintf(b, sizeof b, "%s/rat_run/%s", dir, FILES[f]);
        assert_same_file(a, b);
    }
    char *s = scratch_read(scratch_path(dir, "rat/summary.csv", 0));
    assert_int_equal(strncmp(s, "ratio,policy,", 13), 0);
    assert_non_null(strstr(s, "\n0.25,window,"));
    free(s);
}

static void test_bad_flags_one_line_exit_2(void **state)
{
    (void)state;
    char args[4000];
    snprintf(args, sizeof args, "sweep '%s' --trace '%s'", config, trace_a);
    run_kvsim_fails(args, "expected --budgets", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64 --ratios 0.5", config,
             trace_a);
    run_kvsim_fails(args, "--budgets and --ratios given", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64,abc", config, trace_a);
    run_kvsim_fails(args, "--budgets: 'abc' is not a positive integer", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64,,128", config, trace_a);
    run_kvsim_fails(args, "--budgets", "item 2 is empty", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 128,64,128", config, trace_a);
    run_kvsim_fails(args, "--budgets: 128 is given twice", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --ratios 1.5", config, trace_a);
    run_kvsim_fails(args, "--ratios: '1.5' is not a ratio in (0, 1]", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64 --shard 3/3", config,
             trace_a);
    run_kvsim_fails(args, "--shard '3/3': expected I/N with 0 <= I < N", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64 --shard 1/2x", config,
             trace_a);
    run_kvsim_fails(args, "--shard '1/2x'", NULL);
    snprintf(args, sizeof args, "sweep '%s' --budgets 64 --trace", config);
    run_kvsim_fails(args, "--trace: missing value", NULL);
    snprintf(args, sizeof args, "sweep '%s' --budgets 64", config);
    run_kvsim_fails(args, "sweep.ini: no trace", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --trace '%s/x/a.h5' --budgets 64",
             config, trace_a, dir);
    run_kvsim_fails(args, "a trace named 'a' is already in the sweep", NULL);
    snprintf(args, sizeof args, "sweep '%s' --trace '%s/missing.h5' --budgets 64", config, dir);
    run_kvsim_fails(args, "missing.h5", NULL);
    /* a budget a policy cannot take: the config's file and section, and where it came from */
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64,4 --out '%s/bad'", config,
             trace_a, dir);
    run_kvsim_fails(args, "sweep.ini:", "[policy.", "(from kvsim sweep --budgets: 4)", NULL);
    assert_false(exists(scratch_path(dir, "bad", 0))); /* checked before anything is written */
    snprintf(args, sizeof args, "sweep '%s' --trace '%s' --budgets 64 --bogus 1", config, trace_a);
    run_kvsim_fails(args, "unknown option '--bogus'", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cells_equal_standalone_runs),
        cmocka_unit_test(test_many_budgets_equal_standalone_runs),
        cmocka_unit_test(test_unequal_caches_warn_per_budget),
        cmocka_unit_test(test_ta512_at_its_own_budget),
        cmocka_unit_test(test_identical_at_any_thread_count),
        cmocka_unit_test(test_resume_skips_finished_cells),
        cmocka_unit_test(test_shards_merge_to_the_unsharded_files),
        cmocka_unit_test(test_ratios_equal_standalone_runs),
        cmocka_unit_test(test_bad_flags_one_line_exit_2),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
