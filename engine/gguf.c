/* gguf.c - GGUF v2/v3 reader over an mmap'ed (or caller-owned) buffer.
 * Every count, length and offset is checked against the bytes that remain before use;
 * it parses metadata and tensor infos only and never interprets what a model means. */
#include "gguf.h"
#include "hy.h"
#include "quant.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_DEFAULT_ALIGN 32
#define GGUF_MAX_DEPTH 8

struct gguf_file {
    const uint8_t *base;
    size_t size;
    int mapped; /* 1: munmap on close */
    uint32_t version;
    uint64_t n_kv, n_tensors;
    gguf_kv *kvs;
    gguf_tensor *tensors;
    /* every array allocated while parsing metadata, freed on close */
    void **allocs;
    size_t n_allocs, cap_allocs;
};

typedef struct {
    gguf_file *f;
    size_t off;
} gguf_cur;

static int cur_need(gguf_cur *c, uint64_t n, const char *what)
{
    if (n > c->f->size - c->off)
        return hy_err_set(HY_EFORMAT, "truncated file: %s needs %llu bytes at offset %zu, %zu remain",
                          what, (unsigned long long)n, c->off, c->f->size - c->off);
    return HY_OK;
}

static int cur_u32(gguf_cur *c, uint32_t *out, const char *what)
{
    int rc = cur_need(c, 4, what);
    if (rc)
        return rc;
    memcpy(out, c->f->base + c->off, 4);
    c->off += 4;
    return HY_OK;
}

static int cur_u64(gguf_cur *c, uint64_t *out, const char *what)
{
    int rc = cur_need(c, 8, what);
    if (rc)
        return rc;
    memcpy(out, c->f->base + c->off, 8);
    c->off += 8;
    return HY_OK;
}

static int cur_str(gguf_cur *c, gguf_str *out, const char *what)
{
    uint64_t len;
    int rc = cur_u64(c, &len, what);
    if (rc)
        return rc;
    if ((rc = cur_need(c, len, what)))
        return rc;
    out->ptr = (const char *)c->f->base + c->off;
    out->len = len;
    c->off += len;
    return HY_OK;
}

/* Allocate n * size bytes owned by the file (freed in gguf_close). */
static void *file_alloc(gguf_file *f, uint64_t n, size_t size)
{
    size_t bytes;
    if (n > SIZE_MAX || hy_mul_size((size_t)n, size, &bytes))
        return NULL;
    if (f->n_allocs == f->cap_allocs) {
        size_t cap = f->cap_allocs ? f->cap_allocs * 2 : 16;
        void **a = realloc(f->allocs, cap * sizeof *a);
        if (!a)
            return NULL;
        f->allocs = a;
        f->cap_allocs = cap;
    }
    void *p = calloc(bytes ? bytes : 1, 1);
    if (p)
        f->allocs[f->n_allocs++] = p;
    return p;
}

size_t gguf_vtype_size(gguf_vtype t)
{
    switch (t) {
    case GGUF_VT_U8: case GGUF_VT_I8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_U16: case GGUF_VT_I16: return 2;
    case GGUF_VT_U32: case GGUF_VT_I32: case GGUF_VT_F32: return 4;
    case GGUF_VT_U64: case GGUF_VT_I64: case GGUF_VT_F64: return 8;
    default: return 0;
    }
}

static int parse_value(gguf_cur *c, gguf_vtype type, gguf_value *out, int depth);

