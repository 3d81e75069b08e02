/* trig (TriAttention): the score's phase cancellation, its invariance under a position shift,
 * the pairing of the two RoPE layouts, and the pruning rules (what is protected, when a prune
 * happens, what it keeps), on layers built from pre-RoPE vectors rotated with rope_apply. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "policies/trig.h"
#include "tests/support/fixture.h"
#include "tests/support/scratch.h"

/* ---- Layers built from pre-RoPE vectors ---- */

typedef struct {
    Fixture *fx;
    float *q_pre, *k_pre; /* the vectors before RoPE, same layout as fx->q, fx->k */
} RopeLayer;

/* Moves the pair f of a half-layout vector, (f, f + D/2), to (2f, 2f + 1). */
static void half_to_interleaved(float *x, int D)
{
    float *tmp = kv_malloc((size_t)D * sizeof *tmp);
    for (int f = 0; f < D / 2; f++) {
        tmp[2 * f] = x[f];
        tmp[2 * f + 1] = x[f + D / 2];
    }
    memcpy(x, tmp, (size_t)D * sizeof *tmp);
    free(tmp);
}

/* Random pre-RoPE q, k, v (the same for a given seed whatever the layout and shift: an
 * interleaved layer holds the half layer's vectors with their pairs moved), queries biased
 * towards a per-head direction as real queries are, positions i + shift, then RoPE applied. */
static RopeLayer rope_layer(int Hq, int Hkv, int D, int T, int P, RopeLayout layout, int shift,
                            uint64_t seed)
{
    RopeLayer rl;
    Fixture *fx = rl.fx = fixture_new(Hq, Hkv, D, T, P);
    fixture_randomize(fx, seed, 1.0);
    for (int h = 0; h < Hq; h++)
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++)
                fx_q(fx, h, t)[d] += (float)(2.0 * cos(0.9 * d + 1.3 * h));
    fx->meta.rope_layout = layout;
    for (int t = 0; t < T; t++)
        fx->meta.positions[t] = t + shift;
    if (layout == ROPE_INTERLEAVED) {
        for (int h = 0; h < Hq; h++)
            for (int t = 0; t < T; t++)
                half_to_interleaved(fx_q(fx, h, t), D);
        for (int g = 0; g < Hkv; g++)
            for (int t = 0; t < T; t++)
                half_to_interleaved(fx_k(fx, g, t), D);
    }
    size_t nq = (size_t)Hq * T * D, nk = (size_t)Hkv * T * D;
    rl.q_pre = kv_malloc(nq * sizeof(float));
    rl.k_pre = kv_malloc(nk * sizeof(float));
    memcpy(rl.q_pre, fx->q, nq * sizeof(float));
    memcpy(rl.k_pre, fx->k, nk * sizeof(float));
    for (int h = 0; h < Hq; h++)
        for (int t = 0; t < T; t++)
            rope_apply(fx_q(fx, h, t), D, layout, fx->meta.rope_inv_freq, fx->meta.positions[t]);
    for (int g = 0; g < Hkv; g++)
        for (int t = 0; t < T; t++)
            rope_apply(fx_k(fx, g, t), D, layout, fx->meta.rope_inv_freq, fx->meta.positions[t]);
    return rl;
}

static void rope_layer_free(RopeLayer *rl)
{
    fixture_free(rl->fx);
    free(rl->q_pre);
    free(rl->k_pre);
}

static const float *pre_k(const RopeLayer *rl, int g, int t)
{
    const LayerView *L = &rl->fx->L;
    return rl->k_pre + ((size_t)g * L->n_tokens + t) * L->head_dim;
}

/* Scales the keys of the tokens for which `pick(t)` holds, so that their score is near zero
 * (below the mean of the others): the tokens a prune would take first. */
static void shrink_keys(RopeLayer *rl, int (*pick)(int t))
{
    const LayerView *L = &rl->fx->L;
    for (int g = 0; g < L->n_kv_heads; g++)
        for (int t = 0; t < L->n_tokens; t++)
            if (pick(t))
                for (int d = 0; d < L->head_dim; d++) {
                    fx_k(rl->fx, g, t)[d] *= 1e-3f;
                    rl->k_pre[((size_t)g * L->n_tokens + t) * L->head_dim + d] *= 1e-3f;
                }
}

/* ---- The score, straight from its definition, on pre-RoPE keys ---- */

/* Per query head and pair: E q_f and E|q_f| of pre-RoPE queries [0, n_used). */
typedef struct {
    double *re, *im, *abs; /* [Hq][D/2] */
} QueryStats;

static QueryStats query_stats(const float *q_pre, int Hq, int T, int D, int n_used,
                              RopeLayout pairing)
{
    int F = D / 2;
    QueryStats qs = {kv_calloc((size_t)Hq * F, sizeof(double)),
                     kv_calloc((size_t)Hq * F, sizeof(double)),
                     kv_calloc((size_t)Hq * F, sizeof(double))};
    for (int h = 0; h < Hq; h++)
        for (int j = 0; j < n_used; j++)
            for (int f = 0; f < F; f++) {
                int i0, i1;
                rope_pair(pairing, D, f, &i0, &i1);
                const float *x = q_pre + ((size_t)h * T + j) * D;
                qs.re[h * F + f] += x[i0] / (double)n_used;
                qs.im[h * F + f] += x[i1] / (double)n_used;
                qs.abs[h * F + f] += hypot(x[i0], x[i1]) / n_used;
            }
    return qs;
}

