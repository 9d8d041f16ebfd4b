/* model.c - the llama-architecture model: hyper-parameters and weights from GGUF, the paged KV
 * cache and the batched forward pass, written once against backend.h (llama2.c's run.c shape:
 * config, weights, run state, build/free, then the forward as plain steps).
 * It does not schedule, sample or tokenize, and never touches memory behind the backend's back. */
#include "model.h"
#include "hy.h"
#include "quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const eng_proj_names[ENG_N_PROJ] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
};

#define ENG_MAX_LAYERS 1024
#define ENG_MAX_HEAD_DIM 512

/* ------------------------------------------------------------------ structs */

typedef struct {
    float *attn_norm, *ffn_norm; /* device [n_embd] */
    be_weight *w[ENG_N_PROJ];    /* q, k, v, o, gate, up, down */
} eng_layer;

/* Activations of one step, device memory, sized for the largest batch seen. */
typedef struct {
    int cap_tok, cap_logits;
    float *x;      /* [n_tok][n_embd] residual stream */
    float *xb;     /* [n_tok][n_embd] the normed input of q/k/v and of gate/up */
    float *q;      /* [n_tok][n_head * head_dim] */
    float *k, *v;  /* [n_tok][n_head_kv * head_dim] */
    float *att;    /* [n_tok][n_head * head_dim] attention output */
    float *hb;     /* [n_tok][n_ff] gate */
    float *hb2;    /* [n_tok][n_ff] up */
    float *hs;     /* [n_tok][n_ff] silu(gate) * up, the down projection's input */
    float *xg;     /* [n_logits][n_embd] final-normed rows whose logits are wanted */
    float *lg;     /* [n_logits][n_vocab] */
    /* host scratch */
    be_lora_seg *segs; /* BE_MM_MAX * cap_seg: a call's projection p at p * (its n_seg) */
    int cap_seg;
    int32_t *hpos, *hseq, *hslot; /* [cap_host] eng_forward_seq metadata */
    int cap_host;
    uint8_t *key; /* [cap_key] the step key for ops->step_begin */
    size_t cap_key;
} eng_run;

struct eng_model {
    eng_hparams hp;
    be *b;
    const gguf_file *f;
    be_weight *tok_embd;
    be_weight *output;  /* == tok_embd when tied */
    float *output_norm; /* device [n_embd] */
    eng_layer *layers;  /* [n_layer] */
    float *rope_freq;   /* host [head_dim / 2], includes theta and any scaling */
    eng_run run;
};

struct eng_kv {
    eng_model *m;
    int n_blocks;
    void **k, **v;       /* [n_layer] device, from ops->kv_alloc */
    int32_t *ident;      /* [n_blocks] host block table 0, 1, 2, ... for eng_forward_seq */
};

/* ------------------------------------------------------------------ hyper-parameters */

static int eng_get_int(const gguf_file *f, const char *key, int def, bool required, int *out)
{
    uint32_t u;
    int rc = gguf_get_u32(f, key, &u);
    if (rc == HY_ENOTFOUND && !required) {
        *out = def;
        return HY_OK;
    }
    if (rc == HY_ENOTFOUND)
        return hy_err_set(HY_EFORMAT, "missing metadata key %s", key);
    if (rc || u > INT32_MAX)
        return hy_err_set(HY_EFORMAT, "metadata key %s is not a valid count", key);
    *out = (int)u;
    return HY_OK;
}

static int eng_get_float(const gguf_file *f, const char *key, float def, float *out)
{
    int rc = gguf_get_f32(f, key, out);
    if (rc == HY_ENOTFOUND) {
        *out = def;
        return HY_OK;
    }
    if (rc || !isfinite(*out))
        return hy_err_set(HY_EFORMAT, "metadata key %s is not a valid number", key);
    return HY_OK;
}

