/* be_cpu_hydra.c - the CPU backend's HydraLoRA ops: segmented shrink [h; l] = [A; R] x,
 * float32 softmax gate z = g (x) h, and expand y += s * Bcat z, split over the be_cpu pool.
 * Adapter matrices are stored as fp16 with the CUDA backend's power-of-two factors (half the
 * bytes a decode step reads: the op is memory bound), or as fp32 in precise mode
 * (HY_CPU_PRECISE=1), the reference the CUDA kernels are tested against. No model or
 * adapter-file logic here. */
#include "engine/be_cpu.h"
#include "engine/hy.h"
#include "engine/quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* fp16 storage: each of A, R and B is multiplied by its own power of two (q_f16_pow2) before
 * rounding, so that neither large weights overflow nor small ones sink into fp16's subnormals;
 * the op undoes the factors exactly: router logits times l_mul, the expand sum times out_mul.
 * Same rule as kernels/cuda_hydra.cu, so both backends hold identical adapter values.
 * fp32 storage (precise mode): l_mul = 1, out_mul = scale, same arithmetic as before fp16. */
struct be_lora {
    int r, K, rows;   /* rows = r + (K > 1 ? K : 0) */
    int64_t in, out;
    bool f16;         /* AR and Bcat are uint16_t fp16, else float */
    float l_mul;      /* 1 / R's factor */
    float out_mul;    /* scale / (A's factor * B's factor) */
    void *AR;         /* [rows][in]: A then R */
    void *Bcat;       /* [out][K * r]: row o = B_0[o] | B_1[o] | ... */
};

static void lora_fill_f16(be_lora *l, const float *A, const float *R, const float *const *B, float scale)
{
    size_t r = (size_t)l->r, in = (size_t)l->in, kr = (size_t)l->K * r;
    uint16_t *ar = l->AR, *bc = l->Bcat;
    float fa = q_f16_pow2(&A, 1, r * in);
    float fr = l->K > 1 ? q_f16_pow2(&R, 1, (size_t)l->K * in) : 1.0f;
    float fb = q_f16_pow2(B, l->K, (size_t)l->out * r);
    l->l_mul = 1.0f / fr;
    l->out_mul = scale / fa / fb; /* powers of two: exact unless scale itself underflows */
    for (size_t i = 0; i < r * in; i++)
        ar[i] = q_f32_to_f16(A[i] * fa);
    if (l->K > 1)
        for (size_t i = 0; i < (size_t)l->K * in; i++)
            ar[r * in + i] = q_f32_to_f16(R[i] * fr);
    for (int64_t o = 0; o < l->out; o++)
        for (int k = 0; k < l->K; k++)
            for (size_t i = 0; i < r; i++)
                bc[(size_t)o * kr + (size_t)k * r + i] = q_f32_to_f16(B[k][(size_t)o * r + i] * fb);
}

static void lora_fill_f32(be_lora *l, const float *A, const float *R, const float *const *B, float scale)
{
    size_t r = (size_t)l->r, in = (size_t)l->in, kr = (size_t)l->K * r;
    float *ar = l->AR, *bc = l->Bcat;
    l->l_mul = 1.0f;
    l->out_mul = scale;
    memcpy(ar, A, r * in * sizeof(float));
    if (l->K > 1)
        memcpy(ar + r * in, R, (size_t)l->K * in * sizeof(float));
    for (int64_t o = 0; o < l->out; o++)
        for (int k = 0; k < l->K; k++)
            memcpy(bc + (size_t)o * kr + (size_t)k * r, B[k] + (size_t)o * r, r * sizeof(float));
}

/* The CPU's pack is the finished be_lora: it lives in host memory either way. */
struct be_lora_pack {
    be_lora *l;
};

