/* test_gram.c - the GBNF compiler and automaton (engine/gram.c): hand-written accept/reject cases
 * per construct, compile errors, and token masks against a brute-force mask (every vocabulary
 * token checked by feeding its bytes from the start) on random states of several grammars.
 * The independent reference for JSON Schema masks is tests/e2e/test_gram_llguidance.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "engine/gguf.h"
#include "engine/gram.h"
#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static gguf_file *g_model;
static tok_vocab *g_vocab;

static int setup_model(void **state)
{
    (void)state;
    const char *path = getenv("HY_MODEL");
    if (!path)
        return 0;
    if (gguf_open(path, &g_model) || tok_load(g_model, &g_vocab)) {
        fprintf(stderr, "%s: %s\n", path, hy_err_msg());
        return -1;
    }
    return 0;
}

static int teardown_model(void **state)
{
    (void)state;
    tok_free(g_vocab);
    gguf_close(g_model);
    return 0;
}

static gram *compile(const char *text)
{
    gram *g = NULL;
    char err[256];
    int rc = gram_compile(text, strlen(text), &g, err, sizeof err);
    if (rc)
        fail_msg("compile failed: %s\n%s", err, text);
    return g;
}

static void expect(gram *g, const char *s, bool whole, bool prefix)
{
    bool w = gram_match(g, s, strlen(s)), p = gram_match_prefix(g, s, strlen(s));
    if (w != whole || p != prefix)
        fail_msg("'%s': match %d prefix %d, expected %d %d", s, w, p, whole, prefix);
}
#define YES(g, s) expect(g, s, true, true)
#define PART(g, s) expect(g, s, false, true)
#define NO(g, s) expect(g, s, false, false)

static void test_literals_and_classes(void **state)
{
    (void)state;
    gram *g = compile("root ::= \"ab\" [c-e] [^x-z\\n] . \"\\x41\\u00e9\\t\"\n");
    YES(g, "abdqzA\xc3\xa9\t");
    YES(g, "abe\xe2\x82\xac\xf0\x9f\x98\x80" "A\xc3\xa9\t"); /* euro sign, then an emoji as `.` */
    PART(g, "ab");
    PART(g, "abc\xe2\x82"); /* inside a character */
    NO(g, "abf");
    NO(g, "abcy");
    NO(g, "abc\n");
    NO(g, "abcqzA\xc3\xa9\tx");
    NO(g, "abcqzA\xc3\xa8"); /* e-grave is not e-acute */
    NO(g, "abc\xc0\x80");    /* overlong */
    NO(g, "abc\xed\xa0\x80"); /* a surrogate */
    gram_release(g);
}

static void test_repetition(void **state)
{
    (void)state;
    gram *g = compile("root ::= \"a\"* \"b\"+ \"c\"? d{2} e{1,} f{0,2} (\"x\" | \"yz\"){3}\n"
                      "d ::= \"d\"\ne ::= \"e\"\nf ::= \"f\"\n");
    YES(g, "bddexxx");
    YES(g, "aaabbbcddeeeffyzxyz");
    PART(g, "aaab");
    PART(g, "bdde");
    NO(g, "bdexxx");
    NO(g, "bddefffxxx");
    NO(g, "cddexxx");
    NO(g, "bddexx" "x" "x");
    PART(g, "bddexy");
    gram_release(g);
}

static void test_layout_and_comments(void **state)
{
    (void)state;
    gram *g = compile("# a comment line\n"
                      "root ::= item (\",\" item)*   # trailing comment\n"
                      "item ::=\n  \"one\"\n  | \"two\"\n"
                      "  | (\n    \"thr\"\n    \"ee\"\n  )\n");
    YES(g, "one,three,two");
    PART(g, "one,");
    NO(g, "one,,");
    PART(g, "one,th");
    gram_release(g);
}

