/* test_sampler.c - engine/sampler.c: greedy, the support sets of top-k / top-p / min-p,
 * sampling frequencies, seeded reproducibility, penalties, logprobs and the stop helpers.
 * Expected values are computed here from the definitions, never taken from the sampler. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "engine/hy.h"
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_DRAWS 20000

static smp_seq *mk(smp_params p, int n_vocab)
{
    smp_seq *s = NULL;
    assert_int_equal(smp_create(&p, n_vocab, &s), 0);
    return s;
}

/* Draw N_DRAWS tokens from fixed logits and count them. */
static void draw_counts(smp_params p, const float *logits, int n, int *counts)
{
    smp_seq *s = mk(p, n);
    float l[64];
    memset(counts, 0, sizeof(int) * (size_t)n);
    for (int i = 0; i < N_DRAWS; i++) {
        memcpy(l, logits, sizeof(float) * (size_t)n);
        smp_result r;
        assert_int_equal(smp_sample(s, l, &r), 0);
        assert_true(r.id >= 0 && r.id < n);
        counts[r.id]++;
    }
    smp_free(s);
}

/* probabilities 0.5 0.3 0.1 0.05 0.05 as logits (shifted, softmax does not care) */
static void five_logits(float *l)
{
    const double p[5] = {0.5, 0.3, 0.1, 0.05, 0.05};
    for (int i = 0; i < 5; i++)
        l[i] = (float)log(p[i]) + 3.0f;
}

static void assert_support(const int *counts, int n, const int *want, int n_want)
{
    for (int i = 0; i < n; i++) {
        bool in = false;
        for (int j = 0; j < n_want; j++)
            in |= want[j] == i;
        if (in && counts[i] == 0)
            fail_msg("token %d should be drawn but never was", i);
        if (!in && counts[i] != 0)
            fail_msg("token %d should never be drawn, drawn %d times", i, counts[i]);
    }
}

static void test_greedy(void **state)
{
    smp_params p = smp_default_params();
    smp_seq *s = mk(p, 6);
    float l[6] = {0.1f, 3.0f, -1.0f, 3.0f, 2.9f, 0.0f};
    smp_result r;
    assert_int_equal(smp_sample(s, l, &r), 0);
    assert_int_equal(r.id, 1); /* ties: the lower id */
    smp_free(s);
    p.temperature = 0.8f;
    p.top_k = 1; /* top-k 1 is greedy too */
    s = mk(p, 6);
    float l2[6] = {0.1f, 2.0f, -1.0f, 3.0f, 2.9f, 0.0f};
    for (int i = 0; i < 50; i++) {
        float c[6];
        memcpy(c, l2, sizeof c);
        assert_int_equal(smp_sample(s, c, &r), 0);
        assert_int_equal(r.id, 3);
    }
    smp_free(s);
}

static void test_top_k_support(void **state)
{
    float l[5];
    int counts[5];
    five_logits(l);
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.seed = 7;
    p.top_k = 3;
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0, 1, 2}, 3);
    /* renormalised over the top 3: 0.5/0.9, 0.3/0.9, 0.1/0.9 */
    assert_true(fabs(counts[0] / (double)N_DRAWS - 0.5 / 0.9) < 0.02);
    assert_true(fabs(counts[2] / (double)N_DRAWS - 0.1 / 0.9) < 0.02);
}

static void test_top_p_support(void **state)
{
    float l[5];
    int counts[5];
    five_logits(l);
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.seed = 11;
    p.top_p = 0.75f; /* 0.5 < 0.75 <= 0.8 */
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0, 1}, 2);
    assert_true(fabs(counts[0] / (double)N_DRAWS - 0.5 / 0.8) < 0.02);
    p.top_p = 0.85f; /* 0.8 < 0.85 <= 0.9 */
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0, 1, 2}, 3);
    p.top_p = 0.3f; /* the top token alone */
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0}, 1);
    p.top_p = 1.0f; /* off: all five, in proportion */
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0, 1, 2, 3, 4}, 5);
    for (int i = 0; i < 5; i++) {
        const double pr[5] = {0.5, 0.3, 0.1, 0.05, 0.05};
        assert_true(fabs(counts[i] / (double)N_DRAWS - pr[i]) < 0.015);
    }
}

/* A long, slowly decaying tail (4096 tokens, weights e^(-i/100), shuffled ids): the top-k
 * and top-p boundaries lie far below the best token (where the sampler sorts only a window
 * of its candidates first). The drawn support must end exactly where a full sort says, and
 * the draws must follow the renormalised weights. */
