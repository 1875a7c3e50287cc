/*
 * moe_base.h: the shared base of moe-engine (status codes, check macros, logging, dtypes,
 * tensors, clocks, a deterministic random generator). It depends on nothing of ours and on no
 * third-party library; every other module (kernels, parallel, ipc, engine, tools) may use it.
 *
 * Ownership and threads: the log configuration is process-global, set once at start (before
 * threads) and read without locks afterwards; each log line is written with one write(2) so
 * lines of several threads or processes do not interleave. The last error message
 * (moe_errmsg) is thread-local.
 *
 * Invariants: every function that can fail returns moe_status (MOE_OK == 0, errors negative);
 * a function that fails writes nothing to its outputs unless its comment says otherwise.
 */
#ifndef MOE_BASE_H
#define MOE_BASE_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------
 * Status codes. Negative values are errors. The numeric values are part of the wire protocol
 * (error replies carry them), so they never change; new codes are appended.
 * ---------------------------------------------------------------------------------------- */
typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARG = -1,  /* a caller passed something invalid (shape, id, range, NULL) */
    MOE_ERR_NOMEM = -2,        /* host allocation failed */
    MOE_ERR_IO = -3,           /* file or socket I/O */
    MOE_ERR_SYSTEM = -4,       /* an OS call failed (errno) */
    MOE_ERR_CUDA = -5,         /* CUDA runtime or a kernel launch */
    MOE_ERR_CUBLAS = -6,       /* cuBLAS */
    MOE_ERR_NCCL = -7,         /* NCCL */
    MOE_ERR_ZMQ = -8,          /* ZeroMQ */
    MOE_ERR_UV = -9,           /* libuv */
    MOE_ERR_UNSUPPORTED = -10, /* valid, but not supported by this build or backend */
    MOE_ERR_FORMAT = -11,      /* malformed file or message contents */
    MOE_ERR_PROTOCOL = -12,    /* wire protocol violation (magic, version, op) */
    MOE_ERR_TIMEOUT = -13,     /* a deadline passed */
    MOE_ERR_BUSY = -14,        /* a bounded queue is full; retry later */
    MOE_ERR_NOT_FOUND = -15,   /* a named thing does not exist (tensor, layer, file) */
    MOE_ERR_SHUTDOWN = -16,    /* the service is stopping */
    MOE_ERR_ALIAS = -17,       /* an output overlaps an input (fused experts are out-of-place) */
    MOE_ERR_WORKER = -18,      /* a worker died or failed; the request was not computed */
    MOE_ERR_AUTH = -19,        /* authentication refused */
    MOE_ERR_INTERNAL = -20,    /* a bug: an internal invariant did not hold */
    MOE_ERR_LIMIT = -21,       /* over a configured limit (tokens, message size) */
    MOE_STATUS_MIN_ = -21
} moe_status;

/* A short constant description ("invalid argument"); never NULL, also for unknown codes. */
const char *moe_status_str(moe_status s);
/* The code's stable identifier ("MOE_ERR_INVALID_ARG"). */
const char *moe_status_name(moe_status s);

/* ------------------------------------------------------------------------------------------
 * The last error message of this thread: set where an error is first detected, with the
 * detail a user needs ("expert id 130 out of range [0, 128) at token 3, slot 1").
 * ---------------------------------------------------------------------------------------- */
