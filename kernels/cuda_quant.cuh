/* cuda_quant.cuh - device-side reading of GGUF quantised blocks, 8 weights at a time.
 * One "chunk" is 8 weights of one row; chunk c of a row covers the elements listed in idx[].
 * The mat-vec, dequantise-to-fp16 and embedding kernels all read weights through these
 * functions, so the three paths agree by construction. Layouts follow the GGUF/ggml formats:
 *   Q4_0 (32/blk, 18 B): f16 d, 16 B nibbles; byte j: lo = elem j, hi = elem j+16; w = (q-8)*d
 *   Q4_1 (32/blk, 20 B): f16 d, f16 m, 16 B nibbles as Q4_0; w = q*d + m
 *   Q8_0 (32/blk, 34 B): f16 d, 32 int8; w = q*d
 *   Q4_K (256/blk, 144 B): f16 d, f16 dmin, 12 B packed 6-bit scales/mins, 128 B nibbles
 *   Q6_K (256/blk, 210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales, f16 d */
#ifndef HY_KERNELS_CUDA_QUANT_CUH
#define HY_KERNELS_CUDA_QUANT_CUH

#include <cuda_fp16.h>
#include <stdint.h>

/* Row bytes are always even (18, 20, 34, 144, 210 per block) and device rows start at
 * cudaMalloc (256-aligned) + r * row_bytes, so 16-bit loads are aligned; 32-bit loads are
 * used only where every block size in question is a multiple of 4 (Q4_1, Q4_K). */
__host__ __device__ __forceinline__ uint32_t cq_u16(const uint8_t *p) { return *(const uint16_t *)p; }
__host__ __device__ __forceinline__ uint32_t cq_u32(const uint8_t *p) { return *(const uint32_t *)p; }
__host__ __device__ __forceinline__ float cq_h2f(uint32_t bits)
{
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
}

template <int TYPE> struct cq_traits;
template <> struct cq_traits<2> { enum { BLK = 32, BYTES = 18 }; };   /* Q4_0 */
template <> struct cq_traits<3> { enum { BLK = 32, BYTES = 20 }; };   /* Q4_1 */
template <> struct cq_traits<8> { enum { BLK = 32, BYTES = 34 }; };   /* Q8_0 */
template <> struct cq_traits<12> { enum { BLK = 256, BYTES = 144 }; }; /* Q4_K */
template <> struct cq_traits<14> { enum { BLK = 256, BYTES = 210 }; }; /* Q6_K */

/* Chunk c (0 <= c < cols/8) of `row`: weights w[0..8) at element offsets idx[0..8). */
template <int TYPE>
__host__ __device__ __forceinline__ void cq_chunk(const uint8_t *row, int c, float w[8], int idx[8]);

template <>
__host__ __device__ __forceinline__ void cq_chunk<2>(const uint8_t *row, int c, float w[8], int idx[8])
{
    const int b = c >> 2, s = c & 3;
    const uint8_t *blk = row + (size_t)b * 18;
    const float d = cq_h2f(cq_u16(blk));
    const uint32_t q = cq_u16(blk + 2 + 4 * s) | (cq_u16(blk + 4 + 4 * s) << 16);
    for (int i = 0; i < 4; i++) {
        const uint32_t by = (q >> (8 * i)) & 0xffu;
        w[i] = (float)((int)(by & 0xf) - 8) * d;
        idx[i] = 32 * b + 4 * s + i;
        w[4 + i] = (float)((int)(by >> 4) - 8) * d;
        idx[4 + i] = 32 * b + 16 + 4 * s + i;
    }
}

template <>
__host__ __device__ __forceinline__ void cq_chunk<3>(const uint8_t *row, int c, float w[8], int idx[8])
{
    const int b = c >> 2, s = c & 3;
    const uint8_t *blk = row + (size_t)b * 20;
    const uint32_t dm = cq_u32(blk);
    const float d = cq_h2f(dm), m = cq_h2f(dm >> 16);
    const uint32_t q = cq_u32(blk + 4 + 4 * s);
    for (int i = 0; i < 4; i++) {
        const uint32_t by = (q >> (8 * i)) & 0xffu;
        w[i] = (float)(by & 0xf) * d + m;
        idx[i] = 32 * b + 4 * s + i;
        w[4 + i] = (float)(by >> 4) * d + m;
        idx[4 + i] = 32 * b + 16 + 4 * s + i;
    }
}