static void check_deep(smp_params p, int k_ref)
{
    enum { V = 4096, DRAWS = 60000 };
    static float logits[V], l[V];
    static int rank_of[V], counts[V];
    for (int i = 0; i < V; i++)
        rank_of[i] = i;
    for (int i = V - 1; i > 0; i--) { /* fixed shuffle: ids are not in rank order */
        int j = (int)((i * 2654435761u) % (unsigned)(i + 1)), t = rank_of[i];
        rank_of[i] = rank_of[j];
        rank_of[j] = t;
    }
    for (int id = 0; id < V; id++)
        logits[id] = -0.01f * (float)rank_of[id];
    smp_seq *sq = mk(p, V);
    memset(counts, 0, sizeof counts);
    int max_rank = 0;
    for (int d = 0; d < DRAWS; d++) {
        memcpy(l, logits, sizeof l);
        smp_result r;
        assert_int_equal(smp_sample(sq, l, &r), 0);
        assert_true(r.id >= 0 && r.id < V);
        int rk = rank_of[r.id];
        if (rk >= k_ref)
            fail_msg("drew rank %d, outside the top %d", rk, k_ref);
        max_rank = rk > max_rank ? rk : max_rank;
        counts[rk]++;
    }
    smp_free(sq);
    assert_true(max_rank >= k_ref - 40); /* the tail of the kept set is drawn too */
    /* the first decile of the kept ranks holds its share of the renormalised mass */
    double z = 0, head = 0;
    for (int i = 0; i < k_ref; i++) {
        double w = exp(-0.01 * i);
        z += w;
        if (i < k_ref / 10)
            head += w;
    }
    int got = 0;
    for (int i = 0; i < k_ref / 10; i++)
        got += counts[i];
    assert_true(fabs(got / (double)DRAWS - head / z) < 0.01);
}

static void test_deep_truncation(void **state)
{
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.seed = 21;
    /* boundaries past the first sorted window (weights >= 2^-6 of the best: ranks < 416) yet
     * with enough mass near them to be drawn in 60000 draws */
    p.top_k = 600;
    check_deep(p, 600);
    /* top-p of e^(-i/100) over 4096 ranks (the SMP_PRUNE cut keeps ranks <= 2000): the
     * smallest K with sum_{i<K} w_i >= top_p * sum_{i<=2000} w_i (about 530) */
    p.top_k = 0;
    p.top_p = 0.995f;
    double tot = 0, cum = 0;
    for (int i = 0; i < 4096; i++)
        if (-0.01f * (float)i >= -20.0f)
            tot += exp(-0.01 * i);
    int K = 0;
    while (cum < 0.995 * tot)
        cum += exp(-0.01 * K++);
    check_deep(p, K);
    /* both: top-k first, then top-p within it (about 460) */
    p.top_k = 1000;
    p.top_p = 0.99f;
    double tk = 0;
    for (int i = 0; i < 1000; i++)
        tk += exp(-0.01 * i);
    cum = 0;
    K = 0;
    while (cum < 0.99 * tk)
        cum += exp(-0.01 * K++);
    check_deep(p, K);
}

static void test_min_p_support(void **state)
{
    float l[5];
    int counts[5];
    five_logits(l);
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.seed = 3;
    p.min_p = 0.25f; /* keep p >= 0.125 */
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0, 1}, 2);
    p.min_p = 0.15f; /* keep p >= 0.075 */
    draw_counts(p, l, 5, counts);
    assert_support(counts, 5, (int[]){0, 1, 2}, 3);
}

static void test_temperature(void **state)
{
    /* T = 2 flattens: p_i ~ sqrt(p_i) */
    float l[5];
    int counts[5];
    five_logits(l);
    smp_params p = smp_default_params();
    p.temperature = 2.0f;
    p.seed = 5;
    draw_counts(p, l, 5, counts);
    const double pr[5] = {0.5, 0.3, 0.1, 0.05, 0.05};
    double z = 0;
    for (int i = 0; i < 5; i++)
        z += sqrt(pr[i]);
    for (int i = 0; i < 5; i++)
        assert_true(fabs(counts[i] / (double)N_DRAWS - sqrt(pr[i]) / z) < 0.015);
}

static void test_seed_reproducible(void **state)
{
    float base[32];
    for (int i = 0; i < 32; i++)
        base[i] = (float)sin(i * 1.7) * 2.0f;
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.top_p = 0.95f;
    p.seed = 1234;
    smp_seq *a = mk(p, 32), *b = mk(p, 32);
    p.seed = 1235;
    smp_seq *c = mk(p, 32);
    int same_ac = 0;
    for (int i = 0; i < 200; i++) {
        float la[32], lb[32], lc[32];
        memcpy(la, base, sizeof la);
        memcpy(lb, base, sizeof lb);
        memcpy(lc, base, sizeof lc);
        smp_result ra, rb, rc;
        assert_int_equal(smp_sample(a, la, &ra), 0);
        assert_int_equal(smp_sample(b, lb, &rb), 0);
        assert_int_equal(smp_sample(c, lc, &rc), 0);
        assert_int_equal(ra.id, rb.id);
        same_ac += ra.id == rc.id;
    }
    assert_true(same_ac < 200); /* another seed, another stream */
    smp_free(a);
    smp_free(b);
    smp_free(c);
}

