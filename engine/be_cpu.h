/* be_cpu.h - internals of the CPU backend shared by its files (be_cpu.c: base ops,
 * be_cpu_hydra.c: HydraLoRA ops). Nothing outside engine/be_cpu*.c includes this. */
#ifndef HY_BE_CPU_H
#define HY_BE_CPU_H

#include "backend.h"
#include "pool.h"

typedef struct {
    be base;        /* must be first */
    tp_pool *pool;  /* owned */
} be_cpu;

/* be_cpu_hydra.c */
int cpu_lora_create(be *b, int r, int K, int64_t in, int64_t out, const float *A, const float *R,
                    const float *const *B, float scale, be_lora **out_lora);
void cpu_lora_free(be *b, be_lora *l);
int cpu_hydra(be *b, const float *x, int64_t in, float *y, int64_t out, const be_lora_seg *segs,
              int n_seg);

#endif
