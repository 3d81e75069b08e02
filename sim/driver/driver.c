/* The policy driver: see driver.h for what it promises. */
#include "sim/driver/driver.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/attention.h"

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t label_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static const char *const history_names[] = {"persist", "reencode", "prefix"};

const char *run_history_name(RunHistory h)
{
    return history_names[h];
}

int run_history_parse(const char *name)
{
    for (int h = 0; h < (int)(sizeof history_names / sizeof *history_names); h++)
        if (!strcmp(name, history_names[h]))
            return h;
    return -1;
}

static const char *const sliding_names[] = {"skip", "compress"};

const char *sliding_layers_name(SlidingLayers s)
{
    return sliding_names[s];
}

int sliding_layers_parse(const char *name)
{
    for (int s = 0; s < 2; s++)
        if (!strcmp(name, sliding_names[s]))
            return s;
    return -1;
}

/* The rotating buffer of a sliding layer of window W under each spec's label: policy `window`
 * with window = W (the current token included) and no sinks. */
static int rotating_buffer_specs(PolicyDriver *d, const PolicySpec *specs, int n, int W,
                                 KvErr *err)
{
    const PolicyType *window = policy_find("window");
    char value[32];
    snprintf(value, sizeof value, "%d", W);
    d->own_specs = kv_calloc((size_t)n, sizeof *d->own_specs);
    d->own_params = kv_calloc((size_t)n, window->params_size);
    for (int i = 0; i < n; i++) {
        void *params = (char *)d->own_params + (size_t)i * window->params_size;
        policy_params_defaults(window, params);
        if (policy_param_set(window, params, "window", value, err) != 0 ||
            policy_param_set(window, params, "sinks", "0", err) != 0)
            return -1;
        memcpy(d->own_specs[i].label, specs[i].label, sizeof d->own_specs[i].label);
        d->own_specs[i].type = window;
        d->own_specs[i].params = params;
    }
    return 0;
}

uint64_t policy_instance_seed(uint64_t run_seed, const char *label, int layer)
{
    return splitmix64(run_seed ^ label_hash(label) ^ splitmix64((uint64_t)layer));
}

void policy_memory_report(const Policy *inst, int head_dim, int kv_bits, MemReport *mem)
{
    memset(mem, 0, sizeof *mem);
    if (inst->type->memory) {
        inst->type->memory(inst, mem);
        return;
    }
    double live = 0;
    for (int g = 0; g < inst->n_kv_heads; g++)
        live += inst->cache[g].n;
    mem->device_bytes = mem->allocated_bytes = kv_entry_bytes(live, head_dim, kv_bits);
}

void driver_memory_report(const PolicyDriver *d, int i, MemReport *mem)
{
    policy_memory_report(d->inst[i], d->L->head_dim, d->kv_bits, mem);
    if (d->quant && d->quant[i]) {
        double saved = kvq_bytes_saved(d->quant[i], d->inst[i], d->kv_bits);
        mem->device_bytes -= saved;
        mem->allocated_bytes -= saved;
    }
}

bool driver_nests(const PolicyDriver *d, int i)
{
    const PolicyType *type = d->inst[i]->type;
    return type->nest_param && type->keep_order && !type->observe && !d->quant[i] &&
           (!type->nests || type->nests(d->specs[i].params));
}

/* Whether parameter structs a and b of `type` are equal but for the parameter named `except`. */
static bool params_equal_except(const PolicyType *type, const void *a, const void *b,
                                const char *except)
{
    if (type->set_extra)
        return false; /* parameters the table does not list */
    for (const ParamSpec *ps = type->params; ps->key; ps++) {
        if (strcmp(ps->key, except) == 0)
            continue;
        const char *x = (const char *)a + ps->offset, *y = (const char *)b + ps->offset;
        bool same;
        switch (ps->kind) {
        case PARAM_DOUBLE:
            same = *(const double *)(const void *)x == *(const double *)(const void *)y;
            break;
        case PARAM_BOOL:
            same = *(const bool *)(const void *)x == *(const bool *)(const void *)y;
            break;
        case PARAM_STRING:
            same = strcmp(x, y) == 0;
            break;
        default: /* PARAM_INT, PARAM_ENUM */
            same = *(const int *)(const void *)x == *(const int *)(const void *)y;
            break;
        }
        if (!same)
            return false;
    }
    return true;
}

/* Whether instance j goes in the group of instance i: the same type, no kv_quant, and either
 * both nest with parameters equal but for the nest's (one nest) or neither nests and the type
 * steps many at once. */
