/* Bad checkpoints: each is refused by model_load with one line naming the file and the key or
 * tensor at fault, never a crash or an out-of-bounds read (the sanitizer build checks that). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"
#include "traces/model/model.h"

typedef struct {
    char *dir;
    char weights[8192]; /* path of model.safetensors */
    TinyCheckpoint *ck;
} BadCase;

static int setup(void **state)
{
    BadCase *bc = kv_calloc(1, sizeof *bc);
    bc->dir = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.n_layers = 1;
    bc->ck = tiny_ckpt_write(bc->dir, &spec);
    snprintf(bc->weights, sizeof bc->weights, "%s/model.safetensors", bc->dir);
    *state = bc;
    return 0;
}

static int teardown(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_free(bc->ck);
    scratch_remove(bc->dir);
    free(bc);
    return 0;
}

/* model_load fails, and its message is one line containing every given fragment. */
static void expect_load_error(const BadCase *bc, const char *const *fragments)
{
    KvErr err = {{0}};
    Model *m = model_load(bc->dir, &err);
    if (m) {
        model_free(m);
        fail_msg("model_load accepted a bad checkpoint");
    }
    assert_null(strchr(err.msg, '\n'));
    for (const char *const *f = fragments; *f; f++)
        if (!strstr(err.msg, *f))
            fail_msg("error '%s' does not mention '%s'", err.msg, *f);
}

static void test_good_checkpoint_loads(void **state)
{
    BadCase *bc = *state;
    KvErr err = {{0}};
    Model *m = model_load(bc->dir, &err);
    if (!m)
        fail_msg("%s", err.msg);
    assert_int_equal(m->config.n_layers, 1);
    assert_int_equal(m->config.head_dim, 16);
    assert_int_equal(m->config.n_kv_heads, 2);
    /* F32 and aligned: used in place in the mapping, bit for bit what was written. */
    assert_memory_equal(m->weights.layers[0].wk.f32,
                        tiny_ckpt_tensor(bc->ck, "model.layers.0.self_attn.k_proj.weight"),
                        (size_t)32 * 64 * sizeof(float));
    model_free(m);
}

static void test_missing_config_key(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "num_attention_heads", NULL);
    expect_load_error(bc, (const char *[]){"config.json", "num_attention_heads", "missing", NULL});
}

static void test_bad_config_value(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "num_key_value_heads", "3");
    expect_load_error(bc, (const char *[]){"config.json", "num_key_value_heads", NULL});
    tiny_ckpt_set_config(bc->dir, "num_key_value_heads", "2");
    tiny_ckpt_set_config(bc->dir, "hidden_size", "-64");
    expect_load_error(bc, (const char *[]){"config.json", "hidden_size", NULL});
}

static void test_invalid_config_json(void **state)
{
    BadCase *bc = *state;
    char path[8192];
    snprintf(path, sizeof path, "%s/config.json", bc->dir);
    FILE *fp = fopen(path, "w");
    fputs("{\n  \"hidden_size\": 64,\n  oops\n}\n", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"config.json:3: not valid JSON", NULL});
}

/* The JSON files of a checkpoint hold exactly one object, and no key twice in any object:
 * cJSON would read the first of two equal keys where transformers (Python's json) keeps the
 * last, so that kvsim and the reference would run different models. */
static void test_config_json_rules(void **state)
{
    BadCase *bc = *state;
    /* The shard index, while config.json is still good. */
    FILE *fp = fopen(scratch_path(bc->dir, "model.safetensors.index.json", 0), "w");
    fputs("{\"weight_map\": {\"model.norm.weight\": \"model.safetensors\", "
          "\"model.norm.weight\": \"other.safetensors\"}}", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.safetensors.index.json: key "
                                           "'model.norm.weight' appears twice in the object "
                                           "'weight_map'", NULL});
    const char *config = scratch_path(bc->dir, "config.json", 0);
    const struct {
        const char *text, *said;
    } cases[] = {
        {"{\"hidden_size\": 64}\n\n x", "config.json:3: byte 22: unexpected text after the JSON "
                                      "value"},
        {"[{\"hidden_size\": 64}]", "config.json: expected a JSON object at the top level"},
        {"{\"hidden_size\": 64,\n\"hidden_size\": 128}",
         "config.json: key 'hidden_size' appears twice in the top-level object"},
        {"{\"rope_scaling\": {\"factor\": 2, \"rope_type\": \"linear\", \"factor\": 4}}",
         "config.json: key 'factor' appears twice in the object 'rope_scaling'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fp = fopen(config, "w");
        fputs(cases[i].text, fp);
        fclose(fp);
        expect_load_error(bc, (const char *[]){cases[i].said, NULL});
    }
    /* A large object (sorted, not compared pairwise). */
    fp = fopen(config, "w");
    fputs("{", fp);
    for (int k = 0; k < 40; k++)
        fprintf(fp, "\"k%d\": %d, ", k == 39 ? 7 : k, k);
    fputs("\"x\": 0}", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"config.json: key 'k7' appears twice", NULL});
}

