/*
 * heron CPU decoder loop: a whole Llama-family forward pass in one call.
 *
 * The eager path calls about ten kernels per layer from Python (RMSNorm, the fused
 * qkv projection, rotary, attention, o projection, RMSNorm, gate|up, SiLU-and-mul,
 * down), each through ctypes with its checks and a fresh output tensor: on a 30-layer
 * model at one token that is several milliseconds per step around a few hundred
 * microseconds of kernels. This loop calls the *same* kernels (heron_linear,
 * heron_add_rms_norm, heron_rotary, heron_silu_and_mul, heron_attention, reached
 * through the function pointers the Python side hands over from their own
 * libraries) in the same order on the same buffers, so its results are the eager
 * path's bit for bit; it only removes the Python between them.
 *
 * Buffers are the caller's: one scratch block sized by heron_decoder_scratch_bytes
 * for the step's token count. Everything is row-major; dtype codes 0 float32,
 * 1 bfloat16 (weights and activations share one dtype; the KV cache has it too, or
 * is fp8: kv_dtype 2 e4m3fn, 3 e5m2, which only the attention kernel reads).
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*linear_fn)(const void *x, int64_t xs, const void *w, const void *bias, void *y,
                         int64_t ys, int64_t M, int64_t N, int64_t K, int dtype, int nthreads);
typedef void (*rms_norm_fn)(const void *x, int64_t xs, void *res, int64_t rs, const void *w,
                            void *out, int64_t os, int64_t rows, int64_t hidden, float eps,
                            int dtype, int nthreads);
typedef void (*rotary_fn)(void *x, int64_t stride, int64_t rows, int64_t heads, int64_t dim,
                          const int64_t *positions, const void *cache, int dtype, int nthreads);
typedef void (*silu_fn)(const void *x, int64_t xs, void *out, int64_t os, int64_t rows,
                        int64_t d, int dtype, int nthreads);
typedef int (*attention_fn)(const void *q, int64_t q_stride, const void *k, int64_t k_stride,
                            const void *v, int64_t v_stride, void *out, void *kv_cache,
                            int64_t num_blocks, const int32_t *query_start_loc,
                            const int32_t *seq_lens, const int32_t *block_tables,
                            int64_t bt_stride, int64_t max_blocks, const int64_t *slot_mapping,
                            int num_seqs, int num_tokens, int num_heads, int num_kv_heads,
                            int head_size, int block_size, int dtype, int cache_dtype,
                            float scale, float k_scale, float v_scale, int num_threads,
                            int flags);

/* The kernels, from their own libraries. */
typedef struct {
    linear_fn linear;
    rms_norm_fn rms_norm;
    rotary_fn rotary;
    silu_fn silu_and_mul;
    attention_fn attention;
} Kernels;

/* One linear layer: its kernel (NULL: Kernels.linear over heron_pack's panels), its
 * weight as that kernel takes it (a quantized layer's is a QWeight descriptor), and its
 * bias or NULL. */
typedef struct {
    linear_fn fn;
    const void *w;
    const void *bias;
} Linear;

/* y = x @ W^T (+ b) through the layer's own kernel. */
static inline int run_linear(const Kernels *k, const Linear *L, const void *x, int64_t xs,
                             void *y, int64_t ys, int64_t M, int64_t N, int64_t K, int dt,
                             int nthreads) {
    const linear_fn fn = L->fn ? L->fn : k->linear;
    return fn(x, xs, L->w, L->bias, y, ys, M, N, K, dt, nthreads);
}

typedef struct {
    const void *input_norm;
    const void *post_norm;
    Linear qkv, o, gate_up, down;
    void *kv_cache;
} Layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t vocab, max_positions, num_blocks, block_size;
    int dtype;
    float eps, scale;
    const void *embed;          /* [vocab, hidden] */
    const void *final_norm;     /* [hidden] */
    const void *rope;           /* [max_positions, head_dim] cos|sin */
    const Layer *layers;
    int kv_dtype;               /* the KV cache's dtype code (see above) */
    float k_scale, v_scale;     /* fp8 caches: stored = key / k_scale, value / v_scale */
} Model;

/* The step's batch layout (see heron/kernels/interface.py, AttentionMetadata). */
typedef struct {
    int64_t num_tokens;
    int num_seqs;
    const int64_t *token_ids;
    const int64_t *positions;
    const int32_t *query_start_loc;
    const int32_t *seq_lens;
    const int32_t *block_tables;
    int64_t bt_stride, max_blocks;
    const int64_t *slot_mapping;
} Batch;

enum { E_ARGS = -1, E_TOKEN = -7, E_POSITION = -8, E_LINEAR = -9 };
#define ATTEND_AND_WRITE 3

static int64_t esize(const Model *m) { return m->dtype == 1 ? 2 : 4; }

/* Scratch rows per token: x, residual, normed, qkv, attention out, gate|up, activation. */
static int64_t row_elems(const Model *m) {
    const int64_t q = m->num_heads * m->head_dim, kv = m->num_kv_heads * m->head_dim;
    return 3 * m->hidden + (q + 2 * kv) + q + 3 * m->intermediate;
}

