/*
 * lab_experts.c: the kernel lab of the fused experts (llm.c's dev/ manner). The variants are
 * the compiled instruction paths and tiles of the grouped products (kernels/cuda/gemm.cuh):
 *   variant 1: mma.sync m16n8k16 (HMMA), the sm_80 path, tiles (nwg x bn)
 *   variant 2: wgmma m64nNk16 (HGMMA), the sm_90a path, tiles (nwg x bn)
 * Part 1 checks every variant against the CPU reference (kernels/cpu/cpu_ref.c) on fresh
 * random inputs (outputs poisoned, every element compared, NaN fails), checks that the tiles of
 * a path give the same bits, and says whether the two paths give the same bits (HMMA vs HGMMA
 * on the same dot products). Part 2 times every variant (events, warm-up, L2 flushed before
 * each run, median) on the three BASELINES shapes at T = 1, 16, 128, 1024, 8192, skipping tiles
 * that would re-read each weight more than 16 times, and tiles that failed part 1 (the exit
 * status is then 1); the table is printed last, with the tile the automatic choice takes marked.
 *
 * --ep W (part 3 only): one expert-parallel rank's products against one GPU's. For T tokens
 * per GPU it times the automatic variant (a) in sum mode with all E experts on T tokens (what
 * one GPU runs) and (b) in slot mode with E / W local experts (an expert map, the first block,
 * as contiguous placement gives rank 0) on W T tokens (what each of W GPU workers runs: the same
 * FLOPs on 1/W of the weights). (b) / (a) above 1 is the cost of expert parallelism inside the
 * products (docs/PERF.md, engine runs 4-10, measured 1.36 at W = 2 in the engine).
 *
 * --ab: the automatic choice, the cp.async (1, 64) and (2, 64) and the 128-column TMA tiles
 * ((5, 128), (8, 128), (9, 128)) in interleaved rounds (each round's order rotated by one) on sixteen cases of 32 to 2048 rows per expert
 * (ab_compare).
 *
 * --align: the alignments (one CTA, three launches; kern_cuda_set_align) timed against each
 * other on nine cases, their outputs compared bit for bit (align_compare).
 *
 * --fit: the 128-column tiles with their wgmma N cut to each tile's columns in use and without
 * (kern_cuda_set_fit_n), on nine cases, outputs compared bit for bit (fit_compare).
 *
 * --small: the alignment-free mode's options (kern_cuda_set_small_opts), numbered variants in
 * the same manner: variant 3.M is the automatic tile with option mask M (bit 1: the sum over
 * top-k folded into the down product; 2: the gate-up CTAs prefetch the down weights into the
 * L2 (evict_last); 4: both products' weight loads evict_first; 8: the first weight stages
 * before the duplicate check and the compaction). Run 15 measured other bits (normal-policy
 * prefetch, evict_first on gate-up only with the prefetch, each down CTA prefetching its own
 * rows, 4-stage small down tiles), since removed: docs/PERF.md. On seven small-T cases: bits of every mask == mask 0 (which the
 * GPU tests hold against the CPU reference), every element written, two runs the same; then
 * interleaved rounds of all masks; then the parts of a call (gate-up alone, gate-up + down,
 * everything: kern_cuda_set_lab_stop) for masks 0, 4 and 7; then a few masks with the L2
 * flushed by reading instead of writing (no dirty lines left to write back); last the mask with
 * the lowest mean ratio to mask 0 over the cases ("best mask", small_compare).
 *
 * Build: bazel build //kernels/dev:lab_experts; run on a GPU host:
 *   lab_experts [--check-only | --from-T N | --one MODEL T [NWG BN] | --ep W | --ab | --align | --fit |
 *                --small]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "kernels/cuda/kern_cuda.h"
#include "kernels/dev/dev_util.h"
#include "kernels/kern.h"

#define LB_CHECK(call)                                                                              \
    do {                                                                                            \
        moe_status s_ = (call);                                                                     \
        if (s_ != MOE_OK) {                                                                         \
            fprintf(stderr, "lab: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, moe_errmsg());       \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)
#define LB_CUDA(call)                                                                                   \
    do {                                                                                                \
        cudaError_t e_ = (call);                                                                        \
        if (e_ != cudaSuccess) {                                                                        \
            fprintf(stderr, "lab: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                                    \
        }                                                                                               \
    } while (0)

static const char *path_name(kern_cuda_path p) { return p == KERN_CUDA_PATH_WGMMA ? "wgmma" : "mma"; }

/* ---- part 1: checks ------------------------------------------------------------------- */
/* Tiles (path index, tile index) that failed part 1: part 2 does not time them. */
static bool g_bad_tile[2][16];

