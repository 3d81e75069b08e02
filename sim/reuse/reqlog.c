/* Request logs, read line by line through zlib (which reads plain files as they are). */
#include "sim/reuse/reqlog.h"

#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "sim/base/json.h"
#include "sim/base/progress.h"

struct ReqReader {
    gzFile gz;
    char path[1024];
    ReqlogFormat format;
    char *buf;          /* bytes read, not yet consumed: [pos, len) */
    size_t cap, len, pos;
    bool eof;
    long line;
    double last_ts;
    bool have_ts;
    int64_t *hash;
    size_t hash_cap;
    int64_t size; /* bytes of the file (compressed, for gzip) */
    bool general_only; /* reqlog_general_only: no fast path */
};

ReqReader *reqlog_open(const char *path, ReqlogFormat format, KvErr *err)
{
    FILE *fp = kv_open_input(path, err); /* regular files only, with the usual messages */
    if (!fp)
        return NULL;
    struct stat st;
    int64_t size = fstat(fileno(fp), &st) == 0 ? (int64_t)st.st_size : 0;
    int fd = dup(fileno(fp));
    fclose(fp);
    gzFile gz = fd >= 0 ? gzdopen(fd, "rb") : NULL;
    if (!gz) {
        if (fd >= 0)
            close(fd);
        kv_fail(err, "%s: cannot read", path);
        return NULL;
    }
    gzbuffer(gz, 1 << 17);
    ReqReader *r = kv_calloc(1, sizeof *r);
    r->gz = gz;
    snprintf(r->path, sizeof r->path, "%s", path);
    r->format = format;
    r->size = size;
    r->cap = 1 << 16;
    r->buf = kv_malloc(r->cap);
    return r;
}

long reqlog_read_mib(const ReqReader *r)
{
    return (long)(gzoffset(r->gz) >> 20);
}

long reqlog_size_mib(const ReqReader *r)
{
    return (long)(r->size >> 20);
}

void reqlog_close(ReqReader *r)
{
    if (!r)
        return;
    gzclose(r->gz);
    free(r->buf);
    free(r->hash);
    free(r);
}

void reqlog_general_only(ReqReader *r)
{
    r->general_only = true;
}

ReqlogFormat reqlog_format(const ReqReader *r)
{
    return r->format;
}

/* The next line without its '\n' (NUL-terminated in place); NULL at the end. */
static char *next_line(ReqReader *r, size_t *n, KvErr *err, bool *failed)
{
    *failed = false;
    for (;;) {
        char *nl = r->pos < r->len ? memchr(r->buf + r->pos, '\n', r->len - r->pos) : NULL;
        if (nl || (r->eof && r->pos < r->len)) {
            char *s = r->buf + r->pos;
            size_t end = nl ? (size_t)(nl - r->buf) : r->len;
            *n = end - r->pos;
            if (!nl) { /* last line without '\n': room for the NUL */
                if (r->len == r->cap) {
                    r->cap *= 2;
                    r->buf = kv_realloc(r->buf, r->cap);
                    s = r->buf + r->pos;
                }
            }
            r->buf[end] = '\0';
            r->pos = nl ? end + 1 : r->len;
            r->line++;
            return s;
        }
        if (r->eof)
            return NULL;
        if (r->pos > 0) { /* keep the partial line at the start */
            memmove(r->buf, r->buf + r->pos, r->len - r->pos);
            r->len -= r->pos;
            r->pos = 0;
        }
        if (r->len == r->cap) {
            r->cap *= 2;
            r->buf = kv_realloc(r->buf, r->cap);
        }
        int got = gzread(r->gz, r->buf + r->len, (unsigned)(r->cap - r->len > (1u << 30) ? 1u << 30 : r->cap - r->len));
        if (got < 0) {
            int code;
            const char *msg = gzerror(r->gz, &code);
            kv_fail(err, "%s:%ld: cannot read: %s", r->path, r->line + 1, msg);
            *failed = true;
            return NULL;
        }
        if (got == 0)
            r->eof = true;
        r->len += (size_t)got;
    }
}

