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

#include <math.h>
#include <stdio.h>
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_greedy_matches_general),
        cmocka_unit_test(test_top_k_support),
        cmocka_unit_test(test_top_p_support),
        cmocka_unit_test(test_min_p_support),
        cmocka_unit_test(test_temperature),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_bad_params),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_stop_tokens),
        cmocka_unit_test(test_large_vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
