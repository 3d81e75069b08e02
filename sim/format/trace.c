/* trace.c — the HDF5 reader (versions 1 and 2) and writer (version 2) of kvsim traces
 * (docs/trace-format.md).
 *
 * The reader validates every attribute, every dataset's shape and type and the metadata values
 * on open, so that later reads can only fail on I/O. The writer validates the metadata with the
 * same code before creating anything, writes under a temporary name, and refuses to finish a
 * trace with unwritten tokens or rows. HDF5's own error stack printing is switched off in every
 * entry point (the stack is per thread in the thread-safe library): callers only ever see our
 * one-line messages. */
#include "sim/format/trace.h"
#include "sim/format/trace_meta_arrays.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <hdf5.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<H5FDdevelop.h>)
#include <H5FDdevelop.h> /* HDF5 >= 1.13: the file driver class lives here */
#endif
#endif

#include "sim/base/half.h"

#define ANY_DIM ((hsize_t)-1)
#define CHUNK_TARGET_BYTES 65536
#define CHUNK_CACHE_SLOTS 10007 /* prime, so a row of chunks across heads never collides */
#define ROOT_ATTRS_COMPACT 64     /* the 18 root attributes, with room to spare */
#define LAYER_LINKS_COMPACT 1024

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

/* The innermost message of the calling thread's HDF5 error stack (what actually went wrong, e.g.
 * "truncated file: eof = ..."), escaped for a one-line message, after ": "; "" when there is
 * none. HDF5's own descriptions only, never file content, but escaped all the same. */
typedef struct {
    char desc[256];
} H5Reason;

static herr_t h5_reason_walk(unsigned n, const H5E_error2_t *e, void *data)
{
    H5Reason *r = data;
    if (n == 0 && e->desc && e->desc[0])
        snprintf(r->desc, sizeof r->desc, "%s", e->desc);
    return 0;
}

static const char *h5_reason(char *out, size_t outlen)
{
    H5Reason r = {""};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, h5_reason_walk, &r);
    if (!r.desc[0]) {
        out[0] = '\0';
        return out;
    }
    if (outlen < 8) {
        out[0] = '\0';
        return out;
    }
    out[0] = ':', out[1] = ' '; /* then the description, escaped into the rest */
    kv_escape(r.desc, strlen(r.desc), out + 2, outlen - 2);
    return out;
}

/* ---- The writer's file driver ----
 *
 * When H5Dclose or H5Fclose cannot flush (disk full), HDF5 1.10 frees the object's state but
 * leaves its ID registered, and its atexit cleanup later closes it again: a segfault at exit,
 * after the right error message. HDF5's own error paths for a failed write also leak buffers.
 * So the writer never lets HDF5 see a failed write. It writes through this small POSIX driver
 * (pread/pwrite, with the allocation features of HDF5's default "sec2" driver, so the file is
 * the same), which on the first failed write or truncate records the errno and switches to
 * discarding: from then on nothing more reaches the file and HDF5 is told every write worked.
 * The writer checks the recorded errno after each of its HDF5 calls, fails that call with it
 * ("No space left on device"), and deletes the file; HDF5 closes it without ever failing.
 * Metadata written after the switch is kept in memory (`overlay`) and served to reads, so HDF5
 * never reads back anything but what it wrote; raw data is dropped (the file is deleted). */
typedef struct {
    bool discard; /* write nothing more to the file */
    int error;    /* errno of the first failed write, truncate or close; 0 if none */
} GuardCtl;

typedef struct {
    haddr_t addr;
    size_t size;
    unsigned char *bytes;
} GuardBlock;

typedef struct {
    H5FD_t pub; /* first: what HDF5 sees */
    int fd;
    haddr_t eoa, eof;
    dev_t dev;
    ino_t ino;
    GuardCtl own;  /* until the writer attaches its own */
    GuardCtl *ctl; /* &own, or the writer's, which outlives the driver's close */
    GuardBlock *overlay; /* metadata written while discarding, in write order */
    size_t n_overlay, cap_overlay;
} GuardFile;

/* errno of the last failed guard_open on this thread: why a trace could not be created */
static _Thread_local int guard_open_errno;

#define GUARD_MAXADDR ((haddr_t)(((haddr_t)1 << (8 * sizeof(off_t) - 1)) - 1))

static void guard_failed(GuardFile *g, int e)
{
    if (!g->ctl->error)
        g->ctl->error = e ? e : EIO;
    g->ctl->discard = true;
}

/* A write that does not reach the file: metadata is kept for later reads, raw data dropped. */
static void guard_keep(GuardFile *g, H5FD_mem_t type, haddr_t addr, size_t size, const void *buf)
{
    if (type == H5FD_MEM_DRAW || size == 0)
        return;
    if (g->n_overlay == g->cap_overlay) {
        g->cap_overlay = g->cap_overlay ? 2 * g->cap_overlay : 64;
        g->overlay = kv_realloc(g->overlay, g->cap_overlay * sizeof *g->overlay);
    }
    GuardBlock *b = &g->overlay[g->n_overlay++];
    b->addr = addr;
    b->size = size;
    b->bytes = kv_malloc(size);
    memcpy(b->bytes, buf, size);
}

static H5FD_t *guard_open(const char *name, unsigned flags, hid_t fapl, haddr_t maxaddr)
{
    (void)fapl;
    (void)maxaddr;
    int o = (flags & H5F_ACC_RDWR) ? O_RDWR : O_RDONLY;
    o |= (flags & H5F_ACC_TRUNC) ? O_TRUNC : 0;
    o |= (flags & H5F_ACC_CREAT) ? O_CREAT : 0;
    o |= (flags & H5F_ACC_EXCL) ? O_EXCL : 0;
    int fd = open(name, o | O_CLOEXEC, 0666);
    if (fd < 0) {
        guard_open_errno = errno;
        return NULL;
    }
    struct stat st;
    int bad = fstat(fd, &st) != 0 ? errno : S_ISREG(st.st_mode) ? 0 : EINVAL;
    if (bad) {
        guard_open_errno = bad;
        close(fd);
        return NULL;
    }
    GuardFile *g = calloc(1, sizeof *g);
    if (!g) {
        close(fd);
        return NULL;
    }
    g->fd = fd;
    g->eof = (haddr_t)st.st_size;
    g->dev = st.st_dev;
    g->ino = st.st_ino;
    g->ctl = &g->own;
    return &g->pub;
}

static herr_t guard_close(H5FD_t *f)
{
    GuardFile *g = (GuardFile *)f;
    if (close(g->fd) != 0)
        guard_failed(g, errno);
    for (size_t i = 0; i < g->n_overlay; i++)
        free(g->overlay[i].bytes);
    free(g->overlay);
    free(g);
    return 0;
}

static int guard_cmp(const H5FD_t *a, const H5FD_t *b)
{
    const GuardFile *x = (const GuardFile *)a, *y = (const GuardFile *)b;
    if (x->dev != y->dev)
        return x->dev < y->dev ? -1 : 1;
    if (x->ino != y->ino)
        return x->ino < y->ino ? -1 : 1;
    return 0;
}

static herr_t guard_query(const H5FD_t *f, unsigned long *flags)
{
    (void)f;
    *flags = H5FD_FEAT_AGGREGATE_METADATA | H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE |
             H5FD_FEAT_AGGREGATE_SMALLDATA;
    return 0;
}

