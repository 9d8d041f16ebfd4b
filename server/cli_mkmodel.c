/* cli_mkmodel.c - `hydrad mkmodel`: argv, usage and messages of the seeded random GGUF writer
 * (engine/mkmodel.c does the writing). Returns an exit code; never exits. */
#include "server/cli.h"

#include "engine/hy.h"
#include "engine/mkmodel.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int mk_usage(void)
{
    fprintf(stderr,
            "usage: hydrad mkmodel --shape smollm2-135m|llama-1b|tiny --type q4_1|q8_0|q4_0|f16 "
            "[--seed S] [--layers N] [--vocab-from FILE.gguf|none] -o FILE.gguf\n");
    return 2;
}

int cli_mkmodel(int argc, char **argv)
{
    const char *shape = NULL, *type_s = "q4_1", *out = NULL, *vocab = MKMODEL_DEFAULT_VOCAB;
    bool vocab_explicit = false;
    uint64_t seed = 1;
    int layers = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return mk_usage(), 0;
        if (!v)
            return mk_usage();
        if (!strcmp(a, "--shape")) shape = v;
        else if (!strcmp(a, "--type")) type_s = v;
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--layers")) layers = atoi(v);
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) out = v;
        else if (!strcmp(a, "--vocab-from")) { vocab = v; vocab_explicit = true; }
        else return mk_usage();
        i++;
    }
    const mkmodel_shape *s = mkmodel_shape_find(shape);
    uint32_t type;
    if (!s || !out || mkmodel_parse_type(type_s, &type) || layers < 0 || layers > 512) {
        fprintf(stderr, "hydrad mkmodel: need a known --shape, a --type and -o\n");
        return mk_usage();
    }
    double t0 = hy_now();
    int rc = mkmodel_write(s, type, seed, layers, vocab, vocab_explicit, out);
    if (rc) {
        fprintf(stderr, "hydrad mkmodel: %s\n", hy_err_msg());
        return rc == HY_EINVAL || rc == HY_EIO || rc == HY_EFORMAT ? 2 : 1;
    }
    fprintf(stderr, "hydrad mkmodel: wrote %s (%s, %s, seed %llu) in %.1f s\n", out, s->name, type_s,
            (unsigned long long)seed, hy_now() - t0);
    return 0;
}
