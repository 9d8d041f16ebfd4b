/* test_backend_ops.c - every backend op on CUDA against the CPU backend (and, for matmul, an
 * fp64 reference built from q_dequant_row) on fresh random inputs each run; compared by
 * normalised mean squared error with a threshold per precision. SKIPs visibly without a GPU.
 * Seed: time of day unless HY_TEST_SEED is set; it is printed so a failure can be replayed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "tests/testutil.h"

#include "engine/backend.h"
#include "engine/gguf_write.h"
#include "engine/hy.h"
#include "engine/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Thresholds (NMSE = sum (a-b)^2 / sum b^2):
 *  - fp32 math on both sides (embed, rmsnorm, rope, add, swiglu): 1e-8 (measured ~1e-13)
 *  - hydra: the CUDA backend stores adapter weights in fp16 (each of A, R and B scaled by a power
 *    of two first, see kernels/cuda.h); lora_make gives both backends weights already rounded
 *    that way (fp16_store), so the two compute in fp32 on identical weights: 1e-8 as above.
 *    (Against unrounded fp32 weights the error has no useful bound: one token through a rank-1
 *    adapter whose A x cancels measured 1.04e-6.)
 *  - quantised mat-vec (n_tok <= 8, fp32 activations) vs the fp64 dequantised reference: 1e-6
 *  - cuBLAS with fp16 weights and fp16 activations vs the fp64 reference: 1e-5
 *  - any CUDA matmul vs the CPU backend, which quantises activations to 8 bit for quantised
 *    weights: 2e-4 (that quantisation alone measures 3e-5..5e-5 against fp64 on these inputs,
 *    so this is a 4x margin; fp32/fp16/bf16 weights: 1e-5)
 *  - attention with fp16 KV on both sides (identical fp16 caches): 1e-5 */
#define NMSE_F32 1e-8
#define NMSE_MV 1e-6
#define NMSE_F16 1e-5
#define NMSE_VS_CPU_Q 2e-4
#define NMSE_VS_CPU_F 1e-5
#define NMSE_ATTN 1e-5
#define NMSE_HYDRA NMSE_F32

static be *g_cpu, *g_gpu;
static char g_skip[512];
static uint64_t g_rng;
static int g_fake; /* HY_TEST_GPU_IS_CPU */

static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rnd_unif(void) { return (float)((double)(rnd_u64() >> 11) * 0x1p-53); } /* [0,1) */
static int rnd_int(int n) { return (int)(rnd_u64() % (uint64_t)n); }
static float rnd_gauss(void)
{
    /* u in (0, 1] computed in double: a float [0,1) draw can round up to 1.0f, and 1.0f plus
     * a small offset made logf positive and the sqrt NaN (seen as random NaN NMSEs) */
    double u = 1.0 - (double)(rnd_u64() >> 11) * 0x1p-53;
    float v = rnd_unif();
    return (float)sqrt(-2.0 * log(u)) * cosf(6.2831853f * v);
}
static float *rnd_vec(size_t n, float sd)
{
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = sd * rnd_gauss();
    return x;
}


#define NEED_GPU()                                                                                 \
    do {                                                                                           \
        if (!g_gpu) {                                                                              \
            printf("SKIP (no CUDA device): %s\n", g_skip);                                        \
            skip();                                                                                \
        }                                                                                          \
    } while (0)

#define CHECK_NMSE(what, val, thr)                                                                 \
    do {                                                                                           \
        double v_ = (val);                                                                         \
        if (!(v_ <= (thr))) {                                                                      \
            printf("FAIL %s: NMSE %.3g > %.1g\n", what, v_, (double)(thr));                        \
            fail();                                                                                \
        }                                                                                          \
    } while (0)

/* ---- device buffers on either backend ---- */

static void *dev_put(be *b, const void *host, size_t bytes)
{
    void *p = NULL;
    assert_int_equal(b->ops->alloc(b, bytes, &p), 0);
    if (host)
        assert_int_equal(b->ops->upload(b, p, host, bytes), 0);
    return p;
}

static void dev_get(be *b, void *host, const void *dev, size_t bytes)
{
    int rc = b->ops->download(b, host, dev, bytes);
    if (rc)
        printf("download failed: %s\n", hy_err_msg());
    assert_int_equal(rc, 0);
}

static int g_ok_rc;
#define OP(b, call)                                                                                \
    do {                                                                                           \
        g_ok_rc = (call);                                                                          \
        if (g_ok_rc)                                                                               \
            printf("%s op failed: %s\n", (b)->ops->name, hy_err_msg());                            \
        assert_int_equal(g_ok_rc, 0);                                                              \
    } while (0)

/* ---- random weights of any type ---- */

static void put_f16(uint8_t *p, float f)
{
    uint16_t h = q_f32_to_f16(f);
    memcpy(p, &h, 2);
}

/* rows x cols of `type` with values of roughly unit scale times sd. */
static void *rnd_weight(uint32_t type, int64_t rows, int64_t cols, float sd, size_t *bytes_out)
{
    size_t rb = 0;
    assert_int_equal(q_row_bytes(type, cols, &rb), 0);
    uint8_t *w = malloc(rb * (size_t)rows);
    assert_non_null(w);
    *bytes_out = rb * (size_t)rows;
    if (type == Q_BF16) {
        for (int64_t i = 0; i < rows * cols; i++) {
            float f = sd * rnd_gauss();
            uint32_t u;
            memcpy(&u, &f, 4);
            uint16_t h = (uint16_t)(u >> 16);
            memcpy(w + 2 * i, &h, 2);
        }
        return w;
    }
    if (type == Q_Q4_K || type == Q_Q6_K) {
        /* random block bytes with sane fp16 scales: every bit pattern is a valid block */
        size_t bb = q_block_bytes(type), nb = rb * (size_t)rows / bb;
        for (size_t i = 0; i < rb * (size_t)rows; i++)
            w[i] = (uint8_t)rnd_u64();
        for (size_t b = 0; b < nb; b++) {
            uint8_t *blk = w + b * bb;
            if (type == Q_Q4_K) {
                /* scale == min for every sub-block and dmin = 7.5 d: w = d*s*(q - 7.5), centred
                 * like real weights (an offset would make the 8-bit activations of the CPU
                 * reference look worse than they are) */
                float d = sd * 0.01f * (0.5f + rnd_unif());
                put_f16(blk, d);
                put_f16(blk + 2, 7.5f * d);
                uint8_t s6[8], *q = blk + 4;
                for (int j = 0; j < 8; j++)
                    s6[j] = (uint8_t)(1 + rnd_int(63));
                for (int j = 0; j < 4; j++) {
                    q[j] = (uint8_t)(s6[j] | ((s6[j + 4] >> 4) << 6));
                    q[j + 4] = (uint8_t)(s6[j] | ((s6[j + 4] >> 4) << 6));
                    q[j + 8] = (uint8_t)((s6[j + 4] & 0xf) | ((s6[j + 4] & 0xf) << 4));
                }
            } else {
                put_f16(blk + 208, sd * 0.003f * (rnd_unif() - 0.5f));
            }
        }
        return w;
    }
    float *f = rnd_vec((size_t)cols, sd);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++)
            f[c] = sd * rnd_gauss();
        assert_int_equal(gguf_w_quantize(type, f, w + rb * (size_t)r, cols), 0);
    }
    free(f);
    return w;
}

/* ---- setup ---- */

