/* The persisted-KV-cache simulator: one cache structure for every policy, over entries named by
 * int64 keys (hash ids under the prefix scope, request numbers under the conversation scope),
 * and the log streamed through every replay at once (reuse_stream). */
#include "sim/reuse/reuse.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/pool.h"
#include "sim/base/progress.h"

const char *const reuse_scope_names[N_SCOPES] = {"none", "prefix", "conversation"};
const char *const reuse_policy_names[N_POLICIES] = {"lru", "fifo", "lfu", "s3fifo", "belady", "conv"};

enum { Q_NONE = 0, Q_SMALL = 1, Q_MAIN = 2 }; /* lru and fifo use Q_MAIN only */

/* ---- a map from int64 keys to int64 values >= 0 ----
 *
 * Open addressing, linear probing, deletion by backward shift (no tombstones): it holds only
 * what was put and not deleted, so a cache's map holds what the cache holds. */
typedef struct {
    int64_t *key;
    int64_t *val; /* < 0: empty */
    size_t mask, n;
} KeyMap;

static size_t key_hash(int64_t key, size_t mask)
{
    uint64_t x = (uint64_t)key * 0x9E3779B97F4A7C15ull;
    return (size_t)(x ^ (x >> 29)) & mask;
}

static void km_alloc(KeyMap *m, size_t size)
{
    m->mask = size - 1;
    m->n = 0;
    m->key = kv_malloc(size * sizeof *m->key);
    m->val = kv_malloc(size * sizeof *m->val);
    for (size_t i = 0; i < size; i++)
        m->val[i] = -1;
}

static void km_free(KeyMap *m)
{
    free(m->key);
    free(m->val);
    memset(m, 0, sizeof *m);
}

/* The value of key, -1 when absent. */
static int64_t km_get(const KeyMap *m, int64_t key)
{
    for (size_t i = key_hash(key, m->mask);; i = (i + 1) & m->mask) {
        if (m->val[i] < 0)
            return -1;
        if (m->key[i] == key)
            return m->val[i];
    }
}

static void km_put(KeyMap *m, int64_t key, int64_t val)
{
    if (2 * (m->n + 1) > m->mask + 1) { /* at most half full */
        KeyMap old = *m;
        km_alloc(m, 2 * (old.mask + 1));
        for (size_t i = 0; i <= old.mask; i++)
            if (old.val[i] >= 0)
                km_put(m, old.key[i], old.val[i]);
        km_free(&old);
    }
    size_t i = key_hash(key, m->mask);
    while (m->val[i] >= 0 && m->key[i] != key)
        i = (i + 1) & m->mask;
    if (m->val[i] < 0)
        m->n++;
    m->key[i] = key;
    m->val[i] = val;
}

static void km_del(KeyMap *m, int64_t key)
{
    size_t i = key_hash(key, m->mask);
    for (;; i = (i + 1) & m->mask) {
        if (m->val[i] < 0)
            return;
        if (m->key[i] == key)
            break;
    }
    m->val[i] = -1;
    m->n--;
    for (size_t j = (i + 1) & m->mask; m->val[j] >= 0; j = (j + 1) & m->mask) {
        size_t h = key_hash(m->key[j], m->mask);
        /* j's entry may move into the hole at i when its home is not in (i, j] */
        if (((j - h) & m->mask) >= ((j - i) & m->mask)) {
            m->key[i] = m->key[j];
            m->val[i] = m->val[j];
            m->val[j] = -1;
            i = j;
        }
    }
}

/* ---- the cache ----
 *
 * Entries are named by int64 keys (hash ids under the prefix scope, request numbers under the
 * conversation scope) and live in slots: a present entry has one, from a free list, and the
 * per-entry arrays are indexed by slot. Slots, the key map, conv's conversation nodes and
 * s3fifo's ghosts all hold only what the cache holds (ghosts: the ghost FIFO's length), so a
 * cache's memory follows its contents, not the log. */
typedef struct Cache Cache;
struct Cache {
    ReusePolicy pol;
    int64_t cap, used, peak, evictions, inserted;
    Cache *spill; /* the host tier, which takes what this one evicts; NULL: none */
    KeyMap map;   /* key -> slot of the present entries */
    int64_t *key; /* [slot_cap] */
    int32_t slot_cap, n_slots, n_free;
    int32_t *free_slots;
    int64_t *size; /* NULL: every entry is one block */
    /* lru, fifo, s3fifo: doubly linked queues, head = newest, tail = next victim */
    int32_t *prev, *next;
    uint8_t *queue;
    int32_t head[3], tail[3];
    int64_t qsize[3];
    /* lfu: the entries of each reference count in a list (head = most recent); the counts that
     * have entries in buckets, a list in ascending order of count (bfirst the lowest): O(1)
     * per reference, and never more buckets than entries + 1 */
    uint32_t *count;
    int32_t *bnode;                          /* [slots] the entry's bucket */
    uint32_t *bcnt;                          /* [bucket_cap] its count */
    int32_t *bhead, *btail, *bprev, *bnext, *bfree;
    int32_t bucket_cap, n_buckets, n_bfree, bfirst;
    /* belady: a min-heap on (ka, kb) */
    int32_t *heap, *pos, hn;
    uint64_t *ka, *kb;
    uint64_t tick;
    /* s3fifo: the ghost FIFO as a map key -> sequence number of the entry's last move to it,
     * and a ring of the last ghost_cap keys moved there (to forget the older ones) */
    uint8_t *freq;
    KeyMap ghost;
    int64_t *gring, gring_cap;
    uint64_t ghost_seq;
    int64_t ghost_cap, small_cap;
    /* conv: each conversation's entries in a list (prev/next), the conversations holding any
     * in a list by last activity (chead = most recent); a conversation has a node while it
     * holds entries */
    int32_t *owner; /* [slots] its node */
    KeyMap cmap;    /* conversation -> node */
    int64_t *ckey;
    int32_t *cfirst, *cprev, *cnext; /* [node_cap] */
    int32_t node_cap, n_nodes, n_free_nodes, *free_nodes;
    int32_t chead, ctail;
    int64_t cur_conv;
    int64_t to_spill; /* blocks written to the spill cache */
};

static int64_t entry_size(const Cache *c, int32_t s)
{
    return c->size ? c->size[s] : 1;
}

/* The slot of key, -1 when absent. */
static int32_t cache_find(const Cache *c, int64_t key)
{
    return c->map.n ? (int32_t)km_get(&c->map, key) : -1;
}

#define GROW(p, n) ((p) = (p) ? kv_realloc((p), (size_t)(n) * sizeof *(p)) : NULL)

static int32_t cache_slot_new(Cache *c, int64_t key)
{
    int32_t s;
    if (c->n_free > 0) {
        s = c->free_slots[--c->n_free];
    } else {
        if (c->n_slots == c->slot_cap) {
            if (c->slot_cap > INT32_MAX / 2) {
                fprintf(stderr, "kvsim: reuse: more than %d entries in a cache\n", INT32_MAX / 2);
                exit(2);
            }
            int32_t n = 2 * c->slot_cap;
            GROW(c->key, n);
            GROW(c->free_slots, n);
            GROW(c->size, n);
            GROW(c->prev, n);
            GROW(c->next, n);
            GROW(c->queue, n);
            GROW(c->count, n);
            GROW(c->bnode, n);
            GROW(c->heap, n);
            GROW(c->pos, n);
            GROW(c->ka, n);
            GROW(c->kb, n);
            GROW(c->freq, n);
            GROW(c->owner, n);
            c->slot_cap = n;
        }
        s = c->n_slots++;
    }
    c->key[s] = key;
    km_put(&c->map, key, s);
    return s;
}

/* ---- queues ---- */

static void q_push_head(Cache *c, int q, int32_t id)
{
    c->queue[id] = (uint8_t)q;
    c->prev[id] = -1;
    c->next[id] = c->head[q];
    if (c->head[q] >= 0)
        c->prev[c->head[q]] = id;
    else
        c->tail[q] = id;
    c->head[q] = id;
    c->qsize[q] += entry_size(c, id);
}

static void q_unlink(Cache *c, int32_t id)
{
    int q = c->queue[id];
    if (c->prev[id] >= 0)
        c->next[c->prev[id]] = c->next[id];
    else
        c->head[q] = c->next[id];
    if (c->next[id] >= 0)
        c->prev[c->next[id]] = c->prev[id];
    else
        c->tail[q] = c->prev[id];
    c->queue[id] = Q_NONE;
    c->qsize[q] -= entry_size(c, id);
}
/* ---- heap ---- */

static bool h_less(const Cache *c, int32_t a, int32_t b)
{
    return c->ka[a] != c->ka[b] ? c->ka[a] < c->ka[b] : c->kb[a] < c->kb[b];
}

static void h_set(Cache *c, int32_t i, int32_t id)
{
    c->heap[i] = id;
    c->pos[id] = i;
}

static void h_up(Cache *c, int32_t i)
{
    int32_t id = c->heap[i];
    while (i > 0) {
        int32_t p = (i - 1) / 2;
        if (!h_less(c, id, c->heap[p]))
            break;
        h_set(c, i, c->heap[p]);
        i = p;
    }
    h_set(c, i, id);
}

