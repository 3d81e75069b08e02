#include "sim/replay/metrics.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>
#endif

static bool slot_is_exact(const KVCache *c, int slot)
{
    return c->pos[slot] >= 0 && c->alt_kv[slot] == NULL;
}

/* Every key [0, t] present with its exact K/V: attention over the cache is the full row. */
static bool cache_is_complete(const KVCache *c, int t)
{
    return c->n_alt == 0 && c->n == t + 1;
}

/* A slot of a position before the query's window: the model gives it no attention. Synthetic
 * slots (no position) are attended. */
static bool slot_outside(const KVCache *c, int slot, const FullRow *row)
{
    return c->pos[slot] >= 0 && c->pos[slot] < attn_first_key(row->window, row->t);
}

/* The logit of key k for the row's query: scale * q . k (soft-capped when the row is). */
static double key_logit(const FullRow *row, const float *k)
{
    return attn_softcap_logit((double)row->scale * cblas_sdot(row->head_dim, row->q, 1, k, 1),
                              row->softcap);
}

/* Logit of slot i, with the slot's own key for alt slots. */
static double slot_logit(const KVCache *c, int slot, const FullRow *row)
{
    return key_logit(row, c->alt_kv[slot] ? c->alt_kv[slot]
                                          : row->k + (size_t)c->pos[slot] * row->head_dim);
}

/* The renormalised attention as a softmax of the logits over the cache (double precision). */
static void softmax_over_cache(const KVCache *c, const FullRow *row, float *attn)
{
    double mx = -INFINITY, z = 0;
    double *logit = kv_malloc((size_t)c->n * sizeof *logit);
    for (int i = 0; i < c->n; i++) {
        logit[i] = slot_outside(c, i, row) ? -INFINITY : slot_logit(c, i, row);
        if (logit[i] > mx)
            mx = logit[i];
    }
    for (int i = 0; i < c->n; i++) {
        logit[i] = logit[i] == -INFINITY ? 0.0 : exp(logit[i] - mx);
        z += logit[i];
    }
    for (int i = 0; i < c->n; i++)
        attn[i] = z > 0 ? (float)(logit[i] / z) : 0.0f;
    free(logit);
}

/* Each head's retained mass: 1 when every key is present, else the smaller of the cache and its
 * complement scanned. The heads' sums run side by side (slot or position outer, head inner);
 * each is the same sequence of additions a head alone would make. */
static void retained_masses(const KVCache *c, const FullRow *rows, int n_heads, int n_exact,
                            CacheAttention *out)
{
    int t = rows[0].t;
    for (int h = 0; h < n_heads; h++)
        out[h].retained_mass = 0;
    if (n_exact == t + 1) {
        for (int h = 0; h < n_heads; h++)
            out[h].retained_mass = 1.0; /* every key present: the renormalisation is the identity */
    } else if (n_exact > (t + 1) / 2) {
        /* Large caches: subtract what is missing, scanning the (smaller) complement. */
        double missing[n_heads];
        for (int h = 0; h < n_heads; h++)
            missing[h] = 0;
        for (int j = 0; j <= t; j++) {
            int s = c->slot_of[j];
            if (s < 0 || c->alt_kv[s])
                for (int h = 0; h < n_heads; h++)
                    missing[h] += rows[h].p[j];
        }
        for (int h = 0; h < n_heads; h++)
            out[h].retained_mass = 1.0 - missing[h];
    } else {
        for (int i = 0; i < c->n; i++)
            if (slot_is_exact(c, i))
                for (int h = 0; h < n_heads; h++)
                    out[h].retained_mass += rows[h].p[c->pos[i]];
    }
}

/* x[0..n) *= f (each product rounded once, as a scalar loop would). */
static void scale_floats(float *x, int n, float f)
{
    int i = 0;
#if defined(__SSE__)
    __m128 v = _mm_set1_ps(f);
    for (; i + 4 <= n; i += 4)
        _mm_storeu_ps(x + i, _mm_mul_ps(_mm_loadu_ps(x + i), v));
#endif
    for (; i < n; i++)
        x[i] *= f;
}

/* Every slot exact and attended: each head's shares are its p at the slots' positions, summed
 * in slot order. Four heads at a time (their sums side by side, in registers), then one; the
 * positions a few slots ahead are fetched early: the rows are long and the positions scattered. */
enum { AHEAD = 16 };

static void plain_shares4(const KVCache *c, const FullRow *rows, float *attn, double *total,
                          bool *exact)
{
    int n = c->n;
    const float *p0 = rows[0].p, *p1 = rows[1].p, *p2 = rows[2].p, *p3 = rows[3].p;
    float *a0 = attn, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    bool normal = true;
    for (int i = 0; i < n; i++) {
        int32_t j = c->pos[i];
        if (i + AHEAD < n) {
            int32_t f = c->pos[i + AHEAD];
            __builtin_prefetch(p0 + f);
            __builtin_prefetch(p1 + f);
            __builtin_prefetch(p2 + f);
            __builtin_prefetch(p3 + f);
        }
        float w0 = p0[j], w1 = p1[j], w2 = p2[j], w3 = p3[j];
        s0 += w0;
        s1 += w1;
        s2 += w2;
        s3 += w3;
        a0[i] = w0;
        a1[i] = w1;
        a2[i] = w2;
        a3[i] = w3;
        normal &= w0 >= FLT_MIN && w1 >= FLT_MIN && w2 >= FLT_MIN && w3 >= FLT_MIN;
    }
    total[0] = s0;
    total[1] = s1;
    total[2] = s2;
    total[3] = s3;
    if (!normal) /* which of them: a second look, rarely taken */
        for (int h = 0; h < 4; h++)
            for (int i = 0; i < n; i++)
                exact[h] &= attn[(size_t)h * n + i] >= FLT_MIN;
}

static void plain_shares1(const KVCache *c, const FullRow *row, float *attn, double *total,
                          bool *exact)
{
    int n = c->n;
    double s = 0;
    bool normal = true;
    for (int i = 0; i < n; i++) {
        if (i + AHEAD < n)
            __builtin_prefetch(row->p + c->pos[i + AHEAD]);
        float w = row->p[c->pos[i]];
        s += w;
        attn[i] = w;
        normal &= w >= FLT_MIN;
    }
    *total = s;
    *exact &= normal;
}

