/* wrap.c — the shared part of the budget-allocating wrappers (policies/wrap.h). */
#include "policies/wrap.h"

#include <stdlib.h>
#include <string.h>

#include "policies/rank.h"

/* The names of the policies that expose per-token scores, for messages. */
static void scorer_names(char *out, size_t size)
{
    int n;
    const PolicyType *const *all = policy_types(&n);
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (!all[i]->scorer)
            continue;
        if (out[0])
            strncat(out, ", ", size - strlen(out) - 1);
        strncat(out, all[i]->name, size - strlen(out) - 1);
    }
}

/* parse_only: the keys one at a time, not yet their combination (the inner's validate). */
static void *inner_params(const WrapParams *w, const PolicyType **type, bool parse_only,
                          KvErr *err)
{
    const PolicyType *t = w->inner[0] ? policy_find(w->inner) : NULL;
    if (!t || !t->scorer) {
        char names[512];
        scorer_names(names, sizeof names);
        if (!w->inner[0])
            kv_fail(err, "no inner = (expected one of the policies that expose per-token scores: "
                         "%s)", names);
        else
            kv_fail(err, "inner = '%s': expected one of the policies that expose per-token "
                         "scores (%s)", w->inner, names);
        return NULL;
    }
    void *prm = kv_malloc(t->params_size);
    policy_params_defaults(t, prm);
    for (const char *line = w->keys; *line;) {
        const char *eq = strchr(line, '='), *end = strchr(line, '\n');
        char key[128], value[PARAM_STRING_MAX];
        snprintf(key, sizeof key, "%.*s", (int)(eq - line), line);
        snprintf(value, sizeof value, "%.*s", (int)(end - eq - 1), eq + 1);
        KvErr inner_err;
        if (policy_param_set(t, prm, key, value, &inner_err) != 0) {
            kv_fail(err, "inner %s: %s", t->name, inner_err.msg);
            free(prm);
            return NULL;
        }
        line = end + 1;
    }
    if (!parse_only && t->validate && t->validate(prm, err) != 0) {
        free(prm);
        return NULL;
    }
    *type = t;
    return prm;
}

void *wrap_inner_params(const WrapParams *w, const PolicyType **type, KvErr *err)
{
    return inner_params(w, type, false, err);
}

int wrap_set_extra(void *params, const char *key, const char *value, KvErr *err)
{
    WrapParams *w = params;
    if (!key[0] || strchr(key, '=') || strchr(key, '\n') || strchr(value, '\n'))
        return kv_fail(err, "'%s': expected a key of the inner policy", key);
    /* A key given again (a [run] budget over the section's) replaces its earlier value. */
    size_t klen = strlen(key);
    char before[WRAP_KEYS_MAX]; /* restored when the key is rejected */
    memcpy(before, w->keys, sizeof before);
    for (char *line = w->keys; *line;) {
        char *end = strchr(line, '\n') + 1;
        if (strncmp(line, key, klen) == 0 && line[klen] == '=') {
            memmove(line, end, strlen(end) + 1);
            break;
        }
        line = end;
    }
    size_t used = strlen(w->keys), add = klen + strlen(value) + 2;
    if (used + add >= sizeof w->keys) {
        memcpy(w->keys, before, sizeof before);
        return kv_fail(err, "%s: the inner policy's parameters exceed %d characters", key,
                       WRAP_KEYS_MAX - 1);
    }
    snprintf(w->keys + used, sizeof w->keys - used, "%s=%s\n", key, value);
    if (!w->inner[0])
        return 0; /* checked once inner = is known (validate) */
    const PolicyType *t;
    void *prm = inner_params(w, &t, true, err);
    if (!prm) {
        memcpy(w->keys, before, sizeof before);
        return -1;
    }
    free(prm);
    return 0;
}

int wrap_validate(const void *params, KvErr *err)
{
    const PolicyType *t;
    void *prm = wrap_inner_params(params, &t, err);
    free(prm);
    return prm ? 0 : -1;
}

void wrap_frame(const WrapParams *w, int *budget, int *window, bool *grow)
{
    const PolicyType *t;
    KvErr err;
    void *prm = wrap_inner_params(w, &t, &err);
    if (!prm) { /* validated before: a bug, not input */
        fprintf(stderr, "kvsim: wrapper: %s\n", err.msg);
        abort();
    }
    t->scorer->frame(prm, budget, window, grow);
    free(prm);
}

