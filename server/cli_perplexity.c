/* cli_perplexity.c - `hydrad perplexity`: the perplexity of a GGUF model (optionally with an
 * adapter) over a text file, by llama.cpp's llama-perplexity method, so the two figures compare.
 * It serves no HTTP, samples nothing and holds at most one batch of logits at a time.
 *
 * Method (llama.cpp tools/perplexity, its default mode):
 *   - the whole file is tokenised once (special-token text as plain text; BOS prepended when
 *     the GGUF's tokenizer.ggml.add_bos_token says so; one trailing newline dropped, as
 *     llama.cpp's -f does), then cut into n = tokens / ctx non-overlapping windows of ctx tokens
 *     (the tail is not scored; --chunks N keeps the first N windows);
 *   - each window runs from position 0 on an empty KV; when the model adds BOS, the window's
 *     first token is replaced by BOS, so every window starts the way a prompt does;
 *   - only the second half is scored: the logits at positions first = ctx/2 .. ctx-2 predict the
 *     tokens at first+1 .. ctx-1, so every scored token has at least ctx/2 tokens of context;
 *   - nll = -log softmax(logits)[next]; PPL = exp(mean nll) over every scored token so far, and
 *     its +/- is PPL * sqrt((mean nll^2 - mean nll^2) / (count - 1)) (the error of the mean,
 *     carried through exp to first order).
 * Batching as llama.cpp's: --batch B >= ctx runs B/ctx windows side by side as sequences of
 * one batch; B < ctx runs a window in chunks of B tokens. */
#include "server/cli.h"
#include "server/cli_common.h"

#include "adapters/adapter.h"

#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PPL_MIN_CTX 16 /* one KV block; half of it is still a usable context */

typedef struct {
    const char *model, *file, *adapter, *device;
    float adapter_scale;
    int ctx, batch, threads, chunks;
    bool help;
} ppl_opts;

#define O(f) offsetof(ppl_opts, f)
static const cli_opt ppl_table[] = {
    {"--model", "-m", CLI_STR, O(model), "FILE", "GGUF model (llama architecture)"},
    {"--file", "-f", CLI_STR, O(file), "TEXT", "text file to score (UTF-8)"},
    {"--ctx", "-c", CLI_INT, O(ctx), "N", "window size in tokens; the second half is scored (512)"},
    {"--batch", "-b", CLI_INT, O(batch), "N", "tokens per forward step: N >= ctx runs N/ctx windows at once (512)"},
    {"--chunks", NULL, CLI_INT, O(chunks), "N", "score only the first N windows (default: all)"},
    {"--threads", "-t", CLI_INT, O(threads), "N", "CPU threads (default: all cores)"},
    {"--device", NULL, CLI_STR, O(device), "DEV", "cpu, cuda or auto (auto)"},
    {"--adapter", NULL, CLI_STR, O(adapter), "DIR", "apply a LoRA/HydraLoRA adapter directory (PEFT format)"},
    {"--adapter-scale", NULL, CLI_FLOAT, O(adapter_scale), "X", "multiply the adapter's scale s by X (1)"},
    {"--help", "-h", CLI_FLAG, O(help), NULL, "this help"},
};
#undef O

static void ppl_usage(FILE *f)
{
    cli_usage(f, "hydrad perplexity -m MODEL -f TEXT [options]", ppl_table, HY_ARRAY_LEN(ppl_table));
}

/* Everything one run owns; ppl_free releases it in reverse order of need. */
typedef struct {
    gguf_file *f;
    be *b;
    eng_model *m;
    eng_kv *kv;
    tok_vocab *v;
    ad_adapter *ad;
    char *text;
    int32_t *ids; /* the whole file's tokens */
    int n_ids;
    /* one batch: n_seq windows of `chunk` tokens at most */
    int n_seq, chunk, max_blocks;
    int32_t *tok, *pos, *seq, *slot, *table, *seq_len, *lrow, *ltgt, *lseq;
    float *logits; /* [rows][n_vocab]: the scored positions of one batch only */
    double *wnll, *wnll2; /* per window of the batch */
} ppl_run;

