/* srv_resolve.h - adapters loaded on first use. A request naming an adapter that is not loaded,
 * whose name is a directory under a --adapter-resolver root, starts one load of it (however many
 * requests ask at once) on a thread of its own; the requests wait and are woken when it ends.
 * When the registry is full, the least recently used idle adapter (no request holds it, not
 * pinned) is unloaded to make room. HTTP threads and the loader threads; the engine thread never
 * waits on it. */
#ifndef HY_SRV_RESOLVE_H
#define HY_SRV_RESOLVE_H

#include "adapters/registry.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct srv_resolver srv_resolver;

/* Called once from the loader thread when the load a request waits for has ended: rc 0 (the name
 * is READY now) or an error with its message. */
typedef void (*srv_resolve_wake)(void *ctx, int rc, const char *msg);

/* roots: resolver directories (copied, resolved with realpath). *out owned: srv_resolve_free. */
int srv_resolve_create(const char *const *roots, int n_roots, ad_registry *reg, const ad_shape *shape, bool fifo,
                       srv_resolver **out);
/* Waits for loads in flight, then frees. NULL is a no-op. */
void srv_resolve_free(srv_resolver *r);

/* name is not in the registry: HY_ENOTFOUND when no root has a directory of that name (or the
 * name cannot be one: '/', leading '.', ...); HY_EINVAL with a message when the directory exists
 * but leaves its root (a link); HY_OK when a load of it is under way (started now or by an
 * earlier request): wake(ctx, ...) will be called exactly once. */
int srv_resolve_start(srv_resolver *r, const char *name, srv_resolve_wake wake, void *ctx);

/* A pin (pinned: true) is allowed while fewer than max_loras - 1 adapters are pinned, so that an
 * unpinned adapter can always get a device slot (SGLang's rule): HY_OK or HY_ELIMIT with why. */
int srv_pin_check(ad_registry *reg, int max_loras);

typedef struct {
    uint64_t loads, failures, evictions; /* first-use loads finished, failed; adapters unloaded for room */
    double load_s_sum;                   /* seconds spent in finished loads */
    uint64_t load_hist[8];               /* loads by duration: <=10ms, 25, 50, 100, 250, 500, 1000, more */
} srv_resolve_stats;
void srv_resolve_get_stats(srv_resolver *r, srv_resolve_stats *out);
extern const double srv_resolve_buckets[7]; /* upper bounds of load_hist[0..6], seconds */

#endif
