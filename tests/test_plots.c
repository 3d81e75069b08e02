/* test_plots.c — the gnuplot scripts of analysis/ render a PNG from small CSVs shaped like
 * kvsim's outputs (several policies, an empty field where a value does not apply, a policy
 * label with an underscore) without a warning, and fail on a missing or wrong input; an empty
 * field is a missing point to gnuplot in every `using` form, and a policy without values has
 * no line; the sweep's concatenation step (analysis/concat_summaries.awk) produces exactly the
 * expected table, quoted labels included, and rejects inconsistent inputs. gnuplot (Debian
 * gnuplot-nox) is a declared dependency: without it every plot test fails saying so. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "sim/base/util.h"
#include "tests/support/scratch.h"

/* A PNG smaller than this is (nearly) blank: axes, legend and lines take far more. */
#define MIN_PNG_BYTES 5000

static const char *source_dir(void)
{
    const char *dir = getenv("KVSIM_SOURCE_DIR");
    if (!dir || !*dir)
        fail_msg("KVSIM_SOURCE_DIR is not set (run the tests through ctest)");
    return dir;
}

static void require_gnuplot(void)
{
    KvsimRun r = run_command("gnuplot --version");
    int ok = r.status == 0 && strstr(r.out, "gnuplot") != NULL;
    kvsim_run_free(&r);
    if (!ok)
        fail_msg("gnuplot is not installed or does not run: install the gnuplot-nox package "
                 "(apt-get install -y gnuplot-nox), a declared dependency of the plots");
}

/* Runs analysis/SCRIPT with in= and out= set; returns the exit status and gnuplot's stderr. */
static KvsimRun run_script(const char *script, const char *in, const char *out)
{
    require_gnuplot();
    static const char fmt[] = "gnuplot -e \"in='%s'; out='%s'\" '%s/analysis/%s'";
    size_t len = sizeof fmt + strlen(in) + strlen(out) + strlen(source_dir()) + strlen(script);
    char *cmd = kv_malloc(len);
    snprintf(cmd, len, fmt, in, out, source_dir(), script);
    KvsimRun r = run_command(cmd);
    free(cmd);
    return r;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The file is a PNG of width x height pixels and at least MIN_PNG_BYTES. */
static void assert_png(const char *path, uint32_t width, uint32_t height)
{
    struct stat st;
    if (stat(path, &st) != 0)
        fail_msg("%s was not written", path);
    if (st.st_size < MIN_PNG_BYTES)
        fail_msg("%s has %lld bytes, expected at least %d", path, (long long)st.st_size,
                 MIN_PNG_BYTES);
    unsigned char head[24];
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fread(head, 1, sizeof head, f), sizeof head);
    fclose(f);
    static const unsigned char signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    assert_memory_equal(head, signature, sizeof signature);
    assert_memory_equal(head + 12, "IHDR", 4); /* the first chunk: width, height */
    assert_int_equal(be32(head + 16), width);
    assert_int_equal(be32(head + 20), height);
}

