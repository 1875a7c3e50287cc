/*
 * gemm.cuh: the grouped matrix product of the fused experts, one template for both products
 * (gate-up with the gated activation in its epilogue, down with the routing weight) and both
 * instruction paths (wgmma on sm_90a, mma.sync on sm_80 and newer).
 *
 * Orientation ("swap-AB"): the weights are the A operand (M side, 128 weight rows per
 * warpgroup), the routed rows are the B operand (N side, BN = 8 .. 128 rows per tile). At small
 * T a tile holds the few rows of one expert and the kernel streams weight rows over all SMs; at
 * large T the same kernel is a 256 x 128 tile product. Every configuration computes each output
 * element the same way: one accumulator that starts at +0.0, the K dimension walked in 64-wide
 * blocks in ascending order, each block as 4 k16 steps in ascending order, never split. So a
 * row's bits do not depend on T, on BN, on NWG nor on the rows it shares a tile with (kern.h:
 * row independence), within one instruction path.
 *
 * Shared memory: STAGES slots, each [A rows x 64] + [BN x 64] of 16-bit elements, rows of 128
 * bytes in the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r & 7)), the layout
 * that wgmma descriptors (layout type 1) and conflict-free ldmatrix both read. Loads are
 * cp.async 16 B, issued S-2 blocks ahead; zero-filled past K, past M and for padding rows.
 * The large tile on sm_90a is kc_gemm_tma_kernel (below, tile (5, 128)): the same tile and
 * stages, its weight stages written by the bulk tensor copy engine, with a producer warpgroup
 * and an mbarrier pipeline; kc_gemm_tmap_kernel (tile (8, 128), chosen from 22-49 rows per
 * expert up) is the same in a persistent grid whose tiles are handed out as CTAs ask. Both cut
 * a tile's wgmma N to the columns it uses (kc_ws_consume): the padding columns of an expert's
 * last block cost no tensor work, and a column's bits do not depend on N.
 *
 * Threads: 128 * NWG; warpgroup g owns weight rows [128 g, 128 g + 128) of the tile as two
 * 64-row accumulators (gate-up: gate rows j and up rows I + j, so that a thread holds both
 * halves of its activation; down: two consecutive 64-row blocks of H).
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kern_cuda_impl.h"
#include "kernels/cuda/kc_device.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KC_HAVE_WGMMA 1
#include "kernels/cuda/wgmma_ops.cuh"
#endif
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define KC_HAVE_MMA 1
#endif

#define KC_BK 64

/* ---- element types ------------------------------------------------------------------- */
template <typename T> struct kc_elem;
template <> struct kc_elem<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
template <> struct kc_elem<__half> {
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};

/* The activations. GELU as kern_act_f32 in kern.c (accurate tanhf, erff). SiLU x / (1 + e^-x)
 * by the special function unit: 2^(-x log2 e) and the reciprocal of 1 + that, both approximate
 * (relative error about 1e-6, far below a bf16 or fp16 output's rounding; vLLM's fused kernels
 * compile expf and the division the same way). Until run 61 it was the IEEE division of an
 * accurate expf: 25-30 instructions an element, 13% of Qwen3-30B-A3B's products at T = 8192
 * (MOE_CUDA_LAB_BREAK=16). Every GPU path computes it here, so the tiles still agree bit for
 * bit; the CPU backend keeps the exact form (the two agree within the tests' tolerance). */
static __device__ __forceinline__ float kc_act(int act, float x) {
    if (act == KERN_ACT_SILU) {
        float e, r;
        asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(e) : "f"(x * -1.4426950408889634f));
        asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.0f + e));
        return x * r;
    }
    if (act == KERN_ACT_GELU_TANH) {
        const float k0 = 0.7978845608028654f;
        return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
    }
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

/* ---- async copies and fences ---------------------------------------------------------- */
static __device__ __forceinline__ void kc_cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
/* The same for weight rows, with a 256-byte L2 prefetch: a row's next 128 bytes are the next
 * stage's, so DRAM serves them in one longer burst. */
static __device__ __forceinline__ void kc_cp_async16_w(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
static __device__ __forceinline__ void kc_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> static __device__ __forceinline__ void kc_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
static __device__ __forceinline__ void kc_fence_proxy_async() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* ---- mma.sync path -------------------------------------------------------------------- */
template <typename T> struct kc_mma;
template <> struct kc_mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
#ifdef KC_HAVE_MMA
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};
template <> struct kc_mma<__half> {
    static __device__ __forceinline__ void run(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
#ifdef KC_HAVE_MMA
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

static __device__ __forceinline__ void kc_ldsm_x4(uint32_t addr, uint32_t *r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
static __device__ __forceinline__ void kc_ldsm_x2(uint32_t addr, uint32_t *r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

/* Byte offset of 16-byte chunk c of row r in a 128-byte-swizzled tile. */
static __device__ __forceinline__ uint32_t kc_swz(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

/* ---- wgmma path ----------------------------------------------------------------------- */
#ifdef KC_HAVE_WGMMA
/* Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart. */
static __device__ __forceinline__ uint64_t kc_desc(uint32_t saddr) {
    uint64_t d = 0;
    d |= (uint64_t)((saddr & 0x3FFFF) >> 4);
    d |= (uint64_t)(16 >> 4) << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}
static __device__ __forceinline__ void kc_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void kc_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> static __device__ __forceinline__ void kc_wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

template <typename T, int BN> struct kc_wgmma_op;
#define KC_WG_OP(TY, SUF, N)                                                                          \
    template <> struct kc_wgmma_op<TY, N> {                                                           \
        static __device__ __forceinline__ void run(float *d, uint64_t a, uint64_t b) {               \
            kc_wgmma_m64n##N##k16_##SUF(d, a, b);                                                     \
        }                                                                                             \
    };
KC_WG_OP(__nv_bfloat16, bf16, 8)
KC_WG_OP(__nv_bfloat16, bf16, 16)
KC_WG_OP(__nv_bfloat16, bf16, 32)
KC_WG_OP(__nv_bfloat16, bf16, 48)
KC_WG_OP(__nv_bfloat16, bf16, 64)
KC_WG_OP(__nv_bfloat16, bf16, 80)
KC_WG_OP(__nv_bfloat16, bf16, 96)
KC_WG_OP(__nv_bfloat16, bf16, 112)
KC_WG_OP(__nv_bfloat16, bf16, 128)
KC_WG_OP(__half, f16, 8)
KC_WG_OP(__half, f16, 16)
KC_WG_OP(__half, f16, 32)
KC_WG_OP(__half, f16, 48)
KC_WG_OP(__half, f16, 64)
KC_WG_OP(__half, f16, 80)
KC_WG_OP(__half, f16, 96)
KC_WG_OP(__half, f16, 112)
KC_WG_OP(__half, f16, 128)
#undef KC_WG_OP
#endif

/* ---- the kernel ------------------------------------------------------------------------ */
/* Accumulator blocks of 64 weight rows per warpgroup: 2 for gate-up (gate and up), 2 for down
 * except with the smallest column tiles, where 1 block (64 rows of H per warpgroup) doubles
 * the CTAs that stream W2 at small T (lab run 4: the down product at T = 1 had too few). */
__host__ __device__ constexpr int kc_accb(int mode, int bn) { return (mode == KC_MODE_DOWN && bn <= 16) ? 1 : 2; }

template <int NWG, int BN, int ACCB = 2> struct kc_tile {
    static constexpr int threads = 128 * NWG;
    static constexpr int a_rows = 64 * ACCB * NWG;
    static constexpr int a_bytes = a_rows * 128;
    static constexpr int b_bytes = BN * 128;
    static constexpr int stage_bytes = a_bytes + b_bytes;
    /* As many stages as fit in ~200 KB, between 4 and 8: the small tiles are memory-bound
     * and want bytes in flight, the large ones fit 4. (Run 15 measured 4 stages for the small
     * down tiles, so that all of their CTAs fit beside gate-up at T = 1: 1-2 us slower.) */
    static constexpr int stages_fit = (200 * 1024) / stage_bytes;
    static constexpr int stages = stages_fit > 8 ? 8 : (stages_fit < 4 ? 4 : stages_fit);
    static constexpr int smem = stages * stage_bytes + 1024; /* + alignment slack */
};

/* Rows of the grid grouped GR at a time so that the CTAs in flight share weight tiles and
 * token tiles in L2 (rb fastest inside a group, then the token block, then the group). */
#define KC_RASTER_GROUP 8

/* Tile v of the raster order (KC_RASTER_GROUP row blocks, then the column blocks, then the
 * group), over n_rb row blocks and nbv column blocks. */
static __device__ __forceinline__ void kc_raster(int v, int n_rb, int nbv, int &nb, int &rb) {
    const int gsz_full = KC_RASTER_GROUP < n_rb ? KC_RASTER_GROUP : n_rb;
    const int gi = v / (gsz_full * nbv);
    const int g0 = gi * gsz_full;
    const int gs = (n_rb - g0) < gsz_full ? (n_rb - g0) : gsz_full;
    const int local = v - gi * gsz_full * nbv;
    nb = local / gs;
    rb = g0 + local % gs;
}

/* Column pos (= column block x BN + column) of an aligned or dense product: src, where its
 * routed row starts (bi: that row's index in b); orow, its output row; sc, its scale. A
 * padding column: nullptr, -1, 1.0f. */
struct kc_col {
    const char *src;
    int orow, bi;
    float sc;
};
template <typename T> static __device__ __forceinline__ kc_col kc_col_of(const kc_gemm_args &a, int pos, int K) {
    kc_col c = {nullptr, -1, -1, 1.0f};
    if (a.dense) {
        if (pos < a.n_dense) {
            c.bi = pos;
            c.src = (const char *)a.b + (size_t)pos * K * sizeof(T);
            c.orow = pos;
            if (a.row_scale)
                c.sc = a.row_scale[pos];
        }
    } else {
        const int pair = a.sorted_rows[pos];
        if (pair >= 0) {
            const int brow = a.b_by_pos ? pos : pair / a.b_div;
            c.bi = brow;
            c.src = (const char *)a.b + (size_t)brow * K * sizeof(T);
            c.orow = a.out_by_pos ? pos : pair;
            if (a.topk_w)
                c.sc = a.topk_w[pair];
        }
    }
    return c;
}

/* The weight row that A row r of a tile loads (row0: the tile's first output row; M: the rows
 * of the product), and in ok whether it is one (< M): gate-up, warpgroup g's rows
 * 128 g + 64 blk + i are gate (blk 0) or up (blk 1) row of output row0 + 64 g + i, the up rows
 * M further in the weights; down, output row row0 + r. */
template <int MODE> static __device__ __forceinline__ int kc_wrow_of(int r, int row0, int M, bool &ok) {
    if (MODE == KC_MODE_GATE_UP) {
        const int wg = r >> 7, blk = (r >> 6) & 1, ii = r & 63;
        const int j = row0 + wg * 64 + ii;
        ok = j < M;
        return blk * M + j;
    }
    const int h = row0 + r;
    ok = h < M;
    return h;
}

/* Local slot of pair p's expert, or -1 (held elsewhere, or a bad id / map entry). */
static __device__ __forceinline__ int kc_local_of(const kc_gemm_args &a, int p) {
    return kc_local_slot(a.ids, a.map, a.n_experts, a.n_local, p);
}

/* The fused small-T launch (kc_small_fused_kernel) runs gate-up and down tiles in one
 * persistent grid: a down tile waits until every gate-up tile of its expert has signalled a
 * counter (ctr[first pair of the expert] == (seq << 32) | target); seq is new for each call,
 * so the counters never need zeroing. */
typedef struct kc_fuse_sync {
    int fused;
    unsigned long long *ctr;
    uint32_t seq;
    int target;
} kc_fuse_sync;

static __device__ __forceinline__ void kc_fuse_signal(unsigned long long *p, uint32_t seq) {
    unsigned long long old = *(volatile unsigned long long *)p;
    for (;;) {
        const unsigned long long nv = (uint32_t)(old >> 32) == seq ? old + 1 : (((unsigned long long)seq << 32) | 1ull);
        const unsigned long long prev = atomicCAS(p, old, nv);
        if (prev == old)
            break;
        old = prev;
    }
}

static __device__ __forceinline__ void kc_fuse_wait(const unsigned long long *p, uint32_t seq, int target) {
    const unsigned long long want = ((unsigned long long)seq << 32) | (unsigned)target;
    while (*(volatile const unsigned long long *)p != want)
        __nanosleep(64);
    __threadfence();
}

/* ---- small-T extras (kc_gemm_args: pf_*, evict_first, fold_*; docs/PERF.md runs 15-16) ---- */
/* The weight load of kc_cp_async16_w with an L2 cache policy (evict_first: streamed once). */
static __device__ __forceinline__ void kc_cp_async16_w_pol(uint32_t dst, const void *src, bool valid, uint64_t pol) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0), "l"(pol));
}
static __device__ __forceinline__ uint64_t kc_policy_evict_first() {
    uint64_t pol = 0;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
#endif
    return pol;
}
static __device__ __forceinline__ uint64_t kc_policy_evict_last() {
    uint64_t pol = 0;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol));
#endif
    return pol;
}
/* Bulk prefetch of [p, p + bytes) into the L2 with a cache policy (p and bytes multiples of 16;
 * sm_90). */
