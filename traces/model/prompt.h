/* prompt.h — a prompt file and its markup, turned into tokens and trace metadata.
 *
 * A prompt file is plain text (one segment, 1) or a JSON chat, an array of
 * {"role": "system"|"user"|"assistant", "content": "..."} rendered with kvsim's chat template
 * (docs/generator.md): segment 0 is the system message, segment k the k-th turn (a user message
 * and the assistant message after it). A file is a chat when it parses as a JSON array, and
 * must be one when it looks like one: its first non-blank characters are "[" then "{" or "]",
 * or "{" then '"' or "}" (a syntax error, text after the JSON or a top-level object is then an
 * error naming the byte offset, not plain text). The file must be non-empty UTF-8; a chat may
 * not hold NUL characters (\u0000), which cJSON would cut its strings at; plain text may (its
 * length is carried). In any text:
 *   [[needle]]...[[/needle]]  the enclosed text is a needle: its token span goes to /needles;
 *   [[probe]]                 the token just before the marker is a probe (query position);
 *   [[decode]]                at most once per turn, outside needles: the turn's text before it
 *                             is prefilled, the text after it is forced decode, fed one token at
 *                             a time before generation (docs/generator.md). Needles of the turn
 *                             must lie before it. In a chat, a marker opening a message's content
 *                             splits before the message's "Role: " header. Its forced text ends
 *                             with its turn (at the next user message, or at [[generate]]).
 *   [[group=NAME]]            the prompt's group, at most once per file, outside needles (NAME:
 *                             1 to 63 letters, digits, '_', '-', '.' or '+'): `kvsim eval`
 *                             breaks its accuracy down by group (docs/eval.md). The marker and
 *                             the line break right after it are removed without splitting the
 *                             text around them.
 *   [[generate]]              the model generates here (greedy, up to --max-new tokens, stopping
 *                             at EOS). In a chat it is an assistant message's whole content and
 *                             nowhere else; in plain text it may stand anywhere outside a needle
 *                             and ends the turn: the text after it is the next turn (segment + 1),
 *                             prefilled on top of the cache. A trailing one is the final
 *                             generation every prompt ends with.
 * A chat is a conversation (docs/generator.md): each user message starts a prefill span on top of
 * the cache; an assistant message's header "Assistant:" ends the prefill before it, its content
 * is generated ([[generate]]) or forced as decode steps, and the "\n\n" after it opens the next
 * prefill span. A plain text without [[generate]] and a chat with one user message and no
 * assistant message are single prompts: one prefill span, then [[decode]]'s forced tokens.
 * Markers are removed from the text. Token spans are exact because the text between markers
 * (and between segments) is tokenized piece by piece and the pieces' tokens concatenated; a
 * tokenizer may split a piece boundary differently than it would split the whole string. */
#ifndef KVSIM_PROMPT_H
#define KVSIM_PROMPT_H

#include <stddef.h>
#include <stdint.h>

#include "sim/base/util.h"

/* PIECE_SPAN: the next text opens a new prefill span (a later user message). */
typedef enum { PIECE_TEXT, PIECE_PROBE, PIECE_DECODE, PIECE_GENERATE, PIECE_SPAN } PieceKind;

typedef struct {
    PieceKind kind;
    char *text; /* PIECE_TEXT: UTF-8, no markers */
    size_t len;
    int segment;
    int in_needle; /* the text is (part of) a needle */
    int needle_id; /* which needle, counting from 0, when in_needle */
    int forced;    /* the text is fed as decode steps: after [[decode]], or assistant content */
} PromptPiece;

typedef struct {
    int is_chat;
    int n_pieces;
    PromptPiece *pieces;
    int last_segment; /* segment the generated tokens continue */
    char group[64];   /* [[group=NAME]]'s NAME; "" when the file has none */
} PromptMarkup;

/* Parses the contents of a prompt file (origin names it in errors). */
int prompt_parse(const char *origin, const char *text, size_t len, PromptMarkup *out, KvErr *err);
void prompt_markup_free(PromptMarkup *m);

/* Tokenizes len bytes of text into *ids (malloc'ed) and *n. */
typedef int (*PromptEncodeFn)(void *ctx, const char *text, size_t len, int32_t **ids, int *n,
                              KvErr *err);

/* The input tokens as they are fed: a prefill span, forced decode steps, or a generation point
 * (start == end: the model generates before input token `start`; the final generation after
 * the last input token is implicit and never listed). */
typedef enum { PROMPT_PREFILL, PROMPT_FORCED, PROMPT_GENERATE } PromptSpanKind;
typedef struct {
    int kind; /* PromptSpanKind */
    int start, end;
} PromptSpan;

typedef struct {
    int n_tokens;
    /* The end of the first prefill span (BOS included): the tokens before [[decode]] or before
     * the first assistant content or later user message. In a single prompt (n_spans <= 2)
     * [n_prompt, n_tokens) are forced decode steps; n_prompt == n_tokens without them. */
    int n_prompt;
    int n_spans;
    PromptSpan *spans; /* in order, covering [0, n_tokens); spans[0] is PROMPT_PREFILL */
    int32_t *tokens;
    int32_t *segments;
    int n_needles;
    int32_t *needles; /* [n_needles][2] token spans [start, end) */
    int n_probes;
    int32_t *probes; /* ascending */
} PromptTokens;

/* Tokenizes the pieces in order, with bos (if >= 0) first in segment 0. */
int prompt_tokenize(const char *origin, const PromptMarkup *m, PromptEncodeFn encode, void *ctx,
                    int bos, PromptTokens *out, KvErr *err);
void prompt_tokens_free(PromptTokens *t);

#endif
