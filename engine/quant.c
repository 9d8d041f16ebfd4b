/* quant.c - ggml tensor types on the CPU: sizes, fp16/bf16 conversion, dequantisation (bit-exact
 * with the gguf Python package) and the scalar reference of the quantised matrix product, plus
 * the run-time choice of the SIMD paths (quant_avx2.c, quant_avx512.c). No threading, no I/O. */
#include "quant.h"

#include "hy.h"

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>



/* ---------------------------------------------------------------------------------------- */
/* Type table. */

typedef struct {
    uint32_t type;
    const char *name;
    int64_t blk;
    size_t bytes;
} q_info;

static const q_info q_types[] = {
    {Q_F32, "F32", 1, 4},          {Q_F16, "F16", 1, 2},
    {Q_BF16, "BF16", 1, 2},        {Q_Q8_0, "Q8_0", 32, 34},
    {Q_Q4_0, "Q4_0", 32, 18},      {Q_Q4_1, "Q4_1", 32, 20},
    {Q_Q4_K, "Q4_K", 256, 144},    {Q_Q6_K, "Q6_K", 256, 210},
};

static const q_info *q_find(uint32_t type)
{
    for (size_t i = 0; i < HY_ARRAY_LEN(q_types); i++)
        if (q_types[i].type == type)
            return &q_types[i];
    return NULL;
}

bool q_supported(uint32_t type) { return q_find(type) != NULL; }

const char *q_type_name(uint32_t type)
{
    static _Thread_local char buf[32];
    const q_info *qi = q_find(type);
    if (qi)
        return qi->name;
    snprintf(buf, sizeof buf, "type %u", (unsigned)type);
    return buf;
}

int64_t q_block_elems(uint32_t type)
{
    const q_info *qi = q_find(type);
    return qi ? qi->blk : 0;
}

size_t q_block_bytes(uint32_t type)
{
    const q_info *qi = q_find(type);
    return qi ? qi->bytes : 0;
}

int q_row_bytes(uint32_t type, int64_t n, size_t *out)
{
    const q_info *qi = q_find(type);
    if (!qi)
        return hy_err_set(HY_EUNSUPPORTED, "tensor type %s is not supported", q_type_name(type));
    if (n < 0 || n % qi->blk != 0)
        return hy_err_set(HY_EFORMAT, "row of %lld elements is not a whole number of %s blocks (%lld)",
                          (long long)n, qi->name, (long long)qi->blk);
    if (hy_mul_size((size_t)(n / qi->blk), qi->bytes, out) != 0)
        return hy_err_set(HY_EFORMAT, "row of %lld %s elements is too large", (long long)n, qi->name);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* fp16 / bf16. */

static inline uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float q_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 is exact in fp32 */
        float v = (float)man * 0x1p-24f;
        return u2f(f2u(v) | sign);
    }
    if (exp == 31)
        return u2f(sign | 0x7f800000u | man << 13);
    return u2f(sign | (exp + 112) << 23 | man << 13);
}

uint16_t q_f32_to_f16(float f)
{
    uint32_t x = f2u(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) /* NaN: keep it quiet and keep the top payload bits */
        return (uint16_t)(sign | 0x7e00 | ((x >> 13) & 0x3ff));
    if (x >= 0x477ff000u) /* >= 65520 rounds to infinity (and inf stays inf) */
        return (uint16_t)(sign | 0x7c00);
    if (x < 0x38800000u) {
        /* below the smallest normal half: adding 0.5 puts the value on the half-subnormal
         * grid (ulp 2^-24) and lets the FPU round to nearest even */
        float v = u2f(x) + 0.5f;
        return (uint16_t)(sign | (f2u(v) - 0x3f000000u));
    }
    uint32_t odd = (x >> 13) & 1;
    x += 0xc8000fffu + odd; /* rebias the exponent (-112 << 23) and round to nearest even */
    return (uint16_t)(sign | (x >> 13));
}

