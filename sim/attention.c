#include "sim/attention.h"

#include <cblas.h>

void attention_block(const float *q, int B, int i0, const float *k, const float *v, int D,
                     float scale, float *p, int ld, float *o, float *row_max, float *row_z)
{
    int n_keys = i0 + B;
    /* logits[b][j] = q_b . k_j for all j < i0+B; the causal mask is applied by the softmax. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, n_keys, D, 1.0f, q, D, k, D, 0.0f,
                p, ld);
    softmax_causal_rows(p, B, ld, i0 + 1, scale, row_max, row_z);
    if (o)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, D, n_keys, 1.0f, p, ld, v, D,
                    0.0f, o, D);
}

double attention_block_flops(int B, int i0, int D, int with_output)
{
    double one = 2.0 * B * (double)(i0 + B) * D;
    return with_output ? 2 * one : one;
}
