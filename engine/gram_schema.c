/* gram_schema.c - JSON Schema -> GBNF text for engine/gram.c, whose language agrees with
 * llguidance 1.9's JSON Schema compiler (the reference the grammar tests compare against), compact
 * or with flexible whitespace. Pure text generation: no I/O, no grammar compilation, and never a
 * keyword accepted but left unenforced (what it cannot express is an error naming the keyword).
 *
 * The language, and where it follows llguidance rather than the letter of JSON Schema:
 *  - Objects list their properties in the schema's order (jansson keeps insertion order), then
 *    required names missing from `properties`, then any additional properties. Optional ones may
 *    be skipped; reordering is not allowed. `additionalProperties` absent means any value (as in
 *    JSON Schema and llguidance; OpenAI strict mode sends false). An additional key is any key
 *    text except the declared keys written canonically (llguidance compares key *text*).
 *  - Strings: raw code points except `"`, `\`, U+0000..U+001F and U+007F; escapes \" \\ \b \f \n
 *    \r \t and \u00XX for the control characters and U+007F only (llguidance's set: no `\/`, no
 *    general \uXXXX). Additional-property keys (when some keys are declared) also allow general
 *    \uXXXX (surrogates only as pairs), again as llguidance does. Lengths count characters.
 *  - Numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?; integers -?(0|[1-9][0-9]*).
 *    Integer bounds become digit ranges built the way llguidance builds them ("-0" included where
 *    it allows it); bounds on non-integer numbers are refused.
 *  - `pattern` is searched (unanchored unless ^ / $), matched against decoded characters, with
 *    \d \w ASCII and \s Unicode, as llguidance does. Formats: date, time, date-time, uuid, email,
 *    ipv4, hostname with llguidance's definitions.
 *  - enum / const match the value's canonical text: keys in order, no whitespace in compact mode,
 *    numbers printed as Rust prints an f64 (1.0 -> 1, 1e-7 -> 0.0000001), as llguidance does.
 *
 * Deliberately unlike llguidance (which accepts these): what a grammar cannot intersect or bound
 * is refused, never loosened: `pattern` or `format` together with minLength / maxLength,
 * `pattern` with `format`, bounds on non-integer numbers, multipleOf, minProperties,
 * patternProperties, formats other than the seven above, enum / const next to other constraints,
 * repetition counts above GS_MAX_REPEAT. And a pattern class covering all of U+0000..U+001F (such
 * as [^"]) does not let \" or \\ through unless it holds '"' or '\', where llguidance 1.9 does. */
#include "engine/gram_schema.h"

#include "engine/gram.h"
#include "engine/hy.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define GS_MAX_DEPTH 64          /* nested schemas (and $ref / allOf expansions) */
#define GS_MAX_TEXT GRAM_MAX_TEXT /* bytes of GBNF, the compiler's own cap */
#define GS_MAX_REPEAT 10000      /* {m,n} counts in a pattern, minItems, maxItems, lengths */
#define GS_MAX_INT_BOUND 1e15    /* |integer bound|: digit ranges stay exact in a long long */
#define GS_MAX_CP 0x10FFFFu

/* ------------------------------------------------------------------------------------------ */
/* Growable text. The first failed append (HY_ENOMEM, or HY_ELIMIT past GS_MAX_TEXT) sticks in
 * err and later appends do nothing, so builders check once at the end. */

typedef struct {
    char *p;
    size_t n, cap;
    int err;
} gs_buf;

