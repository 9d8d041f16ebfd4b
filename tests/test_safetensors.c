/* test_safetensors.c - adapters/safetensors.c: writer/reader round trip, fp16/bf16 conversion,
 * and every malformed-file case giving its own clear error (never a crash): truncation at
 * every byte, header length past the end, unknown dtype, wrong sizes, overlaps, overflow. */
#include "adapters/safetensors.h"
#include "engine/hy.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

static char tmpdir[256];

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

/* A file made of an 8-byte length, the header text and `data_len` bytes of data. */
static uint8_t *mkfile(const char *hdr, size_t data_len, size_t *len)
{
    size_t h = strlen(hdr);
    *len = 8 + h + data_len;
    uint8_t *b = calloc(1, *len);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)h >> (8 * i));
    memcpy(b + 8, hdr, h);
    for (size_t i = 0; i < data_len; i++)
        b[8 + h + i] = (uint8_t)(i * 7);
    return b;
}

static int open_hdr(const char *hdr, size_t data_len)
{
    size_t len;
    uint8_t *b = mkfile(hdr, data_len, &len);
    st_file *f = NULL;
    hy_err_clear();
    int rc = st_open_mem(b, len, &f);
    if (rc == 0)
        st_close(f);
    else
        assert_null(f);
    free(b);
    return rc;
}

static void expect_err(const char *hdr, size_t data_len, int code, const char *needle)
{
    int rc = open_hdr(hdr, data_len);
    if (rc != code || !strstr(hy_err_msg(), needle))
        fail_msg("header %s: got %s \"%s\", want %s containing \"%s\"", hdr, hy_err_name(rc), hy_err_msg(),
                 hy_err_name(code), needle);
}

static void test_roundtrip(void **state)
{
    (void)state;
    float a[6] = {1.0f, -2.5f, 0.125f, 3.0f, -0.0f, 65504.0f};
    uint16_t h[4] = {0x3c00, 0xc000, 0x3800, 0x7bff};   /* f16: 1, -2, 0.5, 65504 */
    uint16_t bf[3] = {0x3f80, 0xc0a0, 0x3e00};          /* bf16: 1, -5, 0.125 */
    st_wtensor t[3] = {
        {"w.f32", ST_F32, 2, {2, 3}, a},
        {"w.f16", ST_F16, 1, {4}, h},
        {"a.bf16", ST_BF16, 3, {1, 3, 1}, bf},
    };
    char path[512];
    snprintf(path, sizeof path, "%s/rt.safetensors", tmpdir);
    assert_int_equal(st_write(path, t, 3, "pt"), 0);
    size_t len;
    char *raw = read_all(path, &len);
    uint64_t hl = 0;
    memcpy(&hl, raw, 8);
    assert_int_equal(hl % 8, 0);
    assert_non_null(memmem(raw + 8, hl, "__metadata__", 12));
    free(raw);

    st_file *f;
    assert_int_equal(st_open(path, &f), 0);
    assert_int_equal(st_n_tensors(f), 3);
    const st_tensor *x = st_find(f, "w.f32");
    assert_non_null(x);
    assert_int_equal(x->dtype, ST_F32);
    assert_int_equal(x->n_dims, 2);
    assert_int_equal(x->shape[0], 2);
    assert_int_equal(x->shape[1], 3);
    assert_int_equal(x->n_elem, 6);
    float out[6];
    st_to_f32(x, out);
    assert_memory_equal(out, a, sizeof a);
    x = st_find(f, "w.f16");
    st_to_f32(x, out);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.5f && out[3] == 65504.0f);
    x = st_find(f, "a.bf16");
    assert_int_equal(x->n_dims, 3);
    st_to_f32(x, out);
    assert_true(out[0] == 1.0f && out[1] == -5.0f && out[2] == 0.125f);
    assert_null(st_find(f, "nope"));
    /* tensors come back in data order */
    assert_string_equal(st_tensor_at(f, 0)->name, "w.f32");
    assert_null(st_tensor_at(f, 3));
    st_close(f);
    st_close(NULL);
}

