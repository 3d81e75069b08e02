/* oracle_topk's defining property: at every step its cache is the `budget` keys of highest true
 * attention summed over the group, so its group-mean retained mass is at least that of any
 * policy holding at most `budget` tokens, step by step. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "policies/rank.h"
#include "tests/support/fixture.h"
#include "tests/support/mass_trace.h"

typedef struct {
    const Fixture *fx;
    int budget, steps;
} TopkCheck;

static void check_topk(int t, const Policy *p, const float *full_attn, void *ud)
{
    TopkCheck *tc = ud;
    const LayerView *L = &tc->fx->L;
    int T = L->n_tokens;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        assert_int_equal(c->n, t + 1 < tc->budget ? t + 1 : tc->budget);
        double lowest_kept = 1e300, highest_dropped = -1e300;
        for (int j = 0; j <= t; j++) {
            double score = 0;
            for (int h = g * L->group; h < (g + 1) * L->group; h++)
                score += full_attn[(size_t)h * T + j];
            if (kvcache_has(c, j))
                lowest_kept = score < lowest_kept ? score : lowest_kept;
            else if (score > highest_dropped)
                highest_dropped = score;
        }
        assert_true(lowest_kept >= highest_dropped - 1e-6);
    }
    tc->steps++;
}

static void test_oracle_topk_is_top_budget_by_group_sum(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= 3; seed++) {
        Fixture *fx = fixture_new(4, 2, 8, 90, 30);
        fixture_randomize(fx, seed, 0.8 + seed * 0.6);
        Policy *p = fixture_policy(fx, "oracle_topk", "budget=12", 7);
        assert_true(p->is_oracle);
        TopkCheck tc = {fx, 12, 0};
        fixture_run(fx, p, 90, check_topk, &tc);
        assert_int_equal(tc.steps, 60);
        p->type->destroy(p);
        fixture_free(fx);
    }
}

/* Every other policy at the same budget, driven on the same layer: at no step and no KV head
 * does any of them retain more group-mean mass than the oracle. */
static void test_oracle_topk_dominates_every_policy_each_step(void **state)
{
    (void)state;
    static const char *const others[][2] = {
        {"h2o", "budget=16"},
        {"tova", "budget=16"},
        {"random", "budget=16"},
        {"window", "window=12 sinks=4"},
        {"snapkv", "budget=16 observation=4"},
        {"oracle_future", "budget=16"},
        {"decay", "budget=16 local=4"},
        {"abit", "budget=16 local=4 span=8 min_split=2 max_split=4 tolerance=1 min_cluster=2"},
        {"hybrid", "budget=16 ratio=0.5"},
        {"offload", "budget=16 ratio=0.5 threshold=0"},
        /* trig holds up to budget + divide_length - 1 between prunes: prune every token so
         * that it is held to the same budget */
        {"trig", "budget=16 divide_length=1 protect_initial=2 protect_recent=4"},
    };
    enum { HKV = 2, T = 120, P = 40, STEPS = T - P };
    for (uint64_t seed = 1; seed <= 3; seed++) {
        Fixture *fx = fixture_new(4, HKV, 8, T, P);
        fixture_randomize(fx, seed, 1.0 + seed * 0.5);
        double bound[STEPS * HKV], mass[STEPS * HKV];
        mass_trace_run(fx, "oracle_topk", "budget=16", 7, bound);
        for (size_t k = 0; k < sizeof others / sizeof others[0]; k++) {
            mass_trace_run(fx, others[k][0], others[k][1], 7, mass);
            int strictly_below = 0;
            for (int i = 0; i < STEPS * HKV; i++) {
                assert_true(bound[i] >= mass[i] - 1e-6);
                strictly_below += mass[i] < bound[i] - 1e-4;
            }
            /* Not equal by accident: every one of them loses mass at some step. */
            assert_true(strictly_below > 0);
        }
        fixture_free(fx);
    }
}

