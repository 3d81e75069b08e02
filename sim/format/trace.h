/* trace.h — the kvsim trace file: HDF5, format "kvsim-trace" version 2 (docs/trace-format.md).
 *
 * One reader (of versions 1 and 2) and one writer (of version 2), used by every part of kvsim (synthetic traces, the model trace
 * generator, the simulator, the tests). The reader validates the whole header on open and then
 * streams one layer at a time, so memory stays at one layer's Q/K/V whatever the trace size.
 * The writer writes to a temporary name and renames on trace_writer_finish(), so an interrupted
 * run never leaves a half-written trace: the temporary name is registered with
 * kv_temp_register() while it exists (SIGINT/SIGTERM remove it), and a write that fails (disk
 * full) fails the call that made it, with the reason, and never a later close inside HDF5.
 *
 * Layouts (row-major, float32 in memory whatever the on-disk precision):
 *   q [n_q_heads][n_tokens][head_dim], k and v [n_kv_heads][n_tokens][head_dim], post-RoPE;
 *   attn_rows [n_q_heads][n_attn_rows][n_tokens]: row r holds the model's attention
 *   probabilities of the query at position attn_rows_at[r] over the keys its layer's geometry
 *   lets it attend (geometry.h), zero elsewhere.
 *
 * Building a TraceMeta: trace_meta_init() from a TraceModel (what the model is: dimensions and
 * each layer's attention geometry), the only builder; the reader fills one from a file. */
#ifndef KVSIM_TRACE_H
#define KVSIM_TRACE_H

#include <stdint.h>

#include "sim/base/util.h"
#include "sim/format/geometry.h"

#define TRACE_FORMAT "kvsim-trace"
#define TRACE_VERSION 2        /* what the writer writes */
#define TRACE_VERSION_OLDEST 1 /* the oldest the reader reads */

typedef enum { TRACE_F32 = 0, TRACE_F16 = 1 } TraceDtype;

/* The sequence is a list of spans, in order, covering [0, n_tokens): a prefill span's tokens
 * arrive all at once on top of what the cache already holds (the first is the prompt; later
 * ones are later turns' messages), a decode run's one at a time. */
typedef enum { SPAN_PREFILL = 0, SPAN_DECODE = 1 } SpanKind;
typedef struct {
    int32_t kind;       /* SpanKind */
    int32_t start, end; /* [start, end) */
} TraceSpan;

/* What a trace says about the model that produced it: the input of trace_meta_init. */
typedef struct {
    const char *model, *generator, *rope_scaling; /* NULL: empty */
    int n_layers, n_q_heads, n_kv_heads, head_dim;
    double rope_theta;
    RopeLayout rope_layout;
    double attn_scale;     /* the same in every layer */
    double attn_softcap;   /* > 0: every layer's logits are softcap * tanh(logit / softcap) */
    double rope_attention_factor; /* RoPE's cos and sin times this (YaRN), every layer; 0 read as 1 */
    int32_t *window;       /* [n_layers], or NULL: every layer global */
    double *rope_inv_freq; /* [n_layers][head_dim/2], or NULL: rope_theta^(-2f/D) in every layer */
    /* The model's size, for cost models; 0 = unknown (synthetic traces). */
    int hidden_size, intermediate_size, vocab_size;
    int64_t n_params;
} TraceModel;

/* Frees a TraceModel's window and rope_inv_freq (when its builder allocated them). */
void trace_model_free(TraceModel *model);

typedef struct {
    int version; /* of the file read; TRACE_VERSION for a TraceMeta built to be written */
    char model[256];
    char generator[256];
    char rope_scaling[256]; /* free text, may be empty */
    int n_layers;
    int n_q_heads;
    int n_kv_heads; /* divides n_q_heads */
    int head_dim;   /* even */
    int n_tokens;   /* T */
    int n_prompt;   /* P: the first span, [0, P), is the prompt's prefill; 1 <= P <= T */
    double rope_theta;
    RopeLayout rope_layout; /* every layer's */
    double attn_scale;      /* every layer's: softmax(attn_scale * q.k) */
    /* every layer's logit soft-capping (Gemma 2): softmax(c * tanh(attn_scale * q.k / c)) when
     * c > 0; 0 = none (attribute attn_softcap, absent in older traces) */
    double attn_softcap;
    /* every layer's: the generator multiplied RoPE's cos and sin by it (YaRN's attention factor,
     * HF's attention_scaling), so the stored post-RoPE q and k carry it; 1 = none */
    double rope_attention_factor;
    int hidden_size, intermediate_size, vocab_size; /* 0 = unknown */
    int64_t n_params;                               /* 0 = unknown */

    int32_t *tokens;    /* [T] token ids */
    int32_t *positions; /* [T] RoPE positions */
    int32_t *segments;  /* [T] 0 = system prompt, k = k-th turn */
    int n_needles;
    int32_t *needles; /* [n_needles][2]: spans [start, end) */
    int n_probes;
    int32_t *probes; /* [n_probes] query positions where needle survival is checked */
    int n_attn_rows; /* R; 0 when the trace stores no attention rows */
    int32_t *attn_rows_at; /* [R] query positions, ascending */
    /* [n_layers]: each layer's attended range, 0 = global, W > 0 = the last W keys. */
    int32_t *window;
    /* [n_layers][head_dim/2]: each layer's RoPE inverse frequency of each pair, after any
     * rope_scaling (a version 1 trace has one row, given to every layer). Read them through
     * trace_layer_geometry. */
    double *rope_inv_freq;
    /* [n_spans]: the prefill spans and decode runs, in order, covering [0, T) (see TraceSpan);
     * a version 1 trace is {prefill [0, P), decode [P, T)} (no decode run when P = T). */
    int n_spans;
    TraceSpan *spans;
} TraceMeta;

