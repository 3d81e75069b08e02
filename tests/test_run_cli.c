/* `kvsim run` end to end through the built binary: the three CSVs, identical at 1 and 2
 * threads; every policy of configs/ta512.ini on a synthetic trace with needles, with the
 * properties the comparison rests on; and one-line errors with exit status 2 for bad input. */
#include <cjson/cJSON.h>
#include <hdf5.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/base/sha256.h"
#include "sim/base/util.h"
#include "tests/support/fixture.h"
#include "tests/support/scratch.h"

static char *dir;
static char synth_trace[1024];
static char config_dir[1024];



static int setup(void **state)
{
    (void)state;
    dir = scratch_create();
    snprintf(synth_trace, sizeof synth_trace, "%s/t.h5", dir);
    const char *src = getenv("KVSIM_SOURCE_DIR");
    snprintf(config_dir, sizeof config_dir, "%s/configs", src ? src : ".");
    /* prompt >= 2048 and decode >= 256 with needles, kept small in width for speed */
    KvsimRun r = run_kvsim_ok("synth --out '%s' --seed 5 --layers 2 --q-heads 4 --kv-heads 2 "
                        "--head-dim 64 --prompt 2048 --decode 256 --needles 6", synth_trace);
    kvsim_run_free(&r);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    free(dir);
    return 0;
}

static void test_csvs_identical_at_one_and_two_threads(void **state)
{
    (void)state;
    KvsimRun r1 = run_kvsim_ok("run '%s/baselines.ini' --trace '%s' --out '%s/t1' --threads 1",
                         config_dir, synth_trace, dir);
    KvsimRun r2 = run_kvsim_ok("run '%s/baselines.ini' --trace '%s' --out '%s/t2' --threads 2 --quiet",
                         config_dir, synth_trace, dir);
    assert_non_null(strstr(r1.out, "window512"));
    assert_non_null(strstr(r1.out, "random512"));
    assert_string_equal(r2.out, ""); /* --quiet */
    const char *files[4] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv"};
    int expected_rows[4] = {6, 6 * 2, -1, 6}; /* one turn: a row per policy */
    for (int i = 0; i < 4; i++) {
        char p1[8400], p2[8400];
        snprintf(p1, sizeof p1, "%s/t1/%s", dir, files[i]);
        snprintf(p2, sizeof p2, "%s/t2/%s", dir, files[i]);
        char *a = scratch_read(p1), *b = scratch_read(p2);
        assert_string_equal(a, b);
        if (expected_rows[i] > 0)
            assert_int_equal(count_lines(a), 1 + expected_rows[i]);
        free(a);
        free(b);
    }
    /* run.json beside them: what differs between the two runs (threads, times) is there */
    char trace_hex[65];
    long long trace_size;
    KvErr err;
    assert_int_equal(sha256_file(synth_trace, trace_hex, &trace_size, &err), 0);
    for (int t = 1; t <= 2; t++) {
        char path[8400];
        snprintf(path, sizeof path, "%s/t%d/run.json", dir, t);
        char *text = scratch_read(path);
        cJSON *j = cJSON_Parse(text);
        assert_non_null(j);
        assert_true(cJSON_GetObjectItemCaseSensitive(j, "threads")->valuedouble == t);
        assert_true(cJSON_GetObjectItemCaseSensitive(j, "threads_used")->valuedouble == t);
        assert_true(cJSON_GetObjectItemCaseSensitive(j, "seed")->valuedouble == 0);
        const cJSON *cmd = cJSON_GetObjectItemCaseSensitive(j, "command");
        assert_string_equal(cJSON_GetArrayItem(cmd, 1)->valuestring, "run");
        const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(j, "config");
        assert_non_null(strstr(cJSON_GetObjectItemCaseSensitive(cfg, "text")->valuestring,
                               "[policy.window512]"));
        const cJSON *in = cJSON_GetObjectItemCaseSensitive(j, "inputs");
        assert_int_equal(cJSON_GetArraySize(in), 1);
        const cJSON *tr = cJSON_GetArrayItem(in, 0);
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(tr, "role")->valuestring, "trace");
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(tr, "path")->valuestring,
                            synth_trace);
        assert_true(cJSON_GetObjectItemCaseSensitive(tr, "bytes")->valuedouble == trace_size);
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(tr, "sha256")->valuestring,
                            trace_hex);
        assert_non_null(cJSON_GetObjectItemCaseSensitive(j, "started"));
        assert_non_null(cJSON_GetObjectItemCaseSensitive(j, "finished"));
        cJSON_Delete(j);
        free(text);
    }
    /* no temporary files left behind: the four CSVs and run.json */
    char t1[8400];
    snprintf(t1, sizeof t1, "%s/t1", dir);
    assert_int_equal(scratch_count(t1), 5);
    kvsim_run_free(&r1);
    kvsim_run_free(&r2);
}

