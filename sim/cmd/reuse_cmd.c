#include "sim/cmd/reuse_cmd.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim/base/args.h"
#include "sim/base/csv.h"
#include "sim/reuse/reqlog.h"
#include "sim/reuse/reuse.h"
#include "sim/reuse/workload.h"
#include "traces/model/model.h"

enum { MAX_CAPACITIES = 64, MAX_LIST = 16 };

int parse_byte_sizes(const char *option, const char *list, int64_t *out, int max, KvErr *err)
{
    static const struct {
        const char *suffix;
        double factor;
    } units[] = {
        {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0},
        {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1.0}, {"", 1.0},
    };
    int n = 0;
    const char *s = list;
    for (;;) {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        char item[64];
        if (len == 0 || len >= sizeof item)
            return kv_fail(err, "--%s: expected a comma-separated list of sizes (e.g. 512MiB,4GiB), found '%s'",
                           option, list);
        memcpy(item, s, len);
        item[len] = '\0';
        char *rest;
        errno = 0;
        double v = strtod(item, &rest);
        double factor = -1;
        for (size_t u = 0; u < sizeof units / sizeof units[0]; u++)
            if (!strcmp(rest, units[u].suffix)) {
                factor = units[u].factor;
                break;
            }
        if (rest == item || factor < 0 || errno || !isfinite(v) || v < 0 || v * factor > 9.2e18)
            return kv_fail(err, "--%s: '%s': expected a size in bytes >= 0 with an optional unit "
                           "(KB MB GB TB KiB MiB GiB TiB)", option, item);
        if (n == max)
            return max == 1 ? kv_fail(err, "--%s: expected one size, found '%s'", option, list)
                            : kv_fail(err, "--%s: at most %d sizes", option, max);
        out[n++] = (int64_t)(v * factor);
        if (!end)
            return n;
        s = end + 1;
    }
}

/* A comma-separated list of names out of `names` into idx[]; returns the count or -1. */
static int parse_names(const char *option, const char *list, const char *const *names, int n_names,
                       int *idx, int max, KvErr *err)
{
    int n = 0;
    const char *s = list;
    for (;;) {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        int found = -1;
        for (int k = 0; k < n_names; k++)
            if (strlen(names[k]) == len && !strncmp(names[k], s, len))
                found = k;
        if (found < 0) {
            char expected[256] = "";
            for (int k = 0; k < n_names; k++)
                snprintf(expected + strlen(expected), sizeof expected - strlen(expected), "%s%s",
                         k ? "|" : "", names[k]);
            return kv_fail(err, "--%s: '%.*s': expected a comma-separated list of %s", option,
                           (int)(len > 64 ? 64 : len), s, expected);
        }
        if (n == max)
            return kv_fail(err, "--%s: at most %d names", option, max);
        idx[n++] = found;
        if (!end)
            return n;
        s = end + 1;
    }
}

typedef struct {
    ReuseScope scope;
    ReusePolicy policy;
    int64_t capacity, capacity_blocks, host_blocks;
    double compress;
} ReuseJob;

/* KV bytes per token from config.json (a file, or a directory holding one). */
static int model_kv_geometry(const char *model, int *layers, int *kv_heads, int *head_dim,
                             int *q_heads, double *params, KvErr *err)
{
    char path[4096];
    struct stat st;
    if (stat(model, &st) == 0 && S_ISDIR(st.st_mode))
        snprintf(path, sizeof path, "%s/config.json", model);
    else
        snprintf(path, sizeof path, "%s", model);
    ModelConfig cfg;
    if (model_config_load(path, &cfg, err) != 0)
        return -1;
    *layers = cfg.n_layers;
    *kv_heads = cfg.n_kv_heads;
    *head_dim = cfg.head_dim;
    *q_heads = cfg.n_q_heads;
    /* the weights a token's prefill multiplies: all but the embedding tables (a lookup; the
     * lm_head of an untied model runs on the last token only) */
    *params = (double)model_n_params(&cfg) -
              (double)cfg.vocab_size * cfg.hidden_size * (cfg.tie_word_embeddings ? 1 : 2);
    return 0;
}

