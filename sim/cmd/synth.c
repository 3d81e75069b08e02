/* synth.c — the synthetic trace generator (docs/synth.md has the model and its constants).
 *
 * Logits are planned in units of the attention logit: with the default attn_scale
 * (attn_scale_default: D^(-1/2)), a query
 * component a·u and a key component b·u along the same unit direction (u = D^(1/4)) contribute
 * a·b to the logit before RoPE. The per-kind targets below are therefore the logits a query
 * gives a sink, a key at distance 0, or a needle. */
#include "sim/cmd/synth.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim/base/blas.h" /* before the GSL headers */
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>
#include "sim/base/args.h"
#include "sim/base/progress.h"

#define SYNTH_VOCAB 32000
#define TWO_PI 6.283185307179586
#define NOISE_SIGMA 0.7      /* every pre-RoPE component of q and k: logit noise std ~ 0.5 */
#define VALUE_SIGMA 1.0
#define SINK_VALUE_SCALE 0.1 /* sinks carry little value, as in real models */
#define KEY_AMP 3.0          /* key-side amplitude of the sink and needle directions, units u */
#define LOCAL_KEY_ENERGY 2.0 /* |recency band of a key|^2, units u^2 */
#define LOCAL_WINDOW 16.0    /* the band is the pairs turning at least 1 rad per this many tokens */
#define TOPIC_KEY_ENERGY 2.0 /* |topic of a key|^2, units u^2 */
#define TOPIC_TAU 8.0        /* tokens: correlation of the topic at distance d is exp(-d/tau) */
#define JITTER_LO 0.75       /* per-query-head scale of the planted components */
#define JITTER_HI 1.25

typedef struct {
    double sink, band, topic, needle; /* target logits; needle only at probe queries */
} KindLogits;

static const KindLogits kind_logits[3] = {
    [SYNTH_LOCAL] = {3.0, 3.0, 6.0, 14.0},
    [SYNTH_SINK] = {10.0, 2.0, 1.0, 14.0},
    [SYNTH_RETRIEVAL] = {4.0, 2.0, 1.0, 14.0},
};

void synth_defaults(SynthParams *sp)
{
    *sp = (SynthParams){
        .seed = 1, .n_layers = 4, .n_q_heads = 8, .n_kv_heads = 2, .head_dim = 64,
        .n_prompt = 2048, .n_decode = 256, .n_needles = 8, .needle_len = 4, .n_sinks = 4,
        .n_system = 64, .n_turns = 4, .probe_every = 16, .attn_rows_every = 16,
        .dtype = TRACE_F32, .rope_theta = 10000.0, .rope_layout = ROPE_HALF, .window = 0,
        .global_every = 0, .decode_turns = 1, .message_len = 32, .progress = false,
    };
}

SynthHeadKind synth_head_kind(int layer, int kv_head)
{
    return (SynthHeadKind)((layer + kv_head) % 3);
}

/* The prompt region needles are placed in: after the sinks and the system prompt, before the
 * last prompt token (a probe). */
static void needle_region(const SynthParams *sp, int *lo, int *hi)
{
    *lo = sp->n_system > sp->n_sinks ? sp->n_system : sp->n_sinks;
    *hi = sp->n_prompt - 1;
}

