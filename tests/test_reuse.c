/* The persisted-KV-cache simulator (sim/reuse, `kvsim reuse`, `kvsim synth-workload`):
 * hand-computed hit rates of every policy on small logs, the prefix and conversation scopes'
 * rules, Belady above every policy at every capacity, the generator's statistics against its
 * parameters, and one-line errors with exit status 2 for bad logs. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <cmocka.h>

#include "sim/cmd/reuse_cmd.h"
#include "sim/reuse/reqlog.h"
#include "sim/reuse/reuse.h"
#include "sim/reuse/workload.h"
#include "tests/support/scratch.h"

static char *dir;

static int setup(void **state)
{
    (void)state;
    dir = scratch_create();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    free(dir);
    return 0;
}

static void load_text(const char *name, const char *text, int block, ReqLog *log)
{
    const char *path = scratch_path(dir, name, 0);
    scratch_write(path, text);
    KvErr err;
    if (reqlog_load(path, REQLOG_AUTO, block, false, log, &err) < 0)
        fail_msg("%s", err.msg);
}

static int64_t hits(const ReqLog *log, ReuseScope scope, ReusePolicy pol, int64_t cap,
                    ReuseResult *res)
{
    uint32_t *nu = reuse_next_use(log, scope);
    ReuseResult local;
    if (!res)
        res = &local;
    reuse_simulate(log, scope, pol, cap, nu, res);
    free(nu);
    return res->hit_tokens;
}

/* One block of 4 tokens per request: A B A C B A D A, 2 blocks of room. By hand (docs/reuse.md
 * has the rules): lru hits at 2 and 7 only (C evicts B, B evicts A, A evicts C); fifo at 2, 4,
 * 7 (C evicts A, B stays); lfu at 2, 5, 7 (B and C, referenced once, go first); belady at 2,
 * 4, 7; s3fifo at 2, 4, 7 (each new block goes to the small queue, evicted with frequency <=
 * 1 before it reaches main); conv as lru (every request is a conversation of its own, whose
 * one block is dropped with it: A's hit at 2 makes it request 2's, C drops request 1's B, ...). */
static void test_single_block_policies_by_hand(void **state)
{
    (void)state;
    const char *seq = "ABACBADA";
    char text[2048] = "";
    for (int i = 0; seq[i]; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text),
                 "{\"timestamp\": %d, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [%d]}\n",
                 i, seq[i] - 'A');
    ReqLog log;
    load_text("single.jsonl", text, 4, &log);
    assert_int_equal(log.n, 8);
    assert_int_equal(log.n_blocks, 4);
    assert_int_equal(log.format, REQLOG_MOONCAKE);
    const int64_t want[N_POLICIES] = {[POL_LRU] = 2 * 4, [POL_FIFO] = 3 * 4, [POL_LFU] = 3 * 4,
                                      [POL_S3FIFO] = 3 * 4, [POL_BELADY] = 3 * 4,
                                      [POL_CONV] = 2 * 4};
    for (int p = 0; p < N_POLICIES; p++) {
        ReuseResult res;
        int64_t h = hits(&log, SCOPE_PREFIX, (ReusePolicy)p, 2, &res);
        if (h != want[p])
            fail_msg("%s: %lld cached tokens, expected %lld", reuse_policy_names[p], (long long)h,
                     (long long)want[p]);
        assert_int_equal(res.prompt_tokens, 32);
        assert_int_equal(res.inserted, 8 - want[p] / 4);
        assert_int_equal(res.evictions, res.inserted - 2);
        assert_int_equal(res.blocks_peak, 2);
        assert_int_equal(hits(&log, SCOPE_NONE, (ReusePolicy)p, 2, NULL), 0);
        /* room for everything: every repeat hits, whatever the policy */
        assert_int_equal(hits(&log, SCOPE_PREFIX, (ReusePolicy)p, 100, NULL), 4 * 4);
        assert_int_equal(hits(&log, SCOPE_PREFIX, (ReusePolicy)p, 0, NULL), 0);
        /* one block of device and one of host (lru), A B A only: B demotes A to the host, where
         * the second A finds it (4 tokens, from the host) and takes it back, demoting B */
        ReqLog aba = log;
        aba.n = 3;
        uint32_t *nu = reuse_next_use(&aba, SCOPE_PREFIX);
        reuse_simulate_host(&aba, SCOPE_PREFIX, (ReusePolicy)p, 1, 1, nu, &res);
        free(nu);
        assert_int_equal(res.hit_tokens, 4);
        assert_int_equal(res.host_hit_tokens, 4);
        assert_int_equal(res.host_blocks_end, 1);
        assert_int_equal(res.host_evictions, 0);
        assert_int_equal(res.blocks_end, 1);
    }
    reqlog_free(&log);
}

/* A hit is the run of leading blocks present, in tokens, at most the prompt. */
static void test_prefix_run(void **state)
{
    (void)state;
    ReqLog log;
    load_text("prefix.jsonl",
              "{\"timestamp\": 0, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [1, 2, 3]}\n"
              "{\"timestamp\": 1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1, 2, 9]}\n"
              "\n"
              "{\"timestamp\": 2, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [5, 2, 3]}\n"
              "{\"timestamp\": 2, \"input_length\": 14, \"output_length\": 1, \"hash_ids\": [1, 2, 3, 4]}\n"
              "{\"timestamp\": 3, \"input_length\": 2, \"output_length\": 1, \"hash_ids\": [1]}\n",
              4, &log);
    assert_int_equal(log.n, 5);
    for (int p = 0; p < N_POLICIES; p++) {
        ReuseResult res;
        /* 8 (1, 2) + 0 (5 is missing, so 2 and 3 do not count) + 12 (1, 2, 3) + 2 (1, cut) */
        assert_int_equal(hits(&log, SCOPE_PREFIX, (ReusePolicy)p, 1000, &res), 8 + 0 + 12 + 2);
        assert_int_equal(res.prompt_tokens, 12 + 10 + 12 + 14 + 2);
        assert_int_equal(res.blocks_end, 6); /* 1 2 3 9 5 4 */
        assert_int_equal(res.evictions, 0);
    }
    /* Three blocks of room, lru (most recent first; a request references its blocks last to
     * first): request 0 leaves 1 2 3; request 1 hits 1 2 (8 tokens), inserting 9 evicts 3:
     * 1 2 9; request 2 misses 5 (0), inserting 3 evicts 9, then 5 evicts 1: 5 2 3; request 3
     * misses 1 (0) and inserts 4 3 2 1 over everything: 1 2 3; request 4 hits 1 (2 tokens). */
    assert_int_equal(hits(&log, SCOPE_PREFIX, POL_LRU, 3, NULL), 8 + 0 + 0 + 2);
    reqlog_free(&log);
}

/* Two conversations interleaved, room for one context: only consecutive turns of the same
 * conversation hit (A's turns 3 -> 4), for every policy. */
