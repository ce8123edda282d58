/*
 * heron weight-only quantized linear layer: y = x @ W^T (+ b) with W kept in 4 or 8 bits.
 *
 * Decode on a CPU reads every weight once per step, so its time is the bytes of the
 * weights over the memory bandwidth: 4-bit weights are a quarter of bfloat16's bytes.
 * The weights are never made dense: a 32-wide block of a row is unpacked in registers
 * and multiplied in integers (AVX2's maddubs: 32 products per instruction) against the
 * activations quantized to int8 per 32-wide block, as llama.cpp does. Converting the
 * weights to float instead was measured 1.6x slower than the bfloat16 kernel on an
 * AVX2 EPYC: the integer-to-float conversions, not the memory, bound it.
 *
 * Weights arrive repacked (heron/kernels/cpu_quant.py) from GGUF's block formats, or
 * heron's own int8/int4, into two record layouts, per 32-wide block of k:
 *   4-bit, one record per (pair of output columns, block), a pair's records contiguous
 *         (48 bytes): for each column of the pair 16 bytes of q in 0..15 (value j in the
 *         low nibble of byte j, value j + 16 in its high nibble), then float32 d of both
 *         columns and m of both: w = d * q + m. Pairs fill a 256-bit register with one
 *         load, and their low and high nibbles share one widening multiply-add.
 *         Q4_0 (m = -8 d), Q4_1 and Q4_K (its 6-bit sub-block scales multiplied out,
 *         exactly) and int4 land here. An odd last column is paired with zeros.
 *   8-bit, one record per (output column, block), a column's records contiguous
 *         (40 bytes): 32 int8 q (-127..127), then float32 d0 (values 0-15) and d1
 *         (16-31): w = d * q. Q8_0 (d0 = d1), Q6_K (16-wide sub-blocks) and int8 land here.
 *
 * Activations: each row's 32-wide block b gets dx = max|x| / 127, qx = round(x / dx)
 * (nearest even) and xsum = dx * (sum of qx), as llama.cpp's Q8_1 keeps it.
 * Arithmetic per (row, column), the same whatever M (so results are batch-invariant):
 * float32 lanes accumulating over blocks in order, acc[l] = fma((float)isum[l], d_w * dx,
 * acc[l]), with isum[l] an exact integer dot product over some of the block's values:
 *   8-bit: 8 lanes, lane l over values 4l..4l+3 (d_w: d0 for l < 4, else d1); the result
 *          is ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7));
 *   4-bit: 4 lanes, lane l over values 4l..4l+3 and 16+4l..16+4l+3; plus
 *          msum = fma(m, xsum, msum) in block order; the result is
 *          ((a0+a1)+(a2+a3)) + msum.
 * (+ bias, then the rounding to the output dtype).
 * The portable path computes exactly the same lanes, so every build gives one answer.
 * Threads split the columns, never the reduction.
 *
 * A weight may be several segments stacked along the output features (fused q|k|v whose
 * parts come in different formats); each segment has its own format.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32                 /* k per block */
#define REC4 48               /* a pair of columns */
#define REC8 40
#define MAX_SEGMENTS 8
#define MB 64                 /* rows per block of rows: their int8 rows stay in L1/L2 */
#ifndef PREFETCH
#define PREFETCH 4096          /* bytes ahead of the records being read */
#endif
#define CB 16                 /* columns per chunk every row block visits in turn */

enum { QF_4BIT = 1, QF_8BIT = 2 };
enum { DT_F32 = 0, DT_BF16 = 1 };

typedef struct {
    int32_t format;           /* QF_4BIT or QF_8BIT */
    int32_t reserved;
    int64_t n;                /* output columns of this segment */
    const uint8_t *data;      /* records [n][K / 32] */
} QSegment;

typedef struct {
    int32_t num_segments;
    int32_t reserved;
    QSegment seg[MAX_SEGMENTS];
} QWeight;

/* The call's activations, quantized: per row, nb blocks of 32 int8, a scale and a sum;
 * `dup` holds each block again as values 0-15 twice, then 16-31 twice (for 4-bit pairs). */
typedef struct {
    const int8_t *q;          /* [M][K] */
    const int8_t *dup;        /* [M][nb][64] */
    const float *d;           /* [M][nb] */
    const float *sum;         /* [M][nb] */
    const float *sum_t;       /* [nb][M]: the same sums, rows adjacent (4-row tiles) */
    int64_t M;
    int64_t K, nb;
} Acts;