static void buf_putn(gs_buf *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (n > GS_MAX_TEXT - b->n) {
        b->err = HY_ELIMIT;
        return;
    }
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 128;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->err = HY_ENOMEM;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void buf_puts(gs_buf *b, const char *s) { buf_putn(b, s, strlen(s)); }

static void buf_printf(gs_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(gs_buf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->err = b->err ? b->err : HY_EINVAL;
    } else if ((size_t)n < sizeof tmp) {
        buf_putn(b, tmp, (size_t)n);
    } else if ((size_t)n > GS_MAX_TEXT) {
        b->err = b->err ? b->err : HY_ELIMIT;
    } else {
        char *big = malloc((size_t)n + 1);
        if (!big)
            b->err = b->err ? b->err : HY_ENOMEM;
        else {
            vsnprintf(big, (size_t)n + 1, fmt, ap2);
            buf_putn(b, big, (size_t)n);
            free(big);
        }
    }
    va_end(ap2);
}

static void buf_free(gs_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

static void buf_truncate(gs_buf *b, size_t n)
{
    if (n < b->n) {
        b->n = n;
        b->p[n] = '\0';
    }
}

static const char *buf_str(const gs_buf *b) { return b->p ? b->p : ""; }

/* Append a UTF-8 encoded code point. */
static void buf_utf8(gs_buf *b, uint32_t cp)
{
    char s[4];
    size_t n;
    if (cp < 0x80) {
        s[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        s[0] = (char)(0xC0 | (cp >> 6));
        s[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        s[0] = (char)(0xE0 | (cp >> 12));
        s[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        s[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        s[0] = (char)(0xF0 | (cp >> 18));
        s[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        s[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        s[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_putn(b, s, n);
}

/* Decode one UTF-8 code point from s[*i..n); -1 on malformed input (jansson only hands out valid
 * UTF-8, so this is a guard). */
static int64_t utf8_next(const char *s, size_t n, size_t *i)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t k = *i;
    uint32_t c = u[k];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!len || k + (size_t)len > n)
        return -1;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (int j = 1; j < len; j++) {
        if ((u[k + j] & 0xC0) != 0x80)
            return -1;
        cp = (cp << 6) | (u[k + j] & 0x3F);
    }
    *i = k + (size_t)len;
    return cp;
}

/* ------------------------------------------------------------------------------------------ */
/* Sets of code points as sorted, disjoint ranges (regex classes, trie branches). */

typedef struct {
    uint32_t lo, hi;
} cp_range;

typedef struct {
    cp_range *r;
    int n, cap;
    int err;
} cp_set;

static void cps_add(cp_set *s, uint32_t lo, uint32_t hi)
{
    if (s->err || lo > hi)
        return;
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 8;
        cp_range *r = realloc(s->r, sizeof *r * (size_t)cap);
        if (!r) {
            s->err = HY_ENOMEM;
            return;
        }
        s->r = r;
        s->cap = cap;
    }
    s->r[s->n++] = (cp_range){lo, hi};
}

static int cmp_range(const void *a, const void *b)
{
    const cp_range *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static void cps_norm(cp_set *s)
{
    if (s->n < 2)
        return;
    qsort(s->r, (size_t)s->n, sizeof *s->r, cmp_range);
    int k = 0;
    for (int i = 1; i < s->n; i++) {
        if (s->r[i].lo <= s->r[k].hi + 1) {
            if (s->r[i].hi > s->r[k].hi)
                s->r[k].hi = s->r[i].hi;
        } else {
            s->r[++k] = s->r[i];
        }
    }
    s->n = k + 1;
}

/* Complement within [0, GS_MAX_CP]; s must be normalised. */
static void cps_negate(cp_set *s)
{
    cp_set t = {0};
    uint32_t next = 0;
    for (int i = 0; i < s->n; i++) {
        if (s->r[i].lo > next)
            cps_add(&t, next, s->r[i].lo - 1);
        next = s->r[i].hi + 1;
    }
    if (next <= GS_MAX_CP)
        cps_add(&t, next, GS_MAX_CP);
    t.err = t.err ? t.err : s->err;
    free(s->r);
    *s = t;
}

static bool cps_has(const cp_set *s, uint32_t cp)
{
    for (int i = 0; i < s->n; i++)
        if (cp >= s->r[i].lo && cp <= s->r[i].hi)
            return true;
    return false;
}

/* Intersection with [lo, hi] ranges of `with` into out (both normalised). */
static void cps_intersect(const cp_set *a, const cp_set *b, cp_set *out)
{
    for (int i = 0; i < a->n; i++)
        for (int j = 0; j < b->n; j++) {
            uint32_t lo = HY_MAX(a->r[i].lo, b->r[j].lo), hi = HY_MIN(a->r[i].hi, b->r[j].hi);
            if (lo <= hi)
                cps_add(out, lo, hi);
        }
    cps_norm(out);
}

/* Free s; a failed allocation in it becomes sink's error (sink may be NULL). */
static void cps_free(cp_set *s, gs_buf *sink)
{
    if (s->err && sink && !sink->err)
        sink->err = s->err;
    free(s->r);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------------------------ */
/* Translation state. */

/* Shared rules, defined once at the end if used. Names are taken when first used, so a schema
 * property called "value" may push the shared rule to "value-2" (or the other way round). */
enum {
    P_VALUE, P_OBJECT, P_ARRAY, P_STRING, P_CHAR, P_ESC, P_NUMBER, P_INTEGER, P_BOOLEAN, P_NULL,
    P_WS, P_KCHAR, P_KESC, P_KESCU, P_DATE, P_TIME, P_DATETIME, P_UUID, P_EMAIL, P_EMAIL_ATOM,
    P_LABEL, P_IPV4, P_OCTET, P_HOSTNAME, P_HOST_LABEL, P_COUNT
};

static const char *const prim_stem[P_COUNT] = {
    "value", "object", "array", "string", "char", "esc", "number", "integer", "boolean", "null",
    "ws", "key-char", "key-esc", "key-esc-u", "date", "time", "date-time", "uuid", "email",
    "email-atom", "domain-label", "ipv4", "dec-octet", "hostname", "host-label",
};

typedef struct {
    char *name;
    gs_buf body;
    bool defined; /* body set; rules neither defined nor shared are dropped from the output */
} gs_rule;

typedef struct {
    char *ref;            /* the $ref string as written */
    const json_t *node;   /* its target in the root document */
    char *ptr;            /* JSON pointer of the target, for messages */
    int rule;
    bool done;
} gs_ref;

typedef struct {
    const json_t *root;
    bool ws;
    gs_rule *rules;
    int n_rules, cap_rules;
    int *hash; /* open addressing: rule index + 1, 0 empty */
    int hash_cap;
    gs_ref *refs;
    int n_refs, cap_refs;
    int prim[P_COUNT]; /* rule index + 1 of each shared rule once used */
    gs_buf path;       /* JSON pointer of the node being translated */
    gs_buf stem;       /* rule-name stem of the node being translated ("" at the root) */
    int depth;
    gram_schema_err *e;
} gs_ctx;

typedef struct {
    size_t path, stem;
} gs_mark;

static const char *ptr_or_root(const char *p) { return *p ? p : "(root)"; }

/* Record an error for the user: e->message, e->pointer (the current node), e->keyword, and the
 * thread's hy_err message with the location. Returns code. */
static int gs_fail(gs_ctx *c, int code, const char *kw, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int gs_fail(gs_ctx *c, int code, const char *kw, const char *fmt, ...)
{
    gram_schema_err *e = c->e;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    snprintf(e->pointer, sizeof e->pointer, "%s", buf_str(&c->path));
    snprintf(e->keyword, sizeof e->keyword, "%s", kw ? kw : "");
    return hy_err_set(code, "%s (at schema location %s)", e->message, ptr_or_root(e->pointer));
}

static int gs_unsupported(gs_ctx *c, const char *kw)
{
    return gs_fail(c, HY_EINVAL, kw, "JSON Schema keyword '%s' is not supported", kw);
}

/* A failed buffer (out of memory, or the grammar grew past the cap) as an error. */
static int gs_check(gs_ctx *c, const gs_buf *b)
{
    if (b->err == HY_ENOMEM)
        return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar");
    if (b->err)
        return gs_fail(c, HY_ELIMIT, "", "the schema's grammar would exceed %u bytes",
                       (unsigned)GS_MAX_TEXT);
    return 0;
}

static gs_mark gs_save(const gs_ctx *c) { return (gs_mark){c->path.n, c->stem.n}; }

static void gs_restore(gs_ctx *c, gs_mark m)
{
    buf_truncate(&c->path, m.path);
    buf_truncate(&c->stem, m.stem);
}

/* Append one segment to the JSON pointer (RFC 6901 escaping). */
static void push_path(gs_ctx *c, const char *seg)
{
    buf_puts(&c->path, "/");
    for (const char *p = seg; *p; p++) {
        if (*p == '~')
            buf_puts(&c->path, "~0");
        else if (*p == '/')
            buf_puts(&c->path, "~1");
        else
            buf_putn(&c->path, p, 1);
    }
}

static void push_stem(gs_ctx *c, const char *seg)
{
    if (c->stem.n)
        buf_puts(&c->stem, "-");
    buf_puts(&c->stem, seg);
}

static void push_index(gs_ctx *c, const char *kw, size_t i, const char *stem_prefix)
{
    char n[32];
    push_path(c, kw);
    snprintf(n, sizeof n, "%zu", i);
    push_path(c, n);
    snprintf(n, sizeof n, "%s%zu", stem_prefix, i);
    push_stem(c, n);
}

/* ---- rule names ---- */

/* Names are compared without case: llguidance's GBNF reader lowercases them, and two rules that
 * differ only in case would collide there. */
static uint32_t hash_str(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (unsigned char)(*s >= 'A' && *s <= 'Z' ? *s + 32 : *s)) * 16777619u;
    return h;
}

static bool name_taken(const gs_ctx *c, const char *name)
{
    if (!c->hash_cap)
        return false;
    for (uint32_t i = hash_str(name) & (uint32_t)(c->hash_cap - 1);; i = (i + 1) & (uint32_t)(c->hash_cap - 1)) {
        int r = c->hash[i];
        if (!r)
            return false;
        if (!strcasecmp(c->rules[r - 1].name, name))
            return true;
    }
}

static void hash_insert(gs_ctx *c, int idx)
{
    uint32_t i = hash_str(c->rules[idx].name) & (uint32_t)(c->hash_cap - 1);
    while (c->hash[i])
        i = (i + 1) & (uint32_t)(c->hash_cap - 1);
    c->hash[i] = idx + 1;
}

static int hash_grow(gs_ctx *c)
{
    if ((c->n_rules + 1) * 2 <= c->hash_cap)
        return 0;
    int cap = c->hash_cap ? c->hash_cap * 2 : 64;
    int *h = calloc((size_t)cap, sizeof *h);
    if (!h)
        return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar");
    free(c->hash);
    c->hash = h;
    c->hash_cap = cap;
    for (int i = 0; i < c->n_rules; i++)
        hash_insert(c, i);
    return 0;
}

/* A rule name from a stem: [A-Za-z0-9-] only, runs of anything else as one '-', at most 40
 * characters, "r" when nothing is left. */
static void sanitize(const char *stem, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = stem; *p && n + 1 < cap && n < 40; p++) {
        char ch = *p;
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
        if (ok)
            out[n++] = ch;
        else if (n && out[n - 1] != '-')
            out[n++] = '-';
    }
    while (n && out[n - 1] == '-')
        n--;
    if (!n)
        out[n++] = 'r';
    out[n] = '\0';
}

/* Reserve a fresh rule named after stem (made unique with -2, -3, ...). */
static int rule_new(gs_ctx *c, const char *stem, int *idx)
{
    char base[48], name[64];
    sanitize(stem, base, sizeof base);
    snprintf(name, sizeof name, "%s", base);
    for (int k = 2; name_taken(c, name); k++)
        snprintf(name, sizeof name, "%s-%d", base, k);
    int rc = hash_grow(c);
    if (rc)
        return rc;
    if (c->n_rules == c->cap_rules) {
        int cap = c->cap_rules ? c->cap_rules * 2 : 32;
        gs_rule *r = realloc(c->rules, sizeof *r * (size_t)cap);
        if (!r)
            return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar");
        c->rules = r;
        c->cap_rules = cap;
    }
    gs_rule *r = &c->rules[c->n_rules];
    memset(r, 0, sizeof *r);
    r->name = strdup(name);
    if (!r->name)
        return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar");
    *idx = c->n_rules++;
    hash_insert(c, *idx);
    return 0;
}

/* Give rule idx its body (taken over: *body is emptied). */
static int rule_define(gs_ctx *c, int idx, gs_buf *body)
{
    int rc = gs_check(c, body);
    if (rc)
        return rc;
    c->rules[idx].body = *body;
    c->rules[idx].defined = true;
    memset(body, 0, sizeof *body);
    return 0;
}

/* The name of a shared rule, reserving it on first use. */
static const char *pname(gs_ctx *c, int p)
{
    if (!c->prim[p]) {
        int idx;
        if (rule_new(c, prim_stem[p], &idx))
            return "value"; /* the error is recorded; the text is never used */
        c->prim[p] = idx + 1;
    }
    return c->rules[c->prim[p] - 1].name;
}

static void put_prim(gs_ctx *c, gs_buf *out, int p) { buf_puts(out, pname(c, p)); }

/* A structural character, with optional whitespace around it in flexible mode. */
static void put_sep(gs_ctx *c, gs_buf *out, const char *lit)
{
    if (c->ws)
        buf_printf(out, "%s \"%s\" %s", pname(c, P_WS), lit, pname(c, P_WS));
    else
        buf_printf(out, "\"%s\"", lit);
}

/* "{" / "[" then optional whitespace; optional whitespace then "}" / "]". */
static void put_open(gs_ctx *c, gs_buf *out, const char *lit)
{
    buf_printf(out, "\"%s\"", lit);
    if (c->ws)
        buf_printf(out, " %s", pname(c, P_WS));
}

static void put_close(gs_ctx *c, gs_buf *out, const char *lit)
{
    if (c->ws)
        buf_printf(out, "%s ", pname(c, P_WS));
    buf_printf(out, "\"%s\"", lit);
}

/* ------------------------------------------------------------------------------------------ */
/* GBNF text for characters. */

/* A byte string as a GBNF literal. */
static void put_lit(gs_buf *out, const char *s, size_t n)
{
    buf_puts(out, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\')
            buf_printf(out, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7F)
            buf_printf(out, "\\x%02X", ch);
        else
            buf_putn(out, (const char *)&s[i], 1);
    }
    buf_puts(out, "\"");
}

static void put_class_cp(gs_buf *out, uint32_t cp)
{
    if (cp < 0x20 || (cp >= 0x7F && cp < 0xA0) || cp == '-' || cp == '^')
        buf_printf(out, "\\x%02X", (unsigned)cp);
    else if (cp == '\\' || cp == ']' || cp == '[')
        buf_printf(out, "\\%c", (char)cp);
    else
        buf_utf8(out, cp); /* non-ASCII raw: the UTF-8 text is the character */
}

static void put_class_ranges(gs_buf *out, const cp_set *s)
{
    for (int i = 0; i < s->n; i++) {
        put_class_cp(out, s->r[i].lo);
        if (s->r[i].hi > s->r[i].lo) {
            if (s->r[i].hi > s->r[i].lo + 1)
                buf_puts(out, "-");
            put_class_cp(out, s->r[i].hi);
        }
    }
}

static bool is_special(uint32_t cp) { return cp < 0x20 || cp == '"' || cp == '\\' || cp == 0x7F; }

/* Code points a string may hold unescaped. */
static void raw_set(cp_set *s)
{
    cps_add(s, 0x20, 0x21);
    cps_add(s, 0x23, 0x5B);
    cps_add(s, 0x5D, 0x7E);
    cps_add(s, 0x80, 0xD7FF);
    cps_add(s, 0xE000, GS_MAX_CP);
}

/* The low hex digits (either case) of the \u00XX spellings of the control characters in s with
 * high digit hi, as a class; false when there are none. */
static bool put_nibbles(gs_buf *out, const cp_set *s, uint32_t hi)
{
    cp_set d = {0};
    for (uint32_t n = 0; n < 16; n++) {
        if (!cps_has(s, hi * 16 + n))
            continue;
        if (n < 10) {
            cps_add(&d, '0' + n, '0' + n);
        } else {
            cps_add(&d, 'a' + n - 10, 'a' + n - 10);
            cps_add(&d, 'A' + n - 10, 'A' + n - 10);
        }
    }
    cps_norm(&d);
    bool any = d.n > 0;
    if (any) {
        buf_printf(out, "\"%x\" [", (unsigned)hi);
        put_class_ranges(out, &d);
        buf_puts(out, "]");
    }
    cps_free(&d, out);
    return any;
}

/* Every spelling llguidance accepts for the special characters (controls, '"', '\', U+007F) in
 * s, as alternatives; returns how many were written. */
static int put_specials(gs_buf *out, const cp_set *s)
{
    static const char shorts[][2] = {{'"', '"'}, {'\\', '\\'}, {'\b', 'b'}, {'\f', 'f'},
                                     {'\n', 'n'}, {'\r', 'r'}, {'\t', 't'}};
    int n = 0;
    gs_buf cls = {0}, u = {0};
    for (size_t i = 0; i < HY_ARRAY_LEN(shorts); i++)
        if (cps_has(s, (unsigned char)shorts[i][0]))
            buf_putn(&cls, i == 1 ? "\\\\" : &shorts[i][1], i == 1 ? 2 : 1);
    if (cls.n == 1 || (cls.n == 2 && cls.p[0] == '\\')) /* one: a literal */
        buf_printf(out, "\"\\\\%s%s\"", cls.p[0] == '"' || cls.p[0] == '\\' ? "\\" : "", cls.p + (cls.n == 2));
    else if (cls.n)
        buf_printf(out, "\"\\\\\" [%s]", cls.p);
    n += cls.n > 0;
    bool lo = put_nibbles(&u, s, 0);
    gs_buf u1 = {0};
    bool hi = put_nibbles(&u1, s, 1);
    if (lo || hi) {
        buf_printf(out, "%s\"\\\\u00\" ", n++ ? " | " : "");
        buf_printf(out, lo && hi ? "( %s | %s )" : "%s%s", buf_str(&u), buf_str(&u1));
    }
    if (cps_has(s, 0x7F))
        buf_printf(out, "%s\"\\\\u007\" [fF]", n++ ? " | " : "");
    buf_free(&cls);
    buf_free(&u);
    buf_free(&u1);
    return n;
}

/* One string character (as JSON text) whose decoded value is in set s (normalised): a class for
 * the raw part, escapes for the special characters. Writes one element (parenthesised when it has
 * alternatives); `nothing` is set when s holds no character at all. */
static void put_charset(gs_ctx *c, gs_buf *out, const cp_set *s, bool *nothing)
{
    cp_set all = {0}, raw = {0};
    raw_set(&all);
    cps_intersect(s, &all, &raw);
    int n_spec = 0;
    for (uint32_t cp = 0; cp < 0x80; cp++)
        n_spec += is_special(cp) && cps_has(s, cp);
    bool every = n_spec == 35, full_raw = raw.n == all.n && !memcmp(raw.r, all.r, sizeof *raw.r * (size_t)raw.n);
    *nothing = !raw.n && !n_spec;
    if (every && full_raw) {
        put_prim(c, out, P_CHAR);
        goto done;
    }
    gs_buf spec = {0};
    int n_spec_alt = !n_spec ? 0 : every ? (buf_puts(&spec, pname(c, P_ESC)), 1) : put_specials(&spec, s);
    bool wrap = (raw.n > 0) + n_spec_alt > 1;
    if (wrap)
        buf_puts(out, "( ");
    if (raw.n) {
        cp_set neg = {0}, rest = {0};
        for (int i = 0; i < raw.n; i++)
            cps_add(&rest, raw.r[i].lo, raw.r[i].hi);
        cps_norm(&rest);
        cps_negate(&rest); /* what the class must leave out */
        cps_intersect(&rest, &all, &neg);
        buf_puts(out, "[");
        if (neg.n + 3 < raw.n) {
            buf_puts(out, "^\"\\\\\\x00-\\x1F\\x7F");
            put_class_ranges(out, &neg);
        } else {
            put_class_ranges(out, &raw);
        }
        buf_puts(out, "]");
        cps_free(&neg, out);
        cps_free(&rest, out);
    }
    if (n_spec_alt)
        buf_printf(out, "%s%s", raw.n ? " | " : "", buf_str(&spec));
    if (wrap)
        buf_puts(out, " )");
    buf_free(&spec);
done:
    cps_free(&all, out);
    cps_free(&raw, out);
}

static void put_char_cp(gs_ctx *c, gs_buf *out, uint32_t cp)
{
    cp_set s = {0};
    bool nothing;
    cps_add(&s, cp, cp);
    put_charset(c, out, &s, &nothing);
    cps_free(&s, out);
}

/* A string with value s[0..n) (with its quotes when `quoted`): runs of plain characters as one
 * literal, special characters with all their spellings. Elements are space-separated; *first says
 * whether nothing was written before. */
static void put_string_body(gs_ctx *c, gs_buf *out, const char *s, size_t n, bool quoted, bool *first)
{
    gs_buf run = {0};
    if (quoted)
        buf_puts(&run, "\"");
    for (size_t i = 0; i < n;) {
        size_t at = i;
        int64_t cp = utf8_next(s, n, &i);
        if (cp < 0) { /* not UTF-8 (jansson never hands that out): skip the byte */
            i = at + 1;
            continue;
        }
        if (!is_special((uint32_t)cp)) {
            buf_putn(&run, s + at, i - at);
            continue;
        }
        if (run.n) {
            buf_puts(out, *first ? "" : " ");
            put_lit(out, run.p, run.n);
            buf_truncate(&run, 0);
            *first = false;
        }
        buf_puts(out, *first ? "" : " ");
        put_char_cp(c, out, (uint32_t)cp);
        *first = false;
    }
    if (quoted)
        buf_puts(&run, "\"");
    if (run.n) {
        buf_puts(out, *first ? "" : " ");
        put_lit(out, run.p, run.n);
        *first = false;
    }
    if (run.err)
        out->err = out->err ? out->err : run.err;
    buf_free(&run);
}

/* A string value as elements including the quotes. */
static void put_string_value(gs_ctx *c, gs_buf *out, const char *s, size_t n)
{
    bool first = true;
    put_string_body(c, out, s, n, true, &first);
}

/* A key as serde_json writes it (the one spelling llguidance accepts for declared keys). */
static void canon_key(const char *s, size_t n, gs_buf *out)
{
    buf_puts(out, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        const char *esc = ch == '"' ? "\\\"" : ch == '\\' ? "\\\\" : ch == '\b' ? "\\b"
                        : ch == '\f' ? "\\f" : ch == '\n' ? "\\n" : ch == '\r' ? "\\r"
                        : ch == '\t' ? "\\t" : NULL;
        if (esc)
            buf_puts(out, esc);
        else if (ch < 0x20)
            buf_printf(out, "\\u%04x", ch);
        else
            buf_putn(out, (const char *)&s[i], 1);
    }
    buf_puts(out, "\"");
}

/* ------------------------------------------------------------------------------------------ */
/* Shared rules. */

static void prim_format_body(gs_ctx *c, int p, gs_buf *b);

/* The JSON building blocks. */
static void prim_body(gs_ctx *c, int p, gs_buf *b)
{
    switch (p) {
    case P_VALUE:
        buf_printf(b, "%s | %s | %s | %s | %s | %s", pname(c, P_OBJECT), pname(c, P_ARRAY),
                   pname(c, P_STRING), pname(c, P_NUMBER), pname(c, P_BOOLEAN), pname(c, P_NULL));
        break;
    case P_OBJECT:
        put_open(c, b, "{");
        buf_printf(b, " ( %s ", pname(c, P_STRING));
        put_sep(c, b, ":");
        buf_printf(b, " %s ( ", pname(c, P_VALUE));
        put_sep(c, b, ",");
        buf_printf(b, " %s ", pname(c, P_STRING));
        put_sep(c, b, ":");
        buf_printf(b, " %s )* %s)? ", pname(c, P_VALUE), c->ws ? pname(c, P_WS) : "");
        buf_puts(b, "\"}\"");
        break;
    case P_ARRAY:
        put_open(c, b, "[");
        buf_printf(b, " ( %s ( ", pname(c, P_VALUE));
        put_sep(c, b, ",");
        buf_printf(b, " %s )* %s)? \"]\"", pname(c, P_VALUE), c->ws ? pname(c, P_WS) : "");
        break;
    case P_STRING:
        buf_printf(b, "\"\\\"\" %s* \"\\\"\"", pname(c, P_CHAR));
        break;
    case P_CHAR:
        buf_printf(b, "[^\"\\\\\\x00-\\x1F\\x7F] | %s", pname(c, P_ESC));
        break;
    case P_ESC:
        buf_puts(b, "\"\\\\\" [\"\\\\bfnrt] | \"\\\\u00\" ( [01] [0-9a-fA-F] | \"7\" [fF] )");
        break;
    case P_NUMBER:
        buf_puts(b, "\"-\"? ( \"0\" | [1-9] [0-9]* ) ( \".\" [0-9]+ )? ( [eE] [+\\x2D]? [0-9]+ )?");
        break;
    case P_INTEGER:
        buf_puts(b, "\"-\"? ( \"0\" | [1-9] [0-9]* )");
        break;
    case P_BOOLEAN:
        buf_puts(b, "\"true\" | \"false\"");
        break;
    case P_NULL:
        buf_puts(b, "\"null\"");
        break;
    case P_WS:
        buf_puts(b, "[ \\t\\n\\r]*");
        break;
    case P_KCHAR:
        buf_printf(b, "[^\"\\\\\\x00-\\x1F\\x7F] | \"\\\\\" %s", pname(c, P_KESC));
        break;
    case P_KESC:
        buf_printf(b, "[\"\\\\bfnrt] | \"u\" %s", pname(c, P_KESCU));
        break;
    case P_KESCU: /* any \u escape but a lone surrogate */
        buf_puts(b, "[0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}"
                    " | [dD] [89abAB] [0-9a-fA-F]{2} \"\\\\u\" [dD] [c-fC-F] [0-9a-fA-F]{2}");
        break;
    default:
        prim_format_body(c, p, b);
    }
}

/* The string formats, as llguidance defines them (its json/formats.rs). */
static void prim_format_body(gs_ctx *c, int p, gs_buf *b)
{
    switch (p) {
    case P_DATE: /* days per month, February up to 29 */
        buf_puts(b, "[0-9]{4} \"-\" ( ( \"0\" [13578] | \"1\" [02] ) \"-\" ( \"0\" [1-9] | [12] [0-9]"
                    " | \"3\" [01] ) | ( \"0\" [469] | \"11\" ) \"-\" ( \"0\" [1-9] | [12] [0-9] | \"30\" )"
                    " | \"02-\" ( \"0\" [1-9] | [12] [0-9] ) )");
        break;
    case P_TIME: /* the zone is required */
        buf_puts(b, "( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\" ( [0-5] [0-9] | \"60\" )"
                    " ( \".\" [0-9]+ )? ( [zZ] | [+\\x2D] ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] )");
        break;
    case P_DATETIME:
        buf_printf(b, "%s [tT] %s", pname(c, P_DATE), pname(c, P_TIME));
        break;
    case P_UUID:
        buf_puts(b, "[0-9a-fA-F]{8} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4}"
                    " \"-\" [0-9a-fA-F]{12}");
        break;
    case P_EMAIL:
        buf_printf(b, "%s ( \".\" %s )* \"@\" ( %s ( \".\" %s )* | \"[\" %s \"]\" )",
                   pname(c, P_EMAIL_ATOM), pname(c, P_EMAIL_ATOM), pname(c, P_LABEL),
                   pname(c, P_LABEL), pname(c, P_IPV4));
        break;
    case P_EMAIL_ATOM:
        buf_puts(b, "[a-zA-Z0-9!#$%&'*+/=?\\x5E_`{|}~\\x2D]+");
        break;
    case P_LABEL:
        buf_puts(b, "[a-zA-Z0-9] ( [a-zA-Z0-9\\x2D]* [a-zA-Z0-9] )?");
        break;
    case P_IPV4:
        buf_printf(b, "%s \".\" %s \".\" %s \".\" %s", pname(c, P_OCTET), pname(c, P_OCTET),
                   pname(c, P_OCTET), pname(c, P_OCTET));
        break;
    case P_OCTET:
        buf_puts(b, "\"25\" [0-5] | \"2\" [0-4] [0-9] | \"1\" [0-9] [0-9] | [1-9] [0-9] | [0-9]");
        break;
    case P_HOSTNAME:
        buf_printf(b, "%s ( \".\" %s )*", pname(c, P_HOST_LABEL), pname(c, P_HOST_LABEL));
        break;
    case P_HOST_LABEL:
        buf_puts(b, "[a-zA-Z0-9] ( [a-zA-Z0-9\\x2D]{0,61} [a-zA-Z0-9] )?");
        break;
    }
}

/* Define every shared rule used so far (defining one may use more). */
static int define_prims(gs_ctx *c)
{
    for (bool again = true; again;) {
        again = false;
        for (int p = 0; p < P_COUNT; p++) {
            if (!c->prim[p] || c->rules[c->prim[p] - 1].defined)
                continue;
            gs_buf b = {0};
            prim_body(c, p, &b);
            int rc = rule_define(c, c->prim[p] - 1, &b);
            buf_free(&b);
            if (rc)
                return rc;
            again = true;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Keywords. */

static const char *const kw_ignored[] = {
    "title", "description", "$schema", "$id", "default", "examples", "deprecated", "readOnly",
    "writeOnly", "$comment", "$defs", "definitions",
    /* OpenAPI's hint for tagged unions (pydantic emits it next to oneOf); the oneOf itself
     * constrains the value, so ignoring the hint loses nothing */
    "discriminator",
};

static const char *const kw_supported[] = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "format",
};

static bool in_list(const char *k, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(k, list[i]))
            return true;
    return false;
}

static bool kw_is_ignored(const char *k) { return in_list(k, kw_ignored, HY_ARRAY_LEN(kw_ignored)); }

static int check_keywords(gs_ctx *c, const json_t *s)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)s, k, v) {
        if (!kw_is_ignored(k) && !in_list(k, kw_supported, HY_ARRAY_LEN(kw_supported)))
            return gs_unsupported(c, k);
    }
    return 0;
}

/* Whether s has a keyword besides annotations and the ones listed in `except`. */
static const char *constraint_besides(const json_t *s, const char *const *except, size_t n)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)s, k, v) {
        if (!kw_is_ignored(k) && !in_list(k, except, n))
            return k;
    }
    return NULL;
}

static bool has_any(const json_t *s, const char *const *kws, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (json_object_get(s, kws[i]))
            return true;
    return false;
}

enum { T_OBJECT = 1, T_ARRAY = 2, T_STRING = 4, T_NUMBER = 8, T_INTEGER = 16, T_BOOLEAN = 32,
       T_NULL = 64, T_ALL = 127 };
static const char *const type_names[] = {"object", "array", "string", "number", "integer",
                                         "boolean", "null"};

static int type_bit(const char *name)
{
    for (int i = 0; i < 7; i++)
        if (!strcmp(name, type_names[i]))
            return 1 << i;
    return 0;
}

/* The types s allows (T_ALL without `type`); an integer is a number too. */
static int schema_types(gs_ctx *c, const json_t *s, int *out)
{
    const json_t *t = json_object_get(s, "type");
    *out = t ? 0 : T_ALL;
    if (!t)
        return 0;
    if (json_is_string(t)) {
        *out = type_bit(json_string_value(t));
        if (!*out)
            return gs_fail(c, HY_EINVAL, "", "unknown type '%s'", json_string_value(t));
        return 0;
    }
    if (!json_is_array(t))
        return gs_fail(c, HY_EINVAL, "", "'type' must be a string or an array of strings");
    size_t i;
    json_t *v;
    json_array_foreach(t, i, v) {
        int b = json_is_string(v) ? type_bit(json_string_value(v)) : 0;
        if (!b)
            return gs_fail(c, HY_EINVAL, "", "'type' must be a string or an array of type names");
        *out |= b;
    }
    return 0;
}

/* A non-negative integer keyword (absent: def). */
static int get_count(gs_ctx *c, const json_t *s, const char *kw, long long def, long long *out)
{
    const json_t *v = json_object_get(s, kw);
    *out = def;
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return gs_fail(c, HY_EINVAL, "", "'%s' must be a non-negative integer", kw);
    *out = json_integer_value(v);
    if (*out > GS_MAX_REPEAT)
        return gs_fail(c, HY_ELIMIT, kw, "'%s' above %d is not supported", kw, GS_MAX_REPEAT);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* $ref: local pointers into the root document. */

static int ref_resolve(gs_ctx *c, const char *ref, const json_t **node)
{
    if (ref[0] != '#')
        return gs_fail(c, HY_EINVAL, "$ref", "only local $ref ('#...') is supported, not '%s'", ref);
    const json_t *cur = c->root;
    const char *p = ref + 1;
    if (*p && *p != '/')
        return gs_fail(c, HY_EINVAL, "", "$ref '%s' is not a JSON pointer", ref);
    while (*p == '/') {
        char seg[256];
        size_t n = 0;
        for (p++; *p && *p != '/'; p++) {
            char ch = *p;
            if (ch == '~' && (p[1] == '0' || p[1] == '1'))
                ch = *++p == '0' ? '~' : '/';
            else if (ch == '%' && p[1] && p[2]) { /* URI fragment escapes */
                char hex[3] = {p[1], p[2], 0}, *end;
                long v = strtol(hex, &end, 16);
                if (*end == '\0') {
                    ch = (char)v;
                    p += 2;
                }
            }
            if (n + 1 >= sizeof seg)
                return gs_fail(c, HY_EINVAL, "", "$ref '%s' is too long", ref);
            seg[n++] = ch;
        }
        seg[n] = '\0';
        if (json_is_object(cur)) {
            cur = json_object_get(cur, seg);
        } else if (json_is_array(cur)) {
            char *end;
            unsigned long i = strtoul(seg, &end, 10);
            cur = *seg && *end == '\0' ? json_array_get(cur, i) : NULL;
        } else {
            cur = NULL;
        }
        if (!cur)
            return gs_fail(c, HY_EINVAL, "", "$ref '%s' does not resolve", ref);
    }
    *node = cur;
    return 0;
}

/* The rule of $ref target ref, queued for translation on first use (so recursion works). */
static int ref_rule(gs_ctx *c, const char *ref, int *rule)
{
    for (int i = 0; i < c->n_refs; i++)
        if (!strcmp(c->refs[i].ref, ref)) {
            *rule = c->refs[i].rule;
            return 0;
        }
    const json_t *node;
    int rc = ref_resolve(c, ref, &node);
    if (rc)
        return rc;
    if (c->n_refs == c->cap_refs) {
        int cap = c->cap_refs ? c->cap_refs * 2 : 8;
        gs_ref *r = realloc(c->refs, sizeof *r * (size_t)cap);
        if (!r)
            return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar");
        c->refs = r;
        c->cap_refs = cap;
    }
    const char *last = strrchr(ref, '/');
    rc = rule_new(c, last ? last + 1 : "root", rule);
    if (rc)
        return rc;
    gs_ref *r = &c->refs[c->n_refs];
    memset(r, 0, sizeof *r);
    r->ref = strdup(ref);
    r->ptr = strdup(ref + 1);
    if (!r->ref || !r->ptr) {
        free(r->ref);
        free(r->ptr);
        return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar");
    }
    r->node = node;
    r->rule = *rule;
    c->n_refs++;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* allOf, and $ref / anyOf with constraining siblings: schemas merged into one (new references).
 * Properties merge key by key, a key missing on one side meeting that side's
 * additionalProperties, as JSON Schema (and llguidance) mean it. */

static int merge(gs_ctx *c, const json_t *a, const json_t *b, json_t **out);

static json_t *without(const json_t *s, const char *k1, const char *k2)
{
    json_t *t = json_copy((json_t *)s);
    if (t) {
        json_object_del(t, k1);
        if (k2)
            json_object_del(t, k2);
    }
    return t;
}

static int oom(gs_ctx *c) { return gs_fail(c, HY_ENOMEM, "", "out of memory while building the grammar"); }

static json_t *types_json(int t)
{
    json_t *arr = json_array();
    for (int i = 0; arr && i < 7; i++)
        if (t & (1 << i))
            json_array_append_new(arr, json_string(type_names[i]));
    return arr;
}

/* `type` of the merge; 0 types means nothing matches. */
static int merge_type(gs_ctx *c, const json_t *a, const json_t *b, json_t *res, bool *empty)
{
    int ta, tb;
    int rc = schema_types(c, a, &ta);
    if (!rc)
        rc = schema_types(c, b, &tb);
    if (rc)
        return rc;
    if (ta == T_ALL && tb == T_ALL)
        return 0;
    int t = ta & tb;
    if ((ta & T_NUMBER) && (tb & T_INTEGER))
        t |= T_INTEGER;
    if ((tb & T_NUMBER) && (ta & T_INTEGER))
        t |= T_INTEGER;
    *empty = t == 0;
    return json_object_set_new(res, "type", types_json(t)) ? oom(c) : 0;
}

/* The schema one side gives property k: its properties[k], else its additionalProperties. */
static const json_t *prop_of(const json_t *s, const char *k)
{
    const json_t *p = json_object_get(json_object_get(s, "properties"), k);
    if (p)
        return p;
    p = json_object_get(s, "additionalProperties");
    return p ? p : json_true();
}

static int merge_props(gs_ctx *c, const json_t *a, const json_t *b, json_t *res)
{
    const json_t *pa = json_object_get(a, "properties"), *pb = json_object_get(b, "properties");
    if ((pa && !json_is_object(pa)) || (pb && !json_is_object(pb)))
        return gs_fail(c, HY_EINVAL, "", "'properties' must be an object");
    json_t *props = json_object();
    if (!props)
        return oom(c);
    const json_t *sides[2] = {pa, pb};
    for (int s = 0; s < 2; s++) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)sides[s], k, v) {
            if (json_object_get(props, k))
                continue;
            json_t *m = NULL;
            int rc = merge(c, prop_of(a, k), prop_of(b, k), &m);
            if (rc || json_object_set_new(props, k, m)) {
                json_decref(props);
                return rc ? rc : oom(c);
            }
        }
    }
    json_t *addl = NULL;
    int rc = merge(c, prop_of(a, "\x01"), prop_of(b, "\x01"), &addl); /* no such key: additional */
    if (rc)
        json_decref(props);
    else if (json_object_set_new(res, "properties", props)) /* takes props, even on failure */
        rc = oom(c);
    if (!rc && !json_is_true(addl) && json_object_set(res, "additionalProperties", addl))
        rc = oom(c);
    json_decref(addl);
    return rc;
}

static int merge_required(gs_ctx *c, const json_t *ra, const json_t *rb, json_t *res)
{
    json_t *req = json_array();
    if (!req)
        return oom(c);
    const json_t *sides[2] = {ra, rb};
    for (int s = 0; s < 2; s++) {
        size_t i;
        json_t *v;
        json_array_foreach(sides[s], i, v) {
            bool dup = false;
            for (size_t j = 0; j < json_array_size(req); j++)
                dup |= json_equal(json_array_get(req, j), v);
            if (!dup)
                json_array_append(req, v);
        }
    }
    return json_object_set_new(res, "required", req) ? oom(c) : 0;
}

/* items / prefixItems: positions of one side's prefix meet the other side's items. */
static int merge_items(gs_ctx *c, const json_t *a, const json_t *b, json_t *res)
{
    const json_t *pa = json_object_get(a, "prefixItems"), *pb = json_object_get(b, "prefixItems");
    const json_t *ia = json_object_get(a, "items"), *ib = json_object_get(b, "items");
    if (json_is_array(ia) || json_is_array(ib))
        return gs_fail(c, HY_EINVAL, "items", "'items' as an array inside allOf is not supported");
    if (pa && pb)
        return gs_fail(c, HY_EINVAL, "prefixItems", "allOf with 'prefixItems' in two branches is not supported");
    ia = ia ? ia : json_true();
    ib = ib ? ib : json_true();
    const json_t *p = pa ? pa : pb, *other = pa ? ib : ia;
    json_t *m = NULL;
    int rc = 0;
    if (p) {
        json_t *arr = json_array();
        size_t i;
        json_t *v;
        json_array_foreach(p, i, v) {
            if (!rc)
                rc = merge(c, v, other, &m);
            if (!rc && json_array_append_new(arr, m))
                rc = oom(c);
        }
        if (!rc && json_object_set_new(res, "prefixItems", arr))
            rc = oom(c);
        else if (rc)
            json_decref(arr);
    }
    if (!rc)
        rc = merge(c, ia, ib, &m);
    if (!rc && json_object_set_new(res, "items", m))
        rc = oom(c);
    return rc;
}

/* Two bounds of one keyword: the tighter one. */
static int merge_bound(gs_ctx *c, const char *k, const json_t *va, const json_t *vb, json_t *res)
{
    if (!json_is_number(va) || !json_is_number(vb))
        return gs_fail(c, HY_EINVAL, "", "'%s' must be a number", k);
    bool lower = !strncmp(k, "min", 3) || !strcmp(k, "exclusiveMinimum");
    double x = json_number_value(va), y = json_number_value(vb);
    const json_t *pick = (lower ? x >= y : x <= y) ? va : vb;
    return json_object_set(res, k, (json_t *)pick) ? oom(c) : 0;
}

static bool is_bound_kw(const char *k)
{
    static const char *const b[] = {"minLength", "maxLength", "minItems", "maxItems", "minimum",
                                    "maximum", "exclusiveMinimum", "exclusiveMaximum"};
    return in_list(k, b, HY_ARRAY_LEN(b));
}

static int merge_enum(gs_ctx *c, const json_t *ea, const json_t *eb, json_t *res, bool *empty)
{
    if (!json_is_array(ea) || !json_is_array(eb))
        return gs_fail(c, HY_EINVAL, "", "'enum' must be an array");
    json_t *arr = json_array();
    size_t i, j;
    json_t *x, *y;
    json_array_foreach(ea, i, x) {
        json_array_foreach(eb, j, y) {
            if (json_equal(x, y)) {
                json_array_append(arr, x);
                break;
            }
        }
    }
    *empty = json_array_size(arr) == 0;
    return json_object_set_new(res, "enum", arr) ? oom(c) : 0;
}

/* One keyword present on both sides of a plain merge. */
static int merge_kw(gs_ctx *c, const char *k, const json_t *a, const json_t *b, json_t *res, bool *empty)
{
    const json_t *va = json_object_get(a, k), *vb = json_object_get(b, k);
    if (is_bound_kw(k))
        return merge_bound(c, k, va, vb, res);
    if (!strcmp(k, "enum"))
        return merge_enum(c, va, vb, res, empty);
    if (!strcmp(k, "const") || !strcmp(k, "pattern") || !strcmp(k, "format")) {
        if (json_equal((json_t *)va, (json_t *)vb))
            return json_object_set(res, k, (json_t *)va) ? oom(c) : 0;
        if (!strcmp(k, "const")) {
            *empty = true;
            return 0;
        }
        return gs_fail(c, HY_EINVAL, k, "allOf with two different '%s' values is not supported", k);
    }
    return json_object_set(res, k, (json_t *)va) ? oom(c) : 0; /* annotations: the first wins */
}

/* Merge of two schemas with no $ref, allOf, anyOf or oneOf. */
static int merge_plain(gs_ctx *c, const json_t *a, const json_t *b, json_t **out)
{
    static const char *const obj_kw[] = {"properties", "additionalProperties"};
    static const char *const arr_kw[] = {"items", "prefixItems"};
    json_t *res = json_object();
    bool empty = false;
    int rc = res ? merge_type(c, a, b, res, &empty) : oom(c);
    if (!rc && (has_any(a, obj_kw, 2) || has_any(b, obj_kw, 2)))
        rc = merge_props(c, a, b, res);
    if (!rc && (has_any(a, arr_kw, 2) || has_any(b, arr_kw, 2)))
        rc = merge_items(c, a, b, res);
    if (!rc && (json_object_get(a, "required") || json_object_get(b, "required")))
        rc = merge_required(c, json_object_get(a, "required"), json_object_get(b, "required"), res);
    const json_t *sides[2] = {a, b};
    for (int s = 0; s < 2 && !rc; s++) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)sides[s], k, v) {
            if (rc || json_object_get(res, k) || !strcmp(k, "$defs") || !strcmp(k, "definitions"))
                continue;
            if (in_list(k, obj_kw, 2) || in_list(k, arr_kw, 2) || !strcmp(k, "required"))
                continue;
            if (json_object_get(sides[1 - s], k))
                rc = merge_kw(c, k, a, b, res, &empty);
            else if (json_object_set(res, k, v))
                rc = oom(c);
        }
    }
    if (rc) {
        json_decref(res);
        return rc;
    }
    if (empty) {
        json_decref(res);
        res = json_false();
    }
    *out = res;
    return 0;
}

