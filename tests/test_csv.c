/* test_csv.c — the CSV conventions of every file kvsim writes (sim/base/csv.h, docs/metrics.md
 * "Files"). Each file is read back with an RFC 4180 parser written here (quoted fields with
 * commas, doubled quotes and line breaks): every row has as many fields as the header, no
 * field is NaN or infinite, a number is "%.9g", a byte count an exact integer (or a mean with
 * three decimals), an empty field appears only where a value does not apply, and policy
 * labels and prompt names with a comma and a quote come back as they were. Covered: the
 * writer itself (exact bytes, refusal of a non-finite value naming file, row and column),
 * summary.csv, layers.csv and steps.csv of `kvsim run` (a trace with needles and an oracle,
 * and one without either), eval.csv and eval_prompts.csv of `kvsim eval`. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/base/csv.h"
#include "sim/replay/report.h"
#include "sim/base/util.h"
#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"

/* ---- An RFC 4180 reader ---- */

typedef struct {
    int n_rows; /* the header included */
    int *n_fields;
    char ***field;
} Table;

typedef struct {
    char *s;
    size_t len, cap;
} Buf;

static void buf_put(Buf *b, char ch)
{
    if (b->len + 1 >= b->cap)
        b->s = kv_realloc(b->s, b->cap = b->cap ? 2 * b->cap : 32);
    b->s[b->len++] = ch;
    b->s[b->len] = '\0';
}

static bool at_row_end(const char *p)
{
    return *p == '\n' || *p == '\0' || (p[0] == '\r' && p[1] == '\n');
}

/* Parses `text` strictly: a quoted field ends at a lone quote followed by a separator or the
 * end of the row; a quote inside an unquoted field, a bare CR, or a last row without its line
 * end fail the test naming `what`. */
static Table parse_csv(const char *text, const char *what)
{
    Table t = {0};
    const char *p = text;
    if (!*p)
        fail_msg("%s: empty file", what);
    while (*p) {
        char **fields = NULL;
        int nf = 0;
        for (;;) {
            Buf b = {kv_calloc(1, 32), 0, 32};
            if (*p == '"') {
                p++;
                for (;;) {
                    if (!*p)
                        fail_msg("%s: row %d: quoted field not closed", what, t.n_rows + 1);
                    if (*p == '"' && p[1] == '"') {
                        buf_put(&b, '"');
                        p += 2;
                    } else if (*p == '"') {
                        p++;
                        break;
                    } else {
                        buf_put(&b, *p++);
                    }
                }
                if (*p != ',' && !at_row_end(p))
                    fail_msg("%s: row %d, field %d: text after the closing quote", what,
                             t.n_rows + 1, nf + 1);
            } else {
                while (*p != ',' && !at_row_end(p)) {
                    if (*p == '"' || *p == '\r')
                        fail_msg("%s: row %d, field %d: a %s in an unquoted field", what,
                                 t.n_rows + 1, nf + 1, *p == '"' ? "quote" : "bare CR");
                    buf_put(&b, *p++);
                }
            }
            fields = kv_realloc(fields, (size_t)(nf + 1) * sizeof *fields);
            fields[nf++] = b.s;
            if (*p != ',')
                break;
            p++;
        }
        if (*p == '\0')
            fail_msg("%s: row %d has no line end", what, t.n_rows + 1);
        p += *p == '\r' ? 2 : 1;
        t.field = kv_realloc(t.field, (size_t)(t.n_rows + 1) * sizeof *t.field);
        t.n_fields = kv_realloc(t.n_fields, (size_t)(t.n_rows + 1) * sizeof *t.n_fields);
        t.field[t.n_rows] = fields;
        t.n_fields[t.n_rows++] = nf;
    }
    return t;
}

static void table_free(Table *t)
{
    for (int r = 0; r < t->n_rows; r++) {
        for (int i = 0; i < t->n_fields[r]; i++)
            free(t->field[r][i]);
        free(t->field[r]);
    }
    free(t->field);
    free(t->n_fields);
}

static int column(const Table *t, const char *name)
{
    for (int i = 0; i < t->n_fields[0]; i++)
        if (!strcmp(t->field[0][i], name))
            return i;
    fail_msg("no column %s", name);
    return -1;
}

/* Data row r (1-based, after the header), column `name`. */
static const char *cell(const Table *t, int r, const char *name)
{
    return t->field[r][column(t, name)];
}

/* ---- The formats ---- */

typedef enum { COL_TEXT, COL_INT, COL_NUM, COL_COUNT } ColumnKind;

