/* test_hydra_fp16.c - the CPU HydraLoRA op with fp16 adapter storage (engine/be_cpu_hydra.c):
 * every fp16 dot-product path (scalar, AVX2+F16C, AVX-512; forced with q_isa_set) on cases whose
 * exact result is known (fp16 subnormals, every tile size and tail length, inf and NaN weights),
 * a token's output independent of the batch around it, the fp16 op against the precise (fp32
 * storage) op on the same weights, weights far outside fp16's range included, and lora_create's
 * size checks. The fp16<->fp32 conversions themselves (q_f16_to_f32 / q_f32_to_f16) are checked
 * value by value against F16C in test_quant.c.
 * Seed: time of day unless HY_TEST_SEED is set; it is printed so a failure can be replayed. */
#include "engine/be_cpu.h"
#include "engine/hy.h"
#include "engine/quant.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "tests/testutil.h"

static uint64_t g_rng;
static tp_pool *g_pool;

static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd_u64() % (uint64_t)(hi - lo + 1)); } /* [lo, hi] */
static float rnd_sym(float a) { return (float)(((double)(rnd_u64() >> 11) * 0x1p-53 * 2.0 - 1.0) * a); }

static float *vec(size_t n)
{
    float *v = calloc(n ? n : 1, sizeof *v);
    assert_non_null(v);
    return v;
}

/* One adapter's host weights. */
typedef struct {
    int r, K;
    int64_t in, out;
    float *A, *R, *B[8];
    float scale;
} w_lora;

static void w_free(w_lora *w)
{
    free(w->A);
    free(w->R);
    for (int k = 0; k < w->K; k++)
        free(w->B[k]);
}

static be_lora *upload(be *b, const w_lora *w)
{
    be_lora *l = NULL;
    int rc = cpu_lora_create(b, w->r, w->K, w->in, w->out, w->A, w->R, (const float *const *)w->B, w->scale, &l);
    if (rc)
        fail_msg("lora_create: %s", hy_err_msg());
    return l;
}

/* y (n_tok x out, zeroed first) = the op on one segment of n_tok tokens through l. */
static void run_one(be *b, be_lora *l, const float *x, int64_t in, float *y, int64_t out, int n_tok, float *stats)
{
    memset(y, 0, sizeof(float) * (size_t)n_tok * (size_t)out);
    be_lora_seg s = {0, n_tok, l, stats, NULL, 1.0f};
    int rc = cpu_hydra(b, x, in, y, out, &s, 1);
    if (rc)
        fail_msg("hydra: %s", hy_err_msg());
}

static const q_isa g_isas[] = {Q_ISA_SCALAR, Q_ISA_AVX2, Q_ISA_AVX512};
static void rand_lora(w_lora *w, int r, int K, int64_t in, int64_t out, float a_sd, float b_sd);

/* ---- exact cases ----
 * K = 1 adapters built so every product and every partial sum, in any order, is exact in fp32:
 * A's largest |value| is 1 (storage factor 2^13); columns c % 3 == 1 hold m 2^-37 (|m| < 64),
 * stored as the fp16 subnormal m 2^-24, against x = +-2^34; the other columns hold k/8
 * (|k| <= 8) against x in -2..2. Every shrink term is then a multiple of 2^-3 below 2^3 in
 * magnitude, h a multiple of 2^-3 below 2^10; B = k/4 (|k| <= 4, largest 1: factor 2^13) keeps the
 * expand sums within 23 significant bits. So each path must give the double reference bit for
 * bit; a subnormal read as zero (or any lane/tail slip) changes the result by at least 2^-3. */
static void exact_lora(w_lora *w, int r, int64_t in, int64_t out)
{
    *w = (w_lora){.r = r, .K = 1, .in = in, .out = out, .scale = 1.0f};
    w->A = vec((size_t)r * (size_t)in);
    w->B[0] = vec((size_t)out * (size_t)r);
    for (int i = 0; i < r; i++)
        for (int64_t c = 0; c < in; c++) {
            float v = c % 3 == 1 ? ldexpf((float)(rnd_int(1, 63) * (rnd_int(0, 1) ? 1 : -1)), -37)
                                 : (float)rnd_int(-8, 8) / 8.0f;
            w->A[(size_t)i * (size_t)in + (size_t)c] = v;
        }
    w->A[0] = 1.0f;
    for (size_t i = 0; i < (size_t)out * (size_t)r; i++)
        w->B[0][i] = (float)rnd_int(-4, 4) / 4.0f;
    w->B[0][0] = -1.0f;
}