static void test_penalties(void **state)
{
    smp_params p = smp_default_params();
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    p.logprobs = true;
    smp_seq *s = mk(p, 5);
    int32_t prompt[3] = {0, 1, 1};
    assert_int_equal(smp_accept_prompt(s, prompt, 3), 0);
    assert_int_equal(smp_accept(s, 2), 0);
    assert_int_equal(smp_accept(s, 2), 0);
    assert_int_equal(smp_accept(s, 3), 0);
    float l[5] = {4.0f, -1.0f, 3.0f, 2.0f, 1.0f};
    float want[5];
    /* repetition over prompt+generated: 0,1,2,3; then frequency/presence over generated only */
    want[0] = 4.0f / 2;
    want[1] = -1.0f * 2;
    want[2] = 3.0f / 2 - 2 * 0.5f - 0.25f;
    want[3] = 2.0f / 2 - 1 * 0.5f - 0.25f;
    want[4] = 1.0f;
    smp_result r;
    assert_int_equal(smp_sample(s, l, &r), 0);
    for (int i = 0; i < 5; i++)
        assert_true(fabs(l[i] - want[i]) < 1e-6);
    assert_int_equal(r.id, 0);
    /* logprob: log-softmax of the penalised logits */
    double z = 0;
    for (int i = 0; i < 5; i++)
        z += exp(want[i]);
    assert_true(fabs(r.logprob - (want[0] - log(z))) < 1e-5);
    smp_free(s);

    /* no penalties: logits untouched */
    p = smp_default_params();
    s = mk(p, 5);
    assert_int_equal(smp_accept(s, 0), 0);
    float l2[5] = {4.0f, -1.0f, 3.0f, 2.0f, 1.0f};
    assert_int_equal(smp_sample(s, l2, &r), 0);
    assert_true(l2[0] == 4.0f && l2[2] == 3.0f);
    assert_int_equal(smp_accept(s, 7), HY_EINVAL);
    smp_free(s);
}

static void test_logprobs(void **state)
{
    smp_params p = smp_default_params();
    p.temperature = 0.5f; /* logprobs do not depend on it */
    p.n_logprobs = 3;
    p.seed = 9;
    smp_seq *s = mk(p, 6);
    float l[6] = {0.5f, 2.0f, -1.0f, 1.5f, 1.9f, 0.0f};
    double z = 0;
    for (int i = 0; i < 6; i++)
        z += exp(l[i]);
    smp_result r;
    float c[6];
    memcpy(c, l, sizeof c);
    assert_int_equal(smp_sample(s, c, &r), 0);
    assert_int_equal(r.n_top, 3);
    int want[3] = {1, 4, 3};
    for (int j = 0; j < 3; j++) {
        assert_int_equal(r.top_id[j], want[j]);
        assert_true(fabs(r.top_logprob[j] - (l[want[j]] - log(z))) < 1e-5);
    }
    assert_true(fabs(r.logprob - (l[r.id] - log(z))) < 1e-5);
    smp_free(s);
}

/* smp_score: the raw log-softmax of a given token (prompt logprobs), no penalties applied. */
static void test_score(void **state)
{
    (void)state;
    float l[5] = {1.0f, 3.0f, 2.0f, -INFINITY, 0.5f};
    double z = exp(1.0) + exp(3.0) + exp(2.0) + exp(0.5);
    smp_result r;
    assert_int_equal(smp_score(l, 5, 2, 3, &r), HY_OK);
    assert_int_equal(r.id, 2);
    assert_true(fabs(r.logprob - (2.0 - log(z))) < 1e-5);
    assert_int_equal(r.n_top, 3);
    assert_int_equal(r.top_id[0], 1);
    assert_int_equal(r.top_id[1], 2);
    assert_int_equal(r.top_id[2], 0);
    assert_true(fabs(r.top_logprob[0] - (3.0 - log(z))) < 1e-5);
    assert_int_equal(smp_score(l, 5, 3, 0, &r), HY_OK); /* impossible token: finite, very low */
    assert_true(r.logprob == -FLT_MAX && r.n_top == 0);
    assert_int_equal(smp_score(l, 5, 5, 0, &r), HY_EINVAL);
    assert_int_equal(smp_score(l, 5, -1, 0, &r), HY_EINVAL);
    assert_int_equal(smp_score(l, 5, 0, SMP_MAX_LOGPROBS + 1, &r), HY_EINVAL);
    float bad[2] = {NAN, -INFINITY};
    assert_int_equal(smp_score(bad, 2, 0, 1, &r), HY_EINVAL);
}

