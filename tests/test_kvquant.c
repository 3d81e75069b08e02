/* The KV quantization layer (policies/kvquant.h, [policy.X] kv_quant): the quantizers against
 * hand-computed values and their error bounds, the byte counts, where KIVI's full-precision
 * residual ends and what mlx quantizes, and every policy type driven with kv_quant set (its
 * budget, the residual's bounds, the device bytes, the quantized values). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "policies/kvquant.h"
#include "sim/base/half.h"
#include "sim/driver/driver.h"
#include "sim/replay/report.h"
#include "tests/support/fixture.h"
#include "tests/support/scratch.h"

enum { HQ = 4, HKV = 2, D = 16, T = 160, P = 96 };
static const uint64_t SEED = 7;

/* ---- The quantizers, by hand ---- */

static void expect_floats(const float *got, const float *want, int n)
{
    for (int i = 0; i < n; i++)
        if (got[i] != want[i])
            fail_msg("value %d: got %.9g, expected %.9g", i, got[i], want[i]);
}

static void test_kivi_group_by_hand(void **state)
{
    (void)state;
    float out[4];
    /* 2 bits: min 0, max 3, scale 1; 0.4 rounds to 0, 1.6 to 2. */
    kvq_kivi_group((const float[]){0, 0.4f, 1.6f, 3}, 4, 1, 2, out);
    expect_floats(out, (const float[]){0, 0, 2, 3}, 4);
    /* Ties go to even, as torch.round: 0.5 -> 0, 2.5 -> 2. */
    kvq_kivi_group((const float[]){0, 0.5f, 2.5f, 3}, 4, 1, 2, out);
    expect_floats(out, (const float[]){0, 0, 2, 3}, 4);
    /* 4 bits: min -1, max 2.75, scale 3.75 / 15 = 0.25; 0.1 -> q 4.4 -> 4 -> 0; 0.6 -> 6 -> 0.5. */
    kvq_kivi_group((const float[]){-1, 0.1f, 0.6f, 2.75f}, 4, 1, 4, out);
    expect_floats(out, (const float[]){-1, 0, 0.5f, 2.75f}, 4);
    /* A strided group (a channel across tokens) leaves the other values alone. */
    float x[6] = {0, 9, 1.6f, 9, 3, 9}, y[6] = {-5, -5, -5, -5, -5, -5};
    kvq_kivi_group(x, 3, 2, 2, y);
    expect_floats(y, (const float[]){0, -5, 2, -5, 3, -5}, 6);
    /* A constant group comes back as itself. */
    kvq_kivi_group((const float[]){1.5f, 1.5f}, 2, 1, 2, out);
    expect_floats(out, (const float[]){1.5f, 1.5f}, 2);
}

static void test_mlx_group_by_hand(void **state)
{
    (void)state;
    float out[4];
    /* 2 bits, n_bins 3: |max| 2 > |min| 1.75, so the edge is the max: scale -(3.75 / 3) =
     * -1.25, q0 = round(2 / -1.25) = -2, scale = 2 / -2 = -1, bias 2; q = round(2 - x) clamped
     * to [0, 3]: -1.75 -> 3.75 -> 3 -> -1; 0 -> 2 -> 0; 0.5 -> 1.5 -> 2 (to even) -> 0. */
    kvq_mlx_group((const float[]){-1.75f, 0, 0.5f, 2}, 4, 1, 2, out);
    expect_floats(out, (const float[]){-1, 0, 0, 2}, 4);
    /* The min has the larger magnitude: scale 2.5 / 3, q0 = round(-2 / 0.833) = -2, scale 1,
     * bias -2; 0.5 -> q 2.5 -> 2 -> 0. */
    kvq_mlx_group((const float[]){-2, 0.5f}, 2, 1, 2, out);
    expect_floats(out, (const float[]){-2, 0}, 2);
    /* The edge of larger magnitude is exact (mlx's choice of scale), here 8 bits. */
    float x[5] = {-0.3f, 0.7f, 1.9f, -3.1f, 0.05f}, y[5];
    kvq_mlx_group(x, 5, 1, 8, y);
    if (y[3] != float_from_half(half_from_float(-3.1f)))
        fail_msg("the edge -3.1 came back as %.9g", y[3]);
}

