/* Prompt files (traces/model/prompt.c): plain text or a JSON chat with [[needle]], [[probe]] and
 * [[decode]] markup, parsed and tokenized (one token per byte, so spans are checked on every
 * input): no crash, one-line errors, spans inside the token sequence. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "traces/model/prompt.h"

static int encode_bytes(void *ctx, const char *text, size_t len, int32_t **ids, int *n,
                        KvErr *err)
{
    (void)ctx;
    (void)err;
    *ids = kv_malloc((len ? len : 1) * sizeof **ids);
    for (size_t i = 0; i < len; i++)
        (*ids)[i] = (unsigned char)text[i];
    *n = (int)len;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    PromptMarkup m;
    KvErr err;
    if (prompt_parse("fuzz.txt", (const char *)data, size, &m, &err) != 0) {
        if (strchr(err.msg, '\n'))
            __builtin_trap();
        return 0;
    }
    PromptTokens t;
    if (prompt_tokenize("fuzz.txt", &m, encode_bytes, NULL, 1, &t, &err) == 0) {
        if (t.n_prompt < 0 || t.n_prompt > t.n_tokens)
            __builtin_trap();
        for (int i = 0; i < t.n_needles; i++)
            if (t.needles[2 * i] < 0 || t.needles[2 * i] > t.needles[2 * i + 1] ||
                t.needles[2 * i + 1] > t.n_tokens)
                __builtin_trap();
        for (int i = 0; i < t.n_probes; i++)
            if (t.probes[i] < 0 || t.probes[i] >= t.n_tokens)
                __builtin_trap();
        prompt_tokens_free(&t);
    } else if (strchr(err.msg, '\n')) {
        __builtin_trap();
    }
    prompt_markup_free(&m);
    return 0;
}
