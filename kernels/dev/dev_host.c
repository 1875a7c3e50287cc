/*
 * dev_host.c: host helpers of the kernel lab and the benchmark: medians and the ceilings of
 * the card (copy bandwidth, cuBLAS bf16 matrix rate), measured in the calling program's run.
 */
#include <stdlib.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/dev/dev_util.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double dev_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

moe_status dev_ceilings(cudaStream_t st, double *copy_gbs, double *bf16_tflops) {
    moe_status res = MOE_OK;
    void *a = NULL, *b = NULL, *c = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    cublasHandle_t h = NULL;
    double t[20];
    /* Copy: 1 GiB device to device, bytes read + written. */
    const size_t cb = (size_t)1 << 30;
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&a, cb), res, done);
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&b, cb), res, done);
    MOE_CUDA_CHECK_GOTO(cudaMemsetAsync(a, 1, cb, st), res, done);
    MOE_CUDA_CHECK_GOTO(cudaEventCreate(&e0), res, done);
    MOE_CUDA_CHECK_GOTO(cudaEventCreate(&e1), res, done);
    for (int i = 0; i < 13; i++) {
        MOE_CUDA_CHECK_GOTO(cudaEventRecord(e0, st), res, done);
        MOE_CUDA_CHECK_GOTO(cudaMemcpyAsync(b, a, cb, cudaMemcpyDeviceToDevice, st), res, done);
        MOE_CUDA_CHECK_GOTO(cudaEventRecord(e1, st), res, done);
        MOE_CUDA_CHECK_GOTO(cudaEventSynchronize(e1), res, done);
        float ms;
        MOE_CUDA_CHECK_GOTO(cudaEventElapsedTime(&ms, e0, e1), res, done);
        if (i >= 3)
            t[i - 3] = ms;
    }
    *copy_gbs = 2.0 * (double)cb / (dev_median(t, 10) * 1e-3) / 1e9;
    cudaFree(a);
    cudaFree(b);
    a = b = NULL;

    /* bf16 8192^3 on random data, fp32 accumulation. */
    const int n = 8192;
    const size_t mb = (size_t)n * n * 2;
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&a, mb), res, done);
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&b, mb), res, done);
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&c, mb), res, done);
    MOE_CUDA_CHECK_GOTO(dev_fill_randn(a, MOE_DTYPE_BF16, (int64_t)n * n, 11, 1.0f, st), res, done);
    MOE_CUDA_CHECK_GOTO(dev_fill_randn(b, MOE_DTYPE_BF16, (int64_t)n * n, 12, 1.0f, st), res, done);
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS || cublasSetStream(h, st) != CUBLAS_STATUS_SUCCESS) {
        res = moe_fail(MOE_ERR_CUBLAS, "cuBLAS handle");
        goto done;
    }
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < 13; i++) {
        MOE_CUDA_CHECK_GOTO(cudaEventRecord(e0, st), res, done);
        int be = (int)cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n,
                                   &zero, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (be != 0) {
            res = moe_fail(MOE_ERR_CUBLAS, "cublasGemmEx: %s", cublasGetStatusString((cublasStatus_t)be));
            goto done;
        }
        MOE_CUDA_CHECK_GOTO(cudaEventRecord(e1, st), res, done);
        MOE_CUDA_CHECK_GOTO(cudaEventSynchronize(e1), res, done);
        float ms;
        MOE_CUDA_CHECK_GOTO(cudaEventElapsedTime(&ms, e0, e1), res, done);
        if (i >= 3)
            t[i - 3] = ms;
    }
    *bf16_tflops = 2.0 * (double)n * n * n / (dev_median(t, 10) * 1e-3) / 1e12;
done:
    if (h)
        cublasDestroy(h);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    return res;
}
