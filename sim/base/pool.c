/* The thread pool: see pool.h for what it promises. */
#include "sim/base/pool.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

struct Pool {
    int threads;
    pthread_t *tids;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    bool quit;
    unsigned long generation; /* one per pool_for: a helper works once per generation */
    int active;               /* helpers not yet finished with the current generation */
    /* The current pool_for. */
    PoolTask task;
    void *ctx;
    int n, next;
    atomic_int failed_item; /* the lowest failed item, INT_MAX while none */
    KvErr err;
};

typedef struct {
    Pool *pool;
    int slot;
} Helper;

int pool_threads_for(int requested, int max_useful)
{
    int threads = requested > 0 ? requested : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads > max_useful)
        threads = max_useful;
    return threads < 1 ? 1 : threads;
}

/* Claims and runs items until none is left or one has failed. */
static void run_items(Pool *p, int slot)
{
    for (;;) {
        pthread_mutex_lock(&p->lock);
        int i = p->next < p->n && atomic_load(&p->failed_item) == INT_MAX ? p->next++ : -1;
        pthread_mutex_unlock(&p->lock);
        if (i < 0)
            return;
        KvErr err;
        if (p->task(p->ctx, i, slot, &err) != 0) {
            pthread_mutex_lock(&p->lock);
            if (i < atomic_load(&p->failed_item)) {
                atomic_store(&p->failed_item, i);
                p->err = err;
            }
            pthread_mutex_unlock(&p->lock);
        }
    }
}

static void *helper_main(void *arg)
{
    Helper *h = arg;
    Pool *p = h->pool;
    unsigned long seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (!p->quit && p->generation == seen)
            pthread_cond_wait(&p->wake, &p->lock);
        bool quit = p->quit;
        seen = p->generation;
        pthread_mutex_unlock(&p->lock);
        if (quit)
            break;
        run_items(p, h->slot);
        pthread_mutex_lock(&p->lock);
        if (--p->active == 0)
            pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->lock);
    }
    free(h);
    return NULL;
}

Pool *pool_create(int threads)
{
    Pool *p = kv_calloc(1, sizeof *p);
    p->threads = threads < 1 ? 1 : threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->failed_item, INT_MAX);
    p->tids = kv_malloc((size_t)p->threads * sizeof *p->tids);
    for (int i = 1; i < p->threads; i++) {
        Helper *h = kv_malloc(sizeof *h);
        *h = (Helper){p, i};
        if (pthread_create(&p->tids[i], NULL, helper_main, h) != 0) {
            /* Fewer threads than asked: the items still all run, on the threads there are. */
            free(h);
            p->threads = i;
            break;
        }
    }
    return p;
}

int pool_size(const Pool *p)
{
    return p->threads;
}

int pool_for(Pool *p, int n, PoolTask task, void *ctx, KvErr *err)
{
    pthread_mutex_lock(&p->lock);
    p->task = task;
    p->ctx = ctx;
    p->n = n;
    p->next = 0;
    atomic_store(&p->failed_item, INT_MAX);
    if (p->threads > 1 && n > 1) {
        p->active = p->threads - 1;
        p->generation++;
        pthread_cond_broadcast(&p->wake);
    }
    bool helped = p->threads > 1 && n > 1;
    pthread_mutex_unlock(&p->lock);

    run_items(p, 0);

    pthread_mutex_lock(&p->lock);
    while (helped && p->active > 0)
        pthread_cond_wait(&p->done, &p->lock);
    int failed = atomic_load(&p->failed_item) != INT_MAX;
    if (failed && err)
        *err = p->err;
    pthread_mutex_unlock(&p->lock);
    return failed ? -1 : 0;
}

bool pool_failed_below(Pool *p, int item)
{
    return atomic_load(&p->failed_item) < item;
}

void pool_free(Pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->quit = true;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->threads; i++)
        pthread_join(p->tids[i], NULL);
    free(p->tids);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p);
}
