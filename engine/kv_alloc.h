/* kv_alloc.h - the paged KV cache's block allocator: hands out block ids 0..n_blocks-1 of
 * BE_KV_BLOCK tokens each. Engine thread only (no locking); it knows nothing of sequences. */
#ifndef HY_KV_ALLOC_H
#define HY_KV_ALLOC_H

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    int n_blocks;
    int n_free;
    int32_t *free_ids; /* stack of free ids, owned */
    uint8_t *used;     /* used[id] = 1 while handed out, owned (catches double frees) */
} kv_alloc;

/* All blocks start free. Returns 0 or HY_ENOMEM/HY_EINVAL. Release with kv_alloc_clear. */
int kv_alloc_init(kv_alloc *a, int n_blocks);
void kv_alloc_clear(kv_alloc *a);
/* Take one block: 0 and *id, or HY_EBUSY when none is free. */
int kv_alloc_get(kv_alloc *a, int32_t *id);
/* Return a block; HY_EINVAL (and no change) for an id out of range or not handed out. */
int kv_alloc_put(kv_alloc *a, int32_t id);
static inline int kv_alloc_free_count(const kv_alloc *a) { return a->n_free; }
/* Blocks needed to hold n_tokens tokens. */
int kv_blocks_for(int n_tokens);

#endif