typedef struct {
    char policy[64];
    double mass, needle;
    bool oracle;
} Row;

/* Field `col` (0-based) of a CSV line without quoted fields (the labels here need none); an
 * empty field is "" (the field does not apply). */
static void field_of(const char *line, int col, char *out, size_t cap)
{
    for (int i = 0; i < col; i++) {
        line = strchr(line, ',');
        assert_non_null(line);
        line++;
    }
    size_t k = strcspn(line, ",");
    assert_true(k < cap);
    memcpy(out, line, k);
    out[k] = '\0';
}

static int read_summary(const char *path, Row *rows, int max)
{
    char *text = scratch_read(path);
    char *save = NULL;
    char *line = strtok_r(text, "\n", &save); /* header */
    assert_non_null(strstr(line, "needle_survival_min"));
    /* no column compares a policy with the others of its run: results depend on it alone */
    assert_null(strstr(line, "oracle"));
    int n = 0;
    while ((line = strtok_r(NULL, "\n", &save)) && n < max) {
        char type[64], field[64];
        field_of(line, 0, rows[n].policy, sizeof rows[n].policy);
        field_of(line, 1, type, sizeof type);
        rows[n].oracle = !strncmp(type, "oracle", 6);
        field_of(line, 2, field, sizeof field);
        rows[n].mass = atof(field);
        /* needle_survival_mean is the 24th column */
        field_of(line, 23, field, sizeof field);
        assert_string_not_equal(field, ""); /* the trace has needles and probes */
        rows[n].needle = atof(field);
        n++;
    }
    free(text);
    return n;
}

static void test_ta512_every_policy_and_the_bounds(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("run '%s/ta512.ini' --trace '%s' --out '%s/ta' --quiet", config_dir,
                        synth_trace, dir);
    kvsim_run_free(&r);
    char path[8400];
    snprintf(path, sizeof path, "%s/ta/summary.csv", dir);
    Row rows[32];
    int n = read_summary(path, rows, 32);
    assert_int_equal(n, 13); /* one row per policy of the config */
    double best_other = 0, best_needle = 0, lowest = INFINITY, second = INFINITY;
    int random_row = -1;
    for (int i = 0; i < n; i++) {
        if (!strcmp(rows[i].policy, "random"))
            random_row = i;
        if (!strcmp(rows[i].policy, "full")) {
            assert_float_equal(rows[i].mass, 1.0, 1e-6);
            assert_float_equal(rows[i].needle, 1.0, 0);
            continue;
        }
        if (rows[i].oracle)
            continue;
        if (rows[i].mass > best_other)
            best_other = rows[i].mass;
        if (rows[i].needle > best_needle)
            best_needle = rows[i].needle;
        if (rows[i].mass < lowest) {
            second = lowest;
            lowest = rows[i].mass;
        } else if (rows[i].mass < second) {
            second = rows[i].mass;
        }
    }
    assert_true(random_row >= 0);
    /* random is the worst, or next to it */
    assert_true(rows[random_row].mass <= second);
    for (int i = 0; i < n; i++) {
        if (!rows[i].oracle)
            continue;
        /* the oracles retain at least as much attention as every non-oracle policy */
        if (rows[i].mass < best_other)
            fail_msg("%s mass %.4f below a non-oracle policy's %.4f", rows[i].policy,
                     rows[i].mass, best_other);
        /* oracle_topk keeps every needle at every probe (its probe query points at them);
         * oracle_future maximises mass, not needles: it gives up a needle token once its
         * remaining attention is smaller than a newer token's (docs/policies.md), yet it keeps
         * more needles than any eviction policy that cannot see the future */
        if (!strcmp(rows[i].policy, "oracle_topk"))
            assert_float_equal(rows[i].needle, 1.0, 0);
        else
            assert_true(rows[i].needle >= best_needle && rows[i].needle >= 0.9);
    }
}

