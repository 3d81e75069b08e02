/* test_metrics_table.c — the metric table (sim/replay/metrics.def, sim/replay/metric_table.h) and what
 * follows from it. The table is well formed (each kind's fields and statistics, slots dense and
 * found again, column names unique and short enough); every file report_write_csv writes has
 * the header the table gives and every data row exactly as wide as it, with empty fields only
 * in columns that may not apply, whatever the shape of the results (with and without probe
 * steps and restores); and docs/metrics.md lists each file's columns, names and order, exactly
 * as the table generates them (so the documentation cannot drift from the code). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/replay/metric_table.h"
#include "sim/replay/report.h"
#include "tests/support/scratch.h"

/* ---- The table ---- */

static void test_table_is_well_formed(void **state)
{
    (void)state;
    const unsigned sample_stats = ST_MEAN | ST_P5 | ST_P50 | ST_P95 | ST_MIN | ST_MAX;
    const unsigned total_stats = ST_SUM | ST_PER_STEP | ST_PER_RESTORED;
    int per_kind[4] = {0, 0, 0, 0};
    for (int i = 0; i < N_METRICS; i++) {
        const Metric *m = &metric_table[i];
        assert_ptr_equal(metric_of(m->kind, m->slot), m);
        per_kind[m->kind]++;
        switch (m->kind) {
        case METRIC_HEAD:
            assert_int_equal(m->layers, LAYERS_MEAN);
            /* fallthrough */
        case METRIC_STEP:
            if (m->summary & ~sample_stats)
                fail_msg("%s: a head or step metric's statistics are MEAN, P5, P50, P95, MIN, "
                         "MAX", m->name);
            break;
        case METRIC_TOTAL:
            assert_int_equal(m->layers, LAYERS_SUM);
            assert_int_equal(m->applies, APPLIES_ALWAYS);
            if (m->summary & ~total_stats)
                fail_msg("%s: a total's statistics are SUM, PER_STEP, PER_RESTORED", m->name);
            if (m->layers_suffix || m->steps_suffix)
                fail_msg("%s: a total has no value per evaluated step", m->name);
            break;
        case METRIC_TURN: /* a column of turns.csv only */
            assert_int_not_equal(m->applies, APPLIES_PROBES);
            if (m->summary || m->layers_suffix || m->steps_suffix)
                fail_msg("%s: a turn metric is in turns.csv only", m->name);
            continue;
        }
        assert_int_not_equal(m->applies, APPLIES_WHERE);
        if (!m->summary && !m->layers_suffix && !m->steps_suffix)
            fail_msg("%s: in no file", m->name);
    }
    assert_int_equal(per_kind[METRIC_HEAD], N_HEAD_METRICS);
    assert_int_equal(per_kind[METRIC_STEP], N_STEP_METRICS);
    assert_int_equal(per_kind[METRIC_TOTAL], N_TOTAL_METRICS);
    assert_int_equal(per_kind[METRIC_TURN], N_TURN_METRICS);

    MetricColumn cols[METRIC_MAX_COLUMNS];
    for (int o = 0; o < N_OUTPUTS; o++) {
        int n = metric_output_columns((MetricOutput)o, cols);
        assert_true(n > 0 && n <= METRIC_MAX_COLUMNS);
        for (int i = 0; i < n; i++) {
            /* not truncated: the name is the metric's name and its suffix */
            assert_true(strlen(cols[i].name) + 1 < METRIC_NAME_MAX);
            if (cols[i].metric)
                assert_memory_equal(cols[i].name, cols[i].metric->name,
                                    strlen(cols[i].metric->name));
            for (int j = 0; j < i; j++)
                if (!strcmp(cols[i].name, cols[j].name))
                    fail_msg("%s: column %s twice", metric_output_file((MetricOutput)o),
                             cols[i].name);
        }
        bool keys_done = false;
        for (int i = 0; i < n; i++) {
            if (cols[i].metric)
                keys_done = true;
            else if (keys_done)
                fail_msg("%s: key column %s after a metric column",
                         metric_output_file((MetricOutput)o), cols[i].name);
        }
        char header[METRIC_HEADER_MAX];
        metric_output_header((MetricOutput)o, header);
        int commas = 0;
        for (const char *p = header; *p; p++)
            commas += *p == ',';
        assert_int_equal(commas + 1, n);
    }
}

