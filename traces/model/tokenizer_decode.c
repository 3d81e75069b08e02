/* tokenizer_decode.c — token ids to text with a loaded Tokenizer (tokenizer_impl.h): the
 * decoder steps over the token strings, added tokens as their literal content, invalid UTF-8
 * replaced by U+FFFD. Reads the Tokenizer only. */
#include "traces/model/tokenizer_impl.h"

#include <stdlib.h>

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
