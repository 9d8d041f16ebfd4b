/* fuzz_tokenizer.c - libFuzzer target for the tokenizer with a real vocabulary: the default model's
 * (models/SmolLM2-135M-Instruct.Q4_1.gguf, or $HY_MODEL), loaded once. The first input byte holds
 * the options (bit 0 parse_special, bit 1 add_bos, bits 2-7 a small detokeniser buffer size); the
 * rest is the text. It aborts where a promise of engine/tokenizer.h breaks:
 *   - tok_encode accepts any bytes ("invalid UTF-8 is handled byte-wise") and returns ids in range;
 *     BOS first exactly when add_bos asks and the vocab has one;
 *   - a byte the vocabulary has no byte token for becomes <unk> (tok_unk; dropped when there is
 *     none), as the reference (Hugging Face BPE with unk_token, fuse_unk off) does: SmolLM2 lacks
 *     0x04 0x06 0x13 0x14 0x16 0x1d 0xc0 0xc1 0xf1 0xf2 0xf5-0xff. Without parse_special no
 *     other control token comes out (special text is ordinary text);
 *   - tok_decode(skip_special = false) of the ids after BOS gives back the input bytes exactly when
 *     they are valid UTF-8 made of bytes the vocabulary has, and in general the input with each
 *     such missing byte replaced by <unk>'s text, decoded lossily (each maximal invalid subpart
 *     one U+FFFD, as Python's decode('replace')): checked against an independent decoder below;
 *     with parse_special the special tokens' text comes back too;
 *   - the incremental detokeniser (tok_detok_push ... tok_detok_flush) with tok_detok_cap bytes
 *     concatenates to tok_decode(skip_special = true) and drops nothing; with a smaller buffer its
 *     output is whole valid characters, NUL-terminated, and what it drops is counted exactly.
 * Not a unit test. Build and run: tests/fuzz/fuzz.mk. */
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static gguf_file *gf;
static tok_vocab *voc;
static bool has_byte[256]; /* the vocabulary has a token for this byte alone */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("HY_MODEL");
    if (!path || !*path)
        path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (gguf_open(path, &gf) || tok_load(gf, &voc)) {
        fprintf(stderr, "fuzz_tokenizer: cannot load the vocabulary of %s: %s\n", path, hy_err_msg());
        exit(2);
    }
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        int32_t *ids = NULL;
        int n = 0;
        size_t pl = 0;
        const unsigned char *p;
        if (tok_encode(voc, &c, 1, false, false, &ids, &n))
            abort();
        has_byte[b] = n == 1 && ids[0] != tok_unk(voc) && (p = tok_piece(voc, ids[0], &pl)) && pl == 1 && p[0] == b;
        free(ids);
    }
    return 0;
}

static void fz_fail(const char *what, const uint8_t *in, size_t n)
{
    fprintf(stderr, "fuzz_tokenizer: broken promise: %s (input %zu bytes)\n", what, n);
    abort();
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 when s[0] does not start one; *sub is the
 * length of the maximal subpart (the bytes one U+FFFD replaces) when it does not.
 * Written from the Unicode table of well-formed byte sequences (Table 3-7). */
static size_t fz_utf8_seq(const uint8_t *s, size_t n, size_t *sub)
{
    uint8_t b = s[0];
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b <= 0x7F)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        need = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        lo = b == 0xE0 ? 0xA0 : 0x80;
        hi = b == 0xED ? 0x9F : 0xBF;
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        lo = b == 0xF0 ? 0x90 : 0x80;
        hi = b == 0xF4 ? 0x8F : 0xBF;
    } else {
        *sub = 1;
        return 0;
    }
    size_t i = 1;
    for (; i < need && i < n; i++) {
        uint8_t c = s[i];
        uint8_t l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (c < l || c > h)
            break;
    }
    if (i == need)
        return need;
    *sub = i;
    return 0;
}

/* s decoded lossily into out (3 * n + 1 bytes); returns the length. *valid: no replacement. */
static size_t fz_lossy(const uint8_t *s, size_t n, uint8_t *out, bool *valid)
{
    size_t o = 0;
    *valid = true;
    for (size_t i = 0; i < n;) {
        size_t sub = 0, k = fz_utf8_seq(s + i, n - i, &sub);
        if (k) {
            memcpy(out + o, s + i, k);
            o += k;
            i += k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += sub;
            *valid = false;
        }
    }
    return o;
}

static bool fz_valid_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t sub = 0, k = fz_utf8_seq(s + i, n - i, &sub);
        if (!k)
            return false;
        i += k;
    }
    return true;
}

/* The incremental detokeniser over ids with cap-byte buffers: concatenated output into *cat
 * (malloc'ed), dropped bytes into *dropped. */