static haddr_t guard_get_eoa(const H5FD_t *f, H5FD_mem_t type)
{
    (void)type;
    return ((const GuardFile *)f)->eoa;
}

static herr_t guard_set_eoa(H5FD_t *f, H5FD_mem_t type, haddr_t addr)
{
    (void)type;
    if (addr > GUARD_MAXADDR)
        return -1;
    ((GuardFile *)f)->eoa = addr;
    return 0;
}

static haddr_t guard_get_eof(const H5FD_t *f, H5FD_mem_t type)
{
    (void)type;
    return ((const GuardFile *)f)->eof;
}

static herr_t guard_get_handle(H5FD_t *f, hid_t fapl, void **handle)
{
    (void)fapl;
    *handle = f;
    return 0;
}

static herr_t guard_read(H5FD_t *f, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size,
                         void *buf)
{
    (void)type;
    (void)dxpl;
    GuardFile *g = (GuardFile *)f;
    if (addr == HADDR_UNDEF || addr > GUARD_MAXADDR || size > GUARD_MAXADDR - addr ||
        addr + size > g->eoa)
        return -1;
    char *p = buf;
    haddr_t at = addr;
    for (size_t left = size; left > 0;) {
        size_t chunk = left > ((size_t)1 << 30) ? (size_t)1 << 30 : left;
        ssize_t n = pread(g->fd, p, chunk, (off_t)at);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0) { /* beyond the end of the file: zeros, as in sec2 */
            memset(p, 0, left);
            break;
        }
        p += n, at += (haddr_t)n, left -= (size_t)n;
    }
    /* What was written while discarding, latest last. */
    for (size_t i = 0; i < g->n_overlay; i++) {
        const GuardBlock *b = &g->overlay[i];
        haddr_t lo = b->addr > addr ? b->addr : addr;
        haddr_t hi = b->addr + b->size < addr + size ? b->addr + b->size : addr + size;
        if (lo < hi)
            memcpy((char *)buf + (lo - addr), b->bytes + (lo - b->addr), (size_t)(hi - lo));
    }
    return 0;
}

static herr_t guard_write(H5FD_t *f, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size,
                          const void *buf)
{
    (void)dxpl;
    GuardFile *g = (GuardFile *)f;
    if (addr == HADDR_UNDEF || addr > GUARD_MAXADDR || size > GUARD_MAXADDR - addr ||
        addr + size > g->eoa)
        return -1;
    const char *p = buf;
    haddr_t at = addr;
    for (size_t left = size; left > 0 && !g->ctl->discard;) {
        size_t chunk = left > ((size_t)1 << 30) ? (size_t)1 << 30 : left;
        ssize_t n = pwrite(g->fd, p, chunk, (off_t)at);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            guard_failed(g, n < 0 ? errno : EIO);
        else
            p += n, at += (haddr_t)n, left -= (size_t)n;
    }
    if (g->ctl->discard)
        guard_keep(g, type, addr, size, buf); /* whole: a partly written block is kept too */
    if (addr + size > g->eof)
        g->eof = addr + size;
    return 0;
}

static herr_t guard_truncate(H5FD_t *f, hid_t dxpl, hbool_t closing)
{
    (void)dxpl;
    (void)closing;
    GuardFile *g = (GuardFile *)f;
    if (g->eoa == g->eof)
        return 0;
    if (!g->ctl->discard && ftruncate(g->fd, (off_t)g->eoa) != 0)
        guard_failed(g, errno);
    g->eof = g->eoa;
    return 0;
}

static const H5FD_class_t guard_class = {
#ifdef H5FD_CLASS_VERSION
    .version = H5FD_CLASS_VERSION,
    .value = 480, /* in the range HDF5 leaves to drivers outside the library */
#endif
    .name = "kvsim-writer",
    .maxaddr = GUARD_MAXADDR,
    .fc_degree = H5F_CLOSE_WEAK,
    .open = guard_open,
    .close = guard_close,
    .cmp = guard_cmp,
    .query = guard_query,
    .get_eoa = guard_get_eoa,
    .set_eoa = guard_set_eoa,
    .get_eof = guard_get_eof,
    .get_handle = guard_get_handle,
    .read = guard_read,
    .write = guard_write,
    .truncate = guard_truncate,
    .fl_map = H5FD_FLMAP_DICHOTOMY,
};

/* The driver's ID, registered on first use (and again should the library have been closed). */
static hid_t guard_driver(void)
{
    static hid_t id = H5I_INVALID_HID;
    if (id < 0 || H5Iis_valid(id) <= 0)
        id = H5FDregister(&guard_class);
    return id;
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

/* Whether every component of an absolute path exists (H5Lexists fails, rather than answering
 * no, when an intermediate group is missing): 1 present, 0 missing, -1 when the lookup itself
 * failed (a damaged group, a metadata checksum that does not match), with a message in err. */
static int lookup(hid_t file, const char *file_path, const char *kind, const char *path,
                  KvErr *err)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            htri_t e = H5Lexists(file, buf, H5P_DEFAULT);
            if (e < 0) {
                char why[300];
                h5_reason(why, sizeof why);
                return kv_fail(err, "%s: %s %s: cannot look it up%s", file_path, kind, path, why);
            }
            if (e == 0)
                return 0;
            if (c == '\0')
                return 1;
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

/* *acc *= x, false when the product exceeds `limit`. */
static bool mul_within(size_t *acc, size_t x, size_t limit)
{
    if (x != 0 && *acc > limit / x)
        return false;
    *acc *= x;
    return true;
}

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
    /* The scale multiplies float32 dot products (sgemv's alpha): it must be a float32 too. */
    if (!(m->attn_scale >= FLT_MIN && m->attn_scale <= FLT_MAX))
        return kv_fail(err, "%s: attribute attn_scale: expected a finite value > 0 within float32 "
                       "range [%g, %g], found %g", path, (double)FLT_MIN, (double)FLT_MAX,
                       m->attn_scale);
    if (m->rope_layout != ROPE_HALF && m->rope_layout != ROPE_INTERLEAVED)
        return kv_fail(err, "%s: attribute rope_layout: expected half or interleaved", path);
    if (!(m->attn_softcap == 0 || (m->attn_softcap >= FLT_MIN && m->attn_softcap <= FLT_MAX)))
        return kv_fail(err, "%s: attribute attn_softcap: expected 0 (none) or a finite value > 0 "
                       "within float32 range, found %g", path, m->attn_softcap);
    if (m->n_needles < 0 || m->n_probes < 0 || m->n_attn_rows < 0)
        return kv_fail(err, "%s: negative needle, probe or attention row count", path);
    const char *dim_names[3] = {"hidden_size", "intermediate_size", "vocab_size"};
    const int dims[3] = {m->hidden_size, m->intermediate_size, m->vocab_size};
    for (int i = 0; i < 3; i++)
        if (dims[i] < 0)
            return kv_fail(err, "%s: attribute %s: expected >= 0 (0 = unknown), found %d", path,
                           dim_names[i], dims[i]);
    if (m->n_params < 0)
        return kv_fail(err, "%s: attribute n_params: expected >= 0 (0 = unknown), found %" PRId64,
                       path, m->n_params);
    return 0;
}