static __device__ __forceinline__ void kc_prefetch_l2(const void *p, uint32_t bytes, uint64_t pol) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;\n" ::"l"(p), "r"(bytes), "l"(pol)
                 : "memory");
#endif
}
/* Rows [r0, r1) of a row-major matrix of row_bytes per row into the L2 (evict_last: they must
 * outlive the gate-up stream; the down product's evict_first loads demote them again), the
 * last `tail` bytes of each row (tail == row_bytes: the rows are contiguous, in 16 KB pieces),
 * spread over the 32 lanes of the calling warp. */
#define KC_PF_PIECE 16384
static __device__ __forceinline__ void kc_prefetch_rows(const char *base, int r0, int r1, int row_bytes, int tail,
                                                        int lane) {
    if (r1 <= r0 || tail <= 0)
        return;
    const uint64_t pol = kc_policy_evict_last();
    if (tail >= row_bytes) {
        const char *p0 = base + (size_t)r0 * row_bytes;
        const size_t n = (size_t)(r1 - r0) * row_bytes;
        for (size_t off = (size_t)lane * KC_PF_PIECE; off < n; off += 32 * (size_t)KC_PF_PIECE)
            kc_prefetch_l2(p0 + off, (uint32_t)(n - off < KC_PF_PIECE ? n - off : KC_PF_PIECE), pol);
    } else {
        for (int r = r0 + lane; r < r1; r += 32)
            kc_prefetch_l2(base + (size_t)r * row_bytes + (row_bytes - tail), (uint32_t)tail, pol);
    }
}

/* Held pairs of token t (its slots whose expert is local and valid): the arrivals that its
 * fold counter waits for, one per held pair and row block. */
static __device__ __forceinline__ int kc_held_of_token(const kc_gemm_args &a, int t) {
    int n = 0;
    for (int k = 0; k < a.top_k; k++)
        n += kc_local_of(a, t * a.top_k + k) >= 0;
    return n;
}
/* One arrival on a fold counter; true for the arrival that completes `target`. */
static __device__ __forceinline__ bool kc_fold_arrive(unsigned long long *p, uint32_t seq, int target) {
    unsigned long long old = *(volatile unsigned long long *)p;
    for (;;) {
        const uint32_t cnt = (uint32_t)(old >> 32) == seq ? (uint32_t)old + 1u : 1u;
        const unsigned long long nv = ((unsigned long long)seq << 32) | cnt;
        const unsigned long long prev = atomicCAS(p, old, nv);
        if (prev == old)
            return (int)cnt == target;
        old = prev;
    }
}
/* y[t, r .. r + 7] = round(sum over the held slots k of t, ascending, from +0.0, of
 * slots[t K + k, r .. r + 7]): the arithmetic of kc_sum_kernel (fp32 additions in slot order,
 * one rounding), so the bits are those of the separate sum. The slots were written by other
 * CTAs: read through the L2 (ld.global.cg). */
template <typename T>
static __device__ __forceinline__ void kc_fold_sum8(const kc_gemm_args &a, int t, int r) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++)
        acc[i] = 0.0f;
    const T *slots = (const T *)a.out;
    /* Eight slots at a time: their loads issued together (run 15: one dependent load after
     * another cost the down product ~5 us at T = 1), the additions in slot order. */
    for (int k0 = 0; k0 < a.top_k; k0 += 8) {
        bool held[8];
        uint4 u[8];
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            held[kk] = k0 + kk < a.top_k && kc_local_of(a, t * a.top_k + k0 + kk) >= 0;
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            if (held[kk])
                u[kk] = __ldcg((const uint4 *)(slots + (size_t)(t * a.top_k + k0 + kk) * a.out_ld + r));
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            if (!held[kk])
                continue;
            const T *v = (const T *)&u[kk];
#pragma unroll
            for (int i = 0; i < 8; i++)
                acc[i] += kc_elem<T>::to_f(v[i]);
        }
    }
    uint4 o;
    T *ov = (T *)&o;
#pragma unroll
    for (int i = 0; i < 8; i++)
        ov[i] = kc_elem<T>::from_f(acc[i]);
    *(uint4 *)((T *)a.fold_y + (size_t)t * a.M + r) = o;
}

/* ---- the staged epilogue (kc_gemm_tile, kc_ws_epilogue) ---------------------------------
 * Through shared memory, so that the output stores are 16-byte and coalesced: the tile goes to
 * sC[n][r] in the free stages (kc_epi_stage), then each output row segment is written whole
 * (kc_epi_store); the caller puts a barrier of the tile's 128 NWG threads before each.
 * Rows of the tile (of an output row segment): gate-up 64 per warpgroup (act(gate) x up),
 * down 64 ACCB per warpgroup. */
__host__ __device__ constexpr int kc_epi_rows(int mode, int nwg, int accb) {
    return mode == KC_MODE_GATE_UP ? 64 * nwg : 64 * accb * nwg;
}

/* Warpgroup wg's accumulators to sC[n][r], rows padded to kc_epi_rows + 8 elements (16 B):
 * gate-up act(gate) x up, down scaled by s_scale[n]. Register 4 i + 2 hf + cb of a 64-row block
 * holds row 16 warp + lane/4 + 8 hf, column 8 i + 2 (lane % 4) + cb (the same layout for wgmma
 * and mma.sync). Columns from nv on (padding only; nv is the same for the whole tile) are
 * left out. */
template <typename T, int NWG, int BN, int ACCB, int MODE>
static __device__ __forceinline__ void kc_epi_stage(const kc_gemm_args &a, const float (&acc)[ACCB][BN / 2],
                                                    const float *s_scale, T *sC, int wg, int warp, int lane,
                                                    int nv = BN) {
    typedef kc_tile<NWG, BN, ACCB> TL;
    constexpr int PITCH = kc_epi_rows(MODE, NWG, ACCB) + 8; /* elements; 16 B pad */
    static_assert(BN * PITCH * sizeof(T) <= (size_t)TL::stages * TL::stage_bytes, "epilogue tile exceeds the stages");
#pragma unroll
    for (int i = 0; i < BN / 8; i++) {
        if (8 * i >= nv)
            break;
#pragma unroll
        for (int cb = 0; cb < 2; cb++) {
            const int n = 8 * i + 2 * (lane & 3) + cb;
            const float sc = s_scale[n];
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int rr = warp * 16 + (lane >> 2) + 8 * hf;
                const int reg = 4 * i + 2 * hf + cb;
                if (MODE == KC_MODE_GATE_UP) {
                    const float gt = acc[0][reg], up = acc[ACCB - 1][reg];
                    sC[n * PITCH + wg * 64 + rr] = kc_elem<T>::from_f(kc_act(a.act, gt) * up);
                } else {
#pragma unroll
                    for (int blk = 0; blk < ACCB; blk++) /* sc == 1.0f when unscaled: exact */
                        sC[n * PITCH + wg * 64 * ACCB + blk * 64 + rr] = kc_elem<T>::from_f(acc[blk][reg] * sc);
                }
            }
        }
    }
}

/* sC to the output: column n's rows of row block rb to output row s_orow[n] (none for a padding
 * column, nor past M, nor from nv on), one 16-byte chunk per thread t (0 .. 128 NWG - 1) at a
 * time. out and M are (T *)a.out and a.M as the caller holds them (kc_gemm_tile reads them once,
 * before its chunk loop: read here, they would be read again per chunk). */
template <typename T, int NWG, int BN, int ACCB, int MODE>
static __device__ __forceinline__ void kc_epi_store(const kc_gemm_args &a, T *out, int M, const T *sC,
                                                    const int32_t *s_orow, int rb, int t, int nv = BN) {
    constexpr int ROWS = kc_epi_rows(MODE, NWG, ACCB);
    constexpr int PITCH = ROWS + 8;
    constexpr int CPR = ROWS / 8; /* 16-byte chunks per output row segment */
    const int row0 = rb * ROWS;
    for (int idx = t; idx < nv * CPR; idx += 128 * NWG) {
        const int n = idx / CPR, c = idx % CPR;
        const int orow = s_orow[n];
        const int r = row0 + c * 8;
        if (orow < 0 || r >= M)
            continue;
        *(uint4 *)(out + (size_t)orow * a.out_ld + r) = *(const uint4 *)(sC + n * PITCH + c * 8);
    }
}

