/* scheduler.c - the engine thread: admission (free KV blocks, batch-token budget, adapter
 * slots, fairness across adapters), chunked prefill + decode in one flat batch sorted by
 * adapter, sampling through sched_ops, stop strings, preemption by recompute, cancellation.
 * It never touches HTTP or JSON; the forward and the sampler come in through sched_ops. */
#include "engine/scheduler.h"
#include "engine/hy.h"
#include "engine/kv_prefix.h"
#include "engine/sampler.h"
#include "engine/spec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SCHED_AD_HIST 256
#define SCHED_SPEC_ROWS 256 /* draft logit rows per step at most (each is n_vocab floats) */

typedef struct sched_seq {
    sched_req *req;
    int choice, prompt_idx;
    int32_t *toks;       /* prompt then generated, owned */
    int n_tok, n_prompt, cap_tok;
    int n_cached;        /* tokens whose K/V are in the cache */
    int32_t *blocks;     /* owned, [cap_blocks] */
    int n_blocks, cap_blocks;
    void *state;         /* ops->seq_init */
    char *gen;           /* all detokenised text, owned */
    size_t gen_len, gen_cap, shown;
    const eng_adapter *ea;
    sched_route rt;      /* the request's router control/view, bound at admission */
    bool acquired, preempted;
    double slot_wait;    /* hy_now() when it first found no device slot for its adapter (0: not waiting) */
    uint64_t acq_tokens; /* tokens run since adapter_acquire */
    uint64_t order;      /* admission order (preemption victim = newest) */
    int n_this;          /* tokens in the current step (drafts included) */
    int32_t draft[SPEC_MAX_DRAFT]; /* this step's draft: the tokens after toks[n_tok - 1] */
    int n_draft;
    int spec_k;          /* draft length it asks for next (adaptive; spec_next_k; starts at the max) */
    bool scores;         /* computes its prompt's logprobs (the first choice of a prompt_lp request) */
    int plp_done;        /* prompt tokens scored so far (the request's n_plp[prompt_idx]) */
    int n_lp_this;       /* prompt-logprob rows in the current step */
    kv_key key;          /* what besides the tokens decides its K/V (set at admission) */
    kv_link link;        /* the prefix cache chain through blocks[0 .. n_committed) */
    int n_committed;     /* full blocks offered to the prefix cache */
    bool counted;        /* its prompt was looked up in the prefix cache (first admission) */
    struct sched_seq *next;
} sched_seq;

struct sched {
    sched_config cfg;
    int max_blocks_seq;
    kv_prefix kv;
    /* submit queue (mu) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    sched_req **inbox;
    int n_inbox, cap_inbox;
    int waiting_reqs;    /* requests in the waiting list (not preempted), updated by the engine */
    bool stop, stopped, thread_started, kick;
    pthread_t thread;
    uint64_t next_req_no;
    /* engine-private */
    sched_seq *waiting_head, *waiting_tail;
    sched_seq **running;
    int n_running;
    uint64_t next_order;
    uint64_t n_steps, n_forwarded, n_preempt;
    uint64_t n_spec_drafts, n_spec_tokens, n_spec_accepted;
    int spec_rows;       /* logit rows for drafts per step (SCHED_SPEC_ROWS at most) */
    uint64_t step_hist[SCHED_STEP_BUCKETS + 1]; /* note_step_time */
    double step_s_sum;
    uint64_t prefix_queries, prefix_hits;
    struct {
        void *ad;
        uint64_t when;
    } ad_hist[SCHED_AD_HIST];
    uint64_t admit_clock;
    sched_req **touched;
    int n_touched, cap_touched;
    /* batch buffers */
    int32_t *b_tok, *b_pos, *b_tseq, *b_slot, *b_seqlen, *b_bt, *b_segbeg, *b_logit_tok;
    sched_sample *b_plp;  /* [SCHED_LP_ROWS] one step's prompt-logprob results */
    const eng_adapter **b_segad;
    sched_seq **b_seqs;
    float *logits;
    /* stats (stats_mu) */
    pthread_mutex_t stats_mu;
    sched_stats stats;
};

/* ---------- requests ---------- */

int sched_req_create(int n_prompts, const int32_t *const *prompts, const int *n_prompt, int n,
                     int max_tokens, const char *const *stop, int n_stop, bool ignore_eos,
                     const sched_sampling *sp, void *adapter, sched_req **out)
{
    *out = NULL;
    if (n_prompts < 1 || n < 1 || max_tokens < 0 || n_stop < 0 || n_prompts > 1024 || n > 1024)
        return hy_err_set(HY_EINVAL, "bad request shape");
    sched_req *r = calloc(1, sizeof *r);
    if (!r)
        return hy_err_set(HY_ENOMEM, "out of memory");
    pthread_mutex_init(&r->mu, NULL);
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancelled, false);
    r->n_prompts = n_prompts;
    r->n = n;
    r->max_tokens = max_tokens;
    r->ignore_eos = ignore_eos;
    r->sp = *sp;
    r->adapter = adapter;
    r->n_choices = n_prompts * n;
    r->prompt_lp = -1;
    r->t_arrival = hy_now();
    r->prompt = calloc((size_t)n_prompts, sizeof *r->prompt);
    r->n_prompt = calloc((size_t)n_prompts, sizeof *r->n_prompt);
    r->choices = calloc((size_t)r->n_choices, sizeof *r->choices);
    if (!r->prompt || !r->n_prompt || !r->choices)
        goto fail;
    for (int i = 0; i < n_prompts; i++) {
        if (n_prompt[i] < 1) {
            sched_req_release(r);
            return hy_err_set(HY_EINVAL, "empty prompt");
        }
        r->prompt[i] = malloc((size_t)n_prompt[i] * sizeof(int32_t));
        if (!r->prompt[i])
            goto fail;
        memcpy(r->prompt[i], prompts[i], (size_t)n_prompt[i] * sizeof(int32_t));
        r->n_prompt[i] = n_prompt[i];
    }
    if (n_stop) {
        r->stop = calloc((size_t)n_stop, sizeof *r->stop);
        if (!r->stop)
            goto fail;
        for (int i = 0; i < n_stop; i++, r->n_stop++)
            if (!(r->stop[i] = strdup(stop[i])))
                goto fail;
    }
    *out = r;
    return HY_OK;
fail:
    sched_req_release(r);
    return hy_err_set(HY_ENOMEM, "out of memory for a request");
}

void sched_req_release(sched_req *r)
{
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1)
        return;
    for (int i = 0; i < r->n_prompts && r->prompt; i++)
        free(r->prompt[i]);
    free(r->prompt);
    free(r->n_prompt);
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    for (int i = 0; i < r->n_choices && r->choices; i++) {
        free(r->choices[i].text);
        free(r->choices[i].lp);
        sched_route_rec_free(&r->choices[i].route);
    }
    free(r->choices);
    for (int i = 0; i < r->n_prompts && r->plp; i++)
        free(r->plp[i]);
    free(r->plp);
    free(r->n_plp);
    if (r->constraint_free)
        r->constraint_free(r->sp.constraint);
    pthread_mutex_destroy(&r->mu);
    if (r->notify_free)
        r->notify_free(r->notify_ctx);
    free(r);
}

