/* be_cpu.c - the CPU backend: every op of backend.h on host memory, split over a thread pool.
 * It is the reference the other backends are tested against; the HydraLoRA ops live in
 * be_cpu_hydra.c. It must not know about models, files or scheduling. Only the engine thread
 * calls it (its scratch buffers are not shared between callers). */
#include "be_cpu.h"
#include "hy.h"
#include "quant.h"
#include "vexp_avx2.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_X86 1
#define CPU_AVX2 __attribute__((target("avx2,fma,f16c")))
/* small constant-count loops over heads / columns: unrolled, their values stay in registers */
#define CPU_UNROLL _Pragma("GCC unroll 8")
#else
#define CPU_X86 0
#endif

/* Work below these sizes runs on the calling thread: waking the pool costs more. */
#define CPU_PAR_ELEMS 16384     /* element-wise ops: elements */
#define CPU_PAR_MACS 32768      /* matmul: multiply-adds */
#define CPU_PAR_ATTN 24576      /* attention: (positions x head_dim) summed over pairs */
#define CPU_MM_TOK_TILE 64      /* matmul: tokens per q_matmul_rows call */
#define CPU_MAX_HEAD_DIM 512
#define CPU_ATTN_GROUP 4        /* attention: query heads sharing one pass over a KV head */
#define CPU_ATTN_VCOLS 4        /* attention: most 8-wide V columns accumulated together */

typedef struct {
    be_cpu cpu;  /* must be first: be_cpu_hydra.c sees the backend as a be_cpu */
    int n_threads;
    /* quantised activations of the current matmul (grown, never shrunk) */
    void *act;
    size_t act_cap;
    /* W x of a matmul_n that adds into its output (grown, never shrunk) */
    void *mm_sum;
    size_t mm_sum_cap;
    /* RoPE cos/sin of the last call, reused while positions and frequencies repeat
     * (every layer of a step rotates q and k at the same positions). */
    float *rope_cs;       /* [n_tok][head_dim/2][2] */
    int32_t *rope_pos;    /* [n_tok] */
    float rope_freq[CPU_MAX_HEAD_DIM / 2];
    size_t rope_cap;      /* tokens */
    int rope_n_tok, rope_hd;
} cpu_ctx;

struct be_weight {
    uint32_t type;
    int64_t rows, cols;
    size_t row_bytes;
    const uint8_t *data; /* not owned: inside the caller's mapping */
    float *f32;          /* owned; precise mode only: the dequantised matrix */
};

static cpu_ctx *cpu_of(be *b) { return (cpu_ctx *)b; }

static bool cpu_use_avx2(void)
{
#if CPU_X86
    static int has = -1;
    if (has < 0)
        has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c");
    /* follow quant.c's forced ISA so tests can run the scalar paths too */
    return has && q_isa_get() != Q_ISA_SCALAR;
#else
    return false;
#endif
}

/* Grow *p (64-aligned, contents dropped) to hold at least `need` bytes. */
static int cpu_grow(void **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return HY_OK;
    size_t n = need + need / 4 + 64;
    n = (n + 63) & ~(size_t)63;
    void *q = aligned_alloc(64, n);
    if (!q)
        return hy_err_set(HY_ENOMEM, "out of memory (CPU scratch of %zu bytes)", n);
    free(*p);
    *p = q;
    *cap = n;
    return HY_OK;
}

/* ------------------------------------------------------------------ vector helpers */

#if CPU_X86
CPU_AVX2 static inline float v8_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ------------------------------------------------------------------ memory */

static int cpu_alloc(be *b, size_t bytes, void **out)
{
    size_t n = bytes ? bytes : 1;
    if (n > SIZE_MAX - 63) {
        *out = NULL;
        return hy_err_set(HY_ELIMIT, "allocation of %zu bytes is too large", bytes);
    }
    n = (n + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, n);
    if (!p) {
        *out = NULL;
        return hy_err_set(HY_ENOMEM, "out of memory allocating %zu bytes", bytes);
    }
    memset(p, 0, n);
    *out = p;
    return HY_OK;
}

static void cpu_free(be *b, void *p) { free(p); }

static int cpu_copy(be *b, void *dst, const void *src, size_t n)
{
    if (n)
        memcpy(dst, src, n);
    return HY_OK;
}

static int cpu_sync(be *b) { return HY_OK; }

/* ------------------------------------------------------------------ weights */

