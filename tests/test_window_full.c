/* The two baselines' defining properties on hand-built layers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "sim/format/geometry.h"
#include "tests/support/fixture.h"

typedef struct {
    int window, sinks, steps;
} WindowCheck;

/* At every step t the cache of every KV head is exactly {0..sinks-1} ∪ (t-window, t]. */
static void check_window(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    WindowCheck *wc = ud;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        int expected = 0;
        for (int j = 0; j <= t; j++) {
            int want = j < wc->sinks || j > t - wc->window;
            assert_int_equal(kvcache_has(c, j), want);
            expected += want;
        }
        assert_int_equal(c->n, expected);
    }
    wc->steps++;
}

static void test_window_keeps_last_n_and_sinks(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(4, 2, 8, 40, 12);
    fixture_randomize(fx, 1, 1.0);
    Policy *p = fixture_policy(fx, "window", "window=5 sinks=3", 7);
    WindowCheck wc = {5, 3, 0};
    fixture_run(fx, p, 40, check_window, &wc);
    assert_int_equal(wc.steps, 40 - 12);
    p->type->destroy(p);
    fixture_free(fx);
}

/* rerotate = true: the logit query t computes for each slot is the one StreamingLLM computes
 * with pre-RoPE vectors rotated at their cache indices (query at n - 1, key at its rank i):
 * R(n-1) q_pre . R(i) k_pre. The window's keys, whose distance is the true one, stay exact; the
 * sinks are approximate once the window has moved past them. Values are never changed. */
typedef struct {
    const Fixture *fx;
    int sinks, steps, rotated;
} RerotateCheck;

static void check_rerotate(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    RerotateCheck *rc = ud;
    const LayerView *L = &rc->fx->L;
    int D = L->head_dim, T = L->n_tokens;
    float qp[64], kp[64];
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        int32_t pos[256];
        int n = kvcache_positions(c, pos);
        for (int h = g * L->group; h < (g + 1) * L->group; h++) {
            const float *q = L->q + ((size_t)h * T + t) * D;
            memcpy(qp, q, (size_t)D * sizeof *qp);
            rope_apply(qp, D, L->meta->rope_layout, L->rope_inv_freq, n - 1 - t);
            for (int i = 0; i < n; i++) {
                int j = pos[i], s = c->slot_of[j];
                const float *k = L->k + ((size_t)g * T + j) * D;
                memcpy(kp, k, (size_t)D * sizeof *kp);
                rope_apply(kp, D, L->meta->rope_layout, L->rope_inv_freq, i - j);
                double want = 0, got = 0;
                const float *ks = c->alt_kv[s] ? c->alt_kv[s] : k;
                for (int d = 0; d < D; d++) {
                    want += (double)qp[d] * kp[d];
                    got += (double)q[d] * ks[d];
                }
                if (fabs(got - want) > 1e-4 * (1 + fabs(want)))
                    fail_msg("step %d, key %d (cache index %d of %d): logit %g, expected %g", t,
                             j, i, n, got, want);
                bool moved = t - j != n - 1 - i;
                assert_int_equal(c->alt_kv[s] != NULL, moved);
                if (c->alt_kv[s])
                    assert_memory_equal(c->alt_kv[s] + D, L->v + ((size_t)g * T + j) * D,
                                        (size_t)D * sizeof(float));
                rc->rotated += moved && h == g * L->group;
                assert_true(!moved || j < rc->sinks);
            }
        }
    }
    rc->steps++;
}