static void test_conversation_one_room(void **state)
{
    (void)state;
    const char *text =
        "{\"chat_id\": 10, \"parent_chat_id\": -1, \"timestamp\": 0, \"input_length\": 30, \"output_length\": 10, \"type\": \"text\", \"turn\": 1, \"hash_ids\": []}\n"
        "{\"chat_id\": 11, \"parent_chat_id\": -1, \"timestamp\": 1, \"input_length\": 40, \"output_length\": 8, \"type\": \"text\", \"turn\": 1, \"hash_ids\": []}\n"
        "{\"chat_id\": 12, \"parent_chat_id\": 10, \"timestamp\": 2, \"input_length\": 50, \"output_length\": 6, \"type\": \"text\", \"turn\": 2, \"hash_ids\": []}\n"
        "{\"chat_id\": 13, \"parent_chat_id\": 11, \"timestamp\": 3, \"input_length\": 52, \"output_length\": 4, \"type\": \"text\", \"turn\": 2, \"hash_ids\": []}\n"
        "{\"chat_id\": 14, \"parent_chat_id\": 12, \"timestamp\": 4, \"input_length\": 58, \"output_length\": 2, \"type\": \"text\", \"turn\": 3, \"hash_ids\": []}\n"
        "{\"chat_id\": 15, \"parent_chat_id\": 14, \"timestamp\": 5, \"input_length\": 62, \"output_length\": 2, \"type\": \"text\", \"turn\": 4, \"hash_ids\": []}\n";
    ReqLog log;
    load_text("conv.jsonl", text, 4, &log);
    assert_int_equal(log.format, REQLOG_QWEN);
    assert_int_equal(log.parent[2], 0);
    assert_int_equal(log.parent[5], 4);
    for (int p = 0; p < N_POLICIES; p++) {
        ReuseResult res;
        /* 16 blocks = 64 tokens: every context fits alone (at most 64 tokens), no two do */
        assert_int_equal(hits(&log, SCOPE_CONVERSATION, (ReusePolicy)p, 16, &res), 60);
        assert_int_equal(res.turn_hit[4], 60);
        assert_int_equal(res.turn_prompt[4], 62);
        assert_int_equal(res.turn_hit[1] + res.turn_hit[2] + res.turn_hit[3], 0);
        assert_int_equal(res.blocks_end, 16);
        /* room for all: every later turn hits its parent's whole context */
        assert_int_equal(hits(&log, SCOPE_CONVERSATION, (ReusePolicy)p, 1000, &res),
                         40 + 48 + 56 + 60);
        assert_int_equal(res.blocks_end, 14 + 16); /* B's turn 2 (56 tokens) and A's turn 4 */
        assert_int_equal(hits(&log, SCOPE_NONE, (ReusePolicy)p, 1000, NULL), 0);
        /* the same device and a host with room for all: what the device evicts waits on the
         * host, so every later turn hits, A's turns 2 and 3 and B's turn 2 from the host */
        uint32_t *nu = reuse_next_use(&log, SCOPE_CONVERSATION);
        reuse_simulate_host(&log, SCOPE_CONVERSATION, (ReusePolicy)p, 16, 1000, nu, &res);
        free(nu);
        assert_int_equal(res.hit_tokens, 40 + 48 + 56 + 60);
        assert_int_equal(res.host_hit_tokens, 40 + 48 + 56);
        assert_int_equal(res.host_blocks_end, 14); /* B's turn 2, demoted by A's turn 3 */
        assert_int_equal(res.blocks_end, 16);
    }
    reqlog_free(&log);
}

/* Writes wp's workload to path; the test fails on an error. */
static void write_workload(const WorkloadParams *wp, const char *path)
{
    KvErr err;
    if (workload_write(wp, path, NULL, &err) < 0)
        fail_msg("%s", err.msg);
}

/* Loads the log at path (block tokens, 0: the format's); the test fails on an error. */
static void load_log(const char *path, int block, ReqLog *log)
{
    KvErr err;
    if (reqlog_load(path, REQLOG_AUTO, block, false, log, &err) < 0)
        fail_msg("%s", err.msg);
}

static void small_workload(WorkloadParams *wp, long conversations)
{
    workload_defaults(wp);
    wp->seed = 11;
    wp->n_conversations = conversations;
}

/* Belady's next-use eviction holds at least as many cached tokens as every other policy, at
 * every capacity, on a chained synthetic log (chained ids keep its cache prefix-closed). */
static void test_belady_dominates(void **state)
{
    (void)state;
    WorkloadParams wp;
    small_workload(&wp, 300);
    wp.rate = 5.0;
    const char *path = scratch_path(dir, "w.jsonl", 0);
    write_workload(&wp, path);
    ReqLog log;
    load_log(path, 0, &log);
    assert_int_equal(log.block_tokens, 16);
    const int64_t caps[] = {1, 8, 64, 256, 1024, 4096, 16384, 1 << 20};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        int64_t best = hits(&log, SCOPE_PREFIX, POL_BELADY, caps[c], NULL);
        for (int p = 0; p < N_POLICIES; p++) {
            int64_t h = hits(&log, SCOPE_PREFIX, (ReusePolicy)p, caps[c], NULL);
            if (h > best)
                fail_msg("capacity %lld: %s caches %lld tokens, belady %lld", (long long)caps[c],
                         reuse_policy_names[p], (long long)h, (long long)best);
            assert_int_equal(hits(&log, SCOPE_NONE, (ReusePolicy)p, caps[c], NULL), 0);
        }
        if (caps[c] >= 64)
            assert_true(best > 0);
    }
    /* Room for everything: every policy caches the same, the log's whole reuse. */
    int64_t all = hits(&log, SCOPE_PREFIX, POL_LRU, 1 << 24, NULL);
    for (int p = 0; p < N_POLICIES; p++)
        assert_int_equal(hits(&log, SCOPE_PREFIX, (ReusePolicy)p, 1 << 24, NULL), all);
    reqlog_free(&log);
}

/* The one-pass LRU curve gives, at every capacity, the cached tokens of an LRU replay: on a
 * synthetic log (small blocks, so that the tree of reference times is renumbered many times)
 * and on a log of repeated and out-of-order ids. */
static void test_lru_curve(void **state)
{
    (void)state;
    WorkloadParams wp;
    small_workload(&wp, 200);
    wp.block_tokens = 8;
    wp.system_mean = 100;
    wp.turns_mean = 8; /* about 4.5 references per distinct block */
    const char *path = scratch_path(dir, "curve.jsonl", 0);
    write_workload(&wp, path);
    ReqLog log;
    load_log(path, 8, &log);
    int64_t *curve = reuse_lru_curve(&log);
    int checked = 0;
    for (int64_t c = 0; c <= log.n_blocks; c = c < 16 ? c + 1 : c * 5 / 4) {
        int64_t h = hits(&log, SCOPE_PREFIX, POL_LRU, c, NULL);
        if (curve[c] != h)
            fail_msg("capacity %lld: curve %lld, replay %lld", (long long)c, (long long)curve[c],
                     (long long)h);
        checked++;
    }
    assert_int_equal(curve[log.n_blocks], hits(&log, SCOPE_PREFIX, POL_LRU, log.n_blocks, NULL));
    assert_int_equal(curve[log.n_blocks], hits(&log, SCOPE_PREFIX, POL_LRU, 1 << 30, NULL));
    assert_true(checked > 30);
    assert_true(curve[log.n_blocks] > curve[log.n_blocks / 8]);
    free(curve);
    reqlog_free(&log);

    load_text("curve2.jsonl",
              "{\"timestamp\": 0, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [1, 2, 3]}\n"
              "{\"timestamp\": 1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1, 2, 9]}\n"
              "{\"timestamp\": 2, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [5, 2, 3]}\n"
              "{\"timestamp\": 2, \"input_length\": 15, \"output_length\": 1, \"hash_ids\": [1, 1, 2, 1]}\n"
              "{\"timestamp\": 3, \"input_length\": 14, \"output_length\": 1, \"hash_ids\": [1, 2, 3, 4]}\n"
              "{\"timestamp\": 3, \"input_length\": 9, \"output_length\": 1, \"hash_ids\": [3, 2, 1]}\n"
              "{\"timestamp\": 4, \"input_length\": 2, \"output_length\": 1, \"hash_ids\": [1]}\n",
              4, &log);
    curve = reuse_lru_curve(&log);
    for (int64_t c = 0; c <= log.n_blocks; c++)
        assert_int_equal(curve[c], hits(&log, SCOPE_PREFIX, POL_LRU, c, NULL));
    free(curve);
    reqlog_free(&log);
}

