/* test_fault.c - fault injection at depth (tests/fault/fault.h): for each operation below, the Nth
 * allocation / open / read / write / library call it makes fails, for every N the operation makes
 * (or every stride-th when there are more than HY_FAULT_MAX, default 400), and each time:
 *   - the operation returns a negative HY_* code with a non-empty message, or succeeds with the
 *     same result as without the fault (a failure it absorbs on purpose), never crashes;
 *   - the heap holds exactly what it held before (a leak of one byte fails the test; `make asan`
 *     runs the same loop under ASan/LSan);
 *   - what it leaves behind is usable: the same operation without a fault succeeds at once with
 *     the same result (the model's logits, the registry loads the name, the download lands, the
 *     scheduler serves the request with the same text).
 * Operations: model loading (backend + GGUF + eng_model_load + tok_load + KV + first forward),
 * adapter reading (ad_read + upload + a forward through it), the registry's ad_reg_load, a URL
 * download (srv_download over file://: temp file, disk full, cut transfer, sha256), and request
 * handling (api_parse_request, chat template, tokenizer, sched_req_create/submit and the engine
 * steps that serve it). Inputs are a "tiny" llama made by mkmodel and an adapter by mkadapter. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "adapters/adapter.h"
#include "adapters/registry.h"
#include "api/api.h"
#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "engine/tokenizer.h"
#include "server/cli.h"
#include "server/http.h"
#include "tests/fault/fault.h"

#define KV_BLOCKS 16
#define MAX_VOCAB 4096

static char g_root[64]; /* /tmp/hydrad-fault-XXXXXX */
static char g_model[PATH_MAX + 32], g_adapter[PATH_MAX + 32];
static bool g_exact;  /* heap counts are exact (tcache off or ASan) */
static long g_max = 400; /* attempts per operation at most (HY_FAULT_MAX) */
static bool g_verbose;    /* HY_FAULT_VERBOSE=1: name the caller of every absorbed fault */
static unsigned g_extra;
static int g_tries = 2;   /* attempts of a fault whose heap grew before it counts as a leak (HY_FAULT_TRIES) */  /* HY_FAULT_JANSSON=1: jansson's internal allocations fail too (fault.h) */

/* The model loaded once, for the adapter, registry and request loops. */
static be *B;
static gguf_file *F;
static eng_model *M;
static eng_kv *KV;
static tok_vocab *V;
static ad_shape SHAPE;
static int N_VOCAB;

/* ---------- the loop ---------- */

/* The attempt under way, for messages raised inside an operation. */
static char g_attempt[160];

static void op_where(void)
{
    fault_suspend();
    fprintf(stderr, "during %s", g_attempt);
    if (fault_fired())
        fprintf(stderr, " (the failed call: %s from %p)", fault_site(), fault_caller());
    fprintf(stderr, ":\n");
}
/* fail_msg from inside an operation: says which attempt and which failed call came first */
#define OP_FAIL(...)                                                                               \
    do {                                                                                           \
        op_where();                                                                                \
        fail_msg(__VA_ARGS__);                                                                     \
    } while (0)

typedef struct {
    const char *name;
    unsigned kinds;
    /* One attempt. Returns its HY_* code; when 0 it has checked its result against the reference
     * (recording the reference on the first clean run). It frees whatever it made either way. */
    int (*op)(void *ctx);
    /* Optional, run with no fault armed: put things back before an attempt (reset), and check
     * that a failed attempt left no trace (after_fail: false with a reason in why). */
    void (*reset)(void *ctx);
    bool (*after_fail)(void *ctx, char *why, size_t cap);
    void *ctx;
    long max; /* attempts at most, when fewer than HY_FAULT_MAX (0: HY_FAULT_MAX) */
} fault_case;

typedef struct {
    const char *site;
    long n;
} site_count;

static void tally_site(site_count *t, int cap, const char *site)
{
    for (int i = 0; i < cap; i++) {
        if (!t[i].site)
            t[i].site = site;
        if (t[i].site == site || !strcmp(t[i].site, site)) {
            t[i].n++;
            return;
        }
    }
}

static int clean_run(const fault_case *c)
{
    if (c->reset)
        c->reset(c->ctx);
    hy_err_clear();
    snprintf(g_attempt, sizeof g_attempt, "%s without a fault", c->name);
    int rc = c->op(c->ctx);
    if (rc)
        fail_msg("%s without a fault: %s (%s)", c->name, hy_err_name(rc), hy_err_msg());
    return rc;
}