static bool groups_with(const PolicyDriver *d, int i, int j)
{
    const PolicyType *type = d->inst[i]->type;
    if (d->inst[j]->type != type || d->quant[i] || d->quant[j])
        return false;
    bool ni = driver_nests(d, i), nj = driver_nests(d, j);
    if (ni || nj)
        return ni && nj &&
               params_equal_except(type, d->specs[i].params, d->specs[j].params,
                                   type->nest_param);
    return type->step_many != NULL;
}

/* The groups of instances that step together when share_steps is set (groups_with), when there
 * are two or more. */
static void plan_shared_steps(PolicyDriver *d)
{
    int n = d->n, used = 0;
    d->share_first = kv_malloc((size_t)n * sizeof *d->share_first);
    d->share_idx = kv_malloc((size_t)n * sizeof *d->share_idx);
    d->share_at = kv_calloc((size_t)n, sizeof *d->share_at);
    d->share_len = kv_calloc((size_t)n, sizeof *d->share_len);
    d->share_inst = kv_calloc((size_t)n, sizeof *d->share_inst);
    for (int i = 0; i < n; i++)
        d->share_first[i] = -1;
    for (int i = 0; i < n; i++) {
        if (d->share_first[i] >= 0)
            continue;
        int len = 0;
        for (int j = i; j < n; j++)
            len += d->share_first[j] < 0 && groups_with(d, i, j);
        if (len < 2)
            continue;
        d->share_at[i] = used;
        d->share_len[i] = len;
        for (int j = i; j < n; j++)
            if (d->share_first[j] < 0 && groups_with(d, i, j)) {
                d->share_first[j] = i;
                d->share_idx[used++] = j;
            }
    }
}

int driver_create(PolicyDriver *d, const LayerView *L, const PolicySpec *specs, int n,
                  uint64_t run_seed, int kv_bits, SlidingLayers sliding, bool live, KvErr *err)
{
    memset(d, 0, sizeof *d);
    if (!driver_compresses(L->window, sliding)) {
        if (rotating_buffer_specs(d, specs, n, L->window, err) != 0) {
            driver_free(d);
            return -1;
        }
        specs = d->own_specs;
    }
    d->L = L;
    d->live = live;
    d->kv_bits = kv_bits;
    d->specs = specs;
    d->run_seed = run_seed;
    d->inst = kv_calloc((size_t)n, sizeof *d->inst);
    for (int i = 0; i < n; i++) {
        PolicyEnv env = {
            .seed = policy_instance_seed(run_seed, specs[i].label, L->layer),
            .kv_bits = kv_bits,
        };
        d->inst[i] = specs[i].type->create(specs[i].params, L, &env, err);
        int ready = !d->inst[i] ? -1
                    : live && (d->inst[i]->want_decode_mass || d->inst[i]->want_trace) ? 1
                                                                                        : 0;
        if (ready != 0) {
            d->n = d->inst[i] ? i + 1 : i;
            driver_free(d);
            return ready;
        }
    }
    d->n = n;
    d->quant = kv_calloc((size_t)n, sizeof *d->quant);
    for (int i = 0; i < n; i++)
        if (specs[i].quant.kind != KVQ_NONE)
            d->quant[i] = kvq_state_new(&specs[i].quant, L);
    d->mem = kv_calloc((size_t)n, sizeof *d->mem);
    d->seconds = kv_calloc((size_t)n, sizeof *d->seconds);
    d->sv = kv_calloc((size_t)n, sizeof *d->sv);
    plan_shared_steps(d);
    return 0;
}

int driver_restart(PolicyDriver *d, KvErr *err)
{
    for (int i = 0; i < d->n; i++) {
        const PolicySpec *spec = &d->specs[i];
        PolicyEnv env = {
            .seed = policy_instance_seed(d->run_seed, spec->label, d->L->layer),
            .kv_bits = d->kv_bits,
        };
        d->inst[i]->type->destroy(d->inst[i]);
        if (d->quant[i])
            kvq_state_reset(d->quant[i]);
        d->inst[i] = spec->type->create(spec->params, d->L, &env, err);
        if (!d->inst[i]) { /* the instances after i are still there: driver_free frees them */
            d->inst[i] = d->inst[--d->n];
            return -1;
        }
    }
    return 0;
}

