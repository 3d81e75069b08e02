#include "traces/model/moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/util.h"

struct MoeScratch {
    float *logits;    /* [chunk][n_experts]: router logits, then probabilities */
    int *selected;    /* [chunk][top_k] expert ids */
    float *weights;   /* [chunk][top_k] their routing weights */
    int *tokens;      /* [chunk] the tokens routed to one expert */
    float *token_w;   /* [chunk] and their weights for it */
    float *x;         /* [chunk][hidden] those tokens' inputs */
    float *gate, *up; /* [chunk][I] */
    float *y;         /* [chunk][hidden] the expert's outputs */
    float *out;       /* [chunk][hidden] the weighted sum */
};

static const char *moe_prefix(const ModelConfig *c)
{
    return c->arch == ARCH_MIXTRAL ? "block_sparse_moe" : "mlp";
}

MoeWeights *moe_load(const ModelConfig *c, int layer, MoeMatrixLoader load, void *ctx)
{
    int E = c->n_experts, H = c->hidden_size, I = c->moe_intermediate_size;
    int mixtral = c->arch == ARCH_MIXTRAL;
    /* HF's names: Mixtral's w1 is the gate, w3 the up and w2 the down projection. */
    const char *names[3] = {mixtral ? "w1" : "gate_proj", mixtral ? "w3" : "up_proj",
                            mixtral ? "w2" : "down_proj"};
    MoeWeights *w = kv_calloc(1, sizeof *w);
    w->gate = kv_calloc((size_t)E, sizeof *w->gate);
    w->up = kv_calloc((size_t)E, sizeof *w->up);
    w->down = kv_calloc((size_t)E, sizeof *w->down);
    char name[256];
    snprintf(name, sizeof name, "model.layers.%d.%s.gate.weight", layer, moe_prefix(c));
    if (load(ctx, name, E, H, &w->router) != 0)
        goto fail;
    for (int e = 0; e < E; e++) {
        WeightMatrix *dst[3] = {&w->gate[e], &w->up[e], &w->down[e]};
        for (int p = 0; p < 3; p++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.experts.%d.%s.weight", layer,
                     moe_prefix(c), e, names[p]);
            if (load(ctx, name, p == 2 ? H : I, p == 2 ? I : H, dst[p]) != 0)
                goto fail;
        }
    }
    return w;
fail:
    moe_free(w);
    return NULL;
}

void moe_free(MoeWeights *w)
{
    if (!w)
        return;
    free(w->gate);
    free(w->up);
    free(w->down);
    free(w);
}

MoeScratch *moe_scratch_new(const ModelConfig *c, int chunk_size)
{
    size_t chunk = (size_t)chunk_size, H = (size_t)c->hidden_size;
    size_t I = (size_t)c->moe_intermediate_size, k = (size_t)c->n_experts_per_tok;
    MoeScratch *s = kv_calloc(1, sizeof *s);
    s->logits = kv_malloc(chunk * (size_t)c->n_experts * sizeof(float));
    s->selected = kv_malloc(chunk * k * sizeof(int));
    s->weights = kv_malloc(chunk * k * sizeof(float));
    s->tokens = kv_malloc(chunk * sizeof(int));
    s->token_w = kv_malloc(chunk * sizeof(float));
    s->x = kv_malloc(chunk * H * sizeof(float));
    s->gate = kv_malloc(chunk * I * sizeof(float));
    s->up = kv_malloc(chunk * I * sizeof(float));
    s->y = kv_malloc(chunk * H * sizeof(float));
    s->out = kv_malloc(chunk * H * sizeof(float));
    return s;
}

void moe_scratch_free(MoeScratch *s)
{
    if (!s)
        return;
    free(s->logits);
    free(s->selected);
    free(s->weights);
    free(s->tokens);
    free(s->token_w);
    free(s->x);
    free(s->gate);
    free(s->up);
    free(s->y);
    free(s->out);
    free(s);
}

/* softmax over the experts, then the top k (the lower index first among equal probabilities,
 * in descending order as torch.topk returns them), renormalized when norm_topk_prob. */
static void route(const ModelConfig *c, float *probs, int *selected, float *weights)
{
    int E = c->n_experts, k = c->n_experts_per_tok;
    float max = probs[0];
    for (int e = 1; e < E; e++)
        max = probs[e] > max ? probs[e] : max;
    double sum = 0;
    for (int e = 0; e < E; e++)
        sum += probs[e] = expf(probs[e] - max);
    for (int e = 0; e < E; e++)
        probs[e] = (float)(probs[e] / sum);
    double chosen = 0;
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < i; j++)
                taken |= selected[j] == e;
            if (!taken && (best < 0 || probs[e] > probs[best]))
                best = e;
        }
        selected[i] = best;
        weights[i] = probs[best];
        chosen += probs[best];
    }
    if (c->norm_topk_prob)
        for (int i = 0; i < k; i++)
            weights[i] = (float)(weights[i] / chosen);
}

const float *moe_forward(MoeScratch *s, const ModelConfig *c, const MoeWeights *w,
                         const float *x, int n, float *matrix_scratch)
{
    int E = c->n_experts, k = c->n_experts_per_tok, H = c->hidden_size;
    size_t I = (size_t)c->moe_intermediate_size;
    matrix_linear(s->logits, x, &w->router, NULL, n, matrix_scratch);
    for (int t = 0; t < n; t++)
        route(c, s->logits + (size_t)t * E, s->selected + (size_t)t * k,
              s->weights + (size_t)t * k);
    memset(s->out, 0, (size_t)n * H * sizeof(float));
    for (int e = 0; e < E; e++) {
        int m = 0;
        for (int t = 0; t < n; t++)
            for (int i = 0; i < k; i++)
                if (s->selected[(size_t)t * k + i] == e) {
                    s->tokens[m] = t;
                    s->token_w[m] = s->weights[(size_t)t * k + i];
                    memcpy(s->x + (size_t)m * H, x + (size_t)t * H, (size_t)H * sizeof(float));
                    m++;
                }
        if (!m)
            continue;
        matrix_linear(s->gate, s->x, &w->gate[e], NULL, m, matrix_scratch);
        matrix_linear(s->up, s->x, &w->up[e], NULL, m, matrix_scratch);
        for (size_t i = 0; i < (size_t)m * I; i++) /* SwiGLU, as the dense MLP's */
            s->gate[i] = s->gate[i] / (1.0f + expf(-s->gate[i])) * s->up[i];
        matrix_linear(s->y, s->gate, &w->down[e], NULL, m, matrix_scratch);
        for (int j = 0; j < m; j++) {
            float *dst = s->out + (size_t)s->tokens[j] * H;
            const float *src = s->y + (size_t)j * H;
            for (int d = 0; d < H; d++)
                dst[d] += s->token_w[j] * src[d];
        }
    }
    return s->out;
}
