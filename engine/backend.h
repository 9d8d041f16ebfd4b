/* backend.h - the interface every compute backend implements (CPU reference, CUDA).
 * A backend is a table of function pointers plus its own context. The forward pass in
 * model.c calls only these; only the engine thread calls a backend (one thread owns the device).
 *
 * Memory: "device pointers" come from ops->alloc and are plain addresses in the backend's
 * memory (host memory for CPU, GPU memory for CUDA); pointer arithmetic on them is allowed.
 * Metadata arrays (positions, block tables, segments) are always HOST pointers; a device
 * backend copies what it needs. Activations are fp32, row-major [n_tok][dim].
 * Every op returns 0 or a negative HY_E* code with hy_err_set() called. */
#ifndef HY_BACKEND_H
#define HY_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/be_gate.h"

#define BE_KV_BLOCK 16 /* tokens per KV block */
#define BE_MM_MAX 3     /* weights per matmul_n call (q, k, v) */

typedef struct be be;             /* a backend instance; first member is `const be_ops *ops` */
typedef struct be_weight be_weight; /* a base-model matrix as the backend keeps it */
typedef struct be_lora be_lora;   /* one (adapter, layer, projection) HydraLoRA matrix set */
typedef struct be_lora_pack be_lora_pack; /* a be_lora's host-side form, made ahead (lora_pack) */

/* Paged-attention metadata for one step (all host pointers).
 * Tokens of one sequence are contiguous in the batch with ascending positions.
 * Token t (sequence s = tok_seq[t], position pos[t]) writes its K/V to KV slot slot[t]
 * (= block * BE_KV_BLOCK + offset) and attends to positions 0..pos[t] of sequence s, whose
 * slot for position p is block_table[s * max_blocks + p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK. */
typedef struct {
    int n_tok;
    int n_seq;
    const int32_t *pos;         /* [n_tok] */
    const int32_t *tok_seq;     /* [n_tok] */
    const int32_t *slot;        /* [n_tok] */
    const int32_t *seq_len;     /* [n_seq] KV length of each sequence after this step */
    const int32_t *block_table; /* [n_seq * max_blocks] */
    int max_blocks;
} be_attn_meta;

/* One run of consecutive batch tokens [tok_begin, tok_end) that share an adapter matrix
 * set for the projection being computed; lora == NULL means "no adapter" (skip).
 * stats, when not NULL, is a HOST array of K+1 floats the op ADDS to: the sum over the
 * segment's tokens of each head's gate g_k, then the sum of gate entropies -sum g ln g.
 * ctl, when not NULL, changes how the segment's gates are computed (be_gate.h: a request's router
 * temperature, top-k heads, allowed heads); it must allow a head below the lora's K. */
typedef struct {
    int tok_begin, tok_end;
    const be_lora *lora;
    float *stats;
    const be_gate_ctl *ctl;
    float scale; /* the segment's delta times this (an adapter stack's weight); 0 reads as 1, so a
                  * zero-initialised segment is unscaled: a caller that wants no delta passes no lora */
} be_lora_seg;

/* A segment's scale as the ops apply it. */
static inline float be_seg_scale(const be_lora_seg *s) { return s->scale != 0.0f ? s->scale : 1.0f; }

/* What a matmul_n multiplies: x itself, or a transform of it that the op also stores, so that a
 * device can fuse the norm or the SwiGLU before a projection into the projection's kernel. */
typedef enum {
    BE_IN_X,       /* x */
    BE_IN_RMSNORM, /* x[t] / rms(x[t]) * w   (rms = sqrt(mean(x[t]^2) + eps)) */
    BE_IN_SWIGLU,  /* silu(x) * up   (x is the gate) */
} be_in_kind;

typedef struct {
    be_in_kind kind;
    const float *w; /* BE_IN_RMSNORM: [cols] */
    float eps;      /* BE_IN_RMSNORM */
    const float *up; /* BE_IN_SWIGLU: [n_tok][cols] */
    float *out;     /* [n_tok][cols]: the transformed input is stored here (the HydraLoRA terms
                     * read it); it overlaps none of x, w, up and the outputs */
} be_mm_in;

