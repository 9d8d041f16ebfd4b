/* be_cuda.cu - the CUDA backend's ops table, constructor and plumbing: device memory, the
 * stream, cuBLAS, scratch buffers and the pinned staging ring for per-call metadata (adapter
 * memory and its copy stream: cuda_lpool.cu).
 * The ops themselves live one per file (cuda_*.cu); this file launches no compute. */
#include "kernels/cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cuda_err(cudaError_t e, const char *what, const char *file, int line)
{
    int rc = hy_err_set(HY_EDEVICE, "CUDA error %s (%s) in %s at %s:%d", cudaGetErrorName(e),
                        cudaGetErrorString(e), what, file, line);
    /* A failed runtime call is also what the next cudaGetLastError returns: clear it, or the next
     * launch check (CU_LAUNCHED) blames a kernel that ran fine (e.g. the forward after an adapter
     * upload that ran out of device memory). A sticky error stays, as it must. */
    cudaGetLastError();
    return rc;
}

int cuda_blas_err(cublasStatus_t s, const char *what, const char *file, int line)
{
    return hy_err_set(HY_EDEVICE, "cuBLAS error %s (%s) in %s at %s:%d", cublasGetStatusName(s),
                      cublasGetStatusString(s), what, file, line);
}

unsigned cuda_grid(int64_t n, int threads)
{
    int64_t g = (n + threads - 1) / threads;
    if (g < 1)
        g = 1;
    /* kernels using this are grid-stride loops, so capping is safe */
    if (g > 65535LL * 32)
        g = 65535LL * 32;
    return (unsigned)g;
}

int cuda_scratch(be_cuda *c, int id, size_t bytes, void **out)
{
    if (bytes == 0)
        bytes = 1;
    if (c->scr_size[id] < bytes) {
        /* kernels queued earlier may still read the old buffer */
        CU_CHECK(cudaStreamSynchronize(c->stream));
        c->epoch++;
        if (c->scr[id])
            CU_CHECK(cudaFree(c->scr[id]));
        c->scr[id] = NULL;
        c->scr_size[id] = 0;
        size_t want = bytes + bytes / 4; /* headroom so slowly growing batches do not thrash */
        CU_CHECK(cudaMalloc(&c->scr[id], want));
        c->scr_size[id] = want;
    }
    *out = c->scr[id];
    return HY_OK;
}

int cuda_stage_get(be_cuda *c, size_t n, void **host)
{
    if (c->cur_host)
        return hy_err_set(HY_EINVAL, "internal: CUDA staging reservation not released");
    if (cuda_recording(c)) /* a recorded copy would re-read this ring slot at every replay */
        return hy_err_set(HY_EUNSUPPORTED, "CUDA: metadata upload while recording a step");
    if (n == 0)
        n = 1;
    size_t nch = (n + CUDA_STAGE_CHUNK - 1) / CUDA_STAGE_CHUNK;
    if (nch > CUDA_STAGE_NCHUNK) {
        /* rare: a huge block table; plain host memory and a synchronous copy in put */
        void *p = malloc(n);
        if (!p)
            return hy_err_set(HY_ENOMEM, "out of memory staging %zu bytes of metadata", n);
        c->cur_host = p;
        c->cur_n = n;
        c->cur_heap = 1;
        *host = p;
        return HY_OK;
    }
    int first = c->stage_next;
    if (first + (int)nch > CUDA_STAGE_NCHUNK)
        first = 0;
    for (int i = first; i < first + (int)nch; i++) {
        if (c->stage_live[i]) {
            /* the copy that last read this chunk must be done before we overwrite it */
            CU_CHECK(cudaEventSynchronize(c->stage_ev[i]));
            c->stage_live[i] = 0;
        }
    }
    c->cur_host = c->stage + (size_t)first * CUDA_STAGE_CHUNK;
    c->cur_n = n;
    c->cur_first = first;
    c->cur_count = (int)nch;
    c->cur_heap = 0;
    c->stage_next = (first + (int)nch) % CUDA_STAGE_NCHUNK;
    *host = c->cur_host;
    return HY_OK;
}

