/* tok_internal.h - the tokenizer's private structures, shared by tokenizer.c (vocabulary,
 * special tokens, decoding), tok_bpe.c (byte-level BPE and its pre-tokenizers) and tok_spm.c
 * (SentencePiece-style encoding). Nothing outside engine/tok*.c may include it. */
#ifndef HY_TOK_INTERNAL_H
#define HY_TOK_INTERNAL_H

#include "hy.h"
#include "tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* tokenizer.ggml.token_type values (llama.cpp's convention). */
enum {
    TOK_TYPE_UNDEFINED = 0,
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER_DEFINED = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
};

typedef enum { TOK_MODEL_BPE, TOK_MODEL_SPM } tok_model;
typedef enum { TOK_PRE_NONE, TOK_PRE_GPT2, TOK_PRE_SMOLLM, TOK_PRE_LLAMA3 } tok_pre;

struct tok_vocab {
    tok_model model;
    tok_pre pre;
    int n;
    /* Raw vocabulary strings, NUL-terminated, in one buffer. */
    char *text;
    uint32_t *text_off, *text_len;
    /* Bytes each token decodes to (byte-level mapping undone, or ▁ -> space, <0xXX> -> byte). */
    unsigned char *piece;
    uint32_t *piece_off, *piece_len;
    size_t max_piece;
    uint8_t *type;   /* TOK_TYPE_* */
    float *score;    /* SPM merge scores; NULL for BPE */
    uint8_t *eog;    /* 1 where the id ends generation */
    /* Open-addressed map from token text to id: slots hold id + 1, 0 is empty. */
    uint32_t *map;
    uint32_t map_mask;
    /* Merge pairs (BPE): key = left id << 32 | right id; rank = order in tokenizer.ggml.merges. */
    uint64_t *mkey;
    uint32_t *mrank;
    int32_t *mres;
    uint32_t mmask;   /* 0 when there are no merges */
    /* BPE: token of the byte-level character for each byte. SPM: the <0xXX> token, or -1. */
    int32_t byte_tok[256];
    /* Control and user-defined tokens, longest first, for special parsing. */
    int32_t *special;
    int n_special;
    int32_t bos, eos, unk, pad;
    bool add_bos, add_space_prefix;
    char *chat_template;  /* tokenizer.chat_template as the file has it (NUL-terminated), or NULL */
};

/* A growable id list. */
typedef struct {
    int32_t *ids;
    int n, cap;
} tok_ids;
int tok_ids_push(tok_ids *o, int32_t id);

/* A binary heap of `size`-byte entries in caller-owned storage (the BPE and SPM merge queues):
 * first(a, b) is true when a must come out before b. pop needs *n > 0. Inline so that each
 * caller's comparison and copy size are compiled in (the merge loop is the encoder's hot path). */
typedef bool (*tok_heap_first)(const void *a, const void *b);
#define HEAP_AT(i) ((char *)heap + (size_t)(i) * size)

static inline void tok_heap_push(void *heap, int *n, size_t size, const void *x, tok_heap_first first)
{
    int i = (*n)++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!first(x, HEAP_AT(parent)))
            break;
        memcpy(HEAP_AT(i), HEAP_AT(parent), size);
        i = parent;
    }
    memcpy(HEAP_AT(i), x, size);
}

static inline void tok_heap_pop(void *heap, int *n, size_t size, void *top, tok_heap_first first)
{
    memcpy(top, heap, size);
    int m = --*n;
    /* the last entry sifts down from the root; it stays put at index m, which the loop never writes */
    const void *x = HEAP_AT(m);
    int i = 0;
    for (;;) {
        int k = 2 * i + 1;
        if (k >= m)
            break;
        if (k + 1 < m && first(HEAP_AT(k + 1), HEAP_AT(k)))
            k++;
        if (!first(HEAP_AT(k), x))
            break;
        memcpy(HEAP_AT(i), HEAP_AT(k), size);
        i = k;
    }
    if (m)
        memcpy(HEAP_AT(i), x, size);
}

#undef HEAP_AT


/* Id of the token whose text is exactly s[0..len), or -1. */
int32_t tok_lookup(const tok_vocab *v, const char *s, size_t len);

/* Decode one UTF-8 character at s[0..n) (n >= 1). Invalid or truncated sequences yield one
 * byte with *cp = 0xFFFD | 0x80000000 (a value no class table contains). Returns its length. */
int tok_utf8_next(const unsigned char *s, size_t n, uint32_t *cp);

/* GPT-2's byte-level character for byte b (a code point below 324). */
uint32_t tok_byte_to_cp(uint8_t b);

/* Encode one non-empty text fragment (no special tokens inside) and append its ids. Every
 * fragment starts the text or follows a special token, so SPM prefixes each with a space
 * when add_space_prefix is set (as llama.cpp and SentencePiece-per-segment tokenisers do). */
int tok_bpe_encode(const tok_vocab *v, const char *s, size_t len, tok_ids *out);
int tok_spm_encode(const tok_vocab *v, const char *s, size_t len, tok_ids *out);

/* Pre-tokenise s[0..len) with `pre`, calling cb for every piece in order; stops at the first
 * non-zero return of cb and returns it. Exposed for tests through tok_pretokenize(). */
typedef int (*tok_piece_cb)(void *ctx, const char *s, size_t len);
int tok_pretok_run(tok_pre pre, const char *s, size_t len, tok_piece_cb cb, void *ctx);

#endif
