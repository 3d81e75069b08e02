#include "tests/support/tiny_ckpt.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>

#include "sim/base/util.h"

TinyCheckpointSpec tiny_ckpt_default_spec(void)
{
    return (TinyCheckpointSpec){
        .architecture = "LlamaForCausalLM", .n_layers = 2, .hidden_size = 64,
        .intermediate_size = 96, .n_q_heads = 4, .n_kv_heads = 2, .vocab_size = 300,
        .head_dim = 16, .rope_theta = 10000.0, .rms_norm_eps = 1e-5, .dtype = TINY_F32,
        .n_shards = 1, .max_position_embeddings = 512, .eos_token_id = -1, .seed = 1,
        .mlp_only_layer = -1,
    };
}

/* ---- Number formats, written here independently of the loader's decoders ---- */

static uint16_t encode_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t round_to_nearest_even = 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)((bits + round_to_nearest_even) >> 16);
}

static float decode_bf16(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even; the test weights are finite and far below the half range. */
static uint16_t encode_f16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t sign = (bits >> 16) & 0x8000, mantissa = bits & 0x7fffff;
    int exponent = (int)((bits >> 23) & 0xff) - 127 + 15;
    if (exponent >= 31)
        return (uint16_t)(sign | 0x7c00);
    if (exponent <= 0) {
        if (exponent < -10)
            return (uint16_t)sign;
        mantissa |= 0x800000;
        int shift = 14 - exponent;
        uint32_t half = mantissa >> shift, rest = mantissa & ((1u << shift) - 1),
                 halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exponent << 10) | (mantissa >> 13), rest = mantissa & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1)))
        half++; /* a carry into the exponent is still the right rounding */
    return (uint16_t)half;
}

static float decode_f16(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float f;
    if (exponent == 0) {
        f = (float)mantissa * 0x1p-24f;
        return sign ? -f : f;
    }
    uint32_t bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    memcpy(&f, &bits, sizeof f);
    return f;
}

static size_t dtype_bytes(TinyDtype d) { return d == TINY_F32 ? 4 : 2; }
static const char *dtype_name(TinyDtype d) { return d == TINY_F32 ? "F32" : d == TINY_F16 ? "F16" : "BF16"; }

/* ---- Tensors ---- */

