/* test_be_cpu.c - every base op of the CPU backend (engine/be_cpu.c) against a naive
 * double-precision reference written here, on fresh random inputs each run (the seed is printed),
 * for every instruction set the machine has (q_isa_set) and on both sides of the threading
 * thresholds. HydraLoRA ops are tested with the adapters. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "engine/backend.h"
#include "engine/hy.h"
#include "engine/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng_state;
static be *B;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float frand(void) { return (float)((rnd() >> 11) * 0x1.0p-53 * 2.0 - 1.0); }
static float *rand_vec(size_t n, float scale)
{
    float *v = malloc(n * sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++)
        v[i] = frand() * scale;
    return v;
}

/* ||a - b|| / ||b|| */
static double rel_err(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    if (!(num == num))
        return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double max_err(const float *a, const double *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (isnan(d))
            return INFINITY;
        if (d > m)
            m = d;
    }
    return m;
}

/* Runs body once per available ISA. */
#define FOR_EACH_ISA(isa)                                                                          \
    for (int isa = Q_ISA_SCALAR; isa <= Q_ISA_AVX512; isa++)                                       \
        if (q_isa_available((q_isa)isa) && q_isa_set((q_isa)isa) == 0)

static int setup(void **state)
{
    const char *s = getenv("HY_TEST_SEED");
    rng_state = s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) * 2654435761u + (uint64_t)clock();
    if (!rng_state)
        rng_state = 88172645463325252ULL;
    printf("test_be_cpu: seed %llu (HY_TEST_SEED to repeat)\n", (unsigned long long)rng_state);
    return be_cpu_create(2, &B) == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    if (B)
        B->ops->destroy(B);
    return 0;
}

/* ------------------------------------------------------------------ rmsnorm, swiglu */

static void *rand_weight(uint32_t type, int64_t rows, int64_t cols);

/* matmul_n of x with the input transform `in` (into in->out) and a random F32 weight: the
 * product must be the matmul of what was stored, bit for bit. */
static void mm_transform(const be_mm_in *in, const float *x, int n_tok, int dim)
{
    const int64_t rows = 3;
    void *wd = rand_weight(Q_F32, rows, dim);
    be_weight *w;
    assert_int_equal(B->ops->weight_create(B, Q_F32, rows, dim, wd, &w), 0);
    float *p = malloc(sizeof(float) * (size_t)n_tok * rows), *p1 = malloc(sizeof(float) * (size_t)n_tok * rows);
    assert_int_equal(B->ops->matmul_n(B, 1, (const be_weight *const *)&w, x, in, n_tok, &p, false), 0);
    assert_int_equal(B->ops->matmul(B, w, in->out, n_tok, p1), 0);
    assert_memory_equal(p, p1, sizeof(float) * (size_t)n_tok * rows);
    B->ops->weight_free(B, w);
    free(wd);
    free(p);
    free(p1);
}

static void check_rmsnorm(int n_tok, int dim, bool in_place)
{
    float *x = rand_vec((size_t)n_tok * dim, 3.0f), *w = rand_vec((size_t)dim, 1.5f);
    float *y = in_place ? x : malloc(sizeof(float) * (size_t)n_tok * dim);
    double *ref = malloc(sizeof(double) * (size_t)n_tok * dim);
    const float eps = 1e-5f;
    for (int t = 0; t < n_tok; t++) {
        double ss = 0;
        for (int i = 0; i < dim; i++)
            ss += (double)x[t * dim + i] * x[t * dim + i];
        double sc = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++)
            ref[t * dim + i] = x[t * dim + i] * sc * w[i];
    }
    assert_int_equal(B->ops->rmsnorm(B, x, w, n_tok, dim, eps, y), 0);
    double e = rel_err(y, ref, (size_t)n_tok * dim);
    if (e > 1e-6)
        fail_msg("rmsnorm %d x %d: rel err %g", n_tok, dim, e);
    if (!in_place) { /* as matmul_n's input transform: the same normed rows */
        float *xn = malloc(sizeof(float) * (size_t)n_tok * dim);
        const be_mm_in in = {.kind = BE_IN_RMSNORM, .w = w, .eps = eps, .out = xn};
        mm_transform(&in, x, n_tok, dim);
        assert_memory_equal(xn, y, sizeof(float) * (size_t)n_tok * dim);
        free(xn);
    }
    free(x);
    free(w);
    if (!in_place)
        free(y);
    free(ref);
}

