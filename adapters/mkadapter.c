/* mkadapter.c - seeded random PEFT LoRA / HydraLoRA adapter directories (adapter_config.json +
 * adapter_model.safetensors) for a GGUF llama model, the C twin of scripts/make_test_adapter.py for
 * machines without Python (e.g. the GPU box). Same format, key names, shapes, draw order and B
 * calibration; NOT the same numbers (its own RNG). Test input only: the weights are random, never
 * trained. The `hydrad mkadapter` command (argv, usage, messages) is server/cli_mkadapter.c. */
#include "adapters/mkadapter.h"

#include "adapters/safetensors.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/quant.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *const mk_parent[ENG_N_PROJ] = {"self_attn", "self_attn", "self_attn", "self_attn",
                                                   "mlp", "mlp", "mlp"};
static const char *const mk_proj[ENG_N_PROJ] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"};
static const char *const mk_gguf[ENG_N_PROJ] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                "ffn_gate", "ffn_up", "ffn_down"};

typedef struct {
    int n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim;
} mk_dims;

/* splitmix64 + Box-Muller: a small, portable normal generator. */
typedef struct {
    unsigned long long s;
    int have;
    double spare;
} mk_rng;

static unsigned long long mk_next(mk_rng *g)
{
    unsigned long long z = (g->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double mk_normal(mk_rng *g)
{
    if (g->have) {
        g->have = 0;
        return g->spare;
    }
    double u1 = ((double)(mk_next(g) >> 11) + 1.0) / 9007199254740993.0; /* (0, 1] */
    double u2 = (double)(mk_next(g) >> 11) / 9007199254740992.0;
    double rad = sqrt(-2.0 * log(u1));
    g->spare = rad * sin(2.0 * M_PI * u2);
    g->have = 1;
    return rad * cos(2.0 * M_PI * u2);
}

static void mk_io_dims(const mk_dims *d, int p, int64_t *in, int64_t *out)
{
    int64_t qd = (int64_t)d->n_head * d->head_dim, kvd = (int64_t)d->n_head_kv * d->head_dim;
    int64_t ins[ENG_N_PROJ] = {d->n_embd, d->n_embd, d->n_embd, qd, d->n_embd, d->n_embd, d->n_ff};
    int64_t outs[ENG_N_PROJ] = {qd, kvd, kvd, d->n_embd, d->n_ff, d->n_ff, d->n_embd};
    *in = ins[p];
    *out = outs[p];
}

static int mk_read_dims(const gguf_file *f, mk_dims *d)
{
    gguf_str arch;
    if (gguf_get_str(f, "general.architecture", &arch) || !gguf_str_eq(arch, "llama"))
        return hy_err_set(HY_EUNSUPPORTED, "mkadapter: the GGUF is not a llama model");
    uint32_t v[5];
    static const char *const keys[5] = {"llama.block_count", "llama.embedding_length",
                                        "llama.feed_forward_length", "llama.attention.head_count",
                                        "llama.attention.head_count_kv"};
    for (int i = 0; i < 5; i++) {
        int rc = gguf_get_u32(f, keys[i], &v[i]);
        if (rc == HY_ENOTFOUND && i == 4) {
            v[4] = v[3];
            continue;
        }
        if (rc || v[i] == 0 || v[i] > (1u << 20))
            return hy_err_set(HY_EFORMAT, "mkadapter: GGUF key %s missing or out of range", keys[i]);
    }
    d->n_layer = (int)v[0];
    d->n_embd = (int)v[1];
    d->n_ff = (int)v[2];
    d->n_head = (int)v[3];
    d->n_head_kv = (int)v[4];
    uint32_t kl;
    d->head_dim = gguf_get_u32(f, "llama.attention.key_length", &kl) == 0 ? (int)kl : d->n_embd / d->n_head;
    if (d->head_dim <= 0 || d->n_head % d->n_head_kv)
        return hy_err_set(HY_EFORMAT, "mkadapter: bad head layout in the GGUF");
    return HY_OK;
}

/* ||W||_F / sqrt(rows) of a GGUF weight, dequantised row by row. */
static int mk_rms_row_norm(const gguf_file *f, int layer, int p, double *out)
{
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s.weight", layer, mk_gguf[p]);
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t)
        return hy_err_set(HY_ENOTFOUND, "mkadapter: tensor %s not in the base GGUF", name);
    if (!q_supported(t->type))
        return hy_err_set(HY_EUNSUPPORTED, "mkadapter: %s has unsupported type %s", name, q_type_name(t->type));
    int64_t cols = (int64_t)t->ne[0], rows = (int64_t)(t->ne[1] * t->ne[2] * t->ne[3]);
    size_t rb;
    if (q_row_bytes(t->type, cols, &rb) || (uint64_t)rows * rb > t->nbytes)
        return hy_err_set(HY_EFORMAT, "mkadapter: %s has an inconsistent size", name);
    float *row = malloc((size_t)cols * sizeof(float));
    if (!row)
        return hy_err_set(HY_ENOMEM, "out of memory");
    double ss = 0;
    for (int64_t rr = 0; rr < rows; rr++) {
        q_dequant_row(t->type, (const uint8_t *)t->data + (size_t)rr * rb, row, cols);
        for (int64_t c = 0; c < cols; c++)
            ss += (double)row[c] * row[c];
    }
    free(row);
    *out = sqrt(ss / (double)rows);
    return HY_OK;
}

/* Router std (as make_test_adapter.py): 3 / (sqrt(in) * rms(norm weight)) for the modules fed by an
 * RMSNorm (q, k, v: attn_norm; gate, up: ffn_norm), so router logits have std ~3 and gates are far
 * from uniform; 4 / sqrt(in) for o_proj and down_proj. Without base weights rms(norm) = 1. */
static int mk_router_std(const gguf_file *f, int use_weights, int layer, int p, int64_t in, double *out)
{
    const char *norm = p <= ENG_V ? "attn_norm" : (p == ENG_GATE || p == ENG_UP) ? "ffn_norm" : NULL;
    if (!norm) {
        *out = 4.0 / sqrt((double)in);
        return HY_OK;
    }
    double rms = 1.0;
    if (use_weights) {
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s.weight", layer, norm);
        const gguf_tensor *t = gguf_find_tensor(f, name);
        size_t rb;
        if (!t || !q_supported(t->type) || q_row_bytes(t->type, (int64_t)t->ne[0], &rb) || rb > t->nbytes)
            return hy_err_set(HY_EFORMAT, "mkadapter: norm weight %s missing or unreadable", name);
        float *w = malloc((size_t)t->ne[0] * sizeof(float));
        if (!w)
            return hy_err_set(HY_ENOMEM, "out of memory");
        q_dequant_row(t->type, t->data, w, (int64_t)t->ne[0]);
        double ss = 0;
        for (uint64_t i = 0; i < t->ne[0]; i++)
            ss += (double)w[i] * w[i];
        free(w);
        rms = sqrt(ss / (double)t->ne[0]);
        if (!(rms > 0))
            return hy_err_set(HY_EFORMAT, "mkadapter: norm weight %s is zero", name);
    }
    *out = 3.0 / (sqrt((double)in) * rms);
    return HY_OK;
}

typedef struct {
    char *name;
    int64_t sh[2];
    float *f;
    void *conv;
} mk_tensor;

static int mk_cmp(const void *a, const void *b)
{
    return strcmp(((const mk_tensor *)a)->name, ((const mk_tensor *)b)->name);
}

static int mk_add(mk_tensor **ts, size_t *n, size_t *cap, const char *name, int64_t rows, int64_t cols,
                  mk_rng *g, double std)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        mk_tensor *nt = realloc(*ts, nc * sizeof *nt);
        if (!nt)
            return hy_err_set(HY_ENOMEM, "out of memory");
        *ts = nt;
        *cap = nc;
    }
    mk_tensor *t = &(*ts)[*n];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->sh[0] = rows;
    t->sh[1] = cols;
    t->f = malloc((size_t)(rows * cols) * sizeof(float));
    if (!t->name || !t->f) {
        free(t->name);
        free(t->f);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    (*n)++;
    for (int64_t i = 0; i < rows * cols; i++)
        t->f[i] = (float)(mk_normal(g) * std);
    return HY_OK;
}