static void query_stats_free(QueryStats *qs)
{
    free(qs->re);
    free(qs->im);
    free(qs->abs);
}

/* S of a key given before RoPE at position p, with the relative phase ω(t + δ − p) explicit. */
static double reference_score(const QueryStats *qs, int h, const double *inv_freq, int D,
                              RopeLayout pairing, const float *k_pre, double p, double t)
{
    int F = D / 2;
    double trig = 0, radial = 0;
    for (int f = 0; f < F; f++) {
        int i0, i1;
        rope_pair(pairing, D, f, &i0, &i1);
        double q_abs = hypot(qs->re[h * F + f], qs->im[h * F + f]);
        double q_arg = atan2(qs->im[h * F + f], qs->re[h * F + f]);
        double k_abs = hypot(k_pre[i0], k_pre[i1]), k_arg = atan2(k_pre[i1], k_pre[i0]);
        for (int e = 0; e < 17; e++) {
            double delta = pow(2.0, e);
            trig += q_abs * k_abs * cos(inv_freq[f] * (t + delta - p) + q_arg - k_arg);
        }
        radial += (qs->abs[h * F + f] - q_abs) * k_abs;
    }
    return trig / 17 + radial;
}

static TrigScorer scorer_from(const QueryStats *qs, int Hq, int D, RopeLayout pairing,
                              const double *inv_freq)
{
    TrigScorer s;
    trig_scorer_init(&s, Hq, D, pairing, inv_freq);
    memcpy(s.mean_re, qs->re, (size_t)Hq * (D / 2) * sizeof(double));
    memcpy(s.mean_im, qs->im, (size_t)Hq * (D / 2) * sizeof(double));
    memcpy(s.mean_abs, qs->abs, (size_t)Hq * (D / 2) * sizeof(double));
    return s;
}

/* The fast score of post-RoPE keys equals the definition on pre-RoPE keys with the relative
 * phase applied explicitly, for both layouts and far-apart positions. */
static void test_phase_cancellation(void **state)
{
    (void)state;
    const int Hq = 2, Hkv = 1, D = 16, T = 40;
    const int positions[] = {0, 5, 300, 4096, 70000};
    for (int layout = ROPE_HALF; layout <= ROPE_INTERLEAVED; layout++) {
        RopeLayer rl = rope_layer(Hq, Hkv, D, T, T, (RopeLayout)layout, 0, 11);
        const double *inv_freq = rl.fx->meta.rope_inv_freq;
        QueryStats qs = query_stats(rl.q_pre, Hq, T, D, T, (RopeLayout)layout);
        TrigScorer s = scorer_from(&qs, Hq, D, (RopeLayout)layout, inv_freq);
        float post[5 * 16], out[2 * 5];
        for (int j = 0; j < 5; j++) {
            memcpy(post + j * D, pre_k(&rl, 0, j), (size_t)D * sizeof(float));
            rope_apply(post + j * D, D, (RopeLayout)layout, inv_freq, positions[j]);
        }
        for (double t = 70001; t <= 70301; t += 300) {
            trig_scorer_score(&s, 0, Hq, post, 5, t, out);
            for (int h = 0; h < Hq; h++)
                for (int j = 0; j < 5; j++) {
                    double want = reference_score(&qs, h, inv_freq, D, (RopeLayout)layout,
                                                  pre_k(&rl, 0, j), positions[j], t);
                    assert_float_equal(out[h * 5 + j], want, 1e-3 * (1 + fabs(want)));
                }
        }
        trig_scorer_free(&s);
        query_stats_free(&qs);
        rope_layer_free(&rl);
    }
}

/* Calibration rotates stored queries back by their positions with the trace's RoPE, and pairs
 * the recovered vectors as the scorer says (here also across layouts). */
static void test_calibration_recovers_pre_rope_statistics(void **state)
{
    (void)state;
    const int Hq = 3, D = 8, T = 30, used = 25;
    for (int layout = ROPE_HALF; layout <= ROPE_INTERLEAVED; layout++) {
        RopeLayer rl = rope_layer(Hq, 1, D, T, T, (RopeLayout)layout, 0, 5);
        Fixture *fx = rl.fx;
        /* Non-contiguous positions: the rotation must use them, not the indices. */
        for (int t = 0; t < T; t++) {
            fx->meta.positions[t] = 37 + 3 * t;
            for (int h = 0; h < Hq; h++) {
                float *x = fx_q(fx, h, t);
                memcpy(x, rl.q_pre + ((size_t)h * T + t) * D, (size_t)D * sizeof(float));
                rope_apply(x, D, (RopeLayout)layout, fx->meta.rope_inv_freq,
                           fx->meta.positions[t]);
            }
        }
        for (int pairing = ROPE_HALF; pairing <= ROPE_INTERLEAVED; pairing++) {
            QueryStats want = query_stats(rl.q_pre, Hq, T, D, used, (RopeLayout)pairing);
            TrigScorer s;
            trig_scorer_init(&s, Hq, D, (RopeLayout)pairing, fx->meta.rope_inv_freq);
            trig_scorer_calibrate(&s, fx->q, T, used, fx->meta.positions, (RopeLayout)layout,
                                  fx->meta.rope_inv_freq);
            for (int i = 0; i < Hq * D / 2; i++) {
                assert_float_equal(s.mean_re[i], want.re[i], 1e-5);
                assert_float_equal(s.mean_im[i], want.im[i], 1e-5);
                assert_float_equal(s.mean_abs[i], want.abs[i], 1e-5);
            }
            trig_scorer_free(&s);
            query_stats_free(&want);
        }
        rope_layer_free(&rl);
    }
}

