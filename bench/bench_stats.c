/* bench_stats.c - statistics and seeded random draws for hydrad-bench (see bench_stats.h).
 * Nothing here reads a clock or does I/O: the load generator feeds it, the unit test checks it. */
#include "bench/bench_stats.h"
#include "engine/hy.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_percentile_sorted(const double *sorted, size_t n, double p)
{
    if (n == 0)
        return 0.0;
    if (p <= 0)
        return sorted[0];
    if (p >= 100)
        return sorted[n - 1];
    double pos = p / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double frac = pos - (double)lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}

int bench_summarize(const double *v, size_t n, bench_summary *out)
{
    memset(out, 0, sizeof(*out));
    if (n == 0)
        return 0;
    size_t bytes;
    if (hy_mul_size(n, sizeof(double), &bytes))
        return hy_err_set(HY_ELIMIT, "summary of %zu values is too large", n);
    double *s = malloc(bytes);
    if (!s)
        return hy_err_set(HY_ENOMEM, "out of memory sorting %zu values", n);
    memcpy(s, v, bytes);
    qsort(s, n, sizeof(double), cmp_double);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += s[i];
    double mean = sum / (double)n, ss = 0.0;
    for (size_t i = 0; i < n; i++)
        ss += (s[i] - mean) * (s[i] - mean);
    out->n = n;
    out->mean = mean;
    out->std = sqrt(ss / (double)n); /* population std, as numpy.std (vLLM's std_*_ms) */
    out->min = s[0];
    out->max = s[n - 1];
    out->p50 = bench_percentile_sorted(s, n, 50);
    out->p90 = bench_percentile_sorted(s, n, 90);
    out->p99 = bench_percentile_sorted(s, n, 99);
    free(s);
    return 0;
}

int bench_slo_parse(const char *s, bench_slo *slo)
{
    const char *p = s;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        if (!*p)
            break;
        const char *colon = strchr(p, ':');
        if (!colon)
            return hy_err_set(HY_EINVAL, "goodput: expected KEY:MS, got '%s'", p);
        size_t klen = (size_t)(colon - p);
        char *end;
        double v = strtod(colon + 1, &end);
        if (end == colon + 1 || !isfinite(v) || v <= 0 || (*end && *end != ' ' && *end != ','))
            return hy_err_set(HY_EINVAL, "goodput: bad milliseconds after '%.*s:'", (int)klen, p);
        if (klen == 4 && !strncmp(p, "ttft", 4))
            slo->ttft_ms = v;
        else if (klen == 4 && !strncmp(p, "tpot", 4))
            slo->tpot_ms = v;
        else if (klen == 4 && !strncmp(p, "e2el", 4))
            slo->e2el_ms = v;
        else
            return hy_err_set(HY_EINVAL, "goodput: unknown key '%.*s' (ttft, tpot, e2el)", (int)klen, p);
        p = end;
    }
    return 0;
}

size_t bench_goodput_count(const double *ttft_ms, const double *tpot_ms, const double *e2el_ms, size_t n,
                           const bench_slo *slo)
{
    size_t good = 0;
    for (size_t i = 0; i < n; i++) {
        if (slo->ttft_ms > 0 && ttft_ms[i] > slo->ttft_ms)
            continue;
        if (slo->tpot_ms > 0 && tpot_ms[i] > slo->tpot_ms)
            continue;
        if (slo->e2el_ms > 0 && e2el_ms[i] > slo->e2el_ms)
            continue;
        good++;
    }
    return good;
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void bench_rng_seed(bench_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t bench_rng_next(bench_rng *r)
{
    uint64_t *s = r->s;
    uint64_t res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return res;
}

double bench_rng_uniform(bench_rng *r)
{
    /* 53 random bits, shifted off zero so log() is always finite */
    return ((double)(bench_rng_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

double bench_rng_normal(bench_rng *r)
{
    double u = bench_rng_uniform(r), v = bench_rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}

/* Marsaglia and Tsang (2000); shape < 1 by the boost Gamma(a) = Gamma(a + 1) U^(1/a). */
double bench_rng_gamma(bench_rng *r, double shape)
{
    if (shape < 1.0)
        return bench_rng_gamma(r, shape + 1.0) * pow(bench_rng_uniform(r), 1.0 / shape);
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = bench_rng_normal(r), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = bench_rng_uniform(r);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v))
            return d * v;
    }
}

int bench_rng_int(bench_rng *r, int lo, int hi)
{
    if (hi <= lo)
        return lo;
    uint64_t span = (uint64_t)((int64_t)hi - lo + 1);
    return lo + (int)(bench_rng_next(r) % span);
}

double bench_arrival_gap(bench_rng *r, double rate, double burstiness)
{
    if (!(rate > 0) || isinf(rate))
        return 0.0;
    if (!(burstiness > 0))
        burstiness = 1.0;
    return bench_rng_gamma(r, burstiness) / (rate * burstiness);
}

int bench_zipf_init(bench_zipf *z, int n, double alpha)
{
    z->cdf = NULL;
    z->n = 0;
    if (n < 1 || !(alpha >= 0))
        return hy_err_set(HY_EINVAL, "zipf: need n >= 1 and alpha >= 0 (n %d, alpha %g)", n, alpha);
    z->cdf = malloc((size_t)n * sizeof(double));
    if (!z->cdf)
        return hy_err_set(HY_ENOMEM, "zipf: out of memory for %d ranks", n);
    double acc = 0.0;
    for (int k = 0; k < n; k++) {
        acc += pow((double)k + 1.0, -alpha);
        z->cdf[k] = acc;
    }
    for (int k = 0; k < n; k++)
        z->cdf[k] /= acc;
    z->cdf[n - 1] = 1.0;
    z->n = n;
    return 0;
}

int bench_zipf_draw(const bench_zipf *z, bench_rng *r)
{
    double u = bench_rng_uniform(r);
    int lo = 0, hi = z->n - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (z->cdf[mid] < u)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

void bench_zipf_free(bench_zipf *z)
{
    if (!z)
        return;
    free(z->cdf);
    z->cdf = NULL;
    z->n = 0;
}
