/* bench_reuse — the request-level simulator's speed (docs/reuse.md, "Speed").
 *
 * Writes (once, then reuses) a synthetic chat log of CONVERSATIONS conversations (default
 * 250000 at 20 per second: about 1M requests, 1.5 GB of JSONL, kvsim synth-workload's other
 * defaults) next to the working directory, reads it, and measures in one run:
 *   - the prefix scope under lru replayed at 20 capacities, log-spaced from 1/2^19 of the log's
 *     distinct blocks to all of them: block lookups per second of each replay (one lookup per
 *     hash_ids entry), in thread CPU time;
 *   - the one-pass LRU curve (reuse_lru_curve) over every capacity, against the 20 replays'
 *     total time, and its cached tokens against each replay's;
 *   - lru streamed from the file (reuse_stream_lru) at 2^20 blocks in a child process: its
 *     peak RSS against its cache state, and its numbers against the loaded log's replay;
 *   - the whole configs/reuse.ini run (reuse_stream: every scope, policy, capacity and ratio,
 *     the curve, the TTFTs) in a child process: its wall time and peak RSS against the caches'
 *     state plus what the first pass holds (docs/reuse.md, "Runs, threads, memory") plus 64 MiB;
 *   - reading: the reader's fast path against cJSON alone, on the log's first 100000 lines;
 *   - the peak resident memory (getrusage) of the process, against the log in memory plus the
 *     largest replay's cache state.
 * Targets: the curve equal to every replay; the streamed lru equal to the replay and its peak
 * RSS <= its cache state + 64 MiB; the whole run's peak RSS within its bound; the curve >= 10x faster than the 20 replays; >= 5
 * million lookups per second per core for lru (the median capacity's replay); exit status 1
 * when one is missed.
 * Usage: bench_reuse [CONVERSATIONS] [LOG] */
#define _DEFAULT_SOURCE /* wait4: the child's own rusage */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "sim/reuse/reqlog.h"
#include "sim/reuse/reuse.h"
#include "sim/reuse/workload.h"

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The configs/reuse.ini run (kvsim reuse's defaults there: Qwen2.5-7B's KV, prefill from FLOPs
 * at 4e14/s, capacities 256MiB,1GiB,4GiB,16GiB, ratios 1 and 0.25, the curve) through
 * reuse_stream in a child process; its peak RSS against its bound. Returns whether it held. */