static int cpu_weight_create(be *b, uint32_t type, int64_t rows, int64_t cols, const void *data,
                             be_weight **out)
{
    *out = NULL;
    if (!q_supported(type))
        return hy_err_set(HY_EUNSUPPORTED, "tensor type %s is not supported", q_type_name(type));
    if (rows <= 0 || cols <= 0 || !data)
        return hy_err_set(HY_EINVAL, "bad weight shape %lld x %lld",
                          (long long)rows, (long long)cols);
    size_t rb;
    int rc = q_row_bytes(type, cols, &rb);
    if (rc)
        return rc;
    be_weight *w = calloc(1, sizeof *w);
    if (!w)
        return hy_err_set(HY_ENOMEM, "out of memory");
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = rb;
    w->data = data;
    if (cpu_of(b)->cpu.precise) {
        size_t n;
        if (hy_mul_size((size_t)rows, (size_t)cols, &n) || hy_mul_size(n, sizeof(float), &n) ||
            !(w->f32 = malloc(n))) {
            free(w);
            return hy_err_set(HY_ENOMEM, "out of memory (precise mode keeps fp32 weights)");
        }
        for (int64_t r = 0; r < rows; r++)
            q_dequant_row(type, w->data + (size_t)r * rb, w->f32 + (size_t)r * cols, cols);
    }
    *out = w;
    return HY_OK;
}

static void cpu_weight_free(be *b, be_weight *w)
{
    if (w)
        free(w->f32);
    free(w);
}

/* ------------------------------------------------------------------ matmul */

/* One matmul_n call: n weights of one type and width reading the same x. The row chunks of all
 * of them form one index space (weight i owns chunks [c0[i], c0[i + 1])). */
typedef struct {
    int n;
    const be_weight *const *w;
    float *const *y;
    const float *x;
    int n_tok;
    void *act;
    size_t act_row;
    int64_t row_step; /* rows per chunk, a multiple of 16 so y rows do not share lines */
    long c0[BE_MM_MAX + 1];
    atomic_long next; /* next chunk to take: workers that run late (a busy machine) take less */
} cpu_mm_job;

static void cpu_mm_quant_fn(void *ctx, int ith, int nth)
{
    cpu_mm_job *j = ctx;
    const be_weight *w = j->w[0];
    long t0, t1;
    tp_split(j->n_tok, ith, nth, &t0, &t1);
    if (t1 > t0)
        q_act_quantize(w->type, j->x + t0 * w->cols, w->cols, (int)(t1 - t0),
                       (uint8_t *)j->act + (size_t)t0 * j->act_row);
}

static void cpu_mm_rows_fn(void *ctx, int ith, int nth)
{
    cpu_mm_job *j = ctx;
    int i = 0;
    for (;;) {
        long c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (c >= j->c0[j->n])
            return;
        while (c >= j->c0[i + 1]) /* chunks are taken in ascending order */
            i++;
        const be_weight *w = j->w[i];
        int64_t r0 = (c - j->c0[i]) * j->row_step, r1 = HY_MIN(w->rows, r0 + j->row_step);
        for (int t0 = 0; t0 < j->n_tok; t0 += CPU_MM_TOK_TILE) {
            int nt = HY_MIN(CPU_MM_TOK_TILE, j->n_tok - t0);
            q_matmul_rows(w->type, w->data, w->cols,
                          (const uint8_t *)j->act + (size_t)t0 * j->act_row, nt,
                          j->y[i] + (int64_t)t0 * w->rows, w->rows, r0, r1);
        }
    }
}

static float cpu_dot_scalar(const float *a, const float *b, int64_t n)
{
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += a[i + k] * b[i + k];
    for (; i < n; i++)
        s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

#if CPU_X86
CPU_AVX2 static float cpu_dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = v8_hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}
#endif

static void cpu_mm_precise_fn(void *ctx, int ith, int nth)
{
    cpu_mm_job *j = ctx;
    const be_weight *w = j->w[0];
    float *y = j->y[0];
    int64_t r0 = ith * j->row_step, r1 = HY_MIN(w->rows, r0 + j->row_step);
    bool avx = cpu_use_avx2();
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = w->f32 + (size_t)r * w->cols;
        for (int t = 0; t < j->n_tok; t++) {
            const float *x = j->x + (size_t)t * w->cols;
#if CPU_X86
            float v = avx ? cpu_dot_avx2(wr, x, w->cols) : cpu_dot_scalar(wr, x, w->cols);
#else
            (void)avx;
            float v = cpu_dot_scalar(wr, x, w->cols);
#endif
            y[(size_t)t * w->rows + r] = v;
        }
    }
}

/* precise mode: fp32 weights, one weight at a time */
static void cpu_matmul_precise(cpu_ctx *c, const be_weight *w, const float *x, int n_tok, float *y)
{
    cpu_mm_job j = {.n = 1, .w = &w, .y = &y, .x = x, .n_tok = n_tok};
    int nth = tp_threads(c->cpu.pool);
    int64_t step = (w->rows + nth - 1) / nth;
    j.row_step = (step + 15) & ~(int64_t)15;
    tp_run(c->cpu.pool, cpu_mm_precise_fn, &j);
}

static int cpu_add(be *b, float *a, const float *x, int64_t n);
static int cpu_rmsnorm(be *b, const float *x, const float *w, int n_tok, int64_t dim, float eps, float *y);
static int cpu_swiglu(be *b, const float *gate, const float *up, int n_tok, int64_t dim, float *out);

