/* bench_weights16 — memory and speed of 16-bit weights kept in memory against the float32 path,
 * on a random ~1.1B-parameter BF16 Llama checkpoint (TinyLlama's shape: 22 layers, hidden 2048,
 * 32 query and 4 KV heads, intermediate 5632, vocab 32000), written into DIR when absent:
 *
 *   bench_weights16 DIR [--threads N] [--prompt 256] [--decode 8] [--rounds 2]
 *
 * Each path runs in its own child process (so that its peak RSS is its own): load the model
 * (BF16 matrices left in the mapping, or every weight converted to float32 at load), prefill the
 * prompt in 128-token chunks, greedy decode steps. The two paths alternate for --rounds rounds
 * and each keeps its best tokens/s (the machine may be shared: the best round is the one least
 * disturbed). Reports each path's peak RSS over the checkpoint's bytes and tokens/s, the
 * ratios, and whether the targets are met:
 *   - 16-bit peak RSS <= 1.25 x checkpoint bytes + the run's KV cache;
 *   - 16-bit prefill tokens/s >= 0.8 x the float32 path's.
 * Decode tokens/s is reported, without a target. The two paths' last logits must agree to 1e-4
 * (relative, max-norm): they multiply by the same values, only in blocks. Exit 1 on a missed
 * target. */
#define _DEFAULT_SOURCE /* wait4: the child's own peak RSS */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sim/base/util.h"
#include "traces/model/forward.h"
#include "traces/model/model.h"

enum { LAYERS = 22, HIDDEN = 2048, HEADS = 32, KV_HEADS = 4, INTER = 5632, VOCAB = 32000 };

/* xorshift64*: fast, deterministic; the values only need to be plausible weights. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static double uniform(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545f4914f6cdd1dull) >> 11) * 0x1p-53;
}

/* float32 -> bfloat16, rounding to nearest even (finite values only). */
static uint16_t bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

typedef struct {
    char name[96];
    int64_t rows, cols; /* cols 0: a vector */
    double sd;          /* 0: a norm weight of ones */
} Spec;

static int n_specs;
static Spec specs[LAYERS * 9 + 3];

static void add(const char *name, int64_t rows, int64_t cols, double sd)
{
    Spec *s = &specs[n_specs++];
    snprintf(s->name, sizeof s->name, "%s", name);
    s->rows = rows;
    s->cols = cols;
    s->sd = sd;
}

static int write_checkpoint(const char *dir)
{
    const int64_t D = HIDDEN / HEADS, kv = (int64_t)KV_HEADS * D;
    add("model.embed_tokens.weight", VOCAB, HIDDEN, 1.0);
    char name[96];
    for (int l = 0; l < LAYERS; l++) {
#define ADD(suffix, r, c, sd)                                                                \
    (snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix), add(name, r, c, sd))
        ADD("input_layernorm.weight", HIDDEN, 0, 0);
        ADD("self_attn.q_proj.weight", HIDDEN, HIDDEN, 1 / sqrt(HIDDEN));
        ADD("self_attn.k_proj.weight", kv, HIDDEN, 1 / sqrt(HIDDEN));
        ADD("self_attn.v_proj.weight", kv, HIDDEN, 1 / sqrt(HIDDEN));
        ADD("self_attn.o_proj.weight", HIDDEN, HIDDEN, 1 / sqrt(HIDDEN));
        ADD("post_attention_layernorm.weight", HIDDEN, 0, 0);
        ADD("mlp.gate_proj.weight", INTER, HIDDEN, 1 / sqrt(HIDDEN));
        ADD("mlp.up_proj.weight", INTER, HIDDEN, 1 / sqrt(HIDDEN));
        ADD("mlp.down_proj.weight", HIDDEN, INTER, 1 / sqrt(INTER));
#undef ADD
    }
    add("model.norm.weight", HIDDEN, 0, 0);
    add("lm_head.weight", VOCAB, HIDDEN, 1 / sqrt(HIDDEN));

    size_t cap = 64 + (size_t)n_specs * 160, len = 0;
    char *header = kv_malloc(cap);
    int64_t at = 0;
    len += (size_t)snprintf(header + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n_specs; i++) {
        int64_t n = specs[i].rows * (specs[i].cols ? specs[i].cols : 1);
        char shape[64];
        if (specs[i].cols)
            snprintf(shape, sizeof shape, "[%lld,%lld]", (long long)specs[i].rows,
                     (long long)specs[i].cols);
        else
            snprintf(shape, sizeof shape, "[%lld]", (long long)specs[i].rows);
        len += (size_t)snprintf(header + len, cap - len,
                                ",\"%s\":{\"dtype\":\"BF16\",\"shape\":%s,\"data_offsets\":"
                                "[%lld,%lld]}", specs[i].name, shape, (long long)at,
                                (long long)(at + 2 * n));
        at += 2 * n;
    }
    len += (size_t)snprintf(header + len, cap - len, "}");
    while ((8 + len) % 8)
        header[len++] = ' ';

    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *fp = fopen(path, "w");
    if (!fp)
        return -1;
    fprintf(fp, "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": %d, "
            "\"intermediate_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": %d, "
            "\"num_key_value_heads\": %d, \"vocab_size\": %d, \"rms_norm_eps\": 1e-05, "
            "\"rope_theta\": 10000.0, \"max_position_embeddings\": 2048, "
            "\"hidden_act\": \"silu\", \"tie_word_embeddings\": false, "
            "\"torch_dtype\": \"bfloat16\"}\n", HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB);
    if (fclose(fp) != 0)
        return -1;
    /* Written under a temporary name and renamed, so that an interrupted run leaves no
     * checkpoint that looks complete. */
    char tmp[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.partial", path);
    if (!(fp = fopen(tmp, "wb")))
        return -1;
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++)
        len_bytes[i] = (unsigned char)((uint64_t)len >> (8 * i));
    fwrite(len_bytes, 1, 8, fp);
    fwrite(header, 1, len, fp);
    free(header);
    uint16_t *buf = kv_malloc((size_t)VOCAB * HIDDEN * sizeof *buf); /* the largest tensor */
    for (int i = 0; i < n_specs; i++) {
        size_t n = (size_t)specs[i].rows * (size_t)(specs[i].cols ? specs[i].cols : 1);
        double a = sqrt(3.0) * specs[i].sd; /* uniform on [-a, a] has this sd */
        for (size_t j = 0; j < n; j++)
            buf[j] = bf16(specs[i].sd > 0 ? (float)((2 * uniform() - 1) * a) : 1.0f);
        fwrite(buf, sizeof *buf, n, fp); /* little-endian machine: the file's byte order */
    }
    free(buf);
    if (fclose(fp) != 0 || rename(tmp, path) != 0)
        return -1;
    return 0;
}