static const cJSON *field(const ReqReader *r, const cJSON *obj, const char *name, KvErr *err)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!f)
        kv_fail(err, "%s:%ld: missing field '%s'", r->path, r->line, name);
    return f;
}

/* The largest id (exact in a double) and the largest length (sums over any log fit an int64). */
#define REQLOG_MAX_ID 9007199254740992.0
#define REQLOG_MAX_LENGTH 1099511627776.0
#define REQLOG_MAX_MODEL 2147483647.0

/* An integer field in [lo, hi]. */
static int int_field(const ReqReader *r, const cJSON *obj, const char *name, int64_t lo,
                     double hi, int64_t *out, KvErr *err)
{
    const cJSON *f = field(r, obj, name, err);
    if (!f)
        return -1;
    double v = f->valuedouble;
    if (!cJSON_IsNumber(f) || v != floor(v) || v < (double)lo || v > hi) {
        char found[64];
        if (cJSON_IsNumber(f))
            snprintf(found, sizeof found, "%.17g", v);
        else
            snprintf(found, sizeof found, "a %s", cJSON_IsString(f) ? "string" : cJSON_IsArray(f) ? "list" : "non-number");
        return kv_fail(err, "%s:%ld: %s: expected an integer >= %lld and <= %.0f, found %s",
                       r->path, r->line, name, (long long)lo, hi, found);
    }
    *out = (int64_t)v;
    return 0;
}

static int parse_record(ReqReader *r, const cJSON *obj, ReqRecord *rec, KvErr *err)
{
    memset(rec, 0, sizeof *rec);
    rec->line = r->line;
    rec->chat_id = rec->parent_chat_id = -1;
    if (r->format == REQLOG_AUTO)
        r->format = cJSON_GetObjectItemCaseSensitive(obj, "chat_id") ? REQLOG_QWEN : REQLOG_MOONCAKE;
    bool qwen = r->format == REQLOG_QWEN;
    if (qwen) {
        if (int_field(r, obj, "chat_id", 0, REQLOG_MAX_ID, &rec->chat_id, err) < 0 ||
            int_field(r, obj, "parent_chat_id", -1, REQLOG_MAX_ID, &rec->parent_chat_id, err) < 0 ||
            int_field(r, obj, "turn", 0, REQLOG_MAX_ID, &rec->turn, err) < 0)
            return -1;
        const cJSON *type = field(r, obj, "type", err);
        if (!type)
            return -1;
        if (!cJSON_IsString(type))
            return kv_fail(err, "%s:%ld: type: expected a string", r->path, r->line);
        snprintf(rec->type, sizeof rec->type, "%s", type->valuestring);
        /* optional (the synthetic logs' extension): the model that served the request */
        if (cJSON_GetObjectItemCaseSensitive(obj, "model") &&
            int_field(r, obj, "model", 0, REQLOG_MAX_MODEL, &rec->model, err) < 0)
            return -1;
    }
    const cJSON *ts = field(r, obj, "timestamp", err);
    if (!ts)
        return -1;
    if (!cJSON_IsNumber(ts) || !isfinite(ts->valuedouble) || ts->valuedouble < 0)
        return kv_fail(err, "%s:%ld: timestamp: expected a number >= 0 (%s)", r->path, r->line,
                       qwen ? "seconds" : "milliseconds");
    rec->timestamp = qwen ? ts->valuedouble : ts->valuedouble / 1000.0;
    if (r->have_ts && rec->timestamp < r->last_ts)
        return kv_fail(err, "%s:%ld: timestamp %.17g is before the previous request's %.17g: "
                       "expected requests in order of arrival", r->path, r->line,
                       ts->valuedouble, qwen ? r->last_ts : r->last_ts * 1000.0);
    if (int_field(r, obj, "input_length", 0, REQLOG_MAX_LENGTH, &rec->input_length, err) < 0 ||
        int_field(r, obj, "output_length", 0, REQLOG_MAX_LENGTH, &rec->output_length, err) < 0)
        return -1;
    const cJSON *ids = field(r, obj, "hash_ids", err);
    if (!ids)
        return -1;
    if (!cJSON_IsArray(ids))
        return kv_fail(err, "%s:%ld: hash_ids: expected a list of integers", r->path, r->line);
    long n = 0;
    for (const cJSON *e = ids->child; e; e = e->next) {
        double v = e->valuedouble;
        if (!cJSON_IsNumber(e) || v != floor(v) || v < 0 || v > REQLOG_MAX_ID)
            return kv_fail(err, "%s:%ld: hash_ids[%ld]: expected an integer >= 0", r->path,
                           r->line, n);
        if ((size_t)n == r->hash_cap) {
            r->hash_cap = r->hash_cap ? 2 * r->hash_cap : 256;
            r->hash = kv_realloc(r->hash, r->hash_cap * sizeof *r->hash);
        }
        r->hash[n++] = (int64_t)v;
    }
    rec->hash_ids = r->hash;
    rec->n_hash = n;
    r->last_ts = rec->timestamp;
    r->have_ts = true;
    return 0;
}

