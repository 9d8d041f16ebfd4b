/* sampler.c - per-sequence sampling (penalties, temperature, top-k/top-p/min-p, xoshiro256**
 * seeded per sequence, logprobs) and stop-condition helpers. No model math, no tokenizing;
 * one sequence's sampler is used by one thread at a time. */
#include "sampler.h"
#include "hy.h"
#include "quant.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Tokens whose probability is below e^-SMP_PRUNE of the most likely token's are never
 * sampled (their total mass is < n_vocab * e^-20, i.e. < 1e-4 for a 49k vocabulary); this
 * keeps the sort to the plausible candidates. */
#define SMP_PRUNE 20.0f

typedef struct {
    int32_t id;   /* -1: empty */
    uint32_t gen; /* times generated */
    bool prompt;  /* appears in the prompt */
} smp_slot;

struct smp_seq {
    smp_params p;
    int n_vocab;
    uint64_t rng[4];
    smp_slot *map; /* open addressing, power-of-two capacity */
    size_t map_cap, map_used;
};

typedef struct {
    float l;
    int32_t id;
} smp_cand;

/* Per-thread candidate scratch, grown to the largest vocabulary seen (freed by
 * smp_thread_cleanup, or at exit). */
static _Thread_local smp_cand *smp_scratch;
static _Thread_local size_t smp_scratch_cap;

void smp_thread_cleanup(void)
{
    free(smp_scratch);
    smp_scratch = NULL;
    smp_scratch_cap = 0;
}

/* ------------------------------------------------------------------ RNG (xoshiro256**) */

static uint64_t smp_splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t smp_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t smp_next(uint64_t s[4])
{
    uint64_t r = smp_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = smp_rotl(s[3], 45);
    return r;
}

/* uniform in [0, 1) */
static double smp_uniform(uint64_t s[4]) { return (double)(smp_next(s) >> 11) * 0x1.0p-53; }

/* ------------------------------------------------------------------ parameters */

smp_params smp_default_params(void)
{
    smp_params p = {0};
    p.top_p = 1.0f;
    p.repetition_penalty = 1.0f;
    return p;
}

int smp_create(const smp_params *p, int n_vocab, smp_seq **out)
{
    *out = NULL;
    if (n_vocab <= 0)
        return hy_err_set(HY_EINVAL, "sampler: empty vocabulary");
    if (!(p->temperature >= 0) || !isfinite(p->temperature))
        return hy_err_set(HY_EINVAL, "temperature must be >= 0");
    if (!(p->top_p >= 0) || p->top_p > 1)
        return hy_err_set(HY_EINVAL, "top_p must be in (0, 1]");
    if (!(p->min_p >= 0) || p->min_p > 1)
        return hy_err_set(HY_EINVAL, "min_p must be in [0, 1]");
    if (!(p->repetition_penalty >= 0) || !isfinite(p->repetition_penalty))
        return hy_err_set(HY_EINVAL, "repetition_penalty must be > 0");
    if (!isfinite(p->frequency_penalty) || !isfinite(p->presence_penalty))
        return hy_err_set(HY_EINVAL, "penalties must be finite numbers");
    if (p->n_logprobs < 0 || p->n_logprobs > SMP_MAX_LOGPROBS)
        return hy_err_set(HY_EINVAL, "top logprobs must be between 0 and %d", SMP_MAX_LOGPROBS);
    smp_seq *s = calloc(1, sizeof *s);
    if (!s)
        return hy_err_set(HY_ENOMEM, "out of memory");
    s->p = *p;
    s->n_vocab = n_vocab;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = smp_splitmix(&x);
    *out = s;
    return HY_OK;
}

void smp_free(smp_seq *s)
{
    if (!s)
        return;
    free(s->map);
    free(s);
}

const smp_params *smp_get_params(const smp_seq *s) { return &s->p; }

/* ------------------------------------------------------------------ token counts */

static bool smp_penalised(const smp_params *p)
{
    return (p->repetition_penalty > 0 && p->repetition_penalty != 1.0f) ||
           p->frequency_penalty != 0 || p->presence_penalty != 0;
}

static size_t smp_hash(int32_t id, size_t cap) { return ((uint32_t)id * 2654435761u) & (cap - 1); }

static smp_slot *smp_find(smp_slot *map, size_t cap, int32_t id)
{
    size_t i = smp_hash(id, cap);
    while (map[i].id != -1 && map[i].id != id)
        i = (i + 1) & (cap - 1);
    return &map[i];
}

static int smp_grow(smp_seq *s)
{
    size_t cap = s->map_cap ? s->map_cap * 2 : 64;
    smp_slot *m = malloc(cap * sizeof *m);
    if (!m)
        return hy_err_set(HY_ENOMEM, "out of memory");
    for (size_t i = 0; i < cap; i++)
        m[i].id = -1;
    for (size_t i = 0; i < s->map_cap; i++)
        if (s->map[i].id != -1)
            *smp_find(m, cap, s->map[i].id) = s->map[i];
    free(s->map);
    s->map = m;
    s->map_cap = cap;
    return HY_OK;
}

