/* cuda_hydra.cu - HydraLoRA on the device: lora_create / lora_free and the batched op, two
 * launches per call and no copies or host synchronisation:
 *   shrink  [h; l] = [A; R] x     grid (token group, 8-row slice of [A; R]); a group is up to
 *                                 HY_TT consecutive tokens of one segment, so each row of
 *                                 [A; R] is read once per group (SGMV), once per token in decode
 *   expand  g = softmax(l), z = g (x) h, y += scale * Bcat z
 *                                 grid (token group, output tile of 256 threads x 1 or 2 outputs);
 *                                 every tile recomputes the K-way softmax of its tokens (cheap),
 *                                 reads its slice of Bcat^T once for the whole group, coalesced
 *                                 across output threads (half2 loads when `out` is even).
 * Adapter matrices live in the pool of cuda_lpool.cu as fp16 with power-of-two factors (see
 * struct be_lora); activations, [h; l], the softmax and all sums stay fp32. Each hydra call first
 * makes the stream wait for adapter copies still in flight (free when there are none).
 * Segment descriptors travel as a __grid_constant__ kernel parameter (HY_P_SEGS per launch;
 * more segments take more launches). Router stats are atomically added to per-call entries in
 * device memory and brought home by the next download/sync (cuda_gst_*), never per call. */
#include "kernels/cuda.h"

#include <math.h>
#include <stdlib.h>

#define HY_TT 8          /* tokens of one segment handled together */
#define HY_P_SEGS 64     /* segments per launch (kernel parameter space is 4 KiB: 64 x 56 bytes) */
#define HY_SHRINK_WARPS 8
#define HY_EX_THREADS 256

typedef struct {
    const __half *AR;
    const __half *BT;
    int begin, end; /* tokens */
    int g0;         /* first group of this segment in the launch */
    int gst;        /* router stats entry in gst_dev, or -1 */
    short r, K;
    short proj;     /* which of the call's projections (its y, out and [h; l] rows) */
    float l_mul, out_mul; /* be_lora's: undo the storage factors */
    float temp;     /* the segment's router control (be_gate.h; K <= 8 heads fit allow) */
    unsigned short allow;
    short top_k;
} hy_seg;

typedef struct {
    int n_seg, n_group;
    int in;
    int hl_tok;              /* tokens per projection in hl: projection i's rows start at i * hl_tok */
    int out[BE_MM_MAX];
    float *y[BE_MM_MAX];
    hy_seg s[HY_P_SEGS];
} hy_params;