/* The generator's statistics against its parameters, its chained ids, its determinism. */
static void test_generator_statistics(void **state)
{
    (void)state;
    WorkloadParams wp;
    small_workload(&wp, 20000);
    wp.turns_mean = 3.0;
    wp.message_mean = 200.0;
    wp.answer_mean = 300.0;
    wp.system_mean = 500.0;
    wp.rate = 2.0;
    wp.think_mean = 20.0;
    const char *path = scratch_path(dir, "stats.jsonl", 0);
    KvErr err;
    long n_req = 0;
    if (workload_write(&wp, path, &n_req, &err) < 0)
        fail_msg("%s", err.msg);
    ReqReader *r = reqlog_open(path, REQLOG_AUTO, &err);
    assert_non_null(r);
    double *ts = kv_calloc((size_t)n_req, sizeof *ts);
    int64_t *ctx = kv_calloc((size_t)n_req, sizeof *ctx);  /* input + output of each request */
    int64_t *inp = kv_calloc((size_t)n_req, sizeof *inp);
    int64_t **ids = kv_calloc((size_t)n_req, sizeof *ids);
    double roots = 0, last_root = 0, out_sum = 0, msg_sum = 0, think_sum = 0, later = 0;
    ReqRecord rec;
    long n = 0;
    int rc;
    while ((rc = reqlog_next(r, &rec, &err)) == 1) {
        assert_int_equal(rec.chat_id, n);
        assert_string_equal(rec.type, "text");
        assert_int_equal(rec.n_hash, (rec.input_length + 15) / 16);
        ts[n] = rec.timestamp;
        ctx[n] = rec.input_length + rec.output_length;
        inp[n] = rec.input_length;
        ids[n] = kv_malloc((size_t)(rec.n_hash ? rec.n_hash : 1) * sizeof **ids);
        memcpy(ids[n], rec.hash_ids, (size_t)rec.n_hash * sizeof **ids);
        out_sum += (double)rec.output_length;
        if (rec.parent_chat_id < 0) {
            assert_int_equal(rec.turn, 1);
            roots++;
            last_root = rec.timestamp;
        } else {
            int64_t p = rec.parent_chat_id;
            assert_true(p < n);
            /* the prompt is the conversation so far plus a message */
            assert_true(rec.input_length > ctx[p]);
            msg_sum += (double)(rec.input_length - ctx[p]);
            think_sum += rec.timestamp - ts[p];
            later++;
            /* chained ids: the parent's full blocks lead this prompt with the same ids */
            for (int64_t b = 0; b < inp[p] / 16; b++)
                assert_int_equal(ids[n][b], ids[p][b]);
            /* the parent's cut block, if any, is not reused */
            if (inp[p] % 16)
                assert_true(ids[n][inp[p] / 16] != ids[p][inp[p] / 16]);
        }
        n++;
    }
    assert_int_equal(rc, 0);
    reqlog_close(r);
    assert_int_equal(n, n_req);
    assert_int_equal((long)roots, 20000);
    double turns = n / roots, out_mean = out_sum / n, msg_mean = msg_sum / later,
           think = think_sum / later, gap = last_root / roots;
    if (fabs(turns / 3.0 - 1) > 0.03 || fabs(out_mean / 300.0 - 1) > 0.03 ||
        fabs(msg_mean / 200.0 - 1) > 0.03 || fabs(think / 20.0 - 1) > 0.03 ||
        fabs(gap / 0.5 - 1) > 0.03)
        fail_msg("turns %.3f (3), answer %.1f (300), message %.1f (200), think %.2f s (20), "
                 "arrival gap %.4f s (0.5)", turns, out_mean, msg_mean, think, gap);
    for (long i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
    free(ts);
    free(ctx);
    free(inp);

    /* the same seed gives the same bytes; another seed other bytes */
    small_workload(&wp, 50);
    const char *a = scratch_path(dir, "a.jsonl", 1), *b = scratch_path(dir, "b.jsonl", 2),
               *c = scratch_path(dir, "c.jsonl", 3);
    assert_int_equal(workload_write(&wp, a, NULL, &err), 0);
    assert_int_equal(workload_write(&wp, b, NULL, &err), 0);
    wp.seed = 12;
    assert_int_equal(workload_write(&wp, c, NULL, &err), 0);
    char *ta = scratch_read(a), *tb = scratch_read(b), *tc = scratch_read(c);
    assert_true(strlen(ta) > 0);
    assert_string_equal(ta, tb);
    assert_true(strcmp(ta, tc) != 0);
    free(ta);
    free(tb);
    free(tc);
}


static void bad_log(const char *name, const char *text, const char *want1, const char *want2)
{
    char path[4096], args[8400];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    scratch_write(path, text);
    snprintf(args, sizeof args, "reuse '%s' --out '%s/out_bad' --quiet", path, dir);
    run_kvsim_fails(args, want1, want2, NULL);
    assert_int_equal(scratch_count(dir) >= 0, 1);
}

#define MC(ts, in) "{\"timestamp\": " #ts ", \"input_length\": " #in ", \"output_length\": 1, \"hash_ids\": [1]}\n"

static void test_bad_input(void **state)
{
    (void)state;
    bad_log("json.jsonl", MC(0, 4) "{\"timestamp\": 1, \"input_length\": 4,\n", "json.jsonl:2:",
            "not valid JSON");
    bad_log("trail.jsonl", MC(0, 4) MC(1, 4) "{\"timestamp\": 2} x\n", "trail.jsonl:3:",
            "not valid JSON");
    bad_log("missing.jsonl", MC(0, 4) "{\"timestamp\": 1, \"input_length\": 4, \"output_length\": 1}\n",
            "missing.jsonl:2:", "missing field 'hash_ids'");
    bad_log("back.jsonl", MC(5, 4) MC(4, 4), "back.jsonl:2:", "before the previous");
    bad_log("neg.jsonl", MC(0, 4) MC(1, -3), "neg.jsonl:2:", "input_length: expected an integer >= 0");
    bad_log("frac.jsonl", MC(0, 4.5), "frac.jsonl:1:", "input_length");
    bad_log("ids.jsonl", "{\"timestamp\": 0, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [1, \"x\"]}\n",
            "ids.jsonl:1:", "hash_ids[1]");
    bad_log("array.jsonl", "[1, 2]\n", "array.jsonl:1:", "expected a JSON object");
    bad_log("dup.jsonl", "{\"timestamp\": 0, \"timestamp\": 1, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": []}\n",
            "dup.jsonl:1:", "appears twice");
    bad_log("qwen.jsonl",
            "{\"chat_id\": 1, \"parent_chat_id\": -1, \"timestamp\": 0, \"input_length\": 4, \"output_length\": 1, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [1]}\n"
            "{\"chat_id\": 2, \"timestamp\": 0, \"input_length\": 4, \"output_length\": 1, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [1]}\n",
            "qwen.jsonl:2:", "missing field 'parent_chat_id'");
    bad_log("utf8.jsonl", MC(0, 4) "{\"type\": \"\xff\"}\n", "utf8.jsonl:2:", "UTF-8");
    char args[8400];
    snprintf(args, sizeof args, "reuse '%s/missing.jsonl' --capacity 1GiB,lots --out '%s/o'", dir, dir);
    run_kvsim_fails(args, "--capacity", "lots", NULL);
    snprintf(args, sizeof args, "reuse '%s/missing.jsonl' --host-capacity 1GiB,2GiB --out '%s/o'", dir, dir);
    run_kvsim_fails(args, "--host-capacity", "expected one size", NULL);
    snprintf(args, sizeof args, "reuse '%s/missing.jsonl' --policies lru,mru --out '%s/o'", dir, dir);
    run_kvsim_fails(args, "--policies", "mru", NULL);
    snprintf(args, sizeof args, "reuse '%s/nothing.jsonl' --out '%s/o'", dir, dir);
    run_kvsim_fails(args, "nothing.jsonl", NULL);
    run_kvsim_fails("synth-workload", "--out", NULL);
}

