/* smp_constrain.c - logit_bias and grammar masks applied to a sequence's logits before sampling
 * (engine thread). The matcher is advanced lazily from the tokens the scheduler kept, so a
 * preempted sequence that is recomputed stays in step. */
#include "engine/smp_constrain.h"

#include "engine/hy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int smp_constraint_create(gram *g, const int32_t *bias_id, const float *bias, int n_bias, smp_constraint **out)
{
    *out = NULL;
    smp_constraint *c = calloc(1, sizeof *c);
    if (!c)
        return hy_err_set(HY_ENOMEM, "out of memory");
    if (n_bias > 0) {
        c->bias_id = malloc((size_t)n_bias * sizeof *c->bias_id);
        c->bias = malloc((size_t)n_bias * sizeof *c->bias);
        if (!c->bias_id || !c->bias) {
            smp_constraint_free(c);
            return hy_err_set(HY_ENOMEM, "out of memory");
        }
        memcpy(c->bias_id, bias_id, (size_t)n_bias * sizeof *c->bias_id);
        memcpy(c->bias, bias, (size_t)n_bias * sizeof *c->bias);
        c->n_bias = n_bias;
    }
    if (g) {
        gram_retain(g);
        c->g = g;
    }
    *out = c;
    return HY_OK;
}

void smp_constraint_free(void *p)
{
    smp_constraint *c = p;
    if (!c)
        return;
    gram_release(c->g);
    free(c->bias_id);
    free(c->bias);
    free(c);
}

struct smp_cseq {
    const smp_constraint *c;
    gram_matcher *m;     /* NULL without a grammar */
    uint32_t *mask;
    int nv;              /* the grammar vocabulary's size (tokens past it are never allowed) */
    int n_seen;          /* generated tokens the matcher has accepted */
};

int smp_cseq_create(const smp_constraint *c, const gram_vocab *gv, smp_cseq **out)
{
    *out = NULL;
    smp_cseq *q = calloc(1, sizeof *q);
    if (!q)
        return hy_err_set(HY_ENOMEM, "out of memory");
    q->c = c;
    q->nv = gram_vocab_n(gv);
    if (c->g) {
        int rc = gram_matcher_create(c->g, gv, &q->m);
        if (!rc && !(q->mask = malloc((size_t)(gram_vocab_n(gv) + 31) / 32 * sizeof *q->mask)))
            rc = hy_err_set(HY_ENOMEM, "out of memory");
        if (rc) {
            smp_cseq_free(q);
            return rc;
        }
    }
    *out = q;
    return HY_OK;
}

void smp_cseq_free(smp_cseq *q)
{
    if (!q)
        return;
    gram_matcher_free(q->m);
    free(q->mask);
    free(q);
}

int smp_cseq_apply(smp_cseq *q, const int32_t *toks, int n_prompt, int n_toks, float *logits, int n_vocab)
{
    for (int i = 0; i < q->c->n_bias; i++)
        if (q->c->bias_id[i] >= 0 && q->c->bias_id[i] < n_vocab)
            logits[q->c->bias_id[i]] += q->c->bias[i];
    if (!q->m)
        return HY_OK;
    for (; n_prompt + q->n_seen < n_toks; q->n_seen++) {
        int rc = gram_matcher_accept(q->m, toks[n_prompt + q->n_seen]);
        if (rc)
            return rc;
    }
    int rc = gram_matcher_mask(q->m, q->mask);
    if (rc)
        return rc;
    bool any = false;
    int nv = HY_MIN(n_vocab, q->nv);
    for (int w = 0; w < (nv + 31) / 32; w++) {
        uint32_t bits = q->mask[w];
        any |= bits != 0;
        if (bits == 0xFFFFFFFFu)
            continue;
        int end = HY_MIN(32, nv - w * 32);
        float *l = logits + w * 32;
        if (bits == 0) {
            for (int b = 0; b < end; b++)
                l[b] = -INFINITY;
            continue;
        }
        for (int b = 0; b < end; b++)
            if (!(bits >> b & 1))
                l[b] = -INFINITY;
    }
    for (int id = nv; id < n_vocab; id++)
        logits[id] = -INFINITY;
    return any ? HY_OK : hy_err_set(HY_EINVAL, "the grammar allows no token here");
}