/* the segment that owns group g: the last one with g0 <= g (g0 ascending) */
__device__ __forceinline__ int hy_find(const hy_params &p, int g)
{
    int lo = 0, hi = p.n_seg - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (p.s[mid].g0 <= g)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

template <bool VEC>
__global__ void __launch_bounds__(HY_SHRINK_WARPS * 32)
    cuda_hydra_shrink_kernel(const __grid_constant__ hy_params p, const float *__restrict__ x,
                             float *__restrict__ hl)
{
    const int si = hy_find(p, blockIdx.x);
    const hy_seg &s = p.s[si];
    const int rk = s.r + (s.K > 1 ? s.K : 0);
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.y * HY_SHRINK_WARPS + (threadIdx.x >> 5);
    if (j >= rk)
        return; /* whole warp; no block barrier below */
    const int t0 = s.begin + ((int)blockIdx.x - s.g0) * HY_TT;
    const int cnt = min(HY_TT, s.end - t0);
    const int in = p.in;
    const __half *row = s.AR + (size_t)j * in;
    hl += (size_t)s.proj * p.hl_tok * CUDA_HL_STRIDE;
    float acc[HY_TT];
#pragma unroll
    for (int t = 0; t < HY_TT; t++)
        acc[t] = 0.0f;
    if (VEC) {
        /* in % 4 == 0: a row starts 8-byte aligned, so 4 halves load as one uint2 */
        const uint2 *r4 = (const uint2 *)row;
        const float4 *x4 = (const float4 *)(x + (size_t)t0 * in);
        const int n4 = in / 4;
        for (int i = lane; i < n4; i += 32) {
            const uint2 raw = __ldg(r4 + i);
            const float2 a01 = __half22float2(*(const __half2 *)&raw.x);
            const float2 a23 = __half22float2(*(const __half2 *)&raw.y);
#pragma unroll
            for (int t = 0; t < HY_TT; t++) {
                if (t < cnt) {
                    const float4 b = __ldg(x4 + (size_t)t * n4 + i);
                    acc[t] += a01.x * b.x + a01.y * b.y + a23.x * b.z + a23.y * b.w;
                }
            }
        }
    } else {
        const float *xt = x + (size_t)t0 * in;
        for (int i = lane; i < in; i += 32) {
            const float a = __half2float(__ldg(row + i));
#pragma unroll
            for (int t = 0; t < HY_TT; t++)
                if (t < cnt)
                    acc[t] += a * __ldg(xt + (size_t)t * in + i);
        }
    }
#pragma unroll
    for (int t = 0; t < HY_TT; t++) {
        if (t < cnt) { /* cnt is warp-uniform */
            const float v = cuda_warp_sum(acc[t]);
            if (lane == 0)
                hl[(size_t)(t0 + t) * CUDA_HL_STRIDE + j] = v;
        }
    }
}

/* NO outputs per thread (1, or 2 through half2 loads when `out` is even) */
template <int NO>
__global__ void __launch_bounds__(HY_EX_THREADS)
    cuda_hydra_expand_kernel(const __grid_constant__ hy_params p, const float *__restrict__ hl,
                             float *__restrict__ gst)
{
    __shared__ float zs[HY_TT][CUDA_Z_STRIDE];
    __shared__ float gs[HY_TT][CUDA_LORA_MAX_K];
    const int si = hy_find(p, blockIdx.x);
    const hy_seg &s = p.s[si];
    const int r = s.r, K = s.K, kr = r * K;
    const int t0 = s.begin + ((int)blockIdx.x - s.g0) * HY_TT;
    const int cnt = min(HY_TT, s.end - t0);
    const int tid = threadIdx.x;
    hl += (size_t)s.proj * p.hl_tok * CUDA_HL_STRIDE;
    if (tid < cnt) {
        const float *h = hl + (size_t)(t0 + tid) * CUDA_HL_STRIDE;
        float g[CUDA_LORA_MAX_K], ent = 0.0f;
        if (K == 1) {
            g[0] = 1.0f;
        } else {
            const be_gate_ctl ctl = {s.temp, s.top_k, s.allow};
            ent = be_gate(h + r, K, s.l_mul, &ctl, g);
        }
        for (int k = 0; k < K; k++)
            gs[tid][k] = g[k];
        if (blockIdx.y == 0 && s.gst >= 0) {
            float *st = gst + (size_t)s.gst * CUDA_GST_STRIDE;
            for (int k = 0; k < K; k++)
                atomicAdd(st + k, g[k]);
            atomicAdd(st + K, ent);
        }
    }
    __syncthreads();
    for (int idx = tid; idx < cnt * kr; idx += HY_EX_THREADS) {
        const int t = idx / kr, i = idx - t * kr;
        zs[t][i] = gs[t][i / r] * hl[(size_t)(t0 + t) * CUDA_HL_STRIDE + i % r];
    }
    __syncthreads();
    const int out = p.out[s.proj];
    float *__restrict__ y = p.y[s.proj];
    const int o = (blockIdx.y * HY_EX_THREADS + tid) * NO;
    if (o >= out)
        return; /* with NO == 2, out is even: o < out means o + 1 < out too */
    const __half *col = s.BT + o;
    float acc[NO][HY_TT];
#pragma unroll
    for (int q = 0; q < NO; q++)
#pragma unroll
        for (int t = 0; t < HY_TT; t++)
            acc[q][t] = 0.0f;
#pragma unroll 4
    for (int i = 0; i < kr; i++) {
        float w[NO];
        if (NO == 2) { /* out and o even, BT 256-byte aligned: a 4-byte aligned pair */
            const float2 w2 = __half22float2(__ldg((const __half2 *)(col + (size_t)i * out)));
            w[0] = w2.x;
            w[NO - 1] = w2.y;
        } else {
            w[0] = __half2float(__ldg(col + (size_t)i * out));
        }
#pragma unroll
        for (int t = 0; t < HY_TT; t++)
            if (t < cnt)
#pragma unroll
                for (int q = 0; q < NO; q++)
                    acc[q][t] += w[q] * zs[t][i];
    }
#pragma unroll
    for (int t = 0; t < HY_TT; t++)
        if (t < cnt)
#pragma unroll
            for (int q = 0; q < NO; q++)
                y[(size_t)(t0 + t) * out + o + q] += s.out_mul * acc[q][t];
}

/* ---- router stats: device entries, one download per step ---- */

int cuda_gst_enqueue(be_cuda *c, int *n)
{
    *n = c->gst_n;
    if (!c->gst_n)
        return HY_OK;
    const size_t bytes = (size_t)c->gst_n * CUDA_GST_STRIDE * sizeof(float);
    c->gst_n = 0;
    CU_CHECK(cudaMemcpyAsync(c->gst_host, c->gst_dev, bytes, cudaMemcpyDeviceToHost, c->stream));
    CU_CHECK(cudaMemsetAsync(c->gst_dev, 0, bytes, c->stream));
    return HY_OK;
}

/* the stream must have been synchronised since cuda_gst_enqueue returned n */
void cuda_gst_finish(be_cuda *c, int n)
{
    for (int e = 0; e < n; e++) {
        float *dst = c->gst_dst[e];
        const float *src = c->gst_host + (size_t)e * CUDA_GST_STRIDE;
        for (int k = 0; k <= c->gst_k[e]; k++)
            dst[k] += src[k];
    }
}

int cuda_gst_flush(be_cuda *c)
{
    int n = 0;
    int rc = cuda_gst_enqueue(c, &n);
    if (rc || !n)
        return rc;
    CU_CHECK(cudaStreamSynchronize(c->stream));
    cuda_gst_finish(c, n);
    return HY_OK;
}

void cuda_lora_free(be *b, be_lora *l)
{
    if (!l)
        return;
    if (b) {
        be_cuda *c = cuda_ctx(b);
        c->epoch++; /* recorded steps may name this adapter's memory */
        /* pending stats may point into the arrays of the adapter being dropped: deliver them now */
        if (c->gst_n)
            (void)cuda_gst_flush(c);
        cuda_lpool_release(c, l->mem, l->bytes, l->chunk); /* waits for queued users first */
    }
    free(l);
}

/* [A; R] at offset 0 and BT at *bt_off of one pool range; sizes checked for overflow */
static int lora_layout(int r, int K, int64_t in, int64_t out, size_t *ar_bytes, size_t *bt_off,
                       size_t *total)
{
    const int kr_rows = r + (K > 1 ? K : 0);
    size_t n_ar = 0, n_b = 0;
    if (hy_mul_size((size_t)kr_rows, (size_t)in, &n_ar) || hy_mul_size((size_t)out, (size_t)K * r, &n_b) ||
        hy_mul_size(n_ar, sizeof(__half), ar_bytes) || hy_mul_size(n_b, sizeof(__half), &n_b) ||
        *ar_bytes > SIZE_MAX / 2 || n_b > SIZE_MAX / 2 - CUDA_LPOOL_ALIGN)
        return hy_err_set(HY_ELIMIT, "CUDA lora_create: too large");
    *bt_off = (*ar_bytes + CUDA_LPOOL_ALIGN - 1) / CUDA_LPOOL_ALIGN * CUDA_LPOOL_ALIGN;
    *total = *bt_off + n_b;
    return HY_OK;
}

static void lora_to_half(__half *dst, const float *src, size_t n, float mul)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = __float2half_rn(src[i] * mul);
}

