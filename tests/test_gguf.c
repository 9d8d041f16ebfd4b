/* test_gguf.c - the GGUF reader on the real default model and on hand-built files:
 * every value type, nested arrays, alignment, and malformed input (truncation at every
 * byte, bad magic, huge counts, offsets past the end, misalignment) -> error, never a crash. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/quant.h"
#include "tests/testutil.h"

typedef tu_buf buf;

/* A small valid v3 file: scalar kvs of every type, a string array, a nested array,
 * and two tensors (F32 [4], Q8_0 [32 x 2]). */
static buf build_valid(uint32_t align, int misalign_second)
{
    buf b = {0};
    tu_put_u32(&b, 0x46554747u);
    tu_put_u32(&b, 3);
    tu_put_u64(&b, 2);  /* tensors */
    tu_put_u64(&b, 16); /* kvs */
    uint8_t u8 = 200; int8_t i8 = -5; uint16_t u16 = 60000; int16_t i16 = -30000;
    uint32_t u32 = 4000000000u; int32_t i32 = -2000000000; float f32 = 1.5f;
    uint64_t u64 = 1ull << 40; int64_t i64 = -(1ll << 40); double f64 = 2.25;
    tu_put_str(&b, "t.u8"); tu_put_u32(&b, GGUF_VT_U8); tu_put(&b, &u8, 1);
    tu_put_str(&b, "t.i8"); tu_put_u32(&b, GGUF_VT_I8); tu_put(&b, &i8, 1);
    tu_put_str(&b, "t.u16"); tu_put_u32(&b, GGUF_VT_U16); tu_put(&b, &u16, 2);
    tu_put_str(&b, "t.i16"); tu_put_u32(&b, GGUF_VT_I16); tu_put(&b, &i16, 2);
    tu_put_str(&b, "t.u32"); tu_put_u32(&b, GGUF_VT_U32); tu_put(&b, &u32, 4);
    tu_put_str(&b, "t.i32"); tu_put_u32(&b, GGUF_VT_I32); tu_put(&b, &i32, 4);
    tu_put_str(&b, "t.f32"); tu_put_u32(&b, GGUF_VT_F32); tu_put(&b, &f32, 4);
    tu_put_str(&b, "t.bool"); tu_put_u32(&b, GGUF_VT_BOOL); tu_put(&b, "\1", 1);
    tu_put_str(&b, "t.str"); tu_put_u32(&b, GGUF_VT_STRING); tu_put_str(&b, "héllo");
    tu_put_str(&b, "t.u64"); tu_put_u32(&b, GGUF_VT_U64); tu_put(&b, &u64, 8);
    tu_put_str(&b, "t.i64"); tu_put_u32(&b, GGUF_VT_I64); tu_put(&b, &i64, 8);
    tu_put_str(&b, "t.f64"); tu_put_u32(&b, GGUF_VT_F64); tu_put(&b, &f64, 8);
    tu_put_str(&b, "t.strs"); tu_put_u32(&b, GGUF_VT_ARRAY); tu_put_u32(&b, GGUF_VT_STRING); tu_put_u64(&b, 3);
    tu_put_str(&b, "a"); tu_put_str(&b, ""); tu_put_str(&b, "ccc");
    /* [[1,2],[3]] of i32 */
    tu_put_str(&b, "t.nested"); tu_put_u32(&b, GGUF_VT_ARRAY); tu_put_u32(&b, GGUF_VT_ARRAY); tu_put_u64(&b, 2);
    tu_put_u32(&b, GGUF_VT_I32); tu_put_u64(&b, 2); tu_put_u32(&b, 1); tu_put_u32(&b, 2);
    tu_put_u32(&b, GGUF_VT_I32); tu_put_u64(&b, 1); tu_put_u32(&b, 3);
    tu_put_str(&b, "t.f32s"); tu_put_u32(&b, GGUF_VT_ARRAY); tu_put_u32(&b, GGUF_VT_F32); tu_put_u64(&b, 2);
    tu_put(&b, &f32, 4); tu_put(&b, &f32, 4);
    tu_put_str(&b, "general.alignment"); tu_put_u32(&b, GGUF_VT_U32); tu_put_u32(&b, align);
    /* tensor infos */
    tu_put_str(&b, "a.f32"); tu_put_u32(&b, 1); tu_put_u64(&b, 4); tu_put_u32(&b, Q_F32); tu_put_u64(&b, 0);
    tu_put_str(&b, "b.q8"); tu_put_u32(&b, 2); tu_put_u64(&b, 32); tu_put_u64(&b, 2); tu_put_u32(&b, Q_Q8_0);
    tu_put_u64(&b, align + (misalign_second ? 4 : 0));
    tu_pad_to(&b, align);
    float vals[4] = {1, 2, 3, 4};
    tu_put(&b, vals, sizeof vals);
    tu_pad_to(&b, align);
    if (misalign_second)
        tu_put(&b, "\0\0\0\0", 4);
    unsigned char q8[68] = {0};
    tu_put(&b, q8, sizeof q8);
    return b;
}