static void test_bad_params(void **state)
{
    smp_seq *s = NULL;
    smp_params p = smp_default_params();
    p.temperature = -1;
    assert_int_equal(smp_create(&p, 10, &s), HY_EINVAL);
    p = smp_default_params();
    p.top_p = 1.5f;
    assert_int_equal(smp_create(&p, 10, &s), HY_EINVAL);
    p = smp_default_params();
    p.n_logprobs = SMP_MAX_LOGPROBS + 1;
    assert_int_equal(smp_create(&p, 10, &s), HY_EINVAL);
    p = smp_default_params();
    p.temperature = NAN;
    assert_int_equal(smp_create(&p, 10, &s), HY_EINVAL);
    assert_null(s);
}

static void test_stop_strings(void **state)
{
    const char *stops[] = {"world", "\n\n", ""};
    size_t hold = 99;
    const char *t = "Hello wor";
    assert_int_equal(smp_stop_check(t, strlen(t), 0, stops, 3, &hold), -1);
    assert_int_equal(hold, 3); /* "wor" may still become "world" */
    t = "Hello world!";
    assert_int_equal(smp_stop_check(t, strlen(t), 0, stops, 3, &hold), 6);
    assert_int_equal(hold, 0);
    t = "a\n\nb world";
    assert_int_equal(smp_stop_check(t, strlen(t), 0, stops, 3, &hold), 1); /* the earliest */
    t = "nothing here";
    assert_int_equal(smp_stop_check(t, strlen(t), 0, stops, 3, &hold), -1);
    assert_int_equal(hold, 0);
    t = "line\n";
    assert_int_equal(smp_stop_check(t, strlen(t), 0, stops, 3, &hold), -1);
    assert_int_equal(hold, 1);
    /* `from`: a match ending at or after it is found, even if it started before */
    t = "xx wo" "rld";
    assert_int_equal(smp_stop_check(t, strlen(t), 5, stops, 3, &hold), 3);
    /* a stop string longer than the text */
    const char *longs[] = {"abcdef"};
    assert_int_equal(smp_stop_check("abc", 3, 0, longs, 1, &hold), -1);
    assert_int_equal(hold, 3);
    assert_int_equal(smp_stop_check("", 0, 0, longs, 1, &hold), -1);
    assert_int_equal(hold, 0);
}

static void test_stop_tokens(void **state)
{
    int32_t ids[2] = {5, 9};
    assert_int_equal(smp_stop_token(2, true, false, ids, 2, 1, 10), SMP_STOP_EOG);
    assert_int_equal(smp_stop_token(2, true, true, ids, 2, 1, 10), SMP_CONTINUE);
    assert_int_equal(smp_stop_token(9, false, false, ids, 2, 1, 10), SMP_STOP_TOKEN);
    assert_int_equal(smp_stop_token(3, false, false, ids, 2, 10, 10), SMP_STOP_LENGTH);
    assert_int_equal(smp_stop_token(3, false, false, ids, 2, 9, 10), SMP_CONTINUE);
    assert_int_equal(smp_stop_token(3, false, false, NULL, 0, 1000, 0), SMP_CONTINUE);
}

/* A large vocabulary with a long flat tail: the pruning of implausible tokens must not change
 * what top-k keeps. */
static void test_large_vocab(void **state)
{
    enum { V = 49152 };
    static float l[V], c[V];
    for (int i = 0; i < V; i++)
        l[i] = -5.0f + (float)((i * 7919) % 1000) * 1e-4f;
    l[100] = 10.0f;
    l[200] = 9.5f;
    l[300] = 9.0f;
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.top_k = 2;
    p.seed = 42;
    smp_seq *s = mk(p, V);
    int seen[2] = {0, 0};
    for (int i = 0; i < 400; i++) {
        memcpy(c, l, sizeof c);
        smp_result r;
        assert_int_equal(smp_sample(s, c, &r), 0);
        assert_true(r.id == 100 || r.id == 200);
        seen[r.id == 200]++;
    }
    assert_true(seen[0] > 0 && seen[1] > 0);
    smp_free(s);
    smp_thread_cleanup();
}

/* Greedy (the one-pass argmax) against the general path (temperature 1 with a nucleus so
 * small that only the first candidate of the sorted list survives) and against the first
 * top logprob, on random logits drawn from a few values so that the maximum is tied often.
 * The expected token is the lowest id holding the maximum, found here by a plain scan. */
