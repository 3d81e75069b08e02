/* Tokenizer: tiny hand-made tokenizer.json files of both BPE families, with expected token ids
 * worked out by hand from their vocabularies and merge ranks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/tiny_ckpt.h"
#include "traces/model/tokenizer.h"

/* ---------------------------------------------------------------- file helpers */

static char g_dir[256];
static char g_files[32][320];
static int g_n_files;

typedef struct {
    char *p;
    size_t n, cap;
} Str;

static void str_add(Str *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void str_add(Str *s, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int need = vsnprintf(s->p ? s->p + s->n : NULL, s->p ? s->cap - s->n : 0, fmt, ap);
        va_end(ap);
        if (s->p && (size_t)need < s->cap - s->n) {
            s->n += (size_t)need;
            return;
        }
        s->cap = 2 * (s->cap + (size_t)need + 64);
        s->p = realloc(s->p, s->cap);
        assert_non_null(s->p);
    }
}

/* Writes text to a file of the test directory and returns its path (static storage). */
static const char *write_file(const char *name, const char *text)
{
    char want[320];
    snprintf(want, sizeof want, "%s/%s", g_dir, name);
    const char *path = NULL;
    for (int i = 0; i < g_n_files && !path; i++)
        if (strcmp(g_files[i], want) == 0)
            path = g_files[i];
    if (!path) {
        assert_true(g_n_files < 32);
        path = strcpy(g_files[g_n_files++], want);
    }
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
    return path;
}

static int setup_dir(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/kvsim-tok-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_files; i++)
        unlink(g_files[i]);
    return rmdir(g_dir);
}

/* Appends the byte-level spelling of raw bytes as a JSON string body. */
static void add_byte_level(Str *s, const char *raw)
{
    for (const unsigned char *c = (const unsigned char *)raw; *c; c++) {
        unsigned cp = byte_code_point(*c);
        if (cp == '"' || cp == '\\')
            str_add(s, "\\%c", (char)cp);
        else if (cp < 0x80)
            str_add(s, "%c", (char)cp);
        else
            str_add(s, "%c%c", (char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F)));
    }
}

typedef struct {
    const char *left, *right; /* raw text */
} Merge;

/* A byte-level vocabulary: ids 0..255 are the single bytes (id = byte value), then `extra`
 * (raw text) from id 256 on. */
static void add_byte_vocab(Str *s, const char *const *extra, int n_extra)
{
    str_add(s, "\"vocab\": {");
    for (int b = 0; b < 256; b++) {
        char raw[2] = {(char)b, 0};
        str_add(s, "%s\"", b ? ", " : "");
        if (b == 0)
            str_add(s, "%s", "\xC4\x80"); /* byte 0 is U+0100 */
        else
            add_byte_level(s, raw);
        str_add(s, "\": %d", b);
    }
    for (int i = 0; i < n_extra; i++) {
        str_add(s, ", \"");
        add_byte_level(s, extra[i]);
        str_add(s, "\": %d", 256 + i);
    }
    str_add(s, "}");
}

static void add_byte_merges(Str *s, const Merge *merges, int n, int as_pairs)
{
    str_add(s, "\"merges\": [");
    for (int i = 0; i < n; i++) {
        str_add(s, "%s%s\"", i ? ", " : "", as_pairs ? "[" : "");
        add_byte_level(s, merges[i].left);
        str_add(s, as_pairs ? "\", \"" : " ");
        add_byte_level(s, merges[i].right);
        str_add(s, "\"%s", as_pairs ? "]" : "");
    }
    str_add(s, "]");
}

#define ASSERT_IDS(tok, text, ...)                                                             \
    do {                                                                                       \
        const int32_t want_[] = {__VA_ARGS__};                                                 \
        check_ids((tok), (text), want_, (int)(sizeof want_ / sizeof want_[0]));                \
    } while (0)

static void check_ids(const Tokenizer *tok, const char *text, const int32_t *want, int n_want)
{
    int32_t *ids = NULL;
    int n = -1;
    KvErr err = {{0}};
    if (tokenizer_encode(tok, text, strlen(text), &ids, &n, &err) != 0)
        fail_msg("encode \"%s\": %s", text, err.msg);
    if (n != n_want) {
        for (int i = 0; i < n; i++)
            print_message("  got[%d] = %d\n", i, ids[i]);
        fail_msg("encode \"%s\": %d tokens, expected %d", text, n, n_want);
    }
    for (int i = 0; i < n; i++)
        if (ids[i] != want[i])
            fail_msg("encode \"%s\": token %d is %d, expected %d", text, i, ids[i], want[i]);
    free(ids);
}

static void check_decode(const Tokenizer *tok, const int32_t *ids, int n, const char *want)
{
    char *text = tokenizer_decode(tok, ids, n);
    assert_string_equal(text, want);
    free(text);
}

static void check_round_trip(const Tokenizer *tok, const char *text)
{
    int32_t *ids = NULL;
    int n = 0;
    KvErr err = {{0}};
    if (tokenizer_encode(tok, text, strlen(text), &ids, &n, &err) != 0)
        fail_msg("encode \"%s\": %s", text, err.msg);
    char *back = tokenizer_decode(tok, ids, n);
    assert_string_equal(back, text);
    free(back);
    free(ids);
}

static Tokenizer *load_ok(const char *json_path, const char *config_path)
{
    KvErr err = {{0}};
    Tokenizer *tok = tokenizer_load(json_path, config_path, &err);
    if (!tok)
        fail_msg("load %s: %s", json_path, err.msg);
    return tok;
}

