/* run.json and what goes into it: SHA-256 against the test vectors of FIPS 180-4's examples
 * (and the NIST "million a" vector), streamed in pieces that cross block boundaries and read
 * from files; the record provenance_write leaves (parsed back: every field, the digests of
 * the inputs, the config's text, no temporary file left). */
#include <cjson/cJSON.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sim/base/provenance.h"
#include "sim/base/sha256.h"
#include "sim/base/version.h"
#include "tests/support/scratch.h"

static void digest_of(const char *data, size_t n, size_t piece, char hex[65])
{
    Sha256 s;
    sha256_init(&s);
    for (size_t i = 0; i < n; i += piece)
        sha256_update(&s, data + i, n - i < piece ? n - i : piece);
    sha256_final_hex(&s, hex);
}

static void test_sha256_vectors(void **state)
{
    (void)state;
    static const struct {
        const char *msg, *hex;
    } v[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", /* 448 bits */
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
        {"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
         "klmnopqrlmnopqrsmnopqrstnopqrstu", /* 896 bits */
         "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"},
    };
    char hex[65];
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        size_t n = strlen(v[i].msg);
        static const size_t pieces[] = {1, 3, 63, 64, 65, 1000};
        for (size_t p = 0; p < sizeof pieces / sizeof pieces[0]; p++) {
            digest_of(v[i].msg, n, pieces[p], hex);
            assert_string_equal(hex, v[i].hex);
        }
    }
    /* one million 'a': many blocks, fed in pieces that straddle them */
    char *a = kv_malloc(1000000);
    memset(a, 'a', 1000000);
    digest_of(a, 1000000, 4099, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* every padding length: 55, 56 and 64 bytes put the length in the same or the next block;
     * fed whole or byte by byte, the digest is the same */
    for (size_t n = 50; n <= 130; n++) {
        char one[65];
        digest_of(a, n, n, hex);
        digest_of(a, n, 1, one);
        assert_string_equal(hex, one);
    }
    digest_of(a, 56, 56, hex); /* 56 'a's, as `printf 'a%.0s' $(seq 56) | sha256sum` gives */
    assert_string_equal(hex, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
    free(a);
}

static void test_sha256_file(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *path = scratch_path(dir, "f.txt", 0);
    scratch_write(path, "abc");
    char hex[65];
    long long size = -1;
    KvErr err;
    assert_int_equal(sha256_file(path, hex, &size, &err), 0);
    assert_int_equal(size, 3);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(sha256_file(scratch_path(dir, "none", 1), hex, &size, &err), -1);
    assert_non_null(strstr(err.msg, "none"));
    assert_int_equal(sha256_file(dir, hex, &size, &err), -1); /* not a regular file */
    assert_non_null(strstr(err.msg, "not a regular file"));
    scratch_remove(dir);
}

static const char *string_of(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    assert_true(cJSON_IsString(v));
    return v->valuestring;
}

static void test_run_json(void **state)
{
    (void)state;
    char *dir = scratch_create();
    char config[4096], input[4096];
    snprintf(config, sizeof config, "%s", scratch_path(dir, "c.ini", 0));
    snprintf(input, sizeof input, "%s", scratch_path(dir, "in.h5", 1));
    scratch_write(config, "[policy.full]\ntype = full\n");
    scratch_write(input, "abc");
    char *argv[] = {"run", config, "--threads", "2"};
    Provenance *p = provenance_begin(4, argv);
    KvErr err;
    assert_int_equal(provenance_config(p, config, &err), 0);
    assert_int_equal(provenance_input(p, "trace", input, &err), 0);
    assert_int_equal(provenance_input(p, "trace", scratch_path(dir, "missing.h5", 2), &err), -1);
    provenance_number(p, "seed", 7);
    provenance_string(p, "out", dir);
    assert_int_equal(provenance_write(p, dir, &err), 0);
    provenance_free(p);
    assert_int_equal(scratch_count(dir), 3); /* c.ini, in.h5, run.json: no temporary left */

    char *text = scratch_read(scratch_path(dir, "run.json", 3));
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    assert_string_equal(string_of(j, "kvsim_version"), kvsim_version());
    assert_true(strlen(kvsim_version()) > 0);
    const cJSON *cmd = cJSON_GetObjectItemCaseSensitive(j, "command");
    assert_int_equal(cJSON_GetArraySize(cmd), 5);
    assert_string_equal(cJSON_GetArrayItem(cmd, 0)->valuestring, "kvsim");
    assert_string_equal(cJSON_GetArrayItem(cmd, 1)->valuestring, "run");
    assert_string_equal(cJSON_GetArrayItem(cmd, 4)->valuestring, "2");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "config");
    assert_string_equal(string_of(c, "path"), config);
    assert_string_equal(string_of(c, "text"), "[policy.full]\ntype = full\n");
    const cJSON *in = cJSON_GetObjectItemCaseSensitive(j, "inputs");
    assert_int_equal(cJSON_GetArraySize(in), 1); /* the failed one is not recorded */
    const cJSON *t = cJSON_GetArrayItem(in, 0);
    assert_string_equal(string_of(t, "role"), "trace");
    assert_string_equal(string_of(t, "path"), input);
    assert_true(cJSON_GetObjectItemCaseSensitive(t, "bytes")->valuedouble == 3);
    assert_string_equal(string_of(t, "sha256"),
                        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_true(cJSON_GetObjectItemCaseSensitive(j, "seed")->valuedouble == 7);
    assert_string_equal(string_of(j, "out"), dir);
    /* UTC, ISO 8601 to the second; the end not before the start */
    const char *started = string_of(j, "started"), *finished = string_of(j, "finished");
    assert_int_equal(strlen(started), 20);
    assert_int_equal(started[10], 'T');
    assert_int_equal(started[19], 'Z');
    assert_true(strcmp(finished, started) >= 0);
    assert_true(cJSON_GetObjectItemCaseSensitive(j, "wall_seconds")->valuedouble >= 0);
    cJSON_Delete(j);
    free(text);
    scratch_remove(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_sha256_file),
        cmocka_unit_test(test_run_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