/* In order, covering [0, T) without gaps, the first a prefill span ending at n_prompt. */
static int validate_spans(const TraceMeta *m, const char *path, KvErr *err)
{
    if (m->n_spans < 1)
        return kv_fail(err, "%s: dataset /spans: expected at least one span, found none", path);
    int at = 0;
    for (int i = 0; i < m->n_spans; i++) {
        const TraceSpan *sp = &m->spans[i];
        if (sp->kind != SPAN_PREFILL && sp->kind != SPAN_DECODE)
            return kv_fail(err, "%s: dataset /spans: span %d has kind %" PRId32 ", expected %d "
                           "(prefill) or %d (decode)", path, i, sp->kind, SPAN_PREFILL,
                           SPAN_DECODE);
        if (i == 0 && sp->kind != SPAN_PREFILL)
            return kv_fail(err, "%s: dataset /spans: span 0 is a decode run, expected the "
                           "prompt's prefill span first", path);
        if (sp->start != at || sp->end <= sp->start || sp->end > m->n_tokens)
            return kv_fail(err, "%s: dataset /spans: span %d is [%" PRId32 ",%" PRId32 "), "
                           "expected [%d,end) with %d < end <= n_tokens = %d (spans in order, "
                           "without gaps)", path, i, sp->start, sp->end, at, at, m->n_tokens);
        at = sp->end;
    }
    if (at != m->n_tokens)
        return kv_fail(err, "%s: dataset /spans: the spans end at %d, expected them to cover "
                       "[0,%d)", path, at, m->n_tokens);
    if (m->spans[0].end != m->n_prompt)
        return kv_fail(err, "%s: dataset /spans: the first span ends at %" PRId32 ", expected "
                       "n_prompt = %d", path, m->spans[0].end, m->n_prompt);
    return 0;
}

/* Every array a reader or writer of this header allocates has a size that fits in memory's
 * address space: one layer's q, k, v and attention rows as float32, and the writer's
 * per-layer bookkeeping. */
static int validate_sizes(const TraceMeta *m, const char *path, KvErr *err)
{
    const size_t limit = PTRDIFF_MAX;
    size_t q = sizeof(float), kv = sizeof(float), rows = sizeof(float), tokens = 1, rowmap = 1;
    bool ok = mul_within(&q, (size_t)m->n_q_heads, limit) &&
              mul_within(&q, (size_t)m->n_tokens, limit) &&
              mul_within(&q, (size_t)m->head_dim, limit) &&
              mul_within(&kv, (size_t)m->n_kv_heads, limit) &&
              mul_within(&kv, (size_t)m->n_tokens, limit) &&
              mul_within(&kv, (size_t)m->head_dim, limit) &&
              mul_within(&tokens, (size_t)m->n_layers, limit) &&
              mul_within(&tokens, (size_t)m->n_tokens, limit);
    if (!ok)
        return kv_fail(err, "%s: attributes n_layers %d, n_q_heads %d, n_kv_heads %d, n_tokens %d, "
                       "head_dim %d: one layer's q/k/v is too large to address", path, m->n_layers,
                       m->n_q_heads, m->n_kv_heads, m->n_tokens, m->head_dim);
    if (!mul_within(&rows, (size_t)m->n_q_heads, limit) ||
        !mul_within(&rows, (size_t)m->n_attn_rows, limit) ||
        !mul_within(&rows, (size_t)m->n_tokens, limit) ||
        !mul_within(&rowmap, (size_t)m->n_layers, limit) ||
        !mul_within(&rowmap, (size_t)m->n_attn_rows, limit))
        return kv_fail(err, "%s: dataset /attn_rows_at: %d rows of n_q_heads %d x n_tokens %d "
                       "are too large to address", path, m->n_attn_rows, m->n_q_heads, m->n_tokens);
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
    for (int l = 0; l < m->n_layers; l++)
        if (m->window[l] < 0)
            return kv_fail(err, "%s: dataset /window: layer %d has window %" PRId32 ", expected "
                           ">= 0 (0 = global)", path, l, m->window[l]);
    /* The RoPE angle of the last position, position * inv_freq, must be finite too. */
    double last = m->positions[T - 1] > 1 ? (double)m->positions[T - 1] : 1.0;
    for (int l = 0; l < m->n_layers; l++) {
        const double *freq = trace_layer_geometry(m, l).rope_inv_freq;
        for (int f = 0; f < m->head_dim / 2; f++)
            if (!isfinite(freq[f] * last) || freq[f] <= 0)
                return kv_fail(err, "%s: dataset /rope_inv_freq: layer %d element %d is %g, "
                               "expected a finite value > 0 (whose angle at position %.0f is "
                               "finite)", path, l, f, freq[f], last);
    }
    return validate_spans(m, path, err);
}

int trace_meta_validate(const TraceMeta *m, const char *path, KvErr *err)
{
    if (validate_dims(m, path, err) < 0 || validate_sizes(m, path, err) < 0)
        return -1;
    return validate_arrays(m, path, err);
}

/* ---- Reader ---- */

typedef struct {
    const char *path;
    hid_t file;
    size_t file_size; /* bytes: no unfiltered dataset holds more */
    KvErr *err;
    int n_spans; /* version 2: the rows of /spans, as probe_metadata found them */
} Reader;

/* A filtered (compressed) dataset may hold more than the file's size: up to this many times
 * (deflate, the filter HDF5 always has, cannot exceed 1032:1). */
#define FILTERED_EXPANSION 1032

