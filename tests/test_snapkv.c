/* snapkv's defining property: after prefill the cache is exactly the observation window plus
 * the prompt tokens of highest pooled observation-window attention; during decode those stay
 * and the rest of the budget slides. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

/* The test's own scores: attention of the last `obs` prompt queries on each prompt token
 * before the window, summed over the queries and the group's heads, max-pooled over `kernel`
 * (avg: summed over the neighbours in range and divided by kernel, zeros outside); per_head
 * (order = pool_reduce): each head's sums pooled, then summed over the group. */
static void pool_into(const double *raw, int prefix, int kernel, bool avg, double *pooled)
{
    for (int j = 0; j < prefix; j++) {
        double v = 0;
        for (int i = j - kernel / 2; i <= j + kernel / 2; i++)
            if (i >= 0 && i < prefix && (avg || raw[i] > v))
                v = avg ? v + raw[i] / kernel : raw[i];
        pooled[j] += v;
    }
}

static void pooled_scores(const Fixture *fx, int g, int obs, int kernel, bool avg, bool per_head,
                          double *pooled)
{
    const LayerView *L = &fx->L;
    int P = L->n_prompt, T = L->n_tokens, prefix = P - obs;
    double *raw = calloc((size_t)P, sizeof *raw);
    float *row = malloc((size_t)L->n_q_heads * T * sizeof *row);
    for (int j = 0; j < prefix; j++)
        pooled[j] = 0;
    for (int h = g * L->group; h < (g + 1) * L->group; h++) {
        if (per_head || h == g * L->group)
            for (int j = 0; j < prefix; j++)
                raw[j] = 0;
        for (int i = prefix; i < P; i++) {
            fixture_full_attn(fx, i, row);
            for (int j = 0; j < prefix; j++)
                raw[j] += row[(size_t)h * T + j];
        }
        if (per_head)
            pool_into(raw, prefix, kernel, avg, pooled);
    }
    if (!per_head)
        pool_into(raw, prefix, kernel, avg, pooled);
    free(raw);
    free(row);
}

typedef struct {
    const Fixture *fx;
    int budget, obs, kernel;
    bool grow, avg, per_head;
    int32_t *pinned; /* [Hkv][T] 1 if kept from before the window at the first step */
    int steps;
} SnapCheck;

static void check_snapkv(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    SnapCheck *sc = ud;
    const LayerView *L = &sc->fx->L;
    int P = L->n_prompt, T = L->n_tokens, prefix = P - sc->obs;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        int32_t *pinned = sc->pinned + (size_t)g * T;
        if (t == P) {
            /* The prompt as compressed: the window, and the best budget-1-obs before it. */
            for (int j = prefix; j <= P; j++)
                assert_true(kvcache_has(c, j));
            assert_int_equal(c->n, sc->budget);
            double *pooled = malloc((size_t)P * sizeof *pooled);
            pooled_scores(sc->fx, g, sc->obs, sc->kernel, sc->avg, sc->per_head, pooled);
            double lowest_kept = 1e300, highest_dropped = -1e300;
            int kept = 0;
            for (int j = 0; j < prefix; j++) {
                pinned[j] = kvcache_has(c, j);
                if (pinned[j]) {
                    kept++;
                    lowest_kept = pooled[j] < lowest_kept ? pooled[j] : lowest_kept;
                } else if (pooled[j] > highest_dropped) {
                    highest_dropped = pooled[j];
                }
            }
            assert_int_equal(kept, sc->budget - 1 - sc->obs);
            assert_true(lowest_kept >= highest_dropped - 1e-5);
            free(pooled);
            continue;
        }
        /* Decode: the pinned prompt tokens stay. */
        for (int j = 0; j < prefix; j++)
            assert_int_equal(kvcache_has(c, j), pinned[j]);
        int n_pinned = sc->budget - 1 - sc->obs;
        if (sc->grow) {
            /* Nothing evicted: everything from the window on is there. */
            assert_int_equal(c->n, n_pinned + (t - prefix + 1));
            continue;
        }
        /* The rest is the most recent budget - n_pinned tokens. */
        assert_int_equal(c->n, sc->budget);
        int tail = sc->budget - n_pinned;
        for (int j = prefix; j <= t; j++)
            assert_int_equal(kvcache_has(c, j), j > t - tail);
    }
    sc->steps++;
}

