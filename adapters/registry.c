/* registry.c - name -> adapter table with states, pins and draining (see registry.h for the
 * threading rules and lock order). The mutex is a leaf: nothing slow or foreign runs under it. */
#include "adapters/registry.h"
#include "engine/hy.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ad_entry {
    char name[AD_NAME_MAX];
    char path[1024];
    ad_state state;
    int refcount;
    uint64_t pins_total;
    double loaded_at, last_used;
    bool pinned;   /* never evicted for room (ad_reg_evict_idle) */
    int resident_pins; /* of refcount: pins that only keep the adapter on the device (no request) */
    ad_adapter *a; /* NULL while loading */
    struct ad_entry *next;
} ad_entry;

typedef struct ad_grave {
    ad_adapter *a;
    struct ad_grave *next;
} ad_grave;

struct ad_registry {
    pthread_mutex_t mu;
    int max;
    int n;
    ad_entry *head, *tail; /* load order */
    ad_grave *graves;      /* uploaded adapters waiting for the engine thread */
};

const char *ad_state_name(ad_state s)
{
    switch (s) {
    case AD_LOADING: return "loading";
    case AD_READY: return "ready";
    case AD_DRAINING: return "draining";
    }
    return "?";
}

int ad_reg_create(int max_cpu_loras, ad_registry **out)
{
    *out = NULL;
    ad_registry *r = calloc(1, sizeof *r);
    if (!r)
        return hy_err_set(HY_ENOMEM, "out of memory");
    if (pthread_mutex_init(&r->mu, NULL)) {
        free(r);
        return hy_err_set(HY_ENOMEM, "cannot create the registry mutex");
    }
    r->max = max_cpu_loras > 0 ? max_cpu_loras : 64;
    *out = r;
    return HY_OK;
}

