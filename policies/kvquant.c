/* The KV quantization layer: see kvquant.h. */
#include "policies/kvquant.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/half.h"

static const char *const kind_names[KVQ_N_KINDS] = {"none", "kivi2", "kivi4", "mlx4", "mlx8"};
static const int kind_bits[KVQ_N_KINDS] = {16, 2, 4, 4, 8};

int kvq_parse(const char *name)
{
    for (int k = 0; k < KVQ_N_KINDS; k++)
        if (!strcmp(name, kind_names[k]))
            return k;
    return -1;
}

const char *kvq_name(int kind)
{
    return kind_names[kind];
}

int kvq_bits(int kind)
{
    return kind_bits[kind];
}

bool kvq_is_kivi(int kind)
{
    return kind == KVQ_KIVI2 || kind == KVQ_KIVI4;
}

int kvq_group(const KvQuantSpec *spec)
{
    if (spec->group > 0)
        return spec->group;
    return kvq_is_kivi(spec->kind) ? 32 : 64; /* KIVI's scripts and mlx-lm's kv_group_size */
}

int kvq_validate(const KvQuantSpec *spec, KvErr *err)
{
    if (kvq_is_kivi(spec->kind) && spec->residual % kvq_group(spec) != 0)
        return kv_fail(err, "kv_quant_residual = %d: expected a multiple of the group size %d "
                            "(KIVI quantizes its residual keys in whole groups)",
                       spec->residual, kvq_group(spec));
    return 0;
}

/* A number as the references store it: a 16-bit float. */
static float as_half(float x)
{
    return float_from_half(half_from_float(x));
}

void kvq_kivi_group(const float *x, int n, int stride, int bits, float *out)
{
    float mn = x[0], mx = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    float max_int = (float)((1 << bits) - 1);
    float scale = as_half((mx - mn) / max_int), zero = as_half(mn);
    for (int i = 0; i < n; i++) {
        float q = 0;
        if (scale > 0) {
            q = (x[(size_t)i * stride] - zero) / scale;
            q = nearbyintf(q < 0 ? 0 : q > max_int ? max_int : q); /* ties to even, as torch */
        }
        out[(size_t)i * stride] = q * scale + zero;
    }
}

void kvq_mlx_group(const float *x, int n, int stride, int bits, float *out)
{
    float w_min = x[0], w_max = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        w_min = v < w_min ? v : w_min;
        w_max = v > w_max ? v : w_max;
    }
    float n_bins = (float)((1 << bits) - 1);
    bool mask = fabsf(w_min) > fabsf(w_max);
    float scale = (w_max - w_min) / n_bins;
    scale = scale > 1e-7f ? scale : 1e-7f;
    scale = mask ? scale : -scale;
    float edge = mask ? w_min : w_max;
    float q0 = nearbyintf(edge / scale);
    if (q0 != 0)
        scale = edge / q0;
    float bias = q0 == 0 ? 0.0f : edge;
    scale = as_half(scale);
    bias = as_half(bias);
    for (int i = 0; i < n; i++) {
        float q = nearbyintf((x[(size_t)i * stride] - bias) / scale);
        q = q < 0 ? 0 : q > n_bins ? n_bins : q;
        out[(size_t)i * stride] = q * scale + bias;
    }
}

void kvq_token(int kind, int group, const float *x, int head_dim, float *out)
{
    for (int c0 = 0; c0 < head_dim; c0 += group) {
        int n = head_dim - c0 < group ? head_dim - c0 : group;
        if (kvq_is_kivi(kind))
            kvq_kivi_group(x + c0, n, 1, kvq_bits(kind), out + c0);
        else
            kvq_mlx_group(x + c0, n, 1, kvq_bits(kind), out + c0);
    }
}

double kvq_vector_bytes(const KvQuantSpec *spec, int head_dim, int kv_bits, bool is_key,
                        bool quantized)
{
    if (!quantized || spec->kind == KVQ_NONE)
        return head_dim * kv_bits / 8.0;
    int group = kvq_group(spec);
    double payload = head_dim * kvq_bits(spec->kind) / 8.0;
    if (is_key && kvq_is_kivi(spec->kind))
        return payload + head_dim * 4.0 / group; /* scale and min per channel per `group` tokens */
    return payload + 4.0 * ((head_dim + group - 1) / group); /* scale and min/bias per group */
}

