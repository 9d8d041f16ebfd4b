/* conn_guard.h - a deadline for slow clients: a connection must deliver a whole request (headers
 * and body) within a set time of connecting or of its previous answer, or it is shut down. One
 * sweeper thread; libmicrohttpd's own timeout is an idle timeout that every trickled byte resets,
 * so a slowloris client could otherwise hold a connection slot for ever. No HTTP parsing here:
 * http.c reports each connection's events by its socket. */
#ifndef HY_CONN_GUARD_H
#define HY_CONN_GUARD_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct {
    int fd;
    double since; /* waiting for a whole request since (hy_now), or 0: a request is being answered */
} srv_guard_slot;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    srv_guard_slot *slot;
    int n, cap;
    double deadline;        /* seconds; <= 0: off */
    bool stop, started;
    pthread_t th;
    atomic_ullong timed_out; /* connections shut down for missing the deadline */
} srv_guard;

/* Start the sweeper (deadline <= 0: nothing is ever shut down, no thread). HY_ENOMEM / HY_EIO. */
int srv_guard_start(srv_guard *g, double deadline);
/* Stop the sweeper and free the table (after the HTTP daemon stopped). */
void srv_guard_stop(srv_guard *g);
/* Events of the connection on socket fd: it opened (the clock starts), its request is complete
 * (the clock stops while it is answered), its answer ended (the clock starts again: keep-alive),
 * it closed (forgotten; called before the socket is closed, so fd is never shut down after reuse). */
void srv_guard_open(srv_guard *g, int fd);
void srv_guard_received(srv_guard *g, int fd);
void srv_guard_answered(srv_guard *g, int fd);
void srv_guard_close(srv_guard *g, int fd);

#endif
