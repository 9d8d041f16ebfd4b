/* cuda_graph.cu - the forward-step bracket of backend.h (step_begin / step_end) on CUDA.
 * A decode step issues a few hundred small launches; issuing them one by one costs the host
 * more than the GPU needs to run them (batch 1). So:
 *   - step_begin copies the step's metadata (positions, slots, block tables, token ids) back to
 *     back into one device arena with one copy; the ops find their arrays there;
 *   - the first time a step key is seen, the step runs op by op (it also grows scratch buffers
 *     and tables to their size for that shape, which a recording must not do);
 *   - the second time, the ops are recorded by stream capture into a CUDA graph, which is then
 *     launched: the recorded kernels read their metadata from the arena, so
 *   - every later step with the same key is one graph launch after the arena copy, provided no
 *     device memory was allocated or freed since the recording (c->epoch; a graph holds raw
 *     device pointers). Otherwise it is recorded again.
 * A recording that fails (an op refused something while capturing) marks the key bad: its
 * steps run op by op from then on, and the failed step is rerun by the caller (nothing ran).
 * HydraLoRA router statistics: the entries a recorded step adds (cuda_hydra) are remembered
 * with the graph and re-registered on every replay, so stats arrive exactly as without graphs.
 * HY_CUDA_GRAPHS=0 turns recording off (A/B timing runs); the arena is used either way. */
#include "kernels/cuda.h"

#include <stdlib.h>
#include <string.h>

const void *cuda_arena_find(const be_cuda *c, const void *const *parts, const size_t *sizes, int n_parts)
{
    const cuda_arena *a = &c->arena;
    if (!a->active || n_parts <= 0)
        return NULL;
    for (int j = 0; j + n_parts <= a->n_span; j++) {
        int i = 0;
        while (i < n_parts && a->span[j + i].p == parts[i] && a->span[j + i].n == sizes[i])
            i++;
        if (i == n_parts)
            return (const uint8_t *)a->dev + a->off[j];
    }
    return NULL;
}

/* Copy meta[0..n) into the arena (growing it first if needed) with one asynchronous copy. */
static int arena_load(be_cuda *c, const be_span *meta, int n)
{
    cuda_arena *a = &c->arena;
    if (n < 0 || n > CUDA_STEP_SPANS)
        return hy_err_set(HY_EINVAL, "CUDA step_begin: %d metadata arrays (at most %d)", n, CUDA_STEP_SPANS);
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (meta[i].n && !meta[i].p)
            return hy_err_set(HY_EINVAL, "CUDA step_begin: metadata array %d is NULL", i);
        if (meta[i].n > SIZE_MAX / 2 - total)
            return hy_err_set(HY_ELIMIT, "CUDA step_begin: metadata too large");
        total += meta[i].n;
    }
    if (a->live) { /* the last copy out of host must be done before we overwrite it */
        CU_CHECK(cudaEventSynchronize(a->ev));
        a->live = 0;
    }
    if (total > a->cap) {
        const size_t want = total + total / 4 + 256;
        CU_CHECK(cudaStreamSynchronize(c->stream)); /* queued kernels may read the old arena */
        c->epoch++;
        if (a->dev)
            cudaFree(a->dev);
        if (a->host)
            cudaFreeHost(a->host);
        a->dev = NULL;
        a->host = NULL;
        a->cap = 0;
        CU_CHECK(cudaMalloc(&a->dev, want));
        CU_CHECK(cudaHostAlloc((void **)&a->host, want, cudaHostAllocDefault));
        a->cap = want;
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        a->span[i] = meta[i];
        a->off[i] = off;
        if (meta[i].n)
            memcpy(a->host + off, meta[i].p, meta[i].n);
        off += meta[i].n;
    }
    a->n_span = n;
    if (total) {
        CU_CHECK(cudaMemcpyAsync(a->dev, a->host, total, cudaMemcpyHostToDevice, c->stream));
        CU_CHECK(cudaEventRecord(a->ev, c->stream));
        a->live = 1;
    }
    a->active = 1;
    return HY_OK;
}