static void test_greedy_matches_general(void **state)
{
    enum { VMAX = 1000 };
    static float l[VMAX], c[VMAX];
    uint64_t x = 12345;
    for (int trial = 0; trial < 300; trial++) {
        int n = 1 + trial * 7 % VMAX;
        int levels = 1 + trial % 9; /* 1 level: every logit ties */
        for (int i = 0; i < n; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            l[i] = (float)((x >> 33) % (uint64_t)levels) * 0.5f - 2.0f;
        }
        /* a NaN logit (not in front) is never the greedy pick; only greedy promises that */
        bool has_nan = trial % 5 == 4 && n > 3;
        if (has_nan)
            l[n / 2] = NAN;
        int want = 0;
        for (int i = 1; i < n; i++)
            if (l[i] > l[want])
                want = i;
        smp_params g = smp_default_params();
        smp_params gl = g;
        gl.logprobs = true;
        gl.n_logprobs = 1;
        smp_params d = g;
        d.temperature = 1.0f;
        d.top_p = 1e-7f;
        d.seed = (uint64_t)trial;
        const smp_params *ps[3] = {&g, &gl, &d};
        for (int k = 0; k < 3; k++) {
            if (k > 0 && has_nan)
                continue;
            smp_seq *s = mk(*ps[k], n);
            smp_result r;
            memcpy(c, l, sizeof(float) * (size_t)n);
            assert_int_equal(smp_sample(s, c, &r), 0);
            if (r.id != want)
                fail_msg("trial %d (n %d, path %d): picked %d, want %d", trial, n, k, r.id, want);
            if (k == 1)
                assert_int_equal(r.top_id[0], want);
            smp_free(s);
        }
    }
    smp_thread_cleanup();
}

/* ------------------------------------------------------------------ non-finite logits
 * The contract: a NaN logit counts as -inf; a token with a -inf (or NaN) logit is never
 * picked and never listed in the top logprobs; when some logits are +inf those tokens share
 * all the probability equally (each has logprob -log(count)) and every other token has none;
 * a row with no logit above -inf is an HY_EINVAL error. The expectations below are computed
 * from that definition with plain loops in double precision. */

enum { NF_MAX = 49152 };

typedef struct {
    int n_support;              /* tokens with probability > 0; 0: the row is an error */
    int greedy;                 /* lowest id of the largest non-NaN logit */
    int order[NF_MAX];          /* the support, most likely first, ties by lower id */
    double lp[NF_MAX];          /* logprob per token (-inf outside the support) */
} nf_ref;

static const float *nf_l;

/* By logit (the logprob is monotone in it, and a double logprob near -3e38 loses the
 * difference between logits 5 and 0), ties by lower id. */
static int nf_cmp(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    if (nf_l[x] != nf_l[y])
        return nf_l[x] < nf_l[y] ? 1 : -1;
    return x < y ? -1 : x > y; /* ties: lower id first */
}

static void nf_reference(const float *l, int n, nf_ref *ref)
{
    int n_pinf = 0;
    double mx = -INFINITY;
    ref->greedy = -1;
    for (int i = 0; i < n; i++) {
        if (isnan(l[i]) || l[i] == -INFINITY)
            continue;
        if (ref->greedy < 0 || l[i] > l[ref->greedy])
            ref->greedy = i;
        n_pinf += l[i] == INFINITY;
        if (l[i] > mx)
            mx = l[i];
    }
    double z = 0;
    for (int i = 0; i < n; i++)
        if (!isnan(l[i]) && isfinite(l[i]))
            z += exp((double)l[i] - mx);
    ref->n_support = 0;
    for (int i = 0; i < n; i++) {
        bool in = n_pinf ? l[i] == INFINITY : !isnan(l[i]) && isfinite(l[i]);
        ref->lp[i] = !in ? -INFINITY : n_pinf ? -log((double)n_pinf) : (double)l[i] - mx - log(z);
        if (!in)
            continue;
        ref->order[ref->n_support++] = i;
    }
    nf_l = l;
    qsort(ref->order, (size_t)ref->n_support, sizeof(int), nf_cmp);
}

static bool nf_close(double got, double want) { return fabs(got - want) <= 1e-4 * (1 + fabs(want)); }

