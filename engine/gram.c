/* gram.c - GBNF grammars compiled to a pushdown automaton over UTF-8 bytes, and the set of
 * tokens a sequence may emit next. No JSON Schema (gram_schema.c), no sampling, no server.
 *
 * A grammar is a flat array of elements: each alternative of each rule is a run of CHARS (a set
 * of code point ranges) and REF (another rule) elements closed by END. A stack of the automaton
 * is a node (pos, parent): pos is the element to match next, parent the node to return to when
 * the alternative ends (-1: the sentence ends). Nodes are interned, so a stack is one int and two
 * equal stacks are the same node; a state is a small set of items (node, plus a partial UTF-8
 * character). Pushing a rule whose continuation is the end of an alternative reuses the parent
 * (a tail call), so repetitions loop back to the same node instead of growing the stack.
 *
 * Masks: the vocabulary's bytes sit in a trie; the mask of one node is found by walking the trie
 * with the set of items each byte leads to, pruning where the set empties. It is cached per node,
 * and a state's mask is the OR of its items' masks (the items run independently). Byte steps of
 * a node are memoised too, so walking the trie is mostly table lookups. */
#include "engine/gram.h"

#include "engine/hy.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { E_END = 0, E_CHARS = 1, E_REF = 2 };
#define CP_MAX 0x10FFFFu
#define MAX_EXPAND_DEPTH 2000

typedef struct {
    uint8_t kind;
    int32_t arg;        /* CHARS: first range in g->rng (count in n); REF: rule */
    int32_t n;
} elem;

typedef struct {
    uint32_t lo, hi;
} range;

typedef struct {
    int32_t pos, parent;
} node;

/* An item of a state: (node + 1) << 32 | cp << 5 | need << 3 | len; node + 1 == 0 is ACCEPT
 * (the sentence may end here). need: bytes still missing of a character whose first
 * len - need bytes gave the bits cp. */
typedef uint64_t item;
#define ITEM_ACCEPT ((item)0)
static inline item item_make(int32_t nd, uint32_t cp, int need, int len)
{
    return ((item)(uint32_t)(nd + 1) << 32) | ((item)cp << 5) | ((item)need << 3) | (item)len;
}
static inline int32_t item_node(item it) { return (int32_t)(it >> 32) - 1; }
static inline uint32_t item_cp(item it) { return (uint32_t)(it >> 5) & 0x1FFFFFu; }
static inline int item_need(item it) { return (int)(it >> 3) & 3; }
static inline int item_len(item it) { return (int)it & 7; }

/* A growable array of T. */
#define VEC(T) struct { T *v; size_t n, cap; }
#define VEC_PUSH(vec, x, fail)                                                            \
    do {                                                                                  \
        if ((vec).n == (vec).cap) {                                                       \
            size_t nc_ = (vec).cap ? (vec).cap * 2 : 16;                                  \
            void *p_ = realloc((vec).v, nc_ * sizeof *(vec).v);                           \
            if (!p_)                                                                      \
                goto fail;                                                                \
            (vec).v = p_;                                                                 \
            (vec).cap = nc_;                                                              \
        }                                                                                 \
        (vec).v[(vec).n++] = (x);                                                         \
    } while (0)

struct gram {
    atomic_int refs;
    elem *el;
    int n_el;
    range *rng;
    int n_rng;
    int32_t *alt;        /* start element of each alternative, rules' alternatives contiguous */
    int32_t *rule_alt;   /* [n_rules + 1]: rule r's alternatives are alt[rule_alt[r] .. rule_alt[r+1]) */
    int n_rules;
    int root;
    /* automaton (grows as matchers run; engine thread) */
    VEC(node) nodes;
    int32_t *hmap;       /* open addressing: node id + 1, 0 empty */
    size_t hcap;
    int32_t **memo;      /* [node] -> [128] offsets into lists (-1: not computed) */
    size_t memo_cap;
    VEC(item) lists;     /* memoised steps: count, items... */
    uint32_t **mask;     /* [node] -> cached mask of the node, or NULL */
    size_t mask_cap;
    int n_masks;         /* cached, at most GRAM_MAX_MASKS; past it masks go to `scratch` */
    uint32_t *scratch;
    const gram_vocab *gv;
    bool overflow;       /* the node cap was reached (this operation fails) */
    atomic_bool spent;   /* it was reached once: caches should compile the grammar afresh */
    int depth;
};

/* ------------------------------------------------------------------ compiling GBNF */

typedef VEC(elem) elem_vec;
typedef struct {
    char *name;
    VEC(elem_vec) alts;
    bool defined;
    const char *used_at, *def_at; /* where the text first names / defines it (errors) */
} prule;

typedef struct {
    const char *s, *end, *start;
    VEC(prule) rules;
    VEC(range) rng;
    size_t n_elems;
    char *err;
    size_t errlen;
    bool failed;
} parser;