/* Random groups: every value within half a step (KIVI; plus the halves' rounding) or one step
 * (mlx, whose rescaled step may leave the far edge a fraction of a step outside) of its own. */
static void test_error_bounds(void **state)
{
    (void)state;
    Fixture *fx = fixture_new(1, 1, 64, 64, 64);
    fixture_randomize(fx, SEED, 2.0);
    float out[64];
    for (int bits = 2; bits <= 8; bits *= 2)
        for (int t = 0; t < 64; t++) {
            float x[64];
            for (int i = 0; i < 64; i++) /* values a trace holds: halves */
                x[i] = float_from_half(half_from_float(fx_k(fx, 0, t)[i]));
            float mn = x[0], mx = x[0];
            for (int i = 1; i < 64; i++) {
                mn = x[i] < mn ? x[i] : mn;
                mx = x[i] > mx ? x[i] : mx;
            }
            double step = (mx - mn) / ((1 << bits) - 1);
            kvq_kivi_group(x, 64, 1, bits, out);
            for (int i = 0; i < 64; i++)
                if (fabs(out[i] - x[i]) > step / 2 + (mx - mn) * 2e-3)
                    fail_msg("kivi %d bits: |%g - %g| above half a step %g", bits, out[i], x[i],
                             step / 2);
            kvq_mlx_group(x, 64, 1, bits, out);
            for (int i = 0; i < 64; i++)
                if (fabs(out[i] - x[i]) > step + (mx - mn) * 2e-3)
                    fail_msg("mlx %d bits: |%g - %g| above a step %g", bits, out[i], x[i], step);
        }
    fixture_free(fx);
}

static void test_bytes(void **state)
{
    (void)state;
    KvQuantSpec kivi2 = {KVQ_KIVI2, 0, 128}, kivi4 = {KVQ_KIVI4, 0, 128}, mlx4 = {KVQ_MLX4, 0, 0},
                mlx8 = {KVQ_MLX8, 0, 0}, none = {KVQ_NONE, 0, 0};
    /* head_dim 32, KIVI group 32: 32 x 2 / 8 = 8 bytes, plus 4 per group of 32 values. */
    assert_true(kvq_vector_bytes(&kivi2, 32, 16, true, true) == 12);
    assert_true(kvq_vector_bytes(&kivi2, 32, 16, false, true) == 12);
    assert_true(kvq_vector_bytes(&kivi2, 32, 16, true, false) == 64);
    /* head_dim 128: keys 64 + 128 channels x 4 / 32 tokens; values 64 + 4 groups x 4. */
    assert_true(kvq_vector_bytes(&kivi4, 128, 16, true, true) == 80);
    assert_true(kvq_vector_bytes(&kivi4, 128, 16, false, true) == 80);
    /* mlx, group 64: head_dim 128 at 4 bits 64 + 2 groups x 4; 32 channels: one shorter group. */
    assert_true(kvq_vector_bytes(&mlx4, 128, 16, true, true) == 72);
    assert_true(kvq_vector_bytes(&mlx4, 32, 16, false, true) == 20);
    assert_true(kvq_vector_bytes(&mlx8, 128, 16, false, true) == 136);
    assert_true(kvq_vector_bytes(&none, 128, 16, true, true) == 256);
    assert_true(kvq_group(&kivi2) == 32 && kvq_group(&mlx8) == 64);
    KvQuantSpec odd = {KVQ_KIVI2, 32, 48};
    KvErr err;
    assert_int_equal(kvq_validate(&odd, &err), -1);
    assert_non_null(strstr(err.msg, "kv_quant_residual"));
    assert_int_equal(kvq_parse("mlx8"), KVQ_MLX8);
    assert_int_equal(kvq_parse("kivi3"), -1);
}

/* ---- The layer under a policy, through the driver ---- */

/* Each query head's attention over its cache's slots (their alt K where set), as the replay
 * gives observe: attn[g] is [group][n]. */
