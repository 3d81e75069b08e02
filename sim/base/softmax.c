/* Causal row softmax, the one non-BLAS hot loop of the attention computation.
 *
 * Built with -ffast-math (see CMakeLists.txt) so that GCC vectorises expf through glibc's
 * libmvec, and cloned for AVX2 so the vector exp runs 8 lanes wide where the CPU has it; without
 * this the exponentials cost more than the matrix products around them. Nothing in this file
 * may depend on infinities or NaN: masked entries are never exponentiated, only zeroed.
 * On a CPU with AVX-512, softmax_causal_rows runs softmax_avx512.c instead: the same arithmetic
 * as the AVX2 clone below, bit for bit, with the work around it wider. */
#include "sim/base/attention.h"

#include <math.h>

#if defined(__clang__)
#define SOFTMAX_CLONES /* clang 14 emits no symbol for target_clones in C (the fuzz build) */
#else
#define SOFTMAX_CLONES __attribute__((target_clones("avx2", "default")))
#endif

SOFTMAX_CLONES
void softmax_causal_rows_vectorised(float *s, int rows, int ld, int first_len, float scale,
                                    int window, float *row_max, float *row_z)
{
    for (int b = 0; b < rows; b++) {
        float *x = s + (size_t)b * ld;
        int n = first_len + b;
        int lo = attn_first_key(window, n - 1); /* keys before the window: zero */
        for (int j = 0; j < lo; j++)
            x[j] = 0.0f;
        float mx = x[lo];
        for (int j = lo + 1; j < n; j++)
            mx = x[j] > mx ? x[j] : mx;
        mx *= scale;
        float z = 0.0f;
        for (int j = lo; j < n; j++) {
            float e = expf(x[j] * scale - mx);
            x[j] = e;
            z += e;
        }
        float inv = 1.0f / z;
        for (int j = lo; j < n; j++)
            x[j] *= inv;
        for (int j = n; j < first_len + rows - 1; j++)
            x[j] = 0.0f;
        row_max[b] = mx;
        row_z[b] = z;
    }
}

void softmax_causal_rows(float *s, int rows, int ld, int first_len, float scale, int window,
                         float *row_max, float *row_z)
{
#if SOFTMAX_HAS_AVX512
    if (__builtin_cpu_supports("avx512f")) {
        softmax_causal_rows_avx512(s, rows, ld, first_len, scale, window, row_max, row_z);
        return;
    }
#endif
    softmax_causal_rows_vectorised(s, rows, ld, first_len, scale, window, row_max, row_z);
}