static void test_valid_file(void **state)
{
    buf b = build_valid(64, 0);
    gguf_file *f;
    assert_int_equal(gguf_open_mem(b.p, b.n, &f), HY_OK);
    assert_int_equal(gguf_version(f), 3);
    assert_int_equal(gguf_n_kv(f), 16);
    uint32_t u;
    int32_t i;
    float x;
    bool bo;
    gguf_str s;
    gguf_arr a;
    assert_int_equal(gguf_get_u32(f, "t.u8", &u), 0); assert_int_equal(u, 200);
    assert_int_equal(gguf_get_i32(f, "t.i8", &i), 0); assert_int_equal(i, -5);
    assert_int_equal(gguf_get_u32(f, "t.u16", &u), 0); assert_int_equal(u, 60000);
    assert_int_equal(gguf_get_i32(f, "t.i16", &i), 0); assert_int_equal(i, -30000);
    assert_int_equal(gguf_get_u32(f, "t.u32", &u), 0); assert_int_equal(u, 4000000000u);
    assert_int_equal(gguf_get_i32(f, "t.i32", &i), 0); assert_int_equal(i, -2000000000);
    assert_int_equal(gguf_get_i32(f, "t.u32", &i), HY_EFORMAT); /* does not fit */
    assert_int_equal(gguf_get_f32(f, "t.f32", &x), 0); assert_true(x == 1.5f);
    assert_int_equal(gguf_get_f32(f, "t.f64", &x), 0); assert_true(x == 2.25f);
    assert_int_equal(gguf_get_bool(f, "t.bool", &bo), 0); assert_true(bo);
    assert_int_equal(gguf_get_str(f, "t.str", &s), 0); assert_true(gguf_str_eq(s, "héllo"));
    assert_int_equal(gguf_find(f, "t.u64")->v.u, 1ull << 40);
    assert_int_equal(gguf_find(f, "t.i64")->v.i, -(1ll << 40));
    assert_int_equal(gguf_get_arr(f, "t.strs", &a), 0);
    assert_int_equal(a.n, 3);
    assert_true(gguf_str_eq(a.strs[0], "a") && gguf_str_eq(a.strs[1], "") && gguf_str_eq(a.strs[2], "ccc"));
    assert_int_equal(gguf_get_arr(f, "t.nested", &a), 0);
    assert_int_equal(a.elem, GGUF_VT_ARRAY);
    assert_int_equal(a.n, 2);
    assert_int_equal(a.items[0].v.arr.n, 2);
    int64_t e;
    assert_int_equal(gguf_arr_int(&a.items[0].v.arr, 1, &e), 0);
    assert_int_equal(e, 2);
    assert_int_equal(gguf_arr_int(&a.items[1].v.arr, 0, &e), 0);
    assert_int_equal(e, 3);
    assert_int_equal(gguf_arr_int(&a.items[1].v.arr, 1, &e), HY_EINVAL);
    assert_int_equal(gguf_get_arr(f, "t.f32s", &a), 0);
    assert_true(gguf_arr_f32(&a, 1) == 1.5f);
    assert_int_equal(gguf_get_u32(f, "missing", &u), HY_ENOTFOUND);
    assert_int_equal(gguf_get_str(f, "t.u8", &s), HY_EFORMAT);

    const gguf_tensor *t = gguf_find_tensor(f, "a.f32");
    assert_non_null(t);
    assert_int_equal(t->nbytes, 16);
    assert_true(((const float *)t->data)[3] == 4.0f);
    assert_int_equal(((uintptr_t)t->data - (uintptr_t)b.p) % 64, 0);
    t = gguf_find_tensor(f, "b.q8");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 32);
    assert_int_equal(t->ne[1], 2);
    assert_int_equal(t->nbytes, 68);
    assert_null(gguf_find_tensor(f, "nope"));
    gguf_close(f);
    free(b.p);
}

/* Every strict prefix of a valid file is an error (never a crash, never success). */
static void test_truncated_everywhere(void **state)
{
    buf b = build_valid(32, 0);
    for (size_t n = 0; n < b.n; n++) {
        unsigned char *copy = malloc(n ? n : 1); /* exact size so ASan catches over-reads */
        memcpy(copy, b.p, n);
        gguf_file *f = NULL;
        int rc = gguf_open_mem(copy, n, &f);
        if (rc == HY_OK)
            fail_msg("prefix of %zu/%zu bytes was accepted", n, b.n);
        assert_null(f);
        assert_true(strlen(hy_err_msg()) > 0);
        free(copy);
    }
    free(b.p);
}

static void expect_error(buf *b, int code, const char *needle)
{
    gguf_file *f = NULL;
    int rc = gguf_open_mem(b->p, b->n, &f);
    assert_int_equal(rc, code);
    if (!strstr(hy_err_msg(), needle))
        fail_msg("message '%s' lacks '%s'", hy_err_msg(), needle);
    free(b->p);
}

