/* KVCache and the Policy base: the bookkeeping every policy shares. */
#include <stdlib.h>
#include <string.h>

#include "policies/policy.h"

void kvcache_init(KVCache *c, int n_tokens, int head_dim)
{
    memset(c, 0, sizeof *c);
    c->n_tokens = n_tokens;
    c->head_dim = head_dim;
    c->cap = 64;
    c->pos = kv_malloc((size_t)c->cap * sizeof *c->pos);
    c->alt_kv = kv_calloc((size_t)c->cap, sizeof *c->alt_kv);
    c->alt_stamp = kv_calloc((size_t)c->cap, sizeof *c->alt_stamp);
    c->slot_of = kv_malloc((size_t)n_tokens * sizeof *c->slot_of);
    for (int i = 0; i < n_tokens; i++)
        c->slot_of[i] = -1;
}

void kvcache_free(KVCache *c)
{
    for (int i = 0; i < c->n; i++)
        free(c->alt_kv[i]);
    free(c->pos);
    free(c->alt_kv);
    free(c->alt_stamp);
    free(c->slot_of);
    memset(c, 0, sizeof *c);
}

/* Room for n slots: the capacity doubled until it holds them. */
static void reserve_slots(KVCache *c, int n)
{
    if (c->cap >= n)
        return;
    while (c->cap < n)
        c->cap *= 2;
    c->pos = kv_realloc(c->pos, (size_t)c->cap * sizeof *c->pos);
    c->alt_kv = kv_realloc(c->alt_kv, (size_t)c->cap * sizeof *c->alt_kv);
    c->alt_stamp = kv_realloc(c->alt_stamp, (size_t)c->cap * sizeof *c->alt_stamp);
}

static int push_slot(KVCache *c, int pos)
{
    reserve_slots(c, c->n + 1);
    int s = c->n++;
    c->pos[s] = pos;
    c->alt_kv[s] = NULL;
    if (pos >= 0)
        c->slot_of[pos] = s;
    return s;
}

void kvcache_add(KVCache *c, int pos)
{
    if (c->slot_of[pos] < 0)
        push_slot(c, pos);
}

int kvcache_add_alt(KVCache *c, int pos, const float *k, const float *v)
{
    int s = (pos >= 0 && c->slot_of[pos] >= 0) ? c->slot_of[pos] : push_slot(c, pos);
    if (!c->alt_kv[s]) {
        c->alt_kv[s] = kv_malloc(2 * (size_t)c->head_dim * sizeof(float));
        c->n_alt++;
    }
    memcpy(c->alt_kv[s], k, (size_t)c->head_dim * sizeof(float));
    memcpy(c->alt_kv[s] + c->head_dim, v, (size_t)c->head_dim * sizeof(float));
    c->alt_stamp[s] = ++c->alt_clock;
    return s;
}

void kvcache_remove_slot(KVCache *c, int slot)
{
    if (c->pos[slot] >= 0)
        c->slot_of[c->pos[slot]] = -1;
    if (c->alt_kv[slot]) {
        free(c->alt_kv[slot]);
        c->n_alt--;
    }
    int last = --c->n;
    if (slot != last) {
        c->pos[slot] = c->pos[last];
        c->alt_kv[slot] = c->alt_kv[last];
        c->alt_stamp[slot] = c->alt_stamp[last];
        if (c->pos[slot] >= 0)
            c->slot_of[c->pos[slot]] = slot;
    }
    c->alt_kv[last] = NULL;
}

void kvcache_remove(KVCache *c, int pos)
{
    if (c->slot_of[pos] >= 0)
        kvcache_remove_slot(c, c->slot_of[pos]);
}

void kvcache_clear(KVCache *c)
{
    while (c->n > 0)
        kvcache_remove_slot(c, c->n - 1);
}

void kvcache_assign(KVCache *c, const int32_t *pos, int n)
{
    if (c->n_alt > 0) {
        kvcache_clear(c);
    } else {
        for (int s = 0; s < c->n; s++)
            if (c->pos[s] >= 0)
                c->slot_of[c->pos[s]] = -1;
        c->n = 0;
    }
    reserve_slots(c, n);
    memcpy(c->pos, pos, (size_t)n * sizeof *pos);
    memset(c->alt_kv, 0, (size_t)n * sizeof *c->alt_kv);
    for (int s = 0; s < n; s++)
        c->slot_of[pos[s]] = s;
    c->n = n;
}

static int compare_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

int kvcache_positions(const KVCache *c, int32_t *out)
{
    int n = 0;
    for (int i = 0; i < c->n; i++)
        if (c->pos[i] >= 0)
            out[n++] = c->pos[i];
    qsort(out, (size_t)n, sizeof *out, compare_i32);
    return n;
}

int kvcache_real_count(const KVCache *c)
{
    int n = 0;
    for (int i = 0; i < c->n; i++)
        n += c->pos[i] >= 0;
    return n;
}

double kv_entry_bytes(double tokens, int head_dim, int kv_bits)
{
    return tokens * 2.0 * head_dim * kv_bits / 8.0;
}

void policy_base_init(Policy *p, const PolicyType *type, const LayerView *L)
{
    memset(p, 0, sizeof *p);
    p->type = type;
    p->n_kv_heads = L->n_kv_heads;
    p->cache = kv_calloc((size_t)L->n_kv_heads, sizeof *p->cache);
    for (int g = 0; g < L->n_kv_heads; g++)
        kvcache_init(&p->cache[g], L->n_tokens, L->head_dim);
}

void policy_base_free(Policy *p)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_free(&p->cache[g]);
    free(p->cache);
    p->cache = NULL;
}