static void cache_attention(const Fixture *fx, const Policy *p, int t, float **attn)
{
    const LayerView *L = &fx->L;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        attn[g] = realloc(attn[g], (size_t)L->group * (c->n + 1) * sizeof(float));
        for (int i = 0; i < L->group; i++) {
            int h = g * L->group + i;
            const float *q = L->q + ((size_t)h * L->n_tokens + t) * D;
            double mx = -INFINITY, z = 0, *lg = malloc((size_t)(c->n + 1) * sizeof *lg);
            for (int s = 0; s < c->n; s++) {
                const float *k = c->alt_kv[s]
                                     ? c->alt_kv[s]
                                     : L->k + ((size_t)g * L->n_tokens + c->pos[s]) * D;
                double dot = 0;
                for (int d = 0; d < D; d++)
                    dot += (double)q[d] * k[d];
                lg[s] = dot * L->attn_scale;
                mx = lg[s] > mx ? lg[s] : mx;
            }
            for (int s = 0; s < c->n; s++)
                z += (lg[s] = exp(lg[s] - mx));
            for (int s = 0; s < c->n; s++)
                attn[g][(size_t)i * c->n + s] = (float)(lg[s] / z);
            free(lg);
        }
    }
}

static const float *trace_k(const Fixture *fx, int g, int pos)
{
    return fx->L.k + ((size_t)g * fx->L.n_tokens + pos) * D;
}

static const float *trace_v(const Fixture *fx, int g, int pos)
{
    return fx->L.v + ((size_t)g * fx->L.n_tokens + pos) * D;
}

/* Whether slot s holds the trace's exact K (V). */
static bool exact_k(const Fixture *fx, const KVCache *c, int g, int s)
{
    return !c->alt_kv[s] || !memcmp(c->alt_kv[s], trace_k(fx, g, c->pos[s]), D * sizeof(float));
}

static bool exact_v(const Fixture *fx, const KVCache *c, int g, int s)
{
    return !c->alt_kv[s] ||
           !memcmp(c->alt_kv[s] + D, trace_v(fx, g, c->pos[s]), D * sizeof(float));
}

typedef struct {
    Fixture *fx;
    PolicySpec spec;
    PolicyDriver d;
    float *attn[HKV];
} Run;

static void run_start(Run *r, const char *type, const char *params, KvQuantSpec quant,
                      const TraceSpan *spans, int n_spans)
{
    memset(r, 0, sizeof *r);
    r->fx = fixture_new(HQ, HKV, D, T, P);
    fixture_randomize(r->fx, SEED, 1.0);
    if (spans)
        fixture_set_spans(r->fx, spans, n_spans);
    r->spec.type = policy_find(type);
    snprintf(r->spec.label, sizeof r->spec.label, "%s", type);
    r->spec.params = fixture_params(r->spec.type, params);
    r->spec.quant = quant;
    KvErr err;
    if (driver_create(&r->d, &r->fx->L, &r->spec, 1, SEED, 16, SLIDING_COMPRESS, false, &err) != 0)
        fail_msg("%s (%s): %s", type, params, err.msg);
}

static void run_step(Run *r, int t, float *full)
{
    fixture_full_attn(r->fx, t, full);
    driver_step(&r->d, 0, t, full);
    cache_attention(r->fx, r->d.inst[0], t, r->attn);
    driver_observe(&r->d, 0, (const float *const *)r->attn);
}

static void run_end(Run *r)
{
    driver_free(&r->d);
    for (int g = 0; g < HKV; g++)
        free(r->attn[g]);
    free(r->spec.params);
    fixture_free(r->fx);
}

/* KIVI under the full cache, residual 32, group 32 (as the reference: after the prompt of 96
 * tokens the keys of [0, 96) are quantized in three groups of 32 tokens, none left in the
 * residual since 96 mod 32 = 0; the values of [0, 64) are, the last 32 at full precision). Then
 * the residual's keys fill up and are quantized at the step that brings it to 32. */
