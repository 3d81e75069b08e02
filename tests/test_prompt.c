/* Prompt markup: the chat template, segments, needle spans and probes, with a byte-per-token
 * encoder so that every expected span can be counted by hand from the text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "traces/prompt.h"

/* One token per byte: id = byte value + 1 (so that 0 can be BOS). */
static int byte_encode(void *ctx, const char *text, size_t len, int32_t **ids, int *n, KvErr *err)
{
    (void)ctx;
    (void)err;
    *ids = kv_malloc((len ? len : 1) * sizeof **ids);
    for (size_t i = 0; i < len; i++)
        (*ids)[i] = (unsigned char)text[i] + 1;
    *n = (int)len;
    return 0;
}

static void tokenize(const char *text, int bos, PromptMarkup *m, PromptTokens *t)
{
    KvErr err = {{0}};
    if (prompt_parse("p.txt", text, strlen(text), m, &err) != 0)
        fail_msg("%s", err.msg);
    if (prompt_tokenize("p.txt", m, byte_encode, NULL, bos, t, &err) != 0)
        fail_msg("%s", err.msg);
}

/* The tokens decode (byte encoder) to exactly `expected`, after `skip` leading tokens. */
static void assert_text(const PromptTokens *t, int skip, const char *expected)
{
    assert_int_equal(t->n_tokens - skip, (int)strlen(expected));
    for (int i = skip; i < t->n_tokens; i++)
        assert_int_equal(t->tokens[i] - 1, (unsigned char)expected[i - skip]);
}

