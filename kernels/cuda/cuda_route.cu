/*
 * cuda_route.cu: routing on the device (kern_route): softmax or sigmoid scores, optional
 * correction bias (selection only), group-limited selection (max or top-2-sum group scores),
 * top-k, renormalization and scaling. One warp per token; the token's scores live in shared
 * memory. Selection follows kern_topk_indices exactly: larger first, equal values to the
 * lower index, NaN below every number (but still taken when nothing else is left), so the ids
 * equal the CPU reference's whenever the scores do.
 *
 * Threads: a block of KC_RT_WARPS warps, one token each; no state outside the launch.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/kc_device.cuh"
#include "kernels/cuda/kern_cuda_impl.h"

#define KC_RT_WARPS 4

/* a (value va, index ia) ranks before b? Index -1 means "no candidate". */
static __device__ __forceinline__ bool kc_better(float va, int ia, float vb, int ib) {
    if (ia < 0)
        return false;
    if (ib < 0)
        return true;
    const bool na = isnan(va), nbn = isnan(vb);
    if (na || nbn) {
        if (na && nbn)
            return ia < ib;
        return nbn;
    }
    if (va != vb)
        return va > vb;
    return ia < ib;
}

/* A score's rank as an unsigned key, the order of kc_better: larger is better, every number
 * (>= 2) above NaN (1), 0 for no candidate; -0.0 ranks as +0.0, so that equal values tie (and
 * the lower id wins). */
