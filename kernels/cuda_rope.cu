/* cuda_rope.cu - in-place RoPE, adjacent-pair ("normal" GGUF) layout: elements (2i, 2i+1) of
 * each head rotate by pos * freq[i]. The host frequency table is copied once and cached by
 * content; positions are uploaded when they change (once per step, not per call). */
#include "kernels/cuda.h"

#include <stdlib.h>

__global__ void cuda_rope_kernel(float *x, const int32_t *pos, int n_tok, int n_heads, int half,
                                 const float *freq)
{
    const int64_t total = (int64_t)n_tok * n_heads * half;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t th = i / half; /* token * n_heads + head */
        const int k = (int)(i - th * half);
        const int t = (int)(th / n_heads);
        float s, co;
        sincosf((float)pos[t] * freq[k], &s, &co);
        float *p = x + th * (2 * half) + 2 * k;
        const float x0 = p[0], x1 = p[1];
        p[0] = x0 * co - x1 * s;
        p[1] = x0 * s + x1 * co;
    }
}

/* Device copy of freq[0..n), cached by content so one table per model costs one copy. */
static int cuda_rope_freq(be_cuda *c, const float *freq, int n, const float **out)
{
    for (int i = 0; i < CUDA_ROPE_CACHE; i++) {
        if (c->rope[i].dev && c->rope[i].n == n && !memcmp(c->rope[i].host, freq, n * sizeof(float))) {
            *out = c->rope[i].dev;
            return HY_OK;
        }
    }
    int slot = c->rope_next;
    c->rope_next = (c->rope_next + 1) % CUDA_ROPE_CACHE;
    /* queued kernels may still read the entry we replace */
    CU_CHECK(cudaStreamSynchronize(c->stream));
    c->epoch++;
    free(c->rope[slot].host);
    c->rope[slot].host = NULL;
    if (c->rope[slot].dev)
        cudaFree(c->rope[slot].dev);
    c->rope[slot].dev = NULL;
    c->rope[slot].n = 0;
    float *h = (float *)malloc(n * sizeof(float));
    if (!h)
        return hy_err_set(HY_ENOMEM, "out of memory (RoPE table)");
    memcpy(h, freq, n * sizeof(float));
    float *d = NULL;
    cudaError_t e = cudaMalloc((void **)&d, n * sizeof(float));
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(d, h, n * sizeof(float), cudaMemcpyHostToDevice, c->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        free(h);
        if (d)
            cudaFree(d);
        return cuda_err(e, "RoPE table upload", __FILE__, __LINE__);
    }
    c->rope[slot].host = h;
    c->rope[slot].dev = d;
    c->rope[slot].n = n;
    *out = d;
    return HY_OK;
}

int cuda_rope(be *b, float *x, const int32_t *pos, int n_tok, int n_heads, int head_dim,
              const float *freq)
{
    be_cuda *c = cuda_ctx(b);
    if (n_tok < 0 || n_heads <= 0 || head_dim <= 0 || (head_dim & 1) || !freq)
        return hy_err_set(HY_EINVAL, "CUDA rope: bad shape (head_dim %d)", head_dim);
    if (n_tok == 0)
        return HY_OK;
    const float *fd = NULL;
    int rc = cuda_rope_freq(c, freq, head_dim / 2, &fd);
    if (rc)
        return rc;
    void *dev = NULL;
    const void *parts[1] = {pos};
    const size_t sizes[1] = {(size_t)n_tok * sizeof(int32_t)};
    /* q and k of every layer rotate by the same positions: one upload per step */
    rc = cuda_meta_cached(c, &c->mc[MC_ROPE], parts, sizes, 1, &dev);
    if (rc)
        return rc;
    const int64_t total = (int64_t)n_tok * n_heads * (head_dim / 2);
    cuda_rope_kernel<<<cuda_grid(total, 256), 256, 0, c->stream>>>(x, (const int32_t *)dev, n_tok,
                                                                   n_heads, head_dim / 2, fd);
    CU_LAUNCHED("cuda_rope_kernel");
    return HY_OK;
}
