/* The replay engine: see engine.h for what it promises. */
#include "sim/replay/engine.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sim/base/attention.h"
#include "sim/replay/metrics.h"

/* Decode steps whose attention is computed by one sgemm per head. */
enum { DECODE_BLOCK = 64 };

typedef struct {
    Trace *tr;
    const TraceMeta *meta;
    const EngineConfig *cfg;
    Results *res;
    int32_t *eval_of_step; /* [T]: evaluated-step index of a decode step, or -1 */
    pthread_mutex_t lock;
    int next_layer;
    bool failed;
    KvErr err;
    atomic_long steps_done;
} Job;

/* Per-worker buffers, allocated once and reused for every layer the worker takes. */
typedef struct {
    float *q, *k, *v;
    float *probs;          /* [DECODE_BLOCK][Hq][T]: full attention rows of a block of steps */
    float *out;            /* [Hq][DECODE_BLOCK][D]: full attention outputs */
    float *row_max, *row_z; /* [Hq][DECODE_BLOCK] */
    int32_t *topk;         /* [Hq][topk] */
    float **attn;          /* [Hkv] -> [group][slots] */
    int *attn_cap;
    float *scratch;        /* gathered cache values and outputs for output_errors */
    size_t scratch_cap;
    double attention_seconds, attention_flops; /* the shared exact attention, prompt included */
    double metric_seconds;
    double *policy_seconds; /* [n_policies]: the policies' own callbacks */
} Worker;

static void worker_init(Worker *w, const TraceMeta *m, const EngineConfig *cfg)
{
    size_t T = (size_t)m->n_tokens, D = (size_t)m->head_dim;
    size_t Hq = (size_t)m->n_q_heads, Hkv = (size_t)m->n_kv_heads;
    memset(w, 0, sizeof *w);
    w->q = kv_malloc(Hq * T * D * sizeof(float));
    w->k = kv_malloc(Hkv * T * D * sizeof(float));
    w->v = kv_malloc(Hkv * T * D * sizeof(float));
    w->probs = kv_malloc((size_t)DECODE_BLOCK * Hq * T * sizeof(float));
    w->out = kv_malloc(Hq * DECODE_BLOCK * D * sizeof(float));
    w->row_max = kv_malloc(Hq * DECODE_BLOCK * sizeof(float));
    w->row_z = kv_malloc(Hq * DECODE_BLOCK * sizeof(float));
    w->topk = kv_malloc(Hq * (size_t)cfg->topk * sizeof(int32_t));
    w->attn = kv_calloc(Hkv, sizeof *w->attn);
    w->attn_cap = kv_calloc(Hkv, sizeof *w->attn_cap);
    w->policy_seconds = kv_calloc((size_t)cfg->n_policies, sizeof(double));
}

static void worker_free(Worker *w, int n_kv_heads)
{
    free(w->q);
    free(w->k);
    free(w->v);
    free(w->probs);
    free(w->out);
    free(w->row_max);
    free(w->row_z);
    free(w->topk);
    for (int g = 0; g < n_kv_heads; g++)
        free(w->attn[g]);
    free(w->attn);
    free(w->attn_cap);
    free(w->scratch);
    free(w->policy_seconds);
}

static void ensure_attn_capacity(Worker *w, int g, int need)
{
    if (w->attn_cap[g] < need) {
        w->attn_cap[g] = need + need / 2 + 64;
        w->attn[g] = kv_realloc(w->attn[g], (size_t)w->attn_cap[g] * sizeof(float));
    }
}

static void ensure_scratch(Worker *w, size_t need)
{
    if (w->scratch_cap < need) {
        w->scratch_cap = need + need / 2;
        w->scratch = kv_realloc(w->scratch, w->scratch_cap * sizeof(float));
    }
}

/* Query t's attention over one KV head's cache, for each head of its group: the metrics at an
 * evaluated step, and the renormalised attention the policy observes. */
/* A metric value that is not finite is a bug in a policy or in kvsim, never a result: the run
 * stops with an error naming where it appeared. */
static int check_finite(Job *job, int pi, int layer, int t, const char *metric, int head,
                        double v, KvErr *err)
{
    if (isfinite(v))
        return 0;
    char where[32] = "";
    if (head >= 0)
        snprintf(where, sizeof where, ", query head %d", head);
    return kv_fail(err, "%s: policy %s, layer %d, step %d%s: %s = %g is not finite",
                   trace_path(job->tr), job->cfg->policies[pi].label, layer, t, where, metric,
                   v);
}