static void run_case(const fault_case *c)
{
    double t0 = hy_now();
    /* twice clean first: lazy one-time state (scratch buffers, library caches) settles */
    clean_run(c);
    clean_run(c);
    if (c->reset)
        c->reset(c->ctx);
    fault_arm(c->kinds | g_extra, 0);
    int rc = c->op(c->ctx);
    long calls = fault_disarm();
    assert_int_equal(rc, 0);
    assert_true(calls > 0);
    long max = c->max && c->max < g_max ? c->max : g_max;
    long stride = calls > max ? (calls + max - 1) / max : 1;
    long tried = 0, failed = 0, absorbed = 0;
    site_count sites[32] = {{0}}, soaked[32] = {{0}};
    for (long k = 1; k <= calls; k = (k == calls || k + stride <= calls) ? k + stride : calls) {
        size_t before = 0, after = 0;
        /* A heap that grew is a leak only if it grows again each time the same call fails again:
         * a library may keep something the first time an error path runs (the emulator's message
         * buffer, a per-thread error queue), or toggle a container's capacity (+16, -16, ...). */
        for (int again = 0; again < g_tries; again++) {
            if (c->reset)
                c->reset(c->ctx);
            before = fault_heap_bytes();
            hy_err_clear();
            snprintf(g_attempt, sizeof g_attempt, "%s, fault %ld of %ld", c->name, k, calls);
            fault_arm(c->kinds | g_extra, k);
            rc = c->op(c->ctx);
            fault_disarm();
            after = fault_heap_bytes();
            if (!g_exact || after <= before || !fault_fired())
                break;
            if (g_verbose)
                printf("      fault %ld (%s): heap %+lld bytes\n", k, fault_site(), (long long)after - (long long)before);
            if (again == 0 && clean_run(c))
                fail_msg("%s: not usable after fault %ld (%s)", c->name, k, fault_site());
        }
        bool fired = fault_fired();
        tried++;
        if (!fired)
            fail_msg("%s: call %ld of %ld never came (the operation is not deterministic)", c->name, k, calls);
        if (rc > 0)
            fail_msg("%s: fault %ld (%s): positive return %d", c->name, k, fault_site(), rc);
        if (rc < 0) {
            failed++;
            tally_site(sites, 32, fault_site());
            if (!hy_err_msg()[0])
                fail_msg("%s: fault %ld (%s from %p): %s with an empty message", c->name, k, fault_site(),
                         fault_caller(), hy_err_name(rc));
            char why[512] = "";
            if (c->after_fail && !c->after_fail(c->ctx, why, sizeof why))
                fail_msg("%s: fault %ld (%s from %p): the failure left a trace: %s", c->name, k, fault_site(),
                         fault_caller(), why);
        } else {
            absorbed++;
            tally_site(soaked, 32, fault_site());
            if (g_verbose) {
                Dl_info di;
                if (dladdr(fault_caller(), &di) && di.dli_fname)
                    printf("      absorbed: fault %ld, %s from %s+%#lx\n", k, fault_site(), di.dli_fname,
                           (unsigned long)((char *)fault_caller() - (char *)di.dli_fbase));
            }
        }
        if (g_exact && after > before)
            fail_msg("%s: fault %ld (%s from %p, %s: %s): heap %zu -> %zu bytes (%+lld)", c->name, k,
                     fault_site(), fault_caller(), hy_err_name(rc), hy_err_msg(), before, after,
                     (long long)after - (long long)before);
        if (clean_run(c))
            fail_msg("%s: not usable after fault %ld (%s)", c->name, k, fault_site());
        if (k == calls)
            break;
    }
    printf("fault: %-22s %6ld calls, %5ld tried (stride %ld): %5ld errors, %4ld absorbed; %.1f s\n      by site:",
           c->name, calls, tried, stride, failed, absorbed, hy_now() - t0);
    for (int i = 0; i < 32 && sites[i].site; i++)
        printf(" %s %ld", sites[i].site, sites[i].n);
    if (absorbed)
        printf("; absorbed:");
    for (int i = 0; i < 32 && soaked[i].site; i++)
        printf(" %s %ld", soaked[i].site, soaked[i].n);
    printf("\n");
    fflush(stdout);
}

/* ---------- fixtures ---------- */

static int run_tool(int (*fn)(int, char **), char **argv)
{
    int argc = 0;
    while (argv[argc])
        argc++;
    int rc = fn(argc, argv);
    if (rc)
        fprintf(stderr, "%s: %s\n", argv[0], hy_err_msg());
    return rc;
}

