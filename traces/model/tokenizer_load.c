/* tokenizer_load.c — tokenizer.json and tokenizer_config.json to a Tokenizer
 * (tokenizer_impl.h): the JSON read under the rules of sim/base/json.h, every key checked for
 * its type, the vocabulary and merges hashed, the normalizer, pre-tokenizer and decoder steps
 * compiled (regexes included), the added tokens ordered for matching, BOS/EOS decided. Also
 * tokenizer_free and the queries. */
#include "traces/model/tokenizer_impl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "sim/base/json.h"

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

/* A Sequence step of the normalizer, pre-tokenizer or decoder (`what`): each element of its
 * array `key` added in order by `add`. */
static int add_sequence(Tokenizer *tok, const cJSON *obj, const char *what, const char *key,
                        int (*add)(Tokenizer *, const cJSON *, KvErr *), KvErr *err)
{
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsArray(list))
        return kv_fail(err, "%s: %s Sequence: expected a \"%s\" array", tok->path, what, key);
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        if (add(tok, item, err) != 0)
            return -1;
    }
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
        return add_sequence(tok, n, "normalizer", "normalizers", add_normalizer, err);
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
        return add_sequence(tok, p, "pre_tokenizer", "pretokenizers", add_pre_tokenizer, err);
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
        return add_sequence(tok, d, "decoder", "decoders", add_decoder, err);
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
