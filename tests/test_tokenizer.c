/* test_tokenizer.c - the tokenizer against independent references: SmolLM2's golden ids from
 * Hugging Face `tokenizers` (tests/golden/tokenizer/smollm2.jsonl), hand-derived pre-token
 * splits for the gpt2 / smollm / llama-bpe regexes, a tiny hand-checked SentencePiece vocabulary
 * and tiny BPE vocabularies built as in-memory GGUFs, incremental detokenisation, and chat
 * templates rendered by hand from their jinja text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/tok_internal.h"
#include "engine/tokenizer.h"
#include "tests/testutil.h"

#define GOLDEN "tests/golden/tokenizer/smollm2.jsonl"

/* ---- a GGUF writer for tiny vocabularies ---- */

typedef tu_buf gw;

static void gw_begin(gw *b)
{
    memset(b, 0, sizeof *b);
    tu_put_u32(b, 0x46554747u);
    tu_put_u32(b, 3);
    tu_put_u64(b, 0); /* tensors */
    tu_put_u64(b, 0); /* kvs, patched by gw_end */
}
static void kv_str(gw *b, const char *k, const char *v)
{
    tu_put_str(b, k), tu_put_u32(b, GGUF_VT_STRING), tu_put_str(b, v), b->n_kv++;
}
static void kv_u32(gw *b, const char *k, uint32_t v)
{
    tu_put_str(b, k), tu_put_u32(b, GGUF_VT_U32), tu_put_u32(b, v), b->n_kv++;
}
static void kv_bool(gw *b, const char *k, bool v)
{
    unsigned char c = v;
    tu_put_str(b, k), tu_put_u32(b, GGUF_VT_BOOL), tu_put(b, &c, 1), b->n_kv++;
}
static void kv_strs(gw *b, const char *k, const char *const *v, int n)
{
    tu_put_str(b, k), tu_put_u32(b, GGUF_VT_ARRAY), tu_put_u32(b, GGUF_VT_STRING), tu_put_u64(b, (uint64_t)n);
    for (int i = 0; i < n; i++)
        tu_put_str(b, v[i]);
    b->n_kv++;
}
static void kv_i32s(gw *b, const char *k, const int32_t *v, int n)
{
    tu_put_str(b, k), tu_put_u32(b, GGUF_VT_ARRAY), tu_put_u32(b, GGUF_VT_I32), tu_put_u64(b, (uint64_t)n);
    tu_put(b, v, (size_t)n * 4);
    b->n_kv++;
}
static void kv_f32s(gw *b, const char *k, const float *v, int n)
{
    tu_put_str(b, k), tu_put_u32(b, GGUF_VT_ARRAY), tu_put_u32(b, GGUF_VT_F32), tu_put_u64(b, (uint64_t)n);
    tu_put(b, v, (size_t)n * 4);
    b->n_kv++;
}
/* In-memory files and the buffers they live in, released together by mem_close. */
static struct {
    gguf_file *f;
    unsigned char *p;
} g_mem[32];

static void mem_close(gguf_file *f)
{
    for (size_t i = 0; i < HY_ARRAY_LEN(g_mem); i++) {
        if (g_mem[i].f == f) {
            gguf_close(f);
            free(g_mem[i].p);
            g_mem[i].f = NULL;
            g_mem[i].p = NULL;
            return;
        }
    }
    fail_msg("mem_close: unknown file");
}

static gguf_file *gw_end(gw *b)
{
    memcpy(b->p + 16, &b->n_kv, 8);
    tu_pad_to(b, 32);
    gguf_file *f = NULL;
    int rc = gguf_open_mem(b->p, b->n, &f);
    if (rc)
        fprintf(stderr, "gguf_open_mem: %s\n", hy_err_msg());
    assert_int_equal(rc, 0);
    for (size_t i = 0; i < HY_ARRAY_LEN(g_mem); i++) {
        if (!g_mem[i].f) {
            g_mem[i].f = f;
            g_mem[i].p = b->p;
            return f;
        }
    }
    fail_msg("too many in-memory files open");
    return NULL;
}

/* ---- helpers ---- */

static gguf_file *g_model;
static tok_vocab *g_vocab;

static int setup_model(void **state)
{
    (void)state;
    const char *path = getenv("HY_MODEL");
    if (!path)
        return 0;
    if (gguf_open(path, &g_model)) {
        fprintf(stderr, "gguf_open(%s): %s\n", path, hy_err_msg());
        return -1;
    }
    if (tok_load(g_model, &g_vocab)) {
        fprintf(stderr, "tok_load: %s\n", hy_err_msg());
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

#define NEED_MODEL()                                         \
    do {                                                     \
        if (!g_vocab) {                                      \
            printf("SKIP: HY_MODEL not set, no model\n");   \
            skip();                                          \
        }                                                    \
    } while (0)

static bool ids_eq(const int32_t *a, int na, const int32_t *b, int nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, (size_t)na * sizeof *a));
}

static void expect_ids(tok_vocab *v, const char *text, bool special, bool bos, const int32_t *want, int n_want)
{
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(v, text, strlen(text), special, bos, &ids, &n), 0);
    if (!ids_eq(ids, n, want, n_want)) {
        fprintf(stderr, "encode %s: got", text);
        for (int i = 0; i < n; i++)
            fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n");
    }
    assert_true(ids_eq(ids, n, want, n_want));
    free(ids);
}

static void expect_decode(tok_vocab *v, const int32_t *ids, int n, bool skip, const char *want)
{
    char *s;
    size_t len;
    assert_int_equal(tok_decode(v, ids, n, skip, &s, &len), 0);
    assert_int_equal(len, strlen(want));
    assert_string_equal(s, want);
    free(s);
}

