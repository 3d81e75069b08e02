#include "sim/base/attention.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/util.h"

void attention_block(const float *q, int B, int i0, const float *k, const float *v, int D,
                     float scale, float softcap, int window, float *p, int ld, float *o,
                     float *row_max, float *row_z)
{
    int n_keys = i0 + B;
    /* logits[b][j] = q_b . k_j for all j < i0+B; the causal mask is applied by the softmax.
     * Soft-capped logits are capped here, scaled first, so the softmax's own scale is 1.
     * The rows are zeroed here and added to (beta = 1): OpenBLAS would zero them itself for
     * beta = 0 (its kernel then adds alpha * q.k to that +0 all the same), element by element,
     * at a quarter of memset's speed. */
    for (int b = 0; b < B; b++)
        memset(p + (size_t)b * ld, 0, (size_t)n_keys * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, n_keys, D, softcap > 0 ? scale : 1.0f,
                q, D, k, D, 1.0f, p, ld);
    if (softcap > 0) {
        for (int b = 0; b < B; b++)
            for (int j = attn_first_key(window, i0 + b); j <= i0 + b; j++)
                p[(size_t)b * ld + j] = softcap_logitf(p[(size_t)b * ld + j], softcap);
        scale = 1.0f;
    }
    softmax_causal_rows(p, B, ld, i0 + 1, scale, window, row_max, row_z);
    if (o)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, D, n_keys, 1.0f, p, ld, v, D,
                    0.0f, o, D);
}

double attention_block_flops(int B, int i0, int D, int with_output)
{
    double one = 2.0 * B * (double)(i0 + B) * D;
    return with_output ? 2 * one : one;
}

/* One column_statistics call: what every head's task reads, and each thread's scratch. Queries
 * [q_begin, q_end) in blocks of PROMPT_STATS_BLOCK from q_begin; mass [n_q_heads][mass_ld]; obs
 * [n_q_heads][obs_rows][q_end] gets the last obs_rows queries' rows. */
typedef struct {
    const float *q, *k;
    int group, stride, q_begin, q_end, D, window, mass_ld, obs_rows;
    float scale, softcap;
    float *mass, *obs;
    const float *ones; /* [stride] ones: the column sums are probs^T . 1 */
    float **probs;     /* [threads]: [PROMPT_STATS_BLOCK][stride] each, allocated by its slot */
    double *flops;     /* [n_q_heads] */
} StatsJob;

static int stats_head(void *ctx, int h, int slot, KvErr *err)
{
    (void)err;
    StatsJob *j = ctx;
    int T = j->stride, E = j->q_end, W = j->obs_rows, D = j->D;
    if (!j->probs[slot])
        j->probs[slot] = kv_malloc((size_t)PROMPT_STATS_BLOCK * T * sizeof(float));
    float *probs = j->probs[slot];
    float mx[PROMPT_STATS_BLOCK], z[PROMPT_STATS_BLOCK];
    const float *qh = j->q + (size_t)h * T * D;
    const float *kg = j->k + (size_t)(h / j->group) * T * D;
    double flops = 0;
    for (int i0 = j->q_begin; i0 < E; i0 += PROMPT_STATS_BLOCK) {
        int B = E - i0 < PROMPT_STATS_BLOCK ? E - i0 : PROMPT_STATS_BLOCK;
        attention_block(qh + (size_t)i0 * D, B, i0, kg, NULL, D, j->scale, j->softcap, j->window,
                        probs, T, NULL, mx, z);
        flops += attention_block_flops(B, i0, D, 0);
        if (j->mass) /* column sums of the block: probs^T . 1 */
            cblas_sgemv(CblasRowMajor, CblasTrans, B, i0 + B, 1.0f, probs, T, j->ones, 1, 1.0f,
                        j->mass + (size_t)h * j->mass_ld, 1);
        for (int b = 0; b < B; b++) {
            int r = i0 + b - (E - W);
            if (j->obs && r >= 0) {
                float *dst = j->obs + ((size_t)h * W + r) * E;
                memcpy(dst, probs + (size_t)b * T, (size_t)(i0 + B) * sizeof(float));
                memset(dst + i0 + B, 0, (size_t)(E - i0 - B) * sizeof(float));
            }
        }
    }
    j->flops[h] = flops;
    return 0;
}