/* The kind of every column of kvsim's CSVs, by name (docs/metrics.md, docs/eval.md). */
static ColumnKind kind_of(const char *name)
{
    static const char *const text[] = {"policy", "type",     "prompt", "answer",
                                       "expected", "history", "by"};
    static const char *const ints[] = {"layer",    "step",      "decode_index",
                                       "prompts",  "questions", "question",
                                       "turn",     "distance",  "value",
                                       "correct",  "agrees_with_full", "generated_tokens",
                                       "vs_full_better", "vs_full_worse"};
    for (size_t i = 0; i < sizeof text / sizeof text[0]; i++)
        if (!strcmp(name, text[i]))
            return COL_TEXT;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (!strcmp(name, ints[i]))
            return COL_INT;
    if (strstr(name, "bytes") || !strcmp(name, "restored_tokens") ||
        !strcmp(name, "fetched_tokens"))
        return COL_COUNT;
    return COL_NUM;
}

static bool all_digits(const char *s, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* An integer: [-]digits, no leading zero. */
static bool is_int(const char *s)
{
    if (*s == '-')
        s++;
    return all_digits(s, strlen(s)) && (s[0] != '0' || s[1] == '\0');
}

/* A count: digits (no exponent, every digit), or digits '.' three digits. */
static bool is_count(const char *s)
{
    const char *dot = strchr(s, '.');
    if (!dot)
        return all_digits(s, strlen(s)) && (s[0] != '0' || s[1] == '\0');
    return all_digits(s, (size_t)(dot - s)) && strlen(dot + 1) == 3 && all_digits(dot + 1, 3);
}

/* What "%.9g" prints for a finite value: only [-0-9.e+], at most 9 significant digits, read
 * back whole by strtod, and no "-0". */
static bool is_num9(const char *s)
{
    if (!*s || strspn(s, "-0123456789.e+") != strlen(s) || !strcmp(s, "-0"))
        return false;
    char *end;
    double v = strtod(s, &end);
    if (*end || !isfinite(v))
        return false;
    int digits = 0;
    bool leading = true;
    for (const char *p = s; *p && *p != 'e'; p++) {
        if (*p < '0' || *p > '9')
            continue;
        if (*p != '0')
            leading = false;
        if (!leading)
            digits++;
    }
    return digits <= 9;
}

static bool has_nan_or_inf(const char *s)
{
    static const char *const bad[] = {"nan", "NaN", "NAN", "inf", "Inf", "INF"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (strstr(s, bad[i]))
            return true;
    return false;
}

static bool in_list(const char *name, const char *const *list)
{
    for (; list && *list; list++)
        if (!strcmp(name, *list))
            return true;
    return false;
}

/* Reads dir/name, checks the header is `header`, every row has its field count, every field
 * has its column's format, and only the columns in `may_be_empty` (NULL-terminated) have
 * empty fields. Returns the table and, in *raw, the file's text. */
static Table read_checked(const char *dir, const char *name, const char *header,
                          const char *const *may_be_empty, char **raw)
{
    char *text = scratch_read(scratch_path(dir, name, 3));
    Table t = parse_csv(text, name);
    size_t hl = strcspn(text, "\n");
    if (strlen(header) != hl || strncmp(text, header, hl))
        fail_msg("%s: header '%.*s', expected '%s'", name, (int)hl, text, header);
    if (t.n_rows < 2)
        fail_msg("%s: no data rows", name);
    int nc = t.n_fields[0];
    for (int r = 1; r < t.n_rows; r++) {
        if (t.n_fields[r] != nc)
            fail_msg("%s: data row %d has %d fields, the header %d", name, r, t.n_fields[r], nc);
        for (int i = 0; i < nc; i++) {
            const char *col = t.field[0][i], *v = t.field[r][i];
            ColumnKind kind = kind_of(col);
            if (kind == COL_TEXT)
                continue;
            if (!*v) {
                if (!in_list(col, may_be_empty))
                    fail_msg("%s: data row %d (%s): column %s is empty", name, r, t.field[r][0],
                             col);
                continue;
            }
            bool ok = kind == COL_INT ? is_int(v) : kind == COL_COUNT ? is_count(v) : is_num9(v);
            if (!ok || has_nan_or_inf(v))
                fail_msg("%s: data row %d (%s): column %s = '%s' is not a %s", name, r,
                         t.field[r][0], col, v,
                         kind == COL_INT     ? "plain integer"
                         : kind == COL_COUNT ? "count (exact integer or %.3f)"
                                             : "finite %.9g number");
        }
    }
    if (raw)
        *raw = text;
    else
        free(text);
    return t;
}

/* ---- The writer ---- */

static void test_writer_exact_bytes(void **state)
{
    (void)state;
    char *dir = scratch_create();
    KvErr err;
    CsvFile c;
    assert_int_equal(csv_create(&c, dir, "w.csv", "label,num,count,opt,text", &err), 0);
    csv_put_text(&c, "a,\"b");
    csv_put_num(&c, 0.1);
    csv_put_count(&c, 2202009); /* 2.1 MiB: %.6g would print 2.20201e+06 */
    csv_put_optional(&c, NAN);
    csv_put_text(&c, "line 1\r\nline \"2\"");
    csv_end_row(&c);
    csv_put_text(&c, "plain");
    csv_put_num(&c, 1.0 / 3.0);
    csv_put_count(&c, 2202009.6);
    csv_put_optional(&c, 0.25);
    csv_put_text(&c, "");
    csv_end_row(&c);
    csv_put_text(&c, "q\"");
    csv_put_num(&c, -0.0);
    csv_put_count(&c, 1e15 + 1);
    csv_put_optional(&c, 1234567891.0);
    csv_put_empty(&c);
    csv_end_row(&c);
    assert_int_equal(csv_commit(&c, &err), 0);
    char *text = scratch_read(scratch_path(dir, "w.csv", 0));
    assert_string_equal(text, "label,num,count,opt,text\n"
                              "\"a,\"\"b\",0.1,2202009,,\"line 1\r\nline \"\"2\"\"\"\n"
                              "plain,0.333333333,2202009.600,0.25,\n"
                              "\"q\"\"\",0,1000000000000001,1.23456789e+09,\n");
    /* and the reader gets the fields back */
    Table t = parse_csv(text, "w.csv");
    assert_int_equal(t.n_rows, 4);
    assert_string_equal(t.field[1][0], "a,\"b");
    assert_string_equal(t.field[1][4], "line 1\r\nline \"2\"");
    assert_string_equal(t.field[3][0], "q\"");
    table_free(&t);
    free(text);
    assert_int_equal(scratch_count(dir), 1); /* no temporary left */
    scratch_remove(dir);
}

/* "%.9g" gives back the float32 it printed (every head metric is a float32 average). */
static void test_num_round_trips_float32(void **state)
{
    (void)state;
    static const float values[] = {0.1f, 1.0f / 3.0f, 0.99999994f, 1e-7f, 123456.789f,
                                   3.4028235e38f, 1.17549435e-38f, 0.577129f};
    char *dir = scratch_create();
    KvErr err;
    CsvFile c;
    assert_int_equal(csv_create(&c, dir, "f.csv", "policy,v", &err), 0);
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        csv_put_text(&c, "p");
        csv_put_num(&c, values[i]);
        csv_end_row(&c);
    }
    assert_int_equal(csv_commit(&c, &err), 0);
    char *text = scratch_read(scratch_path(dir, "f.csv", 0));
    Table t = parse_csv(text, "f.csv");
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        const char *v = t.field[i + 1][1];
        assert_true(is_num9(v));
        if (strtof(v, NULL) != values[i])
            fail_msg("%.9g printed as %s, read back as %.9g", values[i], v, strtof(v, NULL));
    }
    table_free(&t);
    free(text);
    scratch_remove(dir);
}