/* Any thread: reads only the backend's precision flag, set at creation. */
int cpu_lora_pack(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                  const float *const *B, float scale, be_lora_pack **out_pack)
{
    *out_pack = NULL;
    if (r < 1 || K < 1 || in < 1 || out < 1 || !A || !B || (K > 1 && !R))
        return hy_err_set(HY_EINVAL, "lora_create: bad arguments (r %d, K %d, in %lld, out %lld)", r, K,
                          (long long)in, (long long)out);
    for (int k = 0; k < K; k++)
        if (!B[k])
            return hy_err_set(HY_EINVAL, "lora_create: B[%d] is NULL", k);
    bool f16 = !((be_cpu *)b)->precise;
    size_t esz = f16 ? sizeof(uint16_t) : sizeof(float);
    int rows = r + (K > 1 ? K : 0);
    size_t nar, nb, kr;
    if (hy_mul_size((size_t)rows, (size_t)in, &nar) || hy_mul_size((size_t)K, (size_t)r, &kr) ||
        hy_mul_size(kr, (size_t)out, &nb) || hy_mul_size(nar, esz, &nar) || hy_mul_size(nb, esz, &nb))
        return hy_err_set(HY_ELIMIT, "lora_create: matrices too large");
    be_lora_pack *p = calloc(1, sizeof *p);
    be_lora *l = p ? calloc(1, sizeof *l) : NULL;
    if (!l) {
        free(p);
        return hy_err_set(HY_ENOMEM, "lora_create: out of memory");
    }
    p->l = l;
    l->AR = malloc(nar);
    l->Bcat = malloc(nb);
    if (!l->AR || !l->Bcat) {
        cpu_lora_pack_free(b, p);
        return hy_err_set(HY_ENOMEM, "lora_create: out of memory for %zu bytes", nar + nb);
    }
    l->r = r;
    l->K = K;
    l->rows = rows;
    l->in = in;
    l->out = out;
    l->f16 = f16;
    if (f16)
        lora_fill_f16(l, A, R, B, scale);
    else
        lora_fill_f32(l, A, R, B, scale);
    *out_pack = p;
    return HY_OK;
}

int cpu_lora_adopt(be *b, be_lora_pack *p, be_lora **out_lora)
{
    (void)b;
    *out_lora = p->l;
    free(p);
    return HY_OK;
}

void cpu_lora_pack_free(be *b, be_lora_pack *p)
{
    if (p)
        cpu_lora_free(b, p->l);
    free(p);
}

/* fp16 unless the backend is in precise mode. *out_lora is freed with cpu_lora_free; the
 * caller's arrays are copied and may be freed on return. */
int cpu_lora_create(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                    const float *const *B, float scale, be_lora **out_lora)
{
    be_lora_pack *p;
    *out_lora = NULL;
    int rc = cpu_lora_pack(b, r, K, in, out, A, R, B, scale, &p);
    return rc ? rc : cpu_lora_adopt(b, p, out_lora);
}

void cpu_lora_free(be *b, be_lora *l)
{
    (void)b;
    if (!l)
        return;
    free(l->AR);
    free(l->Bcat);
    free(l);
}

/* Tokens of one segment handled together, so each adapter row read from memory serves up to
 * HYDRA_TILE tokens (a 8192-wide [A;R] does not stay in cache from one token to the next). */
#define HYDRA_TILE 8

/* ---- fp32 dot products (precise mode): a plain version the compiler can unroll, and an
 * AVX2+FMA one. */

static float dot_ref(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}
#endif

typedef float (*dot_fn)(const float *, const float *, int64_t);

static dot_fn pick_dot(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return dot_avx2;
#endif
    return dot_ref;
}

/* ---- fp16-weight dot products: one weight row w[0..n) against nt <= HYDRA_TILE activation
 * rows x + t * ldx, out[t] = sum_c w[c] x[t * ldx + c]; each stretch of the row is converted
 * once for the whole tile. fp32 products and sums. Picked by q_isa_get() (tests force each). */

typedef void (*dot16_fn)(const uint16_t *w, const float *x, size_t ldx, int nt, int64_t n, float *out);

