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

template <typename T> static __device__ __forceinline__ float kc_ld(const T *p, int64_t i);
template <> __device__ __forceinline__ float kc_ld<float>(const float *p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float kc_ld<__half>(const __half *p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float kc_ld<__nv_bfloat16>(const __nv_bfloat16 *p, int64_t i) {
    return __bfloat162float(p[i]);
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
 * logits[t, e] = sum_h x[t, h] * router[e, h] in fp32. A CTA holds up to KC_RL_TOK token rows in
 * shared memory as fp32 and its warps take experts in turn: a warp reads one router row once for
 * all of the CTA's tokens; lane l sums h = l, l + 32, ... in order, then a fixed xor-tree over the
 * lanes. The order depends on nothing but H: a row's logits never depend on the other rows, on
 * the grid or on how many tokens share a CTA. The grid spreads the experts over CTAs (blockIdx.y)
 * until there are about two CTAs per SM, so a few tokens read the router (E H fp32: 1 MiB for
 * Qwen3) over many SMs instead of one (one CTA per token took 88 us at T = 1 on an H200). */
#define KC_RL_THREADS 256
#define KC_RL_TOK 8
#define KC_RL_SMEM (96 * 1024) /* the token rows' budget: two CTAs per SM */

template <typename T>
__global__ void __launch_bounds__(KC_RL_THREADS)
    kc_router_logits_kernel(const T *x, const float *router, float *logits, int64_t T_, int64_t E, int64_t H,
                            int tok) {
    extern __shared__ float xs[]; /* [tok][H] */
    const int64_t t0 = (int64_t)blockIdx.x * tok;
    const int nt = (int)(T_ - t0 < tok ? T_ - t0 : tok);
    for (int64_t i = threadIdx.x; i < (int64_t)nt * H; i += KC_RL_THREADS)
        xs[i] = kc_ld<T>(x + t0 * H, i);
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t wstep = (int64_t)gridDim.y * (KC_RL_THREADS / 32);
    for (int64_t e = (int64_t)blockIdx.y * (KC_RL_THREADS / 32) + warp; e < E; e += wstep) {
        const float *r = router + e * H;
        float acc[KC_RL_TOK];
#pragma unroll
        for (int j = 0; j < KC_RL_TOK; j++)
            acc[j] = 0.0f;
        for (int64_t h = lane; h < H; h += 32) {
            const float rv = r[h];
#pragma unroll
            for (int j = 0; j < KC_RL_TOK; j++)
                if (j < nt)
                    acc[j] += xs[(int64_t)j * H + h] * rv;
        }
#pragma unroll
        for (int j = 0; j < KC_RL_TOK; j++) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
            if (lane == 0 && j < nt)
                logits[(t0 + j) * E + e] = acc[j];
        }
    }
}

extern "C" int kc_launch_router_logits(int32_t dtype, const void *x, const float *router, float *logits, int64_t T,
                                       int64_t E, int64_t H, cudaStream_t st) {
    const size_t row = (size_t)H * sizeof(float);
    if (row > 200 * 1024)
        return (int)cudaErrorInvalidValue;
    int tok = (int)(KC_RL_SMEM / row);
    tok = tok < 1 ? 1 : (tok > KC_RL_TOK ? KC_RL_TOK : tok);
    if (T < tok)
        tok = (int)T;
    const size_t smem = row * (size_t)tok;
    int dev = 0, n_sm = 132;
    if (cudaGetDevice(&dev) == cudaSuccess)
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
    const int64_t gx = (T + tok - 1) / tok, wpc = KC_RL_THREADS / 32, max_gy = (E + wpc - 1) / wpc;
    int64_t gy = (2 * (int64_t)n_sm + gx - 1) / gx;
    gy = gy < 1 ? 1 : (gy > max_gy ? max_gy : gy);
    if (gx > 0x7fffffff || gy > 65535)
        return (int)cudaErrorInvalidValue;
    const dim3 grid((unsigned)gx, (unsigned)gy);
    cudaError_t e = cudaSuccess;
#define KC_RL_CASE(DT, TY)                                                                                        \
    case DT:                                                                                                      \
        if (smem > 48 * 1024)                                                                                     \
            e = cudaFuncSetAttribute(kc_router_logits_kernel<TY>, cudaFuncAttributeMaxDynamicSharedMemorySize,  \
                                     (int)smem);                                                                  \
        if (e == cudaSuccess)                                                                                     \
            kc_router_logits_kernel<TY><<<grid, KC_RL_THREADS, smem, st>>>((const TY *)x, router, logits, T, E, \
                                                                          H, tok);                               \
        break;
    switch (dtype) {
        KC_RL_CASE(MOE_DTYPE_F32, float)
        KC_RL_CASE(MOE_DTYPE_F16, __half)
        KC_RL_CASE(MOE_DTYPE_BF16, __nv_bfloat16)
    default:
        return (int)cudaErrorInvalidValue;
    }
#undef KC_RL_CASE
    if (e != cudaSuccess)
        return (int)e;
    return (int)cudaGetLastError();
}
