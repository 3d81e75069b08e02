/* tokenizer.c — Hugging Face tokenizer.json BPE tokenizers (see tokenizer.h, docs/tokenizer.md).
 *
 * The pipeline follows the tokenizers library: added tokens are cut out of the raw text first
 * (leftmost-longest), each remaining segment is normalized, pre-tokenized into pieces, and each
 * piece is run through BPE on its own, merging the lowest-ranked adjacent pair first. Decoding
 * runs the tokenizer's decoder steps over the token strings, except that added tokens always
 * come out as their literal content.
 *
 * Everything that depends only on the file (regexes, hash tables, the byte tables) is built at
 * load time; encode/decode only read the Tokenizer, so one Tokenizer can be shared by threads. */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "traces/model/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sim/base/json.h"

/* ---------------------------------------------------------------- small helpers */

typedef struct {
    char *p;
    size_t n, cap;
} ByteBuf;

static void buf_reserve(ByteBuf *b, size_t extra)
{
    if (b->n + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra)
        cap *= 2;
    b->p = kv_realloc(b->p, cap);
    b->cap = cap;
}

static void buf_put(ByteBuf *b, const void *src, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}

typedef struct {
    int32_t *v;
    int n, cap;
} IdVec;

static void ids_push(IdVec *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        ids->cap = ids->cap ? 2 * ids->cap : 64;
        ids->v = kv_realloc(ids->v, (size_t)ids->cap * sizeof *ids->v);
    }
    ids->v[ids->n++] = id;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static size_t table_size_for(size_t n)
{
    size_t size = 16;
    while (size < 2 * n + 1)
        size *= 2;
    return size;
}

static int utf8_put(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static const char REPLACEMENT_CHAR[] = "\xEF\xBF\xBD"; /* U+FFFD */

/* Appends s to out with every invalid UTF-8 subpart replaced by U+FFFD. */
static void put_utf8_lossy(ByteBuf *out, const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t adv;
        if (utf8_next((const unsigned char *)s + i, n - i, &adv) < 0)
            buf_put(out, REPLACEMENT_CHAR, 3);
        else
            buf_put(out, s + i, adv);
        i += adv;
    }
}

static int is_ascii_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int is_ascii_word(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* ---------------------------------------------------------------- tables */

/* token string -> id over the model vocabulary; keys live in Tokenizer.vocab_str. */
typedef struct {
    int32_t *slots; /* id, or -1 for empty */
    size_t mask;
} VocabIndex;

typedef struct {
    uint64_t key; /* left << 32 | right; UINT64_MAX when empty */
    int32_t rank, merged;
} MergeSlot;

typedef struct {
    MergeSlot *slots;
    size_t mask;
} MergeMap;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    int special, lstrip, rstrip, single_word;
} AddedToken;

enum { NORM_PREPEND, NORM_REPLACE };
typedef struct {
    int kind;
    char *text;      /* Prepend: prefix; Replace: replacement */
    pcre2_code *re;  /* Replace: what to replace */
} NormStep;

enum { PRE_SPLIT, PRE_BYTELEVEL, PRE_METASPACE };
enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREVIOUS, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS };
enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };
typedef struct {
    int kind;
    pcre2_code *re; /* Split pattern; ByteLevel regex (NULL when use_regex is false);
                       Metaspace: the replacement, literally (NULL when split is false) */
    int behavior, invert;
    int add_prefix_space;     /* ByteLevel */
    char replacement[8];      /* Metaspace, UTF-8 */
    int prepend_scheme;       /* Metaspace */
} PreStep;

enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE };
typedef struct {
    int kind;
    char *pattern, *content; /* Replace (literal pattern) */
    char strip_char[8];      /* Strip, UTF-8 */
    int strip_start, strip_stop;
    char replacement[8];     /* Metaspace */
    int prepend_scheme;      /* Metaspace */
} DecStep;

struct Tokenizer {
    char *path;
    int n_ids; /* 1 + the largest id of the vocabulary and the added tokens */
    char **vocab_str;     /* [n_ids]: model vocabulary string, NULL where the id has none */
    uint32_t *vocab_len;  /* [n_ids] */
    VocabIndex vocab;
    MergeMap merges;
    int32_t unk_id;
    int byte_fallback, fuse_unk, ignore_merges;

    AddedToken *added;
    int n_added;
    int32_t *added_of_id;   /* [n_ids]: index into added, or -1 */
    int *added_by_byte;     /* indices into added, grouped by first byte, longest first */
    int added_bucket[257];  /* bucket b is added_by_byte[added_bucket[b] .. added_bucket[b+1]) */

    NormStep *norm;
    int n_norm;
    PreStep *pre;
    int n_pre;
    DecStep *dec;
    int n_dec;

    int byte_level;
    int32_t byte_token[256];    /* byte-level: id of the byte's printable character, or -1 */
    int32_t fallback_token[256];/* id of "<0xNN>", or -1 */
    char byte_char[256][3];     /* GPT-2 bytes_to_unicode, as UTF-8 */
    uint8_t byte_char_len[256];
    int16_t char_byte[324];     /* inverse, indexed by code point; -1 where none */

    int bos, eos, add_bos;
};

static int32_t vocab_find(const Tokenizer *tok, const char *s, size_t n)
{
    size_t i = hash_bytes(s, n) & tok->vocab.mask;
    for (;;) {
        int32_t id = tok->vocab.slots[i];
        if (id < 0)
            return -1;
        if (tok->vocab_len[id] == n && memcmp(tok->vocab_str[id], s, n) == 0)
            return id;
        i = (i + 1) & tok->vocab.mask;
    }
}

static uint64_t merge_key(int32_t left, int32_t right)
{
    return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

static size_t merge_slot_of(uint64_t key, size_t mask)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 17) & mask;
}

static const MergeSlot *merge_find(const Tokenizer *tok, int32_t left, int32_t right)
{
    uint64_t key = merge_key(left, right);
    size_t i = merge_slot_of(key, tok->merges.mask);
    for (;;) {
        const MergeSlot *s = &tok->merges.slots[i];
        if (s->key == key)
            return s;
        if (s->key == UINT64_MAX)
            return NULL;
        i = (i + 1) & tok->merges.mask;
    }
}

/* ---------------------------------------------------------------- loading */

/* Strict accessors: a key that is absent or null takes the default; any other value of the
 * wrong type is an error naming the file, the object and the key. */
static int get_flag(const Tokenizer *tok, const cJSON *obj, const char *where, const char *key,
                    int fallback, int *out, KvErr *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = fallback;
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsBool(v))
        return kv_fail(err, "%s: %s: \"%s\": expected true or false", tok->path, where, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

static int get_string(const Tokenizer *tok, const cJSON *obj, const char *where, const char *key,
                      const char **out, KvErr *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = NULL;
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsString(v))
        return kv_fail(err, "%s: %s: \"%s\": expected a string", tok->path, where, key);
    *out = v->valuestring;
    return 0;
}

/* A JSON number that is an integer in [lo, hi]. */
static int is_int_in(const cJSON *v, double lo, double hi)
{
    return cJSON_IsNumber(v) && v->valuedouble >= lo && v->valuedouble <= hi &&
           v->valuedouble == (double)(int64_t)v->valuedouble;
}

static const char *json_string(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char *json_type(const cJSON *obj)
{
    const char *t = json_string(obj, "type");
    return t ? t : "(none)";
}

/* File content made safe for a one-line message (control bytes escaped, long text cut). The
 * array lives until the end of the full expression that calls esc(), e.g. a kv_fail call. */
typedef struct {
    char s[160];
} Esc;

static Esc esc_n(const char *s, size_t n)
{
    Esc e;
    kv_escape(s, n, e.s, sizeof e.s);
    return e;
}

static Esc esc(const char *s)
{
    return s ? esc_n(s, strlen(s)) : esc_n("(none)", 6);
}

static pcre2_code *compile_regex(const char *path, const char *where, const char *pattern,
                                 int literal, KvErr *err)
{
    int code;
    PCRE2_SIZE offset;
    uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, options, &code,
                                   &offset, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        kv_fail(err, "%s: %s: cannot compile regex at offset %zu: %s", path, where, (size_t)offset,
                (const char *)msg);
        return NULL;
    }
    /* Speed only: where JIT is unavailable pcre2_match interprets the same pattern. */
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    return re;
}