/* The one builder of a TraceMeta: the header of `model` (strings copied, truncated to 255
 * bytes), n_tokens tokens of which the first n_prompt are the prompt, with tokens and segments
 * zero, positions 0, 1, 2, ..., the needle/probe/attn-row arrays allocated (zeroed) for the
 * counts given, each layer's window and RoPE frequencies from the model (copied), and the spans
 * of a single prompt: prefill [0, n_prompt), decode [n_prompt, n_tokens) (trace_meta_set_spans
 * replaces them). The caller then fills the per-token arrays. */
void trace_meta_init(TraceMeta *meta, const TraceModel *model, int n_tokens, int n_prompt,
                     int n_needles, int n_probes, int n_attn_rows);
/* Replaces the spans (copied); n_prompt becomes the first span's end. Checked with the rest of
 * the header by trace_meta_validate. */
void trace_meta_set_spans(TraceMeta *meta, int n_spans, const TraceSpan *spans);
void trace_meta_free(TraceMeta *meta);
/* The attention geometry of one layer; rope_inv_freq points into meta. */
LayerGeometry trace_layer_geometry(const TraceMeta *meta, int layer);
/* Checks the header and metadata constraints of docs/trace-format.md (the reader's checks of
 * values; the writer applies it before creating anything). Messages name `path`. */
int trace_meta_validate(const TraceMeta *meta, const char *path, KvErr *err);

/* ---- Reader ---- */
typedef struct Trace Trace;

/* Opens and validates a trace: format and version, every root attribute, every dataset's
 * presence, shape and type, and the values of the metadata (positions, spans, probes, rows).
 * Only a regular file is opened (a FIFO is refused, never waited on); every dataset must hold
 * its values in the file (no external or virtual storage), and no more than the file's size
 * (so a damaged dimension cannot make a reader allocate terabytes); integers must fit 32 bits
 * and attn_scale a float32. Nothing sized by the file is allocated before the datasets of that
 * size have been found in it. On failure returns NULL with a one-line message naming the file
 * and the attribute or dataset (strings from the file escaped). */
Trace *trace_open(const char *path, KvErr *err);
void trace_close(Trace *tr);
const TraceMeta *trace_meta(const Trace *tr);
const char *trace_path(const Trace *tr);
TraceDtype trace_dtype(const Trace *tr);
const char *trace_dtype_name(TraceDtype dtype); /* "float32" or "float16" */

/* Reads one layer's post-RoPE q, k, v (any may be NULL to skip it). Fails on a non-finite
 * value. Safe to call from several threads at once on the same Trace. */
int trace_read_layer(Trace *tr, int layer, float *q, float *k, float *v, KvErr *err);
/* Reads /layers/NNN/attn_rows; only when trace_meta(tr)->n_attn_rows > 0. */
int trace_read_attn_rows(Trace *tr, int layer, float *rows, KvErr *err);

/* ---- Writer ---- */
typedef struct TraceWriter TraceWriter;

/* Creates the file (under a temporary name) with all root attributes and metadata datasets
 * from `meta`, and the per-layer q/k/v datasets (and attn_rows when meta->n_attn_rows > 0). */
TraceWriter *trace_writer_create(const char *path, const TraceMeta *meta, TraceDtype dtype,
                                 KvErr *err);
/* Writes tokens [t0, t0+nt) of one layer. q is [n_q_heads][nt][head_dim], k and v
 * [n_kv_heads][nt][head_dim]. Writing the whole layer is t0 = 0, nt = n_tokens. Fails on a
 * value that is not finite or, for float16, beyond its range (|x| >= 65520 rounds to inf). */
int trace_writer_put_qkv(TraceWriter *w, int layer, int t0, int nt, const float *q,
                         const float *k, const float *v, KvErr *err);
/* Writes attention row r of one layer: rows is [n_q_heads][n_tokens]. */
int trace_writer_put_attn_row(TraceWriter *w, int layer, int r, const float *rows, KvErr *err);
/* Flushes, closes and renames the temporary file to its final name. Frees w. */
int trace_writer_finish(TraceWriter *w, KvErr *err);
/* Closes and deletes the temporary file. Frees w. */
void trace_writer_abort(TraceWriter *w);

/* ---- Helpers shared by the writer's users ---- */
/* Rounds n floats in place to what a trace of `dtype` stores and a reader gets back (the
 * writer's conversion: IEEE round to nearest, ties to even); no-op for TRACE_F32. */
void trace_round_to_dtype(float *x, size_t n, TraceDtype dtype);
/* "prefill" or "decode". */
const char *trace_span_kind_name(int kind);

#endif
