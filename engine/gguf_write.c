/* gguf_write.c - streaming GGUF v3 writer and the block quantisers mkmodel uses (Q8_0, Q4_0,
 * Q4_1, F16). Metadata is serialised into memory as it is added; tensor data streams to the
 * file in declaration order. Nothing here interprets a model. */
#include "gguf_write.h"

#include "hy.h"
#include "quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GGUF_W_ALIGN 32

typedef struct {
    char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset;
    size_t bytes;
} gguf_w_tensor;

struct gguf_w {
    uint8_t *kv;      /* serialised key/values */
    size_t kv_len, kv_cap;
    uint64_t n_kv;
    gguf_w_tensor *t;
    uint64_t n_t, cap_t;
    uint64_t data_size; /* running aligned size of the data section */
    FILE *fp;
    char *path;
    uint64_t next;    /* next tensor whose data is due */
    int failed;
};

/* ---- byte buffer ---- */

static int w_put(gguf_w *w, const void *p, size_t n)
{
    if (w->kv_len + n < w->kv_len)
        return hy_err_set(HY_ELIMIT, "GGUF metadata too large");
    if (w->kv_len + n > w->kv_cap) {
        size_t cap = w->kv_cap ? w->kv_cap : 4096;
        while (cap < w->kv_len + n) {
            if (cap > SIZE_MAX / 2)
                return hy_err_set(HY_ELIMIT, "GGUF metadata too large");
            cap *= 2;
        }
        uint8_t *nb = realloc(w->kv, cap);
        if (!nb)
            return hy_err_set(HY_ENOMEM, "out of memory (GGUF metadata)");
        w->kv = nb;
        w->kv_cap = cap;
    }
    memcpy(w->kv + w->kv_len, p, n);
    w->kv_len += n;
    return HY_OK;
}

static int w_u32(gguf_w *w, uint32_t v) { return w_put(w, &v, 4); } /* little-endian host */
static int w_u64(gguf_w *w, uint64_t v) { return w_put(w, &v, 8); }
static int w_strn(gguf_w *w, const char *s, uint64_t n)
{
    int rc = w_u64(w, n);
    return rc ? rc : w_put(w, s, (size_t)n);
}
static int w_key(gguf_w *w, const char *key, uint32_t type)
{
    int rc = w_strn(w, key, strlen(key));
    if (!rc)
        rc = w_u32(w, type);
    if (!rc)
        w->n_kv++;
    return rc;
}

int gguf_w_create(gguf_w **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? HY_OK : hy_err_set(HY_ENOMEM, "out of memory (GGUF writer)");
}

void gguf_w_free(gguf_w *w)
{
    if (!w)
        return;
    if (w->fp) {
        fclose(w->fp);
        if (w->path)
            remove(w->path); /* never leave a half-written model behind */
    }
    for (uint64_t i = 0; i < w->n_t; i++)
        free(w->t[i].name);
    free(w->t);
    free(w->kv);
    free(w->path);
    free(w);
}

static int w_open_kv(gguf_w *w)
{
    return w->fp ? hy_err_set(HY_EINVAL, "GGUF writer: metadata after gguf_w_begin") : HY_OK;
}

int gguf_w_kv_u32(gguf_w *w, const char *key, uint32_t v)
{
    int rc = w_open_kv(w);
    if (!rc) rc = w_key(w, key, GGUF_VT_U32);
    return rc ? rc : w_u32(w, v);
}

int gguf_w_kv_i32(gguf_w *w, const char *key, int32_t v)
{
    int rc = w_open_kv(w);
    if (!rc) rc = w_key(w, key, GGUF_VT_I32);
    return rc ? rc : w_put(w, &v, 4);
}

int gguf_w_kv_f32(gguf_w *w, const char *key, float v)
{
    int rc = w_open_kv(w);
    if (!rc) rc = w_key(w, key, GGUF_VT_F32);
    return rc ? rc : w_put(w, &v, 4);
}

int gguf_w_kv_bool(gguf_w *w, const char *key, bool v)
{
    uint8_t b = v ? 1 : 0;
    int rc = w_open_kv(w);
    if (!rc) rc = w_key(w, key, GGUF_VT_BOOL);
    return rc ? rc : w_put(w, &b, 1);
}

