/* kv_prefix.h - the KV block manager with automatic prefix caching: blocks are reference
 * counted (sequences share a cached prefix), every full block whose K/V are computed can be
 * entered in a hash table keyed by (its parent block, its BE_KV_BLOCK token ids, the key), and a
 * cached block nobody holds stays on an LRU list until an allocation needs it.
 *
 * The key is what, besides the tokens, decides a block's K/V: the adapter's load generation (a new
 * value on every load, so weights loaded again under the same name never match old blocks), the
 * request's router controls, and the cache salt (tenant). Matching never trusts the hash: a
 * candidate must have equal tokens, an equal key and the very parent block the match has reached
 * (block id and the version it was cached under), so a hash collision can cost a miss, never
 * return wrong K/V. Engine thread only (no locking). */
#ifndef HY_KV_PREFIX_H
#define HY_KV_PREFIX_H

#include "engine/kv_alloc.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    uint64_t adapter; /* adapter load generation (0: base model) */
    uint64_t salt;    /* hash of the cache salt, router controls, tenant (0: none) */
} kv_key;

typedef struct {
    kv_alloc a;          /* blocks nobody holds and nobody cached */
    bool on;             /* false: nothing is ever cached (kv_prefix_commit does nothing) */
    int n_blocks;
    int32_t *ref;        /* [n_blocks] sequences holding the block */
    uint64_t *ver;       /* [n_blocks] version it was cached under; 0 = not cached */
    uint64_t *hash;      /* [n_blocks] chain hash (valid while cached) */
    int32_t *parent;     /* [n_blocks] parent block id, -1 for a first block */
    uint64_t *parent_ver;
    kv_key *key;
    int32_t *toks;       /* [n_blocks][BE_KV_BLOCK] */
    int32_t *bucket;     /* [mask + 1] first block of each hash bucket, -1 = empty */
    int32_t *bnext;      /* [n_blocks] next block in the bucket */
    uint32_t mask;
    int32_t *lru_prev, *lru_next; /* cached blocks with ref 0, oldest first */
    int32_t lru_head, lru_tail;
    int n_lru, n_cached; /* cached blocks with ref 0; cached blocks in all */
    uint64_t next_ver;
    uint64_t evictions;  /* cached blocks reused for something else */
} kv_prefix;

/* A matched or committed position in a chain of cached blocks. */
typedef struct {
    int32_t id;   /* -1: the start (no block yet) */
    uint64_t ver;
    uint64_t hash;
} kv_link;

int kv_prefix_init(kv_prefix *p, int n_blocks, bool on);
void kv_prefix_clear(kv_prefix *p);

/* One block with a reference: a free one, else the least recently used cached block (which
 * leaves the cache). HY_EBUSY when every block is held. */
int kv_prefix_get(kv_prefix *p, int32_t *id);
/* Drop a reference. A block nobody holds goes to the LRU list if cached, else back to free. */
void kv_prefix_put(kv_prefix *p, int32_t id);
/* Blocks an allocation can get now: free + cached ones nobody holds. */
static inline int kv_prefix_available(const kv_prefix *p) { return p->a.n_free + p->n_lru; }
/* Held by at least one sequence (the rest are free or cached). */
static inline int kv_prefix_held(const kv_prefix *p) { return p->n_blocks - p->a.n_free - p->n_lru; }

/* The start of a chain. */
static inline kv_link kv_link_start(void) { return (kv_link){-1, 0, 0x9e3779b97f4a7c15ull}; }

/* Match up to max_blocks full blocks of toks[0 .. max_blocks * BE_KV_BLOCK) from the start of a
 * chain: their ids go to out[] with a reference taken on each, *end is the last link. Returns how
 * many matched (0 with the cache off). */
int kv_prefix_match(kv_prefix *p, kv_key key, const int32_t *toks, int max_blocks, int32_t *out, kv_link *end);

/* Block id now holds the K/V of toks[0..BE_KV_BLOCK) after *at (the chain so far). Enters it in
 * the cache unless the same content is cached already (then that block stands for it); *at moves
 * on to the block that represents this content either way. */
void kv_prefix_commit(kv_prefix *p, kv_key key, int32_t id, const int32_t *toks, kv_link *at);

#endif