static void test_kivi_residual(void **state)
{
    (void)state;
    Run r;
    run_start(&r, "full", "", (KvQuantSpec){KVQ_KIVI2, 32, 32}, NULL, 0);
    driver_prefill(&r.d, 0, P, 0, P);
    const KVCache *c = &r.d.inst[0]->cache[0];
    float col[32], want[32], v[D];
    for (int pos = 0; pos < P; pos++) {
        int s = c->slot_of[pos];
        assert_true(s >= 0);
        /* The key's channel 3, quantized with its group of 32 tokens. */
        int b = pos / 32 * 32;
        for (int i = 0; i < 32; i++)
            col[i] = trace_k(r.fx, 0, b + i)[3];
        kvq_kivi_group(col, 32, 1, 2, want);
        if (c->alt_kv[s][3] != want[pos - b])
            fail_msg("key %d channel 3: %g, expected %g", pos, c->alt_kv[s][3], want[pos - b]);
        kvq_token(KVQ_KIVI2, 32, trace_v(r.fx, 0, pos), D, v);
        if (pos < P - 32)
            expect_floats(c->alt_kv[s] + D, v, D);
        else
            assert_true(exact_v(r.fx, c, 0, s));
    }
    float *full = malloc((size_t)HQ * T * sizeof *full);
    for (int t = P; t < P + 32; t++) {
        run_step(&r, t, full);
        /* Keys [96, t] stay in the residual until it holds 32 (t = 127), then all go. */
        for (int pos = P; pos <= t; pos++)
            assert_int_equal(exact_k(r.fx, c, 0, c->slot_of[pos]), t < P + 31);
        /* Values: exactly the last 32 at full precision. */
        for (int pos = 0; pos <= t; pos++)
            assert_int_equal(exact_v(r.fx, c, 0, c->slot_of[pos]), pos > t - 32);
    }
    /* Device bytes: 128 tokens per head: keys all 2-bit (16 x 2 / 8 + 16 x 4 / 32 = 6 bytes),
     * values 96 at 2 bits (4 + 4 = 8 bytes) and 32 at 16 bits (32 bytes). */
    MemReport m;
    driver_memory_report(&r.d, 0, &m);
    assert_true(m.device_bytes == HKV * (128 * 6.0 + 96 * 8 + 32 * 32));
    free(full);
    run_end(&r);
}

/* mlx: every token's K and V quantized before its query attends, and the bytes. */
static void test_mlx_on_arrival(void **state)
{
    (void)state;
    Run r;
    run_start(&r, "window", "window=24 sinks=4", (KvQuantSpec){KVQ_MLX4, 0, 128}, NULL, 0);
    driver_prefill(&r.d, 0, P, 0, P);
    float *full = malloc((size_t)HQ * T * sizeof *full), k[D], v[D];
    for (int t = P; t < T; t++) {
        fixture_full_attn(r.fx, t, full);
        driver_step(&r.d, 0, t, full);
        for (int g = 0; g < HKV; g++) {
            const KVCache *c = &r.d.inst[0]->cache[g];
            assert_true(c->slot_of[t] >= 0);
            for (int s = 0; s < c->n; s++) {
                kvq_token(KVQ_MLX4, 64, trace_k(r.fx, g, c->pos[s]), D, k);
                kvq_token(KVQ_MLX4, 64, trace_v(r.fx, g, c->pos[s]), D, v);
                assert_non_null(c->alt_kv[s]);
                expect_floats(c->alt_kv[s], k, D);
                expect_floats(c->alt_kv[s] + D, v, D);
            }
        }
        cache_attention(r.fx, r.d.inst[0], t, r.attn);
        driver_observe(&r.d, 0, (const float *const *)r.attn);
        /* 28 tokens per head, each K and V 16 x 4 / 8 + 4 = 12 bytes. */
        int n = r.d.inst[0]->cache[0].n + r.d.inst[0]->cache[1].n;
        assert_true(r.d.mem[0].device_bytes == n * 24.0);
    }
    free(full);
    run_end(&r);
}

/* Every policy type at its conformance settings, with kv_quant = kivi2 (residual and group 8)
 * and mlx4, over two turns fed in chunks: the policy's budget holds, KIVI's residual keeps fewer
 * than `residual` full-precision keys and at most `residual` full-precision values, mlx leaves
 * no exact slot once a step has admitted its token, a quantized slot holds no NaN, and for the
 * policies that report their slots at kv_bits the device bytes are the slots' own. */
