/* cuda_swiglu.cu - out = silu(gate) * up, elementwise over [n_tok][dim] (out may alias gate). */
#include "kernels/cuda.h"

__global__ void cuda_swiglu_kernel(const float *gate, const float *up, int64_t n, float *out)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

int cuda_swiglu(be *b, const float *gate, const float *up, int n_tok, int64_t dim, float *out)
{
    be_cuda *c = cuda_ctx(b);
    if (n_tok < 0 || dim < 0)
        return hy_err_set(HY_EINVAL, "CUDA swiglu: bad shape");
    const int64_t n = (int64_t)n_tok * dim;
    if (n == 0)
        return HY_OK;
    cuda_swiglu_kernel<<<cuda_grid(n, 256), 256, 0, c->stream>>>(gate, up, n, out);
    CU_LAUNCHED("cuda_swiglu_kernel");
    return HY_OK;
}