template <typename T, int NWG, int BN, int PATH, int MODE, bool DEEP = false>
__device__ __forceinline__ void kc_gemm_tile(const kc_gemm_args &a, const int nb, const int rb, const kc_fuse_sync fs) {
    constexpr int ACCB = kc_accb(MODE, BN);
    typedef kc_tile<NWG, BN, ACCB> TL;
    constexpr int S = TL::stages;
    constexpr bool DEEP_ = DEEP || PATH == KC_PATH_MMA; /* mma.sync is synchronous: its stages free at the barrier */
    constexpr int D = DEEP_ ? S - 1 : S - 2; /* prefetch distance */
    constexpr int NACC = BN / 2; /* accumulator registers per thread per 64-row block */
#if !defined(KC_HAVE_MMA)
    return;
#else
#if !defined(KC_HAVE_WGMMA)
    if (PATH == KC_PATH_WGMMA)
        return; /* not compiled for this architecture; the host never launches it there */
#endif
    __shared__ const char *s_bsrc[BN];
    __shared__ int32_t s_orow[BN];
    __shared__ float s_scale[BN];
    __shared__ int32_t s_list[KC_SMALL_MAX_PAIRS]; /* small mode: the pairs of this CTA's expert */
    __shared__ int32_t s_count;
    __shared__ int32_t s_last[BN]; /* fold: this CTA completed column n's token */
    extern __shared__ char smem_raw[];

    const int tid = threadIdx.x;
    const int M = a.M, K = a.K;
    const int rows_per_cta = MODE == KC_MODE_GATE_UP ? 64 * NWG : 64 * ACCB * NWG;

    /* The gate-up product reads what the previous kernel wrote (ids, the alignment) from the
     * start; the down product reads only routing data that was complete before the gate-up
     * product started, so it streams its first weight stages before waiting (below). */
    if (!fs.fused) {
        if (MODE == KC_MODE_GATE_UP)
            kc_pdl_wait();
        kc_pdl_trigger();
    }

    int expert = 0;
    int n_chunks = 1;
    const bool fold = MODE == KC_MODE_DOWN && !fs.fused && a.small && a.fold_y != nullptr;
    if (a.small) {
        /* CTA row nb is pair nb; it works only if nb is its expert's first pair. */
        const int e = kc_local_of(a, nb);
        /* Fold: a token none of whose pairs is held here gets +0.0 rows (as the separate sum
         * writes them), from the CTAs of its first slot, before anything else. */
        if (fold && nb % a.top_k == 0 && kc_held_of_token(a, nb / a.top_k) == 0) {
            const int t = nb / a.top_k;
            for (int c = tid; c < rows_per_cta / 8; c += TL::threads) {
                const int r = rb * rows_per_cta + c * 8;
                if (r < M)
                    *(uint4 *)((T *)a.fold_y + (size_t)t * M + r) = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        if (MODE == KC_MODE_GATE_UP && rb == 0 && tid == 0 && a.err.rec) {
            const int idv = a.ids[nb];
            const float wv = a.topk_w_check[nb];
            if (!isfinite(wv))
                kc_record_err(a.err, KC_ERR_WEIGHT, nb / a.top_k, nb % a.top_k, idv, wv);
            if (idv < 0 || idv >= a.n_experts)
                kc_record_err(a.err, KC_ERR_ID, nb / a.top_k, nb % a.top_k, idv, wv);
            else if (a.map && (a.map[idv] < -1 || a.map[idv] >= a.n_local))
                kc_record_err(a.err, KC_ERR_MAP, nb / a.top_k, nb % a.top_k, a.map[idv], wv);
        }
        if (e < 0)
            return;
        expert = e;
    } else if (!a.dense) {
        if (nb >= *a.n_blocks)
            return;
        expert = a.block_expert[nb];
    } else if (nb * BN >= a.n_dense) {
        return;
    }

    /* This thread's A rows: chunk c = tid & 7 of rows (tid >> 3) + i * threads / 8. */
    constexpr int A_PER = TL::a_rows * 8 / TL::threads; /* = 4 ACCB */
    const int my_c = tid & 7;
    const char *arow[A_PER];
    const char *wbase = (const char *)a.w + (size_t)expert * (size_t)a.w_rows * (size_t)K * sizeof(T);
#pragma unroll
    for (int i = 0; i < A_PER; i++) {
        const int r = (tid >> 3) + i * (TL::threads / 8);
        bool ok;
        const int grow = kc_wrow_of<MODE>(r, rb * rows_per_cta, M, ok);
        arow[i] = ok ? wbase + (size_t)grow * K * sizeof(T) : nullptr;
    }

    const uint32_t sbase_raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t sbase = (sbase_raw + 1023u) & ~1023u;
    const int nk = (K + KC_BK - 1) / KC_BK;
    const bool evf = a.evict_first && !fs.fused;
    const uint64_t pol = evf ? kc_policy_evict_first() : 0;
    auto load_a = [&](int kb) {
        const uint32_t sa = sbase + (uint32_t)((kb % S) * TL::stage_bytes);
        const int kel = kb * KC_BK + my_c * 8;
        const bool kok = kel < K;
#pragma unroll
        for (int i = 0; i < A_PER; i++) {
            const int r = (tid >> 3) + i * (TL::threads / 8);
            const bool ok = kok && arow[i] != nullptr;
            const void *src = ok ? (const void *)(arow[i] + (size_t)kel * sizeof(T)) : a.w;
            if (evf)
                kc_cp_async16_w_pol(sa + kc_swz(r, my_c), src, ok, pol);
            else
                kc_cp_async16_w(sa + kc_swz(r, my_c), src, ok);
        }
    };
    auto load_b = [&](int kb) {
        const uint32_t sb = sbase + (uint32_t)((kb % S) * TL::stage_bytes) + TL::a_bytes;
        const int k0 = kb * KC_BK;
#pragma unroll
        for (int idx = tid; idx < BN * 8; idx += TL::threads) {
            const int r = idx >> 3, c = idx & 7;
            const int kel = k0 + c * 8;
            const char *row = s_bsrc[r];
            const bool ok = row != nullptr && kel < K;
            const void *src = ok ? (const void *)(row + (size_t)kel * sizeof(T)) : a.w;
            kc_cp_async16(sb + kc_swz(r, c), src, ok);
        }
    };

    /* Early weight stages (small mode, a.early_a): the first chunk's weight stages are issued
     * as soon as the expert is known, before the duplicate check and the compaction below
     * (they land in commit group 0 with the first B stage, as in the chunk loop's prologue). */
    const bool a_pre = a.small && a.early_a && !fs.fused;
    if (a_pre) {
#pragma unroll 1
        for (int s = 0; s < D; s++)
            if (s < nk)
                load_a(s);
    }
    if (a.small) {
        int dup = 0;
        for (int j = tid; j < nb; j += TL::threads)
            dup |= kc_local_of(a, j) == expert;
        if (__syncthreads_or(dup)) {
            if (a_pre) { /* let the early copies land before the CTA's shared memory goes */
                kc_cp_commit();
                kc_cp_wait<0>();
            }
            return;
        }
        if (MODE == KC_MODE_GATE_UP && a.pf_w && !fs.fused && tid < 32) {
            /* The down weights of this expert into the L2 while this product streams its own
             * (they depend on nothing this launch computes). */
            const int n_rb = (M + rows_per_cta - 1) / rows_per_cta;
            const int r0 = (int)((long)rb * a.pf_rows / n_rb), r1 = (int)((long)(rb + 1) * a.pf_rows / n_rb);
            kc_prefetch_rows((const char *)a.pf_w + (size_t)expert * a.pf_rows * a.pf_row_bytes, r0, r1,
                             a.pf_row_bytes, a.pf_tail, tid);
        }
        /* Compact the expert's pairs in pair order (warp 0, 32 at a time). */
        if (tid < 32) {
            int cnt = 0;
            for (int base = 0; base < a.n_pairs; base += 32) {
                const int p = base + tid;
                const bool mine = p < a.n_pairs && kc_local_of(a, p) == expert;
                const unsigned bal = __ballot_sync(0xffffffffu, mine);
                if (mine)
                    s_list[cnt + __popc(bal & ((1u << tid) - 1u))] = p;
                cnt += __popc(bal);
            }
            if (tid == 0)
                s_count = cnt;
        }
        __syncthreads();
        n_chunks = (s_count + BN - 1) / BN;
    }

    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3;
    const int lane = tid & 31;
    T *out = (T *)a.out;

#pragma unroll 1
    for (int chunk = 0; chunk < n_chunks; chunk++) {
        /* Columns of this tile: where B comes from, where the output goes, the scale. */
        for (int n = tid; n < BN; n += TL::threads) {
            const char *src = nullptr;
            int orow = -1;
            float sc = 1.0f;
            if (a.small) {
                const int q = chunk * BN + n;
                if (q < s_count) {
                    const int pair = s_list[q];
                    const int brow = a.b_by_pos ? pair : pair / a.b_div; /* positions are pairs here */
                    src = (const char *)a.b + (size_t)brow * K * sizeof(T);
                    orow = pair;
                    if (a.topk_w)
                        sc = a.topk_w[pair];
                }
            } else {
                const kc_col cl = kc_col_of<T>(a, nb * BN + n, K);
                src = cl.src;
                orow = cl.orow;
                sc = cl.sc;
            }
            s_bsrc[n] = src;
            s_orow[n] = orow;
            s_scale[n] = sc;
        }
        __syncthreads();

        float acc[ACCB][NACC];
#pragma unroll
        for (int b = 0; b < ACCB; b++)
#pragma unroll
            for (int i = 0; i < NACC; i++)
                acc[b][i] = 0.0f;
#ifdef KC_HAVE_WGMMA
        if (PATH == KC_PATH_WGMMA) {
            /* Pin the zeroed accumulators before the first wgmma: without this, ptxas may sink
             * the zero moves into the pipeline and serialize every wgmma (warning C7515). */
#pragma unroll
            for (int b = 0; b < ACCB; b++)
#pragma unroll
                for (int i = 0; i < NACC; i++)
                    asm volatile("" : "+f"(acc[b][i])::"memory");
            kc_wg_fence();
        }
#endif

        /* Prologue: the weight stages first (they depend on nothing the previous kernel
         * writes), then, in the down product, the wait for the gate-up results, then B. One
         * commit group per stage; group 0 also holds every prologue weight stage. */
        if (!(a_pre && chunk == 0)) {
#pragma unroll 1
            for (int s = 0; s < D; s++)
                if (s < nk)
                    load_a(s);
        }
        if (MODE == KC_MODE_DOWN && chunk == 0) {
            if (fs.fused) {
                if (tid == 0)
                    kc_fuse_wait(fs.ctr + nb, fs.seq, fs.target);
                __syncthreads();
            } else {
                kc_pdl_wait();
            }
        }
#pragma unroll 1
        for (int s = 0; s < D; s++) {
            if (s < nk)
                load_b(s);
            kc_cp_commit();
        }

#pragma unroll 1
        for (int kb = 0; kb < nk; kb++) {
            kc_cp_wait<D - 1>();
            kc_fence_proxy_async();
            __syncthreads();
            /* wgmma with S - 1 stages of lead ((4, 128)): the block's wgmma is issued before
             * the loads, so that they are issued while it runs (the drain below then waits
             * only for what is left of it). Otherwise the loads first. */
            constexpr bool MMA_FIRST = DEEP_ && PATH == KC_PATH_WGMMA;
            if (!MMA_FIRST) {
                if (kb + D < nk) {
                    load_a(kb + D);
                    load_b(kb + D);
                }
                kc_cp_commit();
            }

            const uint32_t sa = sbase + (uint32_t)((kb % S) * TL::stage_bytes);
            const uint32_t sb = sa + TL::a_bytes;
            if (PATH == KC_PATH_WGMMA) {
#ifdef KC_HAVE_WGMMA
                kc_wg_fence();
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    const uint64_t db = kc_desc(sb + kk * 32);
#pragma unroll
                    for (int blk = 0; blk < ACCB; blk++) {
                        const uint64_t da = kc_desc(sa + (uint32_t)((wg * 64 * ACCB + blk * 64) * 128) + kk * 32);
                        kc_wgmma_op<T, BN>::run(acc[blk], da, db);
                    }
                }
                kc_wg_commit();
                if (MMA_FIRST) {
                    if (kb + D < nk) { /* into the stage of block kb - 1, drained before the barrier */
                        load_a(kb + D);
                        load_b(kb + D);
                    }
                    kc_cp_commit();
                }
                if (DEEP_)
                    kc_wg_wait<0>(); /* the stage is free at the next barrier: S - 1 stages of lead */
                else
                    kc_wg_wait<1>();
#endif
            } else {
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    uint32_t af[ACCB][4];
#pragma unroll
                    for (int blk = 0; blk < ACCB; blk++) {
                        const int r = wg * 64 * ACCB + blk * 64 + warp * 16 + (lane & 15);
                        kc_ldsm_x4(sa + kc_swz(r, 2 * kk + (lane >> 4)), af[blk]);
                    }
                    if (BN == 8) {
                        uint32_t bf[2];
                        const int r = lane & 7;
                        kc_ldsm_x2(sb + kc_swz(r, 2 * kk + ((lane >> 3) & 1)), bf);
#pragma unroll
                        for (int blk = 0; blk < ACCB; blk++)
                            kc_mma<T>::run(&acc[blk][0], af[blk], bf[0], bf[1]);
                    } else {
#pragma unroll
                        for (int nt = 0; nt < BN / 8; nt += 2) {
                            uint32_t bf[4];
                            const int r = nt * 8 + (lane & 7) + ((lane >> 4) << 3);
                            kc_ldsm_x4(sb + kc_swz(r, 2 * kk + ((lane >> 3) & 1)), bf);
#pragma unroll
                            for (int blk = 0; blk < ACCB; blk++) {
                                kc_mma<T>::run(&acc[blk][nt * 4], af[blk], bf[0], bf[1]);
                                kc_mma<T>::run(&acc[blk][(nt + 1) * 4], af[blk], bf[2], bf[3]);
                            }
                        }
                    }
                }
            }
        }
#ifdef KC_HAVE_WGMMA
        if (PATH == KC_PATH_WGMMA)
            kc_wg_wait<0>();
#endif
        kc_cp_wait<0>();

        /* Epilogue, through shared memory (kc_epi_stage, kc_epi_store); the stages are free now. */
        __syncthreads(); /* every warp is done reading the stages */
        T *sC = (T *)(smem_raw + (sbase - sbase_raw));
        kc_epi_stage<T, NWG, BN, ACCB, MODE>(a, acc, s_scale, sC, wg, warp, lane);
        __syncthreads();
        kc_epi_store<T, NWG, BN, ACCB, MODE>(a, out, M, sC, s_orow, rb, tid);
        if (fold) {
            /* The sum over top-k, folded in: count this tile's contributions per (token, row
             * block); the CTA whose arrival completes a token's held pairs sums that token's
             * row block (the threadFenceReduction pattern: stores, fence, barrier, arrival;
             * arrival seen, fence, barrier, loads through the L2). */
            const int n_rb = (M + rows_per_cta - 1) / rows_per_cta;
            __threadfence();
            __syncthreads();
            for (int n = tid; n < BN; n += TL::threads) {
                const int pair = s_orow[n];
                int last = 0;
                if (pair >= 0) {
                    const int t = pair / a.top_k;
                    last = kc_fold_arrive(a.fold_ctr + (size_t)t * n_rb + rb, a.fold_seq, kc_held_of_token(a, t));
                    if (last)
                        __threadfence();
                }
                s_last[n] = last;
            }
            __syncthreads();
            const int row0 = rb * rows_per_cta;
            constexpr int CPR = kc_epi_rows(MODE, NWG, ACCB) / 8;
            for (int idx = tid; idx < BN * CPR; idx += TL::threads) {
                const int n = idx / CPR, c = idx % CPR;
                const int r = row0 + c * 8;
                if (!s_last[n] || r >= M)
                    continue;
                kc_fold_sum8<T>(a, s_orow[n] / a.top_k, r);
            }
        }
        __syncthreads(); /* the next chunk rewrites the column tables and the stages */
    }
    if (MODE == KC_MODE_GATE_UP && fs.fused) { /* this expert's tile is written: count it */
        __threadfence();
        __syncthreads();
        if (tid == 0)
            kc_fuse_signal(fs.ctr + nb, fs.seq);
    }
#endif
}

template <typename T, int NWG, int BN, int PATH, int MODE, bool DEEP = false>
__global__ void __launch_bounds__(128 * NWG, 1) kc_gemm_kernel(const kc_gemm_args a) {
    constexpr int ACCB = kc_accb(MODE, BN);
    const int rows_per_cta = MODE == KC_MODE_GATE_UP ? 64 * NWG : 64 * ACCB * NWG;
    const int n_rb = (a.M + rows_per_cta - 1) / rows_per_cta;
    const int max_nb = a.max_blocks;
    int nb, rb;
    kc_raster((int)blockIdx.x, n_rb, max_nb, nb, rb);
    if (nb >= max_nb || rb >= n_rb)
        return;
    const kc_fuse_sync fs = {0, nullptr, 0, 0};
    kc_gemm_tile<T, NWG, BN, PATH, MODE, DEEP>(a, nb, rb, fs);
}

/* The small-T path in one persistent launch (one CTA per SM): items 0 .. n_gu-1 are the
 * gate-up tiles (pair i, row block rb; only the first pair of each expert works), then the
 * down tiles; a CTA takes items blockIdx.x, + gridDim.x, ... in order, so every gate-up tile
 * is taken before any down tile that waits for it, and the CTAs that start with a down tile
 * stream W2 while the gate-up tiles finish. All CTAs must be resident: the host launches at
 * most one per SM. */
