/* cuda_matmul.cu - y = x W^T for a base-model weight. Quantised weights with n_tok <= 8 use
 * mat-vec kernels reading the GGUF blocks directly (fp32 activations, fp32 accumulation);
 * everything else goes to cuBLAS: fp16 weights x fp16 activations with fp32 accumulation
 * (cublasGemmEx), or fp32 x fp32 for F32/BF16 weights.
 * Two mat-vec kernels: cuda_mv_rows_kernel (Q4_0, Q4_1, Q8_0, Q4_K) gives each block R rows so
 * every activation load (two float4 per 8 weights per token) serves R rows, and splits the
 * row's columns over the block's MV_WARPS warps (reduced through shared memory): a decode
 * matrix is small, so the kernel is bound by memory latency, not bandwidth, unless many warps
 * each issue a few loads at once (one warp walking a whole 8192-wide row issues 32 rounds of
 * dependent-latency loads; four warps issue 8 each). The first kernel,
 * cuda_matvec_kernel (one warp per row, scalar activation loads), serves Q6_K, unaligned
 * activations and HY_CUDA_MV_LEGACY=1 runs that compare the two.
 * matmul_n (q/k/v, gate/up: matrices of one type and width reading the same x) runs the row
 * kernel once over the rows of all of them (block ranges per matrix in a kernel parameter), so
 * a decode layer launches 3 mat-vec kernels fewer; other cases loop over matmul. With add (the o
 * and down projections), every path adds into y (the residual stream): the kernels' stores read
 * y first, cuBLAS runs with beta 1. An input transform (be_mm_in: the RMS norm before q/k/v and
 * gate/up, the SwiGLU before down) is applied on the fly by the row kernel, whose block 0 also
 * stores it; where the row kernel does not serve (more than 8 tokens, Q6_K, unaligned vectors)
 * the transform runs as a pass of its own (cuda_rmsnorm / cuda_swiglu) before the products. */
#include "kernels/cuda.h"
#include "kernels/cuda_quant.cuh"

#define MV_WARPS 4 /* rows (warps) per block */

template <int QT, int NT>
__global__ void __launch_bounds__(MV_WARPS * 32)
    cuda_matvec_kernel(const uint8_t *__restrict__ W, size_t row_bytes, int rows, int cols,
                       const float *__restrict__ x, float *__restrict__ y, bool add)
{
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= rows)
        return; /* whole warp leaves together: no block-wide barrier below */
    const uint8_t *row = W + (size_t)r * row_bytes;
    const int nch = cols / 8;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++)
        acc[t] = 0.0f;
#pragma unroll 4
    for (int c = lane; c < nch; c += 32) {
        float w[8];
        int idx[8];
        cq_chunk<QT>(row, c, w, idx);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float *xt = x + (size_t)t * cols;
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; k++)
                s += w[k] * __ldg(xt + idx[k]);
            acc[t] += s;
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float v = cuda_warp_sum(acc[t]);
        if (lane == 0)
            y[(size_t)t * rows + r] = add ? y[(size_t)t * rows + r] + v : v;
    }
}

/* Chunk c of a row is 8 weights whose columns are two runs of 4 (idx[0..3] and idx[4..7]
 * consecutive, both multiples of 4) for these types; see cuda_quant.cuh. */
template <int QT> struct mv_x4 { enum { OK = (QT == 2 || QT == 3 || QT == 8 || QT == 12) }; };

/* The matrices of one row-kernel launch: matrix i owns blocks [b0[i], b0[i + 1]), R rows each. */
typedef struct {
    const uint8_t *W[BE_MM_MAX];
    float *y[BE_MM_MAX];
    int rows[BE_MM_MAX];
    int b0[BE_MM_MAX + 1];
    int n;
} mv_set;

/* The input transform of a row-kernel launch (be_mm_in on the device): MODE 0 x itself, 1 the
 * RMS norm (x / rms(x) * nw: the dot products take x * nw, the block's sum of squares of x gives
 * the token's 1 / rms, applied to the reduced dot product), 2 the SwiGLU (silu(x) * up). Block 0
 * also stores the transformed input in xout (the HydraLoRA terms read it). */
