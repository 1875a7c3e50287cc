/*
 * gpu_rows.cu: eng_gpu_copy_rows (gpu_rows.h). A CTA moves ENG_ROWS rows per turn (grid-stride
 * over groups of rows), 16-byte loads and stores when the row size and the buffers allow, else
 * 4-byte, else bytes.
 */
#include "engine/gpu_rows.h"

#include <cuda_runtime.h>

#define ENG_ROWS 4 /* rows a CTA moves per turn */

template <typename V>
__global__ void copy_rows_kernel(V *dst, const int32_t *dst_idx, const V *src, const int32_t *src_idx, int64_t n,
                                 int64_t row_elems) {
    /* ENG_ROWS rows per CTA turn, their loads issued before their stores: a thread keeps
     * ENG_ROWS loads in flight instead of one (a 4 KiB row is one 16-byte load per thread) */
    for (int64_t i0 = (int64_t)blockIdx.x * ENG_ROWS; i0 < n; i0 += (int64_t)gridDim.x * ENG_ROWS) {
        const int cnt = n - i0 < ENG_ROWS ? (int)(n - i0) : ENG_ROWS;
        int64_t d[ENG_ROWS], s[ENG_ROWS];
#pragma unroll
        for (int r = 0; r < ENG_ROWS; r++) {
            const int64_t i = r < cnt ? i0 + r : i0;
            d[r] = (dst_idx ? dst_idx[i] : i) * row_elems;
            s[r] = (src_idx ? src_idx[i] : i) * row_elems;
        }
        for (int64_t j = threadIdx.x; j < row_elems; j += blockDim.x) {
            V v[ENG_ROWS];
#pragma unroll
            for (int r = 0; r < ENG_ROWS; r++)
                if (r < cnt)
                    v[r] = src[s[r] + j];
#pragma unroll
            for (int r = 0; r < ENG_ROWS; r++)
                if (r < cnt)
                    dst[d[r] + j] = v[r];
        }
    }
}

template <typename V>
static int launch(void *dst, const int32_t *dst_idx, const void *src, const int32_t *src_idx, int64_t n,
                  size_t row_bytes, cudaStream_t s) {
    const int64_t elems = (int64_t)(row_bytes / sizeof(V));
    const int threads = elems >= 256 ? 256 : elems >= 128 ? 128 : 64;
    const int64_t turns = (n + ENG_ROWS - 1) / ENG_ROWS, blocks = turns < 65535 * 4 ? turns : 65535 * 4;
    copy_rows_kernel<V><<<(unsigned)blocks, threads, 0, s>>>((V *)dst, dst_idx, (const V *)src, src_idx, n, elems);
    return (int)cudaGetLastError();
}

extern "C" int eng_gpu_copy_rows(void *dst, const int32_t *dst_idx, const void *src, const int32_t *src_idx,
                                 int64_t n, size_t row_bytes, void *stream) {
    if (n <= 0 || row_bytes == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    const uintptr_t al = (uintptr_t)dst | (uintptr_t)src | (uintptr_t)row_bytes;
    if (al % 16 == 0)
        return launch<uint4>(dst, dst_idx, src, src_idx, n, row_bytes, s);
    if (al % 4 == 0)
        return launch<uint32_t>(dst, dst_idx, src, src_idx, n, row_bytes, s);
    return launch<uint8_t>(dst, dst_idx, src, src_idx, n, row_bytes, s);
}