int gguf_w_kv_str(gguf_w *w, const char *key, const char *v)
{
    int rc = w_open_kv(w);
    if (!rc) rc = w_key(w, key, GGUF_VT_STRING);
    return rc ? rc : w_strn(w, v, strlen(v));
}

static int w_arr_head(gguf_w *w, const char *key, uint32_t elem, uint64_t n)
{
    int rc = w_open_kv(w);
    if (!rc) rc = w_key(w, key, GGUF_VT_ARRAY);
    if (!rc) rc = w_u32(w, elem);
    return rc ? rc : w_u64(w, n);
}

int gguf_w_kv_arr_str(gguf_w *w, const char *key, const char *const *v, uint64_t n)
{
    int rc = w_arr_head(w, key, GGUF_VT_STRING, n);
    for (uint64_t i = 0; !rc && i < n; i++)
        rc = w_strn(w, v[i], strlen(v[i]));
    return rc;
}

int gguf_w_kv_arr_i32(gguf_w *w, const char *key, const int32_t *v, uint64_t n)
{
    int rc = w_arr_head(w, key, GGUF_VT_I32, n);
    return rc ? rc : w_put(w, v, (size_t)n * 4);
}

int gguf_w_kv_arr_f32(gguf_w *w, const char *key, const float *v, uint64_t n)
{
    int rc = w_arr_head(w, key, GGUF_VT_F32, n);
    return rc ? rc : w_put(w, v, (size_t)n * 4);
}

/* A value's payload (after its type tag). */
static int w_value(gguf_w *w, const gguf_value *v, int depth)
{
    if (depth > 8)
        return hy_err_set(HY_EFORMAT, "GGUF writer: arrays nested too deeply");
    size_t sz = gguf_vtype_size(v->type);
    if (v->type == GGUF_VT_STRING)
        return w_strn(w, v->v.s.ptr, v->v.s.len);
    if (v->type == GGUF_VT_F32) {
        float f = (float)v->v.f;
        return w_put(w, &f, 4);
    }
    if (v->type == GGUF_VT_F64)
        return w_put(w, &v->v.f, 8);
    if (v->type == GGUF_VT_BOOL) {
        uint8_t b = v->v.b ? 1 : 0;
        return w_put(w, &b, 1);
    }
    if (sz) /* integers: the low bytes of the 64-bit value, little-endian */
        return w_put(w, v->type == GGUF_VT_I8 || v->type == GGUF_VT_I16 || v->type == GGUF_VT_I32 ||
                                v->type == GGUF_VT_I64 ? (const void *)&v->v.i : (const void *)&v->v.u,
                     sz);
    if (v->type != GGUF_VT_ARRAY)
        return hy_err_set(HY_EFORMAT, "GGUF writer: unknown value type %d", (int)v->type);
    const gguf_arr *a = &v->v.arr;
    int rc = w_u32(w, a->elem);
    if (!rc) rc = w_u64(w, a->n);
    if (rc)
        return rc;
    if (a->elem == GGUF_VT_STRING) {
        for (uint64_t i = 0; !rc && i < a->n; i++)
            rc = w_strn(w, a->strs[i].ptr, a->strs[i].len);
        return rc;
    }
    if (a->elem == GGUF_VT_ARRAY) {
        for (uint64_t i = 0; !rc && i < a->n; i++)
            rc = w_value(w, &a->items[i], depth + 1);
        return rc;
    }
    sz = gguf_vtype_size(a->elem);
    if (!sz)
        return hy_err_set(HY_EFORMAT, "GGUF writer: unknown array element type %d", (int)a->elem);
    if (a->n > SIZE_MAX / sz)
        return hy_err_set(HY_ELIMIT, "GGUF writer: array too large");
    return w_put(w, a->data, (size_t)a->n * sz);
}

int gguf_w_kv_copy(gguf_w *w, const gguf_kv *kv)
{
    int rc = w_open_kv(w);
    if (!rc) rc = w_strn(w, kv->key.ptr, kv->key.len);
    if (!rc) rc = w_u32(w, kv->value.type);
    if (!rc) rc = w_value(w, &kv->value, 0);
    if (!rc)
        w->n_kv++;
    return rc;
}

