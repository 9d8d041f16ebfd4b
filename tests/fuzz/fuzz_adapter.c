/* fuzz_adapter.c - libFuzzer target for the adapter loader: safetensors parsing (st_open_mem,
 * st_to_f32), adapter_config.json parsing and target resolution (ad_config_parse,
 * ad_config_targets, its Python-style regexes included), and full validation + host copy
 * (ad_read_mem) against a small synthetic base-model shape. Not a unit test (no test_ prefix).
 *
 * The first input byte picks a mode:
 *   0: the rest is [u16 config length][config JSON][safetensors bytes], all fuzzed;
 *   1: a valid template adapter whose safetensors bytes are patched by (u16 offset, byte) pairs
 *      (offset 0xffff: truncate to byte/256 of the file instead);
 *   2: the template's safetensors with a fuzzed config JSON.
 * Modes 1/2 reach the deep validation paths in seconds without a seed corpus.
 * Build and run: tests/fuzz/fuzz.mk (make fuzz); seeds: tests/fuzz/make_corpus.py. */
#include "adapters/adapter.h"
#include "adapters/safetensors.h"
#include "engine/hy.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const ad_shape S = {
    .n_layer = 2, .n_head = 2, .n_head_kv = 1, .head_dim = 4,
    .in = {8, 8, 8, 8, 8, 8, 12},
    .out = {8, 4, 4, 8, 12, 12, 8},
};

static const char tmpl_cfg[] =
    "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"lora_nums\":2,"
    "\"target_modules\":[\"q_proj\",\"k_proj\",\"down_proj\"],\"use_rslora\":false}";
static uint8_t *tmpl_st;
static size_t tmpl_len;

/* Build the template safetensors once (through the writer, via a temporary file). */
static void build_template(void)
{
    static const int projs[3] = {ENG_Q, ENG_K, ENG_DOWN};
    static const char *const names[3] = {"self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"};
    st_wtensor w[2 * 3 * 4];
    static char keys[24][128];
    static float data[24][64];
    int n = 0;
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < 3; i++) {
            int p = projs[i];
            const char *sfx[4] = {"lora_A", "lora_B0", "lora_B1", "lora_route"};
            int64_t sh[4][2] = {{2, S.in[p]}, {S.out[p], 2}, {S.out[p], 2}, {2, S.in[p]}};
            for (int k = 0; k < 4; k++, n++) {
                snprintf(keys[n], sizeof keys[n], "base_model.model.model.layers.%d.%s.%s.weight", l, names[i],
                         sfx[k]);
                for (int e = 0; e < 64; e++)
                    data[n][e] = (float)((e * 7 + n) % 13) / 13.0f - 0.5f;
                w[n] = (st_wtensor){keys[n], (n & 1) ? ST_BF16 : ST_F32, 2, {sh[k][0], sh[k][1]}, data[n]};
            }
        }
    char path[] = "/tmp/fuzz_adapter_tmpl_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        abort();
    close(fd);
    if (st_write(path, w, (size_t)n, "pt"))
        abort();
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    tmpl_len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    tmpl_st = malloc(tmpl_len);
    if (fread(tmpl_st, 1, tmpl_len, f) != tmpl_len)
        abort();
    fclose(f);
    unlink(path);
    ad_adapter *a = NULL;
    if (ad_read_mem(tmpl_cfg, strlen(tmpl_cfg), tmpl_st, tmpl_len, &S, NULL, &a)) {
        fprintf(stderr, "template adapter does not load: %s\n", hy_err_msg());
        abort();
    }
    ad_free(a);
}

static void run(const char *cfg, size_t cfg_len, const uint8_t *st, size_t st_len)
{
    st_file *f = NULL;
    if (st_open_mem(st, st_len, &f) == 0) {
        for (size_t i = 0; i < st_n_tensors(f); i++) {
            const st_tensor *t = st_tensor_at(f, i);
            if (t->n_elem <= (1u << 16)) {
                float *buf = malloc((size_t)t->n_elem * sizeof(float) + 1);
                st_to_f32(t, buf);
                free(buf);
            }
        }
        st_close(f);
    }
    ad_config c;
    if (ad_config_parse(cfg, cfg_len, &c) == 0) {
        uint8_t mask[2 * ENG_N_PROJ];
        ad_config_targets(&c, &S, mask);
        ad_config_clear(&c);
    }
    ad_adapter *a = NULL;
    if (ad_read_mem(cfg, cfg_len, st, st_len, &S, NULL, &a) == 0) {
        float g[AD_MAX_K], e[2];
        ad_stats_mean_gate(a, g);
        ad_stats_mean_entropy(a, e);
        ad_free(a);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!tmpl_st)
        build_template();
    if (size < 1)
        return 0;
    uint8_t mode = data[0] % 3;
    data++;
    size--;
    if (mode == 0) {
        if (size < 2)
            return 0;
        size_t cl = (size_t)(data[0] | data[1] << 8);
        data += 2;
        size -= 2;
        cl = cl > size ? size : cl;
        /* copies so that ASan sees the exact extents */
        char *cfg = malloc(cl + 1);
        uint8_t *st = malloc(size - cl + 1);
        memcpy(cfg, data, cl);
        memcpy(st, data + cl, size - cl);
        run(cfg, cl, st, size - cl);
        free(cfg);
        free(st);
    } else if (mode == 1) {
        uint8_t *st = malloc(tmpl_len);
        memcpy(st, tmpl_st, tmpl_len);
        size_t len = tmpl_len;
        for (size_t i = 0; i + 3 <= size; i += 3) {
            size_t off = (size_t)(data[i] | data[i + 1] << 8);
            if (off == 0xffff) /* truncate instead of patching */
                len = data[i + 2] * tmpl_len / 256;
            else if (off < tmpl_len)
                st[off] = data[i + 2];
        }
        run(tmpl_cfg, strlen(tmpl_cfg), st, len);
        free(st);
    } else {
        char *cfg = malloc(size + 1);
        memcpy(cfg, data, size);
        run(cfg, size, tmpl_st, tmpl_len);
        free(cfg);
    }
    return 0;
}
