/* cli_generate.c - `hydrad generate`: load a GGUF model, run one prompt (optionally through the
 * model's chat template), stream the generated text to stdout and the speeds to stderr.
 * It serves no HTTP and keeps no state between runs; the server lives in serve.c. */
#include "server/cli.h"
#include "server/cli_common.h"

#include "adapters/adapter.h"

#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *model, *prompt, *system, *chat_template, *device;
    bool chat, help, ignore_eos;
    const char *adapter;
    float adapter_scale;
    int n_predict, threads, top_k;
    float temp, top_p, min_p, repeat_penalty;
    long long seed; /* < 0: from the clock */
} gen_opts;

#define O(f) offsetof(gen_opts, f)
static const cli_opt gen_table[] = {
    {"--model", "-m", CLI_STR, O(model), "FILE", "GGUF model (llama architecture)"},
    {"--prompt", "-p", CLI_STR, O(prompt), "TEXT", "prompt text"},
    {"--chat", NULL, CLI_FLAG, O(chat), NULL, "wrap the prompt in the model's chat template"},
    {"--system", NULL, CLI_STR, O(system), "TEXT", "system message (with --chat)"},
    {"--chat-template", NULL, CLI_STR, O(chat_template), "NAME",
     "chatml, llama3, llama2 or zephyr instead of the model's own"},
    {"--n-predict", "-n", CLI_INT, O(n_predict), "N", "tokens to generate at most (256)"},
    {"--temp", NULL, CLI_FLOAT, O(temp), "T", "temperature; 0 = greedy (0)"},
    {"--top-k", NULL, CLI_INT, O(top_k), "K", "keep the K most likely tokens (0 = off)"},
    {"--top-p", NULL, CLI_FLOAT, O(top_p), "P", "nucleus sampling (1 = off)"},
    {"--min-p", NULL, CLI_FLOAT, O(min_p), "P", "drop tokens below P x the top probability (0)"},
    {"--repeat-penalty", NULL, CLI_FLOAT, O(repeat_penalty), "R", "repetition penalty (1 = off)"},
    {"--seed", NULL, CLI_LL, O(seed), "S", "sampling seed (default: from the clock)"},
    {"--threads", "-t", CLI_INT, O(threads), "N", "CPU threads (default: all cores)"},
    {"--device", NULL, CLI_STR, O(device), "DEV", "cpu, cuda or auto (auto)"},
    {"--adapter", NULL, CLI_STR, O(adapter), "DIR", "apply a LoRA/HydraLoRA adapter directory (PEFT format)"},
    {"--adapter-scale", NULL, CLI_FLOAT, O(adapter_scale), "X", "multiply the adapter's scale s by X (1; 0 = base model output)"},
    {"--ignore-eos", NULL, CLI_FLAG, O(ignore_eos), NULL, "keep generating past end-of-generation tokens"},
    {"--help", "-h", CLI_FLAG, O(help), NULL, "this help"},
};
#undef O

static void gen_usage(FILE *f)
{
    cli_usage(f, "hydrad generate -m MODEL -p PROMPT [options]", gen_table, HY_ARRAY_LEN(gen_table));
}

/* The prompt as token ids, through the chat template when asked. *ids malloc'ed. */
static int gen_tokenize(const gen_opts *g, const gguf_file *f, const tok_vocab *v, int32_t **ids,
                        int *n)
{
    if (!g->chat)
        return tok_encode(v, g->prompt, strlen(g->prompt), false, tok_add_bos(v), ids, n);
    tok_chat_kind kind;
    int rc = tok_chat_detect(f, g->chat_template, &kind);
    if (rc)
        return rc;
    tok_msg msgs[2];
    int nm = 0;
    if (g->system)
        msgs[nm++] = (tok_msg){"system", g->system};
    msgs[nm++] = (tok_msg){"user", g->prompt};
    char *text = NULL;
    if ((rc = tok_chat_apply(kind, msgs, nm, true, &text)))
        return rc;
    rc = tok_encode(v, text, strlen(text), true, tok_add_bos(v), ids, n);
    free(text);
    return rc;
}

typedef struct {
    gguf_file *f;
    be *b;
    eng_model *m;
    eng_kv *kv;
    tok_vocab *v;
    smp_seq *smp;
    ad_adapter *ad;
    int32_t *ids;
    float *logits;
    char *piece;
} gen_run;

static void gen_free(gen_run *r)
{
    free(r->piece);
    free(r->logits);
    free(r->ids);
    smp_free(r->smp);
    cli_teardown(r->ad, r->kv, r->m, r->v, r->b, r->f);
}

static const eng_adapter *gen_eng_adapter(const gen_run *r) { return r->ad ? ad_eng(r->ad) : NULL; }