/* ---- the fast path ----
 *
 * Real logs are millions of flat objects of the same shape; cJSON spends most of the reading
 * time on them (a node per hash id). fast_parse reads the common case directly: an object of at
 * most 16 keys of plain printable ASCII, whose values are numbers, strings of plain printable
 * ASCII, or lists of integers of at most 15 digits, every field of the format present with a
 * value parse_record would accept. Anything else (escapes, non-ASCII text, nesting, literals,
 * an error of any kind) returns false, and the line goes the general way (json_text_check,
 * cJSON, parse_record), which accepts the same lines with the same values and words the
 * errors: the fast path changes the speed only. */

typedef struct {
    const char *key;
    size_t key_len;
    char kind; /* 'n' number, 's' string, 'a' list of integers */
    double num;
    const char *str;
    size_t str_len;
    long arr_at, arr_n; /* the list's integers: r->hash[arr_at .. arr_at + arr_n) */
} FastField;

static const char *fast_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
        p++;
    return p;
}

/* A plain string at p (after its opening quote): printable ASCII, no escape. */
static const char *fast_string(const char *p, size_t *len)
{
    const char *q = p;
    while (*q != '"') {
        if (*q < 0x20 || *q > 0x7e || *q == '\\')
            return NULL;
        q++;
    }
    *len = (size_t)(q - p);
    return q + 1;
}

/* A JSON number at p (the grammar of RFC 8259), converted as cJSON converts it (strtod). */
static const char *fast_number(const char *p, double *v)
{
    const char *q = p;
    if (*q == '-')
        q++;
    if (*q == '0')
        q++;
    else if (*q >= '1' && *q <= '9')
        while (*q >= '0' && *q <= '9')
            q++;
    else
        return NULL;
    if (*q == '.') {
        q++;
        if (!(*q >= '0' && *q <= '9'))
            return NULL;
        while (*q >= '0' && *q <= '9')
            q++;
    }
    if (*q == 'e' || *q == 'E') {
        q++;
        if (*q == '+' || *q == '-')
            q++;
        if (!(*q >= '0' && *q <= '9'))
            return NULL;
        while (*q >= '0' && *q <= '9')
            q++;
    }
    char *end;
    *v = strtod(p, &end);
    return end == q ? q : NULL;
}

static void hash_reserve(ReqReader *r, size_t n)
{
    if (n > r->hash_cap) {
        r->hash_cap = r->hash_cap ? 2 * r->hash_cap : 256;
        if (r->hash_cap < n)
            r->hash_cap = n;
        r->hash = kv_realloc(r->hash, r->hash_cap * sizeof *r->hash);
    }
}

