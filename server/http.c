/* http.c - libmicrohttpd routes of the OpenAI-compatible server: auth, body cap, parse with
 * api/, tokenize, submit to the scheduler, answer whole or stream SSE from suspended
 * connections; admin adapter endpoints; /health and /metrics. Never runs the model. */
#include "server/http.h"
#include "server/hydra_view.h"
#include "server/srv_lp.h"
#include "server/srv_paths.h"
#include "server/srv_resolve.h"
#include "server/srv_tokenize.h"
#include "server/srv_ui.h"
#include "api/api.h"
#include "engine/hy.h"

#include <jansson.h>
#include <limits.h>
#include <microhttpd.h>
#include <netdb.h>
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

enum { R_NONE, R_GEN, R_DONE_WAIT, R_LOAD_WAIT, R_RESOLVE_WAIT };

#define API_MAX_URL 4096 /* longest https:// adapter URL (fetch_adapter's buffers hold it and a file name) */

typedef struct {
    int sent_text;          /* bytes of choice text already streamed */
    int sent_lp;            /* logprob entries already streamed */
    int sent_route;         /* router-view tokens already streamed */
    size_t sent_off;        /* completions: text_offset after the logprob entries streamed */
    bool role_sent, finish_sent, echo_sent;
} stream_choice;

typedef struct conn {
    srv *s;
    atomic_int refs;
    pthread_mutex_t mu;
    struct MHD_Connection *mc;
    bool alive, suspended;
    bool submitted;         /* req is in the engine's hands */
    bool gone;              /* the watcher saw the client close before a whole answer (mu) */
    uint64_t watch_id;      /* slot in srv.watch, 0 = none (srv.watch_mu) */
    char *body;
    size_t len, cap;
    bool too_big;
    int state;
    api_request ar;
    bool have_ar;
    sched_req *req;
    ad_adapter *ad;
    char id[64];
    int64_t created;
    char *model;            /* name echoed in responses */
    int n_prompt_total;
    char **echo;            /* [req_prompts] prompt texts when the request echoes, else NULL */
    int req_prompts;
    /* streaming */
    bool stream;
    stream_choice *sc;
    srv_toolscan *ts;       /* [n_choices] when the answer may be a tool call, else NULL */
    char *pend;
    size_t pend_len, pend_off;
    bool usage_sent, done_sent, recorded;
    bool resolved;          /* a first-use load of its model ran for this request */
    bool load_pinned;       /* the admin load asked for pinned: true */
    /* adapter loading on a worker thread (mu) */
    bool load_done;
    int load_status;
    char *load_json;
    char load_name[AD_NAME_MAX];
    char *load_path, *load_sha;
} conn;

static void conn_unref(conn *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    if (c->ad)
        ad_reg_unpin(c->s->reg, c->ad);
    if (c->have_ar)
        api_request_free(&c->ar);
    free(c->body);
    free(c->model);
    for (int i = 0; c->echo && c->req_prompts && i < c->req_prompts; i++)
        free(c->echo[i]);
    free(c->echo);
    free(c->sc);
    free(c->ts);
    free(c->pend);
    free(c->load_json);
    free(c->load_path);
    free(c->load_sha);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* ---------- responses ---------- */

/* hname/hval (both NULL: none): one more header, e.g. Retry-After or Allow. */
static enum MHD_Result send_buf(conn *c, struct MHD_Connection *mc, int status, const char *ctype, char *buf,
                                size_t len, const char *hname, const char *hval)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(buf);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", ctype);
    if (hname)
        MHD_add_response_header(r, hname, hval);
    enum MHD_Result ret = MHD_queue_response(mc, (unsigned)status, r);
    MHD_destroy_response(r);
    srv_metrics_status(&c->s->metrics, status);
    return ret;
}

static enum MHD_Result send_json(conn *c, struct MHD_Connection *mc, int status, char *json)
{
    if (!json)
        return MHD_NO;
    return send_buf(c, mc, status, "application/json", json, strlen(json), NULL, NULL);
}

static enum MHD_Result send_err(conn *c, struct MHD_Connection *mc, const api_error *e)
{
    char *j = api_error_json(e);
    if (!j)
        return MHD_NO;
    return send_buf(c, mc, e->status, "application/json", j, strlen(j), e->status == 429 ? "Retry-After" : NULL,
                    e->status == 429 ? "1" : NULL);
}

static enum MHD_Result err(conn *c, struct MHD_Connection *mc, int status, const char *type, const char *param,
                           const char *code, const char *msg)
{
    api_error e;
    api_error_set(&e, status, type, param, code, "%s", msg);
    return send_err(c, mc, &e);
}

/* ---------- auth ---------- */

static bool key_ok(struct MHD_Connection *mc, const char *want)
{
    if (!want || !want[0])
        return true;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    if (!h || strncmp(h, "Bearer ", 7) != 0)
        return false;
    /* Compare digests so neither the length nor the content leaks through timing. */
    unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)h + 7, strlen(h + 7), a);
    SHA256((const unsigned char *)want, strlen(want), b);
    return CRYPTO_memcmp(a, b, sizeof a) == 0;
}

/* ---------- adapters ---------- */

/* Room for one more element in *arr (n used of *cap, each size bytes), doubling. */
static int grow(void **arr, int n, int *cap, size_t size)
{
    if (n < *cap)
        return HY_OK;
    if (*cap > INT_MAX / 2)
        return HY_ENOMEM;
    int want = *cap ? *cap * 2 : 16;
    void *p = realloc(*arr, (size_t)want * size);
    if (!p)
        return HY_ENOMEM;
    *arr = p;
    *cap = want;
    return HY_OK;
}

srv_ad_stats *srv_stats_entry(srv *s, const char *name)
{
    for (int i = 0; i < s->n_stats; i++)
        if (strcmp(s->stats[i].name, name) == 0)
            return &s->stats[i];
    if (grow((void **)&s->stats, s->n_stats, &s->cap_stats, sizeof *s->stats))
        return NULL;
    srv_ad_stats *x = &s->stats[s->n_stats++];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    return x;
}

/* One more request routed to adapter `name`. The table holds the names requested since they
 * were loaded (forget_served drops one on unload), so it is bounded by the adapters loaded. */
static void count_served(srv *s, const char *name)
{
    pthread_mutex_lock(&s->mu);
    int i = 0;
    while (i < s->n_served && strcmp(s->served[i].name, name) != 0)
        i++;
    if (i == s->n_served && grow((void **)&s->served, s->n_served, &s->cap_served, sizeof *s->served) == 0) {
        s->n_served++;
        snprintf(s->served[i].name, sizeof s->served[i].name, "%s", name);
        s->served[i].requests = 0;
    }
    if (i < s->n_served)
        s->served[i].requests++;
    pthread_mutex_unlock(&s->mu);
}

static void forget_served(srv *s, const char *name)
{
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_served; i++)
        if (strcmp(s->served[i].name, name) == 0) {
            s->served[i] = s->served[--s->n_served];
            break;
        }
    pthread_mutex_unlock(&s->mu);
}

const char *srv_adapter_name(srv *s, const void *ad, char *buf, size_t cap)
{
    return s->reg && ad_reg_name_of(s->reg, ad, buf, cap) == HY_OK ? buf : NULL;
}

static bool is_base_name(srv *s, const char *m)
{
    return !m || !m[0] || strcmp(m, s->cfg.served_name) == 0;
}

/* ---------- generation ---------- */

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

static void on_req_free(void *ctx) { conn_unref(ctx); }

