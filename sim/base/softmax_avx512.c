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
 *   - the 16-lane expf itself is inlined (exp16_poly): glibc's AVX-512 expf is a short
 *     polynomial for |x| <= 87.34 and a scalar call per lane beyond; exp16_poly repeats the
 *     polynomial, its constants and its order, and a vector with any lane beyond goes to
 *     glibc's 16-lane expf itself. Calling glibc for every vector cost a call per 16 elements
 *     that clobbers every vector register (the running sum went to memory and back each
 *     time). exp16_mismatches compares the two: test_softmax on every float of the domain
 *     (glibc 2.36: equal on all 2^32 floats), and the first softmax on a sample, falling back
 *     to glibc's call for every vector should another glibc compute otherwise;
 *   - the sum of a row: one 8-lane accumulator to which the exponentials are added in row
 *     order, then the same reduction tree and the same tail, as the AVX2 clone does;
 *     two rows are exponentiated and summed together, each with its own accumulator, so that
 *     the two chains of additions overlap;
 *   - the maximum, the zeroing and the scaling by 1/z: exact operations, in any order (a zero
 *     maximum is found again in the clone's order: max of +0 and -0 depends on the order).
 * Built without -ffast-math and with -ffp-contract=off (CMakeLists.txt): nothing here may be
 * reassociated or fused. test_softmax compares this with the AVX2 clone on every row length. */
#include "sim/base/attention.h"

#if SOFTMAX_HAS_AVX512

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
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

/* glibc 2.36's _ZGVeN16v_expf_skx (sysdeps/x86_64/fpu/multiarch/svml_s_expf16_core_avx512.S),
 * its constants (__svml_sexp_data) by their bits: log2(e), the rounding shifter 1.5 * 2^23,
 * ln(2) in two parts, the exponent bias, the polynomial's coefficients from degree 0 to 5, and
 * the largest |x| it computes without the scalar call. */
#define EXP_LOG2E 0x3fb8aa3bu
#define EXP_SHIFTER 0x4b400000u
#define EXP_LN2_HI 0x3f317200u
#define EXP_LN2_LO 0x35bfbe8eu
#define EXP_BIAS 0x7fu
#define EXP_ABS_MASK 0x7fffffffu
#define EXP_DOMAIN 0x42aeac4fu
static const unsigned exp_poly[6] = {0x3f800000u, 0x3f7ffffeu, 0x3effff34u,
                                     0x3e2aacacu, 0x3d2b8392u, 0x3c07d9feu};

AVX512 static inline __m512 bits16(unsigned u)
{
    return _mm512_castsi512_ps(_mm512_set1_epi32((int)u));
}

/* expf on 16 lanes, glibc's arithmetic in glibc's order (its instructions in comments), for
 * the lanes whose |x| is within the polynomial's domain: *ok has their bits (all 16 set: the
 * result is glibc's; otherwise glibc's own call is needed for the vector). */
AVX512 static inline __m512 exp16_poly(__m512 x, __mmask16 *ok)
{
    __m512 shifter = bits16(EXP_SHIFTER);
    __m512 t = _mm512_fmadd_ps(x, bits16(EXP_LOG2E), shifter);  /* vfmadd213ps */
    __m512 n = _mm512_sub_ps(t, shifter);                       /* vsubps */
    __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t),
                                                      _mm512_set1_epi32(EXP_BIAS)), 23);
    __m512 r = _mm512_fnmadd_ps(bits16(EXP_LN2_HI), n, x);     /* vfnmadd231ps */
    r = _mm512_fnmadd_ps(n, bits16(EXP_LN2_LO), r);             /* vfnmadd132ps */
    __m512 p = _mm512_fmadd_ps(r, bits16(exp_poly[5]), bits16(exp_poly[4])); /* vfmadd213ps */
    p = _mm512_fmadd_ps(r, p, bits16(exp_poly[3]));
    p = _mm512_fmadd_ps(r, p, bits16(exp_poly[2]));
    p = _mm512_fmadd_ps(r, p, bits16(exp_poly[1]));
    p = _mm512_fmadd_ps(r, p, bits16(exp_poly[0]));
    __m512i ax = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)EXP_ABS_MASK));
    *ok = _mm512_cmple_epi32_mask(ax, _mm512_set1_epi32((int)EXP_DOMAIN)); /* vpcmpled */
    return _mm512_mul_ps(_mm512_castsi512_ps(pow2), p);                     /* vmulps */
}