static void test_rmsnorm(void **state)
{
    FOR_EACH_ISA(isa) {
        check_rmsnorm(1, 576, false);
        check_rmsnorm(3, 100, true);   /* dim not a multiple of the vector width */
        check_rmsnorm(80, 576, false); /* threaded */
    }
}

/* The SwiGLU is matmul_n's input transform: silu(gate) * up is stored in in.out, and the product
 * is that of what was stored. */
static void check_swiglu(int n_tok, int dim)
{
    size_t n = (size_t)n_tok * dim;
    float *g = rand_vec(n, 12.0f), *u = rand_vec(n, 3.0f), *o = malloc(sizeof(float) * n);
    g[0] = 95.0f; /* exp overflow/underflow edges */
    g[1 % n] = -95.0f;
    double *ref = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++)
        ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    const be_mm_in in = {.kind = BE_IN_SWIGLU, .up = u, .out = o};
    mm_transform(&in, g, n_tok, dim);
    for (size_t i = 0; i < n; i++) {
        double tol = 2e-6 * fabs(ref[i]) + 1e-6;
        if (!(fabs(o[i] - ref[i]) <= tol))
            fail_msg("swiglu[%zu]: %g vs %g", i, o[i], ref[i]);
    }
    free(g);
    free(u);
    free(o);
    free(ref);
}

static void test_swiglu(void **state)
{
    FOR_EACH_ISA(isa) {
        check_swiglu(1, 1536);
        check_swiglu(3, 13);
        check_swiglu(40, 1536); /* threaded */
    }
}

/* ------------------------------------------------------------------ rope */

/* RoPE is part of the attention op: q and k come back rotated in place. Every token is its own
 * sequence here, so positions can be far apart (up to 5000) and the output is a real attention. */
static void rope_ref(const float *x, const int32_t *pos, int n_tok, int n_heads, int hd, const float *freq,
                     double *ref)
{
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < hd / 2; i++) {
                size_t o = ((size_t)t * n_heads + h) * hd + 2 * i;
                double a = (double)pos[t] * freq[i], c = cos(a), s = sin(a);
                ref[o] = x[o] * c - x[o + 1] * s;
                ref[o + 1] = x[o] * s + x[o + 1] * c;
            }
}

static void rope_attn(float *q, float *k, const int32_t *pos, int n_tok, int n_heads, int n_kv, int hd,
                      const float *freq, int rc_want)
{
    const int max_blocks = 5000 / BE_KV_BLOCK + 1;
    int32_t *seq = malloc(sizeof(int32_t) * (size_t)n_tok), *slot = malloc(sizeof(int32_t) * (size_t)n_tok);
    int32_t *len = malloc(sizeof(int32_t) * (size_t)n_tok);
    int32_t *table = malloc(sizeof(int32_t) * (size_t)n_tok * max_blocks);
    for (int t = 0; t < n_tok; t++) {
        seq[t] = t;
        len[t] = pos[t] + 1;
        slot[t] = pos[t]; /* table rows are the identity: positions are distinct */
        for (int i = 0; i < max_blocks; i++)
            table[t * max_blocks + i] = i;
    }
    void *kc, *vc;
    assert_int_equal(B->ops->kv_alloc(B, max_blocks, n_kv, hd, &kc, &vc), 0);
    float *v = rand_vec((size_t)n_tok * n_kv * hd, 1.0f), *o = malloc(sizeof(float) * (size_t)n_tok * n_heads * hd);
    be_attn_meta m = {.n_tok = n_tok, .n_seq = n_tok, .pos = pos, .tok_seq = seq, .slot = slot,
                      .seq_len = len, .block_table = table, .max_blocks = max_blocks};
    assert_int_equal(B->ops->attention(B, &m, q, k, v, kc, vc, n_heads, n_kv, hd, freq, o), rc_want);
    B->ops->free(B, kc);
    B->ops->free(B, vc);
    free(v);
    free(o);
    free(seq);
    free(slot);
    free(len);
    free(table);
}