/* End to end: both commands, a gzip log read like the plain one, the CSVs' rows and their
 * determinism, KV bytes from a config.json. */
static void test_cli(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("synth-workload --out '%s/cli.jsonl' --conversations 100 --seed 3",
                              dir);
    kvsim_run_free(&r);
    /* the same log gzip-compressed */
    char *plain = scratch_read(scratch_path(dir, "cli.jsonl", 0));
    gzFile gz = gzopen(scratch_path(dir, "cli.jsonl.gz", 0), "wb");
    assert_non_null(gz);
    assert_int_equal(gzwrite(gz, plain, (unsigned)strlen(plain)), (int)strlen(plain));
    assert_int_equal(gzclose(gz), Z_OK);
    free(plain);
    r = run_kvsim_ok("reuse '%s/cli.jsonl' --out '%s/r1' --capacity 16MiB,256MiB --quiet "
                     "--threads 1", dir, dir);
    kvsim_run_free(&r);
    /* the gzip log, on two threads: the same files */
    r = run_kvsim_ok("reuse '%s/cli.jsonl.gz' --out '%s/r2' --capacity 16MiB,256MiB --quiet "
                     "--threads 2", dir, dir);
    kvsim_run_free(&r);
    char *c1 = scratch_read(scratch_path(dir, "r1/reuse.csv", 0));
    char *c2 = scratch_read(scratch_path(dir, "r2/reuse.csv", 1));
    char *t1 = scratch_read(scratch_path(dir, "r1/reuse_turns.csv", 2));
    char *t2 = scratch_read(scratch_path(dir, "r2/reuse_turns.csv", 3));
    assert_string_equal(c1, c2);
    assert_string_equal(t1, t2);
    /* none: one row per capacity; prefix and conversation: 6 policies x 2 capacities */
    assert_int_equal(count_lines(c1), 1 + 2 + 2 * 6 * 2);
    assert_true(strstr(c1, "scope,policy,capacity_bytes,capacity_blocks,") == c1);
    assert_non_null(strstr(c1, ",bytes_peak,host_capacity_bytes,host_cached_tokens,host_bytes_end,"
                               "host_bytes_peak,compress_ratio,prefill_flops,prefill_flops_saved,"
                               "ttft_mean_s,ttft_p50_s,ttft_p95_s,ttft_p99_s,bytes_device_to_host,"
                               "bytes_host_to_device,host_evictions,invalidated\n"));
    /* 16 MiB of 56 KiB tokens (the default geometry) in 16-token blocks: 18 blocks */
    assert_non_null(strstr(c1, "\nprefix,belady,16777216,18,"));
    assert_true(strstr(t1, "scope,policy,capacity_bytes,compress_ratio,turn,") == t1);
    free(c1);
    free(c2);
    free(t1);
    free(t2);
    /* KV geometry from config.json: the default model's 2 layers x 2 KV heads x 32 dims x 2 x
     * 2 bytes = 512 bytes per token, 8 KiB per block: 1 MiB is 128 blocks */
    const char *src = getenv("KVSIM_SOURCE_DIR");
    r = run_kvsim_ok("reuse '%s/cli.jsonl' --out '%s/r3' --capacity 1MiB --scopes prefix "
                     "--policies lru --model '%s/models/tiny-retrieval' --quiet", dir, dir,
                     src ? src : ".");
    kvsim_run_free(&r);
    char *c3 = scratch_read(scratch_path(dir, "r3/reuse.csv", 0));
    assert_int_equal(count_lines(c3), 2);
    assert_non_null(strstr(c3, "\nprefix,lru,1048576,128,"));
    free(c3);
    /* radix is another name for the prefix scope: the same rows */
    r = run_kvsim_ok("reuse '%s/cli.jsonl' --out '%s/r5' --capacity 1MiB --scopes radix "
                     "--policies lru --model '%s/models/tiny-retrieval' --quiet", dir, dir,
                     src ? src : ".");
    kvsim_run_free(&r);
    char *c5 = scratch_read(scratch_path(dir, "r3/reuse.csv", 0));
    char *c6 = scratch_read(scratch_path(dir, "r5/reuse.csv", 1));
    assert_string_equal(c5, c6);
    free(c5);
    free(c6);
    /* --lru-curve: its row at 64 blocks (a point of the grid) is the replay's at 64 blocks */
    r = run_kvsim_ok("reuse '%s/cli.jsonl' --out '%s/r4' --capacity 58720256 --scopes prefix "
                     "--policies lru --lru-curve --quiet", dir, dir);
    kvsim_run_free(&r);
    char *c4 = scratch_read(scratch_path(dir, "r4/reuse.csv", 0));
    char *curve = scratch_read(scratch_path(dir, "r4/lru_curve.csv", 1));
    long long replay = -1, from_curve = -1;
    const char *row = strstr(c4, "\nprefix,lru,58720256,64,");
    assert_non_null(row);
    assert_int_equal(sscanf(row, "\nprefix,lru,58720256,64,%*d,%*d,%lld", &replay), 1);
    assert_true(strstr(curve, "capacity_blocks,capacity_bytes,cached_tokens,token_hit_rate\n") == curve);
    row = strstr(curve, "\n64,58720256,");
    assert_non_null(row);
    assert_int_equal(sscanf(row, "\n64,58720256,%lld", &from_curve), 1);
    assert_true(replay > 0);
    assert_int_equal(replay, from_curve);
    free(c4);
    free(curve);
}

/* The reader's fast path (flat objects of plain ASCII) and its general path (escapes, nesting,
 * long ids, literals) read the same values; a NUL inside a line is refused either way. */
static void test_reader_paths(void **state)
{
    (void)state;
    ReqLog log;
    load_text("paths.jsonl",
              "{\"chat_id\": 1, \"parent_chat_id\": -1, \"timestamp\": 0.5, \"input_length\": 40, \"output_length\": 3, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [7, 8, 9]}\n"
              "  {\"hash_ids\":[7,8,10],\"turn\":2,\"type\":\"te\\u0078t\",\"chat_id\":2,\"parent_chat_id\":1,\"timestamp\":1.5e0,\"input_length\":44,\"output_length\":1}\t\r\n"
              "{\"chat_id\": 3, \"parent_chat_id\": 2, \"timestamp\": 2, \"input_length\": 48, \"output_length\": 3, \"type\": \"search\", \"turn\": 3, \"hash_ids\": [7, 8, 10, 9007199254740000], \"extra\": {\"a\": [true, null]}}\n"
              "{\"chat_id\": 4, \"parent_chat_id\": 3, \"timestamp\": 2.0, \"input_length\": 4.8e1, \"output_length\": 0, \"type\": \"file\", \"turn\": 4, \"hash_ids\": [7, 8, 10, 9007199254740000, 11]}\n",
              16, &log);
    assert_int_equal(log.n, 4);
    assert_int_equal(log.format, REQLOG_QWEN);
    assert_int_equal(log.n_blocks, 6);
    const int64_t in[] = {40, 44, 48, 48};
    const int32_t parent[] = {-1, 0, 1, 2}, turn[] = {1, 2, 3, 4};
    const double ts[] = {0.5, 1.5, 2, 2};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(log.input[i], in[i]);
        assert_int_equal(log.parent[i], parent[i]);
        assert_int_equal(log.turn[i], turn[i]);
        assert_true(log.timestamp[i] == ts[i]);
    }
    assert_int_equal(log.off[4] - log.off[3], 5);
    /* request 2's long id and request 3's are the same block */
    assert_int_equal(log.ids[log.off[2] + 3], log.ids[log.off[3] + 3]);
    reqlog_free(&log);

    /* An id first too large for the array goes to the map; once the array has grown past it,
     * it is still found there: 3000000 is one block in requests 0 and 3. */
    size_t cap = 16u << 20, len = 0;
    char *text = kv_malloc(cap);
    len += (size_t)snprintf(text + len, cap - len, "{\"timestamp\": 0, \"input_length\": 16, \"output_length\": 1, \"hash_ids\": [3000000]}\n"
                            "{\"timestamp\": 1, \"input_length\": 12800000, \"output_length\": 1, \"hash_ids\": [0");
    for (int i = 1; i < 800000; i++)
        len += (size_t)snprintf(text + len, cap - len, ", %d", i);
    snprintf(text + len, cap - len, "]}\n{\"timestamp\": 2, \"input_length\": 16, \"output_length\": 1, \"hash_ids\": [3500000]}\n"
             "{\"timestamp\": 3, \"input_length\": 16, \"output_length\": 1, \"hash_ids\": [3000000]}\n");
    load_text("grow.jsonl", text, 16, &log);
    free(text);
    assert_int_equal(log.n_blocks, 800002);
    assert_int_equal(log.ids[log.off[3]], log.ids[log.off[0]]);
    assert_int_equal(log.ids[log.off[2]], 800001);
    assert_int_equal(hits(&log, SCOPE_PREFIX, POL_LRU, 1 << 21, NULL), 16);
    reqlog_free(&log);

    const char *path = scratch_path(dir, "nul.jsonl", 0);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    static const char line[] = "{\"timestamp\": 0, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [1]}\0 \n";
    assert_int_equal(fwrite(line, 1, sizeof line - 1, fp), sizeof line - 1);
    assert_int_equal(fclose(fp), 0);
    KvErr err;
    assert_int_equal(reqlog_load(path, REQLOG_AUTO, 0, false, &log, &err), -1);
    assert_non_null(strstr(err.msg, "nul.jsonl:1:"));
    assert_non_null(strstr(err.msg, "NUL"));
}

