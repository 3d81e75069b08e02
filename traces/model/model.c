#include "traces/model/model.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "sim/base/json.h"
#include "sim/format/trace.h"
#include "traces/model/moe.h"

/* Larger extents than this are corrupt configs. Products of config values are checked
 * separately (check_products). */
#define CONFIG_MAX_EXTENT (1 << 24)
/* Head counts: the forward pass keeps per-KV-head arrays on the stack. */
#define CONFIG_MAX_HEADS 4096

/* Config text (architecture, RoPE type) echoed in a message: one line, bounded. */
#define ESC(s, buf) kv_escape((s), strlen(s), (buf), sizeof(buf))

static const double PI = 3.14159265358979323846;

typedef struct {
    const char *path;
    const cJSON *root; /* the model's keys: config.json, or its text_config (multimodal Gemma 3) */
    KvErr *err;
    const char *rope_key; /* "rope_scaling" or "rope_parameters", for messages */
    const cJSON *rope_object; /* that object, or NULL */
    const cJSON *top;     /* config.json's object */
    const char *key_prefix; /* "" or "text_config.", for messages about root's keys */
} ConfigReader;

static const cJSON *config_item(const cJSON *obj, const char *key)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNull(item) ? NULL : item;
}

/* A positive integer key; when absent, *out = dflt, or an error if dflt < 0 (required). */
static int config_int(ConfigReader *r, const cJSON *obj, const char *key, int dflt, int *out)
{
    const cJSON *item = config_item(obj, key);
    if (!item) {
        if (dflt < 0)
            return kv_fail(r->err, "%s: key '%s' missing (expected a positive integer)", r->path,
                           key);
        *out = dflt;
        return 0;
    }
    double d = cJSON_IsNumber(item) ? item->valuedouble : -1;
    if (!(d >= 1 && d <= CONFIG_MAX_EXTENT) || d != floor(d))
        return kv_fail(r->err, "%s: key '%s' must be a positive integer below %d", r->path, key,
                       CONFIG_MAX_EXTENT);
    *out = (int)d;
    return 0;
}

/* A positive number key; when absent, *out = dflt, or an error if dflt < 0 (required). */
static int config_double(ConfigReader *r, const cJSON *obj, const char *key, double dflt,
                         double *out)
{
    const cJSON *item = config_item(obj, key);
    if (!item) {
        if (dflt < 0)
            return kv_fail(r->err, "%s: key '%s' missing (expected a positive number)", r->path,
                           key);
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsNumber(item) || !(item->valuedouble > 0) || !isfinite(item->valuedouble))
        return kv_fail(r->err, "%s: key '%s' must be a positive number", r->path, key);
    *out = item->valuedouble;
    return 0;
}

static int config_bool(ConfigReader *r, const cJSON *obj, const char *key, int dflt, int *out)
{
    const cJSON *item = config_item(obj, key);
    if (!item) {
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsBool(item))
        return kv_fail(r->err, "%s: key '%s' must be true or false", r->path, key);
    *out = cJSON_IsTrue(item);
    return 0;
}

static int parse_architecture(ConfigReader *r, ModelConfig *cfg)
{
    const cJSON *archs = config_item(r->root, "architectures");
    const cJSON *first = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    if (!cJSON_IsString(first))
        return kv_fail(r->err, "%s: key 'architectures' missing (expected a list naming one of: "
                       MODEL_SUPPORTED_ARCHITECTURES ")", r->path);
    static const struct {
        const char *name;
        ModelArch arch;
    } known[] = {{"LlamaForCausalLM", ARCH_LLAMA},
                 {"MistralForCausalLM", ARCH_MISTRAL},
                 {"Qwen2ForCausalLM", ARCH_QWEN2},
                 {"Qwen3ForCausalLM", ARCH_QWEN3},
                 {"Gemma2ForCausalLM", ARCH_GEMMA2},
                 {"Gemma3ForCausalLM", ARCH_GEMMA3},
                 {"Gemma3ForConditionalGeneration", ARCH_GEMMA3},
                 {"MixtralForCausalLM", ARCH_MIXTRAL},
                 {"Qwen3MoeForCausalLM", ARCH_QWEN3_MOE}};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (!strcmp(first->valuestring, known[i].name)) {
            cfg->arch = known[i].arch;
            snprintf(cfg->architecture, sizeof cfg->architecture, "%s", known[i].name);
            /* The multimodal checkpoint: its language model's keys are under text_config (the
             * vision tower is not loaded). */
            if (!strcmp(known[i].name, "Gemma3ForConditionalGeneration")) {
                const cJSON *text = config_item(r->root, "text_config");
                if (!cJSON_IsObject(text))
                    return kv_fail(r->err, "%s: key 'text_config' missing (expected the text "
                                   "model's config as an object)", r->path);
                r->root = text;
                r->key_prefix = "text_config.";
            }
            return 0;
        }
    char name[128];
    return kv_fail(r->err, "%s: architecture '%s' is not supported (supported: "
                   MODEL_SUPPORTED_ARCHITECTURES ")", r->path, ESC(first->valuestring, name));
}

/* YaRN's keys (transformers modeling_rope_utils.py, _compute_yarn_parameters): the original
 * context (default max_position_embeddings), beta_fast and beta_slow (32 and 1 when absent or
 * 0), truncate (default true), and the attention factor: given, or from mscale and
 * mscale_all_dim when both are set, or 0.1 ln(factor) + 1 (1 when factor <= 1). */
static double yarn_mscale(double scale, double mscale)
{
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

static int parse_yarn(ConfigReader *r, const cJSON *scaling, ModelConfig *cfg)
{
    double mscale = 0, mscale_all_dim = 0, attention = 0;
    if (config_int(r, scaling, "original_max_position_embeddings", cfg->max_position_embeddings,
                   &cfg->rope_original_max_positions) != 0 ||
        config_double(r, scaling, "attention_factor", 0, &attention) != 0 ||
        config_double(r, scaling, "mscale", 0, &mscale) != 0 ||
        config_double(r, scaling, "mscale_all_dim", 0, &mscale_all_dim) != 0 ||
        config_double(r, scaling, "beta_fast", 32, &cfg->rope_beta_fast) != 0 ||
        config_double(r, scaling, "beta_slow", 1, &cfg->rope_beta_slow) != 0 ||
        config_bool(r, scaling, "truncate", 1, &cfg->rope_truncate) != 0)
        return -1;
    if (cfg->rope_original_max_positions == 0)
        return kv_fail(r->err, "%s: rope_scaling: yarn needs 'original_max_position_embeddings' "
                       "(or the config's 'max_position_embeddings')", r->path);
    if (!(cfg->rope_beta_fast > cfg->rope_beta_slow))
        return kv_fail(r->err, "%s: rope_scaling: yarn's beta_fast must exceed beta_slow",
                       r->path);
    cfg->rope_attention_factor =
        attention > 0                     ? attention
        : mscale > 0 && mscale_all_dim > 0 ? yarn_mscale(cfg->rope_factor, mscale) /
                                                 yarn_mscale(cfg->rope_factor, mscale_all_dim)
                                           : yarn_mscale(cfg->rope_factor, 1.0);
    return 0;
}

/* A list of head_dim / 2 positive numbers (longrope's factors). */
static int config_factor_list(ConfigReader *r, const cJSON *scaling, const char *key, int half,
                              double *out)
{
    const cJSON *list = config_item(scaling, key);
    if (!list)
        return kv_fail(r->err, "%s: key '%s.%s' missing (longrope needs short_factor and "
                       "long_factor)", r->path, r->rope_key, key);
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) != half)
        return kv_fail(r->err, "%s: key '%s.%s' must be a list of head_dim / 2 = %d numbers",
                       r->path, r->rope_key, key, half);
    int i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        if (!cJSON_IsNumber(item) || !(item->valuedouble > 0) || !isfinite(item->valuedouble))
            return kv_fail(r->err, "%s: key '%s.%s' entry %d must be a positive number", r->path,
                           r->rope_key, key, i);
        out[i++] = item->valuedouble;
    }
    return 0;
}