/* A non-finite value where a value must exist, or a short row: no file, and one line naming
 * the file, the row and the column. */
static void expect_refused(void (*fill)(CsvFile *), const char *const *want)
{
    char *dir = scratch_create();
    KvErr err;
    CsvFile c;
    assert_int_equal(csv_create(&c, dir, "bad.csv", "policy,mass_mean,device_bytes,needle", &err),
                     0);
    csv_put_text(&c, "full");
    csv_put_num(&c, 1);
    csv_put_count(&c, 512);
    csv_put_optional(&c, NAN);
    csv_end_row(&c);
    fill(&c);
    assert_int_equal(csv_commit(&c, &err), -1);
    assert_null(strchr(err.msg, '\n'));
    assert_non_null(strstr(err.msg, scratch_path(dir, "bad.csv", 0)));
    for (; *want; want++)
        if (!strstr(err.msg, *want))
            fail_msg("error '%s' does not mention '%s'", err.msg, *want);
    assert_int_equal(scratch_count(dir), 0); /* neither the file nor its temporary */
    scratch_remove(dir);
}

static void nan_mass(CsvFile *c)
{
    csv_put_text(c, "a,b");
    csv_put_num(c, NAN);
    csv_put_count(c, 512);
    csv_put_optional(c, 0.5);
    csv_end_row(c);
}

static void inf_bytes(CsvFile *c)
{
    csv_put_text(c, "w");
    csv_put_num(c, 0.5);
    csv_put_count(c, INFINITY);
    csv_put_optional(c, 0.5);
    csv_end_row(c);
}

static void inf_optional(CsvFile *c)
{
    csv_put_text(c, "w");
    csv_put_num(c, 0.5);
    csv_put_count(c, 512);
    csv_put_optional(c, -INFINITY);
    csv_end_row(c);
}

static void short_row(CsvFile *c)
{
    csv_put_text(c, "w");
    csv_put_num(c, 0.5);
    csv_end_row(c);
}