/* ---------- disconnect watch of whole answers ----------
 * libmicrohttpd 0.9.75 does not poll a suspended connection ("While a connection is suspended,
 * MHD will not detect disconnects by the client"), and a whole answer stays suspended until
 * its generation ends; a stream waits suspended as well while it is queued or between tokens (its
 * failed writes tell only once it has something to send). So one thread waits in epoll for
 * EPOLLRDHUP (and HUP/ERR) on the sockets of whole answers and streams: a client that closed gets its
 * request cancelled at once (the engine frees its KV within a step) and its connection resumed,
 * and the handler then closes it instead of answering. Slots are removed (EPOLL_CTL_DEL) while
 * the socket is still open: when the answer is queued or in on_completed, which MHD calls
 * before it closes the socket. Lock order: watch_mu, then conn.mu. */

static void *watch_main(void *arg)
{
    srv *s = arg;
    struct epoll_event ev[32];
    for (;;) {
        int n = epoll_wait(s->watch_ep, ev, (int)HY_ARRAY_LEN(ev), -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return NULL;
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u64 == 0)
                return NULL; /* the stop eventfd */
            bool cancelled = false;
            pthread_mutex_lock(&s->watch_mu);
            for (int k = 0; k < s->n_watch; k++) {
                if (s->watch[k].id != ev[i].data.u64)
                    continue;
                conn *c = s->watch[k].c;
                pthread_mutex_lock(&c->mu);
                c->gone = true;
                if (c->alive && c->suspended) {
                    c->suspended = false;
                    MHD_resume_connection(c->mc);
                }
                pthread_mutex_unlock(&c->mu);
                sched_req_cancel(c->req); /* valid: on_completed removes the slot before releasing it */
                cancelled = true;
                break;
            }
            pthread_mutex_unlock(&s->watch_mu);
            if (cancelled)
                sched_wake(s->sched);
        }
    }
}

/* Watch the socket of c (a whole answer about to wait for the engine). Without a slot (no
 * memory, no descriptor) the request still runs; its disconnect is then seen at the end. */
static void watch_add(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci || ci->connect_fd == MHD_INVALID_SOCKET || s->watch_ep < 0)
        return;
    pthread_mutex_lock(&s->watch_mu);
    if (grow((void **)&s->watch, s->n_watch, &s->cap_watch, sizeof *s->watch) == 0) {
        uint64_t id = ++s->watch_next;
        struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLONESHOT, .data.u64 = id};
        if (epoll_ctl(s->watch_ep, EPOLL_CTL_ADD, ci->connect_fd, &ev) == 0) {
            s->watch[s->n_watch++] = (srv_watch_slot){id, c, ci->connect_fd};
            c->watch_id = id;
            atomic_fetch_add(&c->refs, 1); /* held by the slot, dropped in watch_remove */
        }
    }
    pthread_mutex_unlock(&s->watch_mu);
}

/* Stop watching c (no-op when it is not watched). Call with c->mu not held. */
static void watch_remove(conn *c)
{
    srv *s = c->s;
    bool held = false;
    pthread_mutex_lock(&s->watch_mu);
    for (int k = 0; c->watch_id && k < s->n_watch; k++)
        if (s->watch[k].id == c->watch_id) {
            epoll_ctl(s->watch_ep, EPOLL_CTL_DEL, s->watch[k].fd, NULL);
            s->watch[k] = s->watch[--s->n_watch];
            c->watch_id = 0;
            held = true;
            break;
        }
    pthread_mutex_unlock(&s->watch_mu);
    if (held)
        conn_unref(c);
}

static int watch_start(srv *s)
{
    s->watch_ep = epoll_create1(EPOLL_CLOEXEC);
    s->watch_ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
    if (s->watch_ep < 0 || s->watch_ev < 0 || epoll_ctl(s->watch_ep, EPOLL_CTL_ADD, s->watch_ev, &ev) != 0 ||
        pthread_create(&s->watch_th, NULL, watch_main, s) != 0)
        goto fail;
    return HY_OK;
fail:
    if (s->watch_ep >= 0)
        close(s->watch_ep);
    if (s->watch_ev >= 0)
        close(s->watch_ev);
    s->watch_ep = s->watch_ev = -1;
    return hy_err_set(HY_EIO, "cannot start the disconnect watcher: %s", strerror(errno));
}

/* After MHD_stop_daemon: every request has completed, so no slot is left. */
static void watch_stop(srv *s)
{
    if (s->watch_ep < 0)
        return;
    uint64_t one = 1;
    if (write(s->watch_ev, &one, sizeof one) != (ssize_t)sizeof one)
        pthread_cancel(s->watch_th); /* cannot happen with a fresh eventfd; epoll_wait is a cancellation point */
    pthread_join(s->watch_th, NULL);
    close(s->watch_ep);
    close(s->watch_ev);
    s->watch_ep = s->watch_ev = -1;
}

/* OpenAI's finish reasons only: a choice that ended otherwise (cancelled at shutdown, failed)
 * has none; its request answers with an error instead (req_cut). */
static const char *finish_name(const char *f)
{
    if (!f)
        return NULL;
    if (!strcmp(f, "stop") || !strcmp(f, "length"))
        return f;
    return NULL;
}

/* Under the request lock: the request ended without finishing a choice (the server stopped). */
static bool req_cut(const sched_req *r)
{
    for (int i = 0; i < r->n_choices; i++)
        if (r->choices[i].done && r->choices[i].finish && !finish_name(r->choices[i].finish))
            return true;
    return false;
}

static void record_finished(conn *c)
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
}

static enum MHD_Result answer_whole(conn *c, struct MHD_Connection *mc)
{
    sched_req *r = c->req;
    sched_req_lock(r);
    if (r->failed) {
        char msg[300];
        snprintf(msg, sizeof msg, "%s", r->error);
        sched_req_unlock(r);
        return err(c, mc, 500, "server_error", "", "", msg);
    }
    if (req_cut(r)) {
        sched_req_unlock(r);
        return err(c, mc, 503, "server_error", "", "", "the server is shutting down; the request was not completed");
    }
    record_finished(c);
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
                                 .finish_reason = finish_name(x->finish)};
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
        return err(c, mc, 500, "server_error", "", "", "out of memory");
    return send_json(c, mc, 200, json);
}

static int pend_add(conn *c, char *chunk)
{
    if (!chunk)
        return HY_ENOMEM;
    size_t n = strlen(chunk);
    if (c->pend_off == c->pend_len)
        c->pend_off = c->pend_len = 0;
    char *p = realloc(c->pend, c->pend_len + n + 1);
    if (!p) {
        free(chunk);
        return HY_ENOMEM;
    }
    memcpy(p + c->pend_len, chunk, n);
    c->pend = p;
    c->pend_len += n;
    free(chunk);
    return 0;
}

/* Echo: choice i's first chunk is its prompt (and the prompt's logprobs); false while those are
 * still being computed (request locked, conn->mu held). */
static bool stream_echo(conn *c, int i)
{
    sched_req *r = c->req;
    stream_choice *sc = &c->sc[i];
    int p = i / r->n;
    bool with_plp = c->ar.logprobs && r->plp;
    if (with_plp && r->n_plp[p] < r->n_prompt[p])
        return false;
    api_choice ch = {.index = i, .text = c->echo[p], .text_len = strlen(c->echo[p])};
    srv_lp lb = {0};
    if (with_plp && srv_lp_build(c->s, r->plp[p], r->n_plp[p], NULL, 0, 0, c->ar.top_logprobs, &lb) == 0) {
        ch.n_lp = lb.n;
        ch.lp = lb.lp;
    }
    if (pend_add(c, api_format_chunk(c->ar.kind, c->id, c->created, c->model, &ch, false, c->ar.logprobs,
                                     c->ar.include_usage)) == 0) {
        sc->echo_sent = true;
        for (int j = 0; j < lb.n; j++)
            sc->sent_off += lb.lp[j].token ? strlen(lb.lp[j].token) : 0;
    }
    srv_lp_free(&lb);
    return sc->echo_sent;
}

