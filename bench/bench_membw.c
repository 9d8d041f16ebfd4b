/* bench_membw.c - `hydrad-bench membw`: the host's read bandwidth (N threads summing a buffer much
 * larger than the last-level cache, best of several passes) and, given a GGUF, the weight bytes one
 * decode step reads: the two inputs of the CPU bandwidth floor (bench/bench_cpu.sh). A benchmark:
 * it prints figures and asserts nothing; it never touches the engine's own code paths. */
#include "bench/bench.h"
#include "engine/gguf.h"
#include "engine/hy.h"

#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    uint64_t *base;   /* this thread's slice; first touched by this thread (NUMA-local pages) */
    size_t n;         /* uint64_t words in the slice */
    int passes;
    pthread_barrier_t *start, *done;
    uint64_t sink;    /* the sums, so the compiler cannot drop the loads */
} mb_slice;

/* 16-byte vectors (GCC/Clang extension; plain SSE2 on x86-64, NEON on arm64). */
typedef uint64_t mb_v2 __attribute__((vector_size(16)));

/* Four independent vector accumulators, one cache line per iteration: enough loads in flight
 * to saturate a core's memory path. n is a multiple of 8 words and p is 64-byte aligned. */
static uint64_t mb_sum(const uint64_t *p, size_t n)
{
    const mb_v2 *v = (const mb_v2 *)p;
    mb_v2 a0 = {0, 0}, a1 = {0, 0}, a2 = {0, 0}, a3 = {0, 0};
    for (size_t i = 0; i < n / 2; i += 4) {
        a0 += v[i];
        a1 += v[i + 1];
        a2 += v[i + 2];
        a3 += v[i + 3];
    }
    mb_v2 a = a0 + a1 + a2 + a3;
    return a[0] + a[1];
}

static void *mb_worker(void *arg)
{
    mb_slice *s = arg;
    /* Real pages, not the shared zero page an untouched mapping would read from. */
    for (size_t i = 0; i < s->n; i++)
        s->base[i] = i * 0x9E3779B97F4A7C15ull;
    for (int p = 0; p < s->passes; p++) {
        pthread_barrier_wait(s->start);
        s->sink += mb_sum(s->base, s->n);
        pthread_barrier_wait(s->done);
    }
    return NULL;
}

/* Best read bandwidth in bytes/s over `passes` passes of `threads` threads over `bytes` bytes;
 * each pass's figure goes to pass_bw[] (caller's array of `passes`). 0 on success. */
static int mb_measure(int threads, size_t bytes, int passes, double *best, double *pass_bw)
{
    int rc = HY_ENOMEM, started = 0, b_start = 0, b_done = 0;
    size_t words = bytes / sizeof(uint64_t) / (size_t)threads / 8 * 8; /* whole cache lines */
    uint64_t *buf = NULL;
    pthread_t *tid = calloc((size_t)threads, sizeof *tid);
    mb_slice *sl = calloc((size_t)threads, sizeof *sl);
    pthread_barrier_t start, done;
    *best = 0;
    if (!tid || !sl || posix_memalign((void **)&buf, 4096, words * sizeof(uint64_t) * (size_t)threads))
        goto fail;
    rc = HY_EINVAL;
    if (pthread_barrier_init(&start, NULL, (unsigned)threads + 1))
        goto fail;
    b_start = 1;
    if (pthread_barrier_init(&done, NULL, (unsigned)threads + 1))
        goto fail;
    b_done = 1;
    for (; started < threads; started++) {
        sl[started] = (mb_slice){.base = buf + words * (size_t)started, .n = words, .passes = passes,
                                 .start = &start, .done = &done};
        if (pthread_create(&tid[started], NULL, mb_worker, &sl[started]))
            goto fail;
    }
    for (int p = 0; p < passes; p++) {
        pthread_barrier_wait(&start);
        double t0 = hy_now();
        pthread_barrier_wait(&done);
        double dt = hy_now() - t0;
        pass_bw[p] = dt > 0 ? (double)(words * sizeof(uint64_t) * (size_t)threads) / dt : 0;
        if (pass_bw[p] > *best)
            *best = pass_bw[p];
    }
    rc = 0;
fail:
    /* A thread that could not be created leaves the started ones waiting at the first barrier,
     * owning their slices: leak it all (the process is out of resources and exits right after). */
    if (started > 0 && started < threads)
        return rc;
    for (int t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    if (b_start)
        pthread_barrier_destroy(&start);
    if (b_done)
        pthread_barrier_destroy(&done);
    free(buf);
    free(tid);
    free(sl);
    return rc;
}

static int mb_meta_u32(const gguf_file *f, const char *arch, const char *key, uint32_t *out)
{
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    return gguf_get_u32(f, k, out);
}

/* Bytes a single-stream decode step reads from the weights of `path`: every tensor whole, except
 * token_embd.weight, of which only one row when the model has its own output.weight (a tied model
 * reads all of it for the logits). *kv_pos: FP16 K and V bytes per cached position (0 if the
 * metadata lacks the shape). */
static int mb_model_bytes(const char *path, uint64_t *weights, uint64_t *kv_pos, uint64_t *n_tensors)
{
    gguf_file *f = NULL;
    int rc = gguf_open(path, &f);
    if (rc)
        return rc;
    bool tied = gguf_find_tensor(f, "output.weight") == NULL;
    *weights = 0;
    *n_tensors = gguf_n_tensors(f);
    for (uint64_t i = 0; i < *n_tensors; i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        uint64_t n = t->nbytes;
        if (!tied && gguf_str_eq(t->name, "token_embd.weight") && t->n_dims >= 2 && t->ne[1] > 0)
            n /= t->ne[1];
        *weights += n;
    }
    *kv_pos = 0;
    gguf_str a;
    char arch[64];
    uint32_t n_layer, n_embd, n_head, n_head_kv, head_dim;
    if (!gguf_get_str(f, "general.architecture", &a) && a.len < sizeof arch) {
        memcpy(arch, a.ptr, a.len);
        arch[a.len] = 0;
        if (!mb_meta_u32(f, arch, "block_count", &n_layer) &&
            !mb_meta_u32(f, arch, "embedding_length", &n_embd) &&
            !mb_meta_u32(f, arch, "attention.head_count", &n_head) && n_head > 0) {
            if (mb_meta_u32(f, arch, "attention.head_count_kv", &n_head_kv))
                n_head_kv = n_head;
            if (mb_meta_u32(f, arch, "attention.key_length", &head_dim))
                head_dim = n_embd / n_head;
            *kv_pos = (uint64_t)n_layer * 2 * n_head_kv * head_dim * 2;
        }
    }
    gguf_close(f);
    return 0;
}

/* 8x the last-level cache, at least 256 MiB. The cache size comes from sysfs: glibc's
 * sysconf(_SC_LEVEL3_CACHE_SIZE) reads CPUID, which some hypervisors fill with the host's. */
static size_t mb_default_bytes(void)
{
    size_t b = (size_t)256 << 20;
    unsigned long kib = 0;
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f && fscanf(f, "%luK", &kib) == 1 && kib < (1ul << 24) && (size_t)kib * 1024 * 8 > b)
        b = (size_t)kib * 1024 * 8;
    if (f)
        fclose(f);
    return b;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: hydrad-bench membw [options]\n"
               "Read bandwidth of this host: each of N threads sums its slice of a buffer much larger\n"
               "than the last-level cache; the best of several passes is printed. With --model, also\n"
               "the weight bytes a single-stream decode step of that GGUF reads, so that\n"
               "bytes / bandwidth is the decode step's floor. Ends with key value lines for scripts.\n\n"
               "  --threads N   reader threads (default: all cores)\n"
               "  --mib M       buffer size in MiB (default: 8x the L3 cache, at least 256)\n"
               "  --passes P    passes, best one kept (default 7)\n"
               "  --model F     GGUF whose decode-step weight bytes to print\n"
               "  -h, --help    this text\n");
}

