/* srv_gen.c - the OpenAI generation routes, POST /v1/completions and /v1/chat/completions (parse,
 * pick base or adapter, loading it on first use, tokenize, check the context, submit to the
 * scheduler, answer whole when it finishes), and GET /v1/models. Streams are srv_sse.c's. HTTP
 * threads; never runs the model. */
#include "server/srv_conn.h"

#include "server/hydra_view.h"
#include "server/srv_lp.h"
#include "server/srv_resolve.h"
#include "server/srv_stack.h"
#include "engine/hy.h"

#include <limits.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int tokenize_request(conn *c, api_error *e, int32_t ***ids_out, int **n_out, int *np_out)
{
    srv *s = c->s;
    api_request *r = &c->ar;
    int np = r->kind == API_CHAT ? 1 : r->n_prompts;
    int32_t **ids = calloc((size_t)np, sizeof *ids);
    int *n = calloc((size_t)np, sizeof *n);
    if (!ids || !n)
        goto oom;
    for (int i = 0; i < np; i++) {
        int rc;
        if (r->kind == API_CHAT) {
            if (!s->chat_ok) {
                api_error_set(e, 400, "invalid_request_error", "messages", "",
                              "this model has no supported chat template; use /v1/completions");
                goto fail;
            }
            tok_msg *msgs;
            char **owned, *text = NULL;
            int n_owned, n_msgs = srv_tools_msgs(r, &msgs, &owned, &n_owned);
            if (n_msgs < 0)
                goto oom;
            rc = tok_chat_apply(s->chat, msgs, n_msgs, true, &text);
            srv_tools_msgs_free(msgs, owned, n_owned);
            if (rc) {
                api_error_set(e, 400, "invalid_request_error", "messages", "", "%s", hy_err_msg());
                goto fail;
            }
            const char *bos = tok_bos(s->vocab) >= 0 ? tok_text(s->vocab, tok_bos(s->vocab)) : NULL;
            bool add_bos = tok_add_bos(s->vocab) && !(bos && bos[0] && strncmp(text, bos, strlen(bos)) == 0);
            rc = tok_encode(s->vocab, text, strlen(text), true, add_bos, &ids[i], &n[i]);
            free(text);
        } else if (r->prompts[i].text) {
            rc = tok_encode(s->vocab, r->prompts[i].text, strlen(r->prompts[i].text), true,
                            tok_add_bos(s->vocab), &ids[i], &n[i]);
        } else {
            n[i] = r->prompts[i].n_ids;
            ids[i] = malloc((size_t)n[i] * sizeof(int32_t));
            if (!ids[i])
                goto oom;
            memcpy(ids[i], r->prompts[i].ids, (size_t)n[i] * sizeof(int32_t));
            rc = 0;
            for (int k = 0; k < n[i]; k++)
                if (ids[i][k] >= tok_n_vocab(s->vocab)) {
                    api_error_set(e, 400, "invalid_request_error", "prompt", "invalid_value",
                                  "token id %d is out of the vocabulary (%d)", ids[i][k], tok_n_vocab(s->vocab));
                    goto fail;
                }
        }
        if (rc) {
            api_error_set(e, 400, "invalid_request_error", "prompt", "", "%s", hy_err_msg());
            goto fail;
        }
        if (n[i] == 0) {
            api_error_set(e, 400, "invalid_request_error", r->kind == API_CHAT ? "messages" : "prompt",
                          "invalid_value", "the prompt is empty");
            goto fail;
        }
        if (n[i] >= s->n_ctx) {
            api_error_set(e, 400, "invalid_request_error", r->kind == API_CHAT ? "messages" : "prompt",
                          "context_length_exceeded",
                          "This model's maximum context length is %d tokens. However, your prompt has %d tokens.",
                          s->n_ctx, n[i]);
            goto fail;
        }
    }
    *ids_out = ids;
    *n_out = n;
    *np_out = np;
    return 0;
oom:
    api_error_set(e, 500, "server_error", "", "", "out of memory");
fail:
    for (int i = 0; ids && i < np; i++)
        free(ids[i]);
    free(ids);
    free(n);
    return HY_EINVAL;
}

static void on_engine_event(void *ctx)
{
    conn *c = ctx;
    pthread_mutex_lock(&c->mu);
    if (c->alive && c->suspended) {
        c->suspended = false;
        MHD_resume_connection(c->mc);
    }
    pthread_mutex_unlock(&c->mu);
}

static void on_req_free(void *ctx) { srv_conn_unref(ctx); }