static void ppl_free(ppl_run *r)
{
    free(r->wnll);
    free(r->wnll2);
    free(r->logits);
    free(r->tok);
    free(r->pos);
    free(r->seq);
    free(r->slot);
    free(r->table);
    free(r->seq_len);
    free(r->lrow);
    free(r->ltgt);
    free(r->lseq);
    free(r->ids);
    free(r->text);
    cli_teardown(r->ad, r->kv, r->m, r->v, r->b, r->f);
}

/* The whole file into *text (malloc'ed, NUL-terminated, owned by the caller), its length in *len.
 * Prints its own message; returns -1 on failure. */
static int ppl_read(const char *path, char **text, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "hydrad: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n - 1, fp);
        if (n + 1 < cap || ferror(fp) || cap > SIZE_MAX / 2)
            break;
        char *nb = realloc(buf, cap * 2);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    int err = ferror(fp) || !feof(fp);
    fclose(fp);
    if (!buf || err) {
        fprintf(stderr, "hydrad: %s: %s\n", path, buf ? "read error" : "out of memory");
        free(buf);
        return -1;
    }
    buf[n] = '\0';
    *text = buf;
    *len = n;
    return 0;
}

/* -log p(tok) from one row of logits, as llama.cpp computes it: the max in float, the sum of
 * expf(l - max) in double. */
static double ppl_nll(const float *lg, int n_vocab, int tok)
{
    float mx = lg[0];
    for (int i = 1; i < n_vocab; i++)
        mx = lg[i] > mx ? lg[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < n_vocab; i++)
        sum += expf(lg[i] - mx);
    return -((double)(lg[tok] - mx) - log(sum));
}

/* Batch buffers for n_seq windows of ctx tokens run in chunks of r->chunk; the KV holds n_seq
 * windows, each in its own run of blocks. */
static int ppl_alloc(ppl_run *r, int ctx, int n_vocab)
{
    const int n_score = ctx - 1 - ctx / 2;
    size_t nt = (size_t)r->n_seq * (size_t)r->chunk;
    size_t rows = (size_t)r->n_seq * (size_t)HY_MIN(r->chunk, n_score), nl;
    r->max_blocks = (ctx + BE_KV_BLOCK - 1) / BE_KV_BLOCK;
    if (hy_mul_size(rows, (size_t)n_vocab * sizeof(float), &nl))
        return hy_err_set(HY_ELIMIT, "a batch of logits is too large (lower --batch)");
    r->tok = malloc(nt * sizeof(int32_t));
    r->pos = malloc(nt * sizeof(int32_t));
    r->seq = malloc(nt * sizeof(int32_t));
    r->slot = malloc(nt * sizeof(int32_t));
    r->lrow = malloc(rows * sizeof(int32_t));
    r->ltgt = malloc(rows * sizeof(int32_t));
    r->lseq = malloc(rows * sizeof(int32_t));
    r->table = malloc((size_t)r->n_seq * r->max_blocks * sizeof(int32_t));
    r->seq_len = malloc((size_t)r->n_seq * sizeof(int32_t));
    r->wnll = malloc((size_t)r->n_seq * sizeof(double));
    r->wnll2 = malloc((size_t)r->n_seq * sizeof(double));
    r->logits = malloc(nl);
    if (!r->tok || !r->pos || !r->seq || !r->slot || !r->lrow || !r->ltgt || !r->lseq ||
        !r->table || !r->seq_len || !r->wnll || !r->wnll2 || !r->logits)
        return hy_err_set(HY_ENOMEM, "out of memory");
    for (int i = 0; i < r->n_seq * r->max_blocks; i++)
        r->table[i] = i; /* sequence s owns blocks s * max_blocks .. */
    return eng_kv_create(r->m, r->n_seq * r->max_blocks, &r->kv);
}

/* Windows w0 .. w0+nw-1 (nw <= n_seq) as sequences 0..nw-1: run them from position 0 (a fresh
 * KV: every position a window reads it writes first) and add each window's nll sums to
 * r->wnll[s], r->wnll2[s]. */