static int smp_note(smp_seq *s, int32_t id, bool prompt)
{
    if (id < 0 || id >= s->n_vocab)
        return hy_err_set(HY_EINVAL, "token id %d is outside the vocabulary", (int)id);
    if (!smp_penalised(&s->p))
        return HY_OK; /* nothing to remember */
    if ((s->map_used + 1) * 2 > s->map_cap) {
        int rc = smp_grow(s);
        if (rc)
            return rc;
    }
    smp_slot *e = smp_find(s->map, s->map_cap, id);
    if (e->id == -1) {
        e->id = id;
        e->gen = 0;
        e->prompt = false;
        s->map_used++;
    }
    if (prompt)
        e->prompt = true;
    else
        e->gen++;
    return HY_OK;
}

int smp_accept_prompt(smp_seq *s, const int32_t *ids, int n)
{
    for (int i = 0; i < n; i++) {
        int rc = smp_note(s, ids[i], true);
        if (rc)
            return rc;
    }
    return HY_OK;
}

int smp_accept(smp_seq *s, int32_t id) { return smp_note(s, id, false); }

static void smp_apply_penalties(const smp_seq *s, float *logits)
{
    const smp_params *p = &s->p;
    float rep = p->repetition_penalty > 0 ? p->repetition_penalty : 1.0f;
    for (size_t i = 0; i < s->map_cap; i++) {
        const smp_slot *e = &s->map[i];
        if (e->id == -1)
            continue;
        float *l = &logits[e->id];
        if (rep != 1.0f)
            *l = *l > 0 ? *l / rep : *l * rep;
        if (e->gen > 0)
            *l -= (float)e->gen * p->frequency_penalty + p->presence_penalty;
    }
}

/* ------------------------------------------------------------------ sampling */

#define SMP_ARGMAX_CHUNK 64

/* Maximum of x[0..SMP_ARGMAX_CHUNK), NaNs ignored (-inf if nothing else); eight independent
 * lanes so the compiler turns it into vector max instructions. */
