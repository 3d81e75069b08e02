/* The one builder of TraceMeta, and its per-layer geometry. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim/format/trace.h"
#include "sim/format/trace_meta_arrays.h"

void trace_model_free(TraceModel *d)
{
    free(d->window);
    free(d->rope_inv_freq);
    d->window = NULL;
    d->rope_inv_freq = NULL;
}

/* Single-prompt spans: prefill [0, P), then one decode run (none when P = T). */
static void default_spans(TraceMeta *m)
{
    TraceSpan spans[2] = {{SPAN_PREFILL, 0, m->n_prompt}, {SPAN_DECODE, m->n_prompt, m->n_tokens}};
    trace_meta_set_spans(m, m->n_prompt < m->n_tokens ? 2 : 1, spans);
}

void trace_meta_alloc_arrays(TraceMeta *m)
{
    size_t T = (size_t)m->n_tokens, F = (size_t)(m->head_dim / 2), L = (size_t)m->n_layers;
    m->tokens = kv_calloc(T, sizeof *m->tokens);
    m->positions = kv_calloc(T, sizeof *m->positions);
    m->segments = kv_calloc(T, sizeof *m->segments);
    m->needles = kv_calloc((size_t)m->n_needles * 2, sizeof *m->needles);
    m->probes = kv_calloc((size_t)m->n_probes, sizeof *m->probes);
    m->attn_rows_at = kv_calloc((size_t)m->n_attn_rows, sizeof *m->attn_rows_at);
    m->window = kv_calloc(L, sizeof *m->window);
    m->rope_inv_freq = kv_calloc(L * F, sizeof *m->rope_inv_freq);
    for (size_t l = 0; l < L; l++)
        rope_default_inv_freq(m->rope_theta, m->head_dim, m->rope_inv_freq + l * F);
    default_spans(m);
}

void trace_meta_init(TraceMeta *m, const TraceModel *d, int n_tokens, int n_prompt,
                     int n_needles, int n_probes, int n_attn_rows)
{
    memset(m, 0, sizeof *m);
    m->version = TRACE_VERSION;
    snprintf(m->model, sizeof m->model, "%s", d->model ? d->model : "");
    snprintf(m->generator, sizeof m->generator, "%s", d->generator ? d->generator : "");
    snprintf(m->rope_scaling, sizeof m->rope_scaling, "%s", d->rope_scaling ? d->rope_scaling : "");
    m->n_layers = d->n_layers;
    m->n_q_heads = d->n_q_heads;
    m->n_kv_heads = d->n_kv_heads;
    m->head_dim = d->head_dim;
    m->n_tokens = n_tokens;
    m->n_prompt = n_prompt;
    m->rope_theta = d->rope_theta;
    m->rope_layout = d->rope_layout;
    m->attn_scale = d->attn_scale;
    m->attn_softcap = d->attn_softcap;
    m->rope_attention_factor = d->rope_attention_factor > 0 ? d->rope_attention_factor : 1.0;
    m->hidden_size = d->hidden_size;
    m->intermediate_size = d->intermediate_size;
    m->vocab_size = d->vocab_size;
    m->n_params = d->n_params;
    m->n_needles = n_needles;
    m->n_probes = n_probes;
    m->n_attn_rows = n_attn_rows;
    trace_meta_alloc_arrays(m);
    for (int t = 0; t < n_tokens; t++)
        m->positions[t] = t;
    size_t L = (size_t)m->n_layers, F = (size_t)(m->head_dim / 2);
    if (d->window)
        memcpy(m->window, d->window, L * sizeof *m->window);
    if (d->rope_inv_freq)
        memcpy(m->rope_inv_freq, d->rope_inv_freq, L * F * sizeof *m->rope_inv_freq);
}

void trace_meta_set_spans(TraceMeta *m, int n_spans, const TraceSpan *spans)
{
    TraceSpan *copy = kv_calloc((size_t)n_spans, sizeof *copy);
    memcpy(copy, spans, (size_t)n_spans * sizeof *copy);
    free(m->spans);
    m->spans = copy;
    m->n_spans = n_spans;
    if (n_spans > 0)
        m->n_prompt = spans[0].end;
}

void trace_meta_free(TraceMeta *m)
{
    free(m->tokens);
    free(m->positions);
    free(m->segments);
    free(m->needles);
    free(m->probes);
    free(m->attn_rows_at);
    free(m->window);
    free(m->rope_inv_freq);
    free(m->spans);
    m->spans = NULL;
    m->n_spans = 0;
    m->tokens = m->positions = m->segments = m->needles = m->probes = m->attn_rows_at = NULL;
    m->window = NULL;
    m->rope_inv_freq = NULL;
}

LayerGeometry trace_layer_geometry(const TraceMeta *m, int layer)
{
    return (LayerGeometry){
        .attn_scale = m->attn_scale,
        .attn_softcap = m->attn_softcap,
        .window = m->window[layer],
        .rope_layout = m->rope_layout,
        .head_dim = m->head_dim,
        .rope_inv_freq = m->rope_inv_freq + (size_t)layer * (size_t)(m->head_dim / 2),
    };
}

const char *trace_span_kind_name(int kind)
{
    return kind == SPAN_PREFILL ? "prefill" : kind == SPAN_DECODE ? "decode" : "?";
}
