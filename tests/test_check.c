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
#include <sys/stat.h>
#include <unistd.h>

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

/* ---- Hostile and broken traces: one line, exit 2, never a crash, a hang or a wrong "ok" ---- */

static hid_t open_rw(const char *path)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    return f;
}

static void set_double_attr(const char *path, const char *name, double value)
{
    hid_t f = open_rw(path);
    assert_true(H5Adelete(f, name) >= 0);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(H5Awrite(a, H5T_NATIVE_DOUBLE, &value) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
    H5Fclose(f);
}

/* Sets every value of a float dataset of the trace to `value`. */
static void fill_dataset(const char *path, const char *name, float value)
{
    hid_t f = open_rw(path);
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    assert_true(ds >= 0);
    hid_t sp = H5Dget_space(ds);
    hssize_t n = H5Sget_simple_extent_npoints(sp);
    float *buf = malloc((size_t)n * sizeof *buf);
    for (hssize_t i = 0; i < n; i++)
        buf[i] = value;
    assert_true(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) >= 0);
    free(buf);
    H5Sclose(sp);
    H5Dclose(ds);
    H5Fclose(f);
}

/* Replaces a dataset by a chunked one of the given shape whose chunks were never written: what
 * a flipped byte in a dimension looks like to a reader (the file holds far less than that). */
static void replace_with_unwritten(hid_t f, const char *name, hid_t type, int rank,
                                   const hsize_t *dims)
{
    assert_true(H5Ldelete(f, name, H5P_DEFAULT) >= 0);
    hsize_t chunk[3] = {1, 1, 1};
    for (int i = 1; i < rank; i++)
        chunk[i] = dims[i] < 256 ? dims[i] : 256;
    hid_t sp = H5Screate_simple(rank, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, rank, chunk);
    hid_t ds = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(ds >= 0);
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(sp);
}

