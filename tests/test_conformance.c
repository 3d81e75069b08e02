/* The conformance suite: every policy type in the registry, at every parameter setting its
 * PolicyType lists (`conformance`), on a synthetic trace with GQA (group 2), a system-prompt
 * segment, needles, probes and tied keys, fed in each of three layouts (one prompt then decode,
 * fed whole; two turns, prefill, decode, prefill, decode, fed whole; the same in chunks of 7
 * tokens, which divide no span), must keep these properties:
 *
 *   budget       at every decode step each KV head's cache holds at most max_slots(t) slots,
 *                and only positions <= t;
 *   isolation    its rows of summary.csv, layers.csv and steps.csv are byte-identical whether
 *                it runs alone or next to every other setting of every type;
 *   no future    (non-oracles) it never reads Q/K/V, tokens, positions, segments, needles or
 *                probes of positions after the chunk or step being fed: driven on a trace whose
 *                every position is NaN / garbage until it arrives (a prefill chunk, a decode
 *                step), it makes exactly the decisions it makes on the clean trace; it never
 *                gets the true attention;
 *   determinism  the CSVs of the run with every setting are identical at 1, 2 and 3 threads and
 *                across two runs;
 *   memory       device bytes = live slots at kv_bits, allocated >= device, host bytes and
 *                bytes moved never negative; the host tier grows by at most what was moved to
 *                it, and what moves back to the device was on the host;
 *   oracle bound oracle_topk with the policy's bound as budget retains at least the policy's
 *                attention mass at every step and KV head.
 *
 * A policy added to policies/registry.def is covered without new test code: it must fill
 * max_slots and conformance in its PolicyType, and its settings must give every parameter
 * (strings naming files aside) a non-default value somewhere. A failure names the property,
 * the policy setting, the layout, and where (layer, head, step). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/driver/driver.h"
#include "sim/replay/engine.h"
#include "sim/replay/report.h"
#include "tests/support/fixture.h"
#include "tests/support/mass_trace.h"
#include "tests/support/scratch.h"

enum { HQ = 4, HKV = 2, D = 16, T = 160, P = 96, LAYERS = 3, TOPK = 4, KV_BITS = 16 };
enum { SYSTEM_END = 12 };          /* segment 0 (system prompt) is [0, SYSTEM_END) */
enum { HIDDEN = 48, INTERMEDIATE = 80 }; /* the model's size the trace states */
static const double PREFILL_TFLOPS = 0.5; /* [run] prefill_tflops of every replay */
enum { MAX_SETTINGS = 128 };
static const uint64_t SEED = 2024;

/* One policy setting under test. */
typedef struct {
    const PolicyType *type;
    const char *params; /* "key=value ..." */
    char label[64];     /* type_index */
    void *prm;          /* parsed parameter struct */
} Setting;

/* ---- The synthetic trace and the layouts it is fed in ---- */

typedef struct {
    const char *name;
    int n_spans;
    TraceSpan spans[4];
    int prefill_chunk;
} Layout;

/* The second turn's prefill holds a needle and a probe (not evaluated: it is no decode step). */
static const Layout LAYOUTS[] = {
    {"one prompt", 2, {{SPAN_PREFILL, 0, P}, {SPAN_DECODE, P, T}}, 0},
    {"two turns",
     4,
     {{SPAN_PREFILL, 0, P}, {SPAN_DECODE, P, 120}, {SPAN_PREFILL, 120, 140}, {SPAN_DECODE, 140, T}},
     0},
    {"two turns in chunks of 7",
     4,
     {{SPAN_PREFILL, 0, P}, {SPAN_DECODE, P, 120}, {SPAN_PREFILL, 120, 140}, {SPAN_DECODE, 140, T}},
     7},
};
enum { N_LAYOUTS = sizeof LAYOUTS / sizeof LAYOUTS[0] };

typedef struct {
    Setting set[MAX_SETTINGS];
    int n;
    char *dir;
    char trace[N_LAYOUTS][4200]; /* the conformance trace with each layout's spans */
} Suite;

/* Needles [20,24), [60,63) in the prompt and [120,123) in the decode; probes inside the decode. */
static const int32_t NEEDLES[] = {20, 24, 60, 63, 120, 123};
static const int32_t PROBES[] = {P + 10, 130, T - 1};

static void fill_meta(TraceMeta *m)
{
    for (int i = 0; i < T; i++) {
        m->tokens[i] = (i * 7919) % 3000;
        m->positions[i] = i;
        m->segments[i] = i < SYSTEM_END ? 0 : 1;
    }
    free(m->needles);
    free(m->probes);
    m->n_needles = 3;
    m->needles = kv_malloc(sizeof NEEDLES);
    memcpy(m->needles, NEEDLES, sizeof NEEDLES);
    m->n_probes = 3;
    m->probes = kv_malloc(sizeof PROBES);
    memcpy(m->probes, PROBES, sizeof PROBES);
}

/* Layer l's Q/K/V: random, then ties: keys and values of positions 31..33 copy position 30's (in
 * every KV head), and 70..71 copy 69's, so scores tie exactly wherever they come from K or V. */
static void fill_layer(Fixture *fx, int l)
{
    fixture_randomize(fx, SEED + (uint64_t)l, 1.0);
    for (int g = 0; g < HKV; g++) {
        for (int j = 31; j <= 33; j++) {
            memcpy(fx_k(fx, g, j), fx_k(fx, g, 30), D * sizeof(float));
            memcpy(fx_v(fx, g, j), fx_v(fx, g, 30), D * sizeof(float));
        }
        for (int j = 70; j <= 71; j++) {
            memcpy(fx_k(fx, g, j), fx_k(fx, g, 69), D * sizeof(float));
            memcpy(fx_v(fx, g, j), fx_v(fx, g, 69), D * sizeof(float));
        }
    }
}

static Fixture *new_fixture(const Layout *lay)
{
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fill_meta(&fx->meta);
    fill_layer(fx, 0);
    fixture_set_spans(fx, lay->spans, lay->n_spans);
    fx->prefill_chunk = lay->prefill_chunk;
    return fx;
}

static SpanKind kind_at(const TraceMeta *m, int pos)
{
    for (int s = 0; s < m->n_spans; s++)
        if (pos >= m->spans[s].start && pos < m->spans[s].end)
            return (SpanKind)m->spans[s].kind;
    fail_msg("position %d is in no span", pos);
    return SPAN_DECODE;
}

static void write_trace(const char *path, const Layout *lay)
{
    Fixture *fx = new_fixture(lay);
    TraceMeta meta;
    fixture_trace_meta(fx, LAYERS, "conformance suite", &meta);
    meta.hidden_size = HIDDEN; /* a model size, for turns.csv's dense FLOPs */
    meta.intermediate_size = INTERMEDIATE;
    KvErr err;
    TraceWriter *w = trace_writer_create(path, &meta, TRACE_F32, &err);
    if (!w)
        fail_msg("%s", err.msg);
    for (int l = 0; l < LAYERS; l++) {
        fill_layer(fx, l);
        if (trace_writer_put_qkv(w, l, 0, T, fx->q, fx->k, fx->v, &err) != 0)
            fail_msg("%s", err.msg);
    }
    if (trace_writer_finish(w, &err) != 0)
        fail_msg("%s", err.msg);
    trace_meta_free(&meta);
    fixture_free(fx);
}

/* ---- Settings from the registry ---- */

