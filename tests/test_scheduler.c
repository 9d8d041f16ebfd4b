/* test_scheduler.c - the engine scheduler against a fake model whose "KV cache" is simulated
 * slot by slot: the next token is a hash of the tokens READ BACK through the block table, so a
 * wrong slot, block table or recompute changes the output. Covers the KV block allocator,
 * chunked prefill, preemption by recompute, stop strings, cancellation, queue limits, adapter
 * segments, the max-loras limit and fairness across adapters. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/hy.h"
#include "engine/kv_alloc.h"
#include "engine/scheduler.h"

#define V 64
#define EOG_NONE (-1)

typedef struct {
    int32_t tok, pos, valid;
} fake_slot;

typedef struct {
    fake_slot *kv;
    int n_slots;
    int eog;                 /* token treated as end of generation */
    int max_adapters_seen;   /* most distinct adapters in one batch */
    int steps;
    eng_adapter ad[4];       /* K = adapter number; adapters are &ad[i] via acquire */
    int acquired[4];
    bool no_slot[4];         /* acquire of adapter i answers HY_EBUSY (its slots stay taken) */
    int first_step_of[4];    /* step when adapter i's tokens first ran (-1 never) */
    int errors;              /* consistency violations seen by the fake forward */
} fake;

static bool g_cyclic; /* ref_next from the last token only: outputs cycle, so prompt-lookup drafts hit */

/* The reference: next token from the whole sequence. */
static int32_t ref_next(const int32_t *t, int n)
{
    if (g_cyclic)
        return (int32_t)(1 + ((uint32_t)t[n - 1] * 7u + 3u) % (V - 2));
    uint32_t h = 7;
    for (int i = 0; i < n; i++)
        h = h * 31u + (uint32_t)t[i] * (uint32_t)(i + 1);
    return (int32_t)(1 + h % (V - 2));
}

/* The fake's logits for the sequence hist[0..n): 1 at ref_next, and below 0.5 elsewhere, a
 * function of the whole history and the token (so a prompt-logprob row read from the wrong
 * position or sequence shows). */
static void fake_logits(const int32_t *hist, int n, float *lg)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++)
        h = (h ^ (uint32_t)hist[i]) * 16777619u;
    for (int v = 0; v < V; v++)
        lg[v] = (float)(((h ^ (uint32_t)v * 2654435761u) * 16777619u) % 97u) / 200.0f;
    lg[ref_next(hist, n)] = 1.0f;
}

static int fake_forward(void *ctx, const eng_batch *b, float *logits)
{
    fake *f = ctx;
    const be_attn_meta *m = &b->attn;
    int adapters_here = 0;
    f->steps++;
    for (int s = 0; s < b->n_seg; s++) {
        if (b->seg_begin[s] >= b->seg_begin[s + 1])
            f->errors++;
        if (b->seg_adapter[s]) {
            adapters_here++;
            int k = b->seg_adapter[s]->K;
            if (f->first_step_of[k] < 0)
                f->first_step_of[k] = f->steps;
        }
    }
    if (adapters_here > f->max_adapters_seen)
        f->max_adapters_seen = adapters_here;
    for (int t = 0; t < b->n_tok; t++) {
        if (m->slot[t] < 0 || m->slot[t] >= f->n_slots) {
            f->errors++;
            continue;
        }
        f->kv[m->slot[t]] = (fake_slot){b->tokens[t], m->pos[t], 1};
        if (t > 0 && m->tok_seq[t] == m->tok_seq[t - 1] && m->pos[t] != m->pos[t - 1] + 1)
            f->errors++;
    }
    for (int i = 0; i < b->n_logits; i++) {
        int t = b->logits_tok[i], s = m->tok_seq[t], n = m->pos[t] + 1;
        if (n > m->seq_len[s])
            f->errors++;
        int32_t hist[4096];
        for (int p = 0; p < n && p < 4096; p++) {
            int blk = m->block_table[s * m->max_blocks + p / BE_KV_BLOCK];
            fake_slot *sl = &f->kv[blk * BE_KV_BLOCK + p % BE_KV_BLOCK];
            if (!sl->valid || sl->pos != p)
                f->errors++;
            hist[p] = sl->tok;
        }
        /* adapter check: token 0 of a sequence names its adapter (0 = base) */
        int seg = 0;
        while (seg + 1 < b->n_seg && b->seg_begin[seg + 1] <= t)
            seg++;
        int want = b->seg_adapter[seg] ? b->seg_adapter[seg]->K : 0;
        if (hist[0] != want)
            f->errors++;
        fake_logits(hist, n, logits + (size_t)i * V);
    }
    return 0;
}

static int fake_sample(void *ctx, void *state, const float *logits, const int32_t *toks, int n_prompt,
                       int n_toks, sched_sample *out)
{
    int best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best])
            best = v;
    out->token = best;
    out->logprob = 0.0f;
    return 0;
}