static inline float load_f32(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

/* The fixed reduction order of the eight lanes. */
static inline float lanes_sum(const float *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* ---- portable lanes: the reference for what every path computes ---------------------- */

/* One 8-bit (row, column) dot product, lane by lane. */
static float dot8_portable(const Acts *a, int64_t row, const uint8_t *col) {
    float acc[8] = {0};
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *rec = col + b * REC8;
        const int8_t *x = a->q + row * a->K + b * QK;
        const float dx = a->d[row * a->nb + b];
        const float s0 = load_f32(rec + 32) * dx, s1 = load_f32(rec + 36) * dx;
        for (int l = 0; l < 8; l++) {
            int isum = 0;
            for (int j = 4 * l; j < 4 * l + 4; j++) isum += (int8_t)rec[j] * x[j];
            acc[l] = fmaf((float)isum, l < 4 ? s0 : s1, acc[l]);
        }
    }
    return lanes_sum(acc);
}

/* Column `which` (0 or 1) of a 4-bit pair, lane by lane. */
static float dot4_portable(const Acts *a, int64_t row, const uint8_t *pair, int which) {
    float acc[4] = {0}, msum = 0;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *rec = pair + b * REC4, *q = rec + 16 * which;
        const int8_t *x = a->q + row * a->K + b * QK;
        const float dx = a->d[row * a->nb + b];
        const float s = load_f32(rec + 32 + 4 * which) * dx;
        for (int l = 0; l < 4; l++) {
            int isum = 0;
            for (int j = 4 * l; j < 4 * l + 4; j++) isum += (q[j] & 15) * x[j] + (q[j] >> 4) * x[j + 16];
            acc[l] = fmaf((float)isum, s, acc[l]);
        }
        msum = fmaf(load_f32(rec + 40 + 4 * which), a->sum[row * a->nb + b], msum);
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + msum;
}

/* ---- AVX2 tiles: R rows x C columns (8-bit) or C pairs (4-bit), the same lanes -------- */
#ifdef __AVX2__
/* 8-bit: maddubs wants its first operand unsigned, so move w's sign onto x */
static inline __m256i isum8(__m256i w, __m256i x) {
    const __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
}

/* 4-bit pair: low nibbles against values 0-15, high ones against 16-31; the two 16-bit
 * products add (at most 2 * 2 * 15 * 127, no saturation) before one widening add */
static inline __m256i isum4(__m256i v, __m256i xlo, __m256i xhi) {
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

static inline __m256 halves(const uint8_t *p) {     /* [p[0] x4, p[1] x4] of two floats */
    return _mm256_set_m128(_mm_set1_ps(load_f32(p + 4)), _mm_set1_ps(load_f32(p)));
}

#define TILE8(NAME, R, C)                                                                    \
static void NAME(const Acts *a, int64_t row0, const uint8_t *const *cols, float *out) {      \
    __m256 acc[R][C];                                                                        \
    for (int r = 0; r < R; r++)                                                              \
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();                         \
    for (int64_t b = 0; b < a->nb; b++) {                                                    \
        __m256i x[R];                                                                        \
        __m256 dx[R];                                                                        \
        _Pragma("GCC unroll 4")                                                              \
        for (int r = 0; r < R; r++) {                                                        \
            x[r] = _mm256_loadu_si256((const __m256i *)(a->q + (row0 + r) * a->K + b * QK));  \
            dx[r] = _mm256_set1_ps(a->d[(row0 + r) * a->nb + b]);                            \
        }                                                                                    \
        _Pragma("GCC unroll 4")                                                              \
        for (int c = 0; c < C; c++) {                                                        \
            const uint8_t *rec = cols[c] + b * REC8;                                         \
            _mm_prefetch((const char *)rec + PREFETCH, _MM_HINT_T0);                         \
            const __m256i w = _mm256_loadu_si256((const __m256i *)rec);                      \
            const __m256 dw = halves(rec + 32);                                              \
            _Pragma("GCC unroll 4")                                                          \
            for (int r = 0; r < R; r++)                                                      \
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum8(w, x[r])),              \
                                            _mm256_mul_ps(dw, dx[r]), acc[r][c]);            \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < R; r++)                                                              \
        for (int c = 0; c < C; c++) {                                                        \
            float lanes[8];                                                                  \
            _mm256_storeu_ps(lanes, acc[r][c]);                                              \
            out[r * C + c] = lanes_sum(lanes);                                               \
        }                                                                                    \
}

/* out [R][2C]: both columns of each pair */
#define TILE4(NAME, R, C)                                                                    \
static void NAME(const Acts *a, int64_t row0, const uint8_t *const *pairs, float *out) {     \
    __m256 acc[R][C];                                                                        \
    float msum[R][2 * C];                                                                    \
    __m128 msum4[2 * C];      /* R == 4: lane r is msum[r][.], the same fmas lane by lane */ \
    for (int r = 0; r < R; r++) {                                                            \
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();                         \
        for (int c = 0; c < 2 * C; c++) msum[r][c] = 0;                                      \
    }                                                                                        \
    for (int c = 0; c < 2 * C; c++) msum4[c] = _mm_setzero_ps();                             \
    for (int64_t b = 0; b < a->nb; b++) {                                                    \
        __m256i xlo[R], xhi[R];                                                              \
        __m256 dx[R];                                                                        \
        _Pragma("GCC unroll 4")                                                              \
        for (int r = 0; r < R; r++) {                                                        \
            const int8_t *d = a->dup + ((row0 + r) * a->nb + b) * 2 * QK;                    \
            xlo[r] = _mm256_loadu_si256((const __m256i *)d);                                 \
            xhi[r] = _mm256_loadu_si256((const __m256i *)(d + QK));                          \
            dx[r] = _mm256_set1_ps(a->d[(row0 + r) * a->nb + b]);                            \
        }                                                                                    \
        _Pragma("GCC unroll 4")                                                              \
        for (int c = 0; c < C; c++) {                                                        \
            const uint8_t *rec = pairs[c] + b * REC4;                                        \
            _mm_prefetch((const char *)rec + PREFETCH, _MM_HINT_T0);                         \
            const __m256i v = _mm256_loadu_si256((const __m256i *)rec);                      \
            const __m256 dw = halves(rec + 32);                                              \
            const float m0 = load_f32(rec + 40), m1 = load_f32(rec + 44);                    \
            _Pragma("GCC unroll 4")                                                          \
            for (int r = 0; r < R; r++)                                                      \
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum4(v, xlo[r], xhi[r])),    \
                                            _mm256_mul_ps(dw, dx[r]), acc[r][c]);            \
            if (R == 4) {                                                                    \
                const __m128 t = _mm_loadu_ps(a->sum_t + b * a->M + row0);                   \
                msum4[2 * c] = _mm_fmadd_ps(_mm_set1_ps(m0), t, msum4[2 * c]);               \
                msum4[2 * c + 1] = _mm_fmadd_ps(_mm_set1_ps(m1), t, msum4[2 * c + 1]);       \
            } else {                                                                         \
                for (int r = 0; r < R; r++) {                                                \
                    const float t = a->sum[(row0 + r) * a->nb + b];                          \
                    msum[r][2 * c] = fmaf(m0, t, msum[r][2 * c]);                            \
                    msum[r][2 * c + 1] = fmaf(m1, t, msum[r][2 * c + 1]);                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    if (R == 4)                                                                              \
        for (int c = 0; c < 2 * C; c++) {                                                    \
            float lanes[4];                                                                  \
            _mm_storeu_ps(lanes, msum4[c]);                                                  \
            for (int r = 0; r < R; r++) msum[r][c] = lanes[r];                               \
        }                                                                                    \
    for (int r = 0; r < R; r++)                                                              \
        for (int c = 0; c < C; c++) {                                                        \
            float l[8];                                                                      \
            _mm256_storeu_ps(l, acc[r][c]);                                                  \
            out[r * 2 * C + 2 * c] = ((l[0] + l[1]) + (l[2] + l[3])) + msum[r][2 * c];       \
            out[r * 2 * C + 2 * c + 1] = ((l[4] + l[5]) + (l[6] + l[7])) + msum[r][2 * c + 1];\
        }                                                                                    \
}

TILE8(t8_1x4, 1, 4)
TILE8(t8_1x1, 1, 1)
TILE8(t8_4x2, 4, 2)
TILE8(t8_4x1, 4, 1)
TILE4(t4_1x2, 1, 2)
TILE4(t4_1x1, 1, 1)
TILE4(t4_4x1, 4, 1)

typedef void (*tile_fn)(const Acts *, int64_t, const uint8_t *const *, float *);
#endif

typedef struct {
    Acts a;
    int64_t M;
    int bf16;                 /* bias and y are bfloat16 (else float32) */
    const void *bias;
    void *y;
    int64_t ys;
} Call;

static inline void store(const Call *c, int64_t m, int64_t n, float v) {
    if (c->bias)
        v += c->bf16 ? bf16_to_f32(((const uint16_t *)c->bias)[n]) : ((const float *)c->bias)[n];
    if (c->bf16) ((uint16_t *)c->y)[m * c->ys + n] = f32_to_bf16(v);
    else ((float *)c->y)[m * c->ys + n] = v;
}

/* Rows [m0, m1) x columns [j0, j1) of segment s, whose column 0 is output column col0
 * (j0 even: 4-bit columns go in pairs). Each tile covers `want` units (columns, or pairs
 * of 4-bit columns) of `rows` rows. */
static void run_cols(const Call *c, const QSegment *s, int64_t col0, int64_t j0, int64_t j1,
                     int64_t m0, int64_t m1) {
    const int four = s->format == QF_4BIT;
    const int64_t stride = c->a.nb * (four ? REC4 : REC8);   /* per unit */
    const int per = four ? 2 : 1;                             /* columns per unit */
    const int64_t u0 = j0 / per, u1 = (j1 + per - 1) / per;
#ifdef __AVX2__
    for (int64_t m = m0; m < m1;) {
        const int rows = m1 - m >= 4 ? 4 : 1;
        const int want = four ? (rows == 1 ? 2 : 1) : (rows == 1 ? 4 : 2);
        for (int64_t u = u0; u < u1;) {
            const int units = u1 - u >= want ? want : 1;
            const uint8_t *ptrs[4];
            for (int q = 0; q < units; q++) ptrs[q] = s->data + (u + q) * stride;
            tile_fn fn = four ? (rows == 1 ? (units == 2 ? t4_1x2 : t4_1x1) : t4_4x1)
                              : (rows == 1 ? (units == 4 ? t8_1x4 : t8_1x1)
                                           : (units == 2 ? t8_4x2 : t8_4x1));
            float out[16];
            fn(&c->a, m, ptrs, out);
            const int ncols = units * per;
            for (int r = 0; r < rows; r++)
                for (int q = 0; q < ncols; q++) {
                    const int64_t j = u * per + q;
                    if (j < j1) store(c, m + r, col0 + j, out[r * ncols + q]);
                }
            u += units;
        }
        m += rows;
    }
#else
    for (int64_t m = m0; m < m1; m++)
        for (int64_t u = u0; u < u1; u++)
            for (int q = 0; q < per; q++) {
                const int64_t j = u * per + q;
                if (j >= j1) continue;
                const uint8_t *unit = s->data + u * stride;
                store(c, m, col0 + j, four ? dot4_portable(&c->a, m, unit, q)
                                           : dot8_portable(&c->a, m, unit));
            }
#endif
}

/* Columns [j0, j1) of one segment for every row: blocks of rows, chunks of columns. */
static void run_segment(const Call *c, const QSegment *s, int64_t col0, int64_t j0, int64_t j1) {
    for (int64_t m0 = 0; m0 < c->M; m0 += MB) {
        const int64_t m1 = c->M - m0 < MB ? c->M : m0 + MB;
        for (int64_t q0 = j0; q0 < j1; q0 += CB)
            run_cols(c, s, col0, q0, j1 - q0 < CB ? j1 : q0 + CB, m0, m1);
    }
}

static int check_weight(const QWeight *w, int64_t N, int64_t K) {
    if (!w || w->num_segments < 1 || w->num_segments > MAX_SEGMENTS || K % QK) return -1;
    int64_t n = 0;
    for (int i = 0; i < w->num_segments; i++) {
        const QSegment *s = &w->seg[i];
        if (s->n <= 0 || !s->data || (s->format != QF_4BIT && s->format != QF_8BIT)) return -1;
        n += s->n;
    }
    return n == N ? 0 : -1;
}

/* Quantize row m's activations (float32 or bfloat16) into the Acts buffers. */
static void quantize_row(const void *x, int64_t xs, int dtype, int64_t m, int8_t *q,
                         int8_t *dup, float *d, float *sum, int64_t K) {
    const int64_t nb = K / QK;
    for (int64_t b = 0; b < nb; b++) {
        float v[QK], amax = 0;
        for (int j = 0; j < QK; j++) {
            const int64_t k = b * QK + j;
            v[j] = dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)x)[m * xs + k])
                                    : ((const float *)x)[m * xs + k];
            amax = fmaxf(amax, fabsf(v[j]));
        }
        const float dx = amax / 127.0f, inv = dx > 0 ? 1.0f / dx : 0.0f;
        int8_t *qb = q + m * K + b * QK, *db = dup + (m * nb + b) * 2 * QK;
        int qsum = 0;
        for (int j = 0; j < QK; j++) {
            qb[j] = (int8_t)nearbyintf(v[j] * inv);
            qsum += qb[j];
        }
        for (int j = 0; j < 16; j++) {
            db[j] = db[j + 16] = qb[j];
            db[j + 32] = db[j + 48] = qb[j + 16];
        }
        d[m * nb + b] = dx;
        /* the offsets multiply the sum of the *quantized* block, so that a 4-bit block's
         * result is that of its dequantized weights against the quantized x: its error is
         * sum(w e), not sum((w - m) e) with |m| near max |w| (twice the log-prob error on
         * SmolLM2's Q4_1, measured) */
        sum[m * nb + b] = dx * (float)qsum;
    }
}