int synth_validate(const SynthParams *sp, KvErr *err)
{
    if (sp->n_layers < 1 || sp->n_q_heads < 1 || sp->n_kv_heads < 1)
        return kv_fail(err, "synth: --layers, --q-heads and --kv-heads must be >= 1");
    if (sp->n_q_heads % sp->n_kv_heads != 0)
        return kv_fail(err, "synth: --kv-heads %d does not divide --q-heads %d", sp->n_kv_heads,
                       sp->n_q_heads);
    if (sp->head_dim < 8 || sp->head_dim % 2 != 0)
        return kv_fail(err, "synth: --head-dim: expected an even number >= 8, found %d",
                       sp->head_dim);
    if (sp->n_prompt < 2 || sp->n_decode < 0)
        return kv_fail(err, "synth: --prompt must be >= 2 and --decode >= 0");
    if ((long long)sp->n_prompt + sp->n_decode > 1 << 30)
        return kv_fail(err, "synth: --prompt + --decode too large");
    if (sp->n_sinks < 0 || sp->n_sinks >= sp->n_prompt)
        return kv_fail(err, "synth: sinks: expected 0 <= sinks < --prompt, found %d", sp->n_sinks);
    if (sp->n_turns < 1 || sp->n_system < 0 || sp->n_system > sp->n_prompt - sp->n_turns)
        return kv_fail(err, "synth: --system %d and --turns %d: expected turns >= 1 and at least one prompt token per turn after the system prompt (--prompt %d)",
                       sp->n_system, sp->n_turns, sp->n_prompt);
    if (sp->n_needles < 0 || sp->needle_len < 1)
        return kv_fail(err, "synth: --needles must be >= 0 and --needle-len >= 1");
    int lo, hi;
    needle_region(sp, &lo, &hi);
    if (sp->n_needles > 0 && (hi - lo) / sp->n_needles < sp->needle_len)
        return kv_fail(err, "synth: --needles: %d needles of %d tokens do not fit in the prompt region [%d,%d)",
                       sp->n_needles, sp->needle_len, lo, hi);
    if (sp->probe_every < 1 || sp->attn_rows_every < 0)
        return kv_fail(err, "synth: --probe-every must be >= 1 and --attn-rows >= 0");
    if (!isfinite(sp->rope_theta) || sp->rope_theta <= 1.0)
        return kv_fail(err, "synth: --rope-theta: expected a finite value > 1, found %g",
                       sp->rope_theta);
    if (sp->window < 0 || sp->global_every < 0)
        return kv_fail(err, "synth: --window and --global-every must be >= 0");
    if (sp->decode_turns < 1 || sp->message_len < 1)
        return kv_fail(err, "synth: --decode-turns and --message must be >= 1");
    if (sp->decode_turns > 1 && sp->n_decode < sp->decode_turns)
        return kv_fail(err, "synth: --decode-turns %d: expected at most --decode %d (every decode "
                       "run at least one step)", sp->decode_turns, sp->n_decode);
    if ((long long)sp->n_prompt + sp->n_decode + (long long)(sp->decode_turns - 1) * sp->message_len >
        1 << 30)
        return kv_fail(err, "synth: --prompt + --decode + the messages of --decode-turns too large");
    return 0;
}

int synth_n_tokens(const SynthParams *sp)
{
    return sp->n_prompt + sp->n_decode + (sp->decode_turns - 1) * sp->message_len;
}

int synth_layer_window(const SynthParams *sp, int layer)
{
    bool global = sp->global_every > 0 && layer % sp->global_every == sp->global_every - 1;
    return global ? 0 : sp->window;
}

/* The prompt's prefill span, then decode_turns decode runs splitting n_decode steps (the first
 * n_decode % decode_turns one step longer), each after the first preceded by a message of
 * message_len tokens (a prefill span). Returns the count; out may be NULL to count only. */
static int synth_spans(const SynthParams *sp, TraceSpan *out)
{
    int n = 0, at = sp->n_prompt;
    if (out)
        out[n] = (TraceSpan){SPAN_PREFILL, 0, at};
    n++;
    for (int k = 0; k < sp->decode_turns; k++) {
        if (k > 0) {
            if (out)
                out[n] = (TraceSpan){SPAN_PREFILL, at, at + sp->message_len};
            n++;
            at += sp->message_len;
        }
        int len = sp->n_decode / sp->decode_turns + (k < sp->n_decode % sp->decode_turns);
        if (len == 0)
            continue; /* --decode 0 */
        if (out)
            out[n] = (TraceSpan){SPAN_DECODE, at, at + len};
        n++;
        at += len;
    }
    return n;
}

/* The sizes the generator computes with: one layer's q/k/v and attention rows in memory (the
 * trace's own limits), and the rows of one KV head's query group as one BLAS dimension. */
static int synth_validate_sizes(const SynthParams *sp, const TraceMeta *meta, const char *path,
                                KvErr *err)
{
    if (trace_meta_validate(meta, path, err) < 0)
        return -1;
    long long group = sp->n_q_heads / sp->n_kv_heads;
    if (group * meta->n_attn_rows > INT_MAX)
        return kv_fail(err, "synth: --attn-rows %d: %d rows for %lld query heads per KV head are "
                       "too many (at most %d in all)", sp->attn_rows_every, meta->n_attn_rows,
                       group, INT_MAX);
    return 0;
}

/* Positions of the last prompt token and of every `every`-th decode step after it, plus the
 * last token when `with_last`. Returns the count; out may be NULL to count only. */