static size_t fake_detok(void *ctx, void *state, int32_t tok, char *buf, size_t cap)
{
    buf[0] = (char)('a' + tok % 26);
    return 1;
}

static bool fake_eog(void *ctx, int32_t tok) { return tok == ((fake *)ctx)->eog; }

static int fake_acquire(void *ctx, void *adapter, const eng_adapter **out)
{
    fake *f = ctx;
    int k = (int)(intptr_t)adapter;
    if (f->no_slot[k])
        return HY_EBUSY;
    f->acquired[k]++;
    *out = &f->ad[k];
    return 0;
}

static void fake_release(void *ctx, void *adapter, uint64_t n) { ((fake *)ctx)->acquired[(intptr_t)adapter]--; }
static const char *fake_name(void *ctx, void *adapter) { return (intptr_t)adapter == 1 ? "one" : "other"; }

static const sched_ops fake_ops = {
    .forward = fake_forward, .sample = fake_sample, .detok = fake_detok, .is_eog = fake_eog,
    .adapter_acquire = fake_acquire, .adapter_release = fake_release, .adapter_name = fake_name,
};

static fake *fake_new(int n_blocks)
{
    fake *f = calloc(1, sizeof *f);
    f->n_slots = n_blocks * BE_KV_BLOCK;
    f->kv = calloc((size_t)f->n_slots, sizeof *f->kv);
    f->eog = EOG_NONE;
    for (int i = 0; i < 4; i++) {
        f->ad[i].K = i;
        f->first_step_of[i] = -1;
    }
    return f;
}

static void fake_free(fake *f)
{
    free(f->kv);
    free(f);
}

static bool g_prefix_cache; /* mk's sched_config.prefix_cache */
static double g_adapter_wait; /* mk's sched_config.adapter_wait_s */
static int g_spec;            /* mk's sched_config.spec_max_draft */
static int g_spec_batch;      /* mk's sched_config.spec_max_batch */

static sched *mk(fake *f, int max_seqs, int max_batch, int n_blocks, int max_queue, int max_loras)
{
    sched_config c = {.max_seqs = max_seqs, .max_batch_tokens = max_batch, .n_blocks = n_blocks,
                      .max_queue = max_queue, .max_loras = max_loras, .n_ctx = 512, .n_vocab = V,
                      .prefix_cache = g_prefix_cache, .adapter_wait_s = g_adapter_wait,
                      .spec_max_draft = g_spec, .spec_max_batch = g_spec_batch, .ops = &fake_ops,
                      .ops_ctx = f};
    sched *s = NULL;
    assert_int_equal(sched_create(&c, &s), 0);
    return s;
}

static sched_req *mkreq(int adapter, int n_prompt, int seed, int n, int max_tokens, const char *stop)
{
    int32_t p[600];
    p[0] = adapter;
    for (int i = 1; i < n_prompt; i++)
        p[i] = (seed * 13 + i * 7) % V;
    const int32_t *pp = p;
    sched_sampling sp = {0};
    sched_req *r = NULL;
    assert_int_equal(sched_req_create(1, &pp, &n_prompt, n, max_tokens, stop ? &stop : NULL, stop ? 1 : 0,
                                      false, &sp, (void *)(intptr_t)adapter, &r),
                     0);
    return r;
}

/* Expected text of a request from the reference alone. */
static void ref_text(const sched_req *r, int max_tokens, char *out)
{
    int32_t t[1200];
    int n = r->n_prompt[0];
    memcpy(t, r->prompt[0], (size_t)n * sizeof *t);
    for (int i = 0; i < max_tokens; i++) {
        t[n] = ref_next(t, n);
        out[i] = (char)('a' + t[n] % 26);
        n++;
    }
    out[max_tokens] = '\0';
}

static void run_until_done(sched *s, sched_req **rs, int n, int max_steps)
{
    for (int step = 0; step < max_steps; step++) {
        bool all = true;
        for (int i = 0; i < n; i++) {
            sched_req_lock(rs[i]);
            all = all && sched_req_finished(rs[i]);
            sched_req_unlock(rs[i]);
        }
        if (all)
            return;
        assert_true(sched_step(s) >= 0);
    }
    fail_msg("requests did not finish in %d steps", max_steps);
}

/* Speculative decoding against the fake: 12 requests over three adapters (n 2 for some, stop
 * strings and max_tokens that end inside drafted runs) give exactly what decoding without drafts
 * gives, on a history-hashing model (drafts rarely hit) and a cyclic one (they mostly do), with
 * a KV cache small enough to preempt; the fake checks every K/V slot it reads back, so a rejected
 * draft's K/V read as history, or a block freed too early, shows as an error. */
