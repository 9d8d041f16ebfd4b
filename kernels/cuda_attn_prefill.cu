/* cuda_attn_prefill.cu - the tiled (flash-attention style) kernel cuda_attention uses for
 * prefill-heavy batches: every cached K/V tile a block loads into shared memory serves all of
 * the block's query rows (up to 64: consecutive tokens x query heads of one KV head) instead of
 * one, so a prompt of n tokens reads the cache about n / 16 times less often than the
 * per-token kernel does.
 *
 * Block = (tile of QT consecutive batch tokens, KV head, chunk of up to PF_GH of its query
 * heads); rows r = g * QT + tq (head g of the chunk, token tq of the tile), PF_RPW rows per
 * warp. The tile's tokens may belong to several sequences (tokens of a sequence are contiguous,
 * positions ascending): the block walks them sequence by sequence. Per sequence, for each
 * 32-position K/V tile (fp16 cache -> fp32 shared memory, K padded against bank conflicts):
 *   scores  lane = position: s[row] = (q_row * scale) . K[lane]   (causal mask by position)
 *   softmax online per row (running max m, sum l), p written to shared memory
 *   output  lane = output dims: acc[row][dims] += p[row][j] * V[j][dims]
 * and out = acc / l at the end. fp32 throughout, as the per-token kernel. */
#include "kernels/cuda.h"

#include <math.h>

#define PF_WARPS 4
#define PF_RPW 16 /* query rows per warp */
#define PF_ROWS (PF_WARPS * PF_RPW)
#define PF_KT 32  /* cached positions per K/V tile */
#define PF_GH 4   /* query heads per block at most */

static size_t pf_smem(int hd)
{
    return sizeof(float) * ((size_t)PF_ROWS * hd + (size_t)PF_KT * (hd + 1) + (size_t)PF_KT * hd +
                            (size_t)PF_WARPS * PF_RPW * PF_KT);
}