static void dot16_ref(const uint16_t *w, const float *x, size_t ldx, int nt, int64_t n, float *out)
{
    float buf[256];
    for (int t = 0; t < nt; t++)
        out[t] = 0.0f;
    for (int64_t c0 = 0; c0 < n; c0 += 256) {
        int64_t len = HY_MIN((int64_t)256, n - c0);
        for (int64_t i = 0; i < len; i++)
            buf[i] = q_f16_to_f32(w[c0 + i]);
        for (int t = 0; t < nt; t++)
            out[t] += dot_ref(buf, x + (size_t)t * ldx + (size_t)c0, len);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HY_T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HY_T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define HY_INLINE static inline __attribute__((always_inline))

HY_INLINE HY_T_AVX2 __m256 h8_load(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

HY_INLINE HY_T_AVX2 float h8_sum(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* the columns past the last full vector */
HY_INLINE HY_T_AVX2 float dot16_tail(const uint16_t *w, const float *x, int64_t i, int64_t n)
{
    float s = 0.0f;
    for (; i < n; i++)
        s += _cvtsh_ss(w[i]) * x[i];
    return s;
}

/* Every kernel below sums each token's products in the same order whatever nt is and wherever
 * the token sits in the tile (two interleaved partial sums per vector lane, then the lanes, then
 * the scalar tail): a sequence's output must not depend on what else is in the batch. */

/* up to 4 tokens per pass: 8 accumulators and 2 weight vectors stay in the 16 ymm registers */
HY_INLINE HY_T_AVX2 void dot16_avx2_nt(const uint16_t *w, const float *x, size_t ldx, const int NT, int64_t n,
                                         float *out)
{
    __m256 a0[4], a1[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++)
        a0[t] = a1[t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = h8_load(w + i), v1 = h8_load(w + i + 8);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const float *xt = x + (size_t)t * ldx + (size_t)i;
            a0[t] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xt), a0[t]);
            a1[t] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xt + 8), a1[t]);
        }
    }
    if (i + 8 <= n) {
        __m256 v0 = h8_load(w + i);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            a0[t] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + (size_t)t * ldx + (size_t)i), a0[t]);
        i += 8;
    }
    for (int t = 0; t < NT; t++)
        out[t] = h8_sum(_mm256_add_ps(a0[t], a1[t])) + dot16_tail(w, x + (size_t)t * ldx, i, n);
}

HY_T_AVX2 static void dot16_avx2(const uint16_t *w, const float *x, size_t ldx, int nt, int64_t n, float *out)
{
    for (int t0 = 0; t0 < nt; t0 += 4) {
        const float *xt = x + (size_t)t0 * ldx;
        switch (HY_MIN(4, nt - t0)) {
        case 1: dot16_avx2_nt(w, xt, ldx, 1, n, out + t0); break;
        case 2: dot16_avx2_nt(w, xt, ldx, 2, n, out + t0); break;
        case 3: dot16_avx2_nt(w, xt, ldx, 3, n, out + t0); break;
        default: dot16_avx2_nt(w, xt, ldx, 4, n, out + t0); break;
        }
    }
}

HY_INLINE HY_T_AVX512 __m512 h16_load(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* all 8 tokens in one pass: 16 accumulators of the 32 zmm registers */
HY_INLINE HY_T_AVX512 void dot16_avx512_nt(const uint16_t *w, const float *x, size_t ldx, const int NT,
                                             int64_t n, float *out)
{
    __m512 a0[HYDRA_TILE], a1[HYDRA_TILE];
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++)
        a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 v0 = h16_load(w + i), v1 = h16_load(w + i + 16);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const float *xt = x + (size_t)t * ldx + (size_t)i;
            a0[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xt), a0[t]);
            a1[t] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xt + 16), a1[t]);
        }
    }
    if (i + 16 <= n) {
        __m512 v0 = h16_load(w + i);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++)
            a0[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + (size_t)t * ldx + (size_t)i), a0[t]);
        i += 16;
    }
    for (int t = 0; t < NT; t++)
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t])) + dot16_tail(w, x + (size_t)t * ldx, i, n);
}

HY_T_AVX512 static void dot16_avx512(const uint16_t *w, const float *x, size_t ldx, int nt, int64_t n, float *out)
{
    switch (nt) {
    case 1: dot16_avx512_nt(w, x, ldx, 1, n, out); return;
    case 2: dot16_avx512_nt(w, x, ldx, 2, n, out); return;
    case 3: dot16_avx512_nt(w, x, ldx, 3, n, out); return;
    case 4: dot16_avx512_nt(w, x, ldx, 4, n, out); return;
    case 5: dot16_avx512_nt(w, x, ldx, 5, n, out); return;
    case 6: dot16_avx512_nt(w, x, ldx, 6, n, out); return;
    case 7: dot16_avx512_nt(w, x, ldx, 7, n, out); return;
    default: dot16_avx512_nt(w, x, ldx, 8, n, out); return;
    }
}
#endif

/* q_isa_get() says AVX2 only where F16C and FMA exist too, AVX-512 only where AVX-512F does */
static dot16_fn pick_dot16(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    switch (q_isa_get()) {
    case Q_ISA_AVX512: return dot16_avx512;
    case Q_ISA_AVX2: return dot16_avx2;
    default: break;
    }
#endif
    return dot16_ref;
}

