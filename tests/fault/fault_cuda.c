/* fault_cuda.c - FAULT_CUDA (fault.h): __wrap_ for the CUDA runtime and cuBLAS calls kernels/
 * makes, in the CPU emulator build (tests/cuda_emu), where those functions are C++: the wrapped
 * symbols are the emulator's mangled names (listed in tests/fault/fault.mk, from
 * `nm emu_runtime.o`), defined here with C linkage and the same argument registers (enums as
 * int, pointers as void *). Test-only, linked into the emulator's test_fault only. */
#include "tests/fault/fault.h"

#include <stddef.h>

enum { E_ALLOC = 2, E_LAUNCH = 719, CUBLAS_ALLOC = 3, CUBLAS_EXEC = 13 };

#define CALLER __builtin_return_address(0)
#define FAIL(site) fault_should_fail(FAULT_CUDA, site, CALLER)

/* One wrapper: RET __wrap_SYM(PARAMS) { if (FAIL(NAME)) return ERR; return __real_SYM(ARGS); } */
#define WRAP(ret, sym, name, err, params, args)                                                   \
    ret __real_##sym params;                                                                      \
    ret __wrap_##sym params;                                                                      \
    ret __wrap_##sym params                                                                       \
    {                                                                                             \
        if (FAIL(name))                                                                           \
            return err;                                                                           \
        return __real_##sym args;                                                                 \
    }

WRAP(int, _Z10cudaMallocPPvm, "cudaMalloc", E_ALLOC, (void **p, size_t n), (p, n))
WRAP(int, _Z13cudaHostAllocPPvmj, "cudaHostAlloc", E_ALLOC, (void **p, size_t n, unsigned f), (p, n, f))
WRAP(int, _Z14cudaMallocHostPPvm, "cudaMallocHost", E_ALLOC, (void **p, size_t n), (p, n))
WRAP(int, _Z10cudaMemcpyPvPKvm14cudaMemcpyKind, "cudaMemcpy", E_LAUNCH,
     (void *d, const void *s, size_t n, int k), (d, s, n, k))
WRAP(int, _Z15cudaMemcpyAsyncPvPKvm14cudaMemcpyKindP10emu_stream, "cudaMemcpyAsync", E_LAUNCH,
     (void *d, const void *s, size_t n, int k, void *st), (d, s, n, k, st))
WRAP(int, _Z10cudaMemsetPvim, "cudaMemset", E_LAUNCH, (void *d, int v, size_t n), (d, v, n))
WRAP(int, _Z15cudaMemsetAsyncPvimP10emu_stream, "cudaMemsetAsync", E_LAUNCH, (void *d, int v, size_t n, void *st),
     (d, v, n, st))
WRAP(int, _Z25cudaStreamCreateWithFlagsPP10emu_streamj, "cudaStreamCreateWithFlags", E_ALLOC, (void **s, unsigned f),
     (s, f))
WRAP(int, _Z16cudaStreamCreatePP10emu_stream, "cudaStreamCreate", E_ALLOC, (void **s), (s))
WRAP(int, _Z24cudaEventCreateWithFlagsPP9emu_eventj, "cudaEventCreateWithFlags", E_ALLOC, (void **e, unsigned f),
     (e, f))
WRAP(int, _Z15cudaEventCreatePP9emu_event, "cudaEventCreate", E_ALLOC, (void **e), (e))
WRAP(int, _Z15cudaEventRecordP9emu_eventP10emu_stream, "cudaEventRecord", E_LAUNCH, (void *e, void *s), (e, s))
WRAP(int, _Z21cudaStreamSynchronizeP10emu_stream, "cudaStreamSynchronize", E_LAUNCH, (void *s), (s))
WRAP(int, _Z20cudaEventSynchronizeP9emu_event, "cudaEventSynchronize", E_LAUNCH, (void *e), (e))
WRAP(int, _Z19cudaStreamWaitEventP10emu_streamP9emu_eventj, "cudaStreamWaitEvent", E_LAUNCH,
     (void *s, void *e, unsigned f), (s, e, f))
WRAP(int, _Z20cudaGraphInstantiatePP16emu_graph_exec_tP11emu_graph_ty, "cudaGraphInstantiate", E_ALLOC,
     (void **x, void *g, unsigned long long f), (x, g, f))
WRAP(int, _Z15cudaGraphLaunchP16emu_graph_exec_tP10emu_stream, "cudaGraphLaunch", E_LAUNCH, (void *x, void *s),
     (x, s))
WRAP(int, _Z22cudaStreamBeginCaptureP10emu_stream21cudaStreamCaptureMode, "cudaStreamBeginCapture", E_LAUNCH,
     (void *s, int m), (s, m))
/* A failed end of capture still ends it (the capture is invalidated, no graph comes back): leave
 * the stream capturing and every later call fails, which no GPU does. */
int __real__Z20cudaStreamEndCaptureP10emu_streamPP11emu_graph_t(void *s, void **g);
int __wrap__Z20cudaStreamEndCaptureP10emu_streamPP11emu_graph_t(void *s, void **g);
int _Z16cudaGraphDestroyP11emu_graph_t(void *g);
int __wrap__Z20cudaStreamEndCaptureP10emu_streamPP11emu_graph_t(void *s, void **g)
{
    bool fail = FAIL("cudaStreamEndCapture");
    int e = __real__Z20cudaStreamEndCaptureP10emu_streamPP11emu_graph_t(s, g);
    if (!fail || e)
        return e;
    if (*g)
        _Z16cudaGraphDestroyP11emu_graph_t(*g);
    *g = NULL;
    return E_LAUNCH;
}
WRAP(int, _Z13cudaSetDevicei, "cudaSetDevice", E_LAUNCH, (int d), (d))
WRAP(int, _Z18cudaGetDeviceCountPi, "cudaGetDeviceCount", E_LAUNCH, (int *n), (n))
WRAP(int, _Z23cudaGetDevicePropertiesP14cudaDevicePropi, "cudaGetDeviceProperties", E_LAUNCH, (void *p, int d),
     (p, d))
WRAP(int, _Z20cudaFuncSetAttributePKv17cudaFuncAttributei, "cudaFuncSetAttribute", E_LAUNCH,
     (const void *fn, int a, int v), (fn, a, v))
WRAP(int, _Z16cudaGetLastErrorv, "cudaGetLastError (a launch)", E_LAUNCH, (void), ())
WRAP(int, _Z12cublasCreatePP8emu_blas, "cublasCreate", CUBLAS_ALLOC, (void **h), (h))
WRAP(int, _Z15cublasSetStreamP8emu_blasP10emu_stream, "cublasSetStream", CUBLAS_EXEC, (void *h, void *s), (h, s))
WRAP(int, _Z17cublasSetMathModeP8emu_blas12cublasMath_t, "cublasSetMathMode", CUBLAS_EXEC, (void *h, int m), (h, m))
WRAP(int, _Z12cublasGemmExP8emu_blas17cublasOperation_tS1_iiiPKvS3_14cudaDataType_tiS3_S4_iS3_PvS4_i19cublasComputeType_t16cublasGemmAlgo_t,
     "cublasGemmEx", CUBLAS_EXEC,
     (void *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int at, int lda, const void *B,
      int bt, int ldb, const void *beta, void *C, int ct, int ldc, int comp, int algo),
     (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, comp, algo))