static int schedule(int P, int T, int every, bool with_last, int32_t *out)
{
    int n = 0;
    for (int t = P - 1; t < T; t += every) {
        if (out)
            out[n] = t;
        n++;
    }
    if (with_last && (T - 1 - (P - 1)) % every != 0) {
        if (out)
            out[n] = T - 1;
        n++;
    }
    return n;
}

static void fill_meta(const SynthParams *sp, TraceMeta *m, gsl_rng *rng)
{
    int P = sp->n_prompt, T = synth_n_tokens(sp);
    char generator[256];
    int len = snprintf(generator, sizeof generator,
                       "kvsim synth --seed %d --layers %d --q-heads %d --kv-heads %d --head-dim %d "
                       "--prompt %d --decode %d --needles %d --needle-len %d --dtype %s "
                       "--attn-rows %d --system %d --turns %d --rope-theta %g --rope-layout %s",
                       sp->seed, sp->n_layers, sp->n_q_heads, sp->n_kv_heads, sp->head_dim, P,
                       sp->n_decode, sp->n_needles, sp->needle_len,
                       sp->dtype == TRACE_F16 ? "f16" : "f32", sp->attn_rows_every, sp->n_system,
                       sp->n_turns, sp->rope_theta,
                       sp->rope_layout == ROPE_HALF ? "half" : "interleaved");
    /* Options beyond version 1's only when set, so that the default's text stays the same. */
    if (len >= 0 && (size_t)len < sizeof generator && sp->window > 0)
        len += snprintf(generator + len, sizeof generator - (size_t)len,
                        " --window %d --global-every %d", sp->window, sp->global_every);
    if (len >= 0 && (size_t)len < sizeof generator && sp->decode_turns > 1)
        len += snprintf(generator + len, sizeof generator - (size_t)len,
                        " --decode-turns %d --message %d", sp->decode_turns, sp->message_len);
    if (len < 0 || (size_t)len >= sizeof generator)
        snprintf(generator, sizeof generator, "kvsim synth --seed %d", sp->seed);
    int32_t *window = kv_calloc((size_t)sp->n_layers, sizeof *window);
    for (int l = 0; l < sp->n_layers; l++)
        window[l] = synth_layer_window(sp, l);
    TraceModel model = {
        .model = "synthetic", .generator = generator, .n_layers = sp->n_layers,
        .n_q_heads = sp->n_q_heads, .n_kv_heads = sp->n_kv_heads, .head_dim = sp->head_dim,
        .rope_theta = sp->rope_theta, .rope_layout = sp->rope_layout,
        .attn_scale = attn_scale_default(sp->head_dim), .window = window,
    };
    int n_probes = schedule(P, T, sp->probe_every, true, NULL);
    int n_rows = sp->attn_rows_every > 0 ? schedule(P, T, sp->attn_rows_every, false, NULL) : 0;
    trace_meta_init(m, &model, T, P, sp->n_needles, n_probes, n_rows);
    trace_model_free(&model);
    TraceSpan *spans = kv_calloc((size_t)synth_spans(sp, NULL), sizeof *spans);
    trace_meta_set_spans(m, synth_spans(sp, spans), spans);
    free(spans);
    schedule(P, T, sp->probe_every, true, m->probes);
    if (m->n_attn_rows)
        schedule(P, T, sp->attn_rows_every, false, m->attn_rows_at);

    int prompt_turns = P - sp->n_system;
    for (int t = 0; t < T; t++) {
        m->tokens[t] = t == 0 ? 1 : 2 + (int32_t)gsl_rng_uniform_int(rng, SYNTH_VOCAB - 2);
        if (t < sp->n_system)
            m->segments[t] = 0;
        else if (t < P)
            m->segments[t] = 1 + (int32_t)((long long)(t - sp->n_system) * sp->n_turns / prompt_turns);
        else
            m->segments[t] = sp->n_turns; /* the answer continues the last turn */
    }
    /* Each later message opens a turn, which its answer continues. */
    for (int i = 1, turn = sp->n_turns; i < m->n_spans; i++) {
        turn += m->spans[i].kind == SPAN_PREFILL;
        for (int t = m->spans[i].start; t < m->spans[i].end; t++)
            m->segments[t] = turn;
    }
    /* One needle per equal bin of the region, at a random offset inside it. */
    int lo, hi;
    needle_region(sp, &lo, &hi);
    int bin = sp->n_needles > 0 ? (hi - lo) / sp->n_needles : 0;
    for (int i = 0; i < sp->n_needles; i++) {
        int start = lo + i * bin +
                    (int)gsl_rng_uniform_int(rng, (unsigned long)(bin - sp->needle_len + 1));
        m->needles[2 * i] = start;
        m->needles[2 * i + 1] = start + sp->needle_len;
    }
}

