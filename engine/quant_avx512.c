/* quant_avx512.c - the quantised matrix products of quant_avx2.c compiled again with AVX-512 VNNI
 * (vpdpbusd / vpdpwssd on 256-bit vectors), chosen at run time by quant.c when the CPU has it,
 * plus single-token (decode) mat-vec kernels for Q4_0/Q4_1/Q8_0 on 512-bit vectors that need
 * AVX-512 VBMI as well (byte permutes gather the packed blocks). Nothing else lives here. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define QK_INCLUDED 1
#define QK_VNNI 1
#define QK_MATMUL q_avx512_matmul_rows_tiled
#include "quant_avx2.c"

void q_avx512_matmul_rows_tiled(uint32_t type, const void *W, int64_t cols, const void *act,
                                int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1);

#define QV_AI __attribute__((always_inline, target("avx512vbmi"))) static inline
#define QV_FN __attribute__((target("avx512vbmi"))) static
#define QV_RMAX 4 /* weight rows per tile for one token: the activation shuffles are shared */
#define QV_NT 4   /* tokens per tile for several: each weight group is unpacked once per tile */
#ifndef QV_PF
#define QV_PF 8192 /* bytes: far enough ahead to hide DRAM latency on one core (measured: 2-16 KiB) */
#endif

/* ---------------------------------------------------------------------------------------- */
/* Q4_0 / Q4_1: four weight blocks (72 or 80 bytes) per step. Two unaligned 64-byte loads
 * cover the group; one two-source byte permute gathers the four blocks' 16 nibble bytes into
 * one vector, one byte permute spreads the four fp16 scales (and mins) over the lanes that
 * hold each block's sums. The activations are shuffled to match: lo = the four blocks'
 * elements 0..15, hi = elements 16..31. Per block b and lane group:
 *     y += dw da dot(u, a) + mw sa     (sa = da sum(a); Q4_0: mw = -8 dw)                    */

typedef struct {
    __m512i lo, hi;  /* activation bytes matching the low and high nibbles */
    __m512 da;       /* lane 4k+j: d of block k */
    __m512 sa;       /* lane 4k: s of block k (Q4_0: -8 s), other lanes 0 */
} qv_act4;

QV_AI qv_act4 qv_act4_load(const uint32_t WT, const int8_t *aq, const float *ad, const float *as,
                           int64_t b, int nblk)
{
    qv_act4 a;
    __m512i a0, a1;
    __m128 d4, s4;
    if (nblk == 4) {
        a0 = _mm512_loadu_si512(aq + 32 * b);
        a1 = _mm512_loadu_si512(aq + 32 * b + 64);
        d4 = _mm_loadu_ps(ad + b);
        s4 = _mm_loadu_ps(as + b);
    } else {
        int n = 32 * nblk;
        __mmask64 m0 = n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1;
        __mmask64 m1 = n <= 64 ? 0 : ((__mmask64)1 << (n - 64)) - 1;
        a0 = _mm512_maskz_loadu_epi8(m0, aq + 32 * b);
        a1 = _mm512_maskz_loadu_epi8(m1, aq + 32 * b + 64);
        __mmask8 mf = (__mmask8)((1u << nblk) - 1);
        d4 = _mm_maskz_loadu_ps(mf, ad + b);
        s4 = _mm_maskz_loadu_ps(mf, as + b);
    }
    a.lo = _mm512_shuffle_i64x2(a0, a1, 0x88);
    a.hi = _mm512_shuffle_i64x2(a0, a1, 0xdd);
    const __m512i bidx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    a.da = _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(d4));
    if (WT == Q_Q4_0)
        s4 = _mm_mul_ps(s4, _mm_set1_ps(-8.0f));
    a.sa = _mm512_maskz_permutexvar_ps((__mmask16)0x1111, bidx, _mm512_castps128_ps512(s4));
    return a;
}

/* Byte index tables for one group of four blocks of block size BS (20: Q4_1, 18: Q4_0):
 * qidx gathers the nibble bytes from [w0 = group bytes 0..63, w1 = group bytes G-64..G-1];
 * sidx spreads d (halves 0..15) and m (halves 16..31) of block k over halves 4k..4k+3. */