/* Independent check: s[0..n) is well-formed UTF-8 (no partial or overlong characters). */
static bool utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i], need, cp;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0)
            need = 1, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0)
            need = 2, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0)
            need = 3, cp = c & 0x07;
        else
            return false;
        if (i + need >= n)
            return false;
        for (unsigned k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        static const unsigned min[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < min[need] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += need + 1;
    }
    return true;
}

/* Push ids one by one through the incremental detokeniser; every chunk must be whole UTF-8
 * and the total must equal tok_decode(skip_special = true). Returns false on a mismatch. */
static bool detok_matches(const tok_vocab *v, const int32_t *ids, int n, size_t cap)
{
    char *want, *got = malloc(1), *chunk = malloc(cap);
    size_t want_len, got_len = 0;
    assert_non_null(got);
    assert_non_null(chunk);
    assert_int_equal(tok_decode(v, ids, n, true, &want, &want_len), 0);
    tok_detok d;
    tok_detok_init(&d, v);
    bool ok = true;
    for (int i = 0; i <= n; i++) {
        size_t m = i < n ? tok_detok_push(&d, ids[i], chunk, cap) : tok_detok_flush(&d, chunk, cap);
        if (m >= cap || chunk[m] != '\0' || !utf8_ok((unsigned char *)chunk, m))
            ok = false;
        got = realloc(got, got_len + m + 1);
        assert_non_null(got);
        memcpy(got + got_len, chunk, m);
        got_len += m;
    }
    ok = ok && d.n_dropped == 0 && got_len == want_len && !memcmp(got, want, want_len);
    free(want);
    free(got);
    free(chunk);
    return ok;
}

/* ---- SmolLM2 golden file ---- */

static json_t *ids_json(const int32_t *ids, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_integer(ids[i]));
    return a;
}

static bool json_ids_eq(json_t *arr, const int32_t *ids, int n)
{
    if (!json_is_array(arr) || json_array_size(arr) != (size_t)n)
        return false;
    for (int i = 0; i < n; i++)
        if (json_integer_value(json_array_get(arr, (size_t)i)) != ids[i])
            return false;
    return true;
}

