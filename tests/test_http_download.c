/* test_http_download.c - srv_download (server/srv_fetch.c), the fetch behind https:// adapters, run
 * on file:// URLs (no network here): the result appears only under its final name, every failure
 * (cap, sha256 mismatch, missing source, refused protocol) leaves no temp file, a temp file of
 * another download of the same destination is never touched, and concurrent downloads to one
 * destination all succeed. Expected digests come from coreutils sha256sum. The https transport
 * itself cannot be exercised without a network and a trusted certificate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <curl/curl.h>
#include <dirent.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/hy.h"
#include "server/http.h"

#define SRC_BYTES (300 * 1024 + 17)

typedef struct {
    char root[PATH_MAX];  /* mkdtemp'd; src/ holds the source, dst/ the downloads */
    char src[PATH_MAX + 32], url[PATH_MAX + 64], dst_dir[PATH_MAX + 32], dst[PATH_MAX + 64];
    char sha[65];
    unsigned char *bytes;
} fx;

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Whole file into a malloc'ed buffer (*n bytes); NULL when it cannot be read. */
static unsigned char *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc((size_t)len + 1);
    *n = fread(p, 1, (size_t)len, f);
    fclose(f);
    return p;
}

/* Names in dir (excluding . and ..), sorted, joined by ','. */
static void listing(const char *dir, char *out, size_t cap)
{
    struct dirent **ents;
    int n = scandir(dir, &ents, NULL, alphasort);
    assert_true(n >= 0);
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (strcmp(ents[i]->d_name, ".") && strcmp(ents[i]->d_name, "..")) {
            if (out[0])
                strncat(out, ",", cap - strlen(out) - 1);
            strncat(out, ents[i]->d_name, cap - strlen(out) - 1);
        }
        free(ents[i]);
    }
    free(ents);
}

static void sha256sum(const char *path, char hex[65])
{
    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "sha256sum '%s'", path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_int_equal(fscanf(p, "%64s", hex), 1);
    pclose(p);
    assert_int_equal(strlen(hex), 64);
}

static int setup(void **st)
{
    fx *f = calloc(1, sizeof *f);
    snprintf(f->root, sizeof f->root, "/tmp/hydrad-dl-XXXXXX");
    if (!mkdtemp(f->root))
        return -1;
    snprintf(f->src, sizeof f->src, "%s/src.bin", f->root);
    snprintf(f->url, sizeof f->url, "file://%s", f->src);
    snprintf(f->dst_dir, sizeof f->dst_dir, "%s/dst", f->root);
    snprintf(f->dst, sizeof f->dst, "%s/adapter_model.safetensors", f->dst_dir);
    mkdir(f->dst_dir, 0700);
    f->bytes = malloc(SRC_BYTES);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < SRC_BYTES; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        f->bytes[i] = (unsigned char)x;
    }
    write_file(f->src, f->bytes, SRC_BYTES);
    sha256sum(f->src, f->sha);
    *st = f;
    return 0;
}

static int teardown(void **st)
{
    fx *f = *st;
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", f->root);
    int rc = system(cmd);
    free(f->bytes);
    free(f);
    return rc == 0 ? 0 : -1;
}

static void assert_dst_is_source(fx *f)
{
    size_t n = 0;
    unsigned char *got = read_file(f->dst, &n);
    assert_non_null(got);
    assert_int_equal(n, SRC_BYTES);
    assert_memory_equal(got, f->bytes, SRC_BYTES);
    free(got);
}

static void test_ok_and_sha(void **st)
{
    fx *f = *st;
    char ls[4096];
    assert_int_equal(srv_download(f->url, f->dst, SRC_BYTES, NULL, "file", NULL), HY_OK);
    assert_dst_is_source(f);
    listing(f->dst_dir, ls, sizeof ls);
    assert_string_equal(ls, "adapter_model.safetensors");
    unlink(f->dst);
    char upper[65];
    for (int i = 0; i < 65; i++)
        upper[i] = (char)(f->sha[i] >= 'a' && f->sha[i] <= 'f' ? f->sha[i] - 32 : f->sha[i]);
    assert_int_equal(srv_download(f->url, f->dst, SRC_BYTES, upper, "file", NULL), HY_OK);
    assert_dst_is_source(f);
    listing(f->dst_dir, ls, sizeof ls);
    assert_string_equal(ls, "adapter_model.safetensors");
}