static const FastField *fast_find(const FastField *f, int n, const char *key)
{
    size_t len = strlen(key);
    for (int i = 0; i < n; i++)
        if (f[i].key_len == len && !memcmp(f[i].key, key, len))
            return &f[i];
    return NULL;
}

/* An integer field as parse_record's int_field accepts it. */
static bool fast_int(const FastField *f, int n, const char *key, int64_t lo, double hi,
                     int64_t *out)
{
    const FastField *x = fast_find(f, n, key);
    if (!x || x->kind != 'n' || x->num != floor(x->num) || x->num < (double)lo || x->num > hi)
        return false;
    *out = (int64_t)x->num;
    return true;
}

static bool fast_parse(ReqReader *r, const char *s, size_t len, ReqRecord *rec)
{
    FastField f[16];
    int n = 0;
    long n_hash = 0;
    const char *p = fast_ws(s);
    if (*p++ != '{')
        return false;
    p = fast_ws(p);
    if (*p == '}')
        return false;
    for (;;) {
        if (n == 16 || *p++ != '"')
            return false;
        FastField *x = &f[n++];
        x->key = p;
        if (!(p = fast_string(p, &x->key_len)))
            return false;
        p = fast_ws(p);
        if (*p++ != ':')
            return false;
        p = fast_ws(p);
        if (*p == '"') {
            x->kind = 's';
            x->str = p + 1;
            if (!(p = fast_string(p + 1, &x->str_len)))
                return false;
        } else if (*p == '[') {
            x->kind = 'a';
            x->arr_at = n_hash;
            p = fast_ws(p + 1);
            if (*p != ']') {
                for (;;) {
                    int64_t v = 0;
                    int digits = 0;
                    if (*p == '0' && p[1] >= '0' && p[1] <= '9')
                        return false; /* a leading zero: not JSON */
                    while (*p >= '0' && *p <= '9' && digits < 16) {
                        v = 10 * v + (*p++ - '0');
                        digits++;
                    }
                    if (digits == 0 || digits > 15 || *p == '.' || *p == 'e' || *p == 'E')
                        return false;
                    hash_reserve(r, (size_t)n_hash + 1);
                    r->hash[n_hash++] = v;
                    p = fast_ws(p);
                    if (*p == ']')
                        break;
                    if (*p++ != ',')
                        return false;
                    p = fast_ws(p);
                }
            }
            p++;
            x->arr_n = n_hash - x->arr_at;
        } else {
            x->kind = 'n';
            if (!(p = fast_number(p, &x->num)))
                return false;
        }
        p = fast_ws(p);
        if (*p == '}')
            break;
        if (*p++ != ',')
            return false;
        p = fast_ws(p);
    }
    if (fast_ws(p + 1) != s + len) /* the line's end, not a NUL inside it */
        return false;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            if (f[i].key_len == f[j].key_len && !memcmp(f[i].key, f[j].key, f[i].key_len))
                return false;

    ReqlogFormat format = r->format;
    if (format == REQLOG_AUTO)
        format = fast_find(f, n, "chat_id") ? REQLOG_QWEN : REQLOG_MOONCAKE;
    bool qwen = format == REQLOG_QWEN;
    memset(rec, 0, sizeof *rec);
    rec->line = r->line;
    rec->chat_id = rec->parent_chat_id = -1;
    if (qwen) {
        const FastField *type = fast_find(f, n, "type");
        if (!fast_int(f, n, "chat_id", 0, REQLOG_MAX_ID, &rec->chat_id) ||
            !fast_int(f, n, "parent_chat_id", -1, REQLOG_MAX_ID, &rec->parent_chat_id) ||
            !fast_int(f, n, "turn", 0, REQLOG_MAX_ID, &rec->turn) || !type || type->kind != 's')
            return false;
        snprintf(rec->type, sizeof rec->type, "%.*s", (int)type->str_len, type->str);
        if (fast_find(f, n, "model") && !fast_int(f, n, "model", 0, REQLOG_MAX_MODEL, &rec->model))
            return false;
    }
    const FastField *ts = fast_find(f, n, "timestamp"), *ids = fast_find(f, n, "hash_ids");
    if (!ts || ts->kind != 'n' || !isfinite(ts->num) || ts->num < 0 || !ids || ids->kind != 'a')
        return false;
    rec->timestamp = qwen ? ts->num : ts->num / 1000.0;
    if ((r->have_ts && rec->timestamp < r->last_ts) ||
        !fast_int(f, n, "input_length", 0, REQLOG_MAX_LENGTH, &rec->input_length) ||
        !fast_int(f, n, "output_length", 0, REQLOG_MAX_LENGTH, &rec->output_length))
        return false;
    rec->hash_ids = r->hash + ids->arr_at;
    rec->n_hash = ids->arr_n;
    r->format = format;
    r->last_ts = rec->timestamp;
    r->have_ts = true;
    return true;
}

