/* srv_resolve.c - adapters loaded on first use from --adapter-resolver directories (see
 * srv_resolve.h). One loader thread per name being loaded; the lock guards the table of loads in
 * flight and the statistics and is never held while reading files or waking requests. */
#include "server/srv_resolve.h"
#include "server/srv_paths.h"

#include "engine/hy.h"

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

const double srv_resolve_buckets[7] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0};

typedef struct waiter {
    srv_resolve_wake wake;
    void *ctx;
    struct waiter *next;
} waiter;

typedef struct pending {
    char name[AD_NAME_MAX];
    char dir[PATH_MAX];
    srv_resolver *r;
    waiter *waiters;
    struct pending *next;
} pending;

struct srv_resolver {
    char **roots;
    int n_roots;
    ad_registry *reg;
    ad_shape shape;
    pthread_mutex_t mu;
    pthread_cond_t idle;  /* signalled when a load ends (free waits for n_loading == 0) */
    pending *loads;       /* in flight (mu) */
    int n_loading;
    srv_resolve_stats st; /* mu */
    bool fifo;            /* evict the adapter loaded first rather than the one used least recently */
};

int srv_pin_check(ad_registry *reg, int max_loras)
{
    int n = ad_reg_n_pinned(reg);
    if (n >= max_loras - 1)
        return hy_err_set(HY_ELIMIT, "%d adapter(s) are pinned already: at most --max-loras - 1 = %d may be, so "
                          "that unpinned adapters can always run", n, max_loras - 1);
    return HY_OK;
}

int srv_resolve_create(const char *const *roots, int n_roots, ad_registry *reg, const ad_shape *shape, bool fifo,
                       srv_resolver **out)
{
    *out = NULL;
    srv_resolver *r = calloc(1, sizeof *r);
    if (!r || !(r->roots = calloc((size_t)HY_MAX(n_roots, 1), sizeof *r->roots))) {
        free(r);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    for (int i = 0; i < n_roots; i++) {
        char p[PATH_MAX];
        if (!realpath(roots[i], p)) {
            srv_resolve_free(r);
            return hy_err_set(HY_EINVAL, "--adapter-resolver %s: not a directory", roots[i]);
        }
        if (!(r->roots[r->n_roots++] = strdup(p))) {
            srv_resolve_free(r);
            return hy_err_set(HY_ENOMEM, "out of memory");
        }
    }
    r->reg = reg;
    r->shape = *shape;
    r->fifo = fifo;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->idle, NULL);
    *out = r;
    return HY_OK;
}

void srv_resolve_free(srv_resolver *r)
{
    if (!r)
        return;
    if (r->reg) { /* fully created: wait for the loaders */
        pthread_mutex_lock(&r->mu);
        while (r->n_loading > 0)
            pthread_cond_wait(&r->idle, &r->mu);
        pthread_mutex_unlock(&r->mu);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->idle);
    }
    for (int i = 0; i < r->n_roots; i++)
        free(r->roots[i]);
    free(r->roots);
    free(r);
}

/* A name that can only be one directory below a root: no separators, no dot-files, no "..". */
static bool plain_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n >= AD_NAME_MAX || name[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
              c == '_' || c == '.'))
            return false;
    }
    return true;
}

