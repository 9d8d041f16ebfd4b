/* quant_avx2.c - AVX2/FMA/F16C activation quantising and quantised matrix products. quant_avx512.c
 * compiles this file a second time with VNNI dot products (QK_INCLUDED). Reached only through
 * quant.c's run-time dispatch: nothing here may run on a CPU that lacks the instructions. */
#if defined(__x86_64__)

#ifndef QK_INCLUDED
#pragma GCC target("avx2,fma,f16c")
#define QK_VNNI 0
#define QK_MATMUL q_avx2_matmul_rows
#endif

#include "quant.h"
#include "vexp_avx2.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define QK_AI __attribute__((always_inline)) static inline
#define QK_CH 64 /* weight blocks per chunk whose scales are staged on the stack */
#define QK_NT 4  /* tokens per tile: each weight block is unpacked once per tile */

QK_AI float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

QK_AI int hsum8i(__m256i v)
{
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1));
    return _mm_cvtsi128_si32(x);
}

QK_AI float ld_h(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

QK_AI __m256i ld256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
QK_AI __m128i ld128(const void *p) { return _mm_loadu_si128((const __m128i *)p); }

/* u8 x s8 -> eight int32 sums of four products */
QK_AI __m256i dot_us(__m256i u, __m256i s)
{
#if QK_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* acc + pairwise products of int16 p and int16 scales */
QK_AI __m256i madd_acc(__m256i acc, __m256i p, __m256i sc)
{
#if QK_VNNI
    return _mm256_dpwssd_epi32(acc, p, sc);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc));
#endif
}

QK_AI float dotf(const float *a, const float *b, int n)
{
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Activation quantising: bit-identical to quant.c's scalar version (same max, same product
 * x * (127 / amax), same round-to-nearest-even conversion). Built once, in the AVX2 object. */
#ifndef QK_INCLUDED

QK_AI float hmax8(__m256 v)
{
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* 32 floats -> 32 int8 (ordered) at dst; returns the eight int32 values' vectors summed */
QK_AI void q8_32(const float *x, __m256 vid, int8_t *dst, __m256i *s01, __m256i *s23)
{
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), vid));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), vid));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), vid));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), vid));
    *s01 = _mm256_add_epi32(i0, i1);
    *s23 = _mm256_add_epi32(i2, i3);
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)dst, p);
}

QK_AI float amax_n(const float *x, int n)
{
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8)
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + j), abs));
    return hmax8(m);
}

static void act_q8_row(const float *x, int64_t cols, uint8_t *row)
{
    int64_t nb = cols / 32;
    int8_t *qs = (int8_t *)row;
    float *d = (float *)(row + nb * 32), *s = d + nb;
    for (int64_t b = 0; b < nb; b++) {
        float amax = amax_n(x + 32 * b, 32);
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256i s01, s23;
        q8_32(x + 32 * b, _mm256_set1_ps(id), qs + 32 * b, &s01, &s23);
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)hsum8i(_mm256_add_epi32(s01, s23));
    }
}

static void act_q8k_row(const float *x, int64_t cols, uint8_t *row)
{
    int64_t nb = cols / 256;
    int8_t *qs = (int8_t *)row;
    float *d = (float *)(row + nb * 256);
    int16_t *bs = (int16_t *)(d + nb);
    for (int64_t b = 0; b < nb; b++) {
        float amax = amax_n(x + 256 * b, 256);
        __m256 vid = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        for (int k = 0; k < 8; k++) {
            __m256i s01, s23;
            q8_32(x + 256 * b + 32 * k, vid, qs + 256 * b + 32 * k, &s01, &s23);
            bs[16 * b + 2 * k] = (int16_t)hsum8i(s01);
            bs[16 * b + 2 * k + 1] = (int16_t)hsum8i(s23);
        }
        d[b] = amax / 127.0f;
    }
}

void q_avx2_act_quantize(uint32_t type, const float *X, int64_t cols, int n_tok, void *act)
{
    size_t rb = q_act_row_bytes(type, cols);
    for (int t = 0; t < n_tok; t++) {
        uint8_t *row = (uint8_t *)act + rb * (size_t)t;
        const float *x = X + (size_t)t * (size_t)cols;
        switch (type) {
        case Q_Q4_0: case Q_Q4_1: case Q_Q8_0: act_q8_row(x, cols, row); break;
        case Q_Q4_K: case Q_Q6_K: act_q8k_row(x, cols, row); break;
        default: memcpy(row, x, (size_t)cols * 4); break;
        }
    }
}
#endif /* QK_INCLUDED */