/* Every failure: an error code, dst as it was before (here: a marker), no temp file. */
static void test_failures_leave_nothing(void **st)
{
    fx *f = *st;
    char ls[4096], bad_sha[65], missing[PATH_MAX + 80];
    write_file(f->dst, "previous", 8);
    memcpy(bad_sha, f->sha, 65);
    bad_sha[10] = bad_sha[10] == '0' ? '1' : '0';
    snprintf(missing, sizeof missing, "file://%s/none.bin", f->root);
    struct {
        const char *url, *sha, *proto;
        size_t cap;
        int want;
    } cases[] = {
        {f->url, NULL, "file", SRC_BYTES - 1, HY_ELIMIT},  /* one byte over the cap */
        {f->url, bad_sha, "file", SRC_BYTES, HY_EFORMAT},  /* digest mismatch */
        {missing, NULL, "file", SRC_BYTES, HY_EIO},        /* no such source */
        {f->url, NULL, "https", SRC_BYTES, HY_EIO},        /* protocol not allowed */
    };
    for (size_t i = 0; i < HY_ARRAY_LEN(cases); i++) {
        int rc = srv_download(cases[i].url, f->dst, cases[i].cap, cases[i].sha, cases[i].proto, NULL);
        if (rc != cases[i].want)
            fail_msg("case %zu: got %d, want %d (%s)", i, rc, cases[i].want, hy_err_msg());
        listing(f->dst_dir, ls, sizeof ls);
        assert_string_equal(ls, "adapter_model.safetensors");
        size_t n = 0;
        unsigned char *kept = read_file(f->dst, &n);
        assert_true(kept && n == 8 && memcmp(kept, "previous", 8) == 0);
        free(kept);
    }
    unlink(f->dst);
}

/* Once a bug: every download of one destination wrote "<dst>.part", so a second load of the
 * same URL truncated the first one's file and renamed it away under it. */
static void test_other_part_file_untouched(void **st)
{
    fx *f = *st;
    char part[PATH_MAX + 80], ls[4096];
    snprintf(part, sizeof part, "%s.part", f->dst);
    write_file(part, "another download in flight", 27);
    assert_int_equal(srv_download(f->url, f->dst, SRC_BYTES, f->sha, "file", NULL), HY_OK);
    assert_dst_is_source(f);
    size_t n = 0;
    unsigned char *other = read_file(part, &n);
    assert_non_null(other);
    assert_int_equal(n, 27);
    assert_memory_equal(other, "another download in flight", 27);
    free(other);
    listing(f->dst_dir, ls, sizeof ls);
    assert_string_equal(ls, "adapter_model.safetensors,adapter_model.safetensors.part");
    unlink(part);
    unlink(f->dst);
}

typedef struct {
    fx *f;
    int rc;
} job;

static void *run_job(void *arg)
{
    job *j = arg;
    j->rc = srv_download(j->f->url, j->f->dst, SRC_BYTES, j->f->sha, "file", NULL);
    return NULL;
}

static void test_concurrent_same_dst(void **st)
{
    fx *f = *st;
    enum { N = 8 };
    pthread_t th[N];
    job jobs[N];
    char ls[4096];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++) {
            jobs[i] = (job){f, -1};
            assert_int_equal(pthread_create(&th[i], NULL, run_job, &jobs[i]), 0);
        }
        for (int i = 0; i < N; i++) {
            pthread_join(th[i], NULL);
            assert_int_equal(jobs[i].rc, HY_OK);
        }
        assert_dst_is_source(f);
        listing(f->dst_dir, ls, sizeof ls);
        assert_string_equal(ls, "adapter_model.safetensors");
    }
}

/* A destination whose directory cannot hold a temp file: an error naming it, nothing created. */
static void test_unwritable_dir(void **st)
{
    fx *f = *st;
    char dst[PATH_MAX + 80];
    snprintf(dst, sizeof dst, "%s/no/such/dir/file", f->root);
    assert_int_equal(srv_download(f->url, dst, SRC_BYTES, NULL, "file", NULL), HY_EIO);
    assert_non_null(strstr(hy_err_msg(), "temp file"));
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ok_and_sha, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failures_leave_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_other_part_file_untouched, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_same_dst, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unwritable_dir, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
