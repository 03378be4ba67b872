/* bfloat16 <-> float32 for gemv.c and step.c: rounding to nearest even, as torch's casts do. */
#ifndef GEMMA3_LAB_BFLOAT16_H
#define GEMMA3_LAB_BFLOAT16_H

#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float s) {
    uint32_t u;
    memcpy(&u, &s, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu))  /* NaN stays NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
