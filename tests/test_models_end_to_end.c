/* The models kvsim traces, end to end: `kvsim trace`, `kvsim check` and `kvsim run
 * configs/ta512.ini` on tiny random Gemma 2, Gemma 3, Mistral-with-window, Qwen3 with YaRN,
 * Qwen3-MoE and 4-bit MLX-quantized Llama checkpoints (tests/support/tiny_ckpt). The traces
 * carry each layer's window, the logit soft-capping and the RoPE frequencies and factor used; a
 * replay with [run] sliding_layers = skip compresses only the global layers (the sliding ones
 * keep their window: all of the true attention), and with compress every layer; bad configs are
 * one line naming the file and the key. (The forward pass itself is checked against the
 * reference in test_forward.) */
#include <math.h>
#include <stdbool.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "sim/format/trace.h"
#include "tests/support/scratch.h"
#include "tests/support/tiny_ckpt.h"

#define N_PROMPT 40
#define MAX_NEW 8

/* The three architectures, 4 layers each. */
static TinyCheckpointSpec gemma2_spec(void)
{
    TinyCheckpointSpec s = tiny_ckpt_default_spec();
    s.architecture = "Gemma2ForCausalLM";
    s.n_layers = 4;
    s.sliding_window = 6; /* layers 0 and 2 */
    s.query_pre_attn_scalar = 24;
    s.attn_softcap = 5.0;
    s.final_softcap = 3.0;
    s.tie_word_embeddings = 1;
    s.seed = 31;
    return s;
}

static TinyCheckpointSpec gemma3_spec(void)
{
    TinyCheckpointSpec s = tiny_ckpt_default_spec();
    s.architecture = "Gemma3ForCausalLM";
    s.n_layers = 4;
    s.sliding_window = 5;
    s.sliding_window_pattern = 3; /* layer 2 global, 0, 1 and 3 sliding */
    s.attn_softcap = -1;
    s.final_softcap = -1;
    s.rope_theta = 1e6;
    s.rope_local_base_freq = 10000;
    s.tie_word_embeddings = 1;
    s.seed = 32;
    return s;
}

static TinyCheckpointSpec mistral_spec(void)
{
    TinyCheckpointSpec s = tiny_ckpt_default_spec();
    s.architecture = "MistralForCausalLM";
    s.n_layers = 4;
    s.sliding_window = 7;
    s.seed = 33;
    return s;
}

/* Writes the checkpoint and a prompt of token ids into a new scratch directory, traces it into
 * DIR/t.h5 with 3 attention rows; `kvsim check` must accept the trace. Returns the directory. */
static char *trace_model(const TinyCheckpointSpec *spec, TinyCheckpoint **ck)
{
    char *dir = scratch_create();
    *ck = tiny_ckpt_write(dir, spec);
    char text[1024] = "";
    for (int i = 0; i < N_PROMPT; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "%d ", (i * 53 + 7) % 290);
    const char *ids = scratch_path(dir, "prompt.ids", 0);
    scratch_write(ids, text);
    const char *out = scratch_path(dir, "t.h5", 1);
    KvsimRun run = run_kvsim_ok("trace --model '%s' --tokens '%s' --out '%s' --max-new %d "
                                "--attn-rows 3 --chunk 16", dir, ids, out, MAX_NEW);
    kvsim_run_free(&run);
    run = run_kvsim_ok("check '%s'", out);
    kvsim_run_free(&run);
    return dir;
}

static Trace *open_trace(const char *path)
{
    KvErr err = {{0}};
    Trace *tr = trace_open(path, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    return tr;
}

/* `kvsim run configs/ta512.ini` on the trace: exit 0, its line on the compressed layers (none
 * on a model without sliding-window layers: want_layers_line NULL), and in its summary.csv
 * every policy of the config, `full` keeping all of the attention. */
static void run_ta512(const char *dir, const char *want_layers_line)
{
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    const char *out_dir = scratch_path(dir, "ta512", 2);
    KvsimRun run = run_kvsim_ok("run '%s/configs/ta512.ini' --trace '%s' --out '%s' --threads 2",
                                src, scratch_path(dir, "t.h5", 1), out_dir);
    if (want_layers_line ? !strstr(run.out, want_layers_line) : !!strstr(run.out, "sliding_layers"))
        fail_msg("kvsim run's output %s '%s':\n%s", want_layers_line ? "lacks" : "has",
                 want_layers_line ? want_layers_line : "sliding_layers", run.out);
    kvsim_run_free(&run);
    char path[4400];
    snprintf(path, sizeof path, "%s/summary.csv", out_dir);
    char *csv = scratch_read(path);
    int rows = 0;
    for (const char *c = strchr(csv, '\n'); c && c[1]; c = strchr(c + 1, '\n'))
        rows++;
    assert_int_equal(rows, 13); /* configs/ta512.ini's policies */
    const char *full = strstr(csv, "\nfull,full,");
    assert_non_null(full);
    assert_true(fabs(strtod(full + strlen("\nfull,full,"), NULL) - 1.0) < 1e-6);
    free(csv);
}

static void check_windows(const char *dir, const int *want, double softcap)
{
    Trace *tr = open_trace(scratch_path(dir, "t.h5", 1));
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_layers, 4);
    assert_int_equal(m->n_tokens, N_PROMPT + MAX_NEW);
    for (int l = 0; l < 4; l++)
        assert_int_equal(trace_layer_geometry(m, l).window, want[l]);
    assert_true(m->attn_softcap == softcap);
    assert_true(trace_layer_geometry(m, 0).attn_softcap == softcap);
    trace_close(tr);
}