static void plain_shares(const KVCache *c, const FullRow *rows, int n_heads, float *attn,
                         double *total, bool *exact)
{
    int h = 0;
    for (; h + 4 <= n_heads; h += 4)
        plain_shares4(c, rows + h, attn + (size_t)h * c->n, total + h, exact + h);
    for (; h < n_heads; h++)
        plain_shares1(c, rows + h, attn + (size_t)h * c->n, total + h, exact + h);
}

void cache_attention_heads(const KVCache *c, const FullRow *rows, int n_heads, float *attn,
                           CacheAttention *out)
{
    int n = c->n, n_exact = c->n - c->n_alt, t = rows[0].t;
    /* No slot before the window and no alt slot: every slot's share is its p, and summed in
     * slot order that sum is also the mass (the exact slots' p in slot order), when the mass is
     * not found another way. */
    bool plain = c->n_alt == 0 && attn_first_key(rows[0].window, t) == 0;
    if (!attn || !plain || n_exact == t + 1 || n_exact > (t + 1) / 2)
        retained_masses(c, rows, n_heads, n_exact, out);
    if (!attn) {
        for (int h = 0; h < n_heads; h++)
            out[h].denominator = 0;
        return;
    }
    /* The shares from the full row, while each is a normal number relative to it. */
    double exact_total[n_heads], alt_total[n_heads]; /* exact: summed directly, not 1 - missing */
    bool exact[n_heads];
    for (int h = 0; h < n_heads; h++) {
        exact_total[h] = alt_total[h] = 0;
        exact[h] = true;
    }
    if (plain) {
        plain_shares(c, rows, n_heads, attn, exact_total, exact);
        if (!(n_exact == t + 1 || n_exact > (t + 1) / 2))
            for (int h = 0; h < n_heads; h++)
                out[h].retained_mass = exact_total[h];
    } else {
        for (int i = 0; i < n; i++)
            for (int h = 0; h < n_heads; h++) {
                const FullRow *row = &rows[h];
                double w;
                if (slot_outside(c, i, row)) {
                    w = 0.0; /* before the window: no attention, exactly */
                } else if (c->alt_kv[i]) {
                    /* exp(s - max) / Z: the alt key's weight in units of the full row. */
                    w = exp(slot_logit(c, i, row) - row->logit_max) / row->logit_z;
                    alt_total[h] += w;
                    exact[h] &= w >= FLT_MIN && w <= 1.0 / FLT_EPSILON;
                } else {
                    w = row->p[c->pos[i]];
                    exact_total[h] += w;
                    exact[h] &= w >= FLT_MIN;
                }
                attn[(size_t)h * n + i] = (float)w;
            }
    }
    for (int h = 0; h < n_heads; h++) {
        float *a = attn + (size_t)h * n;
        out[h].denominator = exact_total[h] + alt_total[h];
        if (n == 0)
            continue;
        if (exact[h] && out[h].denominator > 0) {
            scale_floats(a, n, (float)(1.0 / out[h].denominator));
        } else {
            softmax_over_cache(c, &rows[h], a);
        }
    }
}

CacheAttention cache_attention(const KVCache *c, const FullRow *row, float *attn)
{
    CacheAttention ca;
    cache_attention_heads(c, row, 1, attn, &ca);
    return ca;
}

double overlap_mass(const KVCache *c, const FullRow *row, const float *attn)
{
    double m = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->pos[i] < 0)
            continue;
        double p = row->p[c->pos[i]], a = attn[i];
        m += p < a ? p : a;
    }
    return m;
}

/* Min-heap on (value, -index): the root is the weakest of the current top-k. */
static bool weaker(const float *p, int32_t a, int32_t b)
{
    return p[a] < p[b] || (p[a] == p[b] && a > b);
}

static void sift_down(const float *p, int32_t *heap, int k, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && weaker(p, heap[l], heap[m]))
            m = l;
        if (r < k && weaker(p, heap[r], heap[m]))
            m = r;
        if (m == i)
            return;
        int32_t tmp = heap[i];
        heap[i] = heap[m];
        heap[m] = tmp;
        i = m;
    }
}

/* Whether any of x[0..8) is above t (at_least: at or above). */
static inline bool any_of_8(const float *x, float t, bool at_least)
{
#if defined(__SSE__)
    __m128 v = _mm_set1_ps(t), a = _mm_loadu_ps(x), b = _mm_loadu_ps(x + 4);
    __m128 c = at_least ? _mm_or_ps(_mm_cmpge_ps(a, v), _mm_cmpge_ps(b, v))
                        : _mm_or_ps(_mm_cmpgt_ps(a, v), _mm_cmpgt_ps(b, v));
    return _mm_movemask_ps(c) != 0;
#else
    int any = 0;
    for (int r = 0; r < 8; r++)
        any |= at_least ? x[r] >= t : x[r] > t;
    return any;
#endif
}

/* max(x[0..n)), n a positive multiple of 4 (the maximum of finite floats: in any order). */
static inline float max_of(const float *x, int n)
{
#if defined(__SSE__)
    __m128 m = _mm_loadu_ps(x);
    for (int i = 4; i < n; i += 4)
        m = _mm_max_ps(m, _mm_loadu_ps(x + i));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
#else
    float m = x[0];
    for (int i = 1; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
#endif
}

/* The heap selection over idx[0..m) (ascending indices; NULL: 0 .. m-1): the k strongest of
 * them by (value, lower index), k <= m. */
static void heap_select(const float *p, const int32_t *idx, int m, int k, int32_t *out)
{
    for (int i = 0; i < k; i++)
        out[i] = idx ? idx[i] : i;
    for (int i = k / 2 - 1; i >= 0; i--)
        sift_down(p, out, k, i);
    /* Every index in the heap is below j, so j enters only if p[j] beats the weakest strictly
     * (on a tie the lower index wins). Most entries of an attention row do not: test eight at
     * a time against the current threshold, a loop the compiler vectorises. */
    float threshold = p[out[0]];
    int i = k;
    if (!idx) {
        for (; i + 8 <= m; i += 8) {
            if (!any_of_8(p + i, threshold, false))
                continue;
            for (int j = i; j < i + 8; j++)
                if (p[j] > p[out[0]]) {
                    out[0] = j;
                    sift_down(p, out, k, 0);
                }
            threshold = p[out[0]];
        }
    }
    for (; i < m; i++) {
        int32_t j = idx ? idx[i] : i;
        if (p[j] > p[out[0]]) {
            out[0] = j;
            sift_down(p, out, k, 0);
        }
    }
}

/* Of a long row, only the entries at or above a lower bound of the k-th largest value can be
 * among the k largest: the row in TOPK_CHUNKS * k chunks, the k-th largest of the chunks'
 * maxima is such a bound (k distinct entries reach it). The heap then sees those entries alone,
 * in the same order, and selects the same k. (An attention row often grows towards its recent
 * end, where nearly every entry would displace the heap's weakest.) */
enum { TOPK_CHUNKS = 4, TOPK_CANDIDATES = 2048 };

#if defined(__x86_64__) && defined(__GNUC__)
/* The indices j < n (a multiple of 16) with p[j] >= bound, ascending, into cand; -1 when there
 * are more than TOPK_CANDIDATES. Sixteen entries a compare: the same indices, in the same
 * order, as the eight-at-a-time scan in topk_indices. */
__attribute__((target("avx512f"))) static int candidates_avx512(const float *p, int n,
                                                                 float bound, int32_t *cand)
{
    const __m512 b = _mm512_set1_ps(bound);
    int nc = 0;
    for (int j = 0; j < n; j += 16) {
        unsigned mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + j), b, _CMP_GE_OQ);
        for (; mask; mask &= mask - 1) {
            if (nc == TOPK_CANDIDATES)
                return -1;
            cand[nc++] = j + __builtin_ctz(mask);
        }
    }
    return nc;
}
#endif