static int eng_load_hparams(const gguf_file *f, eng_hparams *hp)
{
    gguf_str arch;
    if (gguf_get_str(f, "general.architecture", &arch))
        return hy_err_set(HY_EFORMAT, "missing metadata key general.architecture");
    if (!gguf_str_eq(arch, "llama"))
        return hy_err_set(HY_EUNSUPPORTED, "unsupported architecture \"%.*s\" (only llama is supported)",
                          (int)HY_MIN(arch.len, 64), arch.ptr);
    memset(hp, 0, sizeof *hp);
    int rope_dim = 0, key_len = 0;
    int rc;
    if ((rc = eng_get_int(f, "llama.block_count", 0, true, &hp->n_layer)) ||
        (rc = eng_get_int(f, "llama.embedding_length", 0, true, &hp->n_embd)) ||
        (rc = eng_get_int(f, "llama.feed_forward_length", 0, true, &hp->n_ff)) ||
        (rc = eng_get_int(f, "llama.attention.head_count", 0, true, &hp->n_head)) ||
        (rc = eng_get_int(f, "llama.attention.head_count_kv", hp->n_head, false, &hp->n_head_kv)) ||
        (rc = eng_get_int(f, "llama.context_length", 2048, false, &hp->n_ctx_train)) ||
        (rc = eng_get_int(f, "llama.vocab_size", 0, false, &hp->n_vocab)) ||
        (rc = eng_get_int(f, "llama.attention.key_length", 0, false, &key_len)) ||
        (rc = eng_get_float(f, "llama.attention.layer_norm_rms_epsilon", 1e-5f, &hp->rms_eps)) ||
        (rc = eng_get_float(f, "llama.rope.freq_base", 10000.0f, &hp->rope_theta)))
        return rc;
    if (hp->n_layer < 1 || hp->n_layer > ENG_MAX_LAYERS || hp->n_embd < 1 || hp->n_ff < 1 ||
        hp->n_head < 1 || hp->n_head_kv < 1 || hp->n_head % hp->n_head_kv)
        return hy_err_set(HY_EFORMAT, "bad llama hyper-parameters (%d layers, embd %d, ff %d, "
                          "%d heads, %d kv heads)", hp->n_layer, hp->n_embd, hp->n_ff,
                          hp->n_head, hp->n_head_kv);
    if (key_len == 0 && hp->n_embd % hp->n_head)
        return hy_err_set(HY_EFORMAT, "embedding length %d is not a multiple of %d heads",
                          hp->n_embd, hp->n_head);
    hp->head_dim = key_len ? key_len : hp->n_embd / hp->n_head;
    if (hp->head_dim % 2 || hp->head_dim > ENG_MAX_HEAD_DIM)
        return hy_err_set(HY_EUNSUPPORTED, "head size %d is not supported (even, at most %d)",
                          hp->head_dim, ENG_MAX_HEAD_DIM);
    if ((rc = eng_get_int(f, "llama.rope.dimension_count", hp->head_dim, false, &rope_dim)))
        return rc;
    if (rope_dim != hp->head_dim)
        return hy_err_set(HY_EUNSUPPORTED, "partial RoPE (%d of %d dimensions) is not supported",
                          rope_dim, hp->head_dim);
    if (hp->rms_eps <= 0 || hp->rope_theta <= 0)
        return hy_err_set(HY_EFORMAT, "bad rms_norm_eps or rope freq_base");
    return HY_OK;
}

/* freq[i] = theta^(-2i/d), then the file's RoPE scaling: a rope_freqs tensor (divisors, as
 * llama.cpp's converter writes for Llama 3.1+), "llama3" computed from its factors, or linear. */
static int eng_rope_freqs(const gguf_file *f, eng_hparams *hp, float *freq)
{
    int half = hp->head_dim / 2, rc;
    for (int i = 0; i < half; i++)
        freq[i] = (float)pow((double)hp->rope_theta, -2.0 * i / hp->head_dim);
    gguf_str type = {0};
    bool has_type = gguf_get_str(f, "llama.rope.scaling.type", &type) == HY_OK;
    float factor;
    if ((rc = eng_get_float(f, "llama.rope.scaling.factor", 0.0f, &factor)) ||
        (rc = eng_get_float(f, "llama.rope.scaling.low_freq_factor", 1.0f, &hp->rope_low_freq)) ||
        (rc = eng_get_float(f, "llama.rope.scaling.high_freq_factor", 4.0f, &hp->rope_high_freq)) ||
        (rc = eng_get_int(f, "llama.rope.scaling.original_context_length", 8192, false,
                          &hp->rope_orig_ctx)))
        return rc;
    const gguf_tensor *rf = gguf_find_tensor(f, "rope_freqs.weight");
    if (rf) {
        if (rf->type != Q_F32 || rf->ne[0] != (uint64_t)half || rf->ne[1] != 1)
            return hy_err_set(HY_EFORMAT, "tensor rope_freqs.weight must be F32 [%d]", half);
        const uint8_t *d = rf->data;
        for (int i = 0; i < half; i++) {
            float div;
            memcpy(&div, d + 4 * i, 4);
            if (!(div > 0) || !isfinite(div))
                return hy_err_set(HY_EFORMAT, "tensor rope_freqs.weight holds a bad factor");
            freq[i] /= div;
        }
        hp->rope_factor = factor > 0 ? factor : 1.0f;
        return HY_OK;
    }
    if (!has_type || gguf_str_eq(type, "none") || factor == 0.0f || factor == 1.0f) {
        hp->rope_factor = 0;
        return HY_OK;
    }
    if (!(factor > 0))
        return hy_err_set(HY_EFORMAT, "bad llama.rope.scaling.factor %g", factor);
    hp->rope_factor = factor;
    if (gguf_str_eq(type, "linear")) {
        for (int i = 0; i < half; i++)
            freq[i] /= factor;
        return HY_OK;
    }
    if (gguf_str_eq(type, "llama3")) {
        double lo = hp->rope_low_freq, hi = hp->rope_high_freq, orig = hp->rope_orig_ctx;
        if (!(hi > lo) || orig <= 0)
            return hy_err_set(HY_EFORMAT, "bad llama3 rope scaling factors");
        for (int i = 0; i < half; i++) {
            double wavelen = 2 * M_PI / freq[i];
            if (wavelen < orig / hi)
                continue;
            if (wavelen > orig / lo) {
                freq[i] = (float)(freq[i] / factor);
                continue;
            }
            double smooth = (orig / wavelen - lo) / (hi - lo);
            freq[i] = (float)((1 - smooth) * freq[i] / factor + smooth * freq[i]);
        }
        return HY_OK;
    }
    return hy_err_set(HY_EUNSUPPORTED, "RoPE scaling type \"%.*s\" is not supported",
                      (int)HY_MIN(type.len, 64), type.ptr);
}

