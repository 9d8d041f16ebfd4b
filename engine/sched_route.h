/* sched_route.h - a request's view of and control over its HydraLoRA router, for the scheduler:
 * the per-sequence eng_adapter copies that carry the request's gate control (be_gate.h) and, on
 * the token whose logits a step samples, a buffer that receives that token's gates; then the
 * choice's record of them (dominant head per sampled token, gates summed per projection).
 * It does not build batches or sample: scheduler.c calls it at admission, batch and token time. */
#ifndef HY_SCHED_ROUTE_H
#define HY_SCHED_ROUTE_H

#include "engine/model.h"

#include <stdbool.h>
#include <stdint.h>

/* What a request asks of its router (the api `hydra` object, checked against the adapter). */
typedef struct {
    bool has_ctl;      /* ctl applies to every token of the request */
    be_gate_ctl ctl;
    bool view;         /* record the gates of every sampled token */
} sched_route_opts;

/* Per-choice record, filled on the engine thread under the request lock. */
typedef struct {
    int K;             /* 0 until the first sampled token */
    int n, cap;
    int8_t *head;      /* [n]: the dominant head of each sampled token (largest summed gate) */
    float *sum;        /* [ENG_N_PROJ * K]: gates summed over layers and sampled tokens */
} sched_route_rec;
void sched_route_rec_free(sched_route_rec *rec);

/* Per-sequence state; owned by the sequence (sched_route_free). */
typedef struct {
    eng_adapter ctl;   /* the adapter's loras and stats (its own router sums, which buf is added
                        * to after use) with the request's control */
    eng_adapter view;  /* the same, its stats into buf: for the token whose logits are sampled */
    float *buf;        /* [n_layer * ENG_N_PROJ * (K + 1)] */
    size_t n_buf, n_use; /* allocated, used by the bound adapter */
} sched_route;

/* (Re)bind rt to the adapter the sequence acquired (at every admission: a preempted sequence may
 * get other eng_adapter memory). *rt zeroed the first time. HY_ENOMEM. */
int sched_route_bind(sched_route *rt, const sched_route_opts *o, const eng_adapter *ea, int n_layer);
/* The eng_adapter a batch token of this sequence uses: the view one for the token whose logits
 * are sampled when the request wants the view, else the control one. */
const eng_adapter *sched_route_pick(const sched_route *rt, const sched_route_opts *o, bool logits_tok);
/* After a step that sampled a token of this sequence with the view on: move the token's gates
 * from buf into rec (and into the adapter's own sums), zero buf. Under the request lock. */
int sched_route_take(sched_route *rt, sched_route_rec *rec, int n_layer);
void sched_route_free(sched_route *rt);

#endif