/* Turn new engine results into SSE text (conn->mu held). */
static void stream_collect(conn *c)
{
    sched_req *r = c->req;
    api_kind k = c->ar.kind;
    bool usage_null = c->ar.include_usage;
    sched_req_lock(r);
    for (int i = 0; i < r->n_choices; i++) {
        sched_choice *x = &r->choices[i];
        stream_choice *sc = &c->sc[i];
        if (sc->finish_sent)
            continue;
        if (c->echo && !sc->echo_sent && !stream_echo(c, i))
            continue; /* the prompt's logprobs are not all computed yet: nothing after them either */
        bool new_text = (size_t)sc->sent_text < x->len;
        bool role = k == API_CHAT && !sc->role_sent;
        if (x->done && !finish_name(x->finish) && !new_text && !role)
            continue; /* cut: its client gets the error event below */
        if (new_text || role || (x->done && !r->failed && finish_name(x->finish))) {
            api_choice ch = {.index = i, .text = x->text ? x->text + sc->sent_text : "",
                             .text_len = x->len - (size_t)sc->sent_text,
                             .finish_reason = x->done ? finish_name(x->finish) : NULL, .lp_offset = sc->sent_off};
            srv_lp lb = {0};
            int n_lp = 0;
            if (c->ar.logprobs && x->lp && x->n_gen > sc->sent_lp &&
                srv_lp_build(c->s, NULL, 0, x->lp, sc->sent_lp, x->n_gen, c->ar.top_logprobs, &lb) == 0) {
                n_lp = x->n_gen - sc->sent_lp;
                ch.n_lp = n_lp;
                ch.lp = lb.lp;
            }
            srv_hydra_view hv;
            if (c->ar.hydra.return_router) {
                srv_hydra_view_make(&x->route, sc->sent_route, x->done, &hv);
                ch.router = &hv.rt;
            }
            if (c->ts) {
                srv_toolscan_stream(&c->ts[i], x->text ? x->text : "", x->len, x->done, &ch);
                if (!ch.text_len && !ch.n_calls && !role && !(x->done && ch.finish_reason)) {
                    sc->sent_text = (int)x->len; /* nothing to say yet (a call's name is not complete) */
                    srv_lp_free(&lb);
                    continue;
                }
            }
            if (role && x->done && ch.finish_reason) {
                /* role chunk first, then the text + finish chunk */
                api_choice rc = {.index = i, .text = ""};
                pend_add(c, api_format_chunk(k, c->id, c->created, c->model, &rc, true, c->ar.logprobs, usage_null));
                role = false;
            }
            if (pend_add(c, api_format_chunk(k, c->id, c->created, c->model, &ch, role, c->ar.logprobs, usage_null)) == 0) {
                sc->sent_text = (int)x->len;
                sc->sent_lp += n_lp;
                for (int j = 0; j < n_lp; j++)
                    sc->sent_off += lb.lp[j].token ? strlen(lb.lp[j].token) : 0;
                sc->sent_route = x->route.n;
                sc->role_sent = true;
                if (x->done && ch.finish_reason)
                    sc->finish_sent = true;
            }
            srv_lp_free(&lb);
        }
    }
    bool finished = sched_req_finished(r);
    if (finished && !c->done_sent) {
        bool cut = !r->failed && req_cut(r);
        if (r->failed || cut) {
            api_error e;
            if (cut)
                api_error_set(&e, 503, "server_error", "", "", "the server is shutting down; the stream was cut");
            else
                api_error_set(&e, 500, "server_error", "", "", "%s", r->error);
            char *j = api_error_json(&e);
            if (j) {
                size_t n = strlen(j);
                char *ev = malloc(n + 9);
                if (ev)
                    snprintf(ev, n + 9, "data: %s\n\n", j);
                pend_add(c, ev);
                free(j);
            }
        } else {
            record_finished(c);
            if (c->ar.include_usage && !c->usage_sent) {
                int gen = 0;
                for (int i = 0; i < r->n_choices; i++)
                    gen += r->choices[i].n_gen;
                api_usage u = {c->n_prompt_total, gen, r->n_cached_tokens};
                pend_add(c, api_format_usage_chunk(k, c->id, c->created, c->model, &u));
                c->usage_sent = true;
            }
        }
        char *d = strdup(api_sse_done());
        if (pend_add(c, d) == 0)
            c->done_sent = true;
    }
    sched_req_unlock(r);
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    conn *c = cls;
    (void)pos;
    pthread_mutex_lock(&c->mu);
    if (c->gone) { /* the watcher saw the client close: the request is cancelled, end the reply */
        pthread_mutex_unlock(&c->mu);
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    if (c->pend_off == c->pend_len)
        stream_collect(c);
    ssize_t out;
    if (c->pend_off < c->pend_len) {
        size_t n = HY_MIN(max, c->pend_len - c->pend_off);
        memcpy(buf, c->pend + c->pend_off, n);
        c->pend_off += n;
        out = (ssize_t)n;
    } else if (c->done_sent) {
        out = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        c->suspended = true;
        MHD_suspend_connection(c->mc);
        out = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return out;
}

static void stream_free(void *cls) { conn_unref(cls); }

/* Whole answer: stay suspended until the engine says the request is finished (each engine
 * event resumes the connection; the handler then comes back here). */
static enum MHD_Result wait_or_answer(conn *c, struct MHD_Connection *mc)
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
    watch_remove(c);
    return answer_whole(c, mc);
}

/* A load a suspended connection waits for has ended (loader thread): keep its outcome (status,
 * json owned), resume the connection, drop the loader's reference. */
static void load_done(conn *c, int status, char *json)
{
    pthread_mutex_lock(&c->mu);
    free(c->load_json);
    c->load_json = json;
    c->load_status = status;
    c->load_done = true;
    if (c->alive && c->suspended) {
        c->suspended = false;
        MHD_resume_connection(c->mc);
    }
    pthread_mutex_unlock(&c->mu);
    conn_unref(c);
}

/* The loader a request waited for has ended (loader thread): resume the connection. */
static void resolve_wake(void *ctx, int rc, const char *msg)
{
    load_done(ctx, rc, strdup(msg ? msg : ""));
}

static enum MHD_Result generation_for_model(conn *c, struct MHD_Connection *mc);

/* Back from waiting for a first-use load: answer its failure, or go on with the request. */
static enum MHD_Result resolve_wait_or_continue(conn *c, struct MHD_Connection *mc)
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
    if (c->load_status) {
        char msg[600];
        snprintf(msg, sizeof msg, "%s", c->load_json ? c->load_json : "");
        return err(c, mc, 400, "invalid_request_error", "model", "adapter_load_failed", msg);
    }
    c->resolved = true; /* pin it now; never a second load for this request */
    return generation_for_model(c, mc);
}

static enum MHD_Result start_generation(conn *c, struct MHD_Connection *mc, api_kind kind)
{
    api_error e;
    if (api_parse_request(kind, c->body ? c->body : "", c->len, &c->ar, &e))
        return send_err(c, mc, &e);
    c->have_ar = true;
    return generation_for_model(c, mc);
}