static int group_setup(void **state)
{
    (void)state;
    const char *s = getenv("HY_TEST_SEED");
    uint64_t seed = s && *s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    g_rng = seed;
    printf("test_backend_ops: seed %llu (HY_TEST_SEED=%llu replays it)\n", (unsigned long long)seed,
           (unsigned long long)seed);
    if (be_cpu_create(0, &g_cpu)) {
        printf("cannot create the CPU backend: %s\n", hy_err_msg());
        return -1;
    }
    if (getenv("HY_TEST_GPU_IS_CPU")) {
        /* harness self-check on machines without a GPU: a second CPU backend stands in */
        g_fake = 1;
        if (be_cpu_create(0, &g_gpu))
            return -1;
        printf("HY_TEST_GPU_IS_CPU: comparing the CPU backend with itself (harness check only)\n");
    } else if (be_cuda_create(0, &g_gpu)) {
        snprintf(g_skip, sizeof g_skip, "%s", hy_err_msg());
        g_gpu = NULL;
        printf("SKIP (no CUDA device): %s\n", g_skip);
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (g_gpu)
        g_gpu->ops->destroy(g_gpu);
    if (g_cpu)
        g_cpu->ops->destroy(g_cpu);
    return 0;
}

/* ---- matmul ---- */

static void check_matmul(uint32_t type, int64_t rows, int64_t cols, int n_tok)
{
    size_t wbytes;
    void *wh = rnd_weight(type, rows, cols, 0.05f, &wbytes);
    float *x = rnd_vec((size_t)n_tok * cols, 1.0f);
    /* fp64 reference from the CPU dequantiser */
    float *wf = malloc(sizeof(float) * (size_t)(rows * cols));
    float *ref = malloc(sizeof(float) * (size_t)(rows * n_tok));
    float *yc = malloc(sizeof(float) * (size_t)(rows * n_tok));
    float *yg = malloc(sizeof(float) * (size_t)(rows * n_tok));
    assert_true(wf && ref && yc && yg);
    size_t rb;
    assert_int_equal(q_row_bytes(type, cols, &rb), 0);
    for (int64_t r = 0; r < rows; r++)
        q_dequant_row(type, (const uint8_t *)wh + rb * (size_t)r, wf + r * cols, cols);
    for (int t = 0; t < n_tok; t++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0;
            for (int64_t c = 0; c < cols; c++)
                s += (double)wf[r * cols + c] * x[(size_t)t * cols + c];
            ref[(size_t)t * rows + r] = (float)s;
        }
    be *bs[2] = {g_cpu, g_gpu};
    float *outs[2] = {yc, yg};
    for (int i = 0; i < 2; i++) {
        be *b = bs[i];
        be_weight *w = NULL;
        OP(b, b->ops->weight_create(b, type, rows, cols, wh, &w));
        float *dx = dev_put(b, x, sizeof(float) * (size_t)(n_tok * cols));
        float *dy = dev_put(b, NULL, sizeof(float) * (size_t)(n_tok * rows));
        OP(b, b->ops->matmul(b, w, dx, n_tok, dy));
        dev_get(b, outs[i], dy, sizeof(float) * (size_t)(n_tok * rows));
        b->ops->free(b, dx);
        b->ops->free(b, dy);
        b->ops->weight_free(b, w);
    }
    const bool quant = type != Q_F32 && type != Q_F16 && type != Q_BF16;
    double e_ref = tu_nmse(yg, ref, (size_t)(rows * n_tok)), e_cpu = tu_nmse(yg, yc, (size_t)(rows * n_tok));
    double thr_ref = type == Q_F32 || type == Q_BF16 ? NMSE_F32 : quant && n_tok <= 8 ? NMSE_MV : NMSE_F16;
    printf("  matmul %-5s %5lld x %-5lld n_tok %3d: NMSE vs fp64 %.2e (<= %.0e), vs CPU %.2e\n",
           q_type_name(type), (long long)rows, (long long)cols, n_tok, e_ref, thr_ref, e_cpu);
    char what[96];
    snprintf(what, sizeof what, "matmul %s %lldx%lld n_tok %d vs fp64", q_type_name(type), (long long)rows,
             (long long)cols, n_tok);
    CHECK_NMSE(what, e_ref, g_fake && quant ? NMSE_VS_CPU_Q : thr_ref);
    snprintf(what, sizeof what, "matmul %s %lldx%lld n_tok %d vs CPU", q_type_name(type), (long long)rows,
             (long long)cols, n_tok);
    CHECK_NMSE(what, e_cpu, quant ? NMSE_VS_CPU_Q : NMSE_VS_CPU_F);
    free(wh);
    free(x);
    free(wf);
    free(ref);
    free(yc);
    free(yg);
}

static void test_matmul(void **state)
{
    (void)state;
    NEED_GPU();
    static const uint32_t types[] = {Q_F32, Q_F16, Q_BF16, Q_Q4_0, Q_Q4_1, Q_Q8_0, Q_Q4_K, Q_Q6_K};
    static const int toks[] = {1, 5, 8, 9, 64, 300};
    for (size_t ti = 0; ti < HY_ARRAY_LEN(types); ti++) {
        uint32_t t = types[ti];
        bool k = t == Q_Q4_K || t == Q_Q6_K;
        int64_t cols = k ? 512 : 96 + 32 * rnd_int(20); /* odd block counts included */
        for (size_t ni = 0; ni < HY_ARRAY_LEN(toks); ni++) {
            int64_t rows = 32 + rnd_int(300);
            check_matmul(t, rows, cols, toks[ni]);
        }
    }
    check_matmul(Q_Q4_1, 2048, 576, 1); /* a real decode shape */
}

/* matmul_n on each backend: bit-identical to that backend's separate matmul calls (the fused
 * CUDA launch computes every row as the single one does), and the GPU's within the matmul
 * threshold of the CPU's. Row counts whose blocks do not line up, 1 and 8 tokens (mat-vec),
 * 9 (cuBLAS: the loop), mixed types (the loop). */
static void check_matmul_n(const uint32_t *types, const int64_t *rows, int n, int64_t cols, int n_tok)
{
    void *wh[BE_MM_MAX];
    float *out[2][BE_MM_MAX];
    float *x = rnd_vec((size_t)n_tok * cols, 1.0f);
    for (int i = 0; i < n; i++)
        wh[i] = rnd_weight(types[i], rows[i], cols, 0.05f, &(size_t){0});
    be *bs[2] = {g_cpu, g_gpu};
    for (int bi = 0; bi < 2; bi++) {
        be *b = bs[bi];
        be_weight *w[BE_MM_MAX];
        float *dy[BE_MM_MAX], *dy1[BE_MM_MAX];
        float *dx = dev_put(b, x, sizeof(float) * (size_t)(n_tok * cols));
        for (int i = 0; i < n; i++) {
            OP(b, b->ops->weight_create(b, types[i], rows[i], cols, wh[i], &w[i]));
            dy[i] = dev_put(b, NULL, sizeof(float) * (size_t)(n_tok * rows[i]));
            dy1[i] = dev_put(b, NULL, sizeof(float) * (size_t)(n_tok * rows[i]));
            OP(b, b->ops->matmul(b, w[i], dx, n_tok, dy1[i]));
        }
        OP(b, b->ops->matmul_n(b, n, (const be_weight *const *)w, dx, NULL, n_tok, dy, false));
        /* add: onto a random y (a residual stream), within fp32 rounding of y + W x */
        float *base[BE_MM_MAX], *dya[BE_MM_MAX];
        for (int i = 0; i < n; i++) {
            base[i] = rnd_vec((size_t)(n_tok * rows[i]), 1.0f);
            dya[i] = dev_put(b, base[i], sizeof(float) * (size_t)(n_tok * rows[i]));
        }
        OP(b, b->ops->matmul_n(b, n, (const be_weight *const *)w, dx, NULL, n_tok, dya, true));
        for (int i = 0; i < n; i++) {
            size_t ny = (size_t)(n_tok * rows[i]);
            float *one = malloc(sizeof(float) * ny), *sum = malloc(sizeof(float) * ny);
            out[bi][i] = malloc(sizeof(float) * ny);
            dev_get(b, out[bi][i], dy[i], sizeof(float) * ny);
            dev_get(b, one, dy1[i], sizeof(float) * ny);
            dev_get(b, sum, dya[i], sizeof(float) * ny);
            if (memcmp(one, out[bi][i], sizeof(float) * ny))
                fail_msg("%s matmul_n: matrix %d of %d (%s %lldx%lld, %d tokens) differs from matmul", b->ops->name,
                         i, n, q_type_name(types[i]), (long long)rows[i], (long long)cols, n_tok);
            for (size_t j = 0; j < ny; j++)
                one[j] += base[i][j];
            CHECK_NMSE("matmul_n add", tu_nmse(sum, one, ny), 1e-12); /* fp32 adds: ~2^-48 */
            free(one);
            free(sum);
            free(base[i]);
            b->ops->free(b, dya[i]);
            b->ops->free(b, dy[i]);
            b->ops->free(b, dy1[i]);
            b->ops->weight_free(b, w[i]);
        }
        b->ops->free(b, dx);
    }
    /* vs the CPU pooled over the matrices: a 7-row matrix at one token alone is too few
     * outputs for a stable NMSE against the CPU's 8-bit activations (seen at 2.1e-4) */
    double num = 0, den = 0;
    bool any_q = false;
    for (int i = 0; i < n; i++) {
        for (int64_t j = 0; j < n_tok * rows[i]; j++) {
            double dd = (double)out[1][i][j] - out[0][i][j];
            num += dd * dd;
            den += (double)out[0][i][j] * out[0][i][j];
        }
        any_q = any_q || types[i] != Q_F16;
        free(out[0][i]);
        free(out[1][i]);
        free(wh[i]);
    }
    double e = den > 0 ? num / den : (num > 0 ? INFINITY : 0);
    printf("  matmul_n x%d %-5s rows %lld.. x %-5lld n_tok %3d: NMSE vs CPU %.2e\n", n, q_type_name(types[0]),
           (long long)rows[0], (long long)cols, n_tok, e);
    CHECK_NMSE("matmul_n vs CPU", e, any_q ? NMSE_VS_CPU_Q : NMSE_VS_CPU_F);
    free(x);
}

static void test_matmul_n(void **state)
{
    (void)state;
    NEED_GPU();
    static const uint32_t types[] = {Q_Q4_0, Q_Q4_1, Q_Q8_0, Q_Q4_K, Q_Q6_K};
    static const int toks[] = {1, 3, 8, 9};
    static const int64_t qkv[] = {2048, 512, 512}, odd[] = {33, 300, 7};
    for (size_t ti = 0; ti < HY_ARRAY_LEN(types); ti++) {
        const uint32_t t3[] = {types[ti], types[ti], types[ti]};
        for (size_t ni = 0; ni < HY_ARRAY_LEN(toks); ni++) {
            check_matmul_n(t3, qkv, 3, 2048, toks[ni]);
            check_matmul_n(t3, odd, 3, 512, toks[ni]);
            check_matmul_n(t3, odd, 2, 512, toks[ni]);
        }
    }
    static const uint32_t mixed[] = {Q_Q4_1, Q_Q8_0, Q_F16};
    check_matmul_n(mixed, odd, 3, 512, 1);
}

/* matmul_n with an input transform (the RMS norm or the SwiGLU before a projection), which the
 * CUDA row kernel fuses at mat-vec sizes and runs as a separate pass otherwise:
 * - the stored transform within fp32 rounding of the CPU's (NMSE_F32: sums in another order,
 *   expf of another library);
 * - the products within fp32 rounding of the GPU's plain matmul_n of the CPU's stored transform
 *   (1e-10 for the mat-vec kernels: the fused norm scales the reduced dot product instead of
 *   each input, ~1e-7 relative per output), and within the matmul bound of the CPU's (8-bit
 *   activations there). */
static void check_mm_in(be_in_kind kind, const uint32_t *types, const int64_t *rows, int n, int64_t cols, int n_tok,
                        bool add)
{
    const size_t nx = (size_t)n_tok * (size_t)cols;
    float *x = rnd_vec(nx, 2.0f), *up = rnd_vec(nx, 1.5f), *nw = rnd_vec((size_t)cols, 1.0f);
    void *wh[BE_MM_MAX];
    float *base[BE_MM_MAX], *yo[3][BE_MM_MAX], *xo[2];
    for (int i = 0; i < n; i++) {
        wh[i] = rnd_weight(types[i], rows[i], cols, 0.05f, &(size_t){0});
        base[i] = rnd_vec((size_t)n_tok * (size_t)rows[i], 1.0f);
    }
    be *bs[3] = {g_cpu, g_gpu, g_gpu}; /* run 2: the GPU's plain matmul_n of the CPU's transform */
    for (int bi = 0; bi < 3; bi++) {
        be *b = bs[bi];
        be_weight *w[BE_MM_MAX];
        float *dy[BE_MM_MAX];
        float *dx = dev_put(b, bi == 2 ? xo[0] : x, nx * 4), *dup = dev_put(b, up, nx * 4);
        float *dnw = dev_put(b, nw, (size_t)cols * 4), *dout = dev_put(b, NULL, nx * 4);
        for (int i = 0; i < n; i++) {
            OP(b, b->ops->weight_create(b, types[i], rows[i], cols, wh[i], &w[i]));
            dy[i] = dev_put(b, base[i], sizeof(float) * (size_t)n_tok * (size_t)rows[i]);
        }
        /* eps large enough (vs mean x^2 = 4/3) that a kernel dropping it fails */
        const be_mm_in in = {.kind = kind, .w = dnw, .eps = 0.25f, .up = dup, .out = dout};
        OP(b, b->ops->matmul_n(b, n, (const be_weight *const *)w, dx, bi == 2 ? NULL : &in, n_tok, dy, add));
        if (bi < 2) {
            xo[bi] = malloc(nx * 4);
            dev_get(b, xo[bi], dout, nx * 4);
        }
        for (int i = 0; i < n; i++) {
            size_t ny = (size_t)n_tok * (size_t)rows[i];
            yo[bi][i] = malloc(ny * 4);
            dev_get(b, yo[bi][i], dy[i], ny * 4);
            b->ops->free(b, dy[i]);
            b->ops->weight_free(b, w[i]);
        }
        b->ops->free(b, dx);
        b->ops->free(b, dup);
        b->ops->free(b, dnw);
        b->ops->free(b, dout);
    }
    double ex = tu_nmse(xo[1], xo[0], nx), ey = 0, ec = 0;
    for (int i = 0; i < n; i++) {
        size_t ny = (size_t)n_tok * (size_t)rows[i];
        ey = fmax(ey, tu_nmse(yo[1][i], yo[2][i], ny));
        ec = fmax(ec, tu_nmse(yo[1][i], yo[0][i], ny));
    }
    printf("  matmul_n x%d %-5s %-7s cols %5lld n_tok %2d%s: transform NMSE %.2e, product vs plain %.2e, vs CPU %.2e\n",
           n, q_type_name(types[0]), kind == BE_IN_RMSNORM ? "rmsnorm" : "swiglu", (long long)cols, n_tok,
           add ? " add" : "", ex, ey, ec);
    CHECK_NMSE("matmul_n transform", ex, NMSE_F32);
    /* cuBLAS (more than 8 tokens, fp16 weights) multiplies fp16 activations: a last-bit difference
     * in the transform flips a few of their roundings (2^-11 relative each; 1.7e-11 seen) */
    CHECK_NMSE("matmul_n transformed product vs plain", ey, n_tok > 8 || types[0] == Q_F16 ? 1e-8 : 1e-10);
    /* the CPU quantises the transformed input to 8 bits per block (Q4_K/Q6_K: 256-wide blocks).
     * Both transforms multiply two random factors (x / rms times w, silu(g) times u), which puts
     * more of a block's values far below its largest one (which sets the step) than the plain
     * matmul test's uniform inputs: measured up to 1.7e-4 (Q4_K, normed) and 3.3e-4 (Q6_K, SwiGLU)
     * where plain inputs give ~5e-5. The tight check is the one against plain above. */
    CHECK_NMSE("matmul_n transformed product vs CPU", ec, types[0] == Q_F16 ? NMSE_VS_CPU_F : 1e-3);
    for (int i = 0; i < n; i++) {
        for (int bi = 0; bi < 3; bi++)
            free(yo[bi][i]);
        free(wh[i]);
        free(base[i]);
    }
    free(xo[0]);
    free(xo[1]);
    free(x);
    free(up);
    free(nw);
}

static void test_matmul_in(void **state)
{
    (void)state;
    NEED_GPU();
    static const uint32_t q41[] = {Q_Q4_1, Q_Q4_1, Q_Q4_1}, q80[] = {Q_Q8_0, Q_Q8_0}, q6k[] = {Q_Q6_K},
                          f16[] = {Q_F16}, q40[] = {Q_Q4_0, Q_Q4_0}, q4k[] = {Q_Q4_K};
    static const int64_t qkv[] = {2048, 512, 512}, gu[] = {1536, 1536}, one[] = {576}, odd[] = {37},
                         ragged[] = {509, 7}; /* not multiples of a block's rows */
    static const int toks[] = {1, 3, 8, 9}; /* 9: past the mat-vec sizes (the separate pass) */
    for (size_t ti = 0; ti < HY_ARRAY_LEN(toks); ti++) {
        check_mm_in(BE_IN_RMSNORM, q41, qkv, 3, 2048, toks[ti], false);
        check_mm_in(BE_IN_RMSNORM, q80, gu, 2, 576, toks[ti], false);
        check_mm_in(BE_IN_SWIGLU, q41, one, 1, 1536, toks[ti], true);
    }
    check_mm_in(BE_IN_RMSNORM, q40, ragged, 2, 512, 1, true); /* with add */
    check_mm_in(BE_IN_SWIGLU, q40, ragged, 2, 256, 6, false);
    check_mm_in(BE_IN_RMSNORM, q4k, odd, 1, 512, 2, false);
    check_mm_in(BE_IN_SWIGLU, q4k, one, 1, 768, 1, true);
    check_mm_in(BE_IN_SWIGLU, q6k, one, 1, 512, 1, true);   /* a type the row kernel does not read */
    check_mm_in(BE_IN_RMSNORM, f16, odd, 1, 577, 2, false); /* odd width: the separate pass */
    check_mm_in(BE_IN_SWIGLU, f16, odd, 1, 577, 5, false);
    /* refused on both backends: a transform stored over its input, missing pointers, a bad kind */
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++) {
        be *b = bs[i];
        void *wh = rnd_weight(Q_Q4_1, 4, 64, 0.05f, &(size_t){0});
        be_weight *w = NULL;
        OP(b, b->ops->weight_create(b, Q_Q4_1, 4, 64, wh, &w));
        float *dx = dev_put(b, NULL, 64 * 4), *du = dev_put(b, NULL, 64 * 4), *dy = dev_put(b, NULL, 16);
        const be_mm_in bad[] = {{.kind = BE_IN_RMSNORM, .w = du, .eps = 1e-5f, .out = dx},
                                {.kind = BE_IN_SWIGLU, .up = du, .out = du},
                                {.kind = BE_IN_RMSNORM, .out = du},
                                {.kind = BE_IN_SWIGLU, .out = du},
                                {.kind = (be_in_kind)7, .w = du, .up = du, .out = dy}};
        for (size_t k = 0; k < HY_ARRAY_LEN(bad); k++)
            assert_int_equal(b->ops->matmul_n(b, 1, (const be_weight *const *)&w, dx, &bad[k], 1, &dy, false),
                             HY_EINVAL);
        b->ops->free(b, dx);
        b->ops->free(b, du);
        b->ops->free(b, dy);
        b->ops->weight_free(b, w);
        free(wh);
    }
}

