/*
 * lab_router_v1.cu: variant 1 of the router logits in the kernel lab (kernels/dev/lab_router.c),
 * the backend's kernel up to engine run 44 (docs/PERF.md), kept here to be timed against the
 * current one (kernels/cuda/cuda_route.cu, variant 2). Same order of the sums (lane l sums
 * h = l, l + 32, ... then an xor-tree): its bits equal variant 2's.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "engine/base/moe_base.h"
#include "kernels/cuda/kc_device.cuh"

/* ---- router logits ------------------------------------------------------------------------
 * logits[t, e] = sum_h x[t, h] * router[e, h] in fp32. A CTA holds up to LAB_RL1_TOK token rows in
 * shared memory as fp32 and its warps take experts in turn: a warp reads one router row once for
 * all of the CTA's tokens; lane l sums h = l, l + 32, ... in order, then a fixed xor-tree over the
 * lanes. The order depends on nothing but H: a row's logits never depend on the other rows, on
 * the grid or on how many tokens share a CTA. The grid spreads the experts over CTAs (blockIdx.y)
 * until there are about two CTAs per SM, so a few tokens read the router (E H fp32: 1 MiB for
 * Qwen3) over many SMs instead of one (one CTA per token took 88 us at T = 1 on an H200). */
#define LAB_RL1_THREADS 256
#define LAB_RL1_TOK 8
#define LAB_RL1_SMEM (96 * 1024) /* the token rows' budget: two CTAs per SM */

template <typename T>
__global__ void __launch_bounds__(LAB_RL1_THREADS)
    lab_rl_v1_kernel(const T *x, const float *router, float *logits, int64_t T_, int64_t E, int64_t H,
                            int tok) {
    extern __shared__ float xs[]; /* [tok][H] */
    const int64_t t0 = (int64_t)blockIdx.x * tok;
    const int nt = (int)(T_ - t0 < tok ? T_ - t0 : tok);
    for (int64_t i = threadIdx.x; i < (int64_t)nt * H; i += LAB_RL1_THREADS)
        xs[i] = kc_ld<T>(x + t0 * H, i);
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t wstep = (int64_t)gridDim.y * (LAB_RL1_THREADS / 32);
    for (int64_t e = (int64_t)blockIdx.y * (LAB_RL1_THREADS / 32) + warp; e < E; e += wstep) {
        const float *r = router + e * H;
        float acc[LAB_RL1_TOK];
#pragma unroll
        for (int j = 0; j < LAB_RL1_TOK; j++)
            acc[j] = 0.0f;
        for (int64_t h = lane; h < H; h += 32) {
            const float rv = r[h];
#pragma unroll
            for (int j = 0; j < LAB_RL1_TOK; j++)
                if (j < nt)
                    acc[j] += xs[(int64_t)j * H + h] * rv;
        }
#pragma unroll
        for (int j = 0; j < LAB_RL1_TOK; j++) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
            if (lane == 0 && j < nt)
                logits[(t0 + j) * E + e] = acc[j];
        }
    }
}

extern "C" int lab_router_logits_v1(int32_t dtype, const void *x, const float *router, float *logits, int64_t T,
                                       int64_t E, int64_t H, cudaStream_t st) {
    const size_t row = (size_t)H * sizeof(float);
    if (row > 200 * 1024)
        return (int)cudaErrorInvalidValue;
    int tok = (int)(LAB_RL1_SMEM / row);
    tok = tok < 1 ? 1 : (tok > LAB_RL1_TOK ? LAB_RL1_TOK : tok);
    if (T < tok)
        tok = (int)T;
    const size_t smem = row * (size_t)tok;
    int dev = 0, n_sm = 132;
    if (cudaGetDevice(&dev) == cudaSuccess)
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
    const int64_t gx = (T + tok - 1) / tok, wpc = LAB_RL1_THREADS / 32, max_gy = (E + wpc - 1) / wpc;
    int64_t gy = (2 * (int64_t)n_sm + gx - 1) / gx;
    gy = gy < 1 ? 1 : (gy > max_gy ? max_gy : gy);
    if (gx > 0x7fffffff || gy > 65535)
        return (int)cudaErrorInvalidValue;
    const dim3 grid((unsigned)gx, (unsigned)gy);
    cudaError_t e = cudaSuccess;
#define LAB_RL1_CASE(DT, TY)                                                                                        \
    case DT:                                                                                                      \
        if (smem > 48 * 1024)                                                                                     \
            e = cudaFuncSetAttribute(lab_rl_v1_kernel<TY>, cudaFuncAttributeMaxDynamicSharedMemorySize,  \
                                     (int)smem);                                                                  \
        if (e == cudaSuccess)                                                                                     \
            lab_rl_v1_kernel<TY><<<grid, LAB_RL1_THREADS, smem, st>>>((const TY *)x, router, logits, T, E, \
                                                                          H, tok);                               \
        break;
    switch (dtype) {
        LAB_RL1_CASE(MOE_DTYPE_F32, float)
        LAB_RL1_CASE(MOE_DTYPE_F16, __half)
        LAB_RL1_CASE(MOE_DTYPE_BF16, __nv_bfloat16)
    default:
        return (int)cudaErrorInvalidValue;
    }
#undef LAB_RL1_CASE
    if (e != cudaSuccess)
        return (int)e;
    return (int)cudaGetLastError();
}
