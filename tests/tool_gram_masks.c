/* tool_gram_masks.c - prints the token masks engine/gram.h gives along token paths read from
 * stdin, for tests/e2e/test_gram_llguidance.py to compare with llguidance's. A helper the tests
 * drive, not a test: it judges nothing, and nothing in hydrad links it.
 *
 * Usage: tool_gram_masks MODEL.gguf (--schema FILE.json | --gbnf FILE.gbnf) [--ws-flexible]
 * stdin, one path a line: "H id id ..." or "M id id ..." (the path may be empty). For each path a
 * fresh matcher prints, for i = 0..n, the mask after accepting i tokens: H "i popcount fnv" (FNV-1a
 * 64 over the mask's uint32 words as little-endian bytes, 16 hex digits), M "i id id ..." (allowed
 * ids ascending). A token the matcher refuses prints "REJECT i" (i tokens were accepted); a matcher
 * error prints "ERROR i NAME: message". Each path ends with "END" and a flush. Bad usage, input or
 * grammar: a message on stderr and exit status 2. */
#include "engine/gguf.h"
#include "engine/gram.h"
#include "engine/gram_schema.h"
#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *model, *schema, *gbnf;
    bool ws_flexible;
} tm_opts;

/* What every path needs: the compiled grammar, the model's vocabulary as gram sees it, a mask. */
typedef struct {
    gguf_file *f;
    tok_vocab *v;
    gram *g;
    gram_vocab *gv;
    int n_vocab;
    size_t n_words;
    uint32_t *mask;
} tm_ctx;

static int tm_usage(void)
{
    fprintf(stderr, "usage: tool_gram_masks MODEL.gguf (--schema FILE.json | --gbnf FILE.gbnf) "
                    "[--ws-flexible] < paths\n");
    return 2;
}

static int tm_parse_args(int argc, char **argv, tm_opts *o)
{
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--schema") && i + 1 < argc)
            o->schema = argv[++i];
        else if (!strcmp(argv[i], "--gbnf") && i + 1 < argc)
            o->gbnf = argv[++i];
        else if (!strcmp(argv[i], "--ws-flexible"))
            o->ws_flexible = true;
        else if (argv[i][0] != '-' && !o->model)
            o->model = argv[i];
        else
            return HY_EINVAL;
    }
    if (!o->model || !o->schema == !o->gbnf)
        return HY_EINVAL;
    return 0;
}

