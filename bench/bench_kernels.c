/* bench_kernels.c - `hydrad-bench kernels`: the HydraLoRA op (be_ops.hydra) swept over rank r,
 * heads K, batch tokens and distinct adapters, on the CPU or CUDA backend. Achieved bandwidth
 * is compared with a copy bandwidth measured in the same run, and the grouped (segmented) op
 * with a loop of one call per adapter. A benchmark: it prints figures and asserts nothing. */
#include "bench/bench.h"
#include "bench/bench_stats.h"
#include "engine/backend.h"
#include "engine/hy.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef HY_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#define KB_MAX_LIST 16

typedef struct {
    const char *device;
    int threads;
    int64_t in, out;
    int r[KB_MAX_LIST], n_r, K[KB_MAX_LIST], n_K, batch[KB_MAX_LIST], n_batch, ads[KB_MAX_LIST], n_ads;
    double min_time;
    uint64_t seed;
} kb_opts;

static int parse_list(const char *s, int *v, int *n)
{
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < 1 || x > 1 << 20 || *n == KB_MAX_LIST)
            return -1;
        v[(*n)++] = (int)x;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return *n > 0 ? 0 : -1;
}

/* Bytes per second of a large copy in the backend's memory (read + write both counted). */
static double copy_bandwidth(be *b)
{
    const size_t n = (size_t)256 << 20;
    const int it = 6;
#ifdef HY_HAVE_CUDA
    if (!strcmp(b->ops->name, "cuda")) {
        void *src = NULL, *dst = NULL;
        if (cudaMalloc(&src, n) != cudaSuccess || cudaMalloc(&dst, n) != cudaSuccess)
            return 0;
        cudaMemset(src, 1, n);
        cudaMemcpy(dst, src, n, cudaMemcpyDeviceToDevice);
        cudaDeviceSynchronize();
        double t0 = hy_now();
        for (int i = 0; i < it; i++)
            cudaMemcpy(i & 1 ? src : dst, i & 1 ? dst : src, n, cudaMemcpyDeviceToDevice);
        cudaDeviceSynchronize();
        double dt = hy_now() - t0;
        cudaFree(src);
        cudaFree(dst);
        return 2.0 * (double)n * it / dt;
    }
#endif
    (void)b;
    char *src = malloc(n), *dst = malloc(n);
    if (!src || !dst) {
        free(src);
        free(dst);
        return 0;
    }
    memset(src, 1, n);
    memset(dst, 2, n);
    double best = 0;
    for (int i = 0; i < it; i++) {
        double t0 = hy_now();
        memcpy(i & 1 ? src : dst, i & 1 ? dst : src, n);
        double dt = hy_now() - t0;
        double bw = 2.0 * (double)n / dt;
        best = bw > best ? bw : best;
    }
    volatile char sink = dst[n / 2] + src[n / 3]; /* keep the copies */
    (void)sink;
    free(src);
    free(dst);
    return best;
}

static void fill(bench_rng *rng, float *v, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        v[i] = (float)(bench_rng_normal(rng) * scale);
}

/* One adapter's matrices through the backend (copied there; host arrays freed here). */
static int make_lora(be *b, bench_rng *rng, int r, int K, int64_t in, int64_t out, be_lora **l)
{
    int rc = 0;
    float *A = malloc(sizeof(float) * (size_t)(r * in)), *R = malloc(sizeof(float) * (size_t)(K * in));
    float *B[64] = {0};
    if (!A || !R) {
        rc = hy_err_set(HY_ENOMEM, "out of memory for an adapter");
        goto done;
    }
    fill(rng, A, (size_t)(r * in), 0.05f);
    fill(rng, R, (size_t)(K * in), 0.05f);
    for (int k = 0; k < K; k++) {
        B[k] = malloc(sizeof(float) * (size_t)(out * r));
        if (!B[k]) {
            rc = hy_err_set(HY_ENOMEM, "out of memory for an adapter");
            goto done;
        }
        fill(rng, B[k], (size_t)(out * r), 0.05f);
    }
    rc = b->ops->lora_create(b, r, K, in, out, A, K > 1 ? R : NULL, (const float *const *)B, 2.0f, l);
done:
    free(A);
    free(R);
    for (int k = 0; k < K; k++)
        free(B[k]);
    return rc;
}

/* Seconds per call of fn, repeated until min_time has passed (at least 3 calls, after 1 warm-up). */
typedef int (*kb_fn)(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *s, int n, int loop);

static int call_op(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *s, int n, int loop)
{
    if (!loop)
        return be_hydra1(b, x, in, y, out, s, n);
    for (int i = 0; i < n; i++) {
        int rc = be_hydra1(b, x, in, y, out, &s[i], 1);
        if (rc)
            return rc;
    }
    return 0;
}

