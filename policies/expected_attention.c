/* expected_attention — kvpress's ExpectedAttentionPress: the tokens future queries are expected
 * to attend to most, from the statistics of the span's queries.
 *
 * At a span's compression (policies/press.h) for KV head g, with the span's queries Q (the
 * positions [span_start + sinks, c1), or the whole span when it is not longer than `sinks`)
 * rotated back to their pre-RoPE form with the trace's RoPE (rope_apply at minus the query's
 * position), for each query head h of the group:
 *   mu_h = mean of the pre-RoPE queries, S_h = their covariance (divided by |Q|);
 *   R = the mean over the next `future` positions p = pos(c1 - 1) + 1 .. + future of RoPE's
 *       rotation at p (per channel pair f: cos and sin of p * inv_freq[f] averaged);
 *   mu'_h = R mu_h, S'_h = R S_h R^T (the statistics of a future query, post-RoPE);
 *   z_h(j) = s * mu'_h . k_j + s^2 / 2 * k_j^T S'_h k_j (s = the layer's attn_scale; the log of
 *       E[exp(s q . k_j)] for a Gaussian q; `covariance = false` drops the second term);
 *   a_h(j) = softmax of z_h over the candidates that are not sinks;
 *   score(j) = (gqa reduction over the group's heads of a_h(j) + epsilon) * ||v_j|| (`vnorm`;
 *       without it the reduction alone); gqa = mean is kvpress's.
 * A candidate among the first `sinks` positions of the trace scores the largest other score
 * plus 1 (kept before any other). Keys are the trace's post-RoPE keys, as in kvpress's cache.
 * Compression and decode: policies/press.h. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "policies/press.h"
#include "policies/rank.h"
#include "sim/format/geometry.h"

extern const PolicyType policy_expected_attention;

typedef struct {
    PressParams press; /* first: press.c reads the parameters as PressParams */
    int future;
    int sinks;
    bool covariance;
    bool vnorm;
    double epsilon;
    int gqa;
} EaParams;

