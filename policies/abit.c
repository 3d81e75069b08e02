/* abit — TriCache's tripartite cache: Global (the system-prompt segment, pinned) + Local (the
 * last `local` tokens) + Retrieval. Tokens leaving the local window go to a host tier, where
 * ABIT segments them, `span` tokens at a time, into contiguous clusters. A cluster is indexed,
 * per KV head, by its mean key and the `top_keys` keys that had accumulated the most attention.
 * At each step the group's mean query ranks the clusters (the tokens still waiting to be
 * segmented count as one more cluster) by the best cosine similarity of their index keys, and
 * the best `max_clusters` are brought back, best first, while they fit in what the budget leaves
 * after Global and Local. The cache never exceeds `budget` tokens per KV head.
 *
 * Prefill, chunk by chunk and span by span: the chunk's queries add their attention (over the
 * cache and the chunk) to the tokens' accumulated attention, system-segment tokens are pinned as
 * they arrive, and the cache becomes Global plus query chunk_end − 1's local window: tokens
 * retrieved for the last decode step are dropped (they are on the host already), and tokens
 * leaving the local window go to the host tier in position order. Nothing is retrieved at
 * prefill; the next decode step retrieves for its query. */
#include "policies/abit.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <gsl/gsl_sort.h>
#include <gsl/gsl_statistics_double.h>

#include "policies/policy.h"
#include "sim/format/geometry.h"

extern const PolicyType policy_abit;

/* ---- ABIT segmentation ---- */

typedef enum { SPLIT_OK, SPLIT_TOO_SMALL, SPLIT_TOO_LARGE } SplitVerdict;

/* Judges the segmentation that starts a segment at every i >= 1 with sim[i] < threshold:
 * too small when its smallest segment is under min_split − tolerance, too large when its median
 * is over max_split + tolerance. lens: room for n. */
static SplitVerdict split_judge(const double *sim, int n, double threshold, const AbitSplit *sp,
                                double *lens)
{
    int count = 0, start = 0, smallest = n;
    for (int i = 1; i <= n; i++)
        if (i == n || sim[i] < threshold) {
            int len = i - start;
            lens[count++] = len;
            if (len < smallest)
                smallest = len;
            start = i;
        }
    if (smallest < sp->min_split - sp->tolerance)
        return SPLIT_TOO_SMALL;
    gsl_sort(lens, 1, (size_t)count);
    double median = gsl_stats_median_from_sorted_data(lens, 1, (size_t)count);
    return median <= sp->max_split + sp->tolerance ? SPLIT_OK : SPLIT_TOO_LARGE;
}

/* TriCache's bisection: at most 50 halvings of [lo, hi], down to a width of 1e-5; segments too
 * small lower the threshold (fewer splits), too large raise it. Returns the verdict of the last
 * threshold tried, left in *threshold. */
static SplitVerdict split_bisect(const double *sim, int n, double lo, double hi,
                                 const AbitSplit *sp, double *lens, double *threshold)
{
    SplitVerdict verdict = SPLIT_OK;
    for (int iter = 0; iter < 50; iter++) {
        *threshold = 0.5 * (lo + hi);
        verdict = split_judge(sim, n, *threshold, sp, lens);
        if (verdict == SPLIT_OK)
            break;
        if (verdict == SPLIT_TOO_SMALL)
            hi = *threshold;
        else
            lo = *threshold;
        if (hi - lo < 1e-5)
            break;
    }
    return verdict;
}

