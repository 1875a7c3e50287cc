/*
 * cuda_misc.cu: the small kernels around the grouped products: the alignment of (token, slot)
 * pairs by expert (with the device-side checks of ids, the expert map and the weights), the
 * fixed-order sum over slots, the zero fill of slot mode, the weight-on-input scaling and the
 * shared-expert gate.
 *
 * Determinism: integer atomics only (counts and ranks in the alignment; the order of rows
 * inside an expert may change between runs, which changes no output bit since every row is
 * computed on its own). No floating-point atomics anywhere: the sum over slots is one thread
 * per output element walking k = 0 .. K-1 from +0.0.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/kc_device.cuh"
#include "kernels/cuda/kern_cuda_impl.h"

/* ---- alignment ----------------------------------------------------------------------- */
#define KC_ALIGN_THREADS 1024

/* The tile blocks of each expert, over one CTA of at most KC_ALIGN_THREADS threads, each thread
 * a contiguous range of experts: an exclusive scan of ceil(cnt[e] / bn) (warp shuffles, then
 * the warps' sums), offb[e] = the expert's first block, block_expert[b] = its expert, *n_blocks =
 * the total (and *n_blocks_s, shared, where given), then the padding rows of each expert's last
 * block set to -1, a warp per expert (consecutive lanes, consecutive rows: one thread writing
 * an expert's padding alone took 5-10 us at bn = 128, every store of a warp on its own line;
 * run 52). cnt may be in shared or global memory, sorted_rows too; wsum is shared scratch of
 * KC_ALIGN_THREADS / 32 words. Callers synchronize after it before reading what it wrote. pair: each
 * expert's block count rounded up to even (the 2-CTA cluster tile (9, 128) pairs an expert's
 * blocks), the extra block all padding. */
__device__ __forceinline__ int32_t kc_blocks_of(int32_t c, int32_t bn, int32_t pair) {
    const int32_t nbe = (c + bn - 1) / bn;
    return pair ? (nbe + 1) & ~1 : nbe;
}
__device__ __forceinline__ void kc_block_scan_fill(const int32_t *cnt, int32_t n_local, int32_t bn, int32_t pair,
                                                   int32_t *offb, int32_t *sorted_rows, int32_t *block_expert,
                                                   int32_t *n_blocks, int32_t *n_blocks_s, int32_t *wsum) {
    const int tid = threadIdx.x;
    const int chunk = (n_local + blockDim.x - 1) / blockDim.x;
    const int e0 = tid * chunk, e1 = min(n_local, e0 + chunk);
    int32_t mine = 0;
    for (int e = e0; e < e1; e++)
        mine += kc_blocks_of(cnt[e], bn, pair);
    const int lane = tid & 31, warp = tid >> 5;
    int32_t incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off)
            incl += v;
    }
    if (lane == 31)
        wsum[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int32_t v = lane < (int)(blockDim.x / 32) ? wsum[lane] : 0;
        int32_t iv = v;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int32_t u = __shfl_up_sync(0xffffffffu, iv, off);
            if (lane >= off)
                iv += u;
        }
        if (lane < (int)(blockDim.x / 32))
            wsum[lane] = iv - v; /* exclusive */
        if (lane == 31) {
            *n_blocks = iv;
            if (n_blocks_s)
                *n_blocks_s = iv;
        }
    }
    __syncthreads();
    int32_t run = wsum[warp] + incl - mine;
    for (int e = e0; e < e1; e++) {
        offb[e] = run;
        const int32_t nbe = kc_blocks_of(cnt[e], bn, pair);
        for (int b = 0; b < nbe; b++)
            block_expert[run + b] = e;
        run += nbe;
    }
    __syncthreads(); /* offb */
    const int nwarps = (int)(blockDim.x / 32);
    for (int e = warp; e < n_local; e += nwarps) {
        const int32_t c = cnt[e];
        const int32_t end = kc_blocks_of(c, bn, pair) * bn;
        int32_t *rows = sorted_rows + (size_t)offb[e] * bn;
        for (int i = c + lane; i < end; i += 32)
            rows[i] = -1;
    }
}

