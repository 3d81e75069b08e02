/* The synthetic trace generator: determinism, metadata layout, and the planted attention
 * structure measured with an attention computed here from the stored Q and K. */
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "sim/cmd/synth.h"
#include "sim/format/trace.h"
#include "sim/replay/engine.h"
#include "tests/support/scratch.h"

/* Three layers over two KV heads give every head kind twice (kind = (layer + g) mod 3). */
static void small_params(SynthParams *sp)
{
    synth_defaults(sp);
    sp->seed = 7;
    sp->n_layers = 3;
    sp->n_q_heads = 4;
    sp->n_kv_heads = 2;
    sp->head_dim = 32;
    sp->n_prompt = 384;
    sp->n_decode = 64;
    sp->n_needles = 4;
    sp->n_system = 24;
    sp->n_turns = 3;
    sp->attn_rows_every = 16;
}

typedef struct {
    Trace *tr;
    float *q, *k, *v; /* one layer */
} Loaded;

static Loaded load(const char *path)
{
    KvErr err;
    Loaded ld = {.tr = trace_open(path, &err)};
    if (!ld.tr)
        fail_msg("%s", err.msg);
    const TraceMeta *m = trace_meta(ld.tr);
    size_t per_head = (size_t)m->n_tokens * m->head_dim;
    ld.q = kv_malloc((size_t)m->n_q_heads * per_head * sizeof(float));
    ld.k = kv_malloc((size_t)m->n_kv_heads * per_head * sizeof(float));
    ld.v = kv_malloc((size_t)m->n_kv_heads * per_head * sizeof(float));
    return ld;
}

static void read_layer(Loaded *ld, int layer)
{
    KvErr err;
    if (trace_read_layer(ld->tr, layer, ld->q, ld->k, ld->v, &err) != 0)
        fail_msg("%s", err.msg);
}

static void unload(Loaded *ld)
{
    trace_close(ld->tr);
    free(ld->q);
    free(ld->k);
    free(ld->v);
}

static void write_or_fail(const SynthParams *sp, const char *path)
{
    KvErr err;
    if (synth_write(sp, path, &err) != 0)
        fail_msg("%s", err.msg);
}

static void test_same_seed_identical_other_seed_different(void **state)
{
    (void)state;
    char *dir = scratch_create();
    SynthParams sp;
    small_params(&sp);
    sp.n_layers = 2;
    sp.dtype = TRACE_F16;
    write_or_fail(&sp, scratch_path(dir, "a.h5", 0));
    write_or_fail(&sp, scratch_path(dir, "b.h5", 1));
    sp.seed = 8;
    write_or_fail(&sp, scratch_path(dir, "c.h5", 2));
    Loaded a = load(scratch_path(dir, "a.h5", 0)), b = load(scratch_path(dir, "b.h5", 1)),
           c = load(scratch_path(dir, "c.h5", 2));
    const TraceMeta *ma = trace_meta(a.tr), *mb = trace_meta(b.tr), *mc = trace_meta(c.tr);
    size_t per_head = (size_t)ma->n_tokens * ma->head_dim * sizeof(float);
    assert_memory_equal(ma->tokens, mb->tokens, (size_t)ma->n_tokens * sizeof(int32_t));
    assert_memory_equal(ma->needles, mb->needles, (size_t)ma->n_needles * 2 * sizeof(int32_t));
    assert_memory_not_equal(ma->tokens, mc->tokens, (size_t)ma->n_tokens * sizeof(int32_t));
    for (int l = 0; l < ma->n_layers; l++) {
        read_layer(&a, l);
        read_layer(&b, l);
        read_layer(&c, l);
        assert_memory_equal(a.q, b.q, ma->n_q_heads * per_head);
        assert_memory_equal(a.k, b.k, ma->n_kv_heads * per_head);
        assert_memory_equal(a.v, b.v, ma->n_kv_heads * per_head);
        assert_memory_not_equal(a.q, c.q, ma->n_q_heads * per_head);
        assert_memory_not_equal(a.k, c.k, ma->n_kv_heads * per_head);
    }
    unload(&a);
    unload(&b);
    unload(&c);
    scratch_remove(dir);
}

