/* sweep.h — the cells of a budget sweep (`kvsim sweep`, `kvsim merge`; docs/sweeps.md) and the
 * files they make.
 *
 * A sweep replays every trace through every policy of a config at each budget (or ratio): its
 * cells are the (trace, policy, value) triples, numbered trace first, then policy in the
 * config's order, then value in ascending order. A cell's results are those of a `kvsim run` of
 * that one policy at that budget: the four CSVs (summary, layers, steps, turns) of a one-policy
 * run, in OUT/cells/tT/pP/bB (rR for a ratio), a directory that appears whole (written under a
 * temporary name and renamed), so that a cell is either finished or absent.
 *
 * From the cells, once every one is there, sweep_assemble writes the files a reader uses:
 * OUT/bB/{summary,layers,steps,turns}.csv (OUT/NAME/bB/... for each trace NAME when there are
 * several): each file of a `kvsim run` of every policy at B, its rows in the config's policy
 * order; and OUT/summary.csv: every budget's summary behind a leading `budget` (`ratio`) column,
 * budgets ascending, then policies in order (behind a `trace` column first with several traces).
 * The assembly reads only the cells and the plan, so shards joined by `kvsim merge` give the
 * same bytes as one unsharded sweep.
 *
 * OUT/sweep.txt records the plan (sweep_plan_write): the config's SHA-256, the values, the
 * traces and the policies, and for a shard its share, "shard I/N"; `--resume` and `kvsim merge`
 * read it back to refuse directories of another sweep. */
#ifndef KVSIM_SWEEP_H
#define KVSIM_SWEEP_H

#include <stdbool.h>

#include "sim/base/util.h"

enum { SWEEP_MAX_VALUES = 64, SWEEP_MAX_TRACES = 4096, SWEEP_MAX_POLICIES = 64 };

typedef struct {
    bool ratios;        /* the values are shares of the prompt (--ratios), else budgets */
    int n_values;
    char value[SWEEP_MAX_VALUES][32]; /* canonical text: "%d" budgets, "%g" ratios; ascending */
    int budget[SWEEP_MAX_VALUES];     /* budgets (0 for ratios) */
    double ratio[SWEEP_MAX_VALUES];   /* ratios (0 for budgets) */
    char config_sha256[65];
    int n_traces;
    char **trace_path;  /* [n_traces] */
    char **trace_name;  /* [n_traces] the file name without directory and .h5, unique */
    int n_policies;
    char label[SWEEP_MAX_POLICIES][64];
    int shard, n_shards; /* this directory's share: 0/1 for a whole sweep */
} SweepPlan;

/* Parses "64,128,256" (positive integers) or "0.1,0.25" (ratios in (0, 1]) into the plan's
 * values, sorted ascending; a value given twice, an empty item or more than SWEEP_MAX_VALUES is
 * an error "--budgets: ..." / "--ratios: ...". */
int sweep_parse_values(SweepPlan *plan, const char *list, bool ratios, KvErr *err);

/* Adds a trace (its name: the file name without directory and a .h5 ending); two traces of one
 * name are an error. */
int sweep_add_trace(SweepPlan *plan, const char *path, KvErr *err);

void sweep_plan_free(SweepPlan *plan);

static inline int sweep_n_cells(const SweepPlan *p)
{
    return p->n_traces * p->n_policies * p->n_values;
}
/* Cell c's trace, policy and value. */
static inline void sweep_cell(const SweepPlan *p, int c, int *t, int *pol, int *v)
{
    *v = c % p->n_values;
    *pol = c / p->n_values % p->n_policies;
    *t = c / (p->n_values * p->n_policies);
}
/* The cells of shard i of n: [floor(i N / n), floor((i + 1) N / n)), contiguous, so that the
 * budgets of one policy on one trace mostly fall in one share and one pass. */
void sweep_shard_range(const SweepPlan *p, int *first, int *end);

/* OUT/cells/tT/pP/bB (or rR). */
void sweep_cell_dir(const SweepPlan *p, const char *out, int c, char *buf, size_t n);
/* Whether the cell's four files are in OUT. */
bool sweep_cell_done(const SweepPlan *p, const char *out, int c);

/* OUT/sweep.txt; sweep_plan_read fills a plan from one (merge); the definition (everything but
 * the shard line) of two plans is compared by sweep_plan_same. */
int sweep_plan_write(const SweepPlan *p, const char *out, KvErr *err);
int sweep_plan_read(SweepPlan *p, const char *out, KvErr *err);
bool sweep_plan_same(const SweepPlan *a, const SweepPlan *b);

/* Removes OUT/cells and everything under it (a fresh sweep). */
int sweep_remove_cells(const char *out, KvErr *err);

/* Writes the CSVs of OUT/bB (per trace) and OUT/summary.csv from the cells, all of which must be
 * there. Rows are copied as the cells hold them; headers must agree. */
int sweep_assemble(const SweepPlan *p, const char *out, KvErr *err);

#endif