/* ------------------------------------------------------------------ weights */

static int eng_find(const gguf_file *f, const char *name, const gguf_tensor **out)
{
    *out = gguf_find_tensor(f, name);
    if (!*out)
        return hy_err_set(HY_ENOTFOUND, "missing tensor \"%s\"", name);
    return HY_OK;
}

/* A matrix `rows` x `cols` (GGUF ne = [cols, rows]) onto the backend. */
static int eng_load_matrix(eng_model *m, const char *name, int64_t rows, int64_t cols,
                           be_weight **out)
{
    const gguf_tensor *t;
    int rc = eng_find(m->f, name, &t);
    if (rc)
        return rc;
    if (t->ne[0] != (uint64_t)cols || t->ne[1] != (uint64_t)rows || t->ne[2] != 1 || t->ne[3] != 1)
        return hy_err_set(HY_EFORMAT, "tensor \"%s\" has shape [%llu, %llu, %llu, %llu], expected "
                          "[%lld, %lld]", name, (unsigned long long)t->ne[0],
                          (unsigned long long)t->ne[1], (unsigned long long)t->ne[2],
                          (unsigned long long)t->ne[3], (long long)cols, (long long)rows);
    if (!q_supported(t->type))
        return hy_err_set(HY_EUNSUPPORTED, "tensor \"%s\" has unsupported type %s", name,
                          q_type_name(t->type));
    size_t rb, need;
    if (q_row_bytes(t->type, cols, &rb) || hy_mul_size(rb, (size_t)rows, &need) || need > t->nbytes)
        return hy_err_set(HY_EFORMAT, "tensor \"%s\": data size does not match its shape", name);
    rc = m->b->ops->weight_create(m->b, t->type, rows, cols, t->data, out);
    if (rc)
        return hy_err_wrap(rc, "tensor \"%s\"", name);
    return HY_OK;
}

/* A vector of n floats (F32/F16/BF16 in the file) into device memory. */
static int eng_load_vector(eng_model *m, const char *name, int64_t n, float **out)
{
    const gguf_tensor *t;
    int rc = eng_find(m->f, name, &t);
    if (rc)
        return rc;
    if (t->ne[0] != (uint64_t)n || t->ne[1] != 1 || t->ne[2] != 1 || t->ne[3] != 1)
        return hy_err_set(HY_EFORMAT, "tensor \"%s\" has shape [%llu, %llu], expected [%lld]", name,
                          (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (long long)n);
    if (t->type != Q_F32 && t->type != Q_F16 && t->type != Q_BF16)
        return hy_err_set(HY_EUNSUPPORTED, "tensor \"%s\" has unsupported type %s for a norm", name,
                          q_type_name(t->type));
    size_t esz = t->type == Q_F32 ? 4 : 2;
    if ((uint64_t)n * esz > t->nbytes)
        return hy_err_set(HY_EFORMAT, "tensor \"%s\" is truncated", name);
    float *host = malloc((size_t)n * sizeof *host);
    if (!host)
        return hy_err_set(HY_ENOMEM, "out of memory");
    q_dequant_row(t->type, t->data, host, n);
    be *b = m->b;
    rc = b->ops->alloc(b, (size_t)n * sizeof(float), (void **)out);
    if (!rc)
        rc = b->ops->upload(b, *out, host, (size_t)n * sizeof(float));
    free(host);
    return rc;
}

static int eng_load_layer(eng_model *m, int il)
{
    static const char *const suffix[ENG_N_PROJ] = {
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    };
    eng_layer *L = &m->layers[il];
    char name[96];
    int rc;
    snprintf(name, sizeof name, "blk.%d.attn_norm.weight", il);
    if ((rc = eng_load_vector(m, name, m->hp.n_embd, &L->attn_norm)))
        return rc;
    snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", il);
    if ((rc = eng_load_vector(m, name, m->hp.n_embd, &L->ffn_norm)))
        return rc;
    for (int p = 0; p < ENG_N_PROJ; p++) {
        int64_t in, out;
        eng_proj_dims(m, p, &in, &out);
        snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix[p]);
        if ((rc = eng_load_matrix(m, name, out, in, &L->w[p])))
            return rc;
    }
    return HY_OK;
}

