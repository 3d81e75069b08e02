/* json.h — JSON read as the reference parsers of kvsim's inputs read it (Python's json, which
 * transformers uses for config.json, tokenizer_config.json and the shard index; serde_json,
 * which the tokenizers and safetensors libraries use), through cJSON, which alone is more
 * lenient. The rules:
 *
 * - Text: valid UTF-8 (sim/base/text.h); no raw control character inside a string (both
 *   references refuse one); no NUL at all, neither a raw NUL byte nor "\u0000" in a string:
 *   cJSON's strings end at the first NUL, so "hidden_size\u0000x" would pass for
 *   "hidden_size" and two tensor names could collide.
 * - Exactly one value: whitespace (space, tab, CR, LF) may follow it, anything else is an
 *   error (cJSON stops after the first value and would ignore the rest).
 * - JSON_UNIQUE_KEYS: no key twice in one object, at any depth. cJSON finds the first of two
 *   equal keys, Python's json keeps the last: kvsim refuses the doubt.
 *
 * Errors are one line naming the file, the line and the byte offset. */
#ifndef KVSIM_JSON_H
#define KVSIM_JSON_H

#include <stddef.h>

#include "sim/base/util.h"

struct cJSON;

/* A JSON file is read whole; real ones (a tokenizer.json) are tens of megabytes at most. */
#define JSON_MAX_BYTES ((size_t)1 << 30)

enum {
    JSON_OBJECT = 1,      /* the value must be an object */
    JSON_UNIQUE_KEYS = 2, /* no key twice in one object, at any depth */
};

/* Reads and parses a regular file (kv_read_input: FIFOs and directories refused, at most
 * JSON_MAX_BYTES) under the rules above and `flags`. NULL after an error:
 *   "PATH:LINE: byte N: not valid UTF-8 (...)" (likewise "NUL byte", "\u0000 in a string",
 *   "raw control character inside a string"), "PATH:LINE: not valid JSON (parsing stopped at
 *   byte N)", "PATH:LINE: byte N: unexpected text after the JSON value (...)",
 *   "PATH: expected a JSON object at the top level", "PATH: key 'K' appears twice in ...".
 * cJSON_Delete the result. */
struct cJSON *json_load_file(const char *path, unsigned flags, KvErr *err);

/* The offset of the first byte of len bytes of JSON text that the text rules refuse, with
 * *why the reason ("not valid UTF-8", "NUL byte", "\u0000 in a string", "raw control character
 * inside a string"); len (and *why NULL) when the text is fine. */
size_t json_text_check(const char *text, size_t len, const char **why);

/* Parses len bytes that must hold exactly one JSON value (the text rules are not checked here).
 * NULL on failure: *at (may be NULL) is the offset where parsing stopped, or, with *trailing
 * (may be NULL) set, of the first byte after the value that is not whitespace. */
struct cJSON *json_parse_exact(const char *text, size_t len, size_t *at, int *trailing);

/* The first object (depth first, `root` included) in which some key appears twice, with *key
 * that key; NULL when every object's keys are distinct. */
const struct cJSON *json_duplicate_key(const struct cJSON *root, const char **key);

#endif
