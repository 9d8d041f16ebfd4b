/* safetensors.h - read-only view of a .safetensors file (mmap or caller buffer) and a small
 * writer. Validates the header against the file; converts F32/F16/BF16 to fp32. It knows
 * nothing of adapters or models. */
#ifndef HY_SAFETENSORS_H
#define HY_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum { ST_F32 = 0, ST_F16 = 1, ST_BF16 = 2 } st_dtype;

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u << 20) /* bytes of JSON header we accept */

typedef struct {
    const char *name;          /* NUL-terminated, owned by the st_file */
    st_dtype dtype;
    int n_dims;                /* 0 = scalar */
    int64_t shape[ST_MAX_DIMS];
    uint64_t n_elem;           /* product of shape */
    const void *data;          /* inside the file; may be unaligned */
    size_t nbytes;             /* n_elem * st_dtype_size(dtype) */
} st_tensor;

typedef struct st_file st_file;

/* Map and parse `path`. On success *out is owned by the caller (st_close).
 * Errors: HY_EIO (open/map), HY_EFORMAT (malformed; the message names the tensor or the
 * problem), HY_EUNSUPPORTED (a dtype other than F32/F16/BF16: the message names it). */
int st_open(const char *path, st_file **out);
/* Same over a caller-owned buffer that must outlive the st_file (tests, fuzzers). */
int st_open_mem(const void *buf, size_t len, st_file **out);
void st_close(st_file *f);

size_t st_n_tensors(const st_file *f);
const st_tensor *st_tensor_at(const st_file *f, size_t i); /* in file-offset order */
const st_tensor *st_find(const st_file *f, const char *name); /* NULL when absent */

const char *st_dtype_name(st_dtype t);  /* "F32", "F16", "BF16" */
size_t st_dtype_size(st_dtype t);
/* Convert all n_elem values of t to fp32 into dst (caller-sized, n_elem floats). */
void st_to_f32(const st_tensor *t, float *dst);

/* Writer: one tensor to write; data holds n_elem values already in `dtype` (little-endian). */
typedef struct {
    const char *name;
    st_dtype dtype;
    int n_dims;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
} st_wtensor;

/* Write n tensors to path (data laid out in the given order, header padded to 8 bytes).
 * metadata_format, when not NULL, goes into __metadata__ as {"format": ...}. */
int st_write(const char *path, const st_wtensor *t, size_t n, const char *metadata_format);

#endif