/* The rules of both alignments for pair p (token p / K, slot p % K), from what was loaded for
 * it: its id, whether its weight is finite, and e, its map entry (map[id], or id without a map;
 * read only where the id is in range). A non-finite weight, an id out of [0, E) or a map entry
 * out of [-1, n_local) is recorded (the first error wins; the weight is read again for the
 * record, errors being rare); returns the local expert, or -1 (held elsewhere, or bad:
 * skipped). A pair with a bad weight alone keeps its place. */
static __device__ __forceinline__ int32_t kc_align_verdict(int32_t id, bool w_ok, int32_t e, int64_t p, int32_t K,
                                                           const float *w, int32_t E, int32_t n_local,
                                                           kc_errsink err) {
    const bool id_ok = id >= 0 && id < E;
    const bool map_ok = id_ok && e >= -1 && e < n_local;
    if (w_ok && map_ok)
        return e;
    const int32_t t = (int32_t)(p / K), k = (int32_t)(p % K);
    const float wt = w[p];
    if (!w_ok)
        kc_record_err(err, KC_ERR_WEIGHT, t, k, id, wt);
    if (!id_ok) {
        kc_record_err(err, KC_ERR_ID, t, k, id, wt);
        return -1;
    }
    if (!map_ok) {
        kc_record_err(err, KC_ERR_MAP, t, k, e, wt);
        return -1;
    }
    return e;
}

/* kc_align_verdict for pair p, one pair's loads after another (the three-launch alignment). */
static __device__ __forceinline__ int32_t kc_align_check(const int32_t *ids, const float *w, int64_t p, int32_t K,
                                                         const int32_t *map, int32_t E, int32_t n_local,
                                                         kc_errsink err) {
    const int32_t id = ids[p];
    const bool w_ok = isfinite(w[p]);
    const int32_t e = id >= 0 && id < E ? (map ? map[id] : id) : -1;
    return kc_align_verdict(id, w_ok, e, p, K, w, E, n_local, err);
}

/* One CTA, every pair's loads issued before any of its atomics: thread tid holds pairs
 * tid + i KC_ALIGN_THREADS (i < PPT, the least power of two that covers P) in registers from the
 * first load to the last
 * store, so that a pass costs one memory latency instead of one per pair (run 52: the loop that
 * loaded, checked and counted one pair at a time took 17 us for 6144 pairs). stage_rows > 0:
 * the sorted rows are built in shared memory (stage_rows entries, at least n_blocks * bn) and
 * written out with coalesced stores; a warp's scattered stores to global memory, one line per
 * thread, took 20-30 us for 6-8k pairs (run 53). */