/* The value `key` gets in a setting string, or NULL. */
static bool setting_value(const char *params, const char *key, char *out, size_t n)
{
    size_t klen = strlen(key);
    for (const char *s = params; *s;) {
        while (*s == ' ')
            s++;
        const char *end = strchr(s, ' ');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        if (len > klen && strncmp(s, key, klen) == 0 && s[klen] == '=') {
            snprintf(out, n, "%.*s", (int)(len - klen - 1), s + klen + 1);
            return true;
        }
        s += len;
    }
    return false;
}

static int suite_setup(void **state)
{
    Suite *s = kv_calloc(1, sizeof *s);
    int n_types;
    const PolicyType *const *types = policy_types(&n_types);
    for (int i = 0; i < n_types; i++) {
        const PolicyType *type = types[i];
        if (!type->max_slots || !type->conformance || !type->conformance[0])
            fail_msg("policy %s: its PolicyType must set max_slots and conformance (see "
                     "policies/policy.h)", type->name);
        for (int j = 0; type->conformance[j]; j++) {
            if (s->n == MAX_SETTINGS)
                fail_msg("more than %d conformance settings", MAX_SETTINGS);
            Setting *st = &s->set[s->n++];
            st->type = type;
            st->params = type->conformance[j];
            snprintf(st->label, sizeof st->label, "%s_%d", type->name, j);
            st->prm = fixture_params(type, st->params);
        }
    }
    s->dir = scratch_create();
    for (int l = 0; l < N_LAYOUTS; l++) {
        char name[64];
        snprintf(name, sizeof name, "conformance-%d.h5", l);
        snprintf(s->trace[l], sizeof s->trace[l], "%s", scratch_path(s->dir, name, 0));
        write_trace(s->trace[l], &LAYOUTS[l]);
    }
    *state = s;
    return 0;
}

static int suite_teardown(void **state)
{
    Suite *s = *state;
    for (int i = 0; i < s->n; i++)
        free(s->set[i].prm);
    scratch_remove(s->dir);
    free(s);
    return 0;
}

/* Every int, double, bool and enum parameter of every type takes a non-default value in at
 * least one of its settings (else that parameter's behaviour is never checked). */
static void test_settings_cover_every_parameter(void **state)
{
    Suite *s = *state;
    int n_types;
    const PolicyType *const *types = policy_types(&n_types);
    for (int i = 0; i < n_types; i++)
        for (const ParamSpec *ps = types[i]->params; ps && ps->key; ps++) {
            if (ps->kind == PARAM_STRING)
                continue;
            bool covered = false;
            for (int j = 0; j < s->n && !covered; j++) {
                char v[128];
                covered = s->set[j].type == types[i] &&
                          setting_value(s->set[j].params, ps->key, v, sizeof v) &&
                          strcmp(v, ps->dflt) != 0;
            }
            if (!covered)
                fail_msg("policy %s: no conformance setting gives parameter %s a non-default "
                         "value", types[i]->name, ps->key);
        }
}

/* ---- Budget, memory and no future: one layer, driven by the tests' own driver ---- */

typedef struct {
    const Setting *st;
    const Layout *lay;
    const Fixture *fx;
    /* decisions: per step and KV head, the sorted real positions and the synthetic count */
    int32_t *log;
    size_t n_log, cap_log;
    double host_before; /* host bytes after the previous step */
    /* no-future: the clean trace the hidden one is revealed from */
    const Fixture *clean;
} Drive;

static void log_push(Drive *d, int32_t v)
{
    if (d->n_log == d->cap_log) {
        d->cap_log = d->cap_log ? 2 * d->cap_log : 4096;
        d->log = kv_realloc(d->log, d->cap_log * sizeof *d->log);
    }
    d->log[d->n_log++] = v;
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* After query t attended: the budget, the positions, the decisions. */
static void check_step(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    Drive *d = ud;
    const Setting *st = d->st;
    long bound = st->type->max_slots(st->prm, &d->fx->L, t);
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        if (c->n > bound)
            fail_msg("budget: %s (%s), %s: layer 0, KV head %d, step %d: %d slots > max_slots %ld",
                     st->label, st->params, d->lay->name, g, t, c->n, bound);
        int32_t *pos = kv_malloc((size_t)(c->n + 1) * sizeof *pos);
        int n_real = 0, n_syn = 0;
        for (int i = 0; i < c->n; i++) {
            if (c->pos[i] > t)
                fail_msg("no future: %s (%s), %s: KV head %d, step %d caches position %d",
                         st->label, st->params, d->lay->name, g, t, c->pos[i]);
            if (c->pos[i] >= 0)
                pos[n_real++] = c->pos[i];
            else
                n_syn++;
        }
        qsort(pos, (size_t)n_real, sizeof *pos, cmp_i32);
        log_push(d, t);
        log_push(d, n_syn);
        log_push(d, n_real);
        for (int i = 0; i < n_real; i++)
            log_push(d, pos[i]);
        free(pos);
    }
}

/* The memory report of the call before positions [t0, t1) arrive: a decode step's, checked in
 * full, or a prefill chunk's, whose transfers a policy may report with the next decode step (the
 * totals cover decode steps): there what it left on the host is the next starting point. */
static void check_memory(int t0, int t1, const Policy *p, void *ud)
{
    (void)t1;
    Drive *d = ud;
    const Setting *st = d->st;
    if (t0 == 0)
        return; /* nothing came before */
    MemReport m;
    policy_memory_report(p, D, KV_BITS, &m);
    bool after_prefill = kind_at(&d->fx->meta, t0 - 1) == SPAN_PREFILL;
    double live = 0;
    for (int g = 0; g < p->n_kv_heads; g++)
        live += p->cache[g].n;
    const char *what = NULL;
    if (m.device_bytes != kv_entry_bytes(live, D, KV_BITS))
        what = "device bytes differ from the live slots at kv_bits";
    else if (m.allocated_bytes < m.device_bytes)
        what = "allocated bytes below device bytes";
    else if (m.host_bytes < 0 || m.to_host_bytes < 0 || m.to_device_bytes < 0 ||
             m.fetched_tokens < 0 || m.restored_tokens < 0)
        what = "a negative byte or token count";
    else if (after_prefill)
        what = NULL;
    else if (m.host_bytes > d->host_before + m.to_host_bytes + 1e-9)
        what = "the host tier grew by more than was moved to it";
    else if (m.to_device_bytes > d->host_before + m.to_host_bytes + 1e-9)
        what = "more bytes moved to the device than the host tier held";
    else if ((m.fetched_tokens > 0 || m.restored_tokens > 0) && m.to_device_bytes <= 0)
        what = "tokens came from the host tier but no bytes moved";
    if (what)
        fail_msg("memory: %s (%s), %s: %s %d: %s (device %.0f, live slots %.0f, allocated %.0f, "
                 "host %.0f, previous host %.0f, to host %.0f, to device %.0f)",
                 st->label, st->params, d->lay->name,
                 after_prefill ? "prefill chunk ending at" : "step", t0 - 1, what, m.device_bytes,
                 live, m.allocated_bytes, m.host_bytes, d->host_before, m.to_host_bytes,
                 m.to_device_bytes);
    d->host_before = m.host_bytes;
}

static Policy *create_on(const Setting *st, Fixture *fx)
{
    KvErr err;
    PolicyEnv env = {.seed = policy_instance_seed(SEED, st->label, 0), .kv_bits = KV_BITS};
    Policy *p = st->type->create(st->prm, &fx->L, &env, &err);
    if (!p)
        fail_msg("%s (%s): create: %s", st->label, st->params, err.msg);
    return p;
}

