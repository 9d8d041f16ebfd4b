/* mkmodel.c - llama GGUFs of a known shape with seeded random weights (so GPU machines can make
 * their inputs locally; nothing large travels) and a tokenizer section copied from a source GGUF or
 * built in (256 byte tokens + specials). It never loads a model for inference; the `hydrad mkmodel`
 * command (argv, usage, messages) is server/cli_mkmodel.c. */
#include "mkmodel.h"

#include "gguf_write.h"

#include "gguf.h"
#include "hy.h"
#include "quant.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const mkmodel_shape mk_shapes[] = {
    {"smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, 100000.0f},
    {"llama-1b", 16, 2048, 32, 8, 8192, 128256, 8192, 500000.0f},
    {"tiny", 2, 128, 4, 2, 256, 512, 2048, 10000.0f},
};

/* ---- seeded random numbers: splitmix64, one independent stream per tensor ---- */

static uint64_t mk_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1) */
static float mk_unif(uint64_t *s) { return (float)((double)(mk_next(s) >> 11) * 0x1p-52 - 1.0); }

/* std-dev `sd` noise with a uniform distribution (cheap; the model only needs the scale) */
static void mk_fill(float *x, size_t n, float sd, float mean, uint64_t seed)
{
    uint64_t s = seed;
    const float a = sd * 1.7320508f; /* U(-a, a) has std a / sqrt(3) */
    for (size_t i = 0; i < n; i++)
        x[i] = mean + a * mk_unif(&s);
}

static uint64_t mk_seed(uint64_t seed, uint64_t tensor)
{
    uint64_t s = seed * 0x100000001b3ull ^ (tensor + 1) * 0x9e3779b97f4a7c15ull;
    return mk_next(&s);
}

/* ---- tokenizer ---- */

/* GPT-2 byte-level alphabet: byte b is written as the code point cp[b], UTF-8 encoded. */
static void mk_byte_token(int b, char out[4])
{
    int cp, n = 0;
    if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) {
        cp = b;
    } else {
        /* the bytes not in the printable ranges, in order, map to 256, 257, ... */
        for (int c = 0; c < b; c++)
            if (!((c >= '!' && c <= '~') || (c >= 0xa1 && c <= 0xac) || (c >= 0xae && c <= 0xff)))
                n++;
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        out[2] = 0;
    }
}

static const char mk_chatml[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/* tokens/types/scores of n_vocab entries: src (may be NULL) first, then padding. */
static int mk_vocab_arrays(gguf_w *w, const gguf_file *src, int n_vocab)
{
    int rc = HY_OK;
    char **tok = calloc((size_t)n_vocab, sizeof *tok);
    int32_t *type = calloc((size_t)n_vocab, sizeof *type);
    float *score = calloc((size_t)n_vocab, sizeof *score);
    gguf_arr st = {0}, stt = {0}, ssc = {0};
    int n_src = 0;
    if (!tok || !type || !score) {
        rc = hy_err_set(HY_ENOMEM, "out of memory (vocabulary)");
        goto done;
    }
    if (src) {
        if (gguf_get_arr(src, "tokenizer.ggml.tokens", &st) || st.elem != GGUF_VT_STRING) {
            rc = hy_err_set(HY_EFORMAT, "vocabulary source has no tokenizer.ggml.tokens");
            goto done;
        }
        n_src = (int)st.n;
        bool has_tt = !gguf_get_arr(src, "tokenizer.ggml.token_type", &stt) && stt.n == st.n &&
                      (stt.elem == GGUF_VT_I32 || stt.elem == GGUF_VT_U32);
        bool has_sc = !gguf_get_arr(src, "tokenizer.ggml.scores", &ssc) && ssc.n == st.n &&
                      ssc.elem == GGUF_VT_F32;
        for (int i = 0; i < n_src; i++) {
            tok[i] = strndup(st.strs[i].ptr, (size_t)st.strs[i].len);
            if (!tok[i]) {
                rc = hy_err_set(HY_ENOMEM, "out of memory (vocabulary)");
                goto done;
            }
            type[i] = 1;
            if (has_tt)
                memcpy(&type[i], (const char *)stt.data + 4 * (size_t)i, 4);
            if (has_sc)
                memcpy(&score[i], (const char *)ssc.data + 4 * (size_t)i, 4);
        }
    } else {
        static const char *const specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
        for (int i = 0; i < 3; i++) {
            tok[i] = strdup(specials[i]);
            type[i] = 3; /* control */
        }
        for (int b = 0; b < 256; b++) {
            char s[4];
            mk_byte_token(b, s);
            tok[3 + b] = strdup(s);
            type[3 + b] = 1; /* normal: byte-level BPE spells bytes this way */
        }
        n_src = 259;
        for (int i = 0; i < n_src; i++)
            if (!tok[i]) {
                rc = hy_err_set(HY_ENOMEM, "out of memory (vocabulary)");
                goto done;
            }
    }
    for (int i = n_src; i < n_vocab; i++) {
        char s[48];
        snprintf(s, sizeof s, "<|reserved_%d|>", i);
        tok[i] = strdup(s);
        type[i] = 3;
        if (!tok[i]) {
            rc = hy_err_set(HY_ENOMEM, "out of memory (vocabulary)");
            goto done;
        }
    }
    if ((rc = gguf_w_kv_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tok, (uint64_t)n_vocab)) ||
        (rc = gguf_w_kv_arr_i32(w, "tokenizer.ggml.token_type", type, (uint64_t)n_vocab)) ||
        (rc = gguf_w_kv_arr_f32(w, "tokenizer.ggml.scores", score, (uint64_t)n_vocab)))
        goto done;
done:
    if (tok)
        for (int i = 0; i < n_vocab; i++)
            free(tok[i]);
    free(tok);
    free(type);
    free(score);
    return rc;
}