static void test_writer_refuses_non_finite(void **state)
{
    (void)state;
    expect_refused(nan_mass, (const char *const[]){"data row 2", "(a,b)", "column mass_mean",
                                                   "nan", NULL});
    expect_refused(inf_bytes, (const char *const[]){"data row 2", "column device_bytes", "inf",
                                                    NULL});
    expect_refused(inf_optional, (const char *const[]){"column needle", "-inf", NULL});
    expect_refused(short_row, (const char *const[]){"data row 2", "2 fields", "header has 4",
                                                    NULL});
}

static const char SUMMARY_HEADER[] =
    "policy,type,mass_mean,mass_p5,mass_p50,mass_p95,recall_mean,out_err_mean,out_err_p50,"
    "out_err_p95,cache_tokens_mean,cache_tokens_max,device_bytes_mean,device_bytes_max,"
    "allocated_bytes_max,host_bytes_mean,host_bytes_max,to_host_bytes,to_device_bytes,"
    "fetched_tokens_per_step,restored_tokens,restore_k_err,restore_v_err,needle_survival_mean,"
    "needle_survival_min";
static const char LAYERS_HEADER[] =
    "policy,layer,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,device_bytes_mean,"
    "host_bytes_mean,needle_survival_mean";
static const char STEPS_HEADER[] =
    "policy,step,decode_index,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,"
    "device_bytes,allocated_bytes,host_bytes,fetched_tokens,needle_survival";

/* ---- The reductions of sim/replay/report.c ---- */

/* One policy ("w,1", a window), 2 layers, 2 query heads, 2 evaluated steps (the second a
 * probe): every head metric and byte count finite, needle survival NaN (does not apply) off
 * the probe, nothing restored, no oracle. */
static Results *small_results(void)
{
    Results *r = kv_calloc(1, sizeof *r);
    r->n_policies = 1, r->n_layers = 2, r->n_q_heads = 2, r->n_kv_heads = 1;
    r->n_prompt = 10, r->n_tokens = 12, r->n_evals = 2, r->n_steps = 2;
    r->eval_step = kv_malloc(2 * sizeof *r->eval_step);
    r->eval_step[0] = 10, r->eval_step[1] = 11;
    r->eval_probe = kv_calloc(2, sizeof *r->eval_probe);
    r->eval_probe[1] = true;
    r->label = kv_calloc(1, sizeof *r->label);
    strcpy(r->label[0], "w,1");
    r->type = kv_calloc(1, sizeof *r->type);
    r->type[0] = policy_find("window");
    assert_non_null(r->type[0]);
    r->is_oracle = kv_calloc(1, sizeof *r->is_oracle);
    r->total = kv_calloc((size_t)2 * N_TOTAL_METRICS, sizeof *r->total);
    assert_int_equal(results_spill_open(r, false, NULL), 0);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 2; e++) {
            for (int h = 0; h < 2; h++) {
                assert_int_equal(results_set_head_at(r, 0, l, e, h, HM_MASS, 0.5f, NULL), 0);
                assert_int_equal(results_set_head_at(r, 0, l, e, h, HM_RECALL, 0.25f, NULL), 0);
                assert_int_equal(results_set_head_at(r, 0, l, e, h, HM_OUT_ERR, 0.125f, NULL), 0);
            }
            assert_int_equal(results_set_step_at(r, 0, l, e, SM_CACHE_TOKENS, 4, NULL), 0);
            assert_int_equal(results_set_step_at(r, 0, l, e, SM_DEVICE_BYTES, 1100000 + e, NULL), 0);
            assert_int_equal(results_set_step_at(r, 0, l, e, SM_ALLOCATED_BYTES, 1100000 + e, NULL),
                             0);
            assert_int_equal(
                results_set_step_at(r, 0, l, e, SM_NEEDLE_SURVIVAL, e == 1 ? 0.75 : NAN, NULL), 0);
        }
    return r;
}

/* Writes r's CSVs into a fresh directory; returns report_write_csv's status and the error. */
static int write_results(Results *r, KvErr *err, char **dir)
{
    PolicySummary s[1];
    report_summarize(r, s);
    *dir = scratch_create();
    return report_write_csv(r, s, *dir, err);
}

