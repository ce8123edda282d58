/*
 * heron CPU paged attention: writes new keys/values into the paged cache, then
 * attends every query token of a flat batch over its sequence's cached context
 * (causal, grouped-query). The Python side (heron/kernels/cpu.py) compiles this
 * file with gcc, loads it with ctypes and checks dtypes, shapes and strides
 * before calling heron_attention(); the metadata's values are checked here.
 *
 * Cache layout of one layer: [num_blocks][2 (keys, values)][num_kv_heads][slab],
 * block-major so that one block of all heads is one contiguous run of memory.
 * A slab holds block_size tokens of one kv head; a 32-bit word in it holds
 * P = 4 / element size elements (2 bf16 or 1 float) along the dimension its
 * product sums over:
 *   keys    [head_size / P][block_size][P]   16 tokens' words for the same dims
 *                                            form one vector: Q @ K^T needs no
 *                                            transpose and bf16 pairs feed
 *                                            vdpbf16ps as they are
 *   values  [block_size / P][head_size][P]   one word = one dim of P tokens
 *
 * fp8 caches (float8_e4m3fn, float8_e5m2; queries, new keys/values and outputs stay
 * in the model's float32 or bfloat16) use the float32 layout, P = 1, one byte per
 * element. Writes store x / k_scale (or v_scale) rounded to nearest even as torch's
 * .to(float8_*) does (e4m3fn saturates to +-448, e5m2 overflows to inf); reads
 * decode 8 or 16 bytes at once with integer arithmetic into float32 (exact), and
 * the scales are applied once per score (k_scale, folded into the softmax scale) and
 * once per output row (v_scale), never per element.
 *
 * Work is split into items: (sequence, tile of up to ROWS_TARGET / num_heads
 * query tokens), all heads. An item walks its context in segments of SEG keys
 * with an online softmax in float32: scores for every row (Q @ K^T, block by
 * block, head by head, prefetching the next block), then the segment's
 * probabilities, then P @ V with the accumulators in registers. Every row's
 * arithmetic depends only on its own sequence, so results are batch invariant
 * whatever thread runs which item.
 *
 * The math is written with GCC vector extensions of the CPU's native width (16
 * floats with AVX-512, else 8: gcc spills wider vectors, which made prefill about
 * 5x slower on AVX2), so the file builds for any CPU; AVX-512 intrinsics are used
 * where they pay (masked loads, vdpbf16ps, bf16 conversions).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* floats per vector: the CPU's native width (gcc spills 64-byte vectors on AVX2) */
#ifndef VL
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
#endif
#ifndef SEG
#define SEG 256                /* keys per online-softmax step */
#endif
/* vdpbf16ps and vcvtneps2bf16 on 16-float vectors */
#if defined(__AVX512BF16__) && VL == 16
#define USE_DPBF16 1
#else
#define USE_DPBF16 0
#endif
#define SROW (SEG + VL)        /* score row stride: a chunk may write 16 lanes past the end */
#ifndef ROWS_TARGET
#define ROWS_TARGET 144        /* query rows (all heads) per work item: each K/V read is shared */
#endif
#define PV_COLS 4              /* vectors of the head dim kept in registers by P @ V */
#if defined(__AVX512F__)
#define QK_ROWS 12             /* rows per Q @ K^T register tile */
#define PV_ROWS 6              /* rows per P @ V register tile (6 x 4 accumulators) */
#else
#define QK_ROWS 4
#define PV_ROWS 2
#endif

/* dtype codes: the model's (queries, new keys/values, outputs) is F32 or BF16; the
 * cache's is that one or an fp8 format */
enum { DT_F32 = 0, DT_BF16 = 1, DT_E4M3 = 2, DT_E5M2 = 3 };
#define IS_FP8(dt) ((dt) >= DT_E4M3)
enum { F_WRITE_KV = 1, F_ATTEND = 2 };
enum {
    E_ARGS = -1, E_QUERY_START_LOC = -2, E_SEQ_LENS = -3, E_BLOCK_TABLE = -4, E_SLOT = -5,
    E_NOMEM = -6,
};

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

#define INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------- vectors */

