/* conn_guard.c - the whole-request deadline (see conn_guard.h). The table is small (at most
 * --max-connections slots) and scanned linearly; the sweeper wakes four times a second. */
#include "server/conn_guard.h"

#include "engine/hy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static void *guard_main(void *arg)
{
    srv_guard *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 250 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
        double now = hy_now();
        for (int i = 0; i < g->n; i++) {
            srv_guard_slot *s = &g->slot[i];
            if (s->since > 0 && now - s->since > g->deadline) {
                /* the daemon sees the socket fail and closes the connection (its close event
                 * removes the slot, under this lock, before the descriptor can be reused) */
                shutdown(s->fd, SHUT_RDWR);
                s->since = 0;
                atomic_fetch_add(&g->timed_out, 1);
            }
        }
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

int srv_guard_start(srv_guard *g, double deadline)
{
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->deadline = deadline;
    if (deadline <= 0)
        return HY_OK;
    if (pthread_create(&g->th, NULL, guard_main, g) != 0)
        return hy_err_set(HY_EIO, "cannot start the request-deadline thread: %s", strerror(errno));
    g->started = true;
    return HY_OK;
}

void srv_guard_stop(srv_guard *g)
{
    pthread_mutex_lock(&g->mu);
    g->stop = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
    if (g->started)
        pthread_join(g->th, NULL);
    g->started = false;
    free(g->slot);
    g->slot = NULL;
    g->n = g->cap = 0;
}

/* Under mu: the slot of fd, or -1. */
static int find(const srv_guard *g, int fd)
{
    for (int i = 0; i < g->n; i++)
        if (g->slot[i].fd == fd)
            return i;
    return -1;
}

static void set_since(srv_guard *g, int fd, double since, bool add)
{
    if (g->deadline <= 0 || fd < 0)
        return;
    pthread_mutex_lock(&g->mu);
    int i = find(g, fd);
    if (i < 0 && add) {
        if (g->n == g->cap) {
            int cap = g->cap ? g->cap * 2 : 64;
            srv_guard_slot *p = realloc(g->slot, (size_t)cap * sizeof *p);
            if (p) {
                g->slot = p;
                g->cap = cap;
            }
        }
        if (g->n < g->cap) /* without memory the connection goes unguarded, nothing worse */
            i = g->n++;
        if (i >= 0)
            g->slot[i].fd = fd;
    }
    if (i >= 0)
        g->slot[i].since = since;
    pthread_mutex_unlock(&g->mu);
}

void srv_guard_open(srv_guard *g, int fd) { set_since(g, fd, hy_now(), true); }
void srv_guard_received(srv_guard *g, int fd) { set_since(g, fd, 0, false); }
void srv_guard_answered(srv_guard *g, int fd) { set_since(g, fd, hy_now(), false); }

void srv_guard_close(srv_guard *g, int fd)
{
    if (g->deadline <= 0)
        return;
    pthread_mutex_lock(&g->mu);
    int i = find(g, fd);
    if (i >= 0)
        g->slot[i] = g->slot[--g->n];
    pthread_mutex_unlock(&g->mu);
}