int abit_segment(const float *features, int n, int dim, const AbitSplit *split, int *starts)
{
    if (n <= 0)
        return 0;
    starts[0] = 0;
    if (n == 1)
        return 1;
    /* sim[i] = cos(sum of the `window` previous features, feature i), i >= 1. */
    double *sim = kv_malloc((size_t)n * sizeof *sim);
    double *sorted = kv_malloc((size_t)n * sizeof *sorted);
    float *reference = kv_malloc((size_t)dim * sizeof *reference);
    sim[0] = INFINITY;
    for (int i = 1; i < n; i++) {
        memset(reference, 0, (size_t)dim * sizeof *reference);
        for (int j = i - split->window < 0 ? 0 : i - split->window; j < i; j++)
            cblas_saxpy(dim, 1.0f, features + (size_t)j * dim, 1, reference, 1);
        const float *f = features + (size_t)i * dim;
        double norms = (double)cblas_snrm2(dim, reference, 1) * cblas_snrm2(dim, f, 1);
        sim[i] = norms > 0 ? cblas_sdot(dim, reference, 1, f, 1) / norms : 0.0;
        sorted[i - 1] = sim[i];
    }
    gsl_sort(sorted, 1, (size_t)(n - 1));
    double lo = fmax(0.0, gsl_stats_quantile_from_sorted_data(sorted, 1, (size_t)(n - 1), 0.25));
    double hi = fmin(1.0, gsl_stats_quantile_from_sorted_data(sorted, 1, (size_t)(n - 1), 0.75));
    if (hi < lo)
        hi = lo;
    double threshold;
    SplitVerdict verdict = split_bisect(sim, n, lo, hi, split, sorted, &threshold);
    /* The quartiles often fail to bracket an acceptable threshold (on near-duplicate runs both
     * are ~1, and every threshold between them cuts runs into crumbs): widen the search to the
     * rest of [0, 1] on the side the verdict points to. */
    if (verdict == SPLIT_TOO_SMALL)
        split_bisect(sim, n, 0.0, lo, split, sorted, &threshold);
    else if (verdict == SPLIT_TOO_LARGE)
        split_bisect(sim, n, hi, 1.0, split, sorted, &threshold);

    int count = 1, start = 0;
    if (split->forward_merge) {
        /* TriCache: a segment shorter than min_cluster loses its end boundary, absorbing the
         * next segment, and the merged one is checked again; a short last segment joins the
         * previous one. */
        for (int i = 1; i < n; i++)
            if (sim[i] < threshold)
                starts[count++] = i;
        for (int s = 0; s < count;) {
            int end = s + 1 < count ? starts[s + 1] : n;
            if (end - starts[s] >= split->min_cluster) {
                s++;
            } else if (s + 1 < count) {
                memmove(starts + s + 1, starts + s + 2, (size_t)(count - s - 2) * sizeof *starts);
                count--;
            } else {
                if (s > 0)
                    count--; /* the last segment joins the previous one */
                break;
            }
        }
    } else {
        /* Segments shorter than min_cluster merge into the previous one; a short first segment
         * merges into the next. */
        for (int i = 1; i <= n; i++)
            if (i == n || sim[i] < threshold) {
                if (start > 0 && i - start >= split->min_cluster)
                    starts[count++] = start;
                start = i;
            }
        if (count > 1 && starts[1] < split->min_cluster) {
            memmove(starts + 1, starts + 2, (size_t)(count - 2) * sizeof *starts);
            count--;
        }
    }
    free(sim);
    free(sorted);
    free(reference);
    return count;
}

/* ---- The policy ---- */

typedef struct {
    int budget;
    int local;
    bool pin_system;
    int window;
    int min_split;
    int max_split;
    int tolerance;
    int min_cluster;
    int top_keys;
    int max_clusters;
    int span;
    bool tricache;
} AbitParams;

typedef struct {
    Policy base;
    AbitParams prm;
    AbitSplit split;
    int n_tokens, head_dim, group, kv_bits;
    bool *global; /* [T] pinned system-segment prompt tokens */
    int n_global;
    double *acc; /* [n_kv_heads][T] attention mass accumulated over the group's query heads */

    /* Host tier: every token that left the local window, in the order it left. */
    int32_t *host_order; /* [T] */
    int n_host;
    int n_clustered; /* host_order[0, n_clustered) is segmented; the rest is pending */

    /* Clusters c: host_order[cl_begin[c], cl_begin[c+1]), index keys
     * entries[g][cl_entry[c], cl_entry[c+1]) (unit vectors, per KV head). */
    int n_clusters, cap_clusters;
    int *cl_begin, *cl_entry;
    int n_entries, cap_entries;
    float **entries; /* [n_kv_heads] -> [cap_entries][D] */

    /* The pending tokens, ranked as one provisional cluster: per KV head the sum of their unit
     * keys and the top_keys of them with the most accumulated attention when they left. */
    float *pend_sum;       /* [n_kv_heads][D] */
    int top_stride;        /* max(top_keys, 1): row length of pend_top and pend_top_acc */
    int *pend_top;         /* [n_kv_heads][top_stride], most attention first */
    double *pend_top_acc;  /* [n_kv_heads][top_stride] */
    int *pend_n_top;       /* [n_kv_heads] */

    /* Scratch. */
    float *unit_key;      /* [D] */
    float *query;         /* [D] */
    float *sims;          /* [cap_entries] */
    float *pend_entries;  /* [1 + top_keys][D] */
    float *pend_sims;     /* [1 + top_keys] */
    float *cluster_score; /* [cap_clusters + 1] */
    int *best;            /* [max_clusters] */
    int *wanted;          /* [n_kv_heads][T]: step at which a position was last retrieved */

    /* This step's traffic, for memory(). */
    int entered_host;
    double fetched; /* (token, KV head) entries brought from the host tier */
} Abit;