static TinyTensor *add_tensor(TinyCheckpoint *ck, const char *name, int rows, int cols)
{
    ck->tensors = kv_realloc(ck->tensors, (size_t)(ck->n_tensors + 1) * sizeof *ck->tensors);
    TinyTensor *t = &ck->tensors[ck->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->values = kv_malloc((size_t)rows * (cols ? cols : 1) * sizeof(float));
    return t;
}

static size_t tensor_size(const TinyTensor *t)
{
    return (size_t)t->shape[0] * (t->n_dims == 2 ? (size_t)t->shape[1] : 1);
}

/* N(mean, sd^2) values rounded to the checkpoint's dtype. */
static void fill(TinyCheckpoint *ck, gsl_rng *rng, const char *name, int rows, int cols,
                 double mean, double sd)
{
    TinyTensor *t = add_tensor(ck, name, rows, cols);
    for (size_t i = 0; i < tensor_size(t); i++) {
        float x = (float)(mean + gsl_ran_gaussian(rng, sd));
        if (ck->spec.dtype == TINY_BF16)
            x = decode_bf16(encode_bf16(x));
        else if (ck->spec.dtype == TINY_F16)
            x = decode_f16(encode_f16(x));
        t->values[i] = x;
    }
}

/* mlx-lm's affine quantization of a [rows][cols] tensor in place: per group, scale = (max -
 * min) / (2^bits - 1) and bias = min (both rounded to F16), q = round((w - bias) / scale), and
 * the values become scale * q + bias, what the file then stores. */
static void quantize(TinyTensor *t, int bits, int group)
{
    int rows = t->shape[0], cols = t->shape[1], per_word = 32 / bits, G = cols / group;
    uint32_t qmax = (1u << bits) - 1;
    t->qbits = bits;
    t->qgroup = group;
    t->packed = kv_calloc((size_t)rows * cols / per_word, sizeof *t->packed);
    t->scales = kv_malloc((size_t)rows * G * sizeof(float));
    t->biases = kv_malloc((size_t)rows * G * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < G; g++) {
            float *w = t->values + (size_t)r * cols + (size_t)g * group;
            float lo = w[0], hi = w[0];
            for (int i = 1; i < group; i++) {
                lo = w[i] < lo ? w[i] : lo;
                hi = w[i] > hi ? w[i] : hi;
            }
            float scale = decode_f16(encode_f16((hi - lo) / (float)qmax));
            float bias = decode_f16(encode_f16(lo));
            t->scales[(size_t)r * G + g] = scale;
            t->biases[(size_t)r * G + g] = bias;
            for (int i = 0; i < group; i++) {
                double q = scale > 0 ? floor((w[i] - bias) / scale + 0.5) : 0;
                uint32_t qi = q < 0 ? 0 : q > qmax ? qmax : (uint32_t)q;
                int c = g * group + i;
                t->packed[((size_t)r * cols + c) / per_word] |= qi << (bits * (c % per_word));
                w[i] = scale * (float)qi + bias;
            }
        }
}

static int quantized_name(const char *name)
{
    size_t n = strlen(name);
    return (n > 12 && !strcmp(name + n - 12, "_proj.weight")) ||
           !strcmp(name, "model.embed_tokens.weight") || !strcmp(name, "lm_head.weight");
}

static void quantize_all(TinyCheckpoint *ck)
{
    for (int i = 0; i < ck->n_tensors; i++) {
        TinyTensor *t = &ck->tensors[i];
        if (!quantized_name(t->name) || !strcmp(t->name, "model.layers.0.mlp.down_proj.weight"))
            continue;
        quantize(t, !strcmp(t->name, "lm_head.weight") ? 8 : ck->spec.quant_bits,
                 ck->spec.quant_group);
    }
}

int tiny_layer_is_moe(const TinyCheckpointSpec *s, int l)
{
    if (!strcmp(s->architecture, "MixtralForCausalLM"))
        return 1;
    if (strcmp(s->architecture, "Qwen3MoeForCausalLM") != 0)
        return 0;
    int step = s->decoder_sparse_step > 0 ? s->decoder_sparse_step : 1;
    return l != s->mlp_only_layer && s->n_experts > 0 && (l + 1) % step == 0;
}

/* A layer's router and experts under HF's names. The router's rows are spread enough that
 * each token prefers a few experts clearly (no near-ties for the top k). */
static void fill_experts(TinyCheckpoint *ck, gsl_rng *rng, int l)
{
    const TinyCheckpointSpec *s = &ck->spec;
    int mixtral = !strcmp(s->architecture, "MixtralForCausalLM");
    int H = s->hidden_size, I = mixtral ? s->intermediate_size : s->moe_intermediate_size;
    const char *prefix = mixtral ? "block_sparse_moe" : "mlp";
    const char *names[3] = {mixtral ? "w1" : "gate_proj", mixtral ? "w3" : "up_proj",
                            mixtral ? "w2" : "down_proj"};
    char name[160];
    snprintf(name, sizeof name, "model.layers.%d.%s.gate.weight", l, prefix);
    fill(ck, rng, name, s->n_experts, H, 0, 2 / sqrt((double)H));
    for (int e = 0; e < s->n_experts; e++)
        for (int p = 0; p < 3; p++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.experts.%d.%s.weight", l, prefix, e,
                     names[p]);
            fill(ck, rng, name, p == 2 ? H : I, p == 2 ? I : H, 0,
                 1 / sqrt((double)(p == 2 ? I : H)));
        }
}

