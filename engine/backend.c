/* backend.c - picks a backend for --device auto|cpu|cuda (the CUDA constructor lives in
 * kernels/ and exists only in builds with nvcc; elsewhere be_cuda_create says why not), and the
 * argument checks every backend shares. */
#include "backend.h"
#include "hy.h"

#include <stdio.h>
#include <string.h>

#ifndef HY_HAVE_CUDA
bool be_cuda_compiled(void) { return false; }
int be_cuda_create(int device, be **out)
{
    *out = NULL;
    return hy_err_set(HY_EDEVICE, "this hydrad was built without CUDA (nvcc was not found at build time)");
}
#endif

int be_open(const char *device, int n_threads, be **out)
{
    *out = NULL;
    if (!device || !strcmp(device, "cpu"))
        return be_cpu_create(n_threads, out);
    if (!strcmp(device, "cuda"))
        return be_cuda_create(0, out);
    if (strcmp(device, "auto"))
        return hy_err_set(HY_EINVAL, "unknown --device '%s' (expected auto, cpu or cuda)", device);
    if (be_cuda_create(0, out) == HY_OK)
        return HY_OK;
    fprintf(stderr, "hydrad: using the CPU backend: %s\n", hy_err_msg());
    hy_err_clear();
    return be_cpu_create(n_threads, out);
}

int be_mm_in_check(const be_mm_in *in, const float *x)
{
    if (!in || in->kind == BE_IN_X)
        return HY_OK;
    if (in->kind != BE_IN_RMSNORM && in->kind != BE_IN_SWIGLU)
        return hy_err_set(HY_EINVAL, "matmul_n: unknown input transform %d", (int)in->kind);
    if (!in->out || (in->kind == BE_IN_RMSNORM ? !in->w : !in->up))
        return hy_err_set(HY_EINVAL, "matmul_n: input transform without its %s",
                          !in->out ? "output" : in->kind == BE_IN_RMSNORM ? "norm weights" : "up input");
    /* a device computes the transform while other blocks still read x and up */
    if (in->out == x || (in->kind == BE_IN_SWIGLU && in->out == in->up))
        return hy_err_set(HY_EINVAL, "matmul_n: the input transform may not be stored over its inputs");
    return HY_OK;
}
