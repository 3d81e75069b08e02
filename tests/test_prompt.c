/* Prompt markup: the chat template, segments, needle spans and probes, with a byte-per-token
 * encoder so that every expected span can be counted by hand from the text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "traces/model/prompt.h"

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
    /* A conversation: the first prefill ends at the assistant's header, its content is forced,
     * the separator opens the next prefill span, and the marker forces the whole last turn. */
    int a = 1 + (int)strlen("User: Key: XY\n\nAssistant:"), b = a + (int)strlen(" Noted.");
    const PromptSpan want[] = {{PROMPT_PREFILL, 0, a}, {PROMPT_FORCED, a, b},
                               {PROMPT_PREFILL, b, 1 + (int)strlen(before)},
                               {PROMPT_FORCED, 1 + (int)strlen(before), t.n_tokens}};
    assert_int_equal(t.n_spans, 4);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(t.spans[i].kind, want[i].kind);
        assert_int_equal(t.spans[i].start, want[i].start);
        assert_int_equal(t.spans[i].end, want[i].end);
    }
    assert_int_equal(t.n_prompt, a);
    /* The forced tokens belong to the last turn. */
    for (int i = 1 + (int)strlen(before); i < t.n_tokens; i++)
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

/* The spans equal `want` (n of them). */
static void assert_spans(const PromptTokens *t, const PromptSpan *want, int n)
{
    assert_int_equal(t->n_spans, n);
    for (int i = 0; i < n; i++) {
        assert_int_equal(t->spans[i].kind, want[i].kind);
        assert_int_equal(t->spans[i].start, want[i].start);
        assert_int_equal(t->spans[i].end, want[i].end);
    }
    assert_int_equal(t->n_prompt, want[0].end);
}

/* A conversation: each user message a prefill span on top of the cache, [[generate]] a
 * generation point after the assistant's header, other assistant content forced; every token
 * in its turn, the needle in its own. */
static void test_conversation_spans_and_turns(void **state)
{
    (void)state;
    const char *chat =
        "[{\"role\": \"system\", \"content\": \"Sys.\"},\n"
        " {\"role\": \"user\", \"content\": \"Doc [[needle]]N1[[/needle]].\"},\n"
        " {\"role\": \"assistant\", \"content\": \"[[generate]]\"},\n"
        " {\"role\": \"user\", \"content\": \"Q?[[probe]]\"},\n"
        " {\"role\": \"assistant\", \"content\": \"Ans.\"},\n"
        " {\"role\": \"user\", \"content\": \"More.\"}]";
    PromptMarkup m;
    PromptTokens t;
    tokenize(chat, 0, &m, &t);
    const char *s0 = "System: Sys.\n\n", *s1 = "User: Doc N1.\n\nAssistant:",
               *s2 = "\n\nUser: Q?\n\nAssistant:", *s3 = " Ans.", *s4 = "\n\n",
               *s5 = "User: More.\n\nAssistant:";
    char expected[512];
    snprintf(expected, sizeof expected, "%s%s%s%s%s%s", s0, s1, s2, s3, s4, s5);
    assert_text(&t, 1, expected);
    int a = 1 + (int)(strlen(s0) + strlen(s1)), b = a + (int)strlen(s2), c = b + (int)strlen(s3);
    const PromptSpan want[] = {{PROMPT_PREFILL, 0, a}, {PROMPT_GENERATE, a, a},
                               {PROMPT_PREFILL, a, b}, {PROMPT_FORCED, b, c},
                               {PROMPT_PREFILL, c, t.n_tokens}};
    assert_spans(&t, want, 5);
    int first2 = a + 2, first3 = c + 2; /* "\n\n" closes the previous turn */
    for (int i = 0; i < t.n_tokens; i++)
        assert_int_equal(t.segments[i], i < 1 + (int)strlen(s0) ? 0 : i < first2 ? 1
                                        : i < first3 ? 2 : 3);
    assert_int_equal(m.last_segment, 3);
    assert_int_equal(t.n_needles, 1);
    assert_int_equal(t.needles[0], 1 + (int)strlen(s0) + (int)strlen("User: Doc "));
    assert_int_equal(t.needles[1], t.needles[0] + 2);
    assert_int_equal(t.n_probes, 1);
    assert_int_equal(t.probes[0], a + (int)strlen("\n\nUser: Q?") - 1);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);

    /* A last [[generate]] is the final generation: no span for it. */
    tokenize("[{\"role\": \"user\", \"content\": \"Hi\"}, "
             "{\"role\": \"assistant\", \"content\": \"[[generate]]\"}]", -1, &m, &t);
    assert_text(&t, 0, "User: Hi\n\nAssistant:");
    assert_spans(&t, (const PromptSpan[]){{PROMPT_PREFILL, 0, t.n_tokens}}, 1);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