void driver_free(PolicyDriver *d)
{
    for (int i = 0; i < d->n; i++)
        d->inst[i]->type->destroy(d->inst[i]);
    if (d->quant)
        for (int i = 0; i < d->n; i++)
            kvq_state_free(d->quant[i]);
    free(d->quant);
    free(d->inst);
    free(d->mem);
    free(d->seconds);
    free(d->sv);
    free(d->share_first);
    free(d->share_idx);
    free(d->share_at);
    free(d->share_len);
    free(d->share_inst);
    free(d->decode_mass);
    free(d->own_specs);
    free(d->own_params);
    memset(d, 0, sizeof *d);
}

/* The observation rows of one instance: the last `rows` of the `all_rows` computed, as the
 * [n_q_heads][rows][width] array PrefillView promises. The shared array when the counts agree;
 * otherwise a copy into the instance's own *own. */
static const float *obs_attn_for(const float *obs, int all_rows, int rows, int Hq, int width,
                                 float **own)
{
    if (rows == all_rows)
        return obs;
    *own = kv_realloc(*own, (size_t)Hq * rows * width * sizeof(float));
    for (int h = 0; h < Hq; h++)
        memcpy(*own + (size_t)h * rows * width,
               obs + ((size_t)h * all_rows + all_rows - rows) * width,
               (size_t)rows * width * sizeof(float));
    return *own;
}

static bool reads_decode_mass(const Policy *p)
{
    return p->is_oracle && p->want_decode_mass;
}

static int rows_of(const Policy *p, int chunk_tokens)
{
    return p->want_prefill_rows < chunk_tokens ? p->want_prefill_rows : chunk_tokens;
}

static bool wants_statistics(const Policy *p)
{
    return p->want_prefill_mass || p->want_prefill_rows > 0;
}

/* The statistics of chunk [c0, c1) over one instance's own caches (PrefillView): for each KV
 * head, the keys are its cache's slots (alt_kv K where set) then the chunk's tokens; the chunk's
 * queries attend blockwise over them with the mask of causality and of the layer's window, a
 * softmax over what is visible. mass [Hq][c1] is accumulated into (zeroed by the caller), obs
 * [Hq][rows][c1] receives the last `rows` queries' rows (zeroed by the caller). Returns the
 * floating-point operations done. */
static double cache_statistics(const LayerView *L, const Policy *p, int c0, int c1, float *mass,
                               float *obs, int rows)
{
    int T = L->n_tokens, D = L->head_dim, C = c1 - c0, W = L->window;
    double flops = 0;
    for (int g = 0; g < p->n_kv_heads; g++) {
        const KVCache *c = &p->cache[g];
        int n = c->n + C;
        float *keys = kv_malloc((size_t)n * D * sizeof *keys);
        int32_t *key_pos = kv_malloc((size_t)n * sizeof *key_pos);
        for (int s = 0; s < c->n; s++) {
            const float *k = c->alt_kv[s] ? c->alt_kv[s]
                                          : L->k + ((size_t)g * T + c->pos[s]) * D;
            memcpy(keys + (size_t)s * D, k, (size_t)D * sizeof *keys);
            key_pos[s] = c->pos[s];
        }
        memcpy(keys + (size_t)c->n * D, L->k + ((size_t)g * T + c0) * D,
               (size_t)C * D * sizeof *keys);
        for (int j = 0; j < C; j++)
            key_pos[c->n + j] = c0 + j;
        float *logits = kv_malloc((size_t)PROMPT_STATS_BLOCK * n * sizeof *logits);
        double *weight = kv_malloc((size_t)n * sizeof *weight); /* one row's exp(logit - max) */
        for (int i = 0; i < L->group; i++) {
            int h = g * L->group + i;
            /* Without the mass only the observation rows' queries matter. */
            for (int b0 = mass ? 0 : C - rows; b0 < C; b0 += PROMPT_STATS_BLOCK) {
                int B = C - b0 < PROMPT_STATS_BLOCK ? C - b0 : PROMPT_STATS_BLOCK;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, n, D, L->attn_scale,
                            L->q + ((size_t)h * T + c0 + b0) * D, D, keys, D, 0.0f, logits, n);
                flops += 2.0 * B * n * D;
                for (int b = 0; b < B; b++) {
                    int q_pos = c0 + b0 + b;
                    int lo = attn_first_key(W, q_pos); /* the oldest key position visible */
                    float *row = logits + (size_t)b * n;
                    float mx = -INFINITY;
                    for (int j = 0; j < n; j++) {
                        bool visible = key_pos[j] < 0 || (key_pos[j] <= q_pos && key_pos[j] >= lo);
                        if (visible && L->attn_softcap > 0)
                            row[j] = softcap_logitf(row[j], L->attn_softcap);
                        if (!visible)
                            row[j] = -INFINITY;
                        else if (row[j] > mx)
                            mx = row[j];
                    }
                    double z = 0;
                    for (int j = 0; j < n; j++)
                        z += (weight[j] = row[j] == -INFINITY ? 0.0 : exp((double)row[j] - mx));
                    int r = q_pos - (c1 - rows); /* its observation row, if any */
                    float *obs_row = obs && r >= 0 ? obs + ((size_t)h * rows + r) * c1 : NULL;
                    for (int j = 0; j < n; j++) {
                        if (weight[j] == 0.0 || key_pos[j] < 0)
                            continue;
                        float pj = (float)(weight[j] / z);
                        if (mass)
                            mass[(size_t)h * c1 + key_pos[j]] += pj;
                        if (obs_row)
                            obs_row[key_pos[j]] = pj;
                    }
                }
            }
        }
        free(keys);
        free(key_pos);
        free(logits);
        free(weight);
    }
    return flops;
}