static const ParamSpec abit_params[] = {
    {"budget", PARAM_INT, offsetof(AbitParams, budget), "8192", 2, 1 << 30, NULL,
     "tokens per KV head at attention time: Global + Local + retrieved clusters"},
    {"local", PARAM_INT, offsetof(AbitParams, local), "1024", 1, 1 << 30, NULL,
     "last tokens always attended, the current one included (TriCache local window)"},
    {"pin_system", PARAM_BOOL, offsetof(AbitParams, pin_system), "true", 0, 0, NULL,
     "keep the system-prompt segment (segment 0) as Global, up to budget - local tokens"},
    {"window", PARAM_INT, offsetof(AbitParams, window), "3", 1, 1 << 20, NULL,
     "ABIT: previous features averaged into the rolling reference"},
    {"min_split", PARAM_INT, offsetof(AbitParams, min_split), "8", 1, 1 << 30, NULL,
     "ABIT: wanted smallest segment, in tokens"},
    {"max_split", PARAM_INT, offsetof(AbitParams, max_split), "512", 1, 1 << 30, NULL,
     "ABIT: wanted median segment, in tokens"},
    {"tolerance", PARAM_INT, offsetof(AbitParams, tolerance), "5", 0, 1 << 30, NULL,
     "ABIT: slack on min_split and max_split, in tokens"},
    {"min_cluster", PARAM_INT, offsetof(AbitParams, min_cluster), "8", 1, 1 << 30, NULL,
     "ABIT: segments shorter than this merge into the previous one"},
    {"top_keys", PARAM_INT, offsetof(AbitParams, top_keys), "5", 0, 1 << 10, NULL,
     "keys with the most accumulated attention indexed per cluster, besides its mean key"},
    {"max_clusters", PARAM_INT, offsetof(AbitParams, max_clusters), "50", 1, 1 << 20, NULL,
     "best-ranked clusters considered for retrieval at each step"},
    {"span", PARAM_INT, offsetof(AbitParams, span), "1024", 1, 1 << 30, NULL,
     "tokens segmented at a time, once that many have left the local window"},
    {"tricache", PARAM_BOOL, offsetof(AbitParams, tricache), "false", 0, 0, NULL,
     "TriCache's details: forward merge, pre-RoPE keys and queries, the best max_clusters "
     "index keys rather than clusters, stop at the first cluster that does not fit"},
    {NULL, 0, 0, NULL, 0, 0, NULL, NULL},
};

static int abit_validate(const void *params, KvErr *err)
{
    const AbitParams *prm = params;
    if (prm->local >= prm->budget)
        return kv_fail(err,
                       "abit: local = %d must be below budget = %d (Global, Local and the "
                       "retrieved clusters share the budget)",
                       prm->local, prm->budget);
    if (prm->min_split > prm->max_split)
        return kv_fail(err, "abit: min_split = %d must not exceed max_split = %d",
                       prm->min_split, prm->max_split);
    return 0;
}