static int parse_array(gguf_cur *c, gguf_arr *a, int depth)
{
    uint32_t elem;
    uint64_t n;
    int rc;
    if (depth >= GGUF_MAX_DEPTH)
        return hy_err_set(HY_EFORMAT, "arrays nested deeper than %d at offset %zu", GGUF_MAX_DEPTH, c->off);
    if ((rc = cur_u32(c, &elem, "array type")) || (rc = cur_u64(c, &n, "array length")))
        return rc;
    a->elem = (gguf_vtype)elem;
    a->n = n;
    size_t ss = gguf_vtype_size(a->elem);
    if (ss) {
        if (n > (c->f->size - c->off) / ss)
            return hy_err_set(HY_EFORMAT, "array of %llu elements at offset %zu runs past the end of the file",
                              (unsigned long long)n, c->off);
        a->data = c->f->base + c->off;
        c->off += (size_t)n * ss;
        return HY_OK;
    }
    if (a->elem == GGUF_VT_STRING) {
        if (n > (c->f->size - c->off) / 8)
            return hy_err_set(HY_EFORMAT, "string array of %llu elements at offset %zu runs past the end of the file",
                              (unsigned long long)n, c->off);
        gguf_str *s = file_alloc(c->f, n, sizeof *s);
        if (!s)
            return hy_err_set(HY_ENOMEM, "out of memory for a string array of %llu elements", (unsigned long long)n);
        for (uint64_t i = 0; i < n; i++)
            if ((rc = cur_str(c, &s[i], "array string")))
                return rc;
        a->strs = s;
        return HY_OK;
    }
    if (a->elem == GGUF_VT_ARRAY) {
        if (n > (c->f->size - c->off) / 12)
            return hy_err_set(HY_EFORMAT, "nested array of %llu elements at offset %zu runs past the end of the file",
                              (unsigned long long)n, c->off);
        gguf_value *items = file_alloc(c->f, n, sizeof *items);
        if (!items)
            return hy_err_set(HY_ENOMEM, "out of memory for a nested array of %llu elements", (unsigned long long)n);
        for (uint64_t i = 0; i < n; i++)
            if ((rc = parse_value(c, GGUF_VT_ARRAY, &items[i], depth + 1)))
                return rc;
        a->items = items;
        return HY_OK;
    }
    return hy_err_set(HY_EFORMAT, "unknown array element type %u at offset %zu", elem, c->off);
}

static int parse_value(gguf_cur *c, gguf_vtype type, gguf_value *out, int depth)
{
    out->type = type;
    size_t ss = gguf_vtype_size(type);
    if (ss) {
        int rc = cur_need(c, ss, "value");
        if (rc)
            return rc;
        const uint8_t *p = c->f->base + c->off;
        uint8_t u8; uint16_t u16; uint32_t u32; uint64_t u64; float f32; double f64;
        switch (type) {
        case GGUF_VT_U8: u8 = p[0]; out->v.u = u8; break;
        case GGUF_VT_I8: out->v.i = (int8_t)p[0]; break;
        case GGUF_VT_BOOL:
            if (p[0] > 1)
                return hy_err_set(HY_EFORMAT, "bool value %u at offset %zu", p[0], c->off);
            out->v.b = p[0];
            break;
        case GGUF_VT_U16: memcpy(&u16, p, 2); out->v.u = u16; break;
        case GGUF_VT_I16: memcpy(&u16, p, 2); out->v.i = (int16_t)u16; break;
        case GGUF_VT_U32: memcpy(&u32, p, 4); out->v.u = u32; break;
        case GGUF_VT_I32: memcpy(&u32, p, 4); out->v.i = (int32_t)u32; break;
        case GGUF_VT_F32: memcpy(&f32, p, 4); out->v.f = f32; break;
        case GGUF_VT_U64: memcpy(&u64, p, 8); out->v.u = u64; break;
        case GGUF_VT_I64: memcpy(&u64, p, 8); out->v.i = (int64_t)u64; break;
        case GGUF_VT_F64: memcpy(&f64, p, 8); out->v.f = f64; break;
        default: break;
        }
        c->off += ss;
        return HY_OK;
    }
    if (type == GGUF_VT_STRING)
        return cur_str(c, &out->v.s, "string value");
    if (type == GGUF_VT_ARRAY)
        return parse_array(c, &out->v.arr, depth);
    return hy_err_set(HY_EFORMAT, "unknown value type %u at offset %zu", (unsigned)type, c->off);
}

static int parse_kvs(gguf_cur *c)
{
    gguf_file *f = c->f;
    /* each kv needs at least 8 (key length) + 4 (type) + 1 bytes */
    if (f->n_kv > (f->size - c->off) / 13)
        return hy_err_set(HY_EFORMAT, "metadata count %llu is larger than the file can hold",
                          (unsigned long long)f->n_kv);
    f->kvs = file_alloc(f, f->n_kv, sizeof *f->kvs);
    if (!f->kvs && f->n_kv)
        return hy_err_set(HY_ENOMEM, "out of memory for %llu metadata entries", (unsigned long long)f->n_kv);
    for (uint64_t i = 0; i < f->n_kv; i++) {
        gguf_kv *kv = &f->kvs[i];
        uint32_t type;
        int rc;
        if ((rc = cur_str(c, &kv->key, "metadata key")) || (rc = cur_u32(c, &type, "metadata type")))
            return rc;
        if ((rc = parse_value(c, (gguf_vtype)type, &kv->value, 0)))
            return hy_err_wrap(rc, "metadata '%.*s'", (int)HY_MIN(kv->key.len, 200), kv->key.ptr);
    }
    return HY_OK;
}