static __device__ __forceinline__ uint32_t kc_rank_key(float v) {
    if (isnan(v))
        return 1u;
    uint32_t u = __float_as_uint(v);
    if (u == 0x80000000u)
        u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* This lane's best expert (key *bk, id *bi; 0 and -1 if none) among e = lane + 32 j not taken
 * (bit j of `taken`) and in a kept group (bit e / per of `kept` when per < E): the first of the
 * largest keys, so the lower id among equals. */
static __device__ __forceinline__ void kc_lane_best(const uint32_t *key, int E, int lane, int per, uint64_t kept,
                                                    uint32_t taken, uint32_t &bk, int &bi) {
    bk = 0u;
    bi = -1;
    for (int j = 0, e = lane; e < E; j++, e += 32) {
        if ((taken >> j) & 1u)
            continue;
        if (per < E && !((kept >> (e / per)) & 1ull))
            continue;
        if (key[e] > bk) {
            bk = key[e];
            bi = e;
        }
    }
}

static __device__ __forceinline__ void kc_warp_best(float &v, int &i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        if (kc_better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

typedef struct kc_route_dev {
    int32_t E, K, scoring, group_mode, n_group, topk_group, renormalize;
    float scale;
    const float *bias;
} kc_route_dev;

template <typename T>
__global__ void kc_route_kernel(const T *logits, int64_t T_, kc_route_dev p, int32_t *ids, float *wout) {
    extern __shared__ float rsm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t t = (int64_t)blockIdx.x * KC_RT_WARPS + warp;
    if (t >= T_)
        return;
    const int E = p.E;
    float *score = rsm + (size_t)warp * 2 * E;
    float *choice = score + E;
    const T *row = logits + t * E;

    /* Scores. */
    if (p.scoring == KERN_SCORE_SIGMOID) {
        for (int e = lane; e < E; e += 32)
            score[e] = 1.0f / (1.0f + expf(-kc_ld<T>(row, e)));
    } else {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32)
            m = fmaxf(m, kc_ld<T>(row, e));
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float s = 0.0f;
        for (int e = lane; e < E; e += 32) {
            const float v = expf(kc_ld<T>(row, e) - m);
            score[e] = v;
            s += v;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, off);
        for (int e = lane; e < E; e += 32)
            score[e] = score[e] / s;
    }
    for (int e = lane; e < E; e += 32)
        choice[e] = score[e] + (p.bias ? p.bias[e] : 0.0f);
    __syncwarp();

    /* Groups: a bit mask of the kept groups (n_group <= 64, checked by the host). */
    uint64_t kept = ~0ull;
    int per = E;
    if (p.group_mode != KERN_GROUP_NONE && p.n_group > 1) {
        const int G = p.n_group;
        per = E / G;
        float gsc0 = 0.0f, gsc1 = 0.0f; /* this lane's groups lane and lane + 32 */
        for (int gg = 0; gg < 2; gg++) {
            const int g = lane + 32 * gg;
            if (g >= G)
                break;
            const float *c = choice + g * per;
            float v;
            if (p.group_mode == KERN_GROUP_MAX) {
                v = c[0];
                for (int i = 1; i < per; i++)
                    if (c[i] > v)
                        v = c[i];
            } else {
                int b0 = -1, b1 = -1;
                for (int i = 0; i < per; i++)
                    if (kc_better(c[i], i, b0 >= 0 ? c[b0] : 0.0f, b0))
                        b0 = i;
                for (int i = 0; i < per; i++)
                    if (i != b0 && kc_better(c[i], i, b1 >= 0 ? c[b1] : 0.0f, b1))
                        b1 = i;
                v = c[b0] + c[b1];
            }
            if (gg == 0)
                gsc0 = v;
            else
                gsc1 = v;
        }
        kept = 0;
        for (int j = 0; j < p.topk_group; j++) {
            float bv = 0.0f;
            int bi = -1;
            if (lane < G && !((kept >> lane) & 1ull) && kc_better(gsc0, lane, bv, bi)) {
                bv = gsc0;
                bi = lane;
            }
            if (lane + 32 < G && !((kept >> (lane + 32)) & 1ull) && kc_better(gsc1, lane + 32, bv, bi)) {
                bv = gsc1;
                bi = lane + 32;
            }
            kc_warp_best(bv, bi);
            if (bi >= 0)
                kept |= 1ull << bi;
        }
    }

    /* Top-k among the kept experts. The scores become rank keys (kc_rank_key: the order of
     * kc_better as unsigned integers) in place; each lane holds its best candidate among its own
     * experts (lane, lane + 32, ...: not taken, in a kept group); a round takes the warp's
     * largest key and, among the lanes that hold it, the lowest id (two warp reductions), and
     * only the lane that owned it looks again. The same choice as a scan of every expert per
     * round: engine run 34 measured that scan at 12 us for one Qwen3 token (ncu), the same with
     * shuffle reductions through kc_better at 8.8 us, one warp issuing every 7 cycles (run 40). */
    __syncwarp(); /* the groups' reads of choice[] are done */
    uint32_t *key = (uint32_t *)choice;
    for (int e = lane; e < E; e += 32)
        key[e] = kc_rank_key(choice[e]);
    int my_sel = -1;
    const int K = p.K;
    uint32_t taken = 0; /* bit j: expert lane + 32 j (E <= 1024) */
    uint32_t ck;
    int ci;
    kc_lane_best(key, E, lane, per, kept, taken, ck, ci);
    for (int k = 0; k < K; k++) {
        const uint32_t kmax = __reduce_max_sync(0xffffffffu, ck);
        const int bi = kmax ? (int)__reduce_min_sync(0xffffffffu, ck == kmax ? (uint32_t)ci : 0xffffffffu) : -1;
        if (lane == k)
            my_sel = bi;
        if (bi >= 0 && (bi & 31) == lane) {
            taken |= 1u << (bi >> 5);
            kc_lane_best(key, E, lane, per, kept, taken, ck, ci);
        }
    }
    /* Weights: the sum in slot order, like the reference. */
    const float sv = my_sel >= 0 ? score[my_sel] : 0.0f;
    float sum = 0.0f;
    for (int k = 0; k < K; k++)
        sum += __shfl_sync(0xffffffffu, sv, k);
    if (lane < K) {
        float v = sv;
        if (p.renormalize && sum > 0.0f)
            v /= sum;
        ids[t * K + lane] = my_sel;
        wout[t * K + lane] = v * p.scale;
    }
}

extern "C" int kc_launch_route(const kern_route_params *p, const void *logits, int32_t dtype, int64_t T,
                               int32_t *ids, float *w, cudaStream_t st) {
    kc_route_dev d;
    d.E = p->n_experts;
    d.K = p->top_k;
    d.scoring = p->scoring;
    d.group_mode = p->group_mode;
    d.n_group = p->n_group;
    d.topk_group = p->topk_group;
    d.renormalize = p->renormalize ? 1 : 0;
    d.scale = p->routed_scaling_factor;
    d.bias = p->correction_bias;
    const size_t smem = (size_t)KC_RT_WARPS * 2 * (size_t)d.E * sizeof(float);
    const unsigned grid = (unsigned)((T + KC_RT_WARPS - 1) / KC_RT_WARPS);
    /* E <= KC_ROUTE_MAX_E keeps this under the default 48 KB of dynamic shared memory. */
    switch (dtype) {
    case MOE_DTYPE_F32:
        kc_route_kernel<float><<<grid, 32 * KC_RT_WARPS, smem, st>>>((const float *)logits, T, d, ids, w);
        break;
    case MOE_DTYPE_F16:
        kc_route_kernel<__half><<<grid, 32 * KC_RT_WARPS, smem, st>>>((const __half *)logits, T, d, ids, w);
        break;
    case MOE_DTYPE_BF16:
        kc_route_kernel<__nv_bfloat16>
            <<<grid, 32 * KC_RT_WARPS, smem, st>>>((const __nv_bfloat16 *)logits, T, d, ids, w);
        break;
    default:
        return (int)cudaErrorInvalidValue;
    }
    return (int)cudaGetLastError();
}

/* ---- router logits ------------------------------------------------------------------------
 * logits[t, e] = sum_h x[t, h] * router[e, h] in fp32. Each logit is one fixed-order sum: lane l
 * of a warp sums h = l, l + 32, l + 64, ... in increasing order (one fused multiply-add each),
 * then a fixed xor-tree over the 32 lanes (offsets 16, 8, 4, 2, 1). The order depends on
 * nothing but H: a row's logits never depend on the other rows, on the grid or on the tile.
 *
 * A warp computes a tile of TT tokens x TE experts, reading x and the router straight from
 * global memory (L1 and L2 hold the reused rows: a CTA's warps share their token tile, and the
 * router, E H fp32 = 1 MiB for Qwen3, stays in the L2), U steps of its h-sequence at a time:
 * the U (TT + TE) loads of a batch are all issued before its first multiply-add, so a lane keeps
 * 24-32 loads in flight. The host picks the largest tile that still gives every SM about 16
 * warps (T = 1: one expert per warp, 128 warps for Qwen3; T >= 528: 8 x 8 tiles).
 * Engine runs 34-42 measured the old kernel (token rows staged in shared memory one load at a
 * time, one expert per warp, an unrolled check per token slot) at 9-10 us (ncu) for T = 1 and
 * 104 us for T = 1024: latency-bound at both ends (ncu: 8 cycles per issue, 13 of 32 threads
 * not predicated off). */
#define KC_RL_THREADS 128

template <typename T, int TT, int TE, int U>
__global__ void __launch_bounds__(KC_RL_THREADS)
    kc_router_logits_kernel(const T *__restrict__ x, const float *__restrict__ router, float *__restrict__ logits,
                            int n_tok, int E, int H, int n_et) {
    const int lane = threadIdx.x & 31;
    const int64_t w = (int64_t)blockIdx.x * (KC_RL_THREADS / 32) + (threadIdx.x >> 5);
    const int64_t n_tt = ((int64_t)n_tok + TT - 1) / TT;
    if (w >= n_tt * n_et)
        return;
    /* the expert tile varies fastest: a CTA's warps share one token tile */
    const int e0 = (int)(w % n_et) * TE;
    const int64_t t0 = (w / n_et) * TT;
    const T *xr[TT];
    const float *rr[TE];
#pragma unroll
    for (int j = 0; j < TT; j++) {
        const int64_t t = t0 + j < n_tok ? t0 + j : n_tok - 1; /* a tail tile reads the last row, stores nothing */
        xr[j] = x + t * H;
    }
#pragma unroll
    for (int k = 0; k < TE; k++) {
        const int e = e0 + k < E ? e0 + k : E - 1;
        rr[k] = router + (int64_t)e * H;
    }
    float acc[TT][TE];
#pragma unroll
    for (int j = 0; j < TT; j++)
#pragma unroll
        for (int k = 0; k < TE; k++)
            acc[j][k] = 0.0f;
    int h = lane;
    for (; h + 32 * (U - 1) < H; h += 32 * U) {
        float xv[U][TT], rv[U][TE];
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int j = 0; j < TT; j++)
                xv[u][j] = kc_ld<T>(xr[j], h + 32 * u);
#pragma unroll
            for (int k = 0; k < TE; k++)
                rv[u][k] = __ldg(rr[k] + h + 32 * u);
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int j = 0; j < TT; j++)
#pragma unroll
                for (int k = 0; k < TE; k++)
                    acc[j][k] = fmaf(xv[u][j], rv[u][k], acc[j][k]);
    }
    for (; h < H; h += 32) {
        float xv[TT], rv[TE];
#pragma unroll
        for (int j = 0; j < TT; j++)
            xv[j] = kc_ld<T>(xr[j], h);
#pragma unroll
        for (int k = 0; k < TE; k++)
            rv[k] = __ldg(rr[k] + h);
#pragma unroll
        for (int j = 0; j < TT; j++)
#pragma unroll
            for (int k = 0; k < TE; k++)
                acc[j][k] = fmaf(xv[j], rv[k], acc[j][k]);
    }
#pragma unroll
    for (int j = 0; j < TT; j++)
#pragma unroll
        for (int k = 0; k < TE; k++) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[j][k] += __shfl_xor_sync(0xffffffffu, acc[j][k], off);
            /* every lane holds the sum; the tile's outputs are spread over the lanes to store */
            if (lane == ((j * TE + k) & 31) && t0 + j < n_tok && e0 + k < E)
                logits[(t0 + j) * E + e0 + k] = acc[j][k];
        }
}

