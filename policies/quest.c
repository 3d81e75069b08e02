/* quest — Quest (query-aware sparsity): every token stays on the host tier, in pages of `page`
 * consecutive positions with, per KV head, the per-channel minimum and maximum of the page's
 * keys; each query loads the pages whose upper bound on q·k is highest.
 *
 * Page bound for query head h: U_h(pg) = sum_c max(q_c * min_c(pg), q_c * max_c(pg)) >= q·k for
 * every key k of the page. A KV head's cache serves its group, so a page's score is the sum of
 * the group's bounds. At query t the page holding t (the current page, partial) is always loaded,
 * and of the complete pages that overlap the layer's attended range the best
 * floor(budget / page) - 1 by score (ties: the later page), or all of them when they fit; so the
 * cache never holds more than budget tokens. A page's minimum and maximum are computed once it is
 * complete. The cache is rebuilt at every step for query t, and after a prefill chunk for query
 * chunk_end - 1. Layers below `dense_layers` load every page. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "policies/policy.h"
#include "policies/rank.h"
#include "sim/base/attention.h"

extern const PolicyType policy_quest;

typedef struct {
    int budget;
    int page;
    int dense_layers;
} QuestParams;

typedef struct {
    Policy base;
    QuestParams prm;
    int group, head_dim, kv_bits, n_tokens;
    bool dense;
    int n_meta;          /* complete pages whose minimum and maximum are computed */
    float *kmin, *kmax;  /* [n_kv_heads][pages][head_dim] */
    double *page_score;  /* [pages] scratch, by page index */
    int32_t *candidates; /* [pages] scratch */
    int32_t *wanted;     /* [T] the selection stamp of each position */
    int32_t stamp;
    /* This call's traffic, for memory(). */
    int n_host;          /* tokens on the host tier (every KV head holds each) */
    int entered_host;    /* tokens written to the host tier by this call */
    double fetched;      /* (token, KV head) entries loaded from the host tier by this call */
} Quest;

