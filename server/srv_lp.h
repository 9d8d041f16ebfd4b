/* srv_lp.h - what /v1 responses say about tokens: logprob entries (sched_sample -> api_tokenlp
 * with token text) for generated tokens and, with echo, for the prompt before them; and the
 * prompt text an echo returns. HTTP threads; the vocabulary only. */
#ifndef HY_SRV_LP_H
#define HY_SRV_LP_H

#include "api/api.h"
#include "engine/scheduler.h"
#include "server/http.h"

/* Entries and the token strings they point into; all owned (srv_lp_free). */
typedef struct {
    api_tokenlp *lp;
    int n;
    char **strs;
    const char **tops;
    int n_strs;
} srv_lp;

/* Entries for the prompt's logprobs plp[0..n_plp) (entry 0 has none: null in JSON; n_plp = 0:
 * no prompt part), then for the generated lp[from..to), each with at most `top` alternatives.
 * Caller holds the request's lock. HY_ENOMEM leaves b empty. */
int srv_lp_build(srv *s, const sched_sample *plp, int n_plp, const sched_sample *lp, int from, int to, int top,
                 srv_lp *b);
void srv_lp_free(srv_lp *b);

/* The text echo returns for a prompt: the string as sent, or its token ids decoded (special
 * tokens written out). malloc'ed; NULL on ENOMEM or a decode failure (hy_err_msg). */
char *srv_echo_text(srv *s, const api_prompt *p);

#endif