static void exact_x(float *x, int n_tok, int64_t in)
{
    for (int t = 0; t < n_tok; t++)
        for (int64_t c = 0; c < in; c++)
            x[(size_t)t * (size_t)in + (size_t)c] =
                c % 3 == 1 ? (rnd_int(0, 1) ? 0x1p34f : -0x1p34f) : (float)rnd_int(-2, 2);
}

static void exact_ref(const w_lora *w, const float *x, int n_tok, double *y)
{
    for (int t = 0; t < n_tok; t++)
        for (int64_t o = 0; o < w->out; o++) {
            double acc = 0;
            for (int i = 0; i < w->r; i++) {
                double h = 0;
                for (int64_t c = 0; c < w->in; c++)
                    h += (double)w->A[(size_t)i * (size_t)w->in + (size_t)c] * x[(size_t)t * (size_t)w->in + (size_t)c];
                acc += (double)w->B[0][(size_t)o * (size_t)w->r + (size_t)i] * h;
            }
            y[(size_t)t * (size_t)w->out + (size_t)o] = w->scale * acc;
        }
}

static void test_paths_exact(void **state)
{
    (void)state;
    be_cpu bc = {.pool = g_pool, .precise = false};
    q_isa saved = q_isa_get();
    static const int64_t ins[] = {2, 3, 7, 8, 9, 15, 16, 17, 19, 31, 32, 33, 35, 47, 63, 64, 65, 70, 129};
    static const int rs[] = {1, 3, 8, 16, 17, 40};
    int runs = 0;
    for (size_t ii = 0; ii < HY_ARRAY_LEN(ins); ii++)
        for (size_t ri = 0; ri < HY_ARRAY_LEN(rs); ri++) {
            int64_t in = ins[ii], out = 5;
            int n_tok = rnd_int(1, 19); /* tiles of 1..8 tokens and a remainder */
            w_lora w;
            exact_lora(&w, rs[ri], in, out);
            float *x = vec((size_t)n_tok * (size_t)in), *y = vec((size_t)n_tok * (size_t)out);
            double *ref = calloc((size_t)n_tok * (size_t)out, sizeof *ref);
            exact_x(x, n_tok, in);
            exact_ref(&w, x, n_tok, ref);
            be_lora *l = upload(&bc.base, &w);
            for (size_t k = 0; k < HY_ARRAY_LEN(g_isas); k++) {
                if (!q_isa_available(g_isas[k]))
                    continue;
                assert_int_equal(q_isa_set(g_isas[k]), 0);
                run_one(&bc.base, l, x, in, y, out, n_tok, NULL);
                for (size_t i = 0; i < (size_t)n_tok * (size_t)out; i++)
                    if ((double)y[i] != ref[i])
                        fail_msg("%s, in %lld, r %d, %d tokens: y[%zu] = %.9g, exact %.9g", q_isa_name(g_isas[k]),
                                 (long long)in, w.r, n_tok, i, (double)y[i], ref[i]);
                runs++;
            }
            cpu_lora_free(&bc.base, l);
            w_free(&w);
            free(x);
            free(y);
            free(ref);
        }
    assert_int_equal(q_isa_set(saved), 0);
    printf("# %d exact runs over the paths:", runs);
    for (size_t k = 0; k < HY_ARRAY_LEN(g_isas); k++)
        if (q_isa_available(g_isas[k]))
            printf(" %s", q_isa_name(g_isas[k]));
    printf("\n");
}

/* An infinite weight (the factor ignores it; it stays infinite in fp16) at every column, in the
 * vector body and in the tails, makes y infinite on every path; a NaN weight makes it NaN. */
