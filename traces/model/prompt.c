#include "traces/model/prompt.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "sim/base/json.h"
#include "sim/base/text.h"
#include "traces/model/tokenizer.h"

static const char NEEDLE_OPEN[] = "[[needle]]";
static const char NEEDLE_CLOSE[] = "[[/needle]]";
static const char PROBE[] = "[[probe]]";
static const char DECODE[] = "[[decode]]";
static const char GENERATE[] = "[[generate]]";
static const char GROUP[] = "[[group="; /* [[group=NAME]] */
enum { GROUP_NAME_MAX = sizeof((PromptMarkup *)0)->group - 1 };

/* Accumulates text into the current piece; a marker or a new segment closes it. */
typedef struct {
    PromptMarkup *m;
    char *buf;
    size_t len, cap;
    int segment;
    int in_needle;
    int needle_has_text;
    int n_needles;
    int seen_decode;   /* a [[decode]] in this turn */
    int decode_forced; /* after [[decode]], until the turn ends */
    int assistant;     /* inside an assistant message's content: forced */
    int is_chat;
    int turn_text;     /* plain text: non-blank text since the last [[generate]] */
} Builder;

static void flush(Builder *b)
{
    if (b->len == 0)
        return;
    b->needle_has_text |= b->in_needle;
    PromptMarkup *m = b->m;
    m->pieces = kv_realloc(m->pieces, (size_t)(m->n_pieces + 1) * sizeof *m->pieces);
    PromptPiece *p = &m->pieces[m->n_pieces++];
    *p = (PromptPiece){PIECE_TEXT, kv_malloc(b->len + 1), b->len, b->segment, b->in_needle,
                       b->in_needle ? b->n_needles - 1 : -1, b->decode_forced || b->assistant};
    memcpy(p->text, b->buf, b->len);
    p->text[b->len] = '\0';
    b->len = 0;
}

static void append(Builder *b, const char *text, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        b->cap = 2 * (b->len + len + 1);
        b->buf = kv_realloc(b->buf, b->cap);
    }
    memcpy(b->buf + b->len, text, len);
    b->len += len;
}

static void set_segment(Builder *b, int segment)
{
    if (segment != b->segment)
        flush(b);
    b->segment = segment;
}

static void push_marker(Builder *b, PieceKind kind)
{
    flush(b);
    PromptMarkup *m = b->m;
    m->pieces = kv_realloc(m->pieces, (size_t)(m->n_pieces + 1) * sizeof *m->pieces);
    m->pieces[m->n_pieces++] = (PromptPiece){kind, NULL, 0, b->segment, 0, -1, 0};
}

/* The [[decode]] marker at byte `at` of text. */
static int mark_decode(Builder *b, const char *origin, const char *text, size_t at, KvErr *err)
{
    if (b->in_needle)
        return kv_fail(err, "%s: line %d: [[decode]] inside a needle", origin, text_line_at(text, at));
    if (b->seen_decode)
        return kv_fail(err, "%s: line %d: a second [[decode]] in one turn (at most one per turn)",
                       origin, text_line_at(text, at));
    b->seen_decode = 1;
    push_marker(b, PIECE_DECODE);
    b->decode_forced = 1;
    return 0;
}

/* [[generate]] at byte `at` of plain text: the model answers here, the text after it is the
 * next turn. */
