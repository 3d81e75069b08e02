/* The one builder of LayerView (policies/policy.h): a layer's geometry is its trace's. */
#include "policies/policy.h"

LayerView layer_view_make(const TraceMeta *m, int layer, const float *q, const float *k,
                          const float *v)
{
    LayerGeometry g = trace_layer_geometry(m, layer);
    return (LayerView){
        .meta = m, .layer = layer, .n_q_heads = m->n_q_heads, .n_kv_heads = m->n_kv_heads,
        .group = m->n_q_heads / m->n_kv_heads, .head_dim = m->head_dim,
        .n_tokens = m->n_tokens, .n_prompt = m->n_prompt, .attn_scale = (float)g.attn_scale,
        .attn_softcap = (float)g.attn_softcap,
        .window = g.window, .rope_inv_freq = g.rope_inv_freq,
        .q = q, .k = k, .v = v,
    };
}