int sched_req_want_prompt_lp(sched_req *r, int n_top)
{
    if (n_top < 0 || n_top > SCHED_MAX_TOP || r->plp)
        return hy_err_set(HY_EINVAL, "bad prompt logprobs request");
    r->plp = calloc((size_t)r->n_prompts, sizeof *r->plp);
    r->n_plp = calloc((size_t)r->n_prompts, sizeof *r->n_plp);
    if (!r->plp || !r->n_plp)
        return hy_err_set(HY_ENOMEM, "out of memory for prompt logprobs");
    for (int p = 0; p < r->n_prompts; p++) {
        if (!(r->plp[p] = calloc((size_t)r->n_prompt[p], sizeof *r->plp[p])))
            return hy_err_set(HY_ENOMEM, "out of memory for prompt logprobs");
        r->plp[p][0].token = r->prompt[p][0];
        r->n_plp[p] = 1;
    }
    r->prompt_lp = n_top;
    return HY_OK;
}

void sched_req_cancel(sched_req *r) { atomic_store(&r->cancelled, true); }
void sched_req_lock(sched_req *r) { pthread_mutex_lock(&r->mu); }
void sched_req_unlock(sched_req *r) { pthread_mutex_unlock(&r->mu); }
bool sched_req_finished(const sched_req *r) { return r->failed || r->n_done == r->n_choices; }

/* ---------- helpers (engine thread) ---------- */

static void touch(sched *s, sched_req *r)
{
    for (int i = 0; i < s->n_touched; i++)
        if (s->touched[i] == r)
            return;
    if (s->n_touched == s->cap_touched) {
        int cap = s->cap_touched ? s->cap_touched * 2 : 64;
        sched_req **t = realloc(s->touched, (size_t)cap * sizeof *t);
        if (!t)
            return; /* the request is still notified when it finishes (touch retried then) */
        s->touched = t;
        s->cap_touched = cap;
    }
    atomic_fetch_add(&r->refs, 1);
    s->touched[s->n_touched++] = r;
}

static void notify_touched(sched *s)
{
    for (int i = 0; i < s->n_touched; i++) {
        sched_req *r = s->touched[i];
        if (r->notify)
            r->notify(r->notify_ctx);
        sched_req_release(r);
    }
    s->n_touched = 0;
}

static int append(char **buf, size_t *len, size_t *cap, const char *src, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap : 64;
        while (c < *len + n + 1)
            c *= 2;
        char *p = realloc(*buf, c);
        if (!p)
            return HY_ENOMEM;
        *buf = p;
        *cap = c;
    }
    memcpy(*buf + *len, src, n);
    *len += n;
    (*buf)[*len] = '\0';
    return HY_OK;
}

/* Last block first: a cached chain's tail goes to the LRU list before its head, so eviction takes
 * tails first and never leaves a block whose parent is gone. */
static void release_blocks(sched *s, sched_seq *q)
{
    for (int i = q->n_blocks - 1; i >= 0; i--)
        kv_prefix_put(&s->kv, q->blocks[i]);
    q->n_blocks = 0;
    q->n_cached = 0;
    q->n_committed = 0;
}

static void release_adapter(sched *s, sched_seq *q)
{
    if (q->acquired && s->cfg.ops->adapter_release)
        s->cfg.ops->adapter_release(s->cfg.ops_ctx, q->req->adapter, q->acq_tokens);
    q->acquired = false;
    q->acq_tokens = 0;
    q->ea = NULL;
}

static void seq_free(sched *s, sched_seq *q)
{
    if (!q)
        return;
    release_blocks(s, q);
    release_adapter(s, q);
    if (q->state && s->cfg.ops->seq_free)
        s->cfg.ops->seq_free(s->cfg.ops_ctx, q->state);
    free(q->toks);
    free(q->blocks);
    free(q->gen);
    sched_route_free(&q->rt);
    sched_req_release(q->req);
    free(q);
}

/* Mark a choice finished; publishes whatever visible text is pending. */
static void finish_choice(sched *s, sched_seq *q, const char *reason)
{
    sched_req *r = q->req;
    sched_req_lock(r);
    sched_choice *c = &r->choices[q->choice];
    if (!c->done) {
        if (q->shown < q->gen_len && strcmp(reason, "cancelled") != 0) {
            if (append(&c->text, &c->len, &c->cap, q->gen + q->shown, q->gen_len - q->shown) == 0)
                q->shown = q->gen_len;
        }
        c->done = true;
        c->finish = reason;
        r->n_done++;
        if (r->n_done == r->n_choices)
            r->t_done = hy_now();
    }
    sched_req_unlock(r);
    touch(s, r);
}

static void fail_req(sched *s, sched_req *r, const char *msg)
{
    sched_req_lock(r);
    if (!r->failed) {
        r->failed = true;
        snprintf(r->error, sizeof r->error, "%s", msg);
        r->t_done = hy_now();
    }
    sched_req_unlock(r);
    touch(s, r);
}

/* ---------- waiting list ---------- */

static void wait_push_back(sched *s, sched_seq *q)
{
    q->next = NULL;
    if (s->waiting_tail)
        s->waiting_tail->next = q;
    else
        s->waiting_head = q;
    s->waiting_tail = q;
}

static void wait_push_front(sched *s, sched_seq *q)
{
    q->next = s->waiting_head;
    s->waiting_head = q;
    if (!s->waiting_tail)
        s->waiting_tail = q;
}

static void wait_unlink(sched *s, sched_seq *prev, sched_seq *q)
{
    if (prev)
        prev->next = q->next;
    else
        s->waiting_head = q->next;
    if (s->waiting_tail == q)
        s->waiting_tail = prev;
    q->next = NULL;
}

/* ---------- create / destroy ---------- */

int sched_create(const sched_config *cfg, sched **out)
{
    *out = NULL;
    if (!cfg->ops || !cfg->ops->forward || !cfg->ops->sample || cfg->max_seqs < 1 ||
        cfg->max_batch_tokens < 1 || cfg->n_blocks < 1 || cfg->n_ctx < 2 || cfg->n_vocab < 1 ||
        cfg->max_queue < 1 || cfg->spec_max_draft < 0 || cfg->spec_max_draft > SPEC_MAX_DRAFT)
        return hy_err_set(HY_EINVAL, "scheduler: bad configuration");
    sched *s = calloc(1, sizeof *s);
    if (!s)
        return hy_err_set(HY_ENOMEM, "out of memory");
    s->cfg = *cfg;
    if (s->cfg.max_loras < 1)
        s->cfg.max_loras = 1;
    if (s->cfg.max_seqs > s->cfg.max_batch_tokens)
        s->cfg.max_seqs = s->cfg.max_batch_tokens; /* every running sequence needs a token slot */
    s->max_blocks_seq = kv_blocks_for(cfg->n_ctx);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_init(&s->stats_mu, NULL);
    int ms = s->cfg.max_seqs, mt = cfg->max_batch_tokens;
    s->spec_rows = HY_MIN(ms * cfg->spec_max_draft, SCHED_SPEC_ROWS);
    int rows = ms + SCHED_LP_ROWS + s->spec_rows;
    size_t bt, lg;
    if (kv_prefix_init(&s->kv, cfg->n_blocks, cfg->prefix_cache) || hy_mul_size((size_t)ms, (size_t)s->max_blocks_seq, &bt) ||
        hy_mul_size((size_t)rows, (size_t)cfg->n_vocab, &lg))
        goto fail;
    s->running = calloc((size_t)ms, sizeof *s->running);
    s->b_tok = malloc((size_t)mt * sizeof(int32_t));
    s->b_pos = malloc((size_t)mt * sizeof(int32_t));
    s->b_tseq = malloc((size_t)mt * sizeof(int32_t));
    s->b_slot = malloc((size_t)mt * sizeof(int32_t));
    s->b_seqlen = malloc((size_t)ms * sizeof(int32_t));
    s->b_bt = malloc(bt * sizeof(int32_t));
    /* segments: one per sequence, two for one whose router view splits its last prefill chunk */
    s->b_segbeg = malloc((size_t)(2 * ms + 1) * sizeof(int32_t));
    s->b_logit_tok = malloc((size_t)rows * sizeof(int32_t));
    s->b_plp = malloc(SCHED_LP_ROWS * sizeof *s->b_plp);
    s->b_segad = malloc((size_t)2 * ms * sizeof *s->b_segad);
    s->b_seqs = malloc((size_t)ms * sizeof *s->b_seqs);
    s->logits = malloc(lg * sizeof(float));
    if (!s->running || !s->b_tok || !s->b_pos || !s->b_tseq || !s->b_slot || !s->b_seqlen || !s->b_bt ||
        !s->b_segbeg || !s->b_logit_tok || !s->b_plp || !s->b_segad || !s->b_seqs || !s->logits) {
        hy_err_set(HY_ENOMEM, "out of memory for the scheduler's batch buffers");
        goto fail;
    }
    s->stats.kv_total = cfg->n_blocks;
    *out = s;
    return HY_OK;
fail:
    sched_free(s);
    return HY_ENOMEM;
}