static void check_rope(int n_tok, int n_heads, int hd, const float *freq)
{
    int n_kv = n_heads % 3 == 0 ? n_heads / 3 : n_heads;
    size_t n = (size_t)n_tok * n_heads * hd, nk = (size_t)n_tok * n_kv * hd;
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n_tok);
    double *ref = malloc(sizeof(double) * n), *refk = malloc(sizeof(double) * nk);
    for (int t = 0; t < n_tok; t++) { /* distinct positions below 5000 */
        bool dup;
        do {
            pos[t] = (int32_t)(rnd() % 5000);
            dup = false;
            for (int u = 0; u < t; u++)
                dup = dup || pos[u] == pos[t];
        } while (dup);
    }
    /* twice with other data: the backend may reuse its cos/sin table for the same positions */
    for (int rep = 0; rep < 2; rep++) {
        float *x = rand_vec(n, 4.0f), *k = rand_vec(nk, 4.0f);
        rope_ref(x, pos, n_tok, n_heads, hd, freq, ref);
        rope_ref(k, pos, n_tok, n_kv, hd, freq, refk);
        rope_attn(x, k, pos, n_tok, n_heads, n_kv, hd, freq, 0);
        double e = max_err(x, ref, n), ek = max_err(k, refk, nk);
        if (e > 1e-5 || ek > 1e-5)
            fail_msg("rope %d tok %d heads hd %d: max err q %g k %g", n_tok, n_heads, hd, e, ek);
        free(x);
        free(k);
    }
    free(pos);
    free(ref);
    free(refk);
}

static void test_rope(void **state)
{
    float freq[64], freq2[64];
    for (int i = 0; i < 32; i++) {
        freq[i] = (float)pow(10000.0, -2.0 * i / 64);
        freq2[i] = freq[i] / (i < 8 ? 1.0f : 8.0f); /* a scaled table, same positions */
    }
    check_rope(1, 9, 64, freq);
    check_rope(1, 9, 64, freq2);
    check_rope(5, 3, 64, freq);
    check_rope(70, 9, 64, freq2); /* threaded */
    float f6[3] = {1.0f, 0.1f, 0.01f};
    check_rope(4, 2, 6, f6);
    float x[4] = {0}, k[4] = {0};
    int32_t p = 0;
    rope_attn(x, k, &p, 1, 1, 1, 3, f6, HY_EINVAL); /* odd head_dim */
}

/* ------------------------------------------------------------------ attention */

typedef struct {
    int n_heads, n_kv, hd;
    int n_seq;
    int len_before[3]; /* positions already in the cache */
    int n_new[3];      /* tokens of this step */
} attn_case;

static float f16r(float x) { return q_f16_to_f32(q_f32_to_f16(x)); }

