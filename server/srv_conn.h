/* srv_conn.h - private to the HTTP front end (http.c, srv_gen.c, srv_sse.c, srv_admin.c,
 * srv_fetch.c): the per-connection state `conn` and the helpers those files share. Nothing outside
 * that group includes it; the server's public API stays in http.h. */
#ifndef HY_SRV_CONN_H
#define HY_SRV_CONN_H

#include "api/api.h"
#include "server/http.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Where a connection is: its request's body still arriving (R_NONE), being answered (R_GEN), or
 * suspended waiting for its generation, an admin load or a first-use load. */
enum { R_NONE, R_GEN, R_DONE_WAIT, R_LOAD_WAIT, R_RESOLVE_WAIT };

#define API_MAX_URL 4096 /* longest https:// adapter URL (srv_fetch_adapter's buffers hold it and a file name) */

typedef struct {
    int sent_text;          /* bytes of choice text already streamed */
    int sent_lp;            /* logprob entries already streamed */
    int sent_route;         /* router-view tokens already streamed */
    size_t sent_off;        /* completions: text_offset after the logprob entries streamed */
    bool role_sent, finish_sent, echo_sent;
} stream_choice;

/* One HTTP request's state: created by http.c's on_request, reference-counted (the connection, the
 * scheduler request, a stream response, a watch slot and a loader thread each hold one). */
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
    bool resolved;          /* no (more) first-use loads for this request: its model was loaded, or a start failed */
    ad_adapter *held[API_LORA_MAX]; /* stack members loaded on first use for this request: pinned
                                     * until it ends, so none leaves before the stack is pinned */
    int n_held;
    bool load_pinned;       /* the admin load asked for pinned: true */
    /* adapter loading on a worker thread (mu) */
    bool load_done;
    int load_status;
    char *load_json;
    char load_name[AD_NAME_MAX];
    char *load_path, *load_sha;
} conn;

/* ---- http.c: connection life, responses, auth, the disconnect watch ---- */

/* Drop one reference; the last frees c (unpinning its adapter). NULL is a no-op. */
void srv_conn_unref(conn *c);
/* A load a suspended connection waits for has ended (loader thread): keep its outcome (status,
 * json owned), resume the connection, drop the loader's reference. */
void srv_conn_load_done(conn *c, int status, char *json);
/* Queue buf (owned: freed whatever happens) as the answer. hname/hval (both NULL: none): one more
 * header, e.g. Retry-After or Allow. */
enum MHD_Result srv_send_buf(conn *c, struct MHD_Connection *mc, int status, const char *ctype, char *buf,
                             size_t len, const char *hname, const char *hval);
/* json owned; NULL (out of memory) closes the connection. */
enum MHD_Result srv_send_json(conn *c, struct MHD_Connection *mc, int status, char *json);
enum MHD_Result srv_send_err(conn *c, struct MHD_Connection *mc, const api_error *e);
enum MHD_Result srv_err(conn *c, struct MHD_Connection *mc, int status, const char *type, const char *param,
                        const char *code, const char *msg);
/* The request carries the admin key (or the API key when no --admin-key is set; no key: everyone). */
bool srv_is_admin(srv *s, struct MHD_Connection *mc);
/* Room for one more element in *arr (n used of *cap, each size bytes), doubling. */
int srv_grow(void **arr, int n, int *cap, size_t size);
/* Watch c's socket for the client closing while c waits suspended; srv_watch_remove stops (no-op
 * when c is not watched; call with c->mu not held). */
void srv_watch_add(conn *c, struct MHD_Connection *mc);
void srv_watch_remove(conn *c);

/* ---- srv_gen.c: POST /v1/completions and /v1/chat/completions, GET /v1/models ---- */

/* Parse the body as a request of kind and submit it: answered at once when refused, else streamed
 * (srv_sse_start) or waited for (srv_gen_wait). */
enum MHD_Result srv_gen_start(conn *c, struct MHD_Connection *mc, api_kind kind);
/* Back to a whole answer's connection: suspend again, or answer now that the request finished. */
enum MHD_Result srv_gen_wait(conn *c, struct MHD_Connection *mc);
/* Back from waiting for a first-use load: answer its failure, or go on with the request. */
enum MHD_Result srv_gen_resolve_wait(conn *c, struct MHD_Connection *mc);
enum MHD_Result srv_gen_models(conn *c, struct MHD_Connection *mc);
/* OpenAI's finish reason for a choice's, or NULL when it ended otherwise (cut, failed). */
const char *srv_finish_name(const char *f);
/* Under the request lock: the request ended without finishing a choice (the server stopped). */
bool srv_req_cut(const sched_req *r);
/* Count the finished request in the metrics, once. */
void srv_record_finished(conn *c);

/* ---- srv_sse.c: streamed answers ---- */

/* Queue the SSE response of c's submitted request (the stream reads engine results as they come). */
enum MHD_Result srv_sse_start(conn *c, struct MHD_Connection *mc);

/* ---- srv_admin.c: adapter admin routes, GET /v1/adapters, GET /metrics, adapter bookkeeping ---- */

enum MHD_Result srv_admin_load(conn *c, struct MHD_Connection *mc);
/* Back to a connection waiting for its admin load: suspend again, or answer its outcome. */
enum MHD_Result srv_admin_load_wait(conn *c, struct MHD_Connection *mc);
enum MHD_Result srv_admin_unload(conn *c, struct MHD_Connection *mc);
enum MHD_Result srv_admin_adapters(conn *c, struct MHD_Connection *mc);
enum MHD_Result srv_admin_metrics(conn *c, struct MHD_Connection *mc);
/* Requests and tokens of adapter `name` (srv_admin.c; takes s->mu). */
void srv_count_served(srv *s, const char *name, int requests, uint64_t prompt, uint64_t gen, uint64_t drafted,
                      uint64_t accepted);
/* m names the base model (NULL and "" do too). */
bool srv_is_base_name(srv *s, const char *m);
/* Every registry entry (malloc'ed into *out, caller frees; NULL with *n = 0 when there are none). */
int srv_reg_snapshot(srv *s, ad_reg_info **out, int *n);

/* ---- srv_fetch.c: https:// adapters (srv_download is public, in http.h) ---- */

/* Fetch <url>/adapter_config.json and <url>/adapter_model.safetensors into
 * <cache>/<sha256(url)>/ and write that directory to dir (want_sha: a cached copy of the weights
 * with that sha256 is used as it is). */
int srv_fetch_adapter(srv *s, const char *url, const char *want_sha, char *dir, size_t dir_cap);

#endif
