/* srv_resolve.h - adapters loaded on first use. A request naming an adapter that is not loaded,
 * whose name is a directory under a --adapter-resolver root or an entry of the URL resolver's
 * sha256 manifest (--adapter-resolver-url), starts one load of it (however many requests ask at
 * once) on a thread of its own; the requests wait and are woken when it ends, each with its own
 * registry pin. When the registry is full, the least recently used idle adapter (no request holds
 * it, not pinned) is unloaded to make room; with none idle the load waits a bounded time for one.
 * HTTP threads and the loader threads; the engine thread never waits on it. */
#ifndef HY_SRV_RESOLVE_H
#define HY_SRV_RESOLVE_H

#include "adapters/registry.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct srv_resolver srv_resolver;

/* Called once from the loader thread when the load a request waits for has ended: status 0 and
 * `pinned`, a registry pin taken for this waiter (ad_reg_unpin it), or an HTTP status with why:
 * 400 the adapter is invalid (or what the store sent is not it: sha256, size cap), 502 the URL
 * resolver could not fetch it (network, HTTP error),
 * 503 no room (every loaded adapter in use or pinned), 404 gone again (unloaded meanwhile). */
typedef void (*srv_resolve_wake)(void *ctx, int status, const char *msg, ad_adapter *pinned);

/* The URL resolver's download: url (the template with the name put in), the manifest's sha256 of
 * adapter_model.safetensors; writes the local directory that then holds both files into dir and
 * whether they were downloaded now (false: a cached copy with that sha256 served). Loader
 * threads; HY_OK or an error with its message. */
typedef int (*srv_resolve_fetch)(void *ctx, const char *url, const char *sha256, char *dir, size_t cap,
                                 bool *downloaded);

typedef struct {
    const char *const *roots;  /* resolver directories (copied, resolved with realpath) */
    int n_roots;
    const char *url;           /* "https://host/path/{name}/" ({name} once; NULL: no URL resolver) */
    const char *manifest;      /* JSON object {"name": "<sha256 hex>"}: the names the URL serves;
                                * read again when its modification time changes */
    srv_resolve_fetch fetch;   /* required with url */
    void *fetch_ctx;
    double room_wait_s;        /* a load that finds the registry full of busy adapters waits this
                                * long for one to become idle (0: fails at once) */
    bool fifo;                 /* evict the adapter loaded first, not the one used least recently */
    be *pack_for;              /* the backend whose host-side upload work loads do too (ad_opts) */
} srv_resolve_cfg;

/* *out owned: srv_resolve_free. HY_EINVAL with why for a bad root, template or manifest. */
int srv_resolve_create(const srv_resolve_cfg *cfg, ad_registry *reg, const ad_shape *shape, srv_resolver **out);
/* Waits for loads in flight, then frees. NULL is a no-op. */
void srv_resolve_free(srv_resolver *r);

/* name is not in the registry: HY_ENOTFOUND when no root has a directory of that name and the
 * manifest does not list it (or the name cannot be one: '/', leading '.', ...); HY_EINVAL with a
 * message when the directory exists but leaves its root (a link); HY_OK when a load of it is
 * under way (started now or by an earlier request): wake(ctx, ...) will be called exactly once. */
int srv_resolve_start(srv_resolver *r, const char *name, srv_resolve_wake wake, void *ctx);

/* A pin (pinned: true) is allowed while fewer than max_loras - 1 adapters are pinned, so that an
 * unpinned adapter can always get a device slot (SGLang's rule): HY_OK or HY_ELIMIT with why. */
int srv_pin_check(ad_registry *reg, int max_loras);

typedef struct {
    uint64_t loads, failures, evictions; /* first-use loads finished, failed; adapters unloaded for room */
    uint64_t downloads;                  /* of the loads, fetched through the URL resolver (not cached) */
    double load_s_sum;                   /* seconds spent in finished loads */
    uint64_t load_hist[8];               /* loads by duration: <=10ms, 25, 50, 100, 250, 500, 1000, more */
} srv_resolve_stats;
void srv_resolve_get_stats(srv_resolver *r, srv_resolve_stats *out);
extern const double srv_resolve_buckets[7]; /* upper bounds of load_hist[0..6], seconds */

#endif
