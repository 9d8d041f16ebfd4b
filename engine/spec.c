/* spec.c - prompt-lookup (n-gram) drafting (see spec.h). No state, no allocation: a backward scan
 * of the sequence, O(n_toks * SPEC_MAX_NGRAM) per call, small beside a forward step. */
#include "engine/spec.h"

#include "engine/hy.h"

#include <string.h>

/* Latest start i < n_toks - n of toks[n_toks-n .. n_toks) earlier in toks, or -1. */
static int latest_match(const int32_t *toks, int n_toks, int n)
{
    const int32_t *suf = toks + n_toks - n;
    for (int i = n_toks - n - 1; i >= 0; i--)
        if (toks[i] == suf[0] && memcmp(toks + i, suf, (size_t)n * sizeof *toks) == 0)
            return i;
    return -1;
}

int spec_ngram_draft(const int32_t *toks, int n_toks, int k, int32_t *out)
{
    if (k <= 0)
        return 0;
    for (int n = HY_MIN(SPEC_MAX_NGRAM, n_toks - 1); n >= 1; n--) {
        int i = latest_match(toks, n_toks, n);
        if (i < 0)
            continue;
        int from = i + n, m = HY_MIN(k, n_toks - from); /* what followed, up to the end */
        memcpy(out, toks + from, (size_t)m * sizeof *toks);
        return m;
    }
    return 0;
}

int spec_next_k(int k, int drafted, int accepted, int max)
{
    int next = accepted == drafted ? k + 1 : accepted + 1;
    return HY_MAX(1, HY_MIN(next, max));
}