/* Policies left at their defaults hold different budgets (h2o 512, hybrid 1024, decay 8192):
 * without a [run] budget the run compares every policy but full and warns in one line naming
 * the smallest and the largest mean cache; a config whose policies all hold the same (two
 * windows of 512 and full) gets no warning. */
static void test_run_warns_for_policies_at_their_defaults(void **state)
{
    (void)state;
    char ini[2][8400];
    snprintf(ini[0], sizeof ini[0], "%s/defaults.ini", dir);
    scratch_write(ini[0], "[policy.full]\ntype = full\n[policy.h2o]\ntype = h2o\n"
                          "[policy.hybrid]\ntype = hybrid\n[policy.decay]\ntype = decay\n");
    snprintf(ini[1], sizeof ini[1], "%s/same.ini", dir);
    scratch_write(ini[1], "[policy.full]\ntype = full\n[policy.a]\ntype = window\n"
                          "[policy.b]\ntype = window\nsinks = 0\nwindow = 512\n");
    KvsimRun r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/d0' --quiet", ini[0], synth_trace,
                              dir);
    assert_int_equal(count_lines(r.err), 1);
    assert_non_null(strstr(r.err, "kvsim run: warning: at their own budgets (no [run] budget) "
                                  "the policies' mean caches are more than 5% apart: h2o holds "
                                  "512.0 tokens per KV head, decay "));
    kvsim_run_free(&r);
    r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/d1' --quiet", ini[1], synth_trace, dir);
    assert_string_equal(r.err, "");
    kvsim_run_free(&r);
}

/* [run] budget = 256: every policy type without a budget of its own holds about 256 tokens per
 * KV head (summary.csv's cache_tokens_mean), trig a little more between its prunes (up to its
 * prune period, 64 at this budget), which the run reports in one warning line; a policy with its
 * own budget and full keep theirs. [run] ratio = 0.125 of the trace's 2048-token prompt is the
 * same budget: the same CSVs, byte for byte. */