static enum MHD_Result generation_for_model(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    api_error e;
    api_request *ar = &c->ar;
    api_kind kind = ar->kind;
    /* model -> base or adapter */
    if (is_base_name(s, ar->model)) {
        c->model = strdup(s->cfg.served_name);
    } else {
        int rc = s->reg ? ad_reg_pin(s->reg, ar->model, &c->ad) : HY_ENOTFOUND;
        if ((rc == HY_ENOTFOUND || rc == HY_EBUSY) && s->resolver && !c->resolved) { /* load on first use */
            atomic_fetch_add(&c->refs, 1); /* held by the loader until it wakes us */
            c->state = R_RESOLVE_WAIT;
            int rr = srv_resolve_start(s->resolver, ar->model, resolve_wake, c);
            if (rr == HY_OK)
                return resolve_wait_or_continue(c, mc);
            atomic_fetch_sub(&c->refs, 1);
            c->state = R_GEN;
            if (rr == HY_EINVAL)
                return err(c, mc, 400, "invalid_request_error", "model", "", hy_err_msg());
            if (rr == HY_ELIMIT)
                return err(c, mc, 503, "server_error", "model", "", hy_err_msg());
            if (rr == HY_EBUSY) /* loaded meanwhile, or an admin load/unload of the name under way */
                rc = ad_reg_pin(s->reg, ar->model, &c->ad);
        }
        if (rc) {
            char msg[600];
            snprintf(msg, sizeof msg, rc == HY_EBUSY ? "The model `%s` is loading or being unloaded."
                                                    : "The model `%s` does not exist.", ar->model);
            return err(c, mc, 404, "invalid_request_error", "model", "model_not_found", msg);
        }
        count_served(s, ar->model);
        c->model = strdup(ar->model);
    }
    if (!c->model)
        return MHD_NO;
    int ad_heads = c->ad ? ad_K(c->ad) : 0;
    if (api_hydra_check(&ar->hydra, ad_heads, &e))
        return send_err(c, mc, &e);
    if (kind == API_COMPLETION && ar->n_prompts > s->cfg.max_prompts) {
        api_error_set(&e, 400, "invalid_request_error", "prompt", "invalid_value",
                      "'prompt' holds %d prompts; this server takes at most %d per request", ar->n_prompts,
                      s->cfg.max_prompts);
        return send_err(c, mc, &e);
    }
    int32_t **ids = NULL;
    int *n = NULL, np = 0, rc_echo = 0;
    if (tokenize_request(c, &e, &ids, &n, &np))
        return send_err(c, mc, &e);
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
        return err(c, mc, 400, "invalid_request_error", "max_tokens", "context_length_exceeded", msg);
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
        return send_err(c, mc, &e);
    }
    r->constraint_free = smp_constraint_free;
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
        return err(c, mc, 500, "server_error", "", "", "out of memory");
    if (kind == API_CHAT && ar->st.tool_choice != API_TC_NONE) {
        if (!(c->ts = calloc((size_t)r->n_choices, sizeof *c->ts)))
            return err(c, mc, 500, "server_error", "", "", "out of memory");
        for (int i = 0; i < r->n_choices; i++)
            srv_toolscan_init(&c->ts[i], c->id + strlen("chatcmpl-"), i);
    }
    rc = sched_submit(s->sched, r);
    if (rc == HY_EBUSY)
        return err(c, mc, 429, "rate_limit_error", "", "rate_limit_exceeded", hy_err_msg());
    if (rc == HY_ELIMIT)
        return err(c, mc, 400, "invalid_request_error", "prompt", "context_length_exceeded", hy_err_msg());
    if (rc == HY_ECANCELED)
        return err(c, mc, 503, "server_error", "", "", hy_err_msg());
    if (rc)
        return err(c, mc, 500, "server_error", "", "", hy_err_msg());
    c->submitted = true;
    if (ar->stream) {
        c->stream = true;
        /* a stream waits suspended too (queued, or between tokens): the watcher sees its client go */
        watch_add(c, mc);
        struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, c, stream_free);
        if (!resp)
            return MHD_NO;
        atomic_fetch_add(&c->refs, 1); /* held by the response, dropped in stream_free */
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        enum MHD_Result ret = MHD_queue_response(mc, 200, resp);
        MHD_destroy_response(resp);
        srv_metrics_status(&s->metrics, 200);
        return ret;
    }
    c->state = R_DONE_WAIT;
    watch_add(c, mc);
    return wait_or_answer(c, mc);
}

/* ---------- admin and info ---------- */

/* ---- https:// adapters: download both files into the cache, size-capped, sha256 checked ---- */

typedef struct {
    FILE *f;
    size_t n, cap;
    bool over;        /* the transfer was cut at the cap */
    EVP_MD_CTX *md;   /* SHA-256 of what was written (NULL: not checked) */
    bool md_fail;
} dl_sink;

static size_t dl_write(char *p, size_t sz, size_t nm, void *ud)
{
    dl_sink *d = ud;
    size_t n = sz * nm;
    if (n > d->cap - d->n) {
        d->over = true;
        return 0; /* over the cap: abort the transfer */
    }
    d->n += n;
    if (d->md && !EVP_DigestUpdate(d->md, p, n))
        d->md_fail = true;
    return fwrite(p, 1, n, d->f);
}

/* A fresh temp file beside dst: "<dst>.XXXXXX.part" made by mkstemps (never shared with a
 * concurrent download of the same dst). tmp receives its name. */
static int dl_tmp_open(const char *dst, char *tmp, size_t cap, FILE **f)
{
    *f = NULL;
    if ((size_t)snprintf(tmp, cap, "%s.XXXXXX.part", dst) >= cap)
        return hy_err_set(HY_EINVAL, "path too long: %s", dst);
    int fd = mkstemps(tmp, 5);
    if (fd < 0)
        return hy_err_set(HY_EIO, "cannot create a temp file beside %s: %s", dst, strerror(errno));
    *f = fdopen(fd, "wb");
    if (!*f) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return hy_err_set(HY_EIO, "cannot write %s: %s", tmp, strerror(e));
    }
    return HY_OK;
}

