/* trace.c — the HDF5 reader and writer of kvsim traces, format v1 (docs/trace-format.md).
 *
 * The reader validates every attribute, every dataset's shape and type and the metadata values
 * on open, so that later reads can only fail on I/O. The writer validates the metadata with the
 * same code before creating anything, writes under a temporary name, and refuses to finish a
 * trace with unwritten tokens or rows. HDF5's own error stack printing is switched off in every
 * entry point (the stack is per thread in the thread-safe library): callers only ever see our
 * one-line messages. */
#include "sim/trace.h"

#include <errno.h>
#include <hdf5.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ANY_DIM ((hsize_t)-1)
#define CHUNK_TARGET_BYTES 65536
#define CHUNK_CACHE_SLOTS 10007 /* prime, so a row of chunks across heads never collides */

struct Trace {
    char path[4096];
    hid_t file;
    TraceMeta meta;
    TraceDtype dtype;
};

static void h5_quiet(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

/* IEEE binary16, little-endian, as an HDF5 type (HDF5 1.10 has no predefined one). Q/K/V are
 * moved through HDF5 as raw 16-bit patterns of this type and converted here: HDF5's own soft
 * float conversion costs about 100 ns per value, which would dominate reading a trace. */
static hid_t half_type(void)
{
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    H5Tset_fields(t, 15, 10, 5, 0, 10);
    H5Tset_size(t, 2);
    H5Tset_precision(t, 16);
    H5Tset_offset(t, 0);
    H5Tset_ebias(t, 15);
    return t;
}

/* Largest float32 (bit pattern) that rounds to a finite half: 65520 rounds to infinity. */
#define HALF_OVERFLOW_BITS 0x477ff000u

/* Round to nearest, ties to even; callers reject values that would overflow. */
static uint16_t half_from_float(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= HALF_OVERFLOW_BITS)
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below 2^-14: a half subnormal, in units of 2^-24 */
        if (ax < 0x33000000u)
            return (uint16_t)sign;
        uint32_t shift = 126 - (ax >> 23), mant = (ax & 0x7fffffu) | 0x800000u;
        uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), tie = 1u << (shift - 1);
        if (rem > tie || (rem == tie && (r & 1)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu; /* rebias 127 -> 15 */
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1)))
        r++; /* a carry out of the mantissa correctly bumps the exponent */
    return (uint16_t)(sign | r);
}

static float float_from_half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    float f;
    if (e == 0) {
        f = (float)m * 0x1p-24f;
        return sign ? -f : f;
    }
    x = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    memcpy(&f, &x, sizeof f);
    return f;
}

static void layer_name(char *buf, size_t n, int layer, const char *leaf)
{
    snprintf(buf, n, "/layers/%03d/%s", layer, leaf);
}

static void format_dims(char *buf, size_t n, int rank, const hsize_t *dims)
{
    size_t used = 0;
    used += (size_t)snprintf(buf + used, n - used, "[");
    for (int i = 0; i < rank && used < n; i++) {
        if (dims[i] == ANY_DIM)
            used += (size_t)snprintf(buf + used, n - used, "%s*", i ? "," : "");
        else
            used += (size_t)snprintf(buf + used, n - used, "%s%llu", i ? "," : "",
                                     (unsigned long long)dims[i]);
    }
    if (used < n)
        snprintf(buf + used, n - used, "]");
}

static const char *class_name(H5T_class_t c)
{
    switch (c) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "float";
    case H5T_STRING: return "string";
    case H5T_COMPOUND: return "compound";
    case H5T_ENUM: return "enum";
    case H5T_ARRAY: return "array";
    case H5T_VLEN: return "variable-length";
    default: return "other";
    }
}

/* True when every component of an absolute path exists (H5Lexists fails, rather than answering
 * no, when an intermediate group is missing). */
static bool path_exists(hid_t file, const char *path)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (H5Lexists(file, buf, H5P_DEFAULT) <= 0)
                return false;
            if (c == '\0')
                return true;
            *p = c;
        }
    }
}

/* 0 for a float32 type, 1 for float16 (IEEE layouts, either byte order), -1 otherwise. */
static int float_dtype(hid_t type, TraceDtype *out)
{
    if (H5Tget_class(type) != H5T_FLOAT)
        return -1;
    size_t spos, epos, esize, mpos, msize;
    if (H5Tget_fields(type, &spos, &epos, &esize, &mpos, &msize) < 0)
        return -1;
    size_t size = H5Tget_size(type), ebias = H5Tget_ebias(type);
    if (size == 4 && spos == 31 && epos == 23 && esize == 8 && mpos == 0 && msize == 23 &&
        ebias == 127) {
        *out = TRACE_F32;
        return 0;
    }
    if (size == 2 && spos == 15 && epos == 10 && esize == 5 && mpos == 0 && msize == 10 &&
        ebias == 15) {
        *out = TRACE_F16;
        return 0;
    }
    return -1;
}

const char *trace_dtype_name(TraceDtype dtype)
{
    return dtype == TRACE_F16 ? "float16" : "float32";
}

/* ---- Header validation, shared by the reader and the writer ---- */

