/*
 * lab_router.c: the kernel lab of the router logits (llm.c's dev/ manner), logits[t, e] =
 * x[t] . router[e] in fp32 (kern_router_logits). The variants:
 *   variant 1:   the backend's kernel up to engine run 44 (kernels/dev/lab_router_v1.cu): token
 *                rows staged in shared memory, one expert row per warp, an unrolled slot per token
 *   variant 2:   the backend's kernel (kernels/cuda/cuda_route.cu), the warp tile picked by T
 *   variant 2.k: the same kernel with warp tile k forced (kern_cuda_set_router_tile)
 * Every variant sums each logit in one order (lane l sums h = l, l + 32, ... then an xor-tree),
 * so all of them must give the same bits.
 *
 * Part 1 checks every variant against the CPU reference (kern_router_logits on the reference
 * backend: index order, fp32) on fresh random inputs (outputs poisoned with NaN first, every
 * element compared: |gpu - cpu| <= 1e-4 (|cpu| + rms of the row), NaN fails) and that the bits
 * of every variant equal variant 2's, on odd shapes too (H not a multiple of 32, E not a
 * multiple of the tile, T not a multiple of the tile; bf16, f16 and f32 inputs). Part 2 times
 * every variant that passed (events, two warm-ups, the L2 flushed before each run, median of
 * --iters) on the router shapes of the BASELINES models and DeepSeek-V3 at T = 1, 16, 128,
 * 1024, 8192 and prints the table last, with the two floors measured on the same card: the
 * bytes (x, the router, the logits) at the copy bandwidth, and the FLOPs at the fp32 FMA rate
 * (SMs x 128 lanes x 2 x the SM clock).
 *
 * Build: bazel build //kernels/dev:lab_router; run on a GPU host:
 *   lab_router [--check-only] [--iters N] [--seed S]
 * Exit status 1 when a check failed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime.h>

#include "kernels/cuda/kern_cuda.h"
#include "kernels/dev/dev_util.h"
#include "kernels/kern.h"

int lab_router_logits_v1(int32_t dtype, const void *x, const float *router, float *logits, int64_t T, int64_t E,
                         int64_t H, cudaStream_t st);

#define LR_CHECK(call)                                                                              \
    do {                                                                                            \
        moe_status s_ = (call);                                                                     \
        if (s_ != MOE_OK) {                                                                         \
            fprintf(stderr, "lab_router: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, moe_errmsg()); \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)
#define LR_CUDA(call)                                                                                         \
    do {                                                                                                      \
        cudaError_t e_ = (call);                                                                              \
        if (e_ != cudaSuccess) {                                                                              \
            fprintf(stderr, "lab_router: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                                          \
        }                                                                                                     \
    } while (0)

#define LR_MAX_TILES 16
static int32_t g_tiles[2 * LR_MAX_TILES], g_ntiles;
/* variants: 0 = v1, 1 = v2 automatic, 2 + k = v2 with tile k */
static bool g_bad[2 + LR_MAX_TILES];

static void variant_name(int v, char *buf, size_t n) {
    if (v == 0)
        snprintf(buf, n, "1");
    else if (v == 1)
        snprintf(buf, n, "2 (auto)");
    else
        snprintf(buf, n, "2.%d (%dx%d)", v - 2, (int)g_tiles[2 * (v - 2)], (int)g_tiles[2 * (v - 2) + 1]);
}

/* Runs variant v on device tensors; the output is complete when the stream is done. */
static void run_variant(kern_ctx_t *gpu, int v, const moe_tensor *x, const moe_tensor *rt, moe_tensor *lg) {
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    if (v == 0) {
        LR_CUDA((cudaError_t)lab_router_logits_v1(x->dtype, x->data, rt->data, lg->data, x->shape[0], rt->shape[0],
                                                  x->shape[1], st));
        return;
    }
    LR_CHECK(kern_cuda_set_router_tile(gpu, v == 1 ? -1 : v - 2));
    LR_CHECK(kern_router_logits(gpu, x, rt, lg));
}