static void test_byte_sizes(void **state)
{
    (void)state;
    int64_t v[8];
    KvErr err;
    assert_int_equal(parse_byte_sizes("capacity", "512MiB,4GiB,1e9,2KB,7", v, 8, &err), 5);
    assert_int_equal(v[0], 512LL << 20);
    assert_int_equal(v[1], 4LL << 30);
    assert_int_equal(v[2], 1000000000LL);
    assert_int_equal(v[3], 2000);
    assert_int_equal(v[4], 7);
    assert_int_equal(parse_byte_sizes("capacity", "1GiB,", v, 8, &err), -1);
    assert_int_equal(parse_byte_sizes("capacity", "-1", v, 8, &err), -1);
    assert_int_equal(parse_byte_sizes("capacity", "1XB", v, 8, &err), -1);
}

static void test_mooncake_units(void **state)
{
    (void)state;
    ReqLog log;
    load_text("mc.jsonl",
              "{\"timestamp\": 0, \"input_length\": 6755, \"output_length\": 500, \"hash_ids\": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]}\n"
              "{\"timestamp\": 3052, \"input_length\": 7234, \"output_length\": 794, \"hash_ids\": [0, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]}\n",
              0, &log);
    assert_int_equal(log.block_tokens, 512);
    assert_true(fabs(log.timestamp[1] - 3.052) < 1e-12);
    assert_int_equal(log.parent[1], -1);
    assert_int_equal(log.turn[1], 0);
    /* block 0 is shared: 512 tokens of the second prompt */
    for (int p = 0; p < N_POLICIES; p++)
        assert_int_equal(hits(&log, SCOPE_PREFIX, (ReusePolicy)p, 100, NULL), 512);
    reqlog_free(&log);
}


/* cmocka 1.1 has no assert_double_equal */
#define assert_near(a, b, eps) assert_true(fabs((double)(a) - (double)(b)) <= (eps))

#define QW(chat, parent, ts, in, out, turn, model, ids)                                           \
    "{\"chat_id\": " #chat ", \"parent_chat_id\": " #parent ", \"timestamp\": " #ts              \
    ", \"input_length\": " #in ", \"output_length\": " #out ", \"type\": \"text\", \"turn\": "  \
    #turn ", \"model\": " #model ", \"hash_ids\": [" ids "]}\n"

/* Three requests, blocks of 4 tokens: A's turn 1 (8 tokens in, 4 out: a context of 3 blocks),
 * B's turn 1 (4 in, 4 out: 2 blocks), A's turn 2 (16 in) at t = 1, after the others. TTFT by
 * hand: one prefill at a time in order of arrival. */
static const char ttft_log[] = QW(0, -1, 0, 8, 4, 1, 0, "") QW(1, -1, 0.05, 4, 4, 1, 0, "")
    QW(2, 0, 1, 16, 4, 2, 0, "");

static void test_ttft_by_hand(void **state)
{
    (void)state;
    ReqLog log;
    load_text("ttft.jsonl", ttft_log, 4, &log);
    assert_int_equal(log.n_conv, 2);
    assert_int_equal(log.conv[2], 0);
    /* 100 tokens/s, room for all: A1 0.08 s (0 -> 0.08); B1 waits for it, 0.04 s (0.08 ->
     * 0.12): TTFT 0.07; A2 finds A1's 12 tokens, prefills 4: 0.04 s from t = 1 */
    ReuseCost cost = {.prefill_tps = 100, .params = 1, .attn_dim = 1, .block_bytes = 1000};
    ReuseOptions opt = {.scope = SCOPE_CONVERSATION, .policy = POL_LRU, .capacity_blocks = 100,
                        .cost = &cost};
    ReuseResult res;
    reuse_run(&log, &opt, &res);
    assert_int_equal(res.hit_tokens, 12);
    assert_near(res.ttft_q[0], 0.04, 1e-12);
    assert_near(res.ttft_q[50], 0.07, 1e-12); /* nearest rank: the 2nd of 3 */
    assert_near(res.ttft_q[95], 0.08, 1e-12);
    assert_near(res.ttft_q[99], 0.08, 1e-12);
    assert_near(res.ttft_mean, (0.08 + 0.07 + 0.04) / 3, 1e-12);
    /* FLOPs (params 1, attn_dim 1): 2n + 4 (n c + n (n + 1) / 2): A1 16 + 144, B1 8 + 40, A2
     * 8 + 4 (48 + 10) = 240 where 16 tokens from nothing are 32 + 544 = 576 */
    assert_near(res.flops, 160 + 48 + 240, 1e-9);
    assert_near(res.flops_saved, 576 - 240, 1e-9);
    /* at 1 FLOP/s the seconds are the FLOPs: A1 0 -> 160, B1 160 -> 208 (TTFT 207.95), A2
     * 208 -> 448 (447) */
    cost = (ReuseCost){.flops_per_s = 1, .params = 1, .attn_dim = 1, .block_bytes = 1000};
    reuse_run(&log, &opt, &res);
    assert_near(res.ttft_q[0], 160, 1e-9);
    assert_near(res.ttft_q[50], 207.95, 1e-9);
    assert_near(res.ttft_q[100], 447, 1e-9);
    /* 3 blocks of device, a host behind it, 2000 bytes/s (a block in 0.5 s): B1 demotes A1's 3
     * blocks, A2 loads them back (1.5 s, then its 0.04 s prefill) and its own 5 blocks go to
     * the host directly */
    cost = (ReuseCost){.prefill_tps = 100, .params = 1, .attn_dim = 1, .block_bytes = 1000,
                       .host_bw = 2000};
    opt.capacity_blocks = 3;
    opt.host_blocks = 100;
    reuse_run(&log, &opt, &res);
    assert_int_equal(res.hit_tokens, 12);
    assert_int_equal(res.host_hit_tokens, 12);
    assert_int_equal(res.blocks_to_host, 3 + 5);
    assert_int_equal(res.blocks_to_device, 3);
    assert_near(res.ttft_q[100], 1.54, 1e-12);
    /* 4 blocks without a host: B1 evicts A1 (3 + 2 > 4), A2 finds nothing; compressed to half
     * (A1 in 2 blocks, B1 in 1), both stay, A2 finds A1's 12 tokens and attends over 6 keys:
     * 8 + 4 (4 x 6 + 10) = 144 FLOPs */
    opt.capacity_blocks = 4;
    opt.host_blocks = 0;
    reuse_run(&log, &opt, &res);
    assert_int_equal(res.hit_tokens, 0);
    assert_int_equal(res.evictions, 1);
    opt.compress = 0.5;
    reuse_run(&log, &opt, &res);
    assert_int_equal(res.hit_tokens, 12);
    assert_int_equal(res.evictions, 0);
    assert_int_equal(res.blocks_end, 1 + 3); /* B1's block and A2's 5 at half: 3 */
    assert_near(res.flops, 160 + 48 + 144, 1e-9);
    reqlog_free(&log);
}