INLINE vf vsplat(float x) { return (vf){0} + x; }
INLINE vf vload(const float *p) { vf r; memcpy(&r, p, sizeof r); return r; }
INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf viota(void) {
    vf r;
    for (int i = 0; i < VL; i++) r[i] = (float)i;
    return r;
}
/* lanes < n of a, the rest from b */
INLINE vf vselect_n(vf a, vf b, int n) {
    vi m = viota() < vsplat((float)n);
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

/* the first n (<= VL) words, zeros after */
INLINE vu vload_u32_n(const uint32_t *p, int n) {
#if defined(__AVX512F__) && VL == 16
    return (vu)_mm512_maskz_loadu_epi32((__mmask16)((1u << n) - 1u), p);
#else
    vu r = {0};
    if (n == VL) {                                   /* the common case: one plain load */
        memcpy(&r, p, sizeof r);
        return r;
    }
    for (int i = 0; i < n; i++) r[i] = p[i];
    return r;
#endif
}
INLINE vf vload_n(const float *p, int n) { return (vf)vload_u32_n((const uint32_t *)p, n); }

INLINE vf vload_bf16(const uint16_t *p) {
#if defined(__AVX512F__) && VL == 16
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

/* float -> bfloat16 with round-to-nearest-even, as torch's .to(torch.bfloat16) */
INLINE void vstore_bf16(uint16_t *p, vf x) {
#if USE_DPBF16
    __m256bh h = _mm512_cvtneps_pbh((__m512)x);
    memcpy(p, &h, sizeof h);
#else
    vu u = (vu)x;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vi nan = x != x;
    r = (vu)(((vi)r & ~nan) | (((vi)(vu){0} + 0x7fc0) & nan));
    vh h = __builtin_convertvector(r, vh);
    memcpy(p, &h, sizeof h);
#endif
}

INLINE vf vmax(vf a, vf b) {
#if defined(__AVX512F__) && VL == 16
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#else
    vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
#endif
}

INLINE vf vmin(vf a, vf b) {
#if defined(__AVX512F__) && VL == 16
    return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#else
    vi m = a < b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
#endif
}

INLINE float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m;
    return m;
}
/* a fixed pairwise order, so sums do not depend on the compiler's whims */
INLINE float hsum(vf v) {
    float s8[8], s4[4];
#if VL == 16
    for (int i = 0; i < 8; i++) s8[i] = v[i] + v[i + 8];
#else
    for (int i = 0; i < 8; i++) s8[i] = v[i];
#endif
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* exp(x) in float32 to ~1 ulp for x <= 88; exp(x < -87) = 0, so exp(-inf) = 0. */
INLINE vf vexp(vf x) {
    const float magic = 12582912.0f;                 /* 1.5 * 2^23: rounds to an integer */
    vi under = x < vsplat(-87.0f);
    x = vmin(vmax(x, vsplat(-87.0f)), vsplat(88.0f));
    vf t = x * 1.44269504088896341f + magic;
    vf n = t - magic;
    vf r = x - n * 0.693145751953125f;               /* ln 2, split in two for precision */
    r = r - n * 1.428606765330187045e-6f;
    vf p = vsplat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi e = ((vi)t - (vi)vsplat(magic) + 127) << 23;  /* 2^n built in the exponent field */
    return (vf)((vi)(p * (vf)e) & ~under);
}

INLINE float sexp(float x) { return vexp(vsplat(x))[0]; }

/* ---------------------------------------------------------------- fp8 */

typedef uint8_t vb __attribute__((vector_size(VL)));

#if defined(__F16C__) && (VL == 8 || defined(__AVX512F__))
/* fp8 codes -> float32 exactly through the hardware's float16 conversion: an e5m2 code
 * is the top byte of a float16; an e4m3 code's exponent and mantissa placed in a float16
 * are its value times 2^-8 (subnormals included), with 0x7f made NaN. About half the
 * instructions of the integer version below, and the decode is what fp8 attention's
 * inner loops spend their time on (3x bfloat16's attention without it). */
INLINE vf fp8_decode(vb b, const int FMT) {
    vh x = __builtin_convertvector(b, vh), h;
    if (FMT == DT_E5M2) {
        h = x << 8;
    } else {
        vh mag = x & 0x7f;
        h = (mag << 7) | ((x & 0x80) << 8) | ((vh)(mag == 0x7f) & 0x7e00);
    }
#if VL == 16
    vf f = (vf)_mm512_cvtph_ps((__m256i)h);
#else
    vf f = (vf)_mm256_cvtph_ps((__m128i)h);
#endif
    return FMT == DT_E4M3 ? f * 256.0f : f;
}
#else
/* fp8 codes -> float32, exactly: normals by moving the exponent and mantissa into
 * place and rebiasing, subnormals as (mantissa * 2^-(bias+M-1)), so no float32
 * denormal (slow on x86) is ever formed; e4m3fn's 0x7f is NaN, e5m2's top exponent
 * inf/NaN. FMT is a compile-time DT_E4M3 or DT_E5M2. */
INLINE vf fp8_decode(vb b, const int FMT) {
    vu x = __builtin_convertvector(b, vu);
    const int M = FMT == DT_E4M3 ? 3 : 2;                     /* mantissa bits */
    const uint32_t rebias = FMT == DT_E4M3 ? 127 - 7 : 127 - 15;
    const uint32_t special = FMT == DT_E4M3 ? 0x7f : 0x7c;    /* first inf/NaN code */
    const float sub_unit = FMT == DT_E4M3 ? 0x1p-9f : 0x1p-16f;
    vu mag = x & 0x7fu, sign = (x & 0x80u) << 24;
    vu normal = (mag << (23 - M)) + (rebias << 23);
    vf sub = __builtin_convertvector((vi)mag, vf) * sub_unit;
    vi is_sub = mag < (1u << M), is_special = mag >= special;
    vi bits = ((vi)normal & ~is_sub) | ((vi)sub & is_sub);
    bits = (bits & ~is_special) | ((vi)((mag << (23 - M)) | 0x7f800000u) & is_special);
    return (vf)((vu)bits | sign);
}
#endif

/* the first n (<= VL) fp8 codes at p as floats, zeros after */
INLINE vf vload_fp8_n(const uint8_t *p, int n, const int FMT) {
    vb b = {0};
    if (n == VL) memcpy(&b, p, sizeof b);
    else for (int i = 0; i < n; i++) b[i] = p[i];
    return fp8_decode(b, FMT);
}

/* float32 -> fp8 with round-to-nearest-even, bit for bit what torch's .to(float8_*)
 * gives: NaN stays NaN (sign kept); e4m3fn has no inf and saturates to +-448 (inf
 * included); e5m2 overflows to inf from 61440 up. Subnormals round through one float
 * addition of a power of two whose last mantissa bit is the smallest subnormal. */
static uint8_t fp8_encode(float f, int fmt) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return sign | 0x7f;
    const int e4m3 = fmt == DT_E4M3, M = e4m3 ? 3 : 2;
    const uint32_t bias = e4m3 ? 7 : 15;
    if (e4m3 && u >= 0x43e00000u) return sign | 0x7e;         /* >= 448: the max finite */
    if (!e4m3 && u >= (143u << 23)) return sign | 0x7c;       /* >= 65536: inf */
    if (u < ((127u - bias + 1) << 23)) {                      /* below the smallest normal */
        const uint32_t magic = (127u - bias + 1 - M + 23) << 23;
        float m, r;
        memcpy(&m, &magic, sizeof m);
        memcpy(&r, &u, sizeof r);
        r += m;
        memcpy(&u, &r, sizeof u);
        return sign | (uint8_t)(u - magic);
    }
    /* rebias the exponent, then round the dropped bits to nearest, ties to even */
    u = u - ((127u - bias) << 23) + ((1u << (22 - M)) - 1) + ((u >> (23 - M)) & 1u);
    return sign | (uint8_t)(u >> (23 - M));
}

/* Conversions for tests (heron/kernels/cpu.py): n values each way. */
void heron_fp8_encode(const float *x, uint8_t *out, int64_t n, int fmt) {
    for (int64_t i = 0; i < n; i++) out[i] = fp8_encode(x[i], fmt);
}
void heron_fp8_decode(const uint8_t *x, float *out, int64_t n, int fmt) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        vf f = fmt == DT_E4M3 ? vload_fp8_n(x + i, VL, DT_E4M3) : vload_fp8_n(x + i, VL, DT_E5M2);
        vstore(out + i, f);
    }
    for (; i < n; i++) {
        vf f = fmt == DT_E4M3 ? vload_fp8_n(x + i, 1, DT_E4M3) : vload_fp8_n(x + i, 1, DT_E5M2);
        out[i] = f[0];
    }
}

