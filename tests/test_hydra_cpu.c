/* test_hydra_cpu.c - the CPU backend's HydraLoRA op (engine/be_cpu_hydra.c) against a naive
 * double-precision transcription of DESIGN.md section 1 on fresh random inputs: several
 * adapters of different r/K in one batch, no-adapter segments, gaps, one-token segments,
 * router statistics, and argument errors. Each case runs twice: precise mode (fp32 adapter
 * storage) against the reference on the weights as given, and the default fp16 storage against
 * the reference on the weights rounded as the storage rule says (each of A, R, B times the power
 * of two that brings its largest |w| into [2^13, 2^14), clamped to 2^-40..2^40, to fp16 nearest
 * even, divided back), so both are held to the same fp32-level bound. */
#include "engine/be_cpu.h"
#include "engine/hy.h"
#include "engine/quant.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

static unsigned long long rng_state;

static double urand(void)
{
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static float frand(float a) { return (float)((urand() * 2.0 - 1.0) * a); }

typedef struct {
    int r, K;
    float *A, *R, *B[16];
    float scale;
    be_lora *l;
} host_lora;

/* The n values of each of parts[0..n_parts) as fp16 storage holds them (see the file comment). */
static void round_as_stored(float *const *parts, int n_parts, size_t n)
{
    float mx = 0.0f;
    for (int p = 0; p < n_parts; p++)
        for (size_t i = 0; i < n; i++)
            if (isfinite(parts[p][i]) && fabsf(parts[p][i]) > mx)
                mx = fabsf(parts[p][i]);
    int e = 0;
    if (mx > 0.0f)
        (void)frexpf(mx, &e);
    float f = mx > 0.0f ? ldexpf(1.0f, HY_MAX(-40, HY_MIN(40, 14 - e))) : 1.0f;
    for (int p = 0; p < n_parts; p++)
        for (size_t i = 0; i < n; i++)
            parts[p][i] = q_f16_to_f32(q_f32_to_f16(parts[p][i] * f)) / f;
}

/* Uploads h's weights to b, then (round: fp16 backend) rounds h's copy as the backend stores it. */
static void host_lora_make(be *b, host_lora *h, int r, int K, int64_t in, int64_t out, float rscale, bool round)
{
    h->r = r;
    h->K = K;
    h->scale = 0.5f + (float)urand();
    h->A = malloc(sizeof(float) * (size_t)(r * in));
    for (int64_t i = 0; i < r * in; i++)
        h->A[i] = frand(1.0f / sqrtf((float)in));
    h->R = NULL;
    if (K > 1) {
        h->R = malloc(sizeof(float) * (size_t)(K * in));
        for (int64_t i = 0; i < K * in; i++)
            h->R[i] = frand(rscale);
    }
    for (int k = 0; k < K; k++) {
        h->B[k] = malloc(sizeof(float) * (size_t)(out * r));
        for (int64_t i = 0; i < out * r; i++)
            h->B[k][i] = frand(1.0f);
    }
    assert_int_equal(cpu_lora_create(b, r, K, in, out, h->A, h->R, (const float *const *)h->B, h->scale, &h->l), 0);
    if (!round)
        return;
    round_as_stored(&h->A, 1, (size_t)(r * in));
    if (K > 1)
        round_as_stored(&h->R, 1, (size_t)(K * in));
    round_as_stored(h->B, K, (size_t)(out * r));
}

static void host_lora_free(be *b, host_lora *h)
{
    cpu_lora_free(b, h->l);
    free(h->A);
    free(h->R);
    for (int k = 0; k < h->K; k++)
        free(h->B[k]);
}

/* Naive reference for one token: y += s * sum_k g_k B_k (A x); stats += g, entropy. */
/* w: the segment's stack weight (be_lora_seg.scale, 1 for a plain adapter) */
static void ref_token(const host_lora *h, const float *x, int64_t in, double *y, int64_t out, double *st, double w)
{
    double hv[256], lg[16], g[16];
    for (int i = 0; i < h->r; i++) {
        hv[i] = 0;
        for (int64_t c = 0; c < in; c++)
            hv[i] += (double)h->A[i * in + c] * x[c];
    }
    if (h->K == 1) {
        g[0] = 1.0;
    } else {
        double m = -INFINITY, sum = 0;
        for (int k = 0; k < h->K; k++) {
            lg[k] = 0;
            for (int64_t c = 0; c < in; c++)
                lg[k] += (double)h->R[k * in + c] * x[c];
            m = fmax(m, lg[k]);
        }
        for (int k = 0; k < h->K; k++)
            sum += (g[k] = exp(lg[k] - m));
        for (int k = 0; k < h->K; k++)
            g[k] /= sum;
    }
    double ent = 0;
    for (int k = 0; k < h->K; k++) {
        if (g[k] > 0)
            ent -= g[k] * log(g[k]);
        st[k] += g[k];
    }
    st[h->K] += ent;
    for (int64_t o = 0; o < out; o++) {
        double acc = 0;
        for (int k = 0; k < h->K; k++) {
            double bh = 0;
            for (int i = 0; i < h->r; i++)
                bh += (double)h->B[k][o * h->r + i] * hv[i];
            acc += g[k] * bh;
        }
        y[o] += w * h->scale * acc;
    }
}

typedef struct {
    int begin, end, lora; /* lora -1: none */
} seg_spec;

/* Run one batch through cpu_hydra and the reference; compare y and stats. */
static void run_case_mode(tp_pool *pool, bool precise, int64_t in, int64_t out, const int (*cfg)[2], int n_lora,
                          const seg_spec *sp, int n_seg, int n_tok, float rscale)
{
    be_cpu bc = {.base = {.ops = NULL}, .pool = pool, .precise = precise};
    be *b = &bc.base;
    host_lora L[8];
    for (int i = 0; i < n_lora; i++)
        host_lora_make(b, &L[i], cfg[i][0], cfg[i][1], in, out, rscale, !precise);
    float *x = malloc(sizeof(float) * (size_t)(n_tok * in));
    float *y = malloc(sizeof(float) * (size_t)(n_tok * out));
    double *yr = malloc(sizeof(double) * (size_t)(n_tok * out));
    for (int64_t i = 0; i < n_tok * in; i++)
        x[i] = frand(2.0f);
    for (int64_t i = 0; i < n_tok * out; i++)
        yr[i] = y[i] = frand(1.0f);
    be_lora_seg segs[32];
    float stats[32][17];
    double stats_ref[32][17];
    for (int s = 0; s < n_seg; s++) {
        segs[s].tok_begin = sp[s].begin;
        segs[s].tok_end = sp[s].end;
        segs[s].lora = sp[s].lora >= 0 ? L[sp[s].lora].l : NULL;
        segs[s].stats = sp[s].lora >= 0 ? stats[s] : NULL;
        segs[s].ctl = NULL;
        /* stack weights: 0 (read as 1), a half, a negative weight */
        static const float wts[3] = {0.0f, 0.5f, -0.75f};
        segs[s].scale = wts[s % 3];
        for (int k = 0; k < 17; k++)
            stats_ref[s][k] = stats[s][k] = (float)k; /* the op must ADD */
        if (sp[s].lora < 0)
            continue;
        for (int t = sp[s].begin; t < sp[s].end; t++)
            ref_token(&L[sp[s].lora], x + t * in, in, yr + t * out, out, stats_ref[s], be_seg_scale(&segs[s]));
    }
    assert_int_equal(cpu_hydra(b, x, in, y, out, segs, n_seg), 0);
    double maxd = 0, maxerr = 0;
    for (int64_t i = 0; i < n_tok * out; i++) {
        maxerr = fmax(maxerr, fabs((double)y[i] - yr[i]));
        maxd = fmax(maxd, fabs(yr[i]));
    }
    for (int64_t i = 0; i < n_tok * out; i++)
        if (!isfinite(y[i]))
            fail_msg("y[%lld] is not finite", (long long)i);
    if (!(maxerr <= 1e-5 * fmax(maxd, 1.0)))
        fail_msg("%s: y max abs error %g (max |y| %g)", precise ? "fp32" : "fp16", maxerr, maxd);
    for (int s = 0; s < n_seg; s++) {
        if (sp[s].lora < 0)
            continue;
        int K = L[sp[s].lora].K;
        for (int k = 0; k <= K; k++)
            if (!(fabs(stats[s][k] - stats_ref[s][k]) <= 1e-4 * fmax(1.0, fabs(stats_ref[s][k]))))
                fail_msg("%s: segment %d stats[%d] = %g, reference %g", precise ? "fp32" : "fp16", s, k,
                         stats[s][k], stats_ref[s][k]);
    }
    /* Tokens in no segment and in no-adapter segments are untouched (checked via yr above). */
    for (int i = 0; i < n_lora; i++)
        host_lora_free(b, &L[i]);
    free(x);
    free(y);
    free(yr);
}

static void run_case(tp_pool *pool, int64_t in, int64_t out, const int (*cfg)[2], int n_lora, const seg_spec *sp,
                     int n_seg, int n_tok, float rscale)
{
    run_case_mode(pool, true, in, out, cfg, n_lora, sp, n_seg, n_tok, rscale);
    run_case_mode(pool, false, in, out, cfg, n_lora, sp, n_seg, n_tok, rscale);
}

static const int mix_cfg[][2] = {{4, 1}, {8, 3}, {3, 16}, {16, 4}};
static const seg_spec mix_segs[] = {
    {0, 5, 0}, {5, 6, -1}, {6, 7, 1}, {7, 20, 2}, {20, 22, -1}, {24, 25, 0}, {25, 40, 1}, {40, 41, 3}, {41, 60, 3},
};

static void test_mixed_batch_threads(void **state)
{
    tp_pool *pool = *state;
    run_case(pool, 67, 45, mix_cfg, 4, mix_segs, (int)HY_ARRAY_LEN(mix_segs), 60, 0.3f);
    /* larger dims so the op takes the multithreaded path */
    run_case(pool, 576, 192, mix_cfg, 4, mix_segs, (int)HY_ARRAY_LEN(mix_segs), 60, 0.1f);
}

static void test_mixed_batch_single_thread(void **state)
{
    (void)state;
    run_case(NULL, 576, 192, mix_cfg, 4, mix_segs, (int)HY_ARRAY_LEN(mix_segs), 60, 0.1f);
}

/* Decode shape: one token per segment, many segments (BGMV). Sharp router logits. */
static void test_decode_one_token_segments(void **state)
{
    tp_pool *pool = *state;
    seg_spec sp[24];
    for (int i = 0; i < 24; i++)
        sp[i] = (seg_spec){i, i + 1, i % 5 == 4 ? -1 : i % 4};
    run_case(pool, 130, 1536, mix_cfg, 4, sp, 24, 24, 3.0f);
}

static void test_no_adapter_segments_only(void **state)
{
    tp_pool *pool = *state;
    seg_spec sp[] = {{0, 3, -1}, {3, 9, -1}};
    run_case(pool, 16, 8, mix_cfg, 1, sp, 2, 9, 1.0f);
    be_cpu bc = {.base = {.ops = NULL}, .pool = pool};
    float x = 1, y = 2;
    assert_int_equal(cpu_hydra(&bc.base, &x, 1, &y, 1, NULL, 0), 0);
    assert_true(y == 2);
}

static void test_errors(void **state)
{
    be_cpu bc = {.base = {.ops = NULL}, .pool = *state};
    be *b = &bc.base;
    float A[8] = {0}, B0[8] = {0};
    const float *B[1] = {B0};
    be_lora *l = NULL;
    assert_int_equal(cpu_lora_create(b, 0, 1, 4, 2, A, NULL, B, 1.0f, &l), HY_EINVAL);
    assert_null(l);
    assert_int_equal(cpu_lora_create(b, 2, 2, 4, 2, A, NULL, B, 1.0f, &l), HY_EINVAL); /* K > 1 without R */
    assert_int_equal(cpu_lora_create(b, 2, 1, 4, 2, A, NULL, B, 1.0f, &l), 0);
    float x[8] = {0}, y[8] = {0};
    be_lora_seg s = {0, 1, l, NULL, NULL, 1.0f};
    assert_int_equal(cpu_hydra(b, x, 5, y, 2, &s, 1), HY_EINVAL); /* wrong in */
    assert_non_null(strstr(hy_err_msg(), "adapter"));
    be_lora_seg s2[2] = {{0, 2, l, NULL, NULL, 1.0f}, {1, 2, l, NULL, NULL, 1.0f}};
    assert_int_equal(cpu_hydra(b, x, 4, y, 2, s2, 2), HY_EINVAL); /* overlapping */
    cpu_lora_free(b, l);
    cpu_lora_free(b, NULL);
}

/* be_gate.h's rules by hand: temperature, forced and masked heads, top-k (ties: lower index
 * first), the entropy it returns, and the op refusing a control that allows no head. */
static void expect_gate(const float *l, int K, const be_gate_ctl *c, const double *want)
{
    float g[BE_GATE_MAX_K];
    float ent = be_gate(l, K, 1.0f, c, g);
    double e = 0.0;
    for (int k = 0; k < K; k++) {
        assert_true(fabs(g[k] - want[k]) < 1e-6);
        if (want[k] > 0)
            e -= want[k] * log(want[k]);
    }
    assert_true(fabs(ent - e) < 1e-5);
}

static void test_gate_control(void **state)
{
    const float l[4] = {1.0f, 2.0f, 3.0f, 0.0f};
    double z = exp(1) + exp(2) + exp(3) + 1, z2 = exp(0.5) + exp(1) + exp(1.5) + 1, z3 = exp(2) + exp(3);
    double plain[4] = {exp(1) / z, exp(2) / z, exp(3) / z, 1 / z};
    expect_gate(l, 4, NULL, plain);
    expect_gate(l, 4, &(be_gate_ctl){1.0f, 0, 0xf}, plain); /* the neutral control is the router */
    expect_gate(l, 4, &(be_gate_ctl){2.0f, 0, 0xf}, (double[]){exp(0.5) / z2, exp(1) / z2, exp(1.5) / z2, 1 / z2});
    expect_gate(l, 4, &(be_gate_ctl){1.0f, 0, 1u << 3}, (double[]){0, 0, 0, 1});           /* force 3 */
    expect_gate(l, 4, &(be_gate_ctl){1.0f, 2, 0xf}, (double[]){0, exp(2) / z3, exp(3) / z3, 0}); /* top 2 */
    expect_gate(l, 4, &(be_gate_ctl){1.0f, 1, 0xf & ~4u}, (double[]){0, 1, 0, 0});         /* mask 2, top 1 */
    expect_gate(l, 4, &(be_gate_ctl){1.0f, 9, 0xf}, plain);                                 /* top_k >= K */
    const float tie[3] = {1.0f, 1.0f, 1.0f};
    expect_gate(tie, 3, &(be_gate_ctl){1.0f, 2, 0x7}, (double[]){0.5, 0.5, 0});
    assert_true(be_gate_ok(NULL, 4) && be_gate_ok(&(be_gate_ctl){0.5f, 0, 1}, 4));
    assert_false(be_gate_ok(&(be_gate_ctl){1.0f, 0, 1u << 4}, 4)); /* no head below K */
    assert_false(be_gate_ok(&(be_gate_ctl){0.0f, 0, 1}, 4));
    assert_false(be_gate_ok(&(be_gate_ctl){NAN, 0, 1}, 4));
    assert_false(be_gate_ok(&(be_gate_ctl){1.0f, -1, 1}, 4));
    be_cpu bc = {.base = {.ops = NULL}, .pool = *state};
    be *b = &bc.base;
    float A[8] = {0}, R[8] = {0}, B0[4] = {0}, B1[4] = {0}, x[4] = {0}, y[2] = {0};
    const float *B[2] = {B0, B1};
    be_lora *lo = NULL;
    assert_int_equal(cpu_lora_create(b, 2, 2, 4, 2, A, R, B, 1.0f, &lo), 0);
    be_gate_ctl none = {1.0f, 0, 1u << 2};
    be_lora_seg sg = {0, 1, lo, NULL, &none, 1.0f};
    assert_int_equal(cpu_hydra(b, x, 4, y, 2, &sg, 1), HY_EINVAL);
    assert_non_null(strstr(hy_err_msg(), "router control"));
    cpu_lora_free(b, lo);
}

static int setup(void **state)
{
    rng_state = (unsigned long long)time(NULL) ^ 0x9e3779b97f4a7c15ULL;
    printf("# seed %llu\n", rng_state);
    tp_pool *p;
    if (tp_create(2, &p))
        return -1;
    *state = p;
    return 0;
}

static int teardown(void **state)
{
    tp_free(*state);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_batch_threads),
        cmocka_unit_test(test_mixed_batch_single_thread),
        cmocka_unit_test(test_decode_one_token_segments),
        cmocka_unit_test(test_no_adapter_segments_only),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_gate_control),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