static void check_attention(const attn_case *c)
{
    const int MB = 16, n_blocks = 64;
    int H = c->n_heads, KV = c->n_kv, hd = c->hd;
    size_t qd = (size_t)H * hd, kvd = (size_t)KV * hd;
    /* scattered, disjoint block tables from a shuffled pool */
    int32_t perm[64], table[3 * 16];
    for (int i = 0; i < n_blocks; i++)
        perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int s = 0; s < c->n_seq; s++)
        for (int k = 0; k < MB; k++)
            table[s * MB + k] = perm[s * MB + k];
    void *kc, *vc;
    assert_int_equal(B->ops->kv_alloc(B, n_blocks, KV, hd, &kc, &vc), 0);
    /* full K/V history per sequence in fp32 (the reference's copy) */
    int total[3];
    float *hk[3], *hv[3];
    for (int s = 0; s < c->n_seq; s++) {
        total[s] = c->len_before[s] + c->n_new[s];
        assert_true(total[s] <= MB * 16);
        hk[s] = rand_vec((size_t)total[s] * kvd, 2.0f);
        hv[s] = rand_vec((size_t)total[s] * kvd, 2.0f);
    }
    /* earlier steps: write the history through the op itself, one sequence at a time */
    for (int s = 0; s < c->n_seq; s++) {
        int n = c->len_before[s];
        if (n == 0)
            continue;
        int32_t *pos = malloc(sizeof(int32_t) * n), *seq = calloc((size_t)n, sizeof(int32_t));
        int32_t *slot = malloc(sizeof(int32_t) * n), len = n;
        for (int p = 0; p < n; p++) {
            pos[p] = p;
            slot[p] = table[s * MB + p / 16] * 16 + p % 16;
        }
        float *q = rand_vec((size_t)n * qd, 1.0f), *o = malloc(sizeof(float) * (size_t)n * qd);
        be_attn_meta m = {.n_tok = n, .n_seq = 1, .pos = pos, .tok_seq = seq, .slot = slot,
                          .seq_len = &len, .block_table = table + s * MB, .max_blocks = MB};
        assert_int_equal(B->ops->attention(B, &m, q, hk[s], hv[s], kc, vc, H, KV, hd, NULL, o), 0);
        free(pos);
        free(seq);
        free(slot);
        free(q);
        free(o);
    }
    /* this step: all sequences' new tokens in one batch */
    int n_tok = 0;
    for (int s = 0; s < c->n_seq; s++)
        n_tok += c->n_new[s];
    int32_t *pos = malloc(sizeof(int32_t) * n_tok), *seq = malloc(sizeof(int32_t) * n_tok);
    int32_t *slot = malloc(sizeof(int32_t) * n_tok), seq_len[3];
    float *q = rand_vec((size_t)n_tok * qd, 1.5f);
    float *k = malloc(sizeof(float) * (size_t)n_tok * kvd), *v = malloc(sizeof(float) * (size_t)n_tok * kvd);
    float *out = malloc(sizeof(float) * (size_t)n_tok * qd);
    double *ref = malloc(sizeof(double) * (size_t)n_tok * qd);
    int t = 0;
    for (int s = 0; s < c->n_seq; s++) {
        seq_len[s] = total[s];
        for (int i = 0; i < c->n_new[s]; i++, t++) {
            int p = c->len_before[s] + i;
            pos[t] = p;
            seq[t] = s;
            slot[t] = table[s * MB + p / 16] * 16 + p % 16;
            memcpy(k + t * kvd, hk[s] + p * kvd, sizeof(float) * kvd);
            memcpy(v + t * kvd, hv[s] + p * kvd, sizeof(float) * kvd);
        }
    }
    /* reference: causal GQA over fp16-rounded history, softmax in double */
    double *sc = malloc(sizeof(double) * MB * 16);
    for (t = 0; t < n_tok; t++) {
        int s = seq[t];
        for (int h = 0; h < H; h++) {
            int kh = h / (H / KV);
            const float *qq = q + t * qd + h * hd;
            double mx = -INFINITY, z = 0;
            for (int p = 0; p <= pos[t]; p++) {
                double d = 0;
                for (int i = 0; i < hd; i++)
                    d += (double)qq[i] * f16r(hk[s][p * kvd + kh * hd + i]);
                sc[p] = d / sqrt((double)hd);
                mx = sc[p] > mx ? sc[p] : mx;
            }
            for (int p = 0; p <= pos[t]; p++)
                z += (sc[p] = exp(sc[p] - mx));
            for (int i = 0; i < hd; i++) {
                double acc = 0;
                for (int p = 0; p <= pos[t]; p++)
                    acc += sc[p] * f16r(hv[s][p * kvd + kh * hd + i]);
                ref[t * qd + h * hd + i] = acc / z;
            }
        }
    }
    be_attn_meta m = {.n_tok = n_tok, .n_seq = c->n_seq, .pos = pos, .tok_seq = seq, .slot = slot,
                      .seq_len = seq_len, .block_table = table, .max_blocks = MB};
    assert_int_equal(B->ops->attention(B, &m, q, k, v, kc, vc, H, KV, hd, NULL, out), 0);
    double e = max_err(out, ref, (size_t)n_tok * qd);
    if (e > 2e-5)
        fail_msg("attention (H %d KV %d hd %d, %d tokens): max err %g", H, KV, hd, n_tok, e);
    /* the cache now holds this step's K/V (fp16) in the tokens' slots */
    for (t = 0; t < n_tok; t++)
        for (size_t i = 0; i < kvd; i++)
            assert_true(((uint16_t *)kc)[slot[t] * kvd + i] == q_f32_to_f16(k[t * kvd + i]));
    B->ops->free(B, kc);
    B->ops->free(B, vc);
    for (int s = 0; s < c->n_seq; s++) {
        free(hk[s]);
        free(hv[s]);
    }
    free(pos);
    free(seq);
    free(slot);
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    free(sc);
}