static int full_run(const char *path)
{
    const double block_bytes = 28.0 * 4 * 128 * 2 * 2 * REQLOG_QWEN_BLOCK;
    static const ReuseCost cost = {.flops_per_s = 4e14, .params = 6.53e9,
                                   .attn_dim = 28.0 * 28 * 128, .block_bytes = block_bytes,
                                   .host_bw = 25e9};
    const double bytes[] = {268435456.0, 1073741824.0, 4294967296.0, 17179869184.0};
    const double ratios[] = {1.0, 0.25};
    ReuseOptions opts[128];
    int n = 0;
    double entries = 0; /* the caches' entries at most: their capacities in blocks */
    for (int s = 0; s < N_SCOPES; s++)
        for (int c = 0; c < 4; c++)
            for (int q = 0; q < (s == SCOPE_CONVERSATION ? 2 : 1); q++)
                for (int p = 0; p < (s == SCOPE_NONE ? 1 : N_POLICIES); p++) {
                    opts[n] = (ReuseOptions){.scope = (ReuseScope)s, .policy = (ReusePolicy)p,
                                             .capacity_blocks = (int64_t)floor(bytes[c] / block_bytes),
                                             .compress = ratios[q], .cost = &cost};
                    if (s != SCOPE_NONE)
                        entries += (double)opts[n].capacity_blocks;
                    n++;
                }
    int64_t caps[160], curve[160];
    int n_curve = 0;
    for (int k = 0; k <= 128; k++) {
        int64_t c = (int64_t)llround(pow(2.0, k / 4.0));
        if (n_curve == 0 || c != caps[n_curve - 1])
            caps[n_curve++] = c;
    }
    int fds[2];
    if (pipe(fds) != 0)
        return 0;
    double t0 = now_seconds();
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        ReuseResult *res = calloc((size_t)n, sizeof *res);
        ReuseStreamInfo info;
        KvErr err;
        int rc = reuse_stream(path, REQLOG_AUTO, 0, opts, n, 0, false, caps, n_curve, curve, res,
                              &info, &err);
        if (rc < 0)
            fprintf(stderr, "bench_reuse: %s\n", err.msg);
        double fig[4] = {rc < 0 ? -1 : (double)info.requests, (double)info.references,
                         (double)info.n_blocks, (double)info.pending_peak};
        if (write(fds[1], fig, sizeof fig) != (ssize_t)sizeof fig)
            _exit(2);
        _exit(rc < 0 ? 2 : 0);
    }
    close(fds[1]);
    double fig[4] = {-1, 0, 0, 0};
    if (read(fds[0], fig, sizeof fig) != (ssize_t)sizeof fig)
        fig[0] = -1;
    close(fds[0]);
    int wstatus;
    struct rusage ru;
    if (wait4(pid, &wstatus, 0, &ru) < 0)
        return 0;
    double wall = now_seconds() - t0, rss = (double)ru.ru_maxrss * 1024.0;
    /* The bound: per cache entry at most 192 bytes (its key map at most half full, 4 slots of
     * 16 bytes after a doubling; its slot arrays, up to twice the entries, at most 44 bytes a
     * slot under belady), s3fifo's ghosts
     * and conv's conversations fewer than its entries; the first pass's tables: 4 bytes per
     * distinct id in a dense array doubled to a power of two (8 at most per id), two chat id
     * tables of 13-byte slots at most half full (52 bytes per request at most), the curve's
     * bitmap (1 bit per reference, doubled: 2 at most); 64 MiB for the rest (buffers, the
     * reader, the chunks, the program). */
    double state = 192.0 * entries;
    double first_pass = 8.0 * fig[2] + 52.0 * fig[0] + 2.0 * fig[1] / 8.0;
    double bound = state + first_pass + 64.0 * 1048576.0;
    int ok = fig[0] >= 0 && WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0 && rss <= bound;
    printf("configs/reuse.ini run streamed (%d replays, the curve): %.0f requests, %.0f distinct "
           "blocks, %.1f s wall, peak RSS %.0f MiB (target <= caches %.0f MiB + first pass %.0f "
           "MiB + 64 MiB) %s; parents awaiting a turn at most %.0f\n", n, fig[0], fig[2], wall,
           rss / 1048576.0, state / 1048576.0, first_pass / 1048576.0, ok ? "ok" : "MISSED",
           fig[3]);
    return ok;
}

