/* bench_generator — throughput of the trace generator on a checkpoint written by
 * `bench/torch_forward.py write DIR` (random Llama, ~100M parameters):
 *
 *   bench_generator DIR [--threads N] [--prompt 1024] [--decode 64]
 *
 * 1. the bare forward pass (no observer): prefill of the prompt in 128-token chunks, then greedy
 *    decode steps; tokens/s of each;
 * 2. `kvsim trace` end to end on the same prompt ids (recording Q/K/V, attention rows every 16
 *    steps, writing the HDF5 trace): its summary line gives prefill/decode tokens/s and the time
 *    spent writing the trace.
 * Compare with `bench/torch_forward.py run DIR --threads N` on the same machine. The prompt ids
 * are (i * 7919 + 13) % vocab in both. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/util.h"
#include "traces/model/forward.h"
#include "traces/model/model.h"
#include "traces/cmd/trace_cmd.h"

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_generator DIR [--threads N] [--prompt N] [--decode N]\n");
        return 2;
    }
    const char *dir = argv[1];
    int threads = openblas_get_num_procs(), n_prompt = 1024, n_decode = 64;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt"))
            n_prompt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--decode"))
            n_decode = atoi(argv[i + 1]);
    }
    if (threads <= 0 || n_prompt <= 0 || n_decode < 0) {
        fprintf(stderr, "bench_generator: bad option value\n");
        return 2;
    }
    openblas_set_num_threads(threads);

    KvErr err = {{0}};
    double t = now_seconds();
    Model *model = model_load(dir, &err);
    if (!model) {
        fprintf(stderr, "bench_generator: %s\n", err.msg);
        return 2;
    }
    const ModelConfig *c = &model->config;
    printf("model %s: %d layers, hidden %d, %d/%d heads, vocab %d; loaded in %.2f s; "
           "%d OpenBLAS threads\n", dir, c->n_layers, c->hidden_size, c->n_q_heads,
           c->n_kv_heads, c->vocab_size, now_seconds() - t, threads);

    int max_tokens = n_prompt + n_decode;
    int32_t *tokens = kv_malloc((size_t)max_tokens * sizeof *tokens);
    for (int i = 0; i < n_prompt; i++)
        tokens[i] = (int32_t)(((long)i * 7919 + 13) % c->vocab_size);
    RunState *s = run_state_new(model, max_tokens, 128);
    t = now_seconds();
    const float *logits = forward_prompt(s, tokens, n_prompt, NULL);
    double prefill = now_seconds() - t;
    t = now_seconds();
    for (int i = 0; i < n_decode; i++) {
        tokens[n_prompt + i] = argmax_token(logits, c->vocab_size);
        logits = forward_tokens(s, &tokens[n_prompt + i], 1, 1, NULL);
    }
    double decode = now_seconds() - t;
    printf("kvsim forward prefill: %d tokens in %.3f s = %.1f tok/s\n", n_prompt, prefill,
           n_prompt / prefill);
    printf("kvsim forward decode: %d tokens in %.3f s = %.1f tok/s\n", n_decode, decode,
           n_decode / decode);
    printf("kvsim first generated ids:");
    for (int i = 0; i < n_decode && i < 8; i++)
        printf(" %d", tokens[n_prompt + i]);
    printf("\n");
    run_state_free(s);
    model_free(model);

    /* End to end through the command, on the same prompt. */
    char ids_path[4096], out_path[4096], threads_arg[16], decode_arg[16];
    snprintf(ids_path, sizeof ids_path, "%s/bench_prompt.ids", dir);
    snprintf(out_path, sizeof out_path, "%s/bench_trace.h5", dir);
    FILE *fp = fopen(ids_path, "w");
    if (!fp) {
        fprintf(stderr, "bench_generator: cannot write %s\n", ids_path);
        return 2;
    }
    for (int i = 0; i < n_prompt; i++)
        fprintf(fp, "%d\n", tokens[i]);
    fclose(fp);
    free(tokens);
    snprintf(threads_arg, sizeof threads_arg, "%d", threads);
    snprintf(decode_arg, sizeof decode_arg, "%d", n_decode);
    char *trace_argv[] = {"trace", "--model", (char *)dir, "--tokens", ids_path, "--out",
                          out_path, "--max-new", decode_arg, "--threads", threads_arg, NULL};
    fflush(stdout);
    t = now_seconds();
    int rc = cmd_trace(11, trace_argv);
    printf("kvsim trace end to end (load, prefill, decode, write): %.3f s, status %d\n",
           now_seconds() - t, rc);
    remove(ids_path);
    return rc;
}
