/* test_bench.c - unit tests of hydrad-bench's statistics (bench/bench_stats.c, compiled in here
 * because bench objects are not in libhydrad.a): percentiles, goodput, seeded Poisson/gamma
 * arrivals (mean rate and dispersion within tolerance) and Zipf adapter choice. No timing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_stats.c"

static void test_percentiles(void **st)
{
    (void)st;
    /* 1..10 shuffled; numpy.percentile([1..10], [50, 90, 99]) = 5.5, 9.1, 9.91 */
    double v[10] = {7, 3, 10, 1, 9, 2, 8, 5, 4, 6};
    double keep[10];
    memcpy(keep, v, sizeof(v));
    bench_summary s;
    assert_int_equal(bench_summarize(v, 10, &s), 0);
    assert_memory_equal(v, keep, sizeof(v)); /* input untouched */
    assert_int_equal(s.n, 10);
    assert_true(fabs(s.mean - 5.5) < 1e-12);
    assert_true(fabs(s.p50 - 5.5) < 1e-12);
    assert_true(fabs(s.p90 - 9.1) < 1e-12);
    assert_true(fabs(s.p99 - 9.91) < 1e-12);
    assert_true(fabs(s.std - sqrt(8.25)) < 1e-12);
    assert_true(s.min == 1 && s.max == 10);

    double one = 42;
    assert_int_equal(bench_summarize(&one, 1, &s), 0);
    assert_true(s.p50 == 42 && s.p99 == 42 && s.std == 0);
    assert_int_equal(bench_summarize(NULL, 0, &s), 0);
    assert_true(s.n == 0 && s.mean == 0 && s.p99 == 0);

    double sorted[4] = {0, 10, 20, 30};
    assert_true(fabs(bench_percentile_sorted(sorted, 4, 0) - 0) < 1e-12);
    assert_true(fabs(bench_percentile_sorted(sorted, 4, 100) - 30) < 1e-12);
    assert_true(fabs(bench_percentile_sorted(sorted, 4, 25) - 7.5) < 1e-12);
}

static void test_goodput(void **st)
{
    (void)st;
    double ttft[5] = {100, 300, 50, 1000, 200};
    double tpot[5] = {10, 10, 60, 5, 20};
    double e2el[5] = {1000, 2000, 3000, 4000, 5000};
    bench_slo slo = {0};
    assert_int_equal(bench_goodput_count(ttft, tpot, e2el, 5, &slo), 5); /* no SLO: all good */
    assert_int_equal(bench_slo_parse("ttft:250 tpot:30", &slo), 0);
    assert_true(slo.ttft_ms == 250 && slo.tpot_ms == 30 && slo.e2el_ms == 0);
    assert_int_equal(bench_goodput_count(ttft, tpot, e2el, 5, &slo), 2); /* requests 0 and 4 */
    assert_int_equal(bench_slo_parse("e2el:1500", &slo), 0);
    assert_int_equal(bench_goodput_count(ttft, tpot, e2el, 5, &slo), 1);
    bench_slo z = {0};
    assert_int_equal(bench_slo_parse("ttft:100,tpot:10", &z), 0);
    assert_true(z.ttft_ms == 100 && z.tpot_ms == 10);
    assert_int_equal(bench_slo_parse("latency:5", &z), HY_EINVAL);
    assert_int_equal(bench_slo_parse("ttft:abc", &z), HY_EINVAL);
    assert_int_equal(bench_slo_parse("ttft:-1", &z), HY_EINVAL);
    assert_int_equal(bench_slo_parse("ttft", &z), HY_EINVAL);
}

/* mean gap, squared coefficient of variation of the gaps, and the index of dispersion
 * (variance / mean) of arrival counts in 1-second windows */
static void arrival_stats(double rate, double burst, int n, double *mean, double *cv2, double *disp)
{
    bench_rng r;
    bench_rng_seed(&r, 1234);
    double *g = malloc((size_t)n * sizeof(double));
    assert_non_null(g);
    double sum = 0, t = 0;
    for (int i = 0; i < n; i++) {
        g[i] = bench_arrival_gap(&r, rate, burst);
        assert_true(g[i] >= 0);
        sum += g[i];
    }
    *mean = sum / n;
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (g[i] - *mean) * (g[i] - *mean);
    *cv2 = ss / n / (*mean * *mean);
    int windows = (int)(sum) + 1;
    int *cnt = calloc((size_t)windows, sizeof(int));
    assert_non_null(cnt);
    for (int i = 0; i < n; i++) {
        t += g[i];
        int w = (int)t;
        if (w < windows)
            cnt[w]++;
    }
    int full = windows - 1; /* the last window is cut short */
    double cm = 0, cv = 0;
    for (int w = 0; w < full; w++)
        cm += cnt[w];
    cm /= full;
    for (int w = 0; w < full; w++)
        cv += (cnt[w] - cm) * (cnt[w] - cm);
    cv /= full;
    *disp = cv / cm;
    free(cnt);
    free(g);
}