/* The local assistant design: the conversation scope with room for one conversation's context
 * (every context here 16 blocks: 64 tokens). Conversation A's turns 1, 2, then B's turn 1, A's
 * turn 3 (B's context took the room), A's turn 4 on model 1 (A's turn 3 was model 0's: its
 * cache is invalid), A's turn 5 on model 1: hits only at A2 and A5, the consecutive turns of
 * one conversation and one model. */
static void test_local_assistant(void **state)
{
    (void)state;
    const char *text = QW(10, -1, 0, 40, 24, 1, 0, "") QW(11, 10, 1, 50, 14, 2, 0, "")
        QW(20, -1, 2, 60, 4, 1, 0, "") QW(12, 11, 3, 60, 4, 3, 0, "")
        QW(13, 12, 4, 62, 2, 4, 1, "") QW(14, 13, 5, 63, 1, 5, 1, "");
    ReqLog log;
    load_text("local.jsonl", text, 4, &log);
    assert_int_equal(log.model[4], 1);
    assert_int_equal(log.n_conv, 2);
    for (int p = 0; p < N_POLICIES; p++) {
        ReuseResult res;
        hits(&log, SCOPE_CONVERSATION, (ReusePolicy)p, 16, &res);
        assert_int_equal(res.turn_hit[2], 50);          /* A2: A1's 64 tokens, its 50 */
        assert_int_equal(res.turn_hit[3], 0);           /* A3: B took the room */
        assert_int_equal(res.turn_hit[4], 0);           /* A4: another model */
        assert_int_equal(res.turn_hit[5], 63);          /* A5: A4's 64 tokens, its 63 */
        assert_int_equal(res.hit_tokens, 50 + 63);
        assert_int_equal(res.invalidated, 1);
        /* room for all: B no longer evicts; the model change still invalidates */
        hits(&log, SCOPE_CONVERSATION, (ReusePolicy)p, 1000, &res);
        assert_int_equal(res.hit_tokens, 50 + 60 + 63);
        assert_int_equal(res.invalidated, 1);
    }
    reqlog_free(&log);
}

/* conv under the prefix scope, 4 blocks of room: X1 [0 1], Y1 [2], X2 [0 1 3] (hits 0 1), Z1
 * [4 5], X3 [0 1]. At Z1, conv drops Y (block 2), then the whole of X (0 1 3) where lru drops
 * 2 and 3 only; so X3 misses under conv (8 tokens in all) and hits under lru (16). */
static void test_conv_policy_by_hand(void **state)
{
    (void)state;
    const char *text = QW(1, -1, 0, 8, 1, 1, 0, "10, 11") QW(2, -1, 1, 4, 1, 1, 0, "12")
        QW(3, 1, 2, 12, 1, 2, 0, "10, 11, 13") QW(4, -1, 3, 8, 1, 1, 0, "14, 15")
        QW(5, 3, 4, 8, 1, 3, 0, "10, 11");
    ReqLog log;
    load_text("convpol.jsonl", text, 4, &log);
    ReuseResult res;
    assert_int_equal(hits(&log, SCOPE_PREFIX, POL_CONV, 4, &res), 8);
    assert_int_equal(res.evictions, 1 + 3); /* Y, then X (X3's two blocks fit beside Z's) */
    assert_int_equal(res.blocks_end, 2 + 2);
    assert_int_equal(hits(&log, SCOPE_PREFIX, POL_LRU, 4, &res), 16);
    assert_int_equal(res.evictions, 2);
    reqlog_free(&log);
}

/* synth-workload's models: a later turn moves with probability --switch-prob, to another
 * model, and then shares no hash id with its parent (another model's KV). */
static void test_generator_models(void **state)
{
    (void)state;
    WorkloadParams wp;
    small_workload(&wp, 4000);
    wp.n_models = 3;
    wp.switch_prob = 0.25;
    const char *path = scratch_path(dir, "models.jsonl", 0);
    KvErr err;
    write_workload(&wp, path);
    ReqLog log;
    load_log(path, 0, &log);
    long later = 0, switched = 0, shared_after_switch = 0, used[3] = {0};
    for (long r = 0; r < log.n; r++) {
        assert_true(log.model[r] >= 0 && log.model[r] < 3);
        used[log.model[r]]++;
        int32_t p = log.parent[r];
        if (p < 0)
            continue;
        later++;
        if (log.model[p] == log.model[r])
            continue;
        switched++;
        for (int64_t j = log.off[r]; j < log.off[r + 1]; j++)
            for (int64_t k = log.off[p]; k < log.off[p + 1]; k++)
                shared_after_switch += log.ids[j] == log.ids[k];
    }
    assert_true(later > 5000);
    double share = (double)switched / later;
    if (fabs(share - 0.25) > 0.03 * 0.25 * 4) /* 3% of the mean's own scale: +-0.03 */
        fail_msg("switch share %g, expected 0.25", share);
    assert_int_equal(shared_after_switch, 0);
    for (int m = 0; m < 3; m++)
        assert_true(used[m] > log.n / 5);
    /* the conversation scope finds nothing across a switch: every one is invalidated or gone */
    ReuseResult res;
    hits(&log, SCOPE_CONVERSATION, POL_LRU, 1 << 30, &res);
    assert_int_equal(res.invalidated, switched);
    reqlog_free(&log);
    /* one model: no "model" field, the bytes of before */
    small_workload(&wp, 50);
    path = scratch_path(dir, "one_model.jsonl", 1);
    write_workload(&wp, path);
    char *t = scratch_read(path);
    assert_null(strstr(t, "\"model\""));
    free(t);
    wp.switch_prob = 0.5;
    assert_int_equal(workload_write(&wp, path, NULL, &err), -1);
    assert_non_null(strstr(err.msg, "--switch-prob"));
}

