/* kvquant.h — quantized K/V on the device, a layer under any policy ([policy.X] kv_quant).
 *
 * The one source of truth for kvsim's KV quantizers and their byte counts. The policy driver
 * (sim/driver/driver.c) keeps one KvQuantState per instance and applies it after the policy's
 * own decisions: the policy chooses which tokens stay, the layer decides in what precision each
 * kept token's K and V are stored. A quantized token's slot holds its dequantized K and V as an
 * alt_kv (policies/policy.h), so every query, the metrics and closed-loop decoding attend over
 * the dequantized values; the policy's scorers still read the trace's exact K/V (the LayerView).
 *
 * Schemes (docs/policies.md, "kv_quant"):
 *   kivi2, kivi4  KIVI (jy-yuan/KIVI, models/llama_kivi.py, LlamaAttention_KIVI.forward, and
 *                 quant/new_pack.py, triton_quantize_and_pack_along_last_dim): keys per channel
 *                 over groups of `group` tokens, values per token over groups of `group` channels,
 *                 min-max asymmetric, 2 or 4 bits; a full-precision residual of up to `residual`
 *                 keys (quantized a whole residual at a time) and exactly the last `residual`
 *                 values (quantized one at a time as they leave it).
 *   mlx4, mlx8    mlx-lm's QuantizedKVCache (mlx_lm/models/cache.py, update_and_fetch): every
 *                 token's K and V quantized on arrival, per token over groups of `group` channels
 *                 (64 by default), with mlx's affine quantize (mlx/ops.cpp, affine_quantize: the
 *                 scale chosen so that the group's edge of larger magnitude is exact).
 * Scales, minima and biases are stored as 16-bit floats (the model's dtype in both references)
 * and counted at 2 bytes each. */
#ifndef KVSIM_KVQUANT_H
#define KVSIM_KVQUANT_H

#include <stdbool.h>

#include "policies/policy.h"

typedef enum { KVQ_NONE = 0, KVQ_KIVI2, KVQ_KIVI4, KVQ_MLX4, KVQ_MLX8, KVQ_N_KINDS } KvQuantKind;

/* The values of kv_quant, in KvQuantKind order. */
#define KVQ_CHOICES "none|kivi2|kivi4|mlx4|mlx8"

/* [policy.X] kv_quant, kv_quant_group, kv_quant_residual. */
typedef struct {
    int kind;     /* KvQuantKind */
    int group;    /* 0: the scheme's default (KIVI 32, mlx 64) */
    int residual; /* KIVI's full-precision window (residual_length); mlx ignores it */
} KvQuantSpec;

/* Defaults as written in an INI file, and their ranges (the config loader's table). */
#define KVQ_DEFAULT_RESIDUAL 128

/* The kind of a kv_quant value, or -1; the name of a kind. */
int kvq_parse(const char *name);
const char *kvq_name(int kind);
int kvq_bits(int kind);
bool kvq_is_kivi(int kind);
/* The group size in effect: spec->group, or the scheme's default. */
int kvq_group(const KvQuantSpec *spec);
/* Checks a spec against the layer: KIVI needs residual a multiple of group (its reference
 * asserts it). Returns -1 with a one-line message naming the key. */
int kvq_validate(const KvQuantSpec *spec, KvErr *err);

/* ---- The quantizers: quantize then dequantize n values x[i*stride], into out[i*stride] ---- */

/* KIVI's min-max quantizer of one group: scale = (max - min) / (2^bits - 1), q = round(clamp((x -
 * min) / scale, 0, 2^bits - 1)), x~ = q * scale + min, with scale and min held as halves. A
 * constant group (scale 0) comes back as its value (the reference divides by zero there). */
void kvq_kivi_group(const float *x, int n, int stride, int bits, float *out);
/* mlx's affine quantizer of one group: scale = max((max - min) / (2^bits - 1), 1e-7) with the
 * sign and edge of the larger magnitude, rescaled so that edge / scale is a whole number; bias =
 * that edge (0 when it rounds to 0); q = clamp(round((x - bias) / scale), 0, 2^bits - 1); x~ =
 * q * scale + bias, scale and bias held as halves. */
void kvq_mlx_group(const float *x, int n, int stride, int bits, float *out);
/* One token's head_dim values per token, in groups of `group` channels (the last group shorter
 * when group does not divide head_dim): KIVI's value quantizer, or mlx's for K and V. */
void kvq_token(int kind, int group, const float *x, int head_dim, float *out);

/* ---- Bytes ---- */

/* Device bytes of one token's K (is_key) or V of head_dim channels: kv_bits each when not
 * quantized; else bits per value plus two 16-bit numbers per group (per token and channel group
 * for values and mlx keys; a KIVI key's share of its channel's group of `group` tokens). */
double kvq_vector_bytes(const KvQuantSpec *spec, int head_dim, int kv_bits, bool is_key,
                        bool quantized);

/* ---- The layer's state for one policy instance ---- */

typedef struct KvQuantState KvQuantState;

/* When kvq_apply runs: after a prefill chunk's eviction, after a decode step's admission
 * (before the query attends), after the query's observe (its eviction). */
typedef enum { KVQ_AFTER_PREFILL, KVQ_AFTER_STEP, KVQ_AFTER_OBSERVE } KvQuantMoment;

KvQuantState *kvq_state_new(const KvQuantSpec *spec, const LayerView *L);
void kvq_state_free(KvQuantState *q);
/* Forgets every quantized token (the driver recreated the instance). */
void kvq_state_reset(KvQuantState *q);
/* Quantizes what the scheme stores quantized at this moment, in p's caches: mlx every kept
 * token's K and V (after a prefill chunk and a step); KIVI (after a prefill chunk and an
 * observe) the oldest keys of the full-precision residual a whole multiple of `residual` at a
 * time, in groups of `group` tokens by position, and every value but the last `residual`. Only
 * slots holding a real position with the trace's exact K/V, or K/V this layer quantized, are
 * touched: a policy's own approximate or synthetic slots stay as the policy made them, and so
 * does a slot the layer quantized that the policy has since rewritten (the layer keeps the
 * KVCache alt_stamp of its own writes). A slot the policy admitted again with exact K/V is full
 * precision again. */
void kvq_apply(KvQuantState *q, Policy *p, const LayerView *L, KvQuantMoment when);
/* Device bytes the quantized slots save: sum over p's slots this layer quantized of their bytes
 * at kv_bits minus their bytes quantized (kvq_vector_bytes); subtracted from the policy's own
 * report. */
double kvq_bytes_saved(const KvQuantState *q, const Policy *p, int kv_bits);
/* Whether slot s of KV head g holds K/V this layer quantized (used by the metrics). */
bool kvq_slot_quantized(const KvQuantState *q, const Policy *p, int g, int s);

#endif
