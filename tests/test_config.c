/* The INI loader: a good config loads with its values, and every error path gives one line that
 * names the file and the line and says what was expected. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/config.h"
#include "tests/support/scratch.h"

static char *dir;

static int setup(void **state)
{
    (void)state;
    dir = scratch_create();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    scratch_remove(dir);
    return 0;
}

static const char *write_ini(const char *text)
{
    const char *path = scratch_path(dir, "c.ini", 0);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

/* Loads text; expects failure with a message that starts "PATH:LINE: " and contains `want`. */
static void expect_error(const char *text, int line, const char *want)
{
    const char *path = write_ini(text);
    RunConfig rc;
    KvErr err = {{0}};
    assert_int_equal(config_load(path, &rc, &err), -1);
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s:%d: ", path, line);
    if (strncmp(err.msg, prefix, strlen(prefix)) != 0 || !strstr(err.msg, want))
        fail_msg("expected '%s...%s', got '%s'", prefix, want, err.msg);
    assert_null(strchr(err.msg, '\n'));
}

static void test_good_config_loads(void **state)
{
    (void)state;
    const char *path = write_ini("; a comment\n"
                                 "[trace]\npath = traces/x.h5\n"
                                 "[run]\nthreads = 3 ; inline comment\ntopk = 8\neval_every = 4\n"
                                 "kv_bits = 8\nseed = 42\nout = results/here\n"
                                 "[policy.full]\ntype = full\n"
                                 "[policy.w100]\nwindow = 100\ntype = window\nsinks = 0\n");
    RunConfig rc;
    KvErr err;
    if (config_load(path, &rc, &err) != 0)
        fail_msg("%s", err.msg);
    assert_string_equal(rc.trace_path, "traces/x.h5");
    assert_string_equal(rc.out_dir, "results/here");
    assert_int_equal(rc.engine.threads, 3);
    assert_int_equal(rc.engine.topk, 8);
    assert_int_equal(rc.engine.eval_every, 4);
    assert_int_equal(rc.engine.kv_bits, 8);
    assert_int_equal(rc.engine.seed, 42);
    assert_int_equal(rc.engine.n_policies, 2);
    assert_string_equal(rc.engine.policies[1].label, "w100");
    assert_string_equal(rc.engine.policies[1].type->name, "window");
    /* a key given before type= is applied once the type is known; others keep defaults */
    const int *window_params = rc.engine.policies[1].params;
    assert_int_equal(window_params[0], 100);
    assert_int_equal(window_params[1], 0);
    config_free(&rc);
}

static void test_default_out_dir_from_config_name(void **state)
{
    (void)state;
    const char *path = write_ini("[policy.a]\ntype = full\n");
    RunConfig rc;
    KvErr err;
    assert_int_equal(config_load(path, &rc, &err), 0);
    assert_string_equal(rc.out_dir, "results/c");
    assert_int_equal(rc.engine.topk, 32);
    assert_int_equal(rc.engine.eval_every, 1);
    config_free(&rc);
}

static void test_errors_name_file_and_line(void **state)
{
    (void)state;
    expect_error("[trace]\npath = x\n[bogus]\nkey = 1\n", 3, "unknown section [bogus]");
    expect_error("[trace]\npath = x\n[empty_unknown]\n", 3, "unknown section [empty_unknown]");
    expect_error("[run]\nthreads = 2\ncolour = red\n", 3, "unknown key 'colour' in [run]");
    expect_error("[trace]\nfile = x\n", 2, "unknown key 'file' in [trace]");
    expect_error("[run]\nthreads = two\n", 2, "threads = 'two': expected an integer");
    expect_error("[run]\ntopk = 0\n", 2, "topk = '0': expected a positive integer");
    expect_error("[run]\neval_every = 1.5\n", 2, "eval_every = '1.5'");
    expect_error("[policy.a]\ntype = lru\n", 2, "unknown policy type 'lru' (known: full, window");
    expect_error("[policy.a]\ntype = window\nwindow = abc\n", 3, "window = 'abc': expected an integer");
    expect_error("[policy.a]\ntype = window\nsinks = -1\n", 3, "sinks = -1: expected an integer in [0,");
    expect_error("[policy.a]\nwindow = 5\nspeed = 3\ntype = window\n", 3, "unknown key 'speed' for policy type window");
    expect_error("[policy.a]\ntype = full\n[policy.a]\ntype = full\n", 3, "duplicate section [policy.a] (first at line 1)");
    expect_error("[trace]\npath = x\n[policy.nothing]\nwindow = 4\n", 3, "[policy.nothing] has no type=");
    expect_error("[policy.a]\ntype = full\ntype = window\n", 3, "type given twice");
    expect_error("[run]\nthis line has no equals sign\n", 2, "malformed line");
    expect_error("[trace]\npath = x.h5\n", 2, "no [policy.LABEL] section");
    expect_error("", 1, "no [policy.LABEL] section");
    expect_error("[policy.a]\ntype = window\nwindow = 100000000000\n", 3,
                 "expected an integer in [1, 1073741824]");
}

static void test_missing_file(void **state)
{
    (void)state;
    RunConfig rc;
    KvErr err;
    assert_int_equal(config_load("no/such/config.ini", &rc, &err), -1);
    assert_non_null(strstr(err.msg, "no/such/config.ini: cannot read config"));
}

/* Every shipped example loads: the configs are documentation, and documentation that does not
 * parse is wrong. */
static void test_shipped_configs_load(void **state)
{
    (void)state;
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    char dir_path[4096];
    snprintf(dir_path, sizeof dir_path, "%s/configs", src);
    DIR *d = opendir(dir_path);
    assert_non_null(d);
    int loaded = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".ini"))
            continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir_path, e->d_name);
        RunConfig rc;
        KvErr err;
        if (config_load(path, &rc, &err) != 0)
            fail_msg("%s", err.msg);
        assert_true(rc.engine.n_policies >= 2); /* a policy and the reference */
        config_free(&rc);
        loaded++;
    }
    closedir(d);
    assert_true(loaded >= 6);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_config_loads),
        cmocka_unit_test(test_default_out_dir_from_config_name),
        cmocka_unit_test(test_errors_name_file_and_line),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_shipped_configs_load),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