/* ---- The layer's state ---- */

enum { K_QUANT = 1, V_QUANT = 2 };

struct KvQuantState {
    KvQuantSpec spec;
    int group, bits, n_kv_heads, n_tokens, head_dim;
    uint8_t *flags;   /* [n_kv_heads][T]: K_QUANT | V_QUANT of the position's slot */
    uint64_t *stamp;  /* [n_kv_heads][T]: the alt_stamp of the layer's last write there, to
                       * tell its slots from ones the policy has rewritten since */
    int32_t *kfull, *vfull; /* [T] scratch: positions with full-precision K, V */
    float *buf;       /* [max(group, 4)][head_dim] scratch: one token's quantized V, K and V
                       * stored, quantized K */
};

KvQuantState *kvq_state_new(const KvQuantSpec *spec, const LayerView *L)
{
    KvQuantState *q = kv_calloc(1, sizeof *q);
    q->spec = *spec;
    q->group = kvq_group(spec);
    q->bits = kvq_bits(spec->kind);
    q->n_kv_heads = L->n_kv_heads;
    q->n_tokens = L->n_tokens;
    q->head_dim = L->head_dim;
    q->flags = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, 1);
    q->stamp = kv_calloc((size_t)L->n_kv_heads * L->n_tokens, sizeof *q->stamp);
    q->kfull = kv_malloc((size_t)L->n_tokens * sizeof *q->kfull);
    q->vfull = kv_malloc((size_t)L->n_tokens * sizeof *q->vfull);
    int rows = q->group > 4 ? q->group : 4;
    q->buf = kv_malloc((size_t)rows * L->head_dim * sizeof *q->buf);
    return q;
}

void kvq_state_free(KvQuantState *q)
{
    if (!q)
        return;
    free(q->flags);
    free(q->stamp);
    free(q->kfull);
    free(q->vfull);
    free(q->buf);
    free(q);
}

void kvq_state_reset(KvQuantState *q)
{
    memset(q->flags, 0, (size_t)q->n_kv_heads * q->n_tokens);
}

static int compare_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The K and V slot s holds now: its alt_kv, or the trace's. */
static const float *slot_k(const KVCache *c, const LayerView *L, int g, int s)
{
    return c->alt_kv[s] ? c->alt_kv[s] : L->k + ((size_t)g * L->n_tokens + c->pos[s]) * L->head_dim;
}

static const float *slot_v(const KVCache *c, const LayerView *L, int g, int s)
{
    return c->alt_kv[s] ? c->alt_kv[s] + L->head_dim
                        : L->v + ((size_t)g * L->n_tokens + c->pos[s]) * L->head_dim;
}

/* Stores new K (or NULL: unchanged) and V (or NULL) into the slot of pos. */
static void store(KvQuantState *q, KVCache *c, const LayerView *L, int g, int pos, const float *k,
                  const float *v, float *tmp)
{
    int s = c->slot_of[pos], D = L->head_dim;
    memcpy(tmp, k ? k : slot_k(c, L, g, s), (size_t)D * sizeof *tmp);
    memcpy(tmp + D, v ? v : slot_v(c, L, g, s), (size_t)D * sizeof *tmp);
    int slot = kvcache_add_alt(c, pos, tmp, tmp + D);
    q->stamp[(size_t)g * q->n_tokens + pos] = c->alt_stamp[slot];
}

