/* Synthetic chat workloads: conversations as events in time order, written as they happen, so
 * that memory holds only the conversations in progress. */
#include "sim/reuse/workload.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sim/base/blas.h" /* before the GSL headers */
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>
#include "sim/base/progress.h"

void workload_defaults(WorkloadParams *wp)
{
    *wp = (WorkloadParams){
        .seed = 1, .n_conversations = 1000, .turns_mean = 4.0, .n_system = 4,
        .system_mean = 1024.0, .message_mean = 256.0, .answer_mean = 384.0, .rate = 1.0,
        .think_mean = 30.0, .block_tokens = 16, .n_models = 1, .switch_prob = 0.0,
        .progress = false,
    };
}

int workload_validate(const WorkloadParams *wp, KvErr *err)
{
    if (wp->n_conversations < 0)
        return kv_fail(err, "synth-workload: --conversations: expected >= 0");
    if (!(wp->turns_mean >= 1.0) || !isfinite(wp->turns_mean))
        return kv_fail(err, "synth-workload: --turns-mean: expected a finite value >= 1, found %g",
                       wp->turns_mean);
    if (wp->n_system < 0)
        return kv_fail(err, "synth-workload: --system-prompts: expected >= 0");
    const double *means[] = {&wp->system_mean, &wp->message_mean, &wp->answer_mean};
    const char *names[] = {"--system-mean", "--message-mean", "--answer-mean"};
    for (int i = 0; i < 3; i++)
        if (!(*means[i] >= 1.0) || !isfinite(*means[i]))
            return kv_fail(err, "synth-workload: %s: expected a finite value >= 1 (tokens), found %g",
                           names[i], *means[i]);
    if (!(wp->rate > 0) || !isfinite(wp->rate))
        return kv_fail(err, "synth-workload: --rate: expected a finite value > 0, found %g", wp->rate);
    if (!(wp->think_mean >= 0) || !isfinite(wp->think_mean))
        return kv_fail(err, "synth-workload: --think-mean: expected a finite value >= 0, found %g",
                       wp->think_mean);
    if (wp->block_tokens < 1)
        return kv_fail(err, "synth-workload: --block: expected >= 1");
    if (wp->n_models < 1)
        return kv_fail(err, "synth-workload: --models: expected >= 1, found %d", wp->n_models);
    if (!(wp->switch_prob >= 0 && wp->switch_prob <= 1))
        return kv_fail(err, "synth-workload: --switch-prob: expected a probability in [0, 1], found %g",
                       wp->switch_prob);
    if (wp->switch_prob > 0 && wp->n_models < 2)
        return kv_fail(err, "synth-workload: --switch-prob %g: expected --models >= 2 to switch between",
                       wp->switch_prob);
    return 0;
}

typedef struct {
    double time;   /* of its next turn */
    long seq;      /* creation order: ties in time go to the older conversation */
    bool started;
    int turns_left, turn;
    int64_t ctx;   /* tokens of the conversation so far (after the last answer) */
    int64_t *blocks; /* ids of its full blocks so far */
    size_t n_blocks, cap_blocks;
    long last_chat; /* chat_id of its previous request, -1 before the first */
    int system;     /* its system prompt, -1: none */
    int model;
} Conv;

typedef struct {
    Conv **a;
    size_t n, cap;
} ConvHeap;

static bool conv_before(const Conv *x, const Conv *y)
{
    return x->time != y->time ? x->time < y->time : x->seq < y->seq;
}

static void heap_push(ConvHeap *h, Conv *c)
{
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 64;
        h->a = kv_realloc(h->a, h->cap * sizeof *h->a);
    }
    size_t i = h->n++;
    while (i > 0 && conv_before(c, h->a[(i - 1) / 2])) {
        h->a[i] = h->a[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->a[i] = c;
}

static Conv *heap_pop(ConvHeap *h)
{
    Conv *top = h->a[0], *last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const Conv *best = last;
        if (l < h->n && conv_before(h->a[l], best))
            best = h->a[m = l];
        if (l + 1 < h->n && conv_before(h->a[l + 1], best))
            best = h->a[m = l + 1];
        if (m == i)
            break;
        h->a[i] = h->a[m];
        i = m;
    }
    if (h->n > 0)
        h->a[i] = last;
    return top;
}

static void add_block(Conv *c, int64_t id)
{
    if (c->n_blocks == c->cap_blocks) {
        c->cap_blocks = c->cap_blocks ? 2 * c->cap_blocks : 64;
        c->blocks = kv_realloc(c->blocks, c->cap_blocks * sizeof *c->blocks);
    }
    c->blocks[c->n_blocks++] = id;
}

static int64_t geometric(gsl_rng *rng, double mean)
{
    return mean <= 1.0 ? 1 : (int64_t)gsl_ran_geometric(rng, 1.0 / mean);
}

static Conv *new_conv(double time, long seq)
{
    Conv *c = kv_calloc(1, sizeof *c);
    c->time = time;
    c->seq = seq;
    c->last_chat = -1;
    c->system = -1;
    return c;
}