/* A host array of one forward step's metadata (see step_begin). */
typedef struct {
    const void *p;
    size_t n; /* bytes */
} be_span;

typedef struct {
    const char *name; /* "cpu", "cuda" */
    void (*destroy)(be *b);

    /* Device memory. alloc returns zeroed memory. */
    int (*alloc)(be *b, size_t bytes, void **out);
    void (*free)(be *b, void *p);
    int (*upload)(be *b, void *dst, const void *src_host, size_t n);
    int (*download)(be *b, void *dst_host, const void *src, size_t n);
    int (*sync)(be *b);

    /* Base-model weight: rows x cols of ggml `type` laid out as GGUF stores it (data is
     * host memory, usually the mmap; it must outlive the weight for the CPU backend,
     * which does not copy). */
    int (*weight_create)(be *b, uint32_t type, int64_t rows, int64_t cols, const void *data,
                         be_weight **out);
    void (*weight_free)(be *b, be_weight *w);

    /* y[t][r] = sum_c W[r][c] x[t][c]  (y: [n_tok][rows], x: [n_tok][cols]) */
    int (*matmul)(be *b, const be_weight *w, const float *x, int n_tok, float *y);
    /* y[i] = W[i] x for i < n (1 <= n <= BE_MM_MAX): matrices that read the same x (q/k/v,
     * gate/up) in one call, so the backend converts x once and spreads the rows of all of them
     * over its threads (CPU) or one kernel launch (CUDA). Every W[i] has x's cols; the y[i] do
     * not overlap x or each other. Same results as n matmul calls.
     * in (NULL: x itself): multiply the transform of x it names instead, and store that in
     * in->out. add: y[i] += W[i] x instead (a residual connection without a pass of its own). */
    int (*matmul_n)(be *b, int n, const be_weight *const *w, const float *x, const be_mm_in *in,
                    int n_tok, float *const *y, bool add);
    /* out[t] = embedding row ids[t] (ids is HOST) */
    int (*embed)(be *b, const be_weight *emb, const int32_t *ids, int n_tok, float *out);
    /* y[t] = x[t] / rms(x[t]) * w   (y may equal x) */
    int (*rmsnorm)(be *b, const float *x, const float *w, int n_tok, int64_t dim, float eps,
                   float *y);

    /* KV cache for one layer: two arrays of n_blocks * BE_KV_BLOCK * n_kv_heads * head_dim
     * fp16 values (uint16_t bit patterns), layout [slot][kv_head][head_dim]. */
    int (*kv_alloc)(be *b, int n_blocks, int n_kv_heads, int head_dim, void **k, void **v);
    /* RoPE on q and k in place (when freq is not NULL), write k/v of this step into their
     * slots, then causal GQA attention (softmax in fp32, scale 1/sqrt(head_dim)):
     * q [n_tok][n_heads*head_dim], k/v [n_tok][n_kv_heads*head_dim], out [n_tok][n_heads*head_dim].
     * RoPE: GGUF/llama.cpp "normal" layout, pairs of ADJACENT elements (2i, 2i+1) of each head
     * rotate by angle pos * freq[i]; freq is HOST [head_dim/2] (already includes theta and any
     * Llama-3 scaling). It is part of this op so that a device rotates and stores in one pass. */
    int (*attention)(be *b, const be_attn_meta *m, float *q, float *k, const float *v,
                     void *k_cache, void *v_cache, int n_heads, int n_kv_heads, int head_dim,
                     const float *freq, float *out);

    /* HydraLoRA. A LoRA set for one target: A [r x in], R [K x in] (router; NULL when K == 1),
     * B_k [out x r] for k < K, all fp32 HOST row-major, copied by the backend. scale = s. */
    int (*lora_create)(be *b, int r, int K, int64_t in, int64_t out, const float *A,
                       const float *R, const float *const *B, float scale, be_lora **out_lora);
    void (*lora_free)(be *b, be_lora *l);
    /* Optional (NULL: lora_create does all the work on the engine thread): lora_create split in
     * two so that its host-side work (fp16 rounding, layout) runs ahead on the thread that read
     * the adapter. lora_pack and lora_pack_free may be called from ANY thread: they touch no
     * device and no backend state. lora_adopt (engine thread) makes a be_lora of the pack at the
     * cost of a copy at most and always takes the pack (freed even when it fails); the result
     * equals lora_create's for the same arguments. */
    int (*lora_pack)(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                     const float *const *B, float scale, be_lora_pack **out_pack);
    int (*lora_adopt)(be *b, be_lora_pack *p, be_lora **out_lora);
    void (*lora_pack_free)(be *b, be_lora_pack *p);
    /* For each projection i < n (1 <= n <= BE_MM_MAX projections that read the same x, e.g.
     * q/k/v: one call, so a device launches once for all of them) and each of its segments
     * segs[i][0..n_seg) with a lora:  h = A x, g = softmax(R x) (K==1: g = 1),
     *   y[i][t] += scale * sum_k g_k B_k h      for t in [tok_begin, tok_end).
     * x: [n_tok][in], y[i]: [n_tok][out[i]]; each projection's segments are disjoint and sorted;
     * the y[i] overlap neither x nor each other. */
    int (*hydra)(be *b, int n, const float *x, int64_t in, float *const *y, const int64_t *out,
                 const be_lora_seg *const *segs, int n_seg);

    /* Optional (NULL where a backend gains nothing from them): a forward step's bracket, so a
     * backend can record a step's ops once and replay the recording (CUDA graphs) instead of
     * issuing every op again.
     * step_begin: `key` (key_n bytes) determines every op call of the step (shapes, pointers,
     * segment layout) except the CONTENTS of the host arrays in meta[0..n_meta), which the
     * backend copies now and which the step's ops must then pass by these same pointers
     * (token ids, positions, slots, block tables). *replay = true: the backend has replayed
     * (or queued) a recorded step with the same key; the caller skips the ops and goes
     * straight to step_end. *replay = false: the caller issues the step's ops.
     * step_end: after the step's last op (or the first failed one) and before any download;
     * ok = whether every op succeeded. *rerun = true: the backend was recording and could not
     * finish the recording, so the ops issued since step_begin did not run and what they
     * returned is void: the caller issues them once more, without a bracket. */
    int (*step_begin)(be *b, const void *key, size_t key_n, const be_span *meta, int n_meta,
                      bool *replay);
    int (*step_end)(be *b, bool ok, bool *rerun);
    /* Optional: how many steps were recorded and how many replayed so far, and how many kernels
     * the last recorded step launches (logs, tests, benchmarks). */
    void (*step_counts)(be *b, uint64_t *recorded, uint64_t *replayed, uint64_t *kernels);
} be_ops;

struct be {
    const be_ops *ops;
};

/* The hydra op for one projection. */
static inline int be_hydra1(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *segs,
                            int n_seg)
{
    return b->ops->hydra(b, 1, x, in, &y, &out, &segs, n_seg);
}

/* HY_OK, or HY_EINVAL with a message when `in` (may be NULL) is not a valid input transform of x:
 * an unknown kind, a missing pointer, in->out equal to x or up. Backends call it in matmul_n. */
int be_mm_in_check(const be_mm_in *in, const float *x); /* engine/backend.c */

/* Constructors. */
int be_cpu_create(int n_threads, be **out);     /* engine/be_cpu.c */
/* kernels/: HY_EDEVICE with a message when no usable GPU (or built without CUDA). */
int be_cuda_create(int device, be **out);
bool be_cuda_compiled(void);
/* --device auto|cpu|cuda; auto picks CUDA when available and logs why not otherwise. */
int be_open(const char *device, int n_threads, be **out);

#endif