static int check_variants(kern_ctx_t *gpu, kern_ctx_t *cpu, int npaths, const kern_cuda_path *paths, uint64_t seed) {
    const int64_t T = 96, H = 512, I = 320;
    const int32_t E = 8, K = 2;
    moe_rng r;
    moe_rng_seed(&r, seed);
    moe_tensor x, w13, w2, ids, w, yref, yg;
    LB_CHECK(moe_tensor_alloc(&x, MOE_DTYPE_BF16, 2, (int64_t[]){T, H}));
    LB_CHECK(moe_tensor_alloc(&w13, MOE_DTYPE_BF16, 3, (int64_t[]){E, 2 * I, H}));
    LB_CHECK(moe_tensor_alloc(&w2, MOE_DTYPE_BF16, 3, (int64_t[]){E, H, I}));
    LB_CHECK(moe_tensor_alloc(&ids, MOE_DTYPE_I32, 2, (int64_t[]){T, K}));
    LB_CHECK(moe_tensor_alloc(&w, MOE_DTYPE_F32, 2, (int64_t[]){T, K}));
    LB_CHECK(moe_tensor_alloc(&yref, MOE_DTYPE_BF16, 2, (int64_t[]){T, H}));
    LB_CHECK(moe_tensor_alloc(&yg, MOE_DTYPE_BF16, 2, (int64_t[]){T, H}));
    for (int64_t i = 0; i < T * H; i++)
        moe_store_f32(MOE_DTYPE_BF16, x.data, (size_t)i, moe_rng_normal(&r));
    for (int64_t i = 0; i < E * 2 * I * H; i++)
        moe_store_f32(MOE_DTYPE_BF16, w13.data, (size_t)i, moe_rng_normal(&r) / sqrtf((float)H));
    for (int64_t i = 0; i < E * H * I; i++)
        moe_store_f32(MOE_DTYPE_BF16, w2.data, (size_t)i, moe_rng_normal(&r) / sqrtf((float)I));
    for (int64_t t = 0; t < T; t++) {
        int32_t a = (int32_t)moe_rng_below(&r, E), b;
        do
            b = (int32_t)moe_rng_below(&r, E);
        while (b == a);
        ((int32_t *)ids.data)[t * K] = a;
        ((int32_t *)ids.data)[t * K + 1] = b;
        float u = 0.2f + 0.6f * (float)moe_rng_uniform(&r);
        ((float *)w.data)[t * K] = u;
        ((float *)w.data)[t * K + 1] = 1.0f - u;
    }
    kern_experts_params p = {.n_experts = E, .n_local = E, .act = KERN_ACT_SILU};
    LB_CHECK(kern_fused_experts(cpu, &p, &x, &w13, &w2, &ids, &w, &yref));

    void *dx, *d13, *d2, *di, *dw, *dy;
    LB_CUDA(cudaMalloc(&dx, moe_tensor_nbytes(&x)));
    LB_CUDA(cudaMalloc(&d13, moe_tensor_nbytes(&w13)));
    LB_CUDA(cudaMalloc(&d2, moe_tensor_nbytes(&w2)));
    LB_CUDA(cudaMalloc(&di, moe_tensor_nbytes(&ids)));
    LB_CUDA(cudaMalloc(&dw, moe_tensor_nbytes(&w)));
    LB_CUDA(cudaMalloc(&dy, moe_tensor_nbytes(&yg)));
    LB_CUDA(cudaMemcpy(dx, x.data, moe_tensor_nbytes(&x), cudaMemcpyHostToDevice));
    LB_CUDA(cudaMemcpy(d13, w13.data, moe_tensor_nbytes(&w13), cudaMemcpyHostToDevice));
    LB_CUDA(cudaMemcpy(d2, w2.data, moe_tensor_nbytes(&w2), cudaMemcpyHostToDevice));
    LB_CUDA(cudaMemcpy(di, ids.data, moe_tensor_nbytes(&ids), cudaMemcpyHostToDevice));
    LB_CUDA(cudaMemcpy(dw, w.data, moe_tensor_nbytes(&w), cudaMemcpyHostToDevice));
    /* the backend's stream does not wait for the legacy stream's copies and fills: every one of
     * them is done on the device before a kernel runs */
    LB_CUDA(cudaDeviceSynchronize());
    moe_tensor tx = moe_tensor_view2(dx, MOE_DTYPE_BF16, T, H), t13 = moe_tensor_view3(d13, MOE_DTYPE_BF16, E, 2 * I, H),
               t2 = moe_tensor_view3(d2, MOE_DTYPE_BF16, E, H, I), ti = moe_tensor_view2(di, MOE_DTYPE_I32, T, K),
               tw = moe_tensor_view2(dw, MOE_DTYPE_F32, T, K), ty = moe_tensor_view2(dy, MOE_DTYPE_BF16, T, H);

    int bad = 0;
    uint16_t *first[2] = {NULL, NULL};
    printf("part 1: checks against the CPU reference (T=%lld E=%d K=%d H=%lld I=%lld bf16, seed %llu)\n",
           (long long)T, (int)E, (int)K, (long long)H, (long long)I, (unsigned long long)seed);
    printf("| variant | tile | rel L2 error | max |err| / rms | bits == path's first tile |\n|---|---|---|---|---|\n");
    for (int pi = 0; pi < npaths; pi++) {
        LB_CHECK(kern_cuda_set_path(gpu, paths[pi]));
        int32_t tiles[32];
        int32_t nt = kern_cuda_tiles(paths[pi], tiles, 16);
        for (int32_t k = 0; k < nt; k++) {
            LB_CHECK(kern_cuda_set_tile(gpu, tiles[2 * k], tiles[2 * k + 1]));
            LB_CUDA(cudaMemset(dy, 0xFF, moe_tensor_nbytes(&yg)));
            LB_CUDA(cudaDeviceSynchronize());
            LB_CHECK(kern_fused_experts(gpu, &p, &tx, &t13, &t2, &ti, &tw, &ty));
            LB_CHECK(kern_ctx_sync(gpu));
            LB_CUDA(cudaMemcpy(yg.data, dy, moe_tensor_nbytes(&yg), cudaMemcpyDeviceToHost));
            double ss = 0, se = 0, mx = 0;
            int nan = 0;
            for (int64_t i = 0; i < T * H; i++) {
                double a = moe_load_f32(MOE_DTYPE_BF16, yg.data, (size_t)i);
                double b = moe_load_f32(MOE_DTYPE_BF16, yref.data, (size_t)i);
                if (!isfinite(a))
                    nan++;
                ss += b * b;
                se += (a - b) * (a - b);
                if (fabs(a - b) > mx)
                    mx = fabs(a - b);
            }
            double rel = sqrt(se / ss), rms = sqrt(ss / (double)(T * H));
            bool same = true;
            if (!first[pi]) {
                first[pi] = malloc(moe_tensor_nbytes(&yg));
                memcpy(first[pi], yg.data, moe_tensor_nbytes(&yg));
            } else {
                same = memcmp(first[pi], yg.data, moe_tensor_nbytes(&yg)) == 0;
            }
            bool ok = nan == 0 && rel <= 1e-2 && same;
            bad += !ok;
            if (!ok && k < 16)
                g_bad_tile[pi][k] = true;
            printf("| %d %s | %d x %d | %.2e | %.2e | %s%s |\n", pi + 1, path_name(paths[pi]), (int)tiles[2 * k],
                   (int)tiles[2 * k + 1], rel, mx / rms, same ? "yes" : "NO", nan ? " (NaN!)" : "");
        }
    }
    if (npaths == 2)
        printf("HMMA (mma.sync) vs HGMMA (wgmma) on the same inputs: %s\n",
               memcmp(first[0], first[1], moe_tensor_nbytes(&yg)) == 0 ? "bit-identical" : "DIFFERENT bits");
    LB_CHECK(kern_cuda_set_tile(gpu, 0, 0));
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_AUTO));
    free(first[0]);
    free(first[1]);
    cudaFree(dx);
    cudaFree(d13);
    cudaFree(d2);
    cudaFree(di);
    cudaFree(dw);
    cudaFree(dy);
    moe_tensor_free(&x);
    moe_tensor_free(&w13);
    moe_tensor_free(&w2);
    moe_tensor_free(&ids);
    moe_tensor_free(&w);
    moe_tensor_free(&yref);
    moe_tensor_free(&yg);
    return bad;
}

/* Part 1b: the 128-column tiles of the wgmma path at shapes with more tiles than SMs, so that
 * the persistent tiles ((7, 128), (8, 128)) take several tiles per CTA (the stage ring, the
 * column-table slots and the held epilogue stages across tiles; gate-up with 2 k blocks, fewer
 * than the stages, lets the producer run a whole tile ahead). GPU only: the bits of each tile
 * against the first, every element written (poisoned before each run). Inputs drawn on the
 * device from `seed`. */