static void spec_run(int spec, int n_blocks, char texts[12][2][80], const char *fin[12][2], sched_stats *st, int *steps)
{
    g_spec = spec;
    fake *f = fake_new(n_blocks);
    sched *s = mk(f, 8, 64, n_blocks, 64, 4);
    sched_req *rs[12];
    for (int i = 0; i < 12; i++) {
        const char *stop = i % 4 == 3 ? "ka" : NULL;
        rs[i] = mkreq(i % 3, 3 + (i * 11) % 30, i, 1 + (i % 5 == 0), 5 + (i * 13) % 60, stop);
        assert_int_equal(sched_submit(s, rs[i]), 0);
    }
    run_until_done(s, rs, 12, 5000);
    for (int i = 0; i < 12; i++) {
        assert_false(rs[i]->failed);
        for (int c = 0; c < rs[i]->n_choices; c++) {
            snprintf(texts[i][c], 80, "%s", rs[i]->choices[c].text);
            fin[i][c] = rs[i]->choices[c].finish;
            assert_true(rs[i]->choices[c].n_gen <= rs[i]->max_tokens);
        }
        if (spec == 0)
            assert_int_equal(rs[i]->spec_drafted, 0);
        assert_true(rs[i]->spec_accepted <= rs[i]->spec_drafted);
        sched_req_release(rs[i]);
    }
    sched_get_stats(s, st);
    assert_int_equal(st->kv_used, 0);
    assert_int_equal(st->running_seqs, 0);
    assert_int_equal(f->errors, 0);
    *steps = (int)st->steps;
    sched_free(s);
    fake_free(f);
    g_spec = 0;
}

static void test_speculative_exact(void **state)
{
    (void)state;
    for (int cyclic = 0; cyclic < 2; cyclic++)
        for (int small = 0; small < 2; small++) {
            g_cyclic = cyclic;
            int nb = small ? 14 : 128; /* 14 blocks: preemption by recompute happens */
            static char off[12][2][80], on[12][2][80];
            const char *foff[12][2] = {{0}}, *fon[12][2] = {{0}};
            sched_stats s0, s1;
            int st0, st1;
            spec_run(0, nb, off, foff, &s0, &st0);
            spec_run(4, nb, on, fon, &s1, &st1);
            for (int i = 0; i < 12; i++)
                for (int c = 0; c < 1 + (i % 5 == 0); c++) {
                    assert_string_equal(on[i][c], off[i][c]);
                    assert_string_equal(fon[i][c], foff[i][c]);
                }
            printf("# cyclic %d, %d blocks: %d steps without drafts, %d with; %llu drafts, %llu tokens, %llu "
                   "accepted, %llu preemptions (%llu without)\n", cyclic, nb, st0, st1,
                   (unsigned long long)s1.spec_drafts, (unsigned long long)s1.spec_draft_tokens,
                   (unsigned long long)s1.spec_accepted, (unsigned long long)s1.preemptions,
                   (unsigned long long)s0.preemptions);
            assert_true(s1.spec_accepted <= s1.spec_draft_tokens);
            assert_int_equal(s0.spec_draft_tokens, 0);
            if (cyclic) { /* the drafts hit: fewer steps */
                assert_true(s1.spec_accepted > s1.spec_draft_tokens / 2);
                assert_true(st1 < st0);
            }
            if (small) /* the cache is tight enough to preempt, with drafts and without */
                assert_true(s0.preemptions > 0 && s1.preemptions > 0);
        }
    /* a step decoding spec_max_batch sequences or more gets no drafts: with 1, none ever */
    g_spec_batch = 1;
    static char t1[12][2][80];
    const char *f1[12][2] = {{0}};
    sched_stats s2;
    int st2;
    spec_run(4, 128, t1, f1, &s2, &st2);
    assert_int_equal(s2.spec_draft_tokens, 0);
    g_spec_batch = 0;
    g_cyclic = false;
}

/* max_tokens may exceed the context (callers leave the cut to n_ctx): the sequence runs to n_ctx
 * and ends with "length" (the buffer size prompt + max_tokens + 1 must not overflow). */
static void test_max_tokens_huge(void **st)
{
    (void)st;
    fake *f = fake_new(64);
    sched *s = mk(f, 2, 64, 64, 4, 1);
    sched_req *r = mkreq(0, 10, 3, 1, INT_MAX, NULL);
    assert_int_equal(sched_submit(s, r), 0);
    run_until_done(s, &r, 1, 2000);
    char want[600];
    ref_text(r, 512 - 10, want);
    assert_false(r->failed);
    assert_string_equal(r->choices[0].finish, "length");
    assert_int_equal(r->choices[0].n_gen, 512 - 10);
    assert_string_equal(r->choices[0].text, want);
    assert_int_equal(f->errors, 0);
    sched_req_release(r);
    sched_free(s);
    fake_free(f);
}