/* s with its $ref (target merged with the siblings) or allOf (folded) expanded. */
static int expand(gs_ctx *c, const json_t *s, json_t **out)
{
    const json_t *ref = json_object_get(s, "$ref");
    const json_t *all = json_object_get(s, "allOf");
    if (ref) {
        const json_t *target;
        if (!json_is_string(ref))
            return gs_fail(c, HY_EINVAL, "", "'$ref' must be a string");
        int rc = ref_resolve(c, json_string_value(ref), &target);
        json_t *rest = rc ? NULL : without(s, "$ref", NULL);
        if (!rc && !rest)
            rc = oom(c);
        if (!rc)
            rc = merge(c, rest, target, out);
        json_decref(rest);
        return rc;
    }
    if (!json_is_array(all) || !json_array_size(all))
        return gs_fail(c, HY_EINVAL, "", "'allOf' must be a non-empty array");
    json_t *acc = without(s, "allOf", NULL);
    if (!acc)
        return oom(c);
    size_t i;
    json_t *v;
    json_array_foreach(all, i, v) {
        json_t *m = NULL;
        int rc = merge(c, acc, v, &m);
        json_decref(acc);
        if (rc)
            return rc;
        acc = m;
    }
    *out = acc;
    return 0;
}

/* a AND b where a has anyOf / oneOf: {"anyOf": [ai AND rest-of-a AND b, ...]}. */
static int merge_distribute(gs_ctx *c, const json_t *a, const json_t *b, json_t **out)
{
    const char *kw = json_object_get(a, "anyOf") ? "anyOf" : "oneOf";
    const json_t *alts = json_object_get(a, kw);
    if (json_object_get(a, "anyOf") && json_object_get(a, "oneOf"))
        return gs_fail(c, HY_EINVAL, "oneOf", "anyOf together with oneOf is not supported");
    if (!json_is_array(alts))
        return gs_fail(c, HY_EINVAL, "", "'%s' must be an array", kw);
    json_t *rest = without(a, kw, NULL), *common = NULL, *arr = json_array();
    int rc = rest && arr ? merge(c, rest, b, &common) : oom(c);
    size_t i;
    json_t *v;
    json_array_foreach(alts, i, v) {
        json_t *m = NULL;
        if (!rc)
            rc = merge(c, v, common, &m);
        if (!rc && !json_is_false(m) && json_array_append(arr, m))
            rc = oom(c);
        json_decref(m);
    }
    json_decref(rest);
    json_decref(common);
    if (rc) {
        json_decref(arr);
        return rc;
    }
    *out = json_array_size(arr) ? json_pack("{s:o}", "anyOf", arr) : (json_decref(arr), json_false());
    return *out ? 0 : oom(c);
}

