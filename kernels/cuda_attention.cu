/* cuda_attention.cu - paged KV cache (kv_alloc) and causal GQA attention over it.
 * One block per (token, KV head, chunk of its query heads) so that GQA reads each cached K/V row
 * once for all the query heads sharing it; warps over interleaved 32-position tiles, an online
 * softmax per head, merged at the end (details at cuda_attn_kernel). Batches made mostly of long
 * runs of one sequence's tokens (prompts) go to the tiled kernel of cuda_attn_prefill.cu instead.
 * Block tables have the CPU backend's semantics (backend.h). */
#include "kernels/cuda.h"

#include <math.h>
#include <stdlib.h>

#define ATT_WARPS 4       /* warps per (token, head) when there are many of them */
#define ATT_WARPS_WIDE 16 /* few (token, head) pairs (small decode batches): more warps each */

/* One block per (token, KV head, chunk of up to ATT_GMAX of the query heads that share that KV
 * head): every K and V row the block reads from the cache serves all of its query heads (GQA:
 * the cache is read once per KV head, not once per query head). The block's W warps take
 * interleaved 32-position tiles of the context: each lane scores one cached position for every
 * head of the chunk (fp16 K, fp32 math), an online softmax per head keeps a running max and sum,
 * then the warp walks the tile's V rows together (coalesced half2 loads when HD % 64 == 0),
 * each lane accumulating its HD/32 output dims for every head; the warps merge through shared
 * memory at the end. Dynamic shared memory: qs[gpb][HD], acc[W][gpb][HD], m[W][gpb], l[W][gpb]. */
#define ATT_GMAX 8

/* output dim of a lane's i-th accumulator: pairs (2 lane, 2 lane + 1) per 64 dims when HD % 64
 * == 0 (one half2 load per pair), else lane + 32 i */
template <int HD>
__device__ __forceinline__ int att_dim(int lane, int i)
{
    return HD % 64 == 0 ? 64 * (i >> 1) + 2 * lane + (i & 1) : lane + 32 * i;
}