/* OpenAI's finish reasons only: a choice that ended otherwise (cancelled at shutdown, failed)
 * has none; its request answers with an error instead (srv_req_cut). */
const char *srv_finish_name(const char *f)
{
    if (!f)
        return NULL;
    if (!strcmp(f, "stop") || !strcmp(f, "length"))
        return f;
    return NULL;
}

/* Under the request lock: the request ended without finishing a choice (the server stopped). */
bool srv_req_cut(const sched_req *r)
{
    for (int i = 0; i < r->n_choices; i++)
        if (r->choices[i].done && r->choices[i].finish && !srv_finish_name(r->choices[i].finish))
            return true;
    return false;
}

/* Per-adapter counts (srv_count_served) for what c runs: the adapter in `model`, or each member of
 * the stack in `lora` (its entries with a non-zero scale). Nothing for the base model. */
static void count_adapters(conn *c, int requests, uint64_t prompt, uint64_t gen, uint64_t drafted, uint64_t accepted)
{
    if (c->ad && !ad_stack_n(c->ad))
        srv_count_served(c->s, c->ar.model, requests, prompt, gen, drafted, accepted);
    for (int i = 0; c->ad && ad_stack_n(c->ad) && i < c->ar.lora.n; i++)
        if (c->ar.lora.e[i].scale != 0.0)
            srv_count_served(c->s, c->ar.lora.e[i].name, requests, prompt, gen, drafted, accepted);
}

void srv_record_finished(conn *c)
{
    if (c->recorded)
        return;
    c->recorded = true;
    sched_req *r = c->req;
    int gen = 0;
    for (int i = 0; i < r->n_choices; i++)
        gen += r->choices[i].n_gen;
    double ttft = r->t_first > 0 ? r->t_first - r->t_arrival : -1.0;
    srv_metrics_request(&c->s->metrics, ttft, (r->t_done > 0 ? r->t_done : hy_now()) - r->t_arrival,
                        c->n_prompt_total, gen);
    count_adapters(c, 0, (uint64_t)c->n_prompt_total, (uint64_t)gen, r->spec_drafted, r->spec_accepted);
}

static enum MHD_Result answer_whole(conn *c, struct MHD_Connection *mc)
{
    sched_req *r = c->req;
    sched_req_lock(r);
    if (r->failed) {
        char msg[300];
        snprintf(msg, sizeof msg, "%s", r->error);
        int status = r->fail_status ? r->fail_status : 500; /* 503: no adapter slot in time */
        sched_req_unlock(r);
        return srv_err(c, mc, status, "server_error", "", "", msg);
    }
    if (srv_req_cut(r)) {
        sched_req_unlock(r);
        return srv_err(c, mc, 503, "server_error", "", "", "the server is shutting down; the request was not completed");
    }
    srv_record_finished(c);
    api_choice *ch = calloc((size_t)r->n_choices, sizeof *ch);
    srv_lp *lb = calloc((size_t)r->n_choices, sizeof *lb);
    char **texts = c->echo ? calloc((size_t)r->n_choices, sizeof *texts) : NULL;
    bool want_rt = c->ar.hydra.return_router;
    srv_hydra_view *hv = want_rt ? calloc((size_t)r->n_choices, sizeof *hv) : NULL;
    int gen = 0;
    char *json = NULL;
    if (ch && lb && (hv || !want_rt) && (texts || !c->echo)) {
        for (int i = 0; i < r->n_choices; i++) {
            sched_choice *x = &r->choices[i];
            int p = i / r->n;
            ch[i] = (api_choice){.index = i, .text = x->text ? x->text : "", .text_len = x->len,
                                 .finish_reason = srv_finish_name(x->finish)};
            gen += x->n_gen;
            if (c->echo) { /* the prompt, then the completion */
                size_t pl = strlen(c->echo[p]);
                if ((texts[i] = malloc(pl + x->len + 1))) {
                    memcpy(texts[i], c->echo[p], pl);
                    memcpy(texts[i] + pl, ch[i].text, x->len);
                    texts[i][pl + x->len] = '\0';
                    ch[i].text = texts[i];
                    ch[i].text_len = pl + x->len;
                }
            }
            bool with_plp = c->echo && r->plp;
            if (c->ar.logprobs && (x->lp || with_plp) &&
                srv_lp_build(c->s, with_plp ? r->plp[p] : NULL, with_plp ? r->n_plp[p] : 0, x->lp, 0,
                             x->lp ? x->n_gen : 0, c->ar.top_logprobs, &lb[i]) == 0) {
                ch[i].n_lp = lb[i].n;
                ch[i].lp = lb[i].lp;
            }
            if (hv) {
                srv_hydra_view_make(&x->route, 0, true, &hv[i]);
                ch[i].router = &hv[i].rt;
            }
            if (c->ts)
                srv_toolscan_whole(&c->ts[i], ch[i].text, ch[i].text_len, &ch[i]);
        }
        api_usage u = {c->n_prompt_total, gen, r->n_cached_tokens};
        json = api_format_response(c->ar.kind, c->id, c->created, c->model, ch, r->n_choices, &u, c->ar.logprobs);
        for (int i = 0; i < r->n_choices; i++)
            srv_lp_free(&lb[i]);
    }
    sched_req_unlock(r);
    for (int i = 0; texts && i < r->n_choices; i++)
        free(texts[i]);
    free(texts);
    free(ch);
    free(lb);
    free(hv);
    if (!json)
        return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
    return srv_send_json(c, mc, 200, json);
}