static void generate(TinyCheckpoint *ck)
{
    const TinyCheckpointSpec *s = &ck->spec;
    int H = s->hidden_size, D = s->head_dim > 0 ? s->head_dim : s->hidden_size / s->n_q_heads;
    int q_dim = s->n_q_heads * D, kv_dim = s->n_kv_heads * D, I = s->intermediate_size;
    int qwen2 = !strcmp(s->architecture, "Qwen2ForCausalLM");
    int qwen3 = !strcmp(s->architecture, "Qwen3ForCausalLM") ||
                !strcmp(s->architecture, "Qwen3MoeForCausalLM");
    int gemma = tiny_is_gemma(s), gemma3 = gemma && strstr(s->architecture, "Gemma3") != NULL;
    int qkv_bias = qwen2 || s->attention_bias, o_bias = !qwen2 && s->attention_bias;
    double norm_mean = gemma ? 0 : 1; /* Gemma stores w for a scale of (1 + w) */
    /* Projections scaled so that attention is far from uniform: scores have sd ~ 2. */
    double proj_sd = 1.5 / sqrt((double)H);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, (unsigned long)s->seed);
    fill(ck, rng, "model.embed_tokens.weight", s->vocab_size, H, 0, 1);
    char name[128];
    for (int l = 0; l < s->n_layers; l++) {
#define NAME(suffix) (snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix), name)
        fill(ck, rng, NAME("input_layernorm.weight"), H, 0, norm_mean, 0.1);
        fill(ck, rng, NAME("self_attn.q_proj.weight"), q_dim, H, 0, proj_sd);
        fill(ck, rng, NAME("self_attn.k_proj.weight"), kv_dim, H, 0, proj_sd);
        fill(ck, rng, NAME("self_attn.v_proj.weight"), kv_dim, H, 0, proj_sd);
        fill(ck, rng, NAME("self_attn.o_proj.weight"), H, q_dim, 0, 1 / sqrt((double)q_dim));
        if (qkv_bias) {
            fill(ck, rng, NAME("self_attn.q_proj.bias"), q_dim, 0, 0, 0.3);
            fill(ck, rng, NAME("self_attn.k_proj.bias"), kv_dim, 0, 0, 0.3);
            fill(ck, rng, NAME("self_attn.v_proj.bias"), kv_dim, 0, 0, 0.3);
        }
        if (o_bias)
            fill(ck, rng, NAME("self_attn.o_proj.bias"), H, 0, 0, 0.3);
        if (qwen3 || gemma3) {
            fill(ck, rng, NAME("self_attn.q_norm.weight"), D, 0, norm_mean, 0.2);
            fill(ck, rng, NAME("self_attn.k_norm.weight"), D, 0, norm_mean, 0.2);
        }
        fill(ck, rng, NAME("post_attention_layernorm.weight"), H, 0, norm_mean, 0.1);
        if (gemma) {
            fill(ck, rng, NAME("pre_feedforward_layernorm.weight"), H, 0, norm_mean, 0.1);
            fill(ck, rng, NAME("post_feedforward_layernorm.weight"), H, 0, norm_mean, 0.1);
        }
        if (tiny_layer_is_moe(s, l)) {
            fill_experts(ck, rng, l);
            continue;
        }
        fill(ck, rng, NAME("mlp.gate_proj.weight"), I, H, 0, 1 / sqrt((double)H));
        fill(ck, rng, NAME("mlp.up_proj.weight"), I, H, 0, 1 / sqrt((double)H));
        fill(ck, rng, NAME("mlp.down_proj.weight"), H, I, 0, 1 / sqrt((double)I));
#undef NAME
    }
    fill(ck, rng, "model.norm.weight", H, 0, norm_mean, 0.1);
    if (!s->tie_word_embeddings)
        fill(ck, rng, "lm_head.weight", s->vocab_size, H, 0, 1 / sqrt((double)H));
    gsl_rng_free(rng);
    if (s->quant_bits > 0)
        quantize_all(ck);
}

/* ---- Files ---- */

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite(data, 1, len, fp) != len || fclose(fp) != 0)
        fail_msg("cannot write %s", path);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        fail_msg("cannot read %s", path);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = kv_malloc((size_t)size + 1);
    if (fread(buf, 1, (size_t)size, fp) != (size_t)size)
        fail_msg("cannot read %s", path);
    fclose(fp);
    buf[size] = '\0';
    *len = (size_t)size;
    return buf;
}

/* 8-byte little-endian header length, header (padded with spaces as the Python writer does,
 * unless unaligned), data. */
static void write_safetensors_raw(const char *path, const char *header_json, size_t header_pad_to,
                                  const unsigned char *data, size_t data_len)
{
    size_t header_len = strlen(header_json);
    size_t padded = header_len;
    while ((8 + padded) % header_pad_to != (header_pad_to == 4 ? 2 : 0))
        padded++;
    size_t total = 8 + padded + data_len;
    unsigned char *buf = kv_malloc(total);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, header_json, header_len);
    memset(buf + 8 + header_len, ' ', padded - header_len);
    memcpy(buf + 8 + padded, data, data_len);
    write_file(path, buf, total);
    free(buf);
}

/* One header entry and its bytes appended to data (little endian). kind: 0 the checkpoint's
 * dtype from floats, 1 F16 from floats, 2 U32 from words. */