/* Runs snapkv on a fixture of 4 query heads over 2 KV heads, checks every step, and returns
 * the prompt tokens kept before the window ([2][110], the caller frees). */
static int32_t *run_snapkv_order(uint64_t seed, double sigma, int budget, int obs, int kernel,
                                 bool grow, bool avg, bool per_head)
{
    Fixture *fx = fixture_new(4, 2, 8, 110, 70);
    fixture_randomize(fx, seed, sigma);
    char params[160];
    snprintf(params, sizeof params,
             "budget=%d observation=%d kernel=%d decode=%s pool=%s order=%s", budget, obs,
             kernel, grow ? "grow" : "window", avg ? "avg" : "max",
             per_head ? "pool_reduce" : "reduce_pool");
    Policy *p = fixture_policy(fx, "snapkv", params, 7);
    assert_int_equal(p->want_prefill_rows, obs);
    SnapCheck sc = {fx, budget, obs, kernel, grow, avg, per_head, NULL, 0};
    sc.pinned = calloc((size_t)2 * 110, sizeof *sc.pinned);
    fixture_run(fx, p, 110, check_snapkv, &sc);
    assert_int_equal(sc.steps, 40);
    p->type->destroy(p);
    fixture_free(fx);
    return sc.pinned;
}

static void run_snapkv_pool(uint64_t seed, double sigma, int budget, int obs, int kernel,
                            bool grow, bool avg)
{
    free(run_snapkv_order(seed, sigma, budget, obs, kernel, grow, avg, false));
}

static void run_snapkv(uint64_t seed, double sigma, int budget, int obs, int kernel, bool grow)
{
    run_snapkv_pool(seed, sigma, budget, obs, kernel, grow, false);
}

/* order = pool_reduce (kvpress's SnapKVPress.score: each head pooled, then the group reduced):
 * the kept tokens are the best by that score; with max-pooling the two orders keep different
 * tokens on some of these prompts, so the option is not a no-op. */
static void test_snapkv_pool_then_reduce(void **state)
{
    (void)state;
    int differ = 0;
    for (uint64_t seed = 1; seed <= 4; seed++) {
        int32_t *a = run_snapkv_order(seed, 2.0, 24, 8, 7, false, false, false);
        int32_t *b = run_snapkv_order(seed, 2.0, 24, 8, 7, false, false, true);
        differ += memcmp(a, b, (size_t)2 * 110 * sizeof *a) != 0;
        free(a);
        free(b);
    }
    assert_true(differ > 0);
    free(run_snapkv_order(5, 1.0, 24, 8, 5, false, true, true));
}

static void test_snapkv_window_plus_top_pooled(void **state)
{
    (void)state;
    run_snapkv(1, 1.0, 24, 8, 7, false);
    run_snapkv(2, 2.0, 24, 8, 1, false);
    run_snapkv(3, 1.5, 30, 4, 3, false);
    run_snapkv(4, 1.5, 24, 8, 7, true);
}

/* pool = avg: the zero-padded mean over the kernel (kvpress's and the reference's pooling). */
static void test_snapkv_avg_pool(void **state)
{
    (void)state;
    run_snapkv_pool(1, 1.0, 24, 8, 5, false, true);
    run_snapkv_pool(2, 2.0, 24, 8, 7, false, true);
    run_snapkv_pool(3, 1.5, 30, 4, 3, true, true);
}

/* The window's queries point at four chosen tokens: those are kept (with kernel 1 exactly those;
 * with kernel 7 also their three neighbours on each side) and the rest of the prefix is not. */
static void test_snapkv_keeps_tokens_the_window_attends(void **state)
{
    (void)state;
    const int chosen[4] = {5, 20, 33, 47};
    for (int kernel = 1; kernel <= 7; kernel += 6) {
        Fixture *fx = fixture_new(2, 1, 16, 80, 64);
        fixture_randomize(fx, 9, 0.2);
        for (int i = 0; i < 4; i++)
            fx_k(fx, 0, chosen[i])[0] = 6.0f;
        for (int t = 64 - 8; t < 64; t++)
            for (int h = 0; h < 2; h++)
                fx_q(fx, h, t)[0] = 6.0f;
        int budget = 8 + 1 + 4 * kernel;
        char params[96];
        snprintf(params, sizeof params, "budget=%d observation=8 kernel=%d", budget, kernel);
        Policy *p = fixture_policy(fx, "snapkv", params, 7);
        fixture_run(fx, p, 64, NULL, NULL); /* prefill only */
        const KVCache *c = &p->cache[0];
        assert_int_equal(c->n, budget - 1);
        for (int j = 0; j < 64 - 8; j++) {
            int want = 0;
            for (int i = 0; i < 4; i++)
                want |= abs(j - chosen[i]) <= kernel / 2;
            assert_int_equal(kvcache_has(c, j), want);
        }
        for (int j = 64 - 8; j < 64; j++)
            assert_true(kvcache_has(c, j));
        p->type->destroy(p);
        fixture_free(fx);
    }
}