/* LongRoPE (transformers modeling_rope_utils.py, _compute_longrope_parameters): the pretrained
 * context is the config's top-level original_max_position_embeddings, and then factor is
 * max_position_embeddings over it; without it, the context is max_position_embeddings and factor
 * the rope_scaling's (optional). The attention factor: given, or sqrt(1 + ln(factor) /
 * ln(original context)) (1 when factor <= 1). The summary replaces the object's text (its factor
 * lists do not fit a trace header's line; the trace records the frequencies themselves). */
static int parse_longrope(ConfigReader *r, const cJSON *scaling, ModelConfig *cfg)
{
    int half = cfg->head_dim / 2;
    double attention = 0;
    if (half > MODEL_MAX_LONGROPE_PAIRS)
        return kv_fail(r->err, "%s: key '%s': longrope with head_dim %d is beyond kvsim (at most "
                       "%d)", r->path, r->rope_key, cfg->head_dim, 2 * MODEL_MAX_LONGROPE_PAIRS);
    if (config_factor_list(r, scaling, "short_factor", half, cfg->rope_short_factor) != 0 ||
        config_factor_list(r, scaling, "long_factor", half, cfg->rope_long_factor) != 0 ||
        config_double(r, scaling, "attention_factor", 0, &attention) != 0 ||
        config_int(r, r->root, "original_max_position_embeddings", 0,
                   &cfg->rope_original_max_positions) != 0)
        return -1;
    if (cfg->rope_original_max_positions) {
        if (cfg->max_position_embeddings == 0)
            return kv_fail(r->err, "%s: key 'max_position_embeddings' missing (longrope's factor "
                           "is it over original_max_position_embeddings)", r->path);
        cfg->rope_factor = (double)cfg->max_position_embeddings / cfg->rope_original_max_positions;
    } else {
        if (cfg->max_position_embeddings == 0)
            return kv_fail(r->err, "%s: key 'max_position_embeddings' missing (longrope needs it "
                           "or 'original_max_position_embeddings')", r->path);
        cfg->rope_original_max_positions = cfg->max_position_embeddings;
        if (config_double(r, scaling, "factor", attention > 0 ? 1.0 : -1, &cfg->rope_factor) != 0)
            return -1;
    }
    cfg->rope_attention_factor =
        attention > 0 ? attention
        : cfg->rope_factor <= 1
            ? 1.0
            : sqrt(1 + log(cfg->rope_factor) / log((double)cfg->rope_original_max_positions));
    snprintf(cfg->rope_scaling, sizeof cfg->rope_scaling,
             "{\"rope_type\":\"longrope\",\"original_max_position_embeddings\":%d,"
             "\"factor\":%.17g,\"attention_factor\":%.17g,\"short_factor\":\"%d values\","
             "\"long_factor\":\"%d values\"}",
             cfg->rope_original_max_positions, cfg->rope_factor, cfg->rope_attention_factor, half,
             half);
    return 0;
}

/* rope_scaling (or transformers 5's rope_parameters): the type under "rope_type" or "type". */
/* transformers 5's rope_parameters per layer type (Gemma 3: {"full_attention": {...},
 * "sliding_attention": {...}}): the global layers' object in *params, the sliding layers' base
 * in rope_local_theta (their RoPE must be unscaled, as Gemma 3's local one is). */
static int parse_rope_by_layer_type(ConfigReader *r, ModelConfig *cfg, const cJSON **params)
{
    const cJSON *full = config_item(*params, "full_attention");
    const cJSON *local = config_item(*params, "sliding_attention");
    if (!full && !local)
        return 0;
    if (!cJSON_IsObject(full) || (local && !cJSON_IsObject(local)))
        return kv_fail(r->err, "%s: key 'rope_parameters': per layer type, 'full_attention' (and "
                       "'sliding_attention') must be objects", r->path);
    *params = full;
    if (!local)
        return 0;
    const cJSON *type = config_item(local, "rope_type");
    if (type && !(cJSON_IsString(type) && !strcmp(type->valuestring, "default")))
        return kv_fail(r->err, "%s: key 'rope_parameters.sliding_attention.rope_type': only "
                       "\"default\" is supported", r->path);
    if (cfg->arch != ARCH_GEMMA3)
        return kv_fail(r->err, "%s: key 'rope_parameters.sliding_attention': a separate RoPE for "
                       "sliding layers is supported for Gemma 3 only", r->path);
    return config_double(r, local, "rope_theta", 0, &cfg->rope_local_theta);
}

static int parse_rope(ConfigReader *r, ModelConfig *cfg, double default_theta)
{
    const cJSON *params = config_item(r->root, "rope_parameters");
    if (cJSON_IsObject(params) && parse_rope_by_layer_type(r, cfg, &params) != 0)
        return -1;
    const cJSON *scaling = config_item(r->root, "rope_scaling");
    r->rope_key = "rope_scaling";
    if (!scaling && cJSON_IsObject(params)) {
        scaling = params;
        r->rope_key = "rope_parameters";
    }
    if (config_double(r, r->root, "rope_theta", default_theta, &cfg->rope_theta) != 0)
        return -1;
    if (cJSON_IsObject(params) && config_item(params, "rope_theta") &&
        config_double(r, params, "rope_theta", -1, &cfg->rope_theta) != 0)
        return -1;
    snprintf(cfg->rope_type, sizeof cfg->rope_type, "default");
    cfg->rope_factor = 1.0;
    cfg->rope_attention_factor = 1.0;
    if (!scaling)
        return 0;
    if (!cJSON_IsObject(scaling))
        return kv_fail(r->err, "%s: key 'rope_scaling' must be an object or null", r->path);
    const cJSON *type = config_item(scaling, "rope_type");
    if (!type)
        type = config_item(scaling, "type");
    if (!cJSON_IsString(type))
        return kv_fail(r->err, "%s: key 'rope_scaling' needs a string 'rope_type' (or 'type')",
                       r->path);
    const char *t = type->valuestring;
    char type_text[64];
    if (strcmp(t, "default") && strcmp(t, "linear") && strcmp(t, "dynamic") && strcmp(t, "llama3") &&
        strcmp(t, "yarn") && strcmp(t, "longrope"))
        return kv_fail(r->err, "%s: rope_scaling type '%s' is not supported (supported: default, "
                       "linear, dynamic, llama3, yarn, longrope)", r->path, ESC(t, type_text));
    snprintf(cfg->rope_type, sizeof cfg->rope_type, "%s", t);
    r->rope_object = scaling;
    if (!strcmp(t, "longrope"))
        return 0; /* parse_longrope, once head_dim is known */
    snprintf(cfg->rope_type, sizeof cfg->rope_type, "%s", t);
    char *text = cJSON_PrintUnformatted(scaling);
    size_t len = strlen(text);
    if (len < sizeof cfg->rope_scaling)
        memcpy(cfg->rope_scaling, text, len + 1);
    cJSON_free(text);
    if (len >= sizeof cfg->rope_scaling)
        return kv_fail(r->err, "%s: key 'rope_scaling' is longer than %zu characters", r->path,
                       sizeof cfg->rope_scaling - 1);
    if (!strcmp(t, "default"))
        return 0;
    if (config_double(r, scaling, "factor", -1, &cfg->rope_factor) != 0)
        return -1;
    if (!strcmp(t, "dynamic") && cfg->max_position_embeddings == 0)
        return kv_fail(r->err, "%s: key 'max_position_embeddings' missing (dynamic rope_scaling "
                       "needs it)", r->path);
    if (!strcmp(t, "llama3")) {
        if (config_double(r, scaling, "low_freq_factor", -1, &cfg->rope_low_freq_factor) != 0 ||
            config_double(r, scaling, "high_freq_factor", -1, &cfg->rope_high_freq_factor) != 0 ||
            config_int(r, scaling, "original_max_position_embeddings", -1,
                       &cfg->rope_original_max_positions) != 0)
            return -1;
        if (!(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor))
            return kv_fail(r->err, "%s: rope_scaling: high_freq_factor must exceed "
                           "low_freq_factor", r->path);
    }
    if (!strcmp(t, "yarn"))
        return parse_yarn(r, scaling, cfg);
    return 0;
}

static int is_token_id(const cJSON *item)
{
    return cJSON_IsNumber(item) && item->valuedouble >= 0 && item->valuedouble <= INT_MAX &&
           item->valuedouble == floor(item->valuedouble);
}

