/* Bad checkpoints: each is refused by model_load with one line naming the file and the key or
 * tensor at fault, never a crash or an out-of-bounds read (the sanitizer build checks that). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"
#include "traces/model.h"

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
    assert_memory_equal(m->weights.layers[0].wk,
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
    expect_load_error(bc, (const char *[]){"config.json:3", "invalid JSON", NULL});
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
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4}");
    expect_load_error(bc, (const char *[]){"config.json", "yarn", NULL});
    tiny_ckpt_set_config(bc->dir, "rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8}");
    expect_load_error(bc, (const char *[]){"config.json", "low_freq_factor", NULL});
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
    tiny_ckpt_edit_header(bc->weights, "model.layers.0.self_attn.v_proj.weight", NULL, NULL);
    expect_load_error(bc, (const char *[]){bc->dir, "model.layers.0.self_attn.v_proj.weight",
                                           "missing", NULL});
}

static void test_untied_model_needs_lm_head(void **state)
{
    BadCase *bc = *state;
    tiny_ckpt_edit_header(bc->weights, "lm_head.weight", NULL, NULL);
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
    tiny_ckpt_edit_header(path, "model.norm.weight", NULL, NULL);
    expect_load_error(bc, (const char *[]){"model.safetensors.index.json", "model.norm.weight",
                                           NULL});
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_good_checkpoint_loads), T(test_missing_config_key), T(test_bad_config_value),
        T(test_invalid_config_json), T(test_unsupported_architecture),
        T(test_unsupported_rope_scaling), T(test_truncated_safetensors),
        T(test_offsets_past_end), T(test_size_disagrees_with_shape), T(test_unsupported_dtype),
        T(test_wrong_shape), T(test_missing_tensor), T(test_untied_model_needs_lm_head),
        T(test_header_not_json), T(test_index_names_wrong_shard),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
