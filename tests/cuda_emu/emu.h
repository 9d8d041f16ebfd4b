/* emu.h - the CUDA emulator's view of CUDA: force-included (g++ -include) into every kernels/ source
 * that tests/cuda_emu/cudapp.py has rewritten, so that the REAL kernels run on the CPU. It declares
 * the host API our kernels call (cudaMalloc, streams, events, cublasGemmEx: defined in
 * emu_runtime.cpp, no libcudart/libcublas), the device types (__half, float4, dim3), and the
 * device side: threadIdx & co, __syncthreads, warp shuffles that really exchange values among the
 * 32 lanes, __ldg with an alignment check, atomics, __shared__ storage per emulated block.
 * A test tool for kernel LOGIC only (indexing, masking, barriers, shared memory, reductions): it
 * says nothing about speed, and the real GPU runs stay the final word.
 * Only what kernels/ uses is here; a kernel that needs more fails to compile under the emulator
 * with a plain "not declared" error: add the missing piece here, never a workaround in kernels/. */
#ifndef HY_CUDA_EMU_H
#define HY_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define HY_CUDA_EMU 1

/* ---- qualifiers: the emulator compiles device code as ordinary host C++ ---- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __constant__ static
#define __align__(n) alignas(n)
/* cudapp.py rewrites each `__shared__ T name[...];` into per-block storage (emu::shared_var);
 * a form it cannot rewrite falls back to this, which is shared by every block a worker runs
 * (not poisoned between blocks) - cudapp.py warns when that happens. */
#define __shared__ static thread_local
/* __restrict__ is a g++ keyword already. */

/* ---- vector types (alignment as on the device: misaligned vector loads are caught) ---- */
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }

/* ---- fp16: IEEE binary16 bits, conversions round to nearest even like the device's _rn ---- */
struct __half { unsigned short __x; };
struct alignas(4) __half2 { __half x, y; };
typedef __half half;
typedef __half2 half2;

static inline unsigned short emu_f32_to_f16_bits(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) /* inf stays inf; NaN becomes the device's canonical NaN */
        return (unsigned short)(x > 0x7f800000u ? 0x7fffu : (sign | 0x7c00u));
    const int e = (int)(x >> 23) - 127 + 15; /* exponent as a half */
    if (e >= 31)
        return (unsigned short)(sign | 0x7c00u);
    const uint32_t m = (x & 0x7fffffu) | 0x800000u; /* 24 significant bits */
    const int shift = e >= 1 ? 13 : 13 + 1 - e;     /* subnormal halves drop more bits */
    if (shift > 25 || (x >> 23) == 0)
        return (unsigned short)sign; /* below half the smallest subnormal (or a float subnormal) */
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u)))
        r++;
    if (e >= 1) /* r in [0x400, 0x800]: a carry moves into the exponent (and may reach inf) */
        return (unsigned short)(sign | (((uint32_t)e << 10) + r - 0x400u));
    return (unsigned short)(sign | r); /* r == 0x400 is the smallest normal: same encoding */
}

static inline float emu_f16_bits_to_f32(unsigned short h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    if (e == 31)
        u = sign | 0x7f800000u | (m << 13);
    else
        u = sign | ((e + 112u) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __half __float2half_rn(float f) { return __half{emu_f32_to_f16_bits(f)}; }
static inline __half __float2half(float f) { return __float2half_rn(f); }
static inline float __half2float(__half h) { return emu_f16_bits_to_f32(h.__x); }
static inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
static inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
static inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
static inline float __low2float(__half2 h) { return __half2float(h.x); }
static inline float __high2float(__half2 h) { return __half2float(h.y); }

/* ---- bit casts and math intrinsics ---- */
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
/* __expf and __logf: glibc declares them (the same functions as expf and logf) */
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

/* ---- runtime API (host side): types and the subset kernels/ calls ---- */
typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorMisalignedAddress = 716,
    cudaErrorLaunchFailure = 719,
    cudaErrorUnknown = 999
} cudaError_t;

typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
} cudaMemcpyKind;

typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01
#define cudaHostAllocMapped 0x02
#define cudaHostAllocWriteCombined 0x04

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int regsPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    int major, minor;
    int multiProcessorCount;
    int maxThreadsPerMultiProcessor;
    int l2CacheSize;
};

struct cudaFuncAttributes {
    size_t sharedSizeBytes;
    size_t constSizeBytes;
    size_t localSizeBytes;
    int maxThreadsPerBlock;
    int numRegs;
    int ptxVersion;
    int binaryVersion;
};