/* The fp16 image of one pool range, made in ordinary host memory by any thread. */
struct be_lora_pack {
    int r, K;
    int64_t in, out;
    float l_mul, out_mul;
    size_t total, bt_off;
    void *host; /* [A; R] at 0, BT at bt_off: the range's bytes */
};

void cuda_lora_pack_free(be *b, be_lora_pack *p)
{
    (void)b;
    if (p)
        free(p->host);
    free(p);
}

/* Rounds A, R and B (host, fp32) to fp16 with their factors (struct be_lora) into the layout of
 * a pool range. Touches no device and no backend state: any thread. */
int cuda_lora_pack(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                   const float *const *B, float scale, be_lora_pack **out_pack)
{
    (void)b;
    size_t ar_bytes = 0, bt_off = 0, total = 0;
    *out_pack = NULL;
    if (r < 1 || K < 1 || r > CUDA_LORA_MAX_R || K > CUDA_LORA_MAX_K)
        return hy_err_set(HY_EUNSUPPORTED,
                          "CUDA backend supports HydraLoRA rank 1..%d and 1..%d heads (got r=%d, K=%d)",
                          CUDA_LORA_MAX_R, CUDA_LORA_MAX_K, r, K);
    if (in <= 0 || out <= 0 || in > INT32_MAX || out > INT32_MAX || !A || !B || (K > 1 && !R))
        return hy_err_set(HY_EINVAL, "CUDA lora_create: bad arguments");
    for (int k = 0; k < K; k++)
        if (!B[k])
            return hy_err_set(HY_EINVAL, "CUDA lora_create: B%d is missing", k);
    int rc = lora_layout(r, K, in, out, &ar_bytes, &bt_off, &total);
    if (rc)
        return rc;
    be_lora_pack *p = (be_lora_pack *)calloc(1, sizeof *p);
    if (!p || !(p->host = malloc(total))) {
        free(p);
        return hy_err_set(HY_ENOMEM, "out of memory (LoRA, %zu bytes)", total);
    }
    *p = (be_lora_pack){r, K, in, out, 1.0f, 1.0f, total, bt_off, p->host};
    const float fa = q_f16_pow2(&A, 1, (size_t)r * in);
    const float fr = K > 1 ? q_f16_pow2(&R, 1, (size_t)K * in) : 1.0f;
    const float fb = q_f16_pow2(B, K, (size_t)out * r);
    p->l_mul = 1.0f / fr;
    p->out_mul = scale / fa / fb; /* powers of two: exact unless scale itself underflows */
    __half *hAR = (__half *)p->host, *hB = (__half *)((char *)p->host + bt_off);
    lora_to_half(hAR, A, (size_t)r * in, fa);
    if (K > 1)
        lora_to_half(hAR + (size_t)r * in, R, (size_t)K * in, fr);
    /* BT[k*r + i][o] = B_k[o][i] */
    for (int k = 0; k < K; k++)
        for (int i = 0; i < r; i++) {
            __half *dst = hB + (size_t)(k * r + i) * out;
            for (int64_t o = 0; o < out; o++)
                dst[o] = __float2half_rn(B[k][(size_t)o * r + i] * fb);
        }
    *out_pack = p;
    return HY_OK;
}