static int group_setup(void **st)
{
    const char *m = getenv("HY_FAULT_MAX");
    if (m && atol(m) > 0)
        g_max = atol(m);
    if (getenv("HY_FAULT_JANSSON") && atoi(getenv("HY_FAULT_JANSSON")))
        g_extra = FAULT_JANSSON;
    g_verbose = getenv("HY_FAULT_VERBOSE") && atoi(getenv("HY_FAULT_VERBOSE"));
    if (getenv("HY_FAULT_TRIES") && atoi(getenv("HY_FAULT_TRIES")) > 0)
        g_tries = atoi(getenv("HY_FAULT_TRIES"));
    fault_init();
    snprintf(g_root, sizeof g_root, "/tmp/hydrad-fault-XXXXXX");
    if (!mkdtemp(g_root))
        return -1;
    snprintf(g_model, sizeof g_model, "%s/tiny.gguf", g_root);
    snprintf(g_adapter, sizeof g_adapter, "%s/adapter", g_root);
    char *mk[] = {"mkmodel", "--shape", "tiny", "--type", "q4_1", "--seed", "5", "--vocab-from", "none",
                  "-o", g_model, NULL};
    char *ma[] = {"mkadapter", "--out", g_adapter, "--shape-from", g_model, "--seed", "3", "--r", "4",
                  "--K", "3", "--alpha", "8", "--targets", "q_proj,v_proj,down_proj", "--dtype", "f16", NULL};
    if (run_tool(cli_mkmodel, mk) || run_tool(cli_mkadapter, ma))
        return -1;
    int rc = be_cpu_create(2, &B);
    if (!rc)
        rc = gguf_open(g_model, &F);
    if (!rc)
        rc = eng_model_load(F, B, &M);
    if (!rc)
        rc = eng_kv_create(M, KV_BLOCKS, &KV);
    if (!rc)
        rc = tok_load(F, &V);
    if (rc) {
        fprintf(stderr, "setup: %s\n", hy_err_msg());
        return -1;
    }
    ad_shape_from_model(M, &SHAPE);
    N_VOCAB = eng_model_hparams(M)->n_vocab;
    assert_true(N_VOCAB <= MAX_VOCAB);
    return 0;
}

static int group_teardown(void **st)
{
    tok_free(V);
    eng_kv_free(KV);
    eng_model_free(M);
    gguf_close(F);
    if (B)
        B->ops->destroy(B);
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    return system(cmd) == 0 ? 0 : -1;
}

/* The reference of an operation: recorded by its first clean run, compared afterwards. */
typedef struct {
    bool have;
    float logits[MAX_VOCAB];
} ref_logits;

static int check_logits(ref_logits *ref, const float *lg, int n, const char *what)
{
    if (!ref->have) {
        memcpy(ref->logits, lg, sizeof(float) * (size_t)n);
        ref->have = true;
        return HY_OK;
    }
    for (int i = 0; i < n; i++)
        if (lg[i] != ref->logits[i] && !(isnan(lg[i]) && isnan(ref->logits[i])))
            OP_FAIL("%s: logit %d is %.9g, the reference %.9g", what, i, lg[i], ref->logits[i]);
    return HY_OK;
}

static const char PROMPT[] = "<|im_start|>user\nHello, fault!<|im_end|>\n";

/* ---------- model loading ---------- */

static ref_logits REF_MODEL;
static float LG[MAX_VOCAB];

static int op_model(void *ctx)
{
    be *b = NULL;
    gguf_file *f = NULL;
    eng_model *m = NULL;
    eng_kv *kv = NULL;
    tok_vocab *v = NULL;
    int32_t *ids = NULL;
    int n = 0;
    int rc = be_cpu_create(2, &b);
    if (!rc)
        rc = gguf_open(g_model, &f);
    if (!rc)
        rc = eng_model_load(f, b, &m);
    if (!rc)
        rc = tok_load(f, &v);
    if (!rc)
        rc = eng_kv_create(m, 4, &kv);
    if (!rc)
        rc = tok_encode(v, PROMPT, strlen(PROMPT), true, tok_add_bos(v), &ids, &n);
    if (!rc)
        rc = eng_forward_seq(m, kv, ids, n, 0, 8, NULL, LG);
    if (!rc)
        rc = check_logits(&REF_MODEL, LG, eng_model_hparams(m)->n_vocab, "model");
    free(ids);
    eng_kv_free(kv);
    tok_free(v);
    eng_model_free(m);
    gguf_close(f);
    if (b)
        b->ops->destroy(b);
    return rc;
}

static void test_model_load(void **st)
{
    fault_case c = {"model load", FAULT_ALL, op_model, NULL, NULL, NULL, 0};
    run_case(&c);
}

/* The default model's tokenizer (byte-level BPE with 49152 tokens and their merges, which the tiny
 * model's vocabulary lacks): open the GGUF, build the vocabulary, encode a chat prompt. */
typedef struct {
    const char *path;
    int32_t ref[256];
    int n_ref;
} tok_fx;