/* The tokenizer section: copied from src (every tokenizer.* key, the vocabulary padded to
 * n_vocab) or the built-in byte vocabulary. */
static int mk_tokenizer(gguf_w *w, const gguf_file *src, int n_vocab)
{
    int rc;
    if (!src) {
        const char *const no_merges[1] = {""};
        if ((rc = gguf_w_kv_str(w, "tokenizer.ggml.model", "gpt2")) ||
            (rc = gguf_w_kv_str(w, "tokenizer.ggml.pre", "gpt2")) ||
            (rc = mk_vocab_arrays(w, NULL, n_vocab)) ||
            (rc = gguf_w_kv_arr_str(w, "tokenizer.ggml.merges", no_merges, 0)) ||
            (rc = gguf_w_kv_u32(w, "tokenizer.ggml.bos_token_id", 1)) ||
            (rc = gguf_w_kv_u32(w, "tokenizer.ggml.eos_token_id", 2)) ||
            (rc = gguf_w_kv_u32(w, "tokenizer.ggml.unknown_token_id", 0)) ||
            (rc = gguf_w_kv_u32(w, "tokenizer.ggml.padding_token_id", 2)) ||
            (rc = gguf_w_kv_bool(w, "tokenizer.ggml.add_bos_token", false)) ||
            (rc = gguf_w_kv_str(w, "tokenizer.chat_template", mk_chatml)))
            return rc;
        return HY_OK;
    }
    if ((rc = mk_vocab_arrays(w, src, n_vocab)))
        return rc;
    for (uint64_t i = 0; i < gguf_n_kv(src); i++) {
        const gguf_kv *kv = gguf_kv_at(src, i);
        if (kv->key.len < 10 || memcmp(kv->key.ptr, "tokenizer.", 10))
            continue;
        if (gguf_str_eq(kv->key, "tokenizer.ggml.tokens") || gguf_str_eq(kv->key, "tokenizer.ggml.token_type") ||
            gguf_str_eq(kv->key, "tokenizer.ggml.scores"))
            continue;
        if ((rc = gguf_w_kv_copy(w, kv)))
            return rc;
    }
    return HY_OK;
}

/* ---- tensors ---- */

typedef struct {
    char name[64];
    uint64_t ne[2];
    int n_dims;
    uint32_t type;
    float sd, mean; /* weights ~ mean + sd * U(-sqrt3, sqrt3) */
} mk_tensor;