template <typename T, int BN, int PATH>
__global__ void __launch_bounds__(128, 1)
    kc_small_fused_kernel(const kc_gemm_args gu, const kc_gemm_args dn, unsigned long long *ctr, uint32_t seq) {
    kc_pdl_wait();
    kc_pdl_trigger();
    const int P = gu.n_pairs;
    const int n_rb_gu = (gu.M + 63) / 64;
    constexpr int rows_dn = 64 * kc_accb(KC_MODE_DOWN, BN);
    const int n_rb_dn = (dn.M + rows_dn - 1) / rows_dn;
    const int n_gu = P * n_rb_gu, n_all = n_gu + P * n_rb_dn;
    for (int it = blockIdx.x; it < n_all; it += gridDim.x) {
        if (it < n_gu) {
            const kc_fuse_sync fs = {1, ctr, seq, 0};
            kc_gemm_tile<T, 1, BN, PATH, KC_MODE_GATE_UP>(gu, it / n_rb_gu, it % n_rb_gu, fs);
        } else {
            const int u = it - n_gu;
            const kc_fuse_sync fs = {1, ctr, seq, n_rb_gu};
            kc_gemm_tile<T, 1, BN, PATH, KC_MODE_DOWN>(dn, u / n_rb_dn, u % n_rb_dn, fs);
        }
        __syncthreads();
    }
}

/* ---- warp-specialized wgmma kernel (sm_90a), the large tile ------------------------------
 * Three warpgroups: WG0 produces (cp.async of the weight rows and the routed rows into the
 * same swizzled stages as above; each producer thread's copies arrive on the stage's "full"
 * mbarrier when they land, cp.async.mbarrier.arrive.noinc), WG1 and WG2 consume (wait on
 * "full", wgmma, release the stage on its "empty" mbarrier once the wgmma that read it is
 * done). No block-wide barrier in the main loop, the producer runs up to S - 1 stages ahead,
 * and the consumers never issue loads. The tile is the (2 x 128 weight rows) x 128 columns of
 * kc_gemm_kernel<.., 2, 128, ..>, the K walk the same: the same bits. Registers: setmaxnreg
 * gives the producer 56 and each consumer thread 224 (accumulators: 128). */
#define KC_WS_PROD_REGS 56
#define KC_WS_CONS_REGS 224

#ifdef KC_HAVE_WGMMA
static __device__ __forceinline__ void kc_mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
static __device__ __forceinline__ void kc_mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
static __device__ __forceinline__ void kc_mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "KC_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra KC_WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
static __device__ __forceinline__ void kc_cp_mbar_arrive(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
static __device__ __forceinline__ void kc_mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void kc_tma_load_2d(uint32_t dst, const void *tmap, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"((uint64_t)tmap), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

/* Clusters (the 2-CTA tile (9, 128)): this CTA's rank, the cluster's index and count, a shared
 * address of this CTA mapped into CTA rank's shared memory, an arrive on such a barrier (after
 * the wgmma that read the stage is waited for: the other CTA's copy engine may then write it),
 * the whole cluster's barrier, and the weight copy written into every CTA of mask. */
static __device__ __forceinline__ uint32_t kc_cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
static __device__ __forceinline__ uint32_t kc_cluster_idx() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
    return r;
}
static __device__ __forceinline__ uint32_t kc_cluster_count() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
    return r;
}
static __device__ __forceinline__ uint32_t kc_mapa(uint32_t addr, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
static __device__ __forceinline__ void kc_mbar_arrive_cluster(uint32_t cluster_addr) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}
static __device__ __forceinline__ void kc_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
static __device__ __forceinline__ void kc_tma_load_2d_mc(uint32_t dst, const void *tmap, int c0, int c1, uint32_t bar,
                                                         uint16_t mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster "
                 "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
                 "l"((uint64_t)tmap), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
                 : "memory");
}

/* The S stages' barriers of the warp-specialized kernels: "full" with full_count arrivals,
 * "empty" with one per consumer warp (8). Thread 0, before the block's first barrier. */
template <int S>
static __device__ __forceinline__ void kc_stage_bars_init(uint32_t full0, uint32_t empty0, uint32_t full_count) {
    for (int s = 0; s < S; s++) {
        kc_mbar_init(full0 + 8 * s, full_count);
        kc_mbar_init(empty0 + 8 * s, 8); /* every consumer warp */
    }
}

/* The weight stage of k block kb of the TMA-fed tiles (5, 128) .. (8, 128), at sa, by the copy
 * engine (one thread): arm the stage's "full" barrier bar with bytes, then gate-up: the 128
 * gate rows from row wrow0 of the tensor map and the 128 up rows M rows further; down: 256
 * rows from wrow0. */
template <int MODE, int CL = 1>
static __device__ __forceinline__ void kc_tma_stage_a(const CUtensorMap *tmw, uint32_t sa, uint32_t bar, int kb,
                                                      int wrow0, int M, uint32_t bytes, uint32_t rank = 0) {
    kc_mbar_expect_tx(bar, bytes);
    if (CL == 2) {
        /* half of the stage each, written into both CTAs (the barrier at the same offset in each
         * counts its bytes): gate-up, rank 0 the gate rows and rank 1 the up rows; down, rank r
         * the rows 128 r .. of the 256 (a map of 128-row boxes) */
        if (MODE == KC_MODE_GATE_UP)
            kc_tma_load_2d_mc(sa + rank * (128 * 128), tmw, kb * KC_BK, wrow0 + (rank ? M : 0), bar, (uint16_t)3);
        else
            kc_tma_load_2d_mc(sa + rank * (128 * 128), tmw, kb * KC_BK, wrow0 + 128 * (int)rank, bar, (uint16_t)3);
        return;
    }
    if (MODE == KC_MODE_GATE_UP) {
        kc_tma_load_2d(sa, tmw, kb * KC_BK, wrow0, bar);                 /* gate rows */
        kc_tma_load_2d(sa + 128 * 128, tmw, kb * KC_BK, wrow0 + M, bar); /* up rows */
    } else {
        kc_tma_load_2d(sa, tmw, kb * KC_BK, wrow0, bar);
    }
}

/* The producer warpgroup's k walk over one tile of (5, 128) and of the persistent (7, 128) /
 * (8, 128), k block kb at ring position gg = g + kb (g: the k blocks this CTA issued for its
 * earlier tiles; 0 in (5, 128)): wait until the consumers have released the stage's previous
 * use, thread 0 has the copy engine write the weight rows (kc_tma_stage_a), then thread pt
 * copies chunk pt % 8 of routed rows pt / 8 + 16 i (bsrc: the tile's column table of sources)
 * with cp.async 16 B, zero-filled past K and for padding columns, and every thread arrives on
 * the stage's "full" barrier. first (down): the CTA's first tile, whose first weight stages
 * go out before the wait for the gate-up results. */
template <typename T, int MODE, int CL = 1>
static __device__ __forceinline__ void
kc_tma_produce(const kc_gemm_args &a, const CUtensorMap *tmw, const char *const *bsrc, uint32_t g, int nk, bool first,
               int wrow0, int pt, uint32_t sbase, uint32_t full0, uint32_t empty0, uint32_t rank = 0) {
    typedef kc_tile<2, 128> TL;
    constexpr int S = TL::stages, BN = 128;
    const int M = a.M, K = a.K;
    const int c = pt & 7;
    const char *brow[BN / 16];
#pragma unroll
    for (int i = 0; i < BN / 16; i++)
        brow[i] = bsrc[(pt >> 3) + i * 16];
    auto load_a = [&](uint32_t gg, int kb) {
        if (pt == 0) {
            const int s = (int)(gg % S);
            kc_tma_stage_a<MODE, CL>(tmw, sbase + (uint32_t)(s * TL::stage_bytes), full0 + 8 * s, kb, wrow0, M,
                                     (uint32_t)TL::a_bytes, rank);
        }
    };
    const int npre = (MODE == KC_MODE_DOWN && first) ? (nk < S ? nk : S) : 0;
    for (int kb = 0; kb < npre; kb++)
        load_a(g + (uint32_t)kb, kb);
    if (MODE == KC_MODE_DOWN && first)
        kc_pdl_wait(); /* the gate-up results */
#pragma unroll 1
    for (int kb = 0; kb < nk; kb++) {
        const uint32_t gg = g + (uint32_t)kb;
        const int s = (int)(gg % S);
        if (gg >= (uint32_t)S)
            kc_mbar_wait(empty0 + 8 * s, (uint32_t)(((gg / S) - 1) & 1));
        if (kb >= npre)
            load_a(gg, kb);
        const uint32_t sb = sbase + (uint32_t)(s * TL::stage_bytes) + TL::a_bytes;
        const int kel = kb * KC_BK + c * 8;
        const bool kok = kel < K;
#pragma unroll
        for (int i = 0; i < BN / 16; i++) {
            const int r = (pt >> 3) + i * 16;
            const bool ok = brow[i] != nullptr && kok && !(a.lab_break & 4);
            const void *src = ok ? (const void *)(brow[i] + (size_t)kel * sizeof(T)) : a.w;
            kc_cp_async16(sb + kc_swz(r, c), src, ok);
        }
        kc_cp_mbar_arrive(full0 + 8 * s);
    }
}

/* The k walk of kc_ws_consume with wgmma N = N: the tile's columns [0, N) (the others are
 * padding, whose accumulators stay +0.0 and are never stored). For k block kb at ring position
 * gg = g + kb: wait on "full", the proxy fence where the routed rows came through cp.async
 * (FENCE), the block's four k16 steps in order on both 64-row blocks (A rows at aoff0 and aoff1
 * of the stage), one wgmma group kept in flight, and the stage of block kb - 1 released on
 * "empty" unless it is one of the tile's last HOLD (kept for the epilogue). */
template <typename T, int N, int HOLD, bool FENCE, int CL>
static __device__ __forceinline__ void kc_ws_walk(float (&acc)[2][64], uint32_t g, int nk, uint32_t sbase,
                                                  uint32_t full0, uint32_t empty0, uint32_t aoff0, uint32_t aoff1,
                                                  int lane, uint32_t peer_empty0, bool skip, int lab_break) {
    typedef kc_tile<2, 128> TL;
    constexpr int S = TL::stages;
#pragma unroll 1
    for (int kb = 0; kb < nk; kb++) {
        const uint32_t gg = g + (uint32_t)kb;
        const int s = (int)(gg % S);
        kc_mbar_wait(full0 + 8 * s, (uint32_t)((gg / S) & 1));
        if (FENCE && !(lab_break & 2))
            kc_fence_proxy_async(); /* the routed rows came through cp.async (generic proxy) */
        const uint32_t sa = sbase + (uint32_t)(s * TL::stage_bytes);
        const uint32_t sb = sa + TL::a_bytes;
        if (CL == 1 || !skip) {
            kc_wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const uint64_t db = kc_desc(sb + kk * 32);
                kc_wgmma_op<T, N>::run(acc[0], kc_desc(sa + aoff0 + kk * 32), db);
                kc_wgmma_op<T, N>::run(acc[1], kc_desc(sa + aoff1 + kk * 32), db);
            }
            kc_wg_commit();
            kc_wg_wait<1>();
        }
        if (kb > 0 && (HOLD == 0 || kb - 1 < nk - HOLD) && lane == 0) { /* wgmma(kb - 1) is done with its stage */
            kc_mbar_arrive(empty0 + 8 * ((gg - 1) % S));
            if (CL == 2)
                kc_mbar_arrive_cluster(peer_empty0 + 8 * ((gg - 1) % S));
        }
    }
}

/* A consumer warpgroup's k walk over one tile of the warp-specialized kernels (3, 128) ..
 * (9, 128): its two accumulators from +0.0 (pinned before the first wgmma), then kc_ws_walk
 * with the least N of 16, 32, .., 128 that covers nv, the tile's columns in use (those past
 * the last routed row are padding). A column's value does not depend on the N of the wgmma
 * that computes it (every tile, BN 8 .. 128, gives the same bits), so this changes the time
 * only: an expert's last block of a few rows costs its rows, not 128 columns (run 71,
 * docs/PERF.md). Returns with every wgmma done. */
template <typename T, int HOLD, bool FENCE, int CL = 1>
static __device__ __forceinline__ void kc_ws_consume(float (&acc)[2][64], uint32_t g, int nk, uint32_t sbase,
                                                     uint32_t full0, uint32_t empty0, uint32_t aoff0, uint32_t aoff1,
                                                     int lane, int nv = 128, uint32_t peer_empty0 = 0,
                                                     bool skip = false, int lab_break = 0) {
    constexpr int NACC = 64;
#pragma unroll
    for (int b = 0; b < 2; b++)
#pragma unroll
        for (int i = 0; i < NACC; i++)
            acc[b][i] = 0.0f;
#pragma unroll
    for (int b = 0; b < 2; b++)
#pragma unroll
        for (int i = 0; i < NACC; i++)
            asm volatile("" : "+f"(acc[b][i])::"memory");
    kc_wg_fence();
#define KC_WS_WALK(N)                                                                                            \
    kc_ws_walk<T, N, HOLD, FENCE, CL>(acc, g, nk, sbase, full0, empty0, aoff0, aoff1, lane, peer_empty0, skip, \
                                      lab_break)
    switch ((nv + 15) >> 4) {
    case 0:
    case 1:
        KC_WS_WALK(16);
        break;
    case 2:
        KC_WS_WALK(32);
        break;
    case 3:
        KC_WS_WALK(48);
        break;
    case 4:
        KC_WS_WALK(64);
        break;
    case 5:
        KC_WS_WALK(80);
        break;
    case 6:
        KC_WS_WALK(96);
        break;
    case 7:
        KC_WS_WALK(112);
        break;
    default:
        KC_WS_WALK(128);
        break;
    }
#undef KC_WS_WALK
    kc_wg_wait<0>();
}