static void test_run_budget_every_policy(void **state)
{
    (void)state;
    static const char *const types[] = {"window", "decay", "abit", "hybrid", "offload", "trig",
                                        "h2o", "snapkv", "tova", "random", "oracle_topk",
                                        "oracle_future"};
    enum { N_TYPES = sizeof types / sizeof types[0] };
    char text[4096], ini[2][8400];
    for (int c = 0; c < 2; c++) {
        snprintf(text, sizeof text, "[run]\n%s\n[policy.full]\ntype = full\n",
                 c ? "ratio = 0.125" : "budget = 256");
        for (int i = 0; i < N_TYPES; i++)
            snprintf(text + strlen(text), sizeof text - strlen(text),
                     "[policy.%s]\ntype = %s\n", types[i], types[i]);
        strcat(text, "[policy.own]\ntype = h2o\nbudget = 100\n");
        snprintf(ini[c], sizeof ini[c], "%s/budget%d.ini", dir, c);
        scratch_write(ini[c], text);
    }
    KvsimRun r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/b0' --quiet", ini[0], synth_trace,
                              dir);
    /* trig's mean cache is more than 5% above the others': one warning line naming it */
    assert_int_equal(count_lines(r.err), 1);
    assert_non_null(strstr(r.err, "kvsim run: warning: at budget 256 the policies' mean caches "
                                  "are more than 5% apart"));
    assert_non_null(strstr(r.err, ", trig "));
    kvsim_run_free(&r);
    char path[8400];
    snprintf(path, sizeof path, "%s/b0/summary.csv", dir);
    char *csv = scratch_read(path);
    char *save = NULL, *line = strtok_r(csv, "\n", &save);
    char field[64];
    field_of(line, 10, field, sizeof field);
    assert_string_equal(field, "cache_tokens_mean");
    int n = 0;
    while ((line = strtok_r(NULL, "\n", &save))) {
        char label[64];
        field_of(line, 0, label, sizeof label);
        field_of(line, 10, field, sizeof field);
        double tokens = atof(field);
        if (!strcmp(label, "full"))
            assert_true(tokens > 2048); /* every token */
        else if (!strcmp(label, "own"))
            assert_float_equal(tokens, 100, 1e-9);
        else if (!strcmp(label, "trig"))
            assert_true(tokens >= 256 && tokens < 256 + 64);
        else if (!(tokens > 0.95 * 256 && tokens <= 256)) /* abit: up to its budget */
            fail_msg("%s: %.3f tokens per KV head at budget 256", label, tokens);
        n++;
    }
    assert_int_equal(n, 1 + N_TYPES + 1);
    free(csv);
    r = run_kvsim_ok("run '%s' --trace '%s' --out '%s/b1' --quiet", ini[1], synth_trace, dir);
    kvsim_run_free(&r);
    static const char *const files[] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv"};
    for (int i = 0; i < 4; i++) {
        char p0[8400], p1[8400];
        snprintf(p0, sizeof p0, "%s/b0/%s", dir, files[i]);
        snprintf(p1, sizeof p1, "%s/b1/%s", dir, files[i]);
        char *a = scratch_read(p0), *b = scratch_read(p1);
        assert_string_equal(a, b);
        free(a);
        free(b);
    }
    /* a ratio too small for the trace: one line at the ratio's line, with the budget it gave */
    scratch_write(ini[1], "[run]\nratio = 0.001\n[policy.w]\ntype = window\n");
    char args[20000];
    snprintf(args, sizeof args, "run '%s' --trace '%s' --out '%s/b2'", ini[1], synth_trace, dir);
    run_kvsim_fails(args, "budget1.ini:2: [policy.w] window = -2", "ratio = 0.001: budget 2 of the "
              "2048-token prompt of", NULL);
}