static void fz_detok(const int32_t *ids, int n, size_t cap, char **cat, size_t *cat_len, size_t *dropped,
                     const uint8_t *in, size_t in_n)
{
    char *buf = malloc(cap), *all = malloc((size_t)(n + 1) * tok_detok_cap(voc) + 1);
    if (!buf || !all)
        abort();
    size_t len = 0;
    tok_detok d;
    tok_detok_init(&d, voc);
    for (int i = 0; i <= n; i++) {
        size_t k = i < n ? tok_detok_push(&d, ids[i], buf, cap) : tok_detok_flush(&d, buf, cap);
        if (k >= cap || buf[k] != '\0')
            fz_fail("detok output not NUL-terminated within cap", in, in_n);
        if (!fz_valid_utf8((const uint8_t *)buf, k))
            fz_fail("detok emitted a partial or invalid character", in, in_n);
        memcpy(all + len, buf, k);
        len += k;
    }
    free(buf);
    *cat = all;
    *cat_len = len;
    *dropped = d.n_dropped;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool parse_special = data[0] & 1, add_bos = data[0] & 2;
    size_t small_cap = (size_t)(data[0] >> 2) + 1;
    const uint8_t *in = data + 1;
    size_t n = size - 1;
    char *text = malloc(n ? n : 1); /* exact size, no NUL: ASan sees reads past the end */
    if (!text)
        return 0;
    memcpy(text, in, n);

    int32_t *ids = NULL;
    int n_ids = 0;
    if (tok_encode(voc, text, n, parse_special, add_bos, &ids, &n_ids) != HY_OK)
        fz_fail("tok_encode refused input", in, n);
    int nv = tok_n_vocab(voc), skip = 0;
    for (int i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= nv)
            fz_fail("id out of range", in, n);
    if (add_bos && tok_bos(voc) >= 0) {
        if (n_ids < 1 || ids[0] != tok_bos(voc))
            fz_fail("add_bos without BOS first", in, n);
        skip = 1;
    }
    bool missing = false;
    for (size_t i = 0; i < n; i++)
        missing |= !has_byte[in[i]];
    if (!parse_special)
        for (int i = skip; i < n_ids; i++)
            if (tok_is_control(voc, ids[i]) && !(missing && ids[i] == tok_unk(voc)))
                fz_fail("control token without parse_special", in, n);

    /* full decode == lossy(input with missing bytes as <unk>'s text) */
    size_t ul = 0;
    const unsigned char *unk = tok_unk(voc) >= 0 ? tok_piece(voc, tok_unk(voc), &ul) : NULL;
    uint8_t *sub = malloc(n * (ul + 1) + 1), *want = malloc(3 * n * (ul + 1) + 1);
    size_t sub_len = 0;
    for (size_t i = 0; i < n; i++) {
        if (has_byte[in[i]]) {
            sub[sub_len++] = in[i];
        } else if (unk) {
            memcpy(sub + sub_len, unk, ul);
            sub_len += ul;
        }
    }
    bool valid;
    size_t want_len = fz_lossy(sub, sub_len, want, &valid);
    valid = valid && !missing;
    char *got = NULL;
    size_t got_len = 0;
    if (tok_decode(voc, ids + skip, n_ids - skip, false, &got, &got_len) != HY_OK)
        fz_fail("tok_decode failed", in, n);
    if (got_len != want_len || memcmp(got, want, want_len) != 0 || got[got_len] != '\0')
        fz_fail(valid ? "round trip of valid UTF-8 lost bytes" : "round trip differs from lossy UTF-8", in, n);
    free(got);

    /* incremental == tok_decode(skip_special = true), with a large and with a small buffer */
    char *ref = NULL;
    size_t ref_len = 0;
    if (tok_decode(voc, ids, n_ids, true, &ref, &ref_len) != HY_OK)
        fz_fail("tok_decode(skip_special) failed", in, n);
    char *cat = NULL;
    size_t cat_len = 0, dropped = 0;
    fz_detok(ids, n_ids, tok_detok_cap(voc), &cat, &cat_len, &dropped, in, n);
    if (dropped || cat_len != ref_len || memcmp(cat, ref, ref_len) != 0)
        fz_fail("incremental detokeniser differs from tok_decode(skip_special)", in, n);
    free(cat);
    fz_detok(ids, n_ids, small_cap, &cat, &cat_len, &dropped, in, n);
    if (cat_len + dropped != ref_len)
        fz_fail("small-buffer detokeniser: emitted + dropped != total", in, n);
    free(cat);
    free(ref);
    free(want);
    free(sub);
    free(ids);
    free(text);
    return 0;
}