/* Lower-case hex of the digest in d->md into hex[65]; false when it cannot be finished. */
static bool dl_hex(dl_sink *d, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    if (d->md_fail || !EVP_DigestFinal_ex(d->md, md, &n) || n != 32)
        return false;
    for (unsigned i = 0; i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return true;
}

int srv_download(const char *url, const char *dst, size_t cap, const char *want_sha, const char *protocols)
{
    char tmp[PATH_MAX + 80], got[65];
    dl_sink d = {NULL, 0, cap, false, NULL, false};
    CURL *h = NULL;
    int rc = dl_tmp_open(dst, tmp, sizeof tmp, &d.f);
    if (rc)
        return rc;
    if (want_sha && (!(d.md = EVP_MD_CTX_new()) || !EVP_DigestInit_ex(d.md, EVP_sha256(), NULL))) {
        rc = hy_err_set(HY_ENOMEM, "cannot start SHA-256");
        goto fail;
    }
    if (!(h = curl_easy_init())) {
        rc = hy_err_set(HY_ENOMEM, "libcurl init failed");
        goto fail;
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, protocols);
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, protocols);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(h, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 20L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 600L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, dl_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &d);
    CURLcode cc = curl_easy_perform(h);
    int closed = fclose(d.f);
    d.f = NULL;
    if (cc != CURLE_OK) {
        rc = d.over ? hy_err_set(HY_ELIMIT, "%s: larger than the %zu-byte cap", url, cap)
                    : hy_err_set(HY_EIO, "%s: %s", url, curl_easy_strerror(cc));
        goto fail;
    }
    if (closed != 0) {
        rc = hy_err_set(HY_EIO, "cannot write %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (want_sha && !dl_hex(&d, got)) {
        rc = hy_err_set(HY_EIO, "cannot hash %s", url);
        goto fail;
    }
    if (want_sha && strcasecmp(got, want_sha) != 0) {
        rc = hy_err_set(HY_EFORMAT, "sha256 mismatch for %s: got %s, expected %s", url, got, want_sha);
        goto fail;
    }
    if (rename(tmp, dst) != 0) {
        rc = hy_err_set(HY_EIO, "cannot rename %s: %s", tmp, strerror(errno));
        goto fail;
    }
    curl_easy_cleanup(h);
    EVP_MD_CTX_free(d.md);
    return HY_OK;
fail:
    if (d.f)
        fclose(d.f);
    unlink(tmp);
    if (h)
        curl_easy_cleanup(h);
    EVP_MD_CTX_free(d.md);
    return rc;
}

/* Fetch <url>/adapter_config.json and <url>/adapter_model.safetensors into
 * <cache>/<sha256(url)>/ and write that directory to dir. */
static int fetch_adapter(srv *s, const char *url, const char *want_sha, char *dir, size_t dir_cap)
{
    unsigned char md[32];
    char key[65], path[PATH_MAX + 64], u[API_MAX_URL + 64];
    const char *cache = s->cfg.adapter_cache ? s->cfg.adapter_cache : "/tmp/hydrad-adapter-cache";
    SHA256((const unsigned char *)url, strlen(url), md);
    for (int i = 0; i < 32; i++)
        snprintf(key + 2 * i, 3, "%02x", md[i]);
    if (mkdir(cache, 0700) != 0 && errno != EEXIST)
        return hy_err_set(HY_EIO, "cannot create the adapter cache %s: %s", cache, strerror(errno));
    snprintf(dir, dir_cap, "%s/%s", cache, key);
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return hy_err_set(HY_EIO, "cannot create %s: %s", dir, strerror(errno));
    size_t ul = strlen(url);
    const char *sep = ul && url[ul - 1] == '/' ? "" : "/";
    const char *files[2] = {"adapter_config.json", "adapter_model.safetensors"};
    size_t cap = s->cfg.adapter_max_bytes ? s->cfg.adapter_max_bytes : (size_t)1 << 30;
    for (int i = 0; i < 2; i++) {
        snprintf(u, sizeof u, "%s%s%s", url, sep, files[i]);
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        /* the weights are checked before they take the final name: a mismatch leaves none */
        int rc = srv_download(u, path, i == 0 ? (size_t)1 << 20 : cap, i == 1 ? want_sha : NULL, "https");
        if (rc)
            return rc;
    }
    return HY_OK;
}

static void *load_worker(void *arg)
{
    conn *c = arg;
    srv *s = c->s;
    char dir[PATH_MAX], msg[1400];
    int status = 200, rc = 0;
    const char *param = "lora_path", *code = "";
    if (strncmp(c->load_path, "https://", 8) == 0) {
        rc = fetch_adapter(s, c->load_path, c->load_sha, dir, sizeof dir);
        if (rc)
            status = 400;
    } else {
        snprintf(dir, sizeof dir, "%s", c->load_path);
    }
    if (!rc) {
        rc = ad_reg_load(s->reg, c->load_name, dir, &s->shape, NULL);
        if (!rc && c->load_pinned) {
            if (!(rc = srv_pin_check(s->reg, s->cfg.max_loras)))
                rc = ad_reg_set_pinned(s->reg, c->load_name, true);
            if (rc) { /* others were pinned meanwhile: refused, nothing stays loaded */
                snprintf(msg, sizeof msg, "%s", hy_err_msg());
                ad_reg_unload(s->reg, c->load_name);
                rc = hy_err_set(HY_EINVAL, "%s", msg);
            }
        }
        if (rc) {
            status = rc == HY_ELIMIT ? 507 : 400;
            if (rc == HY_EBUSY) {
                param = "lora_name";
                code = "adapter_exists";
            }
        }
    }
    char *json;
    if (rc) {
        api_error e;
        snprintf(msg, sizeof msg, "%s", hy_err_msg());
        api_error_set(&e, status, "invalid_request_error", param, code, "%s", msg);
        json = api_error_json(&e);
    } else {
        snprintf(msg, sizeof msg, "Success: LoRA adapter '%s' added successfully.", c->load_name);
        json_t *o = json_pack("{s:s,s:s}", "status", "ok", "message", msg);
        json = json_dumps(o, JSON_COMPACT);
        json_decref(o);
    }
    load_done(c, status, json);
    return NULL;
}

static enum MHD_Result load_wait_or_answer(conn *c, struct MHD_Connection *mc)
{
    pthread_mutex_lock(&c->mu);
    bool done = c->load_done;
    if (!done) {
        c->suspended = true;
        MHD_suspend_connection(mc);
    }
    char *json = c->load_json;
    c->load_json = NULL;
    pthread_mutex_unlock(&c->mu);
    if (!done)
        return MHD_YES;
    if (!json)
        return MHD_NO;
    return send_json(c, mc, c->load_status, json);
}

/* The host of an https:// URL ("https://HOST[:PORT]/..." or "https://[V6]:PORT/..."): it must be
 * listed in --adapter-url-allow (none listed: URL loading is off), and unless it is an address
 * itself, none of the addresses it resolves to may be loopback, link-local or private. Decided
 * before any connection; false with the reason in msg. */
static bool url_host_allowed(srv *s, const char *url, char *msg, size_t cap)
{
    char host[256];
    const char *h = url + 8, *end;
    if (*h == '[') {
        end = strchr(++h, ']');
    } else {
        end = h + strcspn(h, ":/?#");
    }
    if (!end || end == h || (size_t)(end - h) >= sizeof host || memchr(h, '@', (size_t)(end - h))) {
        snprintf(msg, cap, "lora_path has no usable host");
        return false;
    }
    memcpy(host, h, (size_t)(end - h));
    host[end - h] = '\0';
    if (s->cfg.n_url_allow == 0) {
        snprintf(msg, cap, "loading adapters from URLs is off (host '%s'); allow hosts with --adapter-url-allow", host);
        return false;
    }
    bool listed = false;
    for (int i = 0; i < s->cfg.n_url_allow && !listed; i++)
        listed = strcasecmp(host, s->cfg.url_allow[i]) == 0;
    if (!listed) {
        snprintf(msg, cap, "host '%s' is not in --adapter-url-allow", host);
        return false;
    }
    struct in6_addr a6;
    struct in_addr a4;
    if (inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1)
        return true; /* an address listed as itself */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) != 0) {
        snprintf(msg, cap, "host '%s' does not resolve", host);
        return false;
    }
    bool ok = true;
    for (struct addrinfo *ai = res; ai && ok; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            uint32_t ip = ntohl(((struct sockaddr_in *)ai->ai_addr)->sin_addr.s_addr);
            ok = !((ip >> 24) == 127 || (ip >> 24) == 10 || (ip >> 24) == 0 || (ip >> 16) == 0xa9fe ||
                   (ip >> 20) == 0xac1 || (ip >> 16) == 0xc0a8 || (ip >> 22) == (100u << 2 | 1u));
        } else if (ai->ai_family == AF_INET6) {
            const struct in6_addr *x = &((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
            ok = !(IN6_IS_ADDR_LOOPBACK(x) || IN6_IS_ADDR_LINKLOCAL(x) || IN6_IS_ADDR_V4MAPPED(x) ||
                   IN6_IS_ADDR_UNSPECIFIED(x) || (x->s6_addr[0] & 0xfe) == 0xfc);
        }
    }
    freeaddrinfo(res);
    if (!ok)
        snprintf(msg, cap, "host '%s' resolves to a loopback, link-local or private address", host);
    return ok;
}

/* Reading (and maybe downloading) an adapter takes time: it runs on its own thread while the
 * connection is suspended, so no MHD worker (and no stream it serves) waits on it. */
