/* srv_resolve.c - adapters loaded on first use from --adapter-resolver directories or the URL
 * resolver's manifest (see srv_resolve.h). One loader thread per name being loaded; the lock
 * guards the table of loads in flight, the manifest and the statistics and is never held while
 * reading files, downloading or waking requests. */
#include "server/srv_resolve.h"
#include "server/srv_paths.h"

#include "engine/hy.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const double srv_resolve_buckets[7] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0};

typedef struct waiter {
    srv_resolve_wake wake;
    void *ctx;
    struct waiter *next;
} waiter;

typedef struct pending {
    char name[AD_NAME_MAX];
    char dir[PATH_MAX];       /* a resolver directory's adapter; "" when fetched from url */
    char url[PATH_MAX];       /* the URL resolver's adapter (with sha) */
    char sha[65];
    srv_resolver *r;
    waiter *waiters;
    struct pending *next;
} pending;

typedef struct {
    char name[AD_NAME_MAX];
    char sha[65];
} mf_entry;

struct srv_resolver {
    char **roots;
    int n_roots;
    char *url;            /* template with {name}; NULL: none */
    char *manifest;       /* its path */
    srv_resolve_fetch fetch;
    void *fetch_ctx;
    double room_wait_s;
    be *pack_for;
    ad_registry *reg;
    ad_shape shape;
    pthread_mutex_t mu;
    pthread_cond_t idle;  /* signalled when a load ends (free waits for n_loading == 0) */
    pending *loads;       /* in flight (mu) */
    int n_loading;
    srv_resolve_stats st; /* mu */
    bool fifo;            /* evict the adapter loaded first rather than the one used least recently */
    mf_entry *mf;         /* the manifest as last read (mu) */
    int n_mf;
    struct timespec mf_mtime;
};

int srv_pin_check(ad_registry *reg, int max_loras)
{
    int n = ad_reg_n_pinned(reg);
    if (n >= max_loras - 1)
        return hy_err_set(HY_ELIMIT, "%d adapter(s) are pinned already: at most --max-loras - 1 = %d may be, so "
                          "that unpinned adapters can always run", n, max_loras - 1);
    return HY_OK;
}

static bool sha_hex(const char *s)
{
    if (strlen(s) != 64)
        return false;
    for (int i = 0; i < 64; i++)
        if (!isxdigit((unsigned char)s[i]))
            return false;
    return true;
}

/* Read the manifest into r->mf (mu held or not yet shared). A bad file keeps what was read before
 * and says why; at creation that is an error. */
static int mf_read(srv_resolver *r)
{
    struct stat st;
    if (stat(r->manifest, &st) != 0)
        return hy_err_set(HY_EIO, "--adapter-resolver-manifest %s: %s", r->manifest, strerror(errno));
    json_error_t je;
    json_t *root = json_load_file(r->manifest, JSON_REJECT_DUPLICATES, &je);
    if (!root || !json_is_object(root)) {
        json_decref(root);
        return hy_err_set(HY_EFORMAT, "--adapter-resolver-manifest %s: not a JSON object of name -> sha256 (%s)",
                          r->manifest, root ? "not an object" : je.text);
    }
    size_t n = json_object_size(root);
    mf_entry *mf = calloc(HY_MAX(n, 1), sizeof *mf);
    if (!mf) {
        json_decref(root);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    int k = 0, rc = HY_OK;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        const char *h = json_string_value(v);
        if (strlen(key) >= AD_NAME_MAX || !h || !sha_hex(h)) {
            rc = hy_err_set(HY_EFORMAT, "--adapter-resolver-manifest %s: entry '%.64s' needs a name under %d bytes "
                            "and 64 hex digits of sha256", r->manifest, key, AD_NAME_MAX);
            break;
        }
        snprintf(mf[k].name, sizeof mf[k].name, "%s", key);
        snprintf(mf[k].sha, sizeof mf[k].sha, "%s", h);
        k++;
    }
    json_decref(root);
    if (rc) {
        free(mf);
        return rc;
    }
    free(r->mf);
    r->mf = mf;
    r->n_mf = k;
    r->mf_mtime = st.st_mtim;
    return HY_OK;
}

/* The manifest's sha256 for name into sha (mu held); false when it does not list the name. A
 * manifest changed on disk is read again first. */
static bool mf_lookup(srv_resolver *r, const char *name, char sha[65])
{
    struct stat st;
    if (stat(r->manifest, &st) == 0 &&
        (st.st_mtim.tv_sec != r->mf_mtime.tv_sec || st.st_mtim.tv_nsec != r->mf_mtime.tv_nsec) && mf_read(r))
        fprintf(stderr, "hydrad serve: %s (keeping the manifest read before)\n", hy_err_msg());
    for (int i = 0; i < r->n_mf; i++)
        if (!strcmp(r->mf[i].name, name)) {
            memcpy(sha, r->mf[i].sha, 65);
            return true;
        }
    return false;
}

