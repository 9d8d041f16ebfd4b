/* mkadapter.h - seeded random LoRA / HydraLoRA test adapters written in the real file format
 * (adapters/mkadapter.c); `hydrad mkadapter` (server/cli_mkadapter.c) is its command front-end.
 * Test input only: the weights are random, never trained. */
#ifndef HY_MKADAPTER_H
#define HY_MKADAPTER_H

/* What to write. K = 0 writes plain LoRA names (lora_B.weight); K >= 1 writes lora_B{k} +
 * lora_route. base: read the base weights to calibrate B (rms(s B A x) ~ ratio * rms(W x), as the
 * Python script does) and record the path as base_model_name_or_path; shape_from: read only the
 * metadata (header-only GGUFs work) and assume rms_row_norm(W) = 1. Exactly one of the two. */
typedef struct {
    const char *out;          /* directory, created when missing */
    const char *base, *shape_from;
    const char *targets;      /* comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj */
    const char *dtype;        /* "f32", "f16" or "bf16" */
    unsigned long long seed;
    int r, K;                 /* rank 1..256; heads 0..16 */
    double alpha, ratio;      /* lora_alpha > 0; B calibration ratio >= 0 */
    int zero_b;               /* B all zeros (the adapter changes nothing) */
} mkadapter_args;

/* Write a->out/adapter_config.json and adapter_model.safetensors. The caller checks the ranges
 * above. HY_OK, or an HY_E* code with hy_err_msg (HY_EINVAL: bad targets; HY_EFORMAT,
 * HY_EUNSUPPORTED, HY_ENOTFOUND: a GGUF that does not fit). */
int mkadapter_run(const mkadapter_args *a);

#endif