static void test_gemma2_end_to_end(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = gemma2_spec();
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    static const int windows[4] = {6, 0, 6, 0};
    check_windows(dir, windows, 5.0);
    Trace *tr = open_trace(scratch_path(dir, "t.h5", 1));
    assert_float_equal(trace_meta(tr)->attn_scale, 1.0 / sqrt(24.0), 1e-15);
    trace_close(tr);
    run_ta512(dir, "sliding_layers = skip: the policies compress 2 of 4 layers (1,3)");
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

static void test_mistral_window_end_to_end(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = mistral_spec();
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    static const int windows[4] = {7, 7, 7, 7};
    check_windows(dir, windows, 0);
    run_ta512(dir, "sliding_layers = skip: the policies compress 0 of 4 layers (none)");
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* Column `col` (0 = mass_mean, 3 = cache_tokens_mean: the columns after policy and layer) of
 * (policy, layer) in layers.csv. */
static double layer_value(const char *csv, const char *policy, int layer, int col)
{
    char prefix[96];
    snprintf(prefix, sizeof prefix, "\n%s,%d,", policy, layer);
    const char *at = strstr(csv, prefix);
    if (!at)
        fail_msg("layers.csv has no row %s,%d", policy, layer);
    at += strlen(prefix);
    for (int c = 0; c < col; c++)
        at = strchr(at, ',') + 1;
    return strtod(at, NULL);
}

static double layer_mass(const char *csv, const char *policy, int layer)
{
    return layer_value(csv, policy, layer, 0);
}

/* run.json's compressed_layers. */
static void expect_compressed(const char *out_dir, const char *mode, const char *layers)
{
    char path[4400];
    snprintf(path, sizeof path, "%s/run.json", out_dir);
    char *text = scratch_read(path);
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "sliding_layers");
    cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "compressed_layers");
    assert_true(cJSON_IsString(s) && cJSON_IsString(c));
    assert_string_equal(s->valuestring, mode);
    assert_string_equal(c->valuestring, layers);
    cJSON_Delete(j);
    free(text);
}

/* Gemma 3 at a budget of 3 tokens per KV head (below the sliding window of 5): with skip, the
 * sliding layers 0, 1 and 3 keep their window, a rotating buffer of 5 tokens, which holds all of
 * their true attention (mass 1 for every policy, even `random`), and only the global layer 2 is
 * compressed (mass below 1 for random); with compress, the policies drive every layer. */