/* A tokenizers pattern: {"String": literal} or {"Regex": pattern}. */
static pcre2_code *compile_pattern(const char *path, const char *where, const cJSON *pattern,
                                   KvErr *err)
{
    const char *s;
    if ((s = json_string(pattern, "String")) != NULL) {
        if (!*s) {
            kv_fail(err, "%s: %s: empty pattern", path, where);
            return NULL;
        }
        return compile_regex(path, where, s, 1, err);
    }
    if ((s = json_string(pattern, "Regex")) != NULL)
        return compile_regex(path, where, s, 0, err);
    kv_fail(err, "%s: %s: expected a pattern {\"String\": ...} or {\"Regex\": ...}", path, where);
    return NULL;
}

static int copy_utf8_char(char out[8], const char *s, const char *path, const char *where,
                          KvErr *err)
{
    size_t n = s ? strlen(s) : 0, adv = 0;
    if (n == 0 || utf8_next((const unsigned char *)s, n, &adv) < 0 || adv != n)
        return kv_fail(err, "%s: %s: expected a single character", path, where);
    memcpy(out, s, n);
    out[n] = '\0';
    return 0;
}

static int prepend_scheme_of(const Tokenizer *tok, const cJSON *obj, int *scheme,
                             const char *where, KvErr *err)
{
    const char *s;
    if (get_string(tok, obj, where, "prepend_scheme", &s, err) != 0)
        return -1;
    if (!s) { /* older files: add_prefix_space */
        int add;
        if (get_flag(tok, obj, where, "add_prefix_space", 1, &add, err) != 0)
            return -1;
        *scheme = add ? PREPEND_ALWAYS : PREPEND_NEVER;
        return 0;
    }
    const char *path = tok->path;
    if (strcmp(s, "always") == 0)
        *scheme = PREPEND_ALWAYS;
    else if (strcmp(s, "first") == 0)
        *scheme = PREPEND_FIRST;
    else if (strcmp(s, "never") == 0)
        *scheme = PREPEND_NEVER;
    else
        return kv_fail(err, "%s: %s: prepend_scheme \"%s\" (expected always, first or never)",
                       path, where, esc(s).s);
    return 0;
}

static int add_normalizer(Tokenizer *tok, const cJSON *n, KvErr *err)
{
    if (!n || cJSON_IsNull(n))
        return 0;
    if (!cJSON_IsObject(n))
        return kv_fail(err, "%s: normalizer: expected an object or null", tok->path);
    const char *type = json_type(n);
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list))
            return kv_fail(err, "%s: normalizer Sequence: expected a \"normalizers\" array",
                           tok->path);
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            if (add_normalizer(tok, item, err) != 0)
                return -1;
        }
        return 0;
    }
    /* NFC leaves already-composed text as it is; kvsim takes its input as composed. */
    if (strcmp(type, "NFC") == 0)
        return 0;
    NormStep step = {0};
    if (strcmp(type, "Prepend") == 0) {
        const char *prefix;
        if (get_string(tok, n, "normalizer Prepend", "prepend", &prefix, err) != 0)
            return -1;
        if (!prefix)
            return kv_fail(err, "%s: normalizer Prepend: expected a \"prepend\" string", tok->path);
        step.kind = NORM_PREPEND;
        step.text = kv_strdup(prefix);
    } else if (strcmp(type, "Replace") == 0) {
        const char *content;
        if (get_string(tok, n, "normalizer Replace", "content", &content, err) != 0)
            return -1;
        if (!content)
            return kv_fail(err, "%s: normalizer Replace: expected a \"content\" string", tok->path);
        step.kind = NORM_REPLACE;
        step.re = compile_pattern(tok->path, "normalizer Replace",
                                  cJSON_GetObjectItemCaseSensitive(n, "pattern"), err);
        if (!step.re)
            return -1;
        step.text = kv_strdup(content);
    } else {
        return kv_fail(err, "%s: normalizer type \"%s\" not supported (expected Sequence, "
                       "Prepend, Replace or NFC)", tok->path, esc(type).s);
    }
    tok->norm = kv_realloc(tok->norm, (size_t)(tok->n_norm + 1) * sizeof *tok->norm);
    tok->norm[tok->n_norm++] = step;
    return 0;
}

/* The split regex of the GPT-2 ByteLevel pre-tokenizer (use_regex: true). */
static const char GPT2_SPLIT_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static void push_pre(Tokenizer *tok, PreStep step)
{
    tok->pre = kv_realloc(tok->pre, (size_t)(tok->n_pre + 1) * sizeof *tok->pre);
    tok->pre[tok->n_pre++] = step;
}

static int add_pre_tokenizer(Tokenizer *tok, const cJSON *p, KvErr *err)
{
    if (!p || cJSON_IsNull(p))
        return 0;
    if (!cJSON_IsObject(p))
        return kv_fail(err, "%s: pre_tokenizer: expected an object or null", tok->path);
    const char *type = json_type(p);
    PreStep step = {0};
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(list))
            return kv_fail(err, "%s: pre_tokenizer Sequence: expected a \"pretokenizers\" array",
                           tok->path);
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            if (add_pre_tokenizer(tok, item, err) != 0)
                return -1;
        }
        return 0;
    } else if (strcmp(type, "ByteLevel") == 0) {
        int use_regex;
        step.kind = PRE_BYTELEVEL;
        if (get_flag(tok, p, "pre_tokenizer ByteLevel", "add_prefix_space", 1,
                     &step.add_prefix_space, err) != 0 ||
            get_flag(tok, p, "pre_tokenizer ByteLevel", "use_regex", 1, &use_regex, err) != 0)
            return -1;
        step.behavior = SPLIT_ISOLATED;
        if (use_regex) {
            step.re = compile_regex(tok->path, "pre_tokenizer ByteLevel", GPT2_SPLIT_REGEX, 0, err);
            if (!step.re)
                return -1;
        }
    } else if (strcmp(type, "Split") == 0) {
        static const char *const behaviors[] = {"Removed", "Isolated", "MergedWithPrevious",
                                                "MergedWithNext", "Contiguous"};
        const char *behavior;
        if (get_string(tok, p, "pre_tokenizer Split", "behavior", &behavior, err) != 0 ||
            get_flag(tok, p, "pre_tokenizer Split", "invert", 0, &step.invert, err) != 0)
            return -1;
        step.kind = PRE_SPLIT;
        step.behavior = -1;
        for (int i = 0; behavior && i < 5; i++)
            if (strcmp(behavior, behaviors[i]) == 0)
                step.behavior = i;
        if (step.behavior < 0)
            return kv_fail(err, "%s: pre_tokenizer Split: behavior \"%s\" (expected Removed, "
                           "Isolated, MergedWithPrevious, MergedWithNext or Contiguous)",
                           tok->path, esc(behavior).s);
        step.re = compile_pattern(tok->path, "pre_tokenizer Split",
                                  cJSON_GetObjectItemCaseSensitive(p, "pattern"), err);
        if (!step.re)
            return -1;
    } else if (strcmp(type, "Digits") == 0) {
        /* Digits is a split on numeric characters, one by one or in runs. */
        int individual;
        if (get_flag(tok, p, "pre_tokenizer Digits", "individual_digits", 0, &individual,
                     err) != 0)
            return -1;
        step.kind = PRE_SPLIT;
        step.behavior = SPLIT_ISOLATED;
        step.re = compile_regex(tok->path, "pre_tokenizer Digits",
                                individual ? "\\p{N}" : "\\p{N}+", 0, err);
        if (!step.re)
            return -1;
    } else if (strcmp(type, "Metaspace") == 0) {
        step.kind = PRE_METASPACE;
        const char *rep;
        int split;
        if (get_string(tok, p, "pre_tokenizer Metaspace", "replacement", &rep, err) != 0 ||
            get_flag(tok, p, "pre_tokenizer Metaspace", "split", 1, &split, err) != 0 ||
            copy_utf8_char(step.replacement, rep ? rep : "\xE2\x96\x81", tok->path,
                           "pre_tokenizer Metaspace replacement", err) != 0 ||
            prepend_scheme_of(tok, p, &step.prepend_scheme, "pre_tokenizer Metaspace", err) != 0)
            return -1;
        step.behavior = SPLIT_MERGED_NEXT;
        if (split) {
            step.re = compile_regex(tok->path, "pre_tokenizer Metaspace", step.replacement, 1, err);
            if (!step.re)
                return -1;
        }
    } else {
        return kv_fail(err, "%s: pre_tokenizer type \"%s\" not supported (expected Sequence, "
                       "ByteLevel, Split, Digits or Metaspace)", tok->path, esc(type).s);
    }
    push_pre(tok, step);
    return 0;
}