/* matmul_n of x itself */
static int cpu_matmul_x(be *b, int n, const be_weight *const *w, const float *x, int n_tok,
                        float *const *y, bool add)
{
    cpu_ctx *c = cpu_of(b);
    if (n < 1 || n > BE_MM_MAX || n_tok < 0)
        return hy_err_set(HY_EINVAL, "matmul_n: bad arguments (n %d, n_tok %d)", n, n_tok);
    if (n_tok == 0)
        return HY_OK;
    if (add) { /* into a scratch buffer, then added: the row kernels only store */
        for (int i = 0; i < n; i++) {
            size_t e = (size_t)n_tok * (size_t)w[i]->rows;
            int rc = cpu_grow(&c->mm_sum, &c->mm_sum_cap, e * sizeof(float));
            float *sum = c->mm_sum;
            if (rc || (rc = cpu_matmul_x(b, 1, &w[i], x, n_tok, &sum, false)) ||
                (rc = cpu_add(b, y[i], sum, (int64_t)e)))
                return rc;
        }
        return HY_OK;
    }
    if (n == 1 && w[0]->f32) {
        cpu_matmul_precise(c, w[0], x, n_tok, y[0]);
        return HY_OK;
    }
    bool same = true;
    for (int i = 1; i < n; i++)
        same = same && w[i]->type == w[0]->type && w[i]->cols == w[0]->cols;
    if (w[0]->f32 || !same) { /* one at a time */
        for (int i = 0; i < n; i++) {
            int rc = cpu_matmul_x(b, 1, &w[i], x, n_tok, &y[i], false);
            if (rc)
                return rc;
        }
        return HY_OK;
    }
    cpu_mm_job j = {.n = n, .w = w, .y = y, .x = x, .n_tok = n_tok};
    j.act_row = q_act_row_bytes(w[0]->type, w[0]->cols);
    int rc = cpu_grow(&c->act, &c->act_cap, q_act_bytes(w[0]->type, w[0]->cols, n_tok));
    if (rc)
        return rc;
    j.act = c->act;
    int64_t rows = 0;
    for (int i = 0; i < n; i++)
        rows += w[i]->rows;
    double macs = (double)rows * (double)w[0]->cols * n_tok;
    tp_pool *pool = macs >= CPU_PAR_MACS ? c->cpu.pool : NULL;
    int nth = tp_threads(pool);
    if (n_tok >= 2 * nth && pool)
        tp_run(pool, cpu_mm_quant_fn, &j);
    else
        cpu_mm_quant_fn(&j, 0, 1);
    /* about 8 chunks per thread over all the rows, whole cache lines of y each */
    int64_t step = (rows + 8 * nth - 1) / (8 * nth);
    j.row_step = (step + 15) & ~(int64_t)15;
    j.c0[0] = 0;
    for (int i = 0; i < n; i++)
        j.c0[i + 1] = j.c0[i] + (long)((w[i]->rows + j.row_step - 1) / j.row_step);
    atomic_init(&j.next, 0);
    tp_run(pool, cpu_mm_rows_fn, &j);
    return HY_OK;
}

/* the transform first (stored where in says), then the product of what was stored */
static int cpu_matmul_n(be *b, int n, const be_weight *const *w, const float *x, const be_mm_in *in,
                        int n_tok, float *const *y, bool add)
{
    int rc0 = be_mm_in_check(in, x);
    if (rc0)
        return rc0;
    if (in && in->kind != BE_IN_X) {
        if (n < 1 || n > BE_MM_MAX || !w[0])
            return hy_err_set(HY_EINVAL, "matmul_n: bad arguments (n %d)", n);
        int64_t cols = w[0]->cols;
        int rc = in->kind == BE_IN_RMSNORM ? cpu_rmsnorm(b, x, in->w, n_tok, cols, in->eps, in->out)
                                           : cpu_swiglu(b, x, in->up, n_tok, cols, in->out);
        if (rc)
            return rc;
        x = in->out;
    }
    return cpu_matmul_x(b, n, w, x, n_tok, y, add);
}

static int cpu_matmul(be *b, const be_weight *w, const float *x, int n_tok, float *y)
{
    return cpu_matmul_x(b, 1, &w, x, n_tok, &y, false);
}

/* ------------------------------------------------------------------ embedding */

static int cpu_embed(be *b, const be_weight *emb, const int32_t *ids, int n_tok, float *out)
{
    for (int t = 0; t < n_tok; t++) {
        if (ids[t] < 0 || ids[t] >= emb->rows)
            return hy_err_set(HY_EINVAL, "token id %d is outside the vocabulary (0..%lld)",
                              (int)ids[t], (long long)emb->rows - 1);
    }
    for (int t = 0; t < n_tok; t++)
        q_dequant_row(emb->type, emb->data + (size_t)ids[t] * emb->row_bytes,
                      out + (int64_t)t * emb->cols, emb->cols);
    return HY_OK;
}

/* ------------------------------------------------------------------ rmsnorm */