template <>
__host__ __device__ __forceinline__ void cq_chunk<8>(const uint8_t *row, int c, float w[8], int idx[8])
{
    const int b = c >> 2, s = c & 3;
    const uint8_t *blk = row + (size_t)b * 34;
    const float d = cq_h2f(cq_u16(blk));
    const uint8_t *qs = blk + 2 + 8 * s;
    for (int i = 0; i < 4; i++) {
        const uint32_t two = cq_u16(qs + 2 * i);
        w[2 * i] = (float)(int8_t)(two & 0xffu) * d;
        w[2 * i + 1] = (float)(int8_t)(two >> 8) * d;
        idx[2 * i] = 32 * b + 8 * s + 2 * i;
        idx[2 * i + 1] = 32 * b + 8 * s + 2 * i + 1;
    }
}

/* 6-bit scale and min of sub-block j (0..7) from Q4_K's 12 packed bytes */
__host__ __device__ __forceinline__ void cq_scale_min_k4(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

template <>
__host__ __device__ __forceinline__ void cq_chunk<12>(const uint8_t *row, int c, float w[8], int idx[8])
{
    const int b = c >> 5, s = c & 31;
    const int j = s >> 3, p = s & 7; /* 64-element group j, 4 bytes p within its 32 */
    const uint8_t *blk = row + (size_t)b * 144;
    const uint32_t dd = cq_u32(blk);
    const float d = cq_h2f(dd), dmin = cq_h2f(dd >> 16);
    int sc, mn;
    cq_scale_min_k4(2 * j, blk + 4, &sc, &mn);
    const float d1 = d * (float)sc, m1 = dmin * (float)mn;
    cq_scale_min_k4(2 * j + 1, blk + 4, &sc, &mn);
    const float d2 = d * (float)sc, m2 = dmin * (float)mn;
    const uint32_t q = cq_u32(blk + 16 + 32 * j + 4 * p);
    for (int i = 0; i < 4; i++) {
        const uint32_t by = (q >> (8 * i)) & 0xffu;
        w[i] = d1 * (float)(by & 0xf) - m1;
        idx[i] = 256 * b + 64 * j + 4 * p + i;
        w[4 + i] = d2 * (float)(by >> 4) - m2;
        idx[4 + i] = 256 * b + 64 * j + 32 + 4 * p + i;
    }
}

template <>
__host__ __device__ __forceinline__ void cq_chunk<14>(const uint8_t *row, int c, float w[8], int idx[8])
{
    const int b = c >> 5, s = c & 31;
    const int h = s >> 4, p = s & 15; /* 128-element half h; l = 2p, 2p+1 within it */
    const uint8_t *blk = row + (size_t)b * 210;
    const uint8_t *ql = blk + 64 * h;
    const uint8_t *qh = blk + 128 + 32 * h;
    const int8_t *sc = (const int8_t *)(blk + 192 + 8 * h);
    const float d = cq_h2f(cq_u16(blk + 208));
    const int l0 = 2 * p, is = l0 / 16;
    const uint32_t a = cq_u16(ql + l0), bq = cq_u16(ql + l0 + 32), hq = cq_u16(qh + l0);
    const float s0 = d * (float)sc[is], s2 = d * (float)sc[is + 2];
    const float s4 = d * (float)sc[is + 4], s6 = d * (float)sc[is + 6];
    for (int e = 0; e < 2; e++) {
        const uint32_t la = (a >> (8 * e)) & 0xffu, lb = (bq >> (8 * e)) & 0xffu;
        const uint32_t hh = (hq >> (8 * e)) & 0xffu;
        const int q1 = (int)((la & 0xf) | (((hh >> 0) & 3) << 4)) - 32;
        const int q2 = (int)((lb & 0xf) | (((hh >> 2) & 3) << 4)) - 32;
        const int q3 = (int)((la >> 4) | (((hh >> 4) & 3) << 4)) - 32;
        const int q4 = (int)((lb >> 4) | (((hh >> 6) & 3) << 4)) - 32;
        const int base = 256 * b + 128 * h + l0 + e;
        w[e] = s0 * (float)q1;
        idx[e] = base;
        w[2 + e] = s2 * (float)q2;
        idx[2 + e] = base + 32;
        w[4 + e] = s4 * (float)q3;
        idx[4 + e] = base + 64;
        w[6 + e] = s6 * (float)q4;
        idx[6 + e] = base + 96;
    }
}

/* Host-side dispatch helper: calls F::template run<TYPE>(args...) for a quantised type id.
 * Returns false for a type without a chunk reader. */
#define CQ_DISPATCH(type, CALL)                                                   \
    switch (type) {                                                               \
    case 2: { constexpr int QT = 2; CALL; } break;                                \
    case 3: { constexpr int QT = 3; CALL; } break;                                \
    case 8: { constexpr int QT = 8; CALL; } break;                                \
    case 12: { constexpr int QT = 12; CALL; } break;                              \
    case 14: { constexpr int QT = 14; CALL; } break;                              \
    default: break;                                                               \
    }

#endif