/* eos_token_id may be an id or a list of ids. */
static int parse_special_tokens(ConfigReader *r, ModelConfig *cfg)
{
    cfg->bos_token_id = -1;
    /* A multimodal config may state them beside text_config rather than in it. */
    const cJSON *bos = config_item(r->root, "bos_token_id");
    if (!bos)
        bos = config_item(r->top, "bos_token_id");
    if (cJSON_IsNumber(bos)) {
        if (!is_token_id(bos))
            return kv_fail(r->err, "%s: key 'bos_token_id' must be a token id (a non-negative "
                           "integer)", r->path);
        cfg->bos_token_id = bos->valueint;
    }
    const cJSON *eos = config_item(r->root, "eos_token_id");
    if (!eos)
        eos = config_item(r->top, "eos_token_id");
    if (!eos)
        return 0;
    int n = cJSON_IsArray(eos) ? cJSON_GetArraySize(eos) : 1;
    if (n > (int)(sizeof cfg->eos_token_ids / sizeof cfg->eos_token_ids[0]))
        return kv_fail(r->err, "%s: key 'eos_token_id' lists more than 8 ids", r->path);
    for (int i = 0; i < n; i++) {
        const cJSON *id = cJSON_IsArray(eos) ? cJSON_GetArrayItem(eos, i) : eos;
        if (!is_token_id(id))
            return kv_fail(r->err, "%s: key 'eos_token_id' must be a token id or a list of them",
                           r->path);
        cfg->eos_token_ids[cfg->n_eos++] = id->valueint;
    }
    return 0;
}

/* The routing keys of a mixture-of-experts architecture (HF's MixtralConfig and
 * Qwen3MoeConfig). Those that decide which experts a token uses and how they are weighed are
 * required, though HF's config classes have defaults for them (Mixtral 8 experts, top 2;
 * Qwen3-MoE 128, top 8, norm_topk_prob false): a checkpoint that leaves them out is not one
 * kvsim should guess about. decoder_sparse_step (1) and mlp_only_layers ([]) keep HF's
 * defaults. */
static int parse_moe(ConfigReader *r, ModelConfig *cfg)
{
    if (cfg->arch != ARCH_MIXTRAL && cfg->arch != ARCH_QWEN3_MOE)
        return 0;
    int mixtral = cfg->arch == ARCH_MIXTRAL;
    const char *experts_key = mixtral ? "num_local_experts" : "num_experts";
    static const char *const required[] = {"num_local_experts", "num_experts",
                                           "num_experts_per_tok", "moe_intermediate_size",
                                           "norm_topk_prob"};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        int wanted = mixtral ? i == 0 || i == 2 : i != 0;
        if (wanted && !config_item(r->root, required[i]))
            return kv_fail(r->err, "%s: key '%s' missing (%s routes each token to experts: "
                           "it needs %s, num_experts_per_tok%s)", r->path, required[i],
                           cfg->architecture, experts_key,
                           mixtral ? "" : ", moe_intermediate_size and norm_topk_prob");
    }
    if (config_int(r, r->root, experts_key, -1, &cfg->n_experts) != 0 ||
        config_int(r, r->root, "num_experts_per_tok", -1, &cfg->n_experts_per_tok) != 0)
        return -1;
    if (cfg->n_experts_per_tok > cfg->n_experts)
        return kv_fail(r->err, "%s: key 'num_experts_per_tok' (%d) exceeds %s (%d)", r->path,
                       cfg->n_experts_per_tok, experts_key, cfg->n_experts);
    if (mixtral) {
        cfg->moe_intermediate_size = cfg->intermediate_size;
        cfg->norm_topk_prob = 1; /* MixtralSparseMoeBlock always renormalizes */
        cfg->decoder_sparse_step = 1;
        return 0;
    }
    if (config_int(r, r->root, "moe_intermediate_size", -1, &cfg->moe_intermediate_size) != 0 ||
        config_bool(r, r->root, "norm_topk_prob", 0, &cfg->norm_topk_prob) != 0 ||
        config_int(r, r->root, "decoder_sparse_step", 1, &cfg->decoder_sparse_step) != 0)
        return -1;
    const cJSON *only = config_item(r->root, "mlp_only_layers");
    if (!only)
        return 0;
    if (!cJSON_IsArray(only))
        return kv_fail(r->err, "%s: key 'mlp_only_layers' must be a list of layer indices",
                       r->path);
    if (cJSON_GetArraySize(only) > MODEL_MAX_MLP_ONLY_LAYERS)
        return kv_fail(r->err, "%s: key 'mlp_only_layers' lists more than %d layers", r->path,
                       MODEL_MAX_MLP_ONLY_LAYERS);
    const cJSON *item;
    cJSON_ArrayForEach(item, only) {
        if (!cJSON_IsNumber(item) || item->valuedouble != floor(item->valuedouble) ||
            item->valuedouble < 0 || item->valuedouble >= cfg->n_layers)
            return kv_fail(r->err, "%s: key 'mlp_only_layers' must list layer indices in [0, %d)",
                           r->path, cfg->n_layers);
        cfg->mlp_only_layers[cfg->n_mlp_only_layers++] = item->valueint;
    }
    return 0;
}

int model_layer_is_moe(const ModelConfig *c, int layer)
{
    if (c->n_experts == 0 || (layer + 1) % c->decoder_sparse_step != 0)
        return 0;
    for (int i = 0; i < c->n_mlp_only_layers; i++)
        if (c->mlp_only_layers[i] == layer)
            return 0;
    return 1;
}

/* Every size the forward pass derives from the config fits an int: the per-token widths
 * (q/k/v), the weight matrices and the per-token sizes over all layers. The forward pass
 * computes some of them in int, and every allocation it makes is then sized by numbers that
 * the weights' shapes confirm (a product that wrapped around could match a small tensor and
 * ask for terabytes). Each factor is at most CONFIG_MAX_EXTENT and heads at most
 * CONFIG_MAX_HEADS, so these int64 products cannot overflow. */
static int check_products(ConfigReader *r, const ModelConfig *c)
{
    const int64_t L = c->n_layers, H = c->hidden_size, I = c->intermediate_size,
                  Hq = c->n_q_heads, Hkv = c->n_kv_heads, D = c->head_dim, V = c->vocab_size;
    const struct {
        const char *keys;
        int64_t value;
    } products[] = {
        {"num_attention_heads x head_dim", Hq * D},
        {"num_key_value_heads x head_dim", Hkv * D},
        {"hidden_size x num_attention_heads x head_dim", H * Hq * D},
        {"hidden_size x num_key_value_heads x head_dim", H * Hkv * D},
        {"hidden_size x intermediate_size", H * I},
        {"vocab_size x hidden_size", V * H},
        {"num_hidden_layers x num_attention_heads x head_dim", L * Hq * D},
        {"num_hidden_layers x num_key_value_heads x head_dim", L * Hkv * D},
        {"num_hidden_layers x hidden_size", L * H},
        {"hidden_size x moe_intermediate_size", H * c->moe_intermediate_size},
        {"hidden_size x num_experts", H * c->n_experts},
    };
    for (size_t i = 0; i < sizeof products / sizeof products[0]; i++)
        if (products[i].value > INT_MAX)
            return kv_fail(r->err, "%s: %s = %lld is too large (at most %d: the keys are "
                           "corrupt or the model is beyond kvsim)", r->path, products[i].keys,
                           (long long)products[i].value, INT_MAX);
    return 0;
}

/* Index of the first frequency the forward pass cannot use, or -1: each must be finite and
 * > 0, and so must its angle at any position an int can hold. */
static int unusable_frequency(const double *freq, int half)
{
    for (int f = 0; f < half; f++)
        if (!(freq[f] > 0) || !isfinite(freq[f] * (double)INT_MAX))
            return f;
    return -1;
}

/* The RoPE frequencies, checked once at load against config.json: rope_theta alone, then
 * with the scaling, for the shortest and the longest run ("dynamic" stretches the base more
 * as the run grows, monotonically, so the two ends bound every run length). */
