/* safetensors.c - parse and check a safetensors file: 8-byte little-endian header length,
 * a JSON header (jansson) naming each tensor's dtype, shape and [begin, end) byte range in
 * the data section. Every number from the file is checked before use; nothing is trusted. */
#include "adapters/safetensors.h"
#include "engine/hy.h"
#include "engine/quant.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct st_file {
    void *map;          /* owned mapping (NULL for st_open_mem) */
    size_t map_len;
    const uint8_t *buf; /* whole file */
    size_t len;
    st_tensor *t;       /* [n], sorted by data offset */
    char **names;       /* [n], owned */
    size_t n;
};

const char *st_dtype_name(st_dtype t)
{
    switch (t) {
    case ST_F32: return "F32";
    case ST_F16: return "F16";
    case ST_BF16: return "BF16";
    }
    return "?";
}

size_t st_dtype_size(st_dtype t) { return t == ST_F32 ? 4 : 2; }

static int st_parse_dtype(const char *s, st_dtype *out)
{
    if (!strcmp(s, "F32"))
        *out = ST_F32;
    else if (!strcmp(s, "F16"))
        *out = ST_F16;
    else if (!strcmp(s, "BF16"))
        *out = ST_BF16;
    else
        return HY_EUNSUPPORTED;
    return HY_OK;
}

void st_close(st_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n; i++)
        free(f->names[i]);
    free(f->names);
    free(f->t);
    if (f->map)
        munmap(f->map, f->map_len);
    free(f);
}

/* Read one non-negative JSON integer. */
static int st_uint(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return HY_EFORMAT;
    *out = (uint64_t)json_integer_value(v);
    return HY_OK;
}

/* Fill t from the header entry `val` named `name`; data_len is the data section's size. */
static int st_parse_entry(const char *name, const json_t *val, const uint8_t *data, size_t data_len,
                          st_tensor *t)
{
    if (!json_is_object(val))
        return hy_err_set(HY_EFORMAT, "safetensors: tensor '%s': header entry is not an object", name);
    const json_t *jd = json_object_get(val, "dtype");
    const json_t *js = json_object_get(val, "shape");
    const json_t *jo = json_object_get(val, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2)
        return hy_err_set(HY_EFORMAT,
                          "safetensors: tensor '%s': needs \"dtype\" (string), \"shape\" (array) and "
                          "\"data_offsets\" ([begin, end])", name);
    if (st_parse_dtype(json_string_value(jd), &t->dtype))
        return hy_err_set(HY_EUNSUPPORTED,
                          "safetensors: tensor '%s' has dtype %s; only F32, F16 and BF16 are supported",
                          name, json_string_value(jd));
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS)
        return hy_err_set(HY_EFORMAT, "safetensors: tensor '%s' has %zu dimensions (max %d)", name, nd,
                          ST_MAX_DIMS);
    t->n_dims = (int)nd;
    uint64_t n_elem = 1;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (st_uint(json_array_get(js, i), &d) || d > INT64_MAX)
            return hy_err_set(HY_EFORMAT, "safetensors: tensor '%s': shape[%zu] is not a non-negative integer",
                              name, i);
        t->shape[i] = (int64_t)d;
        if (d != 0 && n_elem > UINT64_MAX / d)
            return hy_err_set(HY_EFORMAT, "safetensors: tensor '%s': shape overflows", name);
        n_elem *= d;
    }
    t->n_elem = n_elem;
    uint64_t b, e;
    if (st_uint(json_array_get(jo, 0), &b) || st_uint(json_array_get(jo, 1), &e))
        return hy_err_set(HY_EFORMAT, "safetensors: tensor '%s': data_offsets are not non-negative integers",
                          name);
    if (b > e || e > data_len)
        return hy_err_set(HY_EFORMAT,
                          "safetensors: tensor '%s': data_offsets [%llu, %llu] lie outside the %zu-byte data "
                          "section", name, (unsigned long long)b, (unsigned long long)e, data_len);
    uint64_t esz = st_dtype_size(t->dtype);
    if (n_elem > UINT64_MAX / esz || n_elem * esz != e - b)
        return hy_err_set(HY_EFORMAT,
                          "safetensors: tensor '%s': %llu bytes in data_offsets but shape x %s needs %llu",
                          name, (unsigned long long)(e - b), st_dtype_name(t->dtype),
                          (unsigned long long)(n_elem <= UINT64_MAX / esz ? n_elem * esz : UINT64_MAX));
    t->data = data + b;
    t->nbytes = (size_t)(e - b);
    return HY_OK;
}