void ad_reg_free(ad_registry *r)
{
    if (!r)
        return;
    for (ad_entry *e = r->head, *nx; e; e = nx) {
        nx = e->next;
        ad_free(e->a);
        free(e);
    }
    for (ad_grave *g = r->graves, *nx; g; g = nx) {
        nx = g->next;
        ad_free(g->a);
        free(g);
    }
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/* Under mu: the entry that holds `name` now. A draining entry no longer holds its name: unload
 * frees the name at once, so the same name can be loaded again (new weights) while requests
 * that pinned the old weights finish on them. */
static ad_entry *reg_find(ad_registry *r, const char *name)
{
    for (ad_entry *e = r->head; e; e = e->next)
        if (e->state != AD_DRAINING && !strcmp(e->name, name))
            return e;
    return NULL;
}

static ad_entry *reg_find_adapter(ad_registry *r, const ad_adapter *a)
{
    for (ad_entry *e = r->head; e; e = e->next)
        if (e->a == a)
            return e;
    return NULL;
}

/* Under mu: e at the end of the load order. */
static void reg_append(ad_registry *r, ad_entry *e)
{
    e->next = NULL;
    if (r->tail)
        r->tail->next = e;
    else
        r->head = e;
    r->tail = e;
    r->n++;
}

/* Under mu: unlink e (does not free it). */
static void reg_unlink(ad_registry *r, ad_entry *e)
{
    ad_entry **pp = &r->head, *prev = NULL;
    while (*pp && *pp != e) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return;
    *pp = e->next;
    if (r->tail == e)
        r->tail = prev;
    r->n--;
}

/* Under mu: entries that count against max_cpu_loras. A draining adapter that only the engine's
 * residency pin still holds does not: the engine drops it at its next step. */
static int reg_held(const ad_registry *r)
{
    int n = 0;
    for (const ad_entry *e = r->head; e; e = e->next)
        n += !(e->state == AD_DRAINING && e->refcount == e->resident_pins);
    return n;
}

int ad_reg_begin(ad_registry *r, const char *name, const char *path)
{
    if (!name || !name[0] || strlen(name) >= AD_NAME_MAX)
        return hy_err_set(HY_EINVAL, "adapter name must be 1..%d bytes", AD_NAME_MAX - 1);
    ad_entry *e = calloc(1, sizeof *e);
    if (!e)
        return hy_err_set(HY_ENOMEM, "out of memory");
    strcpy(e->name, name);
    if (path)
        snprintf(e->path, sizeof e->path, "%s", path);
    e->state = AD_LOADING;
    int rc = HY_OK;
    pthread_mutex_lock(&r->mu);
    ad_entry *old = reg_find(r, name);
    if (old)
        rc = hy_err_set(HY_EBUSY, "adapter '%s' is already %s", name,
                        old->state == AD_READY ? "loaded" : ad_state_name(old->state));
    else if (reg_held(r) >= r->max)
        rc = hy_err_set(HY_ELIMIT, "cannot load adapter '%s': %d adapters are loaded (max_cpu_loras = %d)", name,
                        r->n, r->max);
    if (!rc)
        reg_append(r, e);
    pthread_mutex_unlock(&r->mu);
    if (rc)
        free(e);
    return rc;
}

void ad_reg_finish(ad_registry *r, const char *name, ad_adapter *a)
{
    ad_entry *drop = NULL;
    pthread_mutex_lock(&r->mu);
    ad_entry *e = reg_find(r, name);
    if (e && e->state == AD_LOADING) {
        if (a) {
            e->a = a;
            e->state = AD_READY;
            e->loaded_at = e->last_used = hy_now();
            a = NULL;
        } else {
            reg_unlink(r, e);
            drop = e;
        }
    }
    pthread_mutex_unlock(&r->mu);
    free(drop);
    ad_free(a); /* only when no LOADING reservation existed (misuse): do not leak */
}

int ad_reg_load(ad_registry *r, const char *name, const char *path, const ad_shape *s, const ad_opts *opts)
{
    int rc = ad_reg_begin(r, name, path);
    if (rc)
        return rc;
    ad_adapter *a = NULL;
    rc = ad_read(path, s, opts, &a); /* no lock held: may take seconds */
    ad_reg_finish(r, name, rc ? NULL : a);
    return rc;
}

/* Under mu: a draining entry lost its last pin. A never-uploaded adapter is unlinked and
 * returned in *free_now (free it after unlocking, with the entry returned); an uploaded one goes
 * to the graveyard for the engine thread. Without memory for a grave the entry stays listed
 * (draining, unpinned) and ad_reg_collect frees it. Returns the entry to free, or NULL. */
static ad_entry *reg_retire(ad_registry *r, ad_entry *e, ad_adapter **free_now)
{
    *free_now = NULL;
    if (ad_uploaded(e->a)) {
        ad_grave *g = malloc(sizeof *g);
        if (!g)
            return NULL;
        g->a = e->a;
        g->next = r->graves;
        r->graves = g;
    } else {
        *free_now = e->a;
    }
    reg_unlink(r, e);
    return e;
}

/* Under mu: the READY entry called name, or an error naming what is wrong (absent: `missing`). */
static int reg_find_ready(ad_registry *r, const char *name, const char *missing, ad_entry **out)
{
    ad_entry *e = *out = name ? reg_find(r, name) : NULL;
    if (!e)
        return hy_err_set(HY_ENOTFOUND, "adapter '%s' %s", name ? name : "", missing);
    if (e->state != AD_READY)
        return hy_err_set(HY_EBUSY, "adapter '%s' is %s", name, ad_state_name(e->state));
    return HY_OK;
}

int ad_reg_unload(ad_registry *r, const char *name)
{
    ad_adapter *free_now = NULL;
    ad_entry *e, *drop = NULL;
    pthread_mutex_lock(&r->mu);
    int rc = reg_find_ready(r, name, "is not loaded", &e);
    if (!rc) {
        e->state = AD_DRAINING;
        if (e->refcount == 0)
            drop = reg_retire(r, e, &free_now);
    }
    pthread_mutex_unlock(&r->mu);
    free(drop);
    ad_free(free_now);
    return rc;
}

int ad_reg_evict_idle(ad_registry *r, bool fifo, char *name_out, size_t cap)
{
    ad_adapter *free_now = NULL;
    ad_entry *best = NULL, *drop = NULL;
    pthread_mutex_lock(&r->mu);
    for (ad_entry *e = r->head; e; e = e->next)
        if (e->state == AD_READY && e->refcount == e->resident_pins && !e->pinned &&
            (!best || (fifo ? e->loaded_at < best->loaded_at : e->last_used < best->last_used)))
            best = e;
    if (best) {
        snprintf(name_out, cap, "%s", best->name);
        best->state = AD_DRAINING;
        drop = reg_retire(r, best, &free_now);
    }
    pthread_mutex_unlock(&r->mu);
    free(drop);
    ad_free(free_now);
    return best ? HY_OK : hy_err_set(HY_ENOTFOUND, "every loaded adapter is in use or pinned");
}

int ad_reg_set_pinned(ad_registry *r, const char *name, bool pinned)
{
    ad_entry *e;
    pthread_mutex_lock(&r->mu);
    int rc = reg_find_ready(r, name, "is not loaded", &e);
    if (!rc)
        e->pinned = pinned;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

void ad_reg_mark_resident(ad_registry *r, const ad_adapter *a, int delta)
{
    pthread_mutex_lock(&r->mu);
    ad_entry *e = reg_find_adapter(r, a);
    if (e)
        e->resident_pins += delta;
    pthread_mutex_unlock(&r->mu);
}

int ad_reg_n_pinned(ad_registry *r)
{
    int n = 0;
    pthread_mutex_lock(&r->mu);
    for (ad_entry *e = r->head; e; e = e->next)
        n += e->state == AD_READY && e->pinned;
    pthread_mutex_unlock(&r->mu);
    return n;
}

bool ad_reg_pinned(ad_registry *r, const ad_adapter *a)
{
    pthread_mutex_lock(&r->mu);
    ad_entry *e = reg_find_adapter(r, a);
    bool p = e && e->state == AD_READY && e->pinned;
    pthread_mutex_unlock(&r->mu);
    return p;
}

int ad_reg_pin(ad_registry *r, const char *name, ad_adapter **out)
{
    *out = NULL;
    ad_entry *e;
    pthread_mutex_lock(&r->mu);
    int rc = reg_find_ready(r, name, "does not exist", &e);
    if (!rc) {
        e->refcount++;
        e->pins_total++;
        e->last_used = hy_now();
        *out = e->a;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int ad_reg_pin_stack(ad_registry *r, const char *const *names, const float *weights, int n, ad_adapter **out)
{
    *out = NULL;
    ad_adapter *m[AD_STACK_MAX];
    if (n < 1 || n > AD_STACK_MAX)
        return hy_err_set(HY_EINVAL, "an adapter stack has 1 to %d members, not %d", AD_STACK_MAX, n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            if (strcmp(names[i], names[j]) == 0)
                return hy_err_set(HY_EINVAL, "adapter '%s' is named twice in the stack", names[i]);
    int rc = HY_OK, n_pinned = 0;
    while (n_pinned < n && (rc = ad_reg_pin(r, names[n_pinned], &m[n_pinned])) == HY_OK)
        n_pinned++;
    if (!rc)
        rc = ad_stack_new(m, weights, n, out);
    if (rc)
        while (n_pinned-- > 0)
            ad_reg_unpin(r, m[n_pinned]);
    return rc;
}

void ad_reg_unpin(ad_registry *r, ad_adapter *a)
{
    if (!a)
        return;
    if (ad_stack_n(a)) { /* a stack: its members' pins, then itself */
        for (int i = 0; i < ad_stack_n(a); i++)
            ad_reg_unpin(r, ad_stack_member(a, i, NULL));
        ad_free(a);
        return;
    }
    ad_adapter *free_now = NULL;
    ad_entry *drop = NULL;
    pthread_mutex_lock(&r->mu);
    ad_entry *e = reg_find_adapter(r, a);
    if (e && e->refcount > 0 && --e->refcount == 0 && e->state == AD_DRAINING)
        drop = reg_retire(r, e, &free_now);
    pthread_mutex_unlock(&r->mu);
    free(drop);
    ad_free(free_now);
}

int ad_reg_collect(ad_registry *r)
{
    pthread_mutex_lock(&r->mu);
    ad_grave *g = r->graves;
    r->graves = NULL;
    /* Draining, unpinned entries that could not be queued earlier (out of memory). */
    ad_entry *stale = NULL;
    for (ad_entry *e = r->head, *nx; e; e = nx) {
        nx = e->next;
        if (e->state == AD_DRAINING && e->refcount == 0) {
            reg_unlink(r, e);
            e->next = stale;
            stale = e;
        }
    }
    pthread_mutex_unlock(&r->mu);
    int n = 0;
    for (ad_grave *nx; g; g = nx, n++) {
        nx = g->next;
        ad_free(g->a);
        free(g);
    }
    for (ad_entry *nx; stale; stale = nx, n++) {
        nx = stale->next;
        ad_free(stale->a);
        free(stale);
    }
    return n;
}

static void reg_info(const ad_entry *e, ad_reg_info *o)
{
    memset(o, 0, sizeof *o);
    memcpy(o->name, e->name, sizeof o->name);
    memcpy(o->path, e->path, sizeof o->path);
    o->state = e->state;
    o->refcount = e->refcount;
    o->pins_total = e->pins_total;
    o->loaded_at = e->loaded_at;
    o->last_used = e->last_used;
    o->pinned = e->pinned;
    if (e->a) {
        o->r = ad_r(e->a);
        o->K = ad_K(e->a);
        o->host_bytes = ad_host_bytes(e->a);
    }
}

int ad_reg_list(ad_registry *r, ad_reg_info *out, int max)
{
    pthread_mutex_lock(&r->mu);
    int i = 0;
    for (ad_entry *e = r->head; e; e = e->next, i++)
        if (i < max)
            reg_info(e, &out[i]);
    pthread_mutex_unlock(&r->mu);
    return i;
}

int ad_reg_info_get(ad_registry *r, const char *name, ad_reg_info *out)
{
    int rc = HY_OK;
    pthread_mutex_lock(&r->mu);
    ad_entry *e = name ? reg_find(r, name) : NULL;
    if (e)
        reg_info(e, out);
    else
        rc = hy_err_set(HY_ENOTFOUND, "adapter '%s' does not exist", name ? name : "");
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int ad_reg_count(ad_registry *r)
{
    pthread_mutex_lock(&r->mu);
    int n = r->n;
    pthread_mutex_unlock(&r->mu);
    return n;
}

int ad_reg_max(const ad_registry *r) { return r->max; }

int ad_reg_state_of(ad_registry *r, const ad_adapter *a, ad_state *out)
{
    pthread_mutex_lock(&r->mu);
    ad_entry *e = reg_find_adapter(r, a);
    if (e)
        *out = e->state;
    pthread_mutex_unlock(&r->mu);
    return e ? HY_OK : HY_ENOTFOUND;
}

int ad_reg_name_of(ad_registry *r, const ad_adapter *a, char *buf, size_t cap)
{
    int rc = HY_ENOTFOUND;
    pthread_mutex_lock(&r->mu);
    const ad_entry *e = a ? reg_find_adapter(r, (ad_adapter *)a) : NULL;
    if (e) {
        snprintf(buf, cap, "%s", e->name);
        rc = HY_OK;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}