int cuda_stage_put(be_cuda *c, void *dev)
{
    void *h = c->cur_host;
    size_t n = c->cur_n;
    if (!h)
        return hy_err_set(HY_EINVAL, "internal: CUDA staging put without get");
    c->cur_host = NULL;
    cudaError_t e = cudaMemcpyAsync(dev, h, n, cudaMemcpyHostToDevice, c->stream);
    if (c->cur_heap) {
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(c->stream);
        free(h);
        if (e != cudaSuccess)
            return cuda_err(e, "metadata copy", __FILE__, __LINE__);
        return HY_OK;
    }
    if (e != cudaSuccess)
        return cuda_err(e, "metadata copy", __FILE__, __LINE__);
    for (int i = c->cur_first; i < c->cur_first + c->cur_count; i++) {
        CU_CHECK(cudaEventRecord(c->stage_ev[i], c->stream));
        c->stage_live[i] = 1;
    }
    return HY_OK;
}

int cuda_meta_get(be_cuda *c, size_t n, void **host, void **dev)
{
    int rc = cuda_scratch(c, SCR_META, n, dev);
    if (rc)
        return rc;
    return cuda_stage_get(c, n, host);
}

int cuda_meta_cached(be_cuda *c, cuda_meta_cache *mc, const void *const *parts, const size_t *sizes,
                     int n_parts, void **dev)
{
    const void *in_arena = cuda_arena_find(c, parts, sizes, n_parts);
    if (in_arena) { /* this step's copy (step_begin) */
        *dev = (void *)in_arena;
        return HY_OK;
    }
    size_t total = 0;
    for (int i = 0; i < n_parts; i++) {
        if (sizes[i] > SIZE_MAX - total)
            return hy_err_set(HY_ELIMIT, "CUDA metadata too large");
        total += sizes[i];
    }
    if (mc->dev && total == mc->n) {
        const uint8_t *h = (const uint8_t *)mc->host;
        size_t off = 0;
        int same = 1;
        for (int i = 0; i < n_parts && same; i++) {
            same = !sizes[i] || !memcmp(h + off, parts[i], sizes[i]);
            off += sizes[i];
        }
        if (same) {
            *dev = mc->dev;
            return HY_OK;
        }
    }
    if (total > mc->cap || !mc->dev) {
        size_t want = total ? total + total / 4 : 64;
        void *nh = realloc(mc->host, want);
        if (!nh)
            return hy_err_set(HY_ENOMEM, "out of memory (CUDA metadata cache)");
        mc->host = nh;
        /* queued kernels may still read the old device copy */
        CU_CHECK(cudaStreamSynchronize(c->stream));
        c->epoch++;
        if (mc->dev)
            CU_CHECK(cudaFree(mc->dev));
        mc->dev = NULL;
        mc->n = mc->cap = 0;
        CU_CHECK(cudaMalloc(&mc->dev, want));
        mc->cap = want;
    }
    mc->n = 0; /* not valid until the copy is queued */
    void *host = NULL;
    int rc = cuda_stage_get(c, total, &host);
    if (rc)
        return rc;
    size_t off = 0;
    for (int i = 0; i < n_parts; i++) {
        if (sizes[i]) {
            memcpy((uint8_t *)host + off, parts[i], sizes[i]);
            memcpy((uint8_t *)mc->host + off, parts[i], sizes[i]);
        }
        off += sizes[i];
    }
    rc = cuda_stage_put(c, mc->dev);
    if (rc)
        return rc;
    mc->n = total;
    *dev = mc->dev;
    return HY_OK;
}

const cuda_kv_reg *cuda_kv_find(const be_cuda *c, const void *k)
{
    for (int i = 0; i < c->n_kv; i++)
        if (c->kv[i].k == k)
            return &c->kv[i];
    return NULL;
}

/* ---- memory ops ---- */

static int cu_alloc(be *b, size_t bytes, void **out)
{
    be_cuda *c = cuda_ctx(b);
    *out = NULL;
    void *p = NULL;
    c->epoch++;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* out-of-memory is not sticky; clear it */
        return hy_err_set(e == cudaErrorMemoryAllocation ? HY_ENOMEM : HY_EDEVICE,
                          "CUDA: cannot allocate %zu bytes of device memory: %s", bytes,
                          cudaGetErrorString(e));
    }
    e = cudaMemsetAsync(p, 0, bytes ? bytes : 1, c->stream);
    if (e != cudaSuccess) {
        cudaFree(p);
        return cuda_err(e, "cudaMemsetAsync (alloc)", __FILE__, __LINE__);
    }
    *out = p;
    return HY_OK;
}