/* The columns in use of a 128-column tile from its sources (one per thread of the calling
 * warp, column 32 w + lane): warp w's part, for kc_cols_in_use. Called by the four warps that
 * filled the table, every lane. */
static __device__ __forceinline__ int kc_cols_hi_of_warp(const void *src, int w) {
    const unsigned m = __ballot_sync(0xffffffffu, src != nullptr);
    return m ? 32 * w + 32 - __clz((int)m) : 0;
}
static __device__ __forceinline__ int kc_cols_in_use(const int32_t *hi4) {
    const int a = hi4[0] > hi4[1] ? hi4[0] : hi4[1], b = hi4[2] > hi4[3] ? hi4[2] : hi4[3];
    return a > b ? a : b;
}

/* The consumers' epilogue of the warp-specialized kernels (3, 128) and (5, 128), the one of
 * kc_gemm_tile (kc_epi_stage, kc_epi_store) with the consumer warpgroups' named barrier 1 (their
 * 256 threads) for the CTA's barrier: the stages are free once both are past their last wgmma.
 * cw: the consumer warpgroup (0, 1), ct: the thread among the consumers (0 .. 255), rb: the row
 * block, nv: the tile's columns in use. */
template <typename T, int MODE>
static __device__ __forceinline__ void kc_ws_epilogue(const kc_gemm_args &a, const float (&acc)[2][64], int cw,
                                                      int ct, int rb, const int32_t *s_orow, const float *s_scale,
                                                      char *smem_raw, uint32_t sbase, uint32_t sbase_raw,
                                                      int nv = 128) {
    const int M = a.M;
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    T *sC = (T *)(smem_raw + (sbase - sbase_raw));
    kc_epi_stage<T, 2, 128, 2, MODE>(a, acc, s_scale, sC, cw, (ct >> 5) & 3, ct & 31, nv);
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    kc_epi_store<T, 2, 128, 2, MODE>(a, (T *)a.out, M, sC, s_orow, rb, ct, nv);
}
#endif

template <typename T, int MODE>
__global__ void __launch_bounds__(384, 1) kc_gemm_ws_kernel(const kc_gemm_args a) {
#if !defined(KC_HAVE_WGMMA)
    return;
#else
    constexpr int NWG = 2, BN = 128;
    typedef kc_tile<NWG, BN> TL;
    constexpr int S = TL::stages;
    constexpr int NACC = BN / 2;
    __shared__ const char *s_bsrc[BN];
    __shared__ int32_t s_orow[BN];
    __shared__ float s_scale[BN];
    __shared__ __align__(8) uint64_t s_full[S], s_empty[S];
    extern __shared__ char smem_raw[];

    const int tid = threadIdx.x;
    const int M = a.M, K = a.K;
    const int rows_per_cta = MODE == KC_MODE_GATE_UP ? 64 * NWG : 128 * NWG;
    const int n_rb = (M + rows_per_cta - 1) / rows_per_cta;
    const int max_nb = a.max_blocks;
    int nb, rb;
    kc_raster((int)blockIdx.x, n_rb, max_nb, nb, rb);
    if (nb >= max_nb || rb >= n_rb)
        return;
    kc_pdl_wait();
    kc_pdl_trigger();
    int expert = 0;
    if (!a.dense) {
        if (nb >= *a.n_blocks)
            return;
        expert = a.block_expert[nb];
    } else if (nb * BN >= a.n_dense) {
        return;
    }
    for (int n = tid; n < BN; n += 384) {
        const kc_col cl = kc_col_of<T>(a, nb * BN + n, K);
        s_bsrc[n] = cl.src;
        s_orow[n] = cl.orow;
        s_scale[n] = cl.sc;
    }
    const uint32_t sbase_raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t sbase = (sbase_raw + 1023u) & ~1023u;
    const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(&s_full[0]);
    const uint32_t empty0 = (uint32_t)__cvta_generic_to_shared(&s_empty[0]);
    if (tid == 0) {
        kc_stage_bars_init<S>(full0, empty0, 128); /* every producer thread's copies */
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int nk = (K + KC_BK - 1) / KC_BK;
    const int wg = tid >> 7;
    const char *wbase = (const char *)a.w + (size_t)expert * (size_t)a.w_rows * (size_t)K * sizeof(T);

    if (wg == 0) {
        /* ---- producer ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(KC_WS_PROD_REGS));
        const int pt = tid; /* 0..127 */
        const int c = pt & 7;
#pragma unroll 1
        for (int kb = 0; kb < nk; kb++) {
            const int s = kb % S;
            if (kb >= S)
                kc_mbar_wait(empty0 + 8 * s, (uint32_t)(((kb / S) - 1) & 1));
            const uint32_t sa = sbase + (uint32_t)(s * TL::stage_bytes);
            const uint32_t sb = sa + TL::a_bytes;
            const int kel = kb * KC_BK + c * 8;
            const bool kok = kel < K;
#pragma unroll 4
            for (int i = 0; i < TL::a_rows / 16; i++) {
                const int r = (pt >> 3) + i * 16;
                bool ok;
                const int grow = kc_wrow_of<MODE>(r, rb * rows_per_cta, M, ok);
                ok = ok && kok;
                const void *src = ok ? (const void *)(wbase + ((size_t)grow * K + kel) * sizeof(T)) : a.w;
                kc_cp_async16_w(sa + kc_swz(r, c), src, ok);
            }
#pragma unroll 4
            for (int i = 0; i < BN / 16; i++) {
                const int r = (pt >> 3) + i * 16;
                const char *row = s_bsrc[r];
                const bool ok = row != nullptr && kok;
                const void *src = ok ? (const void *)(row + (size_t)kel * sizeof(T)) : a.w;
                kc_cp_async16(sb + kc_swz(r, c), src, ok);
            }
            kc_cp_mbar_arrive(full0 + 8 * s);
        }
        kc_cp_wait<0>();
        return;
    }

    /* ---- consumers ---- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(KC_WS_CONS_REGS));
    const int cw = wg - 1; /* the role of warpgroup cw in kc_gemm_kernel */
    const int ct = tid - 128;
    const int lane = ct & 31;
    float acc[2][NACC];
    /* its 64-row blocks: rows 128 cw and 128 cw + 64 of the stage */
    kc_ws_consume<T, 0, true>(acc, 0, nk, sbase, full0, empty0, (uint32_t)(cw * 128 * 128),
                              (uint32_t)((cw * 128 + 64) * 128), lane);

    kc_ws_epilogue<T, MODE>(a, acc, cw, ct, rb, s_orow, s_scale, smem_raw, sbase, sbase_raw);
#endif
}

/* Host: one launch of a product kernel, kgu for gate-up (mi 0) or kdn for down (mi 1), with
 * smem bytes of dynamic shared memory (its limit raised once per device: bit dev of
 * attr_done[mi], so that a launch pays no driver call) and programmatic dependent launch
 * where pdl. */
template <typename... KArgs, typename... Args>
static int kc_launch_mode(void (*kgu)(KArgs...), void (*kdn)(KArgs...), unsigned long long (&attr_done)[2], int dev,
                          int mi, long grid, int threads, int smem, bool pdl, cudaStream_t st, Args... args) {
    void (*k)(KArgs...) = mi == 0 ? kgu : kdn;
    const unsigned long long bit = dev < 64 ? 1ull << dev : 0;
    if (!(attr_done[mi] & bit)) {
        const cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess)
            return (int)e;
        attr_done[mi] |= bit;
    }
    const int rc = kc_launch_ex(k, dim3((unsigned)grid), dim3((unsigned)threads), (size_t)smem, st, pdl, args...);
    if (rc != 0)
        return rc;
    return (int)cudaGetLastError();
}

template <typename T>
static int kc_gemm_ws_launch_t(const kc_gemm_args *a, cudaStream_t st) {
    typedef kc_tile<2, 128> TL;
    const int rows_per_cta = a->mode == KC_MODE_GATE_UP ? 128 : 256;
    const long n_rb = (a->M + rows_per_cta - 1) / rows_per_cta;
    if (a->small)
        return (int)cudaErrorInvalidValue; /* the small mode uses the small tiles */
    const long nbl = a->dense ? (a->n_dense + 127) / 128 : a->max_blocks;
    kc_gemm_args aa = *a;
    aa.max_blocks = (int32_t)nbl;
    const long grid = n_rb * nbl;
    if (grid <= 0)
        return 0;
    if (grid > 0x7fffffffL)
        return (int)cudaErrorInvalidConfiguration;
    static unsigned long long attr_done[2];
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return (int)e;
    const int mi = a->mode == KC_MODE_GATE_UP ? 0 : 1;
    return kc_launch_mode(kc_gemm_ws_kernel<T, KC_MODE_GATE_UP>, kc_gemm_ws_kernel<T, KC_MODE_DOWN>, attr_done, dev, mi,
                          grid, 384, TL::smem, a->pdl != 0, st, aa);
}

/* ---- TMA-fed warp-specialized wgmma kernel (sm_90a), the large tile ("5 x 128") ----------
 * The (2 x 128 weight rows) x 128 columns tile of kc_gemm_kernel<.., 2, 128, ..>, fed by the
 * bulk tensor copy engine: the weight stage of each 64-wide k block is one (down: 256 rows) or
 * two (gate-up: the 128 gate rows, then the 128 up rows) cp.async.bulk.tensor copies issued
 * by one producer thread, completing on the stage's "full" mbarrier with its byte count; the
 * routed rows (gathered, so no tensor map) stay on cp.async 16 B by the producer warpgroup,
 * arriving on the same barrier (cp.async.mbarrier.arrive.noinc). The copy engine writes the
 * same 128-byte swizzle (16-byte chunk c of row r at c ^ (r & 7), the stages 1024-byte aligned)
 * that the wgmma descriptors read. Two consumer warpgroups (128 weight rows each) wait on
 * "full", issue the four k16 steps of the block in order, keep one wgmma group in flight
 * (wait_group 1) and release the previous block's stage on its "empty" mbarrier. The K walk
 * and the epilogue are those of kc_gemm_kernel: the same bits.
 * Weight rows past M inside the box (the next expert's or the up rows) are loaded but never
 * stored: a wgmma output row depends on its own weight row alone. */