/* One sample from a fresh copy of the row; checks what every mode must satisfy. */
static int nf_sample(smp_seq *s, const float *l, int n, const nf_ref *ref, smp_result *r,
                     const char *what)
{
    static float c[NF_MAX];
    memcpy(c, l, sizeof(float) * (size_t)n);
    int rc = smp_sample(s, c, r);
    if (ref->n_support == 0) {
        if (rc != HY_EINVAL)
            fail_msg("%s: a row with no logit above -inf gave rc %d (id %d), want HY_EINVAL", what,
                     rc, r->id);
        return rc;
    }
    if (rc != 0)
        fail_msg("%s: rc %d (%s)", what, rc, hy_err_msg());
    if (r->id < 0 || r->id >= n || ref->lp[r->id] == -INFINITY)
        fail_msg("%s: picked token %d, which has no probability (logit %g)", what, r->id,
                 r->id >= 0 && r->id < n ? (double)l[r->id] : 0.0);
    const smp_params *p = smp_get_params(s);
    if (p->logprobs || p->n_logprobs > 0) {
        if (!isfinite(r->logprob) || !nf_close(r->logprob, ref->lp[r->id]))
            fail_msg("%s: logprob of %d is %g, want %g", what, r->id, (double)r->logprob,
                     ref->lp[r->id]);
        int want_top = HY_MIN(p->n_logprobs, ref->n_support);
        if (r->n_top != want_top)
            fail_msg("%s: %d top logprobs, want %d", what, r->n_top, want_top);
        for (int j = 0; j < r->n_top; j++) {
            int id = r->top_id[j];
            if (id != ref->order[j])
                fail_msg("%s: top[%d] is token %d (logit %g), want %d (logit %g)", what, j, id,
                         id >= 0 && id < n ? (double)l[id] : 0.0, ref->order[j],
                         (double)l[ref->order[j]]);
            if (!isfinite(r->top_logprob[j]) || !nf_close(r->top_logprob[j], ref->lp[id]))
                fail_msg("%s: top[%d] logprob %g, want %g", what, j, (double)r->top_logprob[j],
                         ref->lp[id]);
            if (id == r->id && r->top_logprob[j] != r->logprob)
                fail_msg("%s: the chosen token's logprob %g differs from its top entry %g", what,
                         (double)r->logprob, (double)r->top_logprob[j]);
        }
    }
    return rc;
}

/* Every mode on one row: greedy, greedy + top logprobs, seeded sampling (plain, top-k,
 * top-p + min-p, with logprobs), and top-k 1. */
static void nf_check_row(const float *l, int n, const char *name)
{
    static nf_ref ref;
    nf_reference(l, n, &ref);
    char what[128];
    smp_result r;

    smp_params g = smp_default_params();
    smp_seq *s = mk(g, n);
    snprintf(what, sizeof what, "%s, greedy", name);
    if (nf_sample(s, l, n, &ref, &r, what) == 0 && r.id != ref.greedy)
        fail_msg("%s: picked %d, want %d", what, r.id, ref.greedy);
    smp_free(s);

    g.logprobs = true;
    g.n_logprobs = 5;
    s = mk(g, n);
    snprintf(what, sizeof what, "%s, greedy + 5 logprobs", name);
    if (nf_sample(s, l, n, &ref, &r, what) == 0 && r.id != ref.greedy)
        fail_msg("%s: picked %d, want %d", what, r.id, ref.greedy);
    smp_free(s);

    g = smp_default_params();
    g.temperature = 0.9f;
    g.top_k = 1;
    s = mk(g, n);
    snprintf(what, sizeof what, "%s, top-k 1", name);
    if (nf_sample(s, l, n, &ref, &r, what) == 0 && r.id != ref.greedy)
        fail_msg("%s: picked %d, want %d", what, r.id, ref.greedy);
    smp_free(s);

    smp_params d[4];
    const char *dn[4] = {"T 1", "T 0.7 top-k 3 + logprobs", "T 1.3 top-p 0.9 min-p 0.05",
                         "T 1 + 20 logprobs"};
    for (int k = 0; k < 4; k++) {
        d[k] = smp_default_params();
        d[k].seed = 77 + (uint64_t)k;
        d[k].temperature = 1.0f;
    }
    d[1].temperature = 0.7f;
    d[1].top_k = 3;
    d[1].logprobs = true;
    d[1].n_logprobs = 2;
    d[2].temperature = 1.3f;
    d[2].top_p = 0.9f;
    d[2].min_p = 0.05f;
    d[3].logprobs = true;
    d[3].n_logprobs = SMP_MAX_LOGPROBS;
    for (int k = 0; k < 4; k++) {
        s = mk(d[k], n);
        snprintf(what, sizeof what, "%s, sampling %s", name, dn[k]);
        for (int t = 0; t < (n > 1000 ? 4 : 40); t++) {
            if (nf_sample(s, l, n, &ref, &r, what) != 0)
                break;
            if (d[k].top_k > 0) {
                bool in = false;
                for (int j = 0; j < HY_MIN(d[k].top_k, ref.n_support); j++)
                    in |= ref.order[j] == r.id;
                if (!in)
                    fail_msg("%s: token %d is not in the top %d", what, r.id, d[k].top_k);
            }
        }
        smp_free(s);
    }
}

/* A row of distinct finite logits with its maximum at 100 (second at 40). */
static void nf_base(float *l, int n)
{
    for (int i = 0; i < n; i++)
        l[i] = (float)sin(i * 1.3) * 3.0f;
    if (n > 100)
        l[100] = 5.0f;
    if (n > 40)
        l[40] = 4.5f;
}