void topk_indices(const float *p, int n, int k, int32_t *out)
{
    int m = TOPK_CHUNKS * k;
    if (k < 1 || n < 2 * m || m > TOPK_CANDIDATES) {
        heap_select(p, NULL, n, k, out);
        return;
    }
    /* Whole chunks of a multiple of 4 entries (the entries after the last whole one take no
     * part in the bound, only in the scan below). */
    int len = ((n + m - 1) / m + 3) / 4 * 4, chunks = n / len;
    if (chunks < k) {
        heap_select(p, NULL, n, k, out);
        return;
    }
    /* The k-th largest chunk maximum: a min-heap of k maxima (values only), root the least. */
    float best[k];
    int filled = 0;
    for (int c = 0; c < chunks; c++) {
        float mx = max_of(p + (size_t)c * len, len);
        if (filled < k) {
            int i = filled++;
            best[i] = mx;
            while (i > 0 && best[(i - 1) / 2] > best[i]) { /* sift up */
                float tmp = best[i];
                best[i] = best[(i - 1) / 2];
                best[(i - 1) / 2] = tmp;
                i = (i - 1) / 2;
            }
        } else if (mx > best[0]) {
            best[0] = mx;
            for (int i = 0;;) { /* sift down */
                int l = 2 * i + 1, r = l + 1, s = i;
                if (l < k && best[l] < best[s])
                    s = l;
                if (r < k && best[r] < best[s])
                    s = r;
                if (s == i)
                    break;
                float tmp = best[i];
                best[i] = best[s];
                best[s] = tmp;
                i = s;
            }
        }
    }
    float bound = best[0];
    int32_t cand[TOPK_CANDIDATES];
    int nc = 0, j = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f")) {
        j = n - n % 16;
        nc = candidates_avx512(p, j, bound, cand);
        if (nc < 0) { /* a flat row: the plain selection */
            heap_select(p, NULL, n, k, out);
            return;
        }
    }
#endif
    for (; j + 8 <= n; j += 8) {
        if (!any_of_8(p + j, bound, true))
            continue;
        for (int i = j; i < j + 8; i++)
            if (p[i] >= bound) {
                if (nc == TOPK_CANDIDATES) { /* a flat row: the plain selection */
                    heap_select(p, NULL, n, k, out);
                    return;
                }
                cand[nc++] = i;
            }
    }
    for (; j < n; j++)
        if (p[j] >= bound) {
            if (nc == TOPK_CANDIDATES) {
                heap_select(p, NULL, n, k, out);
                return;
            }
            cand[nc++] = j;
        }
    heap_select(p, cand, nc, k, out);
}

double recall_at_k(const KVCache *c, const int32_t *topk, int k)
{
    int hit = 0;
    for (int i = 0; i < k; i++)
        hit += kvcache_has(c, topk[i]);
    return (double)hit / k;
}

bool output_errors_needed(const KVCache *c, int t)
{
    return !cache_is_complete(c, t);
}

/* The attention output over a cache, o_S[h] = sum_i attn[h][i] v_i, in float32 and in a fixed
 * order: the order in which OpenBLAS 0.3.21's Haswell sgemm adds (earlier versions gathered the
 * cache's values and called it; its result, bit for bit, on every shape up to 11 heads, is what
 * this repeats, so that no number changes), now written out here so that the values are read
 * where they lie, without the gather, the packing and the sgemm call per KV head and step:
 *   - the slots in blocks: OUT_BLOCK while twice that remains; between once and twice, half of
 *     what remains rounded up to a multiple of OUT_UNROLL; then all that remains;
 *   - in a block, a "split" head adds the products of its first multiple of OUT_UNROLL slots
 *     alternately into two sums (even slots, odd slots) and the rest into the first; any other
 *     head adds every product into one sum; each product is fused (fma), in slot order;
 *   - a block's value is the two sums added; o_S the blocks' values added in block order.
 * The first n_heads - n_heads % 4 heads are split (sgemm's 4-wide columns), the others not. */
enum { OUT_BLOCK = 320, OUT_UNROLL = 8, OUT_MAX_HEADS = 11 };

static int out_block_len(int left)
{
    if (left >= 2 * OUT_BLOCK)
        return OUT_BLOCK;
    if (left > OUT_BLOCK)
        return (left / 2 + OUT_UNROLL - 1) / OUT_UNROLL * OUT_UNROLL;
    return left;
}

/* One head, dimensions [d0, D), scalar: fmaf is exact-rounded, the same bits as the vector
 * loops (CPUs without FMA, and the last dimensions when D is not a multiple of 8). */
