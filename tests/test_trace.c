/* The trace reader and writer: round trips in both precisions, concurrent reads, every
 * validation path of trace_open, and the writer's atomic output. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>
#include <hdf5.h>

#include "sim/format/trace.h"
#include "tests/support/scratch.h"

enum { L = 3, HQ = 4, HKV = 2, D = 8, T = 37, P = 30 };

/* A trace in memory: metadata and every layer's q, k, v and attention rows. */
typedef struct {
    TraceMeta meta;
    float *q[L], *k[L], *v[L], *rows[L];
} Sample;

static size_t q_len(void) { return (size_t)HQ * T * D; }
static size_t kv_len(void) { return (size_t)HKV * T * D; }

static void sample_init(Sample *s, int n_needles, int n_probes, int n_rows, uint64_t seed)
{
    memset(s, 0, sizeof *s);
    TraceMeta *m = &s->meta;
    char generator[64];
    snprintf(generator, sizeof generator, "test_trace seed=%llu", (unsigned long long)seed);
    /* Every layer different: a global one and two windows; RoPE scaled differently in each
     * (must not be replaced by the default on read). */
    int32_t window[L] = {0, 5, 16};
    double freq[L][D / 2];
    for (int l = 0; l < L; l++) {
        rope_default_inv_freq(500000.0, D, freq[l]);
        for (int f = 0; f < D / 2; f++)
            freq[l][f] *= 0.5 / (l + 1);
    }
    TraceModel model = {
        .model = "unit-model", .generator = generator, .rope_scaling = "linear factor=2",
        .n_layers = L, .n_q_heads = HQ, .n_kv_heads = HKV, .head_dim = D,
        .rope_theta = 500000.0, .rope_layout = ROPE_INTERLEAVED, .attn_scale = 0.3,
        .rope_attention_factor = 1.25, .attn_softcap = 30.0,
        .window = window, .rope_inv_freq = &freq[0][0], .hidden_size = 64,
        .intermediate_size = 172, .vocab_size = 32000, .n_params = 5000000000LL,
    };
    trace_meta_init(m, &model, T, P, n_needles, n_probes, n_rows);
    /* Two turns: the prompt, an answer, a message, an answer. */
    const TraceSpan spans[4] = {{SPAN_PREFILL, 0, P}, {SPAN_DECODE, P, P + 3},
                                {SPAN_PREFILL, P + 3, P + 5}, {SPAN_DECODE, P + 5, T}};
    trace_meta_set_spans(m, 4, spans);
    for (int t = 0; t < T; t++) {
        m->tokens[t] = 1000 + 7 * t;
        m->positions[t] = 3 + 2 * t;
        m->segments[t] = t < 5 ? 0 : t < 20 ? 1 : 2;
    }
    for (int i = 0; i < n_needles; i++) {
        m->needles[2 * i] = 6 + 5 * i;
        m->needles[2 * i + 1] = 8 + 5 * i;
    }
    for (int i = 0; i < n_probes; i++)
        m->probes[i] = P - 1 + 2 * i;
    for (int r = 0; r < n_rows; r++)
        m->attn_rows_at[r] = P - 1 + 3 * r;

    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, (unsigned long)seed);
    for (int l = 0; l < L; l++) {
        s->q[l] = kv_malloc(q_len() * sizeof(float));
        s->k[l] = kv_malloc(kv_len() * sizeof(float));
        s->v[l] = kv_malloc(kv_len() * sizeof(float));
        for (size_t i = 0; i < q_len(); i++)
            s->q[l][i] = (float)gsl_ran_gaussian(rng, 2.0);
        for (size_t i = 0; i < kv_len(); i++) {
            s->k[l][i] = (float)gsl_ran_gaussian(rng, 2.0);
            s->v[l][i] = (float)gsl_ran_gaussian(rng, 0.5);
        }
        s->rows[l] = kv_malloc((size_t)HQ * (n_rows ? n_rows : 1) * T * sizeof(float));
        for (size_t i = 0; i < (size_t)HQ * n_rows * T; i++)
            s->rows[l][i] = (float)gsl_rng_uniform(rng);
    }
    gsl_rng_free(rng);
}

static void sample_free(Sample *s)
{
    trace_meta_free(&s->meta);
    for (int l = 0; l < L; l++) {
        free(s->q[l]);
        free(s->k[l]);
        free(s->v[l]);
        free(s->rows[l]);
    }
}

/* Copies tokens [t0, t0+nt) of a [heads][T][D] array into [heads][nt][D]. */
static float *token_slice(const float *x, int heads, int t0, int nt)
{
    float *out = kv_malloc((size_t)heads * nt * D * sizeof(float));
    for (int h = 0; h < heads; h++)
        memcpy(out + (size_t)h * nt * D, x + ((size_t)h * T + t0) * D, (size_t)nt * D * sizeof(float));
    return out;
}

static void put_range(TraceWriter *w, const Sample *s, int l, int t0, int nt)
{
    float *q = token_slice(s->q[l], HQ, t0, nt), *k = token_slice(s->k[l], HKV, t0, nt),
          *v = token_slice(s->v[l], HKV, t0, nt);
    KvErr err;
    if (trace_writer_put_qkv(w, l, t0, nt, q, k, v, &err) != 0)
        fail_msg("%s", err.msg);
    free(q);
    free(k);
    free(v);
}

/* Writes the sample: layer 0 whole, layer 1 one token at a time, layer 2 in two uneven parts. */
static void sample_write(const Sample *s, const char *path, TraceDtype dtype)
{
    KvErr err;
    TraceWriter *w = trace_writer_create(path, &s->meta, dtype, &err);
    if (!w)
        fail_msg("%s", err.msg);
    put_range(w, s, 0, 0, T);
    for (int t = 0; t < T; t++)
        put_range(w, s, 1, t, 1);
    put_range(w, s, 2, 11, T - 11);
    put_range(w, s, 2, 0, 11);
    int R = s->meta.n_attn_rows;
    float *row = kv_malloc((size_t)HQ * T * sizeof(float));
    for (int l = 0; l < L; l++)
        for (int r = R - 1; r >= 0; r--) {
            for (int h = 0; h < HQ; h++)
                memcpy(row + (size_t)h * T, s->rows[l] + ((size_t)h * R + r) * T, T * sizeof(float));
            if (trace_writer_put_attn_row(w, l, r, row, &err) != 0)
                fail_msg("%s", err.msg);
        }
    free(row);
    if (trace_writer_finish(w, &err) != 0)
        fail_msg("%s", err.msg);
}