#define KC_ALIGN_PPT (KC_ALIGN_MC_MIN_PAIRS / KC_ALIGN_THREADS)
#define KC_ALIGN_STAGE_BYTES (192 * 1024)
template <int PPT>
__global__ void __launch_bounds__(KC_ALIGN_THREADS)
    kc_align_kernel(const int32_t *ids, const float *w, int64_t P, int32_t K, const int32_t *map, int32_t E,
                    int32_t n_local, int32_t bn, int32_t pair, int32_t *pair_pos, int32_t *sorted_rows,
                    int32_t *block_expert, int32_t *n_blocks, int32_t stage_rows, kc_errsink err) {
    extern __shared__ int32_t asm_[];
    int32_t *cnt = asm_;            /* [n_local] rows per expert */
    int32_t *offb = asm_ + n_local; /* [n_local] first block of each expert */
    int32_t *rows = stage_rows > 0 ? asm_ + 2 * n_local : sorted_rows;
    __shared__ int32_t wsum[KC_ALIGN_THREADS / 32];
    __shared__ int32_t nb_s;
    const int tid = threadIdx.x;
    kc_pdl_wait();
    kc_pdl_trigger();

    for (int e = tid; e < n_local; e += blockDim.x)
        cnt[e] = 0;
    int32_t id[PPT], ex[PPT];
    uint32_t bad_w = 0; /* bit i: pair i's weight is not finite */
#pragma unroll
    for (int i = 0; i < PPT; i++) {
        const int64_t p = tid + (int64_t)i * KC_ALIGN_THREADS;
        id[i] = p < P ? ids[p] : -1;
        if (p < P && !isfinite(w[p]))
            bad_w |= 1u << i;
    }
    /* the map's loads all issued before the first verdict (kc_align_verdict) */
#pragma unroll
    for (int i = 0; i < PPT; i++)
        ex[i] = id[i] >= 0 && id[i] < E ? (map ? map[id[i]] : id[i]) : -1;
#pragma unroll
    for (int i = 0; i < PPT; i++) {
        const int64_t p = tid + (int64_t)i * KC_ALIGN_THREADS;
        if (p < P)
            ex[i] = kc_align_verdict(id[i], !((bad_w >> i) & 1u), ex[i], p, K, w, E, n_local, err);
    }
    __syncthreads(); /* cnt zeroed */

    /* Count and rank within the expert (id[] now holds the rank). */
#pragma unroll
    for (int i = 0; i < PPT; i++)
        id[i] = ex[i] >= 0 ? atomicAdd(&cnt[ex[i]], 1) : -1;
    __syncthreads();

    /* Blocks per expert: their exclusive scan, block_expert and the padding rows. */
    kc_block_scan_fill(cnt, n_local, bn, pair, offb, rows, block_expert, n_blocks, &nb_s, wsum);
    __syncthreads();

    /* Place each pair. */
#pragma unroll
    for (int i = 0; i < PPT; i++) {
        const int64_t p = tid + (int64_t)i * KC_ALIGN_THREADS;
        if (p >= P)
            continue;
        int32_t pos = -1;
        if (ex[i] >= 0) {
            pos = offb[ex[i]] * bn + id[i];
            rows[pos] = (int32_t)p;
        }
        pair_pos[p] = pos;
    }
    if (stage_rows > 0) {
        __syncthreads();
        const int n = nb_s * bn;
        for (int i = tid; i < n; i += blockDim.x)
            sorted_rows[i] = rows[i];
    }
}

extern "C" int kc_launch_align(const int32_t *ids, const float *w, int64_t n_pairs, int32_t top_k,
                               const int32_t *map, int32_t n_experts, int32_t n_local, int32_t bn, int32_t pair,
                               int32_t *pair_pos,
                               int32_t *sorted_rows, int32_t *block_expert, int32_t *n_blocks, kc_errsink err,
                               int pdl, cudaStream_t st) {
    if (n_pairs > (int64_t)KC_ALIGN_PPT * KC_ALIGN_THREADS || bn <= 0)
        return (int)cudaErrorInvalidValue; /* the three-launch version's */
    /* the sorted rows in shared memory where they fit: at most ceil(P / bn) + min(n_local, P)
     * blocks (kern_cuda.c's max_blocks_for) */
    const int64_t busy = n_local < n_pairs ? n_local : n_pairs;
    const int64_t max_rows = ((n_pairs + bn - 1) / bn + (pair ? 2 : 1) * busy) * bn;
    size_t smem = 2 * (size_t)(n_local > 0 ? n_local : 1) * sizeof(int32_t);
    int32_t stage_rows = 0;
    if (smem + (size_t)max_rows * sizeof(int32_t) <= KC_ALIGN_STAGE_BYTES) {
        stage_rows = (int32_t)max_rows;
        smem += (size_t)max_rows * sizeof(int32_t);
    }
    /* pairs per thread: the least of 1, 2, 4, 8, 16 that covers P (each unrolled loop costs its
     * full count of instructions, on one SM) */
    typedef void (*align_fn)(const int32_t *, const float *, int64_t, int32_t, const int32_t *, int32_t, int32_t,
                             int32_t, int32_t, int32_t *, int32_t *, int32_t *, int32_t *, int32_t, kc_errsink);
    static const align_fn fns[5] = {kc_align_kernel<1>, kc_align_kernel<2>, kc_align_kernel<4>, kc_align_kernel<8>,
                                    kc_align_kernel<KC_ALIGN_PPT>};
    static_assert(KC_ALIGN_PPT == 16, "the variants above cover 16 pairs per thread");
    const int64_t per = (n_pairs + KC_ALIGN_THREADS - 1) / KC_ALIGN_THREADS;
    const int vi = per <= 1 ? 0 : per <= 2 ? 1 : per <= 4 ? 2 : per <= 8 ? 3 : 4;
    const align_fn k = fns[vi];
    /* the shared-memory limit raised once per (variant, device, size above 48 KB) */
    static size_t smem_set[5][64];
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return (int)e;
    if (smem > 48 * 1024 && (dev >= 64 || smem_set[vi][dev] < smem)) {
        e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess)
            return (int)e;
        if (dev < 64)
            smem_set[vi][dev] = smem;
    }
    return kc_launch_ex(k, dim3(1), dim3(KC_ALIGN_THREADS), smem, st, pdl, ids, w, n_pairs, top_k, map, n_experts,
                        n_local, bn, pair, pair_pos, sorted_rows, block_expert, n_blocks, stage_rows, err);
}