static void test_nan_logits(void **state)
{
    enum { N = 200 }; /* three 64-logit chunks and a tail of 8 */
    float l[N];
    const int pos[] = {0, 1, 40, 62, 63, 64, 65, 100, 127, 128, 191, 192, N - 1};
    char name[64];
    for (size_t k = 0; k < sizeof pos / sizeof pos[0]; k++) {
        nf_base(l, N);
        l[pos[k]] = NAN;
        snprintf(name, sizeof name, "NaN at %d", pos[k]);
        nf_check_row(l, N, name);
    }
    /* the maximum sits in the same chunk as the NaN, on both sides of it */
    nf_base(l, N);
    l[63] = NAN;
    l[62] = 9.0f;
    nf_check_row(l, N, "NaN at 63, max at 62");
    nf_base(l, N);
    l[64] = NAN;
    l[65] = 9.0f;
    nf_check_row(l, N, "NaN at 64, max at 65");
    /* many NaNs, including the first, the top two and the whole first chunk */
    nf_base(l, N);
    for (int i = 0; i < N; i += 3)
        l[i] = NAN;
    l[100] = l[40] = NAN;
    nf_check_row(l, N, "every third NaN");
    nf_base(l, N);
    for (int i = 0; i < 64; i++)
        l[i] = NAN;
    nf_check_row(l, N, "first chunk NaN");
    /* only one token is not NaN, and it is in the tail */
    for (int i = 0; i < N; i++)
        l[i] = NAN;
    l[N - 3] = -7.0f;
    nf_check_row(l, N, "one finite logit among NaNs");
    /* vocabularies of exactly one chunk and one chunk + 1 */
    nf_base(l, 64);
    l[0] = NAN;
    nf_check_row(l, 64, "n 64, NaN at 0");
    nf_base(l, 65);
    l[64] = NAN;
    nf_check_row(l, 65, "n 65, NaN at 64");
    smp_thread_cleanup();
}

static void test_inf_logits(void **state)
{
    enum { N = 200 };
    float l[N];
    char name[64];
    const int pos[] = {0, 63, 64, 100, N - 1};
    for (size_t k = 0; k < sizeof pos / sizeof pos[0]; k++) {
        nf_base(l, N);
        l[pos[k]] = INFINITY;
        snprintf(name, sizeof name, "+inf at %d", pos[k]);
        nf_check_row(l, N, name);
        nf_base(l, N);
        l[pos[k]] = -INFINITY;
        snprintf(name, sizeof name, "-inf at %d", pos[k]);
        nf_check_row(l, N, name);
    }
    nf_base(l, N);
    l[63] = l[64] = l[150] = INFINITY;
    l[0] = NAN;
    l[100] = -INFINITY;
    nf_check_row(l, N, "three +inf, NaN, -inf");
    /* -inf everywhere but a few */
    for (int i = 0; i < N; i++)
        l[i] = -INFINITY;
    l[70] = 1.0f;
    l[3] = -2.0f;
    l[199] = NAN;
    nf_check_row(l, N, "two finite among -inf");
    /* huge finite logits: the spread overflows float but nothing may become NaN */
    nf_base(l, N);
    l[10] = 3e38f;
    l[11] = -3e38f;
    l[12] = 3e38f;
    nf_check_row(l, N, "+-3e38");

    /* the +inf tokens share the mass: counted over many draws */
    nf_base(l, N);
    l[5] = l[64] = l[190] = INFINITY;
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    p.seed = 21;
    smp_seq *s = mk(p, N);
    int cnt[3] = {0, 0, 0};
    enum { DRAWS = 3000 };
    for (int t = 0; t < DRAWS; t++) {
        float c[N];
        memcpy(c, l, sizeof c);
        smp_result r;
        assert_int_equal(smp_sample(s, c, &r), 0);
        assert_true(r.id == 5 || r.id == 64 || r.id == 190);
        cnt[(r.id == 64) + 2 * (r.id == 190)]++;
    }
    for (int k = 0; k < 3; k++)
        if (fabs(cnt[k] / (double)DRAWS - 1.0 / 3) > 0.05)
            fail_msg("+inf token %d drawn %d of %d times, want about a third", k, cnt[k], DRAWS);
    smp_free(s);

    /* a temperature so large that max - 20 T is -inf (or NaN next to +inf): -inf stays out,
     * finite tokens stay out next to +inf, and the finite ones become about uniform */
    nf_base(l, 8);
    l[2] = -INFINITY;
    l[6] = NAN;
    p.temperature = 3e38f;
    p.seed = 5;
    s = mk(p, 8);
    int seen[8] = {0};
    for (int t = 0; t < 600; t++) {
        float c[8];
        memcpy(c, l, sizeof c);
        smp_result r;
        assert_int_equal(smp_sample(s, c, &r), 0);
        assert_true(r.id != 2 && r.id != 6);
        seen[r.id]++;
    }
    for (int i = 0; i < 8; i++)
        if (i != 2 && i != 6 && seen[i] < 50)
            fail_msg("T 3e38: token %d drawn %d of 600 times, want about 100", i, seen[i]);
    l[4] = INFINITY;
    for (int t = 0; t < 50; t++) {
        float c[8];
        memcpy(c, l, sizeof c);
        smp_result r;
        assert_int_equal(smp_sample(s, c, &r), 0);
        assert_int_equal(r.id, 4);
    }
    smp_free(s);
    smp_thread_cleanup();
}