/* ---------------------------------------------------------------------------------------- */
/* Q4_0, Q4_1, Q8_0 weights against Q8 activations. Per block and token:
 *   y += (dw * da) * dot(u, a) + mw * s     (u: unsigned nibbles; Q4_0: mw = -8 dw; Q8_0: no mw)
 * The mw * s terms of a row are summed at the end as one vector dot product over blocks. */

/* one weight block against NT tokens, accumulated into acc[] */
QK_AI void kq8_blk(const uint32_t WT, const int NT, const uint8_t *q, const float *dwb,
                   const int8_t *const *aq, const float *const *ad, int b, __m256 *acc)
{
    const __m256i m0f = _mm256_set1_epi8(0x0f), sh = _mm256_setr_epi64x(0, 0, 4, 4);
    __m256i w = _mm256_setzero_si256(), u;
    if (WT == Q_Q8_0) {
        w = ld256(q);
        u = _mm256_abs_epi8(w);
    } else {
        u = _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(ld128(q)), sh), m0f);
    }
    __m256 vd = _mm256_broadcast_ss(dwb);
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        __m256i a = ld256(aq[t] + 32 * b);
        if (WT == Q_Q8_0)
            a = _mm256_sign_epi8(a, w);
        __m256 sc = _mm256_mul_ps(vd, _mm256_broadcast_ss(ad[t] + b));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(u, a)), sc, acc[t]);
    }
}

QK_AI void kq8(const uint32_t WT, const int NT, const uint8_t *wb, const float *dw, const float *mw,
               int nc, const uint8_t *a0, size_t arb, int64_t c0, int64_t nb, float *out)
{
    const size_t wbb = WT == Q_Q8_0 ? 34 : WT == Q_Q4_0 ? 18 : 20;
    const size_t qoff = WT == Q_Q4_1 ? 4 : 2;
    const int8_t *aq[QK_NT];
    const float *ad[QK_NT];
    /* two accumulator sets (even and odd blocks) so that one token's chain of dependent
     * multiply-adds does not set the pace */
    __m256 acc0[QK_NT], acc1[QK_NT];
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        const uint8_t *row = a0 + arb * (size_t)t;
        aq[t] = (const int8_t *)row + 32 * c0;
        ad[t] = (const float *)(row + nb * 32) + c0;
        acc0[t] = _mm256_setzero_ps();
        acc1[t] = _mm256_setzero_ps();
    }
    int b = 0;
    for (; b + 1 < nc; b += 2) {
        kq8_blk(WT, NT, wb + wbb * (size_t)b + qoff, dw + b, aq, ad, b, acc0);
        kq8_blk(WT, NT, wb + wbb * (size_t)(b + 1) + qoff, dw + b + 1, aq, ad, b + 1, acc1);
    }
    if (b < nc)
        kq8_blk(WT, NT, wb + wbb * (size_t)b + qoff, dw + b, aq, ad, b, acc0);
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        float m = WT == Q_Q8_0 ? 0.0f : dotf(mw, ad[t] + nb, nc);
        out[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t])) + m;
    }
}

#if QK_VNNI
/* Q4_0/Q4_1 with 512-bit VNNI: two weight blocks per vector. The fp16 (d, m) pairs of both
 * blocks are converted together and multiplied by the tokens' (d, s) pairs in one go:
 * [dA daA, mA sA, dB daB, mB sB]; lanes 0/2 scale the integer sums, lanes 1/3 are the min terms. */
