/* pool.h — kvsim's one thread pool: a parallel-for over numbered items.
 *
 * A Pool holds `threads` - 1 helper threads; the thread that calls pool_for works as the first
 * of them, so pool_create(1) starts no thread and pool_for runs every item in order on the
 * caller. Items are claimed in ascending order, one at a time, by whichever thread is free.
 * Each call of the task gets the slot of the thread that runs it (0 = the caller, 1 .. threads-1
 * the helpers): an index for per-thread scratch. Results do not depend on the thread count as
 * long as item i writes only what belongs to item i (fixed slots, reduced afterwards in a fixed
 * order); that is the rule every user follows.
 *
 * Failure: a task returns 0, or -1 with its KvErr filled. After an item fails, no item above it
 * is started; items below it are already claimed (ascending order) and finish, so the error
 * pool_for returns is the one of the lowest failing item, the one a single thread would report.
 * A long task may poll pool_failed_below(pool, item) to give up early once a lower item failed.
 *
 * Pools nest: a task may call pool_for on another Pool (the replay engine gives each worker of
 * its layer pool a pool of its own for the work inside a layer). One pool_for at a time per
 * Pool; pool_create, pool_for and pool_free from one thread (the owner).
 *
 * BLAS inside a task stays single-threaded (openblas_set_num_threads(1), which the users set):
 * the parallelism is the pool's, and every number is computed the same way at any count. */
#ifndef KVSIM_POOL_H
#define KVSIM_POOL_H

#include <stdbool.h>

#include "sim/base/util.h"

typedef struct Pool Pool;

typedef int (*PoolTask)(void *ctx, int item, int slot, KvErr *err);

/* The thread count to use for `requested` threads (0 = every online core) when at most
 * `max_useful` items can run at once: in [1, max(1, max_useful)]. */
int pool_threads_for(int requested, int max_useful);

Pool *pool_create(int threads);
int pool_size(const Pool *p);
/* Runs task(ctx, i, slot, err) for every i in [0, n) and returns once all have returned:
 * 0, or -1 with *err from the lowest failing item (see above). */
int pool_for(Pool *p, int n, PoolTask task, void *ctx, KvErr *err);
/* Inside a task: whether an item below `item` of the current pool_for has failed. */
bool pool_failed_below(Pool *p, int item);
void pool_free(Pool *p);

#endif