static enum MHD_Result load_lora(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    char *name, *path, *sha;
    bool pinned = false;
    api_error e;
    if (api_parse_load_lora(c->body ? c->body : "", c->len, &name, &path, &sha, &pinned, &e))
        return send_err(c, mc, &e);
    enum MHD_Result ret = MHD_YES;
    if (pinned && srv_pin_check(s->reg, s->cfg.max_loras)) {
        ret = err(c, mc, 400, "invalid_request_error", "pinned", "", hy_err_msg());
        free(name);
        free(path);
        free(sha);
        return ret;
    }
    c->load_pinned = pinned;
    char resolved[PATH_MAX], msg[1400], bad[64];
    bool url = strncmp(path, "https://", 8) == 0;
    if (is_base_name(s, name)) {
        ret = err(c, mc, 400, "invalid_request_error", "lora_name", "", "that name is the base model's");
    } else if (strlen(name) >= AD_NAME_MAX) {
        ret = err(c, mc, 400, "invalid_request_error", "lora_name", "", "lora_name is too long");
    } else if (sha && (strlen(sha) != 64 || strspn(sha, "0123456789abcdefABCDEF") != 64)) {
        ret = err(c, mc, 400, "invalid_request_error", "sha256", "", "sha256 must be 64 hex digits");
    } else if (url && strlen(path) > API_MAX_URL) {
        ret = err(c, mc, 400, "invalid_request_error", "lora_path", "", "the URL is too long");
    } else if (strstr(path, "://") && !url) {
        ret = err(c, mc, 400, "invalid_request_error", "lora_path", "", "only https:// URLs are accepted");
    } else if (url && !url_host_allowed(s, path, msg, sizeof msg)) {
        ret = err(c, mc, 400, "invalid_request_error", "lora_path", "", msg);
    } else if (!url && s->cfg.n_roots == 0) {
        ret = err(c, mc, 400, "invalid_request_error", "lora_path", "",
                  "no --adapter-root is configured; adapters cannot be loaded from paths at run time");
    } else if (!url && !srv_path_under(s->cfg.adapter_roots, s->cfg.n_roots, path, resolved)) {
        snprintf(msg, sizeof msg, "lora_path '%s' does not exist or is outside every --adapter-root", path);
        ret = err(c, mc, 400, "invalid_request_error", "lora_path", "", msg);
    } else if (!url && !srv_files_under(s->cfg.adapter_roots, s->cfg.n_roots, resolved, bad, sizeof bad)) {
        snprintf(msg, sizeof msg, "%s of lora_path '%.900s' is a link that resolves outside every --adapter-root",
                 bad, path);
        ret = err(c, mc, 400, "invalid_request_error", "lora_path", "", msg);
    } else {
        snprintf(c->load_name, sizeof c->load_name, "%s", name);
        c->load_path = strdup(url ? path : resolved);
        c->load_sha = sha;
        sha = NULL;
        pthread_t th;
        atomic_fetch_add(&c->refs, 1); /* held by the worker */
        c->state = R_LOAD_WAIT;
        if (!c->load_path || pthread_create(&th, NULL, load_worker, c) != 0) {
            atomic_fetch_sub(&c->refs, 1);
            ret = err(c, mc, 500, "server_error", "", "", "cannot start the loader thread");
        } else {
            pthread_detach(th);
            ret = load_wait_or_answer(c, mc);
        }
    }
    free(name);
    free(path);
    free(sha);
    return ret;
}

static enum MHD_Result unload_lora(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    char *name, msg[600];
    api_error e;
    if (api_parse_unload_lora(c->body ? c->body : "", c->len, &name, &e))
        return send_err(c, mc, &e);
    int rc = ad_reg_unload(s->reg, name);
    enum MHD_Result ret;
    if (rc == 0) {
        forget_served(s, name);
        sched_wake(s->sched);
        snprintf(msg, sizeof msg, "Success: LoRA adapter '%s' removed successfully.", name);
        json_t *o = json_pack("{s:s,s:s}", "status", "ok", "message", msg);
        char *j = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        ret = send_json(c, mc, 200, j);
    } else {
        snprintf(msg, sizeof msg, "%s", hy_err_msg());
        ret = err(c, mc, rc == HY_ENOTFOUND ? 404 : 400, "invalid_request_error", "lora_name",
                  rc == HY_ENOTFOUND ? "model_not_found" : "", msg);
    }
    free(name);
    return ret;
}

/* Every registry entry (malloc'ed into *out, caller frees; NULL with *n = 0 when there are none).
 * Retries when adapters are loaded between counting and copying. */
static int reg_snapshot(srv *s, ad_reg_info **out, int *n)
{
    *out = NULL;
    *n = 0;
    int want = s->reg ? ad_reg_count(s->reg) : 0;
    while (want > 0) {
        ad_reg_info *info = calloc((size_t)want, sizeof *info);
        if (!info)
            return HY_ENOMEM;
        int got = ad_reg_list(s->reg, info, want);
        if (got <= want) {
            *out = info;
            *n = got;
            return HY_OK;
        }
        free(info);
        want = got;
    }
    return HY_OK;
}

/* Whether the request may see what only admins see (server paths): it carries the admin key, or
 * the key the admin endpoints take when no --admin-key is set (no key at all: everyone). */
static bool is_admin(srv *s, struct MHD_Connection *mc)
{
    return key_ok(mc, s->cfg.admin_key ? s->cfg.admin_key : s->cfg.api_key);
}

/* root is the adapter's name, not its path: paths are for admins (GET /v1/adapters). */
static enum MHD_Result list_models(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    ad_reg_info *info;
    int n;
    if (reg_snapshot(s, &info, &n))
        return err(c, mc, 500, "server_error", "", "", "out of memory");
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
        return err(c, mc, 500, "server_error", "", "", "out of memory");
    return send_json(c, mc, 200, json);
}

static enum MHD_Result list_adapters(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    bool admin = is_admin(s, mc);
    ad_reg_info *info;
    int n;
    if (reg_snapshot(s, &info, &n))
        return err(c, mc, 500, "server_error", "", "", "out of memory");
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        ad_reg_info *x = &info[i];
        uint64_t served = 0;
        pthread_mutex_lock(&s->mu);
        for (int k = 0; k < s->n_served; k++)
            if (strcmp(s->served[k].name, x->name) == 0)
                served = s->served[k].requests;
        pthread_mutex_unlock(&s->mu);
        json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:i,s:I,s:I}", "name", x->name, "state",
                              ad_state_name(x->state), "K", x->K, "r", x->r, "refcount", x->refcount,
                              "requests", (json_int_t)served, "host_bytes", (json_int_t)x->host_bytes);
        json_object_set_new(o, "pinned", json_boolean(x->pinned));
        if (admin) /* server paths only for admins */
            json_object_set_new(o, "path", json_string(x->path));
        /* targets: the projections the adapter touches in any layer, and tokens run through it
         * (a brief pin to read them; the engine's snapshot below lags and forgets evicted ones) */
        ad_adapter *a = NULL;
        json_t *targets = json_array();
        bool have_tokens = false;
        if (x->state == AD_READY && ad_reg_pin(s->reg, x->name, &a) == 0) {
            json_object_set_new(o, "tokens", json_integer((json_int_t)ad_tokens(a)));
            have_tokens = true;
            for (int p = 0; p < ENG_N_PROJ; p++) {
                bool any = false;
                for (int l = 0; l < ad_n_layer(a) && !any; l++)
                    any = ad_targets(a, l, p);
                if (any)
                    json_array_append_new(targets, json_string(eng_proj_names[p]));
            }
            ad_reg_unpin(s->reg, a);
        }
        json_object_set_new(o, "targets", targets);
        pthread_mutex_lock(&s->mu);
        json_t *router = json_null();
        for (int k = 0; k < s->n_stats; k++)
            if (strcmp(s->stats[k].name, x->name) == 0) {
                if (!have_tokens)
                    json_object_set_new(o, "tokens", json_integer((json_int_t)s->stats[k].tokens));
                json_object_set_new(o, "resident", json_boolean(s->stats[k].resident));
                json_t *g = json_array();
                for (int h = 0; h < s->stats[k].K; h++)
                    json_array_append_new(g, json_real(s->stats[k].gate[h]));
                json_decref(router);
                router = json_pack("{s:o}", "mean_gate", g);
            }
        pthread_mutex_unlock(&s->mu);
        if (!json_object_get(o, "tokens"))
            json_object_set_new(o, "tokens", json_integer(0));
        if (!json_object_get(o, "resident"))
            json_object_set_new(o, "resident", json_false());
        json_object_set_new(o, "router", router);
        json_array_append_new(arr, o);
    }
    free(info);
    json_t *root = json_pack("{s:s,s:o}", "object", "list", "data", arr);
    char *j = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return send_json(c, mc, 200, j);
}