static int parse_tensor_info(gguf_cur *c, gguf_tensor *t)
{
    int rc;
    if ((rc = cur_str(c, &t->name, "tensor name")) || (rc = cur_u32(c, &t->n_dims, "tensor n_dims")))
        return rc;
    if (t->n_dims == 0 || t->n_dims > 4)
        return hy_err_set(HY_EFORMAT, "tensor '%.*s' has %u dimensions (1..4 allowed)",
                          (int)HY_MIN(t->name.len, 200), t->name.ptr, t->n_dims);
    for (int d = 0; d < 4; d++)
        t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
        if ((rc = cur_u64(c, &t->ne[d], "tensor dimension")))
            return rc;
    if ((rc = cur_u32(c, &t->type, "tensor type")) || (rc = cur_u64(c, &t->offset, "tensor offset")))
        return rc;
    return HY_OK;
}

/* Size the tensor and check its data lies inside the file, aligned. */
static int place_tensor(gguf_file *f, gguf_tensor *t, size_t data_start, uint64_t align)
{
    const int nl = (int)HY_MIN(t->name.len, 200);
    if (!q_supported(t->type))
        return hy_err_set(HY_EUNSUPPORTED, "tensor '%.*s' has unsupported type %s", nl, t->name.ptr,
                          q_type_name(t->type));
    size_t row, rows = 1, nbytes;
    for (int d = 0; d < 4; d++) {
        if (t->ne[d] == 0 || t->ne[d] > ((uint64_t)1 << 40))
            return hy_err_set(HY_EFORMAT, "tensor '%.*s' has a bad dimension %llu", nl, t->name.ptr,
                              (unsigned long long)t->ne[d]);
    }
    if (q_row_bytes(t->type, (int64_t)t->ne[0], &row))
        return hy_err_wrap(HY_EFORMAT, "tensor '%.*s'", nl, t->name.ptr);
    for (int d = 1; d < 4; d++)
        if (hy_mul_size(rows, (size_t)t->ne[d], &rows))
            return hy_err_wrap(HY_EFORMAT, "tensor '%.*s'", nl, t->name.ptr);
    if (hy_mul_size(row, rows, &nbytes))
        return hy_err_wrap(HY_EFORMAT, "tensor '%.*s'", nl, t->name.ptr);
    if (t->offset % align)
        return hy_err_set(HY_EFORMAT, "tensor '%.*s' offset %llu is not a multiple of the alignment %llu", nl,
                          t->name.ptr, (unsigned long long)t->offset, (unsigned long long)align);
    if (t->offset > f->size - data_start || nbytes > f->size - data_start - t->offset)
        return hy_err_set(HY_EFORMAT, "tensor '%.*s' data (offset %llu, %zu bytes) lies past the end of the file",
                          nl, t->name.ptr, (unsigned long long)t->offset, nbytes);
    t->nbytes = nbytes;
    t->data = f->base + data_start + t->offset;
    return HY_OK;
}

static int parse_tensors(gguf_cur *c)
{
    gguf_file *f = c->f;
    /* each info needs at least 8 + 4 + 8 + 4 + 8 bytes */
    if (f->n_tensors > (f->size - c->off) / 32)
        return hy_err_set(HY_EFORMAT, "tensor count %llu is larger than the file can hold",
                          (unsigned long long)f->n_tensors);
    f->tensors = file_alloc(f, f->n_tensors, sizeof *f->tensors);
    if (!f->tensors && f->n_tensors)
        return hy_err_set(HY_ENOMEM, "out of memory for %llu tensor infos", (unsigned long long)f->n_tensors);
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        int rc = parse_tensor_info(c, &f->tensors[i]);
        if (rc)
            return hy_err_wrap(rc, "tensor info %llu", (unsigned long long)i);
    }
    uint64_t align = GGUF_DEFAULT_ALIGN;
    const gguf_value *av = gguf_find(f, "general.alignment");
    if (av) {
        if (av->type != GGUF_VT_U32 || av->v.u == 0 || (av->v.u & (av->v.u - 1)))
            return hy_err_set(HY_EFORMAT, "general.alignment must be a power-of-two u32");
        align = av->v.u;
    }
    size_t data_start = c->off + (align - c->off % align) % align;
    if (data_start > f->size)
        return hy_err_set(HY_EFORMAT, "data section starts at %zu, past the end of the file (%zu bytes)",
                          data_start, f->size);
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        int rc = place_tensor(f, &f->tensors[i], data_start, align);
        if (rc)
            return rc;
        for (uint64_t j = 0; j < i; j++)
            if (f->tensors[j].name.len == f->tensors[i].name.len &&
                !memcmp(f->tensors[j].name.ptr, f->tensors[i].name.ptr, f->tensors[i].name.len))
                return hy_err_set(HY_EFORMAT, "tensor '%.*s' appears twice", (int)HY_MIN(f->tensors[i].name.len, 200),
                                  f->tensors[i].name.ptr);
    }
    return HY_OK;
}