static int attend_kv_head(Job *job, Worker *w, const LayerView *L, int pi, const KVCache *c,
                          int g, int t, int b, int e, bool observe, KvErr *err)
{
    const EngineConfig *cfg = job->cfg;
    int T = L->n_tokens, D = L->head_dim, G = L->group, Hq = L->n_q_heads;
    int k = cfg->topk < t + 1 ? cfg->topk : t + 1;
    bool want_err = e >= 0 && output_errors_needed(c, t);
    bool want_attn = observe || want_err;
    FullRow rows[G];
    double mass[G], out_err[G];
    if (want_attn)
        ensure_attn_capacity(w, g, G * c->n);
    for (int i = 0; i < G; i++) {
        int h = g * G + i;
        rows[i] = (FullRow){
            .t = t, .head_dim = D, .scale = L->attn_scale, .window = L->window,
            .q = L->q + ((size_t)h * T + t) * D,
            .p = w->probs + ((size_t)b * Hq + h) * T,
            .logit_max = w->row_max[h * DECODE_BLOCK + b],
            .logit_z = w->row_z[h * DECODE_BLOCK + b],
            .k = L->k + (size_t)g * T * D,
            .v = L->v + (size_t)g * T * D,
            .o_full = w->out + ((size_t)h * DECODE_BLOCK + b) * D,
        };
        mass[i] = cache_attention(c, &rows[i], want_attn ? w->attn[g] + (size_t)i * c->n : NULL)
                      .retained_mass;
    }
    if (e < 0)
        return 0;
    for (int i = 0; i < G; i++)
        out_err[i] = 0.0;
    if (want_err) {
        ensure_scratch(w, (size_t)(c->n + G) * D);
        output_errors(c, rows, G, w->attn[g], w->scratch, out_err);
    }
    for (int i = 0; i < G; i++) {
        int h = g * G + i;
        float *hm = results_head(job->res, pi, L->layer, e, h);
        hm[HM_MASS] = (float)mass[i];
        hm[HM_RECALL] = (float)recall_at_k(c, w->topk + (size_t)h * cfg->topk, k);
        hm[HM_OUT_ERR] = (float)out_err[i];
        if (check_finite(job, pi, L->layer, t, metric_of(METRIC_HEAD, HM_MASS)->name, h,
                         hm[HM_MASS], err) != 0 ||
            check_finite(job, pi, L->layer, t, metric_of(METRIC_HEAD, HM_OUT_ERR)->name, h,
                         hm[HM_OUT_ERR], err) != 0)
            return -1;
    }
    return 0;
}

/* One policy instance at decode step t: step, attention over its caches and metrics, observe,
 * memory. The driver times the callbacks; the metric time is accounted here. */
static int replay_step(Job *job, Worker *w, PolicyDriver *drv, int pi, int t, int b, int e,
                       KvErr *err)
{
    Results *res = job->res;
    const LayerView *L = drv->L;
    Policy *inst = drv->inst[pi];
    bool observe = inst->type->observe != NULL;

    driver_step(drv, pi, t, w->probs + (size_t)b * L->n_q_heads * L->n_tokens);
    double t1 = now_seconds();
    double cache_tokens = 0, needles = NAN;
    for (int g = 0; g < L->n_kv_heads; g++) {
        cache_tokens += inst->cache[g].n;
        if ((observe || e >= 0) &&
            attend_kv_head(job, w, L, pi, &inst->cache[g], g, t, b, e, observe, err) != 0)
            return -1;
    }
    if (e >= 0 && res->eval_probe[e]) {
        /* The needles the probe query could attend to: the cache as it attended, before
         * observe() evicts for the next step. Mean over KV heads. */
        double sum = 0;
        int counted = 0;
        for (int g = 0; g < L->n_kv_heads; g++) {
            double s = needle_survival(&inst->cache[g], L->meta, t);
            if (!isnan(s)) {
                sum += s;
                counted++;
            }
        }
        needles = counted ? sum / counted : NAN;
    }
    w->metric_seconds += now_seconds() - t1;
    driver_observe(drv, pi, (const float *const *)w->attn);

    const MemReport mem = drv->mem[pi];
    double *tot = results_total(res, pi, L->layer);
    tot[TM_TO_HOST_BYTES] += mem.to_host_bytes;
    tot[TM_TO_DEVICE_BYTES] += mem.to_device_bytes;
    tot[TM_FETCHED_TOKENS] += mem.fetched_tokens;
    tot[TM_RESTORED_TOKENS] += mem.restored_tokens;
    tot[TM_RESTORE_K_ERR] += mem.restore_k_err;
    tot[TM_RESTORE_V_ERR] += mem.restore_v_err;
    if (e >= 0) {
        double *sm = results_step(res, pi, L->layer, e);
        sm[SM_CACHE_TOKENS] = cache_tokens / L->n_kv_heads;
        sm[SM_DEVICE_BYTES] = mem.device_bytes;
        sm[SM_ALLOCATED_BYTES] = mem.allocated_bytes;
        sm[SM_HOST_BYTES] = mem.host_bytes;
        sm[SM_FETCHED_TOKENS] = mem.fetched_tokens;
        sm[SM_NEEDLE_SURVIVAL] = needles;
    }
    static const char *const mem_name[] = {"device_bytes", "allocated_bytes", "host_bytes",
                                           "to_host_bytes", "to_device_bytes", "fetched_tokens",
                                           "restored_tokens", "restore_k_err", "restore_v_err"};
    const double mem_value[] = {mem.device_bytes, mem.allocated_bytes, mem.host_bytes,
                                mem.to_host_bytes, mem.to_device_bytes, mem.fetched_tokens,
                                mem.restored_tokens, mem.restore_k_err, mem.restore_v_err};
    for (size_t i = 0; i < sizeof mem_value / sizeof mem_value[0]; i++)
        if (check_finite(job, pi, L->layer, t, mem_name[i], -1, mem_value[i], err) != 0)
            return -1;
    return 0;
}