static void add_entry(cJSON *header, const char *name, int n_dims, const int *shape, int kind,
                      TinyDtype dtype, const float *values, const uint32_t *words,
                      unsigned char **data, size_t *at)
{
    size_t n = (size_t)shape[0] * (n_dims == 2 ? (size_t)shape[1] : 1);
    size_t width = kind == 2 ? 4 : kind == 1 ? 2 : dtype_bytes(dtype);
    cJSON *entry = cJSON_AddObjectToObject(header, name);
    cJSON_AddStringToObject(entry, "dtype", kind == 2 ? "U32" : kind == 1 ? "F16" : dtype_name(dtype));
    cJSON *dims = cJSON_AddArrayToObject(entry, "shape");
    for (int d = 0; d < n_dims; d++)
        cJSON_AddItemToArray(dims, cJSON_CreateNumber(shape[d]));
    cJSON *offsets = cJSON_AddArrayToObject(entry, "data_offsets");
    cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)*at));
    cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)(*at + n * width)));
    *data = kv_realloc(*data, *at + n * width + 1);
    for (size_t e = 0; e < n; e++) {
        uint32_t word;
        if (kind == 2)
            word = words[e];
        else if (kind == 1)
            word = encode_f16(values[e]);
        else if (dtype == TINY_F32)
            memcpy(&word, &values[e], 4);
        else
            word = dtype == TINY_F16 ? encode_f16(values[e]) : encode_bf16(values[e]);
        for (size_t b = 0; b < width; b++)
            (*data)[*at + e * width + b] = (unsigned char)(word >> (8 * b));
    }
    *at += n * width;
}

int tiny_is_gemma(const TinyCheckpointSpec *s)
{
    return !strncmp(s->architecture, "Gemma", 5);
}

/* The name a tensor has in the file: the multimodal Gemma 3 nests the language model. */
static const char *file_name(const TinyCheckpoint *ck, const char *name, char *buf, size_t len)
{
    if (strcmp(ck->spec.architecture, "Gemma3ForConditionalGeneration") != 0)
        return name;
    if (ck->spec.saved_names && !strncmp(name, "model.", 6))
        snprintf(buf, len, "model.language_model.%s", name + 6);
    else if (ck->spec.saved_names)
        snprintf(buf, len, "%s", name); /* lm_head.weight */
    else
        snprintf(buf, len, "language_model.%s", name);
    return buf;
}