static void h_down(Cache *c, int32_t i)
{
    int32_t id = c->heap[i];
    for (;;) {
        int32_t l = 2 * i + 1, m = i;
        int32_t best = id;
        if (l < c->hn && h_less(c, c->heap[l], best)) {
            m = l;
            best = c->heap[l];
        }
        if (l + 1 < c->hn && h_less(c, c->heap[l + 1], best)) {
            m = l + 1;
            best = c->heap[l + 1];
        }
        if (m == i)
            break;
        h_set(c, i, best);
        i = m;
    }
    h_set(c, i, id);
}

static void h_push(Cache *c, int32_t id)
{
    c->heap[c->hn] = id;
    c->pos[id] = c->hn;
    h_up(c, c->hn++);
}

static void h_remove(Cache *c, int32_t id)
{
    int32_t i = c->pos[id], last = c->heap[--c->hn];
    if (i == c->hn)
        return;
    h_set(c, i, last);
    h_up(c, i);
    h_down(c, c->pos[last]);
}

static void h_update(Cache *c, int32_t id)
{
    h_up(c, c->pos[id]);
    h_down(c, c->pos[id]);
}

/* ---- the cache ---- */

static bool uses_heap(ReusePolicy p)
{
    return p == POL_BELADY;
}

/* ---- lfu's lists by count ---- */

/* A bucket of count k after bucket `after` (-1: first). */
static int32_t lfu_bucket_new(Cache *c, uint32_t k, int32_t after)
{
    int32_t b;
    if (c->n_bfree > 0) {
        b = c->bfree[--c->n_bfree];
    } else {
        if (c->n_buckets == c->bucket_cap) {
            int32_t n = 2 * c->bucket_cap;
            GROW(c->bcnt, n);
            GROW(c->bhead, n);
            GROW(c->btail, n);
            GROW(c->bprev, n);
            GROW(c->bnext, n);
            GROW(c->bfree, n);
            c->bucket_cap = n;
        }
        b = c->n_buckets++;
    }
    c->bcnt[b] = k;
    c->bhead[b] = c->btail[b] = -1;
    c->bprev[b] = after;
    c->bnext[b] = after >= 0 ? c->bnext[after] : c->bfirst;
    if (c->bnext[b] >= 0)
        c->bprev[c->bnext[b]] = b;
    if (after >= 0)
        c->bnext[after] = b;
    else
        c->bfirst = b;
    return b;
}

static void lfu_bucket_del(Cache *c, int32_t b)
{
    if (c->bprev[b] >= 0)
        c->bnext[c->bprev[b]] = c->bnext[b];
    else
        c->bfirst = c->bnext[b];
    if (c->bnext[b] >= 0)
        c->bprev[c->bnext[b]] = c->bprev[b];
    c->bfree[c->n_bfree++] = b;
}

static void lfu_push(Cache *c, int32_t id, int32_t b)
{
    c->bnode[id] = b;
    c->prev[id] = -1;
    c->next[id] = c->bhead[b];
    if (c->bhead[b] >= 0)
        c->prev[c->bhead[b]] = id;
    else
        c->btail[b] = id;
    c->bhead[b] = id;
}

/* Out of its bucket's list (the bucket stays, possibly empty). */
static void lfu_unlink(Cache *c, int32_t id)
{
    int32_t b = c->bnode[id];
    if (c->prev[id] >= 0)
        c->next[c->prev[id]] = c->next[id];
    else
        c->bhead[b] = c->next[id];
    if (c->next[id] >= 0)
        c->prev[c->next[id]] = c->prev[id];
    else
        c->btail[b] = c->prev[id];
}

/* An entry inserted: count 1. */
static void lfu_insert(Cache *c, int32_t id)
{
    c->count[id] = 1;
    int32_t b = c->bfirst >= 0 && c->bcnt[c->bfirst] == 1 ? c->bfirst : lfu_bucket_new(c, 1, -1);
    lfu_push(c, id, b);
}

/* A reference: count + 1, to the next bucket. */
static void lfu_ref(Cache *c, int32_t id)
{
    int32_t b = c->bnode[id], to = b;
    lfu_unlink(c, id);
    if (c->count[id] < UINT32_MAX) {
        uint32_t k = ++c->count[id];
        to = c->bnext[b] >= 0 && c->bcnt[c->bnext[b]] == k ? c->bnext[b] : lfu_bucket_new(c, k, b);
    }
    lfu_push(c, id, to);
    if (to != b && c->bhead[b] < 0)
        lfu_bucket_del(c, b);
}

/* An entry leaves. */
static void lfu_remove(Cache *c, int32_t id)
{
    int32_t b = c->bnode[id];
    lfu_unlink(c, id);
    if (c->bhead[b] < 0)
        lfu_bucket_del(c, b);
}

/* The least recently referenced of the fewest references; -1 when empty. */
static int32_t lfu_victim(Cache *c)
{
    return c->used > 0 && c->bfirst >= 0 ? c->btail[c->bfirst] : -1;
}

static void cache_insert(Cache *c, int64_t key, int64_t size, uint32_t nu);

/* ---- conv's lists ---- */

static void conv_list_unlink(Cache *c, int32_t k)
{
    if (c->cprev[k] >= 0)
        c->cnext[c->cprev[k]] = c->cnext[k];
    else
        c->chead = c->cnext[k];
    if (c->cnext[k] >= 0)
        c->cprev[c->cnext[k]] = c->cprev[k];
    else
        c->ctail = c->cprev[k];
}

static void conv_list_push(Cache *c, int32_t k)
{
    c->cprev[k] = -1;
    c->cnext[k] = c->chead;
    if (c->chead >= 0)
        c->cprev[c->chead] = k;
    else
        c->ctail = k;
    c->chead = k;
}

/* The request about to be served belongs to conversation `conv`: it becomes the most recent. */
static void conv_touch(Cache *c, int64_t conv)
{
    c->cur_conv = conv;
    if (c->pol != POL_CONV || c->cmap.n == 0)
        return;
    int32_t k = (int32_t)km_get(&c->cmap, conv);
    if (k >= 0 && c->chead != k) {
        conv_list_unlink(c, k);
        conv_list_push(c, k);
    }
}

static void conv_add(Cache *c, int32_t id)
{
    int32_t k = (int32_t)km_get(&c->cmap, c->cur_conv);
    if (k < 0) { /* a node for the conversation while it holds entries */
        if (c->n_free_nodes > 0) {
            k = c->free_nodes[--c->n_free_nodes];
        } else {
            if (c->n_nodes == c->node_cap) {
                int32_t n = 2 * c->node_cap;
                GROW(c->ckey, n);
                GROW(c->cfirst, n);
                GROW(c->cprev, n);
                GROW(c->cnext, n);
                GROW(c->free_nodes, n);
                c->node_cap = n;
            }
            k = c->n_nodes++;
        }
        c->ckey[k] = c->cur_conv;
        c->cfirst[k] = -1;
        km_put(&c->cmap, c->cur_conv, k);
    }
    if (c->cfirst[k] < 0)
        conv_list_push(c, k);
    c->owner[id] = k;
    c->prev[id] = -1;
    c->next[id] = c->cfirst[k];
    if (c->cfirst[k] >= 0)
        c->prev[c->cfirst[k]] = id;
    c->cfirst[k] = id;
}

static void conv_remove(Cache *c, int32_t id)
{
    int32_t k = c->owner[id];
    if (c->prev[id] >= 0)
        c->next[c->prev[id]] = c->next[id];
    else
        c->cfirst[k] = c->next[id];
    if (c->next[id] >= 0)
        c->prev[c->next[id]] = c->prev[id];
    if (c->cfirst[k] < 0) { /* it holds nothing more: its node goes */
        conv_list_unlink(c, k);
        km_del(&c->cmap, c->ckey[k]);
        c->free_nodes[c->n_free_nodes++] = k;
    }
}

enum { CACHE_SLOTS0 = 64 };