AVX512 static inline __m512 exp16_inline(__m512 x)
{
    __mmask16 ok;
    __m512 y = exp16_poly(x, &ok);
    return ok == 0xffff ? y : _ZGVeN16v_expf(x);
}

AVX512 long exp16_mismatches(uint32_t first, uint32_t last, uint32_t step)
{
    long bad = 0;
    uint32_t in[16], a[16], b[16];
    for (uint64_t u = first; u <= last;) {
        for (int l = 0; l < 16; l++, u += step)
            in[l] = (uint32_t)(u <= last ? u : last);
        __m512 x = _mm512_loadu_ps((const float *)in);
        _mm512_storeu_ps((float *)a, exp16_inline(x));
        _mm512_storeu_ps((float *)b, _ZGVeN16v_expf(x));
        for (int l = 0; l < 16; l++)
            bad += a[l] != b[l];
    }
    return bad;
}

/* 1 once exp16_inline has been found to agree with this glibc's 16-lane expf on a sample of
 * the softmax's arguments (every 4093rd float <= 0 and the last ones before the domain's
 * edge), 0 if it did not; -1 before the check. Every thread computes the same answer. */
static int exp16_inline_ok = -1;

AVX512 static int exp16_inline_checked(void)
{
    int ok = __atomic_load_n(&exp16_inline_ok, __ATOMIC_RELAXED);
    if (ok < 0) {
        ok = exp16_mismatches(0x80000000u, 0xff800000u, 4093) == 0 &&
             exp16_mismatches(0xc2aeac00u, 0xc2aead00u, 1) == 0;
        __atomic_store_n(&exp16_inline_ok, ok, __ATOMIC_RELAXED);
    }
    return ok;
}

/* A row's attended keys x[0 .. cnt), its scaled maximum mx and, once exponentiated in place
 * (x[j] = expf(x[j] * scale - mx)), the sum z of the exponentials in the clone's order: an
 * 8-lane accumulator adding each 16 elements' low then high half, an 8-lane step, a reduction,
 * a 4-lane step, a scalar tail. */
typedef struct {
    float *x;
    int cnt;
    float mx, z;
} ExpRow;

AVX512 static inline __m256 add_halves(__m256 acc, __m512 e)
{
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    return _mm256_add_ps(acc, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
}

/* One 16-lane chunk of row r at j, through glibc's call. */
AVX512 static __m256 exp_chunk16(ExpRow *r, int j, float scale, __m256 acc)
{
    __m512 a = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(r->x + j), _mm512_set1_ps(scale)),
                             _mm512_set1_ps(r->mx));
    __m512 e = _ZGVeN16v_expf(a);
    _mm512_storeu_ps(r->x + j, e);
    return add_halves(acc, e);
}

/* The 16-lane chunks of rows a and b (b may be NULL) from j to end through exp16_poly, up to
 * the first chunk that needs glibc's call: returns its j (end: none). Not inlined, and without
 * a call inside, so that the running sums stay in registers. */
AVX512 __attribute__((noinline)) static int exp_chunks_poly(ExpRow *ra, ExpRow *rb, int j,
                                                            int end, float scale, __m256 *acca,
                                                            __m256 *accb)
{
    const __m512 sc16 = _mm512_set1_ps(scale);
    const __m512 mxa = _mm512_set1_ps(ra->mx), mxb = _mm512_set1_ps(rb ? rb->mx : 0.0f);
    __m256 sa = *acca, sb = *accb;
    for (; j < end; j += 16) {
        __mmask16 oka, okb = 0xffff;
        __m512 ea = exp16_poly(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(ra->x + j), sc16),
                                             mxa), &oka);
        __m512 eb = ea;
        if (rb)
            eb = exp16_poly(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(rb->x + j), sc16), mxb),
                            &okb);
        if ((oka & okb) != 0xffff)
            break;
        _mm512_storeu_ps(ra->x + j, ea);
        sa = add_halves(sa, ea);
        if (rb) {
            _mm512_storeu_ps(rb->x + j, eb);
            sb = add_halves(sb, eb);
        }
    }
    *acca = sa;
    *accb = sb;
    return j;
}