static void head_output_scalar(const float *const *vrow, const float *a, int n, int d0, int D,
                               bool split, float *o)
{
    for (int d = d0; d < D; d++) {
        float c = 0.0f;
        for (int ls = 0, len; ls < n; ls += len) {
            len = out_block_len(n - ls);
            int km = split ? len - len % OUT_UNROLL : 0, i = ls;
            float even = 0.0f, odd = 0.0f;
            for (; i < ls + km; i += 2) {
                even = fmaf(a[i], vrow[i][d], even);
                odd = fmaf(a[i + 1], vrow[i + 1][d], odd);
            }
            for (; i < ls + len; i++)
                even = fmaf(a[i], vrow[i][d], even);
            c = (odd + even) + c;
        }
        o[d] = c;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define OUT_AVX2 __attribute__((target("avx2,fma")))

/* The same, eight dimensions [d, d + 8) at a time (lanes are independent: the same bits). */
OUT_AVX2 static void head_output_avx2(const float *const *vrow, const float *a, int n, int D,
                                      bool split, float *o)
{
    int d = 0;
    for (; d + 16 <= D; d += 16) {
        __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
        for (int ls = 0, len; ls < n; ls += len) {
            len = out_block_len(n - ls);
            int km = split ? len - len % OUT_UNROLL : 0, i = ls;
            __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps();
            __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
            for (; i < ls + km; i += 2) {
                __m256 x = _mm256_set1_ps(a[i]), y = _mm256_set1_ps(a[i + 1]);
                const float *v = vrow[i] + d, *w = vrow[i + 1] + d;
                e0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v), e0);
                e1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + 8), e1);
                o0 = _mm256_fmadd_ps(y, _mm256_loadu_ps(w), o0);
                o1 = _mm256_fmadd_ps(y, _mm256_loadu_ps(w + 8), o1);
            }
            for (; i < ls + len; i++) {
                __m256 x = _mm256_set1_ps(a[i]);
                const float *v = vrow[i] + d;
                e0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v), e0);
                e1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + 8), e1);
            }
            c0 = _mm256_add_ps(_mm256_add_ps(o0, e0), c0);
            c1 = _mm256_add_ps(_mm256_add_ps(o1, e1), c1);
        }
        _mm256_storeu_ps(o + d, c0);
        _mm256_storeu_ps(o + d + 8, c1);
    }
    head_output_scalar(vrow, a, n, d, D, split, o);
}

/* The value rows a few slots ahead, fetched while the first sixteen dimensions are summed
 * (the rows are scattered over the layer's values; the later passes find them in cache). */
enum { OUT_AHEAD = 24 };

static inline void prefetch_rows(const void *const *vrow, int rows, int bytes)
{
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < bytes; b += 64)
            __builtin_prefetch((const char *)vrow[r] + b);
}

/* Two heads of the same kind (split or not) at once, sixteen dimensions at a time: each value
 * row read serves both (the same sums as head_output_avx2 for each). */
OUT_AVX2 static void head_pair_output_avx2(const float *const *vrow, const float *a,
                                           const float *b, int n, int D, bool split, float *oa,
                                           float *ob)
{
    int d = 0;
    for (; d + 16 <= D; d += 16) {
        __m256 ca0 = _mm256_setzero_ps(), ca1 = _mm256_setzero_ps();
        __m256 cb0 = _mm256_setzero_ps(), cb1 = _mm256_setzero_ps();
        for (int ls = 0, len; ls < n; ls += len) {
            len = out_block_len(n - ls);
            int km = split ? len - len % OUT_UNROLL : 0, i = ls;
            __m256 ea0 = _mm256_setzero_ps(), ea1 = _mm256_setzero_ps();
            __m256 oa0 = _mm256_setzero_ps(), oa1 = _mm256_setzero_ps();
            __m256 eb0 = _mm256_setzero_ps(), eb1 = _mm256_setzero_ps();
            __m256 ob0 = _mm256_setzero_ps(), ob1 = _mm256_setzero_ps();
            for (; i < ls + km; i += 2) {
                const float *v = vrow[i] + d, *w = vrow[i + 1] + d;
                if (d == 0 && i + OUT_AHEAD + 1 < n)
                    prefetch_rows((const void *const *)vrow + i + OUT_AHEAD, 2, D * 4);
                __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
                __m256 x = _mm256_set1_ps(a[i]), y = _mm256_set1_ps(b[i]);
                ea0 = _mm256_fmadd_ps(x, v0, ea0);
                ea1 = _mm256_fmadd_ps(x, v1, ea1);
                eb0 = _mm256_fmadd_ps(y, v0, eb0);
                eb1 = _mm256_fmadd_ps(y, v1, eb1);
                v0 = _mm256_loadu_ps(w);
                v1 = _mm256_loadu_ps(w + 8);
                x = _mm256_set1_ps(a[i + 1]);
                y = _mm256_set1_ps(b[i + 1]);
                oa0 = _mm256_fmadd_ps(x, v0, oa0);
                oa1 = _mm256_fmadd_ps(x, v1, oa1);
                ob0 = _mm256_fmadd_ps(y, v0, ob0);
                ob1 = _mm256_fmadd_ps(y, v1, ob1);
            }
            for (; i < ls + len; i++) {
                const float *v = vrow[i] + d;
                if (d == 0 && i + OUT_AHEAD < n)
                    prefetch_rows((const void *const *)vrow + i + OUT_AHEAD, 1, D * 4);
                __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
                __m256 x = _mm256_set1_ps(a[i]), y = _mm256_set1_ps(b[i]);
                ea0 = _mm256_fmadd_ps(x, v0, ea0);
                ea1 = _mm256_fmadd_ps(x, v1, ea1);
                eb0 = _mm256_fmadd_ps(y, v0, eb0);
                eb1 = _mm256_fmadd_ps(y, v1, eb1);
            }
            ca0 = _mm256_add_ps(_mm256_add_ps(oa0, ea0), ca0);
            ca1 = _mm256_add_ps(_mm256_add_ps(oa1, ea1), ca1);
            cb0 = _mm256_add_ps(_mm256_add_ps(ob0, eb0), cb0);
            cb1 = _mm256_add_ps(_mm256_add_ps(ob1, eb1), cb1);
        }
        _mm256_storeu_ps(oa + d, ca0);
        _mm256_storeu_ps(oa + d + 8, ca1);
        _mm256_storeu_ps(ob + d, cb0);
        _mm256_storeu_ps(ob + d + 8, cb1);
    }
    head_output_scalar(vrow, a, n, d, D, split, oa);
    head_output_scalar(vrow, b, n, d, D, split, ob);
}

/* Four split heads at once, with AVX-512's 32 registers: 16-lane vectors, each lane one
 * dimension, so that every lane adds exactly what an 8-lane AVX2 lane adds (the same fma and
 * additions, in the same order: the same sums as head_output_avx2 for each head). A pass takes
 * 32 dimensions (16 sums side by side for the even slots, 16 for the odd), so that a value row
 * is read from memory once per 32 dimensions; a last pass of 16 where D is not a multiple of 32. */
