/* mass_trace.h — retained attention mass of a policy, step by step, for comparing policies
 * driven on the same fixture (the oracles' bounds). */
#ifndef KVSIM_TEST_MASS_TRACE_H
#define KVSIM_TEST_MASS_TRACE_H

#include <stdint.h>

#include "tests/support/fixture.h"

/* Creates a policy of `type` with `params` (as fixture_policy), drives it over decode steps
 * [P, T) with fixture_run, destroys it, and writes into out[(t - P) * n_kv_heads + g] the mean
 * over KV head g's query heads of the true attention mass its cache retained at step t. */
void mass_trace_run(Fixture *fx, const char *type, const char *params, uint64_t seed,
                    double *out);

/* Sum of a mass trace over its steps and KV heads. */
double mass_trace_total(const Fixture *fx, const double *trace);

#endif
