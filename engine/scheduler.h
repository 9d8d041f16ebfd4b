/* scheduler.h - the engine thread: continuous batching over a paged KV cache with chunked
 * prefill, preemption by recompute, and fair admission across adapters. HTTP threads create
 * requests and submit them; only the engine thread runs the forward pass (through sched_ops,
 * which tests replace with a fake). It knows nothing of HTTP, JSON or the sampler's internals. */
#ifndef HY_SCHEDULER_H
#define HY_SCHEDULER_H

#include "engine/model.h"
#include "engine/sched_route.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SCHED_MAX_TOP 20 /* most alternatives reported per token */
#define SCHED_LP_ROWS 128 /* prompt-logprob logit rows per engine step at most (x n_vocab floats) */

/* Sampling parameters of one request, passed through to sched_ops.seq_init. */
typedef struct {
    double temperature, top_p, min_p;
    int top_k;                 /* 0 = off */
    double presence_penalty, frequency_penalty, repetition_penalty;
    bool has_seed;
    uint64_t seed;
    int top_logprobs;          /* alternatives wanted per token (0..SCHED_MAX_TOP) */
    bool logprobs;
    /* Opaque to the scheduler (the glue's smp_constraint: grammar, logit_bias), NULL for none.
     * Owned by the request: sched_req.constraint_free frees it with the request. */
    void *constraint;
} sched_sampling;

/* One sampled token (what sched_ops.sample fills). */
typedef struct {
    int32_t token;
    float logprob;
    int n_top;
    int32_t top_id[SCHED_MAX_TOP];
    float top_lp[SCHED_MAX_TOP];
} sched_sample;

/* The engine's plug points. ctx is sched_config.ops_ctx. All called on the engine thread. */
typedef struct {
    /* eng_forward or a fake; logits [b->n_logits][n_vocab]. */
    int (*forward)(void *ctx, const eng_batch *b, float *logits);
    /* Per-sequence state (sampler RNG, detokeniser); kept across preemption. */
    int (*seq_init)(void *ctx, const sched_sampling *p, int choice, void **state);
    void (*seq_free)(void *ctx, void *state);
    /* Pick the next token. toks[0..n_toks) is the sequence so far, the first n_prompt are prompt. */
    int (*sample)(void *ctx, void *state, const float *logits, const int32_t *toks, int n_prompt,
                  int n_toks, sched_sample *out);
    /* Incremental detokenisation: text of tok appended to buf (cap bytes), returns bytes. */
    size_t (*detok)(void *ctx, void *state, int32_t tok, char *buf, size_t cap);
    size_t (*detok_flush)(void *ctx, void *state, char *buf, size_t cap);
    bool (*is_eog)(void *ctx, int32_t tok);
    /* Adapters (optional, NULL: every request must use the base model). acquire makes the
     * adapter resident and returns what the forward needs; called once per admission of a
     * sequence, release once per eviction/finish with the tokens it ran since acquire. */
    int (*adapter_acquire)(void *ctx, void *adapter, const eng_adapter **out);
    void (*adapter_release)(void *ctx, void *adapter, uint64_t n_tokens);
    const char *(*adapter_name)(void *ctx, void *adapter);
    /* Optional: the adapter's identity for the prefix cache, unique per load (NULL: the pointer). */
    uint64_t (*adapter_ident)(void *ctx, void *adapter);
    /* Optional: run at the start of every engine step and whenever sched_wake is called
     * (free drained adapters, ...). */
    void (*housekeeping)(void *ctx);
    /* Optional: the engine thread is about to exit (release per-thread scratch). */
    void (*thread_exit)(void *ctx);
} sched_ops;

typedef struct {
    int max_seqs;          /* running sequences at most */
    int max_batch_tokens;  /* tokens per forward step */
    int n_blocks;          /* KV blocks of BE_KV_BLOCK tokens */
    int max_queue;         /* requests waiting for admission at most (submit -> HY_EBUSY) */
    int max_loras;         /* distinct adapters running at once */
    int n_ctx;             /* tokens per sequence at most */
    int n_vocab;
    int n_layer;           /* the model's layers (router views); 0 with no adapters */
    bool prefix_cache;     /* reuse the K/V of full blocks of earlier prompts (kv_prefix.h) */
    double adapter_wait_s; /* a sequence that waits this long for device slots for its adapter(s)
                            * fails with fail_status 503 (<= 0: waits as long as it takes) */
    int spec_max_draft;    /* speculative decoding: prompt-lookup drafts of up to this many tokens
                            * per decoding sequence and step, verified in the same forward
                            * (engine/spec.h; 0: off; at most SPEC_MAX_DRAFT) */
    int spec_max_batch;    /* no drafts in a step that decodes this many sequences or more (vLLM's
                            * disable-by-batch-size: a full batch is compute-bound, so a rejected
                            * draft costs as much as a token; 0: no such limit) */
    const sched_ops *ops;
    void *ops_ctx;
} sched_config;

/* One choice of a request as the engine fills it. Read under sched_req_lock. */
typedef struct {
    char *text;            /* visible text so far (stop strings and their held-back prefixes excluded) */
    size_t len, cap;
    int n_gen;             /* tokens sampled */
    sched_sample *lp;      /* [n_gen] when logprobs were asked for */
    int lp_cap;
    bool done;
    const char *finish;    /* "stop", "length", "cancelled", "error" once done */
    sched_route_rec route; /* router view of the sampled tokens (req->route.view) */
} sched_choice;