static float cpu_sumsq_scalar(const float *x, int64_t n)
{
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += x[i + k] * x[i + k];
    for (; i < n; i++)
        s[0] += x[i] * x[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

#if CPU_X86
CPU_AVX2 static float cpu_sumsq_avx2(const float *x, int64_t n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    float s = v8_hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++)
        s += x[i] * x[i];
    return s;
}
#endif

typedef struct {
    const float *x, *w;
    float *y;
    int n_tok;
    int64_t dim;
    float eps;
} cpu_norm_job;

static void cpu_norm_fn(void *ctx, int ith, int nth)
{
    cpu_norm_job *j = ctx;
    long t0, t1;
    tp_split(j->n_tok, ith, nth, &t0, &t1);
    bool avx = cpu_use_avx2();
    for (long t = t0; t < t1; t++) {
        const float *x = j->x + t * j->dim;
        float *y = j->y + t * j->dim;
        float ss;
#if CPU_X86
        ss = avx ? cpu_sumsq_avx2(x, j->dim) : cpu_sumsq_scalar(x, j->dim);
#else
        (void)avx;
        ss = cpu_sumsq_scalar(x, j->dim);
#endif
        float scale = 1.0f / sqrtf(ss / (float)j->dim + j->eps);
        for (int64_t i = 0; i < j->dim; i++)
            y[i] = x[i] * scale * j->w[i];
    }
}

static int cpu_rmsnorm(be *b, const float *x, const float *w, int n_tok, int64_t dim, float eps,
                       float *y)
{
    cpu_norm_job j = {.x = x, .w = w, .y = y, .n_tok = n_tok, .dim = dim, .eps = eps};
    bool par = n_tok > 1 && (double)n_tok * dim >= CPU_PAR_ELEMS;
    tp_run(par ? cpu_of(b)->cpu.pool : NULL, cpu_norm_fn, &j);
    return HY_OK;
}

/* ------------------------------------------------------------------ rope */

typedef struct {
    cpu_ctx *c;
    float *x;
    int n_tok, n_heads, head_dim;
    bool fill; /* compute the cos/sin table too */
    const int32_t *pos;
    const float *freq;
} cpu_rope_job;

static void cpu_rope_fn(void *ctx, int ith, int nth)
{
    cpu_rope_job *j = ctx;
    int half = j->head_dim / 2;
    long t0, t1;
    tp_split(j->n_tok, ith, nth, &t0, &t1);
    for (long t = t0; t < t1; t++) {
        float *cs = j->c->rope_cs + (size_t)t * half * 2;
        if (j->fill) {
            for (int i = 0; i < half; i++) {
                double a = (double)j->pos[t] * (double)j->freq[i];
                cs[2 * i] = (float)cos(a);
                cs[2 * i + 1] = (float)sin(a);
            }
        }
        float *row = j->x + (size_t)t * j->n_heads * j->head_dim;
        for (int h = 0; h < j->n_heads; h++) {
            float *v = row + (size_t)h * j->head_dim;
            for (int i = 0; i < half; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1];
                float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c - x1 * s;
                v[2 * i + 1] = x0 * s + x1 * c;
            }
        }
    }
}

static int cpu_rope(be *b, float *x, const int32_t *pos, int n_tok, int n_heads, int head_dim,
                    const float *freq)
{
    cpu_ctx *c = cpu_of(b);
    if (head_dim <= 0 || head_dim % 2 || head_dim > CPU_MAX_HEAD_DIM)
        return hy_err_set(HY_EINVAL, "rope: head_dim %d must be even and at most %d", head_dim,
                          CPU_MAX_HEAD_DIM);
    if (n_tok <= 0)
        return HY_OK;
    int half = head_dim / 2;
    cpu_rope_job j = {.c = c, .x = x, .n_tok = n_tok, .n_heads = n_heads, .head_dim = head_dim,
                      .pos = pos, .freq = freq};
    j.fill = !(c->rope_n_tok == n_tok && c->rope_hd == head_dim &&
               !memcmp(c->rope_pos, pos, (size_t)n_tok * sizeof *pos) &&
               !memcmp(c->rope_freq, freq, (size_t)half * sizeof *freq));
    if (j.fill) {
        if ((size_t)n_tok > c->rope_cap) {
            size_t cap = (size_t)n_tok + 64;
            float *cs = malloc(cap * CPU_MAX_HEAD_DIM * sizeof *cs);
            int32_t *p = malloc(cap * sizeof *p);
            if (!cs || !p) {
                free(cs);
                free(p);
                return hy_err_set(HY_ENOMEM, "out of memory (rope table)");
            }
            free(c->rope_cs);
            free(c->rope_pos);
            c->rope_cs = cs;
            c->rope_pos = p;
            c->rope_cap = cap;
        }
        c->rope_n_tok = 0; /* invalid until filled */
    }
    bool par = (double)n_tok * n_heads * head_dim >= CPU_PAR_ELEMS;
    tp_run(par ? c->cpu.pool : NULL, cpu_rope_fn, &j);
    if (j.fill) {
        memcpy(c->rope_pos, pos, (size_t)n_tok * sizeof *pos);
        memcpy(c->rope_freq, freq, (size_t)half * sizeof *freq);
        c->rope_n_tok = n_tok;
        c->rope_hd = head_dim;
    }
    return HY_OK;
}