static void test_metadata_layout(void **state)
{
    (void)state;
    char *dir = scratch_create();
    SynthParams sp;
    small_params(&sp);
    sp.n_layers = 1;
    write_or_fail(&sp, scratch_path(dir, "m.h5", 0));
    Loaded ld = load(scratch_path(dir, "m.h5", 0));
    const TraceMeta *m = trace_meta(ld.tr);
    int P = sp.n_prompt, T = P + sp.n_decode;
    assert_int_equal(m->n_tokens, T);
    assert_int_equal(m->n_prompt, P);
    assert_true(fabs(m->attn_scale - 0.17677669529663688) < 1e-15); /* 32^-1/2 */
    assert_string_equal(m->model, "synthetic");
    /* probes: the last prompt token, every 16th decode step, the last token */
    assert_int_equal(m->n_probes, 5);
    const int32_t probes[5] = {P - 1, P + 15, P + 31, P + 47, T - 1};
    assert_memory_equal(m->probes, probes, sizeof probes);
    /* rows: the last prompt token and every 16th decode step (here the last one is T-1) */
    assert_int_equal(m->n_attn_rows, 5);
    const int32_t rows_at[5] = {P - 1, P + 15, P + 31, P + 47, P + 63};
    assert_memory_equal(m->attn_rows_at, rows_at, sizeof rows_at);
    /* segments: system prompt, then three non-empty turns in order, decode in the last */
    int count[4] = {0};
    for (int t = 0; t < T; t++) {
        assert_int_equal(m->positions[t], t);
        assert_true(m->segments[t] >= 0 && m->segments[t] <= 3);
        if (t < P)
            count[m->segments[t]]++;
        else
            assert_int_equal(m->segments[t], 3);
    }
    assert_int_equal(count[0], sp.n_system);
    for (int s = 1; s <= 3; s++)
        assert_true(count[s] >= (P - sp.n_system) / 3 - 1);
    /* needles: disjoint spans of needle_len tokens after the system prompt, before P-1 */
    assert_int_equal(m->n_needles, 4);
    for (int i = 0; i < m->n_needles; i++) {
        int s = m->needles[2 * i], e = m->needles[2 * i + 1];
        assert_int_equal(e - s, sp.needle_len);
        assert_true(s >= sp.n_system && e <= P - 1);
        if (i > 0)
            assert_true(s >= m->needles[2 * i - 1]);
    }
    unload(&ld);
    scratch_remove(dir);
}

/* Attention of query head h at position t, computed here in double from the stored q and k. */
static void attention(const Loaded *ld, int h, int t, double *p)
{
    const TraceMeta *m = trace_meta(ld->tr);
    int D = m->head_dim, T = m->n_tokens, g = h / (m->n_q_heads / m->n_kv_heads);
    const float *q = ld->q + ((size_t)h * T + t) * D;
    double mx = -INFINITY, sum = 0;
    for (int j = 0; j <= t; j++) {
        const float *k = ld->k + ((size_t)g * T + j) * D;
        double dot = 0;
        for (int d = 0; d < D; d++)
            dot += (double)q[d] * k[d];
        p[j] = dot * m->attn_scale;
        mx = p[j] > mx ? p[j] : mx;
    }
    for (int j = 0; j <= t; j++)
        sum += (p[j] = exp(p[j] - mx));
    for (int j = 0; j <= t; j++)
        p[j] /= sum;
}

typedef struct {
    double sink, recent, needle; /* mean attention mass over heads of a kind and queries */
    int needle_tokens;
} KindMass;

enum { SINKS = 4, RECENT = 16, OFF_PROBE_STRIDE = 5 };

/* Mean mass on the sinks, on the RECENT most recent tokens and on needle tokens, per head
 * kind: at[] over the probe queries, off[] over decode queries that are not probes (every
 * OFF_PROBE_STRIDE-th), where each head shows its own kind. */
