/* fuzz_input.c - libFuzzer target for untrusted input outside adapters: GGUF files
 * (gguf_open_mem, then tok_load on whatever parses) and OpenAI request bodies
 * (api_parse_request for both endpoints, the admin bodies). Not a unit test (no test_ prefix).
 *
 * The first input byte picks the mode: even -> GGUF bytes, odd -> JSON body. Without a seed
 * corpus GGUF reaches the metadata parser quickly; a corpus of real heads helps:
 *   mkdir -p /tmp/fz && head -c 4096 models/SmolLM2-135M-Instruct.Q4_1.gguf | (printf '\0'; cat) > /tmp/fz/gguf
 * Build and run (gcc builds the quantisation files: clang rejects their per-function targets):
 *   F="-g -O1 -std=c11 -D_GNU_SOURCE -I."
 *   for f in engine/quant.c engine/quant_avx2.c engine/quant_avx512.c; do gcc $F -c $f -o /tmp/$(basename $f).o; done
 *   clang $F -fsanitize=fuzzer,address,undefined tests/fuzz_input.c engine/gguf.c engine/hy.c \
 *     engine/tokenizer.c engine/tok_bpe.c engine/tok_spm.c engine/tok_chat.c api/api.c \
 *     /tmp/quant.c.o /tmp/quant_avx2.c.o /tmp/quant_avx512.c.o -ljansson -lm -o bin/fuzz_input
 *   bin/fuzz_input -max_total_time=60 /tmp/fz */
#include "api/api.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void fuzz_gguf(const uint8_t *p, size_t n)
{
    /* an exact-size copy so ASan sees any read past the end */
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return;
    memcpy(buf, p, n);
    gguf_file *f = NULL;
    if (gguf_open_mem(buf, n, &f) == HY_OK) {
        tok_vocab *v = NULL;
        if (tok_load(f, &v) == HY_OK) {
            int32_t *ids = NULL;
            int n_ids = 0;
            if (tok_encode(v, "Hello <|im_start|> 123 wörld", 29, true, true, &ids, &n_ids) == HY_OK) {
                char *text = NULL;
                size_t len = 0;
                if (tok_decode(v, ids, n_ids, false, &text, &len) == HY_OK)
                    free(text);
                free(ids);
            }
            tok_free(v);
        }
        gguf_close(f);
    }
    free(buf);
}

static void fuzz_json(const uint8_t *p, size_t n)
{
    const char *body = (const char *)p;
    api_request r;
    api_error e;
    memset(&e, 0, sizeof e);
    if (api_parse_request(API_COMPLETION, body, n, &r, &e) == HY_OK)
        api_request_free(&r);
    memset(&e, 0, sizeof e);
    if (api_parse_request(API_CHAT, body, n, &r, &e) == HY_OK)
        api_request_free(&r);
    char *name = NULL, *path = NULL, *sha = NULL;
    memset(&e, 0, sizeof e);
    if (api_parse_load_lora(body, n, &name, &path, &sha, NULL, &e) == HY_OK) {
        free(name);
        free(path);
        free(sha);
    }
    name = NULL;
    memset(&e, 0, sizeof e);
    if (api_parse_unload_lora(body, n, &name, &e) == HY_OK)
        free(name);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] & 1)
        fuzz_json(data + 1, size - 1);
    else
        fuzz_gguf(data + 1, size - 1);
    return 0;
}