float q_f16_pow2(const float *const *parts, int n_parts, size_t n)
{
    float mx = 0.0f;
    for (int p = 0; p < n_parts; p++)
        for (size_t i = 0; i < n; i++) {
            float a = fabsf(parts[p][i]);
            if (a > mx && isfinite(a))
                mx = a;
        }
    if (mx == 0.0f)
        return 1.0f;
    int e = 0;
    (void)frexpf(mx, &e); /* mx = m 2^e, m in [0.5, 1): mx < 2^e */
    return ldexpf(1.0f, HY_MAX(-40, HY_MIN(40, 14 - e)));
}

float q_bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

uint16_t q_f32_to_bf16(float f)
{
    uint32_t x = f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

/* ---------------------------------------------------------------------------------------- */
/* Dequantisation: the float operations and their order follow gguf/quants.py exactly. */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline float rdh(const uint8_t *p) { return q_f16_to_f32(rd16(p)); }

/* Q4_K packs eight 6-bit scales and mins in 12 bytes. */
void q_k4_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0f) | (s[j] >> 6) << 4);
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4);
    }
}

static void dq_q8_0(const uint8_t *b, float *y)
{
    float d = rdh(b);
    for (int j = 0; j < 32; j++)
        y[j] = (float)(int8_t)b[2 + j] * d;
}