static void measure(const char *path, KindMass at[3], KindMass off[3])
{
    Loaded ld = load(path);
    const TraceMeta *m = trace_meta(ld.tr);
    int T = m->n_tokens;
    double *p = kv_malloc((size_t)T * sizeof *p);
    unsigned char *in_needle = kv_calloc((size_t)T, 1), *is_probe = kv_calloc((size_t)T, 1);
    int needle_tokens = 0;
    for (int i = 0; i < m->n_needles; i++)
        for (int j = m->needles[2 * i]; j < m->needles[2 * i + 1]; j++)
            needle_tokens += !in_needle[j], in_needle[j] = 1;
    for (int i = 0; i < m->n_probes; i++)
        is_probe[m->probes[i]] = 1;
    int n_at[3] = {0}, n_off[3] = {0};
    memset(at, 0, 3 * sizeof *at);
    memset(off, 0, 3 * sizeof *off);
    int group = m->n_q_heads / m->n_kv_heads;
    for (int l = 0; l < m->n_layers; l++) {
        read_layer(&ld, l);
        for (int h = 0; h < m->n_q_heads; h++) {
            SynthHeadKind kind = synth_head_kind(l, h / group);
            for (int t = m->n_prompt - 1; t < T; t++) {
                KindMass *km;
                if (is_probe[t]) {
                    km = &at[kind];
                    n_at[kind]++;
                } else if ((t - m->n_prompt) % OFF_PROBE_STRIDE == 0) {
                    km = &off[kind];
                    n_off[kind]++;
                } else {
                    continue;
                }
                attention(&ld, h, t, p);
                for (int j = 0; j <= t; j++) {
                    km->sink += j < SINKS ? p[j] : 0;
                    km->recent += j > t - RECENT ? p[j] : 0;
                    km->needle += in_needle[j] ? p[j] : 0;
                }
            }
        }
    }
    for (int k = 0; k < 3; k++) {
        assert_true(n_at[k] > 0 && n_off[k] > 0);
        at[k].sink /= n_at[k], at[k].recent /= n_at[k], at[k].needle /= n_at[k];
        off[k].sink /= n_off[k], off[k].recent /= n_off[k], off[k].needle /= n_off[k];
        at[k].needle_tokens = off[k].needle_tokens = needle_tokens;
    }
    free(p);
    free(in_needle);
    free(is_probe);
    unload(&ld);
}

static void check_planted(const KindMass at[3], const KindMass off[3], int T_probe_min)
{
    static const char *names[3] = {"local", "sink", "retrieval"};
    for (int k = 0; k < 3; k++)
        print_message("  %-9s off probes: sinks %.3f  last %d tokens %.3f  needles %.3f;"
                      "  at probes: needles %.3f\n", names[k], off[k].sink, RECENT,
                      off[k].recent, off[k].needle, at[k].needle);
    double needle_share = (double)at[0].needle_tokens / T_probe_min; /* uniform, at most */
    /* away from probes, sink heads put most of their attention on the first tokens */
    assert_true(off[SYNTH_SINK].sink > 0.5);
    assert_true(off[SYNTH_SINK].sink > 2 * off[SYNTH_LOCAL].sink);
    /* local heads put most of theirs on the recent tokens */
    assert_true(off[SYNTH_LOCAL].recent > 0.5);
    assert_true(off[SYNTH_LOCAL].recent > 2 * off[SYNTH_SINK].recent);
    /* retrieval heads keep some attention on the sinks and little on the recent tokens */
    assert_true(off[SYNTH_RETRIEVAL].recent < off[SYNTH_LOCAL].recent);
    for (int k = 0; k < 3; k++) {
        /* needles are found when a probe asks for them, by every kind of head ... */
        assert_true(at[k].needle > 0.3);
        assert_true(at[k].needle > 10 * needle_share);
        /* ... and not otherwise */
        assert_true(off[k].needle < 3 * needle_share);
    }
}

static void test_planted_structure(void **state)
{
    (void)state;
    char *dir = scratch_create();
    SynthParams sp;
    small_params(&sp);
    sp.attn_rows_every = 0;
    const char *path = scratch_path(dir, "s.h5", 0);
    write_or_fail(&sp, path);
    KindMass at[3], off[3];
    measure(path, at, off);
    check_planted(at, off, sp.n_prompt);
    scratch_remove(dir);
}

/* The structure survives the other RoPE layout, float16 storage and a long-context base. */
static void test_planted_structure_interleaved_f16(void **state)
{
    (void)state;
    char *dir = scratch_create();
    SynthParams sp;
    small_params(&sp);
    sp.attn_rows_every = 0;
    sp.rope_layout = ROPE_INTERLEAVED;
    sp.dtype = TRACE_F16;
    sp.rope_theta = 500000.0;
    sp.seed = 99;
    const char *path = scratch_path(dir, "s.h5", 0);
    write_or_fail(&sp, path);
    KindMass at[3], off[3];
    measure(path, at, off);
    check_planted(at, off, sp.n_prompt);
    scratch_remove(dir);
}