QK_AI void kq8z(const uint32_t WT, const int NT, const uint8_t *wb, int nc, const uint8_t *a0,
                size_t arb, int64_t c0, int64_t nb, float *out)
{
    const size_t wbb = WT == Q_Q4_0 ? 18 : 20, qoff = WT == Q_Q4_1 ? 4 : 2;
    const __m512i m0f = _mm512_set1_epi8(0x0f), sh = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
    const __m512i pidx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m128 m8 = _mm_setr_ps(1.0f, -8.0f, 1.0f, -8.0f);
    const int8_t *aq[QK_NT];
    const float *ad[QK_NT];
    __m512 acc[QK_NT];
    __m128 macc[QK_NT];
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        const uint8_t *row = a0 + arb * (size_t)t;
        aq[t] = (const int8_t *)row + 32 * c0;
        ad[t] = (const float *)(row + nb * 32) + c0;
        acc[t] = _mm512_setzero_ps();
        macc[t] = _mm_setzero_ps();
    }
    int b = 0;
    for (; b + 2 <= nc; b += 2) {
        const uint8_t *pa = wb + wbb * (size_t)b, *pb = pa + wbb;
        __m256i ya = _mm256_broadcastsi128_si256(ld128(pa + qoff));
        __m256i yb = _mm256_broadcastsi128_si256(ld128(pb + qoff));
        __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(ya), yb, 1);
        u = _mm512_and_si512(_mm512_srlv_epi64(u, sh), m0f);
        int32_t xa, xb;
        __m128 dm;
        if (WT == Q_Q4_1) {
            memcpy(&xa, pa, 4);
            memcpy(&xb, pb, 4);
            dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(xa), xb, 1));
        } else {
            uint16_t ha, hb;
            memcpy(&ha, pa, 2);
            memcpy(&hb, pb, 2);
            xa = (int32_t)((uint32_t)ha * 0x10001u);
            xb = (int32_t)((uint32_t)hb * 0x10001u);
            dm = _mm_mul_ps(_mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(xa), xb, 1)), m8);
        }
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++) {
            __m128 da2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(ad[t] + b)));
            __m128 s2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(ad[t] + nb + b)));
            __m128 p = _mm_mul_ps(dm, _mm_unpacklo_ps(da2, s2));
            macc[t] = _mm_add_ps(macc[t], p);
            __m512 sc = _mm512_permutexvar_ps(pidx, _mm512_castps128_ps512(p));
            __m512i a = _mm512_loadu_si512(aq[t] + 32 * b);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, a);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[t]);
        }
    }
    float tail[QK_NT] = {0};
    if (b < nc) {
        const uint8_t *pa = wb + wbb * (size_t)b;
        __m256i u = _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(ld128(pa + qoff)),
                                                       _mm256_setr_epi64x(0, 0, 4, 4)),
                                     _mm256_set1_epi8(0x0f));
        float d = ld_h(pa), m = WT == Q_Q4_1 ? ld_h(pa + 2) : -8.0f * d;
        for (int t = 0; t < NT; t++)
            tail[t] = (float)hsum8i(dot_us(u, ld256(aq[t] + 32 * b))) * (d * ad[t][b]) + m * ad[t][nb + b];
    }
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        __m128 mm = _mm_add_ps(macc[t], _mm_movehl_ps(macc[t], macc[t]));
        out[t] = _mm512_reduce_add_ps(acc[t]) + _mm_cvtss_f32(_mm_movehdup_ps(mm)) + tail[t];
    }
}

#define KQ8Z_TILE(WT)                                                                  \
    switch (nt) {                                                                      \
    case 1: kq8z(WT, 1, wb, nc, a0, arb, c0, nb, out); break;                          \
    case 2: kq8z(WT, 2, wb, nc, a0, arb, c0, nb, out); break;                          \
    case 3: kq8z(WT, 3, wb, nc, a0, arb, c0, nb, out); break;                          \
    default: kq8z(WT, 4, wb, nc, a0, arb, c0, nb, out); break;                         \
    }
#endif

#define KQ8_TILE(WT)                                                                   \
    switch (nt) {                                                                      \
    case 1: kq8(WT, 1, wb, dw, mw, nc, a0, arb, c0, nb, out); break;                   \
    case 2: kq8(WT, 2, wb, dw, mw, nc, a0, arb, c0, nb, out); break;                   \
    case 3: kq8(WT, 3, wb, dw, mw, nc, a0, arb, c0, nb, out); break;                   \
    default: kq8(WT, 4, wb, dw, mw, nc, a0, arb, c0, nb, out); break;                  \
    }

