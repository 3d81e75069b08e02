/* trig — TriAttention: keys are ranked by a query-free trigonometric score (policies/trig.h)
 * computed from calibrated pre-RoPE query statistics. Every `divide_length` tokens, if a cache
 * holds more than `budget` tokens, it keeps the `budget` best: the first `protect_initial` and the
 * last `protect_recent` tokens unconditionally, the rest by score. After every prefill chunk (of
 * any span) a cache over the budget is pruned to it, scored at the chunk's last token, and the
 * count of tokens to the next prune restarts. Between prunes the cache grows by one token per
 * step, so it holds between budget and budget + divide_length − 1 tokens at attention time.
 * Online calibration takes the queries of every prefill chunk as it arrives (the prompt's, then
 * later spans'), never a decode step's. That is `schedule = mlx`; with `schedule = hf` (the
 * authors' HF forward) a prefill is never pruned, and after query t attended a cache that holds
 * budget + divide_length tokens is pruned to budget, scored at the next token's position. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <gsl/gsl_statistics_float.h>

#include "policies/policy.h"
#include "policies/trig.h"

extern const PolicyType policy_trig;

/* ---- The score ---- */

void trig_scorer_init(TrigScorer *s, int n_q_heads, int head_dim, RopeLayout pairing,
                      const double *inv_freq)
{
    int F = head_dim / 2;
    memset(s, 0, sizeof *s);
    s->n_q_heads = n_q_heads;
    s->head_dim = head_dim;
    s->pairing = pairing;
    s->pair_re = kv_malloc((size_t)F * sizeof *s->pair_re);
    s->pair_im = kv_malloc((size_t)F * sizeof *s->pair_im);
    s->inv_freq = kv_malloc((size_t)F * sizeof *s->inv_freq);
    s->offset_re = kv_malloc((size_t)F * sizeof *s->offset_re);
    s->offset_im = kv_malloc((size_t)F * sizeof *s->offset_im);
    s->mean_re = kv_calloc((size_t)n_q_heads * F, sizeof *s->mean_re);
    s->mean_im = kv_calloc((size_t)n_q_heads * F, sizeof *s->mean_im);
    s->mean_abs = kv_calloc((size_t)n_q_heads * F, sizeof *s->mean_abs);
    s->sum_re = kv_calloc((size_t)n_q_heads * F, sizeof *s->sum_re);
    s->sum_im = kv_calloc((size_t)n_q_heads * F, sizeof *s->sum_im);
    s->sum_abs = kv_calloc((size_t)n_q_heads * F, sizeof *s->sum_abs);
    for (int f = 0; f < F; f++) {
        rope_pair(pairing, head_dim, f, &s->pair_re[f], &s->pair_im[f]);
        s->inv_freq[f] = inv_freq[f];
        double re = 0, im = 0;
        for (int e = 0; e < TRIG_N_OFFSETS; e++) {
            double a = inv_freq[f] * ldexp(1.0, e);
            re += cos(a);
            im += sin(a);
        }
        s->offset_re[f] = re / TRIG_N_OFFSETS;
        s->offset_im[f] = im / TRIG_N_OFFSETS;
    }
}

void trig_scorer_free(TrigScorer *s)
{
    free(s->pair_re);
    free(s->pair_im);
    free(s->inv_freq);
    free(s->offset_re);
    free(s->offset_im);
    free(s->mean_re);
    free(s->mean_im);
    free(s->mean_abs);
    free(s->sum_re);
    free(s->sum_im);
    free(s->sum_abs);
    memset(s, 0, sizeof *s);
}

void trig_scorer_calibrate(TrigScorer *s, const float *q, int n_tokens, int n_used,
                           const int32_t *positions, RopeLayout q_layout,
                           const double *q_inv_freq)
{
    size_t n = (size_t)s->n_q_heads * (s->head_dim / 2);
    memset(s->sum_re, 0, n * sizeof *s->sum_re);
    memset(s->sum_im, 0, n * sizeof *s->sum_im);
    memset(s->sum_abs, 0, n * sizeof *s->sum_abs);
    s->n_used = 0;
    trig_scorer_accumulate(s, q, n_tokens, 0, n_used, positions, q_layout, q_inv_freq);
}