/* ---------------------------------------------------------------- GPT-2 style byte-level */

/* Extra ids: 256 "bc", 257 "ab", 258 "abc", 259 "  ", 260 " w"; added 261 <|endoftext|>,
 * 262 <|end|>. Ranks: b+c first, then a+b, a+bc, space+space, space+w. */
enum { BC = 256, AB, ABC, SPACE2, SPACE_W, ENDOFTEXT, END };

static const char *gpt2_json(const char *name, int merges_as_pairs)
{
    static const char *const extra[] = {"bc", "ab", "abc", "  ", " w"};
    static const Merge merges[] = {{"b", "c"}, {"a", "b"}, {"a", "bc"}, {" ", " "}, {" ", "w"}};
    Str s = {0};
    str_add(&s, "{\"version\": \"1.0\", \"added_tokens\": ["
                "{\"id\": 261, \"content\": \"<|endoftext|>\", \"special\": true,"
                " \"lstrip\": false, \"rstrip\": false, \"normalized\": false,"
                " \"single_word\": false},"
                "{\"id\": 262, \"content\": \"<|end|>\", \"special\": true}],"
                "\"normalizer\": null,"
                "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false,"
                " \"trim_offsets\": true, \"use_regex\": true},"
                "\"post_processor\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true,"
                " \"trim_offsets\": false, \"use_regex\": true},"
                "\"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true,"
                " \"trim_offsets\": true, \"use_regex\": true},"
                "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null,"
                " \"continuing_subword_prefix\": \"\", \"end_of_word_suffix\": \"\","
                " \"fuse_unk\": false, \"byte_fallback\": false, ");
    add_byte_vocab(&s, extra, 5);
    str_add(&s, ", ");
    add_byte_merges(&s, merges, 5, merges_as_pairs);
    str_add(&s, "}}");
    const char *path = write_file(name, s.p);
    free(s.p);
    return path;
}

static void check_gpt2_encodings(const Tokenizer *tok)
{
    /* a b c: b+c (rank 0) goes before a+b (rank 1), then a+bc; merging left to right instead
     * would give "ab" "c". */
    ASSERT_IDS(tok, "abc", ABC);
    ASSERT_IDS(tok, "abab", AB, AB);
    ASSERT_IDS(tok, "cabc", 'c', ABC);
    ASSERT_IDS(tok, "bcab", BC, AB);
    /* GPT-2 split: "Hello", " ", " world": the two spaces are in different pieces, so the
     * space+space merge (rank 3, before space+w) cannot apply. */
    ASSERT_IDS(tok, "Hello  world", 'H', 'e', 'l', 'l', 'o', ' ', SPACE_W, 'o', 'r', 'l', 'd');
    /* "a", "  " (the last space stays with "b"), " b". */
    ASSERT_IDS(tok, "a   b", 'a', SPACE2, ' ', 'b');
    /* UTF-8 bytes are the byte tokens: é = C3 A9, ö = C3 B6, 日本 = E6 97 A5 E6 9C AC,
     * 😀 = F0 9F 98 80. */
    ASSERT_IDS(tok, "h\xC3\xA9llo w\xC3\xB6rld \xE6\x97\xA5\xE6\x9C\xAC\xF0\x9F\x98\x80",
               'h', 0xC3, 0xA9, 'l', 'l', 'o', SPACE_W, 0xC3, 0xB6, 'r', 'l', 'd', ' ', 0xE6,
               0x97, 0xA5, 0xE6, 0x9C, 0xAC, 0xF0, 0x9F, 0x98, 0x80);
    /* Added tokens are cut out first, longest match first. */
    ASSERT_IDS(tok, "ab<|endoftext|>abc", AB, ENDOFTEXT, ABC);
    ASSERT_IDS(tok, "x<|end|>y<|endoftext|>", 'x', END, 'y', ENDOFTEXT);
    ASSERT_IDS(tok, "<|end", '<', '|', 'e', 'n', 'd');
}

static void test_byte_level_merges_in_rank_order(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(gpt2_json("gpt2.json", 0), NULL);
    check_gpt2_encodings(tok);
    assert_int_equal(tokenizer_vocab_size(tok), 263);
    assert_int_equal(tokenizer_token_id(tok, "<|endoftext|>"), ENDOFTEXT);
    assert_int_equal(tokenizer_token_id(tok, "abc"), ABC);
    assert_int_equal(tokenizer_token_id(tok, "\xC4\xA0w"), SPACE_W); /* "Ġw" */
    assert_int_equal(tokenizer_token_id(tok, "zzz"), -1);
    tokenizer_free(tok);
}

static void test_merge_formats_agree(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(gpt2_json("gpt2_pairs.json", 1), NULL);
    check_gpt2_encodings(tok);
    tokenizer_free(tok);
}