/* The JSON grammar of llama.cpp's examples, compact: a rich recursive grammar to walk. */
static const char *k_json =
    "root   ::= object\n"
    "value  ::= object | array | string | number | (\"true\" | \"false\" | \"null\")\n"
    "object ::= \"{\" ( string \":\" value (\",\" string \":\" value)* )? \"}\"\n"
    "array  ::= \"[\" ( value (\",\" value)* )? \"]\"\n"
    "string ::= \"\\\"\" ( [^\"\\\\\\x7F\\x00-\\x1F] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4}) )* \"\\\"\"\n"
    "number ::= \"-\"? (\"0\" | [1-9] [0-9]*) (\".\" [0-9]+)? ([eE] [-+]? [0-9]+)?\n";

static void test_json(void **state)
{
    (void)state;
    gram *g = compile(k_json);
    YES(g, "{}");
    YES(g, "{\"a\":[1,-2.5e+3,true,null,{\"b\":\"x\\u00e9\\n\xe2\x82\xac\"}],\"c\":[]}");
    PART(g, "{\"a\":[1,");
    NO(g, "{\"a\":01}");
    NO(g, "{\"a\":1,}");
    NO(g, "{ }");
    NO(g, "{\"a\":\"\x01\"}");
    NO(g, "[1]");
    gram_release(g);
}

static void expect_error(const char *text, const char *needle)
{
    gram *g = NULL;
    char err[256];
    int rc = gram_compile(text, strlen(text), &g, err, sizeof err);
    assert_int_not_equal(rc, 0);
    assert_null(g);
    if (!strstr(err, needle))
        fail_msg("error '%s' does not say '%s'", err, needle);
}

static void test_errors(void **state)
{
    (void)state;
    expect_error("root ::= foo\n", "rule 'foo' is used but never defined");
    expect_error("root ::= \"a\"\n  | foo\n", "line 2 column 5");
    expect_error("item ::= \"a\"\n", "no 'root' rule");
    expect_error("root ::= root \"a\" | \"b\"\n", "left-recursive");
    expect_error("x ::= \"x\"\nroot ::= root \"a\" | \"b\"\n", "line 2 column 1");
    expect_error("root ::= x\nx ::= y? root\ny ::= \"y\"\n", "left-recursive");
    expect_error("root ::= \"abc\n", "line 1");
    expect_error("root ::= \"a\"\n\nroot ::= \"b\"\n", "defined twice");
    expect_error("root ::= [ab\n", "unclosed character class");
    expect_error("root ::= (\"a\"\n", "unclosed '('");
    expect_error("root ::= \"\\q\"\n", "unknown escape");
    expect_error("root ::= * \"a\"\n", "must follow a symbol");
    expect_error("root ::= \"a\"{3,1}\n", "max below min");
    expect_error("root ::= \"a\"{90000} \"b\"{90000} \"c\"{90000}\n", "elements");
    expect_error("root \"a\"\n", "expected '::='");
}

/* ---- masks against brute force ---- */

static uint64_t g_rng = 88172645463325252ull;
static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}

/* Allowed next tokens after text[0..len), found by matching text + each token's bytes. */
static void brute_mask(gram *g, const char *text, size_t len, uint32_t *mask, int n_vocab)
{
    static char buf[1 << 16];
    memcpy(buf, text, len);
    memset(mask, 0, (size_t)(n_vocab + 31) / 32 * 4);
    for (int32_t id = 0; id < n_vocab; id++) {
        bool ok;
        if (tok_is_eog(g_vocab, id)) {
            ok = gram_match(g, text, len);
        } else if (tok_is_control(g_vocab, id)) {
            ok = false;
        } else {
            size_t n;
            const unsigned char *b = tok_piece(g_vocab, id, &n);
            memcpy(buf + len, b, n);
            ok = n > 0 && gram_match_prefix(g, buf, len + n);
        }
        if (ok)
            mask[id / 32] |= 1u << (id % 32);
    }
}