static void mm_q8(uint32_t type, const uint8_t *W, int64_t cols, const uint8_t *act, int n_tok,
                  float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
    const int64_t nb = cols / 32;
    const size_t wbb = type == Q_Q8_0 ? 34 : type == Q_Q4_0 ? 18 : 20;
    const size_t wrb = wbb * (size_t)nb, arb = q_act_row_bytes(type, cols);
    float dw[QK_CH], mw[QK_CH], out[QK_NT];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = W + wrb * (size_t)r;
        for (int64_t c0 = 0; c0 < nb; c0 += QK_CH) {
            const int nc = (int)(nb - c0 < QK_CH ? nb - c0 : QK_CH);
            const uint8_t *wb = wr + wbb * (size_t)c0;
            for (int b = 0; b < nc && (!QK_VNNI || type == Q_Q8_0); b++) {
                const uint8_t *blk = wb + wbb * (size_t)b;
                if (type == Q_Q4_1) {
                    int32_t dm;
                    memcpy(&dm, blk, 4);
                    __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
                    dw[b] = _mm_cvtss_f32(v);
                    mw[b] = _mm_cvtss_f32(_mm_movehdup_ps(v));
                } else {
                    dw[b] = ld_h(blk);
                    mw[b] = -8.0f * dw[b];
                }
            }
            for (int t0 = 0; t0 < n_tok; t0 += QK_NT) {
                const int nt = n_tok - t0 < QK_NT ? n_tok - t0 : QK_NT;
                const uint8_t *a0 = act + arb * (size_t)t0;
#if QK_VNNI
                if (type == Q_Q4_1) {
                    KQ8Z_TILE(Q_Q4_1)
                } else if (type == Q_Q4_0) {
                    KQ8Z_TILE(Q_Q4_0)
                } else {
#else
                if (type == Q_Q4_1) {
                    KQ8_TILE(Q_Q4_1)
                } else if (type == Q_Q4_0) {
                    KQ8_TILE(Q_Q4_0)
                } else {
#endif
                    KQ8_TILE(Q_Q8_0)
                }
                for (int t = 0; t < nt; t++) {
                    float *y = Y + (size_t)(t0 + t) * (size_t)ldy + (size_t)r;
                    *y = c0 == 0 ? out[t] : *y + out[t];
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Q4_K and Q6_K against Q8_K-style activations: integer sums per super-block (6-bit or int8
 * scales applied with madd), one float multiply-add per super-block and token. */

QK_AI void k4_unpack(const uint8_t *s, uint8_t sc[8], uint8_t mn[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0f) | (s[j] >> 6) << 4);
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4);
    }
}

/* Pointers into NT rows of K-quant activations (per row: nb*256 int8, nb float scales, nb*16
 * int16 sums of 16) and zeroed accumulators; shared by the Q4_K and Q6_K kernels. */
QK_AI void kq_act_rows(const int NT, const uint8_t *a0, size_t arb, int64_t nb, const int8_t **aq,
                       const float **ad, const int16_t **bs, __m256 *acc)
{
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        const uint8_t *row = a0 + arb * (size_t)t;
        aq[t] = (const int8_t *)row;
        ad[t] = (const float *)(row + nb * 256);
        bs[t] = (const int16_t *)(ad[t] + nb);
        acc[t] = _mm256_setzero_ps();
    }
}

QK_AI void kq4k(const int NT, const uint8_t *wr, int64_t nb, const uint8_t *a0, size_t arb,
                float *out)
{
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    const int8_t *aq[QK_NT];
    const float *ad[QK_NT];
    const int16_t *bs[QK_NT];
    __m256 acc[QK_NT];
    kq_act_rows(NT, a0, arb, nb, aq, ad, bs, acc);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = wr + 144 * b;
        const float d = ld_h(blk), dmin = ld_h(blk + 2);
        uint8_t sc[8], mn[8];
        k4_unpack(blk + 4, sc, mn);
        __m128i m8 = _mm_loadl_epi64((const __m128i *)mn);
        __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
        __m256i is[QK_NT], is2[QK_NT]; /* two chains: lo and hi nibbles */
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++)
            is[t] = is2[t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 4")
        for (int g = 0; g < 4; g++) {
            __m256i q = ld256(blk + 16 + 32 * g);
            __m256i lo = _mm256_and_si256(q, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m0f);
            __m256i slo = _mm256_set1_epi16(sc[2 * g]), shi = _mm256_set1_epi16(sc[2 * g + 1]);
            _Pragma("GCC unroll 4")
            for (int t = 0; t < NT; t++) {
                const int8_t *a = aq[t] + 256 * b + 64 * g;
                is[t] = madd_acc(is[t], _mm256_maddubs_epi16(lo, ld256(a)), slo);
                is2[t] = madd_acc(is2[t], _mm256_maddubs_epi16(hi, ld256(a + 32)), shi);
            }
        }
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++) {
            __m256i ms = _mm256_madd_epi16(ld256(bs[t] + 16 * b), mins);
            float da = ad[t][b];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(is[t], is2[t])),
                                     _mm256_set1_ps(d * da), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_set1_ps(dmin * da), acc[t]);
        }
    }
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++)
        out[t] = hsum8(acc[t]);
}