static void test_byte_level_decode(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(gpt2_json("gpt2.json", 0), NULL);
    const int32_t ids[] = {AB, ENDOFTEXT, SPACE_W, 0xC3, 0xB6};
    check_decode(tok, ids, 5, "ab<|endoftext|> w\xC3\xB6");
    /* A lone lead byte, and a 4-byte sequence cut after 3 bytes: one U+FFFD each. */
    const int32_t lone[] = {'h', 0xC3, 'i'};
    check_decode(tok, lone, 3, "h\xEF\xBF\xBDi");
    const int32_t cut[] = {0xF0, 0x9F, 0x98, '!'};
    check_decode(tok, cut, 4, "\xEF\xBF\xBD!");
    const int32_t outside[] = {'a', 9999};
    check_decode(tok, outside, 2, "a\xEF\xBF\xBD");
    check_decode(tok, NULL, 0, "");
    static const char *const texts[] = {
        "Hello, world!", "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n",
        "h\xC3\xA9llo w\xC3\xB6rld", "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x98\x80!",
        "it's 12345 \"quoted\" \\ back", "mixed<|endoftext|> tokens<|end|>", "\x01\x7F\x1B[0m", "",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        check_round_trip(tok, texts[i]);
    tokenizer_free(tok);
}

/* ---------------------------------------------------------------- Llama 3 style byte-level */

static const char LLAMA3_PATTERN[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}|"
    " ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+";

enum { HELLO = 256, WORLD, D123, D45, IT, APOS_S, OK, BANG, X, APOS_S_UP, IT_UP, L3_AB, L3_ABC,
       NBSP2, BEGIN, ENDTEXT };

static const char *llama3_json(const char *name, int ignore_merges)
{
    static const char *const extra[] = {"Hello", " world", "123", "45", " it", "'s", " ok",
                                        "!!\n\n", " x", "'S", "IT", "ab", "abc",
                                        "\xC2\xA0\xC2\xA0"};
    static const Merge merges[] = {{"a", "b"}};
    Str s = {0};
    str_add(&s, "{\"added_tokens\": ["
                "{\"id\": 270, \"content\": \"<|begin_of_text|>\", \"special\": true},"
                "{\"id\": 271, \"content\": \"<|end_of_text|>\", \"special\": true}],"
                "\"normalizer\": null,"
                "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": ["
                "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"%s\"}, \"behavior\": "
                "\"Isolated\","
                " \"invert\": false},"
                "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true,"
                " \"use_regex\": false}]},"
                "\"post_processor\": {\"type\": \"Sequence\", \"processors\": ["
                "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": false,"
                " \"use_regex\": true},"
                "{\"type\": \"TemplateProcessing\", \"single\": ["
                "{\"SpecialToken\": {\"id\": \"<|begin_of_text|>\", \"type_id\": 0}},"
                "{\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], \"pair\": [],"
                " \"special_tokens\": {\"<|begin_of_text|>\": {\"id\": \"<|begin_of_text|>\","
                " \"ids\": [270], \"tokens\": [\"<|begin_of_text|>\"]}}}]},"
                "\"decoder\": {\"type\": \"ByteLevel\"},"
                "\"model\": {\"type\": \"BPE\", \"unk_token\": null, \"ignore_merges\": %s, ",
            LLAMA3_PATTERN, ignore_merges ? "true" : "false");
    add_byte_vocab(&s, extra, 14);
    str_add(&s, ", ");
    add_byte_merges(&s, merges, 1, 1);
    str_add(&s, "}}");
    const char *path = write_file(name, s.p);
    free(s.p);
    return path;
}

static void test_llama3_split_regex(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(llama3_json("llama3.json", 1), NULL);
    /* Pieces: "Hello" " world" " " "123" "45" " it" "'s" " ok" "!!\n\n" " " " x": digits go in
     * groups of at most three, a space before digits stands alone, and of a run of spaces the
     * last one joins the next word. Each piece is a vocabulary token (ignore_merges). */
    ASSERT_IDS(tok, "Hello world 12345 it's ok!!\n\n  x", HELLO, WORLD, ' ', D123, D45, IT,
               APOS_S, OK, BANG, ' ', X);
    /* The contractions are case-insensitive: "'S" is one piece, not "'" + "S". */
    ASSERT_IDS(tok, "IT'S", IT_UP, APOS_S_UP);
    /* U+00A0 is whitespace (\s is Unicode-aware): "a" NBSP "NBSP b", so the two-NBSP token
     * never comes out; with an ASCII-only \s both NBSPs would form one punctuation piece. */
    ASSERT_IDS(tok, "a\xC2\xA0\xC2\xA0" "b", 'a', 0xC2, 0xA0, 0xC2, 0xA0, 'b');
    /* 1234567 -> 123 456 7 (456 is not a token: its bytes). */
    ASSERT_IDS(tok, "1234567", D123, '4', '5', '6', '7');
    assert_int_equal(tokenizer_add_bos(tok), 1);
    assert_int_equal(tokenizer_bos(tok), BEGIN);
    assert_int_equal(tokenizer_eos(tok), ENDTEXT);
    check_round_trip(tok, "Hello world 12345 it's ok!!\n\n  x");
    check_round_trip(tok, "<|begin_of_text|>The 2024 r\xC3\xA9sum\xC3\xA9\r\n\t \xF0\x9F\x98\x80");
    tokenizer_free(tok);
}

static void test_ignore_merges(void **state)
{
    (void)state;
    /* "abc" is a vocabulary token that no merge produces (only a+b exists). */
    Tokenizer *tok = load_ok(llama3_json("llama3.json", 1), NULL);
    ASSERT_IDS(tok, "abc", L3_ABC);
    ASSERT_IDS(tok, " abc", ' ', L3_AB, 'c'); /* " abc" is no token: merges apply */
    tokenizer_free(tok);
    tok = load_ok(llama3_json("llama3_merging.json", 0), NULL);
    ASSERT_IDS(tok, "abc", L3_AB, 'c');
    tokenizer_free(tok);
}

/* ---------------------------------------------------------------- SentencePiece style */

/* ids: 0 <unk>, 1 <s>, 2 </s>, 3 + b for <0xbb>, then these. */
enum { SP_SPACE = 259, SP_A, SP_B, SP_C, SP_L, SP_O, SP_SA, SP_AB, SP_SAB, SP_LO, SP_SLO };
#define FB(b) (3 + (b))

static const char *sp_json(const char *name, int metaspace, int byte_fallback, int fuse_unk)
{
    static const char *const extra[] = {"\xE2\x96\x81", "a", "b", "c", "l", "o", "\xE2\x96\x81" "a",
                                        "ab", "\xE2\x96\x81" "ab", "lo", "\xE2\x96\x81" "lo"};
    Str s = {0};
    str_add(&s, "{\"added_tokens\": ["
                "{\"id\": 0, \"content\": \"<unk>\", \"special\": true, \"normalized\": false},"
                "{\"id\": 1, \"content\": \"<s>\", \"special\": true, \"normalized\": false},"
                "{\"id\": 2, \"content\": \"</s>\", \"special\": true, \"normalized\": false}],");
    if (metaspace)
        str_add(&s, "\"normalizer\": null,"
                    "\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": "
                    "\"\xE2\x96\x81\","
                    " \"prepend_scheme\": \"first\", \"split\": true},"
                    "\"decoder\": {\"type\": \"Sequence\", \"decoders\": ["
                    "{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"},"
                    "{\"type\": \"Metaspace\", \"replacement\": \"\xE2\x96\x81\","
                    " \"prepend_scheme\": \"first\", \"split\": true}]},");
    else
        str_add(&s, "\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": ["
                    "{\"type\": \"Prepend\", \"prepend\": \"\xE2\x96\x81\"},"
                    "{\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": "
                    "\"\xE2\x96\x81\"}]},"
                    "\"pre_tokenizer\": null,"
                    "\"decoder\": {\"type\": \"Sequence\", \"decoders\": ["
                    "{\"type\": \"Replace\", \"pattern\": {\"String\": \"\xE2\x96\x81\"}, "
                    "\"content\": \" \"},"
                    "{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"},"
                    "{\"type\": \"Strip\", \"content\": \" \", \"start\": 1, \"stop\": 0}]},");
    str_add(&s, "\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": ["
                "{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},"
                "{\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}],"
                " \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": "
                "[\"<s>\"]}}},"
                "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": \"<unk>\","
                " \"continuing_subword_prefix\": null, \"end_of_word_suffix\": null,"
                " \"fuse_unk\": %s, \"byte_fallback\": %s, \"ignore_merges\": false,"
                " \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2",
            fuse_unk ? "true" : "false", byte_fallback ? "true" : "false");
    for (int b = 0; b < 256; b++)
        str_add(&s, ", \"<0x%02X>\": %d", b, FB(b));
    for (int i = 0; i < 11; i++)
        str_add(&s, ", \"%s\": %d", extra[i], SP_SPACE + i);
    /* Ranks: a+b, then ▁+a, ▁+ab, l+o, ▁+lo. */
    str_add(&s, "}, \"merges\": [\"a b\", \"\xE2\x96\x81 a\", \"\xE2\x96\x81 ab\", \"l o\","
                " \"\xE2\x96\x81 lo\"]}}");
    const char *path = write_file(name, s.p);
    free(s.p);
    return path;
}

static void test_sentencepiece_encode(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(sp_json("sp.json", 0, 1, 1), NULL);
    /* "▁ab": a+b (rank 0) before ▁+a (rank 1), then ▁+ab; left to right would give ▁a b. */
    ASSERT_IDS(tok, "ab", SP_SAB);
    /* "▁a▁lo": ▁+a, l+o, then ▁+lo. */
    ASSERT_IDS(tok, "a lo", SP_SA, SP_SLO);
    ASSERT_IDS(tok, "a  b", SP_SA, SP_SPACE, SP_SPACE, SP_B);
    /* Characters outside the vocabulary fall back to their UTF-8 bytes. */
    ASSERT_IDS(tok, "a\xC3\xA9", SP_SA, FB(0xC3), FB(0xA9));
    ASSERT_IDS(tok, "\xF0\x9F\x98\x80", SP_SPACE, FB(0xF0), FB(0x9F), FB(0x98), FB(0x80));
    ASSERT_IDS(tok, "a\nb", SP_SA, FB('\n'), SP_B);
    /* Each stretch between added tokens is normalized on its own, so both get the ▁. */
    ASSERT_IDS(tok, "ab</s>ab", SP_SAB, 2, SP_SAB);
    ASSERT_IDS(tok, "<s>lo", 1, SP_SLO);
    tokenizer_free(tok);

    /* Without byte fallback: unknown characters are <unk>, runs of them fused into one. */
    tok = load_ok(sp_json("sp_unk.json", 0, 0, 1), NULL);
    ASSERT_IDS(tok, "a\xC3\xA9\xC3\xB6 b", SP_SA, 0, SP_SPACE, SP_B);
    tokenizer_free(tok);
    tok = load_ok(sp_json("sp_unk_unfused.json", 0, 0, 0), NULL);
    ASSERT_IDS(tok, "a\xC3\xA9\xC3\xB6 b", SP_SA, 0, 0, SP_SPACE, SP_B);
    tokenizer_free(tok);
}

static void test_sentencepiece_metaspace(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(sp_json("sp_meta.json", 1, 1, 1), NULL);
    /* Split before each ▁: "▁ab" "▁lo". */
    ASSERT_IDS(tok, "ab lo", SP_SAB, SP_SLO);
    ASSERT_IDS(tok, "a  b", SP_SA, SP_SPACE, SP_SPACE, SP_B);
    /* prepend_scheme "first": only the stretch at the start of the text gets a ▁. */
    ASSERT_IDS(tok, "ab</s>ab", SP_SAB, 2, SP_AB);
    const int32_t ids[] = {SP_SAB, SP_SLO, FB(0xC3), FB(0xA9)};
    check_decode(tok, ids, 4, "ab lo\xC3\xA9");
    check_round_trip(tok, "ab lo  c\n\t\xC3\xA9\xF0\x9F\x98\x80 ");
    tokenizer_free(tok);
}

static void test_sentencepiece_decode(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(sp_json("sp.json", 0, 1, 1), NULL);
    const int32_t ab[] = {SP_SAB, SP_SA, FB(0xC3), FB(0xA9)};
    check_decode(tok, ab, 4, "ab a\xC3\xA9");
    /* The Strip step sees "<s>" first, so the space after it stays. */
    const int32_t bos[] = {1, SP_SAB};
    check_decode(tok, bos, 2, "<s> ab");
    const int32_t mid[] = {SP_SAB, 2, SP_SAB};
    check_decode(tok, mid, 3, "ab</s> ab");
    /* An invalid byte run: one U+FFFD per byte. */
    const int32_t cut[] = {SP_A, FB(0xF0), FB(0x9F), FB(0x98), SP_B};
    check_decode(tok, cut, 5, "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" "b");
    static const char *const texts[] = {
        "ab", "Hello, world!", " leading space", "trailing  ", "a\n\nb\r\n", "tabs\tand   runs",
        "h\xC3\xA9llo w\xC3\xB6rld", "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x98\x80",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        check_round_trip(tok, texts[i]);
    tokenizer_free(tok);
}

/* ---------------------------------------------------------------- BOS / EOS */

static void test_bos_eos(void **state)
{
    (void)state;
    const char *sp = sp_json("sp.json", 0, 1, 1);
    /* From the post-processor template, without a config. */
    Tokenizer *tok = load_ok(sp, NULL);
    assert_int_equal(tokenizer_bos(tok), 1);
    assert_int_equal(tokenizer_eos(tok), 2);
    assert_int_equal(tokenizer_add_bos(tok), 1);
    tokenizer_free(tok);

    /* The config wins over the template; eos as {"content": ...}. */
    const char *cfg = write_file("sp_config.json",
                                 "{\"add_bos_token\": false, \"bos_token\": \"</s>\","
                                 " \"eos_token\": {\"__type\": \"AddedToken\", \"content\": "
                                 "\"<unk>\"}}");
    tok = load_ok(sp, cfg);
    assert_int_equal(tokenizer_bos(tok), 2);
    assert_int_equal(tokenizer_eos(tok), 0);
    assert_int_equal(tokenizer_add_bos(tok), 0);
    tokenizer_free(tok);

    /* GPT-2 style: no template BOS; the config says bos null. */
    const char *gpt2 = gpt2_json("gpt2.json", 0);
    cfg = write_file("gpt2_config.json", "{\"bos_token\": null, \"eos_token\": \"<|end|>\"}");
    tok = load_ok(gpt2, cfg);
    assert_int_equal(tokenizer_bos(tok), -1);
    assert_int_equal(tokenizer_eos(tok), END);
    assert_int_equal(tokenizer_add_bos(tok), 0);
    tokenizer_free(tok);
    /* A config path that does not exist is no config: the fallback names apply. */
    char missing[320];
    snprintf(missing, sizeof missing, "%s/no_config.json", g_dir);
    tok = load_ok(gpt2, missing);
    assert_int_equal(tokenizer_bos(tok), -1);
    assert_int_equal(tokenizer_eos(tok), ENDOFTEXT);
    assert_int_equal(tokenizer_add_bos(tok), 0);
    tokenizer_free(tok);
}

/* ---------------------------------------------------------------- errors */

static void expect_load_error(const char *json_path, const char *config_path, const char *named,
                              const char *what)
{
    KvErr err = {{0}};
    Tokenizer *tok = tokenizer_load(json_path, config_path, &err);
    assert_null(tok);
    if (!strstr(err.msg, named) || !strstr(err.msg, what))
        fail_msg("error \"%s\" should name %s and say \"%s\"", err.msg, named, what);
    assert_null(strchr(err.msg, '\n'));
}

static void test_errors(void **state)
{
    (void)state;
    char missing[320];
    snprintf(missing, sizeof missing, "%s/absent.json", g_dir);
    expect_load_error(missing, NULL, missing, "cannot read");

    const char *bad = write_file("bad.json", "{\"model\": {\"type\": \"BPE\",\n \"vocab\": "
                                 "{\"a\": 0,}}");
    expect_load_error(bad, NULL, bad, ":2: not valid JSON");

    const char *unigram = write_file("unigram.json",
                                     "{\"model\": {\"type\": \"Unigram\", \"vocab\": "
                                     "[[\"a\", 0.0]]}}");
    KvErr err = {{0}};
    assert_null(tokenizer_load(unigram, NULL, &err));
    char want[1024];
    snprintf(want, sizeof want, "%s: model.type \"Unigram\" not supported (expected BPE)", unigram);
    assert_string_equal(err.msg, want);

    const char *wordpiece = write_file("wordpiece.json",
                                       "{\"model\": {\"type\": \"WordPiece\", \"vocab\": "
                                       "{\"a\": 0}}}");
    expect_load_error(wordpiece, NULL, wordpiece, "\"WordPiece\" not supported");

    const char *unknown = write_file("unknown_merge.json",
                                     "{\"model\": {\"type\": \"BPE\","
                                     " \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
                                     " \"merges\": [\"a b\", \"a zz\"]}}");
    expect_load_error(unknown, NULL, unknown, "merges[1]: token \"zz\" is not in model.vocab");

    const char *no_result = write_file("no_result_merge.json",
                                       "{\"model\": {\"type\": \"BPE\","
                                       " \"vocab\": {\"a\": 0, \"b\": 1},"
                                       " \"merges\": [[\"a\", \"b\"]]}}");
    expect_load_error(no_result, NULL, no_result, "token \"ab\" is not in model.vocab");

    const char *pre = write_file("bert_pre.json",
                                 "{\"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"},"
                                 " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, "
                                 "\"merges\": []}}");
    expect_load_error(pre, NULL, pre, "pre_tokenizer type \"BertPreTokenizer\" not supported");

    const char *sp = sp_json("sp.json", 0, 1, 1);
    const char *bad_cfg = write_file("bad_config.json", "{\"bos_token\": ");
    expect_load_error(sp, bad_cfg, bad_cfg, "not valid JSON");
    /* transformers (Python's json) keeps the last of two equal keys, cJSON the first. */
    const char *dup_cfg = write_file("dup_config.json", "{\"bos_token\": \"<s>\", \"bos_token\": "
                                     "\"</s>\"}");
    expect_load_error(sp, dup_cfg, dup_cfg, "key 'bos_token' appears twice in the top-level object");
    const char *odd_cfg = write_file("odd_config.json", "{\"bos_token\": \"<nope>\"}");
    expect_load_error(sp, odd_cfg, odd_cfg, "bos_token \"<nope>\" is not a token");

    /* Encoding text that is not UTF-8 is an error, not a guess. */
    Tokenizer *tok = load_ok(sp, NULL);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(tokenizer_encode(tok, "ab\xFF", 3, &ids, &n, &err), -1);
    assert_non_null(strstr(err.msg, "not valid UTF-8 at byte 2"));
    assert_null(ids);
    tokenizer_free(tok);
}

/* ---------------------------------------------------------------- hostile input (issue 10) */

/* A committed input of tests/inputs/tokenizer/ (static storage). */
static const char *input_path(const char *name)
{
    static char path[8][512];
    static int next;
    const char *root = getenv("KVSIM_SOURCE_DIR");
    char *out = path[next++ % 8];
    if (root && *root) {
        snprintf(out, 512, "%s/tests/inputs/tokenizer/%s", root, name);
    } else { /* run by hand: next to this source file */
        const char *slash = strrchr(__FILE__, '/');
        int dir = slash ? (int)(slash - __FILE__) : 1;
        snprintf(out, 512, "%.*s/inputs/tokenizer/%s", dir, slash ? __FILE__ : ".", name);
    }
    return out;
}

/* Ids of the committed split_*.json tokenizers: a b c x ab ba xc; merges a+b, b+a, x+c. */
enum { T_A, T_B, T_C, T_X, T_AB, T_BA, T_XC };

/* A Split whose regex matches empty at the very end of a piece ("$") must not look at the byte
 * after the piece; with ASan this read a byte past the arena when the piece filled it exactly
 * (64, 128, ... bytes). */
static void test_split_empty_match_at_end(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(input_path("split_dollar.json"), NULL);
    ASSERT_IDS(tok, "abab", T_AB, T_AB);
    char text[300];
    int32_t want[300];
    for (int n = 1; n < 300; n++) {
        memset(text, 'c', (size_t)n);
        text[n] = '\0';
        for (int i = 0; i < n; i++)
            want[i] = T_C;
        check_ids(tok, text, want, n);
    }
    tokenizer_free(tok);
}

/* Empty matches cut the text as in the tokenizers library (the onig crate's find_iter): a
 * lookahead splits "abab" into "a" "ba" "b" rather than matching nothing; the first empty match
 * after a non-empty one is skipped. */
static void test_split_empty_matches_cut(void **state)
{
    (void)state;
    Tokenizer *tok = load_ok(input_path("split_lookahead.json"), NULL);
    ASSERT_IDS(tok, "abab", T_A, T_BA, T_B);
    ASSERT_IDS(tok, "bb", T_B, T_B);
    tokenizer_free(tok);
    tok = load_ok(input_path("split_lookahead_removed.json"), NULL);
    ASSERT_IDS(tok, "abab", T_A, T_BA, T_B);
    tokenizer_free(tok);
    tok = load_ok(input_path("split_after_match.json"), NULL);
    /* "ab" matches, then the empty match before "c" is skipped: "ab" "xc". */
    ASSERT_IDS(tok, "abxc", T_AB, T_XC);
    /* An empty match that does not follow a match cuts: "x" "" "c" "ab". */
    ASSERT_IDS(tok, "xcab", T_X, T_C, T_AB);
    tokenizer_free(tok);
}

static void test_trailing_text_rejected(void **state)
{
    (void)state;
    const char *garbage = input_path("trailing_garbage.json");
    FILE *fp = fopen(garbage, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fclose(fp);
    char want[64];
    snprintf(want, sizeof want, "byte %ld: unexpected text after the JSON value", size - 2);
    expect_load_error(garbage, NULL, garbage, want);
    expect_load_error(input_path("truncated.json"), NULL, "truncated.json", "not valid JSON");
    /* tokenizer_config.json too; blanks after the value are fine. */
    const char *cfg = input_path("config_trailing.json");
    expect_load_error(input_path("split_dollar.json"), cfg, cfg, "byte 44: unexpected text");
    const char *ok_cfg = write_file("blank_after.json", "{\"add_bos_token\": false}\n \t\r\n");
    Tokenizer *tok = load_ok(input_path("split_dollar.json"), ok_cfg);
    tokenizer_free(tok);
}

/* {top-level keys "model": {model keys "type": "BPE", "vocab": {a, b, ab}, "merges": ["a b"]}}:
 * cJSON takes the first of two equal keys, so the model keys given override the defaults. */
static const char *tiny(const char *name, const char *top, const char *model)
{
    char text[4096];
    snprintf(text, sizeof text,
             "{%s \"model\": {%s\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, "
             "\"ab\": 2}, \"merges\": [\"a b\"]}}",
             top, model);
    return write_file(name, text);
}

static void test_wrong_types_rejected(void **state)
{
    (void)state;
    static const struct {
        const char *top, *model, *what;
    } cases[] = {
        {"\"normalizer\": 5,", "", "normalizer: expected an object or null"},
        {"\"pre_tokenizer\": [],", "", "pre_tokenizer: expected an object or null"},
        {"\"decoder\": \"ByteLevel\",", "", "decoder: expected an object or null"},
        {"", "\"byte_fallback\": \"yes\", ", "model: \"byte_fallback\": expected true or false"},
        {"", "\"ignore_merges\": 1, ", "model: \"ignore_merges\": expected true or false"},
        {"", "\"unk_token\": 5, ", "model: \"unk_token\": expected a string"},
        {"", "\"continuing_subword_prefix\": [], ", "\"continuing_subword_prefix\": expected a"},
        {"", "\"type\": 7, ", "model: \"type\": expected a string"},
        {"\"added_tokens\": [{\"id\": 3, \"content\": \"<s>\", \"special\": 1}],", "",
         "added_tokens[0]: \"special\": expected true or false"},
        {"\"added_tokens\": [{\"id\": 3, \"content\": \"<s>\"}, {\"id\": 2.5, \"content\": "
         "\"</s>\"}],", "", "added_tokens[1]: expected an object with a non-negative integer"},
        {"\"added_tokens\": [{\"id\": 1e300, \"content\": \"<s>\"}],", "",
         "added_tokens[0]: expected an object"},
        {"\"added_tokens\": [{\"id\": -1, \"content\": \"<s>\"}],", "", "added_tokens[0]"},
        {"\"added_tokens\": [\"<s>\"],", "", "added_tokens[0]"},
        {"\"added_tokens\": [{\"id\": 20000000, \"content\": \"<s>\"}],", "",
         "token id 20000000 is too large"},
        {"\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, "
         "\"behavior\": \"Isolated\"},", "", "pre_tokenizer Split: cannot compile regex"},
        {"\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, "
         "\"behavior\": \"Isolated\", \"invert\": \"no\"},", "",
         "pre_tokenizer Split: \"invert\": expected true or false"},
        {"\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\\u0000|b\"}, "
         "\"behavior\": \"Isolated\"},", "", "\\u0000 in a string"},
        {"\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": \"a\", \"behavior\": "
         "\"Isolated\"},", "", "expected a pattern {\"String\": ...} or {\"Regex\": ...}"},
        {"\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, "
         "\"behavior\": \"Sideways\\n\"},", "", "behavior \"Sideways\\n\" (expected Removed"},
        {"\"pre_tokenizer\": {\"type\": \"Metaspace\", \"split\": 1},", "",
         "pre_tokenizer Metaspace: \"split\": expected true or false"},
        {"\"pre_tokenizer\": {\"type\": \"Metaspace\", \"prepend_scheme\": 5},", "",
         "\"prepend_scheme\": expected a string"},
        {"\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"use_regex\": \"true\"},", "",
         "pre_tokenizer ByteLevel: \"use_regex\": expected true or false"},
        {"\"pre_tokenizer\": {\"type\": \"Digits\", \"individual_digits\": 0},", "",
         "\"individual_digits\": expected true or false"},
        {"\"decoder\": {\"type\": \"Strip\", \"content\": \" \", \"start\": 1.5, \"stop\": 0},",
         "", "decoder Strip: expected non-negative start and stop"},
        {"\"decoder\": {\"type\": \"Metaspace\", \"replacement\": 9},", "",
         "decoder Metaspace: \"replacement\": expected a string"},
        {"\"normalizer\": {\"type\": \"Prepend\", \"prepend\": false},", "",
         "normalizer Prepend: \"prepend\": expected a string"},
        {"\"normalizer\": {\"type\": \"NFKC\\u0001\"},", "", "type \"NFKC\\x01\" not supported"},
        {"", "\"merges\": [\"a b\", 5], ", "model.merges[1]: expected"},
        {"", "\"merges\": [\"a\\nb zz\"], ", "token \"a\\nb\" is not in model.vocab"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = tiny("types.json", cases[i].top, cases[i].model);
        expect_load_error(path, NULL, path, cases[i].what);
    }
}

static void test_bad_ids_and_bytes_rejected(void **state)
{
    (void)state;
    static const struct {
        const char *json, *what;
    } cases[] = {
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 1e300}, \"merges\": []}}",
         "model.vocab \"a\": expected a non-negative integer id"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}, \"merges\": []}}",
         "expected a non-negative integer id"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0.5}, \"merges\": []}}",
         "expected a non-negative integer id"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"0\"}, \"merges\": []}}",
         "expected a non-negative integer id"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\\nb\\u0007\": true}, \"merges\": []}}",
         "model.vocab \"a\\nb\\x07\": expected"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 16777216}, \"merges\": []}}",
         "token id 16777216 is too large"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}",
         "id 0 is used by both \"a\" and \"b\""},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\\u0000b\": 0}, \"merges\": []}}",
         ":1: byte 38: \\u0000 in a string"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"\xC3\": 0}, \"merges\": []}}",
         ":1: byte 37: not valid UTF-8"},
        /* serde_json, which the tokenizers library parses with, refuses a raw control character
         * in a string; cJSON alone would take it. */
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\tb\": 0}, \"merges\": []}}",
         ":1: byte 38: raw control character inside a string"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0},\n\"merges\": []}}\n\x01",
         ":3: byte 60: unexpected text after the JSON value"},
        {"[1]", "expected a JSON object at the top level"},
        {"", "not valid JSON"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = write_file("ids.json", cases[i].json);
        expect_load_error(path, NULL, path, cases[i].what);
    }
    /* A raw NUL byte (fputs would stop at it). */
    char path[320];
    snprintf(path, sizeof path, "%s/nul.json", g_dir);
    const char raw[] = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}\0";
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fwrite(raw, 1, sizeof raw, fp);
    fclose(fp);
    expect_load_error(path, NULL, path, "byte 59: NUL byte");
    unlink(path);
}