/* ---- embed ---- */

static void test_embed(void **state)
{
    (void)state;
    NEED_GPU();
    static const uint32_t types[] = {Q_F32, Q_F16, Q_BF16, Q_Q4_0, Q_Q4_1, Q_Q8_0, Q_Q4_K, Q_Q6_K};
    static const int toks[] = {1, 5, 64, 300};
    for (size_t ti = 0; ti < HY_ARRAY_LEN(types); ti++) {
        uint32_t type = types[ti];
        int64_t cols = type == Q_Q4_K || type == Q_Q6_K ? 256 : 160, rows = 50 + rnd_int(100);
        size_t wb;
        void *wh = rnd_weight(type, rows, cols, 1.0f, &wb);
        for (size_t ni = 0; ni < HY_ARRAY_LEN(toks); ni++) {
            int n = toks[ni];
            int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
            for (int i = 0; i < n; i++)
                ids[i] = i == 0 ? (int32_t)rows - 1 : rnd_int((int)rows);
            float *o[2];
            be *bs[2] = {g_cpu, g_gpu};
            for (int i = 0; i < 2; i++) {
                be *b = bs[i];
                be_weight *w = NULL;
                OP(b, b->ops->weight_create(b, type, rows, cols, wh, &w));
                float *d = dev_put(b, NULL, sizeof(float) * (size_t)(n * cols));
                OP(b, b->ops->embed(b, w, ids, n, d));
                o[i] = malloc(sizeof(float) * (size_t)(n * cols));
                dev_get(b, o[i], d, sizeof(float) * (size_t)(n * cols));
                b->ops->free(b, d);
                b->ops->weight_free(b, w);
            }
            double e = tu_nmse(o[1], o[0], (size_t)(n * cols));
            printf("  embed %-5s n_tok %3d: NMSE %.2e\n", q_type_name(type), n, e);
            CHECK_NMSE("embed", e, NMSE_F32);
            free(o[0]);
            free(o[1]);
            free(ids);
        }
        free(wh);
    }
    /* an id out of range is an error, not a read past the table */
    be_weight *w = NULL;
    size_t wb;
    void *wh = rnd_weight(Q_F32, 4, 32, 1.0f, &wb);
    OP(g_gpu, g_gpu->ops->weight_create(g_gpu, Q_F32, 4, 32, wh, &w));
    float *d = dev_put(g_gpu, NULL, 4 * 32);
    int32_t bad = 4;
    assert_int_equal(g_gpu->ops->embed(g_gpu, w, &bad, 1, d), HY_EINVAL);
    g_gpu->ops->free(g_gpu, d);
    g_gpu->ops->weight_free(g_gpu, w);
    free(wh);
}

