/* tok_spm.c - SentencePiece-style encoding for tokenizer.ggml.model == "llama": spaces become
 * U+2581, characters merge pairwise by the best vocabulary score (SentencePiece BPE), and a
 * character outside the vocabulary falls back to its <0xXX> byte tokens. No special tokens here. */
#include "tok_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    uint32_t off, len;  /* into the normalised text; len 0: merged into the left neighbour */
    int32_t prev, next;
} ssym;

typedef struct {
    float score;
    int32_t left, right;
    uint32_t len;       /* bytes of the merged piece when queued: detects stale candidates */
    int32_t id;
} scand;

typedef struct {
    const tok_vocab *v;
    const char *s;      /* normalised text */
    ssym *sym;
    scand *heap;
    int nheap;
} spm_ctx;

/* Pieces that encoding may produce from text: control, byte and unused tokens are not text. */
static int32_t spm_lookup(const tok_vocab *v, const char *s, size_t n)
{
    int32_t id = tok_lookup(v, s, n);
    if (id < 0)
        return -1;
    uint8_t t = v->type[id];
    return (t == TOK_TYPE_CONTROL || t == TOK_TYPE_BYTE || t == TOK_TYPE_UNUSED) ? -1 : id;
}

/* Higher score first; on a tie the leftmost pair. */
static bool cand_first(const void *a, const void *b)
{
    const scand *x = a, *y = b;
    return x->score > y->score || (x->score == y->score && x->left < y->left);
}

static void try_pair(spm_ctx *c, int32_t left)
{
    if (left < 0)
        return;
    int32_t right = c->sym[left].next;
    if (right < 0)
        return;
    /* symbols are contiguous in the text, so the pair is one slice of it */
    uint32_t len = c->sym[left].len + c->sym[right].len;
    int32_t id = spm_lookup(c->v, c->s + c->sym[left].off, len);
    if (id < 0)
        return;
    scand x = {c->v->score[id], left, right, len, id};
    tok_heap_push(c->heap, &c->nheap, sizeof x, &x, cand_first);
}

static int emit_symbol(const tok_vocab *v, const char *p, size_t n, tok_ids *out)
{
    int32_t id = spm_lookup(v, p, n);
    if (id >= 0)
        return tok_ids_push(out, id);
    for (size_t i = 0; i < n; i++) {
        int32_t b = v->byte_tok[(unsigned char)p[i]];
        if (b < 0)
            b = v->unk;
        if (b < 0)
            continue; /* neither a byte token nor <unk>: the byte cannot be represented */
        int rc = tok_ids_push(out, b);
        if (rc)
            return rc;
    }
    return 0;
}

int tok_spm_encode(const tok_vocab *v, const char *s, size_t len, tok_ids *out)
{
    spm_ctx c = {.v = v};
    char *norm = NULL;
    int rc = 0;
    /* each byte grows to at most 3 (space -> U+2581), plus the prefix */
    size_t cap;
    if (hy_mul_size(len, 3, &cap) || hy_add_size(cap, 3, &cap) || cap > (size_t)INT32_MAX)
        return hy_err_set(HY_ELIMIT, "text of %zu bytes is too long to tokenise", len);
    norm = malloc(cap);
    c.sym = malloc((cap + 1) * sizeof *c.sym);
    c.heap = malloc((cap + 1) * 3 * sizeof *c.heap); /* n-1 pairs + 2 per merge */
    if (!norm || !c.sym || !c.heap) {
        rc = hy_err_set(HY_ENOMEM, "out of memory tokenising %zu bytes", len);
        goto done;
    }
    size_t m = 0;
    if (v->add_space_prefix) {
        memcpy(norm, "\xE2\x96\x81", 3);
        m = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] == ' ') {
            memcpy(norm + m, "\xE2\x96\x81", 3);
            m += 3;
        } else {
            norm[m++] = s[i];
        }
    }
    c.s = norm;
    int32_t ns = 0;
    for (size_t i = 0; i < m; ns++) {
        uint32_t cp;
        int l = tok_utf8_next((const unsigned char *)norm + i, m - i, &cp);
        c.sym[ns] = (ssym){(uint32_t)i, (uint32_t)l, ns - 1, ns + 1};
        i += (size_t)l;
    }
    if (!ns)
        goto done;
    c.sym[ns - 1].next = -1;
    for (int32_t i = 0; i + 1 < ns; i++)
        try_pair(&c, i);
    while (c.nheap) {
        scand top;
        tok_heap_pop(c.heap, &c.nheap, sizeof top, &top, cand_first);
        ssym *a = &c.sym[top.left], *b = &c.sym[top.right];
        if (!a->len || !b->len || a->len + b->len != top.len || a->next != top.right)
            continue; /* stale: a side was merged elsewhere since this pair was queued */
        a->len += b->len;
        b->len = 0;
        a->next = b->next;
        if (b->next >= 0)
            c.sym[b->next].prev = top.left;
        try_pair(&c, a->prev);
        try_pair(&c, top.left);
    }
    for (int32_t i = 0; i >= 0 && !rc; i = c.sym[i].next)
        rc = emit_symbol(v, norm + c.sym[i].off, c.sym[i].len, out);
done:
    free(norm);
    free(c.sym);
    free(c.heap);
    return rc;
}