/* Nesting: cJSON refuses more than 1000 levels (an error, not a stack overflow); nested
 * Sequences within that limit load. */
static void test_deep_nesting(void **state)
{
    (void)state;
    Str s = {0};
    str_add(&s, "{\"normalizer\": ");
    for (int i = 0; i < 2000; i++)
        str_add(&s, "[");
    for (int i = 0; i < 2000; i++)
        str_add(&s, "]");
    str_add(&s, "}");
    const char *path = write_file("deep.json", s.p);
    expect_load_error(path, NULL, path, "not valid JSON");
    s.n = 0;
    str_add(&s, "{\"normalizer\": ");
    for (int i = 0; i < 300; i++)
        str_add(&s, "{\"type\": \"Sequence\", \"normalizers\": [");
    str_add(&s, "{\"type\": \"Replace\", \"pattern\": {\"String\": \"b\"}, \"content\": \"a\"}");
    for (int i = 0; i < 300; i++)
        str_add(&s, "]}");
    str_add(&s, ", \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"aa\": 2},"
                " \"merges\": [\"a a\"]}}");
    path = write_file("deep_ok.json", s.p);
    free(s.p);
    Tokenizer *tok = load_ok(path, NULL);
    ASSERT_IDS(tok, "ab", 2);
    tokenizer_free(tok);
}

