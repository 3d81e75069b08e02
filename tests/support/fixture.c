#include "tests/support/fixture.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>

Fixture *fixture_new(int n_q_heads, int n_kv_heads, int head_dim, int n_tokens, int n_prompt)
{
    Fixture *fx = kv_calloc(1, sizeof *fx);
    TraceModel model = {
        .model = "fixture", .n_layers = 1, .n_q_heads = n_q_heads, .n_kv_heads = n_kv_heads,
        .head_dim = head_dim, .rope_theta = 10000.0, .rope_layout = ROPE_HALF,
        .attn_scale = attn_scale_default(head_dim),
    };
    trace_meta_init(&fx->meta, &model, n_tokens, n_prompt, 0, 0, 0);
    fx->q = kv_calloc((size_t)n_q_heads * n_tokens * head_dim, sizeof(float));
    fx->k = kv_calloc((size_t)n_kv_heads * n_tokens * head_dim, sizeof(float));
    fx->v = kv_calloc((size_t)n_kv_heads * n_tokens * head_dim, sizeof(float));
    fx->L = layer_view_make(&fx->meta, 0, fx->q, fx->k, fx->v);
    return fx;
}

void fixture_free(Fixture *fx)
{
    trace_meta_free(&fx->meta);
    free(fx->q);
    free(fx->k);
    free(fx->v);
    free(fx);
}

void fixture_randomize(Fixture *fx, uint64_t seed, double sigma)
{
    gsl_rng *r = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(r, (unsigned long)seed);
    size_t nq = (size_t)fx->L.n_q_heads * fx->L.n_tokens * fx->L.head_dim;
    size_t nk = (size_t)fx->L.n_kv_heads * fx->L.n_tokens * fx->L.head_dim;
    for (size_t i = 0; i < nq; i++)
        fx->q[i] = (float)gsl_ran_gaussian(r, sigma);
    for (size_t i = 0; i < nk; i++)
        fx->k[i] = (float)gsl_ran_gaussian(r, sigma);
    for (size_t i = 0; i < nk; i++)
        fx->v[i] = (float)gsl_ran_gaussian(r, sigma);
    gsl_rng_free(r);
}

void *fixture_params(const PolicyType *type, const char *params)
{
    void *prm = kv_calloc(1, type->params_size);
    policy_params_defaults(type, prm);
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", params ? params : "");
    char *save = NULL;
    for (char *tok = strtok_r(buf, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq)
            fail_msg("%s '%s': '%s' is not key=value", type->name, params, tok);
        *eq = '\0';
        KvErr err;
        if (policy_param_set(type, prm, tok, eq + 1, &err) != 0)
            fail_msg("%s '%s': %s", type->name, params, err.msg);
    }
    KvErr err;
    if (type->validate && type->validate(prm, &err) != 0)
        fail_msg("%s '%s': %s", type->name, params, err.msg);
    return prm;
}

Policy *fixture_policy(Fixture *fx, const char *type_name, const char *params, uint64_t seed)
{
    const PolicyType *type = policy_find(type_name);
    if (!type)
        fail_msg("unknown policy type %s", type_name);
    void *prm = fixture_params(type, params);
    KvErr err;
    PolicyEnv env = {.seed = seed, .kv_bits = 16};
    Policy *p = type->create(prm, &fx->L, &env, &err);
    free(prm);
    if (!p)
        fail_msg("fixture_policy: %s", err.msg);
    return p;
}

/* logits of query (h, t) over the keys [first, t] of its KV head the layer's window lets it
 * attend, softmaxed into out[first..t], zero elsewhere. */
