/* cuda_add.cu - a[i] += x[i] on the device (residual connections). Elementwise only. */
#include "kernels/cuda.h"

__global__ void cuda_add_kernel(float *a, const float *x, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        a[i] += x[i];
}

int cuda_add(be *b, float *a, const float *x, int64_t n)
{
    be_cuda *c = cuda_ctx(b);
    if (n < 0)
        return hy_err_set(HY_EINVAL, "CUDA add: negative length");
    if (n == 0)
        return HY_OK;
    cuda_add_kernel<<<cuda_grid(n, 256), 256, 0, c->stream>>>(a, x, n);
    CU_LAUNCHED("cuda_add_kernel");
    return HY_OK;
}
