/* Prompt files (traces/model/prompt.c): plain text or a JSON chat with [[needle]], [[probe]],
 * [[decode]] and [[generate]] markup, parsed and tokenized (one token per byte, so spans are
 * checked on every input): no crash, one-line errors, needles and probes inside the token
 * sequence, the prefill/forced/generation spans covering it in order. */
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
        /* The spans: in order, without gaps, over [0, n_tokens), the first a prefill span
         * ending at n_prompt; a generation point is empty and inside the input. */
        if (t.n_spans < 1 || t.spans[0].kind != PROMPT_PREFILL || t.spans[0].start != 0 ||
            t.spans[0].end != t.n_prompt || t.spans[t.n_spans - 1].end != t.n_tokens)
            __builtin_trap();
        for (int i = 0; i < t.n_spans; i++) {
            const PromptSpan *sp = &t.spans[i];
            if ((i > 0 && sp->start != t.spans[i - 1].end) ||
                (sp->kind == PROMPT_GENERATE ? sp->end != sp->start || sp->start >= t.n_tokens
                                              : sp->end <= sp->start))
                __builtin_trap();
        }
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