int reqlog_next(ReqReader *r, ReqRecord *rec, KvErr *err)
{
    for (;;) {
        size_t n;
        bool failed;
        char *s = next_line(r, &n, err, &failed);
        if (!s)
            return failed ? -1 : 0;
        size_t lead = 0;
        while (lead < n && (s[lead] == ' ' || s[lead] == '\t' || s[lead] == '\r'))
            lead++;
        if (lead == n)
            continue; /* blank line */
        if (!r->general_only && fast_parse(r, s, n, rec))
            return 1;
        const char *why;
        size_t bad = json_text_check(s, n, &why);
        if (bad < n)
            return kv_fail(err, "%s:%ld: byte %zu: %s", r->path, r->line, bad + 1, why);
        size_t at;
        int trailing = 0;
        cJSON *obj = json_parse_exact(s, n, &at, &trailing);
        if (!obj)
            return kv_fail(err, "%s:%ld: not valid JSON (%s at byte %zu): expected one request "
                           "object per line", r->path, r->line,
                           trailing ? "text after the object" : "parsing stopped", at + 1);
        const char *dup_key;
        int rc = 0;
        if (!cJSON_IsObject(obj))
            rc = kv_fail(err, "%s:%ld: expected a JSON object (one request per line)", r->path,
                         r->line);
        else if (json_duplicate_key(obj, &dup_key))
            rc = kv_fail(err, "%s:%ld: key '%s' appears twice", r->path, r->line, dup_key);
        else
            rc = parse_record(r, obj, rec, err);
        cJSON_Delete(obj);
        return rc < 0 ? -1 : 1;
    }
}

/* ---- IdMap ---- */

static size_t id_hash(int64_t key, size_t mask)
{
    uint64_t x = (uint64_t)key;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (size_t)x & mask;
}

void idmap_init(IdMap *m)
{
    m->cap = 1024;
    m->n = 0;
    m->keys = kv_malloc(m->cap * sizeof *m->keys);
    m->vals = kv_malloc(m->cap * sizeof *m->vals);
    m->used = kv_calloc(m->cap, 1);
}

void idmap_free(IdMap *m)
{
    free(m->keys);
    free(m->vals);
    free(m->used);
    memset(m, 0, sizeof *m);
}

uint32_t idmap_get(const IdMap *m, int64_t key)
{
    for (size_t i = id_hash(key, m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->used[i])
            return UINT32_MAX;
        if (m->keys[i] == key)
            return m->vals[i];
    }
}

static void idmap_insert(IdMap *m, int64_t key, uint32_t val)
{
    size_t i = id_hash(key, m->cap - 1);
    while (m->used[i] && m->keys[i] != key)
        i = (i + 1) & (m->cap - 1);
    if (!m->used[i])
        m->n++;
    m->used[i] = 1;
    m->keys[i] = key;
    m->vals[i] = val;
}