/* The decode run [a, b): the true attention of its steps, a block at a time, then each policy's
 * step at each of them. */
static int decode_run(Job *job, Worker *w, PolicyDriver *drv, int a, int b_end, KvErr *err)
{
    const TraceMeta *m = job->meta;
    const EngineConfig *cfg = job->cfg;
    const LayerView L = *drv->L;
    int T = m->n_tokens, D = m->head_dim, Hq = m->n_q_heads, layer = L.layer;
    int n_pol = cfg->n_policies;
    bool failed = false;
    for (int t0 = a; t0 < b_end && !job->failed && !failed; t0 += DECODE_BLOCK) {
        int B = b_end - t0 < DECODE_BLOCK ? b_end - t0 : DECODE_BLOCK;
        double a0 = now_seconds();
        for (int h = 0; h < Hq; h++) {
            int g = h / L.group;
            attention_block(w->q + ((size_t)h * T + t0) * D, B, t0, w->k + (size_t)g * T * D,
                            w->v + (size_t)g * T * D, D, L.attn_scale, L.window,
                            w->probs + (size_t)h * T, Hq * T, w->out + (size_t)h * DECODE_BLOCK * D,
                            w->row_max + h * DECODE_BLOCK, w->row_z + h * DECODE_BLOCK);
            w->attention_flops += attention_block_flops(B, t0, D, 1);
            /* A logit that overflows float (|q.k| * scale beyond 3.4e38) leaves a row that is
             * not a distribution: the trace is out of range, and no metric can be computed. */
            for (int b = 0; b < B && !failed; b++)
                if (!isfinite(w->row_max[h * DECODE_BLOCK + b]) ||
                    !isfinite(w->row_z[h * DECODE_BLOCK + b])) {
                    kv_fail(err, "%s: layer %d, step %d, query head %d: the attention logits "
                            "are not finite (Q or K too large for float32 at attn_scale %g)",
                            trace_path(job->tr), layer, t0 + b, h, m->attn_scale);
                    failed = true;
                }
        }
        w->attention_seconds += now_seconds() - a0;
        if (failed)
            break;

        for (int b = 0; b < B && !failed; b++) {
            int t = t0 + b, e = job->eval_of_step[t];
            if (e >= 0) {
                double k0 = now_seconds();
                int k = cfg->topk < t + 1 ? cfg->topk : t + 1;
                for (int h = 0; h < Hq; h++)
                    topk_indices(w->probs + ((size_t)b * Hq + h) * T, t + 1, k,
                                 w->topk + (size_t)h * cfg->topk);
                w->metric_seconds += now_seconds() - k0;
            }
            for (int pi = 0; pi < n_pol && !failed; pi++)
                failed = replay_step(job, w, drv, pi, t, b, e, err) != 0;
        }
        atomic_fetch_add(&job->steps_done, B);
    }
    return failed ? -1 : 0;
}