static int add_decoder(Tokenizer *tok, const cJSON *d, KvErr *err)
{
    if (!d || cJSON_IsNull(d))
        return 0;
    if (!cJSON_IsObject(d))
        return kv_fail(err, "%s: decoder: expected an object or null", tok->path);
    const char *type = json_type(d);
    DecStep step = {0};
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(d, "decoders");
        if (!cJSON_IsArray(list))
            return kv_fail(err, "%s: decoder Sequence: expected a \"decoders\" array", tok->path);
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            if (add_decoder(tok, item, err) != 0)
                return -1;
        }
        return 0;
    } else if (strcmp(type, "ByteLevel") == 0) {
        step.kind = DEC_BYTELEVEL;
    } else if (strcmp(type, "ByteFallback") == 0) {
        step.kind = DEC_BYTEFALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        step.kind = DEC_FUSE;
    } else if (strcmp(type, "Replace") == 0) {
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(d, "pattern");
        const char *literal = json_string(pattern, "String");
        const char *content = json_string(d, "content");
        if (!literal || !*literal || !content)
            return kv_fail(err, "%s: decoder Replace: expected {\"String\": ...} pattern and a "
                           "content string", tok->path);
        step.kind = DEC_REPLACE;
        step.pattern = kv_strdup(literal);
        step.content = kv_strdup(content);
    } else if (strcmp(type, "Strip") == 0) {
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(d, "start");
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(d, "stop");
        if (copy_utf8_char(step.strip_char, json_string(d, "content"), tok->path,
                           "decoder Strip content", err) != 0)
            return -1;
        if (!is_int_in(start, 0, INT32_MAX) || !is_int_in(stop, 0, INT32_MAX))
            return kv_fail(err, "%s: decoder Strip: expected non-negative start and stop",
                           tok->path);
        step.kind = DEC_STRIP;
        step.strip_start = start->valueint;
        step.strip_stop = stop->valueint;
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *rep;
        step.kind = DEC_METASPACE;
        if (get_string(tok, d, "decoder Metaspace", "replacement", &rep, err) != 0 ||
            copy_utf8_char(step.replacement, rep ? rep : "\xE2\x96\x81", tok->path,
                           "decoder Metaspace replacement", err) != 0 ||
            prepend_scheme_of(tok, d, &step.prepend_scheme, "decoder Metaspace", err) != 0)
            return -1;
    } else {
        return kv_fail(err, "%s: decoder type \"%s\" not supported (expected Sequence, ByteLevel, "
                       "ByteFallback, Fuse, Replace, Strip or Metaspace)", tok->path, esc(type).s);
    }
    tok->dec = kv_realloc(tok->dec, (size_t)(tok->n_dec + 1) * sizeof *tok->dec);
    tok->dec[tok->n_dec++] = step;
    return 0;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
 * take the code points 256, 257, ... in byte order. */
static void build_byte_chars(Tokenizer *tok)
{
    int next = 256;
    for (int i = 0; i < 324; i++)
        tok->char_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        int cp = printable ? b : next++;
        tok->byte_char_len[b] = (uint8_t)utf8_put(tok->byte_char[b], (uint32_t)cp);
        tok->char_byte[cp] = (int16_t)b;
    }
}

static int load_vocab(Tokenizer *tok, const cJSON *vocab, const cJSON *added, KvErr *err)
{
    if (!cJSON_IsObject(vocab))
        return kv_fail(err, "%s: model.vocab: expected an object mapping tokens to ids", tok->path);
    int max_id = -1, count = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        if (!is_int_in(item, 0, INT32_MAX - 1))
            return kv_fail(err, "%s: model.vocab \"%s\": expected a non-negative integer id",
                           tok->path, esc(item->string).s);
        if (item->valueint > max_id)
            max_id = item->valueint;
        count++;
    }
    int index = 0;
    cJSON_ArrayForEach(item, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(item, "id");
        const char *content = json_string(item, "content");
        if (!cJSON_IsObject(item) || !is_int_in(id, 0, INT32_MAX - 1) || !content || !*content)
            return kv_fail(err, "%s: added_tokens[%d]: expected an object with a non-negative "
                           "integer \"id\" and a non-empty \"content\" string", tok->path, index);
        static const char *const flags[] = {"special", "lstrip", "rstrip", "single_word",
                                            "normalized"};
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%d]", index);
        for (size_t f = 0; f < sizeof flags / sizeof flags[0]; f++) {
            int value;
            if (get_flag(tok, item, where, flags[f], 0, &value, err) != 0)
                return -1;
        }
        if (id->valueint > max_id)
            max_id = id->valueint;
        index++;
    }
    if (count == 0)
        return kv_fail(err, "%s: model.vocab is empty", tok->path);
    /* Ids index dense tables; real vocabularies stay far below this. */
    if (max_id >= 1 << 24)
        return kv_fail(err, "%s: token id %d is too large (expected ids below %d)", tok->path,
                       max_id, 1 << 24);
    tok->n_ids = max_id + 1;
    tok->vocab_str = kv_calloc((size_t)tok->n_ids, sizeof *tok->vocab_str);
    tok->vocab_len = kv_calloc((size_t)tok->n_ids, sizeof *tok->vocab_len);
    size_t size = table_size_for((size_t)count);
    tok->vocab.mask = size - 1;
    tok->vocab.slots = kv_malloc(size * sizeof *tok->vocab.slots);
    memset(tok->vocab.slots, 0xFF, size * sizeof *tok->vocab.slots);
    cJSON_ArrayForEach(item, vocab) {
        int32_t id = item->valueint;
        if (tok->vocab_str[id])
            return kv_fail(err, "%s: model.vocab: id %d is used by both \"%s\" and \"%s\"",
                           tok->path, id, esc(tok->vocab_str[id]).s, esc(item->string).s);
        size_t len = strlen(item->string);
        if (len == 0)
            return kv_fail(err, "%s: model.vocab: empty token (id %d)", tok->path, id);
        if (vocab_find(tok, item->string, len) >= 0)
            return kv_fail(err, "%s: model.vocab: token \"%s\" appears twice", tok->path,
                           esc(item->string).s);
        tok->vocab_str[id] = kv_strdup(item->string);
        tok->vocab_len[id] = (uint32_t)len;
        size_t i = hash_bytes(item->string, len) & tok->vocab.mask;
        while (tok->vocab.slots[i] >= 0)
            i = (i + 1) & tok->vocab.mask;
        tok->vocab.slots[i] = id;
    }
    return 0;
}