static int check_rope(ConfigReader *r, const ModelConfig *cfg)
{
    int half = cfg->head_dim / 2;
    double *freq = kv_malloc((size_t)half * sizeof *freq);
    int rc = 0, bad;
    rope_default_inv_freq(cfg->rope_theta, cfg->head_dim, freq);
    if ((bad = unusable_frequency(freq, half)) >= 0) {
        rc = kv_fail(r->err, "%s: key 'rope_theta' (%g) gives RoPE frequency %d = %g with "
                     "head_dim %d (expected finite and > 0, with finite angles)", r->path,
                     cfg->rope_theta, bad, freq[bad], cfg->head_dim);
    } else {
        const int runs[2] = {1, INT_MAX};
        for (int i = 0; i < 2 && rc == 0; i++) {
            model_rope_inv_freq(cfg, runs[i], freq);
            if ((bad = unusable_frequency(freq, half)) >= 0)
                rc = kv_fail(r->err, "%s: key '%s': %s factor %g gives RoPE frequency %d = %g%s "
                             "(expected finite and > 0, with finite angles)", r->path,
                             r->rope_key, cfg->rope_type, cfg->rope_factor, bad, freq[bad],
                             i ? " for long runs" : "");
        }
    }
    free(freq);
    return rc;
}

/* ---- Sliding-window layers ---- */

/* layer_types (transformers 4.53+): "sliding_attention" or "full_attention" per layer, into
 * listed[]; returns 1 when the config has the key, 0 when not, -1 on an error. */
static int parse_layer_types(ConfigReader *r, const ModelConfig *cfg, unsigned char *listed)
{
    const cJSON *types = config_item(r->root, "layer_types");
    if (!types)
        return 0;
    if (!cJSON_IsArray(types) || cJSON_GetArraySize(types) != cfg->n_layers)
        return kv_fail(r->err, "%s: key '%slayer_types' must be a list of %d entries (one per "
                       "layer, num_hidden_layers)", r->path, r->key_prefix, cfg->n_layers);
    for (int l = 0; l < cfg->n_layers; l++) {
        const cJSON *t = cJSON_GetArrayItem(types, l);
        int sliding = cJSON_IsString(t) && !strcmp(t->valuestring, "sliding_attention");
        if (!sliding && !(cJSON_IsString(t) && !strcmp(t->valuestring, "full_attention")))
            return kv_fail(r->err, "%s: key '%slayer_types' entry %d must be \"sliding_attention\" "
                           "or \"full_attention\"", r->path, r->key_prefix, l);
        listed[l] = (unsigned char)sliding;
    }
    return 1;
}

/* Each layer's window (ModelConfig.layer_sliding): the architecture's rule from its keys, as
 * transformers' configuration classes derive their default layer_types (configuration_qwen2.py,
 * configuration_gemma2.py, configuration_gemma3.py); a layer_types list given beside keys that
 * state a rule must agree with it. */
static int parse_layer_windows(ConfigReader *r, ModelConfig *cfg)
{
    int L = cfg->n_layers, gemma = cfg->arch == ARCH_GEMMA2 || cfg->arch == ARCH_GEMMA3;
    int qwen = cfg->arch == ARCH_QWEN2 || cfg->arch == ARCH_QWEN3;
    /* Llama has no sliding layers (its configs' sliding_window, if any, is unused by HF). */
    int use_sliding = cfg->arch != ARCH_LLAMA, max_window_layers = 0, pattern = 0;
    /* The key whose rule layer_types must agree with, NULL: none states one. */
    const char *rule_key = NULL;
    if (cfg->arch == ARCH_QWEN3_MOE) {
        /* transformers' Qwen3-MoE has applied its window by two rules: the layers from
         * max_window_layers on (its first releases, as Qwen2), then every layer (its attention
         * takes config.sliding_window whatever the layer); a checkpoint that enables it has no
         * one reference to follow. */
        int enabled;
        if (config_bool(r, r->root, "use_sliding_window", 0, &enabled) != 0)
            return -1;
        if (enabled)
            return kv_fail(r->err, "%s: key 'use_sliding_window': Qwen3-MoE sliding-window "
                           "layers are not supported (transformers' releases disagree on which "
                           "layers slide; expected false)", r->path);
        use_sliding = 0;
    }
    if (qwen) {
        if (config_bool(r, r->root, "use_sliding_window", 0, &use_sliding) != 0)
            return -1;
        /* Read only when it matters (checkpoints without sliding layers carry any value);
         * 0 = every layer slides. */
        const cJSON *mwl = config_item(r->root, "max_window_layers");
        if (use_sliding && !(cJSON_IsNumber(mwl) && mwl->valuedouble == 0) &&
            config_int(r, r->root, "max_window_layers", 28, &max_window_layers) != 0)
            return -1;
        if (use_sliding)
            rule_key = "max_window_layers";
    }
    if (cfg->arch == ARCH_GEMMA3) {
        if (config_item(r->root, "sliding_window_pattern"))
            rule_key = "sliding_window_pattern";
        if (config_int(r, r->root, "sliding_window_pattern", 6, &pattern) != 0)
            return -1;
    }
    /* The window defaults to 4096 (Gemma2Config, Gemma3TextConfig, Qwen2Config); Mistral has
     * none unless the key says so. Qwen's sliding_window counts only with use_sliding_window. */
    if (use_sliding && config_int(r, r->root, "sliding_window", gemma || qwen ? 4096 : 0,
                                  &cfg->sliding_window) != 0)
        return -1;
    if (!use_sliding)
        cfg->sliding_window = 0;
    if (cfg->sliding_window && L > MODEL_MAX_WINDOW_LAYERS)
        return kv_fail(r->err, "%s: num_hidden_layers = %d with sliding-window layers: at most %d "
                       "layers are supported", r->path, L, MODEL_MAX_WINDOW_LAYERS);
    unsigned char rule[MODEL_MAX_WINDOW_LAYERS] = {0}, listed[MODEL_MAX_WINDOW_LAYERS] = {0};
    for (int l = 0; l < L && cfg->sliding_window; l++)
        rule[l] = cfg->arch == ARCH_GEMMA2   ? (l + 1) % 2 != 0
                  : cfg->arch == ARCH_GEMMA3 ? (l + 1) % pattern != 0
                  : qwen                     ? l >= max_window_layers
                                             : 1;
    int has_list = L <= MODEL_MAX_WINDOW_LAYERS ? parse_layer_types(r, cfg, listed) : 0;
    if (has_list < 0)
        return -1;
    if (!has_list) {
        memcpy(cfg->layer_sliding, rule, sizeof rule);
        return 0;
    }
    int n_sliding = 0;
    for (int l = 0; l < L; l++) {
        if (rule_key && listed[l] != rule[l])
            return kv_fail(r->err, "%s: key '%slayer_types' says layer %d is %s, but key '%s%s' "
                           "makes it %s", r->path, r->key_prefix, l,
                           listed[l] ? "sliding" : "global", r->key_prefix, rule_key,
                           rule[l] ? "sliding" : "global");
        n_sliding += listed[l];
    }
    if (n_sliding && !cfg->sliding_window)
        return kv_fail(r->err, "%s: key '%slayer_types' lists sliding layers, but key "
                       "'%ssliding_window' is missing or disabled", r->path, r->key_prefix,
                       r->key_prefix);
    memcpy(cfg->layer_sliding, listed, sizeof listed);
    if (!n_sliding)
        cfg->sliding_window = 0;
    return 0;
}

/* ---- Gemma 2 and 3 ---- */

/* A soft-capping key: null or absent (none), or a positive number. */
static int config_softcap(ConfigReader *r, const char *key, double dflt, double *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(r->root, key);
    if (item && cJSON_IsNull(item)) {
        *out = 0;
        return 0;
    }
    return config_double(r, r->root, key, dflt, out);
}

/* The parameters that make a Gemma (HF modeling_gemma2.py, modeling_gemma3.py): RMSNorm scaled
 * by (1 + weight), norms around the attention and MLP outputs, GeGLU with the tanh GELU,
 * embeddings times sqrt(hidden_size), attention scale query_pre_attn_scalar^-1/2, soft-capped
 * logits (Gemma 2: attention and final logits; Gemma 3: final logits only, q/k norms and the
 * local RoPE base rope_local_base_freq for sliding layers). */