static void attn_row(const Fixture *fx, int h, int t, float *out)
{
    const LayerView *L = &fx->L;
    int g = h / L->group, D = L->head_dim, first = attn_first_key(L->window, t);
    const float *q = L->q + ((size_t)h * L->n_tokens + t) * D;
    double mx = -INFINITY;
    double *s = kv_malloc((size_t)(t + 1) * sizeof *s);
    for (int j = first; j <= t; j++) {
        const float *k = L->k + ((size_t)g * L->n_tokens + j) * D;
        double dot = 0;
        for (int d = 0; d < D; d++)
            dot += (double)q[d] * k[d];
        s[j] = dot * L->attn_scale;
        if (s[j] > mx)
            mx = s[j];
    }
    double z = 0;
    for (int j = first; j <= t; j++)
        z += (s[j] = exp(s[j] - mx));
    for (int j = 0; j < L->n_tokens; j++)
        out[j] = j >= first && j <= t ? (float)(s[j] / z) : 0.0f;
    free(s);
}

void fixture_full_attn(const Fixture *fx, int t, float *out)
{
    for (int h = 0; h < fx->L.n_q_heads; h++)
        attn_row(fx, h, t, out + (size_t)h * fx->L.n_tokens);
}

/* Attention of query (h, t) over the slots of cache c (alt K/V where set); a slot of a position
 * before the layer's window gets none (zero everywhere when no slot is attended). */
static void cache_attn(const Fixture *fx, const KVCache *c, int h, int t, float *out)
{
    const LayerView *L = &fx->L;
    int g = h / L->group, D = L->head_dim, first = attn_first_key(L->window, t);
    const float *q = L->q + ((size_t)h * L->n_tokens + t) * D;
    double mx = -INFINITY;
    double *s = kv_malloc((size_t)(c->n + 1) * sizeof *s);
    for (int i = 0; i < c->n; i++) {
        if (c->pos[i] >= 0 && c->pos[i] < first) {
            s[i] = -INFINITY;
            continue;
        }
        const float *k = c->alt_kv[i] ? c->alt_kv[i]
                                      : L->k + ((size_t)g * L->n_tokens + c->pos[i]) * D;
        double dot = 0;
        for (int d = 0; d < D; d++)
            dot += (double)q[d] * k[d];
        s[i] = dot * L->attn_scale;
        if (s[i] > mx)
            mx = s[i];
    }
    double z = 0;
    for (int i = 0; i < c->n; i++)
        z += (s[i] = s[i] == -INFINITY ? 0.0 : exp(s[i] - mx));
    for (int i = 0; i < c->n; i++)
        out[i] = z > 0 ? (float)(s[i] / z) : 0.0f;
    free(s);
}

void fixture_run(Fixture *fx, Policy *p, int t_end, FixtureStepFn fn, void *ud)
{
    fixture_run_hooked(fx, p, t_end, NULL, fn, ud);
}

void fixture_set_spans(Fixture *fx, const TraceSpan *spans, int n)
{
    trace_meta_set_spans(&fx->meta, n, spans);
}

/* The statistics of chunk [c0, c1) (policies/policy.h, PrefillView): query i of head h over the
 * slots of its KV head's cache (alt K where set) and the chunk's keys [c0, i], a softmax in
 * double; mass [Hq][c1] and obs [Hq][W][c1] (the chunk's last W queries) are zeroed here. On an
 * empty cache at c0 = 0 these are the causal prompt rows. */