/* One merge: "a b", or ["a", "b"] in newer files. */
static int load_merges(Tokenizer *tok, const cJSON *merges, KvErr *err)
{
    if (!cJSON_IsArray(merges))
        return kv_fail(err, "%s: model.merges: expected an array", tok->path);
    int count = cJSON_GetArraySize(merges);
    size_t size = table_size_for((size_t)count);
    tok->merges.mask = size - 1;
    tok->merges.slots = kv_malloc(size * sizeof *tok->merges.slots);
    for (size_t i = 0; i < size; i++)
        tok->merges.slots[i].key = UINT64_MAX;
    ByteBuf joined = {0};
    int rank = 0, rc = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, merges) {
        const char *left, *right;
        size_t left_len, right_len;
        if (cJSON_IsString(item)) {
            const char *space = strchr(item->valuestring, ' ');
            if (!space || space == item->valuestring || !space[1] || strchr(space + 1, ' ')) {
                rc = kv_fail(err, "%s: model.merges[%d] \"%s\": expected two tokens separated "
                             "by one space", tok->path, rank, esc(item->valuestring).s);
                break;
            }
            left = item->valuestring;
            left_len = (size_t)(space - left);
            right = space + 1;
            right_len = strlen(right);
        } else if (cJSON_IsArray(item) && cJSON_GetArraySize(item) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(item, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(item, 1))) {
            left = cJSON_GetArrayItem(item, 0)->valuestring;
            right = cJSON_GetArrayItem(item, 1)->valuestring;
            left_len = strlen(left);
            right_len = strlen(right);
        } else {
            rc = kv_fail(err, "%s: model.merges[%d]: expected \"a b\" or [\"a\", \"b\"]",
                         tok->path, rank);
            break;
        }
        int32_t left_id = vocab_find(tok, left, left_len);
        int32_t right_id = vocab_find(tok, right, right_len);
        joined.n = 0;
        buf_put(&joined, left, left_len);
        buf_put(&joined, right, right_len);
        int32_t merged_id = vocab_find(tok, joined.p, joined.n);
        if (left_id < 0 || right_id < 0 || merged_id < 0) {
            const char *missing = left_id < 0 ? left : right_id < 0 ? right : joined.p;
            int missing_len = (int)(left_id < 0 ? left_len : right_id < 0 ? right_len : joined.n);
            rc = kv_fail(err, "%s: model.merges[%d]: token \"%s\" is not in model.vocab",
                         tok->path, rank, esc_n(missing, missing_len).s);
            break;
        }
        uint64_t key = merge_key(left_id, right_id);
        size_t i = merge_slot_of(key, tok->merges.mask);
        while (tok->merges.slots[i].key != UINT64_MAX && tok->merges.slots[i].key != key)
            i = (i + 1) & tok->merges.mask;
        if (tok->merges.slots[i].key == UINT64_MAX) /* a repeated pair keeps its first rank */
            tok->merges.slots[i] = (MergeSlot){key, rank, merged_id};
        rank++;
    }
    free(joined.p);
    return rc;
}

/* Added tokens in matching order: grouped by first byte, longest first within a group. */
typedef struct {
    unsigned char first;
    size_t len;
    int32_t id;
    int index;
} AddedOrder;

static int cmp_added_order(const void *a, const void *b)
{
    const AddedOrder *x = a, *y = b;
    if (x->first != y->first)
        return x->first < y->first ? -1 : 1;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int load_added(Tokenizer *tok, const cJSON *added, KvErr *err)
{
    (void)err;
    tok->added_of_id = kv_malloc((size_t)tok->n_ids * sizeof *tok->added_of_id);
    for (int i = 0; i < tok->n_ids; i++)
        tok->added_of_id[i] = -1;
    int count = cJSON_IsArray(added) ? cJSON_GetArraySize(added) : 0;
    tok->added = kv_calloc((size_t)count, sizeof *tok->added);
    const cJSON *item;
    cJSON_ArrayForEach(item, added) {
        AddedToken *a = &tok->added[tok->n_added];
        a->content = kv_strdup(json_string(item, "content"));
        a->len = strlen(a->content);
        a->id = cJSON_GetObjectItemCaseSensitive(item, "id")->valueint;
        /* The flags' types were checked by load_vocab. */
        a->special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "special"));
        a->lstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "lstrip"));
        a->rstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "rstrip"));
        a->single_word = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "single_word"));
        tok->added_of_id[a->id] = tok->n_added++;
    }
    AddedOrder *order = kv_calloc((size_t)tok->n_added, sizeof *order);
    for (int i = 0; i < tok->n_added; i++)
        order[i] = (AddedOrder){(unsigned char)tok->added[i].content[0], tok->added[i].len,
                                tok->added[i].id, i};
    qsort(order, (size_t)tok->n_added, sizeof *order, cmp_added_order);
    tok->added_by_byte = kv_malloc((size_t)(tok->n_added ? tok->n_added : 1) * sizeof(int));
    for (int i = 0; i < tok->n_added; i++)
        tok->added_by_byte[i] = order[i].index;
    free(order);
    int k = 0;
    for (int b = 0; b <= 256; b++) {
        while (k < tok->n_added && (unsigned char)tok->added[tok->added_by_byte[k]].content[0] < b)
            k++;
        tok->added_bucket[b] = k;
    }
    return 0;
}

/* id of a token named by tokenizer_config.json: a string, {"content": ...}, or null (-1). */
static int config_token(const Tokenizer *tok, const cJSON *cfg, const char *key,
                        const char *cfg_path, int *id, KvErr *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    const char *name = cJSON_IsString(v) ? v->valuestring : json_string(v, "content");
    if (cJSON_IsNull(v)) {
        *id = -1;
        return 0;
    }
    if (!name)
        return kv_fail(err, "%s: %s: expected a string, {\"content\": ...} or null", cfg_path,
                       key);
    *id = tokenizer_token_id(tok, name);
    if (*id < 0)
        return kv_fail(err, "%s: %s \"%s\" is not a token of %s", cfg_path, key, esc(name).s,
                       tok->path);
    return 0;
}

/* TemplateProcessing's single template: a special token before $A is what the model expects at
 * the start (BOS); one after it is the end-of-sequence token. */
static void template_tokens(const Tokenizer *tok, const cJSON *proc, int *before, int *after)
{
    if (!proc || cJSON_IsNull(proc))
        return;
    const char *type = json_type(proc);
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(proc, "processors"))
            template_tokens(tok, item, before, after);
        return;
    }
    if (strcmp(type, "TemplateProcessing") != 0)
        return;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(proc, "special_tokens");
    int seen_sequence = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(proc, "single")) {
        if (cJSON_GetObjectItemCaseSensitive(item, "Sequence")) {
            seen_sequence = 1;
            continue;
        }
        const cJSON *special = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
        const char *name = json_string(special, "id");
        if (!name)
            continue;
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(specials, name), "ids");
        int id = cJSON_IsArray(ids) && cJSON_GetArraySize(ids) == 1 &&
                         is_int_in(cJSON_GetArrayItem(ids, 0), 0, INT32_MAX)
                     ? cJSON_GetArrayItem(ids, 0)->valueint
                     : tokenizer_token_id(tok, name);
        if (id < 0 || id >= tok->n_ids)
            continue;
        if (!seen_sequence && *before < 0)
            *before = id;
        else if (seen_sequence && *after < 0)
            *after = id;
    }
}

static int first_present(const Tokenizer *tok, const char *const *names)
{
    for (; *names; names++) {
        int id = tokenizer_token_id(tok, *names);
        if (id >= 0)
            return id;
    }
    return -1;
}

