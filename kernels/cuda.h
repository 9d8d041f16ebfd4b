/* cuda.h - internals of the CUDA backend shared by the kernels/ .cu files: the context, the weight and
 * LoRA structs, the error-check macros, metadata staging and the per-op entry points.
 * C++/CUDA only; nothing outside kernels/ includes it (the rest of hydrad sees backend.h). */
#ifndef HY_KERNELS_CUDA_H
#define HY_KERNELS_CUDA_H

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "engine/backend.h"
#include "engine/hy.h"
#include "engine/quant.h"
}

/* ---- error plumbing: every CUDA / cuBLAS call goes through one of these ---- */

/* Turn a CUDA error into HY_EDEVICE with the CUDA message; returns HY_EDEVICE. */
int cuda_err(cudaError_t e, const char *what, const char *file, int line);
int cuda_blas_err(cublasStatus_t s, const char *what, const char *file, int line);

#define CU_CHECK(call)                                                     \
    do {                                                                   \
        cudaError_t cu_e_ = (call);                                        \
        if (cu_e_ != cudaSuccess)                                          \
            return cuda_err(cu_e_, #call, __FILE__, __LINE__);             \
    } while (0)
/* for functions with a `rc` variable and a `fail:` label */
#define CU_GOTO(call)                                                      \
    do {                                                                   \
        cudaError_t cu_e_ = (call);                                        \
        if (cu_e_ != cudaSuccess) {                                        \
            rc = cuda_err(cu_e_, #call, __FILE__, __LINE__);               \
            goto fail;                                                     \
        }                                                                  \
    } while (0)
/* after a <<<>>> launch: configuration errors show up here, execution errors later */
#define CU_LAUNCHED(name) CU_CHECK_NAMED(cudaGetLastError(), name)
#define CU_CHECK_NAMED(call, name)                                         \
    do {                                                                   \
        cudaError_t cu_e_ = (call);                                        \
        if (cu_e_ != cudaSuccess)                                          \
            return cuda_err(cu_e_, name, __FILE__, __LINE__);              \
    } while (0)
#define BLAS_CHECK(call)                                                   \
    do {                                                                   \
        cublasStatus_t bl_s_ = (call);                                     \
        if (bl_s_ != CUBLAS_STATUS_SUCCESS)                                \
            return cuda_blas_err(bl_s_, #call, __FILE__, __LINE__);        \
    } while (0)

/* ---- limits ---- */
#define CUDA_MV_MAX_TOK 8   /* n_tok <= this: quantised mat-vec kernels; larger: cuBLAS */
#define CUDA_LORA_MAX_R 64
#define CUDA_LORA_MAX_K 8
#define CUDA_HL_STRIDE (CUDA_LORA_MAX_R + CUDA_LORA_MAX_K)  /* floats per token of [h; l] */
#define CUDA_Z_STRIDE (CUDA_LORA_MAX_R * CUDA_LORA_MAX_K)   /* floats per token of z */
#define CUDA_GST_STRIDE (CUDA_LORA_MAX_K + 1)               /* gate stats per token / segment */

/* ---- pinned staging ring for per-call metadata (positions, block tables, segments) ---- */
#define CUDA_STAGE_CHUNK ((size_t)64 * 1024)
#define CUDA_STAGE_NCHUNK 64 /* 4 MiB pinned */

/* scratch device buffers, grown on demand, owned by the context */
enum { SCR_META, SCR_XH, SCR_HL, SCR_N };

#define CUDA_ROPE_CACHE 8

typedef struct {
    void *k, *v;      /* device, from kv_alloc */
    int64_t n_slots;
    int slot_elems; /* n_kv_heads * head_dim */
} cuda_kv_reg;

/* Per-step metadata that every layer sends again unchanged (positions, slots, block tables):
 * the device copy is kept and reused while the host bytes are the same (compared each call). */
typedef struct {
    void *dev;   /* device, owned */
    void *host;  /* shadow of what dev holds (malloc, owned) */
    size_t n, cap;
} cuda_meta_cache;

enum { MC_ATTN, MC_N };

/* ---- adapter pool (cuda_lpool.cu) ----
 * Device memory for lora_create comes from chunks of CUDA_LPOOL_CHUNK bytes (or one chunk of
 * exactly the request when it is larger), split first-fit into ranges of CUDA_LPOOL_ALIGN bytes.
 * HY_CUDA_LORA_CHUNK_MB overrides the chunk size (tests use it to force many chunks). */
#define CUDA_LPOOL_CHUNK ((size_t)64 << 20)
#define CUDA_LPOOL_ALIGN ((size_t)256)
#define CUDA_LSTAGE_N 2 /* pinned staging buffers: pack one adapter while the last one copies */

typedef struct {
    uintptr_t p; /* device address */
    size_t n;
    int chunk;   /* ranges of different chunks never merge, even when adjacent */
} cuda_lrange;

typedef struct {
    void **chunk;        /* cudaMalloc'd, owned; freed only by cuda_lpool_destroy */
    int n_chunk, cap_chunk;
    cuda_lrange *free;   /* free ranges sorted by address */
    int n_free, cap_free;
    size_t chunk_bytes;  /* CUDA_LPOOL_CHUNK unless overridden */
    size_t total;        /* bytes in all chunks */
} cuda_lpool;

typedef struct {
    void *host;      /* pinned (cudaHostAlloc), owned */
    size_t cap;
    cudaEvent_t ev;  /* recorded on copy_stream after the copy out of host */
    int live;        /* ev recorded and maybe pending: sync before overwriting host */
} cuda_lstage;

/* ---- forward-step bracket (cuda_graph.cu) ----
 * step_begin copies the step's metadata arrays back to back into one device arena with one
 * copy; ops find their arrays there (cuda_arena_find) instead of uploading them. A step key
 * seen before is recorded as a CUDA graph the next time it comes (stream capture), and replayed
 * after that with one launch, as long as no device memory was allocated or freed since it was
 * recorded (epoch): a graph holds raw device pointers. */
#define CUDA_STEP_SPANS 8
#define CUDA_GRAPHS 16 /* recorded step shapes kept (least recently used goes) */

typedef struct {
    uint8_t *host;   /* pinned, cap bytes */
    void *dev;       /* cap bytes */
    size_t cap;
    cudaEvent_t ev;  /* recorded after the last copy out of host */
    int live;        /* ev recorded and maybe pending */
    be_span span[CUDA_STEP_SPANS];
    size_t off[CUDA_STEP_SPANS];
    int n_span;
    int active;      /* between step_begin and step_end */
} cuda_arena;

typedef struct {
    uint8_t *key;             /* owned; NULL: free entry */
    size_t key_n;
    cudaGraphExec_t exec;     /* NULL: seen once, not recorded yet */
    uint64_t epoch;           /* c->epoch when recorded */
    uint64_t used;            /* LRU tick */
    int bad;                  /* recording failed at bad_epoch: op by op until memory moves */
    uint64_t bad_epoch;
    int n_gst;                /* router-stats entries the recorded step fills (cuda_hydra) */
    float **gst_dst;          /* [n_gst] host destinations (not owned) */
    int *gst_k;               /* [n_gst] */
} cuda_graph_ent;

typedef struct {
    be base; /* must be first */
    int device;
    int sm_count;
    char name[256];
    cudaStream_t stream;
    cublasHandle_t blas;

    uint8_t *stage;                        /* pinned host, CUDA_STAGE_NCHUNK chunks */
    cudaEvent_t stage_ev[CUDA_STAGE_NCHUNK];
    int stage_live[CUDA_STAGE_NCHUNK];     /* event recorded and maybe pending */
    int stage_next;
    /* the reservation made by cuda_stage_get, consumed by cuda_stage_put */
    void *cur_host;
    size_t cur_n;
    int cur_first, cur_count, cur_heap;

    void *scr[SCR_N];
    size_t scr_size[SCR_N];

    struct {
        float *host; /* shadow of the host table (owned) */
        float *dev;
        int n;
    } rope[CUDA_ROPE_CACHE];
    int rope_next;

    cuda_kv_reg *kv;  /* registered KV caches (for slot validation) */
    int n_kv, cap_kv;

    int mv_max_tok;   /* CUDA_MV_MAX_TOK unless HY_CUDA_MV_MAX_TOK overrides (benchmarks) */
    int mv_legacy;    /* HY_CUDA_MV_LEGACY=1: the first mat-vec kernel for every type (A/B runs) */

    /* HydraLoRA router stats stay on the device during a step: each (call, segment) that asked
     * for stats gets an entry of CUDA_GST_STRIDE floats in gst_dev (kernels atomically add to
     * it); gst_dst remembers the host array each entry is added to. cuda_gst_flush (called by
     * download, sync and lora_free) copies them down once and adds them in. */
    float *gst_dev;   /* [CUDA_GST_CAP][CUDA_GST_STRIDE], zero between flushes */
    float *gst_host;  /* pinned, same size */
    float **gst_dst;  /* [CUDA_GST_CAP] host destinations (not owned) */
    int *gst_k;       /* [CUDA_GST_CAP] K of each entry */
    int gst_n;

    cuda_meta_cache mc[MC_N];

    /* HydraLoRA adapter matrices (cuda_lpool.cu): one device range per be_lora, carved out of
     * large chunks; packed in pinned staging and copied on copy_stream; the compute stream waits
     * on the latest copy's event before the next hydra launch (lst_wait, -1 when none pending). */
    cudaStream_t copy_stream;
    cuda_lpool lp;
    cuda_lstage lst[CUDA_LSTAGE_N];
    int lst_next;
    int lst_wait;

    /* forward-step bracket (cuda_graph.cu) */
    uint64_t epoch;   /* bumped by every device allocation or free */
    cuda_arena arena;
    cuda_graph_ent graph[CUDA_GRAPHS];
    int graph_cur;    /* entry being recorded, or -1 */
    int graphs_off;   /* HY_CUDA_GRAPHS=0: no recording (A/B runs) */
    uint64_t tick;
    uint64_t n_recorded, n_replayed;
    uint64_t graph_kernels; /* kernel nodes of the last recorded step */
} be_cuda;

#define CUDA_GST_CAP 16384

/* A base-model matrix on the device.
 * F32 and BF16: f holds fp32 (BF16 is widened once: exact) and cuBLAS SGEMM-class GEMMs run.
 * F16: q holds the fp16 matrix, h == q.
 * Quantised (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K): q keeps the GGUF blocks for the decode mat-vec
 * kernels and embedding rows; h is an fp16 copy dequantised once at upload for cuBLAS
 * (we keep it resident rather than dequantising per call: simpler and faster prefill,
 * at the cost of 2 bytes per weight of extra device memory). */
struct be_weight {
    uint32_t type;
    int64_t rows, cols;
    size_t row_bytes; /* of q */
    void *q;
    __half *h;
    float *f;
};

/* One HydraLoRA set on the device, stored in fp16 (half the bytes of fp32: at batch 64 with
 * distinct adapters the op is bound by reading them). AR = [A; R] ((r + Kr) x in, Kr = K > 1 ?
 * K : 0), BT = [B_0 | ... | B_{K-1}]^T (K*r x out: transposed so that threads owning consecutive
 * outputs read consecutive addresses in the expand kernel). Each of A, R and B is multiplied by
 * its own power of two before rounding (so its largest magnitude lands near 2^14, far from fp16
 * overflow and from its subnormals); the kernels undo that exactly: l_mul = 1 / (R's factor)
 * before the softmax, out_mul = scale / (A's factor * B's factor) on the expand sum. */
struct be_lora {
    int r, K;
    int64_t in, out;
    float l_mul, out_mul; /* the kernels' factors; out_mul includes the LoRA scale */
    __half *AR; /* == mem */
    __half *BT; /* inside mem, CUDA_LPOOL_ALIGN-aligned */
    void *mem;  /* the pool range holding both (cuda_lpool_alloc), NULL if none */
    size_t bytes;
    int chunk;
};

static inline be_cuda *cuda_ctx(be *b) { return (be_cuda *)b; }

/* be_cuda.cu */
/* Grow scratch buffer `id` to at least `bytes` (contents are not kept); *out is device memory
 * owned by the context and valid until the next cuda_scratch call for the same id. */
int cuda_scratch(be_cuda *c, int id, size_t bytes, void **out);
/* Reserve `n` bytes of pinned host memory for one packed metadata record; the caller fills
 * *host, then cuda_stage_put copies it to `dev` on the stream. Exactly one put per get. */
int cuda_stage_get(be_cuda *c, size_t n, void **host);
int cuda_stage_put(be_cuda *c, void *dev);
/* get + device scratch SCR_META in one: *host to fill, *dev where it will land. */
int cuda_meta_get(be_cuda *c, size_t n, void **host, void **dev);
/* The concatenation of parts[0..n_parts) (host) as device memory at *dev: the cached copy when
 * the bytes equal the last call's, else a fresh asynchronous upload. *dev stays valid until the
 * next call with the same cache (stream order makes reuse by queued kernels safe). */
int cuda_meta_cached(be_cuda *c, cuda_meta_cache *mc, const void *const *parts, const size_t *sizes,
                     int n_parts, void **dev);
/* Grid size for a 1-D elementwise launch over n items with `threads` per block. */
unsigned cuda_grid(int64_t n, int threads);
const cuda_kv_reg *cuda_kv_find(const be_cuda *c, const void *k);

/* One op per file; each has the be_ops signature. */
int cuda_weight_create(be *b, uint32_t type, int64_t rows, int64_t cols, const void *data,
                       be_weight **out);                                   /* cuda_weight.cu */
void cuda_weight_free(be *b, be_weight *w);
int cuda_matmul(be *b, const be_weight *w, const float *x, int n_tok, float *y); /* cuda_matmul.cu */
int cuda_matmul_n(be *b, int n, const be_weight *const *w, const float *x, const be_mm_in *in, int n_tok,
                  float *const *y, bool add);
int cuda_embed(be *b, const be_weight *emb, const int32_t *ids, int n_tok, float *out); /* cuda_embed.cu */
int cuda_rmsnorm(be *b, const float *x, const float *w, int n_tok, int64_t dim, float eps,
                 float *y);                                                 /* cuda_rmsnorm.cu */
int cuda_swiglu(be *b, const float *gate, const float *up, int n_tok, int64_t dim,
                float *out); /* cuda_swiglu.cu (matmul_n's SwiGLU when it is not fused) */
int cuda_kv_alloc(be *b, int n_blocks, int n_kv_heads, int head_dim, void **k, void **v); /* cuda_attention.cu */
/* cuda_attn_prefill.cu: the tiled kernel for prefill-heavy batches (wanted: whether this batch
 * is one; d: the device copy of pos, tok_seq, slot and block table, back to back) */
bool cuda_attn_prefill_wanted(const be_attn_meta *m, int head_dim);
int cuda_attn_prefill(be_cuda *c, const be_attn_meta *m, const int32_t *d, const float *q, const void *k_cache,
                      const void *v_cache, int n_heads, int n_kv, int head_dim, float *out);
int cuda_attention(be *b, const be_attn_meta *m, float *q, float *k, const float *v,
                   void *k_cache, void *v_cache, int n_heads, int n_kv_heads, int head_dim,
                   const float *freq, float *out);
/* cuda_rope.cu: RoPE q and k in place (freq HOST or NULL) and store k, v into their slots;
 * d: the attention metadata on the device (pos first, slot at d + 2 n_tok) */
int cuda_rope_store(be_cuda *c, const int32_t *d, float *q, float *k, const float *v, int n_tok,
                    int n_heads, int n_kv, int head_dim, const float *freq, void *k_cache, void *v_cache);
int cuda_lora_create(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                     const float *const *B, float scale, be_lora **out_lora); /* cuda_hydra.cu */
void cuda_lora_free(be *b, be_lora *l);
int cuda_lora_pack(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                   const float *const *B, float scale, be_lora_pack **out_pack);
int cuda_lora_adopt(be *b, be_lora_pack *p, be_lora **out_lora);
void cuda_lora_pack_free(be *b, be_lora_pack *p);
int cuda_hydra_n(be *b, int n, const float *x, int64_t in, float *const *y, const int64_t *out,
                 const be_lora_seg *const *segs, int n_seg);
/* Router stats kept on the device: enqueue their download (returns how many entries), and after
 * the stream has been synchronised add them to their host arrays. cuda_gst_flush does both. */
int cuda_gst_enqueue(be_cuda *c, int *n);
void cuda_gst_finish(be_cuda *c, int n);
int cuda_gst_flush(be_cuda *c);

/* cuda_lpool.cu. init/destroy are called by be_cuda_create / cu_destroy. */
int cuda_lpool_init(be_cuda *c);
void cuda_lpool_destroy(be_cuda *c);
/* A device range of at least `bytes` (rounded up to CUDA_LPOOL_ALIGN, written to *bytes_out):
 * first fit among free ranges, else a new chunk. Return it with cuda_lpool_release. */
int cuda_lpool_alloc(be_cuda *c, size_t bytes, void **out, size_t *bytes_out, int *chunk);
/* Waits until no queued kernel or copy can touch the range, then makes it free again. If that
 * wait fails (a broken device) the range is leaked rather than reused. */
void cuda_lpool_release(be_cuda *c, void *p, size_t bytes, int chunk);
/* A pinned staging buffer of at least `bytes` that no queued copy still reads (*slot names it
 * for cuda_lstage_put). */
int cuda_lstage_get(be_cuda *c, size_t bytes, int *slot, void **host);
/* Queue the copy of `bytes` from staging `slot` to `dev` on the copy stream; the next
 * cuda_lpool_wait orders it before compute. On error nothing is left pending. */
int cuda_lstage_put(be_cuda *c, int slot, void *dev, size_t bytes);
/* Make the compute stream wait for every adapter copy queued so far (a no-op when none is). */
int cuda_lpool_wait(be_cuda *c);

/* cuda_graph.cu: the step bracket (be_ops step_begin / step_end), its cleanup (cu_destroy),
 * and the lookup ops use for their metadata: the device copy of parts[0..n) when the current
 * step's arena holds exactly these host arrays back to back, else NULL. */
int cuda_step_begin(be *b, const void *key, size_t key_n, const be_span *meta, int n_meta, bool *replay);
int cuda_step_end(be *b, bool ok, bool *rerun);
void cuda_step_counts(be *b, uint64_t *recorded, uint64_t *replayed, uint64_t *kernels);
void cuda_graph_destroy(be_cuda *c);
const void *cuda_arena_find(const be_cuda *c, const void *const *parts, const size_t *sizes, int n_parts);
/* nonzero while a step is being recorded: uploads through staging are refused then */
static inline int cuda_recording(const be_cuda *c) { return c->graph_cur >= 0; }

/* cuda_weight.cu: is `type` one of the block types the mat-vec kernels read? */
bool cuda_type_quantised(uint32_t type);

/* ---- device helpers shared by the .cu files (header-only, inlined) ---- */

__device__ __forceinline__ float cuda_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float cuda_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#endif