/* A config file: its keys as options, the command line over them; its errors name the line. */
static void test_config_file(void **state)
{
    (void)state;
    KvsimRun r = run_kvsim_ok("synth-workload --out '%s/cfg.jsonl' --conversations 30", dir);
    kvsim_run_free(&r);
    char ini[4096];
    snprintf(ini, sizeof ini, "%s/r.ini", dir);
    scratch_write(ini, "; a comment\n[reuse]\nscopes = prefix   ; inline\npolicies = lru,conv\n"
                       "capacity = 1GiB\nlru-curve = true\nquiet = true\n");
    r = run_kvsim_ok("reuse '%s' --workload '%s/cfg.jsonl' --out '%s/cfg' --policies lru", ini,
                     dir, dir);
    kvsim_run_free(&r);
    char *c = scratch_read(scratch_path(dir, "cfg/reuse.csv", 0));
    assert_int_equal(count_lines(c), 2); /* prefix x lru (the command line's) x 1GiB */
    assert_non_null(strstr(c, "\nprefix,lru,1073741824,"));
    free(c);
    char *curve = scratch_read(scratch_path(dir, "cfg/lru_curve.csv", 1));
    assert_true(count_lines(curve) > 2);
    free(curve);
    char *ttft = scratch_read(scratch_path(dir, "cfg/reuse_ttft.csv", 2));
    assert_int_equal(count_lines(ttft), 1 + REUSE_TTFT_Q);
    free(ttft);
    /* the shipped configs/reuse.ini runs as it is (its out, threads and capacities overridden) */
    const char *src = getenv("KVSIM_SOURCE_DIR");
    r = run_kvsim_ok("reuse '%s/configs/reuse.ini' --workload '%s/cfg.jsonl' --out '%s/shipped' "
                     "--capacity 64MiB,1GiB --threads 1 --quiet", src ? src : ".", dir, dir);
    kvsim_run_free(&r);
    c = scratch_read(scratch_path(dir, "shipped/reuse.csv", 0));
    /* none x 2, prefix x 6 policies x 2, conversation x 6 x 2 capacities x 2 ratios */
    assert_int_equal(count_lines(c), 1 + 2 + 12 + 24);
    assert_non_null(strstr(c, "\nconversation,conv,1073741824,"));
    free(c);
    char args[8400];
    scratch_write(ini, "[reuse]\nscopes = prefix\nsizes = 1GiB\n");
    snprintf(args, sizeof args, "reuse '%s' --workload '%s/cfg.jsonl' --out '%s/cfg'", ini, dir, dir);
    run_kvsim_fails(args, "r.ini:3:", "unknown key 'sizes'", NULL);
    scratch_write(ini, "[reuse]\nkv-bits = lots\n");
    run_kvsim_fails(args, "r.ini:2:", "--kv-bits", NULL);
    scratch_write(ini, "[run]\n");
    run_kvsim_fails(args, "r.ini:1:", "expected [reuse]", NULL);
    snprintf(args, sizeof args, "reuse '%s/cfg.jsonl' --workload '%s/cfg.jsonl' --out '%s/cfg'",
             dir, dir, dir);
    run_kvsim_fails(args, "expected the log once", NULL);
    snprintf(args, sizeof args, "reuse '%s/cfg.jsonl' --compress 0.5,2 --out '%s/cfg'", dir, dir);
    run_kvsim_fails(args, "--compress", "(0, 1]", NULL);
    bad_log("model.jsonl", QW(1, -1, 0, 4, 1, 1, 0, "1") QW(2, 1, 1, 4, 1, 2, -1, "1"),
            "model.jsonl:2:", "model: expected an integer >= 0");
}

/* lru streamed from the file gives the replay's numbers at every capacity (synthetic log; ids
 * repeated inside a request in the hand-written one). */
static void test_stream_lru(void **state)
{
    (void)state;
    WorkloadParams wp;
    small_workload(&wp, 300);
    wp.rate = 5.0;
    const char *path = scratch_path(dir, "stream.jsonl", 0);
    KvErr err;
    write_workload(&wp, path);
    ReqLog log;
    load_log(path, 0, &log);
    const int64_t caps[] = {0, 1, 7, 64, 300, 1000, 5000, 1 << 20};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        ReuseResult a, b;
        reuse_simulate(&log, SCOPE_PREFIX, POL_LRU, caps[c], NULL, &a);
        if (reuse_stream_lru(path, REQLOG_AUTO, 0, caps[c], &b, &err) < 0)
            fail_msg("%s", err.msg);
        assert_int_equal(a.requests, b.requests);
        assert_int_equal(a.prompt_tokens, b.prompt_tokens);
        assert_int_equal(a.hit_tokens, b.hit_tokens);
        assert_int_equal(a.evictions, b.evictions);
        assert_int_equal(a.inserted, b.inserted);
        assert_int_equal(a.blocks_end, b.blocks_end);
        assert_int_equal(a.blocks_peak, b.blocks_peak);
        assert_memory_equal(a.turn_hit, b.turn_hit, sizeof a.turn_hit);
    }
    reqlog_free(&log);
    const char *text = "{\"timestamp\": 0, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [5, 5, 6]}\n"
                       "{\"timestamp\": 1, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [5, 6, 7]}\n"
                       "{\"timestamp\": 2, \"input_length\": 9, \"output_length\": 1, \"hash_ids\": [7, 5, 6]}\n";
    load_text("dups.jsonl", text, 4, &log);
    for (int64_t cap = 0; cap <= 4; cap++) {
        ReuseResult a, b;
        reuse_simulate(&log, SCOPE_PREFIX, POL_LRU, cap, NULL, &a);
        if (reuse_stream_lru(scratch_path(dir, "dups.jsonl", 0), REQLOG_AUTO, 4, cap, &b, &err) < 0)
            fail_msg("%s", err.msg);
        assert_int_equal(a.hit_tokens, b.hit_tokens);
        assert_int_equal(a.evictions, b.evictions);
    }
    reqlog_free(&log);
    assert_int_equal(reuse_stream_lru(scratch_path(dir, "none.jsonl", 0), REQLOG_AUTO, 0, 4,
                                      &(ReuseResult){0}, &err), -1);
    assert_non_null(strstr(err.msg, "none.jsonl"));
}

/* Every scope x policy x capacity (with a host tier, compression and model switches) streamed
 * through reuse_stream equals reuse_run on the loaded log field for field, at 1 and 2 threads,
 * plain and gzip; the curve's binned points equal reuse_lru_curve's; repeated ids in a request
 * (belady's next uses through aliases) too. */
static void check_stream_equals_run(const char *path, int block, int threads)
{
    KvErr err;
    ReqLog log;
    if (reqlog_load(path, REQLOG_AUTO, block, false, &log, &err) < 0)
        fail_msg("%s", err.msg);
    ReuseCost cost = {.prefill_tps = 0, .flops_per_s = 1e12, .params = 1e8, .attn_dim = 4096,
                      .block_bytes = 1e5, .host_bw = 1e9};
    const int64_t caps[] = {0, 3, 40, 300, 5000};
    const int64_t hosts[] = {0, 50};
    const double ratios[] = {1.0, 0.25};
    enum { MAX_OPTS = N_SCOPES * N_POLICIES * 5 * 2 * 2 };
    ReuseOptions opts[MAX_OPTS];
    int n = 0;
    for (int s = 0; s < N_SCOPES; s++)
        for (int p = 0; p < N_POLICIES; p++)
            for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++)
                for (int h = 0; h < 2; h++)
                    for (int q = 0; q < (s == SCOPE_CONVERSATION ? 2 : 1); q++)
                        opts[n++] = (ReuseOptions){.scope = (ReuseScope)s, .policy = (ReusePolicy)p,
                                                   .capacity_blocks = caps[c], .host_blocks = hosts[h],
                                                   .compress = ratios[q], .cost = &cost};
    int64_t curve_caps[40], curve_out[40];
    int n_curve = 0;
    for (int64_t c = 0; c < 2000; c = c < 4 ? c + 1 : c * 3 / 2)
        curve_caps[n_curve++] = c;
    ReuseResult *streamed = calloc((size_t)n, sizeof *streamed);
    ReuseStreamInfo info;
    if (reuse_stream(path, REQLOG_AUTO, block, opts, n, threads, false, curve_caps, n_curve,
                     curve_out, streamed, &info, &err) < 0)
        fail_msg("%s", err.msg);
    assert_int_equal(info.requests, log.n);
    assert_int_equal(info.references, log.off[log.n]);
    assert_int_equal(info.n_blocks, log.n_blocks);
    assert_int_equal(info.block_tokens, log.block_tokens);
    uint32_t *nu[N_SCOPES] = {NULL, reuse_next_use(&log, SCOPE_PREFIX),
                              reuse_next_use(&log, SCOPE_CONVERSATION)};
    for (int i = 0; i < n; i++) {
        ReuseOptions o = opts[i];
        o.next_use = nu[o.scope];
        ReuseResult a;
        reuse_run(&log, &o, &a);
        if (memcmp(&a, &streamed[i], sizeof a) != 0)
            fail_msg("%s %s capacity %lld host %lld q %g: streamed differs (hits %lld vs %lld)",
                     reuse_scope_names[o.scope], reuse_policy_names[o.policy],
                     (long long)o.capacity_blocks, (long long)o.host_blocks, o.compress,
                     (long long)a.hit_tokens, (long long)streamed[i].hit_tokens);
    }
    int64_t *curve = reuse_lru_curve(&log);
    for (int i = 0; i < n_curve; i++)
        assert_int_equal(curve_out[i], curve[curve_caps[i] < log.n_blocks ? curve_caps[i] : log.n_blocks]);
    assert_int_equal(info.curve_total, curve[log.n_blocks]);
    free(curve);
    free(nu[SCOPE_PREFIX]);
    free(nu[SCOPE_CONVERSATION]);
    free(streamed);
    reqlog_free(&log);
}

