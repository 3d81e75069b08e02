/* offload's defining properties: restored K/V are the min-max quantization of the originals
 * within half a step of the grid, the host tier is a FIFO of host_budget tokens, restoration
 * follows the threshold and max_restore, the device cache never exceeds budget, and the byte
 * counts follow the stated storage: bits per element plus a float32 scale and a float32 minimum
 * per group of each K and V vector. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "policies/hybrid.h"
#include "tests/support/fixture.h"
#include "tests/support/group_attention.h"

/* Host bytes of one token as this test states the storage (see the header comment). */
static double token_bytes(int head_dim, int bits, int group)
{
    int groups = group == 0 ? 1 : (head_dim + group - 1) / group;
    return 2.0 * head_dim * bits / 8.0 + 2.0 * groups * 8.0;
}

static int host_count(const Policy *p, int g, int32_t *buf)
{
    return offload_host_tokens(p, g, buf);
}

/* ---- restored K/V: quantization error bound and reported error ---- */

typedef struct {
    Fixture *fx;
    int budget, bits, group;
    bool *was_cached; /* [n_kv][T]: cache membership at the previous step */
    bool seen_step;
    int restored_checked;
    double worst_error; /* largest |x - x~| / scale seen */
} RestoreCheck;

/* Checks |x~ - x| <= scale / 2 per element, scale per group from the original x; returns
 * sum over the vector of the error norm relative to ||x||. */
static double check_bound(RestoreCheck *rc, const float *exact, const float *approx)
{
    int D = rc->fx->L.head_dim, width = rc->group ? rc->group : D;
    double err2 = 0, norm2 = 0;
    for (int start = 0; start < D; start += width) {
        int end = start + width < D ? start + width : D;
        double lo = exact[start], hi = exact[start];
        for (int i = start; i < end; i++) {
            lo = fmin(lo, exact[i]);
            hi = fmax(hi, exact[i]);
        }
        double scale = (hi - lo) / ((1 << rc->bits) - 1);
        for (int i = start; i < end; i++) {
            double e = fabs((double)approx[i] - exact[i]);
            assert_true(e <= scale / 2 * (1 + 1e-5) + 1e-6);
            if (scale > 0)
                rc->worst_error = fmax(rc->worst_error, e / scale);
            err2 += e * e;
            norm2 += (double)exact[i] * exact[i];
        }
    }
    return sqrt(err2) / sqrt(norm2);
}

static void check_restored(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)t;
    (void)full_attn;
    RestoreCheck *rc = ud;
    Fixture *fx = rc->fx;
    int T = fx->L.n_tokens, D = fx->L.head_dim;
    MemReport m = {0};
    p->type->memory(p, &m);
    int newly_restored = 0;
    double k_err = 0, v_err = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= rc->budget);
        bool *was = rc->was_cached + (size_t)g * T;
        for (int s = 0; s < c->n; s++) {
            assert_true(c->pos[s] >= 0);
            if (!c->alt_kv[s])
                continue;
            double ke = check_bound(rc, fx_k(fx, g, c->pos[s]), c->alt_kv[s]);
            double ve = check_bound(rc, fx_v(fx, g, c->pos[s]), c->alt_kv[s] + D);
            rc->restored_checked++;
            if (!was[c->pos[s]]) { /* came back in the observe of the previous step */
                newly_restored++;
                k_err += ke;
                v_err += ve;
            }
        }
        for (int j = 0; j < T; j++)
            was[j] = j <= t && kvcache_has(c, j);
    }
    if (rc->seen_step) {
        assert_float_equal(m.restored_tokens, newly_restored, 0);
        assert_float_equal(m.restore_k_err, k_err, 1e-4);
        assert_float_equal(m.restore_v_err, v_err, 1e-4);
        assert_float_equal(m.to_device_bytes,
                           newly_restored * token_bytes(D, rc->bits, rc->group), 1e-9);
    }
    rc->seen_step = true;
}