void trig_scorer_accumulate(TrigScorer *s, const float *q, int n_tokens, int j0, int j1,
                            const int32_t *positions, RopeLayout q_layout,
                            const double *q_inv_freq)
{
    int D = s->head_dim, F = D / 2, Hq = s->n_q_heads;
    int *q_re = kv_malloc((size_t)F * sizeof *q_re), *q_im = kv_malloc((size_t)F * sizeof *q_im);
    for (int f = 0; f < F; f++)
        rope_pair(q_layout, D, f, &q_re[f], &q_im[f]);
    /* The inverse rotation of token j is the same for every head: one table per token instead of
     * rope_apply's per-vector cos/sin keeps calibration at O(P·D/2) trigonometric calls. */
    double *rot_cos = kv_malloc((size_t)F * sizeof *rot_cos);
    double *rot_sin = kv_malloc((size_t)F * sizeof *rot_sin);
    double *pre = kv_malloc((size_t)D * sizeof *pre);
    for (int j = j0; j < j1; j++) {
        for (int f = 0; f < F; f++) {
            double a = -(double)positions[j] * q_inv_freq[f];
            rot_cos[f] = cos(a);
            rot_sin[f] = sin(a);
        }
        for (int h = 0; h < Hq; h++) {
            const float *x = q + ((size_t)h * n_tokens + j) * D;
            for (int f = 0; f < F; f++) {
                double x0 = x[q_re[f]], x1 = x[q_im[f]];
                pre[q_re[f]] = x0 * rot_cos[f] - x1 * rot_sin[f];
                pre[q_im[f]] = x0 * rot_sin[f] + x1 * rot_cos[f];
            }
            double *mre = s->sum_re + (size_t)h * F, *mim = s->sum_im + (size_t)h * F;
            double *mabs = s->sum_abs + (size_t)h * F;
            for (int f = 0; f < F; f++) {
                double re = pre[s->pair_re[f]], im = pre[s->pair_im[f]];
                mre[f] += re;
                mim[f] += im;
                mabs[f] += hypot(re, im);
            }
        }
    }
    s->n_used += j1 - j0;
    for (size_t i = 0; i < (size_t)Hq * F; i++) {
        s->mean_re[i] = s->sum_re[i] / s->n_used;
        s->mean_im[i] = s->sum_im[i] / s->n_used;
        s->mean_abs[i] = s->sum_abs[i] / s->n_used;
    }
    free(q_re);
    free(q_im);
    free(rot_cos);
    free(rot_sin);
    free(pre);
}

void trig_scorer_score(const TrigScorer *s, int h0, int nh, const float *keys, int n, double t,
                       float *out)
{
    int D = s->head_dim, F = D / 2;
    /* mean_δ |Eq||k| cos(ω(t+δ) + arg Eq − arg k) = Re(z · conj(k)) with
     * z = Eq · e^{iωt} · mean_δ e^{iωδ}: a linear form in the key's components. */
    float *linear = kv_calloc((size_t)nh * D, sizeof *linear);
    float *radial = kv_malloc((size_t)nh * F * sizeof *radial);
    float *key_abs = kv_malloc((size_t)n * F * sizeof *key_abs);
    for (int i = 0; i < nh; i++) {
        size_t hf = (size_t)(h0 + i) * F;
        for (int f = 0; f < F; f++) {
            double a = s->inv_freq[f] * t;
            double rot_re = cos(a), rot_im = sin(a);
            double mre = s->mean_re[hf + f], mim = s->mean_im[hf + f];
            double u_re = mre * rot_re - mim * rot_im, u_im = mre * rot_im + mim * rot_re;
            double z_re = u_re * s->offset_re[f] - u_im * s->offset_im[f];
            double z_im = u_re * s->offset_im[f] + u_im * s->offset_re[f];
            linear[(size_t)i * D + s->pair_re[f]] = (float)z_re;
            linear[(size_t)i * D + s->pair_im[f]] = (float)z_im;
            radial[(size_t)i * F + f] = (float)(s->mean_abs[hf + f] - hypot(mre, mim));
        }
    }
    for (int j = 0; j < n; j++) {
        const float *k = keys + (size_t)j * D;
        for (int f = 0; f < F; f++)
            key_abs[(size_t)j * F + f] = hypotf(k[s->pair_re[f]], k[s->pair_im[f]]);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nh, n, D, 1.0f, linear, D, keys, D, 0.0f,
                out, n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nh, n, F, 1.0f, radial, F, key_abs, F,
                1.0f, out, n);
    free(linear);
    free(radial);
    free(key_abs);
}