static int process_layer(Job *job, Worker *w, int layer, KvErr *err)
{
    const TraceMeta *m = job->meta;
    const EngineConfig *cfg = job->cfg;
    if (trace_read_layer(job->tr, layer, w->q, w->k, w->v, err) != 0)
        return -1;
    LayerView L = layer_view_make(m, layer, w->q, w->k, w->v);

    int n_pol = cfg->n_policies;
    PolicyDriver drv;
    if (driver_create(&drv, &L, cfg->policies, n_pol, cfg->seed, cfg->kv_bits, false, err) != 0)
        return -1;
    if (layer == 0) /* one writer: only one worker takes layer 0 */
        for (int pi = 0; pi < n_pol; pi++)
            job->res->is_oracle[pi] = drv.inst[pi]->is_oracle;

    /* The spans in order (policies/policy.h): a prefill span chunk by chunk, a decode run step
     * by step. */
    bool failed = false;
    for (int s = 0; s < m->n_spans && !job->failed && !failed; s++) {
        const TraceSpan *sp = &m->spans[s];
        if (sp->kind == SPAN_DECODE) {
            failed = decode_run(job, w, &drv, sp->start, sp->end, err) != 0;
            continue;
        }
        for (int c0 = sp->start; c0 < sp->end;) {
            int c1 = driver_chunk_end(c0, sp->end, cfg->prefill_chunk);
            driver_prefill(&drv, sp->start, sp->end, c0, c1);
            c0 = c1;
        }
    }
    w->attention_seconds += drv.stats_seconds;
    w->attention_flops += drv.stats_flops;

    for (int pi = 0; pi < n_pol; pi++)
        w->policy_seconds[pi] += drv.seconds[pi];
    driver_free(&drv);
    return failed ? -1 : 0;
}

static void *worker_main(void *arg)
{
    Job *job = arg;
    Worker w;
    worker_init(&w, job->meta, job->cfg);
    for (;;) {
        pthread_mutex_lock(&job->lock);
        int layer = job->failed ? job->meta->n_layers : job->next_layer++;
        pthread_mutex_unlock(&job->lock);
        if (layer >= job->meta->n_layers)
            break;
        KvErr err;
        if (process_layer(job, &w, layer, &err) != 0) {
            pthread_mutex_lock(&job->lock);
            if (!job->failed) {
                job->failed = true;
                job->err = err;
            }
            pthread_mutex_unlock(&job->lock);
            break;
        }
    }
    pthread_mutex_lock(&job->lock);
    job->res->attention_seconds += w.attention_seconds;
    job->res->attention_flops += w.attention_flops;
    job->res->metric_seconds += w.metric_seconds;
    for (int pi = 0; pi < job->cfg->n_policies && pi < 64; pi++)
        job->res->policy_seconds[pi] += w.policy_seconds[pi];
    pthread_mutex_unlock(&job->lock);
    worker_free(&w, job->meta->n_kv_heads);
    return NULL;
}

/* Evaluated steps: in every decode run, every eval_every-th step from its first, plus the decode
 * steps that are probes. A probe inside a prefill span says nothing about eviction: a prefill
 * chunk attends over the cache plus the whole chunk, which no budget bounds, so it is not
 * evaluated. */
static void plan_evaluations(Results *r, const TraceMeta *m, int eval_every, int32_t *eval_of_step)
{
    int T = m->n_tokens;
    bool *probe = kv_calloc((size_t)T, sizeof *probe);
    int32_t *run_start = kv_malloc((size_t)T * sizeof *run_start); /* -1: a prefill position */
    for (int s = 0; s < m->n_spans; s++)
        for (int t = m->spans[s].start; t < m->spans[s].end; t++)
            run_start[t] = m->spans[s].kind == SPAN_DECODE ? m->spans[s].start : -1;
    for (int i = 0; i < m->n_probes; i++)
        if (run_start[m->probes[i]] >= 0)
            probe[m->probes[i]] = true;
    r->eval_step = kv_malloc((size_t)(r->n_steps + 1) * sizeof *r->eval_step);
    r->eval_probe = kv_malloc((size_t)(r->n_steps + 1) * sizeof *r->eval_probe);
    r->n_evals = 0;
    for (int t = 0; t < T; t++) {
        eval_of_step[t] = -1;
        if (run_start[t] >= 0 && ((t - run_start[t]) % eval_every == 0 || probe[t])) {
            eval_of_step[t] = r->n_evals;
            r->eval_step[r->n_evals] = t;
            r->eval_probe[r->n_evals] = probe[t] && m->n_needles > 0;
            r->n_evals++;
        }
    }
    free(probe);
    free(run_start);
}