static void human_bytes(double b, char *out, size_t n)
{
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    while (b >= 1024.0 && u < 5) {
        b /= 1024.0;
        u++;
    }
    snprintf(out, n, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
}

/* A config file: lines "key = value" under [reuse] (";" or "#" starts a comment), each key an
 * option of the command, set as if given on the command line before the others (which then
 * override it). A flag takes true or false. */
static char *trim(char *b)
{
    char *e = b + strlen(b);
    while (*b == ' ' || *b == '\t')
        b++;
    while (e > b && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r'))
        *--e = '\0';
    return b;
}

/* A config file: lines "key = value" under [reuse] (";" or "#" starts a comment), each key an
 * option of the command, set as if given on the command line before the others (which then
 * override it). A flag takes true or false. *text: the file, which the string options point
 * into (free() it after the command). */
static int load_reuse_ini(const char *path, const ArgSpec *specs, char **text, KvErr *err)
{
    size_t len;
    *text = kv_read_input(path, (size_t)1 << 20, &len, err);
    if (!*text)
        return -1;
    int lineno = 0, in_section = 0;
    for (char *line = *text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        char *rest = nl ? nl + 1 : NULL;
        lineno++;
        char *c = strpbrk(line, ";#");
        if (c)
            *c = '\0';
        char *b = trim(line);
        line = rest;
        if (!*b)
            continue;
        if (*b == '[') {
            if (strcmp(b, "[reuse]") != 0)
                return kv_fail(err, "%s:%d: section %s: expected [reuse]", path, lineno, b);
            in_section = 1;
            continue;
        }
        char *eq = strchr(b, '=');
        if (!in_section || !eq)
            return kv_fail(err, "%s:%d: expected key = value under [reuse]", path, lineno);
        *eq = '\0';
        char *key = trim(b), *v = trim(eq + 1);
        const ArgSpec *spec = NULL;
        for (const ArgSpec *a = specs; a->name; a++)
            if (!strcmp(a->name, key))
                spec = a;
        if (!spec)
            return kv_fail(err, "%s:%d: unknown key '%s' (expected an option of kvsim reuse)",
                           path, lineno, key);
        char opt[128];
        snprintf(opt, sizeof opt, "--%s", key);
        char *av[3] = {"reuse", opt, v};
        int ac = 3;
        if (spec->kind == ARG_FLAG) {
            if (!strcmp(v, "false"))
                continue;
            if (strcmp(v, "true") != 0)
                return kv_fail(err, "%s:%d: %s: expected true or false, found '%s'", path, lineno,
                               key, v);
            ac = 2;
        }
        const char *pos[1];
        int n_pos;
        KvErr e2;
        if (args_parse(ac, av, specs, pos, 0, &n_pos, &e2) != 0)
            return kv_fail(err, "%s:%d: %s", path, lineno, e2.msg);
    }
    return 0;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

static int reuse_main(int argc, char **argv, char **ini_text)
{
    const char *out = "results/reuse", *scopes = "none,prefix,conversation",
               *policies = "lru,fifo,lfu,s3fifo,belady,conv", *capacity = "1GiB,4GiB,16GiB,64GiB",
               *model = NULL, *host_capacity = "0", *workload = NULL, *compress = "1";
    int format = REQLOG_AUTO, block = 0, layers = 28, kv_heads = 4, head_dim = 128, kv_bits = 16,
        quiet = 0, lru_curve = 0, threads = 0, q_heads = 28;
    /* the defaults: Qwen2.5-7B's shape (its weights less the embeddings) */
    double prefill_tps = 10000.0, prefill_flops = 0, params = 6.53e9, host_bw = 25e9;
    const ArgSpec specs[] = {
        {"workload", ARG_STRING, &workload, 0, 0, NULL,
         "the request log (instead of the positional LOG)"},
        {"out", ARG_STRING, &out, 0, 0, NULL,
         "output directory (reuse.csv, reuse_turns.csv, reuse_ttft.csv)"},
        {"format", ARG_CHOICE, &format, 0, 0, "auto|qwen|mooncake",
         "the log's format (auto: qwen when the first request has chat_id)"},
        {"block", ARG_INT, &block, 0, 1 << 24, NULL,
         "tokens per hash_ids block (0: the format's, qwen 16, mooncake 512)"},
        {"scopes", ARG_STRING, &scopes, 0, 0, NULL, "comma-separated: none|prefix|conversation (radix = prefix)"},
        {"policies", ARG_STRING, &policies, 0, 0, NULL,
         "comma-separated: lru|fifo|lfu|s3fifo|belady|conv"},
        {"capacity", ARG_STRING, &capacity, 0, 0, NULL,
         "comma-separated device cache sizes in bytes (KB MB GB TB KiB MiB GiB TiB)"},
        {"host-capacity", ARG_STRING, &host_capacity, 0, 0, NULL,
         "bytes of a host tier (lru) behind every device cache, taking what it evicts (0: none)"},
        {"model", ARG_STRING, &model, 0, 0, NULL,
         "config.json (or its directory): layers, KV heads and head_dim from it"},
        {"layers", ARG_INT, &layers, 1, 1 << 16, NULL, "layers (without --model)"},
        {"kv-heads", ARG_INT, &kv_heads, 1, 1 << 16, NULL, "KV heads (without --model)"},
        {"head-dim", ARG_INT, &head_dim, 1, 1 << 16, NULL, "head dimension (without --model)"},
        {"q-heads", ARG_INT, &q_heads, 1, 1 << 16, NULL, "query heads (without --model; FLOPs)"},
        {"params", ARG_DOUBLE, &params, 0, 1e15, NULL,
         "weights a prefill token multiplies, without the embeddings (without --model; FLOPs)"},
        {"kv-bits", ARG_INT, &kv_bits, 4, 32, NULL, "bits per cached K or V value: 4, 8, 16 or 32"},
        {"prefill-tps", ARG_DOUBLE, &prefill_tps, 1e-9, 1e15, NULL,
         "prefill throughput, tokens per second (seconds and TTFT columns)"},
        {"prefill-flops", ARG_DOUBLE, &prefill_flops, 0, 1e21, NULL,
         "prefill throughput in FLOP/s: when > 0, prefill time from FLOPs (--prefill-tps unused)"},
        {"host-bw", ARG_DOUBLE, &host_bw, 0, 1e15, NULL,
         "host -> device bytes/s for what the host tier serves (0: free)"},
        {"compress", ARG_STRING, &compress, 0, 0, NULL,
         "comma-separated ratios a conversation's persisted cache is compressed to (1: none)"},
        {"lru-curve", ARG_FLAG, &lru_curve, 0, 0, NULL,
         "also lru_curve.csv: the prefix scope under lru at every capacity, in one pass"},
        {"threads", ARG_INT, &threads, 0, 1024, NULL,
         "runs at once, 0 = all cores (the files are the same at any count)"},
        {"quiet", ARG_FLAG, &quiet, 0, 0, NULL, "no table, no progress"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage =
        "reuse [CONFIG.ini] [LOG.jsonl[.gz]] [--workload LOG] [options]\n"
        "  Replays a request log (qwen or mooncake JSONL) through persisted KV caches: every\n"
        "  scope x policy x capacity; writes reuse.csv and reuse_turns.csv (docs/reuse.md)";
    KvErr err;
    /* A config first (configs/reuse.ini): its keys, then the command line's options. */
    if (argc > 1 && ends_with(argv[1], ".ini")) {
        if (load_reuse_ini(argv[1], specs, ini_text, &err) < 0) {
            fprintf(stderr, "kvsim: reuse: %s\n", err.msg);
            return 2;
        }
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    const char *positional[1] = {NULL};
    int n_positional = 0;
    int parsed = args_parse(argc, argv, specs, positional, 1, &n_positional, &err);
    if (parsed == 1) {
        args_usage(stdout, usage, specs);
        return 0;
    }
    if (parsed < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (n_positional == 1 && workload) {
        fprintf(stderr, "kvsim: reuse: expected the log once, found %s and --workload %s\n",
                positional[0], workload);
        return 2;
    }
    if (n_positional == 0 && !workload) {
        fprintf(stderr, "kvsim: reuse: expected a request log (LOG or --workload LOG; kvsim reuse --help)\n");
        return 2;
    }
    if (n_positional == 0)
        positional[0] = workload;
    double ratios[MAX_LIST];
    int n_ratios = 0;
    for (const char *c = compress;;) {
        char *end;
        errno = 0;
        double v = strtod(c, &end);
        if (end == c || errno || !(v > 0 && v <= 1) || (*end && *end != ',') || n_ratios == MAX_LIST) {
            fprintf(stderr, "kvsim: reuse: --compress: expected at most %d comma-separated ratios "
                    "in (0, 1], found '%s'\n", MAX_LIST, compress);
            return 2;
        }
        ratios[n_ratios++] = v;
        if (!*end)
            break;
        c = end + 1;
    }
    int scope_idx[MAX_LIST], policy_idx[MAX_LIST];
    int64_t caps[MAX_CAPACITIES];
    /* "radix" names the prefix scope too (what a radix-tree cache serves, docs/reuse.md). */
    static const char *const scope_words[N_SCOPES + 1] = {"none", "prefix", "conversation", "radix"};
    int n_scopes = parse_names("scopes", scopes, scope_words, N_SCOPES + 1, scope_idx, MAX_LIST, &err);
    for (int i = 0; i < n_scopes; i++)
        if (scope_idx[i] == N_SCOPES)
            scope_idx[i] = SCOPE_PREFIX;
    int n_policies = n_scopes < 0 ? -1 : parse_names("policies", policies, reuse_policy_names,
                                                     N_POLICIES, policy_idx, MAX_LIST, &err);
    int n_caps = n_policies < 0 ? -1 : parse_byte_sizes("capacity", capacity, caps, MAX_CAPACITIES, &err);
    int64_t host_bytes = 0;
    if (n_caps >= 0 && parse_byte_sizes("host-capacity", host_capacity, &host_bytes, 1, &err) < 0)
        n_caps = -1;
    if (n_caps < 0) {
        fprintf(stderr, "kvsim: reuse: %s\n", err.msg);
        return 2;
    }
    if (kv_bits != 4 && kv_bits != 8 && kv_bits != 16 && kv_bits != 32) {
        fprintf(stderr, "kvsim: reuse: --kv-bits: expected 4, 8, 16 or 32, found %d\n", kv_bits);
        return 2;
    }
    if (model && model_kv_geometry(model, &layers, &kv_heads, &head_dim, &q_heads, &params, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (make_dirs(out, &err) < 0 || dir_writable(out, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    /* The log is streamed (reuse_stream): its format first, for the block size. */
    ReqlogFormat log_format;
    if (reqlog_detect(positional[0], (ReqlogFormat)format, &log_format, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    const int block_tokens = block > 0 ? block
                             : log_format == REQLOG_MOONCAKE ? REQLOG_MOONCAKE_BLOCK : REQLOG_QWEN_BLOCK;
    /* K and V: 2 values per layer, KV head and head dimension. */
    double bytes_per_token = (double)layers * kv_heads * head_dim * 2.0 * kv_bits / 8.0;
    double block_bytes = bytes_per_token * block_tokens;
    ReuseCost cost = {.prefill_tps = prefill_flops > 0 ? 0 : prefill_tps,
                      .flops_per_s = prefill_flops, .params = params,
                      .attn_dim = (double)layers * q_heads * head_dim,
                      .block_bytes = block_bytes, .host_bw = host_bw};

    static const char header[] =
        "scope,policy,capacity_bytes,capacity_blocks,requests,prompt_tokens,cached_tokens,"
        "token_hit_rate,prefill_tokens,prefill_s,prefill_s_saved,evictions,inserted,bytes_end,"
        "bytes_peak,host_capacity_bytes,host_cached_tokens,host_bytes_end,host_bytes_peak,"
        "compress_ratio,prefill_flops,prefill_flops_saved,ttft_mean_s,ttft_p50_s,ttft_p95_s,"
        "ttft_p99_s,bytes_device_to_host,bytes_host_to_device,host_evictions,invalidated";
    static const char ttft_header[] = "scope,policy,capacity_bytes,compress_ratio,quantile,ttft_s";
    static const char turns_header[] =
        "scope,policy,capacity_bytes,compress_ratio,turn,requests,prompt_tokens,cached_tokens,"
        "context_share";
    CsvFile csv, turns, ttft_csv;
    if (csv_create(&csv, out, "reuse.csv", header, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (csv_create(&ttft_csv, out, "reuse_ttft.csv", ttft_header, &err) < 0) {
        atomic_abort(&csv.af);
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (csv_create(&turns, out, "reuse_turns.csv", turns_header, &err) < 0) {
        atomic_abort(&csv.af);
        atomic_abort(&ttft_csv.af);
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (!quiet) {
        char kv[32];
        human_bytes(bytes_per_token, kv, sizeof kv);
        printf("KV per token %s (%d layers x %d KV heads x %d dims x 2 x %d bits); prefill ",
               kv, layers, kv_heads, head_dim, kv_bits);
        if (prefill_flops > 0)
            printf("%g FLOP/s (%.3g weights, %d query heads)\n", prefill_flops, params, q_heads);
        else
            printf("%g tokens/s\n", prefill_tps);
        printf("%-13s %-7s %12s %5s %9s %9s %12s %10s\n", "scope", "policy", "capacity", "q",
               "hit_rate", "ttft_p95", "evictions", "requests/s");
    }
    /* Every scope x capacity x policy is one replay; all run over one stream of the log, each
     * writing only its own result, and the rows are written afterwards in job order: the same
     * files at any thread count. */
    int n_jobs = 0;
    ReuseJob *jobs = kv_calloc((size_t)n_scopes * n_caps * n_policies * n_ratios, sizeof *jobs);
    for (int si = 0; si < n_scopes; si++) {
        ReuseScope scope = (ReuseScope)scope_idx[si];
        for (int ci = 0; ci < n_caps; ci++) {
            /* Under scope none the policy does not matter: one row, policy "none". */
            int n_pol = scope == SCOPE_NONE ? 1 : n_policies;
            /* compression applies to the conversation scope's entries only */
            int n_q = scope == SCOPE_CONVERSATION ? n_ratios : 1;
            for (int qi = 0; qi < n_q; qi++)
                for (int pi = 0; pi < n_pol; pi++)
                    jobs[n_jobs++] = (ReuseJob){
                        .scope = scope, .policy = (ReusePolicy)policy_idx[pi],
                        .capacity = caps[ci],
                        .capacity_blocks = (int64_t)floor((double)caps[ci] / block_bytes),
                        .host_blocks = (int64_t)floor((double)host_bytes / block_bytes),
                        .compress = scope == SCOPE_CONVERSATION ? ratios[qi] : 1.0,
                    };
        }
    }
    ReuseOptions *opts = kv_calloc((size_t)(n_jobs ? n_jobs : 1), sizeof *opts);
    ReuseResult *results = kv_calloc((size_t)(n_jobs ? n_jobs : 1), sizeof *results);
    for (int j = 0; j < n_jobs; j++)
        opts[j] = (ReuseOptions){.scope = jobs[j].scope, .policy = jobs[j].policy,
                                 .capacity_blocks = jobs[j].capacity_blocks,
                                 .host_blocks = jobs[j].host_blocks,
                                 .compress = jobs[j].compress, .cost = &cost};
    /* The curve's capacities: 1, 2, 3, ... at four points per doubling (cut at the log's
     * distinct blocks when written). */
    int64_t curve_caps[160], curve_out[160];
    int n_curve = 0;
    for (int k = 0; lru_curve; k++) {
        int64_t c = (int64_t)llround(pow(2.0, k / 4.0));
        if (c > ((int64_t)1 << 32))
            break;
        if (n_curve == 0 || c != curve_caps[n_curve - 1])
            curve_caps[n_curve++] = c;
    }
    ReuseStreamInfo info;
    double t1 = now_seconds();
    if (reuse_stream(positional[0], (ReqlogFormat)format, block_tokens, opts, n_jobs, threads,
                     !quiet && isatty(STDERR_FILENO), lru_curve ? curve_caps : NULL, n_curve, curve_out, results, &info, &err) < 0) {
        atomic_abort(&csv.af);
        atomic_abort(&turns.af);
        atomic_abort(&ttft_csv.af);
        fprintf(stderr, "kvsim: %s\n", err.msg);
        free(jobs);
        free(opts);
        free(results);
        return 2;
    }
    double t_sim = now_seconds() - t1;
    free(opts);
    if (!quiet)
        printf("%s: %ld requests, %lld block references, read and replayed in %.2f s\n",
               positional[0], info.requests, (long long)info.references, t_sim);
    for (int j = 0; j < n_jobs; j++) {
        const ReuseJob *job = &jobs[j];
        const ReuseResult *res = &results[j];
        const char *pol_name = job->scope == SCOPE_NONE ? "none" : reuse_policy_names[job->policy];
        double rate = res->prompt_tokens > 0 ? (double)res->hit_tokens / res->prompt_tokens : NAN;
        double prefill = (double)(res->prompt_tokens - res->hit_tokens);
        csv_put_text(&csv, reuse_scope_names[job->scope]);
        csv_put_text(&csv, pol_name);
        csv_put_count(&csv, (double)job->capacity);
        csv_put_count(&csv, (double)job->capacity_blocks);
        csv_put_count(&csv, (double)res->requests);
        csv_put_count(&csv, (double)res->prompt_tokens);
        csv_put_count(&csv, (double)res->hit_tokens);
        csv_put_optional(&csv, rate);
        csv_put_count(&csv, prefill);
        csv_put_num(&csv, prefill / prefill_tps);
        csv_put_num(&csv, (double)res->hit_tokens / prefill_tps);
        csv_put_count(&csv, (double)res->evictions);
        csv_put_count(&csv, (double)res->inserted);
        csv_put_count(&csv, (double)res->blocks_end * block_bytes);
        csv_put_count(&csv, (double)res->blocks_peak * block_bytes);
        csv_put_count(&csv, (double)host_bytes);
        csv_put_count(&csv, (double)res->host_hit_tokens);
        csv_put_count(&csv, (double)res->host_blocks_end * block_bytes);
        csv_put_count(&csv, (double)res->host_blocks_peak * block_bytes);
        csv_put_num(&csv, job->compress);
        csv_put_num(&csv, res->flops);
        csv_put_num(&csv, res->flops_saved);
        csv_put_num(&csv, res->ttft_mean);
        csv_put_num(&csv, res->ttft_q[50]);
        csv_put_num(&csv, res->ttft_q[95]);
        csv_put_num(&csv, res->ttft_q[99]);
        csv_put_count(&csv, (double)res->blocks_to_host * block_bytes);
        csv_put_count(&csv, (double)res->blocks_to_device * block_bytes);
        csv_put_count(&csv, (double)res->host_evictions);
        csv_put_count(&csv, (double)res->invalidated);
        csv_end_row(&csv);
        for (int k = 0; k < REUSE_TTFT_Q && res->requests > 0; k++) {
            csv_put_text(&ttft_csv, reuse_scope_names[job->scope]);
            csv_put_text(&ttft_csv, pol_name);
            csv_put_count(&ttft_csv, (double)job->capacity);
            csv_put_num(&ttft_csv, job->compress);
            csv_put_num(&ttft_csv, k / 100.0);
            csv_put_num(&ttft_csv, res->ttft_q[k]);
            csv_end_row(&ttft_csv);
        }
        for (int t = 0; t < REUSE_MAX_TURN; t++) {
            if (!res->turn_requests[t])
                continue;
            csv_put_text(&turns, reuse_scope_names[job->scope]);
            csv_put_text(&turns, pol_name);
            csv_put_count(&turns, (double)job->capacity);
            csv_put_num(&turns, job->compress);
            csv_put_int(&turns, t);
            csv_put_count(&turns, (double)res->turn_requests[t]);
            csv_put_count(&turns, (double)res->turn_prompt[t]);
            csv_put_count(&turns, (double)res->turn_hit[t]);
            csv_put_optional(&turns, res->turn_prompt[t] > 0
                                         ? (double)res->turn_hit[t] / res->turn_prompt[t] : NAN);
            csv_end_row(&turns);
        }
        if (!quiet) {
            char capb[32];
            human_bytes((double)job->capacity, capb, sizeof capb);
            printf("%-13s %-7s %12s %5.3g %9.4f %9.3g %12lld %10.3g\n", reuse_scope_names[job->scope],
                   pol_name, capb, job->compress, res->prompt_tokens > 0 ? rate : 0.0, res->ttft_q[95],
                   (long long)res->evictions, t_sim > 0 ? res->requests / t_sim : 0.0);
        }
    }
    long n_runs = n_jobs;
    free(jobs);
    free(results);
    CsvFile curve_csv;
    int n_files = 3;
    if (lru_curve) {
        static const char curve_header[] =
            "capacity_blocks,capacity_bytes,cached_tokens,token_hit_rate";
        if (csv_create(&curve_csv, out, "lru_curve.csv", curve_header, &err) < 0) {
            atomic_abort(&csv.af);
            atomic_abort(&turns.af);
            atomic_abort(&ttft_csv.af);
            fprintf(stderr, "kvsim: %s\n", err.msg);
            return 2;
        }
        n_files = 4;
        const int64_t nb = info.n_blocks;
        /* Capacities 1, 2, 3, ... at four points per doubling up to every distinct block. */
        int64_t prev = -1;
        for (int k = 0; k < n_curve; k++) {
            int64_t c = curve_caps[k] < nb ? curve_caps[k] : nb;
            int64_t cached = curve_caps[k] < nb ? curve_out[k] : info.curve_total;
            if (c != prev) {
                csv_put_count(&curve_csv, (double)c);
                csv_put_count(&curve_csv, (double)c * block_bytes);
                csv_put_count(&curve_csv, (double)cached);
                csv_put_optional(&curve_csv, info.prompt_tokens > 0
                                                 ? (double)cached / info.prompt_tokens : NAN);
                csv_end_row(&curve_csv);
                prev = c;
            }
            if (c == nb)
                break;
        }
    }
    CsvFile *files[] = {&csv, &turns, &ttft_csv, &curve_csv};
    if (csv_commit_set(files, n_files, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (!quiet)
        printf("%ld runs in %.2f s (wall); wrote %s/reuse.csv, reuse_turns.csv, reuse_ttft.csv%s\n",
               n_runs, t_sim, out, lru_curve ? ", lru_curve.csv" : "");
    return 0;
}

int cmd_reuse(int argc, char **argv)
{
    char *ini_text = NULL;
    int rc = reuse_main(argc, argv, &ini_text);
    free(ini_text);
    return rc;
}

int cmd_synth_workload(int argc, char **argv)
{
    WorkloadParams wp;
    workload_defaults(&wp);
    const char *out = NULL;
    int seed = (int)wp.seed;
    double n_conv = (double)wp.n_conversations;
    const ArgSpec specs[] = {
        {"out", ARG_STRING, &out, 0, 0, NULL, "request log to write (qwen JSONL)"},
        {"seed", ARG_INT, &seed, 0, 2147483647, NULL, "random seed"},
        {"conversations", ARG_DOUBLE, &n_conv, 0, 1e9, NULL, "conversations"},
        {"turns-mean", ARG_DOUBLE, &wp.turns_mean, 1, 1e6, NULL,
         "mean turns per conversation (geometric, >= 1)"},
        {"system-prompts", ARG_INT, &wp.n_system, 0, 1 << 20, NULL,
         "shared system prompts (0: none), one drawn uniformly per conversation"},
        {"system-mean", ARG_DOUBLE, &wp.system_mean, 1, 1e9, NULL,
         "mean tokens of a system prompt (geometric)"},
        {"message-mean", ARG_DOUBLE, &wp.message_mean, 1, 1e9, NULL,
         "mean tokens of a user message (geometric)"},
        {"answer-mean", ARG_DOUBLE, &wp.answer_mean, 1, 1e9, NULL,
         "mean tokens of an answer (geometric)"},
        {"rate", ARG_DOUBLE, &wp.rate, 1e-9, 1e9, NULL,
         "conversations per second (Poisson arrivals)"},
        {"think-mean", ARG_DOUBLE, &wp.think_mean, 0, 1e9, NULL,
         "mean seconds from a turn to the next (exponential)"},
        {"block", ARG_INT, &wp.block_tokens, 1, 1 << 24, NULL, "tokens per hash_ids block"},
        {"models", ARG_INT, &wp.n_models, 1, 1 << 20, NULL,
         "models serving the conversations (> 1: a \"model\" field per request)"},
        {"switch-prob", ARG_DOUBLE, &wp.switch_prob, 0, 1, NULL,
         "chance that a conversation moves to another model before each later turn"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *usage = "synth-workload --out FILE [options]\n"
                        "  Writes a synthetic multi-turn chat request log in the qwen format";
    const char *positional[1];
    int status = args_start(argc, argv, specs, usage, positional, 0);
    if (status >= 0)
        return status;
    if (!out) {
        fprintf(stderr, "kvsim: synth-workload: --out FILE is required\n");
        return 2;
    }
    if (n_conv != floor(n_conv)) {
        fprintf(stderr, "kvsim: synth-workload: --conversations: expected a whole number, found %g\n",
                n_conv);
        return 2;
    }
    wp.seed = (unsigned long)seed;
    wp.n_conversations = (long)n_conv;
    wp.progress = isatty(STDERR_FILENO);
    KvErr err;
    long n = 0;
    double t0 = now_seconds();
    if (workload_write(&wp, out, &n, &err) < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    printf("%s: %ld conversations, %ld requests, %.1f s\n", out, wp.n_conversations, n,
           now_seconds() - t0);
    return 0;
}