static int validate_dims(const TraceMeta *m, const char *path, KvErr *err)
{
    if (m->n_layers < 1)
        return kv_fail(err, "%s: attribute n_layers: expected >= 1, found %d", path, m->n_layers);
    if (m->n_q_heads < 1)
        return kv_fail(err, "%s: attribute n_q_heads: expected >= 1, found %d", path, m->n_q_heads);
    if (m->n_kv_heads < 1 || m->n_q_heads % m->n_kv_heads != 0)
        return kv_fail(err, "%s: attribute n_kv_heads: expected a divisor of n_q_heads = %d, found %d",
                       path, m->n_q_heads, m->n_kv_heads);
    if (m->head_dim < 2 || m->head_dim % 2 != 0)
        return kv_fail(err, "%s: attribute head_dim: expected an even number >= 2, found %d", path,
                       m->head_dim);
    if (m->n_tokens < 1)
        return kv_fail(err, "%s: attribute n_tokens: expected >= 1, found %d", path, m->n_tokens);
    if (m->n_prompt < 1 || m->n_prompt > m->n_tokens)
        return kv_fail(err, "%s: attribute n_prompt: expected 1 <= n_prompt <= n_tokens = %d, found %d",
                       path, m->n_tokens, m->n_prompt);
    if (!isfinite(m->rope_theta) || m->rope_theta <= 0)
        return kv_fail(err, "%s: attribute rope_theta: expected a finite value > 0, found %g", path,
                       m->rope_theta);
    if (!isfinite(m->attn_scale) || m->attn_scale <= 0)
        return kv_fail(err, "%s: attribute attn_scale: expected a finite value > 0, found %g", path,
                       m->attn_scale);
    if (m->rope_layout != ROPE_HALF && m->rope_layout != ROPE_INTERLEAVED)
        return kv_fail(err, "%s: attribute rope_layout: expected half or interleaved", path);
    if (m->n_needles < 0 || m->n_probes < 0 || m->n_attn_rows < 0)
        return kv_fail(err, "%s: negative needle, probe or attention row count", path);
    return 0;
}

static int validate_arrays(const TraceMeta *m, const char *path, KvErr *err)
{
    int T = m->n_tokens;
    for (int t = 0; t < T; t++) {
        if (m->tokens[t] < 0)
            return kv_fail(err, "%s: dataset /tokens: token %d has id %" PRId32 ", expected >= 0",
                           path, t, m->tokens[t]);
        if (m->positions[t] < 0 || (t > 0 && m->positions[t] <= m->positions[t - 1]))
            return kv_fail(err, "%s: dataset /positions: position of token %d is %" PRId32
                           ", expected >= 0 and strictly increasing", path, t, m->positions[t]);
        if (m->segments[t] < 0 || (t > 0 && m->segments[t] < m->segments[t - 1]))
            return kv_fail(err, "%s: dataset /segments: segment of token %d is %" PRId32
                           ", expected >= 0 and non-decreasing", path, t, m->segments[t]);
    }
    for (int i = 0; i < m->n_needles; i++) {
        int32_t s = m->needles[2 * i], e = m->needles[2 * i + 1];
        if (!(s >= 0 && s < e && e <= T))
            return kv_fail(err, "%s: dataset /needles: span %d is [%" PRId32 ",%" PRId32
                           "), expected 0 <= start < end <= %d", path, i, s, e, T);
    }
    for (int i = 0; i < m->n_probes; i++)
        if (m->probes[i] < 0 || m->probes[i] >= T)
            return kv_fail(err, "%s: dataset /probes: probe %d is %" PRId32 ", expected in [0,%d)",
                           path, i, m->probes[i], T);
    for (int r = 0; r < m->n_attn_rows; r++) {
        int32_t at = m->attn_rows_at[r];
        if (at < 0 || at >= T || (r > 0 && at <= m->attn_rows_at[r - 1]))
            return kv_fail(err, "%s: dataset /attn_rows_at: row %d is at %" PRId32
                           ", expected strictly ascending positions in [0,%d)", path, r, at, T);
    }
    for (int f = 0; f < m->head_dim / 2; f++)
        if (!isfinite(m->rope_inv_freq[f]) || m->rope_inv_freq[f] <= 0)
            return kv_fail(err, "%s: dataset /rope_inv_freq: element %d is %g, expected a finite value > 0",
                           path, f, m->rope_inv_freq[f]);
    return 0;
}

int trace_meta_validate(const TraceMeta *m, const char *path, KvErr *err)
{
    if (validate_dims(m, path, err) < 0)
        return -1;
    return validate_arrays(m, path, err);
}

/* ---- Reader ---- */

typedef struct {
    const char *path;
    hid_t file;
    KvErr *err;
} Reader;

/* Opens a scalar (or one-element) attribute of the root group of the expected class. */
static hid_t attr_open(Reader *rd, const char *name, H5T_class_t want, hid_t *type)
{
    if (H5Aexists(rd->file, name) <= 0) {
        kv_fail(rd->err, "%s: attribute %s: missing", rd->path, name);
        return -1;
    }
    hid_t a = H5Aopen(rd->file, name, H5P_DEFAULT);
    if (a < 0) {
        kv_fail(rd->err, "%s: attribute %s: cannot open", rd->path, name);
        return -1;
    }
    *type = H5Aget_type(a);
    H5T_class_t c = H5Tget_class(*type);
    hid_t space = H5Aget_space(a);
    hssize_t npoints = H5Sget_simple_extent_npoints(space);
    H5Sclose(space);
    if (c != want) {
        kv_fail(rd->err, "%s: attribute %s: expected %s, found %s", rd->path, name,
                class_name(want), class_name(c));
    } else if (npoints != 1) {
        kv_fail(rd->err, "%s: attribute %s: expected a scalar, found %lld values", rd->path, name,
                (long long)npoints);
    } else {
        return a;
    }
    H5Tclose(*type);
    H5Aclose(a);
    return -1;
}