/* ---- Every file of report_write_csv ---- */

typedef struct {
    int policies, layers, heads, evals;
    bool probes;   /* every other evaluated step is a probe step with needle tokens */
    bool restores; /* the second policy restored tokens */
} Shape;

/* A value for every slot, as the engine would record it: finite, counts whole (and large, to
 * see that they are not printed with an exponent), NaN where a metric does not apply. */
static double slot_value(const Metric *m, int pi, int l, int e, int h)
{
    if (m->format == METRIC_COUNT)
        return 2202009.0 * (pi + 1) + 64.0 * l + e + h;
    return 0.5 / (1 + pi + l + e + h + m->slot);
}

static Results *make_results(const Shape *sh)
{
    Results *r = kv_calloc(1, sizeof *r);
    r->n_policies = sh->policies, r->n_layers = sh->layers, r->n_q_heads = sh->heads;
    r->n_kv_heads = 1, r->n_prompt = 100, r->n_evals = sh->evals, r->n_steps = 2 * sh->evals;
    r->n_tokens = r->n_prompt + r->n_steps;
    r->eval_step = kv_malloc((size_t)sh->evals * sizeof *r->eval_step);
    r->eval_probe = kv_calloc((size_t)sh->evals, sizeof *r->eval_probe);
    for (int e = 0; e < sh->evals; e++) {
        r->eval_step[e] = r->n_prompt + 2 * e;
        r->eval_probe[e] = sh->probes && e % 2 == 1;
    }
    r->label = kv_calloc((size_t)sh->policies, sizeof *r->label);
    r->type = kv_calloc((size_t)sh->policies, sizeof *r->type);
    r->is_oracle = kv_calloc((size_t)sh->policies, sizeof *r->is_oracle);
    for (int pi = 0; pi < sh->policies; pi++) {
        snprintf(r->label[pi], sizeof r->label[pi], "p%d", pi); /* no field needs quoting */
        r->type[pi] = policy_find("window");
        assert_non_null(r->type[pi]);
    }
    size_t slots = (size_t)sh->policies * sh->layers * sh->evals;
    r->total = kv_calloc((size_t)sh->policies * sh->layers * N_TOTAL_METRICS, sizeof *r->total);
    /* Two turns, the evaluated steps split between them; the second's decode steps hold no
     * evaluated step when there is one evaluated step. Unknown model size: dense FLOPs do not
     * apply. */
    r->n_turns = 2;
    r->turns = kv_calloc(2, sizeof *r->turns);
    r->turns[0] = (RunTurn){.prefill_start = 0, .context_tokens = 100, .decode_steps = 10,
                            .prefill_tokens = 100, .attn_flops = 4096, .dense_flops = NAN};
    r->turns[1] = (RunTurn){.prefill_start = 110, .context_tokens = 120, .decode_steps = 10,
                            .prefill_tokens = 10, .served_tokens = 110, .attn_flops = 2202009,
                            .dense_flops = NAN};
    r->eval_turn = kv_malloc((size_t)sh->evals * sizeof *r->eval_turn);
    for (int e = 0; e < sh->evals; e++)
        r->eval_turn[e] = e < (sh->evals + 1) / 2 ? 0 : 1;
    r->turn_bytes = kv_calloc((size_t)sh->policies * sh->layers * 2, sizeof *r->turn_bytes);
    assert_int_equal(results_spill_open(r, true, NULL), 0);
    for (size_t i = 0; i < slots * TURN_DISTANCES; i++) {
        size_t rec = i / TURN_DISTANCES; /* [policy][layer][eval] */
        int e = (int)(rec % sh->evals), l = (int)(rec / sh->evals % sh->layers);
        int pi = (int)(rec / sh->evals / sh->layers);
        assert_int_equal(results_set_step_at(r, pi, l, e, STEP_NEEDLE + (int)(i % TURN_DISTANCES),
                                             sh->probes && i % TURN_DISTANCES == 0 ? 0.25 : NAN,
                                             NULL),
                         0);
    }
    for (int i = 0; i < N_METRICS; i++) {
        const Metric *m = &metric_table[i];
        if (m->kind == METRIC_TURN)
            continue; /* reduced from the records above */
        for (int pi = 0; pi < sh->policies; pi++)
            for (int l = 0; l < sh->layers; l++) {
                if (m->kind == METRIC_TOTAL) {
                    bool restored = sh->restores && pi == 1;
                    double v = slot_value(m, pi, l, 0, 0);
                    if (m->slot == TM_RESTORED_TOKENS)
                        v = restored ? 7 : 0;
                    else if (m->summary & ST_PER_RESTORED)
                        v = restored ? v : 0;
                    results_total(r, pi, l)[m->slot] = v;
                    continue;
                }
                for (int e = 0; e < sh->evals; e++) {
                    bool applies = m->applies == APPLIES_ALWAYS || r->eval_probe[e];
                    if (m->kind == METRIC_STEP)
                        assert_int_equal(results_set_step_at(r, pi, l, e, m->slot,
                                                             applies ? slot_value(m, pi, l, e, 0)
                                                                     : NAN,
                                                             NULL),
                                         0);
                    else
                        for (int h = 0; h < sh->heads; h++)
                            assert_int_equal(
                                results_set_head_at(r, pi, l, e, h, m->slot,
                                                    applies ? (float)slot_value(m, pi, l, e, h)
                                                            : NAN,
                                                    NULL),
                                0);
                }
            }
    }
    return r;
}