static void drive(const Setting *st, const Layout *lay, Fixture *fx, FixtureBeforeFn before,
                  Drive *d)
{
    d->st = st;
    d->lay = lay;
    d->fx = fx;
    Policy *p = create_on(st, fx);
    if (p->want_decode_mass && !p->is_oracle)
        fail_msg("no future: %s asks for the decode attention but is not an oracle", st->label);
    fixture_run_hooked(fx, p, T, before, check_step, d);
    p->type->destroy(p);
}

static void test_budget_and_memory(void **state)
{
    Suite *s = *state;
    for (int l = 0; l < N_LAYOUTS; l++) {
        Fixture *fx = new_fixture(&LAYOUTS[l]);
        for (int i = 0; i < s->n; i++) {
            Drive d = {0};
            drive(&s->set[i], &LAYOUTS[l], fx, check_memory, &d);
            free(d.log);
        }
        fixture_free(fx);
    }
}

/* Hides everything of every position; reveal() then shows positions as they arrive. */
static void hide_future(Fixture *fx)
{
    TraceMeta *m = &fx->meta;
    for (int h = 0; h < HQ; h++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < D; i++)
                fx_q(fx, h, t)[i] = NAN;
    for (int g = 0; g < HKV; g++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < D; i++)
                fx_k(fx, g, t)[i] = fx_v(fx, g, t)[i] = NAN;
    for (int t = 0; t < T; t++) {
        m->tokens[t] = -12345;
        m->positions[t] = -1000000;
        m->segments[t] = 0; /* the future poses as system prompt */
    }
    m->n_needles = 0;
    m->n_probes = 0;
}

/* Positions [t0, t1) arrive: a prefill chunk or a decode step. */
static void reveal(int t0, int t1, const Policy *p, void *ud)
{
    (void)p;
    Drive *d = ud;
    Fixture *fx = (Fixture *)d->fx;
    const Fixture *c = d->clean;
    TraceMeta *m = &fx->meta;
    for (int t = t0; t < t1; t++) {
        for (int h = 0; h < HQ; h++)
            memcpy(fx_q(fx, h, t), fx_q((Fixture *)c, h, t), D * sizeof(float));
        for (int g = 0; g < HKV; g++) {
            memcpy(fx_k(fx, g, t), fx_k((Fixture *)c, g, t), D * sizeof(float));
            memcpy(fx_v(fx, g, t), fx_v((Fixture *)c, g, t), D * sizeof(float));
        }
        m->tokens[t] = c->meta.tokens[t];
        m->positions[t] = c->meta.positions[t];
        m->segments[t] = c->meta.segments[t];
    }
    if (t1 == t0)
        return;
    m->n_needles = 0;
    for (int i = 0; i < c->meta.n_needles; i++)
        m->n_needles += c->meta.needles[2 * i] < t1;
    m->n_probes = 0;
    for (int i = 0; i < c->meta.n_probes; i++)
        m->n_probes += c->meta.probes[i] < t1;
}

static void test_no_future(void **state)
{
    Suite *s = *state;
    for (int l = 0; l < N_LAYOUTS; l++) {
        const Layout *lay = &LAYOUTS[l];
        Fixture *clean = new_fixture(lay);
        for (int i = 0; i < s->n; i++) {
            const Setting *st = &s->set[i];
            Drive plain = {0}, hidden = {.clean = clean};
            drive(st, lay, clean, NULL, &plain);
            Fixture *fx = new_fixture(lay);
            hide_future(fx);
            Policy *probe = create_on(st, fx);
            bool oracle = probe->is_oracle;
            probe->type->destroy(probe);
            if (!oracle) {
                drive(st, lay, fx, reveal, &hidden);
                /* Records (t, synthetic, n_real, positions...) per step and KV head, in order. */
                size_t a = 0, b = 0;
                for (int rec = 0; a < plain.n_log; rec++) {
                    size_t len = 3 + (size_t)plain.log[a + 2];
                    if (b + len > hidden.n_log ||
                        memcmp(plain.log + a, hidden.log + b, len * sizeof *plain.log) != 0)
                        fail_msg("no future: %s (%s), %s: decides differently when positions "
                                 "not yet fed are hidden: step %d, KV head %d",
                                 st->label, st->params, lay->name, plain.log[a], rec % HKV);
                    a += len;
                    b += len;
                }
                assert_int_equal(b, hidden.n_log);
            }
            free(plain.log);
            free(hidden.log);
            fixture_free(fx);
        }
        fixture_free(clean);
    }
}

/* ---- Oracle bound ---- */

static void oracle_bound_on(const Suite *s, const Layout *lay)
{
    Fixture *fx = new_fixture(lay);
    int steps = T - P; /* mass_trace_run's rows: t - P for each decode step t */
    double *pol = kv_calloc((size_t)steps * HKV, sizeof *pol);
    double *orc = kv_calloc((size_t)steps * HKV, sizeof *orc);
    for (int i = 0; i < s->n; i++) {
        const Setting *st = &s->set[i];
        Policy *probe = create_on(st, fx);
        bool oracle = probe->is_oracle;
        probe->type->destroy(probe);
        if (oracle)
            continue;
        long bound = 0;
        for (int t = P; t < T; t++) {
            long b = st->type->max_slots(st->prm, &fx->L, t);
            bound = b > bound ? b : bound;
        }
        char params[64];
        snprintf(params, sizeof params, "budget=%ld", bound);
        mass_trace_run(fx, st->type->name, st->params, policy_instance_seed(SEED, st->label, 0),
                       pol);
        mass_trace_run(fx, "oracle_topk", params, 1, orc);
        for (int t = 0; t < steps; t++)
            for (int g = 0; g < HKV; g++)
                if (orc[t * HKV + g] < pol[t * HKV + g] - 1e-6)
                    fail_msg("oracle bound: %s (%s), %s: step %d, KV head %d: oracle_topk "
                             "(budget %ld) retains %.9g < %.9g",
                             st->label, st->params, lay->name, P + t, g, bound, orc[t * HKV + g],
                             pol[t * HKV + g]);
    }
    free(pol);
    free(orc);
    fixture_free(fx);
}

static void test_oracle_topk_bounds_every_policy(void **state)
{
    Suite *s = *state;
    for (int l = 0; l < N_LAYOUTS; l++)
        oracle_bound_on(s, &LAYOUTS[l]);
}


/* ---- Isolation and determinism: the replay engine and the CSV writers ---- */

static void replay_history(const Suite *s, const Layout *lay, const Setting *const *sel, int n,
                           int threads, RunHistory history, const char *out)
{
    PolicySpec *spec = kv_calloc((size_t)n, sizeof *spec);
    for (int i = 0; i < n; i++) {
        snprintf(spec[i].label, sizeof spec[i].label, "%s", sel[i]->label);
        spec[i].type = sel[i]->type;
        spec[i].params = sel[i]->prm;
    }
    EngineConfig cfg = {.threads = threads, .topk = TOPK, .eval_every = 1, .kv_bits = KV_BITS,
                        .prefill_chunk = lay->prefill_chunk, .history = history, .seed = SEED,
                        .prefill_tflops = PREFILL_TFLOPS, .n_policies = n, .policies = spec};
    KvErr err;
    Trace *tr = trace_open(s->trace[lay - LAYOUTS], &err);
    if (!tr)
        fail_msg("%s", err.msg);
    Results *r = engine_run(tr, &cfg, &err);
    if (!r)
        fail_msg("replay: %s", err.msg);
    PolicySummary *sum = kv_calloc((size_t)n, sizeof *sum);
    report_summarize(r, sum);
    if (report_write_csv(r, sum, out, &err) != 0)
        fail_msg("%s", err.msg);
    free(sum);
    results_free(r);
    trace_close(tr);
    free(spec);
}

