/*
 * kc_device.cuh: device helpers shared by the CUDA backend's kernels: the error record,
 * programmatic dependent launch, the local slot of a pair's expert, one element as fp32.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kernels/cuda/kern_cuda_impl.h"

/* Element i of an fp32 / f16 / bf16 array, as fp32. */
template <typename T> static __device__ __forceinline__ float kc_ld(const T *p, int64_t i);
template <> __device__ __forceinline__ float kc_ld<float>(const float *p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float kc_ld<__half>(const __half *p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float kc_ld<__nv_bfloat16>(const __nv_bfloat16 *p, int64_t i) {
    return __bfloat162float(p[i]);
}

/* First error wins (claim in device memory), the record goes to mapped host memory with plain
 * stores, the code last. */
static __device__ __forceinline__ void kc_record_err(kc_errsink err, int32_t code, int32_t token, int32_t slot,
                                                     int32_t value, float fvalue) {
    if (!err.rec)
        return;
    if (atomicCAS(err.claim, 0, 1) == 0) {
        volatile kc_err *r = err.rec;
        r->token = token;
        r->slot = slot;
        r->value = value;
        r->fvalue = fvalue;
        __threadfence_system();
        r->code = code;
    }
}

/* Programmatic dependent launch (sm_90): wait for the previous grid's results / let the next
 * grid start launching. No-ops where the launch did not ask for it, and before sm_90. */
static __device__ __forceinline__ void kc_pdl_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
static __device__ __forceinline__ void kc_pdl_trigger() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* Local slot of the expert of pair p, or -1 (held elsewhere, or a bad id / map entry). */
static __device__ __forceinline__ int kc_local_slot(const int32_t *ids, const int32_t *map, int32_t n_experts,
                                                    int32_t n_local, int64_t p) {
    const int id = ids[p];
    if (id < 0 || id >= n_experts)
        return -1;
    const int e = map ? map[id] : id;
    return (e < 0 || e >= n_local) ? -1 : e;
}

/* Host: launches `kern` with programmatic stream serialization when pdl != 0. */
template <typename... KArgs, typename... Args>
static int kc_launch_ex(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, int pdl,
                        Args... args) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    if (pdl) {
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
    }
    return (int)cudaLaunchKernelEx(&cfg, kern, ((KArgs)args)...);
}