static int ppl_windows(ppl_run *r, int w0, int nw, int ctx, int n_vocab)
{
    const int first = ctx / 2;
    const int32_t bos = tok_add_bos(r->v) ? tok_bos(r->v) : -1;
    const eng_adapter *ad[1] = {r->ad ? ad_eng(r->ad) : NULL};
    for (int s = 0; s < nw; s++)
        r->wnll[s] = r->wnll2[s] = 0.0;
    for (int c0 = 0; c0 < ctx; c0 += r->chunk) {
        int len = HY_MIN(r->chunk, ctx - c0), n = 0, nl = 0;
        for (int s = 0; s < nw; s++) {
            const int32_t *win = r->ids + (size_t)(w0 + s) * ctx;
            for (int k = 0; k < len; k++, n++) {
                int p = c0 + k;
                r->tok[n] = p == 0 && bos >= 0 ? bos : win[p];
                r->pos[n] = p;
                r->seq[n] = s;
                r->slot[n] = r->table[s * r->max_blocks + p / BE_KV_BLOCK] * BE_KV_BLOCK + p % BE_KV_BLOCK;
                if (p >= first && p <= ctx - 2) {
                    r->lrow[nl] = n;
                    r->ltgt[nl] = win[p + 1];
                    r->lseq[nl++] = s;
                }
            }
            r->seq_len[s] = c0 + len;
        }
        int32_t seg_begin[2] = {0, n};
        eng_batch bt = {
            .n_tok = n,
            .tokens = r->tok,
            .attn = {.n_tok = n, .n_seq = nw, .pos = r->pos, .tok_seq = r->seq, .slot = r->slot,
                     .seq_len = r->seq_len, .block_table = r->table, .max_blocks = r->max_blocks},
            .n_seg = ad[0] ? 1 : 0,
            .seg_begin = seg_begin,
            .seg_adapter = ad,
            .n_logits = nl,
            .logits_tok = r->lrow,
        };
        int rc = eng_forward(r->m, r->kv, &bt, r->logits);
        if (rc)
            return rc;
        for (int i = 0; i < nl; i++) {
            double v = ppl_nll(r->logits + (size_t)i * n_vocab, n_vocab, r->ltgt[i]);
            r->wnll[r->lseq[i]] += v;
            r->wnll2[r->lseq[i]] += v * v;
        }
    }
    return HY_OK;
}

/* Checks that need no model. Prints its own message; returns -1 on bad input. */
static int ppl_check_opts(const ppl_opts *o)
{
    if (o->batch < 1) {
        fprintf(stderr, "hydrad: --batch %d: must be at least 1\n", o->batch);
        return -1;
    }
    if (o->chunks == 0) {
        fprintf(stderr, "hydrad: --chunks 0: nothing to score (leave it out to score every window)\n");
        return -1;
    }
    if (o->ctx < PPL_MIN_CTX) {
        fprintf(stderr, "hydrad: --ctx %d: must be at least %d\n", o->ctx, PPL_MIN_CTX);
        return -1;
    }
    return 0;
}

/* Load the model, check --ctx against it, load the adapter, tokenise the text.
 * Returns the exit code for a failure (2 bad input or model, 1 device/memory), 0 on success. */
static int ppl_setup(const ppl_opts *o, ppl_run *r, size_t text_len)
{
    int rc;
    if ((rc = gguf_open(o->model, &r->f)) || (rc = tok_load(r->f, &r->v)) ||
        (rc = cli_backend(o->device, o->threads, &r->b)) || (rc = eng_model_load(r->f, r->b, &r->m))) {
        fprintf(stderr, "hydrad: %s: %s\n", o->model, hy_err_msg());
        return rc == HY_EDEVICE || rc == HY_ENOMEM ? 1 : 2;
    }
    int n_ctx_train = eng_model_hparams(r->m)->n_ctx_train;
    if (o->ctx > n_ctx_train) {
        fprintf(stderr, "hydrad: --ctx %d: must be between %d and the model's context of %d\n", o->ctx,
                PPL_MIN_CTX, n_ctx_train);
        return 2;
    }
    if (cli_adapter(o->adapter, o->adapter_scale, r->m, r->b, &r->ad))
        return 2;
    if (tok_encode(r->v, r->text, text_len, false, tok_add_bos(r->v), &r->ids, &r->n_ids)) {
        fprintf(stderr, "hydrad: %s: %s\n", o->file, hy_err_msg());
        return 2;
    }
    if (r->n_ids < 2 * o->ctx) {
        fprintf(stderr, "hydrad: %s: you need at least %d tokens to evaluate perplexity with a context "
                "of %d; the file tokenizes to only %d tokens\n", o->file, 2 * o->ctx, o->ctx, r->n_ids);
        return 2;
    }
    return 0;
}

/* Score every window, printing llama-perplexity's running estimates to stdout and a progress
 * line per window to stderr. */
