/* sim/base/json.h and sim/base/text.h, the rules every JSON input of kvsim is read under: the
 * text check (invalid UTF-8, a raw NUL, "\u0000" and raw control characters inside strings are
 * found at their byte; escaped quotes and backslashes are not mistaken for either), exactly one
 * value (whitespace after it is fine, anything else is trailing text at its offset), duplicate
 * keys at any depth (small objects and large ones), and json_load_file's one-line messages
 * naming file, line and byte. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "sim/base/json.h"
#include "sim/base/text.h"
#include "tests/support/scratch.h"

/* json_text_check over a C string literal (n bytes, NULs included). */
static void expect_text(const char *text, size_t n, size_t at, const char *why)
{
    const char *got;
    size_t found = json_text_check(text, n, &got);
    if (found != at || (why ? !got || strcmp(got, why) : got != NULL))
        fail_msg("'%s': got %zu (%s), want %zu (%s)", text, found, got ? got : "fine", at,
                 why ? why : "fine");
}
#define TEXT(lit, at, why) expect_text(lit, sizeof(lit) - 1, at, why)

static void test_text_rules(void **state)
{
    (void)state;
    TEXT("{\"a\": \"b\"}", 10, NULL);
    TEXT("{\"a\\u0000\": 1}", 3, "\\u0000 in a string");
    TEXT("{\"a\\\\u0000\": 1}", 15, NULL);        /* an escaped backslash, then "u0000" */
    TEXT("{\"a\\\"\\u0000\": 1}", 5, "\\u0000 in a string"); /* after an escaped quote */
    TEXT("{\"a\\u00001\": 1}", 3, "\\u0000 in a string");
    TEXT("{\"a\\u0001\": 1}", 14, NULL);
    TEXT("{\"a\tb\": 1}", 3, "raw control character inside a string");
    TEXT("{\"a\": 1,\n\t\"b\": 2}", 17, NULL); /* whitespace between values is not in a string */
    TEXT("{\"a\": 1}\0", 8, "NUL byte");
    TEXT("{\"\xc3\xa9\": 1}", 9, NULL);
    TEXT("{\"\xc3\": 1}", 2, "not valid UTF-8");
    TEXT("{\"\xed\xa0\x80\": 1}", 2, "not valid UTF-8"); /* a surrogate */
    TEXT("{\"\xc0\xaf\": 1}", 2, "not valid UTF-8");     /* overlong */
    TEXT("\xef\xbb\xbf{}", 5, NULL);
}

static void test_parse_exact(void **state)
{
    (void)state;
    size_t at = 99;
    int trailing = 9;
    cJSON *j = json_parse_exact("{\"a\": [1, 2]} \r\n\t", 17, &at, &trailing);
    assert_non_null(j);
    assert_int_equal(trailing, 0);
    cJSON_Delete(j);
    assert_null(json_parse_exact("{\"a\": 1} x", 10, &at, &trailing));
    assert_int_equal(at, 9);
    assert_int_equal(trailing, 1);
    assert_null(json_parse_exact("{\"a\": 1}{}", 10, &at, &trailing));
    assert_int_equal(at, 8);
    assert_int_equal(trailing, 1);
    assert_null(json_parse_exact("{\"a\": }", 7, &at, &trailing));
    assert_int_equal(trailing, 0);
    assert_null(json_parse_exact("", 0, &at, NULL));
    /* Only len bytes count: what follows them is not trailing text. */
    j = json_parse_exact("[1] garbage", 3, NULL, NULL);
    assert_non_null(j);
    cJSON_Delete(j);
}

static void expect_duplicate(const char *text, const char *key, const char *in)
{
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    const char *found = NULL;
    const cJSON *obj = json_duplicate_key(j, &found);
    if (!key) {
        assert_null(obj);
    } else {
        assert_non_null(obj);
        assert_string_equal(found, key);
        if (in)
            assert_string_equal(obj->string, in);
        else
            assert_null(obj->string);
    }
    cJSON_Delete(j);
}

static void test_duplicate_keys(void **state)
{
    (void)state;
    expect_duplicate("{\"a\": 1, \"b\": 2, \"A\": 3}", NULL, NULL);
    expect_duplicate("{\"a\": 1, \"b\": 2, \"a\": 3}", "a", NULL);
    expect_duplicate("{\"x\": {\"a\": 1, \"a\": 1}}", "a", "x");
    expect_duplicate("{\"x\": [{\"q\": 1}, {\"k\": 1, \"k\": 2}]}", "k", NULL);
    expect_duplicate("[1, {\"a\": {\"b\": {\"c\": 1, \"c\": 2}}}]", "c", "b");
    /* Equal values in different objects are no duplicate. */
    expect_duplicate("{\"a\": {\"a\": {\"a\": 1}}}", NULL, NULL);
    /* A large object is sorted, not compared pairwise: both ways find the key. */
    char big[4096];
    size_t n = (size_t)snprintf(big, sizeof big, "{");
    for (int i = 0; i < 100; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, "\"k%d\": %d, ", i, i);
    snprintf(big + n, sizeof big - n, "\"last\": 0}");
    expect_duplicate(big, NULL, NULL);
    snprintf(big + n, sizeof big - n, "\"k57\": 0}");
    expect_duplicate(big, "k57", NULL);
}