/* Engine thread: a pool range for the pack, filled through pinned staging on the copy stream,
 * returning without waiting: the next hydra orders the copy before its kernels. Frees p. */
int cuda_lora_adopt(be *b, be_lora_pack *p, be_lora **out_lora)
{
    be_cuda *c = cuda_ctx(b);
    int rc = HY_OK, slot = 0;
    void *host = NULL;
    *out_lora = NULL;
    be_lora *l = (be_lora *)calloc(1, sizeof *l);
    if (!l) {
        cuda_lora_pack_free(b, p);
        return hy_err_set(HY_ENOMEM, "out of memory (LoRA)");
    }
    l->r = p->r;
    l->K = p->K;
    l->in = p->in;
    l->out = p->out;
    l->l_mul = p->l_mul;
    l->out_mul = p->out_mul;
    c->epoch++;
    if ((rc = cuda_lpool_alloc(c, p->total, &l->mem, &l->bytes, &l->chunk)))
        goto fail;
    l->AR = (__half *)l->mem;
    l->BT = (__half *)((char *)l->mem + p->bt_off);
    if ((rc = cuda_lstage_get(c, p->total, &slot, &host)))
        goto fail;
    memcpy(host, p->host, p->total);
    if ((rc = cuda_lstage_put(c, slot, l->mem, p->total)))
        goto fail;
    cuda_lora_pack_free(b, p);
    *out_lora = l;
    return HY_OK;
fail:
    cuda_lora_pack_free(b, p);
    cuda_lora_free(b, l); /* nothing of ours is queued: the range goes straight back */
    if (rc == HY_EDEVICE)
        cudaGetLastError();
    return rc;
}

