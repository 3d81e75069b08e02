/* fixture.h — hand-built layers for policy tests, and a plain reference driver.
 *
 * fixture_run() drives a policy exactly as the replay engine does (the spans of meta in order:
 * each prefill span in chunks of prefill_chunk tokens, with the statistics of policies/policy.h;
 * each decode run as step / attention over the cache / observe), but with plain loops written
 * independently of sim/replay/engine.c and sim/driver/driver.c, so a policy's tests do not depend
 * on their code. */
#ifndef KVSIM_TEST_FIXTURE_H
#define KVSIM_TEST_FIXTURE_H

#include <stdint.h>

#include "policies/policy.h"

typedef struct {
    TraceMeta meta; /* positions = index, segments 0, tokens 0, no needles/probes */
    LayerView L;
    float *q, *k, *v; /* owned, writable: [Hq][T][D], [Hkv][T][D], [Hkv][T][D] */
    int prefill_chunk; /* tokens per prefill chunk fixture_run feeds (0: each span whole) */
} Fixture;

/* Zero-filled layer, built by trace_meta_init and layer_view_make: the default attention scale
 * (attn_scale_default), global attention, rope_theta 10000, half layout. */
Fixture *fixture_new(int n_q_heads, int n_kv_heads, int head_dim, int n_tokens, int n_prompt);
void fixture_free(Fixture *fx);
/* Makes the layer a sliding-window layer of `window` keys (0: global), in meta and L. */
void fixture_set_window(Fixture *fx, int window);
/* Replaces meta.spans (a single prompt by default) with spans[0, n): in order, covering
 * [0, n_tokens), the first a prefill span ending at n_prompt. */
void fixture_set_spans(Fixture *fx, const TraceSpan *spans, int n);
/* Fills q, k, v with independent N(0, sigma^2) values (GSL RNG, deterministic in seed). */
void fixture_randomize(Fixture *fx, uint64_t seed, double sigma);
static inline float *fx_q(Fixture *fx, int h, int t) { return fx->q + ((size_t)h * fx->L.n_tokens + t) * fx->L.head_dim; }
static inline float *fx_k(Fixture *fx, int g, int t) { return fx->k + ((size_t)g * fx->L.n_tokens + t) * fx->L.head_dim; }
static inline float *fx_v(Fixture *fx, int g, int t) { return fx->v + ((size_t)g * fx->L.n_tokens + t) * fx->L.head_dim; }

/* The parameter struct of `type` (malloc'ed; free() it) with "key=value key=value ..." (space
 * separated) applied over the defaults and validated; fails the test on a bad parameter. */
void *fixture_params(const PolicyType *type, const char *params);

/* Creates a policy of `type` with parameters "key=value key=value ..." (space separated) over
 * the fixture's layer; fails the test on an unknown type or bad parameter. */
Policy *fixture_policy(Fixture *fx, const char *type, const char *params, uint64_t seed);

/* Naive attention of every query head at query position t over the keys the layer's window
 * lets it attend, [attn_first_key(window, t), t]: out[h][j] there, zero elsewhere. out is
 * [Hq][T]. */
void fixture_full_attn(const Fixture *fx, int t, float *out);

/* Called at each decode step t after step() and the attention, before observe(): p->cache is
 * exactly what query t attended over. full_attn is [Hq][T], the true attention of query t. */
typedef void (*FixtureStepFn)(int t, const Policy *p, const float *full_attn, void *ud);

/* Runs the spans up to t_end (t_end <= T): prefill chunks, and decode steps before t_end; after
 * each decode step calls fn (may be NULL). Computes the prefill statistics the policy asks for:
 * those of each chunk's queries over the policy's caches and the chunk (policies/policy.h). */
void fixture_run(Fixture *fx, Policy *p, int t_end, FixtureStepFn fn, void *ud);

/* Called before positions [t0, t1) arrive, before anything is computed from them: a prefill
 * chunk, or decode step t0 (t1 = t0 + 1); once more with t0 = t1 = t_end after the last call. */
typedef void (*FixtureBeforeFn)(int t0, int t1, const Policy *p, void *ud);
/* fixture_run with a hook before each chunk and step (may be NULL): e.g. to reveal the positions
 * of a trace whose future is hidden, or to read the memory report of the call before. */
void fixture_run_hooked(Fixture *fx, Policy *p, int t_end, FixtureBeforeFn before,
                        FixtureStepFn fn, void *ud);

/* Retained attention mass of the cache of KV head g for query head h: sum of full_attn over
 * the real positions cached. */
double fixture_mass(const Fixture *fx, const Policy *p, const float *full_attn, int h);

/* The fixture's metadata for a trace of n_layers layers (every layer with the fixture's
 * geometry), built by trace_meta_init: per-token arrays, needles, probes and spans copied.
 * trace_meta_free it. */
void fixture_trace_meta(const Fixture *fx, int n_layers, const char *generator, TraceMeta *out);

/* Writes a float32 trace of n_layers layers through the trace writer: layer l holds the
 * fixture's arrays after fixture_randomize(fx, seed + l, 1.0) (so fx ends holding the last
 * layer). Needles, probes, segments, tokens, spans and the window (every layer's) come from
 * fx->meta. Fails the test on error. */
void fixture_write_trace(Fixture *fx, int n_layers, uint64_t seed, const char *path);

#endif