template <typename T, int MODE, bool BT>
__global__ void __launch_bounds__(384, 1)
    kc_gemm_tma_kernel(const kc_gemm_args a, const __grid_constant__ CUtensorMap tmw,
                       const __grid_constant__ CUtensorMap tmb) {
#if !defined(KC_HAVE_WGMMA)
    return;
#else
    constexpr int NWG = 2, BN = 128;
    typedef kc_tile<NWG, BN> TL;
    constexpr int S = TL::stages;
    constexpr int NACC = BN / 2;
    __shared__ const char *s_bsrc[BN];
    __shared__ int32_t s_orow[BN];
    __shared__ float s_scale[BN];
    __shared__ __align__(8) uint64_t s_full[S], s_empty[S];
    __shared__ int32_t s_brow[BN]; /* BT: the routed row of column n in tmb, or -1 */
    __shared__ int32_t s_hi[4];    /* kc_cols_hi_of_warp of the table's four warps */
    extern __shared__ char smem_raw[];

    const int tid = threadIdx.x;
    const int M = a.M, K = a.K;
    constexpr int rows_per_cta = MODE == KC_MODE_GATE_UP ? 64 * NWG : 128 * NWG;
    const int n_rb = (M + rows_per_cta - 1) / rows_per_cta;
    const int max_nb = a.max_blocks;
    int nb, rb;
    kc_raster((int)blockIdx.x, n_rb, max_nb, nb, rb);
    if (nb >= max_nb || rb >= n_rb)
        return;
    /* As in kc_gemm_kernel: the gate-up product reads the alignment from the start; the down
     * product's tables were complete before the gate-up product started, so its weight stages
     * stream before the wait (below). */
    if (MODE == KC_MODE_GATE_UP)
        kc_pdl_wait();
    kc_pdl_trigger();
    int expert = 0;
    if (!a.dense) {
        if (nb >= *a.n_blocks)
            return;
        expert = a.block_expert[nb];
    } else if (nb * BN >= a.n_dense) {
        return;
    }
    if (tid == 0)
        asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&tmw) : "memory");
    static_assert(BN == 128, "four warps fill the table");
    if (tid < BN) {
        const kc_col cl = kc_col_of<T>(a, nb * BN + tid, K);
        s_bsrc[tid] = cl.src;
        s_brow[tid] = cl.bi;
        s_orow[tid] = cl.orow;
        s_scale[tid] = cl.sc;
        const int hi = kc_cols_hi_of_warp(cl.src, tid >> 5);
        if ((tid & 31) == 0)
            s_hi[tid >> 5] = hi;
    }
    const uint32_t sbase_raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t sbase = (sbase_raw + 1023u) & ~1023u;
    const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(&s_full[0]);
    const uint32_t empty0 = (uint32_t)__cvta_generic_to_shared(&s_empty[0]);
    if (tid == 0) {
        /* BT: one arrive (expect_tx of the whole stage); else that and every producer
         * thread's cp.async */
        kc_stage_bars_init<S>(full0, empty0, BT ? 1 : 129);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int nk = (K + KC_BK - 1) / KC_BK;
    const int wg = tid >> 7;

    if (wg == 0 && BT) {
        /* ---- producer, all through the copy engine: warp 0; lane l copies routed rows
         * l + 32 i, one 64-element row box each (row -1: out of bounds, zero-filled, its bytes
         * counted like the others) ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(KC_WS_PROD_REGS));
        if (tid >= 32)
            return;
        int brow[BN / 32];
#pragma unroll
        for (int i = 0; i < BN / 32; i++)
            brow[i] = s_brow[tid + 32 * i];
        const int wrow0 = expert * (int)a.w_rows + rb * rows_per_cta;
        const int npre = MODE == KC_MODE_DOWN ? (nk < S ? nk : S) : 0;
        /* down: the first weight stages before the wait for the gate-up results (their own
         * barrier arrive with the whole stage's bytes; the rows follow on the same phase) */
        for (int kb = 0; kb < npre; kb++) {
            const int s = kb % S;
            if (tid == 0)
                kc_tma_stage_a<MODE>(&tmw, sbase + (uint32_t)(s * TL::stage_bytes), full0 + 8 * s, kb, wrow0, M,
                                     (uint32_t)TL::stage_bytes);
        }
        if (MODE == KC_MODE_DOWN)
            kc_pdl_wait();
#pragma unroll 1
        for (int kb = 0; kb < nk; kb++) {
            const int s = kb % S;
            if (kb >= S)
                kc_mbar_wait(empty0 + 8 * s, (uint32_t)(((kb / S) - 1) & 1));
            const uint32_t sa = sbase + (uint32_t)(s * TL::stage_bytes);
            const uint32_t sb = sa + TL::a_bytes;
            if (kb >= npre && tid == 0)
                kc_tma_stage_a<MODE>(&tmw, sa, full0 + 8 * s, kb, wrow0, M, (uint32_t)TL::stage_bytes);
            __syncwarp();
#pragma unroll
            for (int i = 0; i < BN / 32; i++)
                kc_tma_load_2d(sb + (uint32_t)((tid + 32 * i) * 128), &tmb, kb * KC_BK, brow[i], full0 + 8 * s);
        }
        return;
    }
    if (wg == 0) {
        /* ---- producer ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(KC_WS_PROD_REGS));
        const int wrow0 = expert * (int)a.w_rows + rb * rows_per_cta; /* row of the tensor map */
        kc_tma_produce<T, MODE>(a, &tmw, s_bsrc, 0, nk, true, wrow0, tid, sbase, full0, empty0);
        kc_cp_wait<0>();
        return;
    }

    /* ---- consumers ---- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(KC_WS_CONS_REGS));
    const int cw = wg - 1;
    const int ct = tid - 128;
    const int lane = ct & 31;
    /* A rows of this warpgroup's two 64-row blocks in the stage: gate-up, gate rows at
     * 64 cw and up rows at 128 + 64 cw; down, rows 128 cw and 128 cw + 64. */
    const uint32_t aoff0 = (uint32_t)((MODE == KC_MODE_GATE_UP ? 64 * cw : 128 * cw) * 128);
    const uint32_t aoff1 = (uint32_t)((MODE == KC_MODE_GATE_UP ? 128 + 64 * cw : 128 * cw + 64) * 128);
    const int nv = a.fit_n ? kc_cols_in_use(s_hi) : BN; /* (the table was whole at __syncthreads) */
    float acc[2][NACC];
    kc_ws_consume<T, 0, !BT>(acc, 0, nk, sbase, full0, empty0, aoff0, aoff1, lane, nv);
    if (MODE == KC_MODE_DOWN)
        kc_pdl_wait(); /* (long satisfied: the producer waited before its first routed rows) */

    /* Epilogue through shared memory (kc_ws_epilogue). */
    kc_ws_epilogue<T, MODE>(a, acc, cw, ct, rb, s_orow, s_scale, smem_raw, sbase, sbase_raw, nv);
#endif
}

/* Host: the tensor map of a [rows][K] matrix of 16-bit elements (the weights: rows = local
 * experts x w_rows; the routed rows' source for (6, 128)), boxes of 64 x box_rows with the
 * 128-byte swizzle; cuTensorMapEncodeTiled through the
 * runtime's driver entry point (no libcuda link). Pure host computation, no synchronization. */
static int kc_encode_wmap(CUtensorMap *m, const void *w, long rows, int K, int box_rows) {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    if (!fn) {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q;
        cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
        if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !p)
            return e != cudaSuccess ? (int)e : (int)cudaErrorNotSupported;
        fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
    }
    const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)K * 2};
    const cuuint32_t box[2] = {KC_BK, (cuuint32_t)box_rows};
    const cuuint32_t estr[2] = {1, 1};
    CUresult r = fn(m, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void *>(w), dims, strides, box, estr,
                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? 0 : (int)cudaErrorInvalidValue;
}

template <typename T, int NWG, int BN, int PATH, bool DEEP = false>
static int kc_gemm_launch_t(const kc_gemm_args *a, cudaStream_t st);

template <typename T, bool BT>
static int kc_gemm_tma_launch_t(const kc_gemm_args *a, cudaStream_t st) {
    typedef kc_tile<2, 128> TL;
    const int rows_per_cta = a->mode == KC_MODE_GATE_UP ? 128 : 256;
    if (a->small)
        return (int)cudaErrorInvalidValue; /* the small mode uses the small tiles */
    const long wrows = (a->dense ? 1L : (long)(a->n_local > 0 ? a->n_local : 1)) * (long)a->w_rows;
    CUtensorMap tm;
    if (((uintptr_t)a->w & 15) != 0 || wrows > 0x7fffffffL ||
        kc_encode_wmap(&tm, a->w, wrows, a->K, rows_per_cta == 128 ? 128 : 256) != 0)
        return kc_gemm_launch_t<T, 2, 128, KC_PATH_WGMMA, false>(a, st); /* same tile, same bits */
    const long n_rb = (a->M + rows_per_cta - 1) / rows_per_cta;
    const long nbl = a->dense ? (a->n_dense + 127) / 128 : a->max_blocks;
    CUtensorMap tb = tm;
    if (BT) { /* the routed rows' source, one row per box: rows of b that a tile can name */
        const long brows = a->dense ? (long)a->n_dense
                           : a->b_by_pos ? nbl * 128
                                         : ((long)a->n_pairs + a->b_div - 1) / (a->b_div > 0 ? a->b_div : 1);
        if (((uintptr_t)a->b & 15) != 0 || brows <= 0 || brows > 0x7fffffffL ||
            kc_encode_wmap(&tb, a->b, brows, a->K, 1) != 0)
            return kc_gemm_launch_t<T, 2, 128, KC_PATH_WGMMA, false>(a, st);
    }
    kc_gemm_args aa = *a;
    aa.max_blocks = (int32_t)nbl;
    const long grid = n_rb * nbl;
    if (grid <= 0)
        return 0;
    if (grid > 0x7fffffffL)
        return (int)cudaErrorInvalidConfiguration;
    static unsigned long long attr_done[2];
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return (int)e;
    const int mi = a->mode == KC_MODE_GATE_UP ? 0 : 1;
    return kc_launch_mode(kc_gemm_tma_kernel<T, KC_MODE_GATE_UP, BT>, kc_gemm_tma_kernel<T, KC_MODE_DOWN, BT>,
                          attr_done, dev, mi, grid, 384, TL::smem, a->pdl != 0, st, aa, tm, tb);
}

/* ---- persistent TMA-fed kernel (sm_90a), tiles (7, 128) and (8, 128) -----------------------
 * The tile, stages, copies and K walk of kc_gemm_tma_kernel (5, 128), in a persistent grid: one
 * CTA per SM takes the tiles v = blockIdx.x, + gridDim.x, ... of the same raster order (over the
 * blocks in use), and the producer warpgroup runs on into the next tile while the consumers
 * finish the last one: its block counter, the stage ring and the full/empty barriers carry on
 * across tiles, so the next tile's first stages land during this tile's epilogue (run 11: each
 * tile's fill and epilogue were the loss). The column tables (routed row, output row, scale) of
 * tile i are written by the producer into slot i % 2 (tfull: 128 producer arrivals; tempty:
 * the 8 consumer warps, once the tile's stores are issued).
 * Epilogue without its own shared memory: the consumers keep the stage of the tile's last k
 * block (down: the last two) and write their outputs into the A rows of it that only their own
 * wgmma read (gate-up: warpgroup cw's gate rows 64 cw.. and up rows 128 + 64 cw..; down: its
 * rows 128 cw..), so that a warpgroup needs no other warpgroup's progress: rows of 128 bytes
 * (64 outputs of one column), 16-byte chunk c of row r at c ^ (r & 7). The held stages go back
 * to the producer after the stores. The values and their order are kc_gemm_kernel's: the same
 * bits. Until run 61 (8, 128) computed SiLU's IEEE division by a branch-free fast path where
 * exact and (7, 128) by '/'; since kc_act's SiLU is itself the fast form both tiles launch this
 * one kernel (both stay selectable). CL == 2 ((9, 128)): see kc_gemm_tmap_launch_t. */

#ifdef KC_HAVE_WGMMA
/* Two values rounded to T and packed (the first in the low half), and stmatrix .trans of four
 * 8 x 8 matrices of 16-bit elements (lanes 8 q .. 8 q + 7: matrix q's row addresses). */
template <typename T> static __device__ __forceinline__ uint32_t kc_pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t kc_pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *(const uint32_t *)&h;
}
template <> __device__ __forceinline__ uint32_t kc_pack2<__half>(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *(const uint32_t *)&h;
}
static __device__ __forceinline__ void kc_stsm_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
}
#endif

/* A CTA of a persistent launch whose tiles are handed out as CTAs ask (sc[0]: the next tile,
 * sc[1]: the CTAs done; both +0 before the launch) takes no more tiles: it counts itself done,
 * and the last of the grid's CTAs to do so sets both back to 0 for the next launch that uses
 * them (which starts after this one has completed: the launches of a context's stream wait on
 * their predecessors before any counting, and each launch site has its own pair). Every CTA
 * comes here exactly once, after its last draw. Returns -1 (no tile). */
static __device__ __forceinline__ int kc_sched_done(unsigned int *sc, unsigned int grid) {
    if (atomicAdd(&sc[1], 1u) == grid - 1u) { /* every CTA has drawn its last ticket */
        atomicExch(&sc[0], 0u);
        atomicExch(&sc[1], 0u);
    }
    return -1;
}
/* The next tile, or -1 when none is left (kc_sched_done). A CTA among the last a.yield_n of the
 * grid (never CTA 0) also stops while the word at a.yield_flag is nonzero (another stream's
 * kernels want its SM: the GPU worker's exchange during dual-batch overlap); the others take the
 * tiles left. */
static __device__ __forceinline__ int kc_sched_next(const kc_gemm_args &a, int n_tiles) {
    const unsigned int grid = gridDim.x;
    if (a.yield_flag && blockIdx.x > 0 && (int)blockIdx.x >= (int)grid - a.yield_n &&
        *(const volatile int32_t *)a.yield_flag)
        return kc_sched_done(a.sched, grid);
    const unsigned int v = atomicAdd(&a.sched[0], 1u);
    if ((int)v < n_tiles)
        return (int)v;
    return kc_sched_done(a.sched, grid);
}

