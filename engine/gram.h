/* gram.h - constrained decoding: a pushdown automaton over UTF-8 bytes compiled from a GBNF
 * grammar (llama.cpp's grammar format, subset below), and the per-step set of tokens a sequence
 * may emit under it. JSON Schemas become GBNF in engine/gram_schema.c. No server code, no JSON
 * request parsing, no sampling here.
 *
 * GBNF accepted: `name ::= alternatives` rules (names [A-Za-z0-9_-]+; the start rule is `root`),
 * alternatives separated by `|`, sequences of "literals" (escapes \n \r \t \\ \" \' \[ \] \xHH
 * \uHHHH \UHHHHHHHH), [character classes] with ranges and ^ negation, `.` (any character),
 * rule references, ( groups ), postfix * + ? {m} {m,} {m,n}; # comments. A rule body ends at a
 * newline outside parentheses (a line may start with `|` to continue it). Characters are Unicode
 * code points; a token may end inside a multi-byte character. Left recursion is refused. */
#ifndef HY_GRAM_H
#define HY_GRAM_H

#include "engine/tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Compile-time caps: a grammar over these is refused (HY_ELIMIT) so a request cannot make the
 * server build something huge. */
#define GRAM_MAX_TEXT (256u * 1024u)  /* bytes of GBNF */
#define GRAM_MAX_ELEMS 200000         /* elements after expanding repetitions */
/* Automaton states (stacks) one grammar may create while sequences run, all together. Past it a
 * matcher reports HY_ELIMIT (the sequence ends). */
#define GRAM_MAX_NODES 400000
/* Masks one grammar keeps (6 KiB each with a 49k vocabulary); past it they are recomputed. */
#define GRAM_MAX_MASKS 2048

typedef struct gram gram;

/* Compile GBNF text. On error returns HY_EINVAL (HY_ELIMIT for the caps) with a message naming
 * the line and column in err (errlen bytes, NUL-terminated) and in hy_err_msg(). *out starts with
 * one reference: drop it with gram_release. A compiled grammar is immutable for callers, but its
 * automaton and mask caches grow as matchers run: after compilation, use one grammar's matchers
 * from one thread at a time (the engine thread); retain/release may be called from any thread. */
int gram_compile(const char *text, size_t len, gram **out, char *err, size_t errlen);
void gram_retain(gram *g);
void gram_release(gram *g); /* NULL: no-op */
/* The state cap was hit once (any thread): a cache should compile the grammar afresh. */
bool gram_spent(gram *g);

/* Copy GBNF text with every rule name prefixed by `prefix` (names in string literals, classes and
 * comments untouched), so several grammars' rules can live in one. *out malloc'ed, caller frees. */
int gram_gbnf_prefix(const char *text, const char *prefix, char **out);

/* Whether the whole of s[0..len) is a sentence of the grammar (tests and tools). */
bool gram_match(gram *g, const char *s, size_t len);
/* Whether s[0..len) can be continued into a sentence (it is a prefix of one). */
bool gram_match_prefix(gram *g, const char *s, size_t len);

/* The bytes of every token of a tokenizer, in a trie, built once per model. Control tokens
 * (BOS, <|im_start|>, ...) are never allowed by a grammar, except the end-of-generation ones
 * (tok_is_eog), which are allowed exactly where the grammar may end. Immutable after creation:
 * share it between threads. Free with gram_vocab_free. */
typedef struct gram_vocab gram_vocab;
int gram_vocab_create(const tok_vocab *v, gram_vocab **out);
void gram_vocab_free(gram_vocab *gv);
int gram_vocab_n(const gram_vocab *gv);     /* n_vocab: a mask has (n + 31) / 32 words */

/* One sequence's position in a grammar. Holds a reference on g. Free with gram_matcher_free. */
typedef struct gram_matcher gram_matcher;
int gram_matcher_create(gram *g, const gram_vocab *gv, gram_matcher **out);
void gram_matcher_free(gram_matcher *m);
/* The tokens allowed next: bit (id % 32) of allowed[id / 32] set. Masks are cached per
 * automaton state in the grammar, so a state seen before costs one OR per stack. HY_ELIMIT when
 * the grammar's state cap is reached. */
int gram_matcher_mask(gram_matcher *m, uint32_t *allowed);
/* Advance by one token. HY_EINVAL (state unchanged) when the token is not allowed. */
int gram_matcher_accept(gram_matcher *m, int32_t token);
/* The grammar may end here (end-of-generation tokens are allowed). */
bool gram_matcher_accepting(const gram_matcher *m);
/* Nothing but the end may follow. */
bool gram_matcher_finished(const gram_matcher *m);

#endif
