/*
 * gemm_bf16.cu: the bf16 instances of the grouped product (gemm.cuh), their launcher, and the
 * dtype dispatch kc_launch_gemm. One file per dtype so that the two compile in parallel.
 */
#include "kernels/cuda/gemm.cuh"

extern "C" int kc_launch_gemm_f16(const kc_gemm_args *a, int path, int nwg, int bn, cudaStream_t st);
extern "C" int kc_launch_small_fused_bf16(const kc_gemm_args *gu, const kc_gemm_args *dn, int path, int bn,
                                          unsigned long long *ctr, uint32_t seq, int n_sm, cudaStream_t st);
extern "C" int kc_launch_small_fused_f16(const kc_gemm_args *gu, const kc_gemm_args *dn, int path, int bn,
                                         unsigned long long *ctr, uint32_t seq, int n_sm, cudaStream_t st);

extern "C" int kc_launch_small_fused(const kc_gemm_args *gu, const kc_gemm_args *dn, int path, int bn,
                                     unsigned long long *ctr, uint32_t seq, int n_sm, cudaStream_t st) {
    if (gu->dtype == MOE_DTYPE_BF16)
        return kc_launch_small_fused_bf16(gu, dn, path, bn, ctr, seq, n_sm, st);
    if (gu->dtype == MOE_DTYPE_F16)
        return kc_launch_small_fused_f16(gu, dn, path, bn, ctr, seq, n_sm, st);
    return (int)cudaErrorInvalidValue;
}

#define KC_T_ __nv_bfloat16
static int kc_launch_gemm_bf16(const kc_gemm_args *a, int path, int nwg, int bn, cudaStream_t st) {
    KC_GEMM_WS_(__nv_bfloat16)
    KC_GEMM_CONFIGS(KC_GEMM_X_)
    return (int)cudaErrorInvalidValue;
}
#undef KC_T_

extern "C" int kc_gemm_has_cfg(int path, int nwg, int bn) {
#define KC_HAS_(P, W, N)                        \
    if (path == (P) && nwg == (W) && bn == (N)) \
        return 1;
    KC_GEMM_CONFIGS(KC_HAS_)
#undef KC_HAS_
    return path == KC_PATH_WGMMA && nwg >= 3 && nwg <= 9 && bn == 128;
}

extern "C" int kc_launch_gemm(const kc_gemm_args *a, int path, int nwg, int bn, cudaStream_t st) {
    if (a->dtype == MOE_DTYPE_BF16)
        return kc_launch_gemm_bf16(a, path, nwg, bn, st);
    if (a->dtype == MOE_DTYPE_F16)
        return kc_launch_gemm_f16(a, path, nwg, bn, st);
    return (int)cudaErrorInvalidValue;
}

KC_SMALL_FUSED_DEFINE_(kc_launch_small_fused_bf16, __nv_bfloat16)