/* ---- elementwise and norms ---- */

typedef enum { EW_RMS, EW_RMS_INPLACE } ew_kind;

static void check_ew(ew_kind kind, int n_tok, int64_t dim)
{
    size_t n = (size_t)n_tok * (size_t)dim;
    float *a = rnd_vec(n, 2.0f), *x = rnd_vec(n, 1.5f), *w = rnd_vec((size_t)dim, 1.0f);
    float *o[2];
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++) {
        be *b = bs[i];
        float *da = dev_put(b, a, n * 4), *dx = dev_put(b, x, n * 4), *dw = dev_put(b, w, (size_t)dim * 4);
        float *dy = dev_put(b, NULL, n * 4), *res = dy;
        switch (kind) {
        case EW_RMS: OP(b, b->ops->rmsnorm(b, da, dw, n_tok, dim, 1e-5f, dy)); break;
        case EW_RMS_INPLACE: OP(b, b->ops->rmsnorm(b, da, dw, n_tok, dim, 1e-5f, da)); res = da; break;
        }
        o[i] = malloc(n * 4);
        dev_get(b, o[i], res, n * 4);
        b->ops->free(b, da);
        b->ops->free(b, dx);
        b->ops->free(b, dw);
        b->ops->free(b, dy);
    }
    static const char *names[] = {"rmsnorm", "rmsnorm(in place)"};
    double e = tu_nmse(o[1], o[0], n);
    printf("  %-17s n_tok %3d dim %5lld: NMSE %.2e\n", names[kind], n_tok, (long long)dim, e);
    CHECK_NMSE(names[kind], e, NMSE_F32);
    free(o[0]);
    free(o[1]);
    free(a);
    free(x);
    free(w);
}

static void test_elementwise(void **state)
{
    (void)state;
    NEED_GPU();
    static const int toks[] = {1, 5, 64, 300};
    static const int64_t dims[] = {1, 577, 2048, 4099};
    for (int k = EW_RMS; k <= EW_RMS_INPLACE; k++)
        for (size_t ti = 0; ti < HY_ARRAY_LEN(toks); ti++)
            check_ew((ew_kind)k, toks[ti], dims[rnd_int((int)HY_ARRAY_LEN(dims))]);
}

