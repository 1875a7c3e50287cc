/*
 * dev_util.cu: device helpers of the kernel lab and the benchmark (see dev_util.h).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/dev/dev_util.h"

static __device__ __forceinline__ uint64_t dev_mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__global__ void dev_randn_kernel(void *p, int dt, int64_t n, uint64_t seed, float scale) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const uint64_t a = dev_mix(seed ^ dev_mix((uint64_t)i));
        const float u1 = ((float)(a >> 40) + 1.0f) * (1.0f / 16777217.0f);
        const float u2 = (float)((a >> 16) & 0xffffff) * (1.0f / 16777216.0f);
        const float v = scale * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        if (dt == MOE_DTYPE_BF16)
            ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
        else if (dt == MOE_DTYPE_F16)
            ((__half *)p)[i] = __float2half_rn(v);
        else
            ((float *)p)[i] = v;
    }
}

extern "C" int dev_fill_randn(void *p, moe_dtype dt, int64_t n, uint64_t seed, float scale, cudaStream_t st) {
    if (n <= 0)
        return 0;
    dev_randn_kernel<<<4096, 256, 0, st>>>(p, (int)dt, n, seed, scale);
    return (int)cudaGetLastError();
}

__global__ void dev_flush_kernel(uint4 *p, size_t n, uint32_t salt) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = make_uint4(salt, (uint32_t)i, salt, (uint32_t)i);
}

extern "C" int dev_flush_l2(void *buf, size_t bytes, cudaStream_t st) {
    static uint32_t salt = 1;
    dev_flush_kernel<<<2048, 256, 0, st>>>((uint4 *)buf, bytes / 16, salt++);
    return (int)cudaGetLastError();
}

__global__ void dev_flush_read_kernel(const uint4 *p, size_t n, unsigned *sink) {
    unsigned acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) /* practically never: keeps the loads */
        *sink = acc;
}

extern "C" int dev_flush_l2_clean(void *buf, size_t bytes, cudaStream_t st) {
    dev_flush_read_kernel<<<2048, 256, 0, st>>>((const uint4 *)buf, bytes / 16, (unsigned *)buf);
    return (int)cudaGetLastError();
}