static void test_unsupported_architecture(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "architectures", "[\"GPT2LMHeadModel\"]");
    expect_load_error(bc, (const char *[]){"config.json", "GPT2LMHeadModel", "LlamaForCausalLM",
                                           "Qwen3ForCausalLM", NULL});
}

static void test_unsupported_rope_scaling(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"mrope\", \"factor\": 4}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling", "mrope", "not supported",
                                           NULL});
    /* yarn: beta_fast must exceed beta_slow; a key of the wrong kind names the key */
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4, "
                                                  "\"beta_fast\": 1, \"beta_slow\": 2}");
    expect_load_error(bc, (const char *[]){"config.json", "beta_fast must exceed beta_slow", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4, "
                                                  "\"truncate\": 1}");
    expect_load_error(bc, (const char *[]){"config.json", "'truncate'", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"yarn\"}");
    expect_load_error(bc, (const char *[]){"config.json", "'factor' missing", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8}");
    expect_load_error(bc, (const char *[]){"config.json", "low_freq_factor", NULL});
    /* longrope: both lists of head_dim / 2 = 8 positive numbers */
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"longrope\", \"factor\": 4, "
                                                  "\"short_factor\": [1, 1, 1, 1, 1, 1, 1, 1]}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling.long_factor", "missing",
                                           NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"longrope\", \"factor\": 4, "
                                                  "\"short_factor\": [1, 1, 1, 1, 1, 1, 1], "
                                                  "\"long_factor\": [1, 1, 1, 1, 1, 1, 1, 1]}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling.short_factor", "8 numbers",
                                           NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"longrope\", \"factor\": 4, "
                                                  "\"short_factor\": [1, 1, 1, 1, 1, 1, 1, 1], "
                                                  "\"long_factor\": [1, 1, 1, 0, 1, 1, 1, 1]}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling.long_factor", "entry 3",
                                           NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"longrope\", "
                                                  "\"short_factor\": [1, 1, 1, 1, 1, 1, 1, 1], "
                                                  "\"long_factor\": [1, 1, 1, 1, 1, 1, 1, 1]}");
    expect_load_error(bc, (const char *[]){"config.json", "'factor' missing", NULL});
}

/* An unknown RoPE type through the CLI: exit 2, one line naming the file and the key. */
static void test_unknown_rope_type_cli(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"type\": \"ntk-by-parts\", \"factor\": 2}");
    scratch_write(scratch_path(bc->dir, "tokens.txt", 0), "1 2 3 4\n");
    char args[8192 * 3];
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s' --max-new 2",
             bc->dir, scratch_path(bc->dir, "tokens.txt", 0), scratch_path(bc->dir, "out.h5", 1));
    run_kvsim_fails(args, "config.json", "rope_scaling", "ntk-by-parts", NULL);
}

/* A Qwen3-MoE (or Mixtral) checkpoint of one layer rewritten into bc's directory. */
static void write_moe(BadCase *bc, const char *architecture)
{
    tiny_ckpt_free(bc->ck);
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.architecture = architecture;
    spec.n_layers = 1;
    spec.n_experts = 4;
    spec.n_experts_per_tok = 2;
    spec.moe_intermediate_size = 16;
    spec.norm_topk_prob = 1;
    bc->ck = tiny_ckpt_write(bc->dir, &spec);
}

/* Routing keys missing or inconsistent, an expert's tensor missing or misshapen: one line
 * naming config.json and the key, or the file and the tensor; exit 2 through the CLI. */
