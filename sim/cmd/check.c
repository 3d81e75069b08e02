/* check.c — `kvsim info` (what a trace holds) and `kvsim check` (do its stored attention rows
 * match softmax(attn_scale · q·k) over the keys each layer's geometry lets the query attend,
 * recomputed from the trace's own Q and K).
 *
 * Both open the trace through trace_open, so an invalid trace gets the reader's one-line
 * message and exit status 2. */
#include "sim/cmd/check.h"

#include <hdf5.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/args.h"
#include "sim/base/blas.h"
#include "sim/format/trace.h"

/* ---- info ---- */

typedef struct {
    char name[512];
    char type[32];
    char shape[96];
} DatasetLine;

typedef struct {
    DatasetLine *lines;
    int n, cap;
} DatasetList;

static void describe_type(hid_t type, char *out, size_t n)
{
    size_t size = H5Tget_size(type);
    switch (H5Tget_class(type)) {
    case H5T_INTEGER:
        snprintf(out, n, "%sint%zu", H5Tget_sign(type) == H5T_SGN_NONE ? "u" : "", 8 * size);
        break;
    case H5T_FLOAT: snprintf(out, n, "float%zu", 8 * size); break;
    case H5T_STRING: snprintf(out, n, "string"); break;
    default: snprintf(out, n, "other"); break;
    }
}

static void describe_shape(hid_t space, char *out, size_t n)
{
    if (H5Sget_simple_extent_type(space) == H5S_NULL) {
        snprintf(out, n, "null");
        return;
    }
    hsize_t dims[H5S_MAX_RANK];
    int rank = H5Sget_simple_extent_dims(space, dims, NULL);
    size_t used = (size_t)snprintf(out, n, "[");
    for (int i = 0; i < rank && used < n; i++)
        used += (size_t)snprintf(out + used, n - used, "%s%llu", i ? "," : "",
                                 (unsigned long long)dims[i]);
    if (used < n)
        snprintf(out + used, n - used, "]");
}

/* Every dataset under `group` (path `prefix`), depth first, in name order. Uses only calls whose
 * signatures are the same in HDF5 1.10 and later. */
static void list_datasets(hid_t group, const char *prefix, DatasetList *list)
{
    if (strlen(prefix) > 200)
        return; /* deeper than any trace nests */
    H5G_info_t info;
    if (H5Gget_info(group, &info) < 0)
        return;
    for (hsize_t i = 0; i < info.nlinks; i++) {
        char name[256];
        if (H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                               H5P_DEFAULT) < 0)
            continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", prefix, name);
        hid_t obj = H5Oopen(group, name, H5P_DEFAULT);
        if (obj < 0)
            continue;
        if (H5Iget_type(obj) == H5I_GROUP) {
            list_datasets(obj, path, list);
        } else if (H5Iget_type(obj) == H5I_DATASET) {
            if (list->n == list->cap) {
                list->cap = list->cap ? 2 * list->cap : 64;
                list->lines = kv_realloc(list->lines, (size_t)list->cap * sizeof *list->lines);
            }
            DatasetLine *line = &list->lines[list->n++];
            snprintf(line->name, sizeof line->name, "%s", path);
            hid_t type = H5Dget_type(obj), space = H5Dget_space(obj);
            describe_type(type, line->type, sizeof line->type);
            describe_shape(space, line->shape, sizeof line->shape);
            H5Tclose(type);
            H5Sclose(space);
        }
        H5Oclose(obj);
    }
}

/* A free-text string of the file on one line of output (control characters escaped). */
static const char *one_line(const char *s, char *out, size_t outlen)
{
    return kv_escape(s, strlen(s), out, outlen);
}

/* A model dimension: the number, or "unknown" for 0. */
static const char *dim_text(int64_t v, char *out, size_t outlen)
{
    if (v == 0)
        snprintf(out, outlen, "unknown");
    else
        snprintf(out, outlen, "%lld", (long long)v);
    return out;
}

/* At most this many spans listed; the rest are counted. */
#define INFO_SPANS_SHOWN 8

/* The spans as "prefill [0,2048) decode [2048,2304) ...". */
static void print_spans(const TraceMeta *m)
{
    printf("%-14s %d:", "spans", m->n_spans);
    for (int i = 0; i < m->n_spans && i < INFO_SPANS_SHOWN; i++)
        printf(" %s [%d,%d)", trace_span_kind_name(m->spans[i].kind), m->spans[i].start,
               m->spans[i].end);
    if (m->n_spans > INFO_SPANS_SHOWN)
        printf(" ... (%d more)", m->n_spans - INFO_SPANS_SHOWN);
    printf("\n");
}