/* Renders `script` on `csv` (written to the scratch directory as in.csv) and checks the PNG. */
static void render_ok(const char *script, const char *csv, uint32_t width, uint32_t height)
{
    char *dir = scratch_create();
    char in[8192], out[8192];
    snprintf(in, sizeof in, "%s", scratch_path(dir, "in.csv", 0));
    snprintf(out, sizeof out, "%s", scratch_path(dir, "out.png", 1));
    scratch_write(in, csv);
    KvsimRun r = run_script(script, in, out);
    if (r.status != 0 || r.err[0])
        fail_msg("%s: exit status %d, stderr: %s", script, r.status, r.err);
    assert_png(out, width, height);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* The script exits non-zero on `csv` (NULL: a file that does not exist), writes no PNG and
 * names the input in its message. */
static void render_fails(const char *script, const char *csv)
{
    char *dir = scratch_create();
    char in[8192], out[8192];
    snprintf(in, sizeof in, "%s", scratch_path(dir, "in.csv", 0));
    snprintf(out, sizeof out, "%s", scratch_path(dir, "out.png", 1));
    if (csv)
        scratch_write(in, csv);
    KvsimRun r = run_script(script, in, out);
    if (r.status == 0)
        fail_msg("%s on %s input: exit status 0, expected a failure", script,
                 csv ? "a wrong" : "a missing");
    if (!csv)
        assert_non_null(strstr(r.err, in));
    struct stat st;
    if (!csv && stat(out, &st) == 0)
        fail_msg("%s wrote %s from a missing input", script, out);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* FORMAT=pdf and FORMAT=svg: the same script writes a PDF (its size in inches at 100 pixels
 * per inch) or an SVG (its size in pixels); any other format is an error naming it. */
static void test_other_formats(void **state)
{
    (void)state;
    require_gnuplot();
    static const char *const formats[] = {"pdf", "svg", "bmp"};
    static const char csv[] = "policy,type,mass_mean,recall_mean,out_err_mean,needle_survival_mean,"
                              "cache_tokens_mean\n"
                              "full,full,1,1,0,1,2048\nwindow,window,0.7,0.5,0.3,0.5,512\n";
    for (int i = 0; i < 3; i++) {
        char *dir = scratch_create();
        char in[8192], out[8192], cmd[20000];
        snprintf(in, sizeof in, "%s", scratch_path(dir, "in.csv", 0));
        snprintf(out, sizeof out, "%s", scratch_path(dir, "out.plot", 1));
        scratch_write(in, csv);
        snprintf(cmd, sizeof cmd, "gnuplot -e \"in='%s'; out='%s'; format='%s'\" '%s/analysis/run_plot.gp'",
                 in, out, formats[i], source_dir());
        KvsimRun r = run_command(cmd);
        if (i == 2) {
            assert_int_not_equal(r.status, 0);
            assert_non_null(strstr(r.err, "format = 'bmp'"));
        } else {
            if (r.status != 0 || r.err[0])
                fail_msg("run_plot.gp as %s: exit status %d, stderr: %s", formats[i], r.status, r.err);
            char *text = scratch_read(out);
            if (i == 0)
                assert_memory_equal(text, "%PDF-", 5);
            else
                assert_non_null(strstr(text, "<svg"));
            if (i == 1)
                assert_non_null(strstr(text, "width=\"1280\"")); /* run_plot.gp's default size */
            free(text);
        }
        kvsim_run_free(&r);
        scratch_remove(dir);
    }
}

/* A sweep summary: three budgets, three policies (one label with an underscore), the
 * reference at zero output error (a log axis must skip it quietly) and one empty field. */
static const char SWEEP_CSV[] =
    "budget,policy,type,mass_mean,recall_mean,out_err_mean,needle_survival_mean,cache_tokens_mean\n"
    "64,full,full,1,1,0,1,300\n"
    "64,window,window,0.61,0.42,0.9,0,64\n"
    "64,oracle_topk,oracle_topk,0.83,0.97,0.31,0.25,64\n"
    "128,full,full,1,1,0,1,300\n"
    "128,window,window,0.7,0.5,0.62,,128\n"
    "128,oracle_topk,oracle_topk,0.9,0.99,0.17,0.5,128\n"
    "256,full,full,1,1,0,1,300\n"
    "256,window,window,0.82,0.61,0.35,0.375,256\n"
    "256,oracle_topk,oracle_topk,0.96,1,0.06,0.875,256\n";

static void test_vs_budget_scripts_render(void **state)
{
    (void)state;
    render_ok("mass_vs_budget.gp", SWEEP_CSV, 1280, 760);
    render_ok("recall_vs_budget.gp", SWEEP_CSV, 1280, 760);
    render_ok("error_vs_budget.gp", SWEEP_CSV, 1280, 760);
    render_ok("needle_vs_budget.gp", SWEEP_CSV, 1280, 760);
    render_ok("cache_vs_budget.gp", SWEEP_CSV, 1280, 760);
    /* The eval table: accuracy per budget with its Wilson interval (error bars), empty for a
     * policy that does not apply. */
    render_ok("accuracy_vs_budget.gp",
              "budget,policy,type,prompts,correct,accuracy,accuracy_lo,accuracy_hi\n"
              "64,full,full,4,4,1,0.51,1\n"
              "64,window,window,4,1,0.25,0.046,0.7\n64,oracle_future,oracle_future,4,,,,\n"
              "128,full,full,4,4,1,0.51,1\n128,window,window,4,2,0.5,0.15,0.85\n"
              "128,oracle_future,oracle_future,4,,,,\n",
              1280, 760);
    /* A trace without needles: survival is empty throughout, the plot says so instead of
     * failing. */
    render_ok("needle_vs_budget.gp",
              "budget,policy,type,needle_survival_mean\n64,full,full,\n64,window,window,\n"
              "128,full,full,\n128,window,window,\n",
              1280, 760);
}

static void test_memory_vs_step_renders(void **state)
{
    (void)state;
    char *csv = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&csv, &len);
    assert_non_null(f);
    fputs("policy,step,decode_index,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,"
          "device_bytes,allocated_bytes,host_bytes,fetched_tokens,needle_survival\n",
          f);
    static const char *const policies[] = {"full", "window", "oracle_topk"};
    for (int p = 0; p < 3; p++)
        for (int d = 0; d < 24; d++) {
            double tokens = p == 0 ? 100 + d : 64;
            double device = tokens * 4096, host = p == 1 ? 1024.0 * d : 0;
            fprintf(f, "%s,%d,%d,0.9,0.8,0.1,%g,%g,%g,%g,0,%s\n", policies[p], 100 + d, d,
                    tokens, device, device, host, d % 8 == 0 ? "0.5" : "");
        }
    fclose(f);
    render_ok("memory_vs_step.gp", csv, 1280, 960);
    free(csv);
}

static void test_mass_heatmap_renders(void **state)
{
    (void)state;
    render_ok("mass_heatmap.gp",
              "policy,layer,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,"
              "device_bytes_mean,host_bytes_mean,needle_survival_mean\n"
              "full,0,1,1,0,120,491520,0,1\nfull,1,1,1,0,120,491520,0,1\n"
              "full,2,1,1,0,120,491520,0,1\n"
              "window,0,0.9,0.7,0.2,64,262144,0,0.5\nwindow,1,0.55,0.4,0.6,64,262144,0,0\n"
              "window,2,0.7,0.5,0.4,64,262144,0,\n"
              "oracle_topk,0,0.97,1,0.05,64,262144,0,0.5\n"
              "oracle_topk,1,,0.9,0.1,64,262144,0,0.5\n"
              "oracle_topk,2,0.93,0.95,0.08,64,262144,0,1\n",
              1280, 760);
}

static void test_run_plot_renders(void **state)
{
    (void)state;
    render_ok("run_plot.gp",
              "policy,type,mass_mean,recall_mean,out_err_mean,needle_survival_mean,"
              "cache_tokens_mean\n"
              "full,full,1,1,0,1,2048\nwindow512,window,0.82,0.57,0.32,,512\n"
              "oracle_topk,oracle_topk,0.95,1,0.08,0.6,512\nrandom,random,0.63,0.52,0.68,0.45,480.5\n",
              1280, 760);
}

/* Concatenated turns.csv of three history modes (as `make conversation` writes it): three
 * turns, the prompt's turn without a decode step (empty head metrics), one policy label with an
 * underscore. */
static const char TURNS_CSV[] =
    "history,policy,turn,prefill_tokens,served_tokens,served_share,mass_mean\n"
    "persist,full,0,2055,0,0,\npersist,full,1,5,2063,0.9976,1\npersist,full,2,5,2076,0.9976,1\n"
    "persist,oracle_topk,0,2055,0,0,\npersist,oracle_topk,1,5,2063,0.9976,0.95\n"
    "persist,oracle_topk,2,5,2076,0.9976,0.96\n"
    "reencode,full,0,2055,0,0,\nreencode,full,1,2068,0,0,1\nreencode,full,2,2081,0,0,1\n"
    "reencode,oracle_topk,0,2055,0,0,\nreencode,oracle_topk,1,2068,0,0,0.95\n"
    "reencode,oracle_topk,2,2081,0,0,0.96\n"
    "prefix,full,0,2055,0,0,\nprefix,full,1,2067,1,0.0005,1\nprefix,full,2,2080,1,0.0005,1\n"
    "prefix,oracle_topk,0,2055,0,0,\nprefix,oracle_topk,1,2067,1,0.0005,0.95\n"
    "prefix,oracle_topk,2,2080,1,0.0005,0.96\n";

static void test_turns_renders(void **state)
{
    (void)state;
    render_ok("turns.gp", TURNS_CSV, 1280, 960);
    /* One mode alone (a single run's turns.csv led by its mode) is a plot too. */
    render_ok("turns.gp",
              "history,policy,turn,prefill_tokens,mass_mean\npersist,full,0,2055,1\n"
              "persist,full,1,5,1\npersist,window,0,2055,0.7\npersist,window,1,5,0.68\n",
              1280, 960);
    /* A turns.csv without the history column is not what the script draws. */
    render_fails("turns.gp", "policy,turn,prefill_tokens,mass_mean\nfull,0,2055,1\n"
                             "full,1,5,1\n");
}

static const char EVAL_TURNS_CSV[] =
    "policy,type,history,by,value,questions,correct,accuracy,agreement_with_full\n"
    "full,full,persist,turn,1,2,2,1,1\n"
    "full,full,persist,distance,0,2,2,1,1\n"
    "full,full,persist,distance,1,2,1,0.5,1\n"
    "window,window,persist,distance,0,2,2,1,1\n"
    "window,window,persist,distance,1,2,0,0,0.5\n"
    "future,oracle_future,persist,distance,0,2,,,\n"
    "full,full,reencode,distance,0,2,2,1,1\n"
    "full,full,reencode,distance,1,2,1,0.5,1\n"
    "window,window,reencode,distance,0,2,1,0.5,0.5\n"
    "window,window,reencode,distance,1,2,1,0.5,1\n";

static void test_survival_distance_renders(void **state)
{
    (void)state;
    render_ok("survival_distance.gp",
              "history,policy,turn,needle_survival_d0,needle_survival_d1,needle_survival_d2\n"
              "persist,full,0,1,,\npersist,full,1,1,1,\npersist,full,2,1,1,1\n"
              "persist,h2o,0,1,,\npersist,h2o,1,1,0.5,\npersist,h2o,2,1,0.25,0\n"
              "reencode,full,0,1,,\nreencode,full,1,1,1,\nreencode,full,2,1,1,1\n"
              "reencode,h2o,0,1,,\nreencode,h2o,1,1,0.4,\nreencode,h2o,2,0.9,0.3,0.2\n",
              1600, 700);
    /* A turns.csv without the history column, or without needle survival columns, is not what
     * the script draws. */
    render_fails("survival_distance.gp", "policy,turn,needle_survival_d0\nfull,0,1\n");
    render_fails("survival_distance.gp", "history,policy,turn,mass_mean\npersist,full,0,1\n");
}

static void test_reuse_renders(void **state)
{
    (void)state;
    render_ok("reuse.gp",
              "scope,policy,capacity_bytes,token_hit_rate\n"
              "none,none,268435456,0\nnone,none,1073741824,0\n"
              "prefix,lru,268435456,0.1\nprefix,lru,1073741824,0.3\n"
              "prefix,belady,268435456,0.2\nprefix,belady,1073741824,0.5\n"
              "conversation,lru,268435456,0.05\nconversation,lru,1073741824,0.2\n"
              "conversation,belady,268435456,0.1\nconversation,belady,1073741824,0.4\n",
              1400, 640);
    /* compressed conversation entries: a panel of their own */
    render_ok("reuse.gp",
              "scope,policy,capacity_bytes,token_hit_rate,compress_ratio\n"
              "none,none,268435456,0,1\nprefix,lru,268435456,0.1,1\nprefix,lru,1073741824,0.3,1\n"
              "conversation,lru,268435456,0.05,1\nconversation,lru,1073741824,0.2,1\n"
              "conversation,lru,268435456,0.2,0.25\nconversation,lru,1073741824,0.6,0.25\n",
              1400, 640);
    /* only the scope that caches nothing: nothing to draw */
    render_fails("reuse.gp", "scope,policy,capacity_bytes,token_hit_rate\nnone,none,1024,0\n");
    /* the TTFT CDF: quantiles per scope x policy x capacity (the largest drawn) */
    render_ok("reuse_ttft.gp",
              "scope,policy,capacity_bytes,compress_ratio,quantile,ttft_s\n"
              "none,none,1024,1,0,0.5\nnone,none,1024,1,0.5,2\nnone,none,1024,1,1,9\n"
              "prefix,lru,1024,1,0,0.01\nprefix,lru,1024,1,0.5,0.2\nprefix,lru,1024,1,1,3\n"
              "prefix,lru,512,1,0,0.02\nprefix,lru,512,1,1,5\n"
              "conversation,lru,1024,1,0,0.02\nconversation,lru,1024,1,1,4\n"
              "conversation,lru,1024,0.5,0,0.01\nconversation,lru,1024,0.5,1,2\n",
              1400, 640);
    render_fails("reuse_ttft.gp", "scope,policy,capacity_bytes,quantile,ttft_s\nnone,none,1024,0,1\n");
}

static void test_eval_distance_renders(void **state)
{
    (void)state;
    render_ok("eval_distance.gp", EVAL_TURNS_CSV, 1600, 700);
    /* Rows by turn only (no answer gave a fact's turn): nothing to draw. */
    render_fails("eval_distance.gp",
                 "policy,type,history,by,value,questions,correct,accuracy,agreement_with_full\n"
                 "full,full,persist,turn,1,2,2,1,1\n");
}

/* Runs a gnuplot script (text) that loads analysis/common.gp on `csv`; returns gnuplot's
 * stderr, where `print` writes. */
static char *common_gp_prints(const char *csv, const char *script)
{
    require_gnuplot();
    char *dir = scratch_create();
    char in[8192], out[8192], gp[8192];
    snprintf(in, sizeof in, "%s", scratch_path(dir, "in.csv", 0));
    snprintf(out, sizeof out, "%s", scratch_path(dir, "out.png", 1));
    snprintf(gp, sizeof gp, "%s", scratch_path(dir, "probe.gp", 2));
    scratch_write(in, csv);
    FILE *f = fopen(gp, "w");
    assert_non_null(f);
    fprintf(f, "in = '%s'; out = '%s'; script_dir = '%s/analysis'\n", in, out, source_dir());
    fprintf(f, "load script_dir . '/common.gp'\n%s\n", script);
    fclose(f);
    size_t len = strlen(gp) + 32;
    char *cmd = kv_malloc(len);
    snprintf(cmd, len, "gnuplot '%s'", gp);
    KvsimRun r = run_command(cmd);
    free(cmd);
    if (r.status != 0)
        fail_msg("gnuplot on common.gp: exit status %d, stderr: %s", r.status, r.err);
    char *printed = kv_strdup(r.err);
    kvsim_run_free(&r);
    scratch_remove(dir);
    return printed;
}

/* An eval table as kvsim writes it: oracle_future does not apply (empty fields), window has
 * no value at 128. */
static const char EMPTY_FIELDS_CSV[] = "budget,policy,type,prompts,correct,accuracy\n"
                                       "64,full,full,4,4,1\n"
                                       "64,window,window,4,1,0.25\n"
                                       "64,oracle_future,oracle_future,4,,\n"
                                       "128,full,full,4,4,1\n"
                                       "128,window,window,4,,\n"
                                       "128,oracle_future,oracle_future,4,,\n"
                                       "256,full,full,4,3,0.75\n"
                                       "256,window,window,4,2,0.5\n"
                                       "256,oracle_future,oracle_future,4,,\n";

static void test_empty_field_is_missing(void **state)
{
    (void)state;
    /* The values counted and the policies that get a line: oracle_future has none. */
    char *printed = common_gp_prints(EMPTY_FIELDS_CSV,
                                     "print value_count(\"accuracy\")\n"
                                     "print policies_with_values(\"accuracy\")\n"
                                     "print value_count(\"correct\")\n");
    assert_string_equal(printed, "5\nfull window \n5\n");
    free(printed);
    /* What gnuplot reads of window's rows, the column named and inside an expression (where
     * an empty field is NaN unless `set datafile missing NaN`): the two values, and no
     * undefined point ("u"), which would break the line at 128. */
    printed = common_gp_prints(EMPTY_FIELDS_CSV,
                               "set table $T\n"
                               "plot rows(\"window\") using \"budget\":\"accuracy\" with lines, "
                               "rows(\"window\") using \"budget\":(column(\"accuracy\") * 2) "
                               "with lines\n"
                               "unset table\n"
                               "print $T\n");
    static const char *const points[] = {" 64  0.25  i", " 256  0.5  i", " 64  0.5  i",
                                         " 256  1  i"};
    for (size_t i = 0; i < sizeof points / sizeof points[0]; i++)
        if (!strstr(printed, points[i]))
            fail_msg("gnuplot's table lacks the point \"%s\":\n%s", points[i], printed);
    if (strstr(printed, "  u\n") || strstr(printed, " 128 "))
        fail_msg("gnuplot read the empty field as a point:\n%s", printed);
    assert_non_null(strstr(printed, "Curve 0 of 2, 2 points"));
    assert_non_null(strstr(printed, "Curve 1 of 2, 2 points"));
    free(printed);
}

/* The error bars of accuracy_vs_budget.gp are the interval's columns, every policy's points
 * shifted apart around the budget (the middle one of three on it); the lines that coincide at
 * every budget within 0.2% are named as a group (offload's on hybrid's: 0.7005 against 0.7),
 * not those that differ at one (h2o at 128), nor a policy without values; more than two equal
 * are one group. */
static void test_intervals_and_coinciding_lines(void **state)
{
    (void)state;
    static const char csv[] = "budget,policy,type,accuracy,accuracy_lo,accuracy_hi\n"
                              "64,hybrid,hybrid,0.25,0.1,0.5\n64,offload,offload,0.25,0.1,0.5\n"
                              "64,h2o,h2o,0.25,0.1,0.5\n64,none,oracle_future,,,\n"
                              "64,none2,oracle_future,,,\n"
                              "128,hybrid,hybrid,0.5,0.3,0.7\n128,offload,offload,0.5,0.3,0.7\n"
                              "128,h2o,h2o,0.4,0.2,0.6\n128,none,oracle_future,,,\n"
                              "128,none2,oracle_future,,,\n"
                              "256,hybrid,hybrid,0.7,0.5,0.85\n256,offload,offload,0.7005,0.5,0.85\n"
                              "256,h2o,h2o,0.7,0.5,0.85\n256,none,oracle_future,,,\n"
                              "256,none2,oracle_future,,,\n";
    char *printed = common_gp_prints(csv, "print coinciding(\"accuracy\")\n"
                                          "print coinciding(\"type\")\n"
                                          "print coinciding(\"accuracy_lo\")\n"
                                          "print coinciding(\"budget\")\n");
    assert_string_equal(printed, "hybrid = offload\nnone = none2\nhybrid = offload\n"
                                 "hybrid = offload = h2o = none = none2\n");
    free(printed);
    printed = common_gp_prints(csv, "metric = 'accuracy'; metric_lo = 'accuracy_lo'; "
                                    "metric_hi = 'accuracy_hi'; metric_label = 'a'; "
                                    "plot_title = 't'; subtitle = 'model m, 4 prompts'\n"
                                    "set table $T\n"
                                    "load script_dir . '/vs_budget.gp'\n"
                                    "unset table\n"
                                    "print $T\n"
                                    "print GPVAL_TERM\n");
    /* three policies with values, 2^(-0.025), 1 and 2^(0.025) times the budget (rounded by the
     * table): hybrid at 126, offload at 128, h2o at 130 */
    if (!strstr(printed, "\n126  0.5  i") || !strstr(printed, "\n128  0.5  i") ||
        !strstr(printed, "\n130  0.4  i") || !strstr(printed, "Curve 2 of 3, 3 points"))
        fail_msg("the points are not shifted apart around 128:\n%s", printed);
    free(printed);
    printed = common_gp_prints(csv, "print titled('t')\nsubtitle = 'model m'\nprint titled('t')\n");
    assert_string_equal(printed, "t\nt\nmodel m\n");
    free(printed);
}

/* The multi-panel plots by turn distance name, panel by panel, the lines drawn on top of each
 * other: eval_distance (window and h2o coincide under persist, not under reencode; the by-turn
 * row and the other mode's rows do not count) and survival_distance (at the last turn only:
 * h2o and tova coincide under reencode, where an earlier turn differs). */
static void test_distance_plots_name_coinciding_lines(void **state)
{
    (void)state;
    static const char eval_csv[] =
        "policy,type,history,by,value,questions,correct,accuracy,agreement_with_full\n"
        "full,full,persist,distance,0,2,2,1,1\nfull,full,persist,distance,1,2,1,0.5,1\n"
        "window,window,persist,turn,1,2,0,0,1\n"
        "window,window,persist,distance,0,2,1,0.5,1\nwindow,window,persist,distance,1,2,0,0,1\n"
        "h2o,h2o,persist,turn,1,2,2,1,1\n"
        "h2o,h2o,persist,distance,0,2,1,0.5,1\nh2o,h2o,persist,distance,1,2,0,0,1\n"
        "full,full,reencode,distance,0,2,2,1,1\nfull,full,reencode,distance,1,2,1,0.5,1\n"
        "window,window,reencode,distance,0,2,1,0.5,1\nwindow,window,reencode,distance,1,2,0,0,1\n"
        "h2o,h2o,reencode,distance,0,2,2,1,1\nh2o,h2o,reencode,distance,1,2,0,0,1\n";
    char *printed = common_gp_prints(eval_csv, "load script_dir . '/eval_distance.gp'\nprint note\n");
    assert_string_equal(printed, "persist: window = h2o\n");
    free(printed);
    static const char turns_csv[] =
        "history,policy,turn,needle_survival_d0,needle_survival_d1\n"
        "persist,full,0,1,\npersist,full,1,1,1\npersist,h2o,0,1,\npersist,h2o,1,1,0.5\n"
        "persist,tova,0,1,\npersist,tova,1,0.8,0.5\n"
        "reencode,full,0,1,\nreencode,full,1,1,1\nreencode,h2o,0,0.9,\nreencode,h2o,1,1,0.4\n"
        "reencode,tova,0,0.5,\nreencode,tova,1,1,0.4\n";
    printed = common_gp_prints(turns_csv, "load script_dir . '/survival_distance.gp'\nprint note\n");
    assert_string_equal(printed, "reencode: h2o = tova\n");
    free(printed);
}

/* A dataset (kvsim run over many traces): dataset.csv with paired.csv beside it, and without. */
static void test_dataset_renders(void **state)
{
    (void)state;
    static const char dataset[] =
        "policy,type,metric,traces,mean,ci_lo,ci_hi\n"
        "full,full,mass_mean,3,1,1,1\nfull,full,cache_tokens_mean,3,600,590,610\n"
        "window,window,mass_mean,3,0.8,0.75,0.86\nwindow,window,cache_tokens_mean,3,64,64,64\n"
        "h2o,h2o,mass_mean,3,0.85,0.8,0.9\nh2o,h2o,cache_tokens_mean,3,64,64,64\n";
    static const char paired[] =
        "policy,reference,metric,traces,mean_diff,ci_lo,ci_hi\n"
        "window,full,mass_mean,3,-0.2,-0.25,-0.14\nwindow,full,cache_tokens_mean,3,-536,-546,-526\n"
        "h2o,full,mass_mean,3,-0.15,-0.2,-0.1\nh2o,full,cache_tokens_mean,3,-536,-546,-526\n";
    for (int with_paired = 0; with_paired < 2; with_paired++) {
        char *dir = scratch_create();
        char in[8192], out[8192];
        snprintf(in, sizeof in, "%s", scratch_path(dir, "dataset.csv", 0));
        snprintf(out, sizeof out, "%s", scratch_path(dir, "out.png", 1));
        scratch_write(in, dataset);
        if (with_paired)
            scratch_write(scratch_path(dir, "paired.csv", 2), paired);
        KvsimRun r = run_script("dataset.gp", in, out);
        if (r.status != 0 || r.err[0])
            fail_msg("dataset.gp: exit status %d, stderr: %s", r.status, r.err);
        assert_png(out, 1280, 900);
        kvsim_run_free(&r);
        scratch_remove(dir);
    }
}

static const char *const SCRIPTS[] = {"mass_vs_budget.gp",     "recall_vs_budget.gp",
                                      "error_vs_budget.gp",    "needle_vs_budget.gp",
                                      "accuracy_vs_budget.gp", "memory_vs_step.gp",
                                      "mass_heatmap.gp",       "run_plot.gp",
                                      "turns.gp",              "eval_distance.gp",
                                      "survival_distance.gp",  "reuse.gp",
                                      "reuse_ttft.gp",         "cache_vs_budget.gp",
                                      "dataset.gp"};

static void test_missing_input_fails(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof SCRIPTS / sizeof SCRIPTS[0]; i++)
        render_fails(SCRIPTS[i], NULL);
}

