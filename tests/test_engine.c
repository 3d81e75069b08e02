/* The replay engine against a plain recomputation: full and window on a random 3-layer trace,
 * every metric at every step, and byte-identical results at any thread count. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/replay/engine.h"
#include "sim/replay/report.h"
#include "tests/support/fixture.h"
#include "tests/support/scratch.h"

enum { HQ = 4, HKV = 2, D = 16, T = 80, P = 48, LAYERS = 3, WINDOW = 8, SINKS = 2, TOPK = 4 };
static const uint64_t SEED = 11;

typedef struct {
    char *dir;
    const char *trace;
    Fixture *fx;
    PolicySpec spec[2];
} Setup;

static int setup(void **state)
{
    Setup *s = kv_calloc(1, sizeof *s);
    s->dir = scratch_create();
    s->trace = kv_strdup(scratch_path(s->dir, "t.h5", 0));
    s->fx = fixture_new(HQ, HKV, D, T, P);
    TraceMeta *m = &s->fx->meta;
    free(m->needles);
    free(m->probes);
    m->n_needles = 1;
    m->needles = kv_malloc(2 * sizeof(int32_t));
    m->needles[0] = 5;
    m->needles[1] = 9;
    m->n_probes = 3;
    m->probes = kv_malloc(3 * sizeof(int32_t));
    m->probes[0] = P - 1;
    m->probes[1] = 60;
    m->probes[2] = T - 1;
    fixture_write_trace(s->fx, LAYERS, SEED, s->trace);

    const char *types[2] = {"full", "window"};
    for (int i = 0; i < 2; i++) {
        s->spec[i].type = policy_find(types[i]);
        snprintf(s->spec[i].label, sizeof s->spec[i].label, "%s_test", types[i]);
        s->spec[i].params = kv_calloc(1, s->spec[i].type->params_size);
        policy_params_defaults(s->spec[i].type, s->spec[i].params);
    }
    KvErr err;
    assert_int_equal(policy_param_set(s->spec[1].type, s->spec[1].params, "window", "8", &err), 0);
    assert_int_equal(policy_param_set(s->spec[1].type, s->spec[1].params, "sinks", "2", &err), 0);
    *state = s;
    return 0;
}

static int teardown(void **state)
{
    Setup *s = *state;
    for (int i = 0; i < 2; i++)
        free(s->spec[i].params);
    fixture_free(s->fx);
    free((char *)s->trace);
    scratch_remove(s->dir);
    free(s);
    return 0;
}

/* The spill in a file even for these small replays (engine.h); else in memory. */
static bool spill_to_file;