static void replay_to(const Suite *s, const Layout *lay, const Setting *const *sel, int n,
                      int threads, const char *out)
{
    replay_history(s, lay, sel, n, threads, HISTORY_PERSIST, out);
}

/* The files of a run; the first N_ATTENTION_CSVS hold only what the policies keep (turns.csv
 * also the history mode's costs). */
static const char *const CSVS[] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv"};
enum { N_ATTENTION_CSVS = 3 };

/* The lines of `csv` whose first field is `label`, concatenated. */
static char *rows_of(const char *csv, const char *label)
{
    size_t cap = strlen(csv) + 1, n = 0, len = strlen(label);
    char *out = kv_malloc(cap);
    for (const char *line = csv; *line;) {
        const char *end = strchr(line, '\n');
        size_t ll = end ? (size_t)(end - line + 1) : strlen(line);
        if (ll > len && strncmp(line, label, len) == 0 && line[len] == ',') {
            memcpy(out + n, line, ll);
            n += ll;
        }
        line += ll;
    }
    out[n] = '\0';
    return out;
}

static void isolation_on(const Suite *s, const Layout *lay)
{
    const Setting *all[MAX_SETTINGS];
    for (int i = 0; i < s->n; i++)
        all[i] = &s->set[i];
    char *together = scratch_create();
    replay_to(s, lay, all, s->n, 2, together);
    for (int i = 0; i < s->n; i++) {
        char *alone = scratch_create();
        replay_to(s, lay, &all[i], 1, 1, alone);
        for (size_t f = 0; f < sizeof CSVS / sizeof CSVS[0]; f++) {
            char *a = scratch_read(scratch_path(alone, CSVS[f], 0));
            char *b = scratch_read(scratch_path(together, CSVS[f], 1));
            char *ra = rows_of(a, s->set[i].label), *rb = rows_of(b, s->set[i].label);
            if (ra[0] == '\0')
                fail_msg("isolation: %s has no rows in %s", s->set[i].label, CSVS[f]);
            if (strcmp(ra, rb) != 0)
                fail_msg("isolation: %s (%s), %s: its rows of %s differ alone and next to every "
                         "other policy:\nalone:    %.300s\ntogether: %.300s",
                         s->set[i].label, s->set[i].params, lay->name, CSVS[f], ra, rb);
            free(ra);
            free(rb);
            free(a);
            free(b);
        }
        scratch_remove(alone);
    }
    scratch_remove(together);
}

static void test_isolation(void **state)
{
    for (int l = 0; l < N_LAYOUTS; l++)
        isolation_on(*state, &LAYOUTS[l]);
}

static void determinism_on(const Suite *s, const Layout *lay)
{
    const Setting *all[MAX_SETTINGS];
    for (int i = 0; i < s->n; i++)
        all[i] = &s->set[i];
    static const int threads[] = {1, 2, 3, 3};
    char *first = scratch_create();
    replay_to(s, lay, all, s->n, threads[0], first);
    for (size_t k = 1; k < sizeof threads / sizeof threads[0]; k++) {
        char *other = scratch_create();
        replay_to(s, lay, all, s->n, threads[k], other);
        for (size_t f = 0; f < sizeof CSVS / sizeof CSVS[0]; f++) {
            char *a = scratch_read(scratch_path(first, CSVS[f], 0));
            char *b = scratch_read(scratch_path(other, CSVS[f], 1));
            assert_true(strlen(a) > 0);
            if (strcmp(a, b) != 0)
                fail_msg("determinism: %s, %s: differs between %d and %d threads (run %zu)",
                         lay->name, CSVS[f], threads[0], threads[k], k);
            free(a);
            free(b);
        }
        scratch_remove(other);
    }
    scratch_remove(first);
}

/* [run] history: on a single prompt reencode is persist, byte for byte; on two turns `full` and
 * `window` keep the same tokens either way (every token; the sinks and the last ones), so their
 * rows are the same, while a policy that ranks by attention keeps other tokens when it sees the
 * whole history again; and a re-encoded run is the same at 1 and 3 threads. */
static void test_history_reencode(void **state)
{
    const Suite *s = *state;
    const Setting *all[MAX_SETTINGS];
    for (int i = 0; i < s->n; i++)
        all[i] = &s->set[i];
    for (int l = 0; l < N_LAYOUTS; l++) {
        const Layout *lay = &LAYOUTS[l];
        char *keep = scratch_create(), *again = scratch_create(), *again3 = scratch_create();
        replay_history(s, lay, all, s->n, 1, HISTORY_PERSIST, keep);
        replay_history(s, lay, all, s->n, 1, HISTORY_REENCODE, again);
        replay_history(s, lay, all, s->n, 3, HISTORY_REENCODE, again3);
        int differ = 0;
        for (size_t f = 0; f < N_ATTENTION_CSVS; f++) {
            char *a = scratch_read(scratch_path(keep, CSVS[f], 0));
            char *b = scratch_read(scratch_path(again, CSVS[f], 1));
            char *c = scratch_read(scratch_path(again3, CSVS[f], 2));
            if (strcmp(b, c) != 0)
                fail_msg("history = reencode, %s: %s differs between 1 and 3 threads", lay->name,
                         CSVS[f]);
            if (lay->n_spans == 2 && strcmp(a, b) != 0)
                fail_msg("history, %s: %s differs between persist and reencode on one prompt",
                         lay->name, CSVS[f]);
            for (int i = 0; i < s->n; i++) {
                char *ra = rows_of(a, s->set[i].label), *rb = rows_of(b, s->set[i].label);
                const char *type = s->set[i].type->name;
                bool same = strcmp(ra, rb) == 0;
                if (!same && (!strcmp(type, "full") || !strcmp(type, "window")))
                    fail_msg("history, %s: %s (%s) changes its rows of %s when re-encoding",
                             lay->name, s->set[i].label, s->set[i].params, CSVS[f]);
                differ += !same;
                free(ra);
                free(rb);
            }
            free(a);
            free(b);
            free(c);
        }
        if (lay->n_spans > 2 && differ == 0)
            fail_msg("history, %s: no policy's rows differ between persist and reencode",
                     lay->name);
        scratch_remove(keep);
        scratch_remove(again);
        scratch_remove(again3);
    }
}

/* ---- turns.csv and [run] history = prefix ---- */

/* The field `column` of the row of turns.csv (or summary.csv, turn < 0) whose policy is `label`
 * (and turn is `turn`), into out; fails when there is no such column or row. */