/* The planted directions of one KV head, pre-RoPE, each a [D] vector. */
typedef struct {
    float *sink;   /* unit vector in the slowest RoPE pair */
    float *needle; /* unit vector in the second slowest pair */
    float *band;   /* recency band (band_pairs), |band|^2 = LOCAL_KEY_ENERGY u^2 */
} HeadDirections;

/* The recency band: the pairs fast enough (inv_freq >= 1/LOCAL_WINDOW) to dephase within a few
 * LOCAL_WINDOWs, so that q·k through them peaks at distance 0 and fades. Pairs are in order of
 * decreasing frequency; the two slowest are kept for the sink and needle directions. */
static int band_pairs(const double *inv_freq, int pairs)
{
    int n = 0;
    while (n < pairs - 2 && inv_freq[n] >= 1.0 / LOCAL_WINDOW)
        n++;
    return n > 0 ? n : 1;
}

static void draw_directions(gsl_rng *rng, const SynthParams *sp, const double *inv_freq,
                            double u, HeadDirections *dir)
{
    int D = sp->head_dim, pairs = D / 2, n_band = band_pairs(inv_freq, pairs);
    memset(dir->sink, 0, (size_t)D * sizeof(float));
    memset(dir->needle, 0, (size_t)D * sizeof(float));
    memset(dir->band, 0, (size_t)D * sizeof(float));
    int i0, i1;
    double phi = TWO_PI * gsl_rng_uniform(rng);
    rope_pair(sp->rope_layout, D, pairs - 1, &i0, &i1);
    dir->sink[i0] = (float)cos(phi);
    dir->sink[i1] = (float)sin(phi);
    phi = TWO_PI * gsl_rng_uniform(rng);
    rope_pair(sp->rope_layout, D, pairs - 2, &i0, &i1);
    dir->needle[i0] = (float)cos(phi);
    dir->needle[i1] = (float)sin(phi);
    double amp = u * sqrt(LOCAL_KEY_ENERGY / n_band);
    for (int f = 0; f < n_band; f++) {
        phi = TWO_PI * gsl_rng_uniform(rng);
        rope_pair(sp->rope_layout, D, f, &i0, &i1);
        dir->band[i0] = (float)(amp * cos(phi));
        dir->band[i1] = (float)(amp * sin(phi));
    }
}

/* The topic: an AR(1) process over tokens in every dimension but the sink and needle pairs,
 * stationary, with E|topic|^2 = TOPIC_KEY_ENERGY u^2. Queries looking for their own topic
 * find the keys of the last few tokens: content locality on top of RoPE's. */
static void draw_topics(gsl_rng *rng, const SynthParams *sp, double u, float *topic, int T)
{
    int D = sp->head_dim, pairs = D / 2;
    unsigned char *free_dim = kv_calloc((size_t)D, 1);
    for (int f = 0; f < pairs - 2; f++) {
        int i0, i1;
        rope_pair(sp->rope_layout, D, f, &i0, &i1);
        free_dim[i0] = free_dim[i1] = 1;
    }
    double rho = exp(-1.0 / TOPIC_TAU), sigma = u * sqrt(TOPIC_KEY_ENERGY / (D - 4));
    double step = sigma * sqrt(1 - rho * rho);
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) {
            float *x = topic + (size_t)t * D + d;
            if (!free_dim[d])
                *x = 0;
            else if (t == 0)
                *x = (float)gsl_ran_gaussian_ziggurat(rng, sigma);
            else
                *x = (float)(rho * x[-D] + gsl_ran_gaussian_ziggurat(rng, step));
        }
    free(free_dim);
}

typedef struct {
    const SynthParams *sp;
    const TraceMeta *meta;
    unsigned char *in_needle; /* [T] */
    unsigned char *is_probe;  /* [T] */
    float *q, *k, *v;         /* one layer */
    float *rows;              /* [Hq][R][T] */
    double *kd, *qd, *logits; /* attention row scratch */
    float *topic;             /* [T][D] the topic of each token, pre-RoPE */
    HeadDirections dir;
} Generator;

