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
 *   [[decode]]                at most once, outside needles: the text before it is the prompt
 *                             (prefilled), the text after it is forced decode, fed one token at
 *                             a time before generation (docs/generator.md). Needles must lie
 *                             before it. In a chat, a marker opening a message's content splits
 *                             before the message's "Role: " header.
 * Markers are removed from the text. Token spans are exact because the text between markers
 * (and between segments) is tokenized piece by piece and the pieces' tokens concatenated; a
 * tokenizer may split a piece boundary differently than it would split the whole string. */
#ifndef KVSIM_PROMPT_H
#define KVSIM_PROMPT_H

#include <stddef.h>
#include <stdint.h>

#include "sim/base/util.h"

typedef enum { PIECE_TEXT, PIECE_PROBE, PIECE_DECODE } PieceKind;

typedef struct {
    PieceKind kind;
    char *text; /* PIECE_TEXT: UTF-8, no markers */
    size_t len;
    int segment;
    int in_needle; /* the text is (part of) a needle */
    int needle_id; /* which needle, counting from 0, when in_needle */
} PromptPiece;

typedef struct {
    int is_chat;
    int n_pieces;
    PromptPiece *pieces;
    int last_segment; /* segment the generated tokens continue */
} PromptMarkup;

/* Parses the contents of a prompt file (origin names it in errors). */
int prompt_parse(const char *origin, const char *text, size_t len, PromptMarkup *out, KvErr *err);
void prompt_markup_free(PromptMarkup *m);

/* Tokenizes len bytes of text into *ids (malloc'ed) and *n. */
typedef int (*PromptEncodeFn)(void *ctx, const char *text, size_t len, int32_t **ids, int *n,
                              KvErr *err);

typedef struct {
    int n_tokens;
    /* Tokens before [[decode]] (BOS included), prefilled; [n_prompt, n_tokens) are forced
     * decode steps. n_prompt == n_tokens without the marker. */
    int n_prompt;
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