static int attr_int(Reader *rd, const char *name, int *out)
{
    hid_t type, a = attr_open(rd, name, H5T_INTEGER, &type);
    if (a < 0)
        return -1;
    long long v = 0;
    herr_t st = H5Aread(a, H5T_NATIVE_LLONG, &v);
    H5Tclose(type);
    H5Aclose(a);
    if (st < 0)
        return kv_fail(rd->err, "%s: attribute %s: cannot read", rd->path, name);
    if (v < -2147483647LL || v > 2147483647LL)
        return kv_fail(rd->err, "%s: attribute %s: value %lld out of range", rd->path, name, v);
    *out = (int)v;
    return 0;
}

static int attr_double(Reader *rd, const char *name, double *out)
{
    hid_t type, a = attr_open(rd, name, H5T_FLOAT, &type);
    if (a < 0)
        return -1;
    herr_t st = H5Aread(a, H5T_NATIVE_DOUBLE, out);
    H5Tclose(type);
    H5Aclose(a);
    if (st < 0)
        return kv_fail(rd->err, "%s: attribute %s: cannot read", rd->path, name);
    return 0;
}

/* Fixed-length or variable-length string attribute into out[cap]. */
static int attr_string(Reader *rd, const char *name, char *out, size_t cap)
{
    hid_t type, a = attr_open(rd, name, H5T_STRING, &type);
    if (a < 0)
        return -1;
    int rc = 0;
    char *text = NULL;
    if (H5Tis_variable_str(type) > 0) {
        hid_t mem = H5Tcopy(H5T_C_S1);
        H5Tset_size(mem, H5T_VARIABLE);
        char *vl = NULL;
        if (H5Aread(a, mem, &vl) < 0 || !vl) {
            rc = kv_fail(rd->err, "%s: attribute %s: cannot read", rd->path, name);
        } else {
            text = kv_strdup(vl);
            H5free_memory(vl);
        }
        H5Tclose(mem);
    } else {
        size_t size = H5Tget_size(type);
        text = kv_calloc(size + 1, 1);
        if (H5Aread(a, type, text) < 0)
            rc = kv_fail(rd->err, "%s: attribute %s: cannot read", rd->path, name);
    }
    H5Tclose(type);
    H5Aclose(a);
    if (rc == 0 && strlen(text) >= cap)
        rc = kv_fail(rd->err, "%s: attribute %s: expected at most %zu bytes, found %zu", rd->path,
                     name, cap - 1, strlen(text));
    if (rc == 0)
        strcpy(out, text);
    free(text);
    return rc;
}

/* Opens a dataset, checks its type class and shape. `want` has `rank` entries, ANY_DIM where
 * any size is accepted; `dims` receives the actual shape. A null dataspace reads as empty when
 * some dimension is free. */
static hid_t dataset_open(Reader *rd, const char *name, H5T_class_t want_class, int rank,
                          const hsize_t *want, hsize_t *dims)
{
    if (!path_exists(rd->file, name)) {
        kv_fail(rd->err, "%s: dataset %s: missing", rd->path, name);
        return -1;
    }
    hid_t ds = H5Dopen2(rd->file, name, H5P_DEFAULT);
    if (ds < 0) {
        kv_fail(rd->err, "%s: dataset %s: not a dataset", rd->path, name);
        return -1;
    }
    hid_t type = H5Dget_type(ds);
    H5T_class_t c = H5Tget_class(type);
    H5Tclose(type);
    if (c != want_class) {
        kv_fail(rd->err, "%s: dataset %s: expected %s values, found %s", rd->path, name,
                class_name(want_class), class_name(c));
        H5Dclose(ds);
        return -1;
    }
    hid_t space = H5Dget_space(ds);
    H5S_class_t sc = H5Sget_simple_extent_type(space);
    int found_rank = sc == H5S_SIMPLE ? H5Sget_simple_extent_ndims(space) : 0;
    hsize_t found[H5S_MAX_RANK] = {0};
    if (found_rank > 0)
        H5Sget_simple_extent_dims(space, found, NULL);
    H5Sclose(space);
    bool ok;
    if (sc == H5S_NULL) {
        ok = false;
        for (int i = 0; i < rank; i++) {
            dims[i] = want[i] == ANY_DIM ? 0 : want[i];
            ok = ok || want[i] == ANY_DIM;
        }
    } else {
        ok = found_rank == rank;
        for (int i = 0; ok && i < rank; i++) {
            ok = want[i] == ANY_DIM || want[i] == found[i];
            dims[i] = found[i];
        }
    }
    if (!ok) {
        char w[128], f[128];
        format_dims(w, sizeof w, rank, want);
        if (sc == H5S_NULL)
            snprintf(f, sizeof f, "a null dataspace");
        else if (sc == H5S_SCALAR)
            snprintf(f, sizeof f, "a scalar");
        else
            format_dims(f, sizeof f, found_rank, found);
        kv_fail(rd->err, "%s: dataset %s: expected shape %s, found %s", rd->path, name, w, f);
        H5Dclose(ds);
        return -1;
    }
    return ds;
}

/* Reads a whole integer dataset of the expected shape into out (n elements). */
static int read_ints(Reader *rd, const char *name, int rank, const hsize_t *want, hsize_t *dims,
                     int32_t **out)
{
    hid_t ds = dataset_open(rd, name, H5T_INTEGER, rank, want, dims);
    if (ds < 0)
        return -1;
    size_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= (size_t)dims[i];
    *out = kv_calloc(n, sizeof **out);
    int rc = 0;
    if (n > 0 && H5Dread(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, *out) < 0)
        rc = kv_fail(rd->err, "%s: dataset %s: cannot read", rd->path, name);
    H5Dclose(ds);
    return rc;
}

