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
#include <stdint.h>
#include <string.h>
#include <math.h>

enum { DT_F32 = 0, DT_BF16 = 1 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Round a float to the precision of the dtype (identity for float32). */
static inline float rnd(float f, int dt) { return dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static inline float ld(const void *p, int64_t i, int dt) {
    return dt == DT_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float f, int dt) {
    if (dt == DT_BF16) ((uint16_t *)p)[i] = f32_to_bf16(f);
    else ((float *)p)[i] = f;
}

#define PARALLEL_MIN_ELEMS 65536  /* below this a parallel region costs more than it saves */

/*
 * out = weight * rms_norm(h), where h = x + residual (stored back into residual)
 * when residual is given, else h = x. HF: normed = (h * rsqrt(mean(h^2) + eps))
 * cast to the dtype, then weight * normed in the dtype.
 */
void heron_add_rms_norm(const void *x, int64_t x_stride, void *residual, int64_t r_stride,
                        const void *weight, void *out, int64_t o_stride, int64_t rows,
                        int64_t hidden, float eps, int dt, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows * hidden >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < rows; t++) {
        float h[hidden];
        float sum = 0.0f;
        for (int64_t i = 0; i < hidden; i++) {
            float v = ld(x, t * x_stride + i, dt);
            if (residual) {
                v = rnd(v + ld(residual, t * r_stride + i, dt), dt);
                st(residual, t * r_stride + i, v, dt);
            }
            h[i] = v;
            sum += v * v;
        }
        float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) {
            float normed = rnd(h[i] * inv, dt);
            st(out, t * o_stride + i, ld(weight, i, dt) * normed, dt);
        }
    }
}

/*
 * In place on rows [T][heads][head_dim] (row stride `stride`): neox rotary with
 * cos|sin taken from `cache` [max_pos][head_dim] (first half cos, second half
 * sin) at each token's position. HF: (x1 * cos - x2 * sin, x2 * cos + x1 * sin),
 * each product and sum rounded to the dtype as torch does.
 */
void heron_rotary(void *x, int64_t stride, int64_t rows, int64_t heads, int64_t head_dim,
                  const int64_t *positions, const void *cache, int dt, int nthreads) {
    int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(nthreads) if (rows * heads * head_dim >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < rows; t++) {
        int64_t c0 = positions[t] * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            int64_t base = t * stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                float c = ld(cache, c0 + i, dt), s = ld(cache, c0 + half + i, dt);
                float x1 = ld(x, base + i, dt), x2 = ld(x, base + half + i, dt);
                float a = rnd(rnd(x1 * c, dt) - rnd(x2 * s, dt), dt);
                float b = rnd(rnd(x2 * c, dt) + rnd(x1 * s, dt), dt);
                st(x, base + i, a, dt);
                st(x, base + half + i, b, dt);
            }
        }
    }
}

/* out[t][i] = silu(x[t][i]) * x[t][d + i], silu rounded to the dtype first (as F.silu). */
void heron_silu_and_mul(const void *x, int64_t x_stride, void *out, int64_t o_stride,
                        int64_t rows, int64_t d, int dt, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows * d >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < rows; t++) {
        for (int64_t i = 0; i < d; i++) {
            float g = ld(x, t * x_stride + i, dt);
            float u = ld(x, t * x_stride + d + i, dt);
            float silu = rnd(g / (1.0f + expf(-g)), dt);
            st(out, t * o_stride + i, silu * u, dt);
        }
    }
}