static uint16_t mk_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static int mk_write_config(const mkadapter_args *a, const unsigned *tmask, const char *path)
{
    json_t *tm = json_array();
    for (int p = 0; p < ENG_N_PROJ; p++)
        if (*tmask >> p & 1)
            json_array_append_new(tm, json_string(mk_proj[p]));
    json_t *alpha = a->alpha == floor(a->alpha) && fabs(a->alpha) < 1e9 ? json_integer((json_int_t)a->alpha)
                                                                         : json_real(a->alpha);
    json_t *c = json_pack("{s:s,s:s,s:s?,s:i,s:o,s:f,s:o,s:s,s:b,s:b,s:b,s:n}", "peft_type", "LORA", "task_type",
                          "CAUSAL_LM", "base_model_name_or_path", a->base, "r", a->r, "lora_alpha", alpha,
                          "lora_dropout", 0.0, "target_modules", tm, "bias", "none", "fan_in_fan_out", 0,
                          "use_rslora", 0, "inference_mode", 1, "modules_to_save");
    if (!c)
        return hy_err_set(HY_ENOMEM, "out of memory");
    if (a->K >= 1)
        json_object_set_new(c, "lora_nums", json_integer(a->K));
    int rc = json_dump_file(c, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(c);
    if (rc)
        return hy_err_set(HY_EIO, "cannot write %s: %s", path, strerror(errno));
    return HY_OK;
}

static int mk_parse_targets(const char *s, unsigned *mask)
{
    *mask = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = -1;
        for (int p = 0; p < ENG_N_PROJ; p++)
            if (!strcmp(tok, mk_proj[p]))
                found = p;
        if (found < 0)
            return hy_err_set(HY_EINVAL, "unknown target module '%s' (expected q_proj, k_proj, v_proj, o_proj, "
                                         "gate_proj, up_proj, down_proj)", tok);
        *mask |= 1u << found;
    }
    if (!*mask)
        return hy_err_set(HY_EINVAL, "--targets names no module");
    return HY_OK;
}