/* ---------------------------------------------------------------- work items */

typedef struct {
    int D, B, G, Hq, Hk;
    int dtype, esz;                      /* the cache's dtype code and element size */
    int qdt, qesz;                       /* queries', outputs' and new keys/values' */
    float scale;                         /* softmax scale times k_scale */
    float k_scale, v_scale;              /* fp8 caches: stored = x / scale */
    const char *q;
    int64_t q_stride;                    /* elements between tokens */
    char *out;                           /* contiguous [T, Hq, D] */
    const char *cache;                   /* [num_blocks][2][Hk][slab] */
    const int32_t *qsl, *seq_lens, *btab;
    int64_t bt_stride;
} Ctx;

typedef struct {
    int R;                               /* rows of this item */
    int kvh;
    const int32_t *btab;                 /* this sequence's block table row */
    int *pos;                            /* [R] position of each row's token */
    const float **qf;                    /* [R] float32 query rows */
    const uint32_t **qw;                 /* [R] bf16 query rows as dim pairs */
    float *qbuf;                         /* [R][D] converted queries */
    float *S;                            /* [R][SROW] scores, then probabilities */
    float *acc;                          /* [R][D] unnormalised outputs */
    float *m, *l, *corr;                 /* [R] running max, sum, rescale of this step */
} Item;

INLINE const char *kslab(const Ctx *c, int blk, int kvh) {
    return c->cache + ((int64_t)blk * 2 * c->Hk + kvh) * c->B * c->D * c->esz;
}
INLINE const char *vslab(const Ctx *c, int blk, int kvh) {
    return c->cache + (((int64_t)blk * 2 + 1) * c->Hk + kvh) * c->B * c->D * c->esz;
}

#ifndef PF_AHEAD
#define PF_AHEAD 1                     /* blocks ahead to prefetch keys from */
#endif
#ifndef PF_HINT
#define PF_HINT 2                      /* prefetcht1: into L2, measured best here */
#endif
#ifdef NO_PREFETCH
#define PREFETCH(p) ((void)(p))
#else
#define PREFETCH(p) __builtin_prefetch((p), 0, PF_HINT)
#endif

/* Two cache lines of the next block's keys and of this block's values, spread over
 * the Q @ K^T loop so that the reads overlap the arithmetic. */
INLINE void prefetch_two_lines(const char *pfk, const char *pfv, int line, int slab_lines) {
    if (line >= slab_lines) return;
    if (pfk) {
        PREFETCH(pfk + line * 64);
        PREFETCH(pfk + line * 64 + 64);
    }
    if (pfv) {
        PREFETCH(pfv + line * 64);
        PREFETCH(pfv + line * 64 + 64);
    }
}

/* Scores of rows r0..r0+NR-1 against the keys seg0+col0 .. seg0+col1-1 (within
 * one block), scaled and causally masked, into the score rows. Works in chunks
 * of up to 16 keys: one vector of scores per row.
 * Blocks sit anywhere in memory, out of the hardware prefetcher's sight, and
 * bursts of prefetches stall, so each step of the dim loop also prefetches two
 * lines of pfk (the same head's keys in the next block) and two of pfv (the
 * values of this block, which P @ V reads after this segment); NULL: none. */