static void cu_free(be *b, void *p)
{
    be_cuda *c = cuda_ctx(b);
    if (!p)
        return;
    c->epoch++;
    for (int i = 0; i < c->n_kv; i++) {
        /* freeing either half of a KV cache forgets its registration */
        if (c->kv[i].k == p || c->kv[i].v == p) {
            c->kv[i] = c->kv[--c->n_kv];
            break;
        }
    }
    cudaFree(p); /* errors here are sticky ones the next op reports */
}

static int cu_upload(be *b, void *dst, const void *src_host, size_t n)
{
    be_cuda *c = cuda_ctx(b);
    if (!n)
        return HY_OK;
    /* synchronous: the caller may reuse src_host as soon as we return */
    CU_CHECK(cudaMemcpyAsync(dst, src_host, n, cudaMemcpyHostToDevice, c->stream));
    CU_CHECK(cudaStreamSynchronize(c->stream));
    return HY_OK;
}

/* Every download and sync also brings the step's HydraLoRA router stats home (one copy, the
 * same synchronisation), so host stats are current whenever the caller sees device results. */
static int cu_download(be *b, void *dst_host, const void *src, size_t n)
{
    be_cuda *c = cuda_ctx(b);
    int n_gst = 0;
    int rc = cuda_gst_enqueue(c, &n_gst);
    if (rc)
        return rc;
    if (n)
        CU_CHECK(cudaMemcpyAsync(dst_host, src, n, cudaMemcpyDeviceToHost, c->stream));
    if (n || n_gst)
        CU_CHECK(cudaStreamSynchronize(c->stream));
    cuda_gst_finish(c, n_gst);
    return HY_OK;
}

static int cu_sync(be *b)
{
    be_cuda *c = cuda_ctx(b);
    int n_gst = 0;
    int rc = cuda_gst_enqueue(c, &n_gst);
    if (rc)
        return rc;
    CU_CHECK(cudaStreamSynchronize(c->stream));
    cuda_gst_finish(c, n_gst);
    return HY_OK;
}

static void cu_destroy(be *b)
{
    be_cuda *c = cuda_ctx(b);
    if (!c)
        return;
    if (c->stream)
        cudaStreamSynchronize(c->stream);
    cuda_graph_destroy(c);
    cuda_lpool_destroy(c); /* adapters not yet freed lose their memory here */
    for (int i = 0; i < SCR_N; i++)
        if (c->scr[i])
            cudaFree(c->scr[i]);
    for (int i = 0; i < CUDA_ROPE_CACHE; i++) {
        free(c->rope[i].host);
        if (c->rope[i].dev)
            cudaFree(c->rope[i].dev);
    }
    for (int i = 0; i < CUDA_STAGE_NCHUNK; i++)
        if (c->stage_ev[i])
            cudaEventDestroy(c->stage_ev[i]);
    if (c->stage)
        cudaFreeHost(c->stage);
    for (int i = 0; i < MC_N; i++) {
        if (c->mc[i].dev)
            cudaFree(c->mc[i].dev);
        free(c->mc[i].host);
    }
    /* pending router stats are dropped: their host arrays may already be gone */
    if (c->gst_dev)
        cudaFree(c->gst_dev);
    if (c->gst_host)
        cudaFreeHost(c->gst_host);
    free(c->gst_dst);
    free(c->gst_k);
    if (c->blas)
        cublasDestroy(c->blas);
    if (c->stream)
        cudaStreamDestroy(c->stream);
    free(c->kv);
    free(c);
}

static const be_ops cuda_ops = {
    /* name */ "cuda",
    /* destroy */ cu_destroy,
    /* alloc */ cu_alloc,
    /* free */ cu_free,
    /* upload */ cu_upload,
    /* download */ cu_download,
    /* sync */ cu_sync,
    /* weight_create */ cuda_weight_create,
    /* weight_free */ cuda_weight_free,
    /* matmul */ cuda_matmul,
    /* matmul_n */ cuda_matmul_n,
    /* embed */ cuda_embed,
    /* rmsnorm */ cuda_rmsnorm,
    /* kv_alloc */ cuda_kv_alloc,
    /* attention */ cuda_attention,
    /* lora_create */ cuda_lora_create,
    /* lora_free */ cuda_lora_free,
    /* lora_pack */ cuda_lora_pack,
    /* lora_adopt */ cuda_lora_adopt,
    /* lora_pack_free */ cuda_lora_pack_free,
    /* hydra */ cuda_hydra_n,
    /* step_begin */ cuda_step_begin,
    /* step_end */ cuda_step_end,
    /* step_counts */ cuda_step_counts,
};

