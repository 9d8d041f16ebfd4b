/* pool.h - a fixed thread pool that runs one data-parallel job at a time (fork/join).
 * The caller's thread takes part as worker 0. Not reentrant: one tp_run at a time per pool. */
#ifndef HY_POOL_H
#define HY_POOL_H

typedef struct tp_pool tp_pool;

/* Job body: worker `ith` of `nth` does its share of `ctx`. */
typedef void (*tp_fn)(void *ctx, int ith, int nth);

/* Create a pool of n_threads workers (n_threads <= 0: number of online cores).
 * Returns 0 and *out, owned by the caller, freed with tp_free. */
int tp_create(int n_threads, tp_pool **out);
void tp_free(tp_pool *p);
int tp_threads(const tp_pool *p);
/* Run fn on every worker and wait for all of them. p == NULL runs fn(ctx, 0, 1) inline. */
void tp_run(tp_pool *p, tp_fn fn, void *ctx);
/* Split [0, n) into nth near-equal ranges; range of worker ith. */
void tp_split(long n, int ith, int nth, long *begin, long *end);

#endif