int eng_model_load(const gguf_file *f, be *b, eng_model **out)
{
    *out = NULL;
    eng_model *m = calloc(1, sizeof *m);
    if (!m)
        return hy_err_set(HY_ENOMEM, "out of memory");
    m->f = f;
    m->b = b;
    int rc = eng_load_hparams(f, &m->hp);
    if (rc)
        goto fail;
    eng_hparams *hp = &m->hp;
    const gguf_tensor *te;
    if ((rc = eng_find(f, "token_embd.weight", &te)))
        goto fail;
    if (hp->n_vocab == 0)
        hp->n_vocab = te->ne[1] <= INT32_MAX ? (int)te->ne[1] : 0;
    if (hp->n_vocab < 1) {
        rc = hy_err_set(HY_EFORMAT, "bad vocabulary size");
        goto fail;
    }
    m->rope_freq = malloc(sizeof(float) * (size_t)(hp->head_dim / 2));
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->rope_freq || !m->layers) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = eng_rope_freqs(f, hp, m->rope_freq)))
        goto fail;
    if ((rc = eng_load_matrix(m, "token_embd.weight", hp->n_vocab, hp->n_embd, &m->tok_embd)))
        goto fail;
    if ((rc = eng_load_vector(m, "output_norm.weight", hp->n_embd, &m->output_norm)))
        goto fail;
    hp->tied_output = gguf_find_tensor(f, "output.weight") == NULL;
    if (hp->tied_output)
        m->output = m->tok_embd;
    else if ((rc = eng_load_matrix(m, "output.weight", hp->n_vocab, hp->n_embd, &m->output)))
        goto fail;
    for (int il = 0; il < hp->n_layer; il++)
        if ((rc = eng_load_layer(m, il)))
            goto fail;
    *out = m;
    return HY_OK;
fail:
    eng_model_free(m);
    return rc;
}

static void eng_run_free(eng_model *m)
{
    eng_run *r = &m->run;
    float **dev[] = {&r->x, &r->xb, &r->q, &r->k, &r->v, &r->att, &r->hb, &r->hb2, &r->hs, &r->xg, &r->lg};
    for (size_t i = 0; i < HY_ARRAY_LEN(dev); i++) {
        if (*dev[i])
            m->b->ops->free(m->b, *dev[i]);
        *dev[i] = NULL;
    }
    free(r->segs);
    free(r->hpos);
    free(r->hseq);
    free(r->hslot);
    free(r->key);
    memset(r, 0, sizeof *r);
}

void eng_model_free(eng_model *m)
{
    if (!m)
        return;
    const be_ops *ops = m->b->ops;
    eng_run_free(m);
    if (m->layers) {
        for (int il = 0; il < m->hp.n_layer; il++) {
            eng_layer *L = &m->layers[il];
            if (L->attn_norm)
                ops->free(m->b, L->attn_norm);
            if (L->ffn_norm)
                ops->free(m->b, L->ffn_norm);
            for (int p = 0; p < ENG_N_PROJ; p++)
                if (L->w[p])
                    ops->weight_free(m->b, L->w[p]);
        }
    }
    if (m->output && m->output != m->tok_embd)
        ops->weight_free(m->b, m->output);
    if (m->tok_embd)
        ops->weight_free(m->b, m->tok_embd);
    if (m->output_norm)
        ops->free(m->b, m->output_norm);
    free(m->layers);
    free(m->rope_freq);
    free(m);
}

const eng_hparams *eng_model_hparams(const eng_model *m) { return &m->hp; }
be *eng_model_backend(const eng_model *m) { return m->b; }

void eng_proj_dims(const eng_model *m, int proj, int64_t *in, int64_t *out)
{
    const eng_hparams *hp = &m->hp;
    int64_t q = (int64_t)hp->n_head * hp->head_dim, kv = (int64_t)hp->n_head_kv * hp->head_dim;
    switch (proj) {
    case ENG_Q: *in = hp->n_embd; *out = q; break;
    case ENG_K:
    case ENG_V: *in = hp->n_embd; *out = kv; break;
    case ENG_O: *in = q; *out = hp->n_embd; break;
    case ENG_GATE:
    case ENG_UP: *in = hp->n_embd; *out = hp->n_ff; break;
    case ENG_DOWN: *in = hp->n_ff; *out = hp->n_embd; break;
    default: *in = *out = 0; break;
    }
}

/* ------------------------------------------------------------------ KV cache */