INLINE void qk_tile(const Ctx *c, Item *it, int r0, const int NR, const int KT,
                    int seg0, int col0, int col1, const char *pfk, const char *pfv) {
    const int D = c->D, B = c->B;
    const int slab_lines = B * D * c->esz / 64, steps = KT == DT_BF16 ? D / 4 : D / 2;
    const uint32_t *qw[12];
    const float *qf[12];
    int pos[12];
    (void)qw;                                         /* unused without vdpbf16ps */
    for (int r = 0; r < NR; r++) {
        qw[r] = it->qw[r0 + r];
        qf[r] = it->qf[r0 + r];
        pos[r] = it->pos[r0 + r];
    }
    const char *ks = kslab(c, it->btab[(seg0 + col0) / B], it->kvh);
    for (int col = col0; col < col1;) {
        const int kpos = seg0 + col, off = kpos % B;
        const int n = col1 - col < VL ? col1 - col : VL;
        float *srow = it->S + (int64_t)r0 * SROW + col;
        int line = off / VL * steps * 2;              /* first line to prefetch */
        if (pos[NR - 1] < kpos) {                     /* causally masked for every row */
            for (int r = 0; r < NR; r++) vstore(srow + (int64_t)r * SROW, vsplat(-INFINITY));
            col += n;
            continue;
        }
        /* two accumulators per row (even and odd steps) halve the dependency
         * chains, which otherwise bound decode with its few rows */
        vf acc[12], acc2[12];                         /* QK_ROWS <= 12: the dispatch's size */
        for (int r = 0; r < NR; r++) acc[r] = acc2[r] = vsplat(0.0f);
        if (KT == DT_BF16) {
            const uint32_t *kw = (const uint32_t *)ks + off;
            for (int j = 0; j < D / 2; j += 2, line += 2) {
                prefetch_two_lines(pfk, pfv, line, slab_lines);
                vu kv = vload_u32_n(kw + (int64_t)j * B, n);
                vu kv2 = vload_u32_n(kw + (int64_t)(j + 1) * B, n);
#if USE_DPBF16
#pragma GCC unroll 12
                for (int r = 0; r < NR; r++) {
                    acc[r] = (vf)_mm512_dpbf16_ps((__m512)acc[r],
                                                  (__m512bh)_mm512_set1_epi32((int)qw[r][j]),
                                                  (__m512bh)kv);
                    acc2[r] = (vf)_mm512_dpbf16_ps((__m512)acc2[r],
                                                   (__m512bh)_mm512_set1_epi32((int)qw[r][j + 1]),
                                                   (__m512bh)kv2);
                }
#else
                vf ke = (vf)(kv << 16), ko = (vf)(kv & 0xffff0000u);
                vf ke2 = (vf)(kv2 << 16), ko2 = (vf)(kv2 & 0xffff0000u);
#pragma GCC unroll 12
                for (int r = 0; r < NR; r++) {
                    const float *qj = qf[r] + 2 * j;
                    acc[r] += qj[0] * ke;
                    acc2[r] += qj[2] * ke2;
                    acc[r] += qj[1] * ko;
                    acc2[r] += qj[3] * ko2;
                }
#endif
            }
        } else {                                      /* float32 or fp8: one key per lane */
            const float *kf = (const float *)ks + off;
            const uint8_t *kb = (const uint8_t *)ks + off;
            for (int d = 0; d < D; d += 2, line += 2) {
                prefetch_two_lines(pfk, pfv, line, slab_lines);
                vf kv = KT == DT_F32 ? vload_n(kf + (int64_t)d * B, n)
                                     : vload_fp8_n(kb + (int64_t)d * B, n, KT);
                vf kv2 = KT == DT_F32 ? vload_n(kf + (int64_t)(d + 1) * B, n)
                                      : vload_fp8_n(kb + (int64_t)(d + 1) * B, n, KT);
#pragma GCC unroll 12
                for (int r = 0; r < NR; r++) {
                    acc[r] += qf[r][d] * kv;
                    acc2[r] += qf[r][d + 1] * kv2;
                }
            }
        }
        for (int r = 0; r < NR; r++) {
            vf s = (acc[r] + acc2[r]) * c->scale;
            int lim = pos[r] - kpos + 1;              /* keys this row may see */
            if (lim > n) lim = n;
            if (lim < VL) s = vselect_n(s, vsplat(-INFINITY), lim);
            vstore(srow + (int64_t)r * SROW, s);
        }
        col += n;
    }
}

#define QK_CASE(NR) case NR: qk_tile(c, it, r0, NR, KT, seg0, col0, col1, pfk, pfv); break;
INLINE void qk_rows(const Ctx *c, Item *it, const int KT, int seg0, int col0, int col1,
                    const char *pfk, const char *pfv) {
    for (int r0 = 0; r0 < it->R; r0 += QK_ROWS, pfk = pfv = NULL) {
        int nr = it->R - r0 < QK_ROWS ? it->R - r0 : QK_ROWS;
        switch (nr) {
            QK_CASE(1) QK_CASE(2) QK_CASE(3) QK_CASE(4) QK_CASE(5) QK_CASE(6)
            QK_CASE(7) QK_CASE(8) QK_CASE(9) QK_CASE(10) QK_CASE(11) QK_CASE(12)
        }
    }
}

/* Scores of every head's rows for one segment of the nkeys keys of an item,
 * block by block and head by head: the cache's own order. */
static void qk_segment(const Ctx *c, Item *heads, int h0, int h1, int seg0, int seg_n,
                       int nkeys) {
    const int B = c->B;
    const int32_t *btab = heads[h0].btab;
    for (int col0 = 0; col0 < seg_n;) {
        const int b = (seg0 + col0) / B;
        int col1 = (b + 1) * B - seg0;
        if (col1 > seg_n) col1 = seg_n;
        for (int h = h0; h < h1; h++) {
            const char *pfk = (b + PF_AHEAD) * B < nkeys ? kslab(c, btab[b + PF_AHEAD], h) : NULL;
            const char *pfv = vslab(c, btab[b], h);
            switch (c->dtype) {                     /* one specialised loop per cache dtype */
            case DT_BF16: qk_rows(c, &heads[h], DT_BF16, seg0, col0, col1, pfk, pfv); break;
            case DT_E4M3: qk_rows(c, &heads[h], DT_E4M3, seg0, col0, col1, pfk, pfv); break;
            case DT_E5M2: qk_rows(c, &heads[h], DT_E5M2, seg0, col0, col1, pfk, pfv); break;
            default: qk_rows(c, &heads[h], DT_F32, seg0, col0, col1, pfk, pfv);
            }
        }
        col0 = col1;
    }
}

