/* The persisted-KV-cache simulator: one cache structure for every policy, over dense entry ids
 * (blocks under the prefix scope, requests under the conversation scope). */
#include "sim/reuse/reuse.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

const char *const reuse_scope_names[N_SCOPES] = {"none", "prefix", "conversation"};
const char *const reuse_policy_names[N_POLICIES] = {"lru", "fifo", "lfu", "s3fifo", "belady", "conv"};

enum { Q_NONE = 0, Q_SMALL = 1, Q_MAIN = 2 }; /* lru and fifo use Q_MAIN only */

typedef struct Cache Cache;
struct Cache {
    ReusePolicy pol;
    int64_t cap, used, peak, evictions, inserted;
    Cache *spill; /* the host tier, which takes what this one evicts; NULL: none */
    uint8_t *present;
    int64_t *size; /* NULL: every entry is one block */
    /* lru, fifo, s3fifo: doubly linked queues, head = newest, tail = next victim */
    int32_t *prev, *next;
    uint8_t *queue;
    int32_t head[3], tail[3];
    int64_t qsize[3];
    /* lfu: one list per reference count (head = most recent), O(1) per reference */
    uint32_t *count;
    int32_t *bhead, *btail; /* [bcap] by count */
    int64_t bcap, min_count;
    /* belady: a min-heap on (ka, kb) */
    int32_t *heap, *pos, hn;
    uint64_t *ka, *kb;
    uint64_t tick;
    /* s3fifo */
    uint8_t *freq;
    uint64_t *ghost; /* sequence number of the entry's last move to the ghost queue, 0: none */
    uint64_t ghost_seq;
    int64_t ghost_cap, small_cap;
    /* conv: each conversation's entries in a list (prev/next), the conversations holding any in
     * a list by last activity (chead = most recent) */
    int32_t *owner;              /* [entries] */
    int32_t *cfirst, *cprev, *cnext; /* [conversations] */
    int32_t chead, ctail, cur_conv;
    int64_t to_spill;            /* blocks written to the spill cache */
};

