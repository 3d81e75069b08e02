/* press.c — the shared part of the key-scored kvpress presses (policies/press.h). */
#include "policies/press.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "policies/rank.h"

const ParamSpec press_params[] = {
    PRESS_PARAM_SPECS,
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

typedef struct {
    Policy base;
    PressParams prm;
    void *own;          /* the type's whole parameter struct (prm is its start) */
    PressScoreFn score;
    /* Oldest position of the sliding part (the same for every KV head): the start of the last
     * compressed span's window; the pinned tokens all lie before it. */
    int tail_oldest;
    double *score_at;    /* [T] scratch, by position */
    int32_t *candidates; /* [T] scratch */
} Press;

int press_validate(const void *params, KvErr *err)
{
    const PressParams *prm = params;
    if (prm->window >= prm->budget)
        return kv_fail(err,
                       "window = %d must be below budget = %d: the window and the new token "
                       "must fit in the budget",
                       prm->window, prm->budget);
    return 0;
}

Policy *press_create(const PolicyType *type, PressScoreFn score, const void *params,
                     const LayerView *L)
{
    Press *s = kv_calloc(1, sizeof *s);
    policy_base_init(&s->base, type, L);
    s->prm = *(const PressParams *)params;
    s->own = kv_malloc(type->params_size);
    memcpy(s->own, params, type->params_size);
    s->score = score;
    s->score_at = kv_malloc((size_t)L->n_tokens * sizeof *s->score_at);
    s->candidates = kv_malloc((size_t)L->n_tokens * sizeof *s->candidates);
    return &s->base;
}

/* The window of a compression: the span's last min(window, span length) positions. */
static int window_of(const Press *s, const PrefillView *pv)
{
    int span = pv->span_end - pv->span_start;
    return s->prm.window < span ? s->prm.window : span;
}

void press_prefill(Policy *p, const PrefillView *pv)
{
    Press *s = (Press *)p;
    int c1 = pv->chunk_end;
    for (int g = 0; g < p->n_kv_heads; g++)
        for (int j = pv->chunk_start; j < c1; j++)
            kvcache_add(&p->cache[g], j);
    if (!pv->last_chunk)
        return; /* compressed once, when the span is complete */
    int W = window_of(s, pv);
    int prefix = c1 - W; /* positions before the window */
    s->tail_oldest = prefix;
    int keep = s->prm.budget - 1 - W;
    for (int g = 0; g < p->n_kv_heads; g++) {
        KVCache *c = &p->cache[g];
        if (c->n <= s->prm.budget - 1)
            continue;
        int n = kvcache_positions(c, s->candidates);
        while (n > 0 && s->candidates[n - 1] >= prefix)
            n--;
        s->score(s->own, pv, g, s->candidates, n, s->score_at);
        rank_keep_best(s->candidates, n, keep, s->score_at);
        kvcache_clear(c);
        for (int i = 0; i < keep && i < n; i++)
            kvcache_add(c, s->candidates[i]);
        for (int j = prefix; j < c1; j++)
            kvcache_add(c, j);
    }
}

void press_step(Policy *p, const StepView *sv)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], sv->t);
}

void press_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)attn;
    Press *s = (Press *)p;
    if (s->prm.decode == PRESS_DECODE_GROW)
        return;
    /* The sliding part holds every position in [tail_oldest, t] (every KV head keeps as many
     * tokens): evicting its oldest keeps it contiguous, so the oldest is the next position. */
    while (p->cache[0].n > s->prm.budget - 1 && s->tail_oldest <= sv->t) {
        for (int g = 0; g < p->n_kv_heads; g++)
            kvcache_remove(&p->cache[g], s->tail_oldest);
        s->tail_oldest++;
    }
}

void press_destroy(Policy *p)
{
    Press *s = (Press *)p;
    free(s->own);
    free(s->score_at);
    free(s->candidates);
    policy_base_free(p);
    free(s);
}

long press_max_slots(const void *params, const LayerView *L, int t)
{
    const PressParams *prm = params;
    return prm->decode == PRESS_DECODE_GROW ? (long)prm->budget + t - L->n_prompt : prm->budget;
}

static void press_frame(const void *params, int *budget, int *window, bool *grow)
{
    const PressParams *prm = params;
    *budget = prm->budget;
    *window = prm->window;
    *grow = prm->decode == PRESS_DECODE_GROW;
}

static int press_window_at(const Policy *p, const PrefillView *pv)
{
    return window_of((const Press *)p, pv);
}

static void press_score(Policy *p, const PrefillView *pv, int g, const int32_t *cand, int n,
                        double *score_at)
{
    Press *s = (Press *)p;
    s->score(s->own, pv, g, cand, n, score_at);
}

const PolicyScorer press_scorer = {
    .frame = press_frame,
    .window_at = press_window_at,
    .score = press_score,
};