static void test_moe_errors(void **state)
{
    BadCase *bc = *state;
    const char *qwen_keys[] = {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                               "norm_topk_prob"};
    for (int i = 0; i < 4; i++) {
        write_moe(bc, "Qwen3MoeForCausalLM");
        tiny_ckpt_set_config(bc->dir, qwen_keys[i], NULL);
        expect_load_error(bc, (const char *[]){"config.json", qwen_keys[i], "missing", NULL});
    }
    const char *mixtral_keys[] = {"num_local_experts", "num_experts_per_tok"};
    for (int i = 0; i < 2; i++) {
        write_moe(bc, "MixtralForCausalLM");
        tiny_ckpt_set_config(bc->dir, mixtral_keys[i], NULL);
        expect_load_error(bc, (const char *[]){"config.json", mixtral_keys[i], "missing", NULL});
    }
    write_moe(bc, "Qwen3MoeForCausalLM");
    tiny_ckpt_set_config(bc->dir, "num_experts_per_tok", "5");
    expect_load_error(bc, (const char *[]){"config.json", "num_experts_per_tok", "exceeds", NULL});
    tiny_ckpt_set_config(bc->dir, "num_experts_per_tok", "2");
    tiny_ckpt_set_config(bc->dir, "norm_topk_prob", "1");
    expect_load_error(bc, (const char *[]){"config.json", "norm_topk_prob", "true or false", NULL});
    tiny_ckpt_set_config(bc->dir, "norm_topk_prob", "true");
    tiny_ckpt_set_config(bc->dir, "mlp_only_layers", "[3]");
    expect_load_error(bc, (const char *[]){"config.json", "mlp_only_layers", NULL});
    tiny_ckpt_set_config(bc->dir, "mlp_only_layers", "[]");
    tiny_ckpt_remove_tensor(bc->weights, "model.layers.0.mlp.experts.3.down_proj.weight");
    expect_load_error(bc, (const char *[]){"model.layers.0.mlp.experts.3.down_proj.weight",
                                           "missing", NULL});
    /* Qwen3-MoE's sliding layers: transformers' releases disagree on which slide. */
    write_moe(bc, "Qwen3MoeForCausalLM");
    tiny_ckpt_set_config(bc->dir, "use_sliding_window", "true");
    tiny_ckpt_set_config(bc->dir, "sliding_window", "8");
    expect_load_error(bc, (const char *[]){"config.json", "use_sliding_window", "Qwen3-MoE",
                                           "not supported", NULL});
    write_moe(bc, "MixtralForCausalLM");
    tiny_ckpt_edit_header(bc->weights, "model.layers.0.block_sparse_moe.gate.weight", "shape",
                          "[64, 4]");
    expect_load_error(bc, (const char *[]){"model.safetensors",
                                           "model.layers.0.block_sparse_moe.gate.weight",
                                           "[64, 4]", "[4, 64]", NULL});
    /* Through the CLI. */
    write_moe(bc, "Qwen3MoeForCausalLM");
    tiny_ckpt_set_config(bc->dir, "num_experts", NULL);
    scratch_write(scratch_path(bc->dir, "tokens.txt", 0), "1 2 3 4\n");
    char args[8192 * 3];
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s' --max-new 2",
             bc->dir, scratch_path(bc->dir, "tokens.txt", 0), scratch_path(bc->dir, "out.h5", 1));
    run_kvsim_fails(args, "config.json", "num_experts", "missing", NULL);
}

/* A 4-bit MLX checkpoint (tiny_ckpt's layout) rewritten into bc's directory. */
static void write_quantized(BadCase *bc)
{
    tiny_ckpt_free(bc->ck);
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.n_layers = 1;
    spec.quant_bits = 4;
    spec.quant_group = 32;
    bc->ck = tiny_ckpt_write(bc->dir, &spec);
}

static void test_bad_quantization(void **state)
{
    BadCase *bc = *state;
    const char *q = "model.layers.0.self_attn.q_proj";
    write_quantized(bc);
    tiny_ckpt_set_config(bc->dir, "quantization", "{\"group_size\": 32, \"bits\": 3}");
    expect_load_error(bc, (const char *[]){"config.json", "bits = 3", "supported 2, 4 and 8", NULL});
    tiny_ckpt_set_config(bc->dir, "quantization", "{\"group_size\": 32, \"bits\": 4, "
                                                  "\"mode\": \"mxfp4\"}");
    expect_load_error(bc, (const char *[]){"config.json", "quantization.mode", "affine", NULL});
    /* the file packs 4-bit values; a config saying 8 bits expects twice the words */
    tiny_ckpt_set_config(bc->dir, "quantization", "{\"group_size\": 32, \"bits\": 8}");
    expect_load_error(bc, (const char *[]){"model.safetensors", "embed_tokens.weight",
                                           "expected U32 [300, 16]", NULL});
    tiny_ckpt_set_config(bc->dir, "quantization", "{\"group_size\": 32}");
    expect_load_error(bc, (const char *[]){"config.json", "quantization.bits", NULL});
    tiny_ckpt_set_config(bc->dir, "quantization", NULL);
    expect_load_error(bc, (const char *[]){"config.json", "'quantization' is missing", NULL});
    write_quantized(bc);
    tiny_ckpt_remove_tensor(bc->weights, "model.layers.0.self_attn.q_proj.biases");
    expect_load_error(bc, (const char *[]){"missing tensor", "q_proj.biases", NULL});
    write_quantized(bc);
    tiny_ckpt_remove_tensor(bc->weights, "model.layers.0.self_attn.q_proj.scales");
    expect_load_error(bc, (const char *[]){"model.safetensors", q, "U32", "without its scales",
                                           NULL});
}

static void truncate_file(const char *path, long size)
{
    assert_int_equal(truncate(path, size), 0);
}

