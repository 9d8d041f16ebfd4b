/* tok_bpe.c - byte-level BPE: the hand-written pre-tokenizers (gpt2, smollm, llama-bpe regexes
 * re-expressed as code over Unicode classes) and the rank-ordered merge of each pre-token.
 * It never allocates per token and never touches special tokens (tokenizer.c splits those off). */
#include "tok_internal.h"
#include "unicode_tables.h"

#include <stdlib.h>
#include <string.h>

typedef unsigned char u8;

int tok_utf8_next(const u8 *s, size_t n, uint32_t *cp)
{
    u8 c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int len;
    uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, v = c & 0x07, min = 0x10000;
    } else {
        goto bad;
    }
    if ((size_t)len > n)
        goto bad;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            goto bad;
        v = v << 6 | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        goto bad;
    *cp = v;
    return len;
bad:
    *cp = 0x8000FFFDu;
    return 1;
}

static int cp_class(uint32_t cp)
{
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z')
            return TOK_CP_LETTER;
        if (cp >= '0' && cp <= '9')
            return TOK_CP_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D))
            return TOK_CP_SPACE;
        return TOK_CP_OTHER;
    }
    size_t lo = 0, hi = TOK_CP_N_RANGES;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < tok_cp_ranges[mid].first)
            hi = mid;
        else if (cp > tok_cp_ranges[mid].last)
            lo = mid + 1;
        else
            return tok_cp_ranges[mid].cls;
    }
    return TOK_CP_OTHER;
}

/* Class of the character at p (p < e); *len gets its byte length. */
static int cls_at(const u8 *p, const u8 *e, int *len)
{
    uint32_t cp;
    *len = tok_utf8_next(p, (size_t)(e - p), &cp);
    return cp_class(cp);
}

/* Bytes in the maximal run of class `cls` starting at p. */
static size_t run_cls(const u8 *p, const u8 *e, int cls)
{
    const u8 *q = p;
    int l;
    while (q < e && cls_at(q, e, &l) == cls)
        q += l;
    return (size_t)(q - p);
}

/* \s+(?!\S)|\s+ at p (p is white space): the run, less its last character when a non-space
 * follows and the run has more than one character. */
static size_t space_match(const u8 *p, const u8 *e)
{
    const u8 *q = p, *last = p;
    int l, k = 0;
    while (q < e && cls_at(q, e, &l) == TOK_CP_SPACE) {
        last = q;
        q += l;
        k++;
    }
    if (q == e || k < 2)
        return (size_t)(q - p);
    return (size_t)(last - p);
}

