/* test_quant.c - ggml types on the CPU: sizes, fp16/bf16 conversion (against F16C hardware and
 * hand-checked values), dequantisation bit for bit against the gguf package's golden files, and
 * the quantised matrix product of every type on every ISA against a double-precision reference
 * built from q_dequant_row, with an error bound derived from the activation quantisation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <jansson.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "engine/hy.h"
#include "engine/quant.h"

#define GOLDEN_DIR "tests/golden/dequant"

static const uint32_t all_types[] = {Q_F32, Q_F16, Q_BF16, Q_Q8_0, Q_Q4_0, Q_Q4_1, Q_Q4_K, Q_Q6_K};

/* ---------------------------------------------------------------------------------------- */
/* Random numbers: fresh each run (the seed is printed; HY_SEED=<n> repeats a run). */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rnd_unit(void) { return (float)((rnd() >> 40) * 0x1p-24); } /* [0, 1) */
static float rnd_sym(void) { return 2.0f * rnd_unit() - 1.0f; }          /* [-1, 1) */

static float rnd_normal(void)
{
    float u = rnd_unit() + 0x1p-25f, v = rnd_unit();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static int setup_seed(void **state)
{
    (void)state;
    const char *env = getenv("HY_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
    rng_state = seed;
    printf("test_quant: seed %llu (HY_SEED=%llu repeats this run)\n", (unsigned long long)seed,
           (unsigned long long)seed);
    return 0;
}

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------------------------------------------------------------------------------------- */
/* Sizes and names. */

static void test_sizes(void **state)
{
    (void)state;
    struct { uint32_t t; const char *name; int64_t blk; size_t bytes; } want[] = {
        {Q_F32, "F32", 1, 4},      {Q_F16, "F16", 1, 2},      {Q_BF16, "BF16", 1, 2},
        {Q_Q8_0, "Q8_0", 32, 34},  {Q_Q4_0, "Q4_0", 32, 18},  {Q_Q4_1, "Q4_1", 32, 20},
        {Q_Q4_K, "Q4_K", 256, 144}, {Q_Q6_K, "Q6_K", 256, 210},
    };
    for (size_t i = 0; i < HY_ARRAY_LEN(want); i++) {
        assert_true(q_supported(want[i].t));
        assert_string_equal(q_type_name(want[i].t), want[i].name);
        assert_int_equal(q_block_elems(want[i].t), want[i].blk);
        assert_int_equal(q_block_bytes(want[i].t), want[i].bytes);
        size_t rb = 0;
        assert_int_equal(q_row_bytes(want[i].t, 576 * want[i].blk, &rb), 0);
        assert_int_equal(rb, 576 * want[i].bytes);
        if (want[i].blk > 1)
            assert_int_equal(q_row_bytes(want[i].t, want[i].blk + 1, &rb), HY_EFORMAT);
        assert_true(q_act_row_bytes(want[i].t, 576 * want[i].blk) % 64 == 0);
    }
    assert_false(q_supported(17));
    assert_string_equal(q_type_name(17), "type 17");
    size_t rb = 0;
    assert_int_equal(q_row_bytes(17, 32, &rb), HY_EUNSUPPORTED);
    assert_int_equal(q_row_bytes(Q_F32, INT64_MAX, &rb), HY_EFORMAT); /* overflow */
    assert_string_equal(q_isa_name(Q_ISA_SCALAR), "scalar");
    assert_true(q_isa_available(Q_ISA_SCALAR));
}

/* ---------------------------------------------------------------------------------------- */
/* fp16 / bf16. */

static void test_f16_values(void **state)
{
    (void)state;
    struct { float f; uint16_t h; } tab[] = {
        {0.0f, 0x0000},         {-0.0f, 0x8000},          {1.0f, 0x3c00},
        {-2.0f, 0xc000},        {65504.0f, 0x7bff},       {65519.996f, 0x7bff},
        {65520.0f, 0x7c00},     {1e9f, 0x7c00},           {-INFINITY, 0xfc00},
        {0x1p-14f, 0x0400},     {0x1p-24f, 0x0001},       {0x1p-25f, 0x0000},   /* tie -> even 0 */
        {0x1.8p-24f, 0x0002},   /* 1.5 ulp: tie -> even 2 */
        {0x1.000002p-25f, 0x0001}, {0x1.ff8p-15f, 0x03ff}, {0x1.ffcp-15f, 0x0400}, /* top subnormal tie -> normal */
        {0x1.002p0f, 0x3c00},   /* tie between 0x3c00 and 0x3c01 -> even */
        {0x1.006p0f, 0x3c02},   /* tie between 0x3c01 and 0x3c02 -> even */
        {0x1.0021p0f, 0x3c01},  {1e-10f, 0x0000},         {-0x1p-24f, 0x8001},
    };
    for (size_t i = 0; i < HY_ARRAY_LEN(tab); i++) {
        uint16_t h = q_f32_to_f16(tab[i].f);
        if (h != tab[i].h)
            fail_msg("f32 %a -> f16 0x%04x, want 0x%04x", (double)tab[i].f, h, tab[i].h);
    }
    assert_true(isnan(q_f16_to_f32(q_f32_to_f16(NAN))));
    assert_true((q_f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (q_f32_to_f16(NAN) & 0x3ff) != 0);
    assert_true(q_f16_to_f32(0x7c00) == INFINITY);
    assert_true(q_f16_to_f32(0xfc00) == -INFINITY);
    assert_true(isnan(q_f16_to_f32(0x7e01)));
    assert_true(q_f16_to_f32(0x0001) == 0x1p-24f);
    assert_true(q_f16_to_f32(0x03ff) == 0x1.ff8p-15f);
    assert_true(q_f16_to_f32(0x7bff) == 65504.0f);
    /* every half survives half -> float -> half (NaNs stay NaNs) */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = q_f16_to_f32((uint16_t)h);
        uint16_t back = q_f32_to_f16(f);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) {
            assert_true(isnan(f));
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff));
        } else if (back != h) {
            fail_msg("f16 0x%04x -> %a -> 0x%04x", h, (double)f, back);
        }
    }
}