static void apply_head(KvQuantState *q, KVCache *c, const LayerView *L, int g, KvQuantMoment when)
{
    int T = q->n_tokens, D = q->head_dim, G = q->group;
    uint8_t *flags = q->flags + (size_t)g * T;
    int nk = 0, nv = 0;
    for (int s = 0; s < c->n; s++) {
        int pos = c->pos[s];
        if (pos < 0)
            continue;
        if (!c->alt_kv[s])
            flags[pos] = 0; /* exact K/V: admitted (again) at full precision */
        else if (flags[pos] && c->alt_stamp[s] != q->stamp[(size_t)g * T + pos])
            flags[pos] = 0; /* the policy wrote its own K/V there since */
        if (c->alt_kv[s] && !flags[pos])
            continue; /* the policy's own approximation */
        if (!(flags[pos] & K_QUANT))
            q->kfull[nk++] = pos;
        if (!(flags[pos] & V_QUANT))
            q->vfull[nv++] = pos;
    }
    /* One token's quantized V, the K and V stored (2 rows), its quantized K. */
    float *tok = q->buf, *tmp = q->buf + D, *kq = q->buf + 3 * (size_t)D;
    if (!kvq_is_kivi(q->spec.kind)) {
        if (when == KVQ_AFTER_OBSERVE)
            return;
        /* mlx-lm quantizes every token's K and V as it enters the cache. */
        for (int i = 0; i < nk; i++) {
            int pos = q->kfull[i];
            kvq_token(q->spec.kind, G, L->k + ((size_t)g * T + pos) * D, D, kq);
            kvq_token(q->spec.kind, G, L->v + ((size_t)g * T + pos) * D, D, tok);
            store(q, c, L, g, pos, kq, tok, tmp);
            flags[pos] = K_QUANT | V_QUANT;
        }
        return;
    }
    if (when == KVQ_AFTER_STEP)
        return; /* KIVI quantizes after the query attended, the new token in the residual */
    int R = q->spec.residual;
    qsort(q->kfull, (size_t)nk, sizeof *q->kfull, compare_i32);
    qsort(q->vfull, (size_t)nv, sizeof *q->vfull, compare_i32);
    /* Keys: the residual's oldest floor(nk / R) * R (prefill: all but nk mod R; decode: the whole
     * residual once it reaches R), per channel over groups of G tokens. */
    int kq_n = nk / R * R;
    float *grp = kv_malloc((size_t)G * D * sizeof *grp);
    float *deq = kv_malloc((size_t)G * D * sizeof *deq);
    for (int b = 0; b < kq_n; b += G) {
        for (int i = 0; i < G; i++)
            memcpy(grp + (size_t)i * D, L->k + ((size_t)g * T + q->kfull[b + i]) * D,
                   (size_t)D * sizeof *grp);
        for (int d = 0; d < D; d++)
            kvq_kivi_group(grp + d, G, D, q->bits, deq + d);
        for (int i = 0; i < G; i++) {
            int pos = q->kfull[b + i];
            store(q, c, L, g, pos, deq + (size_t)i * D, NULL, tmp);
            flags[pos] |= K_QUANT;
        }
    }
    free(grp);
    free(deq);
    /* Values: every one but the last R, per token. */
    for (int i = 0; i + R < nv; i++) {
        int pos = q->vfull[i];
        kvq_token(q->spec.kind, G, L->v + ((size_t)g * T + pos) * D, D, tok);
        store(q, c, L, g, pos, NULL, tok, tmp);
        flags[pos] |= V_QUANT;
    }
}

void kvq_apply(KvQuantState *q, Policy *p, const LayerView *L, KvQuantMoment when)
{
    for (int g = 0; g < p->n_kv_heads; g++)
        apply_head(q, &p->cache[g], L, g, when);
}

bool kvq_slot_quantized(const KvQuantState *q, const Policy *p, int g, int s)
{
    const KVCache *c = &p->cache[g];
    size_t at = (size_t)g * q->n_tokens + c->pos[s];
    return c->pos[s] >= 0 && c->alt_kv[s] && q->flags[at] && c->alt_stamp[s] == q->stamp[at];
}

double kvq_bytes_saved(const KvQuantState *q, const Policy *p, int kv_bits)
{
    int D = q->head_dim;
    double full = kvq_vector_bytes(&q->spec, D, kv_bits, true, false);
    double kq = full - kvq_vector_bytes(&q->spec, D, kv_bits, true, true);
    double vq = full - kvq_vector_bytes(&q->spec, D, kv_bits, false, true);
    double saved = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        for (int s = 0; s < c->n; s++) {
            if (!kvq_slot_quantized(q, p, g, s))
                continue;
            uint8_t f = q->flags[(size_t)g * q->n_tokens + c->pos[s]];
            saved += (f & K_QUANT ? kq : 0) + (f & V_QUANT ? vq : 0);
        }
    }
    return saved;
}