/* Whole file into a malloc'ed, NUL-terminated buffer the caller frees. */
static int tm_read_file(const char *path, char **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return hy_err_set(HY_EIO, "%s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1)
            break;
        char *p = cap <= SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
        if (!p) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = p;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf)
        return hy_err_set(HY_ENOMEM, "%s: out of memory", path);
    if (bad) {
        free(buf);
        return hy_err_set(HY_EIO, "%s: read error", path);
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

/* The GBNF text to compile: the --gbnf file as is, or the --schema file translated. *text is
 * malloc'ed, owned by the caller. */
static int tm_grammar_text(const tm_opts *o, char **text, size_t *len)
{
    if (o->gbnf)
        return tm_read_file(o->gbnf, text, len);
    json_error_t je;
    json_t *schema = json_load_file(o->schema, 0, &je);
    if (!schema)
        return hy_err_set(HY_EINVAL, "%s:%d:%d: %s", o->schema, je.line, je.column, je.text);
    gram_json_opts jo = {.ws_flexible = o->ws_flexible};
    gram_schema_err se;
    memset(&se, 0, sizeof se);
    int rc = gram_schema_gbnf(schema, &jo, text, &se);
    json_decref(schema);
    if (rc)
        return hy_err_set(rc, "%s: %s (at \"%s\"%s%s)", o->schema, se.message, se.pointer,
                          se.keyword[0] ? ", keyword " : "", se.keyword);
    *len = strlen(*text);
    return 0;
}

static void tm_ctx_free(tm_ctx *c)
{
    free(c->mask);
    gram_vocab_free(c->gv);
    gram_release(c->g);
    tok_free(c->v);
    gguf_close(c->f);
    memset(c, 0, sizeof *c);
}

static int tm_ctx_init(const tm_opts *o, tm_ctx *c)
{
    char err[512] = "";
    char *text = NULL;
    size_t len = 0;
    memset(c, 0, sizeof *c);
    int rc = tm_grammar_text(o, &text, &len);
    if (rc)
        goto fail;
    rc = gram_compile(text, len, &c->g, err, sizeof err);
    if (rc) {
        hy_err_set(rc, "%s: grammar does not compile: %s", o->gbnf ? o->gbnf : o->schema, err);
        goto fail;
    }
    if ((rc = gguf_open(o->model, &c->f)) || (rc = tok_load(c->f, &c->v)) ||
        (rc = gram_vocab_create(c->v, &c->gv))) {
        hy_err_wrap(rc, "%s", o->model);
        goto fail;
    }
    c->n_vocab = gram_vocab_n(c->gv);
    c->n_words = ((size_t)c->n_vocab + 31) / 32;
    c->mask = calloc(c->n_words, sizeof *c->mask);
    if (!c->mask) {
        rc = hy_err_set(HY_ENOMEM, "out of memory for a mask");
        goto fail;
    }
    free(text);
    return 0;
fail:
    free(text);
    tm_ctx_free(c);
    return rc;
}

static uint64_t tm_fnv1a(const uint32_t *w, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        for (int b = 0; b < 4; b++) {
            h ^= (w[i] >> (8 * b)) & 0xffu;
            h *= 0x100000001b3ull;
        }
    return h;
}

static void tm_print_mask(const tm_ctx *c, char mode, int i)
{
    if (mode == 'H') {
        unsigned pop = 0;
        for (size_t k = 0; k < c->n_words; k++)
            pop += (unsigned)__builtin_popcount(c->mask[k]);
        printf("%d %u %016llx\n", i, pop, (unsigned long long)tm_fnv1a(c->mask, c->n_words));
        return;
    }
    printf("%d", i);
    for (int id = 0; id < c->n_vocab; id++)
        if (c->mask[id / 32] >> (id % 32) & 1u)
            printf(" %d", id);
    putchar('\n');
}

/* Bits past n_vocab are outside the mask's contract; report them rather than hide them. */
static bool tm_tail_clean(const tm_ctx *c)
{
    int tail = c->n_vocab % 32;
    return tail == 0 || (c->mask[c->n_words - 1] >> tail) == 0;
}

/* Walk one path with a fresh matcher, printing its masks. Errors here belong to the path (they
 * are printed as ERROR lines); only setup failures return non-zero. */
static int tm_run_path(tm_ctx *c, char mode, const int32_t *ids, int n)
{
    gram_matcher *m = NULL;
    int rc = gram_matcher_create(c->g, c->gv, &m);
    if (rc)
        return hy_err_wrap(rc, "gram_matcher_create");
    for (int i = 0; i <= n; i++) {
        memset(c->mask, 0, c->n_words * sizeof *c->mask);
        rc = gram_matcher_mask(m, c->mask);
        if (rc) {
            printf("ERROR %d %s: %s\n", i, hy_err_name(rc), hy_err_msg());
            break;
        }
        if (!tm_tail_clean(c)) {
            printf("ERROR %d mask has bits set past n_vocab %d\n", i, c->n_vocab);
            break;
        }
        tm_print_mask(c, mode, i);
        if (i == n)
            break;
        rc = gram_matcher_accept(m, ids[i]);
        if (rc == HY_EINVAL) {
            printf("REJECT %d\n", i);
            break;
        }
        if (rc) {
            printf("ERROR %d %s: %s\n", i, hy_err_name(rc), hy_err_msg());
            break;
        }
    }
    gram_matcher_free(m);
    printf("END\n");
    fflush(stdout);
    return 0;
}

/* Parse "H id id ..." / "M id id ..." into *mode and ids (capacity cap, grown as needed). */
static int tm_parse_line(const char *line, long lineno, int n_vocab, char *mode, int32_t **ids,
                         int *cap, int *n)
{
    if ((line[0] != 'H' && line[0] != 'M') || (line[1] && line[1] != ' ' && line[1] != '\n'))
        return hy_err_set(HY_EINVAL, "stdin line %ld: expected 'H' or 'M' and token ids", lineno);
    *mode = line[0];
    *n = 0;
    const char *p = line + 1;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
            p++;
        if (!*p)
            return 0;
        char *end;
        errno = 0;
        long id = strtol(p, &end, 10);
        if (end == p || errno || id < 0 || id >= n_vocab)
            return hy_err_set(HY_EINVAL, "stdin line %ld: bad token id \"%.*s\" (n_vocab %d)", lineno,
                              (int)HY_MIN(strcspn(p, " \t\r\n"), 20), p, n_vocab);
        if (*n == *cap) {
            int ncap = *cap ? *cap * 2 : 64;
            int32_t *q = ncap > 0 ? realloc(*ids, (size_t)ncap * sizeof **ids) : NULL;
            if (!q)
                return hy_err_set(HY_ENOMEM, "stdin line %ld: out of memory", lineno);
            *ids = q;
            *cap = ncap;
        }
        (*ids)[(*n)++] = (int32_t)id;
        p = end;
    }
}

static int tm_run(tm_ctx *c)
{
    char *line = NULL;
    size_t linecap = 0;
    int32_t *ids = NULL;
    int cap = 0, n = 0, rc = 0;
    long lineno = 0;
    while (getline(&line, &linecap, stdin) > 0) {
        lineno++;
        if (line[strspn(line, " \t\r\n")] == '\0')
            continue;
        char mode = 0;
        if ((rc = tm_parse_line(line, lineno, c->n_vocab, &mode, &ids, &cap, &n)))
            break;
        if ((rc = tm_run_path(c, mode, ids, n)))
            break;
    }
    if (!rc && ferror(stdin))
        rc = hy_err_set(HY_EIO, "reading stdin failed");
    free(ids);
    free(line);
    return rc;
}

int main(int argc, char **argv)
{
    tm_opts o;
    if (tm_parse_args(argc, argv, &o))
        return tm_usage();
    tm_ctx c;
    if (tm_ctx_init(&o, &c)) {
        fprintf(stderr, "tool_gram_masks: %s\n", hy_err_msg());
        return 2;
    }
    int rc = tm_run(&c);
    tm_ctx_free(&c);
    if (rc) {
        fprintf(stderr, "tool_gram_masks: %s\n", hy_err_msg());
        return 2;
    }
    return 0;
}