static void fail_everything(sched *s, const char *reason)
{
    pthread_mutex_lock(&s->mu);
    sched_req **inbox = s->inbox;
    int n_inbox = s->n_inbox;
    s->inbox = NULL;
    s->n_inbox = s->cap_inbox = 0;
    s->waiting_reqs = 0;
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n_inbox; i++) {
        sched_req *r = inbox[i];
        sched_req_lock(r);
        for (int c = 0; c < r->n_choices; c++)
            if (!r->choices[c].done) {
                r->choices[c].done = true;
                r->choices[c].finish = reason;
                r->n_done++;
            }
        r->t_done = hy_now();
        sched_req_unlock(r);
        touch(s, r);
        sched_req_release(r);
    }
    free(inbox);
    for (int i = 0; i < s->n_running; i++) {
        finish_choice(s, s->running[i], reason);
        seq_free(s, s->running[i]);
    }
    s->n_running = 0;
    while (s->waiting_head) {
        sched_seq *q = s->waiting_head;
        wait_unlink(s, NULL, q);
        finish_choice(s, q, reason);
        seq_free(s, q);
    }
    notify_touched(s);
}

void sched_free(sched *s)
{
    if (!s)
        return;
    sched_stop(s);
    fail_everything(s, "cancelled");
    kv_prefix_clear(&s->kv);
    free(s->running);
    free(s->b_tok);
    free(s->b_pos);
    free(s->b_tseq);
    free(s->b_slot);
    free(s->b_seqlen);
    free(s->b_bt);
    free(s->b_segbeg);
    free(s->b_logit_tok);
    free(s->b_plp);
    free(s->b_segad);
    free(s->b_seqs);
    free(s->logits);
    free(s->touched);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->stats_mu);
    free(s);
}

/* ---------- submission (any thread) ---------- */