int gguf_w_add_tensor(gguf_w *w, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type)
{
    if (w->fp)
        return hy_err_set(HY_EINVAL, "GGUF writer: tensor after gguf_w_begin");
    if (n_dims < 1 || n_dims > 4 || !q_supported(type))
        return hy_err_set(HY_EINVAL, "GGUF writer: tensor %s: bad dims or type", name);
    uint64_t rows = 1;
    for (uint32_t d = 1; d < n_dims; d++)
        rows *= ne[d];
    size_t rb, bytes;
    if (q_row_bytes(type, (int64_t)ne[0], &rb) || hy_mul_size(rb, (size_t)rows, &bytes))
        return hy_err_set(HY_EINVAL, "GGUF writer: tensor %s: %llu columns do not fit type %s", name,
                          (unsigned long long)ne[0], q_type_name(type));
    if (w->n_t == w->cap_t) {
        uint64_t cap = w->cap_t ? w->cap_t * 2 : 64;
        gguf_w_tensor *nt = realloc(w->t, (size_t)cap * sizeof *nt);
        if (!nt)
            return hy_err_set(HY_ENOMEM, "out of memory (GGUF writer)");
        w->t = nt;
        w->cap_t = cap;
    }
    gguf_w_tensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name)
        return hy_err_set(HY_ENOMEM, "out of memory (GGUF writer)");
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < 4; d++)
        t->ne[d] = d < n_dims ? ne[d] : 1;
    t->type = type;
    t->offset = w->data_size;
    t->bytes = bytes;
    w->data_size += (bytes + GGUF_W_ALIGN - 1) / GGUF_W_ALIGN * GGUF_W_ALIGN;
    w->n_t++;
    return HY_OK;
}

size_t gguf_w_tensor_bytes(const gguf_w *w, uint64_t i) { return i < w->n_t ? w->t[i].bytes : 0; }

static int w_pad(gguf_w *w, uint64_t pos)
{
    static const uint8_t zero[GGUF_W_ALIGN];
    uint64_t pad = (GGUF_W_ALIGN - pos % GGUF_W_ALIGN) % GGUF_W_ALIGN;
    if (pad && fwrite(zero, 1, (size_t)pad, w->fp) != pad)
        return hy_err_set(HY_EIO, "writing %s failed", w->path);
    return HY_OK;
}

int gguf_w_begin(gguf_w *w, const char *path)
{
    if (w->fp)
        return hy_err_set(HY_EINVAL, "GGUF writer: begin called twice");
    w->path = strdup(path);
    if (!w->path)
        return hy_err_set(HY_ENOMEM, "out of memory");
    w->fp = fopen(path, "wb");
    if (!w->fp)
        return hy_err_set(HY_EIO, "cannot create %s", path);
    /* header and tensor infos go through the kv buffer's tail so one fwrite path handles errors */
    size_t kv_len = w->kv_len;
    uint32_t magic_ver[2] = {0x46554747u, 3}; /* "GGUF", version 3 */
    uint64_t counts[2] = {w->n_t, w->n_kv};
    int rc = HY_OK;
    if (fwrite(magic_ver, 4, 2, w->fp) != 2 || fwrite(counts, 8, 2, w->fp) != 2 ||
        fwrite(w->kv, 1, kv_len, w->fp) != kv_len)
        return hy_err_set(HY_EIO, "writing %s failed", path);
    uint64_t pos = 24 + kv_len;
    for (uint64_t i = 0; i < w->n_t; i++) {
        const gguf_w_tensor *t = &w->t[i];
        w->kv_len = kv_len; /* reuse the buffer's tail as scratch */
        if ((rc = w_strn(w, t->name, strlen(t->name))) || (rc = w_u32(w, t->n_dims)))
            return rc;
        for (uint32_t d = 0; d < t->n_dims; d++)
            if ((rc = w_u64(w, t->ne[d])))
                return rc;
        if ((rc = w_u32(w, t->type)) || (rc = w_u64(w, t->offset)))
            return rc;
        size_t n = w->kv_len - kv_len;
        if (fwrite(w->kv + kv_len, 1, n, w->fp) != n)
            return hy_err_set(HY_EIO, "writing %s failed", path);
        pos += n;
    }
    w->kv_len = kv_len;
    return w_pad(w, pos);
}