/* Both halves at once (the caller's arrays may be reused as soon as this returns).
 * *out_lora is freed with cuda_lora_free. */
int cuda_lora_create(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                     const float *const *B, float scale, be_lora **out_lora)
{
    be_lora_pack *p = NULL;
    *out_lora = NULL;
    int rc = cuda_lora_pack(b, r, K, in, out, A, R, B, scale, &p);
    return rc ? rc : cuda_lora_adopt(b, p, out_lora);
}

static int cuda_hydra_check(int64_t in, int64_t out, const be_lora_seg *segs, int n_seg, int *n_tok,
                            int *any)
{
    int end = 0;
    *any = 0;
    for (int i = 0; i < n_seg; i++) {
        const be_lora_seg *s = &segs[i];
        if (s->tok_begin < end || s->tok_end < s->tok_begin)
            return hy_err_set(HY_EINVAL, "hydra: segment %d [%d, %d) is not sorted or disjoint", i,
                              s->tok_begin, s->tok_end);
        end = s->tok_end;
        if (!s->lora || s->tok_end == s->tok_begin)
            continue;
        if (s->lora->in != in || s->lora->out != out)
            return hy_err_set(HY_EINVAL, "hydra: segment %d adapter is %lld x %lld, projection is %lld x %lld",
                              i, (long long)s->lora->out, (long long)s->lora->in, (long long)out,
                              (long long)in);
        if (!be_gate_ok(s->ctl, s->lora->K))
            return hy_err_set(HY_EINVAL, "hydra: segment %d has a router control that allows no head of %d", i,
                              s->lora->K);
        *any = 1;
    }
    *n_tok = end;
    return HY_OK;
}

/* the call's shrink and expand launches for the segments gathered in p */
static int cuda_hydra_launch(be_cuda *c, const hy_params *p, int n, int max_rk, const float *x, float *hl,
                             bool vec)
{
    if (!p->n_seg)
        return HY_OK;
    const dim3 sg((unsigned)p->n_group, (unsigned)((max_rk + HY_SHRINK_WARPS - 1) / HY_SHRINK_WARPS));
    if (vec)
        cuda_hydra_shrink_kernel<true><<<sg, HY_SHRINK_WARPS * 32, 0, c->stream>>>(*p, x, hl);
    else
        cuda_hydra_shrink_kernel<false><<<sg, HY_SHRINK_WARPS * 32, 0, c->stream>>>(*p, x, hl);
    CU_LAUNCHED("cuda_hydra_shrink_kernel");
    int no = 2, max_out = 0;
    for (int i = 0; i < n; i++) {
        no = p->out[i] % 2 ? 1 : no;
        max_out = HY_MAX(max_out, p->out[i]);
    }
    const int per_block = HY_EX_THREADS * no;
    const dim3 eg((unsigned)p->n_group, (unsigned)((max_out + per_block - 1) / per_block));
    if (no == 2)
        cuda_hydra_expand_kernel<2><<<eg, HY_EX_THREADS, 0, c->stream>>>(*p, hl, c->gst_dev);
    else
        cuda_hydra_expand_kernel<1><<<eg, HY_EX_THREADS, 0, c->stream>>>(*p, hl, c->gst_dev);
    CU_LAUNCHED("cuda_hydra_expand_kernel");
    return HY_OK;
}

/* Every projection's segments in one shrink and one expand launch (more when they hold more than
 * HY_P_SEGS segments or router-stats entries than fit): projections that read the same x (q/k/v,
 * gate/up) cost two launches, not two each. */
