/* mkmodel.h - llama GGUFs of a known shape with seeded random weights (engine/mkmodel.c), so a GPU
 * machine makes its inputs locally; `hydrad mkmodel` (server/cli_mkmodel.c) is its command
 * front-end. Never loads a model. */
#ifndef HY_MKMODEL_H
#define HY_MKMODEL_H

#include <stdbool.h>
#include <stdint.h>

/* Where the tokenizer is copied from unless told otherwise (skipped when the file is missing). */
#define MKMODEL_DEFAULT_VOCAB "models/SmolLM2-135M-Instruct.Q4_1.gguf"

typedef struct {
    const char *name;
    int n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx;
    float theta;
} mkmodel_shape;

/* The built-in shape called name ("smollm2-135m", "llama-1b", "tiny"), or NULL. */
const mkmodel_shape *mkmodel_shape_find(const char *name);
/* "q4_1", "q4_0", "q8_0", "f16", "f32" -> its Q_* type in *t; HY_EINVAL for any other name. */
int mkmodel_parse_type(const char *s, uint32_t *t);
/* Write a GGUF of shape (layers > 0: that many blocks instead) with weights of type drawn from
 * seed, and the tokenizer of the GGUF vocab ("none" or NULL: the built-in byte vocabulary; a file
 * that cannot be read is an error only when vocab_explicit, else the built-in one is used) to path.
 * HY_OK, or an HY_E* code with hy_err_msg; a failed write leaves no file. */
int mkmodel_write(const mkmodel_shape *shape, uint32_t type, uint64_t seed, int layers, const char *vocab,
                  bool vocab_explicit, const char *path);

#endif