static void generate_layer(Generator *g, int layer)
{
    const SynthParams *sp = g->sp;
    const TraceMeta *m = g->meta;
    int D = sp->head_dim, T = m->n_tokens, group = sp->n_q_heads / sp->n_kv_heads;
    double u = pow((double)D, 0.25);
    LayerGeometry geom = trace_layer_geometry(m, layer);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    /* One stream per layer, so a layer's data does not depend on the others'. */
    gsl_rng_set(rng, (unsigned long)sp->seed * 1000003UL + (unsigned long)layer + 1);
    for (int kvh = 0; kvh < sp->n_kv_heads; kvh++) {
        const KindLogits *kl = &kind_logits[synth_head_kind(layer, kvh)];
        draw_directions(rng, sp, geom.rope_inv_freq, u, &g->dir);
        draw_topics(rng, sp, u, g->topic, T);
        for (int t = 0; t < T; t++) {
            float *k = g->k + ((size_t)kvh * T + t) * D, *v = g->v + ((size_t)kvh * T + t) * D;
            double sink = t < sp->n_sinks ? KEY_AMP * u : 0, needle = g->in_needle[t] ? KEY_AMP * u : 0;
            for (int d = 0; d < D; d++)
                k[d] = (float)(gsl_ran_gaussian_ziggurat(rng, NOISE_SIGMA) + g->dir.band[d] +
                               g->topic[(size_t)t * D + d] + sink * g->dir.sink[d] +
                               needle * g->dir.needle[d]);
            rope_apply(k, D, geom.rope_layout, geom.rope_inv_freq, m->positions[t]);
            double vscale = t < sp->n_sinks ? SINK_VALUE_SCALE : 1.0;
            for (int d = 0; d < D; d++)
                v[d] = (float)(vscale * gsl_ran_gaussian_ziggurat(rng, VALUE_SIGMA));
        }
        for (int i = 0; i < group; i++) {
            int h = kvh * group + i;
            double jitter = JITTER_LO + (JITTER_HI - JITTER_LO) * gsl_rng_uniform(rng);
            double band = jitter * kl->band / LOCAL_KEY_ENERGY, sink = jitter * kl->sink / KEY_AMP * u;
            double topic = jitter * kl->topic / TOPIC_KEY_ENERGY;
            double needle = jitter * kl->needle / KEY_AMP * u;
            for (int t = 0; t < T; t++) {
                float *q = g->q + ((size_t)h * T + t) * D;
                double nd = g->is_probe[t] ? needle : 0;
                for (int d = 0; d < D; d++)
                    q[d] = (float)(gsl_ran_gaussian_ziggurat(rng, NOISE_SIGMA) + band * g->dir.band[d] +
                                   topic * g->topic[(size_t)t * D + d] + sink * g->dir.sink[d] +
                                   nd * g->dir.needle[d]);
                rope_apply(q, D, geom.rope_layout, geom.rope_inv_freq, m->positions[t]);
            }
        }
    }
    gsl_rng_free(rng);
    size_t per_head = (size_t)T * D;
    trace_round_to_dtype(g->q, (size_t)sp->n_q_heads * per_head, sp->dtype);
    trace_round_to_dtype(g->k, (size_t)sp->n_kv_heads * per_head, sp->dtype);
    trace_round_to_dtype(g->v, (size_t)sp->n_kv_heads * per_head, sp->dtype);
}

/* The exact attention rows of the stored (rounded) q and k: double logits through one dgemm
 * per KV head over keys [0, last row], then a softmax per row over the keys the layer's
 * geometry lets the query attend. */