static int mark_generate(Builder *b, const char *origin, const char *text, size_t at, KvErr *err)
{
    if (b->in_needle)
        return kv_fail(err, "%s: line %d: [[generate]] inside a needle", origin,
                       text_line_at(text, at));
    if (!b->turn_text)
        return kv_fail(err, "%s: line %d: an empty turn before [[generate]] (expected text for "
                       "the model to answer)", origin, text_line_at(text, at));
    push_marker(b, PIECE_GENERATE);
    b->decode_forced = b->seen_decode = 0;
    b->turn_text = 0;
    b->segment++; /* flushed by push_marker: the next text is the next turn */
    return 0;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* The length of the [[group=NAME]] marker at `rest` (left bytes), its line break after it
 * included; 0 when it is not well formed (NAME: 1 to GROUP_NAME_MAX letters, digits, '_', '-',
 * '.' or '+'). The name goes to name[GROUP_NAME_MAX + 1] when not NULL. */
static size_t group_marker(const char *rest, size_t left, char *name)
{
    size_t n = sizeof GROUP - 1, k = 0;
    while (n + k < left && (isalnum((unsigned char)rest[n + k]) || strchr("_-.+", rest[n + k])) &&
           rest[n + k] != '\0')
        k++;
    if (k == 0 || k > GROUP_NAME_MAX || n + k + 2 > left || memcmp(rest + n + k, "]]", 2))
        return 0;
    if (name) {
        memcpy(name, rest + n, k);
        name[k] = '\0';
    }
    size_t end = n + k + 2;
    if (end < left && rest[end] == '\n')
        end++;
    else if (end + 1 < left && rest[end] == '\r' && rest[end + 1] == '\n')
        end += 2;
    return end;
}

/* [[group=NAME]] at byte `at` of text: the prompt's group (at most one per file), removed with
 * the line break after it. Returns the bytes to skip, or 0 with err set. */
static size_t mark_group(Builder *b, const char *origin, const char *text, size_t at,
                         size_t left, KvErr *err)
{
    int line = text_line_at(text, at);
    char name[GROUP_NAME_MAX + 1];
    size_t skip = group_marker(text + at, left, name);
    if (!skip) {
        kv_fail(err, "%s: line %d: malformed [[group=NAME]] (expected a NAME of 1 to %d letters, "
                "digits, '_', '-', '.' or '+', then ]])", origin, line, (int)GROUP_NAME_MAX);
        return 0;
    }
    if (b->m->group[0]) {
        kv_fail(err, "%s: line %d: a second [[group=...]] (at most one per prompt file; the "
                "first names '%s')", origin, line, b->m->group);
        return 0;
    }
    if (b->in_needle) {
        kv_fail(err, "%s: line %d: [[group=...]] inside a needle", origin, line);
        return 0;
    }
    memcpy(b->m->group, name, sizeof name);
    return skip;
}

/* Appends text, acting on the markers in it. A needle must close within the same text. */
static int append_marked(Builder *b, const char *origin, const char *text, size_t len, KvErr *err)
{
    size_t i = 0, start = 0;
    while (i < len) {
        const char *rest = text + i;
        size_t left = len - i;
        size_t marker = 0;
        if (left >= sizeof GROUP - 1 && !memcmp(rest, GROUP, sizeof GROUP - 1)) {
            /* no piece ends here: the text on both sides is one */
            append(b, text + start, i - start);
            size_t skip = mark_group(b, origin, text, i, left, err);
            if (!skip)
                return -1;
            i += skip;
            start = i;
            continue;
        }
        if (left >= sizeof NEEDLE_OPEN - 1 && !memcmp(rest, NEEDLE_OPEN, sizeof NEEDLE_OPEN - 1))
            marker = sizeof NEEDLE_OPEN - 1;
        else if (left >= sizeof NEEDLE_CLOSE - 1 &&
                 !memcmp(rest, NEEDLE_CLOSE, sizeof NEEDLE_CLOSE - 1))
            marker = sizeof NEEDLE_CLOSE - 1;
        else if (left >= sizeof PROBE - 1 && !memcmp(rest, PROBE, sizeof PROBE - 1))
            marker = sizeof PROBE - 1;
        else if (left >= sizeof DECODE - 1 && !memcmp(rest, DECODE, sizeof DECODE - 1))
            marker = sizeof DECODE - 1;
        else if (left >= sizeof GENERATE - 1 && !memcmp(rest, GENERATE, sizeof GENERATE - 1))
            marker = sizeof GENERATE - 1;
        if (!marker) {
            b->turn_text |= !is_blank(text[i]);
            i++;
            continue;
        }
        append(b, text + start, i - start);
        if (rest[2] == 'n') { /* [[needle]] */
            if (b->in_needle)
                return kv_fail(err, "%s: line %d: [[needle]] inside a needle", origin,
                               text_line_at(text, i));
            /* The forced part is processed through a policy's cache after compression: a
             * needle there would never be subject to eviction when it is read. */
            if (b->decode_forced)
                return kv_fail(err, "%s: line %d: [[needle]] after [[decode]] (needles must lie "
                               "in the prompt before it)", origin, text_line_at(text, i));
            flush(b);
            b->in_needle = 1;
            b->needle_has_text = 0;
            b->n_needles++;
        } else if (rest[2] == '/') {
            if (!b->in_needle)
                return kv_fail(err, "%s: line %d: [[/needle]] without [[needle]]", origin,
                               text_line_at(text, i));
            flush(b);
            if (!b->needle_has_text)
                return kv_fail(err, "%s: line %d: empty needle", origin, text_line_at(text, i));
            b->in_needle = 0;
        } else if (rest[2] == 'd') {
            if (mark_decode(b, origin, text, i, err) != 0)
                return -1;
        } else if (rest[2] == 'g') {
            if (b->is_chat)
                return kv_fail(err, "%s: line %d: [[generate]] inside a message's text (it must "
                               "be an assistant message's whole content)", origin,
                               text_line_at(text, i));
            if (mark_generate(b, origin, text, i, err) != 0)
                return -1;
        } else {
            push_marker(b, PIECE_PROBE);
        }
        i += marker;
        start = i;
    }
    append(b, text + start, len - start);
    if (b->in_needle)
        return kv_fail(err, "%s: line %d: [[needle]] is never closed", origin,
                       text_line_at(text, len));
    return 0;
}

/* Whether a message's content holds text besides markers and blanks. */
static int has_text(const char *body)
{
    static const char *const markers[] = {NEEDLE_OPEN, NEEDLE_CLOSE, PROBE, DECODE, GENERATE};
    for (const char *c = body; *c;) {
        size_t skip = 0;
        for (size_t k = 0; k < sizeof markers / sizeof *markers && !skip; k++)
            if (!strncmp(c, markers[k], strlen(markers[k])))
                skip = strlen(markers[k]);
        if (!skip && !strncmp(c, GROUP, sizeof GROUP - 1))
            skip = group_marker(c, strlen(c), NULL);
        if (!skip && !is_blank(*c))
            return 1;
        c += skip ? skip : 1;
    }
    return 0;
}

/* kvsim's chat template: "System: ...\n\n", "User: ...\n\n", "Assistant: ...\n\n", and
 * "Assistant:" after a final user message so that the model answers. As a conversation: a user
 * message opens a prefill span (after the system message, with it); an assistant message's
 * header "Assistant:" is prefilled (the generation prompt), its " content" forced or, for
 * [[generate]], generated; the "\n\n" after it opens the next prefill span, as the template
 * adds it to the next request. */
static int parse_chat(const char *origin, const cJSON *chat, Builder *b, KvErr *err)
{
    int turn = 0, n = cJSON_GetArraySize(chat);
    if (n == 0)
        return kv_fail(err, "%s: the chat has no messages", origin);
    const char *last_role = NULL;
    b->is_chat = 1;
    for (int i = 0; i < n; i++) {
        const cJSON *msg = cJSON_GetArrayItem(chat, i);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(msg, "content");
        if (!cJSON_IsObject(msg) || !cJSON_IsString(role) || !cJSON_IsString(content))
            return kv_fail(err, "%s: message %d needs string 'role' and 'content'", origin, i + 1);
        /* cJSON reads the first of two equal keys, Python's json the last: refuse the doubt. */
        int n_role = 0, n_content = 0;
        const cJSON *key;
        cJSON_ArrayForEach(key, msg) {
            n_role += !strcmp(key->string, "role");
            n_content += !strcmp(key->string, "content");
        }
        if (n_role > 1 || n_content > 1)
            return kv_fail(err, "%s: message %d: '%s' appears twice", origin, i + 1,
                           n_role > 1 ? "role" : "content");
        const char *r = role->valuestring, *header;
        const char *body = content->valuestring;
        int user = 0, assistant = 0;
        if (!strcmp(r, "system")) {
            if (i != 0)
                return kv_fail(err, "%s: message %d: only the first message may be 'system'",
                               origin, i + 1);
            header = "System: ";
        } else if (!strcmp(r, "user")) {
            user = 1;
            header = "User: ";
        } else if (!strcmp(r, "assistant")) {
            assistant = 1;
            header = "Assistant:";
        } else {
            char shown[128];
            return kv_fail(err, "%s: message %d: role '%s' (expected system, user or assistant)",
                           origin, i + 1, kv_escape(r, strlen(r), shown, sizeof shown));
        }
        int generate = assistant && !strcmp(body, GENERATE);
        if (!generate && strstr(body, GENERATE))
            return kv_fail(err, "%s: message %d: [[generate]] %s (only an assistant message "
                           "whose whole content is [[generate]] is generated)", origin, i + 1,
                           assistant ? "with other text" : user ? "in a user message"
                                                                : "in a system message");
        if (!generate && !has_text(body))
            return kv_fail(err, "%s: message %d: an empty turn (the %s message has no text)",
                           origin, i + 1, r);
        /* The end of the previous message: an assistant's content is over; a user message
         * opens a new prefill span, its turn, and ends the forced text of [[decode]]. */
        flush(b);
        b->assistant = 0;
        if (user && last_role && !(i == 1 && !strcmp(last_role, "system"))) {
            push_marker(b, PIECE_SPAN);
            b->decode_forced = b->seen_decode = 0;
        }
        if (last_role && !strcmp(last_role, "assistant"))
            append(b, "\n\n", 2);
        if (user)
            turn++;
        else if (assistant && turn == 0) /* an assistant message opening the chat starts turn 1 */
            turn = 1;
        set_segment(b, turn);
        char where[512];
        snprintf(where, sizeof where, "%s: message %d", origin, i + 1);
        /* A marker opening the content splits before the header: the next turn, role line
         * included, is what a later request brings. */
        if (!strncmp(body, DECODE, sizeof DECODE - 1)) {
            if (mark_decode(b, where, body, 0, err) != 0)
                return -1;
            body += sizeof DECODE - 1;
        }
        append(b, header, strlen(header));
        if (generate) {
            push_marker(b, PIECE_GENERATE);
        } else if (assistant) {
            flush(b);
            b->assistant = 1;
            append(b, " ", 1);
            if (append_marked(b, where, body, strlen(body), err) != 0)
                return -1;
        } else {
            if (append_marked(b, where, body, strlen(body), err) != 0)
                return -1;
            append(b, "\n\n", 2);
        }
        last_role = r;
    }
    if (!strcmp(last_role, "user"))
        append(b, "Assistant:", strlen("Assistant:"));
    return 0;
}

/* Where a chat file's JSON text holds a NUL: a raw NUL byte or a \u0000 escape in a string
 * (cJSON's strings end at the first NUL, so the rest of the message would silently vanish).
 * Returns the offset, or len when there is none; *message is the 1-based index of the element
 * of the top-level array it lies in (0: outside any element, or the top level is no array). */
static size_t json_nul_at(const char *text, size_t len, int *message)
{
    int depth = 0, in_string = 0, commas = 0, seen = 0, array = 0;
    size_t i = 0;
    for (; i < len; i++) {
        char c = text[i];
        if (c == '\0')
            break;
        if (in_string) {
            if (c == '"') {
                in_string = 0;
            } else if (c == '\\' && i + 1 < len) {
                if (text[i + 1] == 'u' && i + 6 <= len && memcmp(text + i + 2, "0000", 4) == 0)
                    break;
                i++; /* the escaped character */
            }
            continue;
        }
        if (depth == 0 && c == '[')
            array = 1;
        if (depth == 1) { /* between the elements of the top level */
            if (c == ',')
                commas++;
            else if (!is_blank(c) && c != ']' && c != '}')
                seen = 1;
        }
        if (c == '"')
            in_string = 1;
        else if (c == '[' || c == '{')
            depth++;
        else if (c == ']' || c == '}')
            depth--;
    }
    *message = array && depth >= 1 && seen ? commas + 1 : 0;
    return i;
}

/* Whether text (from its first non-blank byte, '[' or '{') looks like a JSON chat, so that a
 * file that then fails to parse is an error rather than plain text: "[" followed by "{" or "]",
 * or "{" followed by '"' or "}" (blanks allowed in between; the end of the file counts too).
 * Text opening with a marker ("[[needle]]"), "[1]", "[INST]" or "{{" is plain text. */
static int looks_like_chat(const char *text, size_t len)
{
    size_t i = 1;
    while (i < len && is_blank(text[i]))
        i++;
    if (i == len)
        return 1;
    return text[0] == '[' ? text[i] == '{' || text[i] == ']' : text[i] == '"' || text[i] == '}';
}

/* The chat of a file that is one (it parses as a JSON array, or looks like a chat), or NULL
 * after an error naming the file and the byte offset. json is the parse (NULL if it failed). */
static cJSON *check_chat_json(const char *origin, const char *text, size_t len, size_t lead,
                              cJSON *json, size_t at, int trailing, KvErr *err)
{
    int message;
    size_t nul = json_nul_at(text, len, &message);
    if (nul < len) {
        char where[32] = "";
        if (message > 0)
            snprintf(where, sizeof where, "message %d: ", message);
        kv_fail(err, "%s: %sline %d, byte %zu: %s (NUL characters are not allowed in a prompt)",
                origin, where, text_line_at(text, nul), nul,
                text[nul] ? "\\u0000 in a string" : "NUL byte");
    } else if (trailing) {
        kv_fail(err, "%s: line %d, byte %zu: text after the end of the JSON chat", origin,
                text_line_at(text, at), at);
    } else if (!json) {
        kv_fail(err, "%s: line %d, byte %zu: not valid JSON (a file that starts with '%c' as "
                "this one does is read as a JSON chat)", origin, text_line_at(text, at), at,
                text[lead]);
    } else if (!cJSON_IsArray(json)) {
        kv_fail(err, "%s: a JSON %s (expected a chat: a JSON array of {\"role\": ..., "
                "\"content\": ...} messages)", origin, cJSON_IsObject(json) ? "object" : "value");
    } else {
        return json;
    }
    cJSON_Delete(json);
    return NULL;
}

int prompt_parse(const char *origin, const char *text, size_t len, PromptMarkup *out, KvErr *err)
{
    memset(out, 0, sizeof *out);
    if (len == 0)
        return kv_fail(err, "%s: the prompt file is empty (expected text or a JSON chat)",
                       origin);
    size_t bad = utf8_invalid_offset(text, len);
    if (bad < len)
        return kv_fail(err, "%s: line %d, byte %zu: not valid UTF-8 (a prompt must be UTF-8 text)",
                       origin, text_line_at(text, bad), bad);
    Builder b = {.m = out};
    /* A byte-order mark before a chat is skipped (cJSON does not take one); in plain text it
     * stays, as Python's open(..., encoding="utf-8") keeps it. */
    size_t bom = len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3) ? 3 : 0, lead = bom;
    while (lead < len && is_blank(text[lead]))
        lead++;
    cJSON *chat = NULL;
    if (lead < len && (text[lead] == '[' || text[lead] == '{')) {
        size_t at;
        int trailing;
        cJSON *json = json_parse_exact(text + bom, len - bom, &at, &trailing);
        at += bom;
        /* A file that parses as a JSON array is a chat, and so is one that looks like a chat;
         * text that merely opens with a bracket ("[1] ...", "[[needle]]...") is plain text. */
        if (cJSON_IsArray(json) || looks_like_chat(text + lead, len - lead)) {
            chat = check_chat_json(origin, text, len, lead, json, at, trailing, err);
            if (!chat)
                return -1;
        } else {
            cJSON_Delete(json);
        }
    }
    int rc;
    if (chat) {
        out->is_chat = 1;
        rc = parse_chat(origin, chat, &b, err);
        cJSON_Delete(chat);
    } else {
        /* A plain document is the user's text, not a system prompt: segment 1, so that
         * policies that pin segment 0 (TriCache's system prompt) pin only BOS. */
        set_segment(&b, 1);
        rc = append_marked(&b, origin, text, len, err);
        /* Blanks after a last [[generate]] (a file's final newline) are no further turn: that
         * [[generate]] is the final generation. */
        if (rc == 0 && b.segment > 1 && !b.turn_text)
            b.len = 0;
    }
    flush(&b);
    free(b.buf);
    /* The generated tokens continue the turn of the last text. */
    out->last_segment = b.segment;
    for (int i = out->n_pieces - 1; i >= 0; i--)
        if (out->pieces[i].kind == PIECE_TEXT) {
            out->last_segment = out->pieces[i].segment;
            break;
        }
    if (rc != 0) {
        prompt_markup_free(out);
        return -1;
    }
    return 0;
}

