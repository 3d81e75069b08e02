#include "tests/support/mass_trace.h"

#include <stdlib.h>

typedef struct {
    const Fixture *fx;
    double *out;
} MassTraceRun;

static void record_mass(int t, const Policy *p, const float *full_attn, void *ud)
{
    MassTraceRun *run = ud;
    const LayerView *L = &run->fx->L;
    for (int g = 0; g < L->n_kv_heads; g++) {
        double mass = 0;
        for (int i = 0; i < L->group; i++)
            mass += fixture_mass(run->fx, p, full_attn, g * L->group + i);
        run->out[(size_t)(t - L->n_prompt) * L->n_kv_heads + g] = mass / L->group;
    }
}

void mass_trace_run(Fixture *fx, const char *type, const char *params, uint64_t seed,
                    double *out)
{
    Policy *p = fixture_policy(fx, type, params, seed);
    MassTraceRun run = {fx, out};
    fixture_run(fx, p, fx->L.n_tokens, record_mass, &run);
    p->type->destroy(p);
}

double mass_trace_total(const Fixture *fx, const double *trace)
{
    size_t n = (size_t)(fx->L.n_tokens - fx->L.n_prompt) * fx->L.n_kv_heads;
    double total = 0;
    for (size_t i = 0; i < n; i++)
        total += trace[i];
    return total;
}
