/* srv_sse.c - streamed answers of /v1/completions and /v1/chat/completions: engine results turned
 * into OpenAI's SSE chunks (role, text, logprobs, router view, tool calls, usage, [DONE] or an error
 * event) and read out by libmicrohttpd from a suspended connection. HTTP threads; never runs the
 * model, never parses a request (srv_gen.c submits it). */
#include "server/srv_conn.h"

#include "server/hydra_view.h"
#include "server/srv_lp.h"
#include "engine/hy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

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
        if (x->done && !srv_finish_name(x->finish) && !new_text && !role)
            continue; /* cut: its client gets the error event below */
        if (new_text || role || (x->done && !r->failed && srv_finish_name(x->finish))) {
            api_choice ch = {.index = i, .text = x->text ? x->text + sc->sent_text : "",
                             .text_len = x->len - (size_t)sc->sent_text,
                             .finish_reason = x->done ? srv_finish_name(x->finish) : NULL, .lp_offset = sc->sent_off};
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
        bool cut = !r->failed && srv_req_cut(r);
        if (r->failed || cut) {
            api_error e;
            if (cut)
                api_error_set(&e, 503, "server_error", "", "", "the server is shutting down; the stream was cut");
            else
                api_error_set(&e, r->fail_status ? r->fail_status : 500, "server_error", "", "", "%s", r->error);
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
            srv_record_finished(c);
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

static void stream_free(void *cls) { srv_conn_unref(cls); }

enum MHD_Result srv_sse_start(conn *c, struct MHD_Connection *mc)
{
    c->stream = true;
    /* a stream waits suspended too (queued, or between tokens): the watcher sees its client go */
    srv_watch_add(c, mc);
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, c, stream_free);
    if (!resp)
        return MHD_NO;
    atomic_fetch_add(&c->refs, 1); /* held by the response, dropped in stream_free */
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    enum MHD_Result ret = MHD_queue_response(mc, 200, resp);
    MHD_destroy_response(resp);
    srv_metrics_status(&c->s->metrics, 200);
    return ret;
}