static int decide_bos_eos(Tokenizer *tok, const cJSON *root, const char *config_path, KvErr *err)
{
    static const char *const bos_names[] = {"<s>", "<|begin_of_text|>", "<|startoftext|>", NULL};
    static const char *const eos_names[] = {"</s>", "<|end_of_text|>", "<|endoftext|>", NULL};
    int bos_known = 0, eos_known = 0, add_bos_known = 0;
    tok->bos = tok->eos = -1;
    tok->add_bos = 0;
    /* A missing config is no config; anything else there (unreadable, not a regular file, not
     * JSON) is an error. stat, not open: opening a FIFO could block. */
    struct stat st;
    if (config_path && (stat(config_path, &st) == 0 || errno != ENOENT)) {
        cJSON *cfg = json_load_file(config_path, JSON_OBJECT | JSON_UNIQUE_KEYS, err);
        if (!cfg)
            return -1;
        int rc = 0;
        if (cJSON_GetObjectItemCaseSensitive(cfg, "bos_token")) {
            rc |= config_token(tok, cfg, "bos_token", config_path, &tok->bos, err);
            bos_known = 1;
        }
        if (rc == 0 && cJSON_GetObjectItemCaseSensitive(cfg, "eos_token")) {
            rc |= config_token(tok, cfg, "eos_token", config_path, &tok->eos, err);
            eos_known = 1;
        }
        const cJSON *add = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token");
        if (rc == 0 && add && !cJSON_IsNull(add)) {
            if (!cJSON_IsBool(add))
                rc = kv_fail(err, "%s: add_bos_token: expected true or false", config_path);
            tok->add_bos = cJSON_IsTrue(add);
            add_bos_known = 1;
        }
        cJSON_Delete(cfg);
        if (rc != 0)
            return -1;
    }
    int before = -1, after = -1;
    template_tokens(tok, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), &before, &after);
    if (!add_bos_known)
        tok->add_bos = before >= 0;
    if (!bos_known)
        tok->bos = before >= 0 ? before : first_present(tok, bos_names);
    if (!eos_known)
        tok->eos = after >= 0 ? after : first_present(tok, eos_names);
    if (tok->add_bos && tok->bos < 0)
        return kv_fail(err, "%s: add_bos_token is true but there is no BOS token",
                       config_path ? config_path : tok->path);
    return 0;
}

static int load_model(Tokenizer *tok, const cJSON *root, KvErr *err)
{
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model))
        return kv_fail(err, "%s: expected a \"model\" object", tok->path);
    const char *type, *prefix, *suffix, *unk;
    if (get_string(tok, model, "model", "type", &type, err) != 0 ||
        get_string(tok, model, "model", "continuing_subword_prefix", &prefix, err) != 0 ||
        get_string(tok, model, "model", "end_of_word_suffix", &suffix, err) != 0 ||
        get_string(tok, model, "model", "unk_token", &unk, err) != 0 ||
        get_flag(tok, model, "model", "byte_fallback", 0, &tok->byte_fallback, err) != 0 ||
        get_flag(tok, model, "model", "fuse_unk", 0, &tok->fuse_unk, err) != 0 ||
        get_flag(tok, model, "model", "ignore_merges", 0, &tok->ignore_merges, err) != 0)
        return -1;
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (type ? strcmp(type, "BPE") != 0 : !merges) /* files of old versions omit "type" */
        return kv_fail(err, "%s: model.type \"%s\" not supported (expected BPE)", tok->path,
                       esc(type).s);
    if ((prefix && *prefix) || (suffix && *suffix))
        return kv_fail(err, "%s: model: continuing_subword_prefix / end_of_word_suffix are not "
                       "supported (expected null)", tok->path);
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
        return kv_fail(err, "%s: added_tokens: expected an array", tok->path);
    if (load_vocab(tok, cJSON_GetObjectItemCaseSensitive(model, "vocab"), added, err) != 0 ||
        load_merges(tok, merges, err) != 0 || load_added(tok, added, err) != 0)
        return -1;
    tok->unk_id = -1;
    if (unk) {
        tok->unk_id = tokenizer_token_id(tok, unk);
        if (tok->unk_id < 0)
            return kv_fail(err, "%s: model.unk_token \"%s\" is not in model.vocab", tok->path,
                           esc(unk).s);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        tok->fallback_token[b] = vocab_find(tok, name, 6);
    }
    return 0;
}

Tokenizer *tokenizer_load(const char *json_path, const char *config_path, KvErr *err)
{
    cJSON *root = json_load_file(json_path, JSON_OBJECT, err);
    if (!root)
        return NULL;
    Tokenizer *tok = kv_calloc(1, sizeof *tok);
    tok->path = kv_strdup(json_path);
    int rc = load_model(tok, root, err);
    if (rc == 0)
        rc = add_normalizer(tok, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), err);
    if (rc == 0)
        rc = add_pre_tokenizer(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), err);
    if (rc == 0)
        rc = add_decoder(tok, cJSON_GetObjectItemCaseSensitive(root, "decoder"), err);
    for (int i = 0; rc == 0 && i < tok->n_pre; i++) {
        if (tok->pre[i].kind != PRE_BYTELEVEL)
            continue;
        /* Pieces are mapped to byte characters at BPE time, so nothing may split after it. */
        if (i != tok->n_pre - 1)
            rc = kv_fail(err, "%s: pre_tokenizer: ByteLevel must come last in the Sequence",
                         tok->path);
        tok->byte_level = 1;
    }
    build_byte_chars(tok); /* the ByteLevel decoder needs it even without the pre-tokenizer */
    if (rc == 0 && tok->byte_level) {
        for (int b = 0; b < 256; b++)
            tok->byte_token[b] = vocab_find(tok, tok->byte_char[b], tok->byte_char_len[b]);
    }
    if (rc == 0)
        rc = decide_bos_eos(tok, root, config_path, err);
    cJSON_Delete(root);
    if (rc != 0) {
        tokenizer_free(tok);
        return NULL;
    }
    return tok;
}

void tokenizer_free(Tokenizer *tok)
{
    if (!tok)
        return;
    for (int i = 0; i < tok->n_ids && tok->vocab_str; i++)
        free(tok->vocab_str[i]);
    free(tok->vocab_str);
    free(tok->vocab_len);
    free(tok->vocab.slots);
    free(tok->merges.slots);
    for (int i = 0; i < tok->n_added; i++)
        free(tok->added[i].content);
    free(tok->added);
    free(tok->added_of_id);
    free(tok->added_by_byte);
    for (int i = 0; i < tok->n_norm; i++) {
        free(tok->norm[i].text);
        pcre2_code_free(tok->norm[i].re);
    }
    free(tok->norm);
    for (int i = 0; i < tok->n_pre; i++)
        pcre2_code_free(tok->pre[i].re);
    free(tok->pre);
    for (int i = 0; i < tok->n_dec; i++) {
        free(tok->dec[i].pattern);
        free(tok->dec[i].content);
    }
    free(tok->dec);
    free(tok->path);
    free(tok);
}

/* ---------------------------------------------------------------- encoding */

typedef struct {
    size_t start, len; /* in EncodeState.arena */
    int at_text_start; /* begins at byte 0 of the caller's text (Metaspace "first") */
} Piece;

typedef struct {
    Piece *v;
    int n, cap;
} PieceList;

typedef struct {
    int32_t id, prev, next, alive;
} Symbol;

typedef struct {
    int32_t rank, pos;
} Candidate;

typedef struct {
    size_t start, end;
    int is_match;
} Span;

/* Scratch space of one encode call. */
typedef struct {
    const Tokenizer *tok;
    pcre2_match_data *match;
    ByteBuf arena;
    PieceList pieces, next_pieces;
    Span *spans;
    int n_spans, cap_spans;
    Symbol *sym;
    int cap_sym;
    Candidate *heap;
    int n_heap, cap_heap;
    ByteBuf mapped;
    IdVec out;
    KvErr *err;
} EncodeState;

static void piece_push(PieceList *l, Piece p)
{
    if (p.len == 0)
        return;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->v = kv_realloc(l->v, (size_t)l->cap * sizeof *l->v);
    }
    l->v[l->n++] = p;
}

static void span_push(EncodeState *st, size_t start, size_t end, int is_match)
{
    if (st->n_spans == st->cap_spans) {
        st->cap_spans = st->cap_spans ? 2 * st->cap_spans : 64;
        st->spans = kv_realloc(st->spans, (size_t)st->cap_spans * sizeof *st->spans);
    }
    st->spans[st->n_spans++] = (Span){start, end, is_match};
}

/* Cuts arena[start, start+len) into alternating unmatched / matched spans of re, with the
 * matches the tokenizers library finds (the onig crate's find_iter): an empty match is a
 * (zero-length) matched span too, so it cuts the text around it, except the first empty match
 * found after a non-empty one, which is skipped; after an empty match the search resumes one
 * character further on. An empty match may lie at the very end of the text (pattern "$"). */