static const char *csv_field(const char *csv, const char *label, int turn, const char *column,
                             char *out, size_t n)
{
    char key[96];
    if (turn >= 0)
        snprintf(key, sizeof key, "%s,%d,", label, turn);
    else
        snprintf(key, sizeof key, "%s,", label);
    const char *eol = strchr(csv, '\n');
    int col = -1, i = 0;
    for (const char *f = csv; f < eol; i++) {
        size_t len = strcspn(f, ",\n");
        if (len == strlen(column) && strncmp(f, column, len) == 0)
            col = i;
        f += len + (f[len] == ',');
        if (f[-1] != ',')
            break;
    }
    if (col < 0)
        fail_msg("no column %s", column);
    for (const char *line = eol + 1; *line; line = strchr(line, '\n') + 1) {
        if (strncmp(line, key, strlen(key)) != 0)
            continue;
        const char *f = line;
        for (int c = 0; c < col; c++)
            f += strcspn(f, ",\n") + 1;
        size_t len = strcspn(f, ",\n");
        if (len >= n)
            fail_msg("field %s of %s too long", column, label);
        memcpy(out, f, len);
        out[len] = '\0';
        return out;
    }
    fail_msg("no row %s turn %d", label, turn);
    return NULL;
}

static int count_rows(const char *csv)
{
    int n = -1; /* the header */
    for (const char *c = csv; *c; c++)
        n += *c == '\n';
    return n;
}

static void expect_field(const char *csv, const char *label, int turn, const char *column,
                         const char *want, const char *where)
{
    char got[128];
    csv_field(csv, label, turn, column, got, sizeof got);
    if (strcmp(got, want) != 0)
        fail_msg("turns.csv, %s: %s turn %d: %s = '%s', expected '%s'", where, label, turn,
                 column, got, want);
}

static void expect_number(const char *csv, const char *label, int turn, const char *column,
                          double want, const char *where)
{
    char w[64];
    snprintf(w, sizeof w, want == floor(want) ? "%.0f" : "%.9g", want);
    expect_field(csv, label, turn, column, w, where);
}

/* Each layout in each history mode: turns.csv has a row per policy and prefill span; its counts
 * are the spans' (persist: the new tokens computed, the history served; reencode: the whole
 * history computed; prefix: all but the system prompt [0, SYSTEM_END)), its attention FLOPs
 * those of a global causal prefill over the computed queries, its dense part that of the
 * trace's model size, its time at the run's prefill throughput, the bytes `full` carries in are its whole cache, the system prompt or nothing. `full`'s
 * attention metrics are the same in the three modes; prefix drives the policies as reencode
 * does (the other files are byte-identical); on one prompt the three modes write the same four
 * files; a one-turn trace's turns.csv holds the summary's means; a needle is counted only from
 * its turn on; and prefix is the same at 1 and 3 threads. */
static void test_turns(void **state)
{
    const Suite *s = *state;
    const Setting *all[MAX_SETTINGS];
    const char *full = NULL;
    for (int i = 0; i < s->n; i++) {
        all[i] = &s->set[i];
        if (!full && !strcmp(s->set[i].type->name, "full"))
            full = s->set[i].label;
    }
    assert_non_null(full);
    static const RunHistory modes[] = {HISTORY_PERSIST, HISTORY_REENCODE, HISTORY_PREFIX};
    static const char *const mode_name[] = {"persist", "reencode", "prefix"};
    static const char *const FILES[] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv"};
    for (int l = 0; l < N_LAYOUTS; l++) {
        const Layout *lay = &LAYOUTS[l];
        char *dir[3], *csv[3][4];
        for (int m = 0; m < 3; m++) {
            dir[m] = scratch_create();
            replay_history(s, lay, all, s->n, 1, modes[m], dir[m]);
            for (int f = 0; f < 4; f++)
                csv[m][f] = scratch_read(scratch_path(dir[m], FILES[f], m));
        }
        int n_turns = 0;
        for (int sp = 0; sp < lay->n_spans; sp++)
            n_turns += lay->spans[sp].kind == SPAN_PREFILL;
        for (int m = 0; m < 3; m++) {
            char where[128];
            snprintf(where, sizeof where, "%s, history = %s", lay->name, mode_name[m]);
            const char *tc = csv[m][3];
            assert_int_equal(count_rows(tc), s->n * n_turns);
            int k = -1;
            for (int sp = 0; sp < lay->n_spans; sp++) {
                const TraceSpan *span = &lay->spans[sp];
                if (span->kind != SPAN_PREFILL)
                    continue;
                k++;
                int a = span->start, b = span->end;
                int decode = sp + 1 < lay->n_spans && lay->spans[sp + 1].kind == SPAN_DECODE
                                 ? lay->spans[sp + 1].end - lay->spans[sp + 1].start
                                 : 0;
                int from = k == 0 || modes[m] == HISTORY_PERSIST ? a : 0;
                int served = k == 0 ? 0
                             : modes[m] == HISTORY_PERSIST ? a
                             : modes[m] == HISTORY_PREFIX ? SYSTEM_END
                                                          : 0;
                double keys = 0;
                int computed = 0;
                for (int t = from; t < b; t++)
                    if (!(k > 0 && modes[m] == HISTORY_PREFIX && t < SYSTEM_END)) {
                        keys += t + 1;
                        computed++;
                    }
                double cache_bytes_per_token = (double)HKV * 2 * D * KV_BITS / 8 * LAYERS;
                double bytes_in = k == 0 ? 0
                                  : modes[m] == HISTORY_PERSIST ? a * cache_bytes_per_token
                                  : modes[m] == HISTORY_PREFIX ? SYSTEM_END * cache_bytes_per_token
                                                               : 0;
                for (int i = 0; i < s->n; i++) {
                    const char *lb = s->set[i].label;
                    expect_number(tc, lb, k, "prefill_start", a, where);
                    expect_number(tc, lb, k, "context_tokens", b, where);
                    expect_number(tc, lb, k, "decode_steps", decode, where);
                    expect_number(tc, lb, k, "prefill_tokens", computed, where);
                    expect_number(tc, lb, k, "served_tokens", served, where);
                    expect_number(tc, lb, k, "served_share", (double)served / b, where);
                    expect_number(tc, lb, k, "prefill_attn_flops", 4.0 * HQ * D * LAYERS * keys,
                                  where);
                    double dense = (double)computed * LAYERS *
                                   (2.0 * HIDDEN * D * (2 * HQ + 2 * HKV) +
                                    6.0 * HIDDEN * INTERMEDIATE);
                    expect_number(tc, lb, k, "prefill_dense_flops", dense, where);
                    expect_number(tc, lb, k, "prefill_seconds",
                                  (4.0 * HQ * D * LAYERS * keys + dense) / (PREFILL_TFLOPS * 1e12),
                                  where);
                    /* a needle is counted from its own turn on: no distance beyond the turn */
                    for (int d = k + 1; d < TURN_DISTANCES; d++) {
                        char col[32];
                        snprintf(col, sizeof col, "needle_survival_d%d", d);
                        expect_field(tc, lb, k, col, "", where);
                    }
                }
                expect_number(tc, full, k, "kv_bytes_in", bytes_in, where);
                expect_field(tc, full, k, "mass_mean", "1", where);
                expect_field(tc, full, k, "recall_mean", "1", where);
                expect_field(tc, full, k, "out_err_mean", "0", where);
                for (int d = 0; d <= k && d < TURN_DISTANCES; d++) {
                    char col[32];
                    snprintf(col, sizeof col, "needle_survival_d%d", d);
                    expect_field(tc, full, k, col, "1", where);
                }
            }
        }
        /* full's attention metrics are the same in every mode; prefix is reencode for the
         * policies; one prompt: the three modes are the same, every file */
        for (int k = 0; k < n_turns; k++) {
            static const char *const cols[] = {"mass_mean", "recall_mean", "out_err_mean",
                                               "needle_survival_d0", "needle_survival_d1"};
            for (size_t c = 0; c < sizeof cols / sizeof cols[0]; c++) {
                char v0[64];
                csv_field(csv[0][3], full, k, cols[c], v0, sizeof v0);
                expect_field(csv[1][3], full, k, cols[c], v0, lay->name);
                expect_field(csv[2][3], full, k, cols[c], v0, lay->name);
            }
        }
        for (int f = 0; f < 4; f++) {
            if (f < 3 && strcmp(csv[1][f], csv[2][f]) != 0)
                fail_msg("%s: %s differs between reencode and prefix", lay->name, FILES[f]);
            if (n_turns == 1 && (strcmp(csv[0][f], csv[1][f]) || strcmp(csv[0][f], csv[2][f])))
                fail_msg("%s: %s differs between history modes on one prompt", lay->name,
                         FILES[f]);
        }
        if (n_turns == 1) /* one turn: turns.csv holds the summary's means */
            for (int i = 0; i < s->n; i++) {
                static const char *const pair[][2] = {{"mass_mean", "mass_mean"},
                                                      {"recall_mean", "recall_mean"},
                                                      {"out_err_mean", "out_err_mean"},
                                                      {"needle_survival_d0",
                                                       "needle_survival_mean"}};
                for (size_t c = 0; c < sizeof pair / sizeof pair[0]; c++) {
                    char v[64];
                    csv_field(csv[0][0], s->set[i].label, -1, pair[c][1], v, sizeof v);
                    expect_field(csv[0][3], s->set[i].label, 0, pair[c][0], v, lay->name);
                }
            }
        /* prefix at 3 threads */
        char *three = scratch_create();
        replay_history(s, lay, all, s->n, 3, HISTORY_PREFIX, three);
        for (int f = 0; f < 4; f++) {
            char *c = scratch_read(scratch_path(three, FILES[f], 3));
            if (strcmp(c, csv[2][f]) != 0)
                fail_msg("%s: history = prefix, %s differs between 1 and 3 threads", lay->name,
                         FILES[f]);
            free(c);
        }
        scratch_remove(three);
        for (int m = 0; m < 3; m++) {
            for (int f = 0; f < 4; f++)
                free(csv[m][f]);
            scratch_remove(dir[m]);
        }
    }
}