static void test_attention(void **state)
{
    const attn_case cases[] = {
        /* 3 sequences: fresh prefill, a chunk after history, one decode token (GQA 9/3) */
        {9, 3, 64, 3, {0, 30, 69}, {5, 7, 1}},
        {8, 2, 64, 3, {16, 0, 200}, {17, 1, 1}}, /* block boundaries, long history: threaded */
        {4, 4, 20, 3, {3, 40, 0}, {2, 1, 33}},   /* head_dim not a multiple of 8: scalar path */
        {6, 1, 32, 1, {0}, {1}},                 /* a single position */
        {10, 2, 64, 2, {40, 3}, {1, 1}},         /* 5 query heads per KV head (chunks 4 + 1) */
        {9, 1, 32, 3, {0, 20, 50}, {20, 1, 1}},  /* 9 per KV head, prefill and decode */
    };
    FOR_EACH_ISA(isa) {
        for (size_t i = 0; i < HY_ARRAY_LEN(cases); i++)
            check_attention(&cases[i]);
    }
}

/* A sequence's decode token gives bit-identical output alone and in a batch with other
 * sequences' tokens (the op may group heads differently for different batch shapes). */
static void test_attention_batch_invariant(void **state)
{
    enum { H = 9, KV = 3, HD = 64, NB = 32, MB = 8, NS = 3 };
    const int hist[NS] = {70, 33, 5}, n_new[NS] = {1, 6, 1};
    size_t qd = (size_t)H * HD, kvd = (size_t)KV * HD;
    int32_t table[NS * MB];
    for (int i = 0; i < NS * MB; i++)
        table[i] = (i * 7 + 3) % NB; /* disjoint and scattered: 7 is prime to 32 */
    void *kc, *vc;
    assert_int_equal(B->ops->kv_alloc(B, NB, KV, HD, &kc, &vc), 0);
    float *k = rand_vec(128 * kvd, 2.0f), *v = rand_vec(128 * kvd, 2.0f);
    float *q = rand_vec(128 * qd, 1.5f); /* the history prefills read up to 70 rows */
    float *o = malloc(sizeof(float) * 128 * qd), *alone = malloc(sizeof(float) * qd);
    int32_t pos[128], seq[128], slot[128], len[NS];
    for (int s = 0; s < NS; s++) {
        for (int p = 0; p < hist[s]; p++) {
            pos[p] = p;
            seq[p] = 0;
            slot[p] = table[s * MB + p / 16] * 16 + p % 16;
        }
        len[0] = hist[s];
        be_attn_meta m = {.n_tok = hist[s], .n_seq = 1, .pos = pos, .tok_seq = seq, .slot = slot,
                          .seq_len = len, .block_table = table + s * MB, .max_blocks = MB};
        assert_int_equal(B->ops->attention(B, &m, q, k, v, kc, vc, H, KV, HD, NULL, o), 0);
    }
    /* sequence 0's next token alone (its K/V rows are the ones the batch writes again) */
    pos[0] = hist[0];
    seq[0] = 0;
    slot[0] = table[hist[0] / 16] * 16 + hist[0] % 16;
    len[0] = hist[0] + 1;
    be_attn_meta m1 = {.n_tok = 1, .n_seq = 1, .pos = pos, .tok_seq = seq, .slot = slot,
                       .seq_len = len, .block_table = table, .max_blocks = MB};
    assert_int_equal(B->ops->attention(B, &m1, q, k, v, kc, vc, H, KV, HD, NULL, alone), 0);
    /* then in a batch: all sequences' new tokens, sequence 0's token first with the same
     * q/k/v rows */
    int t = 0;
    for (int s = 0; s < NS; s++) {
        len[s] = hist[s] + n_new[s];
        for (int i = 0; i < n_new[s]; i++, t++) {
            pos[t] = hist[s] + i;
            seq[t] = s;
            slot[t] = table[s * MB + pos[t] / 16] * 16 + pos[t] % 16;
        }
    }
    be_attn_meta mb = {.n_tok = t, .n_seq = NS, .pos = pos, .tok_seq = seq, .slot = slot,
                       .seq_len = len, .block_table = table, .max_blocks = MB};
    assert_int_equal(B->ops->attention(B, &mb, q, k, v, kc, vc, H, KV, HD, NULL, o), 0);
    if (memcmp(o, alone, sizeof(float) * qd))
        fail_msg("decode token: batched output differs from the token alone");
    B->ops->free(B, kc);
    B->ops->free(B, vc);
    free(k);
    free(v);
    free(q);
    free(o);
    free(alone);
}