static int parse(gguf_file *f)
{
    gguf_cur c = {f, 0};
    uint32_t magic;
    int rc;
    if ((rc = cur_u32(&c, &magic, "magic")))
        return rc;
    if (magic != GGUF_MAGIC)
        return hy_err_set(HY_EFORMAT, "not a GGUF file (bad magic 0x%08x)", magic);
    if ((rc = cur_u32(&c, &f->version, "version")))
        return rc;
    if (f->version != 2 && f->version != 3)
        return hy_err_set(HY_EUNSUPPORTED, "GGUF version %u is not supported (2 and 3 are)", f->version);
    if ((rc = cur_u64(&c, &f->n_tensors, "tensor count")) || (rc = cur_u64(&c, &f->n_kv, "metadata count")))
        return rc;
    if ((rc = parse_kvs(&c)))
        return rc;
    return parse_tensors(&c);
}

int gguf_open_mem(const void *buf, size_t len, gguf_file **out)
{
    *out = NULL;
    gguf_file *f = calloc(1, sizeof *f);
    if (!f)
        return hy_err_set(HY_ENOMEM, "out of memory");
    f->base = buf;
    f->size = len;
    int rc = parse(f);
    if (rc) {
        gguf_close(f);
        return rc;
    }
    *out = f;
    return HY_OK;
}

int gguf_open(const char *path, gguf_file **out)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return hy_err_set(HY_EIO, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return hy_err_set(HY_EIO, "not a regular file");
    }
    if (st.st_size == 0) {
        close(fd);
        return hy_err_set(HY_EFORMAT, "empty file");
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return hy_err_set(HY_EIO, "cannot mmap: %s", strerror(errno));
    int rc = gguf_open_mem(map, (size_t)st.st_size, out);
    if (rc) {
        munmap(map, (size_t)st.st_size);
        return rc;
    }
    (*out)->mapped = 1;
    return HY_OK;
}

void gguf_close(gguf_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n_allocs; i++)
        free(f->allocs[i]);
    free(f->allocs);
    if (f->mapped)
        munmap((void *)f->base, f->size);
    free(f);
}

uint32_t gguf_version(const gguf_file *f) { return f->version; }
uint64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }
const gguf_kv *gguf_kv_at(const gguf_file *f, uint64_t i) { return i < f->n_kv ? &f->kvs[i] : NULL; }
uint64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }
const gguf_tensor *gguf_tensor_at(const gguf_file *f, uint64_t i) { return i < f->n_tensors ? &f->tensors[i] : NULL; }
size_t gguf_file_size(const gguf_file *f) { return f->size; }

bool gguf_str_eq(gguf_str s, const char *c)
{
    size_t n = strlen(c);
    return s.len == n && !memcmp(s.ptr, c, n);
}

const gguf_value *gguf_find(const gguf_file *f, const char *key)
{
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (gguf_str_eq(f->kvs[i].key, key))
            return &f->kvs[i].value;
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (gguf_str_eq(f->tensors[i].name, name))
            return &f->tensors[i];
    return NULL;
}

/* The value of `key`, or HY_ENOTFOUND with the message every getter gives. */
static int find_value(const gguf_file *f, const char *key, const gguf_value **v)
{
    *v = gguf_find(f, key);
    return *v ? HY_OK : hy_err_set(HY_ENOTFOUND, "metadata key '%s' is missing", key);
}

/* The value of `key` when it has type t (what names the type in the message). */
static int find_typed(const gguf_file *f, const char *key, gguf_vtype t, const char *what, const gguf_value **v)
{
    int rc = find_value(f, key, v);
    if (!rc && (*v)->type != t)
        rc = hy_err_set(HY_EFORMAT, "metadata '%s' is not %s", key, what);
    return rc;
}

