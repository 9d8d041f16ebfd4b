/* test_kv_prefix.c - the prefix-cache block manager alone: chain matching (tokens, key and
 * parent all checked), commits of duplicate content, reference counts, the LRU order of
 * eviction (tails before heads), accounting (free + cached + held = total), the cache off. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "engine/backend.h"
#include "engine/hy.h"
#include "engine/kv_prefix.h"

#define B BE_KV_BLOCK

static void fill(int32_t *t, int n, int seed)
{
    for (int i = 0; i < n; i++)
        t[i] = (seed * 7919 + i * 31) % 1000;
}

static void check_accounting(const kv_prefix *p)
{
    int held = 0, cached_free = 0;
    for (int i = 0; i < p->n_blocks; i++) {
        held += p->ref[i] > 0;
        cached_free += p->ref[i] == 0 && p->ver[i] != 0;
    }
    assert_int_equal(held, kv_prefix_held(p));
    assert_int_equal(cached_free, p->n_lru);
    assert_int_equal(p->a.n_free + p->n_lru + held, p->n_blocks);
}

/* Prefill n_blk blocks of toks under key as a sequence would: get, commit in order. */
static void run_seq(kv_prefix *p, kv_key key, const int32_t *toks, int n_blk, int32_t *ids)
{
    kv_link at = kv_link_start();
    for (int i = 0; i < n_blk; i++) {
        assert_int_equal(kv_prefix_get(p, &ids[i]), HY_OK);
        kv_prefix_commit(p, key, ids[i], toks + i * B, &at);
    }
}

static void put_all(kv_prefix *p, const int32_t *ids, int n)
{
    for (int i = n - 1; i >= 0; i--)
        kv_prefix_put(p, ids[i]);
}

static void test_match_and_keys(void **st)
{
    (void)st;
    kv_prefix p;
    assert_int_equal(kv_prefix_init(&p, 32, true), HY_OK);
    int32_t t[8 * B], ids[8], got[8];
    fill(t, 8 * B, 1);
    kv_key k = {7, 0}, k_ad = {8, 0}, k_salt = {7, 99};
    run_seq(&p, k, t, 4, ids);
    check_accounting(&p);
    /* the same tokens under the same key match, while held by the first sequence too */
    kv_link end;
    assert_int_equal(kv_prefix_match(&p, k, t, 8, got, &end), 4);
    assert_memory_equal(got, ids, sizeof ids[0] * 4);
    assert_int_equal(p.ref[ids[0]], 2);
    put_all(&p, got, 4);
    /* another adapter load or another salt: nothing */
    assert_int_equal(kv_prefix_match(&p, k_ad, t, 8, got, &end), 0);
    assert_int_equal(kv_prefix_match(&p, k_salt, t, 8, got, &end), 0);
    /* a change in block 2 stops the match there; a change in block 0 matches nothing */
    int32_t u[8 * B];
    memcpy(u, t, sizeof u);
    u[2 * B + 5] ^= 1;
    assert_int_equal(kv_prefix_match(&p, k, u, 8, got, &end), 2);
    put_all(&p, got, 2);
    u[3] ^= 1;
    assert_int_equal(kv_prefix_match(&p, k, u, 8, got, &end), 0);
    /* block 1's tokens after a different block 0 are a different chain (parent checked) */
    memcpy(u, t, sizeof u);
    u[0] ^= 1;
    int32_t ids2[4];
    run_seq(&p, k, u, 2, ids2);
    assert_int_not_equal(ids2[1], ids[1]);
    assert_int_equal(p.n_cached, 6);
    /* max_blocks bounds the match */
    assert_int_equal(kv_prefix_match(&p, k, t, 3, got, &end), 3);
    put_all(&p, got, 3);
    put_all(&p, ids, 4);
    put_all(&p, ids2, 2);
    check_accounting(&p);
    assert_int_equal(kv_prefix_held(&p), 0);
    assert_int_equal(p.n_lru, 6);
    kv_prefix_clear(&p);
}