static void assert_meta_equal(const TraceMeta *a, const TraceMeta *b)
{
    assert_int_equal(a->version, b->version);
    assert_string_equal(a->model, b->model);
    assert_string_equal(a->generator, b->generator);
    assert_string_equal(a->rope_scaling, b->rope_scaling);
    assert_int_equal(a->n_layers, b->n_layers);
    assert_int_equal(a->n_q_heads, b->n_q_heads);
    assert_int_equal(a->n_kv_heads, b->n_kv_heads);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->n_tokens, b->n_tokens);
    assert_int_equal(a->n_prompt, b->n_prompt);
    assert_true(a->rope_theta == b->rope_theta);
    assert_int_equal(a->rope_layout, b->rope_layout);
    assert_true(a->attn_scale == b->attn_scale);
    assert_true(a->rope_attention_factor == b->rope_attention_factor);
    assert_true(a->attn_softcap == b->attn_softcap);
    assert_memory_equal(a->tokens, b->tokens, (size_t)a->n_tokens * sizeof(int32_t));
    assert_memory_equal(a->positions, b->positions, (size_t)a->n_tokens * sizeof(int32_t));
    assert_memory_equal(a->segments, b->segments, (size_t)a->n_tokens * sizeof(int32_t));
    assert_int_equal(a->n_needles, b->n_needles);
    assert_int_equal(a->n_probes, b->n_probes);
    assert_int_equal(a->n_attn_rows, b->n_attn_rows);
    if (a->n_needles)
        assert_memory_equal(a->needles, b->needles, (size_t)a->n_needles * 2 * sizeof(int32_t));
    if (a->n_probes)
        assert_memory_equal(a->probes, b->probes, (size_t)a->n_probes * sizeof(int32_t));
    if (a->n_attn_rows)
        assert_memory_equal(a->attn_rows_at, b->attn_rows_at, (size_t)a->n_attn_rows * sizeof(int32_t));
    assert_int_equal(a->hidden_size, b->hidden_size);
    assert_int_equal(a->intermediate_size, b->intermediate_size);
    assert_int_equal(a->vocab_size, b->vocab_size);
    assert_true(a->n_params == b->n_params);
    for (int l = 0; l < a->n_layers; l++) {
        LayerGeometry ga = trace_layer_geometry(a, l), gb = trace_layer_geometry(b, l);
        assert_int_equal(ga.window, gb.window);
        assert_true(ga.attn_scale == gb.attn_scale);
        assert_int_equal(ga.rope_layout, gb.rope_layout);
        assert_int_equal(ga.head_dim, gb.head_dim);
        for (int f = 0; f < a->head_dim / 2; f++)
            assert_true(ga.rope_inv_freq[f] == gb.rope_inv_freq[f]);
    }
    assert_int_equal(a->n_spans, b->n_spans);
    for (int i = 0; i < a->n_spans; i++) {
        assert_int_equal(a->spans[i].kind, b->spans[i].kind);
        assert_int_equal(a->spans[i].start, b->spans[i].start);
        assert_int_equal(a->spans[i].end, b->spans[i].end);
    }
}

static Trace *open_ok(const char *path)
{
    KvErr err;
    Trace *tr = trace_open(path, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    return tr;
}

static void test_roundtrip_f32_exact(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "t.h5", 0);
    Sample s;
    sample_init(&s, 3, 4, 3, 11);
    sample_write(&s, path, TRACE_F32);
    Trace *tr = open_ok(path);
    assert_string_equal(trace_path(tr), path);
    assert_int_equal(trace_dtype(tr), TRACE_F32);
    assert_meta_equal(trace_meta(tr), &s.meta);
    float *q = kv_malloc(q_len() * sizeof(float)), *k = kv_malloc(kv_len() * sizeof(float)),
          *v = kv_malloc(kv_len() * sizeof(float)), *rows = kv_malloc((size_t)HQ * 3 * T * sizeof(float));
    KvErr err;
    for (int l = 0; l < L; l++) {
        assert_int_equal(trace_read_layer(tr, l, q, k, v, &err), 0);
        assert_memory_equal(q, s.q[l], q_len() * sizeof(float));
        assert_memory_equal(k, s.k[l], kv_len() * sizeof(float));
        assert_memory_equal(v, s.v[l], kv_len() * sizeof(float));
        assert_int_equal(trace_read_attn_rows(tr, l, rows, &err), 0);
        assert_memory_equal(rows, s.rows[l], (size_t)HQ * 3 * T * sizeof(float));
    }
    /* Skipping some of q, k, v leaves those buffers alone. */
    memset(q, 0, q_len() * sizeof(float));
    assert_int_equal(trace_read_layer(tr, 2, NULL, k, NULL, &err), 0);
    assert_memory_equal(k, s.k[2], kv_len() * sizeof(float));
    assert_true(q[0] == 0.0f);
    assert_int_equal(trace_read_layer(tr, L, q, k, v, &err), -1);
    assert_non_null(strstr(err.msg, "layer 3"));
    free(q);
    free(k);
    free(v);
    free(rows);
    trace_close(tr);
    sample_free(&s);
    scratch_remove(dir);
}

/* Half precision keeps 11 significant bits: relative error <= 2^-11 in the normal range. */
static void test_roundtrip_f16_within_half_precision(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "t16.h5", 0);
    Sample s;
    sample_init(&s, 2, 1, 2, 12);
    s.q[0][0] = 0.1f;     /* not representable: must come back rounded */
    s.q[0][1] = 1.25f;    /* representable: must come back exact */
    s.k[0][0] = -2048.5f; /* spacing is 2 there: rounds to -2048 */
    sample_write(&s, path, TRACE_F16);
    Trace *tr = open_ok(path);
    assert_int_equal(trace_dtype(tr), TRACE_F16);
    assert_meta_equal(trace_meta(tr), &s.meta);
    float *q = kv_malloc(q_len() * sizeof(float)), *k = kv_malloc(kv_len() * sizeof(float)),
          *v = kv_malloc(kv_len() * sizeof(float)), *rows = kv_malloc((size_t)HQ * 2 * T * sizeof(float));
    KvErr err;
    for (int l = 0; l < L; l++) {
        assert_int_equal(trace_read_layer(tr, l, q, k, v, &err), 0);
        const float *got[3] = {q, k, v}, *want[3] = {s.q[l], s.k[l], s.v[l]};
        size_t len[3] = {q_len(), kv_len(), kv_len()};
        for (int a = 0; a < 3; a++) {
            float *rounded = kv_malloc(len[a] * sizeof(float));
            memcpy(rounded, want[a], len[a] * sizeof(float));
            trace_round_to_dtype(rounded, len[a], TRACE_F16);
            for (size_t i = 0; i < len[a]; i++) {
                double tol = fabs(want[a][i]) * ldexp(1.0, -11) + ldexp(1.0, -25);
                assert_true(fabs((double)got[a][i] - want[a][i]) <= tol);
                assert_true(got[a][i] == rounded[i]); /* the reader and the helper agree */
            }
            free(rounded);
        }
        /* attention rows are float32 whatever the Q/K/V precision */
        assert_int_equal(trace_read_attn_rows(tr, l, rows, &err), 0);
        assert_memory_equal(rows, s.rows[l], (size_t)HQ * 2 * T * sizeof(float));
    }
    assert_int_equal(trace_read_layer(tr, 0, q, k, NULL, &err), 0);
    assert_true(q[0] != 0.1f && fabsf(q[0] - 0.1f) < 1e-4f);
    assert_true(q[1] == 1.25f);
    assert_true(k[0] == -2048.0f);
    free(q);
    free(k);
    free(v);
    free(rows);
    trace_close(tr);
    sample_free(&s);
    scratch_remove(dir);
}

