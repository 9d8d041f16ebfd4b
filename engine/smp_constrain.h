/* smp_constrain.h - what a request constrains its sampling with (a grammar, logit_bias), and
 * each sequence's state under it: the grammar matcher follows the tokens the sequence keeps, and
 * before each sampling step the logits get the bias added and every token the grammar forbids set
 * to -inf, so every sampling method draws only from allowed tokens. No sampling itself here. */
#ifndef HY_SMP_CONSTRAIN_H
#define HY_SMP_CONSTRAIN_H

#include "engine/gram.h"

#include <stdint.h>

typedef struct {
    gram *g;             /* NULL: no grammar; else one reference, dropped by smp_constraint_free */
    int n_bias;
    int32_t *bias_id;    /* owned */
    float *bias;         /* owned; added to the logit (OpenAI's logit_bias) */
} smp_constraint;

/* Build one (copies the bias arrays, takes a reference on g). *out freed with smp_constraint_free. */
int smp_constraint_create(gram *g, const int32_t *bias_id, const float *bias, int n_bias,
                          smp_constraint **out);
void smp_constraint_free(void *c); /* void * so the scheduler can hold it opaquely; NULL: no-op */

/* One sequence under a constraint. c must outlive it. Free with smp_cseq_free. */
typedef struct smp_cseq smp_cseq;
int smp_cseq_create(const smp_constraint *c, const gram_vocab *gv, smp_cseq **out);
void smp_cseq_free(smp_cseq *q);
/* The sequence so far is toks[0..n_toks), the first n_prompt of them prompt: advance the matcher
 * over the generated tokens it has not seen, then add the bias and mask logits[n_vocab] in place.
 * HY_EINVAL when a kept token breaks the grammar or nothing is allowed; HY_ELIMIT past the
 * grammar's state cap. */
int smp_cseq_apply(smp_cseq *q, const int32_t *toks, int n_prompt, int n_toks, float *logits, int n_vocab);

#endif