/* ------------------------------------------------------------------ add, swiglu */

typedef struct {
    float *a;
    const float *x, *gate, *up;
    float *out;
    int64_t n;
} cpu_ew_job;

static void cpu_add_fn(void *ctx, int ith, int nth)
{
    cpu_ew_job *j = ctx;
    long i0, i1;
    tp_split(j->n, ith, nth, &i0, &i1);
    for (long i = i0; i < i1; i++)
        j->a[i] += j->x[i];
}

static int cpu_add(be *b, float *a, const float *x, int64_t n)
{
    cpu_ew_job j = {.a = a, .x = x, .n = n};
    tp_run(n >= 4 * CPU_PAR_ELEMS ? cpu_of(b)->cpu.pool : NULL, cpu_add_fn, &j);
    return HY_OK;
}

#if CPU_X86
CPU_AVX2 static void cpu_swiglu_avx2(const float *g, const float *u, float *o, long n)
{
    long i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = hy_v8_exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++)
        o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
#endif

static void cpu_swiglu_fn(void *ctx, int ith, int nth)
{
    cpu_ew_job *j = ctx;
    long i0, i1;
    tp_split(j->n / 8, ith, nth, &i0, &i1);
    i0 *= 8;
    i1 = ith == nth - 1 ? j->n : i1 * 8;
#if CPU_X86
    if (cpu_use_avx2()) {
        cpu_swiglu_avx2(j->gate + i0, j->up + i0, j->out + i0, i1 - i0);
        return;
    }
#endif
    for (long i = i0; i < i1; i++)
        j->out[i] = j->gate[i] / (1.0f + expf(-j->gate[i])) * j->up[i];
}

static int cpu_swiglu(be *b, const float *gate, const float *up, int n_tok, int64_t dim,
                      float *out)
{
    cpu_ew_job j = {.gate = gate, .up = up, .out = out, .n = (int64_t)n_tok * dim};
    tp_run(j.n >= 2 * CPU_PAR_ELEMS ? cpu_of(b)->cpu.pool : NULL, cpu_swiglu_fn, &j);
    return HY_OK;
}

/* ------------------------------------------------------------------ paged KV + attention */

static int cpu_kv_alloc(be *b, int n_blocks, int n_kv_heads, int head_dim, void **k, void **v)
{
    *k = *v = NULL;
    size_t n;
    if (n_blocks <= 0 || n_kv_heads <= 0 || head_dim <= 0)
        return hy_err_set(HY_EINVAL, "bad KV cache shape");
    if (hy_mul_size((size_t)n_blocks * BE_KV_BLOCK, (size_t)n_kv_heads * head_dim, &n) ||
        hy_mul_size(n, sizeof(uint16_t), &n))
        return hy_err_set(HY_ELIMIT, "KV cache of %d blocks is too large", n_blocks);
    int rc = cpu_alloc(b, n, k);
    if (rc)
        return rc;
    rc = cpu_alloc(b, n, v);
    if (rc) {
        free(*k);
        *k = NULL;
    }
    return rc;
}

typedef struct {
    const be_attn_meta *m;
    const float *q;
    const uint16_t *kc, *vc;
    float *out;
    int n_heads, n_kv_heads, head_dim;
    float scale;
    bool avx;
} cpu_attn_job;

/* Scores of q against n cached keys starting at `slot` (contiguous within one block). */
static void cpu_attn_scores_scalar(const float *q, const uint16_t *k, size_t stride, int n, int hd,
                                   float scale, float *s)
{
    for (int j = 0; j < n; j++) {
        const uint16_t *kr = k + (size_t)j * stride;
        float acc = 0;
        for (int i = 0; i < hd; i++)
            acc += q[i] * q_f16_to_f32(kr[i]);
        s[j] = acc * scale;
    }
}