template <int HD, int ATT_W>
__global__ void __launch_bounds__(ATT_W * 32)
    cuda_attn_kernel(const float *__restrict__ q, const __half *__restrict__ kc,
                     const __half *__restrict__ vc, const int32_t *__restrict__ pos,
                     const int32_t *__restrict__ tok_seq, const int32_t *__restrict__ bt,
                     int max_blocks, int n_heads, int n_kv, int gpb, float scale, float *__restrict__ out)
{
    constexpr int DPL = HD / 32;
    extern __shared__ float att_smem[];
    const int G = n_heads / n_kv, n_chunk = (G + gpb - 1) / gpb;
    const int chunk = blockIdx.x % n_chunk, kvh = (blockIdx.x / n_chunk) % n_kv;
    const int t = blockIdx.x / (n_chunk * n_kv);
    const int h0 = kvh * G + chunk * gpb, gn = min(gpb, G - chunk * gpb);
    float *qs = att_smem;                    /* [gpb][HD] */
    float *part_acc = qs + gpb * HD;         /* [ATT_W][gpb][HD] */
    float *part_m = part_acc + ATT_W * gpb * HD; /* [ATT_W][gpb] */
    float *part_l = part_m + ATT_W * gpb;        /* [ATT_W][gpb] */
    const int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float *qt = q + ((size_t)t * n_heads + h0) * HD; /* the chunk's heads are consecutive */
    for (int i = threadIdx.x; i < gn * HD; i += ATT_W * 32)
        qs[i] = qt[i];
    __syncthreads();
    const int kvdim = n_kv * HD;
    const int npos = pos[t] + 1;
    const int32_t *tbl = bt + (size_t)tok_seq[t] * max_blocks;
    float m[ATT_GMAX], l[ATT_GMAX], acc[ATT_GMAX][DPL];
#pragma unroll
    for (int g = 0; g < ATT_GMAX; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[g][i] = 0.0f;
    }
    for (int base = wid * 32; base < npos; base += ATT_W * 32) {
        const int p = base + lane;
        const bool valid = p < npos;
        float s[ATT_GMAX];
#pragma unroll
        for (int g = 0; g < ATT_GMAX; g++)
            s[g] = 0.0f;
        int slot = 0;
        if (valid) {
            slot = tbl[p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK;
            const uint4 *kr = (const uint4 *)(kc + (size_t)slot * kvdim + (size_t)kvh * HD);
#pragma unroll 2
            for (int i = 0; i < HD / 8; i++) {
                const uint4 u = kr[i];
                const __half2 *hp = (const __half2 *)&u;
                float f[8];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float2 v2 = __half22float2(hp[j]);
                    f[2 * j] = v2.x;
                    f[2 * j + 1] = v2.y;
                }
#pragma unroll
                for (int g = 0; g < ATT_GMAX; g++) {
                    if (g < gn) {
                        const float *qg = qs + g * HD + 8 * i;
                        float d = 0.0f;
#pragma unroll
                        for (int j = 0; j < 8; j++)
                            d += qg[j] * f[j];
                        s[g] += d;
                    }
                }
            }
        }
        float pr[ATT_GMAX];
#pragma unroll
        for (int g = 0; g < ATT_GMAX; g++) {
            if (g < gn) { /* gn is block-uniform: every lane takes part in the reductions */
                const float sg = valid ? s[g] * scale : -INFINITY;
                const float mn = fmaxf(m[g], cuda_warp_max(sg)); /* lane 0 of a visited tile is valid */
                const float corr = expf(m[g] - mn);              /* first tile: exp(-inf) = 0 */
                pr[g] = valid ? expf(sg - mn) : 0.0f;
                l[g] = l[g] * corr + cuda_warp_sum(pr[g]);
#pragma unroll
                for (int i = 0; i < DPL; i++)
                    acc[g][i] *= corr;
                m[g] = mn;
            } else {
                pr[g] = 0.0f;
            }
        }
        const int nv = min(32, npos - base);
#pragma unroll 2
        for (int j = 0; j < nv; j++) {
            const int sj = __shfl_sync(0xffffffffu, slot, j);
            const __half *vr = vc + (size_t)sj * kvdim + (size_t)kvh * HD;
            float vv[DPL];
            if (HD % 64 == 0) {
#pragma unroll
                for (int i = 0; i < DPL; i += 2) {
                    const float2 v2 = __half22float2(*(const __half2 *)(vr + att_dim<HD>(lane, i)));
                    vv[i] = v2.x;
                    vv[i + 1] = v2.y;
                }
            } else {
#pragma unroll
                for (int i = 0; i < DPL; i++)
                    vv[i] = __half2float(vr[att_dim<HD>(lane, i)]);
            }
#pragma unroll
            for (int g = 0; g < ATT_GMAX; g++) {
                if (g < gn) {
                    const float pj = __shfl_sync(0xffffffffu, pr[g], j);
#pragma unroll
                    for (int i = 0; i < DPL; i++)
                        acc[g][i] += pj * vv[i];
                }
            }
        }
    }
    /* merge the warps' partial softmaxes; a warp that saw no position has m = -inf, l = 0 */
    for (int g = 0; g < gn; g++) {
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            float a = 0.0f;
#pragma unroll
            for (int gg = 0; gg < ATT_GMAX; gg++) /* registers need constant indices */
                if (gg == g)
                    a = acc[gg][i];
            part_acc[(wid * gpb + g) * HD + att_dim<HD>(lane, i)] = a;
        }
        if (lane == 0) {
            float mg = 0.0f, lg = 0.0f;
#pragma unroll
            for (int gg = 0; gg < ATT_GMAX; gg++)
                if (gg == g) {
                    mg = m[gg];
                    lg = l[gg];
                }
            part_m[wid * gpb + g] = mg;
            part_l[wid * gpb + g] = lg;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < gn * HD; idx += ATT_W * 32) {
        const int g = idx / HD, d = idx - g * HD;
        float M = part_m[g]; /* warp 0 always holds position 0: finite */
        for (int w = 1; w < ATT_W; w++)
            M = fmaxf(M, part_m[w * gpb + g]);
        float L = 0.0f, o = 0.0f;
        for (int w = 0; w < ATT_W; w++) {
            const float sc = expf(part_m[w * gpb + g] - M);
            L += part_l[w * gpb + g] * sc;
            o += part_acc[(w * gpb + g) * HD + d] * sc;
        }
        out[((size_t)t * n_heads + h0 + g) * HD + d] = o / L;
    }
}

/* Both halves are separate allocations so ops->free works on each; the pair is registered
 * so attention can bounds-check slots against the real cache size. */