static int merge(gs_ctx *c, const json_t *a, const json_t *b, json_t **out)
{
    if (json_is_false(a) || json_is_false(b)) {
        *out = json_false();
        return 0;
    }
    if (!json_is_boolean(a) && !json_is_object(a))
        return gs_fail(c, HY_EINVAL, "", "a schema must be an object or a boolean");
    if (!json_is_boolean(b) && !json_is_object(b))
        return gs_fail(c, HY_EINVAL, "", "a schema must be an object or a boolean");
    if (json_is_true(b) || (json_is_object(b) && !json_object_size(b))) {
        if (json_is_true(a) || !json_object_size(a)) {
            *out = json_true();
            return 0;
        }
        const json_t *t = a;
        a = b;
        b = t;
    }
    if (++c->depth > GS_MAX_DEPTH) {
        c->depth--;
        return gs_fail(c, HY_ELIMIT, "allOf", "allOf / $ref nesting is deeper than %d levels", GS_MAX_DEPTH);
    }
    int rc = check_keywords(c, b);
    if (!rc && json_is_object(a))
        rc = check_keywords(c, a);
    json_t *x = NULL;
    if (rc) {
    } else if (json_is_true(a) || !json_object_size(a)) { /* only b left: still expand it */
        if (json_object_get(b, "$ref") || json_object_get(b, "allOf"))
            rc = expand(c, b, out);
        else
            *out = json_incref((json_t *)b);
    } else if (json_object_get(a, "$ref") || json_object_get(a, "allOf")) {
        rc = expand(c, a, &x);
        if (!rc)
            rc = merge(c, x, b, out);
    } else if (json_object_get(b, "$ref") || json_object_get(b, "allOf")) {
        rc = merge(c, b, a, out);
    } else if (json_object_get(a, "anyOf") || json_object_get(a, "oneOf")) {
        rc = merge_distribute(c, a, b, out);
    } else if (json_object_get(b, "anyOf") || json_object_get(b, "oneOf")) {
        rc = merge_distribute(c, b, a, out);
    } else {
        rc = merge_plain(c, a, b, out);
    }
    json_decref(x);
    c->depth--;
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Literal JSON values (enum, const) in their canonical text. */

/* An f64 as Rust's Display prints it (what llguidance matches): the shortest digits that read
 * back as the same value, never an exponent, no ".0" on integral values. */
static void put_real(gs_buf *out, double x)
{
    char tmp[64];
    int prec = 0;
    for (prec = 0; prec < 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec, x);
        if (strtod(tmp, NULL) == x)
            break;
    }
    snprintf(tmp, sizeof tmp, "%.*e", prec, x);
    char digits[32];
    size_t nd = 0;
    const char *p = tmp;
    if (*p == '-') {
        buf_puts(out, "-");
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    int exp = atoi(p + 1); /* value = 0.d1d2... * 10^(exp+1) */
    int point = exp + 1;   /* digits before the decimal point */
    if (point <= 0) {
        buf_puts(out, "0.");
        for (int i = 0; i < -point; i++)
            buf_puts(out, "0");
        buf_putn(out, digits, nd);
    } else if ((size_t)point >= nd) {
        buf_putn(out, digits, nd);
        for (size_t i = nd; i < (size_t)point; i++)
            buf_puts(out, "0");
    } else {
        buf_putn(out, digits, (size_t)point);
        buf_puts(out, ".");
        buf_putn(out, digits + point, nd - (size_t)point);
    }
}

static int put_value(gs_ctx *c, gs_buf *out, const json_t *v);

static int put_value_array(gs_ctx *c, gs_buf *out, const json_t *v)
{
    size_t i;
    json_t *x;
    put_open(c, out, "[");
    json_array_foreach(v, i, x) {
        buf_puts(out, " ");
        if (i) {
            put_sep(c, out, ",");
            buf_puts(out, " ");
        }
        int rc = put_value(c, out, x);
        if (rc)
            return rc;
    }
    buf_puts(out, " ");
    put_close(c, out, "]");
    return 0;
}

static int put_value_object(gs_ctx *c, gs_buf *out, const json_t *v)
{
    const char *k;
    json_t *x;
    bool first = true;
    put_open(c, out, "{");
    json_object_foreach((json_t *)v, k, x) {
        buf_puts(out, " ");
        if (!first) {
            put_sep(c, out, ",");
            buf_puts(out, " ");
        }
        first = false;
        put_string_value(c, out, k, strlen(k));
        buf_puts(out, " ");
        put_sep(c, out, ":");
        buf_puts(out, " ");
        int rc = put_value(c, out, x);
        if (rc)
            return rc;
    }
    buf_puts(out, " ");
    put_close(c, out, "}");
    return 0;
}

static int put_value(gs_ctx *c, gs_buf *out, const json_t *v)
{
    if (++c->depth > GS_MAX_DEPTH) {
        c->depth--;
        return gs_fail(c, HY_ELIMIT, "enum", "an enum / const value is nested deeper than %d levels", GS_MAX_DEPTH);
    }
    int rc = 0;
    switch (json_typeof(v)) {
    case JSON_NULL: buf_puts(out, "\"null\""); break;
    case JSON_TRUE: buf_puts(out, "\"true\""); break;
    case JSON_FALSE: buf_puts(out, "\"false\""); break;
    case JSON_INTEGER: buf_printf(out, "\"%" JSON_INTEGER_FORMAT "\"", json_integer_value(v)); break;
    case JSON_REAL:
        buf_puts(out, "\"");
        put_real(out, json_real_value(v));
        buf_puts(out, "\"");
        break;
    case JSON_STRING: put_string_value(c, out, json_string_value(v), json_string_length(v)); break;
    case JSON_ARRAY: rc = put_value_array(c, out, v); break;
    case JSON_OBJECT: rc = put_value_object(c, out, v); break;
    }
    c->depth--;
    return rc;
}

static int value_type(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return T_OBJECT;
    case JSON_ARRAY: return T_ARRAY;
    case JSON_STRING: return T_STRING;
    case JSON_INTEGER: return T_INTEGER | T_NUMBER;
    case JSON_REAL: {
        double x = json_real_value(v);
        return x == floor(x) ? T_INTEGER | T_NUMBER : T_NUMBER;
    }
    case JSON_TRUE:
    case JSON_FALSE: return T_BOOLEAN;
    default: return T_NULL;
    }
}

/* enum / const (with `type` filtering the values, as llguidance does). */
static int gen_enum(gs_ctx *c, const json_t *s, gs_buf *out)
{
    static const char *const allowed[] = {"enum", "const", "type"};
    const char *other = constraint_besides(s, allowed, HY_ARRAY_LEN(allowed));
    if (other)
        return gs_fail(c, HY_EINVAL, other, "JSON Schema keyword '%s' together with '%s' is not supported",
                       other, json_object_get(s, "enum") ? "enum" : "const");
    const json_t *en = json_object_get(s, "enum"), *cn = json_object_get(s, "const");
    if (en && !json_is_array(en))
        return gs_fail(c, HY_EINVAL, "", "'enum' must be an array");
    int types, rc = schema_types(c, s, &types);
    if (rc)
        return rc;
    int n = 0;
    size_t count = en ? json_array_size(en) : 1;
    for (size_t i = 0; i < count && !rc; i++) {
        const json_t *v = en ? json_array_get(en, i) : cn;
        if (!(value_type(v) & types) || (en && cn && !json_equal((json_t *)v, (json_t *)cn)))
            continue;
        buf_puts(out, n++ ? " | " : "");
        rc = put_value(c, out, v);
    }
    if (!rc && !n)
        return gs_fail(c, HY_EINVAL, "", "no value of '%s' fits the schema",
                       en ? "enum" : "const");
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Integer ranges as digit patterns, built the way llguidance's rx_int_range builds them (same
 * language, "-0" included where it is). Bounds are within +-GS_MAX_INT_BOUND. */

static int num_digits(long long v)
{
    int n = 1;
    for (v = v < 0 ? -v : v; v >= 10; v /= 10)
        n++;
    return n;
}

