/* The embedded default: the committed model (models/tiny-retrieval) answers the committed
 * default prompt (traces/prompts/default.txt) from its needle. With the full cache `kvsim eval`
 * finds the expected answer; a sliding window of 256 tokens, which dropped the fact (some 3600
 * tokens before the question) long before the question arrives, does not; oracle_topk with the
 * same budget, which keeps the tokens the current query attends to most, answers again. So the
 * answer comes from a fact far back in the cache, not from the question's wording, and what a
 * policy evicts decides it: what makes `make run` a comparison of policies rather than noise. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/support/scratch.h"

typedef struct {
    char model[4096];
    char prompt[4096];
    char answer[4096];
    char *work;
} Env;

static int setup(void **state)
{
    static Env env;
    const char *src = getenv("KVSIM_SOURCE_DIR");
    assert_non_null(src);
    snprintf(env.model, sizeof env.model, "%s/models/tiny-retrieval", src);
    snprintf(env.prompt, sizeof env.prompt, "%s/traces/prompts/default.txt", src);
    snprintf(env.answer, sizeof env.answer, "%s/traces/prompts/default.answer", src);
    env.work = scratch_create();
    *state = &env;
    return 0;
}

static int teardown(void **state)
{
    Env *env = *state;
    scratch_remove(env->work);
    return 0;
}

static void copy_file(const char *from, const char *to)
{
    char *text = scratch_read(from);
    assert_true(text[0] != '\0');
    FILE *fp = fopen(to, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
    free(text);
}

/* Field `field` (0-based) of the row of `label` in a CSV. */
static void csv_field(const char *csv, const char *label, int field, char *out, size_t cap)
{
    size_t len = strlen(label);
    const char *line = csv;
    while (line && !(strncmp(line, label, len) == 0 && line[len] == ','))
        line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL;
    assert_non_null(line);
    for (int i = 0; i < field; i++) {
        line = strchr(line, ',');
        assert_non_null(line);
        line++;
    }
    size_t k = strcspn(line, ",\n");
    assert_true(k < cap);
    memcpy(out, line, k);
    out[k] = '\0';
}

static void test_answers_from_the_needle(void **state)
{
    Env *env = *state;
    copy_file(env->prompt, scratch_path(env->work, "default.txt", 0));
    copy_file(env->answer, scratch_path(env->work, "default.answer", 0));
    FILE *fp = fopen(scratch_path(env->work, "eval.ini", 0), "w");
    assert_non_null(fp);
    fputs("[run]\nthreads = 1\n"
          "[policy.full]\ntype = full\n"
          "[policy.window]\ntype = window\nwindow = 252\nsinks = 4\n"
          "[policy.oracle]\ntype = oracle_topk\nbudget = 256\n",
          fp);
    fclose(fp);
    char args[16384];
    snprintf(args, sizeof args, "eval %s --model %s --prompts %s --out %s --quiet",
             scratch_path(env->work, "eval.ini", 0), env->model, env->work, env->work);
    KvsimRun r = run_kvsim(args);
    if (r.status != 0)
        fprintf(stderr, "%s", r.err);
    assert_int_equal(r.status, 0);
    kvsim_run_free(&r);
    char *csv = scratch_read(scratch_path(env->work, "eval.csv", 1));
    char correct[64];
    csv_field(csv, "full", 4, correct, sizeof correct);
    assert_string_equal(correct, "1");
    csv_field(csv, "window", 4, correct, sizeof correct);
    assert_string_equal(correct, "0");
    csv_field(csv, "oracle", 4, correct, sizeof correct);
    assert_string_equal(correct, "1");
    free(csv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_answers_from_the_needle),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