int sched_submit(sched *s, sched_req *r)
{
    for (int i = 0; i < r->n_prompts; i++) {
        if (r->n_prompt[i] >= s->cfg.n_ctx)
            return hy_err_set(HY_ELIMIT, "prompt of %d tokens does not fit the context of %d tokens",
                              r->n_prompt[i], s->cfg.n_ctx);
        if (kv_blocks_for(r->n_prompt[i] + 1) > s->cfg.n_blocks)
            return hy_err_set(HY_ELIMIT, "prompt of %d tokens does not fit the KV cache (%d tokens)",
                              r->n_prompt[i], s->cfg.n_blocks * BE_KV_BLOCK);
    }
    if (r->adapter && !s->cfg.ops->adapter_acquire)
        return hy_err_set(HY_EUNSUPPORTED, "this engine serves no adapters");
    pthread_mutex_lock(&s->mu);
    int rc = HY_OK;
    if (s->stop) {
        rc = hy_err_set(HY_ECANCELED, "the server is shutting down");
    } else if (s->waiting_reqs + s->n_inbox >= s->cfg.max_queue) {
        rc = hy_err_set(HY_EBUSY, "the request queue is full (%d waiting); retry later",
                        s->waiting_reqs + s->n_inbox);
    } else {
        if (s->n_inbox == s->cap_inbox) {
            int cap = s->cap_inbox ? s->cap_inbox * 2 : 16;
            sched_req **p = realloc(s->inbox, (size_t)cap * sizeof *p);
            if (!p) {
                pthread_mutex_unlock(&s->mu);
                return hy_err_set(HY_ENOMEM, "out of memory");
            }
            s->inbox = p;
            s->cap_inbox = cap;
        }
        atomic_fetch_add(&r->refs, 1);
        r->seq_no = s->next_req_no++;
        s->inbox[s->n_inbox++] = r;
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* Turn each new request into its sequences at the back of the waiting list. */
static void drain_inbox(sched *s)
{
    pthread_mutex_lock(&s->mu);
    sched_req **inbox = s->inbox;
    int n = s->n_inbox;
    s->inbox = NULL;
    s->n_inbox = s->cap_inbox = 0;
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n; i++) {
        sched_req *r = inbox[i];
        for (int c = 0; c < r->n_choices; c++) {
            int p = c / r->n;
            sched_seq *q = calloc(1, sizeof *q);
            /* in 64 bits: max_tokens may be INT_MAX from a caller that leaves the cut to n_ctx */
            int cap = (int)HY_MIN((int64_t)r->n_prompt[p] + r->max_tokens + 1, (int64_t)s->cfg.n_ctx);
            if (q) {
                q->toks = malloc((size_t)cap * sizeof(int32_t));
                q->blocks = malloc((size_t)s->max_blocks_seq * sizeof(int32_t));
            }
            if (!q || !q->toks || !q->blocks ||
                (s->cfg.ops->seq_init && s->cfg.ops->seq_init(s->cfg.ops_ctx, &r->sp, c, &q->state))) {
                if (q) {
                    free(q->toks);
                    free(q->blocks);
                    free(q);
                }
                fail_req(s, r, "out of memory for a sequence");
                sched_req_lock(r);
                for (int k = c; k < r->n_choices; k++)
                    if (!r->choices[k].done) {
                        r->choices[k].done = true;
                        r->choices[k].finish = "error";
                        r->n_done++;
                    }
                sched_req_unlock(r);
                break;
            }
            atomic_fetch_add(&r->refs, 1);
            q->req = r;
            q->choice = c;
            q->prompt_idx = p;
            q->cap_tok = cap;
            q->cap_blocks = s->max_blocks_seq;
            memcpy(q->toks, r->prompt[p], (size_t)r->n_prompt[p] * sizeof(int32_t));
            q->n_tok = q->n_prompt = r->n_prompt[p];
            q->scores = r->prompt_lp >= 0 && c % r->n == 0;
            q->plp_done = 1;
            q->spec_k = s->cfg.spec_max_draft;
            if (r->max_tokens == 0 && (!q->scores || q->n_prompt == 1)) {
                finish_choice(s, q, "length"); /* nothing to run: echo of the prompt alone */
                seq_free(s, q);
                continue;
            }
            wait_push_back(s, q);
        }
        sched_req_release(r); /* the sequences hold it now */
    }
    free(inbox);
}

/* ---------- cancellation ---------- */

/* A sequence nobody will read: its request was cancelled, or failed (another of its sequences could
 * not be set up or sampled; the server answers 500 at once and would never cancel the rest). Only
 * this thread sets `failed`, so it reads it without the lock. */
static bool seq_orphaned(const sched_seq *q) { return atomic_load(&q->req->cancelled) || q->req->failed; }

static void sweep_cancelled(sched *s)
{
    for (int i = 0; i < s->n_running;) {
        sched_seq *q = s->running[i];
        if (seq_orphaned(q)) {
            finish_choice(s, q, q->req->failed ? "error" : "cancelled");
            seq_free(s, q);
            s->running[i] = s->running[--s->n_running];
        } else {
            i++;
        }
    }
    sched_seq *prev = NULL;
    for (sched_seq *q = s->waiting_head; q;) {
        sched_seq *next = q->next;
        if (seq_orphaned(q)) {
            wait_unlink(s, prev, q);
            finish_choice(s, q, q->req->failed ? "error" : "cancelled");
            seq_free(s, q);
        } else {
            prev = q;
        }
        q = next;
    }
}

/* ---------- admission ---------- */

static int running_with_adapter(const sched *s, void *ad)
{
    int n = 0;
    for (int i = 0; i < s->n_running; i++)
        n += s->running[i]->req->adapter == ad;
    return n;
}

static bool adapter_slot_ok(const sched *s, void *ad)
{
    if (!ad)
        return true;
    void *seen[256];
    int n_seen = 0;
    for (int i = 0; i < s->n_running; i++) {
        void *a = s->running[i]->req->adapter;
        if (!a)
            continue;
        if (a == ad)
            return true;
        int k = 0;
        while (k < n_seen && seen[k] != a)
            k++;
        if (k == n_seen && n_seen < (int)HY_ARRAY_LEN(seen))
            seen[n_seen++] = a;
    }
    return n_seen < s->cfg.max_loras;
}

/* When each adapter was last admitted (a small table; forgotten entries count as "never"). */
static uint64_t last_admit(const sched *s, void *ad)
{
    for (int i = 0; i < SCHED_AD_HIST; i++)
        if (s->ad_hist[i].ad == ad && s->ad_hist[i].when)
            return s->ad_hist[i].when;
    return 0;
}

static void note_admit(sched *s, void *ad)
{
    int slot = 0;
    for (int i = 0; i < SCHED_AD_HIST; i++) {
        if (s->ad_hist[i].ad == ad) {
            slot = i;
            break;
        }
        if (s->ad_hist[i].when < s->ad_hist[slot].when)
            slot = i;
    }
    s->ad_hist[slot].ad = ad;
    s->ad_hist[slot].when = ++s->admit_clock;
}

/* Pick the next sequence to admit: a preempted one first (it was admitted before); else the
 * head of the adapter with the fewest running sequences, ties going to the adapter admitted
 * least recently, then to arrival order. If that adapter has no device slot, admit nothing
 * until one frees, so a burst of one adapter cannot starve another. Only the first 256
 * waiting entries are considered. */
static sched_seq *pick_candidate(sched *s, sched_seq **prev_out, bool *slot_ok)
{
    *slot_ok = true;
    sched_seq *best = NULL, *best_prev = NULL, *prev = NULL;
    int best_run = 0, scanned = 0;
    uint64_t best_last = 0;
    for (sched_seq *q = s->waiting_head; q && scanned < 256; prev = q, q = q->next, scanned++) {
        if (q->preempted) {
            *prev_out = prev;
            *slot_ok = adapter_slot_ok(s, q->req->adapter);
            return q;
        }
        if (best && q->req->adapter == best->req->adapter)
            continue;
        int nr = running_with_adapter(s, q->req->adapter);
        uint64_t last = last_admit(s, q->req->adapter);
        if (!best || nr < best_run || (nr == best_run && last < best_last)) {
            best = q;
            best_prev = prev;
            best_run = nr;
            best_last = last;
        }
    }
    *prev_out = best_prev;
    if (best)
        *slot_ok = adapter_slot_ok(s, best->req->adapter);
    return best;
}

static int grow_blocks(sched *s, sched_seq *q, int n_tokens)
{
    int need = kv_blocks_for(n_tokens);
    if (need > q->cap_blocks)
        return HY_ELIMIT;
    while (q->n_blocks < need) {
        int32_t id;
        if (kv_prefix_get(&s->kv, &id))
            return HY_EBUSY;
        q->blocks[q->n_blocks++] = id;
    }
    return HY_OK;
}

static bool has_route(const sched_req *r) { return r->route.has_ctl || r->route.view; }

/* The prefix-cache key of q's K/V: the adapter's load identity, the request's router control
 * (it changes every hidden state) and its cache salt. */
static kv_key seq_key(const sched *s, const sched_seq *q)
{
    const sched_req *r = q->req;
    kv_key k = {0, r->cache_salt};
    if (r->adapter)
        k.adapter = s->cfg.ops->adapter_ident ? s->cfg.ops->adapter_ident(s->cfg.ops_ctx, r->adapter)
                                              : (uint64_t)(uintptr_t)r->adapter;
    if (r->route.has_ctl) {
        const be_gate_ctl *c = &r->route.ctl;
        uint32_t t;
        memcpy(&t, &c->temp, sizeof t);
        k.salt ^= 0x8badf00dull * (((uint64_t)t << 32) ^ ((uint64_t)(uint32_t)c->top_k << 8) ^ c->allow) + 1;
    }
    return k;
}

/* A later choice of a prompt waits while the prompt's first choice is still prefilling, then
 * finds the prompt's blocks in the prefix cache: n samples never prefill n times. */
static bool sibling_prefilling(const sched *s, const sched_seq *q)
{
    if (!s->kv.on || q->choice % q->req->n == 0)
        return false;
    for (int i = 0; i < s->n_running; i++) {
        const sched_seq *o = s->running[i];
        if (o->req == q->req && o->prompt_idx == q->prompt_idx && o->choice % q->req->n == 0)
            return o->n_cached < o->n_prompt;
    }
    return false;
}

/* Tokens sequence q has still to run at most: the rest of its prompt, then its output budget. */
static int seq_left(const sched_seq *q)
{
    int gen = q->n_tok - q->n_prompt;
    return (q->n_tok - q->n_cached) + HY_MAX(0, q->req->max_tokens - gen);
}

/* The running adapter whose slot would free soonest if it got no new sequences: the one whose
 * longest sequence has the fewest tokens left (ties: fewer sequences). NULL when none runs. */
static void *soonest_free_adapter(const sched *s)
{
    void *best = NULL;
    int best_left = 0, best_run = 0;
    for (int i = 0; i < s->n_running; i++) {
        void *a = s->running[i]->req->adapter;
        if (!a || a == best)
            continue;
        int left = 0, run = 0;
        for (int k = 0; k < s->n_running; k++)
            if (s->running[k]->req->adapter == a) {
                left = HY_MAX(left, seq_left(s->running[k]));
                run++;
            }
        if (!best || left < best_left || (left == best_left && run < best_run)) {
            best = a;
            best_left = left;
            best_run = run;
        }
    }
    return best;
}

/* The first waiting sequence (of the first 256) that needs no new device slot: the base model,
 * or an adapter that is running, except the one whose slot is to free next for a sequence that
 * waits for one (soonest_free_adapter: so that sequence waits no longer than it would if nothing
 * else were admitted). NULL when none. */
static sched_seq *pick_without_new_slot(sched *s, sched_seq **prev_out)
{
    void *victim = soonest_free_adapter(s);
    sched_seq *prev = NULL;
    int scanned = 0;
    for (sched_seq *q = s->waiting_head; q && scanned < 256; prev = q, q = q->next, scanned++) {
        void *a = q->req->adapter;
        bool no_new_slot = !a || (a != victim && running_with_adapter(s, a) > 0);
        if (no_new_slot && !sibling_prefilling(s, q)) {
            *prev_out = prev;
            return q;
        }
    }
    return NULL;
}

/* q found no device slot for its adapter(s): start its clock, or, once it has waited
 * cfg.adapter_wait_s, fail it with 503 (a sequence never waits without bound). Returns true when q
 * was failed and unlinked (the caller goes on with the next one). */
static bool slot_wait_over(sched *s, sched_seq *prev, sched_seq *q)
{
    double now = hy_now();
    if (q->slot_wait == 0)
        q->slot_wait = now;
    if (s->cfg.adapter_wait_s <= 0 || now - q->slot_wait < s->cfg.adapter_wait_s)
        return false;
    char msg[200];
    snprintf(msg, sizeof msg, "no device slot for the adapter became free within %g s (--max-loras %d, every slot "
             "in use or pinned); try again later", s->cfg.adapter_wait_s, s->cfg.max_loras);
    sched_req_lock(q->req);
    if (!q->req->failed)
        q->req->fail_status = 503;
    sched_req_unlock(q->req);
    wait_unlink(s, prev, q);
    fail_req(s, q->req, msg);
    finish_choice(s, q, "error");
    seq_free(s, q);
    return true;
}

static void admit(sched *s)
{
    while (s->n_running < s->cfg.max_seqs && s->waiting_head) {
        sched_seq *prev = NULL;
        bool slot_ok;
        sched_seq *q = pick_candidate(s, &prev, &slot_ok);
        if (!q || sibling_prefilling(s, q))
            return;
        if (!slot_ok) {
            if (slot_wait_over(s, prev, q))
                continue;
            /* while q waits for a slot, admit what needs no new one, except for the adapter whose
             * slot is to free next (so q does not wait on a slot kept busy) */
            if (!(q = pick_without_new_slot(s, &prev)))
                return;
        }
        /* The longest cached prefix of whole blocks (the last known token is always computed:
         * its logits are needed); a sequence that scores its prompt computes every position. */
        q->key = seq_key(s, q);
        int m = 0;
        if (!(q->scores && q->plp_done < q->n_prompt))
            m = kv_prefix_match(&s->kv, q->key, q->toks, (q->n_tok - 1) / BE_KV_BLOCK, q->blocks, &q->link);
        q->n_blocks = q->n_committed = m;
        /* Blocks for everything known now plus the first new token. */
        if (kv_blocks_for(q->n_tok + 1) - m > kv_prefix_available(&s->kv)) {
            release_blocks(s, q); /* not admitted after all: the matched blocks go back */
            return;
        }
        if (q->req->adapter && !q->acquired) {
            const eng_adapter *ea = NULL;
            int rc = s->cfg.ops->adapter_acquire(s->cfg.ops_ctx, q->req->adapter, &ea);
            if (rc == HY_EBUSY) {
                release_blocks(s, q);
                if (slot_wait_over(s, prev, q))
                    continue;
                return; /* no device slot free right now */
            }
            if (rc) {
                wait_unlink(s, prev, q);
                fail_req(s, q->req, hy_err_msg()[0] ? hy_err_msg() : "adapter could not be loaded");
                finish_choice(s, q, "error");
                seq_free(s, q);
                continue;
            }
            q->ea = ea;
            q->acquired = true;
            if (has_route(q->req) && sched_route_bind(&q->rt, &q->req->route, ea, s->cfg.n_layer)) {
                wait_unlink(s, prev, q);
                fail_req(s, q->req, hy_err_msg());
                finish_choice(s, q, "error");
                seq_free(s, q);
                continue;
            }
        }
        wait_unlink(s, prev, q);
        if (grow_blocks(s, q, q->n_tok) != HY_OK) { /* cannot happen after the check above */
            release_blocks(s, q);
            wait_push_front(s, q);
            return;
        }
        q->n_cached = m * BE_KV_BLOCK;
        if (!q->counted) {
            q->counted = true;
            s->prefix_queries += (uint64_t)q->n_prompt;
            s->prefix_hits += (uint64_t)q->n_cached;
            sched_req_lock(q->req);
            q->req->n_cached_tokens += q->n_cached;
            sched_req_unlock(q->req);
        }
        q->preempted = false;
        q->slot_wait = 0;
        q->order = s->next_order++;
        note_admit(s, q->req->adapter);
        s->running[s->n_running++] = q;
    }
}

/* Free the newest running sequence's blocks and put it back at the head of the queue. */
static void preempt_one(sched *s, int idx)
{
    sched_seq *q = s->running[idx];
    s->running[idx] = s->running[--s->n_running];
    release_blocks(s, q);
    release_adapter(s, q);
    q->preempted = true;
    wait_push_front(s, q);
    s->n_preempt++;
}

static int newest_running(const sched *s)
{
    int best = -1;
    for (int i = 0; i < s->n_running; i++)
        if (best < 0 || s->running[i]->order > s->running[best]->order)
            best = i;
    return best;
}

/* ---------- the batch ---------- */

static int cmp_seq(const void *a, const void *b)
{
    const sched_seq *x = *(sched_seq *const *)a, *y = *(sched_seq *const *)b;
    uintptr_t ax = (uintptr_t)x->req->adapter, ay = (uintptr_t)y->req->adapter;
    if (ax != ay)
        return ax < ay ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Prompt-logprob rows q needs when it runs its next n tokens: the positions not scored yet
 * among n_cached .. n_cached + n - 1 that predict a prompt token (<= n_prompt - 2). */
static int lp_rows(const sched_seq *q, int n)
{
    if (!q->scores)
        return 0;
    int lo = HY_MAX(q->n_cached, q->plp_done - 1), hi = HY_MIN(q->n_cached + n, q->n_prompt - 1);
    return hi > lo ? hi - lo : 0;
}

static void trim_blocks(sched *s, sched_seq *q);

/* Speculation: each decoding sequence that may (speculation on, not turned off by its request, no
 * router control, tokens left) adds a prompt-lookup draft to its decode token, in the batch tokens
 * and draft logit rows that prefill left over and the cache's free blocks, so drafts never delay
 * a prompt nor preempt a sequence. */
static bool decodes_one(const sched_seq *q) { return q->n_this == 1 && q->n_tok - q->n_cached == 1; }

static void plan_drafts(sched *s, int budget)
{
    int rows = s->spec_rows, n_dec = 0;
    for (int i = 0; i < s->n_running; i++)
        n_dec += decodes_one(s->running[i]);
    if (s->cfg.spec_max_batch > 0 && n_dec >= s->cfg.spec_max_batch)
        return;
    for (int i = 0; i < s->n_running && budget > 0 && rows > 0; i++) {
        sched_seq *q = s->running[i];
        if (!decodes_one(q) || q->req->no_spec || has_route(q->req))
            continue;
        int k = HY_MIN(q->spec_k, HY_MIN(budget, rows));
        k = HY_MIN(k, q->req->max_tokens - (q->n_tok - q->n_prompt) - 1); /* the sampled token counts too */
        k = HY_MIN(k, q->cap_tok - q->n_tok - 1);                           /* positions stay in the context */
        q->n_draft = spec_ngram_draft(q->toks, q->n_tok, k, q->draft);
        if (q->n_draft && grow_blocks(s, q, q->n_cached + q->n_this + q->n_draft) != HY_OK) {
            trim_blocks(s, q); /* no room in the cache: no draft (a draft never preempts) */
            q->n_draft = 0;
        }
        q->n_this += q->n_draft;
        budget -= q->n_draft;
        rows -= q->n_draft;
    }
}

/* Decide how many tokens each running sequence runs this step (decodes first, then prefill
 * chunks in admission order) and make sure its KV blocks exist, preempting the newest
 * sequences when the cache is full. Returns the number of sequences in the step. */
static int plan_step(sched *s)
{
    int left = 0; /* batch tokens prefill left over: the drafts' */
    for (;;) {
        int budget = s->cfg.max_batch_tokens, lp_budget = SCHED_LP_ROWS;
        for (int i = 0; i < s->n_running; i++)
            s->running[i]->n_this = s->running[i]->n_lp_this = s->running[i]->n_draft = 0;
        for (int i = 0; i < s->n_running; i++) {
            sched_seq *q = s->running[i];
            if (q->n_tok - q->n_cached == 1 && budget > 0) {
                q->n_this = 1;
                budget--;
            }
        }
        /* Prefill chunks, oldest admission first. */
        for (;;) {
            sched_seq *oldest = NULL;
            for (int i = 0; i < s->n_running; i++) {
                sched_seq *q = s->running[i];
                if (q->n_this == 0 && q->n_tok - q->n_cached > 1 && (!oldest || q->order < oldest->order))
                    oldest = q;
            }
            if (!oldest || budget == 0)
                break;
            int n = HY_MIN(oldest->n_tok - oldest->n_cached, budget);
            if (lp_rows(oldest, n) > lp_budget) /* a scoring chunk ends where the logit rows run out */
                n = HY_MAX(oldest->n_cached, oldest->plp_done - 1) - oldest->n_cached + lp_budget;
            if (n == 0) {
                oldest->n_this = -1; /* no rows left this step: wait for the next */
                continue;
            }
            oldest->n_this = n;
            oldest->n_lp_this = lp_rows(oldest, n);
            lp_budget -= oldest->n_lp_this;
            budget -= n;
        }
        for (int i = 0; i < s->n_running; i++)
            if (s->running[i]->n_this < 0)
                s->running[i]->n_this = 0;
        left = budget;
        /* Blocks for this step's tokens. */
        bool short_of_blocks = false;
        for (int i = 0; i < s->n_running; i++) {
            sched_seq *q = s->running[i];
            if (q->n_this && grow_blocks(s, q, q->n_cached + q->n_this) != HY_OK) {
                short_of_blocks = true;
                break;
            }
        }
        if (!short_of_blocks)
            break;
        int victim = newest_running(s);
        if (s->n_running == 1) {
            /* Alone and still out of room: the cache cannot hold this sequence. */
            sched_seq *q = s->running[0];
            s->n_running = 0;
            finish_choice(s, q, "length");
            seq_free(s, q);
            return 0;
        }
        preempt_one(s, victim);
    }
    plan_drafts(s, left); /* only now: a draft takes free blocks or none, never a sequence's */
    int n = 0;
    for (int i = 0; i < s->n_running; i++)
        if (s->running[i]->n_this)
            s->b_seqs[n++] = s->running[i];
    qsort(s->b_seqs, (size_t)n, sizeof *s->b_seqs, cmp_seq);
    return n;
}

static void build_batch(sched *s, int n_seq, eng_batch *b)
{
    int t = 0, n_logits = 0, n_seg = 0, mb = 1;
    for (int i = 0; i < n_seq; i++)
        if (s->b_seqs[i]->n_blocks > mb)
            mb = s->b_seqs[i]->n_blocks;
    /* block-table width rounded up to a power of two (within the per-sequence maximum): a
     * backend that records steps by shape (CUDA graphs) sees a new shape when the longest
     * sequence doubles, not every BE_KV_BLOCK tokens */
    int mb2 = 1;
    while (mb2 < mb)
        mb2 *= 2;
    mb = HY_MIN(mb2, s->max_blocks_seq);
    for (int i = 0; i < n_seq; i++) {
        sched_seq *q = s->b_seqs[i];
        const eng_adapter *ea = q->req->adapter ? q->ea : NULL;
        bool own = ea && has_route(q->req);
        int t0 = t;
        for (int k = 0; k < q->n_this; k++, t++) {
            int pos = q->n_cached + k;
            /* a new adapter segment where the adapter (or the request's own router) changes */
            const eng_adapter *sa = own ? sched_route_pick(&q->rt, &q->req->route, pos + 1 == q->n_tok) : ea;
            if (t == 0 || s->b_segad[n_seg - 1] != sa) {
                s->b_segbeg[n_seg] = t;
                s->b_segad[n_seg++] = sa;
            }
            s->b_tok[t] = pos < q->n_tok ? q->toks[pos] : q->draft[pos - q->n_tok];
            s->b_pos[t] = pos;
            s->b_tseq[t] = i;
            s->b_slot[t] = q->blocks[pos / BE_KV_BLOCK] * BE_KV_BLOCK + pos % BE_KV_BLOCK;
        }
        s->b_seqlen[i] = q->n_cached + q->n_this;
        memcpy(s->b_bt + (size_t)i * mb, q->blocks, (size_t)q->n_blocks * sizeof(int32_t));
        for (int k = q->n_blocks; k < mb; k++)
            s->b_bt[(size_t)i * mb + k] = 0;
        /* rows ascend: this sequence's prompt-logprob rows, then its sampling row */
        int lo = HY_MAX(q->n_cached, q->plp_done - 1);
        for (int k = 0; k < q->n_lp_this; k++)
            s->b_logit_tok[n_logits++] = t0 + lo - q->n_cached + k;
        if (q->n_cached + q->n_this == q->n_tok + q->n_draft && q->req->max_tokens > 0)
            for (int k = q->n_draft; k >= 0; k--) /* the sampling row, then one per draft token */
                s->b_logit_tok[n_logits++] = t - 1 - k;
    }
    s->b_segbeg[n_seg] = t;
    memset(b, 0, sizeof *b);
    b->n_tok = t;
    b->tokens = s->b_tok;
    b->attn.n_tok = t;
    b->attn.n_seq = n_seq;
    b->attn.pos = s->b_pos;
    b->attn.tok_seq = s->b_tseq;
    b->attn.slot = s->b_slot;
    b->attn.seq_len = s->b_seqlen;
    b->attn.block_table = s->b_bt;
    b->attn.max_blocks = mb;
    b->n_seg = n_seg;
    b->seg_begin = s->b_segbeg;
    b->seg_adapter = s->b_segad;
    b->n_logits = n_logits;
    b->logits_tok = s->b_logit_tok;
}

/* ---------- outputs ---------- */

/* A token was sampled for q: record it, update text, decide whether q is done. Returns true
 * when q finished (the caller frees it). */
static bool on_token(sched *s, sched_seq *q, const sched_sample *smp)
{
    const sched_ops *ops = s->cfg.ops;
    sched_req *r = q->req;
    bool eog = !r->ignore_eos && ops->is_eog && ops->is_eog(s->cfg.ops_ctx, smp->token);
    char piece[256];
    size_t np = 0;
    q->toks[q->n_tok++] = smp->token;
    if (!eog && ops->detok)
        np = ops->detok(s->cfg.ops_ctx, q->state, smp->token, piece, sizeof piece);
    size_t old_len = q->gen_len;
    if (np && append(&q->gen, &q->gen_len, &q->gen_cap, piece, np) != 0) {
        fail_req(s, r, "out of memory");
        finish_choice(s, q, "error");
        return true;
    }
    const char *finish = NULL;
    size_t hold = 0;
    long at = r->n_stop ? smp_stop_check(q->gen, q->gen_len, old_len, (const char *const *)r->stop, r->n_stop, &hold)
                        : -1;
    if (at >= 0) {
        q->gen_len = (size_t)at;
        q->gen[at] = '\0';
        finish = "stop";
    } else if (eog) {
        finish = "stop";
    }
    int n_new = q->n_tok - q->n_prompt;
    if (!finish && (n_new >= r->max_tokens || q->n_tok >= q->cap_tok))
        finish = "length";
    if (finish && strcmp(finish, "length") == 0 && ops->detok_flush) {
        np = ops->detok_flush(s->cfg.ops_ctx, q->state, piece, sizeof piece);
        if (np)
            append(&q->gen, &q->gen_len, &q->gen_cap, piece, np);
    }
    sched_req_lock(r);
    sched_choice *c = &r->choices[q->choice];
    if (r->t_first == 0)
        r->t_first = hy_now();
    c->n_gen++;
    bool route_oom = r->route.view && q->acquired && sched_route_take(&q->rt, &c->route, s->cfg.n_layer);
    bool lp_oom = false;
    if (r->sp.logprobs) {
        if (c->n_gen > c->lp_cap) {
            int cap = c->lp_cap ? c->lp_cap * 2 : 16;
            sched_sample *p = realloc(c->lp, (size_t)cap * sizeof *p);
            if (p) {
                c->lp = p;
                c->lp_cap = cap;
            }
        }
        if (c->n_gen <= c->lp_cap) {
            c->lp[c->n_gen - 1] = *smp;
        } else { /* readers take lp[0..n_gen): never count a token without its entry; the request fails */
            c->n_gen--;
            lp_oom = true;
        }
    }
    size_t visible = finish ? q->gen_len : q->gen_len - hold;
    if (visible > q->shown && append(&c->text, &c->len, &c->cap, q->gen + q->shown, visible - q->shown) == 0)
        q->shown = visible;
    sched_req_unlock(r);
    touch(s, r);
    if (route_oom || lp_oom) {
        fail_req(s, r, lp_oom ? "out of memory for logprobs" : hy_err_msg());
        finish = "error";
    }
    if (finish)
        finish_choice(s, q, finish);
    return finish != NULL;
}

/* Blocks past the ones q's tokens need (a rejected draft's) go back. */
static void trim_blocks(sched *s, sched_seq *q)
{
    int need = (q->n_tok + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
    while (q->n_blocks > need)
        kv_prefix_put(&s->kv, q->blocks[--q->n_blocks]);
}

/* q sampled smp from the row before its draft (on_token done; done: it finished). While the token
 * just sampled equals the next draft token, that draft's K/V is right and the next row gives the
 * next token: sample it with the request's own sampler (every transform, penalties and grammar
 * included) and go on. Keeping a draft exactly when the target's sample equals it is the
 * speculative-sampling rule for a deterministic draft: draft d is kept with probability p(d), and
 * a rejection yields a token drawn from p with d removed and renormalised, so every token has the
 * target's distribution (and, with a seed, the very tokens of decoding without drafts: one sample
 * per token either way). *li moves past q's draft rows. Returns whether q finished. */
static bool verify_drafts(sched *s, sched_seq *q, sched_sample *smp, int *li, bool done)
{
    const sched_ops *ops = s->cfg.ops;
    int nd = q->n_draft, acc = 0;
    const float *rows = s->logits + (size_t)*li * (size_t)s->cfg.n_vocab;
    while (!done && acc < nd && smp->token == q->draft[acc]) {
        q->n_cached++; /* the draft token's K/V, computed at its position, is the accepted token's */
        const float *lg = rows + (size_t)acc++ * (size_t)s->cfg.n_vocab;
        if (ops->sample(s->cfg.ops_ctx, q->state, lg, q->toks, q->n_prompt, q->n_tok, smp)) {
            fail_req(s, q->req, hy_err_msg());
            finish_choice(s, q, "error");
            done = true;
            break;
        }
        done = on_token(s, q, smp);
    }
    *li += nd;
    s->n_spec_drafts++;
    s->n_spec_tokens += (uint64_t)nd;
    s->n_spec_accepted += (uint64_t)acc;
    sched_req_lock(q->req);
    q->req->spec_drafted += (uint64_t)nd;
    q->req->spec_accepted += (uint64_t)acc;
    sched_req_unlock(q->req);
    q->spec_k = spec_next_k(q->spec_k, nd, acc, s->cfg.spec_max_draft);
    q->n_draft = 0;
    if (!done)
        trim_blocks(s, q);
    return done;
}

/* The logprobs of q's prompt tokens from this step's rows lg[n_lp_this][n_vocab] (before
 * n_cached moves on). False when the logits cannot be scored (the request has failed). */
static bool score_prompt(sched *s, sched_seq *q, const float *lg)
{
    sched_req *r = q->req;
    int first = HY_MAX(q->n_cached, q->plp_done - 1) + 1; /* prompt token the first row scores */
    for (int k = 0; k < q->n_lp_this; k++) {
        smp_result res;
        sched_sample *o = &s->b_plp[k];
        if (smp_score(lg + (size_t)k * (size_t)s->cfg.n_vocab, s->cfg.n_vocab, q->toks[first + k], r->prompt_lp,
                      &res)) {
            char msg[256];
            snprintf(msg, sizeof msg, "prompt logprobs: %s", hy_err_msg());
            fail_req(s, r, msg);
            return false;
        }
        o->token = res.id;
        o->logprob = res.logprob;
        o->n_top = HY_MIN(res.n_top, SCHED_MAX_TOP);
        for (int j = 0; j < o->n_top; j++) {
            o->top_id[j] = res.top_id[j];
            o->top_lp[j] = res.top_logprob[j];
        }
    }
    q->plp_done = first + q->n_lp_this;
    sched_req_lock(r);
    memcpy(r->plp[q->prompt_idx] + first, s->b_plp, (size_t)q->n_lp_this * sizeof *s->b_plp);
    r->n_plp[q->prompt_idx] = q->plp_done;
    sched_req_unlock(r);
    touch(s, r);
    return true;
}

/* Requests with sequences waiting for their first admission. Their sequences are contiguous in
 * the list (preempted ones only ever go to the front), so count group ends. */
static void count_waiting(sched *s)
{
    int n = 0;
    for (sched_seq *q = s->waiting_head; q; q = q->next)
        if (!q->preempted && (!q->next || q->next->req != q->req || q->next->preempted))
            n++;
    pthread_mutex_lock(&s->mu);
    s->waiting_reqs = n;
    pthread_mutex_unlock(&s->mu);
}

static void publish_stats(sched *s)
{
    const sched_ops *ops = s->cfg.ops;
    sched_stats st;
    memset(&st, 0, sizeof st);
    st.steps = s->n_steps;
    st.tokens_forwarded = s->n_forwarded;
    st.preemptions = s->n_preempt;
    st.spec_drafts = s->n_spec_drafts;
    st.spec_draft_tokens = s->n_spec_tokens;
    st.spec_accepted = s->n_spec_accepted;
    memcpy(st.step_hist, s->step_hist, sizeof st.step_hist);
    st.step_s_sum = s->step_s_sum;
    pthread_mutex_lock(&s->mu);
    st.waiting_reqs = s->waiting_reqs + s->n_inbox;
    pthread_mutex_unlock(&s->mu);
    st.running_seqs = s->n_running;
    st.waiting_seqs = 0;
    for (sched_seq *q = s->waiting_head; q; q = q->next)
        st.waiting_seqs++;
    st.kv_total = s->kv.n_blocks;
    st.kv_used = kv_prefix_held(&s->kv);
    st.kv_cached = s->kv.n_lru;
    st.prefix_queries = s->prefix_queries;
    st.prefix_hits = s->prefix_hits;
    st.running_adapters[0] = st.waiting_adapters[0] = '\0';
    if (ops->adapter_name) {
        for (int pass = 0; pass < 2; pass++) {
            char *out = pass ? st.waiting_adapters : st.running_adapters;
            size_t cap = sizeof st.running_adapters, len = 0;
            void *seen[64];
            int n_seen = 0, idx = 0;
            sched_seq *w = s->waiting_head;
            for (;;) {
                sched_seq *q = pass ? w : (idx < s->n_running ? s->running[idx++] : NULL);
                if (!q)
                    break;
                if (pass)
                    w = w->next;
                void *a = q->req->adapter;
                int k = 0;
                while (k < n_seen && seen[k] != a)
                    k++;
                if (!a || k < n_seen || n_seen == (int)HY_ARRAY_LEN(seen))
                    continue;
                seen[n_seen++] = a;
                const char *name = ops->adapter_name(s->cfg.ops_ctx, a);
                int w2 = snprintf(out + len, cap - len, "%s%s", len ? "," : "", name ? name : "?");
                if (w2 < 0 || (size_t)w2 >= cap - len) {
                    out[len] = '\0'; /* list whole names only */
                    break;
                }
                len += (size_t)w2;
            }
        }
    }
    pthread_mutex_lock(&s->stats_mu);
    s->stats = st;
    pthread_mutex_unlock(&s->stats_mu);
}

void sched_get_stats(sched *s, sched_stats *out)
{
    pthread_mutex_lock(&s->stats_mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->stats_mu);
}

const double sched_step_buckets[SCHED_STEP_BUCKETS] = {0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1,
                                                       0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 1, 2, 5};

static void note_step_time(sched *s, double dt)
{
    int b = 0;
    while (b < SCHED_STEP_BUCKETS && dt > sched_step_buckets[b])
        b++;
    s->step_hist[b]++;
    s->step_s_sum += dt;
}

int sched_step(sched *s)
{
    const sched_ops *ops = s->cfg.ops;
    double t0 = hy_now();
    if (ops->housekeeping)
        ops->housekeeping(s->cfg.ops_ctx);
    drain_inbox(s);
    sweep_cancelled(s);
    admit(s);
    int n_seq = plan_step(s);
    int n_tok = 0;
    if (n_seq > 0) {
        eng_batch b;
        build_batch(s, n_seq, &b);
        n_tok = b.n_tok;
        int rc = ops->forward(s->cfg.ops_ctx, &b, s->logits);
        if (rc) {
            /* The forward failed: end the requests of this step with the message, keep serving. */
            char msg[256];
            snprintf(msg, sizeof msg, "forward pass failed: %s", hy_err_msg());
            for (int i = 0; i < n_seq; i++) {
                sched_seq *q = s->b_seqs[i];
                fail_req(s, q->req, msg);
                finish_choice(s, q, "error");
                for (int k = 0; k < s->n_running; k++)
                    if (s->running[k] == q) {
                        s->running[k] = s->running[--s->n_running];
                        break;
                    }
                seq_free(s, q);
            }
            n_tok = rc;
        } else {
            int li = 0;
            for (int i = 0; i < n_seq; i++) {
                sched_seq *q = s->b_seqs[i];
                bool lp_ok = true;
                if (q->n_lp_this) {
                    lp_ok = score_prompt(s, q, s->logits + (size_t)li * (size_t)s->cfg.n_vocab);
                    li += q->n_lp_this;
                }
                q->n_cached += q->n_this - q->n_draft; /* a draft's K/V counts once it is accepted */
                q->acq_tokens += (uint64_t)q->n_this;
                for (; (q->n_committed + 1) * BE_KV_BLOCK <= q->n_cached; q->n_committed++)
                    kv_prefix_commit(&s->kv, q->key, q->blocks[q->n_committed],
                                     q->toks + (size_t)q->n_committed * BE_KV_BLOCK, &q->link);
                bool at_end = q->n_cached == q->n_tok;
                const float *lg = at_end && q->req->max_tokens > 0 ? s->logits + (size_t)li++ * (size_t)s->cfg.n_vocab
                                                                   : NULL;
                if (!at_end && lp_ok)
                    continue;
                sched_sample smp;
                memset(&smp, 0, sizeof smp);
                bool done = true;
                if (!lp_ok) {
                    finish_choice(s, q, "error");
                } else if (!lg) {
                    finish_choice(s, q, "length"); /* max_tokens 0: scored, nothing to generate */
                } else if (ops->sample(s->cfg.ops_ctx, q->state, lg, q->toks, q->n_prompt, q->n_tok, &smp)) {
                    fail_req(s, q->req, hy_err_msg());
                    finish_choice(s, q, "error");
                } else {
                    done = on_token(s, q, &smp);
                }
                if (q->n_draft)
                    done = verify_drafts(s, q, &smp, &li, done);
                if (done) {
                    for (int k = 0; k < s->n_running; k++)
                        if (s->running[k] == q) {
                            s->running[k] = s->running[--s->n_running];
                            break;
                        }
                    seq_free(s, q);
                }
            }
            s->n_steps++;
            s->n_forwarded += (uint64_t)n_tok;
            note_step_time(s, hy_now() - t0);
        }
    }
    /* stats before the clients hear of this step: a client that saw a token finds its request
     * counted (the drain at shutdown reads these) */
    count_waiting(s);
    publish_stats(s);
    notify_touched(s);
    return n_tok;
}

/* ---------- the thread ---------- */

static void *engine_main(void *arg)
{
    sched *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->stop && !s->kick && s->n_inbox == 0 && s->n_running == 0 && !s->waiting_head)
            pthread_cond_wait(&s->cv, &s->mu);
        bool stop = s->stop;
        s->kick = false;
        pthread_mutex_unlock(&s->mu);
        if (stop)
            break;
        int n = sched_step(s);
        if (n == 0 && s->n_running == 0 && s->waiting_head) {
            /* Nothing admissible (e.g. no adapter slot): wait briefly for a change. */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 5 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_mutex_lock(&s->mu);
            if (!s->stop && s->n_inbox == 0)
                pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            pthread_mutex_unlock(&s->mu);
        }
    }
    fail_everything(s, "cancelled");
    publish_stats(s);
    if (s->cfg.ops->thread_exit)
        s->cfg.ops->thread_exit(s->cfg.ops_ctx);
    return NULL;
}

void sched_wake(sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->kick = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

int sched_start(sched *s)
{
    if (s->thread_started)
        return HY_OK;
    if (pthread_create(&s->thread, NULL, engine_main, s) != 0)
        return hy_err_set(HY_ENOMEM, "cannot start the engine thread");
    s->thread_started = true;
    return HY_OK;
}

void sched_stop(sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->thread_started) {
        pthread_join(s->thread, NULL);
        s->thread_started = false;
    }
}
