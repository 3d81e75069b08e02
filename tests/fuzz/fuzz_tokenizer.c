/* tokenizer.json (traces/model/tokenizer_*.c): the model, pre-tokenizer regexes, merges, added tokens,
 * normalizer and decoder, then encoding and decoding. The input is split at the first 0xFF byte
 * (never valid UTF-8, so it cannot occur in a valid tokenizer.json): before it the file, after
 * it the text to encode. Any tokenizer loads or fails with one line; encoding gives ids inside
 * the vocabulary; decoding never fails. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "traces/model/tokenizer.h"
#include "tests/fuzz/support.h"

static const char DEFAULT_TEXT[] = "Note: Lisbon 384. [x]\n  caf\xc3\xa9 \xf0\x9f\x98\x80 12345";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *split = memchr(data, 0xff, size);
    size_t json_len = split ? (size_t)(split - data) : size;
    const char *text = split ? (const char *)split + 1 : DEFAULT_TEXT;
    size_t text_len = split ? size - json_len - 1 : sizeof DEFAULT_TEXT - 1;
    const char *path = fuzz_write("tokenizer.json", data, json_len);
    KvErr err;
    Tokenizer *tok = tokenizer_load(path, NULL, &err);
    if (!tok) {
        if (strchr(err.msg, '\n'))
            __builtin_trap();
        return 0;
    }
    int32_t *ids = NULL;
    int n = 0;
    if (tokenizer_encode(tok, text, text_len, &ids, &n, &err) == 0) {
        int vocab = tokenizer_vocab_size(tok);
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= vocab)
                __builtin_trap();
        free(tokenizer_decode(tok, ids, n));
    } else if (strchr(err.msg, '\n')) {
        __builtin_trap();
    }
    free(ids);
    tokenizer_free(tok);
    return 0;
}