static int ppl_score(const ppl_opts *o, ppl_run *r, int n_win)
{
    const int ctx = o->ctx, n_vocab = eng_model_hparams(r->m)->n_vocab, n_score = ctx - 1 - ctx / 2;
    double nll = 0.0, nll2 = 0.0, t_all = 0.0;
    long long count = 0;
    for (int w0 = 0; w0 < n_win; w0 += r->n_seq) {
        int nw = HY_MIN(r->n_seq, n_win - w0);
        double t0 = hy_now();
        int rc = ppl_windows(r, w0, nw, ctx, n_vocab);
        if (rc) {
            fprintf(stderr, "hydrad: %s\n", hy_err_msg());
            return 1;
        }
        double dt = hy_now() - t0;
        t_all += dt;
        for (int s = 0; s < nw; s++) {
            nll += r->wnll[s];
            nll2 += r->wnll2[s];
            count += n_score;
            printf("[%d]%.4f,", w0 + s + 1, exp(nll / (double)count));
            fflush(stdout);
            fprintf(stderr, "hydrad: perplexity: window %d/%d: %.1f tok/s, running PPL %.4f\n",
                    w0 + s + 1, n_win, nw * ctx / dt, exp(nll / (double)count));
        }
    }
    double mean = nll / (double)count, var = nll2 / (double)count - mean * mean;
    double ppl = exp(mean);
    printf("\n");
    if (var > 0)
        printf("Final estimate: PPL = %.4f +/- %.5f\n", ppl, sqrt(var / (double)(count - 1)) * ppl);
    else
        printf("Final estimate: PPL = %.4f (no spread: every token scored alike)\n", ppl);
    char thr[32] = "all cores";
    if (o->threads > 0)
        snprintf(thr, sizeof thr, "%d threads", o->threads);
    fprintf(stderr, "hydrad: perplexity: %d windows of %d tokens in %.3f s: %.1f tok/s evaluated, "
            "%.1f tok/s scored (%lld scored); batch %d x %d; backend %s, %s\n", n_win, ctx, t_all,
            (double)n_win * ctx / t_all, (double)count / t_all, count, r->n_seq, r->chunk,
            r->b->ops->name, thr);
    return 0;
}

int cli_perplexity(int argc, char **argv)
{
    ppl_opts o = {.ctx = 512, .batch = 512, .chunks = -1, .adapter_scale = 1.0f, .device = "auto"};
    if (cli_parse("perplexity", argc, argv, ppl_table, HY_ARRAY_LEN(ppl_table), &o))
        return 2;
    if (o.help) {
        ppl_usage(stdout);
        return 0;
    }
    if (!o.model || !o.file) {
        ppl_usage(stderr);
        return 2;
    }
    if (ppl_check_opts(&o))
        return 2;
    ppl_run r = {0};
    size_t len = 0;
    int exit_code = 2;
    if (ppl_read(o.file, &r.text, &len))
        goto out;
    if (len == 0) {
        fprintf(stderr, "hydrad: %s: the file is empty\n", o.file);
        goto out;
    }
    if (r.text[len - 1] == '\n') /* as llama.cpp's -f */
        r.text[--len] = '\0';
    if ((exit_code = ppl_setup(&o, &r, len)))
        goto out;
    int n_win = r.n_ids / o.ctx;
    if (o.chunks > 0)
        n_win = HY_MIN(n_win, o.chunks);
    r.n_seq = HY_MIN(HY_MAX(1, o.batch / o.ctx), n_win);
    r.chunk = HY_MIN(o.batch, o.ctx);
    exit_code = 1;
    if (ppl_alloc(&r, o.ctx, eng_model_hparams(r.m)->n_vocab)) {
        fprintf(stderr, "hydrad: %s\n", hy_err_msg());
        goto out;
    }
    fprintf(stderr, "hydrad: perplexity: %s: %d tokens, %d windows of %d (positions %d..%d scored), BOS %s\n",
            o.file, r.n_ids, n_win, o.ctx, o.ctx / 2 + 1, o.ctx - 1,
            tok_add_bos(r.v) && tok_bos(r.v) >= 0 ? "first in every window" : "not added (the model's setting)");
    exit_code = ppl_score(&o, &r, n_win);
out:
    ppl_free(&r);
    return exit_code;
}
