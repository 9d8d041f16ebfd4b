/* test_cuda_model.c - the whole llama forward on CUDA against the CPU backend, on a synthetic
 * SmolLM2-135M-shaped Q4_1 GGUF written by mkmodel into a temp file: teacher-forced tokens,
 * per-step logits NMSE and top-1 agreement; then 64 sequences over 16 HydraLoRA adapters.
 * Three models run every step:
 *   [0] CPU on an F32 copy of the same (dequantised) weights: the reference, exact activations
 *   [1] CUDA on the Q4_1 file                                  (what is tested)
 *   [2] CPU on the Q4_1 file, whose matmuls quantise activations to 8 bit
 * CUDA must match [0] within the brief's limits; against [2] only a looser bound holds, because
 * [2] itself sits about as far from [0] (both distances are printed).
 * SKIPs visibly without a GPU. Seed from the time unless HY_TEST_SEED is set (printed). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/gguf_write.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/quant.h"
#include "engine/scheduler.h"
#include "server/cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Limits (stated by the design brief): per-step logits NMSE <= 1e-4, top-1 agreement >= 99 %.
 * The CPU backend quantises activations to 8 bit before every quantised matmul; CUDA keeps
 * them in fp32 (mat-vec) or fp16 (cuBLAS), so the two differ by about 3e-5 per matmul. */
#define MODEL_NMSE 1e-4
#define MODEL_TOP1 0.99
/* CUDA vs the CPU on Q4_1 (8-bit activations): measured 1.6e-4..3.2e-4 and 97 % on an H100 */
#define LOOSE_NMSE 2e-3
#define LOOSE_TOP1 0.90
#define NM 3
static const int g_mbe[NM] = {0, 1, 0}; /* backend of each model */

static be *g_be[2]; /* 0: CPU, 1: CUDA (or a second CPU with HY_TEST_GPU_IS_CPU) */
static char g_skip[512];
static char g_path[256], g_path32[256];
static gguf_file *g_f, *g_f32;
static eng_model *g_m[NM];
static uint64_t g_rng;

static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int rnd_int(int n) { return (int)(rnd_u64() % (uint64_t)n); }
static float rnd_sym(void) { return (float)((double)(rnd_u64() >> 11) * 0x1p-52 - 1.0); } /* [-1,1) */

#define NEED_GPU()                                                                                 \
    do {                                                                                           \
        if (!g_m[1]) {                                                                             \
            printf("SKIP (no CUDA device): %s\n", g_skip);                                        \
            skip();                                                                                \
        }                                                                                          \
    } while (0)

/* Write an F32 copy of `src` (every matrix dequantised) to path. */
static int write_f32_copy(const gguf_file *src, const char *path)
{
    gguf_w *w = NULL;
    float *buf = NULL;
    int rc = gguf_w_create(&w);
    for (uint64_t i = 0; !rc && i < gguf_n_kv(src); i++)
        if (!gguf_str_eq(gguf_kv_at(src, i)->key, "general.file_type"))
            rc = gguf_w_kv_copy(w, gguf_kv_at(src, i));
    for (uint64_t i = 0; !rc && i < gguf_n_tensors(src); i++) {
        const gguf_tensor *t = gguf_tensor_at(src, i);
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        rc = gguf_w_add_tensor(w, name, t->n_dims, t->ne, Q_F32);
    }
    if (!rc)
        rc = gguf_w_begin(w, path);
    for (uint64_t i = 0; !rc && i < gguf_n_tensors(src); i++) {
        const gguf_tensor *t = gguf_tensor_at(src, i);
        size_t n = gguf_w_tensor_bytes(w, i) / sizeof(float), rb;
        free(buf);
        buf = malloc(n * sizeof(float));
        if (!buf || q_row_bytes(t->type, (int64_t)t->ne[0], &rb)) {
            rc = HY_ENOMEM;
            break;
        }
        for (size_t r = 0; r < n / t->ne[0]; r++)
            q_dequant_row(t->type, (const uint8_t *)t->data + r * rb, buf + r * t->ne[0], (int64_t)t->ne[0]);
        rc = gguf_w_tensor_data(w, buf, n * sizeof(float));
    }
    if (!rc)
        rc = gguf_w_finish(w);
    free(buf);
    gguf_w_free(w);
    return rc;
}

