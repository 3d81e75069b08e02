/* The C forward pass against an independent reference: plain loops in double over the whole
 * sequence at once (no cache, no BLAS), following the Hugging Face modeling code's math, on
 * tiny random checkpoints of every supported variant. Logits, post-RoPE Q/K/V and attention
 * probabilities must agree to 1e-4 relative (max-norm), whatever the chunking of the prompt
 * and for decode steps. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"
#include "traces/model/forward.h"
#include "traces/model/moe.h"
#include "traces/model/model.h"

#define TOLERANCE 1e-4

/* ---- Reference ---- */

typedef struct {
    int L, H, I, Hq, Hkv, D, V, T;
    double *logits; /* [T][V] */
    double *q;      /* [L][Hq][T][D] post-RoPE */
    double *k, *v;  /* [L][Hkv][T][D] */
    double *probs;  /* [L][Hq][T][T] attention of query t over key j */
} Reference;

static double *ref_at(double *base, int outer, int heads, int h, int T, int t, int D)
{
    return base + (((size_t)outer * heads + h) * T + t) * D;
}

/* longrope's ext_factors: the short or the long list, as the test decides from HF's rule
 * (long when the sequence is longer than the original context). */
static const double *ref_ext_factors;

/* HF: inv_freq = 1 / base^(arange(0, dim, 2) / dim), then the rope_scaling rule. Written as
 * HF writes it (masks over all frequencies), not as traces/model/model.c does. */
static void ref_inv_freq(const TinyCheckpointSpec *s, const char *type, double factor,
                         double low, double high, double old_context, int T, double *out)
{
    int D = s->head_dim;
    double base = s->rope_theta;
    if (!strcmp(type, "dynamic")) {
        double seq_len = T > s->max_position_embeddings ? T : s->max_position_embeddings;
        base = base * pow(factor * seq_len / s->max_position_embeddings - (factor - 1),
                          (double)D / (D - 2));
    }
    for (int i = 0; i < D / 2; i++)
        out[i] = 1.0 / pow(base, (2.0 * i) / D);
    if (!strcmp(type, "linear"))
        for (int i = 0; i < D / 2; i++)
            out[i] /= factor;
    if (!strcmp(type, "llama3")) {
        double low_wavelen = old_context / low, high_wavelen = old_context / high;
        for (int i = 0; i < D / 2; i++) {
            double wavelen = 2 * 3.14159265358979323846 / out[i];
            double llama = wavelen > low_wavelen ? out[i] / factor : out[i];
            double smooth = (old_context / wavelen - low) / (high - low);
            double smoothed = (1 - smooth) * llama / factor + smooth * llama;
            int is_medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
            out[i] = is_medium ? smoothed : llama;
        }
    }
    if (!strcmp(type, "longrope")) /* 1 / (ext_factors * base ** (arange(0, dim, 2) / dim)) */
        for (int i = 0; i < D / 2; i++)
            out[i] = 1.0 / (ref_ext_factors[i] * pow(base, (2.0 * i) / D));
    if (!strcmp(type, "yarn")) {
        /* beta_fast 32, beta_slow 1 (the config leaves them out), truncate: HF's
         * find_correction_range and linear_ramp_factor over the dim // 2 pairs. */
        double lo = floor(D * log(old_context / (32 * 2 * 3.14159265358979323846)) / (2 * log(base)));
        double hi = ceil(D * log(old_context / (1 * 2 * 3.14159265358979323846)) / (2 * log(base)));
        lo = lo > 0 ? lo : 0;
        hi = hi < D - 1 ? hi : D - 1;
        if (lo == hi)
            hi += 0.001;
        for (int i = 0; i < D / 2; i++) {
            double ramp = (i - lo) / (hi - lo);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            double extrapolation_factor = 1 - ramp;
            double pos_freq = pow(base, (2.0 * i) / D);
            out[i] = 1.0 / (factor * pos_freq) * (1 - extrapolation_factor) +
                     1.0 / pos_freq * extrapolation_factor;
        }
    }
}

static const float *W(const TinyCheckpoint *ck, int layer, const char *suffix)
{
    char name[128];
    if (layer >= 0)
        snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
    else
        snprintf(name, sizeof name, "%s", suffix);
    return tiny_ckpt_tensor(ck, name);
}

/* Gemma's RMSNorm scales by (1 + w) (HF Gemma3RMSNorm: output * (1.0 + weight)); the others
 * by w. Set per checkpoint by reference_run. */
static double ref_norm_unit = 0;

static void ref_rmsnorm(double *out, const double *x, const float *w, int n, double eps)
{
    double ms = 0;
    for (int i = 0; i < n; i++)
        ms += x[i] * x[i];
    ms /= n;
    for (int i = 0; i < n; i++)
        out[i] = (ref_norm_unit + w[i]) * (x[i] / sqrt(ms + eps));
}