static void dq_q4_0(const uint8_t *b, float *y)
{
    float d = rdh(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((b[2 + j] & 0x0f) - 8);
        y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void dq_q4_1(const uint8_t *b, float *y)
{
    float d = rdh(b), m = rdh(b + 2);
    for (int j = 0; j < 16; j++) {
        float lo = d * (float)(b[4 + j] & 0x0f), hi = d * (float)(b[4 + j] >> 4);
        y[j] = lo + m; /* two roundings, as numpy does: no fused multiply-add */
        y[j + 16] = hi + m;
    }
}

static void dq_q4_k(const uint8_t *b, float *y)
{
    float d = rdh(b), dmin = rdh(b + 2);
    uint8_t sc[8], mn[8];
    q_k4_scale_min(b + 4, sc, mn);
    const uint8_t *q = b + 16;
    for (int g = 0; g < 4; g++) {
        float d1 = d * (float)sc[2 * g], m1 = dmin * (float)mn[2 * g];
        float d2 = d * (float)sc[2 * g + 1], m2 = dmin * (float)mn[2 * g + 1];
        for (int l = 0; l < 32; l++) {
            float a = d1 * (float)(q[32 * g + l] & 0x0f), c = d2 * (float)(q[32 * g + l] >> 4);
            y[64 * g + l] = a - m1;
            y[64 * g + 32 + l] = c - m2;
        }
    }
}

static void dq_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = rdh(b + 208);
    for (int n = 0; n < 2; n++) {
        const uint8_t *L = ql + 64 * n, *H = qh + 32 * n;
        const int8_t *S = sc + 8 * n;
        float *o = y + 128 * n;
        for (int l = 0; l < 32; l++) {
            int i = l / 16;
            int q1 = ((L[l] & 0xf) | ((H[l] >> 0) & 3) << 4) - 32;
            int q2 = ((L[l + 32] & 0xf) | ((H[l] >> 2) & 3) << 4) - 32;
            int q3 = ((L[l] >> 4) | ((H[l] >> 4) & 3) << 4) - 32;
            int q4 = ((L[l + 32] >> 4) | ((H[l] >> 6) & 3) << 4) - 32;
            o[l] = (d * (float)S[i]) * (float)q1;
            o[l + 32] = (d * (float)S[i + 2]) * (float)q2;
            o[l + 64] = (d * (float)S[i + 4]) * (float)q3;
            o[l + 96] = (d * (float)S[i + 6]) * (float)q4;
        }
    }
}

void q_dequant_row(uint32_t type, const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    switch (type) {
    case Q_F32:
        memcpy(dst, src, (size_t)n * 4);
        return;
    case Q_F16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = q_f16_to_f32(rd16(p + 2 * i));
        return;
    case Q_BF16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = q_bf16_to_f32(rd16(p + 2 * i));
        return;
    case Q_Q8_0:
        for (int64_t i = 0; i < n / 32; i++)
            dq_q8_0(p + 34 * i, dst + 32 * i);
        return;
    case Q_Q4_0:
        for (int64_t i = 0; i < n / 32; i++)
            dq_q4_0(p + 18 * i, dst + 32 * i);
        return;
    case Q_Q4_1:
        for (int64_t i = 0; i < n / 32; i++)
            dq_q4_1(p + 20 * i, dst + 32 * i);
        return;
    case Q_Q4_K:
        for (int64_t i = 0; i < n / 256; i++)
            dq_q4_k(p + 144 * i, dst + 256 * i);
        return;
    case Q_Q6_K:
        for (int64_t i = 0; i < n / 256; i++)
            dq_q6_k(p + 210 * i, dst + 256 * i);
        return;
    default:
        return;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* ISA selection. */

static atomic_int q_isa_cur = -1;

bool q_isa_available(q_isa isa)
{
    switch (isa) {
    case Q_ISA_SCALAR:
        return true;
#if defined(__x86_64__)
    case Q_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case Q_ISA_AVX512:
        __builtin_cpu_init();
        return q_isa_available(Q_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    default:
        return false;
    }
}

static q_isa q_isa_best(void)
{
    if (q_isa_available(Q_ISA_AVX512))
        return Q_ISA_AVX512;
    if (q_isa_available(Q_ISA_AVX2))
        return Q_ISA_AVX2;
    return Q_ISA_SCALAR;
}

double q_sum_exp(const float *x, int n, float mx)
{
#if defined(__x86_64__)
    if (q_isa_get() >= Q_ISA_AVX2)
        return q_avx2_sum_exp(x, n, mx);
#endif
    double sum = 0;
    for (int i = 0; i < n; i++) {
        float d = x[i] - mx; /* <= 0, -inf or NaN */
        if (d >= -FLT_MAX)
            sum += exp((double)d);
    }
    return sum;
}

q_isa q_isa_get(void)
{
    int v = atomic_load_explicit(&q_isa_cur, memory_order_relaxed);
    if (v < 0) {
        v = (int)q_isa_best();
        atomic_store_explicit(&q_isa_cur, v, memory_order_relaxed);
    }
    return (q_isa)v;
}

int q_isa_set(q_isa isa)
{
    if (!q_isa_available(isa))
        return hy_err_set(HY_EUNSUPPORTED, "instruction set %s is not available on this CPU",
                          q_isa_name(isa));
    atomic_store_explicit(&q_isa_cur, (int)isa, memory_order_relaxed);
    return 0;
}

const char *q_isa_name(q_isa isa)
{
    switch (isa) {
    case Q_ISA_SCALAR: return "scalar";
    case Q_ISA_AVX2: return "avx2";
    case Q_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Activation formats (see quant_int.h). */

static int q_act_kind(uint32_t type)
{
    switch (type) {
    case Q_Q4_0: case Q_Q4_1: case Q_Q8_0: return Q_ACT_Q8;
    case Q_Q4_K: case Q_Q6_K: return Q_ACT_Q8K;
    default: return Q_ACT_F32;
    }
}

size_t q_act_row_bytes(uint32_t type, int64_t cols)
{
    size_t n = (size_t)cols, b;
    switch (q_act_kind(type)) {
    case Q_ACT_Q8: b = n / 32 * (32 + 8); break;
    case Q_ACT_Q8K: b = n / 256 * (256 + 4 + 32); break;
    default: b = n * 4; break;
    }
    return (b + 63) & ~(size_t)63;
}

size_t q_act_bytes(uint32_t type, int64_t cols, int n_tok)
{
    return q_act_row_bytes(type, cols) * (size_t)(n_tok > 0 ? n_tok : 0);
}

/* Per 32 values: d = amax / 127, q = rne(x * 127 / amax). The SIMD versions reproduce this
 * bit for bit (same operations, same rounding), so every ISA sees the same activations. */
static void act_q8_row(const float *x, int64_t cols, uint8_t *row)
{
    int64_t nb = cols / 32;
    int8_t *qs = (int8_t *)row;
    float *d = (float *)(row + nb * 32), *s = d + nb;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            qs[32 * b + j] = (int8_t)q;
            sum += q;
        }
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)sum;
    }
}

static void act_q8k_row(const float *x, int64_t cols, uint8_t *row)
{
    int64_t nb = cols / 256;
    int8_t *qs = (int8_t *)row;
    float *d = (float *)(row + nb * 256);
    int16_t *bs = (int16_t *)(d + nb);
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 256 * b;
        float amax = 0.0f;
        for (int j = 0; j < 256; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int j = 16 * g; j < 16 * g + 16; j++) {
                int q = (int)nearbyintf(xb[j] * id);
                qs[256 * b + j] = (int8_t)q;
                sum += q;
            }
            bs[16 * b + g] = (int16_t)sum;
        }
        d[b] = amax / 127.0f;
    }
}

void q_act_quantize_scalar(uint32_t type, const float *X, int64_t cols, int n_tok, void *act)
{
    size_t rb = q_act_row_bytes(type, cols);
    for (int t = 0; t < n_tok; t++) {
        uint8_t *row = (uint8_t *)act + rb * (size_t)t;
        const float *x = X + (size_t)t * (size_t)cols;
        switch (q_act_kind(type)) {
        case Q_ACT_Q8: act_q8_row(x, cols, row); break;
        case Q_ACT_Q8K: act_q8k_row(x, cols, row); break;
        default: memcpy(row, x, (size_t)cols * 4); break;
        }
    }
}

void q_act_quantize(uint32_t type, const float *X, int64_t cols, int n_tok, void *act)
{
#if defined(__x86_64__)
    switch (q_isa_get()) {
    case Q_ISA_AVX512:
    case Q_ISA_AVX2: /* activation quantising is not worth a VNNI variant */
        q_avx2_act_quantize(type, X, cols, n_tok, act);
        return;
    default:
        break;
    }
#endif
    q_act_quantize_scalar(type, X, cols, n_tok, act);
}

/* ---------------------------------------------------------------------------------------- */
/* Scalar reference matrix product. */

static float dot_q8(uint32_t type, const uint8_t *w, const uint8_t *arow, int64_t cols)
{
    int64_t nb = cols / 32;
    const int8_t *aq = (const int8_t *)arow;
    const float *ad = (const float *)(arow + nb * 32), *as = ad + nb;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *a = aq + 32 * b;
        int isum = 0;
        if (type == Q_Q8_0) {
            const uint8_t *blk = w + 34 * b;
            for (int j = 0; j < 32; j++)
                isum += (int8_t)blk[2 + j] * a[j];
            acc += rdh(blk) * ad[b] * (float)isum;
        } else if (type == Q_Q4_0) {
            const uint8_t *blk = w + 18 * b;
            for (int j = 0; j < 16; j++)
                isum += ((blk[2 + j] & 0x0f) - 8) * a[j] + ((blk[2 + j] >> 4) - 8) * a[j + 16];
            acc += rdh(blk) * ad[b] * (float)isum;
        } else {
            const uint8_t *blk = w + 20 * b;
            for (int j = 0; j < 16; j++)
                isum += (blk[4 + j] & 0x0f) * a[j] + (blk[4 + j] >> 4) * a[j + 16];
            acc += rdh(blk) * ad[b] * (float)isum + rdh(blk + 2) * as[b];
        }
    }
    return acc;
}

