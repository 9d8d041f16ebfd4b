/* bench_gram.c - `hydrad-bench gram`: what constrained decoding costs per token on the engine
 * thread. Random valid paths through a JSON Schema's grammar, each step timed as the server runs
 * it (smp_cseq_apply: advance the matcher, compute the mask, mask the logits), first with empty
 * caches, then warm; next to the time of one single-stream decode step of the same model, measured
 * in the same run (the ratio is the overhead a stream pays). Not a test. */
#include "bench/bench.h"
#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/gram.h"
#include "engine/gram_schema.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/smp_constrain.h"
#include "engine/tokenizer.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An extraction-style schema: strings, an enum, integers, an array of objects. */
static const char *k_builtin =
    "{\"type\":\"object\",\"properties\":{"
    "\"name\":{\"type\":\"string\",\"maxLength\":40},"
    "\"email\":{\"type\":\"string\",\"format\":\"email\"},"
    "\"age\":{\"type\":\"integer\",\"minimum\":0,\"maximum\":150},"
    "\"role\":{\"enum\":[\"admin\",\"editor\",\"viewer\"]},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":16},\"maxItems\":4},"
    "\"address\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"},\"zip\":{\"type\":\"string\","
    "\"pattern\":\"^[0-9]{5}$\"}},\"required\":[\"city\",\"zip\"],\"additionalProperties\":false}},"
    "\"required\":[\"name\",\"email\",\"age\",\"role\",\"tags\",\"address\"],\"additionalProperties\":false}";

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s)
        s[n] = 0;
    fclose(f);
    return s;
}

/* One path: random allowed tokens (the end token with probability 1/4 where allowed) until the
 * grammar ends or max_len; per-step times appended to t. Returns tokens run. */
static int run_path(const smp_constraint *c, const gram_vocab *gv, const tok_vocab *v, int max_len, float *logits,
                    int n_vocab, double *t, int *nt)
{
    smp_cseq *q;
    if (smp_cseq_create(c, gv, &q))
        return -1;
    int32_t *toks = malloc((size_t)(max_len + 1) * sizeof *toks), *ok = malloc((size_t)n_vocab * sizeof *ok);
    int n = 0;
    for (; n < max_len; n++) {
        for (int i = 0; i < n_vocab; i++)
            logits[i] = 0.0f;
        double t0 = hy_now();
        int rc = smp_cseq_apply(q, toks, 0, n, logits, n_vocab);
        t[(*nt)++] = hy_now() - t0;
        if (rc)
            break;
        int na = 0, end = -1;
        for (int i = 0; i < n_vocab; i++)
            if (logits[i] == 0.0f)
                ok[na++] = i;
        for (int i = 0; i < na && end < 0; i++)
            if (tok_is_eog(v, ok[i]))
                end = ok[i];
        if (end >= 0 && (na == 1 || rnd() % 4 == 0))
            break;
        do
            toks[n] = ok[rnd() % (uint32_t)na];
        while (toks[n] == end);
    }
    free(toks);
    free(ok);
    smp_cseq_free(q);
    return n;
}

static void report(const char *label, double *t, int n)
{
    if (n <= 0)
        return;
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += t[i];
    qsort(t, (size_t)n, sizeof *t, cmp_d);
    printf("| %s | %d | %.1f | %.1f | %.1f | %.1f |\n", label, n, 1e6 * sum / n, 1e6 * t[n / 2],
           1e6 * t[(int)(0.99 * (n - 1))], 1e6 * t[n - 1]);
}

/* Mean seconds of a one-token decode step of one sequence (after a 16-token prompt). */
static double decode_step(const char *model_path, int threads)
{
    gguf_file *f = NULL;
    be *b = NULL;
    eng_model *m = NULL;
    eng_kv *kv = NULL;
    double dt = -1;
    if (gguf_open(model_path, &f) || be_open("cpu", threads, &b) || eng_model_load(f, b, &m) ||
        eng_kv_create(m, 8, &kv))
        goto out;
    int nv = eng_model_hparams(m)->n_vocab;
    float *logits = malloc((size_t)nv * sizeof *logits);
    int32_t toks[16];
    for (int i = 0; i < 16; i++)
        toks[i] = 100 + i;
    if (logits && !eng_forward_seq(m, kv, toks, 16, 0, 16, NULL, logits)) {
        double t0 = hy_now();
        int steps = 48;
        for (int i = 0; i < steps; i++)
            eng_forward_seq(m, kv, &toks[i % 16], 1, 16 + i, 1, NULL, logits);
        dt = (hy_now() - t0) / steps;
    }
    free(logits);
out:
    eng_kv_free(kv);
    eng_model_free(m);
    if (b)
        b->ops->destroy(b);
    gguf_close(f);
    return dt;
}