/* The layouts are the same thing with the dimensions permuted: equal scores. A score that pairs
 * the dimensions against the trace's layout (the MLX port's defect) loses the invariance under
 * a shift of every position. */
static void test_layouts_and_mismatched_pairing(void **state)
{
    (void)state;
    const int Hq = 2, D = 16, T = 60, n = 20, shift = 777;
    RopeLayer half = rope_layer(Hq, 1, D, T, T, ROPE_HALF, 0, 21);
    RopeLayer inter = rope_layer(Hq, 1, D, T, T, ROPE_INTERLEAVED, 0, 21);
    RopeLayer half_shifted = rope_layer(Hq, 1, D, T, T, ROPE_HALF, shift, 21);
    const double *inv_freq = half.fx->meta.rope_inv_freq;
    float out_half[2 * 20], out_inter[2 * 20], out_shifted[2 * 20];

    TrigScorer sh, si;
    trig_scorer_init(&sh, Hq, D, ROPE_HALF, inv_freq);
    trig_scorer_init(&si, Hq, D, ROPE_INTERLEAVED, inv_freq);
    trig_scorer_calibrate(&sh, half.fx->q, T, T, half.fx->meta.positions, ROPE_HALF, inv_freq);
    trig_scorer_calibrate(&si, inter.fx->q, T, T, inter.fx->meta.positions, ROPE_INTERLEAVED,
                          inv_freq);
    trig_scorer_score(&sh, 0, Hq, fx_k(half.fx, 0, 0), n, T - 1, out_half);
    trig_scorer_score(&si, 0, Hq, fx_k(inter.fx, 0, 0), n, T - 1, out_inter);
    for (int i = 0; i < Hq * n; i++)
        assert_float_equal(out_half[i], out_inter[i], 1e-4 * (1 + fabsf(out_half[i])));

    /* Correct pairing: shifting every position (queries and keys) changes nothing. */
    TrigScorer shs;
    trig_scorer_init(&shs, Hq, D, ROPE_HALF, inv_freq);
    trig_scorer_calibrate(&shs, half_shifted.fx->q, T, T, half_shifted.fx->meta.positions,
                          ROPE_HALF, inv_freq);
    trig_scorer_score(&shs, 0, Hq, fx_k(half_shifted.fx, 0, 0), n, T - 1 + shift, out_shifted);
    for (int i = 0; i < Hq * n; i++)
        assert_float_equal(out_half[i], out_shifted[i], 1e-3 * (1 + fabsf(out_half[i])));

    /* Interleaved pairs on a half-layout trace: the shift changes the scores. */
    TrigScorer bad, bad_shifted;
    trig_scorer_init(&bad, Hq, D, ROPE_INTERLEAVED, inv_freq);
    trig_scorer_init(&bad_shifted, Hq, D, ROPE_INTERLEAVED, inv_freq);
    trig_scorer_calibrate(&bad, half.fx->q, T, T, half.fx->meta.positions, ROPE_HALF, inv_freq);
    trig_scorer_calibrate(&bad_shifted, half_shifted.fx->q, T, T,
                          half_shifted.fx->meta.positions, ROPE_HALF, inv_freq);
    trig_scorer_score(&bad, 0, Hq, fx_k(half.fx, 0, 0), n, T - 1, out_half);
    trig_scorer_score(&bad_shifted, 0, Hq, fx_k(half_shifted.fx, 0, 0), n, T - 1 + shift,
                      out_shifted);
    double worst = 0;
    for (int i = 0; i < Hq * n; i++)
        worst = fmax(worst, fabs(out_half[i] - out_shifted[i]) / (1 + fabs(out_half[i])));
    assert_true(worst > 0.05);

    trig_scorer_free(&sh);
    trig_scorer_free(&si);
    trig_scorer_free(&shs);
    trig_scorer_free(&bad);
    trig_scorer_free(&bad_shifted);
    rope_layer_free(&half);
    rope_layer_free(&inter);
    rope_layer_free(&half_shifted);
}

/* ---- Runs of the policy, recorded step by step ---- */

typedef struct {
    int P, T, Hkv;
    unsigned char *in; /* [T - P][Hkv][T]: position cached at step t */
    int *n;            /* [T - P][Hkv]: slots at step t */
} Record;

static void record_step(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    Record *r = ud;
    for (int g = 0; g < r->Hkv; g++) {
        const KVCache *c = &p->cache[g];
        unsigned char *row = r->in + ((size_t)(t - r->P) * r->Hkv + g) * r->T;
        for (int i = 0; i < c->n; i++) {
            assert_true(c->pos[i] >= 0 && c->pos[i] <= t);
            row[c->pos[i]] = 1;
        }
        r->n[(t - r->P) * r->Hkv + g] = c->n;
    }
}

static Record run_recorded(RopeLayer *rl, const char *params)
{
    const LayerView *L = &rl->fx->L;
    Record r = {L->n_prompt, L->n_tokens, L->n_kv_heads, NULL, NULL};
    size_t steps = (size_t)(r.T - r.P);
    r.in = kv_calloc(steps * r.Hkv * r.T, 1);
    r.n = kv_calloc(steps * r.Hkv, sizeof *r.n);
    Policy *p = fixture_policy(rl->fx, "trig", params, 1);
    fixture_run(rl->fx, p, r.T, record_step, &r);
    p->type->destroy(p);
    return r;
}