static void write_attention_rows(Generator *g, int layer)
{
    const SynthParams *sp = g->sp;
    const TraceMeta *m = g->meta;
    int D = sp->head_dim, T = m->n_tokens, R = m->n_attn_rows, group = sp->n_q_heads / sp->n_kv_heads;
    int cols = m->attn_rows_at[R - 1] + 1;
    LayerGeometry geom = trace_layer_geometry(m, layer);
    memset(g->rows, 0, (size_t)sp->n_q_heads * R * T * sizeof(float));
    for (int kvh = 0; kvh < sp->n_kv_heads; kvh++) {
        const float *k = g->k + (size_t)kvh * T * D;
        for (size_t i = 0; i < (size_t)cols * D; i++)
            g->kd[i] = k[i];
        for (int i = 0; i < group; i++)
            for (int r = 0; r < R; r++) {
                const float *q = g->q + ((size_t)(kvh * group + i) * T + m->attn_rows_at[r]) * D;
                for (int d = 0; d < D; d++)
                    g->qd[((size_t)i * R + r) * D + d] = q[d];
            }
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, group * R, cols, D, geom.attn_scale,
                    g->qd, D, g->kd, D, 0.0, g->logits, cols);
        for (int i = 0; i < group; i++)
            for (int r = 0; r < R; r++) {
                const double *lg = g->logits + ((size_t)i * R + r) * cols;
                float *row = g->rows + ((size_t)(kvh * group + i) * R + r) * T;
                int pos = m->attn_rows_at[r], first = attn_first_key(geom.window, pos);
                double mx = lg[first], sum = 0;
                for (int j = first + 1; j <= pos; j++)
                    mx = lg[j] > mx ? lg[j] : mx;
                for (int j = first; j <= pos; j++)
                    sum += exp(lg[j] - mx);
                for (int j = first; j <= pos; j++)
                    row[j] = (float)(exp(lg[j] - mx) / sum);
            }
    }
}

int synth_write(const SynthParams *sp, const char *path, KvErr *err)
{
    if (synth_validate(sp, err) < 0)
        return -1;
    TraceMeta meta;
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, (unsigned long)sp->seed);
    fill_meta(sp, &meta, rng);
    gsl_rng_free(rng);
    if (synth_validate_sizes(sp, &meta, path, err) < 0) {
        trace_meta_free(&meta);
        return -1;
    }

    int T = meta.n_tokens, D = sp->head_dim, R = meta.n_attn_rows;
    int group = sp->n_q_heads / sp->n_kv_heads;
    Generator g = {.sp = sp, .meta = &meta};
    g.in_needle = kv_calloc((size_t)T, 1);
    g.is_probe = kv_calloc((size_t)T, 1);
    for (int i = 0; i < meta.n_needles; i++)
        memset(g.in_needle + meta.needles[2 * i], 1, (size_t)(meta.needles[2 * i + 1] - meta.needles[2 * i]));
    for (int i = 0; i < meta.n_probes; i++)
        g.is_probe[meta.probes[i]] = 1;
    g.q = kv_malloc((size_t)sp->n_q_heads * T * D * sizeof(float));
    g.k = kv_malloc((size_t)sp->n_kv_heads * T * D * sizeof(float));
    g.v = kv_malloc((size_t)sp->n_kv_heads * T * D * sizeof(float));
    g.dir.sink = kv_malloc((size_t)D * sizeof(float));
    g.dir.needle = kv_malloc((size_t)D * sizeof(float));
    g.dir.band = kv_malloc((size_t)D * sizeof(float));
    g.topic = kv_malloc((size_t)T * D * sizeof(float));
    if (R > 0) {
        int cols = meta.attn_rows_at[R - 1] + 1;
        g.rows = kv_malloc((size_t)sp->n_q_heads * R * T * sizeof(float));
        g.kd = kv_malloc((size_t)cols * D * sizeof(double));
        g.qd = kv_malloc((size_t)group * R * D * sizeof(double));
        g.logits = kv_malloc((size_t)group * R * cols * sizeof(double));
    }
    float *row_buf = kv_malloc((size_t)sp->n_q_heads * T * sizeof(float));

    int rc = 0;
    TraceWriter *w = trace_writer_create(path, &meta, sp->dtype, err);
    if (!w)
        rc = -1;
    Progress progress;
    progress_begin(&progress, sp->progress, "synth", "layers", sp->n_layers);
    for (int l = 0; l < sp->n_layers && rc == 0; l++) {
        generate_layer(&g, l);
        rc = trace_writer_put_qkv(w, l, 0, T, g.q, g.k, g.v, err);
        if (rc == 0 && R > 0) {
            write_attention_rows(&g, l);
            for (int r = 0; r < R && rc == 0; r++) {
                for (int h = 0; h < sp->n_q_heads; h++)
                    memcpy(row_buf + (size_t)h * T, g.rows + ((size_t)h * R + r) * T, (size_t)T * sizeof(float));
                rc = trace_writer_put_attn_row(w, l, r, row_buf, err);
            }
        }
        progress_set(&progress, l + 1);
    }
    progress_end(&progress);
    if (w) {
        if (rc == 0)
            rc = trace_writer_finish(w, err);
        else
            trace_writer_abort(w);
    }
    free(row_buf);
    free(g.in_needle);
    free(g.is_probe);
    free(g.q);
    free(g.k);
    free(g.v);
    free(g.rows);
    free(g.kd);
    free(g.qd);
    free(g.logits);
    free(g.dir.sink);
    free(g.dir.needle);
    free(g.dir.band);
    free(g.topic);
    trace_meta_free(&meta);
    return rc;
}