static void test_kv_alloc(void **st)
{
    (void)st;
    kv_alloc a;
    int32_t ids[4], x;
    assert_int_equal(kv_alloc_init(&a, 4), 0);
    for (int i = 0; i < 4; i++)
        assert_int_equal(kv_alloc_get(&a, &ids[i]), 0);
    assert_int_equal(kv_alloc_free_count(&a), 0);
    assert_int_equal(kv_alloc_get(&a, &x), HY_EBUSY);
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            assert_int_not_equal(ids[i], ids[j]);
    assert_int_equal(kv_alloc_put(&a, ids[2]), 0);
    assert_int_equal(kv_alloc_put(&a, ids[2]), HY_EINVAL); /* double free */
    assert_int_equal(kv_alloc_put(&a, 9), HY_EINVAL);
    assert_int_equal(kv_alloc_put(&a, -1), HY_EINVAL);
    assert_int_equal(kv_alloc_free_count(&a), 1);
    assert_int_equal(kv_alloc_get(&a, &x), 0);
    assert_int_equal(x, ids[2]);
    kv_alloc_clear(&a);
    assert_int_equal(kv_alloc_init(&a, 0), HY_EINVAL);
    assert_int_equal(kv_blocks_for(0), 0);
    assert_int_equal(kv_blocks_for(1), 1);
    assert_int_equal(kv_blocks_for(BE_KV_BLOCK), 1);
    assert_int_equal(kv_blocks_for(BE_KV_BLOCK + 1), 2);
}

/* Many requests of mixed lengths with a small token budget (chunked prefill) give exactly the
 * reference outputs, and every block comes back. */
static void check_many(int max_seqs, int max_batch, int n_blocks, bool expect_preempt)
{
    fake *f = fake_new(n_blocks);
    sched *s = mk(f, max_seqs, max_batch, n_blocks, 64, 4);
    sched_req *rs[12];
    int mt[12];
    for (int i = 0; i < 12; i++) {
        mt[i] = 5 + (i * 7) % 23;
        rs[i] = mkreq(0, 3 + (i * 11) % 40, i, 1, mt[i], NULL);
        assert_int_equal(sched_submit(s, rs[i]), 0);
    }
    run_until_done(s, rs, 12, 5000);
    for (int i = 0; i < 12; i++) {
        char want[64];
        ref_text(rs[i], mt[i], want);
        assert_int_equal(rs[i]->choices[0].n_gen, mt[i]);
        assert_string_equal(rs[i]->choices[0].text, want);
        assert_string_equal(rs[i]->choices[0].finish, "length");
        sched_req_release(rs[i]);
    }
    sched_stats stt;
    sched_get_stats(s, &stt);
    assert_int_equal(stt.kv_used, 0);
    assert_int_equal(stt.running_seqs, 0);
    assert_int_equal(stt.waiting_seqs, 0);
    if (expect_preempt)
        assert_true(stt.preemptions > 0);
    uint64_t timed = 0; /* every forward step has its wall time in the histogram */
    for (int i = 0; i <= SCHED_STEP_BUCKETS; i++)
        timed += stt.step_hist[i];
    assert_true(stt.steps > 0);
    assert_int_equal(timed, stt.steps);
    assert_true(stt.step_s_sum > 0);
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);
}

static void test_batching_chunked(void **st)
{
    (void)st;
    check_many(4, 8, 256, false);
    check_many(16, 64, 256, false);
    check_many(1, 3, 256, false);
}

static void test_preemption(void **st)
{
    (void)st;
    /* 6 blocks = 96 tokens for up to 8 sequences of up to ~70 tokens: must preempt. */
    check_many(8, 32, 6, true);
}

static void test_stop_and_eog(void **st)
{
    (void)st;
    fake *f = fake_new(64);
    sched *s = mk(f, 4, 32, 64, 8, 4);
    char want[64];
    sched_req *probe = mkreq(0, 5, 3, 1, 20, NULL);
    ref_text(probe, 20, want);
    char stop[3] = {want[6], want[7], 0};
    sched_req *r = mkreq(0, 5, 3, 1, 20, stop);
    assert_int_equal(sched_submit(s, r), 0);
    run_until_done(s, &r, 1, 200);
    char *cut = strstr(want, stop);
    assert_non_null(cut);
    *cut = '\0';
    assert_string_equal(r->choices[0].text, want);
    assert_string_equal(r->choices[0].finish, "stop");
    sched_req_release(r);

    /* The reference's 4th token as EOG: 3 tokens of text, then "stop". */
    ref_text(probe, 20, want);
    int32_t t[64];
    int n = probe->n_prompt[0];
    memcpy(t, probe->prompt[0], (size_t)n * sizeof *t);
    for (int i = 0; i < 4; i++, n++)
        t[n] = ref_next(t, n);
    f->eog = t[n - 1];
    int first = 0;
    while (t[probe->n_prompt[0] + first] != f->eog)
        first++;
    r = mkreq(0, 5, 3, 1, 20, NULL);
    assert_int_equal(sched_submit(s, r), 0);
    run_until_done(s, &r, 1, 200);
    want[first] = '\0';
    assert_string_equal(r->choices[0].text, want);
    assert_string_equal(r->choices[0].finish, "stop");
    assert_int_equal(r->choices[0].n_gen, first + 1);
    sched_req_release(r);
    sched_req_release(probe);
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);
}