/* ------------------------------------------------------------------ matmul, embed */

/* Random valid blocks of a quantised type: scales in a sane range, any quant bytes. */
static void *rand_weight(uint32_t type, int64_t rows, int64_t cols)
{
    size_t rb;
    assert_int_equal(q_row_bytes(type, cols, &rb), 0);
    uint8_t *w = malloc(rb * (size_t)rows);
    assert_non_null(w);
    for (size_t i = 0; i < rb * (size_t)rows; i++)
        w[i] = (uint8_t)rnd();
    int64_t nb = cols / q_block_elems(type);
    size_t bb = q_block_bytes(type);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = w + rb * (size_t)r + bb * (size_t)b;
            uint16_t d = q_f32_to_f16(0.01f + 0.02f * fabsf(frand())), mn = q_f32_to_f16(-0.1f * fabsf(frand()));
            switch (type) {
            case Q_Q8_0:
            case Q_Q4_0: memcpy(blk, &d, 2); break;
            case Q_Q4_1: memcpy(blk, &d, 2); memcpy(blk + 2, &mn, 2); break;
            case Q_F32:
                for (int j = 0; j < 1; j++) {
                    float f = frand();
                    memcpy(blk, &f, 4);
                }
                break;
            case Q_F16: memcpy(blk, &d, 2); break;
            default: fail_msg("rand_weight: type %u not handled", type);
            }
        }
    return w;
}

static void check_matmul(uint32_t type, int64_t rows, int64_t cols, int n_tok)
{
    void *wd = rand_weight(type, rows, cols);
    be_weight *w;
    assert_int_equal(B->ops->weight_create(B, type, rows, cols, wd, &w), 0);
    float *x = rand_vec((size_t)n_tok * cols, 1.0f), *y = malloc(sizeof(float) * (size_t)n_tok * rows);
    double *ref = malloc(sizeof(double) * (size_t)n_tok * rows);
    float *row = malloc(sizeof(float) * (size_t)cols);
    size_t rb;
    q_row_bytes(type, cols, &rb);
    for (int64_t r = 0; r < rows; r++) {
        q_dequant_row(type, (uint8_t *)wd + rb * (size_t)r, row, cols);
        for (int t = 0; t < n_tok; t++) {
            double acc = 0;
            for (int64_t c = 0; c < cols; c++)
                acc += (double)row[c] * x[t * cols + c];
            ref[t * rows + r] = acc;
        }
    }
    assert_int_equal(B->ops->matmul(B, w, x, n_tok, y), 0);
    if (type == Q_F32 || type == Q_F16) { /* float types are exact-ish */
        double e = rel_err(y, ref, (size_t)n_tok * rows);
        if (e > 1e-6)
            fail_msg("matmul %s %lld x %lld, %d tokens: rel err %g", q_type_name(type), (long long)rows,
                     (long long)cols, n_tok, e);
    } else {
        /* quantised types multiply 8-bit activations (blocks of 32, scale amax / 127): each
         * activation is off by at most half a step, so |y - ref| <= sum_c |w_c| amax_c / 254
         * (+ fp32 rounding). A bound per output, not a relative error over a few noisy outputs
         * (8 outputs of 64 columns exceeded a 1.5 % relative bound about once in 25 runs). */
        for (int64_t r = 0; r < rows; r++) {
            q_dequant_row(type, (uint8_t *)wd + rb * (size_t)r, row, cols);
            for (int t = 0; t < n_tok; t++) {
                const float *xt = x + (size_t)t * cols;
                double bound = 0, mag = 0;
                for (int64_t c0 = 0; c0 < cols; c0 += 32) {
                    double amax = 0, wsum = 0;
                    for (int64_t c = c0; c < c0 + 32 && c < cols; c++) {
                        amax = fmax(amax, fabs(xt[c]));
                        wsum += fabs(row[c]);
                        mag += fabs((double)row[c] * xt[c]);
                    }
                    bound += wsum * amax / 254.0;
                }
                bound = bound * 1.001 + 1e-5 * mag;
                double d = fabs(y[t * rows + r] - ref[t * rows + r]);
                if (!(d <= bound))
                    fail_msg("matmul %s %lld x %lld, token %d row %lld: off by %g, bound %g", q_type_name(type),
                             (long long)rows, (long long)cols, t, (long long)r, d, bound);
            }
        }
        /* and typically ~0.5 % overall, which many outputs measure stably */
        double e = rel_err(y, ref, (size_t)n_tok * rows);
        if (rows * n_tok >= 64 && e > 1.5e-2)
            fail_msg("matmul %s %lld x %lld, %d tokens: rel err %g", q_type_name(type), (long long)rows,
                     (long long)cols, n_tok, e);
    }
    B->ops->weight_free(B, w);
    free(wd);
    free(x);
    free(y);
    free(ref);
    free(row);
}

