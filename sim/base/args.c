#include "sim/base/args.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Index of `value` in "a|b|c", or -1. */
static int choice_index(const char *choices, const char *value)
{
    size_t len = strlen(value);
    int index = 0;
    for (const char *p = choices; *p; index++) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && !strncmp(p, value, n))
            return index;
        if (!bar)
            break;
        p = bar + 1;
    }
    return -1;
}

static int set_value(const char *cmd, const ArgSpec *s, const char *value, KvErr *err)
{
    char *end = NULL;
    errno = 0;
    switch (s->kind) {
    case ARG_INT: {
        long v = strtol(value, &end, 10);
        if (end == value || *end || errno || v < s->min || v > s->max)
            return kv_fail(err, "%s: --%s: expected an integer in [%.0f, %.0f], found '%s'", cmd,
                           s->name, s->min, s->max, value);
        *(int *)s->out = (int)v;
        return 0;
    }
    case ARG_DOUBLE: {
        double v = strtod(value, &end);
        if (end == value || *end || errno || !isfinite(v) || v < s->min || v > s->max)
            return kv_fail(err, "%s: --%s: expected a number in [%g, %g], found '%s'", cmd,
                           s->name, s->min, s->max, value);
        *(double *)s->out = v;
        return 0;
    }
    case ARG_STRING:
        *(const char **)s->out = value;
        return 0;
    case ARG_CHOICE: {
        int i = choice_index(s->choices, value);
        if (i < 0)
            return kv_fail(err, "%s: --%s: expected one of %s, found '%s'", cmd, s->name,
                           s->choices, value);
        *(int *)s->out = i;
        return 0;
    }
    case ARG_STRINGS: {
        ArgStrings *list = s->out;
        if (list->n == ARG_STRINGS_MAX)
            return kv_fail(err, "%s: --%s: given more than %d times", cmd, s->name,
                           ARG_STRINGS_MAX);
        list->v[list->n++] = value;
        return 0;
    }
    case ARG_FLAG:
        break;
    }
    return kv_fail(err, "%s: --%s: unknown option kind", cmd, s->name);
}

int args_parse(int argc, char **argv, const ArgSpec *specs, const char **positional,
               int max_positional, int *n_positional, KvErr *err)
{
    const char *cmd = argv[0];
    *n_positional = 0;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return 1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (*n_positional >= max_positional)
                return kv_fail(err, "%s: unexpected argument '%s'", cmd, arg);
            positional[(*n_positional)++] = arg;
            continue;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        const ArgSpec *s = specs;
        while (s->name && !(strlen(s->name) == name_len && !strncmp(s->name, name, name_len)))
            s++;
        if (!s->name)
            return kv_fail(err, "%s: unknown option '--%.*s' (%s --help lists them)", cmd,
                           (int)name_len, name, cmd);
        const char *value = eq ? eq + 1 : NULL;
        if (s->kind == ARG_FLAG) {
            if (value)
                return kv_fail(err, "%s: --%s takes no value", cmd, s->name);
            *(int *)s->out = 1;
            continue;
        }
        if (!value) {
            if (i + 1 >= argc)
                return kv_fail(err, "%s: --%s: missing value", cmd, s->name);
            value = argv[++i];
        }
        if (set_value(cmd, s, value, err) < 0)
            return -1;
    }
    return 0;
}

void args_usage(FILE *out, const char *usage_line, const ArgSpec *specs)
{
    fprintf(out, "usage: kvsim %s\n", usage_line);
    if (specs->name)
        fprintf(out, "\noptions:\n");
    for (const ArgSpec *s = specs; s->name; s++) {
        char dflt[128] = "";
        switch (s->kind) {
        case ARG_INT: /* a value outside the range is a "not given" sentinel: no default */
            if (*(const int *)s->out >= s->min && *(const int *)s->out <= s->max)
                snprintf(dflt, sizeof dflt, "%d", *(const int *)s->out);
            break;
        case ARG_FLAG: snprintf(dflt, sizeof dflt, "%s", *(const int *)s->out ? "on" : "off"); break;
        case ARG_DOUBLE: snprintf(dflt, sizeof dflt, "%g", *(const double *)s->out); break;
        case ARG_STRING: {
            const char *v = *(const char *const *)s->out;
            snprintf(dflt, sizeof dflt, "%s", v ? v : "");
            break;
        }
        case ARG_CHOICE: {
            int idx = *(const int *)s->out;
            const char *p = s->choices;
            for (int k = 0; k < idx && strchr(p, '|'); k++)
                p = strchr(p, '|') + 1;
            const char *bar = strchr(p, '|');
            snprintf(dflt, sizeof dflt, "%.*s", (int)(bar ? (size_t)(bar - p) : strlen(p)), p);
            break;
        }
        case ARG_STRINGS: /* nothing by default */
            break;
        }
        if (dflt[0])
            fprintf(out, "  --%-14s %s (default %s)\n", s->name, s->help, dflt);
        else
            fprintf(out, "  --%-14s %s\n", s->name, s->help);
    }
}

int args_start(int argc, char **argv, const ArgSpec *specs, const char *usage_line,
               const char **positional, int n_positional_wanted)
{
    int n_positional;
    KvErr err;
    int parsed = args_parse(argc, argv, specs, positional, n_positional_wanted, &n_positional,
                            &err);
    if (parsed == 1) {
        args_usage(stdout, usage_line, specs);
        return 0;
    }
    if (parsed < 0) {
        fprintf(stderr, "kvsim: %s\n", err.msg);
        return 2;
    }
    if (n_positional != n_positional_wanted) {
        fprintf(stderr, "kvsim: %s: expected %d argument%s, found %d (kvsim %s --help)\n",
                argv[0], n_positional_wanted, n_positional_wanted == 1 ? "" : "s", n_positional,
                argv[0]);
        return 2;
    }
    return -1;
}
