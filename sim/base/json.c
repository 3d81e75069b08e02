/* JSON files under the rules of the reference parsers: see json.h for what they promise. */
#include "sim/base/json.h"

#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "sim/base/text.h"

size_t json_text_check(const char *text, size_t len, const char **why)
{
    const unsigned char *s = (const unsigned char *)text;
    int in_string = 0;
    *why = NULL;
    for (size_t i = 0; i < len;) {
        size_t adv;
        if (s[i] == '\0')
            *why = "NUL byte";
        else if (utf8_next(s + i, len - i, &adv) < 0)
            *why = "not valid UTF-8";
        else if (in_string && s[i] < 0x20)
            *why = "raw control character inside a string";
        else if (in_string && s[i] == '\\' && i + 6 <= len && !memcmp(s + i + 1, "u0000", 5))
            *why = "\\u0000 in a string";
        if (*why)
            return i;
        if (in_string && s[i] == '\\' && i + 1 < len && (s[i + 1] == '"' || s[i + 1] == '\\')) {
            i += 2; /* an escaped quote does not end the string, nor a backslash escape the next */
            continue;
        }
        if (s[i] == '"')
            in_string = !in_string;
        i += adv;
    }
    return len;
}

static int is_json_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

cJSON *json_parse_exact(const char *text, size_t len, size_t *at, int *trailing)
{
    const char *end = NULL;
    cJSON *json = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    size_t stop = end && end >= text && end <= text + len ? (size_t)(end - text) : len;
    int after = 0;
    if (json) {
        while (stop < len && is_json_space(text[stop]))
            stop++;
        if (stop < len) {
            after = 1;
            cJSON_Delete(json);
            json = NULL;
        }
    }
    if (at)
        *at = stop;
    if (trailing)
        *trailing = after;
    return json;
}

static int compare_key_ptrs(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A key that appears twice among the members of obj, or NULL. Small objects pairwise (the first
 * repeat in document order), large ones sorted. */
static const char *repeated_key(const cJSON *obj)
{
    int n = cJSON_GetArraySize(obj);
    if (n < 2)
        return NULL;
    if (n <= 16) {
        for (const cJSON *b = obj->child; b; b = b->next)
            for (const cJSON *a = obj->child; a != b; a = a->next)
                if (!strcmp(a->string, b->string))
                    return b->string;
        return NULL;
    }
    const char **keys = kv_malloc((size_t)n * sizeof *keys);
    int k = 0;
    for (const cJSON *c = obj->child; c; c = c->next)
        keys[k++] = c->string;
    qsort(keys, (size_t)k, sizeof *keys, compare_key_ptrs);
    const char *found = NULL;
    for (int i = 1; i < k && !found; i++)
        if (!strcmp(keys[i - 1], keys[i]))
            found = keys[i];
    free(keys);
    return found;
}

const cJSON *json_duplicate_key(const cJSON *root, const char **key)
{
    if (!root)
        return NULL;
    if (cJSON_IsObject(root) && (*key = repeated_key(root)) != NULL)
        return root;
    if (cJSON_IsObject(root) || cJSON_IsArray(root))
        for (const cJSON *c = root->child; c; c = c->next) {
            const cJSON *found = json_duplicate_key(c, key);
            if (found)
                return found;
        }
    return NULL;
}

/* What a text problem's message adds, after the reason. */
static const char *text_rule(const char *why)
{
    if (!strcmp(why, "not valid UTF-8"))
        return "expected a UTF-8 JSON file";
    if (!strcmp(why, "raw control character inside a string"))
        return "expected it escaped, as \\n or \\u00XX";
    return "NUL characters are not supported";
}

cJSON *json_load_file(const char *path, unsigned flags, KvErr *err)
{
    size_t len;
    char *text = kv_read_input(path, JSON_MAX_BYTES, &len, err);
    if (!text)
        return NULL;
    cJSON *root = NULL;
    const char *why;
    size_t at = json_text_check(text, len, &why);
    int trailing;
    if (why) {
        kv_fail(err, "%s:%d: byte %zu: %s (%s)", path, text_line_at(text, at), at, why,
                text_rule(why));
    } else if (!(root = json_parse_exact(text, len, &at, &trailing))) {
        if (trailing)
            kv_fail(err, "%s:%d: byte %zu: unexpected text after the JSON value (expected the "
                    "end of the file)", path, text_line_at(text, at), at);
        else
            kv_fail(err, "%s:%d: not valid JSON (parsing stopped at byte %zu)", path,
                    text_line_at(text, at), at);
    } else if ((flags & JSON_OBJECT) && !cJSON_IsObject(root)) {
        kv_fail(err, "%s: expected a JSON object at the top level", path);
        cJSON_Delete(root);
        root = NULL;
    } else if (flags & JSON_UNIQUE_KEYS) {
        const char *key;
        const cJSON *obj = json_duplicate_key(root, &key);
        if (obj) {
            char k[128], in[128];
            kv_escape(key, strlen(key), k, sizeof k);
            if (obj->string)
                kv_escape(obj->string, strlen(obj->string), in, sizeof in);
            kv_fail(err, "%s: key '%s' appears twice in %s%s%s (expected each key once)", path,
                    k, obj->string ? "the object '" : "the top-level object",
                    obj->string ? in : "", obj->string ? "'" : "");
            cJSON_Delete(root);
            root = NULL;
        }
    }
    free(text);
    return root;
}