/* Each layer's window, runs of equal windows collapsed: "global", or "0-3 global, 4 4096". */
static void print_windows(const TraceMeta *m)
{
    printf("%-14s", "window");
    bool all_global = true;
    for (int l = 0; l < m->n_layers; l++)
        all_global &= m->window[l] == 0;
    if (all_global) {
        printf(" global (every layer)\n");
        return;
    }
    for (int l = 0; l < m->n_layers;) {
        int e = l;
        while (e + 1 < m->n_layers && m->window[e + 1] == m->window[l])
            e++;
        printf("%s layer%s %d", l ? "," : "", e > l ? "s" : "", l);
        if (e > l)
            printf("-%d", e);
        if (m->window[l] == 0)
            printf(" global");
        else
            printf(" %d", (int)m->window[l]);
        l = e + 1;
    }
    printf("\n");
}

static void print_header(const Trace *tr)
{
    const TraceMeta *m = trace_meta(tr);
    long long n_segments = (long long)m->segments[m->n_tokens - 1] + 1; /* up to 2^31 */
    char esc[1100];
    printf("%-14s %s\n", "trace", one_line(trace_path(tr), esc, sizeof esc));
    printf("%-14s %s version %d\n", "format", TRACE_FORMAT, m->version);
    printf("%-14s %s\n", "model", one_line(m->model, esc, sizeof esc));
    printf("%-14s %s\n", "generator", one_line(m->generator, esc, sizeof esc));
    printf("%-14s %d\n", "n_layers", m->n_layers);
    printf("%-14s %d\n", "n_q_heads", m->n_q_heads);
    printf("%-14s %d\n", "n_kv_heads", m->n_kv_heads);
    printf("%-14s %d\n", "head_dim", m->head_dim);
    printf("%-14s %d\n", "n_tokens", m->n_tokens);
    printf("%-14s %d\n", "n_prompt", m->n_prompt);
    print_spans(m);
    printf("%-14s %g\n", "rope_theta", m->rope_theta);
    printf("%-14s %s\n", "rope_layout", m->rope_layout == ROPE_HALF ? "half" : "interleaved");
    printf("%-14s %s\n", "rope_scaling",
           m->rope_scaling[0] ? one_line(m->rope_scaling, esc, sizeof esc) : "(none)");
    printf("%-14s %.9g\n", "attn_scale", m->attn_scale);
    if (m->attn_softcap > 0)
        printf("%-14s %.9g\n", "attn_softcap", m->attn_softcap);
    if (m->rope_attention_factor != 1.0)
        printf("%-14s %.9g (in q and k)\n", "rope_attn_fac", m->rope_attention_factor);
    print_windows(m);
    char dim[32];
    printf("%-14s %s\n", "hidden_size", dim_text(m->hidden_size, dim, sizeof dim));
    printf("%-14s %s\n", "intermediate", dim_text(m->intermediate_size, dim, sizeof dim));
    printf("%-14s %s\n", "vocab_size", dim_text(m->vocab_size, dim, sizeof dim));
    printf("%-14s %s\n", "n_params", dim_text(m->n_params, dim, sizeof dim));
    printf("%-14s %s\n", "qkv dtype", trace_dtype_name(trace_dtype(tr)));
    printf("%-14s %lld (segment 0: %s)\n", "segments", n_segments,
           m->segments[0] == 0 ? "system prompt" : "absent");
    printf("%-14s %d\n", "needles", m->n_needles);
    printf("%-14s %d\n", "probes", m->n_probes);
    printf("%-14s %d\n", "attn rows", m->n_attn_rows);
}

/* The trace at path, or NULL after printing why it cannot be read. */
static Trace *open_or_report(const char *path)
{
    KvErr err;
    Trace *tr = trace_open(path, &err);
    if (!tr)
        fprintf(stderr, "kvsim: %s\n", err.msg);
    return tr;
}

int cmd_info(int argc, char **argv)
{
    const ArgSpec specs[] = {{NULL, 0, NULL, 0, 0, NULL, NULL}};
    const char *positional[1];
    int status = args_start(argc, argv, specs, "info TRACE", positional, 1);
    if (status >= 0)
        return status;
    Trace *tr = open_or_report(positional[0]);
    if (!tr)
        return 2;
    print_header(tr);
    hid_t file = H5Fopen(positional[0], H5F_ACC_RDONLY, H5P_DEFAULT);
    DatasetList list = {0};
    if (file >= 0) {
        list_datasets(file, "", &list);
        H5Fclose(file);
    }
    int name_w = 7, type_w = 5;
    for (int i = 0; i < list.n; i++) {
        int nw = (int)strlen(list.lines[i].name), tw = (int)strlen(list.lines[i].type);
        name_w = nw > name_w ? nw : name_w;
        type_w = tw > type_w ? tw : type_w;
    }
    printf("\n%-*s  %-*s  %s\n", name_w, "dataset", type_w, "dtype", "shape");
    for (int i = 0; i < list.n; i++)
        printf("%-*s  %-*s  %s\n", name_w, list.lines[i].name, type_w, list.lines[i].type,
               list.lines[i].shape);
    free(list.lines);
    trace_close(tr);
    return 0;
}

/* ---- check ---- */

typedef struct {
    double diff;
    int layer, head, row, key;
} Worst;

/* Compares one layer's stored rows with the recomputation; updates *worst. A logit that is not
 * finite (attn_scale · q·k beyond float32) is an error: the row cannot be recomputed, and a NaN
 * difference must never pass for a small one. */