static void test_report_reductions(void **state)
{
    (void)state;
    Results *r = small_results();
    KvErr err;
    char *dir;
    assert_int_equal(write_results(r, &err, &dir), 0);
    char *raw;
    static const char *const summary_empty[] = {"restore_k_err", "restore_v_err", NULL};
    Table t = read_checked(dir, "summary.csv", SUMMARY_HEADER, summary_empty, &raw);
    assert_string_equal(raw, "policy,type,mass_mean,mass_p5,mass_p50,mass_p95,recall_mean,"
                             "out_err_mean,out_err_p50,out_err_p95,cache_tokens_mean,"
                             "cache_tokens_max,device_bytes_mean,device_bytes_max,"
                             "allocated_bytes_max,host_bytes_mean,host_bytes_max,to_host_bytes,"
                             "to_device_bytes,fetched_tokens_per_step,restored_tokens,"
                             "restore_k_err,restore_v_err,needle_survival_mean,"
                             "needle_survival_min\n"
                             "\"w,1\",window,0.5,0.5,0.5,0.5,0.25,0.125,0.125,0.125,4,4,"
                             "2200001,2200002,2200002,0,0,0,0,0,0,,,0.75,0.75\n");
    free(raw);
    table_free(&t);
    static const char *const steps_empty[] = {"needle_survival", NULL};
    t = read_checked(dir, "steps.csv", STEPS_HEADER, steps_empty, &raw);
    assert_string_equal(raw, "policy,step,decode_index,mass_mean,recall_mean,out_err_mean,"
                             "cache_tokens_mean,device_bytes,allocated_bytes,host_bytes,"
                             "fetched_tokens,needle_survival\n"
                             "\"w,1\",10,0,0.5,0.25,0.125,4,2200000,2200000,0,0,\n"
                             "\"w,1\",11,1,0.5,0.25,0.125,4,2200002,2200002,0,0,0.75\n");
    free(raw);
    table_free(&t);
    t = read_checked(dir, "layers.csv", LAYERS_HEADER, NULL, &raw);
    assert_string_equal(raw, "policy,layer,mass_mean,recall_mean,out_err_mean,cache_tokens_mean,"
                             "device_bytes_mean,host_bytes_mean,needle_survival_mean\n"
                             "\"w,1\",0,0.5,0.25,0.125,4,1100000.500,0,0.75\n"
                             "\"w,1\",1,0.5,0.25,0.125,4,1100000.500,0,0.75\n");
    free(raw);
    table_free(&t);
    scratch_remove(dir);
    results_free(r);
}

/* A NaN where the engine guarantees a value is not averaged away: it reaches the writer,
 * which refuses the file naming it and the column. */
static void expect_results_refused(void (*spoil)(Results *), const char *file,
                                   const char *col)
{
    Results *r = small_results();
    spoil(r);
    KvErr err;
    char *dir;
    assert_int_equal(write_results(r, &err, &dir), -1);
    if (!strstr(err.msg, file) || !strstr(err.msg, col) || !strstr(err.msg, "(w,1)"))
        fail_msg("error '%s' does not name %s, %s and the policy", err.msg, file, col);
    assert_int_equal(scratch_count(dir), 0);
    scratch_remove(dir);
    results_free(r);
}

static void nan_mass_of_one_head(Results *r)
{
    assert_int_equal(results_set_head_at(r, 0, 1, 0, 1, HM_MASS, NAN, NULL), 0);
}

static void nan_recall_of_one_head(Results *r)
{
    assert_int_equal(results_set_head_at(r, 0, 0, 1, 0, HM_RECALL, NAN, NULL), 0);
}

static void nan_device_bytes_of_one_layer(Results *r)
{
    assert_int_equal(results_set_step_at(r, 0, 1, 1, SM_DEVICE_BYTES, NAN, NULL), 0);
}

static void test_report_refuses_nan_where_a_value_exists(void **state)
{
    (void)state;
    expect_results_refused(nan_mass_of_one_head, "summary.csv", "column mass_mean");
    expect_results_refused(nan_recall_of_one_head, "summary.csv", "column recall_mean");
    expect_results_refused(nan_device_bytes_of_one_layer, "summary.csv",
                           "column device_bytes_mean");
}

/* ---- kvsim run ---- */

enum { LAYERS = 2, KV_HEADS = 4, HEAD_DIM = 64, PROMPT = 512, DECODE = 40 };
/* K and V of one token, all layers and KV heads, 16 bits each. */
#define TOKEN_BYTES (LAYERS * KV_HEADS * HEAD_DIM * 2 * 2)

/* Labels with a comma and a quote, a quote alone, a comma alone, as the INI sections name
 * them; NULL-terminated in config order. */
static const char *const LABELS[] = {"full", "a,\"b", "q\"uote", "off,load", "oracle", NULL};

static void write_run_config(const char *path, bool oracle)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "[run]\nthreads = 2\neval_every = 1\n"
               "[policy.full]\ntype = full\n"
               "[policy.a,\"b]\ntype = window\nwindow = 60\nsinks = 4\n"
               "[policy.q\"uote]\ntype = h2o\nbudget = 64\n"
               "[policy.off,load]\ntype = offload\nbudget = 64\nratio = 0.5\nbits = 8\n"
               "threshold = 0.01\n"); /* low enough to restore tokens on these traces */
    if (oracle)
        fprintf(f, "[policy.oracle]\ntype = oracle_topk\nbudget = 64\n");
    fclose(f);
}