static float dot_q4_k(const uint8_t *w, const uint8_t *arow, int64_t cols)
{
    int64_t nb = cols / 256;
    const int8_t *aq = (const int8_t *)arow;
    const float *ad = (const float *)(arow + nb * 256);
    const int16_t *bs = (const int16_t *)(ad + nb);
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + 144 * b, *q = blk + 16;
        const int8_t *a = aq + 256 * b;
        uint8_t sc[8], mn[8];
        q_k4_scale_min(blk + 4, sc, mn);
        int isum = 0, msum = 0;
        for (int g = 0; g < 4; g++) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += (q[32 * g + l] & 0x0f) * a[64 * g + l];
                hi += (q[32 * g + l] >> 4) * a[64 * g + 32 + l];
            }
            isum += sc[2 * g] * lo + sc[2 * g + 1] * hi;
        }
        for (int j = 0; j < 8; j++)
            msum += mn[j] * (bs[16 * b + 2 * j] + bs[16 * b + 2 * j + 1]);
        acc += rdh(blk) * ad[b] * (float)isum - rdh(blk + 2) * ad[b] * (float)msum;
    }
    return acc;
}

static float dot_q6_k(const uint8_t *w, const uint8_t *arow, int64_t cols)
{
    int64_t nb = cols / 256;
    const int8_t *aq = (const int8_t *)arow;
    const float *ad = (const float *)(arow + nb * 256);
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + 210 * b;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const int8_t *a = aq + 256 * b;
        int isum = 0;
        for (int n = 0; n < 2; n++) {
            const uint8_t *L = blk + 64 * n, *H = blk + 128 + 32 * n;
            const int8_t *A = a + 128 * n;
            int g[8] = {0};
            for (int l = 0; l < 32; l++) {
                int i = l / 16;
                g[i] += (((L[l] & 0xf) | ((H[l] >> 0) & 3) << 4) - 32) * A[l];
                g[i + 2] += (((L[l + 32] & 0xf) | ((H[l] >> 2) & 3) << 4) - 32) * A[l + 32];
                g[i + 4] += (((L[l] >> 4) | ((H[l] >> 4) & 3) << 4) - 32) * A[l + 64];
                g[i + 6] += (((L[l + 32] >> 4) | ((H[l] >> 6) & 3) << 4) - 32) * A[l + 96];
            }
            for (int k = 0; k < 8; k++)
                isum += sc[8 * n + k] * g[k];
        }
        acc += rdh(blk + 208) * ad[b] * (float)isum;
    }
    return acc;
}

