/* The 16-bit float codecs: see half.h for what they promise. Bit manipulation rather than
 * ldexpf or the hardware's conversion: exact, independent of the rounding mode, and fast enough
 * to widen every Q/K/V value of a trace as it is read. */
#include "sim/base/half.h"

#include <string.h>

/* Largest float32 (bit pattern) that rounds to a finite half: 65520 rounds to infinity. */
#define HALF_OVERFLOW_BITS 0x477ff000u

uint16_t half_from_float(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= HALF_OVERFLOW_BITS)
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below 2^-14: a half subnormal, in units of 2^-24 */
        if (ax < 0x33000000u)
            return (uint16_t)sign;
        uint32_t shift = 126 - (ax >> 23), mant = (ax & 0x7fffffu) | 0x800000u;
        uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), tie = 1u << (shift - 1);
        if (rem > tie || (rem == tie && (r & 1)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu; /* rebias 127 -> 15 */
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1)))
        r++; /* a carry out of the mantissa correctly bumps the exponent */
    return (uint16_t)(sign | r);
}

float float_from_half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    float f;
    if (e == 0) { /* zero and subnormals: m units of 2^-24, exact in float32 */
        f = (float)m * 0x1p-24f;
        return sign ? -f : f;
    }
    x = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    memcpy(&f, &x, sizeof f);
    return f;
}

float float_from_bf16(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16; /* bfloat16 is the upper half of a float32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