/* json_load_file fails with one line holding `want`. */
static void expect_load_error(const char *dir, const char *text, size_t n, unsigned flags,
                              const char *want)
{
    const char *path = scratch_path(dir, "x.json", 0);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fwrite(text, 1, n, fp);
    fclose(fp);
    KvErr err = {{0}};
    cJSON *j = json_load_file(path, flags, &err);
    if (j) {
        cJSON_Delete(j);
        fail_msg("'%s' loaded", text);
    }
    assert_null(strchr(err.msg, '\n'));
    if (!strstr(err.msg, want))
        fail_msg("'%s' does not say '%s'", err.msg, want);
}
#define LOAD_ERROR(dir, lit, flags, want) expect_load_error(dir, lit, sizeof(lit) - 1, flags, want)

static void test_load_file(void **state)
{
    (void)state;
    char *dir = scratch_create();
    LOAD_ERROR(dir, "{\n\"a\": \"\\u0000\"}", 0, "x.json:2: byte 8: \\u0000 in a string (NUL");
    LOAD_ERROR(dir, "{\n\n\"a\": \"\xff\"}", 0, "x.json:3: byte 9: not valid UTF-8");
    LOAD_ERROR(dir, "{\"a\": \"\x01\"}", 0, "x.json:1: byte 7: raw control character");
    LOAD_ERROR(dir, "{\"a\": 1}\0", 0, "x.json:1: byte 8: NUL byte");
    LOAD_ERROR(dir, "{\"a\": 1}\n\n]", 0, "x.json:3: byte 10: unexpected text after the JSON");
    LOAD_ERROR(dir, "{\"a\":\n}", 0, "x.json:2: not valid JSON (parsing stopped at byte");
    LOAD_ERROR(dir, "", 0, "x.json:1: not valid JSON");
    LOAD_ERROR(dir, "[1]", JSON_OBJECT, "x.json: expected a JSON object at the top level");
    LOAD_ERROR(dir, "{\"o\": {\"a\\nb\": 1, \"a\\nb\": 2}}", JSON_UNIQUE_KEYS,
               "x.json: key 'a\\nb' appears twice in the object 'o'");
    /* Without the flags the same files load. */
    const char *path = scratch_path(dir, "ok.json", 0);
    FILE *fp = fopen(path, "w");
    fputs("[{\"a\": 1, \"a\": 2}]\n", fp);
    fclose(fp);
    KvErr err = {{0}};
    cJSON *j = json_load_file(path, 0, &err);
    assert_non_null(j);
    assert_true(cJSON_IsArray(j));
    cJSON_Delete(j);
    assert_null(json_load_file(dir, 0, &err)); /* a directory */
    assert_non_null(strstr(err.msg, "not a regular file"));
    scratch_remove(dir);
}

static void test_text_helpers(void **state)
{
    (void)state;
    assert_int_equal(text_line_at("a\nb\nc", 0), 1);
    assert_int_equal(text_line_at("a\nb\nc", 2), 2);
    assert_int_equal(text_line_at("a\nb\nc", 4), 3);
    assert_int_equal(utf8_invalid_offset("ab\xe2\x82\xac", 5), 5);
    assert_int_equal(utf8_invalid_offset("ab\xe2\x82", 4), 2);
    assert_int_equal(utf8_invalid_offset("\xf4\x90\x80\x80", 4), 0); /* above U+10FFFF */
    size_t adv;
    assert_int_equal(utf8_next((const unsigned char *)"\xf0\x9f\x98\x80", 4, &adv), 0x1F600);
    assert_int_equal(adv, 4);
    /* An invalid sequence consumes its maximal subpart: E2 82 then 'x' is one U+FFFD. */
    assert_int_equal(utf8_next((const unsigned char *)"\xe2\x82x", 3, &adv), -1);
    assert_int_equal(adv, 2);
    assert_int_equal(utf8_next((const unsigned char *)"\x80", 1, &adv), -1);
    assert_int_equal(adv, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_rules),   cmocka_unit_test(test_parse_exact),
        cmocka_unit_test(test_duplicate_keys), cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_text_helpers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
