/* model.h — a Hugging Face decoder-only checkpoint: its config.json and its weights.
 *
 * Supported architectures (config "architectures"[0]): LlamaForCausalLM (Llama 2 and 3),
 * MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (per-head q/k RMSNorm),
 * Gemma2ForCausalLM, Gemma3ForCausalLM and the text model of Gemma3ForConditionalGeneration
 * (its config's text_config). All are the same pre-norm transformer: RMSNorm, grouped-query
 * attention with RoPE in HF's rotate_half layout, a gated MLP, optionally tied embeddings; what
 * differs is stated by per-model flags and parameters (below), never by the architecture's name.
 *
 * Sliding-window layers (query t attends over the last sliding_window keys, its own included):
 * Mistral's sliding_window (every layer), Qwen2/Qwen3's use_sliding_window (the layers from
 * max_window_layers on), Gemma 2 (every other layer from layer 0), Gemma 3 (every layer but each
 * sliding_window_pattern-th), or the config's layer_types list, which, when present, must agree
 * with the rule the other keys state (model_layer_window).
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

typedef enum { ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_QWEN3, ARCH_GEMMA2, ARCH_GEMMA3 } ModelArch;

/* Layers a config may list in layer_types or mark as sliding. */
#define MODEL_MAX_WINDOW_LAYERS 1024

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
    const float *post_attention_norm; /* [hidden] the norm before the MLP (Gemma:
                                       * pre_feedforward_layernorm) */
    const float *attn_out_norm, *mlp_out_norm; /* [hidden] or NULL: the sandwich norms of the
                                       * attention and MLP outputs (Gemma's
                                       * post_attention_layernorm, post_feedforward_layernorm) */
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
#define MODEL_SUPPORTED_ARCHITECTURES                                                        \
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "             \
    "Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration (text)"

#endif