template <typename T, int MODE, int CL>
__global__ void __launch_bounds__(384, 1)
    kc_gemm_tmap_kernel(const kc_gemm_args a, const __grid_constant__ CUtensorMap tmw) {
#if !defined(KC_HAVE_WGMMA)
    return;
#else
    constexpr int NWG = 2, BN = 128;
    typedef kc_tile<NWG, BN> TL;
    constexpr int S = TL::stages;
    constexpr int NACC = BN / 2;
    constexpr int HOLD = MODE == KC_MODE_GATE_UP ? 1 : 2; /* stages kept for the epilogue */
    static_assert(S > HOLD, "the producer needs a free stage while the epilogue holds some");
    __shared__ const char *s_bsrc[2][BN];
    __shared__ int32_t s_orow[2][BN];
    __shared__ float s_scale[2][BN];
    __shared__ int32_t s_hi[2][4]; /* kc_cols_hi_of_warp of the producer's four warps */
    __shared__ int32_t s_tile[2];  /* the tile of each table slot, -1: no more */
    __shared__ __align__(8) uint64_t s_full[S], s_empty[S], s_tfull[2], s_tempty[2];
    extern __shared__ char smem_raw[];

    const int tid = threadIdx.x;
    const int M = a.M, K = a.K;
    constexpr int rows_per_cta = MODE == KC_MODE_GATE_UP ? 64 * NWG : 128 * NWG;
    const int n_rb = (M + rows_per_cta - 1) / rows_per_cta;
    if (MODE == KC_MODE_GATE_UP)
        kc_pdl_wait(); /* the alignment */
    kc_pdl_trigger();
    /* column blocks in use (down: the routing tables were complete before gate-up started) */
    int nbv;
    if (a.dense) {
        nbv = (a.n_dense + BN - 1) / BN;
    } else {
        nbv = *a.n_blocks;
        nbv = nbv < a.max_blocks ? nbv : a.max_blocks;
    }
    /* CL == 2: tile (rb, pair of column blocks nbp), column block 2 nbp + rank */
    const int n_cols = CL == 2 ? (nbv + 1) / 2 : nbv;
    const int n_tiles = n_rb * n_cols;
    const uint32_t rank = CL == 2 ? kc_cluster_rank() : 0;
    const int first = CL == 2 ? (int)kc_cluster_idx() : (int)blockIdx.x;
    const int stride = CL == 2 ? (int)kc_cluster_count() : (int)gridDim.x;
    /* dyn: the tiles handed out in raster order as CTAs ask (kc_sched_next), so that the CTAs
     * in flight stay on neighbouring tiles (sharing weights in the L2) whatever each tile
     * costs; else CTA (cluster) i takes tiles i, i + stride, .. Every CTA of a dyn launch takes
     * part in the counting, so none leaves here. */
    const bool dyn = CL == 1 && a.sched != nullptr;
    if (!dyn && first >= n_tiles)
        return; /* (both CTAs of a cluster alike) */

    const uint32_t sbase_raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t sbase = (sbase_raw + 1023u) & ~1023u;
    const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(&s_full[0]);
    const uint32_t empty0 = (uint32_t)__cvta_generic_to_shared(&s_empty[0]);
    const uint32_t tfull0 = (uint32_t)__cvta_generic_to_shared(&s_tfull[0]);
    const uint32_t tempty0 = (uint32_t)__cvta_generic_to_shared(&s_tempty[0]);
    if (tid == 0) {
        /* full: the expect_tx arrive and every producer thread's cp.async; empty: every consumer
         * warp of each CTA of the cluster */
        for (int s = 0; s < S; s++) {
            kc_mbar_init(full0 + 8 * s, 129);
            kc_mbar_init(empty0 + 8 * s, 8 * CL);
        }
        for (int s = 0; s < 2; s++) {
            kc_mbar_init(tfull0 + 8 * s, 128); /* every producer thread's table entry */
            kc_mbar_init(tempty0 + 8 * s, 8);  /* every consumer warp, after its stores */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (CL == 2)
        kc_cluster_sync(); /* the other CTA's barriers are initialized before its copies arrive here */
    else
        __syncthreads();
    const uint32_t peer_empty0 = CL == 2 ? kc_mapa(empty0, rank ^ 1u) : 0;

    const int nk = (K + KC_BK - 1) / KC_BK;
    const int wg = tid >> 7;

    if (wg == 0) {
        /* ---- producer ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(KC_WS_PROD_REGS));
        const int pt = tid; /* table column pt */
        uint32_t g = 0; /* k blocks issued so far, all tiles */
#pragma unroll 1
        for (int it = 0;; it++) {
            const int slot = it & 1;
            if (it >= 2)
                kc_mbar_wait(tempty0 + 8 * slot, (uint32_t)(((it >> 1) - 1) & 1));
            int v;
            if (dyn) {
                if (pt == 0)
                    s_tile[slot] = kc_sched_next(a, n_tiles);
                asm volatile("bar.sync 2, 128;\n" ::: "memory");
                v = s_tile[slot];
            } else {
                v = first + it * stride;
                v = v < n_tiles ? v : -1;
                if (pt == 0)
                    s_tile[slot] = v;
            }
            if (v < 0) { /* the consumers see the end in this slot */
                kc_mbar_arrive(tfull0 + 8 * slot);
                break;
            }
            int nb, rb;
            kc_raster(v, n_rb, n_cols, nb, rb);
            const int nb0 = CL == 2 ? 2 * nb : nb; /* the block whose expert's weights the pair shares */
            nb = nb0 + (int)rank;
            {
                kc_col cl = {nullptr, -1, -1, 1.0f}; /* past the blocks in use (CL == 2): padding */
                if (CL == 1 || nb < nbv)
                    cl = kc_col_of<T>(a, nb * BN + pt, K);
                s_bsrc[slot][pt] = cl.src;
                s_orow[slot][pt] = cl.orow;
                s_scale[slot][pt] = cl.sc;
                const int hi = kc_cols_hi_of_warp(cl.src, pt >> 5);
                if ((pt & 31) == 0)
                    s_hi[slot][pt >> 5] = hi;
            }
            kc_mbar_arrive(tfull0 + 8 * slot);
            asm volatile("bar.sync 2, 128;\n" ::: "memory"); /* the producer's table is whole */
            const int expert = a.dense ? 0 : a.block_expert[nb0];
            const int wrow0 = expert * (int)a.w_rows + rb * rows_per_cta; /* row of the tensor map */
            /* down, first tile: its weight stages before the wait for the gate-up results */
            kc_tma_produce<T, MODE, CL>(a, &tmw, s_bsrc[slot], g, nk, it == 0, wrow0, pt, sbase, full0, empty0, rank);
            g += (uint32_t)nk;
        }
        kc_cp_wait<0>();
        if (CL == 2 && pt == 0) {
            /* Before this CTA exits: every stage released by the consumers of both CTAs (the
             * other CTA's last arrivals on these barriers, and its reads of the stages this
             * CTA's copies wrote, are then done). */
            for (uint32_t gg = g; gg < g + (uint32_t)S; gg++)
                if (gg >= (uint32_t)S)
                    kc_mbar_wait(empty0 + 8 * (gg % S), (uint32_t)(((gg / S) - 1) & 1));
        }
        return;
    }

    /* ---- consumers ---- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(KC_WS_CONS_REGS));
    const int cw = wg - 1;
    const int ct = tid - 128;
    const int wt = ct & 127; /* thread in the warpgroup */
    const int warp = (ct >> 5) & 3;
    const int lane = ct & 31;
    const uint32_t aoff0 = (uint32_t)((MODE == KC_MODE_GATE_UP ? 64 * cw : 128 * cw) * 128);
    const uint32_t aoff1 = (uint32_t)((MODE == KC_MODE_GATE_UP ? 128 + 64 * cw : 128 * cw + 64) * 128);
    char *const sgen = smem_raw - sbase_raw; /* + a shared address: its generic pointer */
    T *out = (T *)a.out;
    uint32_t g = 0;
#pragma unroll 1
    for (int it = 0;; it++) {
        const int slot = it & 1;
        /* the table first (the producer writes it before the tile's first stage): the tile (-1:
         * no more), the columns in use, and (CL == 2) whether the column block is padding alone
         * (an expert's even-count block, or past the blocks in use), which releases its stages
         * without a wgmma */
        kc_mbar_wait(tfull0 + 8 * slot, (uint32_t)((it >> 1) & 1));
        const int v = s_tile[slot];
        if (v < 0)
            break;
        int nb, rb;
        kc_raster(v, n_rb, n_cols, nb, rb);
        (void)nb;
        const bool skip = CL == 2 && s_bsrc[slot][0] == nullptr;
        /* the cut N only where the tiles are handed out as asked: with a fixed share per CTA,
         * the CTAs that drew cheap tiles run ahead of the others and their weights are read
         * again (run 71: Mixtral T = 1024 +30%) */
        const int nv = a.fit_n && dyn ? kc_cols_in_use(s_hi[slot]) : BN;
        float acc[2][NACC];
        kc_ws_consume<T, HOLD, true, CL>(acc, g, nk, sbase, full0, empty0, aoff0, aoff1, lane, nv, peer_empty0, skip,
                                         a.lab_break);
        const uint32_t glast = g + (uint32_t)nk - 1;
        g += (uint32_t)nk;
        if (MODE == KC_MODE_DOWN && it == 0)
            kc_pdl_wait(); /* (long satisfied: the producer waited before its first routed rows) */

        /* Epilogue into this warpgroup's rows of the held stage(s): region (blk, half) is 64
         * rows (columns n = 64 half ..) of 128 bytes (64 outputs). Register 4 i + 2 hf + cb of
         * a 64-row block holds output row 16 warp + lane/4 + 8 hf, column 8 i + 2 (lane % 4) + cb. */
        const uint32_t hs1 = sbase + (uint32_t)((glast % S) * TL::stage_bytes);
        const uint32_t hs0 = HOLD == 2 ? sbase + (uint32_t)(((glast - 1) % S) * TL::stage_bytes) : hs1;
        auto region = [&](int blk, int half) -> uint32_t {
            if (MODE == KC_MODE_GATE_UP)
                return hs1 + (uint32_t)((64 * cw + 128 * half) * 128);
            return (blk ? hs1 : hs0) + (uint32_t)((128 * cw + 64 * half) * 128);
        };
        /* Two column groups (i, i + 1) at a time, four 8 x 8 matrices (column group i + ii,
         * row half hf) of packed pairs, by one stmatrix .trans: the matrix's column n (of the
         * fragment) becomes the 16-byte shared row chunk of column n, rows 16 warp + 8 hf ..
         * + 7 in order, i.e. chunk 2 warp + hf of column n's 128-byte row, at the swizzled
         * place; lane 8 q + j gives the address of matrix q's column j. The values and their
         * rounding are those of one element at a time (run 59: that form, 128 two-byte stores
         * per thread, made the epilogue cost 13-16% of Qwen3's and DeepSeek's products). */
        auto write_tile = [&]() {
            const int q = lane >> 3, j = lane & 7;
            const int cq = 2 * warp + (q & 1);
#pragma unroll
            for (int i = 0; i < BN / 8; i += 2) {
                if (8 * i >= nv)
                    break; /* padding columns only from here: never stored */
                const int na = 8 * (i + (q >> 1)) + j;
                const uint32_t roff = (uint32_t)((na & 63) * 128 + ((cq ^ j) << 4));
                if (MODE == KC_MODE_GATE_UP) {
                    uint32_t pk[4];
#pragma unroll
                    for (int ii = 0; ii < 2; ii++)
#pragma unroll
                        for (int hf = 0; hf < 2; hf++) {
                            float v[2];
#pragma unroll
                            for (int cb = 0; cb < 2; cb++) {
                                const int reg = 4 * (i + ii) + 2 * hf + cb;
                                v[cb] = kc_act(a.act, acc[0][reg]) * acc[1][reg];
                            }
                            pk[2 * ii + hf] = kc_pack2<T>(v[0], v[1]);
                        }
                    kc_stsm_x4_trans(region(0, i >> 3) + roff, pk);
                } else {
#pragma unroll
                    for (int blk = 0; blk < 2; blk++) { /* sc == 1.0f when unscaled: exact */
                        uint32_t pk[4];
#pragma unroll
                        for (int ii = 0; ii < 2; ii++) {
                            const int n0 = 8 * (i + ii) + 2 * (lane & 3);
                            const float sc0 = s_scale[slot][n0], sc1 = s_scale[slot][n0 + 1];
#pragma unroll
                            for (int hf = 0; hf < 2; hf++) {
                                const int reg = 4 * (i + ii) + 2 * hf;
                                pk[2 * ii + hf] = kc_pack2<T>(acc[blk][reg] * sc0, acc[blk][reg + 1] * sc1);
                            }
                        }
                        kc_stsm_x4_trans(region(blk, i >> 3) + roff, pk);
                    }
                }
            }
        };
        if (!(a.lab_break & 17)) /* (lab: no epilogue, or no shared-memory writes of it) */
            write_tile();
        /* this warpgroup's rows are written (named barrier 3 + cw, its 128 threads) */
        asm volatile("bar.sync %0, 128;\n" ::"r"(3 + cw) : "memory");
        {
            constexpr int CPR = MODE == KC_MODE_GATE_UP ? 8 : 16; /* 16-byte chunks per column */
            const int row0 = rb * rows_per_cta + (MODE == KC_MODE_GATE_UP ? 64 : 128) * cw;
#pragma unroll 2
            for (int idx = wt; idx < ((a.lab_break & 9) ? 0 : nv * CPR); idx += 128) {
                const int n = idx / CPR, cc = idx % CPR;
                const int orow = s_orow[slot][n];
                const int r = row0 + cc * 8;
                if (orow < 0 || r >= M)
                    continue;
                const int rn = n & 63;
                const uint32_t src = region(cc >> 3, n >> 6) + (uint32_t)(rn * 128 + (((cc & 7) ^ (rn & 7)) << 4));
                *(uint4 *)(out + (size_t)orow * a.out_ld + r) = *(const uint4 *)(sgen + src);
            }
        }
        /* the held stages go back to the producer (whose copy engine writes them next: the
         * generic accesses above are ordered before it by the proxy fence), the table slot too */
        kc_fence_proxy_async();
        __syncwarp();
        if (lane == 0) {
#pragma unroll
            for (int h = HOLD - 1; h >= 0; h--) {
                kc_mbar_arrive(empty0 + 8 * ((glast - (uint32_t)h) % S));
                if (CL == 2)
                    kc_mbar_arrive_cluster(peer_empty0 + 8 * ((glast - (uint32_t)h) % S));
            }
            kc_mbar_arrive(tempty0 + 8 * slot);
        }
    }
#endif
}

/* Host: the persistent launch; grid = min(tiles, SMs). Falls back to (5, 128) where a held
 * stage would be missing (down with one k block), and as (5, 128) does where the tensor map
 * cannot be made. CL == 2 ((9, 128)): clusters of two CTAs, as many as can be resident at once
 * (cudaOccupancyMaxActiveClusters), each taking pairs of column blocks; the weight map's boxes
 * are 128 rows (each CTA copies half of a stage into both). */
template <typename T, int CL>
static int kc_gemm_tmap_launch_t(const kc_gemm_args *a, cudaStream_t st) {
    typedef kc_tile<2, 128> TL;
    const int rows_per_cta = a->mode == KC_MODE_GATE_UP ? 128 : 256;
    if (a->small)
        return (int)cudaErrorInvalidValue; /* the small mode uses the small tiles */
    const int nk = (a->K + KC_BK - 1) / KC_BK;
    if (a->mode == KC_MODE_DOWN && nk < 2)
        return kc_gemm_tma_launch_t<T, false>(a, st); /* same tile, same bits */
    const long wrows = (a->dense ? 1L : (long)(a->n_local > 0 ? a->n_local : 1)) * (long)a->w_rows;
    CUtensorMap tm;
    if (((uintptr_t)a->w & 15) != 0 || wrows > 0x7fffffffL ||
        kc_encode_wmap(&tm, a->w, wrows, a->K, (rows_per_cta == 128 || CL == 2) ? 128 : 256) != 0)
        return kc_gemm_launch_t<T, 2, 128, KC_PATH_WGMMA, false>(a, st);
    const long n_rb = (a->M + rows_per_cta - 1) / rows_per_cta;
    const long nbl = a->dense ? (a->n_dense + 127) / 128 : a->max_blocks;
    kc_gemm_args aa = *a;
    aa.max_blocks = (int32_t)nbl;
    const long tiles = n_rb * (CL == 2 ? (nbl + 1) / 2 : nbl);
    if (tiles <= 0)
        return 0;
    if (tiles > 0x7fffffffL)
        return (int)cudaErrorInvalidConfiguration;
    static unsigned long long attr_done[2];
    static int n_sm[64];
    static int n_cl[64][2]; /* CL == 2: resident clusters, per device and mode */
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return (int)e;
    int sms = dev < 64 ? n_sm[dev] : 0;
    if (sms <= 0) {
        e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (e != cudaSuccess)
            return (int)e;
        if (dev < 64)
            n_sm[dev] = sms;
    }
    const int mi = a->mode == KC_MODE_GATE_UP ? 0 : 1;
    if (a->grid_cap > 0 && a->grid_cap < sms)
        sms = a->grid_cap; /* SMs left to other streams (the same tiles in the same order: the same bits) */
    if (CL == 1) {
        const long grid = tiles < sms ? tiles : sms;
        return kc_launch_mode(kc_gemm_tmap_kernel<T, KC_MODE_GATE_UP, 1>,
                              kc_gemm_tmap_kernel<T, KC_MODE_DOWN, 1>, attr_done, dev, mi, grid, 384, TL::smem,
                              a->pdl != 0, st, aa, tm);
    }
    void (*k)(const kc_gemm_args, const CUtensorMap) =
        mi == 0 ? kc_gemm_tmap_kernel<T, KC_MODE_GATE_UP, CL> : kc_gemm_tmap_kernel<T, KC_MODE_DOWN, CL>;
    const unsigned long long bit = dev < 64 ? 1ull << dev : 0;
    if (!(attr_done[mi] & bit)) {
        e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, TL::smem);
        if (e != cudaSuccess)
            return (int)e;
        attr_done[mi] |= bit;
    }
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[2];
    cfg.blockDim = dim3(384);
    cfg.dynamicSmemBytes = TL::smem;
    cfg.stream = st;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CL;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int ncl = dev < 64 ? n_cl[dev][mi] : 0;
    if (ncl <= 0) {
        cfg.gridDim = dim3((unsigned)(sms / CL * CL));
        e = cudaOccupancyMaxActiveClusters(&ncl, k, &cfg);
        if (e != cudaSuccess)
            return (int)e;
        if (ncl <= 0)
            return (int)cudaErrorInvalidConfiguration;
        if (dev < 64)
            n_cl[dev][mi] = ncl;
        if (getenv("MOE_CUDA_DEBUG"))
            fprintf(stderr, "kc_gemm_tmap (cluster %d, %s): %d clusters resident at once\n", CL,
                    mi == 0 ? "gate-up" : "down", ncl);
    }
    if (ncl > sms / CL)
        ncl = sms / CL > 0 ? sms / CL : 1;
    const long clusters = tiles < ncl ? tiles : ncl;
    cfg.gridDim = dim3((unsigned)(clusters * CL));
    if (a->pdl) {
        attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[1].val.programmaticStreamSerializationAllowed = 1;
        cfg.numAttrs = 2;
    }
    e = cudaLaunchKernelEx(&cfg, k, aa, tm);
    if (e != cudaSuccess)
        return (int)e;
    return (int)cudaGetLastError();
}

/* Host side: the grid of one launch (n_rb x max_blocks CTAs, 1-D, decoded in the kernel). */
template <typename T, int NWG, int BN, int PATH, bool DEEP>
static int kc_gemm_launch_t(const kc_gemm_args *a, cudaStream_t st) {
    const int accb = kc_accb(a->mode, BN);
    const int rows_per_cta = a->mode == KC_MODE_GATE_UP ? 64 * NWG : 64 * accb * NWG;
    const int smem = a->mode == KC_MODE_GATE_UP ? kc_tile<NWG, BN, kc_accb(KC_MODE_GATE_UP, BN)>::smem
                                                : kc_tile<NWG, BN, kc_accb(KC_MODE_DOWN, BN)>::smem;
    const long n_rb = (a->M + rows_per_cta - 1) / rows_per_cta;
    const long nbl = a->small ? a->n_pairs : a->dense ? (a->n_dense + BN - 1) / BN : a->max_blocks;
    kc_gemm_args aa = *a;
    aa.max_blocks = (int32_t)nbl;
    const long grid = n_rb * nbl;
    if (grid <= 0)
        return 0;
    if (grid > 0x7fffffffL)
        return (int)cudaErrorInvalidConfiguration;
    /* The shared-memory attribute once per device (a launch must not pay a driver call). */
    static unsigned long long attr_done[2]; /* bit d: set on device d (d < 64) */
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return (int)e;
    const int mi = a->mode == KC_MODE_GATE_UP ? 0 : 1;
    return kc_launch_mode(kc_gemm_kernel<T, NWG, BN, PATH, KC_MODE_GATE_UP, DEEP>,
                          kc_gemm_kernel<T, NWG, BN, PATH, KC_MODE_DOWN, DEEP>, attr_done, dev, mi, grid, 128 * NWG,
                          smem, a->pdl != 0, st, aa);
}



/* The compiled configurations: (path, nwg, bn). */
#define KC_GEMM_CONFIGS(X)             \
    X(KC_PATH_WGMMA, 1, 8)             \
    X(KC_PATH_WGMMA, 1, 16)            \
    X(KC_PATH_WGMMA, 1, 32)            \
    X(KC_PATH_WGMMA, 1, 64)            \
    X(KC_PATH_WGMMA, 2, 64)            \
    X(KC_PATH_WGMMA, 2, 128)           \
    X(KC_PATH_MMA, 1, 8)               \
    X(KC_PATH_MMA, 1, 16)              \
    X(KC_PATH_MMA, 1, 32)              \
    X(KC_PATH_MMA, 1, 64)              \
    X(KC_PATH_MMA, 2, 64)              \
    X(KC_PATH_MMA, 2, 128)

/* Defines `extern "C" int NAME(args, path, nwg, bn, stream)` for element type T. */
#define KC_GEMM_X_(P, W, N)                     \
    if (path == (P) && nwg == (W) && bn == (N)) \
        return kc_gemm_launch_t<KC_T_, W, N, P>(a, st);
/* (wgmma, 3, 128): the warp-specialized kernel (a producer warpgroup + two consumers).
 * (wgmma, 4, 128): the (2, 128) tile with S - 1 stages of lead (wgmma waits drain each stage).
 * (wgmma, 5, 128): the (2, 128) tile fed by the copy engine (kc_gemm_tma_kernel), routed rows by cp.async;
 * (wgmma, 6, 128): the same with the routed rows by the copy engine too (one box per row);
 * (wgmma, 7, 128): (5, 128) in a persistent grid, the producer running on into the next tile;
 * (wgmma, 8, 128): the same kernel as (7, 128) since run 62 (before: SiLU's division by a fast
 * path where exact);
 * (wgmma, 9, 128): (8, 128) in clusters of two CTAs that share each weight stage (multicast). */
#define KC_GEMM_WS_(T)                                   \
    if (path == KC_PATH_WGMMA && nwg == 3 && bn == 128) \
        return kc_gemm_ws_launch_t<T>(a, st);            \
    if (path == KC_PATH_WGMMA && nwg == 4 && bn == 128) \
        return kc_gemm_launch_t<T, 2, 128, KC_PATH_WGMMA, true>(a, st); \
    if (path == KC_PATH_WGMMA && nwg == 5 && bn == 128) \
        return kc_gemm_tma_launch_t<T, false>(a, st); \
    if (path == KC_PATH_WGMMA && nwg == 6 && bn == 128) \
        return kc_gemm_tma_launch_t<T, true>(a, st); \
    if (path == KC_PATH_WGMMA && (nwg == 7 || nwg == 8) && bn == 128) \
        return kc_gemm_tmap_launch_t<T, 1>(a, st); \
    if (path == KC_PATH_WGMMA && nwg == 9 && bn == 128) \
        return kc_gemm_tmap_launch_t<T, 2>(a, st);

/* Host: the fused small-T launch (see kc_small_fused_kernel); grid = min(items, n_sm). */
template <typename T, int BN, int PATH>
static int kc_small_fused_launch_t(const kc_gemm_args *gu, const kc_gemm_args *dn, unsigned long long *ctr,
                                   uint32_t seq, int n_sm, cudaStream_t st) {
    constexpr int smem_gu = kc_tile<1, BN, kc_accb(KC_MODE_GATE_UP, BN)>::smem;
    constexpr int smem_dn = kc_tile<1, BN, kc_accb(KC_MODE_DOWN, BN)>::smem;
    constexpr int smem = smem_gu > smem_dn ? smem_gu : smem_dn;
    static unsigned long long attr_done; /* bit d: set on device d (d < 64) */
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return (int)e;
    const unsigned long long bit = dev < 64 ? 1ull << dev : 0;
    if (!(attr_done & bit)) {
        e = cudaFuncSetAttribute(kc_small_fused_kernel<T, BN, PATH>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess)
            return (int)e;
        attr_done |= bit;
    }
    const long items = (long)gu->n_pairs * ((gu->M + 63) / 64 + (dn->M + 64 * kc_accb(KC_MODE_DOWN, BN) - 1) /
                                                                      (64 * kc_accb(KC_MODE_DOWN, BN)));
    const long grid = items < n_sm ? items : n_sm;
    if (grid <= 0)
        return 0;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    cfg.gridDim = dim3((unsigned)grid);
    cfg.blockDim = dim3(128);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    if (gu->pdl) {
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
    }
    e = cudaLaunchKernelEx(&cfg, kc_small_fused_kernel<T, BN, PATH>, *gu, *dn, ctr, seq);
    if (e != cudaSuccess)
        return (int)e;
    return (int)cudaGetLastError();
}

/* Defines the fused small-T dispatch for element type T (bn 8, 16, 32, 64; nwg 1). */
#define KC_SMALL_FUSED_DEFINE_(NAME, T)                                                                               \
    extern "C" int NAME(const kc_gemm_args *gu, const kc_gemm_args *dn, int path, int bn, unsigned long long *ctr, \
                        uint32_t seq, int n_sm, cudaStream_t st) {                                                  \
        if (path == KC_PATH_WGMMA) {                                                                                \
            if (bn == 8)                                                                                            \
                return kc_small_fused_launch_t<T, 8, KC_PATH_WGMMA>(gu, dn, ctr, seq, n_sm, st);                    \
            if (bn == 16)                                                                                           \
                return kc_small_fused_launch_t<T, 16, KC_PATH_WGMMA>(gu, dn, ctr, seq, n_sm, st);                   \
            if (bn == 32)                                                                                           \
                return kc_small_fused_launch_t<T, 32, KC_PATH_WGMMA>(gu, dn, ctr, seq, n_sm, st);                   \
            if (bn == 64)                                                                                           \
                return kc_small_fused_launch_t<T, 64, KC_PATH_WGMMA>(gu, dn, ctr, seq, n_sm, st);                   \
        } else {                                                                                                    \
            if (bn == 8)                                                                                            \
                return kc_small_fused_launch_t<T, 8, KC_PATH_MMA>(gu, dn, ctr, seq, n_sm, st);                      \
            if (bn == 16)                                                                                           \
                return kc_small_fused_launch_t<T, 16, KC_PATH_MMA>(gu, dn, ctr, seq, n_sm, st);                     \
            if (bn == 32)                                                                                           \
                return kc_small_fused_launch_t<T, 32, KC_PATH_MMA>(gu, dn, ctr, seq, n_sm, st);                     \
            if (bn == 64)                                                                                           \
                return kc_small_fused_launch_t<T, 64, KC_PATH_MMA>(gu, dn, ctr, seq, n_sm, st);                     \
        }                                                                                                           \
        return (int)cudaErrorInvalidValue;                                                                          \
    }
