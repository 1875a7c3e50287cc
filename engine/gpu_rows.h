/*
 * gpu_rows.h: the row moves of a GPU worker's combine (engine/gpu_step.c): gathering the slot
 * rows to send into one contiguous buffer, and scattering the rows received into the slot
 * tensor. Plain data movement, no arithmetic: the bits of every row are kept.
 */
#ifndef ENG_GPU_ROWS_H
#define ENG_GPU_ROWS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * dst row (dst_idx ? dst_idx[i] : i) = src row (src_idx ? src_idx[i] : i), for i < n; rows of
 * row_bytes bytes; the indices in device memory. Enqueued on `stream` (a cudaStream_t); returns
 * 0 or the CUDA error code of the launch.
 */
int eng_gpu_copy_rows(void *dst, const int32_t *dst_idx, const void *src, const int32_t *src_idx, int64_t n,
                      size_t row_bytes, void *stream);

/*
 * The inverse of an index list: inv[j] = -1 for j < n_inv, then inv[idx[i] - base] = i + add for
 * i < n (each idx[i] - base in the n_inv entries set to -1 by this or an earlier call, no two
 * equal; n_inv = 0 sets nothing to -1: a list in parts, each with its own add). Device memory;
 * enqueued on `stream`; returns 0 or the CUDA error code.
 */
int eng_gpu_index_of(int32_t *inv, int64_t n_inv, const int32_t *idx, int64_t n, int64_t base, int64_t add,
                     void *stream);

#ifdef __cplusplus
}
#endif
#endif /* ENG_GPU_ROWS_H */