#define OUT_QUAD __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
/* The loops over heads and vectors unrolled, so that the sums live in registers. */
#define QUAD_UNROLL _Pragma("GCC unroll 4")

/* Sixteen values of a row from dimension d: float32, or halves widened (exactly: the same
 * floats). */
OUT_QUAD static inline __m512 load16(const void *row, int d, bool half)
{
    return half ? _mm512_cvtph_ps(
                      _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + d)))
                : _mm512_loadu_ps((const float *)row + d);
}

/* Dimensions [d, d + 16 * W) of the four heads (W = 1 or 2, a constant where inlined). */
OUT_QUAD static inline __attribute__((always_inline)) void
quad_pass(const void *const *vrow, bool half, const float *attn, int n, int D, int d, int W,
          float *out)
{
    const float *a[4] = {attn, attn + n, attn + 2 * (size_t)n, attn + 3 * (size_t)n};
    __m512 c[4][2];
    QUAD_UNROLL
    for (int h = 0; h < 4; h++)
        QUAD_UNROLL
        for (int z = 0; z < W; z++)
            c[h][z] = _mm512_setzero_ps();
    for (int ls = 0, len; ls < n; ls += len) {
        len = out_block_len(n - ls);
        int km = len - len % OUT_UNROLL, i = ls;
        __m512 e[4][2], o[4][2];
        QUAD_UNROLL
        for (int h = 0; h < 4; h++)
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                e[h][z] = o[h][z] = _mm512_setzero_ps();
        for (; i < ls + km; i += 2) {
            const void *v = vrow[i], *w = vrow[i + 1];
            if (d == 0 && i + OUT_AHEAD + 1 < n)
                prefetch_rows(vrow + i + OUT_AHEAD, 2, D * (half ? 2 : 4));
            __m512 r[2];
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                r[z] = load16(v, d + 16 * z, half);
            QUAD_UNROLL
            for (int h = 0; h < 4; h++) {
                __m512 x = _mm512_set1_ps(a[h][i]);
                QUAD_UNROLL
                for (int z = 0; z < W; z++)
                    e[h][z] = _mm512_fmadd_ps(x, r[z], e[h][z]);
            }
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                r[z] = load16(w, d + 16 * z, half);
            QUAD_UNROLL
            for (int h = 0; h < 4; h++) {
                __m512 y = _mm512_set1_ps(a[h][i + 1]);
                QUAD_UNROLL
                for (int z = 0; z < W; z++)
                    o[h][z] = _mm512_fmadd_ps(y, r[z], o[h][z]);
            }
        }
        for (; i < ls + len; i++) {
            const void *v = vrow[i];
            if (d == 0 && i + OUT_AHEAD < n)
                prefetch_rows(vrow + i + OUT_AHEAD, 1, D * (half ? 2 : 4));
            __m512 r[2];
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                r[z] = load16(v, d + 16 * z, half);
            QUAD_UNROLL
            for (int h = 0; h < 4; h++) {
                __m512 x = _mm512_set1_ps(a[h][i]);
                QUAD_UNROLL
                for (int z = 0; z < W; z++)
                    e[h][z] = _mm512_fmadd_ps(x, r[z], e[h][z]);
            }
        }
        QUAD_UNROLL
        for (int h = 0; h < 4; h++)
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                c[h][z] = _mm512_add_ps(_mm512_add_ps(o[h][z], e[h][z]), c[h][z]);
    }
    QUAD_UNROLL
    for (int h = 0; h < 4; h++)
        QUAD_UNROLL
        for (int z = 0; z < W; z++)
            _mm512_storeu_ps(out + (size_t)h * D + d + 16 * z, c[h][z]);
}

OUT_QUAD static inline __attribute__((always_inline)) void
quad_body(const void *const *vrow, bool half, const float *attn, int n, int D, float *out)
{
    int d = 0;
    for (; d + 32 <= D; d += 32)
        quad_pass(vrow, half, attn, n, D, d, 2, out);
    if (d + 16 <= D)
        quad_pass(vrow, half, attn, n, D, d, 1, out);
}

/* The four heads' o_S over float32 value rows (the dimensions beyond the last 16 as
 * head_output_scalar sums them), or over half rows (D a multiple of 16). */
OUT_QUAD static void head_quad_output(const float *const *vrow, const float *attn, int n, int D,
                                      float *out)
{
    quad_body((const void *const *)vrow, false, attn, n, D, out);
    int d = D - D % 16;
    for (int h = 0; h < 4; h++)
        head_output_scalar(vrow, attn + (size_t)h * n, n, d, D, true, out + (size_t)h * D);
}

OUT_QUAD static void head_quad_output_half(const uint16_t *const *vrow, const float *attn, int n,
                                           int D, float *out)
{
    quad_body((const void *const *)vrow, true, attn, n, D, out);
}

/* Nested caches (nested_metrics): four heads' running sums u[h] += w[h][i] * v_i over the
 * value rows in keep order, dimensions [d, d + 16 * W), each row read once for the four; at
 * i = sizes[s] the sums go to snap + s * stride + h * D. Each lane adds as the scalar loop does
 * (prefix_outputs_scalar: one fmaf per row, in row order): the same bits at any width. */
OUT_QUAD static inline __attribute__((always_inline)) void
prefix_quad_pass(const void *const *vrow, bool half, const float *w, int n, const int *sizes,
                 int n_sizes, int D, int d, int W, float *snap, size_t stride)
{
    const float *a[4] = {w, w + n, w + 2 * (size_t)n, w + 3 * (size_t)n};
    __m512 u[4][4];
    QUAD_UNROLL
    for (int h = 0; h < 4; h++)
        QUAD_UNROLL
        for (int z = 0; z < W; z++)
            u[h][z] = _mm512_setzero_ps();
    for (int s = 0, i = 0; s < n_sizes; s++) {
        for (; i < sizes[s]; i++) {
            if (d == 0 && i + OUT_AHEAD < n)
                prefetch_rows(vrow + i + OUT_AHEAD, 1, D * (half ? 2 : 4));
            __m512 r[4];
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                r[z] = load16(vrow[i], d + 16 * z, half);
            QUAD_UNROLL
            for (int h = 0; h < 4; h++) {
                __m512 x = _mm512_set1_ps(a[h][i]);
                QUAD_UNROLL
                for (int z = 0; z < W; z++)
                    u[h][z] = _mm512_fmadd_ps(x, r[z], u[h][z]);
            }
        }
        QUAD_UNROLL
        for (int h = 0; h < 4; h++)
            QUAD_UNROLL
            for (int z = 0; z < W; z++)
                _mm512_storeu_ps(snap + s * stride + (size_t)h * D + d + 16 * z, u[h][z]);
    }
}

