/* spec.h - prompt-lookup (n-gram) drafting for speculative decoding: the tokens that followed the
 * most recent earlier occurrence of a sequence's last n tokens, and the per-sequence draft length
 * that adapts to how many drafts were accepted. Pure functions on token arrays; the scheduler
 * verifies the drafts (scheduler.c). */
#ifndef HY_SPEC_H
#define HY_SPEC_H

#include <stdint.h>

#define SPEC_MAX_NGRAM 4 /* the longest suffix looked up; shorter ones are tried down to 1 */
#define SPEC_MAX_DRAFT 16

/* Up to k tokens that followed the latest earlier occurrence of toks' last n tokens, for n from
 * SPEC_MAX_NGRAM down to 1 (the longest match wins); the draft never runs past the end of toks.
 * Writes them to out[0..k) and returns how many (0: nothing matches, or k <= 0). */
int spec_ngram_draft(const int32_t *toks, int n_toks, int k, int32_t *out);

/* The next draft length after a verification that accepted `accepted` of `drafted` tokens: one
 * more after a full acceptance (up to max), the accepted count plus one after a rejection. */
int spec_next_k(int k, int drafted, int accepted, int max);

#endif
