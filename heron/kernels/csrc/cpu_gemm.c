/*
 * heron batch-invariant linear layer: y[m][n] = sum_k x[m][k] * w[n][k] (+ b[n]).
 *
 * Why a kernel of our own: BLAS libraries choose their algorithm by the number of
 * rows M (a matrix-vector path for one row, split reductions across threads for a
 * few, different blockings for many), so one row's result depends on how many other
 * rows share its call. A decode step, a chunk of a prefill and a prompt whose prefix
 * came from the cache then compute the same token differently, and in bfloat16 the
 * difference flips near-ties of greedy decoding. Here every output element is one
 * float32 chain of multiply-adds over k = 0, 1, ..., K-1 in that order, whatever M,
 * whatever tile the row lands in and whichever thread computes it: the result of a
 * row is a function of that row alone.
 *
 * Weights are packed once into panels of 16 output columns, [ceil(N/16)][K][16]
 * (zero-padded past N), in their own dtype: a k step of a panel is one 64-byte
 * (float32) or 32-byte (bfloat16) load.
 * Activations in bfloat16 are widened to float32 once per call; for calls with
 * many rows a bfloat16 panel is widened once into scratch and reused by every row
 * tile. Each output element's arithmetic is the same in every path.
 *
 * Threads split the panels (columns) between them, never the reduction. The math
 * uses GCC vector extensions of the CPU's native width, so it builds for any CPU; with
 * FMA the multiply-adds are fused (gcc contracts them the same way in every tile shape).
 *
 * dtype codes: 0 float32, 1 bfloat16 (x, w, bias and y share one dtype).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define NB 16                       /* columns per panel */
/* Vectors of the CPU's native width (gcc spills 64-byte vectors on AVX2). -DVW=16 on
 * another CPU builds the AVX-512 variant's arithmetic, which tests compare. */
#ifndef VW
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
#endif
#define VPP (NB / VW)               /* vectors per panel row */
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

enum { DT_F32 = 0, DT_BF16 = 1 };

/* Row tile shapes: (rows, panels) per register tile. */
#if VW == 16
#define MR 8                        /* 8 rows x 2 panels = 16 zmm accumulators */
#define MP 2
#else
#define MR 6                        /* 6 rows x 1 panel = 12 ymm accumulators */
#define MP 1
#endif
#define MB 96                       /* rows per block: their float32 rows stay in L2 */
#define WIDEN_MIN_ROWS 16           /* from here a bf16 panel is widened once per block */
#define PANEL_CHUNK 4               /* panels every row tile of a block visits in turn */

/* One k step of a panel, the panel's VPP vectors, into out[0 .. VPP-1]. */
static inline void ld_f32(const float *p, vf *out) {
    for (int v = 0; v < VPP; v++) memcpy(&out[v], p + v * VW, sizeof(vf));
}

#if VPP == 2
/* bfloat16 panels are packed with column j in the low half of 32-bit word j and column
 * j + 8 in its high half (heron_pack), so widening is a shift and a mask: no shuffles,
 * which bound this loop otherwise (AVX2 has one shuffle port). */
static inline void ld_bf16(const uint16_t *p, vf *out) {
    vu w;
    memcpy(&w, p, sizeof w);
    vu lo = w << 16, hi = w & 0xffff0000u;
    memcpy(&out[0], &lo, sizeof(vf));
    memcpy(&out[1], &hi, sizeof(vf));
}
static inline int64_t bf16_slot(int64_t j) { return j < VW ? 2 * j : 2 * (j - VW) + 1; }
#else
static inline void ld_bf16(const uint16_t *p, vf *out) {
    for (int v = 0; v < VPP; v++) {
        vh h;
        memcpy(&h, p + v * VW, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&out[v], &u, sizeof(vf));
    }
}
static inline int64_t bf16_slot(int64_t j) { return j; }
#endif

/*
 * One register tile: R rows of x (float32, row stride xs) times P panels of w
 * (panel stride ps elements), into acc_out [R][P * NB]. The k loop is the only
 * reduction and it runs in order.
 */
#define TILE(NAME, WT, LOAD, R, P)                                                          \
static void NAME(const float *x, int64_t xs, const WT *w, int64_t ps, int64_t K,            \
                 float *acc_out) {                                                          \
    vf acc[R][P * VPP];                                                                     \
    _Pragma("GCC unroll 16")                                                                \
    for (int r = 0; r < R; r++)                                                             \
        _Pragma("GCC unroll 8")                                                             \
        for (int v = 0; v < P * VPP; v++) acc[r][v] = (vf){0};                              \
    for (int64_t k = 0; k < K; k++) {                                                       \
        vf wv[P * VPP];                                                                     \
        _Pragma("GCC unroll 4")                                                             \
        for (int p = 0; p < P; p++) LOAD(w + p * ps + k * NB, &wv[p * VPP]);               \
        _Pragma("GCC unroll 16")                                                            \
        for (int r = 0; r < R; r++) {                                                       \
            const float a = x[r * xs + k];                                                  \
            _Pragma("GCC unroll 8")                                                         \
            for (int v = 0; v < P * VPP; v++) acc[r][v] += a * wv[v];                       \
        }                                                                                   \
    }                                                                                       \
    for (int r = 0; r < R; r++)                                                             \
        for (int v = 0; v < P * VPP; v++)                                                   \
            memcpy(acc_out + (r * P * VPP + v) * VW, &acc[r][v], sizeof(vf));               \
}

