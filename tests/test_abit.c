/* abit: ABIT segmentation finds runs of similar keys; the query brings back the cluster it points
 * at; Global and Local are always attended; the budget holds; the host tier is accounted. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>

#include "policies/abit.h"
#include "sim/format/geometry.h"
#include "tests/support/fixture.h"

static const AbitSplit default_split = {.window = 3, .min_split = 8, .max_split = 512,
                                        .tolerance = 5, .min_cluster = 8};

/* Fills features [n][dim] with runs: run r has len[r] rows along basis vector axis[r], plus
 * N(0, noise^2) per component. */
static float *runs_of(int dim, int n_runs, const int *len, const int *axis, double noise,
                      int *n_out)
{
    int n = 0;
    for (int r = 0; r < n_runs; r++)
        n += len[r];
    float *f = kv_calloc((size_t)n * dim, sizeof *f);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 42);
    int row = 0;
    for (int r = 0; r < n_runs; r++)
        for (int i = 0; i < len[r]; i++, row++) {
            for (int d = 0; d < dim; d++)
                f[(size_t)row * dim + d] = (float)gsl_ran_gaussian(rng, noise);
            f[(size_t)row * dim + axis[r]] += 1.0f;
        }
    gsl_rng_free(rng);
    *n_out = n;
    return f;
}

static void test_abit_segments_three_blocks(void **state)
{
    (void)state;
    const int len[] = {20, 30, 25}, axis[] = {0, 1, 2};
    int n;
    float *f = runs_of(16, 3, len, axis, 0.02, &n);
    int starts[75];
    assert_int_equal(abit_segment(f, n, 16, &default_split, starts), 3);
    assert_int_equal(starts[0], 0);
    assert_int_equal(starts[1], 20);
    assert_int_equal(starts[2], 50);
    free(f);
}

static void test_abit_short_segments_merge(void **state)
{
    (void)state;
    int starts[64], n;
    /* A 3-token blip after a run joins that run. */
    const int len_a[] = {20, 3, 30}, axis_a[] = {0, 3, 1};
    float *f = runs_of(16, 3, len_a, axis_a, 0.02, &n);
    assert_int_equal(abit_segment(f, n, 16, &default_split, starts), 2);
    assert_int_equal(starts[0], 0);
    assert_int_equal(starts[1], 23);
    free(f);
    /* A short first run has nothing before it: it joins the next. */
    const int len_b[] = {3, 20, 30}, axis_b[] = {3, 0, 1};
    f = runs_of(16, 3, len_b, axis_b, 0.02, &n);
    assert_int_equal(abit_segment(f, n, 16, &default_split, starts), 2);
    assert_int_equal(starts[0], 0);
    assert_int_equal(starts[1], 23);
    free(f);
}

/* tricache: TriCache's merge (ABITClustering's loop): a short segment loses its end boundary
 * and absorbs the next one, checked again; a short last segment joins the previous one. The
 * same runs under kvsim's backward merge for contrast. */
static void test_abit_forward_merge(void **state)
{
    (void)state;
    AbitSplit fwd = default_split, back = default_split;
    fwd.forward_merge = true;
    int starts[64], n;
    /* Runs 20, 4, 4, 30: forward, [20, 24) absorbs [24, 28), and the merged 8 tokens are a
     * cluster; backward, both short runs join the first. */
    const int len_a[] = {20, 4, 4, 30}, axis_a[] = {0, 3, 4, 1};
    float *f = runs_of(16, 4, len_a, axis_a, 0.02, &n);
    assert_int_equal(abit_segment(f, n, 16, &fwd, starts), 3);
    assert_int_equal(starts[1], 20);
    assert_int_equal(starts[2], 28);
    assert_int_equal(abit_segment(f, n, 16, &back, starts), 2);
    assert_int_equal(starts[1], 28);
    free(f);
    /* Runs 20, 12, 3, 30, then a short last run: forward, the 3-token blip opens the 30-token
     * run's segment and the last 4 tokens join it; backward, the blip joins the 12. */
    const int len_b[] = {20, 12, 3, 30, 4}, axis_b[] = {0, 1, 3, 2, 5};
    f = runs_of(16, 5, len_b, axis_b, 0.02, &n);
    assert_int_equal(abit_segment(f, n, 16, &fwd, starts), 3);
    assert_int_equal(starts[1], 20);
    assert_int_equal(starts[2], 32);
    assert_int_equal(abit_segment(f, n, 16, &back, starts), 3);
    assert_int_equal(starts[1], 20);
    assert_int_equal(starts[2], 35);
    free(f);
}

/* tricache compares pre-RoPE keys and queries: a layer whose pre-RoPE vectors are the same but
 * whose positions are spread three times wider (its post-RoPE vectors differ) gets the same
 * clusters and retrievals at every step (top_keys = 0: the index is the mean keys, with no
 * attention in it). Post-RoPE similarity (the default) depends on the distances. */
typedef struct {
    int n;
    unsigned char *sets; /* [steps][Hkv][T] */
} SetLog;