/* Optional profile of a call: seconds in linears, attention and the element-wise ops. */
enum { T_LINEAR, T_ATTENTION, T_OTHER, T_KINDS };
static double clock_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
/* Charge the time since *last to timings[kind] (no-op without timings). */
static void charge(double *timings, int kind, double *last) {
    if (!timings) return;
    const double t = clock_s();
    timings[kind] += t - *last;
    *last = t;
}

int64_t heron_decoder_scratch_bytes(const Model *m, int64_t num_tokens) {
    return num_tokens * row_elems(m) * esize(m);
}

/*
 * Forward `b->num_tokens` tokens; writes the final normed hidden states [T, hidden] to
 * `out`. Returns 0, or a negative code: E_TOKEN / E_POSITION for an id or position out
 * of range, E_LINEAR when a linear kernel failed, or the attention kernel's own code.
 * `timings` (NULL, or T_KINDS doubles) accumulates seconds per kind of kernel.
 */
int heron_decoder_forward(const Kernels *k, const Model *m, const Batch *b, void *scratch,
                          void *out, int nthreads, double *timings) {
    const int64_t T = b->num_tokens, H = m->hidden, D = m->head_dim, es = esize(m);
    const int64_t q_size = m->num_heads * D, kv_size = m->num_kv_heads * D;
    const int64_t qkv_n = q_size + 2 * kv_size, I = m->intermediate;
    const int dt = m->dtype;
    if (T <= 0 || !k->linear || !k->rms_norm || !k->rotary || !k->silu_and_mul || !k->attention)
        return E_ARGS;
    for (int64_t t = 0; t < T; t++) {
        if (b->token_ids[t] < 0 || b->token_ids[t] >= m->vocab) return E_TOKEN;
        if (b->positions[t] < 0 || b->positions[t] >= m->max_positions) return E_POSITION;
    }
    char *p = scratch;
    char *x = p;        p += T * H * es;         /* the layer's output (mlp) */
    char *res = p;      p += T * H * es;         /* the residual stream */
    char *h = p;        p += T * H * es;         /* normed input of attention or mlp */
    char *qkv = p;      p += T * qkv_n * es;
    char *attn = p;     p += T * q_size * es;
    char *gu = p;       p += T * 2 * I * es;
    char *act = p;

    double last = timings ? clock_s() : 0;
    for (int64_t t = 0; t < T; t++)
        memcpy(res + t * H * es, (const char *)m->embed + b->token_ids[t] * H * es, H * es);
    for (int64_t l = 0; l < m->num_layers; l++) {
        const Layer *L = &m->layers[l];
        /* layer 0 norms the embeddings; later layers add their input to the residual first */
        if (l == 0)
            k->rms_norm(res, H, NULL, 0, L->input_norm, h, H, T, H, m->eps, dt, nthreads);
        else
            k->rms_norm(x, H, res, H, L->input_norm, h, H, T, H, m->eps, dt, nthreads);
        charge(timings, T_OTHER, &last);
        if (run_linear(k, &L->qkv, h, H, qkv, qkv_n, T, qkv_n, H, dt, nthreads))
            return E_LINEAR;
        charge(timings, T_LINEAR, &last);
        k->rotary(qkv, qkv_n, T, m->num_heads + m->num_kv_heads, D, b->positions, m->rope, dt,
                  nthreads);
        charge(timings, T_OTHER, &last);
        int rc = k->attention(qkv, qkv_n, qkv + q_size * es, qkv_n, qkv + (q_size + kv_size) * es,
                              qkv_n, attn, L->kv_cache, m->num_blocks, b->query_start_loc,
                              b->seq_lens, b->block_tables, b->bt_stride, b->max_blocks,
                              b->slot_mapping, b->num_seqs, (int)T, (int)m->num_heads,
                              (int)m->num_kv_heads, (int)D, (int)m->block_size, dt, m->kv_dtype,
                              m->scale, m->k_scale, m->v_scale, nthreads, ATTEND_AND_WRITE);
        if (rc) return rc;
        charge(timings, T_ATTENTION, &last);
        if (run_linear(k, &L->o, attn, q_size, x, H, T, H, q_size, dt, nthreads))
            return E_LINEAR;
        charge(timings, T_LINEAR, &last);
        k->rms_norm(x, H, res, H, L->post_norm, h, H, T, H, m->eps, dt, nthreads);
        charge(timings, T_OTHER, &last);
        if (run_linear(k, &L->gate_up, h, H, gu, 2 * I, T, 2 * I, H, dt, nthreads))
            return E_LINEAR;
        charge(timings, T_LINEAR, &last);
        k->silu_and_mul(gu, 2 * I, act, I, T, I, dt, nthreads);
        charge(timings, T_OTHER, &last);
        if (run_linear(k, &L->down, act, I, x, H, T, H, I, dt, nthreads))
            return E_LINEAR;
        charge(timings, T_LINEAR, &last);
    }
    k->rms_norm(x, H, res, H, m->final_norm, out, H, T, H, m->eps, dt, nthreads);
    charge(timings, T_OTHER, &last);
    return 0;
}
