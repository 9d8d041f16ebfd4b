/* cuda_hydra.cu - HydraLoRA on the device: lora_create / lora_free and the batched op
 *   shrink  [h; l] = [A; R] x      one launch for every segment (each token finds its segment)
 *   gate    g = softmax(l) (fp32), z = g (x) h, plus per-token gate stats
 *   expand  y += scale * Bcat z    one launch, grid over (token, 64-row output chunk)
 * Segment descriptors and the token->segment map travel in one packed copy per call. */
#include "kernels/cuda.h"

#include <math.h>
#include <stdlib.h>

#define HY_SHRINK_WARPS 8
#define HY_EXPAND_WARPS 8
#define HY_EXPAND_ROWS 64

typedef struct {
    const float *AR;
    const float *Bcat;
    int r, K, rk, begin, end;
    float scale;
} cuda_seg_desc;

template <bool VEC>
__global__ void __launch_bounds__(HY_SHRINK_WARPS * 32)
    cuda_hydra_shrink_kernel(const float *__restrict__ x, int in, const cuda_seg_desc *__restrict__ segs,
                             const int32_t *__restrict__ tok_seg, float *__restrict__ hl)
{
    const int t = blockIdx.x;
    const int si = tok_seg[t];
    if (si < 0)
        return;
    const cuda_seg_desc sd = segs[si];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const float *xt = x + (size_t)t * in;
    for (int j = wid; j < sd.rk; j += HY_SHRINK_WARPS) {
        const float *row = sd.AR + (size_t)j * in;
        float s = 0.0f;
        if (VEC) {
            const float4 *r4 = (const float4 *)row, *x4 = (const float4 *)xt;
            for (int i = lane; i < in / 4; i += 32) {
                const float4 a = __ldg(r4 + i), b = __ldg(x4 + i);
                s += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
            }
        } else {
            for (int i = lane; i < in; i += 32)
                s += __ldg(row + i) * __ldg(xt + i);
        }
        s = cuda_warp_sum(s);
        if (lane == 0)
            hl[(size_t)t * CUDA_HL_STRIDE + j] = s;
    }
}

__global__ void cuda_hydra_gate_kernel(const cuda_seg_desc *__restrict__ segs,
                                       const int32_t *__restrict__ tok_seg, const float *__restrict__ hl,
                                       float *__restrict__ z, float *__restrict__ gst)
{
    const int t = blockIdx.x;
    const int si = tok_seg[t];
    if (si < 0)
        return;
    const int r = segs[si].r, K = segs[si].K;
    const float *h = hl + (size_t)t * CUDA_HL_STRIDE;
    float g[CUDA_LORA_MAX_K];
    if (K == 1) {
        g[0] = 1.0f;
    } else {
        float mx = -INFINITY, sum = 0.0f;
        for (int k = 0; k < K; k++)
            mx = fmaxf(mx, h[r + k]);
        for (int k = 0; k < K; k++) {
            g[k] = expf(h[r + k] - mx);
            sum += g[k];
        }
        for (int k = 0; k < K; k++)
            g[k] /= sum;
    }
    float *zt = z + (size_t)t * CUDA_Z_STRIDE;
    for (int i = threadIdx.x; i < K * r; i += blockDim.x)
        zt[i] = g[i / r] * h[i % r];
    if (threadIdx.x == 0) {
        float ent = 0.0f;
        for (int k = 0; k < K; k++) {
            gst[(size_t)t * CUDA_GST_STRIDE + k] = g[k];
            if (g[k] > 0.0f)
                ent -= g[k] * logf(g[k]);
        }
        gst[(size_t)t * CUDA_GST_STRIDE + K] = ent;
    }
}

__global__ void __launch_bounds__(HY_EXPAND_WARPS * 32)
    cuda_hydra_expand_kernel(const cuda_seg_desc *__restrict__ segs, const int32_t *__restrict__ tok_seg,
                             const float *__restrict__ z, float *__restrict__ y, int out)
{
    __shared__ float zs[CUDA_Z_STRIDE];
    const int t = blockIdx.x;
    const int si = tok_seg[t];
    if (si < 0)
        return; /* whole block leaves before the barrier */
    const cuda_seg_desc sd = segs[si];
    const int kr = sd.K * sd.r;
    for (int i = threadIdx.x; i < kr; i += blockDim.x)
        zs[i] = z[(size_t)t * CUDA_Z_STRIDE + i];
    __syncthreads();
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int o0 = blockIdx.y * HY_EXPAND_ROWS;
    const int o1 = min(o0 + HY_EXPAND_ROWS, out);
    for (int o = o0 + wid; o < o1; o += HY_EXPAND_WARPS) {
        const float *row = sd.Bcat + (size_t)o * kr;
        float s = 0.0f;
        for (int i = lane; i < kr; i += 32)
            s += __ldg(row + i) * zs[i];
        s = cuda_warp_sum(s);
        if (lane == 0)
            y[(size_t)t * out + o] += sd.scale * s;
    }
}

