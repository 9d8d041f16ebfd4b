/* fuzz_gguf.c - libFuzzer target for the GGUF reader: the input is a whole GGUF file. It goes
 * through gguf_open_mem and then through everything that reads an untrusted GGUF's metadata: every
 * key by the typed getters, every tensor by name, tok_load (plus a short encode/decode),
 * tok_chat_detect and eng_model_load onto the CPU backend. Not a unit test (no test_ prefix).
 * Build and run: tests/fuzz/fuzz.mk (make fuzz); seeds: tests/fuzz/make_corpus.py. */
#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static be *cpu;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (be_cpu_create(1, &cpu))
        abort();
    return 0;
}

/* Every key through every getter: each must answer (value or error) without reading outside. */
static void fz_getters(const gguf_file *f)
{
    char key[256];
    for (uint64_t i = 0; i < gguf_n_kv(f) && i < 4096; i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        if (kv->key.len >= sizeof key)
            continue;
        memcpy(key, kv->key.ptr, kv->key.len);
        key[kv->key.len] = '\0';
        if (!memchr(key, '\0', kv->key.len) && gguf_find(f, key) == NULL)
            abort(); /* a key that was listed must be found */
        uint32_t u;
        int32_t i32;
        float fl;
        bool b;
        gguf_str s;
        gguf_arr a;
        (void)gguf_get_u32(f, key, &u);
        (void)gguf_get_i32(f, key, &i32);
        (void)gguf_get_f32(f, key, &fl);
        (void)gguf_get_bool(f, key, &b);
        (void)gguf_get_str(f, key, &s);
        if (gguf_get_arr(f, key, &a) == HY_OK) {
            int64_t x;
            for (uint64_t k = 0; k < a.n && k < 64; k++) {
                (void)gguf_arr_int(&a, k, &x);
                (void)gguf_arr_f32(&a, k);
            }
            if (gguf_arr_int(&a, a.n, &x) == HY_OK)
                abort(); /* index n is out of range */
        }
    }
    for (uint64_t i = 0; i < gguf_n_tensors(f) && i < 4096; i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        const uint8_t *base = (const uint8_t *)t->data;
        /* the data must lie inside the buffer: touch its first and last byte */
        if (t->nbytes) {
            volatile uint8_t x = base[0];
            x = base[t->nbytes - 1];
            (void)x;
        }
        if (t->name.len < sizeof key) {
            memcpy(key, t->name.ptr, t->name.len);
            key[t->name.len] = '\0';
            if (!memchr(key, '\0', t->name.len) && gguf_find_tensor(f, key) == NULL)
                abort(); /* a tensor that was listed must be found */
        }
    }
}

static void fz_tokenizer(const gguf_file *f)
{
    tok_vocab *v = NULL;
    if (tok_load(f, &v) != HY_OK)
        return;
    static const char text[] = "Hello <|im_start|> 123 w\xc3\xb6rld \xff";
    int32_t *ids = NULL;
    int n_ids = 0;
    if (tok_encode(v, text, sizeof text - 1, true, true, &ids, &n_ids) == HY_OK) {
        char *out = NULL;
        size_t len = 0;
        if (tok_decode(v, ids, n_ids, false, &out, &len) == HY_OK)
            free(out);
        free(ids);
    }
    tok_free(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* an exact-size copy so ASan sees any read past the end */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    gguf_file *f = NULL;
    if (gguf_open_mem(buf, size, &f) == HY_OK) {
        fz_getters(f);
        fz_tokenizer(f);
        tok_chat_kind kind;
        (void)tok_chat_detect(f, NULL, &kind);
        eng_model *m = NULL;
        if (eng_model_load(f, cpu, &m) == HY_OK)
            eng_model_free(m);
        gguf_close(f);
    }
    hy_err_clear();
    free(buf);
    return 0;
}