int mkadapter_run(const mkadapter_args *a)
{
    int rc;
    gguf_file *f = NULL;
    mk_tensor *ts = NULL;
    size_t n = 0, cap = 0;
    st_wtensor *w = NULL;
    unsigned tmask;
    st_dtype dt = !strcmp(a->dtype, "f32") ? ST_F32 : !strcmp(a->dtype, "f16") ? ST_F16 : ST_BF16;
    if ((rc = mk_parse_targets(a->targets, &tmask)))
        return rc;
    if ((rc = gguf_open(a->base ? a->base : a->shape_from, &f)))
        return rc;
    mk_dims d = {0};
    if ((rc = mk_read_dims(f, &d)))
        goto done;
    double s = a->alpha / a->r;
    mk_rng g = {.s = a->seed};
    char key[256];
    for (int l = 0; l < d.n_layer; l++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            if (!(tmask >> p & 1))
                continue;
            int64_t in, out;
            mk_io_dims(&d, p, &in, &out);
            double norm = 1.0;
            if (a->base && (rc = mk_rms_row_norm(f, l, p, &norm)))
                goto done;
            double bstd = a->ratio * norm / (s * sqrt((double)a->r)) * (a->zero_b ? 0.0 : 1.0);
            const char *pre = "base_model.model.model.layers";
            snprintf(key, sizeof key, "%s.%d.%s.%s.lora_A.weight", pre, l, mk_parent[p], mk_proj[p]);
            if ((rc = mk_add(&ts, &n, &cap, key, a->r, in, &g, 1.0 / sqrt((double)in))))
                goto done;
            for (int k = 0; k < (a->K ? a->K : 1); k++) {
                if (a->K)
                    snprintf(key, sizeof key, "%s.%d.%s.%s.lora_B%d.weight", pre, l, mk_parent[p], mk_proj[p], k);
                else
                    snprintf(key, sizeof key, "%s.%d.%s.%s.lora_B.weight", pre, l, mk_parent[p], mk_proj[p]);
                if ((rc = mk_add(&ts, &n, &cap, key, out, a->r, &g, bstd)))
                    goto done;
            }
            if (a->K) {
                double rstd = 0;
                snprintf(key, sizeof key, "%s.%d.%s.%s.lora_route.weight", pre, l, mk_parent[p], mk_proj[p]);
                if ((rc = mk_router_std(f, a->base != NULL, l, p, in, &rstd)) ||
                    (rc = mk_add(&ts, &n, &cap, key, a->K, in, &g, rstd)))
                    goto done;
            }
        }
    qsort(ts, n, sizeof *ts, mk_cmp);
    w = calloc(n, sizeof *w);
    if (!w) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        size_t ne = (size_t)(ts[i].sh[0] * ts[i].sh[1]);
        const void *data = ts[i].f;
        if (dt != ST_F32) {
            uint16_t *h = malloc(ne * 2);
            if (!h) {
                rc = hy_err_set(HY_ENOMEM, "out of memory");
                goto done;
            }
            for (size_t e = 0; e < ne; e++)
                h[e] = dt == ST_F16 ? q_f32_to_f16(ts[i].f[e]) : mk_bf16(ts[i].f[e]);
            ts[i].conv = h;
            data = h;
        }
        w[i] = (st_wtensor){ts[i].name, dt, 2, {ts[i].sh[0], ts[i].sh[1]}, data};
    }
    if (mkdir(a->out, 0755) && errno != EEXIST) {
        rc = hy_err_set(HY_EIO, "cannot create %s: %s", a->out, strerror(errno));
        goto done;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", a->out);
    if ((rc = mk_write_config(a, &tmask, path)))
        goto done;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", a->out);
    rc = st_write(path, w, n, "pt");
done:
    for (size_t i = 0; i < n; i++) {
        free(ts[i].name);
        free(ts[i].f);
        free(ts[i].conv);
    }
    free(ts);
    free(w);
    gguf_close(f);
    return rc;
}