int cuda_hydra_n(be *b, int n, const float *x, int64_t in, float *const *y, const int64_t *out,
                 const be_lora_seg *const *segs, int n_seg)
{
    be_cuda *c = cuda_ctx(b);
    if (n < 1 || n > BE_MM_MAX || in <= 0 || in > INT32_MAX || n_seg < 0 || !y || !out || (n_seg && !segs))
        return hy_err_set(HY_EINVAL, "hydra: bad arguments");
    int n_tok = 0, any = 0, rc;
    for (int i = 0; i < n; i++) {
        int nt = 0, a = 0;
        if (out[i] <= 0 || out[i] > INT32_MAX)
            return hy_err_set(HY_EINVAL, "hydra: bad output dimension %lld", (long long)out[i]);
        if ((out[i] + HY_EX_THREADS - 1) / HY_EX_THREADS > 65535)
            return hy_err_set(HY_EUNSUPPORTED, "hydra: output dimension %lld too large", (long long)out[i]);
        if (n_seg && !segs[i])
            return hy_err_set(HY_EINVAL, "hydra: projection %d has no segments", i);
        if (n_seg && (rc = cuda_hydra_check(in, out[i], segs[i], n_seg, &nt, &a)))
            return rc;
        n_tok = HY_MAX(n_tok, nt);
        any |= a;
    }
    if (!any)
        return HY_OK;
    if ((rc = cuda_lpool_wait(c))) /* adapter copies still in flight on the copy stream */
        return rc;
    void *hl = NULL;
    if ((rc = cuda_scratch(c, SCR_HL, (size_t)n * n_tok * CUDA_HL_STRIDE * sizeof(float), &hl)))
        return rc;
    const bool vec = (in % 4) == 0 && ((uintptr_t)x % 16) == 0;
    hy_params p;
    memset(&p, 0, sizeof p);
    p.in = (int)in;
    p.hl_tok = n_tok;
    for (int i = 0; i < n; i++) {
        p.out[i] = (int)out[i];
        p.y[i] = y[i];
    }
    int max_rk = 0;
    for (int pi = 0; pi < n; pi++) {
        for (int i = 0; i < n_seg; i++) {
            const be_lora_seg *sg = &segs[pi][i];
            const be_lora *l = sg->lora;
            if (!l || sg->tok_end == sg->tok_begin)
                continue;
            const bool want = sg->stats != NULL;
            if (p.n_seg == HY_P_SEGS || (want && c->gst_n == CUDA_GST_CAP)) {
                if ((rc = cuda_hydra_launch(c, &p, n, max_rk, x, (float *)hl, vec)))
                    return rc;
                p.n_seg = p.n_group = 0;
                max_rk = 0;
                if (want && c->gst_n == CUDA_GST_CAP && (rc = cuda_gst_flush(c)))
                    return rc; /* rare: more stats entries than fit between two downloads */
            }
            hy_seg *s = &p.s[p.n_seg++];
            s->AR = l->AR;
            s->BT = l->BT;
            s->begin = sg->tok_begin;
            s->end = sg->tok_end;
            s->g0 = p.n_group;
            s->r = (short)l->r;
            s->K = (short)l->K;
            s->proj = (short)pi;
            s->l_mul = l->l_mul;
            s->out_mul = l->out_mul * be_seg_scale(sg); /* the stack member's weight */
            s->gst = -1;
            s->temp = sg->ctl ? sg->ctl->temp : 1.0f;
            s->allow = (unsigned short)(sg->ctl ? sg->ctl->allow : 0xffffu);
            s->top_k = (short)(sg->ctl ? sg->ctl->top_k : 0);
            if (want) {
                s->gst = c->gst_n;
                c->gst_dst[c->gst_n] = sg->stats;
                c->gst_k[c->gst_n] = l->K;
                c->gst_n++;
            }
            p.n_group += (s->end - s->begin + HY_TT - 1) / HY_TT;
            max_rk = HY_MAX(max_rk, l->r + (l->K > 1 ? l->K : 0));
        }
    }
    return cuda_hydra_launch(c, &p, n, max_rk, x, (float *)hl, vec);
}