static enum MHD_Result metrics_page(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    sched_stats st;
    memset(&st, 0, sizeof st);
    if (atomic_load(&s->ready))
        sched_get_stats(s->sched, &st);
    srv_gauges g = {st.waiting_reqs, st.running_seqs, st.kv_used, st.kv_total,
                    s->reg ? ad_reg_count(s->reg) : 0, s->cfg.max_loras, st.preemptions, st.steps,
                    st.running_adapters, st.waiting_adapters, s->cfg.served_name, NULL, 0,
                    (uint64_t)atomic_load(&s->guard.timed_out), st.kv_cached, st.prefix_queries,
                    st.prefix_hits, NULL, 0, NULL};
    /* per-adapter counts: copied under mu so the render runs without it */
    pthread_mutex_lock(&s->mu);
    int n = s->n_served;
    srv_ad_served *copy = n ? malloc((size_t)n * sizeof *copy) : NULL;
    if (copy)
        memcpy(copy, s->served, (size_t)n * sizeof *copy);
    pthread_mutex_unlock(&s->mu);
    srv_adapter_requests *ad = copy ? calloc((size_t)n, sizeof *ad) : NULL;
    if (n && !ad) {
        free(copy);
        return err(c, mc, 500, "server_error", "", "", "out of memory");
    }
    for (int i = 0; i < n; i++)
        ad[i] = (srv_adapter_requests){copy[i].name, copy[i].requests};
    g.adapters = ad;
    g.n_adapters = n;
    /* loaded adapters and where they are */
    ad_reg_info *info = NULL;
    int n_info = 0;
    srv_adapter_level *lv = NULL;
    if (s->reg && reg_snapshot(s, &info, &n_info) == 0 && n_info && (lv = calloc((size_t)n_info, sizeof *lv))) {
        pthread_mutex_lock(&s->mu);
        for (int i = 0; i < n_info; i++) {
            if (info[i].state != AD_READY)
                continue;
            srv_adapter_level *l = &lv[g.n_levels++];
            l->name = info[i].name;
            l->pinned = info[i].pinned;
            for (int k = 0; k < s->n_stats; k++)
                if (strcmp(s->stats[k].name, info[i].name) == 0)
                    l->device = s->stats[k].resident;
        }
        pthread_mutex_unlock(&s->mu);
    }
    g.levels = lv;
    srv_resolve_stats rs;
    if (s->resolver) {
        srv_resolve_get_stats(s->resolver, &rs);
        g.resolve = &rs;
    }
    char *t = srv_metrics_render(&s->metrics, &g);
    free(lv);
    free(info);
    free(ad);
    free(copy);
    if (!t)
        return MHD_NO;
    return send_buf(c, mc, 200, "text/plain; version=0.0.4", t, strlen(t), NULL, NULL);
}

/* ---------- dispatch ---------- */

/* A known route asked with another method: 405 naming the one it takes (Allow); else 404. */
static enum MHD_Result wrong_method_or_404(conn *c, struct MHD_Connection *mc, const char *url, const char *method)
{
    static const struct {
        const char *path, *method;
    } routes[] = {{"/health", "GET"}, {"/metrics", "GET"}, {"/v1/models", "GET"}, {"/v1/adapters", "GET"},
                  {"/v1/completions", "POST"}, {"/v1/chat/completions", "POST"},
                  {"/v1/load_lora_adapter", "POST"}, {"/v1/unload_lora_adapter", "POST"},
                  {"/tokenize", "POST"}, {"/detokenize", "POST"}, {"/tokenizer_info", "GET"}};
    for (size_t i = 0; i < HY_ARRAY_LEN(routes); i++) {
        if (strcmp(url, routes[i].path) != 0)
            continue;
        api_error e;
        api_error_set(&e, 405, "invalid_request_error", "", "method_not_allowed", "%.16s %.200s is not supported; use %s",
                      method, url, routes[i].method);
        char *j = api_error_json(&e);
        return j ? send_buf(c, mc, 405, "application/json", j, strlen(j), "Allow", routes[i].method) : MHD_NO;
    }
    return err(c, mc, 404, "invalid_request_error", "", "not_found", "no such route");
}

static enum MHD_Result route(conn *c, struct MHD_Connection *mc, const char *url, const char *method)
{
    srv *s = c->s;
    bool get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    if (strcmp(url, "/health") == 0) {
        bool ok = atomic_load(&s->ready) && !atomic_load(&s->stopping);
        const char *st = ok ? "{\"status\":\"ok\"}"
                         : atomic_load(&s->stopping) ? "{\"status\":\"draining\"}" : "{\"status\":\"starting\"}";
        return send_json(c, mc, ok ? 200 : 503, strdup(st));
    }
    if (strcmp(url, "/metrics") == 0 && get) {
        if (s->cfg.metrics_auth && !key_ok(mc, s->cfg.api_key))
            return err(c, mc, 401, "authentication_error", "", "invalid_api_key", "Incorrect API key provided.");
        return metrics_page(c, mc);
    }
    enum MHD_Result ui_ret; /* the web console: static files, no key (the page asks for one) */
    if (srv_ui_route(s, mc, url, method, &ui_ret))
        return ui_ret;
    bool admin = strcmp(url, "/v1/load_lora_adapter") == 0 || strcmp(url, "/v1/unload_lora_adapter") == 0;
    const char *want = admin && s->cfg.admin_key ? s->cfg.admin_key : s->cfg.api_key;
    /* the admin key opens the user endpoints too (an admin reads /v1/adapters with its paths) */
    if (!key_ok(mc, want) && !(!admin && s->cfg.admin_key && key_ok(mc, s->cfg.admin_key)))
        return err(c, mc, 401, "authentication_error", "", "invalid_api_key", "Incorrect API key provided.");
    if (!atomic_load(&s->ready))
        return err(c, mc, 503, "server_error", "", "", "the model is still loading");
    if (atomic_load(&s->stopping) && post)
        return err(c, mc, 503, "server_error", "", "", "the server is shutting down");
    if (c->too_big)
        return err(c, mc, 413, "invalid_request_error", "", "request_too_large", "request body too large");
    if (get && strcmp(url, "/v1/models") == 0)
        return list_models(c, mc);
    if (get && strcmp(url, "/v1/adapters") == 0)
        return list_adapters(c, mc);
    if (post && strcmp(url, "/v1/completions") == 0)
        return start_generation(c, mc, API_COMPLETION);
    if (post && strcmp(url, "/v1/chat/completions") == 0)
        return start_generation(c, mc, API_CHAT);
    if (post && (strcmp(url, "/tokenize") == 0 || strcmp(url, "/detokenize") == 0)) {
        api_error e;
        char *out;
        bool tok = strcmp(url, "/tokenize") == 0;
        if ((tok ? srv_tokenize : srv_detokenize)(s, c->body ? c->body : "", c->len, &out, &e))
            return send_err(c, mc, &e);
        return send_json(c, mc, 200, out);
    }
    if (get && strcmp(url, "/tokenizer_info") == 0) {
        api_error e;
        char *out;
        if (srv_tokenizer_info(s, &out, &e))
            return send_err(c, mc, &e);
        return send_json(c, mc, 200, out);
    }
    if (post && strcmp(url, "/v1/load_lora_adapter") == 0)
        return load_lora(c, mc);
    if (post && strcmp(url, "/v1/unload_lora_adapter") == 0)
        return unload_lora(c, mc);
    return wrong_method_or_404(c, mc, url, method);
}