static int cmp_pos(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The order of rank.h, written out for qsort: a higher score first, between equal scores (as
 * doubles: -0.0 == +0.0) the later position first. */
static const double *sort_score;
static int best_first(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (sort_score[x] != sort_score[y])
        return sort_score[x] > sort_score[y] ? -1 : 1;
    return (x < y) - (x > y);
}

/* rank_sort_best gives the unique order a comparison sort by rank.h's order gives: scores with
 * many ties, negative scores, +0.0 and -0.0 mixed (equal doubles: the later position first),
 * huge and tiny magnitudes, positions in any order and not all of [0, n), 0 to 3000 of them
 * (each radix byte moving or not). Its first k are the set rank_keep_best keeps for every k,
 * which is what a nest of oracle_topk budgets relies on. */
static void test_sort_best_is_a_comparison_sort(void **state)
{
    (void)state;
    enum { N = 3000 };
    static double score[2 * N];
    static int32_t pos[N], want[N], kept[N];
    uint64_t x = 777;
    for (int round = 0; round < 60; round++) {
        int n = round < 3 ? round : 1 + (int)((uint64_t)round * 977 % N);
        int kind = round % 5;
        for (int j = 0; j < 2 * N; j++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            int64_t r = (int64_t)(x >> 33) % 7 - 3; /* -3..3: ties, negatives, zeros */
            score[j] = kind == 0   ? (double)r                          /* few levels */
                       : kind == 1 ? (r == 0 ? ((x >> 20) & 1 ? -0.0 : 0.0) : r * 1e-300)
                       : kind == 2 ? ((x >> 20) & 1 ? -0.0 : 0.0)       /* signed zeros only */
                       : kind == 3 ? (double)(int64_t)(x >> 11) * (r < 0 ? -1e200 : 1e-200)
                                   : 0.5; /* one score: the position alone decides */
        }
        /* n distinct positions of [0, 2N), shuffled */
        for (int j = 0; j < n; j++)
            pos[j] = 2 * j + (round & 1);
        for (int j = n - 1; j > 0; j--) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            int i = (int)((x >> 33) % (uint64_t)(j + 1));
            int32_t tmp = pos[i];
            pos[i] = pos[j];
            pos[j] = tmp;
        }
        memcpy(want, pos, (size_t)n * sizeof *pos);
        memcpy(kept, pos, (size_t)n * sizeof *pos);
        sort_score = score;
        qsort(want, (size_t)n, sizeof *want, best_first);
        rank_sort_best(pos, n, score);
        for (int j = 0; j < n; j++)
            if (pos[j] != want[j])
                fail_msg("round %d (n %d, kind %d): rank %d holds position %d (score %g), "
                         "the order wants %d (score %g)",
                         round, n, kind, j, pos[j], score[pos[j]], want[j], score[want[j]]);
        /* the first k: the set rank_keep_best keeps */
        for (int k = 1; k < n; k += 1 + n / 7) {
            rank_keep_best(kept, n, k, score);
            int32_t a[N], b[N];
            memcpy(a, kept, (size_t)k * sizeof *a);
            memcpy(b, pos, (size_t)k * sizeof *b);
            qsort(a, (size_t)k, sizeof *a, cmp_pos);
            qsort(b, (size_t)k, sizeof *b, cmp_pos);
            assert_memory_equal(a, b, (size_t)k * sizeof *a);
        }
    }
}

/* Instances at many budgets stepped together by step_many hold the caches that each one's own
 * step gives it (the same positions; their slot order is free, policy.h), and give the same
 * keep order, the order in which the replay scores them. */
static void test_step_many_is_each_step(void **state)
{
    (void)state;
    enum { NB = 9, T = 140, P = 40, HQ = 4 };
    static const char *const budgets[NB] = {"budget=1", "budget=3", "budget=8", "budget=8",
                                            "budget=20", "budget=33", "budget=64",
                                            "budget=100", "budget=200"};
    Fixture *fx = fixture_new(HQ, 2, 8, T, P);
    fixture_randomize(fx, 4, 1.5);
    Policy *alone[NB], *shared[NB];
    for (int i = 0; i < NB; i++) {
        alone[i] = fixture_policy(fx, "oracle_topk", budgets[i], 7);
        shared[i] = fixture_policy(fx, "oracle_topk", budgets[i], 7);
    }
    assert_non_null(alone[0]->type->step_many);
    PrefillView pv = {.L = &fx->L, .span_start = 0, .span_end = P, .chunk_start = 0,
                      .chunk_end = P, .last_chunk = true};
    for (int i = 0; i < NB; i++) {
        alone[i]->type->prefill(alone[i], &pv);
        shared[i]->type->prefill(shared[i], &pv);
    }
    float *full = malloc((size_t)HQ * T * sizeof *full);
    for (int t = P; t < T; t++) {
        fixture_full_attn(fx, t, full);
        StepView sv = {.L = &fx->L, .t = t, .full_attn = full};
        for (int i = 0; i < NB; i++)
            alone[i]->type->step(alone[i], &sv);
        shared[0]->type->step_many(shared, NB, &sv);
        for (int i = 0; i < NB; i++)
            for (int g = 0; g < 2; g++) {
                const KVCache *a = &alone[i]->cache[g], *b = &shared[i]->cache[g];
                assert_int_equal(a->n, b->n);
                int32_t pa[T], pb[T], oa[T], ob[T];
                assert_int_equal(kvcache_positions(a, pa), a->n);
                assert_int_equal(kvcache_positions(b, pb), b->n);
                assert_memory_equal(pa, pb, (size_t)a->n * sizeof *pa);
                assert_int_equal(alone[i]->type->keep_order(alone[i], &sv, g, oa), a->n);
                assert_int_equal(shared[i]->type->keep_order(shared[i], &sv, g, ob), b->n);
                assert_memory_equal(oa, ob, (size_t)a->n * sizeof *oa);
            }
    }
    free(full);
    for (int i = 0; i < NB; i++) {
        alone[i]->type->destroy(alone[i]);
        shared[i]->type->destroy(shared[i]);
    }
    fixture_free(fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oracle_topk_is_top_budget_by_group_sum),
        cmocka_unit_test(test_oracle_topk_dominates_every_policy_each_step),
        cmocka_unit_test(test_sort_best_is_a_comparison_sort),
        cmocka_unit_test(test_step_many_is_each_step),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