void idmap_put(IdMap *m, int64_t key, uint32_t val)
{
    if (2 * (m->n + 1) > m->cap) {
        IdMap old = *m;
        m->cap *= 2;
        m->n = 0;
        m->keys = kv_malloc(m->cap * sizeof *m->keys);
        m->vals = kv_malloc(m->cap * sizeof *m->vals);
        m->used = kv_calloc(m->cap, 1);
        for (size_t i = 0; i < old.cap; i++)
            if (old.used[i])
                idmap_insert(m, old.keys[i], old.vals[i]);
        idmap_free(&old);
    }
    idmap_insert(m, key, val);
}

int reqlog_detect(const char *path, ReqlogFormat format, ReqlogFormat *out, KvErr *err)
{
    ReqReader *r = reqlog_open(path, format, err);
    if (!r)
        return -1;
    ReqRecord rec;
    int rc = format == REQLOG_AUTO ? reqlog_next(r, &rec, err) : 0;
    *out = reqlog_format(r);
    if (*out == REQLOG_AUTO)
        *out = REQLOG_QWEN; /* an empty log: nothing depends on it */
    reqlog_close(r);
    return rc < 0 ? -1 : 0;
}

/* ---- the log in memory ---- */

/* Hash ids to dense ids. The published logs already number their blocks 0, 1, 2, ... (the
 * Qwen traces remap their hashes to sequential integers, Mooncake's ids are consecutive), so
 * ids below a bound that follows the count of distinct ids go through an array, read mostly
 * in order; others through the hash map. A key lives in one of the two. */
typedef struct {
    uint32_t *dense; /* UINT32_MAX: absent */
    size_t dense_cap;
    IdMap map;
    size_t n;
} BlockIds;

static uint32_t block_id(BlockIds *b, int64_t key)
{
    if ((uint64_t)key < b->dense_cap && b->dense[key] != UINT32_MAX)
        return b->dense[key];
    if (b->map.n > 0) {
        uint32_t v = idmap_get(&b->map, key);
        if (v != UINT32_MAX)
            return v;
    }
    uint32_t id = (uint32_t)b->n++;
    if ((uint64_t)key >= b->dense_cap && (uint64_t)key < ((size_t)1 << 30) &&
        (uint64_t)key < 4 * b->n + ((size_t)1 << 20)) {
        size_t cap = b->dense_cap ? b->dense_cap : (size_t)1 << 16;
        while (cap <= (uint64_t)key)
            cap *= 2;
        b->dense = kv_realloc(b->dense, cap * sizeof *b->dense);
        for (size_t i = b->dense_cap; i < cap; i++)
            b->dense[i] = UINT32_MAX;
        b->dense_cap = cap;
    }
    if ((uint64_t)key < b->dense_cap)
        b->dense[key] = id;
    else
        idmap_put(&b->map, key, id);
    return id;
}