static void log_sets(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)t;
    (void)full_attn;
    SetLog *lg = ud;
    int T = p->cache[0].n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++, lg->n++)
        for (int j = 0; j < T; j++)
            lg->sets[(size_t)lg->n * T + j] = kvcache_has(&p->cache[g], j);
}

static void run_spread(int spread, const char *params, SetLog *lg)
{
    const int Hq = 4, Hkv = 2, D = 16, T = 160, P = 100;
    Fixture *fx = fixture_new(Hq, Hkv, D, T, P);
    fixture_randomize(fx, 23, 1.0);
    /* The random vectors are pre-RoPE: rotate them to positions spread * i. */
    for (int i = 0; i < T; i++) {
        fx->meta.positions[i] = spread * i;
        for (int h = 0; h < Hq; h++)
            rope_apply(fx_q(fx, h, i), D, fx->meta.rope_layout, fx->L.rope_inv_freq, spread * i);
        for (int g = 0; g < Hkv; g++)
            rope_apply(fx_k(fx, g, i), D, fx->meta.rope_layout, fx->L.rope_inv_freq, spread * i);
    }
    lg->n = 0;
    lg->sets = kv_calloc((size_t)(T - P) * Hkv * T, 1);
    Policy *p = fixture_policy(fx, "abit", params, 7);
    fixture_run(fx, p, T, log_sets, lg);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_abit_tricache_pre_rope(void **state)
{
    (void)state;
    const char *base = "budget=40 local=8 span=24 min_split=2 max_split=8 min_cluster=2 "
                       "top_keys=0 max_clusters=8 pin_system=false";
    char params[256];
    for (int tricache = 1; tricache >= 0; tricache--) {
        snprintf(params, sizeof params, "%s tricache=%s", base, tricache ? "true" : "false");
        SetLog a, b;
        run_spread(1, params, &a);
        run_spread(3, params, &b);
        size_t bytes = (size_t)a.n * 160;
        assert_int_equal(a.n, b.n);
        if (tricache)
            assert_memory_equal(a.sets, b.sets, bytes);
        else
            assert_true(memcmp(a.sets, b.sets, bytes) != 0);
        free(a.sets);
        free(b.sets);
    }
}

static void test_abit_segments_are_ordered_and_not_short(void **state)
{
    (void)state;
    const int n = 300, dim = 8;
    Fixture *fx = fixture_new(1, 1, dim, n, n);
    fixture_randomize(fx, 9, 1.0);
    int *starts = kv_malloc((size_t)n * sizeof *starts);
    int count = abit_segment(fx->k, n, dim, &default_split, starts);
    assert_true(count >= 1);
    assert_int_equal(starts[0], 0);
    for (int s = 0; s < count; s++) {
        int end = s + 1 < count ? starts[s + 1] : n;
        assert_true(end - starts[s] >= default_split.min_cluster);
    }
    /* Deterministic. */
    int *again = kv_malloc((size_t)n * sizeof *again);
    assert_int_equal(abit_segment(fx->k, n, dim, &default_split, again), count);
    assert_memory_equal(starts, again, (size_t)count * sizeof *starts);
    assert_int_equal(abit_segment(fx->k, 0, dim, &default_split, starts), 0);
    assert_int_equal(abit_segment(fx->k, 1, dim, &default_split, starts), 1);
    free(again);
    free(starts);
    fixture_free(fx);
}

static void set_system(Fixture *fx, int n_system)
{
    for (int j = 0; j < fx->L.n_tokens; j++)
        fx->meta.segments[j] = j < n_system ? 0 : 1;
}

/* Prompt: system tokens 0..3, then three blocks of 24 near-identical keys (block b of KV head g
 * along e_{4g+b}), then filler along e_{4g+3} (the rest of the prompt and every decode token).
 * The query of step t points along block (t − P) mod 3's direction. */
enum { BLOCK = 24, FIRST_BLOCK = 4, RET_P = 84, RET_T = 104 };

static Fixture *blocks_layer(void)
{
    const int D = 16;
    Fixture *fx = fixture_new(4, 2, D, RET_T, RET_P);
    fixture_randomize(fx, 3, 0.05);
    set_system(fx, FIRST_BLOCK);
    for (int g = 0; g < 2; g++)
        for (int j = FIRST_BLOCK; j < RET_T; j++) {
            int b = j < FIRST_BLOCK + 3 * BLOCK ? (j - FIRST_BLOCK) / BLOCK : 3;
            fx_k(fx, g, j)[4 * g + b] += 3.0f;
        }
    for (int h = 0; h < 4; h++)
        for (int t = RET_P; t < RET_T; t++)
            fx_q(fx, h, t)[4 * (h / 2) + (t - RET_P) % 3] += 4.0f;
    return fx;
}

static void check_block_retrieved(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    int *steps = ud;
    int target = (t - RET_P) % 3;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= 42);
        for (int b = 0; b < 3; b++)
            for (int j = FIRST_BLOCK + b * BLOCK; j < FIRST_BLOCK + (b + 1) * BLOCK; j++)
                assert_int_equal(kvcache_has(c, j), b == target);
    }
    (*steps)++;
}