static int url_check(const char *url)
{
    const char *at = url ? strstr(url, "{name}") : NULL;
    if (!url || strncmp(url, "https://", 8) || !at || strstr(at + 6, "{name}") || strlen(url) > PATH_MAX - AD_NAME_MAX)
        return hy_err_set(HY_EINVAL, "--adapter-resolver-url must be an https:// URL holding {name} once (got '%s')",
                          url ? url : "");
    return HY_OK;
}

int srv_resolve_create(const srv_resolve_cfg *cfg, ad_registry *reg, const ad_shape *shape, srv_resolver **out)
{
    *out = NULL;
    if (cfg->url && !cfg->fetch)
        return hy_err_set(HY_EINVAL, "URL resolver without a fetch");
    if (cfg->url && url_check(cfg->url))
        return HY_EINVAL;
    if (cfg->url && !cfg->manifest)
        return hy_err_set(HY_EINVAL, "--adapter-resolver-url needs --adapter-resolver-manifest (the sha256 of "
                          "every adapter it may load)");
    srv_resolver *r = calloc(1, sizeof *r);
    if (!r || !(r->roots = calloc((size_t)HY_MAX(cfg->n_roots, 1), sizeof *r->roots))) {
        free(r);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    int rc = HY_OK;
    for (int i = 0; i < cfg->n_roots && !rc; i++) {
        char p[PATH_MAX];
        if (!realpath(cfg->roots[i], p))
            rc = hy_err_set(HY_EINVAL, "--adapter-resolver %s: not a directory", cfg->roots[i]);
        else if (!(r->roots[r->n_roots++] = strdup(p)))
            rc = hy_err_set(HY_ENOMEM, "out of memory");
    }
    if (!rc && cfg->url && (!(r->url = strdup(cfg->url)) || !(r->manifest = strdup(cfg->manifest))))
        rc = hy_err_set(HY_ENOMEM, "out of memory");
    if (!rc && r->manifest)
        rc = mf_read(r);
    if (rc) {
        srv_resolve_free(r);
        return rc;
    }
    r->fetch = cfg->fetch;
    r->fetch_ctx = cfg->fetch_ctx;
    r->room_wait_s = cfg->room_wait_s;
    r->pack_for = cfg->pack_for;
    r->reg = reg;
    r->shape = *shape;
    r->fifo = cfg->fifo;
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
    free(r->url);
    free(r->manifest);
    free(r->mf);
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

/* Reserve the name in the registry (LOADING). When it is full, unload the idle adapter used least
 * recently and try again; with none idle (every one in use or pinned: requests that are finishing
 * drop their pins within moments) poll until room_wait_s has passed. HY_EBUSY: the name is loaded
 * or being loaded by an admin call. */
static int reserve(srv_resolver *r, pending *p)
{
    double until = hy_now() + r->room_wait_s;
    char evicted[AD_NAME_MAX];
    for (;;) {
        int rc = ad_reg_begin(r->reg, p->name, p->dir[0] ? p->dir : p->url);
        if (rc != HY_ELIMIT)
            return rc;
        if (ad_reg_evict_idle(r->reg, r->fifo, evicted, sizeof evicted) == HY_OK) {
            pthread_mutex_lock(&r->mu);
            r->st.evictions++;
            pthread_mutex_unlock(&r->mu);
            continue;
        }
        if (hy_now() >= until)
            return hy_err_set(HY_ELIMIT, "cannot load adapter '%s': every loaded adapter (--max-cpu-loras) is in use "
                              "or pinned", p->name);
        usleep(10000);
    }
}

/* Read (fetching it first for the URL resolver) and publish p's adapter; status as for wake. */
static int load(srv_resolver *r, pending *p, char *msg, size_t cap, bool *downloaded)
{
    int rc = reserve(r, p);
    if (rc == HY_EBUSY) { /* loaded by someone else meanwhile (or an admin load under way) */
        double until = hy_now() + r->room_wait_s;
        ad_reg_info info;
        while (ad_reg_info_get(r->reg, p->name, &info) == 0 && info.state == AD_LOADING && hy_now() < until)
            usleep(10000);
        return 0; /* the waiters pin it, or hear that it is gone */
    }
    if (rc) {
        snprintf(msg, cap, "adapter '%s' (first use): %s", p->name, hy_err_msg());
        return rc == HY_ELIMIT ? 503 : 500;
    }
    int status = 0;
    ad_adapter *a = NULL;
    if (!p->dir[0] && (rc = r->fetch(r->fetch_ctx, p->url, p->sha, p->dir, sizeof p->dir, downloaded)))
        status = rc == HY_EIO ? 502 : 400; /* the store unreachable; or what it sent is not the adapter */
    else if ((rc = ad_read(p->dir, &r->shape, &(ad_opts){.scale_mult = 1.0f, .pack_for = r->pack_for}, &a)))
        status = 400;
    if (status)
        snprintf(msg, cap, "adapter '%s' (first use): %s", p->name, hy_err_msg());
    ad_reg_finish(r->reg, p->name, a);
    return status;
}

static void *loader(void *arg)
{
    pending *p = arg;
    srv_resolver *r = p->r;
    double t0 = hy_now();
    char msg[600] = "";
    bool downloaded = false;
    int status = load(r, p, msg, sizeof msg, &downloaded);
    double dt = hy_now() - t0;
    pthread_mutex_lock(&r->mu);
    for (pending **pp = &r->loads; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    if (status) {
        r->st.failures++;
    } else {
        r->st.loads++;
        r->st.downloads += downloaded;
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
        ad_adapter *a = NULL; /* each waiter's own pin, taken before any of them can drop one */
        int st = status;
        if (!st && ad_reg_pin(r->reg, p->name, &a)) {
            st = 404;
            snprintf(msg, sizeof msg, "adapter '%s' was unloaded as soon as it was loaded: %s", p->name, hy_err_msg());
        }
        w->wake(w->ctx, st, msg, a);
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

/* Under mu: join the load of name in flight, if there is one. */
static bool join(srv_resolver *r, const char *name, waiter *w)
{
    for (pending *p = r->loads; p; p = p->next)
        if (!strcmp(p->name, name)) {
            w->next = p->waiters;
            p->waiters = w;
            return true;
        }
    return false;
}

/* Where name comes from: a resolver directory (p->dir), else the manifest (p->url, p->sha). */
static int locate(srv_resolver *r, const char *name, pending *p)
{
    int rc = find_dir(r, name, p->dir);
    if (rc != HY_ENOTFOUND || !r->url)
        return rc;
    p->dir[0] = '\0';
    pthread_mutex_lock(&r->mu);
    bool listed = mf_lookup(r, name, p->sha);
    pthread_mutex_unlock(&r->mu);
    if (!listed)
        return hy_err_set(HY_ENOTFOUND, "neither an --adapter-resolver root nor the URL resolver's manifest holds '%s'",
                          name);
    const char *at = strstr(r->url, "{name}");
    snprintf(p->url, sizeof p->url, "%.*s%s%s", (int)(at - r->url), r->url, name, at + 6);
    return HY_OK;
}

int srv_resolve_start(srv_resolver *r, const char *name, srv_resolve_wake wake, void *ctx)
{
    if (!plain_name(name))
        return hy_err_set(HY_ENOTFOUND, "'%s' cannot name an adapter directory", name);
    waiter *w = malloc(sizeof *w);
    pending *p = calloc(1, sizeof *p);
    if (!w || !p) {
        free(w);
        free(p);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    *w = (waiter){wake, ctx, NULL};
    pthread_mutex_lock(&r->mu);
    bool joined = join(r, name, w); /* a load of this name already under way: wait for it */
    pthread_mutex_unlock(&r->mu);
    int rc = joined ? HY_OK : locate(r, name, p);
    if (joined || rc) {
        if (rc)
            free(w);
        free(p);
        return rc;
    }
    snprintf(p->name, sizeof p->name, "%s", name);
    p->r = r;
    p->waiters = w;
    pthread_mutex_lock(&r->mu);
    if (join(r, name, w)) { /* another request got here between the two locks */
        pthread_mutex_unlock(&r->mu);
        free(p);
        return HY_OK;
    }
    p->next = r->loads;
    r->loads = p;
    r->n_loading++;
    pthread_t th;
    if (pthread_create(&th, NULL, loader, p) == 0) {
        pthread_mutex_unlock(&r->mu);
        pthread_detach(th);
        return HY_OK;
    }
    r->loads = p->next; /* under mu since it was linked: no one joined */
    r->n_loading--;
    pthread_mutex_unlock(&r->mu);
    free(w);
    free(p);
    return hy_err_set(HY_ENOMEM, "cannot start a loader thread");
}

void srv_resolve_get_stats(srv_resolver *r, srv_resolve_stats *out)
{
    pthread_mutex_lock(&r->mu);
    *out = r->st;
    pthread_mutex_unlock(&r->mu);
}