static int time_op(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *s, int n, int loop,
                   double min_time, double *sec)
{
    int rc = call_op(b, x, in, y, out, s, n, loop);
    if (rc || (rc = b->ops->sync(b)))
        return rc;
    int iters = 0;
    double t0 = hy_now(), dt = 0;
    while (iters < 3 || dt < min_time) {
        if ((rc = call_op(b, x, in, y, out, s, n, loop)))
            return rc;
        iters++;
        if (iters % 4 == 0 || iters < 4) {
            if ((rc = b->ops->sync(b)))
                return rc;
            dt = hy_now() - t0;
        }
    }
    if ((rc = b->ops->sync(b)))
        return rc;
    *sec = (hy_now() - t0) / iters;
    return 0;
}

static int run_case(be *b, const kb_opts *o, int r, int K, int batch, int n_ad, double copy_bw, bench_rng *rng)
{
    int rc = 0;
    be_lora *l[KB_MAX_LIST * 64] = {0};
    be_lora_seg segs[1024];
    float *hx = NULL, *x = NULL, *y = NULL;
    if (n_ad > (int)HY_ARRAY_LEN(segs) || n_ad > (int)HY_ARRAY_LEN(l))
        return hy_err_set(HY_ELIMIT, "at most %zu adapters", HY_ARRAY_LEN(segs));
    size_t nx = (size_t)batch * (size_t)o->in, ny = (size_t)batch * (size_t)o->out;
    for (int a = 0; a < n_ad && !rc; a++)
        rc = make_lora(b, rng, r, K, o->in, o->out, &l[a]);
    if (rc)
        goto done;
    hx = malloc(sizeof(float) * (nx > ny ? nx : ny));
    if (!hx) {
        rc = hy_err_set(HY_ENOMEM, "out of memory for activations");
        goto done;
    }
    if ((rc = b->ops->alloc(b, nx * sizeof(float), (void **)&x)) || (rc = b->ops->alloc(b, ny * sizeof(float), (void **)&y)))
        goto done;
    fill(rng, hx, nx, 1.0f);
    if ((rc = b->ops->upload(b, x, hx, nx * sizeof(float))))
        goto done;
    fill(rng, hx, ny, 1.0f);
    if ((rc = b->ops->upload(b, y, hx, ny * sizeof(float))))
        goto done;
    for (int a = 0; a < n_ad; a++) {
        segs[a].tok_begin = (int)((int64_t)batch * a / n_ad);
        segs[a].tok_end = (int)((int64_t)batch * (a + 1) / n_ad);
        segs[a].lora = l[a];
        segs[a].stats = NULL;
        segs[a].ctl = NULL;
        segs[a].scale = 1.0f;
    }
    double t_grp = 0, t_loop = 0;
    if ((rc = time_op(b, x, o->in, y, o->out, segs, n_ad, 0, o->min_time, &t_grp)) ||
        (rc = time_op(b, x, o->in, y, o->out, segs, n_ad, 1, o->min_time, &t_loop)))
        goto done;
    /* bytes the op must move at least: each adapter's A, R, Bcat once (fp16 on CUDA, fp32 on the
     * CPU), x read, y read + written */
    double w = (double)r * o->in + (K > 1 ? (double)K * o->in : 0) + (double)K * r * o->out;
    double wb = strcmp(b->ops->name, "cuda") ? 4.0 : 2.0;
    double bytes = wb * w * n_ad + 4.0 * ((double)nx + 2.0 * (double)ny);
    double bw = bytes / t_grp;
    printf("| %d | %d | %d | %d | %.1f | %.2f | %.1f%% | %.1f | %.2f |\n", r, K, batch, n_ad, t_grp * 1e6, bw / 1e9,
           copy_bw > 0 ? 100.0 * bw / copy_bw : 0.0, t_loop * 1e6, t_loop / t_grp);
    fflush(stdout);
done:
    for (int a = 0; a < n_ad; a++)
        if (l[a])
            b->ops->lora_free(b, l[a]);
    if (x)
        b->ops->free(b, x);
    if (y)
        b->ops->free(b, y);
    free(hx);
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: hydrad-bench kernels [options]\n"
               "Times the HydraLoRA op (shrink, gate, expand) of a backend over a sweep; prints a markdown\n"
               "table with achieved GB/s against a copy bandwidth measured in the same run, and the grouped\n"
               "op against a loop of one call per adapter.\n\n"
               "  --device D        cpu, cuda or auto (default cpu)\n"
               "  --threads N       CPU backend threads (default: all cores)\n"
               "  --in N            projection input size (default 2048)\n"
               "  --out N           projection output size (default 2048)\n"
               "  --r LIST          ranks (default 8,16,64)\n"
               "  --K LIST          heads (default 1,2,4,8)\n"
               "  --batch LIST      tokens per call (default 1,16,64)\n"
               "  --adapters LIST   distinct adapters per call, in equal segments; values above the\n"
               "                    batch are skipped (default 1,16)\n"
               "  --min-time S      seconds per measurement at least (default 0.05)\n"
               "  --seed S          random inputs (default 1)\n"
               "  -h, --help        this text\n");
}