__global__ void cuda_hydra_stats_kernel(const cuda_seg_desc *__restrict__ segs, const float *__restrict__ gst,
                                        float *__restrict__ sst)
{
    const cuda_seg_desc sd = segs[blockIdx.x];
    const int k = threadIdx.x;
    if (!sd.AR || k > sd.K)
        return;
    float s = 0.0f;
    for (int t = sd.begin; t < sd.end; t++)
        s += gst[(size_t)t * CUDA_GST_STRIDE + k];
    sst[(size_t)blockIdx.x * CUDA_GST_STRIDE + k] = s;
}

void cuda_lora_free(be *b, be_lora *l)
{
    (void)b;
    if (!l)
        return;
    if (l->AR)
        cudaFree(l->AR);
    if (l->Bcat)
        cudaFree(l->Bcat);
    free(l);
}

/* Copies A, R and B (host) to the device; *out_lora is freed with cuda_lora_free. */
int cuda_lora_create(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                     const float *const *B, float scale, be_lora **out_lora)
{
    be_cuda *c = cuda_ctx(b);
    int rc = HY_OK;
    float *hAR = NULL, *hB = NULL;
    *out_lora = NULL;
    if (r < 1 || K < 1 || r > CUDA_LORA_MAX_R || K > CUDA_LORA_MAX_K)
        return hy_err_set(HY_EUNSUPPORTED,
                          "CUDA backend supports HydraLoRA rank 1..%d and 1..%d heads (got r=%d, K=%d)",
                          CUDA_LORA_MAX_R, CUDA_LORA_MAX_K, r, K);
    if (in <= 0 || out <= 0 || in > INT32_MAX || out > INT32_MAX || !A || !B || (K > 1 && !R))
        return hy_err_set(HY_EINVAL, "CUDA lora_create: bad arguments");
    for (int k = 0; k < K; k++)
        if (!B[k])
            return hy_err_set(HY_EINVAL, "CUDA lora_create: B%d is missing", k);
    const int kr_rows = r + (K > 1 ? K : 0);
    size_t n_ar = 0, n_b = 0;
    if (hy_mul_size((size_t)kr_rows, (size_t)in, &n_ar) || hy_mul_size((size_t)out, (size_t)K * r, &n_b) ||
        n_ar > SIZE_MAX / sizeof(float) || n_b > SIZE_MAX / sizeof(float))
        return hy_err_set(HY_ELIMIT, "CUDA lora_create: too large");
    be_lora *l = (be_lora *)calloc(1, sizeof *l);
    hAR = (float *)malloc(n_ar * sizeof(float));
    hB = (float *)malloc(n_b * sizeof(float));
    if (!l || !hAR || !hB) {
        rc = hy_err_set(HY_ENOMEM, "out of memory (LoRA staging)");
        goto fail;
    }
    l->r = r;
    l->K = K;
    l->in = in;
    l->out = out;
    l->scale = scale;
    memcpy(hAR, A, (size_t)r * in * sizeof(float));
    if (K > 1)
        memcpy(hAR + (size_t)r * in, R, (size_t)K * in * sizeof(float));
    for (int64_t o = 0; o < out; o++)
        for (int k = 0; k < K; k++)
            memcpy(hB + (size_t)o * K * r + (size_t)k * r, B[k] + (size_t)o * r, r * sizeof(float));
    CU_GOTO(cudaMalloc((void **)&l->AR, n_ar * sizeof(float)));
    CU_GOTO(cudaMalloc((void **)&l->Bcat, n_b * sizeof(float)));
    CU_GOTO(cudaMemcpyAsync(l->AR, hAR, n_ar * sizeof(float), cudaMemcpyHostToDevice, c->stream));
    CU_GOTO(cudaMemcpyAsync(l->Bcat, hB, n_b * sizeof(float), cudaMemcpyHostToDevice, c->stream));
    CU_GOTO(cudaStreamSynchronize(c->stream));
    free(hAR);
    free(hB);
    *out_lora = l;
    return HY_OK;
fail:
    if (c->stream)
        cudaStreamSynchronize(c->stream);
    free(hAR);
    free(hB);
    cuda_lora_free(b, l);
    if (rc == HY_EDEVICE)
        cudaGetLastError();
    return rc;
}

static int cuda_hydra_check(int64_t in, int64_t out, const be_lora_seg *segs, int n_seg, int *n_tok,
                            int *any, int *any_stats)
{
    int end = 0;
    *any = *any_stats = 0;
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
        *any = 1;
        if (s->stats)
            *any_stats = 1;
    }
    *n_tok = end;
    return HY_OK;
}

