/* cuda_rope.cu - the first pass of the attention op: RoPE on q and k in place (adjacent-pair,
 * "normal" GGUF layout: elements (2i, 2i+1) of each head rotate by pos * freq[i]) and the store
 * of this step's k and v into their KV-cache slots (fp16), in one kernel. The host frequency
 * table is copied once and cached by content; positions and slots come with the attention
 * metadata (uploaded once per step). */
#include "kernels/cuda.h"

#include <stdlib.h>

/* One thread per pair (2i, 2i+1) of a head: the pairs of q (rotated in place), then those of k
 * (rotated in place and stored to the cache), then those of v (stored). freq NULL: no rotation,
 * and q is not touched. */
__global__ void cuda_rope_store_kernel(float *q, float *k, const float *v, const int32_t *pos,
                                       const int32_t *slot, int n_tok, int n_heads, int n_kv,
                                       int half, const float *freq, __half *kc, __half *vc)
{
    const int64_t nq = freq ? (int64_t)n_tok * n_heads * half : 0;
    const int64_t nk = (int64_t)n_tok * n_kv * half;
    const int kvdim = 2 * n_kv * half;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nq + 2 * nk;
         i += (int64_t)gridDim.x * blockDim.x) {
        const bool is_q = i < nq, is_v = i >= nq + nk;
        const int64_t j = is_q ? i : i - nq - (is_v ? nk : 0); /* pair index in its array */
        const int64_t th = j / half;                           /* token * heads + head */
        const int pr = (int)(j - th * half);
        const int t = (int)(th / (is_q ? n_heads : n_kv));
        const int64_t e = 2 * j; /* first element of the pair in [n_tok][heads * 2 half] */
        if (is_v) {
            const size_t dst = (size_t)slot[t] * kvdim + (size_t)(e - (int64_t)t * kvdim);
            vc[dst] = __float2half_rn(v[e]);
            vc[dst + 1] = __float2half_rn(v[e + 1]);
            continue;
        }
        float *p = (is_q ? q : k) + e;
        float x0 = p[0], x1 = p[1];
        if (freq) {
            float sn, cs;
            sincosf((float)pos[t] * freq[pr], &sn, &cs);
            const float r0 = x0 * cs - x1 * sn, r1 = x0 * sn + x1 * cs;
            x0 = r0;
            x1 = r1;
            p[0] = x0;
            p[1] = x1;
        }
        if (!is_q) {
            const size_t dst = (size_t)slot[t] * kvdim + (size_t)(e - (int64_t)t * kvdim);
            kc[dst] = __float2half_rn(x0);
            kc[dst + 1] = __float2half_rn(x1);
        }
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

int cuda_rope_store(be_cuda *c, const int32_t *d, float *q, float *k, const float *v, int n_tok,
                    int n_heads, int n_kv, int head_dim, const float *freq, void *k_cache, void *v_cache)
{
    const float *fd = NULL;
    if (freq) {
        int rc = cuda_rope_freq(c, freq, head_dim / 2, &fd);
        if (rc)
            return rc;
    }
    const int half = head_dim / 2;
    const int64_t pairs = (int64_t)n_tok * half * ((freq ? n_heads : 0) + 2 * (int64_t)n_kv);
    cuda_rope_store_kernel<<<cuda_grid(pairs, 256), 256, 0, c->stream>>>(
        q, k, v, d, d + 2 * n_tok, n_tok, n_heads, n_kv, half, fd, (__half *)k_cache, (__half *)v_cache);
    CU_LAUNCHED("cuda_rope_store_kernel");
    return HY_OK;
}