static int64_t entry_size(const Cache *c, int32_t id)
{
    return c->size ? c->size[id] : 1;
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

static void lfu_push(Cache *c, int32_t id)
{
    uint32_t k = c->count[id];
    if ((int64_t)k >= c->bcap) {
        int64_t cap = c->bcap ? 2 * c->bcap : 64;
        while (cap <= (int64_t)k)
            cap *= 2;
        c->bhead = kv_realloc(c->bhead, (size_t)cap * sizeof *c->bhead);
        c->btail = kv_realloc(c->btail, (size_t)cap * sizeof *c->btail);
        for (int64_t i = c->bcap; i < cap; i++)
            c->bhead[i] = c->btail[i] = -1;
        c->bcap = cap;
    }
    c->prev[id] = -1;
    c->next[id] = c->bhead[k];
    if (c->bhead[k] >= 0)
        c->prev[c->bhead[k]] = id;
    else
        c->btail[k] = id;
    c->bhead[k] = id;
}

static void lfu_unlink(Cache *c, int32_t id)
{
    uint32_t k = c->count[id];
    if (c->prev[id] >= 0)
        c->next[c->prev[id]] = c->next[id];
    else
        c->bhead[k] = c->next[id];
    if (c->next[id] >= 0)
        c->prev[c->next[id]] = c->prev[id];
    else
        c->btail[k] = c->prev[id];
}

/* The least recently referenced of the fewest references; -1 when empty. */
static int32_t lfu_victim(Cache *c)
{
    if (c->used == 0)
        return -1;
    while (c->min_count < c->bcap && c->btail[c->min_count] < 0)
        c->min_count++; /* counts only grow between insertions, which reset it to 1 */
    return c->min_count < c->bcap ? c->btail[c->min_count] : -1;
}

static void cache_insert(Cache *c, int32_t id, int64_t size, uint32_t nu);

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

/* The request about to be served belongs to conversation k: it becomes the most recent. */
static void conv_touch(Cache *c, int32_t k)
{
    c->cur_conv = k;
    if (c->pol == POL_CONV && c->cfirst[k] >= 0 && c->chead != k) {
        conv_list_unlink(c, k);
        conv_list_push(c, k);
    }
}

static void conv_add(Cache *c, int32_t id)
{
    int32_t k = c->cur_conv;
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
    if (c->cfirst[k] < 0)
        conv_list_unlink(c, k);
}

static void cache_init(Cache *c, ReusePolicy pol, int64_t cap, uint32_t n, uint32_t n_conv,
                       bool sized)
{
    memset(c, 0, sizeof *c);
    c->pol = pol;
    c->cap = cap;
    size_t un = n ? n : 1;
    c->present = kv_calloc(un, 1);
    if (sized)
        c->size = kv_calloc(un, sizeof *c->size);
    if (pol == POL_CONV) {
        size_t uc = n_conv ? n_conv : 1;
        c->prev = kv_malloc(un * sizeof *c->prev);
        c->next = kv_malloc(un * sizeof *c->next);
        c->owner = kv_malloc(un * sizeof *c->owner);
        c->cfirst = kv_malloc(uc * sizeof *c->cfirst);
        c->cprev = kv_malloc(uc * sizeof *c->cprev);
        c->cnext = kv_malloc(uc * sizeof *c->cnext);
        for (size_t k = 0; k < uc; k++)
            c->cfirst[k] = -1;
        c->chead = c->ctail = -1;
    } else if (pol == POL_LFU) {
        c->prev = kv_malloc(un * sizeof *c->prev);
        c->next = kv_malloc(un * sizeof *c->next);
        c->count = kv_malloc(un * sizeof *c->count);
        c->min_count = 1;
    } else if (uses_heap(pol)) {
        c->heap = kv_malloc(un * sizeof *c->heap);
        c->pos = kv_malloc(un * sizeof *c->pos);
        c->ka = kv_malloc(un * sizeof *c->ka);
        c->kb = kv_malloc(un * sizeof *c->kb);
    } else {
        c->prev = kv_malloc(un * sizeof *c->prev);
        c->next = kv_malloc(un * sizeof *c->next);
        c->queue = kv_calloc(un, 1);
        for (int q = 0; q < 3; q++)
            c->head[q] = c->tail[q] = -1;
    }
    if (pol == POL_S3FIFO) {
        c->freq = kv_calloc(un, 1);
        c->ghost = kv_calloc(un, sizeof *c->ghost);
        c->small_cap = (cap + 9) / 10;
        c->ghost_cap = cap - c->small_cap > 0 ? cap - c->small_cap : 1;
    }
}

static void cache_free(Cache *c)
{
    free(c->present);
    free(c->size);
    free(c->heap);
    free(c->pos);
    free(c->ka);
    free(c->kb);
    free(c->prev);
    free(c->next);
    free(c->queue);
    free(c->freq);
    free(c->ghost);
    free(c->count);
    free(c->bhead);
    free(c->btail);
    free(c->owner);
    free(c->cfirst);
    free(c->cprev);
    free(c->cnext);
}

/* Takes a present entry out of the structures. */
static void cache_drop(Cache *c, int32_t id)
{
    if (c->pol == POL_LFU)
        lfu_unlink(c, id);
    else if (c->pol == POL_CONV)
        conv_remove(c, id);
    else if (uses_heap(c->pol))
        h_remove(c, id);
    else
        q_unlink(c, id);
    c->present[id] = 0;
    c->used -= entry_size(c, id);
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
                    c->ghost[t] = ++c->ghost_seq;
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
        lfu_unlink(c, id);
        if (c->count[id] < UINT32_MAX)
            c->count[id]++;
        lfu_push(c, id);
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
        if (c->owner[id] != c->cur_conv) { /* now the referencing conversation's */
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
    int64_t v_size = entry_size(c, v);
    cache_drop(c, v);
    c->evictions++;
    if (c->spill) { /* demoted to the host tier */
        c->to_spill += v_size;
        cache_insert(c->spill, v, v_size, 0);
    }
}

/* Inserts an absent entry of `size` blocks, evicting until it fits (into the spill cache, when
 * there is one); an entry larger than the cache goes to the spill cache, or is not kept. */
static void cache_insert(Cache *c, int32_t id, int64_t size, uint32_t nu)
{
    if (size > c->cap) {
        if (c->spill) { /* too large for the device: written to the host directly */
            c->to_spill += size;
            cache_insert(c->spill, id, size, 0);
        }
        return;
    }
    if (c->size)
        c->size[id] = size;
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
    c->present[id] = 1;
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
        c->count[id] = 1;
        c->min_count = 1;
        lfu_push(c, id);
        break;
    case POL_BELADY:
        c->ka[id] = UINT64_MAX - nu;
        c->kb[id] = ++c->tick;
        h_push(c, id);
        break;
    case POL_S3FIFO: {
        bool ghost = c->ghost[id] && c->ghost_seq - c->ghost[id] < (uint64_t)c->ghost_cap;
        c->ghost[id] = 0;
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

void reuse_run(const ReqLog *log, const ReuseOptions *opt, ReuseResult *out)
{
    memset(out, 0, sizeof *out);
    const ReuseScope scope = opt->scope;
    const ReusePolicy policy = opt->policy;
    const uint32_t *next_use = opt->next_use;
    const ReuseCost *cost = opt->cost;
    const int64_t B = log->block_tokens;
    const double q = opt->compress > 0 && opt->compress < 1 ? opt->compress : 1.0;
    bool belady = policy == POL_BELADY;
    Cache c, host;
    uint32_t n_entries = scope == SCOPE_PREFIX ? log->n_blocks
                         : scope == SCOPE_CONVERSATION ? (uint32_t)log->n : 0;
    uint32_t n_conv = log->n_conv > 0 ? (uint32_t)log->n_conv : 1;
    cache_init(&c, policy, opt->capacity_blocks < 0 ? 0 : opt->capacity_blocks, n_entries, n_conv,
               scope == SCOPE_CONVERSATION);
    bool tiered = opt->host_blocks > 0 && scope != SCOPE_NONE;
    if (tiered) {
        cache_init(&host, POL_LRU, opt->host_blocks, n_entries, n_conv, scope == SCOPE_CONVERSATION);
        c.spill = &host;
    }
    double *ttft = cost ? kv_malloc((size_t)(log->n ? log->n : 1) * sizeof *ttft) : NULL;
    double free_at = 0; /* when the device finishes the prefills queued so far */
    for (long r = 0; r < log->n; r++) {
        int64_t hit = 0, host_hit = 0, moved = 0; /* moved: blocks loaded from the host */
        double attended = 0;                       /* cached keys the prefill attends over */
        if (log->conv)
            conv_touch(&c, log->conv[r]);
        if (scope == SCOPE_PREFIX) {
            const uint32_t *ids = log->ids + log->off[r];
            int64_t m = log->off[r + 1] - log->off[r];
            for (int64_t k = 0; k < m; k++) {
                bool dev = c.present[ids[k]], on_host = tiered && host.present[ids[k]];
                if (!dev && !on_host)
                    break;
                int64_t t = block_tokens_at(log->input[r], k, B);
                hit += t;
                if (!dev)
                    host_hit += t;
            }
            for (int64_t j = m - 1; j >= 0; j--) {
                uint32_t nu = belady ? next_use[log->off[r] + j] : 0;
                int32_t id = (int32_t)ids[j];
                if (c.present[id]) {
                    cache_hit(&c, id, nu);
                    continue;
                }
                if (tiered && host.present[id]) {
                    cache_drop(&host, id); /* loaded back to the device */
                    moved++;
                }
                cache_insert(&c, id, 1, nu);
            }
            attended = (double)hit;
        } else if (scope == SCOPE_CONVERSATION) {
            int32_t p = log->parent[r];
            bool dev = p >= 0 && c.present[p], on_host = p >= 0 && tiered && host.present[p];
            if ((dev || on_host) && log->model && log->model[p] != log->model[r]) {
                cache_drop(dev ? &c : &host, p); /* another model's KV: invalidated */
                out->invalidated++;
            } else if (dev || on_host) {
                int64_t ctx = log->input[p] + log->output[p];
                hit = ctx < log->input[r] ? ctx : log->input[r];
                attended = q * (double)hit;
                if (dev) {
                    cache_drop(&c, p);
                } else {
                    host_hit = hit;
                    moved = host.size[p];
                    cache_drop(&host, p);
                }
            }
            int64_t blocks = reuse_blocks(log->input[r] + log->output[r], (int)B);
            cache_insert(&c, (int32_t)r, compressed_blocks(blocks, q), belady ? next_use[r] : 0);
        }
        out->requests++;
        out->prompt_tokens += log->input[r];
        out->hit_tokens += hit;
        out->host_hit_tokens += host_hit;
        out->blocks_to_device += moved;
        count_turn(out, log->turn[r], log->input[r], hit);
        if (cost) {
            double n_new = (double)(log->input[r] - hit);
            double done = reuse_prefill_flops(cost, attended, n_new);
            out->flops += done;
            out->flops_saved += reuse_prefill_flops(cost, 0, (double)log->input[r]) - done;
            double service = reuse_prefill_seconds(cost, attended, n_new);
            if (cost->host_bw > 0)
                service += (double)moved * cost->block_bytes / cost->host_bw;
            double arrival = log->timestamp[r];
            double start = arrival > free_at ? arrival : free_at;
            free_at = start + service;
            ttft[r] = free_at - arrival;
            out->ttft_mean += ttft[r];
        }
    }
    out->evictions = c.evictions;
    out->inserted = c.inserted;
    out->blocks_end = c.used;
    out->blocks_peak = c.peak;
    out->blocks_to_host = c.to_spill;
    if (tiered) {
        out->host_blocks_end = host.used;
        out->host_blocks_peak = host.peak;
        out->host_evictions = host.evictions;
        cache_free(&host);
    }
    cache_free(&c);
    if (cost && log->n > 0) {
        qsort(ttft, (size_t)log->n, sizeof *ttft, cmp_double);
        for (int k = 0; k < REUSE_TTFT_Q; k++) {
            int64_t rank = ((int64_t)k * log->n + 99) / 100; /* nearest rank: ceil(k n / 100) */
            out->ttft_q[k] = ttft[rank > 0 ? rank - 1 : 0];
        }
        out->ttft_mean /= (double)log->n;
    }
    free(ttft);
}

/* ---- the LRU curve: stack depths by counting marked reference times ----
 *
 * The times at which some block was last referenced are marked in a bitmap; above it, a tree
 * of counts of fan-out 16 (a node's 16 counts are one 64-byte cache line): level 0 counts the
 * marks of 16 words (1024 times), level l + 1 sums 16 counts of level l. Counting the marks
 * before a time reads one word, the words before it in its group and, per level, the counts
 * before it in its node: a few cache lines, where a binary Fenwick tree over the same times
 * reads one line per level (26 levels at 70 million times); unmarking a block's old time
 * walks the same lines. */

enum { ST_FAN = 16, ST_LEVELS = 8, ST_NEAR_WORDS = 8 };

typedef struct {
    uint64_t *bits;                  /* [size / 64] */
    int32_t *count[ST_LEVELS];       /* count[l][i]: marks of times [i * 1024 * 16^l, ...) */
    int64_t n_count[ST_LEVELS];
    int levels;
    int32_t *at;   /* [size]: the block last referenced at time t, -1 when none */
    int32_t *last; /* [n_blocks]: the time of each block's last reference, -1 when none */
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

/* The counts of the bitmap, from nothing. */
static void st_rebuild(Stack *s)
{
    int64_t words = s->size >> 6;
    for (int l = 0; l < s->levels; l++)
        memset(s->count[l], 0, (size_t)s->n_count[l] * sizeof *s->count[l]);
    for (int64_t w = 0; w < words; w++)
        s->count[0][w >> 4] += __builtin_popcountll(s->bits[w]);
    for (int l = 1; l < s->levels; l++)
        for (int64_t i = 0; i < s->n_count[l - 1]; i++)
            s->count[l][i >> 4] += s->count[l - 1][i];
}

/* Renumbers the marked times 0, 1, ... in order once the clock reaches the end: at most
 * n_blocks are marked, so each renumbering frees at least half of the times. */
static void stack_compact(Stack *s)
{
    int64_t n = 0;
    for (int64_t t = 0; t < s->size; t++) {
        int32_t b = s->at[t];
        if (b < 0)
            continue;
        s->at[t] = -1;
        s->at[n] = b;
        s->last[b] = (int32_t)n;
        n++;
    }
    memset(s->bits, 0, (size_t)(s->size >> 6) * sizeof *s->bits);
    for (int64_t t = 0; t < n; t++)
        s->bits[t >> 6] |= (uint64_t)1 << (t & 63);
    st_rebuild(s);
    s->now = n;
}

static void stack_init(Stack *s, int64_t nb)
{
    memset(s, 0, sizeof *s);
    int64_t size = 2 * nb + 2 > 1024 ? 2 * nb + 2 : 1024;
    s->size = (size + 1023) & ~(int64_t)1023; /* whole words and level-0 groups */
    s->bits = kv_calloc((size_t)(s->size >> 6), sizeof *s->bits);
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
    s->at = kv_malloc((size_t)s->size * sizeof *s->at);
    for (int64_t t = 0; t < s->size; t++)
        s->at[t] = -1;
    s->last = kv_malloc((size_t)(nb ? nb : 1) * sizeof *s->last);
    for (int64_t b = 0; b < nb; b++)
        s->last[b] = -1;
}

static void stack_free(Stack *s)
{
    free(s->bits);
    for (int l = 0; l < s->levels; l++)
        free(s->count[l]);
    free(s->at);
    free(s->last);
}

int64_t *reuse_lru_curve(const ReqLog *log)
{
    const int64_t B = log->block_tokens, nb = log->n_blocks;
    Stack s;
    stack_init(&s, nb);
    int64_t *delta = kv_calloc((size_t)nb + 2, sizeof *delta);
    for (long r = 0; r < log->n; r++) {
        const uint32_t *ids = log->ids + log->off[r];
        int64_t m = log->off[r + 1] - log->off[r], max_depth = 0;
        /* the depths before the request: block j is cached at capacity c when every block
         * before it is, i.e. from c = the prefix maximum of their depths */
        int64_t prev_t = -1, depth = 0;
        for (int64_t j = 0; j < m && j * B < log->input[r]; j++) {
            int32_t t = s.last[ids[j]];
            if (t < 0)
                break; /* never referenced: missing at every capacity */
            /* A request's blocks were last referenced together, last to first, so block j's
             * time is usually a little before block j - 1's: its depth is that one's plus the
             * marks between them, counted in the bitmap's words nearby */
            if (prev_t >= 0 && t < prev_t && prev_t - t <= 64 * ST_NEAR_WORDS)
                depth += st_between(&s, t, prev_t);
            else
                depth = s.marked - st_before(&s, t);
            prev_t = t;
            if (depth > max_depth)
                max_depth = depth;
            int64_t tokens = log->input[r] - j * B < B ? log->input[r] - j * B : B;
            delta[max_depth] += tokens;
        }
        /* then the references, last block to first, as reuse_simulate makes them */
        for (int64_t j = m - 1; j >= 0; j--) {
            uint32_t b = ids[j];
            if (s.now == s.size)
                stack_compact(&s);
            if (s.last[b] >= 0) {
                st_mark(&s, s.last[b], -1);
                s.at[s.last[b]] = -1;
                s.marked--;
            }
            s.last[b] = (int32_t)s.now;
            s.at[s.now] = (int32_t)b;
            st_mark(&s, s.now, 1);
            s.marked++;
            s.now++;
        }
    }
    int64_t *out = kv_malloc((size_t)(nb + 1) * sizeof *out);
    int64_t sum = 0;
    for (int64_t c = 0; c <= nb; c++) {
        sum += delta[c];
        out[c] = sum;
    }
    free(delta);
    stack_free(&s);
    return out;
}

/* ---- lru streamed from the file ---- */

/* Slots of the cache by hash id: open addressing, linear probing, deletion by backward shift
 * (no tombstones), so that the table never holds more than the cache. */
typedef struct {
    int64_t *key;  /* [mask + 1] */
    int32_t *slot; /* [mask + 1], -1: empty */
    size_t mask;
} SlotMap;

static size_t slot_hash(int64_t key, size_t mask)
{
    uint64_t x = (uint64_t)key * 0x9E3779B97F4A7C15ull;
    return (size_t)(x ^ (x >> 29)) & mask;
}

static int32_t slotmap_get(const SlotMap *m, int64_t key)
{
    for (size_t i = slot_hash(key, m->mask);; i = (i + 1) & m->mask) {
        if (m->slot[i] < 0)
            return -1;
        if (m->key[i] == key)
            return m->slot[i];
    }
}

static void slotmap_put(SlotMap *m, int64_t key, int32_t slot)
{
    size_t i = slot_hash(key, m->mask);
    while (m->slot[i] >= 0)
        i = (i + 1) & m->mask;
    m->key[i] = key;
    m->slot[i] = slot;
}

static void slotmap_del(SlotMap *m, int64_t key)
{
    size_t i = slot_hash(key, m->mask);
    while (m->key[i] != key || m->slot[i] < 0)
        i = (i + 1) & m->mask;
    m->slot[i] = -1;
    for (size_t j = (i + 1) & m->mask; m->slot[j] >= 0; j = (j + 1) & m->mask) {
        size_t h = slot_hash(m->key[j], m->mask);
        /* j's entry may move into the hole at i when its home is not in (i, j] */
        if (((j - h) & m->mask) >= ((j - i) & m->mask)) {
            m->key[i] = m->key[j];
            m->slot[i] = m->slot[j];
            m->slot[j] = -1;
            i = j;
        }
    }
}

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
    SlotMap m = {0};
    size_t tsize = 16;
    while (tsize < 2 * n)
        tsize *= 2;
    m.mask = tsize - 1;
    m.key = kv_malloc(tsize * sizeof *m.key);
    m.slot = kv_malloc(tsize * sizeof *m.slot);
    for (size_t i = 0; i < tsize; i++)
        m.slot[i] = -1;
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
        for (long k = 0; k < rec.n_hash && slotmap_get(&m, rec.hash_ids[k]) >= 0; k++)
            hit += block_tokens_at(rec.input_length, k, B);
        for (long j = rec.n_hash - 1; j >= 0 && cap > 0; j--) {
            int64_t id = rec.hash_ids[j];
            int32_t sl = slotmap_get(&m, id);
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
                slotmap_put(&m, id, sl);
                out->inserted++;
            } else { /* the least recent block's slot */
                sl = tail;
                tail = prev[sl];
                if (tail >= 0)
                    next[tail] = -1;
                else
                    head = -1;
                slotmap_del(&m, key[sl]);
                out->evictions++;
                key[sl] = id;
                slotmap_put(&m, id, sl);
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
    free(m.key);
    free(m.slot);
    free(key);
    free(prev);
    free(next);
    return rc < 0 ? -1 : 0;
}