enum { MV_IN_X = 0, MV_IN_RMS = 1, MV_IN_SWIGLU = 2 };
typedef struct {
    const float *nw; /* MV_IN_RMS: [cols] */
    float eps;
    const float *up; /* MV_IN_SWIGLU: [n_tok][cols] */
    float *xout;     /* [n_tok][cols] */
} mv_in;

__device__ __forceinline__ float mv_silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* 1 / rms of token t from the warps' sums of squares (as the rmsnorm op computes it) */
template <int NT>
__device__ __forceinline__ float mv_rms_scale(const float (*ssp)[NT], int t, int cols, float eps)
{
    float tot = 0.0f;
#pragma unroll
    for (int k = 0; k < MV_WARPS; k++)
        tot += ssp[k][t];
    return 1.0f / sqrtf(tot / (float)cols + eps);
}

template <int QT, int NT, int R, int MODE>
__global__ void __launch_bounds__(MV_WARPS * 32)
    cuda_mv_rows_kernel(const __grid_constant__ mv_set set, size_t row_bytes, int cols,
                        const float *__restrict__ x, bool add, const __grid_constant__ mv_in in)
{
    __shared__ float part[MV_WARPS][R][NT];
    __shared__ float ssp[MV_WARPS][NT]; /* MV_IN_RMS: the warps' sums of squares */
    int m = 0;
    while (m + 1 < set.n && (int)blockIdx.x >= set.b0[m + 1])
        m++;
    const uint8_t *__restrict__ W = set.W[m];
    float *__restrict__ y = set.y[m];
    const int rows = set.rows[m];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int r0 = ((int)blockIdx.x - set.b0[m]) * R; /* < rows by the block count */
    const bool store = MODE == MV_IN_SWIGLU && blockIdx.x == 0;
    const uint8_t *rowp[R];
#pragma unroll
    for (int i = 0; i < R; i++)
        rowp[i] = W + (size_t)min(r0 + i, rows - 1) * row_bytes; /* a missing row re-reads the last */
    const int nch = cols / 8;
    float acc[R][NT], ss[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        ss[t] = 0.0f;
#pragma unroll
        for (int i = 0; i < R; i++)
            acc[i][t] = 0.0f;
    }
#pragma unroll(NT == 1 ? 4 : 2)
    for (int c = wid * 32 + lane; c < nch; c += MV_WARPS * 32) {
        float w[R][8];
        int idx[8];
#pragma unroll
        for (int i = 0; i < R; i++)
            cq_chunk<QT>(rowp[i], c, w[i], idx);
        const int o0 = idx[0], o1 = idx[4];
        float4 na = make_float4(0.0f, 0.0f, 0.0f, 0.0f), nb = na;
        if (MODE == MV_IN_RMS) {
            na = __ldg((const float4 *)(in.nw + o0));
            nb = __ldg((const float4 *)(in.nw + o1));
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float *xt = x + (size_t)t * cols;
            float4 a = __ldg((const float4 *)(xt + o0));
            float4 b = __ldg((const float4 *)(xt + o1));
            if (MODE == MV_IN_RMS) {
                ss[t] += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z +
                         b.w * b.w;
                a = make_float4(a.x * na.x, a.y * na.y, a.z * na.z, a.w * na.w);
                b = make_float4(b.x * nb.x, b.y * nb.y, b.z * nb.z, b.w * nb.w);
            } else if (MODE == MV_IN_SWIGLU) {
                const float *ut = in.up + (size_t)t * cols;
                const float4 ua = __ldg((const float4 *)(ut + o0)), ub = __ldg((const float4 *)(ut + o1));
                a = make_float4(mv_silu_mul(a.x, ua.x), mv_silu_mul(a.y, ua.y), mv_silu_mul(a.z, ua.z),
                                mv_silu_mul(a.w, ua.w));
                b = make_float4(mv_silu_mul(b.x, ub.x), mv_silu_mul(b.y, ub.y), mv_silu_mul(b.z, ub.z),
                                mv_silu_mul(b.w, ub.w));
                if (store) {
                    *(float4 *)(in.xout + (size_t)t * cols + o0) = a;
                    *(float4 *)(in.xout + (size_t)t * cols + o1) = b;
                }
            }
#pragma unroll
            for (int i = 0; i < R; i++)
                acc[i][t] += w[i][0] * a.x + w[i][1] * a.y + w[i][2] * a.z + w[i][3] * a.w +
                             w[i][4] * b.x + w[i][5] * b.y + w[i][6] * b.z + w[i][7] * b.w;
        }
    }
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float v = cuda_warp_sum(acc[i][t]);
            if (lane == 0)
                part[wid][i][t] = v;
        }
    if (MODE == MV_IN_RMS) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float v = cuda_warp_sum(ss[t]);
            if (lane == 0)
                ssp[wid][t] = v;
        }
    }
    __syncthreads();
    static_assert(R * NT <= 32, "one lane of warp 0 per output");
    if (wid == 0 && lane < R * NT) {
        const int i = lane / NT, t = lane - i * NT;
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < MV_WARPS; k++)
            v += part[k][i][t];
        if (MODE == MV_IN_RMS)
            v *= mv_rms_scale<NT>(ssp, t, cols, in.eps);
        if (r0 + i < rows)
            y[(size_t)t * rows + r0 + i] = add ? y[(size_t)t * rows + r0 + i] + v : v;
    }
    if (MODE == MV_IN_RMS && blockIdx.x == 0) { /* the normed input, as the rmsnorm op computes it */
        for (int t = 0; t < NT; t++) {
            const float scale = mv_rms_scale<NT>(ssp, t, cols, in.eps);
            for (int e = threadIdx.x; e < cols; e += MV_WARPS * 32)
                in.xout[(size_t)t * cols + e] = x[(size_t)t * cols + e] * scale * in.nw[e];
        }
    }
}