static void check_cache(const Run *r, const KvQuantSpec *qs, const char *what, int t,
                        KvQuantMoment when)
{
    const Policy *p = r->d.inst[0];
    const PolicyType *type = r->spec.type;
    bool after_step = when == KVQ_AFTER_STEP; /* the bytes and KIVI's window are of the last
                                                * observe; the step's token joined since */
    double bytes = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        int full_k = 0, full_v = 0;
        for (int s = 0; s < c->n; s++) {
            if (c->pos[s] < 0 || (c->alt_kv[s] && !kvq_slot_quantized(r->d.quant[0], p, g, s))) {
                bytes += 4.0 * D; /* the policy's own slot, at 16 bits */
                continue;
            }
            bool ek = exact_k(r->fx, c, g, s), ev = exact_v(r->fx, c, g, s);
            full_k += ek;
            full_v += ev;
            if (c->alt_kv[s])
                for (int d = 0; d < 2 * D; d++)
                    if (isnan(c->alt_kv[s][d]))
                        fail_msg("%s: NaN in a quantized slot", what);
            bytes += kvq_vector_bytes(qs, D, 16, true, !ek) +
                     kvq_vector_bytes(qs, D, 16, false, !ev);
        }
        if (kvq_is_kivi(qs->kind) && !after_step &&
            (full_k >= qs->residual || full_v > qs->residual))
            fail_msg("%s at %d: KV head %d holds %d full-precision keys and %d values (residual "
                     "%d)", what, t, g, full_k, full_v, qs->residual);
        /* (after an observe a policy may have admitted a token, quantized at the next step) */
        if (!kvq_is_kivi(qs->kind) && (full_k || full_v) && when != KVQ_AFTER_OBSERVE)
            fail_msg("%s at %d: mlx left %d exact keys", what, t, full_k);
    }
    if (!after_step && !type->memory && r->d.mem[0].device_bytes != bytes)
        fail_msg("%s at %d: device bytes %g, the slots' own %g", what, t, r->d.mem[0].device_bytes,
                 bytes);
}

static void test_every_policy(void **state)
{
    (void)state;
    const KvQuantSpec kinds[] = {{KVQ_KIVI2, 8, 8}, {KVQ_MLX4, 0, 128}};
    static const TraceSpan spans[] = {
        {SPAN_PREFILL, 0, P},
        {SPAN_DECODE, P, 120},
        {SPAN_PREFILL, 120, 140},
        {SPAN_DECODE, 140, T},
    };
    float *full = malloc((size_t)HQ * T * sizeof *full);
    int n_types;
    const PolicyType *const *types = policy_types(&n_types);
    for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++)
        for (int i = 0; i < n_types; i++)
            for (int j = 0; types[i]->conformance[j]; j++) {
                Run r;
                run_start(&r, types[i]->name, types[i]->conformance[j], kinds[k], spans, 4);
                char what[256];
                snprintf(what, sizeof what, "%s (%s) kv_quant=%s", types[i]->name,
                         types[i]->conformance[j], kvq_name(kinds[k].kind));
                for (int s = 0; s < 4; s++) {
                    if (spans[s].kind == SPAN_PREFILL) {
                        for (int c0 = spans[s].start; c0 < spans[s].end; c0 += 7) {
                            int c1 = c0 + 7 < spans[s].end ? c0 + 7 : spans[s].end;
                            driver_prefill(&r.d, spans[s].start, spans[s].end, c0, c1);
                            check_cache(&r, &kinds[k], what, c1 - 1, KVQ_AFTER_PREFILL);
                        }
                        continue;
                    }
                    for (int t = spans[s].start; t < spans[s].end; t++) {
                        fixture_full_attn(r.fx, t, full);
                        driver_step(&r.d, 0, t, full);
                        const Policy *p = r.d.inst[0];
                        long bound = types[i]->max_slots(r.spec.params, &r.fx->L, t);
                        for (int g = 0; g < HKV; g++)
                            if (p->cache[g].n > bound)
                                fail_msg("%s at %d: %d slots, bound %ld", what, t, p->cache[g].n,
                                         bound);
                        check_cache(&r, &kinds[k], what, t, KVQ_AFTER_STEP);
                        cache_attention(r.fx, r.d.inst[0], t, r.attn);
                        driver_observe(&r.d, 0, (const float *const *)r.attn);
                        check_cache(&r, &kinds[k], what, t, KVQ_AFTER_OBSERVE);
                    }
                }
                run_end(&r);
            }
    free(full);
}

/* Through the replay engine: quantized policies next to their unquantized twins on a 2-layer
 * trace in chunks of 7, the CSVs byte-identical at 1 and 3 threads; each quantized twin's device
 * bytes below its twin's; its retained mass (the overlap, metrics.h) at most 1 and, for the full
 * cache, below 1 (the keys' error moves attention). */