static int check_many_tiles(kern_ctx_t *gpu, uint64_t seed) {
    static const struct {
        int64_t T;
        int32_t E, K;
        int64_t H, I;
    } shapes[2] = {{4096, 8, 2, 1024, 1536}, {8192, 8, 2, 128, 384}};
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    int bad = 0;
    printf("part 1b: 128-column tiles (wgmma), more tiles than SMs: bits == first tile, every element written\n");
    printf("| shape (T E K H I) | tile | bits == first | unwritten |\n|---|---|---|---|\n");
    if (kern_cuda_set_path(gpu, KERN_CUDA_PATH_WGMMA) != MOE_OK) {
        printf("(no wgmma path on this device: skipped)\n");
        return 0;
    }
    for (int si = 0; si < 2; si++) {
        const int64_t T = shapes[si].T, E = shapes[si].E, K = shapes[si].K, H = shapes[si].H, I = shapes[si].I;
        void *w13, *w2, *x, *y, *lg, *ids, *w;
        LB_CUDA(cudaMalloc(&w13, (size_t)(E * 2 * I * H) * 2));
        LB_CUDA(cudaMalloc(&w2, (size_t)(E * H * I) * 2));
        LB_CUDA(cudaMalloc(&x, (size_t)(T * H) * 2));
        LB_CUDA(cudaMalloc(&y, (size_t)(T * H) * 2));
        LB_CUDA(cudaMalloc(&lg, (size_t)(T * E) * 4));
        LB_CUDA(cudaMalloc(&ids, (size_t)(T * K) * 4));
        LB_CUDA(cudaMalloc(&w, (size_t)(T * K) * 4));
        LB_CUDA((cudaError_t)dev_fill_randn(w13, MOE_DTYPE_BF16, E * 2 * I * H, seed + 10 * (uint64_t)si,
                                            1.0f / sqrtf((float)H), st));
        LB_CUDA((cudaError_t)dev_fill_randn(w2, MOE_DTYPE_BF16, E * H * I, seed + 10 * (uint64_t)si + 1,
                                            1.0f / sqrtf((float)I), st));
        LB_CUDA((cudaError_t)dev_fill_randn(x, MOE_DTYPE_BF16, T * H, seed + 10 * (uint64_t)si + 2, 1.0f, st));
        LB_CUDA((cudaError_t)dev_fill_randn(lg, MOE_DTYPE_F32, T * E, seed + 10 * (uint64_t)si + 3, 1.0f, st));
        kern_route_params rp = kern_route_params_default((int32_t)E, (int32_t)K);
        rp.renormalize = true;
        moe_tensor tl = moe_tensor_view2(lg, MOE_DTYPE_F32, T, E), ti = moe_tensor_view2(ids, MOE_DTYPE_I32, T, K),
                   tw = moe_tensor_view2(w, MOE_DTYPE_F32, T, K), tx = moe_tensor_view2(x, MOE_DTYPE_BF16, T, H),
                   ty = moe_tensor_view2(y, MOE_DTYPE_BF16, T, H),
                   t13 = moe_tensor_view3(w13, MOE_DTYPE_BF16, E, 2 * I, H),
                   t2 = moe_tensor_view3(w2, MOE_DTYPE_BF16, E, H, I);
        LB_CHECK(kern_route(gpu, &rp, &tl, &ti, &tw));
        kern_experts_params p = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = KERN_ACT_SILU};
        const size_t nbytes = (size_t)(T * H) * 2;
        uint16_t *first = NULL, *got = malloc(nbytes);
        int32_t tiles[32];
        int32_t nt = kern_cuda_tiles(KERN_CUDA_PATH_WGMMA, tiles, 16);
        for (int32_t k = 0; k < nt; k++) {
            if (tiles[2 * k + 1] != 128)
                continue;
            LB_CHECK(kern_cuda_set_tile(gpu, tiles[2 * k], tiles[2 * k + 1]));
            LB_CUDA(cudaMemset(y, 0xFF, nbytes));
            LB_CUDA(cudaDeviceSynchronize());
            LB_CHECK(kern_fused_experts(gpu, &p, &tx, &t13, &t2, &ti, &tw, &ty));
            LB_CHECK(kern_ctx_sync(gpu));
            LB_CUDA(cudaMemcpy(got, y, nbytes, cudaMemcpyDeviceToHost));
            int64_t unwritten = 0;
            for (int64_t i = 0; i < T * H; i++)
                unwritten += got[i] == 0xFFFF;
            bool same = true;
            if (!first) {
                first = malloc(nbytes);
                memcpy(first, got, nbytes);
            } else {
                same = memcmp(first, got, nbytes) == 0;
            }
            const bool ok = same && unwritten == 0;
            bad += !ok;
            if (!ok && k < 16)
                g_bad_tile[1][k] = true; /* the wgmma path's row of the table */
            printf("| %lld %lld %lld %lld %lld | %d x %d | %s | %lld |\n", (long long)T, (long long)E, (long long)K,
                   (long long)H, (long long)I, (int)tiles[2 * k], (int)tiles[2 * k + 1], same ? "yes" : "NO",
                   (long long)unwritten);
        }
        free(first);
        free(got);
        void *ps[] = {w13, w2, x, y, lg, ids, w};
        for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++)
            cudaFree(ps[i]);
    }
    LB_CHECK(kern_cuda_set_tile(gpu, 0, 0));
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_AUTO));
    return bad;
}

/* ---- part 2: timing ------------------------------------------------------------------- */
/* ---- shared by parts 2 and 3: the BASELINES shapes, their buffers, one timing ---------- */
static const struct {
    const char *name;
    int32_t E, K;
    int64_t H, I;
} lab_models[3] = {{"mixtral", 8, 2, 4096, 14336}, {"qwen3-a3b", 128, 8, 2048, 768}, {"dsv2-lite", 64, 6, 2048, 1408}};

/* Random weights and inputs of one shape for up to TM tokens (y: y_bytes), ids and weights
 * routed on the device from random logits (softmax top-k, renormalized), the workspace
 * reserved. Seeds seed .. seed + 3. */
typedef struct lab_bufs {
    void *w13, *w2, *x, *y, *lg, *ids, *w;
} lab_bufs;

static void lab_bufs_init(lab_bufs *b, kern_ctx_t *gpu, int mi, int64_t TM, size_t y_bytes, uint64_t seed) {
    const int64_t E = lab_models[mi].E, K = lab_models[mi].K, H = lab_models[mi].H, I = lab_models[mi].I;
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    LB_CUDA(cudaMalloc(&b->w13, (size_t)(E * 2 * I * H) * 2));
    LB_CUDA(cudaMalloc(&b->w2, (size_t)(E * H * I) * 2));
    LB_CUDA(cudaMalloc(&b->x, (size_t)(TM * H) * 2));
    LB_CUDA(cudaMalloc(&b->y, y_bytes));
    LB_CUDA(cudaMalloc(&b->lg, (size_t)(TM * E) * 4));
    LB_CUDA(cudaMalloc(&b->ids, (size_t)(TM * K) * 4));
    LB_CUDA(cudaMalloc(&b->w, (size_t)(TM * K) * 4));
    LB_CUDA((cudaError_t)dev_fill_randn(b->w13, MOE_DTYPE_BF16, E * 2 * I * H, seed, 1.0f / 64, st));
    LB_CUDA((cudaError_t)dev_fill_randn(b->w2, MOE_DTYPE_BF16, E * H * I, seed + 1, 1.0f / 64, st));
    LB_CUDA((cudaError_t)dev_fill_randn(b->x, MOE_DTYPE_BF16, TM * H, seed + 2, 1.0f, st));
    LB_CUDA((cudaError_t)dev_fill_randn(b->lg, MOE_DTYPE_F32, TM * E, seed + 3, 1.0f, st));
    kern_route_params rp = kern_route_params_default((int32_t)E, (int32_t)K);
    rp.renormalize = true;
    moe_tensor tl = moe_tensor_view2(b->lg, MOE_DTYPE_F32, TM, E), ti = moe_tensor_view2(b->ids, MOE_DTYPE_I32, TM, K),
               tw = moe_tensor_view2(b->w, MOE_DTYPE_F32, TM, K);
    LB_CHECK(kern_route(gpu, &rp, &tl, &ti, &tw));
    LB_CHECK(kern_cuda_reserve(gpu, TM, (int32_t)K, H, I, (int32_t)E, 0));
}

static void lab_bufs_free(lab_bufs *b) {
    void *p[] = {b->w13, b->w2, b->x, b->y, b->lg, b->ids, b->w};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        cudaFree(p[i]);
}

/* One case: the views of T tokens over the buffers of model mi, which are made again (for up
 * to TM tokens) when the model changes from *last_mi. */
typedef struct lab_case {
    kern_experts_params p;
    moe_tensor w13, w2, x, ids, w, y;
} lab_case;

