/* tokenizer_encode.c — text to token ids with a loaded Tokenizer (tokenizer_impl.h): added
 * tokens cut out first, then each segment normalized, pre-tokenized into pieces, and each piece
 * run through BPE (with byte fallback or byte-level characters). Reads the Tokenizer only. */
#include "traces/model/tokenizer_impl.h"

#include <stdlib.h>

/* ---------------------------------------------------------------- small helpers */

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

static int is_ascii_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int is_ascii_word(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
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