void prompt_markup_free(PromptMarkup *m)
{
    for (int i = 0; i < m->n_pieces; i++)
        free(m->pieces[i].text);
    free(m->pieces);
    memset(m, 0, sizeof *m);
}

static void push_token(PromptTokens *t, int32_t id, int segment, int *cap)
{
    if (t->n_tokens == *cap) {
        *cap = *cap ? 2 * *cap : 256;
        t->tokens = kv_realloc(t->tokens, (size_t)*cap * sizeof *t->tokens);
        t->segments = kv_realloc(t->segments, (size_t)*cap * sizeof *t->segments);
    }
    t->tokens[t->n_tokens] = id;
    t->segments[t->n_tokens++] = segment;
}

/* Appends n tokens to the spans as `kind`, opening a span when the kind changes or a new span
 * was asked for (*split). */
static void extend_spans(PromptTokens *t, int kind, int n, int *split)
{
    if (n == 0)
        return;
    PromptSpan *last = t->n_spans ? &t->spans[t->n_spans - 1] : NULL;
    if (!last || *split || last->kind != kind) {
        int start = last ? last->end : 0; /* before the realloc moves the array */
        t->spans = kv_realloc(t->spans, (size_t)(t->n_spans + 1) * sizeof *t->spans);
        t->spans[t->n_spans++] = (PromptSpan){kind, start, start};
        last = &t->spans[t->n_spans - 1];
        *split = 0;
    }
    last->end += n;
}