int reqlog_load(const char *path, ReqlogFormat format, int block_tokens, bool progress,
                ReqLog *log, KvErr *err)
{
    memset(log, 0, sizeof *log);
    ReqReader *r = reqlog_open(path, format, err);
    if (!r)
        return -1;
    BlockIds blocks = {0};
    IdMap chats;
    idmap_init(&blocks.map);
    idmap_init(&chats);
    size_t cap = 1024, ids_cap = 1 << 16, n_ids = 0;
    log->off = kv_malloc((cap + 1) * sizeof *log->off);
    log->input = kv_malloc(cap * sizeof *log->input);
    log->output = kv_malloc(cap * sizeof *log->output);
    log->turn = kv_malloc(cap * sizeof *log->turn);
    log->parent = kv_malloc(cap * sizeof *log->parent);
    log->timestamp = kv_malloc(cap * sizeof *log->timestamp);
    log->model = kv_malloc(cap * sizeof *log->model);
    log->conv = kv_malloc(cap * sizeof *log->conv);
    log->ids = kv_malloc(ids_cap * sizeof *log->ids);
    log->off[0] = 0;
    Progress pr; /* in MiB of the file as stored */
    progress_begin(&pr, progress, "read", "MiB", reqlog_size_mib(r));
    ReqRecord rec;
    int rc;
    while ((rc = reqlog_next(r, &rec, err)) == 1) {
        if (log->n >= INT32_MAX - 1) { /* entries are int32 in the simulator */
            rc = kv_fail(err, "%s:%ld: more than %d requests", path, rec.line, INT32_MAX - 2);
            break;
        }
        if ((size_t)log->n == cap) {
            cap *= 2;
            log->off = kv_realloc(log->off, (cap + 1) * sizeof *log->off);
            log->input = kv_realloc(log->input, cap * sizeof *log->input);
            log->output = kv_realloc(log->output, cap * sizeof *log->output);
            log->turn = kv_realloc(log->turn, cap * sizeof *log->turn);
            log->parent = kv_realloc(log->parent, cap * sizeof *log->parent);
            log->timestamp = kv_realloc(log->timestamp, cap * sizeof *log->timestamp);
            log->model = kv_realloc(log->model, cap * sizeof *log->model);
            log->conv = kv_realloc(log->conv, cap * sizeof *log->conv);
        }
        long i = log->n++;
        while (n_ids + (size_t)rec.n_hash > ids_cap) {
            ids_cap *= 2;
            log->ids = kv_realloc(log->ids, ids_cap * sizeof *log->ids);
        }
        for (long j = 0; j < rec.n_hash; j++) {
            if (blocks.n >= INT32_MAX / 2 - 2) { /* int32 entries and reference times */
                rc = kv_fail(err, "%s:%ld: more than %d distinct hash ids", path, rec.line,
                             INT32_MAX / 2 - 3);
                break;
            }
            log->ids[n_ids++] = block_id(&blocks, rec.hash_ids[j]);
        }
        if (rc < 0)
            break;
        log->off[i + 1] = (int64_t)n_ids;
        log->input[i] = rec.input_length;
        log->output[i] = rec.output_length;
        log->turn[i] = rec.turn > INT32_MAX ? INT32_MAX : (int32_t)rec.turn;
        log->timestamp[i] = rec.timestamp;
        log->parent[i] = -1;
        if (rec.parent_chat_id >= 0) {
            uint32_t p = idmap_get(&chats, rec.parent_chat_id);
            log->parent[i] = p == UINT32_MAX ? -1 : (int32_t)p;
        }
        if (rec.chat_id >= 0)
            idmap_put(&chats, rec.chat_id, (uint32_t)i);
        log->model[i] = (int32_t)rec.model;
        log->conv[i] = log->parent[i] >= 0 ? log->conv[log->parent[i]] : (int32_t)log->n_conv++;
        if ((log->n & 4095) == 0)
            progress_set(&pr, reqlog_read_mib(r));
    }
    progress_set(&pr, reqlog_size_mib(r));
    progress_end(&pr);
    log->n_blocks = (uint32_t)blocks.n;
    log->format = reqlog_format(r);
    if (log->format == REQLOG_AUTO)
        log->format = REQLOG_QWEN; /* an empty log: nothing depends on it */
    log->block_tokens = block_tokens > 0 ? block_tokens
                        : log->format == REQLOG_MOONCAKE ? REQLOG_MOONCAKE_BLOCK : REQLOG_QWEN_BLOCK;
    idmap_free(&blocks.map);
    free(blocks.dense);
    idmap_free(&chats);
    reqlog_close(r);
    if (rc < 0) {
        reqlog_free(log);
        return -1;
    }
    return 0;
}

void reqlog_free(ReqLog *log)
{
    free(log->off);
    free(log->ids);
    free(log->input);
    free(log->output);
    free(log->turn);
    free(log->parent);
    free(log->timestamp);
    free(log->model);
    free(log->conv);
    memset(log, 0, sizeof *log);
}
