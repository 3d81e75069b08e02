/* The registry of policy types, and the parameter parsing every policy shares.
 * A new policy is one file in policies/ defining `const PolicyType policy_NAME`, plus one line
 * POLICY(NAME) in policies/registry.def. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "policies/policy.h"

#define POLICY(name) extern const PolicyType policy_##name;
#include "policies/registry.def"
#undef POLICY

static const PolicyType *const registry[] = {
#define POLICY(name) &policy_##name,
#include "policies/registry.def"
#undef POLICY
};

const PolicyType *const *policy_types(int *count)
{
    *count = (int)(sizeof registry / sizeof registry[0]);
    return registry;
}

const PolicyType *policy_find(const char *name)
{
    int n;
    const PolicyType *const *all = policy_types(&n);
    for (int i = 0; i < n; i++)
        if (strcmp(all[i]->name, name) == 0)
            return all[i];
    return NULL;
}

static const ParamSpec *find_spec(const PolicyType *type, const char *key)
{
    for (const ParamSpec *s = type->params; s && s->key; s++)
        if (strcmp(s->key, key) == 0)
            return s;
    return NULL;
}

/* Index of `value` in "a|b|c", or -1. */
static int choice_index(const char *choices, const char *value)
{
    size_t vlen = strlen(value);
    int idx = 0;
    for (const char *p = choices; *p; idx++) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == vlen && strncmp(p, value, len) == 0)
            return idx;
        if (!bar)
            break;
        p = bar + 1;
    }
    return -1;
}

static int set_value(const ParamSpec *s, void *params, const char *value, KvErr *err)
{
    char *field = (char *)params + s->offset;
    char *end;
    switch (s->kind) {
    case PARAM_INT: {
        errno = 0;
        long v = strtol(value, &end, 10);
        if (errno || end == value || *end != '\0')
            return kv_fail(err, "%s = '%s': expected an integer", s->key, value);
        if ((double)v < s->min || (double)v > s->max)
            return kv_fail(err, "%s = %ld: expected an integer in [%.0f, %.0f]", s->key, v,
                           s->min, s->max);
        *(int *)field = (int)v;
        return 0;
    }
    case PARAM_DOUBLE: {
        errno = 0;
        double v = strtod(value, &end);
        if (errno || end == value || *end != '\0' || !isfinite(v))
            return kv_fail(err, "%s = '%s': expected a number", s->key, value);
        if (v < s->min || v > s->max)
            return kv_fail(err, "%s = %s: expected a number in [%g, %g]", s->key, value, s->min,
                           s->max);
        *(double *)field = v;
        return 0;
    }
    case PARAM_BOOL:
        if (!strcasecmp(value, "true") || !strcmp(value, "1") || !strcasecmp(value, "yes") ||
            !strcasecmp(value, "on"))
            *(bool *)field = true;
        else if (!strcasecmp(value, "false") || !strcmp(value, "0") || !strcasecmp(value, "no") ||
                 !strcasecmp(value, "off"))
            *(bool *)field = false;
        else
            return kv_fail(err, "%s = '%s': expected true or false", s->key, value);
        return 0;
    case PARAM_ENUM: {
        int idx = choice_index(s->choices, value);
        if (idx < 0)
            return kv_fail(err, "%s = '%s': expected one of %s", s->key, value, s->choices);
        *(int *)field = idx;
        return 0;
    }
    case PARAM_STRING:
        if (strlen(value) >= PARAM_STRING_MAX)
            return kv_fail(err, "%s: value longer than %d characters", s->key,
                           PARAM_STRING_MAX - 1);
        strcpy(field, value);
        return 0;
    }
    return kv_fail(err, "%s: unsupported parameter kind", s->key);
}

void policy_params_defaults(const PolicyType *type, void *params)
{
    memset(params, 0, type->params_size);
    for (const ParamSpec *s = type->params; s && s->key; s++) {
        KvErr err;
        if (set_value(s, params, s->dflt, &err) != 0) {
            /* A default that does not parse is a bug in the policy's table, not user input. */
            fprintf(stderr, "kvsim: policy %s: bad default: %s\n", type->name, err.msg);
            abort();
        }
    }
}

int policy_param_set(const PolicyType *type, void *params, const char *key, const char *value,
                     KvErr *err)
{
    const ParamSpec *s = find_spec(type, key);
    if (!s && type->set_extra)
        return type->set_extra(params, key, value, err);
    if (!s) {
        char known[1024] = "";
        for (const ParamSpec *p = type->params; p && p->key; p++) {
            if (known[0])
                strncat(known, ", ", sizeof known - strlen(known) - 1);
            strncat(known, p->key, sizeof known - strlen(known) - 1);
        }
        return kv_fail(err, "unknown key '%s' for policy type %s (known: %s)", key, type->name,
                       known[0] ? known : "none");
    }
    return set_value(s, params, value, err);
}
