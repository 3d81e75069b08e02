/* The INI loader: a good config loads with its values, and every error path gives one line that
 * names the file and the line and says what was expected. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "sim/replay/config.h"
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

/* Writes n bytes (NUL bytes and all) as the config. */
static const char *write_bytes(const char *data, size_t n)
{
    const char *path = scratch_path(dir, "c.ini", 0);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
    return path;
}

/* A committed input under tests/inputs/config/. */
static const char *input_path(const char *name)
{
    static char path[4096];
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    snprintf(path, sizeof path, "%s/tests/inputs/config/%s", src, name);
    return path;
}

/* An error message is one line of text: no control character at all. */
static void assert_one_line(const char *msg)
{
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            fail_msg("control byte 0x%02x in '%s'", *p, msg);
}

/* Loads the file; expects failure with a message that starts "PATH:LINE: " and contains
 * `want`. */
static void expect_file_error(const char *path, int line, const char *want)
{
    RunConfig rc;
    KvErr err = {{0}};
    int status = config_load(path, &rc, &err);
    if (status == 0)
        config_free(&rc);
    assert_int_equal(status, -1);
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s:%d: ", path, line);
    if (strncmp(err.msg, prefix, strlen(prefix)) != 0 || !strstr(err.msg, want))
        fail_msg("expected '%s...%s', got '%s'", prefix, want, err.msg);
    assert_one_line(err.msg);
}

/* Loads text; expects failure with a message that starts "PATH:LINE: " and contains `want`. */
static void expect_error(const char *text, int line, const char *want)
{
    expect_file_error(write_ini(text), line, want);
}

static void expect_bytes_error(const char *data, size_t n, int line, const char *want)
{
    expect_file_error(write_bytes(data, n), line, want);
}
/* A string literal that may hold NUL bytes, as (data, n). */
#define BYTES(literal) literal, sizeof(literal) - 1

static void expect_loads(const char *path, RunConfig *rc)
{
    KvErr err;
    if (config_load(path, rc, &err) != 0)
        fail_msg("%s", err.msg);
}