/* ---- part 1: checks ------------------------------------------------------------------- */
static int check_case(kern_ctx_t *gpu, kern_ctx_t *cpu, moe_dtype dt, int64_t T, int64_t E, int64_t H, uint64_t seed) {
    moe_rng r;
    moe_rng_seed(&r, seed);
    moe_tensor x, rt, lc;
    LR_CHECK(moe_tensor_alloc(&x, dt, 2, (int64_t[]){T, H}));
    LR_CHECK(moe_tensor_alloc(&rt, MOE_DTYPE_F32, 2, (int64_t[]){E, H}));
    LR_CHECK(moe_tensor_alloc(&lc, MOE_DTYPE_F32, 2, (int64_t[]){T, E}));
    for (int64_t i = 0; i < T * H; i++)
        moe_store_f32(dt, x.data, (size_t)i, moe_rng_normal(&r));
    for (int64_t i = 0; i < E * H; i++)
        ((float *)rt.data)[i] = moe_rng_normal(&r) / sqrtf((float)H);
    LR_CHECK(kern_router_logits(cpu, &x, &rt, &lc));
    const float *ref = (const float *)lc.data;

    void *dx, *dr, *dl;
    const size_t xb = moe_tensor_nbytes(&x), rb = moe_tensor_nbytes(&rt), lb = moe_tensor_nbytes(&lc);
    LR_CUDA(cudaMalloc(&dx, xb));
    LR_CUDA(cudaMalloc(&dr, rb));
    LR_CUDA(cudaMalloc(&dl, lb));
    LR_CUDA(cudaMemcpy(dx, x.data, xb, cudaMemcpyHostToDevice));
    LR_CUDA(cudaMemcpy(dr, rt.data, rb, cudaMemcpyHostToDevice));
    LR_CUDA(cudaDeviceSynchronize());
    moe_tensor tx = moe_tensor_view2(dx, dt, T, H), tr = moe_tensor_view2(dr, MOE_DTYPE_F32, E, H),
               tl = moe_tensor_view2(dl, MOE_DTYPE_F32, T, E);
    float *got = malloc(lb), *base = malloc(lb);
    if (!got || !base) {
        fprintf(stderr, "lab_router: out of memory\n");
        exit(1);
    }
    int bad = 0;
    const char *dn = dt == MOE_DTYPE_BF16 ? "bf16" : dt == MOE_DTYPE_F16 ? "f16" : "f32";
    /* variant 2 (automatic) first: every other variant's bits are compared with its */
    for (int vi = 0; vi < 2 + g_ntiles; vi++) {
        const int v = vi == 0 ? 1 : vi == 1 ? 0 : vi;
        LR_CUDA(cudaMemset(dl, 0xFF, lb)); /* NaN: an element not written fails */
        LR_CUDA(cudaDeviceSynchronize());
        run_variant(gpu, v, &tx, &tr, &tl);
        LR_CHECK(kern_ctx_sync(gpu));
        LR_CUDA(cudaMemcpy(got, dl, lb, cudaMemcpyDeviceToHost));
        double max_rel = 0;
        int64_t n_bad = 0, first = -1;
        for (int64_t t = 0; t < T; t++) {
            double ss = 0;
            for (int64_t e = 0; e < E; e++)
                ss += (double)ref[t * E + e] * ref[t * E + e];
            const double rms = sqrt(ss / (double)E);
            for (int64_t e = 0; e < E; e++) {
                const double c = ref[t * E + e], g = got[t * E + e], d = fabs(g - c) / (fabs(c) + rms + 1e-30);
                if (!(d <= 1e-4)) { /* NaN fails */
                    if (first < 0)
                        first = t * E + e;
                    n_bad++;
                }
                if (d > max_rel || d != d)
                    max_rel = d;
            }
        }
        if (v == 1)
            memcpy(base, got, lb);
        const bool same = memcmp(base, got, lb) == 0;
        if (n_bad || !same) {
            g_bad[v] = true;
            bad = 1;
        }
        char nm[48];
        variant_name(v, nm, sizeof nm);
        printf("| %s | T %lld E %lld H %lld | %s | %.2e | %s | %s |\n", nm, (long long)T, (long long)E, (long long)H, dn,
               max_rel, n_bad ? "FAIL" : "ok", v == 1 ? "-" : same ? "yes" : "NO");
        if (n_bad)
            printf("    %lld elements off, the first at [%lld, %lld]: gpu %.9g, cpu %.9g\n", (long long)n_bad,
                   (long long)(first / E), (long long)(first % E), (double)got[first], (double)ref[first]);
    }
    free(got);
    free(base);
    cudaFree(dx);
    cudaFree(dr);
    cudaFree(dl);
    moe_tensor_free(&x);
    moe_tensor_free(&rt);
    moe_tensor_free(&lc);
    return bad;
}

