/* fault.c - the --wrap side of fault injection (fault.h): __wrap_SYMBOL for every allocation, file
 * and library call hydrad's loaders, downloader and request path make; each counts itself when
 * its kind is armed on the calling thread and fails when it is the armed nth call. Test-only: it
 * must never be linked into bin/hydrad. */
#include "tests/fault/fault.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <malloc.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
/* <sanitizer/allocator_interface.h>, declared here: gcc packages do not always ship the header */
size_t __sanitizer_get_current_allocated_bytes(void);
#define FAULT_ASAN 1
#endif

/* The calling thread's counter: only the thread that armed counts (the operation under test
 * runs there; compute-pool threads and other tests' threads are left alone). */
static _Thread_local struct {
    bool armed, fired, suspended;
    unsigned kinds;
    long nth, count;
    const char *site;
    void *caller;
} fs;

static bool fault_hit(unsigned kind, const char *site, void *caller)
{
    if (!fs.armed || fs.suspended || !(fs.kinds & kind))
        return false;
    if (++fs.count != fs.nth)
        return false;
    fs.fired = true;
    fs.site = site;
    fs.caller = caller;
    return true;
}
#define HIT(kind, name) fault_hit(kind, name, __builtin_return_address(0))

bool fault_should_fail(unsigned kind, const char *site, void *caller) { return fault_hit(kind, site, caller); }

void fault_arm(unsigned kinds, long nth)
{
    fs.armed = true;
    fs.suspended = false;
    fs.fired = false;
    fs.kinds = kinds;
    fs.nth = nth;
    fs.count = 0;
    fs.site = NULL;
    fs.caller = NULL;
}

long fault_disarm(void)
{
    fs.armed = false;
    return fs.count;
}

void fault_suspend(void) { fs.suspended = true; }
void fault_resume(void) { fs.suspended = false; }

bool fault_fired(void) { return fs.fired; }
const char *fault_site(void) { return fs.site ? fs.site : "(none)"; }
void *fault_caller(void) { return fs.caller; }

/* ---- allocation ---- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);
void *__real_aligned_alloc(size_t align, size_t n);
int __real_posix_memalign(void **p, size_t align, size_t n);

void *__wrap_malloc(size_t n)
{
    if (HIT(FAULT_ALLOC, "malloc")) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t size)
{
    if (HIT(FAULT_ALLOC, "calloc")) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t n)
{
    if (HIT(FAULT_ALLOC, "realloc")) {
        errno = ENOMEM;
        return NULL; /* p stays valid, as a real failed realloc leaves it */
    }
    return __real_realloc(p, n);
}

char *__wrap_strdup(const char *s)
{
    if (HIT(FAULT_ALLOC, "strdup")) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_strdup(s);
}

char *__wrap_strndup(const char *s, size_t n)
{
    if (HIT(FAULT_ALLOC, "strndup")) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_strndup(s, n);
}

void *__wrap_aligned_alloc(size_t align, size_t n)
{
    if (HIT(FAULT_ALLOC, "aligned_alloc")) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_aligned_alloc(align, n);
}

int __wrap_posix_memalign(void **p, size_t align, size_t n)
{
    if (HIT(FAULT_ALLOC, "posix_memalign"))
        return ENOMEM;
    return __real_posix_memalign(p, align, n);
}

/* jansson's own allocator (json_set_alloc_funcs), a kind of its own: jansson 2.14 can return a
 * parsed object with a member missing when one of its internal allocations fails (see fault.h),
 * so by default only our calls into jansson fail, whole (below). */
static void *fault_json_malloc(size_t n)
{
    if (HIT(FAULT_JANSSON, "jansson malloc"))
        return NULL;
    return __real_malloc(n);
}

static void fault_json_free(void *p) { free(p); }

void fault_init(void) { json_set_alloc_funcs(fault_json_malloc, fault_json_free); }

/* ---- jansson calls that allocate, failing as they do when out of memory ---- */

json_t *__real_json_loadb(const char *buf, size_t len, size_t flags, json_error_t *e);
json_t *__real_json_loads(const char *s, size_t flags, json_error_t *e);
char *__real_json_dumps(const json_t *j, size_t flags);
json_t *__real_json_object(void);
json_t *__real_json_array(void);
json_t *__real_json_string(const char *s);
json_t *__real_json_stringn(const char *s, size_t n);
json_t *__real_json_integer(json_int_t v);
json_t *__real_json_real(double v);
int __real_json_object_set_new(json_t *o, const char *k, json_t *v);
int __real_json_array_append_new(json_t *a, json_t *v);
json_t *__real_json_deep_copy(const json_t *j);
json_t *__real_json_copy(json_t *j);