static int check_layer(const Trace *tr, int layer, const float *q, const float *k,
                       const float *rows, float *logits, Worst *worst, KvErr *err)
{
    const TraceMeta *m = trace_meta(tr);
    int T = m->n_tokens, D = m->head_dim, R = m->n_attn_rows;
    int group = m->n_q_heads / m->n_kv_heads;
    LayerGeometry geom = trace_layer_geometry(m, layer);
    for (int h = 0; h < m->n_q_heads; h++) {
        const float *keys = k + (size_t)(h / group) * T * D;
        for (int r = 0; r < R; r++) {
            int pos = m->attn_rows_at[r], first = attn_first_key(geom.window, pos);
            const float *query = q + ((size_t)h * T + pos) * D;
            /* logits[j] for the keys attended, j in [first, pos] */
            cblas_sgemv(CblasRowMajor, CblasNoTrans, pos + 1 - first, D, (float)geom.attn_scale,
                        keys + (size_t)first * D, D, query, 1, 0.0f, logits + first, 1);
            if (geom.attn_softcap > 0) /* the layer's soft-capping, as the model applied it */
                for (int j = first; j <= pos; j++)
                    logits[j] = softcap_logitf(logits[j], (float)geom.attn_softcap);
            for (int j = first; j <= pos; j++)
                if (!isfinite(logits[j]))
                    return kv_fail(err, "%s: layer %d, head %d, row %d (query %d): the recomputed "
                                   "logit of key %d is %g: attn_scale * q.k is not a finite "
                                   "float32, the row cannot be checked", trace_path(tr), layer,
                                   h, r, pos, j, (double)logits[j]);
            double mx = logits[first], sum = 0;
            for (int j = first + 1; j <= pos; j++)
                mx = logits[j] > mx ? logits[j] : mx;
            for (int j = first; j <= pos; j++)
                sum += exp(logits[j] - mx);
            const float *stored = rows + ((size_t)h * R + r) * T;
            for (int j = 0; j < T; j++) {
                double want = j >= first && j <= pos ? exp(logits[j] - mx) / sum : 0.0;
                double diff = fabs(stored[j] - want);
                if (diff > worst->diff || isnan(diff))
                    *worst = (Worst){isnan(diff) ? INFINITY : diff, layer, h, r, j};
            }
        }
    }
    return 0;
}

int cmd_check(int argc, char **argv)
{
    double tol = -1;
    const ArgSpec specs[] = {
        {"tol", ARG_DOUBLE, &tol, 0, 1, NULL,
         "largest absolute difference allowed (-1: 1e-4 for float32 traces, 2e-3 for float16)"},
        {NULL, 0, NULL, 0, 0, NULL, NULL},
    };
    const char *positional[1];
    int status = args_start(argc, argv, specs, "check TRACE [--tol X]", positional, 1);
    if (status >= 0)
        return status;
    Trace *tr = open_or_report(positional[0]);
    if (!tr)
        return 2;
    const TraceMeta *m = trace_meta(tr);
    if (m->n_attn_rows == 0) {
        fprintf(stderr, "kvsim: %s: the trace stores no attention rows (/attn_rows_at absent); nothing to check\n",
                trace_path(tr));
        trace_close(tr);
        return 2;
    }
    if (tol < 0)
        tol = trace_dtype(tr) == TRACE_F16 ? CHECK_TOL_F16 : CHECK_TOL_F32;
    size_t T = (size_t)m->n_tokens, D = (size_t)m->head_dim;
    float *q = kv_malloc((size_t)m->n_q_heads * T * D * sizeof(float));
    float *k = kv_malloc((size_t)m->n_kv_heads * T * D * sizeof(float));
    float *rows = kv_malloc((size_t)m->n_q_heads * m->n_attn_rows * T * sizeof(float));
    float *logits = kv_malloc(T * sizeof(float));
    Worst worst = {0.0, 0, 0, 0, 0};
    KvErr err;
    status = 0;
    for (int l = 0; l < m->n_layers; l++) {
        if (trace_read_layer(tr, l, q, k, NULL, &err) < 0 ||
            trace_read_attn_rows(tr, l, rows, &err) < 0 ||
            check_layer(tr, l, q, k, rows, logits, &worst, &err) < 0) {
            fprintf(stderr, "kvsim: %s\n", err.msg);
            status = 2;
            break;
        }
    }
    if (status == 0) {
        status = worst.diff <= tol ? 0 : 1; /* NaN never compares <= */
        printf("%s: %d layers x %d heads x %d rows; max |stored - recomputed| = %.3g at layer %d, "
               "head %d, row %d (query %d), key %d; tolerance %.3g: %s\n",
               trace_path(tr), m->n_layers, m->n_q_heads, m->n_attn_rows, worst.diff, worst.layer,
               worst.head, worst.row, m->attn_rows_at[worst.row], worst.key, tol,
               status == 0 ? "ok" : "FAILED");
    }
    free(q);
    free(k);
    free(rows);
    free(logits);
    trace_close(tr);
    return status;
}