static void test_truncated_safetensors(void **state)
{
    BadCase *bc = *state;
    FILE *fp = fopen(bc->weights, "rb");
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fclose(fp);
    /* Cut inside the data area: the last tensor now ends past the end of the file. */
    truncate_file(bc->weights, size - 100);
    expect_load_error(bc, (const char *[]){"model.safetensors", "lm_head.weight", "past the end",
                                           NULL});
    /* Cut inside the header. */
    truncate_file(bc->weights, 200);
    expect_load_error(bc, (const char *[]){"model.safetensors", "header length", NULL});
    truncate_file(bc->weights, 5);
    expect_load_error(bc, (const char *[]){"model.safetensors", "truncated", NULL});
}

static void test_offsets_past_end(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_edit_header(bc->weights, "model.norm.weight", "data_offsets",
                          "[0, 100000000256]");
    expect_load_error(bc, (const char *[]){"model.safetensors", "model.norm.weight",
                                           "past the end", NULL});
}

static void test_size_disagrees_with_shape(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_edit_header(bc->weights, "model.norm.weight", "data_offsets", "[0, 8]");
    expect_load_error(bc, (const char *[]){"model.safetensors", "model.norm.weight", "need 256",
                                           NULL});
}

static void test_unsupported_dtype(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_edit_header(bc->weights, "model.layers.0.mlp.up_proj.weight", "dtype", "\"I64\"");
    expect_load_error(bc, (const char *[]){"model.safetensors", "model.layers.0.mlp.up_proj.weight",
                                           "I64", NULL});
}

static void test_wrong_shape(void **state)
{
    BadCase *bc = *state;
    /* Same byte size, transposed: only the shape check can catch it. */
    tiny_ckpt_edit_header(bc->weights, "model.layers.0.mlp.down_proj.weight", "shape", "[96, 64]");
    expect_load_error(bc, (const char *[]){"model.safetensors", "model.layers.0.mlp.down_proj.weight",
                                           "[96, 64]", "[64, 96]", NULL});
}

static void test_missing_tensor(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_remove_tensor(bc->weights, "model.layers.0.self_attn.v_proj.weight");
    expect_load_error(bc, (const char *[]){bc->dir, "model.layers.0.self_attn.v_proj.weight",
                                           "missing", NULL});
}

static void test_untied_model_needs_lm_head(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_remove_tensor(bc->weights, "lm_head.weight");
    expect_load_error(bc, (const char *[]){"lm_head.weight", "missing", NULL});
}