static int32_t *json_ids(json_t *arr, int *n)
{
    *n = (int)json_array_size(arr);
    int32_t *ids = malloc(((size_t)*n + 1) * sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return ids;
}

static FILE *open_golden(void)
{
    /* the golden file may still be in the making when this test first runs: wait a little */
    for (int i = 0; i < 30; i++) {
        FILE *fp = fopen(GOLDEN, "r");
        if (fp)
            return fp;
        if (!i)
            printf("waiting for %s ...\n", GOLDEN);
        sleep(2);
    }
    fail_msg("%s is missing (scripts/gen_golden_tokenizer.py writes it)", GOLDEN);
    return NULL;
}

static void report_mismatch(const char *what, const char *text, const int32_t *got, int n, json_t *want)
{
    json_t *g = ids_json(got, n);
    char *gs = json_dumps(g, JSON_COMPACT), *ws = json_dumps(want, JSON_COMPACT);
    fprintf(stderr, "MISMATCH %s for %.80s\n  got  %s\n  want %s\n", what, text, gs, ws);
    free(gs);
    free(ws);
    json_decref(g);
}

static void test_golden_smollm2(void **state)
{
    (void)state;
    NEED_MODEL();
    FILE *fp = open_golden();
    char *line = NULL;
    size_t lcap = 0;
    int lines = 0, ok_plain = 0, ok_special = 0, ok_decode = 0, ok_detok = 0;
    while (getline(&line, &lcap, fp) > 0) {
        json_error_t jerr;
        json_t *row = json_loads(line, JSON_ALLOW_NUL, &jerr);
        assert_non_null(row);
        json_t *jt = json_object_get(row, "text"), *jd = json_object_get(row, "decoded");
        json_t *jids = json_object_get(row, "ids"), *jsp = json_object_get(row, "ids_special");
        assert_true(json_is_string(jt) && json_is_string(jd) && json_is_array(jids) && json_is_array(jsp));
        const char *text = json_string_value(jt);
        size_t tlen = json_string_length(jt);
        lines++;

        int32_t *ids;
        int n;
        assert_int_equal(tok_encode(g_vocab, text, tlen, false, false, &ids, &n), 0);
        if (json_ids_eq(jids, ids, n))
            ok_plain++;
        else
            report_mismatch("ids", text, ids, n, jids);
        free(ids);
        assert_int_equal(tok_encode(g_vocab, text, tlen, true, false, &ids, &n), 0);
        if (json_ids_eq(jsp, ids, n))
            ok_special++;
        else
            report_mismatch("ids_special", text, ids, n, jsp);
        free(ids);

        /* decode the REFERENCE ids (plain and special), keeping special text */
        int32_t *ref = json_ids(jids, &n), *refs;
        int ns;
        refs = json_ids(jsp, &ns);
        char *s1, *s2;
        size_t l1, l2;
        assert_int_equal(tok_decode(g_vocab, ref, n, false, &s1, &l1), 0);
        assert_int_equal(tok_decode(g_vocab, refs, ns, false, &s2, &l2), 0);
        size_t dlen = json_string_length(jd);
        if (l1 == dlen && l2 == dlen && !memcmp(s1, json_string_value(jd), dlen) &&
            !memcmp(s2, json_string_value(jd), dlen))
            ok_decode++;
        else
            fprintf(stderr, "MISMATCH decoded for %.80s: got '%s' / '%s'\n", text, s1, s2);
        if (detok_matches(g_vocab, ref, n, tok_detok_cap(g_vocab)) &&
            detok_matches(g_vocab, refs, ns, tok_detok_cap(g_vocab)))
            ok_detok++;
        else
            fprintf(stderr, "MISMATCH incremental detok for %.80s\n", text);
        free(s1);
        free(s2);
        free(ref);
        free(refs);
        json_decref(row);
    }
    free(line);
    fclose(fp);
    printf("golden %s: %d lines; ids %d/%d, ids_special %d/%d, decoded %d/%d, incremental detok %d/%d\n",
           GOLDEN, lines, ok_plain, lines, ok_special, lines, ok_decode, lines, ok_detok, lines);
    assert_true(lines > 0);
    assert_int_equal(ok_plain, lines);
    assert_int_equal(ok_special, lines);
    assert_int_equal(ok_decode, lines);
    assert_int_equal(ok_detok, lines);
}

/* ---- SmolLM2 facts and behaviour on the real vocabulary ---- */

static void test_smollm2_vocab(void **state)
{
    (void)state;
    NEED_MODEL();
    assert_int_equal(tok_n_vocab(g_vocab), 49152);
    assert_int_equal(tok_bos(g_vocab), 1);
    assert_int_equal(tok_eos(g_vocab), 2);
    assert_false(tok_add_bos(g_vocab));
    assert_int_equal(tok_pad(g_vocab), 2);
    assert_int_equal(tok_unk(g_vocab), 0);
    assert_string_equal(tok_hf_class(g_vocab), "GPT2TokenizerFast");
    /* the raw template, kept verbatim (GET /tokenizer_info hands it to clients that render it) */
    const char *tmpl = tok_chat_template(g_vocab);
    assert_non_null(tmpl);
    assert_int_equal(strncmp(tmpl, "{% for message in messages %}", 29), 0);
    assert_non_null(strstr(tmpl, "You are a helpful AI assistant named SmolLM"));
    assert_string_equal(tmpl + strlen(tmpl) - 11, "{% endif %}");
    assert_string_equal(tok_text(g_vocab, 1), "<|im_start|>");
    assert_string_equal(tok_text(g_vocab, 2), "<|im_end|>");
    assert_null(tok_text(g_vocab, 49152));
    assert_null(tok_text(g_vocab, -1));
    assert_true(tok_is_eog(g_vocab, 2));
    assert_true(tok_is_eog(g_vocab, 0)); /* <|endoftext|> */
    assert_false(tok_is_eog(g_vocab, 1));
    assert_false(tok_is_eog(g_vocab, 100));
    assert_true(tok_is_control(g_vocab, 1));
    assert_false(tok_is_control(g_vocab, 100));

    /* add_bos prepends <|im_start|> (SmolLM2's BOS) only when asked */
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(g_vocab, "Hi", 2, false, true, &ids, &n), 0);
    assert_true(n >= 2);
    assert_int_equal(ids[0], 1);
    free(ids);
    assert_int_equal(tok_encode(g_vocab, "", 0, true, false, &ids, &n), 0);
    assert_int_equal(n, 0);
    free(ids);

    /* skip_special drops control text; keeping it restores it */
    const int32_t chat[] = {1, 4093, 198, 26843, 2, 198}; /* golden: "<|im_start|>user\nHi<|im_end|>\n" */
    expect_decode(g_vocab, chat, 6, false, "<|im_start|>user\nHi<|im_end|>\n");
    expect_decode(g_vocab, chat, 6, true, "user\nHi\n");
    /* out-of-range ids decode to nothing rather than crash */
    const int32_t bad[] = {-5, 49152, 4093};
    expect_decode(g_vocab, bad, 3, false, "user");
}

/* Invalid UTF-8 input is tokenised byte-wise and decodes back with U+FFFD per maximal invalid
 * subpart, as Rust's from_utf8_lossy does. SmolLM2's vocabulary lacks the byte-level characters
 * of 21 bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5..0xFF): like
 * HF tokenizers' BPE with unk_token set, such a byte becomes the unknown token (id 0,
 * <|endoftext|>). */
static void test_invalid_utf8(void **state)
{
    (void)state;
    NEED_MODEL();
    const char text[] = "a\xC3(\xE2\x82 \xF0\x9F\x98\x80\xFF";
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(g_vocab, text, sizeof text - 1, false, false, &ids, &n), 0);
    assert_true(n > 0);
    char *s;
    size_t len;
    assert_int_equal(tok_decode(g_vocab, ids, n, false, &s, &len), 0);
    assert_int_equal(ids[n - 1], 0);
    assert_string_equal(s, "a\xEF\xBF\xBD(\xEF\xBF\xBD \xF0\x9F\x98\x80<|endoftext|>");
    free(s);
    assert_int_equal(tok_decode(g_vocab, ids, n, true, &s, &len), 0);
    assert_string_equal(s, "a\xEF\xBF\xBD(\xEF\xBF\xBD \xF0\x9F\x98\x80");
    assert_true(detok_matches(g_vocab, ids, n, tok_detok_cap(g_vocab)));
    free(s);
    free(ids);
}

/* Emoji split over byte tokens: nothing comes out until the character completes; a small cap
 * drops whole characters and counts them, never writes half of one. */
static void test_detok_split_chars(void **state)
{
    (void)state;
    NEED_MODEL();
    const char *text = "\xF0\x9F\x98\x80\xF0\x9F\x98\x81 caf\xC3\xA9";
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(g_vocab, text, strlen(text), false, false, &ids, &n), 0);
    assert_true(detok_matches(g_vocab, ids, n, tok_detok_cap(g_vocab)));
    tok_detok d;
    tok_detok_init(&d, g_vocab);
    char out[4];
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        size_t m = tok_detok_push(&d, ids[i], out, sizeof out);
        assert_true(m < sizeof out && utf8_ok((unsigned char *)out, m));
        total += m;
    }
    total += tok_detok_flush(&d, out, sizeof out);
    assert_true(d.n_dropped > 0);
    assert_int_equal(total + d.n_dropped, strlen(text));
    free(ids);
}