/* ---- attention over the paged KV cache ---- */

typedef struct {
    int n_seq, max_blocks, n_blocks;
    int32_t *block_table; /* [n_seq * max_blocks], a random permutation of blocks */
    int *len;             /* tokens already in the cache per sequence */
} kv_layout;

/* One step of attention on both backends; freq (or NULL: no RoPE) is the op's RoPE table. */
static void run_attn_step(const kv_layout *L, const int *n_new, int n_heads, int n_kv, int hd, void *kc[2],
                          void *vc[2], const float *freq)
{
    int n_tok = 0;
    for (int s = 0; s < L->n_seq; s++)
        n_tok += n_new[s];
    int32_t *pos = malloc(4 * (size_t)n_tok), *seq = malloc(4 * (size_t)n_tok), *slot = malloc(4 * (size_t)n_tok);
    int32_t *seq_len = malloc(4 * (size_t)L->n_seq);
    int t = 0;
    for (int s = 0; s < L->n_seq; s++) {
        for (int i = 0; i < n_new[s]; i++, t++) {
            int p = L->len[s] + i;
            pos[t] = p;
            seq[t] = s;
            slot[t] = L->block_table[s * L->max_blocks + p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK;
        }
        seq_len[s] = L->len[s] + n_new[s];
    }
    be_attn_meta m = {n_tok, L->n_seq, pos, seq, slot, seq_len, L->block_table, L->max_blocks};
    size_t nq = (size_t)n_tok * n_heads * hd, nk = (size_t)n_tok * n_kv * hd;
    float *q = rnd_vec(nq, 1.0f), *k = rnd_vec(nk, 1.0f), *v = rnd_vec(nk, 1.0f), *o[2], *qr[2], *kr[2];
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++) {
        be *b = bs[i];
        float *dq = dev_put(b, q, nq * 4), *dk = dev_put(b, k, nk * 4), *dv = dev_put(b, v, nk * 4);
        float *dout = dev_put(b, NULL, nq * 4);
        OP(b, b->ops->attention(b, &m, dq, dk, dv, kc[i], vc[i], n_heads, n_kv, hd, freq, dout));
        o[i] = malloc(nq * 4);
        qr[i] = malloc(nq * 4);
        kr[i] = malloc(nk * 4);
        dev_get(b, o[i], dout, nq * 4);
        dev_get(b, qr[i], dq, nq * 4);
        dev_get(b, kr[i], dk, nk * 4);
        b->ops->free(b, dq);
        b->ops->free(b, dk);
        b->ops->free(b, dv);
        b->ops->free(b, dout);
    }
    double e = tu_nmse(o[1], o[0], nq);
    printf("  attention %2d seqs %4d tokens heads %2d/%d head_dim %3d%s: NMSE %.2e\n", L->n_seq, n_tok, n_heads,
           n_kv, hd, freq ? " rope" : "", e);
    CHECK_NMSE("attention", e, NMSE_ATTN);
    /* q and k come back rotated in place (or untouched without freq). Angles up to ~8k rad in
     * fp32: the backends' sin/cos of the same float argument agree to ~1e-7 relative. */
    double eq = tu_nmse(qr[1], qr[0], nq), ek = tu_nmse(kr[1], kr[0], nk);
    CHECK_NMSE("rope q", eq, freq ? 1e-7 : 0.0);
    CHECK_NMSE("rope k", ek, freq ? 1e-7 : 0.0);
    bool moved = false;
    for (int i = 0; i < n_tok; i++)
        moved = moved || pos[i] > 0;
    if (freq && moved) { /* and were rotated (position 0 alone is the identity) */
        assert_true(tu_nmse(qr[0], q, nq) > 1e-3);
        assert_true(tu_nmse(kr[0], k, nk) > 1e-3);
    }
    /* both backends round K/V to fp16 the same way: the caches must match bit for bit (K with
     * RoPE: the rotated values may differ in their last fp32 bit, so the cache by NMSE) */
    size_t cache = (size_t)L->n_blocks * BE_KV_BLOCK * n_kv * hd * 2;
    uint8_t *c0 = malloc(cache), *c1 = malloc(cache);
    dev_get(g_cpu, c0, kc[0], cache);
    dev_get(g_gpu, c1, kc[1], cache);
    if (freq) {
        size_t nh = cache / 2;
        float *f0 = malloc(nh * 4), *f1 = malloc(nh * 4);
        for (size_t j = 0; j < nh; j++) {
            f0[j] = q_f16_to_f32(((const uint16_t *)c0)[j]);
            f1[j] = q_f16_to_f32(((const uint16_t *)c1)[j]);
        }
        CHECK_NMSE("K cache", tu_nmse(f1, f0, nh), 1e-6); /* fp16: 2^-11 relative, on rare 1-ulp flips */
        free(f0);
        free(f1);
    } else {
        assert_memory_equal(c0, c1, cache);
    }
    dev_get(g_cpu, c0, vc[0], cache);
    dev_get(g_gpu, c1, vc[1], cache);
    assert_memory_equal(c0, c1, cache);
    free(c0);
    free(c1);
    for (int s = 0; s < L->n_seq; s++)
        L->len[s] += n_new[s];
    free(q);
    free(k);
    free(v);
    for (int i = 0; i < 2; i++) {
        free(o[i]);
        free(qr[i]);
        free(kr[i]);
    }
    free(pos);
    free(seq);
    free(slot);
    free(seq_len);
}

/* Steps of attention over a fresh cache: a prefill of up to prefill_max tokens per sequence,
 * decode_steps single tokens, a chunk of prefill. start: positions before the first step
 * (zero K/V rows; far positions test RoPE's large angles); rope: with a RoPE table (theta
 * 10000 or 500000, from hd) or without. */
static void check_attention_at(int n_seq, int n_heads, int n_kv, int hd, int prefill_max, int decode_steps,
                               int start, bool rope)
{
    float freq[128];
    float theta = hd % 64 ? 10000.0f : 500000.0f;
    for (int i = 0; i < hd / 2; i++)
        freq[i] = powf(theta, -2.0f * (float)i / (float)hd);
    const float *fr = rope ? freq : NULL;
    kv_layout L = {.n_seq = n_seq, .max_blocks = (start + prefill_max + decode_steps + BE_KV_BLOCK + 3) / BE_KV_BLOCK + 1};
    L.n_blocks = n_seq * L.max_blocks + 3;
    L.block_table = malloc(4 * (size_t)n_seq * L.max_blocks);
    L.len = calloc((size_t)n_seq, sizeof(int));
    for (int i = 0; i < n_seq; i++)
        L.len[i] = start;
    int *perm = malloc(sizeof(int) * (size_t)L.n_blocks);
    for (int i = 0; i < L.n_blocks; i++)
        perm[i] = i;
    for (int i = L.n_blocks - 1; i > 0; i--) {
        int j = rnd_int(i + 1), tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    for (int i = 0; i < n_seq * L.max_blocks; i++)
        L.block_table[i] = perm[i];
    void *kc[2], *vc[2];
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++)
        OP(bs[i], bs[i]->ops->kv_alloc(bs[i], L.n_blocks, n_kv, hd, &kc[i], &vc[i]));
    int *n_new = calloc((size_t)n_seq, sizeof(int));
    assert_non_null(n_new);
    for (int s = 0; s < n_seq; s++)
        n_new[s] = s == 0 && n_seq > 1 ? 1 : 1 + rnd_int(prefill_max); /* one-token sequence included */
    run_attn_step(&L, n_new, n_heads, n_kv, hd, kc, vc, fr);
    for (int step = 0; step < decode_steps; step++) {
        for (int s = 0; s < n_seq; s++)
            n_new[s] = 1;
        run_attn_step(&L, n_new, n_heads, n_kv, hd, kc, vc, fr);
    }
    /* a second chunk of prefill on top of cached context (chunked prefill) */
    for (int s = 0; s < n_seq; s++)
        n_new[s] = 1 + rnd_int(BE_KV_BLOCK + 3);
    run_attn_step(&L, n_new, n_heads, n_kv, hd, kc, vc, fr);
    for (int i = 0; i < 2; i++) {
        bs[i]->ops->free(bs[i], kc[i]);
        bs[i]->ops->free(bs[i], vc[i]);
    }
    free(n_new);
    free(perm);
    free(L.block_table);
    free(L.len);
}