static int mk_list(const mkmodel_shape *s, uint32_t type, mk_tensor **out, int *n_out)
{
    int n = 2 + 9 * s->n_layer, k = 0;
    mk_tensor *t = calloc((size_t)n, sizeof *t);
    if (!t)
        return hy_err_set(HY_ENOMEM, "out of memory");
    const int hd = s->n_embd / s->n_head, q = s->n_head * hd, kv = s->n_head_kv * hd;
#define MK_T(NAME, NE0, NE1, ND, TYPE, SD, MEAN)                                                   \
    do {                                                                                           \
        mk_tensor *x_ = &t[k++];                                                                   \
        snprintf(x_->name, sizeof x_->name, "%s", NAME);                                           \
        x_->ne[0] = (NE0);                                                                         \
        x_->ne[1] = (NE1);                                                                         \
        x_->n_dims = (ND);                                                                         \
        x_->type = (TYPE);                                                                         \
        x_->sd = (SD);                                                                             \
        x_->mean = (MEAN);                                                                         \
    } while (0)
    MK_T("token_embd.weight", s->n_embd, s->n_vocab, 2, type, 0.02f, 0.0f);
    MK_T("output_norm.weight", s->n_embd, 1, 1, Q_F32, 0.05f, 1.0f);
    for (int il = 0; il < s->n_layer; il++) {
        char nm[64];
#define MK_L(SUFFIX, NE0, NE1, ND, TYPE, SD, MEAN)                                                 \
    do {                                                                                           \
        snprintf(nm, sizeof nm, "blk.%d.%s", il, SUFFIX);                                          \
        MK_T(nm, NE0, NE1, ND, TYPE, SD, MEAN);                                                    \
    } while (0)
        MK_L("attn_norm.weight", s->n_embd, 1, 1, Q_F32, 0.05f, 1.0f);
        MK_L("attn_q.weight", s->n_embd, q, 2, type, 0.02f, 0.0f);
        MK_L("attn_k.weight", s->n_embd, kv, 2, type, 0.02f, 0.0f);
        MK_L("attn_v.weight", s->n_embd, kv, 2, type, 0.02f, 0.0f);
        MK_L("attn_output.weight", q, s->n_embd, 2, type, 0.02f, 0.0f);
        MK_L("ffn_norm.weight", s->n_embd, 1, 1, Q_F32, 0.05f, 1.0f);
        MK_L("ffn_gate.weight", s->n_embd, s->n_ff, 2, type, 0.02f, 0.0f);
        MK_L("ffn_up.weight", s->n_embd, s->n_ff, 2, type, 0.02f, 0.0f);
        MK_L("ffn_down.weight", s->n_ff, s->n_embd, 2, type, 0.02f, 0.0f);
#undef MK_L
    }
#undef MK_T
    *out = t;
    *n_out = k;
    return HY_OK;
}

/* Generate and write tensor i's data one row-block at a time (bounded memory). */
static int mk_write_tensor(gguf_w *w, const mk_tensor *t, uint64_t seed, uint64_t idx)
{
    const uint64_t cols = t->ne[0], rows = t->n_dims == 2 ? t->ne[1] : 1;
    size_t rb = 0;
    int rc = q_row_bytes(t->type, (int64_t)cols, &rb);
    if (rc)
        return rc;
    const size_t chunk_rows = 256;
    float *f = malloc(chunk_rows * cols * sizeof *f);
    uint8_t *all = NULL;
    const size_t total = gguf_w_tensor_bytes(w, idx);
    if (!f || !(all = malloc(total))) {
        rc = hy_err_set(HY_ENOMEM, "out of memory writing %s (%zu bytes)", t->name, total);
        goto done;
    }
    for (uint64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
        const uint64_t nr = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
        /* one stream per row block keeps the values independent of the chunking order */
        mk_fill(f, nr * cols, t->sd, t->mean, mk_seed(seed, idx * 1000003ull + r0 / chunk_rows));
        for (uint64_t r = 0; r < nr; r++)
            if ((rc = gguf_w_quantize(t->type, f + r * cols, all + (r0 + r) * rb, (int64_t)cols)))
                goto done;
    }
    rc = gguf_w_tensor_data(w, all, total);
done:
    free(f);
    free(all);
    return rc;
}