QK_AI void kq6k(const int NT, const uint8_t *wr, int64_t nb, const uint8_t *a0, size_t arb,
                float *out)
{
    const __m256i m0f = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    const int8_t *aq[QK_NT];
    const float *ad[QK_NT];
    const int16_t *bs[QK_NT];
    __m256 acc[QK_NT];
    kq_act_rows(NT, a0, arb, nb, aq, ad, bs, acc);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = wr + 210 * b;
        const float d = ld_h(blk + 208);
        const __m128i sc8 = ld128(blk + 192);
        __m256i is[QK_NT], is2[QK_NT]; /* two chains: even and odd k */
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++)
            is[t] = is2[t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 2")
        for (int n = 0; n < 2; n++) {
            __m256i ql0 = ld256(blk + 64 * n), ql1 = ld256(blk + 64 * n + 32);
            __m256i qh = ld256(blk + 128 + 32 * n);
            __m256i q[4], sv[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m0f), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m0f), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m0f), _mm256_and_si256(qh, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m0f),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            _Pragma("GCC unroll 4")
            for (int k = 0; k < 4; k++) {
                char g0 = (char)(8 * n + 2 * k), g1 = (char)(g0 + 1);
                __m128i idx = _mm_setr_epi8(g0, g0, g0, g0, g0, g0, g0, g0, g1, g1, g1, g1, g1, g1, g1, g1);
                sv[k] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, idx));
            }
            _Pragma("GCC unroll 4")
            for (int t = 0; t < NT; t++) {
                const int8_t *a = aq[t] + 256 * b + 128 * n;
                _Pragma("GCC unroll 4")
                for (int k = 0; k < 4; k += 2) {
                    is[t] = madd_acc(is[t], _mm256_maddubs_epi16(q[k], ld256(a + 32 * k)), sv[k]);
                    is2[t] = madd_acc(is2[t], _mm256_maddubs_epi16(q[k + 1], ld256(a + 32 * k + 32)),
                                      sv[k + 1]);
                }
            }
        }
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++) {
            /* the stored values are q + 32: take 32 * sum(scale * bsum) back off */
            __m256i corr = _mm256_madd_epi16(ld256(bs[t] + 16 * b), sc16);
            __m256i v = _mm256_sub_epi32(_mm256_add_epi32(is[t], is2[t]), _mm256_slli_epi32(corr, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(d * ad[t][b]), acc[t]);
        }
    }
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++)
        out[t] = hsum8(acc[t]);
}

#define KK_TILE(FN)                                                                    \
    switch (nt) {                                                                      \
    case 1: FN(1, wr, nb, a0, arb, out); break;                                        \
    case 2: FN(2, wr, nb, a0, arb, out); break;                                        \
    case 3: FN(3, wr, nb, a0, arb, out); break;                                        \
    default: FN(4, wr, nb, a0, arb, out); break;                                       \
    }

static void mm_k(uint32_t type, const uint8_t *W, int64_t cols, const uint8_t *act, int n_tok,
                 float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
    const int64_t nb = cols / 256;
    const size_t wrb = (type == Q_Q4_K ? 144 : 210) * (size_t)nb, arb = q_act_row_bytes(type, cols);
    float out[QK_NT];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = W + wrb * (size_t)r;
        for (int t0 = 0; t0 < n_tok; t0 += QK_NT) {
            const int nt = n_tok - t0 < QK_NT ? n_tok - t0 : QK_NT;
            const uint8_t *a0 = act + arb * (size_t)t0;
            if (type == Q_Q4_K) {
                KK_TILE(kq4k)
            } else {
                KK_TILE(kq6k)
            }
            for (int t = 0; t < nt; t++)
                Y[(size_t)(t0 + t) * (size_t)ldy + (size_t)r] = out[t];
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* F32, F16, BF16 weights against f32 activations. */

QK_AI __m256 ldw8(const uint32_t WT, const uint8_t *w, int64_t c)
{
    if (WT == Q_F32)
        return _mm256_loadu_ps((const float *)w + c);
    if (WT == Q_F16)
        return _mm256_cvtph_ps(ld128(w + 2 * c));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(w + 2 * c)), 16));
}

