/* gpu_bench.c - GPU timings for scripts/gpu-check.sh (not a test: it asserts nothing).
 * Decode step time of a llama-1b-shaped Q4_1 model (written here by mkmodel's code) at batch
 * 1/16/64 against the bandwidth floor measured in the same run (device-to-device copy), the
 * HydraLoRA op's achieved bandwidth, and batch-64 steps with 64 / 1 / no adapters.
 * Usage: gpu_bench [--model FILE.gguf] [--ctx N] [--iters N] | gpu_bench --probe */
#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "server/cli.h"

#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int g_iters = 20;

#define DIE(...)                                                                                   \
    do {                                                                                           \
        fprintf(stderr, "gpu_bench: " __VA_ARGS__);                                                \
        fprintf(stderr, ": %s\n", hy_err_msg());                                                   \
        exit(1);                                                                                   \
    } while (0)

/* device-to-device copy bandwidth, counting bytes read + bytes written */
static double copy_bandwidth(void)
{
    const size_t n = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    if (cudaMalloc(&a, n) != cudaSuccess || cudaMalloc(&b, n) != cudaSuccess) {
        fprintf(stderr, "gpu_bench: cudaMalloc for the copy test failed\n");
        exit(1);
    }
    cudaMemset(a, 1, n);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    double t0 = hy_now();
    const int it = 10;
    for (int i = 0; i < it; i++)
        cudaMemcpy(i & 1 ? a : b, i & 1 ? b : a, n, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    double dt = hy_now() - t0;
    cudaFree(a);
    cudaFree(b);
    return 2.0 * (double)n * it / dt;
}

typedef struct {
    int n_seq, ctx, max_blocks;
    int32_t *tokens, *pos, *seq, *slot, *seq_len, *bt, *lt, *seg_begin;
} dec_batch;

/* n_seq sequences, each decoding its token at position ctx - 1 over its own blocks. */
static void dec_init(dec_batch *d, int n_seq, int ctx)
{
    d->n_seq = n_seq;
    d->ctx = ctx;
    d->max_blocks = (ctx + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
    d->tokens = calloc((size_t)n_seq, 4);
    d->pos = calloc((size_t)n_seq, 4);
    d->seq = calloc((size_t)n_seq, 4);
    d->slot = calloc((size_t)n_seq, 4);
    d->seq_len = calloc((size_t)n_seq, 4);
    d->lt = calloc((size_t)n_seq, 4);
    d->seg_begin = calloc((size_t)n_seq + 1, 4);
    d->bt = calloc((size_t)n_seq * d->max_blocks, 4);
    for (int s = 0; s < n_seq; s++) {
        for (int b = 0; b < d->max_blocks; b++)
            d->bt[s * d->max_blocks + b] = s * d->max_blocks + b;
        int p = ctx - 1;
        d->tokens[s] = (s * 7919 + 13) % 1000;
        d->pos[s] = p;
        d->seq[s] = s;
        d->slot[s] = d->bt[s * d->max_blocks + p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK;
        d->seq_len[s] = ctx;
        d->lt[s] = s;
        d->seg_begin[s] = s;
    }
    d->seg_begin[n_seq] = n_seq;
}

/* Mean seconds per eng_forward step (logits downloaded, so each step is synchronous). When
 * host is not NULL, also the mean time the host takes to issue a step without logits (returns
 * as soon as every launch is queued; the device is idle when it starts): close to the step time
 * means the step is bound by issuing launches (fusion, CUDA graphs), well below means by the
 * kernels themselves. */
static double time_steps(eng_model *m, eng_kv *kv, const dec_batch *d, int n_seg,
                         const eng_adapter *const *seg_ad, float *logits, double *host)
{
    int32_t one_seg[2] = {0, d->n_seq};
    eng_batch b = {.n_tok = d->n_seq,
                   .tokens = d->tokens,
                   .attn = {d->n_seq, d->n_seq, d->pos, d->seq, d->slot, d->seq_len, d->bt, d->max_blocks},
                   .n_seg = n_seg,
                   .seg_begin = n_seg == 1 ? one_seg : d->seg_begin,
                   .seg_adapter = seg_ad,
                   .n_logits = d->n_seq,
                   .logits_tok = d->lt};
    for (int i = 0; i < 3; i++)
        if (eng_forward(m, kv, &b, logits))
            DIE("eng_forward");
    double t0 = hy_now();
    for (int i = 0; i < g_iters; i++)
        if (eng_forward(m, kv, &b, logits))
            DIE("eng_forward");
    double step = (hy_now() - t0) / g_iters;
    if (host) {
        eng_batch nb = b;
        nb.n_logits = 0;
        be *be_ = eng_model_backend(m);
        double sum = 0;
        for (int i = 0; i < g_iters; i++) {
            if (be_->ops->sync(be_))
                DIE("sync");
            double h0 = hy_now();
            if (eng_forward(m, kv, &nb, logits))
                DIE("eng_forward");
            sum += hy_now() - h0;
        }
        if (be_->ops->sync(be_))
            DIE("sync");
        *host = sum / g_iters;
    }
    return step;
}

/* one r16 K4 adapter on every projection of every layer (values irrelevant for timing) */
static eng_adapter *make_adapter(eng_model *m, be *b, const float *pool)
{
    const eng_hparams *hp = eng_model_hparams(m);
    const int r = 16, K = 4;
    be_lora **l = calloc((size_t)hp->n_layer * ENG_N_PROJ, sizeof *l);
    for (int il = 0; il < hp->n_layer; il++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            int64_t in, out;
            eng_proj_dims(m, p, &in, &out);
            const float *B[4] = {pool, pool + 1, pool + 2, pool + 3};
            if (b->ops->lora_create(b, r, K, in, out, pool, pool + 7, B, 2.0f, &l[il * ENG_N_PROJ + p]))
                DIE("lora_create");
        }
    eng_adapter *ad = calloc(1, sizeof *ad);
    *ad = (eng_adapter){l, K, NULL, NULL, 1.0f, NULL};
    return ad;
}

static void bench_hydra(be *b, const float *pool, double bw)
{
    static const int64_t shapes[][2] = {{2048, 2048}, {2048, 8192}, {8192, 2048}};
    const int r = 16, K = 4, n_tok = 64;
    printf("\nHydraLoRA op (shrink + gate + expand, r=%d K=%d), %d tokens, fp16 adapter weights\n", r, K, n_tok);
    printf("  %-12s %-26s %10s %10s %8s %14s\n", "in x out", "batch", "us/call", "GB/s", "of copy", "host issue us");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int64_t in = shapes[si][0], out = shapes[si][1];
        be_lora *l[64];
        const float *B[4] = {pool, pool + 1, pool + 2, pool + 3};
        for (int a = 0; a < 64; a++)
            if (b->ops->lora_create(b, r, K, in, out, pool, pool + 5, B, 1.0f, &l[a]))
                DIE("lora_create");
        float *x, *y;
        if (b->ops->alloc(b, sizeof(float) * (size_t)(n_tok * in), (void **)&x) ||
            b->ops->alloc(b, sizeof(float) * (size_t)(n_tok * out), (void **)&y))
            DIE("alloc");
        for (int mode = 0; mode < 2; mode++) {
            be_lora_seg segs[64];
            int n_seg = mode == 0 ? 64 : 1;
            for (int s = 0; s < n_seg; s++)
                segs[s] = (be_lora_seg){mode == 0 ? s : 0, mode == 0 ? s + 1 : n_tok, l[s], NULL, NULL, 1.0f};
            for (int i = 0; i < 5; i++)
                be_hydra1(b, x, in, y, out, segs, n_seg);
            b->ops->sync(b);
            double t0 = hy_now();
            const int it = 200;
            for (int i = 0; i < it; i++)
                if (be_hydra1(b, x, in, y, out, segs, n_seg))
                    DIE("hydra");
            b->ops->sync(b);
            double dt = (hy_now() - t0) / it, host = 0;
            for (int i = 0; i < 20; i++) { /* the host's cost of one call, device idle */
                b->ops->sync(b);
                double h0 = hy_now();
                if (be_hydra1(b, x, in, y, out, segs, n_seg))
                    DIE("hydra");
                host += (hy_now() - h0) / 20;
            }
            b->ops->sync(b);
            /* bytes that must move: each distinct adapter's fp16 [A;R] and Bcat once, x once, y read+write */
            double w = (double)((r + K) * in + out * K * r) * 2.0 * n_seg;
            double bytes = w + 4.0 * n_tok * in + 8.0 * n_tok * out;
            char sh[32];
            snprintf(sh, sizeof sh, "%lldx%lld", (long long)in, (long long)out);
            printf("  %-12s %-26s %10.1f %10.1f %7.0f%% %14.1f\n", sh,
                   mode == 0 ? "64 adapters, 1 tok each" : "1 adapter, 64 tokens", dt * 1e6, bytes / dt / 1e9,
                   100.0 * bytes / dt / bw, host * 1e6);
        }
        b->ops->free(b, x);
        b->ops->free(b, y);
        for (int a = 0; a < 64; a++)
            b->ops->lora_free(b, l[a]);
    }
}

/* per-op timings: where a decode step's time goes */
static void bench_ops(be *b, double bw)
{
    static const int64_t shapes[][2] = {{2048, 2048}, {8192, 2048}, {2048, 8192}, {128256, 2048}};
    static const int toks[] = {1, 8, 16, 64};
    printf("\nmatmul alone (Q4_1 weights; n_tok <= 8 mat-vec on the blocks, else cuBLAS on fp16)\n");
    printf("  %-14s %6s %10s %12s %8s\n", "rows x cols", "n_tok", "us/call", "weight GB/s", "of copy");
    size_t maxw = (size_t)128256 * 2048 / 32 * 20;
    uint8_t *wh = malloc(maxw);
    for (size_t i = 0; i < maxw; i++)
        wh[i] = (uint8_t)(i * 131 + (i >> 7));
    for (size_t i = 0; i < maxw; i += 20) { /* sane fp16 d = 0.001, m = -0.01 */
        wh[i] = 0x19; wh[i + 1] = 0x14; wh[i + 2] = 0x1f; wh[i + 3] = 0xa1;
    }
    float *x, *y;
    if (b->ops->alloc(b, sizeof(float) * 64 * 8192, (void **)&x) ||
        b->ops->alloc(b, sizeof(float) * 64 * (size_t)128256, (void **)&y))
        DIE("alloc");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        be_weight *w;
        if (b->ops->weight_create(b, 3 /* Q4_1 */, shapes[si][0], shapes[si][1], wh, &w))
            DIE("weight_create");
        double wb = (double)shapes[si][0] * shapes[si][1] / 32 * 20;
        for (size_t ti = 0; ti < sizeof toks / sizeof toks[0]; ti++) {
            int n = toks[ti];
            for (int i = 0; i < 3; i++)
                b->ops->matmul(b, w, x, n, y);
            b->ops->sync(b);
            const int it = 50;
            double t0 = hy_now();
            for (int i = 0; i < it; i++)
                if (b->ops->matmul(b, w, x, n, y))
                    DIE("matmul");
            b->ops->sync(b);
            double dt = (hy_now() - t0) / it, rd = n <= 8 ? wb : wb * 3.2; /* fp16 copy: 2 B vs 0.625 B */
            char sh[32];
            snprintf(sh, sizeof sh, "%lldx%lld", (long long)shapes[si][0], (long long)shapes[si][1]);
            printf("  %-14s %6d %10.1f %12.0f %7.0f%%\n", sh, n, dt * 1e6, rd / dt / 1e9, 100 * rd / dt / bw);
        }
        b->ops->weight_free(b, w);
    }
    free(wh);
    /* attention alone, llama-1b heads, context 512 */
    printf("\nattention alone (32/8 heads, head_dim 64, context 512, fp16 KV, RoPE)\n");
    const int ctx = 512, mb = ctx / BE_KV_BLOCK;
    float freq[32];
    for (int i = 0; i < 32; i++)
        freq[i] = powf(500000.0f, -(float)i / 32.0f);
    void *kc, *vc;
    if (b->ops->kv_alloc(b, 64 * mb, 8, 64, &kc, &vc))
        DIE("kv_alloc");
    for (int nseq = 1; nseq <= 64; nseq *= 4) {
        dec_batch d;
        dec_init(&d, nseq, ctx);
        be_attn_meta m = {nseq, nseq, d.pos, d.seq, d.slot, d.seq_len, d.bt, d.max_blocks};
        float *q = x, *k = x + 64 * 32 * 64, *v = k + 64 * 8 * 64; /* rotated in place: disjoint */
        for (int i = 0; i < 3; i++)
            b->ops->attention(b, &m, q, k, v, kc, vc, 32, 8, 64, freq, y);
        b->ops->sync(b);
        const int it = 50;
        double t0 = hy_now();
        for (int i = 0; i < it; i++)
            if (b->ops->attention(b, &m, q, k, v, kc, vc, 32, 8, 64, freq, y))
                DIE("attention");
        b->ops->sync(b);
        double dt = (hy_now() - t0) / it, kvb = 2.0 * nseq * ctx * 8 * 64 * 2;
        printf("  %2d sequences: %8.1f us/call, KV read %6.0f GB/s\n", nseq, dt * 1e6, kvb / dt / 1e9);
    }
    b->ops->free(b, kc);
    b->ops->free(b, vc);
    b->ops->free(b, x);
    b->ops->free(b, y);
}

int main(int argc, char **argv)
{
    const char *model = NULL;
    int ctx = 512;
    if (argc == 2 && !strcmp(argv[1], "--probe")) {
        /* can this binary drive this machine's GPU? (used by gpu-check to decide on a rebuild) */
        be *pb = NULL;
        if (be_cuda_create(0, &pb)) {
            printf("probe: %s\n", hy_err_msg());
            return 1;
        }
        printf("probe: CUDA backend OK\n");
        pb->ops->destroy(pb);
        return 0;
    }
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) model = argv[i + 1];
        else if (!strcmp(argv[i], "--ctx")) ctx = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) g_iters = atoi(argv[i + 1]);
    }
    char path[] = "/tmp/hydrad-bench-llama1b-q4_1.gguf";
    if (!model) {
        if (access(path, R_OK) != 0) {
            char *mk[] = {"mkmodel", "--shape", "llama-1b", "--type", "q4_1", "--seed", "1", "--vocab-from", "none",
                          "-o", path};
            if (cli_mkmodel((int)(sizeof mk / sizeof mk[0]), mk))
                return 1;
        }
        model = path;
    }
    be *b = NULL;
    if (be_cuda_create(0, &b))
        DIE("no GPU");
    gguf_file *f;
    if (gguf_open(model, &f))
        DIE("gguf_open %s", model);
    eng_model *m;
    double t0 = hy_now();
    if (eng_model_load(f, b, &m))
        DIE("eng_model_load");
    const eng_hparams *hp = eng_model_hparams(m);
    printf("model %s: %d layers, embd %d, heads %d/%d, ff %d, vocab %d; loaded in %.1f s\n", model, hp->n_layer,
           hp->n_embd, hp->n_head, hp->n_head_kv, hp->n_ff, hp->n_vocab, hy_now() - t0);
    double qbytes = 0, hbytes = 0;
    for (uint64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        qbytes += (double)t->nbytes;
        if (t->n_dims == 2)
            hbytes += 2.0 * (double)t->ne[0] * (double)t->ne[1];
        else
            hbytes += (double)t->nbytes;
    }
    double bw = copy_bandwidth();
    printf("device-to-device copy bandwidth: %.0f GB/s (read + write)\n", bw / 1e9);
    printf("weights read per step: %.0f MB as stored (Q4_1; mat-vec path, batch <= 8), %.0f MB as fp16 "
           "(cuBLAS path, batch > 8)\n\n",
           qbytes / 1e6, hbytes / 1e6);

    const int batches[] = {1, 16, 64};
    eng_kv *kv;
    const int max_blocks = (ctx + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
    if (eng_kv_create(m, 64 * max_blocks, &kv))
        DIE("eng_kv_create");
    float *logits = malloc(sizeof(float) * 64 * (size_t)hp->n_vocab);
    printf("decode step, context %d tokens per sequence (fp16 KV)\n", ctx);
    printf("  %5s %10s %12s %12s %10s %12s %14s %8s\n", "batch", "ms/step", "floor q (ms)", "floor f16", "step/floor",
           "tok/s", "host issue ms", "kernels");
    for (size_t i = 0; i < sizeof batches / sizeof batches[0]; i++) {
        dec_batch d;
        dec_init(&d, batches[i], ctx);
        double host = 0;
        double dt = time_steps(m, kv, &d, 0, NULL, logits, &host);
        double kvb = (double)batches[i] * ctx * hp->n_layer * 2.0 * hp->n_head_kv * hp->head_dim * 2.0;
        double fq = (qbytes + kvb) / bw, fh = (hbytes + kvb) / bw;
        double floor = batches[i] <= 8 ? fq : fh;
        uint64_t rec = 0, rep = 0, kern = 0; /* kernels of the last recorded step: this one's */
        if (b->ops->step_counts)
            b->ops->step_counts(b, &rec, &rep, &kern);
        char ks[24] = "-"; /* nothing recorded (HY_CUDA_GRAPHS=0) */
        if (kern)
            snprintf(ks, sizeof ks, "%llu", (unsigned long long)kern);
        printf("  %5d %10.3f %12.3f %12.3f %10.2f %12.0f %14.3f %8s\n", batches[i], dt * 1e3, fq * 1e3, fh * 1e3,
               dt / floor, batches[i] / dt, host * 1e3, ks);
    }

    /* adapters */
    size_t pool_n = (size_t)8192 * 64 + 64;
    float *hpool = malloc(sizeof(float) * pool_n);
    for (size_t i = 0; i < pool_n; i++)
        hpool[i] = (float)((i * 2654435761u) % 1000) * 1e-5f - 0.005f;
    printf("\nbatch 64 decode with HydraLoRA r=16 K=4 on all seven projections\n");
    dec_batch d;
    dec_init(&d, 64, ctx);
    t0 = hy_now();
    eng_adapter *ads[64];
    for (int a = 0; a < 64; a++)
        ads[a] = make_adapter(m, b, hpool);
    printf("  (64 adapters created in %.1f s)\n", hy_now() - t0);
    double h_none = 0, h_one = 0, h_all = 0;
    double t_none = time_steps(m, kv, &d, 0, NULL, logits, &h_none);
    const eng_adapter *one[1] = {ads[0]};
    double t_one = time_steps(m, kv, &d, 1, one, logits, &h_one);
    const eng_adapter *all[64];
    for (int a = 0; a < 64; a++)
        all[a] = ads[a];
    double t_all = time_steps(m, kv, &d, 64, all, logits, &h_all);
    printf("  %-28s %10s %10s %14s\n", "adapters in the batch", "ms/step", "vs none", "host issue ms");
    printf("  %-28s %10.3f %10.2f %14.3f\n", "none", t_none * 1e3, 1.0, h_none * 1e3);
    printf("  %-28s %10.3f %10.2f %14.3f\n", "1 (all 64 sequences)", t_one * 1e3, t_one / t_none, h_one * 1e3);
    printf("  %-28s %10.3f %10.2f %14.3f\n", "64 distinct", t_all * 1e3, t_all / t_none, h_all * 1e3);
    printf("  64 distinct vs 1 adapter: %.2fx\n", t_all / t_one);

    bench_hydra(b, hpool, bw);
    bench_ops(b, bw);

    for (int a = 0; a < 64; a++) {
        for (int j = 0; j < hp->n_layer * ENG_N_PROJ; j++)
            b->ops->lora_free(b, ads[a]->lora[j]);
        free((void *)ads[a]->lora);
        free(ads[a]);
    }
    free(hpool);
    free(logits);
    eng_kv_free(kv);
    eng_model_free(m);
    gguf_close(f);
    b->ops->destroy(b);
    return 0;
}