static void cache_init(Cache *c, ReusePolicy pol, int64_t cap, bool sized)
{
    memset(c, 0, sizeof *c);
    c->pol = pol;
    c->cap = cap;
    const size_t n = CACHE_SLOTS0;
    c->slot_cap = CACHE_SLOTS0;
    km_alloc(&c->map, 2 * n);
    c->key = kv_malloc(n * sizeof *c->key);
    c->free_slots = kv_malloc(n * sizeof *c->free_slots);
    if (sized)
        c->size = kv_calloc(n, sizeof *c->size);
    if (pol == POL_CONV) {
        c->prev = kv_malloc(n * sizeof *c->prev);
        c->next = kv_malloc(n * sizeof *c->next);
        c->owner = kv_malloc(n * sizeof *c->owner);
        c->node_cap = CACHE_SLOTS0;
        km_alloc(&c->cmap, 2 * n);
        c->ckey = kv_malloc(n * sizeof *c->ckey);
        c->cfirst = kv_malloc(n * sizeof *c->cfirst);
        c->cprev = kv_malloc(n * sizeof *c->cprev);
        c->cnext = kv_malloc(n * sizeof *c->cnext);
        c->free_nodes = kv_malloc(n * sizeof *c->free_nodes);
        c->chead = c->ctail = -1;
    } else if (pol == POL_LFU) {
        c->prev = kv_malloc(n * sizeof *c->prev);
        c->next = kv_malloc(n * sizeof *c->next);
        c->count = kv_malloc(n * sizeof *c->count);
        c->bnode = kv_malloc(n * sizeof *c->bnode);
        c->bucket_cap = CACHE_SLOTS0;
        c->bcnt = kv_malloc(n * sizeof *c->bcnt);
        c->bhead = kv_malloc(n * sizeof *c->bhead);
        c->btail = kv_malloc(n * sizeof *c->btail);
        c->bprev = kv_malloc(n * sizeof *c->bprev);
        c->bnext = kv_malloc(n * sizeof *c->bnext);
        c->bfree = kv_malloc(n * sizeof *c->bfree);
        c->bfirst = -1;
    } else if (uses_heap(pol)) {
        c->heap = kv_malloc(n * sizeof *c->heap);
        c->pos = kv_malloc(n * sizeof *c->pos);
        c->ka = kv_malloc(n * sizeof *c->ka);
        c->kb = kv_malloc(n * sizeof *c->kb);
    } else {
        c->prev = kv_malloc(n * sizeof *c->prev);
        c->next = kv_malloc(n * sizeof *c->next);
        c->queue = kv_calloc(n, 1);
        for (int q = 0; q < 3; q++)
            c->head[q] = c->tail[q] = -1;
    }
    if (pol == POL_S3FIFO) {
        c->freq = kv_calloc(n, 1);
        c->small_cap = (cap + 9) / 10;
        c->ghost_cap = cap - c->small_cap > 0 ? cap - c->small_cap : 1;
        km_alloc(&c->ghost, 2 * n);
    }
}

static void cache_free(Cache *c)
{
    km_free(&c->map);
    km_free(&c->cmap);
    km_free(&c->ghost);
    free(c->key);
    free(c->free_slots);
    free(c->size);
    free(c->heap);
    free(c->pos);
    free(c->ka);
    free(c->kb);
    free(c->prev);
    free(c->next);
    free(c->queue);
    free(c->freq);
    free(c->gring);
    free(c->count);
    free(c->bnode);
    free(c->bcnt);
    free(c->bhead);
    free(c->btail);
    free(c->bprev);
    free(c->bnext);
    free(c->bfree);
    free(c->owner);
    free(c->ckey);
    free(c->cfirst);
    free(c->cprev);
    free(c->cnext);
    free(c->free_nodes);
}

/* Takes a present entry out of the structures; its slot is free again. */
static void cache_drop(Cache *c, int32_t id)
{
    if (c->pol == POL_LFU)
        lfu_remove(c, id);
    else if (c->pol == POL_CONV)
        conv_remove(c, id);
    else if (uses_heap(c->pol))
        h_remove(c, id);
    else
        q_unlink(c, id);
    km_del(&c->map, c->key[id]);
    c->free_slots[c->n_free++] = id;
    c->used -= entry_size(c, id);
}

/* s3fifo: the entry in slot t moves to the ghost FIFO (it is about to be evicted). Ghosts older
 * than the ghost_cap most recent are forgotten: they no longer count at insertion. */
static void s3_ghost(Cache *c, int32_t t)
{
    uint64_t seq = ++c->ghost_seq;
    int64_t at = (int64_t)((seq - 1) % (uint64_t)c->ghost_cap);
    if (at >= c->gring_cap) {
        int64_t n = c->gring_cap ? 2 * c->gring_cap : 64;
        c->gring_cap = n < c->ghost_cap ? n : c->ghost_cap;
        c->gring = kv_realloc(c->gring, (size_t)c->gring_cap * sizeof *c->gring);
    }
    if (seq > (uint64_t)c->ghost_cap) { /* the one ghost_cap older drops out */
        int64_t old = c->gring[at];
        if (km_get(&c->ghost, old) == (int64_t)(seq - (uint64_t)c->ghost_cap))
            km_del(&c->ghost, old);
    }
    c->gring[at] = c->key[t];
    km_put(&c->ghost, c->key[t], (int64_t)seq);
}

static int32_t s3_evict_main(Cache *c)
{
    while (c->tail[Q_MAIN] >= 0) {
        int32_t t = c->tail[Q_MAIN];
        if (c->freq[t] > 0) {
            c->freq[t]--;
            q_unlink(c, t);
            q_push_head(c, Q_MAIN, t);
        } else {
            return t;
        }
    }
    return -1;
}

/* The victim, still present; -1 when the cache is empty. */
static int32_t cache_victim(Cache *c)
{
    switch (c->pol) {
    case POL_LRU:
    case POL_FIFO:
        return c->tail[Q_MAIN];
    case POL_LFU:
        return lfu_victim(c);
    case POL_BELADY:
        return c->hn > 0 ? c->heap[0] : -1;
    case POL_S3FIFO:
        if (c->qsize[Q_SMALL] > 0 && (c->qsize[Q_SMALL] >= c->small_cap || c->qsize[Q_MAIN] == 0)) {
            while (c->tail[Q_SMALL] >= 0) {
                int32_t t = c->tail[Q_SMALL];
                if (c->freq[t] > 1) { /* referenced again while small: promoted */
                    q_unlink(c, t);
                    q_push_head(c, Q_MAIN, t);
                } else {
                    s3_ghost(c, t);
                    return t;
                }
            }
        }
        return s3_evict_main(c);
    default:
        return -1;
    }
}

/* A reference to a present entry; nu: its next use (belady). */
static void cache_hit(Cache *c, int32_t id, uint32_t nu)
{
    switch (c->pol) {
    case POL_LRU:
        q_unlink(c, id);
        q_push_head(c, Q_MAIN, id);
        break;
    case POL_FIFO:
        break;
    case POL_LFU:
        lfu_ref(c, id);
        break;
    case POL_BELADY:
        c->ka[id] = UINT64_MAX - nu;
        c->kb[id] = ++c->tick;
        h_update(c, id);
        break;
    case POL_S3FIFO:
        if (c->freq[id] < 3)
            c->freq[id]++;
        break;
    case POL_CONV:
        if (c->ckey[c->owner[id]] != c->cur_conv) { /* now the referencing conversation's */
            conv_remove(c, id);
            conv_add(c, id);
        }
        break;
    default:
        break;
    }
}

/* Evicts an entry (demoted to the spill cache, when there is one). */
static void cache_evict(Cache *c, int32_t v)
{
    int64_t v_size = entry_size(c, v), v_key = c->key[v];
    cache_drop(c, v);
    c->evictions++;
    if (c->spill) { /* demoted to the host tier */
        c->to_spill += v_size;
        cache_insert(c->spill, v_key, v_size, 0);
    }
}

/* Inserts an absent entry of `size` blocks, evicting until it fits (into the spill cache, when
 * there is one); an entry larger than the cache goes to the spill cache, or is not kept. */
static void cache_insert(Cache *c, int64_t key, int64_t size, uint32_t nu)
{
    if (size > c->cap) {
        if (c->spill) { /* too large for the device: written to the host directly */
            c->to_spill += size;
            cache_insert(c->spill, key, size, 0);
        }
        return;
    }
    while (c->used + size > c->cap) {
        if (c->pol == POL_CONV) { /* the whole least recently active conversation */
            if (c->ctail < 0)
                break;
            int32_t k = c->ctail;
            while (c->cfirst[k] >= 0)
                cache_evict(c, c->cfirst[k]);
            continue;
        }
        int32_t v = cache_victim(c);
        if (v < 0)
            break;
        cache_evict(c, v);
    }
    int32_t id = cache_slot_new(c, key);
    if (c->size)
        c->size[id] = size;
    c->used += size;
    c->inserted++;
    if (c->used > c->peak)
        c->peak = c->used;
    switch (c->pol) {
    case POL_LRU:
    case POL_FIFO:
        q_push_head(c, Q_MAIN, id);
        break;
    case POL_LFU:
        lfu_insert(c, id);
        break;
    case POL_BELADY:
        c->ka[id] = UINT64_MAX - nu;
        c->kb[id] = ++c->tick;
        h_push(c, id);
        break;
    case POL_S3FIFO: {
        int64_t g = c->ghost.n ? km_get(&c->ghost, key) : -1;
        bool ghost = g > 0 && c->ghost_seq - (uint64_t)g < (uint64_t)c->ghost_cap;
        if (g >= 0)
            km_del(&c->ghost, key);
        c->freq[id] = 0;
        q_push_head(c, ghost ? Q_MAIN : Q_SMALL, id);
        break;
    }
    case POL_CONV:
        conv_add(c, id);
        break;
    default:
        break;
    }
}
uint32_t *reuse_next_use(const ReqLog *log, ReuseScope scope)
{
    if (scope == SCOPE_PREFIX) {
        int64_t total = log->off[log->n];
        uint32_t *nu = kv_malloc((size_t)(total ? total : 1) * sizeof *nu);
        uint32_t *last = kv_malloc((size_t)(log->n_blocks ? log->n_blocks : 1) * sizeof *last);
        for (uint32_t b = 0; b < log->n_blocks; b++)
            last[b] = UINT32_MAX;
        for (long r = log->n - 1; r >= 0; r--) {
            for (int64_t j = log->off[r]; j < log->off[r + 1]; j++)
                nu[j] = last[log->ids[j]];
            for (int64_t j = log->off[r]; j < log->off[r + 1]; j++)
                last[log->ids[j]] = (uint32_t)r;
        }
        free(last);
        return nu;
    }
    if (scope == SCOPE_CONVERSATION) {
        uint32_t *nu = kv_malloc((size_t)(log->n ? log->n : 1) * sizeof *nu);
        for (long r = 0; r < log->n; r++)
            nu[r] = UINT32_MAX;
        for (long r = log->n - 1; r >= 0; r--)
            if (log->parent[r] >= 0)
                nu[log->parent[r]] = (uint32_t)r; /* the first child wins */
        return nu;
    }
    return NULL;
}