int eng_kv_create(eng_model *m, int n_blocks, eng_kv **out)
{
    *out = NULL;
    if (n_blocks <= 0 || n_blocks > INT32_MAX / BE_KV_BLOCK)
        return hy_err_set(HY_EINVAL, "bad KV cache size of %d blocks", n_blocks);
    eng_kv *kv = calloc(1, sizeof *kv);
    int rc = HY_ENOMEM;
    if (!kv)
        return hy_err_set(HY_ENOMEM, "out of memory");
    kv->m = m;
    kv->n_blocks = n_blocks;
    kv->k = calloc((size_t)m->hp.n_layer, sizeof *kv->k);
    kv->v = calloc((size_t)m->hp.n_layer, sizeof *kv->v);
    kv->ident = malloc((size_t)n_blocks * sizeof *kv->ident);
    if (!kv->k || !kv->v || !kv->ident) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < n_blocks; i++)
        kv->ident[i] = i;
    for (int il = 0; il < m->hp.n_layer; il++) {
        rc = m->b->ops->kv_alloc(m->b, n_blocks, m->hp.n_head_kv, m->hp.head_dim, &kv->k[il],
                                 &kv->v[il]);
        if (rc)
            goto fail;
    }
    *out = kv;
    return HY_OK;
fail:
    eng_kv_free(kv);
    return rc;
}

void eng_kv_free(eng_kv *kv)
{
    if (!kv)
        return;
    be *b = kv->m->b;
    for (int il = 0; kv->k && kv->v && il < kv->m->hp.n_layer; il++) {
        if (kv->k[il])
            b->ops->free(b, kv->k[il]);
        if (kv->v[il])
            b->ops->free(b, kv->v[il]);
    }
    free(kv->k);
    free(kv->v);
    free(kv->ident);
    free(kv);
}

int eng_kv_blocks(const eng_kv *kv) { return kv->n_blocks; }

/* ------------------------------------------------------------------ run state */

static int eng_dev_buf(eng_model *m, float **p, size_t n_rows, size_t dim)
{
    size_t bytes;
    if (hy_mul_size(n_rows, dim, &bytes) || hy_mul_size(bytes, sizeof(float), &bytes))
        return HY_ELIMIT;
    if (*p)
        m->b->ops->free(m->b, *p);
    *p = NULL;
    return m->b->ops->alloc(m->b, bytes, (void **)p);
}

/* Grow the step buffers to n_tok tokens, n_logits logit rows and n_seg segments. */
static int eng_run_reserve(eng_model *m, int n_tok, int n_logits, int n_seg)
{
    eng_run *r = &m->run;
    const eng_hparams *hp = &m->hp;
    size_t qd = (size_t)hp->n_head * hp->head_dim, kvd = (size_t)hp->n_head_kv * hp->head_dim;
    int rc;
    if (n_tok > r->cap_tok) {
        size_t cap = ((size_t)n_tok + 15) & ~(size_t)15;
        if ((rc = eng_dev_buf(m, &r->x, cap, hp->n_embd)) ||
            (rc = eng_dev_buf(m, &r->xb, cap, hp->n_embd)) ||
            (rc = eng_dev_buf(m, &r->q, cap, qd)) || (rc = eng_dev_buf(m, &r->k, cap, kvd)) ||
            (rc = eng_dev_buf(m, &r->v, cap, kvd)) || (rc = eng_dev_buf(m, &r->att, cap, qd)) ||
            (rc = eng_dev_buf(m, &r->hb, cap, hp->n_ff)) ||
            (rc = eng_dev_buf(m, &r->hb2, cap, hp->n_ff)) ||
            (rc = eng_dev_buf(m, &r->hs, cap, hp->n_ff))) {
            r->cap_tok = 0;
            return rc;
        }
        r->cap_tok = (int)cap;
    }
    if (n_logits > r->cap_logits) {
        size_t cap = (size_t)n_logits;
        if ((rc = eng_dev_buf(m, &r->xg, cap, hp->n_embd)) ||
            (rc = eng_dev_buf(m, &r->lg, cap, hp->n_vocab))) {
            r->cap_logits = 0;
            return rc;
        }
        r->cap_logits = (int)cap;
    }
    if (n_seg > r->cap_seg) { /* BE_MM_MAX projections' segments each */
        be_lora_seg *s = realloc(r->segs, (size_t)n_seg * BE_MM_MAX * sizeof *s);
        if (!s)
            return hy_err_set(HY_ENOMEM, "out of memory");
        r->segs = s;
        r->cap_seg = n_seg;
    }
    return HY_OK;
}

/* ------------------------------------------------------------------ forward */