static void write_shard(const TinyCheckpoint *ck, const char *path, int first, int end)
{
    char stored[200];
    cJSON *header = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(header, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    unsigned char *data = NULL;
    size_t at = 0;
    for (int i = first; i < end; i++) {
        const TinyTensor *t = &ck->tensors[i];
        if (!t->qbits) {
            add_entry(header, file_name(ck, t->name, stored, sizeof stored), t->n_dims, t->shape,
                      0, ck->spec.dtype, t->values, NULL, &data, &at);
            continue;
        }
        /* NAME.weight (packed), NAME.scales, NAME.biases */
        char module[128], name[160];
        snprintf(module, sizeof module, "%.*s", (int)(strlen(t->name) - 7), t->name);
        int packed[2] = {t->shape[0], t->shape[1] * t->qbits / 32};
        int groups[2] = {t->shape[0], t->shape[1] / t->qgroup};
        add_entry(header, t->name, 2, packed, 2, ck->spec.dtype, NULL, t->packed, &data, &at);
        snprintf(name, sizeof name, "%s.scales", module);
        add_entry(header, name, 2, groups, 1, ck->spec.dtype, t->scales, NULL, &data, &at);
        snprintf(name, sizeof name, "%s.biases", module);
        add_entry(header, name, 2, groups, 1, ck->spec.dtype, t->biases, NULL, &data, &at);
    }
    char *text = cJSON_PrintUnformatted(header);
    write_safetensors_raw(path, text, ck->spec.unaligned ? 4 : 8, data ? data : (unsigned char *)"",
                          at);
    cJSON_free(text);
    cJSON_Delete(header);
    free(data);
}

static void write_config(const TinyCheckpoint *ck, const char *dir)
{
    const TinyCheckpointSpec *s = &ck->spec;
    cJSON *top = cJSON_CreateObject(), *c = top;
    cJSON *archs = cJSON_AddArrayToObject(top, "architectures");
    cJSON_AddItemToArray(archs, cJSON_CreateString(s->architecture));
    if (!strcmp(s->architecture, "Gemma3ForConditionalGeneration"))
        c = cJSON_AddObjectToObject(top, "text_config");
    if (tiny_is_gemma(s))
        cJSON_AddStringToObject(c, "hidden_activation", "gelu_pytorch_tanh");
    else
        cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "hidden_size", s->hidden_size);
    cJSON_AddNumberToObject(c, "intermediate_size", s->intermediate_size);
    cJSON_AddNumberToObject(c, "num_hidden_layers", s->n_layers);
    cJSON_AddNumberToObject(c, "num_attention_heads", s->n_q_heads);
    cJSON_AddNumberToObject(c, "num_key_value_heads", s->n_kv_heads);
    if (s->head_dim > 0)
        cJSON_AddNumberToObject(c, "head_dim", s->head_dim);
    cJSON_AddNumberToObject(c, "vocab_size", s->vocab_size);
    cJSON_AddNumberToObject(c, "rms_norm_eps", s->rms_norm_eps);
    cJSON_AddNumberToObject(c, "rope_theta", s->rope_theta);
    cJSON_AddNumberToObject(c, "max_position_embeddings", s->max_position_embeddings);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", s->tie_word_embeddings);
    cJSON_AddBoolToObject(c, "attention_bias", s->attention_bias);
    cJSON_AddStringToObject(c, "torch_dtype", s->dtype == TINY_F32 ? "float32" :
                            s->dtype == TINY_F16 ? "float16" : "bfloat16");
    if (s->eos_token_id >= 0)
        cJSON_AddNumberToObject(c, "eos_token_id", s->eos_token_id);
    if (s->sliding_window > 0)
        cJSON_AddNumberToObject(c, "sliding_window", s->sliding_window);
    if (s->use_sliding_window) {
        cJSON_AddBoolToObject(c, "use_sliding_window", 1);
        cJSON_AddNumberToObject(c, "max_window_layers", s->max_window_layers);
    }
    if (s->sliding_window_pattern > 0)
        cJSON_AddNumberToObject(c, "sliding_window_pattern", s->sliding_window_pattern);
    if (s->layer_types) {
        cJSON *types = cJSON_Parse(s->layer_types);
        if (!types)
            fail_msg("tiny_ckpt: layer_types is not JSON: %s", s->layer_types);
        cJSON_AddItemToObject(c, "layer_types", types);
    }
    const struct {
        const char *key;
        double value;
    } gemma_keys[] = {{"query_pre_attn_scalar", s->query_pre_attn_scalar},
                      {"attn_logit_softcapping", s->attn_softcap},
                      {"final_logit_softcapping", s->final_softcap},
                      {"rope_local_base_freq", s->rope_local_base_freq}};
    for (size_t i = 0; i < sizeof gemma_keys / sizeof gemma_keys[0]; i++)
        if (gemma_keys[i].value > 0)
            cJSON_AddNumberToObject(c, gemma_keys[i].key, gemma_keys[i].value);
        else if (gemma_keys[i].value < 0)
            cJSON_AddNullToObject(c, gemma_keys[i].key);
    if (s->original_max_position_embeddings > 0)
        cJSON_AddNumberToObject(c, "original_max_position_embeddings",
                                s->original_max_position_embeddings);
    if (!strcmp(s->architecture, "MixtralForCausalLM")) {
        cJSON_AddNumberToObject(c, "num_local_experts", s->n_experts);
        cJSON_AddNumberToObject(c, "num_experts_per_tok", s->n_experts_per_tok);
    } else if (!strcmp(s->architecture, "Qwen3MoeForCausalLM")) {
        cJSON_AddNumberToObject(c, "num_experts", s->n_experts);
        cJSON_AddNumberToObject(c, "num_experts_per_tok", s->n_experts_per_tok);
        cJSON_AddNumberToObject(c, "moe_intermediate_size", s->moe_intermediate_size);
        cJSON_AddBoolToObject(c, "norm_topk_prob", s->norm_topk_prob);
        if (s->decoder_sparse_step > 0)
            cJSON_AddNumberToObject(c, "decoder_sparse_step", s->decoder_sparse_step);
        cJSON *only = cJSON_AddArrayToObject(c, "mlp_only_layers");
        if (s->mlp_only_layer >= 0)
            cJSON_AddItemToArray(only, cJSON_CreateNumber(s->mlp_only_layer));
    }
    if (s->quant_bits > 0) {
        cJSON *q = cJSON_AddObjectToObject(c, "quantization");
        cJSON_AddNumberToObject(q, "group_size", s->quant_group);
        cJSON_AddNumberToObject(q, "bits", s->quant_bits);
        cJSON *head = cJSON_AddObjectToObject(q, "lm_head");
        cJSON_AddNumberToObject(head, "group_size", s->quant_group);
        cJSON_AddNumberToObject(head, "bits", 8);
        cJSON_AddFalseToObject(q, "model.layers.0.mlp.down_proj");
    }
    if (s->rope_parameters) {
        cJSON *params = cJSON_Parse(s->rope_parameters);
        if (!params)
            fail_msg("tiny_ckpt: rope_parameters is not JSON: %s", s->rope_parameters);
        cJSON_AddItemToObject(c, "rope_parameters", params);
    }
    if (s->rope_scaling) {
        cJSON *scaling = cJSON_Parse(s->rope_scaling);
        if (!scaling)
            fail_msg("tiny_ckpt: rope_scaling is not JSON: %s", s->rope_scaling);
        cJSON_AddItemToObject(c, "rope_scaling", scaling);
    } else {
        cJSON_AddNullToObject(c, "rope_scaling");
    }
    char *text = cJSON_Print(top);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_file(path, text, strlen(text));
    cJSON_free(text);
    cJSON_Delete(top);
}

