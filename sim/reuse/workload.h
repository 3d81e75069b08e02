/* workload.h — synthetic multi-turn chat request logs in the qwen format (docs/reuse.md,
 * "kvsim synth-workload"), seeded through GSL's RNG: the same parameters give the same bytes.
 *
 * Conversations arrive as a Poisson process (rate per second). Each picks one of n_system
 * shared system prompts uniformly (none when n_system is 0) and a number of turns (geometric,
 * mean turns_mean, at least 1). Turn k's prompt is the conversation so far (system prompt,
 * earlier messages and answers) plus a new message; its answer follows; the next turn arrives
 * an exponential think time (mean think_mean seconds) after this one. Message, answer and
 * system prompt lengths are geometric (at least 1 token) with the given means; each system
 * prompt's length is drawn once.
 *
 * hash_ids: one id per block_tokens tokens of the prompt, chained like a prefix cache's: a full
 * block's id stands for the whole prefix up to its end (a shared system prompt's full blocks
 * have the same ids in every conversation that uses it; a conversation's earlier full blocks
 * keep their ids in its later turns), a block cut by the prompt's end is new every time.
 *
 * Models (n_models > 1): each conversation starts on a model drawn uniformly; before each later
 * turn it moves to another (uniformly among the others) with probability switch_prob. Each
 * request carries "model"; a model's KV is its own, so a switch gives the whole context new
 * ids (a shared system prompt has one set of ids per model). */
#ifndef KVSIM_WORKLOAD_H
#define KVSIM_WORKLOAD_H

#include <stdbool.h>

#include "sim/base/util.h"

typedef struct {
    unsigned long seed;
    long n_conversations;
    double turns_mean;   /* >= 1 */
    int n_system;        /* shared system prompts (0: none) */
    double system_mean;  /* tokens */
    double message_mean; /* tokens of each user message */
    double answer_mean;  /* tokens of each answer */
    double rate;         /* conversations per second */
    double think_mean;   /* seconds between a turn and the next */
    int block_tokens;
    int n_models;        /* models a conversation may be served by (1: no "model" field) */
    double switch_prob;  /* per turn after the first: the chance it moves to another model */
    bool progress;
} WorkloadParams;

void workload_defaults(WorkloadParams *wp);
int workload_validate(const WorkloadParams *wp, KvErr *err);
/* Writes the log to path (atomically); *n_requests: requests written (may be NULL). */
int workload_write(const WorkloadParams *wp, const char *path, long *n_requests, KvErr *err);

#endif
