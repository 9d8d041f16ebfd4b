/* be_gate.h - the HydraLoRA router's gate as every backend computes it: g = softmax(l) over the
 * heads a request allows, at its temperature, restricted to its top-k heads. One inline function
 * that both the C backends and the CUDA kernels compile, so they cannot drift apart. It holds
 * nothing else: who asks for which control is the scheduler's business. */
#ifndef HY_BE_GATE_H
#define HY_BE_GATE_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define BE_GATE_FN __host__ __device__ static inline
#else
#define BE_GATE_FN static inline
#endif

#define BE_GATE_MAX_K 16 /* heads a control can name (the adapter loader's limit, AD_MAX_K) */

/* Per-request router control; a NULL control is the trained router (temp 1, all heads). */
typedef struct {
    float temp;     /* > 0: the logits are divided by it before the softmax */
    int top_k;      /* 0: every allowed head; else only the top_k largest allowed logits
                     * (equal logits: the lower head index first), renormalised */
    uint32_t allow; /* bit k set: head k may take part (forcing head k = only bit k); the caller
                     * guarantees at least one allowed head below K */
} be_gate_ctl;

/* Whether c (NULL: yes) is a control the gate can apply to K heads: a finite temperature > 0,
 * top_k >= 0 and at least one allowed head below K. */
BE_GATE_FN int be_gate_ok(const be_gate_ctl *c, int K)
{
    if (!c)
        return 1;
    uint32_t heads = K >= 32 ? 0xffffffffu : (1u << K) - 1u;
    return K <= BE_GATE_MAX_K && c->temp > 0.0f && isfinite(c->temp) && c->top_k >= 0 && (c->allow & heads) != 0;
}

/* g[0..K) = the gate of router logits l[k] * l_mul under c; returns the entropy -sum g ln g.
 * Heads left out get exactly 0. K <= BE_GATE_MAX_K. */
BE_GATE_FN float be_gate(const float *l, int K, float l_mul, const be_gate_ctl *c, float *g)
{
    float v[BE_GATE_MAX_K];
    float m = -INFINITY;
    for (int k = 0; k < K; k++) {
        v[k] = l[k] * l_mul;
        if (c) {
            v[k] = (c->allow >> k) & 1u ? v[k] / c->temp : -INFINITY;
        }
    }
    if (c && c->top_k > 0 && c->top_k < K) {
        float keep[BE_GATE_MAX_K];
        for (int k = 0; k < K; k++) {
            int rank = 0;
            for (int j = 0; j < K; j++)
                rank += v[j] > v[k] || (v[j] == v[k] && j < k);
            keep[k] = rank < c->top_k ? v[k] : -INFINITY;
        }
        for (int k = 0; k < K; k++)
            v[k] = keep[k];
    }
    for (int k = 0; k < K; k++)
        m = v[k] > m ? v[k] : m;
    float sum = 0.0f;
    for (int k = 0; k < K; k++) {
        g[k] = v[k] == -INFINITY ? 0.0f : expf(v[k] - m);
        sum += g[k];
    }
    float lsum = logf(sum), ent = 0.0f;
    for (int k = 0; k < K; k++) {
        g[k] /= sum;
        if (g[k] > 0.0f)
            ent -= g[k] * ((v[k] - m) - lsum); /* -g ln g without log(0) */
    }
    return ent;
}

#endif
