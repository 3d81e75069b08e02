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
 * needs the log's future: reuse_next_use, or reuse_stream's first pass), conv
 * (conversation-aware: every entry belongs to the conversation of the last request that
 * referenced it; when room is needed, every entry of the conversation least recently active
 * among those holding any is dropped at once).
 * Deterministic: the same log and settings give the same numbers.
 *
 * Model changes: under the conversation scope a turn served by another model than its parent
 * (ReqLog.model) finds nothing; the parent's entry is dropped (invalidated). Under the prefix
 * scope the log's ids decide (a model's KV has its own hash ids).
 *
 * Compressed persistence (conversation scope): an entry persisted at ratio q < 1 holds
 * max(1, ceil(q x blocks)) blocks and still serves its next turn min(context, input) tokens
 * (the quality it costs is the replay simulator's measure, docs/reuse.md); the next turn's
 * prefill attends over q x context cached keys.
 *
 * TTFT (ReuseCost): one device prefills requests one at a time in order of arrival (a FIFO
 * queue, no batching, decode not modelled). A request's service time is its prefill (the
 * tokens not served, at tokens/s or by FLOPs) plus the transfer of the blocks it finds on the
 * host tier (host_bw bytes/s); it starts at max(arrival, the previous request's end); its TTFT
 * is its end minus its arrival. */
#ifndef KVSIM_REUSE_H
#define KVSIM_REUSE_H

#include <stdbool.h>
#include <stdint.h>

#include "sim/reuse/reqlog.h"

typedef enum { SCOPE_NONE, SCOPE_PREFIX, SCOPE_CONVERSATION, N_SCOPES } ReuseScope;
typedef enum { POL_LRU, POL_FIFO, POL_LFU, POL_S3FIFO, POL_BELADY, POL_CONV, N_POLICIES } ReusePolicy;

extern const char *const reuse_scope_names[N_SCOPES];
extern const char *const reuse_policy_names[N_POLICIES];

/* Turns are counted per turn index 0..REUSE_MAX_TURN-1; the last bucket holds every turn >= it. */
enum { REUSE_MAX_TURN = 33 };

/* Nearest-rank quantiles of the TTFT kept per run: ttft_q[k] is the ceil(k/100 x n)-th smallest
 * (k = 0: the smallest). */
enum { REUSE_TTFT_Q = 101 };

typedef struct {
    double prefill_tps;  /* > 0: prefill seconds = tokens / prefill_tps */
    double flops_per_s;  /* otherwise: prefill seconds = FLOPs / flops_per_s */
    double params;       /* weights a token passes through (FLOPs: 2 per weight per token) */
    double attn_dim;     /* layers x query heads x head_dim (attention FLOPs, reuse_prefill_flops) */
    double block_bytes;  /* KV bytes of a block */
    double host_bw;      /* host -> device bytes/s (0: transfers take no time) */
} ReuseCost;

/* FLOPs of a prefill of n new tokens after c cached ones: 2 x params per token for the
 * matrix products, and per layer and query head 4 x head_dim per attended key (QK^T and AV,
 * a multiply-add each): 2 x params x n + 4 x attn_dim x (n x c + n (n + 1) / 2). */
double reuse_prefill_flops(const ReuseCost *cost, double cached, double n);
/* Its time under the cost's throughput. */
double reuse_prefill_seconds(const ReuseCost *cost, double cached, double n);

typedef struct {
    ReuseScope scope;
    ReusePolicy policy;
    int64_t capacity_blocks;
    int64_t host_blocks;        /* 0: no host tier */
    double compress;            /* conversation scope: persisted ratio (0 or 1: uncompressed) */
    const uint32_t *next_use;   /* reuse_next_use (read only under belady) */
    const ReuseCost *cost;      /* NULL: no FLOPs or TTFT */
} ReuseOptions;

typedef struct {
    long requests;
    int64_t prompt_tokens, hit_tokens; /* hit_tokens: prompt tokens served by the cache */
    int64_t evictions;                 /* entries evicted: blocks (prefix), contexts (conversation) */
    int64_t inserted;                  /* entries inserted */
    int64_t blocks_end, blocks_peak;   /* blocks held at the end, at most */
    int64_t host_hit_tokens;           /* of hit_tokens, those found on the host tier */
    int64_t host_blocks_end, host_blocks_peak, host_evictions;
    int64_t blocks_to_host, blocks_to_device; /* moved device -> host, host -> device */
    int64_t invalidated;       /* conversation entries dropped by a model change */
    double flops, flops_saved; /* prefill FLOPs done, and those the cache saved (with a cost) */
    double ttft_q[REUSE_TTFT_Q], ttft_mean; /* seconds (with a cost) */
    long turn_requests[REUSE_MAX_TURN];
    int64_t turn_prompt[REUSE_MAX_TURN], turn_hit[REUSE_MAX_TURN];
} ReuseResult;

/* For belady: the index of the next request that references each entry after the request that
 * references it, UINT32_MAX when none. prefix: one per block reference ([log->off[n]]);
 * conversation: one per request (its next turn). NULL for scope none. free() it. */
uint32_t *reuse_next_use(const ReqLog *log, ReuseScope scope);

/* Replays the log under every option. */
void reuse_run(const ReqLog *log, const ReuseOptions *opt, ReuseResult *out);

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

/* ---- replays streamed ----
 *
 * A cell is one replay (one ReuseOptions) fed request by request; its memory follows what its
 * caches hold (a table from key to slot, the policy's per-entry state, conv's conversations
 * holding entries, s3fifo's ghosts as many as its ghost FIFO counts), not the log, except the
 * TTFTs (below). */

/* One request as a cell sees it. */
typedef struct {
    const int64_t *keys;       /* prefix scope: its hash_ids */
    int64_t n_keys;
    const uint32_t *next_use;  /* belady, prefix: per key, the next request referencing it */
    int64_t input, output;
    int32_t turn;
    double timestamp;
    int32_t model;
    int64_t self;              /* conversation scope: its entry's key (its number in the log) */
    int64_t parent;            /* its parent's number, -1: none */
    int64_t parent_context;    /* the parent's input + output tokens (when it may be cached) */
    int32_t parent_model;
    int64_t conv;              /* its conversation (conv policy), -1: none */
    uint32_t self_next_use;    /* belady, conversation: its next turn, UINT32_MAX: none */
} ReuseReq;

typedef struct ReuseCell ReuseCell;

/* opt->next_use is not read (each ReuseReq brings its own). */
ReuseCell *reuse_cell_new(const ReuseOptions *opt, int block_tokens);
void reuse_cell_request(ReuseCell *cell, const ReuseReq *req);
/* The result (TTFT quantiles exact: every TTFT, kept in a temporary file while the log runs,
 * is read back and sorted here, 8 bytes per request for the time of the call). */
void reuse_cell_finish(ReuseCell *cell, ReuseResult *out);
void reuse_cell_free(ReuseCell *cell);

/* What a cell holds now: entries (device and host), slots allocated, s3fifo ghosts,
 * conversations with entries (conv), reference counts with entries (lfu). */
typedef struct {
    int64_t entries, slots, ghosts, conversations, lfu_counts;
} ReuseCellStats;
void reuse_cell_stats(const ReuseCell *cell, ReuseCellStats *st);

typedef struct {
    long requests;
    int64_t references, prompt_tokens;
    int64_t n_blocks;      /* distinct hash ids (-1: not counted, when no first pass ran) */
    int block_tokens;      /* the one in use */
    ReqlogFormat format;
    bool prepass;          /* whether a first pass ran */
    int64_t pending_peak;  /* parents awaiting their next turn, at most */
    int64_t curve_total;   /* the curve's cached tokens at capacities >= n_blocks */
} ReuseStreamInfo;

/* Every options[i] over the log at path, streamed: results[i] equal reuse_run's on the loaded
 * log, at any thread count. The log is read once or twice:
 * - a first pass, when a replay needs it (the conversation scope or conv: each request's
 *   parent, conversation and next turn; belady under the prefix scope: each block
 *   reference's next use; the curve) writes fixed-size entries into temporary files (deleted
 *   when closed), holding per distinct block id its last reference time (4 bytes, for the
 *   dense ids the logs use) and per request two chat id entries, and the curve's bitmap (1 bit
 *   per block reference); then
 * - one pass in chunks of requests, each chunk run through every cell (threads: cells at once,
 *   0 = every core) while the next one is read; a parent's context and model stay in a table
 *   only until its first child arrives (the only request that can find its entry).
 * curve_caps (ascending, NULL: no curve): curve_out[i] = the cached tokens of the prefix scope
 * under lru at capacity curve_caps[i] (reuse_lru_curve's, binned). block_tokens 0: the
 * format's. progress: a progress line on stderr per pass (MiB of the file read). Errors as
 * reqlog_next's. */
int reuse_stream(const char *path, ReqlogFormat format, int block_tokens,
                 const ReuseOptions *opts, int n_opts, int threads, bool progress,
                 const int64_t *curve_caps, int n_curve, int64_t *curve_out,
                 ReuseResult *results, ReuseStreamInfo *info, KvErr *err);

/* The prefix scope under lru at every capacity at once, from stack distances in one pass: LRU
 * with blocks of one size holds, at any capacity, the blocks most recently referenced, so a
 * block is present at capacity c before a request when at most c distinct blocks (itself
 * included) were referenced since its last reference, and a request's run of leading blocks
 * at capacity c ends at the first block whose prefix maximum of that depth exceeds c. Returns
 * out[0 .. n_blocks]: the cached tokens of reuse_simulate(SCOPE_PREFIX, POL_LRU, c) at
 * c <= n_blocks (larger capacities cache what n_blocks does). free() it. */
int64_t *reuse_lru_curve(const ReqLog *log);

/* The prefix scope under lru, streamed from the log file record by record: the numbers of
 * reuse_simulate(SCOPE_PREFIX, POL_LRU) on the loaded log (requests, tokens, hits, evictions,
 * inserted, blocks held; turns), in memory bounded by the cache (48 to 80 bytes per block of
 * capacity: the key map from hash id to slot, at most half full, and the lru list) and the reader's line, whatever the
 * log's length. Errors as reqlog_next's. */
int reuse_stream_lru(const char *path, ReqlogFormat format, int block_tokens,
                     int64_t capacity_blocks, ReuseResult *out, KvErr *err);

/* Blocks of a context of `tokens` tokens. */
static inline int64_t reuse_blocks(int64_t tokens, int block_tokens)
{
    return (tokens + block_tokens - 1) / block_tokens;
}

#endif