/* Sets the message and returns `s` (so `return moe_fail(...)` reads well). */
moe_status moe_fail(moe_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
moe_status moe_failv(moe_status s, const char *fmt, va_list ap);
const char *moe_errmsg(void); /* "" when none */
void moe_errmsg_clear(void);
const char *moe_strerror_(int err); /* thread-safe strerror */

/* ------------------------------------------------------------------------------------------
 * Logging. Filtered by level and subsystem before any formatting.
 * Environment: MOE_LOG_LEVEL=error|warn|info|debug|trace|none (default info),
 *              MOE_LOG_SUBSYS=all | list of base,kern,par,ipc,eng,tool (a leading ^ excludes).
 * One line each: "2026-11-27T13:27:10.123456Z W eng[worker r1 p4242] message" to stderr.
 * ---------------------------------------------------------------------------------------- */
typedef enum moe_log_level {
    MOE_LOG_NONE = 0,
    MOE_LOG_ERROR = 1,
    MOE_LOG_WARN = 2,
    MOE_LOG_INFO = 3,
    MOE_LOG_DEBUG = 4,
    MOE_LOG_TRACE = 5
} moe_log_level;

typedef enum moe_log_subsys {
    MOE_SUB_BASE = 1u << 0,
    MOE_SUB_KERN = 1u << 1,
    MOE_SUB_PAR = 1u << 2,
    MOE_SUB_IPC = 1u << 3,
    MOE_SUB_ENG = 1u << 4,
    MOE_SUB_TOOL = 1u << 5,
    MOE_SUB_ALL = 0x3f
} moe_log_subsys;

extern int moe_log_level_g; /* read-only outside log.c */
extern unsigned moe_log_subsys_mask_g;

/* Reads MOE_LOG_LEVEL / MOE_LOG_SUBSYS; returns MOE_ERR_INVALID_ARG (and keeps the defaults)
 * on an unknown name, with moe_errmsg saying which. */
moe_status moe_log_init_from_env(void);
moe_status moe_log_set_level_str(const char *s);
moe_status moe_log_set_subsys_str(const char *s);
void moe_log_set_level(moe_log_level l);
/* Tag lines with a role name ("coord", "worker") and a rank (-1: none). */
void moe_log_set_identity(const char *role, int rank);
/* Log to this fd instead of stderr (the fd stays owned by the caller). */
void moe_log_set_fd(int fd);
const char *moe_log_level_name(moe_log_level l);

void moe_log_write(moe_log_level l, moe_log_subsys sub, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#define moe_log_enabled(l, sub) ((int)(l) <= moe_log_level_g && (moe_log_subsys_mask_g & (unsigned)(sub)))

#define MOE_LOG(l, sub, ...)                                            \
    do {                                                                \
        if (moe_log_enabled((l), (sub)))                                \
            moe_log_write((l), (sub), __FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

#define MOE_ERROR(sub, ...) MOE_LOG(MOE_LOG_ERROR, sub, __VA_ARGS__)
#define MOE_WARN(sub, ...) MOE_LOG(MOE_LOG_WARN, sub, __VA_ARGS__)
#define MOE_INFO(sub, ...) MOE_LOG(MOE_LOG_INFO, sub, __VA_ARGS__)
#define MOE_DEBUG(sub, ...) MOE_LOG(MOE_LOG_DEBUG, sub, __VA_ARGS__)
#define MOE_TRACE(sub, ...) MOE_LOG(MOE_LOG_TRACE, sub, __VA_ARGS__)

/* ------------------------------------------------------------------------------------------
 * Check macros: one family for our calls and for each library, in the manner of NCCL's
 * NCCLCHECK. On failure each one logs the frame (file:line, the call, the cause) at debug
 * level, so a failure prints its own backtrace with MOE_LOG_LEVEL=debug, and propagates a
 * moe_status. The *_GOTO forms store the status in `res` and jump to a cleanup label
 * (one cleanup path per function).
 *
 * The library forms name the library's own functions (cudaGetErrorString, zmq_strerror, ...)
 * only in their expansion: this header includes none of them.
 * ---------------------------------------------------------------------------------------- */
#define MOE_FRAME_(st, what)                                                                     \
    MOE_LOG(MOE_LOG_DEBUG, MOE_SUB_ALL, "  at %s:%d: %s -> %s%s%s", __FILE__, __LINE__, (what), \
            moe_status_name(st), moe_errmsg()[0] ? ": " : "", moe_errmsg())

/* Our own calls. */
#define MOE_CHECK(call)             \
    do {                            \
        moe_status st_ = (call);    \
        if (st_ != MOE_OK) {        \
            MOE_FRAME_(st_, #call); \
            return st_;             \
        }                           \
    } while (0)

#define MOE_CHECK_GOTO(call, res, label) \
    do {                                 \
        (res) = (call);                  \
        if ((res) != MOE_OK) {           \
            MOE_FRAME_((res), #call);    \
            goto label;                  \
        }                                \
    } while (0)

/* A condition on arguments: fail with a formatted message. */
#define MOE_REQUIRE(cond, st, ...)              \
    do {                                        \
        if (!(cond))                            \
            return moe_fail((st), __VA_ARGS__); \
    } while (0)

/* Internal invariant: a bug if false. Never for peer input. Returns MOE_ERR_INTERNAL. */
#define MOE_ASSERT(cond)                                                                                 \
    do {                                                                                                 \
        if (!(cond)) {                                                                                   \
            MOE_LOG(MOE_LOG_ERROR, MOE_SUB_ALL, "internal invariant failed at %s:%d: %s", __FILE__,     \
                    __LINE__, #cond);                                                                    \
            return moe_fail(MOE_ERR_INTERNAL, "internal invariant failed: %s (%s:%d)", #cond, __FILE__, \
                            __LINE__);                                                                   \
        }                                                                                                \
    } while (0)

/* errno-style OS calls returning -1 on failure. */
#define MOE_SYS_CHECK_GOTO(call, res, label)                                                           \
    do {                                                                                               \
        if ((call) == -1) {                                                                            \
            (res) = moe_fail(MOE_ERR_SYSTEM, "%s: %s (%s:%d)", #call, moe_strerror_(errno), __FILE__, \
                             __LINE__);                                                                \
            MOE_FRAME_((res), #call);                                                                  \
            goto label;                                                                                \
        }                                                                                              \
    } while (0)
#define MOE_SYS_CHECK(call)                                                                         \
    do {                                                                                            \
        if ((call) == -1) {                                                                         \
            moe_status sst_ = moe_fail(MOE_ERR_SYSTEM, "%s: %s (%s:%d)", #call, moe_strerror_(errno), \
                                       __FILE__, __LINE__);                                         \
            MOE_FRAME_(sst_, #call);                                                                \
            return sst_;                                                                            \
        }                                                                                           \
    } while (0)

/* CUDA runtime (cudaError_t; cudaSuccess == 0). */
#define MOE_CUDA_CHECK_GOTO(call, res, label)                                                         \
    do {                                                                                              \
        int ce_ = (int)(call);                                                                        \
        if (ce_ != 0) {                                                                               \
            (res) = moe_fail(MOE_ERR_CUDA, "%s: %s (%s:%d)", #call, cudaGetErrorString((cudaError_t)ce_), \
                             __FILE__, __LINE__);                                                     \
            MOE_FRAME_((res), #call);                                                                 \
            goto label;                                                                               \
        }                                                                                             \
    } while (0)
#define MOE_CUDA_CHECK(call)                                                                          \
    do {                                                                                              \
        int ce_ = (int)(call);                                                                        \
        if (ce_ != 0) {                                                                               \
            moe_status cst_ = moe_fail(MOE_ERR_CUDA, "%s: %s (%s:%d)", #call,                         \
                                       cudaGetErrorString((cudaError_t)ce_), __FILE__, __LINE__);     \
            MOE_FRAME_(cst_, #call);                                                                  \
            return cst_;                                                                              \
        }                                                                                             \
    } while (0)
/* After every kernel launch. */
#define MOE_CUDA_LAUNCH_CHECK() MOE_CUDA_CHECK(cudaGetLastError())

/* cuBLAS (cublasStatus_t; CUBLAS_STATUS_SUCCESS == 0). */
#define MOE_CUBLAS_CHECK(call)                                                                           \
    do {                                                                                                 \
        int be_ = (int)(call);                                                                           \
        if (be_ != 0) {                                                                                  \
            moe_status bst_ = moe_fail(MOE_ERR_CUBLAS, "%s: %s (%s:%d)", #call,                          \
                                       cublasGetStatusString((cublasStatus_t)be_), __FILE__, __LINE__); \
            MOE_FRAME_(bst_, #call);                                                                     \
            return bst_;                                                                                 \
        }                                                                                                \
    } while (0)

/* NCCL (ncclResult_t; ncclSuccess == 0; ncclInProgress == 7 is not an error for
 * non-blocking communicators and is handled by the caller). */
#define MOE_NCCL_CHECK_GOTO(call, res, label)                                                         \
    do {                                                                                              \
        int ne_ = (int)(call);                                                                        \
        if (ne_ != 0 && ne_ != 7) {                                                                   \
            (res) = moe_fail(MOE_ERR_NCCL, "%s: %s (%s:%d)", #call, ncclGetErrorString((ncclResult_t)ne_), \
                             __FILE__, __LINE__);                                                     \
            MOE_FRAME_((res), #call);                                                                 \
            goto label;                                                                               \
        }                                                                                             \
    } while (0)
#define MOE_NCCL_CHECK(call)                                                                           \
    do {                                                                                               \
        int ne_ = (int)(call);                                                                         \
        if (ne_ != 0 && ne_ != 7) {                                                                    \
            moe_status nst_ = moe_fail(MOE_ERR_NCCL, "%s: %s (%s:%d)", #call,                          \
                                       ncclGetErrorString((ncclResult_t)ne_), __FILE__, __LINE__);     \
            MOE_FRAME_(nst_, #call);                                                                   \
            return nst_;                                                                               \
        }                                                                                              \
    } while (0)

/* ZeroMQ (returns -1 and sets zmq_errno()); EAGAIN maps to MOE_ERR_BUSY. */
#define MOE_ZMQ_CHECK_GOTO(call, res, label)                                                          \
    do {                                                                                              \
        if ((call) == -1) {                                                                           \
            int ze_ = zmq_errno();                                                                    \
            (res) = moe_fail(ze_ == EAGAIN ? MOE_ERR_BUSY : MOE_ERR_ZMQ, "%s: %s (%s:%d)", #call,     \
                             zmq_strerror(ze_), __FILE__, __LINE__);                                  \
            MOE_FRAME_((res), #call);                                                                 \
            goto label;                                                                               \
        }                                                                                             \
    } while (0)
#define MOE_ZMQ_CHECK(call)                                                                               \
    do {                                                                                                  \
        if ((call) == -1) {                                                                               \
            int ze_ = zmq_errno();                                                                        \
            moe_status zst_ = moe_fail(ze_ == EAGAIN ? MOE_ERR_BUSY : MOE_ERR_ZMQ, "%s: %s (%s:%d)", #call, \
                                       zmq_strerror(ze_), __FILE__, __LINE__);                            \
            MOE_FRAME_(zst_, #call);                                                                      \
            return zst_;                                                                                  \
        }                                                                                                 \
    } while (0)

/* libuv (negative errno-style codes). */
#define MOE_UV_CHECK_GOTO(call, res, label)                                                                 \
    do {                                                                                                    \
        int ue_ = (call);                                                                                   \
        if (ue_ < 0) {                                                                                      \
            (res) = moe_fail(MOE_ERR_UV, "%s: %s (%s:%d)", #call, uv_strerror(ue_), __FILE__, __LINE__); \
            MOE_FRAME_((res), #call);                                                                       \
            goto label;                                                                                     \
        }                                                                                                   \
    } while (0)
#define MOE_UV_CHECK(call)                                                                                     \
    do {                                                                                                       \
        int ue_ = (call);                                                                                      \
        if (ue_ < 0) {                                                                                         \
            moe_status ust_ = moe_fail(MOE_ERR_UV, "%s: %s (%s:%d)", #call, uv_strerror(ue_), __FILE__, __LINE__); \
            MOE_FRAME_(ust_, #call);                                                                           \
            return ust_;                                                                                       \
        }                                                                                                      \
    } while (0)

/* ------------------------------------------------------------------------------------------
 * Data types. Values are on the wire (protocol dtype fields): never renumber.
 * ---------------------------------------------------------------------------------------- */
typedef enum moe_dtype {
    MOE_DTYPE_F32 = 0,
    MOE_DTYPE_F16 = 1,
    MOE_DTYPE_BF16 = 2,
    MOE_DTYPE_I32 = 3,
    MOE_DTYPE_COUNT_
} moe_dtype;

size_t moe_dtype_size(moe_dtype t);      /* 0 for an invalid dtype */
const char *moe_dtype_name(moe_dtype t); /* "bf16"; "invalid" for an invalid one */
bool moe_dtype_valid(int t);
/* Parses "f32"/"fp32"/"float32", "f16"/"fp16"/"float16", "bf16"/"bfloat16", "i32"/"int32". */
moe_status moe_dtype_parse(const char *s, moe_dtype *out);
bool moe_dtype_is_float(moe_dtype t);

/* Exact conversions: float -> half types round to nearest, ties to even; NaN stays NaN (quiet),
 * infinities stay infinite; overflow to infinity as IEEE says; fp16 subnormals handled. */
uint16_t moe_f32_to_bf16(float f);
float moe_bf16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float f);
float moe_f16_to_f32(uint16_t h);
/* Rounds a float to the precision of `t` (identity for F32). */
float moe_round_to(moe_dtype t, float f);

/* Bulk conversions between a typed buffer and floats. */
void moe_to_f32(moe_dtype t, const void *src, float *dst, size_t n);
void moe_from_f32(moe_dtype t, const float *src, void *dst, size_t n);
/* Reads element i of a typed buffer as float / stores a float as element i. */
float moe_load_f32(moe_dtype t, const void *p, size_t i);
void moe_store_f32(moe_dtype t, void *p, size_t i, float v);

/* ------------------------------------------------------------------------------------------
 * Tensors: contiguous, row-major, up to 4 dimensions. `data` is host memory unless the API
 * that takes the tensor says otherwise (the CUDA backend takes device memory). A tensor
 * made by moe_tensor_alloc owns its 64-byte aligned memory; a view does not.
 * ---------------------------------------------------------------------------------------- */
#define MOE_MAX_DIMS 4
#define MOE_ALIGN 64

typedef struct moe_tensor {
    void *data;
    moe_dtype dtype;
    int32_t ndim;
    int64_t shape[MOE_MAX_DIMS];
    bool owns;
} moe_tensor;

/* 64-byte aligned host memory; moe_free(NULL) is a no-op. Sizes past 2^48 bytes are refused. */
void *moe_alloc(size_t nbytes);
void *moe_calloc(size_t nbytes);
void moe_free(void *p);

moe_status moe_tensor_alloc(moe_tensor *t, moe_dtype dt, int32_t ndim, const int64_t *shape);
void moe_tensor_free(moe_tensor *t);
moe_tensor moe_tensor_view(void *data, moe_dtype dt, int32_t ndim, const int64_t *shape);
/* Convenience views of rank 1, 2 and 3. */
moe_tensor moe_tensor_view1(void *data, moe_dtype dt, int64_t d0);
moe_tensor moe_tensor_view2(void *data, moe_dtype dt, int64_t d0, int64_t d1);
moe_tensor moe_tensor_view3(void *data, moe_dtype dt, int64_t d0, int64_t d1, int64_t d2);
int64_t moe_tensor_numel(const moe_tensor *t);
size_t moe_tensor_nbytes(const moe_tensor *t);
/* "bf16[7, 2048]" into buf; returns buf. */
const char *moe_tensor_desc(const moe_tensor *t, char *buf, size_t cap);
/* Validates a tensor argument: the dtype, the rank, no negative dimension, the size not
 * overflowing, non-NULL data when non-empty and, for each i where `shape[i] >= 0`, that size
 * (shape may be NULL). The message names `what`. */
moe_status moe_tensor_expect(const moe_tensor *t, const char *what, moe_dtype dt, int32_t ndim,
                             const int64_t *shape);

/* True when the byte ranges [a, a+na) and [b, b+nb) overlap (empty ranges never do). */
bool moe_ranges_overlap(const void *a, size_t na, const void *b, size_t nb);
bool moe_tensors_overlap(const moe_tensor *a, const moe_tensor *b);

/* Overflow-checked size arithmetic: false on overflow. */
bool moe_mul_size(size_t a, size_t b, size_t *out);
bool moe_add_size(size_t a, size_t b, size_t *out);

/* ------------------------------------------------------------------------------------------
 * Time.
 * ---------------------------------------------------------------------------------------- */
uint64_t moe_now_ns(void); /* CLOCK_MONOTONIC */
double moe_now_s(void);

/* ------------------------------------------------------------------------------------------
 * Deterministic random numbers (splitmix64 seeding xoshiro256**), for tests, benchmarks and
 * the synthetic model writer: the same seed gives the same stream on every machine.
 * ---------------------------------------------------------------------------------------- */
typedef struct moe_rng {
    uint64_t s[4];
} moe_rng;
void moe_rng_seed(moe_rng *r, uint64_t seed);
uint64_t moe_rng_next(moe_rng *r);
double moe_rng_uniform(moe_rng *r);             /* [0, 1) */
float moe_rng_normal(moe_rng *r);               /* standard normal (Box-Muller) */
uint32_t moe_rng_below(moe_rng *r, uint32_t n); /* [0, n), unbiased */

#ifdef __cplusplus
}
#endif
#endif /* MOE_BASE_H */
