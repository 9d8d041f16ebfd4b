/* tokenizer.c - the vocabulary built from tokenizer.ggml.* (token maps, merges, special tokens),
 * the encode entry point that splits off special tokens, and decoding (whole and incremental)
 * that never emits a partial UTF-8 character. Model-specific encoding lives in tok_bpe.c and
 * tok_spm.c; chat templates in tok_chat.c. */
#include "tok_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned char u8;

/* ---- small helpers ---- */

int tok_ids_push(tok_ids *o, int32_t id)
{
    if (o->n == o->cap) {
        if (o->cap > (1 << 29))
            return hy_err_set(HY_ELIMIT, "more than %d tokens", o->cap);
        int cap = o->cap ? 2 * o->cap : 64;
        int32_t *ids = realloc(o->ids, (size_t)cap * sizeof *ids);
        if (!ids)
            return hy_err_set(HY_ENOMEM, "out of memory for %d token ids", cap);
        o->ids = ids;
        o->cap = cap;
    }
    o->ids[o->n++] = id;
    return 0;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (u8)s[i]) * 0x100000001b3ULL;
    return h ^ (h >> 29);
}

int32_t tok_lookup(const tok_vocab *v, const char *s, size_t len)
{
    for (uint64_t i = hash_bytes(s, len) & v->map_mask;; i = (i + 1) & v->map_mask) {
        uint32_t slot = v->map[i];
        if (!slot)
            return -1;
        int32_t id = (int32_t)slot - 1;
        if (v->text_len[id] == len && !memcmp(v->text + v->text_off[id], s, len))
            return id;
    }
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 16;
    while (p < n)
        p <<= 1;
    return p;
}

/* ---- loading ---- */

static int get_opt_id(const gguf_file *f, const char *key, int n, int32_t *out)
{
    uint32_t u;
    int rc = gguf_get_u32(f, key, &u);
    *out = -1;
    if (rc == HY_ENOTFOUND)
        return 0;
    if (rc)
        return hy_err_wrap(rc, "%s", key);
    if (u >= (uint32_t)n)
        return 0; /* some converters write ids past the vocabulary for "none" */
    *out = (int32_t)u;
    return 0;
}

static int get_opt_bool(const gguf_file *f, const char *key, bool dflt, bool *out)
{
    int rc = gguf_get_bool(f, key, out);
    if (rc == HY_ENOTFOUND) {
        *out = dflt;
        return 0;
    }
    return rc ? hy_err_wrap(rc, "%s", key) : 0;
}

/* Kept verbatim for clients that render it themselves (GET /tokenizer_info); the server renders
 * with tok_chat_apply, never with this text. A template longer than 1 MiB is not a template. */
static int load_chat_template(const gguf_file *f, tok_vocab *v)
{
    gguf_str s;
    int rc = gguf_get_str(f, "tokenizer.chat_template", &s);
    if (rc == HY_ENOTFOUND)
        return 0;
    if (rc)
        return hy_err_wrap(rc, "tokenizer.chat_template");
    if (s.len > ((uint64_t)1 << 20) || memchr(s.ptr, 0, (size_t)s.len))
        return 0;
    if (!(v->chat_template = strndup(s.ptr, (size_t)s.len)))
        return hy_err_set(HY_ENOMEM, "out of memory for the chat template");
    return 0;
}