#if defined(__x86_64__)
__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f)
{
    return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), 0), 0);
}

__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h)
{
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}
#endif

/* F16C hardware is an independent reference for both directions (round to nearest even). */
static void test_f16_vs_hardware(void **state)
{
    (void)state;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c")) {
        print_message("SKIP: this CPU has no F16C to compare with\n");
        skip();
    }
    for (uint32_t h = 0; h < 65536; h++) {
        float a = q_f16_to_f32((uint16_t)h), b = hw_f16_to_f32((uint16_t)h);
        if (!(isnan(a) && isnan(b)) && f2u(a) != f2u(b))
            fail_msg("f16 0x%04x: %a, hardware %a", h, (double)a, (double)b);
    }
    /* random bit patterns over the whole float range, plus every float near the half range
     * edges (subnormal, normal boundary, max) */
    for (int i = 0; i < 2000000; i++) {
        uint32_t u;
        if (i % 4 == 0)
            u = (uint32_t)rnd();
        else if (i % 4 == 1) /* exponents where halves live: 2^-26 .. 2^17 */
            u = (uint32_t)(rnd() & 0x807fffffu) | (uint32_t)(101 + rnd() % 43) << 23;
        else if (i % 4 == 2) /* low 13 bits near the rounding tie */
            u = ((uint32_t)rnd() & 0xffffe000u) | (0x1000u + (uint32_t)(rnd() % 3) - 1);
        else
            u = (uint32_t)(rnd() & 0x80000000u) | (0x477fe000u + (uint32_t)(rnd() % 0x4000u));
        float f = u2f(u);
        uint16_t a = q_f32_to_f16(f), b = hw_f32_to_f16(f);
        if (isnan(f)) {
            assert_true((a & 0x7c00) == 0x7c00 && (a & 0x3ff));
            continue;
        }
        if (a != b)
            fail_msg("f32 0x%08x (%a): 0x%04x, hardware 0x%04x", u, (double)f, a, b);
    }
#else
    print_message("SKIP: not an x86-64 CPU, no F16C reference\n");
    skip();
#endif
}

