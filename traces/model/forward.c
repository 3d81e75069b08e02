#include "traces/model/forward.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/format/trace.h"
#include "traces/model/moe.h"

RunState *run_state_new(const Model *model, int max_tokens, int chunk_size)
{
    const ModelConfig *c = &model->config;
    size_t chunk = (size_t)chunk_size, D = (size_t)c->head_dim, T = (size_t)max_tokens;
    size_t q_dim = (size_t)c->n_q_heads * D, kv_dim = (size_t)c->n_kv_heads * D;
    RunState *s = kv_calloc(1, sizeof *s);
    s->model = model;
    s->max_tokens = max_tokens;
    s->chunk_size = chunk_size;
    model_describe(c, max_tokens, &s->geometry);
    s->rope_tables_layer = -1;
    s->residual = kv_malloc(chunk * (size_t)c->hidden_size * sizeof(float));
    s->normed = kv_malloc(chunk * (size_t)c->hidden_size * sizeof(float));
    s->q_proj = kv_malloc(chunk * q_dim * sizeof(float));
    s->k_proj = kv_malloc(chunk * kv_dim * sizeof(float));
    s->v_proj = kv_malloc(chunk * kv_dim * sizeof(float));
    s->q_heads = kv_malloc(chunk * q_dim * sizeof(float));
    s->k_heads = kv_malloc(chunk * kv_dim * sizeof(float));
    s->v_heads = kv_malloc(chunk * kv_dim * sizeof(float));
    s->attn_out = kv_malloc(chunk * q_dim * sizeof(float));
    s->scores = kv_malloc(chunk * T * sizeof(float));
    s->gate = kv_malloc(chunk * (size_t)c->intermediate_size * sizeof(float));
    s->up = kv_malloc(chunk * (size_t)c->intermediate_size * sizeof(float));
    s->rope_cos = kv_malloc(chunk * D / 2 * sizeof(double));
    s->rope_sin = kv_malloc(chunk * D / 2 * sizeof(double));
    s->logits = kv_malloc((size_t)c->vocab_size * sizeof(float));
    s->matrix_scratch = kv_malloc((model->matrix_scratch_floats + 1) * sizeof(float));
    if (c->n_experts > 0)
        s->moe = moe_scratch_new(c, chunk_size);
    size_t cache = (size_t)c->n_layers * kv_dim * T;
    s->key_cache = kv_malloc(cache * sizeof(float));
    s->value_cache = kv_malloc(cache * sizeof(float));
    return s;
}

void run_state_free(RunState *s)
{
    if (!s)
        return;
    trace_model_free(&s->geometry);
    free(s->residual);
    free(s->normed);
    free(s->q_proj);
    free(s->k_proj);
    free(s->v_proj);
    free(s->q_heads);
    free(s->k_heads);
    free(s->v_heads);
    free(s->attn_out);
    free(s->scores);
    free(s->gate);
    free(s->up);
    free(s->rope_cos);
    free(s->rope_sin);
    free(s->probs);
    free(s->slot_kv);
    free(s->slot_probs);
    free(s->logits);
    free(s->matrix_scratch);
    moe_scratch_free(s->moe);
    free(s->key_cache);
    free(s->value_cache);
    free(s);
}

const float *run_state_keys(const RunState *s, int layer, int kv_head)
{
    const ModelConfig *c = &s->model->config;
    return s->key_cache +
           ((size_t)layer * c->n_kv_heads + kv_head) * s->max_tokens * c->head_dim;
}