static void int_range(gs_buf *b, const long long *lo, const long long *hi);

/* Two alternatives as one group. */
static void int_or2(gs_buf *b, const long long *l1, const long long *h1, const long long *l2,
                    const long long *h2)
{
    buf_puts(b, "( ");
    int_range(b, l1, h1);
    buf_puts(b, " | ");
    int_range(b, l2, h2);
    buf_puts(b, " )");
}

static void int_range_same_len(gs_buf *b, long long lo, long long hi)
{
    char l[32], r[32];
    snprintf(l, sizeof l, "%lld", lo);
    snprintf(r, sizeof r, "%lld", hi);
    size_t n = strlen(l);
    char lx = l[n - 1], rx = r[n - 1];
    if (lo == hi) {
        buf_printf(b, "\"%s\"", l);
        return;
    }
    l[n - 1] = r[n - 1] = '\0'; /* the prefixes */
    if (!strcmp(l, r)) {
        if (n > 1)
            buf_printf(b, "\"%s\" ", l);
        buf_printf(b, "[%c-%c]", lx, rx);
        return;
    }
    long long lrec = atoll(l), rrec = atoll(r);
    int parts = 0;
    buf_puts(b, "( ");
    if (lx != '0') {
        lrec++;
        if (lx == '9')
            buf_printf(b, "\"%s9\"", l);
        else
            buf_printf(b, "\"%s\" [%c-9]", l, lx);
        parts++;
    }
    if (rx != '9') {
        rrec--;
        buf_puts(b, parts++ ? " | " : "");
        if (rx == '0')
            buf_printf(b, "\"%s0\"", r);
        else
            buf_printf(b, "\"%s\" [0-%c]", r, rx);
    }
    if (lrec <= rrec) {
        buf_puts(b, parts++ ? " | " : "");
        int_range(b, &lrec, &rrec);
        buf_puts(b, " [0-9]");
    }
    buf_puts(b, " )");
}

static void int_range(gs_buf *b, const long long *lo, const long long *hi)
{
    long long zero = 0, m1 = -1;
    if (!lo && !hi) {
        buf_puts(b, "\"-\"? ( \"0\" | [1-9] [0-9]* )");
    } else if (lo && !hi) {
        if (*lo < 0) {
            int_or2(b, lo, &m1, &zero, NULL);
        } else {
            long long nines = 0;
            int d = num_digits(*lo);
            for (int i = 0; i < d; i++)
                nines = nines * 10 + 9;
            buf_puts(b, "( ");
            int_range(b, lo, &nines);
            buf_printf(b, " | [1-9] [0-9]{%d,} )", d);
        }
    } else if (!lo && hi) {
        if (*hi >= 0) {
            int_or2(b, &zero, hi, NULL, &m1);
        } else {
            long long l = -*hi;
            buf_puts(b, "\"-\" ");
            int_range(b, &l, NULL);
        }
    } else if (*lo < 0) {
        long long nl = -*lo, nh = -*hi;
        if (*hi < 0) {
            buf_puts(b, "\"-\" ");
            int_range(b, &nh, &nl);
        } else {
            buf_puts(b, "( \"-\" ");
            int_range(b, &zero, &nl);
            buf_puts(b, " | ");
            int_range(b, &zero, hi);
            buf_puts(b, " )");
        }
    } else if (num_digits(*lo) == num_digits(*hi)) {
        int_range_same_len(b, *lo, *hi);
    } else {
        long long p = 1;
        for (int i = 0; i < num_digits(*lo); i++)
            p *= 10;
        long long bp = p - 1, bp1 = p;
        int_or2(b, lo, &bp, &bp1, hi);
    }
}

static int get_bound(gs_ctx *c, const json_t *s, const char *kw, bool lower, long long *v, bool *has)
{
    const json_t *j = json_object_get(s, kw);
    if (!j)
        return 0;
    if (!json_is_number(j))
        return gs_fail(c, HY_EINVAL, "", "'%s' must be a number", kw);
    double x = json_number_value(j);
    if (!(fabs(x) <= GS_MAX_INT_BOUND))
        return gs_fail(c, HY_EINVAL, kw, "'%s' beyond +-1e15 is not supported for integers", kw);
    bool excl = !strncmp(kw, "exclusive", 9);
    double r = lower ? (excl ? floor(x) + 1 : ceil(x)) : (excl ? ceil(x) - 1 : floor(x));
    long long n = (long long)r;
    if (!*has || (lower ? n > *v : n < *v))
        *v = n;
    *has = true;
    return 0;
}

