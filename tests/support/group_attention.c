#include "tests/support/group_attention.h"

#include <math.h>
#include <stdlib.h>

void group_attention_over_cache(const Fixture *fx, const KVCache *c, int g, int t, double *out)
{
    const LayerView *L = &fx->L;
    int D = L->head_dim;
    double *logit = kv_malloc((size_t)(c->n + 1) * sizeof *logit);
    for (int s = 0; s < c->n; s++)
        out[s] = 0;
    for (int h = g * L->group; h < (g + 1) * L->group; h++) {
        const float *q = L->q + ((size_t)h * L->n_tokens + t) * D;
        double top = -INFINITY, z = 0;
        for (int s = 0; s < c->n; s++) {
            const float *k = c->alt_kv[s] ? c->alt_kv[s]
                                          : L->k + ((size_t)g * L->n_tokens + c->pos[s]) * D;
            double dot = 0;
            for (int d = 0; d < D; d++)
                dot += (double)q[d] * k[d];
            logit[s] = dot * L->attn_scale;
            top = fmax(top, logit[s]);
        }
        for (int s = 0; s < c->n; s++)
            z += exp(logit[s] - top);
        for (int s = 0; s < c->n; s++)
            out[s] += exp(logit[s] - top) / z;
    }
    free(logit);
}