/* the rows of w[0..n) (one type, one width) in one launch */
template <int QT, int NT, int MODE>
static void cuda_mv_rows_launch1(cudaStream_t s, int n, const be_weight *const *w, const float *x,
                                 float *const *y, bool add, const mv_in &in)
{
    constexpr int R = NT == 1 ? 2 : 4;
    mv_set set;
    memset(&set, 0, sizeof set);
    set.n = n;
    for (int i = 0; i < n; i++) {
        set.W[i] = (const uint8_t *)w[i]->q;
        set.y[i] = y[i];
        set.rows[i] = (int)w[i]->rows;
        set.b0[i + 1] = set.b0[i] + (int)((w[i]->rows + R - 1) / R);
    }
    cuda_mv_rows_kernel<QT, NT, R, MODE><<<(unsigned)set.b0[n], MV_WARPS * 32, 0, s>>>(
        set, w[0]->row_bytes, (int)w[0]->cols, x, add, in);
}

template <int QT, int MODE>
static void cuda_mv_rows_launch_m(cudaStream_t s, int n, const be_weight *const *w, const float *x,
                                  int n_tok, float *const *y, bool add, const mv_in &in)
{
    if constexpr (mv_x4<QT>::OK) {
        switch (n_tok) {
#define MV_CASE(N) case N: cuda_mv_rows_launch1<QT, N, MODE>(s, n, w, x, y, add, in); break;
            MV_CASE(1) MV_CASE(2) MV_CASE(3) MV_CASE(4) MV_CASE(5) MV_CASE(6) MV_CASE(7) MV_CASE(8)
#undef MV_CASE
        default: break;
        }
    }
}