static void graph_clear(cuda_graph_ent *g)
{
    if (g->exec)
        cudaGraphExecDestroy(g->exec);
    free(g->key);
    free(g->gst_dst);
    free(g->gst_k);
    memset(g, 0, sizeof *g);
}

void cuda_graph_destroy(be_cuda *c)
{
    for (int i = 0; i < CUDA_GRAPHS; i++)
        graph_clear(&c->graph[i]);
    if (c->arena.ev)
        cudaEventDestroy(c->arena.ev);
    if (c->arena.dev)
        cudaFree(c->arena.dev);
    if (c->arena.host)
        cudaFreeHost(c->arena.host);
    memset(&c->arena, 0, sizeof c->arena);
}

/* The entry for this key: the existing one, else a fresh one in the least recently used slot. */
static int graph_lookup(be_cuda *c, const void *key, size_t key_n, cuda_graph_ent **out, bool *fresh)
{
    int lru = 0;
    for (int i = 0; i < CUDA_GRAPHS; i++) {
        cuda_graph_ent *g = &c->graph[i];
        if (g->key && g->key_n == key_n && !memcmp(g->key, key, key_n)) {
            g->used = ++c->tick;
            *out = g;
            *fresh = false;
            return HY_OK;
        }
        if (!g->key || (c->graph[lru].key && g->used < c->graph[lru].used))
            lru = i;
    }
    cuda_graph_ent *g = &c->graph[lru];
    graph_clear(g);
    g->key = (uint8_t *)malloc(key_n ? key_n : 1);
    if (!g->key)
        return hy_err_set(HY_ENOMEM, "out of memory (CUDA step key)");
    memcpy(g->key, key, key_n);
    g->key_n = key_n;
    g->used = ++c->tick;
    *out = g;
    *fresh = true;
    return HY_OK;
}

/* After arena_load: replay, start recording, or leave the step to the ops (see the top). */
static int step_choose(be_cuda *c, const void *key, size_t key_n, bool *replay)
{
    cuda_graph_ent *g = NULL;
    bool fresh = false;
    int rc = graph_lookup(c, key, key_n, &g, &fresh);
    if (rc)
        return rc;
    if (fresh || (g->bad && g->bad_epoch == c->epoch))
        return HY_OK; /* first sight (sizes everything for this shape) or failed to record since
                         memory last moved */
    /* a replay or a recording starts with no router-stats entries pending (they are indexed
     * from 0 inside the graph) and no adapter copy to wait for (a recording cannot wait on the
     * copy stream's events) */
    if (c->gst_n && (rc = cuda_gst_flush(c)))
        return rc;
    if ((rc = cuda_lpool_wait(c)))
        return rc;
    if (g->exec && g->epoch == c->epoch) {
        for (int i = 0; i < g->n_gst; i++) {
            c->gst_dst[i] = g->gst_dst[i];
            c->gst_k[i] = g->gst_k[i];
        }
        c->gst_n = g->n_gst;
        CU_CHECK(cudaGraphLaunch(g->exec, c->stream));
        c->n_replayed++;
        *replay = true;
        return HY_OK;
    }
    if (g->exec) { /* recorded before memory moved: record again */
        cudaGraphExecDestroy(g->exec);
        g->exec = NULL;
    }
    CU_CHECK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    c->graph_cur = (int)(g - c->graph);
    return HY_OK;
}

int cuda_step_begin(be *b, const void *key, size_t key_n, const be_span *meta, int n_meta, bool *replay)
{
    be_cuda *c = cuda_ctx(b);
    *replay = false;
    if (c->arena.active || cuda_recording(c))
        return hy_err_set(HY_EINVAL, "internal: CUDA step_begin inside a step");
    if (!c->arena.ev)
        CU_CHECK(cudaEventCreateWithFlags(&c->arena.ev, cudaEventDisableTiming));
    int rc = arena_load(c, meta, n_meta);
    if (rc == HY_OK && !c->graphs_off && key)
        rc = step_choose(c, key, key_n, replay);
    if (rc) /* the caller does not call step_end after a failed step_begin */
        c->arena.active = 0;
    return rc;
}