static int group_setup(void **state)
{
    (void)state;
    const char *s = getenv("HY_TEST_SEED");
    uint64_t seed = s && *s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    g_rng = seed;
    printf("test_cuda_model: seed %llu (HY_TEST_SEED=%llu replays it)\n", (unsigned long long)seed,
           (unsigned long long)seed);
    if (be_cpu_create(0, &g_be[0]))
        return -1;
    if (getenv("HY_TEST_GPU_IS_CPU")) {
        printf("HY_TEST_GPU_IS_CPU: comparing the CPU backend with itself (harness check only)\n");
        if (be_cpu_create(0, &g_be[1]))
            return -1;
    } else if (be_cuda_create(0, &g_be[1])) {
        snprintf(g_skip, sizeof g_skip, "%s", hy_err_msg());
        printf("SKIP (no CUDA device): %s\n", g_skip);
        g_be[1] = NULL;
        return 0; /* nothing else to set up: every test skips */
    }
    /* the model: written by mkmodel's code into a temp file */
    snprintf(g_path, sizeof g_path, "/tmp/hydrad-cuda-model-XXXXXX");
    int fd = mkstemp(g_path);
    if (fd < 0)
        return -1;
    close(fd);
    const char *layers = getenv("HY_TEST_LAYERS"); /* fewer layers for a quick harness check */
    char seed_s[32];
    snprintf(seed_s, sizeof seed_s, "%llu", (unsigned long long)(seed % 1000003));
    char *argv[] = {"mkmodel", "--shape", "smollm2-135m", "--type", "q4_1", "--seed", seed_s,
                    "--vocab-from", "none", "--layers", (char *)(layers ? layers : "0"), "-o", g_path};
    if (cli_mkmodel((int)HY_ARRAY_LEN(argv), argv) != 0)
        return -1;
    if (gguf_open(g_path, &g_f)) {
        printf("gguf_open: %s\n", hy_err_msg());
        return -1;
    }
    snprintf(g_path32, sizeof g_path32, "/tmp/hydrad-cuda-model-f32-XXXXXX");
    fd = mkstemp(g_path32);
    if (fd < 0)
        return -1;
    close(fd);
    if (write_f32_copy(g_f, g_path32) || gguf_open(g_path32, &g_f32)) {
        printf("F32 reference copy: %s\n", hy_err_msg());
        return -1;
    }
    const gguf_file *files[NM] = {g_f32, g_f, g_f};
    static const char *names[NM] = {"CPU F32 reference", "CUDA Q4_1", "CPU Q4_1"};
    for (int i = 0; i < NM; i++) {
        double t0 = hy_now();
        if (eng_model_load(files[i], g_be[g_mbe[i]], &g_m[i])) {
            printf("eng_model_load (%s): %s\n", names[i], hy_err_msg());
            return -1;
        }
        printf("loaded %s in %.2f s\n", names[i], hy_now() - t0);
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < NM; i++)
        eng_model_free(g_m[i]);
    for (int i = 0; i < 2; i++)
        if (g_be[i])
            g_be[i]->ops->destroy(g_be[i]);
    gguf_close(g_f);
    gguf_close(g_f32);
    if (g_path[0])
        unlink(g_path);
    if (g_path32[0])
        unlink(g_path32);
    return 0;
}

/* ---- a batch of sequences over the paged KV cache ---- */

typedef struct {
    int n_seq, max_blocks;
    int32_t *bt;          /* [n_seq * max_blocks], random distinct blocks */
    int *len;             /* tokens in the cache */
    const int32_t **toks; /* [n_seq] teacher-forced tokens by position */
    int *adapter;         /* [n_seq] adapter index or -1; sequences sorted by it */
} seqset;

typedef struct {
    double max_nmse, sum_nmse;
    long agree, rows;
    int steps;
} cmp_one;

/* comparisons made every step: CUDA vs reference, CUDA vs CPU Q4_1, CPU Q4_1 vs reference */
enum { CMP_GPU_REF, CMP_GPU_CPUQ, CMP_CPUQ_REF, CMP_N };
static const int g_cmp[CMP_N][2] = {{1, 0}, {1, 2}, {2, 0}};
typedef struct {
    cmp_one c[CMP_N];
} cmp_stats;

static void compare(const float *a, const float *ref, int rows, int n_vocab, cmp_one *st)
{
    double num = 0, den = 0;
    for (int r = 0; r < rows; r++) {
        const float *x = a + (size_t)r * n_vocab, *y = ref + (size_t)r * n_vocab;
        int am = 0, bm = 0, bl = 0;
        for (int v = 0; v < n_vocab; v++) {
            double d = (double)x[v] - y[v];
            num += d * d;
            den += (double)y[v] * y[v];
            if (x[v] > x[am])
                am = v;
            if (y[v] > y[bm])
                bm = v;
            if (y[v] < y[bl])
                bl = v;
        }
        /* Top-1 agrees when the argmax is the reference's, or a token the reference scores
         * within 1e-3 x its logit range of its own max (the golden tests' logit tolerance): on
         * random synthetic weights the logits are nearly flat, and an fp16 prefill flipped such
         * ties with NMSE 1.5e-6 (4 rows of 256 on an H100). */
        st->agree += am == bm || y[am] >= y[bm] - 1e-3f * (y[bm] - y[bl]);
        st->rows++;
    }
    double e = den > 0 ? num / den : 0;
    st->max_nmse = HY_MAX(st->max_nmse, e);
    st->sum_nmse += e;
    st->steps++;
}