/* kvsim run on a synthetic trace with `needles` needles; the CSVs land in out. */
static void run_kvsim_run(const char *dir, const char *out, int needles, bool oracle)
{
    char trace[8192], config[8192];
    snprintf(trace, sizeof trace, "%s", scratch_path(dir, "t.h5", 0));
    snprintf(config, sizeof config, "%s", scratch_path(dir, "run.ini", 1));
    KvsimRun r = run_kvsim_ok("synth --out '%s' --seed 3 --layers %d --q-heads 8 --kv-heads %d "
                        "--head-dim %d --prompt %d --decode %d --needles %d",
                        trace, LAYERS, KV_HEADS, HEAD_DIM, PROMPT, DECODE, needles);
    kvsim_run_free(&r);
    write_run_config(config, oracle);
    r = run_kvsim_ok("run '%s' --trace '%s' --out '%s' --quiet", config, trace, out);
    kvsim_run_free(&r);
}

/* The labels of column `policy`, each repeated `per` times, are LABELS in order. */
static void assert_labels(const Table *t, int n_policies, int per)
{
    assert_int_equal(t->n_rows, 1 + n_policies * per);
    for (int r = 1; r < t->n_rows; r++)
        assert_string_equal(cell(t, r, "policy"), LABELS[(r - 1) / per]);
}

static void test_run_csvs(void **state)
{
    (void)state;
    char *dir = scratch_create(), *out = scratch_create();
    run_kvsim_run(dir, out, 4, true);
    const int n_pol = 5;

    static const char *const summary_empty[] = {"restore_k_err", "restore_v_err", NULL};
    char *raw;
    Table s = read_checked(out, "summary.csv", SUMMARY_HEADER, summary_empty, &raw);
    assert_labels(&s, n_pol, 1);
    /* quoted exactly as RFC 4180 says, and only where needed */
    assert_non_null(strstr(raw, "\n\"a,\"\"b\",window,"));
    assert_non_null(strstr(raw, "\n\"q\"\"uote\",h2o,"));
    assert_non_null(strstr(raw, "\n\"off,load\",offload,"));
    assert_non_null(strstr(raw, "\nfull,full,"));
    free(raw);
    assert_string_not_equal(cell(&s, 4, "restored_tokens"), "0"); /* offload restored */
    for (int r = 1; r < s.n_rows; r++) {
        /* a restore error exists exactly when something was restored */
        bool restored = strcmp(cell(&s, r, "restored_tokens"), "0") != 0;
        assert_int_equal(*cell(&s, r, "restore_k_err") != '\0', restored);
        assert_int_equal(*cell(&s, r, "restore_v_err") != '\0', restored);
    }
    /* full: every token of every step on the device, at 2 bytes per K and V value */
    char want[64];
    snprintf(want, sizeof want, "%d", (PROMPT + DECODE) * TOKEN_BYTES);
    assert_string_equal(cell(&s, 1, "device_bytes_max"), want);
    assert_true(strlen(want) >= 7); /* beyond what %.6g prints exactly */
    assert_string_equal(cell(&s, 1, "mass_mean"), "1");
    assert_string_equal(cell(&s, 1, "needle_survival_mean"), "1");
    table_free(&s);

    Table l = read_checked(out, "layers.csv", LAYERS_HEADER, NULL, NULL);
    assert_labels(&l, n_pol, LAYERS);
    for (int r = 1; r < l.n_rows; r++) {
        char layer[16];
        snprintf(layer, sizeof layer, "%d", (r - 1) % LAYERS);
        assert_string_equal(cell(&l, r, "layer"), layer);
    }
    table_free(&l);

    static const char *const steps_empty[] = {"needle_survival", NULL};
    Table st = read_checked(out, "steps.csv", STEPS_HEADER, steps_empty, NULL);
    assert_labels(&st, n_pol, DECODE);
    int probes = 0;
    for (int r = 1; r < st.n_rows; r++) {
        int step = atoi(cell(&st, r, "step"));
        int d = (r - 1) % DECODE;
        assert_int_equal(step, PROMPT + d);
        assert_int_equal(atoi(cell(&st, r, "decode_index")), d);
        /* needle survival only at the probes (every 16th decode step and the last; the one
         * at the last prompt token is not evaluated), the same steps for every policy */
        bool probe = (d + 1) % 16 == 0 || d == DECODE - 1;
        assert_int_equal(*cell(&st, r, "needle_survival") != '\0', probe);
        probes += probe && r <= DECODE;
        if (r <= DECODE) { /* full: exact bytes at every step */
            snprintf(want, sizeof want, "%d", (step + 1) * TOKEN_BYTES);
            assert_string_equal(cell(&st, r, "device_bytes"), want);
            if (probe)
                assert_string_equal(cell(&st, r, "needle_survival"), "1");
        }
    }
    assert_int_equal(probes, 3);
    table_free(&st);
    scratch_remove(out);
    scratch_remove(dir);
}