static int load_model_kind(const gguf_file *f, tok_vocab *v)
{
    gguf_str s;
    int rc = gguf_get_str(f, "tokenizer.ggml.model", &s);
    if (rc)
        return hy_err_wrap(rc, "tokenizer.ggml.model");
    if (gguf_str_eq(s, "gpt2")) {
        v->model = TOK_MODEL_BPE;
    } else if (gguf_str_eq(s, "llama")) {
        v->model = TOK_MODEL_SPM;
        v->pre = TOK_PRE_NONE;
        return 0;
    } else {
        return hy_err_set(HY_EUNSUPPORTED, "tokenizer.ggml.model '%.*s' is not supported (gpt2 and llama are)",
                          (int)HY_MIN(s.len, 100), s.ptr);
    }
    rc = gguf_get_str(f, "tokenizer.ggml.pre", &s);
    if (rc == HY_ENOTFOUND) {
        v->pre = TOK_PRE_GPT2; /* files written before the key existed used the GPT-2 split */
        return 0;
    }
    if (rc)
        return hy_err_wrap(rc, "tokenizer.ggml.pre");
    if (gguf_str_eq(s, "smollm"))
        v->pre = TOK_PRE_SMOLLM;
    else if (gguf_str_eq(s, "gpt2") || gguf_str_eq(s, "gpt-2"))
        v->pre = TOK_PRE_GPT2;
    else if (gguf_str_eq(s, "llama-bpe") || gguf_str_eq(s, "llama3") || gguf_str_eq(s, "llama-v3"))
        v->pre = TOK_PRE_LLAMA3;
    else
        return hy_err_set(HY_EUNSUPPORTED,
                          "tokenizer.ggml.pre '%.*s' is not supported (smollm, gpt2 and llama-bpe are)",
                          (int)HY_MIN(s.len, 100), s.ptr);
    return 0;
}

static int load_texts(const gguf_file *f, tok_vocab *v)
{
    gguf_arr a;
    int rc = gguf_get_arr(f, "tokenizer.ggml.tokens", &a);
    if (rc)
        return hy_err_wrap(rc, "tokenizer.ggml.tokens");
    if (a.elem != GGUF_VT_STRING || a.n == 0 || a.n > (1u << 24))
        return hy_err_set(HY_EFORMAT, "tokenizer.ggml.tokens must be 1..16777216 strings (has %llu)",
                          (unsigned long long)a.n);
    v->n = (int)a.n;
    size_t total = 0;
    for (uint64_t i = 0; i < a.n; i++) {
        if (a.strs[i].len > (1u << 20))
            return hy_err_set(HY_EFORMAT, "tokenizer.ggml.tokens[%llu] is %llu bytes long",
                              (unsigned long long)i, (unsigned long long)a.strs[i].len);
        if (hy_add_size(total, (size_t)a.strs[i].len + 1, &total) || total > UINT32_MAX)
            return hy_err_set(HY_ELIMIT, "tokenizer.ggml.tokens hold more than 4 GiB of text");
    }
    size_t n = (size_t)v->n;
    v->text = malloc(total);
    v->piece = malloc(total);
    v->text_off = malloc(n * sizeof *v->text_off);
    v->text_len = malloc(n * sizeof *v->text_len);
    v->piece_off = malloc(n * sizeof *v->piece_off);
    v->piece_len = malloc(n * sizeof *v->piece_len);
    v->type = malloc(n);
    v->eog = calloc(n, 1);
    v->map_mask = (uint32_t)(pow2_at_least(2 * n) - 1);
    v->map = calloc((size_t)v->map_mask + 1, sizeof *v->map);
    if (!v->text || !v->piece || !v->text_off || !v->text_len || !v->piece_off || !v->piece_len || !v->type ||
        !v->eog || !v->map)
        return hy_err_set(HY_ENOMEM, "out of memory for a vocabulary of %d tokens", v->n);
    size_t off = 0;
    for (int i = 0; i < v->n; i++) {
        size_t len = (size_t)a.strs[i].len;
        memcpy(v->text + off, a.strs[i].ptr, len);
        v->text[off + len] = '\0';
        v->text_off[i] = (uint32_t)off;
        v->text_len[i] = (uint32_t)len;
        off += len + 1;
        if (tok_lookup(v, v->text + v->text_off[i], len) >= 0)
            continue; /* a duplicate string keeps its first id */
        uint64_t h = hash_bytes(v->text + v->text_off[i], len) & v->map_mask;
        while (v->map[h])
            h = (h + 1) & v->map_mask;
        v->map[h] = (uint32_t)i + 1;
    }
    return 0;
}

