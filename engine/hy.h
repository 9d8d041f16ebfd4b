/* hy.h - project-wide status codes and the per-thread error message.
 * Every room includes this; it must not grow anything but error plumbing and tiny helpers. */
#ifndef HY_H
#define HY_H

#include <stddef.h>
#include <stdint.h>

enum {
    HY_OK = 0,
    HY_EINVAL = -1,      /* bad argument or bad user input */
    HY_ENOMEM = -2,      /* allocation failed */
    HY_EIO = -3,         /* open/read/mmap failed */
    HY_EFORMAT = -4,     /* malformed file (GGUF, safetensors, JSON config) */
    HY_EUNSUPPORTED = -5,/* well-formed but not supported (architecture, tensor type) */
    HY_ENOTFOUND = -6,   /* key, tensor, adapter or model missing */
    HY_EBUSY = -7,       /* resource in use (adapter pinned, queue full) */
    HY_EDEVICE = -8,     /* CUDA / device failure */
    HY_ELIMIT = -9,      /* a configured limit was exceeded */
    HY_ECANCELED = -10,  /* work was cancelled */
};

/* Record a message for the calling thread and return `code` (so `return hy_err_set(...)` works).
 * The message reaches the user verbatim; write it for them. */
int hy_err_set(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefix the current message with "<prefix>: " (adds context on the way up); returns code. */
int hy_err_wrap(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The calling thread's last message ("" when none). Valid until the next hy_err_* call on this thread. */
const char *hy_err_msg(void);
void hy_err_clear(void);
/* Short stable name of a code ("EFORMAT"). */
const char *hy_err_name(int code);

/* Overflow-checked size arithmetic: return 0 and write *out, or HY_ELIMIT on overflow. */
int hy_mul_size(size_t a, size_t b, size_t *out);
int hy_add_size(size_t a, size_t b, size_t *out);

/* Monotonic clock in seconds. */
double hy_now(void);

#define HY_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define HY_MIN(a, b) ((a) < (b) ? (a) : (b))
#define HY_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