/* ---- alignment, many CTAs (large batches) ----------------------------------------------
 * count: each CTA ranks its pairs per expert in shared memory, then reserves a range per
 * expert with one global atomicAdd; rank = range start + local rank (pair_pos holds it).
 * scan: one CTA turns the counts into block offsets (as kc_align_kernel does).
 * place: every pair goes to offb[e] * bn + rank. */
#define KC_ALIGN_MC_PAIRS 2048 /* pairs per counting CTA */

__global__ void __launch_bounds__(KC_ALIGN_THREADS)
    kc_align_count_kernel(const int32_t *ids, const float *w, int64_t P, int32_t K, const int32_t *map, int32_t E,
                          int32_t n_local, int32_t *gcnt, int32_t *pair_pos, kc_errsink err) {
    extern __shared__ int32_t lcnt[]; /* [n_local] */
    kc_pdl_wait();
    kc_pdl_trigger();
    const int tid = threadIdx.x;
    for (int e = tid; e < n_local; e += blockDim.x)
        lcnt[e] = 0;
    __syncthreads();
    const int64_t p0 = (int64_t)blockIdx.x * KC_ALIGN_MC_PAIRS;
    const int64_t p1 = min(P, p0 + KC_ALIGN_MC_PAIRS);
    int32_t my_e[KC_ALIGN_MC_PAIRS / KC_ALIGN_THREADS];
    int32_t my_r[KC_ALIGN_MC_PAIRS / KC_ALIGN_THREADS];
#pragma unroll
    for (int i = 0; i < KC_ALIGN_MC_PAIRS / KC_ALIGN_THREADS; i++) {
        const int64_t p = p0 + tid + (int64_t)i * KC_ALIGN_THREADS;
        my_e[i] = -1;
        my_r[i] = -1;
        if (p >= p1)
            continue;
        const int32_t e = kc_align_check(ids, w, p, K, map, E, n_local, err);
        if (e >= 0) {
            my_e[i] = e;
            my_r[i] = atomicAdd(&lcnt[e], 1);
        }
    }
    __syncthreads();
    for (int e = tid; e < n_local; e += blockDim.x)
        lcnt[e] = lcnt[e] ? atomicAdd(&gcnt[e], lcnt[e]) : 0; /* now: this CTA's range start */
    __syncthreads();
#pragma unroll
    for (int i = 0; i < KC_ALIGN_MC_PAIRS / KC_ALIGN_THREADS; i++) {
        const int64_t p = p0 + tid + (int64_t)i * KC_ALIGN_THREADS;
        if (p < p1)
            pair_pos[p] = my_e[i] >= 0 ? lcnt[my_e[i]] + my_r[i] : -1;
    }
}

__global__ void __launch_bounds__(KC_ALIGN_THREADS)
    kc_align_scan_kernel(const int32_t *gcnt, int32_t n_local, int32_t bn, int32_t pair, int32_t *offb,
                         int32_t *sorted_rows, int32_t *block_expert, int32_t *n_blocks) {
    __shared__ int32_t wsum[KC_ALIGN_THREADS / 32];
    kc_pdl_wait();
    kc_pdl_trigger();
    kc_block_scan_fill(gcnt, n_local, bn, pair, offb, sorted_rows, block_expert, n_blocks, nullptr, wsum);
}

