/* hy.c - per-thread error messages and checked size arithmetic shared by every room.
 * Must stay free of any model or server knowledge. */
#include "hy.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static _Thread_local char hy_msg[1024];

int hy_err_set(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(hy_msg, sizeof hy_msg, fmt, ap);
    va_end(ap);
    return code;
}

int hy_err_wrap(int code, const char *fmt, ...)
{
    char prefix[512], old[sizeof hy_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, hy_msg, sizeof old);
    /* truncation is acceptable: the message is for people */
    size_t n = strlen(prefix);
    memcpy(hy_msg, prefix, n + 1);
    if (old[0] && n + 2 < sizeof hy_msg) {
        memcpy(hy_msg + n, ": ", 3);
        size_t room = sizeof hy_msg - n - 3, len = strlen(old);
        if (len > room)
            len = room;
        memcpy(hy_msg + n + 2, old, len);
        hy_msg[n + 2 + len] = '\0';
    }
    return code;
}

const char *hy_err_msg(void) { return hy_msg; }
void hy_err_clear(void) { hy_msg[0] = '\0'; }

const char *hy_err_name(int code)
{
    switch (code) {
    case HY_OK: return "OK";
    case HY_EINVAL: return "EINVAL";
    case HY_ENOMEM: return "ENOMEM";
    case HY_EIO: return "EIO";
    case HY_EFORMAT: return "EFORMAT";
    case HY_EUNSUPPORTED: return "EUNSUPPORTED";
    case HY_ENOTFOUND: return "ENOTFOUND";
    case HY_EBUSY: return "EBUSY";
    case HY_EDEVICE: return "EDEVICE";
    case HY_ELIMIT: return "ELIMIT";
    case HY_ECANCELED: return "ECANCELED";
    default: return "EUNKNOWN";
    }
}

int hy_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return hy_err_set(HY_ELIMIT, "size overflow (%zu x %zu)", a, b);
    *out = a * b;
    return HY_OK;
}

int hy_add_size(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a)
        return hy_err_set(HY_ELIMIT, "size overflow (%zu + %zu)", a, b);
    *out = a + b;
    return HY_OK;
}

double hy_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
