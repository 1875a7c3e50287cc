/*
 * status.c: status code names and the thread-local last error message.
 * Threads: moe_fail and moe_errmsg touch only this thread's buffer.
 */
#include <stdio.h>
#include <string.h>

#include "engine/base/moe_base.h"

typedef struct {
    moe_status code;
    const char *name;
    const char *desc;
} status_entry;

static const status_entry status_table[] = {
    {MOE_OK, "MOE_OK", "ok"},
    {MOE_ERR_INVALID_ARG, "MOE_ERR_INVALID_ARG", "invalid argument"},
    {MOE_ERR_NOMEM, "MOE_ERR_NOMEM", "out of memory"},
    {MOE_ERR_IO, "MOE_ERR_IO", "I/O error"},
    {MOE_ERR_SYSTEM, "MOE_ERR_SYSTEM", "system call failed"},
    {MOE_ERR_CUDA, "MOE_ERR_CUDA", "CUDA error"},
    {MOE_ERR_CUBLAS, "MOE_ERR_CUBLAS", "cuBLAS error"},
    {MOE_ERR_NCCL, "MOE_ERR_NCCL", "NCCL error"},
    {MOE_ERR_ZMQ, "MOE_ERR_ZMQ", "ZeroMQ error"},
    {MOE_ERR_UV, "MOE_ERR_UV", "libuv error"},
    {MOE_ERR_UNSUPPORTED, "MOE_ERR_UNSUPPORTED", "not supported"},
    {MOE_ERR_FORMAT, "MOE_ERR_FORMAT", "malformed data"},
    {MOE_ERR_PROTOCOL, "MOE_ERR_PROTOCOL", "protocol error"},
    {MOE_ERR_TIMEOUT, "MOE_ERR_TIMEOUT", "timed out"},
    {MOE_ERR_BUSY, "MOE_ERR_BUSY", "busy: queue full, retry later"},
    {MOE_ERR_NOT_FOUND, "MOE_ERR_NOT_FOUND", "not found"},
    {MOE_ERR_SHUTDOWN, "MOE_ERR_SHUTDOWN", "shutting down"},
    {MOE_ERR_ALIAS, "MOE_ERR_ALIAS", "output overlaps an input"},
    {MOE_ERR_WORKER, "MOE_ERR_WORKER", "worker failed"},
    {MOE_ERR_AUTH, "MOE_ERR_AUTH", "authentication refused"},
    {MOE_ERR_INTERNAL, "MOE_ERR_INTERNAL", "internal error"},
    {MOE_ERR_LIMIT, "MOE_ERR_LIMIT", "over a configured limit"},
};

static const status_entry *status_find(moe_status s) {
    for (size_t i = 0; i < sizeof status_table / sizeof status_table[0]; i++)
        if (status_table[i].code == s)
            return &status_table[i];
    return NULL;
}

const char *moe_status_str(moe_status s) {
    const status_entry *e = status_find(s);
    return e ? e->desc : "unknown status";
}

const char *moe_status_name(moe_status s) {
    const status_entry *e = status_find(s);
    return e ? e->name : "MOE_ERR_UNKNOWN";
}

static _Thread_local char errmsg_buf[512];

moe_status moe_failv(moe_status s, const char *fmt, va_list ap) {
    /* Format into a scratch buffer first: callers may pass moe_errmsg() itself as an argument
     * (adding context to an error), which must not be overwritten while it is read. */
    char tmp[sizeof errmsg_buf];
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    memcpy(errmsg_buf, tmp, sizeof errmsg_buf);
    return s;
}

moe_status moe_fail(moe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    moe_failv(s, fmt, ap);
    va_end(ap);
    return s;
}

const char *moe_errmsg(void) { return errmsg_buf; }

void moe_errmsg_clear(void) { errmsg_buf[0] = '\0'; }

const char *moe_strerror_(int err) {
    static _Thread_local char buf[128];
    /* GNU strerror_r returns a pointer that may or may not be buf. */
    const char *s = strerror_r(err, buf, sizeof buf);
    return s;
}
