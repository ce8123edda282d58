/*
 * Scalar bfloat16 <-> float32 conversions shared by heron's C kernels.
 * (cbuild hashes this header into the name of every library that includes it, so an
 * edit here rebuilds them.)
 */
#ifndef HERON_BF16_H
#define HERON_BF16_H

#include <stdint.h>
#include <string.h>

/* Exact: a bfloat16 is the top half of a float32. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch does; NaN stays NaN (its payload gains the quiet bit). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    /* a select, not a branch: loops that call this still vectorize */
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

#endif