static void test_determinism(void **state)
{
    for (int l = 0; l < N_LAYOUTS; l++)
        determinism_on(*state, &LAYOUTS[l]);
}

/* ---- Prefill statistics: the driver's, checked by a policy against its own caches ---- */

/* A test policy whose caches differ per instance (parity) and per KV head, with a synthetic slot:
 * at each prefill call it recomputes, in double from its caches as they stand, the statistics
 * policies/policy.h promises, and compares them with what the driver gave it. */
typedef struct {
    int parity;
} SpyParams;

typedef struct {
    Policy base;
    int parity;
    int calls;
} Spy;

static const PolicyType spy_type;

static Policy *spy_create(const void *params, const LayerView *L, const PolicyEnv *env, KvErr *err)
{
    (void)env;
    (void)err;
    Spy *s = kv_calloc(1, sizeof *s);
    policy_base_init(&s->base, &spy_type, L);
    s->parity = ((const SpyParams *)params)->parity;
    s->base.want_prefill_mass = true;
    s->base.want_prefill_rows = 3 + s->parity;
    return &s->base;
}

static void spy_check(const Spy *s, const PrefillView *pv)
{
    const LayerView *L = pv->L;
    int c0 = pv->chunk_start, c1 = pv->chunk_end, Dh = L->head_dim, Tn = L->n_tokens;
    int rows = s->base.want_prefill_rows < c1 - c0 ? s->base.want_prefill_rows : c1 - c0;
    if (pv->obs_rows != rows || !pv->prefill_mass || !pv->obs_attn)
        fail_msg("statistics: parity %d, chunk [%d, %d): obs_rows %d, expected %d", s->parity, c0,
                 c1, pv->obs_rows, rows);
    double *mass = kv_calloc((size_t)c1, sizeof *mass);
    double *prob = kv_malloc((size_t)(Tn + 1) * sizeof *prob);
    for (int h = 0; h < L->n_q_heads; h++) {
        const KVCache *c = &s->base.cache[h / L->group];
        memset(mass, 0, (size_t)c1 * sizeof *mass);
        for (int i = c0; i < c1; i++) {
            const float *q = L->q + ((size_t)h * Tn + i) * Dh;
            int n = c->n + i - c0 + 1;
            double mx = -INFINITY, z = 0;
            for (int j = 0; j < n; j++) {
                int pos = j < c->n ? c->pos[j] : c0 + j - c->n;
                const float *k = j < c->n && c->alt_kv[j]
                                     ? c->alt_kv[j]
                                     : L->k + ((size_t)(h / L->group) * Tn + pos) * Dh;
                bool visible = pos < 0 || L->window == 0 || pos > i - L->window;
                double dot = 0;
                for (int d = 0; d < Dh; d++)
                    dot += (double)q[d] * k[d];
                prob[j] = visible ? dot * L->attn_scale : -INFINITY;
                mx = prob[j] > mx ? prob[j] : mx;
            }
            for (int j = 0; j < n; j++)
                z += (prob[j] = exp(prob[j] - mx));
            int r = i - (c1 - rows);
            for (int j = 0; j < n; j++) {
                int pos = j < c->n ? c->pos[j] : c0 + j - c->n;
                if (pos < 0)
                    continue;
                mass[pos] += prob[j] / z;
                if (r >= 0) {
                    double got = pv->obs_attn[((size_t)h * rows + r) * c1 + pos];
                    if (fabs(got - prob[j] / z) > 2e-5)
                        fail_msg("statistics: parity %d, chunk [%d, %d), query head %d: obs row "
                                 "of query %d at position %d is %.9g, expected %.9g",
                                 s->parity, c0, c1, h, i, pos, got, prob[j] / z);
                }
            }
        }
        for (int j = 0; j < c1; j++) {
            double got = pv->prefill_mass[(size_t)h * c1 + j];
            if (fabs(got - mass[j]) > 1e-4)
                fail_msg("statistics: parity %d, chunk [%d, %d), query head %d: mass of position "
                         "%d is %.9g, expected %.9g (held: %d)",
                         s->parity, c0, c1, h, j, got, mass[j], kvcache_has(c, j));
        }
    }
    free(mass);
    free(prob);
}

static void spy_prefill(Policy *p, const PrefillView *pv)
{
    Spy *s = (Spy *)p;
    spy_check(s, pv);
    const LayerView *L = pv->L;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        /* Drop a third of what is held, a different third per instance and KV head. */
        for (int slot = c->n - 1; slot >= 0; slot--)
            if (c->pos[slot] >= 0 && (c->pos[slot] + g) % 3 == s->parity)
                kvcache_remove_slot(c, slot);
        for (int j = pv->chunk_start; j < pv->chunk_end; j++)
            kvcache_add(c, j);
        if (s->calls == 0) { /* a synthetic slot: the chunk's first key, doubled */
            float kv[2 * D];
            for (int d = 0; d < D; d++) {
                kv[d] = 2.0f * L->k[((size_t)g * L->n_tokens + pv->chunk_start) * D + d];
                kv[D + d] = 0.5f;
            }
            kvcache_add_alt(c, -1, kv, kv + D);
        }
    }
    s->calls++;
}

static void spy_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

static void spy_destroy(Policy *p)
{
    policy_base_free(p);
    free(p);
}

static const PolicyType spy_type = {
    .name = "spy",
    .params_size = sizeof(SpyParams),
    .create = spy_create,
    .prefill = spy_prefill,
    .step = spy_step,
    .destroy = spy_destroy,
};