int workload_write(const WorkloadParams *wp, const char *path, long *n_requests, KvErr *err)
{
    if (workload_validate(wp, err) < 0)
        return -1;
    AtomicFile af;
    if (atomic_open(&af, path, err) < 0)
        return -1;
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, wp->seed);
    const int64_t B = wp->block_tokens;
    int64_t next_id = 0;
    /* The shared system prompts: lengths and the ids of their full blocks, under each model
     * (a model's KV of the same tokens is other KV: other ids), sys_first[j * models + m]. */
    const int M = wp->n_models;
    int64_t *sys_len = kv_calloc((size_t)(wp->n_system ? wp->n_system : 1), sizeof *sys_len);
    int64_t *sys_first = kv_calloc((size_t)(wp->n_system ? wp->n_system : 1) * (size_t)M,
                                   sizeof *sys_first);
    for (int j = 0; j < wp->n_system; j++) {
        sys_len[j] = geometric(rng, wp->system_mean);
        sys_first[(size_t)j * M] = next_id;
        next_id += sys_len[j] / B;
    }
    for (int j = 0; j < wp->n_system; j++) /* drawn after the lengths: one model, same bytes */
        for (int m = 1; m < M; m++) {
            sys_first[(size_t)j * M + m] = next_id;
            next_id += sys_len[j] / B;
        }
    ConvHeap heap = {0};
    long created = 0, chat = 0;
    if (wp->n_conversations > 0)
        heap_push(&heap, new_conv(gsl_ran_exponential(rng, 1.0 / wp->rate), created++));
    size_t line_cap = 1 << 16;
    char *line = kv_malloc(line_cap);
    Progress pr;
    progress_begin(&pr, wp->progress, "synth-workload", "conversations", wp->n_conversations);
    long done = 0;
    while (heap.n > 0) {
        Conv *c = heap_pop(&heap);
        if (!c->started) {
            c->started = true;
            if (wp->n_system > 0) {
                int j = (int)gsl_rng_uniform_int(rng, (unsigned long)wp->n_system);
                c->system = j;
                c->ctx = sys_len[j];
            }
            if (M > 1)
                c->model = (int)gsl_rng_uniform_int(rng, (unsigned long)M);
            if (c->system >= 0)
                for (int64_t b = 0; b < sys_len[c->system] / B; b++)
                    add_block(c, sys_first[(size_t)c->system * M + c->model] + b);
            int64_t turns = geometric(rng, wp->turns_mean);
            c->turns_left = turns > 1000000 ? 1000000 : (int)turns;
            if (created < wp->n_conversations)
                heap_push(&heap, new_conv(c->time + gsl_ran_exponential(rng, 1.0 / wp->rate),
                                          created++));
        }
        if (c->turn > 0 && wp->switch_prob > 0 && gsl_rng_uniform(rng) < wp->switch_prob) {
            /* another model, uniformly: the whole context is encoded again under new ids */
            c->model = (c->model + 1 + (int)gsl_rng_uniform_int(rng, (unsigned long)(M - 1))) % M;
            c->n_blocks = 0;
            if (c->system >= 0)
                for (int64_t b = 0; b < sys_len[c->system] / B; b++)
                    add_block(c, sys_first[(size_t)c->system * M + c->model] + b);
        }
        int64_t msg = geometric(rng, wp->message_mean), answer = geometric(rng, wp->answer_mean);
        int64_t input = c->ctx + msg, full = input / B, n_ids = (input + B - 1) / B;
        while ((int64_t)c->n_blocks < full)
            add_block(c, next_id++);
        size_t need = 256 + (size_t)n_ids * 21;
        if (need > line_cap) {
            line_cap = need;
            line = kv_realloc(line, line_cap);
        }
        c->turn++;
        int len = snprintf(line, line_cap,
                           "{\"chat_id\": %ld, \"parent_chat_id\": %ld, \"timestamp\": %.3f, "
                           "\"input_length\": %lld, \"output_length\": %lld, \"type\": \"text\", "
                           "\"turn\": %d, \"hash_ids\": [",
                           chat, c->last_chat, c->time, (long long)input, (long long)answer, c->turn);
        size_t at = (size_t)len;
        if (M > 1) { /* the extension field, only where there is a choice */
            at -= strlen("\"hash_ids\": [");
            at += (size_t)snprintf(line + at, line_cap - at, "\"model\": %d, \"hash_ids\": [", c->model);
        }
        for (int64_t b = 0; b < n_ids; b++) {
            int64_t id = b < full ? c->blocks[b] : next_id++; /* a cut block is new every time */
            at += (size_t)snprintf(line + at, line_cap - at, b ? ", %lld" : "%lld", (long long)id);
        }
        memcpy(line + at, "]}\n", 3);
        at += 3;
        fwrite(line, 1, at, af.fp);
        c->last_chat = chat++;
        c->ctx = input + answer;
        if (--c->turns_left > 0) {
            c->time += wp->think_mean > 0 ? gsl_ran_exponential(rng, wp->think_mean) : 0.0;
            heap_push(&heap, c);
        } else {
            free(c->blocks);
            free(c);
            progress_set(&pr, ++done);
        }
    }
    progress_end(&pr);
    free(line);
    free(heap.a);
    free(sys_len);
    free(sys_first);
    gsl_rng_free(rng);
    if (n_requests)
        *n_requests = chat;
    return atomic_commit(&af, err);
}
