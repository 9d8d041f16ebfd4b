/* api_lora.h - the `lora` extension field inside api/ (api.c calls it while it parses a request):
 * several adapters with weights applied in one forward, llama.cpp's request shape. Everything
 * outside api/ uses api.h (api_lora_stack). */
#ifndef HY_API_LORA_H
#define HY_API_LORA_H

#include "api/api.h"

#include <jansson.h>

/* Fill st from root's "lora" member (st->given false when absent); 400 naming the entry on a bad
 * value. */
int api_parse_lora(json_t *root, api_lora_stack *st, api_error *err);
void api_lora_free(api_lora_stack *st);

#endif