/* Two instances whose caches differ, on every layout, on a global and on a sliding-window layer:
 * each gets the statistics of its own caches (policies/policy.h), the first chunk's included. */
static void test_prefill_statistics_are_each_instances_own(void **state)
{
    (void)state;
    SpyParams prm[2] = {{0}, {1}};
    PolicySpec spec[2] = {{.label = "spy_0", .type = &spy_type, .params = &prm[0]},
                          {.label = "spy_1", .type = &spy_type, .params = &prm[1]}};
    for (int l = 0; l < N_LAYOUTS; l++)
        for (int window = 0; window <= 20; window += 20) {
            const Layout *lay = &LAYOUTS[l];
            Fixture *fx = new_fixture(lay);
            fx->L.window = window;
            PolicyDriver d;
            KvErr err;
            if (driver_create(&d, &fx->L, spec, 2, SEED, KV_BITS, SLIDING_COMPRESS, false, &err) != 0)
                fail_msg("%s", err.msg);
            int chunks = 0;
            for (int sp = 0; sp < lay->n_spans; sp++) {
                const TraceSpan *span = &lay->spans[sp];
                if (span->kind == SPAN_PREFILL) {
                    for (int c0 = span->start; c0 < span->end; chunks++) {
                        int c1 = driver_chunk_end(c0, span->end, lay->prefill_chunk);
                        driver_prefill(&d, span->start, span->end, c0, c1);
                        c0 = c1;
                    }
                    continue;
                }
                for (int t = span->start; t < span->end; t++)
                    for (int i = 0; i < 2; i++) {
                        driver_step(&d, i, t, NULL);
                        driver_observe(&d, i, NULL);
                    }
            }
            for (int i = 0; i < 2; i++)
                assert_int_equal(((Spy *)d.inst[i])->calls, chunks);
            driver_free(&d);
            fixture_free(fx);
        }
}

/* Evaluated steps: every eval_every-th step of each decode run from its first, and the probes
 * inside decode runs; the probe inside the second turn's prefill span is not evaluated. */
static void test_evaluated_steps_follow_the_decode_runs(void **state)
{
    Suite *s = *state;
    const Layout *lay = &LAYOUTS[2];
    PolicySpec spec = {.label = "full_0", .type = s->set[0].type, .params = s->set[0].prm};
    EngineConfig cfg = {.threads = 2, .topk = TOPK, .eval_every = 4, .kv_bits = KV_BITS,
                        .prefill_chunk = lay->prefill_chunk, .seed = SEED, .n_policies = 1,
                        .policies = &spec};
    KvErr err;
    Trace *tr = trace_open(s->trace[lay - LAYOUTS], &err);
    if (!tr)
        fail_msg("%s", err.msg);
    Results *r = engine_run(tr, &cfg, &err);
    if (!r)
        fail_msg("replay: %s", err.msg);
    static const int32_t want[] = {96, 100, 104, 106, 108, 112, 116,
                                   140, 144, 148, 152, 156, 159};
    static const bool probe[] = {false, false, false, true, false, false, false,
                                 false, false, false, false, false, true};
    assert_int_equal(r->n_steps, (120 - P) + (T - 140));
    assert_int_equal(r->n_evals, sizeof want / sizeof want[0]);
    for (int e = 0; e < r->n_evals; e++) {
        assert_int_equal(r->eval_step[e], want[e]);
        assert_int_equal(r->eval_probe[e], probe[e]);
    }
    results_free(r);
    trace_close(tr);
}

/* The defect that started this suite: tova's prefill read the observation rows of whichever
 * instance asked for the most (snapkv's), indexed as its own single row. */
static void test_tova_next_to_snapkv_sees_its_own_rows(void **state)
{
    Suite *s = *state;
    const Setting *tova = NULL, *snap = NULL;
    for (int i = 0; i < s->n; i++) {
        if (!tova && strcmp(s->set[i].type->name, "tova") == 0)
            tova = &s->set[i];
        if (!snap && strcmp(s->set[i].type->name, "snapkv") == 0)
            snap = &s->set[i];
    }
    assert_non_null(tova);
    assert_non_null(snap);
    char *alone = scratch_create(), *pair = scratch_create();
    replay_to(s, &LAYOUTS[0], (const Setting *[]){tova}, 1, 1, alone);
    replay_to(s, &LAYOUTS[0], (const Setting *[]){snap, tova}, 2, 1, pair);
    char *a = scratch_read(scratch_path(alone, "steps.csv", 0));
    char *b = scratch_read(scratch_path(pair, "steps.csv", 1));
    char *ra = rows_of(a, tova->label), *rb = rows_of(b, tova->label);
    assert_true(strlen(ra) > 0);
    assert_string_equal(ra, rb);
    free(ra);
    free(rb);
    free(a);
    free(b);
    scratch_remove(alone);
    scratch_remove(pair);
}

/* ---- Nested caches (policies/policy.h: nest_param, nests, keep_order) ---- */

/* The parameter struct of setting st with its nest parameter set to `value` (free() it). */
static void *nest_member(const Setting *st, long value)
{
    void *prm = fixture_params(st->type, st->params);
    char v[32];
    snprintf(v, sizeof v, "%ld", value);
    KvErr err;
    if (policy_param_set(st->type, prm, st->type->nest_param, v, &err) != 0)
        fail_msg("%s (%s): %s=%s: %s", st->label, st->params, st->type->nest_param, v, err.msg);
    return prm;
}

/* The value of setting st's nest parameter (its default when the setting does not give it). */
static long nest_value(const Setting *st)
{
    char v[128];
    if (setting_value(st->params, st->type->nest_param, v, sizeof v))
        return atol(v);
    for (const ParamSpec *ps = st->type->params; ps->key; ps++)
        if (strcmp(ps->key, st->type->nest_param) == 0)
            return atol(ps->dflt);
    fail_msg("policy %s: nest_param %s is none of its parameters", st->type->name,
             st->type->nest_param);
    return 0;
}

enum { NEST = 3 }; /* the members of a nest under test */

/* At decode step t, after every member stepped: each member's keep order of each KV head holds
 * exactly its cache's positions (cache[g].n of them, distinct), and each member's cache is,
 * as a set, the first cache[g].n positions of every member's order that holds at least as
 * many: the caches nest in one order, as the replay's scoring of them together assumes. */