/* ---- The policy ---- */

enum { GRANULARITY_HEAD = 0, GRANULARITY_LAYER = 1, GRANULARITY_KVHEAD = 2 };
enum { PAIRING_TRACE = 0, PAIRING_HALF = 1, PAIRING_INTERLEAVED = 2 };
enum { SCHEDULE_MLX = 0, SCHEDULE_HF = 1 };

typedef struct {
    int budget;
    int divide_length;
    int protect_initial;
    int protect_recent;
    int granularity;
    int pairing;
    int schedule;
    char calibration[PARAM_STRING_MAX];
} TrigParams;

typedef struct {
    Policy base;
    TrigParams prm;
    TrigScorer scorer;
    bool calibrated; /* from a file: fixed */
    int since_prune; /* tokens admitted since the last prune (or the end of prefill) */
    /* granularity = kvhead: the trace's layers (1 where the policy is driven on one layer
     * alone), each with its own scorer and, for the others, their queries and keys read from
     * the trace; this layer's are `scorer` and the LayerView's. */
    int n_layers;
    TrigScorer *layer_scorer; /* [n_layers] */
    float **layer_q, **layer_k; /* [n_layers] */
} Trig;

/* A candidate for eviction: its combined score and position. */
typedef struct {
    float score;
    int pos;
} Ranked;