static void test_stream_equals_run(void **state)
{
    (void)state;
    WorkloadParams wp;
    small_workload(&wp, 150);
    wp.rate = 5.0;
    wp.n_models = 3;
    wp.switch_prob = 0.25;
    const char *path = scratch_path(dir, "streamed.jsonl", 0);
    KvErr err;
    write_workload(&wp, path);
    check_stream_equals_run(path, 0, 1);
    check_stream_equals_run(path, 0, 2);
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "gzip -c '%s' > '%s.gz'", path, path);
    assert_int_equal(system(cmd), 0);
    char gz[8300];
    snprintf(gz, sizeof gz, "%s.gz", path);
    check_stream_equals_run(gz, 0, 2);
    /* a block twice in a request, a conversation branching (two children of one parent) */
    const char *text =
        "{\"chat_id\": 1, \"parent_chat_id\": -1, \"timestamp\": 0, \"input_length\": 12, \"output_length\": 4, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [5, 5, 6]}\n"
        "{\"chat_id\": 2, \"parent_chat_id\": 1, \"timestamp\": 1, \"input_length\": 20, \"output_length\": 4, \"type\": \"text\", \"turn\": 2, \"hash_ids\": [5, 6, 7, 5, 8]}\n"
        "{\"chat_id\": 3, \"parent_chat_id\": 1, \"timestamp\": 2, \"input_length\": 9, \"output_length\": 1, \"type\": \"text\", \"turn\": 2, \"hash_ids\": [7, 5, 6]}\n"
        "{\"chat_id\": 4, \"parent_chat_id\": 2, \"timestamp\": 3, \"input_length\": 24, \"output_length\": 1, \"type\": \"text\", \"turn\": 3, \"hash_ids\": [5, 6, 6, 8, 9, 5]}\n"
        "{\"chat_id\": 5, \"parent_chat_id\": -1, \"timestamp\": 3, \"input_length\": 8, \"output_length\": 1, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [8, 8]}\n";
    ReqLog log;
    load_text("branch.jsonl", text, 4, &log);
    reqlog_free(&log);
    check_stream_equals_run(scratch_path(dir, "branch.jsonl", 0), 4, 1);
    check_stream_equals_run(scratch_path(dir, "branch.jsonl", 0), 4, 2);
    assert_int_equal(reuse_stream(scratch_path(dir, "none.jsonl", 0), REQLOG_AUTO, 0, NULL, 0, 1,
                                  false, NULL, 0, NULL, NULL, &(ReuseStreamInfo){0}, &err),
                     -1);
    assert_non_null(strstr(err.msg, "none.jsonl"));
}

/* Memory follows the caches and the live conversations, not the log: after a long stream of
 * requests with ever new block ids and conversations, each cell holds at most its capacity's
 * entries in at most twice as many slots, s3fifo at most its ghost FIFO's ghosts, conv only
 * conversations that hold entries, lfu only reference counts that entries have; reuse_stream's table of parents awaiting their next turn
 * peaks at the same size for a log 4x as long (the same arrival rate and think times). */
static void test_stream_bounded(void **state)
{
    (void)state;
    enum { CAP = 64 };
    for (int s = SCOPE_PREFIX; s < N_SCOPES; s++)
        for (int p = 0; p < N_POLICIES; p++) {
            ReuseOptions o = {.scope = (ReuseScope)s, .policy = (ReusePolicy)p,
                              .capacity_blocks = CAP, .host_blocks = CAP / 2};
            ReuseCell *cell = reuse_cell_new(&o, 16);
            int64_t keys[8];
            uint32_t nu[8];
            for (long r = 0; r < 200000; r++) {
                for (int j = 0; j < 8; j++) {
                    /* a shared head, and ids never seen again */
                    keys[j] = j < 2 ? j : 1000 + r * 8 + j;
                    nu[j] = j < 2 ? (uint32_t)r + 1 : UINT32_MAX;
                }
                ReuseReq q = {.keys = keys, .n_keys = 8, .next_use = nu, .input = 128,
                              .output = 16, .turn = 1 + (int32_t)(r % 5), .timestamp = (double)r,
                              .self = r, .parent = r % 5 ? r - 1 : -1,
                              .parent_context = 128, .conv = r / 5,
                              .self_next_use = r % 5 < 4 ? (uint32_t)r + 1 : UINT32_MAX};
                reuse_cell_request(cell, &q);
            }
            ReuseCellStats st;
            reuse_cell_stats(cell, &st);
            assert_true(st.entries <= CAP + CAP / 2);
            assert_true(st.slots <= 2 * (CAP + CAP / 2));
            assert_true(st.ghosts <= CAP);
            assert_true(st.conversations <= CAP);
            assert_true(st.lfu_counts <= CAP + 1); /* the shared head's counts reach 200000 */
            ReuseResult res;
            reuse_cell_finish(cell, &res);
            assert_int_equal(res.requests, 200000);
            assert_true(res.hit_tokens > 0);
            reuse_cell_free(cell);
        }
    int64_t peak[2];
    for (int k = 0; k < 2; k++) {
        WorkloadParams wp;
        small_workload(&wp, k ? 2000 : 500);
        wp.rate = 2.0;
        const char *path = scratch_path(dir, k ? "long.jsonl" : "short.jsonl", 0);
        KvErr err;
        write_workload(&wp, path);
        ReuseOptions o = {.scope = SCOPE_CONVERSATION, .policy = POL_LRU, .capacity_blocks = 100};
        ReuseResult res;
        ReuseStreamInfo info;
        if (reuse_stream(path, REQLOG_AUTO, 0, &o, 1, 1, false, NULL, 0, NULL, &res, &info, &err) < 0)
            fail_msg("%s", err.msg);
        assert_true(info.pending_peak > 0);
        peak[k] = info.pending_peak;
    }
    assert_true(peak[1] < 2 * peak[0]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_block_policies_by_hand),
        cmocka_unit_test(test_prefix_run),
        cmocka_unit_test(test_conversation_one_room),
        cmocka_unit_test(test_belady_dominates),
        cmocka_unit_test(test_lru_curve),
        cmocka_unit_test(test_generator_statistics),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_cli),
        cmocka_unit_test(test_reader_paths),
        cmocka_unit_test(test_byte_sizes),
        cmocka_unit_test(test_mooncake_units),
        cmocka_unit_test(test_ttft_by_hand),
        cmocka_unit_test(test_local_assistant),
        cmocka_unit_test(test_conv_policy_by_hand),
        cmocka_unit_test(test_generator_models),
        cmocka_unit_test(test_config_file),
        cmocka_unit_test(test_stream_lru),
        cmocka_unit_test(test_stream_equals_run),
        cmocka_unit_test(test_stream_bounded),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