TinyCheckpoint *tiny_ckpt_write(const char *dir, const TinyCheckpointSpec *spec)
{
    TinyCheckpoint *ck = kv_calloc(1, sizeof *ck);
    ck->spec = *spec;
    generate(ck);
    write_config(ck, dir);
    char path[4096];
    if (spec->n_shards <= 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        write_shard(ck, path, 0, ck->n_tensors);
        return ck;
    }
    /* Two shards split in the middle of the tensor list, so layers straddle files. */
    int split = ck->n_tensors / 2;
    const char *shard_names[2] = {"model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors"};
    cJSON *index = cJSON_CreateObject();
    cJSON_AddObjectToObject(index, "metadata");
    cJSON *map = cJSON_AddObjectToObject(index, "weight_map");
    for (int s = 0; s < 2; s++) {
        int first = s ? split : 0, end = s ? ck->n_tensors : split;
        snprintf(path, sizeof path, "%s/%s", dir, shard_names[s]);
        write_shard(ck, path, first, end);
        for (int i = first; i < end; i++) {
            cJSON_AddStringToObject(map, ck->tensors[i].name, shard_names[s]);
            if (ck->tensors[i].qbits) {
                char name[160];
                const char *n = ck->tensors[i].name;
                snprintf(name, sizeof name, "%.*s.scales", (int)(strlen(n) - 7), n);
                cJSON_AddStringToObject(map, name, shard_names[s]);
                snprintf(name, sizeof name, "%.*s.biases", (int)(strlen(n) - 7), n);
                cJSON_AddStringToObject(map, name, shard_names[s]);
            }
        }
    }
    char *text = cJSON_Print(index);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_file(path, text, strlen(text));
    cJSON_free(text);
    cJSON_Delete(index);
    return ck;
}

void tiny_ckpt_free(TinyCheckpoint *ck)
{
    if (!ck)
        return;
    for (int i = 0; i < ck->n_tensors; i++) {
        free(ck->tensors[i].values);
        free(ck->tensors[i].packed);
        free(ck->tensors[i].scales);
        free(ck->tensors[i].biases);
    }
    free(ck->tensors);
    free(ck);
}

const float *tiny_ckpt_tensor(const TinyCheckpoint *ck, const char *name)
{
    for (int i = 0; i < ck->n_tensors; i++)
        if (!strcmp(ck->tensors[i].name, name))
            return ck->tensors[i].values;
    return NULL;
}

void tiny_ckpt_set_config(const char *dir, const char *key, const char *json_value)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len;
    char *text = read_file(path, &len);
    cJSON *c = cJSON_Parse(text);
    free(text);
    if (!c)
        fail_msg("tiny_ckpt_set_config: %s is not JSON", path);
    cJSON_DeleteItemFromObjectCaseSensitive(c, key);
    if (json_value) {
        cJSON *value = cJSON_Parse(json_value);
        if (!value)
            fail_msg("tiny_ckpt_set_config: bad value %s", json_value);
        cJSON_AddItemToObject(c, key, value);
    }
    text = cJSON_Print(c);
    write_file(path, text, strlen(text));
    cJSON_free(text);
    cJSON_Delete(c);
}