int prompt_tokenize(const char *origin, const PromptMarkup *m, PromptEncodeFn encode, void *ctx,
                    int bos, PromptTokens *out, KvErr *err)
{
    memset(out, 0, sizeof *out);
    int cap = 0, split = 0, n_decodes = 0;
    int *decode_at = NULL; /* [n_decodes]: the token each [[decode]] precedes */
    if (bos >= 0) {
        push_token(out, bos, 0, &cap);
        extend_spans(out, PROMPT_PREFILL, 1, &split);
    }
    for (int i = 0; i < m->n_pieces; i++) {
        const PromptPiece *p = &m->pieces[i];
        if (p->kind == PIECE_DECODE) {
            if (out->n_tokens == (bos >= 0)) {
                prompt_tokens_free(out);
                free(decode_at);
                return kv_fail(err, "%s: nothing before [[decode]] (expected the prompt text "
                               "that is prefilled)", origin);
            }
            decode_at = kv_realloc(decode_at, (size_t)(n_decodes + 1) * sizeof *decode_at);
            decode_at[n_decodes++] = out->n_tokens;
            continue;
        }
        if (p->kind == PIECE_SPAN) {
            split = 1;
            continue;
        }
        if (p->kind == PIECE_GENERATE) {
            if (out->n_tokens == (bos >= 0)) {
                prompt_tokens_free(out);
                free(decode_at);
                return kv_fail(err, "%s: nothing before [[generate]] (expected a prompt for the "
                               "model to answer)", origin);
            }
            out->spans = kv_realloc(out->spans, (size_t)(out->n_spans + 1) * sizeof *out->spans);
            out->spans[out->n_spans++] = (PromptSpan){PROMPT_GENERATE, out->n_tokens,
                                                      out->n_tokens};
            split = 1;
            continue;
        }
        if (p->kind == PIECE_PROBE) {
            if (out->n_tokens == 0) {
                prompt_tokens_free(out);
                free(decode_at);
                return kv_fail(err, "%s: [[probe]] before the first token", origin);
            }
            if (out->n_probes && out->probes[out->n_probes - 1] == out->n_tokens - 1)
                continue; /* two markers at one position are one probe */
            out->probes = kv_realloc(out->probes, (size_t)(out->n_probes + 1) * sizeof *out->probes);
            out->probes[out->n_probes++] = out->n_tokens - 1;
            continue;
        }
        int32_t *ids = NULL;
        int n = 0;
        if (encode(ctx, p->text, p->len, &ids, &n, err) != 0) {
            prompt_tokens_free(out);
            free(decode_at);
            return -1;
        }
        int start = out->n_tokens;
        for (int j = 0; j < n; j++)
            push_token(out, ids[j], p->segment, &cap);
        free(ids);
        extend_spans(out, p->forced ? PROMPT_FORCED : PROMPT_PREFILL, n, &split);
        if (p->in_needle) {
            /* A needle split across segments cannot happen (it closes within its message), but
             * it may span several pieces of one segment: extend the open span. */
            if (out->n_needles > p->needle_id) {
                out->needles[2 * p->needle_id + 1] = out->n_tokens;
            } else {
                out->needles = kv_realloc(out->needles,
                                          (size_t)(out->n_needles + 1) * 2 * sizeof *out->needles);
                out->needles[2 * out->n_needles] = start;
                out->needles[2 * out->n_needles + 1] = out->n_tokens;
                out->n_needles++;
            }
        }
    }
    for (int k = 0; k < out->n_needles; k++)
        if (out->needles[2 * k] == out->needles[2 * k + 1]) {
            int id = k + 1;
            prompt_tokens_free(out);
            free(decode_at);
            return kv_fail(err, "%s: needle %d tokenizes to no tokens", origin, id);
        }
    if (out->n_tokens == (bos >= 0)) {
        prompt_tokens_free(out);
        free(decode_at);
        return kv_fail(err, "%s: the prompt is empty (its text encodes to no tokens%s)", origin,
                       bos >= 0 ? " besides BOS" : "");
    }
    if (out->spans[0].kind != PROMPT_PREFILL) {
        prompt_tokens_free(out);
        free(decode_at);
        return kv_fail(err, "%s: nothing prefilled before the first forced token", origin);
    }
    for (int d = 0; d < n_decodes; d++) {
        int forced_after = 0;
        for (int k = 0; k < out->n_spans; k++)
            forced_after |= out->spans[k].kind == PROMPT_FORCED &&
                            out->spans[k].start <= decode_at[d] && decode_at[d] < out->spans[k].end;
        if (!forced_after) {
            prompt_tokens_free(out);
            free(decode_at);
            return kv_fail(err, "%s: nothing after [[decode]] (expected the text to feed as "
                           "decode steps)", origin);
        }
    }
    free(decode_at);
    /* A trailing [[generate]] is the final generation, which every prompt ends with. */
    if (out->spans[out->n_spans - 1].kind == PROMPT_GENERATE)
        out->n_spans--;
    out->n_prompt = out->spans[0].end;
    return 0;
}

void prompt_tokens_free(PromptTokens *t)
{
    free(t->tokens);
    free(t->segments);
    free(t->needles);
    free(t->probes);
    free(t->spans);
    memset(t, 0, sizeof *t);
}