static int load_types_scores(const gguf_file *f, tok_vocab *v)
{
    gguf_arr a;
    int rc = gguf_get_arr(f, "tokenizer.ggml.token_type", &a);
    memset(v->type, TOK_TYPE_NORMAL, (size_t)v->n);
    if (rc && rc != HY_ENOTFOUND)
        return hy_err_wrap(rc, "tokenizer.ggml.token_type");
    if (!rc) {
        if (a.n != (uint64_t)v->n)
            return hy_err_set(HY_EFORMAT, "tokenizer.ggml.token_type has %llu entries for %d tokens",
                              (unsigned long long)a.n, v->n);
        for (int i = 0; i < v->n; i++) {
            int64_t t;
            if (gguf_arr_int(&a, (uint64_t)i, &t))
                return hy_err_set(HY_EFORMAT, "tokenizer.ggml.token_type must be an integer array");
            v->type[i] = (t >= 0 && t <= TOK_TYPE_BYTE) ? (uint8_t)t : TOK_TYPE_NORMAL;
        }
    }
    if (v->model != TOK_MODEL_SPM)
        return 0;
    v->score = calloc((size_t)v->n, sizeof *v->score);
    if (!v->score)
        return hy_err_set(HY_ENOMEM, "out of memory for token scores");
    rc = gguf_get_arr(f, "tokenizer.ggml.scores", &a);
    if (rc == HY_ENOTFOUND)
        return 0;
    if (rc)
        return hy_err_wrap(rc, "tokenizer.ggml.scores");
    if (a.n != (uint64_t)v->n || (a.elem != GGUF_VT_F32 && a.elem != GGUF_VT_F64))
        return hy_err_set(HY_EFORMAT, "tokenizer.ggml.scores must hold %d floats", v->n);
    for (int i = 0; i < v->n; i++)
        v->score[i] = gguf_arr_f32(&a, (uint64_t)i);
    return 0;
}