static int parse_gemma(ConfigReader *r, ModelConfig *cfg)
{
    int g3 = cfg->arch == ARCH_GEMMA3;
    cfg->norm_unit_offset = cfg->sandwich_norms = cfg->gelu_tanh = 1;
    cfg->embed_scale = sqrt((double)cfg->hidden_size);
    cfg->qk_norm = g3;
    const cJSON *act = config_item(r->root, "hidden_activation");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "gelu_pytorch_tanh") != 0))
        return kv_fail(r->err, "%s: key '%shidden_activation' must be \"gelu_pytorch_tanh\" "
                       "(GeGLU MLP)", r->path, r->key_prefix);
    if (config_double(r, r->root, "query_pre_attn_scalar", 256, &cfg->query_pre_attn_scalar) != 0 ||
        config_softcap(r, "final_logit_softcapping", g3 ? 0 : 30.0, &cfg->final_softcap) != 0 ||
        config_softcap(r, "attn_logit_softcapping", g3 ? 0 : 50.0, &cfg->attn_softcap) != 0)
        return -1;
    /* transformers' Gemma 3 attention keeps attn_logit_softcapping but never applies it. */
    if (g3 && cfg->attn_softcap > 0)
        return kv_fail(r->err, "%s: key '%sattn_logit_softcapping': Gemma 3 does not apply "
                       "attention soft-capping (expected null)", r->path, r->key_prefix);
    if (g3) {
        if (config_double(r, r->root, "rope_local_base_freq",
                          cfg->rope_local_theta > 0 ? cfg->rope_local_theta : 10000.0,
                          &cfg->rope_local_theta) != 0)
            return -1;
        if (cfg->rope_attention_factor != 1.0)
            return kv_fail(r->err, "%s: key '%s': a RoPE attention factor (%g) would apply to "
                           "the global layers only; not supported with Gemma 3's local base",
                           r->path, r->rope_key, cfg->rope_attention_factor);
    }
    return 0;
}

/* Gemma's configuration classes give every size a default (Gemma2Config, Gemma3TextConfig): the
 * multimodal Gemma 3 checkpoints leave most of them out of text_config. */
typedef struct {
    int heads, kv_heads, head_dim, vocab, tie;
    double eps, theta;
} ConfigDefaults;