static Policy *abit_create(const void *params, const LayerView *L, const PolicyEnv *env,
    KvErr *err)
{
    (void)err; /* cannot fail */
    Abit *a = kv_calloc(1, sizeof *a);
    policy_base_init(&a->base, &policy_abit, L);
    a->base.want_prefill_mass = true; /* the prompt's accumulated attention picks its top keys */
    a->prm = *(const AbitParams *)params;
    a->split = (AbitSplit){a->prm.window, a->prm.min_split, a->prm.max_split, a->prm.tolerance,
                           a->prm.min_cluster, a->prm.tricache};
    int T = L->n_tokens, D = L->head_dim, H = L->n_kv_heads, K = a->prm.top_keys;
    a->n_tokens = T;
    a->head_dim = D;
    a->group = L->group;
    a->kv_bits = env->kv_bits;

    a->global = kv_calloc((size_t)T, sizeof *a->global);
    a->acc = kv_calloc((size_t)H * T, sizeof *a->acc);
    a->host_order = kv_malloc((size_t)T * sizeof *a->host_order);

    a->cap_clusters = 64;
    a->cl_begin = kv_calloc((size_t)a->cap_clusters + 1, sizeof *a->cl_begin);
    a->cl_entry = kv_calloc((size_t)a->cap_clusters + 1, sizeof *a->cl_entry);
    a->cap_entries = 256;
    a->entries = kv_calloc((size_t)H, sizeof *a->entries);
    for (int g = 0; g < H; g++)
        a->entries[g] = kv_malloc((size_t)a->cap_entries * D * sizeof(float));

    a->pend_sum = kv_calloc((size_t)H * D, sizeof *a->pend_sum);
    a->top_stride = K > 0 ? K : 1;
    a->pend_top = kv_calloc((size_t)H * a->top_stride, sizeof *a->pend_top);
    a->pend_top_acc = kv_calloc((size_t)H * a->top_stride, sizeof *a->pend_top_acc);
    a->pend_n_top = kv_calloc((size_t)H, sizeof *a->pend_n_top);

    a->unit_key = kv_malloc((size_t)D * sizeof *a->unit_key);
    a->query = kv_malloc((size_t)D * sizeof *a->query);
    a->sims = kv_malloc((size_t)a->cap_entries * sizeof *a->sims);
    a->pend_entries = kv_malloc((size_t)(1 + K) * D * sizeof *a->pend_entries);
    a->pend_sims = kv_malloc((size_t)(1 + K) * sizeof *a->pend_sims);
    a->cluster_score = kv_malloc((size_t)(a->cap_clusters + 1) * sizeof *a->cluster_score);
    a->best = kv_malloc((size_t)a->prm.max_clusters * sizeof *a->best);
    a->wanted = kv_malloc((size_t)H * T * sizeof *a->wanted);
    for (size_t i = 0; i < (size_t)H * T; i++)
        a->wanted[i] = -1;
    return &a->base;
}

/* Scales x to unit length (a zero vector stays zero). */
static void normalize(float *x, int dim)
{
    float norm = cblas_snrm2(dim, x, 1);
    if (norm > 0)
        cblas_sscal(dim, 1.0f / norm, x, 1);
}

/* KV head g's key of position pos, normalized, into out: post-RoPE as the trace holds it, or
 * (tricache) rotated back to pre-RoPE, as TriCache caches and compares keys. */
static void unit_key(const Abit *a, const LayerView *L, int g, int pos, float *out)
{
    memcpy(out, L->k + ((size_t)g * L->n_tokens + pos) * L->head_dim,
           (size_t)L->head_dim * sizeof *out);
    if (a->prm.tricache)
        rope_apply(out, L->head_dim, L->meta->rope_layout, L->rope_inv_freq,
                   -(double)L->meta->positions[pos]);
    normalize(out, L->head_dim);
}

/* Inserts position pos, with accumulated attention `mass`, into a list of at most k positions
 * kept in decreasing order of attention (older first on ties: positions arrive in order). */
static void top_insert(int *top, double *top_acc, int *n_top, int k, int pos, double mass)
{
    if (k == 0 || (*n_top == k && mass <= top_acc[k - 1]))
        return;
    int i = *n_top < k ? (*n_top)++ : k - 1;
    while (i > 0 && top_acc[i - 1] < mass) {
        top[i] = top[i - 1];
        top_acc[i] = top_acc[i - 1];
        i--;
    }
    top[i] = pos;
    top_acc[i] = mass;
}

static void grow_clusters(Abit *a, int need)
{
    if (need <= a->cap_clusters)
        return;
    while (a->cap_clusters < need)
        a->cap_clusters *= 2;
    size_t n = (size_t)a->cap_clusters + 1;
    a->cl_begin = kv_realloc(a->cl_begin, n * sizeof *a->cl_begin);
    a->cl_entry = kv_realloc(a->cl_entry, n * sizeof *a->cl_entry);
    a->cluster_score = kv_realloc(a->cluster_score, n * sizeof *a->cluster_score);
}