/* No needles and no oracle: needle survival and the gap to the oracle do not apply anywhere,
 * so they are empty in every row, and nothing else is. */
static void test_run_csvs_without_needles_or_oracle(void **state)
{
    (void)state;
    char *dir = scratch_create(), *out = scratch_create();
    run_kvsim_run(dir, out, 0, false);
    const int n_pol = 4;
    static const char *const summary_empty[] = {"restore_k_err", "restore_v_err",
                                                "needle_survival_mean", "needle_survival_min",
                                                NULL};
    Table s = read_checked(out, "summary.csv", SUMMARY_HEADER, summary_empty, NULL);
    assert_labels(&s, n_pol, 1);
    for (int r = 1; r < s.n_rows; r++) {
        assert_string_equal(cell(&s, r, "needle_survival_mean"), "");
        assert_string_equal(cell(&s, r, "needle_survival_min"), "");
    }
    table_free(&s);
    static const char *const layers_empty[] = {"needle_survival_mean", NULL};
    Table l = read_checked(out, "layers.csv", LAYERS_HEADER, layers_empty, NULL);
    assert_labels(&l, n_pol, LAYERS);
    for (int r = 1; r < l.n_rows; r++)
        assert_string_equal(cell(&l, r, "needle_survival_mean"), "");
    table_free(&l);
    static const char *const steps_empty[] = {"needle_survival", NULL};
    Table st = read_checked(out, "steps.csv", STEPS_HEADER, steps_empty, NULL);
    assert_labels(&st, n_pol, DECODE);
    for (int r = 1; r < st.n_rows; r++)
        assert_string_equal(cell(&st, r, "needle_survival"), "");
    table_free(&st);
    scratch_remove(out);
    scratch_remove(dir);
}

/* ---- kvsim eval ---- */

static const char EVAL_HEADER[] = "policy,type,prompts,questions,correct,accuracy,"
                                  "accuracy_lo,accuracy_hi,agreement_with_full,"
                                  "device_bytes_mean,host_bytes_mean,generated_tokens_mean,"
                                  "vs_full_better,vs_full_worse,vs_full_p,vs_best_p";
static const char PROMPTS_HEADER[] = "policy,prompt,question,turn,distance,correct,"
                                     "agrees_with_full,generated_tokens,device_bytes,host_bytes,"
                                     "answer,expected";
static const char TURNS_HEADER[] = "policy,type,history,by,value,questions,correct,accuracy,"
                                   "accuracy_lo,accuracy_hi,agreement_with_full";