static void test_cancel_and_limits(void **st)
{
    (void)st;
    fake *f = fake_new(16);
    sched *s = mk(f, 2, 16, 16, 2, 4);
    sched_req *a = mkreq(0, 10, 1, 2, 100, NULL), *b = mkreq(0, 10, 2, 1, 100, NULL), *c = mkreq(0, 4, 3, 1, 4, NULL);
    assert_int_equal(sched_submit(s, a), 0);
    assert_int_equal(sched_submit(s, b), 0);
    assert_int_equal(sched_submit(s, c), HY_EBUSY); /* max_queue = 2 */
    for (int i = 0; i < 5; i++)
        sched_step(s);
    sched_stats stt;
    sched_get_stats(s, &stt);
    assert_true(stt.kv_used > 0);
    sched_req_cancel(a);
    sched_req_cancel(b);
    sched_step(s);
    sched_req_lock(a);
    assert_true(sched_req_finished(a));
    assert_string_equal(a->choices[0].finish, "cancelled");
    assert_string_equal(a->choices[1].finish, "cancelled");
    sched_req_unlock(a);
    assert_true(sched_req_finished(b));
    sched_get_stats(s, &stt);
    assert_int_equal(stt.kv_used, 0);
    assert_int_equal(sched_submit(s, c), 0);
    run_until_done(s, &c, 1, 100);
    sched_req_release(a);
    sched_req_release(b);
    sched_req_release(c);
    /* A prompt that cannot fit the cache (16 blocks = 256 tokens) or the context. */
    sched_req *big = mkreq(0, 300, 1, 1, 4, NULL);
    assert_int_equal(sched_submit(s, big), HY_ELIMIT);
    sched_req_release(big);
    sched_free(s);
    fake_free(f);
}

/* n > 1 and several adapters: choices are independent, adapters' tokens contiguous. */
static void test_adapters_and_n(void **st)
{
    (void)st;
    fake *f = fake_new(128);
    sched *s = mk(f, 8, 64, 128, 16, 4);
    sched_req *rs[3] = {mkreq(1, 9, 1, 3, 6, NULL), mkreq(0, 7, 2, 1, 6, NULL), mkreq(2, 12, 3, 2, 6, NULL)};
    for (int i = 0; i < 3; i++)
        assert_int_equal(sched_submit(s, rs[i]), 0);
    sched_step(s);
    sched_stats stt;
    sched_get_stats(s, &stt);
    assert_non_null(strstr(stt.running_adapters, "one"));
    assert_non_null(strstr(stt.running_adapters, "other"));
    run_until_done(s, rs, 3, 200);
    for (int i = 0; i < 3; i++) {
        char want[16];
        ref_text(rs[i], 6, want);
        for (int c = 0; c < rs[i]->n_choices; c++)
            assert_string_equal(rs[i]->choices[c].text, want);
        sched_req_release(rs[i]);
    }
    assert_int_equal(f->max_adapters_seen, 2);
    assert_int_equal(f->acquired[1], 0);
    assert_int_equal(f->acquired[2], 0);
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);
}

/* max_loras = 1: never two adapters in one batch; a burst of adapter 1 does not starve
 * adapter 2, which arrives last. */
static void test_fairness_max_loras(void **st)
{
    (void)st;
    fake *f = fake_new(256);
    sched *s = mk(f, 2, 32, 256, 64, 1);
    sched_req *rs[21];
    for (int i = 0; i < 20; i++) {
        rs[i] = mkreq(1, 6, i, 1, 8, NULL);
        assert_int_equal(sched_submit(s, rs[i]), 0);
    }
    rs[20] = mkreq(2, 6, 99, 1, 8, NULL);
    assert_int_equal(sched_submit(s, rs[20]), 0);
    run_until_done(s, rs, 21, 2000);
    assert_int_equal(f->max_adapters_seen, 1);
    /* Adapter 1 alone needs 10 rounds of 2 x 8 tokens; adapter 2 must start well before. */
    assert_true(f->first_step_of[2] > 0);
    assert_true(f->first_step_of[2] < 40);
    for (int i = 0; i < 21; i++)
        sched_req_release(rs[i]);
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);
}