static void chunk_statistics(const Fixture *fx, const Policy *p, int c0, int c1, int W,
                             float *mass, float *obs)
{
    const LayerView *L = &fx->L;
    int Hq = L->n_q_heads, D = L->head_dim;
    memset(mass, 0, (size_t)Hq * c1 * sizeof *mass);
    memset(obs, 0, (size_t)Hq * (W > 0 ? W : 1) * c1 * sizeof *obs);
    for (int h = 0; h < Hq; h++) {
        int g = h / L->group;
        const KVCache *c = &p->cache[g];
        int n_keys = c->n + c1 - c0;
        double *s = kv_malloc((size_t)n_keys * sizeof *s);
        for (int i = c0; i < c1; i++) {
            const float *q = L->q + ((size_t)h * L->n_tokens + i) * D;
            int n = c->n + i - c0 + 1;
            double mx = -INFINITY;
            for (int j = 0; j < n; j++) {
                const float *k = j < c->n ? (c->alt_kv[j] ? c->alt_kv[j]
                                                         : L->k + ((size_t)g * L->n_tokens +
                                                                   c->pos[j]) * D)
                                          : L->k + ((size_t)g * L->n_tokens + c0 + j - c->n) * D;
                double dot = 0;
                for (int d = 0; d < D; d++)
                    dot += (double)q[d] * k[d];
                s[j] = dot * L->attn_scale;
                if (s[j] > mx)
                    mx = s[j];
            }
            double z = 0;
            for (int j = 0; j < n; j++)
                z += (s[j] = exp(s[j] - mx));
            for (int j = 0; j < n; j++) {
                int pos = j < c->n ? c->pos[j] : c0 + j - c->n;
                if (pos < 0)
                    continue; /* a synthetic slot: normalised over, not reported */
                float pj = (float)(s[j] / z);
                mass[(size_t)h * c1 + pos] += pj;
                if (i >= c1 - W)
                    obs[((size_t)h * W + (i - (c1 - W))) * c1 + pos] = pj;
            }
        }
        free(s);
    }
}

void fixture_run_hooked(Fixture *fx, Policy *p, int t_end, FixtureBeforeFn before,
                        FixtureStepFn fn, void *ud)
{
    const LayerView *L = &fx->L;
    const TraceMeta *m = &fx->meta;
    int Hq = L->n_q_heads, T = L->n_tokens;
    float *row = kv_malloc((size_t)Hq * T * sizeof *row);
    float *mass = kv_malloc((size_t)Hq * T * sizeof *mass);
    int most_rows = p->want_prefill_rows < T ? p->want_prefill_rows : T;
    float *obs = kv_malloc((size_t)Hq * (most_rows > 0 ? most_rows : 1) * T * sizeof *obs);
    float *dmass = NULL;
    if (p->want_decode_mass) {
        dmass = kv_calloc((size_t)Hq * T, sizeof *dmass);
        for (int s = 0; s < m->n_spans; s++)
            for (int t = m->spans[s].start; t < m->spans[s].end && m->spans[s].kind == SPAN_DECODE;
                 t++) {
                fixture_full_attn(fx, t, row);
                for (size_t i = 0; i < (size_t)Hq * T; i++)
                    dmass[i] += row[i];
            }
    }

    float **attn = kv_calloc((size_t)L->n_kv_heads, sizeof *attn);
    for (int s = 0; s < m->n_spans && m->spans[s].start < t_end; s++) {
        const TraceSpan *sp = &m->spans[s];
        if (sp->kind == SPAN_PREFILL) {
            for (int c0 = sp->start; c0 < sp->end;) {
                int c1 = fx->prefill_chunk > 0 && sp->end - c0 > fx->prefill_chunk
                             ? c0 + fx->prefill_chunk
                             : sp->end;
                if (before)
                    before(c0, c1, p, ud);
                int W = p->want_prefill_rows < c1 - c0 ? p->want_prefill_rows : c1 - c0;
                PrefillView pv = {.L = L, .span_start = sp->start, .span_end = sp->end,
                                  .chunk_start = c0, .chunk_end = c1,
                                  .last_chunk = c1 == sp->end, .decode_mass = dmass};
                if (p->want_prefill_mass || W > 0) {
                    chunk_statistics(fx, p, c0, c1, W, mass, obs);
                    pv.prefill_mass = p->want_prefill_mass ? mass : NULL;
                    pv.obs_attn = W > 0 ? obs : NULL;
                    pv.obs_rows = W > 0 ? W : 0;
                }
                p->type->prefill(p, &pv);
                c0 = c1;
            }
            continue;
        }
        for (int t = sp->start; t < sp->end && t < t_end; t++) {
            if (before)
                before(t, t + 1, p, ud);
            fixture_full_attn(fx, t, row);
            StepView sv = {.L = L, .t = t, .full_attn = p->is_oracle ? row : NULL};
            p->type->step(p, &sv);
            for (int g = 0; g < L->n_kv_heads; g++) {
                const KVCache *c = &p->cache[g];
                attn[g] = kv_realloc(attn[g], (size_t)L->group * (c->n + 1) * sizeof(float));
                for (int i = 0; i < L->group; i++)
                    cache_attn(fx, c, g * L->group + i, t, attn[g] + (size_t)i * c->n);
            }
            if (fn)
                fn(t, p, row, ud);
            if (p->type->observe)
                p->type->observe(p, &sv, (const float *const *)attn);
        }
    }
    if (before)
        before(t_end, t_end, p, ud);
    for (int g = 0; g < L->n_kv_heads; g++)
        free(attn[g]);
    free(attn);
    free(row);
    free(mass);
    free(obs);
    free(dmass);
}