/* prefix_quad_pass over every dimension (D a multiple of 16). */
OUT_QUAD static void prefix_outputs_quad(const void *const *vrow, bool half, const float *w,
                                         int n, const int *sizes, int n_sizes, int D,
                                         float *snap, size_t stride)
{
    int d = 0;
    for (; d + 64 <= D; d += 64)
        prefix_quad_pass(vrow, half, w, n, sizes, n_sizes, D, d, 4, snap, stride);
    for (; d + 16 <= D; d += 16)
        prefix_quad_pass(vrow, half, w, n, sizes, n_sizes, D, d, 1, snap, stride);
}

static bool cpu_has_fma(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* F16C (the half-row loads) comes with every x86 CPU that has AVX2 or AVX-512 (Ivy Bridge and
 * Piledriver on), and clang 14's __builtin_cpu_supports does not know "f16c": not asked. */
static bool cpu_has_avx512vl(void)
{
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}
#else
static bool cpu_has_avx512vl(void)
{
    return false;
}

static void head_quad_output(const float *const *vrow, const float *attn, int n, int D,
                             float *out)
{
    for (int h = 0; h < 4; h++)
        head_output_scalar(vrow, attn + (size_t)h * n, n, 0, D, true, out + (size_t)h * D);
}

static void head_quad_output_half(const uint16_t *const *vrow, const float *attn, int n, int D,
                                  float *out)
{
    (void)vrow, (void)attn, (void)n, (void)D, (void)out; /* never called: no AVX-512 here */
}

static void prefix_outputs_quad(const void *const *vrow, bool half, const float *w, int n,
                                const int *sizes, int n_sizes, int D, float *snap, size_t stride)
{
    /* never called: no AVX-512 here */
    (void)vrow, (void)half, (void)w, (void)n, (void)sizes, (void)n_sizes, (void)D, (void)snap;
    (void)stride;
}

static void head_pair_output_avx2(const float *const *vrow, const float *a, const float *b,
                                  int n, int D, bool split, float *oa, float *ob)
{
    head_output_scalar(vrow, a, n, 0, D, split, oa);
    head_output_scalar(vrow, b, n, 0, D, split, ob);
}

static void head_output_avx2(const float *const *vrow, const float *a, int n, int D, bool split,
                             float *o)
{
    head_output_scalar(vrow, a, n, 0, D, split, o);
}

static bool cpu_has_fma(void)
{
    return false;
}
#endif

/* o_S of every head into out[n_heads][D]; vrow[n] each slot's value row. */
static void cache_outputs(const float *const *vrow, int n, int D, int n_heads, const float *attn,
                          float *out)
{
    bool vector = cpu_has_fma(), quad = vector && cpu_has_avx512vl();
    int n_split = n_heads - n_heads % 4;
    for (int h = 0; h < n_heads;) {
        bool split = h < n_split;
        const float *a = attn + (size_t)h * n;
        if (quad && h + 4 <= n_split) {
            head_quad_output(vrow, a, n, D, out + (size_t)h * D);
            h += 4;
            continue;
        }
        if (vector && h + 1 < n_heads && (h + 1 < n_split) == split) {
            head_pair_output_avx2(vrow, a, a + n, n, D, split, out + (size_t)h * D,
                                  out + (size_t)(h + 1) * D);
            h += 2;
            continue;
        }
        if (vector)
            head_output_avx2(vrow, a, n, D, split, out + (size_t)h * D);
        else
            head_output_scalar(vrow, a, n, 0, D, split, out + (size_t)h * D);
        h++;
    }
}

/* ||o - o_full|| / ||o_full|| (0 when o_full is 0); o is overwritten with the difference. */
static double relative_error(float *o, const float *o_full, int D)
{
    cblas_saxpy(D, -1.0f, o_full, 1, o, 1);
    double norm_full = cblas_snrm2(D, o_full, 1);
    return norm_full > 0 ? cblas_snrm2(D, o, 1) / norm_full : 0.0;
}

void output_errors(const KVCache *c, const FullRow *rows, int n_heads, const float *attn,
                   float *scratch, double *err)
{
    int D = rows[0].head_dim, n = c->n;
    if (cache_is_complete(c, rows[0].t)) {
        for (int i = 0; i < n_heads; i++)
            err[i] = 0.0; /* the renormalisation is the identity: o_S = o_full */
        return;
    }
    float *out = scratch + (size_t)n * D;
    bool halves = rows[0].v16 && c->n_alt == 0 && n_heads % 4 == 0 && D % 16 == 0;
    if (halves && n_heads <= OUT_MAX_HEADS && cpu_has_fma() && cpu_has_avx512vl()) {
        /* Every slot exact and the values halves: half the bytes to read, the same floats. */
        const uint16_t **vrow = (const uint16_t **)(void *)scratch;
        for (int i = 0; i < n; i++)
            vrow[i] = rows[0].v16 + (size_t)c->pos[i] * D;
        for (int h = 0; h < n_heads; h += 4)
            head_quad_output_half(vrow, attn + (size_t)h * n, n, D, out + (size_t)h * D);
    } else if (n_heads <= OUT_MAX_HEADS) {
        /* Each slot's value row where it lies (the pointers fit in the gather's room). */
        const float **vrow = (const float **)(void *)scratch;
        for (int i = 0; i < n; i++)
            vrow[i] = c->alt_kv[i] ? c->alt_kv[i] + D : rows[0].v + (size_t)c->pos[i] * D;
        cache_outputs(vrow, n, D, n_heads, attn, out);
    } else {
        /* Gather the cache's values once for the whole group, then one sgemm: out = attn . V_S. */
        float *values = scratch;
        for (int i = 0; i < n; i++) {
            const float *v = c->alt_kv[i] ? c->alt_kv[i] + D : rows[0].v + (size_t)c->pos[i] * D;
            memcpy(values + (size_t)i * D, v, (size_t)D * sizeof(float));
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_heads, D, n, 1.0f, attn, n,
                    values, D, 0.0f, out, D);
    }
    for (int h = 0; h < n_heads; h++)
        err[h] = relative_error(out + (size_t)h * D, rows[h].o_full, D);
}

/* ---- Nested caches: sums in keep order, continued from one cache to the next ---- */

/* u[s][d] = the sum over i < sizes[s] of fmaf(w[i], vrow[i][d], .) in i order, for d in
 * [d0, D); snap[s * stride + d]. */
static void prefix_outputs_scalar(const float *const *vrow, const float *w, const int *sizes,
                                  int n_sizes, int d0, int D, float *snap, size_t stride)
{
    for (int d = d0; d < D; d++) {
        float u = 0.0f;
        for (int s = 0, i = 0; s < n_sizes; s++) {
            for (; i < sizes[s]; i++)
                u = fmaf(w[i], vrow[i][d], u);
            snap[s * stride + d] = u;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The same, 32 and then 8 dimensions at a time (each lane the scalar loop's fmaf sequence). */
OUT_AVX2 static void prefix_outputs_avx2(const float *const *vrow, const float *w,
                                         const int *sizes, int n_sizes, int D, float *snap,
                                         size_t stride)
{
    int d = 0;
    for (; d + 32 <= D; d += 32) {
        __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
        __m256 u2 = _mm256_setzero_ps(), u3 = _mm256_setzero_ps();
        for (int s = 0, i = 0; s < n_sizes; s++) {
            for (; i < sizes[s]; i++) {
                const float *v = vrow[i] + d;
                __m256 x = _mm256_set1_ps(w[i]);
                u0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v), u0);
                u1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + 8), u1);
                u2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + 16), u2);
                u3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + 24), u3);
            }
            float *o = snap + s * stride + d;
            _mm256_storeu_ps(o, u0);
            _mm256_storeu_ps(o + 8, u1);
            _mm256_storeu_ps(o + 16, u2);
            _mm256_storeu_ps(o + 24, u3);
        }
    }
    for (; d + 8 <= D; d += 8) {
        __m256 u = _mm256_setzero_ps();
        for (int s = 0, i = 0; s < n_sizes; s++) {
            for (; i < sizes[s]; i++)
                u = _mm256_fmadd_ps(_mm256_set1_ps(w[i]), _mm256_loadu_ps(vrow[i] + d), u);
            _mm256_storeu_ps(snap + s * stride + d, u);
        }
    }
    prefix_outputs_scalar(vrow, w, sizes, n_sizes, d, D, snap, stride);
}
#endif

