/* text.h — the one reading of UTF-8 that every text input of kvsim shares (JSON files, the INI
 * run configuration, prompts, the tokenizer's input), and the line of a byte offset, for
 * messages that name file and line.
 *
 * Valid UTF-8 is what Rust's from_utf8 and Python's strict decoder accept: no overlong forms,
 * no surrogates (U+D800..U+DFFF), nothing above U+10FFFF, no sequence cut short. U+0000 is
 * valid UTF-8; callers that cannot hold a NUL refuse it themselves. */
#ifndef KVSIM_TEXT_H
#define KVSIM_TEXT_H

#include <stddef.h>
#include <stdint.h>

/* Decodes the UTF-8 sequence at s (n > 0 bytes available). Returns the code point, or -1 when
 * the bytes there are not valid UTF-8; *adv is the bytes consumed: the whole sequence, or for
 * invalid bytes their maximal subpart (at least 1 byte), which is what one U+FFFD replaces. */
int32_t utf8_next(const unsigned char *s, size_t n, size_t *adv);

/* The offset of the first byte of text that does not start a valid UTF-8 sequence, or len when
 * all of it is valid. */
size_t utf8_invalid_offset(const char *text, size_t len);

/* The 1-based line of byte `at` of text (1 + the newlines before it). */
int text_line_at(const char *text, size_t at);

#endif