/* One (token, head) pair over the sequence's blocks; online softmax in fp32. */
static void cpu_attn_pair_scalar(const cpu_attn_job *j, int t, int h)
{
    const be_attn_meta *m = j->m;
    int hd = j->head_dim, kvh = h / (j->n_heads / j->n_kv_heads);
    size_t stride = (size_t)j->n_kv_heads * hd;
    const float *q = j->q + ((size_t)t * j->n_heads + h) * hd;
    float *o = j->out + ((size_t)t * j->n_heads + h) * hd;
    const int32_t *bt = m->block_table + (size_t)m->tok_seq[t] * m->max_blocks;
    int n_pos = m->pos[t] + 1;
    float acc[CPU_MAX_HEAD_DIM], s[BE_KV_BLOCK];
    float mx = -INFINITY, l = 0;
    memset(acc, 0, sizeof(float) * hd);
    for (int p0 = 0; p0 < n_pos; p0 += BE_KV_BLOCK) {
        int n = HY_MIN(BE_KV_BLOCK, n_pos - p0);
        size_t base = ((size_t)bt[p0 / BE_KV_BLOCK] * BE_KV_BLOCK) * stride + (size_t)kvh * hd;
        cpu_attn_scores_scalar(q, j->kc + base, stride, n, hd, j->scale, s);
        float bm = s[0];
        for (int i = 1; i < n; i++)
            bm = s[i] > bm ? s[i] : bm;
        if (bm > mx) {
            float c = expf(mx - bm);
            l *= c;
            for (int i = 0; i < hd; i++)
                acc[i] *= c;
            mx = bm;
        }
        for (int jj = 0; jj < n; jj++) {
            float w = expf(s[jj] - mx);
            l += w;
            const uint16_t *vr = j->vc + base + (size_t)jj * stride;
            for (int i = 0; i < hd; i++)
                acc[i] += w * q_f16_to_f32(vr[i]);
        }
    }
    for (int i = 0; i < hd; i++)
        o[i] = acc[i] / l;
}

#if CPU_X86
/* Softmax bookkeeping of one block for one head: turn its scores s[0..n) into weights
 * (in place, padding zeroed), rescaling acc[0..nv) and *l when the running max grows. */
CPU_AVX2 static void cpu_attn_block_softmax(float *s, int n, int nv, __m256 *acc, float *mx,
                                            float *l)
{
    float bm = -INFINITY;
    for (int jj = 0; jj < n; jj++)
        bm = s[jj] > bm ? s[jj] : bm;
    for (int jj = n; jj < BE_KV_BLOCK; jj++)
        s[jj] = -INFINITY;
    if (bm > *mx) {
        __m256 c = _mm256_set1_ps(expf(*mx - bm));
        *l *= expf(*mx - bm);
        for (int i = 0; i < nv; i++)
            acc[i] = _mm256_mul_ps(acc[i], c);
        *mx = bm;
    }
    __m256 vm = _mm256_set1_ps(*mx);
    __m256 e0 = hy_v8_exp(_mm256_sub_ps(_mm256_load_ps(s), vm));
    __m256 e1 = hy_v8_exp(_mm256_sub_ps(_mm256_load_ps(s + 8), vm));
    /* v8_exp clamps: zero the padding explicitly */
    if (n < BE_KV_BLOCK) {
        __m256i idx0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i nn = _mm256_set1_epi32(n);
        e0 = _mm256_and_ps(e0, _mm256_castsi256_ps(_mm256_cmpgt_epi32(nn, idx0)));
        e1 = _mm256_and_ps(e1, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                   nn, _mm256_add_epi32(idx0, _mm256_set1_epi32(8)))));
    }
    _mm256_store_ps(s, e0);
    _mm256_store_ps(s + 8, e1);
    *l += v8_hsum(_mm256_add_ps(e0, e1));
}

/* acc[g][i0 .. i0+w) += the block's n weighted V rows, rows in order for every element (as
 * the scalar pair adds them); w columns at once keep w * ng independent FMA chains. */
CPU_AVX2 static inline __attribute__((always_inline)) void
cpu_attn_v_cols(const uint16_t *vb, size_t stride, int n, int i0, int w, int ng,
                float s[][BE_KV_BLOCK], __m256 acc[][CPU_MAX_HEAD_DIM / 8])
{
    __m256 a[CPU_ATTN_GROUP][CPU_ATTN_VCOLS];
    CPU_UNROLL
    for (int g = 0; g < ng; g++)
        CPU_UNROLL
        for (int c = 0; c < w; c++)
            a[g][c] = acc[g][i0 + c];
    for (int jj = 0; jj < n; jj++) {
        const uint16_t *vr = vb + (size_t)jj * stride + 8 * i0;
        __m256 vf[CPU_ATTN_VCOLS];
        CPU_UNROLL
        for (int c = 0; c < w; c++)
            vf[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vr + 8 * c)));
        CPU_UNROLL
        for (int g = 0; g < ng; g++) {
            __m256 wv = _mm256_set1_ps(s[g][jj]);
            CPU_UNROLL
            for (int c = 0; c < w; c++)
                a[g][c] = _mm256_fmadd_ps(wv, vf[c], a[g][c]);
        }
    }
    CPU_UNROLL
    for (int g = 0; g < ng; g++)
        CPU_UNROLL
        for (int c = 0; c < w; c++)
            acc[g][i0 + c] = a[g][c];
}

/* Query heads h0 .. h0+ng-1 (ng <= CPU_ATTN_GROUP, all reading KV head kvh) of token t, for
 * head_dim % 8 == 0: each K/V row is converted from fp16 once for the whole group. Per head
 * the arithmetic is that of the scalar pair in vector form (F16C, FMA, vector exp), and each
 * head's sums run in the same order whatever ng is, so a head's result does not depend on
 * how heads are grouped or on the rest of the batch. */