static void test_eval_csvs(void **state)
{
    (void)state;
    char *model = scratch_create(), *prompts = scratch_create(), *out = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    TinyCheckpoint *ck = tiny_ckpt_write(model, &spec);
    tiny_ckpt_write_tokenizer(model);
    /* Prompt names and an expected answer with a comma and quotes; bytewise order. */
    static const char *const names[] = {"p1", "q\"2,x"};
    static const char *const expected[] = {"the, \"thin\"", "tin"};
    for (int i = 0; i < 2; i++) {
        char name[64], text[64];
        snprintf(name, sizeof name, "%s.txt", names[i]);
        scratch_write(scratch_path(prompts, name, 0), i ? "the thin tin in" : "then the other hat");
        snprintf(name, sizeof name, "%s.answer", names[i]);
        snprintf(text, sizeof text, "%s\n", expected[i]);
        scratch_write(scratch_path(prompts, name, 0), text);
    }
    char config[8192];
    snprintf(config, sizeof config, "%s", scratch_path(out, "eval.ini", 0));
    scratch_write(config, "[run]\nthreads = 1\n"
                       "[policy.full]\ntype = full\n"
                       "[policy.a,\"b]\ntype = window\nwindow = 2\nsinks = 1\n"
                       "[policy.future]\ntype = oracle_future\nbudget = 3\n");
    KvsimRun r = run_kvsim_ok("eval '%s' --model '%s' --prompts '%s' --out '%s' --quiet", config, model,
                        prompts, out);
    kvsim_run_free(&r);

    static const char *const eval_empty[] = {"correct",          "accuracy",
                                             "accuracy_lo",      "accuracy_hi",
                                             "agreement_with_full", "device_bytes_mean",
                                             "host_bytes_mean",  "generated_tokens_mean",
                                             "vs_full_better",   "vs_full_worse",
                                             "vs_full_p",        "vs_best_p",
                                             NULL};
    char *raw;
    Table e = read_checked(out, "eval.csv", EVAL_HEADER, eval_empty, &raw);
    assert_non_null(strstr(raw, "\n\"a,\"\"b\",window,2,2,"));
    free(raw);
    assert_int_equal(e.n_rows, 4);
    static const char *const labels[] = {"full", "a,\"b", "future"};
    for (int row = 1; row <= 3; row++) {
        assert_string_equal(cell(&e, row, "policy"), labels[row - 1]);
        assert_string_equal(cell(&e, row, "prompts"), "2");
        if (row == 3) {
            /* oracle_future does not apply in closed loop: empty from `correct` on */
            assert_string_equal(cell(&e, row, "type"), "oracle_future");
            for (int i = column(&e, "correct"); i < e.n_fields[0]; i++)
                assert_string_equal(e.field[row][i], "");
            continue;
        }
        int correct = atoi(cell(&e, row, "correct"));
        assert_true(correct >= 0 && correct <= 2);
        assert_float_equal(atof(cell(&e, row, "accuracy")), correct / 2.0, 1e-9);
        assert_true(*cell(&e, row, "device_bytes_mean") != '\0');
        /* the Wilson interval holds the accuracy; the discordant counts differ by the
         * difference in correct answers */
        double lo = atof(cell(&e, row, "accuracy_lo")), hi = atof(cell(&e, row, "accuracy_hi"));
        assert_true(0 <= lo && lo < correct / 2.0 + 1e-12 && correct / 2.0 < hi + 1e-12 && hi <= 1);
        int full_correct = atoi(cell(&e, 1, "correct"));
        assert_int_equal(atoi(cell(&e, row, "vs_full_better")) -
                             atoi(cell(&e, row, "vs_full_worse")),
                         correct - full_correct);
        double p = atof(cell(&e, row, "vs_full_p"));
        assert_true(p > 0 && p <= 1);
    }
    assert_string_equal(cell(&e, 1, "vs_full_better"), "0");
    assert_string_equal(cell(&e, 1, "vs_full_worse"), "0");
    assert_string_equal(cell(&e, 1, "vs_full_p"), "1");
    /* the only policy besides full is the best: p = 1 against itself */
    assert_string_equal(cell(&e, 2, "vs_best_p"), "1");
    assert_string_equal(cell(&e, 1, "agreement_with_full"), "1");
    /* the window: 3 slots x 2 KV heads x 2 layers x (K+V of 16 dims at 16 bits), exact */
    assert_string_equal(cell(&e, 2, "device_bytes_mean"), "768");
    table_free(&e);

    static const char *const prompts_empty[] = {"distance", NULL}; /* no fact turns given */
    Table p = read_checked(out, "eval_prompts.csv", PROMPTS_HEADER, prompts_empty, NULL);
    assert_int_equal(p.n_rows, 1 + 2 * 2); /* future has no per-prompt rows */
    for (int row = 1; row < p.n_rows; row++) {
        int i = (row - 1) % 2;
        assert_string_equal(cell(&p, row, "policy"), labels[(row - 1) / 2]);
        assert_string_equal(cell(&p, row, "prompt"), names[i]);
        assert_string_equal(cell(&p, row, "expected"), expected[i]);
        /* correct means the answer span is the expected answer */
        assert_int_equal(atoi(cell(&p, row, "correct")),
                         !strcmp(cell(&p, row, "answer"), expected[i]));
        /* one question per prompt, in its only turn (plain text: segment 1), no fact turn */
        assert_string_equal(cell(&p, row, "question"), "0");
        assert_string_equal(cell(&p, row, "turn"), "1");
        assert_string_equal(cell(&p, row, "distance"), "");
    }
    table_free(&p);

    /* by turn only (no answer gives a fact's turn): one row per policy, future's empty from
     * `correct` on */
    static const char *const turns_empty[] = {"correct", "accuracy", "accuracy_lo", "accuracy_hi",
                                              "agreement_with_full", NULL};
    Table t = read_checked(out, "eval_turns.csv", TURNS_HEADER, turns_empty, NULL);
    assert_int_equal(t.n_rows, 4);
    for (int row = 1; row <= 3; row++) {
        assert_string_equal(cell(&t, row, "policy"), labels[row - 1]);
        assert_string_equal(cell(&t, row, "history"), "persist");
        assert_string_equal(cell(&t, row, "by"), "turn");
        assert_string_equal(cell(&t, row, "value"), "1");
        assert_string_equal(cell(&t, row, "questions"), "2");
    }
    assert_string_equal(cell(&t, 3, "correct"), "");
    table_free(&t);
    tiny_ckpt_free(ck);
    scratch_remove(model);
    scratch_remove(prompts);
    scratch_remove(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_writer_exact_bytes),
        cmocka_unit_test(test_num_round_trips_float32),
        cmocka_unit_test(test_writer_refuses_non_finite),
        cmocka_unit_test(test_report_reductions),
        cmocka_unit_test(test_report_refuses_nan_where_a_value_exists),
        cmocka_unit_test(test_run_csvs),
        cmocka_unit_test(test_run_csvs_without_needles_or_oracle),
        cmocka_unit_test(test_eval_csvs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