/* The fields of one line of a file whose text fields need no quoting, in place. */
static int split_line(char *line, char **fields, int cap)
{
    int n = 0;
    for (char *p = line;; p++) {
        if (n == cap)
            fail_msg("more than %d fields: '%s'", cap, line);
        fields[n++] = p;
        p += strcspn(p, ",");
        if (!*p)
            return n;
        *p = '\0';
    }
}

static void check_outputs(const Shape *sh)
{
    Results *r = make_results(sh);
    PolicySummary *s = kv_calloc((size_t)sh->policies, sizeof *s);
    report_summarize(r, s);
    char *dir = scratch_create();
    KvErr err;
    if (report_write_csv(r, s, dir, &err) != 0)
        fail_msg("report_write_csv: %s", err.msg);
    assert_int_equal(scratch_count(dir), N_OUTPUTS); /* one file per output, no temporary */
    const int rows[N_OUTPUTS] = {
        [OUT_SUMMARY] = sh->policies,
        [OUT_LAYERS] = sh->policies * sh->layers,
        [OUT_STEPS] = sh->policies * sh->evals,
        [OUT_TURNS] = sh->policies * 2,
    };
    MetricColumn cols[METRIC_MAX_COLUMNS];
    char *fields[METRIC_MAX_COLUMNS + 1];
    for (int o = 0; o < N_OUTPUTS; o++) {
        const char *file = metric_output_file((MetricOutput)o);
        int n = metric_output_columns((MetricOutput)o, cols);
        char header[METRIC_HEADER_MAX];
        metric_output_header((MetricOutput)o, header);
        char *text = scratch_read(scratch_path(dir, file, 0));
        int lines = 0;
        for (char *line = text, *end; *line; line = end + 1, lines++) {
            end = strchr(line, '\n');
            if (!end)
                fail_msg("%s: the last row has no line end", file);
            *end = '\0';
            if (lines == 0 && strcmp(line, header))
                fail_msg("%s: header '%s', the table gives '%s'", file, line, header);
            int nf = split_line(line, fields, METRIC_MAX_COLUMNS + 1);
            if (nf != n)
                fail_msg("%s: line %d has %d fields, the header %d", file, lines + 1, nf, n);
            for (int i = 0; lines > 0 && i < n; i++)
                if (!*fields[i] && !cols[i].optional)
                    fail_msg("%s: line %d: column %s is empty but always applies", file,
                             lines + 1, cols[i].name);
        }
        assert_int_equal(lines, 1 + rows[o]);
        free(text);
    }
    scratch_remove(dir);
    free(s);
    results_free(r);
}

