/* hydra_view.h - between the api `hydra` object and the scheduler's router records: the request's
 * gate control from its options, and a choice's router view (means per projection, dominant head
 * per token) in the shape api/ formats. No HTTP here; srv_gen.c and srv_sse.c call it. */
#ifndef HY_HYDRA_VIEW_H
#define HY_HYDRA_VIEW_H

#include "api/api.h"
#include "engine/scheduler.h"

/* The scheduler options of a request's checked `hydra` object for an adapter of K heads. */
sched_route_opts srv_hydra_opts(const api_hydra *h, int K);

/* A choice's router view: owns the arrays *out points into (srv_hydra_view_free). */
typedef struct {
    api_router rt;
    const char *group[ENG_N_PROJ];
    float mean[ENG_N_PROJ * API_HYDRA_MAX_K];
    float overall[API_HYDRA_MAX_K];
} srv_hydra_view;

/* The view of rec's tokens [from, rec->n), with the means when with_means (the whole answer or
 * a stream's last chunk). Call under the request lock; v points into rec until it is released. */
void srv_hydra_view_make(const sched_route_rec *rec, int from, bool with_means, srv_hydra_view *v);

#endif