/* One driver_prefill call: the chunk, the statistics shared by the instances (first chunk of the
 * first span only), and each instance's own buffers and statistics cost. */
typedef struct {
    PolicyDriver *d;
    int span_start, span_end, c0, c1;
    const float *mass, *obs; /* shared statistics, NULL when not computed */
    int want_rows;           /* rows of the shared obs */
    float **own_obs;         /* [n] */
    double *stats_seconds, *stats_flops; /* [n]: an instance's own statistics (later chunks) */
} PrefillJob;

/* Instance i's prefill: its statistics when they are its own (later chunks), its callback, its
 * memory. Instances are independent, so they may run on any threads. */
static int prefill_instance(void *ctx, int i, int slot, KvErr *err)
{
    (void)slot, (void)err;
    PrefillJob *j = ctx;
    PolicyDriver *d = j->d;
    const LayerView *L = d->L;
    int Hq = L->n_q_heads, c0 = j->c0, c1 = j->c1;
    Policy *p = d->inst[i];
    int rows = p->want_prefill_rows > 0 ? rows_of(p, c1 - c0) : 0;
    PrefillView pv = {
        .L = L,
        .span_start = j->span_start,
        .span_end = j->span_end,
        .chunk_start = c0,
        .chunk_end = c1,
        .last_chunk = c1 == j->span_end,
        .obs_rows = rows,
        .decode_mass = reads_decode_mass(p) ? d->decode_mass : NULL,
    };
    float *own_mass = NULL;
    if (c0 == 0) {
        pv.prefill_mass = p->want_prefill_mass ? j->mass : NULL;
        pv.obs_attn =
            rows > 0 ? obs_attn_for(j->obs, j->want_rows, rows, Hq, c1, &j->own_obs[i]) : NULL;
    } else if (wants_statistics(p)) {
        /* Later chunks: the statistics of this instance's own caches. */
        double t0 = now_seconds();
        own_mass = p->want_prefill_mass ? kv_calloc((size_t)Hq * c1, sizeof(float)) : NULL;
        if (rows > 0)
            j->own_obs[i] = kv_calloc((size_t)Hq * rows * c1, sizeof(float));
        j->stats_flops[i] += cache_statistics(L, p, c0, c1, own_mass, j->own_obs[i], rows);
        pv.prefill_mass = own_mass;
        pv.obs_attn = j->own_obs[i];
        j->stats_seconds[i] += now_seconds() - t0;
    }
    double t0 = now_seconds();
    p->type->prefill(p, &pv);
    if (d->quant[i])
        kvq_apply(d->quant[i], p, L, KVQ_AFTER_PREFILL);
    driver_memory_report(d, i, &d->mem[i]);
    d->seconds[i] += now_seconds() - t0;
    free(own_mass);
    return 0;
}