static int read_header(Reader *rd, TraceMeta *m)
{
    char format[64];
    int version;
    if (attr_string(rd, "format", format, sizeof format) < 0)
        return -1;
    if (strcmp(format, TRACE_FORMAT) != 0)
        return kv_fail(rd->err, "%s: attribute format: expected \"%s\", found \"%s\"", rd->path,
                       TRACE_FORMAT, format);
    if (attr_int(rd, "version", &version) < 0)
        return -1;
    if (version != TRACE_VERSION)
        return kv_fail(rd->err, "%s: attribute version: expected %d, found %d", rd->path,
                       TRACE_VERSION, version);

    char layout[64];
    if (attr_string(rd, "model", m->model, sizeof m->model) < 0 ||
        attr_string(rd, "generator", m->generator, sizeof m->generator) < 0 ||
        attr_string(rd, "rope_scaling", m->rope_scaling, sizeof m->rope_scaling) < 0 ||
        attr_int(rd, "n_layers", &m->n_layers) < 0 ||
        attr_int(rd, "n_q_heads", &m->n_q_heads) < 0 ||
        attr_int(rd, "n_kv_heads", &m->n_kv_heads) < 0 ||
        attr_int(rd, "head_dim", &m->head_dim) < 0 ||
        attr_int(rd, "n_tokens", &m->n_tokens) < 0 ||
        attr_int(rd, "n_prompt", &m->n_prompt) < 0 ||
        attr_double(rd, "rope_theta", &m->rope_theta) < 0 ||
        attr_string(rd, "rope_layout", layout, sizeof layout) < 0 ||
        attr_double(rd, "attn_scale", &m->attn_scale) < 0)
        return -1;
    if (!strcmp(layout, "half"))
        m->rope_layout = ROPE_HALF;
    else if (!strcmp(layout, "interleaved"))
        m->rope_layout = ROPE_INTERLEAVED;
    else
        return kv_fail(rd->err, "%s: attribute rope_layout: expected half or interleaved, found \"%s\"",
                       rd->path, layout);
    return validate_dims(m, rd->path, rd->err);
}

static int read_metadata(Reader *rd, TraceMeta *m)
{
    hsize_t T = (hsize_t)m->n_tokens, dims[2];
    const hsize_t want_t[1] = {T}, want_needles[2] = {ANY_DIM, 2}, want_any[1] = {ANY_DIM};
    int32_t *tokens = NULL, *positions = NULL, *segments = NULL, *needles = NULL, *probes = NULL,
            *rows_at = NULL;
    int rc = -1;
    if (read_ints(rd, "/tokens", 1, want_t, dims, &tokens) < 0 ||
        read_ints(rd, "/positions", 1, want_t, dims, &positions) < 0 ||
        read_ints(rd, "/segments", 1, want_t, dims, &segments) < 0 ||
        read_ints(rd, "/needles", 2, want_needles, dims, &needles) < 0)
        goto out;
    m->n_needles = (int)dims[0];
    if (read_ints(rd, "/probes", 1, want_any, dims, &probes) < 0)
        goto out;
    m->n_probes = (int)dims[0];
    m->n_attn_rows = 0;
    if (path_exists(rd->file, "/attn_rows_at")) {
        if (read_ints(rd, "/attn_rows_at", 1, want_any, dims, &rows_at) < 0)
            goto out;
        m->n_attn_rows = (int)dims[0];
    }

    trace_meta_alloc(m); /* also fills rope_inv_freq with the unscaled default */
    size_t T_bytes = (size_t)T * sizeof(int32_t);
    memcpy(m->tokens, tokens, T_bytes);
    memcpy(m->positions, positions, T_bytes);
    memcpy(m->segments, segments, T_bytes);
    memcpy(m->needles, needles, (size_t)m->n_needles * 2 * sizeof(int32_t));
    memcpy(m->probes, probes, (size_t)m->n_probes * sizeof(int32_t));
    if (m->n_attn_rows)
        memcpy(m->attn_rows_at, rows_at, (size_t)m->n_attn_rows * sizeof(int32_t));

    if (path_exists(rd->file, "/rope_inv_freq")) {
        const hsize_t want_f[1] = {(hsize_t)(m->head_dim / 2)};
        hid_t ds = dataset_open(rd, "/rope_inv_freq", H5T_FLOAT, 1, want_f, dims);
        if (ds < 0)
            goto out;
        herr_t st = H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, m->rope_inv_freq);
        H5Dclose(ds);
        if (st < 0) {
            kv_fail(rd->err, "%s: dataset /rope_inv_freq: cannot read", rd->path);
            goto out;
        }
    }
    rc = validate_arrays(m, rd->path, rd->err);
out:
    free(tokens);
    free(positions);
    free(segments);
    free(needles);
    free(probes);
    free(rows_at);
    return rc;
}