int cuda_kv_alloc(be *b, int n_blocks, int n_kv_heads, int head_dim, void **k, void **v)
{
    be_cuda *c = cuda_ctx(b);
    *k = *v = NULL;
    size_t slots = 0, elems = 0, bytes = 0;
    if (n_blocks <= 0 || n_kv_heads <= 0 || head_dim <= 0)
        return hy_err_set(HY_EINVAL, "CUDA kv_alloc: bad shape");
    if (hy_mul_size((size_t)n_blocks, BE_KV_BLOCK, &slots) ||
        hy_mul_size(slots, (size_t)n_kv_heads * head_dim, &elems) ||
        hy_mul_size(elems, sizeof(__half), &bytes))
        return hy_err_set(HY_ELIMIT, "CUDA kv_alloc: %d blocks is too large", n_blocks);
    if (c->n_kv == c->cap_kv) {
        int cap = c->cap_kv ? 2 * c->cap_kv : 64;
        cuda_kv_reg *nk = (cuda_kv_reg *)realloc(c->kv, cap * sizeof *nk);
        if (!nk)
            return hy_err_set(HY_ENOMEM, "out of memory (KV registry)");
        c->kv = nk;
        c->cap_kv = cap;
    }
    int rc = b->ops->alloc(b, bytes, k);
    if (rc)
        return hy_err_wrap(rc, "KV cache (%zu bytes per half)", bytes);
    rc = b->ops->alloc(b, bytes, v);
    if (rc) {
        b->ops->free(b, *k);
        *k = NULL;
        return hy_err_wrap(rc, "KV cache (%zu bytes per half)", bytes);
    }
    c->kv[c->n_kv].k = *k;
    c->kv[c->n_kv].v = *v;
    c->kv[c->n_kv].n_slots = (int64_t)slots;
    c->kv[c->n_kv].slot_elems = n_kv_heads * head_dim;
    c->n_kv++;
    return HY_OK;
}

/* Host-side validation: everything the kernels index with must be in range. */
static int cuda_attn_check(const be_cuda *c, const be_attn_meta *m, const void *k_cache, int kvdim)
{
    const cuda_kv_reg *reg = cuda_kv_find(c, k_cache);
    const int64_t n_slots = reg ? reg->n_slots : INT64_MAX;
    if (m->n_seq <= 0 || m->max_blocks <= 0 || !m->pos || !m->tok_seq || !m->slot || !m->block_table)
        return hy_err_set(HY_EINVAL, "CUDA attention: bad metadata");
    if (reg && reg->slot_elems != kvdim)
        return hy_err_set(HY_EINVAL, "CUDA attention: KV cache holds %d values per slot, layer wants %d",
                          reg->slot_elems, kvdim);
    int run_max = -1;
    for (int t = 0; t < m->n_tok; t++) {
        const int s = m->tok_seq[t], p = m->pos[t];
        if (s < 0 || s >= m->n_seq || p < 0 || p / BE_KV_BLOCK >= m->max_blocks)
            return hy_err_set(HY_EINVAL, "CUDA attention: token %d has sequence %d position %d "
                              "outside the batch (%d sequences, %d blocks each)",
                              t, s, p, m->n_seq, m->max_blocks);
        if (m->slot[t] < 0 || m->slot[t] >= n_slots)
            return hy_err_set(HY_EINVAL, "CUDA attention: KV slot %d out of range", m->slot[t]);
        run_max = HY_MAX(run_max, p);
        if (t + 1 < m->n_tok && m->tok_seq[t + 1] == s)
            continue;
        /* end of a run of this sequence's tokens: every block the run reads */
        const int32_t *tbl = m->block_table + (size_t)s * m->max_blocks;
        for (int blk = 0; blk <= run_max / BE_KV_BLOCK; blk++)
            if (tbl[blk] < 0 || (int64_t)tbl[blk] * BE_KV_BLOCK >= n_slots)
                return hy_err_set(HY_EINVAL, "CUDA attention: block table entry %d of sequence %d "
                                  "is %d, outside the KV cache", blk, s, tbl[blk]);
        run_max = -1;
    }
    return HY_OK;
}

