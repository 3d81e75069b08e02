/* wrap.h — the shared part of the wrappers that allocate a budget across KV heads and layers
 * around an inner policy's per-token scores (adakv, pyramid).
 *
 * Configuration. `inner = NAME` (required) names a policy whose PolicyType exposes a
 * PolicyScorer (policies/policy.h: snapkv, knorm, keydiff, expected_attention); every key the
 * wrapper's own table does not list is the inner policy's parameter, applied to the inner's
 * defaults in the order given. A key given after inner = is checked at once (an error names its
 * line), one given before it when the section is complete. The parameter struct stays flat (the
 * engine copies it by size): the inner's key = value pairs are kept as text and parsed again
 * where needed.
 *
 * The frame is the inner's (PolicyScorer.frame): budget B, window W, decode grow or slide.
 * Prefill. Chunks are admitted whole; at a span's last chunk the last W' positions
 * (PolicyScorer.window_at) stay in every KV head and each head's cached positions before them
 * are its candidates. The wrapper's allocation says how many of them head g keeps (keep[g]) and
 * the layer's decode budget (cap: the most slots of all KV heads together after a decode step's
 * eviction); head g keeps its keep[g] best candidates by the inner's scores (ties: the later
 * position), computed only for the heads that are cut.
 * Decode. Every new token enters every head. With the inner's decode = window the sliding part
 * (the window, then each new token: the same positions in every head) loses its oldest position
 * in every head after the attention while the layer holds more than cap slots; with decode =
 * grow nothing is evicted.
 * Memory: every head's real number of slots (the driver's default), so a head that keeps more
 * than another costs more; kvpress's AdaKV masks the pruned slots instead and frees nothing. */
#ifndef KVSIM_WRAP_H
#define KVSIM_WRAP_H

#include <stdbool.h>
#include <stdint.h>

#include "policies/policy.h"

enum { WRAP_KEYS_MAX = 2048 };

typedef struct {
    char inner[PARAM_STRING_MAX]; /* the inner policy's type */
    double alpha;                 /* adakv: each head's floor, a share of the mean */
    int beta;                     /* pyramid: the steepness */
    /* the inner's parameters as "key=value\n" lines, in the order given (a key given again
     * replaces its earlier value) */
    char keys[WRAP_KEYS_MAX];
} WrapParams;

typedef struct Wrap Wrap;

/* Sets w->keep[g] for every KV head (>= n[g]: the head is not cut) and w->cap, given the
 * candidates w->cand[g][0, w->n[g]) and the compression's window W. May call wrap_scores. */
typedef void (*WrapAllocFn)(Wrap *w, const PrefillView *pv, int W);

struct Wrap {
    Policy base;
    WrapParams prm;
    WrapAllocFn alloc;
    Policy *inner; /* scores only */
    const PolicyScorer *scorer;
    int budget, window; /* the inner's frame */
    bool grow;
    int layer, n_layers, n_tokens;
    long cap;        /* the layer's slots after a decode step's eviction */
    int tail_oldest; /* oldest position of the sliding part (every head's) */
    int32_t **cand;  /* [n_kv_heads][T] candidates of the compression under way, ascending */
    int *n;          /* [n_kv_heads] their number */
    int *keep;       /* [n_kv_heads] how many each head keeps */
    double **score;  /* [n_kv_heads][T] by position, valid where scored[g] */
    bool *scored;    /* [n_kv_heads] */
};

/* The wrapper's own parameters (inner, then alpha or beta) share these handlers. */
int wrap_set_extra(void *params, const char *key, const char *value, KvErr *err);
int wrap_validate(const void *params, KvErr *err);
/* The inner's type and its parsed parameters (kv_malloc'ed; the caller frees), or NULL with a
 * one-line message. */
void *wrap_inner_params(const WrapParams *w, const PolicyType **type, KvErr *err);
/* The inner's frame for these wrapper parameters (they are valid). */
void wrap_frame(const WrapParams *w, int *budget, int *window, bool *grow);

Policy *wrap_create(const PolicyType *type, WrapAllocFn alloc, const void *params,
                    const LayerView *L, const PolicyEnv *env, KvErr *err);
/* Computes head g's scores (once per compression). */
void wrap_scores(Wrap *w, const PrefillView *pv, int g);
void wrap_prefill(Policy *p, const PrefillView *pv);
void wrap_step(Policy *p, const StepView *sv);
void wrap_observe(Policy *p, const StepView *sv, const float *const *attn);
void wrap_destroy(Policy *p);

#endif