void tiny_ckpt_edit_header(const char *path, const char *tensor, const char *field,
                           const char *json_value)
{
    size_t len;
    char *bytes = read_file(path, &len);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = (header_len << 8) | (unsigned char)bytes[i];
    if (header_len > len - 8)
        fail_msg("tiny_ckpt_edit_header: %s has a bad header", path);
    cJSON *header = cJSON_ParseWithLength(bytes + 8, (size_t)header_len);
    cJSON *entry = cJSON_GetObjectItemCaseSensitive(header, tensor);
    if (!entry)
        fail_msg("tiny_ckpt_edit_header: no tensor %s in %s", tensor, path);
    if (!json_value) {
        cJSON_DeleteItemFromObjectCaseSensitive(header, tensor);
    } else {
        cJSON_DeleteItemFromObjectCaseSensitive(entry, field);
        cJSON_AddItemToObject(entry, field, cJSON_Parse(json_value));
    }
    char *text = cJSON_PrintUnformatted(header);
    size_t data_start = 8 + (size_t)header_len;
    write_safetensors_raw(path, text, 8, (const unsigned char *)bytes + data_start,
                          len - data_start);
    cJSON_free(text);
    cJSON_Delete(header);
    free(bytes);
}

/* The parsed header of a safetensors file held in bytes, and where its data starts. */
static cJSON *read_header(const char *path, const char *bytes, size_t len, size_t *data_start)
{
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = (header_len << 8) | (unsigned char)bytes[i];
    if (len < 8 || header_len > len - 8)
        fail_msg("tiny_ckpt: %s has a bad header", path);
    cJSON *header = cJSON_ParseWithLength(bytes + 8, (size_t)header_len);
    if (!header)
        fail_msg("tiny_ckpt: %s: header is not JSON", path);
    *data_start = 8 + (size_t)header_len;
    return header;
}

static void tensor_offsets(const cJSON *entry, size_t *begin, size_t *end)
{
    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    *begin = (size_t)cJSON_GetArrayItem(offsets, 0)->valuedouble;
    *end = (size_t)cJSON_GetArrayItem(offsets, 1)->valuedouble;
}

void tiny_ckpt_remove_tensor(const char *path, const char *tensor)
{
    size_t len, data_start;
    char *bytes = read_file(path, &len);
    cJSON *header = read_header(path, bytes, len, &data_start);
    cJSON *entry = cJSON_GetObjectItemCaseSensitive(header, tensor);
    if (!entry)
        fail_msg("tiny_ckpt_remove_tensor: no tensor %s in %s", tensor, path);
    size_t begin, end;
    tensor_offsets(entry, &begin, &end);
    cJSON_DeleteItemFromObjectCaseSensitive(header, tensor);
    cJSON *other;
    cJSON_ArrayForEach(other, header)
    {
        if (!strcmp(other->string, "__metadata__"))
            continue;
        size_t b, e;
        tensor_offsets(other, &b, &e);
        if (b >= end) {
            cJSON *offsets = cJSON_GetObjectItemCaseSensitive(other, "data_offsets");
            cJSON_SetNumberValue(cJSON_GetArrayItem(offsets, 0), (double)(b - (end - begin)));
            cJSON_SetNumberValue(cJSON_GetArrayItem(offsets, 1), (double)(e - (end - begin)));
        }
    }
    size_t data_len = len - data_start - (end - begin);
    unsigned char *data = kv_malloc(data_len + 1);
    memcpy(data, bytes + data_start, begin);
    memcpy(data + begin, bytes + data_start + end, len - data_start - end);
    char *text = cJSON_PrintUnformatted(header);
    write_safetensors_raw(path, text, 8, data, data_len);
    cJSON_free(text);
    cJSON_Delete(header);
    free(data);
    free(bytes);
}

void tiny_safetensors_write_raw(const char *path, uint64_t header_len, const char *header_json,
                                size_t padding, const void *data, size_t data_len)
{
    size_t json_len = strlen(header_json), total = 8 + json_len + padding + data_len;
    unsigned char *buf = kv_malloc(total);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(header_len >> (8 * i));
    memcpy(buf + 8, header_json, json_len);
    memset(buf + 8 + json_len, ' ', padding);
    if (data_len)
        memcpy(buf + 8 + json_len + padding, data, data_len);
    write_file(path, buf, total);
    free(buf);
}

