/* matrix.h — a weight matrix as the forward pass multiplies by it, in the precision the
 * checkpoint stores it: float32, or 16-bit (BF16 or F16) values left where the safetensors
 * mapping holds them.
 *
 * A 16-bit matrix is never converted as a whole: matrix_linear converts a block of its rows at
 * a time into the caller's scratch (exactly: every 16-bit value is a float32 value, see
 * sim/base/half.h) and multiplies the activations by that block with OpenBLAS, so a BF16
 * checkpoint costs its own size in memory (the mapped file) instead of twice that again in
 * float32 copies. A float32 matrix is multiplied in one CBLAS call, as the forward pass always
 * did. */
#ifndef KVSIM_MATRIX_H
#define KVSIM_MATRIX_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int rows, cols;            /* [out_features][in_features] as HF stores a linear layer */
    const float *f32;          /* [rows][cols] float32, or NULL when 16-bit */
    const unsigned char *half; /* [rows][cols] little-endian 16-bit values when f32 is NULL */
    int bf16;                  /* half holds bfloat16 (else IEEE binary16) */
} WeightMatrix;

/* Floats of scratch matrix_linear needs for W: none for float32, else the block of rows it
 * converts at a time (at most 16 MB; at least one row). */
size_t matrix_scratch_floats(const WeightMatrix *w);

/* out [n][rows] = x [n][cols] . W^T (+ bias [rows]); scratch holds matrix_scratch_floats(W)
 * floats. */
void matrix_linear(float *out, const float *x, const WeightMatrix *w, const float *bias, int n,
                   float *scratch);

/* Row r of W as float32 (an embedding lookup). */
void matrix_row(const WeightMatrix *w, int r, float *out);

/* The index of the first element that is NaN or infinite, or -1. */
int64_t matrix_first_nonfinite(const WeightMatrix *w);

/* Bytes the matrix's values take in memory. */
size_t matrix_bytes(const WeightMatrix *w);

#endif