/* Online softmax over one segment: scores become probabilities relative to
 * the new running max; corr[r] rescales what was accumulated before. They stay
 * in float32 (rounding them to bf16 for vdpbf16ps in P @ V measured 5-25%
 * faster but 1.4x the reference's error). */
static void softmax_segment(Item *it, int seg_n) {
    for (int r = 0; r < it->R; r++) {
        float *s = it->S + (int64_t)r * SROW;
        vf vm = vsplat(-INFINITY);
        for (int i = 0; i < seg_n; i += VL) {
            vf x = vload(s + i);
            if (seg_n - i < VL) x = vselect_n(x, vsplat(-INFINITY), seg_n - i);
            vm = vmax(vm, x);
        }
        float mseg = hmax(vm), mold = it->m[r];
        float mnew = mseg > mold ? mseg : mold;
        if (mseg == -INFINITY) {                      /* nothing visible in this segment */
            /* zeros up to the vector's end: P @ V may read p[seg_n] (times a masked 0) */
            memset(s, 0, sizeof(float) * ((seg_n + VL - 1) / VL * VL));
            it->corr[r] = 1.0f;
            continue;
        }
        float corr = mnew == mold ? 1.0f : sexp(mold - mnew);
        vf sum = vsplat(0.0f);
        for (int i = 0; i < seg_n; i += VL) {
            vf x = vload(s + i);
            if (seg_n - i < VL) x = vselect_n(x, vsplat(-INFINITY), seg_n - i);
            vf p = vexp(x - mnew);
            vstore(s + i, p);
            sum += p;
        }
        it->l[r] = it->l[r] * corr + hsum(sum);
        it->m[r] = mnew;
        it->corr[r] = corr;
    }
}

/* acc[rows r0..r0+NR-1][dims 16*v0 .. 16*(v0+NV)) += P @ V over the first kend keys
 * of the segment, with the accumulators in registers. bfloat16 values come as
 * 32-bit words holding one dim of two consecutive tokens. */
INLINE void pv_tile(const Ctx *c, Item *it, int r0, const int NR, int v0, const int NV,
                    const int KT, int seg0, int kend) {
    const int D = c->D, B = c->B;
    vf acc[6][PV_COLS];                   /* PV_ROWS <= 6: the size of the dispatch */
    for (int r = 0; r < NR; r++) {
        const float *a = it->acc + (int64_t)(r0 + r) * D + v0 * VL;
        for (int v = 0; v < NV; v++) acc[r][v] = vload(a + v * VL) * it->corr[r0 + r];
    }
    for (int col = 0; col < kend;) {
        const int kpos = seg0 + col, off = kpos % B;
        const int cnt = B - off < kend - col ? B - off : kend - col;
        const char *vs = vslab(c, it->btab[kpos / B], it->kvh);
        if (KT == DT_BF16) {
            /* off and col are even: segments and blocks start at even keys */
            const uint32_t *vw = (const uint32_t *)vs + (int64_t)(off / 2) * D + v0 * VL;
            for (int t = 0; t < cnt; t += 2) {
                vu vv[PV_COLS];
                const uint32_t *pair = vw + (int64_t)(t / 2) * D;
                for (int v = 0; v < NV; v++) vv[v] = vload_u32_n(pair + v * VL, VL);
                if (t + 1 == cnt)                     /* the pair's second key is past kend */
                    for (int v = 0; v < NV; v++) vv[v] &= 0xffffu;
                vf ve[PV_COLS], vo[PV_COLS];
                for (int v = 0; v < NV; v++) {
                    ve[v] = (vf)(vv[v] << 16);
                    vo[v] = (vf)(vv[v] & 0xffff0000u);
                }
#pragma GCC unroll 6
                for (int r = 0; r < NR; r++) {
                    const float *p = it->S + (int64_t)(r0 + r) * SROW + col + t;
                    for (int v = 0; v < NV; v++) {
                        acc[r][v] += p[0] * ve[v];
                        acc[r][v] += p[1] * vo[v];
                    }
                }
            }
        } else {
            for (int t = 0; t < cnt; t++) {
                const float *row = (const float *)vs + (int64_t)(off + t) * D + v0 * VL;
                const uint8_t *brow = (const uint8_t *)vs + (int64_t)(off + t) * D + v0 * VL;
                vf vv[PV_COLS];
                for (int v = 0; v < NV; v++)
                    vv[v] = KT == DT_F32 ? vload(row + v * VL) : vload_fp8_n(brow + v * VL, VL, KT);
#pragma GCC unroll 6
                for (int r = 0; r < NR; r++) {
                    float p = it->S[(int64_t)(r0 + r) * SROW + col + t];
                    for (int v = 0; v < NV; v++) acc[r][v] += p * vv[v];
                }
            }
        }
        col += cnt;
    }
    for (int r = 0; r < NR; r++) {
        float *a = it->acc + (int64_t)(r0 + r) * D + v0 * VL;
        for (int v = 0; v < NV; v++) vstore(a + v * VL, acc[r][v]);
    }
}

#define PV_CASE(NR, NV) \
    case NR * 8 + NV: pv_tile(c, it, r0, NR, v0, NV, KT, seg0, kend); break;
