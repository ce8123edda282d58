/*
 * heron CPU paged attention: writes new keys/values into the paged cache, then
 * attends every query token of a flat batch over its sequence's cached context.
 * The Python side (heron/kernels/cpu.py) compiles this file with gcc, loads it
 * with ctypes and validates dtypes and shapes before calling heron_attention().
 *
 * Cache layout, one layer: [2][num_blocks][num_kv_heads][slab], a slab holding
 * block_size tokens of one kv head (block_size * head_size elements):
 *   values: [block_size][head_size]            (a row per token, read by P @ V)
 *   keys:   [head_size / P][block_size][P]      P = 4 / element size
 * so that one 32-bit word holds P consecutive dims of one token and 16 tokens'
 * words for the same dims are contiguous: Q @ K^T then needs no transpose or
 * horizontal sum, and bf16 pairs feed vdpbf16ps directly.
 *
 * Work is split into items (sequence, kv head, tile of up to ROWS_TARGET / G
 * query tokens). An item computes every row (query token x query head of the
 * group) with a fixed order of operations that depends only on that sequence,
 * so results are batch invariant whatever thread runs which item.
 *
 * All math is written with GCC vector extensions (16 floats), so the file also
 * builds without AVX-512; intrinsics are used where they pay (masked loads,
 * bf16 dot products and conversions).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define VL 16                  /* floats per vector */
#define SEG 256                /* keys per online-softmax step */
#define SROW (SEG + VL)        /* score row stride: a chunk may write 16 lanes past the end */
#define ROWS_TARGET 48         /* query rows per work item (shares each K/V read) */
#define PV_COLS 4              /* vectors of the head dim kept in registers by P @ V */
#if defined(__AVX512F__)
#define QK_ROWS 12             /* rows per Q @ K^T register tile */
#define PV_ROWS 6              /* rows per P @ V register tile (6 x 4 accumulators) */
#else
#define QK_ROWS 4
#define PV_ROWS 2
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };
enum { F_WRITE_KV = 1, F_ATTEND = 2 };
enum {
    E_ARGS = -1, E_QUERY_START_LOC = -2, E_SEQ_LENS = -3, E_BLOCK_TABLE = -4, E_SLOT = -5,
    E_NOMEM = -6,
};

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------- vectors */

