/* model.h - the llama-architecture model (SmolLM2, TinyLlama, Llama 2/3) as GGUF stores it,
 * its paged KV cache and the batched forward pass, written once against backend.h.
 * It does not schedule, sample or tokenize. */
#ifndef HY_MODEL_H
#define HY_MODEL_H

#include "backend.h"
#include "gguf.h"

#include <stdint.h>

/* Projections an adapter may target, in this order everywhere. */
enum { ENG_Q, ENG_K, ENG_V, ENG_O, ENG_GATE, ENG_UP, ENG_DOWN, ENG_N_PROJ };
extern const char *const eng_proj_names[ENG_N_PROJ]; /* "q_proj", ..., "down_proj" */

typedef struct {
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train;
    float rope_theta, rms_eps;
    /* Llama-3 rope scaling (factor 0 = none) */
    float rope_factor, rope_low_freq, rope_high_freq;
    int rope_orig_ctx;
    int tied_output;
} eng_hparams;

typedef struct eng_model eng_model;

/* Load the llama model from an opened GGUF onto backend b. f and b must outlive the model
 * (the CPU backend reads weights in place from the mapping).
 * Errors name the problem: unsupported architecture "<arch>", missing tensor "<name>",
 * wrong shape, unsupported tensor type. Free with eng_model_free. */
int eng_model_load(const gguf_file *f, be *b, eng_model **out);
void eng_model_free(eng_model *m);
const eng_hparams *eng_model_hparams(const eng_model *m);
be *eng_model_backend(const eng_model *m);
/* Output sizes of a projection (in, out) for adapter validation. */
void eng_proj_dims(const eng_model *m, int proj, int64_t *in, int64_t *out);

/* Paged KV cache: n_blocks blocks of BE_KV_BLOCK tokens, for every layer. */
typedef struct eng_kv eng_kv;
int eng_kv_create(eng_model *m, int n_blocks, eng_kv **out);
void eng_kv_free(eng_kv *kv);
int eng_kv_blocks(const eng_kv *kv);

/* An adapter as the forward pass sees it: lora[layer * ENG_N_PROJ + proj], NULL where the
 * adapter does not target that projection. stats (optional) has
 * n_layer * ENG_N_PROJ * (K + 1) floats the forward ADDS router sums to (see be_lora_seg).
 * ctl (optional) is a request's router control for every projection (be_gate.h). A sequence with
 * its own control or its own stats uses its own eng_adapter with the shared lora array. */
typedef struct eng_adapter eng_adapter;
struct eng_adapter {
    be_lora *const *lora;
    int K;
    float *stats;
    const be_gate_ctl *ctl;
    /* An adapter stack (several adapters' deltas summed in one forward) is a chain: this member's
     * delta times scale (0 reads as 1: a zero-initialised adapter is unscaled; a member weighted 0
     * is left out of the chain, not put in it), then next's, and so on. Each member keeps its own
     * router, stats and control. */
    float scale;
    const eng_adapter *next;
};

/* One forward step over a flat batch (all host memory).
 * Tokens are grouped by sequence (contiguous, ascending positions). Adapter segments:
 * seg_adapter[i] applies to tokens [seg_begin[i], seg_begin[i+1]) (seg_begin[n_seg] = n_tok);
 * a NULL adapter means base model. logits_tok lists the batch indices whose logits are
 * wanted; logits receives [n_logits][n_vocab] fp32 on the host. */
typedef struct {
    int n_tok;
    const int32_t *tokens;
    be_attn_meta attn;
    int n_seg;
    const int32_t *seg_begin;            /* [n_seg + 1] */
    const eng_adapter *const *seg_adapter; /* [n_seg] */
    int n_logits;
    const int32_t *logits_tok;           /* [n_logits] */
} eng_batch;

int eng_forward(eng_model *m, eng_kv *kv, const eng_batch *batch, float *logits);

/* Convenience for single-sequence use (CLI, tests): sequence 0 uses blocks 0.., in order.
 * Runs tokens[0..n) at positions start_pos.. in chunks of at most `chunk` tokens and
 * writes the logits of the last token to `logits` [n_vocab]. ad may be NULL. */
int eng_forward_seq(eng_model *m, eng_kv *kv, const int32_t *tokens, int n, int start_pos,
                    int chunk, const eng_adapter *ad, float *logits);

#endif
