/* model.h — a Hugging Face decoder-only checkpoint: its config.json and its weights.
 *
 * Supported architectures (config "architectures"[0]): LlamaForCausalLM (Llama 2 and 3),
 * MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (per-head q/k RMSNorm).
 * All are the same pre-norm transformer: RMSNorm, grouped-query attention with RoPE in HF's
 * rotate_half layout, SwiGLU MLP, optionally tied embeddings. Mistral's sliding_window applies to
 * every layer (query t attends over the last sliding_window keys); Qwen's use_sliding_window
 * (sliding windows in some layers only) is refused.
 *
 * model_load validates everything before the forward pass trusts it: every required config key
 * with a sane value, every size the config implies (products of its values included) within an
 * int, RoPE frequencies finite and positive for any run length, every expected tensor present
 * with the shape the config implies and finite values. Weights are converted to float32 once at
 * load (F32 tensors aligned in the mapping are used in place). */
#ifndef KVSIM_MODEL_H
#define KVSIM_MODEL_H

#include "sim/base/util.h"
#include "sim/format/trace.h"
#include "traces/model/safetensors.h"

typedef enum { ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_QWEN3 } ModelArch;

typedef struct {
    char architecture[64]; /* as written in config.json */
    ModelArch arch;
    int n_layers;
    int hidden_size;
    int intermediate_size;
    int n_q_heads;
    int n_kv_heads;
    int head_dim;
    int vocab_size;
    double rms_norm_eps;
    double rope_theta;
    int max_position_embeddings; /* 0 when absent */
    int tie_word_embeddings;
    int qkv_bias;          /* q_proj, k_proj, v_proj carry a bias */
    int o_bias;            /* o_proj carries a bias */
    int qk_norm;           /* Qwen3: RMSNorm over each head of q and k before RoPE */
    int sliding_window;    /* 0 = full attention; else every layer attends over this many keys
                            * (Mistral's sliding_window): see model_describe */
    char rope_type[32];    /* "default", "linear", "dynamic", "llama3" or "yarn" */
    char rope_scaling[256]; /* the rope_scaling JSON object as text, empty when absent */
    double rope_factor;
    double rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
    int rope_original_max_positions;                    /* llama3, yarn */
    double rope_beta_fast, rope_beta_slow;              /* yarn */
    int rope_truncate;                                  /* yarn */
    /* cos and sin are multiplied by it (HF's attention_scaling), so post-RoPE q and k are
     * scaled by it: yarn's attention factor, 1 otherwise */
    double rope_attention_factor;
    int n_eos;
    int eos_token_ids[8]; /* config's eos_token_id (an id or a list) */
    int bos_token_id;     /* -1 when absent */
} ModelConfig;

/* Parses config.json (a regular file). Errors name the file and the key. */
int model_config_load(const char *config_path, ModelConfig *cfg, KvErr *err);

/* RoPE inverse frequencies out[head_dim/2] after the config's rope_scaling, for a run of
 * n_tokens tokens (only "dynamic" depends on it: NTK scaling for the whole run's length, see
 * docs/generator.md). */
void model_rope_inv_freq(const ModelConfig *cfg, int n_tokens, double *out);

/* The model as a trace describes it, for a run of n_tokens tokens: its dimensions and
 * parameter count, and its attention geometry (the scale, each layer's window and RoPE
 * frequencies, the layout): the one source the forward pass and the trace header take it from.
 * Allocates out->window and out->rope_inv_freq (trace_model_free); the strings other than
 * rope_scaling (which points into cfg) are left NULL for the caller. */
void model_describe(const ModelConfig *cfg, int n_tokens, TraceModel *out);
/* The sliding window of one layer: 0 = global. */
int model_layer_window(const ModelConfig *cfg, int layer);
/* The number of parameters the config implies (every tensor model_load loads; tied embeddings
 * counted once). */
int64_t model_n_params(const ModelConfig *cfg);

/* Float32 weights, row-major as in the checkpoint: a linear layer is [out_features][in_features]. */
typedef struct {
    const float *input_norm;     /* [hidden] */
    const float *wq, *wk, *wv;   /* [Hq*D][hidden], [Hkv*D][hidden], [Hkv*D][hidden] */
    const float *bq, *bk, *bv;   /* biases or NULL */
    const float *wo;             /* [hidden][Hq*D] */
    const float *bo;             /* or NULL */
    const float *q_norm, *k_norm; /* [D] or NULL */
    const float *post_attention_norm; /* [hidden] */
    const float *w_gate, *w_up;  /* [intermediate][hidden] */
    const float *w_down;         /* [hidden][intermediate] */
} LayerWeights;

typedef struct {
    const float *token_embedding; /* [vocab][hidden] */
    LayerWeights *layers;   /* [n_layers] */
    const float *final_norm;      /* [hidden] */
    const float *lm_head;         /* [vocab][hidden]; == token_embedding when tied */
} TransformerWeights;

typedef struct {
    ModelConfig config;
    TransformerWeights weights;
    SafetensorsCheckpoint *checkpoint; /* kept mapped: aligned F32 weights point into it */
    int n_owned;
    float **owned; /* converted tensors, freed with the model */
} Model;

/* Loads config.json and the safetensors weights of a checkpoint directory. */
Model *model_load(const char *dir, KvErr *err);
void model_free(Model *model);

/* Human-readable list for error messages. */
#define MODEL_SUPPORTED_ARCHITECTURES \
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"

#endif