static const ParamSpec quest_params[] = {
    {"budget", PARAM_INT, offsetof(QuestParams, budget), "512", 1, 1 << 30, NULL,
     "tokens per KV head at attention time: floor(budget / page) pages, the current one included"},
    {"page", PARAM_INT, offsetof(QuestParams, page), "16", 1, 1 << 20, NULL,
     "tokens per page (Quest's page_size / chunk_size)"},
    {"dense_layers", PARAM_INT, offsetof(QuestParams, dense_layers), "0", 0, 1 << 20, NULL,
     "first layers that load every page (Quest runs with 2)"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int quest_validate(const void *params, KvErr *err)
{
    const QuestParams *prm = params;
    if (prm->budget < prm->page)
        return kv_fail(err,
                       "budget = %d is below page = %d: the current page must fit in the budget",
                       prm->budget, prm->page);
    return 0;
}

static Policy *quest_create(const void *params, const LayerView *L, const PolicyEnv *env,
                            KvErr *err)
{
    (void)err; /* cannot fail */
    Quest *q = kv_calloc(1, sizeof *q);
    policy_base_init(&q->base, &policy_quest, L);
    q->prm = *(const QuestParams *)params;
    q->group = L->group;
    q->head_dim = L->head_dim;
    q->kv_bits = env->kv_bits;
    q->n_tokens = L->n_tokens;
    q->dense = L->layer < q->prm.dense_layers;
    int pages = (L->n_tokens + q->prm.page - 1) / q->prm.page;
    size_t meta = (size_t)L->n_kv_heads * pages * L->head_dim;
    q->kmin = kv_malloc(meta * sizeof *q->kmin);
    q->kmax = kv_malloc(meta * sizeof *q->kmax);
    q->page_score = kv_malloc((size_t)pages * sizeof *q->page_score);
    q->candidates = kv_malloc((size_t)pages * sizeof *q->candidates);
    q->wanted = kv_malloc((size_t)L->n_tokens * sizeof *q->wanted);
    for (int j = 0; j < L->n_tokens; j++)
        q->wanted[j] = -1;
    return &q->base;
}

/* Computes the minimum and maximum of every page complete at position t. */
static void update_meta(Quest *q, const LayerView *L, int t)
{
    int D = q->head_dim, page = q->prm.page, pages = (q->n_tokens + page - 1) / page;
    for (; q->n_meta < (t + 1) / page; q->n_meta++) {
        int pg = q->n_meta;
        for (int g = 0; g < q->base.n_kv_heads; g++) {
            float *mn = q->kmin + ((size_t)g * pages + pg) * D;
            float *mx = q->kmax + ((size_t)g * pages + pg) * D;
            for (int j = pg * page; j < (pg + 1) * page; j++) {
                const float *k = L->k + ((size_t)g * q->n_tokens + j) * D;
                for (int d = 0; d < D; d++) {
                    mn[d] = j == pg * page || k[d] < mn[d] ? k[d] : mn[d];
                    mx[d] = j == pg * page || k[d] > mx[d] ? k[d] : mx[d];
                }
            }
        }
    }
}

/* Makes KV head g's cache the pages query t loads; positions from `arrived` on came with this
 * call (they are produced on the device, not fetched). */
static void select_pages(Quest *q, const LayerView *L, int g, int t, int arrived)
{
    KVCache *c = &q->base.cache[g];
    int D = q->head_dim, page = q->prm.page, pages = (q->n_tokens + page - 1) / page;
    int current = t / page, first = attn_first_key(L->window, t) / page;
    int n = 0;
    for (int pg = first; pg < current; pg++)
        q->candidates[n++] = pg;
    int room = q->dense ? n : q->prm.budget / page - 1;
    if (n > room) {
        for (int i = 0; i < n; i++) {
            int pg = q->candidates[i];
            const float *mn = q->kmin + ((size_t)g * pages + pg) * D;
            const float *mx = q->kmax + ((size_t)g * pages + pg) * D;
            double bound = 0;
            for (int h = g * q->group; h < (g + 1) * q->group; h++) {
                const float *qv = L->q + ((size_t)h * q->n_tokens + t) * D;
                for (int d = 0; d < D; d++)
                    bound += fmax((double)qv[d] * mn[d], (double)qv[d] * mx[d]);
            }
            q->page_score[pg] = bound;
        }
        rank_keep_best(q->candidates, n, room, q->page_score);
        n = room;
    }
    q->candidates[n++] = current;
    int32_t stamp = q->stamp++;
    for (int i = 0; i < n; i++) {
        int pg = q->candidates[i];
        int end = (pg + 1) * page < t + 1 ? (pg + 1) * page : t + 1;
        for (int j = pg * page; j < end; j++) {
            q->wanted[j] = stamp;
            if (!kvcache_has(c, j)) {
                kvcache_add(c, j);
                q->fetched += j < arrived;
            }
        }
    }
    for (int s = c->n - 1; s >= 0; s--)
        if (q->wanted[c->pos[s]] != stamp)
            kvcache_remove_slot(c, s);
}

static void load_for(Quest *q, const LayerView *L, int t, int arrived)
{
    q->entered_host = t + 1 - arrived;
    q->n_host = t + 1;
    q->fetched = 0;
    update_meta(q, L, t);
    for (int g = 0; g < q->base.n_kv_heads; g++)
        select_pages(q, L, g, t, arrived);
}

static void quest_prefill(Policy *p, const PrefillView *pv)
{
    load_for((Quest *)p, pv->L, pv->chunk_end - 1, pv->chunk_start);
}

static void quest_step(Policy *p, const StepView *sv)
{
    load_for((Quest *)p, sv->L, sv->t, sv->t);
}

static void quest_memory(const Policy *p, MemReport *m)
{
    const Quest *q = (const Quest *)p;
    int H = p->n_kv_heads, D = q->head_dim, bits = q->kv_bits;
    double live = 0;
    for (int g = 0; g < H; g++)
        live += p->cache[g].n;
    m->device_bytes = kv_entry_bytes(live, D, bits);
    /* The pages' minima and maxima stay on the device: 2 * head_dim values per page and KV
     * head, the size of one token's K and V. */
    m->allocated_bytes = m->device_bytes + kv_entry_bytes((double)H * q->n_meta, D, bits);
    m->host_bytes = kv_entry_bytes((double)H * q->n_host, D, bits);
    m->to_host_bytes = kv_entry_bytes((double)H * q->entered_host, D, bits);
    m->fetched_tokens = q->fetched;
    m->to_device_bytes = kv_entry_bytes(q->fetched, D, bits);
}

static void quest_destroy(Policy *p)
{
    Quest *q = (Quest *)p;
    free(q->kmin);
    free(q->kmax);
    free(q->page_score);
    free(q->candidates);
    free(q->wanted);
    policy_base_free(p);
    free(q);
}

static long quest_max_slots(const void *params, const LayerView *L, int t)
{
    const QuestParams *prm = params;
    if (L->layer < prm->dense_layers)
        return (long)t + 1;
    return (long)(prm->budget / prm->page) * prm->page;
}

static const char *const quest_conformance[] = {
    "budget=32 page=4",
    "budget=30 page=7 dense_layers=1",
    NULL,
};

const PolicyType policy_quest = {
    .name = "quest",
    .description = "all tokens on the host in pages; each query loads the pages of highest "
                   "q.k upper bound (per-channel key min and max)",
    .params_size = sizeof(QuestParams),
    .params = quest_params,
    .validate = quest_validate,
    .create = quest_create,
    .prefill = quest_prefill,
    .step = quest_step,
    .observe = NULL,
    .memory = quest_memory,
    .destroy = quest_destroy,
    .max_slots = quest_max_slots,
    .conformance = quest_conformance,
};