static void test_header_not_json(void **state)
{
    BadCase *bc = *state;
    FILE *fp = fopen(bc->weights, "r+b");
    fseek(fp, 8, SEEK_SET);
    fputs("{\"x\": [1, 2", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.safetensors", "JSON", NULL});
}

static void test_index_names_wrong_shard(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_free(bc->ck);
    scratch_remove(bc->dir);
    bc->dir = scratch_create();
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.n_layers = 1;
    spec.n_shards = 2;
    bc->ck = tiny_ckpt_write(bc->dir, &spec);
    char path[8192];
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", bc->dir);
    tiny_ckpt_remove_tensor(path, "model.norm.weight");
    expect_load_error(bc, (const char *[]){"model.safetensors.index.json", "model.norm.weight",
                                           NULL});
}

/* ---- Hostile and broken input (issue 10) ---- */

/* safetensors_open_files on one file fails with one line containing every fragment. */
static void expect_open_error(const char *path, const char *const *fragments)
{
    KvErr err = {{0}};
    SafetensorsCheckpoint *ck = safetensors_open_files(1, &path, &err);
    if (ck) {
        safetensors_close(ck);
        fail_msg("safetensors_open_files accepted %s", path);
    }
    if (strchr(err.msg, '\n'))
        fail_msg("error is not one line: '%s'", err.msg);
    for (const char *const *f = fragments; *f; f++)
        if (!strstr(err.msg, *f))
            fail_msg("error '%s' does not mention '%s'", err.msg, *f);
}

/* A file with the given header (padded to 8 bytes as the Python writer does) and data. */
static void write_st(const char *path, const char *header, const void *data, size_t data_len)
{
    size_t json_len = strlen(header), padding = (8 - json_len % 8) % 8;
    tiny_safetensors_write_raw(path, json_len + padding, header, padding, data, data_len);
}

static char *read_all(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = kv_malloc((size_t)size + 1);
    assert_int_equal(fread(buf, 1, (size_t)size, fp), (size_t)size);
    fclose(fp);
    buf[size] = '\0';
    *len = (size_t)size;
    return buf;
}

static uint64_t header_length(const char *bytes)
{
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | (unsigned char)bytes[i];
    return n;
}

/* A header without tensors is a valid (empty) file: opening it must not hand qsort or bsearch
 * a NULL array (UBSan), and the model then lacks its tensors. */
static void test_no_tensors(void **state)
{
    BadCase *bc = *state;
    const char *headers[] = {"{}", "{\"__metadata__\": {\"format\": \"pt\"}}"};
    for (int i = 0; i < 2; i++) {
        write_st(bc->weights, headers[i], NULL, 0);
        KvErr err = {{0}};
        const char *path = bc->weights;
        SafetensorsCheckpoint *ck = safetensors_open_files(1, &path, &err);
        if (!ck)
            fail_msg("%s", err.msg);
        assert_int_equal(ck->n_tensors, 0);
        assert_null(safetensors_find(ck, "model.norm.weight"));
        safetensors_close(ck);
        expect_load_error(bc, (const char *[]){"model.embed_tokens.weight", "missing", NULL});
    }
    /* An index whose weight_map is empty: no shard at all. */
    unlink(bc->weights);
    FILE *fp = fopen(scratch_path(bc->dir, "model.safetensors.index.json", 0), "w");
    fputs("{\"metadata\": {}, \"weight_map\": {}}", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.embed_tokens.weight", "missing", NULL});
}

/* The header length one short, with the JSON still ending inside its padding: every tensor
 * would be read one byte early. */
static void test_header_length_one_short(void **state)
{
    BadCase *bc = *state;
    size_t len;
    char *bytes = read_all(bc->weights, &len);
    uint64_t n = header_length(bytes);
    char *json = kv_malloc(n + 1);
    memcpy(json, bytes + 8, n);
    json[n] = '\0';
    for (size_t end = strlen(json); end > 0 && json[end - 1] == ' ';)
        json[--end] = '\0'; /* the JSON alone; 8 spaces of padding follow it below */
    size_t json_len = strlen(json), data_len = len - 8 - n;
    const char *data = bytes + 8 + n;
    /* Sanity: the same file with the right length (the padding counted) loads. */
    tiny_safetensors_write_raw(bc->weights, json_len + 8, json, 8, data, data_len);
    KvErr err = {{0}};
    Model *m = model_load(bc->dir, &err);
    if (!m)
        fail_msg("%s", err.msg);
    model_free(m);
    tiny_safetensors_write_raw(bc->weights, json_len + 7, json, 8, data, data_len);
    expect_load_error(bc, (const char *[]){"model.safetensors", "data area", "header length",
                                           NULL});
    free(json);
    free(bytes);
}

/* Two tensors on the same bytes, or partly overlapping. */
static void test_overlapping_offsets(void **state)
{
    BadCase *bc = *state;
    /* input_layernorm and model.norm are both [64] F32: 256 bytes each. */
    tiny_ckpt_edit_header(bc->weights, "model.norm.weight", "data_offsets", "[76800, 77056]");
    expect_load_error(bc, (const char *[]){"model.safetensors", "model.norm.weight",
                                           "model.layers.0.input_layernorm.weight", "overlap",
                                           NULL});
}

/* A layout lie: bytes of the data area that belong to no tensor, between tensors or after
 * the last one. */
static void test_data_area_not_covered(void **state)
{
    BadCase *bc = *state;
    FILE *fp = fopen(bc->weights, "ab");
    fputs("trailing", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.safetensors", "data area", NULL});
    /* A tensor's entry removed, its bytes left in place. */
    tiny_ckpt_free(bc->ck);
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.n_layers = 1;
    bc->ck = tiny_ckpt_write(bc->dir, &spec);
    tiny_ckpt_edit_header(bc->weights, "model.layers.0.self_attn.v_proj.weight", NULL, NULL);
    expect_load_error(bc, (const char *[]){"model.safetensors", "to no tensor", NULL});
}

static void test_header_lies(void **state)
{
    BadCase *bc = *state;
    const char *path = bc->weights;
    float four[4] = {1, 2, 3, 4};
    /* Partial overlap: b starts inside a. */
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
             "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}", four, 16);
    expect_open_error(path, (const char *[]){"'b'", "overlap", "'a'", NULL});
    /* Aliased: the same bytes twice. */
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
             "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", four, 8);
    expect_open_error(path, (const char *[]){"overlap", NULL});
    /* A gap between two tensors. */
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
             "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}", four, 16);
    expect_open_error(path, (const char *[]){"'b'", "[4, 8)", NULL});
    /* A data area larger than the last end offset. */
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", four,
             16);
    expect_open_error(path, (const char *[]){"data area", "8", "16", NULL});
    /* Zero-size tensors may share an offset; out of order offsets are fine. */
    write_st(path, "{\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}, "
             "\"z\": {\"dtype\": \"F16\", \"shape\": [0, 3], \"data_offsets\": [8, 8]}, "
             "\"y\": {\"dtype\": \"BF16\", \"shape\": [3, 0], \"data_offsets\": [8, 8]}, "
             "\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", four, 16);
    KvErr err = {{0}};
    SafetensorsCheckpoint *ck = safetensors_open_files(1, &path, &err);
    if (!ck)
        fail_msg("%s", err.msg);
    assert_int_equal(ck->n_tensors, 4);
    assert_memory_equal(safetensors_find(ck, "b")->data, four + 2, 8);
    safetensors_close(ck);
    /* Negative, fractional and huge offsets; shapes whose product overflows. */
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [-8, 0]}}", four,
             8);
    expect_open_error(path, (const char *[]){"'a'", "data_offsets", NULL});
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0.5, 8.5]}}",
             four, 8);
    expect_open_error(path, (const char *[]){"'a'", "data_offsets", NULL});
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, "
             "18446744073709551624]}}", four, 8);
    expect_open_error(path, (const char *[]){"'a'", "data_offsets", NULL});
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 2], "
             "\"data_offsets\": [0, 8]}}", four, 8);
    expect_open_error(path, (const char *[]){"'a'", "shape too large", NULL});
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 8]}}",
             four, 8);
    expect_open_error(path, (const char *[]){"'a'", "shape[0]", NULL});
    /* A name twice in one header. */
    write_st(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
             "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", four, 8);
    expect_open_error(path, (const char *[]){"'a'", "twice", NULL});
    /* __metadata__ is a map of strings. */
    write_st(path, "{\"__metadata__\": {\"format\": 3}}", NULL, 0);
    expect_open_error(path, (const char *[]){"__metadata__", "format", NULL});
    write_st(path, "{\"__metadata__\": [\"pt\"]}", NULL, 0);
    expect_open_error(path, (const char *[]){"__metadata__", NULL});
    /* Header lengths: beyond the file, beyond the format's 100 MB, absurd. */
    static const uint64_t lengths[] = {1000, 100000001, UINT64_MAX, 1};
    for (int i = 0; i < 4; i++) {
        tiny_safetensors_write_raw(path, lengths[i], "{}", 6, NULL, 0);
        expect_open_error(path, (const char *[]){"model.safetensors", "header length", NULL});
    }
    /* Dtype strings: unknown, lower case, with a NUL escape or a newline. */
    const char *dtypes[] = {"\"f32\"", "\"F64\"", "\"\"", "\"F32\\u0000\"", "\"F32\\nX\"", "32"};
    const char *said[] = {"'f32'", "'F64'", "''", "u0000", "'F32\\nX'", "dtype"};
    for (int i = 0; i < 6; i++) {
        char header[256];
        snprintf(header, sizeof header,
                 "{\"a\": {\"dtype\": %s, \"shape\": [2], \"data_offsets\": [0, 8]}}", dtypes[i]);
        write_st(path, header, four, 8);
        expect_open_error(path, (const char *[]){"model.safetensors", said[i], NULL});
    }
}