static void test_huge_dimensions_are_one_line_errors(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "huge.h5", 0);
    /* n_q_heads 2^30 with q and attn_rows of that many heads: 16 TB of float32 per layer that
     * the reader used to accept and `check` then tried to allocate (exit 3). */
    synth_cli(path, "--layers 1");
    hid_t f = open_rw(path);
    hid_t sp = H5Screate(H5S_SCALAR);
    H5Adelete(f, "n_q_heads");
    hid_t a = H5Acreate2(f, "n_q_heads", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    int heads = 1 << 30;
    assert_true(H5Awrite(a, H5T_NATIVE_INT, &heads) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
    const hsize_t q_dims[3] = {(hsize_t)heads, 248, 16}, row_dims[3] = {(hsize_t)heads, 4, 248};
    replace_with_unwritten(f, "/layers/000/q", H5T_IEEE_F32LE, 3, q_dims);
    replace_with_unwritten(f, "/layers/000/attn_rows", H5T_IEEE_F32LE, 3, row_dims);
    H5Fclose(f);
    KvsimRun r = check_cli(path, "");
    assert_one_line_error(&r, "dataset /layers/000/q: shape [1073741824,248,16] of 4-byte values "
                              "holds more data than the file's");
    kvsim_run_free(&r);

    /* 2^26 probes, never written: read as 67M probes at position 0 before. */
    synth_cli(path, "");
    f = open_rw(path);
    const hsize_t probe_dims[1] = {(hsize_t)1 << 26};
    replace_with_unwritten(f, "/probes", H5T_STD_I32LE, 1, probe_dims);
    H5Fclose(f);
    r = check_cli(path, "");
    assert_one_line_error(&r, "dataset /probes: shape [67108864] of 4-byte values holds more "
                              "data than the file's");
    kvsim_run_free(&r);

    /* A count beyond int: 2^40 needle spans (8 TB to allocate, exit 3 before). */
    synth_cli(path, "");
    f = open_rw(path);
    const hsize_t needle_dims[2] = {(hsize_t)1 << 40, 2};
    replace_with_unwritten(f, "/needles", H5T_STD_I32LE, 2, needle_dims);
    H5Fclose(f);
    r = check_cli(path, "");
    assert_one_line_error(&r, "dataset /needles: dimension 0 is 1099511627776, expected at most");
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* A finite double that is infinite as a float32 (attn_scale), and Q/K whose dot products
 * overflow float32: `check` said "max diff 0 ... ok" because NaN differences were ignored. */
static void test_overflowing_values_are_not_ok(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "big.h5", 0);
    synth_cli(path, "--dtype f32");
    set_double_attr(path, "attn_scale", 1e300);
    KvsimRun r = check_cli(path, "");
    assert_one_line_error(&r, "attribute attn_scale: expected a finite value > 0 within float32 "
                              "range");
    assert_non_null(strstr(r.err, "found 1e+300"));
    kvsim_run_free(&r);
    char args[1024];
    snprintf(args, sizeof args, "info '%s'", path);
    r = run_kvsim(args);
    assert_one_line_error(&r, "attribute attn_scale");
    kvsim_run_free(&r);

    synth_cli(path, "--dtype f32");
    fill_dataset(path, "/layers/001/q", 1e20f);
    fill_dataset(path, "/layers/001/k", 1e20f);
    r = check_cli(path, "");
    assert_one_line_error(&r, "layer 1, head 0, row 0");
    assert_non_null(strstr(r.err, "not a finite float32"));
    assert_null(strstr(r.out, "ok"));
    kvsim_run_free(&r);
    scratch_remove(dir);
}

static void set_string_attr(const char *path, const char *name, const char *value)
{
    hid_t f = open_rw(path);
    H5Adelete(f, name);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, strlen(value) + 1);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(H5Awrite(a, type, value) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(type);
    H5Fclose(f);
}

/* Strings from the file are escaped wherever they are echoed: messages stay one line, and
 * `info` prints one line per field. */
static void test_file_strings_stay_on_one_line(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "s.h5", 0);
    synth_cli(path, "");
    set_string_attr(path, "rope_layout", "half\nkvsim: all good\r");
    KvsimRun r = check_cli(path, "");
    assert_one_line_error(&r, "attribute rope_layout: expected half or interleaved, found "
                              "\"half\\nkvsim: all good\\x0d\"");
    kvsim_run_free(&r);

    synth_cli(path, "");
    set_string_attr(path, "format", "kvsim-trace\n");
    r = check_cli(path, "");
    assert_one_line_error(&r, "attribute format: expected \"kvsim-trace\", found \"kvsim-trace\\n\"");
    kvsim_run_free(&r);

    synth_cli(path, "");
    set_string_attr(path, "model", "m\nformat         kvsim-trace 2");
    /* and the largest segment a trace may hold: 2^31 segments, not a signed overflow */
    hid_t f = open_rw(path);
    hid_t ds = H5Dopen2(f, "/segments", H5P_DEFAULT);
    hsize_t last = 247, one = 1;
    hid_t fs = H5Dget_space(ds), ms = H5Screate_simple(1, &one, NULL);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, &last, NULL, &one, NULL);
    int32_t top = 2147483647;
    assert_true(H5Dwrite(ds, H5T_NATIVE_INT32, ms, fs, H5P_DEFAULT, &top) >= 0);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(ds);
    H5Fclose(f);
    char args[1024];
    snprintf(args, sizeof args, "info '%s'", path);
    r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "model          m\\nformat         kvsim-trace 2\n"));
    assert_null(strstr(r.out, "\nformat         kvsim-trace 2"));
    assert_non_null(strstr(r.out, "segments       2147483648 (segment 0: system prompt)"));
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* Inputs that would block for ever: a FIFO as the trace, and a dataset whose values are
 * "stored" in a FIFO (HDF5 external storage). Refused at once (the timeout only bounds the test
 * should that regress). */
