/* http.c - the HTTP transport of the OpenAI-compatible server: the libmicrohttpd daemon and its
 * callbacks, each connection's state and body (size cap), responses, auth, dispatch of each route
 * to the file that owns it (srv_gen.c, srv_sse.c, srv_admin.c, srv_tokenize.c, srv_ui.c), /health,
 * and the disconnect watch of suspended connections. Never runs the model. */
#include "server/srv_conn.h"

#include "server/srv_tokenize.h"
#include "server/srv_ui.h"
#include "engine/hy.h"

#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

void srv_conn_unref(conn *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    if (c->ad)
        ad_reg_unpin(c->s->reg, c->ad);
    for (int i = 0; i < c->n_held; i++)
        ad_reg_unpin(c->s->reg, c->held[i]);
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

/* A load a suspended connection waits for has ended (loader thread): keep its outcome (status,
 * json owned), resume the connection, drop the loader's reference. */
void srv_conn_load_done(conn *c, int status, char *json)
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
    srv_conn_unref(c);
}

/* ---------- responses ---------- */

/* hname/hval (both NULL: none): one more header, e.g. Retry-After or Allow. */
enum MHD_Result srv_send_buf(conn *c, struct MHD_Connection *mc, int status, const char *ctype, char *buf,
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

enum MHD_Result srv_send_json(conn *c, struct MHD_Connection *mc, int status, char *json)
{
    if (!json)
        return MHD_NO;
    return srv_send_buf(c, mc, status, "application/json", json, strlen(json), NULL, NULL);
}

enum MHD_Result srv_send_err(conn *c, struct MHD_Connection *mc, const api_error *e)
{
    char *j = api_error_json(e);
    if (!j)
        return MHD_NO;
    return srv_send_buf(c, mc, e->status, "application/json", j, strlen(j), e->status == 429 ? "Retry-After" : NULL,
                    e->status == 429 ? "1" : NULL);
}

enum MHD_Result srv_err(conn *c, struct MHD_Connection *mc, int status, const char *type, const char *param,
                           const char *code, const char *msg)
{
    api_error e;
    api_error_set(&e, status, type, param, code, "%s", msg);
    return srv_send_err(c, mc, &e);
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

/* Whether the request may see what only admins see (server paths): it carries the admin key, or
 * the key the admin endpoints take when no --admin-key is set (no key at all: everyone). */
bool srv_is_admin(srv *s, struct MHD_Connection *mc)
{
    return key_ok(mc, s->cfg.admin_key ? s->cfg.admin_key : s->cfg.api_key);
}

/* Room for one more element in *arr (n used of *cap, each size bytes), doubling. */
int srv_grow(void **arr, int n, int *cap, size_t size)
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
void srv_watch_add(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci || ci->connect_fd == MHD_INVALID_SOCKET || s->watch_ep < 0)
        return;
    pthread_mutex_lock(&s->watch_mu);
    if (srv_grow((void **)&s->watch, s->n_watch, &s->cap_watch, sizeof *s->watch) == 0) {
        uint64_t id = ++s->watch_next;
        struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLONESHOT, .data.u64 = id};
        if (epoll_ctl(s->watch_ep, EPOLL_CTL_ADD, ci->connect_fd, &ev) == 0) {
            s->watch[s->n_watch++] = (srv_watch_slot){id, c, ci->connect_fd};
            c->watch_id = id;
            atomic_fetch_add(&c->refs, 1); /* held by the slot, dropped in srv_watch_remove */
        }
    }
    pthread_mutex_unlock(&s->watch_mu);
}

/* Stop watching c (no-op when it is not watched). Call with c->mu not held. */
void srv_watch_remove(conn *c)
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
        srv_conn_unref(c);
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
        return j ? srv_send_buf(c, mc, 405, "application/json", j, strlen(j), "Allow", routes[i].method) : MHD_NO;
    }
    return srv_err(c, mc, 404, "invalid_request_error", "", "not_found", "no such route");
}