/* Names from the file are echoed escaped, the error stays on one line. */
static void test_names_escaped(void **state)
{
    BadCase *bc = *state;
    const char *path = bc->weights;
    float four[4] = {1, 2, 3, 4};
    write_st(path, "{\"evil\\nname\\u001b[31m\": {\"dtype\": \"I8\\r\\n\", \"shape\": [2], "
             "\"data_offsets\": [0, 2]}}", four, 2);
    expect_open_error(path, (const char *[]){"evil\\nname\\x1b[31m", "I8\\x0d\\n", NULL});
    write_st(path, "{\"x\\ny\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
             "\"x\\ny \": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", four, 8);
    expect_open_error(path, (const char *[]){"x\\ny", "overlap", NULL});
    write_st(path, "{\"x\\ny\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
             "\"x\\ny\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}", four, 16);
    expect_open_error(path, (const char *[]){"x\\ny", "twice", NULL});
    write_st(path, "{\"__metadata__\": {\"a\\tb\": 1}}", NULL, 0);
    expect_open_error(path, (const char *[]){"a\\tb", NULL});
    /* Bytes the JSON parser would take but the reference refuses: not UTF-8, raw control
     * characters in a string, and a NUL that would cut a name short. */
    const char *bad[] = {"{\"\xff\": {}}", "{\"a\x01\": {}}", "{\"a\\u0000b\": {}}",
                         "{\"\xc0\xae\": {}}", "{\"\xed\xa0\x80\": {}}"};
    const char *why[] = {"UTF-8", "control", "u0000", "UTF-8", "UTF-8"};
    for (int i = 0; i < 5; i++) {
        write_st(path, bad[i], NULL, 0);
        expect_open_error(path, (const char *[]){"model.safetensors", "header byte", why[i],
                                                 NULL});
    }
    /* Config strings. */
    setup(state); /* a fresh checkpoint beside the one teardown frees */
    BadCase *fresh = *state;
    tiny_ckpt_set_config(fresh->dir, "architectures", "[\"Evil\\nForCausalLM\"]");
    expect_load_error(fresh, (const char *[]){"config.json", "Evil\\nForCausalLM", NULL});
    tiny_ckpt_set_config(fresh->dir, "architectures", "[\"LlamaForCausalLM\"]");
    tiny_ckpt_set_config(fresh->dir, "rope_scaling", "{\"rope_type\": \"y\\narn\", \"factor\": 2}");
    expect_load_error(fresh, (const char *[]){"config.json", "y\\narn", NULL});
    teardown(state);
    *state = bc;
}