static int find_spans(EncodeState *st, const pcre2_code *re, size_t start, size_t len)
{
    st->n_spans = 0;
    if (len == 0)
        return 0;
    size_t pos = 0, prev = 0;
    int skip_empty = 0;
    while (pos <= len) {
        /* The arena may move between calls, so the subject is re-read every time. */
        PCRE2_SPTR subject = (PCRE2_SPTR)st->arena.p + start;
        int rc = pcre2_match(re, subject, len, pos, PCRE2_NO_UTF_CHECK, st->match, NULL);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) /* the interpreter's limits are far larger */
            rc = pcre2_match(re, subject, len, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, st->match,
                             NULL);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return kv_fail(st->err, "%s: regex match failed: %s", st->tok->path,
                           (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(st->match);
        size_t m0 = ov[0], m1 = ov[1];
        if (m1 < m0 || m1 > len) /* \K in a lookahead can report such a match */
            return kv_fail(st->err, "%s: regex reported a match that ends before it starts",
                           st->tok->path);
        if (m1 == m0) {
            size_t adv = 1; /* at the end of the text: past it, which ends the search */
            if (m0 < len)
                utf8_next(subject + m0, len - m0, &adv);
            pos = m0 + adv;
            if (skip_empty) {
                skip_empty = 0;
                continue;
            }
        } else {
            pos = m1;
            skip_empty = 1;
        }
        if (m0 > prev)
            span_push(st, prev, m0, 0);
        span_push(st, m0, m1, 1);
        prev = m1;
    }
    if (prev < len)
        span_push(st, prev, len, 0);
    return 0;
}

/* The tokenizers library's split behaviours over the spans of one piece. */
static int split_piece(EncodeState *st, const PreStep *step, Piece piece)
{
    if (find_spans(st, step->re, piece.start, piece.len) != 0)
        return -1;
    Span *sp = st->spans;
    int n = st->n_spans, out = 0;
    for (int i = 0; i < n; i++)
        sp[i].is_match ^= step->invert;
    int previous_match = 0;
    switch (step->behavior) {
    case SPLIT_REMOVED:
        for (int i = 0; i < n; i++)
            if (!sp[i].is_match)
                sp[out++] = sp[i];
        break;
    case SPLIT_ISOLATED:
        out = n;
        break;
    case SPLIT_MERGED_PREVIOUS:
        for (int i = 0; i < n; i++) {
            if (sp[i].is_match && !previous_match && out > 0)
                sp[out - 1].end = sp[i].end;
            else
                sp[out++] = sp[i];
            previous_match = sp[i].is_match;
        }
        break;
    case SPLIT_MERGED_NEXT: /* walks backwards: a match joins the span after it */
        out = n;
        for (int i = n - 1; i >= 0; i--) {
            int is_match = sp[i].is_match;
            if (is_match && !previous_match && i + 1 < n && sp[i + 1].start != SIZE_MAX) {
                sp[i + 1].start = sp[i].start;
                sp[i].start = SIZE_MAX; /* absorbed */
            }
            previous_match = is_match;
        }
        {
            int w = 0;
            for (int i = 0; i < n; i++)
                if (sp[i].start != SIZE_MAX)
                    sp[w++] = sp[i];
            out = w;
        }
        break;
    case SPLIT_CONTIGUOUS:
        for (int i = 0; i < n; i++) {
            if (sp[i].is_match == previous_match && out > 0)
                sp[out - 1].end = sp[i].end;
            else
                sp[out++] = sp[i];
            previous_match = sp[i].is_match;
        }
        break;
    }
    for (int i = 0; i < out; i++)
        piece_push(&st->next_pieces,
                   (Piece){piece.start + sp[i].start, sp[i].end - sp[i].start,
                           piece.at_text_start && sp[i].start == 0});
    return 0;
}

/* Appends to the arena a copy of arena[start, start+len) with every match of re replaced. */
static int replace_into_arena(EncodeState *st, const pcre2_code *re, const char *with,
                              size_t start, size_t len, size_t *new_start, size_t *new_len)
{
    if (find_spans(st, re, start, len) != 0)
        return -1;
    size_t with_len = strlen(with), total = 0;
    for (int i = 0; i < st->n_spans; i++)
        total += st->spans[i].is_match ? with_len : st->spans[i].end - st->spans[i].start;
    buf_reserve(&st->arena, total);
    *new_start = st->arena.n;
    for (int i = 0; i < st->n_spans; i++) {
        if (st->spans[i].is_match)
            buf_put(&st->arena, with, with_len);
        else
            buf_put(&st->arena, st->arena.p + start + st->spans[i].start,
                    st->spans[i].end - st->spans[i].start);
    }
    *new_len = total;
    return 0;
}

static void prepend_into_arena(EncodeState *st, const char *prefix, Piece *p)
{
    size_t prefix_len = strlen(prefix);
    buf_reserve(&st->arena, prefix_len + p->len);
    size_t start = st->arena.n;
    buf_put(&st->arena, prefix, prefix_len);
    buf_put(&st->arena, st->arena.p + p->start, p->len);
    p->start = start;
    p->len += prefix_len;
}

static int metaspace_piece(EncodeState *st, const PreStep *step, Piece piece)
{
    /* ' ' -> replacement, done by hand: it is one byte to one short string. */
    size_t rep_len = strlen(step->replacement), start = st->arena.n;
    buf_reserve(&st->arena, piece.len * rep_len);
    for (size_t i = 0; i < piece.len; i++) {
        char c = st->arena.p[piece.start + i];
        if (c == ' ')
            buf_put(&st->arena, step->replacement, rep_len);
        else
            buf_put(&st->arena, &c, 1);
    }
    Piece p = {start, st->arena.n - start, piece.at_text_start};
    int starts_with_rep = p.len >= rep_len && memcmp(st->arena.p + p.start, step->replacement,
                                                      rep_len) == 0;
    if (!starts_with_rep && (step->prepend_scheme == PREPEND_ALWAYS ||
                             (step->prepend_scheme == PREPEND_FIRST && p.at_text_start)))
        prepend_into_arena(st, step->replacement, &p);
    if (!step->re) {
        piece_push(&st->next_pieces, p);
        return 0;
    }
    return split_piece(st, step, p);
}

static int bytelevel_piece(EncodeState *st, const PreStep *step, Piece piece)
{
    if (step->add_prefix_space && st->arena.p[piece.start] != ' ')
        prepend_into_arena(st, " ", &piece);
    if (!step->re) {
        piece_push(&st->next_pieces, piece);
        return 0;
    }
    return split_piece(st, step, piece);
}

static void heap_push(EncodeState *st, int32_t rank, int32_t pos)
{
    if (st->n_heap == st->cap_heap) {
        st->cap_heap = st->cap_heap ? 2 * st->cap_heap : 64;
        st->heap = kv_realloc(st->heap, (size_t)st->cap_heap * sizeof *st->heap);
    }
    Candidate c = {rank, pos};
    int i = st->n_heap++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        Candidate p = st->heap[parent];
        if (p.rank < c.rank || (p.rank == c.rank && p.pos < c.pos))
            break;
        st->heap[i] = p;
        i = parent;
    }
    st->heap[i] = c;
}

static Candidate heap_pop(EncodeState *st)
{
    Candidate top = st->heap[0], last = st->heap[--st->n_heap];
    int i = 0, n = st->n_heap;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && (st->heap[child + 1].rank < st->heap[child].rank ||
                              (st->heap[child + 1].rank == st->heap[child].rank &&
                               st->heap[child + 1].pos < st->heap[child].pos)))
            child++;
        Candidate c = st->heap[child];
        if (last.rank < c.rank || (last.rank == c.rank && last.pos < c.pos))
            break;
        st->heap[i] = c;
        i = child;
    }
    if (n > 0)
        st->heap[i] = last;
    return top;
}

static void push_candidate(EncodeState *st, int32_t pos)
{
    const Symbol *s = &st->sym[pos];
    if (s->next < 0)
        return;
    const MergeSlot *m = merge_find(st->tok, s->id, st->sym[s->next].id);
    if (m)
        heap_push(st, m->rank, pos);
}