static const ParamSpec trig_params[] = {
    {"budget", PARAM_INT, offsetof(TrigParams, budget), "2048", 1, 1 << 30, NULL,
     "tokens per KV head kept by a prune"},
    {"divide_length", PARAM_INT, offsetof(TrigParams, divide_length), "128", 1, 1 << 30, NULL,
     "tokens between prunes"},
    {"protect_initial", PARAM_INT, offsetof(TrigParams, protect_initial), "4", 0, 1 << 30, NULL,
     "first tokens never evicted (attention sinks)"},
    {"protect_recent", PARAM_INT, offsetof(TrigParams, protect_recent), "128", 1, 1 << 30, NULL,
     "last tokens never evicted, the current one included"},
    {"granularity", PARAM_ENUM, offsetof(TrigParams, granularity), "head", 0, 0,
     "head|layer|kvhead",
     "one token set per KV head, one per layer (scores averaged over KV heads), or one per KV "
     "head shared by all layers (scores averaged over layers; replay only)"},
    {"pairing", PARAM_ENUM, offsetof(TrigParams, pairing), "trace", 0, 0,
     "trace|half|interleaved",
     "dimension pairs of the score: the trace's RoPE layout, or forced (to reproduce a mismatch)"},
    {"schedule", PARAM_ENUM, offsetof(TrigParams, schedule), "mlx", 0, 0, "mlx|hf",
     "mlx: prune at prefill end and every divide_length tokens before the query; hf: never on "
     "a prefill, after the query once the cache reaches budget + divide_length (the HF code)"},
    {"calibration", PARAM_STRING, offsetof(TrigParams, calibration), "online", 0, 0, NULL,
     "online (the prompt's queries) or a trace file whose queries calibrate the statistics"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static bool calibration_online(const TrigParams *prm)
{
    return strcmp(prm->calibration, "online") == 0;
}

static int trig_validate(const void *params, KvErr *err)
{
    const TrigParams *prm = params;
    if ((long)prm->protect_initial + prm->protect_recent >= prm->budget)
        return kv_fail(err,
                       "trig: protect_initial + protect_recent = %d must be below budget = %d "
                       "(otherwise no token is chosen by score)",
                       prm->protect_initial + prm->protect_recent, prm->budget);
    if (prm->calibration[0] == '\0')
        return kv_fail(err, "trig: calibration is empty: expected 'online' or a trace file");
    if (!calibration_online(prm)) {
        KvErr terr;
        Trace *tr = trace_open(prm->calibration, &terr);
        if (!tr)
            return kv_fail(err, "trig: calibration: %s", terr.msg);
        trace_close(tr);
    }
    return 0;
}

static void trig_destroy(Policy *p);

/* Statistics of `sc` from the queries of layer `layer` of another trace, over all its tokens;
 * L gives the simulated model's dimensions. */
static int calibrate_from_file(TrigScorer *sc, const char *path, const LayerView *L, int layer,
                               KvErr *err)
{
    KvErr terr;
    Trace *cal = trace_open(path, &terr);
    if (!cal)
        return kv_fail(err, "trig: calibration: %s", terr.msg);
    const TraceMeta *m = trace_meta(cal);
    char what[512];
    /* The same model: the recovered pre-RoPE queries must live in the simulated model's
     * dimensions, so the RoPE layout has to agree too. */
    if (m->n_layers <= layer || m->n_q_heads != L->n_q_heads || m->head_dim != L->head_dim ||
        m->rope_layout != L->meta->rope_layout) {
        snprintf(what, sizeof what,
                 "has %d layers, %d query heads, head_dim %d, rope_layout %s; layer %d of the "
                 "simulated trace needs that layer, %d query heads, head_dim %d, rope_layout %s "
                 "(a trace of the same model)",
                 m->n_layers, m->n_q_heads, m->head_dim,
                 m->rope_layout == ROPE_HALF ? "half" : "interleaved", layer, L->n_q_heads,
                 L->head_dim, L->meta->rope_layout == ROPE_HALF ? "half" : "interleaved");
        trace_close(cal);
        return kv_fail(err, "trig: calibration %s: %s", path, what);
    }
    float *q = kv_malloc((size_t)m->n_q_heads * m->n_tokens * m->head_dim * sizeof *q);
    if (trace_read_layer(cal, layer, q, NULL, NULL, &terr) != 0) {
        free(q);
        trace_close(cal);
        return kv_fail(err, "trig: calibration: %s", terr.msg);
    }
    trig_scorer_calibrate(sc, q, m->n_tokens, m->n_tokens, m->positions, m->rope_layout,
                          trace_layer_geometry(m, layer).rope_inv_freq);
    free(q);
    trace_close(cal);
    return 0;
}

/* granularity = kvhead: every other layer's queries and keys from the replayed trace, and its
 * scorer (calibrated from the file's same layer, or online as the prefill spans arrive). Each
 * layer's instance computes the same scores of every layer, so all keep the same set. */
static int create_layers(Trig *tr, const LayerView *L, RopeLayout pairing, KvErr *err)
{
    const TraceMeta *m = L->meta;
    (void)err;
    if (!L->trace && m->n_layers > 1) { /* closed loop: not applicable (policy.h, want_trace) */
        tr->base.want_trace = true;
        return 0;
    }
    tr->n_layers = L->trace ? m->n_layers : 1;
    tr->layer_scorer = kv_calloc((size_t)tr->n_layers, sizeof *tr->layer_scorer);
    tr->layer_q = kv_calloc((size_t)tr->n_layers, sizeof *tr->layer_q);
    tr->layer_k = kv_calloc((size_t)tr->n_layers, sizeof *tr->layer_k);
    size_t nq = (size_t)L->n_q_heads * L->n_tokens * L->head_dim;
    size_t nk = (size_t)L->n_kv_heads * L->n_tokens * L->head_dim;
    for (int l = 0; l < tr->n_layers; l++) {
        if (l == L->layer)
            continue;
        trig_scorer_init(&tr->layer_scorer[l], L->n_q_heads, L->head_dim, pairing,
                         trace_layer_geometry(m, l).rope_inv_freq);
        tr->layer_q[l] = kv_malloc(nq * sizeof(float));
        tr->layer_k[l] = kv_malloc(nk * sizeof(float));
        if (trace_read_layer(L->trace, l, tr->layer_q[l], tr->layer_k[l], NULL, err) != 0)
            return -1;
        if (tr->calibrated &&
            calibrate_from_file(&tr->layer_scorer[l], tr->prm.calibration, L, l, err) != 0)
            return -1;
    }
    return 0;
}

static Policy *trig_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)env;
    Trig *tr = kv_calloc(1, sizeof *tr);
    policy_base_init(&tr->base, &policy_trig, L);
    tr->prm = *(const TrigParams *)params;
    RopeLayout pairing = tr->prm.pairing == PAIRING_HALF          ? ROPE_HALF
                         : tr->prm.pairing == PAIRING_INTERLEAVED ? ROPE_INTERLEAVED
                                                                  : L->meta->rope_layout;
    trig_scorer_init(&tr->scorer, L->n_q_heads, L->head_dim, pairing, L->rope_inv_freq);
    if (!calibration_online(&tr->prm)) {
        if (calibrate_from_file(&tr->scorer, tr->prm.calibration, L, L->layer, err) != 0) {
            trig_destroy(&tr->base);
            return NULL;
        }
        tr->calibrated = true;
    }
    if (tr->prm.granularity == GRANULARITY_KVHEAD && create_layers(tr, L, pairing, err) != 0) {
        trig_destroy(&tr->base);
        return NULL;
    }
    return &tr->base;
}