/* ---- part 2: timing ------------------------------------------------------------------- */
static const struct {
    const char *name;
    int64_t E, H;
} lr_models[4] = {{"mixtral", 8, 4096}, {"qwen3-a3b", 128, 2048}, {"dsv2-lite", 64, 2048}, {"dsv3", 256, 7168}};
static const int64_t lr_T[5] = {1, 16, 128, 1024, 8192};

static double time_variant(kern_ctx_t *gpu, int v, const moe_tensor *x, const moe_tensor *rt, moe_tensor *lg,
                           void *flush, size_t flush_bytes, cudaEvent_t e0, cudaEvent_t e1, int iters) {
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    double t[256];
    for (int i = 0; i < iters + 2; i++) {
        LR_CUDA((cudaError_t)dev_flush_l2(flush, flush_bytes, st));
        LR_CUDA(cudaEventRecord(e0, st));
        run_variant(gpu, v, x, rt, lg);
        LR_CUDA(cudaEventRecord(e1, st));
        LR_CUDA(cudaEventSynchronize(e1));
        float ms;
        LR_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 2)
            t[i - 2] = 1e3 * ms;
    }
    return dev_median(t, iters);
}

int main(int argc, char **argv) {
    bool check_only = false;
    int iters = 20;
    uint64_t seed = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--check-only") == 0)
            check_only = true;
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else {
            fprintf(stderr,
                    "usage: lab_router [--check-only] [--iters N (1..256, default 20)] [--seed S (default: time)]\n"
                    "  part 1: every variant of the router logits against the CPU reference and against\n"
                    "  each other's bits; part 2: their times (L2 flushed) with the two floors.\n");
            return 2;
        }
    }
    if (iters < 1 || iters > 256) {
        fprintf(stderr, "lab_router: --iters %d not in [1, 256]\n", iters);
        return 2;
    }
    if (!seed)
        seed = (uint64_t)time(NULL);
    moe_log_init_from_env();
    kern_ctx_t *gpu, *cpu;
    kern_ctx_params cp = {0};
    LR_CHECK(kern_ctx_init(&gpu, KERN_BACKEND_CUDA, &cp));
    LR_CHECK(kern_ctx_init(&cpu, KERN_BACKEND_CPU_REF, NULL));
    g_ntiles = kern_cuda_router_tiles(g_tiles, LR_MAX_TILES);
    if (g_ntiles > LR_MAX_TILES)
        g_ntiles = LR_MAX_TILES;
    struct cudaDeviceProp prop;
    LR_CUDA(cudaGetDeviceProperties(&prop, 0));
    int clock_khz = 0;
    LR_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
    printf("lab_router on %s (sm_%d%d, %d SMs, %.2f GHz), %d tiles, seed %llu\n", prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, clock_khz / 1e6, (int)g_ntiles, (unsigned long long)seed);

    printf("\npart 1: checks against the CPU reference\n");
    printf("| variant | case | x | max rel err | check | bits == variant 2 |\n|---|---|---|---|---|---|\n");
    static const struct {
        moe_dtype dt;
        int64_t T, E, H;
    } cases[] = {{MOE_DTYPE_BF16, 1, 128, 2048}, {MOE_DTYPE_BF16, 37, 64, 1024}, {MOE_DTYPE_BF16, 1029, 8, 4096},
                 {MOE_DTYPE_BF16, 10, 256, 7168}, {MOE_DTYPE_F16, 600, 61, 1000}, {MOE_DTYPE_F32, 5, 3, 33},
                 {MOE_DTYPE_BF16, 3, 129, 31}};
    int bad = 0;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        bad |= check_case(gpu, cpu, cases[c].dt, cases[c].T, cases[c].E, cases[c].H, seed + c);
    printf("part 1: %s\n", bad ? "FAILED (the failed variants are not timed)" : "every variant passed");
    if (check_only) {
        kern_ctx_free(gpu);
        kern_ctx_free(cpu);
        return bad;
    }

    double copy_gbs = 0, tflops = 0;
    LR_CHECK(dev_ceilings((cudaStream_t)kern_cuda_stream(gpu), &copy_gbs, &tflops));
    const double fp32_flops = (double)prop.multiProcessorCount * 128.0 * 2.0 * clock_khz * 1e3;
    const size_t flush_bytes = 4 * (size_t)prop.l2CacheSize;
    void *flush, *dx, *dr, *dl;
    LR_CUDA(cudaMalloc(&flush, flush_bytes));
    const int64_t TM = lr_T[4];
    LR_CUDA(cudaMalloc(&dx, (size_t)TM * 7168 * 2));
    LR_CUDA(cudaMalloc(&dr, (size_t)256 * 7168 * 4));
    LR_CUDA(cudaMalloc(&dl, (size_t)TM * 256 * 4));
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    LR_CUDA((cudaError_t)dev_fill_randn(dx, MOE_DTYPE_BF16, TM * 7168, seed + 100, 1.0f, st));
    LR_CUDA((cudaError_t)dev_fill_randn(dr, MOE_DTYPE_F32, 256 * 7168, seed + 101, 0.02f, st));
    LR_CUDA(cudaStreamSynchronize(st));
    cudaEvent_t e0, e1;
    LR_CUDA(cudaEventCreate(&e0));
    LR_CUDA(cudaEventCreate(&e1));

    /* the table, printed last: us per variant, then the floors and variant 2's ratio to them */
    const int nv = 2 + g_ntiles;
    static char rows[20][512];
    int nr = 0;
    for (int mi = 0; mi < 4; mi++)
        for (int ti = 0; ti < 5; ti++) {
            const int64_t T = lr_T[ti], E = lr_models[mi].E, H = lr_models[mi].H;
            moe_tensor tx = moe_tensor_view2(dx, MOE_DTYPE_BF16, T, H), tr = moe_tensor_view2(dr, MOE_DTYPE_F32, E, H),
                       tl = moe_tensor_view2(dl, MOE_DTYPE_F32, T, E);
            double us[2 + LR_MAX_TILES];
            for (int v = 0; v < nv; v++)
                us[v] = g_bad[v] ? NAN : time_variant(gpu, v, &tx, &tr, &tl, flush, flush_bytes, e0, e1, iters);
            const double bytes = (double)T * H * 2 + (double)E * H * 4 + (double)T * E * 4;
            const double f_mem = bytes / (copy_gbs * 1e9) * 1e6, f_flop = 2.0 * T * E * H / fp32_flops * 1e6;
            const double floor = f_mem > f_flop ? f_mem : f_flop;
            int o = snprintf(rows[nr], sizeof rows[nr], "| %s | %lld | %.1f | %.1f |", lr_models[mi].name, (long long)T,
                             f_mem, f_flop);
            for (int v = 0; v < nv; v++)
                o += snprintf(rows[nr] + o, sizeof rows[nr] - (size_t)o, " %.1f |", us[v]);
            snprintf(rows[nr] + o, sizeof rows[nr] - (size_t)o, " %.2f | %.2f |", us[1] / floor, us[0] / us[1]);
            nr++;
            fprintf(stderr, "timed %s T=%lld\n", lr_models[mi].name, (long long)T);
        }
    printf("\npart 2: us per call (median of %d, L2 flushed before each), %s; copy %.0f GB/s (read + written), "
           "fp32 FMA %.1f TFLOP/s (%d SMs x 128 x 2 x %.2f GHz); x bf16, router fp32\n",
           iters, prop.name, copy_gbs, fp32_flops / 1e12, prop.multiProcessorCount, clock_khz / 1e6);
    printf("| model | T | mem floor | fp32 floor |");
    for (int v = 0; v < nv; v++) {
        char nm[48];
        variant_name(v, nm, sizeof nm);
        printf(" v%s |", nm);
    }
    printf(" v2 / floor | v1 / v2 |\n|---|---|---|---|");
    for (int v = 0; v < nv; v++)
        printf("---|");
    printf("---|---|\n");
    for (int i = 0; i < nr; i++)
        printf("%s\n", rows[i]);
    cudaFree(flush);
    cudaFree(dx);
    cudaFree(dr);
    cudaFree(dl);
    kern_ctx_free(gpu);
    kern_ctx_free(cpu);
    return bad;
}
