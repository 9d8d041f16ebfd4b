/* adapter.h - one HydraLoRA / PEFT LoRA adapter: adapter_config.json parsing, reading the
 * safetensors from a directory, validation against the base model's shapes, an fp32 host
 * copy, and the per-(layer, projection) backend matrices the forward pass uses.
 * Reading (ad_read*) may run on any thread; ad_upload/ad_unupload/ad_free of an uploaded
 * adapter run on the engine thread only (one thread owns the device). No registry logic here.
 *
 * Math and key names: DESIGN.md section 1. File keys, per targeted (layer i, module m):
 *   base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_A.weight      [r, in]
 *   ... .lora_B.weight (plain LoRA, K = 1) or .lora_B{k}.weight, k < K       [out, r]
 *   ... .lora_route.weight (K > 1; optional and ignored when K == 1)         [K, in]
 * q_proj/k_proj B rows arrive in Hugging Face order and are permuted at load into the GGUF
 * RoPE layout the base model uses. */
#ifndef HY_ADAPTER_H
#define HY_ADAPTER_H

#include "engine/backend.h"
#include "engine/model.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define AD_MAX_R 256
#define AD_MAX_K 16

/* The base model's shapes as adapter validation needs them (decoupled from eng_model so
 * tests and fuzzers can validate against synthetic shapes). */
typedef struct {
    int n_layer;
    int n_head, n_head_kv, head_dim;
    int64_t in[ENG_N_PROJ], out[ENG_N_PROJ];
} ad_shape;

/* Fill *s from a loaded model (eng_model_hparams + eng_proj_dims). */
void ad_shape_from_model(const eng_model *m, ad_shape *s);

/* Parsed adapter_config.json. */
typedef struct {
    int r;
    int K;                  /* lora_nums; 0 when absent (then inferred from tensor keys) */
    double alpha;           /* lora_alpha (default r) */
    bool use_rslora;        /* s = alpha / sqrt(r) instead of alpha / r */
    bool fan_in_fan_out;
    bool all_linear;        /* target_modules == "all-linear" */
    char *base_model;       /* base_model_name_or_path, informational; NULL when absent */
    char *target_regex;     /* target_modules given as a (Python-style) regex string */
    char **targets;         /* target_modules given as a list: [n_targets] names */
    int n_targets;
} ad_config;

/* Parse the JSON text of adapter_config.json (len bytes). Checks r in 1..AD_MAX_R, lora_nums in
 * 1..AD_MAX_K when present, peft_type LORA when present, numeric types. On success *c owns its
 * strings (ad_config_clear). On error *c is cleared and the message names the key. */
int ad_config_parse(const char *json, size_t len, ad_config *c);
void ad_config_clear(ad_config *c);

/* Resolve target_modules against the model's modules: mask[layer * ENG_N_PROJ + proj] = 1
 * where targeted (full module name "model.layers.{i}.{self_attn|mlp}.{proj}"). A list entry
 * that matches no module of this model, or a regex matching none, is an error naming it. */
int ad_config_targets(const ad_config *c, const ad_shape *s, uint8_t *mask);

/* Reading options. Callers that want the adapter as its config says pass opts == NULL (or
 * scale_mult = 1): there is no "unset" value, so scale_mult = 0 really scales s to 0 (the
 * adapter then adds nothing and the output is the base model's). */
typedef struct {
    float scale_mult; /* --adapter-scale: multiplies s; finite */
    be *pack_for;     /* non-NULL: also do this backend's host-side upload work now (its lora_pack,
                       * callable from any thread), so that ad_upload on the engine thread is a
                       * copy at most; the packs go with the first upload to this backend */
} ad_opts;

typedef struct ad_adapter ad_adapter;

/* Read <dir>/adapter_config.json and <dir>/adapter_model.safetensors, validate them against
 * s and keep an fp32 host copy (any thread, no locks). *out is owned by the caller: ad_free.
 * Errors name the first offending file, key or tensor. opts may be NULL. */
