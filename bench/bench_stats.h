/* bench_stats.h - the statistics and random draws behind hydrad-bench: percentiles and summaries,
 * goodput against SLOs, Poisson/gamma arrival gaps (vLLM benchmark_serving's burstiness), Zipf
 * adapter choice. Pure and seeded: no I/O, no clock, so tests/test_bench.c checks it exactly. */
#ifndef HY_BENCH_STATS_H
#define HY_BENCH_STATS_H

#include <stddef.h>
#include <stdint.h>

/* Summary of a sample; all fields 0 when n == 0. Percentiles interpolate linearly between
 * order statistics (numpy's default "linear" method). */
typedef struct {
    size_t n;
    double mean, std, min, max, p50, p90, p99;
} bench_summary;

/* p in [0, 100] of an ascending array of n > 0 values. */
double bench_percentile_sorted(const double *sorted, size_t n, double p);
/* Sort a copy of v[n] and summarise it. HY_ENOMEM when the copy fails; n == 0 gives zeros. */
int bench_summarize(const double *v, size_t n, bench_summary *out);

/* Service-level objectives for goodput; a limit <= 0 is not checked. */
typedef struct {
    double ttft_ms, tpot_ms, e2el_ms;
} bench_slo;

/* Parse "ttft:MS tpot:MS e2el:MS" (any subset, space or comma separated) into *slo (unset keys
 * left as they are). HY_EINVAL with a message on an unknown key or a bad number. */
int bench_slo_parse(const char *s, bench_slo *slo);
/* Requests meeting every SLO: ttft_ms[i], tpot_ms[i], e2el_ms[i] of n finished requests. */
size_t bench_goodput_count(const double *ttft_ms, const double *tpot_ms, const double *e2el_ms, size_t n,
                           const bench_slo *slo);

/* xoshiro256** seeded through splitmix64: the same seed gives the same stream everywhere. */
typedef struct {
    uint64_t s[4];
} bench_rng;

void bench_rng_seed(bench_rng *r, uint64_t seed);
uint64_t bench_rng_next(bench_rng *r);
double bench_rng_uniform(bench_rng *r);            /* in (0, 1) */
double bench_rng_normal(bench_rng *r);             /* N(0, 1) */
double bench_rng_gamma(bench_rng *r, double shape); /* Gamma(shape, 1), shape > 0 */
int bench_rng_int(bench_rng *r, int lo, int hi);   /* uniform in [lo, hi] */

/* Gap before the next arrival for `rate` requests/s: Gamma(shape = burstiness, scale =
 * 1 / (rate * burstiness)), so the mean gap is 1/rate for any burstiness; burstiness 1 is a
 * Poisson process, < 1 burstier, > 1 more regular. rate <= 0 or infinite -> 0 (all at once). */
double bench_arrival_gap(bench_rng *r, double rate, double burstiness);

/* Zipf over ranks 0..n-1 with P(k) proportional to 1 / (k + 1)^alpha (alpha 0 = uniform). */
typedef struct {
    double *cdf; /* [n], owned: bench_zipf_free */
    int n;
} bench_zipf;

int bench_zipf_init(bench_zipf *z, int n, double alpha);
int bench_zipf_draw(const bench_zipf *z, bench_rng *r);
void bench_zipf_free(bench_zipf *z);

#endif
