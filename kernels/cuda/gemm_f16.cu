/*
 * gemm_f16.cu: the fp16 instances of the grouped product (gemm.cuh) and their launcher.
 */
#include "kernels/cuda/gemm.cuh"

#define KC_T_ __half
extern "C" int kc_launch_gemm_f16(const kc_gemm_args *a, int path, int nwg, int bn, cudaStream_t st) {
    KC_GEMM_WS_(__half)
    KC_GEMM_CONFIGS(KC_GEMM_X_)
    return (int)cudaErrorInvalidValue;
}
#undef KC_T_

KC_SMALL_FUSED_DEFINE_(kc_launch_small_fused_f16, __half)