static void test_bf16(void **state)
{
    (void)state;
    struct { uint32_t in; uint16_t out; } tab[] = {
        {0x3f800000u, 0x3f80}, {0x3f808000u, 0x3f80}, /* tie -> even */
        {0x3f818000u, 0x3f82}, {0x3f808001u, 0x3f81}, {0x80000000u, 0x8000},
        {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80}, {0x7f7fffffu, 0x7f80}, /* max rounds to inf */
        {0x00000001u, 0x0000}, {0x00008000u, 0x0000}, {0x00018000u, 0x0002}, /* subnormals */
        {0x007fffffu, 0x0080},
    };
    for (size_t i = 0; i < HY_ARRAY_LEN(tab); i++) {
        uint16_t h = q_f32_to_bf16(u2f(tab[i].in));
        if (h != tab[i].out)
            fail_msg("f32 0x%08x -> bf16 0x%04x, want 0x%04x", tab[i].in, h, tab[i].out);
    }
    uint16_t n = q_f32_to_bf16(u2f(0x7f800001u)); /* signalling NaN with payload only in low bits */
    assert_true((n & 0x7f80) == 0x7f80 && (n & 0x7f));
    for (uint32_t h = 0; h < 65536; h++) {
        float f = q_bf16_to_f32((uint16_t)h);
        assert_int_equal(f2u(f), h << 16);
        if (!isnan(f))
            assert_int_equal(q_f32_to_bf16(f), h);
    }
    /* against a rounding rule computed a different way: nearest of the two neighbours */
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = (uint32_t)rnd();
        float f = u2f(u);
        if (isnan(f) || isinf(f))
            continue;
        uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
        uint32_t rest = u & 0xffffu;
        uint32_t want = rest < 0x8000u ? lo : rest > 0x8000u ? hi : ((lo >> 16) & 1 ? hi : lo);
        assert_int_equal(q_f32_to_bf16(f), want >> 16);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Dequantisation against the gguf package (tests/golden/dequant, scripts/gen_golden_dequant.py). */

static void *read_file(const char *dir, const char *name, size_t *len)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return p;
}

static void test_dequant_golden(void **state)
{
    (void)state;
    json_error_t jerr;
    json_t *idx = json_load_file(GOLDEN_DIR "/index.json", 0, &jerr);
    if (!idx)
        fail_msg("%s/index.json: %s (run scripts/gen_golden_dequant.py)", GOLDEN_DIR, jerr.text);
    json_t *cases = json_object_get(idx, "cases");
    assert_true(json_is_array(cases));
    int seen[64] = {0};
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        uint32_t type = (uint32_t)json_integer_value(json_object_get(c, "ggml_type"));
        int64_t n = json_integer_value(json_object_get(c, "n_elements"));
        assert_non_null(name);
        assert_true(q_supported(type));
        size_t blen, flen, rb = 0;
        uint8_t *raw = read_file(GOLDEN_DIR, json_string_value(json_object_get(c, "bin")), &blen);
        float *want = read_file(GOLDEN_DIR, json_string_value(json_object_get(c, "f32")), &flen);
        assert_int_equal(q_row_bytes(type, n, &rb), 0);
        assert_int_equal(rb, blen);
        assert_int_equal(flen, (size_t)n * 4);
        float *got = malloc((size_t)n * 4);
        assert_non_null(got);
        q_dequant_row(type, raw, got, n);
        for (int64_t k = 0; k < n; k++)
            if (f2u(got[k]) != f2u(want[k]))
                fail_msg("%s: element %lld is %a (0x%08x), gguf says %a (0x%08x)", name, (long long)k,
                         (double)got[k], f2u(got[k]), (double)want[k], f2u(want[k]));
        print_message("dequant %-24s %7lld values bit-identical\n", name, (long long)n);
        seen[type % 64] = 1;
        free(raw);
        free(want);
        free(got);
    }
    for (size_t k = 0; k < HY_ARRAY_LEN(all_types); k++)
        if (!seen[all_types[k]])
            fail_msg("golden files lack type %s", q_type_name(all_types[k]));
    json_decref(idx);
}

/* ---------------------------------------------------------------------------------------- */
/* Matrix products. */

static void put_h(uint8_t *p, float f)
{
    uint16_t h = q_f32_to_f16(f);
    memcpy(p, &h, 2);
}