/* max_loras = 1, adapter 1 busy, adapter 2 waiting for its slot: base-model requests that arrive
 * behind adapter 2 are admitted meanwhile (they need no slot), while adapter 1 gets no new
 * sequences so that its slot frees for adapter 2. */
static void test_no_slot_admits_base(void **st)
{
    (void)st;
    fake *f = fake_new(256);
    sched *s = mk(f, 6, 64, 256, 64, 1);
    sched_req *rs[13];
    int n = 0;
    for (int i = 0; i < 8; i++)
        rs[n++] = mkreq(1, 6, i, 1, 24, NULL);
    rs[n++] = mkreq(2, 6, 50, 1, 8, NULL);
    for (int i = 0; i < 4; i++)
        rs[n++] = mkreq(0, 6, 60 + i, 1, 8, NULL);
    for (int i = 0; i < n; i++)
        assert_int_equal(sched_submit(s, rs[i]), 0);
    run_until_done(s, rs, n, 4000);
    assert_int_equal(f->max_adapters_seen, 1);
    /* the base requests ran beside the first adapter-1 sequence (not after it), and adapter 2
     * started before the adapter-1 sequences that arrived before it */
    for (int i = 9; i < 13; i++)
        assert_true(rs[i]->t_first < rs[0]->t_done);
    assert_true(rs[8]->t_first < rs[7]->t_first);
    for (int i = 0; i < n; i++) {
        assert_false(rs[i]->failed);
        sched_req_release(rs[i]);
    }
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);
}

/* A sequence whose adapter never gets a device slot fails with 503 once it has waited
 * adapter_wait_s, with a message naming the cause; the others are served meanwhile. */
static void test_slot_wait_timeout(void **st)
{
    (void)st;
    fake *f = fake_new(64);
    f->no_slot[3] = true;
    g_adapter_wait = 0.2;
    sched *s = mk(f, 4, 32, 64, 16, 2);
    g_adapter_wait = 0;
    sched_req *rs[2] = {mkreq(3, 6, 1, 2, 4, NULL), mkreq(0, 6, 2, 1, 4, NULL)};
    for (int i = 0; i < 2; i++)
        assert_int_equal(sched_submit(s, rs[i]), 0);
    double t0 = hy_now();
    bool done = false;
    while (!done && hy_now() - t0 < 5.0) {
        assert_true(sched_step(s) >= 0);
        usleep(10000);
        sched_req_lock(rs[0]);
        done = sched_req_finished(rs[0]);
        sched_req_unlock(rs[0]);
    }
    double waited = hy_now() - t0;
    assert_true(done);
    assert_true(waited >= 0.2 && waited < 2.0);
    assert_true(rs[0]->failed);
    assert_int_equal(rs[0]->fail_status, 503);
    assert_non_null(strstr(rs[0]->error, "no device slot"));
    run_until_done(s, &rs[1], 1, 200);
    assert_false(rs[1]->failed);
    assert_int_equal(rs[1]->choices[0].n_gen, 4);
    for (int i = 0; i < 2; i++)
        sched_req_release(rs[i]);
    assert_int_equal(f->acquired[3], 0);
    sched_free(s);
    fake_free(f);
}

static pthread_mutex_t nmu = PTHREAD_MUTEX_INITIALIZER;
static int notified;
static void on_notify(void *ctx)
{
    pthread_mutex_lock(&nmu);
    notified++;
    pthread_mutex_unlock(&nmu);
}

/* Every prompt logprob of r (prompt 0) equals the log-softmax of the fake's logits for the
 * prefix before it, with `top` alternatives, most likely first. */
static void check_prompt_lp(const sched_req *r, int top)
{
    int n = r->n_prompt[0];
    const int32_t *t = r->prompt[0];
    assert_non_null(r->plp);
    assert_int_equal(r->n_plp[0], n);
    assert_int_equal(r->plp[0][0].token, t[0]);
    for (int i = 1; i < n; i++) {
        float lg[V];
        fake_logits(t, i, lg);
        double mx = lg[0], sum = 0;
        for (int v = 1; v < V; v++)
            mx = lg[v] > mx ? lg[v] : mx;
        for (int v = 0; v < V; v++)
            sum += exp((double)lg[v] - mx);
        const sched_sample *x = &r->plp[0][i];
        assert_int_equal(x->token, t[i]);
        assert_true(fabs(x->logprob - ((double)lg[t[i]] - mx - log(sum))) < 1e-5);
        assert_int_equal(x->n_top, top);
        if (top > 0) {
            assert_int_equal(x->top_id[0], ref_next(t, i));
            assert_true(fabs(x->top_lp[0] - (1.0 - mx - log(sum))) < 1e-5);
        }
        for (int k = 1; k < top; k++)
            assert_true(x->top_lp[k] <= x->top_lp[k - 1]);
    }
}

