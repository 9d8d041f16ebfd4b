/* cli_common.c - option parsing, backend choice and adapter loading shared by the one-shot
 * subcommands (cli_generate.c, cli_perplexity.c). No model math, no state between calls. */
#include "server/cli_common.h"

#include "engine/hy.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

void cli_usage(FILE *f, const char *synopsis, const cli_opt *t, size_t n)
{
    fprintf(f, "usage: %s\n", synopsis);
    for (size_t i = 0; i < n; i++) {
        const cli_opt *o = &t[i];
        char left[64];
        snprintf(left, sizeof left, "%s%s%s%s%s", o->shrt ? o->shrt : "", o->shrt ? ", " : "",
                 o->lng, o->arg ? " " : "", o->arg ? o->arg : "");
        fprintf(f, "  %-28s %s\n", left, o->help);
    }
}

static int cli_set(void *opts, const cli_opt *o, const char *val)
{
    void *dst = (char *)opts + o->off;
    char *end = NULL;
    errno = 0;
    switch (o->kind) {
    case CLI_FLAG: *(bool *)dst = true; return 0;
    case CLI_STR: *(const char **)dst = val; return 0;
    case CLI_INT: {
        long v = strtol(val, &end, 10);
        if (errno || end == val || *end || v < -2147483647L || v > 2147483647L)
            break;
        *(int *)dst = (int)v;
        return 0;
    }
    case CLI_LL: {
        long long v = strtoll(val, &end, 10);
        if (errno || end == val || *end)
            break;
        *(long long *)dst = v;
        return 0;
    }
    case CLI_FLOAT: {
        float v = strtof(val, &end);
        if (errno || end == val || *end)
            break;
        *(float *)dst = v;
        return 0;
    }
    }
    fprintf(stderr, "hydrad: %s: bad value '%s'\n", o->lng, val);
    return -1;
}

static const cli_opt *cli_find(const char *a, size_t nlen, const cli_opt *t, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        const cli_opt *c = &t[k];
        if ((strlen(c->lng) == nlen && !strncmp(a, c->lng, nlen)) || (c->shrt && !strcmp(a, c->shrt)))
            return c;
    }
    return NULL;
}

int cli_parse(const char *cmd, int argc, char **argv, const cli_opt *t, size_t n, void *opts)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *eq = strchr(a, '=');
        size_t nlen = a[0] == '-' && a[1] == '-' && eq ? (size_t)(eq - a) : strlen(a);
        const cli_opt *o = cli_find(a, nlen, t, n);
        if (!o) {
            fprintf(stderr, "hydrad: %s: unknown option '%s' (see hydrad %s --help)\n", cmd, a, cmd);
            return -1;
        }
        const char *val = NULL;
        if (o->kind != CLI_FLAG) {
            if (eq && nlen != strlen(a))
                val = eq + 1;
            else if (i + 1 < argc)
                val = argv[++i];
            else {
                fprintf(stderr, "hydrad: %s needs a value\n", o->lng);
                return -1;
            }
        }
        if (cli_set(opts, o, val))
            return -1;
    }
    return 0;
}

/* auto without the "using the CPU backend" chatter of be_open: a one-shot run says which backend
 * it used on its final stats line instead. */
int cli_backend(const char *device, int threads, be **out)
{
    if (strcmp(device, "auto"))
        return be_open(device, threads, out);
    if (be_cuda_compiled() && be_cuda_create(0, out) == HY_OK)
        return HY_OK;
    hy_err_clear();
    return be_cpu_create(threads, out);
}

int cli_adapter(const char *dir, float scale, const eng_model *m, be *b, ad_adapter **out)
{
    *out = NULL;
    if (!dir)
        return HY_OK;
    ad_shape shape;
    ad_shape_from_model(m, &shape);
    ad_opts o = {.scale_mult = scale};
    int rc = ad_read(dir, &shape, &o, out);
    if (!rc)
        rc = ad_upload(*out, b);
    if (rc) {
        fprintf(stderr, "hydrad: %s: %s\n", dir, hy_err_msg());
        ad_free(*out);
        *out = NULL;
    }
    return rc;
}

void cli_teardown(ad_adapter *ad, eng_kv *kv, eng_model *m, tok_vocab *v, be *b, gguf_file *f)
{
    ad_free(ad);
    eng_kv_free(kv);
    eng_model_free(m);
    tok_free(v);
    if (b)
        b->ops->destroy(b);
    gguf_close(f);
}