static int conn_fd(struct MHD_Connection *mc)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci && ci->connect_fd != MHD_INVALID_SOCKET ? (int)ci->connect_fd : -1;
}

/* Connection open/close events for the whole-request deadline (conn_guard.c). */
static void on_connection(void *cls, struct MHD_Connection *mc, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    srv *s = cls;
    (void)socket_context;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED)
        srv_guard_open(&s->guard, conn_fd(mc));
    else
        srv_guard_close(&s->guard, conn_fd(mc));
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    srv *s = cls;
    conn *c = *con_cls;
    (void)version;
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c)
            return MHD_NO;
        c->s = s;
        atomic_init(&c->refs, 1);
        pthread_mutex_init(&c->mu, NULL);
        c->mc = mc;
        c->alive = true;
        *con_cls = c;
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > s->cfg.max_body) {
            c->too_big = true;
            return err(c, mc, 413, "invalid_request_error", "", "request_too_large", "request body too large");
        }
        return MHD_YES;
    }
    if (c->state == R_DONE_WAIT)
        return wait_or_answer(c, mc);
    if (c->state == R_LOAD_WAIT)
        return load_wait_or_answer(c, mc);
    if (c->state == R_RESOLVE_WAIT)
        return resolve_wait_or_continue(c, mc);
    if (*upload_size) {
        if (!c->too_big && c->len + *upload_size <= s->cfg.max_body) {
            if (c->len + *upload_size + 1 > c->cap) {
                size_t cap = HY_MAX(c->cap * 2, c->len + *upload_size + 1);
                char *p = realloc(c->body, cap);
                if (!p)
                    return MHD_NO;
                c->body = p;
                c->cap = cap;
            }
            memcpy(c->body + c->len, upload, *upload_size);
            c->len += *upload_size;
            c->body[c->len] = '\0';
        } else {
            c->too_big = true;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    c->state = R_GEN;
    srv_guard_received(&s->guard, conn_fd(mc)); /* the request is whole: no deadline while answered */
    return route(c, mc, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    conn *c = *con_cls;
    (void)toe;
    srv_guard_answered(&((srv *)cls)->guard, conn_fd(mc)); /* keep-alive: the next request's clock */
    if (!c)
        return;
    watch_remove(c);
    pthread_mutex_lock(&c->mu);
    c->alive = false;
    bool gone = c->gone;
    pthread_mutex_unlock(&c->mu);
    if (c->req) {
        sched_req_lock(c->req);
        bool fin = sched_req_finished(c->req);
        sched_req_unlock(c->req);
        if (!fin)
            sched_req_cancel(c->req);
        /* the watcher may have cancelled it already and the engine ended it ("cancelled") */
        if (c->submitted && (!fin || gone))
            srv_metrics_cancelled(&c->s->metrics);
        sched_req *r = c->req;
        c->req = NULL;
        sched_req_release(r); /* may drop the request's conn reference */
    }
    *con_cls = NULL;
    conn_unref(c);
}

void srv_init(srv *s, const srv_config *cfg)
{
    memset(s, 0, sizeof *s);
    s->cfg = *cfg;
    if (s->cfg.max_body == 0)
        s->cfg.max_body = 1 << 20;
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->watch_mu, NULL);
    s->watch_ep = s->watch_ev = -1;
    srv_metrics_init(&s->metrics);
    s->created = (int64_t)time(NULL);
    atomic_init(&s->ready, false);
    atomic_init(&s->stopping, false);
    atomic_init(&s->next_id, 1);
    if (srv_gcache_create(32, &s->gcache))
        s->gcache = NULL;
}

void srv_clear(srv *s)
{
    srv_metrics_clear(&s->metrics);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->watch_mu);
    free(s->stats);
    free(s->served);
    free(s->watch);
    srv_gcache_free(s->gcache);
    s->gcache = NULL;
    s->stats = NULL;
    s->served = NULL;
    s->watch = NULL;
}

/* The numeric form of a listening address for logs: "127.0.0.1", "[::1]". */
static void addr_text(const struct sockaddr *a, socklen_t len, char *out, size_t cap)
{
    char host[NI_MAXHOST];
    if (getnameinfo(a, len, host, sizeof host, NULL, 0, NI_NUMERICHOST) != 0)
        snprintf(host, sizeof host, "?");
    snprintf(out, cap, a->sa_family == AF_INET6 ? "[%s]" : "%s", host);
}

/* Listen on --host: an IPv4 or IPv6 literal, or a name resolved to either family; the
 * addresses getaddrinfo gives are tried in its order and the first that binds is kept.
 * An IPv6 socket is dual-stack, so "::" takes IPv4 clients too. */
int srv_start(srv *s)
{
    char port[16];
    snprintf(port, sizeof port, "%d", s->cfg.port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai = getaddrinfo(s->cfg.host, port, &hints, &res);
    if (gai != 0)
        return hy_err_set(HY_EINVAL, "--host '%s': %s", s->cfg.host, gai_strerror(gai));
    int rc = watch_start(s);
    if (!rc && (rc = srv_guard_start(&s->guard, s->cfg.request_deadline)))
        watch_stop(s);
    if (rc) {
        freeaddrinfo(res);
        return rc;
    }
    for (struct addrinfo *a = res; a && !s->mhd; a = a->ai_next) {
        if (a->ai_family != AF_INET && a->ai_family != AF_INET6)
            continue;
        unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC;
        if (a->ai_family == AF_INET6)
            flags |= MHD_USE_DUAL_STACK;
        s->mhd = MHD_start_daemon(flags, (uint16_t)s->cfg.port, NULL, NULL, on_request, s,
                                  MHD_OPTION_SOCK_ADDR, a->ai_addr,
                                  MHD_OPTION_THREAD_POOL_SIZE, (unsigned)HY_MAX(1, s->cfg.http_threads),
                                  MHD_OPTION_CONNECTION_LIMIT, (unsigned)HY_MAX(4, s->cfg.max_conns),
                                  MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600,
                                  MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)HY_MAX(0, s->cfg.max_conns_per_ip),
                                  MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                                  MHD_OPTION_NOTIFY_CONNECTION, on_connection, s, MHD_OPTION_END);
        if (s->mhd)
            addr_text(a->ai_addr, a->ai_addrlen, s->bound, sizeof s->bound);
    }
    freeaddrinfo(res);
    if (!s->mhd) {
        watch_stop(s);
        srv_guard_stop(&s->guard);
        return hy_err_set(HY_EIO, "cannot listen on %s port %d (port in use?)", s->cfg.host, s->cfg.port);
    }
    return HY_OK;
}

void srv_quiesce(srv *s)
{
    if (s->mhd) {
        MHD_socket fd = MHD_quiesce_daemon(s->mhd);
        if (fd != MHD_INVALID_SOCKET)
            close(fd);
    }
}

void srv_stop(srv *s)
{
    if (s->mhd)
        MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
    watch_stop(s);
    srv_guard_stop(&s->guard);
}
