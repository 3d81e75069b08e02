/* bench_weights16 — memory and speed of 16-bit weights kept in memory against the float32 path,
 * on a random ~1.1B-parameter BF16 Llama checkpoint (TinyLlama's shape: 22 layers, hidden 2048,
 * 32 query and 4 KV heads, intermediate 5632, vocab 32000), written into DIR when absent:
 *
 *   bench_weights16 DIR [--threads N] [--prompt 256] [--decode 8] [--rounds 3]
 *
 * A run: load the model (BF16 matrices left in the mapping, or every weight converted to
 * float32 at load), prefill the prompt in 128-token chunks, greedy decode steps. Each path runs
 * once alone in its own child process, whose peak RSS is that path's; then one child loads both
 * and alternates their runs for --rounds rounds, each path keeping its best tokens/s (the
 * machine may be shared: paired runs see the same load, and the best round is the one least
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
    double load_s, prefill_tok_s, decode_tok_s; /* the best round's */
    int first_ids[4];
    float logits[VOCAB];
} Result;

typedef struct {
    Model *model;
    RunState *state;
    int32_t *tokens;
} Path;

static int path_open(Path *p, const char *dir, int f32, int max_tokens, double *load_s)
{
    KvErr err = {{0}};
    ModelLoadOptions options = {.f32_weights = f32};
    double t = now_seconds();
    if (!(p->model = model_load_with(dir, &options, &err))) {
        fprintf(stderr, "bench_weights16: %s\n", err.msg);
        return -1;
    }
    *load_s = now_seconds() - t;
    p->state = run_state_new(p->model, max_tokens, 128);
    p->tokens = kv_malloc((size_t)max_tokens * sizeof *p->tokens);
    return 0;
}

static void path_close(Path *p)
{
    run_state_free(p->state);
    model_free(p->model);
    free(p->tokens);
}

/* One run from position 0: the prompt in 128-token chunks, then greedy decode steps; its
 * tokens/s into r when better than what r holds. */
static void path_run(Path *p, int n_prompt, int n_decode, Result *r)
{
    p->state->n_cached = 0;
    for (int i = 0; i < n_prompt; i++)
        p->tokens[i] = (int32_t)(((long)i * 7919 + 13) % VOCAB);
    double t = now_seconds();
    const float *logits = forward_prompt(p->state, p->tokens, n_prompt, NULL);
    double prefill = n_prompt / (now_seconds() - t);
    t = now_seconds();
    for (int i = 0; i < n_decode; i++) {
        p->tokens[n_prompt + i] = argmax_token(logits, VOCAB);
        logits = forward_tokens(p->state, &p->tokens[n_prompt + i], 1, 1, NULL);
    }
    double decode = n_decode / (now_seconds() - t);
    r->prefill_tok_s = fmax(r->prefill_tok_s, prefill);
    r->decode_tok_s = fmax(r->decode_tok_s, decode);
    for (int i = 0; i < 4; i++)
        r->first_ids[i] = i < n_decode ? p->tokens[n_prompt + i] : -1;
    memcpy(r->logits, logits, sizeof r->logits);
}

static int write_all(int fd, const void *data, size_t len)
{
    for (size_t done = 0; done < len;) {
        ssize_t w = write(fd, (const char *)data + done, len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        done += (size_t)w;
    }
    return 0;
}

/* The memory child: one path alone, one run; its peak RSS is the parent's measure. */
static int child_memory(const char *dir, int f32, int n_prompt, int n_decode, int fd)
{
    static Result r;
    Path p;
    if (path_open(&p, dir, f32, n_prompt + n_decode, &r.load_s) != 0)
        return 2;
    path_run(&p, n_prompt, n_decode, &r);
    path_close(&p);
    return write_all(fd, &r, sizeof r) == 0 ? 0 : 2;
}

/* The speed child: both paths loaded, their runs alternating (16-bit first in odd rounds,
 * float32 first in even ones), so that each pair of runs sees the same machine. */
static int child_speed(const char *dir, int n_prompt, int n_decode, int rounds, int fd)
{
    static Result r[2];
    Path p[2];
    for (int i = 0; i < 2; i++)
        if (path_open(&p[i], dir, i, n_prompt + n_decode, &r[i].load_s) != 0)
            return 2;
    for (int round = 0; round < rounds; round++)
        for (int k = 0; k < 2; k++) {
            int i = round % 2 ? 1 - k : k;
            path_run(&p[i], n_prompt, n_decode, &r[i]);
            fprintf(stderr, "round %d, %s: prefill %.2f tok/s, decode %.2f tok/s (best so far)\n",
                    round + 1, i ? "float32" : "16-bit", r[i].prefill_tok_s, r[i].decode_tok_s);
        }
    for (int i = 0; i < 2; i++)
        path_close(&p[i]);
    return write_all(fd, r, sizeof r) == 0 ? 0 : 2;
}

/* Runs child(...) in a child process; reads `len` bytes of results, and its peak RSS (bytes). */
static int in_child(const char *dir, int mode, int n_prompt, int n_decode, int rounds, void *out,
                    size_t len, double *peak_rss)
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
        _exit(mode < 2 ? child_memory(dir, mode, n_prompt, n_decode, fds[1])
                       : child_speed(dir, n_prompt, n_decode, rounds, fds[1]));
    }
    close(fds[1]);
    size_t done = 0;
    while (done < len) {
        ssize_t r = read(fds[0], (char *)out + done, len - done);
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
        done != len)
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
    int threads = openblas_get_num_procs(), n_prompt = 256, n_decode = 8, rounds = 3;
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

    static Result alone[2], best[2];
    double rss[2], unused;
    const char *names[2] = {"16-bit", "float32"};
    for (int i = 0; i < 2; i++)
        if (in_child(dir, i, n_prompt, n_decode, 1, &alone[i], sizeof alone[i], &rss[i]) != 0) {
            fprintf(stderr, "bench_weights16: the %s run failed\n", names[i]);
            return 2;
        }
    if (in_child(dir, 2, n_prompt, n_decode, rounds, best, sizeof best, &unused) != 0) {
        fprintf(stderr, "bench_weights16: the alternating runs failed\n");
        return 2;
    }
    const Result *half = &best[0], *full = &best[1];
    double rss_half = rss[0], rss_full = rss[1];
    for (int i = 0; i < 2; i++)
        printf("%-7s weights: load %.2f s, peak RSS %.2f GB = %.3f x checkpoint, prefill %.2f "
               "tok/s, decode %.2f tok/s, first ids %d %d %d %d\n", names[i], alone[i].load_s,
               rss[i] / 1e9, rss[i] / ckpt, best[i].prefill_tok_s, best[i].decode_tok_s,
               best[i].first_ids[0], best[i].first_ids[1], best[i].first_ids[2],
               best[i].first_ids[3]);
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