/* ---- encode speed (reported, not asserted: timings belong to bench/) ---- */

static void test_encode_speed(void **state)
{
    (void)state;
    NEED_MODEL();
    static const char para[] =
        "The history of computing is a story of abstraction. Early machines were programmed by "
        "rewiring panels; later, stored programs let the same hardware run many tasks. In 1957 "
        "FORTRAN showed that a compiler could produce code nearly as fast as hand-written assembly, "
        "and by the 1970s C had made portable systems programming practical. Today's large language "
        "models sit atop dozens of such layers: tokenizers turn text into integers, embeddings turn "
        "integers into vectors, and attention mixes those vectors across a context of 8,192 tokens "
        "or more. Each layer hides the one below it, yet each leaks a little: a tokenizer's choice "
        "to split digits one by one (\"2024\" -> 2, 0, 2, 4) changes how well a model adds numbers; "
        "whitespace handling decides whether code indentation costs one token or eight. Engineers "
        "who serve these models care about every microsecond, because a request's time-to-first-"
        "token includes tokenizing its prompt, which may be thousands of words long. Caf\xC3\xA9s in "
        "M\xC3\xBCnchen, na\xC3\xAFve r\xC3\xA9sum\xC3\xA9s, and \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E "
        "text all pass through the same byte-level machinery. Let's not forget punctuation!!! -- "
        "or emoji \xF0\x9F\x98\x80 -- either. The quick brown fox jumps over the lazy dog; "
        "the five boxing wizards jump quickly; pack my box with five dozen liquor jugs. In the "
        "end, we'll measure throughput in megabytes per second and latency in microseconds, and "
        "we'd like both numbers to be boring. Numbers like 3.14159, 2.71828 and 1,000,000 appear "
        "often; so do URLs such as https://example.com/path?query=value&x=1 and e-mail addresses. "
        "A tokenizer that takes a millisecond per paragraph is too slow for a busy server. So we "
        "keep a hash map from token text to id, another from merge pair to rank, and a small heap "
        "per word; nothing else is needed to match the reference byte for byte. Prompts arrive as "
        "chat messages, wrapped in a template, and are tokenised once per request before prefill. "
        "Streaming replies go the other way: ids come back one at a time and are detokenised "
        "incrementally, holding back the bytes of a character split across tokens.";
    size_t len = sizeof para - 1;
    int32_t *ids;
    int n, reps = 200;
    assert_true(len >= 2000);
    assert_int_equal(tok_encode(g_vocab, para, len, false, false, &ids, &n), 0);
    free(ids);
    double t0 = hy_now();
    for (int i = 0; i < reps; i++) {
        assert_int_equal(tok_encode(g_vocab, para, len, false, false, &ids, &n), 0);
        free(ids);
    }
    double dt = (hy_now() - t0) / reps;
    printf("encode speed: %zu-byte paragraph -> %d tokens in %.1f us (%.1f MB/s)\n", len, n, dt * 1e6,
           (double)len / dt / 1e6);
}

/* ---- pre-tokenizers, hand-derived from the regexes ---- */

typedef struct {
    char pieces[32][32];
    int n;
} pieces;

static int collect(void *ctx, const char *s, size_t len)
{
    pieces *p = ctx;
    assert_true(p->n < 32 && len < 32);
    memcpy(p->pieces[p->n], s, len);
    p->pieces[p->n][len] = '\0';
    p->n++;
    return 0;
}

/* want: pieces separated by '|' (no test text contains '|') */
static void expect_split(tok_pre pre, const char *text, const char *want)
{
    pieces p = {.n = 0};
    assert_int_equal(tok_pretok_run(pre, text, strlen(text), collect, &p), 0);
    char got[1024] = "";
    for (int i = 0; i < p.n; i++) {
        if (i)
            strcat(got, "|");
        strcat(got, p.pieces[i]);
    }
    if (strcmp(got, want))
        fprintf(stderr, "split of '%s': got '%s' want '%s'\n", text, got, want);
    assert_string_equal(got, want);
}

static void test_pretok_gpt2(void **state)
{
    (void)state;
    /* ' ?\p{L}+' keeps one leading space; contractions are case-sensitive */
    expect_split(TOK_PRE_GPT2, "Hello world's 123 test", "Hello| world|'s| 123| test");
    expect_split(TOK_PRE_GPT2, "don't I'M", "don|'t| I|'|M");
    /* '\s+(?!\S)' leaves the last space of a run for the next word */
    expect_split(TOK_PRE_GPT2, "a  b", "a| | b");
    expect_split(TOK_PRE_GPT2, "a \n b", "a| \n| b");
    expect_split(TOK_PRE_GPT2, "x   ", "x|   ");
    expect_split(TOK_PRE_GPT2, "!!? ok", "!!?| ok");
    expect_split(TOK_PRE_GPT2, "a\n\nb", "a|\n|\n|b");
    /* Unicode letters and numbers: é, ö, CJK are \p{L}; U+0663 ARABIC-INDIC THREE is \p{N};
     * U+00A0 NO-BREAK SPACE is \s but not ' ' so it does not join the next word */
    expect_split(TOK_PRE_GPT2, "h\xC3\xA9llo w\xC3\xB6rld", "h\xC3\xA9llo| w\xC3\xB6rld");
    expect_split(TOK_PRE_GPT2, "\xE6\x97\xA5\xE6\x9C\xAC 7\xD9\xA3", "\xE6\x97\xA5\xE6\x9C\xAC| 7\xD9\xA3");
    expect_split(TOK_PRE_GPT2, "a\xC2\xA0" "b", "a|\xC2\xA0|b");
}