const float *run_state_values(const RunState *s, int layer, int kv_head)
{
    const ModelConfig *c = &s->model->config;
    return s->value_cache +
           ((size_t)layer * c->n_kv_heads + kv_head) * s->max_tokens * c->head_dim;
}

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * (unit + weight[i]); the mean accumulates in double.
 * unit is the model's norm_unit_offset: 0, or 1 where the weights are stored as offsets from 1
 * (Gemma's RMSNorm, x * (1 + w)). */
static void rmsnorm(float *out, const float *x, const float *weight, int size, double eps,
                    float unit)
{
    double sum_squares = 0;
    for (int i = 0; i < size; i++)
        sum_squares += (double)x[i] * x[i];
    float inv_rms = (float)(1.0 / sqrt(sum_squares / size + eps));
    for (int i = 0; i < size; i++)
        out[i] = (unit + weight[i]) * (x[i] * inv_rms);
}

/* The model's RMSNorm of n rows of the hidden state, x [n][hidden] into out. */
static void norm_rows(const RunState *s, float *out, const float *x, const float *weight, int n)
{
    const ModelConfig *c = &s->model->config;
    for (int t = 0; t < n; t++)
        rmsnorm(out + (size_t)t * c->hidden_size, x + (size_t)t * c->hidden_size, weight,
                c->hidden_size, c->rms_norm_eps, (float)c->norm_unit_offset);
}

/* The layer's logit soft-capping (geometry: Gemma 2) over row[first, end); none when 0. */
static void softcap_row(float *row, int first, int end, double cap)
{
    if (cap > 0)
        for (int j = first; j < end; j++)
            row[j] = softcap_logitf(row[j], (float)cap);
}

/* out [n][W.rows] = x [n][W.cols] . W^T (+ bias), W as HF stores it, in its precision. */
static void linear(RunState *s, float *out, const float *x, const WeightMatrix *weight,
                   const float *bias, int n)
{
    matrix_linear(out, x, weight, bias, n, s->matrix_scratch);
}

/* [n][heads*D] token-major -> [heads][n][D] head-major. */
static void split_heads(float *heads_out, const float *proj, int n, int n_heads, int head_dim)
{
    for (int h = 0; h < n_heads; h++)
        for (int t = 0; t < n; t++)
            memcpy(heads_out + ((size_t)h * n + t) * head_dim,
                   proj + ((size_t)t * n_heads + h) * head_dim, (size_t)head_dim * sizeof(float));
}

/* One layer's attention geometry. */
static LayerGeometry layer_geometry(const RunState *s, int layer)
{
    const TraceModel *g = &s->geometry;
    return (LayerGeometry){
        .attn_scale = g->attn_scale, .attn_softcap = g->attn_softcap,
        .window = g->window[layer], .rope_layout = g->rope_layout,
        .head_dim = g->head_dim,
        .rope_inv_freq = g->rope_inv_freq + (size_t)layer * (size_t)(g->head_dim / 2),
    };
}

/* The rotation of rope_apply(), with cos and sin computed once per position of the chunk
 * instead of once per head and layer: again only for a layer whose frequencies differ from
 * those of the layer the tables hold. */
static void rope_tables(RunState *s, int layer, int t0, int n)
{
    int half = s->model->config.head_dim / 2;
    const double *freq = layer_geometry(s, layer).rope_inv_freq;
    if (s->rope_tables_layer >= 0 &&
        (s->rope_tables_layer == layer ||
         !memcmp(freq, layer_geometry(s, s->rope_tables_layer).rope_inv_freq,
                 (size_t)half * sizeof *freq)))
        return;
    s->rope_tables_layer = layer;
    /* HF multiplies cos and sin by the RoPE attention factor (YaRN; 1 otherwise): q and k both
     * carry it, the logits its square. */
    double a = s->geometry.rope_attention_factor;
    for (int t = 0; t < n; t++)
        for (int f = 0; f < half; f++) {
            double angle = (double)(t0 + t) * freq[f];
            s->rope_cos[(size_t)t * half + f] = a * cos(angle);
            s->rope_sin[(size_t)t * half + f] = a * sin(angle);
        }
}

/* Optional per-head RMSNorm (Qwen3), then RoPE, on heads [n_heads][n][D]. */
static void norm_and_rotate(RunState *s, float *heads, int n_heads, int n, const float *norm)
{
    const ModelConfig *c = &s->model->config;
    int D = c->head_dim, half = D / 2;
    for (int h = 0; h < n_heads; h++)
        for (int t = 0; t < n; t++) {
            float *x = heads + ((size_t)h * n + t) * D;
            if (norm)
                rmsnorm(x, x, norm, D, c->rms_norm_eps, (float)c->norm_unit_offset);
            const double *cosines = s->rope_cos + (size_t)t * half;
            const double *sines = s->rope_sin + (size_t)t * half;
            for (int f = 0; f < half; f++) {
                int i0, i1;
                rope_pair(s->geometry.rope_layout, D, f, &i0, &i1);
                double x0 = x[i0], x1 = x[i1];
                x[i0] = (float)(x0 * cosines[f] - x1 * sines[f]);
                x[i1] = (float)(x0 * sines[f] + x1 * cosines[f]);
            }
        }
}

/* Softmax of row[first..n_visible) in place, zero before first and beyond up to row_len. */
static void causal_softmax(float *row, int first, int n_visible, int row_len)
{
    float max = row[first];
    for (int j = first + 1; j < n_visible; j++)
        if (row[j] > max)
            max = row[j];
    double sum = 0;
    for (int j = first; j < n_visible; j++) {
        row[j] = expf(row[j] - max);
        sum += row[j];
    }
    float inv_sum = (float)(1.0 / sum);
    for (int j = first; j < n_visible; j++)
        row[j] *= inv_sum;
    memset(row, 0, (size_t)first * sizeof(float));
    memset(row + n_visible, 0, (size_t)(row_len - n_visible) * sizeof(float));
}

/* Attention of the chunk's queries (positions [t0, t0+n)) over the cache [0, t0+n) of one
 * layer; writes attn_out [n][Hq*D] and reports the probability rows the observer wants. */
static void attention(RunState *s, int layer, int t0, int n, const ForwardObserver *obs)
{
    const ModelConfig *c = &s->model->config;
    int D = c->head_dim, Hq = c->n_q_heads, group = c->n_q_heads / c->n_kv_heads;
    int n_keys = t0 + n;
    LayerGeometry geom = layer_geometry(s, layer);
    float scale = (float)geom.attn_scale;

    /* Rows the observer wants, gathered over all heads: row w is [Hq][position_w + 1]. */
    int wanted_first = 0, n_wanted = 0;
    size_t probs_len = 0;
    if (obs && obs->wants_attention && obs->on_attention)
        for (int i = 0; i < n; i++)
            if (obs->wants_attention(obs->user, t0 + i)) {
                if (!n_wanted)
                    wanted_first = i;
                n_wanted = i - wanted_first + 1; /* the span from first to last wanted */
            }
    if (n_wanted) {
        probs_len = (size_t)n_wanted * Hq * n_keys;
        s->probs = kv_realloc(s->probs, probs_len * sizeof(float));
    }

    for (int h = 0; h < Hq; h++) {
        const float *q = s->q_heads + (size_t)h * n * D;
        const float *keys = run_state_keys(s, layer, h / group);
        const float *values = run_state_values(s, layer, h / group);
        float *out = s->attn_out + (size_t)h * D;
        if (n == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, n_keys, D, scale, keys, D, q, 1, 0.0f,
                        s->scores, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n_keys, D, scale, q, D, keys,
                        D, 0.0f, s->scores, n_keys);
        for (int i = 0; i < n; i++) {
            float *row = s->scores + (size_t)i * n_keys;
            int first = attn_first_key(geom.window, t0 + i);
            softcap_row(row, first, t0 + i + 1, geom.attn_softcap);
            causal_softmax(row, first, t0 + i + 1, n_keys);
        }
        for (int w = 0; w < n_wanted; w++)
            memcpy(s->probs + ((size_t)w * Hq + h) * n_keys,
                   s->scores + (size_t)(wanted_first + w) * n_keys, n_keys * sizeof(float));
        if (n == 1)
            cblas_sgemv(CblasRowMajor, CblasTrans, n_keys, D, 1.0f, values, D, s->scores, 1,
                        0.0f, out, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, n_keys, 1.0f, s->scores,
                        n_keys, values, D, 0.0f, out, Hq * D);
    }

    for (int w = 0; w < n_wanted; w++) {
        int position = t0 + wanted_first + w;
        if (!obs->wants_attention(obs->user, position))
            continue;
        /* Compact [Hq][n_keys] to [Hq][position + 1] in place (rows only shrink). */
        float *rows = s->probs + (size_t)w * Hq * n_keys;
        for (int h = 1; h < Hq; h++)
            memmove(rows + (size_t)h * (position + 1), rows + (size_t)h * n_keys,
                    (size_t)(position + 1) * sizeof(float));
        obs->on_attention(obs->user, layer, position, rows);
    }
}

/* A decode step's attention restricted to the selector's slots: for each KV head, its slots'
 * keys and values are gathered into [n][D] matrices, and each query head of the group attends
 * over them with the same products and softmax as the full path. */
static void attention_selected(RunState *s, int layer, const CacheSelector *sel)
{
    const ModelConfig *c = &s->model->config;
    int D = c->head_dim, Hq = c->n_q_heads, Hkv = c->n_kv_heads, group = Hq / Hkv;
    LayerGeometry geom = layer_geometry(s, layer);
    float scale = (float)geom.attn_scale;
    int first = attn_first_key(geom.window, s->n_cached); /* the new token's window */
    SlotList slots[Hkv];
    size_t total = 0, most = 0;
    for (int g = 0; g < Hkv; g++) {
        slots[g] = sel->slots(sel->user, layer, g);
        total += (size_t)slots[g].n * group;
        if ((size_t)slots[g].n > most)
            most = (size_t)slots[g].n;
    }
    if (s->slot_kv_cap < 2 * most * D) {
        s->slot_kv_cap = 2 * most * D + 64;
        s->slot_kv = kv_realloc(s->slot_kv, s->slot_kv_cap * sizeof(float));
    }
    if (s->slot_probs_cap < total) {
        s->slot_probs_cap = total + 64;
        s->slot_probs = kv_realloc(s->slot_probs, s->slot_probs_cap * sizeof(float));
    }
    const float *probs[Hkv];
    float *probs_at = s->slot_probs;
    for (int g = 0; g < Hkv; g++) {
        int n = slots[g].n;
        float *keys = s->slot_kv, *values = s->slot_kv + (size_t)n * D;
        const float *cache_k = run_state_keys(s, layer, g), *cache_v = run_state_values(s, layer, g);
        for (int i = 0; i < n; i++) {
            const float *alt = slots[g].alt_kv ? slots[g].alt_kv[i] : NULL;
            const float *k = alt ? alt : cache_k + (size_t)slots[g].pos[i] * D;
            const float *v = alt ? alt + D : cache_v + (size_t)slots[g].pos[i] * D;
            memcpy(keys + (size_t)i * D, k, (size_t)D * sizeof(float));
            memcpy(values + (size_t)i * D, v, (size_t)D * sizeof(float));
        }
        probs[g] = probs_at;
        for (int i = 0; i < group; i++, probs_at += n) {
            int h = g * group + i;
            float *out = s->attn_out + (size_t)h * D;
            if (n == 0) { /* nothing to attend over: the output is zero */
                memset(out, 0, (size_t)D * sizeof(float));
                continue;
            }
            cblas_sgemv(CblasRowMajor, CblasNoTrans, n, D, scale, keys, D,
                        s->q_heads + (size_t)h * D, 1, 0.0f, probs_at, 1);
            softcap_row(probs_at, 0, n, geom.attn_softcap);
            /* A position before the layer's window gets no attention, as in the model and in
             * the replay's metrics (a policy may still hold it); a synthetic slot (no position)
             * is attended. */
            int visible = n;
            for (int j = 0; j < n; j++)
                if (slots[g].pos[j] >= 0 && slots[g].pos[j] < first) {
                    probs_at[j] = -INFINITY;
                    visible--;
                }
            if (visible == 0) {
                memset(probs_at, 0, (size_t)n * sizeof(float));
                memset(out, 0, (size_t)D * sizeof(float));
                continue;
            }
            causal_softmax(probs_at, 0, n, n);
            cblas_sgemv(CblasRowMajor, CblasTrans, n, D, 1.0f, values, D, probs_at, 1, 0.0f, out,
                        1);
        }
    }
    if (sel->on_attention)
        sel->on_attention(sel->user, layer, probs);
}

/* The gated MLP's activation, gate = act(gate) * up: SiLU (SwiGLU), or, with gelu_tanh, HF's
 * gelu_pytorch_tanh, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GeGLU, Gemma). */
static void gated_activation(float *gate, const float *up, size_t n, int gelu_tanh)
{
    if (!gelu_tanh) {
        for (size_t i = 0; i < n; i++)
            gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        return;
    }
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (size_t i = 0; i < n; i++) {
        float x = gate[i];
        gate[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x))) * up[i];
    }
}