static void test_snapkv_rejects_bad_shapes(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("snapkv");
    assert_non_null(type);
    void *prm = calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "kernel", "6", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "kernel"));
    policy_params_defaults(type, prm);
    assert_int_equal(policy_param_set(type, prm, "budget", "32", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "observation"));
    free(prm);
}

/* Two turns fed in chunks of 7 (dividing no span): snapkv admits every chunk whole and compresses
 * once per span, on its last chunk, to the window (the last min(observation, last chunk)
 * tokens) and the best tokens before it, budget - 1 in all. */
enum { MT_T = 100, MT_P = 60, MT_BUDGET = 24, MT_OBS = 4 };
static const TraceSpan TWO_TURNS[] = {
    {SPAN_PREFILL, 0, MT_P}, {SPAN_DECODE, MT_P, 70}, {SPAN_PREFILL, 70, 90}, {SPAN_DECODE, 90, MT_T}};

typedef struct {
    int held_at_span_start; /* slots of a KV head's cache when the current span began */
    int span_start, span_end;
    int chunks_seen, compressions;
} ChunkCheck;

/* Before positions [t0, t1) arrive: the cache after the previous prefill chunk, if it was one. */
static void check_after_chunk(int t0, int t1, const Policy *p, void *ud)
{
    ChunkCheck *cc = ud;
    for (size_t s = 0; s < sizeof TWO_TURNS / sizeof TWO_TURNS[0]; s++)
        if (TWO_TURNS[s].kind == SPAN_PREFILL && t0 == TWO_TURNS[s].start && t1 > t0) {
            cc->span_start = TWO_TURNS[s].start;
            cc->span_end = TWO_TURNS[s].end;
            cc->held_at_span_start = p->cache[0].n;
        }
    bool after_chunk = t0 > cc->span_start && t0 <= cc->span_end && t0 != cc->span_start;
    if (!after_chunk || cc->span_end == 0)
        return;
    cc->chunks_seen++;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        if (t0 < cc->span_end) { /* not the span's last chunk: nothing evicted yet */
            assert_int_equal(c->n, cc->held_at_span_start + t0 - cc->span_start);
            continue;
        }
        int last = (cc->span_end - cc->span_start) % 7 ? (cc->span_end - cc->span_start) % 7 : 7;
        int window = last < MT_OBS ? last : MT_OBS;
        assert_int_equal(c->n, MT_BUDGET - 1);
        for (int j = t0 - window; j < t0; j++)
            assert_true(kvcache_has(c, j));
    }
    if (t0 == cc->span_end) {
        cc->compressions++;
        cc->span_end = 0; /* until the next span begins */
    }
}

static void test_snapkv_compresses_once_per_span(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(4, 2, 16, MT_T, MT_P);
    fixture_randomize(fx, 11, 1.0);
    fixture_set_spans(fx, TWO_TURNS, 4);
    fx->prefill_chunk = 7;
    Policy *p = fixture_policy(fx, "snapkv", "budget=24 observation=4 kernel=3", 1);
    ChunkCheck cc = {0};
    fixture_run_hooked(fx, p, MT_T, check_after_chunk, NULL, &cc);
    assert_int_equal(cc.compressions, 2);
    assert_int_equal(cc.chunks_seen, 9 + 3); /* ceil(60 / 7) + ceil(20 / 7) */
    p->type->destroy(p);
    fixture_free(fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_snapkv_window_plus_top_pooled),
        cmocka_unit_test(test_snapkv_avg_pool),
        cmocka_unit_test(test_snapkv_pool_then_reduce),
        cmocka_unit_test(test_snapkv_keeps_tokens_the_window_attends),
        cmocka_unit_test(test_snapkv_rejects_bad_shapes),
        cmocka_unit_test(test_snapkv_compresses_once_per_span),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