int gguf_w_tensor_data(gguf_w *w, const void *data, size_t nbytes)
{
    if (!w->fp || w->next >= w->n_t)
        return hy_err_set(HY_EINVAL, "GGUF writer: no tensor data due");
    const gguf_w_tensor *t = &w->t[w->next];
    if (nbytes != t->bytes)
        return hy_err_set(HY_EINVAL, "GGUF writer: tensor %s wants %zu bytes, got %zu", t->name, t->bytes,
                          nbytes);
    if (fwrite(data, 1, nbytes, w->fp) != nbytes)
        return hy_err_set(HY_EIO, "writing %s failed (disk full?)", w->path);
    w->next++;
    return w_pad(w, nbytes);
}

int gguf_w_finish(gguf_w *w)
{
    if (!w->fp)
        return hy_err_set(HY_EINVAL, "GGUF writer: finish before begin");
    if (w->next != w->n_t)
        return hy_err_set(HY_EINVAL, "GGUF writer: %llu of %llu tensors written",
                          (unsigned long long)w->next, (unsigned long long)w->n_t);
    int bad = fflush(w->fp) != 0;
    bad |= fclose(w->fp) != 0;
    w->fp = NULL;
    if (bad)
        return hy_err_set(HY_EIO, "writing %s failed", w->path);
    return HY_OK;
}

/* ---- quantisers: the formats quant.h's dequantisers read ---- */

static void put_f16(uint8_t *p, float f)
{
    uint16_t h = q_f32_to_f16(f);
    memcpy(p, &h, 2);
}

static void quant_q8_0(const float *x, uint8_t *blk)
{
    float amax = 0.0f;
    for (int i = 0; i < 32; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
    put_f16(blk, d);
    for (int i = 0; i < 32; i++)
        blk[2 + i] = (uint8_t)(int8_t)lrintf(x[i] * id);
}

static void quant_q4_0(const float *x, uint8_t *blk)
{
    /* the value of largest magnitude maps to -8 so the full signed range is used */
    float amax = 0.0f, vmax = 0.0f;
    for (int i = 0; i < 32; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            vmax = x[i];
        }
    const float d = vmax / -8.0f, id = d ? 1.0f / d : 0.0f;
    put_f16(blk, d);
    for (int i = 0; i < 16; i++) {
        int a = (int)lrintf(x[i] * id) + 8, b = (int)lrintf(x[i + 16] * id) + 8;
        a = a < 0 ? 0 : a > 15 ? 15 : a;
        b = b < 0 ? 0 : b > 15 ? 15 : b;
        blk[2 + i] = (uint8_t)(a | (b << 4));
    }
}

static void quant_q4_1(const float *x, uint8_t *blk)
{
    float mn = x[0], mx = x[0];
    for (int i = 1; i < 32; i++) {
        mn = fminf(mn, x[i]);
        mx = fmaxf(mx, x[i]);
    }
    const float d = (mx - mn) / 15.0f, id = d ? 1.0f / d : 0.0f;
    put_f16(blk, d);
    put_f16(blk + 2, mn);
    for (int i = 0; i < 16; i++) {
        int a = (int)lrintf((x[i] - mn) * id), b = (int)lrintf((x[i + 16] - mn) * id);
        a = a < 0 ? 0 : a > 15 ? 15 : a;
        b = b < 0 ? 0 : b > 15 ? 15 : b;
        blk[4 + i] = (uint8_t)(a | (b << 4));
    }
}

int gguf_w_quantize(uint32_t type, const float *src, void *dst, int64_t n)
{
    uint8_t *o = dst;
    switch (type) {
    case Q_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        return HY_OK;
    case Q_F16:
        for (int64_t i = 0; i < n; i++)
            put_f16(o + 2 * i, src[i]);
        return HY_OK;
    case Q_Q8_0:
    case Q_Q4_0:
    case Q_Q4_1:
        break;
    default:
        return hy_err_set(HY_EUNSUPPORTED, "no quantiser for %s", q_type_name(type));
    }
    if (n % 32)
        return hy_err_set(HY_EINVAL, "quantise: %lld values is not a multiple of 32", (long long)n);
    const size_t bb = q_block_bytes(type);
    for (int64_t b = 0; b < n / 32; b++) {
        if (type == Q_Q8_0)
            quant_q8_0(src + 32 * b, o + bb * b);
        else if (type == Q_Q4_0)
            quant_q4_0(src + 32 * b, o + bb * b);
        else
            quant_q4_1(src + 32 * b, o + bb * b);
    }
    return HY_OK;
}