static void add_into(float *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
}

/* The feed-forward of the normed chunk: the gated MLP (SwiGLU, or GeGLU with gelu_tanh), or
 * the layer's experts (SwiGLU, traces/model/moe.h). */
static const float *feed_forward(RunState *s, const LayerWeights *w, int n)
{
    const ModelConfig *c = &s->model->config;
    if (w->moe)
        return moe_forward(s->moe, c, w->moe, s->normed, n, s->matrix_scratch);
    linear(s, s->gate, s->normed, &w->w_gate, NULL, n);
    linear(s, s->up, s->normed, &w->w_up, NULL, n);
    gated_activation(s->gate, s->up, (size_t)n * c->intermediate_size, c->gelu_tanh);
    linear(s, s->normed, s->gate, &w->w_down, NULL, n);
    return s->normed;
}

static void layer_forward(RunState *s, int layer, int t0, int n, const ForwardObserver *obs,
                          const CacheSelector *sel)
{
    const ModelConfig *c = &s->model->config;
    const LayerWeights *w = &s->model->weights.layers[layer];
    int hidden = c->hidden_size, D = c->head_dim;

    norm_rows(s, s->normed, s->residual, w->input_norm, n);
    linear(s, s->q_proj, s->normed, &w->wq, w->bq, n);
    linear(s, s->k_proj, s->normed, &w->wk, w->bk, n);
    linear(s, s->v_proj, s->normed, &w->wv, w->bv, n);
    split_heads(s->q_heads, s->q_proj, n, c->n_q_heads, D);
    split_heads(s->k_heads, s->k_proj, n, c->n_kv_heads, D);
    split_heads(s->v_heads, s->v_proj, n, c->n_kv_heads, D);
    norm_and_rotate(s, s->q_heads, c->n_q_heads, n, w->q_norm);
    norm_and_rotate(s, s->k_heads, c->n_kv_heads, n, w->k_norm);
    for (int g = 0; g < c->n_kv_heads; g++) {
        size_t at = (size_t)t0 * D, len = (size_t)n * D * sizeof(float);
        memcpy((float *)run_state_keys(s, layer, g) + at, s->k_heads + (size_t)g * n * D, len);
        memcpy((float *)run_state_values(s, layer, g) + at, s->v_heads + (size_t)g * n * D, len);
    }
    if (obs && obs->on_qkv)
        obs->on_qkv(obs->user, layer, t0, n, s->q_heads, s->k_heads, s->v_heads);

    if (sel)
        attention_selected(s, layer, sel);
    else
        attention(s, layer, t0, n, obs);
    linear(s, s->normed, s->attn_out, &w->wo, w->bo, n);
    if (w->attn_out_norm) /* sandwich norm (Gemma) */
        norm_rows(s, s->normed, s->normed, w->attn_out_norm, n);
    add_into(s->residual, s->normed, (size_t)n * hidden);

    norm_rows(s, s->normed, s->residual, w->post_attention_norm, n);
    const float *ff = feed_forward(s, w, n);
    if (w->mlp_out_norm) { /* sandwich norm (Gemma) */
        norm_rows(s, s->normed, ff, w->mlp_out_norm, n);
        ff = s->normed;
    }
    add_into(s->residual, ff, (size_t)n * hidden);
}

