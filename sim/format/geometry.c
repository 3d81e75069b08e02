/* The attention scale and the RoPE helpers shared by every reader and writer of geometry. */
#include "sim/format/geometry.h"

#include <math.h>

double attn_scale_default(int head_dim)
{
    return 1.0 / sqrt((double)head_dim);
}

double attn_softcap_logit(double logit, double cap)
{
    return cap > 0 ? cap * tanh(logit / cap) : logit;
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