static const ParamSpec ea_params[] = {
    PRESS_PARAM_SPECS,
    {"future", PARAM_INT, offsetof(EaParams, future), "512", 1, 1 << 20, NULL,
     "future positions the query statistics are rotated to and averaged over "
     "(n_future_positions)"},
    {"sinks", PARAM_INT, offsetof(EaParams, sinks), "4", 0, 1 << 20, NULL,
     "first tokens always kept, their queries left out of the statistics (n_sink)"},
    {"covariance", PARAM_BOOL, offsetof(EaParams, covariance), "true", 0, 0, NULL,
     "include the queries' covariance term (use_covariance)"},
    {"vnorm", PARAM_BOOL, offsetof(EaParams, vnorm), "true", 0, 0, NULL,
     "multiply the expected attention by the value's L2 norm (use_vnorm)"},
    {"epsilon", PARAM_DOUBLE, offsetof(EaParams, epsilon), "0", 0, 1e6, NULL,
     "added to the expected attention before the value-norm rescaling"},
    {"gqa", PARAM_ENUM, offsetof(EaParams, gqa), "mean", 0, 0, RANK_GQA_CHOICES,
     "reduction over the group's query heads (kvpress: mean)"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

/* R (D x D, row-major): the mean over positions p0 .. p0 + n - 1 of RoPE's rotation at p. */
static void mean_rotation(const LayerView *L, double p0, int n, double *R)
{
    int D = L->head_dim;
    memset(R, 0, (size_t)D * D * sizeof *R);
    for (int f = 0; f < D / 2; f++) {
        double c = 0, s = 0;
        for (int i = 0; i < n; i++) {
            double a = (p0 + i) * L->rope_inv_freq[f];
            c += cos(a);
            s += sin(a);
        }
        c /= n;
        s /= n;
        int i0, i1;
        rope_pair(L->meta->rope_layout, D, f, &i0, &i1);
        /* rope_apply's rotation: x0' = x0 c - x1 s, x1' = x0 s + x1 c */
        R[i0 * D + i0] = c;
        R[i0 * D + i1] = -s;
        R[i1 * D + i0] = s;
        R[i1 * D + i1] = c;
    }
}

/* mu' = R mu and S' = R S R^T for one query head's statistics (tmp: D x D). */
static void rotate_stats(const double *R, int D, double *mu, double *S, double *tmp, bool cov)
{
    double *m = tmp; /* R mu, before tmp is reused */
    for (int a = 0; a < D; a++) {
        double acc = 0;
        for (int b = 0; b < D; b++)
            acc += R[a * D + b] * mu[b];
        m[a] = acc;
    }
    memcpy(mu, m, (size_t)D * sizeof *mu);
    if (!cov)
        return;
    for (int a = 0; a < D; a++) /* tmp = R S */
        for (int b = 0; b < D; b++) {
            double acc = 0;
            for (int c = 0; c < D; c++)
                acc += R[a * D + c] * S[c * D + b];
            tmp[a * D + b] = acc;
        }
    for (int a = 0; a < D; a++) /* S = tmp R^T */
        for (int b = 0; b < D; b++) {
            double acc = 0;
            for (int c = 0; c < D; c++)
                acc += tmp[a * D + c] * R[b * D + c];
            S[a * D + b] = acc;
        }
}

static void ea_score(const void *params, const PrefillView *pv, int g, const int32_t *cand,
                     int n, double *score_at)
{
    const EaParams *prm = params;
    const LayerView *L = pv->L;
    int D = L->head_dim, c1 = pv->chunk_end;
    int q0 = pv->span_start + prm->sinks;
    if (q0 >= c1)
        q0 = pv->span_start;
    int m = c1 - q0;
    double *R = kv_malloc((size_t)D * D * sizeof *R);
    double *mu = kv_malloc((size_t)D * sizeof *mu);
    double *S = kv_malloc((size_t)D * D * sizeof *S);
    double *tmp = kv_malloc((size_t)D * D * sizeof *tmp);
    double *X = kv_malloc((size_t)m * D * sizeof *X);       /* pre-RoPE queries, centred */
    double *K = kv_malloc(((size_t)n + 1) * D * sizeof *K); /* the scored keys, [nk][D] */
    double *KS = kv_malloc(((size_t)n + 1) * D * sizeof *KS);
    double *z = kv_malloc(((size_t)n + 1) * sizeof *z);
    int *at = kv_malloc(((size_t)n + 1) * sizeof *at); /* candidate index of K's row */
    float *red = kv_calloc((size_t)L->group * n + 1, sizeof *red); /* [group][n] */
    float *out = kv_malloc(((size_t)n + 1) * sizeof *out);
    float *q = kv_malloc((size_t)D * sizeof *q);
    mean_rotation(L, (double)L->meta->positions[c1 - 1] + 1.0, prm->future, R);
    /* The candidates that are not sinks, their keys as rows. */
    int nk = 0;
    for (int i = 0; i < n; i++) {
        if (cand[i] < prm->sinks)
            continue;
        const float *k = L->k + ((size_t)g * L->n_tokens + cand[i]) * D;
        for (int d = 0; d < D; d++)
            K[(size_t)nk * D + d] = k[d];
        at[nk++] = i;
    }
    double s = L->attn_scale;
    for (int r = 0; r < L->group && nk > 0; r++) {
        int h = g * L->group + r;
        /* The pre-RoPE queries, their mean and covariance. */
        memset(mu, 0, (size_t)D * sizeof *mu);
        for (int i = 0; i < m; i++) {
            memcpy(q, L->q + ((size_t)h * L->n_tokens + q0 + i) * D, (size_t)D * sizeof *q);
            rope_apply(q, D, L->meta->rope_layout, L->rope_inv_freq,
                       -(double)L->meta->positions[q0 + i]);
            for (int d = 0; d < D; d++) {
                X[(size_t)i * D + d] = q[d];
                mu[d] += q[d];
            }
        }
        for (int d = 0; d < D; d++)
            mu[d] /= m;
        if (prm->covariance) {
            for (int i = 0; i < m; i++)
                for (int d = 0; d < D; d++)
                    X[(size_t)i * D + d] -= mu[d];
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, D, m, 1.0 / m, X, D, X, D,
                        0.0, S, D);
        }
        rotate_stats(R, D, mu, S, tmp, prm->covariance);
        /* z_i = s mu'.k_i + s^2/2 k_i^T S' k_i over the scored keys, then their softmax. */
        cblas_dgemv(CblasRowMajor, CblasNoTrans, nk, D, s, K, D, mu, 1, 0.0, z, 1);
        if (prm->covariance) {
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nk, D, D, 1.0, K, D, S, D,
                        0.0, KS, D);
            for (int i = 0; i < nk; i++)
                z[i] += 0.5 * s * s * cblas_ddot(D, K + (size_t)i * D, 1, KS + (size_t)i * D, 1);
        }
        double zmax = -INFINITY, sum = 0;
        for (int i = 0; i < nk; i++)
            zmax = z[i] > zmax ? z[i] : zmax;
        for (int i = 0; i < nk; i++)
            sum += (z[i] = exp(z[i] - zmax));
        for (int i = 0; i < nk; i++)
            red[(size_t)r * n + at[i]] = (float)(z[i] / sum);
    }
    rank_reduce_rows(red, L->group, n, n, prm->gqa, out);
    double best = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (cand[i] < prm->sinks)
            continue;
        double sc = out[i];
        if (prm->vnorm) {
            const float *v = L->v + ((size_t)g * L->n_tokens + cand[i]) * D;
            double sq = 0;
            for (int d = 0; d < D; d++)
                sq += (double)v[d] * v[d];
            sc = (sc + prm->epsilon) * sqrt(sq);
        }
        score_at[cand[i]] = sc;
        if (sc > best)
            best = sc;
    }
    for (int i = 0; i < n; i++)
        if (cand[i] < prm->sinks)
            score_at[cand[i]] = (best > -INFINITY ? best : 0.0) + 1.0;
    free(R);
    free(mu);
    free(S);
    free(tmp);
    free(X);
    free(K);
    free(KS);
    free(z);
    free(at);
    free(red);
    free(out);
    free(q);
}

static Policy *ea_create(const void *params, const LayerView *L, const PolicyEnv *env,
                         KvErr *err)
{
    (void)err; /* cannot fail */
    (void)env;
    return press_create(&policy_expected_attention, ea_score, params, L);
}

static const char *const ea_conformance[] = {
    "budget=32 window=8 future=64",
    "budget=32 window=0 decode=grow sinks=0 covariance=false",
    "budget=32 window=8 vnorm=false gqa=max future=16 sinks=2",
    "budget=32 window=4 epsilon=0.5 gqa=sum",
    NULL,
};

const PolicyType policy_expected_attention = {
    .name = "expected_attention",
    .description = "span compressed to the tokens of highest expected future attention times "
                   "value norm (kvpress ExpectedAttentionPress)",
    .params_size = sizeof(EaParams),
    .params = ea_params,
    .validate = press_validate,
    .create = ea_create,
    .prefill = press_prefill,
    .step = press_step,
    .observe = press_observe,
    .destroy = press_destroy,
    .max_slots = press_max_slots,
    .conformance = ea_conformance,
    .scorer = &press_scorer,
};