static void test_pretok_smollm(void **state)
{
    (void)state;
    /* every digit alone; the regex then runs on each stretch between digits on its own */
    expect_split(TOK_PRE_SMOLLM, "abc123def", "abc|1|2|3|def");
    expect_split(TOK_PRE_SMOLLM, "a 12", "a| |1|2");
    expect_split(TOK_PRE_SMOLLM, "x  1", "x|  |1");
    expect_split(TOK_PRE_SMOLLM, "v2.0 ok", "v|2|.|0| ok");
}

static void test_pretok_llama3(void **state)
{
    (void)state;
    /* numbers in groups of at most three; a space before digits stands alone */
    expect_split(TOK_PRE_LLAMA3, "Hello world's 12345", "Hello| world|'s| |123|45");
    /* contractions are case-insensitive */
    expect_split(TOK_PRE_LLAMA3, "I'M", "I|'M");
    /* ... under Unicode case folding, where U+017F LONG S folds to 's' */
    expect_split(TOK_PRE_LLAMA3, "'\xC5\xBF" "b", "'\xC5\xBF|b");
    /* one non-letter, non-digit, non-newline character may lead a word */
    expect_split(TOK_PRE_LLAMA3, "(hello \tfoo", "(hello| |\tfoo");
    /* '\s*[\r\n]+' ends after the last newline of a white-space run */
    expect_split(TOK_PRE_LLAMA3, "a\n\nb", "a|\n\n|b");
    expect_split(TOK_PRE_LLAMA3, "x  \n  y", "x|  \n| | y");
    /* punctuation swallows the newlines after it */
    expect_split(TOK_PRE_LLAMA3, "!!\n\nx", "!!\n\n|x");
    expect_split(TOK_PRE_LLAMA3, "x   ", "x|   ");
}

/* ---- tiny BPE vocabularies ---- */

/* Byte-level characters: a..e are themselves, Ġ (U+0120) is the space. */
static gguf_file *tiny_bpe(const char *pre)
{
    static const char *const toks[] = {"a", "b", "c", "d", "e", "\xC4\xA0", "ab", "bc", "abc",
                                       "\xC4\xA0" "a", "cd", "<x>", "<", "x", ">", "abcd", "\xC4\xA0" "ab"};
    static const int32_t types[] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1};
    /* merges by rank: 0 "b c", 1 "a b", 2 "a bc", 3 "Ġ a", 4 "c d", 5 "Ġa b" */
    static const char *const merges[] = {"b c", "a b", "a bc", "\xC4\xA0 a", "c d", "\xC4\xA0" "a b"};
    gw b;
    gw_begin(&b);
    kv_str(&b, "tokenizer.ggml.model", "gpt2");
    if (pre)
        kv_str(&b, "tokenizer.ggml.pre", pre);
    kv_strs(&b, "tokenizer.ggml.tokens", toks, 17);
    kv_i32s(&b, "tokenizer.ggml.token_type", types, 17);
    kv_strs(&b, "tokenizer.ggml.merges", merges, 6);
    return gw_end(&b);
}

static void test_tiny_bpe(void **state)
{
    (void)state;
    gguf_file *f = tiny_bpe("gpt2");
    tok_vocab *v;
    assert_int_equal(tok_load(f, &v), 0);
    /* "abc": b c (rank 0) first -> a bc -> abc (rank 2). Not "ab" + "c". */
    expect_ids(v, "abc", false, false, (int32_t[]){8}, 1);
    /* "abcd": b c -> a,bc,d; then a bc (2) beats nothing else ("bc d" is no merge) -> abc,d;
     * "abcd" exists in the vocabulary but no merge builds it. */
    expect_ids(v, "abcd", false, false, (int32_t[]){8, 3}, 2);
    /* " ab": Ġ a (rank 3) waits for a b (rank 1): a b -> Ġ,ab; then "Ġ ab" is no merge. */
    expect_ids(v, " ab", false, false, (int32_t[]){5, 6}, 2);
    /* "cdcd": c d merges twice, the left pair first */
    expect_ids(v, "cdcd", false, false, (int32_t[]){10, 10}, 2);
    /* user-defined "<x>" is one token only with special parsing */
    expect_ids(v, "a<x>b", true, false, (int32_t[]){0, 11, 1}, 3);
    expect_ids(v, "a<x>b", false, false, (int32_t[]){0, 12, 13, 14, 1}, 5);
    /* user-defined tokens are not control tokens: decode keeps them even with skip_special */
    expect_decode(v, (int32_t[]){0, 11, 1}, 3, true, "a<x>b");
    expect_decode(v, (int32_t[]){9, 1}, 2, true, " ab");
    assert_null(tok_chat_template(v)); /* the tiny file has none */
    assert_int_equal(tok_pad(v), -1);
    tok_free(v);
    mem_close(f);

    /* llama-bpe ignores merges for a pre-token that is in the vocabulary: "abcd" is one token */
    f = tiny_bpe("llama-bpe");
    assert_int_equal(tok_load(f, &v), 0);
    expect_ids(v, "abcd", false, false, (int32_t[]){15}, 1);
    expect_ids(v, "abc", false, false, (int32_t[]){8}, 1);
    tok_free(v);
    mem_close(f);

    /* an unknown pre-tokenizer is refused by name */
    f = tiny_bpe("qwen9");
    v = NULL;
    assert_int_equal(tok_load(f, &v), HY_EUNSUPPORTED);
    assert_null(v);
    assert_non_null(strstr(hy_err_msg(), "qwen9"));
    mem_close(f);
}

