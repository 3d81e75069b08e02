/* moe.h — the mixture-of-experts feed-forward of MixtralForCausalLM and Qwen3MoeForCausalLM,
 * as transformers computes it (models/mixtral/modeling_mixtral.py, MixtralSparseMoeBlock, and
 * models/qwen3_moe/modeling_qwen3_moe.py, Qwen3MoeSparseMoeBlock):
 *
 *   p = softmax(router · x) over the n_experts experts (float32),
 *   the top n_experts_per_tok of p (ties: the lower expert index first), their weights p_e,
 *   divided by their sum when norm_topk_prob (Mixtral always),
 *   out = sum over the selected experts, in ascending expert index (the order of HF's
 *         index_add_ loop), of p_e · down_e(silu(gate_e · x) * (up_e · x)).
 *
 * Each expert runs once per chunk on the tokens routed to it (a matrix-matrix product over
 * them). Checkpoint tensors, per layer L and expert E: Mixtral
 * model.layers.L.block_sparse_moe.gate.weight and ...experts.E.{w1,w3,w2}.weight (gate, up,
 * down); Qwen3-MoE model.layers.L.mlp.gate.weight and
 * ...mlp.experts.E.{gate,up,down}_proj.weight. */
#ifndef KVSIM_MOE_H
#define KVSIM_MOE_H

#include "traces/model/matrix.h"
#include "traces/model/model.h"

struct MoeWeights {
    WeightMatrix router;            /* [n_experts][hidden]: HF's `gate` Linear */
    WeightMatrix *gate, *up, *down; /* [n_experts] each: [I][hidden], [I][hidden], [hidden][I] */
};

/* Loads one matrix by tensor name with the shape given; returns 0, or -1 with the error set
 * (model.c's loader, so that every check and every precision applies to the experts too). */
typedef int (*MoeMatrixLoader)(void *ctx, const char *name, int rows, int cols,
                               WeightMatrix *out);

/* The experts of layer `layer` (model_layer_is_moe), or NULL after an error. */
MoeWeights *moe_load(const ModelConfig *cfg, int layer, MoeMatrixLoader load, void *ctx);
void moe_free(MoeWeights *w);

/* One chunk's scratch for moe_forward. */
typedef struct MoeScratch MoeScratch;
MoeScratch *moe_scratch_new(const ModelConfig *cfg, int chunk_size);
void moe_scratch_free(MoeScratch *s);

/* The feed-forward of x [n][hidden] (n <= chunk_size), returned as [n][hidden] inside s.
 * matrix_scratch as matrix_linear wants it. */
const float *moe_forward(MoeScratch *s, const ModelConfig *cfg, const MoeWeights *w,
                         const float *x, int n, float *matrix_scratch);

#endif
