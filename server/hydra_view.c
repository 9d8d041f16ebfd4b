/* hydra_view.c - a request's router control and view between api/ and the scheduler (see
 * hydra_view.h). */
#include "server/hydra_view.h"

#include <string.h>

sched_route_opts srv_hydra_opts(const api_hydra *h, int K)
{
    sched_route_opts o;
    memset(&o, 0, sizeof o);
    if (!h->given)
        return o;
    o.view = h->return_router;
    uint32_t allow = (K >= 32 ? 0xffffffffu : (1u << K) - 1u) & ~h->mask;
    if (h->force_head >= 0)
        allow &= 1u << h->force_head;
    o.ctl = (be_gate_ctl){(float)h->temperature, h->top_k, allow};
    o.has_ctl = h->temperature != 1.0 || h->top_k > 0 || h->force_head >= 0 || h->mask != 0;
    return o;
}

void srv_hydra_view_make(const sched_route_rec *rec, int from, bool with_means, srv_hydra_view *v)
{
    memset(v, 0, sizeof *v);
    int K = rec->K;
    v->rt.K = K;
    if (from < rec->n) {
        v->rt.n_tok = rec->n - from;
        v->rt.head = rec->head + from;
    }
    if (!with_means || K <= 0 || K > API_HYDRA_MAX_K || !rec->sum)
        return;
    /* the gates of a (layer, token) sum to 1, so a projection's sums over heads count its terms */
    double all[API_HYDRA_MAX_K] = {0}, all_n = 0.0;
    for (int p = 0; p < ENG_N_PROJ; p++) {
        const float *s = rec->sum + (size_t)p * K;
        double n = 0.0;
        for (int k = 0; k < K; k++)
            n += s[k];
        if (n <= 0.0)
            continue; /* the adapter leaves this projection alone */
        int g = v->rt.n_groups++;
        v->group[g] = eng_proj_names[p];
        for (int k = 0; k < K; k++) {
            v->mean[g * K + k] = (float)(s[k] / n);
            all[k] += s[k];
        }
        all_n += n;
    }
    for (int k = 0; k < K && all_n > 0.0; k++)
        v->overall[k] = (float)(all[k] / all_n);
    v->rt.group = v->group;
    v->rt.mean = v->mean;
    v->rt.overall = all_n > 0.0 ? v->overall : NULL;
}