void tiny_ckpt_poke_f32(const char *path, const char *tensor, size_t index, float value)
{
    size_t len, data_start;
    char *bytes = read_file(path, &len);
    cJSON *header = read_header(path, bytes, len, &data_start);
    const cJSON *entry = cJSON_GetObjectItemCaseSensitive(header, tensor);
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    if (!entry || !cJSON_IsString(dtype) || strcmp(dtype->valuestring, "F32") != 0)
        fail_msg("tiny_ckpt_poke_f32: no F32 tensor %s in %s", tensor, path);
    size_t begin, end;
    tensor_offsets(entry, &begin, &end);
    if (begin + 4 * (index + 1) > end)
        fail_msg("tiny_ckpt_poke_f32: %s has no element %zu", tensor, index);
    cJSON_Delete(header);
    free(bytes);
    FILE *fp = fopen(path, "r+b");
    if (!fp || fseek(fp, (long)(data_start + begin + 4 * index), SEEK_SET) != 0 ||
        fwrite(&value, 4, 1, fp) != 1 || fclose(fp) != 0)
        fail_msg("tiny_ckpt_poke_f32: cannot write %s", path);
}

unsigned byte_code_point(unsigned b)
{
    unsigned next = 256;
    for (unsigned x = 0; x < 256; x++) {
        int printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
        if (x == b)
            return printable ? x : next;
        if (!printable)
            next++;
    }
    return 0;
}

/* The byte-level spelling of raw text as a JSON string (with quotes). */
static cJSON *byte_level_string(const char *raw)
{
    char buf[64];
    size_t at = 0;
    for (const unsigned char *c = (const unsigned char *)raw; *c; c++) {
        unsigned cp = byte_code_point(*c);
        if (cp < 0x80) {
            buf[at++] = (char)cp;
        } else {
            buf[at++] = (char)(0xC0 | (cp >> 6));
            buf[at++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    buf[at] = '\0';
    return cJSON_CreateString(buf);
}

void tiny_ckpt_write_tokenizer(const char *dir)
{
    static const char *const merged[][3] = {
        {"t", "h", "th"}, {"th", "e", "the"}, {" ", "t", " t"}, {"i", "n", "in"}};
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    const char *specials[2] = {"<s>", "</s>"};
    for (int i = 0; i < 2; i++) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", TINY_BOS + i);
        cJSON_AddStringToObject(t, "content", specials[i]);
        cJSON_AddBoolToObject(t, "special", 1);
        cJSON_AddItemToArray(added, t);
    }
    cJSON_AddNullToObject(root, "normalizer");
    cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "ByteLevel");
    cJSON_AddBoolToObject(pre, "add_prefix_space", 0);
    cJSON_AddBoolToObject(pre, "use_regex", 1);
    cJSON *decoder = cJSON_AddObjectToObject(root, "decoder");
    cJSON_AddStringToObject(decoder, "type", "ByteLevel");
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (int b = 0; b < 256; b++) {
        char raw[2] = {(char)b, 0};
        cJSON *spelled = b ? byte_level_string(raw) : cJSON_CreateString("\xC4\x80");
        cJSON_AddNumberToObject(vocab, spelled->valuestring, b);
        cJSON_Delete(spelled);
    }
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    for (int i = 0; i < 4; i++) {
        cJSON *left = byte_level_string(merged[i][0]), *right = byte_level_string(merged[i][1]);
        cJSON *whole = byte_level_string(merged[i][2]);
        char pair[64];
        snprintf(pair, sizeof pair, "%s %s", left->valuestring, right->valuestring);
        cJSON_AddItemToArray(merges, cJSON_CreateString(pair));
        cJSON_AddNumberToObject(vocab, whole->valuestring, 256 + i);
        cJSON_Delete(left);
        cJSON_Delete(right);
        cJSON_Delete(whole);
    }
    char *text = cJSON_Print(root);
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    write_file(path, text, strlen(text));
    cJSON_free(text);
    cJSON_Delete(root);
    const char *config = "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"add_bos_token\": true}";
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    write_file(path, config, strlen(config));
}