/* HF's gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))). */
static double ref_gelu_tanh(double x)
{
    return 0.5 * x * (1 + tanh(sqrt(2 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
}

/* eager_attention_forward's and Gemma2ForCausalLM's soft-capping: cap * tanh(x / cap). */
static double ref_softcap(double x, double cap)
{
    return cap > 0 ? cap * tanh(x / cap) : x;
}

/* y[o] = sum_i W[o][i] x[i] + b[o] */
static void ref_linear(double *y, const float *Wt, const float *b, const double *x, int in,
                       int out)
{
    for (int o = 0; o < out; o++) {
        double acc = b ? b[o] : 0;
        for (int i = 0; i < in; i++)
            acc += (double)Wt[(size_t)o * in + i] * x[i];
        y[o] = acc;
    }
}

/* q * cos + rotate_half(q) * sin, cos = cat(cos(freqs), cos(freqs)) * attention_scaling (HF's
 * rotary embedding multiplies both by it: YaRN's attention factor, else 1). */
static double ref_attention_scaling = 1.0;

static void ref_rope(double *x, int D, const double *inv_freq, int position)
{
    double rotated[256], a = ref_attention_scaling;
    for (int i = 0; i < D; i++) {
        double freq = inv_freq[i % (D / 2)] * position;
        double rot_half = i < D / 2 ? -x[i + D / 2] : x[i - D / 2];
        rotated[i] = x[i] * (cos(freq) * a) + rot_half * (sin(freq) * a);
    }
    memcpy(x, rotated, (size_t)D * sizeof *x);
}

/* What differs between the layers and the architectures, as the test derives it from the
 * architecture's definition (not from the model code under test). */
typedef struct {
    double scale;          /* softmax(scale · q·k) */
    double attn_softcap, final_softcap; /* 0 = none */
    const int *window;     /* [L]: 0 global, W: the keys j with t - W < j <= t */
    const double *inv_freq; /* [L][D/2] */
} RefGeometry;

/* Gated MLP: down(act(gate x) * up x), into delta [H]; act is SiLU (SwiGLU), or with gelu the
 * tanh GELU (Gemma's GeGLU). */
static void ref_mlp(double *delta, const float *gate_w, const float *up_w, const float *down_w,
                    const double *x, int H, int I, int gelu)
{
    double *gate = kv_calloc((size_t)I, sizeof(double)), *up = kv_calloc((size_t)I, sizeof(double));
    ref_linear(gate, gate_w, NULL, x, H, I);
    ref_linear(up, up_w, NULL, x, H, I);
    for (int i = 0; i < I; i++)
        gate[i] = (gelu ? ref_gelu_tanh(gate[i]) : gate[i] / (1 + exp(-gate[i]))) * up[i];
    ref_linear(delta, down_w, NULL, gate, I, H);
    free(gate);
    free(up);
}

/* HF's sparse MoE block (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock) for one token:
 * routing_weights = softmax(gate(x)); the top k of them (torch.topk); divided by their sum when
 * norm_topk_prob (Mixtral: always); the selected experts' MLP outputs times their weight, added
 * in ascending expert order (the index_add_ loop over experts). */
static void ref_moe(double *delta, const TinyCheckpoint *ck, int l, const double *x)
{
    const TinyCheckpointSpec *s = &ck->spec;
    int mixtral = !strcmp(s->architecture, "MixtralForCausalLM");
    int E = s->n_experts, k = s->n_experts_per_tok, H = s->hidden_size;
    int I = mixtral ? s->intermediate_size : s->moe_intermediate_size;
    const char *prefix = mixtral ? "block_sparse_moe" : "mlp";
    char name[64];
    snprintf(name, sizeof name, "%s.gate.weight", prefix);
    double probs[64], weight[64] = {0}, sum = 0, max = -INFINITY, chosen = 0, *out = kv_calloc((size_t)H, sizeof(double));
    int selected[64] = {0};
    assert_true(E <= 64);
    ref_linear(probs, W(ck, l, name), NULL, x, H, E);
    for (int e = 0; e < E; e++)
        max = fmax(max, probs[e]);
    for (int e = 0; e < E; e++)
        sum += probs[e] = exp(probs[e] - max);
    for (int e = 0; e < E; e++)
        probs[e] /= sum;
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!selected[e] && (best < 0 || probs[e] > probs[best]))
                best = e;
        selected[best] = 1;
        weight[best] = probs[best];
        chosen += probs[best];
    }
    for (int e = 0; e < E; e++) {
        if (!selected[e])
            continue;
        char g[64], u[64], d[64];
        snprintf(g, sizeof g, "%s.experts.%d.%s.weight", prefix, e, mixtral ? "w1" : "gate_proj");
        snprintf(u, sizeof u, "%s.experts.%d.%s.weight", prefix, e, mixtral ? "w3" : "up_proj");
        snprintf(d, sizeof d, "%s.experts.%d.%s.weight", prefix, e, mixtral ? "w2" : "down_proj");
        ref_mlp(delta, W(ck, l, g), W(ck, l, u), W(ck, l, d), x, H, I, 0);
        double w = mixtral || s->norm_topk_prob ? weight[e] / chosen : weight[e];
        for (int i = 0; i < H; i++)
            out[i] += w * delta[i];
    }
    memcpy(delta, out, (size_t)H * sizeof(double));
    free(out);
}

/* HF's attention: softmax(scale · q·k) over the keys j with t - window < j <= t (every j <= t
 * when window = 0). Gemma (modeling_gemma2.py, modeling_gemma3.py): embeddings times
 * sqrt(hidden), norms (1 + w), q/k norms (Gemma 3), logits soft-capped before the mask, the
 * attention output normed (post_attention_layernorm) before the residual, the MLP input by
 * pre_feedforward_layernorm and its output by post_feedforward_layernorm, GeGLU with the tanh
 * GELU, final logits soft-capped. */
static Reference *reference_run(const TinyCheckpoint *ck, const int32_t *tokens, int T,
                                const RefGeometry *geo)
{
    const TinyCheckpointSpec *s = &ck->spec;
    Reference *r = kv_calloc(1, sizeof *r);
    int L = r->L = s->n_layers, H = r->H = s->hidden_size, I = r->I = s->intermediate_size;
    int Hq = r->Hq = s->n_q_heads, Hkv = r->Hkv = s->n_kv_heads, D = r->D = s->head_dim;
    int V = r->V = s->vocab_size;
    r->T = T;
    double eps = s->rms_norm_eps;
    int gemma = tiny_is_gemma(s), gemma3 = gemma && strstr(s->architecture, "Gemma3") != NULL;
    int qk_norm = gemma3 || !strcmp(s->architecture, "Qwen3ForCausalLM") ||
                  !strcmp(s->architecture, "Qwen3MoeForCausalLM");
    double scale = geo->scale;
    ref_norm_unit = gemma ? 1 : 0;
    r->logits = kv_calloc((size_t)T * V, sizeof(double));
    r->q = kv_calloc((size_t)L * Hq * T * D, sizeof(double));
    r->k = kv_calloc((size_t)L * Hkv * T * D, sizeof(double));
    r->v = kv_calloc((size_t)L * Hkv * T * D, sizeof(double));
    r->probs = kv_calloc((size_t)L * Hq * T * T, sizeof(double));

    double *hidden = kv_calloc((size_t)T * H, sizeof(double));
    double *normed = kv_calloc((size_t)H, sizeof(double));
    double *proj = kv_calloc((size_t)(Hq > Hkv ? Hq : Hkv) * D + H + I, sizeof(double));
    double *attn = kv_calloc((size_t)T * Hq * D, sizeof(double));
    double *delta = kv_calloc((size_t)H, sizeof(double));
    const float *emb = W(ck, -1, "model.embed_tokens.weight");
    for (int t = 0; t < T; t++)
        for (int i = 0; i < H; i++)
            hidden[(size_t)t * H + i] = emb[(size_t)tokens[t] * H + i] * (gemma ? sqrt(H) : 1);

    for (int l = 0; l < L; l++) {
        const double *inv_freq = geo->inv_freq + (size_t)l * (D / 2);
        int window = geo->window[l];
        /* Projections, per-head norm and RoPE for every token. */
        for (int t = 0; t < T; t++) {
            ref_rmsnorm(normed, hidden + (size_t)t * H, W(ck, l, "input_layernorm.weight"), H, eps);
            struct {
                const char *w, *b, *norm;
                int heads;
                double *dst;
            } parts[3] = {
                {"self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.q_norm.weight", Hq, r->q},
                {"self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.k_norm.weight", Hkv, r->k},
                {"self_attn.v_proj.weight", "self_attn.v_proj.bias", NULL, Hkv, r->v},
            };
            for (int p = 0; p < 3; p++) {
                ref_linear(proj, W(ck, l, parts[p].w), W(ck, l, parts[p].b), normed, H,
                           parts[p].heads * D);
                for (int h = 0; h < parts[p].heads; h++) {
                    double *dst = ref_at(parts[p].dst, l, parts[p].heads, h, T, t, D);
                    memcpy(dst, proj + (size_t)h * D, (size_t)D * sizeof(double));
                    if (p < 2 && qk_norm)
                        ref_rmsnorm(dst, dst, W(ck, l, parts[p].norm), D, eps);
                    if (p < 2)
                        ref_rope(dst, D, inv_freq, t);
                }
            }
        }
        /* Causal attention, GQA: query head h reads KV head h / (Hq / Hkv). */
        for (int h = 0; h < Hq; h++) {
            int g = h / (Hq / Hkv);
            for (int t = 0; t < T; t++) {
                double *p = r->probs + (((size_t)l * Hq + h) * T + t) * T;
                double max = -INFINITY, sum = 0;
                int lo = window > 0 && t - window + 1 > 0 ? t - window + 1 : 0;
                for (int j = lo; j <= t; j++) {
                    double dot = 0;
                    for (int d = 0; d < D; d++)
                        dot += ref_at(r->q, l, Hq, h, T, t, D)[d] * ref_at(r->k, l, Hkv, g, T, j, D)[d];
                    p[j] = ref_softcap(dot * scale, geo->attn_softcap);
                    max = fmax(max, p[j]);
                }
                for (int j = lo; j <= t; j++)
                    sum += p[j] = exp(p[j] - max);
                for (int j = lo; j <= t; j++)
                    p[j] /= sum;
                for (int d = 0; d < D; d++) {
                    double acc = 0;
                    for (int j = lo; j <= t; j++)
                        acc += p[j] * ref_at(r->v, l, Hkv, g, T, j, D)[d];
                    attn[((size_t)t * Hq + h) * D + d] = acc;
                }
            }
        }
        for (int t = 0; t < T; t++) {
            double *x = hidden + (size_t)t * H;
            ref_linear(delta, W(ck, l, "self_attn.o_proj.weight"), W(ck, l, "self_attn.o_proj.bias"),
                       attn + (size_t)t * Hq * D, Hq * D, H);
            if (gemma)
                ref_rmsnorm(delta, delta, W(ck, l, "post_attention_layernorm.weight"), H, eps);
            for (int i = 0; i < H; i++)
                x[i] += delta[i];
            ref_rmsnorm(normed, x,
                        W(ck, l, gemma ? "pre_feedforward_layernorm.weight"
                                       : "post_attention_layernorm.weight"),
                        H, eps);
            if (tiny_layer_is_moe(s, l))
                ref_moe(delta, ck, l, normed);
            else
                ref_mlp(delta, W(ck, l, "mlp.gate_proj.weight"), W(ck, l, "mlp.up_proj.weight"),
                        W(ck, l, "mlp.down_proj.weight"), normed, H, I, gemma);
            if (gemma)
                ref_rmsnorm(delta, delta, W(ck, l, "post_feedforward_layernorm.weight"), H, eps);
            for (int i = 0; i < H; i++)
                x[i] += delta[i];
        }
    }
    const float *head = s->tie_word_embeddings ? emb : W(ck, -1, "lm_head.weight");
    for (int t = 0; t < T; t++) {
        ref_rmsnorm(normed, hidden + (size_t)t * H, W(ck, -1, "model.norm.weight"), H, eps);
        ref_linear(r->logits + (size_t)t * V, head, NULL, normed, H, V);
        for (int v = 0; v < V; v++)
            r->logits[(size_t)t * V + v] = ref_softcap(r->logits[(size_t)t * V + v],
                                                       geo->final_softcap);
    }
    free(hidden);
    free(normed);
    free(proj);
    free(attn);
    free(delta);
    return r;
}

static void reference_free(Reference *r)
{
    free(r->logits);
    free(r->q);
    free(r->k);
    free(r->v);
    free(r->probs);
    free(r);
}

/* ---- Capturing what the C forward pass computes ---- */

typedef struct {
    const Reference *ref;
    float *q, *k, *v; /* same layout as the reference */
    int attention_every; /* report the attention of positions divisible by this */
    int n_attention_checked;
    double worst_attention;
} Capture;

static void capture_qkv(void *user, int layer, int t0, int n, const float *q, const float *k,
                        const float *v)
{
    Capture *c = user;
    const Reference *r = c->ref;
    for (int part = 0; part < 3; part++) {
        int heads = part == 0 ? r->Hq : r->Hkv;
        const float *src = part == 0 ? q : part == 1 ? k : v;
        float *dst = part == 0 ? c->q : part == 1 ? c->k : c->v;
        for (int h = 0; h < heads; h++)
            memcpy(dst + (((size_t)layer * heads + h) * r->T + t0) * r->D,
                   src + (size_t)h * n * r->D, (size_t)n * r->D * sizeof(float));
    }
}

static int wants_attention(void *user, int position)
{
    return position % ((Capture *)user)->attention_every == 0;
}

static void capture_attention(void *user, int layer, int position, const float *probs)
{
    Capture *c = user;
    const Reference *r = c->ref;
    assert_int_equal(position % c->attention_every, 0);
    double worst = 0, largest = 0;
    for (int h = 0; h < r->Hq; h++) {
        const double *want = r->probs + (((size_t)layer * r->Hq + h) * r->T + position) * r->T;
        for (int j = 0; j <= position; j++) {
            worst = fmax(worst, fabs(probs[(size_t)h * (position + 1) + j] - want[j]));
            largest = fmax(largest, fabs(want[j]));
        }
    }
    c->worst_attention = fmax(c->worst_attention, worst / largest);
    c->n_attention_checked++;
}

/* max |got - want| / max |want| */
static double rel_error_f(const float *got, const double *want, size_t n)
{
    double worst = 0, largest = 0;
    for (size_t i = 0; i < n; i++) {
        worst = fmax(worst, fabs(got[i] - want[i]));
        largest = fmax(largest, fabs(want[i]));
    }
    assert_true(largest > 0);
    return worst / largest;
}

/* ---- The scenarios ---- */

typedef struct {
    TinyCheckpointSpec spec;
    const char *rope_type; /* reference's reading of spec.rope_scaling */
    double factor, low, high, old_context;
    double attention_scaling; /* HF's, for cos and sin; 0 = 1 */
    /* Each layer's window as the architecture defines it, for spec.n_layers <= 8; NULL: every
     * layer spec.sliding_window (Mistral's, or 0). */
    const int *window;
    double scale;             /* 0: head_dim^-1/2 */
    double local_theta;       /* > 0: the sliding layers' RoPE base, unscaled (Gemma 3) */
} Variant;

#define N_TOKENS 27
#define N_PROMPT 19

static void tokens_for(const TinyCheckpointSpec *s, int32_t *tokens)
{
    for (int t = 0; t < N_TOKENS; t++)
        tokens[t] = (int32_t)((t * 37 + 11) % s->vocab_size);
}

/* Feeds the tokens with the given prompt chunk size, then decode steps of one token, checks
 * every logit vector returned, every Q/K/V and some attention rows against the reference.
 * A second turn [turn_start, turn_end) (none when equal) is prefilled on top of the cache, in
 * chunks, between decode steps: a conversation's later user message. */
static void run_and_compare(Model *model, const TinyCheckpoint *ck, const Reference *ref,
                            const int32_t *tokens, const RefGeometry *geo, int chunk_size,
                            int n_prompt, int turn_start, int turn_end)
{
    int T = ref->T;
    Capture cap = {.ref = ref, .attention_every = 4};
    cap.q = kv_calloc((size_t)ref->L * ref->Hq * T * ref->D, sizeof(float));
    cap.k = kv_calloc((size_t)ref->L * ref->Hkv * T * ref->D, sizeof(float));
    cap.v = kv_calloc((size_t)ref->L * ref->Hkv * T * ref->D, sizeof(float));
    ForwardObserver obs = {&cap, capture_qkv, wants_attention, capture_attention};
    RunState *s = run_state_new(model, T, chunk_size);
    /* The forward pass's geometry is the architecture's: the scale, the soft-capping, each
     * layer's window and frequencies. */
    for (int l = 0; l < ref->L; l++) {
        assert_int_equal(s->geometry.window[l], geo->window[l]);
        for (int f = 0; f < ref->D / 2; f++) {
            double want = geo->inv_freq[(size_t)l * (ref->D / 2) + f];
            assert_float_equal(s->geometry.rope_inv_freq[(size_t)l * (ref->D / 2) + f], want,
                               1e-12 * geo->inv_freq[0]);
        }
    }
    assert_float_equal(s->geometry.attn_scale, geo->scale, 1e-15);
    assert_true(s->geometry.attn_softcap == geo->attn_softcap);

    const float *logits = forward_prompt(s, tokens, n_prompt, &obs);
    assert_non_null(logits);
    assert_true(rel_error_f(logits, ref->logits + (size_t)(n_prompt - 1) * ref->V, (size_t)ref->V) <
                TOLERANCE);
    for (int t = n_prompt; t < T; t++) {
        if (t == turn_start && turn_end > turn_start) {
            logits = forward_prompt(s, tokens + t, turn_end - t, &obs);
            t = turn_end - 1;
            assert_int_equal(s->n_cached, turn_end);
        } else {
            logits = forward_tokens(s, tokens + t, 1, 1, &obs);
        }
        assert_true(rel_error_f(logits, ref->logits + (size_t)t * ref->V, (size_t)ref->V) <
                    TOLERANCE);
    }
    assert_int_equal(s->n_cached, T);
    double eq = rel_error_f(cap.q, ref->q, (size_t)ref->L * ref->Hq * T * ref->D);
    double ek = rel_error_f(cap.k, ref->k, (size_t)ref->L * ref->Hkv * T * ref->D);
    double ev = rel_error_f(cap.v, ref->v, (size_t)ref->L * ref->Hkv * T * ref->D);
    assert_true(eq < TOLERANCE);
    assert_true(ek < TOLERANCE);
    assert_true(ev < TOLERANCE);
    /* The cache holds exactly what the observer saw. */
    for (int l = 0; l < ref->L; l++)
        for (int g = 0; g < ref->Hkv; g++)
            assert_memory_equal(run_state_keys(s, l, g),
                                cap.k + ((size_t)l * ref->Hkv + g) * T * ref->D,
                                (size_t)T * ref->D * sizeof(float));
    /* Positions 0, 4, ..., 24 in every layer. */
    assert_int_equal(cap.n_attention_checked, ref->L * ((T - 1) / 4 + 1));
    assert_true(cap.worst_attention < TOLERANCE);
    (void)ck;
    run_state_free(s);
    free(cap.q);
    free(cap.k);
    free(cap.v);
}

static void check_variant(const Variant *variant)
{
    char *dir = scratch_create();
    TinyCheckpoint *ck = tiny_ckpt_write(dir, &variant->spec);
    KvErr err = {{0}};
    Model *model = model_load(dir, &err);
    if (!model)
        fail_msg("%s", err.msg);
    /* A 16-bit checkpoint's matrices stay 16-bit in the mapping, whatever the architecture's
     * feed-forward (SwiGLU, Gemma's GeGLU, the experts'). */
    if (variant->spec.dtype != TINY_F32 && variant->spec.quant_bits == 0) {
        const TransformerWeights *w = &model->weights;
        assert_non_null(w->token_embedding.half);
        assert_non_null(w->lm_head.half);
        for (int l = 0; l < variant->spec.n_layers; l++) {
            const LayerWeights *lw = &w->layers[l];
            assert_true(lw->wq.half && lw->wk.half && lw->wv.half && lw->wo.half);
            if (lw->moe)
                assert_true(lw->moe->router.half && lw->moe->gate[0].half &&
                            lw->moe->up[0].half && lw->moe->down[0].half);
            else
                assert_true(lw->w_gate.half && lw->w_up.half && lw->w_down.half);
        }
    }

    int32_t tokens[N_TOKENS];
    tokens_for(&variant->spec, tokens);
    double inv_freq[64], ref_freq[64];
    ref_inv_freq(&variant->spec, variant->rope_type ? variant->rope_type : "default",
                 variant->factor, variant->low, variant->high, variant->old_context, N_TOKENS,
                 ref_freq);
    model_rope_inv_freq(&model->config, N_TOKENS, inv_freq);
    for (int f = 0; f < variant->spec.head_dim / 2; f++)
        assert_float_equal(inv_freq[f], ref_freq[f], 1e-12 * ref_freq[0]);
    assert_float_equal(model->config.rope_attention_factor,
                       variant->attention_scaling > 0 ? variant->attention_scaling : 1.0, 1e-15);
    ref_attention_scaling = variant->attention_scaling > 0 ? variant->attention_scaling : 1.0;
    /* The scale: the variant's or standard attention's; the windows: the variant's or the
     * config's in every layer; a sliding layer's frequencies the local base's when it has one. */
    int L = variant->spec.n_layers, D = variant->spec.head_dim, window[8];
    double layer_freq[8 * 32];
    assert_true(L <= 8 && D / 2 <= 32);
    for (int l = 0; l < L; l++) {
        window[l] = variant->window ? variant->window[l] : variant->spec.sliding_window;
        for (int f = 0; f < D / 2; f++)
            layer_freq[l * (D / 2) + f] = window[l] > 0 && variant->local_theta > 0
                                              ? 1.0 / pow(variant->local_theta, 2.0 * f / D)
                                              : ref_freq[f];
    }
    RefGeometry geo = {
        .scale = variant->scale > 0 ? variant->scale : 1.0 / sqrt(D),
        .attn_softcap = variant->spec.attn_softcap > 0 ? variant->spec.attn_softcap : 0,
        .final_softcap = variant->spec.final_softcap > 0 ? variant->spec.final_softcap : 0,
        .window = window, .inv_freq = layer_freq,
    };
    Reference *ref = reference_run(ck, tokens, N_TOKENS, &geo);
    /* Every tensor the checkpoint holds is counted in the model's size. */
    int64_t n_values = 0;
    for (int i = 0; i < ck->n_tensors; i++)
        n_values += (int64_t)ck->tensors[i].shape[0] *
                    (ck->tensors[i].n_dims > 1 ? ck->tensors[i].shape[1] : 1);
    assert_true(model_n_params(&model->config) == n_values);

    run_and_compare(model, ck, ref, tokens, &geo, 128, N_PROMPT, 0, 0); /* one chunk */
    run_and_compare(model, ck, ref, tokens, &geo, 5, N_PROMPT, 0, 0);   /* ragged chunks */
    run_and_compare(model, ck, ref, tokens, &geo, 1, 1, 0, 0);          /* token by token */
    /* Two turns: prompt, two decode steps, a second turn prefilled on top, decode steps. */
    run_and_compare(model, ck, ref, tokens, &geo, 4, 9, 11, 22);

    reference_free(ref);
    model_free(model);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

static Variant base_variant(void)
{
    return (Variant){.spec = tiny_ckpt_default_spec()};
}

static void test_llama_f32(void **state)
{
    (void)state;
    Variant v = base_variant();
    check_variant(&v);
}

static void test_qwen2_biases(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "Qwen2ForCausalLM";
    v.spec.seed = 2;
    check_variant(&v);
}

/* Mistral's sliding_window, shorter than the run: every layer attends over the last 6 keys,
 * as HF does (the reference masks the same keys), in the prefill chunks and the decode steps. */
static void test_mistral_sliding_window(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "MistralForCausalLM";
    v.spec.sliding_window = 6;
    v.spec.seed = 5;
    check_variant(&v);
}

static void test_qwen3_qk_norm(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "Qwen3ForCausalLM";
    v.spec.head_dim = 24; /* != hidden / heads, as in real Qwen3 configs */
    v.spec.seed = 3;
    check_variant(&v);
}

static void test_llama_attention_bias(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.attention_bias = 1;
    v.spec.seed = 4;
    check_variant(&v);
}

static void test_mistral_bf16(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "MistralForCausalLM";
    v.spec.dtype = TINY_BF16;
    v.spec.seed = 5;
    check_variant(&v);
    /* An embedding and LM head of 1100 x 64 values: large enough that their conversion is split
     * over threads (traces/model/matrix.c) when OpenBLAS has more than one. */
    v.spec.vocab_size = 1100;
    check_variant(&v);
}

static void test_llama_f16(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.dtype = TINY_F16;
    v.spec.seed = 6;
    check_variant(&v);
}

static void test_sharded_unaligned(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.n_shards = 2;
    v.spec.unaligned = 1; /* F32 data at offsets that are not multiples of 4: copied */
    v.spec.seed = 7;
    check_variant(&v);
}

static void test_tied_embeddings(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.tie_word_embeddings = 1;
    v.spec.seed = 8;
    check_variant(&v);
}

static void test_llama3_rope_scaling(void **state)
{
    (void)state;
    /* original context 64 with factors 1 and 4 puts the 8 frequencies of head_dim 16 in all
     * three bands: kept (wavelength < 16), blended, slowed by 8 (wavelength > 64). */
    Variant v = base_variant();
    v.spec.rope_scaling = "{\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
                          "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 64}";
    v.spec.rope_theta = 500000.0;
    v.spec.seed = 9;
    v.rope_type = "llama3";
    v.factor = 8, v.low = 1, v.high = 4, v.old_context = 64;
    check_variant(&v);
}

/* YaRN: with head_dim 16, theta 10000 and an original context of 256, the ramp runs from pair
 * 0 (about 41 turns over that context: kept) to pair 4 (slowed by 4, as are 5 to 7), pairs 1 to
 * 3 blended; cos and sin are scaled by 0.1 ln 4 + 1, so q and k are too. */
static void test_yarn_rope_scaling(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.rope_scaling = "{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                          "\"original_max_position_embeddings\": 256}";
    v.spec.seed = 12;
    v.rope_type = "yarn";
    v.factor = 4, v.old_context = 256;
    v.attention_scaling = 0.1 * log(4.0) + 1.0;
    check_variant(&v);
    /* An explicit attention_factor wins over the formula. */
    v.spec.rope_scaling = "{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                          "\"original_max_position_embeddings\": 256, \"attention_factor\": 1.5}";
    v.attention_scaling = 1.5;
    check_variant(&v);
}

/* LongRoPE in Phi-3's layout (the factor lists in rope_scaling, the pretrained context at the
 * config's top level): original context 16 < 27 tokens, so the long factors, factor 512 / 16 =
 * 32 and attention factor sqrt(1 + ln 32 / ln 16) = 1.5; original context 64, the short factors
 * and sqrt(1 + ln 8 / ln 64); no original context: max_position_embeddings (512) is, and the
 * rope_scaling's factor 4 gives sqrt(1 + ln 4 / ln 512); an explicit attention_factor wins. */
static void test_longrope_scaling(void **state)
{
    (void)state;
    static const double short_f[8] = {1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.0};
    static const double long_f[8] = {1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0};
    const char *lists = "\"short_factor\": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.0], "
                        "\"long_factor\": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]";
    char text[512];
    snprintf(text, sizeof text, "{\"type\": \"longrope\", %s}", lists);
    Variant v = base_variant();
    v.spec.rope_scaling = text;
    v.spec.original_max_position_embeddings = 16;
    v.spec.seed = 17;
    v.rope_type = "longrope";
    ref_ext_factors = long_f;
    v.attention_scaling = sqrt(1 + log(32.0) / log(16.0));
    check_variant(&v);
    v.spec.original_max_position_embeddings = 64;
    ref_ext_factors = short_f;
    v.attention_scaling = sqrt(1 + log(8.0) / log(64.0));
    check_variant(&v);
    v.spec.original_max_position_embeddings = 0;
    snprintf(text, sizeof text, "{\"rope_type\": \"longrope\", \"factor\": 4.0, %s}", lists);
    v.attention_scaling = sqrt(1 + log(4.0) / log(512.0));
    check_variant(&v);
    snprintf(text, sizeof text, "{\"rope_type\": \"longrope\", \"attention_factor\": 1.25, %s}",
             lists);
    v.attention_scaling = 1.25;
    check_variant(&v);
}

/* MLX-quantized weights (mlx-lm's affine layout): the embedding and projections at 4 bits in
 * groups of 32, lm_head at 8 bits through its own entry of "quantization", one projection left
 * in floats by a `false` entry, the reference computing with the dequantized values; then 2 and
 * 8 bits, and two shards. */
static void test_mlx_quantized_weights(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.quant_bits = 4;
    v.spec.quant_group = 32;
    v.spec.seed = 13;
    check_variant(&v);
    v.spec.quant_bits = 2;
    v.spec.n_shards = 2;
    check_variant(&v);
    v.spec.quant_bits = 8;
    v.spec.quant_group = 16;
    v.spec.n_shards = 1;
    check_variant(&v);
}

static void test_linear_and_dynamic_rope_scaling(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.rope_scaling = "{\"type\": \"linear\", \"factor\": 4.0}";
    v.spec.seed = 10;
    v.rope_type = "linear";
    v.factor = 4;
    check_variant(&v);
    /* Dynamic NTK only changes anything past max_position_embeddings: 16 < 27 tokens. */
    v.spec.rope_scaling = "{\"rope_type\": \"dynamic\", \"factor\": 2.0}";
    v.spec.max_position_embeddings = 16;
    v.rope_type = "dynamic";
    v.factor = 2;
    check_variant(&v);
}

/* Qwen2's use_sliding_window: the layers from max_window_layers on slide (configuration_qwen2.py's
 * layer_types), here layer 2 of 3, over 5 keys. */
static void test_qwen2_sliding_layers(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "Qwen2ForCausalLM";
    v.spec.n_layers = 3;
    v.spec.sliding_window = 5;
    v.spec.use_sliding_window = 1;
    v.spec.max_window_layers = 2;
    v.spec.seed = 14;
    static const int windows[3] = {0, 0, 5};
    v.window = windows;
    check_variant(&v);
}

/* Gemma 2: every other layer slides from layer 0 (configuration_gemma2.py's layer_types), the
 * scale is query_pre_attn_scalar^-1/2 (here 24, not head_dim 16), attention logits capped at 5
 * and final logits at 3 (small enough to bend the tiny model's logits), tied embeddings. */
static void test_gemma2(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "Gemma2ForCausalLM";
    v.spec.n_layers = 4;
    v.spec.sliding_window = 6;
    v.spec.query_pre_attn_scalar = 24;
    v.spec.attn_softcap = 5.0;
    v.spec.final_softcap = 3.0;
    v.spec.tie_word_embeddings = 1;
    v.spec.seed = 15;
    static const int windows[4] = {6, 0, 6, 0};
    v.window = windows;
    v.scale = 1.0 / sqrt(24.0);
    check_variant(&v);
    /* BF16 weights, untied. */
    v.spec.dtype = TINY_BF16;
    v.spec.tie_word_embeddings = 0;
    v.spec.seed = 16;
    check_variant(&v);
}

/* Gemma 3: every sliding_window_pattern-th layer global (here 3: layer 2 of 4), q/k norms, the
 * global layers' RoPE theta 1e6 with linear scaling, the sliding layers' rope_local_base_freq
 * 10000 unscaled, no attention soft-capping (null) and none on the final logits (null). */
static void test_gemma3(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "Gemma3ForCausalLM";
    v.spec.n_layers = 4;
    v.spec.sliding_window = 5;
    v.spec.sliding_window_pattern = 3;
    v.spec.query_pre_attn_scalar = 16;
    v.spec.attn_softcap = -1;
    v.spec.final_softcap = -1;
    v.spec.rope_theta = 1e6;
    v.spec.rope_local_base_freq = 10000;
    v.spec.rope_scaling = "{\"rope_type\": \"linear\", \"factor\": 2.0}";
    v.spec.tie_word_embeddings = 1;
    v.spec.seed = 17;
    v.rope_type = "linear";
    v.factor = 2;
    v.local_theta = 10000;
    static const int windows[4] = {5, 5, 0, 5};
    v.window = windows;
    check_variant(&v);
    /* The multimodal checkpoint's text model: config under text_config, tensors under
     * language_model.model., the layers from layer_types. */
    v.spec.architecture = "Gemma3ForConditionalGeneration";
    v.spec.sliding_window_pattern = 0;
    v.spec.layer_types = "[\"sliding_attention\", \"sliding_attention\", \"full_attention\", "
                         "\"sliding_attention\"]";
    v.spec.seed = 18;
    check_variant(&v);
    /* transformers 5's rope_parameters per layer type in place of rope_theta, rope_scaling and
     * rope_local_base_freq: the same frequencies (the reference's, from the spec's theta). */
    v.spec.architecture = "Gemma3ForCausalLM";
    v.spec.rope_scaling = NULL;
    v.spec.rope_local_base_freq = 0;
    v.spec.rope_parameters =
        "{\"full_attention\": {\"rope_type\": \"linear\", \"factor\": 2.0, \"rope_theta\": 1e6}, "
        "\"sliding_attention\": {\"rope_type\": \"default\", \"rope_theta\": 10000.0}}";
    v.spec.seed = 19;
    check_variant(&v);
}

/* Mixtral: 4 experts, top 2, renormalized, in every layer; BF16 weights (kept 16-bit in
 * memory), with a sliding window shorter than the run. */
static void test_mixtral_moe(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "MixtralForCausalLM";
    v.spec.n_experts = 4;
    v.spec.n_experts_per_tok = 2;
    v.spec.seed = 14;
    check_variant(&v);
    v.spec.dtype = TINY_BF16;
    v.spec.sliding_window = 6;
    check_variant(&v);
}

/* Qwen3-MoE: 6 experts of 32, top 3, q/k norms; 3 layers of which layer 0 is dense through
 * mlp_only_layers; with and without norm_topk_prob; decoder_sparse_step 2 (only layer 1 has
 * experts), two shards, F16. */
static void test_qwen3_moe(void **state)
{
    (void)state;
    Variant v = base_variant();
    v.spec.architecture = "Qwen3MoeForCausalLM";
    v.spec.n_layers = 3;
    v.spec.n_experts = 6;
    v.spec.n_experts_per_tok = 3;
    v.spec.moe_intermediate_size = 32;
    v.spec.norm_topk_prob = 1;
    v.spec.mlp_only_layer = 0;
    v.spec.head_dim = 24;
    v.spec.seed = 15;
    check_variant(&v);
    v.spec.norm_topk_prob = 0;
    v.spec.mlp_only_layer = -1;
    v.spec.seed = 16;
    check_variant(&v);
    v.spec.decoder_sparse_step = 2;
    v.spec.n_shards = 2;
    v.spec.dtype = TINY_F16;
    check_variant(&v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_f32),
        cmocka_unit_test(test_qwen2_biases),
        cmocka_unit_test(test_qwen3_qk_norm),
        cmocka_unit_test(test_mistral_sliding_window),
        cmocka_unit_test(test_llama_attention_bias),
        cmocka_unit_test(test_mistral_bf16),
        cmocka_unit_test(test_llama_f16),
        cmocka_unit_test(test_sharded_unaligned),
        cmocka_unit_test(test_tied_embeddings),
        cmocka_unit_test(test_llama3_rope_scaling),
        cmocka_unit_test(test_yarn_rope_scaling),
        cmocka_unit_test(test_mlx_quantized_weights),
        cmocka_unit_test(test_linear_and_dynamic_rope_scaling),
        cmocka_unit_test(test_qwen2_sliding_layers),
        cmocka_unit_test(test_gemma2),
        cmocka_unit_test(test_gemma3),
        cmocka_unit_test(test_longrope_scaling),
        cmocka_unit_test(test_mixtral_moe),
        cmocka_unit_test(test_qwen3_moe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