CPU_AVX2 static inline __attribute__((always_inline)) void
cpu_attn_group_body(const cpu_attn_job *j, int t, int kvh, int h0, int ng)
{
    const be_attn_meta *m = j->m;
    int hd = j->head_dim, nv = hd / 8;
    size_t stride = (size_t)j->n_kv_heads * hd;
    const int32_t *bt = m->block_table + (size_t)m->tok_seq[t] * m->max_blocks;
    int n_pos = m->pos[t] + 1;
    __m256 acc[CPU_ATTN_GROUP][CPU_MAX_HEAD_DIM / 8], qv[CPU_ATTN_GROUP][CPU_MAX_HEAD_DIM / 8];
    float s[CPU_ATTN_GROUP][BE_KV_BLOCK] __attribute__((aligned(32)));
    float mx[CPU_ATTN_GROUP], l[CPU_ATTN_GROUP];
    CPU_UNROLL
    for (int g = 0; g < ng; g++) {
        const float *q = j->q + ((size_t)t * j->n_heads + h0 + g) * hd;
        for (int i = 0; i < nv; i++) {
            acc[g][i] = _mm256_setzero_ps();
            qv[g][i] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * i), _mm256_set1_ps(j->scale));
        }
        mx[g] = -INFINITY;
        l[g] = 0;
    }
    for (int p0 = 0; p0 < n_pos; p0 += BE_KV_BLOCK) {
        int n = HY_MIN(BE_KV_BLOCK, n_pos - p0);
        size_t base = ((size_t)bt[p0 / BE_KV_BLOCK] * BE_KV_BLOCK) * stride + (size_t)kvh * hd;
        for (int jj = 0; jj < n; jj++) {
            const uint16_t *kr = j->kc + base + (size_t)jj * stride;
            __m256 d[CPU_ATTN_GROUP];
            CPU_UNROLL
            for (int g = 0; g < ng; g++)
                d[g] = _mm256_setzero_ps();
            for (int i = 0; i < nv; i++) {
                __m256 kf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + 8 * i)));
                CPU_UNROLL
                for (int g = 0; g < ng; g++)
                    d[g] = _mm256_fmadd_ps(qv[g][i], kf, d[g]);
            }
            CPU_UNROLL
            for (int g = 0; g < ng; g++)
                s[g][jj] = v8_hsum(d[g]);
        }
        CPU_UNROLL
        for (int g = 0; g < ng; g++)
            cpu_attn_block_softmax(s[g], n, nv, acc[g], &mx[g], &l[g]);
        const uint16_t *vb = j->vc + base;
        int i = 0;
        /* about eight independent FMA chains whatever ng is */
        int w = ng <= 2 ? CPU_ATTN_VCOLS : CPU_ATTN_VCOLS / 2;
        for (; i + w <= nv; i += w)
            cpu_attn_v_cols(vb, stride, n, i, w, ng, s, acc);
        for (; i < nv; i++)
            cpu_attn_v_cols(vb, stride, n, i, 1, ng, s, acc);
    }
    CPU_UNROLL
    for (int g = 0; g < ng; g++) {
        float *o = j->out + ((size_t)t * j->n_heads + h0 + g) * hd;
        __m256 inv = _mm256_set1_ps(1.0f / l[g]);
        for (int i = 0; i < nv; i++)
            _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(acc[g][i], inv));
    }
}

/* The body with ng a constant, so that the per-head loops unroll and stay in registers. */
CPU_AVX2 static void cpu_attn_group_avx2(const cpu_attn_job *j, int t, int kvh, int h0, int ng)
{
    switch (ng) {
    case 1: cpu_attn_group_body(j, t, kvh, h0, 1); break;
    case 2: cpu_attn_group_body(j, t, kvh, h0, 2); break;
    case 3: cpu_attn_group_body(j, t, kvh, h0, 3); break;
    default: cpu_attn_group_body(j, t, kvh, h0, CPU_ATTN_GROUP); break;
    }
}
#endif

/* Work units: (token, KV head, chunk of up to CPU_ATTN_GROUP of its query heads). */
static void cpu_attn_fn(void *ctx, int ith, int nth)
{
    cpu_attn_job *j = ctx;
    int group = j->n_heads / j->n_kv_heads;
    /* Too few (token, KV head) units to keep every thread busy (a decode step): one unit per
     * query head instead. A head's arithmetic is the same in any chunk, so this choice does
     * not change results. */
    int gmax = (long)j->m->n_tok * j->n_kv_heads < 2L * nth ? 1 : CPU_ATTN_GROUP;
    int n_chunks = (group + gmax - 1) / gmax;
    long per_tok = (long)j->n_kv_heads * n_chunks;
    long n_units = (long)j->m->n_tok * per_tok;
    /* interleave units: in a causal prefill later tokens cost more */
    for (long u = ith; u < n_units; u += nth) {
        int t = (int)(u / per_tok), r = (int)(u % per_tok);
        int kvh = r / n_chunks, h0 = kvh * group + (r % n_chunks) * gmax;
        int ng = HY_MIN(gmax, (kvh + 1) * group - h0);
#if CPU_X86
        if (j->avx) {
            cpu_attn_group_avx2(j, t, kvh, h0, ng);
            continue;
        }
#endif
        for (int h = h0; h < h0 + ng; h++)
            cpu_attn_pair_scalar(j, t, h);
    }
}

