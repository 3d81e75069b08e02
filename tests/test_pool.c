/* The thread pool (sim/base/pool.h): every item once, the lowest failing item's error at any
 * thread count, nested pools, and the thread count rule. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/base/pool.h"

enum { N = 200 };

typedef struct {
    atomic_int runs[N];
    int slot_of[N];
    double work[N];
    int size;
    atomic_int bad_slot;
    int fail_a, fail_b; /* items that fail, or -1 */
    Pool *pool;
    atomic_int failed_at;         /* the lowest failed item so far, N while none */
} Count;

static int count_task(void *ctx, int item, int slot, KvErr *err)
{
    Count *c = ctx;
    atomic_fetch_add(&c->runs[item], 1);
    c->slot_of[item] = slot;
    if (slot < 0 || slot >= c->size)
        atomic_store(&c->bad_slot, 1);
    /* a little work, so that several threads take items */
    double x = 0;
    for (int i = 0; i < 2000; i++)
        x += i * 0.5 + c->work[item];
    c->work[item] = x;
    if (item == c->fail_a || item == c->fail_b) {
        int at = atomic_load(&c->failed_at);
        while (item < at && !atomic_compare_exchange_weak(&c->failed_at, &at, item))
            ;
        return kv_fail(err, "item %d failed", item);
    }
    return 0;
}

static void count_init(Count *c, Pool *p, int fail_a, int fail_b)
{
    memset(c, 0, sizeof *c);
    c->size = pool_size(p);
    c->fail_a = fail_a;
    c->fail_b = fail_b;
    c->pool = p;
    atomic_init(&c->failed_at, N);
}

static void test_every_item_once(void **state)
{
    (void)state;
    const int sizes[] = {1, 2, 4};
    for (int s = 0; s < 3; s++) {
        Pool *p = pool_create(sizes[s]);
        assert_int_equal(pool_size(p), sizes[s]);
        for (int rep = 0; rep < 3; rep++) { /* a pool runs many pool_for calls */
            Count c;
            count_init(&c, p, -1, -1);
            KvErr err;
            assert_int_equal(pool_for(p, N, count_task, &c, &err), 0);
            for (int i = 0; i < N; i++)
                assert_int_equal(atomic_load(&c.runs[i]), 1);
            assert_int_equal(atomic_load(&c.bad_slot), 0);
            if (sizes[s] == 1)
                for (int i = 0; i < N; i++)
                    assert_int_equal(c.slot_of[i], 0); /* the caller runs everything */
        }
        Count c;
        count_init(&c, p, -1, -1);
        assert_int_equal(pool_for(p, 0, count_task, &c, NULL), 0);
        pool_free(p);
    }
}

static void test_lowest_failure_reported(void **state)
{
    (void)state;
    /* One thread: items run in order and none after the failure. */
    Pool *one = pool_create(1);
    Count c;
    count_init(&c, one, 37, 90);
    KvErr err;
    assert_int_equal(pool_for(one, N, count_task, &c, &err), -1);
    assert_string_equal(err.msg, "item 37 failed");
    for (int i = 0; i < N; i++)
        assert_int_equal(atomic_load(&c.runs[i]), i <= 37);
    pool_free(one);

    /* Several threads: whichever failure happens first in time, the lowest item's error is the
     * one returned, and every item below it ran. */
    Pool *four = pool_create(4);
    for (int rep = 0; rep < 50; rep++) {
        count_init(&c, four, 150 - rep, 60 + rep % 7);
        strcpy(err.msg, "untouched");
        assert_int_equal(pool_for(four, N, count_task, &c, &err), -1);
        char want[64];
        snprintf(want, sizeof want, "item %d failed", 60 + rep % 7);
        assert_string_equal(err.msg, want);
        for (int i = 0; i <= 60 + rep % 7; i++)
            assert_int_equal(atomic_load(&c.runs[i]), 1);
    }
    /* the next pool_for starts clean */
    count_init(&c, four, -1, -1);
    assert_int_equal(pool_for(four, N, count_task, &c, &err), 0);
    pool_free(four);
}

typedef struct {
    Pool **inner; /* [outer slots] */
    Pool *outer;
    int fail_item;
    atomic_int sum;
    atomic_int saw_failed_below;
} Nest;

static int inner_task(void *ctx, int item, int slot, KvErr *err)
{
    (void)slot, (void)err;
    Nest *n = ctx;
    atomic_fetch_add(&n->sum, item + 1);
    return 0;
}

static int outer_task(void *ctx, int item, int slot, KvErr *err)
{
    Nest *n = ctx;
    if (item == n->fail_item)
        return kv_fail(err, "outer %d", item);
    if (pool_failed_below(n->outer, item))
        atomic_store(&n->saw_failed_below, 1);
    return pool_for(n->inner[slot], 10, inner_task, n, err);
}

static void test_nested_pools(void **state)
{
    (void)state;
    Nest n = {.outer = pool_create(2), .fail_item = -1};
    n.inner = calloc(2, sizeof *n.inner);
    for (int i = 0; i < 2; i++)
        n.inner[i] = pool_create(3);
    KvErr err;
    /* every inner item of every outer item: 8 x (1 + ... + 10) */
    assert_int_equal(pool_for(n.outer, 8, outer_task, &n, &err), 0);
    assert_int_equal(atomic_load(&n.sum), 8 * 55);
    assert_int_equal(atomic_load(&n.saw_failed_below), 0);
    /* item 0 fails at once: nothing else starts, except the item the second thread may have
     * taken before the failure */
    atomic_store(&n.sum, 0);
    n.fail_item = 0;
    assert_int_equal(pool_for(n.outer, 8, outer_task, &n, &err), -1);
    assert_string_equal(err.msg, "outer 0");
    int sum = atomic_load(&n.sum);
    assert_true(sum == 0 || sum == 55);
    assert_true(!atomic_load(&n.saw_failed_below) || sum == 55);
    for (int i = 0; i < 2; i++)
        pool_free(n.inner[i]);
    free(n.inner);
    pool_free(n.outer);
}

static void test_thread_count_rule(void **state)
{
    (void)state;
    assert_int_equal(pool_threads_for(3, 10), 3);
    assert_int_equal(pool_threads_for(30, 10), 10);
    assert_int_equal(pool_threads_for(4, 0), 1);
    assert_true(pool_threads_for(0, 1000) >= 1); /* every online core */
    assert_int_equal(pool_threads_for(0, 1), 1);
    Pool *p = pool_create(0);
    assert_int_equal(pool_size(p), 1);
    pool_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_item_once),
        cmocka_unit_test(test_lowest_failure_reported),
        cmocka_unit_test(test_nested_pools),
        cmocka_unit_test(test_thread_count_rule),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
