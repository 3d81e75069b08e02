/* The causal row softmax on a CPU with AVX-512: the arithmetic of softmax.c's AVX2 clone, bit
 * for bit, written out with intrinsics so that the work around it can be wider.
 *
 * softmax.c's loops are vectorised by the compiler (-O3 -ffast-math); on an AVX2 CPU every
 * number kvsim writes depends on the order that code adds in. This file repeats that order
 * exactly and changes only what cannot change a bit:
 *   - the exponentials: glibc's 16-lane expf (_ZGVeN16v_expf) returns, lane for lane, what its
 *     8-lane expf (_ZGVdN8v_expf) returns for every float argument <= 0 (the only arguments a
 *     softmax passes: x * scale - max(x) * scale); the 4-lane and scalar expf that the AVX2
 *     clone uses on a row's last elements are used here too, on the same elements;
 *   - the sum of a row: one 8-lane accumulator to which the exponentials are added in row
 *     order, then the same reduction tree and the same tail, as the AVX2 clone does;
 *   - the maximum, the zeroing and the scaling by 1/z: exact operations, in any order (a zero
 *     maximum is found again in the clone's order: max of +0 and -0 depends on the order).
 * Built without -ffast-math and with -ffp-contract=off (CMakeLists.txt): nothing here may be
 * reassociated or fused. test_softmax compares this with the AVX2 clone on every row length. */
#include "sim/base/attention.h"

#if SOFTMAX_HAS_AVX512

#include <immintrin.h>
#include <math.h>
#include <string.h>

/* glibc's libmvec (x86_64 vector ABI): expf on 4, 8 and 16 lanes. */
__m128 _ZGVbN4v_expf(__m128 x);
__m256 _ZGVdN8v_expf(__m256 x);
__m512 _ZGVeN16v_expf(__m512 x);

#define AVX512 __attribute__((target("avx512f")))

/* The reduction of 4 lanes as the clone does it: (v0 + v2) + (v1 + v3). */
AVX512 static inline float sum4(__m128 v)
{
    __m128 t = _mm_add_ps(_mm_movehl_ps(v, v), v);
    return _mm_cvtss_f32(_mm_add_ss(_mm_shuffle_ps(t, t, 0x55), t));
}

AVX512 static inline float max4(__m128 v)
{
    __m128 t = _mm_max_ps(_mm_movehl_ps(v, v), v);
    return _mm_cvtss_f32(_mm_max_ss(_mm_shuffle_ps(t, t, 0x55), t));
}

/* max(x[0], ..., x[cnt]) (cnt + 1 elements) in the clone's order. */
AVX512 static float row_max_of(const float *x, int cnt)
{
    float m = x[0];
    const float *y = x + 1;
    int j = 0;
    __m128 v4;
    if (cnt >= 8) {
        __m256 acc = _mm256_set1_ps(m);
        for (; j + 8 <= cnt; j += 8)
            acc = _mm256_max_ps(acc, _mm256_loadu_ps(y + j));
        __m128 hi = _mm256_extractf128_ps(acc, 1), lo = _mm256_castps256_ps128(acc);
        if (cnt - j >= 4) {
            v4 = _mm_max_ps(_mm_max_ps(lo, hi), _mm_loadu_ps(y + j));
            j += 4;
        } else {
            v4 = _mm_max_ps(hi, lo);
        }
        m = max4(v4);
    } else if (cnt >= 4) {
        v4 = _mm_max_ps(_mm_set1_ps(m), _mm_loadu_ps(y));
        j = 4;
        m = max4(v4);
    }
    for (; j < cnt; j++)
        m = _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(m), _mm_set_ss(y[j])));
    return m;
}

/* The same maximum, faster: the maximum of floats is one value whatever the order, except that
 * of +0 and -0 the order decides which; a zero maximum is found again in the clone's order. */
AVX512 static float row_max_fast(const float *x, int cnt)
{
    int n = cnt + 1, j = 0;
    __m512 a0 = _mm512_set1_ps(x[0]), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 64 <= n; j += 64) {
        a0 = _mm512_max_ps(a0, _mm512_loadu_ps(x + j));
        a1 = _mm512_max_ps(a1, _mm512_loadu_ps(x + j + 16));
        a2 = _mm512_max_ps(a2, _mm512_loadu_ps(x + j + 32));
        a3 = _mm512_max_ps(a3, _mm512_loadu_ps(x + j + 48));
    }
    for (; j + 16 <= n; j += 16)
        a0 = _mm512_max_ps(a0, _mm512_loadu_ps(x + j));
    if (j < n) {
        __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        a1 = _mm512_mask_max_ps(a1, k, a1, _mm512_maskz_loadu_ps(k, x + j));
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
    return m == 0.0f ? row_max_of(x, cnt) : m;
}

/* x[j] = expf(x[j] * scale - mx) for j < cnt; returns their sum in the clone's order. */
AVX512 static float exp_row(float *x, int cnt, float scale, float mx)
{
    int j = 0;
    float z = 0.0f;
    __m128 s4 = _mm_setzero_ps();
    if (cnt >= 8) {
        __m256 acc = _mm256_setzero_ps();
        const __m512 sc16 = _mm512_set1_ps(scale), mx16 = _mm512_set1_ps(mx);
        for (; j + 16 <= cnt; j += 16) {
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(x + j), sc16);
            __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(a, mx16));
            _mm512_storeu_ps(x + j, e);
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            acc = _mm256_add_ps(acc, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
        }
        if (j + 8 <= cnt) {
            __m256 a = _mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(scale));
            __m256 e = _ZGVdN8v_expf(_mm256_sub_ps(a, _mm256_set1_ps(mx)));
            _mm256_storeu_ps(x + j, e);
            acc = _mm256_add_ps(acc, e);
            j += 8;
        }
        s4 = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        z = sum4(s4);
    }
    if (cnt - j >= 4) {
        __m128 a = _mm_mul_ps(_mm_loadu_ps(x + j), _mm_set1_ps(scale));
        __m128 e = _ZGVbN4v_expf(_mm_sub_ps(a, _mm_set1_ps(mx)));
        _mm_storeu_ps(x + j, e);
        z = sum4(_mm_add_ps(e, s4));
        j += 4;
    }
    for (; j < cnt; j++) {
        float e = expf(x[j] * scale - mx);
        x[j] = e;
        z += e;
    }
    return z;
}

AVX512 static void scale_row(float *x, int cnt, float inv)
{
    const __m512 v = _mm512_set1_ps(inv);
    int j = 0;
    for (; j + 16 <= cnt; j += 16)
        _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), v));
    if (j < cnt) {
        __mmask16 k = (__mmask16)((1u << (cnt - j)) - 1);
        _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), v));
    }
}

AVX512 void softmax_causal_rows_avx512(float *s, int rows, int ld, int first_len, float scale,
                                       int window, float *row_max, float *row_z)
{
    for (int b = 0; b < rows; b++) {
        float *x = s + (size_t)b * ld;
        int n = first_len + b;
        int lo = attn_first_key(window, n - 1); /* keys before the window: zero */
        if (lo > 0)
            memset(x, 0, (size_t)lo * sizeof(float));
        float mx = row_max_fast(x + lo, n - lo - 1) * scale;
        float z = exp_row(x + lo, n - lo, scale, mx);
        scale_row(x + lo, n - lo, 1.0f / z);
        if (first_len + rows - 1 > n)
            memset(x + n, 0, (size_t)(first_len + rows - 1 - n) * sizeof(float));
        row_max[b] = mx;
        row_z[b] = z;
    }
}

#endif