static void grow_entries(Abit *a, int need)
{
    if (need <= a->cap_entries)
        return;
    while (a->cap_entries < need)
        a->cap_entries *= 2;
    for (int g = 0; g < a->base.n_kv_heads; g++)
        a->entries[g] = kv_realloc(a->entries[g],
                                   (size_t)a->cap_entries * a->head_dim * sizeof(float));
    a->sims = kv_realloc(a->sims, (size_t)a->cap_entries * sizeof *a->sims);
}

/* Segments the pending tokens into clusters and indexes them. */
static void segment_pending(Abit *a, const LayerView *L)
{
    int H = a->base.n_kv_heads, D = a->head_dim, K = a->prm.top_keys;
    int n = a->n_host - a->n_clustered;
    const int32_t *span = a->host_order + a->n_clustered;
    /* The feature of a token: its unit key averaged over the KV heads. */
    float *features = kv_calloc((size_t)n * D, sizeof *features);
    for (int i = 0; i < n; i++)
        for (int g = 0; g < H; g++) {
            unit_key(a, L, g, span[i], a->unit_key);
            cblas_saxpy(D, 1.0f / H, a->unit_key, 1, features + (size_t)i * D, 1);
        }
    int *starts = kv_malloc((size_t)n * sizeof *starts);
    int count = abit_segment(features, n, D, &a->split, starts);
    free(features);

    int *top = kv_malloc((size_t)a->top_stride * sizeof *top);
    double *top_acc = kv_malloc((size_t)a->top_stride * sizeof *top_acc);
    grow_clusters(a, a->n_clusters + count);
    for (int s = 0; s < count; s++) {
        int begin = starts[s], end = s + 1 < count ? starts[s + 1] : n;
        int n_index = 1 + (end - begin < K ? end - begin : K);
        int c = a->n_clusters++;
        a->cl_begin[c] = a->n_clustered + begin;
        a->cl_entry[c] = a->n_entries;
        grow_entries(a, a->n_entries + n_index);
        for (int g = 0; g < H; g++) {
            const double *acc = a->acc + (size_t)g * a->n_tokens;
            float *mean = a->entries[g] + (size_t)a->n_entries * D;
            memset(mean, 0, (size_t)D * sizeof *mean);
            int n_top = 0;
            for (int i = begin; i < end; i++) {
                unit_key(a, L, g, span[i], a->unit_key);
                cblas_saxpy(D, 1.0f, a->unit_key, 1, mean, 1);
                top_insert(top, top_acc, &n_top, K, span[i], acc[span[i]]);
            }
            normalize(mean, D);
            for (int r = 0; r < n_top; r++)
                unit_key(a, L, g, top[r], mean + (size_t)(1 + r) * D);
        }
        a->n_entries += n_index;
    }
    a->cl_begin[a->n_clusters] = a->n_host;
    a->cl_entry[a->n_clusters] = a->n_entries;
    a->n_clustered = a->n_host;
    memset(a->pend_sum, 0, (size_t)H * D * sizeof *a->pend_sum);
    memset(a->pend_n_top, 0, (size_t)H * sizeof *a->pend_n_top);
    free(top);
    free(top_acc);
    free(starts);
}

/* Position pos leaves the local window for the host tier. */
static void host_push(Abit *a, const LayerView *L, int pos)
{
    int D = a->head_dim, K = a->prm.top_keys;
    a->host_order[a->n_host++] = pos;
    a->entered_host++;
    for (int g = 0; g < a->base.n_kv_heads; g++) {
        unit_key(a, L, g, pos, a->unit_key);
        cblas_saxpy(D, 1.0f, a->unit_key, 1, a->pend_sum + (size_t)g * D, 1);
        top_insert(a->pend_top + (size_t)g * a->top_stride,
                   a->pend_top_acc + (size_t)g * a->top_stride, &a->pend_n_top[g], K, pos,
                   a->acc[(size_t)g * a->n_tokens + pos]);
    }
    if (a->n_host - a->n_clustered >= a->prm.span)
        segment_pending(a, L);
}

/* Cluster x ranks before cluster y: higher score, then the older cluster. */
static bool ranks_before(const Abit *a, int x, int y)
{
    if (a->cluster_score[x] != a->cluster_score[y])
        return a->cluster_score[x] > a->cluster_score[y];
    return x < y;
}

/* Host tokens host_order[begin, end) into cache c for query t. */
static void take_cluster(Abit *a, KVCache *c, int *wanted, int begin, int end, int t)
{
    for (int i = begin; i < end; i++) {
        int pos = a->host_order[i];
        wanted[pos] = t;
        if (!kvcache_has(c, pos)) {
            kvcache_add(c, pos);
            a->fetched += 1;
        }
    }
}

