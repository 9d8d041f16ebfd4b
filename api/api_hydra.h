/* api_hydra.h - the `hydra` extension object inside api/ (api.c calls these while it parses a
 * request and formats a choice); everything outside api/ uses api.h. */
#ifndef HY_API_HYDRA_H
#define HY_API_HYDRA_H

#include "api/api.h"

#include <jansson.h>
#include <string.h>

/* Fill h from root's "hydra" member (defaults when absent); 400 naming the field on a bad value. */
int api_parse_hydra(json_t *root, api_hydra *h, api_error *err);
/* {"router": {"heads", "token_heads", ["mean_gates", "mean_gate"]}} (new reference). */
json_t *api_router_json(const api_router *rt);

#endif
