/* cuda_rmsnorm.cu - y[t] = x[t] / rms(x[t]) * w, one block per token (y may alias x:
 * every thread reads its elements for the reduction before any thread writes). */
#include "kernels/cuda.h"

#define RMS_THREADS 256

__global__ void __launch_bounds__(RMS_THREADS)
    cuda_rmsnorm_kernel(const float *x, const float *w, int64_t dim, float eps, float *y)
{
    __shared__ float part[RMS_THREADS / 32];
    const float *xt = x + (size_t)blockIdx.x * dim;
    float *yt = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += RMS_THREADS)
        ss += xt[i] * xt[i];
    ss = cuda_warp_sum(ss);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float tot = 0.0f;
#pragma unroll
    for (int i = 0; i < RMS_THREADS / 32; i++)
        tot += part[i];
    const float scale = 1.0f / sqrtf(tot / (float)dim + eps);
    for (int64_t i = threadIdx.x; i < dim; i += RMS_THREADS)
        yt[i] = xt[i] * scale * w[i];
}

int cuda_rmsnorm(be *b, const float *x, const float *w, int n_tok, int64_t dim, float eps, float *y)
{
    be_cuda *c = cuda_ctx(b);
    if (n_tok < 0 || dim <= 0)
        return hy_err_set(HY_EINVAL, "CUDA rmsnorm: bad shape");
    if (n_tok == 0)
        return HY_OK;
    cuda_rmsnorm_kernel<<<(unsigned)n_tok, RMS_THREADS, 0, c->stream>>>(x, w, dim, eps, y);
    CU_LAUNCHED("cuda_rmsnorm_kernel");
    return HY_OK;
}
