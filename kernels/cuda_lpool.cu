/* cuda_lpool.cu - where HydraLoRA adapter matrices live on the device: a pool of large cudaMalloc
 * chunks split first-fit, pinned host staging reused between uploads, and a copy stream whose
 * transfers overlap compute. Launches no kernels; the only users are lora_create/lora_free/hydra.
 *
 * Why chunks that grow instead of one fixed pool of --max-loras slots: the backend learns an
 * adapter's size only when lora_create is called (and the server's --max-loras never reaches
 * it), so the pool grows by one chunk when no free range fits and keeps its chunks until the
 * backend is destroyed. Once the resident set has peaked, which the server bounds by evicting
 * unpinned adapters, lora_create reuses freed ranges and calls neither cudaMalloc nor cudaFree.
 *
 * Ordering rules (one engine thread calls all of this):
 *  - a copy is queued on copy_stream and followed by an event; cuda_lpool_wait (called by every
 *    hydra before its first launch) makes the compute stream wait on the latest such event, and
 *    copy_stream is in order, so every earlier copy is covered too;
 *  - a staging buffer is overwritten only after the event of the copy out of it completed;
 *  - a range is freed only after both streams are idle (cuda_lpool_release synchronises them:
 *    lora_free is rare, and a synchronisation there is simpler than deferred reuse). */
#include "kernels/cuda.h"

#include <stdlib.h>

int cuda_lpool_init(be_cuda *c)
{
    c->lst_wait = -1;
    c->lp.chunk_bytes = CUDA_LPOOL_CHUNK;
    const char *env = getenv("HY_CUDA_LORA_CHUNK_MB");
    if (env && *env) {
        long mb = atol(env);
        if (mb >= 1 && mb <= 4096)
            c->lp.chunk_bytes = (size_t)mb << 20;
    }
    CU_CHECK(cudaStreamCreateWithFlags(&c->copy_stream, cudaStreamNonBlocking));
    for (int i = 0; i < CUDA_LSTAGE_N; i++)
        CU_CHECK(cudaEventCreateWithFlags(&c->lst[i].ev, cudaEventDisableTiming));
    return HY_OK;
}

void cuda_lpool_destroy(be_cuda *c)
{
    if (c->copy_stream)
        cudaStreamSynchronize(c->copy_stream);
    for (int i = 0; i < CUDA_LSTAGE_N; i++) {
        if (c->lst[i].ev)
            cudaEventDestroy(c->lst[i].ev);
        if (c->lst[i].host)
            cudaFreeHost(c->lst[i].host);
        c->lst[i] = cuda_lstage{};
    }
    for (int i = 0; i < c->lp.n_chunk; i++)
        cudaFree(c->lp.chunk[i]);
    free(c->lp.chunk);
    free(c->lp.free);
    c->lp = cuda_lpool{};
    if (c->copy_stream)
        cudaStreamDestroy(c->copy_stream);
    c->copy_stream = NULL;
}

/* room for at least `n` free ranges */
static int lp_reserve_free(cuda_lpool *lp, int n)
{
    if (n <= lp->cap_free)
        return HY_OK;
    int cap = lp->cap_free ? lp->cap_free * 2 : 64;
    while (cap < n)
        cap *= 2;
    cuda_lrange *f = (cuda_lrange *)realloc(lp->free, (size_t)cap * sizeof *f);
    if (!f)
        return hy_err_set(HY_ENOMEM, "out of memory (CUDA adapter pool free list)");
    lp->free = f;
    lp->cap_free = cap;
    return HY_OK;
}

/* Add [p, p+n) of `chunk` to the free list, merging with address-adjacent ranges of the same
 * chunk. The caller has reserved one more entry. */
static void lp_insert(cuda_lpool *lp, uintptr_t p, size_t n, int chunk)
{
    int i = 0;
    while (i < lp->n_free && lp->free[i].p < p)
        i++;
    cuda_lrange *prev = i > 0 ? &lp->free[i - 1] : NULL;
    cuda_lrange *next = i < lp->n_free ? &lp->free[i] : NULL;
    const bool mprev = prev && prev->chunk == chunk && prev->p + prev->n == p;
    const bool mnext = next && next->chunk == chunk && p + n == next->p;
    if (mprev && mnext) {
        prev->n += n + next->n;
        memmove(&lp->free[i], &lp->free[i + 1], (size_t)(lp->n_free - i - 1) * sizeof *lp->free);
        lp->n_free--;
    } else if (mprev) {
        prev->n += n;
    } else if (mnext) {
        next->p = p;
        next->n += n;
    } else {
        memmove(&lp->free[i + 1], &lp->free[i], (size_t)(lp->n_free - i) * sizeof *lp->free);
        lp->free[i] = cuda_lrange{p, n, chunk};
        lp->n_free++;
    }
}