static lab_case lab_case_of(lab_bufs *b, int *last_mi, kern_ctx_t *gpu, int mi, int64_t TM, int64_t T) {
    const int64_t E = lab_models[mi].E, K = lab_models[mi].K, H = lab_models[mi].H, I = lab_models[mi].I;
    if (mi != *last_mi) {
        if (*last_mi >= 0)
            lab_bufs_free(b);
        lab_bufs_init(b, gpu, mi, TM, (size_t)(TM * H) * 2, 1 + (uint64_t)mi);
        *last_mi = mi;
    }
    lab_case c = {.p = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = KERN_ACT_SILU}};
    c.w13 = moe_tensor_view3(b->w13, MOE_DTYPE_BF16, E, 2 * I, H);
    c.w2 = moe_tensor_view3(b->w2, MOE_DTYPE_BF16, E, H, I);
    c.x = moe_tensor_view2(b->x, MOE_DTYPE_BF16, T, H);
    c.ids = moe_tensor_view2(b->ids, MOE_DTYPE_I32, T, K);
    c.w = moe_tensor_view2(b->w, MOE_DTYPE_F32, T, K);
    c.y = moe_tensor_view2(b->y, MOE_DTYPE_BF16, T, H);
    return c;
}

/* One call's time: median of `reps` runs, the L2 flushed before each (two warm-up calls). */
typedef struct lab_timer {
    void *flush;
    size_t flush_bytes;
    cudaEvent_t e0, e1;
    bool clean; /* flush by reading (dev_flush_l2_clean) instead of writing */
} lab_timer;

static void lab_timer_init(lab_timer *t) {
    t->flush_bytes = (size_t)256 << 20;
    t->clean = false;
    LB_CUDA(cudaMalloc(&t->flush, t->flush_bytes));
    LB_CUDA(cudaEventCreate(&t->e0));
    LB_CUDA(cudaEventCreate(&t->e1));
}

static void lab_timer_free(lab_timer *t) {
    cudaFree(t->flush);
    cudaEventDestroy(t->e0);
    cudaEventDestroy(t->e1);
}

static double lab_time_fused(lab_timer *tm, kern_ctx_t *gpu, const kern_experts_params *p, const moe_tensor *x,
                             const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids, const moe_tensor *w,
                             moe_tensor *y, int reps) {
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    for (int wu = 0; wu < 2; wu++)
        LB_CHECK(kern_fused_experts(gpu, p, x, w13, w2, ids, w, y));
    LB_CHECK(kern_ctx_sync(gpu));
    double t[32];
    reps = reps > 32 ? 32 : reps;
    for (int r = 0; r < reps; r++) {
        LB_CUDA((cudaError_t)(tm->clean ? dev_flush_l2_clean(tm->flush, tm->flush_bytes, st)
                                        : dev_flush_l2(tm->flush, tm->flush_bytes, st)));
        LB_CUDA(cudaEventRecord(tm->e0, st));
        LB_CHECK(kern_fused_experts(gpu, p, x, w13, w2, ids, w, y));
        LB_CUDA(cudaEventRecord(tm->e1, st));
        LB_CHECK(kern_ctx_sync(gpu));
        float ms;
        LB_CUDA(cudaEventElapsedTime(&ms, tm->e0, tm->e1));
        t[r] = ms * 1e3;
    }
    return dev_median(t, reps);
}

/* ---- part 3 (--ep W): an expert-parallel rank's products against one GPU's ---------------- */
static int ep_compare(kern_ctx_t *gpu, int32_t W, const struct cudaDeviceProp *prop) {
    const int64_t Ts[3] = {256, 1024, 4096};
    lab_timer tm;
    lab_timer_init(&tm);
    printf("\npart 3: one expert-parallel rank of %d vs one GPU (median of 7, L2 flushed, %s)\n", (int)W, prop->name);
    printf("| model | T/GPU | 1 GPU: sum mode, E experts, T tokens (us) | rank of %d: slot mode, E/%d experts, %d T tokens "
           "(us) | rank / 1 GPU |\n|---|---|---|---|---|\n",
           (int)W, (int)W, (int)W);
    for (int mi = 1; mi < 3; mi++) { /* Qwen3 and DeepSeek-V2-Lite (Mixtral's 8 experts: no EP at these W) */
        const int64_t E = lab_models[mi].E, K = lab_models[mi].K, H = lab_models[mi].H, I = lab_models[mi].I;
        if (E % W != 0) {
            printf("| %s | - | E = %lld is not a multiple of %d | | |\n", lab_models[mi].name, (long long)E, (int)W);
            continue;
        }
        const int64_t TM = Ts[2] * W, EL = E / W;
        lab_bufs b;
        lab_bufs_init(&b, gpu, mi, TM, (size_t)(TM * K * H) * 2, 11 + 4 * (uint64_t)mi);
        void *map;
        LB_CUDA(cudaMalloc(&map, (size_t)E * 4));
        int32_t *hmap = malloc(sizeof(int32_t) * (size_t)E);
        for (int64_t e = 0; e < E; e++)
            hmap[e] = e < EL ? (int32_t)e : -1;
        LB_CUDA(cudaMemcpy(map, hmap, sizeof(int32_t) * (size_t)E, cudaMemcpyHostToDevice));
        LB_CUDA(cudaDeviceSynchronize());
        free(hmap);
        moe_tensor t13 = moe_tensor_view3(b.w13, MOE_DTYPE_BF16, E, 2 * I, H),
                   t2 = moe_tensor_view3(b.w2, MOE_DTYPE_BF16, E, H, I);
        moe_tensor l13 = moe_tensor_view3(b.w13, MOE_DTYPE_BF16, EL, 2 * I, H),
                   l2 = moe_tensor_view3(b.w2, MOE_DTYPE_BF16, EL, H, I);
        kern_experts_params all = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = KERN_ACT_SILU};
        kern_experts_params loc = {
            .n_experts = (int32_t)E, .n_local = (int32_t)EL, .expert_map = map, .act = KERN_ACT_SILU};
        for (int tt = 0; tt < 3; tt++) {
            const int64_t T = Ts[tt];
            double us[2];
            for (int v = 0; v < 2; v++) {
                const int64_t n = v ? T * W : T;
                moe_tensor vx = moe_tensor_view2(b.x, MOE_DTYPE_BF16, n, H), vi = moe_tensor_view2(b.ids, MOE_DTYPE_I32, n, K),
                           vw = moe_tensor_view2(b.w, MOE_DTYPE_F32, n, K);
                moe_tensor vy = v ? moe_tensor_view3(b.y, MOE_DTYPE_BF16, n, K, H) : moe_tensor_view2(b.y, MOE_DTYPE_BF16, n, H);
                us[v] = lab_time_fused(&tm, gpu, v ? &loc : &all, &vx, v ? &l13 : &t13, v ? &l2 : &t2, &vi, &vw, &vy, 7);
            }
            printf("| %s | %lld | %.1f | %.1f | %.2f |\n", lab_models[mi].name, (long long)T, us[0], us[1], us[1] / us[0]);
            fflush(stdout);
        }
        cudaFree(map);
        lab_bufs_free(&b);
    }
    lab_timer_free(&tm);
    return 0;
}

/* ---- interleaved rounds, shared by --ab and --align -----------------------------------------
 * ROUNDS rounds of every variant once (set(gpu, v, arg) selects variant v; median of 3 calls,
 * L2 flushed before each), so that the card's clock drift under a long load falls on every
 * variant alike; each round starts one variant later, so that no variant always follows the
 * same one (session 7: a configuration's place in a fixed order moved it 3-5% at Mixtral
 * T = 8192, the card at its power limit after the slow tiles). med[v]: the median over rounds. */