QV_AI void qv_q4_tables(const uint32_t WT, __m512i *qidx, __m512i *sidx)
{
    const int bs = WT == Q_Q4_1 ? 20 : 18, qoff = WT == Q_Q4_1 ? 4 : 2, off1 = 4 * bs - 64;
    uint8_t qi[64], si[64];
    for (int i = 0; i < 64; i++) {
        int s = bs * (i / 16) + qoff + i % 16;
        qi[i] = (uint8_t)(s < 64 ? s : 64 + s - off1);
        int h = i / 2, k = (h % 16) / 4, mpart = h >= 16 && WT == Q_Q4_1 ? 2 : 0;
        si[i] = (uint8_t)(bs * k + mpart + i % 2);
    }
    *qidx = _mm512_loadu_si512(qi);
    *sidx = _mm512_loadu_si512(si);
}

/* Activation rows of a tile: token t's quants, scales d and sums s. */
typedef struct {
    const int8_t *aq[QV_NT];
    const float *ad[QV_NT], *as[QV_NT];
} qv_acts;

QV_AI qv_acts qv_acts_of(const uint8_t *act, size_t arb, int64_t nb, int nt)
{
    qv_acts a;
    for (int t = 0; t < nt; t++) {
        const uint8_t *row = act + arb * (size_t)t;
        a.aq[t] = (const int8_t *)row;
        a.ad[t] = (const float *)(row + nb * 32);
        a.as[t] = a.ad[t] + nb;
    }
    return a;
}

/* Unpacked weights of one row's group: nibbles (lo, hi) and scales (dw, mw). */
typedef struct {
    __m512i lo, hi;
    __m512 dw, mw;
} qv_w4;

QV_AI qv_w4 qv_w4_load(const uint32_t WT, const bool tail, const uint8_t *p, __mmask64 mw0,
                       __mmask64 mw1, __m512i qidx, __m512i sidx)
{
    const int off1 = WT == Q_Q4_1 ? 16 : 8;
    const __m512i m0f = _mm512_set1_epi8(0x0f);
    _mm_prefetch((const char *)p + QV_PF, _MM_HINT_T0);
    __m512i w0 = tail ? _mm512_maskz_loadu_epi8(mw0, p) : _mm512_loadu_si512(p);
    __m512i w1 = tail ? _mm512_maskz_loadu_epi8(mw1, p + off1) : _mm512_loadu_si512(p + off1);
    __m512i q = _mm512_permutex2var_epi8(w0, qidx, w1);
    __m512i dm = _mm512_permutexvar_epi8(sidx, w0);
    qv_w4 w;
    w.lo = _mm512_and_si512(q, m0f);
    w.hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f);
    w.dw = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
    w.mw = WT == Q_Q4_1 ? _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1)) : w.dw;
    return w;
}

/* The arithmetic of one (row, token, group): the same whatever the tile shape, so a token's
 * result does not depend on the batch it came in. */
QV_AI __m512 qv_q4_fma(const qv_w4 *w, const qv_act4 *a, __m512 acc)
{
    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w->lo, a->lo);
    dot = _mm512_dpbusd_epi32(dot, w->hi, a->hi);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w->dw, a->da), acc);
    return _mm512_fmadd_ps(w->mw, a->sa, acc);
}

/* One group (fewer than four blocks in a masked tail) of R rows x NT tokens. */
QV_AI void qv_q4_step(const uint32_t WT, const int R, const int NT, const bool tail,
                      const uint8_t *p, size_t wrb, const qv_acts *A, int64_t b, int nblk,
                      __mmask64 mw0, __mmask64 mw1, __m512i qidx, __m512i sidx,
                      __m512 acc[QV_RMAX][QV_NT])
{
    qv_act4 a[QV_NT];
    _Pragma("GCC unroll 4")
    for (int t = 0; t < NT; t++)
        a[t] = qv_act4_load(WT, A->aq[t], A->ad[t], A->as[t], b, nblk);
    _Pragma("GCC unroll 4")
    for (int r = 0; r < R; r++) {
        const qv_w4 w = qv_w4_load(WT, tail, p + wrb * (size_t)r, mw0, mw1, qidx, sidx);
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++)
            acc[r][t] = qv_q4_fma(&w, &a[t], acc[r][t]);
    }
}

