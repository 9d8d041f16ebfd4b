/* backend.c - picks a backend for --device auto|cpu|cuda. The CUDA constructor lives in
 * kernels/ and exists only in builds with nvcc; elsewhere be_cuda_create says why not. */
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