static json_t *fault_json_load_failed(json_error_t *e)
{
    if (e) {
        memset(e, 0, sizeof *e);
        e->line = e->column = -1;
        snprintf(e->text, sizeof e->text, "out of memory");
        e->text[JSON_ERROR_TEXT_LENGTH - 1] = (char)json_error_out_of_memory; /* as jansson marks it */
    }
    return NULL;
}

json_t *__wrap_json_loadb(const char *buf, size_t len, size_t flags, json_error_t *e)
{
    if (HIT(FAULT_ALLOC, "json_loadb"))
        return fault_json_load_failed(e);
    return __real_json_loadb(buf, len, flags, e);
}

json_t *__wrap_json_loads(const char *s, size_t flags, json_error_t *e)
{
    if (HIT(FAULT_ALLOC, "json_loads"))
        return fault_json_load_failed(e);
    return __real_json_loads(s, flags, e);
}

char *__wrap_json_dumps(const json_t *j, size_t flags)
{
    return HIT(FAULT_ALLOC, "json_dumps") ? NULL : __real_json_dumps(j, flags);
}

json_t *__wrap_json_object(void) { return HIT(FAULT_ALLOC, "json_object") ? NULL : __real_json_object(); }
json_t *__wrap_json_array(void) { return HIT(FAULT_ALLOC, "json_array") ? NULL : __real_json_array(); }
json_t *__wrap_json_string(const char *s) { return HIT(FAULT_ALLOC, "json_string") ? NULL : __real_json_string(s); }
json_t *__wrap_json_stringn(const char *s, size_t n)
{
    return HIT(FAULT_ALLOC, "json_stringn") ? NULL : __real_json_stringn(s, n);
}
json_t *__wrap_json_integer(json_int_t v) { return HIT(FAULT_ALLOC, "json_integer") ? NULL : __real_json_integer(v); }
json_t *__wrap_json_real(double v) { return HIT(FAULT_ALLOC, "json_real") ? NULL : __real_json_real(v); }
json_t *__wrap_json_deep_copy(const json_t *j)
{
    return HIT(FAULT_ALLOC, "json_deep_copy") ? NULL : __real_json_deep_copy(j);
}
json_t *__wrap_json_copy(json_t *j) { return HIT(FAULT_ALLOC, "json_copy") ? NULL : __real_json_copy(j); }

/* the _new setters own the value: on failure jansson drops it, and so do these */
int __wrap_json_object_set_new(json_t *o, const char *k, json_t *v)
{
    if (HIT(FAULT_ALLOC, "json_object_set_new")) {
        json_decref(v);
        return -1;
    }
    return __real_json_object_set_new(o, k, v);
}

int __wrap_json_array_append_new(json_t *a, json_t *v)
{
    if (HIT(FAULT_ALLOC, "json_array_append_new")) {
        json_decref(v);
        return -1;
    }
    return __real_json_array_append_new(a, v);
}

json_t *__wrap_json_pack(const char *fmt, ...)
{
    if (HIT(FAULT_ALLOC, "json_pack"))
        return NULL;
    va_list ap;
    va_start(ap, fmt);
    json_t *j = json_vpack_ex(NULL, 0, fmt, ap);
    va_end(ap);
    return j;
}

/* ---- opening files ---- */

int __real_open(const char *path, int flags, ...);
FILE *__real_fopen(const char *path, const char *mode);
FILE *__real_fdopen(int fd, const char *mode);
int __real_mkstemps(char *tmpl, int suffixlen);

int __wrap_open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    if (HIT(FAULT_OPEN, "open")) {
        errno = EMFILE;
        return -1;
    }
    return __real_open(path, flags, mode);
}

FILE *__wrap_fopen(const char *path, const char *mode)
{
    if (HIT(FAULT_OPEN, "fopen")) {
        errno = EMFILE;
        return NULL;
    }
    return __real_fopen(path, mode);
}

FILE *__wrap_fdopen(int fd, const char *mode)
{
    if (HIT(FAULT_OPEN, "fdopen")) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_fdopen(fd, mode);
}

int __wrap_mkstemps(char *tmpl, int suffixlen)
{
    if (HIT(FAULT_OPEN, "mkstemps")) {
        errno = ENOSPC;
        return -1;
    }
    return __real_mkstemps(tmpl, suffixlen);
}

/* ---- reading ---- */

ssize_t __real_read(int fd, void *buf, size_t n);
size_t __real_fread(void *buf, size_t size, size_t n, FILE *fp);
int __real_fstat(int fd, struct stat *st);
void *__real_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);

/* A stream the injected failure leaves in the error state, as a real I/O error does (glibc's
 * flag: there is no portable way to set it). */
static void fault_set_ferror(FILE *fp)
{
#ifdef _IO_ERR_SEEN
    fp->_flags |= _IO_ERR_SEEN;
#else
    (void)fp;
#endif
}