/* Drops the retrieved tokens of earlier steps that query t does not want. */
static void drop_unwanted(Abit *a, KVCache *c, const int *wanted, int t)
{
    for (int s = c->n - 1; s >= 0; s--) {
        int pos = c->pos[s];
        if (pos >= 0 && !a->global[pos] && pos <= t - a->prm.local && wanted[pos] != t)
            kvcache_remove_slot(c, s);
    }
}

/* An index key and its similarity to the query, for the tricache ranking. */
typedef struct {
    float sim;
    int entry; /* entries' index; the pending cluster's come after every cluster's */
    int cluster;
} IndexHit;

/* Best first; on equal similarity the older entry. */
static int hit_cmp(const void *x, const void *y)
{
    const IndexHit *a = x, *b = y;
    if (a->sim != b->sim)
        return a->sim > b->sim ? -1 : 1;
    return (a->entry > b->entry) - (a->entry < b->entry);
}

/* tricache: TriCache's _retrieve ranking. The max_clusters index keys most similar to the query
 * (a->sims, and a->pend_sims for the n_pend keys of the pending cluster), best first; their
 * clusters, each once, in the order of their best key, into a->best (room for max_clusters).
 * Returns how many. */
static int tricache_ranking(Abit *a, int n_pend)
{
    int n = a->n_entries + n_pend;
    IndexHit *hit = kv_malloc((size_t)(n > 0 ? n : 1) * sizeof *hit);
    for (int cl = 0; cl < a->n_clusters; cl++)
        for (int e = a->cl_entry[cl]; e < a->cl_entry[cl + 1]; e++)
            hit[e] = (IndexHit){a->sims[e], e, cl};
    for (int e = 0; e < n_pend; e++)
        hit[a->n_entries + e] = (IndexHit){a->pend_sims[e], a->n_entries + e, a->n_clusters};
    qsort(hit, (size_t)n, sizeof *hit, hit_cmp);
    int M = a->prm.max_clusters < n ? a->prm.max_clusters : n, n_best = 0;
    for (int r = 0; r < M; r++) {
        bool seen = false;
        for (int i = 0; i < n_best && !seen; i++)
            seen = a->best[i] == hit[r].cluster;
        if (!seen)
            a->best[n_best++] = hit[r].cluster;
    }
    free(hit);
    return n_best;
}

/* Brings KV head g's best clusters for query t into its cache, and drops the retrieved tokens
 * of earlier steps that are no longer wanted. `room` is what Global and Local leave. */