static void print_progress(Job *job, long total, double started)
{
    long done = atomic_load(&job->steps_done);
    double elapsed = now_seconds() - started;
    double frac = total ? (double)done / total : 1.0;
    double eta = frac > 0 ? elapsed * (1 - frac) / frac : 0;
    fprintf(stderr, "\rreplay: %5.1f%%  %ld/%ld layer-steps  %.0fs elapsed  ETA %.0fs   ",
            100 * frac, done, total, elapsed, eta);
}

Results *engine_run(Trace *tr, const EngineConfig *cfg, KvErr *err)
{
    const TraceMeta *m = trace_meta(tr);
    int n_steps = 0;
    for (int s = 0; s < m->n_spans; s++)
        if (m->spans[s].kind == SPAN_DECODE)
            n_steps += m->spans[s].end - m->spans[s].start;
    if (n_steps == 0) {
        if (m->n_spans == 1)
            kv_fail(err, "%s: the trace has no decode steps (n_prompt = n_tokens = %d)",
                    trace_path(tr), m->n_tokens);
        else
            kv_fail(err, "%s: the trace has no decode steps (its %d spans are all prefill)",
                    trace_path(tr), m->n_spans);
        return NULL;
    }
    Results *r = kv_calloc(1, sizeof *r);
    r->n_policies = cfg->n_policies;
    r->n_layers = m->n_layers;
    r->n_q_heads = m->n_q_heads;
    r->n_kv_heads = m->n_kv_heads;
    r->n_prompt = m->n_prompt;
    r->n_tokens = m->n_tokens;
    r->n_steps = n_steps;
    r->label = kv_calloc((size_t)cfg->n_policies, sizeof *r->label);
    r->type = kv_calloc((size_t)cfg->n_policies, sizeof *r->type);
    r->is_oracle = kv_calloc((size_t)cfg->n_policies, sizeof *r->is_oracle);
    for (int pi = 0; pi < cfg->n_policies; pi++) {
        memcpy(r->label[pi], cfg->policies[pi].label, sizeof r->label[pi]);
        r->type[pi] = cfg->policies[pi].type;
    }
    Job job = {.tr = tr, .meta = m, .cfg = cfg, .res = r};
    job.eval_of_step = kv_malloc((size_t)m->n_tokens * sizeof *job.eval_of_step);
    plan_evaluations(r, m, cfg->eval_every, job.eval_of_step);
    size_t n_head = (size_t)cfg->n_policies * m->n_layers * r->n_evals * m->n_q_heads;
    size_t n_step = (size_t)cfg->n_policies * m->n_layers * r->n_evals;
    r->head = kv_calloc(n_head * N_HEAD_METRICS, sizeof *r->head);
    r->step = kv_calloc(n_step * N_STEP_METRICS, sizeof *r->step);
    r->total = kv_calloc((size_t)cfg->n_policies * m->n_layers * N_TOTAL_METRICS, sizeof *r->total);

    int threads = cfg->threads > 0 ? cfg->threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads < 1)
        threads = 1;
    if (threads > m->n_layers)
        threads = m->n_layers;
    r->threads_used = threads;
    /* Parallelism is across layers; BLAS inside a worker stays single-threaded. */
    openblas_set_num_threads(1);
    pthread_mutex_init(&job.lock, NULL);
    atomic_init(&job.steps_done, 0);

    double started = now_seconds();
    pthread_t *tids = kv_malloc((size_t)threads * sizeof *tids);
    for (int i = 0; i < threads; i++)
        pthread_create(&tids[i], NULL, worker_main, &job);
    long total = (long)m->n_layers * r->n_steps;
    if (cfg->progress) {
        while (atomic_load(&job.steps_done) < total && !job.failed) {
            print_progress(&job, total, started);
            nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 250000000}, NULL);
            pthread_mutex_lock(&job.lock);
            bool all_taken = job.next_layer >= m->n_layers;
            pthread_mutex_unlock(&job.lock);
            if (all_taken && atomic_load(&job.steps_done) >= total)
                break;
        }
    }
    for (int i = 0; i < threads; i++)
        pthread_join(tids[i], NULL);
    if (cfg->progress) {
        print_progress(&job, total, started);
        fputc('\n', stderr);
    }
    r->wall_seconds = now_seconds() - started;
    free(tids);
    free(job.eval_of_step);
    pthread_mutex_destroy(&job.lock);
    if (job.failed) {
        *err = job.err;
        results_free(r);
        return NULL;
    }
    return r;
}

void results_free(Results *r)
{
    if (!r)
        return;
    free(r->eval_step);
    free(r->eval_probe);
    free(r->label);
    free(r->type);
    free(r->is_oracle);
    free(r->head);
    free(r->step);
    free(r->total);
    free(r);
}