__global__ void kc_align_place_kernel(const int32_t *ids, const int32_t *map, int64_t P, const int32_t *offb, int32_t bn,
                                      int32_t *pair_pos, int32_t *sorted_rows) {
    kc_pdl_wait();
    kc_pdl_trigger();
    const int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P)
        return;
    const int32_t r = pair_pos[p];
    if (r < 0)
        return;
    const int32_t e = map ? map[ids[p]] : ids[p];
    const int32_t pos = offb[e] * bn + r;
    sorted_rows[pos] = (int32_t)p;
    pair_pos[p] = pos;
}

extern "C" int kc_launch_align_mc(const int32_t *ids, const float *w, int64_t n_pairs, int32_t top_k, const int32_t *map,
                                  int32_t n_experts, int32_t n_local, int32_t bn, int32_t pair, int32_t *pair_pos,
                                  int32_t *sorted_rows,
                                  int32_t *block_expert, int32_t *n_blocks, int32_t *scratch, kc_errsink err, int pdl,
                                  cudaStream_t st) {
    int32_t *gcnt = scratch, *offb = scratch + n_local;
    const size_t smem = (size_t)(n_local > 0 ? n_local : 1) * sizeof(int32_t);
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(kc_align_count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess)
            return (int)e;
    }
    cudaError_t e = cudaMemsetAsync(gcnt, 0, sizeof(int32_t) * (size_t)n_local, st);
    if (e != cudaSuccess)
        return (int)e;
    const unsigned nc = (unsigned)((n_pairs + KC_ALIGN_MC_PAIRS - 1) / KC_ALIGN_MC_PAIRS);
    int r = kc_launch_ex(kc_align_count_kernel, dim3(nc), dim3(KC_ALIGN_THREADS), smem, st, pdl, ids, w, n_pairs, top_k,
                         map, n_experts, n_local, gcnt, pair_pos, err);
    if (r)
        return r;
    r = kc_launch_ex(kc_align_scan_kernel, dim3(1), dim3(KC_ALIGN_THREADS), 0, st, pdl, (const int32_t *)gcnt, n_local,
                     bn, pair, offb, sorted_rows, block_expert, n_blocks);
    if (r)
        return r;
    return kc_launch_ex(kc_align_place_kernel, dim3((unsigned)((n_pairs + 255) / 256)), dim3(256), 0, st, pdl, ids, map,
                        n_pairs, (const int32_t *)offb, bn, pair_pos, sorted_rows);
}