static int load_merges(const gguf_file *f, tok_vocab *v)
{
    gguf_arr a;
    int rc = gguf_get_arr(f, "tokenizer.ggml.merges", &a);
    if (rc == HY_ENOTFOUND)
        return 0;
    if (rc)
        return hy_err_wrap(rc, "tokenizer.ggml.merges");
    if (a.elem != GGUF_VT_STRING || a.n > (1u << 24))
        return hy_err_set(HY_EFORMAT, "tokenizer.ggml.merges must be at most 16777216 strings");
    if (!a.n)
        return 0;
    size_t cap = pow2_at_least(2 * (size_t)a.n);
    v->mkey = malloc(cap * sizeof *v->mkey);
    v->mrank = malloc(cap * sizeof *v->mrank);
    v->mres = malloc(cap * sizeof *v->mres);
    char *buf = NULL;
    if (!v->mkey || !v->mrank || !v->mres)
        return hy_err_set(HY_ENOMEM, "out of memory for %llu merges", (unsigned long long)a.n);
    memset(v->mkey, 0xFF, cap * sizeof *v->mkey);
    v->mmask = (uint32_t)(cap - 1);
    for (uint64_t r = 0; r < a.n; r++) {
        const char *s = a.strs[r].ptr;
        size_t len = (size_t)a.strs[r].len;
        /* byte-level symbols never contain a raw space, so the first space separates the pair */
        const char *sp = len > 2 ? memchr(s + 1, ' ', len - 2) : NULL;
        if (!sp) {
            free(buf); /* allocated for an earlier merge */
            return hy_err_set(HY_EFORMAT, "tokenizer.ggml.merges[%llu] '%.*s' is not 'left right'",
                              (unsigned long long)r, (int)HY_MIN(len, 100), s);
        }
        size_t la = (size_t)(sp - s), lb = len - la - 1;
        int32_t ia = tok_lookup(v, s, la), ib = tok_lookup(v, sp + 1, lb);
        char *nb = realloc(buf, la + lb + 1);
        if (!nb) {
            free(buf);
            return hy_err_set(HY_ENOMEM, "out of memory");
        }
        buf = nb;
        memcpy(buf, s, la);
        memcpy(buf + la, sp + 1, lb);
        int32_t ir = tok_lookup(v, buf, la + lb);
        if (ia < 0 || ib < 0 || ir < 0)
            continue; /* a merge outside the vocabulary can never fire */
        uint64_t key = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        uint64_t h = mix64(key) & v->mmask;
        while (v->mkey[h] != UINT64_MAX && v->mkey[h] != key)
            h = (h + 1) & v->mmask;
        if (v->mkey[h] == key)
            continue; /* duplicate merge: the earlier (better) rank stands */
        v->mkey[h] = key;
        v->mrank[h] = (uint32_t)r;
        v->mres[h] = ir;
    }
    free(buf);
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The bytes a token stands for; written into v->piece (never longer than its text). */
static void build_pieces(tok_vocab *v)
{
    int cp2byte[324];
    for (int i = 0; i < 324; i++)
        cp2byte[i] = -1;
    for (int b = 0; b < 256; b++)
        cp2byte[tok_byte_to_cp((uint8_t)b)] = b;
    size_t off = 0;
    v->max_piece = 0;
    for (int i = 0; i < v->n; i++) {
        const u8 *t = (const u8 *)v->text + v->text_off[i];
        size_t n = v->text_len[i], m = 0;
        u8 *out = v->piece + off;
        if (v->model == TOK_MODEL_SPM && v->type[i] == TOK_TYPE_BYTE && n == 6 && !memcmp(t, "<0x", 3) &&
            t[5] == '>' && hexval((char)t[3]) >= 0 && hexval((char)t[4]) >= 0) {
            out[m++] = (u8)(hexval((char)t[3]) << 4 | hexval((char)t[4]));
        } else if (v->model == TOK_MODEL_SPM) {
            for (size_t j = 0; j < n; j++) {
                if (j + 2 < n && t[j] == 0xE2 && t[j + 1] == 0x96 && t[j + 2] == 0x81) {
                    out[m++] = ' ';
                    j += 2;
                } else {
                    out[m++] = t[j];
                }
            }
        } else {
            for (size_t j = 0; j < n;) {
                uint32_t cp;
                j += (size_t)tok_utf8_next(t + j, n - j, &cp);
                if (cp >= 324 || cp2byte[cp] < 0) {
                    /* not byte-level text (an added token): its bytes stand for themselves */
                    memcpy(out, t, n);
                    m = n;
                    break;
                }
                out[m++] = (u8)cp2byte[cp];
            }
        }
        v->piece_off[i] = (uint32_t)off;
        v->piece_len[i] = (uint32_t)m;
        v->max_piece = HY_MAX(v->max_piece, m);
        off += n + 1;
    }
}

static void build_byte_tokens(tok_vocab *v)
{
    for (int b = 0; b < 256; b++) {
        char s[8];
        size_t n;
        if (v->model == TOK_MODEL_SPM) {
            n = (size_t)snprintf(s, sizeof s, "<0x%02X>", b);
        } else {
            uint32_t cp = tok_byte_to_cp((uint8_t)b);
            if (cp < 0x80) {
                s[0] = (char)cp, n = 1;
            } else {
                s[0] = (char)(0xC0 | cp >> 6), s[1] = (char)(0x80 | (cp & 0x3F)), n = 2;
            }
        }
        v->byte_tok[b] = tok_lookup(v, s, n);
    }
}

static int cmp_special(const void *pa, const void *pb, void *pv)
{
    const tok_vocab *v = pv;
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    if (v->text_len[a] != v->text_len[b])
        return v->text_len[a] > v->text_len[b] ? -1 : 1;
    return a < b ? -1 : 1;
}

static int build_specials(tok_vocab *v)
{
    v->special = malloc((size_t)v->n * sizeof *v->special);
    if (!v->special)
        return hy_err_set(HY_ENOMEM, "out of memory for special tokens");
    v->n_special = 0;
    for (int i = 0; i < v->n; i++)
        if ((v->type[i] == TOK_TYPE_CONTROL || v->type[i] == TOK_TYPE_USER_DEFINED) && v->text_len[i] > 0)
            v->special[v->n_special++] = i;
    qsort_r(v->special, (size_t)v->n_special, sizeof *v->special, cmp_special, v);
    return 0;
}

static void mark_eog(const gguf_file *f, tok_vocab *v)
{
    static const char *const names[] = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>",
                                        "<end_of_turn>", "<|end|>", "</s>", "<EOT>"};
    static const char *const keys[] = {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"};
    if (v->eos >= 0)
        v->eog[v->eos] = 1;
    for (size_t k = 0; k < HY_ARRAY_LEN(keys); k++) {
        int32_t id;
        if (!get_opt_id(f, keys[k], v->n, &id) && id >= 0)
            v->eog[id] = 1;
    }
    for (size_t k = 0; k < HY_ARRAY_LEN(names); k++) {
        int32_t id = tok_lookup(v, names[k], strlen(names[k]));
        if (id >= 0 && v->type[id] == TOK_TYPE_CONTROL)
            v->eog[id] = 1;
    }
    hy_err_clear();
}

int tok_load(const gguf_file *f, tok_vocab **out)
{
    int rc;
    *out = NULL;
    tok_vocab *v = calloc(1, sizeof *v);
    if (!v)
        return hy_err_set(HY_ENOMEM, "out of memory for the tokenizer");
    if ((rc = load_model_kind(f, v)) || (rc = load_texts(f, v)) || (rc = load_types_scores(f, v)))
        goto fail;
    if (v->model == TOK_MODEL_BPE && (rc = load_merges(f, v)))
        goto fail;
    if ((rc = get_opt_id(f, "tokenizer.ggml.bos_token_id", v->n, &v->bos)) ||
        (rc = get_opt_id(f, "tokenizer.ggml.eos_token_id", v->n, &v->eos)) ||
        (rc = get_opt_id(f, "tokenizer.ggml.unknown_token_id", v->n, &v->unk)) ||
        (rc = get_opt_id(f, "tokenizer.ggml.padding_token_id", v->n, &v->pad)) ||
        (rc = load_chat_template(f, v)))
        goto fail;
    bool spm = v->model == TOK_MODEL_SPM;
    if ((rc = get_opt_bool(f, "tokenizer.ggml.add_bos_token", spm, &v->add_bos)) ||
        (rc = get_opt_bool(f, "tokenizer.ggml.add_space_prefix", spm, &v->add_space_prefix)))
        goto fail;
    if (spm && v->unk < 0) {
        int32_t id = tok_lookup(v, "<unk>", 5);
        v->unk = id;
    }
    build_pieces(v);
    build_byte_tokens(v);
    if ((rc = build_specials(v)))
        goto fail;
    mark_eog(f, v);
    *out = v;
    return HY_OK;
fail:
    tok_free(v);
    return hy_err_wrap(rc, "tokenizer");
}

void tok_free(tok_vocab *v)
{
    if (!v)
        return;
    free(v->text);
    free(v->text_off);
    free(v->text_len);
    free(v->piece);
    free(v->piece_off);
    free(v->piece_len);
    free(v->type);
    free(v->score);
    free(v->eog);
    free(v->map);
    free(v->mkey);
    free(v->mrank);
    free(v->mres);
    free(v->special);
    free(v->chat_template);
    free(v);
}

int tok_n_vocab(const tok_vocab *v) { return v->n; }
int32_t tok_bos(const tok_vocab *v) { return v->bos; }
int32_t tok_eos(const tok_vocab *v) { return v->eos; }
bool tok_add_bos(const tok_vocab *v) { return v->add_bos; }
int32_t tok_pad(const tok_vocab *v) { return v->pad; }
int32_t tok_unk(const tok_vocab *v) { return v->unk; }
const char *tok_chat_template(const tok_vocab *v) { return v->chat_template; }

const char *tok_hf_class(const tok_vocab *v)
{
    if (v->model == TOK_MODEL_SPM)
        return "LlamaTokenizerFast";
    return v->pre == TOK_PRE_LLAMA3 ? "PreTrainedTokenizerFast" : "GPT2TokenizerFast";
}

bool tok_is_eog(const tok_vocab *v, int32_t id)
{
    return id >= 0 && id < v->n && v->eog[id];
}

const char *tok_text(const tok_vocab *v, int32_t id)
{
    if (id < 0 || id >= v->n)
        return NULL;
    return v->text + v->text_off[id];
}

bool tok_is_control(const tok_vocab *v, int32_t id)
{
    return id >= 0 && id < v->n && v->type[id] == TOK_TYPE_CONTROL;
}

/* ---- encoding ---- */

static int encode_fragment(const tok_vocab *v, const char *s, size_t len, tok_ids *o)
{
    if (!len)
        return 0;
    if (v->model == TOK_MODEL_SPM)
        return tok_spm_encode(v, s, len, o);
    return tok_bpe_encode(v, s, len, o);
}

/* Longest special token whose text starts at s[0..len), or -1. */
static int32_t match_special(const tok_vocab *v, const char *s, size_t len)
{
    for (int k = 0; k < v->n_special; k++) {
        int32_t id = v->special[k];
        size_t n = v->text_len[id];
        if (n <= len && (u8)s[0] == (u8)v->text[v->text_off[id]] && !memcmp(s, v->text + v->text_off[id], n))
            return id;
    }
    return -1;
}

int tok_encode(const tok_vocab *v, const char *text, size_t len, bool parse_special, bool add_bos,
               int32_t **ids, int *n_ids)
{
    tok_ids o = {0};
    int rc = 0;
    *ids = NULL;
    *n_ids = 0;
    if (!text && len)
        return hy_err_set(HY_EINVAL, "tok_encode: NULL text");
    if (add_bos && v->bos >= 0 && (rc = tok_ids_push(&o, v->bos)))
        goto fail;
    bool first_byte[256] = {false};
    if (parse_special)
        for (int k = 0; k < v->n_special; k++)
            first_byte[(u8)v->text[v->text_off[v->special[k]]]] = true;
    size_t start = 0;
    for (size_t i = 0; parse_special && i < len; i++) {
        if (!first_byte[(u8)text[i]])
            continue;
        int32_t id = match_special(v, text + i, len - i);
        if (id < 0)
            continue;
        if ((rc = encode_fragment(v, text + start, i - start, &o)) || (rc = tok_ids_push(&o, id)))
            goto fail;
        i += v->text_len[id] - 1;
        start = i + 1;
    }
    if ((rc = encode_fragment(v, text + start, len - start, &o)))
        goto fail;
    if (!o.ids && !(o.ids = malloc(sizeof *o.ids))) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto fail;
    }
    *ids = o.ids;
    *n_ids = o.n;
    return 0;
fail:
    free(o.ids);
    return rc;
}