void driver_prefill(PolicyDriver *d, int span_start, int span_end, int chunk_start, int chunk_end)
{
    const LayerView *L = d->L;
    const TraceMeta *m = L->meta;
    int T = L->n_tokens, Hq = L->n_q_heads, c0 = chunk_start, c1 = chunk_end, C = c1 - c0;
    double s0 = now_seconds();
    bool want_dmass = false;
    for (int i = 0; i < d->n; i++)
        want_dmass |= reads_decode_mass(d->inst[i]);
    /* The future is the same at every chunk: computed once, at the first; the sum over every
     * decode step of every decode run of each key's true attention (what oracle_future knows). */
    if (want_dmass && !d->decode_mass) {
        d->decode_mass = kv_calloc((size_t)Hq * T, sizeof(float));
        for (int s = 0; s < m->n_spans; s++)
            if (m->spans[s].kind == SPAN_DECODE)
                d->stats_flops += decode_mass(L->q, L->k, Hq, L->group, T, m->spans[s].start,
                                              m->spans[s].end, L->head_dim, L->attn_scale,
                                              L->attn_softcap, L->window, d->decode_mass, d->pool);
    }

    /* At the first chunk of the first span every cache is empty, so every instance's statistics
     * are the same numbers: computed once (prompt_statistics), at the most rows any instance asks
     * for; each instance then gets exactly the rows it asked for (obs_attn_for). */
    float *mass = NULL, *obs = NULL;
    int want_rows = 0;
    if (c0 == 0) {
        bool want_mass = false;
        for (int i = 0; i < d->n; i++) {
            want_mass |= d->inst[i]->want_prefill_mass;
            if (rows_of(d->inst[i], C) > want_rows)
                want_rows = rows_of(d->inst[i], C);
        }
        mass = want_mass ? kv_calloc((size_t)Hq * c1, sizeof(float)) : NULL;
        obs = want_rows ? kv_calloc((size_t)Hq * want_rows * c1, sizeof(float)) : NULL;
        if (mass || obs)
            d->stats_flops += prompt_statistics(L->q, L->k, Hq, L->group, T, c1, L->head_dim,
                                                L->attn_scale, L->attn_softcap, L->window,
                                                mass, obs, want_rows,
                                                d->pool);
    }
    d->stats_seconds += now_seconds() - s0;

    PrefillJob job = {
        .d = d, .span_start = span_start, .span_end = span_end, .c0 = c0, .c1 = c1,
        .mass = mass, .obs = obs, .want_rows = want_rows,
        .own_obs = kv_calloc((size_t)d->n, sizeof(float *)),
        .stats_seconds = kv_calloc((size_t)d->n, sizeof(double)),
        .stats_flops = kv_calloc((size_t)d->n, sizeof(double)),
    };
    if (d->pool)
        pool_for(d->pool, d->n, prefill_instance, &job, NULL); /* a prefill cannot fail */
    else
        for (int i = 0; i < d->n; i++)
            prefill_instance(&job, i, 0, NULL);
    for (int i = 0; i < d->n; i++) { /* in instance order: the same sums at any thread count */
        d->stats_seconds += job.stats_seconds[i];
        d->stats_flops += job.stats_flops[i];
        free(job.own_obs[i]);
    }
    free(job.own_obs);
    free(job.stats_seconds);
    free(job.stats_flops);
    free(mass);
    free(obs);
}

int driver_step_group(const PolicyDriver *d, int i, const int **members)
{
    int first = d->share_steps ? d->share_first[i] : -1;
    *members = NULL;
    if (first < 0)
        return 1;
    if (first != i)
        return 0;
    *members = d->share_idx + d->share_at[i];
    return d->share_len[i];
}

void driver_step(PolicyDriver *d, int i, int t, const float *full_attn)
{
    Policy *p = d->inst[i];
    int first = d->share_steps && p->type->step_many ? d->share_first[i] : -1;
    if (first >= 0) { /* stepped with its group, by the group's first instance */
        if (first != i)
            return;
        int at = d->share_at[i], len = d->share_len[i];
        for (int j = 0; j < len; j++) {
            int k = d->share_idx[at + j];
            d->share_inst[at + j] = d->inst[k];
            d->sv[k] = (StepView){.L = d->L, .t = t,
                                  .full_attn = d->inst[k]->is_oracle ? full_attn : NULL};
        }
        double t0 = now_seconds();
        p->type->step_many(d->share_inst + at, len, &d->sv[i]);
        d->seconds[i] += now_seconds() - t0; /* the group's time, on its first */
        return;
    }
    d->sv[i] = (StepView){.L = d->L, .t = t, .full_attn = p->is_oracle ? full_attn : NULL};
    double t0 = now_seconds();
    p->type->step(p, &d->sv[i]);
    if (d->quant[i])
        kvq_apply(d->quant[i], p, d->L, KVQ_AFTER_STEP);
    d->seconds[i] += now_seconds() - t0;
}

void driver_observe(PolicyDriver *d, int i, const float *const *attn)
{
    Policy *p = d->inst[i];
    double t0 = now_seconds();
    if (p->type->observe)
        p->type->observe(p, &d->sv[i], attn);
    if (d->quant[i])
        kvq_apply(d->quant[i], p, d->L, KVQ_AFTER_OBSERVE);
    driver_memory_report(d, i, &d->mem[i]);
    d->seconds[i] += now_seconds() - t0;
}