/* rows x cols random weights of `type`: random quant bytes with sane random fp16 scales */
static uint8_t *rand_weights(uint32_t type, int64_t rows, int64_t cols, size_t *row_bytes)
{
    size_t rb = 0;
    assert_int_equal(q_row_bytes(type, cols, &rb), 0);
    uint8_t *w = malloc(rb * (size_t)rows);
    assert_non_null(w);
    for (size_t i = 0; i < rb * (size_t)rows; i++)
        w[i] = (uint8_t)rnd();
    size_t bb = q_block_bytes(type), nblk = rb * (size_t)rows / bb;
    for (size_t b = 0; b < nblk; b++) {
        uint8_t *p = w + bb * b;
        switch (type) {
        case Q_F32: { float v = rnd_normal(); memcpy(p, &v, 4); break; }
        case Q_F16: put_h(p, rnd_normal()); break;
        case Q_BF16: { uint16_t h = q_f32_to_bf16(rnd_normal()); memcpy(p, &h, 2); break; }
        case Q_Q8_0: put_h(p, 0.01f * (0.2f + rnd_unit())); break;
        case Q_Q4_0: put_h(p, 0.1f * rnd_sym()); break;
        case Q_Q4_1: put_h(p, 0.1f * (0.1f + rnd_unit())); put_h(p + 2, -0.8f * rnd_unit()); break;
        case Q_Q4_K: put_h(p, 0.005f * (0.1f + rnd_unit())); put_h(p + 2, 0.005f * rnd_unit()); break;
        case Q_Q6_K: put_h(p + 208, 0.002f * rnd_sym()); break;
        default: fail();
        }
    }
    *row_bytes = rb;
    return w;
}

typedef struct {
    double ref, bound, absdot;
} ref_val;

/* Double-precision reference y[t][r] = sum_c w[r][c] x[t][c] from q_dequant_row, and the error
 * the activation quantisation may add: each activation becomes q * d with |x - q d| <= d / 2
 * (d = amax of its 32- or 256-block / 127), so |y - ref| <= sum_c |w_c| d(c) / 2. We allow
 * 0.501 d (the products x * 127/amax and amax / 127 are themselves rounded to fp32) plus float
 * summation error 3e-5 * sum |w x|. For F32/F16/BF16 weights only the latter applies. In
 * practice the bound is about 1e-3 of |w| |x| for Q8 blocks: well under 1e-2 of the norm product. */