static void test_fifos_are_refused_without_hanging(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *fifo = scratch_path(dir, "fifo", 0), *path = scratch_path(dir, "ext.h5", 1);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    const char *cmds[2] = {"check", "info"};
    char args[1024];
    for (int c = 0; c < 2; c++) {
        snprintf(args, sizeof args, "timeout 20 '%s' %s '%s'", getenv("KVSIM_BIN"), cmds[c], fifo);
        KvsimRun r = run_command(args);
        assert_one_line_error(&r, "fifo: not a regular file");
        kvsim_run_free(&r);
    }

    synth_cli(path, "");
    hid_t f = open_rw(path);
    int32_t probes[2] = {199, 215};
    hsize_t dims[1] = {2};
    assert_true(H5Ldelete(f, "/probes", H5P_DEFAULT) >= 0);
    hid_t sp = H5Screate_simple(1, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    assert_true(H5Pset_external(dcpl, fifo, 0, sizeof probes) >= 0);
    hid_t ds = H5Dcreate2(f, "/probes", H5T_NATIVE_INT32, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(ds >= 0);
    (void)probes; /* never written: writing would block on the FIFO */
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(sp);
    H5Fclose(f);
    for (int c = 0; c < 2; c++) {
        snprintf(args, sizeof args, "timeout 20 '%s' %s '%s'", getenv("KVSIM_BIN"), cmds[c], path);
        KvsimRun r = run_command(args);
        assert_one_line_error(&r, "dataset /probes: expected its values in the file, found "
                                  "external storage");
        kvsim_run_free(&r);
    }
    scratch_remove(dir);
}

/* A flipped byte anywhere in the root group's object header (its attributes): with the
 * checksummed format the writer uses, an error ("incorrect metadata checksum", mostly); HDF5
 * 1.10 parsing the unchecksummed one used to copy past its buffers (heap-buffer-overflow,
 * segfault) or take the damaged value. */
static void test_damaged_metadata_fails_its_checksum(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "ok.h5", 0), *bad = scratch_path(dir, "bad.h5", 1);
    synth_cli(path, "");
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    static unsigned char bytes[1 << 20];
    size_t n = fread(bytes, 1, sizeof bytes, fp);
    fclose(fp);
    size_t at = 0;
    while (at + 11 < n && memcmp(bytes + at, "kvsim-trace", 11) != 0)
        at++;
    assert_true(at + 11 < n && at >= 96);
    char supp[4096];
    snprintf(supp, sizeof supp, "%s/tests/inputs/trace/hdf5-leaks.supp",
             getenv("KVSIM_SOURCE_DIR"));
    int checksums = 0, runs = 0;
    for (size_t off = at - 96; off < at + 12; off += 6, runs++) {
        bytes[off] ^= 0xff;
        fp = fopen(bad, "wb");
        assert_int_equal(fwrite(bytes, 1, n, fp), n);
        fclose(fp);
        bytes[off] ^= 0xff;
        char cmd[8192];
        snprintf(cmd, sizeof cmd, "LSAN_OPTIONS=suppressions='%s':print_suppressions=0 '%s' check '%s'", supp,
                 getenv("KVSIM_BIN"), bad);
        KvsimRun r = run_command(cmd);
        if (r.status != 2 || count_lines(r.err) != 1 || !strstr(r.err, "bad.h5: "))
            fail_msg("byte %zu flipped: status %d, stderr: %s", off, r.status, r.err);
        checksums += strstr(r.err, "checksum") != NULL;
        kvsim_run_free(&r);
    }
    assert_true(checksums >= runs / 2);
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
        "format         kvsim-trace version 2", "n_tokens       248", "n_prompt       200",
        "spans          2: prefill [0,200) decode [200,248)\n", "window         global (every layer)",
        "hidden_size    unknown", "intermediate   unknown", "vocab_size     unknown",
        "n_params       unknown", "qkv dtype      float16", "needles        3",
        "attn rows      4", "rope_layout    half", "--seed 3",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(r.out, want[i]))
            fail_msg("info output lacks \"%s\":\n%s", want[i], r.out);
    /* one aligned line per dataset: name, dtype, shape */
    const char *lines[] = {
        "/layers/001/k          float16  [2,248,16]", "/layers/000/q          float16  [4,248,16]",
        "/layers/000/attn_rows  float32  [4,4,248]", "/needles               int32    [3,2]",
        "/rope_inv_freq         float64  [2,8]", "/window                int32    [2]",
        "/spans                 int32    [2,3]",
    };
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++)
        if (!strstr(r.out, lines[i]))
            fail_msg("info output lacks \"%s\":\n%s", lines[i], r.out);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* kvsim info on the committed version 1 trace: its version, one prefill span and one decode
 * run, global layers, unknown model size. */