template <int QT>
static void cuda_mv_rows_launch(cudaStream_t s, int n, const be_weight *const *w, const float *x,
                                int n_tok, float *const *y, bool add, int mode, const mv_in &in)
{
    if (mode == MV_IN_RMS)
        cuda_mv_rows_launch_m<QT, MV_IN_RMS>(s, n, w, x, n_tok, y, add, in);
    else if (mode == MV_IN_SWIGLU)
        cuda_mv_rows_launch_m<QT, MV_IN_SWIGLU>(s, n, w, x, n_tok, y, add, in);
    else
        cuda_mv_rows_launch_m<QT, MV_IN_X>(s, n, w, x, n_tok, y, add, in);
}

__global__ void cuda_f32_to_f16_kernel(const float *x, int64_t n, __half *o)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        o[i] = __float2half_rn(x[i]);
}

template <int QT>
static void cuda_matvec_launch(cudaStream_t s, const be_weight *w, const float *x, int n_tok, float *y,
                               bool add)
{
    const unsigned grid = (unsigned)((w->rows + MV_WARPS - 1) / MV_WARPS);
    const uint8_t *q = (const uint8_t *)w->q;
    const int rows = (int)w->rows, cols = (int)w->cols;
    switch (n_tok) {
#define MV_CASE(N)                                                                                  \
    case N:                                                                                         \
        cuda_matvec_kernel<QT, N><<<grid, MV_WARPS * 32, 0, s>>>(q, w->row_bytes, rows, cols, x, y, add); \
        break;
        MV_CASE(1) MV_CASE(2) MV_CASE(3) MV_CASE(4) MV_CASE(5) MV_CASE(6) MV_CASE(7) MV_CASE(8)
#undef MV_CASE
    default: break;
    }
}

static int cuda_gemm(be_cuda *c, const be_weight *w, const float *x, int n_tok, float *y, bool add)
{
    const float one = 1.0f, beta = add ? 1.0f : 0.0f;
    const int rows = (int)w->rows, cols = (int)w->cols;
    /* row-major y[n_tok][rows] = x[n_tok][cols] W[rows][cols]^T is, column-major,
     * Y(rows x n_tok) = W^T' (W stored cols x rows, ld cols, transposed) * X (cols x n_tok) */
    if (w->f) {
        BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n_tok, cols, &one, w->f,
                                CUDA_R_32F, cols, x, CUDA_R_32F, cols, &beta, y, CUDA_R_32F, rows,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        return HY_OK;
    }
    size_t n = 0, bytes = 0;
    if (hy_mul_size((size_t)n_tok, (size_t)cols, &n) || hy_mul_size(n, sizeof(__half), &bytes))
        return hy_err_set(HY_ELIMIT, "CUDA matmul: activation too large");
    void *xh = NULL;
    int rc = cuda_scratch(c, SCR_XH, bytes, &xh);
    if (rc)
        return rc;
    cuda_f32_to_f16_kernel<<<cuda_grid((int64_t)n, 256), 256, 0, c->stream>>>(x, (int64_t)n,
                                                                              (__half *)xh);
    CU_LAUNCHED("cuda_f32_to_f16_kernel");
    BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n_tok, cols, &one, w->h,
                            CUDA_R_16F, cols, xh, CUDA_R_16F, cols, &beta, y, CUDA_R_32F, rows,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return HY_OK;
}

/* the row kernel reads this weight type, x is float4-aligned and no A/B run asked otherwise */
static bool cuda_mv_rows_ok(const be_cuda *c, const be_weight *w, const float *x)
{
    return (w->type == Q_Q4_0 || w->type == Q_Q4_1 || w->type == Q_Q8_0 || w->type == Q_Q4_K) &&
           ((uintptr_t)x % 16) == 0 && !c->mv_legacy;
}

