/* quest's defining property: at every attention the cache is the current page plus whole
 * complete pages, as many as the budget allows, and no page left out has a higher upper bound
 * on q·k (the test's own sum over the group and channels of max(q_c min_c, q_c max_c)) than one
 * loaded; the memory report counts the host tier and the tokens fetched from it. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

enum { HQ = 4, HKV = 2, D = 8, T = 130, BITS = 16 };

typedef struct {
    const Fixture *fx;
    int budget, page;
    int32_t *before; /* [HKV][T] 1 if cached before the call */
    int steps;
} QuestCheck;

/* The test's own upper bound of page pg for KV head g at query t. */
static double page_bound(const Fixture *fx, int g, int pg, int page, int t)
{
    const LayerView *L = &fx->L;
    double bound = 0;
    for (int h = g * L->group; h < (g + 1) * L->group; h++) {
        const float *q = fx->q + ((size_t)h * T + t) * D;
        for (int d = 0; d < D; d++) {
            double mn = INFINITY, mx = -INFINITY;
            for (int j = pg * page; j < (pg + 1) * page; j++) {
                double k = fx->k[((size_t)g * T + j) * D + d];
                mn = fmin(mn, k);
                mx = fmax(mx, k);
            }
            bound += fmax(q[d] * mn, q[d] * mx);
        }
    }
    return bound;
}

static void snapshot(int t0, int t1, const Policy *p, void *ud)
{
    (void)t0;
    (void)t1;
    QuestCheck *qc = ud;
    for (int g = 0; g < HKV; g++)
        for (int j = 0; j < T; j++)
            qc->before[(size_t)g * T + j] = kvcache_has(&p->cache[g], j);
}

static void check_quest(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    QuestCheck *qc = ud;
    int page = qc->page, current = t / page, room = qc->budget / page - 1;
    double fetched = 0, live = 0;
    for (int g = 0; g < HKV; g++) {
        const KVCache *c = &p->cache[g];
        live += c->n;
        /* The current page is whole up to t; nothing after t. */
        for (int j = current * page; j < T; j++)
            assert_int_equal(kvcache_has(c, j), j <= t);
        /* Every other page is whole or absent; as many as fit, the best by bound. */
        int loaded = 0;
        double lowest_in = INFINITY, highest_out = -INFINITY;
        for (int pg = 0; pg < current; pg++) {
            bool in = kvcache_has(c, pg * page);
            for (int j = pg * page; j < (pg + 1) * page; j++)
                assert_int_equal(kvcache_has(c, j), in);
            double b = page_bound(qc->fx, g, pg, page, t);
            if (in) {
                loaded++;
                lowest_in = fmin(lowest_in, b);
            } else {
                highest_out = fmax(highest_out, b);
            }
        }
        assert_int_equal(loaded, current < room ? current : room);
        assert_true(lowest_in >= highest_out - 1e-4 * (1 + fabs(highest_out)));
        assert_true(c->n <= qc->budget);
        for (int s = 0; s < c->n; s++)
            if (c->pos[s] < t && !qc->before[(size_t)g * T + c->pos[s]])
                fetched++;
    }
    MemReport m = {0};
    p->type->memory(p, &m);
    assert_float_equal(m.fetched_tokens, fetched, 0);
    assert_float_equal(m.to_device_bytes, kv_entry_bytes(fetched, D, BITS), 1e-9);
    assert_float_equal(m.device_bytes, kv_entry_bytes(live, D, BITS), 1e-9);
    assert_float_equal(m.host_bytes, kv_entry_bytes((double)HKV * (t + 1), D, BITS), 1e-9);
    assert_float_equal(m.to_host_bytes, kv_entry_bytes(HKV, D, BITS), 1e-9);
    assert_float_equal(m.allocated_bytes,
                        m.device_bytes + kv_entry_bytes((double)HKV * ((t + 1) / page), D, BITS),
                        1e-9);
    qc->steps++;
}

static void run_quest(int budget, int page, int P, uint64_t seed, int chunk)
{
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(fx, seed, 1.0);
    fx->prefill_chunk = chunk;
    char params[64];
    snprintf(params, sizeof params, "budget=%d page=%d", budget, page);
    Policy *p = fixture_policy(fx, "quest", params, 7);
    QuestCheck qc = {fx, budget, page, NULL, 0};
    qc.before = calloc((size_t)HKV * T, sizeof *qc.before);
    fixture_run_hooked(fx, p, T, snapshot, check_quest, &qc);
    assert_int_equal(qc.steps, T - P);
    free(qc.before);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_quest_loads_pages_of_highest_bound(void **state)
{
    (void)state;
    run_quest(32, 8, 60, 1, 0);
    run_quest(32, 8, 60, 2, 7);
    run_quest(24, 5, 40, 3, 0); /* 4 pages of 5: 20 tokens of the budget of 24 */
    run_quest(16, 16, 50, 4, 0); /* one page: the current one only */
    run_quest(200, 4, 30, 5, 0); /* every page fits for a while */
}

/* A page that every query's direction points at is loaded at every step although it is old;
 * with dense_layers covering the layer every token is loaded. */
static void test_quest_planted_page(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(2, 1, D, 100, 40);
    fixture_randomize(fx, 6, 0.3);
    for (int t = 0; t < 100; t++)
        for (int h = 0; h < 2; h++)
            fx_q(fx, h, t)[0] = 3.0f;
    for (int j = 8; j < 16; j++)
        fx_k(fx, 0, j)[0] = 3.0f; /* page 1 of 8 tokens */
    Policy *p = fixture_policy(fx, "quest", "budget=24 page=8", 7);
    fixture_run(fx, p, 100, NULL, NULL);
    for (int j = 8; j < 16; j++)
        assert_true(kvcache_has(&p->cache[0], j));
    assert_true(p->cache[0].n <= 24);
    p->type->destroy(p);
    p = fixture_policy(fx, "quest", "budget=24 page=8 dense_layers=1", 7);
    fixture_run(fx, p, 100, NULL, NULL);
    assert_int_equal(p->cache[0].n, 100);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_quest_rejects_budget_below_page(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("quest");
    assert_non_null(type);
    void *prm = calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(policy_param_set(type, prm, "budget", "15", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "page"));
    assert_int_equal(policy_param_set(type, prm, "budget", "16", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quest_loads_pages_of_highest_bound),
        cmocka_unit_test(test_quest_planted_page),
        cmocka_unit_test(test_quest_rejects_budget_below_page),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