static void *loader(void *arg)
{
    pending *p = arg;
    srv_resolver *r = p->r;
    double t0 = hy_now();
    ad_adapter *a = NULL;
    char msg[512] = "";
    int rc = ad_read(p->dir, &r->shape, NULL, &a);
    if (rc)
        snprintf(msg, sizeof msg, "adapter '%s' (first use): %s", p->name, hy_err_msg());
    ad_reg_finish(r->reg, p->name, rc ? NULL : a);
    double dt = hy_now() - t0;
    pthread_mutex_lock(&r->mu);
    for (pending **pp = &r->loads; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    if (rc) {
        r->st.failures++;
    } else {
        r->st.loads++;
        r->st.load_s_sum += dt;
        int b = 0;
        while (b < 7 && dt > srv_resolve_buckets[b])
            b++;
        r->st.load_hist[b]++;
    }
    waiter *w = p->waiters;
    pthread_mutex_unlock(&r->mu);
    while (w) { /* no lock held: a wake resumes a connection */
        waiter *nx = w->next;
        w->wake(w->ctx, rc, msg);
        free(w);
        w = nx;
    }
    free(p);
    pthread_mutex_lock(&r->mu);
    r->n_loading--;
    pthread_cond_broadcast(&r->idle);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* The directory a root holds for name, checked to stay under it (files too). */
static int find_dir(srv_resolver *r, const char *name, char *dir)
{
    for (int i = 0; i < r->n_roots; i++) {
        char cand[PATH_MAX + AD_NAME_MAX + 2], bad[64];
        struct stat st;
        snprintf(cand, sizeof cand, "%s/%s", r->roots[i], name);
        if (stat(cand, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        const char *const *roots = (const char *const *)&r->roots[i];
        if (!srv_path_under(roots, 1, cand, dir))
            return hy_err_set(HY_EINVAL, "adapter '%s' resolves outside its --adapter-resolver root", name);
        if (!srv_files_under(roots, 1, dir, bad, sizeof bad))
            return hy_err_set(HY_EINVAL, "%s of adapter '%s' is a link that leaves its --adapter-resolver root",
                              bad, name);
        return HY_OK;
    }
    return hy_err_set(HY_ENOTFOUND, "no --adapter-resolver root holds '%s'", name);
}

int srv_resolve_start(srv_resolver *r, const char *name, srv_resolve_wake wake, void *ctx)
{
    if (!plain_name(name))
        return hy_err_set(HY_ENOTFOUND, "'%s' cannot name an adapter directory", name);
    waiter *w = malloc(sizeof *w);
    if (!w)
        return hy_err_set(HY_ENOMEM, "out of memory");
    *w = (waiter){wake, ctx, NULL};
    /* a load of this name already under way: wait for it */
    pthread_mutex_lock(&r->mu);
    for (pending *p = r->loads; p; p = p->next)
        if (!strcmp(p->name, name)) {
            w->next = p->waiters;
            p->waiters = w;
            pthread_mutex_unlock(&r->mu);
            return HY_OK;
        }
    pthread_mutex_unlock(&r->mu);
    char dir[PATH_MAX];
    int rc = find_dir(r, name, dir);
    pending *p = NULL;
    if (rc || !(p = calloc(1, sizeof *p))) {
        free(w);
        return rc ? rc : hy_err_set(HY_ENOMEM, "out of memory");
    }
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->dir, sizeof p->dir, "%s", dir);
    p->r = r;
    p->waiters = w;
    /* Reserve the name (LOADING); when the registry is full, unload the idle adapter used least
     * recently and try again. Under mu so that two first requests cannot both reserve. */
    pthread_mutex_lock(&r->mu);
    for (pending *q = r->loads; q; q = q->next)
        if (!strcmp(q->name, name)) { /* another request got here between the two locks */
            w->next = q->waiters;
            q->waiters = w;
            pthread_mutex_unlock(&r->mu);
            free(p);
            return HY_OK;
        }
    char evicted[AD_NAME_MAX];
    while ((rc = ad_reg_begin(r->reg, name, dir)) == HY_ELIMIT &&
           ad_reg_evict_idle(r->reg, r->fifo, evicted, sizeof evicted) == HY_OK)
        r->st.evictions++;
    if (!rc) {
        p->next = r->loads;
        r->loads = p;
        r->n_loading++;
    }
    pthread_mutex_unlock(&r->mu);
    pthread_t th;
    if (!rc && pthread_create(&th, NULL, loader, p) != 0) {
        ad_reg_finish(r->reg, name, NULL);
        pthread_mutex_lock(&r->mu);
        for (pending **pp = &r->loads; *pp; pp = &(*pp)->next)
            if (*pp == p) {
                *pp = p->next;
                break;
            }
        r->n_loading--;
        waiter *late = p->waiters->next; /* requests that joined meanwhile: tell them too */
        pthread_mutex_unlock(&r->mu);
        for (waiter *x = late, *nx; x; x = nx) {
            nx = x->next;
            x->wake(x->ctx, HY_ENOMEM, "cannot start a loader thread");
            free(x);
        }
        rc = hy_err_set(HY_ENOMEM, "cannot start a loader thread");
    } else if (!rc) {
        pthread_detach(th);
        return HY_OK;
    }
    free(w);
    free(p);
    return rc; /* HY_EBUSY: an admin load of the name is under way; HY_ELIMIT: nothing idle to evict */
}

void srv_resolve_get_stats(srv_resolver *r, srv_resolve_stats *out)
{
    pthread_mutex_lock(&r->mu);
    *out = r->st;
    pthread_mutex_unlock(&r->mu);
}