/* ---- decoding ---- */

typedef struct {
    char *buf;
    size_t len, cap;
    bool grow;        /* tok_decode: realloc; tok_detok_push: fixed, whole characters dropped */
    size_t dropped;
    int err;
} sink;

static void sink_put(sink *k, const u8 *b, size_t n)
{
    if (k->err)
        return;
    if (k->len + n + 1 > k->cap) {
        if (!k->grow) {
            k->dropped += n;
            return;
        }
        size_t cap = HY_MAX(2 * k->cap, k->len + n + 64);
        char *nb = realloc(k->buf, cap);
        if (!nb) {
            k->err = hy_err_set(HY_ENOMEM, "out of memory decoding tokens");
            return;
        }
        k->buf = nb;
        k->cap = cap;
    }
    memcpy(k->buf + k->len, b, n);
    k->len += n;
    k->buf[k->len] = '\0';
}

static const u8 k_fffd[3] = {0xEF, 0xBF, 0xBD};

/* One byte through the UTF-8 assembler: complete characters go out, a byte that cannot
 * continue the pending prefix turns that prefix into one U+FFFD (maximal-subpart rule, as
 * Rust's String::from_utf8_lossy and Python's decode('replace') do). */
static void utf8_feed(tok_detok *d, u8 b, sink *k)
{
    for (;;) {
        if (d->n_pending == 0) {
            if (b < 0x80)
                sink_put(k, &b, 1);
            else if (b >= 0xC2 && b <= 0xF4)
                d->pending[d->n_pending++] = b;
            else
                sink_put(k, k_fffd, 3);
            return;
        }
        u8 lead = d->pending[0], lo = 0x80, hi = 0xBF;
        int need = lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
        if (d->n_pending == 1) {
            if (lead == 0xE0)
                lo = 0xA0;
            else if (lead == 0xED)
                hi = 0x9F;
            else if (lead == 0xF0)
                lo = 0x90;
            else if (lead == 0xF4)
                hi = 0x8F;
        }
        if (b < lo || b > hi) {
            sink_put(k, k_fffd, 3);
            d->n_pending = 0;
            continue;
        }
        d->pending[d->n_pending++] = b;
        if (d->n_pending == need) {
            sink_put(k, d->pending, (size_t)need);
            d->n_pending = 0;
        }
        return;
    }
}