/* Whole answer: stay suspended until the engine says the request is finished (each engine
 * event resumes the connection; the handler then comes back here). */
enum MHD_Result srv_gen_wait(conn *c, struct MHD_Connection *mc)
{
    pthread_mutex_lock(&c->mu);
    bool gone = c->gone;
    sched_req_lock(c->req);
    bool fin = sched_req_finished(c->req);
    sched_req_unlock(c->req);
    if (!fin && !gone) {
        c->suspended = true;
        MHD_suspend_connection(mc);
    }
    pthread_mutex_unlock(&c->mu);
    if (gone)
        return MHD_NO; /* the client closed: MHD drops the connection, on_completed cancels */
    if (!fin)
        return MHD_YES;
    srv_watch_remove(c);
    return answer_whole(c, mc);
}

/* The loader a request waited for has ended (loader thread): resume the connection. */
static void resolve_wake(void *ctx, int status, const char *msg, ad_adapter *pinned)
{
    conn *c = ctx;
    pthread_mutex_lock(&c->mu);
    if (pinned && c->ar.lora.given) /* a stack member: held until the stack itself is pinned and done */
        c->held[c->n_held++] = pinned;
    else if (pinned)
        c->ad = pinned; /* the request's pin, taken by the loader: no eviction can come between */
    pthread_mutex_unlock(&c->mu);
    srv_conn_load_done(c, status, strdup(msg ? msg : ""));
}

static enum MHD_Result generation_for_model(conn *c, struct MHD_Connection *mc);

/* Load adapter `name` on first use and come back to generation_for_model when it is in (or
 * answer why not). A name no resolver knows goes on as before: the 404 follows. */
static enum MHD_Result resolve(conn *c, struct MHD_Connection *mc, const char *name)
{
    atomic_fetch_add(&c->refs, 1); /* held by the loader until it wakes us */
    c->state = R_RESOLVE_WAIT;
    int rr = srv_resolve_start(c->s->resolver, name, resolve_wake, c);
    if (rr == HY_OK)
        return srv_gen_resolve_wait(c, mc);
    atomic_fetch_sub(&c->refs, 1);
    c->state = R_GEN;
    c->resolved = true; /* no second try, for a model or a stack */
    if (rr == HY_EINVAL)
        return srv_err(c, mc, 400, "invalid_request_error", c->ar.lora.given ? "lora" : "model", "", hy_err_msg());
    if (rr == HY_ENOMEM)
        return srv_err(c, mc, 500, "server_error", "model", "", hy_err_msg());
    return generation_for_model(c, mc);
}

/* Back from waiting for a first-use load: answer its failure, or go on with the request. */
enum MHD_Result srv_gen_resolve_wait(conn *c, struct MHD_Connection *mc)
{
    pthread_mutex_lock(&c->mu);
    bool done = c->load_done;
    if (!done) {
        c->suspended = true;
        MHD_suspend_connection(mc);
    }
    pthread_mutex_unlock(&c->mu);
    if (!done)
        return MHD_YES;
    c->state = R_GEN;
    c->load_done = false;
    if (c->load_status) { /* 400 invalid adapter, 404 gone again, 502 not fetched, 503 no room */
        char msg[600];
        snprintf(msg, sizeof msg, "%s", c->load_json ? c->load_json : "");
        int st = c->load_status;
        return srv_err(c, mc, st, st < 500 ? "invalid_request_error" : "server_error", "model",
                       st == 404 ? "model_not_found" : "adapter_load_failed", msg);
    }
    if (!c->ar.lora.given)
        c->resolved = true; /* pin it now; never a second load for this request (a stack goes on
                             * to its next missing member, at most one load per member) */
    return generation_for_model(c, mc);
}