/* Run one step (n_new[s] tokens of each sequence) on every model; compare the logits of the
 * last new token of every sequence (all_logits: of every new token). ads[i]: model i's
 * adapters by index (NULL: none). */
static void step(seqset *S, const int *n_new, bool all_logits, eng_adapter *const *ads[NM], eng_kv *kv[NM],
                 cmp_stats *st)
{
    const eng_hparams *hp = eng_model_hparams(g_m[0]);
    int n_tok = 0;
    for (int s = 0; s < S->n_seq; s++)
        n_tok += n_new[s];
    int32_t *tokens = malloc(4 * (size_t)n_tok), *pos = malloc(4 * (size_t)n_tok);
    int32_t *seq = malloc(4 * (size_t)n_tok), *slot = malloc(4 * (size_t)n_tok);
    int32_t *seq_len = malloc(4 * (size_t)S->n_seq), *lt = malloc(4 * (size_t)n_tok);
    int32_t *seg_begin = malloc(4 * ((size_t)S->n_seq + 1));
    const eng_adapter **seg_ad[NM];
    for (int i = 0; i < NM; i++)
        seg_ad[i] = malloc(sizeof(void *) * (size_t)S->n_seq);
    int t = 0, n_lt = 0, n_seg = 0;
    for (int s = 0; s < S->n_seq; s++) {
        if (s == 0 || S->adapter[s] != S->adapter[s - 1]) {
            seg_begin[n_seg] = t;
            for (int i = 0; i < NM; i++)
                seg_ad[i][n_seg] = S->adapter[s] < 0 || !ads[i] ? NULL : ads[i][S->adapter[s]];
            n_seg++;
        }
        for (int j = 0; j < n_new[s]; j++, t++) {
            int p = S->len[s] + j;
            tokens[t] = S->toks[s][p];
            pos[t] = p;
            seq[t] = s;
            slot[t] = S->bt[s * S->max_blocks + p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK;
            if (all_logits || j == n_new[s] - 1)
                lt[n_lt++] = t;
        }
        seq_len[s] = S->len[s] + n_new[s];
    }
    seg_begin[n_seg] = n_tok;
    float *lg[NM];
    for (int i = 0; i < NM; i++) {
        eng_batch b = {.n_tok = n_tok,
                       .tokens = tokens,
                       .attn = {n_tok, S->n_seq, pos, seq, slot, seq_len, S->bt, S->max_blocks},
                       .n_seg = n_seg,
                       .seg_begin = seg_begin,
                       .seg_adapter = seg_ad[i],
                       .n_logits = n_lt,
                       .logits_tok = lt};
        lg[i] = malloc(sizeof(float) * (size_t)n_lt * hp->n_vocab);
        int rc = eng_forward(g_m[i], kv[i], &b, lg[i]);
        if (rc)
            printf("eng_forward (model %d): %s\n", i, hy_err_msg());
        assert_int_equal(rc, 0);
    }
    for (int c = 0; c < CMP_N; c++)
        compare(lg[g_cmp[c][0]], lg[g_cmp[c][1]], n_lt, hp->n_vocab, &st->c[c]);
    for (int s = 0; s < S->n_seq; s++)
        S->len[s] += n_new[s];
    for (int i = 0; i < NM; i++) {
        free(lg[i]);
        free(seg_ad[i]);
    }
    free(tokens);
    free(pos);
    free(seq);
    free(slot);
    free(seq_len);
    free(lt);
    free(seg_begin);
}

static void seqset_init(seqset *S, int n_seq, int max_len, int n_blocks)
{
    S->n_seq = n_seq;
    S->max_blocks = (max_len + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
    assert_true(n_seq * S->max_blocks <= n_blocks);
    S->bt = malloc(4 * (size_t)n_seq * S->max_blocks);
    int *perm = malloc(sizeof(int) * (size_t)n_blocks);
    for (int i = 0; i < n_blocks; i++)
        perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = rnd_int(i + 1), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    for (int i = 0; i < n_seq * S->max_blocks; i++)
        S->bt[i] = perm[i];
    free(perm);
    S->len = calloc((size_t)n_seq, sizeof(int));
    S->toks = calloc((size_t)n_seq, sizeof(int32_t *));
    S->adapter = calloc((size_t)n_seq, sizeof(int));
    const int n_vocab = eng_model_hparams(g_m[0])->n_vocab;
    for (int s = 0; s < n_seq; s++) {
        int32_t *tk = malloc(4 * (size_t)max_len);
        for (int p = 0; p < max_len; p++)
            tk[p] = rnd_int(n_vocab);
        S->toks[s] = tk;
        S->adapter[s] = -1;
    }
}

static void seqset_free(seqset *S)
{
    for (int s = 0; s < S->n_seq; s++)
        free((void *)S->toks[s]);
    free(S->toks);
    free(S->bt);
    free(S->len);
    free(S->adapter);
}

static int g_failures;

static void report_one(const char *label, const cmp_one *c, double lim_nmse, double lim_top1)
{
    double agree = c->rows ? (double)c->agree / c->rows : 1.0;
    bool ok = lim_nmse <= 0 || (c->max_nmse <= lim_nmse && agree >= lim_top1);
    printf("    %-22s NMSE max %.2e mean %.2e, top-1 %6.2f %% (%ld/%ld)", label, c->max_nmse,
           c->steps ? c->sum_nmse / c->steps : 0, 100 * agree, c->agree, c->rows);
    if (lim_nmse > 0)
        printf("  limits %.0e / %.0f %%: %s", lim_nmse, 100 * lim_top1, ok ? "ok" : "FAIL");
    printf("\n");
    if (!ok)
        g_failures++;
}

static void report(const char *what, const cmp_stats *st)
{
    printf("  %s (%d steps)\n", what, st->c[0].steps);
    report_one("CUDA vs CPU F32 ref", &st->c[CMP_GPU_REF], MODEL_NMSE, MODEL_TOP1);
    report_one("CUDA vs CPU Q4_1", &st->c[CMP_GPU_CPUQ], LOOSE_NMSE, LOOSE_TOP1);
    report_one("(CPU Q4_1 vs F32 ref)", &st->c[CMP_CPUQ_REF], 0, 0);
}

static void kv_all(int n_blocks, eng_kv *kv[NM])
{
    for (int i = 0; i < NM; i++) {
        int rc = eng_kv_create(g_m[i], n_blocks, &kv[i]);
        if (rc)
            printf("eng_kv_create: %s\n", hy_err_msg());
        assert_int_equal(rc, 0);
    }
}

/* One sequence, 256 teacher-forced tokens: all at once (prefill, cuBLAS path, every token's
 * logits), then again one token per step (decode, mat-vec path). */
static void test_single_sequence(void **state)
{
    (void)state;
    NEED_GPU();
    const char *n_s = getenv("HY_TEST_TOKENS"); /* fewer for the CPU emulator (make test-emu) */
    const int n = n_s && atoi(n_s) >= 16 && atoi(n_s) <= 256 ? atoi(n_s) : 256;
    eng_kv *kv[NM];
    eng_adapter *const *no_ads[NM] = {NULL, NULL, NULL};
    seqset S;
    seqset_init(&S, 1, n, n / BE_KV_BLOCK + 4);
    kv_all(n / BE_KV_BLOCK + 4, kv);
    g_failures = 0;
    cmp_stats st = {0};
    int nn = n;
    step(&S, &nn, true, no_ads, kv, &st);
    printf("  %d tokens\n", n);
    report("prefill in one batch, every token's logits", &st);
    /* decode: same tokens, positions from 0 again (the cache is overwritten slot by slot) */
    memset(&st, 0, sizeof st);
    S.len[0] = 0;
    for (int i = 0; i < n; i++) {
        nn = 1;
        step(&S, &nn, false, no_ads, kv, &st);
    }
    report("decode, one token per step", &st);
    for (int i = 0; i < NM; i++)
        eng_kv_free(kv[i]);
    seqset_free(&S);
    assert_int_equal(g_failures, 0);
}

/* ---- adapters made directly with ops->lora_create ---- */

typedef struct {
    be_lora **lora[2]; /* [n_layer * ENG_N_PROJ] per backend */
    eng_adapter ad[NM];
    float *stats[NM];
    int K, r;
} test_adapter;

static void adapter_make(test_adapter *ta, int r, int K)
{
    const eng_hparams *hp = eng_model_hparams(g_m[0]);
    const int n = hp->n_layer * ENG_N_PROJ;
    ta->K = K;
    ta->r = r;
    for (int i = 0; i < 2; i++)
        ta->lora[i] = calloc((size_t)n, sizeof(be_lora *));
    for (int i = 0; i < NM; i++) {
        ta->stats[i] = calloc((size_t)n * (K + 1), sizeof(float));
        ta->ad[i] = (eng_adapter){ta->lora[g_mbe[i]], K, ta->stats[i], NULL, 1.0f, NULL};
    }
    for (int il = 0; il < hp->n_layer; il++) {
        for (int p = 0; p < ENG_N_PROJ; p++) {
            if (rnd_int(8) == 0)
                continue; /* some projections untargeted */
            int64_t in, out;
            eng_proj_dims(g_m[0], p, &in, &out);
            float *A = malloc(sizeof(float) * (size_t)(r * in)), *R = malloc(sizeof(float) * (size_t)(K * in));
            float *B[8];
            const float sa = 1.7f / sqrtf((float)in), sr = 4.0f / sqrtf((float)in);
            for (int64_t j = 0; j < r * in; j++)
                A[j] = sa * rnd_sym();
            for (int64_t j = 0; j < K * in; j++)
                R[j] = sr * rnd_sym();
            for (int k = 0; k < K; k++) {
                B[k] = malloc(sizeof(float) * (size_t)(out * r));
                for (int64_t j = 0; j < out * r; j++)
                    B[k][j] = 0.03f * rnd_sym();
            }
            float scale = 2.0f; /* lora_alpha = 2 r */
            for (int i = 0; i < 2; i++) {
                be *b = g_be[i];
                int rc = b->ops->lora_create(b, r, K, in, out, A, K > 1 ? R : NULL, (const float *const *)B, scale,
                                             &ta->lora[i][il * ENG_N_PROJ + p]);
                if (rc)
                    printf("lora_create: %s\n", hy_err_msg());
                assert_int_equal(rc, 0);
            }
            free(A);
            free(R);
            for (int k = 0; k < K; k++)
                free(B[k]);
        }
    }
}

static void adapter_drop(test_adapter *ta)
{
    const eng_hparams *hp = eng_model_hparams(g_m[0]);
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < hp->n_layer * ENG_N_PROJ; j++)
            g_be[i]->ops->lora_free(g_be[i], ta->lora[i][j]);
        free(ta->lora[i]);
    }
    for (int i = 0; i < NM; i++)
        free(ta->stats[i]);
}