static void test_gemma3_skip_compresses_global_layers_only(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = gemma3_spec();
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    static const int windows[4] = {5, 5, 0, 5};
    check_windows(dir, windows, 0);
    run_ta512(dir, "sliding_layers = skip: the policies compress 1 of 4 layers (2)");

    const char *modes[2] = {"skip", "compress"};
    for (int i = 0; i < 2; i++) {
        const char *ini = scratch_path(dir, "small.ini", 3);
        char text[512];
        snprintf(text, sizeof text,
                 "[run]\nthreads = 2\nsliding_layers = %s\nbudget = 3\n"
                 "[policy.random]\ntype = random\n[policy.tova]\ntype = tova\n",
                 modes[i]);
        scratch_write(ini, text);
        char out_dir[4096];
        snprintf(out_dir, sizeof out_dir, "%s/%s", dir, modes[i]);
        KvsimRun run = run_kvsim_ok("run '%s' --trace '%s' --out '%s'", ini,
                                    scratch_path(dir, "t.h5", 1), out_dir);
        kvsim_run_free(&run);
        expect_compressed(out_dir, modes[i], i == 0 ? "2" : "0-3");
        char csv_path[4400];
        snprintf(csv_path, sizeof csv_path, "%s/layers.csv", out_dir);
        char *csv = scratch_read(csv_path);
        for (int l = 0; l < 4; l++) {
            /* the window is all the layer attends (1 up to float sums); 3 tokens of a 5-token
             * window or of the context are not */
            bool kept = i == 0 && l != 2;
            for (int p = 0; p < 2; p++) {
                double mass = layer_mass(csv, p ? "tova" : "random", l);
                assert_true(kept ? fabs(mass - 1.0) < 1e-6 : mass < 0.99);
                /* memory: the rotating buffer's 5 tokens per KV head at every decode step (the
                 * prompt is longer than the window), the budget's at most 3 elsewhere */
                double tokens = layer_value(csv, p ? "tova" : "random", l, 3);
                assert_true(kept ? tokens == 5.0 : tokens <= 3.0);
            }
        }
        free(csv);
    }
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* The multimodal checkpoint's language model traces like Gemma3ForCausalLM, under either
 * naming of its tensors. */
static void test_gemma3_multimodal_text_model(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = gemma3_spec();
    spec.architecture = "Gemma3ForConditionalGeneration";
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    static const int windows[4] = {5, 5, 0, 5};
    check_windows(dir, windows, 0);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
    /* The names transformers 4.52+ saves: model.language_model.*, an untied lm_head.weight. */
    spec.saved_names = 1;
    spec.tie_word_embeddings = 0;
    dir = trace_model(&spec, &ck);
    check_windows(dir, windows, 0);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* Qwen3 with YaRN (factor 4 over an original context of 16 < the 48 tokens traced): the trace
 * records the scaled frequencies (the slowest pairs divided by the factor, the fastest kept) and
 * the attention factor 0.1 ln 4 + 1, with which `kvsim check` recomputes the model's own
 * attention rows. */
static void test_qwen3_yarn_end_to_end(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.architecture = "Qwen3ForCausalLM";
    spec.n_layers = 3;
    spec.rope_scaling = "{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                        "\"original_max_position_embeddings\": 16}";
    spec.seed = 34;
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    Trace *tr = open_trace(scratch_path(dir, "t.h5", 1));
    const TraceMeta *m = trace_meta(tr);
    int half = m->head_dim / 2;
    assert_float_equal(m->rope_attention_factor, 0.1 * log(4.0) + 1.0, 1e-12);
    for (int l = 0; l < m->n_layers; l++) {
        const double *f = trace_layer_geometry(m, l).rope_inv_freq;
        double base = spec.rope_theta;
        assert_float_equal(f[0], 1.0, 1e-12); /* pair 0: many turns over 16 tokens, kept */
        double plain_last = pow(base, -2.0 * (half - 1) / m->head_dim);
        assert_float_equal(f[half - 1], plain_last / 4.0, 1e-12 * plain_last);
        assert_int_equal(trace_layer_geometry(m, l).window, 0);
    }
    trace_close(tr);
    run_ta512(dir, NULL);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* Qwen3-MoE (4 experts of 24, top 2, layer 0 dense through mlp_only_layers) traces like any
 * model: the trace's parameter count is the experts' and the dense layer's, and the replay runs. */
static void test_qwen3_moe_end_to_end(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.architecture = "Qwen3MoeForCausalLM";
    spec.n_layers = 3;
    spec.n_experts = 4;
    spec.n_experts_per_tok = 2;
    spec.moe_intermediate_size = 24;
    spec.norm_topk_prob = 1;
    spec.mlp_only_layer = 0;
    spec.seed = 35;
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    Trace *tr = open_trace(scratch_path(dir, "t.h5", 1));
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->n_layers, 3);
    /* every expert counts (the model's size, not the active parameters): two MoE layers of 4
     * experts of 3 matrices of hidden x 24, plus their routers */
    int64_t h = spec.hidden_size;
    assert_true(m->n_params >= 2 * (4 * 3 * h * 24 + 4 * h));
    trace_close(tr);
    run_ta512(dir, NULL);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* A 4-bit MLX-quantized Llama (mlx-community's layout: packed uint32 weights, scales and biases
 * per group of 32; lm_head at 8 bits) traces, passes check and replays. */
static void test_mlx_llama_end_to_end(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = tiny_ckpt_default_spec();
    spec.architecture = "LlamaForCausalLM";
    spec.n_layers = 2;
    spec.quant_bits = 4;
    spec.quant_group = 32;
    spec.seed = 36;
    TinyCheckpoint *ck;
    char *dir = trace_model(&spec, &ck);
    run_ta512(dir, NULL);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* Configs whose keys contradict each other or are not understood: one line naming config.json
 * and the key, exit 2. */
static void test_bad_window_configs(void **state)
{
    (void)state;
    TinyCheckpointSpec spec = gemma3_spec();
    char *dir = scratch_create();
    TinyCheckpoint *ck = tiny_ckpt_write(dir, &spec);
    const char *ids = scratch_path(dir, "prompt.ids", 0);
    scratch_write(ids, "1 2 3 4 5 6 7 8\n");
    char args[8192];
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s/x.h5' --max-new 2",
             dir, ids, dir);
    /* layer_types against sliding_window_pattern 3 (layer 2 global) */
    tiny_ckpt_set_config(dir, "layer_types", "[\"sliding_attention\", \"full_attention\", "
                                             "\"full_attention\", \"sliding_attention\"]");
    run_kvsim_fails(args, "config.json", "key 'layer_types' says layer 1 is global",
                    "'sliding_window_pattern' makes it sliding", NULL);
    tiny_ckpt_set_config(dir, "layer_types", "[\"sliding_attention\"]");
    run_kvsim_fails(args, "config.json", "'layer_types' must be a list of 4 entries", NULL);
    tiny_ckpt_set_config(dir, "layer_types", "[\"sliding\", \"sliding\", \"full\", \"sliding\"]");
    run_kvsim_fails(args, "config.json", "'layer_types' entry 0", "sliding_attention", NULL);
    tiny_ckpt_set_config(dir, "layer_types", NULL);
    tiny_ckpt_set_config(dir, "attn_logit_softcapping", "50.0");
    run_kvsim_fails(args, "config.json", "'attn_logit_softcapping'", NULL);
    tiny_ckpt_set_config(dir, "attn_logit_softcapping", NULL);
    tiny_ckpt_set_config(dir, "hidden_activation", "\"gelu\"");
    run_kvsim_fails(args, "config.json", "'hidden_activation'", "gelu_pytorch_tanh", NULL);
    tiny_ckpt_set_config(dir, "hidden_activation", NULL);
    tiny_ckpt_set_config(dir, "sliding_window", "0");
    run_kvsim_fails(args, "config.json", "'sliding_window' must be a positive integer", NULL);
    tiny_ckpt_free(ck);
    scratch_remove(dir);

    /* Qwen2: layer_types against use_sliding_window with max_window_layers 1 */
    TinyCheckpointSpec q = tiny_ckpt_default_spec();
    q.architecture = "Qwen2ForCausalLM";
    q.sliding_window = 4;
    q.use_sliding_window = 1;
    q.max_window_layers = 1;
    dir = scratch_create();
    ck = tiny_ckpt_write(dir, &q);
    ids = scratch_path(dir, "prompt.ids", 0);
    scratch_write(ids, "1 2 3 4 5 6 7 8\n");
    snprintf(args, sizeof args, "trace --model '%s' --tokens '%s' --out '%s/x.h5' --max-new 2",
             dir, ids, dir);
    tiny_ckpt_set_config(dir, "layer_types", "[\"sliding_attention\", \"sliding_attention\"]");
    run_kvsim_fails(args, "config.json", "layer 0 is sliding", "'max_window_layers'", NULL);
    /* Mistral: sliding layers listed without a window */
    tiny_ckpt_set_config(dir, "architectures", "[\"MistralForCausalLM\"]");
    tiny_ckpt_set_config(dir, "sliding_window", NULL);
    run_kvsim_fails(args, "config.json", "'layer_types' lists sliding layers",
                    "'sliding_window' is missing", NULL);
    tiny_ckpt_free(ck);
    scratch_remove(dir);
}

/* [run] sliding_layers: only skip or compress. */
static void test_bad_sliding_layers_key(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *ini = scratch_path(dir, "bad.ini", 0);
    scratch_write(ini, "[run]\nsliding_layers = some\n[policy.w]\ntype = window\n");
    char args[4200];
    snprintf(args, sizeof args, "run '%s' --trace '%s/none.h5'", ini, dir);
    run_kvsim_fails(args, "bad.ini:2:", "sliding_layers = 'some'", "skip or compress", NULL);
    scratch_remove(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemma2_end_to_end),
        cmocka_unit_test(test_mistral_window_end_to_end),
        cmocka_unit_test(test_gemma3_skip_compresses_global_layers_only),
        cmocka_unit_test(test_gemma3_multimodal_text_model),
        cmocka_unit_test(test_qwen3_yarn_end_to_end),
        cmocka_unit_test(test_qwen3_moe_end_to_end),
        cmocka_unit_test(test_mlx_llama_end_to_end),
        cmocka_unit_test(test_bad_window_configs),
        cmocka_unit_test(test_bad_sliding_layers_key),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