const unsigned char *tok_piece(const tok_vocab *v, int32_t id, size_t *len)
{
    if (id < 0 || id >= v->n)
        return NULL;
    *len = v->piece_len[id];
    return v->piece + v->piece_off[id];
}

static void detok_id(tok_detok *d, int32_t id, bool skip_special, sink *k)
{
    const tok_vocab *v = d->v;
    if (id < 0 || id >= v->n)
        return;
    if (skip_special && v->type[id] == TOK_TYPE_CONTROL)
        return;
    const u8 *p = v->piece + v->piece_off[id];
    size_t n = v->piece_len[id];
    if (d->first && v->model == TOK_MODEL_SPM && v->add_space_prefix && n && p[0] == ' ') {
        p++;
        n--;
    }
    d->first = false;
    for (size_t i = 0; i < n; i++)
        utf8_feed(d, p[i], k);
}

void tok_detok_init(tok_detok *d, const tok_vocab *v)
{
    memset(d, 0, sizeof *d);
    d->v = v;
    d->first = true;
}

size_t tok_detok_cap(const tok_vocab *v)
{
    /* every byte may become a 3-byte U+FFFD, the pending prefix included, plus the NUL */
    return 3 * (v->max_piece + sizeof ((tok_detok *)0)->pending) + 1;
}