static double stats_nmse(test_adapter *ad, int n_ad, int a_model, int ref_model)
{
    const eng_hparams *hp = eng_model_hparams(g_m[0]);
    double num = 0, den = 0;
    for (int a = 0; a < n_ad; a++)
        for (int j = 0; j < hp->n_layer * ENG_N_PROJ * (ad[a].K + 1); j++) {
            double d = (double)ad[a].stats[a_model][j] - ad[a].stats[ref_model][j];
            num += d * d;
            den += (double)ad[a].stats[ref_model][j] * ad[a].stats[ref_model][j];
        }
    return den > 0 ? num / den : INFINITY;
}

/* 64 sequences over 16 adapters (mixed rank and K) plus base-model sequences: a prefill
 * chunk for every sequence in one batch, then decode steps with 64 tokens each. */
static void test_many_adapters(void **state)
{
    (void)state;
    NEED_GPU();
    const int n_seq = 64, n_ad = 16, prefill = 16;
    const char *steps_s = getenv("HY_TEST_DECODE_STEPS");
    const int decode = steps_s ? atoi(steps_s) : 48;
    static const int ranks[] = {4, 8, 16, 32};
    test_adapter ad[16];
    for (int a = 0; a < n_ad; a++)
        adapter_make(&ad[a], ranks[a % 4], 1 + a % 8);
    eng_adapter *ads_m[NM][16];
    eng_adapter *const *ads[NM];
    for (int i = 0; i < NM; i++) {
        for (int a = 0; a < n_ad; a++)
            ads_m[i][a] = &ad[a].ad[i];
        ads[i] = ads_m[i];
    }
    const int max_len = prefill + decode + 1;
    const int per_seq = (max_len + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
    eng_kv *kv[NM];
    kv_all(n_seq * per_seq + 7, kv);
    seqset S;
    seqset_init(&S, n_seq, max_len, n_seq * per_seq + 7);
    /* sequences 0..3 run the base model, the other 60 spread over the adapters in order */
    for (int s = 0; s < n_seq; s++)
        S.adapter[s] = s < 4 ? -1 : (s - 4) * n_ad / (n_seq - 4);
    int *n_new = malloc(sizeof(int) * n_seq);
    for (int s = 0; s < n_seq; s++)
        n_new[s] = s == 5 ? 1 : 1 + rnd_int(prefill); /* one-token prefill included */
    g_failures = 0;
    cmp_stats st = {0};
    /* top-1 agreement is pooled over the prefill batch and the decode steps: the prefill
     * alone has 64 rows, where one near-tie flip already reads as 98.4 % (seen on an H100
     * with NMSE 1.3e-6) */
    step(&S, n_new, false, ads, kv, &st);
    for (int i = 0; i < decode; i++) {
        for (int s = 0; s < n_seq; s++)
            n_new[s] = 1;
        step(&S, n_new, false, ads, kv, &st);
    }
    report("64 seqs / 16 adapters: one prefill batch, then decode with 64 tokens per step", &st);
    /* router statistics accumulated by the forward passes */
    double e_ref = stats_nmse(ad, n_ad, 1, 0), e_q = stats_nmse(ad, n_ad, 1, 2);
    printf("  router stats NMSE: CUDA vs F32 ref %.2e (<= 1e-4), CUDA vs CPU Q4_1 %.2e (<= 1e-3), "
           "CPU Q4_1 vs ref %.2e\n", e_ref, e_q, stats_nmse(ad, n_ad, 2, 0));
    if (!(e_ref <= 1e-4) || !(e_q <= 1e-3))
        g_failures++;
    free(n_new);
    seqset_free(&S);
    for (int i = 0; i < NM; i++)
        eng_kv_free(kv[i]);
    for (int a = 0; a < n_ad; a++)
        adapter_drop(&ad[a]);
    assert_int_equal(g_failures, 0);
}

/* ---- recorded steps (CUDA graphs, kernels/cuda_graph.cu) against op-by-op steps ---- */

/* One r8 K3 adapter on every projection of model m, values from a fixed seed. */
static be_lora **graph_adapter(eng_model *m)
{
    const eng_hparams *hp = eng_model_hparams(m);
    be *b = eng_model_backend(m);
    const int r = 8, K = 3, n = hp->n_layer * ENG_N_PROJ;
    be_lora **l = calloc((size_t)n, sizeof *l);
    uint64_t saved = g_rng;
    g_rng = 12345;
    for (int il = 0; il < hp->n_layer; il++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            int64_t in, out;
            eng_proj_dims(m, p, &in, &out);
            float *A = malloc(sizeof(float) * (size_t)(r * in)), *R = malloc(sizeof(float) * (size_t)(K * in));
            float *B[3];
            for (int64_t i = 0; i < r * in; i++)
                A[i] = rnd_sym() / sqrtf((float)in);
            for (int64_t i = 0; i < K * in; i++)
                R[i] = rnd_sym() / sqrtf((float)in);
            for (int k = 0; k < K; k++) {
                B[k] = malloc(sizeof(float) * (size_t)(out * r));
                for (int64_t i = 0; i < out * r; i++)
                    B[k][i] = 0.05f * rnd_sym();
            }
            assert_int_equal(b->ops->lora_create(b, r, K, in, out, A, R, (const float *const *)B, 2.0f,
                                                 &l[il * ENG_N_PROJ + p]),
                             0);
            free(A);
            free(R);
            for (int k = 0; k < K; k++)
                free(B[k]);
        }
    g_rng = saved;
    return l;
}

/* The same steps on model g_m[1] (recording on) and on a second copy whose backend records
 * nothing (HY_CUDA_GRAPHS=0): decode runs of one shape, a shape change in between and back,
 * an adapter created mid-way (device memory moved: recorded steps must be recorded again),
 * two sequences. Logits and router stats must be bit-identical: a replay runs the very
 * kernels the op-by-op step runs, reading this step's metadata. */
static void test_graph_replay(void **state)
{
    (void)state;
    NEED_GPU();
    if (!g_be[1]->ops->step_counts) {
        printf("  (this backend records no steps: nothing to compare)\n");
        return;
    }
    be *off = NULL;
    setenv("HY_CUDA_GRAPHS", "0", 1);
    int rc = be_cuda_create(0, &off);
    unsetenv("HY_CUDA_GRAPHS");
    assert_int_equal(rc, 0);
    eng_model *mm[2] = {g_m[1], NULL};
    assert_int_equal(eng_model_load(g_f, off, &mm[1]), 0);
    const eng_hparams *hp = eng_model_hparams(mm[0]);
    const int n_seq = 2, max_len = 160, mb = max_len / BE_KV_BLOCK;
    eng_kv *kv[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(eng_kv_create(mm[i], n_seq * mb, &kv[i]), 0);
    int32_t bt[2 * 10];
    for (int i = 0; i < n_seq * mb; i++)
        bt[i] = (i * 7) % (n_seq * mb); /* a permutation: 7 and 20 are coprime */
    int len[2] = {0, 0};
    be_lora **lora[2] = {NULL, NULL};
    float *stats[2] = {calloc((size_t)hp->n_layer * ENG_N_PROJ * 4, sizeof(float)),
                       calloc((size_t)hp->n_layer * ENG_N_PROJ * 4, sizeof(float))};
    eng_adapter ad[2];
    uint64_t rec0 = 0, rep0 = 0, rec = 0, rep = 0;
    g_be[1]->ops->step_counts(g_be[1], &rec0, &rep0, &(uint64_t){0});
    /* the plan: {sequences, tokens each, steps, adapter on sequence 0} */
    static const int plan[][4] = {{1, 5, 1, 0},  {1, 1, 20, 0}, {1, 3, 1, 0},  {1, 1, 20, 0},
                                  {1, 1, 20, 1}, {2, 1, 1, 1},  {2, 1, 20, 1}, {2, 2, 2, 0}};
    int32_t tok[8], pos[8], seq[8], slot[8], seq_len[2], lt[8], seg_begin[3]; /* plan: up to 5 x 1 or 2 x 2 */
    long steps = 0, diffs = 0;
    for (size_t pi = 0; pi < HY_ARRAY_LEN(plan); pi++) {
        const int ns = plan[pi][0], per = plan[pi][1], use_ad = plan[pi][3];
        if (use_ad && !lora[0]) {
            for (int i = 0; i < 2; i++) {
                lora[i] = graph_adapter(mm[i]);
                ad[i] = (eng_adapter){lora[i], 3, stats[i], NULL, 1.0f, NULL};
            }
        }
        /* the kernels of the last recording: plan 1's (one sequence decoding, no adapter) before
         * plan 2, plan 4's (the same with an adapter on all seven projections) before plan 5.
         * Embedding, then per layer: q/k/v mat-vec (+ its rmsnorm), RoPE + KV store, attention,
         * o mat-vec (+ residual), gate/up mat-vec (+ rmsnorm), down mat-vec (+ the swiglu and the
         * residual); final rmsnorm, logits (one row-kernel launch at 1 token). An adapter adds a
         * shrink and an expand per hydra call: q/k/v in one, o, gate/up in one, down. */
        if (pi == 2 || pi == 5) {
            uint64_t r, p, k;
            g_be[1]->ops->step_counts(g_be[1], &r, &p, &k);
            printf("  a recorded decode step (1 sequence, %s, %d layers) launches %llu kernels\n",
                   pi == 2 ? "no adapter" : "an adapter on all seven projections", hp->n_layer,
                   (unsigned long long)k);
            assert_true(r > rec0);
            assert_int_equal(k, (uint64_t)(pi == 2 ? 6 : 14) * hp->n_layer + 3);
        }
        for (int st = 0; st < plan[pi][2]; st++, steps++) {
            int t = 0;
            if (ns == 2 && len[1] == 0)
                len[1] = len[0] > 8 ? 8 : len[0]; /* the second sequence joins with some context */
            for (int s = 0; s < ns; s++) {
                for (int j = 0; j < per; j++, t++) {
                    const int p = len[s] + j;
                    tok[t] = (int32_t)((p * 131 + s * 17) % hp->n_vocab);
                    pos[t] = p;
                    seq[t] = s;
                    slot[t] = bt[s * mb + p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK;
                    lt[t] = t;
                }
                seq_len[s] = len[s] + per;
            }
            const eng_adapter *seg_ad[2][2];
            int n_seg = use_ad ? (ns == 2 ? 2 : 1) : 0;
            seg_begin[0] = 0;
            seg_begin[1] = per;
            seg_begin[2] = 2 * per;
            float *lg[2];
            for (int i = 0; i < 2; i++) {
                seg_ad[i][0] = &ad[i];
                seg_ad[i][1] = NULL;
                if (n_seg == 1)
                    seg_begin[1] = t;
                eng_batch b = {.n_tok = t,
                               .tokens = tok,
                               .attn = {t, ns, pos, seq, slot, seq_len, bt, mb},
                               .n_seg = n_seg,
                               .seg_begin = seg_begin,
                               .seg_adapter = seg_ad[i],
                               .n_logits = t,
                               .logits_tok = lt};
                lg[i] = malloc(sizeof(float) * (size_t)t * hp->n_vocab);
                rc = eng_forward(mm[i], kv[i], &b, lg[i]);
                if (rc)
                    printf("eng_forward (%s): %s\n", i ? "op by op" : "recorded", hy_err_msg());
                assert_int_equal(rc, 0);
            }
            if (memcmp(lg[0], lg[1], sizeof(float) * (size_t)t * hp->n_vocab)) {
                if (!diffs)
                    printf("  step %ld (plan %zu): logits differ between recorded and op-by-op steps\n", steps, pi);
                diffs++;
            }
            free(lg[0]);
            free(lg[1]);
            for (int s = 0; s < ns; s++)
                len[s] += per;
        }
    }
    g_be[1]->ops->step_counts(g_be[1], &rec, &rep, &(uint64_t){0});
    const size_t ns_stats = (size_t)hp->n_layer * ENG_N_PROJ * 4;
    const bool stats_same = !memcmp(stats[0], stats[1], sizeof(float) * ns_stats);
    printf("  %ld steps: %llu recorded, %llu replayed; logits differ in %ld steps; router stats %s\n", steps,
           (unsigned long long)(rec - rec0), (unsigned long long)(rep - rep0), diffs,
           stats_same ? "identical" : "DIFFER");
    for (int i = 0; i < 2; i++) {
        if (lora[i]) {
            for (int j = 0; j < hp->n_layer * ENG_N_PROJ; j++)
                eng_model_backend(mm[i])->ops->lora_free(eng_model_backend(mm[i]), lora[i][j]);
            free(lora[i]);
        }
        eng_kv_free(kv[i]);
        free(stats[i]);
    }
    eng_model_free(mm[1]);
    off->ops->destroy(off);
    assert_int_equal(diffs, 0);
    assert_true(stats_same);
    /* every decode run above is long enough to be recorded and then replayed */
    assert_true(rec - rec0 >= 4);
    assert_true(rep - rep0 >= 60);
}

/* Speculative decoding through the scheduler on this backend: four greedy sequences whose prompts
 * repeat a pattern (so prompt-lookup drafts exist and hit) give the same tokens with drafts of up
 * to 4 as without: the backend runs each decode token and its draft as one chunk with a logit row
 * per token, the scheduler keeps the matching prefix and rolls the rest back. */
typedef struct {
    eng_model *m;
    eng_kv *kv;
    int n_vocab;
} spec_ctx;

static int spec_forward(void *ctx, const eng_batch *b, float *logits)
{
    spec_ctx *c = ctx;
    return eng_forward(c->m, c->kv, b, logits);
}

static int spec_argmax(void *ctx, void *state, const float *lg, const int32_t *toks, int n_prompt, int n_toks,
                       sched_sample *out)
{
    spec_ctx *c = ctx;
    int best = 0;
    for (int v = 1; v < c->n_vocab; v++)
        if (lg[v] > lg[best])
            best = v;
    memset(out, 0, sizeof *out);
    out->token = best;
    return 0;
}

static const sched_ops spec_ops = {.forward = spec_forward, .sample = spec_argmax};

static void spec_run_model(int spec, int32_t out[4][24], sched_stats *st)
{
    const eng_hparams *hp = eng_model_hparams(g_m[1]);
    spec_ctx c = {g_m[1], NULL, hp->n_vocab};
    assert_int_equal(eng_kv_create(g_m[1], 4 * 6, &c.kv), 0);
    sched_config cfg = {.max_seqs = 4, .max_batch_tokens = 64, .n_blocks = 4 * 6, .max_queue = 8, .max_loras = 1,
                        .n_ctx = 96, .n_vocab = hp->n_vocab, .n_layer = hp->n_layer, .spec_max_draft = spec,
                        .ops = &spec_ops, .ops_ctx = &c};
    sched *s = NULL;
    assert_int_equal(sched_create(&cfg, &s), 0);
    sched_req *rs[4];
    for (int i = 0; i < 4; i++) {
        int32_t p[40];
        for (int k = 0; k < 40; k++)
            p[k] = 100 + 37 * i + (k % (3 + i)) * 11; /* a period of 3 + i tokens */
        const int32_t *pp = p;
        int n = 40;
        sched_sampling sp = {.logprobs = true};
        assert_int_equal(sched_req_create(1, &pp, &n, 1, 24, NULL, 0, true, &sp, NULL, &rs[i]), 0);
        assert_int_equal(sched_submit(s, rs[i]), 0);
    }
    for (int step = 0; step < 400; step++) {
        bool all = true;
        for (int i = 0; i < 4; i++)
            all = all && sched_req_finished(rs[i]);
        if (all)
            break;
        assert_true(sched_step(s) >= 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_true(sched_req_finished(rs[i]) && !rs[i]->failed);
        assert_int_equal(rs[i]->choices[0].n_gen, 24);
        for (int k = 0; k < 24; k++)
            out[i][k] = rs[i]->choices[0].lp[k].token;
        sched_req_release(rs[i]);
    }
    sched_get_stats(s, st);
    assert_int_equal(st->kv_used, 0);
    sched_free(s);
    eng_kv_free(c.kv);
}

static void test_speculative_sched(void **state)
{
    (void)state;
    NEED_GPU();
    int32_t off[4][24], on[4][24];
    sched_stats s0, s1;
    spec_run_model(0, off, &s0);
    spec_run_model(4, on, &s1);
    printf("  speculative: %llu steps without drafts, %llu with; %llu draft tokens, %llu accepted\n",
           (unsigned long long)s0.steps, (unsigned long long)s1.steps, (unsigned long long)s1.spec_draft_tokens,
           (unsigned long long)s1.spec_accepted);
    assert_memory_equal(on, off, sizeof on);
    assert_true(s1.spec_accepted > 0 && s1.spec_accepted <= s1.spec_draft_tokens);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_sequence),
        cmocka_unit_test(test_many_adapters),
        cmocka_unit_test(test_graph_replay),
        cmocka_unit_test(test_speculative_sched),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
