/* The policy driver: see driver.h for what it promises. */
#include "sim/driver/driver.h"

#include <cblas.h>
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

int driver_create(PolicyDriver *d, const LayerView *L, const PolicySpec *specs, int n,
                  uint64_t run_seed, int kv_bits, bool live, KvErr *err)
{
    memset(d, 0, sizeof *d);
    d->L = L;
    d->live = live;
    d->kv_bits = kv_bits;
    d->inst = kv_calloc((size_t)n, sizeof *d->inst);
    for (int i = 0; i < n; i++) {
        PolicyEnv env = {
            .seed = policy_instance_seed(run_seed, specs[i].label, L->layer),
            .kv_bits = kv_bits,
        };
        d->inst[i] = specs[i].type->create(specs[i].params, L, &env, err);
        int ready = !d->inst[i] ? -1 : live && d->inst[i]->want_decode_mass ? 1 : 0;
        if (ready != 0) {
            d->n = d->inst[i] ? i + 1 : i;
            driver_free(d);
            return ready;
        }
    }
    d->n = n;
    d->mem = kv_calloc((size_t)n, sizeof *d->mem);
    d->seconds = kv_calloc((size_t)n, sizeof *d->seconds);
    d->sv = kv_calloc((size_t)n, sizeof *d->sv);
    return 0;
}

void driver_free(PolicyDriver *d)
{
    for (int i = 0; i < d->n; i++)
        d->inst[i]->type->destroy(d->inst[i]);
    free(d->inst);
    free(d->mem);
    free(d->seconds);
    free(d->sv);
    memset(d, 0, sizeof *d);
}

/* The observation rows of one instance: the last `rows` of the `all_rows` computed, as the
 * [n_q_heads][rows][P] array PrefillView promises. The shared array when the counts agree;
 * otherwise a copy into the instance's own *own. */
static const float *obs_attn_for(const float *obs, int all_rows, int rows, int Hq, int P,
                                 float **own)
{
    if (rows == all_rows)
        return obs;
    *own = kv_realloc(*own, (size_t)Hq * rows * P * sizeof(float));
    for (int h = 0; h < Hq; h++)
        memcpy(*own + (size_t)h * rows * P, obs + ((size_t)h * all_rows + all_rows - rows) * P,
               (size_t)rows * P * sizeof(float));
    return *own;
}

static bool reads_decode_mass(const Policy *p)
{
    return p->is_oracle && p->want_decode_mass;
}

static int rows_of(const Policy *p, int P)
{
    return p->want_prefill_rows < P ? p->want_prefill_rows : P;
}

/* The statistics of one driver_prefill, and instance i's own copy of its observation rows. */
typedef struct {
    PolicyDriver *d;
    const float *mass, *obs, *dmass;
    int want_rows;
    float **own_obs; /* [n] */
} PrefillJob;

/* Instance i's prefill: instances are independent, so they may run on any threads. */
static int prefill_instance(void *ctx, int i, int slot, KvErr *err)
{
    (void)slot, (void)err;
    PrefillJob *j = ctx;
    const LayerView *L = j->d->L;
    int P = L->n_prompt, Hq = L->n_q_heads;
    Policy *p = j->d->inst[i];
    int rows = rows_of(p, P);
    PrefillView pv = {
        .L = L,
        .prefill_mass = p->want_prefill_mass ? j->mass : NULL,
        .obs_attn = rows > 0 ? obs_attn_for(j->obs, j->want_rows, rows, Hq, P, &j->own_obs[i])
                             : NULL,
        .obs_rows = rows > 0 ? rows : 0,
        .decode_mass = reads_decode_mass(p) ? j->dmass : NULL,
    };
    double t0 = now_seconds();
    p->type->prefill(p, &pv);
    policy_memory_report(p, L->head_dim, j->d->kv_bits, &j->d->mem[i]);
    j->d->seconds[i] += now_seconds() - t0;
    return 0;
}

void driver_prefill(PolicyDriver *d)
{
    const LayerView *L = d->L;
    int T = L->n_tokens, P = L->n_prompt, Hq = L->n_q_heads;
    bool want_mass = false, want_dmass = false;
    int want_rows = 0;
    for (int i = 0; i < d->n; i++) {
        want_mass |= d->inst[i]->want_prefill_mass;
        want_dmass |= reads_decode_mass(d->inst[i]);
        if (rows_of(d->inst[i], P) > want_rows)
            want_rows = rows_of(d->inst[i], P);
    }

    /* The statistics are computed once, at the most rows any instance asks for; each instance
     * then gets exactly the rows it asked for (obs_attn_for). */
    float *mass = want_mass ? kv_calloc((size_t)Hq * P, sizeof(float)) : NULL;
    float *obs = want_rows ? kv_calloc((size_t)Hq * want_rows * P, sizeof(float)) : NULL;
    float *dmass = want_dmass ? kv_calloc((size_t)Hq * T, sizeof(float)) : NULL;
    if (mass || obs || dmass) {
        double s0 = now_seconds();
        if (mass || obs)
            d->stats_flops += prompt_statistics(L->q, L->k, Hq, L->group, T, P, L->head_dim,
                                                L->attn_scale, L->window, mass, obs, want_rows,
                                                d->pool);
        /* Sum over all decode steps of each key's true attention: what oracle_future knows. */
        if (dmass)
            d->stats_flops += decode_mass(L->q, L->k, Hq, L->group, T, P, T, L->head_dim,
                                          L->attn_scale, L->window, dmass, d->pool);
        d->stats_seconds += now_seconds() - s0;
    }
    PrefillJob job = {d, mass, obs, dmass, want_rows, kv_calloc((size_t)d->n, sizeof(float *))};
    if (d->pool)
        pool_for(d->pool, d->n, prefill_instance, &job, NULL); /* a prefill cannot fail */
    else
        for (int i = 0; i < d->n; i++)
            prefill_instance(&job, i, 0, NULL);
    for (int i = 0; i < d->n; i++)
        free(job.own_obs[i]);
    free(job.own_obs);
    free(mass);
    free(obs);
    free(dmass);
}

void driver_step(PolicyDriver *d, int i, int t, const float *full_attn)
{
    Policy *p = d->inst[i];
    d->sv[i] = (StepView){.L = d->L, .t = t, .full_attn = p->is_oracle ? full_attn : NULL};
    double t0 = now_seconds();
    p->type->step(p, &d->sv[i]);
    d->seconds[i] += now_seconds() - t0;
}

void driver_observe(PolicyDriver *d, int i, const float *const *attn)
{
    Policy *p = d->inst[i];
    double t0 = now_seconds();
    if (p->type->observe)
        p->type->observe(p, &d->sv[i], attn);
    policy_memory_report(p, d->L->head_dim, d->kv_bits, &d->mem[i]);
    d->seconds[i] += now_seconds() - t0;
}
