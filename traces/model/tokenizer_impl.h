/* tokenizer_impl.h — what the three parts of the tokenizer share, private to them: the
 * Tokenizer's tables and the helpers that read them. tokenizer_load.c builds every table from
 * tokenizer.json (and tokenizer_config.json) and frees them; tokenizer_encode.c and
 * tokenizer_decode.c only read a loaded Tokenizer, so that one can be shared by threads.
 * Callers use traces/model/tokenizer.h.
 *
 * The pipeline follows the tokenizers library: added tokens are cut out of the raw text first
 * (leftmost-longest), each remaining segment is normalized, pre-tokenized into pieces, and each
 * piece is run through BPE on its own, merging the lowest-ranked adjacent pair first. Decoding
 * runs the tokenizer's decoder steps over the token strings, except that added tokens always
 * come out as their literal content (docs/tokenizer.md). */
#ifndef KVSIM_TOKENIZER_IMPL_H
#define KVSIM_TOKENIZER_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8

#include <pcre2.h>
#include <stdint.h>
#include <string.h>

#include "sim/base/text.h"
#include "sim/base/util.h"
#include "traces/model/tokenizer.h"

/* ---------------------------------------------------------------- small helpers */

typedef struct {
    char *p;
    size_t n, cap;
} ByteBuf;

static inline void buf_reserve(ByteBuf *b, size_t extra)
{
    if (b->n + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra)
        cap *= 2;
    b->p = kv_realloc(b->p, cap);
    b->cap = cap;
}

static inline void buf_put(ByteBuf *b, const void *src, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}

static inline uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

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

static inline int32_t vocab_find(const Tokenizer *tok, const char *s, size_t n)
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

static inline uint64_t merge_key(int32_t left, int32_t right)
{
    return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

static inline size_t merge_slot_of(uint64_t key, size_t mask)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 17) & mask;
}

static inline const MergeSlot *merge_find(const Tokenizer *tok, int32_t left, int32_t right)
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


/* File content made safe for a one-line message (control bytes escaped, long text cut). The
 * array lives until the end of the full expression that calls esc(), e.g. a kv_fail call. */
typedef struct {
    char s[160];
} Esc;

static inline Esc esc_n(const char *s, size_t n)
{
    Esc e;
    kv_escape(s, n, e.s, sizeof e.s);
    return e;
}

static inline Esc esc(const char *s)
{
    return s ? esc_n(s, strlen(s)) : esc_n("(none)", 6);
}

#endif