/* 's|'t|'re|'ve|'m|'ll|'d, optionally ASCII case-insensitive; 0 when none matches. */
static size_t contraction(const u8 *p, const u8 *e, bool icase)
{
    if (*p != '\'' || p + 1 >= e)
        return 0;
    u8 a = p[1], b = p + 2 < e ? p[2] : 0;
    if (icase) {
        /* Unicode case folding maps U+017F LATIN SMALL LETTER LONG S to 's' */
        if (a == 0xC5 && b == 0xBF)
            return 3;
        a = (a >= 'A' && a <= 'Z') ? (u8)(a | 0x20) : a;
        b = (b >= 'A' && b <= 'Z') ? (u8)(b | 0x20) : b;
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd')
        return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        return 3;
    return 0;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t gpt2_match(const u8 *p, const u8 *e)
{
    size_t n = contraction(p, e, false);
    if (n)
        return n;
    int l0, l1;
    int c0 = cls_at(p, e, &l0);
    if (c0 != TOK_CP_SPACE)
        return run_cls(p, e, c0);
    if (*p == ' ' && p + 1 < e) {
        int c1 = cls_at(p + 1, e, &l1);
        if (c1 != TOK_CP_SPACE)
            return 1 + run_cls(p + 1, e, c1);
    }
    return space_match(p, e);
}

static bool is_crlf(u8 c) { return c == '\r' || c == '\n'; }

/* Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t llama3_match(const u8 *p, const u8 *e)
{
    size_t n = contraction(p, e, true);
    if (n)
        return n;
    int l0, l;
    int c0 = cls_at(p, e, &l0);
    if (c0 == TOK_CP_LETTER)
        return run_cls(p, e, TOK_CP_LETTER);
    if (c0 != TOK_CP_NUMBER && !is_crlf(*p) && p + l0 < e && cls_at(p + l0, e, &l) == TOK_CP_LETTER)
        return (size_t)l0 + run_cls(p + l0, e, TOK_CP_LETTER);
    if (c0 == TOK_CP_NUMBER) {
        const u8 *q = p;
        for (int i = 0; i < 3 && q < e && cls_at(q, e, &l) == TOK_CP_NUMBER; i++)
            q += l;
        return (size_t)(q - p);
    }
    const u8 *q = p;
    if (*p == ' ' && p + 1 < e && cls_at(p + 1, e, &l) == TOK_CP_OTHER)
        q = p + 1;
    if (cls_at(q, e, &l) == TOK_CP_OTHER) {
        q += run_cls(q, e, TOK_CP_OTHER);
        while (q < e && is_crlf(*q))
            q++;
        return (size_t)(q - p);
    }
    /* p is white space: \s*[\r\n]+ ends after the run's last CR/LF, when it has one */
    const u8 *crlf_end = NULL;
    for (q = p; q < e && cls_at(q, e, &l) == TOK_CP_SPACE; q += l)
        if (is_crlf(*q))
            crlf_end = q + 1;
    if (crlf_end)
        return (size_t)(crlf_end - p);
    return space_match(p, e);
}

static int regex_split(tok_pre pre, const u8 *p, const u8 *e, tok_piece_cb cb, void *ctx)
{
    while (p < e) {
        size_t n = pre == TOK_PRE_LLAMA3 ? llama3_match(p, e) : gpt2_match(p, e);
        int rc = cb(ctx, (const char *)p, n);
        if (rc)
            return rc;
        p += n;
    }
    return 0;
}

int tok_pretok_run(tok_pre pre, const char *s, size_t len, tok_piece_cb cb, void *ctx)
{
    const u8 *p = (const u8 *)s, *e = p + len;
    if (pre != TOK_PRE_SMOLLM)
        return regex_split(pre, p, e, cb, ctx);
    /* Digits(individual_digits): every \p{N} character is a piece of its own; the GPT-2 regex
     * then runs on each stretch between them independently. */
    const u8 *start = p;
    int l, rc;
    while (p < e) {
        if (cls_at(p, e, &l) != TOK_CP_NUMBER) {
            p += l;
            continue;
        }
        if ((rc = regex_split(pre, start, p, cb, ctx)) || (rc = cb(ctx, (const char *)p, (size_t)l)))
            return rc;
        p += l;
        start = p;
    }
    return regex_split(pre, start, e, cb, ctx);
}

/* ---- merging ---- */

typedef struct {
    int32_t id, prev, next;  /* id -1: absorbed into its left neighbour */
} bsym;

typedef struct {
    uint32_t rank;
    int32_t pos, res;
    int32_t left, right;  /* the pair when queued: a candidate is stale once either changed */
} bcand;

typedef struct {
    const tok_vocab *v;
    tok_ids *out;
    bsym *sym;
    bcand *heap;
    char *mapped;   /* llama-bpe: the pre-token in byte-level characters */
    size_t cap;     /* pre-token bytes the scratch can hold */
    int nheap;
} bpe_ctx;

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

/* Rank and result of merging a with b; false when the pair is not a merge. */
static bool merge_find(const tok_vocab *v, int32_t a, int32_t b, uint32_t *rank, int32_t *res)
{
    if (!v->mmask)
        return false;
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint64_t i = mix64(key) & v->mmask;; i = (i + 1) & v->mmask) {
        if (v->mkey[i] == UINT64_MAX)
            return false;
        if (v->mkey[i] == key) {
            *rank = v->mrank[i];
            *res = v->mres[i];
            return true;
        }
    }
}