static int perr(parser *p, const char *at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int perr(parser *p, const char *at, const char *fmt, ...)
{
    if (p->failed)
        return HY_EINVAL;
    int line = 1, col = 1;
    for (const char *c = p->start; at && c < at && c < p->end; c++, col++)
        if (*c == '\n')
            line++, col = 0;
    char msg[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    p->failed = true;
    if (at)
        hy_err_set(HY_EINVAL, "grammar: line %d column %d: %s", line, col, msg);
    else
        hy_err_set(HY_EINVAL, "grammar: %s", msg);
    if (p->err && p->errlen)
        snprintf(p->err, p->errlen, "%s", hy_err_msg());
    return HY_EINVAL;
}

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
}

/* Skip blanks and comments; newlines too when nested (inside parentheses or after ::= and |). */
static void skip_space(parser *p, bool newlines)
{
    while (p->s < p->end) {
        char c = *p->s;
        if (c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n')) {
            p->s++;
        } else if (c == '#') {
            while (p->s < p->end && *p->s != '\n')
                p->s++;
        } else {
            break;
        }
    }
}

static int rule_id(parser *p, const char *name, size_t len, bool define)
{
    for (size_t i = 0; i < p->rules.n; i++)
        if (strlen(p->rules.v[i].name) == len && !memcmp(p->rules.v[i].name, name, len)) {
            if (define && p->rules.v[i].defined)
                return perr(p, name, "rule '%.*s' is defined twice", (int)len, name), -1;
            if (define)
                p->rules.v[i].def_at = name;
            p->rules.v[i].defined |= define;
            return (int)i;
        }
    prule r = {0};
    if (!(r.name = strndup(name, len)))
        goto fail;
    r.defined = define;
    /* a name from the text points at itself; a generated one at where the parser stands */
    r.used_at = r.def_at = name >= p->start && name < p->end ? name : p->s;
    VEC_PUSH(p->rules, r, fail);
    return (int)p->rules.n - 1;
fail:
    free(r.name);
    p->failed = true;
    hy_err_set(HY_ENOMEM, "out of memory");
    return -1;
}

static int new_rule(parser *p, const char *base)
{
    char name[96];
    snprintf(name, sizeof name, "%s_%zu", base, p->rules.n);
    return rule_id(p, name, strlen(name), true);
}

/* One UTF-8 character (or an escape) of a literal or class. */
static int parse_char(parser *p, uint32_t *cp)
{
    const unsigned char *s = (const unsigned char *)p->s;
    if (p->s >= p->end)
        return perr(p, p->s, "unexpected end of grammar");
    if (*s == '\\') {
        if (p->s + 1 >= p->end)
            return perr(p, p->s, "unfinished escape");
        char e = (char)s[1];
        int hex = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
        p->s += 2;
        if (hex) {
            uint32_t v = 0;
            for (int i = 0; i < hex; i++, p->s++) {
                char h = p->s < p->end ? *p->s : 0;
                int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
                      : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                if (d < 0)
                    return perr(p, p->s, "bad \\%c escape: expected %d hex digits", e, hex);
                v = v * 16 + (uint32_t)d;
            }
            if (v > CP_MAX)
                return perr(p, p->s, "code point U+%X is out of range", v);
            *cp = v;
            return HY_OK;
        }
        switch (e) {
        case 'n': *cp = '\n'; return HY_OK;
        case 'r': *cp = '\r'; return HY_OK;
        case 't': *cp = '\t'; return HY_OK;
        case '\\': case '"': case '\'': case '[': case ']': case '-': case '^': case '/':
            *cp = (uint32_t)e;
            return HY_OK;
        default:
            return perr(p, p->s - 2, "unknown escape \\%c", e);
        }
    }
    int len = s[0] < 0x80 ? 1 : (s[0] & 0xE0) == 0xC0 ? 2 : (s[0] & 0xF0) == 0xE0 ? 3 : (s[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (!len || p->s + len > p->end)
        return perr(p, p->s, "invalid UTF-8 in grammar");
    uint32_t v = len == 1 ? s[0] : (uint32_t)(s[0] & (0x7F >> len));
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return perr(p, p->s, "invalid UTF-8 in grammar");
        v = v << 6 | (s[i] & 0x3F);
    }
    p->s += len;
    *cp = v;
    return HY_OK;
}

static int cmp_range(const void *a, const void *b)
{
    const range *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Sort and merge rng[first..), negate if asked; leaves the set as rng[first..) and an element. */
static int finish_set(parser *p, size_t first, bool negate, elem *out)
{
    size_t n = p->rng.n - first, m = 0;
    range *r = n ? p->rng.v + first : NULL; /* an empty [] may come before any range: v is NULL */
    if (n)
        qsort(r, n, sizeof *r, cmp_range);
    for (size_t i = 0; i < n; i++) {
        if (m && r[i].lo <= r[m - 1].hi + 1) {
            if (r[i].hi > r[m - 1].hi)
                r[m - 1].hi = r[i].hi;
        } else {
            r[m++] = r[i];
        }
    }
    p->rng.n = first + m;
    if (negate) {
        range tmp[m + 1];
        if (m)
            memcpy(tmp, r, m * sizeof *r);
        p->rng.n = first;
        uint32_t next = 0;
        for (size_t i = 0; i < m; i++) {
            if (tmp[i].lo > next)
                VEC_PUSH(p->rng, ((range){next, tmp[i].lo - 1}), fail);
            next = tmp[i].hi + 1;
        }
        if (next <= CP_MAX)
            VEC_PUSH(p->rng, ((range){next, CP_MAX}), fail);
    }
    *out = (elem){E_CHARS, (int32_t)first, (int32_t)(p->rng.n - first)};
    return HY_OK;
fail:
    p->failed = true;
    return hy_err_set(HY_ENOMEM, "out of memory");
}

static int add_elem(parser *p, elem_vec *seq, elem e)
{
    if (++p->n_elems > GRAM_MAX_ELEMS) {
        p->failed = true;
        hy_err_set(HY_ELIMIT, "grammar: more than %d elements (after expanding repetitions)", GRAM_MAX_ELEMS);
        if (p->err && p->errlen)
            snprintf(p->err, p->errlen, "%s", hy_err_msg());
        return HY_ELIMIT;
    }
    VEC_PUSH(*seq, e, fail);
    return HY_OK;
fail:
    p->failed = true;
    return hy_err_set(HY_ENOMEM, "out of memory");
}

static int add_alt(parser *p, int rule, elem_vec seq)
{
    prule *r = &p->rules.v[rule];
    VEC_PUSH(r->alts, seq, fail);
    return HY_OK;
fail:
    free(seq.v);
    p->failed = true;
    return hy_err_set(HY_ENOMEM, "out of memory");
}

/* A rule whose alternatives are `x R` and empty (R itself): x*. */
static int star_rule(parser *p, elem x)
{
    int r = new_rule(p, "star");
    if (r < 0)
        return -1;
    elem_vec a = {0}, b = {0};
    if (add_elem(p, &a, x) || add_elem(p, &a, (elem){E_REF, r, 0}) || add_alt(p, r, a)) {
        free(a.v);
        return -1;
    }
    return add_alt(p, r, b) ? -1 : r;
}

/* Apply a postfix operator to the symbol seq[from..) (replaced in place). A symbol of several
 * elements (a literal) becomes a rule of its own first, so the repeated unit is one element. */
static int repeat(parser *p, elem_vec *seq, size_t from, int min, int max /* -1: unbounded */)
{
    size_t nx = seq->n - from;
    elem x;
    if (nx == 1) {
        x = seq->v[from];
    } else {
        int r = new_rule(p, "lit");
        elem_vec a = {0};
        if (r < 0)
            return HY_EINVAL;
        for (size_t i = 0; i < nx; i++)
            VEC_PUSH(a, seq->v[from + i], nomem);
        if (add_alt(p, r, a))
            return HY_EINVAL;
        x = (elem){E_REF, r, 0};
    }
    seq->n = from;
    p->n_elems -= nx;
    for (int i = 0; i < min; i++)
        if (add_elem(p, seq, x))
            return HY_EINVAL;
    if (max < 0) {
        int r = star_rule(p, x);
        return r < 0 ? HY_EINVAL : add_elem(p, seq, (elem){E_REF, r, 0});
    }
    /* up to max - min more: opt_k ::= x opt_(k-1) | empty */
    int prev = -1;
    for (int k = 0; k < max - min; k++) {
        int r = new_rule(p, "opt");
        if (r < 0)
            return HY_EINVAL;
        elem_vec a = {0}, b = {0};
        if (add_elem(p, &a, x) || (prev >= 0 && add_elem(p, &a, (elem){E_REF, prev, 0}))) {
            free(a.v);
            return HY_EINVAL;
        }
        if (add_alt(p, r, a) || add_alt(p, r, b))
            return HY_EINVAL;
        prev = r;
    }
    return prev >= 0 ? add_elem(p, seq, (elem){E_REF, prev, 0}) : HY_OK;
nomem:
    p->failed = true;
    return hy_err_set(HY_ENOMEM, "out of memory");
}

static int parse_int(parser *p, int *out)
{
    long v = 0;
    const char *s0 = p->s;
    while (p->s < p->end && *p->s >= '0' && *p->s <= '9') {
        v = v * 10 + (*p->s++ - '0');
        if (v > 100000)
            return perr(p, s0, "repetition count too large");
    }
    if (p->s == s0)
        return perr(p, s0, "expected a number");
    *out = (int)v;
    return HY_OK;
}

static int parse_braces(parser *p, int *min, int *max)
{
    const char *at = p->s++;
    skip_space(p, true);
    if (parse_int(p, min))
        return HY_EINVAL;
    skip_space(p, true);
    *max = *min;
    if (p->s < p->end && *p->s == ',') {
        p->s++;
        skip_space(p, true);
        *max = -1;
        if (p->s < p->end && *p->s != '}' && parse_int(p, max))
            return HY_EINVAL;
        skip_space(p, true);
    }
    if (p->s >= p->end || *p->s != '}')
        return perr(p, p->s, "expected '}'");
    p->s++;
    if (*max >= 0 && *max < *min)
        return perr(p, at, "repetition {%d,%d}: max below min", *min, *max);
    return HY_OK;
}

static int parse_alternates(parser *p, int rule, bool nested);

static int parse_class(parser *p, elem *out)
{
    const char *at = p->s++;
    bool neg = p->s < p->end && *p->s == '^';
    if (neg)
        p->s++;
    size_t first = p->rng.n;
    while (p->s < p->end && *p->s != ']') {
        uint32_t lo, hi;
        if (parse_char(p, &lo))
            return HY_EINVAL;
        hi = lo;
        if (p->s + 1 < p->end && *p->s == '-' && p->s[1] != ']') {
            p->s++;
            if (parse_char(p, &hi))
                return HY_EINVAL;
            if (hi < lo)
                return perr(p, at, "character class range is reversed");
        }
        VEC_PUSH(p->rng, ((range){lo, hi}), fail);
    }
    if (p->s >= p->end)
        return perr(p, at, "unclosed character class");
    p->s++;
    return finish_set(p, first, neg, out);
fail:
    p->failed = true;
    return hy_err_set(HY_ENOMEM, "out of memory");
}

static int single_char(parser *p, uint32_t lo, uint32_t hi, elem *out)
{
    size_t first = p->rng.n;
    VEC_PUSH(p->rng, ((range){lo, hi}), fail);
    *out = (elem){E_CHARS, (int32_t)first, 1};
    return HY_OK;
fail:
    p->failed = true;
    return hy_err_set(HY_ENOMEM, "out of memory");
}

/* One symbol (appended to seq); false at the end of the sequence. */
static int parse_symbol(parser *p, elem_vec *seq, bool nested, bool *got)
{
    *got = true;
    char c = *p->s;
    elem e;
    if (c == '"') {
        const char *at = p->s++;
        while (p->s < p->end && *p->s != '"') {
            uint32_t cp;
            if (parse_char(p, &cp) || single_char(p, cp, cp, &e) || add_elem(p, seq, e))
                return HY_EINVAL;
        }
        if (p->s >= p->end)
            return perr(p, at, "unclosed string literal");
        p->s++;
        return HY_OK;
    }
    if (c == '[')
        return parse_class(p, &e) || add_elem(p, seq, e) ? HY_EINVAL : HY_OK;
    if (c == '.') {
        p->s++;
        return single_char(p, 0, CP_MAX, &e) || add_elem(p, seq, e) ? HY_EINVAL : HY_OK;
    }
    if (c == '(') {
        const char *at = p->s++;
        int r = new_rule(p, "group");
        if (r < 0 || parse_alternates(p, r, true))
            return HY_EINVAL;
        if (p->s >= p->end || *p->s != ')')
            return perr(p, at, "unclosed '('");
        p->s++;
        return add_elem(p, seq, (elem){E_REF, r, 0});
    }
    if (is_name_char(c)) {
        const char *n0 = p->s;
        while (p->s < p->end && is_name_char(*p->s))
            p->s++;
        const char *n1 = p->s;
        skip_space(p, false);
        if (p->end - p->s >= 3 && !memcmp(p->s, "::=", 3)) {
            if (!nested) { /* the next rule starts: this sequence is over */
                p->s = n0;
                *got = false;
                return HY_OK;
            }
            return perr(p, n0, "'::=' inside parentheses");
        }
        int r = rule_id(p, n0, (size_t)(n1 - n0), false);
        return r < 0 ? HY_EINVAL : add_elem(p, seq, (elem){E_REF, r, 0});
    }
    *got = false;
    return HY_OK;
}

static int parse_sequence(parser *p, bool nested, elem_vec *seq)
{
    size_t last = (size_t)-1;
    for (;;) {
        skip_space(p, nested);
        if (p->s >= p->end)
            return HY_OK;
        char c = *p->s;
        if (c == '*' || c == '+' || c == '?' || c == '{') {
            if (last == (size_t)-1)
                return perr(p, p->s, "'%c' must follow a symbol", c);
            int min = 0, max = -1;
            if (c == '{') {
                if (parse_braces(p, &min, &max))
                    return HY_EINVAL;
            } else {
                p->s++;
                min = c == '+';
                max = c == '?' ? 1 : -1;
            }
            if (repeat(p, seq, last, min, max))
                return HY_EINVAL;
            last = (size_t)-1;
            continue;
        }
        size_t before = seq->n;
        bool got;
        if (parse_symbol(p, seq, nested, &got))
            return HY_EINVAL;
        if (!got)
            return HY_OK;
        last = before;
    }
}

static int parse_alternates(parser *p, int rule, bool nested)
{
    for (;;) {
        elem_vec seq = {0};
        if (parse_sequence(p, nested, &seq) || add_alt(p, rule, seq)) {
            free(seq.v);
            return HY_EINVAL;
        }
        const char *save = p->s;
        if (!nested)
            skip_space(p, true); /* a following line may continue with '|' */
        if (p->s < p->end && *p->s == '|') {
            p->s++;
            skip_space(p, true);
            continue;
        }
        if (!nested)
            p->s = save;
        return HY_OK;
    }
}

static int parse_rule(parser *p)
{
    const char *n0 = p->s;
    while (p->s < p->end && is_name_char(*p->s))
        p->s++;
    if (p->s == n0)
        return perr(p, n0, "expected a rule name");
    int r = rule_id(p, n0, (size_t)(p->s - n0), true);
    if (r < 0)
        return HY_EINVAL;
    skip_space(p, false);
    if (p->end - p->s < 3 || memcmp(p->s, "::=", 3))
        return perr(p, p->s, "expected '::='");
    p->s += 3;
    skip_space(p, true);
    if (parse_alternates(p, r, false))
        return HY_EINVAL;
    skip_space(p, false);
    if (p->s < p->end && *p->s != '\n')
        return perr(p, p->s, "unexpected '%c'", *p->s);
    return HY_OK;
}

/* ------------------------------------------------------------------ checks and flattening */

static bool rule_nullable(const parser *p, const bool *nullable, int r)
{
    for (size_t a = 0; a < p->rules.v[r].alts.n; a++) {
        const elem_vec *s = &p->rules.v[r].alts.v[a];
        size_t i = 0;
        while (i < s->n && s->v[i].kind == E_REF && nullable[s->v[i].arg])
            i++;
        if (i == s->n)
            return true;
    }
    return false;
}

/* DFS over "rule r can start with rule q" edges; a cycle is left recursion. */
static int left_rec(parser *p, const bool *nullable, uint8_t *color, int r)
{
    color[r] = 1;
    for (size_t a = 0; a < p->rules.v[r].alts.n; a++) {
        const elem_vec *s = &p->rules.v[r].alts.v[a];
        for (size_t i = 0; i < s->n && s->v[i].kind == E_REF; i++) {
            int q = s->v[i].arg;
            if (color[q] == 1)
                return perr(p, p->rules.v[r].def_at, "rule '%s' is left-recursive (through '%s')",
                            p->rules.v[q].name, p->rules.v[r].name);
            if (color[q] == 0 && left_rec(p, nullable, color, q))
                return HY_EINVAL;
            if (!nullable[q])
                break;
        }
    }
    color[r] = 2;
    return HY_OK;
}

static int check_rules(parser *p, int *root)
{
    int nr = (int)p->rules.n;
    *root = -1;
    for (int r = 0; r < nr; r++) {
        if (!p->rules.v[r].defined)
            return perr(p, p->rules.v[r].used_at, "rule '%s' is used but never defined", p->rules.v[r].name);
        if (!strcmp(p->rules.v[r].name, "root"))
            *root = r;
    }
    if (*root < 0)
        return perr(p, NULL, "no 'root' rule");
    bool *nullable = calloc((size_t)nr, sizeof *nullable);
    uint8_t *color = calloc((size_t)nr, 1);
    int rc = HY_OK;
    if (!nullable || !color) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto out;
    }
    for (bool changed = true; changed;) {
        changed = false;
        for (int r = 0; r < nr; r++)
            if (!nullable[r] && rule_nullable(p, nullable, r))
                nullable[r] = changed = true;
    }
    for (int r = 0; r < nr && !rc; r++)
        if (!color[r])
            rc = left_rec(p, nullable, color, r);
out:
    free(nullable);
    free(color);
    return rc;
}

static int flatten(parser *p, gram *g)
{
    size_t n_alt = 0, n_el = 0;
    for (size_t r = 0; r < p->rules.n; r++) {
        n_alt += p->rules.v[r].alts.n;
        for (size_t a = 0; a < p->rules.v[r].alts.n; a++)
            n_el += p->rules.v[r].alts.v[a].n + 1;
    }
    g->n_rules = (int)p->rules.n;
    g->el = malloc(n_el * sizeof *g->el);
    g->alt = malloc((n_alt + 1) * sizeof *g->alt);
    g->rule_alt = malloc((p->rules.n + 1) * sizeof *g->rule_alt);
    g->rng = malloc((p->rng.n + 1) * sizeof *g->rng);
    if (!g->el || !g->alt || !g->rule_alt || !g->rng)
        return hy_err_set(HY_ENOMEM, "out of memory");
    if (p->rng.n)
        memcpy(g->rng, p->rng.v, p->rng.n * sizeof *g->rng);
    g->n_rng = (int)p->rng.n;
    int ia = 0, ie = 0;
    for (size_t r = 0; r < p->rules.n; r++) {
        g->rule_alt[r] = ia;
        for (size_t a = 0; a < p->rules.v[r].alts.n; a++) {
            const elem_vec *s = &p->rules.v[r].alts.v[a];
            g->alt[ia++] = ie;
            if (s->n)
                memcpy(g->el + ie, s->v, s->n * sizeof *s->v);
            ie += (int)s->n;
            g->el[ie++] = (elem){E_END, 0, 0};
        }
    }
    g->rule_alt[p->rules.n] = ia;
    g->n_el = ie;
    return HY_OK;
}

static void parser_free(parser *p)
{
    for (size_t r = 0; r < p->rules.n; r++) {
        for (size_t a = 0; a < p->rules.v[r].alts.n; a++)
            free(p->rules.v[r].alts.v[a].v);
        free(p->rules.v[r].alts.v);
        free(p->rules.v[r].name);
    }
    free(p->rules.v);
    free(p->rng.v);
}

int gram_compile(const char *text, size_t len, gram **out, char *err, size_t errlen)
{
    *out = NULL;
    if (err && errlen)
        err[0] = 0;
    if (len > GRAM_MAX_TEXT) {
        hy_err_set(HY_ELIMIT, "grammar: %zu bytes, more than the limit of %u", len, GRAM_MAX_TEXT);
        if (err && errlen)
            snprintf(err, errlen, "%s", hy_err_msg());
        return HY_ELIMIT;
    }
    parser p = {.s = text, .end = text + len, .start = text, .err = err, .errlen = errlen};
    gram *g = calloc(1, sizeof *g);
    int rc = HY_ENOMEM;
    if (!g)
        goto fail;
    atomic_init(&g->refs, 1);
    atomic_init(&g->spent, false);
    for (;;) {
        skip_space(&p, true);
        if (p.s >= p.end)
            break;
        if ((rc = parse_rule(&p)))
            goto fail;
    }
    if ((rc = check_rules(&p, &g->root)) || (rc = flatten(&p, g)))
        goto fail;
    parser_free(&p);
    *out = g;
    return HY_OK;
fail:
    if (err && errlen && !err[0])
        snprintf(err, errlen, "%s", hy_err_msg());
    parser_free(&p);
    if (g)
        gram_release(g);
    return rc ? rc : HY_EINVAL;
}

int gram_gbnf_prefix(const char *text, const char *prefix, char **out)
{
    size_t n = strlen(text), np = strlen(prefix), names = 0;
    for (size_t i = 0; i < n; i++)
        names += is_name_char(text[i]) && (i == 0 || !is_name_char(text[i - 1]));
    char *o = malloc(n + names * np + 1), *w = o;
    if (!(*out = o))
        return hy_err_set(HY_ENOMEM, "out of memory");
    for (size_t i = 0; i < n;) {
        char c = text[i];
        if (c == '"' || c == '[') { /* a literal or a class: copied through, escapes included */
            char close = c == '"' ? '"' : ']';
            *w++ = text[i++];
            while (i < n && text[i] != close) {
                if (text[i] == '\\' && i + 1 < n)
                    *w++ = text[i++];
                *w++ = text[i++];
            }
            if (i < n)
                *w++ = text[i++];
        } else if (c == '{') { /* a repetition count */
            while (i < n && text[i] != '}')
                *w++ = text[i++];
        } else if (c == '#') {
            while (i < n && text[i] != '\n')
                *w++ = text[i++];
        } else if (is_name_char(c)) {
            memcpy(w, prefix, np);
            w += np;
            while (i < n && is_name_char(text[i]))
                *w++ = text[i++];
        } else {
            *w++ = text[i++];
        }
    }
    *w = 0;
    return HY_OK;
}

void gram_retain(gram *g) { atomic_fetch_add(&g->refs, 1); }

bool gram_spent(gram *g) { return atomic_load(&g->spent); }

void gram_release(gram *g)
{
    if (!g || atomic_fetch_sub(&g->refs, 1) != 1)
        return;
    for (size_t i = 0; i < g->nodes.n && i < g->memo_cap; i++)
        free(g->memo[i]);
    for (size_t i = 0; i < g->nodes.n && i < g->mask_cap; i++)
        free(g->mask[i]);
    free(g->memo);
    free(g->mask);
    free(g->scratch);
    free(g->lists.v);
    free(g->nodes.v);
    free(g->hmap);
    free(g->el);
    free(g->alt);
    free(g->rule_alt);
    free(g->rng);
    free(g);
}

/* ------------------------------------------------------------------ the automaton */

static uint64_t hash2(int32_t a, int32_t b)
{
    uint64_t h = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

static int hmap_grow(gram *g)
{
    size_t nc = g->hcap ? g->hcap * 2 : 1024;
    int32_t *m = calloc(nc, sizeof *m);
    if (!m)
        return HY_ENOMEM;
    for (size_t i = 0; i < g->nodes.n; i++) {
        size_t h = hash2(g->nodes.v[i].pos, g->nodes.v[i].parent) & (nc - 1);
        while (m[h])
            h = (h + 1) & (nc - 1);
        m[h] = (int32_t)i + 1;
    }
    free(g->hmap);
    g->hmap = m;
    g->hcap = nc;
    return HY_OK;
}

/* The node (pos, parent), created on first use; -2 when the cap is hit or memory runs out. */
static int32_t intern(gram *g, int32_t pos, int32_t parent)
{
    if ((g->nodes.n + 1) * 2 > g->hcap && hmap_grow(g))
        goto fail;
    size_t h = hash2(pos, parent) & (g->hcap - 1);
    for (; g->hmap[h]; h = (h + 1) & (g->hcap - 1)) {
        const node *n = &g->nodes.v[g->hmap[h] - 1];
        if (n->pos == pos && n->parent == parent)
            return g->hmap[h] - 1;
    }
    if (g->nodes.n >= GRAM_MAX_NODES)
        goto fail;
    VEC_PUSH(g->nodes, ((node){pos, parent}), fail);
    g->hmap[h] = (int32_t)g->nodes.n;
    return (int32_t)g->nodes.n - 1;
fail:
    g->overflow = true;
    atomic_store(&g->spent, true);
    return -2;
}

typedef VEC(item) item_vec;

/* The items reached by matching from element pos with return node parent: every way of
 * descending into rules until a CHARS element is next, or the sentence ends. */
static void expand(gram *g, int32_t pos, int32_t parent, item_vec *out)
{
    if (g->overflow || ++g->depth > MAX_EXPAND_DEPTH) {
        g->overflow = true;
        g->depth--;
        return;
    }
    const elem *e = &g->el[pos];
    if (e->kind == E_END) {
        if (parent < 0) {
            VEC_PUSH(*out, ITEM_ACCEPT, fail);
        } else {
            node nd = g->nodes.v[parent];
            expand(g, nd.pos, nd.parent, out);
        }
    } else if (e->kind == E_CHARS) {
        int32_t nd = intern(g, pos, parent);
        if (nd >= 0)
            VEC_PUSH(*out, item_make(nd, 0, 0, 0), fail);
    } else {
        int32_t cont = g->el[pos + 1].kind == E_END ? parent : intern(g, pos + 1, parent);
        if (cont != -2)
            for (int32_t a = g->rule_alt[e->arg]; a < g->rule_alt[e->arg + 1]; a++)
                expand(g, g->alt[a], cont, out);
    }
    g->depth--;
    return;
fail:
    g->overflow = true;
    g->depth--;
}

static int cmp_item(const void *a, const void *b)
{
    item x = *(const item *)a, y = *(const item *)b;
    return x < y ? -1 : x > y;
}

static void uniq(item_vec *v, size_t from)
{
    size_t n = v->n - from;
    if (n < 2)
        return;
    item *a = v->v + from;
    qsort(a, n, sizeof *a, cmp_item);
    size_t m = 1;
    for (size_t i = 1; i < n; i++)
        if (a[i] != a[m - 1])
            a[m++] = a[i];
    v->n = from + m;
}

/* Does the set of node nd's CHARS element hold a valid code point in [lo, hi]? */
static bool set_hits(const gram *g, int32_t nd, uint32_t lo, uint32_t hi)
{
    const elem *e = &g->el[g->nodes.v[nd].pos];
    const range *r = g->rng + e->arg;
    for (int i = 0; i < e->n; i++) {
        uint32_t a = HY_MAX(lo, r[i].lo), b = HY_MIN(hi, r[i].hi);
        if (a > b)
            continue;
        /* surrogates are not characters */
        if (a < 0xD800 || b > 0xDFFF)
            return true;
    }
    return false;
}

static const uint32_t k_min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};

/* Append the items one byte leads to from `it` (not deduplicated, not memoised). */
static void step_item(gram *g, item it, uint8_t b, item_vec *out)
{
    int32_t nd = item_node(it);
    if (nd < 0)
        return; /* ACCEPT: nothing may follow */
    uint32_t cp;
    int need, len;
    if (item_need(it) == 0) {
        if (b < 0x80) {
            cp = b, need = 0, len = 1;
        } else if (b >= 0xC2 && b <= 0xDF) {
            cp = b & 0x1F, need = 1, len = 2;
        } else if (b >= 0xE0 && b <= 0xEF) {
            cp = b & 0x0F, need = 2, len = 3;
        } else if (b >= 0xF0 && b <= 0xF4) {
            cp = b & 0x07, need = 3, len = 4;
        } else {
            return;
        }
    } else {
        if ((b & 0xC0) != 0x80)
            return;
        cp = item_cp(it) << 6 | (b & 0x3F);
        need = item_need(it) - 1;
        len = item_len(it);
    }
    uint32_t lo = cp << (6 * need), hi = lo | ((1u << (6 * need)) - 1);
    lo = HY_MAX(lo, k_min_cp[len]);
    if (hi > CP_MAX)
        hi = CP_MAX;
    if (lo > hi || !set_hits(g, nd, lo, hi))
        return;
    if (need) {
        VEC_PUSH(*out, item_make(nd, cp, need, len), fail);
        return;
    }
    node n = g->nodes.v[nd];
    expand(g, n.pos + 1, n.parent, out);
    return;
fail:
    g->overflow = true;
}

static int ensure_cap(void ***arr, size_t *cap, size_t need)
{
    if (need <= *cap)
        return HY_OK;
    size_t nc = *cap ? *cap : 256;
    while (nc < need)
        nc *= 2;
    void **a = realloc(*arr, nc * sizeof *a);
    if (!a)
        return HY_ENOMEM;
    memset(a + *cap, 0, (nc - *cap) * sizeof *a);
    *arr = a;
    *cap = nc;
    return HY_OK;
}

/* The memoised step of a whole-character ASCII byte from node nd: an offset into g->lists
 * (count, then items), or -1 on overflow. */
static int32_t memo_step(gram *g, int32_t nd, uint8_t b)
{
    if (ensure_cap((void ***)&g->memo, &g->memo_cap, (size_t)nd + 1))
        goto fail;
    if (!g->memo[nd]) {
        if (!(g->memo[nd] = malloc(128 * sizeof(int32_t))))
            goto fail;
        memset(g->memo[nd], 0xFF, 128 * sizeof(int32_t));
    }
    if (g->memo[nd][b] >= 0)
        return g->memo[nd][b];
    item_vec tmp = {0};
    step_item(g, item_make(nd, 0, 0, 0), b, &tmp);
    uniq(&tmp, 0);
    if (g->overflow || g->lists.n + tmp.n + 1 > INT32_MAX) {
        free(tmp.v);
        goto fail;
    }
    int32_t off = (int32_t)g->lists.n;
    VEC_PUSH(g->lists, (item)tmp.n, fail_tmp);
    for (size_t i = 0; i < tmp.n; i++)
        VEC_PUSH(g->lists, tmp.v[i], fail_tmp);
    free(tmp.v);
    g->memo[nd][b] = off; /* memo may have moved? no: only lists grows */
    return off;
fail_tmp:
    free(tmp.v);
fail:
    g->overflow = true;
    return -1;
}

/* Items after byte b from the set in[0..n), appended to out and deduplicated. */
static void step_set(gram *g, const item *in, size_t n, uint8_t b, item_vec *out)
{
    size_t from = out->n;
    for (size_t i = 0; i < n && !g->overflow; i++) {
        item it = in[i];
        if (b < 0x80 && item_need(it) == 0 && item_node(it) >= 0) {
            int32_t off = memo_step(g, item_node(it), b);
            if (off < 0)
                return;
            size_t cnt = (size_t)g->lists.v[off];
            for (size_t k = 0; k < cnt; k++)
                VEC_PUSH(*out, g->lists.v[off + 1 + k], fail);
        } else {
            step_item(g, it, b, out);
        }
    }
    if (n > 1)
        uniq(out, from);
    return;
fail:
    g->overflow = true;
}

/* Each public operation starts with a clean failure flag (the node cap stays: old nodes work). */
static void op_begin(gram *g)
{
    g->overflow = false;
    g->depth = 0;
}

static void start_items(gram *g, item_vec *out)
{
    for (int32_t a = g->rule_alt[g->root]; a < g->rule_alt[g->root + 1]; a++)
        expand(g, g->alt[a], -1, out);
    uniq(out, 0);
}

/* Run bytes from the start; the final item set in *st (caller frees st->v). */
static bool run_bytes(gram *g, const char *s, size_t len, item_vec *st)
{
    item_vec cur = {0};
    op_begin(g);
    start_items(g, &cur);
    for (size_t i = 0; i < len && cur.n && !g->overflow; i++) {
        item_vec next = {0};
        step_set(g, cur.v, cur.n, (uint8_t)s[i], &next);
        free(cur.v);
        cur = next;
    }
    *st = cur;
    return !g->overflow;
}

bool gram_match(gram *g, const char *s, size_t len)
{
    item_vec st;
    bool ok = run_bytes(g, s, len, &st);
    bool acc = false;
    for (size_t i = 0; ok && i < st.n; i++)
        acc |= st.v[i] == ITEM_ACCEPT;
    free(st.v);
    return acc;
}

bool gram_match_prefix(gram *g, const char *s, size_t len)
{
    item_vec st;
    bool ok = run_bytes(g, s, len, &st);
    ok = ok && st.n > 0;
    free(st.v);
    return ok;
}

/* ------------------------------------------------------------------ vocabulary trie */

typedef struct {
    uint32_t child;      /* first child (children are contiguous) */
    uint16_t n_child;
    uint8_t byte;
    uint32_t tok;        /* first token ending here, in gv->tok_at */
    uint16_t n_tok;
} tnode;

struct gram_vocab {
    int n_vocab, words;
    tnode *t;
    size_t n_t;
    int32_t *tok_at;     /* tokens in trie order */
    uint32_t *eog;       /* mask of the end-of-generation tokens */
    bool *is_eog, *is_text; /* text: a token a grammar may allow through its bytes */
    const tok_vocab *v;
};

typedef struct {
    const unsigned char *b;
    size_t len;
    int32_t id;
} tok_bytes;

static int cmp_tok_bytes(const void *a, const void *b)
{
    const tok_bytes *x = a, *y = b;
    size_t n = HY_MIN(x->len, y->len);
    int c = memcmp(x->b, y->b, n);
    if (c)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* Children of trie node `at` from tokens tb[lo..hi) that all share `depth` bytes. */
static int build_trie(gram_vocab *gv, size_t *n_t, const tok_bytes *tb, size_t lo, size_t hi, size_t depth,
                      size_t at, size_t *n_tok)
{
    gv->t[at].tok = (uint32_t)*n_tok;
    while (lo < hi && tb[lo].len == depth) {
        gv->tok_at[(*n_tok)++] = tb[lo++].id;
        gv->t[at].n_tok++;
    }
    size_t first = *n_t;
    gv->t[at].child = (uint32_t)first;
    for (size_t i = lo; i < hi;) {
        size_t j = i;
        while (j < hi && tb[j].b[depth] == tb[i].b[depth])
            j++;
        gv->t[*n_t] = (tnode){0, 0, tb[i].b[depth], 0, 0};
        (*n_t)++;
        gv->t[at].n_child++;
        i = j;
    }
    size_t c = first;
    for (size_t i = lo; i < hi; c++) {
        size_t j = i;
        while (j < hi && tb[j].b[depth] == tb[i].b[depth])
            j++;
        if (build_trie(gv, n_t, tb, i, j, depth + 1, c, n_tok))
            return HY_EINVAL;
        i = j;
    }
    return HY_OK;
}

int gram_vocab_create(const tok_vocab *v, gram_vocab **out)
{
    *out = NULL;
    int n = tok_n_vocab(v);
    gram_vocab *gv = calloc(1, sizeof *gv);
    tok_bytes *tb = calloc((size_t)n + 1, sizeof *tb);
    size_t n_tb = 0, total = 1;
    if (!gv || !tb)
        goto nomem;
    gv->v = v;
    gv->n_vocab = n;
    gv->words = (n + 31) / 32;
    gv->eog = calloc((size_t)gv->words, sizeof *gv->eog);
    gv->is_eog = calloc((size_t)n + 1, 1);
    gv->is_text = calloc((size_t)n + 1, 1);
    gv->tok_at = calloc((size_t)n + 1, sizeof *gv->tok_at);
    if (!gv->eog || !gv->is_eog || !gv->is_text || !gv->tok_at)
        goto nomem;
    for (int32_t id = 0; id < n; id++) {
        if (tok_is_eog(v, id)) {
            gv->is_eog[id] = true;
            gv->eog[id / 32] |= 1u << (id % 32);
            continue;
        }
        size_t len = 0;
        const unsigned char *b = tok_piece(v, id, &len);
        if (tok_is_control(v, id) || !b || !len)
            continue;
        gv->is_text[id] = true;
        tb[n_tb++] = (tok_bytes){b, len, id};
        total += len;
    }
    qsort(tb, n_tb, sizeof *tb, cmp_tok_bytes);
    if (!(gv->t = calloc(total, sizeof *gv->t)))
        goto nomem;
    size_t n_t = 1, n_tok = 0;
    build_trie(gv, &n_t, tb, 0, n_tb, 0, 0, &n_tok);
    gv->n_t = n_t;
    free(tb);
    *out = gv;
    return HY_OK;
nomem:
    free(tb);
    gram_vocab_free(gv);
    return hy_err_set(HY_ENOMEM, "out of memory");
}

void gram_vocab_free(gram_vocab *gv)
{
    if (!gv)
        return;
    free(gv->t);
    free(gv->tok_at);
    free(gv->eog);
    free(gv->is_eog);
    free(gv->is_text);
    free(gv);
}

int gram_vocab_n(const gram_vocab *gv) { return gv->n_vocab; }

/* ------------------------------------------------------------------ masks */

/* Scratch item sets, one per trie depth. */
typedef struct {
    item_vec *lv;
    size_t n_lv;
} walk;

static void mask_walk(gram *g, const gram_vocab *gv, walk *w, const tnode *tn, const item *in, size_t n,
                      size_t depth, uint32_t *mask)
{
    if (depth >= w->n_lv) {
        size_t nn = w->n_lv ? w->n_lv * 2 : 64;
        item_vec *lv = realloc(w->lv, nn * sizeof *lv);
        if (!lv) {
            g->overflow = true;
            return;
        }
        memset(lv + w->n_lv, 0, (nn - w->n_lv) * sizeof *lv);
        w->lv = lv;
        w->n_lv = nn;
    }
    for (uint32_t c = tn->child; c < tn->child + tn->n_child && !g->overflow; c++) {
        const tnode *ch = &gv->t[c];
        item_vec *next = &w->lv[depth];
        next->n = 0;
        step_set(g, in, n, ch->byte, next);
        if (!next->n)
            continue;
        for (uint32_t k = 0; k < ch->n_tok; k++) {
            int32_t id = gv->tok_at[ch->tok + k];
            mask[id / 32] |= 1u << (id % 32);
        }
        if (ch->n_child)
            mask_walk(g, gv, w, ch, w->lv[depth].v, w->lv[depth].n, depth + 1, mask);
    }
}

static int item_mask(gram *g, const gram_vocab *gv, item it, uint32_t *mask)
{
    walk w = {0};
    mask_walk(g, gv, &w, &gv->t[0], &it, 1, 0, mask);
    for (size_t i = 0; i < w.n_lv; i++)
        free(w.lv[i].v);
    free(w.lv);
    return g->overflow ? hy_err_set(HY_ELIMIT, "grammar: more than %d automaton states", GRAM_MAX_NODES) : HY_OK;
}

/* The cached mask of a whole-character node. */
static const uint32_t *node_mask(gram *g, const gram_vocab *gv, int32_t nd)
{
    if (ensure_cap((void ***)&g->mask, &g->mask_cap, (size_t)nd + 1))
        return NULL;
    if (g->mask[nd])
        return g->mask[nd];
    bool keep = g->n_masks < GRAM_MAX_MASKS;
    if (!keep && !g->scratch && !(g->scratch = malloc((size_t)gv->words * sizeof *g->scratch)))
        return NULL;
    uint32_t *m = keep ? calloc((size_t)gv->words, sizeof *m) : g->scratch;
    if (!keep)
        memset(m, 0, (size_t)gv->words * sizeof *m);
    if (!m || item_mask(g, gv, item_make(nd, 0, 0, 0), m)) {
        if (keep)
            free(m);
        return NULL;
    }
    if (!keep)
        return m;
    g->n_masks++;
    return g->mask[nd] = m;
}

struct gram_matcher {
    gram *g;
    const gram_vocab *gv;
    item_vec st;
    bool ended;          /* an end-of-generation token was accepted */
};

int gram_matcher_create(gram *g, const gram_vocab *gv, gram_matcher **out)
{
    *out = NULL;
    if (g->gv && g->gv != gv)
        return hy_err_set(HY_EINVAL, "grammar: used with two vocabularies");
    g->gv = gv;
    gram_matcher *m = calloc(1, sizeof *m);
    if (!m)
        return hy_err_set(HY_ENOMEM, "out of memory");
    m->g = g;
    m->gv = gv;
    op_begin(g);
    start_items(g, &m->st);
    if (g->overflow) {
        free(m->st.v);
        free(m);
        return hy_err_set(HY_ELIMIT, "grammar: more than %d automaton states", GRAM_MAX_NODES);
    }
    gram_retain(g);
    *out = m;
    return HY_OK;
}

void gram_matcher_free(gram_matcher *m)
{
    if (!m)
        return;
    gram_release(m->g);
    free(m->st.v);
    free(m);
}

bool gram_matcher_accepting(const gram_matcher *m)
{
    if (m->ended)
        return true;
    for (size_t i = 0; i < m->st.n; i++)
        if (m->st.v[i] == ITEM_ACCEPT)
            return true;
    return false;
}

bool gram_matcher_finished(const gram_matcher *m)
{
    return m->ended || (m->st.n == 1 && m->st.v[0] == ITEM_ACCEPT);
}

int gram_matcher_mask(gram_matcher *m, uint32_t *allowed)
{
    gram *g = m->g;
    const gram_vocab *gv = m->gv;
    op_begin(g);
    memset(allowed, 0, (size_t)gv->words * sizeof *allowed);
    if (m->ended) { /* past the end (a request that ignores EOS): only end tokens */
        memcpy(allowed, gv->eog, (size_t)gv->words * sizeof *allowed);
        return HY_OK;
    }
    for (size_t i = 0; i < m->st.n; i++) {
        item it = m->st.v[i];
        if (it == ITEM_ACCEPT) {
            for (int w = 0; w < gv->words; w++)
                allowed[w] |= gv->eog[w];
        } else if (item_need(it)) {
            if (item_mask(g, gv, it, allowed))
                return HY_ELIMIT;
        } else {
            const uint32_t *nm = node_mask(g, gv, item_node(it));
            if (!nm)
                return g->overflow ? HY_ELIMIT : hy_err_set(HY_ENOMEM, "out of memory");
            for (int w = 0; w < gv->words; w++)
                allowed[w] |= nm[w];
        }
    }
    return HY_OK;
}

int gram_matcher_accept(gram_matcher *m, int32_t token)
{
    const gram_vocab *gv = m->gv;
    if (token < 0 || token >= gv->n_vocab || (m->ended && !gv->is_eog[token]))
        return hy_err_set(HY_EINVAL, "grammar: token %d not allowed", token);
    if (gv->is_eog[token]) {
        if (!gram_matcher_accepting(m))
            return hy_err_set(HY_EINVAL, "grammar: the output may not end here");
        m->ended = true;
        return HY_OK;
    }
    if (!gv->is_text[token])
        return hy_err_set(HY_EINVAL, "grammar: token %d not allowed", token);
    size_t len = 0;
    const unsigned char *b = tok_piece(gv->v, token, &len);
    item_vec cur = {0};
    op_begin(m->g);
    for (size_t i = 0; i < m->st.n; i++)
        VEC_PUSH(cur, m->st.v[i], nomem);
    for (size_t i = 0; i < len && cur.n; i++) {
        item_vec next = {0};
        step_set(m->g, cur.v, cur.n, b[i], &next);
        free(cur.v);
        cur = next;
    }
    if (m->g->overflow) {
        free(cur.v);
        return hy_err_set(HY_ELIMIT, "grammar: more than %d automaton states", GRAM_MAX_NODES);
    }
    if (!cur.n) {
        free(cur.v);
        return hy_err_set(HY_EINVAL, "grammar: token %d not allowed", token);
    }
    free(m->st.v);
    m->st = cur;
    return HY_OK;
nomem:
    free(cur.v);
    return hy_err_set(HY_ENOMEM, "out of memory");
}