static ref_val *reference(uint32_t type, const uint8_t *W, size_t wrb, int64_t rows, int64_t cols,
                          const float *X, int n_tok)
{
    ref_val *out = calloc((size_t)rows * (size_t)n_tok, sizeof *out);
    float *wd = malloc((size_t)cols * 4);
    double *dq = malloc((size_t)cols * sizeof(double));
    assert_true(out && wd && dq);
    int64_t qb = type == Q_Q4_K || type == Q_Q6_K ? 256 : q_block_elems(type) == 32 ? 32 : 0;
    for (int t = 0; t < n_tok; t++) {
        const float *x = X + (size_t)t * (size_t)cols;
        for (int64_t c = 0; c < cols; c++)
            dq[c] = 0.0;
        if (qb) {
            for (int64_t c0 = 0; c0 < cols; c0 += qb) {
                float amax = 0.0f;
                for (int64_t c = c0; c < c0 + qb; c++)
                    amax = fmaxf(amax, fabsf(x[c]));
                for (int64_t c = c0; c < c0 + qb; c++)
                    dq[c] = 0.501 * (double)amax / 127.0;
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            q_dequant_row(type, W + wrb * (size_t)r, wd, cols);
            ref_val *o = &out[(size_t)t * (size_t)rows + (size_t)r];
            for (int64_t c = 0; c < cols; c++) {
                o->ref += (double)wd[c] * (double)x[c];
                o->absdot += fabs((double)wd[c] * (double)x[c]);
                o->bound += fabs((double)wd[c]) * dq[c];
            }
            o->bound += 3e-5 * o->absdot + 1e-30;
        }
    }
    free(wd);
    free(dq);
    return out;
}

static void *act_alloc(uint32_t type, int64_t cols, int n_tok)
{
    size_t n = q_act_bytes(type, cols, n_tok);
    void *p = aligned_alloc(64, n ? n : 64);
    assert_non_null(p);
    memset(p, 0xa5, n); /* garbage, so stale bytes would show */
    return p;
}

static void check_matmul_type(uint32_t type)
{
    /* odd row counts; column counts that cross the kernels' 64-block chunk and, for float types,
     * leave a tail after the 8-wide loop */
    const int64_t rows = 37, r0 = 2, r1 = 35;
    const int64_t cols = type == Q_Q4_K || type == Q_Q6_K ? 768 : q_block_elems(type) == 32 ? 2272 : 77; /* 71 blocks: odd tail */
    const int ntoks[] = {1, 3, 4, 7, 33};
    const int64_t ldy = rows + 5;
    size_t wrb;
    uint8_t *W = rand_weights(type, rows, cols, &wrb);
    for (size_t k = 0; k < HY_ARRAY_LEN(ntoks); k++) {
        const int n_tok = ntoks[k];
        float *X = malloc((size_t)n_tok * (size_t)cols * 4);
        assert_non_null(X);
        for (int64_t i = 0; i < n_tok * cols; i++) {
            /* rows of different scale, a few outliers, never an all-zero block */
            float v = rnd_normal() * (1.0f + (float)(i / cols % 3));
            X[i] = (rnd() % 97 == 0) ? 8.0f * v : v;
        }
        ref_val *ref = reference(type, W, wrb, rows, cols, X, n_tok);
        float *Ys = malloc((size_t)n_tok * (size_t)ldy * 4);
        float *Y = malloc((size_t)n_tok * (size_t)ldy * 4);
        assert_true(Ys && Y);

        /* scalar reference path */
        void *acts = act_alloc(type, cols, n_tok);
        q_act_quantize_scalar(type, X, cols, n_tok, acts);
        for (int64_t i = 0; i < n_tok * ldy; i++)
            Ys[i] = NAN;
        q_matmul_rows_scalar(type, W, cols, acts, n_tok, Ys, ldy, r0, r1);

        for (int isa = Q_ISA_SCALAR; isa <= Q_ISA_AVX512; isa++) {
            if (!q_isa_available((q_isa)isa))
                continue;
            assert_int_equal(q_isa_set((q_isa)isa), 0);
            void *act = act_alloc(type, cols, n_tok);
            /* quantise in two token ranges, as a caller splitting over threads would */
            int t_split = n_tok / 2;
            size_t arb = q_act_row_bytes(type, cols);
            q_act_quantize(type, X, cols, t_split, act);
            q_act_quantize(type, X + (size_t)t_split * (size_t)cols, cols, n_tok - t_split,
                           (uint8_t *)act + arb * (size_t)t_split);
            if (memcmp(act, acts, q_act_bytes(type, cols, n_tok)) != 0) {
                /* padding bytes are never written: compare the used part of each row */
                size_t used = type == Q_Q4_K || type == Q_Q6_K ? (size_t)cols / 256 * 292
                            : q_block_elems(type) == 32 ? (size_t)cols / 32 * 40 : (size_t)cols * 4;
                for (int t = 0; t < n_tok; t++)
                    if (memcmp((uint8_t *)act + arb * t, (uint8_t *)acts + arb * t, used) != 0)
                        fail_msg("%s/%s: activations of token %d differ from the scalar ones",
                                 q_type_name(type), q_isa_name((q_isa)isa), t);
            }
            for (int64_t i = 0; i < n_tok * ldy; i++)
                Y[i] = NAN;
            /* rows in two calls, as a caller splitting over threads would */
            q_matmul_rows(type, W, cols, act, n_tok, Y, ldy, r0, 20);
            q_matmul_rows(type, W, cols, act, n_tok, Y, ldy, 20, r1);
            double worst = 0.0;
            for (int t = 0; t < n_tok; t++) {
                for (int64_t r = 0; r < ldy; r++) {
                    float y = Y[(size_t)t * (size_t)ldy + (size_t)r];
                    float ys = Ys[(size_t)t * (size_t)ldy + (size_t)r];
                    if (r < r0 || r >= r1) {
                        if (!isnan(y) || !isnan(ys))
                            fail_msg("%s/%s: row %lld outside [%lld,%lld) was written", q_type_name(type),
                                     q_isa_name((q_isa)isa), (long long)r, (long long)r0, (long long)r1);
                        continue;
                    }
                    const ref_val *rv = &ref[(size_t)t * (size_t)rows + (size_t)r];
                    double err = fabs((double)y - rv->ref), errs = fabs((double)ys - rv->ref);
                    double agree = fabs((double)y - (double)ys);
                    if (!(err <= rv->bound) || !(errs <= rv->bound))
                        fail_msg("%s/%s n_tok %d: y[%d][%lld] = %.9g (scalar %.9g), reference %.9g, "
                                 "allowed error %.3g", q_type_name(type), q_isa_name((q_isa)isa), n_tok,
                                 t, (long long)r, (double)y, (double)ys, rv->ref, rv->bound);
                    /* same activations, same integer sums: only float summation order differs */
                    if (!(agree <= 3e-5 * rv->absdot + 1e-30))
                        fail_msg("%s/%s n_tok %d: y[%d][%lld] = %.9g but scalar path %.9g",
                                 q_type_name(type), q_isa_name((q_isa)isa), n_tok, t, (long long)r,
                                 (double)y, (double)ys);
                    worst = fmax(worst, err / rv->absdot);
                }
            }
            if (n_tok == 33)
                print_message("matmul %-4s %-6s n_tok %2d cols %4lld: max |err| / sum|w x| = %.2e\n",
                              q_type_name(type), q_isa_name((q_isa)isa), n_tok, (long long)cols, worst);
            free(act);
        }
        q_isa_set(Q_ISA_SCALAR);
        free(acts);
        free(Y);
        free(Ys);
        free(ref);
        free(X);
    }
    free(W);
}

static void test_matmul_f32(void **s) { (void)s; check_matmul_type(Q_F32); }
static void test_matmul_f16(void **s) { (void)s; check_matmul_type(Q_F16); }
static void test_matmul_bf16(void **s) { (void)s; check_matmul_type(Q_BF16); }
static void test_matmul_q8_0(void **s) { (void)s; check_matmul_type(Q_Q8_0); }
static void test_matmul_q4_0(void **s) { (void)s; check_matmul_type(Q_Q4_0); }
static void test_matmul_q4_1(void **s) { (void)s; check_matmul_type(Q_Q4_1); }
static void test_matmul_q4_k(void **s) { (void)s; check_matmul_type(Q_Q4_K); }
static void test_matmul_q6_k(void **s) { (void)s; check_matmul_type(Q_Q6_K); }

/* Single-token mat-vec (the decode path: 512-bit kernels on AVX-512 machines take several rows
 * and several blocks per step) on the shapes that leave every kind of tail: 1..5 blocks per row,
 * row counts that are not a multiple of the rows per step, and a range that ends at the last
 * row of an exactly sized matrix (no read past it). Checked against the reference and the
 * scalar path like check_matmul_type. */
static void test_matvec_shapes(void **state)
{
    (void)state;
    static const uint32_t types[] = {Q_Q8_0, Q_Q4_0, Q_Q4_1};
    static const int64_t colss[] = {32, 64, 96, 128, 160, 576};
    const int64_t rows = 11;
    for (size_t ti = 0; ti < HY_ARRAY_LEN(types); ti++) {
        for (size_t ci = 0; ci < HY_ARRAY_LEN(colss); ci++) {
            const uint32_t type = types[ti];
            const int64_t cols = colss[ci];
            size_t wrb;
            uint8_t *W = rand_weights(type, rows, cols, &wrb);
            float *X = malloc((size_t)cols * 4), *Y = malloc((size_t)rows * 4), *Ys = malloc((size_t)rows * 4);
            assert_true(X && Y && Ys);
            for (int64_t i = 0; i < cols; i++)
                X[i] = rnd_normal();
            ref_val *ref = reference(type, W, wrb, rows, cols, X, 1);
            void *acts = act_alloc(type, cols, 1);
            q_act_quantize_scalar(type, X, cols, 1, acts);
            q_matmul_rows_scalar(type, W, cols, acts, 1, Ys, rows, 0, rows);
            for (int isa = Q_ISA_SCALAR; isa <= Q_ISA_AVX512; isa++) {
                if (!q_isa_available((q_isa)isa))
                    continue;
                assert_int_equal(q_isa_set((q_isa)isa), 0);
                void *act = act_alloc(type, cols, 1);
                q_act_quantize(type, X, cols, 1, act);
                for (int64_t r = 0; r < rows; r++)
                    Y[r] = NAN;
                q_matmul_rows(type, W, cols, act, 1, Y, rows, 0, 5);
                q_matmul_rows(type, W, cols, act, 1, Y, rows, 5, rows);
                for (int64_t r = 0; r < rows; r++) {
                    double err = fabs((double)Y[r] - ref[r].ref);
                    if (!(err <= ref[r].bound) || !(fabs((double)Y[r] - Ys[r]) <= 3e-5 * ref[r].absdot + 1e-30))
                        fail_msg("%s/%s cols %lld: y[%lld] = %.9g, scalar %.9g, reference %.9g (bound %.3g)",
                                 q_type_name(type), q_isa_name((q_isa)isa), (long long)cols, (long long)r,
                                 (double)Y[r], (double)Ys[r], ref[r].ref, ref[r].bound);
                }
                free(act);
            }
            q_isa_set(Q_ISA_SCALAR);
            free(acts);
            free(ref);
            free(X);
            free(Y);
            free(Ys);
            free(W);
        }
    }
}

static void test_isa(void **state)
{
    (void)state;
    q_isa best = q_isa_get();
    assert_true(q_isa_available(best));
    for (int isa = Q_ISA_SCALAR; isa <= Q_ISA_AVX512; isa++) {
        if (q_isa_available((q_isa)isa)) {
            assert_int_equal(q_isa_set((q_isa)isa), 0);
            assert_int_equal(q_isa_get(), isa);
            print_message("isa %s: available\n", q_isa_name((q_isa)isa));
        } else {
            assert_int_equal(q_isa_set((q_isa)isa), HY_EUNSUPPORTED);
            print_message("isa %s: not on this CPU (its tests are skipped)\n", q_isa_name((q_isa)isa));
        }
    }
    assert_int_equal(q_isa_set(best), 0);
}

/* q_sum_exp on every ISA the CPU has: the log-softmax normaliser against a double loop, with -inf
 * and NaN entries counting 0 and lengths that leave a tail. */
static void test_sum_exp(void **st)
{
    (void)st;
    enum { N = 4103 };
    static float x[N];
    uint32_t h = 12345;
    float mx = -INFINITY;
    for (int i = 0; i < N; i++) {
        h = h * 1664525u + 1013904223u;
        x[i] = (float)(h >> 8) / (float)(1u << 24) * 40.0f - 30.0f;
        mx = x[i] > mx ? x[i] : mx;
    }
    x[7] = -INFINITY;
    x[100] = NAN;
    for (int n = 0; n <= N; n += n < 40 ? 1 : 997) {
        double want = 0;
        for (int i = 0; i < n; i++)
            if (x[i] - mx >= -FLT_MAX)
                want += exp((double)x[i] - mx);
        for (int isa = Q_ISA_SCALAR; isa <= Q_ISA_AVX512; isa++) {
            if (!q_isa_available((q_isa)isa))
                continue;
            assert_int_equal(q_isa_set((q_isa)isa), 0);
            double got = q_sum_exp(x, n, mx);
            /* float exponentials (~2 ulp) in float lanes of 64 adds: 1e-5 relative is 1e-5 nats */
            if (!(fabs(got - want) <= 1e-5 * want + 1e-30))
                fail_msg("isa %d, n %d: %.9g vs %.9g", isa, n, got, want);
        }
    }
    q_isa_set(Q_ISA_SCALAR);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_isa), cmocka_unit_test(test_sum_exp),
        cmocka_unit_test(test_f16_values),
        cmocka_unit_test(test_f16_vs_hardware),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_dequant_golden),
        cmocka_unit_test(test_matmul_f32),
        cmocka_unit_test(test_matmul_f16),
        cmocka_unit_test(test_matmul_bf16),
        cmocka_unit_test(test_matmul_q8_0),
        cmocka_unit_test(test_matmul_q4_0),
        cmocka_unit_test(test_matmul_q4_1),
        cmocka_unit_test(test_matmul_q4_k),
        cmocka_unit_test(test_matmul_q6_k),
        cmocka_unit_test(test_matvec_shapes),
    };
    return cmocka_run_group_tests(tests, setup_seed, NULL);
}