static void test_paths_inf_nan(void **state)
{
    (void)state;
    be_cpu bc = {.pool = g_pool, .precise = false};
    q_isa saved = q_isa_get();
    enum { IN = 71, OUT = 3, NT = 3 };
    float x[NT * IN], y[NT * OUT];
    for (int i = 0; i < NT * IN; i++)
        x[i] = 0.25f + (float)(i % 5);
    for (int c = 0; c < IN; c++)
        for (int nan = 0; nan <= 1; nan++) {
            w_lora w = {.r = 1, .K = 1, .in = IN, .out = OUT, .scale = 1.0f};
            w.A = vec(IN);
            w.B[0] = vec(OUT);
            for (int i = 0; i < IN; i++)
                w.A[i] = 0.5f;
            w.A[c] = nan ? NAN : INFINITY;
            for (int o = 0; o < OUT; o++)
                w.B[0][o] = 2.0f;
            be_lora *l = upload(&bc.base, &w);
            for (size_t k = 0; k < HY_ARRAY_LEN(g_isas); k++) {
                if (!q_isa_available(g_isas[k]))
                    continue;
                assert_int_equal(q_isa_set(g_isas[k]), 0);
                run_one(&bc.base, l, x, IN, y, OUT, NT, NULL);
                for (int i = 0; i < NT * OUT; i++)
                    if (nan ? !isnan(y[i]) : y[i] != INFINITY)
                        fail_msg("%s: %s weight at column %d: y[%d] = %g", q_isa_name(g_isas[k]),
                                 nan ? "NaN" : "inf", c, i, (double)y[i]);
            }
            cpu_lora_free(&bc.base, l);
            w_free(&w);
        }
    assert_int_equal(q_isa_set(saved), 0);
}

/* A token's output is bit for bit the same alone and anywhere in a batch (any tile size, any
 * place in the tile), on every path: the server's batching must not change a sequence's text. */
static void test_batch_invariance(void **state)
{
    (void)state;
    be_cpu bc = {.pool = g_pool, .precise = false};
    q_isa saved = q_isa_get();
    enum { NT = 21 };
    static const int64_t ins[] = {576, 61}, outs[] = {192, 37};
    static const int rk[][2] = {{16, 4}, {7, 3}};
    for (int c = 0; c < 2; c++) {
        int64_t in = ins[c], out = outs[c];
        w_lora w;
        rand_lora(&w, rk[c][0], rk[c][1], in, out, 1.0f, 0.05f);
        be_lora *l = upload(&bc.base, &w);
        float *x = vec((size_t)NT * (size_t)in), *yb = vec((size_t)NT * (size_t)out), *y1 = vec((size_t)out);
        for (size_t i = 0; i < (size_t)NT * (size_t)in; i++)
            x[i] = rnd_sym(1.7f);
        for (size_t k = 0; k < HY_ARRAY_LEN(g_isas); k++) {
            if (!q_isa_available(g_isas[k]))
                continue;
            assert_int_equal(q_isa_set(g_isas[k]), 0);
            /* the batch: one segment of 1..NT tokens starting at a random token */
            int t0 = rnd_int(0, NT - 1), n = rnd_int(1, NT - t0);
            run_one(&bc.base, l, x + (size_t)t0 * (size_t)in, in, yb, out, n, NULL);
            for (int t = 0; t < n; t++) {
                run_one(&bc.base, l, x + (size_t)(t0 + t) * (size_t)in, in, y1, out, 1, NULL);
                if (memcmp(y1, yb + (size_t)t * (size_t)out, sizeof(float) * (size_t)out))
                    fail_msg("%s, in %lld: token %d of a %d-token segment differs from the token alone",
                             q_isa_name(g_isas[k]), (long long)in, t, n);
            }
        }
        cpu_lora_free(&bc.base, l);
        w_free(&w);
        free(x);
        free(yb);
        free(y1);
    }
    assert_int_equal(q_isa_set(saved), 0);
}

