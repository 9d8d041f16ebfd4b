/* testutil.h - helpers shared by the C tests: a growable byte buffer for building GGUF (and other
 * little-endian binary) files by hand, independently of hydrad's own writer, and the normalised
 * mean squared error the numeric tests bound. Header-only, to be included after <cmocka.h>; not a
 * test itself (the Makefile builds tests/test_*.c). */
#ifndef HY_TESTUTIL_H
#define HY_TESTUTIL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* sum (a - ref)^2 / sum ref^2 in double; 0 when both are all zero, infinity for any error
 * against an all-zero reference (and NaN stays NaN, which fails every bound) */
static inline double tu_nmse(const float *a, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den == 0 ? (num == 0 ? 0 : INFINITY) : num / den;
}

typedef struct {
    unsigned char *p; /* malloc'ed; the test frees it (or hands it to whoever does) */
    size_t n, cap;
    uint64_t n_kv;    /* key/values written so far, for builders that patch the GGUF header */
} tu_buf;

/* Index of the largest of x[0..n) (the first one on ties): greedy decoding in tests. */
static inline int tu_argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

static inline void tu_put(tu_buf *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static inline void tu_put_u32(tu_buf *b, uint32_t v) { tu_put(b, &v, 4); }
static inline void tu_put_u64(tu_buf *b, uint64_t v) { tu_put(b, &v, 8); }
/* A GGUF string: u64 length, then the bytes (no NUL). */
static inline void tu_put_str(tu_buf *b, const char *s)
{
    tu_put_u64(b, strlen(s));
    tu_put(b, s, strlen(s));
}
/* Zero bytes up to the next multiple of align. */
static inline void tu_pad_to(tu_buf *b, size_t align)
{
    while (b->n % align)
        tu_put(b, "", 1);
}

#endif
