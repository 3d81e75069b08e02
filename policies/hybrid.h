/* hybrid.h — FixedSize's truncation rule, shared by the `hybrid` and `offload` policies.
 *
 * A truncation of one KV head's cache keeps `keep_real` real tokens: the `recent` most recent
 * cached positions (the newest among them, so it is always kept) and, of the others, those of
 * highest importance. Keeping the importance part as "the best of what is not recent" is
 * FixedSize's rule "top by importance, the rest recent, any overlap refilled by importance". */
#ifndef KVSIM_POLICIES_HYBRID_H
#define KVSIM_POLICIES_HYBRID_H

#include <stdint.h>

#include "policies/policy.h"

/* One token's rank key: lower importance goes first, then the older position. */
typedef struct {
    float importance;
    int32_t pos;
} HybridRank;

/* Sorts ascending by (importance, position): the first entries are the ones to evict. */
void hybrid_rank_sort(HybridRank *rank, int n);

/* Slots chosen by importance when the cache holds `budget` slots at attention time, `reserved`
 * of them synthetic: min(floor(budget * ratio), budget - 2 - reserved). The 2 are the token that
 * arrives next and the newest token at truncation time, which the recent part always holds. */
int hybrid_importance_slots(int budget, double ratio, int reserved);

/* Scratch buffers sized to a cache, grown on demand. */
typedef struct {
    float *importance;  /* per slot */
    HybridRank *rank;
    int32_t *evicted;
    int cap;
} HybridScratch;

void hybrid_scratch_reserve(HybridScratch *s, int n);
void hybrid_scratch_free(HybridScratch *s);

/* Chooses the real tokens to evict so that `keep_real` remain (keep_real >= recent >= 1):
 * every token older than the `recent` most recent cached positions competes on importance[slot]
 * (ties: the older goes first). `newest` must be cached. Writes the evicted positions to
 * s->evicted (lowest importance first) and returns how many; the cache is not changed.
 * s must have room for c->n entries. */
int hybrid_select_evictions(const KVCache *c, const float *importance, int newest, int keep_real,
                            int recent, HybridScratch *s);

/* The host tier of an `offload` instance, read-only (for tests and diagnostics): writes the
 * positions held for KV head `kv_head`, oldest offload first, into out (room for n_tokens) and
 * returns how many. */
int offload_host_tokens(const Policy *p, int kv_head, int32_t *out);

#endif