/* R rows (starting at wr, row stride wrb) x NT tokens; out[r * QV_NT + t]. */
QV_AI void qv_q4_tile(const uint32_t WT, const int R, const int NT, const uint8_t *wr,
                      size_t wrb, int64_t nb, const qv_acts *A, __m512i qidx, __m512i sidx,
                      float *out)
{
    const int bs = WT == Q_Q4_1 ? 20 : 18, off1 = 4 * bs - 64;
    __m512 acc[QV_RMAX][QV_NT];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++)
            acc[r][t] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4)
        qv_q4_step(WT, R, NT, false, wr + (size_t)bs * (size_t)b, wrb, A, b, 4, 0, 0, qidx, sidx,
                   acc);
    if (b < nb) {
        const int nblk = (int)(nb - b), n = bs * nblk;
        __mmask64 mw0 = n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1;
        __mmask64 mw1 = n <= off1 ? 0 : ((__mmask64)1 << (n - off1)) - 1;
        qv_q4_step(WT, R, NT, true, wr + (size_t)bs * (size_t)b, wrb, A, b, nblk, mw0, mw1,
                   qidx, sidx, acc);
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++)
            out[r * QV_NT + t] = _mm512_reduce_add_ps(acc[r][t]);
}

/* ---------------------------------------------------------------------------------------- */
/* Q8_0: two weight blocks (68 bytes) per step; signed weights are made unsigned (w + 128) for
 * vpdpbusd and 128 * sum(a) per lane is taken back off. */

typedef struct {
    __m512i a, s128;
    __m512 da;
} qv_act2;

QV_AI qv_act2 qv_act2_load(const int8_t *aq, const float *ad, int64_t b, bool full)
{
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    const __m512i bidx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    qv_act2 a;
    __m128 d2;
    if (full) {
        a.a = _mm512_loadu_si512(aq + 32 * b);
        d2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(ad + b)));
    } else {
        a.a = _mm512_maskz_loadu_epi8((__mmask64)0xffffffffu, aq + 32 * b);
        d2 = _mm_maskz_loadu_ps(1, ad + b);
    }
    a.s128 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x80, a.a);
    a.da = _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(d2));
    return a;
}

QV_AI void qv_q8_tile(const int R, const int NT, const uint8_t *wr, size_t wrb, int64_t nb,
                      const qv_acts *A, __m512i qidx, __m512i sidx, float *out)
{
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    __m512 acc[QV_RMAX][QV_NT];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++)
            acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        const bool full = nb - b >= 2;
        const __mmask64 mw0 = ((__mmask64)1 << 34) - 1, mw1 = ((__mmask64)1 << 30) - 1;
        qv_act2 a[QV_NT];
        _Pragma("GCC unroll 4")
        for (int t = 0; t < NT; t++)
            a[t] = qv_act2_load(A->aq[t], A->ad[t], b, full);
        _Pragma("GCC unroll 4")
        for (int r = 0; r < R; r++) {
            const uint8_t *p = wr + wrb * (size_t)r + 34 * (size_t)b;
            _mm_prefetch((const char *)p + QV_PF, _MM_HINT_T0);
            __m512i w0 = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(mw0, p);
            __m512i w1 = full ? _mm512_loadu_si512(p + 4) : _mm512_maskz_loadu_epi8(mw1, p + 4);
            __m512i q = _mm512_xor_si512(_mm512_permutex2var_epi8(w0, qidx, w1), x80);
            __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(sidx, w0)));
            _Pragma("GCC unroll 4")
            for (int t = 0; t < NT; t++) {
                __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, a[t].a),
                                               a[t].s128);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, a[t].da),
                                            acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++)
            out[r * QV_NT + t] = _mm512_reduce_add_ps(acc[r][t]);
}

QV_AI void qv_q8_tables(__m512i *qidx, __m512i *sidx)
{
    uint8_t qi[64], si[64];
    for (int i = 0; i < 64; i++) {
        /* block k's 32 quants at group bytes 34k+2..; w1 holds group bytes 4..67 */
        int s = 34 * (i / 32) + 2 + i % 32;
        qi[i] = (uint8_t)(s < 64 ? s : 64 + s - 4);
        si[i] = (uint8_t)(34 * ((i / 2) / 8 % 2) + i % 2);
    }
    *qidx = _mm512_loadu_si512(qi);
    *sidx = _mm512_loadu_si512(si);
}

