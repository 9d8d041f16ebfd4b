/* quant.h - ggml tensor types: sizes, dequantisation and quantised matrix products on the CPU.
 * Scalar reference paths plus AVX2/AVX-512 paths picked at run time; no threading here
 * (callers split rows). */
#ifndef HY_QUANT_H
#define HY_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ggml type ids, as stored in GGUF tensor infos. */
enum {
    Q_F32 = 0, Q_F16 = 1, Q_Q4_0 = 2, Q_Q4_1 = 3, Q_Q8_0 = 8,
    Q_Q4_K = 12, Q_Q6_K = 14, Q_BF16 = 30,
};

bool q_supported(uint32_t type);
const char *q_type_name(uint32_t type);  /* "Q4_1"; "type 17" style text for unknown ones */
int64_t q_block_elems(uint32_t type);    /* 1 for F32/F16/BF16, 32 or 256 for block types */
size_t q_block_bytes(uint32_t type);
/* Bytes of one row of n elements; HY_EFORMAT if n is not a multiple of the block size. */
int q_row_bytes(uint32_t type, int64_t n, size_t *out);

/* fp16/bf16 <-> fp32, exact (round-to-nearest-even on the way down). */
float q_f16_to_f32(uint16_t h);
uint16_t q_f32_to_f16(float f);
float q_bf16_to_f32(uint16_t h);
uint16_t q_f32_to_bf16(float f);         /* RNE; NaN stays a (quiet) NaN */
/* fp16 storage of values of any magnitude: the power of two that brings the largest finite |v|
 * of the n values of each of the n_parts arrays to [2^13, 2^14), clamped to 2^-40..2^40 (so
 * products of such factors stay finite in fp32); 1 when all are zero or not finite. Store
 * fp16(v * factor), divide by the factor after the arithmetic. Both backends' adapters use it. */
float q_f16_pow2(const float *const *parts, int n_parts, size_t n);

/* Dequantise n elements (a whole number of blocks) of `type` at src into dst. */
void q_dequant_row(uint32_t type, const void *src, float *dst, int64_t n);

/* Matrix product against a quantised weight W (rows x cols, row-major as GGUF stores it:
 * ne[0] = cols contiguous).  For n_tok activation rows X[t][0..cols):
 *     Y[t * ldy + r] = sum_c W[r][c] * X[t][c]   for r in [r0, r1)
 * Activations are first converted once per call into the format the weight type's dot
 * product wants (e.g. Q8 blocks for Q4_x/Q8_0/K-quants, f32 otherwise):
 *   size_t need = q_act_bytes(type, cols, n_tok);  void *act = <need bytes, 64-aligned>;
 *   q_act_quantize(type, X, cols, n_tok, act);   // may be split over tokens by the caller
 *   q_matmul_rows(type, W, cols, act, n_tok, Y, ldy, r0, r1);  // split over rows by the caller
 * q_act_quantize on a token range: pass X + t0*cols, n_tok = t1-t0, act + q_act_row_bytes*t0. */
size_t q_act_row_bytes(uint32_t type, int64_t cols);
size_t q_act_bytes(uint32_t type, int64_t cols, int n_tok);
void q_act_quantize(uint32_t type, const float *X, int64_t cols, int n_tok, void *act);
void q_matmul_rows(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                   float *Y, int64_t ldy, int64_t r0, int64_t r1);

/* Instruction set used by the dot products. q_isa_set forces one (tests run each);
 * it returns HY_EUNSUPPORTED if the CPU lacks it. Default: best available. */
typedef enum { Q_ISA_SCALAR = 0, Q_ISA_AVX2 = 1, Q_ISA_AVX512 = 2 } q_isa;
q_isa q_isa_get(void);
/* sum of exp(x[i] - mx) over i < n, in double; x[i] - mx must be <= 0 (mx = the max), and -inf or
 * NaN entries count 0 (a log-softmax normaliser). AVX2 where the CPU has it (8 lanes of float
 * exponentials, ~2 ulp), else scalar. */
double q_sum_exp(const float *x, int n, float mx);
double q_avx2_sum_exp(const float *x, int n, float mx);
int q_isa_set(q_isa isa);
bool q_isa_available(q_isa isa);
const char *q_isa_name(q_isa isa);

/* Q4_K's twelve bytes of packed 6-bit scales -> eight scales and eight mins. */
void q_k4_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]);

/* The scalar reference paths, whatever q_isa_get() says (tests compare the SIMD paths to them). */
void q_act_quantize_scalar(uint32_t type, const float *X, int64_t cols, int n_tok, void *act);
void q_matmul_rows_scalar(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                          float *Y, int64_t ldy, int64_t r0, int64_t r1);

/* ---- internal to engine/quant*.c: the SIMD paths and the activation layouts they share ----
 * Activation row (q_act_row_bytes each, a multiple of 64 bytes):
 *   Q_ACT_Q8  (Q4_0, Q4_1, Q8_0): int8 qs[nb*32]; float d[nb]; float s[nb] (s = d * sum(qs)); nb = cols/32
 *   Q_ACT_Q8K (Q4_K, Q6_K):       int8 qs[nb*256]; float d[nb]; int16 bsum[nb*16] (per 16); nb = cols/256
 *   Q_ACT_F32 (F32, F16, BF16):   float x[cols] */
enum { Q_ACT_F32 = 0, Q_ACT_Q8 = 1, Q_ACT_Q8K = 2 };
#if defined(__x86_64__)
void q_avx2_act_quantize(uint32_t type, const float *X, int64_t cols, int n_tok, void *act);
void q_avx2_matmul_rows(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                        float *Y, int64_t ldy, int64_t r0, int64_t r1);
void q_avx512_matmul_rows(uint32_t type, const void *W, int64_t cols, const void *act, int n_tok,
                          float *Y, int64_t ldy, int64_t r0, int64_t r1);
#endif

#endif
