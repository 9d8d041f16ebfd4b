/* api_hydra.c - the `hydra` extension object: parsing and checking the router options of a
 * request, and the router view a response carries per choice. Pure, like the rest of api/: it
 * knows the wire format, not the engine. */
#include "api/api.h"
#include "api/api_hydra.h"
#include "engine/hy.h"

#include <math.h>

static int hy_bad(api_error *err, const char *param, const char *msg)
{
    return api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s", msg);
}

static int head_index(json_t *v, const char *param, int64_t *out, api_error *err)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= API_HYDRA_MAX_K)
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                             "'%s' must be a head index in 0..%d", param, API_HYDRA_MAX_K - 1);
    *out = json_integer_value(v);
    return 0;
}

int api_parse_hydra(json_t *root, api_hydra *h, api_error *err)
{
    *h = (api_hydra){.temperature = 1.0, .force_head = -1};
    json_t *o = json_object_get(root, "hydra");
    if (!o || json_is_null(o))
        return 0;
    if (!json_is_object(o))
        return hy_bad(err, "hydra", "'hydra' must be an object");
    h->given = true;
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        int64_t k;
        if (strcmp(key, "return_router") == 0) {
            if (!json_is_boolean(v))
                return hy_bad(err, "hydra.return_router", "'hydra.return_router' must be a boolean");
            h->return_router = json_is_true(v);
        } else if (strcmp(key, "temperature") == 0) {
            if (!json_is_number(v) || !(json_number_value(v) > 0.0) || !isfinite(json_number_value(v)) ||
                json_number_value(v) > 1e6)
                return hy_bad(err, "hydra.temperature", "'hydra.temperature' must be a number in (0, 1e6]");
            h->temperature = json_number_value(v);
        } else if (strcmp(key, "top_k") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > API_HYDRA_MAX_K)
                return hy_bad(err, "hydra.top_k", "'hydra.top_k' must be an integer in 0..16 (0: every head)");
            h->top_k = (int)json_integer_value(v);
        } else if (strcmp(key, "force_head") == 0) {
            if (!json_is_null(v)) {
                if (head_index(v, "hydra.force_head", &k, err))
                    return HY_EINVAL;
                h->force_head = (int)k;
            }
        } else if (strcmp(key, "mask_heads") == 0) {
            if (!json_is_array(v))
                return hy_bad(err, "hydra.mask_heads", "'hydra.mask_heads' must be an array of head indices");
            size_t i;
            json_t *e;
            json_array_foreach(v, i, e) {
                if (head_index(e, "hydra.mask_heads", &k, err))
                    return HY_EINVAL;
                h->mask |= 1u << k;
            }
        } else {
            return api_error_set(err, 400, "invalid_request_error", "hydra", "invalid_value",
                                 "unknown field 'hydra.%.64s' (known: return_router, temperature, top_k, "
                                 "force_head, mask_heads)", key);
        }
    }
    return 0;
}

int api_hydra_check(const api_hydra *h, int K, api_error *err)
{
    if (!h->given)
        return 0;
    if (K <= 0)
        return hy_bad(err, "hydra", "'hydra' options need a model that is a (Hydra)LoRA adapter");
    if (h->force_head >= K)
        return api_error_set(err, 400, "invalid_request_error", "hydra.force_head", "invalid_value",
                             "'hydra.force_head' is %d but the adapter has %d head%s", h->force_head, K,
                             K == 1 ? "" : "s");
    uint32_t heads = (1u << K) - 1u;
    if (h->mask & ~heads)
        return api_error_set(err, 400, "invalid_request_error", "hydra.mask_heads", "invalid_value",
                             "'hydra.mask_heads' names a head >= %d, the adapter's head count", K);
    if ((h->mask & heads) == heads || (h->force_head >= 0 && (h->mask >> h->force_head) & 1u))
        return hy_bad(err, "hydra.mask_heads", "'hydra.mask_heads' leaves no head to route to");
    return 0;
}

static json_t *floats(const float *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_real(round((double)v[i] * 1e6) / 1e6));
    return a;
}

json_t *api_router_json(const api_router *rt)
{
    json_t *r = json_object(), *heads = json_array();
    json_object_set_new(r, "heads", json_integer(rt->K));
    for (int i = 0; i < rt->n_tok; i++)
        json_array_append_new(heads, json_integer(rt->head[i]));
    json_object_set_new(r, "token_heads", heads);
    if (rt->n_groups > 0) {
        json_t *m = json_object();
        for (int g = 0; g < rt->n_groups; g++)
            json_object_set_new(m, rt->group[g], floats(rt->mean + (size_t)g * rt->K, rt->K));
        json_object_set_new(r, "mean_gates", m);
        if (rt->overall)
            json_object_set_new(r, "mean_gate", floats(rt->overall, rt->K));
    }
    json_t *o = json_object();
    json_object_set_new(o, "router", r);
    return o;
}