/* BPE over one piece: start from one symbol per character (byte-level: per byte), then merge
 * the adjacent pair of lowest rank, leftmost first, until no pair has a merge. A min-heap of
 * candidate pairs with lazy invalidation keeps this O(n log n) in the piece length. */
static int bpe_piece(EncodeState *st, const char *s, size_t len)
{
    const Tokenizer *tok = st->tok;
    if (tok->byte_level && tok->ignore_merges) {
        st->mapped.n = 0;
        for (size_t i = 0; i < len; i++) {
            unsigned char b = (unsigned char)s[i];
            buf_put(&st->mapped, tok->byte_char[b], tok->byte_char_len[b]);
        }
        int32_t whole = vocab_find(tok, st->mapped.p, st->mapped.n);
        if (whole >= 0) {
            ids_push(&st->out, whole);
            return 0;
        }
    } else if (tok->ignore_merges) {
        int32_t whole = vocab_find(tok, s, len);
        if (whole >= 0) {
            ids_push(&st->out, whole);
            return 0;
        }
    }
    /* Symbols are indexed by int; the output counts tokens in an int. */
    if (len > (size_t)INT32_MAX / 2 || (size_t)st->out.n > (size_t)INT32_MAX / 2 - len)
        return kv_fail(st->err, "%s: the text to encode is too long (more than %d tokens)",
                       tok->path, INT32_MAX / 2);
    if ((size_t)st->cap_sym < len) { /* at most one symbol per byte */
        st->cap_sym = (int)len;
        st->sym = kv_realloc(st->sym, len * sizeof *st->sym);
    }
    int n = 0, last_was_unk = 0;
    size_t i = 0;
    while (i < len) {
        size_t adv = 1;
        int32_t id;
        if (tok->byte_level) {
            id = tok->byte_token[(unsigned char)s[i]];
        } else {
            utf8_next((const unsigned char *)s + i, len - i, &adv);
            id = vocab_find(tok, s + i, adv);
        }
        if (id >= 0) {
            st->sym[n++].id = id;
            last_was_unk = 0;
            i += adv;
            continue;
        }
        int all_bytes = tok->byte_fallback;
        for (size_t k = 0; all_bytes && k < adv; k++)
            all_bytes = tok->fallback_token[(unsigned char)s[i + k]] >= 0;
        if (all_bytes) {
            for (size_t k = 0; k < adv; k++)
                st->sym[n++].id = tok->fallback_token[(unsigned char)s[i + k]];
            last_was_unk = 0;
        } else if (tok->unk_id >= 0) {
            if (!(tok->fuse_unk && last_was_unk))
                st->sym[n++].id = tok->unk_id;
            last_was_unk = 1;
        } else {
            return kv_fail(st->err, "%s: no token for \"%s\" and the model has no unk_token",
                           tok->path, esc_n(s + i, adv).s);
        }
        i += adv;
    }
    for (int k = 0; k < n; k++) {
        st->sym[k].prev = k - 1;
        st->sym[k].next = k + 1 < n ? k + 1 : -1;
        st->sym[k].alive = 1;
    }
    st->n_heap = 0;
    for (int k = 0; k + 1 < n; k++)
        push_candidate(st, k);
    while (st->n_heap > 0) {
        Candidate c = heap_pop(st);
        Symbol *left = &st->sym[c.pos];
        if (!left->alive || left->next < 0)
            continue;
        Symbol *right = &st->sym[left->next];
        const MergeSlot *m = merge_find(tok, left->id, right->id);
        if (!m || m->rank != c.rank) /* stale: a neighbour changed since it was queued */
            continue;
        left->id = m->merged;
        right->alive = 0;
        left->next = right->next;
        if (right->next >= 0)
            st->sym[right->next].prev = c.pos;
        if (left->prev >= 0)
            push_candidate(st, left->prev);
        push_candidate(st, c.pos);
    }
    for (int k = 0; k >= 0 && n > 0; k = st->sym[k].next)
        ids_push(&st->out, st->sym[k].id);
    return 0;
}

/* One stretch of text between added tokens: normalize, pre-tokenize, BPE each piece. */
static int encode_segment(EncodeState *st, const char *text, size_t start, size_t end)
{
    const Tokenizer *tok = st->tok;
    if (end <= start)
        return 0;
    st->arena.n = 0;
    buf_put(&st->arena, text + start, end - start);
    Piece whole = {0, end - start, start == 0};
    for (int i = 0; i < tok->n_norm; i++) {
        const NormStep *step = &tok->norm[i];
        if (step->kind == NORM_PREPEND) {
            if (whole.len > 0)
                prepend_into_arena(st, step->text, &whole);
        } else if (replace_into_arena(st, step->re, step->text, whole.start, whole.len,
                                      &whole.start, &whole.len) != 0) {
            return -1;
        }
    }
    st->pieces.n = 0;
    piece_push(&st->pieces, whole);
    for (int i = 0; i < tok->n_pre; i++) {
        const PreStep *step = &tok->pre[i];
        st->next_pieces.n = 0;
        for (int k = 0; k < st->pieces.n; k++) {
            Piece p = st->pieces.v[k];
            int rc = step->kind == PRE_SPLIT       ? split_piece(st, step, p)
                     : step->kind == PRE_METASPACE ? metaspace_piece(st, step, p)
                                                   : bytelevel_piece(st, step, p);
            if (rc != 0)
                return -1;
        }
        PieceList swap = st->pieces;
        st->pieces = st->next_pieces;
        st->next_pieces = swap;
    }
    for (int k = 0; k < st->pieces.n; k++) {
        if (bpe_piece(st, st->arena.p + st->pieces.v[k].start, st->pieces.v[k].len) != 0)
            return -1;
    }
    return 0;
}

/* The longest added token at text[pos], honouring single_word; NULL when none. */
static const AddedToken *match_added(const Tokenizer *tok, const char *text, size_t len, size_t pos)
{
    unsigned char b = (unsigned char)text[pos];
    for (int k = tok->added_bucket[b]; k < tok->added_bucket[b + 1]; k++) {
        const AddedToken *a = &tok->added[tok->added_by_byte[k]];
        if (a->len > len - pos || memcmp(text + pos, a->content, a->len) != 0)
            continue;
        if (a->single_word && ((pos > 0 && is_ascii_word(text[pos - 1])) ||
                               (pos + a->len < len && is_ascii_word(text[pos + a->len]))))
            continue;
        return a;
    }
    return NULL;
}

int tokenizer_encode(const Tokenizer *tok, const char *text, size_t len, int32_t **ids, int *n,
                     KvErr *err)
{
    *ids = NULL;
    *n = 0;
    /* Token counts, symbol indices and merge positions are ints. */
    if (len > (size_t)INT32_MAX / 4)
        return kv_fail(err, "text of %zu bytes to encode with %s is too long (at most %d bytes)",
                       len, tok->path, INT32_MAX / 4);
    size_t bad = utf8_invalid_offset(text, len);
    if (bad < len)
        return kv_fail(err, "text to encode with %s is not valid UTF-8 at byte %zu", tok->path,
                       bad);
    EncodeState st = {.tok = tok, .err = err};
    st.match = pcre2_match_data_create(1, NULL);
    int rc = 0;
    size_t segment = 0, pos = 0;
    while (rc == 0 && pos < len) {
        const AddedToken *a = tok->n_added ? match_added(tok, text, len, pos) : NULL;
        if (!a) {
            pos++;
            continue;
        }
        size_t start = pos, end = pos + a->len;
        while (a->lstrip && start > segment && is_ascii_space(text[start - 1]))
            start--;
        while (a->rstrip && end < len && is_ascii_space(text[end]))
            end++;
        rc = encode_segment(&st, text, segment, start);
        ids_push(&st.out, a->id);
        segment = pos = end;
    }
    if (rc == 0)
        rc = encode_segment(&st, text, segment, len);
    pcre2_match_data_free(st.match);
    free(st.arena.p);
    free(st.pieces.v);
    free(st.next_pieces.v);
    free(st.spans);
    free(st.sym);
    free(st.heap);
    free(st.mapped.p);
    if (rc != 0) {
        free(st.out.v);
        return -1;
    }
    *ids = st.out.v ? st.out.v : kv_malloc(sizeof **ids);
    *n = st.out.n;
    return 0;
}