static void retrieve(Abit *a, const LayerView *L, int g, int t, int room)
{
    int D = a->head_dim;
    KVCache *c = &a->base.cache[g];
    int *wanted = a->wanted + (size_t)g * a->n_tokens;

    /* The query: unit queries of the group, averaged and normalized again. */
    memset(a->query, 0, (size_t)D * sizeof *a->query);
    for (int i = 0; i < a->group; i++) {
        memcpy(a->unit_key, L->q + ((size_t)(g * a->group + i) * a->n_tokens + t) * D,
               (size_t)D * sizeof *a->unit_key);
        if (a->prm.tricache) /* pre-RoPE, like the keys */
            rope_apply(a->unit_key, D, L->meta->rope_layout, L->rope_inv_freq,
                       -(double)L->meta->positions[t]);
        normalize(a->unit_key, D);
        cblas_saxpy(D, 1.0f, a->unit_key, 1, a->query, 1);
    }
    normalize(a->query, D);

    /* A cluster's score: the best cosine similarity of its index keys to the query. */
    if (a->n_entries > 0)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, a->n_entries, D, 1.0f, a->entries[g], D,
                    a->query, 1, 0.0f, a->sims, 1);
    for (int cl = 0; cl < a->n_clusters; cl++) {
        float best = -INFINITY;
        for (int e = a->cl_entry[cl]; e < a->cl_entry[cl + 1]; e++)
            best = fmaxf(best, a->sims[e]);
        a->cluster_score[cl] = best;
    }
    int n_candidates = a->n_clusters;
    int n_pending = a->n_host - a->n_clustered;
    if (n_pending > 0) {
        int n_top = a->pend_n_top[g];
        const int *top = a->pend_top + (size_t)g * a->top_stride;
        memcpy(a->pend_entries, a->pend_sum + (size_t)g * D, (size_t)D * sizeof(float));
        normalize(a->pend_entries, D);
        for (int r = 0; r < n_top; r++)
            unit_key(a, L, g, top[r], a->pend_entries + (size_t)(1 + r) * D);
        cblas_sgemv(CblasRowMajor, CblasNoTrans, 1 + n_top, D, 1.0f, a->pend_entries, D,
                    a->query, 1, 0.0f, a->pend_sims, 1);
        float best = -INFINITY;
        for (int e = 0; e <= n_top; e++)
            best = fmaxf(best, a->pend_sims[e]);
        a->cluster_score[n_candidates++] = best;
    }

    int n_best = 0, M = a->prm.max_clusters;
    if (a->prm.tricache) {
        n_best = tricache_ranking(a, n_pending > 0 ? 1 + a->pend_n_top[g] : 0);
        /* In rank order while they fit; the first that does not fit ends the retrieval. */
        for (int r = 0; r < n_best; r++) {
            int cl = a->best[r];
            int begin = a->cl_begin[cl], end = cl < a->n_clusters ? a->cl_begin[cl + 1] : a->n_host;
            if (end - begin > room)
                break;
            room -= end - begin;
            take_cluster(a, c, wanted, begin, end, t);
        }
        drop_unwanted(a, c, wanted, t);
        return;
    }
    /* The best max_clusters candidates, best first. */
    for (int cl = 0; cl < n_candidates; cl++) {
        if (n_best == M && !ranks_before(a, cl, a->best[M - 1]))
            continue;
        int i = n_best < M ? n_best++ : M - 1;
        while (i > 0 && ranks_before(a, cl, a->best[i - 1])) {
            a->best[i] = a->best[i - 1];
            i--;
        }
        a->best[i] = cl;
    }

    /* Take them in rank order while they fit; a cluster that does not fit is skipped. */
    for (int r = 0; r < n_best; r++) {
        int cl = a->best[r];
        int begin = a->cl_begin[cl], end = cl < a->n_clusters ? a->cl_begin[cl + 1] : a->n_host;
        if (end - begin > room)
            continue;
        room -= end - begin;
        take_cluster(a, c, wanted, begin, end, t);
    }
    drop_unwanted(a, c, wanted, t);
}

static void abit_prefill(Policy *p, const PrefillView *pv)
{
    Abit *a = (Abit *)p;
    const LayerView *L = pv->L;
    int c0 = pv->chunk_start, c1 = pv->chunk_end, local = a->prm.local;
    a->entered_host = 0;
    a->fetched = 0;
    /* Pinning more than budget − local tokens would leave no room for the local window. */
    for (int j = c0; j < c1 && a->prm.pin_system && a->n_global < a->prm.budget - local; j++)
        if (L->meta->segments[j] == 0) {
            a->global[j] = true;
            a->n_global++;
        }
    for (int g = 0; g < p->n_kv_heads; g++) {
        double *acc = a->acc + (size_t)g * a->n_tokens;
        /* Zero where the chunk's queries saw nothing. */
        for (int i = 0; i < a->group; i++) {
            const float *mass = pv->prefill_mass + (size_t)(g * a->group + i) * c1;
            for (int j = 0; j < c1; j++)
                acc[j] += mass[j];
        }
        /* What the last decode step retrieved is on the host already. */
        KVCache *c = &p->cache[g];
        for (int s = c->n - 1; s >= 0; s--)
            if (c->pos[s] >= 0 && !a->global[c->pos[s]] && c->pos[s] <= c0 - 1 - local)
                kvcache_remove_slot(c, s);
    }
    /* Query c1 − 1's local window is (c1 − 1 − local, c1 − 1]; older tokens go to the host tier:
     * first those of the previous window, then the chunk's. */
    int first_leaving = c0 - local > 0 ? c0 - local : 0;
    for (int j = first_leaving; j < c0 && j <= c1 - 1 - local; j++)
        if (!a->global[j]) {
            for (int g = 0; g < p->n_kv_heads; g++)
                kvcache_remove(&p->cache[g], j);
            host_push(a, L, j);
        }
    for (int j = c0; j < c1; j++) {
        if (a->global[j] || j > c1 - 1 - local) {
            for (int g = 0; g < p->n_kv_heads; g++)
                kvcache_add(&p->cache[g], j);
        } else {
            host_push(a, L, j);
        }
    }
}