static double run_restore(int bits, int group)
{
    int T = 60, P = 16, budget = 12;
    Fixture *fx = fixture_new(4, 2, 16, T, P);
    fixture_randomize(fx, 21, 1.0);
    char params[160];
    snprintf(params, sizeof params, "budget=%d threshold=0 max_restore=2 bits=%d group=%d",
             budget, bits, group);
    Policy *p = fixture_policy(fx, "offload", params, 7);
    RestoreCheck rc = {.fx = fx, .budget = budget, .bits = bits, .group = group};
    rc.was_cached = kv_calloc((size_t)2 * T, sizeof *rc.was_cached);
    fixture_run(fx, p, T, check_restored, &rc);
    assert_true(rc.restored_checked > 50);
    /* Quantization happened: some element is off the original (at most half a grid step). */
    assert_true(rc.worst_error > 0.05 && rc.worst_error <= 0.5 + 1e-4);
    free(rc.was_cached);
    p->type->destroy(p);
    fixture_free(fx);
    return rc.worst_error;
}

static void test_restored_kv_within_quantization_bound(void **state)
{
    (void)state;
    run_restore(8, 4);
    run_restore(8, 0);
    run_restore(4, 4);
    run_restore(4, 0);
    run_restore(4, 5); /* 16 = 5 + 5 + 5 + 1: the last group is short */
}

/* ---- a huge threshold: no restoration, the host fills to host_budget, oldest dropped ---- */

typedef struct {
    Fixture *fx;
    int budget, host_budget;
    bool window; /* ratio 0: evictions are positions 0, 1, 2, ... in order */
    int32_t *buf;
    int *prev_n;       /* [n_kv] cache size at the previous step */
    int *evicted_sofar; /* [n_kv] */
    int full_steps;    /* head-steps with a full host tier */
    double prompt_evicted;
} HostCheck;

static void check_host_fifo(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    HostCheck *hc = ud;
    int D = hc->fx->L.head_dim;
    MemReport m = {0};
    p->type->memory(p, &m);
    assert_float_equal(m.restored_tokens, 0, 0);
    assert_float_equal(m.to_device_bytes, 0, 0);
    double host_tokens = 0, evicted_now = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_true(c->n <= hc->budget);
        /* Every position up to t was admitted once and never comes back: t + 1 - n are gone. */
        int evicted = t + 1 - c->n;
        evicted_now += evicted - hc->evicted_sofar[g];
        hc->evicted_sofar[g] = evicted;
        int n = host_count(p, g, hc->buf);
        int want = evicted < hc->host_budget ? evicted : hc->host_budget;
        assert_int_equal(n, want);
        host_tokens += n;
        if (n == hc->host_budget)
            hc->full_steps++;
        for (int i = 0; i < n; i++) {
            assert_false(kvcache_has(c, hc->buf[i]));
            if (hc->window) /* the newest `want` evicted positions, oldest first */
                assert_int_equal(hc->buf[i], evicted - want + i);
        }
        for (int s = 0; s < c->n; s++)
            assert_null(c->alt_kv[s]);
    }
    double per_token = token_bytes(D, 8, 64);
    assert_float_equal(m.host_bytes, host_tokens * per_token, 1e-9);
    /* The engine's first report comes after the first decode step's observe and carries the
     * prompt's offloads too; at step P there is no report yet. */
    if (t == hc->fx->L.n_prompt)
        hc->prompt_evicted = evicted_now;
    else
        assert_float_equal(m.to_host_bytes, (evicted_now + hc->prompt_evicted) * per_token, 1e-9);
    if (t == hc->fx->L.n_prompt + 1)
        hc->prompt_evicted = 0;
}