/* ---- the op */

/* One job over all segments. Tokens with an adapter are numbered 0..n_lt in batch order;
 * seg_lt[i] is the first such number of segment i. */
typedef struct {
    const float *x;
    int64_t in;
    float *y;
    int64_t out;
    const be_lora_seg *segs;
    int n_seg;
    const long *seg_lt;   /* [n_seg + 1] */
    const size_t *seg_z;  /* [n_seg] offset of the segment's first z row in zbuf */
    const size_t *seg_g;  /* [n_seg] offset into gbuf ((K + 1) floats per token) */
    long n_lt;
    float *hl;            /* [h; l] of every lora token: [n_lt][max_rows] */
    int max_rows;
    float *zbuf;          /* z: K*r floats per lora token */
    float *gbuf;          /* g_0..g_{K-1}, entropy per lora token */
    dot_fn dot;           /* fp32 adapters */
    dot16_fn dot16;       /* fp16 adapters */
} hydra_job;

/* The gate (be_gate.h, under the segment's control) and z = g (x) h for one token whose [h; l]
 * is in hl; g[K] = its entropy. */
static void hydra_gate(const be_lora *l, const be_gate_ctl *ctl, const float *hl, float *z, float *g)
{
    if (l->K == 1) {
        memcpy(z, hl, (size_t)l->r * sizeof(float));
        g[0] = 1.0f;
        g[1] = 0.0f;
        return;
    }
    g[l->K] = be_gate(hl + l->r, l->K, 1.0f, ctl, g);
    for (int k = 0; k < l->K; k++)
        for (int c = 0; c < l->r; c++)
            z[k * l->r + c] = g[k] * hl[c];
}

/* Rows [r0, r1) of [h; l] for nt tokens at x0 (hl row t of max_rows floats per token). */
static void shrink_rows(const hydra_job *j, const be_lora *l, const float *x0, int nt, long r0, long r1, float *hl)
{
    size_t in = (size_t)l->in, ldh = (size_t)j->max_rows;
    if (!l->f16) {
        for (long rw = r0; rw < r1; rw++) {
            const float *arow = (const float *)l->AR + (size_t)rw * in;
            for (int t = 0; t < nt; t++)
                hl[t * ldh + (size_t)rw] = j->dot(arow, x0 + (size_t)t * in, l->in);
        }
        return;
    }
    float o[HYDRA_TILE];
    for (long rw = r0; rw < r1; rw++) {
        j->dot16((const uint16_t *)l->AR + (size_t)rw * in, x0, in, nt, l->in, o);
        for (int t = 0; t < nt; t++)
            hl[t * ldh + (size_t)rw] = o[t];
    }
}

/* Shrink: every segment's rows of [A; R] split over the workers, each row read once per tile
 * of up to HYDRA_TILE tokens (so a decode step's single token still uses every worker). */
static void hydra_shrink(void *ctx, int ith, int nth)
{
    hydra_job *j = ctx;
    for (int s = 0; s < j->n_seg; s++) {
        const be_lora_seg *sg = &j->segs[s];
        const be_lora *l = sg->lora;
        if (!l)
            continue;
        long r0, r1;
        tp_split(l->rows, ith, nth, &r0, &r1);
        int n = sg->tok_end - sg->tok_begin;
        for (int i0 = 0; r0 < r1 && i0 < n; i0 += HYDRA_TILE) {
            const float *x0 = j->x + (size_t)(sg->tok_begin + i0) * (size_t)j->in;
            float *hl = j->hl + (size_t)(j->seg_lt[s] + i0) * (size_t)j->max_rows;
            shrink_rows(j, l, x0, HY_MIN(HYDRA_TILE, n - i0), r0, r1, hl);
        }
    }
}

/* Gate of every lora token (cheap: K exponentials and K r products each), on one thread. fp16
 * adapters' logits get R's factor back here; h keeps A's (out_mul takes it off). */
