/*
 * dev_util.h: helpers of the kernel lab and the benchmark (kernels/dev): random device
 * tensors, the L2 flush, event timing with medians, and the two ceilings of the card measured
 * in the same run (device-to-device copy bandwidth, cuBLAS bf16 matrix rate).
 *
 * Threads: single-threaded programs; everything runs on the stream passed in.
 */
#ifndef KERN_DEV_DEV_UTIL_H
#define KERN_DEV_DEV_UTIL_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/base/moe_base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fills n elements of dtype dt (bf16/f16/f32) with normal(0, scale) values from a hash of
 * (seed, index): the same seed gives the same tensor on every card. */
int dev_fill_randn(void *p, moe_dtype dt, int64_t n, uint64_t seed, float scale, cudaStream_t st);

/* Writes a buffer larger than the L2 (the caller sizes it: >= 2 x L2), evicting what the
 * timed region would otherwise find cached. */
int dev_flush_l2(void *buf, size_t bytes, cudaStream_t st);
/* The same by reading the buffer (its sum goes to its first word): the L2 is left holding
 * clean lines, where the write above leaves it full of dirty ones that whatever runs next
 * must write back as it fills the L2 (the lab compares the two). */
int dev_flush_l2_clean(void *buf, size_t bytes, cudaStream_t st);

#ifdef __cplusplus
}
#endif

/* Host-side helpers (dev_host.c). */
#ifdef __cplusplus
extern "C" {
#endif
double dev_median(double *v, int n); /* sorts v */
/* The two ceilings: copy GB/s (read + written bytes) and bf16 TFLOP/s (cuBLAS 8192^3). */
moe_status dev_ceilings(cudaStream_t st, double *copy_gbs, double *bf16_tflops);
#ifdef __cplusplus
}
#endif
#endif /* KERN_DEV_DEV_UTIL_H */