int cuda_attention(be *b, const be_attn_meta *m, float *q, float *k, const float *v,
                   void *k_cache, void *v_cache, int n_heads, int n_kv_heads, int head_dim,
                   const float *freq, float *out)
{
    be_cuda *c = cuda_ctx(b);
    if (!m || m->n_tok < 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads)
        return hy_err_set(HY_EINVAL, "CUDA attention: bad arguments (%d heads, %d KV heads)",
                          n_heads, n_kv_heads);
    if (head_dim != 32 && head_dim != 64 && head_dim != 96 && head_dim != 128 && head_dim != 256)
        return hy_err_set(HY_EUNSUPPORTED,
                          "CUDA attention supports head_dim 32, 64, 96, 128 or 256 (got %d)", head_dim);
    if (m->n_tok == 0)
        return HY_OK;
    int rc = cuda_attn_check(c, m, k_cache, n_kv_heads * head_dim);
    if (rc)
        return rc;
    const int n_tok = m->n_tok;
    size_t tbl_n = 0, n = 0;
    if (hy_mul_size((size_t)m->n_seq, (size_t)m->max_blocks, &tbl_n) ||
        hy_mul_size(3 * (size_t)n_tok + tbl_n, sizeof(int32_t), &n))
        return hy_err_set(HY_ELIMIT, "CUDA attention: metadata too large");
    void *dev = NULL;
    (void)n;
    const void *parts[4] = {m->pos, m->tok_seq, m->slot, m->block_table};
    const size_t sizes[4] = {n_tok * sizeof(int32_t), n_tok * sizeof(int32_t), n_tok * sizeof(int32_t),
                             tbl_n * sizeof(int32_t)};
    /* every layer of a step sends the same tables: uploaded once per step */
    rc = cuda_meta_cached(c, &c->mc[MC_ATTN], parts, sizes, 4, &dev);
    if (rc)
        return rc;
    const int32_t *d = (const int32_t *)dev;
    rc = cuda_rope_store(c, d, q, k, v, n_tok, n_heads, n_kv_heads, head_dim, freq, k_cache, v_cache);
    if (rc)
        return rc;
    if (cuda_attn_prefill_wanted(m, head_dim))
        return cuda_attn_prefill(c, m, d, q, k_cache, v_cache, n_heads, n_kv_heads, head_dim, out);
    /* heads per block: as many of a KV head's query heads as fit (its K/V rows are then read
     * once for all of them) while the grid still has 2 blocks per SM; with fewer (token, KV
     * head) pairs than that (small decode batches) down to one head per block, and each block
     * widened to 16 warps, so that a long context is walked by more of the GPU at once */
    const int G = n_heads / n_kv_heads;
    int gpb = HY_MIN(G, ATT_GMAX);
    while (gpb > 1 && (int64_t)n_tok * n_kv_heads * ((G + gpb - 1) / gpb) < 2 * (int64_t)c->sm_count)
        gpb--;
    const int64_t blocks = (int64_t)n_tok * n_kv_heads * ((G + gpb - 1) / gpb);
    if (blocks > INT32_MAX)
        return hy_err_set(HY_ELIMIT, "CUDA attention: %lld (token, head) blocks is too many", (long long)blocks);
    const unsigned grid = (unsigned)blocks;
    const float scale = 1.0f / sqrtf((float)head_dim);
    auto smem = [&](int w) { return sizeof(float) * (size_t)gpb * ((size_t)(1 + w) * head_dim + 2 * (size_t)w); };
    /* 48 KiB: the dynamic shared memory every device gives without an opt-in */
    const bool wide = blocks < (int64_t)c->sm_count * 8 && smem(ATT_WARPS_WIDE) <= 48 * 1024;
#define ATT_LAUNCH_W(HD, W)                                                                        \
    cuda_attn_kernel<HD, W><<<grid, W * 32, smem(W), c->stream>>>(                                 \
        q, (const __half *)k_cache, (const __half *)v_cache, d, d + n_tok, d + 3 * n_tok,          \
        m->max_blocks, n_heads, n_kv_heads, gpb, scale, out)
#define ATT_LAUNCH(HD)                                                                             \
    do {                                                                                           \
        if (wide)                                                                                  \
            ATT_LAUNCH_W(HD, ATT_WARPS_WIDE);                                                      \
        else                                                                                       \
            ATT_LAUNCH_W(HD, ATT_WARPS);                                                           \
    } while (0)
    switch (head_dim) {
    case 32: ATT_LAUNCH(32); break;
    case 64: ATT_LAUNCH(64); break;
    case 96: ATT_LAUNCH(96); break;
    case 128: ATT_LAUNCH(128); break;
    default: ATT_LAUNCH(256); break;
    }
#undef ATT_LAUNCH
#undef ATT_LAUNCH_W
    CU_LAUNCHED("cuda_attn_kernel");
    return HY_OK;
}