static void test_window_rerotate(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(4, 2, 16, 80, 30);
    fixture_randomize(fx, 3, 1.0);
    Policy *p = fixture_policy(fx, "window", "window=12 sinks=4 rerotate=true", 7);
    RerotateCheck rc = {fx, 4, 0, 0};
    fixture_run(fx, p, 80, check_rerotate, &rc);
    assert_int_equal(rc.steps, 80 - 30);
    assert_int_equal(rc.rotated, 4 * 2 * 50); /* every sink of both KV heads at every step */
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_window_without_sinks_is_ring_buffer(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(2, 1, 4, 20, 3);
    Policy *p = fixture_policy(fx, "window", "window=4 sinks=0", 7);
    WindowCheck wc = {4, 0, 0};
    fixture_run(fx, p, 20, check_window, &wc);
    assert_int_equal(wc.steps, 17);
    /* A window wider than everything seen keeps everything. */
    p->type->destroy(p);
    p = fixture_policy(fx, "window", "window=100 sinks=0", 7);
    wc = (WindowCheck){100, 0, 0};
    fixture_run(fx, p, 20, check_window, &wc);
    p->type->destroy(p);
    fixture_free(fx);
}

static void check_full(int t, const Policy *p, const float *full_attn, void *ud)
{
    const Fixture *fx = ud;
    for (int g = 0; g < p->n_kv_heads; g++)
        assert_int_equal(p->cache[g].n, t + 1);
    for (int h = 0; h < fx->L.n_q_heads; h++)
        assert_float_equal(fixture_mass(fx, p, full_attn, h), 1.0, 1e-5);
}

static void test_full_keeps_everything_and_grows_in_steps(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(4, 2, 8, 300, 250);
    fixture_randomize(fx, 3, 1.0);
    Policy *p = fixture_policy(fx, "full", "step=256", 7);
    fixture_run(fx, p, 300, check_full, fx);
    MemReport m = {0};
    p->type->memory(p, &m);
    /* 300 live tokens per KV head, 2 heads, 2 (K,V) * 8 dims * 2 bytes = 32 bytes per token. */
    assert_float_equal(m.device_bytes, 2 * 300 * 32.0, 1e-9);
    assert_float_equal(m.allocated_bytes, 2 * 512 * 32.0, 1e-9);
    p->type->destroy(p);
    fixture_free(fx);
}

/* The window streams every prefill chunk token by token: two turns fed whole or in chunks of 7
 * leave the same cache at every decode step. */
typedef struct {
    int32_t *log; /* [T][Hkv][T]: membership per step and KV head */
    int T;
} WindowLog;

static void log_window(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    WindowLog *wl = ud;
    for (int g = 0; g < p->n_kv_heads; g++)
        for (int j = 0; j < wl->T; j++)
            wl->log[((size_t)t * p->n_kv_heads + g) * wl->T + j] = kvcache_has(&p->cache[g], j);
}

static void test_window_does_not_depend_on_chunking(void **state)
{
    (void)state;
    enum { TT = 120, PP = 50 };
    static const TraceSpan spans[] = {
        {SPAN_PREFILL, 0, PP}, {SPAN_DECODE, PP, 70}, {SPAN_PREFILL, 70, 100}, {SPAN_DECODE, 100, TT}};
    int32_t *logs[2];
    for (int run = 0; run < 2; run++) {
        Fixture *fx = fixture_new(4, 2, 8, TT, PP);
        fixture_randomize(fx, 5, 1.0);
        fixture_set_spans(fx, spans, 4);
        fx->prefill_chunk = run ? 7 : 0;
        logs[run] = calloc((size_t)TT * 2 * TT, sizeof *logs[run]);
        WindowLog wl = {logs[run], TT};
        Policy *p = fixture_policy(fx, "window", "window=12 sinks=3", 1);
        fixture_run(fx, p, TT, log_window, &wl);
        p->type->destroy(p);
        fixture_free(fx);
    }
    assert_memory_equal(logs[0], logs[1], (size_t)TT * 2 * TT * sizeof *logs[0]);
    /* Step 100, the first after the second turn: the sinks and the last 12 tokens, 100 included. */
    for (int j = 0; j < TT; j++)
        assert_int_equal(logs[0][((size_t)100 * 2) * TT + j], j < 3 || (j > 100 - 12 && j <= 100));
    free(logs[0]);
    free(logs[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_window_keeps_last_n_and_sinks),
        cmocka_unit_test(test_window_rerotate),
        cmocka_unit_test(test_window_without_sinks_is_ring_buffer),
        cmocka_unit_test(test_full_keeps_everything_and_grows_in_steps),
        cmocka_unit_test(test_window_does_not_depend_on_chunking),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
