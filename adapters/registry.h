/* registry.h - the server's adapters by name: state (loading, ready, draining), refcounts held
 * by requests (pin/unpin), a cap on adapters held in host memory (max_cpu_loras), unload by
 * draining. It never reads files or calls the backend while holding its lock.
 *
 * Threads and locks:
 *   - One mutex (reg->mu) guards the table. It is a LEAF lock: no other lock is taken while it
 *     is held, and no file I/O, parsing, backend call or callback runs under it. Callers may
 *     hold their own locks (scheduler, HTTP) when calling in; the order is always
 *     "caller's lock -> reg->mu", never the reverse.
 *   - Loading: ad_reg_load runs on the calling (HTTP) thread: it reserves the name (LOADING)
 *     under the lock, reads + validates with ad_read with NO lock held, then publishes READY.
 *   - Backend matrices: ad_upload/ad_unupload run on the engine thread only (the engine calls
 *     ad_upload on a pinned adapter before its first forward). An adapter whose last pin goes
 *     away while draining is freed at once when it was never uploaded; otherwise it moves to a
 *     graveyard that the engine thread empties with ad_reg_collect.
 */
#ifndef HY_REGISTRY_H
#define HY_REGISTRY_H

#include "adapters/adapter.h"

#include <stdint.h>

typedef enum { AD_LOADING = 0, AD_READY = 1, AD_DRAINING = 2 } ad_state;

const char *ad_state_name(ad_state s); /* "loading", "ready", "draining" */

typedef struct ad_registry ad_registry;

#define AD_NAME_MAX 256

/* max_cpu_loras: adapters (in any state) held at once; <= 0 means 64.
 * *out owned by the caller: ad_reg_free. */
int ad_reg_create(int max_cpu_loras, ad_registry **out);
/* Frees every adapter (engine thread, after the engine stopped using them). NULL no-op. */
void ad_reg_free(ad_registry *r);

/* Reserve `name` in LOADING state. HY_EBUSY if the name is loading or loaded (a draining entry of
 * the same name does not count), HY_ELIMIT if max_cpu_loras adapters (draining ones included) are
 * held, HY_EINVAL for an empty/too long name. */
int ad_reg_begin(ad_registry *r, const char *name, const char *path);
/* Publish a reserved name: a != NULL -> READY (registry takes ownership of a);
 * a == NULL -> the reservation is dropped (load failed). */
void ad_reg_finish(ad_registry *r, const char *name, ad_adapter *a);
/* begin + ad_read(path, s, opts) + finish, on the calling thread. Errors as those. */
int ad_reg_load(ad_registry *r, const char *name, const char *path, const ad_shape *s, const ad_opts *opts);

/* Unload: READY -> DRAINING. The name is free when this returns: pins and info by name no
 * longer see the old entry, and a load of the same name may start at once (a new entry with the
 * new weights); requests that pinned the old weights finish on them, and they are freed when the
 * last pin goes. HY_ENOTFOUND when no entry holds the name, HY_EBUSY while it is loading. */
int ad_reg_unload(ad_registry *r, const char *name);

/* Make room: unload (as ad_reg_unload) the READY adapter that no request holds and that is not
 * pinned, used least recently (fifo: loaded first); its name goes to name_out. HY_ENOTFOUND when
 * every adapter is held, pinned or still loading. */
int ad_reg_evict_idle(ad_registry *r, bool fifo, char *name_out, size_t cap);
/* Mark a READY adapter pinned (never evicted for room) or not. HY_ENOTFOUND / HY_EBUSY as pin. */
int ad_reg_set_pinned(ad_registry *r, const char *name, bool pinned);

/* The engine's own pin on an adapter it keeps on the device (delta +1 after ad_reg_pin, -1 before
 * the ad_reg_unpin): such pins alone do not make an adapter "in use" for ad_reg_evict_idle. */
void ad_reg_mark_resident(ad_registry *r, const ad_adapter *a, int delta);

/* READY adapters marked pinned; whether the adapter object a is one of them. */
int ad_reg_n_pinned(ad_registry *r);
bool ad_reg_pinned(ad_registry *r, const ad_adapter *a);

/* Pin a READY adapter for a request: *out stays valid until the matching ad_reg_unpin.
 * HY_ENOTFOUND when unknown, HY_EBUSY when loading or draining. */
int ad_reg_pin(ad_registry *r, const char *name, ad_adapter **out);
/* Pin every named READY adapter and make them a stack (ad_stack_new) with those weights; the
 * stack holds the pins until ad_reg_unpin(stack). Errors as ad_reg_pin for the first name that
 * fails (nothing stays pinned), HY_EINVAL for a name given twice or a bad weight. */
int ad_reg_pin_stack(ad_registry *r, const char *const *names, const float *weights, int n, ad_adapter **out);
/* Drop one pin (a from ad_reg_pin; a stack: its members' pins, and the stack is freed).
 * Thread-safe; see the header comment for freeing. */
void ad_reg_unpin(ad_registry *r, ad_adapter *a);

/* Engine thread: free adapters whose last pin went while draining and that were uploaded.
 * Returns how many were freed. */
int ad_reg_collect(ad_registry *r);

/* Snapshot of one entry (for GET /v1/adapters, /metrics). */
typedef struct {
    char name[AD_NAME_MAX];
    char path[1024];
    ad_state state;
    int refcount;
    uint64_t pins_total; /* pins since load */
    double loaded_at;    /* hy_now() when READY (0 while loading) */
    double last_used;    /* hy_now() of the last pin */
    bool pinned;         /* kept loaded: never evicted for room */
    int r, K;            /* 0 while loading */
    size_t host_bytes;
} ad_reg_info;

/* Copy up to max entries (in load order) into out; returns the number of entries held
 * (may exceed max). */
int ad_reg_list(ad_registry *r, ad_reg_info *out, int max);
/* One entry by name: 0, or HY_ENOTFOUND. */
int ad_reg_info_get(ad_registry *r, const char *name, ad_reg_info *out);
int ad_reg_count(ad_registry *r);
int ad_reg_max(const ad_registry *r);
/* The state of a held adapter, found by its pointer (a draining one no longer holds its name, which
 * a new load may already hold): 0, or HY_ENOTFOUND once it left the table. */
int ad_reg_state_of(ad_registry *r, const ad_adapter *a, ad_state *out);
/* The name of a held adapter (READY, or DRAINING while pinned) into buf: 0, or HY_ENOTFOUND. */
int ad_reg_name_of(ad_registry *r, const ad_adapter *a, char *buf, size_t cap);

#endif