/* config.json text that cJSON would take but Python's json (transformers) refuses. */
static void test_config_text(void **state)
{
    BadCase *bc = *state;
    const char *texts[] = {
        "{\n\"architectures\": [\"LlamaForCausalLM\"],\n\"hidden_size\\u0000x\": 64}",
        "{\n\"architectures\": [\"LlamaForCausalLM\"],\n\"x\": \"\xff\"}",
        "{\n\"architectures\": [\"LlamaForCausalLM\"],\n\"x\": \"a\tb\"}",
    };
    const char *why[] = {"u0000", "UTF-8", "control"};
    for (int i = 0; i < 3; i++) {
        FILE *fp = fopen(scratch_path(bc->dir, "config.json", 0), "w");
        fputs(texts[i], fp);
        fclose(fp);
        expect_load_error(bc, (const char *[]){"config.json:3: byte", why[i], NULL});
    }
}

static void test_index_names_escaped(void **state)
{
    BadCase *bc = *state;
    FILE *fp = fopen(scratch_path(bc->dir, "model.safetensors.index.json", 0), "w");
    fputs("{\"weight_map\": {\"a\\nb\": \"model.safetensors\"}}", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.safetensors.index.json", "a\\nb", NULL});
    fp = fopen(scratch_path(bc->dir, "model.safetensors.index.json", 0), "w");
    fputs("{\"weight_map\": {\"model.norm.weight\": \"x\\ny.safetensors\"}}", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.safetensors.index.json", "model.norm.weight",
                                           "file name", NULL});
    fp = fopen(scratch_path(bc->dir, "model.safetensors.index.json", 0), "w");
    fputs("{\"weight_map\": {\"model.norm.weight\": \"..\"}}", fp);
    fclose(fp);
    expect_load_error(bc, (const char *[]){"model.safetensors.index.json", "file name", NULL});
}

/* Products of config values that overflow an int are config errors naming the keys, before
 * anything is allocated from them. */
static void test_config_products_overflow(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "num_attention_heads", "4096");
    tiny_ckpt_set_config(bc->dir, "num_key_value_heads", "4096");
    tiny_ckpt_set_config(bc->dir, "head_dim", "1048576");
    expect_load_error(bc, (const char *[]){"config.json", "num_attention_heads x head_dim",
                                           NULL});
    tiny_ckpt_set_config(bc->dir, "num_attention_heads", "4");
    tiny_ckpt_set_config(bc->dir, "num_key_value_heads", "2");
    tiny_ckpt_set_config(bc->dir, "head_dim", "16");
    tiny_ckpt_set_config(bc->dir, "vocab_size", "16777216");
    tiny_ckpt_set_config(bc->dir, "hidden_size", "256");
    expect_load_error(bc, (const char *[]){"config.json", "vocab_size x hidden_size", NULL});
    tiny_ckpt_set_config(bc->dir, "vocab_size", "300");
    tiny_ckpt_set_config(bc->dir, "intermediate_size", "16777216");
    expect_load_error(bc, (const char *[]){"config.json", "hidden_size x intermediate_size", NULL});
    tiny_ckpt_set_config(bc->dir, "intermediate_size", "96");
    tiny_ckpt_set_config(bc->dir, "num_hidden_layers", "16777216");
    expect_load_error(bc, (const char *[]){"config.json", "num_hidden_layers x", NULL});
    tiny_ckpt_set_config(bc->dir, "hidden_size", "64");
    /* Within the limits, a layer count the file does not hold allocates nothing first. */
    tiny_ckpt_set_config(bc->dir, "num_hidden_layers", "8000000");
    expect_load_error(bc, (const char *[]){"model.layers.7999999.input_layernorm.weight",
                                           "missing", "num_hidden_layers", NULL});
    tiny_ckpt_set_config(bc->dir, "num_hidden_layers", "1");
    tiny_ckpt_set_config(bc->dir, "num_attention_heads", "8192");
    tiny_ckpt_set_config(bc->dir, "num_key_value_heads", "1");
    expect_load_error(bc, (const char *[]){"config.json", "num_attention_heads", NULL});
}

/* RoPE frequencies the forward pass cannot use are refused at load, naming config.json and
 * the key (they used to surface as a bad /rope_inv_freq when the trace was written). */