/* Every layer's q/k/v (and attn_rows when R > 0) exists with its shape and one shared dtype. */
static int check_layers(Reader *rd, const TraceMeta *m, TraceDtype *dtype)
{
    hsize_t Hq = (hsize_t)m->n_q_heads, Hkv = (hsize_t)m->n_kv_heads, T = (hsize_t)m->n_tokens,
            D = (hsize_t)m->head_dim, R = (hsize_t)m->n_attn_rows, dims[3];
    const hsize_t want_q[3] = {Hq, T, D}, want_kv[3] = {Hkv, T, D}, want_rows[3] = {Hq, R, T};
    const char *leaves[3] = {"q", "k", "v"};
    const hsize_t *wants[3] = {want_q, want_kv, want_kv};
    char name[64], first[64] = "";
    for (int l = 0; l < m->n_layers; l++) {
        for (int i = 0; i < 3; i++) {
            layer_name(name, sizeof name, l, leaves[i]);
            hid_t ds = dataset_open(rd, name, H5T_FLOAT, 3, wants[i], dims);
            if (ds < 0)
                return -1;
            hid_t type = H5Dget_type(ds);
            TraceDtype dt;
            int ok = float_dtype(type, &dt);
            size_t size = H5Tget_size(type);
            H5Tclose(type);
            H5Dclose(ds);
            if (ok < 0)
                return kv_fail(rd->err, "%s: dataset %s: expected IEEE float16 or float32, found a %zu-byte float of another layout",
                               rd->path, name, size);
            if (!first[0]) {
                snprintf(first, sizeof first, "%s", name);
                *dtype = dt;
            } else if (dt != *dtype) {
                return kv_fail(rd->err, "%s: dataset %s: expected %s like %s, found %s", rd->path,
                               name, trace_dtype_name(*dtype), first, trace_dtype_name(dt));
            }
        }
        layer_name(name, sizeof name, l, "attn_rows");
        if (R > 0) {
            hid_t ds = dataset_open(rd, name, H5T_FLOAT, 3, want_rows, dims);
            if (ds < 0)
                return -1;
            H5Dclose(ds);
        } else if (path_exists(rd->file, name)) {
            return kv_fail(rd->err, "%s: dataset %s: present but /attn_rows_at is absent or empty",
                           rd->path, name);
        }
    }
    return 0;
}

Trace *trace_open(const char *path, KvErr *err)
{
    h5_quiet();
    struct stat st;
    if (stat(path, &st) != 0) {
        kv_fail(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        kv_fail(err, "%s: not a regular file", path);
        return NULL;
    }
    if (strlen(path) >= sizeof((Trace *)0)->path) {
        kv_fail(err, "%s: path too long", path);
        return NULL;
    }
    if (H5Fis_hdf5(path) <= 0) {
        kv_fail(err, "%s: not an HDF5 file", path);
        return NULL;
    }
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        kv_fail(err, "%s: cannot open as HDF5", path);
        return NULL;
    }
    Trace *tr = kv_calloc(1, sizeof *tr);
    strcpy(tr->path, path);
    tr->file = file;
    Reader rd = {path, file, err};
    if (read_header(&rd, &tr->meta) < 0 || read_metadata(&rd, &tr->meta) < 0 ||
        check_layers(&rd, &tr->meta, &tr->dtype) < 0) {
        trace_close(tr);
        return NULL;
    }
    return tr;
}

void trace_close(Trace *tr)
{
    if (!tr)
        return;
    h5_quiet();
    trace_meta_free(&tr->meta);
    if (tr->file >= 0)
        H5Fclose(tr->file);
    free(tr);
}

const TraceMeta *trace_meta(const Trace *tr) { return &tr->meta; }
const char *trace_path(const Trace *tr) { return tr->path; }
TraceDtype trace_dtype(const Trace *tr) { return tr->dtype; }

/* Reads a whole q/k/v dataset as float32. float16 data is read as raw half patterns into the
 * first half of `out` and widened in place from the end, so no second buffer is needed. */
static int read_values(Trace *tr, const char *name, float *out, size_t n, bool check_finite,
                       KvErr *err)
{
    hid_t ds = H5Dopen2(tr->file, name, H5P_DEFAULT);
    if (ds < 0)
        return kv_fail(err, "%s: dataset %s: cannot open", tr->path, name);
    hid_t type = H5Dget_type(ds);
    TraceDtype dt = TRACE_F32;
    bool half = float_dtype(type, &dt) == 0 && dt == TRACE_F16;
    H5Tclose(type);
    hid_t mem = half ? half_type() : H5Tcopy(H5T_NATIVE_FLOAT);
    herr_t st = H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
    H5Tclose(mem);
    H5Dclose(ds);
    if (st < 0)
        return kv_fail(err, "%s: dataset %s: read failed", tr->path, name);
    if (half) {
        const uint16_t *raw = (const uint16_t *)(void *)out;
        for (size_t i = n; i-- > 0;)
            out[i] = float_from_half(raw[i]);
    }
    if (check_finite)
        for (size_t i = 0; i < n; i++)
            if (!isfinite(out[i]))
                return kv_fail(err, "%s: dataset %s: non-finite value at flat index %zu", tr->path,
                               name, i);
    return 0;
}

int trace_read_layer(Trace *tr, int layer, float *q, float *k, float *v, KvErr *err)
{
    h5_quiet();
    if (layer < 0 || layer >= tr->meta.n_layers)
        return kv_fail(err, "%s: layer %d out of range [0,%d)", tr->path, layer,
                       tr->meta.n_layers);
    const TraceMeta *m = &tr->meta;
    const char *leaves[3] = {"q", "k", "v"};
    float *outs[3] = {q, k, v};
    size_t per_head = (size_t)m->n_tokens * m->head_dim;
    size_t lens[3] = {(size_t)m->n_q_heads * per_head, (size_t)m->n_kv_heads * per_head,
                      (size_t)m->n_kv_heads * per_head};
    char name[64];
    for (int i = 0; i < 3; i++) {
        if (!outs[i])
            continue;
        layer_name(name, sizeof name, layer, leaves[i]);
        if (read_values(tr, name, outs[i], lens[i], true, err) < 0)
            return -1;
    }
    return 0;
}

int trace_read_attn_rows(Trace *tr, int layer, float *rows, KvErr *err)
{
    h5_quiet();
    if (tr->meta.n_attn_rows == 0)
        return kv_fail(err, "%s: the trace stores no attention rows (/attn_rows_at absent)",
                       tr->path);
    if (layer < 0 || layer >= tr->meta.n_layers)
        return kv_fail(err, "%s: layer %d out of range [0,%d)", tr->path, layer,
                       tr->meta.n_layers);
    char name[64];
    layer_name(name, sizeof name, layer, "attn_rows");
    const TraceMeta *m = &tr->meta;
    size_t n = (size_t)m->n_q_heads * m->n_attn_rows * m->n_tokens;
    return read_values(tr, name, rows, n, true, err);
}

