/* cuda_weight.cu - base-model weights on the device (weight_create / weight_free): raw GGUF
 * blocks for the mat-vec kernels plus a once-dequantised fp16 copy for cuBLAS; F32 and BF16
 * become fp32. It computes no products (cuda_matmul.cu does). */
#include "kernels/cuda.h"
#include "kernels/cuda_quant.cuh"

#include <limits.h>
#include <stdlib.h>

bool cuda_type_quantised(uint32_t type)
{
    return type == Q_Q4_0 || type == Q_Q4_1 || type == Q_Q8_0 || type == Q_Q4_K || type == Q_Q6_K;
}

template <int QT>
__global__ void cuda_dequant_f16_kernel(const uint8_t *q, size_t row_bytes, int64_t rows, int cols,
                                        __half *h)
{
    const int64_t per_row = cols / 8;
    const int64_t total = rows * per_row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / per_row;
        const int c = (int)(i - r * per_row);
        float w[8];
        int idx[8];
        cq_chunk<QT>(q + r * row_bytes, c, w, idx);
        __half *o = h + r * cols;
#pragma unroll
        for (int k = 0; k < 8; k++)
            o[idx[k]] = __float2half_rn(w[k]);
    }
}

__global__ void cuda_bf16_widen_kernel(const uint16_t *src, int64_t n, float *dst)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

static int cuda_dequant_launch(be_cuda *c, const be_weight *w)
{
    const int64_t total = w->rows * (w->cols / 8);
    const unsigned grid = cuda_grid(total, 256);
    CQ_DISPATCH(w->type, (cuda_dequant_f16_kernel<QT><<<grid, 256, 0, c->stream>>>(
                             (const uint8_t *)w->q, w->row_bytes, w->rows, (int)w->cols, w->h)));
    CU_LAUNCHED("cuda_dequant_f16_kernel");
    return HY_OK;
}

void cuda_weight_free(be *b, be_weight *w)
{
    if (!w)
        return;
    if (b)
        cuda_ctx(b)->epoch++;
    if (w->h && (void *)w->h != w->q)
        cudaFree(w->h);
    if (w->q)
        cudaFree(w->q);
    if (w->f)
        cudaFree(w->f);
    free(w);
}

/* Owns nothing of `data`: it is copied before return. *out is freed with cuda_weight_free. */
int cuda_weight_create(be *b, uint32_t type, int64_t rows, int64_t cols, const void *data,
                       be_weight **out)
{
    be_cuda *c = cuda_ctx(b);
    int rc = HY_OK;
    size_t row_bytes = 0, bytes = 0, elems = 0;
    void *tmp = NULL;
    *out = NULL;
    if (rows <= 0 || cols <= 0 || rows > INT_MAX || cols > INT_MAX || !data)
        return hy_err_set(HY_EINVAL, "CUDA weight: bad shape %lld x %lld", (long long)rows,
                          (long long)cols);
    if (!q_supported(type) || !(type == Q_F32 || type == Q_F16 || type == Q_BF16 ||
                                cuda_type_quantised(type)))
        return hy_err_set(HY_EUNSUPPORTED, "CUDA backend: tensor type %s is not supported",
                          q_type_name(type));
    rc = q_row_bytes(type, cols, &row_bytes);
    if (rc)
        return rc;
    if (hy_mul_size((size_t)rows, row_bytes, &bytes) || hy_mul_size((size_t)rows, (size_t)cols, &elems))
        return hy_err_set(HY_ELIMIT, "CUDA weight: %lld x %lld is too large", (long long)rows,
                          (long long)cols);
    be_weight *w = (be_weight *)calloc(1, sizeof *w);
    if (!w)
        return hy_err_set(HY_ENOMEM, "out of memory (CUDA weight)");
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = row_bytes;
    c->epoch++;

    if (type == Q_F32) {
        CU_GOTO(cudaMalloc((void **)&w->f, bytes));
        CU_GOTO(cudaMemcpyAsync(w->f, data, bytes, cudaMemcpyHostToDevice, c->stream));
    } else if (type == Q_BF16) {
        CU_GOTO(cudaMalloc(&tmp, bytes));
        CU_GOTO(cudaMalloc((void **)&w->f, elems * sizeof(float)));
        CU_GOTO(cudaMemcpyAsync(tmp, data, bytes, cudaMemcpyHostToDevice, c->stream));
        cuda_bf16_widen_kernel<<<cuda_grid((int64_t)elems, 256), 256, 0, c->stream>>>(
            (const uint16_t *)tmp, (int64_t)elems, w->f);
        CU_GOTO(cudaGetLastError());
    } else if (type == Q_F16) {
        CU_GOTO(cudaMalloc(&w->q, bytes));
        CU_GOTO(cudaMemcpyAsync(w->q, data, bytes, cudaMemcpyHostToDevice, c->stream));
        w->h = (__half *)w->q;
    } else {
        CU_GOTO(cudaMalloc(&w->q, bytes));
        CU_GOTO(cudaMalloc((void **)&w->h, elems * sizeof(__half)));
        CU_GOTO(cudaMemcpyAsync(w->q, data, bytes, cudaMemcpyHostToDevice, c->stream));
        rc = cuda_dequant_launch(c, w);
        if (rc)
            goto fail;
    }
    /* data (often the mmap) must be fully read and tmp unused before we return */
    CU_GOTO(cudaStreamSynchronize(c->stream));
    if (tmp)
        cudaFree(tmp);
    *out = w;
    return HY_OK;
fail:
    if (c->stream)
        cudaStreamSynchronize(c->stream);
    if (tmp)
        cudaFree(tmp);
    cuda_weight_free(b, w);
    if (rc == HY_EDEVICE)
        cudaGetLastError(); /* clear a non-sticky out-of-memory so later ops can run */
    return rc;
}