/* Plain text: [[generate]] ends a turn, the text after it is the next turn's prefill span;
 * [[decode]]'s forced text ends with its turn; a final newline is no further turn. */
static void test_plain_text_turns(void **state)
{
    (void)state;
    PromptMarkup m;
    PromptTokens t;
    tokenize("Doc A. Q1?[[generate]] Doc [[needle]]B[[/needle]].[[decode]] Q2?[[generate]]\n",
             -1, &m, &t);
    assert_false(m.is_chat);
    assert_text(&t, 0, "Doc A. Q1? Doc B. Q2?");
    int a = (int)strlen("Doc A. Q1?"), b = a + (int)strlen(" Doc B.");
    const PromptSpan want[] = {{PROMPT_PREFILL, 0, a}, {PROMPT_GENERATE, a, a},
                               {PROMPT_PREFILL, a, b}, {PROMPT_FORCED, b, t.n_tokens}};
    assert_spans(&t, want, 4);
    for (int i = 0; i < t.n_tokens; i++)
        assert_int_equal(t.segments[i], i < a ? 1 : 2);
    assert_int_equal(m.last_segment, 2);
    assert_int_equal(t.n_needles, 1); /* in turn 2, after the first generation */
    assert_int_equal(t.needles[0], a + 5);
    assert_int_equal(t.needles[1], a + 6);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);

    /* [[decode]] once in each turn: each turn's question is fed through the cache. */
    tokenize("Doc A.[[decode]] Q1?[[generate]] Doc B.[[decode]] Q2?", -1, &m, &t);
    assert_text(&t, 0, "Doc A. Q1? Doc B. Q2?");
    int d1 = (int)strlen("Doc A."), g1 = (int)strlen("Doc A. Q1?");
    int d2 = g1 + (int)strlen(" Doc B.");
    const PromptSpan twice[] = {{PROMPT_PREFILL, 0, d1},  {PROMPT_FORCED, d1, g1},
                                {PROMPT_GENERATE, g1, g1}, {PROMPT_PREFILL, g1, d2},
                                {PROMPT_FORCED, d2, t.n_tokens}};
    assert_spans(&t, twice, 5);
    assert_int_equal(t.n_prompt, d1);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);

    /* One turn: one prefill span, then [[decode]]'s forced run, as before turns existed. */
    tokenize("Pin 42.[[decode]] Pin?", 0, &m, &t);
    assert_spans(&t, (const PromptSpan[]){{PROMPT_PREFILL, 0, 8}, {PROMPT_FORCED, 8, 13}}, 2);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    tokenize("[{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"U\"}]",
             0, &m, &t);
    assert_spans(&t, (const PromptSpan[]){{PROMPT_PREFILL, 0, t.n_tokens}}, 1);
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
                 "{\"role\": \"assistant\", \"content\": \"[[decode]]c\"}]",
                 "message 2: line 1: a second [[decode]] in one turn");
    expect_error("x[[decode]]a[[generate]]b[[decode]]c[[decode]]d", "a second [[decode]] in one turn");
    /* Conversations (issue 12): each error names the message. */
    expect_error("[{\"role\": \"system\", \"content\": \"a\"}, "
                 "{\"role\": \"system\", \"content\": \"b\"}]",
                 "message 2: only the first message may be 'system'");
    expect_error("[{\"role\": \"user\", \"content\": \"\"}]", "message 1: an empty turn");
    expect_error("[{\"role\": \"user\", \"content\": \"a\"}, "
                 "{\"role\": \"assistant\", \"content\": \" [[probe]]\"}]",
                 "message 2: an empty turn");
    expect_error("[{\"role\": \"user\", \"content\": \"a\"}, "
                 "{\"role\": \"user\", \"content\": \"b [[generate]]\"}]",
                 "message 2: [[generate]] in a user message");
    expect_error("[{\"role\": \"system\", \"content\": \"[[generate]]\"}]",
                 "message 1: [[generate]] in a system message");
    expect_error("[{\"role\": \"user\", \"content\": \"a\"}, "
                 "{\"role\": \"assistant\", \"content\": \"b [[generate]]\"}]",
                 "message 2: [[generate]] with other text");
    expect_error("[{\"role\": \"user\", \"content\": \"a [[needle]]b\"}, "
                 "{\"role\": \"user\", \"content\": \"c[[/needle]]\"}]",
                 "message 1: line 1: [[needle]] is never closed");
    expect_error("a[[generate]] \n [[generate]]b", "line 2: an empty turn before [[generate]]");
    expect_error("[[generate]]a", "line 1: an empty turn before [[generate]]");
    expect_error("[[needle]]a[[generate]]b[[/needle]]", "line 1: [[generate]] inside a needle");
}