static void test_bad_magic_and_version(void **state)
{
    buf b = build_valid(32, 0);
    b.p[0] = 'X';
    expect_error(&b, HY_EFORMAT, "magic");
    b = build_valid(32, 0);
    b.p[4] = 1; /* v1 */
    expect_error(&b, HY_EUNSUPPORTED, "version 1");
}

static void test_huge_counts(void **state)
{
    buf b = build_valid(32, 0);
    uint64_t huge = 1ull << 62;
    memcpy(b.p + 16, &huge, 8); /* kv count */
    expect_error(&b, HY_EFORMAT, "metadata count");
    b = build_valid(32, 0);
    memcpy(b.p + 8, &huge, 8); /* tensor count */
    expect_error(&b, HY_EFORMAT, "");
    /* a string array claiming 2^62 elements */
    buf c = {0};
    tu_put_u32(&c, 0x46554747u); tu_put_u32(&c, 3); tu_put_u64(&c, 0); tu_put_u64(&c, 1);
    tu_put_str(&c, "k"); tu_put_u32(&c, GGUF_VT_ARRAY); tu_put_u32(&c, GGUF_VT_STRING); tu_put_u64(&c, huge);
    tu_put_str(&c, "x");
    expect_error(&c, HY_EFORMAT, "runs past the end");
    /* a string whose length runs past the end */
    c = (buf){0};
    tu_put_u32(&c, 0x46554747u); tu_put_u32(&c, 3); tu_put_u64(&c, 0); tu_put_u64(&c, 1);
    tu_put_u64(&c, 1ull << 63); tu_put(&c, "abcdefghijklmnop", 16);
    expect_error(&c, HY_EFORMAT, "truncated");
}

static void test_offsets_and_alignment(void **state)
{
    buf b = build_valid(32, 1);
    expect_error(&b, HY_EFORMAT, "not a multiple of the alignment");
    b = build_valid(32, 0);
    /* chop the last tensor's data: offset + size past the end */
    b.n -= 10;
    expect_error(&b, HY_EFORMAT, "past the end");
    b = build_valid(24, 0); /* not a power of two */
    expect_error(&b, HY_EFORMAT, "alignment");
}

static void test_unsupported_type_named(void **state)
{
    buf b = {0};
    tu_put_u32(&b, 0x46554747u); tu_put_u32(&b, 2); tu_put_u64(&b, 1); tu_put_u64(&b, 0);
    tu_put_str(&b, "w"); tu_put_u32(&b, 1); tu_put_u64(&b, 256); tu_put_u32(&b, 10 /* Q2_K */); tu_put_u64(&b, 0);
    tu_pad_to(&b, 32);
    char zeros[256] = {0};
    tu_put(&b, zeros, sizeof zeros);
    expect_error(&b, HY_EUNSUPPORTED, "'w'");
}

static void test_real_model(void **state)
{
    const char *path = getenv("HY_MODEL");
    if (!path) {
        printf("SKIP (HY_MODEL not set)\n");
        skip();
    }
    gguf_file *f;
    if (gguf_open(path, &f))
        fail_msg("%s: %s", path, hy_err_msg());
    gguf_str arch;
    uint32_t n_layer, n_embd, n_vocab;
    assert_int_equal(gguf_get_str(f, "general.architecture", &arch), 0);
    assert_true(gguf_str_eq(arch, "llama"));
    assert_int_equal(gguf_get_u32(f, "llama.block_count", &n_layer), 0);
    assert_int_equal(n_layer, 30);
    assert_int_equal(gguf_get_u32(f, "llama.embedding_length", &n_embd), 0);
    assert_int_equal(n_embd, 576);
    gguf_arr toks;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", &toks), 0);
    n_vocab = (uint32_t)toks.n;
    assert_int_equal(n_vocab, 49152);
    assert_true(gguf_str_eq(toks.strs[1], "<|im_start|>"));
    assert_int_equal(gguf_n_tensors(f), 272);
    const gguf_tensor *t = gguf_find_tensor(f, "blk.0.attn_q.weight");
    assert_non_null(t);
    assert_int_equal(t->type, Q_Q4_1);
    assert_int_equal(t->ne[0], 576);
    t = gguf_find_tensor(f, "token_embd.weight");
    assert_int_equal(t->type, Q_Q8_0);
    assert_int_equal(t->ne[1], 49152);
    gguf_close(f);
    gguf_close(NULL);
}

static void test_missing_file(void **state)
{
    gguf_file *f;
    assert_int_equal(gguf_open("/nonexistent/model.gguf", &f), HY_EIO);
    assert_non_null(strstr(hy_err_msg(), "No such file"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_file),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_bad_magic_and_version),
        cmocka_unit_test(test_huge_counts),
        cmocka_unit_test(test_offsets_and_alignment),
        cmocka_unit_test(test_unsupported_type_named),
        cmocka_unit_test(test_real_model),
        cmocka_unit_test(test_missing_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