enum MHD_Result srv_gen_start(conn *c, struct MHD_Connection *mc, api_kind kind)
{
    api_error e;
    if (api_parse_request(kind, c->body ? c->body : "", c->len, &c->ar, &e))
        return srv_send_err(c, mc, &e);
    c->have_ar = true;
    return generation_for_model(c, mc);
}

static enum MHD_Result generation_for_model(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    api_error e;
    api_request *ar = &c->ar;
    api_kind kind = ar->kind;
    /* model -> base or adapter; or a stack of adapters on the base (the lora field) */
    if (ar->lora.given) {
        const char *missing =
            s->resolver && !c->resolved && c->n_held < ar->lora.n ? srv_stack_missing(s->reg, ar) : NULL;
        if (missing) /* one member at a time loaded on first use, then back here */
            return resolve(c, mc, missing);
        if (srv_stack_pin(s->reg, ar, s->cfg.served_name, s->cfg.max_loras, &c->ad, &e))
            return srv_send_err(c, mc, &e);
        c->model = strdup(s->cfg.served_name);
    } else if (srv_is_base_name(s, ar->model)) {
        c->model = strdup(s->cfg.served_name);
    } else {
        int rc = c->ad ? HY_OK : s->reg ? ad_reg_pin(s->reg, ar->model, &c->ad) : HY_ENOTFOUND; /* c->ad: pinned by the resolver */
        if ((rc == HY_ENOTFOUND || rc == HY_EBUSY) && s->resolver && !c->resolved) /* load on first use */
            return resolve(c, mc, ar->model);
        if (rc) {
            char msg[600];
            snprintf(msg, sizeof msg, rc == HY_EBUSY ? "The model `%s` is loading or being unloaded."
                                                    : "The model `%s` does not exist.", ar->model);
            return srv_err(c, mc, 404, "invalid_request_error", "model", "model_not_found", msg);
        }
        c->model = strdup(ar->model);
    }
    if (!c->model)
        return MHD_NO;
    count_adapters(c, 1, 0, 0, 0, 0);
    int ad_heads = c->ad ? ad_K(c->ad) : 0;
    if (api_hydra_check(&ar->hydra, ad_heads, &e))
        return srv_send_err(c, mc, &e);
    if (kind == API_COMPLETION && ar->n_prompts > s->cfg.max_prompts) {
        api_error_set(&e, 400, "invalid_request_error", "prompt", "invalid_value",
                      "'prompt' holds %d prompts; this server takes at most %d per request", ar->n_prompts,
                      s->cfg.max_prompts);
        return srv_send_err(c, mc, &e);
    }
    int32_t **ids = NULL;
    int *n = NULL, np = 0, rc_echo = 0;
    if (tokenize_request(c, &e, &ids, &n, &np))
        return srv_send_err(c, mc, &e);
    int min_room = INT_MAX;
    c->n_prompt_total = 0;
    for (int i = 0; i < np; i++) {
        min_room = HY_MIN(min_room, s->n_ctx - n[i]);
        c->n_prompt_total += n[i] * ar->n;
    }
    int max_tokens = ar->max_tokens >= 0 ? ar->max_tokens : (kind == API_COMPLETION ? 16 : min_room);
    if (ar->max_tokens >= 0 && max_tokens > min_room) { /* as OpenAI and vLLM: refused, never cut */
        for (int i = 0; i < np; i++)
            free(ids[i]);
        free(ids);
        free(n);
        char msg[300];
        snprintf(msg, sizeof msg, "This model's maximum context length is %d tokens. However, you requested %lld "
                 "tokens (%d in the prompt, %d in the completion).", s->n_ctx,
                 (long long)s->n_ctx - min_room + ar->max_tokens, s->n_ctx - min_room, ar->max_tokens);
        return srv_err(c, mc, 400, "invalid_request_error", "max_tokens", "context_length_exceeded", msg);
    }
    if (max_tokens > min_room) /* the defaults: 16 (completions) near the end of the context */
        max_tokens = min_room;
    if (ar->echo) {
        if (!(c->echo = calloc((size_t)np, sizeof *c->echo)))
            rc_echo = HY_ENOMEM;
        c->req_prompts = np;
        for (int i = 0; !rc_echo && i < np; i++)
            if (!(c->echo[i] = srv_echo_text(s, &ar->prompts[i])))
                rc_echo = HY_ENOMEM;
    }
    smp_constraint *cst = NULL;
    int rc = s->gcache ? srv_struct_constraint(s->gcache, ar, tok_n_vocab(s->vocab), s->cfg.json_ws_flexible, &cst, &e)
                       : api_error_set(&e, 500, "server_error", "", "", "out of memory");
    sched_sampling sp = {ar->temperature, ar->top_p, ar->min_p, ar->top_k, ar->presence_penalty,
                         ar->frequency_penalty, ar->repetition_penalty, ar->has_seed, (uint64_t)ar->seed,
                         ar->top_logprobs, ar->logprobs, cst};
    sched_req *r = NULL;
    if (!rc && rc_echo)
        rc = api_error_set(&e, 500, "server_error", "", "", "out of memory");
    if (!rc && (rc = sched_req_create(np, (const int32_t *const *)ids, n, ar->n, max_tokens,
                                      (const char *const *)ar->stop, ar->n_stop, ar->ignore_eos, &sp, c->ad, &r)))
        api_error_set(&e, 500, "server_error", "", "", "%s", hy_err_msg());
    /* echo + logprobs: the prompt tokens' logprobs too (the engine computes them only when asked) */
    if (!rc && ar->echo && ar->logprobs && (rc = sched_req_want_prompt_lp(r, ar->top_logprobs))) {
        api_error_set(&e, 500, "server_error", "", "", "%s", hy_err_msg());
        sched_req_release(r);
        r = NULL;
    }
    for (int i = 0; i < np; i++)
        free(ids[i]);
    free(ids);
    free(n);
    if (rc) {
        smp_constraint_free(cst);
        return srv_send_err(c, mc, &e);
    }
    r->constraint_free = smp_constraint_free;
    r->no_spec = !ar->speculative;
    if (ar->cache_salt) { /* the prefix cache's tenant: 64 bits of its SHA-256 (0 stays "none") */
        unsigned char d[SHA256_DIGEST_LENGTH];
        SHA256((const unsigned char *)ar->cache_salt, strlen(ar->cache_salt), d);
        memcpy(&r->cache_salt, d, sizeof r->cache_salt);
        r->cache_salt |= 1;
    }
    r->route = srv_hydra_opts(&ar->hydra, ad_heads);
    r->notify = on_engine_event;
    r->notify_ctx = c;
    r->notify_free = on_req_free;
    atomic_fetch_add(&c->refs, 1); /* held by the request, dropped in on_req_free */
    c->req = r;
    c->created = (int64_t)time(NULL);
    snprintf(c->id, sizeof c->id, "%s-%llx%06llx", kind == API_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)c->created, (unsigned long long)atomic_fetch_add(&s->next_id, 1));
    c->sc = calloc((size_t)r->n_choices, sizeof *c->sc);
    if (!c->sc)
        return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
    if (kind == API_CHAT && ar->st.tool_choice != API_TC_NONE) {
        if (!(c->ts = calloc((size_t)r->n_choices, sizeof *c->ts)))
            return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
        for (int i = 0; i < r->n_choices; i++)
            srv_toolscan_init(&c->ts[i], c->id + strlen("chatcmpl-"), i);
    }
    rc = sched_submit(s->sched, r);
    if (rc == HY_EBUSY)
        return srv_err(c, mc, 429, "rate_limit_error", "", "rate_limit_exceeded", hy_err_msg());
    if (rc == HY_ELIMIT)
        return srv_err(c, mc, 400, "invalid_request_error", "prompt", "context_length_exceeded", hy_err_msg());
    if (rc == HY_ECANCELED)
        return srv_err(c, mc, 503, "server_error", "", "", hy_err_msg());
    if (rc)
        return srv_err(c, mc, 500, "server_error", "", "", hy_err_msg());
    c->submitted = true;
    if (ar->stream)
        return srv_sse_start(c, mc);
    c->state = R_DONE_WAIT;
    srv_watch_add(c, mc);
    return srv_gen_wait(c, mc);
}

/* root is the adapter's name, not its path: paths are for admins (GET /v1/adapters). */
enum MHD_Result srv_gen_models(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    ad_reg_info *info;
    int n;
    if (srv_reg_snapshot(s, &info, &n))
        return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
    api_model_entry *m = calloc((size_t)n + 1, sizeof *m);
    char *json = NULL;
    if (m) {
        int k = 0;
        m[k++] = (api_model_entry){s->cfg.served_name, NULL, NULL, s->created};
        for (int i = 0; i < n; i++)
            if (info[i].state == AD_READY)
                m[k++] = (api_model_entry){info[i].name, s->cfg.served_name, info[i].name, s->created};
        json = api_format_models(m, k);
    }
    free(m);
    free(info);
    if (!json)
        return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
    return srv_send_json(c, mc, 200, json);
}