/* ---------------------------------------------------------------- hostile input (issue 10) */

/* A committed input of tests/inputs/prompt/ (static storage). */
static const char *input_path(const char *name)
{
    static char path[512];
    const char *root = getenv("KVSIM_SOURCE_DIR");
    if (root && *root) {
        snprintf(path, sizeof path, "%s/tests/inputs/prompt/%s", root, name);
    } else { /* run by hand: next to this source file */
        const char *slash = strrchr(__FILE__, '/');
        int dir = slash ? (int)(slash - __FILE__) : 1;
        snprintf(path, sizeof path, "%.*s/inputs/prompt/%s", dir, slash ? __FILE__ : ".", name);
    }
    return path;
}

/* Parses and tokenizes a committed prompt file (origin: its path); the error must name the file,
 * contain `fragment` and be one line. */
static void expect_file_error(const char *name, int bos, const char *fragment)
{
    const char *path = input_path(name);
    KvErr err = {{0}};
    size_t len;
    char *text = kv_read_input(path, 0, &len, &err);
    if (!text)
        fail_msg("%s", err.msg);
    PromptMarkup m;
    PromptTokens t;
    int rc = prompt_parse(path, text, len, &m, &err);
    if (rc == 0) {
        rc = prompt_tokenize(path, &m, byte_encode, NULL, bos, &t, &err);
        prompt_markup_free(&m);
        if (rc == 0) {
            prompt_tokens_free(&t);
            fail_msg("accepted: %s", path);
        }
    }
    free(text);
    if (!strstr(err.msg, fragment) || !strstr(err.msg, path) || strchr(err.msg, '\n'))
        fail_msg("error '%s' does not name %s and say '%s'", err.msg, path, fragment);
}