/* Keep the recorded step's router-stats entries with its graph. */
static int graph_keep_gst(be_cuda *c, cuda_graph_ent *g)
{
    free(g->gst_dst);
    free(g->gst_k);
    g->gst_dst = NULL;
    g->gst_k = NULL;
    g->n_gst = c->gst_n;
    if (!c->gst_n)
        return HY_OK;
    g->gst_dst = (float **)malloc(sizeof(float *) * (size_t)c->gst_n);
    g->gst_k = (int *)malloc(sizeof(int) * (size_t)c->gst_n);
    if (!g->gst_dst || !g->gst_k)
        return hy_err_set(HY_ENOMEM, "out of memory (CUDA step graph)");
    memcpy(g->gst_dst, c->gst_dst, sizeof(float *) * (size_t)c->gst_n);
    memcpy(g->gst_k, c->gst_k, sizeof(int) * (size_t)c->gst_n);
    return HY_OK;
}

/* the kernel nodes of a captured step (a figure for logs and tests: every kernel of a replayed
 * step still costs the GPU a launch gap of its own); 0 when they cannot be listed */
static uint64_t graph_count_kernels(cudaGraph_t graph)
{
    size_t n = 0;
    if (cudaGraphGetNodes(graph, NULL, &n) != cudaSuccess || n == 0)
        return 0;
    cudaGraphNode_t *nodes = (cudaGraphNode_t *)malloc(sizeof(cudaGraphNode_t) * n);
    if (!nodes)
        return 0;
    uint64_t k = 0;
    if (cudaGraphGetNodes(graph, nodes, &n) == cudaSuccess)
        for (size_t i = 0; i < n; i++) {
            cudaGraphNodeType t;
            k += cudaGraphNodeGetType(nodes[i], &t) == cudaSuccess && t == cudaGraphNodeTypeKernel;
        }
    free(nodes);
    return k;
}

int cuda_step_end(be *b, bool ok, bool *rerun)
{
    be_cuda *c = cuda_ctx(b);
    *rerun = false;
    c->arena.active = 0;
    if (!cuda_recording(c))
        return HY_OK;
    cuda_graph_ent *g = &c->graph[c->graph_cur];
    c->graph_cur = -1;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
    cudaGraphExec_t exec = NULL;
    uint64_t kernels = 0;
    if (ok && e == cudaSuccess && graph)
        kernels = graph_count_kernels(graph);
    if (ok && e == cudaSuccess && graph)
        e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph)
        cudaGraphDestroy(graph);
    /* (out of memory keeping the stats entries: the rerun goes op by op) */
    if (ok && e == cudaSuccess && exec && graph_keep_gst(c, g) == HY_OK) {
        g->exec = exec;
        g->epoch = c->epoch;
        g->bad = 0;
        c->n_recorded++;
        c->graph_kernels = kernels;
        CU_CHECK(cudaGraphLaunch(g->exec, c->stream));
        return HY_OK;
    }
    /* nothing recorded ran: drop what the ops registered, run this shape op by op from now on */
    if (exec)
        cudaGraphExecDestroy(exec);
    cudaGetLastError(); /* capture errors are not sticky; clear them */
    c->gst_n = 0;
    g->bad = 1;
    g->bad_epoch = c->epoch;
    *rerun = true;
    return HY_OK;
}

void cuda_step_counts(be *b, uint64_t *recorded, uint64_t *replayed, uint64_t *kernels)
{
    *recorded = cuda_ctx(b)->n_recorded;
    *replayed = cuda_ctx(b)->n_replayed;
    *kernels = cuda_ctx(b)->graph_kernels;
}