static void test_duplicate_commit(void **st)
{
    (void)st;
    kv_prefix p;
    assert_int_equal(kv_prefix_init(&p, 16, true), HY_OK);
    int32_t t[3 * B], a[3], b[3];
    fill(t, 3 * B, 2);
    kv_key k = {0, 0};
    /* two sequences prefill the same prompt at once: the second's blocks stay uncached */
    run_seq(&p, k, t, 3, a);
    run_seq(&p, k, t, 3, b);
    assert_int_equal(p.n_cached, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(p.ver[b[i]], 0);
    put_all(&p, b, 3); /* back to free, not to the LRU */
    assert_int_equal(p.n_lru, 0);
    assert_int_equal(p.a.n_free, 16 - 3);
    put_all(&p, a, 3);
    assert_int_equal(p.n_lru, 3);
    check_accounting(&p);
    kv_prefix_clear(&p);
}

static void test_lru_eviction(void **st)
{
    (void)st;
    kv_prefix p;
    assert_int_equal(kv_prefix_init(&p, 6, true), HY_OK);
    int32_t t1[3 * B], t2[3 * B], a[3], b[3], c[6], got[3];
    fill(t1, 3 * B, 3);
    fill(t2, 3 * B, 4);
    kv_key k = {1, 2};
    run_seq(&p, k, t1, 3, a);
    put_all(&p, a, 3); /* tail first */
    run_seq(&p, k, t2, 3, b);
    put_all(&p, b, 3);
    assert_int_equal(p.n_lru, 6);
    assert_int_equal(kv_prefix_available(&p), 6);
    /* touching t1 makes t2 the older chain */
    kv_link end;
    assert_int_equal(kv_prefix_match(&p, k, t1, 3, got, &end), 3);
    put_all(&p, got, 3);
    /* two allocations take t2's tail blocks first (2, then 1), never its head before its tail */
    assert_int_equal(kv_prefix_get(&p, &c[0]), HY_OK);
    assert_int_equal(kv_prefix_get(&p, &c[1]), HY_OK);
    assert_int_equal(c[0], b[2]);
    assert_int_equal(c[1], b[1]);
    assert_int_equal(p.evictions, 2);
    assert_int_equal(kv_prefix_match(&p, k, t2, 3, got, &end), 1);
    put_all(&p, got, 1);
    assert_int_equal(kv_prefix_match(&p, k, t1, 3, got, &end), 3);
    /* held blocks are never evicted: 3 held by the match, 2 by c, one left */
    assert_int_equal(kv_prefix_get(&p, &c[2]), HY_OK);
    assert_int_equal(kv_prefix_get(&p, &c[3]), HY_EBUSY);
    check_accounting(&p);
    put_all(&p, got, 3);
    put_all(&p, c, 3);
    check_accounting(&p);
    /* a reused id that was a parent: its old children can never match through it */
    assert_int_equal(kv_prefix_match(&p, k, t2, 3, got, &end), 0);
    kv_prefix_put(&p, -1); /* ignored */
    kv_prefix_put(&p, 99);
    kv_prefix_clear(&p);
}

static void test_off(void **st)
{
    (void)st;
    kv_prefix p;
    assert_int_equal(kv_prefix_init(&p, 4, false), HY_OK);
    int32_t t[2 * B], a[2], got[2];
    fill(t, 2 * B, 5);
    kv_key k = {0, 0};
    run_seq(&p, k, t, 2, a);
    kv_link end;
    assert_int_equal(kv_prefix_match(&p, k, t, 2, got, &end), 0);
    put_all(&p, a, 2);
    assert_int_equal(p.a.n_free, 4);
    assert_int_equal(p.n_lru, 0);
    kv_prefix_clear(&p);
    assert_int_equal(kv_prefix_init(&p, 0, true), HY_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_match_and_keys),
        cmocka_unit_test(test_duplicate_commit),
        cmocka_unit_test(test_lru_eviction),
        cmocka_unit_test(test_off),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
