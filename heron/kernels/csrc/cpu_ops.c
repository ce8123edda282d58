/*
 * heron CPU layer ops: the element-wise parts of a decoder layer fused into one
 * pass each (RMSNorm with the residual add, rotary embedding in place, SiLU-and-mul).
 * On a 64-token decode step each of these is a few tens of microseconds of work
 * that torch spreads over several ops; one call instead saves the dispatch and the
 * passes over memory.
 *
 * The arithmetic reproduces torch's op by op, roundings included: for bfloat16,
 * every intermediate that torch would store as bfloat16 is rounded to bfloat16
 * here too (round to nearest even), so results equal the plain-torch path of
 * heron/models/layers.py apart from the order of the float32 sum of squares.
 *
 * dtype codes: 0 float32, 1 bfloat16. Tensors are row-major with the given row
 * strides (in elements); the Python side (heron/kernels/cpu_ops.py) checks them.
 */
/* Without this gcc keeps every float compare as a branch (it might trap) and none of the
 * loops below vectorizes: SiLU-and-mul over 1536 bfloat16s measured 21 us instead of 2.
 * It changes no value, only what the compiler may assume about floating-point traps. */
#pragma GCC optimize("no-trapping-math")
#include <stdint.h>
#include <string.h>
#include <math.h>
#include "bf16.h"

enum { DT_F32 = 0, DT_BF16 = 1 };

/* Element access for one dtype. Every loop below is written once per dtype (through
 * the OPS macro) with no branch inside, so that gcc vectorizes it. */
