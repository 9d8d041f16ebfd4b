/* kv_alloc.c - free-list allocator of paged KV blocks (see kv_alloc.h). No sequence logic. */
#include "engine/kv_alloc.h"
#include "engine/backend.h"
#include "engine/hy.h"

#include <stdlib.h>
#include <string.h>

int kv_alloc_init(kv_alloc *a, int n_blocks)
{
    memset(a, 0, sizeof *a);
    if (n_blocks <= 0)
        return hy_err_set(HY_EINVAL, "KV cache needs at least one block (got %d)", n_blocks);
    a->free_ids = malloc((size_t)n_blocks * sizeof *a->free_ids);
    a->used = calloc((size_t)n_blocks, 1);
    if (!a->free_ids || !a->used) {
        kv_alloc_clear(a);
        return hy_err_set(HY_ENOMEM, "out of memory for %d KV block ids", n_blocks);
    }
    a->n_blocks = a->n_free = n_blocks;
    /* Low ids come out first: keeps the cache compact and tests predictable. */
    for (int i = 0; i < n_blocks; i++)
        a->free_ids[i] = n_blocks - 1 - i;
    return HY_OK;
}

void kv_alloc_clear(kv_alloc *a)
{
    free(a->free_ids);
    free(a->used);
    memset(a, 0, sizeof *a);
}

int kv_alloc_get(kv_alloc *a, int32_t *id)
{
    if (a->n_free == 0)
        return HY_EBUSY;
    *id = a->free_ids[--a->n_free];
    a->used[*id] = 1;
    return HY_OK;
}

int kv_alloc_put(kv_alloc *a, int32_t id)
{
    if (id < 0 || id >= a->n_blocks || !a->used[id])
        return hy_err_set(HY_EINVAL, "KV block %d is not allocated", (int)id);
    a->used[id] = 0;
    a->free_ids[a->n_free++] = id;
    return HY_OK;
}

int kv_blocks_for(int n_tokens)
{
    return n_tokens <= 0 ? 0 : (n_tokens + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
}