/* ---- In-memory rounding ---- */

void trace_round_to_dtype(float *x, size_t n, TraceDtype dtype)
{
    if (dtype != TRACE_F16)
        return;
    for (size_t i = 0; i < n; i++)
        x[i] = float_from_half(half_from_float(x[i]));
}

/* ---- Writer ---- */

struct TraceWriter {
    char path[4096];
    char tmp_path[4096 + 16];
    hid_t file;
    int n_layers, n_q_heads, n_kv_heads, head_dim, n_tokens, n_attn_rows;
    TraceDtype dtype;
    uint16_t *half_buf; /* conversion buffer for float16 writes */
    size_t half_cap;
    hid_t *q, *k, *v, *rows;       /* [n_layers] open datasets */
    unsigned char *token_written;  /* [n_layers][n_tokens] */
    unsigned char *row_written;    /* [n_layers][n_attn_rows] */
};

static int write_attr(hid_t file, const char *name, hid_t type, const void *value)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = a < 0 ? -1 : H5Awrite(a, type, value);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

static int write_attr_string(hid_t file, const char *name, const char *value)
{
    hid_t type = H5Tcopy(H5T_C_S1);
    size_t len = strlen(value);
    H5Tset_size(type, len + 1); /* room for the terminator; HDF5 rejects size 0 */
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    int rc = write_attr(file, name, type, value);
    H5Tclose(type);
    return rc;
}