/* ---- element access, 8 at a time ------------------------------------------------------ */
template <typename T> struct kc_v8;
template <> struct kc_v8<__nv_bfloat16> {
    static __device__ __forceinline__ void load(const void *p, float *f) {
        const uint4 u = *(const uint4 *)p;
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 v = __bfloat1622float2(h[i]);
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    }
    static __device__ __forceinline__ void store(void *p, const float *f) {
        uint4 u;
        __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++)
            h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        *(uint4 *)p = u;
    }
    static __device__ __forceinline__ float ld1(const void *p, int64_t i) {
        return kc_ld((const __nv_bfloat16 *)p, i);
    }
    static __device__ __forceinline__ void st1(void *p, int64_t i, float v) {
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    }
};
template <> struct kc_v8<__half> {
    static __device__ __forceinline__ void load(const void *p, float *f) {
        const uint4 u = *(const uint4 *)p;
        const __half2 *h = (const __half2 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 v = __half22float2(h[i]);
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    }
    static __device__ __forceinline__ void store(void *p, const float *f) {
        uint4 u;
        __half2 *h = (__half2 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++)
            h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
        *(uint4 *)p = u;
    }
    static __device__ __forceinline__ float ld1(const void *p, int64_t i) { return kc_ld((const __half *)p, i); }
    static __device__ __forceinline__ void st1(void *p, int64_t i, float v) { ((__half *)p)[i] = __float2half_rn(v); }
};
template <> struct kc_v8<float> {
    static __device__ __forceinline__ void load(const void *p, float *f) {
        const float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    }
    static __device__ __forceinline__ void store(void *p, const float *f) {
        ((float4 *)p)[0] = make_float4(f[0], f[1], f[2], f[3]);
        ((float4 *)p)[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    static __device__ __forceinline__ float ld1(const void *p, int64_t i) { return kc_ld((const float *)p, i); }
    static __device__ __forceinline__ void st1(void *p, int64_t i, float v) { ((float *)p)[i] = v; }
};

/* ---- locality ------------------------------------------------------------------------- */
static __device__ __forceinline__ bool kc_held(const kc_locality &l, int64_t p) {
    if (l.pair_pos)
        return l.pair_pos[p] >= 0;
    if (l.ids)
        return kc_local_slot(l.ids, l.map, l.n_experts, l.n_local, p) >= 0;
    return true;
}

/* ---- the sum over slots --------------------------------------------------------------- */
/* Where pair p's row is: a received row (loc.recv_of[p] >= 0), else its slot. Only the place
 * changes, never the values or the order of the sum. */
static __device__ __forceinline__ const char *kc_sum_src(const kc_locality &l, const void *slots, int64_t p, int64_t H,
                                                         int64_t h, size_t es) {
    const int32_t r = l.recv_of ? l.recv_of[p] : -1;
    return r >= 0 ? (const char *)l.recv_rows + ((size_t)r * (size_t)H + (size_t)h) * es
                  : (const char *)slots + ((size_t)p * (size_t)H + (size_t)h) * es;
}

/* The sum's batched form for elements other than 16-bit ones held as raw bytes: the held
 * slots' values (as floats) loaded together, then added in slot order. */
template <typename T, int V>
static __device__ __forceinline__ void kc_sum_batch_f(const kc_locality &loc, const void *slots, const bool *held,
                                                      int64_t p0, int64_t H, int64_t h, float *acc) {
    const size_t es = sizeof(T);
    float sv[8][V];
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
        if (!held[kk])
            continue;
        const char *src = kc_sum_src(loc, slots, p0 + kk, H, h, es);
        if (V == 8) {
            kc_v8<T>::load(src, sv[kk]);
        } else {
#pragma unroll
            for (int i = 0; i < V; i++)
                sv[kk][i] = kc_v8<T>::ld1(src, i);
        }
    }
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
        if (held[kk])
#pragma unroll
            for (int i = 0; i < V; i++)
                acc[i] += sv[kk][i];
}

template <typename T, int V, bool BATCH>
__global__ void kc_sum_kernel(const void *slots, kc_locality loc, const void *shared, void *y, int64_t T_, int32_t K,
                              int64_t H) {
    kc_pdl_wait();
    kc_pdl_trigger();
    const int64_t hv = H / V;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T_ * hv)
        return;
    const int64_t t = idx / hv, h = (idx % hv) * V;
    const size_t es = sizeof(T);
    float acc[V], v[V];
#pragma unroll
    for (int i = 0; i < V; i++)
        acc[i] = 0.0f;
    if (BATCH) {
        /* Eight slots at a time: their loads are independent (issued together), the
         * additions stay in slot order. For small grids, where latency is the cost. */
        for (int k0 = 0; k0 < K; k0 += 8) {
            bool held[8];
#pragma unroll
            for (int kk = 0; kk < 8; kk++)
                held[kk] = k0 + kk < K && kc_held(loc, t * K + k0 + kk);
            if (V == 8 && sizeof(T) == 2) {
                /* 16-bit elements: the raw 16 bytes of each slot held (4 registers, not 8), so
                 * that the kernel keeps its occupancy at mid T (run 54: the one-slot-at-a-time
                 * form took 17.8 us for Qwen3 T = 1024, 33.6 MB) */
                uint4 raw[8];
#pragma unroll
                for (int kk = 0; kk < 8; kk++)
                    if (held[kk])
                        raw[kk] = *(const uint4 *)kc_sum_src(loc, slots, t * K + k0 + kk, H, h, es);
#pragma unroll
                for (int kk = 0; kk < 8; kk++)
                    if (held[kk]) {
                        kc_v8<T>::load(&raw[kk], v);
#pragma unroll
                        for (int i = 0; i < V; i++)
                            acc[i] += v[i];
                    }
            } else {
                kc_sum_batch_f<T, V>(loc, slots, held, t * K + k0, H, h, acc);
            }
        }
    } else {
        /* One slot at a time: few registers, many threads in flight (large grids). */
        for (int k = 0; k < K; k++) {
            const int64_t p = t * K + k;
            if (!kc_held(loc, p))
                continue;
            const char *src = kc_sum_src(loc, slots, p, H, h, es);
            if (V == 8) {
                kc_v8<T>::load(src, v);
            } else {
#pragma unroll
                for (int i = 0; i < V; i++)
                    v[i] = kc_v8<T>::ld1(src, i);
            }
#pragma unroll
            for (int i = 0; i < V; i++)
                acc[i] += v[i];
        }
    }
    if (shared) {
        const char *src = (const char *)shared + ((size_t)t * (size_t)H + (size_t)h) * es;
        if (V == 8) {
            kc_v8<T>::load(src, v);
        } else {
#pragma unroll
            for (int i = 0; i < V; i++)
                v[i] = kc_v8<T>::ld1(src, i);
        }
#pragma unroll
        for (int i = 0; i < V; i++)
            acc[i] += v[i];
    }
    char *dst = (char *)y + ((size_t)t * (size_t)H + (size_t)h) * es;
    if (V == 8) {
        kc_v8<T>::store(dst, acc);
    } else {
#pragma unroll
        for (int i = 0; i < V; i++)
            kc_v8<T>::st1(dst, i, acc[i]);
    }
}

template <typename T>
static int kc_sum_t(const void *slots, kc_locality loc, const void *shared, void *y, int64_t T_, int32_t K, int64_t H,
                    int pdl, cudaStream_t st) {
    const bool vec = H % 8 == 0 && ((uintptr_t)slots % 16) == 0 && ((uintptr_t)y % 16) == 0 &&
                     (!shared || ((uintptr_t)shared % 16) == 0) && ((uintptr_t)loc.recv_rows % 16) == 0;
    const int64_t n = T_ * (vec ? H / 8 : H);
    const unsigned grid = (unsigned)((n + 255) / 256);
    /* Up to about two waves the whole sum is a few dependent loads per thread: batch the slot
     * loads (8 at a time, issued together). 16-bit elements: batched below 2048 CTAs (Qwen3
     * T = 1024: 1024 CTAs); fp32 (8 floats per slot held): below 512, as measured first. */
    const bool batch = grid < (sizeof(T) == 2 ? 2048u : 512u);
    if (vec && batch)
        return kc_launch_ex(kc_sum_kernel<T, 8, true>, dim3(grid), dim3(256), 0, st, pdl, slots, loc, shared, y, T_, K,
                            H);
    if (vec)
        return kc_launch_ex(kc_sum_kernel<T, 8, false>, dim3(grid), dim3(256), 0, st, pdl, slots, loc, shared, y, T_, K,
                            H);
    return kc_launch_ex(kc_sum_kernel<T, 1, false>, dim3(grid), dim3(256), 0, st, pdl, slots, loc, shared, y, T_, K, H);
}

extern "C" int kc_launch_sum(int32_t dtype, const void *slots, kc_locality loc, const void *shared, void *y, int64_t T,
                             int32_t K, int64_t H, int pdl, cudaStream_t st) {
    if (T * H == 0)
        return 0;
    switch (dtype) {
    case MOE_DTYPE_BF16:
        return kc_sum_t<__nv_bfloat16>(slots, loc, shared, y, T, K, H, pdl, st);
    case MOE_DTYPE_F16:
        return kc_sum_t<__half>(slots, loc, shared, y, T, K, H, pdl, st);
    case MOE_DTYPE_F32:
        return kc_sum_t<float>(slots, loc, shared, y, T, K, H, pdl, st);
    default:
        return (int)cudaErrorInvalidValue;
    }
}

/* ---- slot mode: zeros for the pairs held elsewhere ------------------------------------ */
/* One CTA per pair row (grid-stride over rows): the locality test once per row, then 16-byte
 * stores across the row (H % 8 == 0, checked by the caller). The first version tested
 * locality with a 64-bit division per element and took ~520 us for 65k pairs of H = 2048 on an
 * H200 (lab part 3, docs/PERF.md): as long as the products themselves. */
__global__ void kc_zero_kernel(kc_locality loc, uint4 *y, int64_t P, int64_t H8) {
    kc_pdl_wait();
    kc_pdl_trigger();
    const uint4 z = make_uint4(0u, 0u, 0u, 0u); /* +0.0 in bf16 and fp16 */
    for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
        if (kc_held(loc, p))
            continue;
        uint4 *row = y + p * H8;
        for (int64_t i = threadIdx.x; i < H8; i += blockDim.x)
            row[i] = z;
    }
}