static double column_statistics(StatsJob *job, int n_q_heads, Pool *pool)
{
    int threads = pool ? pool_size(pool) : 1;
    float *ones = kv_malloc((size_t)job->stride * sizeof(float));
    for (int j = 0; j < job->stride; j++)
        ones[j] = 1.0f;
    job->ones = ones;
    job->probs = kv_calloc((size_t)threads, sizeof(float *));
    job->flops = kv_calloc((size_t)n_q_heads, sizeof(double));
    if (pool)
        pool_for(pool, n_q_heads, stats_head, job, NULL); /* a head cannot fail */
    else
        for (int h = 0; h < n_q_heads; h++)
            stats_head(job, h, 0, NULL);
    double flops = 0;
    for (int h = 0; h < n_q_heads; h++)
        flops += job->flops[h];
    for (int i = 0; i < threads; i++)
        free(job->probs[i]);
    free(job->probs);
    free(job->flops);
    free(ones);
    return flops;
}

double prompt_statistics(const float *q, const float *k, int n_q_heads, int group, int stride,
                         int n_prompt, int D, float scale, float softcap, int window,
                         float *mass, float *obs, int obs_rows, Pool *pool)
{
    StatsJob job = {
        .q = q, .k = k, .group = group, .stride = stride, .q_begin = 0, .q_end = n_prompt,
        .D = D, .window = window, .mass_ld = n_prompt, .obs_rows = obs_rows, .scale = scale,
        .softcap = softcap,
        .mass = mass, .obs = obs,
    };
    return column_statistics(&job, n_q_heads, pool);
}

double decode_mass(const float *q, const float *k, int n_q_heads, int group, int stride,
                   int q_begin, int q_end, int D, float scale, float softcap, int window,
                   float *dmass, Pool *pool)
{
    StatsJob job = {
        .q = q, .k = k, .group = group, .stride = stride, .q_begin = q_begin,
        .q_end = q_end, .D = D, .window = window, .mass_ld = stride, .scale = scale,
        .softcap = softcap,
        .mass = dmass,
    };
    return column_statistics(&job, n_q_heads, pool);
}

/* One attention_rows call. */
typedef struct {
    const float *q, *k, *v;
    int n_q_heads, group, stride, D, window, t0, B, rows_cap;
    float scale, softcap;
    float *probs, *out, *row_max, *row_z;
} RowsJob;

static int rows_head(void *ctx, int h, int slot, KvErr *err)
{
    (void)slot, (void)err;
    const RowsJob *j = ctx;
    size_t T = (size_t)j->stride, D = (size_t)j->D, g = (size_t)(h / j->group);
    attention_block(j->q + ((size_t)h * T + (size_t)j->t0) * D, j->B, j->t0, j->k + g * T * D,
                    j->v + g * T * D, j->D, j->scale, j->softcap, j->window, j->probs + (size_t)h * T,
                    j->n_q_heads * j->stride, j->out + (size_t)h * j->rows_cap * D,
                    j->row_max + (size_t)h * j->rows_cap, j->row_z + (size_t)h * j->rows_cap);
    return 0;
}

double attention_rows(const float *q, const float *k, const float *v, int n_q_heads, int group,
                      int stride, int D, float scale, float softcap, int window, int t0, int B,
                      int rows_cap, float *probs, float *out, float *row_max, float *row_z,
                      Pool *pool)
{
    RowsJob job = {
        .q = q, .k = k, .v = v, .n_q_heads = n_q_heads, .group = group, .stride = stride,
        .D = D, .window = window, .t0 = t0, .B = B, .rows_cap = rows_cap, .scale = scale,
        .softcap = softcap,
        .probs = probs, .out = out, .row_max = row_max, .row_z = row_z,
    };
    if (pool)
        pool_for(pool, n_q_heads, rows_head, &job, NULL); /* a head cannot fail */
    else
        for (int h = 0; h < n_q_heads; h++)
            rows_head(&job, h, 0, NULL);
    return n_q_heads * attention_block_flops(B, t0, D, 1);
}