/* The stored keys really are rotated: every key of a head shares one pre-RoPE recency
 * component in the fast pairs. Undoing RoPE at each token's position makes the keys' mean point
 * along it; the stored (rotated) keys average out in those pairs. */
static void test_keys_carry_rope_phase(void **state)
{
    (void)state;
    char *dir = scratch_create();
    SynthParams sp;
    small_params(&sp);
    sp.n_layers = 1;
    sp.attn_rows_every = 0;
    const char *path = scratch_path(dir, "r.h5", 0);
    write_or_fail(&sp, path);
    Loaded ld = load(path);
    const TraceMeta *m = trace_meta(ld.tr);
    read_layer(&ld, 0);
    int D = m->head_dim, T = m->n_tokens;
    double *mean_rot = kv_calloc((size_t)D, sizeof(double)), *mean_unrot = kv_calloc((size_t)D, sizeof(double));
    float *kj = kv_malloc((size_t)D * sizeof(float));
    for (int j = 0; j < T; j++) {
        const float *raw = ld.k + (size_t)j * D; /* KV head 0 */
        memcpy(kj, raw, (size_t)D * sizeof(float));
        rope_apply(kj, D, m->rope_layout, m->rope_inv_freq, -m->positions[j]);
        for (int d = 0; d < D; d++) {
            mean_rot[d] += raw[d] / T;
            mean_unrot[d] += kj[d] / T;
        }
    }
    double norm_rot = 0, norm_unrot = 0;
    for (int f = 0; f < 2; f++) { /* the two fastest pairs are always in the band */
        int i0, i1;
        rope_pair(m->rope_layout, D, f, &i0, &i1);
        norm_rot += mean_rot[i0] * mean_rot[i0] + mean_rot[i1] * mean_rot[i1];
        norm_unrot += mean_unrot[i0] * mean_unrot[i0] + mean_unrot[i1] * mean_unrot[i1];
    }
    print_message("  keys' mean in the fast pairs: |rotated| %.3f, |un-rotated| %.3f\n",
                  sqrt(norm_rot), sqrt(norm_unrot));
    assert_true(sqrt(norm_unrot) > 3 * sqrt(norm_rot));
    free(mean_rot);
    free(mean_unrot);
    free(kj);
    unload(&ld);
    scratch_remove(dir);
}

static void test_rejects_bad_parameters(void **state)
{
    (void)state;
    SynthParams sp;
    KvErr err;
    small_params(&sp);
    sp.n_needles = 200;
    assert_int_equal(synth_validate(&sp, &err), -1);
    assert_non_null(strstr(err.msg, "--needles"));
    small_params(&sp);
    sp.n_kv_heads = 3;
    assert_int_equal(synth_validate(&sp, &err), -1);
    assert_non_null(strstr(err.msg, "--kv-heads"));
    small_params(&sp);
    sp.head_dim = 6;
    assert_int_equal(synth_validate(&sp, &err), -1);
    assert_non_null(strstr(err.msg, "--head-dim"));
    small_params(&sp);
    sp.n_system = sp.n_prompt;
    assert_int_equal(synth_validate(&sp, &err), -1);
    assert_non_null(strstr(err.msg, "--system"));
    char *dir = scratch_create();
    assert_int_equal(synth_write(&sp, scratch_path(dir, "x.h5", 0), &err), -1);
    assert_int_equal(scratch_count(dir), 0);
    scratch_remove(dir);
}

/* ---- `kvsim synth` when the write phase fails or is interrupted ---- */

/* True when dir holds a name ending in ".tmp". */
static int has_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    int found = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        found |= n > 4 && strcmp(e->d_name + n - 4, ".tmp") == 0;
    }
    closedir(d);
    return found;
}

/* Disk full, simulated with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored so that writes
 * fail with EFBIG): at every point of the write phase, the error is one line naming the trace
 * and the reason, the exit status 2, and nothing is left behind. It used to be followed by a
 * segfault in HDF5's shutdown (a failed close left the file registered). */