static void hydra_gates(const hydra_job *j)
{
    for (int s = 0; s < j->n_seg; s++) {
        const be_lora *l = j->segs[s].lora;
        if (!l)
            continue;
        long n = j->seg_lt[s + 1] - j->seg_lt[s];
        for (long i = 0; i < n; i++) {
            float *hl = j->hl + (size_t)(j->seg_lt[s] + i) * (size_t)j->max_rows;
            if (l->f16)
                for (int k = l->r; k < l->rows; k++)
                    hl[k] *= l->l_mul;
            float *z = j->zbuf + j->seg_z[s] + (size_t)i * (size_t)l->K * (size_t)l->r;
            float *g = j->gbuf + j->seg_g[s] + (size_t)i * (size_t)(l->K + 1);
            hydra_gate(l, j->segs[s].ctl, hl, z, g);
        }
    }
}

/* y rows tok0..tok0+nt, outputs [o0, o1) += om * Bcat z for the nt z rows at z0 (om: the lora's
 * out_mul times the segment's scale) */
static void expand_f16(const hydra_job *j, const be_lora *l, float om, const float *z0, int tok0, int nt, long o0,
                       long o1)
{
    size_t kr = (size_t)l->K * (size_t)l->r;
    const uint16_t *bc = l->Bcat;
    float acc[HYDRA_TILE];
    for (long o = o0; o < o1; o++) {
        j->dot16(bc + (size_t)o * kr, z0, kr, nt, (int64_t)kr, acc);
        for (int t = 0; t < nt; t++)
            j->y[(size_t)(tok0 + t) * (size_t)j->out + (size_t)o] += om * acc[t];
    }
}

/* Expand for a range of output rows, every segment. */
static void hydra_expand(void *ctx, int ith, int nth)
{
    hydra_job *j = ctx;
    long o0, o1;
    tp_split(j->out, ith, nth, &o0, &o1);
    for (int s = 0; s < j->n_seg; s++) {
        const be_lora_seg *sg = &j->segs[s];
        const be_lora *l = sg->lora;
        if (!l)
            continue;
        int64_t kr = (int64_t)l->K * l->r;
        const float om = l->out_mul * be_seg_scale(sg);
        const float *zs = j->zbuf + j->seg_z[s];
        int n = sg->tok_end - sg->tok_begin;
        /* token tiles keep the y rows being written few (column-order writes over 64 rows
         * thrashed the cache) while each Bcat row serves the whole tile */
        for (int i0 = 0; i0 < n; i0 += HYDRA_TILE) {
            int i1 = HY_MIN(n, i0 + HYDRA_TILE);
            if (l->f16) {
                expand_f16(j, l, om, zs + (size_t)i0 * (size_t)kr, sg->tok_begin + i0, i1 - i0, o0, o1);
                continue;
            }
            for (long o = o0; o < o1; o++) {
                const float *brow = (const float *)l->Bcat + (size_t)o * (size_t)kr;
                for (int i = i0; i < i1; i++)
                    j->y[(size_t)(sg->tok_begin + i) * (size_t)j->out + (size_t)o] +=
                        om * j->dot(brow, zs + (size_t)i * (size_t)kr, kr);
            }
        }
    }
}

static int hydra_check(int64_t in, int64_t out, const be_lora_seg *segs, int n_seg)
{
    int prev_end = 0;
    for (int s = 0; s < n_seg; s++) {
        const be_lora_seg *sg = &segs[s];
        if (sg->tok_begin < prev_end || sg->tok_end < sg->tok_begin)
            return hy_err_set(HY_EINVAL, "hydra: segment %d [%d, %d) is not sorted/disjoint", s, sg->tok_begin,
                              sg->tok_end);
        prev_end = sg->tok_end;
        if (sg->lora && (sg->lora->in != in || sg->lora->out != out))
            return hy_err_set(HY_EINVAL, "hydra: segment %d adapter is %lld x %lld, op is %lld x %lld", s,
                              (long long)sg->lora->out, (long long)sg->lora->in, (long long)out, (long long)in);
        if (sg->lora && !be_gate_ok(sg->ctl, sg->lora->K))
            return hy_err_set(HY_EINVAL, "hydra: segment %d has a router control that allows no head of %d", s,
                              sg->lora->K);
    }
    return HY_OK;
}