static int cpu_attention(be *b, const be_attn_meta *m, float *q, float *k, const float *v,
                         void *k_cache, void *v_cache, int n_heads, int n_kv_heads, int head_dim,
                         const float *freq, float *out)
{
    if (head_dim <= 0 || head_dim > CPU_MAX_HEAD_DIM || n_kv_heads <= 0 ||
        n_heads % n_kv_heads)
        return hy_err_set(HY_EINVAL, "attention: bad shape (%d heads, %d kv heads, head_dim %d)",
                          n_heads, n_kv_heads, head_dim);
    size_t kvd = (size_t)n_kv_heads * head_dim;
    uint16_t *kc = k_cache, *vc = v_cache;
    double work = 0;
    for (int t = 0; t < m->n_tok; t++) {
        if (m->pos[t] < 0 || m->tok_seq[t] < 0 || m->tok_seq[t] >= m->n_seq ||
            m->pos[t] / BE_KV_BLOCK >= m->max_blocks || m->slot[t] < 0)
            return hy_err_set(HY_EINVAL, "attention: token %d has bad position/sequence/slot", t);
        work += (double)(m->pos[t] + 1) * head_dim * n_heads;
    }
    int rc;
    if (freq && ((rc = cpu_rope(b, q, m->pos, m->n_tok, n_heads, head_dim, freq)) ||
                 (rc = cpu_rope(b, k, m->pos, m->n_tok, n_kv_heads, head_dim, freq))))
        return rc;
    /* Write this step's keys and values first: tokens attend to earlier tokens of the step. */
    bool avx = cpu_use_avx2();
    for (int t = 0; t < m->n_tok; t++) {
        uint16_t *kd = kc + (size_t)m->slot[t] * kvd, *vd = vc + (size_t)m->slot[t] * kvd;
        const float *ks = k + (size_t)t * kvd, *vs = v + (size_t)t * kvd;
        for (size_t i = 0; i < kvd; i++) {
            kd[i] = q_f32_to_f16(ks[i]);
            vd[i] = q_f32_to_f16(vs[i]);
        }
    }
    cpu_attn_job j = {.m = m, .q = q, .kc = kc, .vc = vc, .out = out, .n_heads = n_heads,
                      .n_kv_heads = n_kv_heads, .head_dim = head_dim,
                      .scale = 1.0f / sqrtf((float)head_dim), .avx = avx && head_dim % 8 == 0};
    bool par = work >= CPU_PAR_ATTN && (long)m->n_tok * n_kv_heads > 1; /* units: see cpu_attn_fn */
    tp_run(par ? cpu_of(b)->cpu.pool : NULL, cpu_attn_fn, &j);
    return HY_OK;
}

/* ------------------------------------------------------------------ construction */

static void cpu_destroy(be *b)
{
    if (!b)
        return;
    cpu_ctx *c = cpu_of(b);
    tp_free(c->cpu.pool);
    free(c->act);
    free(c->mm_sum);
    free(c->rope_cs);
    free(c->rope_pos);
    free(c);
}

static const be_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .weight_create = cpu_weight_create,
    .weight_free = cpu_weight_free,
    .matmul = cpu_matmul,
    .matmul_n = cpu_matmul_n,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .kv_alloc = cpu_kv_alloc,
    .attention = cpu_attention,
    .lora_create = cpu_lora_create,
    .lora_free = cpu_lora_free,
    .lora_pack = cpu_lora_pack,
    .lora_adopt = cpu_lora_adopt,
    .lora_pack_free = cpu_lora_pack_free,
    .hydra = cpu_hydra_n,
};

/* n_threads <= 0: one worker per online core. *out is freed with (*out)->ops->destroy.
 * HY_CPU_PRECISE=1 in the environment selects fp32-activation matmuls (see cpu_ctx). */
int be_cpu_create(int n_threads, be **out)
{
    *out = NULL;
    cpu_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return hy_err_set(HY_ENOMEM, "out of memory creating the CPU backend");
    int rc = tp_create(n_threads, &c->cpu.pool);
    if (rc) {
        free(c);
        return rc;
    }
    c->cpu.base.ops = &cpu_ops;
    c->n_threads = tp_threads(c->cpu.pool);
    const char *prec = getenv("HY_CPU_PRECISE");
    c->cpu.precise = prec && prec[0] && strcmp(prec, "0");
    *out = &c->cpu.base;
    return HY_OK;
}