const char *cudaGetErrorName(cudaError_t e);
const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, const void *fn);
template <class T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, T *fn)
{
    return cudaFuncGetAttributes(a, (const void *)fn);
}
cudaError_t cudaMalloc(void **p, size_t n);
template <class T> cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc((void **)p, n); }
cudaError_t cudaFree(void *p);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
template <class T> cudaError_t cudaHostAlloc(T **p, size_t n, unsigned flags)
{
    return cudaHostAlloc((void **)p, n, flags);
}
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s = 0);
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s = 0);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);

typedef enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9
} cudaFuncAttribute;
cudaError_t cudaFuncSetAttribute(const void *fn, cudaFuncAttribute attr, int value);
template <class T> cudaError_t cudaFuncSetAttribute(T *fn, cudaFuncAttribute attr, int value)
{
    return cudaFuncSetAttribute((const void *)fn, attr, value);
}

/* stream capture into graphs: the captured work is kept and replayed by cudaGraphLaunch */
typedef struct emu_graph_t *cudaGraph_t;
typedef struct emu_graph_exec_t *cudaGraphExec_t;
typedef enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
} cudaStreamCaptureMode;
typedef enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2
} cudaStreamCaptureStatus;
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *st);
typedef struct emu_graph_node_t *cudaGraphNode_t;
typedef enum cudaGraphNodeType {
    cudaGraphNodeTypeKernel = 0, /* the runtime's values */
    cudaGraphNodeTypeMemcpy = 1,
    cudaGraphNodeTypeMemset = 2
} cudaGraphNodeType;
cudaError_t cudaGraphGetNodes(cudaGraph_t g, cudaGraphNode_t *nodes, size_t *n);
cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType *t);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e);

/* ---- cuBLAS: the GEMM kernels/ uses, computed by emu_runtime.cpp with fp32 accumulation ---- */
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1,
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3
} cublasMath_t;
typedef enum cudaDataType_t {
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_16F = 2,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10,
    CUDA_R_16BF = 14
} cudaDataType;
typedef enum {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_64F = 70
} cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 } cublasGemmAlgo_t;
typedef struct emu_blas *cublasHandle_t;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
const char *cublasGetStatusName(cublasStatus_t s);
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
                            cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);

/* ---- device side ---- */
namespace emu {

/* Set by the scheduler each time it resumes an emulated thread. */
extern thread_local uint3 tl_threadIdx, tl_blockIdx;
extern thread_local dim3 tl_blockDim, tl_gridDim;
extern thread_local int tl_lane; /* linear thread id % 32 */

void syncthreads(const char *file, int line);
void syncwarp(const char *file, int line, unsigned mask = 0xffffffffu);
/* Every lane of the warp named in `mask` gives v; returns the value lane `src` gave. */
uint64_t warp_exchange(uint64_t v, int src, unsigned mask, const char *file, int line);
/* Per-block __shared__ storage: the same address for every thread of the block, fresh and
 * poisoned (0xff bytes: NaN floats) for each block. */
void *shared_var(const char *key, size_t bytes, size_t align);
void *dyn_shared(void);
/* A device fault found inside a kernel (misaligned vector load, bad shuffle lane): the block
 * stops and the launch fails with this message. */
[[noreturn]] void device_fault(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

template <class T> T shfl_any(const char *file, int line, unsigned mask, T v, int src)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    u = warp_exchange(u, src, mask, file, line);
    T r;
    memcpy(&r, &u, sizeof r);
    return r;
}
template <class T> T shfl_idx(const char *file, int line, unsigned mask, T v, int src, int width = 32)
{
    const int base = tl_lane & ~(width - 1);
    return shfl_any(file, line, mask, v, base + (src & (width - 1)));
}
template <class T> T shfl_xor(const char *file, int line, unsigned mask, T v, int lm, int width = 32)
{
    int s = tl_lane ^ lm;
    if ((s & ~(width - 1)) != (tl_lane & ~(width - 1)))
        s = tl_lane; /* outside this lane's segment: its own value */
    return shfl_any(file, line, mask, v, s);
}
template <class T> T shfl_down(const char *file, int line, unsigned mask, T v, unsigned d, int width = 32)
{
    int s = tl_lane + (int)d;
    if ((s & ~(width - 1)) != (tl_lane & ~(width - 1)))
        s = tl_lane;
    return shfl_any(file, line, mask, v, s);
}
template <class T> T shfl_up(const char *file, int line, unsigned mask, T v, unsigned d, int width = 32)
{
    int s = tl_lane - (int)d;
    if (s < 0 || (s & ~(width - 1)) != (tl_lane & ~(width - 1)))
        s = tl_lane;
    return shfl_any(file, line, mask, v, s);
}

template <class T> T ldg(const char *file, int line, const T *p)
{
    if ((uintptr_t)p % alignof(T))
        device_fault(file, line, "misaligned __ldg of %zu bytes at %p (needs %zu-byte alignment)", sizeof(T),
                     (const void *)p, alignof(T));
    return *p;
}

} /* namespace emu */