static const unsigned char *rec_set(const Record *r, int t, int g)
{
    return r->in + ((size_t)(t - r->P) * r->Hkv + g) * r->T;
}

static int rec_n(const Record *r, int t, int g) { return r->n[(t - r->P) * r->Hkv + g]; }

static void record_free(Record *r)
{
    free(r->in);
    free(r->n);
}

static int pick_early_and_every_third(int t) { return t < 4 || t % 3 == 0; }

/* Shifting every position by a constant (same pre-RoPE vectors) keeps the same tokens at every
 * step, in both granularities; the same shift changes them when the pairing is wrong. */
static void test_shift_keeps_same_set(void **state)
{
    (void)state;
    const int Hq = 4, Hkv = 2, D = 16, T = 220, P = 70;
    const char *params[] = {
        "budget=40 divide_length=16 protect_initial=2 protect_recent=8",
        "budget=40 divide_length=16 protect_initial=2 protect_recent=8 granularity=layer",
    };
    RopeLayer a = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 0, 31);
    RopeLayer b = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 1000, 31);
    for (int i = 0; i < 2; i++) {
        Record ra = run_recorded(&a, params[i]), rb = run_recorded(&b, params[i]);
        int evicted = 0;
        for (int t = P; t < T; t++)
            for (int g = 0; g < Hkv; g++) {
                assert_memory_equal(rec_set(&ra, t, g), rec_set(&rb, t, g), (size_t)T);
                evicted += t + 1 - rec_n(&ra, t, g);
            }
        assert_true(evicted > 0);
        record_free(&ra);
        record_free(&rb);
    }
    Record ra = run_recorded(&a, "budget=40 divide_length=16 protect_initial=2 protect_recent=8 "
                                 "pairing=interleaved");
    Record rb = run_recorded(&b, "budget=40 divide_length=16 protect_initial=2 protect_recent=8 "
                                 "pairing=interleaved");
    assert_memory_not_equal(ra.in, rb.in, (size_t)(T - P) * Hkv * T);
    record_free(&ra);
    record_free(&rb);
    rope_layer_free(&a);
    rope_layer_free(&b);
}

/* The same layer in the interleaved layout keeps the same tokens as in the half layout. */
static void test_interleaved_trace_keeps_same_set(void **state)
{
    (void)state;
    const int Hq = 4, Hkv = 2, D = 16, T = 200, P = 60;
    RopeLayer half = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 0, 41);
    RopeLayer inter = rope_layer(Hq, Hkv, D, T, P, ROPE_INTERLEAVED, 0, 41);
    const char *params = "budget=32 divide_length=8 protect_initial=2 protect_recent=6";
    Record rh = run_recorded(&half, params), ri = run_recorded(&inter, params);
    assert_memory_equal(rh.in, ri.in, (size_t)(T - P) * Hkv * T);
    assert_true(rec_n(&rh, T - 1, 0) < T);
    record_free(&rh);
    record_free(&ri);
    rope_layer_free(&half);
    rope_layer_free(&inter);
}

/* Tokens 0..protect_initial-1 and the last protect_recent tokens are cached at every step even
 * when their keys score lowest; without the protection those same tokens are evicted. */
static void test_protected_tokens_stay(void **state)
{
    (void)state;
    const int Hq = 4, Hkv = 2, D = 16, T = 240, P = 50;
    RopeLayer rl = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 0, 51);
    shrink_keys(&rl, pick_early_and_every_third);
    for (int variant = 0; variant < 2; variant++) {
        int initial = variant == 0 ? 4 : 0, recent = variant == 0 ? 10 : 1;
        char params[128];
        snprintf(params, sizeof params,
                 "budget=30 divide_length=12 protect_initial=%d protect_recent=%d", initial,
                 recent);
        Record r = run_recorded(&rl, params);
        int initial_missing = 0, recent_missing = 0;
        for (int t = P; t < T; t++)
            for (int g = 0; g < Hkv; g++) {
                const unsigned char *in = rec_set(&r, t, g);
                for (int j = 0; j < 4; j++)
                    initial_missing += !in[j];
                for (int j = t - 9; j <= t; j++)
                    recent_missing += !in[j];
            }
        if (variant == 0) {
            assert_int_equal(initial_missing, 0);
            assert_int_equal(recent_missing, 0);
        } else {
            assert_true(initial_missing > 0);
            assert_true(recent_missing > 0);
        }
        record_free(&r);
    }
    rope_layer_free(&rl);
}

/* Expected cache after a prune at token index t of a cache holding `before`, scored at
 * position `now`: the protected tokens plus the best-scoring others by the definition (z-score
 * per query head, max over the group, mean over KV heads for granularity=layer; the newer token
 * wins a tie). */