static void count_turn(ReuseResult *out, int32_t turn, int64_t prompt, int64_t hit)
{
    int t = turn < 0 ? 0 : turn >= REUSE_MAX_TURN ? REUSE_MAX_TURN - 1 : turn;
    out->turn_requests[t]++;
    out->turn_prompt[t] += prompt;
    out->turn_hit[t] += hit;
}

void reuse_simulate(const ReqLog *log, ReuseScope scope, ReusePolicy policy,
                    int64_t capacity_blocks, const uint32_t *next_use, ReuseResult *out)
{
    reuse_simulate_host(log, scope, policy, capacity_blocks, 0, next_use, out);
}

void reuse_simulate_host(const ReqLog *log, ReuseScope scope, ReusePolicy policy,
                         int64_t capacity_blocks, int64_t host_blocks, const uint32_t *next_use,
                         ReuseResult *out)
{
    ReuseOptions opt = {.scope = scope, .policy = policy, .capacity_blocks = capacity_blocks,
                        .host_blocks = host_blocks, .next_use = next_use};
    reuse_run(log, &opt, out);
}

double reuse_prefill_flops(const ReuseCost *cost, double cached, double n)
{
    return 2.0 * cost->params * n + 4.0 * cost->attn_dim * (n * cached + n * (n + 1.0) / 2.0);
}

double reuse_prefill_seconds(const ReuseCost *cost, double cached, double n)
{
    if (cost->prefill_tps > 0)
        return n / cost->prefill_tps;
    return reuse_prefill_flops(cost, cached, n) / cost->flops_per_s;
}