/* Prompt logprobs (echo scoring): computed at every prompt position in chunks of at most
 * SCHED_LP_ROWS rows per step, once per prompt whatever n, across preemption by recompute, next
 * to ordinary requests; max_tokens 0 scores without generating. */
static void test_prompt_logprobs(void **st)
{
    (void)st;
    /* long prompt, small token budget, n = 2, generation after scoring */
    fake *f = fake_new(256);
    sched *s = mk(f, 8, 40, 256, 16, 4);
    sched_req *a = mkreq(0, 300, 5, 2, 4, NULL), *b = mkreq(0, 200, 6, 1, 0, NULL), *c = mkreq(0, 50, 7, 1, 6, NULL);
    assert_int_equal(sched_req_want_prompt_lp(a, 3), 0);
    assert_int_equal(sched_req_want_prompt_lp(b, 0), 0);
    assert_int_equal(sched_req_want_prompt_lp(b, 1), HY_EINVAL); /* once */
    sched_req *rs[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        assert_int_equal(sched_submit(s, rs[i]), 0);
    run_until_done(s, rs, 3, 2000);
    char want[64];
    check_prompt_lp(a, 3);
    check_prompt_lp(b, 0);
    assert_null(c->plp);
    ref_text(a, 4, want);
    for (int j = 0; j < 2; j++) {
        assert_string_equal(a->choices[j].text, want);
        assert_int_equal(a->choices[j].n_gen, 4);
    }
    assert_int_equal(b->choices[0].n_gen, 0);
    assert_string_equal(b->choices[0].finish, "length");
    ref_text(c, 6, want);
    assert_string_equal(c->choices[0].text, want);
    assert_int_equal(f->errors, 0);
    for (int i = 0; i < 3; i++)
        sched_req_release(rs[i]);
    sched_free(s);
    fake_free(f);

    /* a cache too small for all: scoring sequences are preempted and recomputed */
    f = fake_new(10);
    s = mk(f, 6, 64, 10, 16, 4);
    sched_req *p[6];
    for (int i = 0; i < 6; i++) {
        p[i] = mkreq(0, 40 + i * 13, 20 + i, 1, i % 2 ? 0 : 30, NULL);
        assert_int_equal(sched_req_want_prompt_lp(p[i], 2), 0);
        assert_int_equal(sched_submit(s, p[i]), 0);
    }
    run_until_done(s, p, 6, 5000);
    sched_stats stt;
    sched_get_stats(s, &stt);
    assert_true(stt.preemptions > 0);
    assert_int_equal(stt.kv_used, 0);
    for (int i = 0; i < 6; i++) {
        check_prompt_lp(p[i], 2);
        ref_text(p[i], i % 2 ? 0 : 30, want);
        assert_string_equal(p[i]->choices[0].text ? p[i]->choices[0].text : "", want);
        sched_req_release(p[i]);
    }
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);

    /* max_tokens 0 with nothing to score never reaches the model */
    f = fake_new(16);
    s = mk(f, 2, 16, 16, 4, 1);
    sched_req *z = mkreq(0, 9, 1, 3, 0, NULL), *one = mkreq(0, 1, 1, 1, 0, NULL);
    assert_int_equal(sched_req_want_prompt_lp(one, 1), 0);
    rs[0] = z;
    rs[1] = one;
    for (int i = 0; i < 2; i++)
        assert_int_equal(sched_submit(s, rs[i]), 0);
    run_until_done(s, rs, 2, 10);
    assert_int_equal(f->steps, 0);
    for (int j = 0; j < 3; j++)
        assert_string_equal(z->choices[j].finish, "length");
    assert_int_equal(one->n_plp[0], 1);
    sched_req_release(z);
    sched_req_release(one);
    sched_free(s);
    fake_free(f);
}

/* A request on adapter `ad` (0 = base) whose prompt is system prompt `sys` (0..2) then a question
 * of q_len tokens drawn from seed. */
static sched_req *mkshared(int ad, int sys, int q_len, int seed, int n, int max_tokens, uint64_t salt)
{
    static const int sys_len[3] = {40, 48, 17}; /* 2.5 blocks, exactly 3, one block + 1 */
    int32_t p[200];
    int np = 0;
    p[np++] = ad;
    for (int i = 1; i < sys_len[sys]; i++)
        p[np++] = (sys * 17 + i * 5) % V;
    for (int i = 0; i < q_len; i++)
        p[np++] = (seed * 29 + i * 11 + 3) % V;
    const int32_t *pp = p;
    sched_sampling sp = {0};
    sched_req *r = NULL;
    assert_int_equal(sched_req_create(1, &pp, &np, n, max_tokens, NULL, 0, false, &sp, (void *)(intptr_t)ad, &r), 0);
    r->cache_salt = salt;
    return r;
}

