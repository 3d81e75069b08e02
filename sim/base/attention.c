#include "sim/base/attention.h"

#include <cblas.h>
#include <string.h>

void attention_block(const float *q, int B, int i0, const float *k, const float *v, int D,
                     float scale, int window, float *p, int ld, float *o, float *row_max,
                     float *row_z)
{
    int n_keys = i0 + B;
    /* logits[b][j] = q_b . k_j for all j < i0+B; the causal mask is applied by the softmax. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, n_keys, D, 1.0f, q, D, k, D, 0.0f,
                p, ld);
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

double prompt_statistics(const float *q, const float *k, int n_q_heads, int group, int stride,
                         int n_prompt, int D, float scale, int window, float *mass, float *obs,
                         int obs_rows,
                         float *probs, const float *ones)
{
    int T = stride, P = n_prompt, W = obs_rows;
    float mx[PROMPT_STATS_BLOCK], z[PROMPT_STATS_BLOCK];
    double flops = 0;
    for (int h = 0; h < n_q_heads; h++) {
        const float *qh = q + (size_t)h * T * D;
        const float *kg = k + (size_t)(h / group) * T * D;
        for (int i0 = 0; i0 < P; i0 += PROMPT_STATS_BLOCK) {
            int B = P - i0 < PROMPT_STATS_BLOCK ? P - i0 : PROMPT_STATS_BLOCK;
            attention_block(qh + (size_t)i0 * D, B, i0, kg, NULL, D, scale, window, probs, T, NULL,
                            mx, z);
            flops += attention_block_flops(B, i0, D, 0);
            if (mass) /* column sums of the block: probs^T . 1 */
                cblas_sgemv(CblasRowMajor, CblasTrans, B, i0 + B, 1.0f, probs, T, ones, 1, 1.0f,
                            mass + (size_t)h * P, 1);
            for (int b = 0; b < B; b++) {
                int r = i0 + b - (P - W);
                if (obs && r >= 0) {
                    float *dst = obs + ((size_t)h * W + r) * P;
                    memcpy(dst, probs + (size_t)b * T, (size_t)(i0 + B) * sizeof(float));
                    memset(dst + i0 + B, 0, (size_t)(P - i0 - B) * sizeof(float));
                }
            }
        }
    }
    return flops;
}