#define threadIdx (static_cast<const uint3 &>(::emu::tl_threadIdx))
#define blockIdx (static_cast<const uint3 &>(::emu::tl_blockIdx))
#define blockDim (static_cast<const dim3 &>(::emu::tl_blockDim))
#define gridDim (static_cast<const dim3 &>(::emu::tl_gridDim))
static constexpr int warpSize = 32;
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __ldg(p) ::emu::ldg(__FILE__, __LINE__, (p))
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Blocks of one launch may run on different CPU threads at once: atomics are real atomics. */
static inline float atomicAdd(float *p, float v)
{
    uint32_t old = __atomic_load_n((uint32_t *)p, __ATOMIC_RELAXED), nw;
    do {
        float f;
        memcpy(&f, &old, 4);
        f += v;
        memcpy(&nw, &f, 4);
    } while (!__atomic_compare_exchange_n((uint32_t *)p, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    float f;
    memcpy(&f, &old, 4);
    return f;
}
static inline double atomicAdd(double *p, double v)
{
    uint64_t old = __atomic_load_n((uint64_t *)p, __ATOMIC_RELAXED), nw;
    do {
        double f;
        memcpy(&f, &old, 8);
        f += v;
        memcpy(&nw, &f, 8);
    } while (!__atomic_compare_exchange_n((uint64_t *)p, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    double f;
    memcpy(&f, &old, 8);
    return f;
}
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline int atomicMax(int *p, int v)
{
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
static inline int atomicMin(int *p, int v)
{
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
static inline int atomicExch(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicExch(unsigned *p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
static inline int atomicCAS(int *p, int cmp, int v)
{
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
static inline unsigned atomicCAS(unsigned *p, unsigned cmp, unsigned v)
{
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}

/* ---- kernel launches: cudapp.py turns `k<<<g, b, smem, s>>>(args)` into
 * `::emu::launcher(k, "k", __FILE__, __LINE__, g, b, smem, s)(args)` ---- */
namespace emu {

typedef void (*thread_fn)(void *ctx);

struct launch_desc {
    const char *name, *file;
    int line;
    const void *fn; /* the kernel function (cudaFuncSetAttribute is per function) */
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    thread_fn run;          /* runs the kernel body for the current emulated thread */
    void *ctx;              /* the argument values, owned: freed with ctx_free after the launch */
    void (*ctx_free)(void *ctx);
    const void *ptr_args[32]; /* pointer-typed arguments, checked against device memory */
    int ptr_argi[32];
    int n_ptr;
};

/* Validates the configuration (cudaGetLastError reports a bad one) and queues the launch on its
 * stream; takes ownership of d->ctx. */
void submit(const launch_desc &d);

template <class... P> struct kernel_call {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> args;
    static void run(void *self)
    {
        kernel_call *c = (kernel_call *)self;
        std::apply(c->k, c->args); /* each thread gets its own copy of the by-value parameters */
    }
    static void destroy(void *self) { delete (kernel_call *)self; }
};

template <class T> static inline void note_ptr(launch_desc &, int, const T &) {}
template <class T> static inline void note_ptr(launch_desc &d, int i, T *const &p)
{
    if (d.n_ptr < 32) {
        d.ptr_args[d.n_ptr] = (const void *)p;
        d.ptr_argi[d.n_ptr++] = i;
    }
}

template <class... P> struct launcher_t {
    void (*k)(P...);
    const char *name, *file;
    int line;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    template <class... A> void operator()(A &&...a) const
    {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        kernel_call<P...> *c = new kernel_call<P...>{k, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
        launch_desc d{};
        d.name = name;
        d.file = file;
        d.line = line;
        d.fn = (const void *)k;
        d.grid = grid;
        d.block = block;
        d.smem = smem;
        d.stream = stream;
        d.run = &kernel_call<P...>::run;
        d.ctx = c;
        d.ctx_free = &kernel_call<P...>::destroy;
        int i = 0;
        std::apply([&](const auto &...e) { (note_ptr(d, i++, e), ...); }, c->args);
        submit(d);
    }
};

template <class... P>
launcher_t<P...> launcher(void (*k)(P...), const char *name, const char *file, int line, dim3 grid, dim3 block,
                          size_t smem = 0, cudaStream_t stream = 0)
{
    return launcher_t<P...>{k, name, file, line, grid, block, smem, stream};
}

} /* namespace emu */

#endif