static int write_attr_int(hid_t file, const char *name, int value)
{
    int32_t v = value;
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = a < 0 ? -1 : H5Awrite(a, H5T_NATIVE_INT32, &v);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

static int write_attr_double(hid_t file, const char *name, double value)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = a < 0 ? -1 : H5Awrite(a, H5T_NATIVE_DOUBLE, &value);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

/* A contiguous dataset written whole (nothing written when it has no elements). */
static int write_array(hid_t file, const char *name, hid_t file_type, hid_t mem_type, int rank,
                       const hsize_t *dims, const void *data)
{
    hid_t space = H5Screate_simple(rank, dims, NULL);
    hid_t ds = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = ds < 0 ? -1 : 0;
    hsize_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= dims[i];
    if (st >= 0 && n > 0)
        st = H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (ds >= 0)
        H5Dclose(ds);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

static int write_root(hid_t file, const TraceMeta *m)
{
    hsize_t T = (hsize_t)m->n_tokens;
    hsize_t needles_dims[2] = {(hsize_t)m->n_needles, 2}, probes_dims[1] = {(hsize_t)m->n_probes},
            rows_dims[1] = {(hsize_t)m->n_attn_rows}, freq_dims[1] = {(hsize_t)(m->head_dim / 2)};
    int bad = 0;
    bad |= write_attr_string(file, "format", TRACE_FORMAT);
    bad |= write_attr_int(file, "version", TRACE_VERSION);
    bad |= write_attr_string(file, "model", m->model);
    bad |= write_attr_string(file, "generator", m->generator);
    bad |= write_attr_int(file, "n_layers", m->n_layers);
    bad |= write_attr_int(file, "n_q_heads", m->n_q_heads);
    bad |= write_attr_int(file, "n_kv_heads", m->n_kv_heads);
    bad |= write_attr_int(file, "head_dim", m->head_dim);
    bad |= write_attr_int(file, "n_tokens", m->n_tokens);
    bad |= write_attr_int(file, "n_prompt", m->n_prompt);
    bad |= write_attr_double(file, "rope_theta", m->rope_theta);
    bad |= write_attr_string(file, "rope_layout", m->rope_layout == ROPE_HALF ? "half" : "interleaved");
    bad |= write_attr_string(file, "rope_scaling", m->rope_scaling);
    bad |= write_attr_double(file, "attn_scale", m->attn_scale);
    bad |= write_array(file, "/tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, &T, m->tokens);
    bad |= write_array(file, "/positions", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, &T, m->positions);
    bad |= write_array(file, "/segments", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, &T, m->segments);
    bad |= write_array(file, "/needles", H5T_STD_I32LE, H5T_NATIVE_INT32, 2, needles_dims, m->needles);
    bad |= write_array(file, "/probes", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, probes_dims, m->probes);
    bad |= write_array(file, "/rope_inv_freq", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 1, freq_dims,
                       m->rope_inv_freq);
    if (m->n_attn_rows > 0)
        bad |= write_array(file, "/attn_rows_at", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, rows_dims,
                           m->attn_rows_at);
    return bad ? -1 : 0;
}

/* One q/k/v dataset: chunks [1, C, D] of about CHUNK_TARGET_BYTES, and a chunk cache holding one
 * row of chunks across all heads, so that writing a few tokens at a time never re-reads one. */
static hid_t create_qkv(hid_t group, const char *name, hid_t type, int heads, int T, int D)
{
    size_t value_bytes = H5Tget_size(type);
    hsize_t chunk_tokens = CHUNK_TARGET_BYTES / ((size_t)D * value_bytes);
    if (chunk_tokens < 1)
        chunk_tokens = 1;
    if (chunk_tokens > (hsize_t)T)
        chunk_tokens = (hsize_t)T;
    hsize_t dims[3] = {(hsize_t)heads, (hsize_t)T, (hsize_t)D}, chunk[3] = {1, chunk_tokens, (hsize_t)D};
    hid_t space = H5Screate_simple(3, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 3, chunk);
    H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER); /* every token is written before finish */
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
    size_t chunk_bytes = (size_t)chunk_tokens * (size_t)D * value_bytes;
    H5Pset_chunk_cache(dapl, CHUNK_CACHE_SLOTS, (size_t)heads * chunk_bytes + chunk_bytes, 1.0);
    hid_t ds = H5Dcreate2(group, name, type, space, H5P_DEFAULT, dcpl, dapl);
    H5Pclose(dapl);
    H5Pclose(dcpl);
    H5Sclose(space);
    return ds;
}

static void writer_close_handles(TraceWriter *w)
{
    for (int l = 0; l < w->n_layers; l++) {
        hid_t *sets[4] = {w->q, w->k, w->v, w->rows};
        for (int i = 0; i < 4; i++)
            if (sets[i] && sets[i][l] >= 0)
                H5Dclose(sets[i][l]);
    }
    free(w->q);
    free(w->k);
    free(w->v);
    free(w->rows);
    w->q = w->k = w->v = w->rows = NULL;
}

static void writer_free(TraceWriter *w)
{
    writer_close_handles(w);
    free(w->token_written);
    free(w->row_written);
    free(w->half_buf);
    free(w);
}

TraceWriter *trace_writer_create(const char *path, const TraceMeta *meta, TraceDtype dtype,
                                 KvErr *err)
{
    h5_quiet();
    if (trace_meta_validate(meta, path, err) < 0)
        return NULL;
    if (dtype != TRACE_F32 && dtype != TRACE_F16) {
        kv_fail(err, "%s: unknown trace dtype %d", path, (int)dtype);
        return NULL;
    }
    TraceWriter *w = kv_calloc(1, sizeof *w);
    if (strlen(path) >= sizeof w->path) {
        kv_fail(err, "%s: path too long", path);
        free(w);
        return NULL;
    }
    strcpy(w->path, path);
    w->file = -1;
    atomic_tmp_name(path, w->tmp_path, sizeof w->tmp_path);
    w->n_layers = meta->n_layers;
    w->n_q_heads = meta->n_q_heads;
    w->n_kv_heads = meta->n_kv_heads;
    w->head_dim = meta->head_dim;
    w->n_tokens = meta->n_tokens;
    w->n_attn_rows = meta->n_attn_rows;
    w->dtype = dtype;
    w->token_written = kv_calloc((size_t)w->n_layers * w->n_tokens, 1);
    w->row_written = kv_calloc((size_t)w->n_layers * (size_t)w->n_attn_rows, 1);
    w->q = kv_malloc((size_t)w->n_layers * sizeof(hid_t));
    w->k = kv_malloc((size_t)w->n_layers * sizeof(hid_t));
    w->v = kv_malloc((size_t)w->n_layers * sizeof(hid_t));
    w->rows = kv_malloc((size_t)w->n_layers * sizeof(hid_t));
    for (int l = 0; l < w->n_layers; l++)
        w->q[l] = w->k[l] = w->v[l] = w->rows[l] = -1;

    w->file = H5Fcreate(w->tmp_path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w->file < 0) {
        kv_fail(err, "%s: cannot create temporary file %s", path, w->tmp_path);
        writer_free(w);
        return NULL;
    }
    if (write_root(w->file, meta) < 0) {
        kv_fail(err, "%s: cannot write the header", path);
        trace_writer_abort(w);
        return NULL;
    }
    hid_t layers = H5Gcreate2(w->file, "/layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t ftype = dtype == TRACE_F16 ? half_type() : H5Tcopy(H5T_IEEE_F32LE);
    hsize_t rows_dims[3] = {(hsize_t)w->n_q_heads, (hsize_t)w->n_attn_rows, (hsize_t)w->n_tokens};
    hid_t rows_space = H5Screate_simple(3, rows_dims, NULL);
    int bad = layers < 0;
    for (int l = 0; l < w->n_layers && !bad; l++) {
        char name[16];
        snprintf(name, sizeof name, "%03d", l);
        hid_t g = H5Gcreate2(layers, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (g < 0) {
            bad = 1;
            break;
        }
        w->q[l] = create_qkv(g, "q", ftype, w->n_q_heads, w->n_tokens, w->head_dim);
        w->k[l] = create_qkv(g, "k", ftype, w->n_kv_heads, w->n_tokens, w->head_dim);
        w->v[l] = create_qkv(g, "v", ftype, w->n_kv_heads, w->n_tokens, w->head_dim);
        bad = w->q[l] < 0 || w->k[l] < 0 || w->v[l] < 0;
        if (w->n_attn_rows > 0 && !bad) {
            w->rows[l] = H5Dcreate2(g, "attn_rows", H5T_IEEE_F32LE, rows_space, H5P_DEFAULT,
                                    H5P_DEFAULT, H5P_DEFAULT);
            bad = w->rows[l] < 0;
        }
        H5Gclose(g);
    }
    H5Sclose(rows_space);
    H5Tclose(ftype);
    if (layers >= 0)
        H5Gclose(layers);
    if (bad) {
        kv_fail(err, "%s: cannot create the layer datasets", path);
        trace_writer_abort(w);
        return NULL;
    }
    return w;
}

/* Writes data [heads][nt][D] into tokens [t0, t0+nt) of a [heads][T][D] dataset, after checking
 * that every value is finite and representable in the trace's precision. */
static int write_tokens(TraceWriter *w, hid_t ds, const char *leaf, int layer, int heads, int t0,
                        int nt, const float *data, KvErr *err)
{
    int D = w->head_dim;
    size_t n = (size_t)heads * nt * D;
    const float limit = w->dtype == TRACE_F16 ? 65504.0f : 3.4028235e38f;
    for (size_t i = 0; i < n; i++)
        if (!(fabsf(data[i]) <= limit)) {
            size_t h = i / ((size_t)nt * D), t = t0 + (i / D) % nt;
            return kv_fail(err, "%s: layer %d %s: head %zu token %zu holds %g, not a finite %s value",
                           w->path, layer, leaf, h, t, data[i], trace_dtype_name(w->dtype));
        }
    const void *buf = data;
    hid_t mem;
    if (w->dtype == TRACE_F16) {
        if (w->half_cap < n) {
            w->half_buf = kv_realloc(w->half_buf, n * sizeof *w->half_buf);
            w->half_cap = n;
        }
        for (size_t i = 0; i < n; i++)
            w->half_buf[i] = half_from_float(data[i]);
        buf = w->half_buf;
        mem = half_type();
    } else {
        mem = H5Tcopy(H5T_NATIVE_FLOAT);
    }
    hsize_t start[3] = {0, (hsize_t)t0, 0}, count[3] = {(hsize_t)heads, (hsize_t)nt, (hsize_t)D};
    hid_t fspace = H5Dget_space(ds);
    H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t mspace = H5Screate_simple(3, count, NULL);
    herr_t st = H5Dwrite(ds, mem, mspace, fspace, H5P_DEFAULT, buf);
    H5Sclose(mspace);
    H5Sclose(fspace);
    H5Tclose(mem);
    if (st < 0)
        return kv_fail(err, "%s: layer %d %s: writing tokens [%d,%d) failed", w->path, layer, leaf,
                       t0, t0 + nt);
    return 0;
}

int trace_writer_put_qkv(TraceWriter *w, int layer, int t0, int nt, const float *q,
                         const float *k, const float *v, KvErr *err)
{
    h5_quiet();
    if (layer < 0 || layer >= w->n_layers)
        return kv_fail(err, "%s: layer %d out of range [0,%d)", w->path, layer, w->n_layers);
    if (t0 < 0 || nt < 1 || t0 > w->n_tokens - nt)
        return kv_fail(err, "%s: tokens [%d,%d) out of range [0,%d)", w->path, t0, t0 + nt,
                       w->n_tokens);
    if (!q || !k || !v)
        return kv_fail(err, "%s: layer %d: q, k and v must all be given", w->path, layer);
    if (write_tokens(w, w->q[layer], "q", layer, w->n_q_heads, t0, nt, q, err) < 0 ||
        write_tokens(w, w->k[layer], "k", layer, w->n_kv_heads, t0, nt, k, err) < 0 ||
        write_tokens(w, w->v[layer], "v", layer, w->n_kv_heads, t0, nt, v, err) < 0)
        return -1;
    memset(w->token_written + (size_t)layer * w->n_tokens + t0, 1, (size_t)nt);
    return 0;
}

int trace_writer_put_attn_row(TraceWriter *w, int layer, int r, const float *rows, KvErr *err)
{
    h5_quiet();
    if (layer < 0 || layer >= w->n_layers)
        return kv_fail(err, "%s: layer %d out of range [0,%d)", w->path, layer, w->n_layers);
    if (r < 0 || r >= w->n_attn_rows)
        return kv_fail(err, "%s: attention row %d out of range [0,%d)", w->path, r,
                       w->n_attn_rows);
    for (size_t i = 0; i < (size_t)w->n_q_heads * w->n_tokens; i++)
        if (!isfinite(rows[i]))
            return kv_fail(err, "%s: layer %d: attention row %d holds a non-finite value", w->path,
                           layer, r);
    hsize_t start[3] = {0, (hsize_t)r, 0};
    hsize_t count[3] = {(hsize_t)w->n_q_heads, 1, (hsize_t)w->n_tokens};
    hid_t fspace = H5Dget_space(w->rows[layer]);
    H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t mspace = H5Screate_simple(3, count, NULL);
    herr_t st = H5Dwrite(w->rows[layer], H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, rows);
    H5Sclose(mspace);
    H5Sclose(fspace);
    if (st < 0)
        return kv_fail(err, "%s: layer %d: writing attention row %d failed", w->path, layer, r);
    w->row_written[(size_t)layer * w->n_attn_rows + r] = 1;
    return 0;
}

int trace_writer_finish(TraceWriter *w, KvErr *err)
{
    h5_quiet();
    for (int l = 0; l < w->n_layers; l++) {
        for (int t = 0; t < w->n_tokens; t++)
            if (!w->token_written[(size_t)l * w->n_tokens + t]) {
                kv_fail(err, "%s: layer %d: token %d was never written", w->path, l, t);
                trace_writer_abort(w);
                return -1;
            }
        for (int r = 0; r < w->n_attn_rows; r++)
            if (!w->row_written[(size_t)l * w->n_attn_rows + r]) {
                kv_fail(err, "%s: layer %d: attention row %d was never written", w->path, l, r);
                trace_writer_abort(w);
                return -1;
            }
    }
    writer_close_handles(w);
    herr_t st = H5Fclose(w->file);
    w->file = -1;
    if (st < 0) {
        kv_fail(err, "%s: closing the trace failed", w->path);
        trace_writer_abort(w);
        return -1;
    }
    if (rename(w->tmp_path, w->path) != 0) {
        kv_fail(err, "%s: cannot rename temporary file into place: %s", w->path, strerror(errno));
        trace_writer_abort(w);
        return -1;
    }
    writer_free(w);
    return 0;
}

void trace_writer_abort(TraceWriter *w)
{
    if (!w)
        return;
    h5_quiet();
    writer_close_handles(w);
    if (w->file >= 0)
        H5Fclose(w->file);
    unlink(w->tmp_path);
    writer_free(w);
}