static int op_tokenizer(void *ctx)
{
    static const char text[] = "<|im_start|>user\nTokenise 12345 words, caf\xc3\xa9 and  spaces!<|im_end|>\n";
    tok_fx *x = ctx;
    gguf_file *f = NULL;
    tok_vocab *v = NULL;
    int32_t *ids = NULL;
    int n = 0;
    int rc = gguf_open(x->path, &f);
    if (!rc)
        rc = tok_load(f, &v);
    if (!rc)
        rc = tok_encode(v, text, strlen(text), true, false, &ids, &n);
    if (!rc) {
        if (!x->n_ref) {
            assert_true(n > 0 && n <= 256);
            memcpy(x->ref, ids, sizeof(int32_t) * (size_t)n);
            x->n_ref = n;
        } else if (n != x->n_ref || memcmp(ids, x->ref, sizeof(int32_t) * (size_t)n)) {
            OP_FAIL("%d token ids, the reference %d (or other ids)", n, x->n_ref);
        }
    }
    free(ids);
    tok_free(v);
    gguf_close(f);
    return rc;
}

static void test_tokenizer_load(void **st)
{
    tok_fx x = {.path = getenv("HY_MODEL") && *getenv("HY_MODEL") ? getenv("HY_MODEL")
                                                                  : "models/SmolLM2-135M-Instruct.Q4_1.gguf"};
    if (access(x.path, R_OK) != 0) {
        printf("SKIP: %s is missing (make setup fetches it)\n", x.path);
        skip();
    }
    /* a vocabulary of 49152 tokens per attempt: 40 attempts spread over its calls */
    fault_case c = {"tokenizer load (BPE)", FAULT_ALL, op_tokenizer, NULL, NULL, &x, 40};
    run_case(&c);
}

/* ---------- adapters ---------- */

static ref_logits REF_ADAPTER;

static int forward_with(const eng_adapter *ad, ref_logits *ref, const char *what)
{
    int32_t *ids = NULL;
    int n = 0;
    int rc = tok_encode(V, PROMPT, strlen(PROMPT), true, tok_add_bos(V), &ids, &n);
    if (!rc)
        rc = eng_forward_seq(M, KV, ids, n, 0, 8, ad, LG);
    if (!rc)
        rc = check_logits(ref, LG, N_VOCAB, what);
    free(ids);
    return rc;
}

static int op_adapter(void *ctx)
{
    ad_adapter *a = NULL;
    int rc = ad_read(g_adapter, &SHAPE, NULL, &a);
    if (!rc)
        rc = ad_upload(a, B);
    if (!rc)
        rc = forward_with(ad_eng(a), &REF_ADAPTER, "adapter");
    ad_free(a);
    return rc;
}

static void test_adapter_read(void **st)
{
    fault_case c = {"adapter read+upload", FAULT_ALL, op_adapter, NULL, NULL, NULL, 0};
    run_case(&c);
}

/* The registry outlives the attempts: a failed load must drop its reservation of the name. */
static ad_registry *REG;
static ref_logits REF_REG;

static int op_registry(void *ctx)
{
    int rc = ad_reg_load(REG, "fx", g_adapter, &SHAPE, NULL);
    if (rc)
        return rc;
    ad_adapter *a = NULL;
    assert_int_equal(ad_reg_pin(REG, "fx", &a), 0);
    rc = ad_upload(a, B);
    if (!rc)
        rc = forward_with(ad_eng(a), &REF_REG, "registry");
    ad_reg_unpin(REG, a);
    /* the name goes either way: the next attempt loads it again */
    assert_int_equal(ad_reg_unload(REG, "fx"), 0);
    ad_reg_collect(REG);
    return rc;
}

static bool registry_empty(void *ctx, char *why, size_t cap)
{
    ad_reg_info info;
    ad_reg_collect(REG);
    if (ad_reg_count(REG) != 0) {
        snprintf(why, cap, "the registry holds %d adapters", ad_reg_count(REG));
        return false;
    }
    if (ad_reg_info_get(REG, "fx", &info) != HY_ENOTFOUND) {
        snprintf(why, cap, "the name 'fx' is still held (%s)", ad_state_name(info.state));
        return false;
    }
    return true;
}

static void test_registry_load(void **st)
{
    assert_int_equal(ad_reg_create(4, &REG), 0);
    fault_case c = {"registry load", FAULT_ALL, op_registry, NULL, registry_empty, NULL, 0};
    run_case(&c);
    ad_reg_free(REG);
    REG = NULL;
}

/* ---------- the CUDA backend (the CPU emulator's build: tests/cuda_emu) ---------- */

#ifdef HY_HAVE_CUDA
/* Defined by the CPU emulator's runtime only (tests/cuda_emu/emu_runtime.cpp): the CUDA case runs
 * there. On a real GPU --wrap=malloc would also fail allocations inside libcudart_static, which
 * is not ours to test; scripts/gpu-check.sh covers the GPU. */
extern void emu_swap(void **save_sp, void *to_sp) __attribute__((weak));

static ref_logits REF_CUDA, REF_CUDA_AD;