static void run_host_fifo(const char *ratio, bool window)
{
    int T = 80, P = 10, budget = 8, host_budget = 10;
    Fixture *fx = fixture_new(4, 2, 16, T, P);
    fixture_randomize(fx, 4, 1.0);
    char params[160];
    snprintf(params, sizeof params, "budget=%d ratio=%s host_budget=%d threshold=1e9", budget,
             ratio, host_budget);
    Policy *p = fixture_policy(fx, "offload", params, 7);
    int evicted_sofar[2] = {0, 0};
    HostCheck hc = {.fx = fx, .budget = budget, .host_budget = host_budget, .window = window,
                    .evicted_sofar = evicted_sofar};
    hc.buf = kv_malloc((size_t)T * sizeof *hc.buf);
    fixture_run(fx, p, T, check_host_fifo, &hc);
    /* The host is full from step 17 on: 8 live + 10 host = the 18 positions 0..17. */
    assert_int_equal(hc.full_steps, 2 * (T - 17));
    free(hc.buf);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_huge_threshold_never_restores_and_drops_oldest(void **state)
{
    (void)state;
    run_host_fifo("0", true);
    run_host_fifo("0.5", false);
}

/* ---- threshold 0: every host token qualifies, min(max_restore, importance slots) per step ---- */

typedef struct {
    Fixture *fx;
    int budget, cap; /* tokens restorable per step: min(max_restore, importance slots) */
    int32_t *buf;
    int prev_host; /* host tokens after the previous step's observe, -1 before the first */
    int prev_n;
    bool *was_cached;
    int restoring_steps;
} ZeroCheck;

static void check_threshold_zero(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    ZeroCheck *zc = ud;
    const KVCache *c = &p->cache[0];
    int T = zc->fx->L.n_tokens;
    MemReport m = {0};
    p->type->memory(p, &m);
    assert_true(c->n <= zc->budget);
    int newly = 0;
    for (int s = 0; s < c->n; s++)
        if (c->alt_kv[s] && !zc->was_cached[c->pos[s]])
            newly++;
    int host = host_count(p, 0, zc->buf);
    if (zc->prev_host >= 0) {
        int want = zc->prev_host < zc->cap ? zc->prev_host : zc->cap;
        assert_int_equal((int)m.restored_tokens, want);
        assert_int_equal(newly, want);
        /* n = previous n + restored - evicted + the arriving token. */
        int evicted = zc->prev_n + want + 1 - c->n;
        assert_int_equal(host, zc->prev_host - want + evicted);
        zc->restoring_steps += want == zc->cap;
    }
    zc->prev_host = host;
    zc->prev_n = c->n;
    for (int j = 0; j < T; j++)
        zc->was_cached[j] = j <= t && kvcache_has(c, j);
}

static void run_threshold_zero(int max_restore, int expected_cap)
{
    int T = 70, P = 30, budget = 16;
    Fixture *fx = fixture_new(2, 1, 8, T, P);
    fixture_randomize(fx, 8, 1.0);
    char params[160];
    snprintf(params, sizeof params, "budget=%d ratio=0.5 threshold=0 max_restore=%d", budget,
             max_restore);
    Policy *p = fixture_policy(fx, "offload", params, 7);
    ZeroCheck zc = {.fx = fx, .budget = budget, .cap = expected_cap, .prev_host = -1};
    zc.buf = kv_malloc((size_t)T * sizeof *zc.buf);
    zc.was_cached = kv_calloc((size_t)T, sizeof *zc.was_cached);
    fixture_run(fx, p, T, check_threshold_zero, &zc);
    assert_int_equal(zc.restoring_steps, T - P - 1); /* the host never runs short */
    free(zc.buf);
    free(zc.was_cached);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_threshold_zero_restores_up_to_max_restore(void **state)
{
    (void)state;
    run_threshold_zero(3, 3);
    /* floor(16 * 0.5) = 8 importance slots bound the restorations, not max_restore. */
    run_threshold_zero(100, 8);
}

/* ---- coupling = fixedsize: offloading comes with the summary slot, the host tier is
 * unquantized (quantize = auto), restored tokens come back exact ---- */

typedef struct {
    Fixture *fx;
    int budget, P;
    bool *prev;        /* [T] real positions cached at the previous step (after its step) */
    double *sum;       /* [2 * D] K and V summed over every eviction so far */
    int evictions, restored, steps;
} CouplingCheck;

static void check_coupling(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    CouplingCheck *cc = ud;
    const LayerView *L = &cc->fx->L;
    const KVCache *c = &p->cache[0];
    int T = L->n_tokens, D = L->head_dim;
    /* Evictions since the previous step: the prompt's truncation at the first step, then what
     * the previous step held and this one does not (a restored token is not one). */
    for (int j = 0; j < t; j++) {
        bool before = t == cc->P ? true : cc->prev[j];
        if (before && !kvcache_has(c, j)) {
            const float *k = L->k + (size_t)j * D, *v = L->v + (size_t)j * D;
            for (int d = 0; d < D; d++) {
                cc->sum[d] += k[d];
                cc->sum[D + d] += v[d];
            }
            cc->evictions++;
        }
        if (t > cc->P && !cc->prev[j] && kvcache_has(c, j))
            cc->restored++;
    }
    assert_true(c->n <= cc->budget);
    int synthetic = 0, n_real = 0;
    for (int s = 0; s < c->n; s++) {
        if (c->pos[s] >= 0) {
            assert_null(c->alt_kv[s]); /* restored from a full-precision host copy: exact */
            n_real++;
            continue;
        }
        synthetic++;
        for (int d = 0; d < 2 * D; d++)
            assert_float_equal(c->alt_kv[s][d], cc->sum[d] / cc->evictions, 1e-5);
    }
    assert_int_equal(synthetic, cc->evictions > 0);
    MemReport m = {0};
    p->type->memory(p, &m);
    int32_t *buf = kv_malloc((size_t)T * sizeof *buf);
    int host = host_count(p, 0, buf);
    free(buf);
    assert_float_equal(m.host_bytes, host * 2.0 * D * 2, 1e-9); /* K and V at 16 bits */
    assert_float_equal(m.device_bytes, c->n * 2.0 * D * 2, 1e-9);
    for (int j = 0; j < T; j++)
        cc->prev[j] = j <= t && kvcache_has(c, j);
    cc->steps++;
}

static void test_fixedsize_coupling(void **state)
{
    (void)state;
    int T = 90, P = 40, budget = 16;
    Fixture *fx = fixture_new(2, 1, 8, T, P);
    fixture_randomize(fx, 5, 1.0);
    Policy *p = fixture_policy(fx, "offload",
                               "budget=16 ratio=0.5 threshold=0.05 coupling=fixedsize", 7);
    CouplingCheck cc = {.fx = fx, .budget = budget, .P = P};
    cc.prev = kv_calloc((size_t)T, sizeof *cc.prev);
    cc.sum = kv_calloc(2 * 8, sizeof *cc.sum);
    fixture_run(fx, p, T, check_coupling, &cc);
    assert_int_equal(cc.steps, T - P);
    assert_true(cc.evictions > T - budget); /* restored tokens leave again */
    assert_true(cc.restored > 0);
    free(cc.prev);
    free(cc.sum);
    p->type->destroy(p);
    fixture_free(fx);
}

/* ---- an intermediate threshold: exactly the tokens whose mean over their last
 * importance_window observations exceeds it come back, at the next step ---- */

typedef struct {
    Fixture *fx;
    int window, cap;
    double threshold;
    double *history; /* [T][T]: observations of each position, in order */
    int *n_obs;      /* [T] */
    bool *was_cached;  /* [T]: the previous step's cache */
    bool *comes_back;  /* [T]: evicted last step with a mean above the threshold */
    int restored, stayed_out;
} MeanCheck;

static double recent_mean(const MeanCheck *mc, int pos)
{
    int T = mc->fx->L.n_tokens, n = mc->n_obs[pos] < mc->window ? mc->n_obs[pos] : mc->window;
    double sum = 0;
    for (int i = mc->n_obs[pos] - n; i < mc->n_obs[pos]; i++)
        sum += mc->history[(size_t)pos * T + i];
    return sum / n;
}

static void observe_prompt(MeanCheck *mc)
{
    Fixture *fx = mc->fx;
    int T = fx->L.n_tokens, P = fx->L.n_prompt, Hq = fx->L.n_q_heads;
    float *row = kv_malloc((size_t)Hq * T * sizeof *row);
    double *mass = kv_calloc((size_t)P, sizeof *mass);
    for (int i = 0; i < P; i++) {
        fixture_full_attn(fx, i, row);
        for (int h = 0; h < Hq; h++)
            for (int j = 0; j <= i; j++)
                mass[j] += row[(size_t)h * T + j];
    }
    for (int j = 0; j < P; j++) {
        mc->history[(size_t)j * T + mc->n_obs[j]++] = mass[j] / (P - j);
        mc->was_cached[j] = true; /* the prompt was in the cache before its truncation */
    }
    free(mass);
    free(row);
}

static void check_means(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    MeanCheck *mc = ud;
    Fixture *fx = mc->fx;
    int T = fx->L.n_tokens;
    const KVCache *c = &p->cache[0];
    if (t == fx->L.n_prompt)
        observe_prompt(mc);
    else
        for (int j = 0; j < t; j++) /* the restorations of the previous step's observe */
            if (mc->comes_back[j] || !mc->was_cached[j]) {
                bool back = kvcache_has(c, j);
                assert_int_equal(back, mc->comes_back[j]);
                if (back)
                    assert_non_null(c->alt_kv[c->slot_of[j]]);
                mc->restored += back;
            }
    /* What the previous truncation evicted, and whether its mean brings it back next step. */
    int n_back = 0;
    for (int j = 0; j < t; j++) {
        mc->comes_back[j] = false;
        if (mc->was_cached[j] && !kvcache_has(c, j)) {
            mc->comes_back[j] = recent_mean(mc, j) > mc->threshold;
            n_back += mc->comes_back[j];
            mc->stayed_out += !mc->comes_back[j];
        }
    }
    assert_true(n_back <= mc->cap); /* otherwise the cap decides, not the threshold */
    double *score = kv_malloc((size_t)c->n * sizeof *score);
    group_attention_over_cache(fx, c, 0, t, score);
    for (int s = 0; s < c->n; s++)
        mc->history[(size_t)c->pos[s] * T + mc->n_obs[c->pos[s]]++] = score[s];
    free(score);
    for (int j = 0; j < T; j++)
        mc->was_cached[j] = j <= t && kvcache_has(c, j);
}

static void test_restores_exactly_tokens_above_threshold(void **state)
{
    (void)state;
    int T = 90, P = 24;
    Fixture *fx = fixture_new(2, 1, 8, T, P);
    fixture_randomize(fx, 17, 1.6);
    Policy *p = fixture_policy(
        fx, "offload", "budget=16 ratio=0.5 threshold=0.15 importance_window=4 max_restore=100", 7);
    MeanCheck mc = {.fx = fx, .window = 4, .cap = 8, .threshold = 0.15};
    mc.history = kv_calloc((size_t)T * T, sizeof *mc.history);
    mc.n_obs = kv_calloc((size_t)T, sizeof *mc.n_obs);
    mc.was_cached = kv_calloc((size_t)T, sizeof *mc.was_cached);
    mc.comes_back = kv_calloc((size_t)T, sizeof *mc.comes_back);
    fixture_run(fx, p, T, check_means, &mc);
    /* Both outcomes happened often enough for the check to mean something. */
    assert_true(mc.restored >= 5);
    assert_true(mc.stayed_out >= 20);
    free(mc.history);
    free(mc.n_obs);
    free(mc.was_cached);
    free(mc.comes_back);
    p->type->destroy(p);
    fixture_free(fx);
}

/* ---- host byte accounting for several storage layouts ---- */

static void check_bytes(int bits, int group, int head_dim)
{
    int T = 40, P = 30, budget = 6;
    Fixture *fx = fixture_new(2, 2, head_dim, T, P);
    fixture_randomize(fx, 3, 1.0);
    char params[160];
    snprintf(params, sizeof params, "budget=%d ratio=0 threshold=1e9 bits=%d group=%d", budget,
             bits, group);
    Policy *p = fixture_policy(fx, "offload", params, 7);
    fixture_run(fx, p, T, NULL, NULL);
    MemReport m = {0};
    p->type->memory(p, &m);
    /* Each head: T tokens seen, budget - 1 left after the last truncation, the rest on host. */
    double host_tokens = 2.0 * (T - (budget - 1));
    assert_float_equal(m.host_bytes, host_tokens * token_bytes(head_dim, bits, group), 1e-9);
    assert_float_equal(m.device_bytes, 2.0 * (budget - 1) * 2 * head_dim * 2, 1e-9);
    p->type->destroy(p);
    fixture_free(fx);
}

static void test_host_bytes_follow_stated_storage(void **state)
{
    (void)state;
    check_bytes(8, 64, 16); /* one group wider than the vector */
    check_bytes(8, 4, 16);  /* 16 B codes + 4 groups * 8 B, per K and per V */
    check_bytes(4, 0, 16);  /* 8 B codes + one group */
    check_bytes(4, 5, 16);  /* 4 groups, the last short */
}

static void test_validate_bits(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("offload");
    assert_non_null(type);
    void *prm = kv_calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "bits", "6", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "bits"));
    assert_int_equal(policy_param_set(type, prm, "bits", "16", &err), -1);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_restored_kv_within_quantization_bound),
        cmocka_unit_test(test_huge_threshold_never_restores_and_drops_oldest),
        cmocka_unit_test(test_threshold_zero_restores_up_to_max_restore),
        cmocka_unit_test(test_restores_exactly_tokens_above_threshold),
        cmocka_unit_test(test_host_bytes_follow_stated_storage),
        cmocka_unit_test(test_fixedsize_coupling),
        cmocka_unit_test(test_validate_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
