/* The two baselines' defining properties on hand-built layers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmocka.h>

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_window_keeps_last_n_and_sinks),
        cmocka_unit_test(test_window_without_sinks_is_ring_buffer),
        cmocka_unit_test(test_full_keeps_everything_and_grows_in_steps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