/* Backend, model upload, KV, a forward, an adapter upload and a forward through it. */
static int op_cuda(void *ctx)
{
    be *b = NULL;
    eng_model *m = NULL;
    eng_kv *kv = NULL;
    ad_adapter *a = NULL;
    int32_t *ids = NULL;
    int n = 0;
    int rc = be_cuda_create(0, &b);
    if (!rc)
        rc = eng_model_load(F, b, &m);
    if (!rc)
        rc = eng_kv_create(m, 4, &kv);
    if (!rc)
        rc = tok_encode(V, PROMPT, strlen(PROMPT), true, tok_add_bos(V), &ids, &n);
    if (!rc)
        rc = eng_forward_seq(m, kv, ids, n, 0, 8, NULL, LG);
    if (!rc)
        rc = check_logits(&REF_CUDA, LG, N_VOCAB, "CUDA model");
    if (!rc)
        rc = ad_read(g_adapter, &SHAPE, NULL, &a);
    if (!rc)
        rc = ad_upload(a, b);
    if (!rc)
        rc = eng_forward_seq(m, kv, ids, n, 0, 8, ad_eng(a), LG);
    if (!rc)
        rc = check_logits(&REF_CUDA_AD, LG, N_VOCAB, "CUDA model with an adapter");
    ad_free(a);
    free(ids);
    eng_kv_free(kv);
    eng_model_free(m);
    if (b)
        b->ops->destroy(b);
    return rc;
}

static void test_cuda(void **st)
{
    be *b = NULL;
    if (!emu_swap) {
        printf("SKIP: the CUDA fault case runs on the CPU emulator (make test-fault-emu)\n");
        skip();
    }
    if (be_cuda_create(0, &b)) {
        printf("SKIP: no CUDA device: %s\n", hy_err_msg());
        skip();
    }
    b->ops->destroy(b);
    /* each attempt emulates two forwards on the CPU: HY_FAULT_MAX_CUDA attempts (default 24) */
    const char *m = getenv("HY_FAULT_MAX_CUDA");
    fault_case c = {"CUDA backend", FAULT_ALL | FAULT_CUDA, op_cuda, NULL, NULL, NULL,
                    m && atol(m) > 0 ? atol(m) : 24};
    run_case(&c);
}
#endif

/* ---------- URL download (file:// stands in for https://) ---------- */

#define SRC_BYTES (200 * 1024 + 11)

typedef struct {
    char dir[PATH_MAX + 32], src[PATH_MAX + 64], url[PATH_MAX + 80], dst[PATH_MAX + 64];
    char sha[65];
    unsigned char *bytes;
} dl_fx;

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *read_all(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc((size_t)len + 1);
    *n = fread(p, 1, (size_t)len, f);
    fclose(f);
    return p;
}

static void dl_reset(void *ctx)
{
    dl_fx *d = ctx;
    write_file(d->dst, "previous", 8);
}

static int op_download(void *ctx)
{
    dl_fx *d = ctx;
    int rc = srv_download(d->url, d->dst, SRC_BYTES, d->sha, "file", NULL);
    if (rc)
        return rc;
    size_t n = 0;
    fault_suspend();
    unsigned char *got = read_all(d->dst, &n);
    if (!got || n != SRC_BYTES || memcmp(got, d->bytes, SRC_BYTES))
        OP_FAIL("the download succeeded but %s holds %zu other bytes", d->dst, n);
    free(got);
    fault_resume();
    return HY_OK;
}

