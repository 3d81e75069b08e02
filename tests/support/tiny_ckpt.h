/* tiny_ckpt.h — tiny random Hugging Face checkpoints for tests: config.json plus safetensors
 * (one file or two shards with model.safetensors.index.json), written with code independent of
 * traces/, deterministic in the seed.
 *
 * The tensors are also kept in memory, decoded exactly as the file stores them (after rounding
 * to BF16/F16), so that a test's reference computation uses the same numbers as the model
 * loaded from disk without going through the loader under test. */
#ifndef KVSIM_TEST_TINY_CKPT_H
#define KVSIM_TEST_TINY_CKPT_H

#include <stddef.h>
#include <stdint.h>

typedef enum { TINY_F32, TINY_F16, TINY_BF16 } TinyDtype;

typedef struct {
    const char *architecture; /* "LlamaForCausalLM", "Qwen2ForCausalLM", ... */
    int n_layers, hidden_size, intermediate_size, n_q_heads, n_kv_heads, vocab_size;
    int head_dim;             /* written to config.json when > 0 (else hidden / heads) */
    double rope_theta, rms_norm_eps;
    int tie_word_embeddings;  /* no lm_head.weight tensor */
    int attention_bias;       /* Llama/Qwen3: q/k/v/o biases (Qwen2 always has q/k/v biases) */
    TinyDtype dtype;
    int n_shards;             /* 1: model.safetensors; 2: index + two shards */
    int unaligned;            /* header not padded: F32 data lands at odd offsets */
    const char *rope_scaling; /* JSON object text for "rope_scaling", or NULL */
    const char *rope_parameters; /* JSON object text for "rope_parameters", or NULL */
    int max_position_embeddings;
    int eos_token_id;         /* -1: none */
    int sliding_window;       /* written to config.json when > 0 (Mistral: every layer) */
    /* Per-layer windows: Qwen2/Qwen3 use_sliding_window with max_window_layers (written when
     * use_sliding_window), Gemma 3's sliding_window_pattern (written when > 0), and layer_types
     * as the JSON list text (written when not NULL). */
    int use_sliding_window, max_window_layers, sliding_window_pattern;
    const char *layer_types;
    /* Gemma2ForCausalLM / Gemma3ForCausalLM / Gemma3ForConditionalGeneration: norms stored as
     * offsets from 1 (sd 0.1 around 0), pre- and post-feed-forward norms, q/k norms (Gemma 3),
     * config keys hidden_activation and those below (written when > 0; the soft-capping keys
     * written as null when < 0). The multimodal one nests the config under text_config and
     * stores the tensors under "language_model." (as Google publishes them). */
    double query_pre_attn_scalar, attn_softcap, final_softcap, rope_local_base_freq;
    int saved_names; /* multimodal: "model.language_model." as transformers 4.52+ saves it */
    /* MLX affine quantization (mlx-lm's layout: U32 packed weight, F16 scales and biases) of the
     * embedding and every projection at quant_bits (2, 4 or 8) in groups of quant_group, when
     * quant_bits > 0; lm_head at 8 bits through a per-module entry of config.json's
     * "quantization", and layer 0's down_proj left in floats through a `false` entry. */
    int quant_bits, quant_group;
    /* Mixture of experts, for MixtralForCausalLM and Qwen3MoeForCausalLM: n_experts experts
     * of moe_intermediate_size (Mixtral: intermediate_size) with top-k routing; Qwen3-MoE's
     * norm_topk_prob, decoder_sparse_step (written when > 0) and one mlp_only_layers entry
     * (when >= 0; the others: an empty list). */
    int n_experts, n_experts_per_tok, moe_intermediate_size, norm_topk_prob;
    int decoder_sparse_step, mlp_only_layer;
    /* Written at the top level of config.json when > 0 (longrope reads it there). */
    int original_max_position_embeddings;
    uint64_t seed;
} TinyCheckpointSpec;

/* Whether layer l of the spec has experts (HF's Qwen3MoeDecoderLayer rule; Mixtral: all). */
int tiny_layer_is_moe(const TinyCheckpointSpec *s, int l);

typedef struct {
    char name[128];
    int n_dims;
    int shape[2];
    float *values; /* as stored in the file, decoded (quantized: scale * q + bias) */
    int qbits, qgroup; /* quantized when qbits > 0 */
    uint32_t *packed;  /* [rows][cols * qbits / 32] */
    float *scales, *biases; /* [rows][cols / qgroup], F16 values */
} TinyTensor;

typedef struct {
    TinyCheckpointSpec spec;
    int n_tensors;
    TinyTensor *tensors;
} TinyCheckpoint;

/* Whether the spec's architecture is a Gemma (Gemma2ForCausalLM, Gemma3...). */
int tiny_is_gemma(const TinyCheckpointSpec *s);

/* 2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16, intermediate 96, vocab 300, F32,
 * Llama, theta 10000, eps 1e-5, one file, seed 1. */
TinyCheckpointSpec tiny_ckpt_default_spec(void);

/* Writes the checkpoint into dir (which must exist, e.g. from scratch_create()). */
TinyCheckpoint *tiny_ckpt_write(const char *dir, const TinyCheckpointSpec *spec);
void tiny_ckpt_free(TinyCheckpoint *ck);
/* The decoded values of tensor `name`, or NULL when the checkpoint has none. */
const float *tiny_ckpt_tensor(const TinyCheckpoint *ck, const char *name);

/* A byte-level BPE tokenizer.json (GPT-2 style) and tokenizer_config.json in dir: ids 0..255
 * are the bytes, 256.. a few merges ("th", "the", " t", "in"), added tokens "<s>" = 290 (BOS,
 * prepended) and "</s>" = 291 (EOS); every id fits the default vocab of 300. */
void tiny_ckpt_write_tokenizer(const char *dir);
/* GPT-2's bytes_to_unicode, written from its definition (independent of traces/model/tokenizer.c):
 * bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF are their own code point; the rest get 256, 257,
 * ... in byte order. */
unsigned byte_code_point(unsigned b);
#define TINY_BOS 290
#define TINY_EOS 291

/* Config edits for error tests: sets key to the JSON value text, or deletes it (value NULL). */
void tiny_ckpt_set_config(const char *dir, const char *key, const char *json_value);
/* Replaces field (e.g. "dtype", "shape", "data_offsets") of a tensor's entry in the header of
 * a safetensors file with the JSON value text, keeping the data area; value NULL deletes the
 * whole tensor entry (its bytes stay: a layout the loader refuses, see tiny_ckpt_remove_tensor). */
void tiny_ckpt_edit_header(const char *path, const char *tensor, const char *field,
                           const char *json_value);
/* Removes a tensor from a safetensors file, its entry and its bytes (the later tensors'
 * data_offsets move down), so that the file stays valid: deleting the entry alone leaves bytes
 * that belong to no tensor, which the loader refuses. */
void tiny_ckpt_remove_tensor(const char *path, const char *tensor);
/* Writes a safetensors file as given: header_len is the 8-byte length field (it need not be
 * the length of header_json, which is written followed by `padding` spaces), then the data. */
void tiny_safetensors_write_raw(const char *path, uint64_t header_len, const char *header_json,
                                size_t padding, const void *data, size_t data_len);
/* Overwrites one float32 value of a tensor in a safetensors file written by tiny_ckpt_write
 * (F32 only), e.g. with NaN. */
void tiny_ckpt_poke_f32(const char *path, const char *tensor, size_t index, float value);

#endif
