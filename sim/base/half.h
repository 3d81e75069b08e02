/* half.h — the 16-bit float formats kvsim reads and writes, converted exactly and the same way
 * everywhere: IEEE binary16 ("float16", F16: trace datasets, safetensors weights) both ways, and
 * bfloat16 (BF16: safetensors weights) to float32.
 *
 * float_from_half and float_from_bf16 are exact: every half or bfloat16 value is a float32
 * value (subnormals included), infinities stay infinities, and a NaN stays a NaN with its sign
 * and payload. half_from_float rounds to nearest, ties to even, as IEEE 754 and numpy do:
 * |f| >= 65520 (HALF_OVERFLOW) becomes an infinity, 65504 is the largest finite half, results
 * below 2^-14 are half subnormals (the smallest, 2^-24, is 0x0001), and a NaN becomes the quiet
 * NaN 0x7e00 with its sign (the payload is dropped). Callers that must not write an infinity check |f| < HALF_OVERFLOW
 * first. */
#ifndef KVSIM_HALF_H
#define KVSIM_HALF_H

#include <stdint.h>

/* The smallest magnitude that rounds to a half infinity. */
#define HALF_OVERFLOW 65520.0f

uint16_t half_from_float(float f);
float float_from_half(uint16_t h);
float float_from_bf16(uint16_t b);

#endif