/* a new chunk of at least `bytes`; its unused tail goes to the free list */
static int lp_grow(be_cuda *c, size_t bytes, void **out, int *chunk)
{
    cuda_lpool *lp = &c->lp;
    int rc = lp_reserve_free(lp, lp->n_free + 1);
    if (rc)
        return rc;
    if (lp->n_chunk == lp->cap_chunk) {
        int cap = lp->cap_chunk ? lp->cap_chunk * 2 : 16;
        void **ch = (void **)realloc(lp->chunk, (size_t)cap * sizeof *ch);
        if (!ch)
            return hy_err_set(HY_ENOMEM, "out of memory (CUDA adapter pool)");
        lp->chunk = ch;
        lp->cap_chunk = cap;
    }
    size_t want = bytes > lp->chunk_bytes ? bytes : lp->chunk_bytes;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, want);
    if (e == cudaErrorMemoryAllocation && want > bytes) {
        cudaGetLastError(); /* out of memory is not sticky: try the exact size */
        want = bytes;
        e = cudaMalloc(&p, want);
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        return hy_err_set(e == cudaErrorMemoryAllocation ? HY_ENOMEM : HY_EDEVICE,
                          "CUDA: cannot allocate %zu bytes for adapters (%zu already held): %s", want,
                          lp->total, cudaGetErrorString(e));
    }
    *chunk = lp->n_chunk;
    lp->chunk[lp->n_chunk++] = p;
    lp->total += want;
    if (want > bytes)
        lp_insert(lp, (uintptr_t)p + bytes, want - bytes, *chunk);
    *out = p;
    return HY_OK;
}

int cuda_lpool_alloc(be_cuda *c, size_t bytes, void **out, size_t *bytes_out, int *chunk)
{
    cuda_lpool *lp = &c->lp;
    *out = NULL;
    if (bytes == 0 || bytes > SIZE_MAX - CUDA_LPOOL_ALIGN)
        return hy_err_set(HY_ELIMIT, "CUDA adapter pool: bad request of %zu bytes", bytes);
    bytes = (bytes + CUDA_LPOOL_ALIGN - 1) / CUDA_LPOOL_ALIGN * CUDA_LPOOL_ALIGN;
    *bytes_out = bytes;
    for (int i = 0; i < lp->n_free; i++) {
        cuda_lrange *f = &lp->free[i];
        if (f->n < bytes)
            continue;
        *out = (void *)f->p;
        *chunk = f->chunk;
        if (f->n == bytes) {
            memmove(f, f + 1, (size_t)(lp->n_free - i - 1) * sizeof *f);
            lp->n_free--;
        } else {
            f->p += bytes;
            f->n -= bytes;
        }
        return HY_OK;
    }
    return lp_grow(c, bytes, out, chunk);
}

void cuda_lpool_release(be_cuda *c, void *p, size_t bytes, int chunk)
{
    if (!p)
        return;
    /* a queued hydra may still read the range, a queued copy may still write it */
    if (cudaStreamSynchronize(c->stream) != cudaSuccess ||
        cudaStreamSynchronize(c->copy_stream) != cudaSuccess)
        return; /* leaked: the error is sticky and the next op reports it */
    if (lp_reserve_free(&c->lp, c->lp.n_free + 1))
        return; /* host out of memory: the range stays unused until the backend goes */
    lp_insert(&c->lp, (uintptr_t)p, bytes, chunk);
}

int cuda_lstage_get(be_cuda *c, size_t bytes, int *slot, void **host)
{
    const int i = c->lst_next;
    cuda_lstage *s = &c->lst[i];
    *host = NULL;
    if (s->live) {
        CU_CHECK(cudaEventSynchronize(s->ev));
        s->live = 0;
    }
    if (s->cap < bytes) {
        if (s->host)
            CU_CHECK(cudaFreeHost(s->host));
        s->host = NULL;
        s->cap = 0;
        /* headroom so a run of slightly larger projections does not re-pin every time */
        size_t want = bytes <= SIZE_MAX / 2 ? bytes + bytes / 4 : bytes;
        cudaError_t e = cudaHostAlloc(&s->host, want, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            cudaGetLastError();
            s->host = NULL;
            return hy_err_set(HY_ENOMEM, "CUDA: cannot pin %zu bytes of adapter staging: %s", want,
                              cudaGetErrorString(e));
        }
        s->cap = want;
    }
    *slot = i;
    *host = s->host;
    return HY_OK;
}

int cuda_lstage_put(be_cuda *c, int slot, void *dev, size_t bytes)
{
    cuda_lstage *s = &c->lst[slot];
    CU_CHECK(cudaMemcpyAsync(dev, s->host, bytes, cudaMemcpyHostToDevice, c->copy_stream));
    cudaError_t e = cudaEventRecord(s->ev, c->copy_stream);
    if (e != cudaSuccess) {
        /* without the event nobody could tell when the copy ends: wait for it here */
        cudaStreamSynchronize(c->copy_stream);
        return cuda_err(e, "cudaEventRecord (adapter copy)", __FILE__, __LINE__);
    }
    s->live = 1;
    c->lst_wait = slot;
    c->lst_next = (slot + 1) % CUDA_LSTAGE_N;
    return HY_OK;
}

int cuda_lpool_wait(be_cuda *c)
{
    if (c->lst_wait < 0)
        return HY_OK;
    CU_CHECK(cudaStreamWaitEvent(c->stream, c->lst[c->lst_wait].ev, 0));
    c->lst_wait = -1;
    return HY_OK;
}
