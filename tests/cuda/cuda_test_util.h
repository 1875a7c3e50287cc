/*
 * cuda_test_util.h: helpers of the GPU tests (tests/cuda): device buffers with guard
 * sentinels around them, random host tensors, uploads and downloads, and the comparison of a
 * CUDA result with the CPU reference (every element, NaN never passes).
 *
 * Threads: single-threaded tests. Every helper fails the running cmocka test on a CUDA error.
 */
#ifndef TESTS_CUDA_CUDA_TEST_UTIL_H
#define TESTS_CUDA_CUDA_TEST_UTIL_H

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cuda_runtime.h>

#include "engine/base/moe_base.h"
#include "kernels/kern.h"

#define CT_CUDA(call)                                                                          \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess)                                                                 \
            fail_msg("%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_));      \
    } while (0)

#define CT_OK(call)                                                                             \
    do {                                                                                        \
        moe_status s_ = (call);                                                                 \
        if (s_ != MOE_OK)                                                                       \
            fail_msg("%s:%d: %s -> %s: %s", __FILE__, __LINE__, #call, moe_status_name(s_), moe_errmsg()); \
    } while (0)

/* Guard bytes on each side of a device buffer, filled with CT_GUARD_BYTE. */
#define CT_GUARD 4096
#define CT_GUARD_BYTE 0xA5

/* Every fill and upload below ends with a device synchronize. The backend runs on a
 * non-blocking stream, which does not wait for the legacy stream: cudaMemset on device memory
 * and a cudaMemcpy from pageable memory or between device buffers may return before the device
 * has done them, and a kernel enqueued next could read (or have its output overwritten by)
 * bytes still in flight. Engine run 34 (2x H200) saw it: test_moe_sum_exact's largest case
 * (f32, 233 KB uploaded last) read part of its input before the copy had landed. */
static inline void ct_sync(void) { CT_CUDA(cudaDeviceSynchronize()); }

/* Host to device, done on the device when it returns (see ct_sync). */
static inline void ct_h2d(void *dst, const void *src, size_t n) {
    CT_CUDA(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
    ct_sync();
}

/* A device tensor with guards: the tensor view points past the front guard. */
typedef struct ct_dev {
    moe_tensor t;
    void *base;
    size_t nbytes;
} ct_dev;

static inline void ct_dev_alloc(ct_dev *d, moe_dtype dt, int32_t ndim, const int64_t *shape) {
    memset(d, 0, sizeof *d);
    d->t = moe_tensor_view(NULL, dt, ndim, shape);
    d->nbytes = moe_tensor_nbytes(&d->t);
    CT_CUDA(cudaMalloc(&d->base, d->nbytes + 2 * CT_GUARD));
    CT_CUDA(cudaMemset(d->base, CT_GUARD_BYTE, d->nbytes + 2 * CT_GUARD));
    ct_sync();
    d->t.data = (char *)d->base + CT_GUARD;
}

/* Fills the payload with 0xFF bytes: NaN in f32, f16 and bf16, -1 in int32. */
static inline void ct_dev_poison(ct_dev *d) {
    CT_CUDA(cudaMemset(d->t.data, 0xFF, d->nbytes));
    ct_sync();
}

static inline void ct_dev_check_guards(const ct_dev *d, const char *what) {
    unsigned char *g = malloc(2 * CT_GUARD);
    assert_non_null(g);
    CT_CUDA(cudaMemcpy(g, d->base, CT_GUARD, cudaMemcpyDeviceToHost));
    CT_CUDA(cudaMemcpy(g + CT_GUARD, (char *)d->base + CT_GUARD + d->nbytes, CT_GUARD, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < 2 * CT_GUARD; i++)
        if (g[i] != CT_GUARD_BYTE) {
            free(g);
            fail_msg("%s: guard byte %zu %s the buffer was overwritten", what, i % CT_GUARD,
                     i < CT_GUARD ? "before" : "after");
        }
    free(g);
}

static inline void ct_dev_free(ct_dev *d) {
    if (d->base)
        CT_CUDA(cudaFree(d->base));
    memset(d, 0, sizeof *d);
}

static inline void ct_upload(ct_dev *d, const moe_tensor *h) {
    assert_int_equal(moe_tensor_nbytes(h), d->nbytes);
    ct_h2d(d->t.data, h->data, d->nbytes);
}

static inline void ct_download(moe_tensor *h, const ct_dev *d) {
    assert_int_equal(moe_tensor_nbytes(h), d->nbytes);
    CT_CUDA(cudaMemcpy(h->data, d->t.data, d->nbytes, cudaMemcpyDeviceToHost));
}

/* Host tensor of normal(0, scale) values rounded to dt. */
static inline void ct_host_randn(moe_tensor *t, moe_dtype dt, int32_t ndim, const int64_t *shape, moe_rng *r,
                                 float scale) {
    CT_OK(moe_tensor_alloc(t, dt, ndim, shape));
    int64_t n = moe_tensor_numel(t);
    for (int64_t i = 0; i < n; i++)
        moe_store_f32(dt, t->data, (size_t)i, scale * moe_rng_normal(r));
}

/* Compares every element: finite, and |got - ref| <= tol * (|ref| + rms(ref)); plus the
 * relative L2 error <= tol. Returns the relative L2 error. */
static inline double ct_compare(const moe_tensor *got, const moe_tensor *ref, double tol, const char *what) {
    int64_t n = moe_tensor_numel(ref);
    assert_int_equal(n, moe_tensor_numel(got));
    double ss = 0.0, se = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double r = moe_load_f32(ref->dtype, ref->data, (size_t)i);
        ss += r * r;
    }
    double rms = n ? sqrt(ss / (double)n) : 0.0;
    for (int64_t i = 0; i < n; i++) {
        double g = moe_load_f32(got->dtype, got->data, (size_t)i);
        double r = moe_load_f32(ref->dtype, ref->data, (size_t)i);
        if (!isfinite(g) || !isfinite(r))
            fail_msg("%s: element %lld is %g (reference %g): not finite (unwritten or NaN)", what, (long long)i, g, r);
        if (fabs(g - r) > tol * (fabs(r) + rms))
            fail_msg("%s: element %lld is %g, reference %g (rms %g, tol %g)", what, (long long)i, g, r, rms, tol);
        se += (g - r) * (g - r);
    }
    double rel = ss > 0 ? sqrt(se / ss) : sqrt(se);
    if (rel > tol)
        fail_msg("%s: relative L2 error %g > %g", what, rel, tol);
    return rel;
}

static inline void ct_require_device(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        fprintf(stderr,
                "FAILED: no CUDA device (%s). This test is tagged 'gpu': run it on a machine with an NVIDIA GPU "
                "(tools/gpu/run_cuda.sh); tools/moe test skips it elsewhere.\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
        exit(1);
    }
}

#endif /* TESTS_CUDA_CUDA_TEST_UTIL_H */
