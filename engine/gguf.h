/* gguf.h - read-only view of a GGUF file (v2, v3) through mmap: metadata and tensor infos.
 * It validates every count, length and offset against the file; it never interprets a model. */
#ifndef HY_GGUF_H
#define HY_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    GGUF_VT_U8 = 0, GGUF_VT_I8 = 1, GGUF_VT_U16 = 2, GGUF_VT_I16 = 3,
    GGUF_VT_U32 = 4, GGUF_VT_I32 = 5, GGUF_VT_F32 = 6, GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8, GGUF_VT_ARRAY = 9, GGUF_VT_U64 = 10, GGUF_VT_I64 = 11,
    GGUF_VT_F64 = 12,
} gguf_vtype;

/* A string inside the mapping: NOT NUL-terminated. */
typedef struct {
    const char *ptr;
    uint64_t len;
} gguf_str;

typedef struct gguf_value gguf_value;

/* An array value. For scalar element types `data` points at n packed little-endian
 * elements inside the mapping, possibly UNALIGNED: read them with gguf_arr_int/gguf_arr_f32
 * (or memcpy), never by casting; for strings `strs` holds n entries; for nested arrays
 * `items` holds n values of type GGUF_VT_ARRAY. Unused members are NULL. */
typedef struct {
    gguf_vtype elem;
    uint64_t n;
    const void *data;
    const gguf_str *strs;
    const gguf_value *items;
} gguf_arr;

struct gguf_value {
    gguf_vtype type;
    union {
        uint64_t u;   /* U8..U64 */
        int64_t i;    /* I8..I64 */
        double f;     /* F32, F64 */
        bool b;
        gguf_str s;
        gguf_arr arr;
    } v;
};

typedef struct {
    gguf_str key;
    gguf_value value;
} gguf_kv;

typedef struct {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[4];     /* ne[0] is the contiguous (innermost) dimension; unused dims are 1 */
    uint32_t type;      /* ggml type id, see quant.h */
    uint64_t offset;    /* relative to the data section */
    const void *data;   /* inside the mapping, checked to lie within the file */
    uint64_t nbytes;
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Map and parse `path`. On success *out is owned by the caller (gguf_close).
 * Errors: HY_EIO (cannot open/map), HY_EFORMAT (malformed, message names the problem
 * and the byte offset), HY_EUNSUPPORTED (tensor type unknown: message names it). */
int gguf_open(const char *path, gguf_file **out);
/* Same from a caller-owned buffer that must outlive the gguf_file (used by tests/fuzzers). */
int gguf_open_mem(const void *buf, size_t len, gguf_file **out);
void gguf_close(gguf_file *f);

uint32_t gguf_version(const gguf_file *f);
uint64_t gguf_n_kv(const gguf_file *f);
const gguf_kv *gguf_kv_at(const gguf_file *f, uint64_t i);
uint64_t gguf_n_tensors(const gguf_file *f);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, uint64_t i);
size_t gguf_file_size(const gguf_file *f);

/* Look-ups by name; NULL when absent. */
const gguf_value *gguf_find(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters: 0 on success, HY_ENOTFOUND when absent, HY_EFORMAT when of a type
 * that cannot convert (ints accept any integer type whose value fits). */
int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out);
int gguf_get_i32(const gguf_file *f, const char *key, int32_t *out);
int gguf_get_f32(const gguf_file *f, const char *key, float *out);
int gguf_get_bool(const gguf_file *f, const char *key, bool *out);
int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out);
int gguf_get_arr(const gguf_file *f, const char *key, gguf_arr *out);

/* Element i of a scalar array: integer types (and bool) into *out; HY_EINVAL when i is out of
 * range or the array is not of an integer type. gguf_arr_f32 converts F32/F64 (0 otherwise). */
int gguf_arr_int(const gguf_arr *a, uint64_t i, int64_t *out);
float gguf_arr_f32(const gguf_arr *a, uint64_t i);

/* Bytes of one scalar of type t (U8..F64, BOOL); 0 for STRING, ARRAY and unknown types. */
size_t gguf_vtype_size(gguf_vtype t);

/* Compare a gguf_str with a C string. */
bool gguf_str_eq(gguf_str s, const char *c);

#endif