static void check_attention(int n_seq, int n_heads, int n_kv, int hd, int prefill_max, int decode_steps)
{
    check_attention_at(n_seq, n_heads, n_kv, hd, prefill_max, decode_steps, 0, true);
}

static void test_attention(void **state)
{
    (void)state;
    NEED_GPU();
    check_attention_at(2, 9, 3, 64, 20, 1, 0, false);   /* without RoPE */
    check_attention_at(1, 4, 2, 64, 3, 1, 8150, true);  /* RoPE angles near 8k rad */
    check_attention_at(1, 4, 2, 128, 3, 1, 2000, true); /* head_dim 128, theta 500000 */
    check_attention(1, 9, 3, 64, 300, 2);   /* SmolLM2 heads, one long prefill */
    check_attention(1, 9, 3, 64, 1, 1);     /* the very first token */
    check_attention(5, 32, 8, 64, 40, 3);   /* Llama-3.2-1B heads */
    check_attention(64, 4, 4, 128, 20, 2);  /* 64 sequences, MHA, head_dim 128 */
    check_attention(3, 6, 2, 32, 70, 1);
    check_attention(2, 2, 1, 96, 33, 1);
    check_attention(2, 4, 2, 256, 17, 1);
    /* query heads per KV head beyond one block's ATT_GMAX (8): chunks, uneven ones too */
    check_attention(3, 32, 4, 64, 30, 2);   /* 8 per KV head */
    check_attention(2, 16, 1, 64, 80, 2);   /* 16: chunks of 8, or uneven ones for small grids */
    check_attention(2, 12, 1, 128, 40, 1);  /* 12 */
    check_attention(64, 32, 8, 64, 20, 2);  /* 64 decoding sequences: 4 heads per block */
}

/* ---- HydraLoRA ---- */

typedef struct {
    int r, K;
    float *A, *R, **B;
    float scale;
    be_lora *l[2];
} test_lora;

/* magnitudes of the adapter weights lora_make draws (test_hydra_range moves them outside
 * fp16's normal range to exercise the storage factors) */
static float g_a_sd = 1.0f, g_b_sd = 0.05f;
static float g_y_sd = 1.0f; /* of the y the adapter term is added to (0: a tiny term stays exact) */

/* Round the n values of parts[0..n_parts) as the CUDA backend stores them: times the power of
 * two that brings the largest finite |v| into [2^13, 2^14) (clamped to 2^-40..2^40), to fp16
 * (nearest even), and back, exactly divided again. */
static void fp16_store(float *const *parts, int n_parts, size_t n)
{
    float mx = 0.0f;
    for (int p = 0; p < n_parts; p++)
        for (size_t i = 0; i < n; i++)
            if (fabsf(parts[p][i]) > mx && isfinite(parts[p][i]))
                mx = fabsf(parts[p][i]);
    int e = 0;
    if (mx > 0.0f)
        (void)frexpf(mx, &e);
    const float f = mx > 0.0f ? ldexpf(1.0f, HY_MAX(-40, HY_MIN(40, 14 - e))) : 1.0f;
    for (int p = 0; p < n_parts; p++)
        for (size_t i = 0; i < n; i++)
            parts[p][i] = q_f16_to_f32(q_f32_to_f16(parts[p][i] * f)) / f;
}

static void lora_make(test_lora *t, int r, int K, int64_t in, int64_t out)
{
    t->r = r;
    t->K = K;
    t->A = rnd_vec((size_t)r * in, g_a_sd / sqrtf((float)in));
    t->R = K > 1 ? rnd_vec((size_t)K * in, 2.0f / sqrtf((float)in)) : NULL;
    t->B = malloc(sizeof(float *) * (size_t)K);
    for (int k = 0; k < K; k++)
        t->B[k] = rnd_vec((size_t)out * r, g_b_sd);
    fp16_store(&t->A, 1, (size_t)r * in);
    if (K > 1)
        fp16_store(&t->R, 1, (size_t)K * in);
    fp16_store(t->B, K, (size_t)out * r);
    t->scale = 2.0f / (float)r * (1 + rnd_int(4));
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++)
        OP(bs[i], bs[i]->ops->lora_create(bs[i], r, K, in, out, t->A, t->R, (const float *const *)t->B,
                                          t->scale, &t->l[i]));
}

static void lora_drop(test_lora *t)
{
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++)
        bs[i]->ops->lora_free(bs[i], t->l[i]);
    free(t->A);
    free(t->R);
    for (int k = 0; k < t->K; k++)
        free(t->B[k]);
    free(t->B);
}

/* n_tok tokens split into segments of random lengths (some empty, some one token, some with
 * no adapter) over `n_ad` adapters of mixed rank and head count. */
static void check_hydra(int n_tok, int64_t in, int64_t out, int n_ad)
{
    test_lora *ad = calloc((size_t)n_ad, sizeof *ad);
    static const int ranks[] = {1, 4, 7, 8, 16, 32, 64};
    for (int a = 0; a < n_ad; a++)
        lora_make(&ad[a], ranks[rnd_int((int)HY_ARRAY_LEN(ranks))], 1 + (a % 8), in, out);
    be_lora_seg segs[2][64];
    float stats[2][64][9];
    be_gate_ctl ctls[64];
    memset(stats, 0, sizeof stats);
    int n_seg = 0, t = 0;
    while (t < n_tok && n_seg < 62) {
        int len = rnd_int(4) == 0 ? rnd_int(2) : 1 + rnd_int(HY_MAX(1, n_tok / 4)); /* 0 and 1 happen */
        if (len > n_tok - t)
            len = n_tok - t;
        int a = rnd_int(n_ad + 1); /* == n_ad: no adapter */
        bool want_stats = rnd_int(3) != 0;
        /* a third of the segments carry a request's router control (be_gate.h) */
        static const float temps[] = {0.25f, 1.0f, 3.0f};
        int K = a < n_ad ? 1 + (a % 8) : 1;
        uint32_t allow = (uint32_t)rnd_int(1 << K);
        ctls[n_seg] = (be_gate_ctl){temps[rnd_int(3)], rnd_int(K + 1), allow ? allow : 1u << rnd_int(K)};
        bool want_ctl = rnd_int(3) == 0;
        static const float wts[4] = {0.0f, 1.0f, 0.5f, -1.5f}; /* stack weights (0 reads as 1) */
        float w = wts[rnd_int(4)];
        for (int i = 0; i < 2; i++) {
            segs[i][n_seg].scale = w;
            segs[i][n_seg].tok_begin = t;
            segs[i][n_seg].tok_end = t + len;
            segs[i][n_seg].lora = a < n_ad ? ad[a].l[i] : NULL;
            segs[i][n_seg].stats = want_stats ? stats[i][n_seg] : NULL;
            segs[i][n_seg].ctl = want_ctl ? &ctls[n_seg] : NULL;
        }
        n_seg++;
        t += len;
    }
    if (t < n_tok) { /* the rest in one last segment with adapter 0 */
        for (int i = 0; i < 2; i++) {
            segs[i][n_seg] = (be_lora_seg){t, n_tok, ad[0].l[i], stats[i][n_seg], NULL, 1.0f};
        }
        n_seg++;
    }
    size_t nx = (size_t)n_tok * in, ny = (size_t)n_tok * out;
    float *x = rnd_vec(nx, 1.0f), *y0 = rnd_vec(ny, g_y_sd), *o[2];
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++) {
        be *b = bs[i];
        float *dx = dev_put(b, x, nx * 4), *dy = dev_put(b, y0, ny * 4);
        OP(b, be_hydra1(b, dx, in, dy, out, segs[i], n_seg));
        o[i] = malloc(ny * 4);
        dev_get(b, o[i], dy, ny * 4);
        b->ops->free(b, dx);
        b->ops->free(b, dy);
    }
    /* compare the adapter contribution, not the random y it was added to */
    for (size_t j = 0; j < ny; j++) {
        o[0][j] -= y0[j];
        o[1][j] -= y0[j];
    }
    double e = tu_nmse(o[1], o[0], ny);
    double es = tu_nmse(&stats[1][0][0], &stats[0][0][0], sizeof stats[0] / sizeof(float));
    printf("  hydra n_tok %3d in %5lld out %5lld, %2d segments over %d adapters: NMSE %.2e, stats %.2e\n",
           n_tok, (long long)in, (long long)out, n_seg, n_ad, e, es);
    CHECK_NMSE("hydra output", e, NMSE_HYDRA);
    CHECK_NMSE("hydra stats", es, NMSE_HYDRA);
    for (int a = 0; a < n_ad; a++)
        lora_drop(&ad[a]);
    free(ad);
    free(x);
    free(y0);
    free(o[0]);
    free(o[1]);
}