int bench_membw_main(int argc, char **argv)
{
    long nproc = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = nproc > 0 ? (int)nproc : 1, passes = 7;
    size_t bytes = mb_default_bytes();
    const char *model = NULL;
    static const struct option lo[] = {
        {"threads", 1, 0, 't'}, {"mib", 1, 0, 'm'},  {"passes", 1, 0, 'p'},
        {"model", 1, 0, 'M'},   {"help", 0, 0, 'h'}, {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        int bad = 0;
        long v;
        switch (c) {
        case 't': threads = atoi(optarg); bad = threads < 1 || threads > 1024; break;
        case 'm': v = atol(optarg); bad = v < 1 || v > 1 << 20; bytes = (size_t)(bad ? 1 : v) << 20; break;
        case 'p': passes = atoi(optarg); bad = passes < 1 || passes > 1000; break;
        case 'M': model = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (bad) {
            fprintf(stderr, "hydrad-bench membw: bad option value '%s' (see --help)\n", optarg);
            return 2;
        }
    }
    uint64_t weights = 0, kv_pos = 0, n_tensors = 0;
    if (model && mb_model_bytes(model, &weights, &kv_pos, &n_tensors)) {
        fprintf(stderr, "hydrad-bench membw: %s: %s\n", model, hy_err_msg());
        return 1;
    }
    double best, *pass_bw = calloc((size_t)passes, sizeof *pass_bw);
    if (!pass_bw || mb_measure(threads, bytes, passes, &best, pass_bw)) {
        fprintf(stderr, "hydrad-bench membw: could not measure (%zu MiB, %d threads): out of memory "
                        "or threads\n", bytes >> 20, threads);
        free(pass_bw);
        return 1;
    }
    printf("read bandwidth: %.2f GB/s (%d threads summing %zu MiB, best of %d passes:", best / 1e9,
           threads, bytes >> 20, passes);
    for (int p = 0; p < passes; p++)
        printf(" %.1f", pass_bw[p] / 1e9);
    printf(")\n");
    if (model)
        printf("decode step of %s reads %llu weight bytes (%llu tensors) + %llu KV bytes per cached "
               "position; floor %.3f ms per token at this bandwidth (weights only)\n",
               model, (unsigned long long)weights, (unsigned long long)n_tensors,
               (unsigned long long)kv_pos, best > 0 ? 1e3 * (double)weights / best : 0.0);
    printf("bandwidth_gbps %.3f\nthreads %d\nbuffer_mib %zu\n", best / 1e9, threads, bytes >> 20);
    if (model)
        printf("weight_bytes_per_token %llu\nkv_bytes_per_position %llu\n",
               (unsigned long long)weights, (unsigned long long)kv_pos);
    free(pass_bw);
    return 0;
}