/* One tile of R rows x NT tokens of any of the three types. */
QV_AI void qv_tile(uint32_t type, const int R, const int NT, const uint8_t *wr, size_t wrb,
                   int64_t nb, const qv_acts *A, __m512i qidx, __m512i sidx, float *out)
{
    if (type == Q_Q8_0)
        qv_q8_tile(R, NT, wr, wrb, nb, A, qidx, sidx, out);
    else if (type == Q_Q4_1)
        qv_q4_tile(Q_Q4_1, R, NT, wr, wrb, nb, A, qidx, sidx, out);
    else
        qv_q4_tile(Q_Q4_0, R, NT, wr, wrb, nb, A, qidx, sidx, out);
}

QV_FN void qv_tile_nt(uint32_t type, int R, int nt, const uint8_t *wr, size_t wrb, int64_t nb,
                      const qv_acts *A, __m512i qidx, __m512i sidx, float *out)
{
    if (R == 1) {
        switch (nt) {
        case 1: qv_tile(type, 1, 1, wr, wrb, nb, A, qidx, sidx, out); break;
        case 2: qv_tile(type, 1, 2, wr, wrb, nb, A, qidx, sidx, out); break;
        case 3: qv_tile(type, 1, 3, wr, wrb, nb, A, qidx, sidx, out); break;
        default: qv_tile(type, 1, 4, wr, wrb, nb, A, qidx, sidx, out); break;
        }
    } else if (R == 2) {
        switch (nt) {
        case 1: qv_tile(type, 2, 1, wr, wrb, nb, A, qidx, sidx, out); break;
        case 2: qv_tile(type, 2, 2, wr, wrb, nb, A, qidx, sidx, out); break;
        case 3: qv_tile(type, 2, 3, wr, wrb, nb, A, qidx, sidx, out); break;
        default: qv_tile(type, 2, 4, wr, wrb, nb, A, qidx, sidx, out); break;
        }
    } else {
        qv_tile(type, QV_RMAX, 1, wr, wrb, nb, A, qidx, sidx, out);
    }
}

/* Rows [r0, r1) x n_tok tokens. One token: QV_RMAX rows per tile (their activation shuffles
 * shared); more: two rows x up to four tokens (weights unpacked once per tile). */
QV_FN void qv_matmul(uint32_t type, const uint8_t *W, int64_t cols, const uint8_t *act, int n_tok,
                     float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
    const int64_t nb = cols / 32;
    const size_t wrb = (type == Q_Q8_0 ? 34 : type == Q_Q4_1 ? 20 : 18) * (size_t)nb;
    const size_t arb = q_act_row_bytes(type, cols);
    __m512i qidx, sidx;
    if (type == Q_Q8_0)
        qv_q8_tables(&qidx, &sidx);
    else
        qv_q4_tables(type, &qidx, &sidx);
    const int rstep = n_tok == 1 ? QV_RMAX : 2;
    float out[QV_RMAX * QV_NT];
    for (int64_t r = r0; r < r1;) {
        const int R = r1 - r >= rstep ? rstep : 1;
        const uint8_t *wr = W + wrb * (size_t)r;
        for (int t0 = 0; t0 < n_tok; t0 += QV_NT) {
            const int nt = n_tok - t0 < QV_NT ? n_tok - t0 : QV_NT;
            const qv_acts A = qv_acts_of(act + arb * (size_t)t0, arb, nb, nt);
            qv_tile_nt(type, R, nt, wr, wrb, nb, &A, qidx, sidx, out);
            for (int i = 0; i < R; i++)
                for (int t = 0; t < nt; t++)
                    Y[(size_t)(t0 + t) * (size_t)ldy + (size_t)(r + i)] = out[i * QV_NT + t];
        }
        r += R;
    }
}

static bool qv_has_vbmi(void)
{
    static int has = -1;
    if (has < 0) {
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx512vbmi") ? 1 : 0;
    }
    return has;
}

void q_avx512_matmul_rows(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                          float *Y, int64_t ldy, int64_t r0, int64_t r1)
{
    if ((type == Q_Q4_0 || type == Q_Q4_1 || type == Q_Q8_0) && qv_has_vbmi()) {
        qv_matmul(type, W, cols, act, n_tok, Y, ldy, r0, r1);
        return;
    }
    q_avx512_matmul_rows_tiled(type, W, cols, act, n_tok, Y, ldy, r0, r1);
}
#endif