typedef struct {
    double load_s, prefill_tok_s, decode_tok_s;
    int first_ids[4];
    float logits[VOCAB];
} Result;

/* One path, in the child: load, prefill, decode; the result into fd. */
static int run_path(const char *dir, int f32, int n_prompt, int n_decode, int fd)
{
    static Result r;
    KvErr err = {{0}};
    ModelLoadOptions options = {.f32_weights = f32};
    double t = now_seconds();
    Model *model = model_load_with(dir, &options, &err);
    if (!model) {
        fprintf(stderr, "bench_weights16: %s\n", err.msg);
        return 2;
    }
    r.load_s = now_seconds() - t;
    int T = n_prompt + n_decode;
    int32_t *tokens = kv_malloc((size_t)T * sizeof *tokens);
    for (int i = 0; i < n_prompt; i++)
        tokens[i] = (int32_t)(((long)i * 7919 + 13) % VOCAB);
    RunState *s = run_state_new(model, T, 128);
    t = now_seconds();
    const float *logits = forward_prompt(s, tokens, n_prompt, NULL);
    r.prefill_tok_s = n_prompt / (now_seconds() - t);
    t = now_seconds();
    for (int i = 0; i < n_decode; i++) {
        tokens[n_prompt + i] = argmax_token(logits, VOCAB);
        logits = forward_tokens(s, &tokens[n_prompt + i], 1, 1, NULL);
    }
    r.decode_tok_s = n_decode / (now_seconds() - t);
    for (int i = 0; i < 4; i++)
        r.first_ids[i] = i < n_decode ? tokens[n_prompt + i] : -1;
    memcpy(r.logits, logits, sizeof r.logits);
    run_state_free(s);
    model_free(model);
    free(tokens);
    const char *p = (const char *)&r;
    for (size_t done = 0; done < sizeof r;) {
        ssize_t w = write(fd, p + done, sizeof r - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return 2;
        done += (size_t)w;
    }
    return 0;
}

/* Runs one path in a child process; its result and peak RSS (bytes). */
static int measure(const char *dir, int f32, int n_prompt, int n_decode, Result *out,
                   double *peak_rss)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(fds[0]);
        _exit(run_path(dir, f32, n_prompt, n_decode, fds[1]));
    }
    close(fds[1]);
    char *p = (char *)out;
    size_t done = 0;
    while (done < sizeof *out) {
        ssize_t r = read(fds[0], p + done, sizeof *out - done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        done += (size_t)r;
    }
    close(fds[0]);
    int status;
    struct rusage usage;
    if (wait4(pid, &status, 0, &usage) != pid || !WIFEXITED(status) || WEXITSTATUS(status) ||
        done != sizeof *out)
        return -1;
    *peak_rss = (double)usage.ru_maxrss * 1024.0; /* Linux reports KiB */
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_weights16 DIR [--threads N] [--prompt N] [--decode N]\n");
        return 2;
    }
    const char *dir = argv[1];
    int threads = openblas_get_num_procs(), n_prompt = 256, n_decode = 8, rounds = 2;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt"))
            n_prompt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--decode"))
            n_decode = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--rounds"))
            rounds = atoi(argv[i + 1]);
    }
    if (threads <= 0 || n_prompt <= 0 || n_decode < 1 || rounds < 1) {
        fprintf(stderr, "bench_weights16: bad option value\n");
        return 2;
    }
    openblas_set_num_threads(threads);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat st;
    if (stat(path, &st) != 0) {
        printf("writing a random BF16 checkpoint into %s\n", dir);
        fflush(stdout);
        if ((mkdir(dir, 0777) != 0 && errno != EEXIST) || write_checkpoint(dir) != 0 ||
            stat(path, &st) != 0) {
            fprintf(stderr, "bench_weights16: cannot write the checkpoint into %s\n", dir);
            return 2;
        }
    }
    KvErr err = {{0}};
    ModelConfig c;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (model_config_load(path, &c, &err) != 0) {
        fprintf(stderr, "bench_weights16: %s\n", err.msg);
        return 2;
    }
    double ckpt = (double)st.st_size;
    double kv_cache = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * (n_prompt + n_decode) * 4;
    printf("checkpoint %s: %.3g parameters, %.2f GB BF16; prompt %d, decode %d, %d OpenBLAS "
           "threads\n", dir, (double)model_n_params(&c), ckpt / 1e9, n_prompt, n_decode,
           threads);

    static Result best[2], round;
    double rss[2] = {0, 0};
    const char *names[2] = {"16-bit", "float32"};
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < 2; i++) {
            double peak;
            if (measure(dir, i, n_prompt, n_decode, &round, &peak) != 0) {
                fprintf(stderr, "bench_weights16: a measured run failed\n");
                return 2;
            }
            printf("round %d, %-7s: load %.2f s, peak RSS %.2f GB, prefill %.2f tok/s, decode "
                   "%.2f tok/s\n", r + 1, names[i], round.load_s, peak / 1e9, round.prefill_tok_s,
                   round.decode_tok_s);
            fflush(stdout);
            rss[i] = peak > rss[i] ? peak : rss[i];
            if (r == 0) {
                best[i] = round;
                continue;
            }
            best[i].load_s = fmin(best[i].load_s, round.load_s);
            best[i].prefill_tok_s = fmax(best[i].prefill_tok_s, round.prefill_tok_s);
            best[i].decode_tok_s = fmax(best[i].decode_tok_s, round.decode_tok_s);
        }
    const Result *res[2] = {&best[0], &best[1]}, *half = &best[0], *full = &best[1];
    double rss_half = rss[0], rss_full = rss[1];
    for (int i = 0; i < 2; i++)
        printf("%-7s weights: load %.2f s, peak RSS %.2f GB = %.3f x checkpoint, prefill %.2f "
               "tok/s, decode %.2f tok/s, first ids %d %d %d %d\n", names[i], res[i]->load_s,
               rss[i] / 1e9, rss[i] / ckpt, res[i]->prefill_tok_s, res[i]->decode_tok_s,
               res[i]->first_ids[0], res[i]->first_ids[1], res[i]->first_ids[2],
               res[i]->first_ids[3]);
    double worst = 0, largest = 0;
    for (int v = 0; v < VOCAB; v++) {
        worst = fmax(worst, fabs((double)half->logits[v] - full->logits[v]));
        largest = fmax(largest, fabs((double)full->logits[v]));
    }
    double logit_diff = largest > 0 ? worst / largest : worst;
    double prefill_ratio = half->prefill_tok_s / full->prefill_tok_s;
    double allowed = 1.25 * ckpt + kv_cache;
    printf("16-bit / float32: peak RSS %.3f, prefill %.3f, decode %.3f; last logits differ by "
           "%.2g (relative)\n", rss_half / rss_full, prefill_ratio,
           half->decode_tok_s / full->decode_tok_s, logit_diff);
    int ok_rss = rss_half <= allowed, ok_prefill = prefill_ratio >= 0.8;
    int ok_logits = logit_diff < 1e-4;
    printf("target 16-bit peak RSS <= 1.25 x checkpoint + KV cache (%.2f GB): %s\n", allowed / 1e9,
           ok_rss ? "met" : "MISSED");
    printf("target 16-bit prefill >= 0.8 x float32: %s\n", ok_prefill ? "met" : "MISSED");
    printf("check last logits agree to 1e-4: %s\n", ok_logits ? "met" : "MISSED");
    return ok_rss && ok_prefill && ok_logits ? 0 : 1;
}