extern "C" int kc_launch_zero_nonlocal(int32_t dtype, kc_locality loc, void *y, int64_t n_pairs, int64_t H, int pdl,
                                       cudaStream_t st) {
    if ((dtype != MOE_DTYPE_BF16 && dtype != MOE_DTYPE_F16) || H % 8 != 0 || ((uintptr_t)y & 15u) != 0)
        return (int)cudaErrorInvalidValue;
    if (n_pairs == 0 || H == 0)
        return 0;
    const int64_t grid = n_pairs < 65535 ? n_pairs : 65535;
    const int threads = H / 8 >= 256 ? 256 : (int)((H / 8 + 31) / 32 * 32);
    return kc_launch_ex(kc_zero_kernel, dim3((unsigned)grid), dim3(threads), 0, st, pdl, loc, (uint4 *)y, n_pairs,
                        H / 8);
}

/* ---- weight on the input -------------------------------------------------------------- */
template <typename T>
__global__ void kc_scale_x_kernel(const void *x, const float *w, void *xw, int64_t P, int32_t K, int64_t H) {
    kc_pdl_wait();
    kc_pdl_trigger();
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= P * H)
        return;
    const int64_t p = idx / H, h = idx % H;
    const float v = kc_v8<T>::ld1(x, (p / K) * H + h) * w[p];
    kc_v8<T>::st1(xw, idx, v);
}

