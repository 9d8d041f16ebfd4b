/* http.h - the HTTP front end (libmicrohttpd, internal thread pool + epoll): routes, auth,
 * limits, streaming through suspended connections, admin endpoints, /health, /metrics.
 * HTTP threads parse, tokenize, enqueue and stream; they never run the model. */
#ifndef HY_HTTP_H
#define HY_HTTP_H

#include "adapters/registry.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "engine/tokenizer.h"
#include "server/conn_guard.h"
#include "server/metrics.h"
#include "server/srv_struct.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct {
    const char *host;
    int port;
    const char *served_name;   /* base model's name in requests and /v1/models */
    const char *api_key;       /* NULL: no auth */
    const char *admin_key;     /* NULL: admin endpoints use api_key */
    int http_threads;
    int max_conns;
    size_t max_body;           /* bytes; larger bodies -> 413 */
    const char *const *adapter_roots;
    int n_roots;
    int max_loras;
    const char *adapter_cache; /* where https:// adapters are downloaded (created on demand) */
    size_t adapter_max_bytes;  /* download cap per file */
    const char *url_ca;        /* PEM certificates https:// adapter hosts are checked against (NULL: system) */
    const char *const *url_allow; /* hosts https:// adapters may come from (none: URL loading off) */
    int n_url_allow;
    bool metrics_auth;         /* /metrics needs the API key */
    double request_deadline;   /* seconds a connection has for a whole request (<= 0: none) */
    int max_conns_per_ip;      /* 0: no per-address limit */
    bool json_ws_flexible;     /* structured JSON may carry whitespace (default: compact) */
    int max_prompts;           /* prompts in one completions request at most */
    bool no_ui;                /* --no-ui: no web console at / (server/srv_ui.c) */
} srv_config;

/* Router statistics snapshot taken on the engine thread, read by GET /v1/adapters. */
typedef struct {
    char name[AD_NAME_MAX];
    uint64_t tokens;
    int K;
    float gate[AD_MAX_K];
    double gate_n;       /* token-projections the mean gates average over (their sum is gate[k] * gate_n) */
    bool resident;
} srv_ad_stats;

/* Requests routed to one adapter name and their tokens (HTTP threads count under srv.mu). */
typedef struct {
    char name[AD_NAME_MAX];
    uint64_t requests;
    uint64_t prompt_tokens, generation_tokens; /* of finished requests */
    uint64_t spec_drafted, spec_accepted;      /* their draft tokens proposed, accepted */
} srv_ad_served;

/* A whole (non-streamed) answer whose socket the disconnect watcher polls (srv.watch_mu). */
typedef struct {
    uint64_t id;      /* epoll data: never reused, so a stale event finds no slot */
    struct conn *c;   /* holds one reference on c while listed */
    int fd;
} srv_watch_slot;

typedef struct srv {
    srv_config cfg;
    struct MHD_Daemon *mhd;
    atomic_bool ready;
    atomic_bool stopping;
    int64_t created;
    atomic_uint_fast64_t next_id;
    atomic_uint_fast64_t device_loads, device_evictions; /* adapters into a device slot, idle ones moved out for one (engine thread) */
    char bound[64];          /* numeric address srv_start listens on (IPv6 in brackets) */
    /* set up by serve.c before srv_start; read-only afterwards */
    eng_model *model;
    tok_vocab *vocab;
    tok_chat_kind chat;
    bool chat_ok;
    int n_ctx;
    sched *sched;
    ad_registry *reg;
    ad_shape shape;
    srv_metrics metrics;
    /* adapter names and stats (mu) */
    pthread_mutex_t mu;
    srv_ad_stats *stats;     /* grown by srv_stats_entry; bounded by the adapters loaded */
    int n_stats, cap_stats;
    srv_ad_served *served;   /* requests routed to each adapter name; entries go on unload */
    int n_served, cap_served;
    /* disconnect watcher of whole answers (a suspended MHD connection is not polled) */
    pthread_mutex_t watch_mu;
    srv_watch_slot *watch;
    int n_watch, cap_watch;
    uint64_t watch_next;
    int watch_ep, watch_ev;  /* epoll and its stop eventfd; -1 when not started */
    pthread_t watch_th;
    srv_guard guard;         /* the whole-request deadline (slow clients) */
    srv_gcache *gcache;      /* compiled grammars (structured outputs, tools); NULL: out of memory */
    struct srv_resolver *resolver; /* load on first use (--adapter-resolver); NULL: off; set before srv_start */
} srv;

/* Initialise s (cfg copied by value: its strings must outlive s). */
void srv_init(srv *s, const srv_config *cfg);
void srv_clear(srv *s);
/* Start listening (MHD threads). /health answers 503 until s->ready is set. */
int srv_start(srv *s);
/* Stop accepting new connections (in-flight ones go on). */
void srv_quiesce(srv *s);
/* Stop the daemon (every suspended connection must have been resumed: stop the scheduler first). */
void srv_stop(srv *s);
/* Name of an adapter the registry holds (engine thread's adapter_name); NULL when unknown. */
const char *srv_adapter_name(srv *s, const void *ad, char *buf, size_t cap);
/* The router-statistics entry of adapter `name` in s->stats (caller holds s->mu): found, or
 * appended zeroed with the name set (the table grows). NULL only when out of memory. */
srv_ad_stats *srv_stats_entry(srv *s, const char *name);

/* Download url into dst through a temp file of its own in dst's directory (mkstemp), renamed
 * onto dst only when the whole transfer succeeded, within cap bytes, and (want_sha non-NULL:
 * 64 hex digits) its SHA-256 matches; every failure removes the temp file and leaves dst as it
 * was. Concurrent downloads to one dst never share a file. protocols: libcurl's protocol list
 * for the URL and redirects ("https" in the server; tests use "file"). ca_file: the certificates
 * to trust for https (NULL: the system's). */
int srv_download(const char *url, const char *dst, size_t cap, const char *want_sha, const char *protocols,
                 const char *ca_file);
/* The URL resolver's fetch (srv_resolve_fetch; ctx is the srv): the host allow-list, then the
 * adapter cache (a copy with the manifest's sha256 is kept and reused) or a download. */
int srv_fetch_resolved(void *ctx, const char *url, const char *sha256, char *dir, size_t cap, bool *downloaded);
/* url's host is allowed by --adapter-url-allow and resolves to no private address; false with
 * the reason in msg. */
bool srv_url_allowed(srv *s, const char *url, char *msg, size_t cap);

#endif