static void test_plain_text_needles_and_probes(void **state)
{
    (void)state;
    PromptMarkup m;
    PromptTokens t;
    tokenize("The code is [[needle]]4711[[/needle]]. Remember it[[probe]].\nBye", -1, &m, &t);
    assert_false(m.is_chat);
    assert_text(&t, 0, "The code is 4711. Remember it.\nBye");
    assert_int_equal(t.n_needles, 1);
    assert_int_equal(t.needles[0], 12); /* "The code is " */
    assert_int_equal(t.needles[1], 16);
    assert_int_equal(t.n_probes, 1);
    assert_int_equal(t.probes[0], 28); /* the 't' of "it" */
    for (int i = 0; i < t.n_tokens; i++)
        assert_int_equal(t.segments[i], 1); /* one turn; no system prompt */
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    tokenize("Hi", 999, &m, &t); /* BOS alone in segment 0 */
    assert_int_equal(t.n_tokens, 3);
    assert_int_equal(t.segments[0], 0);
    assert_int_equal(t.segments[1], 1);
    assert_int_equal(t.segments[2], 1);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

static void test_bos_shifts_spans(void **state)
{
    (void)state;
    PromptMarkup m;
    PromptTokens t;
    tokenize("[[needle]]ab[[probe]]cd[[/needle]]ef[[probe]][[probe]]", 0, &m, &t);
    assert_int_equal(t.tokens[0], 0);
    assert_text(&t, 1, "abcdef");
    /* One needle across the probe inside it. */
    assert_int_equal(t.n_needles, 1);
    assert_int_equal(t.needles[0], 1);
    assert_int_equal(t.needles[1], 5);
    /* The doubled marker is one probe. */
    assert_int_equal(t.n_probes, 2);
    assert_int_equal(t.probes[0], 2);
    assert_int_equal(t.probes[1], 6);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

static void test_chat_template_and_segments(void **state)
{
    (void)state;
    const char *chat =
        "  [{\"role\": \"system\", \"content\": \"Be brief.\"},\n"
        "   {\"role\": \"user\", \"content\": \"Key: [[needle]]XY[[/needle]]\"},\n"
        "   {\"role\": \"assistant\", \"content\": \"Noted.\"},\n"
        "   {\"role\": \"user\", \"content\": \"Key?[[probe]]\"}]";
    PromptMarkup m;
    PromptTokens t;
    tokenize(chat, 0, &m, &t);
    assert_true(m.is_chat);
    const char *s0 = "System: Be brief.\n\n";
    const char *s1 = "User: Key: XY\n\nAssistant: Noted.\n\n";
    const char *s2 = "User: Key?\n\nAssistant:";
    char expected[256];
    snprintf(expected, sizeof expected, "%s%s%s", s0, s1, s2);
    assert_text(&t, 1, expected);
    int n0 = 1 + (int)strlen(s0), n1 = (int)strlen(s1);
    for (int i = 0; i < t.n_tokens; i++)
        assert_int_equal(t.segments[i], i < n0 ? 0 : i < n0 + n1 ? 1 : 2);
    assert_int_equal(m.last_segment, 2);
    assert_int_equal(t.n_needles, 1);
    assert_int_equal(t.needles[0], n0 + (int)strlen("User: Key: "));
    assert_int_equal(t.needles[1], t.needles[0] + 2);
    assert_int_equal(t.n_probes, 1);
    assert_int_equal(t.probes[0], n0 + n1 + (int)strlen("User: Key?") - 1);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

/* [[decode]] splits the tokens: n_prompt counts those before it (BOS included). */
static void test_decode_marker_splits_prompt_from_forced(void **state)
{
    (void)state;
    const char *text = "Pin [[needle]]42[[/needle]].[[probe]][[decode]] Pin?[[probe]] x";
    for (int bos = -1; bos <= 0; bos++) {
        PromptMarkup m;
        PromptTokens t;
        tokenize(text, bos, &m, &t);
        int lead = bos >= 0;
        assert_text(&t, lead, "Pin 42. Pin? x");
        assert_int_equal(t.n_prompt, lead + (int)strlen("Pin 42."));
        assert_int_equal(t.n_tokens, lead + (int)strlen("Pin 42. Pin? x"));
        assert_int_equal(t.n_needles, 1);
        assert_int_equal(t.needles[0], lead + 4);
        assert_int_equal(t.needles[1], lead + 6);
        /* A probe before the marker is a prompt position, one after it a forced position. */
        assert_int_equal(t.n_probes, 2);
        assert_int_equal(t.probes[0], t.n_prompt - 1);
        assert_int_equal(t.probes[1], lead + (int)strlen("Pin 42. Pin?") - 1);
        prompt_tokens_free(&t);
        prompt_markup_free(&m);
    }
    /* Without the marker every token is prompt. */
    PromptMarkup m;
    PromptTokens t;
    tokenize("Pin 42.", 0, &m, &t);
    assert_int_equal(t.n_prompt, t.n_tokens);
    assert_int_equal(t.n_tokens, 8);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

/* In a chat, a marker opening a message splits before its "User: " header; one inside the
 * content splits there. */
static void test_decode_marker_in_chat(void **state)
{
    (void)state;
    const char *chat =
        "[{\"role\": \"user\", \"content\": \"Key: XY\"},\n"
        " {\"role\": \"assistant\", \"content\": \"Noted.\"},\n"
        " {\"role\": \"user\", \"content\": \"[[decode]]Key?\"}]";
    PromptMarkup m;
    PromptTokens t;
    tokenize(chat, 0, &m, &t);
    const char *before = "User: Key: XY\n\nAssistant: Noted.\n\n";
    assert_text(&t, 1, "User: Key: XY\n\nAssistant: Noted.\n\nUser: Key?\n\nAssistant:");
    assert_int_equal(t.n_prompt, 1 + (int)strlen(before));
    /* The forced tokens belong to the last turn. */
    for (int i = t.n_prompt; i < t.n_tokens; i++)
        assert_int_equal(t.segments[i], 2);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);

    chat = "[{\"role\": \"user\", \"content\": \"Key: XY [[decode]]Key?\"}]";
    tokenize(chat, -1, &m, &t);
    assert_int_equal(t.n_prompt, (int)strlen("User: Key: XY "));
    assert_text(&t, 0, "User: Key: XY Key?\n\nAssistant:");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

static void test_text_starting_with_bracket_is_plain(void **state)
{
    (void)state;
    PromptMarkup m;
    PromptTokens t;
    tokenize("[1] not a chat", -1, &m, &t);
    assert_false(m.is_chat);
    assert_text(&t, 0, "[1] not a chat");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

static void expect_error(const char *text, const char *fragment)
{
    PromptMarkup m;
    PromptTokens t;
    KvErr err = {{0}};
    int rc = prompt_parse("p.txt", text, strlen(text), &m, &err);
    if (rc == 0) {
        rc = prompt_tokenize("p.txt", &m, byte_encode, NULL, -1, &t, &err);
        prompt_markup_free(&m);
        if (rc == 0) {
            prompt_tokens_free(&t);
            fail_msg("accepted: %s", text);
        }
    }
    if (!strstr(err.msg, fragment) || !strstr(err.msg, "p.txt"))
        fail_msg("error '%s' does not mention '%s'", err.msg, fragment);
}

static void test_bad_markup(void **state)
{
    (void)state;
    expect_error("a\nb [[needle]]c", "line 2: [[needle]] is never closed");
    expect_error("a\n\nb[[/needle]]", "line 3: [[/needle]] without [[needle]]");
    expect_error("[[needle]]a[[needle]]b[[/needle]][[/needle]]", "inside a needle");
    expect_error("x[[needle]][[/needle]]", "empty needle");
    expect_error("[[probe]]abc", "before the first token");
    expect_error("", "empty");
    expect_error("[{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"system\", "
                 "\"content\": \"x\"}]", "message 2");
    expect_error("[{\"role\": \"tool\", \"content\": \"hi\"}]", "role 'tool'");
    expect_error("[{\"role\": \"user\", \"content\": \"[[needle]]hi\"}, "
                 "{\"role\": \"assistant\", \"content\": \"x[[/needle]]\"}]",
                 "message 1: line 1: [[needle]] is never closed");
    expect_error("a[[decode]]b\n[[decode]]c", "line 2: a second [[decode]]");
    expect_error("[[needle]]a[[decode]]b[[/needle]]c", "[[decode]] inside a needle");
    expect_error("a[[decode]]b [[needle]]c[[/needle]]", "[[needle]] after [[decode]]");
    expect_error("[[decode]]abc", "nothing before [[decode]]");
    expect_error("abc[[decode]]", "nothing after [[decode]]");
    expect_error("abc[[decode]][[probe]]", "nothing after [[decode]]");
    expect_error("[{\"role\": \"user\", \"content\": \"[[decode]]hi\"}]",
                 "nothing before [[decode]]");
    expect_error("[{\"role\": \"user\", \"content\": \"a[[decode]]b\"}, "
                 "{\"role\": \"user\", \"content\": \"[[decode]]c\"}]",
                 "message 2: line 1: a second [[decode]]");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_text_needles_and_probes),
        cmocka_unit_test(test_bos_shifts_spans),
        cmocka_unit_test(test_chat_template_and_segments),
        cmocka_unit_test(test_decode_marker_splits_prompt_from_forced),
        cmocka_unit_test(test_decode_marker_in_chat),
        cmocka_unit_test(test_text_starting_with_bracket_is_plain),
        cmocka_unit_test(test_bad_markup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