static int cuda_matmul_one(be_cuda *c, const be_weight *w, const float *x, int n_tok, float *y, bool add)
{
    if (!w || n_tok < 0)
        return hy_err_set(HY_EINVAL, "CUDA matmul: bad arguments");
    if (n_tok == 0)
        return HY_OK;
    if (cuda_type_quantised(w->type) && n_tok <= c->mv_max_tok) {
        if (cuda_mv_rows_ok(c, w, x)) {
            CQ_DISPATCH(w->type, cuda_mv_rows_launch<QT>(c->stream, 1, &w, x, n_tok, &y, add, MV_IN_X, mv_in{}));
            CU_LAUNCHED("cuda_mv_rows_kernel");
            return HY_OK;
        }
        CQ_DISPATCH(w->type, cuda_matvec_launch<QT>(c->stream, w, x, n_tok, y, add));
        CU_LAUNCHED("cuda_matvec_kernel");
        return HY_OK;
    }
    return cuda_gemm(c, w, x, n_tok, y, add);
}

int cuda_matmul(be *b, const be_weight *w, const float *x, int n_tok, float *y)
{
    return cuda_matmul_one(cuda_ctx(b), w, x, n_tok, y, false);
}

/* matmul_n's input transform as a separate pass into in->out (when the row kernel cannot fuse it) */
static int cuda_mm_in_pass(be *b, const be_mm_in *in, const float *x, int n_tok, int64_t cols)
{
    if (in->kind == BE_IN_RMSNORM)
        return cuda_rmsnorm(b, x, in->w, n_tok, cols, in->eps, in->out);
    return cuda_swiglu(b, x, in->up, n_tok, cols, in->out);
}

static bool cuda_al16(const void *p) { return ((uintptr_t)p % 16) == 0; }

int cuda_matmul_n(be *b, int n, const be_weight *const *w, const float *x, const be_mm_in *in, int n_tok,
                  float *const *y, bool add)
{
    be_cuda *c = cuda_ctx(b);
    if (n < 1 || n > BE_MM_MAX || !w || !y || n_tok < 0)
        return hy_err_set(HY_EINVAL, "CUDA matmul_n: bad arguments");
    for (int i = 0; i < n; i++)
        if (!w[i])
            return hy_err_set(HY_EINVAL, "CUDA matmul_n: weight %d is NULL", i);
    int rc0 = be_mm_in_check(in, x);
    if (rc0)
        return rc0;
    const int mode = !in ? MV_IN_X : in->kind == BE_IN_RMSNORM ? MV_IN_RMS : in->kind == BE_IN_SWIGLU ? MV_IN_SWIGLU : MV_IN_X;
    if (n_tok == 0)
        return HY_OK;
    /* one row-kernel launch: mat-vec sizes, one type and width, aligned vectors */
    bool fuse = n_tok <= c->mv_max_tok && cuda_mv_rows_ok(c, w[0], x) && (n > 1 || mode != MV_IN_X);
    int64_t blocks = 0;
    for (int i = 0; i < n && fuse; i++) {
        fuse = w[i]->type == w[0]->type && w[i]->cols == w[0]->cols;
        blocks += w[i]->rows; /* an upper bound (R >= 1 rows per block) */
    }
    if (mode != MV_IN_X)
        fuse = fuse && cuda_al16(in->out) && (mode == MV_IN_RMS ? cuda_al16(in->w) : cuda_al16(in->up));
    if (fuse && blocks <= INT32_MAX) {
        const mv_in d = {mode == MV_IN_RMS ? in->w : NULL, mode == MV_IN_RMS ? in->eps : 0.0f,
                         mode == MV_IN_SWIGLU ? in->up : NULL, mode != MV_IN_X ? in->out : NULL};
        CQ_DISPATCH(w[0]->type, cuda_mv_rows_launch<QT>(c->stream, n, w, x, n_tok, y, add, mode, d));
        CU_LAUNCHED("cuda_mv_rows_kernel");
        return HY_OK;
    }
    if (mode != MV_IN_X) {
        int rc = cuda_mm_in_pass(b, in, x, n_tok, w[0]->cols);
        if (rc)
            return rc;
        x = in->out;
    }
    for (int i = 0; i < n; i++) {
        int rc = cuda_matmul_one(c, w[i], x, n_tok, y[i], add);
        if (rc)
            return rc;
    }
    return HY_OK;
}