enum { LAB_ROUNDS = 9, LAB_MAX_VARIANTS = 16 };
typedef void (*lab_set_fn)(kern_ctx_t *gpu, int v, const void *arg);
static void lab_rounds(lab_timer *tm, kern_ctx_t *gpu, lab_case *lc, int nv, lab_set_fn set, const void *arg,
                       double *med) {
    double t[LAB_MAX_VARIANTS][LAB_ROUNDS];
    if (nv > LAB_MAX_VARIANTS) {
        fprintf(stderr, "lab: %d variants, at most %d\n", nv, LAB_MAX_VARIANTS);
        exit(2);
    }
    for (int r = 0; r < LAB_ROUNDS; r++)
        for (int vi = 0; vi < nv; vi++) {
            const int v = (vi + r) % nv;
            set(gpu, v, arg);
            t[v][r] = lab_time_fused(tm, gpu, &lc->p, &lc->x, &lc->w13, &lc->w2, &lc->ids, &lc->w, &lc->y, 3);
        }
    for (int v = 0; v < nv; v++)
        med[v] = dev_median(t[v], LAB_ROUNDS);
}

typedef struct lab_tile {
    int32_t nwg, bn;
} lab_tile;
static void lab_set_tile(kern_ctx_t *gpu, int v, const void *arg) {
    const lab_tile *tiles = arg;
    LB_CHECK(kern_cuda_set_tile(gpu, tiles[v].nwg, tiles[v].bn));
}
static void lab_set_align(kern_ctx_t *gpu, int v, const void *arg) {
    (void)arg;
    LB_CHECK(kern_cuda_set_align(gpu, v));
}

/* ---- --ab: the large tiles against each other, interleaved (lab_rounds) ------------------- */
static void ab_compare(kern_ctx_t *gpu, const struct cudaDeviceProp *prop) {
    static const struct {
        int mi;
        int64_t T;
    } cases[] = {{0, 8192}, {0, 1024}, {0, 768}, {0, 512}, {0, 384}, {0, 256}, {0, 128}, {1, 8192}, {1, 1024},
                 {1, 768},  {1, 512},  {2, 8192}, {2, 1024}, {2, 768}, {2, 512}, {2, 352}};
    /* (0, 0): the automatic choice; (1, 64) and (2, 64): the cp.async tiles of 22-80 rows per expert */
    static const lab_tile vars[] = {{0, 0}, {1, 64}, {2, 64}, {5, 128}, {8, 128}, {9, 128}};
    enum { NV = sizeof vars / sizeof vars[0] };
    lab_timer tm;
    lab_timer_init(&tm);
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_WGMMA));
    LB_CHECK(kern_cuda_set_pdl(gpu, prop->major >= 9));
    printf("\n--ab: the large tiles interleaved (%d rounds of median-of-3, order rotated, L2 flushed, %s; us)\n",
           LAB_ROUNDS, prop->name);
    printf("| model | T | rows per expert |");
    for (int v = 0; v < NV; v++) {
        if (vars[v].nwg)
            printf(" %dx%d |", (int)vars[v].nwg, (int)vars[v].bn);
        else
            printf(" auto |");
    }
    printf("\n|---|---|---|");
    for (int v = 0; v < NV; v++)
        printf("---|");
    printf("\n");
    int last_mi = -1;
    lab_bufs b;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int mi = cases[c].mi;
        const int64_t T = cases[c].T;
        lab_case lc = lab_case_of(&b, &last_mi, gpu, mi, 8192, T);
        double med[NV];
        lab_rounds(&tm, gpu, &lc, NV, lab_set_tile, vars, med);
        printf("| %s | %lld | %lld |", lab_models[mi].name, (long long)T,
               (long long)(T * lab_models[mi].K / lab_models[mi].E));
        for (int v = 0; v < NV; v++)
            printf(" %.1f |", med[v]);
        printf("\n");
        fflush(stdout);
    }
    if (last_mi >= 0)
        lab_bufs_free(&b);
    LB_CHECK(kern_cuda_set_tile(gpu, 0, 0));
    LB_CHECK(kern_cuda_set_pdl(gpu, prop->major >= 9));
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_AUTO));
    lab_timer_free(&tm);
}

/* Each variant of lab_rounds once (set(gpu, v, arg)), outputs poisoned first: whether every
 * variant's output has the bits of variant 0's (--align, --fit). */
static bool lab_same_bits(kern_ctx_t *gpu, lab_case *lc, int nv, lab_set_fn set, const void *arg) {
    const size_t nbytes = (size_t)moe_tensor_numel(&lc->y) * 2;
    uint16_t *first = malloc(nbytes), *got = malloc(nbytes);
    if (!first || !got) {
        fprintf(stderr, "lab: out of host memory\n");
        exit(2);
    }
    bool same = true;
    for (int v = 0; v < nv; v++) {
        set(gpu, v, arg);
        LB_CUDA(cudaMemset(lc->y.data, 0xFF, nbytes));
        LB_CUDA(cudaDeviceSynchronize());
        LB_CHECK(kern_fused_experts(gpu, &lc->p, &lc->x, &lc->w13, &lc->w2, &lc->ids, &lc->w, &lc->y));
        LB_CHECK(kern_ctx_sync(gpu));
        LB_CUDA(cudaMemcpy(v ? got : first, lc->y.data, nbytes, cudaMemcpyDeviceToHost));
        if (v && memcmp(first, got, nbytes) != 0)
            same = false;
    }
    free(first);
    free(got);
    return same;
}

/* ---- --align: the alignments against each other ----------------------------------------
 * Each case in lab_rounds of (auto, one CTA, three launches); the outputs of every mode must
 * have the bits of the first (the alignment only orders rows inside an expert). Run 64 also had
 * a one-launch many-CTA form (the last CTA to count scans, the others wait for it): slower than
 * three launches everywhere, removed (docs/PERF.md). */
static int align_compare(kern_ctx_t *gpu, const struct cudaDeviceProp *prop) {
    static const struct {
        int mi;
        int64_t T;
    } cases[] = {{1, 128}, {1, 512}, {1, 1024}, {1, 2048}, {1, 4096}, {1, 8192}, {2, 1024}, {2, 8192}, {0, 1024}};
    enum { NM = 3 };
    lab_timer tm;
    lab_timer_init(&tm);
    int bad = 0;
    printf("\n--align: the alignments (%d rounds of median-of-3, order rotated, L2 flushed, %s; us, whole call)\n",
           LAB_ROUNDS, prop->name);
    printf("| model | T | pairs | auto | one CTA | three launches | same bits |\n|---|---|---|---|---|---|---|\n");
    int last_mi = -1;
    lab_bufs b;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int mi = cases[c].mi;
        const int64_t T = cases[c].T;
        lab_case lc = lab_case_of(&b, &last_mi, gpu, mi, 8192, T);
        const bool same = lab_same_bits(gpu, &lc, NM, lab_set_align, NULL);
        bad += !same;
        double med[NM];
        lab_rounds(&tm, gpu, &lc, NM, lab_set_align, NULL, med);
        printf("| %s | %lld | %lld |", lab_models[mi].name, (long long)T, (long long)(T * lab_models[mi].K));
        for (int m = 0; m < NM; m++)
            printf(" %.1f |", med[m]);
        printf(" %s |\n", same ? "yes" : "NO");
        fflush(stdout);
    }
    if (last_mi >= 0)
        lab_bufs_free(&b);
    LB_CHECK(kern_cuda_set_align(gpu, 0));
    lab_timer_free(&tm);
    return bad;
}