static enum MHD_Result route(conn *c, struct MHD_Connection *mc, const char *url, const char *method)
{
    srv *s = c->s;
    bool get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    if (strcmp(url, "/health") == 0) {
        bool ok = atomic_load(&s->ready) && !atomic_load(&s->stopping);
        const char *st = ok ? "{\"status\":\"ok\"}"
                         : atomic_load(&s->stopping) ? "{\"status\":\"draining\"}" : "{\"status\":\"starting\"}";
        return srv_send_json(c, mc, ok ? 200 : 503, strdup(st));
    }
    if (strcmp(url, "/metrics") == 0 && get) {
        if (s->cfg.metrics_auth && !key_ok(mc, s->cfg.api_key))
            return srv_err(c, mc, 401, "authentication_error", "", "invalid_api_key", "Incorrect API key provided.");
        return srv_admin_metrics(c, mc);
    }
    enum MHD_Result ui_ret; /* the web console: static files, no key (the page asks for one) */
    if (srv_ui_route(s, mc, url, method, &ui_ret))
        return ui_ret;
    bool admin = strcmp(url, "/v1/load_lora_adapter") == 0 || strcmp(url, "/v1/unload_lora_adapter") == 0;
    const char *want = admin && s->cfg.admin_key ? s->cfg.admin_key : s->cfg.api_key;
    /* the admin key opens the user endpoints too (an admin reads /v1/adapters with its paths) */
    if (!key_ok(mc, want) && !(!admin && s->cfg.admin_key && key_ok(mc, s->cfg.admin_key)))
        return srv_err(c, mc, 401, "authentication_error", "", "invalid_api_key", "Incorrect API key provided.");
    if (!atomic_load(&s->ready))
        return srv_err(c, mc, 503, "server_error", "", "", "the model is still loading");
    if (atomic_load(&s->stopping) && post)
        return srv_err(c, mc, 503, "server_error", "", "", "the server is shutting down");
    if (c->too_big)
        return srv_err(c, mc, 413, "invalid_request_error", "", "request_too_large", "request body too large");
    if (get && strcmp(url, "/v1/models") == 0)
        return srv_gen_models(c, mc);
    if (get && strcmp(url, "/v1/adapters") == 0)
        return srv_admin_adapters(c, mc);
    if (post && strcmp(url, "/v1/completions") == 0)
        return srv_gen_start(c, mc, API_COMPLETION);
    if (post && strcmp(url, "/v1/chat/completions") == 0)
        return srv_gen_start(c, mc, API_CHAT);
    if (post && (strcmp(url, "/tokenize") == 0 || strcmp(url, "/detokenize") == 0)) {
        api_error e;
        char *out;
        bool tok = strcmp(url, "/tokenize") == 0;
        if ((tok ? srv_tokenize : srv_detokenize)(s, c->body ? c->body : "", c->len, &out, &e))
            return srv_send_err(c, mc, &e);
        return srv_send_json(c, mc, 200, out);
    }
    if (get && strcmp(url, "/tokenizer_info") == 0) {
        api_error e;
        char *out;
        if (srv_tokenizer_info(s, &out, &e))
            return srv_send_err(c, mc, &e);
        return srv_send_json(c, mc, 200, out);
    }
    if (post && strcmp(url, "/v1/load_lora_adapter") == 0)
        return srv_admin_load(c, mc);
    if (post && strcmp(url, "/v1/unload_lora_adapter") == 0)
        return srv_admin_unload(c, mc);
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
            return srv_err(c, mc, 413, "invalid_request_error", "", "request_too_large", "request body too large");
        }
        return MHD_YES;
    }
    if (c->state == R_DONE_WAIT)
        return srv_gen_wait(c, mc);
    if (c->state == R_LOAD_WAIT)
        return srv_admin_load_wait(c, mc);
    if (c->state == R_RESOLVE_WAIT)
        return srv_gen_resolve_wait(c, mc);
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
    srv_watch_remove(c);
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
    srv_conn_unref(c);
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
