/* gguf_write.h - a small streaming GGUF v3 writer (metadata, tensor infos, then tensor data in
 * declaration order, one tensor in memory at a time) and ggml block quantisers for the types
 * hydrad's tools write. It never reads models; mkmodel and tests use it. */
#ifndef HY_GGUF_WRITE_H
#define HY_GGUF_WRITE_H

#include "gguf.h"

#include <stddef.h>
#include <stdint.h>

typedef struct gguf_w gguf_w;

/* Create an empty writer; free with gguf_w_free (which also closes an unfinished file). */
int gguf_w_create(gguf_w **out);
void gguf_w_free(gguf_w *w);

/* Metadata, in the order written. Strings are copied. */
int gguf_w_kv_u32(gguf_w *w, const char *key, uint32_t v);
int gguf_w_kv_i32(gguf_w *w, const char *key, int32_t v);
int gguf_w_kv_f32(gguf_w *w, const char *key, float v);
int gguf_w_kv_bool(gguf_w *w, const char *key, bool v);
int gguf_w_kv_str(gguf_w *w, const char *key, const char *v);
/* Arrays of strings (n entries, each NUL-terminated), i32 or f32. */
int gguf_w_kv_arr_str(gguf_w *w, const char *key, const char *const *v, uint64_t n);
int gguf_w_kv_arr_i32(gguf_w *w, const char *key, const int32_t *v, uint64_t n);
int gguf_w_kv_arr_f32(gguf_w *w, const char *key, const float *v, uint64_t n);
/* Copy one key/value read by gguf.h (any type, nested arrays included). */
int gguf_w_kv_copy(gguf_w *w, const gguf_kv *kv);

/* Declare a tensor: ne[0] is the contiguous dimension; type is a ggml type id (quant.h). */
int gguf_w_add_tensor(gguf_w *w, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type);
/* Bytes the data of tensor i must have. */
size_t gguf_w_tensor_bytes(const gguf_w *w, uint64_t i);

/* Open `path` and write the header, metadata and tensor infos (no more kv/tensors after this). */
int gguf_w_begin(gguf_w *w, const char *path);
/* Write the data of the next declared tensor (exactly gguf_w_tensor_bytes bytes). */
int gguf_w_tensor_data(gguf_w *w, const void *data, size_t nbytes);
/* Check every tensor was written, flush and close. */
int gguf_w_finish(gguf_w *w);

/* Quantise n floats (a multiple of the block size) into ggml blocks at dst
 * (q_row_bytes(type, n) bytes). Types: Q_F32, Q_F16, Q_Q8_0, Q_Q4_0, Q_Q4_1.
 * Returns HY_EUNSUPPORTED for any other type. */
int gguf_w_quantize(uint32_t type, const float *src, void *dst, int64_t n);

#endif