static void expected_after_prune(const RopeLayer *rl, const QueryStats *qs, int g0, int g1,
                                 const unsigned char *before, int t, double now, int budget,
                                 int initial, int recent, unsigned char *want)
{
    const LayerView *L = &rl->fx->L;
    int T = L->n_tokens, D = L->head_dim, group = L->group;
    int *cand = kv_malloc((size_t)T * sizeof *cand);
    double *combined = kv_calloc((size_t)T, sizeof *combined);
    double *raw = kv_malloc((size_t)T * sizeof *raw);
    double *best = kv_malloc((size_t)T * sizeof *best);
    int n = 0, n_cached = 0;
    memset(want, 0, (size_t)T);
    for (int j = 0; j <= t; j++) {
        if (!before[j])
            continue;
        n_cached++;
        if (j < initial || j > t - recent)
            want[j] = 1;
        else
            cand[n++] = j;
    }
    for (int g = g0; g < g1; g++) {
        for (int j = 0; j < n; j++)
            best[j] = -INFINITY;
        for (int h = g * group; h < (g + 1) * group; h++) {
            double mean = 0, var = 0;
            for (int j = 0; j < n; j++) {
                raw[j] = reference_score(qs, h, L->meta->rope_inv_freq, D, L->meta->rope_layout,
                                         pre_k(rl, g, cand[j]), L->meta->positions[cand[j]],
                                         now);
                mean += raw[j] / n;
            }
            for (int j = 0; j < n; j++)
                var += (raw[j] - mean) * (raw[j] - mean) / (n - 1);
            for (int j = 0; j < n; j++)
                best[j] = fmax(best[j], (raw[j] - mean) / sqrt(var + 1e-8));
        }
        for (int j = 0; j < n; j++)
            combined[j] += best[j] / (g1 - g0);
    }
    int keep = budget - (n_cached - n);
    for (int kept = 0; kept < keep; kept++) {
        int top = -1;
        for (int j = 0; j < n; j++)
            if (!want[cand[j]] && (top < 0 || combined[j] >= combined[top]))
                top = j;
        want[cand[top]] = 1;
    }
    free(cand);
    free(combined);
    free(raw);
    free(best);
}

/* Prunes happen only once divide_length tokens arrived since the previous one (the end of
 * prefill counts as one) and only when a cache is over budget, never later than that, leave
 * exactly `budget` tokens, and keep what the definition of the score ranks best. A prompt
 * longer than the budget is pruned at the end of prefill. */
static void check_pruning(int P, const char *granularity)
{
    const int Hq = 4, Hkv = 2, D = 16, T = 260, budget = 64, dl = 16, initial = 3, recent = 12;
    RopeLayer rl = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 5, 61);
    char params[160];
    snprintf(params, sizeof params,
             "budget=%d divide_length=%d protect_initial=%d protect_recent=%d granularity=%s",
             budget, dl, initial, recent, granularity);
    bool layer = strcmp(granularity, "layer") == 0;
    Record r = run_recorded(&rl, params);
    QueryStats qs = query_stats(rl.q_pre, Hq, T, D, P, ROPE_HALF);
    unsigned char *before = kv_malloc((size_t)T), *want = kv_malloc((size_t)T);

    /* After prefill: all of the prompt, or its pruned version when it is longer than budget. */
    for (int g = 0; g < Hkv; g++) {
        if (P <= budget) {
            assert_int_equal(rec_n(&r, P, g), P + 1);
            continue;
        }
        assert_int_equal(rec_n(&r, P, g), budget + 1);
        memset(before, 0, (size_t)T);
        memset(before, 1, (size_t)P);
        expected_after_prune(&rl, &qs, layer ? 0 : g, layer ? Hkv : g + 1, before, P - 1,
                             rl.fx->meta.positions[P - 1], budget, initial, recent, want);
        want[P] = 1;
        assert_memory_equal(rec_set(&r, P, g), want, (size_t)T);
    }

    int last_prune = P - 1, prunes = 0;
    for (int t = P + 1; t < T; t++) {
        for (int g = 0; g < Hkv; g++) {
            int grown = rec_n(&r, t - 1, g) + 1;
            bool due = t - last_prune >= dl && grown > budget;
            assert_true(rec_n(&r, t, g) <= budget + dl - 1);
            if (!due) {
                assert_int_equal(rec_n(&r, t, g), grown);
                continue;
            }
            assert_int_equal(rec_n(&r, t, g), budget);
            memcpy(before, rec_set(&r, t - 1, g), (size_t)T);
            before[t] = 1;
            expected_after_prune(&rl, &qs, layer ? 0 : g, layer ? Hkv : g + 1, before, t,
                                 rl.fx->meta.positions[t], budget, initial, recent, want);
            assert_memory_equal(rec_set(&r, t, g), want, (size_t)T);
        }
        if (rec_n(&r, t, 0) == budget && rec_n(&r, t - 1, 0) + 1 > budget) {
            prunes++;
            last_prune = t;
        }
    }
    assert_true(prunes >= 8);
    free(before);
    free(want);
    query_stats_free(&qs);
    record_free(&r);
    rope_layer_free(&rl);
}

static void test_pruning_rules_short_prompt(void **state)
{
    (void)state;
    check_pruning(40, "head");
    check_pruning(40, "layer");
}

static void test_pruning_rules_long_prompt(void **state)
{
    (void)state;
    check_pruning(100, "head");
    check_pruning(100, "layer");
}

/* schedule = hf (the authors' HF forward): the prefill is never pruned, so the first decode
 * query attends over the whole prompt; after query t attended, a cache of budget +
 * divide_length tokens is pruned to budget, scored at the next token's position, and the next
 * query sees those plus its own token: at attention a cache holds budget + 1 to budget +
 * divide_length tokens once it first got there. */