static void test_every_row_as_wide_as_its_header(void **state)
{
    (void)state;
    const Shape shapes[] = {
        {.policies = 2, .layers = 3, .heads = 2, .evals = 4, .probes = true, .restores = true},
        {.policies = 2, .layers = 2, .heads = 4, .evals = 3, .probes = false, .restores = false},
        {.policies = 1, .layers = 1, .heads = 1, .evals = 1, .probes = false, .restores = false},
        {.policies = 3, .layers = 1, .heads = 3, .evals = 2, .probes = true, .restores = false},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        check_outputs(&shapes[i]);
}

/* ---- docs/metrics.md ---- */

/* The column names docs/metrics.md lists for `file`: in the section headed "### FILE", the first
 * cell of each row of its table (after the header row and the |---| row), split at commas,
 * spaces and backquotes trimmed. Returns how many; names[i] point into text. */
static int documented_columns(char *text, const char *file, char **names, int cap)
{
    char heading[128];
    snprintf(heading, sizeof heading, "### %s", file);
    char *line = text;
    size_t hl = strlen(heading);
    while (line && !(strncmp(line, heading, hl) == 0 && (line[hl] == ' ' || line[hl] == '\n')))
        line = (line = strchr(line, '\n')) ? line + 1 : NULL;
    if (!line)
        fail_msg("docs/metrics.md: no section '%s'", heading);
    int n = 0, table_rows = 0;
    for (line = strchr(line, '\n') + 1; *line && *line != '#';) {
        char *end = strchr(line, '\n');
        if (!end)
            end = line + strlen(line);
        int row = *line == '|' ? table_rows++ : -1;
        if (row == 1 && strncmp(line, "|---", 4) != 0)
            fail_msg("docs/metrics.md, %s: the table's second row is not |---|", file);
        if (row >= 2) { /* a row after the header and the |---| */
            char *cell = line + 1;
            char *cell_end = strchr(cell, '|');
            if (!cell_end || cell_end > end)
                fail_msg("docs/metrics.md, %s: a table row without a second '|'", file);
            *cell_end = '\0';
            for (char *name = strtok(cell, ","); name; name = strtok(NULL, ",")) {
                name += strspn(name, " `");
                size_t len = strlen(name);
                while (len > 0 && strchr(" `", name[len - 1]))
                    len--;
                name[len] = '\0';
                if (n == cap)
                    fail_msg("docs/metrics.md, %s: more than %d columns", file, cap);
                names[n++] = name;
            }
        }
        line = *end ? end + 1 : end;
    }
    if (table_rows < 3)
        fail_msg("docs/metrics.md, %s: no table of columns", file);
    return n;
}

static char *read_docs(void)
{
    const char *src = getenv("KVSIM_SOURCE_DIR");
    if (!src)
        fail_msg("KVSIM_SOURCE_DIR is not set (run the tests through ctest)");
    char path[4096];
    snprintf(path, sizeof path, "%s/docs/metrics.md", src);
    char *text = scratch_read(path);
    if (!*text)
        fail_msg("cannot read %s", path);
    return text;
}

static void test_docs_list_the_columns(void **state)
{
    (void)state;
    MetricColumn cols[METRIC_MAX_COLUMNS];
    char *names[METRIC_MAX_COLUMNS + 1];
    for (int o = 0; o < N_OUTPUTS; o++) {
        const char *file = metric_output_file((MetricOutput)o);
        char *text = read_docs();
        int n = metric_output_columns((MetricOutput)o, cols);
        int nd = documented_columns(text, file, names, METRIC_MAX_COLUMNS + 1);
        for (int i = 0; i < n || i < nd; i++)
            if (i >= n || i >= nd || strcmp(cols[i].name, names[i]))
                fail_msg("docs/metrics.md, %s: column %d is '%s', the table's is '%s'", file,
                         i + 1, i < nd ? names[i] : "(none)", i < n ? cols[i].name : "(none)");
        free(text);
    }
    /* and documents no other file of `kvsim run` */
    char *text = read_docs();
    for (char *line = text; line; line = (line = strchr(line, '\n')) ? line + 1 : NULL) {
        if (strncmp(line, "### ", 4) != 0)
            continue;
        size_t len = strcspn(line + 4, " \n");
        bool known = false;
        for (int o = 0; o < N_OUTPUTS; o++)
            known |= strlen(metric_output_file((MetricOutput)o)) == len &&
                     !strncmp(line + 4, metric_output_file((MetricOutput)o), len);
        if (!known && len > 4 && !strncmp(line + 4 + len - 4, ".csv", 4))
            fail_msg("docs/metrics.md documents %.*s, which the table does not write", (int)len,
                     line + 4);
    }
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table_is_well_formed),
        cmocka_unit_test(test_every_row_as_wide_as_its_header),
        cmocka_unit_test(test_docs_list_the_columns),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