int bench_gram_main(int argc, char **argv)
{
    const char *model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", *schema_path = NULL;
    int paths = 50, max_len = 160, threads = 0;
    static const struct option lo[] = {{"model", 1, 0, 'm'}, {"schema", 1, 0, 's'}, {"paths", 1, 0, 'p'},
                                       {"max-len", 1, 0, 'l'}, {"threads", 1, 0, 't'}, {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:s:p:l:t:h", lo, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 's': schema_path = optarg; break;
        case 'p': paths = atoi(optarg); break;
        case 'l': max_len = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        default:
            printf("usage: hydrad-bench gram [-m MODEL] [--schema FILE.json] [--paths N] [--max-len N] [--threads N]\n"
                   "  random valid paths through the schema's grammar (default: a built-in extraction schema);\n"
                   "  per-token time of mask + advance on the engine thread, cold then cached, next to one\n"
                   "  single-stream decode step of the model on the CPU\n");
            return c == 'h' ? 0 : 2;
        }
    }
    char *text = schema_path ? read_file(schema_path) : strdup(k_builtin), *gbnf = NULL;
    json_t *schema = text ? json_loads(text, 0, NULL) : NULL;
    gguf_file *f = NULL;
    tok_vocab *v = NULL;
    gram_vocab *gv = NULL;
    gram *g = NULL;
    smp_constraint *cst = NULL;
    gram_json_opts o = {false};
    gram_schema_err se;
    char err[256];
    int ret = 1;
    if (!schema) {
        fprintf(stderr, "hydrad-bench gram: cannot read the schema\n");
        goto out;
    }
    if (gguf_open(model, &f) || tok_load(f, &v)) {
        fprintf(stderr, "hydrad-bench gram: %s: %s\n", model, hy_err_msg());
        goto out;
    }
    double t0 = hy_now();
    if (gram_vocab_create(v, &gv))
        goto out;
    double t_vocab = hy_now() - t0;
    t0 = hy_now();
    if (gram_schema_gbnf(schema, &o, &gbnf, &se) || gram_compile(gbnf, strlen(gbnf), &g, err, sizeof err) ||
        smp_constraint_create(g, NULL, NULL, 0, &cst)) {
        fprintf(stderr, "hydrad-bench gram: %s\n", hy_err_msg());
        goto out;
    }
    double t_compile = hy_now() - t0;
    int nv = tok_n_vocab(v);
    float *logits = malloc((size_t)nv * sizeof *logits);
    double *cold = malloc((size_t)(max_len + 1) * sizeof *cold);
    double *warm = malloc((size_t)paths * (size_t)(max_len + 1) * sizeof *warm);
    int n_cold = 0, n_warm = 0;
    if (!logits || !cold || !warm)
        goto out_free;
    run_path(cst, gv, v, max_len, logits, nv, cold, &n_cold);
    for (int p = 0; p < paths; p++)
        run_path(cst, gv, v, max_len, logits, nv, warm, &n_warm);
    double step = decode_step(model, threads);
    printf("## hydrad-bench gram: %s, vocabulary %d\n\n", schema_path ? schema_path : "built-in schema", nv);
    printf("vocabulary trie %.1f ms (once per model); schema -> grammar compile %.2f ms (once per schema, then cached)\n\n",
           1e3 * t_vocab, 1e3 * t_compile);
    printf("| per token | tokens | mean us | p50 us | p99 us | max us |\n|---|---|---|---|---|---|\n");
    report("first path (empty caches)", cold, n_cold);
    double wsum = 0;
    for (int i = 0; i < n_warm; i++)
        wsum += warm[i];
    double wmean = n_warm ? wsum / n_warm : 0;
    report("next paths", warm, n_warm);
    if (step > 0)
        printf("\none single-stream decode step: %.0f us; mean mask cost on later paths = %.2f %% of it\n", 1e6 * step,
               100.0 * wmean / step);
    ret = 0;
out_free:
    free(logits);
    free(cold);
    free(warm);
out:
    smp_constraint_free(cst);
    gram_release(g);
    free(gbnf);
    gram_vocab_free(gv);
    tok_free(v);
    gguf_close(f);
    json_decref(schema);
    free(text);
    return ret;
}