static void test_abit_retrieves_the_block_the_query_points_at(void **state)
{
    (void)state;
    Fixture *fx = blocks_layer();
    /* Room for retrieval: 42 − 4 Global − 8 Local = 30, one block but not two. The 72 block
     * tokens leave the local window at prefill and are segmented as one span. */
    Policy *p = fixture_policy(fx, "abit", "budget=42 local=8 span=72", 7);
    int steps = 0;
    fixture_run(fx, p, RET_T, check_block_retrieved, &steps);
    assert_int_equal(steps, RET_T - RET_P);
    p->type->destroy(p);
    fixture_free(fx);
}

/* Invariants and the host tier on a random layer with incremental segmentation. */
typedef struct {
    int budget, local, n_global, n_system;
    bool *prev;  /* [Hkv][T] cache at the previous step */
    bool has_prev;
    int retrieving_steps, fetching_steps;
} TierCheck;

static void check_tiers(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    TierCheck *tc = ud;
    const int T = p->cache[0].n_tokens, H = p->n_kv_heads, D = p->cache[0].head_dim;
    const double entry_bytes = 2.0 * D * 2; /* K and V at 16 bits */
    double live = 0, fetched = 0;
    int retrieved = 0;
    for (int g = 0; g < H; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= tc->budget);
        live += c->n;
        for (int j = 0; j < tc->n_global; j++)
            assert_true(kvcache_has(c, j));
        for (int j = t - tc->local + 1; j <= t; j++)
            assert_true(kvcache_has(c, j));
        bool *prev = tc->prev + (size_t)g * T;
        for (int s = 0; s < c->n; s++) {
            int pos = c->pos[s];
            assert_true(pos >= 0 && pos <= t);
            if (pos >= tc->n_global && pos <= t - tc->local)
                retrieved++;
            if (tc->has_prev && pos != t && !prev[pos])
                fetched++;
        }
        for (int j = 0; j < T; j++)
            prev[j] = kvcache_has(c, j);
    }
    MemReport m = {0};
    p->type->memory(p, &m);
    /* Everything that is neither Global nor Local lives on the host, once. */
    int host_tokens = t + 1 - tc->n_global - tc->local;
    assert_float_equal(m.host_bytes, (double)host_tokens * H * entry_bytes, 1e-9);
    assert_float_equal(m.device_bytes, live * entry_bytes, 1e-9);
    assert_true(m.allocated_bytes > m.device_bytes); /* the cluster index */
    assert_float_equal(m.to_host_bytes, H * entry_bytes, 1e-9); /* token t − local left */
    if (tc->has_prev) {
        assert_float_equal(m.fetched_tokens, fetched, 1e-9);
        assert_float_equal(m.to_device_bytes, fetched * entry_bytes, 1e-9);
    }
    tc->has_prev = true;
    tc->retrieving_steps += retrieved > 0;
    tc->fetching_steps += fetched > 0;
}

static void run_tier_check(int n_system, int budget, int local, int span)
{
    const int T = 200, P = 40;
    Fixture *fx = fixture_new(4, 2, 8, T, P);
    fixture_randomize(fx, 17, 1.0);
    set_system(fx, n_system);
    char params[128];
    snprintf(params, sizeof params, "budget=%d local=%d span=%d", budget, local, span);
    Policy *p = fixture_policy(fx, "abit", params, 7);
    int n_global = n_system < budget - local ? n_system : budget - local;
    TierCheck tc = {budget, local, n_global, n_system, NULL, false, 0, 0};
    tc.prev = kv_calloc((size_t)2 * T, sizeof *tc.prev);
    fixture_run(fx, p, T, check_tiers, &tc);
    if (n_global + local < budget) {
        /* Retrieval does happen, and moves clusters in and out. */
        assert_true(tc.retrieving_steps > (T - P) / 2);
        assert_true(tc.fetching_steps > 0);
    } else {
        assert_int_equal(tc.retrieving_steps, 0); /* Global and Local fill the budget */
    }
    free(tc.prev);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_abit_budget_tiers_and_host_accounting(void **state)
{
    (void)state;
    run_tier_check(6, 40, 10, 16);
    /* A system segment longer than budget − local: only its first 30 tokens are Global (and
     * leave no room for retrieval); the rest goes through the host tier like any other token. */
    run_tier_check(36, 40, 10, 16);
}

static void test_abit_rejects_inconsistent_budgets(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("abit");
    assert_non_null(type);
    void *prm = kv_calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "budget", "1024", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "local = 1024"));
    assert_non_null(strstr(err.msg, "budget = 1024"));
    assert_int_equal(policy_param_set(type, prm, "local", "128", &err), 0);
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "min_split", "600", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "min_split"));
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_abit_segments_three_blocks),
        cmocka_unit_test(test_abit_short_segments_merge),
        cmocka_unit_test(test_abit_forward_merge),
        cmocka_unit_test(test_abit_tricache_pre_rope),
        cmocka_unit_test(test_abit_segments_are_ordered_and_not_short),
        cmocka_unit_test(test_abit_retrieves_the_block_the_query_points_at),
        cmocka_unit_test(test_abit_budget_tiers_and_host_accounting),
        cmocka_unit_test(test_abit_rejects_inconsistent_budgets),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