static void test_roundtrip_empty_needles_probes_rows(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "empty.h5", 0);
    Sample s;
    sample_init(&s, 0, 0, 0, 13);
    s.meta.rope_scaling[0] = '\0';
    /* P = T: no decode steps is allowed (one prefill span, which sets n_prompt) */
    trace_meta_set_spans(&s.meta, 1, &(TraceSpan){SPAN_PREFILL, 0, T});
    assert_int_equal(s.meta.n_prompt, T);
    sample_write(&s, path, TRACE_F32);
    Trace *tr = open_ok(path);
    const TraceMeta *m = trace_meta(tr);
    assert_meta_equal(m, &s.meta);
    assert_int_equal(m->n_needles, 0);
    assert_int_equal(m->n_probes, 0);
    assert_int_equal(m->n_attn_rows, 0);
    assert_string_equal(m->rope_scaling, "");
    float rows[1];
    KvErr err;
    assert_int_equal(trace_read_attn_rows(tr, 0, rows, &err), -1);
    assert_non_null(strstr(err.msg, "no attention rows"));
    trace_close(tr);
    sample_free(&s);
    scratch_remove(dir);
}

typedef struct {
    Trace *tr;
    int first_layer;
    int ok;
    float *q[6], *k[6], *v[6];
} ReaderJob;

static void *read_all_layers(void *arg)
{
    ReaderJob *job = arg;
    const TraceMeta *m = trace_meta(job->tr);
    job->ok = 1;
    for (int i = 0; i < m->n_layers; i++) {
        int l = (job->first_layer + i) % m->n_layers;
        KvErr err;
        if (trace_read_layer(job->tr, l, job->q[l], job->k[l], job->v[l], &err) != 0)
            job->ok = 0;
    }
    return NULL;
}

/* Four threads read every layer of one open Trace at once, each starting at another layer. */
static void test_concurrent_reads_agree(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "mt.h5", 0);
    Sample s;
    sample_init(&s, 1, 1, 0, 14);
    sample_write(&s, path, TRACE_F16);
    Trace *tr = open_ok(path);
    enum { THREADS = 4 };
    ReaderJob jobs[THREADS];
    pthread_t tid[THREADS];
    for (int j = 0; j < THREADS; j++) {
        jobs[j] = (ReaderJob){.tr = tr, .first_layer = j};
        for (int l = 0; l < L; l++) {
            jobs[j].q[l] = kv_malloc(q_len() * sizeof(float));
            jobs[j].k[l] = kv_malloc(kv_len() * sizeof(float));
            jobs[j].v[l] = kv_malloc(kv_len() * sizeof(float));
        }
        assert_int_equal(pthread_create(&tid[j], NULL, read_all_layers, &jobs[j]), 0);
    }
    for (int j = 0; j < THREADS; j++)
        pthread_join(tid[j], NULL);
    float *q = kv_malloc(q_len() * sizeof(float)), *k = kv_malloc(kv_len() * sizeof(float)),
          *v = kv_malloc(kv_len() * sizeof(float));
    for (int l = 0; l < L; l++) {
        KvErr err;
        assert_int_equal(trace_read_layer(tr, l, q, k, v, &err), 0);
        for (int j = 0; j < THREADS; j++) {
            assert_true(jobs[j].ok);
            assert_memory_equal(jobs[j].q[l], q, q_len() * sizeof(float));
            assert_memory_equal(jobs[j].k[l], k, kv_len() * sizeof(float));
            assert_memory_equal(jobs[j].v[l], v, kv_len() * sizeof(float));
        }
    }
    for (int j = 0; j < THREADS; j++)
        for (int l = 0; l < L; l++) {
            free(jobs[j].q[l]);
            free(jobs[j].k[l]);
            free(jobs[j].v[l]);
        }
    free(q);
    free(k);
    free(v);
    trace_close(tr);
    sample_free(&s);
    scratch_remove(dir);
}

/* ---- Validation: write a good trace, break one thing with the HDF5 API, expect the message ---- */

typedef void (*Breaker)(hid_t file);

