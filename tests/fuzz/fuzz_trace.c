/* HDF5 traces (sim/format/trace.c) of versions 1 and 2, structure-aware: the input does not become
 * the file's bytes (a
 * mutated HDF5 file exercises libhdf5's own parser, which kvsim cannot fix) but drives a writer
 * that builds a small trace through the HDF5 API with every attribute, dataset shape, type and
 * value either valid or taken raw from the input (negative counts, NaN and huge floats, shapes
 * off by one, a float where an integer belongs, strings of any bytes). The reader must refuse
 * what docs/trace-format.md forbids with one line, and a trace it accepts must read and replay
 * (full and h2o) or fail with one line: never a crash, a leak or an out-of-bounds access. */
#include <hdf5.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim/replay/engine.h"
#include "tests/fuzz/support.h"

typedef struct {
    const uint8_t *d;
    size_t n, at;
} In;

static uint8_t u8(In *in) { return in->at < in->n ? in->d[in->at++] : 0; }

static uint32_t u32(In *in)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = v << 8 | u8(in);
    return v;
}

static double f64(In *in)
{
    uint64_t bits = (uint64_t)u32(in) << 32 | u32(in);
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* 1 in 8: a mutation of this item. */
static int mutate(In *in) { return (u8(in) & 7) == 0; }

static void attr_int(hid_t f, const char *name, long valid, In *in)
{
    hid_t s = H5Screate(H5S_SCALAR);
    if (mutate(in) && (u8(in) & 1)) { /* a float where an integer belongs */
        double v = (double)valid + 0.5;
        hid_t a = H5Acreate2(f, name, H5T_IEEE_F64LE, s, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
        H5Aclose(a);
    } else {
        long long v = mutate(in) ? (long long)(int32_t)u32(in) : valid;
        hid_t a = H5Acreate2(f, name, H5T_STD_I64LE, s, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_LLONG, &v);
        H5Aclose(a);
    }
    H5Sclose(s);
}

static void attr_double(hid_t f, const char *name, double valid, In *in)
{
    double v = mutate(in) ? f64(in) : valid;
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, H5T_IEEE_F64LE, s, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
    H5Aclose(a);
    H5Sclose(s);
}

static void attr_string(hid_t f, const char *name, const char *valid, In *in)
{
    char buf[300];
    size_t len = strlen(valid);
    if (mutate(in)) {
        len = u8(in) % 280 + 1;
        for (size_t i = 0; i < len; i++)
            buf[i] = (char)u8(in);
    } else {
        memcpy(buf, valid, len);
    }
    if (len == 0)
        buf[len++] = '\0';
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, len);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, t, buf);
    H5Aclose(a);
    H5Sclose(s);
    H5Tclose(t);
}