/* A request: n_prompts prompts x n samples each = n_choices sequences (choice = p * n + j).
 * Created and released by the HTTP side; the engine holds its own reference while it works.
 * Everything but the mutex-guarded results is immutable after sched_submit. */
typedef struct sched_req {
    pthread_mutex_t mu;
    atomic_int refs;
    atomic_bool cancelled;
    /* immutable inputs */
    int n_prompts, n;
    int32_t **prompt;      /* [n_prompts], owned */
    int *n_prompt;
    int max_tokens;        /* new tokens per choice at most (0: score the prompt only, see prompt_lp) */
    char **stop;           /* owned */
    int n_stop;
    bool ignore_eos;
    sched_sampling sp;
    void *adapter;         /* NULL = base model; opaque to the scheduler */
    sched_route_opts route; /* router control/view (needs an adapter); set before sched_submit */
    void (*notify)(void *ctx); /* called by the engine thread after new results (no lock held) */
    void *notify_ctx;
    void (*notify_free)(void *ctx); /* called once when the request is freed (last release) */
    void (*constraint_free)(void *constraint); /* frees sp.constraint with the request (NULL: none) */
    uint64_t cache_salt;   /* prefix cache tenant: only requests with the same salt share blocks (0: none) */
    bool no_spec;          /* decode without speculation (set before sched_submit) */
    int prompt_lp;         /* -1: no prompt logprobs (sched_req_create); else alternatives per token,
                            * set with sched_req_want_prompt_lp before sched_submit */
    /* results (mu) */
    sched_sample **plp;    /* [n_prompts][n_prompt[p]] prompt logprobs: entry i scores prompt token i
                            * given the tokens before it (entry 0 has none); computed once per prompt */
    int *n_plp;            /* [n_prompts] entries final so far (entry 0 always): n_prompt[p] = all */
    int n_choices;
    sched_choice *choices;
    int n_done;
    int n_cached_tokens;   /* prompt tokens whose K/V came from the prefix cache (all sequences) */
    uint64_t spec_drafted, spec_accepted; /* draft tokens proposed for its sequences, accepted */
    bool failed;
    char error[256];
    int fail_status;       /* with failed: the HTTP status that fits (0: an internal error, 500) */
    double t_arrival, t_first, t_done;
    uint64_t seq_no;       /* arrival order, set by sched_submit */
} sched_req;

/* Build a request with copies of the prompts and stop strings. *out has one reference (the
 * caller's): drop it with sched_req_release. adapter is not owned. */
int sched_req_create(int n_prompts, const int32_t *const *prompts, const int *n_prompt, int n,
                     int max_tokens, const char *const *stop, int n_stop, bool ignore_eos,
                     const sched_sampling *sp, void *adapter, sched_req **out);
void sched_req_release(sched_req *r);
/* Ask for the log-probability of every prompt token (echo + logprobs, scoring), with n_top
 * (0..SCHED_MAX_TOP) alternatives each; before sched_submit. Only requests that ask pay: the
 * engine computes logits at prompt positions in chunks of at most SCHED_LP_ROWS rows per step. */
int sched_req_want_prompt_lp(sched_req *r, int n_top);
/* Ask the engine to stop this request (client went away); takes effect within one step. */
void sched_req_cancel(sched_req *r);
void sched_req_lock(sched_req *r);
void sched_req_unlock(sched_req *r);
/* Under the lock: every choice done (or the request failed). */
bool sched_req_finished(const sched_req *r);

typedef struct sched sched;

/* Validate cfg and allocate. The engine thread starts with sched_start. Free with sched_free. */
int sched_create(const sched_config *cfg, sched **out);
/* Stop the thread (sched_stop), fail what is left, free. NULL is a no-op. */
void sched_free(sched *s);
int sched_start(sched *s);
/* Stop after the current step; unfinished requests end with finish "cancelled". Joins. */
void sched_stop(sched *s);

/* Wake the engine thread for one housekeeping pass even when idle. */
void sched_wake(sched *s);

/* Hand r to the engine (takes its own reference). HY_EBUSY when the queue is full,
 * HY_ELIMIT when a prompt cannot fit the KV cache or the context, HY_ECANCELED after stop. */
int sched_submit(sched *s, sched_req *r);

/* Run one engine step on the calling thread (tests drive the scheduler with this instead of
 * sched_start). Returns the number of tokens forwarded (0: idle) or a negative error. */
int sched_step(sched *s);

#define SCHED_STEP_BUCKETS 20
extern const double sched_step_buckets[SCHED_STEP_BUCKETS]; /* seconds, ascending */

typedef struct {
    int waiting_reqs;      /* submitted, not yet fully admitted */
    int waiting_seqs;
    int running_seqs;
    int kv_used, kv_total; /* blocks held by sequences, all blocks */
    int kv_cached;         /* blocks in the prefix cache that no sequence holds (reusable) */
    uint64_t prefix_queries, prefix_hits; /* prompt tokens looked up / found, at first admission */
    uint64_t steps, tokens_forwarded, preemptions;
    uint64_t spec_drafts, spec_draft_tokens, spec_accepted; /* verifications, tokens drafted, accepted */
    /* forward steps by wall time (sched_step from its start, admission and adapter uploads
     * included, to its last sampled token): step_hist[i] counts those <= sched_step_buckets[i],
     * the last entry the rest */
    uint64_t step_hist[SCHED_STEP_BUCKETS + 1];
    double step_s_sum;
    char running_adapters[1024]; /* comma-separated names (adapter_name) */
    char waiting_adapters[1024];
} sched_stats;
/* A snapshot (any thread). */
void sched_get_stats(sched *s, sched_stats *out);

#endif