/* Lowest merge rank first; on a tie the leftmost pair. */
static bool cand_first(const void *a, const void *b)
{
    const bcand *x = a, *y = b;
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void push_pair(bpe_ctx *c, int32_t pos)
{
    int32_t next = c->sym[pos].next;
    if (next < 0)
        return;
    bcand x = {0, pos, 0, c->sym[pos].id, c->sym[next].id};
    if (merge_find(c->v, x.left, x.right, &x.rank, &x.res))
        tok_heap_push(c->heap, &c->nheap, sizeof x, &x, cand_first);
}

static int scratch_reserve(bpe_ctx *c, size_t n)
{
    if (n <= c->cap)
        return 0;
    size_t cap = HY_MAX(n, 2 * c->cap);
    size_t hb;
    if (hy_mul_size(cap, 3 * sizeof(bcand), &hb))
        return hy_err_set(HY_ELIMIT, "pre-token of %zu bytes is too long", n);
    bsym *sym = realloc(c->sym, cap * sizeof *sym);
    if (sym)
        c->sym = sym;
    bcand *heap = realloc(c->heap, hb);
    if (heap)
        c->heap = heap;
    char *mapped = realloc(c->mapped, 2 * cap + 1);
    if (mapped)
        c->mapped = mapped;
    if (!sym || !heap || !mapped)
        return hy_err_set(HY_ENOMEM, "out of memory for BPE scratch (%zu bytes)", cap);
    c->cap = cap;
    return 0;
}

/* GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the others
 * take code points 256, 257, ... in byte order. */
uint32_t tok_byte_to_cp(uint8_t b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)
        return b;
    uint32_t k = 0;
    for (int i = 0; i < b; i++)
        if (!((i >= '!' && i <= '~') || (i >= 0xA1 && i <= 0xAC) || i >= 0xAE))
            k++;
    return 256 + k;
}

/* Llama 3's tokenizer ignores merges for a pre-token that is itself in the vocabulary. */
static int32_t whole_word(bpe_ctx *c, const u8 *s, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = tok_byte_to_cp(s[i]);
        if (cp < 0x80) {
            c->mapped[m++] = (char)cp;
        } else {
            c->mapped[m++] = (char)(0xC0 | cp >> 6);
            c->mapped[m++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    return tok_lookup(c->v, c->mapped, m);
}

static int bpe_word(void *ctx, const char *str, size_t n)
{
    bpe_ctx *c = ctx;
    const tok_vocab *v = c->v;
    const u8 *s = (const u8 *)str;
    int rc;
    if (n == 1 && v->byte_tok[s[0]] >= 0)
        return tok_ids_push(c->out, v->byte_tok[s[0]]);
    if ((rc = scratch_reserve(c, n)))
        return rc;
    if (v->pre == TOK_PRE_LLAMA3) {
        int32_t id = whole_word(c, s, n);
        if (id >= 0)
            return tok_ids_push(c->out, id);
    }
    int ns = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = v->byte_tok[s[i]];
        if (id < 0)
            id = v->unk;
        if (id < 0)
            continue; /* a vocabulary without this byte and without <unk>: the byte is lost */
        c->sym[ns] = (bsym){id, ns - 1, ns + 1};
        ns++;
    }
    if (!ns)
        return 0;
    c->sym[ns - 1].next = -1;
    c->nheap = 0;
    for (int32_t i = 0; i + 1 < ns; i++)
        push_pair(c, i);
    while (c->nheap) {
        bcand top;
        tok_heap_pop(c->heap, &c->nheap, sizeof top, &top, cand_first);
        bsym *a = &c->sym[top.pos];
        if (a->id < 0 || a->next < 0)
            continue;
        bsym *b = &c->sym[a->next];
        if (a->id != top.left || b->id != top.right)
            continue; /* stale: one side changed since the candidate was queued */
        a->id = top.res;
        b->id = -1;
        a->next = b->next;
        if (b->next >= 0)
            c->sym[b->next].prev = top.pos;
        if (a->prev >= 0)
            push_pair(c, a->prev);
        push_pair(c, top.pos);
    }
    for (int32_t i = 0; i >= 0; i = c->sym[i].next)
        if ((rc = tok_ids_push(c->out, c->sym[i].id)))
            return rc;
    return 0;
}

int tok_bpe_encode(const tok_vocab *v, const char *s, size_t len, tok_ids *out)
{
    bpe_ctx c = {.v = v, .out = out};
    int rc = tok_pretok_run(v->pre, s, len, bpe_word, &c);
    free(c.sym);
    free(c.heap);
    free(c.mapped);
    return rc;
}