static void test_rope_frequencies_checked_at_load(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"linear\", \"factor\": 1e-320}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling", "factor", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling",
                         "{\"rope_type\": \"llama3\", \"factor\": 1e-305, \"low_freq_factor\": 1, "
                         "\"high_freq_factor\": 4, \"original_max_position_embeddings\": 64}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling", "factor", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"type\": \"dynamic\", \"factor\": 1e300}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_scaling", "long runs", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", NULL);
    tiny_ckpt_set_config(bc->dir, "rope_parameters",
                         "{\"rope_type\": \"linear\", \"factor\": 1e-310, \"rope_theta\": 10000}");
    expect_load_error(bc, (const char *[]){"config.json", "rope_parameters", "factor", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_parameters", NULL);
    /* theta^(-2f/D) overflows for a subnormal theta when D is large enough (the weights,
     * shaped for head_dim 16, are not reached). */
    tiny_ckpt_set_config(bc->dir, "head_dim", "128");
    tiny_ckpt_set_config(bc->dir, "rope_theta", "5e-324");
    expect_load_error(bc, (const char *[]){"config.json", "rope_theta", NULL});
    tiny_ckpt_set_config(bc->dir, "head_dim", "16");
    /* A factor below 1 that stays usable is accepted (transformers only warns). */
    tiny_ckpt_set_config(bc->dir, "rope_theta", "10000");
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"linear\", \"factor\": 0.5}");
    KvErr err = {{0}};
    Model *m = model_load(bc->dir, &err);
    if (!m)
        fail_msg("%s", err.msg);
    model_free(m);
}

/* A NaN or infinite weight is refused at load, naming the file and the tensor. */
static void test_non_finite_weights(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_poke_f32(bc->weights, "lm_head.weight", 64 * 7 + 3, NAN);
    expect_load_error(bc, (const char *[]){"model.safetensors", "lm_head.weight", "[7, 3]", "NaN",
                                           NULL});
    tiny_ckpt_poke_f32(bc->weights, "lm_head.weight", 64 * 7 + 3, 0.5f);
    tiny_ckpt_poke_f32(bc->weights, "model.layers.0.input_layernorm.weight", 5, -INFINITY);
    expect_load_error(bc, (const char *[]){"model.safetensors",
                                           "model.layers.0.input_layernorm.weight", "[5]",
                                           "infinite", NULL});
}

/* The same through the CLI: exit 2 and one line, instead of token 0 forever and exit 0. */
static void test_non_finite_weights_cli(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_poke_f32(bc->weights, "lm_head.weight", 0, NAN);
    FILE *fp = fopen(scratch_path(bc->dir, "tokens.txt", 0), "w");
    fputs("1 2 3 4\n", fp);
    fclose(fp);
    char args[8192 * 3];
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s' --max-new 4",
             bc->dir, scratch_path(bc->dir, "tokens.txt", 0),
             scratch_path(bc->dir, "out.h5", 1));
    KvsimRun run = run_kvsim(args);
    assert_int_equal(run.status, 2);
    assert_int_equal(count_lines(run.err), 1);
    assert_non_null(strstr(run.err, "lm_head.weight"));
    assert_int_equal(access(scratch_path(bc->dir, "out.h5", 1), F_OK), -1);
    kvsim_run_free(&run);
}

/* A FIFO or a directory in place of a checkpoint file is refused at once. */
static void test_not_regular_files(void **state)
{
    BadCase *bc = *state;
    alarm(60); /* a blocking open would hang the test: fail it instead */
    const char *names[] = {"model.safetensors", "config.json", "model.safetensors.index.json"};
    for (int i = 0; i < 3; i++) {
        char saved[8192];
        const char *path = scratch_path(bc->dir, names[i], 0);
        snprintf(saved, sizeof saved, "%s.saved", path);
        int existed = rename(path, saved) == 0;
        for (int kind = 0; kind < 2; kind++) {
            assert_int_equal(kind ? mkdir(path, 0700) : mkfifo(path, 0600), 0);
            expect_load_error(bc, (const char *[]){names[i], "not a regular file", NULL});
            assert_int_equal(kind ? rmdir(path) : unlink(path), 0);
        }
        if (existed)
            assert_int_equal(rename(saved, path), 0);
    }
    alarm(0);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_good_checkpoint_loads), T(test_missing_config_key), T(test_bad_config_value),
        T(test_invalid_config_json), T(test_config_json_rules), T(test_unsupported_architecture),
        T(test_unsupported_rope_scaling), T(test_bad_quantization), T(test_truncated_safetensors),
        T(test_offsets_past_end), T(test_size_disagrees_with_shape), T(test_unsupported_dtype),
        T(test_wrong_shape), T(test_missing_tensor), T(test_untied_model_needs_lm_head),
        T(test_header_not_json), T(test_index_names_wrong_shard), T(test_no_tensors),
        T(test_header_length_one_short), T(test_overlapping_offsets),
        T(test_data_area_not_covered), T(test_header_lies), T(test_names_escaped),
        T(test_index_names_escaped), T(test_config_text), T(test_config_products_overflow),
        T(test_rope_frequencies_checked_at_load), T(test_non_finite_weights),
        T(test_non_finite_weights_cli), T(test_not_regular_files), T(test_moe_errors),
        T(test_unknown_rope_type_cli),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