extern "C" int kc_launch_scale_x(int32_t dtype, const void *x, const float *w, void *xw, int64_t n_pairs, int32_t K,
                                 int64_t H, int pdl, cudaStream_t st) {
    const int64_t n = n_pairs * H;
    if (n == 0)
        return 0;
    const unsigned grid = (unsigned)((n + 255) / 256);
    if (dtype == MOE_DTYPE_BF16)
        return kc_launch_ex(kc_scale_x_kernel<__nv_bfloat16>, dim3(grid), dim3(256), 0, st, pdl, x, w, xw, n_pairs, K, H);
    if (dtype == MOE_DTYPE_F16)
        return kc_launch_ex(kc_scale_x_kernel<__half>, dim3(grid), dim3(256), 0, st, pdl, x, w, xw, n_pairs, K, H);
    return (int)cudaErrorInvalidValue;
}

/* ---- shared-expert gate --------------------------------------------------------------- */
template <typename T>
__global__ void kc_gate_kernel(const void *x, const void *gate, float *g, int64_t T_, int64_t H) {
    kc_pdl_wait();
    kc_pdl_trigger();
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= T_)
        return;
    float s = 0.0f;
    for (int64_t h = lane; h < H; h += 32)
        s += kc_v8<T>::ld1(x, t * H + h) * kc_v8<T>::ld1(gate, h);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0)
        g[t] = 1.0f / (1.0f + expf(-s));
}

extern "C" int kc_launch_gate_dot(int32_t dtype, const void *x, const void *gate, float *g, int64_t T, int64_t H,
                                  int pdl, cudaStream_t st) {
    if (T == 0)
        return 0;
    const unsigned grid = (unsigned)((T + 3) / 4);
    if (dtype == MOE_DTYPE_BF16)
        return kc_launch_ex(kc_gate_kernel<__nv_bfloat16>, dim3(grid), dim3(128), 0, st, pdl, x, gate, g, T, H);
    if (dtype == MOE_DTYPE_F16)
        return kc_launch_ex(kc_gate_kernel<__half>, dim3(grid), dim3(128), 0, st, pdl, x, gate, g, T, H);
    return (int)cudaErrorInvalidValue;
}