#define PV_CASES(NR) PV_CASE(NR, 1) PV_CASE(NR, 2) PV_CASE(NR, 3) PV_CASE(NR, 4)
INLINE void pv_rows(const Ctx *c, Item *it, const int KT, int seg0, int seg_n) {
    const int nvec = c->D / VL;
    /* A tile decodes each fp8 value it reads, so fp8 takes the tallest tile: 6 rows (a
     * decode step's query heads per kv head, usually) by 2 vectors on AVX2 (15 registers)
     * decode every value once where 2 x 4 decoded it R / 2 times. A row's arithmetic is
     * the same in any tile. */
    const int tile_rows = IS_FP8(KT) ? 6 : PV_ROWS;
    const int tile_cols = IS_FP8(KT) && PV_ROWS < 6 ? 2 : PV_COLS;
    for (int v0 = 0; v0 < nvec; v0 += tile_cols) {
        int nv = nvec - v0 < tile_cols ? nvec - v0 : tile_cols;
        for (int r0 = 0; r0 < it->R; r0 += tile_rows) {
            int nr = it->R - r0 < tile_rows ? it->R - r0 : tile_rows;
            /* rows are in position order: keys past the tile's last row are all masked */
            int kend = it->pos[r0 + nr - 1] - seg0 + 1;
            if (kend > seg_n) kend = seg_n;
            if (kend <= 0) continue;                  /* all masked here, so corr == 1 */
            switch (nr * 8 + nv) {
                PV_CASES(1) PV_CASES(2) PV_CASES(3) PV_CASES(4) PV_CASES(5) PV_CASES(6)
            }
        }
    }
}

/* Attention of query tokens tok0..tok0+ntok-1 (flat rows) of one sequence, kv heads
 * h0..h1-1 and their query heads: heads[h] views the rows of kv head h's query heads
 * (ntok * G rows in token order), and the scratch of base, cut into Hk parts. Each
 * head's arithmetic is the same whichever other heads share the item. */
static void attend_item(const Ctx *c, const Item *base, Item *heads, int seq, int tok0, int ntok,
                        int h0, int h1) {
    const int D = c->D, G = c->G, R = ntok * G;
    const int qlen = c->qsl[seq + 1] - c->qsl[seq];
    const int first_pos = c->seq_lens[seq] - qlen + (tok0 - c->qsl[seq]);
    for (int ti = 0; ti < ntok; ti++)
        for (int g = 0; g < G; g++) base->pos[ti * G + g] = first_pos + ti;
    for (int h = h0; h < h1; h++) {
        Item *it = &heads[h];
        const int64_t r0 = (int64_t)h * R;
        *it = (Item){
            .R = R, .kvh = h, .btab = c->btab + (int64_t)seq * c->bt_stride, .pos = base->pos,
            .qf = base->qf + r0, .qw = base->qw + r0, .qbuf = base->qbuf + r0 * D,
            .S = base->S + r0 * SROW, .acc = base->acc + r0 * D,
            .m = base->m + r0, .l = base->l + r0, .corr = base->corr + r0,
        };
        for (int r = 0; r < R; r++) {
            const char *qrow = c->q + ((int64_t)(tok0 + r / G) * c->q_stride +
                                       (int64_t)(h * G + r % G) * D) * c->qesz;
            it->m[r] = -INFINITY;
            it->l[r] = 0.0f;
            memset(it->acc + (int64_t)r * D, 0, sizeof(float) * D);
            if (c->qdt == DT_F32) {
                it->qf[r] = (const float *)qrow;
            } else {
                it->qw[r] = (const uint32_t *)qrow;           /* for vdpbf16ps */
                float *qb = it->qbuf + (int64_t)r * D;        /* for float math without it */
                if (!USE_DPBF16 || c->dtype != DT_BF16)       /* fp8 keys: float math */
                    for (int d = 0; d < D; d += VL)
                        vstore(qb + d, vload_bf16((const uint16_t *)qrow + d));
                it->qf[r] = qb;
            }
        }
    }
    const int nkeys = first_pos + ntok;               /* keys visible to the last row */
    for (int h = h0; h < h1; h++) {                 /* later blocks are prefetched in qk_tile */
        const char *ks = kslab(c, heads[h0].btab[0], h);
        for (int64_t i = 0; i < (int64_t)c->B * D * c->esz; i += 64) PREFETCH(ks + i);
    }
    for (int seg0 = 0; seg0 < nkeys; seg0 += SEG) {
        int seg_n = nkeys - seg0 < SEG ? nkeys - seg0 : SEG;
        qk_segment(c, heads, h0, h1, seg0, seg_n, nkeys);
        for (int h = h0; h < h1; h++) {
            softmax_segment(&heads[h], seg_n);
            switch (c->dtype) {
            case DT_BF16: pv_rows(c, &heads[h], DT_BF16, seg0, seg_n); break;
            case DT_E4M3: pv_rows(c, &heads[h], DT_E4M3, seg0, seg_n); break;
            case DT_E5M2: pv_rows(c, &heads[h], DT_E5M2, seg0, seg_n); break;
            default: pv_rows(c, &heads[h], DT_F32, seg0, seg_n);
            }
        }
    }
    for (int h = h0; h < h1; h++) {
        const Item *it = &heads[h];
        for (int r = 0; r < R; r++) {
            /* v_scale (1 but for fp8 caches) once per row rather than per value read:
             * sum p * (v * s) = s * sum p * v, and no batch-dependent order either way */
            float inv = c->v_scale / it->l[r];
            const int64_t row = (int64_t)(tok0 + r / G) * c->Hq + h * G + r % G;
            char *orow = c->out + row * D * c->qesz;
            for (int d = 0; d < D; d += VL) {
                vf o = vload(it->acc + (int64_t)r * D + d) * inv;
                if (c->qdt == DT_BF16) vstore_bf16((uint16_t *)orow + d, o);
                else vstore((float *)orow + d, o);
            }
        }
    }
}