/* An integer dataset of `rank` dims; values from valid(i) or raw. */
static void dset_int(hid_t f, const char *name, int rank, const hsize_t *dims, const int32_t *valid,
                     In *in)
{
    hsize_t d[2] = {dims[0], rank > 1 ? dims[1] : 1};
    if (mutate(in))
        d[0] = d[0] + (u8(in) & 1 ? 1 : 0) - (d[0] > 0 && (u8(in) & 1) ? 1 : 0);
    size_t n = (size_t)d[0] * (rank > 1 ? d[1] : 1);
    int32_t *v = kv_calloc(n ? n : 1, sizeof *v);
    size_t n_valid = (size_t)dims[0] * (rank > 1 ? dims[1] : 1);
    for (size_t i = 0; i < n; i++)
        v[i] = i < n_valid ? valid[i] : 0;
    if (mutate(in))
        for (size_t i = 0; i < n; i++)
            if (u8(in) & 1)
                v[i] = (int32_t)u32(in);
    hid_t s = H5Screate_simple(rank, d, NULL);
    hid_t ds = H5Dcreate2(f, name, H5T_STD_I32LE, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (n)
        H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(ds);
    H5Sclose(s);
    free(v);
}

/* A float dataset [a][b][c] ([a][b] when c = 0, [a] when b = c = 0): small values (in (0, 1]
 * when positive), or raw ones when mutated. */
static void dset_float(hid_t f, const char *name, hsize_t a, hsize_t b, hsize_t c, int positive,
                       In *in)
{
    int rank = c ? 3 : b ? 2 : 1;
    hsize_t d[3] = {a, b, c};
    if (mutate(in))
        d[rank - 1] += 1;
    size_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= (size_t)d[i];
    float *v = kv_malloc((n ? n : 1) * sizeof *v);
    int raw = mutate(in);
    for (size_t i = 0; i < n; i++) {
        if (raw && (u8(in) & 3) == 0) {
            uint32_t bits = u32(in);
            memcpy(&v[i], &bits, sizeof v[i]);
        } else {
            v[i] = positive ? (u8(in) + 1) / 256.0f : ((int)u8(in) - 128) / 32.0f;
        }
    }
    hid_t type = mutate(in) && (u8(in) & 1) ? H5T_IEEE_F64LE : H5T_IEEE_F32LE;
    hid_t s = H5Screate_simple(rank, d, NULL);
    hid_t ds = H5Dcreate2(f, name, type, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (n)
        H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(ds);
    H5Sclose(s);
    free(v);
}

/* What version 2 adds: the model's size, each layer's window and RoPE frequencies, the spans:
 * the prompt's prefill span, then up to three runs alternating decode and prefill to T. */
static void add_version2(hid_t f, int L, int D, int T, int P, In *in)
{
    H5Adelete(f, "version");
    attr_int(f, "version", 2, in);
    attr_int(f, "hidden_size", 64, in);
    attr_int(f, "intermediate_size", 0, in); /* unknown */
    attr_int(f, "vocab_size", 32000, in);
    attr_int(f, "n_params", 123456789, in);
    int32_t window[3];
    for (int l = 0; l < L; l++)
        window[l] = u8(in) & 1 ? 0 : 1 + u8(in) % T;
    hsize_t dl[1] = {(hsize_t)L};
    dset_int(f, "window", 1, dl, window, in);
    if (H5Lexists(f, "rope_inv_freq", H5P_DEFAULT) > 0)
        H5Ldelete(f, "rope_inv_freq", H5P_DEFAULT);
    if (u8(in) & 1)
        dset_float(f, "rope_inv_freq", (hsize_t)L, (hsize_t)D / 2, 0, 1, in);
    int32_t spans[3 * 4] = {SPAN_PREFILL, 0, P};
    int n = 1, at = P, kind = SPAN_DECODE, pieces = 1 + u8(in) % 3;
    for (int i = 0; i < pieces && at < T; i++, n++, kind ^= 1) {
        int end = i == pieces - 1 ? T : at + 1 + u8(in) % (T - at);
        spans[3 * n] = kind;
        spans[3 * n + 1] = at;
        spans[3 * n + 2] = end;
        at = end;
    }
    hsize_t ds[2] = {(hsize_t)n, 3};
    dset_int(f, "spans", 2, ds, spans, in);
}

static void build(const char *path, In *in)
{
    int L = 1 + u8(in) % 3, Hkv = 1 + u8(in) % 2, Hq = Hkv * (1 + u8(in) % 2);
    int D = 2 * (1 + u8(in) % 4), T = 2 + u8(in) % 30, P = 1 + u8(in) % (T - 1);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    attr_string(f, "format", "kvsim-trace", in);
    attr_int(f, "version", 1, in);
    attr_string(f, "model", "fuzz", in);
    attr_string(f, "generator", "fuzz_trace", in);
    attr_int(f, "n_layers", L, in);
    attr_int(f, "n_q_heads", Hq, in);
    attr_int(f, "n_kv_heads", Hkv, in);
    attr_int(f, "head_dim", D, in);
    attr_int(f, "n_tokens", T, in);
    attr_int(f, "n_prompt", P, in);
    attr_double(f, "rope_theta", 10000.0, in);
    attr_string(f, "rope_layout", u8(in) & 1 ? "half" : "interleaved", in);
    attr_string(f, "rope_scaling", "", in);
    attr_double(f, "attn_scale", attn_scale_default(D), in);

    int32_t *seq = kv_malloc((size_t)T * sizeof *seq);
    hsize_t dt[1] = {(hsize_t)T};
    for (int i = 0; i < T; i++)
        seq[i] = i;
    dset_int(f, "tokens", 1, dt, seq, in);
    dset_int(f, "positions", 1, dt, seq, in);
    for (int i = 0; i < T; i++)
        seq[i] = i * 3 / T;
    dset_int(f, "segments", 1, dt, seq, in);
    int N = u8(in) % 3, M = u8(in) % 3, R = u8(in) % 3;
    int32_t needles[4], probes[2], rows_at[2];
    for (int i = 0; i < N; i++) {
        needles[2 * i] = u8(in) % T;
        needles[2 * i + 1] = needles[2 * i] + 1 + u8(in) % (T - needles[2 * i]);
    }
    for (int i = 0; i < M; i++)
        probes[i] = u8(in) % T;
    rows_at[0] = u8(in) % T;
    rows_at[1] = rows_at[0] + 1 < T ? rows_at[0] + 1 : rows_at[0];
    if (R == 2 && rows_at[1] == rows_at[0])
        R = 1;
    hsize_t dn[2] = {(hsize_t)N, 2}, dm[1] = {(hsize_t)M}, dr[1] = {(hsize_t)R};
    dset_int(f, "needles", 2, dn, needles, in);
    dset_int(f, "probes", 1, dm, probes, in);
    if (R > 0 || mutate(in))
        dset_int(f, "attn_rows_at", 1, dr, rows_at, in);
    if (u8(in) & 1)
        dset_float(f, "rope_inv_freq", (hsize_t)D / 2, 0, 0, 1, in);
    hid_t layers = H5Gcreate2(f, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    for (int l = 0; l < L; l++) {
        if (mutate(in) && (u8(in) & 1))
            continue; /* a layer missing */
        char name[64];
        snprintf(name, sizeof name, "%03d", l);
        hid_t g = H5Gcreate2(layers, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        dset_float(g, "q", (hsize_t)Hq, (hsize_t)T, (hsize_t)D, 0, in);
        dset_float(g, "k", (hsize_t)Hkv, (hsize_t)T, (hsize_t)D, 0, in);
        dset_float(g, "v", (hsize_t)Hkv, (hsize_t)T, (hsize_t)D, 0, in);
        if (R > 0)
            dset_float(g, "attn_rows", (hsize_t)Hq, (hsize_t)R, (hsize_t)T, 1, in);
        H5Gclose(g);
    }
    H5Gclose(layers);
    /* Version 2 when the byte after the version 1 parts says so (the version 1 seeds, all 0x01
     * bytes or random ones read to their end, stay version 1 mostly). */
    if (u8(in) & 2)
        add_version2(f, L, D, T, P, in);
    H5Fclose(f);
    free(seq);
}

static void one_line(const KvErr *err)
{
    if (getenv("KVSIM_FUZZ_VERBOSE"))
        fprintf(stderr, "fuzz_trace: %s\n", err->msg);
    if (strchr(err->msg, '\n'))
        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int quiet;
    if (!quiet) {
        H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
        quiet = 1;
    }
    In in = {data, size, 0};
    const char *path = fuzz_write("t.h5", NULL, 0);
    build(path, &in);
    KvErr err;
    Trace *tr = trace_open(path, &err);
    if (!tr) {
        one_line(&err);
        return 0;
    }
    const TraceMeta *m = trace_meta(tr);
    size_t nq = (size_t)m->n_q_heads * m->n_tokens * m->head_dim;
    size_t nk = (size_t)m->n_kv_heads * m->n_tokens * m->head_dim;
    float *q = kv_malloc(nq * sizeof *q), *k = kv_malloc(nk * sizeof *k);
    float *v = kv_malloc(nk * sizeof *v);
    for (int l = 0; l < m->n_layers; l++)
        if (trace_read_layer(tr, l, q, k, v, &err) != 0)
            one_line(&err);
    free(q);
    free(k);
    free(v);

    /* A replay of what the reader accepted: full and h2o at a budget below T. */
    const char *types[2] = {"full", "h2o"};
    PolicySpec spec[2];
    for (int i = 0; i < 2; i++) {
        memset(&spec[i], 0, sizeof spec[i]);
        snprintf(spec[i].label, sizeof spec[i].label, "%s", types[i]);
        spec[i].type = policy_find(types[i]);
        spec[i].params = kv_calloc(1, spec[i].type->params_size);
        policy_params_defaults(spec[i].type, spec[i].params);
    }
    KvErr perr;
    policy_param_set(spec[1].type, spec[1].params, "budget", "4", &perr);
    EngineConfig cfg = {.threads = 1, .topk = 2, .eval_every = 1, .kv_bits = 16, .seed = 1,
                        .n_policies = 2, .policies = spec};
    Results *r = engine_run(tr, &cfg, &err);
    if (r && getenv("KVSIM_FUZZ_VERBOSE"))
        fprintf(stderr, "fuzz_trace: replayed %d layers, %d steps\n", r->n_layers, r->n_steps);
    if (r)
        results_free(r);
    else
        one_line(&err);
    for (int i = 0; i < 2; i++)
        free(spec[i].params);
    trace_close(tr);
    return 0;
}