/* Cached positions of KV head g that compete for the budget at token index t_index, ascending
 * (so that ties and float sums never depend on the cache's slot order), written to cand;
 * returns their count. */
static int gather_candidates(const Trig *tr, int g, int t_index, int *cand)
{
    const KVCache *c = &tr->base.cache[g];
    int recent_from = t_index - tr->prm.protect_recent + 1, n = 0;
    for (int pos = tr->prm.protect_initial; pos < recent_from; pos++)
        if (kvcache_has(c, pos))
            cand[n++] = pos;
    return n;
}

/* Combined score of KV head g's candidates, from the keys k ([n_kv_heads][T][D]) of a layer
 * and its scorer: S z-scored per query head over the candidates, then the max over the group's
 * query heads. keys and raw are scratch ([n][D], [group][n]). */
static void head_scores(const TrigScorer *sc, const float *k, const LayerView *L, int g,
                        const int *cand, int n, double t_pos, float *keys, float *raw, float *out)
{
    int D = L->head_dim, group = L->group;
    for (int j = 0; j < n; j++)
        memcpy(keys + (size_t)j * D, k + ((size_t)g * L->n_tokens + cand[j]) * D,
               (size_t)D * sizeof *keys);
    trig_scorer_score(sc, g * group, group, keys, n, t_pos, raw);
    for (int j = 0; j < n; j++)
        out[j] = -INFINITY;
    for (int i = 0; i < group; i++) {
        const float *row = raw + (size_t)i * n;
        double mean = gsl_stats_float_mean(row, 1, (size_t)n);
        double var = n > 1 ? gsl_stats_float_variance_m(row, 1, (size_t)n, mean) : 0.0;
        double inv_sd = 1.0 / sqrt(var + 1e-8);
        for (int j = 0; j < n; j++) {
            float z = (float)((row[j] - mean) * inv_sd);
            if (z > out[j])
                out[j] = z;
        }
    }
}

/* Best first; on equal scores the newer token is kept. */
static int ranked_cmp(const void *a, const void *b)
{
    const Ranked *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return (x->pos < y->pos) - (x->pos > y->pos);
}

/* Evicts the lowest-scoring candidates until `keep` of them remain, from the caches of KV heads
 * [g0, g1). */
static void evict_worst(Trig *tr, int g0, int g1, const int *cand, const float *score, int n,
                        int keep)
{
    Ranked *rank = kv_malloc((size_t)n * sizeof *rank);
    for (int j = 0; j < n; j++)
        rank[j] = (Ranked){score[j], cand[j]};
    qsort(rank, (size_t)n, sizeof *rank, ranked_cmp);
    for (int j = keep; j < n; j++)
        for (int g = g0; g < g1; g++)
            kvcache_remove(&tr->base.cache[g], rank[j].pos);
    free(rank);
}

/* Brings every cache over budget back to exactly budget: the protected tokens are those of
 * token index t_index, the score's current position is t_pos. */