static void test_poisson_arrivals(void **st)
{
    (void)st;
    double mean, cv2, disp;
    arrival_stats(4.0, 1.0, 80000, &mean, &cv2, &disp);
    assert_true(fabs(mean - 0.25) / 0.25 < 0.02); /* rate 4/s */
    assert_true(fabs(cv2 - 1.0) < 0.05);           /* exponential gaps */
    assert_true(fabs(disp - 1.0) < 0.1);           /* Poisson counts: variance = mean */

    /* burstiness 0.25: same mean rate, gaps with CV^2 = 4, clumped counts */
    arrival_stats(4.0, 0.25, 80000, &mean, &cv2, &disp);
    assert_true(fabs(mean - 0.25) / 0.25 < 0.03);
    assert_true(fabs(cv2 - 4.0) / 4.0 < 0.1);
    assert_true(disp > 2.5);

    /* burstiness 4: more regular than Poisson */
    arrival_stats(4.0, 4.0, 80000, &mean, &cv2, &disp);
    assert_true(fabs(mean - 0.25) / 0.25 < 0.02);
    assert_true(fabs(cv2 - 0.25) / 0.25 < 0.05);
    assert_true(disp < 0.5);

    bench_rng r;
    bench_rng_seed(&r, 1);
    assert_true(bench_arrival_gap(&r, INFINITY, 1.0) == 0.0);
    assert_true(bench_arrival_gap(&r, 0.0, 1.0) == 0.0);
}

static void test_rng(void **st)
{
    (void)st;
    bench_rng a, b, c;
    bench_rng_seed(&a, 7);
    bench_rng_seed(&b, 7);
    bench_rng_seed(&c, 8);
    int same_c = 0;
    for (int i = 0; i < 100; i++) {
        uint64_t x = bench_rng_next(&a), y = bench_rng_next(&b), z = bench_rng_next(&c);
        assert_true(x == y);
        same_c += x == z;
    }
    assert_true(same_c < 2);

    const double shapes[3] = {0.5, 1.0, 3.0};
    for (int s = 0; s < 3; s++) {
        double sum = 0;
        const int n = 60000;
        for (int i = 0; i < n; i++)
            sum += bench_rng_gamma(&a, shapes[s]);
        assert_true(fabs(sum / n - shapes[s]) / shapes[s] < 0.03); /* E[Gamma(k, 1)] = k */
    }
    int lo_seen = 0, hi_seen = 0;
    for (int i = 0; i < 1000; i++) {
        int v = bench_rng_int(&a, 3, 6);
        assert_true(v >= 3 && v <= 6);
        lo_seen |= v == 3;
        hi_seen |= v == 6;
    }
    assert_true(lo_seen && hi_seen);
}

static void test_zipf(void **st)
{
    (void)st;
    bench_rng r;
    bench_rng_seed(&r, 99);
    bench_zipf z;
    assert_int_equal(bench_zipf_init(&z, 10, 1.0), 0);
    int cnt[10] = {0};
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        int k = bench_zipf_draw(&z, &r);
        assert_true(k >= 0 && k < 10);
        cnt[k]++;
    }
    /* P(k) = (1/(k+1)) / H_10, H_10 = 2.928968... */
    double h10 = 0;
    for (int k = 1; k <= 10; k++)
        h10 += 1.0 / k;
    for (int k = 0; k < 10; k++) {
        double p = 1.0 / (k + 1) / h10;
        assert_true(fabs((double)cnt[k] / n - p) < 0.01);
    }
    assert_true(fabs((double)cnt[0] / cnt[1] - 2.0) < 0.1);
    bench_zipf_free(&z);

    assert_int_equal(bench_zipf_init(&z, 4, 0.0), 0); /* alpha 0: uniform */
    int u[4] = {0};
    for (int i = 0; i < 40000; i++)
        u[bench_zipf_draw(&z, &r)]++;
    for (int k = 0; k < 4; k++)
        assert_true(abs(u[k] - 10000) < 500);
    bench_zipf_free(&z);
    bench_zipf_free(&z); /* idempotent */
    assert_int_equal(bench_zipf_init(&z, 0, 1.0), HY_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_percentiles),      cmocka_unit_test(test_goodput),
        cmocka_unit_test(test_poisson_arrivals), cmocka_unit_test(test_rng),
        cmocka_unit_test(test_zipf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