int cmd_synth(int argc, char **argv)
{
    SynthParams sp;
    synth_defaults(&sp);
    const char *out = NULL;
    int dtype = sp.dtype, layout = sp.rope_layout;
    const ArgSpec specs[] = {
        {"out", ARG_STRING, &out, 0, 0, NULL, "trace file to write"},
        {"seed", ARG_INT, &sp.seed, 0, 2147483647, NULL, "random seed"},
        {"layers", ARG_INT, &sp.n_layers, 1, 4096, NULL, "layers"},
        {"q-heads", ARG_INT, &sp.n_q_heads, 1, 4096, NULL, "query heads"},
        {"kv-heads", ARG_INT, &sp.n_kv_heads, 1, 4096, NULL, "KV heads (divides --q-heads)"},
        {"head-dim", ARG_INT, &sp.head_dim, 8, 1024, NULL, "head dimension (even)"},
        {"prompt", ARG_INT, &sp.n_prompt, 2, 1 << 24, NULL, "prompt tokens"},
        {"decode", ARG_INT, &sp.n_decode, 0, 1 << 24, NULL, "decode steps"},
        {"needles", ARG_INT, &sp.n_needles, 0, 1 << 20, NULL, "needle spans in the prompt"},
        {"needle-len", ARG_INT, &sp.needle_len, 1, 1 << 20, NULL, "tokens per needle"},
        {"dtype", ARG_CHOICE, &dtype, 0, 0, "f32|f16", "Q/K/V precision on disk"},
        {"attn-rows", ARG_INT, &sp.attn_rows_every, 0, 1 << 24, NULL,
         "store attention rows at the last prompt token and every N-th decode step (0: none)"},
        {"probe-every", ARG_INT, &sp.probe_every, 1, 1 << 24, NULL,
         "probes at the last prompt token, every N-th decode step and the last"},
        {"system", ARG_INT, &sp.n_system, 0, 1 << 24, NULL, "system prompt tokens (segment 0)"},
        {"turns", ARG_INT, &sp.n_turns, 1, 1 << 20, NULL, "turns after the system prompt"},
        {"rope-theta", ARG_DOUBLE, &sp.rope_theta, 1.0, 1e12, NULL, "RoPE base"},
        {"rope-layout", ARG_CHOICE, &layout, 0, 0, "half|interleaved", "RoPE pair layout"},
        {"window", ARG_INT, &sp.window, 0, 1 << 24, NULL,
         "sliding-window attention over the last N keys (0: global)"},
        {"global-every", ARG_INT, &sp.global_every, 0, 4096, NULL,
         "with --window: every N-th layer (N-1, 2N-1, ...) stays global (0: none)"},
        {"decode-turns", ARG_INT, &sp.decode_turns, 1, 1 << 20, NULL,
         "split the decode steps into N runs, a user message before each after the first"},
        {"message", ARG_INT, &sp.message_len, 1, 1 << 24, NULL,
         "tokens of each later user message (a prefill span), with --decode-turns"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage = "synth --out FILE [options]";
    const char *positional[1];
    int status = args_start(argc, argv, specs, usage, positional, 0);
    if (status >= 0)
        return status;
    KvErr err;
    if (!out) {
        fprintf(stderr, "kvsim: synth: --out FILE is required\n");
        return 2;
    }
    sp.dtype = (TraceDtype)dtype;
    sp.rope_layout = (RopeLayout)layout;
    sp.progress = isatty(STDERR_FILENO);
    double t0 = now_seconds();
    if (synth_write(&sp, out, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    printf("%s: %d layers, %d+%d tokens, %d needles, %s, %.1f s\n", out, sp.n_layers,
           sp.n_prompt, synth_n_tokens(&sp) - sp.n_prompt, sp.n_needles, sp.dtype == TRACE_F16 ? "float16" : "float32",
           now_seconds() - t0);
    return 0;
}
