/* pool.c - fork/join thread pool for the CPU backend. Workers spin (with pause, then with
 * sched_yield) for a few milliseconds after each job so that the ~250 jobs of one decode step
 * never pay a sleep/wake, then sleep on a condition variable. Knows nothing of models. */
#include "pool.h"
#include "hy.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TP_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define TP_PAUSE() __asm__ __volatile__("yield")
#else
#define TP_PAUSE() ((void)0)
#endif

/* Waiting, in three stages: pause-spin for TP_SPIN_PAUSE polls (tens of microseconds: the gap
 * between two ops of a step), then poll with sched_yield (a busy machine runs others) until
 * TP_SPIN_NS have passed since the last job (a decode step's sampling and bookkeeping), then
 * sleep. Waking a sleeping thread costs tens of microseconds on a VM (an IPI to a halted vCPU). */
#define TP_SPIN_PAUSE 4096
#define TP_SPIN_NS 5000000L
#define TP_CLOCK_EVERY 64 /* yield polls between clock reads */

#define TP_LINE 64

struct tp_pool {
    int n;
    pthread_t *threads;
    /* written by the caller before a job is published, read by workers after */
    tp_fn fn;
    void *ctx;
    _Alignas(TP_LINE) atomic_uint generation; /* bumped for each job (and for stop) */
    _Alignas(TP_LINE) atomic_int done;        /* workers (excluding the caller) done with the job */
    _Alignas(TP_LINE) atomic_int sleepers;    /* workers blocked (or about to block) on cv */
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

typedef struct {
    tp_pool *p;
    int ith;
} tp_arg;

static long tp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Wait until p->generation differs from seen; returns the new value. */
static unsigned tp_wait_job(tp_pool *p, unsigned seen)
{
    unsigned g;
    for (int i = 0; i < TP_SPIN_PAUSE; i++) {
        if ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) != seen)
            return g;
        TP_PAUSE();
    }
    long t0 = tp_now_ns();
    for (int i = 1;; i++) {
        if ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) != seen)
            return g;
        sched_yield();
        if (i % TP_CLOCK_EVERY == 0 && tp_now_ns() - t0 > TP_SPIN_NS)
            break;
    }
    pthread_mutex_lock(&p->mu);
    /* seq_cst pairs with tp_run's: either it sees us sleeping or we see its new generation */
    atomic_fetch_add(&p->sleepers, 1);
    while ((g = atomic_load(&p->generation)) == seen)
        pthread_cond_wait(&p->cv, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *tp_worker(void *arg)
{
    tp_arg a = *(tp_arg *)arg;
    free(arg);
    tp_pool *p = a.p;
    unsigned seen = 0;
    for (;;) {
        seen = tp_wait_job(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire))
            return NULL;
        p->fn(p->ctx, a.ith, p->n);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
}

int tp_create(int n_threads, tp_pool **out)
{
    *out = NULL;
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    tp_pool *p = aligned_alloc(TP_LINE, (sizeof *p + TP_LINE - 1) / TP_LINE * TP_LINE);
    if (!p)
        return hy_err_set(HY_ENOMEM, "out of memory creating thread pool");
    *p = (tp_pool){.n = n_threads};
    atomic_init(&p->generation, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->stop, 0);
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

/* Publish a new generation and wake any sleeping worker. */
static void tp_publish(tp_pool *p)
{
    atomic_fetch_add(&p->generation, 1); /* seq_cst: see tp_wait_job */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

void tp_free(tp_pool *p)
{
    if (!p)
        return;
    atomic_store(&p->stop, 1);
    tp_publish(p);
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
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    tp_publish(p); /* its seq_cst add orders fn/ctx/done before the new generation */
    fn(ctx, 0, p->n);
    /* Workers usually finish with us: pause-spin, then yield so that an oversubscribed
     * machine can run the worker we are waiting for. */
    const int want = p->n - 1;
    for (int spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) < want; spins++) {
        if (spins < TP_SPIN_PAUSE)
            TP_PAUSE();
        else
            sched_yield();
    }
}

void tp_split(long n, int ith, int nth, long *begin, long *end)
{
    long per = n / nth, rem = n % nth;
    *begin = ith * per + (ith < rem ? ith : rem);
    *end = *begin + per + (ith < rem ? 1 : 0);
}