static void abit_step(Policy *p, const StepView *sv)
{
    Abit *a = (Abit *)p;
    const LayerView *L = sv->L;
    int t = sv->t, local = a->prm.local;
    a->entered_host = 0;
    a->fetched = 0;
    for (int g = 0; g < p->n_kv_heads; g++)
        kvcache_add(&p->cache[g], t);
    int leaving = t - local;
    if (leaving >= 0 && !a->global[leaving])
        host_push(a, L, leaving);

    int in_local = 0;
    for (int j = leaving + 1 > 0 ? leaving + 1 : 0; j <= t; j++)
        in_local += !a->global[j];
    int room = a->prm.budget - a->n_global - in_local;
    for (int g = 0; g < p->n_kv_heads; g++)
        retrieve(a, L, g, t, room);
}

static void abit_observe(Policy *p, const StepView *sv, const float *const *attn)
{
    (void)sv;
    Abit *a = (Abit *)p;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        double *acc = a->acc + (size_t)g * a->n_tokens;
        for (int i = 0; i < a->group; i++) {
            const float *row = attn[g] + (size_t)i * c->n;
            for (int s = 0; s < c->n; s++)
                if (c->pos[s] >= 0)
                    acc[c->pos[s]] += row[s];
        }
    }
}

static void abit_memory(const Policy *p, MemReport *m)
{
    const Abit *a = (const Abit *)p;
    int H = p->n_kv_heads, D = a->head_dim, bits = a->kv_bits;
    double live = 0;
    for (int g = 0; g < H; g++)
        live += p->cache[g].n;
    /* The cluster index (keys only) stays on the device for ranking. */
    double index_keys = (double)H * a->n_entries;
    if (a->n_host > a->n_clustered)
        for (int g = 0; g < H; g++)
            index_keys += 1 + a->pend_n_top[g];
    m->device_bytes = kv_entry_bytes(live, D, bits);
    m->allocated_bytes = m->device_bytes + kv_entry_bytes(index_keys, D, bits) / 2;
    m->host_bytes = kv_entry_bytes((double)H * a->n_host, D, bits);
    m->to_host_bytes = kv_entry_bytes((double)H * a->entered_host, D, bits);
    m->fetched_tokens = a->fetched;
    m->to_device_bytes = kv_entry_bytes(a->fetched, D, bits);
}

static void abit_destroy(Policy *p)
{
    Abit *a = (Abit *)p;
    for (int g = 0; g < p->n_kv_heads; g++)
        free(a->entries[g]);
    free(a->entries);
    free(a->global);
    free(a->acc);
    free(a->host_order);
    free(a->cl_begin);
    free(a->cl_entry);
    free(a->pend_sum);
    free(a->pend_top);
    free(a->pend_top_acc);
    free(a->pend_n_top);
    free(a->unit_key);
    free(a->query);
    free(a->sims);
    free(a->pend_entries);
    free(a->pend_sims);
    free(a->cluster_score);
    free(a->best);
    free(a->wanted);
    policy_base_free(p);
    free(a);
}

static long abit_max_slots(const void *params, const LayerView *L, int t)
{
    const AbitParams *prm = params;
    (void)L;
    (void)t;
    return prm->budget;
}

static const char *const abit_conformance[] = {
    "budget=48 local=8 span=16 max_split=8 min_split=2 min_cluster=2 max_clusters=4",
    "budget=48 local=8 span=16 max_split=8 min_split=2 min_cluster=2 max_clusters=4 "
    "pin_system=false window=5 tolerance=1 top_keys=2",
    "budget=48 local=8 span=16 max_split=8 min_split=2 min_cluster=2 max_clusters=4 "
    "tricache=true",
    NULL,
};

const PolicyType policy_abit = {
    .name = "abit",
    .description = "TriCache tripartite cache: pinned system prompt + last `local` tokens + "
                   "ABIT clusters retrieved from a host tier by query similarity",
    .params_size = sizeof(AbitParams),
    .params = abit_params,
    .validate = abit_validate,
    .create = abit_create,
    .prefill = abit_prefill,
    .step = abit_step,
    .observe = abit_observe,
    .memory = abit_memory,
    .destroy = abit_destroy,
    .max_slots = abit_max_slots,
    .conformance = abit_conformance,
};