/* ---- fp16 storage against precise fp32 storage, same weights ----
 * Each stored weight is w (1 + d), |d| <= 2^-11 (round to nearest with an 11-bit significand; the
 * factors keep every weight within 2^28 of its matrix's largest, so only weights that cannot
 * matter reach fp16's subnormals). For independent d, uniform in [-2^-11, 2^-11] (variance 2^-22/3),
 * a dot product's squared error relative to its squared magnitude is about 2^-22/3 = 8e-8 when the
 * terms do not cancel; y = s B (g h) and the router logits carry two or three such roundings (A, B,
 * R via the softmax), so the NMSE expected over a batch is around 1e-7..3e-7 (measured ~1e-7;
 * the largest of 1650 cases over 150 seeds 2.3e-7 for y, 4e-8 for the stats). Cancelling sums
 * inflate single tokens (one token with a rank-1 adapter and a near-zero A x has no bound at all),
 * so every case has >= 24 tokens and rank >= 4, and the bound is 2e-6: ~9x the largest measured.
 * A 3 bits shorter significand (2^-8, bf16) would measure ~64x higher and fail; so does a missing
 * or wrong factor (zeros, infinities, a saturated router: NMSE 0.2..1 or NaN). */
#define NMSE_FP16 2e-6


static void rand_lora(w_lora *w, int r, int K, int64_t in, int64_t out, float a_sd, float b_sd)
{
    *w = (w_lora){.r = r, .K = K, .in = in, .out = out, .scale = 2.0f / (float)r};
    w->A = vec((size_t)r * (size_t)in);
    for (size_t i = 0; i < (size_t)r * (size_t)in; i++)
        w->A[i] = rnd_sym(a_sd * 1.7f / sqrtf((float)in));
    if (K > 1) {
        w->R = vec((size_t)K * (size_t)in);
        for (size_t i = 0; i < (size_t)K * (size_t)in; i++)
            w->R[i] = rnd_sym(3.0f / sqrtf((float)in));
    }
    for (int k = 0; k < K; k++) {
        w->B[k] = vec((size_t)out * (size_t)r);
        for (size_t i = 0; i < (size_t)out * (size_t)r; i++)
            w->B[k][i] = rnd_sym(b_sd);
    }
}

/* n_ad adapters, segments of random length (some without adapter) over n_tok tokens; the op's
 * adapter term and router stats on the fp16 backend against the precise one. */
static void check_vs_precise(int n_tok, int64_t in, int64_t out, int n_ad, float a_sd, float b_sd)
{
    be_cpu bf = {.pool = g_pool, .precise = false}, bp = {.pool = g_pool, .precise = true};
    be *bs[2] = {&bf.base, &bp.base};
    static const int ranks[] = {4, 8, 16, 32};
    w_lora w[8];
    be_lora *l[2][8];
    for (int a = 0; a < n_ad; a++) {
        rand_lora(&w[a], ranks[rnd_int(0, 3)], 1 + a % 4, in, out, a_sd, b_sd);
        for (int i = 0; i < 2; i++)
            l[i][a] = upload(bs[i], &w[a]);
    }
    be_lora_seg segs[2][32];
    float stats[2][32][9];
    memset(stats, 0, sizeof stats);
    int n_seg = 0, t = 0;
    while (t < n_tok && n_seg < 31) {
        int len = rnd_int(1, 12);
        len = HY_MIN(len, n_tok - t);
        int a = rnd_int(0, n_ad); /* n_ad: no adapter */
        for (int i = 0; i < 2; i++)
            segs[i][n_seg] = (be_lora_seg){t, t + len, a < n_ad ? l[i][a] : NULL, stats[i][n_seg], NULL, 1.0f};
        n_seg++;
        t += len;
    }
    for (int i = 0; i < 2 && t < n_tok; i++)
        segs[i][n_seg] = (be_lora_seg){t, n_tok, l[i][0], stats[i][n_seg], NULL, 1.0f};
    n_seg += t < n_tok;
    size_t nx = (size_t)n_tok * (size_t)in, ny = (size_t)n_tok * (size_t)out;
    float *x = vec(nx), *o[2] = {vec(ny), vec(ny)};
    for (size_t i = 0; i < nx; i++)
        x[i] = rnd_sym(1.7f);
    for (int i = 0; i < 2; i++) {
        int rc = cpu_hydra(bs[i], x, in, o[i], out, segs[i], n_seg);
        if (rc)
            fail_msg("hydra: %s", hy_err_msg());
    }
    for (size_t i = 0; i < ny; i++)
        if (!isfinite(o[0][i]) || !isfinite(o[1][i]))
            fail_msg("y[%zu]: fp16 %g, fp32 %g", i, (double)o[0][i], (double)o[1][i]);
    double e = tu_nmse(o[0], o[1], ny), es = tu_nmse(&stats[0][0][0], &stats[1][0][0], sizeof stats[0] / sizeof(float));
    printf("#   %3d tokens, in %4lld, out %4lld, %2d segments: NMSE y %.2e, stats %.2e\n", n_tok, (long long)in,
           (long long)out, n_seg, e, es);
    if (!(e <= NMSE_FP16) || !(es <= NMSE_FP16))
        fail_msg("fp16 vs fp32 storage: NMSE y %.3g, stats %.3g > %g", e, es, NMSE_FP16);
    for (int a = 0; a < n_ad; a++) {
        for (int i = 0; i < 2; i++)
            cpu_lora_free(bs[i], l[i][a]);
        w_free(&w[a]);
    }
    free(x);
    free(o[0]);
    free(o[1]);
}