static void prune(Trig *tr, const LayerView *L, int t_index, double t_pos)
{
    int G = L->n_kv_heads, D = L->head_dim;
    size_t cap = (size_t)tr->base.cache[0].n;
    for (int g = 1; g < G; g++)
        if ((size_t)tr->base.cache[g].n > cap)
            cap = (size_t)tr->base.cache[g].n;
    int *cand = kv_malloc(cap * sizeof *cand);
    float *keys = kv_malloc(cap * D * sizeof *keys);
    float *raw = kv_malloc(cap * L->group * sizeof *raw);
    float *score = kv_malloc(cap * sizeof *score);

    if (tr->prm.granularity == GRANULARITY_LAYER) {
        /* Every KV head holds the same set: rank it once on the mean over KV heads. */
        if (tr->base.cache[0].n > tr->prm.budget) {
            int n = gather_candidates(tr, 0, t_index, cand);
            int keep = tr->prm.budget - (tr->base.cache[0].n - n);
            float *mean = kv_calloc(cap, sizeof *mean);
            for (int g = 0; g < G; g++) {
                head_scores(&tr->scorer, L->k, L, g, cand, n, t_pos, keys, raw, score);
                for (int j = 0; j < n; j++)
                    mean[j] += score[j] / G;
            }
            evict_worst(tr, 0, G, cand, mean, n, keep);
            free(mean);
        }
    } else if (tr->prm.granularity == GRANULARITY_KVHEAD) {
        /* One set per KV head for every layer: each layer's scores averaged over the layers, in
         * layer order (every layer's instance adds the same numbers in the same order). */
        float *mean = kv_malloc(cap * sizeof *mean);
        for (int g = 0; g < G; g++) {
            if (tr->base.cache[g].n <= tr->prm.budget)
                continue;
            int n = gather_candidates(tr, g, t_index, cand);
            int keep = tr->prm.budget - (tr->base.cache[g].n - n);
            for (int j = 0; j < n; j++)
                mean[j] = 0;
            for (int l = 0; l < tr->n_layers; l++) {
                bool own = l == L->layer || tr->n_layers == 1;
                head_scores(own ? &tr->scorer : &tr->layer_scorer[l], own ? L->k : tr->layer_k[l],
                            L, g, cand, n, t_pos, keys, raw, score);
                for (int j = 0; j < n; j++)
                    mean[j] += score[j] / tr->n_layers;
            }
            evict_worst(tr, g, g + 1, cand, mean, n, keep);
        }
        free(mean);
    } else {
        for (int g = 0; g < G; g++) {
            if (tr->base.cache[g].n <= tr->prm.budget)
                continue;
            int n = gather_candidates(tr, g, t_index, cand);
            int keep = tr->prm.budget - (tr->base.cache[g].n - n);
            head_scores(&tr->scorer, L->k, L, g, cand, n, t_pos, keys, raw, score);
            evict_worst(tr, g, g + 1, cand, score, n, keep);
        }
    }
    free(cand);
    free(keys);
    free(raw);
    free(score);
}

static void trig_prefill(Policy *p, const PrefillView *pv)
{
    Trig *tr = (Trig *)p;
    const LayerView *L = pv->L;
    int c0 = pv->chunk_start, c1 = pv->chunk_end;
    if (!tr->calibrated) {
        trig_scorer_accumulate(&tr->scorer, L->q, L->n_tokens, c0, c1, L->meta->positions,
                               L->meta->rope_layout, L->rope_inv_freq);
        for (int l = 0; l < tr->n_layers; l++)
            if (tr->layer_q && tr->layer_q[l])
                trig_scorer_accumulate(&tr->layer_scorer[l], tr->layer_q[l], L->n_tokens, c0, c1,
                                       L->meta->positions, L->meta->rope_layout,
                                       trace_layer_geometry(L->meta, l).rope_inv_freq);
    }
    bool over = false;
    for (int g = 0; g < p->n_kv_heads; g++) {
        for (int j = c0; j < c1; j++)
            kvcache_add(&p->cache[g], j);
        over |= p->cache[g].n > tr->prm.budget;
    }
    if (tr->prm.schedule == SCHEDULE_HF)
        return; /* the HF forward never prunes on the prefill pass */
    /* A departure (docs/policies.md): the authors' code never prunes on the prefill pass and
     * pins the prompt; kvsim cuts a chunk that leaves a cache over the budget, so that the
     * budget holds at every decode step and prompt tokens compete on their scores. */
    if (over)
        prune(tr, L, c1 - 1, L->meta->positions[c1 - 1]);
    tr->since_prune = 0;
}