Policy *wrap_create(const PolicyType *type, WrapAllocFn alloc, const void *params,
                    const LayerView *L, const PolicyEnv *env, KvErr *err)
{
    const WrapParams *prm = params;
    const PolicyType *inner_type;
    void *inner_prm = wrap_inner_params(prm, &inner_type, err);
    if (!inner_prm)
        return NULL;
    Policy *inner = inner_type->create(inner_prm, L, env, err);
    if (!inner) {
        free(inner_prm);
        return NULL;
    }
    Wrap *w = kv_calloc(1, sizeof *w);
    policy_base_init(&w->base, type, L);
    w->prm = *prm;
    w->alloc = alloc;
    w->inner = inner;
    w->scorer = inner_type->scorer;
    w->scorer->frame(inner_prm, &w->budget, &w->window, &w->grow);
    free(inner_prm);
    /* The driver computes for the wrapper what the inner's scores read. */
    w->base.want_prefill_mass = inner->want_prefill_mass;
    w->base.want_prefill_rows = inner->want_prefill_rows;
    w->layer = L->layer;
    w->n_layers = L->meta->n_layers;
    w->n_tokens = L->n_tokens;
    int H = L->n_kv_heads;
    w->cap = (long)H * (w->budget - 1);
    w->cand = kv_malloc((size_t)H * sizeof *w->cand);
    w->score = kv_malloc((size_t)H * sizeof *w->score);
    for (int g = 0; g < H; g++) {
        w->cand[g] = kv_malloc((size_t)L->n_tokens * sizeof **w->cand);
        w->score[g] = kv_malloc((size_t)L->n_tokens * sizeof **w->score);
    }
    w->n = kv_calloc((size_t)H, sizeof *w->n);
    w->keep = kv_calloc((size_t)H, sizeof *w->keep);
    w->scored = kv_calloc((size_t)H, sizeof *w->scored);
    return &w->base;
}

void wrap_scores(Wrap *w, const PrefillView *pv, int g)
{
    if (w->scored[g])
        return;
    w->scorer->score(w->inner, pv, g, w->cand[g], w->n[g], w->score[g]);
    w->scored[g] = true;
}

void wrap_prefill(Policy *p, const PrefillView *pv)
{
    Wrap *w = (Wrap *)p;
    int c1 = pv->chunk_end, H = p->n_kv_heads;
    for (int g = 0; g < H; g++)
        for (int j = pv->chunk_start; j < c1; j++)
            kvcache_add(&p->cache[g], j);
    if (!pv->last_chunk)
        return; /* compressed once, when the span is complete */
    int W = w->scorer->window_at(w->inner, pv);
    int prefix = c1 - W; /* positions before the window */
    w->tail_oldest = prefix;
    for (int g = 0; g < H; g++) {
        int n = kvcache_positions(&p->cache[g], w->cand[g]);
        while (n > 0 && w->cand[g][n - 1] >= prefix)
            n--;
        w->n[g] = n;
        w->scored[g] = false;
    }
    w->alloc(w, pv, W);
    for (int g = 0; g < H; g++) {
        if (w->keep[g] >= w->n[g])
            continue;
        KVCache *c = &p->cache[g];
        wrap_scores(w, pv, g);
        rank_keep_best(w->cand[g], w->n[g], w->keep[g], w->score[g]);
        kvcache_clear(c);
        for (int i = 0; i < w->keep[g]; i++)
            kvcache_add(c, w->cand[g][i]);
        for (int j = prefix; j < c1; j++)
            kvcache_add(c, j);
    }
}

void wrap_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

void wrap_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)attn;
    Wrap *w = (Wrap *)p;
    if (w->grow)
        return;
    long total = 0;
    for (int g = 0; g < p->n_kv_heads; g++)
        total += p->cache[g].n;
    /* The sliding part holds every position in [tail_oldest, t] in every head: evicting its
     * oldest keeps it contiguous, so the oldest is the next position. */
    while (total > w->cap && w->tail_oldest <= sv->t) {
        for (int g = 0; g < p->n_kv_heads; g++) {
            total -= kvcache_has(&p->cache[g], w->tail_oldest);
            kvcache_remove(&p->cache[g], w->tail_oldest);
        }
        w->tail_oldest++;
    }
}

void wrap_destroy(Policy *p)
{
    Wrap *w = (Wrap *)p;
    w->inner->type->destroy(w->inner);
    for (int g = 0; g < p->n_kv_heads; g++) {
        free(w->cand[g]);
        free(w->score[g]);
    }
    free(w->cand);
    free(w->score);
    free(w->n);
    free(w->keep);
    free(w->scored);
    policy_base_free(p);
    free(w);
}
