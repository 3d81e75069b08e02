#include "traces/model/matrix.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

#include "sim/base/blas.h"
#include "sim/base/half.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_F16C_PATH 1
#endif

/* Floats per converted block. Every OpenBLAS call wakes its threads, which costs little on an
 * idle machine and a scheduler slice each on a busy one, so blocks are large; but a block that
 * no longer fits the last-level cache makes the conversion's writes and the product's reads go
 * to memory. A decode step (n = 1) is a matrix-vector product bound by memory bandwidth: its
 * 4 MB block stays in the cache between its conversion and the product, so the weights cross
 * the memory bus once, as 16-bit values. A prefill chunk reuses each block n times: 16 MB
 * blocks measured best on a busy 2-vCPU EPYC (against 4 MB and 64 MB). */
#define DECODE_BLOCK_FLOATS ((size_t)1 << 20)
#define PREFILL_BLOCK_FLOATS ((size_t)1 << 22)

size_t matrix_scratch_floats(const WeightMatrix *w)
{
    if (w->f32)
        return 0;
    size_t n = (size_t)w->rows * (size_t)w->cols;
    n = n < PREFILL_BLOCK_FLOATS ? n : PREFILL_BLOCK_FLOATS;
    return n > (size_t)w->cols ? n : (size_t)w->cols;
}

#ifdef HAVE_F16C_PATH
/* IEEE binary16 to float32 with the F16C instructions, eight at a time (exact, as
 * float_from_half is for every finite value; the weights are checked finite at load). Compiled
 * for F16C whatever the build's target, and called only when the CPU has it. */
__attribute__((target("avx,f16c"))) static size_t convert_f16_f16c(const unsigned char *src,
                                                                    size_t n, float *out)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                      (const __m128i *)(const void *)(src + 2 * i))));
    return i;
}
#endif

/* Converts n 16-bit values (little endian, any alignment) to float32. A bfloat16 is the upper
 * half of a float32: with SSE2, eight at a time by interleaving zeros below them. */
static void convert_half(const unsigned char *src, size_t n, int bf16, float *out)
{
    if (bf16) {
        size_t i = 0;
#ifdef __SSE2__
        const __m128i zero = _mm_setzero_si128();
        for (; i + 8 <= n; i += 8) {
            __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));
            _mm_storeu_si128((__m128i *)(void *)(out + i), _mm_unpacklo_epi16(zero, v));
            _mm_storeu_si128((__m128i *)(void *)(out + i + 4), _mm_unpackhi_epi16(zero, v));
        }
#endif
        for (; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, sizeof h); /* kvsim runs on little-endian machines */
            uint32_t bits = (uint32_t)h << 16; /* bfloat16 is the upper half of a float32 */
            memcpy(&out[i], &bits, sizeof bits);
        }
    } else {
        size_t i = 0;
#ifdef HAVE_F16C_PATH
        /* F16C comes with every x86 CPU that has AVX2 (Ivy Bridge and Piledriver on), and
         * clang 14's __builtin_cpu_supports does not know "f16c": AVX2 is asked instead. */
        if (__builtin_cpu_supports("avx2"))
            i = convert_f16_f16c(src, n, out);
#endif
        for (; i < n; i++)
            out[i] = float_from_half((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
    }
}

/* The conversion of a block split over OpenBLAS's thread count (the products use those cores,
 * the conversion between them would leave all but one idle): the caller converts the first
 * part, a thread started for the block each of the others. Conversion is exact, so the result
 * does not depend on the split. */
typedef struct {
    const unsigned char *src;
    size_t n;
    int bf16;
    float *out;
} ConvertPart;

static void *convert_part(void *arg)
{
    ConvertPart *p = arg;
    convert_half(p->src, p->n, p->bf16, p->out);
    return NULL;
}

#define MAX_CONVERT_THREADS 16

static void convert_block(const unsigned char *src, size_t n, int bf16, float *out)
{
    int parts = openblas_get_num_threads();
    parts = parts > MAX_CONVERT_THREADS ? MAX_CONVERT_THREADS : parts;
    if (parts < 2 || n < ((size_t)1 << 16)) { /* small: a thread costs more than it saves */
        convert_half(src, n, bf16, out);
        return;
    }
    ConvertPart part[MAX_CONVERT_THREADS];
    pthread_t thread[MAX_CONVERT_THREADS];
    int started[MAX_CONVERT_THREADS] = {0};
    size_t per = (n / (size_t)parts + 7) & ~(size_t)7;
    for (int i = 0; i < parts; i++) {
        size_t begin = per * (size_t)i < n ? per * (size_t)i : n;
        size_t end = begin + per < n ? begin + per : n;
        part[i] = (ConvertPart){src + 2 * begin, end - begin, bf16, out + begin};
        if (i > 0)
            started[i] = pthread_create(&thread[i], NULL, convert_part, &part[i]) == 0;
    }
    convert_part(&part[0]);
    for (int i = 1; i < parts; i++) {
        if (started[i])
            pthread_join(thread[i], NULL);
        else
            convert_part(&part[i]); /* no thread: the caller does it */
    }
}

static void gemm_rows(float *out, int ldo, const float *x, const float *w, int n, int rows,
                      int cols)
{
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, rows, cols, 1.0f, w, cols, x, 1, 0.0f, out, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, cols, 1.0f, x, cols, w,
                    cols, 0.0f, out, ldo);
}

void matrix_linear(float *out, const float *x, const WeightMatrix *w, const float *bias, int n,
                   float *scratch)
{
    if (w->f32) {
        gemm_rows(out, w->rows, x, w->f32, n, w->rows, w->cols);
    } else {
        size_t block = n == 1 ? DECODE_BLOCK_FLOATS : PREFILL_BLOCK_FLOATS;
        int per_block = (size_t)w->cols >= block ? 1 : (int)(block / (size_t)w->cols);
        for (int r0 = 0; r0 < w->rows; r0 += per_block) {
            int rows = w->rows - r0 < per_block ? w->rows - r0 : per_block;
            convert_block(w->half + (size_t)r0 * w->cols * 2, (size_t)rows * w->cols, w->bf16,
                          scratch);
            gemm_rows(out + r0, w->rows, x, scratch, n, rows, w->cols);
        }
    }
    if (bias)
        for (int t = 0; t < n; t++)
            for (int o = 0; o < w->rows; o++)
                out[(size_t)t * w->rows + o] += bias[o];
}

void matrix_row(const WeightMatrix *w, int r, float *out)
{
    if (w->f32)
        memcpy(out, w->f32 + (size_t)r * w->cols, (size_t)w->cols * sizeof(float));
    else
        convert_half(w->half + (size_t)r * w->cols * 2, (size_t)w->cols, w->bf16, out);
}

int64_t matrix_first_nonfinite(const WeightMatrix *w)
{
    size_t n = (size_t)w->rows * (size_t)w->cols;
    for (size_t i = 0; i < n; i++) {
        if (w->f32) {
            if (!isfinite(w->f32[i]))
                return (int64_t)i;
            continue;
        }
        /* A 16-bit value is NaN or infinite when its exponent bits are all ones. */
        uint16_t h = (uint16_t)(w->half[2 * i] | w->half[2 * i + 1] << 8);
        uint16_t exponent = w->bf16 ? 0x7f80u : 0x7c00u;
        if ((h & exponent) == exponent)
            return (int64_t)i;
    }
    return -1;
}

size_t matrix_bytes(const WeightMatrix *w)
{
    return (size_t)w->rows * (size_t)w->cols * (w->f32 ? sizeof(float) : 2);
}