static int parse_config(ConfigReader *r, ModelConfig *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    if (!cJSON_IsObject(r->root))
        return kv_fail(r->err, "%s: not a JSON object", r->path);
    if (parse_architecture(r, cfg) != 0)
        return -1;
    int gemma = cfg->arch == ARCH_GEMMA2 || cfg->arch == ARCH_GEMMA3;
    ConfigDefaults d = {-1, 0, 0, -1, 0, -1, 10000.0};
    if (gemma)
        d = (ConfigDefaults){8, 4, 256, cfg->arch == ARCH_GEMMA3 ? 262208 : 256000, 1, 1e-6,
                             cfg->arch == ARCH_GEMMA3 ? 1e6 : 10000.0};
    if (config_int(r, r->root, "hidden_size", -1, &cfg->hidden_size) != 0 ||
        config_int(r, r->root, "intermediate_size", -1, &cfg->intermediate_size) != 0 ||
        config_int(r, r->root, "num_hidden_layers", -1, &cfg->n_layers) != 0 ||
        config_int(r, r->root, "num_attention_heads", d.heads, &cfg->n_q_heads) != 0 ||
        config_int(r, r->root, "num_key_value_heads", gemma ? d.kv_heads : cfg->n_q_heads,
                   &cfg->n_kv_heads) != 0 ||
        config_int(r, r->root, "vocab_size", d.vocab, &cfg->vocab_size) != 0 ||
        config_double(r, r->root, "rms_norm_eps", d.eps, &cfg->rms_norm_eps) != 0 ||
        config_int(r, r->root, "max_position_embeddings", 0, &cfg->max_position_embeddings) != 0 ||
        config_bool(r, r->root, "tie_word_embeddings", d.tie, &cfg->tie_word_embeddings) != 0 ||
        parse_rope(r, cfg, d.theta) != 0 || parse_special_tokens(r, cfg) != 0)
        return -1;
    if (cfg->n_q_heads > CONFIG_MAX_HEADS || cfg->n_kv_heads > CONFIG_MAX_HEADS)
        return kv_fail(r->err, "%s: key '%s' must be at most %d", r->path,
                       cfg->n_q_heads > CONFIG_MAX_HEADS ? "num_attention_heads"
                                                         : "num_key_value_heads",
                       CONFIG_MAX_HEADS);
    if (cfg->n_q_heads % cfg->n_kv_heads != 0)
        return kv_fail(r->err, "%s: num_key_value_heads (%d) must divide num_attention_heads (%d)",
                       r->path, cfg->n_kv_heads, cfg->n_q_heads);
    int default_head_dim = gemma ? d.head_dim : cfg->hidden_size / cfg->n_q_heads;
    if (!gemma && !config_item(r->root, "head_dim") &&
        default_head_dim * cfg->n_q_heads != cfg->hidden_size)
        return kv_fail(r->err, "%s: key 'head_dim' missing and hidden_size (%d) is not a multiple "
                       "of num_attention_heads (%d)", r->path, cfg->hidden_size, cfg->n_q_heads);
    if (config_int(r, r->root, "head_dim", default_head_dim, &cfg->head_dim) != 0)
        return -1;
    if (cfg->head_dim % 2 != 0)
        return kv_fail(r->err, "%s: key 'head_dim' must be even for RoPE (got %d)", r->path,
                       cfg->head_dim);
    if (!strcmp(cfg->rope_type, "longrope") && parse_longrope(r, r->rope_object, cfg) != 0)
        return -1;
    if (check_products(r, cfg) != 0)
        return -1;
    cfg->embed_scale = 1.0;
    const cJSON *act = config_item(r->root, "hidden_act");
    if (!gemma && act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
        return kv_fail(r->err, "%s: key 'hidden_act' must be \"silu\" (SwiGLU MLP)", r->path);
    int attention_bias, mlp_bias;
    if (config_bool(r, r->root, "attention_bias", 0, &attention_bias) != 0 ||
        config_bool(r, r->root, "mlp_bias", 0, &mlp_bias) != 0)
        return -1;
    if (mlp_bias)
        return kv_fail(r->err, "%s: key 'mlp_bias': MLP biases are not supported", r->path);
    switch (cfg->arch) {
    case ARCH_QWEN2:
        cfg->qkv_bias = 1; /* Qwen2 always has q/k/v biases and never an o_proj bias */
        break;
    case ARCH_MISTRAL:
    case ARCH_MIXTRAL:
        break;
    case ARCH_QWEN3:
    case ARCH_QWEN3_MOE:
        cfg->qk_norm = 1;
        /* fallthrough */
    case ARCH_LLAMA:
    case ARCH_GEMMA2:
    case ARCH_GEMMA3:
        cfg->qkv_bias = cfg->o_bias = attention_bias;
        break;
    }
    if (gemma && parse_gemma(r, cfg) != 0)
        return -1;
    if (parse_moe(r, cfg) != 0 || check_products(r, cfg) != 0)
        return -1;
    if (parse_layer_windows(r, cfg) != 0)
        return -1;
    return check_rope(r, cfg);
}

int model_config_load(const char *config_path, ModelConfig *cfg, KvErr *err)
{
    cJSON *root = json_load_file(config_path, JSON_OBJECT | JSON_UNIQUE_KEYS, err);
    if (!root)
        return -1;
    ConfigReader r = {config_path, root, err, "rope_scaling", NULL, root, ""};
    int rc = parse_config(&r, cfg);
    cJSON_Delete(root);
    return rc;
}

void model_rope_inv_freq(const ModelConfig *cfg, int n_tokens, double *out)
{
    int half = cfg->head_dim / 2;
    double theta = cfg->rope_theta;
    if (!strcmp(cfg->rope_type, "dynamic") && n_tokens > cfg->max_position_embeddings) {
        /* NTK-aware base stretch (HF _compute_dynamic_ntk_parameters). */
        double stretch = cfg->rope_factor * n_tokens / cfg->max_position_embeddings -
                         (cfg->rope_factor - 1.0);
        theta *= pow(stretch, (double)cfg->head_dim / (cfg->head_dim - 2));
    }
    rope_default_inv_freq(theta, cfg->head_dim, out);
    if (!strcmp(cfg->rope_type, "linear")) {
        for (int f = 0; f < half; f++)
            out[f] /= cfg->rope_factor;
    } else if (!strcmp(cfg->rope_type, "llama3")) {
        /* Long wavelengths are slowed by `factor`, short ones kept, the band between blended
         * (HF _compute_llama3_parameters). */
        double old_context = cfg->rope_original_max_positions;
        double low_freq_wavelen = old_context / cfg->rope_low_freq_factor;
        double high_freq_wavelen = old_context / cfg->rope_high_freq_factor;
        for (int f = 0; f < half; f++) {
            double wavelen = 2.0 * PI / out[f];
            if (wavelen > low_freq_wavelen) {
                out[f] /= cfg->rope_factor;
            } else if (wavelen >= high_freq_wavelen) {
                double smooth = (old_context / wavelen - cfg->rope_low_freq_factor) /
                                (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
                out[f] = (1.0 - smooth) * out[f] / cfg->rope_factor + smooth * out[f];
            }
        }
    } else if (!strcmp(cfg->rope_type, "longrope")) {
        /* Each pair's frequency divided by its factor: the long ones for a run past the
         * pretrained context (HF picks them by the sequence length; see docs/generator.md). */
        const double *ext = n_tokens > cfg->rope_original_max_positions ? cfg->rope_long_factor
                                                                        : cfg->rope_short_factor;
        for (int f = 0; f < half; f++)
            out[f] /= ext[f];
    } else if (!strcmp(cfg->rope_type, "yarn")) {
        /* Pairs that turn fewer than beta_slow times over the original context are
         * interpolated (slowed by `factor`), those that turn more than beta_fast times kept,
         * with a linear ramp between the two pair indices (HF _compute_yarn_parameters). */
        double D = cfg->head_dim, base = cfg->rope_theta, orig = cfg->rope_original_max_positions;
        double low = D * log(orig / (cfg->rope_beta_fast * 2 * PI)) / (2 * log(base));
        double high = D * log(orig / (cfg->rope_beta_slow * 2 * PI)) / (2 * log(base));
        if (cfg->rope_truncate) {
            low = floor(low);
            high = ceil(high);
        }
        low = fmax(low, 0);
        high = fmin(high, D - 1);
        if (low == high)
            high += 0.001; /* as HF: no zero-width ramp */
        for (int f = 0; f < half; f++) {
            double ramp = fmin(fmax((f - low) / (high - low), 0), 1);
            double extrapolation = 1 - ramp; /* the share of the unscaled frequency */
            out[f] = out[f] / cfg->rope_factor * (1 - extrapolation) + out[f] * extrapolation;
        }
    }
}

int64_t model_n_params(const ModelConfig *c)
{
    const int64_t H = c->hidden_size, I = c->intermediate_size, D = c->head_dim,
                  q_dim = (int64_t)c->n_q_heads * D, kv_dim = (int64_t)c->n_kv_heads * D;
    int64_t layer = 2 * H                          /* input and post-attention norms */
                    + q_dim * H + 2 * kv_dim * H   /* q, k, v */
                    + H * q_dim;                   /* o */
    if (c->qkv_bias)
        layer += q_dim + 2 * kv_dim;
    if (c->o_bias)
        layer += H;
    if (c->qk_norm)
        layer += 2 * D;
    if (c->sandwich_norms)
        layer += 2 * H; /* the attention and MLP output norms */
    int64_t embed = (int64_t)c->vocab_size * H, total = c->n_layers * layer;
    for (int l = 0; l < c->n_layers; l++)
        if (model_layer_is_moe(c, l)) /* the router, each expert's gate, up and down */
            total += c->n_experts * (H + 3 * H * (int64_t)c->moe_intermediate_size);
        else /* gate, up, down */
            total += 3 * H * I;
    return total + embed * (c->tie_word_embeddings ? 1 : 2) + H /* final norm */;
}

int model_layer_window(const ModelConfig *c, int layer)
{
    return layer < MODEL_MAX_WINDOW_LAYERS && c->layer_sliding[layer] ? c->sliding_window : 0;
}

void model_describe(const ModelConfig *c, int n_tokens, TraceModel *out)
{
    size_t L = (size_t)c->n_layers, F = (size_t)(c->head_dim / 2);
    *out = (TraceModel){
        .rope_scaling = c->rope_scaling, .n_layers = c->n_layers, .n_q_heads = c->n_q_heads,
        .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim, .rope_theta = c->rope_theta,
        .rope_layout = ROPE_HALF,
        .attn_scale = c->query_pre_attn_scalar > 0 ? 1.0 / sqrt(c->query_pre_attn_scalar)
                                                   : attn_scale_default(c->head_dim),
        .attn_softcap = c->attn_softcap,
        .rope_attention_factor = c->rope_attention_factor,
        .hidden_size = c->hidden_size, .intermediate_size = c->intermediate_size,
        .vocab_size = c->vocab_size, .n_params = model_n_params(c),
    };
    out->window = kv_malloc(L * sizeof *out->window);
    out->rope_inv_freq = kv_malloc(L * F * sizeof *out->rope_inv_freq);
    for (size_t l = 0; l < L; l++) {
        out->window[l] = model_layer_window(c, (int)l);
        if (out->window[l] > 0 && c->rope_local_theta > 0) /* Gemma 3's local layers */
            rope_default_inv_freq(c->rope_local_theta, c->head_dim, out->rope_inv_freq + l * F);
        else
            model_rope_inv_freq(c, n_tokens, out->rope_inv_freq + l * F);
    }
}

/* ---- Weights ---- */

typedef struct {
    Model *model;
    const char *dir;
    KvErr *err;
    const char *config_path;
    cJSON *config;       /* config.json, for its quantization object */
    const cJSON *quant;  /* "quantization" (or "quantization_config"), or NULL */
    /* Where the language model's tensors are: "model." (…ForCausalLM), or in a multimodal
     * Gemma 3 checkpoint "language_model.model." (as published) or "model.language_model."
     * (as transformers 4.52+ saves it), lm_head beside: head_prefix "" or "language_model.". */
    const char *prefix, *head_prefix;
    ModelLoadOptions options;
} WeightLoader;

static void format_shape(const int64_t *shape, int n_dims, char *out, size_t outlen)
{
    size_t at = 0;
    at += (size_t)snprintf(out + at, outlen - at, "[");
    for (int d = 0; d < n_dims && at < outlen; d++)
        at += (size_t)snprintf(out + at, outlen - at, "%s%lld", d ? ", " : "",
                               (long long)shape[d]);
    if (at < outlen)
        snprintf(out + at, outlen - at, "]");
}

/* ---- MLX-quantized weights ----
 * mlx-lm's nn.quantize (affine mode) stores a quantized Linear or Embedding as `weight` (U32,
 * [rows][cols * bits / 32]: element c of a row in bits [bits * (c % k), ...) of word c / k,
 * k = 32 / bits, lowest bits first), `scales` and `biases` ([rows][cols / group_size], 16- or
 * 32-bit floats); w = scale * q + bias per group. config.json's "quantization" gives group_size
 * and bits, and per module (its path, e.g. "model.layers.0.mlp.down_proj") either other values
 * or false (not quantized). kvsim dequantizes to float32 at load. */

/* The module's bits and group size; errors name config.json and the key. */
static int quant_settings(WeightLoader *wl, const char *module, int *bits, int *group)
{
    const cJSON *q = wl->quant;
    if (!q)
        return kv_fail(wl->err, "%s: tensor '%s.scales' says the weights are quantized, but "
                       "key 'quantization' is missing", wl->config_path, module);
    const cJSON *over = cJSON_GetObjectItemCaseSensitive(q, module);
    if (cJSON_IsFalse(over))
        return kv_fail(wl->err, "%s: key 'quantization.%s' is false (not quantized), but tensor "
                       "'%s.scales' exists", wl->config_path, module, module);
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(q, "mode");
    if (mode && !(cJSON_IsString(mode) && !strcmp(mode->valuestring, "affine")))
        return kv_fail(wl->err, "%s: key 'quantization.mode': only \"affine\" is supported",
                       wl->config_path);
    const char *keys[2] = {"bits", "group_size"};
    int *out[2] = {bits, group};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_IsObject(over) ? cJSON_GetObjectItemCaseSensitive(over, keys[i])
                                              : NULL;
        if (!v)
            v = cJSON_GetObjectItemCaseSensitive(q, keys[i]);
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 ||
            v->valuedouble > 4096)
            return kv_fail(wl->err, "%s: key 'quantization%s%s.%s' missing or not a positive "
                           "integer", wl->config_path, cJSON_IsObject(over) ? "." : "",
                           cJSON_IsObject(over) ? module : "", keys[i]);
        *out[i] = v->valueint;
    }
    if (*bits != 2 && *bits != 4 && *bits != 8)
        return kv_fail(wl->err, "%s: key 'quantization' bits = %d for '%s': supported 2, 4 and 8 "
                       "(3, 5 and 6 pack across words)", wl->config_path, *bits, module);
    return 0;
}