static const float *forward_chunk(RunState *s, const int32_t *tokens, int n, int want_logits,
                                  const ForwardObserver *observer, const CacheSelector *sel)
{
    const ModelConfig *c = &s->model->config;
    const TransformerWeights *w = &s->model->weights;
    int hidden = c->hidden_size, t0 = s->n_cached;
    for (int t = 0; t < n; t++)
        matrix_row(&w->token_embedding, tokens[t], s->residual + (size_t)t * hidden);
    if (c->embed_scale != 1.0) /* Gemma: times sqrt(hidden_size), in float32 as HF's F32 model */
        for (size_t i = 0; i < (size_t)n * hidden; i++)
            s->residual[i] *= (float)c->embed_scale;
    s->rope_tables_layer = -1; /* new positions */
    for (int layer = 0; layer < c->n_layers; layer++) {
        rope_tables(s, layer, t0, n);
        layer_forward(s, layer, t0, n, observer, sel);
    }
    s->n_cached += n;
    if (!want_logits)
        return NULL;
    norm_rows(s, s->normed, s->residual + (size_t)(n - 1) * hidden, w->final_norm, 1);
    linear(s, s->logits, s->normed, &w->lm_head, NULL, 1);
    softcap_row(s->logits, 0, c->vocab_size, c->final_softcap);
    return s->logits;
}

const float *forward_tokens(RunState *s, const int32_t *tokens, int n, int want_logits,
                            const ForwardObserver *observer)
{
    return forward_chunk(s, tokens, n, want_logits, observer, NULL);
}

const float *forward_token_selected(RunState *s, int32_t token, int want_logits,
                                    const ForwardObserver *observer,
                                    const CacheSelector *selector)
{
    return forward_chunk(s, &token, 1, want_logits, observer, selector);
}

const float *forward_prompt(RunState *s, const int32_t *tokens, int n,
                            const ForwardObserver *observer)
{
    const float *logits = NULL;
    for (int start = 0; start < n; start += s->chunk_size) {
        int len = n - start < s->chunk_size ? n - start : s->chunk_size;
        logits = forward_tokens(s, tokens + start, len, start + len == n, observer);
    }
    return logits;
}

int argmax_token(const float *logits, int vocab_size)
{
    int best = 0;
    for (int i = 1; i < vocab_size; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}