static void check_nest_step(const Setting *st, const Layout *lay, int window, PolicyDriver *d,
                            int t)
{
    int n_kv = d->inst[0]->n_kv_heads;
    for (int g = 0; g < n_kv; g++) {
        int32_t order[NEST][T], cached[NEST][T], n[NEST];
        for (int i = 0; i < NEST; i++) {
            Policy *p = d->inst[i];
            const KVCache *c = &p->cache[g];
            n[i] = p->type->keep_order(p, &d->sv[i], g, order[i]);
            if (n[i] != c->n)
                fail_msg("nest: %s (%s=%ld), %s, window %d: KV head %d, step %d: keep order of "
                         "%d positions for a cache of %d", st->label, st->type->nest_param,
                         nest_value(st), lay->name, window, g, t, n[i], c->n);
            memcpy(cached[i], c->pos, (size_t)c->n * sizeof *c->pos);
            qsort(cached[i], (size_t)c->n, sizeof *cached[i], cmp_i32);
            int32_t sorted[T];
            memcpy(sorted, order[i], (size_t)n[i] * sizeof *sorted);
            qsort(sorted, (size_t)n[i], sizeof *sorted, cmp_i32);
            for (int j = 0; j < n[i]; j++)
                if (sorted[j] != cached[i][j] || (j > 0 && sorted[j] == sorted[j - 1]))
                    fail_msg("nest: %s, member %d, %s, window %d: KV head %d, step %d: the keep "
                             "order is not the cache's positions", st->label, i, lay->name,
                             window, g, t);
        }
        for (int i = 0; i < NEST; i++)
            for (int j = 0; j < NEST; j++) {
                if (n[i] > n[j])
                    continue;
                int32_t prefix[T];
                memcpy(prefix, order[j], (size_t)n[i] * sizeof *prefix);
                qsort(prefix, (size_t)n[i], sizeof *prefix, cmp_i32);
                if (memcmp(prefix, cached[i], (size_t)n[i] * sizeof *prefix) != 0)
                    fail_msg("nest: %s, %s, window %d: KV head %d, step %d: member %d's cache "
                             "(%d slots) is not the first %d of member %d's keep order",
                             st->label, lay->name, window, g, t, i, n[i], n[i], j);
            }
    }
}

/* Every setting of every type whose caches nest (nest_param, and `nests` where the type has it),
 * on every layout, on a global and on a sliding-window layer: three members of its nest (its
 * nest parameter below, at and above the setting's, the other parameters the setting's) driven
 * together through the driver, as a sweep's replay drives them, nest at every decode step; and
 * the driver puts them in one group. */
static void test_nested_caches_nest(void **state)
{
    Suite *s = *state;
    int covered = 0;
    for (int si = 0; si < s->n; si++) {
        const Setting *st = &s->set[si];
        if (!st->type->nest_param)
            continue;
        assert_non_null(st->type->keep_order);
        if (st->type->nests && !st->type->nests(st->prm))
            continue;
        long v = nest_value(st), values[NEST] = {v > 6 ? v - 5 : 1, v, v + 7};
        void *prm[NEST];
        PolicySpec spec[NEST];
        for (int i = 0; i < NEST; i++) {
            prm[i] = nest_member(st, values[i]);
            spec[i] = (PolicySpec){.type = st->type, .params = prm[i]};
            snprintf(spec[i].label, sizeof spec[i].label, "%.48s_nest%d", st->label, i);
        }
        float *full = kv_malloc((size_t)HQ * T * sizeof *full);
        for (int l = 0; l < N_LAYOUTS; l++)
            for (int window = 0; window <= 20; window += 20) {
                const Layout *lay = &LAYOUTS[l];
                Fixture *fx = new_fixture(lay);
                fixture_set_window(fx, window);
                PolicyDriver d;
                KvErr err;
                if (driver_create(&d, &fx->L, spec, NEST, SEED, KV_BITS, SLIDING_COMPRESS, false,
                                  &err) != 0)
                    fail_msg("%s", err.msg);
                d.share_steps = true; /* as the replay sets it */
                const int *members, *none;
                assert_int_equal(driver_step_group(&d, 0, &members), NEST);
                for (int i = 0; i < NEST; i++) {
                    assert_true(driver_nests(&d, i));
                    assert_int_equal(members[i], i);
                    if (i > 0)
                        assert_int_equal(driver_step_group(&d, i, &none), 0);
                }
                for (int sp = 0; sp < lay->n_spans; sp++) {
                    const TraceSpan *span = &lay->spans[sp];
                    if (span->kind == SPAN_PREFILL) {
                        for (int c0 = span->start; c0 < span->end;) {
                            int c1 = driver_chunk_end(c0, span->end, lay->prefill_chunk);
                            driver_prefill(&d, span->start, span->end, c0, c1);
                            c0 = c1;
                        }
                        continue;
                    }
                    for (int t = span->start; t < span->end; t++) {
                        fixture_full_attn(fx, t, full);
                        for (int i = 0; i < NEST; i++)
                            driver_step(&d, i, t, full);
                        check_nest_step(st, lay, window, &d, t);
                        for (int i = 0; i < NEST; i++)
                            driver_observe(&d, i, NULL);
                    }
                }
                driver_free(&d);
                fixture_free(fx);
            }
        free(full);
        for (int i = 0; i < NEST; i++)
            free(prm[i]);
        covered++;
    }
    assert_true(covered >= 2); /* window and oracle_topk at least */
}

/* The driver's groups (share_steps): the members of one nest together, whatever their order
 * among the instances; a window with rerotate (its caches do not nest, and the type has no
 * step_many) and a window of other sinks (another nest) apart; oracle_topk's budgets, a nest
 * of their own. */
static void test_nests_group_apart_from_other_settings(void **state)
{
    (void)state;
    static const struct {
        const char *type, *params;
        bool nests;
    } inst[] = {
        {"window", "window=24", true},        {"window", "window=28", true},
        {"window", "window=24 rerotate=true", false},
        {"window", "window=28 rerotate=true", false},
        {"window", "window=24 sinks=0", true}, {"oracle_topk", "budget=8", true},
        {"oracle_topk", "budget=16", true},   {"window", "window=30", true},
    };
    enum { N = sizeof inst / sizeof inst[0] };
    /* each instance's group: the first member and the group's size (1: alone) */
    static const int first[N] = {0, 0, 2, 3, 4, 5, 5, 0}, len[N] = {3, 3, 1, 1, 1, 2, 2, 3};
    Fixture *fx = new_fixture(&LAYOUTS[0]);
    PolicySpec spec[N];
    for (int i = 0; i < N; i++) {
        spec[i] = (PolicySpec){.type = policy_find(inst[i].type)};
        assert_non_null(spec[i].type);
        spec[i].params = fixture_params(spec[i].type, inst[i].params);
        snprintf(spec[i].label, sizeof spec[i].label, "%s_%d", inst[i].type, i);
    }
    PolicyDriver d;
    KvErr err;
    if (driver_create(&d, &fx->L, spec, N, SEED, KV_BITS, SLIDING_COMPRESS, false, &err) != 0)
        fail_msg("%s", err.msg);
    d.share_steps = true;
    for (int i = 0; i < N; i++) {
        assert_int_equal(driver_nests(&d, i), inst[i].nests);
        const int *members;
        int got = driver_step_group(&d, i, &members);
        if (first[i] != i) {
            assert_int_equal(got, 0); /* stepped with an earlier instance's group */
            continue;
        }
        assert_int_equal(got, len[i]);
        if (len[i] == 1) {
            assert_null(members);
            continue;
        }
        for (int j = 0, m = 0; j < N; j++)
            if (first[j] == i)
                assert_int_equal(members[m++], j);
    }
    driver_free(&d);
    for (int i = 0; i < N; i++)
        free(spec[i].params);
    fixture_free(fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_settings_cover_every_parameter),
        cmocka_unit_test(test_budget_and_memory),
        cmocka_unit_test(test_no_future),
        cmocka_unit_test(test_oracle_topk_bounds_every_policy),
        cmocka_unit_test(test_prefill_statistics_are_each_instances_own),
        cmocka_unit_test(test_evaluated_steps_follow_the_decode_runs),
        cmocka_unit_test(test_tova_next_to_snapkv_sees_its_own_rows),
        cmocka_unit_test(test_isolation),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_history_reencode),
        cmocka_unit_test(test_turns),
        cmocka_unit_test(test_nested_caches_nest),
        cmocka_unit_test(test_nests_group_apart_from_other_settings),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