static int st_cmp_off(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    if (x->data != y->data)
        return (const uint8_t *)x->data < (const uint8_t *)y->data ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static int st_parse(st_file *f)
{
    if (f->len < 8)
        return hy_err_set(HY_EFORMAT, "safetensors: file is %zu bytes, shorter than the 8-byte header length",
                          f->len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | f->buf[i];
    if (hlen > f->len - 8)
        return hy_err_set(HY_EFORMAT, "safetensors: header length %llu runs past the end of the %zu-byte file",
                          (unsigned long long)hlen, f->len);
    if (hlen > ST_MAX_HEADER)
        return hy_err_set(HY_EFORMAT, "safetensors: header length %llu exceeds the %u-byte limit",
                          (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen < 2)
        return hy_err_set(HY_EFORMAT, "safetensors: header of %llu bytes cannot hold a JSON object",
                          (unsigned long long)hlen);
    const uint8_t *data = f->buf + 8 + hlen;
    size_t data_len = f->len - 8 - (size_t)hlen;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)f->buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return hy_err_set(HY_EFORMAT, "safetensors: header is not valid JSON (%s at byte %d)", jerr.text,
                          jerr.position);
    int rc = HY_OK;
    if (!json_is_object(root)) {
        rc = hy_err_set(HY_EFORMAT, "safetensors: header is not a JSON object");
        goto done;
    }
    size_t cap = json_object_size(root);
    f->t = calloc(cap ? cap : 1, sizeof *f->t);
    f->names = calloc(cap ? cap : 1, sizeof *f->names);
    if (!f->t || !f->names) {
        rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory for %zu tensor entries", cap);
        goto done;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__"))
            continue;
        char *nm = strdup(key);
        if (!nm) {
            rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory");
            goto done;
        }
        f->names[f->n] = nm;
        st_tensor *t = &f->t[f->n++];
        t->name = nm;
        if ((rc = st_parse_entry(key, val, data, data_len, t)))
            goto done;
    }
    /* Byte ranges must not overlap (empty tensors may sit anywhere). */
    qsort(f->t, f->n, sizeof *f->t, st_cmp_off);
    for (size_t i = 1; i < f->n; i++) {
        const st_tensor *p = &f->t[i - 1], *c = &f->t[i];
        if (p->nbytes && c->nbytes && (const uint8_t *)p->data + p->nbytes > (const uint8_t *)c->data) {
            rc = hy_err_set(HY_EFORMAT, "safetensors: tensors '%s' and '%s' overlap in the data section",
                            p->name, c->name);
            goto done;
        }
    }
done:
    json_decref(root);
    return rc;
}

int st_open_mem(const void *buf, size_t len, st_file **out)
{
    *out = NULL;
    st_file *f = calloc(1, sizeof *f);
    if (!f)
        return hy_err_set(HY_ENOMEM, "safetensors: out of memory");
    f->buf = buf;
    f->len = len;
    int rc = st_parse(f);
    if (rc) {
        st_close(f);
        return rc;
    }
    *out = f;
    return HY_OK;
}

int st_open(const char *path, st_file **out)
{
    *out = NULL;
    int rc;
    st_file *f = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return hy_err_set(HY_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        rc = hy_err_set(HY_EIO, "%s is not a readable regular file", path);
        goto fail;
    }
    f = calloc(1, sizeof *f);
    if (!f) {
        rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory");
        goto fail;
    }
    f->len = (size_t)sb.st_size;
    if (f->len > 0) {
        void *m = mmap(NULL, f->len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            rc = hy_err_set(HY_EIO, "cannot map %s: %s", path, strerror(errno));
            goto fail;
        }
        f->map = m;
        f->map_len = f->len;
        f->buf = m;
    }
    close(fd);
    fd = -1;
    if ((rc = st_parse(f))) {
        hy_err_wrap(rc, "%s", path);
        goto fail;
    }
    *out = f;
    return HY_OK;
fail:
    if (fd >= 0)
        close(fd);
    st_close(f);
    return rc;
}

size_t st_n_tensors(const st_file *f) { return f->n; }

const st_tensor *st_tensor_at(const st_file *f, size_t i) { return i < f->n ? &f->t[i] : NULL; }

const st_tensor *st_find(const st_file *f, const char *name)
{
    for (size_t i = 0; i < f->n; i++)
        if (!strcmp(f->t[i].name, name))
            return &f->t[i];
    return NULL;
}

void st_to_f32(const st_tensor *t, float *dst)
{
    const uint8_t *p = t->data;
    if (t->dtype == ST_F32) {
        memcpy(dst, p, t->n_elem * 4);
        return;
    }
    for (uint64_t i = 0; i < t->n_elem; i++) {
        uint16_t h = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
        dst[i] = t->dtype == ST_F16 ? q_f16_to_f32(h) : q_bf16_to_f32(h);
    }
}

/* ---- writer ---- */

int st_write(const char *path, const st_wtensor *t, size_t n, const char *metadata_format)
{
    int rc = HY_OK;
    char *hdr = NULL;
    FILE *fp = NULL;
    json_t *root = json_object();
    if (!root)
        return hy_err_set(HY_ENOMEM, "safetensors: out of memory");
    if (metadata_format) {
        json_t *md = json_pack("{s:s}", "format", metadata_format);
        if (!md || json_object_set_new(root, "__metadata__", md)) {
            rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory");
            goto done;
        }
    }
    uint64_t off = 0;
    size_t *nbytes = calloc(n ? n : 1, sizeof *nbytes);
    if (!nbytes) {
        rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory");
        goto done;
    }
    for (size_t i = 0; i < n && !rc; i++) {
        json_t *shape = json_array();
        size_t ne = 1;
        for (int d = 0; d < t[i].n_dims && shape; d++) {
            json_array_append_new(shape, json_integer(t[i].shape[d]));
            if (t[i].shape[d] < 0 || hy_mul_size(ne, (size_t)t[i].shape[d], &ne))
                rc = hy_err_set(HY_EINVAL, "safetensors: bad shape for '%s'", t[i].name);
        }
        if (!rc && hy_mul_size(ne, st_dtype_size(t[i].dtype), &nbytes[i]))
            rc = hy_err_set(HY_EINVAL, "safetensors: '%s' is too large", t[i].name);
        if (rc || !shape) {
            json_decref(shape);
            rc = rc ? rc : hy_err_set(HY_ENOMEM, "safetensors: out of memory");
            break;
        }
        /* "o" steals shape's reference, also when json_pack fails. */
        json_t *e = json_pack("{s:s,s:o,s:[I,I]}", "dtype", st_dtype_name(t[i].dtype), "shape", shape,
                              "data_offsets", (json_int_t)off, (json_int_t)(off + nbytes[i]));
        if (!e || json_object_set_new(root, t[i].name, e))
            rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory");
        off += nbytes[i];
    }
    if (rc)
        goto done_nb;
    hdr = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
    if (!hdr) {
        rc = hy_err_set(HY_ENOMEM, "safetensors: out of memory");
        goto done_nb;
    }
    size_t hlen = strlen(hdr), padded = (hlen + 7) & ~(size_t)7;
    fp = fopen(path, "wb");
    if (!fp) {
        rc = hy_err_set(HY_EIO, "cannot create %s: %s", path, strerror(errno));
        goto done_nb;
    }
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++)
        lenb[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    int ok = fwrite(lenb, 1, 8, fp) == 8 && fwrite(hdr, 1, hlen, fp) == hlen;
    for (size_t i = hlen; i < padded && ok; i++)
        ok = fputc(' ', fp) != EOF;
    for (size_t i = 0; i < n && ok; i++)
        ok = fwrite(t[i].data, 1, nbytes[i], fp) == nbytes[i];
    if (fclose(fp) != 0)
        ok = 0;
    fp = NULL;
    if (!ok)
        rc = hy_err_set(HY_EIO, "cannot write %s: %s", path, strerror(errno));
done_nb:
    free(nbytes);
done:
    free(hdr);
    json_decref(root);
    return rc;
}
