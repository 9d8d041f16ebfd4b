/* srv_lp.c - logprob entries and echo text for /v1 responses (see srv_lp.h). */
#include "server/srv_lp.h"

#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <stdlib.h>
#include <string.h>

/* Token text for logprobs (special tokens written out; partial UTF-8 as it is). */
static char *piece(srv *s, int32_t id)
{
    char *out = NULL;
    size_t n;
    if (tok_decode(s->vocab, &id, 1, false, &out, &n))
        return NULL;
    return out;
}

void srv_lp_free(srv_lp *b)
{
    for (int i = 0; i < b->n_strs; i++)
        free(b->strs[i]);
    free(b->strs);
    free(b->tops);
    free(b->lp);
    memset(b, 0, sizeof *b);
}

static void put(srv *s, const sched_sample *x, bool none, int top, srv_lp *b)
{
    api_tokenlp *t = &b->lp[b->n];
    const char **tops = &b->tops[(size_t)b->n * (size_t)(top + 1)];
    t->token = b->strs[b->n_strs++] = piece(s, x->token);
    t->none = none;
    t->logprob = x->logprob;
    t->n_top = none ? 0 : HY_MIN(x->n_top, top);
    t->top_token = tops;
    t->top_logprob = x->top_lp;
    for (int k = 0; k < t->n_top; k++)
        tops[k] = b->strs[b->n_strs++] = piece(s, x->top_id[k]);
    b->n++;
}

int srv_lp_build(srv *s, const sched_sample *plp, int n_plp, const sched_sample *lp, int from, int to, int top,
                 srv_lp *b)
{
    size_t n = (size_t)HY_MAX(n_plp, 0) + (size_t)HY_MAX(to - from, 0);
    memset(b, 0, sizeof *b);
    if (n == 0)
        return 0;
    b->lp = calloc(n, sizeof *b->lp);
    b->strs = calloc(n * (size_t)(top + 1), sizeof *b->strs);
    b->tops = calloc(n * (size_t)(top + 1), sizeof *b->tops);
    if (!b->lp || !b->strs || !b->tops) {
        srv_lp_free(b);
        return HY_ENOMEM;
    }
    for (int i = 0; i < n_plp; i++)
        put(s, &plp[i], i == 0, top, b);
    for (int i = from; i < to; i++)
        put(s, &lp[i], false, top, b);
    return 0;
}

char *srv_echo_text(srv *s, const api_prompt *p)
{
    if (p->text)
        return strdup(p->text);
    char *out = NULL;
    size_t n;
    if (tok_decode(s->vocab, p->ids, p->n_ids, false, &out, &n))
        return NULL;
    return out;
}
