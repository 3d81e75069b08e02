/* random's defining properties: the cache stays at the budget, the choices are a function of
 * the seed alone, another seed gives other choices, and every token is equally likely to go. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/fixture.h"

enum { HQ = 4, HKV = 2, T = 200, P = 40, BUDGET = 16 };

typedef struct {
    uint8_t member[T - P][HKV][T]; /* cache membership at each step */
} RandomRecord;

static void record(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    RandomRecord *rec = ud;
    for (int g = 0; g < HKV; g++) {
        const KVCache *c = &p->cache[g];
        assert_int_equal(c->n, BUDGET);
        assert_true(kvcache_has(c, t));
        for (int s = 0; s < c->n; s++)
            rec->member[t - P][g][c->pos[s]] = 1;
    }
}

static RandomRecord *run_random(Fixture *fx, uint64_t seed)
{
    RandomRecord *rec = calloc(1, sizeof *rec);
    char params[32];
    snprintf(params, sizeof params, "budget=%d", BUDGET);
    Policy *p = fixture_policy(fx, "random", params, seed);
    fixture_run(fx, p, T, record, rec);
    p->type->destroy(p);
    return rec;
}

static void test_random_deterministic_in_seed(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(HQ, HKV, 8, T, P);
    fixture_randomize(fx, 1, 1.0);
    RandomRecord *a = run_random(fx, 11), *b = run_random(fx, 11), *c = run_random(fx, 12);
    assert_memory_equal(a, b, sizeof *a);
    /* Another seed: different caches already after the prompt cut, and at most steps. */
    assert_memory_not_equal(a->member[0], c->member[0], sizeof a->member[0]);
    int differing = 0;
    for (int s = 0; s < T - P; s++)
        differing += memcmp(a->member[s], c->member[s], sizeof a->member[s]) != 0;
    assert_true(differing > (T - P) / 2);
    /* The KV heads draw independently. */
    assert_memory_not_equal(a->member[0][0], a->member[0][1], sizeof a->member[0][0]);
    free(a);
    free(b);
    free(c);
    fixture_free(fx);
}

/* Counts, at each step from the second on, whether the previous step's token is gone. */
static void count_newest_evicted(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    int *counts = ud;
    if (t == P)
        return;
    counts[0]++;
    counts[1] += !kvcache_has(&p->cache[0], t - 1);
}

/* Uniform eviction forgets without regard to age: each token, the newest included, leaves at
 * each eviction with probability 1/BUDGET. So the newest token goes right after its own step
 * one time in BUDGET, and a token survives `a` more steps with probability
 * (1 - 1/BUDGET)^(a+1): the cached tokens' mean age after an eviction is that law's mean,
 * BUDGET - 1 = 15 steps, where a window's would be about BUDGET / 2. Forty seeds. */
static void test_random_evicts_uniformly(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(2, 1, 4, T, P);
    double age_sum = 0;
    int count = 0, newest[2] = {0, 0};
    for (uint64_t seed = 1; seed <= 40; seed++) {
        Policy *p = fixture_policy(fx, "random", "budget=16", seed);
        fixture_run(fx, p, T, count_newest_evicted, newest);
        const KVCache *c = &p->cache[0];
        for (int s = 0; s < c->n; s++) {
            age_sum += (T - 1) - c->pos[s];
            count++;
        }
        p->type->destroy(p);
    }
    double mean_age = age_sum / count;
    assert_true(mean_age > 11.0 && mean_age < 19.0);
    /* 6360 evictions, 1/16 expected: 397.5, standard deviation about 19. */
    assert_int_equal(newest[0], 40 * (T - P - 1));
    assert_true(newest[1] > 300 && newest[1] < 500);
    fixture_free(fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_deterministic_in_seed),
        cmocka_unit_test(test_random_evicts_uniformly),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