static void check_hf_schedule(int P, const char *granularity)
{
    const int Hq = 4, Hkv = 2, D = 16, T = 260, budget = 64, dl = 16, initial = 3, recent = 12;
    RopeLayer rl = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 5, 61);
    char params[192];
    snprintf(params, sizeof params,
             "budget=%d divide_length=%d protect_initial=%d protect_recent=%d granularity=%s "
             "schedule=hf",
             budget, dl, initial, recent, granularity);
    bool layer = strcmp(granularity, "layer") == 0;
    Record r = run_recorded(&rl, params);
    QueryStats qs = query_stats(rl.q_pre, Hq, T, D, P, ROPE_HALF);
    unsigned char *want = kv_malloc((size_t)T);
    int prunes = 0;
    for (int g = 0; g < Hkv; g++)
        assert_int_equal(rec_n(&r, P, g), P + 1);
    for (int t = P + 1; t < T; t++) {
        bool pruned = rec_n(&r, t - 1, 0) >= budget + dl;
        prunes += pruned;
        for (int g = 0; g < Hkv; g++) {
            assert_int_equal(rec_n(&r, t, g), (pruned ? budget : rec_n(&r, t - 1, g)) + 1);
            if (!pruned)
                continue;
            expected_after_prune(&rl, &qs, layer ? 0 : g, layer ? Hkv : g + 1,
                                 rec_set(&r, t - 1, g), t - 1, rl.fx->meta.positions[t - 1] + 1.0,
                                 budget, initial, recent, want);
            want[t] = 1;
            assert_memory_equal(rec_set(&r, t, g), want, (size_t)T);
        }
    }
    assert_true(prunes >= 8);
    free(want);
    query_stats_free(&qs);
    record_free(&r);
    rope_layer_free(&rl);
}

static void test_hf_schedule(void **state)
{
    (void)state;
    check_hf_schedule(40, "head");
    check_hf_schedule(100, "head");
    check_hf_schedule(100, "layer");
}

/* granularity = kvhead: one token set per KV head shared by every layer. Each layer of a
 * 3-layer trace is driven by its own instance (over its own layer, the trace at hand for the
 * others): at every step all layers hold the same sets, which granularity = head does not; and
 * the prompt's prune keeps, of each KV head's candidates, the best by the mean over the layers
 * of each layer's score (z-scored per query head, max over the group), computed here from the
 * scorer's public interface. */
enum { KV_LAYERS = 3, KV_HQ = 4, KV_HKV = 2, KV_D = 16, KV_T = 120, KV_P = 60 };

typedef struct {
    unsigned char *sets; /* [T][Hkv][T] the cache of each KV head at each decode step */
} KvheadRecord;

static void record_sets(int t, const Policy *p, const float *full_attn, void *ud)
{
    (void)full_attn;
    KvheadRecord *r = ud;
    for (int g = 0; g < p->n_kv_heads; g++)
        for (int j = 0; j < KV_T; j++)
            r->sets[((size_t)t * KV_HKV + g) * KV_T + j] = kvcache_has(&p->cache[g], j);
}

static void run_layers(Trace *tr, const char *params, KvheadRecord *rec)
{
    const TraceMeta *m = trace_meta(tr);
    for (int l = 0; l < KV_LAYERS; l++) {
        Fixture *fx = fixture_new(KV_HQ, KV_HKV, KV_D, KV_T, KV_P);
        KvErr err;
        if (trace_read_layer(tr, l, fx->q, fx->k, fx->v, &err) != 0)
            fail_msg("%s", err.msg);
        fx->L.meta = m;
        fx->L.layer = l;
        fx->L.trace = tr;
        rec[l].sets = kv_calloc((size_t)KV_T * KV_HKV * KV_T, 1);
        Policy *p = fixture_policy(fx, "trig", params, 3);
        fixture_run(fx, p, KV_T, record_sets, &rec[l]);
        p->type->destroy(p);
        fixture_free(fx);
    }
}