static void test_matmul(void **state)
{
    const uint32_t types[] = {Q_Q4_1, Q_Q8_0, Q_Q4_0, Q_F32, Q_F16};
    FOR_EACH_ISA(isa) {
        for (size_t i = 0; i < HY_ARRAY_LEN(types); i++) {
            check_matmul(types[i], 8, 64, 1);     /* too small to thread */
            check_matmul(types[i], 100, 256, 1);  /* rows not a multiple of 16 */
            check_matmul(types[i], 192, 576, 70); /* token tiles + threaded quantising */
        }
    }
}

/* matmul_n == n separate matmul calls, bit for bit: same and mixed types, shapes whose row
 * chunks do not line up with the matrices, one token (no threads for small ones) and many. */
static void check_matmul_n(const uint32_t *types, const int64_t *rows, int n, int64_t cols, int n_tok)
{
    be_weight *w[BE_MM_MAX];
    void *wd[BE_MM_MAX];
    float *y[BE_MM_MAX], *ref[BE_MM_MAX];
    float *x = rand_vec((size_t)n_tok * cols, 1.0f);
    for (int i = 0; i < n; i++) {
        wd[i] = rand_weight(types[i], rows[i], cols);
        assert_int_equal(B->ops->weight_create(B, types[i], rows[i], cols, wd[i], &w[i]), 0);
        size_t ny = (size_t)n_tok * rows[i];
        y[i] = malloc(sizeof(float) * ny);
        ref[i] = malloc(sizeof(float) * ny);
        for (size_t k = 0; k < ny; k++)
            y[i][k] = NAN; /* every output must be written */
        assert_int_equal(B->ops->matmul(B, w[i], x, n_tok, ref[i]), 0);
    }
    assert_int_equal(B->ops->matmul_n(B, n, (const be_weight *const *)w, x, NULL, n_tok, y, false), 0);
    for (int i = 0; i < n; i++)
        if (memcmp(y[i], ref[i], sizeof(float) * (size_t)n_tok * rows[i]))
            fail_msg("matmul_n: matrix %d of %d (%s, %lld x %lld), %d tokens differs from matmul", i, n,
                     q_type_name(types[i]), (long long)rows[i], (long long)cols, n_tok);
    /* add: y += W x onto a random y, the exact float sum (threaded adds for large outputs) */
    float *base[BE_MM_MAX];
    for (int i = 0; i < n; i++) {
        size_t ny = (size_t)n_tok * rows[i];
        base[i] = rand_vec(ny, 3.0f);
        memcpy(y[i], base[i], sizeof(float) * ny);
    }
    assert_int_equal(B->ops->matmul_n(B, n, (const be_weight *const *)w, x, NULL, n_tok, y, true), 0);
    for (int i = 0; i < n; i++) {
        for (size_t k = 0; k < (size_t)n_tok * rows[i]; k++)
            if (y[i][k] != base[i][k] + ref[i][k])
                fail_msg("matmul_n add: matrix %d output %zu is %g, not %g + %g", i, k, y[i][k], base[i][k],
                         ref[i][k]);
        free(base[i]);
        B->ops->weight_free(B, w[i]);
        free(wd[i]);
        free(y[i]);
        free(ref[i]);
    }
    free(x);
}