static void test_bad_vocab(void **state)
{
    (void)state;
    gw b;
    tok_vocab *v = NULL;
    gguf_file *f;
    /* unknown model kind */
    gw_begin(&b);
    kv_str(&b, "tokenizer.ggml.model", "rwkv");
    kv_strs(&b, "tokenizer.ggml.tokens", (const char *const[]){"a"}, 1);
    f = gw_end(&b);
    assert_int_equal(tok_load(f, &v), HY_EUNSUPPORTED);
    assert_non_null(strstr(hy_err_msg(), "rwkv"));
    mem_close(f);
    /* token_type of the wrong length */
    gw_begin(&b);
    kv_str(&b, "tokenizer.ggml.model", "gpt2");
    kv_strs(&b, "tokenizer.ggml.tokens", (const char *const[]){"a", "b"}, 2);
    kv_i32s(&b, "tokenizer.ggml.token_type", (const int32_t[]){1}, 1);
    f = gw_end(&b);
    assert_int_equal(tok_load(f, &v), HY_EFORMAT);
    assert_non_null(strstr(hy_err_msg(), "token_type"));
    mem_close(f);
    /* no tokens */
    gw_begin(&b);
    kv_str(&b, "tokenizer.ggml.model", "gpt2");
    f = gw_end(&b);
    assert_int_equal(tok_load(f, &v), HY_ENOTFOUND);
    assert_non_null(strstr(hy_err_msg(), "tokenizer.ggml.tokens"));
    mem_close(f);
    assert_null(v);
}

/* ---- a tiny SentencePiece ("llama") vocabulary ---- */

static gguf_file *tiny_spm(void)
{
    /* id: text (type, score) */
    static const char *const toks[] = {
        "<unk>",  /* 0  unknown */
        "<s>",    /* 1  control (BOS) */
        "</s>",   /* 2  control (EOS) */
        "<0x0A>", /* 3  byte \n */
        "<0xC3>", /* 4  byte */
        "<0xA9>", /* 5  byte (C3 A9 is é) */
        "\xE2\x96\x81",        /* 6  ▁   -1 */
        "a",                   /* 7  a   -2 */
        "b",                   /* 8  b   -3 */
        "c",                   /* 9  c   -4 */
        "ab",                  /* 10 ab  -5 */
        "bc",                  /* 11 bc  -1.5 */
        "\xE2\x96\x81" "a",    /* 12 ▁a  -6 */
        "abc",                 /* 13 abc -7 */
        "\xE2\x96\x81" "ab",   /* 14 ▁ab -0.5 */
        "<",                   /* 15     -10 */
        "s",                   /* 16     -10 */
        ">",                   /* 17     -10 */
        "aa",                  /* 18 aa  -2 */
    };
    static const int32_t types[] = {2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    static const float scores[] = {0, 0, 0, 0, 0, 0, -1, -2, -3, -4, -5, -1.5f, -6, -7, -0.5f, -10, -10, -10, -2};
    gw bb, *b = &bb;
    gw_begin(b);
    kv_str(b, "tokenizer.ggml.model", "llama");
    kv_strs(b, "tokenizer.ggml.tokens", toks, 19);
    kv_i32s(b, "tokenizer.ggml.token_type", types, 19);
    kv_f32s(b, "tokenizer.ggml.scores", scores, 19);
    kv_u32(b, "tokenizer.ggml.bos_token_id", 1);
    kv_u32(b, "tokenizer.ggml.eos_token_id", 2);
    kv_u32(b, "tokenizer.ggml.unknown_token_id", 0);
    kv_bool(b, "tokenizer.ggml.add_space_prefix", true);
    kv_bool(b, "tokenizer.ggml.add_bos_token", true);
    return gw_end(b);
}

static void test_spm(void **state)
{
    (void)state;
    gguf_file *f = tiny_spm();
    tok_vocab *v;
    assert_int_equal(tok_load(f, &v), 0);
    mem_close(f);
    assert_true(tok_add_bos(v));
    assert_int_equal(tok_bos(v), 1);
    assert_true(tok_is_eog(v, 2));

    /* "abc" -> "▁abc" = ▁ a b c. Pairs: ▁a -6, ab -5, bc -1.5: bc wins -> ▁ a bc.
     * Pairs: ▁a -6, "abc" -7: ▁a wins -> ▁a bc; "▁abc" is not a piece. [▁a, bc]. */
    expect_ids(v, "abc", false, false, (int32_t[]){12, 11}, 2);
    /* "ab" -> ▁ a b: ab -5 beats ▁a -6 -> ▁ ab; then ▁ab -0.5 -> [▁ab]. */
    expect_ids(v, "ab", false, false, (int32_t[]){14}, 1);
    /* add_bos prepends <s> */
    expect_ids(v, "ab", false, true, (int32_t[]){1, 14}, 2);
    /* "a b" -> ▁ a ▁ b: only ▁a merges (a▁, ▁b are not pieces) -> [▁a, ▁, b]. */
    expect_ids(v, "a b", false, false, (int32_t[]){12, 6, 8}, 3);
    /* "é" is no piece: byte fallback to <0xC3> <0xA9> after ▁. */
    expect_ids(v, "\xC3\xA9", false, false, (int32_t[]){6, 4, 5}, 3);
    /* "\n" is no piece: <0x0A>; ▁a merges around it. */
    expect_ids(v, "a\nb", false, false, (int32_t[]){12, 3, 8}, 3);
    /* "z" has neither a piece nor a byte token: <unk>. */
    expect_ids(v, "z", false, false, (int32_t[]){6, 0}, 2);
    /* equal scores: "aaa" -> ▁ a a a, pairs ▁a -6, aa -2 (at 1), aa -2 (at 2): the LEFT aa wins
     * -> ▁ aa a; "▁aa", "aaa" are not pieces -> [▁, aa, a] (the right one would give [▁a, aa]). */
    expect_ids(v, "aaa", false, false, (int32_t[]){6, 18, 7}, 3);
    /* special parsing: <s> is a token and the text after it gets its own space prefix. */
    expect_ids(v, "<s>ab", true, false, (int32_t[]){1, 14}, 2);
    /* without it "<s>" is text: ▁ < s > ab (▁< is no piece, ▁ and ab are not adjacent). */
    expect_ids(v, "<s>ab", false, false, (int32_t[]){6, 15, 16, 17, 10}, 5);
    /* the text "<0x0A>" never turns into the byte token: < 0 x ... are not pieces -> bytes/unk */
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(v, "<0x0A>", 6, true, false, &ids, &n), 0);
    for (int i = 0; i < n; i++)
        assert_int_not_equal(ids[i], 3);
    free(ids);

    /* decoding: ▁ -> space, the first piece loses its prefix space, bytes join into é */
    expect_decode(v, (int32_t[]){12, 11}, 2, false, "abc");
    expect_decode(v, (int32_t[]){12, 6, 8}, 3, false, "a b");
    expect_decode(v, (int32_t[]){6, 4, 5}, 3, false, "\xC3\xA9");
    expect_decode(v, (int32_t[]){1, 14, 2}, 3, true, "ab");
    expect_decode(v, (int32_t[]){1, 14, 2}, 3, false, "<s> ab</s>");
    /* a lone byte of a multi-byte character decodes to U+FFFD */
    expect_decode(v, (int32_t[]){4}, 1, false, "\xEF\xBF\xBD");
    expect_decode(v, (int32_t[]){4, 7}, 2, false, "\xEF\xBF\xBD" "a");
    assert_true(detok_matches(v, (int32_t[]){1, 6, 4, 5, 12, 4, 3}, 7, tok_detok_cap(v)));

    /* incremental: the é arrives only with its second byte */
    tok_detok d;
    char out[64];
    tok_detok_init(&d, v);
    assert_int_equal(tok_detok_push(&d, 1, out, sizeof out), 0);
    assert_int_equal(tok_detok_push(&d, 12, out, sizeof out), 1);
    assert_string_equal(out, "a");
    assert_int_equal(tok_detok_push(&d, 4, out, sizeof out), 0);
    assert_int_equal(tok_detok_push(&d, 5, out, sizeof out), 2);
    assert_string_equal(out, "\xC3\xA9");
    assert_int_equal(tok_detok_push(&d, 6, out, sizeof out), 1);
    assert_string_equal(out, " ");
    assert_int_equal(tok_detok_push(&d, 4, out, sizeof out), 0);
    assert_int_equal(tok_detok_flush(&d, out, sizeof out), 3);
    assert_string_equal(out, "\xEF\xBF\xBD");
    tok_free(v);
}