/* \u0000 in a message used to end the message there, needle and all; a raw NUL byte too. */
static void test_nul_in_chat_rejected(void **state)
{
    (void)state;
    expect_file_error("nul_in_chat.json", 0,
                      "message 2: line 2, byte 99: \\u0000 in a string (NUL characters are not "
                      "allowed in a prompt)");
    static const char raw[] = "[{\"role\": \"user\", \"content\": \"a\0b\"}]";
    PromptMarkup m;
    KvErr err = {{0}};
    assert_int_equal(prompt_parse("p.txt", raw, sizeof raw - 1, &m, &err), -1);
    assert_non_null(strstr(err.msg, "p.txt: message 1: line 1, byte 31: NUL byte"));
    /* An escaped backslash before "u0000" is no NUL. */
    PromptTokens t;
    tokenize("[{\"role\": \"user\", \"content\": \"a\\\\u0000\"}]", -1, &m, &t);
    assert_text(&t, 0, "User: a\\u0000\n\nAssistant:");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

/* Plain text carries its length: a NUL byte in it is one more character, not the end. */
static void test_nul_in_plain_text_kept(void **state)
{
    (void)state;
    static const char raw[] = "a\0[[needle]]b\0c[[/needle]]";
    PromptMarkup m;
    PromptTokens t;
    KvErr err = {{0}};
    assert_int_equal(prompt_parse("p.txt", raw, sizeof raw - 1, &m, &err), 0);
    assert_int_equal(prompt_tokenize("p.txt", &m, byte_encode, NULL, -1, &t, &err), 0);
    static const int32_t want[] = {'a' + 1, 1, 'b' + 1, 1, 'c' + 1};
    assert_int_equal(t.n_tokens, 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(t.tokens[i], want[i]);
    assert_int_equal(t.n_needles, 1);
    assert_int_equal(t.needles[0], 2);
    assert_int_equal(t.needles[1], 5);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

/* Encodes every text to nothing. */
static int null_encode(void *ctx, const char *text, size_t len, int32_t **ids, int *n, KvErr *err)
{
    (void)ctx, (void)text, (void)len, (void)err;
    *ids = kv_malloc(sizeof **ids);
    *n = 0;
    return 0;
}

/* An empty file used to give a prompt of BOS alone, and exit 0. */
static void test_empty_prompt_rejected(void **state)
{
    (void)state;
    expect_file_error("empty.txt", 0, "the prompt file is empty");
    expect_file_error("empty.txt", -1, "the prompt file is empty");
    /* Text that encodes to nothing leaves BOS alone: still empty. */
    PromptMarkup m;
    PromptTokens t;
    KvErr err = {{0}};
    assert_int_equal(prompt_parse("p.txt", " ", 1, &m, &err), 0);
    assert_int_equal(prompt_tokenize("p.txt", &m, null_encode, NULL, 7, &t, &err), -1);
    assert_non_null(strstr(err.msg, "p.txt: the prompt is empty (its text encodes to no tokens "
                               "besides BOS)"));
    prompt_markup_free(&m);
    /* Markers alone: a probe at BOS, then nothing. */
    assert_int_equal(prompt_parse("p.txt", "[[probe]]", 9, &m, &err), 0);
    assert_int_equal(prompt_tokenize("p.txt", &m, byte_encode, NULL, 0, &t, &err), -1);
    assert_non_null(strstr(err.msg, "the prompt is empty"));
    prompt_markup_free(&m);
}

/* A file that starts like a chat and is not valid JSON used to be tokenized as plain text,
 * JSON syntax and all. */
static void test_broken_chat_rejected(void **state)
{
    (void)state;
    expect_file_error("broken_chat.json", 0, "line 3, byte 111: not valid JSON (a file that starts "
                                             "with '[' as this one does is read as a JSON chat)");
    expect_file_error("trailing_chat.json", 0,
                      "line 2, byte 72: text after the end of the JSON chat");
    expect_file_error("object_chat.json", 0, "a JSON object (expected a chat: a JSON array of");
    expect_error("  [ ]", "the chat has no messages");
    expect_error("\n[\n", "line 2, byte 2: not valid JSON");
    expect_error("{\"messages\": []}", "a JSON object");
    expect_error("{", "not valid JSON");
    expect_error("[{\"role\": \"user\", \"content\": \"hi\"}] [", "text after the end");
    expect_error("[{\"role\": \"user\", \"content\": \"a\", \"content\": \"b\"}]",
                 "message 1: 'content' appears twice");
    /* A JSON array is a chat, even one that does not look like one. */
    expect_error("[\"hi\"]", "message 1 needs string 'role' and 'content'");
    /* Echoed content is escaped: the message stays on one line. */
    expect_error("[{\"role\": \"us\\ner\", \"content\": \"hi\"}]", "role 'us\\ner'");
}

/* A chat saved with a UTF-8 byte-order mark is still a chat (it used to become plain text). */
static void test_chat_after_byte_order_mark(void **state)
{
    (void)state;
    PromptMarkup m;
    PromptTokens t;
    tokenize("\xEF\xBB\xBF [{\"role\": \"user\", \"content\": \"hi\"}]", -1, &m, &t);
    assert_true(m.is_chat);
    assert_text(&t, 0, "User: hi\n\nAssistant:");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    expect_error("\xEF\xBB\xBF[{\"role\": \"user\"} x", "line 1, byte 21: not valid JSON");
    /* In plain text it is a character like any other. */
    tokenize("\xEF\xBB\xBFhi", -1, &m, &t);
    assert_false(m.is_chat);
    assert_text(&t, 0, "\xEF\xBB\xBFhi");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
}

/* Text that merely opens with a bracket stays plain text. */
static void test_bracketed_plain_text_kept(void **state)
{
    (void)state;
    static const char *const texts[] = {"[INST] hi [/INST]", "[1] a [2] b", "{{name}} hi",
                                        "{name}", "[x", "  [[needle]]a[[/needle]] b"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        PromptMarkup m;
        PromptTokens t;
        tokenize(texts[i], -1, &m, &t);
        assert_false(m.is_chat);
        prompt_tokens_free(&t);
        prompt_markup_free(&m);
    }
}

/* Invalid UTF-8 used to be reported against tokenizer.json; it is the prompt's. */
static void test_invalid_utf8_named(void **state)
{
    (void)state;
    expect_file_error("latin1.txt", 0, "line 2, byte 42: not valid UTF-8");
    expect_error("ok\n\xC3(", "p.txt: line 2, byte 3: not valid UTF-8");
    expect_error("[{\"role\": \"user\", \"content\": \"caf\xE9\"}]", "line 1, byte 33: not valid UTF-8");
    expect_error("\xED\xA0\x80", "byte 0: not valid UTF-8"); /* a surrogate */
}

/* [[group=NAME]]: the file's group, removed with its line break, the text around it one piece;
 * in a chat's message as in plain text; malformed, repeated or inside a needle: an error. */
static void test_group_marker(void **state)
{
    (void)state;
    PromptMarkup m;
    PromptTokens t;
    tokenize("[[group=len-2k]]\nThe code is 4711.", -1, &m, &t);
    assert_string_equal(m.group, "len-2k");
    assert_text(&t, 0, "The code is 4711.");
    assert_int_equal(m.n_pieces, 1);
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    tokenize("The code[[group=a.b+c_d]] is 4711.", -1, &m, &t);
    assert_string_equal(m.group, "a.b+c_d");
    assert_text(&t, 0, "The code is 4711.");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    tokenize("[{\"role\": \"user\", \"content\": \"[[group=chat]]\\nhi\"}]", -1, &m, &t);
    assert_true(m.is_chat);
    assert_string_equal(m.group, "chat");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    tokenize("no group", -1, &m, &t);
    assert_string_equal(m.group, "");
    prompt_tokens_free(&t);
    prompt_markup_free(&m);
    static const char *const bad[][2] = {
        {"[[group=]] x", "line 1: malformed [[group=NAME]]"},
        {"[[group=a b]] x", "malformed [[group=NAME]]"},
        {"[[group=a]]\n[[group=b]] x", "line 2: a second [[group=...]]"},
        {"[[needle]]x[[group=a]][[/needle]]", "[[group=...]] inside a needle"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        KvErr err = {{0}};
        assert_int_equal(prompt_parse("p.txt", bad[i][0], strlen(bad[i][0]), &m, &err), -1);
        if (!strstr(err.msg, bad[i][1]))
            fail_msg("'%s': '%s' does not mention '%s'", bad[i][0], err.msg, bad[i][1]);
        prompt_markup_free(&m);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_text_needles_and_probes),
        cmocka_unit_test(test_bos_shifts_spans),
        cmocka_unit_test(test_chat_template_and_segments),
        cmocka_unit_test(test_conversation_spans_and_turns),
        cmocka_unit_test(test_plain_text_turns),
        cmocka_unit_test(test_decode_marker_splits_prompt_from_forced),
        cmocka_unit_test(test_decode_marker_in_chat),
        cmocka_unit_test(test_text_starting_with_bracket_is_plain),
        cmocka_unit_test(test_bad_markup),
        cmocka_unit_test(test_nul_in_chat_rejected),
        cmocka_unit_test(test_nul_in_plain_text_kept),
        cmocka_unit_test(test_empty_prompt_rejected),
        cmocka_unit_test(test_broken_chat_rejected),
        cmocka_unit_test(test_bracketed_plain_text_kept),
        cmocka_unit_test(test_chat_after_byte_order_mark),
        cmocka_unit_test(test_invalid_utf8_named),
        cmocka_unit_test(test_group_marker),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