static int eng_check_batch(const eng_model *m, const eng_kv *kv, const eng_batch *bt)
{
    const be_attn_meta *a = &bt->attn;
    if (bt->n_tok <= 0 || a->n_tok != bt->n_tok || a->n_seq <= 0 || a->max_blocks <= 0)
        return hy_err_set(HY_EINVAL, "empty or inconsistent batch");
    if (bt->n_logits < 0 || bt->n_logits > bt->n_tok)
        return hy_err_set(HY_EINVAL, "bad number of logit rows %d", bt->n_logits);
    for (int i = 0; i < bt->n_logits; i++)
        if (bt->logits_tok[i] < 0 || bt->logits_tok[i] >= bt->n_tok)
            return hy_err_set(HY_EINVAL, "logits requested for batch index %d", bt->logits_tok[i]);
    if (bt->n_seg < 0 || (bt->n_seg > 0 && (bt->seg_begin[0] != 0 ||
                                            bt->seg_begin[bt->n_seg] != bt->n_tok)))
        return hy_err_set(HY_EINVAL, "adapter segments do not cover the batch");
    for (int i = 0; i < bt->n_seg; i++)
        if (bt->seg_begin[i + 1] < bt->seg_begin[i])
            return hy_err_set(HY_EINVAL, "adapter segments are not sorted");
    int64_t n_slots = (int64_t)kv->n_blocks * BE_KV_BLOCK;
    for (int t = 0; t < bt->n_tok; t++) {
        int s = a->tok_seq[t];
        if (s < 0 || s >= a->n_seq || a->pos[t] < 0 || a->slot[t] < 0 || a->slot[t] >= n_slots ||
            a->pos[t] / BE_KV_BLOCK >= a->max_blocks)
            return hy_err_set(HY_EINVAL, "batch token %d: bad sequence, position or KV slot", t);
        bool last = t + 1 == bt->n_tok || a->tok_seq[t + 1] != s;
        if (!last)
            continue;
        /* the blocks this sequence reads must exist */
        const int32_t *row = a->block_table + (size_t)s * a->max_blocks;
        for (int blk = 0; blk <= a->pos[t] / BE_KV_BLOCK; blk++)
            if (row[blk] < 0 || row[blk] >= kv->n_blocks)
                return hy_err_set(HY_EINVAL, "sequence %d: KV block %d is out of range", s, row[blk]);
    }
    return HY_OK;
}

/* Member d of an adapter chain (eng_adapter.next), NULL past its end. */
static const eng_adapter *eng_member(const eng_adapter *ad, int d)
{
    while (ad && d-- > 0)
        ad = ad->next;
    return ad;
}

/* Each adapter segment's HydraLoRA terms for the n projections proj[i] of layer il (which read
 * the same x), added to y[i]: one hydra call per stack depth (a plain adapter is a chain of one,
 * so a batch without stacks makes one call). At depth d each segment runs its chain's member d,
 * scaled by that member's weight. */
static int eng_proj_lora(eng_model *m, const eng_batch *bt, int il, int n, const int *proj, const float *x,
                         float *const *y)
{
    be *b = m->b;
    if (bt->n_seg == 0)
        return HY_OK;
    for (int d = 0;; d++) {
        const be_lora_seg *segs[BE_MM_MAX];
        int64_t in = 0, out[BE_MM_MAX];
        int n_seg = 0;
        bool any = false, deeper = false;
        for (int p = 0; p < n; p++) {
            be_lora_seg *sp = m->run.segs + (size_t)p * bt->n_seg;
            int idx = il * ENG_N_PROJ + proj[p];
            n_seg = 0;
            for (int i = 0; i < bt->n_seg; i++) {
                const eng_adapter *ad = eng_member(bt->seg_adapter[i], d);
                if (!ad || bt->seg_begin[i] == bt->seg_begin[i + 1])
                    continue;
                deeper = deeper || ad->next;
                sp[n_seg] = (be_lora_seg){
                    .tok_begin = bt->seg_begin[i],
                    .tok_end = bt->seg_begin[i + 1],
                    .lora = ad->lora[idx], /* NULL: the adapter leaves this projection alone */
                    .stats = ad->stats && ad->lora[idx] ? ad->stats + (size_t)idx * (ad->K + 1) : NULL,
                    .ctl = ad->ctl,
                    .scale = ad->scale,
                };
                any = any || ad->lora[idx];
                n_seg++;
            }
            segs[p] = sp;
            eng_proj_dims(m, proj[p], &in, &out[p]);
        }
        int rc = any ? b->ops->hydra(b, n, x, in, y, out, segs, n_seg) : HY_OK;
        if (rc || !deeper)
            return rc;
    }
}

/* y[i] = W x' (add: y[i] += W x') for the n projections proj[i] of layer il that read the same
 * x' (one matmul_n; x' = x, or the transform of x that `in` names, stored in in->out), plus each
 * adapter segment's HydraLoRA terms of x'. */
static int eng_proj(eng_model *m, const eng_batch *bt, int il, int n, const int *proj, const float *x,
                    const be_mm_in *in, float *const *y, bool add)
{
    be *b = m->b;
    const be_weight *w[BE_MM_MAX];
    for (int i = 0; i < n; i++)
        w[i] = m->layers[il].w[proj[i]];
    int rc = b->ops->matmul_n(b, n, w, x, in, bt->n_tok, y, add);
    if (in && in->kind != BE_IN_X)
        x = in->out;
    return rc ? rc : eng_proj_lora(m, bt, il, n, proj, x, y);
}