static void replay_csvs(const char *trace, PolicySpec *spec, int n, int threads, const char *out,
                        PolicySummary *sum)
{
    EngineConfig cfg = {.threads = threads, .topk = 4, .eval_every = 1, .kv_bits = 16,
                        .prefill_chunk = 7, .seed = SEED, .n_policies = n, .policies = spec};
    KvErr err;
    Trace *tr = trace_open(trace, &err);
    if (!tr)
        fail_msg("%s", err.msg);
    Results *r = engine_run(tr, &cfg, &err);
    if (!r)
        fail_msg("replay: %s", err.msg);
    report_summarize(r, sum);
    if (report_write_csv(r, sum, out, &err) != 0)
        fail_msg("%s", err.msg);
    results_free(r);
    trace_close(tr);
}

static char *read_text(const char *path)
{
    KvErr err;
    size_t n;
    char *text = kv_read_input(path, 0, &n, &err);
    if (!text)
        fail_msg("%s", err.msg);
    return text;
}

static void test_replay_threads_and_bytes(void **state)
{
    (void)state;
    char *dir = scratch_create();
    const char *trace = scratch_path(dir, "two_layers.h5", 0);
    Fixture *fx = fixture_new(HQ, HKV, D, T, P);
    fixture_write_trace(fx, 2, SEED, trace);
    fixture_free(fx);
    static const struct {
        const char *type, *params;
        KvQuantSpec quant;
    } set[] = {
        {"full", "", {KVQ_NONE, 0, 128}},
        {"full", "", {KVQ_KIVI2, 8, 8}},
        {"snapkv", "budget=32 observation=8", {KVQ_NONE, 0, 128}},
        {"snapkv", "budget=32 observation=8", {KVQ_MLX4, 0, 128}},
        {"h2o", "budget=32", {KVQ_NONE, 0, 128}},
        {"h2o", "budget=32", {KVQ_KIVI4, 8, 8}},
        {"window", "window=28", {KVQ_NONE, 0, 128}},
        {"window", "window=28", {KVQ_MLX8, 0, 128}},
    };
    enum { N = sizeof set / sizeof *set };
    PolicySpec spec[N];
    memset(spec, 0, sizeof spec);
    for (int i = 0; i < N; i++) {
        snprintf(spec[i].label, sizeof spec[i].label, "p%d", i);
        spec[i].type = policy_find(set[i].type);
        spec[i].params = fixture_params(spec[i].type, set[i].params);
        spec[i].quant = set[i].quant;
    }
    char *out1 = scratch_create(), *out3 = scratch_create();
    PolicySummary sum1[N], sum3[N];
    replay_csvs(trace, spec, N, 1, out1, sum1);
    replay_csvs(trace, spec, N, 3, out3, sum3);
    static const char *const files[] = {"summary.csv", "layers.csv", "steps.csv"};
    for (int f = 0; f < 3; f++) {
        char *a = read_text(scratch_path(out1, files[f], 1));
        char *b = read_text(scratch_path(out3, files[f], 2));
        assert_string_equal(a, b);
        free(a);
        free(b);
    }
    for (int i = 1; i < N; i += 2) {
        double twin = sum1[i - 1].step[SM_DEVICE_BYTES][STAT_MEAN];
        double mine = sum1[i].step[SM_DEVICE_BYTES][STAT_MEAN];
        if (!(mine < twin))
            fail_msg("%s kv_quant=%s: device bytes %g, not below its twin's %g", set[i].type,
                     kvq_name(set[i].quant.kind), mine, twin);
        assert_true(sum1[i].head[HM_MASS][STAT_MEAN] <= 1.0);
    }
    assert_true(sum1[1].head[HM_MASS][STAT_MEAN] < 1.0);
    assert_true(sum1[0].head[HM_MASS][STAT_MEAN] == 1.0);
    for (int i = 0; i < N; i++)
        free(spec[i].params);
    scratch_remove(out1);
    scratch_remove(out3);
    scratch_remove(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kivi_group_by_hand),
        cmocka_unit_test(test_mlx_group_by_hand),
        cmocka_unit_test(test_error_bounds),
        cmocka_unit_test(test_bytes),
        cmocka_unit_test(test_kivi_residual),
        cmocka_unit_test(test_mlx_on_arrival),
        cmocka_unit_test(test_every_policy),
        cmocka_unit_test(test_replay_threads_and_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
