/* quant_avx512.c - the quantised matrix products of quant_avx2.c compiled again with AVX-512 VNNI
 * (vpdpbusd / vpdpwssd on 256-bit vectors), chosen at run time by quant.c when the CPU has it.
 * Nothing else lives here: the kernels themselves are written once, in quant_avx2.c. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define QK_INCLUDED 1
#define QK_VNNI 1
#define QK_MATMUL q_avx512_matmul_rows
#include "quant_avx2.c"
#endif