static int eng_layer_forward(eng_model *m, eng_kv *kv, const eng_batch *bt, int il)
{
    be *b = m->b;
    const be_ops *ops = b->ops;
    const eng_hparams *hp = &m->hp;
    const eng_layer *L = &m->layers[il];
    eng_run *r = &m->run;
    int rc;
    static const int qkv[] = {ENG_Q, ENG_K, ENG_V}, o[] = {ENG_O}, gate_up[] = {ENG_GATE, ENG_UP},
                     down[] = {ENG_DOWN};

    /* Norms and the SwiGLU are input transforms of the projections after them, and the o and
     * down projections add into the residual stream x (a device runs each in one kernel). */
    const be_mm_in attn_in = {.kind = BE_IN_RMSNORM, .w = L->attn_norm, .eps = hp->rms_eps, .out = r->xb};
    const be_mm_in ffn_in = {.kind = BE_IN_RMSNORM, .w = L->ffn_norm, .eps = hp->rms_eps, .out = r->xb};
    const be_mm_in down_in = {.kind = BE_IN_SWIGLU, .up = r->hb2, .out = r->hs};
    if ((rc = eng_proj(m, bt, il, 3, qkv, r->x, &attn_in, (float *const[]){r->q, r->k, r->v}, false)) ||
        (rc = ops->attention(b, &bt->attn, r->q, r->k, r->v, kv->k[il], kv->v[il], hp->n_head,
                             hp->n_head_kv, hp->head_dim, m->rope_freq, r->att)) ||
        (rc = eng_proj(m, bt, il, 1, o, r->att, NULL, &r->x, true)) ||
        (rc = eng_proj(m, bt, il, 2, gate_up, r->x, &ffn_in, (float *const[]){r->hb, r->hb2}, false)) ||
        (rc = eng_proj(m, bt, il, 1, down, r->hb, &down_in, &r->x, true)))
        return rc;
    return HY_OK;
}

/* Final norm of the requested rows only (runs of consecutive indices in one call each), then
 * the output matrix into run.lg (the caller downloads it). */
static int eng_logits_ops(eng_model *m, const eng_batch *bt)
{
    be *b = m->b;
    const eng_hparams *hp = &m->hp;
    eng_run *r = &m->run;
    int rc;
    for (int i = 0; i < bt->n_logits;) {
        int j = i + 1;
        while (j < bt->n_logits && bt->logits_tok[j] == bt->logits_tok[j - 1] + 1)
            j++;
        rc = b->ops->rmsnorm(b, r->x + (size_t)bt->logits_tok[i] * hp->n_embd, m->output_norm,
                             j - i, hp->n_embd, hp->rms_eps, r->xg + (size_t)i * hp->n_embd);
        if (rc)
            return rc;
        i = j;
    }
    return b->ops->matmul(b, m->output, r->xg, bt->n_logits, r->lg);
}

/* Every op of a step, up to the logits on the device. */
static int eng_step_ops(eng_model *m, eng_kv *kv, const eng_batch *bt)
{
    be *b = m->b;
    int rc = b->ops->embed(b, m->tok_embd, bt->tokens, bt->n_tok, m->run.x);
    if (rc)
        return rc;
    for (int il = 0; il < m->hp.n_layer; il++)
        if ((rc = eng_layer_forward(m, kv, bt, il)))
            return hy_err_wrap(rc, "layer %d", il);
    return bt->n_logits ? eng_logits_ops(m, bt) : HY_OK;
}

/* The step key of backend.h's step_begin into m->run.key: what shapes the op calls of
 * eng_step_ops besides the metadata arrays' contents (the caches, the batch's sizes, which
 * rows get logits, the adapter segments with the stats buffers and router controls they pass,
 * whose values a recorded launch keeps). */
typedef struct {
    const float *stats;
    int has_ctl;
    be_gate_ctl ctl;
} eng_seg_key;

static int eng_step_key(eng_model *m, const eng_kv *kv, const eng_batch *bt, size_t *n)
{
    struct {
        const void *kv;
        int32_t n_tok, n_seq, max_blocks, n_logits, n_seg;
    } head;
    memset(&head, 0, sizeof head); /* padding bytes too: the key is compared bytewise */
    head.kv = kv;
    head.n_tok = bt->n_tok;
    head.n_seq = bt->attn.n_seq;
    head.max_blocks = bt->attn.max_blocks;
    head.n_logits = bt->n_logits;
    head.n_seg = bt->n_seg;
    size_t nl = (size_t)bt->n_logits * sizeof(int32_t);
    size_t ns = bt->n_seg ? (size_t)(bt->n_seg + 1) * sizeof(int32_t) : 0;
    size_t na = (size_t)bt->n_seg * sizeof(void *);
    size_t nc = (size_t)bt->n_seg * sizeof(eng_seg_key);
    size_t need = sizeof head + nl + ns + na + nc;
    eng_run *r = &m->run;
    if (need > r->cap_key) {
        uint8_t *k = realloc(r->key, need);
        if (!k)
            return hy_err_set(HY_ENOMEM, "out of memory (step key)");
        r->key = k;
        r->cap_key = need;
    }
    uint8_t *p = r->key;
    memcpy(p, &head, sizeof head);
    p += sizeof head;
    if (nl)
        memcpy(p, bt->logits_tok, nl);
    if (ns)
        memcpy(p + nl, bt->seg_begin, ns);
    if (na)
        memcpy(p + nl + ns, bt->seg_adapter, na);
    p += nl + ns + na;
    for (int i = 0; i < bt->n_seg; i++, p += sizeof(eng_seg_key)) {
        const eng_adapter *ad = bt->seg_adapter[i];
        eng_seg_key sk;
        memset(&sk, 0, sizeof sk);
        if (ad) {
            sk.stats = ad->stats;
            sk.has_ctl = ad->ctl != NULL;
            if (ad->ctl)
                sk.ctl = *ad->ctl;
        }
        memcpy(p, &sk, sizeof sk);
    }
    *n = need;
    return HY_OK;
}