/* dst kept its old content and no temp file is left beside it. */
static bool dl_untouched(void *ctx, char *why, size_t cap)
{
    dl_fx *d = ctx;
    size_t n = 0;
    unsigned char *got = read_all(d->dst, &n);
    bool same = got && n == 8 && !memcmp(got, "previous", 8);
    free(got);
    if (!same) {
        snprintf(why, cap, "%s changed", d->dst);
        return false;
    }
    DIR *dir = opendir(d->dir);
    assert_non_null(dir);
    struct dirent *e;
    int others = 0;
    while ((e = readdir(dir)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strcmp(e->d_name, "adapter_model.safetensors")) {
            snprintf(why, cap, "%s left in %s", e->d_name, d->dir);
            others++;
        }
    closedir(dir);
    return others == 0;
}

static void dl_setup(dl_fx *d)
{
    snprintf(d->dir, sizeof d->dir, "%s/dl", g_root);
    mkdir(d->dir, 0700);
    snprintf(d->src, sizeof d->src, "%s/src.bin", g_root);
    snprintf(d->url, sizeof d->url, "file://%s", d->src);
    snprintf(d->dst, sizeof d->dst, "%s/adapter_model.safetensors", d->dir);
    d->bytes = malloc(SRC_BYTES);
    assert_non_null(d->bytes);
    uint64_t x = 0x243F6A8885A308D3ull;
    for (size_t i = 0; i < SRC_BYTES; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        d->bytes[i] = (unsigned char)x;
    }
    write_file(d->src, d->bytes, SRC_BYTES);
    char cmd[PATH_MAX + 128];
    snprintf(cmd, sizeof cmd, "sha256sum '%s'", d->src);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_int_equal(fscanf(p, "%64s", d->sha), 1);
    pclose(p);
}

static void test_download(void **st)
{
    dl_fx d;
    memset(&d, 0, sizeof d);
    dl_setup(&d);
    fault_case c = {"URL download", FAULT_ALL, op_download, dl_reset, dl_untouched, &d, 0};
    run_case(&c);

    /* A transfer that ends early without the transport noticing (the server closed a response
     * that had no length): the digest catches it and nothing lands. */
    char cut[128], why[512];
    snprintf(cut, sizeof cut, "%s/cut.bin", g_root);
    write_file(cut, d.bytes, SRC_BYTES - 1000);
    snprintf(d.url, sizeof d.url, "file://%s", cut);
    dl_reset(&d);
    assert_int_equal(srv_download(d.url, d.dst, SRC_BYTES, d.sha, "file", NULL), HY_EFORMAT);
    assert_non_null(strstr(hy_err_msg(), "sha256 mismatch"));
    if (!dl_untouched(&d, why, sizeof why))
        fail_msg("truncated transfer: %s", why);
    free(d.bytes);
}

/* ---------- request handling: parse, template, tokenize, create, submit, serve ---------- */

typedef struct {
    tok_detok dt;
    smp_seq *smp;
    int n_accepted;
    float *logits;
} seq_state;

/* The engine glue, as server/serve.c wires it (no adapters, no grammar). */
static int g_forward(void *ctx, const eng_batch *b, float *logits) { return eng_forward(M, KV, b, logits); }

static void g_seq_free(void *ctx, void *state)
{
    seq_state *s = state;
    if (!s)
        return;
    smp_free(s->smp);
    free(s->logits);
    free(s);
}

static int g_seq_init(void *ctx, const sched_sampling *p, int choice, void **state)
{
    seq_state *s = calloc(1, sizeof *s);
    if (!s || !(s->logits = malloc((size_t)N_VOCAB * sizeof(float)))) {
        free(s);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    smp_params sp = smp_default_params();
    sp.temperature = (float)p->temperature;
    sp.top_k = p->top_k;
    sp.top_p = (float)p->top_p;
    sp.min_p = (float)p->min_p;
    sp.seed = p->seed + (uint64_t)choice;
    sp.repetition_penalty = (float)p->repetition_penalty;
    sp.frequency_penalty = (float)p->frequency_penalty;
    sp.presence_penalty = (float)p->presence_penalty;
    sp.logprobs = p->logprobs;
    sp.n_logprobs = HY_MIN(p->top_logprobs, SMP_MAX_LOGPROBS);
    int rc = smp_create(&sp, N_VOCAB, &s->smp);
    if (rc) {
        g_seq_free(ctx, s);
        return rc;
    }
    tok_detok_init(&s->dt, V);
    *state = s;
    return HY_OK;
}

static int g_sample(void *ctx, void *state, const float *logits, const int32_t *toks, int n_prompt, int n_toks,
                    sched_sample *out)
{
    seq_state *s = state;
    int rc = 0;
    if (s->n_accepted == 0 && n_prompt > 0) {
        rc = smp_accept_prompt(s->smp, toks, n_prompt);
        s->n_accepted = n_prompt;
    }
    for (; rc == 0 && s->n_accepted < n_toks; s->n_accepted++)
        rc = smp_accept(s->smp, toks[s->n_accepted]);
    if (rc)
        return rc;
    memcpy(s->logits, logits, (size_t)N_VOCAB * sizeof(float));
    smp_result res;
    if ((rc = smp_sample(s->smp, s->logits, &res)))
        return rc;
    out->token = res.id;
    out->logprob = res.logprob;
    out->n_top = HY_MIN(res.n_top, SCHED_MAX_TOP);
    for (int i = 0; i < out->n_top; i++) {
        out->top_id[i] = res.top_id[i];
        out->top_lp[i] = res.top_logprob[i];
    }
    return HY_OK;
}

static size_t g_detok(void *ctx, void *state, int32_t tok, char *buf, size_t cap)
{
    return tok_detok_push(&((seq_state *)state)->dt, tok, buf, cap);
}

static size_t g_detok_flush(void *ctx, void *state, char *buf, size_t cap)
{
    return tok_detok_flush(&((seq_state *)state)->dt, buf, cap);
}

static bool g_is_eog(void *ctx, int32_t tok) { return tok_is_eog(V, tok); }

static const sched_ops glue = {
    .forward = g_forward, .seq_init = g_seq_init, .seq_free = g_seq_free, .sample = g_sample,
    .detok = g_detok, .detok_flush = g_detok_flush, .is_eog = g_is_eog,
};

static sched_config sched_cfg(void)
{
    sched_config c = {.max_seqs = 4, .max_batch_tokens = 32, .n_blocks = KV_BLOCKS, .max_queue = 8,
                      .max_loras = 1, .n_ctx = KV_BLOCKS * BE_KV_BLOCK, .n_vocab = N_VOCAB,
                      .ops = &glue};
    return c;
}

typedef struct {
    sched *s;
    const char *body;
    bool have;
    char text[4][256]; /* the reference text of each choice */
    char got[4][256];
    int n_lp[4];
    sched_sample lp[4][8]; /* the reference logprobs of the first tokens */
} req_fx;

/* The server's path for one chat request, synchronously: the engine steps run on this thread. */
static int serve_request(req_fx *x)
{
    api_request req;
    api_error err;
    sched_req *r = NULL;
    char *text = NULL;
    int32_t *ids = NULL;
    int n = 0, rc;
    tok_msg msgs[8];
    memset(&err, 0, sizeof err);
    if ((rc = api_parse_request(API_CHAT, x->body, strlen(x->body), &req, &err))) {
        /* the server answers with err (status, message), not with hy_err_msg() */
        if (!err.message[0] || err.status < 400)
            OP_FAIL("api_parse_request: %s with status %d and message \"%s\"", hy_err_name(rc), err.status,
                     err.message);
        return hy_err_set(rc, "%s", err.message);
    }
    assert_true(req.n_msgs <= 8 && req.n <= 4);
    for (int i = 0; i < req.n_msgs; i++)
        msgs[i] = (tok_msg){req.msgs[i].role, req.msgs[i].content};
    sched_sampling sp = {.temperature = req.temperature, .top_p = req.top_p, .min_p = req.min_p,
                         .top_k = req.top_k, .presence_penalty = req.presence_penalty,
                         .frequency_penalty = req.frequency_penalty,
                         .repetition_penalty = req.repetition_penalty, .has_seed = req.has_seed,
                         .seed = (uint64_t)req.seed, .top_logprobs = req.top_logprobs,
                         .logprobs = req.logprobs};
    if ((rc = tok_chat_apply(TOK_CHAT_CHATML_PLAIN, msgs, req.n_msgs, true, &text)))
        goto done;
    if ((rc = tok_encode(V, text, strlen(text), true, tok_add_bos(V), &ids, &n)))
        goto done;
    const int32_t *prompts[1] = {ids};
    if ((rc = sched_req_create(1, prompts, &n, req.n, req.max_tokens, (const char *const *)req.stop, req.n_stop,
                               req.ignore_eos, &sp, NULL, &r)))
        goto done;
    if ((rc = sched_submit(x->s, r)))
        goto done;
    for (int steps = 0;; steps++) {
        sched_req_lock(r);
        bool fin = sched_req_finished(r);
        sched_req_unlock(r);
        if (fin)
            break;
        assert_true(steps < 1000);
        sched_step(x->s);
    }
    /* as the engine thread goes on: whatever is left of the request (the other choice of a failed
     * one) is dropped at the next steps; the heap check comes after */
    for (int steps = 0;; steps++) {
        sched_stats ss;
        sched_get_stats(x->s, &ss);
        if (!ss.waiting_reqs && !ss.waiting_seqs && !ss.running_seqs)
            break;
        if (steps == 2)
            OP_FAIL("the scheduler still holds %d waiting and %d running sequences two steps after the request "
                    "ended", ss.waiting_seqs, ss.running_seqs);
        sched_step(x->s);
    }
    if (r->failed) {
        /* the server answers 500 with r->error */
        rc = hy_err_set(HY_ENOMEM, "%s", r->error);
        if (!r->error[0])
            OP_FAIL("request failed with an empty error");
        goto done;
    }
    for (int i = 0; i < r->n_choices; i++) {
        if (strcmp(r->choices[i].finish, "error") == 0)
            OP_FAIL("choice %d finished with \"error\" but the request did not fail", i);
        const sched_choice *ch = &r->choices[i];
        snprintf(x->got[i], sizeof x->got[i], "%.*s", (int)ch->len, ch->text ? ch->text : "");
        /* logprobs were asked for: the readers (srv_lp_build) take lp[0..n_gen) */
        if (ch->n_gen > ch->lp_cap || (ch->n_gen && !ch->lp))
            OP_FAIL("choice %d: %d tokens but room for %d logprobs", i, ch->n_gen, ch->lp_cap);
        if (!x->have) {
            x->n_lp[i] = ch->n_gen;
            memcpy(x->lp[i], ch->lp, sizeof(sched_sample) * (size_t)HY_MIN(ch->n_gen, 8));
        } else if (x->n_lp[i] != ch->n_gen) {
            OP_FAIL("choice %d: %d tokens, the reference %d", i, ch->n_gen, x->n_lp[i]);
        }
        for (int j = 0; j < HY_MIN(ch->n_gen, 8); j++)
            if (ch->lp[j].token != x->lp[i][j].token || ch->lp[j].logprob != x->lp[i][j].logprob ||
                ch->lp[j].n_top != x->lp[i][j].n_top)
                OP_FAIL("choice %d, token %d: logprob entry (%d, %g, %d alternatives), the reference (%d, %g, %d)", i,
                        j, ch->lp[j].token, ch->lp[j].logprob, ch->lp[j].n_top, x->lp[i][j].token,
                        x->lp[i][j].logprob, x->lp[i][j].n_top);
    }
    for (int i = 0; i < r->n_choices; i++) {
        if (!x->have)
            memcpy(x->text[i], x->got[i], sizeof x->text[i]);
        else if (strcmp(x->text[i], x->got[i]))
            OP_FAIL("choice %d: \"%s\", the reference \"%s\"", i, x->got[i], x->text[i]);
    }
    x->have = true;
done:
    sched_req_release(r);
    free(ids);
    free(text);
    api_request_free(&req);
    return rc;
}

static int op_request(void *ctx) { return serve_request(ctx); }

/* Every parsed field the request path reads, as text, to compare a parse with the reference. */
static void req_summary(const api_request *r, char *out, size_t cap)
{
    size_t n = (size_t)snprintf(out, cap, "model=%s n=%d max=%d t=%g p=%g k=%d minp=%g seed=%d/%lld lp=%d/%d pp=%g fp=%g rp=%g eos=%d",
                                r->model ? r->model : "-", r->n, r->max_tokens, r->temperature, r->top_p, r->top_k,
                                r->min_p, r->has_seed, (long long)r->seed, r->logprobs, r->top_logprobs,
                                r->presence_penalty, r->frequency_penalty, r->repetition_penalty, r->ignore_eos);
    for (int i = 0; i < r->n_msgs && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, " [%s:%s]", r->msgs[i].role, r->msgs[i].content);
    for (int i = 0; i < r->n_stop && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, " stop=%s", r->stop[i]);
}

typedef struct {
    const char *body;
    char ref[1024];
} parse_fx;

static int op_parse(void *ctx)
{
    parse_fx *x = ctx;
    api_request req;
    api_error err;
    memset(&err, 0, sizeof err);
    int rc = api_parse_request(API_CHAT, x->body, strlen(x->body), &req, &err);
    if (rc) {
        if (!err.message[0] || err.status < 400)
            OP_FAIL("api_parse_request: %s with status %d and message \"%s\"", hy_err_name(rc), err.status,
                    err.message);
        return hy_err_set(rc, "%s", err.message);
    }
    char got[1024];
    fault_suspend();
    req_summary(&req, got, sizeof got);
    if (!x->ref[0])
        memcpy(x->ref, got, sizeof got);
    else if (strcmp(got, x->ref))
        OP_FAIL("parsed as\n  %s\nthe reference\n  %s", got, x->ref);
    fault_resume();
    api_request_free(&req);
    return HY_OK;
}

static int op_sched_create(void *ctx)
{
    sched *s = NULL;
    sched_config c = sched_cfg();
    c.prefix_cache = true;
    int rc = sched_create(&c, &s);
    sched_free(s);
    return rc;
}

static void test_request(void **st)
{
    sched_config cfg = sched_cfg();
    req_fx x = {.body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                        "{\"role\":\"user\",\"content\":\"Hello there\"}],\"max_tokens\":6,\"n\":2,"
                        "\"temperature\":0.8,\"top_p\":0.95,\"seed\":7,\"stop\":[\"\\n\\n\",\"END\"],"
                        "\"logprobs\":true,\"top_logprobs\":2,\"presence_penalty\":0.5}"};
    assert_int_equal(sched_create(&cfg, &x.s), 0);
    parse_fx px = {.body = x.body};
    fault_case pc = {"request parse", FAULT_ALL, op_parse, NULL, NULL, &px, 0};
    run_case(&pc);
    fault_case c = {"request", FAULT_ALL, op_request, NULL, NULL, &x, 0};
    run_case(&c);
    sched_free(x.s);
    fault_case sc = {"scheduler create", FAULT_ALL, op_sched_create, NULL, NULL, NULL, 0};
    run_case(&sc);
}

int main(int argc, char **argv)
{
    (void)argc;
    g_exact = fault_exact_heap(argv);
    if (!g_exact)
        printf("fault: heap counts are not exact here (glibc tunables refused): leak checks off\n");
    if (getenv("HY_FAULT_ONLY")) /* e.g. HY_FAULT_ONLY=test_cuda */
        cmocka_set_test_filter(getenv("HY_FAULT_ONLY"));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_model_load),
        cmocka_unit_test(test_tokenizer_load),
        cmocka_unit_test(test_adapter_read),
        cmocka_unit_test(test_registry_load),
        cmocka_unit_test(test_download),
        cmocka_unit_test(test_request),
#ifdef HY_HAVE_CUDA
        cmocka_unit_test(test_cuda),
#endif
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
