/* kvsim synth / info / check through the built binary: exit codes, messages, and that check
 * catches one corrupted stored probability. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <hdf5.h>

#include "tests/support/scratch.h"

#define SMALL "--layers 2 --q-heads 4 --kv-heads 2 --head-dim 16 --prompt 200 --decode 48 " \
              "--needles 3 --system 16 --turns 2 --attn-rows 16"

static void synth_cli(const char *path, const char *extra)
{
    char args[1024];
    snprintf(args, sizeof args, "synth --out '%s' " SMALL " %s", path, extra);
    KvsimRun r = run_kvsim(args);
    if (r.status != 0)
        fail_msg("kvsim %s: exit %d: %s", args, r.status, r.err);
    kvsim_run_free(&r);
}

static KvsimRun check_cli(const char *path, const char *extra)
{
    char args[1024];
    snprintf(args, sizeof args, "check '%s' %s", path, extra);
    return run_kvsim(args);
}

static void test_check_passes_on_synthetic_traces(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *f32 = scratch_path(dir, "f32.h5", 0), *f16 = scratch_path(dir, "f16.h5", 1);
    synth_cli(f32, "--dtype f32");
    synth_cli(f16, "--dtype f16 --rope-layout interleaved");
    KvsimRun r = check_cli(f32, "");
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "2 layers x 4 heads x 4 rows"));
    assert_non_null(strstr(r.out, "tolerance 0.0001: ok"));
    kvsim_run_free(&r);
    r = check_cli(f16, "");
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "tolerance 0.002: ok"));
    kvsim_run_free(&r);
    /* The rows of a float16 trace are computed from the rounded Q and K, so they also pass the
     * float32 tolerance; and the difference is not zero, so an absurd tolerance fails. */
    r = check_cli(f16, "--tol 1e-4");
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    r = check_cli(f32, "--tol 0");
    assert_int_equal(r.status, 1);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* Adds `delta` to one stored probability: layer 1, head 3, row 2, key 5. */
static void corrupt_row(const char *path, float delta)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t ds = H5Dopen2(f, "/layers/001/attn_rows", H5P_DEFAULT);
    assert_true(ds >= 0);
    hsize_t start[3] = {3, 2, 5}, count[3] = {1, 1, 1};
    hid_t fs = H5Dget_space(ds), ms = H5Screate_simple(3, count, NULL);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    float value;
    assert_true(H5Dread(ds, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, &value) >= 0);
    value += delta;
    assert_true(H5Dwrite(ds, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, &value) >= 0);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(ds);
    H5Fclose(f);
}

static void test_check_fails_on_a_corrupted_row(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "c.h5", 0);
    synth_cli(path, "--dtype f16");
    corrupt_row(path, 0.01f);
    KvsimRun r = check_cli(path, "");
    assert_int_equal(r.status, 1);
    assert_non_null(strstr(r.out, "layer 1, head 3, row 2"));
    assert_non_null(strstr(r.out, "key 5"));
    assert_non_null(strstr(r.out, "FAILED"));
    kvsim_run_free(&r);
    /* A looser tolerance accepts it. */
    r = check_cli(path, "--tol 0.05");
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

static void assert_one_line_error(const KvsimRun *r, const char *needle)
{
    assert_int_equal(r->status, 2);
    assert_int_equal(count_lines(r->err), 1);
    if (!strstr(r->err, needle))
        fail_msg("stderr \"%s\" lacks \"%s\"", r->err, needle);
}

static void test_bad_input_exits_2_with_one_line(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *norows = scratch_path(dir, "norows.h5", 0), *text = scratch_path(dir, "t.txt", 1),
               *broken = scratch_path(dir, "broken.h5", 2), *missing = scratch_path(dir, "none.h5", 3);
    synth_cli(norows, "--attn-rows 0");
    KvsimRun r = check_cli(norows, "");
    assert_one_line_error(&r, "no attention rows");
    kvsim_run_free(&r);

    FILE *f = fopen(text, "w");
    fputs("hello\n", f);
    fclose(f);
    const char *cmds[2] = {"check", "info"};
    for (int c = 0; c < 2; c++) {
        char args[1024];
        snprintf(args, sizeof args, "%s '%s'", cmds[c], text);
        r = run_kvsim(args);
        assert_one_line_error(&r, "not an HDF5 file");
        kvsim_run_free(&r);
        snprintf(args, sizeof args, "%s '%s'", cmds[c], missing);
        r = run_kvsim(args);
        assert_one_line_error(&r, "cannot open");
        kvsim_run_free(&r);
    }

    synth_cli(broken, "");
    hid_t h = H5Fopen(broken, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(H5Ldelete(h, "/layers/001/v", H5P_DEFAULT) >= 0);
    H5Fclose(h);
    r = check_cli(broken, "");
    assert_one_line_error(&r, "dataset /layers/001/v: missing");
    kvsim_run_free(&r);

    r = check_cli(norows, "--tol banana");
    assert_one_line_error(&r, "--tol");
    kvsim_run_free(&r);
    r = run_kvsim("synth --layers 2");
    assert_one_line_error(&r, "--out");
    kvsim_run_free(&r);
    r = run_kvsim("synth --out x.h5 --kv-heads 3");
    assert_one_line_error(&r, "--kv-heads");
    kvsim_run_free(&r);
    r = run_kvsim("synth --out x.h5 --bogus 1");
    assert_one_line_error(&r, "--bogus");
    kvsim_run_free(&r);
    scratch_remove(dir);
}

static void test_info_lists_header_and_datasets(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "i.h5", 0);
    synth_cli(path, "--dtype f16 --seed 3");
    char args[1024];
    snprintf(args, sizeof args, "info '%s'", path);
    KvsimRun r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    const char *want[] = {
        "format         kvsim-trace 1", "n_tokens       248", "n_prompt       200",
        "qkv dtype      float16", "needles        3", "attn rows      4",
        "rope_layout    half", "--seed 3",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(r.out, want[i]))
            fail_msg("info output lacks \"%s\":\n%s", want[i], r.out);
    /* one aligned line per dataset: name, dtype, shape */
    const char *lines[] = {
        "/layers/001/k          float16  [2,248,16]", "/layers/000/q          float16  [4,248,16]",
        "/layers/000/attn_rows  float32  [4,4,248]", "/needles               int32    [3,2]",
        "/rope_inv_freq         float64  [8]",
    };
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++)
        if (!strstr(r.out, lines[i]))
            fail_msg("info output lacks \"%s\":\n%s", lines[i], r.out);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_passes_on_synthetic_traces),
        cmocka_unit_test(test_check_fails_on_a_corrupted_row),
        cmocka_unit_test(test_bad_input_exits_2_with_one_line),
        cmocka_unit_test(test_info_lists_header_and_datasets),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