/* The 16-lane chunks of rows a and b (b may be NULL) from j to end (multiples of 16). */
AVX512 static void exp_chunks(ExpRow *ra, ExpRow *rb, int j, int end, float scale, int inl,
                              __m256 *acca, __m256 *accb)
{
    while (j < end) {
        if (inl)
            j = exp_chunks_poly(ra, rb, j, end, scale, acca, accb);
        if (j < end) {
            *acca = exp_chunk16(ra, j, scale, *acca);
            if (rb)
                *accb = exp_chunk16(rb, j, scale, *accb);
            j += 16;
        }
    }
}

/* Row r from element j on (j a multiple of 16, the 16-lane chunks before it done into acc). */
AVX512 static void exp_row_rest(ExpRow *r, int j, float scale, int inl, __m256 acc)
{
    float *x = r->x, mx = r->mx;
    int cnt = r->cnt;
    float z = 0.0f;
    __m128 s4 = _mm_setzero_ps();
    if (cnt >= 8) {
        __m256 unused = acc;
        exp_chunks(r, NULL, j, cnt / 16 * 16, scale, inl, &acc, &unused);
        j = cnt / 16 * 16;
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
    r->z = z;
}

/* Two rows (rb may have cnt 0): their 16-lane chunks side by side while both have one, then
 * each alone. */
AVX512 static void exp_rows2(ExpRow *ra, ExpRow *rb, float scale)
{
    int inl = exp16_inline_checked();
    __m256 acca = _mm256_setzero_ps(), accb = _mm256_setzero_ps();
    int na = ra->cnt >= 8 ? ra->cnt / 16 * 16 : 0, nb = rb->cnt >= 8 ? rb->cnt / 16 * 16 : 0;
    int common = na < nb ? na : nb;
    exp_chunks(ra, rb, 0, common, scale, inl, &acca, &accb);
    exp_row_rest(ra, common, scale, inl, acca);
    exp_row_rest(rb, common, scale, inl, accb);
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

/* Row b's zeros before its window and its maximum: r describes its attended keys. */
AVX512 static void row_start(float *s, int b, int ld, int first_len, float scale, int window,
                             ExpRow *r)
{
    float *x = s + (size_t)b * ld;
    int n = first_len + b;
    int lo = attn_first_key(window, n - 1); /* keys before the window: zero */
    if (lo > 0)
        memset(x, 0, (size_t)lo * sizeof(float));
    r->x = x + lo;
    r->cnt = n - lo;
    r->mx = row_max_fast(x + lo, n - lo - 1) * scale;
}

/* Row b's normalisation by its sum and the zeros after its last key. */
AVX512 static void row_finish(float *s, int b, int rows, int ld, int first_len, const ExpRow *r,
                              float *row_max, float *row_z)
{
    int n = first_len + b;
    scale_row(r->x, r->cnt, 1.0f / r->z);
    if (first_len + rows - 1 > n)
        memset(s + (size_t)b * ld + n, 0, (size_t)(first_len + rows - 1 - n) * sizeof(float));
    row_max[b] = r->mx;
    row_z[b] = r->z;
}

/* Rows two at a time (exp_rows2); each row's numbers are the clone's whatever its partner. */
AVX512 void softmax_causal_rows_avx512(float *s, int rows, int ld, int first_len, float scale,
                                       int window, float *row_max, float *row_z)
{
    for (int b = 0; b < rows; b += 2) {
        ExpRow ra, rb = {.x = NULL, .cnt = 0};
        row_start(s, b, ld, first_len, scale, window, &ra);
        if (b + 1 < rows)
            row_start(s, b + 1, ld, first_len, scale, window, &rb);
        exp_rows2(&ra, &rb, scale);
        row_finish(s, b, rows, ld, first_len, &ra, row_max, row_z);
        if (b + 1 < rows)
            row_finish(s, b + 1, rows, ld, first_len, &rb, row_max, row_z);
    }
}

#endif
