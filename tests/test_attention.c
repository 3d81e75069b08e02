/* The attention statistics of sim/base/attention.h against a direct computation in double:
 * prompt_statistics (mass and observation rows) and decode_mass over several decode runs, on a
 * global and a sliding-window layer, alone and on a pool of threads (the same numbers). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "sim/base/attention.h"
#include "sim/base/pool.h"

enum { HQ = 4, GROUP = 2, T = 300, D = 8, P = 170 };

static float q[HQ * T * D], k[HQ / GROUP * T * D];

static void fill(void)
{
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        q[i] = (float)((double)(x >> 11) / 9007199254740992.0 * 4.0 - 2.0);
    }
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        k[i] = (float)((double)(x >> 11) / 9007199254740992.0 * 4.0 - 2.0);
    }
}

/* p_i(j) of query i of head h, in double: softmax over keys [lo, i]. */
static void reference_row(int h, int i, float scale, int window, double *p)
{
    const float *qi = q + ((size_t)h * T + i) * D, *kg = k + (size_t)(h / GROUP) * T * D;
    int lo = window > 0 && i + 1 > window ? i + 1 - window : 0;
    double mx = -INFINITY, z = 0;
    for (int j = 0; j < T; j++)
        p[j] = 0;
    for (int j = lo; j <= i; j++) {
        double s = 0;
        for (int d = 0; d < D; d++)
            s += (double)qi[d] * kg[(size_t)j * D + d];
        p[j] = s * scale;
        mx = p[j] > mx ? p[j] : mx;
    }
    for (int j = lo; j <= i; j++)
        z += (p[j] = exp(p[j] - mx));
    for (int j = lo; j <= i; j++)
        p[j] /= z;
}

static void check_prompt_statistics(int window, Pool *pool)
{
    const int W = 5;
    float scale = 0.35f;
    float *mass = calloc((size_t)HQ * P, sizeof *mass);
    float *obs = calloc((size_t)HQ * W * P, sizeof *obs);
    prompt_statistics(q, k, HQ, GROUP, T, P, D, scale, 0.0f, window, mass, obs, W, pool);
    double p[T];
    for (int h = 0; h < HQ; h++) {
        double want[P];
        memset(want, 0, sizeof want);
        for (int i = 0; i < P; i++) {
            reference_row(h, i, scale, window, p);
            for (int j = 0; j < P; j++)
                want[j] += p[j];
            if (i >= P - W)
                for (int j = 0; j < P; j++)
                    assert_true(fabs(obs[((size_t)h * W + i - (P - W)) * P + j] - p[j]) < 2e-6);
        }
        for (int j = 0; j < P; j++)
            assert_true(fabs(mass[(size_t)h * P + j] - want[j]) < 1e-4 * (1 + want[j]));
    }
    free(mass);
    free(obs);
}

/* Two decode runs with a prefill span between them: each key's attention summed over the
 * queries of both runs, in rows of stride T. */
static void check_decode_mass(int window, Pool *pool, float *out)
{
    const int runs[2][2] = {{P, 210}, {240, T}};
    float scale = 0.35f;
    memset(out, 0, (size_t)HQ * T * sizeof *out);
    for (int r = 0; r < 2; r++)
        decode_mass(q, k, HQ, GROUP, T, runs[r][0], runs[r][1], D, scale, 0.0f, window, out, pool);
    double p[T];
    for (int h = 0; h < HQ; h++) {
        double want[T];
        memset(want, 0, sizeof want);
        for (int r = 0; r < 2; r++)
            for (int i = runs[r][0]; i < runs[r][1]; i++) {
                reference_row(h, i, scale, window, p);
                for (int j = 0; j < T; j++)
                    want[j] += p[j];
            }
        for (int j = 0; j < T; j++)
            assert_true(fabs(out[(size_t)h * T + j] - want[j]) < 1e-4 * (1 + want[j]));
    }
}

static void test_prompt_statistics(void **state)
{
    (void)state;
    fill();
    Pool *pool = pool_create(3);
    for (int window = 0; window <= 40; window += 40) {
        check_prompt_statistics(window, NULL);
        check_prompt_statistics(window, pool);
    }
    pool_free(pool);
}

static void test_decode_mass_over_runs(void **state)
{
    (void)state;
    fill();
    Pool *pool = pool_create(3);
    float *alone = malloc((size_t)HQ * T * sizeof *alone);
    float *pooled = malloc((size_t)HQ * T * sizeof *pooled);
    for (int window = 0; window <= 40; window += 40) {
        check_decode_mass(window, NULL, alone);
        check_decode_mass(window, pool, pooled);
        assert_memory_equal(alone, pooled, (size_t)HQ * T * sizeof *alone);
    }
    free(alone);
    free(pooled);
    pool_free(pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prompt_statistics),
        cmocka_unit_test(test_decode_mass_over_runs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