/* hydra over n projections that read the same x (q/k/v: other output widths, adapters that
 * leave some projections alone) in one call: against the CPU (NMSE_HYDRA, stats too), and on the
 * GPU bit-identical to one call per projection (the same kernels compute every output alike;
 * only the router stats' atomic sums may round differently). */
static void check_hydra_n(int n_tok, int64_t in, const int64_t *out, int n, int n_ad)
{
    static const int ranks[] = {1, 4, 8, 16, 33};
    test_lora ad[BE_MM_MAX][8];
    for (int p = 0; p < n; p++)
        for (int a = 0; a < n_ad; a++)
            lora_make(&ad[p][a], ranks[rnd_int((int)HY_ARRAY_LEN(ranks))], 1 + rnd_int(4), in, out[p]);
    be_lora_seg segs[2][BE_MM_MAX][32];
    static float stats[3][BE_MM_MAX][32][9];
    memset(stats, 0, sizeof stats);
    int n_seg = 0, t = 0;
    while (t < n_tok && n_seg < 32) {
        int len = rnd_int(3) == 0 ? rnd_int(2) : 1 + rnd_int(8); /* (HY_MIN evaluates twice) */
        len = n_seg == 31 ? n_tok - t : HY_MIN(n_tok - t, len);
        int a = rnd_int(n_ad + 1); /* == n_ad: no adapter */
        static const float wts[4] = {0.0f, 1.0f, 0.5f, -1.5f}; /* stack weights (0 reads as 1) */
        float w = wts[rnd_int(4)];
        for (int p = 0; p < n; p++) {
            bool skip = a < n_ad && rnd_int(3) == 0; /* this adapter leaves projection p alone */
            bool want = rnd_int(2);
            for (int i = 0; i < 2; i++)
                segs[i][p][n_seg] = (be_lora_seg){t, t + len, a < n_ad && !skip ? ad[p][a].l[i] : NULL,
                                                  want ? stats[i][p][n_seg] : NULL, NULL, w};
        }
        n_seg++;
        t += len;
    }
    size_t nx = (size_t)n_tok * in, ny[BE_MM_MAX];
    float *x = rnd_vec(nx, 1.0f), *y0[BE_MM_MAX], *o[3][BE_MM_MAX];
    for (int p = 0; p < n; p++) {
        ny[p] = (size_t)n_tok * out[p];
        y0[p] = rnd_vec(ny[p], 1.0f);
    }
    be *bs[3] = {g_cpu, g_gpu, g_gpu}; /* run 2: one call per projection */
    for (int i = 0; i < 3; i++) {
        be *b = bs[i];
        float *dx = dev_put(b, x, nx * 4), *dy[BE_MM_MAX];
        const be_lora_seg *sp[BE_MM_MAX];
        for (int p = 0; p < n; p++) {
            dy[p] = dev_put(b, y0[p], ny[p] * 4);
            sp[p] = segs[i == 0 ? 0 : 1][p];
        }
        if (i < 2) {
            OP(b, b->ops->hydra(b, n, dx, in, dy, out, sp, n_seg));
        } else {
            be_lora_seg one[BE_MM_MAX][32];
            for (int p = 0; p < n; p++) {
                for (int k = 0; k < n_seg; k++) {
                    one[p][k] = segs[1][p][k];
                    one[p][k].stats = one[p][k].stats ? stats[2][p][k] : NULL;
                }
                OP(b, be_hydra1(b, dx, in, dy[p], out[p], one[p], n_seg));
            }
        }
        for (int p = 0; p < n; p++) {
            o[i][p] = malloc(ny[p] * 4);
            dev_get(b, o[i][p], dy[p], ny[p] * 4);
            for (size_t j = 0; j < ny[p]; j++) /* the adapter term, not the y it was added to */
                o[i][p][j] -= y0[p][j];
            b->ops->free(b, dy[p]);
        }
        b->ops->free(b, dx);
    }
    double e = 0;
    for (int p = 0; p < n; p++) {
        e = fmax(e, tu_nmse(o[1][p], o[0][p], ny[p]));
        if (memcmp(o[1][p], o[2][p], ny[p] * 4))
            fail_msg("hydra x%d: projection %d differs from its own hydra call", n, p);
    }
    size_t nst = sizeof stats[0] / sizeof(float);
    double es = tu_nmse(&stats[1][0][0][0], &stats[0][0][0][0], nst), es1 = tu_nmse(&stats[1][0][0][0], &stats[2][0][0][0], nst);
    printf("  hydra x%d n_tok %3d in %4lld out %lld/%lld/%lld, %2d segments: NMSE %.2e, stats %.2e (vs one call each %.2e)\n",
           n, n_tok, (long long)in, (long long)out[0], (long long)out[n > 1], (long long)out[n - 1], n_seg, e, es,
           es1);
    CHECK_NMSE("hydra x n output", e, NMSE_HYDRA);
    CHECK_NMSE("hydra x n stats", es, NMSE_HYDRA);
    CHECK_NMSE("hydra x n stats vs one call each", es1, 1e-12);
    for (int p = 0; p < n; p++) {
        for (int a = 0; a < n_ad; a++)
            lora_drop(&ad[p][a]);
        for (int i = 0; i < 3; i++)
            free(o[i][p]);
        free(y0[p]);
    }
    free(x);
}

static void test_hydra_n(void **state)
{
    (void)state;
    NEED_GPU();
    /* a projection without its segments is refused before anything runs */
    be *bs[2] = {g_cpu, g_gpu};
    for (int i = 0; i < 2; i++) {
        float *d = dev_put(bs[i], NULL, 64 * 4), *y[2] = {d, d + 32};
        const int64_t out[2] = {32, 32};
        const be_lora_seg seg = {0, 1, NULL, NULL, NULL, 1.0f}, *segs[2] = {&seg, NULL};
        assert_int_equal(bs[i]->ops->hydra(bs[i], 2, d, 32, y, out, segs, 1), HY_EINVAL);
        bs[i]->ops->free(bs[i], d);
    }
    static const int64_t qkv[] = {576, 192, 192}, gu[] = {1536, 1535}, odd[] = {101, 7, 300};
    static const int toks[] = {1, 5, 64};
    for (size_t ti = 0; ti < HY_ARRAY_LEN(toks); ti++) {
        check_hydra_n(toks[ti], 576, qkv, 3, 4);
        check_hydra_n(toks[ti], 576, gu, 2, 3); /* an odd width: one output per thread for both */
        check_hydra_n(toks[ti], 64, odd, 3, 2);
    }
}

/* Weights far below fp16's smallest normal (A ~ 1e-8: zero in plain fp16) and far above its
 * largest value (B ~ 1e6: infinity in plain fp16) must come out as accurately as ordinary ones. */
