/*
 * bench_moe.c: the fused-experts benchmark of the CUDA backend against ../shared/BASELINES.md.
 * Prints the BASELINES table (its peer columns are constants copied from that file: the peers
 * cannot be re-run in CI) with our column added: our time, our ratio to the larger floor and
 * to the best peer, and the floors recomputed from the ceilings measured on this card in this
 * run (device-to-device copy bandwidth, cuBLAS bf16 8192^3 rate).
 *
 * What is timed (as in BASELINES): one MoE layer's routed experts for T tokens, from x, top-k
 * ids and weights to y[T, H] (alignment, gate-up with SiLU-and-mul, down with the routing
 * weight, the sum over top-k), one kern_fused_experts call in sum mode. Random bf16 weights
 * w13 [E, 2I, H], w2 [E, H, I]; routing softmax top-k over random normal logits, renormalized,
 * on the device (kern_route); the logits are redrawn until as many experts are touched as in
 * BASELINES' row (same weight traffic, same memory floor). Median of repeated runs, the L2 flushed before each (a 256 MiB
 * write), events around the call alone, after warm-up.
 *
 * Napkin math (Performance model, DESIGN.md): bytes = (experts touched x 3 H I + 2 T H) x 2,
 * FLOPs = 2 T K 3 H I. Mixtral at T = 1 reads 2 x 3 x 4096 x 14336 x 2 = 705 MB: 233 us at
 * 3 TB/s. Qwen3-30B-A3B at T = 8192 does 2 x 8192 x 8 x 3 x 2048 x 768 = 6.2e11 FLOP: 770 us at
 * 803 TFLOP/s.
 *
 * Build: bazel build //kernels/dev:bench_moe; run on a GPU host: bench_moe [--quick] [--path mma|wgmma]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "kernels/cuda/kern_cuda.h"
#include "kernels/dev/dev_util.h"
#include "kernels/kern.h"

typedef struct bm_model {
    const char *name;
    int32_t E, K;
    int64_t H, I;
} bm_model;

/* ../shared/BASELINES.md (H100 80GB HBM3, 2026-11-27): vLLM Triton best config, torch._grouped_mm,
 * best peer, memory floor, compute floor (us), experts touched. */
typedef struct bm_peer {
    int vllm, torch, best, mem_floor, comp_floor, touched;
} bm_peer;

static const bm_model MODELS[3] = {
    {"mixtral-8x7b", 8, 2, 4096, 14336},
    {"qwen3-30b-a3b", 128, 8, 2048, 768},
    {"deepseek-v2-lite", 64, 6, 2048, 1408},
};
static const int64_t TS[5] = {1, 16, 128, 1024, 8192};
static const bm_peer PEERS[3][5] = {
    {{263, 394, 263, 233, 1, 2},
     {937, 1067, 937, 816, 14, 7},
     {1089, 1182, 1089, 934, 112, 8},
     {1652, 1828, 1652, 939, 899, 8},
     {10134, 9556, 9556, 977, 7189, 8}},
    {{95, 352, 95, 25, 0, 8},
     {884, 729, 729, 247, 2, 79},
     {848, 602, 602, 400, 12, 128},
     {680, 779, 680, 403, 96, 128},
     {1621, 2312, 1621, 422, 770, 128}},
    {{97, 1795, 97, 34, 0, 6},
     {507, 424, 424, 269, 2, 47},
     {535, 572, 535, 367, 17, 64},
     {647, 711, 647, 369, 132, 64},
     {1923, 2380, 1923, 389, 1059, 64}},
};