static float dot_f(uint32_t type, const uint8_t *w, const float *a, int64_t cols)
{
    float acc = 0.0f;
    for (int64_t c = 0; c < cols; c++) {
        float v;
        if (type == Q_F32)
            memcpy(&v, w + 4 * c, 4);
        else if (type == Q_F16)
            v = q_f16_to_f32(rd16(w + 2 * c));
        else
            v = q_bf16_to_f32(rd16(w + 2 * c));
        acc += v * a[c];
    }
    return acc;
}

void q_matmul_rows_scalar(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                          float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
    size_t wrb = 0, arb = q_act_row_bytes(type, cols);
    if (q_row_bytes(type, cols, &wrb) != 0)
        return;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)W + wrb * (size_t)r;
        for (int t = 0; t < n_tok; t++) {
            const uint8_t *a = (const uint8_t *)act + arb * (size_t)t;
            float v;
            switch (type) {
            case Q_Q4_0: case Q_Q4_1: case Q_Q8_0: v = dot_q8(type, w, a, cols); break;
            case Q_Q4_K: v = dot_q4_k(w, a, cols); break;
            case Q_Q6_K: v = dot_q6_k(w, a, cols); break;
            default: v = dot_f(type, w, (const float *)a, cols); break;
            }
            Y[(size_t)t * (size_t)ldy + (size_t)r] = v;
        }
    }
}

void q_matmul_rows(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                   float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
#if defined(__x86_64__)
    switch (q_isa_get()) {
    case Q_ISA_AVX512:
        q_avx512_matmul_rows(type, W, cols, act, n_tok, Y, ldy, r0, r1);
        return;
    case Q_ISA_AVX2:
        q_avx2_matmul_rows(type, W, cols, act, n_tok, Y, ldy, r0, r1);
        return;
    default:
        break;
    }
#endif
    q_matmul_rows_scalar(type, W, cols, act, n_tok, Y, ldy, r0, r1);
}