/*
 * y = x @ W^T (+ bias), W a QWeight (as `w`: the signature is heron_linear's, so the
 * decoder loop calls either through one pointer type). x: M rows of K (row stride xs) in
 * `dtype`; y: row stride ys, same dtype. K must be a multiple of 32. Returns 0, -1 for
 * a bad argument, -2 when memory for the quantized activations is not available.
 */
int heron_qlinear(const void *x, int64_t xs, const void *w, const void *bias, void *y,
                  int64_t ys, int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
    const QWeight *qw = w;
    if (M < 0 || N <= 0 || K <= 0 || (dtype != DT_F32 && dtype != DT_BF16) || nthreads < 1
        || check_weight(qw, N, K))
        return -1;
    if (M == 0) return 0;
    const int64_t nb = K / QK;
    int8_t *q = malloc(3 * M * K + 3 * sizeof(float) * M * nb + 64);
    if (!q) return -2;
    int8_t *dup = q + M * K;
    float *d = (float *)(((uintptr_t)(dup + 2 * M * K) + 63) & ~(uintptr_t)63), *sum = d + M * nb;
    float *sum_t = sum + M * nb;
    _Pragma("omp parallel for num_threads(nthreads) if (M * K >= 65536)")
    for (int64_t m = 0; m < M; m++) {
        quantize_row(x, xs, dtype, m, q, dup, d, sum, K);
        for (int64_t b = 0; b < nb; b++) sum_t[b * M + m] = sum[m * nb + b];
    }
    const Call c = {{q, dup, d, sum, sum_t, M, K, nb}, M, dtype == DT_BF16, bias, y, ys};
    /* threads take contiguous ranges of all segments' columns, in groups of 4 */
    int64_t groups = 0;
    for (int i = 0; i < qw->num_segments; i++) groups += (qw->seg[i].n + 3) / 4;
    const int threads = nthreads < groups ? nthreads : (int)groups;
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
        int64_t first = 0, col0 = 0;
        for (int i = 0; i < qw->num_segments; i++) {
            const QSegment *s = &qw->seg[i];
            const int64_t mine0 = g0 > first ? g0 - first : 0;
            const int64_t seg_groups = (s->n + 3) / 4;
            const int64_t mine1 = g1 - first < seg_groups ? g1 - first : seg_groups;
            if (mine0 < mine1) {
                const int64_t j1 = mine1 * 4 < s->n ? mine1 * 4 : s->n;
                run_segment(&c, s, col0, mine0 * 4, j1);
            }
            first += seg_groups;
            col0 += s->n;
        }
    }
    free(q);
    return 0;
}