int cpu_hydra(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *segs, int n_seg)
{
    int rc = hydra_check(in, out, segs, n_seg);
    if (rc)
        return rc;
    if (n_seg <= 0)
        return HY_OK;
    tp_pool *pool = ((be_cpu *)b)->pool;
    long *seg_lt = calloc((size_t)n_seg + 1, sizeof *seg_lt);
    size_t *seg_z = calloc((size_t)n_seg, sizeof *seg_z);
    size_t *seg_g = calloc((size_t)n_seg, sizeof *seg_g);
    float *hl = NULL, *zbuf = NULL, *gbuf = NULL;
    double *acc = NULL;
    if (!seg_lt || !seg_z || !seg_g) {
        rc = hy_err_set(HY_ENOMEM, "hydra: out of memory");
        goto done;
    }
    long n_lt = 0;
    size_t nz = 0, ng = 0;
    int max_rows = 1, max_K = 1;
    double work = 0;
    for (int s = 0; s < n_seg; s++) {
        const be_lora *l = segs[s].lora;
        seg_lt[s] = n_lt;
        seg_z[s] = nz;
        seg_g[s] = ng;
        if (!l)
            continue;
        long n = segs[s].tok_end - segs[s].tok_begin;
        n_lt += n;
        nz += (size_t)n * (size_t)l->K * (size_t)l->r;
        ng += (size_t)n * (size_t)(l->K + 1);
        max_rows = HY_MAX(max_rows, l->rows);
        max_K = HY_MAX(max_K, l->K);
        work += (double)n * ((double)l->rows * (double)in + (double)l->K * l->r * (double)out);
    }
    seg_lt[n_seg] = n_lt;
    if (n_lt == 0)
        goto done;
    size_t nhl;
    if (hy_mul_size((size_t)n_lt, (size_t)max_rows, &nhl) || hy_mul_size(nhl, sizeof(float), &nhl)) {
        rc = hy_err_set(HY_ELIMIT, "hydra: %ld tokens x %d rows of scratch is too large", n_lt, max_rows);
        goto done;
    }
    hl = malloc(nhl);
    zbuf = malloc(nz * sizeof(float));
    gbuf = malloc(ng * sizeof(float));
    acc = malloc(((size_t)max_K + 1) * sizeof *acc);
    if (!hl || !zbuf || !gbuf || !acc) {
        rc = hy_err_set(HY_ENOMEM, "hydra: out of memory for %zu floats of scratch", nhl / sizeof(float) + nz + ng);
        goto done;
    }
    hydra_job j = {x, in, y, out, segs, n_seg, seg_lt, seg_z, seg_g, n_lt, hl, max_rows, zbuf, gbuf, pick_dot(),
                   pick_dot16()};
    /* Below this many multiply-adds waking the workers costs more than it saves. */
    tp_pool *use = work < 32768.0 ? NULL : pool;
    tp_run(use, hydra_shrink, &j);
    hydra_gates(&j);
    tp_run(use, hydra_expand, &j);
    /* Router statistics, summed in batch order on this thread (deterministic). */
    for (int s = 0; s < n_seg; s++) {
        const be_lora *l = segs[s].lora;
        if (!l || !segs[s].stats)
            continue;
        int K = l->K;
        for (int k = 0; k <= K; k++)
            acc[k] = 0.0;
        long n = segs[s].tok_end - segs[s].tok_begin;
        const float *g = gbuf + seg_g[s];
        for (long i = 0; i < n; i++)
            for (int k = 0; k <= K; k++)
                acc[k] += g[i * (K + 1) + k];
        for (int k = 0; k <= K; k++)
            segs[s].stats[k] += (float)acc[k];
    }
done:
    free(seg_lt);
    free(seg_z);
    free(seg_g);
    free(hl);
    free(zbuf);
    free(gbuf);
    free(acc);
    return rc;
}

int cpu_hydra_n(be *b, int n, const float *x, int64_t in, float *const *y, const int64_t *out,
                const be_lora_seg *const *segs, int n_seg)
{
    if (n < 1 || n > BE_MM_MAX || !y || !out || (n_seg > 0 && !segs))
        return hy_err_set(HY_EINVAL, "hydra: bad arguments (%d projections)", n);
    for (int i = 0; i < n; i++) { /* every projection checked before any y changes */
        int rc = n_seg > 0 && !segs[i] ? hy_err_set(HY_EINVAL, "hydra: projection %d has no segments", i)
                                       : hydra_check(in, out[i], n_seg > 0 ? segs[i] : NULL, n_seg);
        if (rc)
            return rc;
    }
    for (int i = 0; i < n; i++) {
        int rc = cpu_hydra(b, x, in, y[i], out[i], n_seg > 0 ? segs[i] : NULL, n_seg);
        if (rc)
            return rc;
    }
    return HY_OK;
}