typedef void (*tile_fn)(const float *, int64_t, const void *, int64_t, int64_t, float *);

#define TILES_FOR(WT, LOAD, SFX, P)                                                          \
    TILE(t_##SFX##_1x##P, WT, LOAD, 1, P) TILE(t_##SFX##_2x##P, WT, LOAD, 2, P)              \
    TILE(t_##SFX##_3x##P, WT, LOAD, 3, P) TILE(t_##SFX##_4x##P, WT, LOAD, 4, P)              \
    TILE(t_##SFX##_5x##P, WT, LOAD, 5, P) TILE(t_##SFX##_6x##P, WT, LOAD, 6, P)              \
    TILE(t_##SFX##_7x##P, WT, LOAD, 7, P) TILE(t_##SFX##_8x##P, WT, LOAD, 8, P)

TILES_FOR(float, ld_f32, f, 1)
TILES_FOR(float, ld_f32, f, 2)
TILES_FOR(float, ld_f32, f, 4)
TILES_FOR(uint16_t, ld_bf16, h, 1)
TILES_FOR(uint16_t, ld_bf16, h, 2)
TILES_FOR(uint16_t, ld_bf16, h, 4)

#define TABLE(SFX, P) { (tile_fn)t_##SFX##_1x##P, (tile_fn)t_##SFX##_2x##P,                  \
    (tile_fn)t_##SFX##_3x##P, (tile_fn)t_##SFX##_4x##P, (tile_fn)t_##SFX##_5x##P,            \
    (tile_fn)t_##SFX##_6x##P, (tile_fn)t_##SFX##_7x##P, (tile_fn)t_##SFX##_8x##P }

/* tiles[weights are bf16][log2 P][rows - 1] */
static const tile_fn tiles[2][3][8] = {
    {TABLE(f, 1), TABLE(f, 2), TABLE(f, 4)},
    {TABLE(h, 1), TABLE(h, 2), TABLE(h, 4)},
};

/* Panels per tile for a tile of `rows` rows: few rows get more panels, so that enough
 * independent chains are in flight (one row alone is bound by the FMA latency). */
static inline int panels_for(int rows) {
#if VW == 16
    return rows <= 4 ? 4 : MP;
#else
    return rows <= 1 ? 4 : (rows <= 3 ? 2 : MP);
#endif
}

static inline int log2_small(int p) { return p == 4 ? 2 : p - 1; }

typedef struct {
    const float *x;          /* float32 activations, row stride xs */
    int64_t xs;
    const void *w;           /* packed panels */
    int bf16;                /* weights, bias and y are bfloat16 (else float32) */
    const void *bias;
    void *y;
    int64_t ys;
    int64_t M, N, K;
} Gemm;

/* Add the bias, round to the output dtype and store a finished tile. */
static void store_tile(const Gemm *g, const float *acc, int64_t m0, int rows, int64_t panel0,
                       int panels) {
    for (int r = 0; r < rows; r++) {
        for (int p = 0; p < panels; p++) {
            const int64_t n0 = (panel0 + p) * NB;
            const int ncols = g->N - n0 < NB ? (int)(g->N - n0) : NB;
            const float *a = acc + (r * panels + p) * NB;
            for (int j = 0; j < ncols; j++) {
                float v = a[j];
                if (g->bias)
                    v += g->bf16 ? bf16_to_f32(((const uint16_t *)g->bias)[n0 + j])
                                  : ((const float *)g->bias)[n0 + j];
                if (g->bf16) ((uint16_t *)g->y)[(m0 + r) * g->ys + n0 + j] = f32_to_bf16(v);
                else ((float *)g->y)[(m0 + r) * g->ys + n0 + j] = v;
            }
        }
    }
}

/* Rows [m0, m1) times panels [p0, p1), with `w` holding those panels (float32 if
 * wf32, else the packed dtype) at panel stride ps. */
static void run_block(const Gemm *g, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
                      const void *w, int wf32, int64_t ps) {
    float acc[MR * 4 * NB];
    const int esz = wf32 ? 4 : 2;
    /* a few panels at a time, so that every row tile finds them in cache */
    for (int64_t c0 = p0; c0 < p1; c0 += PANEL_CHUNK) {
        const int64_t c1 = p1 - c0 < PANEL_CHUNK ? p1 : c0 + PANEL_CHUNK;
        for (int64_t m = m0; m < m1;) {
            const int rows = m1 - m < MR ? (int)(m1 - m) : MR;
            const int want = panels_for(rows);
            for (int64_t p = c0; p < c1;) {
                const int panels = c1 - p >= want ? want : 1;
                tile_fn fn = tiles[!wf32][log2_small(panels)][rows - 1];
                fn(g->x + m * g->xs, g->xs, (const char *)w + (p - p0) * ps * esz, ps, g->K,
                   acc);
                store_tile(g, acc, m, rows, p, panels);
                p += panels;
            }
            m += rows;
        }
    }
}

/* One thread's share: panels [p0, p1) for every row, a block of rows at a time. */
static void run_panels(const Gemm *g, int64_t p0, int64_t p1, float *scratch,
                       int64_t scratch_panels) {
    const int64_t ps = g->K * NB;
    for (int64_t m0 = 0; m0 < g->M; m0 += MB) {
        const int64_t m1 = g->M - m0 < MB ? g->M : m0 + MB;
        if (!g->bf16) {
            run_block(g, m0, m1, p0, p1, (const float *)g->w + p0 * ps, 1, ps);
        } else if (m1 - m0 < WIDEN_MIN_ROWS || !scratch) {
            run_block(g, m0, m1, p0, p1, (const uint16_t *)g->w + p0 * ps, 0, ps);
        } else {
            /* widen a group of panels once, then let every row tile of the block read it */
            for (int64_t q0 = p0; q0 < p1; q0 += scratch_panels) {
                const int64_t q1 = p1 - q0 < scratch_panels ? p1 : q0 + scratch_panels;
                const uint16_t *src = (const uint16_t *)g->w + q0 * ps;
                for (int64_t row = 0; row < (q1 - q0) * g->K; row++)
                    for (int j = 0; j < NB; j++)
                        scratch[row * NB + j] = bf16_to_f32(src[row * NB + bf16_slot(j)]);
                run_block(g, m0, m1, q0, q1, scratch, 1, ps);
            }
        }
    }
}

/*
 * y = x @ w^T (+ bias). x: M rows with row stride xs (elements), in `dtype`; w: packed
 * by heron_pack (N columns, K deep); y: row stride ys. Returns 0, -1 for a bad argument
 * or -2 when memory for the widened activations is not available.
 */
int heron_linear(const void *x, int64_t xs, const void *w, const void *bias, void *y,
                 int64_t ys, int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
    if (M < 0 || N <= 0 || K <= 0 || (dtype != DT_F32 && dtype != DT_BF16) || nthreads < 1)
        return -1;
    if (M == 0) return 0;
    float *xf = NULL;
    const float *xrows = (const float *)x;
    int64_t xstride = xs;
    if (dtype == DT_BF16) {
        xf = malloc(sizeof(float) * M * K);
        if (!xf) return -2;
        _Pragma("omp parallel for num_threads(nthreads) if (M * K >= 65536)")
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++)
                xf[m * K + k] = bf16_to_f32(((const uint16_t *)x)[m * xs + k]);
        xrows = xf;
        xstride = K;
    }
    const Gemm g = {xrows, xstride, w, dtype == DT_BF16, bias, y, ys, M, N, K};
    const int64_t panels = (N + NB - 1) / NB;
    int threads = nthreads < panels ? nthreads : (int)panels;
    /* scratch for widened panels: about 64 KiB of float32 per thread */
    const int64_t scratch_panels = K * NB * 4 <= 65536 ? 65536 / (K * NB * 4) : 1;
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;
        /* without scratch (malloc failed) the unwidened path computes the same numbers */
        float *scratch = g.bf16 && M >= WIDEN_MIN_ROWS
                         ? malloc(sizeof(float) * scratch_panels * K * NB) : NULL;
        run_panels(&g, p0, p1, scratch, scratch_panels);
        free(scratch);
    }
    free(xf);
    return 0;
}

/* Pack w [N][K] (row stride ws elements, `dtype`) into panels [ceil(N/16)][K][16]
 * (bfloat16 columns in the order ld_bf16 reads them). */
int heron_pack(const void *w, int64_t ws, void *packed, int64_t N, int64_t K, int dtype) {
    if (N <= 0 || K <= 0 || (dtype != DT_F32 && dtype != DT_BF16)) return -1;
    const int64_t panels = (N + NB - 1) / NB, esz = dtype == DT_BF16 ? 2 : 4;
    memset(packed, 0, panels * K * NB * esz);
    for (int64_t n = 0; n < N; n++) {
        const int64_t panel = n / NB, j = n % NB;
        for (int64_t k = 0; k < K; k++) {
            const int64_t row = (panel * K + k) * NB;
            if (dtype == DT_BF16)
                ((uint16_t *)packed)[row + bf16_slot(j)] = ((const uint16_t *)w)[n * ws + k];
            else
                ((float *)packed)[row + j] = ((const float *)w)[n * ws + k];
        }
    }
    return 0;
}