/* ---- --fit: the 128-column tiles with and without the wgmma N cut to the columns in use ----
 * (kern_cuda_set_fit_n). Napkin math: with the bench's routing an expert's rows scatter about
 * their mean m by about sqrt(m); where m is a multiple of 128 half of the experts spill a few
 * rows into one more block, which without the cut costs a whole 128-column tile: Mixtral
 * T = 1024 (256 rows per expert) ~20 blocks of work for 16 blocks of rows (+24%), Qwen3 T = 8192
 * (512) +11%, DeepSeek-V2-Lite T = 8192 (768) +8%, Mixtral T = 8192 (2048) +3%; at T = 1024
 * Qwen3 (64 rows) and DeepSeek (96) use half and three quarters of their one block. "pad": the
 * share of the 128-column blocks' columns that are padding in this routing. Variants: the
 * automatic tile, (5, 128) and (8, 128), with the cut (fit) and without (full), the persistent
 * (8, 128) with its tiles handed out as asked (dyn, kern_cuda_set_dyn_sched) or a fixed share
 * per CTA (fixed; run 71 measured the cut with a fixed share: the CTAs that drew cheap tiles ran
 * ahead, Mixtral T = 1024 +30%); in "auto full fixed" the automatic choice sees neither (so
 * (2, 64) at 22-48 rows). The cut applies only to products whose k walk is at most
 * KC_FIT_N_MAX_K (3072; not Mixtral's): there "fit" and "full" run the same code. Every
 * variant's output must have the bits of the first. */
typedef struct lab_fit {
    int32_t nwg, bn;
    bool fit, dyn;
} lab_fit;
static void lab_set_fit(kern_ctx_t *gpu, int v, const void *arg) {
    const lab_fit *f = (const lab_fit *)arg + v;
    LB_CHECK(kern_cuda_set_tile(gpu, f->nwg, f->bn));
    LB_CHECK(kern_cuda_set_fit_n(gpu, f->fit));
    LB_CHECK(kern_cuda_set_dyn_sched(gpu, f->dyn));
}
static int fit_compare(kern_ctx_t *gpu, const struct cudaDeviceProp *prop) {
    static const struct {
        int mi;
        int64_t T;
    } cases[] = {{0, 1024}, {0, 512}, {0, 8192}, {1, 1024}, {1, 2048}, {1, 8192}, {2, 1024}, {2, 512}, {2, 8192}};
    static const lab_fit vars[] = {{0, 0, true, true},      {0, 0, false, false},    {5, 128, true, true},
                                   {5, 128, false, true},   {8, 128, true, true},    {8, 128, false, true},
                                   {8, 128, false, false}};
    enum { NV = sizeof vars / sizeof vars[0] };
    lab_timer tm;
    lab_timer_init(&tm);
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_WGMMA));
    int bad = 0;
    printf("\n--fit: wgmma N cut to the columns in use (fit) or not (full) (%d rounds of median-of-3, order "
           "rotated, L2 flushed, %s; us, whole call)\n",
           LAB_ROUNDS, prop->name);
    printf("| model | T | rows per expert | pad | auto fit dyn | auto full fixed | 5x128 fit | 5x128 full | 8x128 fit dyn "
           "| 8x128 full dyn | 8x128 full fixed | same bits |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    int last_mi = -1;
    lab_bufs b;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int mi = cases[c].mi;
        const int64_t T = cases[c].T, E = lab_models[mi].E, K = lab_models[mi].K;
        lab_case lc = lab_case_of(&b, &last_mi, gpu, mi, 8192, T);
        /* the padding share of 128-column blocks in this routing */
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)(T * K));
        int64_t *cnt = calloc((size_t)E, sizeof(int64_t));
        if (!ids || !cnt) {
            fprintf(stderr, "lab: out of host memory\n");
            exit(2);
        }
        LB_CUDA(cudaMemcpy(ids, lc.ids.data, sizeof(int32_t) * (size_t)(T * K), cudaMemcpyDeviceToHost));
        for (int64_t q = 0; q < T * K; q++)
            if (ids[q] >= 0 && ids[q] < E)
                cnt[ids[q]]++;
        int64_t cols = 0;
        for (int64_t e = 0; e < E; e++)
            cols += (cnt[e] + 127) / 128 * 128;
        free(ids);
        free(cnt);
        const bool same = lab_same_bits(gpu, &lc, NV, lab_set_fit, vars);
        bad += !same;
        double med[NV];
        lab_rounds(&tm, gpu, &lc, NV, lab_set_fit, vars, med);
        printf("| %s | %lld | %lld | %.0f%% |", lab_models[mi].name, (long long)T, (long long)(T * K / E),
               cols ? 100.0 * (double)(cols - T * K) / (double)cols : 0.0);
        for (int v = 0; v < NV; v++)
            printf(" %.1f |", med[v]);
        printf(" %s |\n", same ? "yes" : "NO");
        fflush(stdout);
    }
    if (last_mi >= 0)
        lab_bufs_free(&b);
    LB_CHECK(kern_cuda_set_tile(gpu, 0, 0));
    LB_CHECK(kern_cuda_set_fit_n(gpu, true));
    LB_CHECK(kern_cuda_set_dyn_sched(gpu, true));
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_AUTO));
    lab_timer_free(&tm);
    return bad;
}

/* ---- --small: the alignment-free mode's options ------------------------------------------
 * Napkin math (T = 1): Qwen3-30B-A3B reads 8 experts x 3 x 2048 x 768 x 2 = 75.5 MB (gate-up
 * 50.3, down 25.2): 25 us at 3.0 TB/s; DeepSeek-V2-Lite 6 x 3 x 2048 x 1408 x 2 = 104 MB
 * (69 + 35): 35 us. Run 14: 49.8 and 57.3 us (ncu of run 5: gate-up 25.4 / 31.8 us, down
 * 15.1 / 18.4, sum 7.8 / 6.8, one after the other). */