/* Inputs that are not regular files are refused at once (a FIFO would block forever). */
static void test_not_regular_files(void **state)
{
    (void)state;
    const char *json = input_path("split_dollar.json");
    expect_load_error(g_dir, NULL, g_dir, "not a regular file");
    expect_load_error(json, g_dir, g_dir, "not a regular file");
    char fifo[320];
    snprintf(fifo, sizeof fifo, "%s/fifo.json", g_dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    expect_load_error(fifo, NULL, fifo, "not a regular file");
    expect_load_error(json, fifo, fifo, "not a regular file");
    unlink(fifo);
}

/* A regex that backtracks without end on some text fails the encode with an error (PCRE2's
 * match limit) instead of hanging. */
static void test_runaway_regex(void **state)
{
    (void)state;
    const char *path = write_file("runaway.json",
                                  "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": "
                                  "{\"Regex\": \"(a|aa)+$\"}, \"behavior\": \"Isolated\"},"
                                  " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, "
                                  "\"b\": 1}, \"merges\": []}}");
    Tokenizer *tok = load_ok(path, NULL);
    char text[64];
    memset(text, 'a', 60);
    text[60] = 'b';
    text[61] = '\0';
    int32_t *ids = NULL;
    int n = 0;
    KvErr err = {{0}};
    assert_int_equal(tokenizer_encode(tok, text, strlen(text), &ids, &n, &err), -1);
    assert_null(ids);
    if (!strstr(err.msg, path) || !strstr(err.msg, "regex match failed"))
        fail_msg("unexpected error \"%s\"", err.msg);
    tokenizer_free(tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_byte_level_merges_in_rank_order),
        cmocka_unit_test(test_merge_formats_agree),
        cmocka_unit_test(test_byte_level_decode),
        cmocka_unit_test(test_llama3_split_regex),
        cmocka_unit_test(test_ignore_merges),
        cmocka_unit_test(test_sentencepiece_encode),
        cmocka_unit_test(test_sentencepiece_metaspace),
        cmocka_unit_test(test_sentencepiece_decode),
        cmocka_unit_test(test_bos_eos),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_split_empty_match_at_end),
        cmocka_unit_test(test_split_empty_matches_cut),
        cmocka_unit_test(test_trailing_text_rejected),
        cmocka_unit_test(test_wrong_types_rejected),
        cmocka_unit_test(test_bad_ids_and_bytes_rejected),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_not_regular_files),
        cmocka_unit_test(test_runaway_regex),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