const mkmodel_shape *mkmodel_shape_find(const char *name)
{
    for (size_t i = 0; name && i < HY_ARRAY_LEN(mk_shapes); i++)
        if (!strcmp(name, mk_shapes[i].name))
            return &mk_shapes[i];
    return NULL;
}

int mkmodel_parse_type(const char *s, uint32_t *t)
{
    if (!strcmp(s, "q4_1")) *t = Q_Q4_1;
    else if (!strcmp(s, "q4_0")) *t = Q_Q4_0;
    else if (!strcmp(s, "q8_0")) *t = Q_Q8_0;
    else if (!strcmp(s, "f16")) *t = Q_F16;
    else if (!strcmp(s, "f32")) *t = Q_F32;
    else return HY_EINVAL;
    return HY_OK;
}

int mkmodel_write(const mkmodel_shape *shape0, uint32_t type, uint64_t seed, int layers, const char *vocab,
                  bool vocab_explicit, const char *path)
{
    mkmodel_shape s = *shape0;
    gguf_file *src = NULL;
    gguf_w *w = NULL;
    mk_tensor *t = NULL;
    int n_t = 0, rc;
    if (layers > 0)
        s.n_layer = layers;
    if (vocab && strcmp(vocab, "none")) {
        if (access(vocab, R_OK) == 0) {
            if ((rc = gguf_open(vocab, &src)))
                return hy_err_wrap(rc, "--vocab-from %s", vocab);
        } else if (vocab_explicit) {
            return hy_err_set(HY_EIO, "--vocab-from %s: cannot read it", vocab);
        }
    }
    if (src) {
        gguf_arr a;
        if (gguf_get_arr(src, "tokenizer.ggml.tokens", &a) == HY_OK && a.n > (uint64_t)s.n_vocab)
            s.n_vocab = (int)a.n; /* a smaller shape still needs every source token */
    }
    if ((rc = gguf_w_create(&w)) || (rc = mk_list(&s, type, &t, &n_t)))
        goto done;
    char gname[96];
    snprintf(gname, sizeof gname, "hydrad mkmodel %s (seed %llu, random weights)", s.name,
             (unsigned long long)seed);
    const int hd = s.n_embd / s.n_head;
    if ((rc = gguf_w_kv_str(w, "general.architecture", "llama")) ||
        (rc = gguf_w_kv_str(w, "general.name", gname)) ||
        (rc = gguf_w_kv_u32(w, "general.alignment", 32)) ||
        (rc = gguf_w_kv_u32(w, "llama.context_length", (uint32_t)s.n_ctx)) ||
        (rc = gguf_w_kv_u32(w, "llama.embedding_length", (uint32_t)s.n_embd)) ||
        (rc = gguf_w_kv_u32(w, "llama.block_count", (uint32_t)s.n_layer)) ||
        (rc = gguf_w_kv_u32(w, "llama.feed_forward_length", (uint32_t)s.n_ff)) ||
        (rc = gguf_w_kv_u32(w, "llama.rope.dimension_count", (uint32_t)hd)) ||
        (rc = gguf_w_kv_u32(w, "llama.attention.head_count", (uint32_t)s.n_head)) ||
        (rc = gguf_w_kv_u32(w, "llama.attention.head_count_kv", (uint32_t)s.n_head_kv)) ||
        (rc = gguf_w_kv_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f)) ||
        (rc = gguf_w_kv_f32(w, "llama.rope.freq_base", s.theta)) ||
        (rc = gguf_w_kv_u32(w, "llama.vocab_size", (uint32_t)s.n_vocab)) ||
        (rc = mk_tokenizer(w, src, s.n_vocab)))
        goto done;
    for (int i = 0; i < n_t; i++)
        if ((rc = gguf_w_add_tensor(w, t[i].name, (uint32_t)t[i].n_dims, t[i].ne, t[i].type)))
            goto done;
    if ((rc = gguf_w_begin(w, path)))
        goto done;
    for (int i = 0; i < n_t; i++)
        if ((rc = mk_write_tensor(w, &t[i], seed, (uint64_t)i)))
            goto done;
    rc = gguf_w_finish(w);
done:
    gguf_w_free(w); /* removes the file if it was not finished */
    gguf_close(src);
    free(t);
    return rc;
}