/* Prefix caching: outputs equal the reference (the fake reads every token's K/V back through the
 * block tables, so a wrong shared block shows), with n > 1, adapters and salts kept apart, under
 * preemption and eviction, and every block accounted for afterwards. */
static void check_prefix_run(int n_blocks, int max_seqs, int max_batch, bool expect_preempt)
{
    fake *f = fake_new(n_blocks);
    g_prefix_cache = true;
    sched *s = mk(f, max_seqs, max_batch, n_blocks, 64, 4);
    g_prefix_cache = false;
    enum { N = 24 };
    sched_req *rs[N];
    int mt[N];
    for (int i = 0; i < N; i++) {
        mt[i] = 4 + (i * 5) % 13;
        /* questions of 0..9 tokens: some prompts end exactly on a block boundary (48 + 0) */
        rs[i] = mkshared(i % 3, (i / 3) % 3, (i * 7) % 10, i, i % 5 == 0 ? 3 : 1, mt[i], i % 4 == 3 ? 77 : 0);
        assert_int_equal(sched_submit(s, rs[i]), 0);
    }
    run_until_done(s, rs, N, 20000);
    uint64_t hits = 0;
    for (int i = 0; i < N; i++) {
        char want[64];
        ref_text(rs[i], mt[i], want);
        for (int j = 0; j < rs[i]->n_choices; j++) {
            assert_string_equal(rs[i]->choices[j].text, want);
            assert_int_equal(rs[i]->choices[j].n_gen, mt[i]);
        }
        hits += (uint64_t)rs[i]->n_cached_tokens;
        if (rs[i]->n > 1) /* the later samples found the first one's prompt blocks */
            assert_true(rs[i]->n_cached_tokens >= 2 * ((rs[i]->n_prompt[0] - 1) / BE_KV_BLOCK) * BE_KV_BLOCK);
        sched_req_release(rs[i]);
    }
    sched_stats stt;
    sched_get_stats(s, &stt);
    assert_true(hits > 0);
    assert_int_equal(stt.prefix_hits, hits);
    assert_true(stt.prefix_queries > stt.prefix_hits);
    assert_int_equal(stt.kv_used, 0);
    assert_true(stt.kv_cached > 0);
    if (expect_preempt)
        assert_true(stt.preemptions > 0);
    assert_int_equal(f->errors, 0);
    sched_free(s);
    fake_free(f);
}

static void test_prefix_cache(void **st)
{
    (void)st;
    check_prefix_run(256, 8, 64, false);
    check_prefix_run(256, 16, 16, false);
    check_prefix_run(14, 6, 32, true); /* eviction and preemption: 14 blocks for up to 6 of ~5 */
}

static void test_thread(void **st)
{
    (void)st;
    fake *f = fake_new(64);
    sched *s = mk(f, 4, 32, 64, 8, 4);
    assert_int_equal(sched_start(s), 0);
    sched_req *r = mkreq(0, 8, 5, 1, 10, NULL);
    r->notify = on_notify;
    assert_int_equal(sched_submit(s, r), 0);
    bool done = false;
    for (int i = 0; i < 2000 && !done; i++) {
        sched_req_lock(r);
        done = sched_req_finished(r);
        sched_req_unlock(r);
        if (!done)
            usleep(1000);
    }
    assert_true(done);
    char want[16];
    ref_text(r, 10, want);
    assert_string_equal(r->choices[0].text, want);
    pthread_mutex_lock(&nmu);
    assert_true(notified >= 1);
    pthread_mutex_unlock(&nmu);
    /* Stop with a long request in flight: it ends "cancelled" and submit is refused after. */
    sched_req *l = mkreq(0, 8, 6, 1, 400, NULL);
    assert_int_equal(sched_submit(s, l), 0);
    sched_stop(s);
    assert_true(sched_req_finished(l));
    assert_int_equal(sched_submit(s, r), HY_ECANCELED);
    sched_req_release(l);
    sched_req_release(r);
    sched_free(s);
    fake_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_alloc),         cmocka_unit_test(test_max_tokens_huge),
        cmocka_unit_test(test_batching_chunked),
        cmocka_unit_test(test_preemption),       cmocka_unit_test(test_stop_and_eog),
        cmocka_unit_test(test_cancel_and_limits), cmocka_unit_test(test_adapters_and_n),
        cmocka_unit_test(test_fairness_max_loras), cmocka_unit_test(test_slot_wait_timeout),
        cmocka_unit_test(test_no_slot_admits_base), cmocka_unit_test(test_thread),
        cmocka_unit_test(test_prompt_logprobs), cmocka_unit_test(test_prefix_cache),
        cmocka_unit_test(test_speculative_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
