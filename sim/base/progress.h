/* progress.h — kvsim's one progress line on stderr, for every long command (replay, eval, synth,
 * trace): "\rLABEL:  45.2%  1234/2730 UNIT  56.1 UNIT/s  22s elapsed  ETA 27s".
 *
 * progress_begin, then progress_add (from any thread; the count is atomic) or progress_set (one
 * thread), then progress_end, which prints the final line and ends it with a newline. A line is
 * printed at most every quarter second, by whichever thread's update finds one due, so workers
 * report their own progress and no thread is spent watching. Disabled (enabled = false, e.g.
 * stderr is not a terminal), every call does nothing. */
#ifndef KVSIM_PROGRESS_H
#define KVSIM_PROGRESS_H

#include <stdatomic.h>
#include <stdbool.h>

typedef struct {
    bool enabled;
    const char *label, *unit; /* static strings */
    long total;
    double started;
    atomic_long done;
    atomic_long next_print_us; /* since started */
} Progress;

void progress_begin(Progress *p, bool enabled, const char *label, const char *unit, long total);
void progress_add(Progress *p, long n);
void progress_set(Progress *p, long done);
void progress_end(Progress *p);

#endif