static Results *replay(Setup *s, int threads, int eval_every)
{
    KvErr err;
    Trace *tr = trace_open(s->trace, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    EngineConfig cfg = {.threads = threads, .topk = TOPK, .eval_every = eval_every,
                        .kv_bits = 16, .seed = 1, .n_policies = 2, .policies = s->spec,
                        .spill_file = spill_to_file};
    Results *r = engine_run(tr, &cfg, &err);
    if (!r)
        fail_msg("%s", err.msg);
    trace_close(tr);
    return r;
}

static bool in_window(int j, int t) { return j < SINKS || j > t - WINDOW; }

static void test_metrics_match_plain_recomputation(void **state)
{
    Setup *s = *state;
    Results *r = replay(s, 2, 1);
    assert_int_equal(r->n_evals, T - P);
    float *row = kv_malloc((size_t)HQ * T * sizeof *row);
    for (int l = 0; l < LAYERS; l++) {
        fixture_randomize(s->fx, SEED + (uint64_t)l, 1.0);
        for (int e = 0; e < r->n_evals; e++) {
            int t = r->eval_step[e];
            fixture_full_attn(s->fx, t, row);
            for (int h = 0; h < HQ; h++) {
                const float *p = row + (size_t)h * T;
                assert_float_equal(results_head_at(r, 0, l, e, h, HM_MASS), 1.0, 1e-6);
                assert_float_equal(results_head_at(r, 0, l, e, h, HM_RECALL), 1.0, 0);
                assert_float_equal(results_head_at(r, 0, l, e, h, HM_OUT_ERR), 0.0, 1e-5);

                /* window: mass, recall and output error from scratch, in double */
                double mass = 0, o_full[D] = {0}, o_win[D] = {0};
                const float *v = s->fx->v + (size_t)(h / (HQ / HKV)) * T * D;
                for (int j = 0; j <= t; j++) {
                    for (int d = 0; d < D; d++)
                        o_full[d] += p[j] * v[j * D + d];
                    if (in_window(j, t)) {
                        mass += p[j];
                        for (int d = 0; d < D; d++)
                            o_win[d] += p[j] * v[j * D + d];
                    }
                }
                double diff = 0, norm = 0;
                for (int d = 0; d < D; d++) {
                    diff += pow(o_win[d] / mass - o_full[d], 2);
                    norm += o_full[d] * o_full[d];
                }
                int hits = 0;
                for (int k = 0; k < TOPK; k++) { /* the k-th largest, by selection */
                    int best = -1;
                    for (int j = 0; j <= t; j++) {
                        int rank = 0;
                        for (int j2 = 0; j2 <= t; j2++)
                            rank += p[j2] > p[j] || (p[j2] == p[j] && j2 < j);
                        if (rank == k)
                            best = j;
                    }
                    hits += in_window(best, t);
                }
                assert_float_equal(results_head_at(r, 1, l, e, h, HM_MASS), mass, 1e-5);
                assert_float_equal(results_head_at(r, 1, l, e, h, HM_RECALL), (double)hits / TOPK,
                                   1e-9);
                assert_float_equal(results_head_at(r, 1, l, e, h, HM_OUT_ERR), sqrt(diff / norm),
                                   1e-4);
            }
            assert_float_equal(results_step_at(r, 0, l, e, SM_CACHE_TOKENS), t + 1, 0);
            assert_float_equal(results_step_at(r, 1, l, e, SM_CACHE_TOKENS), WINDOW + SINKS, 0);
            /* 2 KV heads x tokens x (K+V) x 16 dims x 2 bytes */
            assert_float_equal(results_step_at(r, 0, l, e, SM_DEVICE_BYTES), 2.0 * (t + 1) * 64, 0);
            assert_float_equal(results_step_at(r, 1, l, e, SM_DEVICE_BYTES), 2.0 * 10 * 64, 0);
        }
    }
    free(row);
    results_free(r);
}

static void test_needles_checked_at_probe_steps(void **state)
{
    Setup *s = *state;
    Results *r = replay(s, 1, 5);
    /* every 5th decode step from P, plus probes 60 and 79 (the prompt probe is not a step) */
    int expected[] = {48, 53, 58, 60, 63, 68, 73, 78, 79};
    assert_int_equal(r->n_evals, 9);
    for (int e = 0; e < r->n_evals; e++) {
        assert_int_equal(r->eval_step[e], expected[e]);
        bool probe = expected[e] == 60 || expected[e] == 79;
        assert_int_equal(r->eval_probe[e], probe);
        for (int l = 0; l < LAYERS; l++) {
            double full = results_step_at(r, 0, l, e, SM_NEEDLE_SURVIVAL);
            double win = results_step_at(r, 1, l, e, SM_NEEDLE_SURVIVAL);
            if (probe) {
                assert_float_equal(full, 1.0, 0);
                assert_float_equal(win, 0.0, 0); /* needle 5..8 left the window long ago */
            } else {
                assert_true(isnan(full) && isnan(win));
            }
        }
    }
    results_free(r);
}


/* At any thread count, and whether the spill is in memory or in a file, the same slots and the
 * same files. */
static void test_identical_results_at_any_thread_count(void **state)
{
    Setup *s = *state;
    Results *one = replay(s, 1, 1);
    spill_to_file = true;
    Results *three = replay(s, 3, 1);
    spill_to_file = false;
    assert_non_null(one->spill_mem);
    assert_null(three->spill_mem);
    assert_true(three->spill_fd > 0);
    assert_int_equal(three->threads_used, 3);
    assert_true(results_same(one, three));
    KvErr err;
    char d1[4096], d3[4096];
    snprintf(d1, sizeof d1, "%s/out1", s->dir);
    snprintf(d3, sizeof d3, "%s/out3", s->dir);
    PolicySummary s1[2], s3[2];
    report_summarize(one, s1);
    report_summarize(three, s3);
    assert_int_equal(report_write_csv(one, s1, d1, &err), 0);
    assert_int_equal(report_write_csv(three, s3, d3, &err), 0);
    const char *files[4] = {"summary.csv", "layers.csv", "steps.csv", "turns.csv"};
    for (int i = 0; i < 4; i++) {
        char p1[4200], p3[4200];
        snprintf(p1, sizeof p1, "%s/%s", d1, files[i]);
        snprintf(p3, sizeof p3, "%s/%s", d3, files[i]);
        char *a = scratch_read(p1), *b = scratch_read(p3);
        assert_string_equal(a, b);
        assert_true(strlen(a) > 100);
        free(a);
        free(b);
        remove(p1);
        remove(p3);
    }
    remove(d1);
    remove(d3);
    results_free(one);
    results_free(three);
}

/* What a Results holds resident (results_bytes, from its counts) grows with the evaluated steps
 * only by their per-step rows (the evaluated steps, and the report's per-(layer, step) working
 * set of one policy), never by steps x query heads nor by policies x steps: the per-head slots of
 * a long replay are in the spill's file. Shapes of a long study: 32 layers, 8 and 32 query heads,
 * 8192 and 4 x 8192 evaluated steps, 4 and 13 policies. */
static void test_results_memory_does_not_grow_with_steps_x_heads(void **state)
{
    enum { BIG_LAYERS = 32, STEPS = 8192 };
    double bytes[2][2][2]; /* [policies 4, 13][heads 8, 32][steps, 4 x steps] */
    for (int p = 0; p < 2; p++)
        for (int h = 0; h < 2; h++)
            for (int e = 0; e < 2; e++) {
                Results big = {.n_policies = p ? 13 : 4, .n_layers = BIG_LAYERS,
                               .n_q_heads = h ? 32 : 8, .n_evals = e ? 4 * STEPS : STEPS,
                               .n_turns = 1};
                assert_true(results_spill_bytes(&big) > SPILL_MEMORY_MAX); /* on disk */
                assert_true(results_spill_resident_bytes(&big) == 0);
                bytes[p][h][e] = results_bytes(&big);
            }
    /* 3 x STEPS more evaluated steps: their rows, whatever the heads and policies */
    Results r0 = {0};
    double per_step = sizeof *r0.eval_step + sizeof *r0.eval_probe + sizeof *r0.eval_turn +
                      ((double)BIG_LAYERS * (STEP_RECORD + N_HEAD_METRICS + 1) + 1) *
                          sizeof(double);
    for (int p = 0; p < 2; p++)
        for (int h = 0; h < 2; h++)
            assert_true(bytes[p][h][1] - bytes[p][h][0] == 3.0 * STEPS * per_step);
    /* more heads: the same few bytes (a chunk of head slots) at any number of steps */
    for (int p = 0; p < 2; p++)
        assert_true(bytes[p][1][1] - bytes[p][0][1] == bytes[p][1][0] - bytes[p][0][0]);
    /* and far below what the head slots would take in memory */
    Results big = {.n_policies = 13, .n_layers = BIG_LAYERS, .n_q_heads = 32,
                   .n_evals = 4 * STEPS, .n_turns = 1};
    assert_true(bytes[1][1][1] < results_head_bytes(&big) / 16);

    /* A real replay: more evaluated steps (every step against every 4th), the same growth of
     * its resident bytes per step (its spill, small enough for memory, counts on top). */
    Setup *s = *state;
    Results *run[2] = {replay(s, 1, 4), replay(s, 1, 1)};
    assert_true(run[1]->n_evals > 3 * run[0]->n_evals);
    double grown = results_bytes(run[1]) - results_bytes(run[0]);
    double spill = results_spill_bytes(run[1]) - results_spill_bytes(run[0]);
    double rows = (double)(run[1]->n_evals - run[0]->n_evals) *
                  (sizeof *r0.eval_step + sizeof *r0.eval_probe + sizeof *r0.eval_turn +
                   ((double)LAYERS * (STEP_RECORD + N_HEAD_METRICS + 1) + 1) * sizeof(double));
    assert_true(grown == rows + spill);
    results_free(run[0]);
    results_free(run[1]);
}

/* More threads than layers: the threads share the work inside a layer (attention by head, the
 * policy instances, the prompt statistics), all threads are used, and every number is the same
 * as with one thread. One layer, policies that read the prompt statistics and the true
 * attention as well as full and window. */
static void test_identical_results_with_more_threads_than_layers(void **state)
{
    Setup *s = *state;
    char path[4200];
    snprintf(path, sizeof path, "%s/one_layer.h5", s->dir);
    fixture_write_trace(s->fx, 1, SEED, path);
    enum { N_POL = 6 };
    const char *types[N_POL] = {"full", "window", "h2o", "snapkv", "oracle_topk", "tova"};
    PolicySpec spec[N_POL];
    memset(spec, 0, sizeof spec);
    KvErr err;
    for (int i = 0; i < N_POL; i++) {
        if (i < 2) {
            spec[i] = s->spec[i];
            continue;
        }
        spec[i].type = policy_find(types[i]);
        snprintf(spec[i].label, sizeof spec[i].label, "%s_test", types[i]);
        spec[i].params = kv_calloc(1, spec[i].type->params_size);
        policy_params_defaults(spec[i].type, spec[i].params);
        assert_int_equal(policy_param_set(spec[i].type, spec[i].params, "budget", "24", &err), 0);
    }
    Results *r[4];
    const int threads[4] = {1, 2, 3, 7};
    for (int i = 0; i < 4; i++) {
        Trace *tr = trace_open(path, &err);
        if (!tr)
            fail_msg("%s", err.msg);
        EngineConfig cfg = {.threads = threads[i], .topk = TOPK, .eval_every = 1, .kv_bits = 16,
                            .seed = 1, .n_policies = N_POL, .policies = spec};
        r[i] = engine_run(tr, &cfg, &err);
        if (!r[i])
            fail_msg("%s", err.msg);
        trace_close(tr);
        /* all threads used, up to max(query heads, policies) per layer */
        assert_int_equal(r[i]->threads_used, threads[i] < N_POL ? threads[i] : N_POL);
    }
    /* not vacuous: the budgeted policies lose attention mass */
    assert_true(results_head_at(r[0], 2, 0, r[0]->n_evals - 1, 0, HM_MASS) < 1.0f);
    for (int i = 1; i < 4; i++) {
        assert_true(results_same(r[0], r[i]));
    }
    for (int i = 0; i < 4; i++)
        results_free(r[i]);
    for (int i = 2; i < N_POL; i++)
        free(spec[i].params);
}

/* A trace whose values are finite but overflow float arithmetic: the replay stops with an error
 * naming the trace, layer and step (and the policy, for a metric), never a NaN in a result. */
static char *replay_error(Setup *s, const char *path, int threads)
{
    KvErr err;
    Trace *tr = trace_open(path, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    EngineConfig cfg = {.threads = threads, .topk = TOPK, .eval_every = 1, .kv_bits = 16, .seed = 1,
                        .n_policies = 2, .policies = s->spec};
    Results *r = engine_run(tr, &cfg, &err);
    trace_close(tr);
    if (r)
        fail_msg("replay of %s succeeded: expected a non-finite error", path);
    return kv_strdup(err.msg);
}

static void test_non_finite_values_are_errors(void **state)
{
    Setup *s = *state;
    char path[4200];
    snprintf(path, sizeof path, "%s/overflow.h5", s->dir);
    /* Query 60 of layer 0, head 1 at 3e38: its logits overflow float. */
    KvErr err;
    fixture_randomize(s->fx, SEED, 1.0);
    for (int d = 0; d < D; d++)
        fx_q(s->fx, 1, 60)[d] = 3e38f;
    s->fx->meta.n_layers = 1;
    TraceWriter *w = trace_writer_create(path, &s->fx->meta, TRACE_F32, &err);
    if (!w)
        fail_msg("%s", err.msg);
    assert_int_equal(trace_writer_put_qkv(w, 0, 0, T, s->fx->q, s->fx->k, s->fx->v, &err), 0);
    assert_int_equal(trace_writer_finish(w, &err), 0);
    char *msg = replay_error(s, path, 1);
    assert_non_null(strstr(msg, "overflow.h5"));
    assert_non_null(strstr(msg, "layer 0, step 60, query head 1"));
    assert_non_null(strstr(msg, "not finite"));
    free(msg);

    /* Values near FLT_MAX: the attention is a distribution, the output's norm overflows, and
     * the output error of the first policy that misses them is reported, naming the policy. */
    fixture_randomize(s->fx, SEED, 1.0);
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++)
            fx_v(s->fx, 0, t)[d] = t % 2 ? 3e38f : -3e38f;
    w = trace_writer_create(path, &s->fx->meta, TRACE_F32, &err);
    if (!w)
        fail_msg("%s", err.msg);
    assert_int_equal(trace_writer_put_qkv(w, 0, 0, T, s->fx->q, s->fx->k, s->fx->v, &err), 0);
    assert_int_equal(trace_writer_finish(w, &err), 0);
    msg = replay_error(s, path, 1);
    assert_non_null(strstr(msg, "policy window_test, layer 0, step 48"));
    assert_non_null(strstr(msg, "out_err"));
    assert_non_null(strstr(msg, "not finite"));
    /* The policy instances run in parallel: the error is still the one a single thread meets. */
    char *msg3 = replay_error(s, path, 3);
    assert_string_equal(msg3, msg);
    free(msg3);
    free(msg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_metrics_match_plain_recomputation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_needles_checked_at_probe_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identical_results_at_any_thread_count, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identical_results_with_more_threads_than_layers, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_non_finite_values_are_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_results_memory_does_not_grow_with_steps_x_heads, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