double fixture_mass(const Fixture *fx, const Policy *p, const float *full_attn, int h)
{
    const KVCache *c = &p->cache[h / fx->L.group];
    double m = 0;
    for (int i = 0; i < c->n; i++)
        if (c->pos[i] >= 0)
            m += full_attn[(size_t)h * fx->L.n_tokens + c->pos[i]];
    return m;
}

void fixture_set_window(Fixture *fx, int window)
{
    fx->meta.window[0] = window;
    fx->L = layer_view_make(&fx->meta, 0, fx->q, fx->k, fx->v);
}

void fixture_trace_meta(const Fixture *fx, int n_layers, const char *generator, TraceMeta *out)
{
    const TraceMeta *fm = &fx->meta;
    int32_t *window = kv_malloc((size_t)n_layers * sizeof *window);
    for (int l = 0; l < n_layers; l++)
        window[l] = fm->window[0];
    TraceModel model = {
        .model = fm->model, .generator = generator, .n_layers = n_layers,
        .n_q_heads = fm->n_q_heads, .n_kv_heads = fm->n_kv_heads, .head_dim = fm->head_dim,
        .rope_theta = fm->rope_theta, .rope_layout = fm->rope_layout,
        .attn_scale = fm->attn_scale, .window = window,
    };
    size_t T = (size_t)fm->n_tokens;
    trace_meta_init(out, &model, fm->n_tokens, fm->n_prompt, fm->n_needles, fm->n_probes, 0);
    trace_model_free(&model);
    memcpy(out->tokens, fm->tokens, T * sizeof *out->tokens);
    memcpy(out->positions, fm->positions, T * sizeof *out->positions);
    memcpy(out->segments, fm->segments, T * sizeof *out->segments);
    memcpy(out->needles, fm->needles, (size_t)fm->n_needles * 2 * sizeof *out->needles);
    memcpy(out->probes, fm->probes, (size_t)fm->n_probes * sizeof *out->probes);
    trace_meta_set_spans(out, fm->n_spans, fm->spans);
}

void fixture_write_trace(Fixture *fx, int n_layers, uint64_t seed, const char *path)
{
    TraceMeta meta;
    fixture_trace_meta(fx, n_layers, "test fixture", &meta);
    KvErr err;
    TraceWriter *w = trace_writer_create(path, &meta, TRACE_F32, &err);
    if (!w)
        fail_msg("fixture_write_trace: %s", err.msg);
    for (int l = 0; l < n_layers; l++) {
        fixture_randomize(fx, seed + (uint64_t)l, 1.0);
        if (trace_writer_put_qkv(w, l, 0, fx->L.n_tokens, fx->q, fx->k, fx->v, &err) != 0)
            fail_msg("fixture_write_trace: %s", err.msg);
    }
    if (trace_writer_finish(w, &err) != 0)
        fail_msg("fixture_write_trace: %s", err.msg);
    trace_meta_free(&meta);
}