static void test_hydra_range(void **state)
{
    (void)state;
    NEED_GPU();
    const float a_sd[] = {1e-8f, 1.0f, 1e4f}, b_sd[] = {1e6f, 1e-9f, 1e-6f};
    g_y_sd = 0.0f;
    for (size_t i = 0; i < HY_ARRAY_LEN(a_sd); i++) {
        g_a_sd = a_sd[i];
        g_b_sd = b_sd[i];
        printf("  A sd %.0e, B sd %.0e:\n", a_sd[i], b_sd[i]);
        check_hydra(5, 576, 192, 3);
        check_hydra(40, 577, 1001, 4);
    }
    g_a_sd = 1.0f;
    g_b_sd = 0.05f;
    g_y_sd = 1.0f;
}

static void test_hydra(void **state)
{
    (void)state;
    NEED_GPU();
    static const int toks[] = {1, 5, 64, 300};
    for (size_t ti = 0; ti < HY_ARRAY_LEN(toks); ti++) {
        check_hydra(toks[ti], 576, 192, 3);
        check_hydra(toks[ti], 577, 1001, 8); /* odd sizes: the unvectorised shrink */
    }
    check_hydra(64, 2048, 512, 16);
    if (g_fake)
        return;
    /* limits are refused with a clear error */
    float a[64 * 32] = {0}, r[9 * 32] = {0}, bb[32 * 65] = {0};
    const float *B[9] = {bb, bb, bb, bb, bb, bb, bb, bb, bb};
    be_lora *l = NULL;
    assert_int_equal(g_gpu->ops->lora_create(g_gpu, 65, 1, 32, 32, a, NULL, B, 1.0f, &l), HY_EUNSUPPORTED);
    assert_non_null(strstr(hy_err_msg(), "rank"));
    assert_int_equal(g_gpu->ops->lora_create(g_gpu, 4, 9, 32, 32, a, r, B, 1.0f, &l), HY_EUNSUPPORTED);
    assert_null(l);
}

/* Adapter memory reuse (the CUDA pool of kernels/cuda_lpool.cu): 40 adapters, one hydra call
 * over all of them left queued on the device while every other adapter is freed and 20 of other
 * ranks are created in their place (their copies must not land under the queued kernels), then
 * hydra over the 40 now live. Both results against the CPU backend. */
static void hydra_arena_segs(test_lora *ad, int n, int per, be_lora_seg segs[2][64], float stats[2][64][9])
{
    memset(stats, 0, sizeof(float) * 2 * 64 * 9);
    for (int a = 0; a < n; a++)
        for (int i = 0; i < 2; i++)
            segs[i][a] = (be_lora_seg){a * per, (a + 1) * per, ad[a].l[i], a % 2 ? stats[i][a] : NULL, NULL, 1.0f};
}

static void hydra_arena_check(const char *what, float *o[2], const float *y0, size_t ny, float stats[2][64][9])
{
    for (size_t j = 0; j < ny; j++) {
        o[0][j] -= y0[j];
        o[1][j] -= y0[j];
    }
    double e = tu_nmse(o[1], o[0], ny), es = tu_nmse(&stats[1][0][0], &stats[0][0][0], 64 * 9);
    printf("  hydra arena, %s: NMSE %.2e, stats %.2e\n", what, e, es);
    CHECK_NMSE(what, e, NMSE_HYDRA);
    CHECK_NMSE(what, es, NMSE_HYDRA);
}

static void hydra_arena(int64_t in, int64_t out)
{
    enum { N = 40, PER = 2 };
    static const int ranks0[] = {1, 4, 8, 16, 32, 64}, ranks1[] = {2, 3, 5, 12, 24, 48};
    test_lora ad[N];
    memset(ad, 0, sizeof ad);
    for (int a = 0; a < N; a++)
        lora_make(&ad[a], ranks0[a % 6], 1 + a % 8, in, out);
    const int n_tok = N * PER;
    const size_t nx = (size_t)n_tok * in, ny = (size_t)n_tok * out;
    float *x = rnd_vec(nx, 1.0f), *y0 = rnd_vec(ny, 1.0f), *o[2];
    be_lora_seg segs[2][64];
    static float stats[2][64][9];
    be *bs[2] = {g_cpu, g_gpu};
    void *dx[2], *dy[2];

    hydra_arena_segs(ad, N, PER, segs, stats);
    for (int i = 0; i < 2; i++) {
        dx[i] = dev_put(bs[i], x, nx * 4);
        dy[i] = dev_put(bs[i], y0, ny * 4);
        OP(bs[i], be_hydra1(bs[i], dx[i], in, dy[i], out, segs[i], N));
    }
    /* no download yet: the GPU call may still be running */
    for (int a = 1; a < N; a += 2) {
        lora_drop(&ad[a]);
        lora_make(&ad[a], ranks1[(a / 2) % 6], 1 + (a * 3) % 8, in, out);
    }
    for (int i = 0; i < 2; i++) {
        o[i] = malloc(ny * 4);
        dev_get(bs[i], o[i], dy[i], ny * 4);
    }
    hydra_arena_check("queued over 20 freed adapters", o, y0, ny, stats);

    hydra_arena_segs(ad, N, PER, segs, stats);
    for (int i = 0; i < 2; i++) {
        OP(bs[i], bs[i]->ops->upload(bs[i], dy[i], y0, ny * 4));
        OP(bs[i], be_hydra1(bs[i], dx[i], in, dy[i], out, segs[i], N));
        dev_get(bs[i], o[i], dy[i], ny * 4);
    }
    hydra_arena_check("20 old + 20 new in reused memory", o, y0, ny, stats);

    for (int i = 0; i < 2; i++) {
        bs[i]->ops->free(bs[i], dx[i]);
        bs[i]->ops->free(bs[i], dy[i]);
        free(o[i]);
    }
    for (int a = 0; a < N; a++)
        lora_drop(&ad[a]);
    free(x);
    free(y0);
}

static void test_hydra_arena(void **state)
{
    (void)state;
    NEED_GPU();
    hydra_arena(1024, 1024); /* default chunks: everything fits in one */
    if (g_fake)
        return;
    /* 1 MiB chunks: many chunks, adapters larger than a chunk, no merging across chunks */
    setenv("HY_CUDA_LORA_CHUNK_MB", "1", 1);
    be *small = NULL;
    int rc = be_cuda_create(0, &small);
    unsetenv("HY_CUDA_LORA_CHUNK_MB");
    if (rc)
        printf("be_cuda_create: %s\n", hy_err_msg());
    assert_int_equal(rc, 0);
    be *keep = g_gpu;
    g_gpu = small;
    hydra_arena(1024, 1024);
    g_gpu = keep;
    small->ops->destroy(small);
}

/* ---- memory ops ---- */

static void test_memory(void **state)
{
    (void)state;
    NEED_GPU();
    be *b = g_gpu;
    size_t n = 1000003;
    uint8_t *h = malloc(n), *back = malloc(n);
    for (size_t i = 0; i < n; i++)
        h[i] = (uint8_t)rnd_u64();
    void *d = NULL;
    OP(b, b->ops->alloc(b, n, &d));
    dev_get(b, back, d, n);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(back[i], 0); /* alloc returns zeroed memory */
    OP(b, b->ops->upload(b, d, h, n));
    OP(b, b->ops->sync(b));
    dev_get(b, back, d, n);
    assert_memory_equal(h, back, n);
    /* pointer arithmetic on device pointers is allowed */
    dev_get(b, back, (uint8_t *)d + 17, 100);
    assert_memory_equal(h + 17, back, 100);
    b->ops->free(b, d);
    b->ops->free(b, NULL);
    free(h);
    free(back);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory),   cmocka_unit_test(test_matmul), cmocka_unit_test(test_matmul_n), cmocka_unit_test(test_matmul_in),    cmocka_unit_test(test_embed),
        cmocka_unit_test(test_elementwise),   cmocka_unit_test(test_attention),
        cmocka_unit_test(test_hydra),   cmocka_unit_test(test_hydra_range), cmocka_unit_test(test_hydra_n), cmocka_unit_test(test_hydra_arena),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
