/* sampler.h - per-sequence token sampling from logits: penalties, temperature, top-k, top-p,
 * min-p, seeded RNG, logprobs; and the stop conditions (stop strings on decoded text, stop ids,
 * end of generation, length). It does no model math and no tokenizing. */
#ifndef HY_SAMPLER_H
#define HY_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SMP_MAX_LOGPROBS 20 /* OpenAI's top_logprobs limit */

typedef struct {
    float temperature;        /* 0: greedy (argmax); otherwise logits / temperature */
    int top_k;                /* <= 0: off */
    float top_p;              /* >= 1 (or <= 0): off */
    float min_p;              /* <= 0: off; keep p >= min_p * p_max */
    uint64_t seed;            /* the RNG stream of this sequence (same seed, same draws) */
    /* Penalties as vLLM applies them: repetition over prompt + generated tokens
     * (HF: logit > 0 ? logit / r : logit * r); frequency and presence over generated tokens
     * (OpenAI: logit -= count * frequency + (count > 0) * presence). */
    float repetition_penalty; /* 1 (or <= 0): off */
    float frequency_penalty;  /* 0: off */
    float presence_penalty;   /* 0: off */
    bool logprobs;            /* report the chosen token's logprob */
    int n_logprobs;           /* 0..SMP_MAX_LOGPROBS most likely tokens to report as well */
} smp_params;

/* Defaults: greedy, no filters, no penalties, seed 0. */
smp_params smp_default_params(void);

typedef struct {
    int32_t id;
    /* Logprobs are log-softmax of the FINAL logits after penalties and BEFORE temperature and
     * the top-k/top-p/min-p filters (what the model, as penalised, believes; the same whatever
     * the sampling settings). Valid when params.logprobs or n_logprobs > 0. A NaN logit counts
     * as -inf; if some logits are +inf, those tokens share all the probability equally
     * (logprob -log(count)) and the others have none. The chosen token's logprob is always
     * finite (clamped to -FLT_MAX) and equals its top_logprob entry when it is listed. */
    float logprob;
    int n_top;                            /* <= n_logprobs: only tokens of probability > 0 */
    int32_t top_id[SMP_MAX_LOGPROBS];     /* most likely first */
    float top_logprob[SMP_MAX_LOGPROBS];
} smp_result;

typedef struct smp_seq smp_seq;

/* A sampler for one sequence over a vocabulary of n_vocab. HY_EINVAL names a bad parameter.
 * *out is owned by the caller, freed with smp_free. */
int smp_create(const smp_params *p, int n_vocab, smp_seq **out);
void smp_free(smp_seq *s);
const smp_params *smp_get_params(const smp_seq *s);

/* Record tokens for the penalties: the prompt once, then every token the sequence emits. */
int smp_accept_prompt(smp_seq *s, const int32_t *ids, int n);
int smp_accept(smp_seq *s, int32_t id);

/* Pick the next token from logits [n_vocab]. The logits are modified in place (penalties).
 * It does NOT record the pick: call smp_accept(s, res->id) when it is kept. A token whose
 * logit is NaN or -inf is never picked; when some are +inf, one of those is (greedy: the
 * lowest id; sampling: uniformly among them, after top-k/top-p/min-p). A row with no logit
 * above -inf is HY_EINVAL (res->id = -1). */
int smp_sample(smp_seq *s, float *logits, smp_result *res);

/* Score a known token (prompt logprobs): log-softmax of the raw logits [n_vocab] (no penalties,
 * no temperature, no filters), the logprob of `id` in res->logprob (finite, clamped to -FLT_MAX)
 * and the n_top (0..SMP_MAX_LOGPROBS) most likely tokens, as smp_sample reports them.
 * res->id = id. HY_EINVAL when id is out of range or every logit is -inf or NaN. */
int smp_score(const float *logits, int n_vocab, int32_t id, int n_top, smp_result *res);

/* smp_sample keeps a per-thread scratch of n_vocab candidates; a thread that samples and then
 * goes on living without sampling may release it with this. */
void smp_thread_cleanup(void);

/* Stop strings, matched on the decoded text of the generation so far (text[0..len)).
 * Returns the byte offset where the earliest complete stop string starts (the text to emit
 * ends there), or -1 when none occurs. In the -1 case *hold receives how many trailing bytes
 * are a proper prefix of some stop string and must be held back until more text arrives.
 * `from` is a hint: text before from was checked by an earlier call (matches that end before
 * it are not looked for again). Empty stop strings are ignored. */
long smp_stop_check(const char *text, size_t len, size_t from, const char *const *stops,
                    int n_stops, size_t *hold);

typedef enum {
    SMP_CONTINUE = 0,
    SMP_STOP_EOG,    /* end-of-generation token (unless ignored) */
    SMP_STOP_TOKEN,  /* one of the request's stop token ids */
    SMP_STOP_LENGTH, /* max_tokens reached */
} smp_stop;

/* Whether generation ends after emitting `id`, the n_generated-th token (1-based).
 * max_tokens <= 0: no limit. */
smp_stop smp_stop_token(int32_t id, bool is_eog, bool ignore_eog, const int32_t *stop_ids,
                        int n_stop_ids, int n_generated, int max_tokens);

#endif
