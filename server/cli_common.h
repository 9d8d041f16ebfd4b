/* cli_common.h - what the one-shot subcommands (generate, perplexity) share: a table-driven
 * option parser with its usage text, the --device choice and --adapter loading. It does no
 * model math and keeps no state; each subcommand owns its options struct and its run. */
#ifndef HY_CLI_COMMON_H
#define HY_CLI_COMMON_H

#include "adapters/adapter.h"
#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

#include <stddef.h>
#include <stdio.h>

typedef enum { CLI_FLAG, CLI_STR, CLI_INT, CLI_FLOAT, CLI_LL } cli_opt_kind;

/* One option: long name, short name (or NULL), type, offset of its field in the subcommand's
 * options struct (bool, const char *, int, float or long long), value name, help line. */
typedef struct {
    const char *lng, *shrt;
    cli_opt_kind kind;
    size_t off;
    const char *arg, *help;
} cli_opt;

/* "usage: <synopsis>" and one aligned line per option. */
void cli_usage(FILE *f, const char *synopsis, const cli_opt *t, size_t n);

/* Parse argv[1..argc) (argv[0] is the subcommand `cmd`) into the struct at opts, accepting
 * "--opt value" and "--opt=value". String values point into argv. On a bad option or value
 * prints one line to stderr and returns -1. */
int cli_parse(const char *cmd, int argc, char **argv, const cli_opt *t, size_t n, void *opts);

/* --device: "cpu", "cuda" or "auto". auto picks CUDA when it is compiled in and a device opens,
 * else the CPU, silently (the caller names the backend it used: (*out)->ops->name).
 * threads <= 0: all cores. Free with (*out)->ops->destroy. */
int cli_backend(const char *device, int threads, be **out);

/* --adapter DIR [--adapter-scale X]: read, validate against m, upload to b (call on the thread
 * that owns b). dir == NULL: *out = NULL, HY_OK. On error prints "hydrad: DIR: message" to
 * stderr. *out is owned by the caller: ad_free (before the model and backend go). */
int cli_adapter(const char *dir, float scale, const eng_model *m, be *b, ad_adapter **out);

/* Free what a one-shot run loaded, in the order it must go (adapter before model and backend,
 * the file last). Any may be NULL. */
void cli_teardown(ad_adapter *ad, eng_kv *kv, eng_model *m, tok_vocab *v, be *b, gguf_file *f);

#endif
