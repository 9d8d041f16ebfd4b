/* sched_route.c - per-sequence router control and view for the scheduler (see sched_route.h).
 * Only the engine thread calls it; it never touches a backend. */
#include "engine/sched_route.h"

#include "engine/hy.h"

#include <stdlib.h>
#include <string.h>

void sched_route_rec_free(sched_route_rec *rec)
{
    if (!rec)
        return;
    free(rec->head);
    free(rec->sum);
    memset(rec, 0, sizeof *rec);
}

int sched_route_bind(sched_route *rt, const sched_route_opts *o, const eng_adapter *ea, int n_layer)
{
    size_t need = (size_t)n_layer * ENG_N_PROJ * (size_t)(ea->K + 1);
    if (o->view && need > rt->n_buf) {
        float *b = realloc(rt->buf, need * sizeof(float));
        if (!b)
            return hy_err_set(HY_ENOMEM, "out of memory for a router view");
        rt->buf = b;
        rt->n_buf = need;
    }
    rt->n_use = o->view ? need : 0;
    if (rt->buf)
        memset(rt->buf, 0, rt->n_buf * sizeof(float));
    const be_gate_ctl *ctl = o->has_ctl ? &o->ctl : NULL;
    rt->ctl = (eng_adapter){.lora = ea->lora, .K = ea->K, .stats = ea->stats, .ctl = ctl}; /* a plain adapter: stacks take no router control */
    rt->view = (eng_adapter){.lora = ea->lora, .K = ea->K, .stats = rt->buf, .ctl = ctl};
    return HY_OK;
}

const eng_adapter *sched_route_pick(const sched_route *rt, const sched_route_opts *o, bool logits_tok)
{
    return o->view && logits_tok ? &rt->view : &rt->ctl;
}

static int rec_grow(sched_route_rec *rec, int K)
{
    if (!rec->sum) {
        rec->sum = calloc((size_t)ENG_N_PROJ * (size_t)K, sizeof(float));
        if (!rec->sum)
            return HY_ENOMEM;
        rec->K = K;
    }
    if (rec->n == rec->cap) {
        int cap = rec->cap ? rec->cap * 2 : 32;
        int8_t *h = realloc(rec->head, (size_t)cap);
        if (!h)
            return HY_ENOMEM;
        rec->head = h;
        rec->cap = cap;
    }
    return HY_OK;
}

int sched_route_take(sched_route *rt, sched_route_rec *rec, int n_layer)
{
    int K = rt->view.K;
    if (!rt->buf || (rec->K && rec->K != K))
        return HY_OK; /* another adapter's head count (cannot happen: a request keeps its adapter) */
    if (rec_grow(rec, K))
        return hy_err_set(HY_ENOMEM, "out of memory for a router view");
    float tot[BE_GATE_MAX_K] = {0};
    for (int l = 0; l < n_layer; l++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            float *g = rt->buf + ((size_t)l * ENG_N_PROJ + (size_t)p) * (size_t)(K + 1);
            for (int k = 0; k < K && k < BE_GATE_MAX_K; k++) {
                rec->sum[p * K + k] += g[k];
                tot[k] += g[k];
            }
        }
    int best = 0;
    for (int k = 1; k < K && k < BE_GATE_MAX_K; k++)
        if (tot[k] > tot[best])
            best = k;
    rec->head[rec->n++] = (int8_t)best;
    if (rt->ctl.stats) { /* the adapter's router sums (GET /v1/adapters) see these tokens too */
        for (size_t i = 0; i < rt->n_use; i++)
            rt->ctl.stats[i] += rt->buf[i];
    }
    memset(rt->buf, 0, rt->n_use * sizeof(float));
    return HY_OK;
}

void sched_route_free(sched_route *rt)
{
    if (!rt)
        return;
    free(rt->buf);
    memset(rt, 0, sizeof *rt);
}
