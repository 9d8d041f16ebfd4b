/* be_cpu.h - internals of the CPU backend shared by its files (be_cpu.c: base ops,
 * be_cpu_hydra.c: HydraLoRA ops). Nothing outside engine/be_cpu*.c includes this. */
#ifndef HY_BE_CPU_H
#define HY_BE_CPU_H

#include "backend.h"
#include "pool.h"

#include <stdbool.h>

typedef struct {
    be base;        /* must be first */
    tp_pool *pool;  /* owned */
    /* HY_CPU_PRECISE=1: weights are also kept dequantised to fp32 and matmuls multiply fp32
     * activations instead of quantising them (4x the memory; the golden tests use it to check
     * the model's math to fp32 precision, apart from the fp16 KV cache). */
    bool precise;
} be_cpu;

/* be_cpu_hydra.c */
int cpu_lora_create(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                    const float *const *B, float scale, be_lora **out_lora);
void cpu_lora_free(be *b, be_lora *l);
int cpu_lora_pack(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                  const float *const *B, float scale, be_lora_pack **out_pack);
int cpu_lora_adopt(be *b, be_lora_pack *p, be_lora **out_lora);
void cpu_lora_pack_free(be *b, be_lora_pack *p);
/* backend.h's hydra op: cpu_hydra for each projection */
int cpu_hydra_n(be *b, int n, const float *x, int64_t in, float *const *y, const int64_t *out,
                const be_lora_seg *const *segs, int n_seg);
/* one projection */
int cpu_hydra(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *segs,
              int n_seg);

#endif
