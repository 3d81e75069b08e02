/* model.h — a Hugging Face decoder-only checkpoint: its config.json and its weights.
 *
 * Supported architectures (config "architectures"[0]): LlamaForCausalLM (Llama 2 and 3),
 * MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (per-head q/k RMSNorm),
 * Gemma2ForCausalLM, Gemma3ForCausalLM and the text model of Gemma3ForConditionalGeneration
 * (its config's text_config), MixtralForCausalLM (Mistral with a mixture-of-experts
 * feed-forward) and Qwen3MoeForCausalLM (Qwen3 with one, in the layers decoder_sparse_step and
 * mlp_only_layers select). All are the same pre-norm transformer: RMSNorm, grouped-query
 * attention with RoPE in HF's rotate_half layout, a gated MLP (or top-k routed SwiGLU experts),
 * optionally tied embeddings; what differs is stated by per-model flags and parameters (below),
 * never by the architecture's name.
 *
 * Sliding-window layers (query t attends over the last sliding_window keys, its own included):
 * Mistral's and Mixtral's sliding_window (every layer), Qwen2/Qwen3's use_sliding_window (the
 * layers from max_window_layers on), Gemma 2 (every other layer from layer 0), Gemma 3 (every
 * layer but each sliding_window_pattern-th), or the config's layer_types list, which, when
 * present, must agree with the rule the other keys state (model_layer_window). Qwen3-MoE's
 * use_sliding_window is refused: transformers' releases disagree on which of its layers slide.
 *
 * model_load validates everything before the forward pass trusts it: every required config key
 * with a sane value, every size the config implies (products of its values included) within an
 * int, RoPE frequencies finite and positive for any run length, every expected tensor present
 * with the shape the config implies and finite values. Weight matrices stay as the checkpoint
 * stores them, in the mapping: F32 (aligned; else copied) and BF16/F16 (converted a block at a
 * time as they are used, traces/model/matrix.h); MLX-quantized ones are dequantized to float32
 * at load, and so are vectors (norms, biases). */
#ifndef KVSIM_MODEL_H
#define KVSIM_MODEL_H

#include "sim/base/util.h"
#include "sim/format/trace.h"
#include "traces/model/matrix.h"
#include "traces/model/safetensors.h"

typedef enum {
    ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_QWEN3, ARCH_GEMMA2, ARCH_GEMMA3,
    ARCH_MIXTRAL, ARCH_QWEN3_MOE, /* mixture-of-experts feed-forward: traces/model/moe.h */
} ModelArch;

/* Layers a config may list in layer_types or mark as sliding. */
#define MODEL_MAX_WINDOW_LAYERS 1024

/* longrope's factor lists have head_dim / 2 entries: head_dim at most twice this. */
#define MODEL_MAX_LONGROPE_PAIRS 256

/* Most entries of Qwen3-MoE's mlp_only_layers kvsim keeps. */
#define MODEL_MAX_MLP_ONLY_LAYERS 256

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
    int sliding_window;    /* 0 = no sliding layer; else a sliding layer's window in keys */
    /* [n_layers] 1 = sliding layer (attends over the last sliding_window keys), 0 = global;
     * all 0 when sliding_window is 0 (see model_layer_window) */
    unsigned char layer_sliding[MODEL_MAX_WINDOW_LAYERS];
    /* Gemma 2 and 3 (HF modeling_gemma2.py / modeling_gemma3.py); the defaults are Llama's. */
    int norm_unit_offset;  /* 1: every RMSNorm scales by (1 + weight) */
    int sandwich_norms;    /* the attention and MLP outputs are RMSNormed before the residual */
    int gelu_tanh;         /* gated MLP with gelu_pytorch_tanh instead of SiLU (GeGLU) */
    double embed_scale;    /* embeddings are multiplied by it: 1, Gemma sqrt(hidden_size) */
    double query_pre_attn_scalar; /* the logits' scale is its -1/2 power; 0: head_dim's */
    double attn_softcap;   /* > 0: logits capped as cap * tanh(logit / cap); 0 = none */
    double final_softcap;  /* > 0: the LM head's logits capped the same way */
    double rope_local_theta; /* > 0: the sliding layers' RoPE base, unscaled (Gemma 3) */
    char rope_type[32];    /* "default", "linear", "dynamic", "llama3", "yarn" or "longrope" */
    char rope_scaling[256]; /* the rope_scaling JSON object as text, empty when absent
                             * (longrope: a summary without its factor lists) */
    double rope_factor;
    double rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
    int rope_original_max_positions;                    /* llama3, yarn, longrope */
    double rope_beta_fast, rope_beta_slow;              /* yarn */
    int rope_truncate;                                  /* yarn */
    /* cos and sin are multiplied by it (HF's attention_scaling), so post-RoPE q and k are
     * scaled by it: yarn's attention factor, 1 otherwise */
    double rope_attention_factor;
    /* longrope: per-pair divisors of the frequencies, short_factor for runs within
     * original_max_position_embeddings, long_factor for longer ones */
    double rope_short_factor[MODEL_MAX_LONGROPE_PAIRS], rope_long_factor[MODEL_MAX_LONGROPE_PAIRS];
    int n_eos;
    int eos_token_ids[8]; /* config's eos_token_id (an id or a list) */
    int bos_token_id;     /* -1 when absent */
    /* Mixture of experts (traces/model/moe.h); n_experts = 0: a dense MLP in every layer. */
    int n_experts;             /* Mixtral num_local_experts, Qwen3-MoE num_experts */
    int n_experts_per_tok;     /* top-k */
    int moe_intermediate_size; /* each expert's (Mixtral: intermediate_size) */
    int norm_topk_prob;        /* renormalize the top-k weights (Mixtral: always) */
    int decoder_sparse_step;   /* Qwen3-MoE: layer l is sparse when (l + 1) % step == 0 */
    int n_mlp_only_layers;     /* Qwen3-MoE: layers that keep a dense MLP */
    int mlp_only_layers[MODEL_MAX_MLP_ONLY_LAYERS];
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
/* Whether a layer's feed-forward is a mixture of experts (else the dense MLP). */
int model_layer_is_moe(const ModelConfig *cfg, int layer);
/* The number of parameters the config implies (every tensor model_load loads; tied embeddings
 * counted once). */
