/* cli_mkadapter.c - `hydrad mkadapter`: argv, usage and messages of the seeded random adapter
 * writer (adapters/mkadapter.c does the writing; its header says what each option means).
 * Returns an exit code; never exits.
 *
 *   hydrad mkadapter --out DIR (--base GGUF | --shape-from GGUF) [--seed S] [--r R] [--K K]
 *                    [--alpha A] [--targets q_proj,v_proj,...] [--dtype f32|f16|bf16]
 *                    [--zero-b] [--ratio X] */
#include "server/cli.h"

#include "adapters/mkadapter.h"
#include "engine/hy.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void mk_usage(void)
{
    fprintf(stderr, "usage: hydrad mkadapter --out DIR (--base GGUF | --shape-from GGUF) [--seed S] [--r R] "
                    "[--K K] [--alpha A]\n"
                    "                        [--targets q_proj,v_proj,...] [--dtype f32|f16|bf16] [--zero-b] "
                    "[--ratio X]\n");
}

int cli_mkadapter(int argc, char **argv)
{
    mkadapter_args a = {.targets = "q_proj,v_proj", .dtype = "f32", .r = 8, .K = 0, .alpha = 16.0, .ratio = 0.2};
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(k, "--zero-b")) {
            a.zero_b = 1;
            continue;
        }
        if (!strcmp(k, "-h") || !strcmp(k, "--help")) {
            mk_usage();
            return 0;
        }
        if (!v) {
            fprintf(stderr, "hydrad mkadapter: %s needs a value\n", k);
            mk_usage();
            return 2;
        }
        i++;
        errno = 0;
        if (!strcmp(k, "--out"))
            a.out = v;
        else if (!strcmp(k, "--base"))
            a.base = v;
        else if (!strcmp(k, "--shape-from"))
            a.shape_from = v;
        else if (!strcmp(k, "--targets"))
            a.targets = v;
        else if (!strcmp(k, "--dtype"))
            a.dtype = v;
        else if (!strcmp(k, "--seed"))
            a.seed = strtoull(v, &end, 10);
        else if (!strcmp(k, "--r"))
            a.r = (int)strtol(v, &end, 10);
        else if (!strcmp(k, "--K"))
            a.K = (int)strtol(v, &end, 10);
        else if (!strcmp(k, "--alpha"))
            a.alpha = strtod(v, &end);
        else if (!strcmp(k, "--ratio"))
            a.ratio = strtod(v, &end);
        else {
            fprintf(stderr, "hydrad mkadapter: unknown option %s\n", k);
            mk_usage();
            return 2;
        }
        if (end && (*end || errno)) {
            fprintf(stderr, "hydrad mkadapter: bad number '%s' for %s\n", v, k);
            return 2;
        }
    }
    const char *bad = !a.out ? "--out is required"
                      : !a.base == !a.shape_from ? "give exactly one of --base and --shape-from"
                      : a.r < 1 || a.r > 256 ? "--r must be in 1..256"
                      : a.K < 0 || a.K > 16 ? "--K must be in 0..16"
                      : !isfinite(a.alpha) || a.alpha <= 0 ? "--alpha must be a positive number"
                      : !isfinite(a.ratio) || a.ratio < 0 ? "--ratio must be >= 0"
                      : strcmp(a.dtype, "f32") && strcmp(a.dtype, "f16") && strcmp(a.dtype, "bf16")
                          ? "--dtype must be f32, f16 or bf16"
                          : NULL;
    if (bad) {
        fprintf(stderr, "hydrad mkadapter: %s\n", bad);
        mk_usage();
        return 2;
    }
    int rc = mkadapter_run(&a);
    if (rc) {
        fprintf(stderr, "hydrad mkadapter: %s\n", hy_err_msg());
        return rc == HY_EINVAL || rc == HY_EFORMAT || rc == HY_EUNSUPPORTED || rc == HY_ENOTFOUND ? 2 : 1;
    }
    fprintf(stderr, "hydrad mkadapter: wrote %s\n", a.out);
    return 0;
}