/* A [rows][cols] float tensor (scales or biases) as float32, or NULL with a message. */
static float *load_group_params(WeightLoader *wl, const char *name, int rows, int cols)
{
    const SafetensorsTensor *t = safetensors_find(wl->model->checkpoint, name);
    if (!t) {
        kv_fail(wl->err, "%s: missing tensor '%s' (a quantized weight needs scales and biases)",
                wl->dir, name);
        return NULL;
    }
    if (t->dtype == ST_U32 || t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols) {
        char got[128], want[128];
        int64_t expected[2] = {rows, cols};
        format_shape(t->shape, t->n_dims, got, sizeof got);
        format_shape(expected, 2, want, sizeof want);
        kv_fail(wl->err, "%s: tensor '%s' is %s %s, expected a float tensor of shape %s",
                t->file, name, safetensors_dtype_name(t->dtype), got, want);
        return NULL;
    }
    float *out = kv_malloc((size_t)t->n_elements * sizeof(float));
    safetensors_to_f32(t, out);
    return out;
}

/* The dequantized [rows][cols] weight of `module`, owned by the model. */
static float *load_quantized(WeightLoader *wl, const SafetensorsTensor *t, const char *module,
                             int rows, int cols)
{
    int bits, group;
    if (quant_settings(wl, module, &bits, &group) != 0)
        return NULL;
    int per_word = 32 / bits;
    char got[128], want[128], name[320];
    if (cols % group != 0 || cols % per_word != 0) {
        kv_fail(wl->err, "%s: tensor '%s.weight': %d columns are not a multiple of group_size "
                "%d", t->file, module, cols, group);
        return NULL;
    }
    int64_t packed[2] = {rows, cols / per_word};
    if (t->dtype != ST_U32 || t->n_dims != 2 || t->shape[0] != rows ||
        t->shape[1] != packed[1]) {
        format_shape(t->shape, t->n_dims, got, sizeof got);
        format_shape(packed, 2, want, sizeof want);
        kv_fail(wl->err, "%s: tensor '%s.weight' is %s %s, expected U32 %s (%d-bit values packed "
                "%d per word)", t->file, module, safetensors_dtype_name(t->dtype), got, want,
                bits, per_word);
        return NULL;
    }
    snprintf(name, sizeof name, "%s.scales", module);
    float *scales = load_group_params(wl, name, rows, cols / group);
    snprintf(name, sizeof name, "%s.biases", module);
    float *biases = scales ? load_group_params(wl, name, rows, cols / group) : NULL;
    if (!biases) {
        free(scales);
        return NULL;
    }
    float *w = kv_malloc((size_t)rows * cols * sizeof(float));
    const unsigned char *p = t->data;
    uint32_t mask = (1u << bits) - 1;
    for (size_t r = 0; r < (size_t)rows; r++)
        for (size_t c = 0; c < (size_t)cols; c++) {
            size_t at = 4 * (r * (size_t)packed[1] + c / (size_t)per_word);
            uint32_t word = (uint32_t)p[at] | (uint32_t)p[at + 1] << 8 |
                            (uint32_t)p[at + 2] << 16 | (uint32_t)p[at + 3] << 24;
            float q = (float)((word >> (bits * (c % (size_t)per_word))) & mask);
            size_t g = r * (size_t)(cols / group) + c / (size_t)group;
            w[r * (size_t)cols + c] = scales[g] * q + biases[g];
        }
    free(scales);
    free(biases);
    Model *m = wl->model;
    m->owned = kv_realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *m->owned);
    m->owned[m->n_owned++] = w;
    return w;
}


/* t has shape [rows] (cols == 0) or [rows][cols]; else an error. */
static int check_shape(WeightLoader *wl, const SafetensorsTensor *t, const char *name, int rows,
                       int cols)
{
    int64_t expected[2] = {rows, cols};
    int n_dims = cols ? 2 : 1;
    if (t->n_dims != n_dims || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        char got[128], want[128];
        format_shape(t->shape, t->n_dims, got, sizeof got);
        format_shape(expected, n_dims, want, sizeof want);
        return kv_fail(wl->err, "%s: tensor '%s' has shape %s, the config implies %s", t->file,
                       name, got, want);
    }
    return 0;
}

/* A NaN or infinite weight would make every logit NaN, and greedy decoding then emits token 0
 * forever: it is refused at load, where the tensor can be named. */
static int report_nonfinite(WeightLoader *wl, const SafetensorsTensor *t, const char *name,
                            int cols, size_t i, float value)
{
    char at[64];
    if (cols)
        snprintf(at, sizeof at, "[%zu, %zu]", i / (size_t)cols, i % (size_t)cols);
    else
        snprintf(at, sizeof at, "[%zu]", i);
    return kv_fail(wl->err, "%s: tensor '%s': element %s is %s (weights must be finite)", t->file,
                   name, at, isnan(value) ? "NaN" : "infinite");
}

/* The float32 data of tensor `name`, which must have shape [rows] (cols == 0) or [rows][cols]. */
static const float *load_tensor(WeightLoader *wl, const char *name, int rows, int cols)
{
    const SafetensorsTensor *t = safetensors_find(wl->model->checkpoint, name);
    if (!t) {
        kv_fail(wl->err, "%s: missing tensor '%s'", wl->dir, name);
        return NULL;
    }
    /* A quantized module: NAME.weight with NAME.scales beside it. */
    size_t len = strlen(name);
    const float *values = NULL;
    if (cols && len > 7 && !strcmp(name + len - 7, ".weight")) {
        char module[300], scales[320];
        snprintf(module, sizeof module, "%.*s", (int)(len - 7), name);
        snprintf(scales, sizeof scales, "%s.scales", module);
        if (safetensors_find(wl->model->checkpoint, scales)) {
            if (!(values = load_quantized(wl, t, module, rows, cols)))
                return NULL;
            goto check_finite;
        }
    }
    if (t->dtype == ST_U32) {
        kv_fail(wl->err, "%s: tensor '%s' is U32 (packed quantized values) without its scales "
                "beside it", t->file, name);
        return NULL;
    }
    if (check_shape(wl, t, name, rows, cols) != 0)
        return NULL;
    if (t->dtype == ST_F32 && (uintptr_t)t->data % sizeof(float) == 0) {
        values = (const float *)(const void *)t->data;
    } else {
        Model *m = wl->model;
        float *converted = kv_malloc((size_t)t->n_elements * sizeof(float));
        safetensors_to_f32(t, converted);
        m->owned = kv_realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *m->owned);
        m->owned[m->n_owned++] = converted;
        values = converted;
    }
check_finite:
    for (size_t i = 0; i < (size_t)t->n_elements; i++)
        if (!isfinite(values[i])) {
            report_nonfinite(wl, t, name, cols, i, values[i]);
            return NULL;
        }
    return values;
}

/* A weight matrix: a BF16/F16 tensor stays in the mapping (unless options.f32_weights), any
 * other is loaded as load_tensor loads it. */