QK_AI float ldw1(const uint32_t WT, const uint8_t *w, int64_t c)
{
    if (WT == Q_F32) {
        float v;
        memcpy(&v, w + 4 * c, 4);
        return v;
    }
    if (WT == Q_F16)
        return ld_h(w + 2 * c);
    uint16_t h;
    memcpy(&h, w + 2 * c, 2);
    return q_bf16_to_f32(h);
}

QK_AI void kf(const uint32_t WT, const int NT, const uint8_t *w, int64_t cols, const uint8_t *a0,
              size_t arb, float *out)
{
    const float *a[QK_NT];
    __m256 acc[QK_NT];
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        a[t] = (const float *)(a0 + arb * (size_t)t);
        acc[t] = _mm256_setzero_ps();
    }
    __m256 acc2[QK_NT]; /* second chain for odd 8-column steps */
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++)
        acc2[t] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        __m256 v = ldw8(WT, w, c), v2 = ldw8(WT, w, c + 8);
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++) {
            acc[t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(a[t] + c), acc[t]);
            acc2[t] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(a[t] + c + 8), acc2[t]);
        }
    }
    for (; c + 8 <= cols; c += 8) {
        __m256 v = ldw8(WT, w, c);
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(a[t] + c), acc[t]);
    }
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++) {
        float s = hsum8(_mm256_add_ps(acc[t], acc2[t]));
        for (int64_t k = c; k < cols; k++)
            s += ldw1(WT, w, k) * a[t][k];
        out[t] = s;
    }
}

#define KF_TILE(WT)                                                                    \
    switch (nt) {                                                                      \
    case 1: kf(WT, 1, wr, cols, a0, arb, out); break;                                  \
    case 2: kf(WT, 2, wr, cols, a0, arb, out); break;                                  \
    case 3: kf(WT, 3, wr, cols, a0, arb, out); break;                                  \
    default: kf(WT, 4, wr, cols, a0, arb, out); break;                                 \
    }

static void mm_f(uint32_t type, const uint8_t *W, int64_t cols, const uint8_t *act, int n_tok,
                 float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
    const size_t wrb = (type == Q_F32 ? 4 : 2) * (size_t)cols, arb = q_act_row_bytes(type, cols);
    float out[QK_NT];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = W + wrb * (size_t)r;
        for (int t0 = 0; t0 < n_tok; t0 += QK_NT) {
            const int nt = n_tok - t0 < QK_NT ? n_tok - t0 : QK_NT;
            const uint8_t *a0 = act + arb * (size_t)t0;
            if (type == Q_F32) {
                KF_TILE(Q_F32)
            } else if (type == Q_F16) {
                KF_TILE(Q_F16)
            } else {
                KF_TILE(Q_BF16)
            }
            for (int t = 0; t < nt; t++)
                Y[(size_t)(t0 + t) * (size_t)ldy + (size_t)r] = out[t];
        }
    }
}

void QK_MATMUL(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok, float *Y,
               int64_t ldy, int64_t r0, int64_t r1)
{
    switch (type) {
    case Q_Q4_0: case Q_Q4_1: case Q_Q8_0:
        mm_q8(type, W, cols, act, n_tok, Y, ldy, r0, r1);
        return;
    case Q_Q4_K: case Q_Q6_K:
        mm_k(type, W, cols, act, n_tok, Y, ldy, r0, r1);
        return;
    case Q_F32: case Q_F16: case Q_BF16:
        mm_f(type, W, cols, act, n_tok, Y, ldy, r0, r1);
        return;
    default:
        return;
    }
}

#ifndef QK_INCLUDED
double q_avx2_sum_exp(const float *x, int n, float mx)
{
    const __m256 vm = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-FLT_MAX);
    double sum = 0;
    int i = 0;
    while (i + 8 <= n) { /* blocks of up to 512 in float lanes (64 adds a lane), blocks summed in double */
        __m256 acc = _mm256_setzero_ps();
        for (int end = i + 512 < n ? i + 512 : n; i + 8 <= end; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
            __m256 ok = _mm256_cmp_ps(d, lo, _CMP_GE_OQ); /* false for -inf and NaN */
            acc = _mm256_add_ps(acc, _mm256_and_ps(hy_v8_exp(d), ok));
        }
        sum += hsum8(acc);
    }
    for (; i < n; i++) {
        float d = x[i] - mx;
        if (d >= -FLT_MAX)
            sum += exp((double)d);
    }
    return sum;
}
#endif /* QK_INCLUDED */
#endif /* __x86_64__ */
