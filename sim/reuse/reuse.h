/* reuse.h — the request-level simulator of persisted KV caches (docs/reuse.md): a log of
 * requests (reqlog.h) replayed through a cache of KV blocks of one scope under one replacement
 * policy and one capacity.
 *
 * The cache holds blocks of block_tokens tokens; every block occupies block_tokens tokens' KV
 * bytes (engines allocate whole pages), so a capacity is a number of blocks.
 *
 * Scopes:
 * - none: nothing is kept; every prompt token is prefilled.
 * - prefix: blocks shared across requests by hash id. A request's hit is the longest run of its
 *   leading hash_ids present in the cache: min(run * block_tokens, input_length) tokens. Then
 *   each of its blocks is referenced, from its last block to its first (so that, as in vLLM,
 *   a request's tail ages before its head), present ones as hits of the policy, missing ones
 *   inserted, each insertion evicting a block under the policy when the cache is full.
 * - conversation: one entry per request: its whole context after the answer (input_length +
 *   output_length tokens, in whole blocks), which serves only the conversation's next turn (the
 *   request whose parent_chat_id is its chat_id): that turn's hit is min(context, its
 *   input_length) tokens. The entry is dropped when that turn arrives (the turn then adds its
 *   own) or when evicted. An entry larger than the whole cache is not kept.
 *
 * Policies: lru, fifo, lfu (in-cache reference counts, ties to the least recently used),
 * s3fifo (Yang et al., SOSP'23: small FIFO of 10% of the capacity, main FIFO, ghost FIFO of
 * evicted ids as many as the main FIFO holds blocks, frequencies capped at 3, promotion at a
 * frequency > 1), belady (evicts the entry whose next reference is farthest in the future;
 * needs the whole log: reuse_next_use). Deterministic: the same log and settings give the same
 * numbers. */
#ifndef KVSIM_REUSE_H
#define KVSIM_REUSE_H

#include <stdint.h>

#include "sim/reuse/reqlog.h"

typedef enum { SCOPE_NONE, SCOPE_PREFIX, SCOPE_CONVERSATION, N_SCOPES } ReuseScope;
typedef enum { POL_LRU, POL_FIFO, POL_LFU, POL_S3FIFO, POL_BELADY, N_POLICIES } ReusePolicy;

extern const char *const reuse_scope_names[N_SCOPES];
extern const char *const reuse_policy_names[N_POLICIES];

/* Turns are counted per turn index 0..REUSE_MAX_TURN-1; the last bucket holds every turn >= it. */
enum { REUSE_MAX_TURN = 33 };

typedef struct {
    long requests;
    int64_t prompt_tokens, hit_tokens; /* hit_tokens: prompt tokens served by the cache */
    int64_t evictions;                 /* entries evicted: blocks (prefix), contexts (conversation) */
    int64_t inserted;                  /* entries inserted */
    int64_t blocks_end, blocks_peak;   /* blocks held at the end, at most */
    int64_t host_hit_tokens;           /* of hit_tokens, those found on the host tier */
    int64_t host_blocks_end, host_blocks_peak, host_evictions;
    long turn_requests[REUSE_MAX_TURN];
    int64_t turn_prompt[REUSE_MAX_TURN], turn_hit[REUSE_MAX_TURN];
} ReuseResult;

/* For belady: the index of the next request that references each entry after the request that
 * references it, UINT32_MAX when none. prefix: one per block reference ([log->off[n]]);
 * conversation: one per request (its next turn). NULL for scope none. free() it. */
uint32_t *reuse_next_use(const ReqLog *log, ReuseScope scope);

/* Replays the log. next_use: from reuse_next_use (only read under belady). */
void reuse_simulate(const ReqLog *log, ReuseScope scope, ReusePolicy policy,
                    int64_t capacity_blocks, const uint32_t *next_use, ReuseResult *out);
/* reuse_simulate with a host tier of host_blocks (0: none) behind the device cache: an lru
 * cache that takes every entry the device evicts. A request's hit counts entries on either
 * tier (host_hit_tokens: those found only on the host); an entry referenced on the host moves
 * back to the device (its insertion may demote others); an entry larger than the device goes
 * to the host directly; what the host evicts is gone. */
void reuse_simulate_host(const ReqLog *log, ReuseScope scope, ReusePolicy policy,
                         int64_t capacity_blocks, int64_t host_blocks, const uint32_t *next_use,
                         ReuseResult *out);

/* The prefix scope under lru at every capacity at once, from stack distances in one pass: LRU
 * with blocks of one size holds, at any capacity, the blocks most recently referenced, so a
 * block is present at capacity c before a request when at most c distinct blocks (itself
 * included) were referenced since its last reference, and a request's run of leading blocks
 * at capacity c ends at the first block whose prefix maximum of that depth exceeds c. Returns
 * out[0 .. n_blocks]: the cached tokens of reuse_simulate(SCOPE_PREFIX, POL_LRU, c) at
 * c <= n_blocks (larger capacities cache what n_blocks does). free() it. */
int64_t *reuse_lru_curve(const ReqLog *log);

/* Blocks of a context of `tokens` tokens. */
static inline int64_t reuse_blocks(int64_t tokens, int block_tokens)
{
    return (tokens + block_tokens - 1) / block_tokens;
}

#endif
