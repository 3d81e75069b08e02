/* UTF-8 decoding and line numbers: see text.h for what they promise. */
#include "sim/base/text.h"

int32_t utf8_next(const unsigned char *s, size_t n, size_t *adv)
{
    unsigned b0 = s[0];
    int need;
    /* The range the next continuation byte must lie in: narrower after E0, ED, F0 and F4,
     * which is how overlong forms, surrogates and code points above U+10FFFF are excluded. */
    unsigned lo = 0x80, hi = 0xBF;
    int32_t cp;
    if (b0 < 0x80) {
        *adv = 1;
        return (int32_t)b0;
    } else if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 1;
        cp = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 2;
        cp = b0 & 0x0F;
        if (b0 == 0xE0)
            lo = 0xA0;
        else if (b0 == 0xED)
            hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 3;
        cp = b0 & 0x07;
        if (b0 == 0xF0)
            lo = 0x90;
        else if (b0 == 0xF4)
            hi = 0x8F;
    } else {
        *adv = 1;
        return -1;
    }
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n || s[i] < lo || s[i] > hi) {
            *adv = (size_t)i;
            return -1;
        }
        lo = 0x80;
        hi = 0xBF;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    *adv = (size_t)need + 1;
    return cp;
}

size_t utf8_invalid_offset(const char *text, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t adv;
        if (utf8_next((const unsigned char *)text + i, len - i, &adv) < 0)
            return i;
        i += adv;
    }
    return len;
}

int text_line_at(const char *text, size_t at)
{
    int line = 1;
    for (size_t i = 0; i < at; i++)
        line += text[i] == '\n';
    return line;
}