static void test_good_config_loads(void **state)
{
    (void)state;
    const char *path = write_ini("; a comment\n"
                                 "[trace]\npath = traces/x.h5\n"
                                 "[run]\nthreads = 3 ; inline comment\ntopk = 8\neval_every = 4\n"
                                 "kv_bits = 8\nseed = 42\nout = results/here\nprefill_chunk = 64\n"
                                 "history = reencode\n"
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
    assert_int_equal(rc.engine.prefill_chunk, 64);
    assert_int_equal(rc.prefill_chunk_line, 11);
    assert_int_equal(rc.engine.history, HISTORY_REENCODE);
    assert_true(rc.engine.prefill_tflops == 0); /* default: no prefill time */
    assert_int_equal(rc.engine.n_policies, 2);
    assert_string_equal(rc.engine.policies[1].label, "w100");
    assert_string_equal(rc.engine.policies[1].type->name, "window");
    /* a key given before type= is applied once the type is known; others keep defaults */
    const int *window_params = rc.engine.policies[1].params;
    assert_int_equal(window_params[0], 100);
    assert_int_equal(window_params[1], 0);
    config_free(&rc);

    path = write_ini("[run]\nhistory = prefix\nprefill_tflops = 312.5\n"
                     "[policy.full]\ntype = full\n");
    if (config_load(path, &rc, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(rc.engine.history, HISTORY_PREFIX);
    assert_true(rc.engine.prefill_tflops == 312.5);
    config_free(&rc);
}

/* kv_quant and its keys, on any policy type, before or after type=; bad values name the line. */
static void test_kv_quant_keys(void **state)
{
    (void)state;
    const char *path = write_ini("[trace]\npath = x\n"
                                 "[policy.a]\nkv_quant = kivi4\ntype = h2o\nkv_quant_residual = 64\n"
                                 "[policy.b]\ntype = window\nkv_quant = mlx8\nkv_quant_group = 16\n"
                                 "[policy.c]\ntype = full\n");
    RunConfig rc;
    expect_loads(path, &rc);
    assert_int_equal(rc.engine.policies[0].quant.kind, KVQ_KIVI4);
    assert_int_equal(rc.engine.policies[0].quant.residual, 64);
    assert_int_equal(rc.engine.policies[0].quant.group, 0);
    assert_int_equal(rc.engine.policies[1].quant.kind, KVQ_MLX8);
    assert_int_equal(rc.engine.policies[1].quant.group, 16);
    assert_int_equal(rc.engine.policies[2].quant.kind, KVQ_NONE);
    assert_int_equal(rc.engine.policies[2].quant.residual, KVQ_DEFAULT_RESIDUAL);
    config_free(&rc);
    expect_error("[policy.a]\ntype = full\nkv_quant = kivi3\n", 3,
                 "kv_quant = 'kivi3': expected one of none|kivi2|kivi4|mlx4|mlx8");
    expect_error("[policy.a]\ntype = full\nkv_quant_group = x\n", 3,
                 "kv_quant_group = 'x': expected an integer in [0, 1048576]");
    expect_error("[policy.a]\ntype = full\nkv_quant_residual = 0\n", 3,
                 "kv_quant_residual = '0': expected an integer in [1, 1048576]");
    expect_error("[policy.a]\ntype = full\nkv_quant = kivi2\nkv_quant_residual = 48\n", 1,
                 "kv_quant_residual = 48: expected a multiple of the group size 32");
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
    assert_int_equal(rc.engine.prefill_chunk, 0);
    assert_int_equal(rc.engine.history, HISTORY_PERSIST);
    assert_int_equal(config_check_closed_loop(&rc, &err), 0);
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
    expect_error("[run]\nprefill_chunk = -1\n", 2,
                 "prefill_chunk = '-1': expected a non-negative integer (0 = each prefill span");
    expect_error("[run]\nthreads = 1\nprefill_chunk = 64k\n", 3, "prefill_chunk = '64k'");
    expect_error("[run]\nprefill_chunk = 3000000000\n", 2, "prefill_chunk = '3000000000'");
    expect_error("[run]\nthreads = 1\nhistory = keep\n", 3,
                 "history = 'keep': expected persist, reencode or prefix");
    expect_error("[run]\nprefill_tflops = -1\n", 2,
                 "prefill_tflops = '-1': expected a finite number >= 0");
    expect_error("[run]\nprefill_tflops = nan\n", 2, "prefill_tflops = 'nan'");
    expect_error("[run]\nprefill_tflops = 1e400\n", 2, "prefill_tflops = '1e400'");
    expect_error("[run]\nprefill_tflops = 3 TF\n", 2, "prefill_tflops = '3 TF'");
    expect_error("[policy.a]\ntype = lru\n", 2, "unknown policy type 'lru' (known: full, window");
    expect_error("[policy.a]\ntype = window\nwindow = abc\n", 3, "window = 'abc': expected an integer");
    expect_error("[policy.a]\ntype = window\nsinks = -1\n", 3, "sinks = -1: expected an integer in [0,");
    expect_error("[policy.a]\nwindow = 5\nspeed = 3\ntype = window\n", 3, "unknown key 'speed' for policy type window");
    expect_error("[policy.a]\ntype = full\n[policy.a]\ntype = full\n", 3, "duplicate section [policy.a] (first at line 1)");
    expect_error("[trace]\npath = x\n[policy.nothing]\nwindow = 4\n", 3, "[policy.nothing] has no type=");
    expect_error("[policy.a]\ntype = full\ntype = window\n", 3,
                 "key 'type' given twice in [policy.a] (first at line 2)");
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
    assert_string_equal(err.msg, "no/such/config.ini: cannot read: No such file or directory");
}

/* A UTF-8 byte-order mark is skipped and does not shift the line numbers. It used to hide the
 * first section header from the line tracking, so that the section was recorded at line 0, an
 * error at line 0 counted as none, and validation was skipped: a section without type= loaded
 * (kvsim run and eval then crashed), so did parameter combinations validate() rejects. */
static void test_byte_order_mark(void **state)
{
    (void)state;
    RunConfig rc;
    expect_loads(input_path("bom_ok.ini"), &rc);
    assert_int_equal(rc.engine.n_policies, 1);
    assert_string_equal(rc.engine.policies[0].label, "a");
    config_free(&rc);
    expect_file_error(input_path("bom_no_type.ini"), 1, "[policy.a] has no type=");
    expect_file_error(input_path("bom_hybrid.ini"), 3,
                      "[policy.h] budget = 2: expected at least 3");
    expect_file_error(input_path("bom_decay.ini"), 1,
                      "[policy.d] decay: local = 8 must be below budget = 8");
    /* errors on the first line are errors too */
    expect_bytes_error(BYTES("\xEF\xBB\xBF[bogus]\n"), 1, "unknown section [bogus]");
    expect_bytes_error(BYTES("\xEF\xBB\xBF[policy.a]\ntype = nosuch\n"), 2,
                       "unknown policy type 'nosuch'");
    /* only at the very start: elsewhere it is not white space */
    expect_bytes_error(BYTES("[policy.a]\n\xEF\xBB\xBFtype = full\n"), 2,
                       "byte-order mark at column 1 (expected one only at the start of the file)");
    expect_bytes_error(BYTES("\xEF\xBB\xBF\xEF\xBB\xBF[policy.a]\n"), 1, "byte-order mark at column 1");
}

/* The section without type crashed `kvsim run`; it is now exit status 2 and one line. */
static void test_byte_order_mark_cli(void **state)
{
    (void)state;
    char args[8192];
    snprintf(args, sizeof args,
             "synth --out '%s' --layers 1 --q-heads 2 --kv-heads 1 --head-dim 8 --prompt 32 "
             "--decode 4 --needles 1 --system 4 --turns 1 --attn-rows 0",
             scratch_path(dir, "t.h5", 1));
    KvsimRun r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    const char *inputs[] = {"bom_no_type.ini", "bom_hybrid.ini", "bom_decay.ini"};
    const int lines[] = {1, 3, 1};
    for (int i = 0; i < 3; i++) {
        snprintf(args, sizeof args, "run '%s' --trace '%s' --out '%s' --quiet",
                 input_path(inputs[i]), scratch_path(dir, "t.h5", 1), scratch_path(dir, "o", 2));
        r = run_kvsim(args);
        char want[4200];
        snprintf(want, sizeof want, "kvsim: %s:%d: [policy.", input_path(inputs[i]), lines[i]);
        if (r.status != 2 || strncmp(r.err, want, strlen(want)) || count_lines(r.err) != 1)
            fail_msg("%s: status %d, stderr '%s'", inputs[i], r.status, r.err);
        kvsim_run_free(&r);
    }
}

/* A NUL byte ends a line for inih and hid the rest of the line from the line-length check: the
 * old reader then read "seed = 7", written after the NUL past its buffer, as a line and
 * applied it. Every NUL byte is an error now, at its line. */
static void test_nul_byte(void **state)
{
    (void)state;
    expect_file_error(input_path("nul_in_comment.ini"), 4, "NUL byte at column 4 (expected text)");
    expect_bytes_error(BYTES("[policy.a]\ntype = full\0window\n"), 2, "NUL byte at column 12");
    expect_bytes_error(BYTES("\0"), 1, "NUL byte at column 1");
}

/* Other bytes that are not text: they would end up raw in a message, a label or a CSV. */
static void test_not_text(void **state)
{
    (void)state;
    expect_error("[policy.a\x1b[31m]\ntype = full\n", 1,
                 "control character U+001B at column 10 (expected text)");
    expect_error("[policy.a]\rtype = full\n", 1, "control character U+000D at column 11");
    expect_error("[policy.a]\ntype = full\n; \x7f\n", 3, "control character U+007F at column 3");
    expect_error("[policy.caf\xe9]\ntype = full\n", 1, "invalid UTF-8 at column 12 (expected UTF-8 text)");
    expect_error("[policy.a]\n; overlong \xc0\xaf\n", 2, "invalid UTF-8 at column 12");
    expect_error("[policy.a]\n; surrogate \xed\xa0\x80\n", 2, "invalid UTF-8 at column 13");
    expect_error("[policy.a]\n; cut \xe2\x82\n", 2, "invalid UTF-8 at column 7");
    expect_error("[policy.a]\n; C1 \xc2\x85\n", 2, "control character U+0085");
    /* what is text loads: UTF-8 labels, tabs, CRLF line ends, no final newline */
    RunConfig rc;
    expect_loads(write_ini("[policy.caf\xc3\xa9]\r\n\ttype\t=\tfull\t; tabs\r\n[policy.b]\ntype = full"), &rc);
    assert_int_equal(rc.engine.n_policies, 2);
    assert_string_equal(rc.engine.policies[0].label, "caf\xc3\xa9");
    assert_string_equal(rc.engine.policies[1].type->name, "full");
    config_free(&rc);
}

/* Labels: inih cuts a section name to 49 characters, so labels of 43 to 63 characters used to
 * be cut in the outputs and two of them could collide; a label longer than the old reader's
 * buffer sent its keys to the section before. */
static void test_long_labels(void **state)
{
    (void)state;
    RunConfig rc;
    expect_loads(input_path("long_labels.ini"), &rc);
    assert_int_equal(rc.engine.n_policies, 2);
    char want[64];
    memset(want, 'a', 59);
    strcpy(want + 59, "1");
    assert_string_equal(rc.engine.policies[0].label, want);
    want[59] = '2';
    assert_string_equal(rc.engine.policies[1].label, want);
    assert_string_equal(rc.engine.policies[1].type->name, "window");
    config_free(&rc);
    expect_file_error(input_path("label_too_long.ini"), 3,
                      "expected a label of 1 to 63 characters without leading or trailing spaces "
                      "(this one has 130)");
    char text[256];
    snprintf(text, sizeof text, "[policy.%0*d]\ntype = full\n", 64, 0);
    expect_error(text, 1, "(this one has 64)");
    snprintf(text, sizeof text, "[policy.%0*d]\ntype = full\n", 63, 0);
    expect_loads(write_ini(text), &rc);
    assert_int_equal(strlen(rc.engine.policies[0].label), 63);
    config_free(&rc);
    expect_error("[policy.]\ntype = full\n", 1, "[policy.]: expected a label of 1 to 63 characters");
    expect_error("[policy. a]\ntype = full\n", 1, "without leading or trailing spaces (this one has 2)");
    expect_error("[policy.a\t]\ntype = full\n", 1, "[policy.a\\t]: expected a label");
    /* equal labels are one label, however long */
    snprintf(text, sizeof text, "[policy.%0*d]\ntype = full\n[policy.%0*d]\ntype = full\n", 60, 7,
             60, 7);
    expect_error(text, 3, "duplicate section [policy.000");
}

/* A directory or a FIFO is refused at once (opening the FIFO used to block forever). */
static void test_not_a_regular_file(void **state)
{
    (void)state;
    alarm(20); /* a hang is a failure */
    const char *d = scratch_path(dir, "d.ini", 1);
    assert_int_equal(mkdir(d, 0700), 0);
    RunConfig rc;
    KvErr err;
    assert_int_equal(config_load(d, &rc, &err), -1);
    char want[4200];
    snprintf(want, sizeof want, "%s: not a regular file", d);
    assert_string_equal(err.msg, want);
    rmdir(d);
    const char *fifo = scratch_path(dir, "f.ini", 1);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_int_equal(config_load(fifo, &rc, &err), -1);
    snprintf(want, sizeof want, "%s: not a regular file", fifo);
    assert_string_equal(err.msg, want);
    unlink(fifo);
    alarm(0);
}

/* Lines that inih would split, merge, skip or take otherwise than they read. */
static void test_malformed_lines(void **state)
{
    (void)state;
    /* a line too long for inih's buffer is reported at its own line, even when the rest of it
     * looks like a section header */
    char text[600];
    snprintf(text, sizeof text, "[policy.a]\ntype = full\n; %0*d[policy.b]\n[run]\n", 196, 0);
    expect_error(text, 3, "line too long: 208 bytes (at most 197)");
    snprintf(text, sizeof text, "[policy.a]\ntype = full\n; %0*d\n", 195, 0);
    RunConfig rc;
    expect_loads(write_ini(text), &rc); /* 197 bytes */
    config_free(&rc);
    /* the first error in the file is the one reported, whoever finds it */
    expect_error("[run]\nnot a key line\nthreads = x\n", 2, "malformed line");
    expect_error("[policy.a]\ntype = full\n[policy.a", 3, "malformed section header (expected [NAME])");
    expect_error("[policy.a ; comment]\ntype = full\n", 1, "malformed section header");
    expect_error("[policy.a]\ntype = fu", 2, "unknown policy type 'fu'");
    expect_error("[policy.a]\n= full\n", 2, "no key before '=' (expected key = value)");
    expect_error("[policy.a]\n: full\n", 2, "no key before ':'");
    expect_error("[policy.a]\ntype = full\n  indented = 1\n", 3, "unknown key 'indented' for policy type full");
    /* text after a section header was silently dropped */
    expect_error("[run] threads = 4\n[policy.a]\ntype = full\n", 1,
                 "text after the section header (expected a ; comment or nothing)");
    expect_error("[policy.a]]\ntype = full\n", 1, "text after the section header");
    expect_loads(write_ini("[run] ; comment\nthreads = 4\n[policy.a]# comment\ntype = full\n"), &rc);
    assert_int_equal(rc.engine.threads, 4);
    config_free(&rc);
    /* a key before any section */
    expect_error("threads = 2\n[policy.a]\ntype = full\n", 1,
                 "key 'threads' before any section (expected [trace], [run] or [policy.LABEL] first)");
    expect_error("[]\n", 1, "unknown section [] (expected [trace], [run] or [policy.LABEL])");
    expect_error("[ run ]\n", 1, "unknown section [ run ]");
    expect_error("[policy.a]\ntype = full\n[policy.b]\n", 3, "[policy.b] has no type=");
    /* a section is checked when it ends, before the sections after it */
    expect_error("[policy.a]\nwindow = 4\n[bogus]\n", 1, "[policy.a] has no type=");
    /* file content in a message is escaped */
    expect_error("[policy.a]\ntype = fu\tll\n", 2, "unknown policy type 'fu\\tll'");
}

/* A key or a section given twice used to be taken twice, the last value silently winning;
 * values that were taken otherwise than they read. */
static void test_duplicates_and_values(void **state)
{
    (void)state;
    expect_error("[run]\nthreads = 2\nthreads = 4\n[policy.a]\ntype = full\n", 3,
                 "key 'threads' given twice in [run] (first at line 2)");
    expect_error("[trace]\npath = a.h5\npath = b.h5\n", 3,
                 "key 'path' given twice in [trace] (first at line 2)");
    expect_error("[policy.a]\nwindow = 4\ntype = window\nwindow = 8\n", 4,
                 "key 'window' given twice in [policy.a] (first at line 2)");
    expect_error("[run]\nthreads = 2\n[policy.a]\ntype = full\n[run]\nseed = 1\n", 5,
                 "duplicate section [run] (first at line 1)");
    expect_error("[trace]\npath = a.h5\n[trace]\n", 3, "duplicate section [trace] (first at line 1)");
    /* keys before type= wait for it: their number is bounded */
    char text[8192] = "[policy.a]\n";
    for (int i = 0; i < 65; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "k%d = 1\n", i);
    expect_error(text, 66, "too many keys in [policy.a] (at most 64)");
    /* '#' starts a comment only at the start of a line: after a value it was part of it */
    expect_error("[run]\nout = results/x # note\n", 2,
                 "'out': a '#' after a space in the value (a comment after a value starts with ' ;')");
    expect_error("[policy.a]\ntype = full\t# note\n", 2, "'type': a '#' after a space");
    RunConfig rc;
    expect_loads(write_ini("[run]\nout = results/#1 ; ok\n[policy.a]\ntype = full\n"), &rc);
    assert_string_equal(rc.out_dir, "results/#1");
    config_free(&rc);
    /* an empty value is not a path */
    expect_error("[run]\nout =\n", 2, "out is empty (expected a directory)");
    expect_error("[trace]\npath = ; none\n", 2, "path is empty (expected a trace file)");
}

/* The int parameter `key` of a loaded policy. */
static int param_of(const PolicySpec *spec, const char *key)
{
    for (const ParamSpec *p = spec->type->params; p && p->key; p++)
        if (!strcmp(p->key, key))
            return *(const int *)((const char *)spec->params + p->offset);
    fail_msg("%s has no parameter %s", spec->type->name, key);
    return 0;
}

/* [run] budget: every policy whose section does not set its own budget gets the sweep's
 * parameters for it (docs/config.md); a parameter the section sets stays. */
static void test_run_budget(void **state)
{
    (void)state;
    static const char text[] =
        "[run]\nbudget = 256\n"                              /* line 2 */
        "[policy.full]\ntype = full\n"                       /* 0 */
        "[policy.window]\ntype = window\n"                   /* 1: sinks 4 by default */
        "[policy.w0]\ntype = window\nsinks = 0\n"            /* 2 */
        "[policy.wown]\ntype = window\nwindow = 100\n"       /* 3: its own */
        "[policy.decay]\ntype = decay\n"                     /* 4 */
        "[policy.decay32]\ntype = decay\nlocal = 32\n"       /* 5 */
        "[policy.abit]\ntype = abit\n"                       /* 6 */
        "[policy.trig]\ntype = trig\n"                       /* 7 */
        "[policy.h2o]\ntype = h2o\n"                         /* 8 */
        "[policy.h2o_own]\ntype = h2o\nbudget = 100\n"       /* 9: its own */
        "[policy.snapkv]\ntype = snapkv\n"                   /* 10 */
        "[policy.oracle]\ntype = oracle_topk\n";             /* 11 */
    RunConfig rc;
    expect_loads(write_ini(text), &rc);
    const PolicySpec *p = rc.engine.policies;
    assert_int_equal(rc.budget, 256);
    assert_int_equal(rc.budget_line, 2);
    static const bool budgeted[12] = {false, true, true, false, true, true,
                                      true,  true, true, false, true, true};
    for (int i = 0; i < 12; i++)
        assert_int_equal(config_policy_budgeted(&rc, i), budgeted[i]);
    assert_int_equal(param_of(&p[1], "window"), 252);
    assert_int_equal(param_of(&p[1], "sinks"), 4);
    assert_int_equal(param_of(&p[2], "window"), 256);
    assert_int_equal(param_of(&p[3], "window"), 100);
    assert_int_equal(param_of(&p[4], "budget"), 256);
    assert_int_equal(param_of(&p[4], "local"), 64);
    assert_int_equal(param_of(&p[5], "budget"), 256);
    assert_int_equal(param_of(&p[5], "local"), 32);
    assert_int_equal(param_of(&p[6], "budget"), 256);
    assert_int_equal(param_of(&p[6], "local"), 64);
    assert_int_equal(param_of(&p[6], "span"), 64);
    assert_int_equal(param_of(&p[6], "max_split"), 32);
    assert_int_equal(param_of(&p[7], "budget"), 256);
    assert_int_equal(param_of(&p[7], "divide_length"), 64);
    assert_int_equal(param_of(&p[7], "protect_recent"), 64);
    assert_int_equal(param_of(&p[8], "budget"), 256);
    assert_int_equal(param_of(&p[9], "budget"), 100);
    assert_int_equal(param_of(&p[10], "budget"), 256);
    assert_int_equal(param_of(&p[11], "budget"), 256);
    config_free(&rc);
    /* trig's prune period stops growing at 128 */
    expect_loads(write_ini("[run]\nbudget = 1024\n[policy.t]\ntype = trig\n"), &rc);
    assert_int_equal(param_of(&rc.engine.policies[0], "divide_length"), 128);
    assert_int_equal(param_of(&rc.engine.policies[0], "protect_recent"), 128);
    config_free(&rc);
    /* without budget or ratio nothing changes */
    expect_loads(write_ini("[policy.h]\ntype = h2o\n"), &rc);
    assert_false(config_policy_budgeted(&rc, 0));
    assert_int_equal(param_of(&rc.engine.policies[0], "budget"), 512);
    config_free(&rc);

    expect_error("[run]\nbudget = 0\n", 2, "budget = '0': expected a positive integer");
    expect_error("[run]\nbudget = 2k\n", 2, "budget = '2k'");
    expect_error("[run]\nratio = 0\n", 2, "ratio = '0': expected a number in (0, 1]");
    expect_error("[run]\nratio = 1.5\n", 2, "ratio = '1.5'");
    expect_error("[run]\nratio = nan\n", 2, "ratio = 'nan'");
    expect_error("[run]\nbudget = 64\nratio = 0.5\n", 3,
                 "ratio: [run] budget is given at line 2 (expected budget or ratio, not both)");
    expect_error("[run]\nratio = 0.5\nbudget = 64\n", 3,
                 "budget: [run] ratio is given at line 2 (expected budget or ratio, not both)");
    /* a budget a policy cannot take is reported at the budget's line, naming the policy */
    expect_error("[run]\nthreads = 1\nbudget = 4\n[policy.w]\ntype = window\n", 3,
                 "[policy.w] window = 0: expected an integer in [1,");
    expect_error("[run]\nthreads = 1\nbudget = 4\n[policy.w]\ntype = window\n", 3,
                 "(from [run] budget = 4)");
}

/* [run] ratio: the budget is floor(ratio x n_prompt), applied once the context is known, the
 * same parameters as that budget given directly. */
static void test_run_ratio(void **state)
{
    (void)state;
    RunConfig rc, rb;
    expect_loads(write_ini("[run]\nratio = 0.125\n[policy.full]\ntype = full\n"
                           "[policy.a]\ntype = abit\n[policy.w]\ntype = window\n"),
                 &rc);
    assert_true(rc.ratio == 0.125);
    assert_int_equal(rc.budget, 0);
    assert_true(config_policy_budgeted(&rc, 1));
    assert_int_equal(config_ratio_budget(&rc, 2048), 256);
    assert_int_equal(config_ratio_budget(&rc, 2055), 256); /* floor, as kvpress's int() */
    /* nothing is applied at load */
    assert_int_equal(param_of(&rc.engine.policies[2], "window"), 508);
    KvErr err;
    assert_int_equal(config_apply_budget(&rc, rc.engine.policies, 256, "a test", &err), 0);
    expect_loads(write_ini("[run]\nbudget = 256\n[policy.full]\ntype = full\n"
                           "[policy.a]\ntype = abit\n[policy.w]\ntype = window\n"),
                 &rb);
    for (int i = 0; i < 3; i++)
        assert_memory_equal(rc.engine.policies[i].params, rb.engine.policies[i].params,
                            rc.engine.policies[i].type->params_size);
    config_free(&rb);
    /* a ratio too small for the context: the message gives the budget and where it came from */
    assert_int_equal(config_apply_budget(&rc, rc.engine.policies, config_ratio_budget(&rc, 8),
                                         "the 8-token prompt of t.h5", &err),
                     -1);
    assert_non_null(strstr(err.msg, ":2: [policy.a] "));
    assert_non_null(strstr(err.msg, "(from [run] ratio = 0.125: budget 1 of the 8-token prompt of "
                                    "t.h5)"));
    config_free(&rc);
}

/* Runs kvsim with args and expects exit status 2 and one line on stderr that starts with
 * "kvsim: want_prefix" and contains every string of `parts` (NULL-terminated). */
static void expect_cli_error(const char *args, const char *want_prefix, const char *const *parts)
{
    KvsimRun r = run_kvsim(args);
    char want[4200];
    snprintf(want, sizeof want, "kvsim: %s", want_prefix);
    bool ok = r.status == 2 && !strncmp(r.err, want, strlen(want)) && count_lines(r.err) == 1;
    for (int i = 0; ok && parts[i]; i++)
        ok = strstr(r.err, parts[i]) != NULL;
    if (!ok)
        fail_msg("kvsim %s: status %d, stderr '%s'", args, r.status, r.err);
    kvsim_run_free(&r);
}

/* A trig calibration trace of another model's shape was reported by the policy during the
 * replay, without the config's file and line; it is now checked against the simulated model
 * (the run's trace, eval's checkpoint) before any work and reported at the calibration key. */
static void test_trig_calibration_shape(void **state)
{
    (void)state;
    char args[8192];
    const char *sim = scratch_path(dir, "sim.h5", 1), *cal = scratch_path(dir, "cal.h5", 2);
    snprintf(args, sizeof args,
             "synth --out '%s' --layers 2 --q-heads 4 --kv-heads 2 --head-dim 32 --prompt 64 "
             "--decode 8 --needles 1 --system 8 --turns 1 --attn-rows 0",
             sim);
    KvsimRun r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    snprintf(args, sizeof args,
             "synth --out '%s' --layers 1 --q-heads 4 --kv-heads 2 --head-dim 16 --prompt 64 "
             "--decode 8 --needles 1 --system 8 --turns 1 --attn-rows 0",
             cal);
    r = run_kvsim(args);
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    char text[8192];
    snprintf(text, sizeof text,
             "[policy.full]\ntype = full\n[policy.t]\ntype = trig\nbudget = 32\n"
             "divide_length = 8\nprotect_recent = 8\ncalibration = %s\n",
             cal);
    const char *config = write_ini(text);

    /* the check itself */
    RunConfig rc;
    expect_loads(config, &rc);
    KvErr err;
    assert_int_equal(config_check_model(&rc, "m", 1, 4, 16, ROPE_HALF, &err), 0);
    assert_int_equal(config_check_model(&rc, "m", 2, 4, 16, ROPE_HALF, &err), -1);
    char want[8192];
    snprintf(want, sizeof want,
             "%s:8: [policy.t] calibration = %s: a trace of 1 layers, 4 query heads, head_dim 16, "
             "rope_layout half; m has 2 layers, 4 query heads, head_dim 16, rope_layout half "
             "(expected a trace of the same model)",
             config, cal);
    assert_string_equal(err.msg, want);
    assert_int_equal(config_check_model(&rc, "m", 1, 2, 16, ROPE_HALF, &err), -1);
    assert_int_equal(config_check_model(&rc, "m", 1, 4, 32, ROPE_HALF, &err), -1);
    assert_int_equal(config_check_model(&rc, "m", 1, 4, 16, ROPE_INTERLEAVED, &err), -1);
    config_free(&rc);

    /* kvsim run: against the trace */
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s:8: [policy.t] calibration = ", config);
    snprintf(args, sizeof args, "run '%s' --trace '%s' --out '%s' --quiet", config, sim,
             scratch_path(dir, "o", 3));
    expect_cli_error(args, prefix,
                     (const char *const[]){"a trace of 1 layers, 4 query heads, head_dim 16",
                                           "has 2 layers, 4 query heads, head_dim 32",
                                           "(expected a trace of the same model)", NULL});
    /* kvsim eval: against the checkpoint (the committed model: 2 layers, 4 heads of 32) */
    const char *src = getenv("KVSIM_SOURCE_DIR");
    snprintf(args, sizeof args, "eval '%s' --model '%s/models/tiny-retrieval' --prompts '%s' --out '%s' --quiet",
             config, src, dir, scratch_path(dir, "o", 3));
    expect_cli_error(args, prefix,
                     (const char *const[]){"a trace of 1 layers, 4 query heads, head_dim 16",
                                           "models/tiny-retrieval has 2 layers, 4 query heads, "
                                           "head_dim 32",
                                           NULL});
    /* the same model passes */
    snprintf(text, sizeof text, "[policy.t]\ntype = trig\nbudget = 32\ndivide_length = 8\n"
             "protect_recent = 8\ncalibration = %s\n", sim);
    config = write_ini(text);
    expect_loads(config, &rc);
    assert_int_equal(config_check_model(&rc, "m", 2, 4, 32, ROPE_HALF, &err), 0);
    config_free(&rc);
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
        /* kvsim reuse's configs (a [reuse] section) are not run configs: test_reuse runs them */
        char *text = scratch_read(path);
        bool reuse_config = strstr(text, "\n[reuse]") != NULL || !strncmp(text, "[reuse]", 7);
        free(text);
        if (reuse_config)
            continue;
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
        cmocka_unit_test(test_kv_quant_keys),
        cmocka_unit_test(test_default_out_dir_from_config_name),
        cmocka_unit_test(test_errors_name_file_and_line),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_byte_order_mark),
        cmocka_unit_test(test_byte_order_mark_cli),
        cmocka_unit_test(test_nul_byte),
        cmocka_unit_test(test_not_text),
        cmocka_unit_test(test_long_labels),
        cmocka_unit_test(test_not_a_regular_file),
        cmocka_unit_test(test_malformed_lines),
        cmocka_unit_test(test_duplicates_and_values),
        cmocka_unit_test(test_run_budget),
        cmocka_unit_test(test_run_ratio),
        cmocka_unit_test(test_trig_calibration_shape),
        cmocka_unit_test(test_shipped_configs_load),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