static void prefix_outputs(const float *const *vrow, const float *w, const int *sizes,
                           int n_sizes, int D, float *snap, size_t stride)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_fma()) {
        prefix_outputs_avx2(vrow, w, sizes, n_sizes, D, snap, stride);
        return;
    }
#endif
    prefix_outputs_scalar(vrow, w, sizes, n_sizes, 0, D, snap, stride);
}

/* o_S of the cache order[0, n) when a share is not a normal float: the softmax of the logits
 * over its attended keys (double), then sum_i fmaf(share, v) in keep order. */
static void nested_softmax_output(const int32_t *order, int n, const FullRow *row, float *o)
{
    int D = row->head_dim, first = attn_first_key(row->window, row->t);
    double mx = -INFINITY, z = 0;
    double *logit = kv_malloc((size_t)(n > 0 ? n : 1) * sizeof *logit);
    for (int i = 0; i < n; i++) {
        logit[i] = order[i] < first ? -INFINITY : key_logit(row, row->k + (size_t)order[i] * D);
        mx = logit[i] > mx ? logit[i] : mx;
    }
    for (int i = 0; i < n; i++) {
        logit[i] = logit[i] == -INFINITY ? 0.0 : exp(logit[i] - mx);
        z += logit[i];
    }
    for (int d = 0; d < D; d++)
        o[d] = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = z > 0 ? (float)(logit[i] / z) : 0.0f;
        const float *v = row->v + (size_t)order[i] * D;
        for (int d = 0; d < D; d++)
            o[d] = fmaf(a, v[d], o[d]);
    }
    free(logit);
}

/* One head's shares in keep order into w[0, n) (0 before the window: adding it leaves the
 * double sum as it is), its running mass at each size into mass[s * n_heads], and in *bad the
 * first index whose attended share is not a normal float (n: none). */
static void nested_shares1(const int32_t *order, const int *sizes, int n_sizes,
                           const FullRow *row, int n_heads, int first, float *w, double *mass,
                           int *bad)
{
    const float *p = row->p;
    int n = n_sizes > 0 ? sizes[n_sizes - 1] : 0;
    double sum = 0;
    *bad = n;
    for (int s = 0, i = 0; s < n_sizes; s++) {
        for (; i < sizes[s]; i++) {
            int32_t j = order[i];
            float x = j < first ? 0.0f : p[j];
            w[i] = x;
            sum += x;
            if (x < FLT_MIN && j >= first && *bad == n)
                *bad = i;
        }
        mass[(size_t)s * n_heads] = sum;
    }
}

/* nested_shares1 for four heads side by side (each the same additions), positions fetched a
 * few slots ahead; w[h * n + i]. */
static void nested_shares4(const int32_t *order, const int *sizes, int n_sizes,
                           const FullRow *rows, int n_heads, int first, float *w, int n,
                           double *mass, int *bad)
{
    const float *p0 = rows[0].p, *p1 = rows[1].p, *p2 = rows[2].p, *p3 = rows[3].p;
    float *w0 = w, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    bool normal = true;
    for (int s = 0, i = 0; s < n_sizes; s++) {
        for (; i < sizes[s]; i++) {
            int32_t j = order[i];
            if (i + AHEAD < n) {
                int32_t f = order[i + AHEAD];
                __builtin_prefetch(p0 + f);
                __builtin_prefetch(p1 + f);
                __builtin_prefetch(p2 + f);
                __builtin_prefetch(p3 + f);
            }
            bool in = j >= first;
            float x0 = in ? p0[j] : 0.0f, x1 = in ? p1[j] : 0.0f;
            float x2 = in ? p2[j] : 0.0f, x3 = in ? p3[j] : 0.0f;
            s0 += x0;
            s1 += x1;
            s2 += x2;
            s3 += x3;
            w0[i] = x0;
            w1[i] = x1;
            w2[i] = x2;
            w3[i] = x3;
            normal &= !in || (x0 >= FLT_MIN && x1 >= FLT_MIN && x2 >= FLT_MIN && x3 >= FLT_MIN);
        }
        mass[(size_t)s * n_heads] = s0;
        mass[(size_t)s * n_heads + 1] = s1;
        mass[(size_t)s * n_heads + 2] = s2;
        mass[(size_t)s * n_heads + 3] = s3;
    }
    for (int h = 0; h < 4; h++)
        bad[h] = n;
    if (!normal) /* which of them, and where: a second look, rarely taken */
        for (int h = 0; h < 4; h++)
            for (int i = 0; i < n && bad[h] == n; i++)
                if (order[i] >= first && w[(size_t)h * n + i] < FLT_MIN)
                    bad[h] = i;
}