static void test_vs_precise(void **state)
{
    (void)state;
    check_vs_precise(24, 576, 192, 3, 1.0f, 0.05f);
    check_vs_precise(64, 577, 1001, 5, 1.0f, 0.05f); /* odd sizes: the scalar tails */
    check_vs_precise(40, 1536, 576, 4, 1.0f, 0.05f);
}

/* Weights far below fp16's smallest normal (1e-8: zero in plain fp16) and far above its largest
 * value (1e6: infinity in plain fp16) come out as accurately as ordinary ones. */
static void test_vs_precise_range(void **state)
{
    (void)state;
    const float a_sd[] = {1e-8f, 1e4f, 1e6f, 1e-6f}, b_sd[] = {1e6f, 1e-9f, 1e-8f, 1e-6f};
    for (size_t i = 0; i < HY_ARRAY_LEN(a_sd); i++) {
        printf("#   A ~ %.0e, B ~ %.0e:\n", (double)a_sd[i], (double)b_sd[i]);
        check_vs_precise(24, 576, 192, 3, a_sd[i], b_sd[i]);
        check_vs_precise(33, 577, 101, 4, a_sd[i], b_sd[i]);
    }
}

/* Sizes whose bytes overflow size_t are refused in both storage modes, before reading weights. */
static void test_create_limits(void **state)
{
    (void)state;
    float a[4] = {0}, b0[4] = {0};
    const float *B[1] = {b0};
    for (int precise = 0; precise <= 1; precise++) {
        be_cpu bc = {.pool = g_pool, .precise = precise};
        be_lora *l = (be_lora *)a;
        /* 2 x 2^62 elements fit in size_t; their bytes (2 or 4 each) do not */
        assert_int_equal(cpu_lora_create(&bc.base, 2, 1, (int64_t)1 << 62, 1, a, NULL, B, 1.0f, &l), HY_ELIMIT);
        assert_null(l);
        assert_non_null(strstr(hy_err_msg(), "too large"));
        assert_int_equal(cpu_lora_create(&bc.base, 2, 1, 1, (int64_t)1 << 62, a, NULL, B, 1.0f, &l), HY_ELIMIT);
        assert_int_equal(cpu_lora_create(&bc.base, 2, 1, 2, 2, a, NULL, B, 1.0f, &l), 0);
        cpu_lora_free(&bc.base, l);
    }
}

static int setup(void **state)
{
    (void)state;
    const char *s = getenv("HY_TEST_SEED");
    g_rng = s && *s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    printf("# test_hydra_fp16: seed %llu (HY_TEST_SEED=%llu replays it)\n", (unsigned long long)g_rng,
           (unsigned long long)g_rng);
    return tp_create(2, &g_pool) ? -1 : 0;
}

static int teardown(void **state)
{
    (void)state;
    tp_free(g_pool);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paths_exact),      cmocka_unit_test(test_paths_inf_nan),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_vs_precise),       cmocka_unit_test(test_vs_precise_range),
        cmocka_unit_test(test_create_limits),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