/* ---- chat templates ---- */

static void expect_chat(tok_chat_kind k, const tok_msg *m, int n, bool gen, const char *want)
{
    char *s;
    assert_int_equal(tok_chat_apply(k, m, n, gen, &s), 0);
    if (strcmp(s, want))
        fprintf(stderr, "chat %s: got\n%s\nwant\n%s\n", tok_chat_name(k), s, want);
    assert_string_equal(s, want);
    free(s);
}

/* SmolLM2's template, read from the GGUF:
 *   {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}
 *   {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
 *   {% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
 *   {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
 * The expected strings below are that text expanded by hand. */
static void test_chat_chatml(void **state)
{
    (void)state;
    NEED_MODEL();
    gguf_str t;
    assert_int_equal(gguf_get_str(g_model, "tokenizer.chat_template", &t), 0);
    /* (the jinja string literals in the file hold real newlines) */
    const char *parts[] = {"loop.first and messages[0]['role'] != 'system'",
                           "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                           "Hugging Face<|im_end|>\n'",
                           "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'",
                           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"};
    for (size_t i = 0; i < HY_ARRAY_LEN(parts); i++)
        assert_non_null(memmem(t.ptr, t.len, parts[i], strlen(parts[i])));

    tok_chat_kind k;
    assert_int_equal(tok_chat_detect(g_model, NULL, &k), 0);
    assert_int_equal(k, TOK_CHAT_CHATML);

    const tok_msg user_only[] = {{"user", "Hi there"}};
    expect_chat(k, user_only, 1, true,
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n");
    expect_chat(k, user_only, 1, false,
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n");
    const tok_msg with_sys[] = {{"system", "Be brief."}, {"user", "2+2?"}, {"assistant", "4"}, {"user", "x"}};
    expect_chat(k, with_sys, 4, true,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
    /* a system message later than first does not suppress the default */
    const tok_msg late_sys[] = {{"user", "a"}, {"system", "s"}};
    expect_chat(k, late_sys, 2, false,
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\na<|im_end|>\n<|im_start|>system\ns<|im_end|>\n");
    /* no messages: the loop never runs, so no default system block */
    expect_chat(k, NULL, 0, true, "<|im_start|>assistant\n");
    expect_chat(TOK_CHAT_CHATML_PLAIN, user_only, 1, true,
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");

    /* the rendered prompt tokenises with <|im_start|> / <|im_end|> as single tokens */
    char *s;
    int32_t *ids;
    int n;
    assert_int_equal(tok_chat_apply(k, user_only, 1, true, &s), 0);
    assert_int_equal(tok_encode(g_vocab, s, strlen(s), true, false, &ids, &n), 0);
    assert_int_equal(ids[0], 1);
    int n_start = 0, n_end = 0;
    for (int i = 0; i < n; i++)
        n_start += ids[i] == 1, n_end += ids[i] == 2;
    assert_int_equal(n_start, 3);
    assert_int_equal(n_end, 2);
    free(ids);
    free(s);
}

static void test_chat_others(void **state)
{
    (void)state;
    const tok_msg conv[] = {{"system", "Sys"}, {"user", " Hello "}, {"assistant", "Hi!\n"}, {"user", "Bye"}};
    /* Llama 3: header, two newlines, trimmed content, <|eot_id|>; BOS left to the tokenizer */
    expect_chat(TOK_CHAT_LLAMA3, conv, 4, true,
                "<|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHi!<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n");
    /* Llama 2: system folded into the first [INST]; first <s> left to the tokenizer. The template
     * strips '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content as a whole, so " Hello " keeps its
     * leading space there but not in a turn without the system block. */
    expect_chat(TOK_CHAT_LLAMA2, conv, 4, true,
                "[INST] <<SYS>>\nSys\n<</SYS>>\n\n Hello [/INST] Hi! </s><s>[INST] Bye [/INST]");
    expect_chat(TOK_CHAT_LLAMA2, conv + 1, 1, false, "[INST] Hello [/INST]");
    /* Zephyr: <|role|>\ncontent</s>\n, generation prompt <|assistant|>\n */
    expect_chat(TOK_CHAT_ZEPHYR, conv, 3, true,
                "<|system|>\nSys</s>\n<|user|>\n Hello </s>\n<|assistant|>\nHi!\n</s>\n<|assistant|>\n");

    char *s = NULL;
    const tok_msg bad_order[] = {{"user", "a"}, {"user", "b"}};
    assert_int_equal(tok_chat_apply(TOK_CHAT_LLAMA2, bad_order, 2, true, &s), HY_EINVAL);
    assert_non_null(strstr(hy_err_msg(), "alternate"));
    const tok_msg bad_role[] = {{"tool", "a"}};
    assert_int_equal(tok_chat_apply(TOK_CHAT_ZEPHYR, bad_role, 1, true, &s), HY_EINVAL);
    assert_int_equal(tok_chat_apply(TOK_CHAT_NONE, conv, 1, true, &s), HY_EINVAL);
    const tok_msg no_content[] = {{"user", NULL}};
    assert_int_equal(tok_chat_apply(TOK_CHAT_CHATML, no_content, 1, true, &s), HY_EINVAL);
    assert_null(s);
}

static gguf_file *with_template(const char *tmpl)
{
    gw b;
    gw_begin(&b);
    if (tmpl)
        kv_str(&b, "tokenizer.chat_template", tmpl);
    kv_u32(&b, "x.pad", 0);
    return gw_end(&b);
}

static void test_chat_detect(void **state)
{
    (void)state;
    static const struct {
        const char *tmpl;
        tok_chat_kind want;
    } cases[] = {
        {"{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
         "{% endfor %}", TOK_CHAT_CHATML_PLAIN},
        {"{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
         "<|im_end|>\\n' }}", TOK_CHAT_CHATML},
        {"{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>", TOK_CHAT_LLAMA3},
        {"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}", TOK_CHAT_LLAMA2},
        {"{{ '<|user|>\\n' + message['content'] + eos_token }}", TOK_CHAT_ZEPHYR},
    };
    tok_chat_kind k;
    for (size_t i = 0; i < HY_ARRAY_LEN(cases); i++) {
        gguf_file *f = with_template(cases[i].tmpl);
        assert_int_equal(tok_chat_detect(f, NULL, &k), 0);
        assert_int_equal(k, cases[i].want);
        /* a name overrides whatever the file says */
        assert_int_equal(tok_chat_detect(f, "zephyr", &k), 0);
        assert_int_equal(k, TOK_CHAT_ZEPHYR);
        mem_close(f);
    }
    gguf_file *f = with_template("{{ messages | tojson }}");
    assert_int_equal(tok_chat_detect(f, NULL, &k), HY_EUNSUPPORTED);
    assert_non_null(strstr(hy_err_msg(), "chat template"));
    assert_int_equal(tok_chat_detect(f, "llama3", &k), 0);
    assert_int_equal(k, TOK_CHAT_LLAMA3);
    assert_int_equal(tok_chat_detect(f, "vicuna", &k), HY_EUNSUPPORTED);
    assert_non_null(strstr(hy_err_msg(), "vicuna"));
    mem_close(f);
    f = with_template(NULL);
    assert_int_equal(tok_chat_detect(f, NULL, &k), HY_ENOTFOUND);
    assert_int_equal(tok_chat_detect(f, "chatml", &k), 0);
    assert_int_equal(k, TOK_CHAT_CHATML);
    mem_close(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pretok_gpt2),
        cmocka_unit_test(test_pretok_smollm),
        cmocka_unit_test(test_pretok_llama3),
        cmocka_unit_test(test_tiny_bpe),
        cmocka_unit_test(test_bad_vocab),
        cmocka_unit_test(test_spm),
        cmocka_unit_test(test_chat_others),
        cmocka_unit_test(test_chat_detect),
        cmocka_unit_test(test_smollm2_vocab),
        cmocka_unit_test(test_golden_smollm2),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_detok_split_chars),
        cmocka_unit_test(test_chat_chatml),
        cmocka_unit_test(test_encode_speed),
    };
    return cmocka_run_group_tests(tests, setup_model, teardown_model);
}