int bench_kernels_main(int argc, char **argv)
{
    kb_opts o = {.device = "cpu", .in = 2048, .out = 2048, .min_time = 0.05, .seed = 1};
    long nproc = sysconf(_SC_NPROCESSORS_ONLN);
    o.threads = nproc > 0 ? (int)nproc : 1;
    parse_list("8,16,64", o.r, &o.n_r);
    parse_list("1,2,4,8", o.K, &o.n_K);
    parse_list("1,16,64", o.batch, &o.n_batch);
    parse_list("1,16", o.ads, &o.n_ads);
    static const struct option lo[] = {
        {"device", 1, 0, 'd'}, {"threads", 1, 0, 't'}, {"in", 1, 0, 'i'},      {"out", 1, 0, 'o'},
        {"r", 1, 0, 'r'},      {"K", 1, 0, 'K'},       {"batch", 1, 0, 'b'},   {"adapters", 1, 0, 'a'},
        {"min-time", 1, 0, 'm'}, {"seed", 1, 0, 's'},  {"help", 0, 0, 'h'},    {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'd': o.device = optarg; break;
        case 't': o.threads = atoi(optarg); bad = o.threads < 1; break;
        case 'i': o.in = atoll(optarg); bad = o.in < 1 || o.in > 1 << 20; break;
        case 'o': o.out = atoll(optarg); bad = o.out < 1 || o.out > 1 << 20; break;
        case 'r': bad = parse_list(optarg, o.r, &o.n_r); break;
        case 'K': bad = parse_list(optarg, o.K, &o.n_K); break;
        case 'b': bad = parse_list(optarg, o.batch, &o.n_batch); break;
        case 'a': bad = parse_list(optarg, o.ads, &o.n_ads); break;
        case 'm': o.min_time = atof(optarg); bad = !(o.min_time >= 0 && o.min_time < 60); break;
        case 's': o.seed = strtoull(optarg, NULL, 10); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (bad) {
            fprintf(stderr, "hydrad-bench kernels: bad option value '%s' (see --help)\n", optarg);
            return 2;
        }
    }
    for (int i = 0; i < o.n_K; i++)
        if (o.K[i] > 64) {
            fprintf(stderr, "hydrad-bench kernels: K at most 64\n");
            return 2;
        }
    be *b = NULL;
    if (be_open(o.device, o.threads, &b)) {
        fprintf(stderr, "hydrad-bench kernels: %s\n", hy_err_msg());
        return 1;
    }
    double copy_bw = copy_bandwidth(b);
    char host[256] = "?", line[512];
    FILE *ci = fopen("/proc/cpuinfo", "r");
    while (ci && fgets(line, sizeof line, ci))
        if (!strncmp(line, "model name", 10) && strchr(line, ':')) {
            snprintf(host, sizeof host, "%s", strchr(line, ':') + 2);
            host[strcspn(host, "\n")] = 0;
            break;
        }
    if (ci)
        fclose(ci);
    printf("## hydrad-bench kernels: HydraLoRA op on %s (%s, %d threads), in %lld, out %lld\n\n", b->ops->name, host,
           o.threads, (long long)o.in, (long long)o.out);
    printf("copy bandwidth (read + write) measured in this run: %.2f GB/s\n\n", copy_bw / 1e9);
    printf("| r | K | batch | adapters | grouped us | GB/s | of copy | loop us | loop/grouped |\n"
           "|---|---|---|---|---|---|---|---|---|\n");
    bench_rng rng;
    bench_rng_seed(&rng, o.seed);
    int rc = 0;
    for (int ri = 0; ri < o.n_r && !rc; ri++)
        for (int ki = 0; ki < o.n_K && !rc; ki++)
            for (int bi = 0; bi < o.n_batch && !rc; bi++)
                for (int ai = 0; ai < o.n_ads && !rc; ai++) {
                    if (o.ads[ai] > o.batch[bi])
                        continue;
                    rc = run_case(b, &o, o.r[ri], o.K[ki], o.batch[bi], o.ads[ai], copy_bw, &rng);
                }
    printf("\nGB/s counts each adapter's A, R and B once (fp16 on cuda, fp32 on cpu) plus x read and y read and written: the\n"
           "least the op must move; working sets that fit in cache can exceed the copy figure.\n"
           "loop/grouped > 1: one grouped call beats one call per adapter.\n");
    if (rc)
        fprintf(stderr, "hydrad-bench kernels: %s\n", hy_err_msg());
    b->ops->destroy(b);
    return rc ? 1 : 0;
}