static void test_no_finite_logit(void **state)
{
    enum { N = 130 };
    float l[N];
    for (int i = 0; i < N; i++)
        l[i] = -INFINITY;
    nf_check_row(l, N, "all -inf");
    for (int i = 0; i < N; i++)
        l[i] = NAN;
    nf_check_row(l, N, "all NaN");
    for (int i = 0; i < N; i++)
        l[i] = i % 2 ? NAN : -INFINITY;
    nf_check_row(l, N, "NaN and -inf");
    l[0] = NAN;
    nf_check_row(l, 1, "one NaN");
    l[0] = -INFINITY;
    nf_check_row(l, 1, "one -inf");
    l[0] = 2.0f;
    nf_check_row(l, 1, "one finite");
    l[0] = INFINITY;
    nf_check_row(l, 1, "one +inf");
    /* the error names the problem and the result is not a valid id */
    for (int i = 0; i < N; i++)
        l[i] = NAN;
    smp_params p = smp_default_params();
    p.temperature = 1.0f;
    smp_seq *s = mk(p, N);
    smp_result r;
    assert_int_equal(smp_sample(s, l, &r), HY_EINVAL);
    assert_int_equal(r.id, -1);
    assert_non_null(strstr(hy_err_msg(), "NaN"));
    smp_free(s);
    smp_thread_cleanup();
}

/* Penalties move finite logits only; a NaN stays NaN (never picked) and +inf stays +inf. */
static void test_penalties_non_finite(void **state)
{
    enum { N = 70 };
    float l[N];
    nf_base(l, N);
    l[0] = NAN;
    l[1] = INFINITY;
    l[2] = -INFINITY;
    l[3] = 50.0f;
    smp_params p = smp_default_params();
    p.repetition_penalty = 1.5f;
    p.presence_penalty = 1.0f;
    p.frequency_penalty = 0.5f;
    p.logprobs = true;
    p.n_logprobs = 3;
    smp_seq *s = mk(p, N);
    int32_t prompt[4] = {0, 1, 2, 3};
    assert_int_equal(smp_accept_prompt(s, prompt, 4), 0);
    assert_int_equal(smp_accept(s, 1), 0);
    assert_int_equal(smp_accept(s, 0), 0);
    float c[N];
    memcpy(c, l, sizeof c);
    smp_result r;
    assert_int_equal(smp_sample(s, c, &r), 0);
    assert_true(isnan(c[0]));
    assert_true(c[1] == INFINITY && c[2] == -INFINITY);
    assert_int_equal(r.id, 1);
    assert_int_equal(r.n_top, 1);
    assert_int_equal(r.top_id[0], 1);
    assert_true(r.logprob == 0.0f);
    smp_free(s);
    /* without the +inf, the penalised 50 still wins */
    l[1] = 1.0f;
    s = mk(p, N);
    assert_int_equal(smp_accept_prompt(s, prompt, 4), 0);
    memcpy(c, l, sizeof c);
    assert_int_equal(smp_sample(s, c, &r), 0);
    assert_int_equal(r.id, 3);
    assert_int_equal(r.n_top, 3);
    for (int j = 0; j < 3; j++)
        assert_true(r.top_id[j] >= 1 && isfinite(r.top_logprob[j]));
    smp_free(s);
}

/* The greedy argmax on a full vocabulary (749 chunks + a tail of 0) with NaN in front. */
static void test_nan_large_vocab(void **state)
{
    enum { V = 49152 };
    static float l[V];
    for (int i = 0; i < V; i++)
        l[i] = (float)((i * 7919) % 1000) * 1e-3f;
    l[31000] = 3.0f;
    l[0] = NAN;
    l[64] = NAN;
    l[V - 1] = NAN;
    nf_check_row(l, V, "49152, NaN at 0/64/last");
    l[0] = INFINITY;
    nf_check_row(l, V, "49152, +inf at 0");
    smp_thread_cleanup();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy), cmocka_unit_test(test_score),
        cmocka_unit_test(test_greedy_matches_general),
        cmocka_unit_test(test_top_k_support),
        cmocka_unit_test(test_top_p_support),
        cmocka_unit_test(test_deep_truncation),
        cmocka_unit_test(test_min_p_support),
        cmocka_unit_test(test_temperature),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_bad_params),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_stop_tokens),
        cmocka_unit_test(test_large_vocab),
        cmocka_unit_test(test_nan_logits),
        cmocka_unit_test(test_inf_logits),
        cmocka_unit_test(test_no_finite_logit),
        cmocka_unit_test(test_penalties_non_finite),
        cmocka_unit_test(test_nan_large_vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