/* The warp tiles (TT tokens x TE experts, U steps a batch), largest first. */
#define KC_RL_TILES(X) X(8, 8, 2) X(8, 4, 3) X(4, 4, 4) X(4, 2, 5) X(2, 2, 8) X(2, 1, 10) X(1, 1, 32)

extern "C" int kc_router_logits_tiles(int32_t *out, int32_t cap) {
    int32_t n = 0;
#define KC_RL_LIST(TT_, TE_, U_)                                                                                  \
    if (n < cap) {                                                                                                \
        out[2 * n] = TT_;                                                                                         \
        out[2 * n + 1] = TE_;                                                                                     \
    }                                                                                                             \
    n++;
    KC_RL_TILES(KC_RL_LIST)
#undef KC_RL_LIST
    return n;
}

extern "C" int kc_launch_router_logits(int32_t dtype, const void *x, const float *router, float *logits, int64_t T,
                                       int64_t E, int64_t H, int tile, int n_sm, cudaStream_t st) {
    if (T < 1 || E < 1 || H < 1 || T > 0x7fffffff || E > 0x7fffffff || H > 0x7fffffff)
        return (int)cudaErrorInvalidValue;
    const int64_t want = 16 * (int64_t)(n_sm > 0 ? n_sm : 132); /* warps: about 16 per SM */
    int tt = 0, te = 0, i = 0;
#define KC_RL_PICK(TT_, TE_, U_)                                                                                  \
    if (tile >= 0 ? i == tile                                                                                     \
                  : tt == 0 && (TT_ == 1 || (TT_ <= T && ((T + TT_ - 1) / TT_) * ((E + TE_ - 1) / TE_) >= want))) { \
        tt = TT_;                                                                                                 \
        te = TE_;                                                                                                 \
    }                                                                                                             \
    i++;
    KC_RL_TILES(KC_RL_PICK)
#undef KC_RL_PICK
    if (tt == 0)
        return (int)cudaErrorInvalidValue;
    const int64_t n_et = (E + te - 1) / te, warps = ((T + tt - 1) / tt) * n_et;
    const int64_t ctas = (warps + KC_RL_THREADS / 32 - 1) / (KC_RL_THREADS / 32);
    if (ctas > 0x7fffffff)
        return (int)cudaErrorInvalidValue;
#define KC_RL_LAUNCH(TT_, TE_, U_)                                                                                \
    if (tt == TT_ && te == TE_) {                                                                                 \
        kc_router_logits_kernel<TY, TT_, TE_, U_><<<(unsigned)ctas, KC_RL_THREADS, 0, st>>>(                      \
            (const TY *)x, router, logits, (int)T, (int)E, (int)H, (int)n_et);                                    \
        return (int)cudaGetLastError();                                                                           \
    }
    switch (dtype) {
    case MOE_DTYPE_F32: {
        typedef float TY;
        KC_RL_TILES(KC_RL_LAUNCH)
        break;
    }
    case MOE_DTYPE_F16: {
        typedef __half TY;
        KC_RL_TILES(KC_RL_LAUNCH)
        break;
    }
    case MOE_DTYPE_BF16: {
        typedef __nv_bfloat16 TY;
        KC_RL_TILES(KC_RL_LAUNCH)
        break;
    }
    default:
        break;
    }
#undef KC_RL_LAUNCH
    return (int)cudaErrorInvalidValue;
}