static int load_matrix(WeightLoader *wl, const char *name, int rows, int cols, WeightMatrix *out)
{
    Model *m = wl->model;
    const SafetensorsTensor *t = safetensors_find(m->checkpoint, name);
    char module[320];
    snprintf(module, sizeof module, "%.*s.scales", (int)strlen(name) - 7, name);
    *out = (WeightMatrix){.rows = rows, .cols = cols};
    if (t && (t->dtype == ST_BF16 || t->dtype == ST_F16) && !wl->options.f32_weights &&
        !safetensors_find(m->checkpoint, module)) {
        if (check_shape(wl, t, name, rows, cols) != 0)
            return -1;
        out->half = t->data;
        out->bf16 = t->dtype == ST_BF16;
        int64_t bad = matrix_first_nonfinite(out);
        if (bad >= 0) {
            float value;
            matrix_row(&(WeightMatrix){.rows = 1, .cols = 1, .half = t->data + 2 * bad,
                                       .bf16 = out->bf16},
                       0, &value);
            return report_nonfinite(wl, t, name, cols, (size_t)bad, value);
        }
    } else if (!(out->f32 = load_tensor(wl, name, rows, cols))) {
        return -1;
    }
    if (matrix_scratch_floats(out) > m->matrix_scratch_floats)
        m->matrix_scratch_floats = matrix_scratch_floats(out);
    return 0;
}

static int load_matrix_cb(void *wl, const char *name, int rows, int cols, WeightMatrix *out)
{
    return load_matrix(wl, name, rows, cols, out);
}

static int load_layer(WeightLoader *wl, int i, LayerWeights *lw)
{
    const ModelConfig *c = &wl->model->config;
    int q_dim = c->n_q_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    char name[256];
#define LOAD(field, suffix, rows, cols)                                                     \
    do {                                                                                    \
        snprintf(name, sizeof name, "%slayers.%d.%s", wl->prefix, i, suffix);              \
        if (!(lw->field = load_tensor(wl, name, rows, cols)))                               \
            return -1;                                                                      \
    } while (0)
#define LOAD_MATRIX(field, suffix, rows, cols)                                              \
    do {                                                                                    \
        snprintf(name, sizeof name, "%slayers.%d.%s", wl->prefix, i, suffix);              \
        if (load_matrix(wl, name, rows, cols, &lw->field) != 0)                             \
            return -1;                                                                      \
    } while (0)
    LOAD(input_norm, "input_layernorm.weight", c->hidden_size, 0);
    LOAD_MATRIX(wq, "self_attn.q_proj.weight", q_dim, c->hidden_size);
    LOAD_MATRIX(wk, "self_attn.k_proj.weight", kv_dim, c->hidden_size);
    LOAD_MATRIX(wv, "self_attn.v_proj.weight", kv_dim, c->hidden_size);
    LOAD_MATRIX(wo, "self_attn.o_proj.weight", c->hidden_size, q_dim);
    if (c->qkv_bias) {
        LOAD(bq, "self_attn.q_proj.bias", q_dim, 0);
        LOAD(bk, "self_attn.k_proj.bias", kv_dim, 0);
        LOAD(bv, "self_attn.v_proj.bias", kv_dim, 0);
    }
    if (c->o_bias)
        LOAD(bo, "self_attn.o_proj.bias", c->hidden_size, 0);
    if (c->qk_norm) {
        LOAD(q_norm, "self_attn.q_norm.weight", c->head_dim, 0);
        LOAD(k_norm, "self_attn.k_norm.weight", c->head_dim, 0);
    }
    if (c->sandwich_norms) { /* Gemma: HF's post_attention_layernorm norms the attention output */
        LOAD(attn_out_norm, "post_attention_layernorm.weight", c->hidden_size, 0);
        LOAD(post_attention_norm, "pre_feedforward_layernorm.weight", c->hidden_size, 0);
        LOAD(mlp_out_norm, "post_feedforward_layernorm.weight", c->hidden_size, 0);
    } else {
        LOAD(post_attention_norm, "post_attention_layernorm.weight", c->hidden_size, 0);
    }
    if (model_layer_is_moe(c, i))
        return (lw->moe = moe_load(c, i, load_matrix_cb, wl)) ? 0 : -1;
    LOAD_MATRIX(w_gate, "mlp.gate_proj.weight", c->intermediate_size, c->hidden_size);
    LOAD_MATRIX(w_up, "mlp.up_proj.weight", c->intermediate_size, c->hidden_size);
    LOAD_MATRIX(w_down, "mlp.down_proj.weight", c->hidden_size, c->intermediate_size);
#undef LOAD
#undef LOAD_MATRIX
    return 0;
}

static int load_weights(WeightLoader *wl)
{
    Model *m = wl->model;
    const ModelConfig *c = &m->config;
    TransformerWeights *w = &m->weights;
    static const char *const prefixes[][2] = {{"model.", ""},
                                              {"language_model.model.", "language_model."},
                                              {"model.language_model.", ""}};
    wl->prefix = prefixes[0][0];
    wl->head_prefix = prefixes[0][1];
    char name[128];
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        snprintf(name, sizeof name, "%sembed_tokens.weight", prefixes[i][0]);
        if (safetensors_find(m->checkpoint, name)) {
            wl->prefix = prefixes[i][0];
            wl->head_prefix = prefixes[i][1];
            break;
        }
    }
    snprintf(name, sizeof name, "%sembed_tokens.weight", wl->prefix);
    if (load_matrix(wl, name, c->vocab_size, c->hidden_size, &w->token_embedding) != 0)
        return -1;
    snprintf(name, sizeof name, "%snorm.weight", wl->prefix);
    if (!(w->final_norm = load_tensor(wl, name, c->hidden_size, 0)))
        return -1;
    /* The last layer first, so that a corrupt num_hidden_layers allocates nothing. */
    char last[96];
    snprintf(last, sizeof last, "%slayers.%d.input_layernorm.weight", wl->prefix,
             c->n_layers - 1);
    if (!safetensors_find(m->checkpoint, last))
        return kv_fail(wl->err, "%s: missing tensor '%s' (config.json has num_hidden_layers %d)",
                       wl->dir, last, c->n_layers);
    w->layers = kv_calloc((size_t)c->n_layers, sizeof *w->layers);
    for (int i = 0; i < c->n_layers; i++)
        if (load_layer(wl, i, &w->layers[i]) != 0)
            return -1;
    if (c->tie_word_embeddings) {
        w->lm_head = w->token_embedding;
        return 0;
    }
    snprintf(name, sizeof name, "%slm_head.weight", wl->head_prefix);
    if (load_matrix(wl, name, c->vocab_size, c->hidden_size, &w->lm_head) != 0)
        return -1;
    return 0;
}

Model *model_load(const char *dir, KvErr *err)
{
    return model_load_with(dir, NULL, err);
}

Model *model_load_with(const char *dir, const ModelLoadOptions *options, KvErr *err)
{
    char config_path[4096];
    snprintf(config_path, sizeof config_path, "%s/config.json", dir);
    Model *m = kv_calloc(1, sizeof *m);
    if (model_config_load(config_path, &m->config, err) != 0 ||
        !(m->checkpoint = safetensors_open_dir(dir, err))) {
        model_free(m);
        return NULL;
    }
    WeightLoader wl = {m, dir, err, config_path, NULL, NULL, "model.", "", {0}};
    if (options)
        wl.options = *options;
    if (!(wl.config = json_load_file(config_path, JSON_OBJECT | JSON_UNIQUE_KEYS, err))) {
        model_free(m);
        return NULL;
    }
    wl.quant = config_item(wl.config, "quantization");
    if (!wl.quant)
        wl.quant = config_item(wl.config, "quantization_config");
    int rc = wl.quant && !cJSON_IsObject(wl.quant)
                 ? kv_fail(err, "%s: key 'quantization' must be an object", config_path)
                 : load_weights(&wl);
    cJSON_Delete(wl.config);
    if (rc != 0) {
        model_free(m);
        return NULL;
    }
    return m;
}

void model_free(Model *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    if (m->weights.layers)
        for (int l = 0; l < m->config.n_layers; l++)
            moe_free(m->weights.layers[l].moe);
    free(m->weights.layers);
    safetensors_close(m->checkpoint);
    free(m);
}
