/*
 * gpu_rows.cu: eng_gpu_copy_rows (gpu_rows.h). One CTA per row (grid-stride over rows), 16-byte
 * loads and stores when the row size and the buffers allow, else 4-byte, else bytes.
 */
#include "engine/gpu_rows.h"

#include <cuda_runtime.h>

template <typename V>
__global__ void copy_rows_kernel(V *dst, const int32_t *dst_idx, const V *src, const int32_t *src_idx, int64_t n,
                                 int64_t row_elems) {
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const int64_t d = dst_idx ? dst_idx[i] : i, s = src_idx ? src_idx[i] : i;
        V *dp = dst + d * row_elems;
        const V *sp = src + s * row_elems;
        for (int64_t j = threadIdx.x; j < row_elems; j += blockDim.x)
            dp[j] = sp[j];
    }
}

template <typename V>
static int launch(void *dst, const int32_t *dst_idx, const void *src, const int32_t *src_idx, int64_t n,
                  size_t row_bytes, cudaStream_t s) {
    const int64_t elems = (int64_t)(row_bytes / sizeof(V));
    const int threads = elems >= 256 ? 256 : elems >= 128 ? 128 : 64;
    const int64_t blocks = n < 65535 * 4 ? n : 65535 * 4;
    copy_rows_kernel<V><<<(unsigned)blocks, threads, 0, s>>>((V *)dst, dst_idx, (const V *)src, src_idx, n, elems);
    return (int)cudaGetLastError();
}

__global__ void index_of_kernel(int32_t *inv, const int32_t *idx, int64_t n, int64_t base, int64_t add) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        inv[idx[i] - base] = (int32_t)(i + add);
}

extern "C" int eng_gpu_index_of(int32_t *inv, int64_t n_inv, const int32_t *idx, int64_t n, int64_t base,
                                int64_t add, void *stream) {
    cudaStream_t s = (cudaStream_t)stream;
    if (n_inv > 0) {
        cudaError_t e = cudaMemsetAsync(inv, 0xff, sizeof(int32_t) * (size_t)n_inv, s); /* -1 */
        if (e != cudaSuccess)
            return (int)e;
    }
    if (n <= 0)
        return 0;
    const int64_t blocks = (n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096;
    index_of_kernel<<<(unsigned)blocks, 256, 0, s>>>(inv, idx, n, base, add);
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