/* ---------------------------------------------------------------- decoding */

/* A token's text while the decoder steps run; literal ones (added tokens, unknown ids) are
 * never rewritten by a step, only fused with their neighbours. */
typedef struct {
    ByteBuf text;
    int literal;
} DecToken;

typedef struct {
    DecToken *v;
    int n;
} DecList;

static int byte_of_fallback_token(const DecToken *t)
{
    static const char hex[] = "0123456789ABCDEF";
    if (t->literal || t->text.n != 6 || memcmp(t->text.p, "<0x", 3) != 0 || t->text.p[5] != '>')
        return -1;
    const char *hi = memchr(hex, t->text.p[3], 16), *lo = memchr(hex, t->text.p[4], 16);
    if (!hi || !lo || !t->text.p[3] || !t->text.p[4])
        return -1;
    return (int)((hi - hex) * 16 + (lo - hex));
}

static void replace_in_token(ByteBuf *t, const char *pattern, const char *content)
{
    size_t plen = strlen(pattern), clen = strlen(content);
    ByteBuf out = {0};
    size_t i = 0;
    while (i < t->n) {
        if (i + plen <= t->n && memcmp(t->p + i, pattern, plen) == 0) {
            buf_put(&out, content, clen);
            i += plen;
        } else {
            buf_put(&out, t->p + i, 1);
            i++;
        }
    }
    free(t->p);
    *t = out;
}

/* Fuses all tokens into one (the list keeps its first entry). */
static void fuse_all(DecList *l, ByteBuf joined)
{
    for (int i = 0; i < l->n; i++)
        free(l->v[i].text.p);
    l->n = 1;
    l->v[0].text = joined;
    l->v[0].literal = 0;
}

static void dec_bytelevel(const Tokenizer *tok, DecList *l)
{
    ByteBuf out = {0};
    for (int i = 0; i < l->n; i++) {
        const ByteBuf *t = &l->v[i].text;
        size_t mark = out.n, k = 0;
        int mapped = !l->v[i].literal;
        while (mapped && k < t->n) {
            size_t adv;
            int32_t cp = utf8_next((const unsigned char *)t->p + k, t->n - k, &adv);
            if (cp < 0 || cp >= 324 || tok->char_byte[cp] < 0) {
                mapped = 0;
                break;
            }
            char b = (char)tok->char_byte[cp];
            buf_put(&out, &b, 1);
            k += adv;
        }
        if (!mapped) { /* as the tokenizers library: a token with unmapped characters stays raw */
            out.n = mark;
            buf_put(&out, t->p, t->n);
        }
    }
    fuse_all(l, out);
}

static void dec_bytefallback(DecList *l)
{
    int w = 0;
    for (int i = 0; i < l->n;) {
        if (byte_of_fallback_token(&l->v[i]) < 0) {
            l->v[w++] = l->v[i++];
            continue;
        }
        ByteBuf bytes = {0};
        int j = i;
        for (; j < l->n && byte_of_fallback_token(&l->v[j]) >= 0; j++) {
            char b = (char)byte_of_fallback_token(&l->v[j]);
            buf_put(&bytes, &b, 1);
            free(l->v[j].text.p);
        }
        ByteBuf text = {0};
        int valid = 1;
        for (size_t k = 0, adv; k < bytes.n && valid; k += adv)
            valid = utf8_next((const unsigned char *)bytes.p + k, bytes.n - k, &adv) >= 0;
        if (valid)
            buf_put(&text, bytes.p, bytes.n);
        else /* as the tokenizers library: one U+FFFD per byte of an invalid run */
            for (size_t k = 0; k < bytes.n; k++)
                buf_put(&text, REPLACEMENT_CHAR, 3);
        free(bytes.p);
        l->v[w++] = (DecToken){text, 0};
        i = j;
    }
    l->n = w;
}

static void dec_strip(const DecStep *step, DecToken *t)
{
    size_t clen = strlen(step->strip_char), head = 0, tail = t->text.n;
    for (int k = 0; k < step->strip_start && tail - head >= clen &&
                    memcmp(t->text.p + head, step->strip_char, clen) == 0;
         k++)
        head += clen;
    for (int k = 0; k < step->strip_stop && tail - head >= clen &&
                    memcmp(t->text.p + tail - clen, step->strip_char, clen) == 0;
         k++)
        tail -= clen;
    memmove(t->text.p, t->text.p + head, tail - head);
    t->text.n = tail - head;
}

char *tokenizer_decode(const Tokenizer *tok, const int32_t *ids, int n)
{
    DecList l = {kv_calloc((size_t)(n > 0 ? n : 1), sizeof *l.v), 0};
    for (int i = 0; i < n; i++) {
        DecToken *t = &l.v[l.n++];
        int32_t id = ids[i];
        int added = id >= 0 && id < tok->n_ids ? tok->added_of_id[id] : -1;
        if (added >= 0) {
            buf_put(&t->text, tok->added[added].content, tok->added[added].len);
            t->literal = 1;
        } else if (id >= 0 && id < tok->n_ids && tok->vocab_str[id]) {
            buf_put(&t->text, tok->vocab_str[id], tok->vocab_len[id]);
        } else { /* an id outside the vocabulary decodes to U+FFFD rather than vanishing */
            buf_put(&t->text, REPLACEMENT_CHAR, 3);
            t->literal = 1;
        }
    }
    for (int s = 0; s < tok->n_dec && l.n > 0; s++) {
        const DecStep *step = &tok->dec[s];
        switch (step->kind) {
        case DEC_BYTELEVEL:
            dec_bytelevel(tok, &l);
            break;
        case DEC_BYTEFALLBACK:
            dec_bytefallback(&l);
            break;
        case DEC_FUSE: {
            ByteBuf joined = {0};
            for (int i = 0; i < l.n; i++)
                buf_put(&joined, l.v[i].text.p, l.v[i].text.n);
            fuse_all(&l, joined);
            break;
        }
        case DEC_REPLACE:
            for (int i = 0; i < l.n; i++)
                if (!l.v[i].literal)
                    replace_in_token(&l.v[i].text, step->pattern, step->content);
            break;
        case DEC_STRIP:
            for (int i = 0; i < l.n; i++)
                if (!l.v[i].literal)
                    dec_strip(step, &l.v[i]);
            break;
        case DEC_METASPACE:
            for (int i = 0; i < l.n; i++) {
                if (l.v[i].literal)
                    continue;
                replace_in_token(&l.v[i].text, step->replacement, " ");
                if (i == 0 && step->prepend_scheme != PREPEND_NEVER && l.v[i].text.n > 0 &&
                    l.v[i].text.p[0] == ' ') {
                    memmove(l.v[i].text.p, l.v[i].text.p + 1, l.v[i].text.n - 1);
                    l.v[i].text.n--;
                }
            }
            break;
        }
    }
    ByteBuf out = {0};
    for (int i = 0; i < l.n; i++) {
        put_utf8_lossy(&out, l.v[i].text.p, l.v[i].text.n);
        free(l.v[i].text.p);
    }
    free(l.v);
    buf_put(&out, "", 1);
    return out.p;
}

/* ---------------------------------------------------------------- queries */

int tokenizer_vocab_size(const Tokenizer *tok) { return tok->n_ids; }
int tokenizer_bos(const Tokenizer *tok) { return tok->bos; }
int tokenizer_eos(const Tokenizer *tok) { return tok->eos; }
int tokenizer_add_bos(const Tokenizer *tok) { return tok->add_bos; }

int tokenizer_token_id(const Tokenizer *tok, const char *token)
{
    size_t len = strlen(token);
    for (int i = 0; i < tok->n_added; i++)
        if (tok->added[i].len == len && memcmp(tok->added[i].content, token, len) == 0)
            return tok->added[i].id;
    return len ? vocab_find(tok, token, len) : -1;
}