static void test_matmul_n(void **state)
{
    static const uint32_t same[] = {Q_Q4_1, Q_Q4_1, Q_Q4_1}, mixed[] = {Q_Q8_0, Q_Q4_1, Q_F16};
    static const int64_t qkv[] = {576, 192, 192}, odd[] = {100, 17, 250}, ffn[] = {1536, 1536};
    FOR_EACH_ISA(isa) {
        for (int n_tok = 1; n_tok <= 70; n_tok += 69) {
            check_matmul_n(same, qkv, 3, 576, n_tok);
            check_matmul_n(same, odd, 3, 256, n_tok);
            check_matmul_n(same, ffn, 2, 576, n_tok);
            check_matmul_n(same, odd, 1, 64, n_tok);
            check_matmul_n(mixed, qkv, 3, 576, n_tok);
        }
    }
    /* n outside 1..BE_MM_MAX */
    float x[64] = {0}, *y[4] = {x, x, x, x};
    const be_weight *w[4] = {NULL, NULL, NULL, NULL};
    assert_int_equal(B->ops->matmul_n(B, 0, w, x, NULL, 1, y, false), HY_EINVAL);
    assert_int_equal(B->ops->matmul_n(B, 4, w, x, NULL, 1, y, true), HY_EINVAL);
}

static void test_embed(void **state)
{
    const int64_t rows = 50, cols = 96;
    void *wd = rand_weight(Q_Q8_0, rows, cols);
    be_weight *w;
    assert_int_equal(B->ops->weight_create(B, Q_Q8_0, rows, cols, wd, &w), 0);
    int32_t ids[4] = {49, 0, 7, 7};
    float out[4 * 96], row[96];
    assert_int_equal(B->ops->embed(B, w, ids, 4, out), 0);
    size_t rb;
    q_row_bytes(Q_Q8_0, cols, &rb);
    for (int t = 0; t < 4; t++) {
        q_dequant_row(Q_Q8_0, (uint8_t *)wd + rb * (size_t)ids[t], row, cols);
        assert_memory_equal(out + t * cols, row, sizeof row);
    }
    ids[2] = 50;
    assert_int_equal(B->ops->embed(B, w, ids, 4, out), HY_EINVAL);
    B->ops->weight_free(B, w);
    assert_int_equal(B->ops->weight_create(B, 77, rows, cols, wd, &w), HY_EUNSUPPORTED);
    free(wd);
}

static void test_memory(void **state)
{
    uint8_t *p;
    assert_int_equal(B->ops->alloc(B, 1000, (void **)&p), 0);
    assert_true(((uintptr_t)p & 63) == 0);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(p[i], 0);
    uint8_t src[100], dst[100];
    for (int i = 0; i < 100; i++)
        src[i] = (uint8_t)rnd();
    assert_int_equal(B->ops->upload(B, p, src, 100), 0);
    assert_int_equal(B->ops->download(B, dst, p, 100), 0);
    assert_memory_equal(src, dst, 100);
    assert_int_equal(B->ops->sync(B), 0);
    B->ops->free(B, p);
    void *k, *v;
    assert_int_equal(B->ops->kv_alloc(B, 0, 3, 64, &k, &v), HY_EINVAL);
    assert_int_equal(B->ops->kv_alloc(B, INT32_MAX, 1 << 20, 1 << 12, &k, &v), HY_ELIMIT);
    assert_string_equal(B->ops->name, "cpu");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_batch_invariant),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_n),
        cmocka_unit_test(test_embed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