int ad_read(const char *dir, const ad_shape *s, const ad_opts *opts, ad_adapter **out);
/* Same from memory (config JSON text and safetensors bytes; neither is kept). */
int ad_read_mem(const char *cfg_json, size_t cfg_len, const void *st_buf, size_t st_len,
                const ad_shape *s, const ad_opts *opts, ad_adapter **out);

/* Engine thread: create the backend matrices (b->ops->lora_create, or lora_adopt of what ad_read
 * packed for b) for every target. Idempotent for the same backend; on error nothing stays
 * uploaded. */
int ad_upload(ad_adapter *a, be *b);
bool ad_uploaded(const ad_adapter *a);
/* Engine thread: free the backend matrices (the host copy stays; ad_upload again later). */
void ad_unupload(ad_adapter *a);
/* Frees everything (a stack: itself, never its members); if uploaded, call on the engine thread.
 * NULL is a no-op. */
void ad_free(ad_adapter *a);

/* What the forward pass needs; valid after ad_upload until ad_unupload/ad_free. */
const eng_adapter *ad_eng(const ad_adapter *a);

int ad_r(const ad_adapter *a);
int ad_K(const ad_adapter *a);
/* Unique per adapter object read in this process, never reused (1, 2, ...): the same name loaded
 * again is another object with another id (the prefix cache keys K/V by it). */
uint64_t ad_load_id(const ad_adapter *a);
float ad_scale(const ad_adapter *a);      /* s including --adapter-scale */
int ad_n_layer(const ad_adapter *a);
bool ad_targets(const ad_adapter *a, int layer, int proj);
const ad_config *ad_cfg(const ad_adapter *a);
size_t ad_host_bytes(const ad_adapter *a); /* bytes of the fp32 host copy */
/* Host copy of one target (fp32, GGUF row order for q/k B); NULL pointers when not targeted.
 * B has K entries. R is NULL when K == 1. */
void ad_host(const ad_adapter *a, int layer, int proj, const float **A, const float **R,
             const float *const **B);

/* An adapter stack: the deltas of several adapters, each times its weight, summed in one forward
 * (a request's `lora: [{name, scale}, ...]`). It owns no weights and holds its members by pointer:
 * whoever makes it keeps them alive for its life (the registry pins them). Its load id is derived
 * from the members' load ids and weights (the same stack, the same prefix-cache key); its
 * ad_eng is the members' eng_adapter views chained with their weights, valid after ad_stack_bind.
 * Weights are finite and non-zero (a member weighted 0 adds nothing: leave it out). */
#define AD_STACK_MAX 8
int ad_stack_new(ad_adapter *const *members, const float *weights, int n, ad_adapter **out);
/* Members of a stack; 0 for an adapter read from files. */
int ad_stack_n(const ad_adapter *a);
/* Member i (0 <= i < ad_stack_n(a)) and, when weight is not NULL, its weight. */
ad_adapter *ad_stack_member(const ad_adapter *a, int i, float *weight);
/* Engine thread, once every member is uploaded (ad_upload): link the chain ad_eng(a) returns. */
void ad_stack_bind(ad_adapter *a);

/* Router statistics. The forward pass adds into ad_eng(a)->stats; ad_count_tokens adds to
 * the token counter (the scheduler calls it for tokens run with this adapter). Readers divide
 * by the number of tokens seen by each projection (the sum of its gates), so they do not
 * depend on the counter. Call readers on the engine thread (the forward writes the sums). */
void ad_count_tokens(ad_adapter *a, uint64_t n);
uint64_t ad_tokens(const ad_adapter *a);
/* Mean gate of each head over all targeted (layer, proj) and tokens: out[K]. Returns the
 * number of token-projections averaged (0: no data, out filled with 0). */
double ad_stats_mean_gate(const ad_adapter *a, float *out);
/* Mean router entropy (nats) per layer averaged over the layer's targeted projections:
 * out[n_layer] (0 for layers with no data). */
void ad_stats_mean_entropy(const ad_adapter *a, float *out);
void ad_stats_reset(ad_adapter *a);

#endif