int main(int argc, char **argv)
{
    long conversations = argc > 1 ? atol(argv[1]) : 250000;
    char path[512];
    KvErr err;
    if (argc > 2)
        snprintf(path, sizeof path, "%s", argv[2]);
    else
        snprintf(path, sizeof path, "bench-reuse-%ld.jsonl", conversations);
    if (access(path, R_OK) != 0) {
        WorkloadParams wp;
        workload_defaults(&wp);
        wp.n_conversations = conversations;
        wp.rate = 20.0;
        printf("writing %s (%ld conversations)\n", path, conversations);
        if (workload_write(&wp, path, NULL, &err) < 0) {
            fprintf(stderr, "bench_reuse: %s\n", err.msg);
            return 2;
        }
    }
    /* Reading: the fast path against cJSON alone (the general path), parsing only, over the
     * first READ_LINES lines, in thread CPU time. */
    enum { READ_LINES = 100000 };
    double read_s[2] = {0, 0};
    long read_n = 0;
    for (int general = 0; general < 2; general++) {
        ReqReader *rd = reqlog_open(path, REQLOG_AUTO, &err);
        if (!rd) {
            fprintf(stderr, "bench_reuse: %s\n", err.msg);
            return 2;
        }
        if (general)
            reqlog_general_only(rd);
        ReqRecord rec;
        long n = 0;
        double c0 = cpu_seconds();
        while (n < READ_LINES && reqlog_next(rd, &rec, &err) == 1)
            n++;
        read_s[general] = cpu_seconds() - c0;
        read_n = n;
        reqlog_close(rd);
    }
    printf("reading %ld requests: fast path %.2f s, cJSON alone %.2f s: %.1fx\n", read_n,
           read_s[0], read_s[1], read_s[0] > 0 ? read_s[1] / read_s[0] : 0);
    /* lru streamed from the file (reuse_stream_lru) at STREAM_CAP blocks, in a child process
     * forked before the log is loaded: its peak RSS is the streamed replay's own. */
    const int64_t STREAM_CAP = 1 << 20;
    int fds[2];
    if (pipe(fds) != 0)
        return 2;
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        ReuseResult res;
        double c0 = cpu_seconds();
        int rc = reuse_stream_lru(path, REQLOG_AUTO, 0, STREAM_CAP, &res, &err);
        double fig[3] = {rc < 0 ? -1 : (double)res.hit_tokens, cpu_seconds() - c0,
                         (double)res.requests};
        if (write(fds[1], fig, sizeof fig) != (ssize_t)sizeof fig)
            _exit(2);
        _exit(rc < 0 ? 2 : 0);
    }
    close(fds[1]);
    double fig[3] = {-1, 0, 0};
    if (read(fds[0], fig, sizeof fig) != (ssize_t)sizeof fig)
        fig[0] = -1;
    close(fds[0]);
    int wstatus;
    struct rusage child;
    waitpid(pid, &wstatus, 0);
    getrusage(RUSAGE_CHILDREN, &child); /* the only child */
    double stream_rss = (double)child.ru_maxrss * 1024.0;
    /* its state: 8 + 4 + 4 bytes per slot and a key map of 2 to 4 entries per slot, counted at
     * 12 bytes an entry as when the map held 32-bit slots (its entries are 16 bytes now: the
     * bound stays the stricter one) */
    double stream_state = 16.0 * STREAM_CAP + 12.0 * 4 * STREAM_CAP;
    int ok_stream_mem = fig[0] >= 0 && stream_rss <= stream_state + 64.0 * 1048576.0;
    printf("lru streamed from the file at %lld blocks: %.0f requests in %.1f s (parsing included), "
           "peak RSS %.0f MiB (target <= its cache state %.0f MiB + 64 MiB, whatever the log's "
           "length) %s\n", (long long)STREAM_CAP, fig[2], fig[1], stream_rss / 1048576.0,
           stream_state / 1048576.0, ok_stream_mem ? "ok" : "MISSED");
    int ok_full_mem = full_run(path);
    ReqLog log;
    double t0 = now_seconds();
    if (reqlog_load(path, REQLOG_AUTO, 0, false, &log, &err) < 0) {
        fprintf(stderr, "bench_reuse: %s\n", err.msg);
        return 2;
    }
    int64_t refs = log.off[log.n];
    double log_bytes = (double)refs * sizeof *log.ids +
                       (double)log.n * (sizeof *log.off + sizeof *log.input + sizeof *log.output +
                                        sizeof *log.turn + sizeof *log.parent +
                                        sizeof *log.timestamp + sizeof *log.model + sizeof *log.conv);
    printf("%s: %ld requests, %lld block references, %u distinct blocks, read in %.1f s\n", path,
           log.n, (long long)refs, log.n_blocks, now_seconds() - t0);

    enum { N_CAPS = 20 };
    int64_t caps[N_CAPS], replay_hits[N_CAPS];
    double replay_s[N_CAPS], replays = 0;
    for (int k = 0; k < N_CAPS; k++) {
        caps[k] = (int64_t)llround((double)log.n_blocks * pow(2.0, -(double)(N_CAPS - 1 - k)));
        if (caps[k] < 1)
            caps[k] = 1;
        ReuseResult res;
        double c0 = cpu_seconds();
        reuse_simulate(&log, SCOPE_PREFIX, POL_LRU, caps[k], NULL, &res);
        replay_s[k] = cpu_seconds() - c0;
        replays += replay_s[k];
        replay_hits[k] = res.hit_tokens;
        printf("  lru replay at %10lld blocks: hit rate %.4f, %.2f s, %.3g lookups/s\n",
               (long long)caps[k], (double)res.hit_tokens / (double)res.prompt_tokens,
               replay_s[k], (double)refs / replay_s[k]);
    }
    ReuseResult at_stream;
    reuse_simulate(&log, SCOPE_PREFIX, POL_LRU, STREAM_CAP, NULL, &at_stream);
    int64_t replay_at_stream = at_stream.hit_tokens;
    double c0 = cpu_seconds();
    int64_t *curve = reuse_lru_curve(&log);
    double curve_s = cpu_seconds() - c0;
    int equal = 1;
    for (int k = 0; k < N_CAPS; k++) {
        int64_t c = caps[k] < (int64_t)log.n_blocks ? caps[k] : (int64_t)log.n_blocks;
        if (curve[c] != replay_hits[k]) {
            printf("  MISMATCH at %lld blocks: curve %lld, replay %lld\n", (long long)caps[k],
                   (long long)curve[c], (long long)replay_hits[k]);
            equal = 0;
        }
    }
    free(curve);
    double sorted[N_CAPS];
    for (int k = 0; k < N_CAPS; k++)
        sorted[k] = replay_s[k];
    for (int i = 1; i < N_CAPS; i++) /* insertion sort: the median replay */
        for (int j = i; j > 0 && sorted[j] < sorted[j - 1]; j--) {
            double t = sorted[j];
            sorted[j] = sorted[j - 1];
            sorted[j - 1] = t;
        }
    double lookups = (double)refs / sorted[N_CAPS / 2];
    /* lru's state at the largest capacity (every distinct block): per entry its key map's
     * slots (2 to 4 of 16 bytes), its key, free-list entry, prev and next (24 bytes) in slot
     * arrays up to twice the entries: about 100 bytes */
    double cache_bytes = 100.0 * log.n_blocks;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss = (double)ru.ru_maxrss * 1024.0;
    double speedup = curve_s > 0 ? replays / curve_s : 0;
    int ok_speed = speedup >= 10.0, ok_lookups = lookups >= 5e6;
    printf("one-pass curve: %.2f s, 20 replays: %.2f s: %.1fx faster (target >= 10x) %s\n", curve_s,
           replays, speedup, ok_speed ? "ok" : "MISSED");
    printf("curve equal to the 20 replays: %s\n", equal ? "yes" : "NO (MISSED)");
    printf("lru lookups/s (median replay, one core): %.3g (target >= 5e6) %s\n", lookups,
           ok_lookups ? "ok" : "MISSED");
    printf("peak RSS %.0f MiB: the log in memory %.0f MiB, lru's cache state %.0f MiB\n",
           rss / 1048576.0, log_bytes / 1048576.0, cache_bytes / 1048576.0);
    reqlog_free(&log);
    if (fig[0] >= 0 && (int64_t)fig[0] != replay_at_stream)
        printf("streamed lru: %.0f cached tokens, the replay %lld (MISSED)\n", fig[0],
               (long long)replay_at_stream);
    return equal && ok_speed && ok_lookups && ok_stream_mem && ok_full_mem &&
                   (int64_t)fig[0] == replay_at_stream ? 0 : 1;
}