/* a kernel whose only job is to prove this build has code for the device */
__global__ void cuda_probe_kernel(int *p)
{
    if (p)
        *p = 1;
}

static int cu_open_device(be_cuda *c, int device)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return hy_err_set(HY_EDEVICE, "no CUDA device: %s (%s)", cudaGetErrorString(e),
                          cudaGetErrorName(e));
    }
    if (n <= 0)
        return hy_err_set(HY_EDEVICE, "no CUDA device: the driver reports 0 devices");
    if (device < 0 || device >= n)
        return hy_err_set(HY_EDEVICE, "no CUDA device: device %d requested, %d present", device, n);
    CU_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop;
    CU_CHECK(cudaGetDeviceProperties(&prop, device));
    snprintf(c->name, sizeof c->name, "%.200s (sm_%d%d)", prop.name, prop.major, prop.minor);
    c->sm_count = prop.multiProcessorCount;
    cudaFuncAttributes fa;
    e = cudaFuncGetAttributes(&fa, cuda_probe_kernel);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return hy_err_set(HY_EDEVICE,
                          "no CUDA device: %s has no kernels in this build (built for sm_80 and "
                          "sm_90): %s",
                          c->name, cudaGetErrorString(e));
    }
    return HY_OK;
}

extern "C" bool be_cuda_compiled(void) { return true; }

extern "C" int be_cuda_create(int device, be **out)
{
    *out = NULL;
    int rc = HY_OK;
    be_cuda *c = (be_cuda *)calloc(1, sizeof *c);
    if (!c)
        return hy_err_set(HY_ENOMEM, "out of memory creating the CUDA backend");
    c->base.ops = &cuda_ops;
    c->device = device;
    c->mv_max_tok = CUDA_MV_MAX_TOK;
    const char *leg = getenv("HY_CUDA_MV_LEGACY");
    c->mv_legacy = leg && *leg == '1';
    const char *gr = getenv("HY_CUDA_GRAPHS");
    c->graphs_off = gr && *gr == '0';
    c->graph_cur = -1;
    const char *env = getenv("HY_CUDA_MV_MAX_TOK");
    if (env && *env) {
        int v = atoi(env);
        if (v >= 0 && v <= CUDA_MV_MAX_TOK)
            c->mv_max_tok = v;
    }
    rc = cu_open_device(c, device);
    if (rc)
        goto fail;
    CU_GOTO(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    if ((rc = cuda_lpool_init(c)))
        goto fail;
    {
        cublasStatus_t s = cublasCreate(&c->blas);
        if (s != CUBLAS_STATUS_SUCCESS) {
            c->blas = NULL;
            rc = cuda_blas_err(s, "cublasCreate", __FILE__, __LINE__);
            goto fail;
        }
        s = cublasSetStream(c->blas, c->stream);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH); /* no TF32 for fp32 GEMMs */
        if (s != CUBLAS_STATUS_SUCCESS) {
            rc = cuda_blas_err(s, "cublasSetStream/MathMode", __FILE__, __LINE__);
            goto fail;
        }
    }
    CU_GOTO(cudaHostAlloc((void **)&c->stage, CUDA_STAGE_CHUNK * CUDA_STAGE_NCHUNK,
                          cudaHostAllocDefault));
    for (int i = 0; i < CUDA_STAGE_NCHUNK; i++)
        CU_GOTO(cudaEventCreateWithFlags(&c->stage_ev[i], cudaEventDisableTiming));
    {
        const size_t gb = (size_t)CUDA_GST_CAP * CUDA_GST_STRIDE * sizeof(float);
        c->gst_dst = (float **)calloc(CUDA_GST_CAP, sizeof *c->gst_dst);
        c->gst_k = (int *)calloc(CUDA_GST_CAP, sizeof *c->gst_k);
        if (!c->gst_dst || !c->gst_k) {
            rc = hy_err_set(HY_ENOMEM, "out of memory creating the CUDA backend");
            goto fail;
        }
        CU_GOTO(cudaMalloc((void **)&c->gst_dev, gb));
        CU_GOTO(cudaMemsetAsync(c->gst_dev, 0, gb, c->stream));
        CU_GOTO(cudaHostAlloc((void **)&c->gst_host, gb, cudaHostAllocDefault));
        CU_GOTO(cudaStreamSynchronize(c->stream));
    }
    *out = &c->base;
    return HY_OK;
fail:
    cu_destroy(&c->base);
    return rc;
}