static void test_wrong_input_fails(void **state)
{
    (void)state;
    /* No policy column or no rows: nothing to draw, for every script. */
    for (size_t i = 0; i < sizeof SCRIPTS / sizeof SCRIPTS[0]; i++) {
        render_fails(SCRIPTS[i], "name,budget,mass_mean\nfull,64,1\n");
        render_fails(SCRIPTS[i], "");
    }
    /* One run's summary has no budget column: it is not a sweep. */
    render_fails("mass_vs_budget.gp", "policy,type,mass_mean\nfull,full,1\nwindow,window,0.8\n");
}

/* ---- analysis/concat_summaries.awk ---- */

/* Runs the concatenation on files a and b (preceded by budget=ba and budget=bb); returns
 * the status, stdout and stderr. */
static KvsimRun concat(const char *dir, const char *ba, const char *a, const char *bb,
                       const char *b)
{
    const char *path_a = scratch_path(dir, "a.csv", 0), *path_b = scratch_path(dir, "b.csv", 1);
    scratch_write(path_a, a);
    scratch_write(path_b, b);
    static const char fmt[] = "awk -f '%s/analysis/concat_summaries.awk' budget=%s '%s' budget=%s '%s'";
    size_t len = sizeof fmt + strlen(source_dir()) + strlen(ba) + strlen(path_a) + strlen(bb) +
                 strlen(path_b);
    char *cmd = kv_malloc(len);
    snprintf(cmd, len, fmt, source_dir(), ba, path_a, bb, path_b);
    KvsimRun r = run_command(cmd);
    free(cmd);
    return r;
}