static float smp_chunk_max(const float *x)
{
    float m[8];
    for (int l = 0; l < 8; l++)
        m[l] = -INFINITY;
    for (int k = 0; k < SMP_ARGMAX_CHUNK; k += 8)
        for (int l = 0; l < 8; l++)
            m[l] = x[k + l] > m[l] ? x[k + l] : m[l];
    for (int l = 1; l < 8; l++)
        m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

/* Index of the largest logit, the lowest such index on ties, NaNs ignored; -1 when no logit
 * is above -inf (all NaN or -inf). One pass: a chunk is scanned for its index only when its
 * maximum beats the best so far, which happens a handful of times per vocabulary (comparing
 * against x[best] element by element was a load-compare-cmov chain per token). */
static int smp_argmax(const float *x, int n)
{
    int best = -1, i = 0;
    float bv = -INFINITY;
    for (; i + SMP_ARGMAX_CHUNK <= n; i += SMP_ARGMAX_CHUNK) {
        float cm = smp_chunk_max(x + i);
        if (!(cm > bv))
            continue;
        int j = i;
        while (x[j] != cm)
            j++;
        best = j;
        bv = cm;
    }
    for (; i < n; i++)
        if (x[i] > bv) {
            bv = x[i];
            best = i;
        }
    return best;
}

/* The normaliser of the log-softmax. NaN counts as -inf. When some logits are +inf those
 * n_inf tokens share all the mass (logprob -log(n_inf)) and every other token has none. */
typedef struct {
    float mx;       /* the largest logit */
    double log_sum; /* log sum exp(l - mx) over the finite logits (when n_inf == 0) */
    float lo;       /* a token has probability > 0 iff its logit >= lo */
    int n_inf;      /* how many logits are +inf */
} smp_norm;

static void smp_normaliser(const float *l, int n_vocab, float mx, smp_norm *z)
{
    z->n_inf = 0;
    z->mx = mx;
    z->log_sum = 0;
    if (mx == INFINITY) {
        z->lo = INFINITY;
        for (int i = 0; i < n_vocab; i++)
            z->n_inf += l[i] == INFINITY;
        return;
    }
    z->lo = -FLT_MAX;
    double sum = q_sum_exp(l, n_vocab, mx);
    z->log_sum = log(sum);
}

/* The logprob of a token with logit x; finite (clamped to -FLT_MAX) when x >= z->lo. */
static float smp_logprob(const smp_norm *z, float x)
{
    if (!(x >= z->lo))
        return -INFINITY;
    if (z->n_inf)
        return (float)-log((double)z->n_inf);
    double d = ((double)x - z->mx) - z->log_sum; /* not x - (mx + log_sum): mx may be ~1e38 */
    return d < -FLT_MAX ? -FLT_MAX : (float)d;
}

/* The n most likely tokens (most likely first, ties by lower id) with their logprobs; only
 * tokens with probability > 0 are listed, so res->n_top may be less than n. */
static void smp_top(const float *l, int n_vocab, int n_top, const smp_norm *z, smp_result *res)
{
    int k = 0;
    for (int i = 0; i < n_vocab && n_top > 0; i++) {
        if (!(l[i] >= z->lo))
            continue;
        if (k == n_top && l[i] <= l[res->top_id[k - 1]])
            continue;
        int j = k < n_top ? k++ : k - 1;
        while (j > 0 && l[res->top_id[j - 1]] < l[i]) {
            res->top_id[j] = res->top_id[j - 1];
            j--;
        }
        res->top_id[j] = i;
    }
    res->n_top = k;
    for (int j = 0; j < k; j++)
        res->top_logprob[j] = smp_logprob(z, l[res->top_id[j]]);
}

static int smp_cmp_desc(const void *a, const void *b)
{
    const smp_cand *x = a, *y = b;
    if (x->l != y->l)
        return x->l < y->l ? 1 : -1;
    return x->id < y->id ? -1 : x->id > y->id; /* ties: lower id first, deterministic */
}

/* One draw from c[0..n) by weight (c[i].l), sum their total. */
static int32_t smp_pick(smp_seq *s, const smp_cand *c, int n, double sum)
{
    double u = smp_uniform(s->rng) * sum, acc = 0;
    int last = 0;
    for (int i = 0; i < n; i++) {
        if (c[i].l <= 0)
            continue; /* underflowed (extreme spreads): never drawn, not even by rounding */
        acc += c[i].l;
        last = i;
        if (u < acc)
            return c[i].id;
    }
    return c[last].id; /* rounding at the very end of the walk */
}

/* Sort the candidates in descending order far enough to settle top-k and top-p: first those
 * within e^-4 of the best weight, then e^-8, ... (each a value cut, so ties are never split and
 * the prefix is exactly the head of the full sort), so a peaked distribution sorts a few
 * dozen candidates instead of the whole vocabulary. Returns how many are kept; c is then the
 * sorted kept set. total: the sum of all n weights. */
static int smp_truncate(const smp_params *p, smp_cand *c, int n, double total)
{
    /* the last level takes every candidate: weights are >= 0 */
    static const float level[] = {0x1p-6f, 0x1p-12f, 0x1p-18f, 0x1p-24f, 0.0f};
    int m = 0; /* c[0..m) holds the candidates of the levels so far */
    for (size_t li = 0; li < sizeof level / sizeof level[0]; li++) {
        for (int i = m; i < n; i++) /* partition the rest: weights >= level first */
            if (c[i].l >= level[li]) {
                smp_cand t = c[m];
                c[m++] = c[i];
                c[i] = t;
            }
        qsort(c, (size_t)m, sizeof *c, smp_cmp_desc);
        bool all = m == n;
        int keep;
        double mass;
        if (p->top_k > 0 && p->top_k <= m) {
            keep = p->top_k;
            mass = 0;
            for (int i = 0; i < keep; i++)
                mass += c[i].l;
        } else if (p->top_k > 0 && !all) {
            continue; /* the k-th candidate lies below this level */
        } else {
            keep = m;
            mass = total;
        }
        if (p->top_p > 0 && p->top_p < 1) {
            double cum = 0, want = p->top_p * mass;
            int i = 0;
            while (i < keep && cum < want)
                cum += c[i++].l;
            if (cum < want && !all && !(p->top_k > 0 && p->top_k <= m))
                continue; /* the top-p boundary lies below this level */
            keep = i > 0 ? i : 1;
        }
        return keep;
    }
    return n; /* not reached: the last level takes every candidate */
}

/* Temperature, then top-k, top-p and min-p on the renormalised survivors, then one draw.
 * mx is the largest logit (not NaN, above -inf). When it is +inf only the +inf tokens are
 * candidates, with equal weight; NaN and -inf logits are never candidates. Only top-k and
 * top-p need an order; without them the draw walks the candidates in id order. */
static int smp_draw(smp_seq *s, const float *l, float mx, int32_t *out)
{
    const smp_params *p = &s->p;
    int n_vocab = s->n_vocab;
    if ((size_t)n_vocab > smp_scratch_cap) {
        smp_cand *c = realloc(smp_scratch, (size_t)n_vocab * sizeof *c);
        if (!c)
            return hy_err_set(HY_ENOMEM, "out of memory");
        smp_scratch = c;
        smp_scratch_cap = (size_t)n_vocab;
    }
    smp_cand *c = smp_scratch;
    float t = p->temperature, cut = mx == INFINITY ? mx : mx - SMP_PRUNE * t;
    if (!(cut >= -FLT_MAX))
        cut = -FLT_MAX; /* a huge temperature: still no -inf */
    int n = 0;
    double total = 0;
    /* c[i].l becomes the unnormalised probability; the best token gets 1 */
    for (int i = 0; i < n_vocab; i++)
        if (l[i] >= cut) {
            float w = mx == INFINITY ? 1.0f : expf((l[i] - mx) / t);
            c[n++] = (smp_cand){w, i};
            total += w;
        }
    bool ordered = p->top_k > 0 || (p->top_p > 0 && p->top_p < 1);
    if (ordered)
        n = smp_truncate(p, c, n, total);
    if (p->min_p > 0) {
        /* relative to the best weight, 1 (ordered or not: a filter by value) */
        int keep = 0;
        for (int i = 0; i < n; i++)
            if (c[i].l >= p->min_p)
                c[keep++] = c[i];
        n = keep; /* >= 1: the best token has weight 1 and min_p <= 1 */
    }
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += c[i].l;
    *out = smp_pick(s, c, n, sum);
    return HY_OK;
}

int smp_sample(smp_seq *s, float *logits, smp_result *res)
{
    const smp_params *p = &s->p;
    memset(res, 0, sizeof *res);
    res->id = -1;
    if (smp_penalised(p) && s->map_used)
        smp_apply_penalties(s, logits);
    int best = smp_argmax(logits, s->n_vocab);
    if (best < 0)
        return hy_err_set(HY_EINVAL, "sampler: every logit is -inf or NaN, no token can be picked");
    float mx = logits[best];
    smp_norm z = {0};
    bool want_lp = p->logprobs || p->n_logprobs > 0;
    if (want_lp) {
        smp_normaliser(logits, s->n_vocab, mx, &z);
        smp_top(logits, s->n_vocab, p->n_logprobs, &z, res);
    }
    int32_t id = best;
    if (p->temperature != 0 && p->top_k != 1) {
        int rc = smp_draw(s, logits, mx, &id);
        if (rc)
            return rc;
    }
    res->id = id;
    if (want_lp)
        res->logprob = smp_logprob(&z, logits[id]);
    return HY_OK;
}

int smp_score(const float *logits, int n_vocab, int32_t id, int n_top, smp_result *res)
{
    res->id = -1;
    res->n_top = 0;
    if (id < 0 || id >= n_vocab || n_top < 0 || n_top > SMP_MAX_LOGPROBS)
        return hy_err_set(HY_EINVAL, "sampler: token %d or top %d out of range", id, n_top);
    int best = smp_argmax(logits, n_vocab);
    if (best < 0)
        return hy_err_set(HY_EINVAL, "sampler: every logit is -inf or NaN, nothing can be scored");
    smp_norm z;
    smp_normaliser(logits, n_vocab, logits[best], &z);
    smp_top(logits, n_vocab, n_top, &z, res);
    res->id = id;
    float lp = smp_logprob(&z, logits[id]);
    res->logprob = lp == -INFINITY ? -FLT_MAX : lp;
    return HY_OK;
}

/* ------------------------------------------------------------------ stop conditions */

long smp_stop_check(const char *text, size_t len, size_t from, const char *const *stops,
                    int n_stops, size_t *hold)
{
    long best = -1;
    size_t h = 0;
    for (int i = 0; i < n_stops; i++) {
        size_t sl = stops[i] ? strlen(stops[i]) : 0;
        if (sl == 0)
            continue;
        /* a match ending at or after `from` starts at from - sl + 1 at the earliest */
        size_t start = from >= sl ? from - sl + 1 : 0;
        if (start < len) {
            const char *hit = memmem(text + start, len - start, stops[i], sl);
            if (hit && (best < 0 || hit - text < best))
                best = hit - text;
        }
        for (size_t k = HY_MIN(sl - 1, len); k > h; k--) {
            if (!memcmp(text + len - k, stops[i], k)) {
                h = k;
                break;
            }
        }
    }
    *hold = best >= 0 ? 0 : h;
    return best;
}

smp_stop smp_stop_token(int32_t id, bool is_eog, bool ignore_eog, const int32_t *stop_ids,
                        int n_stop_ids, int n_generated, int max_tokens)
{
    if (is_eog && !ignore_eog)
        return SMP_STOP_EOG;
    for (int i = 0; i < n_stop_ids; i++)
        if (stop_ids[i] == id)
            return SMP_STOP_TOKEN;
    if (max_tokens > 0 && n_generated >= max_tokens)
        return SMP_STOP_LENGTH;
    return SMP_CONTINUE;
}