static int small_compare(kern_ctx_t *gpu, const struct cudaDeviceProp *prop) {
    static const struct {
        int mi;
        int64_t T;
    } cases[] = {{1, 1}, {2, 1}, {0, 1}, {1, 2}, {1, 4}, {1, 8}, {2, 8}};
    static const uint32_t masks[] = {0, 1, 2, 4, 5, 6, 7, 8, 12, 13, 15};
    static const uint32_t clean_masks[] = {0, 1, 4, 5, 7, 13};
    enum { NCM = sizeof clean_masks / sizeof clean_masks[0] };
    static double tc[7][NCM][11];
    enum { NC = sizeof cases / sizeof cases[0], NM = sizeof masks / sizeof masks[0], ROUNDS = 21 };
    lab_timer tm;
    lab_timer_init(&tm);
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(gpu);
    const uint32_t saved = kern_cuda_get_small_opts(gpu);
    int bad = 0;
    static double t[NC][NM][ROUNDS];
    static const uint32_t part_masks[3] = {0, 4, 7};
    static double parts[NC][3][3][ROUNDS];
    printf("\n--small: the alignment-free mode's option masks (automatic tile, %s)\n", prop->name);
    printf("| model | T | masks with the bits of mask 0, every element written, 2 runs equal |\n|---|---|---|\n");
    int last_mi = -1;
    lab_bufs b;
    for (int c = 0; c < NC; c++) {
        const int mi = cases[c].mi;
        const int64_t T = cases[c].T, H = lab_models[mi].H;
        lab_case lc = lab_case_of(&b, &last_mi, gpu, mi, 64, T);
        const size_t nbytes = (size_t)(T * H) * 2;
        uint16_t *first = malloc(nbytes), *got = malloc(nbytes);
        int n_ok = 0;
        char fails[256] = "";
        for (int m = 0; m < NM; m++) {
            LB_CHECK(kern_cuda_set_small_opts(gpu, masks[m]));
            bool ok = true;
            for (int rep = 0; rep < 2; rep++) {
                LB_CUDA(cudaMemsetAsync(b.y, 0xFF, nbytes, st));
                LB_CHECK(kern_fused_experts(gpu, &lc.p, &lc.x, &lc.w13, &lc.w2, &lc.ids, &lc.w, &lc.y));
                LB_CHECK(kern_ctx_sync(gpu));
                LB_CUDA(cudaMemcpy(got, b.y, nbytes, cudaMemcpyDeviceToHost));
                int64_t unwritten = 0;
                for (int64_t i = 0; i < T * H; i++)
                    unwritten += got[i] == 0xFFFF;
                if (m == 0 && rep == 0)
                    memcpy(first, got, nbytes);
                ok = ok && unwritten == 0 && memcmp(first, got, nbytes) == 0;
            }
            n_ok += ok;
            if (!ok) {
                bad++;
                snprintf(fails + strlen(fails), sizeof fails - strlen(fails), " %u:FAILED", (unsigned)masks[m]);
            }
        }
        printf("| %s | %lld | %d of %d%s |\n", lab_models[mi].name, (long long)T, n_ok, (int)NM, fails);
        fflush(stdout);
        free(first);
        free(got);
        for (int r = 0; r < ROUNDS; r++) {
            for (int m = 0; m < NM; m++) {
                LB_CHECK(kern_cuda_set_small_opts(gpu, masks[m]));
                t[c][m][r] = lab_time_fused(&tm, gpu, &lc.p, &lc.x, &lc.w13, &lc.w2, &lc.ids, &lc.w, &lc.y, 5);
            }
            for (int v = 0; v < 3; v++) {
                LB_CHECK(kern_cuda_set_small_opts(gpu, part_masks[v]));
                for (int stop = 1; stop <= 3; stop++) {
                    LB_CHECK(kern_cuda_set_lab_stop(gpu, stop == 3 ? 0 : stop));
                    parts[c][v][stop - 1][r] = lab_time_fused(&tm, gpu, &lc.p, &lc.x, &lc.w13, &lc.w2, &lc.ids, &lc.w, &lc.y, 5);
                }
                LB_CHECK(kern_cuda_set_lab_stop(gpu, 0));
            }
            if (r < 11) {
                tm.clean = true;
                for (int m = 0; m < NCM; m++) {
                    LB_CHECK(kern_cuda_set_small_opts(gpu, clean_masks[m]));
                    tc[c][m][r] = lab_time_fused(&tm, gpu, &lc.p, &lc.x, &lc.w13, &lc.w2, &lc.ids, &lc.w, &lc.y, 5);
                }
                tm.clean = false;
            }
        }
    }
    if (last_mi >= 0)
        lab_bufs_free(&b);
    printf("\n| model | T |");
    for (int m = 0; m < NM; m++)
        printf(" 3.%u |", (unsigned)masks[m]);
    printf("\n|---|---|");
    for (int m = 0; m < NM; m++)
        printf("---|");
    printf("\n");
    for (int c = 0; c < NC; c++) {
        printf("| %s | %lld |", lab_models[cases[c].mi].name, (long long)cases[c].T);
        for (int m = 0; m < NM; m++)
            printf(" %.1f |", dev_median(t[c][m], ROUNDS));
        printf("\n");
    }
    printf("(us: median over %d interleaved rounds of median-of-5, L2 flushed before each call)\n", (int)ROUNDS);
    printf("\nparts of a call (us; gate-up alone | gate-up + down | the whole call), masks 0, 4, 7\n");
    printf("| model | T | 3.0 gate-up | 3.0 + down | 3.0 all | 3.4 gate-up | 3.4 + down | 3.4 all | 3.7 gate-up | "
           "3.7 + down | 3.7 all |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int c = 0; c < NC; c++) {
        printf("| %s | %lld |", lab_models[cases[c].mi].name, (long long)cases[c].T);
        for (int v = 0; v < 3; v++)
            for (int k = 0; k < 3; k++)
                printf(" %.1f |", dev_median(parts[c][v][k], ROUNDS));
        printf("\n");
    }
    printf("\nthe L2 flushed by reading (clean lines; us, median over 11 rounds of median-of-5)\n| model | T |");
    for (int m = 0; m < NCM; m++)
        printf(" 3.%u clean |", (unsigned)clean_masks[m]);
    printf("\n|---|---|");
    for (int m = 0; m < NCM; m++)
        printf("---|");
    printf("\n");
    for (int c = 0; c < NC; c++) {
        printf("| %s | %lld |", lab_models[cases[c].mi].name, (long long)cases[c].T);
        for (int m = 0; m < NCM; m++)
            printf(" %.1f |", dev_median(tc[c][m], 11));
        printf("\n");
    }
    /* The mask with the lowest mean ratio to mask 0 over the cases (the bench's flush). */
    int best = 0;
    double best_score = 1e30;
    for (int m = 0; m < NM; m++) {
        double sc = 0.0;
        for (int c = 0; c < NC; c++)
            sc += dev_median(t[c][m], ROUNDS) / dev_median(t[c][0], ROUNDS);
        sc /= NC;
        printf("mask %u: mean ratio to mask 0 %.3f\n", (unsigned)masks[m], sc);
        if (sc < best_score) {
            best_score = sc;
            best = (int)masks[m];
        }
    }
    printf("--small best mask: %d (mean ratio %.3f)\n", best, best_score);
    LB_CHECK(kern_cuda_set_small_opts(gpu, saved));
    lab_timer_free(&tm);
    (void)st;
    return bad;
}

typedef struct lb_row {
    char model[24];
    int64_t T;
    char variant[24];
    double us;
    bool is_auto;
} lb_row;