/* ---------------------------------------------------------------- cache writes */

/* One element of a new key/value row (the model's dtype) as a float. */
INLINE float row_value(const Ctx *c, const char *row, int d) {
    if (c->qdt == DT_F32) return ((const float *)row)[d];
    uint32_t u = (uint32_t)((const uint16_t *)row)[d] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp8 caches: keys [D][B] and values [B][D], one byte each (the float32 layout). */
static void write_token_fp8(const Ctx *c, const char *krow, const char *vrow, uint8_t *ks,
                            uint8_t *vs, int off) {
    const int D = c->D, B = c->B;
    for (int d = 0; d < D; d++) {
        ks[(int64_t)d * B + off] = fp8_encode(row_value(c, krow, d) / c->k_scale, c->dtype);
        vs[(int64_t)off * D + d] = fp8_encode(row_value(c, vrow, d) / c->v_scale, c->dtype);
    }
}

static void write_token(const Ctx *c, const char *k, int64_t k_stride, const char *v,
                        int64_t v_stride, int64_t i, int64_t slot) {
    const int D = c->D, B = c->B, esz = c->esz;
    const int blk = (int)(slot / B), off = (int)(slot % B);
    for (int h = 0; h < c->Hk; h++) {
        const char *krow = k + (i * k_stride + (int64_t)h * D) * c->qesz;
        const char *vrow = v + (i * v_stride + (int64_t)h * D) * c->qesz;
        char *ks = (char *)kslab(c, blk, h), *vs = (char *)vslab(c, blk, h);
        if (IS_FP8(c->dtype)) {
            write_token_fp8(c, krow, vrow, (uint8_t *)ks, (uint8_t *)vs, off);
            continue;
        }
        /* keys: one 32-bit word (P dims) per token, words of a dim group B apart */
        uint32_t *kw = (uint32_t *)ks + off;
        for (int j = 0; j < D * esz / 4; j++) memcpy(kw + (int64_t)j * B, krow + 4 * j, 4);
        if (esz == 2) {                  /* values: words of two tokens' same dim */
            uint16_t *vh = (uint16_t *)vs + (int64_t)(off / 2) * D * 2 + (off & 1);
            for (int d = 0; d < D; d++) memcpy(vh + 2 * d, vrow + 2 * d, 2);
        } else {
            memcpy(vs + (int64_t)off * D * esz, vrow, (size_t)D * esz);
        }
    }
}

/* ---------------------------------------------------------------- entry point */

/* Each thread keeps its scratch between calls (OpenMP threads live on), so a
 * decode step pays no allocation or page faults; it only ever grows. */
static __thread char *scratch_buf;
static __thread size_t scratch_size;

#define ALIGN64(x) (((x) + 63) / 64 * 64)

static int thread_scratch(Item *base, Item **heads, int rows, int D, int Hk) {
    const size_t floats = ALIGN64(sizeof(float) * rows * (SROW + 2 * D + 3));
    const size_t ints = ALIGN64(sizeof(int) * rows), ptrs = ALIGN64(sizeof(void *) * rows);
    const size_t bytes = floats + ints + 2 * ptrs + ALIGN64(sizeof(Item) * Hk);
    if (bytes > scratch_size) {
        free(scratch_buf);
        scratch_buf = aligned_alloc(64, bytes);
        scratch_size = scratch_buf ? bytes : 0;
        if (!scratch_buf) return 0;
    }
    float *f = (float *)scratch_buf;
    char *rest = scratch_buf + floats;
    *base = (Item){
        .S = f, .acc = f + (size_t)rows * SROW, .qbuf = f + (size_t)rows * (SROW + D),
        .m = f + (size_t)rows * (SROW + 2 * D), .l = f + (size_t)rows * (SROW + 2 * D + 1),
        .corr = f + (size_t)rows * (SROW + 2 * D + 2),
        .pos = (int *)rest, .qf = (const float **)(rest + ints),
        .qw = (const uint32_t **)(rest + ints + ptrs),
    };
    *heads = (Item *)(rest + ints + 2 * ptrs);
    return 1;
}

typedef struct { int seq, tok0, ntok, h0, h1; int64_t cost; } WorkItem;

static int by_cost_desc(const void *a, const void *b) {
    const WorkItem *x = a, *y = b;
    if (x->cost != y->cost) return x->cost < y->cost ? 1 : -1;
    if (x->tok0 != y->tok0) return x->tok0 < y->tok0 ? -1 : 1;
    return x->h0 < y->h0 ? -1 : x->h0 > y->h0;
}

static int validate(const int32_t *qsl, const int32_t *seq_lens, const int32_t *btab,
                    int64_t bt_stride, int64_t max_blocks, int64_t num_blocks, int num_seqs,
                    int num_tokens, int B) {
    if (qsl[0] != 0 || qsl[num_seqs] != num_tokens) return E_QUERY_START_LOC;
    for (int s = 0; s < num_seqs; s++) {
        int qlen = qsl[s + 1] - qsl[s];
        if (qlen < 0) return E_QUERY_START_LOC;
        if (seq_lens[s] < qlen || (int64_t)seq_lens[s] > max_blocks * B) return E_SEQ_LENS;
        const int32_t *row = btab + (int64_t)s * bt_stride;
        if (qlen == 0) continue;
        for (int j = 0; j < (seq_lens[s] + B - 1) / B; j++)
            if (row[j] < 0 || row[j] >= num_blocks) return E_BLOCK_TABLE;
    }
    return 0;
}

int heron_attention(const void *q, int64_t q_stride, const void *k, int64_t k_stride,
                    const void *v, int64_t v_stride, void *out, void *kv_cache,
                    int64_t num_blocks, const int32_t *query_start_loc, const int32_t *seq_lens,
                    const int32_t *block_tables, int64_t bt_stride, int64_t max_blocks,
                    const int64_t *slot_mapping, int num_seqs, int num_tokens, int num_heads,
                    int num_kv_heads, int head_size, int block_size, int dtype, int cache_dtype,
                    float scale, float k_scale, float v_scale, int num_threads, int flags) {
    const int D = head_size, B = block_size;
    /* a float32 or bfloat16 cache holds the model's dtype; fp8 caches take either */
    const int cache_ok = cache_dtype == dtype || IS_FP8(cache_dtype);
    if (D <= 0 || D % VL || B <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads ||
        (dtype != DT_F32 && dtype != DT_BF16) || !cache_ok || cache_dtype > DT_E5M2 ||
        (cache_dtype == DT_BF16 && B % 2) || num_seqs < 0 || num_tokens < 0 ||
        !(k_scale > 0.0f) || !(v_scale > 0.0f))
        return E_ARGS;
    const int fp8 = IS_FP8(cache_dtype);
    Ctx c = {
        .D = D, .B = B, .G = num_heads / num_kv_heads, .Hq = num_heads, .Hk = num_kv_heads,
        .dtype = cache_dtype, .esz = fp8 ? 1 : cache_dtype == DT_BF16 ? 2 : 4,
        .qdt = dtype, .qesz = dtype == DT_BF16 ? 2 : 4,
        /* k_scale folded into the scores' scale: one multiply per score, not per key */
        .scale = fp8 ? scale * k_scale : scale,
        .k_scale = fp8 ? k_scale : 1.0f, .v_scale = fp8 ? v_scale : 1.0f,
        .q = q, .q_stride = q_stride, .out = out,
        .cache = kv_cache,
        .qsl = query_start_loc, .seq_lens = seq_lens, .btab = block_tables, .bt_stride = bt_stride,
    };
    if (num_threads < 1) num_threads = 1;
    if (flags & F_WRITE_KV)
        for (int i = 0; i < num_tokens; i++)
            if (slot_mapping[i] >= num_blocks * B) return E_SLOT;
    if (!(flags & F_ATTEND)) {
        for (int64_t i = 0; i < num_tokens; i++)
            if (slot_mapping[i] >= 0) write_token(&c, k, k_stride, v, v_stride, i, slot_mapping[i]);
        return 0;
    }
    int err = validate(query_start_loc, seq_lens, block_tables, bt_stride, max_blocks,
                       num_blocks, num_seqs, num_tokens, B);
    if (err) return err;

    /* work items: (sequence, tile of query tokens), all heads: an item then reads
     * whole blocks, the longest runs of contiguous memory the cache has */
    const int ntile = ROWS_TARGET / num_heads > 0 ? ROWS_TARGET / num_heads : 1;
    int64_t nitems = 0;
    int max_nt = 1;
    for (int s = 0; s < num_seqs; s++) {
        int qlen = query_start_loc[s + 1] - query_start_loc[s];
        nitems += (qlen + ntile - 1) / ntile;
        if (qlen > max_nt) max_nt = qlen < ntile ? qlen : ntile;
    }
    /* fewer items than threads (a decode step of one or two sequences): split the kv
     * heads too, so that every thread has work */
    const int hsplit = nitems >= num_threads ? 1 : (num_kv_heads < num_threads ? num_kv_heads
                                                                               : num_threads);
    nitems *= hsplit;
    WorkItem *items = malloc(sizeof(WorkItem) * (nitems > 0 ? nitems : 1));
    if (!items) return E_NOMEM;
    int64_t n = 0;
    for (int s = 0; s < num_seqs; s++) {
        int start = query_start_loc[s], qlen = query_start_loc[s + 1] - start;
        for (int t = 0; t < qlen; t += ntile) {
            int nt = qlen - t < ntile ? qlen - t : ntile;
            for (int g = 0; g < hsplit; g++) {
                const int h0 = num_kv_heads * g / hsplit, h1 = num_kv_heads * (g + 1) / hsplit;
                items[n++] = (WorkItem){s, start + t, nt, h0, h1,
                                        (int64_t)(seq_lens[s] - qlen + t + nt) * nt * (h1 - h0)};
            }
        }
    }
    /* longest first balances the threads; the order never changes any result */
    qsort(items, nitems, sizeof(WorkItem), by_cost_desc);

    const int rmax = max_nt * num_heads;            /* rows of the largest item */
    int nomem = 0;
#pragma omp parallel num_threads(num_threads)
    {
        if (flags & F_WRITE_KV) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < num_tokens; i++)
                if (slot_mapping[i] >= 0)
                    write_token(&c, k, k_stride, v, v_stride, i, slot_mapping[i]);
        }
        /* the implicit barrier above: every new key is stored before any is read */
        Item base = {0}, *heads = NULL;
        if (!thread_scratch(&base, &heads, rmax, D, c.Hk)) {
#pragma omp atomic write
            nomem = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nitems; i++)
            if (base.S) attend_item(&c, &base, heads, items[i].seq, items[i].tok0, items[i].ntok,
                                    items[i].h0, items[i].h1);
    }
    free(items);
    return nomem ? E_NOMEM : 0;
}

/* which optional instruction sets this build uses, for logs and tests */
int heron_attention_isa(void) {
    int isa = 0;
#if defined(__AVX512F__)
    isa |= 1;
#endif
#if defined(__AVX512BF16__)
    isa |= 2;
#endif
    return isa;
}
