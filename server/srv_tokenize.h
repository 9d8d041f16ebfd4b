/* srv_tokenize.h - POST /tokenize and /detokenize (vLLM's and llama.cpp's server's shapes), for
 * evaluation tools and clients that count tokens. Same auth as the /v1 routes; never touches the model. */
#ifndef HY_SRV_TOKENIZE_H
#define HY_SRV_TOKENIZE_H

#include "api/api.h"
#include "server/http.h"

#include <stddef.h>

/* The reply JSON in *out (malloc'ed, caller frees), or a 400/500 in e (HY_EINVAL / HY_ENOMEM). */
int srv_tokenize(srv *s, const char *body, size_t len, char **out, api_error *e);
int srv_detokenize(srv *s, const char *body, size_t len, char **out, api_error *e);
/* GET /tokenizer_info (vLLM's shape: what lm-eval's `tokenizer_backend=remote` reads). */
int srv_tokenizer_info(srv *s, char **out, api_error *e);

#endif