template <int HD>
__global__ void __launch_bounds__(PF_WARPS * 32)
    cuda_attn_prefill_kernel(const float *__restrict__ q, const __half *__restrict__ kc,
                             const __half *__restrict__ vc, const int32_t *__restrict__ pos,
                             const int32_t *__restrict__ tok_seq, const int32_t *__restrict__ bt,
                             int max_blocks, int n_tok, int n_heads, int n_kv, int gh, int qt,
                             float scale, float *__restrict__ out)
{
    constexpr int DPL = HD / 32;
    extern __shared__ float pf_smem_buf[];
    float *qs = pf_smem_buf;               /* [PF_ROWS][HD], pre-scaled */
    float *ks = qs + PF_ROWS * HD;         /* [PF_KT][HD + 1] */
    float *vs = ks + PF_KT * (HD + 1);     /* [PF_KT][HD] */
    float *ps = vs + PF_KT * HD;           /* [PF_WARPS][PF_RPW][PF_KT] */
    const int G = n_heads / n_kv, n_chunk = (G + gh - 1) / gh;
    const int chunk = blockIdx.x % n_chunk, kvh = (blockIdx.x / n_chunk) % n_kv;
    const int t0 = (int)(blockIdx.x / (n_chunk * n_kv)) * qt;
    const int t_end = min(t0 + qt, n_tok);
    const int h0 = kvh * G + chunk * gh, gn = min(gh, G - chunk * gh);
    const int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvdim = n_kv * HD;

    /* the block's query rows; rows past the tile or the chunk are zero and never written */
    for (int i = threadIdx.x; i < PF_ROWS * HD; i += PF_WARPS * 32) {
        const int r = i / HD, d = i - r * HD, g = r / qt, t = t0 + r % qt;
        qs[i] = g < gn && t < t_end ? q[((size_t)t * n_heads + h0 + g) * HD + d] * scale : 0.0f;
    }
    __syncthreads();

    float *pw = ps + wid * PF_RPW * PF_KT;
    for (int ts = t0; ts < t_end;) {
        /* one sequence's run of tokens inside the tile: [ts, te) */
        const int seq = tok_seq[ts];
        int te = ts + 1;
        while (te < t_end && tok_seq[te] == seq)
            te++;
        const int32_t *tbl = bt + (size_t)seq * max_blocks;
        const int pmax = pos[te - 1];
        int rpos[PF_RPW]; /* position of each of this warp's rows, -1: not in this run */
#pragma unroll
        for (int i = 0; i < PF_RPW; i++) {
            const int r = wid * PF_RPW + i, g = r / qt, t = t0 + r % qt;
            rpos[i] = r < gh * qt && g < gn && t >= ts && t < te ? pos[t] : -1;
        }
        float m[PF_RPW], l[PF_RPW], acc[PF_RPW][DPL];
#pragma unroll
        for (int i = 0; i < PF_RPW; i++) {
            m[i] = -INFINITY;
            l[i] = 0.0f;
#pragma unroll
            for (int k = 0; k < DPL; k++)
                acc[i][k] = 0.0f;
        }
        for (int p0 = 0; p0 <= pmax; p0 += PF_KT) {
            __syncthreads(); /* every warp is done with the previous tile */
            for (int i = threadIdx.x; i < PF_KT * HD; i += PF_WARPS * 32) {
                const int j = i / HD, d = i - j * HD, p = p0 + j;
                float kv_k = 0.0f, kv_v = 0.0f;
                if (p <= pmax) {
                    const size_t off = ((size_t)tbl[p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK) * kvdim +
                                       (size_t)kvh * HD + d;
                    kv_k = __half2float(kc[off]);
                    kv_v = __half2float(vc[off]);
                }
                ks[j * (HD + 1) + d] = kv_k;
                vs[j * HD + d] = kv_v;
            }
            __syncthreads();
            /* scores: this lane's position against the warp's rows */
            float s[PF_RPW];
#pragma unroll
            for (int i = 0; i < PF_RPW; i++)
                s[i] = 0.0f;
            const float *krow = ks + lane * (HD + 1);
            const float *qw = qs + wid * PF_RPW * HD;
            for (int d = 0; d < HD; d++) {
                const float kd = krow[d];
#pragma unroll
                for (int i = 0; i < PF_RPW; i++)
                    s[i] += qw[i * HD + d] * kd;
            }
            const int p = p0 + lane;
#pragma unroll
            for (int i = 0; i < PF_RPW; i++) {
                const bool valid = p <= rpos[i]; /* rpos -1: never */
                const float sv = valid ? s[i] : -INFINITY;
                const float mn = fmaxf(m[i], cuda_warp_max(sv));
                const float corr = m[i] == -INFINITY ? 0.0f : expf(m[i] - mn);
                const float pr = valid ? expf(sv - mn) : 0.0f;
                l[i] = l[i] * corr + cuda_warp_sum(pr);
#pragma unroll
                for (int k = 0; k < DPL; k++)
                    acc[i][k] *= corr;
                m[i] = mn;
                pw[i * PF_KT + lane] = pr;
            }
            __syncwarp();
            /* output: this lane's dims over the tile's positions */
            const int nj = min(PF_KT, pmax + 1 - p0);
            for (int j = 0; j < nj; j++) {
                float v[DPL];
#pragma unroll
                for (int k = 0; k < DPL; k++)
                    v[k] = vs[j * HD + lane + 32 * k];
#pragma unroll
                for (int i = 0; i < PF_RPW; i++) {
                    const float pj = pw[i * PF_KT + j];
#pragma unroll
                    for (int k = 0; k < DPL; k++)
                        acc[i][k] += pj * v[k];
                }
            }
            __syncwarp(); /* pw is rewritten by the next tile */
        }
#pragma unroll
        for (int i = 0; i < PF_RPW; i++) {
            if (rpos[i] < 0)
                continue;
            const int r = wid * PF_RPW + i, g = r / qt, t = t0 + r % qt;
            float *o = out + ((size_t)t * n_heads + h0 + g) * HD;
#pragma unroll
            for (int k = 0; k < DPL; k++)
                o[lane + 32 * k] = acc[i][k] / l[i]; /* position 0 is always valid: l > 0 */
        }
        ts = te;
    }
}

/* Launch over the batch (d: the device metadata cuda_attention uploaded: pos, tok_seq, slot,
 * block table back to back). Returns false for a head_dim this kernel does not take. */
template <int HD>
static int pf_launch(be_cuda *c, const be_attn_meta *m, const int32_t *d, const float *q, const void *k_cache,
                     const void *v_cache, int n_heads, int n_kv, float *out)
{
    static bool smem_set = false; /* the opt-in above 48 KiB, once per instantiation */
    const size_t smem = pf_smem(HD);
    if (!smem_set) {
        CU_CHECK(cudaFuncSetAttribute(cuda_attn_prefill_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)smem));
        smem_set = true;
    }
    const int G = n_heads / n_kv, gh = G < PF_GH ? G : PF_GH, qt = PF_ROWS / gh;
    const int64_t blocks = (int64_t)((m->n_tok + qt - 1) / qt) * n_kv * ((G + gh - 1) / gh);
    if (blocks > INT32_MAX)
        return hy_err_set(HY_ELIMIT, "CUDA attention: %lld prefill blocks is too many", (long long)blocks);
    const int n_tok = m->n_tok;
    cuda_attn_prefill_kernel<HD><<<(unsigned)blocks, PF_WARPS * 32, smem, c->stream>>>(
        q, (const __half *)k_cache, (const __half *)v_cache, d, d + n_tok, d + 3 * n_tok, m->max_blocks, n_tok,
        n_heads, n_kv, gh, qt, 1.0f / sqrtf((float)HD), out);
    CU_LAUNCHED("cuda_attn_prefill_kernel");
    return HY_OK;
}

bool cuda_attn_prefill_wanted(const be_attn_meta *m, int head_dim)
{
    /* long runs of one sequence's tokens (a prompt, a prefill chunk): on average 8 or more */
    return (head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128) && m->n_tok >= 16 &&
           m->n_tok >= 8 * m->n_seq;
}

int cuda_attn_prefill(be_cuda *c, const be_attn_meta *m, const int32_t *d, const float *q, const void *k_cache,
                      const void *v_cache, int n_heads, int n_kv, int head_dim, float *out)
{
    switch (head_dim) {
    case 32: return pf_launch<32>(c, m, d, q, k_cache, v_cache, n_heads, n_kv, out);
    case 64: return pf_launch<64>(c, m, d, q, k_cache, v_cache, n_heads, n_kv, out);
    case 96: return pf_launch<96>(c, m, d, q, k_cache, v_cache, n_heads, n_kv, out);
    case 128: return pf_launch<128>(c, m, d, q, k_cache, v_cache, n_heads, n_kv, out);
    default: return hy_err_set(HY_EUNSUPPORTED, "CUDA prefill attention: head_dim %d", head_dim);
    }
}