/* Tokens of block j of a prompt of `input` tokens. */
static int64_t block_tokens_at(int64_t input, int64_t j, int64_t B)
{
    int64_t left = input - j * B;
    return left <= 0 ? 0 : left < B ? left : B;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The blocks an entry of `blocks` blocks holds when persisted at ratio q. */
static int64_t compressed_blocks(int64_t blocks, double q)
{
    if (q <= 0 || q >= 1)
        return blocks;
    int64_t k = (int64_t)ceil(q * (double)blocks);
    return k < 1 ? 1 : k;
}

/* ---- one replay: a cell ---- */

enum { TTFT_BUF = 4096 };

struct ReuseCell {
    ReuseScope scope;
    ReusePolicy policy;
    const ReuseCost *cost;
    int64_t B;
    double q;
    bool belady, tiered;
    Cache c, host;
    double free_at; /* when the device finishes the prefills queued so far */
    ReuseResult res;
    /* every request's TTFT, for the exact quantiles: a buffer, spilled to a temporary file
     * (deleted when closed) so that memory does not follow the log */
    double tbuf[TTFT_BUF];
    int tn;
    FILE *tfile;
};

ReuseCell *reuse_cell_new(const ReuseOptions *opt, int block_tokens)
{
    ReuseCell *cell = kv_calloc(1, sizeof *cell);
    cell->scope = opt->scope;
    cell->policy = opt->policy;
    cell->cost = opt->cost;
    cell->B = block_tokens;
    cell->q = opt->compress > 0 && opt->compress < 1 ? opt->compress : 1.0;
    cell->belady = opt->policy == POL_BELADY;
    cache_init(&cell->c, opt->policy, opt->capacity_blocks < 0 ? 0 : opt->capacity_blocks,
               opt->scope == SCOPE_CONVERSATION);
    cell->tiered = opt->host_blocks > 0 && opt->scope != SCOPE_NONE;
    if (cell->tiered) {
        cache_init(&cell->host, POL_LRU, opt->host_blocks, opt->scope == SCOPE_CONVERSATION);
        cell->c.spill = &cell->host;
    }
    return cell;
}

static void cell_put_ttft(ReuseCell *cell, double t)
{
    if (cell->tn == TTFT_BUF) {
        if (!cell->tfile && !(cell->tfile = tmpfile())) {
            fprintf(stderr, "kvsim: reuse: cannot create a temporary file for the TTFTs\n");
            exit(2);
        }
        if (fwrite(cell->tbuf, sizeof *cell->tbuf, TTFT_BUF, cell->tfile) != TTFT_BUF) {
            fprintf(stderr, "kvsim: reuse: cannot write the TTFTs' temporary file\n");
            exit(2);
        }
        cell->tn = 0;
    }
    cell->tbuf[cell->tn++] = t;
}

void reuse_cell_request(ReuseCell *cell, const ReuseReq *req)
{
    Cache *c = &cell->c, *host = &cell->host;
    ReuseResult *out = &cell->res;
    const bool tiered = cell->tiered;
    const int64_t B = cell->B;
    int64_t hit = 0, host_hit = 0, moved = 0; /* moved: blocks loaded from the host */
    double attended = 0;                       /* cached keys the prefill attends over */
    if (req->conv >= 0)
        conv_touch(c, req->conv);
    if (cell->scope == SCOPE_PREFIX) {
        const int64_t *ids = req->keys;
        const int64_t m = req->n_keys;
        for (int64_t k = 0; k < m; k++) {
            bool dev = cache_find(c, ids[k]) >= 0, on_host = tiered && cache_find(host, ids[k]) >= 0;
            if (!dev && !on_host)
                break;
            int64_t t = block_tokens_at(req->input, k, B);
            hit += t;
            if (!dev)
                host_hit += t;
        }
        for (int64_t j = m - 1; j >= 0; j--) {
            uint32_t nu = cell->belady ? req->next_use[j] : 0;
            int32_t s = cache_find(c, ids[j]);
            if (s >= 0) {
                cache_hit(c, s, nu);
                continue;
            }
            if (tiered) {
                int32_t h = cache_find(host, ids[j]);
                if (h >= 0) {
                    cache_drop(host, h); /* loaded back to the device */
                    moved++;
                }
            }
            cache_insert(c, ids[j], 1, nu);
        }
        attended = (double)hit;
    } else if (cell->scope == SCOPE_CONVERSATION) {
        int64_t p = req->parent;
        int32_t ds = p >= 0 ? cache_find(c, p) : -1, hs = p >= 0 && tiered ? cache_find(host, p) : -1;
        bool dev = ds >= 0, on_host = hs >= 0;
        if ((dev || on_host) && req->parent_model != req->model) {
            if (dev) /* another model's KV: invalidated */
                cache_drop(c, ds);
            else
                cache_drop(host, hs);
            out->invalidated++;
        } else if (dev || on_host) {
            int64_t ctx = req->parent_context;
            hit = ctx < req->input ? ctx : req->input;
            attended = cell->q * (double)hit;
            if (dev) {
                cache_drop(c, ds);
            } else {
                host_hit = hit;
                moved = host->size[hs];
                cache_drop(host, hs);
            }
        }
        int64_t blocks = reuse_blocks(req->input + req->output, (int)B);
        cache_insert(c, req->self, compressed_blocks(blocks, cell->q),
                     cell->belady ? req->self_next_use : 0);
    }
    out->requests++;
    out->prompt_tokens += req->input;
    out->hit_tokens += hit;
    out->host_hit_tokens += host_hit;
    out->blocks_to_device += moved;
    count_turn(out, req->turn, req->input, hit);
    const ReuseCost *cost = cell->cost;
    if (cost) {
        double n_new = (double)(req->input - hit);
        double done = reuse_prefill_flops(cost, attended, n_new);
        out->flops += done;
        out->flops_saved += reuse_prefill_flops(cost, 0, (double)req->input) - done;
        double service = reuse_prefill_seconds(cost, attended, n_new);
        if (cost->host_bw > 0)
            service += (double)moved * cost->block_bytes / cost->host_bw;
        double arrival = req->timestamp;
        double start = arrival > cell->free_at ? arrival : cell->free_at;
        cell->free_at = start + service;
        double ttft = cell->free_at - arrival;
        cell_put_ttft(cell, ttft);
        out->ttft_mean += ttft;
    }
}

void reuse_cell_stats(const ReuseCell *cell, ReuseCellStats *st)
{
    const Cache *c = &cell->c;
    st->entries = (int64_t)c->map.n + (cell->tiered ? (int64_t)cell->host.map.n : 0);
    st->slots = c->slot_cap + (cell->tiered ? cell->host.slot_cap : 0);
    st->ghosts = (int64_t)c->ghost.n;
    st->conversations = (int64_t)c->cmap.n;
    st->lfu_counts = c->n_buckets - c->n_bfree;
}

void reuse_cell_finish(ReuseCell *cell, ReuseResult *out)
{
    ReuseResult *res = &cell->res;
    res->evictions = cell->c.evictions;
    res->inserted = cell->c.inserted;
    res->blocks_end = cell->c.used;
    res->blocks_peak = cell->c.peak;
    res->blocks_to_host = cell->c.to_spill;
    if (cell->tiered) {
        res->host_blocks_end = cell->host.used;
        res->host_blocks_peak = cell->host.peak;
        res->host_evictions = cell->host.evictions;
    }
    long n = res->requests;
    if (cell->cost && n > 0) {
        /* the exact nearest-rank quantiles: every TTFT, read back and sorted, one cell at a
         * time (8 bytes per request while it lasts) */
        double *ttft = kv_malloc((size_t)n * sizeof *ttft);
        long got = 0;
        if (cell->tfile) {
            rewind(cell->tfile);
            got = (long)fread(ttft, sizeof *ttft, (size_t)(n - cell->tn), cell->tfile);
        }
        if (got != n - cell->tn) {
            fprintf(stderr, "kvsim: reuse: cannot read the TTFTs' temporary file back\n");
            exit(2);
        }
        memcpy(ttft + got, cell->tbuf, (size_t)cell->tn * sizeof *ttft);
        qsort(ttft, (size_t)n, sizeof *ttft, cmp_double);
        for (int k = 0; k < REUSE_TTFT_Q; k++) {
            int64_t rank = ((int64_t)k * n + 99) / 100; /* nearest rank: ceil(k n / 100) */
            res->ttft_q[k] = ttft[rank > 0 ? rank - 1 : 0];
        }
        res->ttft_mean /= (double)n;
        free(ttft);
    }
    *out = *res;
}

void reuse_cell_free(ReuseCell *cell)
{
    if (!cell)
        return;
    cache_free(&cell->c);
    if (cell->tiered)
        cache_free(&cell->host);
    if (cell->tfile)
        fclose(cell->tfile);
    free(cell);
}

void reuse_run(const ReqLog *log, const ReuseOptions *opt, ReuseResult *out)
{
    ReuseCell *cell = reuse_cell_new(opt, log->block_tokens);
    int64_t *keys = NULL;
    size_t keys_cap = 0;
    for (long r = 0; r < log->n; r++) {
        int64_t m = log->off[r + 1] - log->off[r];
        if ((size_t)m > keys_cap) {
            keys_cap = (size_t)m * 2;
            keys = kv_realloc(keys, keys_cap * sizeof *keys);
        }
        for (int64_t j = 0; j < m; j++)
            keys[j] = log->ids[log->off[r] + j];
        int32_t p = log->parent ? log->parent[r] : -1;
        ReuseReq req = {
            .keys = keys, .n_keys = m, .input = log->input[r], .output = log->output[r],
            .turn = log->turn[r], .timestamp = log->timestamp[r],
            .model = log->model ? log->model[r] : 0, .self = r, .parent = p,
            .parent_context = p >= 0 ? log->input[p] + log->output[p] : 0,
            .parent_model = p >= 0 && log->model ? log->model[p] : 0,
            .conv = log->conv ? log->conv[r] : -1,
        };
        if (opt->policy == POL_BELADY && opt->next_use) {
            if (opt->scope == SCOPE_PREFIX)
                req.next_use = opt->next_use + log->off[r];
            else
                req.self_next_use = opt->next_use[r];
        }
        reuse_cell_request(cell, &req);
    }
    free(keys);
    reuse_cell_finish(cell, out);
    reuse_cell_free(cell);
}
/* ---- the LRU curve: stack depths by counting marked reference times ----
 *
 * Every block reference gets the next time 0, 1, 2, ...; the time at which each block was
 * last referenced is marked in a bitmap; above it, a tree of counts of fan-out 16 (a node's 16
 * counts are one 64-byte cache line): level 0 counts the marks of 16 words (1024 times), level
 * l + 1 sums 16 counts of level l. Counting the marks before a time reads one word, the words
 * before it in its group and, per level, the counts before it in its node: a few cache lines,
 * where a binary Fenwick tree over the same times reads one line per level; unmarking a
 * block's old time walks the same lines. The bitmap grows with the references (1 bit each,
 * doubled when full); the times of the blocks' last references are the caller's. */

enum { ST_FAN = 16, ST_LEVELS = 12, ST_NEAR_WORDS = 8 };

typedef struct {
    uint64_t *bits;                  /* [size / 64] */
    int32_t *count[ST_LEVELS];       /* count[l][i]: marks of times [i * 1024 * 16^l, ...) */
    int64_t n_count[ST_LEVELS];
    int levels;
    int64_t size, now, marked;
} Stack;

static void st_mark(Stack *s, int64_t t, int32_t v)
{
    if (v > 0)
        s->bits[t >> 6] |= (uint64_t)1 << (t & 63);
    else
        s->bits[t >> 6] &= ~((uint64_t)1 << (t & 63));
    int64_t i = t >> 10;
    for (int l = 0; l < s->levels; l++, i >>= 4)
        s->count[l][i] += v;
}

/* Marks at times < t. */
static int64_t st_before(const Stack *s, int64_t t)
{
    int64_t w = t >> 6;
    int64_t sum = __builtin_popcountll(s->bits[w] & (((uint64_t)1 << (t & 63)) - 1));
    for (int64_t k = w & ~(int64_t)(ST_FAN - 1); k < w; k++)
        sum += __builtin_popcountll(s->bits[k]);
    int64_t i = w >> 4;
    for (int l = 0; l < s->levels; l++, i >>= 4)
        for (int64_t k = i & ~(int64_t)(ST_FAN - 1); k < i; k++)
            sum += s->count[l][k];
    return sum;
}

/* Marks at times in [a, b), a < b. */
static int64_t st_between(const Stack *s, int64_t a, int64_t b)
{
    int64_t wa = a >> 6, wb = b >> 6;
    uint64_t lo = ~(((uint64_t)1 << (a & 63)) - 1), hi = ((uint64_t)1 << (b & 63)) - 1;
    if (wa == wb)
        return __builtin_popcountll(s->bits[wa] & lo & hi);
    int64_t sum = __builtin_popcountll(s->bits[wa] & lo) + __builtin_popcountll(s->bits[wb] & hi);
    for (int64_t w = wa + 1; w < wb; w++)
        sum += __builtin_popcountll(s->bits[w]);
    return sum;
}

/* The count levels for the bitmap's size, from its marks. */
static void st_levels(Stack *s)
{
    for (int l = 0; l < s->levels; l++)
        free(s->count[l]);
    /* levels up to a single node: the walks stop there */
    int64_t n = s->size >> 10;
    for (s->levels = 0; s->levels < ST_LEVELS; s->levels++) {
        s->n_count[s->levels] = n;
        s->count[s->levels] = kv_calloc((size_t)n, sizeof *s->count[s->levels]);
        if (n <= ST_FAN) {
            s->levels++;
            break;
        }
        n = (n + ST_FAN - 1) / ST_FAN;
    }
    int64_t words = s->size >> 6;
    for (int64_t w = 0; w < words; w++)
        s->count[0][w >> 4] += __builtin_popcountll(s->bits[w]);
    for (int l = 1; l < s->levels; l++)
        for (int64_t i = 0; i < s->n_count[l - 1]; i++)
            s->count[l][i >> 4] += s->count[l - 1][i];
}

static void stack_init(Stack *s, int64_t size_hint)
{
    memset(s, 0, sizeof *s);
    int64_t size = size_hint > 1024 ? size_hint : 1024;
    s->size = (size + 1023) & ~(int64_t)1023; /* whole words and level-0 groups */
    s->bits = kv_calloc((size_t)(s->size >> 6), sizeof *s->bits);
    st_levels(s);
}

static void stack_free(Stack *s)
{
    free(s->bits);
    for (int l = 0; l < s->levels; l++)
        free(s->count[l]);
}

/* The curve's state: the stack, and the cached tokens by bin of depth (bin i: depths in
 * (caps[i - 1], caps[i]], the last bin every depth above caps[n_caps - 1]). caps NULL: every
 * depth 0 .. n_caps - 1 its own bin. */
typedef struct {
    Stack s;
    const int64_t *caps;
    int n_caps;
    int64_t *bins; /* [n_caps + 1] */
} Curve;

static void curve_init(Curve *cv, int64_t size_hint, const int64_t *caps, int n_caps)
{
    stack_init(&cv->s, size_hint);
    cv->caps = caps;
    cv->n_caps = n_caps;
    cv->bins = kv_calloc((size_t)n_caps + 1, sizeof *cv->bins);
}

static void curve_free(Curve *cv)
{
    stack_free(&cv->s);
    free(cv->bins);
}

static int64_t curve_bin(const Curve *cv, int64_t depth)
{
    if (!cv->caps)
        return depth < cv->n_caps ? depth : cv->n_caps;
    int64_t lo = 0, hi = cv->n_caps; /* the first cap >= depth */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (cv->caps[mid] >= depth)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* A request's depths before its references: last[j] the time of block j's last reference
 * (-1: never referenced), for its first blocks while j * B < input. Block j is cached at
 * capacity c when every block before it is, i.e. from c = the prefix maximum of their
 * depths. */
static void curve_request(Curve *cv, const int64_t *last, int64_t m, int64_t input, int64_t B)
{
    const Stack *s = &cv->s;
    int64_t prev_t = -1, depth = 0, max_depth = 0, bin = -1;
    for (int64_t j = 0; j < m && j * B < input; j++) {
        int64_t t = last[j];
        if (t < 0)
            break; /* never referenced: missing at every capacity */
        /* A request's blocks were last referenced together, last to first, so block j's
         * time is usually a little before block j - 1's: its depth is that one's plus the
         * marks between them, counted in the bitmap's words nearby */
        if (prev_t >= 0 && t < prev_t && prev_t - t <= 64 * ST_NEAR_WORDS)
            depth += st_between(s, t, prev_t);
        else
            depth = s->marked - st_before(s, t);
        prev_t = t;
        if (depth > max_depth || bin < 0) {
            if (depth > max_depth)
                max_depth = depth;
            bin = curve_bin(cv, max_depth);
        }
        int64_t tokens = input - j * B < B ? input - j * B : B;
        cv->bins[bin] += tokens;
    }
}

/* A reference to a block last referenced at `old` (-1: never): returns its new time. */
static int64_t curve_ref(Curve *cv, int64_t old)
{
    Stack *s = &cv->s;
    if (s->now == s->size) { /* full: twice the times */
        int64_t words = s->size >> 6;
        s->size *= 2;
        s->bits = kv_realloc(s->bits, (size_t)(s->size >> 6) * sizeof *s->bits);
        memset(s->bits + words, 0, (size_t)words * sizeof *s->bits);
        st_levels(s);
    }
    if (old >= 0) {
        st_mark(s, old, -1);
        s->marked--;
    }
    st_mark(s, s->now, 1);
    s->marked++;
    return s->now++;
}

int64_t *reuse_lru_curve(const ReqLog *log)
{
    const int64_t B = log->block_tokens, nb = log->n_blocks;
    Curve cv;
    curve_init(&cv, log->off[log->n] + 1, NULL, (int)(nb + 1));
    int64_t *last = kv_malloc((size_t)(nb ? nb : 1) * sizeof *last);
    for (int64_t b = 0; b < nb; b++)
        last[b] = -1;
    int64_t *t = NULL;
    size_t t_cap = 0;
    for (long r = 0; r < log->n; r++) {
        const uint32_t *ids = log->ids + log->off[r];
        int64_t m = log->off[r + 1] - log->off[r];
        if ((size_t)m > t_cap) {
            t_cap = (size_t)m * 2;
            t = kv_realloc(t, t_cap * sizeof *t);
        }
        for (int64_t j = 0; j < m; j++)
            t[j] = last[ids[j]];
        curve_request(&cv, t, m, log->input[r], B);
        /* then the references, last block to first, as reuse_simulate makes them */
        for (int64_t j = m - 1; j >= 0; j--)
            last[ids[j]] = curve_ref(&cv, last[ids[j]]);
    }
    int64_t *out = kv_malloc((size_t)(nb + 1) * sizeof *out);
    int64_t sum = 0;
    for (int64_t c = 0; c <= nb; c++) {
        sum += cv.bins[c];
        out[c] = sum;
    }
    free(t);
    free(last);
    curve_free(&cv);
    return out;
}
/* ---- the log streamed: a first pass for the future, then every cell at once ---- */

static void io_die(const char *what)
{
    fprintf(stderr, "kvsim: reuse: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Fixed-size entries in a temporary file (deleted when closed), written mostly in order: a
 * window of the latest W entries in memory, new entries 0xff-filled; writes to entries
 * already flushed go to the file directly. */
typedef struct {
    FILE *f;
    int fd;
    size_t esz;
    int64_t base, w; /* the window: entries [base, base + w) */
    uint8_t *win;
} Scatter;

static void sc_init(Scatter *s, size_t esz, int64_t w)
{
    memset(s, 0, sizeof *s);
    if (!(s->f = tmpfile()))
        io_die("cannot create a temporary file");
    s->fd = fileno(s->f);
    s->esz = esz;
    s->w = w;
    s->win = kv_malloc((size_t)w * esz);
    memset(s->win, 0xff, (size_t)w * esz);
}

static void sc_close(Scatter *s)
{
    if (s->f)
        fclose(s->f);
    free(s->win);
    memset(s, 0, sizeof *s);
}

static void sc_pwrite(Scatter *s, const void *p, size_t n, int64_t off)
{
    if (pwrite(s->fd, p, n, (off_t)off) != (ssize_t)n)
        io_die("cannot write a temporary file");
}

/* Entry i in memory (the window slides forward to hold it), or NULL when flushed. */
static uint8_t *sc_at(Scatter *s, int64_t i)
{
    while (i >= s->base + s->w) {
        int64_t half = s->w / 2;
        sc_pwrite(s, s->win, (size_t)half * s->esz, s->base * (int64_t)s->esz);
        memmove(s->win, s->win + (size_t)half * s->esz, (size_t)(s->w - half) * s->esz);
        memset(s->win + (size_t)(s->w - half) * s->esz, 0xff, (size_t)half * s->esz);
        s->base += half;
    }
    return i >= s->base ? s->win + (size_t)(i - s->base) * s->esz : NULL;
}

static void sc_set(Scatter *s, int64_t i, size_t off, const void *v, size_t n)
{
    uint8_t *p = sc_at(s, i);
    if (p)
        memcpy(p + off, v, n);
    else
        sc_pwrite(s, v, n, i * (int64_t)s->esz + (int64_t)off);
}

/* Flushes the window's entries below `end`. */
static void sc_finish(Scatter *s, int64_t end)
{
    if (end > s->base)
        sc_pwrite(s, s->win, (size_t)(end - s->base) * s->esz, s->base * (int64_t)s->esz);
}

static void sc_read(Scatter *s, int64_t i, int64_t n, void *buf)
{
    size_t bytes = (size_t)n * s->esz;
    if (n > 0 && pread(s->fd, buf, bytes, (off_t)(i * (int64_t)s->esz)) != (ssize_t)bytes)
        io_die("cannot read a temporary file");
}

/* Hash id -> uint32 (the time of the block's last reference), UINT32_MAX when absent: an
 * array for the small ids that the published logs and kvsim synth-workload use (numbered
 * 0, 1, 2, ...), a hash map for the others (reqlog.c's BlockIds does the same). */
typedef struct {
    uint32_t *dense;
    size_t dense_cap;
    IdMap map;
    size_t n;
} TimeTab;

static uint32_t tt_get(const TimeTab *t, int64_t key)
{
    if ((uint64_t)key < t->dense_cap)
        return t->dense[key];
    return t->map.n ? idmap_get(&t->map, key) : UINT32_MAX;
}

static void tt_set(TimeTab *t, int64_t key, uint32_t v, bool is_new)
{
    if (is_new) {
        t->n++;
        if ((uint64_t)key >= t->dense_cap && (uint64_t)key < ((size_t)1 << 30) &&
            (uint64_t)key < 4 * t->n + ((size_t)1 << 20)) {
            size_t cap = t->dense_cap ? t->dense_cap : (size_t)1 << 16;
            while (cap <= (uint64_t)key)
                cap *= 2;
            t->dense = kv_realloc(t->dense, cap * sizeof *t->dense);
            for (size_t i = t->dense_cap; i < cap; i++)
                t->dense[i] = UINT32_MAX;
            t->dense_cap = cap;
        }
    }
    if ((uint64_t)key < t->dense_cap)
        t->dense[key] = v;
    else
        idmap_put(&t->map, key, v);
}

/* What the first pass leaves per request. */
typedef struct {
    int32_t parent;       /* the request whose chat_id is its parent_chat_id (the latest), -1 */
    int32_t conv;         /* its conversation, numbered in order of first requests */
    uint32_t first_child; /* the first request whose parent it is, UINT32_MAX: none */
} PreReq;

/* In the first pass's table of chat ids: the request already has a child. */
enum { CHILD_SEEN = 0x80000000u };

/* A next use of UINT32_MAX: none; with the top bit set otherwise: "the same as the reference
 * (value & ALIAS_MASK) times later" (a block twice in one request). */
enum { NU_ALIAS = 0x80000000u, NU_ALIAS_MASK = 0x7fffffffu };

typedef struct {
    const char *path;
    ReqlogFormat format;
    int64_t B;
    bool need_req, need_nu, curve;
    Scatter req, nu;
    const int64_t *curve_caps;
    int n_curve;
    int64_t *curve_bins; /* [n_curve + 1] */
    int64_t n_blocks;
    bool progress; /* a progress line on stderr */
} Pre;

/* The first pass: per request its parent, conversation and next turn; per block reference
 * (in the order the replays make them) the next request that references the block; the LRU
 * curve's depths. Holds a table of the blocks' last reference times (4 bytes per distinct
 * block id below 2^30 in a dense numbering, a hash map entry otherwise), of the chat ids
 * (two hash map entries per request) and the curve's bitmap (1 bit per block reference). */
static int prepass(Pre *p, KvErr *err)
{
    ReqReader *rd = reqlog_open(p->path, p->format, err);
    if (!rd)
        return -1;
    Progress pr;
    progress_begin(&pr, p->progress, "first pass", "MiB", reqlog_size_mib(rd));
    bool blocks = p->need_nu || p->curve;
    if (p->need_req)
        sc_init(&p->req, sizeof(PreReq), (int64_t)1 << 16);
    if (p->need_nu)
        sc_init(&p->nu, sizeof(uint32_t), (int64_t)1 << 22);
    TimeTab tt = {0};
    idmap_init(&tt.map);
    IdMap chats, convs;
    idmap_init(&chats);
    idmap_init(&convs);
    Curve cv;
    if (p->curve)
        curve_init(&cv, 1 << 20, p->curve_caps, p->n_curve);
    int64_t *last = NULL;
    size_t last_cap = 0;
    int64_t T = 0;
    long r = 0;
    int32_t n_conv = 0;
    ReqRecord rec;
    int rc;
    while ((rc = reqlog_next(rd, &rec, err)) == 1) {
        if (r >= INT32_MAX - 1) { /* entries are int32 in the simulator */
            rc = kv_fail(err, "%s:%ld: more than %d requests", p->path, rec.line, INT32_MAX - 2);
            break;
        }
        if (p->need_req) {
            PreReq q = {.parent = -1, .conv = -1, .first_child = UINT32_MAX};
            if (rec.parent_chat_id >= 0) {
                uint32_t v = idmap_get(&chats, rec.parent_chat_id);
                if (v != UINT32_MAX) {
                    q.parent = (int32_t)(v & ~CHILD_SEEN);
                    q.conv = (int32_t)idmap_get(&convs, rec.parent_chat_id);
                    if (!(v & CHILD_SEEN)) { /* its first child */
                        uint32_t child = (uint32_t)r;
                        sc_set(&p->req, q.parent, offsetof(PreReq, first_child), &child, sizeof child);
                        idmap_put(&chats, rec.parent_chat_id, v | CHILD_SEEN);
                    }
                }
            }
            if (q.parent < 0)
                q.conv = n_conv++;
            if (rec.chat_id >= 0) {
                idmap_put(&chats, rec.chat_id, (uint32_t)r);
                idmap_put(&convs, rec.chat_id, (uint32_t)q.conv);
            }
            sc_set(&p->req, r, 0, &q, offsetof(PreReq, first_child));
        }
        if (blocks) {
            int64_t m = rec.n_hash, T0 = T;
            if (T + m >= (int64_t)UINT32_MAX - 1) {
                rc = kv_fail(err, "%s:%ld: more than %lld block references", p->path, rec.line,
                             (long long)UINT32_MAX - 2);
                break;
            }
            if ((size_t)m > last_cap) {
                last_cap = (size_t)m * 2;
                last = kv_realloc(last, last_cap * sizeof *last);
            }
            if (p->curve) {
                for (int64_t j = 0; j < m; j++) {
                    uint32_t t = tt_get(&tt, rec.hash_ids[j]);
                    last[j] = t == UINT32_MAX ? -1 : (int64_t)t;
                }
                curve_request(&cv, last, m, rec.input_length, p->B);
            }
            for (int64_t j = m - 1; j >= 0; j--, T++) {
                int64_t h = rec.hash_ids[j];
                uint32_t old = tt_get(&tt, h);
                if (p->curve)
                    curve_ref(&cv, old == UINT32_MAX ? -1 : (int64_t)old);
                if (p->need_nu) {
                    sc_at(&p->nu, T); /* the window holds the new reference */
                    if (old != UINT32_MAX) {
                        uint32_t v = (int64_t)old >= T0 ? NU_ALIAS | (uint32_t)(T - old) : (uint32_t)r;
                        sc_set(&p->nu, old, 0, &v, sizeof v);
                    }
                }
                tt_set(&tt, h, (uint32_t)T, old == UINT32_MAX);
            }
        }
        r++;
        if ((r & 4095) == 0)
            progress_set(&pr, reqlog_read_mib(rd));
    }
    if (rc == 0)
        progress_set(&pr, reqlog_size_mib(rd));
    progress_end(&pr);
    reqlog_close(rd);
    p->n_blocks = (int64_t)tt.n;
    if (p->need_req)
        sc_finish(&p->req, r);
    if (p->need_nu)
        sc_finish(&p->nu, T);
    if (p->curve) {
        p->curve_bins = cv.bins;
        cv.bins = NULL;
        curve_free(&cv);
    }
    free(last);
    free(tt.dense);
    idmap_free(&tt.map);
    idmap_free(&chats);
    idmap_free(&convs);
    return rc < 0 ? -1 : 0;
}

enum { CHUNK_REQ = 4096, CHUNK_KEYS = 1 << 18 };

typedef struct {
    long n;
    int64_t n_keys;
    size_t req_cap, key_cap;
    ReuseReq *req;
    int64_t *koff; /* [req_cap]: each request's first key */
    int64_t *keys;
    uint32_t *nu, *tnu; /* next uses by key, and as the first pass wrote them (by time) */
    PreReq *pre;
} Chunk;

typedef struct {
    const char *path;
    ReqReader *rd;
    bool eof;
    long r;    /* requests read */
    int64_t T; /* references read */
    int64_t prompt; /* prompt tokens read */
    Pre *pre;
    KeyMap pctx, pmodel; /* parents awaiting their next turn: context tokens, model */
    int64_t pending_peak;
    ReuseCell **cells;
    int n_cells;
    Chunk ch[2];
    int cur;
} Stream;

static void chunk_free(Chunk *ch)
{
    free(ch->req);
    free(ch->koff);
    free(ch->keys);
    free(ch->nu);
    free(ch->tnu);
    free(ch->pre);
}

/* The next requests of the log into ch (ch->n = 0 at the end). */
static int chunk_fill(Stream *st, Chunk *ch, KvErr *err)
{
    ch->n = 0;
    ch->n_keys = 0;
    const long r0 = st->r;
    const int64_t T0 = st->T;
    ReqRecord rec;
    while (!st->eof && ch->n < CHUNK_REQ && ch->n_keys < CHUNK_KEYS) {
        int rc = reqlog_next(st->rd, &rec, err);
        if (rc < 0)
            return -1;
        if (rc == 0) {
            st->eof = true;
            break;
        }
        if (st->r >= INT32_MAX - 1)
            return kv_fail(err, "%s:%ld: more than %d requests", st->path, rec.line, INT32_MAX - 2);
        if ((size_t)ch->n == ch->req_cap) {
            ch->req_cap = ch->req_cap ? 2 * ch->req_cap : CHUNK_REQ;
            ch->req = kv_realloc(ch->req, ch->req_cap * sizeof *ch->req);
            ch->koff = kv_realloc(ch->koff, ch->req_cap * sizeof *ch->koff);
            ch->pre = kv_realloc(ch->pre, ch->req_cap * sizeof *ch->pre);
        }
        if ((size_t)(ch->n_keys + rec.n_hash) > ch->key_cap) {
            while ((size_t)(ch->n_keys + rec.n_hash) > ch->key_cap)
                ch->key_cap = ch->key_cap ? 2 * ch->key_cap : CHUNK_KEYS;
            ch->keys = kv_realloc(ch->keys, ch->key_cap * sizeof *ch->keys);
            ch->nu = kv_realloc(ch->nu, ch->key_cap * sizeof *ch->nu);
            ch->tnu = kv_realloc(ch->tnu, ch->key_cap * sizeof *ch->tnu);
        }
        memcpy(ch->keys + ch->n_keys, rec.hash_ids, (size_t)rec.n_hash * sizeof *ch->keys);
        ch->koff[ch->n] = ch->n_keys;
        ch->req[ch->n] = (ReuseReq){
            .n_keys = rec.n_hash, .input = rec.input_length, .output = rec.output_length,
            .turn = rec.turn > INT32_MAX ? INT32_MAX : (int32_t)rec.turn,
            .timestamp = rec.timestamp, .model = (int32_t)rec.model, .self = st->r,
            .parent = -1, .conv = -1, .self_next_use = UINT32_MAX,
        };
        ch->n_keys += rec.n_hash;
        ch->n++;
        st->r++;
        st->T += rec.n_hash;
        st->prompt += rec.input_length;
    }
    Pre *pre = st->pre;
    if (pre->need_req)
        sc_read(&pre->req, r0, ch->n, ch->pre);
    if (pre->need_nu)
        sc_read(&pre->nu, T0, ch->n_keys, ch->tnu);
    for (long i = 0; i < ch->n; i++) {
        ReuseReq *q = &ch->req[i];
        const int64_t o = ch->koff[i], m = q->n_keys;
        q->keys = ch->keys + o;
        if (pre->need_nu) {
            /* times run over the request's blocks last to first; aliases point later */
            uint32_t *t = ch->tnu + o;
            for (int64_t k = m - 1; k >= 0; k--)
                if (t[k] != UINT32_MAX && (t[k] & NU_ALIAS))
                    t[k] = t[k + (t[k] & NU_ALIAS_MASK)];
            for (int64_t j = 0; j < m; j++)
                ch->nu[o + j] = t[m - 1 - j];
            q->next_use = ch->nu + o;
        }
        if (pre->need_req) {
            const PreReq *pr = &ch->pre[i];
            q->parent = pr->parent;
            q->conv = pr->conv;
            q->self_next_use = pr->first_child;
            if (pr->parent >= 0) {
                /* only its first child can find a parent's entry (the child takes it): the
                 * parent's numbers leave the table then */
                int64_t ctx = km_get(&st->pctx, pr->parent);
                if (ctx >= 0) {
                    q->parent_context = ctx;
                    q->parent_model = (int32_t)km_get(&st->pmodel, pr->parent);
                    km_del(&st->pctx, pr->parent);
                    km_del(&st->pmodel, pr->parent);
                }
            }
            if (pr->first_child != UINT32_MAX) { /* a next turn will come */
                km_put(&st->pctx, q->self, q->input + q->output);
                km_put(&st->pmodel, q->self, q->model);
                if ((int64_t)st->pctx.n > st->pending_peak)
                    st->pending_peak = (int64_t)st->pctx.n;
            }
        }
    }
    return 0;
}

/* Item 0 reads the next chunk; item i >= 1 runs cell i - 1 over the current one. */
static int stream_task(void *ctx, int item, int slot, KvErr *err)
{
    (void)slot;
    Stream *st = ctx;
    if (item == 0)
        return chunk_fill(st, &st->ch[st->cur ^ 1], err);
    const Chunk *ch = &st->ch[st->cur];
    ReuseCell *cell = st->cells[item - 1];
    for (long i = 0; i < ch->n; i++)
        reuse_cell_request(cell, &ch->req[i]);
    return 0;
}

typedef struct {
    ReuseCell **cells;
    ReuseResult *results;
} FinishCtx;

static int finish_task(void *ctx, int item, int slot, KvErr *err)
{
    (void)slot;
    (void)err;
    FinishCtx *f = ctx;
    reuse_cell_finish(f->cells[item], &f->results[item]);
    reuse_cell_free(f->cells[item]);
    f->cells[item] = NULL;
    return 0;
}

int reuse_stream(const char *path, ReqlogFormat format, int block_tokens,
                 const ReuseOptions *opts, int n_opts, int threads, bool progress,
                 const int64_t *curve_caps, int n_curve, int64_t *curve_out,
                 ReuseResult *results, ReuseStreamInfo *info, KvErr *err)
{
    memset(info, 0, sizeof *info);
    ReqlogFormat fmt;
    if (reqlog_detect(path, format, &fmt, err) < 0)
        return -1;
    info->format = fmt;
    info->block_tokens = block_tokens > 0 ? block_tokens
                         : fmt == REQLOG_MOONCAKE ? REQLOG_MOONCAKE_BLOCK : REQLOG_QWEN_BLOCK;
    info->n_blocks = -1;
    Pre pre = {.path = path, .format = format, .B = info->block_tokens,
               .curve = curve_caps != NULL, .curve_caps = curve_caps, .n_curve = n_curve,
               .progress = progress};
    for (int i = 0; i < n_opts; i++) {
        ReuseScope s = opts[i].scope;
        if (s == SCOPE_CONVERSATION || (s == SCOPE_PREFIX && opts[i].policy == POL_CONV))
            pre.need_req = true;
        if (s == SCOPE_PREFIX && opts[i].policy == POL_BELADY)
            pre.need_nu = true;
    }
    if ((pre.need_req || pre.need_nu || pre.curve) && prepass(&pre, err) < 0) {
        sc_close(&pre.req);
        sc_close(&pre.nu);
        free(pre.curve_bins);
        return -1;
    }
    info->prepass = pre.need_req || pre.need_nu || pre.curve;
    if (info->prepass && (pre.need_nu || pre.curve))
        info->n_blocks = pre.n_blocks;
    if (pre.curve) {
        int64_t sum = 0;
        for (int i = 0; i < n_curve; i++)
            curve_out[i] = sum += pre.curve_bins[i];
        info->curve_total = sum + pre.curve_bins[n_curve];
        free(pre.curve_bins);
    }
    Stream st = {.path = path, .pre = &pre, .n_cells = n_opts};
    km_alloc(&st.pctx, 1024);
    km_alloc(&st.pmodel, 1024);
    st.cells = kv_calloc((size_t)(n_opts ? n_opts : 1), sizeof *st.cells);
    for (int i = 0; i < n_opts; i++)
        st.cells[i] = reuse_cell_new(&opts[i], info->block_tokens);
    int rc = 0;
    Pool *pool = pool_create(pool_threads_for(threads, n_opts + 1));
    Progress pr;
    if (!(st.rd = reqlog_open(path, format, err)) || chunk_fill(&st, &st.ch[0], err) < 0)
        rc = -1;
    progress_begin(&pr, progress && rc == 0, "replay", "MiB",
                   st.rd ? reqlog_size_mib(st.rd) : 0);
    while (rc == 0 && st.ch[st.cur].n > 0) {
        if (pool_for(pool, n_opts + 1, stream_task, &st, err) < 0)
            rc = -1;
        st.cur ^= 1;
        progress_set(&pr, reqlog_read_mib(st.rd)); /* the chunk being read next, done */
    }
    progress_end(&pr);
    if (rc == 0) {
        FinishCtx f = {st.cells, results};
        pool_for(pool, n_opts, finish_task, &f, err); /* cannot fail */
    }
    pool_free(pool);
    if (st.rd)
        reqlog_close(st.rd);
    for (int i = 0; i < n_opts; i++)
        reuse_cell_free(st.cells[i]);
    free(st.cells);
    chunk_free(&st.ch[0]);
    chunk_free(&st.ch[1]);
    info->requests = st.r;
    info->references = st.T;
    info->pending_peak = st.pending_peak;
    info->prompt_tokens = st.prompt;
    km_free(&st.pctx);
    km_free(&st.pmodel);
    sc_close(&pre.req);
    sc_close(&pre.nu);
    return rc;
}

/* ---- lru streamed from the file ---- */

int reuse_stream_lru(const char *path, ReqlogFormat format, int block_tokens,
                     int64_t capacity_blocks, ReuseResult *out, KvErr *err)
{
    memset(out, 0, sizeof *out);
    ReqReader *r = reqlog_open(path, format, err);
    if (!r)
        return -1;
    int64_t cap = capacity_blocks > 0 ? capacity_blocks : 0;
    if (cap > INT32_MAX / 4)
        cap = INT32_MAX / 4;
    size_t n = cap ? (size_t)cap : 1;
    /* slots by hash id, sized once: at most half full with the cache full, never grown */
    KeyMap m;
    size_t tsize = 16;
    while (tsize < 2 * n)
        tsize *= 2;
    km_alloc(&m, tsize);
    int64_t *key = kv_malloc(n * sizeof *key); /* the hash id in each slot */
    int32_t *prev = kv_malloc(n * sizeof *prev), *next = kv_malloc(n * sizeof *next);
    int32_t head = -1, tail = -1;
    int64_t used = 0;
    ReqRecord rec;
    int rc;
    while ((rc = reqlog_next(r, &rec, err)) == 1) {
        const int64_t B = block_tokens > 0 ? block_tokens
                          : reqlog_format(r) == REQLOG_MOONCAKE ? REQLOG_MOONCAKE_BLOCK
                                                                : REQLOG_QWEN_BLOCK;
        int64_t hit = 0;
        for (long k = 0; k < rec.n_hash && km_get(&m, rec.hash_ids[k]) >= 0; k++)
            hit += block_tokens_at(rec.input_length, k, B);
        for (long j = rec.n_hash - 1; j >= 0 && cap > 0; j--) {
            int64_t id = rec.hash_ids[j];
            int32_t sl = (int32_t)km_get(&m, id);
            if (sl >= 0) { /* to the front */
                if (sl == head)
                    continue;
                next[prev[sl]] = next[sl];
                if (next[sl] >= 0)
                    prev[next[sl]] = prev[sl];
                else
                    tail = prev[sl];
            } else if (used < cap) {
                sl = (int32_t)used++;
                key[sl] = id;
                km_put(&m, id, sl);
                out->inserted++;
            } else { /* the least recent block's slot */
                sl = tail;
                tail = prev[sl];
                if (tail >= 0)
                    next[tail] = -1;
                else
                    head = -1;
                km_del(&m, key[sl]);
                out->evictions++;
                key[sl] = id;
                km_put(&m, id, sl);
                out->inserted++;
            }
            prev[sl] = -1;
            next[sl] = head;
            if (head >= 0)
                prev[head] = sl;
            else
                tail = sl;
            head = sl;
        }
        out->requests++;
        out->prompt_tokens += rec.input_length;
        out->hit_tokens += hit;
        count_turn(out, (int32_t)(rec.turn > INT32_MAX ? INT32_MAX : rec.turn), rec.input_length, hit);
        if (used > out->blocks_peak)
            out->blocks_peak = used;
    }
    out->blocks_end = used;
    reqlog_close(r);
    km_free(&m);
    free(key);
    free(prev);
    free(next);
    return rc < 0 ? -1 : 0;
}