int cuda_hydra(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *segs, int n_seg)
{
    be_cuda *c = cuda_ctx(b);
    int n_tok = 0, any = 0, any_stats = 0;
    if (in <= 0 || out <= 0 || in > INT32_MAX || out > INT32_MAX || n_seg < 0 || (n_seg && !segs))
        return hy_err_set(HY_EINVAL, "hydra: bad arguments");
    int rc = cuda_hydra_check(in, out, segs, n_seg, &n_tok, &any, &any_stats);
    if (rc || !any)
        return rc;
    const size_t meta = (size_t)n_seg * sizeof(cuda_seg_desc) + (size_t)n_tok * sizeof(int32_t);
    void *host = NULL, *dev = NULL, *hl = NULL, *z = NULL, *gst = NULL, *sst = NULL;
    if ((rc = cuda_scratch(c, SCR_HL, (size_t)n_tok * CUDA_HL_STRIDE * sizeof(float), &hl)) ||
        (rc = cuda_scratch(c, SCR_Z, (size_t)n_tok * CUDA_Z_STRIDE * sizeof(float), &z)) ||
        (rc = cuda_scratch(c, SCR_GST, (size_t)n_tok * CUDA_GST_STRIDE * sizeof(float), &gst)) ||
        (rc = cuda_scratch(c, SCR_SST, (size_t)n_seg * CUDA_GST_STRIDE * sizeof(float), &sst)) ||
        (rc = cuda_meta_get(c, meta, &host, &dev)))
        return rc;
    cuda_seg_desc *sd = (cuda_seg_desc *)host;
    int32_t *ts = (int32_t *)(sd + n_seg);
    for (int t = 0; t < n_tok; t++)
        ts[t] = -1;
    for (int i = 0; i < n_seg; i++) {
        const be_lora *l = segs[i].lora;
        const bool on = l && segs[i].tok_end > segs[i].tok_begin;
        sd[i].AR = on ? l->AR : NULL;
        sd[i].Bcat = on ? l->Bcat : NULL;
        sd[i].r = on ? l->r : 0;
        sd[i].K = on ? l->K : 0;
        sd[i].rk = on ? l->r + (l->K > 1 ? l->K : 0) : 0;
        sd[i].begin = segs[i].tok_begin;
        sd[i].end = segs[i].tok_end;
        sd[i].scale = on ? l->scale : 0.0f;
        if (on)
            for (int t = segs[i].tok_begin; t < segs[i].tok_end; t++)
                ts[t] = i;
    }
    rc = cuda_stage_put(c, dev);
    if (rc)
        return rc;
    const cuda_seg_desc *dsd = (const cuda_seg_desc *)dev;
    const int32_t *dts = (const int32_t *)(dsd + n_seg);
    const bool vec = (in % 4) == 0 && ((uintptr_t)x % 16) == 0;
    if (vec)
        cuda_hydra_shrink_kernel<true><<<n_tok, HY_SHRINK_WARPS * 32, 0, c->stream>>>(
            x, (int)in, dsd, dts, (float *)hl);
    else
        cuda_hydra_shrink_kernel<false><<<n_tok, HY_SHRINK_WARPS * 32, 0, c->stream>>>(
            x, (int)in, dsd, dts, (float *)hl);
    CU_LAUNCHED("cuda_hydra_shrink_kernel");
    cuda_hydra_gate_kernel<<<n_tok, 128, 0, c->stream>>>(dsd, dts, (const float *)hl, (float *)z,
                                                         (float *)gst);
    CU_LAUNCHED("cuda_hydra_gate_kernel");
    const dim3 eg((unsigned)n_tok, (unsigned)((out + HY_EXPAND_ROWS - 1) / HY_EXPAND_ROWS));
    if (eg.y > 65535)
        return hy_err_set(HY_EUNSUPPORTED, "hydra: output dimension %lld too large", (long long)out);
    cuda_hydra_expand_kernel<<<eg, HY_EXPAND_WARPS * 32, 0, c->stream>>>(dsd, dts, (const float *)z, y,
                                                                        (int)out);
    CU_LAUNCHED("cuda_hydra_expand_kernel");
    if (!any_stats)
        return HY_OK;
    cuda_hydra_stats_kernel<<<n_seg, 32, 0, c->stream>>>(dsd, (const float *)gst, (float *)sst);
    CU_LAUNCHED("cuda_hydra_stats_kernel");
    float *hs = (float *)malloc((size_t)n_seg * CUDA_GST_STRIDE * sizeof(float));
    if (!hs)
        return hy_err_set(HY_ENOMEM, "out of memory (hydra stats)");
    cudaError_t e = cudaMemcpyAsync(hs, sst, (size_t)n_seg * CUDA_GST_STRIDE * sizeof(float),
                                    cudaMemcpyDeviceToHost, c->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        free(hs);
        return cuda_err(e, "hydra stats download", __FILE__, __LINE__);
    }
    for (int i = 0; i < n_seg; i++) {
        const be_lora *l = segs[i].lora;
        if (!segs[i].stats || !l || segs[i].tok_end == segs[i].tok_begin)
            continue;
        for (int k = 0; k <= l->K; k++)
            segs[i].stats[k] += hs[(size_t)i * CUDA_GST_STRIDE + k];
    }
    free(hs);
    return HY_OK;
}