size_t nested_scratch_floats(int n_max, int n_sizes, int n_heads, int head_dim)
{
    /* value-row pointers (two floats each), the heads' shares, the snapshots */
    return 2 * (size_t)n_max + (size_t)n_heads * n_max + (size_t)n_sizes * n_heads * head_dim;
}

void nested_metrics(const int32_t *order, const int *sizes, int n_sizes, const FullRow *rows,
                    int n_heads, const int32_t *topk, int topk_stride, int k, float *scratch,
                    int32_t *rank_of, double *mass, double *err, double *recall)
{
    int t = rows[0].t, D = rows[0].head_dim, first = attn_first_key(rows[0].window, t);
    int n = n_sizes > 0 ? sizes[n_sizes - 1] : 0;
    const float **vrow = (const float **)(void *)scratch;
    float *share = scratch + 2 * (size_t)n; /* [n_heads][n] */
    float *snap = share + (size_t)n_heads * n; /* [n_sizes][n_heads][D] */
    /* The shares in keep order (0 before the query's window), each head's running mass at
     * every size, and where a share first is not a normal float. */
    int attended[n_sizes > 0 ? n_sizes : 1], bad_at[n_heads];
    int h = 0;
    for (; h + 4 <= n_heads; h += 4)
        nested_shares4(order, sizes, n_sizes, rows + h, n_heads, first, share + (size_t)h * n, n,
                       mass + h, bad_at + h);
    for (; h < n_heads; h++)
        nested_shares1(order, sizes, n_sizes, rows + h, n_heads, first, share + (size_t)h * n,
                       mass + h, bad_at + h);
    for (int s = 0, i = 0, count = 0; s < n_sizes; s++) {
        for (; i < sizes[s]; i++)
            count += order[i] >= first;
        attended[s] = count;
    }
    size_t stride = (size_t)n_heads * D;
    if (n_heads % 4 == 0 && D % 16 == 0 && cpu_has_fma() && cpu_has_avx512vl()) {
        /* Four heads per read of a value row, and halves where the values are (the same
         * floats, half the bytes). */
        bool half = rows[0].v16 != NULL;
        const void **row = (const void **)(void *)scratch;
        for (int i = 0; i < n; i++)
            row[i] = half ? (const void *)(rows[0].v16 + (size_t)order[i] * D)
                          : (const void *)(rows[0].v + (size_t)order[i] * D);
        for (int h = 0; h < n_heads; h += 4)
            prefix_outputs_quad(row, half, share + (size_t)h * n, n, sizes, n_sizes, D,
                                snap + (size_t)h * D, stride);
    } else {
        for (int i = 0; i < n; i++)
            vrow[i] = rows[0].v + (size_t)order[i] * D;
        for (int h = 0; h < n_heads; h++)
            prefix_outputs(vrow, share + (size_t)h * n, sizes, n_sizes, D,
                           snap + (size_t)h * D, stride);
    }
    for (int s = 0; s < n_sizes; s++)
        for (int h = 0; h < n_heads; h++) {
            size_t at = (size_t)s * n_heads + h;
            if (attended[s] == t + 1 - first) { /* every attended key: the full row itself */
                mass[at] = 1.0;
                err[at] = 0.0;
                continue;
            }
            float *o = snap + at * D;
            if (sizes[s] <= bad_at[h] && mass[at] > 0)
                scale_floats(o, D, (float)(1.0 / mass[at]));
            else
                nested_softmax_output(order, sizes[s], &rows[h], o);
            err[at] = relative_error(o, rows[h].o_full, D);
        }
    /* recall@k: a top-k position counts for every cache from the size past its rank on. */
    for (int i = 0; i < n; i++)
        rank_of[order[i]] = i;
    for (int h = 0; h < n_heads; h++) {
        int from[n_sizes > 0 ? n_sizes : 1];
        for (int s = 0; s < n_sizes; s++)
            from[s] = 0;
        for (int r = 0; r < k; r++) {
            int32_t j = topk[(size_t)h * topk_stride + r], i = rank_of[j];
            if (i < 0 || i >= n || order[i] != j)
                continue; /* not cached (rank_of holds another cache's leftovers) */
            int s = 0;
            while (sizes[s] <= i)
                s++;
            from[s]++;
        }
        for (int s = 0, hits = 0; s < n_sizes; s++) {
            hits += from[s];
            recall[(size_t)s * n_heads + h] = (double)hits / k;
        }
    }
}

double needle_survival(const KVCache *c, const TraceMeta *meta, int t)
{
    int total = 0, kept = 0;
    for (int n = 0; n < meta->n_needles; n++) {
        int end = meta->needles[2 * n + 1] < t + 1 ? meta->needles[2 * n + 1] : t + 1;
        for (int j = meta->needles[2 * n]; j < end; j++) {
            total++;
            kept += kvcache_has(c, j);
        }
    }
    return total ? (double)kept / total : NAN;
}

void needle_survival_by_turn(const KVCache *c, const TraceMeta *meta, const int32_t *turn_of,
                             int t, int n_dist, double *out)
{
    int total[n_dist], kept[n_dist];
    for (int d = 0; d < n_dist; d++)
        total[d] = kept[d] = 0;
    for (int n = 0; n < meta->n_needles; n++) {
        int start = meta->needles[2 * n];
        if (start > t)
            continue; /* a needle of a later turn, or later in this one */
        int d = turn_of[t] - turn_of[start];
        d = d < n_dist - 1 ? d : n_dist - 1;
        int end = meta->needles[2 * n + 1] < t + 1 ? meta->needles[2 * n + 1] : t + 1;
        for (int j = start; j < end; j++) {
            total[d]++;
            kept[d] += kvcache_has(c, j);
        }
    }
    for (int d = 0; d < n_dist; d++)
        out[d] = total[d] ? (double)kept[d] / total[d] : NAN;
}