/* HY_GRAM_WALKS caps the walks per grammar (make asan: 1; there the point is memory safety). */
static void walk_and_compare(const char *text, int walks, int steps)
{
    const char *cap = getenv("HY_GRAM_WALKS");
    if (cap && atoi(cap) > 0 && atoi(cap) < walks)
        walks = atoi(cap);
    gram *g = compile(text);
    gram_vocab *gv;
    assert_int_equal(gram_vocab_create(g_vocab, &gv), 0);
    int n = gram_vocab_n(gv), words = (n + 31) / 32;
    uint32_t *mask = calloc((size_t)words, 4), *ref = calloc((size_t)words, 4);
    int32_t *allowed = malloc((size_t)n * sizeof *allowed);
    assert_non_null(mask && ref && allowed);
    char out[4096];
    for (int w = 0; w < walks; w++) {
        gram_matcher *m;
        assert_int_equal(gram_matcher_create(g, gv, &m), 0);
        size_t len = 0;
        for (int s = 0; s < steps; s++) {
            assert_int_equal(gram_matcher_mask(m, mask), 0);
            brute_mask(g, out, len, ref, n);
            for (int i = 0; i < words; i++)
                if (mask[i] != ref[i]) {
                    int id = i * 32 + __builtin_ctz(mask[i] ^ ref[i]);
                    fail_msg("walk %d step %d after '%.*s': token %d '%s' mask %d brute %d", w, s, (int)len, out,
                             id, tok_text(g_vocab, id), !!(mask[i] >> (id % 32) & 1), !!(ref[i] >> (id % 32) & 1));
                }
            int na = 0;
            for (int32_t id = 0; id < n; id++)
                if (mask[id / 32] >> (id % 32) & 1)
                    allowed[na++] = id;
            assert_true(na > 0);
            /* bias toward short tokens half the time so walks reach deep states */
            int32_t pick = allowed[rnd() % (uint32_t)na];
            if (rnd() % 2)
                for (int t = 0; t < 8; t++) {
                    int32_t c = allowed[rnd() % (uint32_t)na];
                    size_t lc, lp;
                    if (!tok_is_eog(g_vocab, c) && (tok_is_eog(g_vocab, pick) ||
                        (tok_piece(g_vocab, c, &lc), tok_piece(g_vocab, pick, &lp), lc < lp)))
                        pick = c;
                }
            if (tok_is_eog(g_vocab, pick))
                break;
            /* a token outside the mask is refused and changes nothing */
            for (int32_t id = (int32_t)(rnd() % (uint32_t)n), k = 0; k < n; k++, id = (id + 1) % n)
                if (!(mask[id / 32] >> (id % 32) & 1)) {
                    assert_int_equal(gram_matcher_accept(m, id), HY_EINVAL);
                    break;
                }
            assert_int_equal(gram_matcher_accept(m, pick), 0);
            size_t pl;
            const unsigned char *pb = tok_piece(g_vocab, pick, &pl);
            if (len + pl >= sizeof out)
                break;
            memcpy(out + len, pb, pl);
            len += pl;
        }
        gram_matcher_free(m);
    }
    free(mask);
    free(ref);
    free(allowed);
    gram_vocab_free(gv);
    gram_release(g);
}

#define NEED_MODEL()                                       \
    do {                                                   \
        if (!g_vocab) {                                    \
            printf("SKIP: HY_MODEL not set, no model\n"); \
            skip();                                        \
        }                                                  \
    } while (0)

static void test_mask_json(void **state)
{
    (void)state;
    NEED_MODEL();
    walk_and_compare(k_json, 4, 12);
}

static void test_mask_unicode(void **state)
{
    (void)state;
    NEED_MODEL();
    /* multi-byte characters in classes and literals: tokens that end inside a character */
    walk_and_compare("root ::= ([\\u00e0-\\u00ff] | \"\xe2\x82\xac\" | [\xe4\xb8\x80-\xe4\xb8\x8f] | \" \" | [a-c])+ \"!\"\n",
                     3, 10);
}

static void test_mask_nested(void **state)
{
    (void)state;
    NEED_MODEL();
    walk_and_compare("root ::= \"(\" inner \")\"\ninner ::= ( \"(\" inner \")\" | [0-9]{1,3} )*\n", 3, 12);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_literals_and_classes),
        cmocka_unit_test(test_repetition),
        cmocka_unit_test(test_layout_and_comments),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_mask_json),
        cmocka_unit_test(test_mask_unicode),
        cmocka_unit_test(test_mask_nested),
    };
    return cmocka_run_group_tests(tests, setup_model, teardown_model);
}
