/* srv_stack.c - the `lora` field of a generation request as a pinned adapter stack: which requests
 * may carry one, which members count (non-zero scales), and the errors for the rest. */
#include "server/srv_stack.h"

#include "engine/hy.h"

#include <string.h>

const char *srv_stack_missing(ad_registry *reg, const api_request *ar)
{
    ad_reg_info info;
    for (int i = 0; reg && i < ar->lora.n; i++)
        if (ar->lora.e[i].scale != 0.0 &&
            (ad_reg_info_get(reg, ar->lora.e[i].name, &info) != HY_OK || info.state != AD_READY))
            return ar->lora.e[i].name;
    return NULL;
}

int srv_stack_pin(ad_registry *reg, const api_request *ar, const char *served_name, int max_loras,
                  ad_adapter **out, api_error *e)
{
    *out = NULL;
    if (ar->model && ar->model[0] && strcmp(ar->model, served_name) != 0)
        return api_error_set(e, 400, "invalid_request_error", "lora", "invalid_value",
                             "'lora' applies adapters to the base model: set 'model' to '%s' (not '%s') when "
                             "'lora' lists the adapters", served_name, ar->model);
    const char *names[API_LORA_MAX];
    float w[API_LORA_MAX];
    int n = 0;
    for (int i = 0; i < ar->lora.n; i++)
        if (ar->lora.e[i].scale != 0.0) { /* weighted 0: adds nothing, so it is left out */
            names[n] = ar->lora.e[i].name;
            w[n++] = (float)ar->lora.e[i].scale;
        }
    if (n == 0)
        return HY_OK;
    if (ar->hydra.given && (ar->hydra.temperature != 1.0 || ar->hydra.top_k || ar->hydra.force_head >= 0 ||
                            ar->hydra.mask || ar->hydra.return_router))
        return api_error_set(e, 400, "invalid_request_error", "hydra", "invalid_value",
                             "router controls and the router view ('hydra') apply to one adapter in 'model', "
                             "not to a stack in 'lora'");
    if (!reg)
        return api_error_set(e, 404, "invalid_request_error", "lora", "model_not_found",
                             "The adapter `%s` does not exist (this server has no adapters).", names[0]);
    int rc = ad_reg_pin_stack(reg, names, w, n, out);
    if (rc == HY_ENOTFOUND || rc == HY_EBUSY) /* the registry names the member: "adapter 'x' does not exist" */
        return api_error_set(e, 404, "invalid_request_error", "lora", "model_not_found", "'lora': %s", hy_err_msg());
    if (rc)
        return api_error_set(e, 400, "invalid_request_error", "lora", "invalid_value", "%s", hy_err_msg());
    int unpinned = 0;
    for (int i = 0; i < n; i++)
        unpinned += !ad_reg_pinned(reg, ad_stack_member(*out, i, NULL));
    int free_slots = max_loras - ad_reg_n_pinned(reg);
    if (unpinned > free_slots) {
        ad_reg_unpin(reg, *out);
        *out = NULL;
        return api_error_set(e, 400, "invalid_request_error", "lora", "invalid_value",
                             "'lora' needs %d device slots at once for its unpinned adapters; this server has %d "
                             "(--max-loras %d, %d held by pinned adapters)", unpinned, free_slots, max_loras,
                             max_loras - free_slots);
    }
    return HY_OK;
}