static void test_disk_full_is_a_clean_error(void **state)
{
    (void)state;
    const char *bin = getenv("KVSIM_BIN");
    assert_non_null(bin);
    char *dir = scratch_create();
    const char *out = scratch_path(dir, "full.h5", 0);
    const char *args = "--layers 2 --q-heads 4 --kv-heads 2 --head-dim 16 --prompt 300 --decode 10";
    /* The whole trace's size, then limits (in 512-byte blocks, the unit of dash's ulimit -f)
     * from its first block to its last. */
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' synth --out '%s' %s", bin, out, args);
    KvsimRun whole = run_command(cmd);
    assert_int_equal(whole.status, 0);
    kvsim_run_free(&whole);
    FILE *fp = fopen(out, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    int blocks = (int)((ftell(fp) + 511) / 512);
    fclose(fp);
    unlink(out);
    const int limits[] = {1, blocks / 10, blocks / 2, blocks * 9 / 10, blocks - 1};
    for (size_t i = 0; i < sizeof limits / sizeof *limits; i++) {
        snprintf(cmd, sizeof cmd, "ulimit -f %d; trap '' XFSZ; exec '%s' synth --out '%s' %s",
                 limits[i], bin, out, args);
        KvsimRun r = run_command(cmd);
        if (r.status != 2 || count_lines(r.err) != 1 || !strstr(r.err, "full.h5") ||
            !strstr(r.err, "File too large"))
            fail_msg("limit %d blocks: status %d, stderr: %s", limits[i], r.status, r.err);
        kvsim_run_free(&r);
        assert_int_equal(scratch_count(dir), 0);
    }
    scratch_remove(dir);
}

/* Starts `kvsim synth` writing a trace of `prompt` tokens into dir; returns its pid. */
static pid_t start_synth(const char *dir, int prompt)
{
    const char *bin = getenv("KVSIM_BIN");
    assert_non_null(bin);
    char out[8192], tokens[32];
    snprintf(out, sizeof out, "%s/sig.h5", dir);
    snprintf(tokens, sizeof tokens, "%d", prompt);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, STDOUT_FILENO);
        dup2(null, STDERR_FILENO);
        execl(bin, bin, "synth", "--out", out, "--layers", "8", "--q-heads", "8", "--kv-heads",
              "2", "--head-dim", "64", "--prompt", tokens, "--decode", "16", "--attn-rows", "0",
              (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* SIGTERM while the trace is being written removes its temporary file. The signal is sent as
 * soon as the temporary file exists; should the run finish first, it is repeated with a bigger
 * trace (bounded). */
static void test_sigterm_leaves_no_temporary(void **state)
{
    (void)state;
    char *dir = scratch_create();
    int prompt = 2048, caught = 0;
    for (int attempt = 0; attempt < 6 && !caught; attempt++, prompt *= 2) {
        pid_t pid = start_synth(dir, prompt);
        int status = 0, seen = 0;
        struct timespec tick = {0, 1000000};
        for (int ms = 0; ms < 60000 && !seen; ms++) {
            if (waitpid(pid, &status, WNOHANG) == pid)
                break; /* finished (or failed) before the temporary file was seen */
            seen = has_tmp(dir);
            if (!seen)
                nanosleep(&tick, NULL);
        }
        if (seen) {
            kill(pid, SIGTERM);
            assert_int_equal(waitpid(pid, &status, 0), pid);
        } else if (kill(pid, 0) == 0) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fail_msg("no temporary file within 60 s");
        }
        if (seen && WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) {
            caught = 1;
            assert_false(has_tmp(dir));
            assert_int_equal(scratch_count(dir), 0); /* and no trace either */
        } else {
            assert_false(has_tmp(dir)); /* it finished normally: then only the trace is left */
        }
        unlink(scratch_path(dir, "sig.h5", 0));
    }
    assert_true(caught);
    scratch_remove(dir);
}

/* Sliding windows and turns: each layer's window and the spans as asked, segments that open a
 * turn with each later message, and a replay in which a cache holding the whole window (and
 * older keys, which the model does not attend) loses nothing: mass 1, output error 0. */
static void test_windows_and_turns_replay(void **state)
{
    (void)state;
    char *dir = scratch_create();
    SynthParams sp;
    small_params(&sp);
    sp.window = 16;
    sp.global_every = 3; /* layer 2 global */
    sp.decode_turns = 2;
    sp.message_len = 12;
    const char *path = scratch_path(dir, "w.h5", 0);
    write_or_fail(&sp, path);
    Loaded ld = load(path);
    const TraceMeta *m = trace_meta(ld.tr);
    int P = sp.n_prompt, T = P + sp.n_decode + 12;
    assert_int_equal(m->n_tokens, T);
    assert_int_equal(synth_n_tokens(&sp), T);
    const int32_t windows[3] = {16, 16, 0};
    for (int l = 0; l < 3; l++)
        assert_int_equal(trace_layer_geometry(m, l).window, windows[l]);
    const TraceSpan want[4] = {{SPAN_PREFILL, 0, P}, {SPAN_DECODE, P, P + 32},
                               {SPAN_PREFILL, P + 32, P + 44}, {SPAN_DECODE, P + 44, T}};
    assert_int_equal(m->n_spans, 4);
    assert_memory_equal(m->spans, want, sizeof want);
    assert_int_equal(m->segments[P], sp.n_turns);
    assert_int_equal(m->segments[P + 32], sp.n_turns + 1);
    assert_int_equal(m->segments[T - 1], sp.n_turns + 1);

    const char *types[3] = {"full", "window", "window"};
    const char *params[3][2] = {{NULL, NULL}, {"window", "20"}, {"window", "8"}};
    PolicySpec spec[3];
    for (int i = 0; i < 3; i++) {
        memset(&spec[i], 0, sizeof spec[i]);
        snprintf(spec[i].label, sizeof spec[i].label, "p%d", i);
        spec[i].type = policy_find(types[i]);
        spec[i].params = kv_calloc(1, spec[i].type->params_size);
        policy_params_defaults(spec[i].type, spec[i].params);
        KvErr perr;
        if (params[i][0])
            assert_int_equal(policy_param_set(spec[i].type, spec[i].params, params[i][0],
                                              params[i][1], &perr), 0);
    }
    /* The policies drive the windowed layers too ([run] sliding_layers = compress). */
    EngineConfig cfg = {.threads = 2, .topk = 4, .eval_every = 1, .kv_bits = 16, .seed = 1,
                        .n_policies = 3, .policies = spec, .sliding_layers = SLIDING_COMPRESS};
    KvErr err;
    Results *r = engine_run(ld.tr, &cfg, &err);
    if (!r)
        fail_msg("%s", err.msg);
    double small_mass = 0;
    int n = 0;
    for (int l = 0; l < 2; l++) /* the windowed layers */
        for (int e = 0; e < r->n_evals; e++)
            for (int h = 0; h < sp.n_q_heads; h++) {
                assert_float_equal(results_head_at(r, 0, l, e, h, HM_MASS), 1.0, 1e-6);
                assert_float_equal(results_head_at(r, 0, l, e, h, HM_OUT_ERR), 0.0, 1e-6);
                /* 4 sinks + the last 20 keys: every key of the 16-key window, and 4 sinks the
                 * model gives no attention */
                assert_float_equal(results_head_at(r, 1, l, e, h, HM_MASS), 1.0, 1e-5);
                assert_float_equal(results_head_at(r, 1, l, e, h, HM_OUT_ERR), 0.0, 1e-5);
                small_mass += results_head_at(r, 2, l, e, h, HM_MASS);
                n++;
            }
    assert_true(small_mass / n < 0.999); /* a cache narrower than the window does lose mass */
    /* With skip (the default) the windowed layers keep their window whatever the policy, so the
     * narrow cache loses nothing there; the global layer 2 is compressed as before. */
    cfg.sliding_layers = SLIDING_SKIP;
    Results *skip = engine_run(ld.tr, &cfg, &err);
    if (!skip)
        fail_msg("%s", err.msg);
    for (int e = 0; e < r->n_evals; e++)
        for (int h = 0; h < sp.n_q_heads; h++) {
            for (int l = 0; l < 2; l++)
                assert_float_equal(results_head_at(skip, 2, l, e, h, HM_MASS), 1.0, 1e-5);
            assert_true(results_head_at(skip, 2, 2, e, h, HM_MASS) ==
                        results_head_at(r, 2, 2, e, h, HM_MASS));
        }
    results_free(skip);
    results_free(r);
    for (int i = 0; i < 3; i++)
        free(spec[i].params);
    unload(&ld);
    scratch_remove(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_seed_identical_other_seed_different),
        cmocka_unit_test(test_metadata_layout),
        cmocka_unit_test(test_planted_structure),
        cmocka_unit_test(test_planted_structure_interleaved_f16),
        cmocka_unit_test(test_keys_carry_rope_phase),
        cmocka_unit_test(test_rejects_bad_parameters),
        cmocka_unit_test(test_windows_and_turns_replay),
        cmocka_unit_test(test_disk_full_is_a_clean_error),
        cmocka_unit_test(test_sigterm_leaves_no_temporary),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