static int get_int(const gguf_file *f, const char *key, int64_t lo, int64_t hi, int64_t *out)
{
    const gguf_value *v;
    int rc = find_value(f, key, &v);
    if (rc)
        return rc;
    switch (v->type) {
    case GGUF_VT_U8: case GGUF_VT_U16: case GGUF_VT_U32: case GGUF_VT_U64:
        if (v->v.u > (uint64_t)hi)
            break;
        *out = (int64_t)v->v.u;
        return HY_OK;
    case GGUF_VT_I8: case GGUF_VT_I16: case GGUF_VT_I32: case GGUF_VT_I64:
        if (v->v.i < lo || v->v.i > hi)
            break;
        *out = v->v.i;
        return HY_OK;
    default:
        return hy_err_set(HY_EFORMAT, "metadata '%s' is not an integer", key);
    }
    return hy_err_set(HY_EFORMAT, "metadata '%s' is out of range", key);
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out)
{
    int64_t v;
    int rc = get_int(f, key, 0, UINT32_MAX, &v);
    if (!rc)
        *out = (uint32_t)v;
    return rc;
}

int gguf_get_i32(const gguf_file *f, const char *key, int32_t *out)
{
    int64_t v;
    int rc = get_int(f, key, INT32_MIN, INT32_MAX, &v);
    if (!rc)
        *out = (int32_t)v;
    return rc;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out)
{
    const gguf_value *v;
    int rc = find_value(f, key, &v);
    if (rc)
        return rc;
    if (v->type == GGUF_VT_F32 || v->type == GGUF_VT_F64) {
        *out = (float)v->v.f;
        return HY_OK;
    }
    int64_t i;
    if (get_int(f, key, INT32_MIN, INT32_MAX, &i))
        return hy_err_set(HY_EFORMAT, "metadata '%s' is not a number", key);
    *out = (float)i;
    return HY_OK;
}

int gguf_get_bool(const gguf_file *f, const char *key, bool *out)
{
    const gguf_value *v;
    int rc = find_typed(f, key, GGUF_VT_BOOL, "a bool", &v);
    if (!rc)
        *out = v->v.b;
    return rc;
}

int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out)
{
    const gguf_value *v;
    int rc = find_typed(f, key, GGUF_VT_STRING, "a string", &v);
    if (!rc)
        *out = v->v.s;
    return rc;
}

int gguf_get_arr(const gguf_file *f, const char *key, gguf_arr *out)
{
    const gguf_value *v;
    int rc = find_typed(f, key, GGUF_VT_ARRAY, "an array", &v);
    if (!rc)
        *out = v->v.arr;
    return rc;
}

int gguf_arr_int(const gguf_arr *a, uint64_t i, int64_t *out)
{
    if (i >= a->n || !a->data)
        return hy_err_set(HY_EINVAL, "array index %llu out of range", (unsigned long long)i);
    const uint8_t *p = (const uint8_t *)a->data + i * gguf_vtype_size(a->elem);
    uint16_t u16; uint32_t u32; uint64_t u64;
    switch (a->elem) {
    case GGUF_VT_U8: case GGUF_VT_BOOL: *out = p[0]; return HY_OK;
    case GGUF_VT_I8: *out = (int8_t)p[0]; return HY_OK;
    case GGUF_VT_U16: memcpy(&u16, p, 2); *out = u16; return HY_OK;
    case GGUF_VT_I16: memcpy(&u16, p, 2); *out = (int16_t)u16; return HY_OK;
    case GGUF_VT_U32: memcpy(&u32, p, 4); *out = u32; return HY_OK;
    case GGUF_VT_I32: memcpy(&u32, p, 4); *out = (int32_t)u32; return HY_OK;
    case GGUF_VT_U64: case GGUF_VT_I64: memcpy(&u64, p, 8); *out = (int64_t)u64; return HY_OK;
    default: return hy_err_set(HY_EINVAL, "array is not of an integer type");
    }
}

float gguf_arr_f32(const gguf_arr *a, uint64_t i)
{
    if (i >= a->n || !a->data)
        return 0.0f;
    const uint8_t *p = (const uint8_t *)a->data + i * gguf_vtype_size(a->elem);
    if (a->elem == GGUF_VT_F32) {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    if (a->elem == GGUF_VT_F64) {
        double d;
        memcpy(&d, p, 8);
        return (float)d;
    }
    return 0.0f;
}