static void set_int_attr(hid_t file, const char *name, int value)
{
    if (H5Aexists(file, name) > 0)
        H5Adelete(file, name);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    long long v = value;
    assert_true(H5Awrite(a, H5T_NATIVE_LLONG, &v) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
}

static void set_string_attr(hid_t file, const char *name, const char *value, int variable)
{
    if (H5Aexists(file, name) > 0)
        H5Adelete(file, name);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, variable ? H5T_VARIABLE : strlen(value) + 1);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(H5Awrite(a, type, variable ? (const void *)&value : (const void *)value) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(type);
}

static void replace_int_dataset(hid_t file, const char *name, int rank, const hsize_t *dims,
                                const int32_t *data)
{
    if (H5Lexists(file, name, H5P_DEFAULT) > 0)
        assert_true(H5Ldelete(file, name, H5P_DEFAULT) >= 0);
    hid_t sp = H5Screate_simple(rank, dims, NULL);
    hid_t ds = H5Dcreate2(file, name, H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(ds >= 0);
    assert_true(H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    H5Dclose(ds);
    H5Sclose(sp);
}

static void break_format(hid_t f) { set_string_attr(f, "format", "other-trace", 0); }
static void break_version(hid_t f) { set_int_attr(f, "version", 3); }
static void break_version_zero(hid_t f) { set_int_attr(f, "version", 0); }
static void break_missing_attr(hid_t f) { assert_true(H5Adelete(f, "head_dim") >= 0); }
static void break_missing_v(hid_t f) { assert_true(H5Ldelete(f, "/layers/002/v", H5P_DEFAULT) >= 0); }
static void break_missing_layer(hid_t f) { assert_true(H5Ldelete(f, "/layers/001", H5P_DEFAULT) >= 0); }
static void break_kv_heads(hid_t f) { set_int_attr(f, "n_kv_heads", 3); }
static void break_prompt(hid_t f) { set_int_attr(f, "n_prompt", T + 1); }
static void break_odd_head_dim(hid_t f) { set_int_attr(f, "head_dim", 7); }
static void break_layout(hid_t f) { set_string_attr(f, "rope_layout", "spiral", 0); }
static void break_zero_layers(hid_t f) { set_int_attr(f, "n_layers", 0); }
static void break_negative_tokens(hid_t f) { set_int_attr(f, "n_tokens", -37); }

static void break_wide_prompt(hid_t f)
{
    H5Adelete(f, "n_prompt");
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "n_prompt", H5T_STD_U64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    unsigned long long v = (1ULL << 63) + 5;
    assert_true(H5Awrite(a, H5T_NATIVE_ULLONG, &v) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
}

static void break_attr_type(hid_t f)
{
    set_string_attr(f, "n_layers", "3", 0);
}

static void break_float_attr_type(hid_t f)
{
    set_int_attr(f, "attn_scale", 1);
}

static void break_shape(hid_t f)
{
    assert_true(H5Ldelete(f, "/layers/001/k", H5P_DEFAULT) >= 0);
    hsize_t dims[3] = {HKV, T, D / 2};
    hid_t sp = H5Screate_simple(3, dims, NULL);
    hid_t ds = H5Dcreate2(f, "/layers/001/k", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(ds >= 0);
    H5Dclose(ds);
    H5Sclose(sp);
}

static void break_dtype(hid_t f)
{
    assert_true(H5Ldelete(f, "/layers/002/q", H5P_DEFAULT) >= 0);
    hsize_t dims[3] = {HQ, T, D};
    hid_t sp = H5Screate_simple(3, dims, NULL);
    hid_t ds = H5Dcreate2(f, "/layers/002/q", H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(ds >= 0);
    H5Dclose(ds);
    H5Sclose(sp);
}

static void break_needle(hid_t f)
{
    hsize_t dims[2] = {2, 2};
    int32_t spans[4] = {1, 3, 30, T + 5};
    replace_int_dataset(f, "/needles", 2, dims, spans);
}

static void break_empty_needle(hid_t f)
{
    hsize_t dims[2] = {1, 2};
    int32_t spans[2] = {9, 9};
    replace_int_dataset(f, "/needles", 2, dims, spans);
}

static void break_probe(hid_t f)
{
    hsize_t dims[1] = {2};
    int32_t probes[2] = {P, T};
    replace_int_dataset(f, "/probes", 1, dims, probes);
}

static void break_positions(hid_t f)
{
    hsize_t dims[1] = {T};
    int32_t pos[T];
    for (int t = 0; t < T; t++)
        pos[t] = t == 20 ? 5 : t;
    replace_int_dataset(f, "/positions", 1, dims, pos);
}

static void break_segments_length(hid_t f)
{
    hsize_t dims[1] = {T - 1};
    int32_t seg[T] = {0};
    replace_int_dataset(f, "/segments", 1, dims, seg);
}

static void break_rows_order(hid_t f)
{
    hsize_t dims[1] = {3};
    int32_t at[3] = {P, P - 2, T - 1};
    replace_int_dataset(f, "/attn_rows_at", 1, dims, at);
}

static void break_rows_missing(hid_t f)
{
    assert_true(H5Ldelete(f, "/layers/001/attn_rows", H5P_DEFAULT) >= 0);
}

static void set_double_attr(hid_t file, const char *name, double value)
{
    if (H5Aexists(file, name) > 0)
        H5Adelete(file, name);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(H5Awrite(a, H5T_NATIVE_DOUBLE, &value) >= 0);
    H5Aclose(a);
    H5Sclose(sp);
}

/* A dataset of `type` on disk written from int64 values (HDF5 would clip them into int32). */
static void replace_wide_dataset(hid_t file, const char *name, hid_t type, hid_t mem_type,
                                 hsize_t n, const void *data)
{
    if (H5Lexists(file, name, H5P_DEFAULT) > 0)
        assert_true(H5Ldelete(file, name, H5P_DEFAULT) >= 0);
    hid_t sp = H5Screate_simple(1, &n, NULL);
    hid_t ds = H5Dcreate2(file, name, type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(ds >= 0);
    assert_true(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    H5Dclose(ds);
    H5Sclose(sp);
}

static void break_token_beyond_int32(hid_t f)
{
    int64_t tokens[T];
    for (int t = 0; t < T; t++)
        tokens[t] = t == 5 ? (int64_t)1 << 33 : 1000 + t; /* 2^33 read as INT32_MAX before */
    replace_wide_dataset(f, "/tokens", H5T_STD_I64LE, H5T_NATIVE_INT64, T, tokens);
}

static void break_position_beyond_int32(hid_t f)
{
    uint32_t pos[T];
    for (int t = 0; t < T; t++)
        pos[t] = t < T - 1 ? (uint32_t)t : 3000000000u;
    replace_wide_dataset(f, "/positions", H5T_STD_U32LE, H5T_NATIVE_UINT32, T, pos);
}

static void break_attn_scale_float32(hid_t f) { set_double_attr(f, "attn_scale", 1e300); }
static void break_attn_scale_tiny(hid_t f) { set_double_attr(f, "attn_scale", 1e-300); }
static void break_rope_attention_factor(hid_t f) { set_double_attr(f, "rope_attention_factor", -2); }
static void break_attn_softcap(hid_t f) { set_double_attr(f, "attn_softcap", -1); }

/* /rope_inv_freq [L][D/2] with `bad` at layer 1, pair 0. */
static void replace_freq(hid_t f, double bad)
{
    double freq[L][D / 2];
    for (int l = 0; l < L; l++)
        for (int i = 0; i < D / 2; i++)
            freq[l][i] = 1.0 / (1 + i);
    freq[1][0] = bad;
    if (H5Lexists(f, "/rope_inv_freq", H5P_DEFAULT) > 0)
        assert_true(H5Ldelete(f, "/rope_inv_freq", H5P_DEFAULT) >= 0);
    hsize_t dims[2] = {L, D / 2};
    hid_t sp = H5Screate_simple(2, dims, NULL);
    hid_t ds = H5Dcreate2(f, "/rope_inv_freq", H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT,
                          H5P_DEFAULT);
    assert_true(ds >= 0);
    assert_true(H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, freq) >= 0);
    H5Dclose(ds);
    H5Sclose(sp);
}

static void break_rope_angles(hid_t f) { replace_freq(f, 1e307); /* x position 75 = inf */ }
static void break_rope_negative(hid_t f) { replace_freq(f, -0.5); }
static void break_rope_nan(hid_t f) { replace_freq(f, NAN); }
static void break_rope_v1_shape(hid_t f)
{
    double freq[D / 2] = {1.0, 0.5, 0.25, 0.125}; /* version 1's shape in a version 2 trace */
    replace_wide_dataset(f, "/rope_inv_freq", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, D / 2, freq);
}

/* ---- Version 2's per-layer geometry, spans and model dimensions ---- */

static void replace_spans(hid_t f, int n, const int32_t *rows)
{
    hsize_t dims[2] = {(hsize_t)n, 3};
    replace_int_dataset(f, "/spans", 2, dims, rows);
}

static void break_spans_gap(hid_t f)
{
    const int32_t rows[] = {0, 0, P, 1, P + 1, T}; /* decode starts at P+1 */
    replace_spans(f, 2, rows);
}
static void break_spans_overlap(hid_t f)
{
    const int32_t rows[] = {0, 0, P, 1, P - 2, T};
    replace_spans(f, 2, rows);
}
static void break_spans_kind(hid_t f)
{
    const int32_t rows[] = {0, 0, P, 7, P, T};
    replace_spans(f, 2, rows);
}
static void break_spans_first_decode(hid_t f)
{
    const int32_t rows[] = {1, 0, P, 1, P, T};
    replace_spans(f, 2, rows);
}
static void break_spans_short(hid_t f)
{
    const int32_t rows[] = {0, 0, P, 1, P, T - 1}; /* token T-1 in no span */
    replace_spans(f, 2, rows);
}
static void break_spans_beyond(hid_t f)
{
    const int32_t rows[] = {0, 0, P, 1, P, T + 4};
    replace_spans(f, 2, rows);
}
static void break_spans_empty(hid_t f)
{
    const int32_t rows[] = {0, 0, P, 1, P, P, 1, P, T}; /* an empty decode run */
    replace_spans(f, 3, rows);
}
static void break_spans_prompt(hid_t f)
{
    const int32_t rows[] = {0, 0, P - 4, 1, P - 4, T}; /* n_prompt says P */
    replace_spans(f, 2, rows);
}
static void break_spans_none(hid_t f) { replace_spans(f, 0, NULL); }
static void break_spans_missing(hid_t f) { assert_true(H5Ldelete(f, "/spans", H5P_DEFAULT) >= 0); }
static void break_spans_shape(hid_t f)
{
    const int32_t rows[] = {0, 0, 1, P, 1, T};
    hsize_t dims[2] = {3, 2};
    replace_int_dataset(f, "/spans", 2, dims, rows);
}
static void break_window_negative(hid_t f)
{
    const int32_t w[L] = {0, -3, 16};
    hsize_t n = L;
    replace_int_dataset(f, "/window", 1, &n, w);
}
static void break_window_shape(hid_t f)
{
    const int32_t w[2] = {0, 16};
    hsize_t n = 2;
    replace_int_dataset(f, "/window", 1, &n, w);
}
static void break_window_missing(hid_t f) { assert_true(H5Ldelete(f, "/window", H5P_DEFAULT) >= 0); }
static void break_hidden_negative(hid_t f) { set_int_attr(f, "hidden_size", -1); }
static void break_params_negative(hid_t f) { set_int_attr(f, "n_params", -7); }
static void break_vocab_missing(hid_t f) { assert_true(H5Adelete(f, "vocab_size") >= 0); }
static void break_intermediate_type(hid_t f) { set_double_attr(f, "intermediate_size", 1.5); }

static void break_layout_newline(hid_t f) { set_string_attr(f, "rope_layout", "half\n2nd line", 0); }
static void break_format_newline(hid_t f) { set_string_attr(f, "format", "kvsim-trace\r\n", 1); }

/* /layers/000/k as a virtual dataset mapping another file: HDF5 would open that file (a FIFO
 * there blocks for ever). */
static void break_virtual(hid_t f)
{
    assert_true(H5Ldelete(f, "/layers/000/k", H5P_DEFAULT) >= 0);
    hsize_t dims[3] = {HKV, T, D};
    hid_t sp = H5Screate_simple(3, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    assert_true(H5Pset_virtual(dcpl, sp, "elsewhere.h5", "/k", sp) >= 0);
    hid_t ds = H5Dcreate2(f, "/layers/000/k", H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(ds >= 0);
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(sp);
}

/* Writes a good trace, applies `breaker`, and returns trace_open's message (static). */
static const char *open_broken(Breaker breaker, const char *dir)
{
    static char msg[1024];
    const char *path = scratch_path(dir, "bad.h5", 0);
    Sample s;
    sample_init(&s, 2, 2, 3, 21);
    sample_write(&s, path, TRACE_F32);
    sample_free(&s);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    breaker(f);
    assert_true(H5Fclose(f) >= 0);
    KvErr err = {{0}};
    Trace *tr = trace_open(path, &err);
    if (tr)
        fail_msg("a broken trace opened");
    snprintf(msg, sizeof msg, "%s", err.msg);
    /* One line, starting with the file's name. */
    assert_null(strchr(msg, '\n'));
    assert_int_equal(strncmp(msg, path, strlen(path)), 0);
    unlink(path);
    return msg;
}

static void expect_broken(Breaker breaker, const char *needle1, const char *needle2)
{
    char *dir = scratch_create();
    const char *msg = open_broken(breaker, dir);
    if (!strstr(msg, needle1) || (needle2 && !strstr(msg, needle2)))
        fail_msg("message \"%s\" lacks \"%s\" / \"%s\"", msg, needle1, needle2 ? needle2 : "");
    scratch_remove(dir);
}

static void test_rejects_wrong_format(void **state)
{
    (void)state;
    expect_broken(break_format, "attribute format", "other-trace");
}

static void test_rejects_wrong_version(void **state)
{
    (void)state;
    expect_broken(break_version, "attribute version", "expected 1 to 2, found 3");
    expect_broken(break_version_zero, "attribute version", "expected 1 to 2, found 0");
}

static void test_rejects_missing_attribute(void **state)
{
    (void)state;
    expect_broken(break_missing_attr, "attribute head_dim", "missing");
}

static void test_rejects_bad_attribute_values(void **state)
{
    (void)state;
    expect_broken(break_kv_heads, "attribute n_kv_heads", "found 3");
    expect_broken(break_prompt, "attribute n_prompt", NULL);
    expect_broken(break_odd_head_dim, "attribute head_dim", "even");
    expect_broken(break_layout, "attribute rope_layout", "spiral");
    expect_broken(break_attr_type, "attribute n_layers", "expected integer, found string");
    expect_broken(break_float_attr_type, "attribute attn_scale", "expected float, found integer");
    expect_broken(break_zero_layers, "attribute n_layers", "expected >= 1, found 0");
    expect_broken(break_negative_tokens, "attribute n_tokens", "expected >= 1, found -37");
    expect_broken(break_wide_prompt, "attribute n_prompt",
                  "expected a 32-bit integer, found 9223372036854775813");
}

static void test_rejects_missing_layer_dataset(void **state)
{
    (void)state;
    expect_broken(break_missing_v, "dataset /layers/002/v", "missing");
    expect_broken(break_missing_layer, "dataset /layers/001/q", "missing");
    expect_broken(break_rows_missing, "dataset /layers/001/attn_rows", "missing");
}

static void test_rejects_wrong_shape_and_type(void **state)
{
    (void)state;
    char *dir = scratch_create();
    char want[256];
    snprintf(want, sizeof want, "dataset /layers/001/k: expected shape [%d,%d,%d], found [%d,%d,%d]",
             HKV, T, D, HKV, T, D / 2);
    const char *msg = open_broken(break_shape, dir);
    if (!strstr(msg, want))
        fail_msg("message \"%s\" lacks \"%s\"", msg, want);
    scratch_remove(dir);
    expect_broken(break_dtype, "dataset /layers/002/q", "float16 or float32");
    expect_broken(break_segments_length, "dataset /segments", "expected shape [37], found [36]");
}

static void test_rejects_bad_metadata_values(void **state)
{
    (void)state;
    expect_broken(break_needle, "dataset /needles", "span 1 is [30,42)");
    expect_broken(break_empty_needle, "dataset /needles", "span 0 is [9,9)");
    expect_broken(break_probe, "dataset /probes", "probe 1 is 37");
    expect_broken(break_positions, "dataset /positions", "token 20");
    expect_broken(break_rows_order, "dataset /attn_rows_at", "row 1");
}

static void test_rejects_out_of_range_values(void **state)
{
    (void)state;
    expect_broken(break_token_beyond_int32, "dataset /tokens: element 5 is 8589934592, expected a "
                                            "32-bit integer", NULL);
    expect_broken(break_position_beyond_int32, "dataset /positions: element 36 is 3000000000",
                  "32-bit integer");
    expect_broken(break_attn_scale_float32, "attribute attn_scale: expected a finite value > 0 "
                                            "within float32 range", "found 1e+300");
    expect_broken(break_attn_scale_tiny, "attribute attn_scale", "found 1e-300");
    expect_broken(break_rope_attention_factor, "attribute rope_attention_factor",
                  "expected a finite value > 0, found -2");
    expect_broken(break_attn_softcap, "attribute attn_softcap: expected 0 (none) or a finite "
                                      "value > 0", "found -1");
    expect_broken(break_rope_angles, "dataset /rope_inv_freq: layer 1 element 0 is 1e+307",
                  "position 75");
    expect_broken(break_rope_negative, "dataset /rope_inv_freq: layer 1 element 0 is -0.5",
                  "expected a finite value > 0");
    expect_broken(break_rope_nan, "dataset /rope_inv_freq: layer 1 element 0 is nan",
                  "expected a finite value > 0");
    expect_broken(break_rope_v1_shape, "dataset /rope_inv_freq: expected shape [3,4], found [4]",
                  NULL);
}

/* Version 2: spans in order, covering [0, T), a prefill span first ending at n_prompt, kinds
 * valid; windows >= 0, one per layer; model dimensions >= 0. Each refused with its message. */
static void test_rejects_bad_v2_geometry(void **state)
{
    (void)state;
    expect_broken(break_spans_gap, "dataset /spans: span 1 is [31,37), expected [30,end)",
                  "without gaps");
    expect_broken(break_spans_overlap, "dataset /spans: span 1 is [28,37), expected [30,end)",
                  NULL);
    expect_broken(break_spans_kind, "dataset /spans: span 1 has kind 7, expected 0 (prefill) "
                  "or 1 (decode)", NULL);
    expect_broken(break_spans_first_decode, "dataset /spans: span 0 is a decode run, expected "
                  "the prompt's prefill span first", NULL);
    expect_broken(break_spans_short, "dataset /spans: the spans end at 36, expected them to "
                  "cover [0,37)", NULL);
    expect_broken(break_spans_beyond, "dataset /spans: span 1 is [30,41)", "<= n_tokens = 37");
    expect_broken(break_spans_empty, "dataset /spans: span 1 is [30,30)", NULL);
    expect_broken(break_spans_prompt, "dataset /spans: the first span ends at 26, expected "
                  "n_prompt = 30", NULL);
    expect_broken(break_spans_none, "dataset /spans: expected at least one span, found none",
                  NULL);
    expect_broken(break_spans_missing, "dataset /spans: missing", NULL);
    expect_broken(break_spans_shape, "dataset /spans: expected shape [*,3], found [3,2]", NULL);
    expect_broken(break_window_negative, "dataset /window: layer 1 has window -3, expected >= 0 "
                  "(0 = global)", NULL);
    expect_broken(break_window_shape, "dataset /window: expected shape [3], found [2]", NULL);
    expect_broken(break_window_missing, "dataset /window: missing", NULL);
    expect_broken(break_hidden_negative, "attribute hidden_size: expected >= 0 (0 = unknown), "
                  "found -1", NULL);
    expect_broken(break_params_negative, "attribute n_params: expected >= 0 (0 = unknown), "
                  "found -7", NULL);
    expect_broken(break_vocab_missing, "attribute vocab_size: missing", NULL);
    expect_broken(break_intermediate_type, "attribute intermediate_size: expected integer, "
                  "found float", NULL);
}

/* The committed version 1 trace (tests/inputs/trace/README.md) reads as one prefill span and
 * one decode run, every layer global with the one row of RoPE frequencies it stores, the model's
 * size unknown; written again (by the version 2 writer) it reads back the same. */
static void test_reads_version1(void **state)
{
    (void)state;
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/inputs/trace/version1.h5", src);
    Trace *tr = open_ok(path);
    const TraceMeta *m = trace_meta(tr);
    assert_int_equal(m->version, 1);
    assert_int_equal(m->n_layers, 2);
    assert_int_equal(m->n_tokens, 128);
    assert_int_equal(m->n_prompt, 96);
    assert_int_equal(m->n_spans, 2);
    assert_int_equal(m->spans[0].kind, SPAN_PREFILL);
    assert_int_equal(m->spans[0].start, 0);
    assert_int_equal(m->spans[0].end, 96);
    assert_int_equal(m->spans[1].kind, SPAN_DECODE);
    assert_int_equal(m->spans[1].start, 96);
    assert_int_equal(m->spans[1].end, 128);
    assert_int_equal(m->hidden_size, 0);
    assert_int_equal(m->intermediate_size, 0);
    assert_int_equal(m->vocab_size, 0);
    assert_true(m->n_params == 0);
    double want[8];
    rope_default_inv_freq(10000.0, 16, want);
    for (int l = 0; l < m->n_layers; l++) {
        LayerGeometry g = trace_layer_geometry(m, l);
        assert_int_equal(g.window, 0);
        assert_true(g.attn_scale == 0.25);
        assert_true(m->rope_attention_factor == 1.0); /* written before the attribute existed */
        assert_true(m->attn_softcap == 0); /* likewise: no soft-capping */
        for (int f = 0; f < 8; f++)
            assert_float_equal(g.rope_inv_freq[f], want[f], 1e-15);
    }

    char *dir = scratch_create();
    const char *again = scratch_path(dir, "v2.h5", 0);
    KvErr err;
    TraceWriter *w = trace_writer_create(again, m, trace_dtype(tr), &err);
    if (!w)
        fail_msg("%s", err.msg);
    size_t T1 = (size_t)m->n_tokens, D1 = (size_t)m->head_dim;
    float *q = kv_malloc((size_t)m->n_q_heads * T1 * D1 * sizeof(float));
    float *k = kv_malloc((size_t)m->n_kv_heads * T1 * D1 * sizeof(float));
    float *v = kv_malloc((size_t)m->n_kv_heads * T1 * D1 * sizeof(float));
    float *rows = kv_malloc((size_t)m->n_q_heads * m->n_attn_rows * T1 * sizeof(float));
    float *row = kv_malloc((size_t)m->n_q_heads * T1 * sizeof(float));
    for (int l = 0; l < m->n_layers; l++) {
        assert_int_equal(trace_read_layer(tr, l, q, k, v, &err), 0);
        assert_int_equal(trace_writer_put_qkv(w, l, 0, m->n_tokens, q, k, v, &err), 0);
        assert_int_equal(trace_read_attn_rows(tr, l, rows, &err), 0);
        for (int r = 0; r < m->n_attn_rows; r++) {
            for (int h = 0; h < m->n_q_heads; h++)
                memcpy(row + (size_t)h * T1, rows + ((size_t)h * m->n_attn_rows + r) * T1,
                       T1 * sizeof(float));
            assert_int_equal(trace_writer_put_attn_row(w, l, r, row, &err), 0);
        }
    }
    assert_int_equal(trace_writer_finish(w, &err), 0);
    Trace *tr2 = open_ok(again);
    const TraceMeta *m2 = trace_meta(tr2);
    assert_int_equal(m2->version, TRACE_VERSION);
    TraceMeta as_read = *m;
    as_read.version = TRACE_VERSION; /* everything else the same */
    assert_meta_equal(m2, &as_read);
    trace_close(tr2);
    free(q);
    free(k);
    free(v);
    free(rows);
    free(row);
    trace_close(tr);
    scratch_remove(dir);
}

/* Strings from the file are escaped in messages: always one line (open_broken checks). */
static void test_messages_escape_file_strings(void **state)
{
    (void)state;
    expect_broken(break_layout_newline, "attribute rope_layout", "found \"half\\n2nd line\"");
    expect_broken(break_format_newline, "attribute format", "found \"kvsim-trace\\x0d\\n\"");
}

static void test_rejects_storage_outside_the_file(void **state)
{
    (void)state;
    expect_broken(break_virtual, "dataset /layers/000/k", "virtual");
}

/* A trace cut short (a partial copy, a full disk elsewhere): refused at open, one line. */
static void test_rejects_truncated_file(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "cut.h5", 0);
    Sample s;
    sample_init(&s, 2, 2, 3, 22);
    sample_write(&s, path, TRACE_F32);
    sample_free(&s);
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    const long cuts[] = {size - 1, size / 2, 3000, 100};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        assert_int_equal(truncate(path, cuts[i]), 0);
        KvErr err = {{0}};
        assert_null(trace_open(path, &err));
        assert_null(strchr(err.msg, '\n'));
        assert_int_equal(strncmp(err.msg, path, strlen(path)), 0);
        if (!strstr(err.msg, "truncated") && !strstr(err.msg, "not an HDF5 file"))
            fail_msg("cut at %ld: %s", cuts[i], err.msg);
    }
    scratch_remove(dir);
}

/* One flipped byte each (tests/inputs/trace/README.md): sizes HDF5 1.10 trusted and copied
 * past its buffers with, or spent minutes on. */
static void test_rejects_flipped_bytes(void **state)
{
    (void)state;
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    static const struct {
        const char *file, *fragment;
    } cases[] = {
        {"q-chunk-size.h5", "dataset /layers/000/q: stores 1279 bytes, expected whole chunks"},
        {"k-chunk-size.h5", "dataset /layers/000/k: stores 639 bytes, expected whole chunks"},
        {"q-chunk-shape.h5", "dataset /layers/000/q: stores 1280 bytes, expected whole chunks of 19760"},
        {"tokens-type-size.h5", "dataset /tokens: shape [20] of 4278190084-byte values holds more data"},
    };
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/inputs/trace/intact.h5", src);
    trace_close(open_ok(path));
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(path, sizeof path, "%s/tests/inputs/trace/%s", src, cases[i].file);
        KvErr err = {{0}};
        Trace *tr = trace_open(path, &err);
        if (tr)
            fail_msg("%s opened", cases[i].file);
        if (strchr(err.msg, '\n') || strncmp(err.msg, path, strlen(path)) != 0 ||
            !strstr(err.msg, cases[i].fragment))
            fail_msg("%s: \"%s\" lacks \"%s\"", cases[i].file, err.msg, cases[i].fragment);
    }
}

static void test_rejects_missing_and_non_hdf5_files(void **state)
{
    (void)state;
    char *dir = scratch_create();
    KvErr err;
    const char *missing = scratch_path(dir, "nope.h5", 0);
    assert_null(trace_open(missing, &err));
    assert_non_null(strstr(err.msg, missing));
    assert_non_null(strstr(err.msg, "cannot open"));
    const char *text = scratch_path(dir, "text.h5", 1);
    FILE *f = fopen(text, "w");
    fputs("not a trace\n", f);
    fclose(f);
    assert_null(trace_open(text, &err));
    assert_non_null(strstr(err.msg, "not an HDF5 file"));
    scratch_remove(dir);
}

/* What the format leaves to writers: variable-length strings, no /rope_inv_freq, any integer
 * width, null dataspaces for empty arrays. */
static void test_accepts_format_variants(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "variant.h5", 0);
    Sample s;
    sample_init(&s, 1, 1, 0, 31);
    sample_write(&s, path, TRACE_F32);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    set_string_attr(f, "model", "vlen-model", 1);
    set_int_attr(f, "n_layers", L); /* 64-bit on disk */
    assert_true(H5Ldelete(f, "/rope_inv_freq", H5P_DEFAULT) >= 0);
    assert_true(H5Ldelete(f, "/needles", H5P_DEFAULT) >= 0);
    hid_t null_space = H5Screate(H5S_NULL);
    hid_t ds = H5Dcreate2(f, "/needles", H5T_STD_I32LE, null_space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dclose(ds);
    H5Sclose(null_space);
    /* A space-padded fixed-length string (Fortran's habit). */
    H5Adelete(f, "rope_layout");
    hid_t str = H5Tcopy(H5T_C_S1), scalar = H5Screate(H5S_SCALAR);
    H5Tset_size(str, 16);
    H5Tset_strpad(str, H5T_STR_SPACEPAD);
    hid_t a = H5Acreate2(f, "rope_layout", str, scalar, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(H5Awrite(a, str, "interleaved     ") >= 0);
    H5Aclose(a);
    H5Sclose(scalar);
    H5Tclose(str);
    /* Compressed positions, 64-bit on disk. */
    assert_true(H5Ldelete(f, "/positions", H5P_DEFAULT) >= 0);
    hsize_t n = T, chunk = 8;
    int64_t pos[T];
    for (int t = 0; t < T; t++)
        pos[t] = s.meta.positions[t];
    hid_t sp = H5Screate_simple(1, &n, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, &chunk);
    H5Pset_deflate(dcpl, 6);
    ds = H5Dcreate2(f, "/positions", H5T_STD_I64BE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(H5Dwrite(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, pos) >= 0);
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(sp);
    H5Fclose(f);
    Trace *tr = open_ok(path);
    const TraceMeta *m = trace_meta(tr);
    assert_string_equal(m->model, "vlen-model");
    assert_int_equal(m->rope_layout, ROPE_INTERLEAVED);
    assert_memory_equal(m->positions, s.meta.positions, sizeof(int32_t) * T);
    assert_int_equal(m->n_layers, L);
    assert_int_equal(m->n_needles, 0);
    for (int fi = 0; fi < D / 2; fi++)
        assert_true(fabs(m->rope_inv_freq[fi] - pow(500000.0, -2.0 * fi / D)) < 1e-15);
    trace_close(tr);
    sample_free(&s);
    scratch_remove(dir);
}

/* ---- float16 conversion, against HDF5's own (slow) converter as the reference ---- */

static hid_t reference_half(void)
{
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    H5Tset_fields(t, 15, 10, 5, 0, 10);
    H5Tset_size(t, 2);
    H5Tset_precision(t, 16);
    H5Tset_offset(t, 0);
    H5Tset_ebias(t, 15);
    return t;
}

/* Every finite half value survives float -> half -> float unchanged, and equals HDF5's
 * widening of the same bit pattern; values between two halves round to the nearer one. */
static void test_half_conversion_matches_hdf5(void **state)
{
    (void)state;
    hid_t half = reference_half();
    enum { N = 65536 };
    uint16_t *bits = kv_malloc(N * sizeof(float));
    for (int i = 0; i < N; i++)
        bits[i] = (uint16_t)i;
    float *wide = (float *)(void *)bits; /* H5Tconvert works in place, widening */
    assert_true(H5Tconvert(half, H5T_NATIVE_FLOAT, N, wide, NULL, H5P_DEFAULT) >= 0);
    int finite = 0;
    for (int i = 0; i < N; i++) {
        if (!isfinite(wide[i]))
            continue;
        float x = wide[i];
        trace_round_to_dtype(&x, 1, TRACE_F16);
        assert_true(x == wide[i] && signbit(x) == signbit(wide[i]));
        finite++;
    }
    assert_int_equal(finite, 65536 - 2 * 1024); /* all but exponent 31 */

    /* Random floats across the half range, subnormals included: the result is one of the two
     * neighbouring halves and never the farther one. */
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 5);
    for (int i = 0; i < 20000; i++) {
        double mag = ldexp(1.0 + gsl_rng_uniform(rng), (int)gsl_rng_uniform_int(rng, 41) - 26);
        float x = (float)(gsl_rng_uniform(rng) < 0.5 ? -mag : mag), r = x;
        trace_round_to_dtype(&r, 1, TRACE_F16);
        /* the spacing of halves around x */
        int e;
        frexp(fabs(x), &e);
        double ulp = ldexp(1.0, (e - 1 < -14 ? -14 : e - 1) - 10);
        assert_true(fabs((double)r - x) <= ulp / 2);
        assert_true(fabs(r / ulp - nearbyint(r / ulp)) == 0); /* r is on the half grid */
    }
    /* Ties go to the even neighbour: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10. */
    float tie_down = 1.0f + 0x1p-11f, tie_up = 1.0f + 3 * 0x1p-11f;
    trace_round_to_dtype(&tie_down, 1, TRACE_F16);
    trace_round_to_dtype(&tie_up, 1, TRACE_F16);
    assert_true(tie_down == 1.0f);
    assert_true(tie_up == 1.0f + 0x1p-9f);
    gsl_rng_free(rng);
    free(bits);
    H5Tclose(half);
}

static void test_writer_rejects_unrepresentable_values(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "range.h5", 0);
    Sample s;
    sample_init(&s, 0, 0, 0, 51);
    KvErr err;
    TraceWriter *w = trace_writer_create(path, &s.meta, TRACE_F16, &err);
    assert_non_null(w);
    s.k[1][(size_t)1 * T * D + 5 * D + 3] = 70000.0f; /* head 1, token 5 */
    float *q = token_slice(s.q[1], HQ, 0, T), *k = token_slice(s.k[1], HKV, 0, T);
    assert_int_equal(trace_writer_put_qkv(w, 1, 0, T, q, k, s.v[1], &err), -1);
    assert_non_null(strstr(err.msg, "layer 1 k: head 1 token 5 holds 70000"));
    trace_writer_abort(w);
    /* 65504 is the largest half and is accepted; NaN is refused in float32 too. */
    k[(size_t)1 * T * D + 5 * D + 3] = 65504.0f;
    w = trace_writer_create(path, &s.meta, TRACE_F32, &err);
    assert_int_equal(trace_writer_put_qkv(w, 1, 0, T, q, k, s.v[1], &err), 0);
    q[7] = NAN;
    assert_int_equal(trace_writer_put_qkv(w, 0, 0, T, q, k, s.v[1], &err), -1);
    assert_non_null(strstr(err.msg, "layer 0 q: head 0 token 0"));
    trace_writer_abort(w);
    assert_int_equal(scratch_count(dir), 0);
    free(q);
    free(k);
    sample_free(&s);
    scratch_remove(dir);
}

/* ---- Atomic output ---- */

static void test_writer_is_atomic(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "atomic.h5", 0);
    char tmp[8192];
    atomic_tmp_name(path, tmp, sizeof tmp);
    Sample s;
    sample_init(&s, 1, 1, 1, 41);
    KvErr err;

    TraceWriter *w = trace_writer_create(path, &s.meta, TRACE_F32, &err);
    assert_non_null(w);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(access(tmp, F_OK), 0);
    trace_writer_abort(w);
    assert_int_equal(scratch_count(dir), 0);

    /* An unfinished trace (a token never written) is refused and removed. */
    w = trace_writer_create(path, &s.meta, TRACE_F32, &err);
    for (int l = 0; l < L; l++) {
        put_range(w, &s, l, 0, 20);
        put_range(w, &s, l, 21, T - 21);
    }
    assert_int_equal(trace_writer_finish(w, &err), -1);
    assert_non_null(strstr(err.msg, "token 20 was never written"));
    assert_int_equal(scratch_count(dir), 0);

    /* An invalid header creates nothing. */
    s.meta.needles[1] = T + 1;
    assert_null(trace_writer_create(path, &s.meta, TRACE_F32, &err));
    assert_non_null(strstr(err.msg, "dataset /needles"));
    assert_int_equal(scratch_count(dir), 0);
    s.meta.needles[1] = s.meta.needles[0] + 1;

    sample_write(&s, path, TRACE_F32);
    assert_int_equal(access(path, F_OK), 0);
    assert_int_equal(access(tmp, F_OK), -1);
    assert_int_equal(scratch_count(dir), 1);
    sample_free(&s);
    scratch_remove(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_f32_exact),
        cmocka_unit_test(test_roundtrip_f16_within_half_precision),
        cmocka_unit_test(test_roundtrip_empty_needles_probes_rows),
        cmocka_unit_test(test_concurrent_reads_agree),
        cmocka_unit_test(test_rejects_wrong_format),
        cmocka_unit_test(test_rejects_wrong_version),
        cmocka_unit_test(test_rejects_bad_v2_geometry),
        cmocka_unit_test(test_reads_version1),
        cmocka_unit_test(test_rejects_missing_attribute),
        cmocka_unit_test(test_rejects_bad_attribute_values),
        cmocka_unit_test(test_rejects_missing_layer_dataset),
        cmocka_unit_test(test_rejects_wrong_shape_and_type),
        cmocka_unit_test(test_rejects_bad_metadata_values),
        cmocka_unit_test(test_rejects_out_of_range_values),
        cmocka_unit_test(test_messages_escape_file_strings),
        cmocka_unit_test(test_rejects_storage_outside_the_file),
        cmocka_unit_test(test_rejects_truncated_file),
        cmocka_unit_test(test_rejects_flipped_bytes),
        cmocka_unit_test(test_rejects_missing_and_non_hdf5_files),
        cmocka_unit_test(test_accepts_format_variants),
        cmocka_unit_test(test_half_conversion_matches_hdf5),
        cmocka_unit_test(test_writer_rejects_unrepresentable_values),
        cmocka_unit_test(test_writer_is_atomic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