size_t tok_detok_push(tok_detok *d, int32_t id, char *out, size_t cap)
{
    if (!cap)
        return 0;
    sink k = {out, 0, cap, false, 0, 0};
    out[0] = '\0';
    detok_id(d, id, true, &k);
    d->n_dropped += k.dropped;
    return k.len;
}

size_t tok_detok_flush(tok_detok *d, char *out, size_t cap)
{
    if (!cap)
        return 0;
    sink k = {out, 0, cap, false, 0, 0};
    out[0] = '\0';
    if (d->n_pending)
        sink_put(&k, k_fffd, 3);
    d->n_pending = 0;
    d->n_dropped += k.dropped;
    return k.len;
}

int tok_decode(const tok_vocab *v, const int32_t *ids, int n, bool skip_special, char **out, size_t *out_len)
{
    tok_detok d;
    sink k = {NULL, 0, 0, true, 0, 0};
    *out = NULL;
    if (out_len)
        *out_len = 0;
    if (n < 0 || (n && !ids))
        return hy_err_set(HY_EINVAL, "tok_decode: bad id list");
    tok_detok_init(&d, v);
    sink_put(&k, (const u8 *)"", 0);
    for (int i = 0; i < n && !k.err; i++)
        detok_id(&d, ids[i], skip_special, &k);
    if (d.n_pending)
        sink_put(&k, k_fffd, 3);
    if (k.err) {
        free(k.buf);
        return k.err;
    }
    *out = k.buf;
    if (out_len)
        *out_len = k.len;
    return 0;
}