static int gen_integer(gs_ctx *c, const json_t *s, gs_buf *out)
{
    long long lo = 0, hi = 0;
    bool hl = false, hh = false;
    int rc = get_bound(c, s, "minimum", true, &lo, &hl);
    if (!rc)
        rc = get_bound(c, s, "exclusiveMinimum", true, &lo, &hl);
    if (!rc)
        rc = get_bound(c, s, "maximum", false, &hi, &hh);
    if (!rc)
        rc = get_bound(c, s, "exclusiveMaximum", false, &hi, &hh);
    if (rc)
        return rc;
    if (!hl && !hh) {
        put_prim(c, out, P_INTEGER);
        return 0;
    }
    if (hl && hh && lo > hi)
        return gs_fail(c, HY_EINVAL, "", "no integer lies between the schema's bounds");
    int_range(out, hl ? &lo : NULL, hh ? &hi : NULL);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* `pattern`: a regex over the decoded string, as GBNF over its JSON spelling. The subset: literals,
 * escapes, classes, `.`, groups (capturing, (?:...), named), alternation, * + ? {m} {m,} {m,n}
 * (lazy forms too: the language is the same), ^ and $ at the ends of top-level alternatives. */

typedef struct {
    gs_ctx *c;
    uint32_t *cp; /* the pattern's code points */
    size_t n, i;
} rx_st;

static int rx_fail(rx_st *r, const char *what)
{
    return gs_fail(r->c, HY_EINVAL, "pattern", "pattern: %s is not supported (at character %zu)", what, r->i);
}

static bool rx_at(const rx_st *r, uint32_t ch) { return r->i < r->n && r->cp[r->i] == ch; }

static int rx_alt(rx_st *r, gs_buf *out, bool top);

/* \d \w \s (and negations) as sets: \d and \w ASCII (llguidance's "dw" mode), \s Unicode. */
static bool rx_class_escape(uint32_t e, cp_set *s)
{
    uint32_t lower = e | 0x20;
    cp_set t = {0};
    if (lower == 'd') {
        cps_add(&t, '0', '9');
    } else if (lower == 'w') {
        cps_add(&t, '0', '9');
        cps_add(&t, 'A', 'Z');
        cps_add(&t, '_', '_');
        cps_add(&t, 'a', 'z');
    } else if (lower == 's') {
        static const uint32_t ws[][2] = {{9, 13}, {32, 32}, {0x85, 0x85}, {0xA0, 0xA0},
                                         {0x1680, 0x1680}, {0x2000, 0x200A}, {0x2028, 0x2029},
                                         {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000}};
        for (size_t i = 0; i < HY_ARRAY_LEN(ws); i++)
            cps_add(&t, ws[i][0], ws[i][1]);
    } else {
        return false;
    }
    cps_norm(&t);
    if (e != lower)
        cps_negate(&t);
    for (int i = 0; i < t.n; i++)
        cps_add(s, t.r[i].lo, t.r[i].hi);
    if (t.err)
        s->err = t.err;
    cps_free(&t, NULL);
    return true;
}

/* ndig hex digits, or {digits} (Rust's \x{...}, \u{...}), after \x, \u or \U. */
static int rx_hex(rx_st *r, int ndig, uint32_t *v)
{
    *v = 0;
    bool brace = rx_at(r, '{');
    r->i += brace;
    int got = 0;
    while (r->i < r->n && (brace || got < ndig)) {
        uint32_t ch = r->cp[r->i], low = ch | 0x20;
        int d = ch >= '0' && ch <= '9' ? (int)(ch - '0') : low >= 'a' && low <= 'f' ? (int)(low - 'a' + 10) : -1;
        if (d < 0)
            break;
        *v = *v * 16 + (uint32_t)d;
        got++;
        r->i++;
        if (*v > GS_MAX_CP)
            return rx_fail(r, "a code point beyond U+10FFFF");
    }
    if (brace && !rx_at(r, '}'))
        return rx_fail(r, "an unterminated \\x{...}");
    if (brace)
        r->i++;
    if (!got || (!brace && got < ndig))
        return rx_fail(r, "a malformed hex escape");
    return 0;
}

/* An escape after '\': a single code point (*cp) or a class (added to set, *is_set). */
static int rx_escape(rx_st *r, uint32_t *cp, cp_set *set, bool *is_set)
{
    *is_set = false;
    if (r->i >= r->n)
        return rx_fail(r, "a trailing backslash");
    uint32_t e = r->cp[r->i++];
    if (rx_class_escape(e, set)) {
        *is_set = true;
        return 0;
    }
    switch (e) {
    case 'n': *cp = '\n'; return 0;
    case 'r': *cp = '\r'; return 0;
    case 't': *cp = '\t'; return 0;
    case 'f': *cp = '\f'; return 0;
    case 'v': *cp = '\v'; return 0;
    case 'a': *cp = 7; return 0;
    case 'x': return rx_hex(r, 2, cp);
    case 'u': return rx_hex(r, 4, cp);
    case 'U': return rx_hex(r, 8, cp);
    }
    if (e < 0x80 && ((e | 0x20) >= 'a' && (e | 0x20) <= 'z'))
        return rx_fail(r, "this backslash escape (word boundaries, \\p{...}, anchors)");
    if (e >= '0' && e <= '9')
        return rx_fail(r, "a backreference or octal escape");
    *cp = e; /* escaped punctuation is itself */
    return 0;
}

/* One member of a class: a code point or an escape class. */
static int rx_class_atom(rx_st *r, uint32_t *cp, cp_set *set, bool *is_set)
{
    *is_set = false;
    if (r->i >= r->n)
        return rx_fail(r, "an unterminated character class");
    uint32_t ch = r->cp[r->i++];
    if (ch == '\\')
        return rx_escape(r, cp, set, is_set);
    if (ch == '[')
        return rx_fail(r, "a nested class or [:name:]");
    if ((ch == '&' || ch == '~' || ch == '-') && rx_at(r, ch) && r->i + 1 < r->n && r->cp[r->i + 1] != ']')
        return rx_fail(r, "class set operations");
    *cp = ch;
    return 0;
}

static int rx_class(rx_st *r, cp_set *s)
{
    bool neg = rx_at(r, '^');
    if (neg)
        r->i++;
    bool first = true;
    while (r->i < r->n && (first || r->cp[r->i] != ']')) {
        uint32_t lo, hi;
        bool is_set;
        int rc = first && rx_at(r, ']') ? (r->i++, lo = ']', is_set = false, 0) : rx_class_atom(r, &lo, s, &is_set);
        first = false;
        if (rc)
            return rc;
        if (is_set)
            continue;
        hi = lo;
        if (rx_at(r, '-') && r->i + 1 < r->n && r->cp[r->i + 1] != ']') {
            r->i++;
            rc = rx_class_atom(r, &hi, s, &is_set);
            if (rc)
                return rc;
            if (is_set || hi < lo)
                return rx_fail(r, "a malformed class range");
        }
        cps_add(s, lo, hi);
    }
    if (!rx_at(r, ']'))
        return rx_fail(r, "an unterminated character class");
    r->i++;
    cps_norm(s);
    if (neg)
        cps_negate(s);
    return s->err ? gs_fail(r->c, s->err, "", "out of memory while building the grammar") : 0;
}

/* {m}, {m,}, {m,n} after the '{'. */
static int rx_count(rx_st *r, long *m, long *n)
{
    long *dst = m;
    *m = 0;
    *n = -2; /* -2: no comma seen ({m}); -1: no upper bound */
    bool digits = false;
    for (; r->i < r->n && r->cp[r->i] != '}'; r->i++) {
        uint32_t ch = r->cp[r->i];
        if (ch == ',' && dst == m) {
            dst = n;
            *n = -1;
            continue;
        }
        if (ch < '0' || ch > '9')
            return rx_fail(r, "a malformed {m,n} repetition");
        *dst = (*dst < 0 ? 0 : *dst) * 10 + (long)(ch - '0');
        digits |= dst == m;
        if (*dst > GS_MAX_REPEAT)
            return gs_fail(r->c, HY_ELIMIT, "pattern", "pattern: repetition counts above %d are not supported", GS_MAX_REPEAT);
    }
    if (!rx_at(r, '}') || !digits)
        return rx_fail(r, "a malformed {m,n} repetition");
    r->i++;
    if (*n == -2)
        *n = *m;
    if (*n >= 0 && *n < *m)
        return rx_fail(r, "a {m,n} repetition with n < m");
    return 0;
}

/* An optional quantifier after an atom, appended to out. */
static int rx_quant(rx_st *r, gs_buf *out)
{
    if (r->i >= r->n)
        return 0;
    uint32_t ch = r->cp[r->i];
    if (ch == '*' || ch == '+' || ch == '?') {
        r->i++;
        buf_printf(out, "%c", (char)ch);
    } else if (ch == '{') {
        long m, n;
        r->i++;
        int rc = rx_count(r, &m, &n);
        if (rc)
            return rc;
        if (n == m)
            buf_printf(out, "{%ld}", m);
        else if (n < 0)
            buf_printf(out, "{%ld,}", m);
        else
            buf_printf(out, "{%ld,%ld}", m, n);
    } else {
        return 0;
    }
    if (rx_at(r, '?')) /* lazy: same language */
        r->i++;
    if (rx_at(r, '+') || rx_at(r, '*') || rx_at(r, '{'))
        return rx_fail(r, "a repeated quantifier");
    return 0;
}

static bool rx_quant_next(const rx_st *r)
{
    return rx_at(r, '*') || rx_at(r, '+') || rx_at(r, '?') || rx_at(r, '{');
}

static int rx_group(rx_st *r, gs_buf *out)
{
    if (rx_at(r, '?')) {
        r->i++;
        if (rx_at(r, ':')) {
            r->i++;
        } else if (rx_at(r, 'P') || rx_at(r, '<')) {
            r->i += rx_at(r, 'P');
            if (!rx_at(r, '<') || (r->i + 1 < r->n && (r->cp[r->i + 1] == '=' || r->cp[r->i + 1] == '!')))
                return rx_fail(r, "lookaround");
            while (r->i < r->n && r->cp[r->i] != '>')
                r->i++;
            if (!rx_at(r, '>'))
                return rx_fail(r, "an unterminated group name");
            r->i++;
        } else {
            return rx_fail(r, "flags or lookaround '(?'");
        }
    }
    buf_puts(out, "( ");
    int rc = rx_alt(r, out, false);
    if (rc)
        return rc;
    if (!rx_at(r, ')'))
        return rx_fail(r, "an unclosed group");
    r->i++;
    buf_puts(out, " )");
    return 0;
}

/* One atom: a literal code point (*lit, returned as 1) or an element appended to out (0). */
static int rx_atom(rx_st *r, gs_buf *out, uint32_t *lit, bool *is_lit)
{
    uint32_t ch = r->cp[r->i++];
    cp_set s = {0};
    bool is_set = false, nothing = false;
    int rc = 0;
    *is_lit = false;
    if (ch == '(')
        return rx_group(r, out);
    if (ch == '^' || ch == '$')
        return r->i--, rx_fail(r, "an anchor inside the pattern (only at the ends)");
    if (ch == ')' || ch == '*' || ch == '+' || ch == '?' || ch == '{')
        return r->i--, rx_fail(r, "a misplaced metacharacter");
    if (ch == '[') {
        rc = rx_class(r, &s);
        is_set = true;
    } else if (ch == '.') {
        cps_add(&s, 0, '\n' - 1);
        cps_add(&s, '\n' + 1, GS_MAX_CP);
        is_set = true;
    } else if (ch == '\\') {
        rc = rx_escape(r, &ch, &s, &is_set);
        if (!is_set)
            cps_norm(&s);
    }
    if (!rc && s.err)
        rc = oom(r->c);
    if (!rc && !is_set) {
        *lit = ch;
        *is_lit = true;
    } else if (!rc) {
        put_charset(r->c, out, &s, &nothing);
        if (nothing)
            rc = rx_fail(r, "a class that matches nothing");
    }
    cps_free(&s, out);
    return rc;
}

static void rx_flush(rx_st *r, gs_buf *out, gs_buf *run, bool *first)
{
    if (!run->n)
        return;
    put_string_body(r->c, out, run->p, run->n, false, first);
    buf_truncate(run, 0);
}

/* A sequence up to '|' or ')' (or the end). */
static int rx_seq(rx_st *r, gs_buf *out, bool *empty)
{
    gs_buf run = {0};
    bool first = true;
    int rc = 0;
    while (!rc && r->i < r->n && !rx_at(r, '|') && !rx_at(r, ')')) {
        if ((rx_at(r, '$') && (r->i + 1 == r->n || r->cp[r->i + 1] == '|' || r->cp[r->i + 1] == ')')))
            break;
        uint32_t lit;
        bool is_lit;
        gs_buf atom = {0};
        rc = rx_atom(r, &atom, &lit, &is_lit);
        if (!rc && is_lit && !rx_quant_next(r)) {
            buf_utf8(&run, lit); /* plain text joins the pending literal */
        } else if (!rc) {
            rx_flush(r, out, &run, &first);
            if (is_lit)
                put_char_cp(r->c, &atom, lit);
            buf_puts(out, first ? "" : " ");
            first = false;
            bool single = atom.n && (atom.p[0] != '"' || is_lit) && !strchr(atom.p, ' ');
            if (!single && atom.p[0] != '(')
                buf_printf(out, "( %s )", buf_str(&atom));
            else
                buf_puts(out, buf_str(&atom));
            rc = rx_quant(r, out);
        }
        buf_free(&atom);
    }
    rx_flush(r, out, &run, &first);
    buf_free(&run);
    *empty = first;
    return rc;
}

/* Alternatives; at the top level each may start with ^ and end with $, and a side without its
 * anchor may have anything before / after (a search, as JSON Schema means `pattern`). */
static int rx_alt(rx_st *r, gs_buf *out, bool top)
{
    for (int k = 0;; k++) {
        bool start = top && rx_at(r, '^'), empty;
        r->i += start;
        gs_buf seq = {0};
        int rc = rx_seq(r, &seq, &empty);
        bool end = top && rx_at(r, '$');
        r->i += end;
        if (!rc && top && !(r->i >= r->n || rx_at(r, '|')))
            rc = rx_fail(r, rx_at(r, ')') ? "an unbalanced ')'" : "an anchor inside the pattern (only at the ends)");
        if (!rc && !top && (rx_at(r, '^') || rx_at(r, '$')))
            rc = rx_fail(r, "an anchor inside a group");
        if (rc) {
            buf_free(&seq);
            return rc;
        }
        buf_puts(out, k ? " | " : "");
        if (top && !start)
            buf_printf(out, "%s* ", pname(r->c, P_CHAR));
        buf_puts(out, empty ? "\"\"" : buf_str(&seq));
        if (top && !end)
            buf_printf(out, " %s*", pname(r->c, P_CHAR));
        buf_free(&seq);
        if (!rx_at(r, '|'))
            return 0;
        r->i++;
    }
}

static int gen_pattern(gs_ctx *c, const char *pat, gs_buf *out)
{
    size_t len = strlen(pat), i = 0;
    rx_st r = {.c = c, .cp = malloc(sizeof(uint32_t) * (len + 1))};
    if (!r.cp)
        return oom(c);
    while (i < len) {
        int64_t cp = utf8_next(pat, len, &i);
        if (cp < 0) {
            free(r.cp);
            return gs_fail(c, HY_EINVAL, "", "'pattern' is not valid UTF-8");
        }
        r.cp[r.n++] = (uint32_t)cp;
    }
    gs_buf body = {0};
    int rc = rx_alt(&r, &body, true);
    if (!rc)
        buf_printf(out, "\"\\\"\" ( %s ) \"\\\"\"", buf_str(&body));
    buf_free(&body);
    free(r.cp);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Strings. */

static int gen_format(gs_ctx *c, const json_t *f, gs_buf *out)
{
    static const struct { const char *name; int prim; } formats[] = {
        {"date", P_DATE}, {"time", P_TIME}, {"date-time", P_DATETIME}, {"uuid", P_UUID},
        {"email", P_EMAIL}, {"ipv4", P_IPV4}, {"hostname", P_HOSTNAME},
    };
    if (!json_is_string(f))
        return gs_fail(c, HY_EINVAL, "", "'format' must be a string");
    for (size_t i = 0; i < HY_ARRAY_LEN(formats); i++)
        if (!strcmp(json_string_value(f), formats[i].name)) {
            buf_printf(out, "\"\\\"\" %s \"\\\"\"", pname(c, formats[i].prim));
            return 0;
        }
    return gs_fail(c, HY_EINVAL, "format", "JSON Schema format '%s' is not supported", json_string_value(f));
}

static int gen_string(gs_ctx *c, const json_t *s, gs_buf *out)
{
    const json_t *pat = json_object_get(s, "pattern"), *fmt = json_object_get(s, "format");
    long long lo, hi;
    int rc = get_count(c, s, "minLength", 0, &lo);
    if (!rc)
        rc = get_count(c, s, "maxLength", -1, &hi);
    if (rc)
        return rc;
    /* llguidance intersects these; a grammar cannot intersect, so the combinations are refused */
    const char *len_kw = json_object_get(s, "minLength") ? "minLength" : json_object_get(s, "maxLength") ? "maxLength" : NULL;
    if ((pat || fmt) && len_kw)
        return gs_fail(c, HY_EINVAL, len_kw, "JSON Schema keyword '%s' together with '%s' is not supported",
                       len_kw, pat ? "pattern" : "format");
    if (pat && fmt)
        return gs_fail(c, HY_EINVAL, "pattern", "JSON Schema keyword 'pattern' together with 'format' is not supported");
    if (pat) {
        if (!json_is_string(pat))
            return gs_fail(c, HY_EINVAL, "", "'pattern' must be a string");
        return gen_pattern(c, json_string_value(pat), out);
    }
    if (fmt)
        return gen_format(c, fmt, out);
    if (hi >= 0 && lo > hi)
        return gs_fail(c, HY_EINVAL, "", "minLength is greater than maxLength");
    if (!lo && hi < 0) {
        put_prim(c, out, P_STRING);
        return 0;
    }
    if (hi == 0) {
        buf_puts(out, "\"\\\"\\\"\"");
        return 0;
    }
    buf_printf(out, "\"\\\"\" %s", pname(c, P_CHAR));
    if (hi < 0)
        buf_printf(out, "{%lld,}", lo);
    else if (hi == lo)
        buf_printf(out, "{%lld}", lo);
    else
        buf_printf(out, "{%lld,%lld}", lo, hi);
    buf_puts(out, " \"\\\"\"");
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Objects. */

static int gen(gs_ctx *c, const json_t *s, gs_buf *out);

/* Additional-property keys: any key text but the declared ones (sorted, canonical, with their
 * quotes). One rule per trie node; a key that leaves the trie is free from there on. The states
 * track where the text is inside an escape: 0 plain, 1 after '\', 2..5 after "\u" and 0..3 hex
 * digits (declared keys only ever hold \u00XX). */

typedef struct {
    char **keys;  /* canonical text without the quotes */
    size_t n;
} gs_keys;

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static const char *key_tail(gs_ctx *c, int state, gs_buf *b)
{
    static const char *const hex_rest[] = {"", "", "", "[0-9a-fA-F]{3} ", "[0-9a-fA-F]{2} ", "[0-9a-fA-F] "};
    if (state == 1)
        buf_printf(b, "%s ", pname(c, P_KESC));
    else if (state >= 3)
        buf_puts(b, hex_rest[state]);
    buf_printf(b, "%s* \"\\\"\"", pname(c, P_KCHAR));
    return buf_str(b);
}

/* The characters other than the children (kids) that may follow in `state`, each with the rest
 * of a key after it. Starts with " | ". */
static void key_others(gs_ctx *c, int state, const cp_set *kids, gs_buf *b)
{
    cp_set s = {0}, minus = {0}, keep = {0};
    gs_buf tail = {0};
    if (state == 0) {
        raw_set(&s);
    } else if (state == 1) {
        for (const char *p = "\"\\bfnrt"; *p; p++)
            cps_add(&s, (unsigned char)*p, (unsigned char)*p);
    } else {
        cps_add(&s, '0', '9');
        cps_add(&s, 'a', 'f');
        cps_add(&s, 'A', 'F');
    }
    cps_norm(&s);
    for (int i = 0; i < kids->n; i++)
        cps_add(&minus, kids->r[i].lo, kids->r[i].hi);
    if (state == 2) { /* a first hex digit d/D may start a surrogate pair: spelled out below */
        cps_add(&minus, 'd', 'd');
        cps_add(&minus, 'D', 'D');
    }
    cps_norm(&minus);
    cps_negate(&minus);
    cps_intersect(&s, &minus, &keep);
    if (keep.n) {
        int next = state <= 1 || state == 5 ? 0 : state + 1;
        buf_puts(b, " | [");
        put_class_ranges(b, &keep);
        buf_printf(b, "] %s", key_tail(c, next, &tail));
    }
    if (state == 0 && !cps_has(kids, '\\')) {
        buf_truncate(&tail, 0);
        buf_printf(b, " | \"\\\\\" %s", key_tail(c, 1, &tail));
    }
    if (state == 1 && !cps_has(kids, 'u'))
        buf_printf(b, " | \"u\" %s %s* \"\\\"\"", pname(c, P_KESCU), pname(c, P_KCHAR));
    if (state == 2 && !cps_has(kids, 'd') && !cps_has(kids, 'D'))
        buf_printf(b, " | [dD] ( [0-7] [0-9a-fA-F]{2} | [89abAB] [0-9a-fA-F]{2} \"\\\\u\" [dD] [c-fC-F]"
                      " [0-9a-fA-F]{2} ) %s* \"\\\"\"", pname(c, P_KCHAR));
    buf_free(&tail);
    cps_free(&s, b);
    cps_free(&minus, b);
    cps_free(&keep, b);
}

static int key_state_after(int state, uint32_t ch)
{
    if (state == 0)
        return ch == '\\' ? 1 : 0;
    if (state == 1)
        return ch == 'u' ? 2 : 0;
    return state == 5 ? 0 : state + 1;
}

/* The keys[lo..hi) that share bytes [depth, *at) with keys[lo] (its next character). */
static size_t key_group(const gs_keys *k, size_t lo, size_t hi, size_t depth, size_t at)
{
    size_t j = lo;
    while (j < hi && strlen(k->keys[j]) >= at && !memcmp(k->keys[j] + depth, k->keys[lo] + depth, at - depth))
        j++;
    return j;
}

/* Rule for keys[lo..hi) sharing their first `depth` bytes, in `state`: the end of the key (unless
 * one of them ends here), each next character with its subtree, any other character. */
static int key_node(gs_ctx *c, gs_keys *k, size_t lo, size_t hi, size_t depth, int state, int *rule)
{
    int rc = rule_new(c, buf_str(&c->stem), rule);
    gs_buf b = {0}, o = {0};
    cp_set kids = {0};
    bool alt = false;
    if (!depth) /* the root holds the opening quote: the key is one lexeme */
        buf_puts(&b, "\"\\\"\" ( ");
    if (state == 0 && strlen(k->keys[lo]) != depth) {
        buf_puts(&b, "\"\\\"\"");
        alt = true;
    }
    for (size_t i = lo; i < hi && !rc;) {
        const char *key = k->keys[i];
        size_t len = strlen(key), at = depth;
        if (len == depth) {
            i++;
            continue;
        }
        int64_t cp = utf8_next(key, len, &at);
        if (cp < 0) {
            rc = gs_fail(c, HY_EINVAL, "", "a property name is not UTF-8");
            break;
        }
        size_t j = key_group(k, i, hi, depth, at);
        int child;
        cps_add(&kids, (uint32_t)cp, (uint32_t)cp);
        rc = key_node(c, k, i, j, at, key_state_after(state, (uint32_t)cp), &child);
        if (!rc) {
            buf_puts(&b, alt ? " | " : "");
            put_lit(&b, key + depth, at - depth);
            buf_printf(&b, " %s", c->rules[child].name);
            alt = true;
        }
        i = j;
    }
    if (!rc) {
        cps_norm(&kids);
        key_others(c, state, &kids, &o);
        if (o.n)
            buf_puts(&b, alt ? o.p : o.p + 3);
        if (!depth)
            buf_puts(&b, " )");
        if (o.err && !b.err)
            b.err = o.err;
        cps_free(&kids, &b);
        rc = rule_define(c, *rule, &b);
    }
    cps_free(&kids, NULL);
    buf_free(&o);
    buf_free(&b);
    return rc;
}

/* The additional-property key: a quote, then the trie of declared keys. */
static int gen_extra_key(gs_ctx *c, gs_keys *k, gs_buf *out)
{
    qsort(k->keys, k->n, sizeof *k->keys, cmp_str);
    gs_mark m = gs_save(c);
    push_stem(c, "key");
    int rule;
    int rc = key_node(c, k, 0, k->n, 0, 0, &rule);
    gs_restore(c, m);
    if (!rc)
        buf_puts(out, c->rules[rule].name);
    return rc;
}

typedef struct {
    char *atom; /* the kv rule name */
    bool req;
} obj_item;

typedef struct {
    obj_item *it;
    size_t n;
    char *extra; /* additional key/value rule, or NULL */
    gs_keys taken;
} obj_parts;

static void obj_parts_free(obj_parts *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->it[i].atom);
    free(p->it);
    free(p->extra);
    for (size_t i = 0; i < p->taken.n; i++)
        free(p->taken.keys[i]);
    free(p->taken.keys);
}

static int take_name(gs_ctx *c, obj_parts *p, const char *k)
{
    gs_buf canon = {0};
    canon_key(k, strlen(k), &canon);
    char **keys = realloc(p->taken.keys, sizeof *keys * (p->taken.n + 1));
    if (canon.err || !keys) {
        if (keys)
            p->taken.keys = keys;
        buf_free(&canon);
        return oom(c);
    }
    p->taken.keys = keys;
    canon.p[canon.n - 1] = '\0'; /* drop the closing quote; the opening one goes below */
    memmove(canon.p, canon.p + 1, canon.n - 1);
    keys[p->taken.n++] = canon.p;
    return 0;
}

/* A `"key" : value` rule for one property: "<stem>-kv", the value's own rule "<stem>". */
static int gen_kv(gs_ctx *c, const char *k, const json_t *schema, bool req, obj_parts *p)
{
    gs_buf canon = {0}, body = {0}, val = {0};
    size_t at = c->stem.n;
    push_stem(c, "kv");
    int rule, rc = rule_new(c, buf_str(&c->stem), &rule);
    buf_truncate(&c->stem, at);
    if (!rc)
        rc = gen(c, schema, &val);
    if (!rc) {
        canon_key(k, strlen(k), &canon);
        put_lit(&body, canon.p, canon.n);
        buf_puts(&body, " ");
        put_sep(c, &body, ":");
        buf_printf(&body, " %s", buf_str(&val));
        rc = rule_define(c, rule, &body);
    }
    if (!rc) {
        obj_item *it = realloc(p->it, sizeof *it * (p->n + 1));
        char *atom = strdup(c->rules[rule].name);
        if (it)
            p->it = it;
        if (!it || !atom) {
            free(atom);
            rc = oom(c);
        } else {
            it[p->n++] = (obj_item){atom, req};
        }
    }
    buf_free(&canon);
    buf_free(&body);
    buf_free(&val);
    return rc;
}

/* Whether required[i] already appeared before index i. */
static bool in_required_before(const json_t *req, size_t i)
{
    const char *k = json_string_value(json_array_get(req, i));
    for (size_t j = 0; j < i; j++)
        if (json_equal(json_array_get(req, j), json_array_get(req, i)) && k)
            return true;
    return false;
}

static bool in_required(const json_t *req, const char *k)
{
    size_t i;
    json_t *v;
    json_array_foreach(req, i, v) {
        if (json_is_string(v) && !strcmp(json_string_value(v), k))
            return true;
    }
    return false;
}

/* One declared property (schema `false`: only its name is taken). */
static int gen_prop(gs_ctx *c, const char *k, const json_t *schema, bool req, bool declared, obj_parts *p)
{
    gs_mark m = gs_save(c);
    if (declared) {
        push_path(c, "properties");
        push_path(c, k);
    }
    push_stem(c, k);
    int rc = take_name(c, p, k);
    if (!rc && json_is_false(schema) && req)
        rc = gs_fail(c, HY_EINVAL, "", "required property '%s' can have no value", k);
    if (!rc && !json_is_false(schema))
        rc = gen_kv(c, k, schema, req, p);
    gs_restore(c, m);
    return rc;
}

static int gen_extra(gs_ctx *c, const json_t *addl, obj_parts *p)
{
    gs_mark m = gs_save(c);
    gs_buf key = {0}, val = {0}, body = {0};
    push_path(c, "additionalProperties");
    push_stem(c, "extra");
    int rule, rc = rule_new(c, buf_str(&c->stem), &rule);
    if (!rc)
        rc = p->taken.n ? gen_extra_key(c, &p->taken, &key) : (put_prim(c, &key, P_STRING), 0);
    if (!rc) {
        size_t at = c->stem.n;
        push_stem(c, "value");
        rc = gen(c, addl, &val);
        buf_truncate(&c->stem, at);
    }
    if (!rc) {
        buf_printf(&body, "%s ", buf_str(&key));
        put_sep(c, &body, ":");
        buf_printf(&body, " %s", buf_str(&val));
        rc = rule_define(c, rule, &body);
    }
    if (!rc && !(p->extra = strdup(c->rules[rule].name)))
        rc = oom(c);
    buf_free(&key);
    buf_free(&val);
    buf_free(&body);
    gs_restore(c, m);
    return rc;
}

/* Items from i on, after something was written: required ones as `, kv`, optional ones as
 * `(, kv)?`, then `(, extra)*`. */
static void put_rest(gs_ctx *c, const obj_parts *p, size_t i, gs_buf *b)
{
    for (; i < p->n; i++) {
        buf_puts(b, p->it[i].req ? " " : " ( ");
        put_sep(c, b, ",");
        buf_printf(b, " %s%s", p->it[i].atom, p->it[i].req ? "" : " )?");
    }
    if (p->extra) {
        buf_puts(b, " ( ");
        put_sep(c, b, ",");
        buf_printf(b, " %s )*", p->extra);
    }
}

/* The braces around: the first item written may be any optional one before the first required
 * one (or the first extra), each followed by what may come after it. */
static void put_object(gs_ctx *c, const obj_parts *p, gs_buf *b)
{
    size_t k = 0;
    while (k < p->n && !p->it[k].req)
        k++;
    bool can_be_empty = k == p->n;
    put_open(c, b, "{");
    buf_puts(b, can_be_empty ? " ( ( " : " ( ");
    for (size_t i = 0; i <= k && i < p->n; i++) {
        buf_printf(b, "%s%s", i ? " | " : "", p->it[i].atom);
        put_rest(c, p, i + 1, b);
    }
    if (can_be_empty && p->extra) {
        buf_printf(b, "%s%s ( ", p->n ? " | " : "", p->extra);
        put_sep(c, b, ",");
        buf_printf(b, " %s )*", p->extra);
    }
    buf_puts(b, " )");
    if (c->ws)
        buf_printf(b, " %s", pname(c, P_WS));
    buf_puts(b, can_be_empty ? " )? \"}\"" : " \"}\"");
}

static int gen_object(gs_ctx *c, const json_t *s, gs_buf *out)
{
    const json_t *props = json_object_get(s, "properties"), *req = json_object_get(s, "required");
    const json_t *addl = json_object_get(s, "additionalProperties");
    if (props && !json_is_object(props))
        return gs_fail(c, HY_EINVAL, "", "'properties' must be an object");
    if (req && !json_is_array(req))
        return gs_fail(c, HY_EINVAL, "", "'required' must be an array of strings");
    if (addl && !json_is_boolean(addl) && !json_is_object(addl))
        return gs_fail(c, HY_EINVAL, "", "'additionalProperties' must be a schema");
    addl = addl ? addl : json_true();
    obj_parts p = {0};
    int rc = 0;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)props, k, v) {
        if (!rc)
            rc = gen_prop(c, k, v, in_required(req, k), true, &p);
    }
    size_t i;
    json_array_foreach(req, i, v) { /* required names not in properties: additionalProperties' values */
        if (rc)
            break;
        if (!json_is_string(v))
            rc = gs_fail(c, HY_EINVAL, "", "'required' must be an array of strings");
        else if (!json_object_get(props, json_string_value(v)) && !in_required_before(req, i))
            rc = gen_prop(c, json_string_value(v), addl, true, false, &p);
    }
    if (!rc && !json_is_false(addl))
        rc = gen_extra(c, addl, &p);
    if (!rc && !p.n && json_is_true(addl))
        put_prim(c, out, P_OBJECT);
    else if (!rc)
        put_object(c, &p, out);
    obj_parts_free(&p);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Arrays: prefixItems (or a draft-4 `items` array) position by position, then `items`, within
 * minItems / maxItems. */

typedef struct {
    char **slot;   /* atoms of the prefix positions in use */
    size_t k;      /* how many */
    char *item;    /* atom of the other positions, NULL when none may exist */
    long long min, max; /* max -1: unbounded */
} arr_parts;

static void arr_parts_free(arr_parts *a)
{
    for (size_t i = 0; i < a->k; i++)
        free(a->slot[i]);
    free(a->slot);
    free(a->item);
}

/* `{lo,hi}` for a repetition (hi -1: unbounded); "" for exactly one. */
static void put_rep(gs_buf *b, long long lo, long long hi)
{
    if (lo == 0 && hi < 0)
        buf_puts(b, "*");
    else if (lo == 1 && hi < 0)
        buf_puts(b, "+");
    else if (lo == 0 && hi == 1)
        buf_puts(b, "?");
    else if (hi < 0)
        buf_printf(b, "{%lld,}", lo);
    else if (lo == hi && lo != 1)
        buf_printf(b, "{%lld}", lo);
    else if (lo != hi)
        buf_printf(b, "{%lld,%lld}", lo, hi);
}

/* `( , item ){lo,hi}`. */
static void put_more_items(gs_ctx *c, const arr_parts *a, long long lo, long long hi, gs_buf *b)
{
    if (hi == 0)
        return;
    buf_puts(b, " ( ");
    put_sep(c, b, ",");
    buf_printf(b, " %s )", a->item);
    put_rep(b, lo, hi);
}

/* Optional positions from j on, nested so each needs the one before; `before`: something was
 * written (so a separator leads); `wrap`: the group itself is optional. */
static void put_opt_chain(gs_ctx *c, const arr_parts *a, size_t j, bool before, bool wrap, gs_buf *b)
{
    if (j < a->k) {
        buf_puts(b, wrap ? " ( " : " ");
        if (before) {
            put_sep(c, b, ",");
            buf_puts(b, " ");
        }
        buf_puts(b, a->slot[j]);
        put_opt_chain(c, a, j + 1, true, true, b);
        buf_puts(b, wrap ? " )?" : "");
        return;
    }
    long long used = HY_MAX(a->min, (long long)a->k);
    long long t = !a->item ? 0 : a->max < 0 ? -1 : a->max - used; /* tail items allowed */
    if (t == 0)
        return;
    if (before) {
        put_more_items(c, a, 0, t, b);
        return;
    }
    buf_printf(b, wrap ? " ( %s" : " %s", a->item);
    put_more_items(c, a, 0, t < 0 ? -1 : t - 1, b);
    buf_puts(b, wrap ? " )?" : "");
}

static void put_array(gs_ctx *c, const arr_parts *a, gs_buf *b)
{
    put_open(c, b, "[");
    if (a->max == 0 || (!a->k && !a->item)) {
        buf_puts(b, " ");
        put_close(c, b, "]");
        return;
    }
    if (a->min == 0) {
        buf_puts(b, " (");
        put_opt_chain(c, a, 0, false, false, b);
        buf_printf(b, " %s)? \"]\"", c->ws ? pname(c, P_WS) : "");
        return;
    }
    for (size_t i = 0; i < (size_t)a->min && i < a->k; i++) {
        buf_puts(b, " ");
        if (i) {
            put_sep(c, b, ",");
            buf_puts(b, " ");
        }
        buf_puts(b, a->slot[i]);
    }
    if (a->min > (long long)a->k) {
        long long r = a->min - (long long)a->k;
        if (!a->k) {
            buf_printf(b, " %s", a->item);
            r--;
        }
        put_more_items(c, a, r, r, b);
    }
    put_opt_chain(c, a, (size_t)a->min, true, true, b);
    buf_puts(b, " ");
    put_close(c, b, "]");
}

static int arr_limits(gs_ctx *c, const json_t *s, const json_t *prefix, const json_t *items, arr_parts *a)
{
    int rc = get_count(c, s, "minItems", 0, &a->min);
    if (!rc)
        rc = get_count(c, s, "maxItems", -1, &a->max);
    if (rc)
        return rc;
    size_t k = json_array_size(prefix);
    for (size_t i = 0; i < k; i++) /* a `false` position ends the array there (llguidance) */
        if (json_is_false(json_array_get(prefix, i))) {
            if ((long long)i < a->min)
                return gs_fail(c, HY_EINVAL, "", "prefixItems[%zu] is false but minItems is %lld", i, a->min);
            if (a->max < 0 || a->max > (long long)i)
                a->max = (long long)i;
        }
    if (json_is_false(items)) {
        if (a->min > (long long)k)
            return gs_fail(c, HY_EINVAL, "", "minItems is %lld but only %zu items are allowed", a->min, k);
        if (a->max < 0 || a->max > (long long)k)
            a->max = (long long)k;
    }
    if (a->max >= 0 && a->min > a->max)
        return gs_fail(c, HY_EINVAL, "", "minItems is greater than maxItems");
    return 0;
}

static int arr_slots(gs_ctx *c, const json_t *prefix, const char *via, const json_t *items, arr_parts *a)
{
    size_t k = json_array_size(prefix);
    if (a->max >= 0 && (long long)k > a->max)
        k = (size_t)a->max;
    a->slot = calloc(k ? k : 1, sizeof *a->slot);
    if (!a->slot)
        return oom(c);
    for (size_t i = 0; i < k; i++) {
        gs_buf atom = {0};
        gs_mark m = gs_save(c);
        push_index(c, via, i, "item-");
        int rc = gen(c, json_array_get(prefix, i), &atom);
        gs_restore(c, m);
        if (!rc && !(a->slot[a->k++] = strdup(buf_str(&atom))))
            rc = oom(c);
        buf_free(&atom);
        if (rc)
            return rc;
    }
    bool more = a->max < 0 || a->max > (long long)k || a->min > (long long)k;
    if (!more || json_is_false(items))
        return 0;
    gs_buf atom = {0};
    gs_mark m = gs_save(c);
    push_path(c, "items");
    push_stem(c, "item");
    int rc = gen(c, items, &atom);
    gs_restore(c, m);
    if (!rc && !(a->item = strdup(buf_str(&atom))))
        rc = oom(c);
    buf_free(&atom);
    return rc;
}

static int gen_array(gs_ctx *c, const json_t *s, gs_buf *out)
{
    const json_t *items = json_object_get(s, "items"), *prefix = json_object_get(s, "prefixItems");
    const char *via = "prefixItems";
    if (json_is_array(items)) { /* draft 4 tuples: the positions, then anything (as llguidance) */
        if (prefix)
            return gs_fail(c, HY_EINVAL, "", "'items' as an array together with 'prefixItems'");
        prefix = items;
        items = NULL;
        via = "items";
    }
    if (prefix && !json_is_array(prefix))
        return gs_fail(c, HY_EINVAL, "", "'prefixItems' must be an array of schemas");
    if (items && !json_is_boolean(items) && !json_is_object(items))
        return gs_fail(c, HY_EINVAL, "", "'items' must be a schema");
    items = items ? items : json_true();
    arr_parts a = {0};
    int rc = arr_limits(c, s, prefix, items, &a);
    if (!rc)
        rc = arr_slots(c, prefix, via, items, &a);
    if (!rc && !a.k && a.min == 0 && a.max < 0 && json_is_true(items))
        put_prim(c, out, P_ARRAY);
    else if (!rc)
        put_array(c, &a, out);
    arr_parts_free(&a);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Dispatch. */

static const char *const obj_kws[] = {"properties", "required", "additionalProperties"};
static const char *const arr_kws[] = {"items", "prefixItems", "minItems", "maxItems"};
static const char *const str_kws[] = {"minLength", "maxLength", "pattern", "format"};
static const char *const num_kws[] = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"};

static int gen_number(gs_ctx *c, const json_t *s, gs_buf *out)
{
    for (size_t i = 0; i < HY_ARRAY_LEN(num_kws); i++)
        if (json_object_get(s, num_kws[i]))
            return gs_fail(c, HY_EINVAL, num_kws[i],
                           "JSON Schema keyword '%s' is not supported for type number (only for integer)",
                           num_kws[i]);
    put_prim(c, out, P_NUMBER);
    return 0;
}

static int gen_one_type(gs_ctx *c, const json_t *s, int t, gs_buf *out)
{
    switch (t) {
    case T_OBJECT: return has_any(s, obj_kws, 3) ? gen_object(c, s, out) : (put_prim(c, out, P_OBJECT), 0);
    case T_ARRAY: return has_any(s, arr_kws, 4) ? gen_array(c, s, out) : (put_prim(c, out, P_ARRAY), 0);
    case T_STRING: return gen_string(c, s, out);
    case T_NUMBER: return gen_number(c, s, out);
    case T_INTEGER: return gen_integer(c, s, out);
    case T_BOOLEAN: put_prim(c, out, P_BOOLEAN); return 0;
    default: put_prim(c, out, P_NULL); return 0;
    }
}

/* `type` (absent: every type) with the keywords of each. */
static int gen_typed(gs_ctx *c, const json_t *s, gs_buf *out)
{
    int types, rc = schema_types(c, s, &types);
    if (rc)
        return rc;
    if (!types)
        return gs_fail(c, HY_EINVAL, "", "'type' is an empty list: no value matches");
    if (types & T_NUMBER)
        types &= ~T_INTEGER;
    bool typed_kw = has_any(s, obj_kws, 3) || has_any(s, arr_kws, 4) || has_any(s, str_kws, 4) ||
                    has_any(s, num_kws, 4);
    if (types == (T_ALL & ~T_INTEGER) && !typed_kw) {
        put_prim(c, out, P_VALUE);
        return 0;
    }
    int n = 0;
    for (int t = 1; t <= T_NULL && !rc; t <<= 1) {
        if (!(types & t))
            continue;
        buf_puts(out, n++ ? " | " : "");
        rc = gen_one_type(c, s, t, out);
    }
    return rc;
}

static int gen_expr(gs_ctx *c, const json_t *s, gs_buf *out);

/* oneOf: exactly one branch may match. A grammar cannot count matches, so a oneOf is compiled as
 * anyOf only when no two branches can match one value: their types exclude each other, or they are
 * objects that require one property with different constant values (a tagged union: pydantic's
 * discriminated unions). Anything else is refused rather than loosened. */
static const json_t *follow_ref(gs_ctx *c, const json_t *s)
{
    for (int i = 0; i < 32 && json_is_object(s); i++) {
        const json_t *r = json_object_get(s, "$ref"), *t = NULL;
        if (!json_is_string(r) || ref_resolve(c, json_string_value(r), &t))
            break;
        s = t;
    }
    return s;
}

static int branch_types(gs_ctx *c, const json_t *s)
{
    const json_t *k = json_object_get(s, "const"), *e = json_object_get(s, "enum"), *v;
    int t = T_ALL;
    size_t i;
    if (k) {
        t = value_type(k);
    } else if (json_is_array(e)) {
        t = 0;
        json_array_foreach(e, i, v)
            t |= value_type(v);
    } else if (schema_types(c, s, &t)) {
        t = T_ALL;
    }
    return t & T_NUMBER ? t | T_INTEGER : t;
}

/* The constant a branch's property `name` must hold when required, or NULL. */
static const json_t *tag_of(gs_ctx *c, const json_t *s, const char *name)
{
    const json_t *req = json_object_get(s, "required"), *v;
    bool required = false;
    size_t i;
    json_array_foreach(req, i, v)
        required |= json_is_string(v) && !strcmp(json_string_value(v), name);
    const json_t *p = required ? follow_ref(c, json_object_get(json_object_get(s, "properties"), name)) : NULL;
    if (!json_is_object(p))
        return NULL;
    const json_t *k = json_object_get(p, "const"), *e = json_object_get(p, "enum");
    return k ? k : json_is_array(e) && json_array_size(e) == 1 ? json_array_get(e, 0) : NULL;
}

static bool branches_exclusive(gs_ctx *c, const json_t *a, const json_t *b)
{
    a = follow_ref(c, a);
    b = follow_ref(c, b);
    if (!json_is_object(a) || !json_is_object(b))
        return false;
    if (!(branch_types(c, a) & branch_types(c, b)))
        return true;
    const char *name;
    json_t *sub;
    json_object_foreach((json_t *)json_object_get(a, "properties"), name, sub) {
        const json_t *ta = tag_of(c, a, name), *tb = ta ? tag_of(c, b, name) : NULL;
        if (ta && tb && !json_equal((json_t *)ta, (json_t *)tb))
            return true;
    }
    return false;
}

static int check_oneof(gs_ctx *c, const json_t *alts)
{
    size_t n = json_array_size(alts);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            if (!branches_exclusive(c, json_array_get(alts, i), json_array_get(alts, j)))
                return gs_fail(c, HY_EINVAL, "oneOf",
                               "'oneOf' branches %zu and %zu may both match one value; only branches that exclude "
                               "each other (different types, or a required property with different const values) "
                               "are supported: use anyOf if a value may match several", i, j);
    return 0;
}

static int gen_anyof(gs_ctx *c, const json_t *s, gs_buf *out)
{
    static const char *const both[] = {"anyOf", "oneOf"};
    if (json_object_get(s, "anyOf") && json_object_get(s, "oneOf"))
        return gs_fail(c, HY_EINVAL, "oneOf", "anyOf together with oneOf is not supported");
    const char *kw = json_object_get(s, "anyOf") ? "anyOf" : "oneOf";
    const json_t *alts = json_object_get(s, kw);
    if (!json_is_array(alts) || !json_array_size(alts))
        return gs_fail(c, HY_EINVAL, "", "'%s' must be a non-empty array of schemas", kw);
    if (!strcmp(kw, "oneOf") && check_oneof(c, alts))
        return HY_EINVAL;
    bool siblings = constraint_besides(s, both, 2) != NULL;
    json_t *rest = siblings ? without(s, "anyOf", "oneOf") : NULL;
    if (siblings && !rest)
        return oom(c);
    int rc = 0, n = 0;
    size_t i;
    json_t *v;
    json_array_foreach(alts, i, v) {
        json_t *m = NULL;
        gs_mark mk = gs_save(c);
        push_index(c, kw, i, c->stem.n ? "" : "alt-");
        rc = siblings ? merge(c, rest, v, &m) : (m = json_incref(v), 0);
        if (!rc && !json_is_false(m)) { /* an alternative matching nothing is left out */
            buf_puts(out, n++ ? " | " : "");
            rc = gen(c, m, out);
        }
        json_decref(m);
        gs_restore(c, mk);
        if (rc)
            break;
    }
    json_decref(rest);
    if (!rc && !n)
        return gs_fail(c, HY_EINVAL, "", "no alternative of '%s' can match", kw);
    return rc;
}

static int gen_ref(gs_ctx *c, const json_t *s, gs_buf *out)
{
    static const char *const ref[] = {"$ref"};
    const json_t *r = json_object_get(s, "$ref");
    if (!json_is_string(r))
        return gs_fail(c, HY_EINVAL, "", "'$ref' must be a string");
    if (constraint_besides(s, ref, 1)) { /* constraints next to $ref apply too: merge */
        json_t *m = NULL;
        int rc = expand(c, s, &m);
        if (!rc)
            rc = gen_expr(c, m, out);
        json_decref(m);
        return rc;
    }
    int rule, rc = ref_rule(c, json_string_value(r), &rule);
    if (!rc)
        buf_puts(out, c->rules[rule].name);
    return rc;
}

/* The GBNF expression (a rule body) for schema s. */
static int gen_expr(gs_ctx *c, const json_t *s, gs_buf *out)
{
    if (json_is_true(s)) {
        put_prim(c, out, P_VALUE);
        return 0;
    }
    if (json_is_false(s))
        return gs_fail(c, HY_EINVAL, "", "this schema matches no value");
    if (!json_is_object(s))
        return gs_fail(c, HY_EINVAL, "", "a schema must be an object or a boolean");
    if (++c->depth > GS_MAX_DEPTH) {
        c->depth--;
        return gs_fail(c, HY_ELIMIT, "", "the schema is nested deeper than %d levels", GS_MAX_DEPTH);
    }
    int rc = check_keywords(c, s);
    if (rc) {
    } else if (json_object_get(s, "allOf")) {
        json_t *m = NULL;
        rc = expand(c, s, &m);
        if (!rc)
            rc = gen_expr(c, m, out);
        json_decref(m);
    } else if (json_object_get(s, "$ref")) {
        rc = gen_ref(c, s, out);
    } else if (json_object_get(s, "anyOf") || json_object_get(s, "oneOf")) {
        rc = gen_anyof(c, s, out);
    } else if (json_object_get(s, "enum") || json_object_get(s, "const")) {
        rc = gen_enum(c, s, out);
    } else {
        rc = gen_typed(c, s, out);
    }
    c->depth--;
    return rc;
}

static bool is_ident(const gs_buf *b)
{
    if (!b->n)
        return false;
    for (size_t i = 0; i < b->n; i++) {
        char ch = b->p[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-'))
            return false;
    }
    return true;
}

/* Schema s as one element: a rule of its own named after the current stem, or the rule it
 * already is (a shared rule, a $ref). */
static int gen(gs_ctx *c, const json_t *s, gs_buf *out)
{
    int idx, rc = rule_new(c, buf_str(&c->stem), &idx);
    gs_buf body = {0};
    if (!rc)
        rc = gen_expr(c, s, &body);
    if (!rc)
        rc = gs_check(c, &body);
    if (!rc && is_ident(&body)) {
        buf_puts(out, body.p); /* the reserved name stays unused */
    } else if (!rc) {
        rc = rule_define(c, idx, &body);
        buf_puts(out, c->rules[idx].name);
    }
    buf_free(&body);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry points. */

static void ctx_free(gs_ctx *c)
{
    for (int i = 0; i < c->n_rules; i++) {
        free(c->rules[i].name);
        buf_free(&c->rules[i].body);
    }
    free(c->rules);
    free(c->hash);
    for (int i = 0; i < c->n_refs; i++) {
        free(c->refs[i].ref);
        free(c->refs[i].ptr);
    }
    free(c->refs);
    buf_free(&c->path);
    buf_free(&c->stem);
}

/* Translate every queued $ref target (a target may queue more). */
static int gen_pending(gs_ctx *c)
{
    for (int i = 0; i < c->n_refs; i++) {
        if (c->refs[i].done)
            continue;
        c->refs[i].done = true;
        buf_truncate(&c->path, 0);
        buf_truncate(&c->stem, 0);
        buf_puts(&c->path, c->refs[i].ptr);
        buf_puts(&c->stem, c->rules[c->refs[i].rule].name);
        c->depth = 0;
        gs_buf body = {0};
        int rc = gen_expr(c, c->refs[i].node, &body);
        if (!rc)
            rc = rule_define(c, c->refs[i].rule, &body);
        buf_free(&body);
        if (rc)
            return rc;
    }
    return 0;
}

/* All defined rules as GBNF text, root first (it is rule 0). */
static int assemble(gs_ctx *c, char **gbnf)
{
    gs_buf t = {0};
    for (int i = 0; i < c->n_rules; i++)
        if (c->rules[i].defined)
            buf_printf(&t, "%s ::= ", c->rules[i].name), buf_puts(&t, buf_str(&c->rules[i].body)),
                buf_puts(&t, "\n");
    int rc = gs_check(c, &t);
    if (rc) {
        buf_free(&t);
        return rc;
    }
    *gbnf = t.p;
    return 0;
}

/* The root rule: body for the document root, "#" resolving to it. */
static int gen_root(gs_ctx *c)
{
    int root, rc = rule_new(c, "root", &root);
    gs_ref *r = rc ? NULL : calloc(1, sizeof *r);
    if (!rc && !r)
        rc = oom(c);
    if (!rc) {
        r->ref = strdup("#");
        r->ptr = strdup("");
        r->node = c->root;
        r->rule = root;
        r->done = true;
        c->refs = r;
        c->n_refs = c->cap_refs = 1;
        if (!r->ref || !r->ptr)
            rc = oom(c);
    }
    gs_buf body = {0};
    if (!rc)
        rc = gen_expr(c, c->root, &body);
    if (!rc)
        rc = rule_define(c, root, &body);
    buf_free(&body);
    return rc;
}

int gram_schema_gbnf(const json_t *schema, const gram_json_opts *o, char **gbnf, gram_schema_err *e)
{
    gram_schema_err local;
    e = e ? e : &local;
    memset(e, 0, sizeof *e);
    if (!gbnf)
        return hy_err_set(HY_EINVAL, "gram_schema_gbnf: no output pointer");
    *gbnf = NULL;
    gs_ctx c = {.root = schema, .ws = o && o->ws_flexible, .e = e};
    if (!schema) {
        snprintf(e->message, sizeof e->message, "no schema");
        return hy_err_set(HY_EINVAL, "no schema");
    }
    int rc = gen_root(&c);
    if (!rc)
        rc = gen_pending(&c);
    if (!rc)
        rc = define_prims(&c);
    if (!rc)
        rc = assemble(&c, gbnf);
    ctx_free(&c);
    return rc;
}

int gram_json_object_gbnf(const gram_json_opts *o, char **gbnf)
{
    gram_schema_err e;
    memset(&e, 0, sizeof e);
    if (!gbnf)
        return hy_err_set(HY_EINVAL, "gram_json_object_gbnf: no output pointer");
    *gbnf = NULL;
    gs_ctx c = {.ws = o && o->ws_flexible, .e = &e};
    int root, rc = rule_new(&c, "root", &root);
    gs_buf body = {0};
    if (!rc) {
        put_prim(&c, &body, P_OBJECT);
        rc = rule_define(&c, root, &body);
    }
    buf_free(&body);
    if (!rc)
        rc = define_prims(&c);
    if (!rc)
        rc = assemble(&c, gbnf);
    ctx_free(&c);
    return rc;
}
