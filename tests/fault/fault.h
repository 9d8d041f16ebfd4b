/* fault.h - test-only fault injection: the Nth allocation, open, read, write or library call made
 * by hydrad's own code fails on purpose (SQLite's habit), so error paths run instead of being
 * only written. Never linked into the server: only tests/fault/test_fault, whose link line
 * redirects the library's calls with -Wl,--wrap=SYMBOL (see tests/fault/fault.mk).
 *
 * Scope: --wrap rewrites references from the objects linked into that binary (libhydrad.a and the
 * test), not calls made inside libc, jansson, libcurl or OpenSSL themselves (our calls INTO them
 * do fail: json_loadb, curl_easy_init, ...). jansson's own allocations can be failed too, on
 * request (FAULT_JANSSON, through json_set_alloc_funcs: fault_init). Counting is per thread:
 * only calls made by the thread that armed are counted and failed. */
#ifndef HY_FAULT_H
#define HY_FAULT_H

#include <stdbool.h>
#include <stddef.h>

enum {
    FAULT_ALLOC = 1u << 0, /* malloc calloc realloc strdup strndup aligned_alloc posix_memalign: NULL,
                            * errno ENOMEM; jansson calls that allocate (json_loadb/loads: NULL with
                            * "out of memory"; json_dumps, json_object, json_array, json_string[n],
                            * json_integer, json_real, json_pack, json_[deep_]copy: NULL;
                            * json_object_set_new, json_array_append_new: -1, the value dropped) */
    FAULT_OPEN = 1u << 1,  /* open fopen fdopen mkstemps: -1/NULL, errno EMFILE */
    FAULT_READ = 1u << 2,  /* read fread fstat mmap: -1/0/MAP_FAILED, errno EIO (fread sets ferror) */
    FAULT_WRITE = 1u << 3, /* write fwrite fflush fclose rename: errno ENOSPC (fclose still closes) */
    FAULT_LIB = 1u << 4,   /* curl_easy_init (NULL), curl_easy_perform (runs, then reports a transfer
                            * cut short: CURLE_PARTIAL_FILE), EVP_MD_CTX_new (NULL),
                            * pthread_create (EAGAIN) */
    FAULT_ALL = 0x1f,
    /* jansson's internal allocations (json_set_alloc_funcs), not in FAULT_ALL: jansson 2.14 itself
     * can return success with a member missing from a parsed object when one of them fails (a
     * 12-line program shows it: {"model":..,"seed":7,"presence_penalty":0.5} loads without
     * presence_penalty when its 11th allocation fails), which no caller can detect. */
    FAULT_JANSSON = 1u << 5,
    /* CUDA runtime and cuBLAS calls of the CUDA backend, in the CPU emulator build only
     * (tests/cuda_emu; fault_cuda.c): allocations fail with cudaErrorMemoryAllocation, the rest
     * with cudaErrorLaunchFailure (cuBLAS: EXECUTION_FAILED, cublasCreate: ALLOC_FAILED);
     * cudaGetLastError after a launch reports the launch as failed. */
    FAULT_CUDA = 1u << 6,
};

/* For wrappers in other files (fault_cuda.c): count this call of `kind` and say whether it is
 * the one to fail. */
bool fault_should_fail(unsigned kind, const char *site, void *caller);

/* Once per process, before any arming: routes jansson's allocator through the counters. */
void fault_init(void);
/* Start counting, on the calling thread, the calls of the kinds in `kinds`; the nth of them
 * (1-based) fails, the others go through. nth = 0 only counts. */
void fault_arm(unsigned kinds, long nth);
/* Stop counting; returns how many calls of the armed kinds were made while armed. */
long fault_disarm(void);
/* Stop and restart counting without disarming (a test checks its result in between: its own
 * calls are not the operation's). */
void fault_suspend(void);
void fault_resume(void);
/* Whether the armed nth call happened (and failed), and which function it was ("malloc"). Valid
 * after fault_disarm until the next fault_arm. */
bool fault_fired(void);
const char *fault_site(void);
/* Return address of the call that failed (for addr2line), NULL when none fired. */
void *fault_caller(void);

/* Bytes the allocator holds for the program right now, for leak checks around one operation:
 * AddressSanitizer's count in an ASan build, glibc's mallinfo2 (in use + mmapped) otherwise.
 * glibc's count is exact only with the per-thread cache off: see fault_exact_heap. */
size_t fault_heap_bytes(void);
/* glibc build: re-execute the program once with GLIBC_TUNABLES=glibc.malloc.tcache_count=0 (so
 * freed chunks leave the in-use count at once), and fill fresh blocks with a known byte
 * (M_PERTURB; ASan fills them itself) so reads of memory nobody wrote give wrong results rather
 * than last run's values. True when the count is exact (ASan, or tcache already off). Call first
 * thing in main. */
bool fault_exact_heap(char **argv);

#endif