int main(int argc, char **argv) {
    bool check_only = argc > 1 && strcmp(argv[1], "--check-only") == 0;
    /* --one MODEL T: only the automatic variant of one case, a few runs (for a profiler). */
    const char *one_model = argc > 3 && strcmp(argv[1], "--one") == 0 ? argv[2] : NULL;
    const int64_t one_T = one_model ? atoll(argv[3]) : 0;
    /* --one MODEL T NWG BN: that tile instead of the automatic choice */
    const int32_t one_nwg = one_model && argc > 5 ? atoi(argv[4]) : 0, one_bn = one_model && argc > 5 ? atoi(argv[5]) : 0;
    /* --from-T N: part 2 only for T >= N (the large-T tiles, in less device time). */
    const int64_t from_T = argc > 2 && strcmp(argv[1], "--from-T") == 0 ? atoll(argv[2]) : 0;
    /* --ep W: part 3 only */
    const int32_t ep_w = argc > 2 && strcmp(argv[1], "--ep") == 0 ? atoi(argv[2]) : 0;
    if (argc > 1 && strcmp(argv[1], "--ep") == 0 && (ep_w < 2 || ep_w > 64)) {
        fprintf(stderr, "lab: --ep W needs a world size W in [2, 64]\n");
        return 2;
    }
    moe_log_init_from_env();
    kern_ctx_t *gpu, *cpu;
    kern_ctx_params cp = {0};
    LB_CHECK(kern_ctx_init(&gpu, KERN_BACKEND_CUDA, &cp));
    LB_CHECK(kern_ctx_init(&cpu, KERN_BACKEND_CPU_REF, NULL));
    kern_cuda_path paths[2] = {KERN_CUDA_PATH_MMA, KERN_CUDA_PATH_WGMMA};
    int npaths = kern_cuda_set_path(gpu, KERN_CUDA_PATH_WGMMA) == MOE_OK ? 2 : 1;
    LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_AUTO));
    struct cudaDeviceProp prop;
    LB_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("lab_experts on %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    /* the modes that compare variants for their bits and times: a count of failures back */
    static const struct {
        const char *flag;
        int (*run)(kern_ctx_t *, const struct cudaDeviceProp *);
        const char *fail, *ok;
    } modes[] = {{"--small", small_compare, "FAILED", "all masks the same bits"},
                 {"--align", align_compare, "FAILED (bits differ)", "every alignment the same bits"},
                 {"--fit", fit_compare, "FAILED (bits differ)", "every variant the same bits"}};
    for (size_t mi = 0; argc > 1 && mi < sizeof modes / sizeof modes[0]; mi++) {
        if (strcmp(argv[1], modes[mi].flag) != 0)
            continue;
        const int rc = modes[mi].run(gpu, &prop);
        kern_ctx_free(gpu);
        kern_ctx_free(cpu);
        printf("%s: %s\n", modes[mi].flag, rc ? modes[mi].fail : modes[mi].ok);
        return rc ? 1 : 0;
    }
    if (argc > 1 && strcmp(argv[1], "--ab") == 0) {
        ab_compare(gpu, &prop);
        kern_ctx_free(gpu);
        kern_ctx_free(cpu);
        return 0;
    }
    if (ep_w) {
        int rc = ep_compare(gpu, ep_w, &prop);
        kern_ctx_free(gpu);
        kern_ctx_free(cpu);
        return rc;
    }
    const uint64_t seed = moe_now_ns();
    int bad = one_model ? 0 : check_variants(gpu, cpu, npaths, paths, seed);
    if (!one_model && npaths == 2)
        bad += check_many_tiles(gpu, seed);
    printf("part 1: %s\n", one_model ? "skipped (--one)" : bad ? "FAILED" : "all variants correct");
    if (check_only) {
        kern_ctx_free(gpu);
        kern_ctx_free(cpu);
        return bad ? 1 : 0;
    }

    const int64_t Ts[5] = {1, 16, 128, 1024, 8192};
    lab_timer tm;
    lab_timer_init(&tm);
    lb_row *rows = calloc(1024, sizeof *rows);
    int nrows = 0;
    for (int mi = 0; mi < 3; mi++) {
        if (one_model && strcmp(one_model, lab_models[mi].name) != 0)
            continue;
        const int64_t E = lab_models[mi].E, K = lab_models[mi].K, H = lab_models[mi].H, I = lab_models[mi].I, TM = 8192;
        lab_bufs b;
        lab_bufs_init(&b, gpu, mi, TM, (size_t)(TM * H) * 2, 1 + (uint64_t)mi);
        kern_experts_params p = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = KERN_ACT_SILU};
        moe_tensor t13 = moe_tensor_view3(b.w13, MOE_DTYPE_BF16, E, 2 * I, H),
                   t2 = moe_tensor_view3(b.w2, MOE_DTYPE_BF16, E, H, I);
        for (int tt = 0; tt < 5; tt++) {
            const int64_t T = Ts[tt];
            if ((one_model && T != one_T) || T < from_T)
                continue;
            const int64_t busy = E < T * K ? E : T * K;
            const int64_t m = (T * K + busy - 1) / busy;
            moe_tensor vx = moe_tensor_view2(b.x, MOE_DTYPE_BF16, T, H), vi = moe_tensor_view2(b.ids, MOE_DTYPE_I32, T, K),
                       vw = moe_tensor_view2(b.w, MOE_DTYPE_F32, T, K), vy = moe_tensor_view2(b.y, MOE_DTYPE_BF16, T, H);
            for (int pi = 0; pi < npaths; pi++) {
                LB_CHECK(kern_cuda_set_path(gpu, paths[pi]));
                int32_t tiles[32];
                int32_t nt = kern_cuda_tiles(paths[pi], tiles, 16);
                /* k < nt: a forced tile; k == nt: auto; then (last path only) auto with the
                 * alignment-free mode forced on / off, and auto without PDL. */
                const int extra = pi == npaths - 1 ? 4 : 0;
                for (int32_t k = 0; k <= nt + extra; k++) {
                    if (one_model && (k != nt || pi != npaths - 1))
                        continue;
                    int32_t nwg = k < nt ? tiles[2 * k] : one_nwg, bn = k < nt ? tiles[2 * k + 1] : one_bn;
                    if (k < nt && (m > 16 * (int64_t)bn || (int64_t)bn > 2 * m + 8))
                        continue; /* too many weight re-reads, or a tile mostly padding */
                    if (k < nt && k < 16 && g_bad_tile[pi][k])
                        continue; /* wrong in part 1: not timed */
                    if ((k == nt + 1 || k == nt + 2 || k == nt + 4) && T * K > 256)
                        continue;
                    LB_CHECK(kern_cuda_set_tile(gpu, nwg, bn));
                    LB_CHECK(kern_cuda_set_small_max(gpu, k == nt + 1 ? 256 : k == nt + 2 ? 0 : 64));
                    LB_CHECK(kern_cuda_set_fused(gpu, k == nt + 4));
                    LB_CHECK(kern_cuda_set_pdl(gpu, k != nt + 3 && prop.major >= 9));
                    const int reps = one_model ? 3 : T >= 1024 ? 7 : 21;
                    const double us = lab_time_fused(&tm, gpu, &p, &vx, &t13, &t2, &vi, &vw, &vy, reps);
                    lb_row *rw = &rows[nrows++];
                    snprintf(rw->model, sizeof rw->model, "%s", lab_models[mi].name);
                    rw->T = T;
                    static const char *ex[] = {"auto", "auto small", "auto aligned", "auto no-pdl", "auto fused"};
                    if (k < nt)
                        snprintf(rw->variant, sizeof rw->variant, "%d %s %dx%d", pi + 1, path_name(paths[pi]),
                                 (int)nwg, (int)bn);
                    else
                        snprintf(rw->variant, sizeof rw->variant, "%d %s %s", pi + 1, path_name(paths[pi]),
                                 ex[k - nt]);
                    rw->us = us;
                    rw->is_auto = k == nt;
                    fprintf(stderr, "lab: %s T=%lld %s: %.1f us\n", rw->model, (long long)T, rw->variant, rw->us);
                }
                LB_CHECK(kern_cuda_set_small_max(gpu, 64));
                LB_CHECK(kern_cuda_set_fused(gpu, false));
                LB_CHECK(kern_cuda_set_pdl(gpu, prop.major >= 9));
            }
            LB_CHECK(kern_cuda_set_tile(gpu, 0, 0));
            LB_CHECK(kern_cuda_set_path(gpu, KERN_CUDA_PATH_AUTO));
        }
        lab_bufs_free(&b);
    }
    printf("\npart 2: times (median, L2 flushed, %s)\n| model | T | variant | us |\n|---|---|---|---|\n", prop.name);
    for (int i = 0; i < nrows; i++)
        printf("| %s | %lld | %s | %.1f%s |\n", rows[i].model, (long long)rows[i].T, rows[i].variant, rows[i].us,
               rows[i].is_auto ? " (auto)" : "");
    free(rows);
    lab_timer_free(&tm);
    kern_ctx_free(gpu);
    kern_ctx_free(cpu);
    if (bad)
        printf("part 1 FAILED for %d variant(s): those were not timed\n", bad);
    return bad ? 1 : 0;
}