int64_t model_n_params(const ModelConfig *cfg);

/* Weights, row-major as in the checkpoint: a linear layer is [out_features][in_features].
 * Matrices keep the checkpoint's precision (traces/model/matrix.h: F32, or BF16/F16 left in
 * the mapping); vectors (norms, biases) are float32. */
typedef struct MoeWeights MoeWeights; /* traces/model/moe.h */

typedef struct {
    const float *input_norm;     /* [hidden] */
    WeightMatrix wq, wk, wv;     /* [Hq*D][hidden], [Hkv*D][hidden], [Hkv*D][hidden] */
    const float *bq, *bk, *bv;   /* biases or NULL */
    WeightMatrix wo;             /* [hidden][Hq*D] */
    const float *bo;             /* or NULL */
    const float *q_norm, *k_norm; /* [D] or NULL */
    const float *post_attention_norm; /* [hidden] the norm before the MLP (Gemma:
                                       * pre_feedforward_layernorm) */
    const float *attn_out_norm, *mlp_out_norm; /* [hidden] or NULL: the sandwich norms of the
                                       * attention and MLP outputs (Gemma's
                                       * post_attention_layernorm, post_feedforward_layernorm) */
    WeightMatrix w_gate, w_up;   /* [intermediate][hidden]; unused in a MoE layer */
    WeightMatrix w_down;         /* [hidden][intermediate] */
    MoeWeights *moe;             /* the layer's experts (model_layer_is_moe), else NULL */
} LayerWeights;

typedef struct {
    WeightMatrix token_embedding; /* [vocab][hidden] */
    LayerWeights *layers;   /* [n_layers] */
    const float *final_norm;      /* [hidden] */
    WeightMatrix lm_head;         /* [vocab][hidden]; the embedding when tied */
} TransformerWeights;

typedef struct {
    ModelConfig config;
    TransformerWeights weights;
    SafetensorsCheckpoint *checkpoint; /* kept mapped: F32 and 16-bit weights point into it */
    int n_owned;
    float **owned; /* converted tensors, freed with the model */
    size_t matrix_scratch_floats; /* the most any matrix needs (matrix_scratch_floats) */
} Model;

typedef struct {
    /* Convert BF16/F16 matrices to float32 at load (the float32 path, twice the memory; the
     * generator benchmark compares the two). Default 0: they stay 16-bit. */
    int f32_weights;
} ModelLoadOptions;

/* Loads config.json and the safetensors weights of a checkpoint directory. */
Model *model_load(const char *dir, KvErr *err);
/* The same with options (NULL: the defaults). */
Model *model_load_with(const char *dir, const ModelLoadOptions *options, KvErr *err);
void model_free(Model *model);

/* Human-readable list for error messages. */
#define MODEL_SUPPORTED_ARCHITECTURES                                                        \
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "             \
    "Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration (text), "         \
    "MixtralForCausalLM, Qwen3MoeForCausalLM"

#endif
