/* srv_stack.h - a request's adapter stack (the `lora` extension field, api_lora_stack) turned into a
 * pinned adapter stack (ad_reg_pin_stack) for the engine, with the request errors OpenAI clients
 * expect. Used by srv_gen.c; no HTTP here. */
#ifndef HY_SRV_STACK_H
#define HY_SRV_STACK_H

#include "adapters/registry.h"
#include "api/api.h"

/* The stack ar->lora names (ar->lora.given), pinned: *out is the stack (ad_reg_unpin frees it), or
 * NULL when no member has a non-zero scale (the base model, exactly). max_loras: the device slots;
 * the members that are not pinned adapters must fit in the slots pinned adapters leave.
 * Errors fill e: 400 (the base model must be in `model`; router controls need one adapter; a name
 * given twice; more members than slots), 404 (an unknown or not-yet-loaded name). Nothing stays
 * pinned on error. */
int srv_stack_pin(ad_registry *reg, const api_request *ar, const char *served_name, int max_loras,
                  ad_adapter **out, api_error *e);
/* The first member with a non-zero scale that the registry does not hold ready (a first-use load
 * may bring it, or finish it), or NULL. */
const char *srv_stack_missing(ad_registry *reg, const api_request *ar);

#endif
