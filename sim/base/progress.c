/* The progress line: see progress.h. */
#include "sim/base/progress.h"

#include <stdio.h>

#include "sim/base/util.h"

enum { PRINT_EVERY_US = 250000 };

void progress_begin(Progress *p, bool enabled, const char *label, const char *unit, long total)
{
    p->enabled = enabled;
    p->label = label;
    p->unit = unit;
    p->total = total;
    p->started = now_seconds();
    atomic_init(&p->done, 0);
    atomic_init(&p->next_print_us, 0);
}

static void print_line(const Progress *p, long done)
{
    double elapsed = now_seconds() - p->started;
    double frac = p->total > 0 ? (double)done / p->total : 1.0;
    double rate = elapsed > 0 ? done / elapsed : 0;
    double eta = rate > 0 ? (p->total - done) / rate : 0;
    fprintf(stderr, "\r%s: %5.1f%%  %ld/%ld %s  %.1f %s/s  %.0fs elapsed  ETA %.0fs   ", p->label,
            100 * frac, done, p->total, p->unit, rate, p->unit, elapsed, eta);
    fflush(stderr);
}

/* Prints when a line is due; of several threads that find it due, the one that moves the next
 * time on prints. */
static void maybe_print(Progress *p, long done)
{
    long now_us = (long)((now_seconds() - p->started) * 1e6);
    long due = atomic_load(&p->next_print_us);
    if (now_us >= due &&
        atomic_compare_exchange_strong(&p->next_print_us, &due, now_us + PRINT_EVERY_US))
        print_line(p, done);
}

void progress_add(Progress *p, long n)
{
    if (!p->enabled)
        return;
    maybe_print(p, atomic_fetch_add(&p->done, n) + n);
}

void progress_set(Progress *p, long done)
{
    if (!p->enabled)
        return;
    atomic_store(&p->done, done);
    maybe_print(p, done);
}

void progress_end(Progress *p)
{
    if (!p->enabled)
        return;
    print_line(p, atomic_load(&p->done));
    fputc('\n', stderr);
}
