/* cuda_embed.cu - out[t] = row ids[t] of the embedding matrix, read in its stored format
 * (GGUF blocks dequantised in fp32, fp16 widened, fp32 copied). ids arrive on the host and
 * are range-checked there; a bad id is an error, never an out-of-bounds read. */
#include "kernels/cuda.h"
#include "kernels/cuda_quant.cuh"

template <int QT>
__global__ void cuda_embed_q_kernel(const uint8_t *q, size_t row_bytes, int cols, const int32_t *ids,
                                    int n_tok, float *out)
{
    const int per_row = cols / 8;
    const int64_t total = (int64_t)n_tok * per_row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int t = (int)(i / per_row);
        const int c = (int)(i - (int64_t)t * per_row);
        float w[8];
        int idx[8];
        cq_chunk<QT>(q + (size_t)ids[t] * row_bytes, c, w, idx);
        float *o = out + (size_t)t * cols;
#pragma unroll
        for (int k = 0; k < 8; k++)
            o[idx[k]] = w[k];
    }
}

__global__ void cuda_embed_dense_kernel(const float *f, const __half *h, int cols, const int32_t *ids,
                                        int n_tok, float *out)
{
    const int64_t total = (int64_t)n_tok * cols;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int t = (int)(i / cols);
        const int j = (int)(i - (int64_t)t * cols);
        const size_t src = (size_t)ids[t] * cols + j;
        out[i] = f ? f[src] : __half2float(h[src]);
    }
}

int cuda_embed(be *b, const be_weight *emb, const int32_t *ids, int n_tok, float *out)
{
    be_cuda *c = cuda_ctx(b);
    if (!emb || n_tok < 0 || (n_tok > 0 && !ids))
        return hy_err_set(HY_EINVAL, "CUDA embed: bad arguments");
    if (n_tok == 0)
        return HY_OK;
    for (int t = 0; t < n_tok; t++)
        if (ids[t] < 0 || ids[t] >= emb->rows)
            return hy_err_set(HY_EINVAL, "token id %d out of range (vocabulary has %lld tokens)",
                              (int)ids[t], (long long)emb->rows);
    void *host = NULL, *dev = NULL;
    const size_t n = (size_t)n_tok * sizeof(int32_t);
    const void *parts[1] = {ids};
    dev = (void *)cuda_arena_find(c, parts, &n, 1); /* this step's copy (step_begin) */
    if (!dev) {
        int rc = cuda_meta_get(c, n, &host, &dev);
        if (rc)
            return rc;
        memcpy(host, ids, n);
        if ((rc = cuda_stage_put(c, dev)))
            return rc;
    }
    const int cols = (int)emb->cols;
    if (cuda_type_quantised(emb->type)) {
        const unsigned grid = cuda_grid((int64_t)n_tok * (cols / 8), 256);
        CQ_DISPATCH(emb->type, (cuda_embed_q_kernel<QT><<<grid, 256, 0, c->stream>>>(
                                   (const uint8_t *)emb->q, emb->row_bytes, cols,
                                   (const int32_t *)dev, n_tok, out)));
    } else {
        cuda_embed_dense_kernel<<<cuda_grid((int64_t)n_tok * cols, 256), 256, 0, c->stream>>>(
            emb->f, emb->h, cols, (const int32_t *)dev, n_tok, out);
    }
    CU_LAUNCHED("cuda_embed kernel");
    return HY_OK;
}
