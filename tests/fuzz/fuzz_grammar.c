/* fuzz_grammar.c - libFuzzer target for constrained decoding: JSON Schema -> GBNF
 * (engine/gram_schema.c), GBNF -> automaton (engine/gram.c), then a few decoding steps over the
 * default model's real vocabulary (models/SmolLM2-135M-Instruct.Q4_1.gguf or $HY_MODEL, loaded
 * once). Input: [options byte][schema JSON or GBNF text][NUL][step bytes]. Options: bit 0 schema
 * (else GBNF), bit 1 ws_flexible. Each step byte picks one allowed token from the mask.
 * It aborts where a promise of engine/gram.h or gram_schema.h breaks:
 *   - the GBNF gram_schema_gbnf returns for a schema compiles (or hits a cap: HY_ELIMIT);
 *   - a refused grammar gets a NUL-terminated message;
 *   - a token outside the mask is refused and leaves the state unchanged (same mask after);
 *     a token inside it is accepted;
 *   - the bytes accepted so far are a prefix of a sentence (gram_match_prefix), and the matcher
 *     is accepting exactly when they are a whole sentence (gram_match);
 *   - an end-of-generation token is allowed only where the matcher is accepting.
 * Not a unit test. Build and run: tests/fuzz/fuzz.mk. */
#include "engine/gguf.h"
#include "engine/gram.h"
#include "engine/gram_schema.h"
#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_MAX_STEPS 8

static gguf_file *gf;
static tok_vocab *voc;
static gram_vocab *gvoc;
static int n_vocab;
static size_t n_words;

static void fz_fail(const char *what)
{
    fprintf(stderr, "fuzz_grammar: broken promise: %s\n", what);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("HY_MODEL");
    if (!path || !*path)
        path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (gguf_open(path, &gf) || tok_load(gf, &voc) || gram_vocab_create(voc, &gvoc)) {
        fprintf(stderr, "fuzz_grammar: cannot load the vocabulary of %s: %s\n", path, hy_err_msg());
        exit(2);
    }
    n_vocab = gram_vocab_n(gvoc);
    n_words = ((size_t)n_vocab + 31) / 32;
    return 0;
}

/* The k-th set (want = true) or clear bit of mask, k taken modulo their count; -1 when none.
 * Word-wise (popcount): a bit-by-bit loop over 49k ids was a third of the target's time. */
static uint32_t fz_word(const uint32_t *m, size_t w, bool want)
{
    uint32_t x = want ? m[w] : ~m[w];
    if (w == n_words - 1 && n_vocab % 32)
        x &= (1u << (n_vocab % 32)) - 1; /* bits past n_vocab are not tokens */
    return x;
}

static int32_t fz_pick(const uint32_t *m, bool want, unsigned k)
{
    unsigned count = 0;
    for (size_t w = 0; w < n_words; w++)
        count += (unsigned)__builtin_popcount(fz_word(m, w, want));
    if (!count)
        return -1;
    k %= count;
    for (size_t w = 0; w < n_words; w++) {
        uint32_t x = fz_word(m, w, want);
        unsigned c = (unsigned)__builtin_popcount(x);
        if (k >= c) {
            k -= c;
            continue;
        }
        for (; k; k--)
            x &= x - 1; /* drop the lowest set bit */
        return (int32_t)(w * 32 + (size_t)__builtin_ctz(x));
    }
    return -1;
}

/* Step through g: each step byte picks an allowed token; checks the matcher against gram_match. */
static void fz_steps(gram *g, const uint8_t *steps, size_t n_steps)
{
    gram_matcher *m = NULL;
    if (gram_matcher_create(g, gvoc, &m) != HY_OK)
        return;
    uint32_t *mask = malloc(n_words * 4), *again = malloc(n_words * 4);
    char text[FZ_MAX_STEPS * 256];
    size_t len = 0;
    for (size_t s = 0; s < n_steps && s < FZ_MAX_STEPS && mask && again; s++) {
        if (gram_matcher_mask(m, mask) != HY_OK)
            break;
        int32_t bad = fz_pick(mask, false, steps[s] * 7919u);
        if (bad >= 0) {
            if (gram_matcher_accept(m, bad) == HY_OK)
                fz_fail("a token outside the mask was accepted");
            if (gram_matcher_mask(m, again) != HY_OK)
                break;
            if (memcmp(mask, again, n_words * 4))
                fz_fail("a refused token changed the state");
        }
        int32_t tok = fz_pick(mask, true, steps[s]);
        if (tok < 0)
            break;
        if (tok_is_eog(voc, tok) && !gram_matcher_accepting(m))
            fz_fail("end of generation allowed where the matcher is not accepting");
        int rc = gram_matcher_accept(m, tok);
        if (rc == HY_ELIMIT)
            break;
        if (rc != HY_OK)
            fz_fail("a token inside the mask was refused");
        if (tok_is_eog(voc, tok))
            break;
        size_t pl = 0;
        const unsigned char *p = tok_piece(voc, tok, &pl);
        if (!p || len + pl > sizeof text)
            break;
        memcpy(text + len, p, pl);
        len += pl;
        if (!gram_match_prefix(g, text, len))
            fz_fail("accepted bytes are not a prefix of a sentence");
        if (gram_matcher_accepting(m) != gram_match(g, text, len))
            fz_fail("gram_matcher_accepting disagrees with gram_match");
    }
    free(mask);
    free(again);
    gram_matcher_free(m);
}

/* GBNF text (NUL-free, len bytes) -> compiled; NULL when refused. */
static gram *fz_compile(const char *gbnf, size_t len, bool must)
{
    char err[256];
    memset(err, 'x', sizeof err);
    gram *g = NULL;
    int rc = gram_compile(gbnf, len, &g, err, sizeof err);
    if (rc == HY_OK)
        return g;
    if (!memchr(err, '\0', sizeof err))
        fz_fail("compile error message not NUL-terminated");
    if (must && rc != HY_ELIMIT) {
        fprintf(stderr, "schema GBNF refused: %s\n--- GBNF ---\n%.*s\n", err, (int)len, gbnf);
        fz_fail("gram_schema_gbnf produced GBNF that does not compile");
    }
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool schema = data[0] & 1;
    gram_json_opts o = {.ws_flexible = (data[0] & 2) != 0};
    const uint8_t *body = data + 1, *nul = memchr(body, '\0', size - 1);
    size_t len = nul ? (size_t)(nul - body) : size - 1;
    const uint8_t *steps = nul ? nul + 1 : body + len;
    size_t n_steps = (size_t)(data + size - steps);
    /* exact-size copy plus the NUL gram_gbnf_prefix needs */
    char *text = malloc(len + 1);
    if (!text)
        return 0;
    memcpy(text, body, len);
    text[len] = '\0';

    gram *g = NULL;
    if (schema) {
        json_error_t je;
        json_t *j = json_loadb(text, len, JSON_DECODE_ANY, &je);
        char *gbnf = NULL;
        gram_schema_err e;
        if (j && gram_schema_gbnf(j, &o, &gbnf, &e) == HY_OK) {
            g = fz_compile(gbnf, strlen(gbnf), true);
            free(gbnf);
        }
        json_decref(j);
    } else {
        g = fz_compile(text, len, false);
        char *pre = NULL;
        if (gram_gbnf_prefix(text, "p-", &pre) == HY_OK)
            free(pre);
    }
    if (g) {
        fz_steps(g, steps, n_steps);
        gram_release(g);
    }
    hy_err_clear();
    free(text);
    return 0;
}
