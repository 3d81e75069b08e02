/* synth.h — synthetic traces with planted, known attention structure (docs/synth.md).
 *
 * Pre-RoPE queries and keys are built from a few directions (attention sinks, a recency band,
 * needle retrieval) plus Gaussian noise, then rotated with rope_apply at each token's position,
 * so the RoPE phase structure is the real one. Every KV head has a kind (local, sink-heavy,
 * retrieval) fixed by its layer and index. Output is deterministic in the parameters: the same
 * parameters give byte-identical Q/K/V. */
#ifndef KVSIM_SYNTH_H
#define KVSIM_SYNTH_H

#include <stdbool.h>

#include "sim/format/trace.h"
#include "sim/base/util.h"

typedef enum { SYNTH_LOCAL = 0, SYNTH_SINK = 1, SYNTH_RETRIEVAL = 2 } SynthHeadKind;

typedef struct {
    int seed;
    int n_layers, n_q_heads, n_kv_heads, head_dim;
    int n_prompt, n_decode;
    int n_needles, needle_len;
    int n_sinks;         /* tokens [0, n_sinks) are attention sinks */
    int n_system;        /* tokens [0, n_system) are segment 0 */
    int n_turns;         /* the rest of the prompt is split into turns 1..n_turns */
    int probe_every;     /* probes: the last prompt token and every probe_every-th decode step */
    int attn_rows_every; /* rows: the last prompt token and every attn_rows_every-th decode
                          * step; 0 stores none */
    TraceDtype dtype;
    double rope_theta;
    RopeLayout rope_layout;
    int window;       /* sliding window of every layer (0: global), but see global_every */
    int global_every; /* with window: layers N-1, 2N-1, ... stay global (0: none) */
    int decode_turns; /* decode runs; each after the first follows a message (prefill span) */
    int message_len;  /* tokens of each such message */
    bool progress; /* a progress line per layer on stderr */
} SynthParams;

void synth_defaults(SynthParams *sp);
/* Checks the parameters (messages name the option, e.g. "--needles"). */
int synth_validate(const SynthParams *sp, KvErr *err);
/* Tokens of the trace: the prompt, the decode steps and the later messages. */
int synth_n_tokens(const SynthParams *sp);
/* The window of one layer (0: global). */
int synth_layer_window(const SynthParams *sp, int layer);
/* Writes the trace to `path` (atomically). */
int synth_write(const SynthParams *sp, const char *path, KvErr *err);
/* The kind of KV head g of a layer: (layer + g) mod 3, in the order of SynthHeadKind. */
SynthHeadKind synth_head_kind(int layer, int kv_head);

/* `kvsim synth --out FILE [options]` (argv[0] = "synth"). */
int cmd_synth(int argc, char **argv);

#endif
