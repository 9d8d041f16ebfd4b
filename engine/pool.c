/* pool.c - fork/join thread pool: workers spin briefly, then sleep on a condition variable.
 * Knows nothing of models; the job decides what each worker does. */
#include "pool.h"
#include "hy.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

struct tp_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    tp_fn fn;
    void *ctx;
    atomic_int generation; /* bumped for each job */
    atomic_int pending;    /* workers (excluding caller) still running the job */
    int stop;
};

typedef struct {
    tp_pool *p;
    int ith;
} tp_arg;

static void *tp_worker(void *arg)
{
    tp_arg a = *(tp_arg *)arg;
    free(arg);
    tp_pool *p = a.p;
    int seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&p->generation, memory_order_acquire) == seen && spins < 20000) {
            spins++;
        }
        if (atomic_load_explicit(&p->generation, memory_order_acquire) == seen) {
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->generation) == seen && !p->stop)
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (p->stop)
            return NULL;
        seen = atomic_load(&p->generation);
        p->fn(p->ctx, a.ith, p->n);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
    }
}

int tp_create(int n_threads, tp_pool **out)
{
    *out = NULL;
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    tp_pool *p = calloc(1, sizeof *p);
    if (!p)
        return hy_err_set(HY_ENOMEM, "out of memory creating thread pool");
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    if (!p->threads)
        goto fail;
    for (int i = 1; i < n_threads; i++) {
        tp_arg *a = malloc(sizeof *a);
        if (!a)
            goto fail;
        a->p = p;
        a->ith = i;
        if (pthread_create(&p->threads[i], NULL, tp_worker, a) != 0) {
            free(a);
            p->n = i; /* only these exist */
            goto fail;
        }
    }
    *out = p;
    return HY_OK;
fail:
    tp_free(p);
    return hy_err_set(HY_ENOMEM, "cannot start %d worker threads", n_threads);
}

void tp_free(tp_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++)
        if (p->threads && p->threads[i])
            pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

int tp_threads(const tp_pool *p) { return p ? p->n : 1; }

void tp_run(tp_pool *p, tp_fn fn, void *ctx)
{
    if (!p || p->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store(&p->pending, p->n - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n);
    /* spin briefly (workers usually finish together), then yield so an oversubscribed
     * machine can run the worker we are waiting for */
    for (int spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++)
        if (spins > 2000)
            sched_yield();
}

void tp_split(long n, int ith, int nth, long *begin, long *end)
{
    long per = n / nth, rem = n % nth;
    *begin = ith * per + (ith < rem ? ith : rem);
    *end = *begin + per + (ith < rem ? 1 : 0);
}