#define BM_CHECK(call)                                                                              \
    do {                                                                                            \
        moe_status s_ = (call);                                                                     \
        if (s_ != MOE_OK) {                                                                         \
            fprintf(stderr, "bench_moe: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, moe_errmsg()); \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)
#define BM_CUDA(call)                                                                                       \
    do {                                                                                                    \
        cudaError_t e_ = (call);                                                                            \
        if (e_ != cudaSuccess) {                                                                            \
            fprintf(stderr, "bench_moe: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                                        \
        }                                                                                                   \
    } while (0)

typedef struct bm_result {
    double us;
    int touched;
} bm_result;

int main(int argc, char **argv) {
    bool quick = false;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (strcmp(argv[i], "--path") == 0 && i + 1 < argc)
            path = argv[++i];
        else {
            fprintf(stderr, "usage: bench_moe [--quick] [--path mma|wgmma]\n");
            return 2;
        }
    }
    moe_log_init_from_env();
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        fprintf(stderr, "bench_moe: no CUDA device\n");
        return 1;
    }
    struct cudaDeviceProp prop;
    BM_CUDA(cudaGetDeviceProperties(&prop, 0));
    kern_ctx_t *ctx;
    kern_ctx_params cp = {0};
    BM_CHECK(kern_ctx_init(&ctx, KERN_BACKEND_CUDA, &cp));
    if (path)
        BM_CHECK(kern_cuda_set_path(ctx, strcmp(path, "mma") == 0 ? KERN_CUDA_PATH_MMA : KERN_CUDA_PATH_WGMMA));
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(ctx);

    double copy_gbs = 0, tflops = 0;
    BM_CHECK(dev_ceilings(st, &copy_gbs, &tflops));
    printf("device: %s (sm_%d%d, %d SMs, L2 %d MiB), path %s\n", prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, prop.l2CacheSize >> 20,
           kern_cuda_get_path(ctx) == KERN_CUDA_PATH_WGMMA ? "wgmma" : "mma.sync");
    printf("ceilings measured in this run: device-to-device copy %.0f GB/s (read + written), bf16 8192^3 cuBLAS "
           "%.0f TFLOP/s\n",
           copy_gbs, tflops);
    fflush(stdout);

    const size_t flush_bytes = (size_t)256 << 20;
    void *flush;
    BM_CUDA(cudaMalloc(&flush, flush_bytes));
    cudaEvent_t e0, e1;
    BM_CUDA(cudaEventCreate(&e0));
    BM_CUDA(cudaEventCreate(&e1));

    bm_result res[3][5];
    memset(res, 0, sizeof res);
    const int64_t TMAX = 8192;
    for (int mi = 0; mi < 3; mi++) {
        const bm_model *m = &MODELS[mi];
        const int64_t H = m->H, I = m->I, E = m->E, K = m->K;
        void *w13, *w2, *x, *y, *logits;
        int32_t *ids;
        float *w;
        BM_CUDA(cudaMalloc(&w13, (size_t)(E * 2 * I * H) * 2));
        BM_CUDA(cudaMalloc(&w2, (size_t)(E * H * I) * 2));
        BM_CUDA(cudaMalloc(&x, (size_t)(TMAX * H) * 2));
        BM_CUDA(cudaMalloc(&y, (size_t)(TMAX * H) * 2));
        BM_CUDA(cudaMalloc(&logits, (size_t)(TMAX * E) * 4));
        BM_CUDA(cudaMalloc((void **)&ids, (size_t)(TMAX * K) * 4));
        BM_CUDA(cudaMalloc((void **)&w, (size_t)(TMAX * K) * 4));
        BM_CUDA((cudaError_t)dev_fill_randn(w13, MOE_DTYPE_BF16, E * 2 * I * H, 100 + mi, 1.0f / 64.0f, st));
        BM_CUDA((cudaError_t)dev_fill_randn(w2, MOE_DTYPE_BF16, E * H * I, 200 + mi, 1.0f / 64.0f, st));
        BM_CUDA((cudaError_t)dev_fill_randn(x, MOE_DTYPE_BF16, TMAX * H, 300 + mi, 1.0f, st));
        BM_CUDA((cudaError_t)dev_fill_randn(logits, MOE_DTYPE_F32, TMAX * E, 400 + mi, 1.0f, st));
        kern_route_params rp = kern_route_params_default((int32_t)E, (int32_t)K);
        rp.renormalize = true;
        int32_t *hids = malloc(sizeof(int32_t) * (size_t)(TMAX * K));
        BM_CHECK(kern_cuda_reserve(ctx, TMAX, (int32_t)K, H, I, (int32_t)E, 0));

        kern_experts_params p = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .expert_map = NULL,
                                 .act = KERN_ACT_SILU, .weight_on_input = false};
        moe_tensor t13 = moe_tensor_view3(w13, MOE_DTYPE_BF16, E, 2 * I, H);
        moe_tensor t2 = moe_tensor_view3(w2, MOE_DTYPE_BF16, E, H, I);
        for (int tt = 0; tt < 5; tt++) {
            const int64_t T = TS[tt];
            /* Routing: softmax top-k over random normal logits, renormalized. The logits are
             * drawn again (new seed) until the number of experts touched equals BASELINES' for
             * this row, so that both measure the same amount of weight traffic (the floors
             * match); at most 1000 draws. */
            int touched = 0, draws = 0;
            for (draws = 0; draws < 1000; draws++) {
                BM_CUDA((cudaError_t)dev_fill_randn(logits, MOE_DTYPE_F32, T * E,
                                                    400 + 17 * (uint64_t)mi + 1000 * (uint64_t)(tt * 1000 + draws), 1.0f,
                                                    st));
                moe_tensor tl = moe_tensor_view2(logits, MOE_DTYPE_F32, T, E);
                moe_tensor ti = moe_tensor_view2(ids, MOE_DTYPE_I32, T, K);
                moe_tensor tw = moe_tensor_view2(w, MOE_DTYPE_F32, T, K);
                BM_CHECK(kern_route(ctx, &rp, &tl, &ti, &tw));
                BM_CHECK(kern_ctx_sync(ctx));
                BM_CUDA(cudaMemcpy(hids, ids, sizeof(int32_t) * (size_t)(T * K), cudaMemcpyDeviceToHost));
                bool seen[1024] = {false};
                touched = 0;
                for (int64_t i = 0; i < T * K; i++)
                    if (!seen[hids[i]]) {
                        seen[hids[i]] = true;
                        touched++;
                    }
                if (touched == PEERS[mi][tt].touched)
                    break;
            }
            moe_tensor vx = moe_tensor_view2(x, MOE_DTYPE_BF16, T, H);
            moe_tensor vi = moe_tensor_view2(ids, MOE_DTYPE_I32, T, K);
            moe_tensor vw = moe_tensor_view2(w, MOE_DTYPE_F32, T, K);
            moe_tensor vy = moe_tensor_view2(y, MOE_DTYPE_BF16, T, H);
            for (int wu = 0; wu < 3; wu++)
                BM_CHECK(kern_fused_experts(ctx, &p, &vx, &t13, &t2, &vi, &vw, &vy));
            BM_CHECK(kern_ctx_sync(ctx));
            const double est_ms = 2.0 * (double)T * K * 3 * H * I / (tflops * 1e9);
            int reps = est_ms > 5 ? 10 : est_ms > 1 ? 20 : 50;
            if (quick)
                reps = 5;
            double t[64];
            for (int r = 0; r < reps; r++) {
                BM_CUDA((cudaError_t)dev_flush_l2(flush, flush_bytes, st));
                BM_CUDA(cudaEventRecord(e0, st));
                BM_CHECK(kern_fused_experts(ctx, &p, &vx, &t13, &t2, &vi, &vw, &vy));
                BM_CUDA(cudaEventRecord(e1, st));
                BM_CHECK(kern_ctx_sync(ctx));
                float ms;
                BM_CUDA(cudaEventElapsedTime(&ms, e0, e1));
                t[r] = ms * 1e3;
            }
            res[mi][tt].us = dev_median(t, reps);
            res[mi][tt].touched = touched;
            fprintf(stderr, "bench_moe: %s T=%lld: %.1f us (touched %d, routing draw %d)\n", m->name, (long long)T,
                    res[mi][tt].us, touched, draws + 1);
        }
        free(hids);
        cudaFree(w13);
        cudaFree(w2);
        cudaFree(x);
        cudaFree(y);
        cudaFree(logits);
        cudaFree(ids);
        cudaFree(w);
    }

    printf("\n| model (E, top-k, H, I) | T | experts touched (ours / BASELINES) | vLLM Triton, best config (us) | "
           "torch._grouped_mm (us) | best peer (us) | memory floor (us, this run) | compute floor (us, this run) | "
           "best peer / floor | **ours (us)** | ours / floor | ours / best peer | goal (< peer, <= 1.25x floor) |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    int met = 0;
    for (int mi = 0; mi < 3; mi++) {
        const bm_model *m = &MODELS[mi];
        for (int tt = 0; tt < 5; tt++) {
            const bm_peer *pe = &PEERS[mi][tt];
            const int64_t T = TS[tt];
            const double bytes = ((double)res[mi][tt].touched * 3.0 * m->H * m->I + 2.0 * T * m->H) * 2.0;
            const double memf = bytes / (copy_gbs * 1e9) * 1e6;
            const double compf = 2.0 * T * m->K * 3.0 * m->H * m->I / (tflops * 1e12) * 1e6;
            const double floor_ = memf > compf ? memf : compf;
            const double us = res[mi][tt].us;
            const bool ok = us < pe->best && us <= 1.25 * floor_;
            met += ok;
            printf("| %s (%d, %d, %lld, %lld) | %lld | %d / %d | %d | %d | %d | %.0f | %.0f | %.2fx | **%.1f** | "
                   "%.2fx | %.2fx | %s |\n",
                   m->name, (int)m->E, (int)m->K, (long long)m->H, (long long)m->I, (long long)T, res[mi][tt].touched,
                   pe->touched, pe->vllm, pe->torch, pe->best, memf, compf, pe->best / floor_, us, us / floor_,
                   us / pe->best, ok ? "met" : (us < pe->best ? "faster than peer" : "no"));
        }
    }
    printf("\ngoal met on %d of 15 rows (card: %s)\n", met, prop.name);
    cudaFree(flush);
    kern_ctx_free(ctx);
    return 0;
}