static void trig_step(Policy *p, const StepView *sv)
{
    Trig *tr = (Trig *)p;
    bool over = false;
    for (int g = 0; g < p->n_kv_heads; g++) {
        kvcache_add(&p->cache[g], sv->t);
        over |= p->cache[g].n > tr->prm.budget;
    }
    if (tr->prm.schedule == SCHEDULE_HF)
        return; /* pruned after the query (trig_observe) */
    tr->since_prune++;
    if (tr->since_prune >= tr->prm.divide_length && over) {
        prune(tr, sv->L, sv->t, sv->L->meta->positions[sv->t]);
        tr->since_prune = 0;
    }
}

/* schedule = hf: after query t attended, a cache that reached budget + divide_length tokens is
 * pruned to budget, scored at the next token's position (the HF code's absolute_position); every
 * KV head holds as many tokens, so the first decides. */
static void trig_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)attn;
    Trig *tr = (Trig *)p;
    if (tr->prm.schedule != SCHEDULE_HF ||
        p->cache[0].n < (long)tr->prm.budget + tr->prm.divide_length)
        return;
    prune(tr, sv->L, sv->t, sv->L->meta->positions[sv->t] + 1.0);
}

static void trig_destroy(Policy *p)
{
    Trig *tr = (Trig *)p;
    for (int l = 0; l < tr->n_layers; l++) {
        if (tr->layer_q[l])
            trig_scorer_free(&tr->layer_scorer[l]);
        free(tr->layer_q[l]);
        free(tr->layer_k[l]);
    }
    free(tr->layer_scorer);
    free(tr->layer_q);
    free(tr->layer_k);
    trig_scorer_free(&tr->scorer);
    policy_base_free(p);
    free(p);
}

static long trig_max_slots(const void *params, const LayerView *L, int t)
{
    const TrigParams *prm = params;
    (void)t;
    if (prm->schedule == SCHEDULE_MLX)
        return (long)prm->budget + prm->divide_length - 1;
    /* hf: below budget + divide_length after every query; a prefill span adds its tokens
     * unpruned, and the next decode token joins them before its query. */
    long longest = 0;
    for (int s = 0; s < L->meta->n_spans; s++)
        if (L->meta->spans[s].kind == SPAN_PREFILL &&
            L->meta->spans[s].end - L->meta->spans[s].start > longest)
            longest = L->meta->spans[s].end - L->meta->spans[s].start;
    return (long)prm->budget + prm->divide_length + longest;
}

static const char *const trig_conformance[] = {
    "budget=32 divide_length=8 protect_recent=8",
    "budget=32 divide_length=8 protect_recent=8 protect_initial=0 granularity=layer",
    "budget=32 divide_length=8 protect_recent=8 pairing=interleaved",
    "budget=32 divide_length=8 protect_recent=8 schedule=hf",
    "budget=32 divide_length=8 protect_recent=8 schedule=hf granularity=layer",
    "budget=32 divide_length=8 protect_recent=8 granularity=kvhead",
    "budget=32 divide_length=8 protect_recent=8 granularity=kvhead schedule=hf",
    NULL,
};

const PolicyType policy_trig = {
    .name = "trig",
    .description = "TriAttention: calibrated trigonometric key scores, pruned to `budget` every "
                   "`divide_length` tokens",
    .params_size = sizeof(TrigParams),
    .params = trig_params,
    .validate = trig_validate,
    .create = trig_create,
    .prefill = trig_prefill,
    .step = trig_step,
    .observe = trig_observe,
    .destroy = trig_destroy,
    .max_slots = trig_max_slots,
    .conformance = trig_conformance,
};