static const char SUMMARY_64[] = "policy,type,mass_mean,needle_survival_mean\n"
                                 "full,full,1,1\n"
                                 "window,window,0.61,\n"
                                 "oracle_topk,oracle_topk,0.83,0.25\n";
static const char SUMMARY_128[] = "policy,type,mass_mean,needle_survival_mean\n"
                                  "full,full,1,1\n"
                                  "window,window,0.7,0.125\n"
                                  "oracle_topk,oracle_topk,0.9,0.5\n";

static void test_concat_exact_output(void **state)
{
    (void)state;
    char *dir = scratch_create();
    KvsimRun r = concat(dir, "64", SUMMARY_64, "128", SUMMARY_128);
    assert_int_equal(r.status, 0);
    assert_string_equal(r.err, "");
    assert_string_equal(r.out, "budget,policy,type,mass_mean,needle_survival_mean\n"
                               "64,full,full,1,1\n"
                               "64,window,window,0.61,\n"
                               "64,oracle_topk,oracle_topk,0.83,0.25\n"
                               "128,full,full,1,1\n"
                               "128,window,window,0.7,0.125\n"
                               "128,oracle_topk,oracle_topk,0.9,0.5\n");
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* A label quoted as kvsim quotes it (a comma, a doubled quote) is one field, carried as is. */
static void test_concat_quoted_label(void **state)
{
    (void)state;
    char *dir = scratch_create();
    KvsimRun r = concat(dir, "64", "policy,type,mass_mean\nfull,full,1\n\"a,\"\"b\",window,\n",
                        "128", "policy,type,mass_mean\nfull,full,1\n\"a,\"\"b\",window,0.5\n");
    assert_int_equal(r.status, 0);
    assert_string_equal(r.err, "");
    assert_string_equal(r.out, "budget,policy,type,mass_mean\n"
                               "64,full,full,1\n"
                               "64,\"a,\"\"b\",window,\n"
                               "128,full,full,1\n"
                               "128,\"a,\"\"b\",window,0.5\n");
    kvsim_run_free(&r);
    scratch_remove(dir);
}

/* The concatenation exits with status 1 and a message naming `culprit` ("a.csv" / "b.csv"). */
static void expect_concat_error(const char *ba, const char *a, const char *bb, const char *b,
                                const char *culprit)
{
    char *dir = scratch_create();
    KvsimRun r = concat(dir, ba, a, bb, b);
    if (r.status != 1 || !strstr(r.err, culprit) || count_lines(r.err) != 1)
        fail_msg("budgets %s, %s: status %d, stderr \"%s\"; expected status 1 and one line "
                 "naming %s",
                 ba, bb, r.status, r.err, culprit);
    kvsim_run_free(&r);
    scratch_remove(dir);
}

static void test_concat_rejects_inconsistent_input(void **state)
{
    (void)state;
    /* Different columns (a layers.csv among summaries). */
    expect_concat_error("64", SUMMARY_64, "128",
                        "policy,layer,mass_mean,recall_mean\nfull,0,1,1\n", "b.csv");
    /* The same budget twice. */
    expect_concat_error("64", SUMMARY_64, "64", SUMMARY_128, "b.csv");
    /* A budget that is not a positive integer. */
    expect_concat_error("64", SUMMARY_64, "12x", SUMMARY_128, "b.csv");
    expect_concat_error("0", SUMMARY_64, "128", SUMMARY_128, "a.csv");
    /* A header without rows, first or last. */
    expect_concat_error("64", "policy,type,mass_mean,needle_survival_mean\n", "128", SUMMARY_128,
                        "a.csv");
    expect_concat_error("64", SUMMARY_64, "128", "policy,type,mass_mean,needle_survival_mean\n",
                        "b.csv");
    /* An empty file, and a row with a missing field. */
    expect_concat_error("64", SUMMARY_64, "128", "", "b.csv");
    expect_concat_error("64", SUMMARY_64, "128",
                        "policy,type,mass_mean,needle_survival_mean\nfull,full,1\n", "b.csv:2");
    /* A comma inside quotes does not separate, one outside does. */
    expect_concat_error("64", SUMMARY_64, "128",
                        "policy,type,mass_mean,needle_survival_mean\n\"a,b\",window,1,1,1\n",
                        "b.csv:2");
    /* Not a summary at all. */
    expect_concat_error("64", "layer,mass\n0,1\n", "128", SUMMARY_128, "a.csv");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vs_budget_scripts_render),
        cmocka_unit_test(test_memory_vs_step_renders),
        cmocka_unit_test(test_mass_heatmap_renders),
        cmocka_unit_test(test_run_plot_renders),
        cmocka_unit_test(test_turns_renders),
        cmocka_unit_test(test_other_formats),
        cmocka_unit_test(test_eval_distance_renders),
        cmocka_unit_test(test_reuse_renders),
        cmocka_unit_test(test_survival_distance_renders),
        cmocka_unit_test(test_empty_field_is_missing),
        cmocka_unit_test(test_intervals_and_coinciding_lines),
        cmocka_unit_test(test_distance_plots_name_coinciding_lines),
        cmocka_unit_test(test_dataset_renders),
        cmocka_unit_test(test_missing_input_fails),
        cmocka_unit_test(test_wrong_input_fails),
        cmocka_unit_test(test_concat_exact_output),
        cmocka_unit_test(test_concat_quoted_label),
        cmocka_unit_test(test_concat_rejects_inconsistent_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