ssize_t __wrap_read(int fd, void *buf, size_t n)
{
    if (HIT(FAULT_READ, "read")) {
        errno = EIO;
        return -1;
    }
    return __real_read(fd, buf, n);
}

size_t __wrap_fread(void *buf, size_t size, size_t n, FILE *fp)
{
    if (HIT(FAULT_READ, "fread")) {
        errno = EIO;
        fault_set_ferror(fp);
        return 0;
    }
    return __real_fread(buf, size, n, fp);
}

int __wrap_fstat(int fd, struct stat *st)
{
    if (HIT(FAULT_READ, "fstat")) {
        errno = EIO;
        return -1;
    }
    return __real_fstat(fd, st);
}

void *__wrap_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (HIT(FAULT_READ, "mmap")) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    return __real_mmap(addr, len, prot, flags, fd, off);
}

/* ---- writing ---- */

ssize_t __real_write(int fd, const void *buf, size_t n);
size_t __real_fwrite(const void *buf, size_t size, size_t n, FILE *fp);
int __real_fflush(FILE *fp);
int __real_fclose(FILE *fp);
int __real_rename(const char *from, const char *to);

ssize_t __wrap_write(int fd, const void *buf, size_t n)
{
    if (HIT(FAULT_WRITE, "write")) {
        errno = ENOSPC;
        return -1;
    }
    return __real_write(fd, buf, n);
}

size_t __wrap_fwrite(const void *buf, size_t size, size_t n, FILE *fp)
{
    if (HIT(FAULT_WRITE, "fwrite")) {
        errno = ENOSPC; /* disk full: nothing of this call reaches the file */
        fault_set_ferror(fp);
        return 0;
    }
    return __real_fwrite(buf, size, n, fp);
}

int __wrap_fflush(FILE *fp)
{
    if (HIT(FAULT_WRITE, "fflush")) {
        errno = ENOSPC;
        return EOF;
    }
    return __real_fflush(fp);
}

int __wrap_fclose(FILE *fp)
{
    if (HIT(FAULT_WRITE, "fclose")) {
        __real_fclose(fp); /* the stream is gone either way, as after a real failed close */
        errno = ENOSPC;
        return EOF;
    }
    return __real_fclose(fp);
}

int __wrap_rename(const char *from, const char *to)
{
    if (HIT(FAULT_WRITE, "rename")) {
        errno = EIO;
        return -1;
    }
    return __real_rename(from, to);
}

/* ---- libraries ---- */

CURL *__real_curl_easy_init(void);
CURLcode __real_curl_easy_perform(CURL *h);
EVP_MD_CTX *__real_EVP_MD_CTX_new(void);
int __real_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg);

CURL *__wrap_curl_easy_init(void)
{
    if (HIT(FAULT_LIB, "curl_easy_init"))
        return NULL;
    return __real_curl_easy_init();
}

/* The transfer runs (the sink sees the bytes), then ends as a connection cut before the end does. */
CURLcode __wrap_curl_easy_perform(CURL *h)
{
    bool cut = HIT(FAULT_LIB, "curl_easy_perform");
    CURLcode rc = __real_curl_easy_perform(h);
    return cut && rc == CURLE_OK ? CURLE_PARTIAL_FILE : rc;
}

EVP_MD_CTX *__wrap_EVP_MD_CTX_new(void)
{
    if (HIT(FAULT_LIB, "EVP_MD_CTX_new"))
        return NULL;
    return __real_EVP_MD_CTX_new();
}

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
    if (HIT(FAULT_LIB, "pthread_create"))
        return EAGAIN;
    return __real_pthread_create(t, attr, fn, arg);
}

/* ---- heap accounting for leak checks ---- */

size_t fault_heap_bytes(void)
{
#ifdef FAULT_ASAN
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#endif
}

#define FAULT_TUNABLE "glibc.malloc.tcache_count=0"

bool fault_exact_heap(char **argv)
{
#ifdef FAULT_ASAN
    (void)argv;
    return true;
#else
    /* fresh blocks filled with a known byte: a read of memory nobody wrote shows as a wrong value */
    mallopt(M_PERTURB, 0x5a);
    const char *t = getenv("GLIBC_TUNABLES");
    if (t && strstr(t, FAULT_TUNABLE))
        return true;
    if (getenv("HY_FAULT_REEXEC"))
        return false; /* tried once already: the tunable did not take */
    char buf[1024];
    snprintf(buf, sizeof buf, "%s%s%s", t ? t : "", t ? ":" : "", FAULT_TUNABLE);
    setenv("GLIBC_TUNABLES", buf, 1);
    setenv("HY_FAULT_REEXEC", "1", 1);
    execv("/proc/self/exe", argv);
    return false;
#endif
}