INLINE vf vsplat(float x) { return (vf){0} + x; }
INLINE vf vload(const float *p) { vf r; memcpy(&r, p, sizeof r); return r; }
INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf viota(void) { return (vf){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
/* lanes < n of a, the rest from b */
INLINE vf vselect_n(vf a, vf b, int n) {
    vi m = viota() < vsplat((float)n);
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

/* the first n (<= 16) words, zeros after */
INLINE vu vload_u32_n(const uint32_t *p, int n) {
#if defined(__AVX512F__)
    return (vu)_mm512_maskz_loadu_epi32((__mmask16)((1u << n) - 1u), p);
#else
    vu r = {0};
    for (int i = 0; i < n; i++) r[i] = p[i];
    return r;
#endif
}
INLINE vf vload_n(const float *p, int n) { return (vf)vload_u32_n((const uint32_t *)p, n); }

INLINE vf vload_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
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
#if defined(__AVX512BF16__)
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
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#else
    vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
#endif
}

INLINE vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
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
    for (int i = 0; i < 8; i++) s8[i] = v[i] + v[i + 8];
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

/* ---------------------------------------------------------------- work items */

typedef struct {
    int D, B, G, Hq, Hk, dtype, esz;
    float scale;
    const char *q;
    int64_t q_stride;                    /* elements between tokens */
    char *out;                           /* contiguous [T, Hq, D] */
    const char *kcache, *vcache;         /* the key and the value halves */
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
    return c->kcache + ((int64_t)blk * c->Hk + kvh) * c->B * c->D * c->esz;
}
INLINE const char *vslab(const Ctx *c, int blk, int kvh) {
    return c->vcache + ((int64_t)blk * c->Hk + kvh) * c->B * c->D * c->esz;
}

/* Scores of rows r0..r0+NR-1 against keys off..off+n-1 of one slab, scaled and
 * causally masked, stored at column col of the score rows. */
INLINE void qk_tile(const Ctx *c, Item *it, int r0, const int NR, const int BF16,
                    const char *ks, int off, int n, int col, int kpos) {
    const int D = c->D, B = c->B;
    vf acc[12];                           /* QK_ROWS <= 12: the size of the dispatch */
    for (int r = 0; r < NR; r++) acc[r] = vsplat(0.0f);
    if (BF16) {
        const uint32_t *kw = (const uint32_t *)ks + off;
        for (int j = 0; j < D / 2; j++) {
            vu kv = vload_u32_n(kw + (int64_t)j * B, n);
#if defined(__AVX512BF16__)
#pragma GCC unroll 12
            for (int r = 0; r < NR; r++)
                acc[r] = (vf)_mm512_dpbf16_ps((__m512)acc[r],
                                              (__m512bh)_mm512_set1_epi32((int)it->qw[r0 + r][j]),
                                              (__m512bh)kv);
#else
            vf ke = (vf)(kv << 16), ko = (vf)(kv & 0xffff0000u);
#pragma GCC unroll 12
            for (int r = 0; r < NR; r++) {
                acc[r] += it->qf[r0 + r][2 * j] * ke;
                acc[r] += it->qf[r0 + r][2 * j + 1] * ko;
            }
#endif
        }
    } else {
        const float *kf = (const float *)ks + off;
        for (int d = 0; d < D; d++) {
            vf kv = vload_n(kf + (int64_t)d * B, n);
#pragma GCC unroll 12
            for (int r = 0; r < NR; r++) acc[r] += it->qf[r0 + r][d] * kv;
        }
    }
    for (int r = 0; r < NR; r++) {
        vf s = acc[r] * c->scale;
        int lim = it->pos[r0 + r] - kpos + 1;         /* keys this row may see */
        if (lim > n) lim = n;
        if (lim < VL) s = vselect_n(s, vsplat(-INFINITY), lim);
        vstore(it->S + (int64_t)(r0 + r) * SROW + col, s);
    }
}

#define QK_CASE(NR) case NR: qk_tile(c, it, r0, NR, BF16, ks, off, n, col, kpos); break;
INLINE void qk_rows(const Ctx *c, Item *it, const int BF16, const char *ks, int off, int n,
                    int col, int kpos) {
    for (int r0 = 0; r0 < it->R; r0 += QK_ROWS) {
        int nr = it->R - r0 < QK_ROWS ? it->R - r0 : QK_ROWS;
        if (it->pos[r0 + nr - 1] < kpos) {            /* the whole tile is causally masked */
            for (int r = r0; r < r0 + nr; r++)
                vstore(it->S + (int64_t)r * SROW + col, vsplat(-INFINITY));
            continue;
        }
        switch (nr) {
            QK_CASE(1) QK_CASE(2) QK_CASE(3) QK_CASE(4) QK_CASE(5) QK_CASE(6)
            QK_CASE(7) QK_CASE(8) QK_CASE(9) QK_CASE(10) QK_CASE(11) QK_CASE(12)
        }
    }
}

static void qk_segment(const Ctx *c, Item *it, int seg0, int seg_n) {
    const int B = c->B;
    for (int col = 0; col < seg_n;) {
        int kpos = seg0 + col, off = kpos % B;
        int n = B - off;
        if (n > VL) n = VL;
        if (n > seg_n - col) n = seg_n - col;
        const char *ks = kslab(c, it->btab[kpos / B], it->kvh);
        if (c->dtype == DT_BF16) qk_rows(c, it, 1, ks, off, n, col, kpos);
        else qk_rows(c, it, 0, ks, off, n, col, kpos);
        col += n;
    }
}

/* Online softmax over one segment: scores become probabilities relative to
 * the new running max; corr[r] rescales what was accumulated before. */
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
            memset(s, 0, sizeof(float) * seg_n);
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
 * of the segment, with the accumulators in registers. */
INLINE void pv_tile(const Ctx *c, Item *it, int r0, const int NR, int v0, const int NV,
                    const int BF16, int seg0, int kend) {
    const int D = c->D, B = c->B;
    vf acc[6][PV_COLS];                   /* PV_ROWS <= 6: the size of the dispatch */
    for (int r = 0; r < NR; r++) {
        const float *a = it->acc + (int64_t)(r0 + r) * D + v0 * VL;
        for (int v = 0; v < NV; v++) acc[r][v] = vload(a + v * VL) * it->corr[r0 + r];
    }
    for (int col = 0; col < kend;) {
        int kpos = seg0 + col, off = kpos % B;
        int cnt = B - off < kend - col ? B - off : kend - col;
        const char *vs = vslab(c, it->btab[kpos / B], it->kvh);
        for (int t = 0; t < cnt; t++) {
            vf vv[PV_COLS];
            if (BF16) {
                const uint16_t *row = (const uint16_t *)vs + (int64_t)(off + t) * D + v0 * VL;
                for (int v = 0; v < NV; v++) vv[v] = vload_bf16(row + v * VL);
            } else {
                const float *row = (const float *)vs + (int64_t)(off + t) * D + v0 * VL;
                for (int v = 0; v < NV; v++) vv[v] = vload(row + v * VL);
            }
#pragma GCC unroll 6
            for (int r = 0; r < NR; r++) {
                float p = it->S[(int64_t)(r0 + r) * SROW + col + t];
                for (int v = 0; v < NV; v++) acc[r][v] += p * vv[v];
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
    case NR * 8 + NV: pv_tile(c, it, r0, NR, v0, NV, BF16, seg0, kend); break;
#define PV_CASES(NR) PV_CASE(NR, 1) PV_CASE(NR, 2) PV_CASE(NR, 3) PV_CASE(NR, 4)
INLINE void pv_rows(const Ctx *c, Item *it, const int BF16, int seg0, int seg_n) {
    const int nvec = c->D / VL;
    for (int v0 = 0; v0 < nvec; v0 += PV_COLS) {
        int nv = nvec - v0 < PV_COLS ? nvec - v0 : PV_COLS;
        for (int r0 = 0; r0 < it->R; r0 += PV_ROWS) {
            int nr = it->R - r0 < PV_ROWS ? it->R - r0 : PV_ROWS;
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

/* Attention of query tokens tok0..tok0+ntok-1 (flat rows) of one sequence for
 * the query heads of kv head it->kvh. */
static void attend_item(const Ctx *c, Item *it, int seq, int tok0, int ntok) {
    const int D = c->D, G = c->G;
    const int qlen = c->qsl[seq + 1] - c->qsl[seq];
    const int first_pos = c->seq_lens[seq] - qlen + (tok0 - c->qsl[seq]);
    it->R = ntok * G;
    it->btab = c->btab + (int64_t)seq * c->bt_stride;
    for (int ti = 0; ti < ntok; ti++) {
        for (int g = 0; g < G; g++) {
            int r = ti * G + g;
            const char *qrow = c->q + ((int64_t)(tok0 + ti) * c->q_stride +
                                       (int64_t)(it->kvh * G + g) * D) * c->esz;
            it->pos[r] = first_pos + ti;
            it->m[r] = -INFINITY;
            it->l[r] = 0.0f;
            memset(it->acc + (int64_t)r * D, 0, sizeof(float) * D);
            if (c->dtype == DT_F32) {
                it->qf[r] = (const float *)qrow;
            } else {
                it->qw[r] = (const uint32_t *)qrow;
                float *qb = it->qbuf + (int64_t)r * D;
                for (int d = 0; d < D; d += VL) vstore(qb + d, vload_bf16((const uint16_t *)qrow + d));
                it->qf[r] = qb;
            }
        }
    }
    const int nkeys = first_pos + ntok;               /* keys visible to the last row */
    for (int seg0 = 0; seg0 < nkeys; seg0 += SEG) {
        int seg_n = nkeys - seg0 < SEG ? nkeys - seg0 : SEG;
        qk_segment(c, it, seg0, seg_n);
        softmax_segment(it, seg_n);
        if (c->dtype == DT_BF16) pv_rows(c, it, 1, seg0, seg_n);
        else pv_rows(c, it, 0, seg0, seg_n);
    }
    for (int ti = 0; ti < ntok; ti++) {
        for (int g = 0; g < G; g++) {
            int r = ti * G + g;
            float inv = 1.0f / it->l[r];
            char *orow = c->out + ((int64_t)(tok0 + ti) * c->Hq + (int64_t)(it->kvh * G + g)) * D * c->esz;
            for (int d = 0; d < D; d += VL) {
                vf o = vload(it->acc + (int64_t)r * D + d) * inv;
                if (c->dtype == DT_BF16) vstore_bf16((uint16_t *)orow + d, o);
                else vstore((float *)orow + d, o);
            }
        }
    }
}

/* ---------------------------------------------------------------- cache writes */

static void write_token(const Ctx *c, const char *k, int64_t k_stride, const char *v,
                        int64_t v_stride, int64_t i, int64_t slot) {
    const int D = c->D, B = c->B, esz = c->esz;
    const int blk = (int)(slot / B), off = (int)(slot % B);
    for (int h = 0; h < c->Hk; h++) {
        const char *krow = k + (i * k_stride + (int64_t)h * D) * esz;
        const char *vrow = v + (i * v_stride + (int64_t)h * D) * esz;
        char *ks = (char *)kslab(c, blk, h), *vs = (char *)vslab(c, blk, h);
        /* keys: one 32-bit word (P dims) per token, words of a dim group B apart */
        uint32_t *kw = (uint32_t *)ks + off;
        for (int j = 0; j < D * esz / 4; j++) memcpy(kw + (int64_t)j * B, krow + 4 * j, 4);
        memcpy(vs + (int64_t)off * D * esz, vrow, (size_t)D * esz);
    }
}

/* ---------------------------------------------------------------- entry point */

typedef struct { int seq, tok0, ntok, kvh; int64_t cost; } WorkItem;

static int by_cost_desc(const void *a, const void *b) {
    const WorkItem *x = a, *y = b;
    if (x->cost != y->cost) return x->cost < y->cost ? 1 : -1;
    if (x->tok0 != y->tok0) return x->tok0 < y->tok0 ? -1 : 1;
    return x->kvh - y->kvh;
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
                    int num_kv_heads, int head_size, int block_size, int dtype, float scale,
                    int num_threads, int flags) {
    const int D = head_size, B = block_size;
    if (D <= 0 || D % VL || B <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads ||
        (dtype != DT_F32 && dtype != DT_BF16) || num_seqs < 0 || num_tokens < 0)
        return E_ARGS;
    Ctx c = {
        .D = D, .B = B, .G = num_heads / num_kv_heads, .Hq = num_heads, .Hk = num_kv_heads,
        .dtype = dtype, .esz = dtype == DT_BF16 ? 2 : 4, .scale = scale,
        .q = q, .q_stride = q_stride, .out = out,
        .kcache = kv_cache,
        .vcache = (const char *)kv_cache + num_blocks * num_kv_heads * B * D * (dtype == DT_BF16 ? 2 : 4),
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

    /* work items: (sequence, kv head, tile of query tokens) */
    const int ntile = ROWS_TARGET / c.G > 0 ? ROWS_TARGET / c.G : 1;
    int64_t nitems = 0;
    int prefill = 0;
    for (int s = 0; s < num_seqs; s++) {
        int qlen = query_start_loc[s + 1] - query_start_loc[s];
        nitems += (int64_t)(qlen + ntile - 1) / ntile * c.Hk;
        prefill |= qlen > 1;
    }
    WorkItem *items = malloc(sizeof(WorkItem) * (nitems > 0 ? nitems : 1));
    if (!items) return E_NOMEM;
    int64_t n = 0;
    for (int s = 0; s < num_seqs; s++) {
        int start = query_start_loc[s], qlen = query_start_loc[s + 1] - start;
        for (int t = 0; t < qlen; t += ntile) {
            int nt = qlen - t < ntile ? qlen - t : ntile;
            int64_t keys = seq_lens[s] - qlen + t + nt;
            for (int h = 0; h < c.Hk; h++)
                items[n++] = (WorkItem){s, start + t, nt, h, keys * nt};
        }
    }
    /* longest first balances threads; the order never changes any result */
    if (prefill) qsort(items, nitems, sizeof(WorkItem), by_cost_desc);

    const int rmax = ntile * c.G;
    int nomem = 0;
#pragma omp parallel num_threads(num_threads)
    {
        if (flags & F_WRITE_KV) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < num_tokens; i++)
                if (slot_mapping[i] >= 0) write_token(&c, k, k_stride, v, v_stride, i, slot_mapping[i]);
        }
        /* the implicit barrier above: every new key is stored before any is read */
        size_t floats = (size_t)rmax * (SROW + 2 * D + 3);
        float *buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        int *pos = malloc(sizeof(int) * rmax);
        const float **qf = malloc(sizeof(*qf) * rmax);
        const uint32_t **qw = malloc(sizeof(*qw) * rmax);
        Item it = {0};
        if (!buf || !pos || !qf || !qw) {
#pragma omp atomic write
            nomem = 1;
        } else {
            it.S = buf;
            it.acc = it.S + (size_t)rmax * SROW;
            it.qbuf = it.acc + (size_t)rmax * D;
            it.m = it.qbuf + (size_t)rmax * D;
            it.l = it.m + rmax;
            it.corr = it.l + rmax;
            it.pos = pos;
            it.qf = qf;
            it.qw = qw;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nitems; i++) {
            if (!it.S) continue;
            it.kvh = items[i].kvh;
            attend_item(&c, &it, items[i].seq, items[i].tok0, items[i].ntok);
        }
        free(buf);
        free(pos);
        free(qf);
        free(qw);
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
