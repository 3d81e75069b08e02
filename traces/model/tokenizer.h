/* tokenizer.h — Hugging Face tokenizer.json BPE tokenizers, both families in use:
 *   byte-level BPE (GPT-2, Llama 3, Qwen): ByteLevel pre-tokenizer with its split regex
 *     (PCRE2 for the Unicode classes), bytes mapped to printable code points;
 *   SentencePiece-style BPE (Llama 2, Mistral): Metaspace / "▁" replacement, byte fallback
 *     (<0xNN> tokens) for characters outside the vocabulary.
 * Added tokens (special or not) are matched literally in the input before BPE.
 * encode never adds BOS: the caller does (tokenizer_bos).
 * tokenizer_encode refuses text that is not UTF-8; callers that read text from a file check it
 * first (utf8_invalid_offset, sim/base/text.h) so that the error names that file and offset. */
#ifndef KVSIM_TOKENIZER_H
#define KVSIM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "sim/base/text.h" /* utf8_invalid_offset: check text before encoding it */
#include "sim/base/util.h"

typedef struct Tokenizer Tokenizer;

/* Loads tokenizer.json; config_path (tokenizer_config.json) may be NULL or missing, and is
 * where bos_token / eos_token / add_bos_token are read from when present. */
Tokenizer *tokenizer_load(const char *json_path, const char *config_path, KvErr *err);
void tokenizer_free(Tokenizer *tok);

/* Encodes len bytes of UTF-8 text. *ids is malloc'ed (caller frees). */
int tokenizer_encode(const Tokenizer *tok, const char *text, size_t len, int32_t **ids, int *n,
                     KvErr *err);
/* Decodes ids to malloc'ed UTF-8 text (invalid byte sequences become U+FFFD). */
char *tokenizer_decode(const Tokenizer *tok, const int32_t *ids, int n);

int tokenizer_vocab_size(const Tokenizer *tok);
int tokenizer_bos(const Tokenizer *tok);     /* -1 when there is none */
int tokenizer_eos(const Tokenizer *tok);     /* -1 when there is none */
int tokenizer_add_bos(const Tokenizer *tok); /* 1 when the model expects BOS prepended */
int tokenizer_token_id(const Tokenizer *tok, const char *token); /* -1 when absent */

#endif