int eng_forward(eng_model *m, eng_kv *kv, const eng_batch *bt, float *logits)
{
    int rc = eng_check_batch(m, kv, bt);
    if (rc)
        return rc;
    if ((rc = eng_run_reserve(m, bt->n_tok, bt->n_logits, bt->n_seg)))
        return rc;
    be *b = m->b;
    if (!b->ops->step_begin) {
        rc = eng_step_ops(m, kv, bt);
    } else {
        /* the metadata the ops read, in the order attention wants it contiguous */
        const be_attn_meta *a = &bt->attn;
        size_t tok = (size_t)bt->n_tok * sizeof(int32_t), key_n = 0;
        const be_span meta[5] = {{a->pos, tok}, {a->tok_seq, tok}, {a->slot, tok},
                                 {a->block_table, (size_t)a->n_seq * a->max_blocks * sizeof(int32_t)},
                                 {bt->tokens, tok}};
        bool replay = false, rerun = false;
        if ((rc = eng_step_key(m, kv, bt, &key_n)) ||
            (rc = b->ops->step_begin(b, m->run.key, key_n, meta, 5, &replay)))
            return rc;
        if (!replay)
            rc = eng_step_ops(m, kv, bt);
        int rc_end = b->ops->step_end(b, rc == HY_OK, &rerun);
        if (rerun) { /* the recording failed: nothing ran, errors from it are void */
            hy_err_clear();
            rc = eng_step_ops(m, kv, bt);
        } else if (rc == HY_OK) {
            rc = rc_end;
        }
    }
    if (rc || bt->n_logits == 0)
        return rc;
    return b->ops->download(b, logits, m->run.lg, (size_t)bt->n_logits * m->hp.n_vocab * sizeof(float));
}

int eng_forward_seq(eng_model *m, eng_kv *kv, const int32_t *tokens, int n, int start_pos,
                    int chunk, const eng_adapter *ad, float *logits)
{
    if (n <= 0 || start_pos < 0)
        return hy_err_set(HY_EINVAL, "nothing to run");
    if (chunk <= 0 || chunk > n)
        chunk = n;
    if ((int64_t)start_pos + n > (int64_t)kv->n_blocks * BE_KV_BLOCK)
        return hy_err_set(HY_ELIMIT, "context full: %d tokens do not fit in the KV cache of %d",
                          start_pos + n, kv->n_blocks * BE_KV_BLOCK);
    eng_run *r = &m->run;
    if (chunk > r->cap_host) {
        int32_t *p = malloc((size_t)chunk * sizeof *p), *s = malloc((size_t)chunk * sizeof *s);
        int32_t *sl = malloc((size_t)chunk * sizeof *sl);
        if (!p || !s || !sl) {
            free(p);
            free(s);
            free(sl);
            return hy_err_set(HY_ENOMEM, "out of memory");
        }
        free(r->hpos);
        free(r->hseq);
        free(r->hslot);
        r->hpos = p;
        r->hseq = s;
        r->hslot = sl;
        r->cap_host = chunk;
    }
    for (int c0 = 0; c0 < n; c0 += chunk) {
        int nt = HY_MIN(chunk, n - c0);
        for (int i = 0; i < nt; i++) {
            r->hpos[i] = start_pos + c0 + i;
            r->hslot[i] = r->hpos[i]; /* identity block table: slot == position */
            r->hseq[i] = 0;
        }
        int32_t seq_len = start_pos + c0 + nt, seg_begin[2] = {0, nt}, last = nt - 1;
        const eng_adapter *seg_ad[1] = {ad};
        eng_batch bt = {
            .n_tok = nt,
            .tokens = tokens + c0,
            .attn = {.n_tok = nt, .n_seq = 1, .pos = r->hpos, .tok_seq = r->hseq,
                     .slot = r->hslot, .seq_len = &seq_len, .block_table = kv->ident,
                     .max_blocks = kv->n_blocks},
            .n_seg = ad ? 1 : 0,
            .seg_begin = seg_begin,
            .seg_adapter = seg_ad,
            .n_logits = c0 + nt == n ? 1 : 0,
            .logits_tok = &last,
        };
        int rc = eng_forward(m, kv, &bt, logits);
        if (rc)
            return rc;
    }
    return HY_OK;
}
