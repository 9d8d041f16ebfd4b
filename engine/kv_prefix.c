/* kv_prefix.c - reference-counted KV blocks with a prefix cache (see kv_prefix.h). */
#include "engine/kv_prefix.h"
#include "engine/backend.h"
#include "engine/hy.h"

#include <stdlib.h>
#include <string.h>

/* 64-bit mixing (the finaliser of MurmurHash3): every input bit moves every output bit. */
static uint64_t fmix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static uint64_t chain_hash(uint64_t parent, kv_key key, const int32_t *toks)
{
    uint64_t h = fmix(parent ^ 0x2545f4914f6cdd1dull);
    h = fmix(h ^ key.adapter) + 0x9e3779b97f4a7c15ull;
    h = fmix(h ^ key.salt);
    for (int i = 0; i < BE_KV_BLOCK; i++)
        h = fmix(h ^ ((uint64_t)(uint32_t)toks[i] * 0x100000001b3ull + (uint64_t)i));
    return h;
}

int kv_prefix_init(kv_prefix *p, int n_blocks, bool on)
{
    memset(p, 0, sizeof *p);
    int rc = kv_alloc_init(&p->a, n_blocks);
    if (rc)
        return rc;
    p->on = on;
    p->n_blocks = n_blocks;
    uint32_t nb = 16;
    while (nb < (uint32_t)n_blocks && nb < (1u << 30))
        nb <<= 1;
    p->mask = nb - 1;
    size_t n = (size_t)n_blocks;
    p->ref = calloc(n, sizeof *p->ref);
    p->ver = calloc(n, sizeof *p->ver);
    p->hash = calloc(n, sizeof *p->hash);
    p->parent = calloc(n, sizeof *p->parent);
    p->parent_ver = calloc(n, sizeof *p->parent_ver);
    p->key = calloc(n, sizeof *p->key);
    p->toks = on ? calloc(n * BE_KV_BLOCK, sizeof *p->toks) : NULL;
    p->bucket = malloc(((size_t)p->mask + 1) * sizeof *p->bucket);
    p->bnext = calloc(n, sizeof *p->bnext);
    p->lru_prev = calloc(n, sizeof *p->lru_prev);
    p->lru_next = calloc(n, sizeof *p->lru_next);
    if (!p->ref || !p->ver || !p->hash || !p->parent || !p->parent_ver || !p->key || (on && !p->toks) ||
        !p->bucket || !p->bnext || !p->lru_prev || !p->lru_next) {
        kv_prefix_clear(p);
        return hy_err_set(HY_ENOMEM, "out of memory for the prefix cache of %d blocks", n_blocks);
    }
    for (uint32_t i = 0; i <= p->mask; i++)
        p->bucket[i] = -1;
    p->lru_head = p->lru_tail = -1;
    p->next_ver = 1;
    return HY_OK;
}

void kv_prefix_clear(kv_prefix *p)
{
    kv_alloc_clear(&p->a);
    free(p->ref);
    free(p->ver);
    free(p->hash);
    free(p->parent);
    free(p->parent_ver);
    free(p->key);
    free(p->toks);
    free(p->bucket);
    free(p->bnext);
    free(p->lru_prev);
    free(p->lru_next);
    memset(p, 0, sizeof *p);
}

static void lru_unlink(kv_prefix *p, int32_t id)
{
    int32_t a = p->lru_prev[id], b = p->lru_next[id];
    if (a >= 0)
        p->lru_next[a] = b;
    else
        p->lru_head = b;
    if (b >= 0)
        p->lru_prev[b] = a;
    else
        p->lru_tail = a;
    p->n_lru--;
}

static void lru_push(kv_prefix *p, int32_t id)
{
    p->lru_prev[id] = p->lru_tail;
    p->lru_next[id] = -1;
    if (p->lru_tail >= 0)
        p->lru_next[p->lru_tail] = id;
    else
        p->lru_head = id;
    p->lru_tail = id;
    p->n_lru++;
}

/* Take id out of the hash table (it stops being cached). */
static void uncache(kv_prefix *p, int32_t id)
{
    int32_t *at = &p->bucket[p->hash[id] & p->mask];
    while (*at != id)
        at = &p->bnext[*at];
    *at = p->bnext[id];
    p->ver[id] = 0;
    p->n_cached--;
}

int kv_prefix_get(kv_prefix *p, int32_t *id)
{
    if (kv_alloc_get(&p->a, id) == HY_OK) {
        p->ref[*id] = 1;
        return HY_OK;
    }
    if (p->n_lru == 0)
        return HY_EBUSY;
    *id = p->lru_head;
    lru_unlink(p, *id);
    uncache(p, *id);
    p->evictions++;
    p->ref[*id] = 1;
    return HY_OK;
}

void kv_prefix_put(kv_prefix *p, int32_t id)
{
    if (id < 0 || id >= p->n_blocks || p->ref[id] <= 0)
        return;
    if (--p->ref[id] > 0)
        return;
    if (p->ver[id])
        lru_push(p, id);
    else
        kv_alloc_put(&p->a, id);
}

/* The cached block holding toks after `at` under key, or -1. */
static int32_t find(const kv_prefix *p, kv_key key, const int32_t *toks, const kv_link *at, uint64_t h)
{
    for (int32_t c = p->bucket[h & p->mask]; c >= 0; c = p->bnext[c])
        if (p->hash[c] == h && p->parent[c] == at->id && p->parent_ver[c] == at->ver &&
            p->key[c].adapter == key.adapter && p->key[c].salt == key.salt &&
            memcmp(p->toks + (size_t)c * BE_KV_BLOCK, toks, BE_KV_BLOCK * sizeof *toks) == 0)
            return c;
    return -1;
}

int kv_prefix_match(kv_prefix *p, kv_key key, const int32_t *toks, int max_blocks, int32_t *out, kv_link *end)
{
    kv_link at = kv_link_start();
    int n = 0;
    while (p->on && n < max_blocks) {
        const int32_t *t = toks + (size_t)n * BE_KV_BLOCK;
        uint64_t h = chain_hash(at.hash, key, t);
        int32_t c = find(p, key, t, &at, h);
        if (c < 0)
            break;
        if (p->ref[c]++ == 0)
            lru_unlink(p, c);
        out[n++] = c;
        at = (kv_link){c, p->ver[c], h};
    }
    *end = at;
    return n;
}

void kv_prefix_commit(kv_prefix *p, kv_key key, int32_t id, const int32_t *toks, kv_link *at)
{
    if (!p->on)
        return;
    uint64_t h = chain_hash(at->hash, key, toks);
    int32_t c = find(p, key, toks, at, h);
    if (c < 0 && !p->ver[id]) { /* new content: id becomes its block */
        c = id;
        p->ver[c] = p->next_ver++;
        p->hash[c] = h;
        p->parent[c] = at->id;
        p->parent_ver[c] = at->ver;
        p->key[c] = key;
        memcpy(p->toks + (size_t)c * BE_KV_BLOCK, toks, BE_KV_BLOCK * sizeof *toks);
        uint32_t b = (uint32_t)(h & p->mask);
        p->bnext[c] = p->bucket[b];
        p->bucket[b] = c;
        p->n_cached++;
    }
    if (c < 0) { /* id is cached as something else: cannot happen; end the chain here */
        *at = (kv_link){-2, 0, h};
        return;
    }
    *at = (kv_link){c, p->ver[c], h};
}