/* Decode loop: sample, print, feed back. Returns 0 or an HY_E code. */
static int gen_decode(const gen_opts *g, gen_run *r, int n_prompt, int *n_gen)
{
    const int n_vocab = eng_model_hparams(r->m)->n_vocab;
    size_t cap = tok_detok_cap(r->v);
    tok_detok dt;
    tok_detok_init(&dt, r->v);
    int pos = n_prompt, rc = HY_OK;
    *n_gen = 0;
    while (*n_gen < g->n_predict) {
        smp_result res;
        if ((rc = smp_sample(r->smp, r->logits, &res)))
            return rc;
        int32_t id = res.id;
        if (id < 0 || id >= n_vocab || (!g->ignore_eos && tok_is_eog(r->v, id)))
            break;
        size_t n = tok_detok_push(&dt, id, r->piece, cap);
        fwrite(r->piece, 1, n, stdout);
        fflush(stdout);
        ++*n_gen;
        if ((rc = smp_accept(r->smp, id)))
            return rc;
        if (*n_gen == g->n_predict)
            break;
        if ((rc = eng_forward_seq(r->m, r->kv, &id, 1, pos++, 0, gen_eng_adapter(r), r->logits)))
            return rc;
    }
    size_t n = tok_detok_flush(&dt, r->piece, cap);
    fwrite(r->piece, 1, n, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    return HY_OK;
}

int cli_generate(int argc, char **argv)
{
    gen_opts g = {.n_predict = 256, .threads = 0, .top_p = 1.0f, .repeat_penalty = 1.0f,
                  .adapter_scale = 1.0f, .seed = -1, .device = "auto"};
    if (cli_parse("generate", argc, argv, gen_table, HY_ARRAY_LEN(gen_table), &g))
        return 2;
    if (g.help) {
        gen_usage(stdout);
        return 0;
    }
    if (!g.model || !g.prompt) {
        gen_usage(stderr);
        return 2;
    }
    if (g.n_predict < 0)
        g.n_predict = 0;
    gen_run r = {0};
    int rc, exit_code = 2;
    int32_t n_prompt = 0;
    /* Model problems: exactly one line naming the file, exit code 2. */
    if ((rc = gguf_open(g.model, &r.f)) || (rc = tok_load(r.f, &r.v)) ||
        (rc = cli_backend(g.device, g.threads, &r.b)) || (rc = eng_model_load(r.f, r.b, &r.m))) {
        fprintf(stderr, "hydrad: %s: %s\n", g.model, hy_err_msg());
        exit_code = rc == HY_EDEVICE || rc == HY_ENOMEM ? 1 : 2;
        goto out;
    }
    const eng_hparams *hp = eng_model_hparams(r.m);
    if ((rc = cli_adapter(g.adapter, g.adapter_scale, r.m, r.b, &r.ad)))
        goto out;
    if ((rc = gen_tokenize(&g, r.f, r.v, &r.ids, &n_prompt))) {
        fprintf(stderr, "hydrad: prompt: %s\n", hy_err_msg());
        goto out;
    }
    if (n_prompt == 0) {
        fprintf(stderr, "hydrad: prompt: the prompt is empty\n");
        goto out;
    }
    int n_ctx = n_prompt + g.n_predict;
    if (n_ctx > hp->n_ctx_train) {
        fprintf(stderr, "hydrad: prompt (%d tokens) + %d new tokens exceed the model's context of %d\n",
                n_prompt, g.n_predict, hp->n_ctx_train);
        goto out;
    }
    exit_code = 1;
    smp_params sp = smp_default_params();
    sp.temperature = g.temp;
    sp.top_k = g.top_k;
    sp.top_p = g.top_p;
    sp.min_p = g.min_p;
    sp.repetition_penalty = g.repeat_penalty;
    sp.seed = g.seed >= 0 ? (uint64_t)g.seed : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
    if ((rc = smp_create(&sp, hp->n_vocab, &r.smp)) ||
        (rc = smp_accept_prompt(r.smp, r.ids, n_prompt))) {
        fprintf(stderr, "hydrad: %s\n", hy_err_msg());
        exit_code = 2;
        goto out;
    }
    r.logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
    r.piece = malloc(tok_detok_cap(r.v));
    if (!r.logits || !r.piece ||
        (rc = eng_kv_create(r.m, (n_ctx + BE_KV_BLOCK - 1) / BE_KV_BLOCK, &r.kv))) {
        fprintf(stderr, "hydrad: %s\n", r.logits && r.piece ? hy_err_msg() : "out of memory");
        goto out;
    }

    double t0 = hy_now();
    if ((rc = eng_forward_seq(r.m, r.kv, r.ids, n_prompt, 0, 512, gen_eng_adapter(&r), r.logits))) {
        fprintf(stderr, "hydrad: %s\n", hy_err_msg());
        goto out;
    }
    double t1 = hy_now();
    int n_gen = 0;
    if ((rc = gen_decode(&g, &r, n_prompt, &n_gen))) {
        fprintf(stderr, "hydrad: %s\n", hy_err_msg());
        goto out;
    }
    double t2 = hy_now();
    /* the first generated token comes from the prefill's logits: n_gen - 1 decode steps */
    int steps = n_gen > 0 ? n_gen - 1 : 0;
    char thr[32] = "all cores";
    if (g.threads > 0)
        snprintf(thr, sizeof thr, "%d threads", g.threads);
    fprintf(stderr, "hydrad: prefill %d tokens in %.3f s (%.1f tok/s); decode %d tokens in %.3f s "
            "(%.1f tok/s); backend %s, %s\n", n_prompt, t1 - t0, n_prompt / (t1 - t0), steps,
            t2 - t1, steps > 0 ? steps / (t2 - t1) : 0.0, r.b->ops->name, thr);
    exit_code = 0;
out:
    gen_free(&r);
    return exit_code;
}