static void test_kvhead_granularity(void **state)
{
    (void)state;
    const int budget = 32, initial = 2, recent = 6;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "layers.h5", 0);
    Fixture *fx = fixture_new(KV_HQ, KV_HKV, KV_D, KV_T, KV_P);
    fixture_write_trace(fx, KV_LAYERS, 91, path);
    fixture_free(fx);
    KvErr err;
    Trace *tr = trace_open(path, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    const TraceMeta *m = trace_meta(tr);
    KvheadRecord shared[KV_LAYERS], own[KV_LAYERS];
    const char *base = "budget=32 divide_length=8 protect_initial=2 protect_recent=6";
    char params[160];
    snprintf(params, sizeof params, "%s granularity=kvhead", base);
    run_layers(tr, params, shared);
    snprintf(params, sizeof params, "%s granularity=head", base);
    run_layers(tr, params, own);
    size_t n = (size_t)KV_T * KV_HKV * KV_T;
    int differing = 0;
    for (int l = 1; l < KV_LAYERS; l++) {
        assert_memory_equal(shared[l].sets, shared[0].sets, n);
        differing += memcmp(own[l].sets, own[0].sets, n) != 0;
    }
    assert_true(differing > 0);

    /* The prompt's prune (at index P - 1), recomputed. */
    int group = KV_HQ / KV_HKV;
    float *q = kv_malloc((size_t)KV_HQ * KV_T * KV_D * sizeof *q);
    float *k = kv_malloc((size_t)KV_HKV * KV_T * KV_D * sizeof *k);
    int n_cand = KV_P - recent - initial, keep = budget - initial - recent;
    for (int g = 0; g < KV_HKV; g++) {
        double mean[KV_P] = {0};
        for (int l = 0; l < KV_LAYERS; l++) {
            if (trace_read_layer(tr, l, q, k, NULL, &err) != 0)
                fail_msg("%s", err.msg);
            const double *inv_freq = trace_layer_geometry(m, l).rope_inv_freq;
            TrigScorer sc;
            trig_scorer_init(&sc, KV_HQ, KV_D, m->rope_layout, inv_freq);
            trig_scorer_calibrate(&sc, q, KV_T, KV_P, m->positions, m->rope_layout, inv_freq);
            float keys[KV_P * KV_D], raw[4 * KV_P];
            for (int j = 0; j < n_cand; j++)
                memcpy(keys + (size_t)j * KV_D, k + ((size_t)g * KV_T + initial + j) * KV_D,
                       KV_D * sizeof(float));
            trig_scorer_score(&sc, g * group, group, keys, n_cand, m->positions[KV_P - 1], raw);
            double best[KV_P];
            for (int j = 0; j < n_cand; j++)
                best[j] = -INFINITY;
            for (int i = 0; i < group; i++) {
                double mu = 0, var = 0;
                for (int j = 0; j < n_cand; j++)
                    mu += raw[i * n_cand + j] / n_cand;
                for (int j = 0; j < n_cand; j++)
                    var += (raw[i * n_cand + j] - mu) * (raw[i * n_cand + j] - mu) / (n_cand - 1);
                for (int j = 0; j < n_cand; j++)
                    best[j] = fmax(best[j], (raw[i * n_cand + j] - mu) / sqrt(var + 1e-8));
            }
            for (int j = 0; j < n_cand; j++)
                mean[j] += best[j] / KV_LAYERS;
            trig_scorer_free(&sc);
        }
        /* The kept candidates are the `keep` best (a tie: the newer). */
        const unsigned char *set = shared[0].sets + ((size_t)KV_P * KV_HKV + g) * KV_T;
        int kept = 0;
        for (int j = 0; j < n_cand; j++) {
            int better = 0;
            for (int i = 0; i < n_cand; i++)
                better += mean[i] > mean[j] || (mean[i] == mean[j] && i > j);
            if (set[initial + j] != (better < keep))
                fail_msg("KV head %d, token %d: kept %d, but %d candidates rank above it (keep %d)",
                         g, initial + j, set[initial + j], better, keep);
            kept += set[initial + j];
        }
        assert_int_equal(kept, keep);
    }
    free(q);
    free(k);
    for (int l = 0; l < KV_LAYERS; l++) {
        free(shared[l].sets);
        free(own[l].sets);
    }
    trace_close(tr);
    scratch_remove(dir);
}

/* granularity=layer: every KV head holds the same tokens at every step; per head they differ. */
static void test_layer_granularity_one_set(void **state)
{
    (void)state;
    const int Hq = 8, Hkv = 4, D = 16, T = 200, P = 60;
    RopeLayer rl = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 0, 71);
    const char *base = "budget=30 divide_length=10 protect_initial=2 protect_recent=5";
    char params[160];
    for (int layer = 0; layer < 2; layer++) {
        snprintf(params, sizeof params, "%s granularity=%s", base, layer ? "layer" : "head");
        Record r = run_recorded(&rl, params);
        int differing = 0;
        for (int t = P; t < T; t++)
            for (int g = 1; g < Hkv; g++)
                differing += memcmp(rec_set(&r, t, 0), rec_set(&r, t, g), (size_t)T) != 0;
        if (layer)
            assert_int_equal(differing, 0);
        else
            assert_true(differing > 0);
        record_free(&r);
    }
    rope_layer_free(&rl);
}

/* Zero keys all score 0: a prune then keeps the newest candidates, so the cache after each
 * prune is the protected tokens plus the most recent others. */
static void test_ties_keep_newer(void **state)
{
    (void)state;
    const int Hq = 2, Hkv = 1, D = 8, T = 120, P = 30, budget = 20, initial = 2;
    RopeLayer rl = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 0, 81);
    memset(rl.fx->k, 0, (size_t)Hkv * T * D * sizeof(float));
    Record r = run_recorded(&rl, "budget=20 divide_length=8 protect_initial=2 protect_recent=4");
    int prunes = 0;
    for (int t = P; t < T; t++) {
        int n = rec_n(&r, t, 0);
        if (n != budget)
            continue;
        prunes++;
        const unsigned char *in = rec_set(&r, t, 0);
        for (int j = 0; j <= t; j++)
            assert_int_equal(in[j], j < initial || j > t - (budget - initial));
    }
    assert_true(prunes >= 5);
    record_free(&r);
    rope_layer_free(&rl);
}

/* Writes a 2-layer calibration trace of T_cal tokens (n_prompt T_cal/2, positions 500 + 2j,
 * the layout of rl) whose layer l holds, before RoPE, the queries of tokens
 * [first[l], first[l] + T_cal) of rl. */
