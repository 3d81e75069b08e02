/* TraceMeta allocation and the RoPE helpers shared by the trace's writers and readers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/format/trace.h"

void trace_meta_alloc(TraceMeta *m)
{
    size_t T = (size_t)m->n_tokens;
    m->tokens = kv_calloc(T, sizeof *m->tokens);
    m->positions = kv_calloc(T, sizeof *m->positions);
    m->segments = kv_calloc(T, sizeof *m->segments);
    m->needles = kv_calloc((size_t)m->n_needles * 2, sizeof *m->needles);
    m->probes = kv_calloc((size_t)m->n_probes, sizeof *m->probes);
    m->attn_rows_at = kv_calloc((size_t)m->n_attn_rows, sizeof *m->attn_rows_at);
    m->rope_inv_freq = kv_calloc((size_t)(m->head_dim / 2), sizeof *m->rope_inv_freq);
    rope_default_inv_freq(m->rope_theta, m->head_dim, m->rope_inv_freq);
    /* One prefill span, the prompt, then one decode run (none when P = T). */
    m->n_spans = m->n_prompt < m->n_tokens ? 2 : 1;
    m->spans = kv_calloc((size_t)m->n_spans, sizeof *m->spans);
    m->spans[0] = (TraceSpan){.kind = SPAN_PREFILL, .start = 0, .end = m->n_prompt};
    if (m->n_spans == 2)
        m->spans[1] = (TraceSpan){.kind = SPAN_DECODE, .start = m->n_prompt, .end = m->n_tokens};
}

void trace_meta_free(TraceMeta *m)
{
    free(m->tokens);
    free(m->positions);
    free(m->segments);
    free(m->needles);
    free(m->probes);
    free(m->attn_rows_at);
    free(m->rope_inv_freq);
    free(m->spans);
    m->spans = NULL;
    m->n_spans = 0;
    m->tokens = m->positions = m->segments = m->needles = m->probes = m->attn_rows_at = NULL;
    m->rope_inv_freq = NULL;
}

void rope_default_inv_freq(double theta, int head_dim, double *out)
{
    for (int f = 0; f < head_dim / 2; f++)
        out[f] = pow(theta, -2.0 * f / head_dim);
}

void rope_pair(RopeLayout layout, int head_dim, int f, int *i0, int *i1)
{
    if (layout == ROPE_INTERLEAVED) {
        *i0 = 2 * f;
        *i1 = 2 * f + 1;
    } else {
        *i0 = f;
        *i1 = f + head_dim / 2;
    }
}

void rope_apply(float *x, int head_dim, RopeLayout layout, const double *inv_freq,
                double position)
{
    for (int f = 0; f < head_dim / 2; f++) {
        int i0, i1;
        rope_pair(layout, head_dim, f, &i0, &i1);
        double a = position * inv_freq[f];
        double c = cos(a), s = sin(a);
        double x0 = x[i0], x1 = x[i1];
        x[i0] = (float)(x0 * c - x1 * s);
        x[i1] = (float)(x0 * s + x1 * c);
    }
}