/* Opens a scalar (or one-element) attribute of the root group of the expected class. */
static hid_t attr_open(Reader *rd, const char *name, H5T_class_t want, hid_t *type)
{
    htri_t exists = H5Aexists(rd->file, name);
    if (exists <= 0) {
        char why[300];
        if (exists < 0)
            kv_fail(rd->err, "%s: attribute %s: cannot look it up%s", rd->path, name,
                    h5_reason(why, sizeof why));
        else
            kv_fail(rd->err, "%s: attribute %s: missing", rd->path, name);
        return -1;
    }
    hid_t a = H5Aopen(rd->file, name, H5P_DEFAULT);
    if (a < 0) {
        char why[300];
        kv_fail(rd->err, "%s: attribute %s: cannot open%s", rd->path, name,
                h5_reason(why, sizeof why));
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

/* An integer attribute within [lo, hi] (a 32- or 64-bit range), named in the message by its
 * width. */
static int attr_integer(Reader *rd, const char *name, long long lo, long long hi, int bits,
                        long long *out)
{
    hid_t type, a = attr_open(rd, name, H5T_INTEGER, &type);
    if (a < 0)
        return -1;
    /* Read with the signedness of the file, so that an unsigned 64-bit value is not clipped
     * into range. */
    bool is_signed = H5Tget_sign(type) != H5T_SGN_NONE;
    long long v = 0;
    unsigned long long u = 0;
    herr_t st = is_signed ? H5Aread(a, H5T_NATIVE_LLONG, &v) : H5Aread(a, H5T_NATIVE_ULLONG, &u);
    H5Tclose(type);
    H5Aclose(a);
    if (st < 0)
        return kv_fail(rd->err, "%s: attribute %s: cannot read", rd->path, name);
    if (!is_signed && u > (unsigned long long)hi)
        return kv_fail(rd->err, "%s: attribute %s: expected a %d-bit integer, found %llu",
                       rd->path, name, bits, u);
    if (!is_signed)
        v = (long long)u;
    if (v < lo || v > hi)
        return kv_fail(rd->err, "%s: attribute %s: expected a %d-bit integer, found %lld",
                       rd->path, name, bits, v);
    *out = v;
    return 0;
}

static int attr_int(Reader *rd, const char *name, int *out)
{
    long long v;
    if (attr_integer(rd, name, -2147483647LL, 2147483647LL, 32, &v) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

static int attr_int64(Reader *rd, const char *name, int64_t *out)
{
    long long v;
    if (attr_integer(rd, name, -LLONG_MAX, LLONG_MAX, 64, &v) < 0)
        return -1;
    *out = (int64_t)v;
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

/* Fixed-length (null-terminated, null- or space-padded) or variable-length string attribute
 * into out[cap]. */
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
        H5Tset_cset(mem, H5Tget_cset(type));
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
        if (size == 0 || size > rd->file_size) {
            rc = kv_fail(rd->err, "%s: attribute %s: a %zu-byte string in a %zu-byte file",
                         rd->path, name, size, rd->file_size);
        } else {
            /* Converted to null-terminated, so that space padding is removed. */
            hid_t mem = H5Tcopy(H5T_C_S1);
            H5Tset_size(mem, size + 1);
            H5Tset_strpad(mem, H5T_STR_NULLTERM);
            H5Tset_cset(mem, H5Tget_cset(type));
            text = kv_calloc(size + 2, 1);
            if (H5Aread(a, mem, text) < 0)
                rc = kv_fail(rd->err, "%s: attribute %s: cannot read", rd->path, name);
            H5Tclose(mem);
        }
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

/* Where a dataset's values are: in this file, in the amount its shape says. A virtual dataset
 * or external storage would make HDF5 open other files (a FIFO there blocks for ever); a shape
 * larger than the file (one flipped byte in a dimension) would have the reader allocate
 * terabytes before any read fails; and a stored size that disagrees with the shape (a flipped
 * byte in a chunk's size) has HDF5 1.10 copy past its buffers. Unfiltered data is checked
 * exactly: contiguous data is all there or not allocated, compact data all there, chunked data
 * whole chunks (some may be unwritten). */
static int check_storage(Reader *rd, const char *name, hid_t ds, int rank, const hsize_t *dims)
{
    hid_t type = H5Dget_type(ds);
    size_t value_bytes = H5Tget_size(type);
    H5Tclose(type);
    hid_t dcpl = H5Dget_create_plist(ds);
    if (dcpl < 0)
        return kv_fail(rd->err, "%s: dataset %s: cannot read its storage properties", rd->path,
                       name);
    H5D_layout_t layout = H5Pget_layout(dcpl);
    int n_external = H5Pget_external_count(dcpl);
    int n_filters = H5Pget_nfilters(dcpl);
    hsize_t chunk[H5S_MAX_RANK] = {0};
    int chunk_rank = layout == H5D_CHUNKED ? H5Pget_chunk(dcpl, H5S_MAX_RANK, chunk) : 0;
    H5Pclose(dcpl);
    if (layout != H5D_COMPACT && layout != H5D_CONTIGUOUS && layout != H5D_CHUNKED)
        return kv_fail(rd->err, "%s: dataset %s: expected contiguous, chunked or compact storage, "
                       "found a virtual dataset or another layout", rd->path, name);
    if (n_external != 0)
        return kv_fail(rd->err, "%s: dataset %s: expected its values in the file, found external "
                       "storage", rd->path, name);
    size_t limit = rd->file_size;
    if (n_filters != 0)
        limit = rd->file_size > SIZE_MAX / FILTERED_EXPANSION ? SIZE_MAX
                                                              : rd->file_size * FILTERED_EXPANSION;
    size_t bytes = value_bytes;
    bool fits = bytes > 0;
    for (int i = 0; i < rank && fits; i++)
        fits = mul_within(&bytes, (size_t)dims[i], limit); /* dims <= INT_MAX or as wanted */
    if (!fits) {
        char shape[128];
        format_dims(shape, sizeof shape, rank, dims);
        return kv_fail(rd->err, "%s: dataset %s: shape %s of %zu-byte values holds more data "
                       "than the file's %zu bytes%s", rd->path, name, shape, value_bytes,
                       rd->file_size, n_filters ? " can decompress to" : "");
    }
    if (n_filters != 0)
        return 0; /* compressed sizes vary; HDF5's filters check what they decode */
    hsize_t stored = H5Dget_storage_size(ds);
    if (layout == H5D_CHUNKED) {
        /* Whole chunks: at most one per chunk position, each exactly chunk_bytes. */
        size_t chunk_bytes = value_bytes, n_chunks = 1;
        bool ok = chunk_rank == rank;
        for (int i = 0; ok && i < rank; i++)
            ok = chunk[i] >= 1 && mul_within(&chunk_bytes, (size_t)chunk[i], SIZE_MAX) &&
                 mul_within(&n_chunks, (size_t)((dims[i] + chunk[i] - 1) / chunk[i]), SIZE_MAX);
        if (!ok)
            return kv_fail(rd->err, "%s: dataset %s: its chunk shape does not match its rank %d",
                           rd->path, name, rank);
        if (stored % chunk_bytes != 0 || stored / chunk_bytes > n_chunks)
            return kv_fail(rd->err, "%s: dataset %s: stores %llu bytes, expected whole chunks of "
                           "%zu bytes, at most %zu of them", rd->path, name,
                           (unsigned long long)stored, chunk_bytes, n_chunks);
    } else if (stored != bytes && !(layout == H5D_CONTIGUOUS && stored == 0)) {
        return kv_fail(rd->err, "%s: dataset %s: stores %llu bytes, expected %zu", rd->path, name,
                       (unsigned long long)stored, bytes);
    }
    return 0;
}

/* Opens a dataset, checks its type class, shape and storage. `want` has `rank` entries, ANY_DIM
 * where any size up to INT_MAX is accepted; `dims` receives the actual shape. A null dataspace
 * reads as empty when some dimension is free. */
static hid_t dataset_open(Reader *rd, const char *name, H5T_class_t want_class, int rank,
                          const hsize_t *want, hsize_t *dims)
{
    int found_it = lookup(rd->file, rd->path, "dataset", name, rd->err);
    if (found_it <= 0) {
        if (found_it == 0)
            kv_fail(rd->err, "%s: dataset %s: missing", rd->path, name);
        return -1;
    }
    hid_t ds = H5Dopen2(rd->file, name, H5P_DEFAULT);
    if (ds < 0) {
        char why[300];
        kv_fail(rd->err, "%s: dataset %s: not a readable dataset%s", rd->path, name,
                h5_reason(why, sizeof why));
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
    if (found_rank > 0 && found_rank <= H5S_MAX_RANK)
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
            if (ok && found[i] > INT_MAX) { /* a count the trace's int fields cannot hold */
                kv_fail(rd->err, "%s: dataset %s: dimension %d is %llu, expected at most %d",
                        rd->path, name, i, (unsigned long long)found[i], INT_MAX);
                H5Dclose(ds);
                return -1;
            }
        }
    }
    if (!ok) {
        char w[128], f[128];
        format_dims(w, sizeof w, rank, want);
        if (sc == H5S_NULL)
            snprintf(f, sizeof f, "a null dataspace");
        else if (sc == H5S_SCALAR)
            snprintf(f, sizeof f, "a scalar");
        else if (found_rank < 0 || found_rank > H5S_MAX_RANK)
            snprintf(f, sizeof f, "an unreadable dataspace");
        else
            format_dims(f, sizeof f, found_rank, found);
        kv_fail(rd->err, "%s: dataset %s: expected shape %s, found %s", rd->path, name, w, f);
        H5Dclose(ds);
        return -1;
    }
    if (sc != H5S_NULL && check_storage(rd, name, ds, rank, dims) < 0) {
        H5Dclose(ds);
        return -1;
    }
    return ds;
}

/* Reads a whole integer dataset of the expected shape into out (n elements), each value
 * checked to be a 32-bit integer (HDF5 would clip a wider one into range without a word). */
static int read_ints(Reader *rd, const char *name, int rank, const hsize_t *want, hsize_t *dims,
                     int32_t **out)
{
    *out = NULL;
    hid_t ds = dataset_open(rd, name, H5T_INTEGER, rank, want, dims);
    if (ds < 0)
        return -1;
    size_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= (size_t)dims[i]; /* bounded by check_storage */
    hid_t type = H5Dget_type(ds);
    bool is_signed = H5Tget_sign(type) != H5T_SGN_NONE;
    H5Tclose(type);
    int64_t *wide = kv_calloc(n, sizeof *wide);
    *out = kv_calloc(n, sizeof **out);
    int rc = 0;
    if (n > 0 && H5Dread(ds, is_signed ? H5T_NATIVE_INT64 : H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL,
                         H5P_DEFAULT, wide) < 0) {
        char why[300];
        rc = kv_fail(rd->err, "%s: dataset %s: cannot read%s", rd->path, name,
                     h5_reason(why, sizeof why));
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (is_signed ? (wide[i] < INT32_MIN || wide[i] > INT32_MAX) : (uint64_t)wide[i] > INT32_MAX) {
            char value[32];
            if (is_signed)
                snprintf(value, sizeof value, "%" PRId64, wide[i]);
            else
                snprintf(value, sizeof value, "%" PRIu64, (uint64_t)wide[i]);
            rc = kv_fail(rd->err, "%s: dataset %s: element %zu is %s, expected a 32-bit integer",
                         rd->path, name, i, value);
        } else {
            (*out)[i] = (int32_t)wide[i];
        }
    }
    free(wide);
    H5Dclose(ds);
    return rc;
}

static int read_header(Reader *rd, TraceMeta *m)
{
    char format[64], esc[160];
    int version;
    if (attr_string(rd, "format", format, sizeof format) < 0)
        return -1;
    if (strcmp(format, TRACE_FORMAT) != 0)
        return kv_fail(rd->err, "%s: attribute format: expected \"%s\", found \"%s\"", rd->path,
                       TRACE_FORMAT, kv_escape(format, strlen(format), esc, sizeof esc));
    if (attr_int(rd, "version", &version) < 0)
        return -1;
    if (version < TRACE_VERSION_OLDEST || version > TRACE_VERSION)
        return kv_fail(rd->err, "%s: attribute version: expected %d to %d, found %d", rd->path,
                       TRACE_VERSION_OLDEST, TRACE_VERSION, version);
    m->version = version;

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
    /* Optional: the RoPE attention factor (traces written before it existed have none: 1). */
    m->rope_attention_factor = 1.0;
    htri_t has_factor = H5Aexists(rd->file, "rope_attention_factor");
    if (has_factor < 0)
        return kv_fail(rd->err, "%s: attribute rope_attention_factor: cannot look it up",
                       rd->path);
    if (has_factor > 0) {
        if (attr_double(rd, "rope_attention_factor", &m->rope_attention_factor) < 0)
            return -1;
        if (!(m->rope_attention_factor > 0) || !isfinite(m->rope_attention_factor))
            return kv_fail(rd->err, "%s: attribute rope_attention_factor: expected a finite "
                           "value > 0, found %g", rd->path, m->rope_attention_factor);
    }
    /* Optional: the logits' soft-capping (traces written before it existed have none: 0). */
    m->attn_softcap = 0;
    htri_t has_softcap = H5Aexists(rd->file, "attn_softcap");
    if (has_softcap < 0)
        return kv_fail(rd->err, "%s: attribute attn_softcap: cannot look it up", rd->path);
    if (has_softcap > 0 && attr_double(rd, "attn_softcap", &m->attn_softcap) < 0)
        return -1;
    /* Version 2: the model's size (version 1 traces leave it unknown, 0). */
    if (version >= 2 && (attr_int(rd, "hidden_size", &m->hidden_size) < 0 ||
                         attr_int(rd, "intermediate_size", &m->intermediate_size) < 0 ||
                         attr_int(rd, "vocab_size", &m->vocab_size) < 0 ||
                         attr_int64(rd, "n_params", &m->n_params) < 0))
        return -1;
    if (!strcmp(layout, "half"))
        m->rope_layout = ROPE_HALF;
    else if (!strcmp(layout, "interleaved"))
        m->rope_layout = ROPE_INTERLEAVED;
    else
        return kv_fail(rd->err, "%s: attribute rope_layout: expected half or interleaved, found \"%s\"",
                       rd->path, kv_escape(layout, strlen(layout), esc, sizeof esc));
    return validate_dims(m, rd->path, rd->err);
}

/* The shapes of the metadata datasets (and so the needle, probe and row counts), before any
 * of them is read. */
static int probe_metadata(Reader *rd, TraceMeta *m)
{
    hsize_t T = (hsize_t)m->n_tokens, dims[2];
    const hsize_t want_t[1] = {T}, want_needles[2] = {ANY_DIM, 2}, want_any[1] = {ANY_DIM},
                  want_f[1] = {(hsize_t)(m->head_dim / 2)};
    const char *per_token[3] = {"/tokens", "/positions", "/segments"};
    for (int i = 0; i < 3; i++) {
        hid_t ds = dataset_open(rd, per_token[i], H5T_INTEGER, 1, want_t, dims);
        if (ds < 0)
            return -1;
        H5Dclose(ds);
    }
    hid_t ds = dataset_open(rd, "/needles", H5T_INTEGER, 2, want_needles, dims);
    if (ds < 0)
        return -1;
    H5Dclose(ds);
    m->n_needles = (int)dims[0];
    if ((ds = dataset_open(rd, "/probes", H5T_INTEGER, 1, want_any, dims)) < 0)
        return -1;
    H5Dclose(ds);
    m->n_probes = (int)dims[0];
    m->n_attn_rows = 0;
    int has_rows = lookup(rd->file, rd->path, "dataset", "/attn_rows_at", rd->err);
    int has_freq = lookup(rd->file, rd->path, "dataset", "/rope_inv_freq", rd->err);
    if (has_rows < 0 || has_freq < 0)
        return -1;
    if (has_rows) {
        if ((ds = dataset_open(rd, "/attn_rows_at", H5T_INTEGER, 1, want_any, dims)) < 0)
            return -1;
        H5Dclose(ds);
        m->n_attn_rows = (int)dims[0];
    }
    if (m->version >= 2) {
        /* Per layer: the window and the RoPE frequencies; the spans. */
        const hsize_t want_l[1] = {(hsize_t)m->n_layers},
                      want_lf[2] = {(hsize_t)m->n_layers, (hsize_t)(m->head_dim / 2)},
                      want_spans[2] = {ANY_DIM, 3};
        if ((ds = dataset_open(rd, "/window", H5T_INTEGER, 1, want_l, dims)) < 0)
            return -1;
        H5Dclose(ds);
        if (has_freq && (ds = dataset_open(rd, "/rope_inv_freq", H5T_FLOAT, 2, want_lf, dims)) < 0)
            return -1;
        if (has_freq)
            H5Dclose(ds);
        if ((ds = dataset_open(rd, "/spans", H5T_INTEGER, 2, want_spans, dims)) < 0)
            return -1;
        H5Dclose(ds);
        rd->n_spans = (int)dims[0];
    } else if (has_freq) {
        if ((ds = dataset_open(rd, "/rope_inv_freq", H5T_FLOAT, 1, want_f, dims)) < 0)
            return -1;
        H5Dclose(ds);
    }
    return validate_sizes(m, rd->path, rd->err);
}

/* Reads a whole float dataset of the expected shape (checked again) as doubles into out. */
static int read_doubles(Reader *rd, const char *name, int rank, const hsize_t *want, double *out)
{
    hsize_t dims[2];
    hid_t ds = dataset_open(rd, name, H5T_FLOAT, rank, want, dims);
    if (ds < 0)
        return -1;
    herr_t st = H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
    H5Dclose(ds);
    if (st < 0) {
        char why[300];
        return kv_fail(rd->err, "%s: dataset %s: cannot read%s", rd->path, name,
                       h5_reason(why, sizeof why));
    }
    return 0;
}

/* Version 2's per-layer datasets: /window, /rope_inv_freq [L][D/2] (when has_freq), /spans
 * [S][3]. */
static int read_layer_geometry(Reader *rd, TraceMeta *m, int has_freq)
{
    const hsize_t want_l[1] = {(hsize_t)m->n_layers},
                  want_lf[2] = {(hsize_t)m->n_layers, (hsize_t)(m->head_dim / 2)},
                  want_spans[2] = {ANY_DIM, 3};
    hsize_t dims[2];
    int32_t *window = NULL, *spans = NULL;
    int rc = -1;
    if (read_ints(rd, "/window", 1, want_l, dims, &window) < 0 ||
        (has_freq && read_doubles(rd, "/rope_inv_freq", 2, want_lf, m->rope_inv_freq) < 0) ||
        read_ints(rd, "/spans", 2, want_spans, dims, &spans) < 0)
        goto out;
    if (dims[0] != (hsize_t)rd->n_spans) {
        kv_fail(rd->err, "%s: the file changed while it was being read", rd->path);
        goto out;
    }
    memcpy(m->window, window, (size_t)m->n_layers * sizeof *window);
    int n_prompt = m->n_prompt; /* set_spans sets it from the spans: checked against the file's */
    TraceSpan *list = kv_calloc((size_t)rd->n_spans + 1, sizeof *list);
    for (int i = 0; i < rd->n_spans; i++)
        list[i] = (TraceSpan){spans[3 * i], spans[3 * i + 1], spans[3 * i + 2]};
    trace_meta_set_spans(m, rd->n_spans, list);
    m->n_prompt = n_prompt;
    free(list);
    rc = 0;
out:
    free(window);
    free(spans);
    return rc;
}

static int read_metadata(Reader *rd, TraceMeta *m)
{
    hsize_t T = (hsize_t)m->n_tokens, dims[2];
    /* The counts were taken by probe_metadata; the shapes are checked again as they are read. */
    const hsize_t want_t[1] = {T}, want_needles[2] = {ANY_DIM, 2}, want_any[1] = {ANY_DIM};
    hsize_t n_needles = 0, n_probes = 0, n_rows = 0;
    int32_t *tokens = NULL, *positions = NULL, *segments = NULL, *needles = NULL, *probes = NULL,
            *rows_at = NULL;
    int rc = -1;
    if (read_ints(rd, "/tokens", 1, want_t, dims, &tokens) < 0 ||
        read_ints(rd, "/positions", 1, want_t, dims, &positions) < 0 ||
        read_ints(rd, "/segments", 1, want_t, dims, &segments) < 0 ||
        read_ints(rd, "/needles", 2, want_needles, dims, &needles) < 0)
        goto out;
    n_needles = dims[0];
    if (read_ints(rd, "/probes", 1, want_any, dims, &probes) < 0)
        goto out;
    n_probes = dims[0];
    if (m->n_attn_rows > 0) {
        if (read_ints(rd, "/attn_rows_at", 1, want_any, dims, &rows_at) < 0)
            goto out;
        n_rows = dims[0];
    }
    if (n_needles != (hsize_t)m->n_needles || n_probes != (hsize_t)m->n_probes ||
        n_rows != (hsize_t)m->n_attn_rows) {
        kv_fail(rd->err, "%s: the file changed while it was being read", rd->path);
        goto out;
    }

    trace_meta_alloc_arrays(m); /* also fills rope_inv_freq with the unscaled default */
    size_t T_bytes = (size_t)T * sizeof(int32_t);
    memcpy(m->tokens, tokens, T_bytes);
    memcpy(m->positions, positions, T_bytes);
    memcpy(m->segments, segments, T_bytes);
    memcpy(m->needles, needles, (size_t)m->n_needles * 2 * sizeof(int32_t));
    memcpy(m->probes, probes, (size_t)m->n_probes * sizeof(int32_t));
    if (m->n_attn_rows)
        memcpy(m->attn_rows_at, rows_at, (size_t)m->n_attn_rows * sizeof(int32_t));

    int has_freq = lookup(rd->file, rd->path, "dataset", "/rope_inv_freq", rd->err);
    if (has_freq < 0)
        goto out;
    if (m->version >= 2 && read_layer_geometry(rd, m, has_freq) < 0)
        goto out;
    if (m->version < 2 && has_freq) {
        /* Version 1: one row, every layer's. */
        const hsize_t want_f[1] = {(hsize_t)(m->head_dim / 2)};
        if (read_doubles(rd, "/rope_inv_freq", 1, want_f, m->rope_inv_freq) < 0)
            goto out;
        size_t F = (size_t)(m->head_dim / 2);
        for (int l = 1; l < m->n_layers; l++)
            memcpy(m->rope_inv_freq + (size_t)l * F, m->rope_inv_freq, F * sizeof(double));
    } else if (!has_freq) {
        for (int f = 0; f < m->head_dim / 2; f++)
            if (!isfinite(m->rope_inv_freq[f] * (double)m->positions[T - 1])) {
                kv_fail(rd->err, "%s: attribute rope_theta: %g gives RoPE frequency %g (pair %d), "
                        "whose angles overflow (and /rope_inv_freq is absent)", rd->path,
                        m->rope_theta, m->rope_inv_freq[f], f);
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
        } else {
            int present = lookup(rd->file, rd->path, "dataset", name, rd->err);
            if (present < 0)
                return -1;
            if (present)
                return kv_fail(rd->err, "%s: dataset %s: present but /attn_rows_at is absent or "
                               "empty", rd->path, name);
        }
    }
    return 0;
}

Trace *trace_open(const char *path, KvErr *err)
{
    h5_quiet();
    if (strlen(path) >= sizeof((Trace *)0)->path) {
        kv_fail(err, "%s: path too long", path);
        return NULL;
    }
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; HDF5 is then given only a regular
     * file, whose size bounds every dataset (check_storage). */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        kv_fail(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    int stat_rc = fstat(fd, &st);
    close(fd);
    if (stat_rc != 0 || !S_ISREG(st.st_mode)) {
        kv_fail(err, "%s: not a regular file", path);
        return NULL;
    }
    if (H5Fis_hdf5(path) <= 0) {
        kv_fail(err, "%s: not an HDF5 file", path);
        return NULL;
    }
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        char why[300];
        kv_fail(err, "%s: cannot open as HDF5%s", path, h5_reason(why, sizeof why));
        return NULL;
    }
    Trace *tr = kv_calloc(1, sizeof *tr);
    strcpy(tr->path, path);
    tr->file = file;
    Reader rd = {path, file, (size_t)st.st_size, err, 0};
    /* Nothing sized by the file is allocated before the datasets of that size are found in it:
     * the header, then the shapes of the metadata and of every layer, then the values. */
    if (read_header(&rd, &tr->meta) < 0 || probe_metadata(&rd, &tr->meta) < 0 ||
        check_layers(&rd, &tr->meta, &tr->dtype) < 0 || read_metadata(&rd, &tr->meta) < 0) {
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

/* The replay reads layers from several threads at once (sim/replay/engine.c). An HDF5 built
 * without --enable-threadsafe (Debian's is thread-safe) must not be entered concurrently: then
 * every dataset read holds this lock. */
static pthread_mutex_t h5_read_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t h5_threadsafe_once = PTHREAD_ONCE_INIT;
static bool h5_threadsafe;

static void check_h5_threadsafe(void)
{
    hbool_t yes = 0;
    h5_threadsafe = H5is_library_threadsafe(&yes) >= 0 && yes;
}

static bool h5_read_begin(void)
{
    pthread_once(&h5_threadsafe_once, check_h5_threadsafe);
    if (!h5_threadsafe)
        pthread_mutex_lock(&h5_read_lock);
    return !h5_threadsafe;
}

static void h5_read_end(bool locked)
{
    if (locked)
        pthread_mutex_unlock(&h5_read_lock);
}

/* Reads a whole [d0][d1][d2] float dataset as float32. float16 data is read as raw half
 * patterns into the first half of `out` and widened in place from the end, so no second buffer
 * is needed. */
static int read_values(Trace *tr, const char *name, float *out, const size_t dim[3],
                       KvErr *err)
{
    size_t n = dim[0] * dim[1] * dim[2];
    bool locked = h5_read_begin();
    hid_t ds = H5Dopen2(tr->file, name, H5P_DEFAULT);
    if (ds < 0) {
        h5_read_end(locked);
        return kv_fail(err, "%s: dataset %s: cannot open", tr->path, name);
    }
    hid_t type = H5Dget_type(ds);
    TraceDtype dt = TRACE_F32;
    bool half = float_dtype(type, &dt) == 0 && dt == TRACE_F16;
    H5Tclose(type);
    hid_t mem = half ? half_type() : H5Tcopy(H5T_NATIVE_FLOAT);
    herr_t st = H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
    H5Tclose(mem);
    H5Dclose(ds);
    char why[300] = "";
    if (st < 0)
        h5_reason(why, sizeof why); /* the error stack, before another thread's read */
    h5_read_end(locked);
    if (st < 0)
        return kv_fail(err, "%s: dataset %s: read failed%s", tr->path, name, why);
    if (half) {
        const uint16_t *raw = (const uint16_t *)(void *)out;
        for (size_t i = n; i-- > 0;)
            out[i] = float_from_half(raw[i]);
    }
    for (size_t i = 0; i < n; i++)
        if (!isfinite(out[i]))
            return kv_fail(err, "%s: dataset %s: element [%zu,%zu,%zu] is not a finite float32 "
                           "value", tr->path, name, i / (dim[1] * dim[2]), i / dim[2] % dim[1],
                           i % dim[2]);
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
    size_t T = (size_t)m->n_tokens, D = (size_t)m->head_dim;
    const size_t dims[3][3] = {{(size_t)m->n_q_heads, T, D}, {(size_t)m->n_kv_heads, T, D},
                               {(size_t)m->n_kv_heads, T, D}};
    char name[64];
    for (int i = 0; i < 3; i++) {
        if (!outs[i])
            continue;
        layer_name(name, sizeof name, layer, leaves[i]);
        if (read_values(tr, name, outs[i], dims[i], err) < 0)
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
    const size_t dims[3] = {(size_t)m->n_q_heads, (size_t)m->n_attn_rows, (size_t)m->n_tokens};
    return read_values(tr, name, rows, dims, err);
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
    GuardCtl guard; /* the file driver's state: discarding, and the errno of its first failure */
    bool registered; /* tmp_path is in the signal handler's list */
    int n_layers, n_q_heads, n_kv_heads, head_dim, n_tokens, n_attn_rows;
    TraceDtype dtype;
    uint16_t *half_buf; /* conversion buffer for float16 writes */
    size_t half_cap;
    hid_t *q, *k, *v, *rows;       /* [n_layers] open datasets */
    unsigned char *token_written;  /* [n_layers][n_tokens] */
    unsigned char *row_written;    /* [n_layers][n_attn_rows] */
};

/* Why the last write failed, as ": <reason>": the driver's errno ("No space left on device"),
 * else HDF5's innermost message, else "". */
static const char *writer_reason(const TraceWriter *w, char *out, size_t outlen)
{
    if (w->guard.error) {
        snprintf(out, outlen, ": %s", strerror(w->guard.error));
        return out;
    }
    return h5_reason(out, outlen);
}

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

/* A scalar root attribute: stored as file_type, given in memory as mem_type at value. */
static int write_attr_scalar(hid_t file, const char *name, hid_t file_type, hid_t mem_type,
                             const void *value)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = a < 0 ? -1 : H5Awrite(a, mem_type, value);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

static int write_attr_int(hid_t file, const char *name, int value)
{
    int32_t v = value;
    return write_attr_scalar(file, name, H5T_STD_I32LE, H5T_NATIVE_INT32, &v);
}

static int write_attr_int64(hid_t file, const char *name, int64_t value)
{
    return write_attr_scalar(file, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}

static int write_attr_double(hid_t file, const char *name, double value)
{
    return write_attr_scalar(file, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

/* A metadata dataset written whole (nothing written when it has no elements). Non-empty ones are
 * chunked with a Fletcher-32 checksum per chunk, so that a damaged needle span or position is
 * an error on reading, not a different number (they are small; Q/K/V are left unchecksummed,
 * which would cost about a quarter more time per read). */
static int write_array(hid_t file, const char *name, hid_t file_type, hid_t mem_type, int rank,
                       const hsize_t *dims, const void *data)
{
    hid_t space = H5Screate_simple(rank, dims, NULL);
    hsize_t n = 1, chunk[2];
    for (int i = 0; i < rank; i++) {
        n *= dims[i];
        chunk[i] = i == 0 && dims[0] > ((hsize_t)1 << 18) ? (hsize_t)1 << 18 : dims[i];
    }
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (n > 0) {
        H5Pset_chunk(dcpl, rank, chunk);
        H5Pset_fletcher32(dcpl);
    }
    hid_t ds = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    herr_t st = ds < 0 ? -1 : 0;
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
            rows_dims[1] = {(hsize_t)m->n_attn_rows},
            freq_dims[2] = {(hsize_t)m->n_layers, (hsize_t)(m->head_dim / 2)},
            layer_dims[1] = {(hsize_t)m->n_layers}, span_dims[2] = {(hsize_t)m->n_spans, 3};
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
    bad |= write_attr_double(file, "rope_attention_factor", m->rope_attention_factor);
    if (m->attn_softcap > 0) /* absent = none, as in the traces written before it existed */
        bad |= write_attr_double(file, "attn_softcap", m->attn_softcap);
    bad |= write_attr_int(file, "hidden_size", m->hidden_size);
    bad |= write_attr_int(file, "intermediate_size", m->intermediate_size);
    bad |= write_attr_int(file, "vocab_size", m->vocab_size);
    bad |= write_attr_int64(file, "n_params", m->n_params);
    bad |= write_array(file, "/tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, &T, m->tokens);
    bad |= write_array(file, "/positions", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, &T, m->positions);
    bad |= write_array(file, "/segments", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, &T, m->segments);
    bad |= write_array(file, "/needles", H5T_STD_I32LE, H5T_NATIVE_INT32, 2, needles_dims, m->needles);
    bad |= write_array(file, "/probes", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, probes_dims, m->probes);
    bad |= write_array(file, "/rope_inv_freq", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 2, freq_dims,
                       m->rope_inv_freq);
    bad |= write_array(file, "/window", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, layer_dims, m->window);
    int32_t *spans = kv_malloc((size_t)m->n_spans * 3 * sizeof *spans);
    for (int i = 0; i < m->n_spans; i++) {
        spans[3 * i] = m->spans[i].kind;
        spans[3 * i + 1] = m->spans[i].start;
        spans[3 * i + 2] = m->spans[i].end;
    }
    bad |= write_array(file, "/spans", H5T_STD_I32LE, H5T_NATIVE_INT32, 2, span_dims, spans);
    free(spans);
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

    /* Registered before it exists, so that SIGINT/SIGTERM at any point removes it. */
    kv_temp_register(w->tmp_path);
    w->registered = true;
    hid_t driver = guard_driver(), fapl = H5Pcreate(H5P_FILE_ACCESS);
    guard_open_errno = 0;
    /* The HDF5 1.10 format: metadata carries checksums, so a damaged byte in it is an error when
     * the trace is read, never structure that HDF5 parses (and, with 1.10's parsers, may copy
     * past its buffers with). The root attributes stay in the root's object header (checksummed;
     * past 8 HDF5 would move them to a heap whose blocks are not). Readable by HDF5 >= 1.10. */
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
    if (driver >= 0 && fapl >= 0 && fcpl >= 0 && H5Pset_driver(fapl, driver, NULL) >= 0 &&
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110) >= 0 &&
        H5Pset_attr_phase_change(fcpl, ROOT_ATTRS_COMPACT, ROOT_ATTRS_COMPACT) >= 0)
        w->file = H5Fcreate(w->tmp_path, H5F_ACC_TRUNC, fcpl, fapl);
    if (fcpl >= 0)
        H5Pclose(fcpl);
    if (fapl >= 0)
        H5Pclose(fapl);
    if (w->file < 0) {
        char why[300];
        if (guard_open_errno && access(w->tmp_path, F_OK) != 0)
            snprintf(why, sizeof why, ": %s", strerror(guard_open_errno));
        else
            h5_reason(why, sizeof why);
        kv_fail(err, "%s: cannot create temporary file %s%s", path, w->tmp_path, why);
        unlink(w->tmp_path);
        kv_temp_unregister(w->tmp_path);
        writer_free(w);
        return NULL;
    }
    void *handle = NULL;
    if (H5Fget_vfd_handle(w->file, H5P_DEFAULT, &handle) < 0 || !handle) {
        /* Nothing is written yet, so this close cannot fail on I/O. */
        kv_fail(err, "%s: cannot set up the temporary file %s", path, w->tmp_path);
        H5Fclose(w->file);
        w->file = -1;
        trace_writer_abort(w);
        return NULL;
    }
    GuardFile *g = handle;
    w->guard = g->own;
    g->ctl = &w->guard; /* survives the driver's close, so finish can still read the errno */
    if (write_root(w->file, meta) < 0 || w->guard.error) {
        char why[300];
        kv_fail(err, "%s: cannot write the header%s", path, writer_reason(w, why, sizeof why));
        trace_writer_abort(w);
        return NULL;
    }
    /* The layers' links, too, in /layers' checksummed object header (up to LAYER_LINKS_COMPACT;
     * a lookup there is a linear scan). */
    hid_t gcpl = H5Pcreate(H5P_GROUP_CREATE);
    H5Pset_link_phase_change(gcpl, LAYER_LINKS_COMPACT, LAYER_LINKS_COMPACT);
    hid_t layers = H5Gcreate2(w->file, "/layers", H5P_DEFAULT, gcpl, H5P_DEFAULT);
    H5Pclose(gcpl);
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
    if (bad || w->guard.error) {
        char why[300];
        kv_fail(err, "%s: cannot create the layer datasets%s", path,
                writer_reason(w, why, sizeof why));
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
    /* float16: |x| >= 65520 rounds to infinity (docs/trace-format.md) */
    const float limit = w->dtype == TRACE_F16 ? 65520.0f : INFINITY;
    for (size_t i = 0; i < n; i++)
        if (!(fabsf(data[i]) < limit)) {
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
    if (st < 0 || w->guard.error) {
        char why[300];
        return kv_fail(err, "%s: layer %d %s: writing tokens [%d,%d) failed%s", w->path, layer,
                       leaf, t0, t0 + nt, writer_reason(w, why, sizeof why));
    }
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
    if (w->guard.error)
        return kv_fail(err, "%s: an earlier write failed: %s", w->path, strerror(w->guard.error));
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
    if (w->guard.error)
        return kv_fail(err, "%s: an earlier write failed: %s", w->path, strerror(w->guard.error));
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
    if (st < 0 || w->guard.error) {
        char why[300];
        return kv_fail(err, "%s: layer %d: writing attention row %d failed%s", w->path, layer, r,
                       writer_reason(w, why, sizeof why));
    }
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
    /* A write that fails while HDF5 flushes and closes is recorded by the file driver, never
     * returned to HDF5 (see the driver above). */
    char why[300];
    if (H5Fflush(w->file, H5F_SCOPE_LOCAL) < 0 || w->guard.error) {
        kv_fail(err, "%s: writing the trace failed%s", w->path, writer_reason(w, why, sizeof why));
        trace_writer_abort(w);
        return -1;
    }
    writer_close_handles(w);
    herr_t st = H5Fclose(w->file);
    w->file = -1;
    if (st < 0 || w->guard.error) {
        kv_fail(err, "%s: closing the trace failed%s", w->path, writer_reason(w, why, sizeof why));
        trace_writer_abort(w);
        return -1;
    }
    if (rename(w->tmp_path, w->path) != 0) {
        kv_fail(err, "%s: cannot rename temporary file into place: %s", w->path, strerror(errno));
        trace_writer_abort(w);
        return -1;
    }
    kv_temp_unregister(w->tmp_path);
    writer_free(w);
    return 0;
}

void trace_writer_abort(TraceWriter *w)
{
    if (!w)
        return;
    h5_quiet();
    w->guard.discard = true; /* the file is deleted: closing it writes nothing */
    writer_close_handles(w);
    if (w->file >= 0)
        H5Fclose(w->file);
    w->file = -1;
    unlink(w->tmp_path);
    if (w->registered)
        kv_temp_unregister(w->tmp_path);
    writer_free(w);
}