static void test_info_reads_version1(void **state)
{
    (void)state;
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    char args[4200];
    snprintf(args, sizeof args, "info '%s/tests/inputs/trace/version1.h5'", src);
    KvsimRun r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    const char *want[] = {
        "format         kvsim-trace version 1\n", "n_prompt       96\n",
        "spans          2: prefill [0,96) decode [96,128)\n",
        "window         global (every layer)\n", "n_params       unknown\n",
        "/rope_inv_freq         float64  [8]\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(r.out, want[i]))
            fail_msg("info output lacks \"%s\":\n%s", want[i], r.out);
    kvsim_run_free(&r);
}

/* Overwrites /window of a trace. */
static void set_windows(const char *path, const int32_t *window, int n)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t ds = H5Dopen2(f, "/window", H5P_DEFAULT);
    assert_true(ds >= 0);
    hid_t sp = H5Dget_space(ds);
    assert_int_equal(H5Sget_simple_extent_npoints(sp), n);
    H5Sclose(sp);
    assert_true(H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, window) >= 0);
    H5Dclose(ds);
    H5Fclose(f);
}

/* A sliding-window synthetic trace (every layer but the last a window of 24 keys) and one of
 * several turns: info shows the windows and the spans; check recomputes each row over the
 * keys its layer's window lets the query attend, and passes; told that the windowed layer is
 * global, it fails (the stored rows are zero before the window). */
static void test_check_follows_the_window(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "w.h5", 0), *turns = scratch_path(dir, "turns.h5", 1);
    synth_cli(path, "--window 24 --global-every 2");
    synth_cli(turns, "--decode-turns 3 --message 10 --window 40");
    char args[1024];
    snprintf(args, sizeof args, "info '%s'", path);
    KvsimRun r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    if (!strstr(r.out, "window         layer 0 24, layer 1 global\n"))
        fail_msg("info output lacks the windows:\n%s", r.out);
    kvsim_run_free(&r);
    snprintf(args, sizeof args, "info '%s'", turns);
    r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    const char *spans = "spans          6: prefill [0,200) decode [200,216) prefill [216,226) "
                        "decode [226,242) prefill [242,252) decode [252,268)\n";
    if (!strstr(r.out, spans) || !strstr(r.out, "window         layers 0-1 40\n") ||
        !strstr(r.out, "n_tokens       268\n") || !strstr(r.out, "n_prompt       200\n"))
        fail_msg("info output lacks the spans or windows:\n%s", r.out);
    kvsim_run_free(&r);

    r = check_cli(path, "");
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "tolerance 0.0001: ok"));
    kvsim_run_free(&r);
    r = check_cli(turns, "");
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);

    const int32_t global[2] = {0, 0};
    set_windows(path, global, 2);
    r = check_cli(path, "");
    assert_int_equal(r.status, 1);
    assert_non_null(strstr(r.out, "at layer 0"));
    assert_non_null(strstr(r.out, "FAILED"));
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
        cmocka_unit_test(test_info_reads_version1),
        cmocka_unit_test(test_check_follows_the_window),
        cmocka_unit_test(test_huge_dimensions_are_one_line_errors),
        cmocka_unit_test(test_overflowing_values_are_not_ok),
        cmocka_unit_test(test_file_strings_stay_on_one_line),
        cmocka_unit_test(test_fifos_are_refused_without_hanging),
        cmocka_unit_test(test_damaged_metadata_fails_its_checksum),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