/* Cutting a valid file anywhere must give an error, never a crash or a success. */
static void test_truncated_everywhere(void **state)
{
    (void)state;
    float a[5] = {1, 2, 3, 4, 5};
    st_wtensor t[2] = {{"x", ST_F32, 1, {3}, a}, {"y", ST_F32, 1, {2}, a + 3}};
    char path[512];
    snprintf(path, sizeof path, "%s/tr.safetensors", tmpdir);
    assert_int_equal(st_write(path, t, 2, NULL), 0);
    size_t len;
    char *raw = read_all(path, &len);
    for (size_t n = 0; n < len; n++) {
        char *cut = malloc(n ? n : 1);
        memcpy(cut, raw, n);
        st_file *f = (st_file *)1;
        int rc = st_open_mem(cut, n, &f);
        if (rc == 0)
            fail_msg("truncated to %zu of %zu bytes but opened", n, len);
        assert_null(f);
        assert_true(hy_err_msg()[0] != '\0');
        free(cut);
    }
    /* a truncated file on disk says which file */
    snprintf(path, sizeof path, "%s/tr2.safetensors", tmpdir);
    FILE *fp = fopen(path, "wb");
    fwrite(raw, 1, len - 3, fp);
    fclose(fp);
    st_file *f;
    assert_int_equal(st_open(path, &f), HY_EFORMAT);
    assert_non_null(strstr(hy_err_msg(), "tr2.safetensors"));
    assert_non_null(strstr(hy_err_msg(), "'y'"));
    free(raw);
}

static void test_header_errors(void **state)
{
    (void)state;
    size_t len;
    /* header length far past the end */
    uint8_t *b = mkfile("{}", 0, &len);
    b[0] = 0xff;
    b[5] = 0x01;
    st_file *f;
    assert_int_equal(st_open_mem(b, len, &f), HY_EFORMAT);
    assert_non_null(strstr(hy_err_msg(), "past the end"));
    free(b);
    /* shorter than 8 bytes */
    assert_int_equal(st_open_mem("abc", 3, &f), HY_EFORMAT);
    assert_non_null(strstr(hy_err_msg(), "shorter than"));
    assert_int_equal(st_open("/nonexistent/dir/x.safetensors", &f), HY_EIO);
    assert_non_null(strstr(hy_err_msg(), "/nonexistent/dir/x.safetensors"));

    expect_err("{\"x\":", 0, HY_EFORMAT, "not valid JSON");
    expect_err("[1,2]", 0, HY_EFORMAT, "not a JSON object");
    expect_err("{\"x\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, HY_EUNSUPPORTED, "I64");
    expect_err("{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, HY_EUNSUPPORTED,
               "F8_E4M3");
    expect_err("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 24, HY_EFORMAT, "'w'");
    expect_err("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", 20, HY_EFORMAT, "outside");
    expect_err("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, HY_EFORMAT, "outside");
    expect_err("{\"w\":{\"dtype\":\"F16\",\"shape\":[-1],\"data_offsets\":[0,2]}}", 2, HY_EFORMAT, "shape[0]");
    expect_err("{\"w\":{\"dtype\":\"F16\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,2]}}", 2,
               HY_EFORMAT, "overflow");
    expect_err("{\"w\":{\"dtype\":\"F16\",\"shape\":[1]}}", 2, HY_EFORMAT, "data_offsets");
    expect_err("{\"w\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0]}}", 2, HY_EFORMAT, "data_offsets");
    expect_err("{\"w\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,-2]}}", 2, HY_EFORMAT, "data_offsets");
    expect_err("{\"w\":7}", 0, HY_EFORMAT, "not an object");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, HY_EFORMAT, "overlap");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, HY_EFORMAT, "JSON");
    expect_err("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, HY_EFORMAT,
               "dimensions");
    /* fine: metadata ignored, scalar, empty tensor, trailing padding spaces */
    assert_int_equal(open_hdr("{\"__metadata__\":{\"format\":\"pt\"},\"s\":{\"dtype\":\"BF16\",\"shape\":[],"
                              "\"data_offsets\":[0,2]},\"e\":{\"dtype\":\"F32\",\"shape\":[0,5],"
                              "\"data_offsets\":[2,2]}}   ", 2), 0);
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/hy_st_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_header_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