static inline float bf16_ld(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline uint16_t bf16_round(float f) { return f32_to_bf16(f); }

static inline void bf16_st(uint16_t *p, int64_t i, float f) { p[i] = bf16_round(f); }
static inline float bf16_rnd(float f) {
    uint16_t h = bf16_round(f);
    return bf16_ld(&h, 0);
}

static inline float f32_ld(const float *p, int64_t i) { return p[i]; }
static inline void f32_st(float *p, int64_t i, float f) { p[i] = f; }
static inline float f32_rnd(float f) { return f; }

/* exp(x) for float32 with about 1 ulp of error, in plain arithmetic so that it
 * vectorizes (libm's expf is a call per element). Range reduction x = n ln2 + r,
 * |r| <= ln2 / 2, then a degree-6 polynomial for e^r and 2^n through the exponent. */
static inline float vexpf(float x) {
    x = x > 88.0f ? 88.0f : (x < -103.0f ? -103.0f : x);
    /* round to nearest even by the 1.5 * 2^23 trick (vectorizes, unlike a call) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = (int32_t)n;
    /* 2^n in two steps so that n down to -149 (denormals) stays finite */
    int32_t e1 = e / 2, e2 = e - e1;
    uint32_t b1 = (uint32_t)(e1 + 127) << 23, b2 = (uint32_t)(e2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    return p * s1 * s2;
}

#define PARALLEL_MIN_ELEMS 262144 /* below this a parallel region costs more than it saves */

/*
 * add_rms_norm: out = weight * rms_norm(h), where h = x + residual (stored back
 * into residual) when residual is given, else h = x. HF: normed = (h * rsqrt(mean(h^2)
 * + eps)) cast to the dtype, then weight * normed in the dtype.
 *
 * rotary: in place on rows [T][heads][head_dim] (row stride `stride`), neox rotary
 * with cos|sin from `cache` [max_pos][head_dim] at each token's position. HF:
 * (x1 * cos - x2 * sin, x2 * cos + x1 * sin), each product and sum rounded to the
 * dtype as torch does.
 *
 * silu_and_mul: out[t][i] = silu(x[t][i]) * x[t][d + i], silu rounded first (F.silu).
 */
#define OPS(T, SFX)                                                                          \
static void add_rms_norm_##SFX(const T *x, int64_t xs, T *res, int64_t rs, const T *w,       \
                               T *out, int64_t os, int64_t rows, int64_t hidden, float eps,  \
                               int nthreads) {                                               \
    _Pragma("omp parallel for num_threads(nthreads) if (rows * hidden >= PARALLEL_MIN_ELEMS)") \
    for (int64_t t = 0; t < rows; t++) {                                                     \
        float h[hidden];                                                                     \
        if (res) {                                                                           \
            for (int64_t i = 0; i < hidden; i++) {                                           \
                float v = SFX##_rnd(SFX##_ld(x, t * xs + i) + SFX##_ld(res, t * rs + i));    \
                SFX##_st(res, t * rs + i, v);                                                \
                h[i] = v;                                                                    \
            }                                                                                \
        } else {                                                                             \
            for (int64_t i = 0; i < hidden; i++) h[i] = SFX##_ld(x, t * xs + i);             \
        }                                                                                    \
        float sum = 0.0f;                                                                    \
        for (int64_t i = 0; i < hidden; i++) sum += h[i] * h[i];                             \
        float inv = 1.0f / sqrtf(sum / (float)hidden + eps);                                 \
        for (int64_t i = 0; i < hidden; i++)                                                 \
            SFX##_st(out, t * os + i, SFX##_ld(w, i) * SFX##_rnd(h[i] * inv));              \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static void rotary_##SFX(T *x, int64_t stride, int64_t rows, int64_t heads, int64_t dim,     \
                         const int64_t *positions, const T *cache, int nthreads) {           \
    int64_t half = dim / 2;                                                                  \
    _Pragma("omp parallel for num_threads(nthreads) if (rows * heads * dim >= PARALLEL_MIN_ELEMS)") \
    for (int64_t t = 0; t < rows; t++) {                                                     \
        const T *cs = cache + positions[t] * dim;                                            \
        for (int64_t h = 0; h < heads; h++) {                                                \
            T *row = x + t * stride + h * dim;                                               \
            for (int64_t i = 0; i < half; i++) {                                             \
                float c = SFX##_ld(cs, i), s = SFX##_ld(cs, half + i);                       \
                float x1 = SFX##_ld(row, i), x2 = SFX##_ld(row, half + i);                   \
                float a = SFX##_rnd(SFX##_rnd(x1 * c) - SFX##_rnd(x2 * s));                  \
                float b = SFX##_rnd(SFX##_rnd(x2 * c) + SFX##_rnd(x1 * s));                  \
                SFX##_st(row, i, a);                                                         \
                SFX##_st(row, half + i, b);                                                  \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static void silu_and_mul_##SFX(const T *x, int64_t xs, T *out, int64_t os, int64_t rows,     \
                               int64_t d, int nthreads) {                                    \
    _Pragma("omp parallel for num_threads(nthreads) if (rows * d >= PARALLEL_MIN_ELEMS)")    \
    for (int64_t t = 0; t < rows; t++) {                                                     \
        for (int64_t i = 0; i < d; i++) {                                                    \
            float g = SFX##_ld(x, t * xs + i), u = SFX##_ld(x, t * xs + d + i);              \
            float silu = SFX##_rnd(g / (1.0f + vexpf(-g)));                                  \
            SFX##_st(out, t * os + i, silu * u);                                             \
        }                                                                                    \
    }                                                                                        \
}

OPS(float, f32)
OPS(uint16_t, bf16)

void heron_add_rms_norm(const void *x, int64_t xs, void *res, int64_t rs, const void *w,
                        void *out, int64_t os, int64_t rows, int64_t hidden, float eps, int dt,
                        int nthreads) {
    if (dt == DT_BF16) add_rms_norm_bf16(x, xs, res, rs, w, out, os, rows, hidden, eps, nthreads);
    else add_rms_norm_f32(x, xs, res, rs, w, out, os, rows, hidden, eps, nthreads);
}

void heron_rotary(void *x, int64_t stride, int64_t rows, int64_t heads, int64_t dim,
                  const int64_t *positions, const void *cache, int dt, int nthreads) {
    if (dt == DT_BF16) rotary_bf16(x, stride, rows, heads, dim, positions, cache, nthreads);
    else rotary_f32(x, stride, rows, heads, dim, positions, cache, nthreads);
}

void heron_silu_and_mul(const void *x, int64_t xs, void *out, int64_t os, int64_t rows,
                        int64_t d, int dt, int nthreads) {
    if (dt == DT_BF16) silu_and_mul_bf16(x, xs, out, os, rows, d, nthreads);
    else silu_and_mul_f32(x, xs, out, os, rows, d, nthreads);
}