static void test_bad_input_one_line_exit_2(void **state)
{
    (void)state;
    char ini[1100], args[8400];
    snprintf(ini, sizeof ini, "%s/bad.ini", dir);
    FILE *f = fopen(ini, "w");
    fputs("[run]\nthreads = 1\n[policy.a]\ntype = window\nwindow = lots\n", f);
    fclose(f);
    snprintf(args, sizeof args, "run '%s' --trace '%s'", ini, synth_trace);
    run_kvsim_fails(args, "bad.ini:5:", "window = 'lots'", "expected an integer", NULL);

    snprintf(args, sizeof args, "run '%s/baselines.ini' --trace '%s/missing.h5'", config_dir, dir);
    run_kvsim_fails(args, "missing.h5", NULL);

    /* a trace with one dataset removed */
    char broken[1100];
    snprintf(broken, sizeof broken, "%s/broken.h5", dir);
    snprintf(args, sizeof args, "cp '%s' '%s'", synth_trace, broken);
    assert_int_equal(system(args), 0);
    hid_t h = H5Fopen(broken, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(h >= 0);
    assert_true(H5Ldelete(h, "/layers/001/k", H5P_DEFAULT) >= 0);
    H5Fclose(h);
    snprintf(args, sizeof args, "run '%s/baselines.ini' --trace '%s' --out '%s/x'", config_dir,
             broken, dir);
    run_kvsim_fails(args, "broken.h5", "/layers/001/k", NULL);

    snprintf(args, sizeof args, "run '%s/baselines.ini' --threads -3", config_dir);
    run_kvsim_fails(args, "--threads", NULL);
    run_kvsim_fails("run", "expected 1 argument", NULL);
    run_kvsim_fails("frobnicate", "unknown command", NULL);
}

/* An output directory that cannot be created is reported before the replay: on a trace whose
 * replay fails (its logits overflow float32), the error is about the directory. */
static void test_unusable_output_directory(void **state)
{
    (void)state;
    char file[1100], bad_trace[1100], args[8400];
    snprintf(file, sizeof file, "%s/plain-file", dir);
    FILE *f = fopen(file, "w");
    fputs("x\n", f);
    fclose(f);
    snprintf(bad_trace, sizeof bad_trace, "%s/overflow.h5", dir);
    Fixture *fx = fixture_new(4, 2, 16, 80, 48);
    fixture_randomize(fx, 3, 1.0);
    for (int d = 0; d < 16; d++)
        fx_q(fx, 1, 60)[d] = 3e38f;
    KvErr err;
    TraceWriter *w = trace_writer_create(bad_trace, &fx->meta, TRACE_F32, &err);
    assert_non_null(w);
    assert_int_equal(trace_writer_put_qkv(w, 0, 0, 80, fx->q, fx->k, fx->v, &err), 0);
    assert_int_equal(trace_writer_finish(w, &err), 0);
    fixture_free(fx);
    snprintf(args, sizeof args, "run '%s/baselines.ini' --trace '%s' --quiet", config_dir,
             bad_trace);
    run_kvsim_fails(args, "overflow.h5", "not finite", NULL); /* the replay does fail */
    snprintf(args, sizeof args, "run '%s/baselines.ini' --trace '%s' --out '%s/sub' --quiet",
             config_dir, bad_trace, file);
    run_kvsim_fails(args, "plain-file", NULL);
}

/* A run that cannot write every CSV (here the file size limit, as a full disk would) replaces
 * none of the previous run's files and leaves no temporary file. */
static void test_csvs_are_written_as_one_set(void **state)
{
    (void)state;
    char out[1100], args[8400];
    snprintf(out, sizeof out, "%s/set", dir);
    KvsimRun ok = run_kvsim_ok("run '%s/baselines.ini' --trace '%s' --out '%s' --quiet", config_dir,
                         synth_trace, out);
    kvsim_run_free(&ok);
    /* run.json describes the CSVs beside it: a run that fails to write them leaves it too */
    char *before[5];
    const char *names[5] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv", "run.json"};
    for (int i = 0; i < 5; i++)
        before[i] = scratch_read(scratch_path(out, names[i], 0));
    /* steps.csv is the large one: a limit above summary.csv's size and below steps.csv's */
    size_t limit_blocks = strlen(before[0]) / 512 + 2;
    assert_true(strlen(before[2]) > (limit_blocks + 2) * 1024);
    snprintf(args, sizeof args,
             "trap '' XFSZ; ulimit -f %zu; exec \"$KVSIM_BIN\" run '%s/tricache.ini' --trace '%s' "
             "--out '%s' --quiet",
             limit_blocks, config_dir, synth_trace, out);
    KvsimRun r = run_command(args);
    assert_int_equal(r.status, 2);
    assert_int_equal(count_lines(r.err), 1);
    assert_non_null(strstr(r.err, "steps.csv"));
    kvsim_run_free(&r);
    for (int i = 0; i < 5; i++) {
        char *now = scratch_read(scratch_path(out, names[i], 0));
        assert_string_equal(now, before[i]);
        free(now);
        free(before[i]);
    }
    assert_int_equal(scratch_count(out), 5); /* no temporary file left */
}

/* Field `col` of line `row` (0 = the header) of a CSV without quoted fields, into out. */
static void csv_cell(const char *csv, int row, int col, char *out, size_t n)
{
    const char *line = csv;
    for (int r = 0; r < row; r++) {
        line = strchr(line, '\n');
        assert_non_null(line);
        line++;
    }
    for (int c = 0; c < col; c++) {
        line += strcspn(line, ",\n");
        assert_int_equal(*line, ',');
        line++;
    }
    size_t len = strcspn(line, ",\n");
    assert_true(len < n);
    memcpy(out, line, len);
    out[len] = '\0';
}

/* A conversation written by `kvsim synth --decode-turns 3`, run in each history mode: turns.csv
 * has three rows per policy; the second and third turns' prefills compute the 32-token message
 * (persist), the whole history (reencode) or all but the 64-token system prompt (prefix); full's
 * attention metrics are the same in every mode. */
static void test_turns_of_a_conversation(void **state)
{
    (void)state;
    char trace[1100];
    snprintf(trace, sizeof trace, "%s/conv.h5", dir);
    KvsimRun syn = run_kvsim_ok("synth --out '%s' --seed 3 --layers 2 --q-heads 4 --kv-heads 2 "
                                "--head-dim 32 --prompt 256 --decode 48 --needles 2 --system 64 "
                                "--decode-turns 3 --message 32", trace);
    kvsim_run_free(&syn);
    static const char *const modes[] = {"persist", "reencode", "prefix"};
    char *turns[3];
    for (int m = 0; m < 3; m++) {
        char ini[1200], text[1600];
        snprintf(ini, sizeof ini, "%s/conv-%s.ini", dir, modes[m]);
        snprintf(text, sizeof text,
                 "[run]\nhistory = %s\nout = %s/conv-%s\n[policy.full]\ntype = full\n"
                 "[policy.w]\ntype = window\nwindow = 64\n", modes[m], dir, modes[m]);
        scratch_write(ini, text);
        KvsimRun r = run_kvsim_ok("run '%s' --trace '%s' --quiet", ini, trace);
        kvsim_run_free(&r);
        char path[1300];
        snprintf(path, sizeof path, "%s/conv-%s/turns.csv", dir, modes[m]);
        turns[m] = scratch_read(path);
        assert_int_equal(count_lines(turns[m]), 1 + 2 * 3);
    }
    enum { TURN = 1, CONTEXT = 3, PREFILL = 5, MASS = 12, RECALL = 13, OUT_ERR = 14 };
    char v[64], w[64];
    csv_cell(turns[0], 0, PREFILL, v, sizeof v);
    assert_string_equal(v, "prefill_tokens");
    csv_cell(turns[0], 0, MASS, v, sizeof v);
    assert_string_equal(v, "mass_mean");
    csv_cell(turns[0], 0, OUT_ERR, v, sizeof v);
    assert_string_equal(v, "out_err_mean");
    for (int row = 1; row <= 3; row++) { /* full's rows */
        csv_cell(turns[0], row, TURN, v, sizeof v);
        assert_int_equal(atoi(v), row - 1);
        csv_cell(turns[0], row, CONTEXT, v, sizeof v);
        int context = atoi(v);
        int want[3] = {row == 1 ? 256 : 32, row == 1 ? 256 : context,
                       row == 1 ? 256 : context - 64};
        for (int m = 0; m < 3; m++) {
            csv_cell(turns[m], row, PREFILL, v, sizeof v);
            if (atoi(v) != want[m])
                fail_msg("history = %s, turn %d: prefill_tokens %s, expected %d", modes[m],
                         row - 1, v, want[m]);
            for (int c = MASS; c <= OUT_ERR; c++) {
                csv_cell(turns[0], row, c, v, sizeof v);
                csv_cell(turns[m], row, c, w, sizeof w);
                assert_string_equal(v, w);
            }
        }
    }
    for (int m = 0; m < 3; m++)
        free(turns[m]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_csvs_identical_at_one_and_two_threads),
        cmocka_unit_test(test_ta512_every_policy_and_the_bounds),
        cmocka_unit_test(test_run_warns_for_policies_at_their_defaults),
        cmocka_unit_test(test_run_budget_every_policy),
        cmocka_unit_test(test_bad_input_one_line_exit_2),
        cmocka_unit_test(test_unusable_output_directory),
        cmocka_unit_test(test_csvs_are_written_as_one_set),
        cmocka_unit_test(test_turns_of_a_conversation),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