static void write_calibration(const RopeLayer *rl, const char *path, int T_cal, const int first[2])
{
    const LayerView *L = &rl->fx->L;
    int Hq = L->n_q_heads, Hkv = L->n_kv_heads, D = L->head_dim, T = L->n_tokens;
    TraceMeta m;
    TraceModel model = {
        .model = "calibration", .generator = "test_trig", .n_layers = 2, .n_q_heads = Hq,
        .n_kv_heads = Hkv, .head_dim = D, .rope_theta = 10000.0,
        .rope_layout = L->meta->rope_layout, .attn_scale = attn_scale_default(D),
    };
    trace_meta_init(&m, &model, T_cal, T_cal / 2, 0, 0, 0);
    for (int j = 0; j < T_cal; j++)
        m.positions[j] = 500 + 2 * j;
    KvErr err;
    TraceWriter *w = trace_writer_create(path, &m, TRACE_F32, &err);
    if (!w)
        fail_msg("%s", err.msg);
    float *q = kv_malloc((size_t)Hq * T_cal * D * sizeof *q);
    float *kv = kv_calloc((size_t)Hkv * T_cal * D, sizeof *kv);
    for (int layer = 0; layer < 2; layer++) {
        for (int h = 0; h < Hq; h++)
            for (int j = 0; j < T_cal; j++) {
                float *x = q + ((size_t)h * T_cal + j) * D;
                memcpy(x, rl->q_pre + ((size_t)h * T + first[layer] + j) * D,
                       (size_t)D * sizeof *x);
                rope_apply(x, D, m.rope_layout, trace_layer_geometry(&m, layer).rope_inv_freq,
                           m.positions[j]);
            }
        if (trace_writer_put_qkv(w, layer, 0, T_cal, q, kv, kv, &err) != 0)
            fail_msg("%s", err.msg);
    }
    if (trace_writer_finish(w, &err) != 0)
        fail_msg("%s", err.msg);
    free(q);
    free(kv);
    trace_meta_free(&m);
}

/* calibration = FILE: the statistics come from every query of the same layer of another trace
 * (rotated back by that trace's own positions). A file whose queries are the prompt's queries keeps
 * exactly what online calibration keeps; the statistics of another layer do not. */
static void test_calibration_from_file(void **state)
{
    (void)state;
    const int Hq = 4, Hkv = 2, D = 16, T = 200, P = 60;
    RopeLayer rl = rope_layer(Hq, Hkv, D, T, P, ROPE_HALF, 0, 91);
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "calibration.h5", 0);
    const int first[2] = {120, 0}; /* layer 1: the prompt's queries; layer 0: later ones */
    write_calibration(&rl, path, P, first);
    const char *base = "budget=30 divide_length=10 protect_initial=2 protect_recent=6";
    char params[1024];
    snprintf(params, sizeof params, "%s calibration=%s", base, path);

    rl.fx->L.layer = 1;
    Record online = run_recorded(&rl, base), from_file = run_recorded(&rl, params);
    assert_memory_equal(online.in, from_file.in, (size_t)(T - P) * Hkv * T);
    rl.fx->L.layer = 0;
    Record other_layer = run_recorded(&rl, params);
    assert_memory_not_equal(online.in, other_layer.in, (size_t)(T - P) * Hkv * T);

    record_free(&online);
    record_free(&from_file);
    record_free(&other_layer);

    /* A calibration trace without the simulated layer: create() fails with one line naming
     * the file, instead of calibrating from nothing. */
    rl.fx->L.layer = 2;
    const PolicyType *type = policy_find("trig");
    void *prm = kv_calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    KvErr err;
    assert_int_equal(policy_param_set(type, prm, "calibration", path, &err), 0);
    PolicyEnv env = {.seed = 1, .kv_bits = 16};
    assert_null(type->create(prm, &rl.fx->L, &env, &err));
    assert_non_null(strstr(err.msg, path));
    assert_non_null(strstr(err.msg, "has 2 layers"));
    assert_null(strchr(err.msg, '\n'));
    free(prm);
    rl.fx->L.layer = 0;

    scratch_remove(dir);
    rope_layer_free(&rl);
}

static void test_parameters_validated(void **state)
{
    (void)state;
    const PolicyType *type = policy_find("trig");
    assert_non_null(type);
    void *prm = kv_calloc(1, type->params_size);
    KvErr err;
    policy_params_defaults(type, prm);
    assert_int_equal(type->validate(prm, &err), 0);
    assert_int_equal(policy_param_set(type, prm, "budget", "132", &err), 0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "protect_recent"));
    assert_int_equal(policy_param_set(type, prm, "budget", "512", &err), 0);
    assert_int_equal(policy_param_set(type, prm, "calibration", "no-such-calibration.h5", &err),
                     0);
    assert_int_equal(type->validate(prm, &err), -1);
    assert_non_null(strstr(err.msg, "no-such-calibration.h5"));
    assert_int_equal(policy_param_set(type, prm, "granularity", "token", &err), -1);
    assert_int_equal(policy_param_set(type, prm, "pairing", "rotated", &err), -1);
    free(prm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_phase_cancellation),
        cmocka_unit_test(test_calibration_recovers_pre_rope_statistics),
        cmocka_unit_test(test_layouts_and_mismatched_pairing),
        cmocka_unit_test(test_shift_keeps_same_set),
        cmocka_unit_test(test_interleaved_trace_keeps_same_set),
        cmocka_unit_test(test_protected_tokens_stay),
        cmocka_unit_test(test_pruning_rules_short_prompt),
        cmocka_unit_test(test_pruning_rules_long_prompt),
        cmocka_unit_test(test_layer_granularity_one_set),
        cmocka_unit_test(test_hf_schedule),
        cmocka_unit_test(test_kvhead_granularity),
        cmocka_unit_test(test_ties_keep_newer),
        cmocka_unit_test(test_calibration_from_file),
        cmocka_unit_test(test_parameters_validated),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
