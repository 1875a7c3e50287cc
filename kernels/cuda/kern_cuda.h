/*
 * kern_cuda.h: the CUDA backend's own knobs, beyond kern.h. Everything here is optional: a
 * context made by kern_ctx_init(KERN_BACKEND_CUDA) works without any of it.
 *
 * Threads: like the context they take (one thread at a time).
 *
 * Workspace: a context owns its scratch (the permutation arrays, the [rows, I] intermediate,
 * the [T*K, H] per-slot contributions, the shared expert's buffers). It is sized on first use
 * and grown with cudaMallocAsync on the context's stream, never with a host synchronization;
 * kern_cuda_reserve sizes it up front (a worker calls it once with its max_step_tokens).
 *
 * Errors found on the device (an expert id out of range, a bad expert-map entry, a weight
 * that is not finite) skip the bad pair and are reported by kern_ctx_sync, or by the next call
 * on the context, as MOE_ERR_INVALID_ARG naming the token and slot.
 */
#ifndef KERN_CUDA_KERN_CUDA_H
#define KERN_CUDA_KERN_CUDA_H

#include "kernels/kern.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The matrix instructions of the grouped products. AUTO: wgmma on sm_90 (H100/H200),
 * mma.sync elsewhere. Results are bit-identical across T and tile shapes within one path; see
 * docs/PERF.md for whether the two paths agree with each other. */
typedef enum kern_cuda_path {
    KERN_CUDA_PATH_AUTO = 0,
    KERN_CUDA_PATH_MMA = 1,  /* mma.sync m16n8k16 (sm_80+) */
    KERN_CUDA_PATH_WGMMA = 2 /* wgmma m64nNk16 (sm_90a) */
} kern_cuda_path;

/* kern_moe_sum where some pairs' rows were received by an exchange and stay where they landed:
 * y[t] = round(sum_k row(t, k) (k ascending, from +0.0) + shared[t]), row(t, k) = recv_rows
 * [recv_of[t K + k]] where recv_of[t K + k] >= 0, else slots[t, k]. The same values summed in
 * the same order as kern_moe_sum over the slots they would have been copied into, so the same
 * bits, without the copy. recv_of: device int32 [T K]; recv_rows: device rows of slots' dtype
 * and H, 16-byte aligned. */
moe_status kern_cuda_moe_sum_recv(kern_ctx_t *ctx, const moe_tensor *slots, const int32_t *recv_of,
                                  const void *recv_rows, const moe_tensor *shared, moe_tensor *y);

/* Sizes the workspace for calls up to these sizes (0 for an unused part: shared_inter = 0
 * without a shared expert). MOE_ERR_CUDA if the device memory is not there. */
moe_status kern_cuda_reserve(kern_ctx_t *ctx, int64_t max_tokens, int32_t top_k, int64_t hidden, int64_t inter,
                             int32_t n_local, int64_t shared_inter);

/* Chooses the instruction path (MOE_ERR_UNSUPPORTED: wgmma on a card that is not sm_90). */
moe_status kern_cuda_set_path(kern_ctx_t *ctx, kern_cuda_path path);
/* The path that calls use now (never AUTO). */
kern_cuda_path kern_cuda_get_path(const kern_ctx_t *ctx);

/* Forces the tile of the grouped products (the kernel lab and the tests use it): nwg
 * warpgroups of 128 weight rows, bn routed rows per tile; (3, 128) is the warp-specialized
 * wgmma kernel (a producer warpgroup and two consumers of the (2, 128) tile), (4, 128) the
 * (2, 128) tile with one more stage of lead (wgmma only), (5, 128) the (2, 128) tile fed by the
 * bulk tensor copy engine (wgmma only; the automatic choice on sm_90a from 81 to 256 rows per
 * expert), (6, 128) the same with the routed rows also by the copy engine (wgmma only), (7, 128)
 * the (5, 128) tile in a persistent grid (one CTA per SM walks the tiles; the loads of the next
 * tile run during the epilogue), (8, 128) the same with SiLU's division by the fast path where
 * it is exact (the automatic choice above 256 rows per expert on sm_90a); (0, 0) restores the
 * automatic choice. MOE_ERR_INVALID_ARG for a tile that is not compiled in (see
 * kern_cuda_tiles). */
moe_status kern_cuda_set_tile(kern_ctx_t *ctx, int32_t nwg, int32_t bn);
/* The compiled tiles of a path, as (nwg, bn) pairs into out[2 * i], out[2 * i + 1]; returns
 * how many there are (at most cap are written). */
int32_t kern_cuda_tiles(kern_cuda_path path, int32_t *out, int32_t cap);

/* Pairs (T * top_k) up to which a call skips the alignment kernel (each CTA finds the pairs of
 * its expert itself; 0 turns this off; at most 256). Same bits either way. */
moe_status kern_cuda_set_small_max(kern_ctx_t *ctx, int32_t max_pairs);

/* In the alignment-free mode, run the gate-up and down products in one persistent launch
 * (default off: it measured slower on H100 than two launches with PDL, docs/PERF.md). Same
 * bits either way. */
moe_status kern_cuda_set_fused(kern_ctx_t *ctx, bool on);

/* Options of the alignment-free (small-T) mode, a mask of these bits; the same bits either way.
 *   FOLD_SUM: in sum mode (kern_fused_experts without a shared expert), the down product's
 *     CTAs also do the sum over top-k: the one whose contribution completes a token's row block
 *     sums its slots in slot order (integer counters, no floating-point atomics; the separate
 *     sum kernel is not launched).
 *   PREFETCH_W2: the gate-up CTAs prefetch the down weights of their experts into the L2
 *     (sm_90 bulk prefetch, evict_last), as much as fits in 60% of it.
 *   EVICT_FIRST: both products' weight loads carry the L2 evict_first policy (streamed once:
 *     they replace each other in the L2 rather than what was there), where the call's weights
 *     (at most min(pairs, local experts) x 3 H I) are at most 8 L2s. On by default.
 *   EARLY_A: the first weight stages are issued as soon as a CTA knows its expert, before the
 *     duplicate check and the compaction of its pairs.
 * The default is in kern_cuda.c (KC_SMALL_OPTS_DEFAULT); MOE_CUDA_SMALL_OPTS=N in the
 * environment overrides it at context creation (the lab's and the benchmark's before/after).
 * Measured in the lab's --small part (docs/PERF.md, runs 15-16). */
enum {
    KERN_CUDA_SMALL_FOLD_SUM = 1,
    KERN_CUDA_SMALL_PREFETCH_W2 = 2,
    KERN_CUDA_SMALL_EVICT_FIRST = 4,
    KERN_CUDA_SMALL_EARLY_A = 8,
    KERN_CUDA_SMALL_ALL = 15
};
moe_status kern_cuda_set_small_opts(kern_ctx_t *ctx, uint32_t opts);
uint32_t kern_cuda_get_small_opts(const kern_ctx_t *ctx);

/* The kernel lab only: each kern_fused_experts call enqueues only its first `kernels` product
 * kernels (1: gate-up; 2: gate-up and down; the sum is left out for either; 0: everything, the
 * default), so that the lab can time the parts of a call. The output is then not written. */
moe_status kern_cuda_set_lab_stop(kern_ctx_t *ctx, int32_t kernels);

/* The kernel lab and the tests: which alignment of (token, slot) pairs the aligned mode runs:
 * 0 (the default) by the batch's size, 1 one CTA (below 16384 pairs; three launches above),
 * 2 three launches (count, scan, place). Both give the same outputs. */
moe_status kern_cuda_set_align(kern_ctx_t *ctx, int32_t mode);

/* SMs that the persistent product tiles leave free (0, the default: one CTA per SM), so that a
 * kernel on another stream (the GPU worker's exchange during dual-batch overlap) runs beside
 * them instead of after them. The same tiles in the same order: the same bits. At most the
 * device's SMs - 8. While n > 0 the kernels launch without PDL (kern_cuda_set_pdl): a kernel
 * launched early would put its CTAs on the free SMs to wait for its predecessor. */
moe_status kern_cuda_set_sm_reserve(kern_ctx_t *ctx, int32_t n);

/* The kernel lab and the tests: whether the 128-column tiles fed by the bulk tensor copy engine
 * ((5, 128) .. (9, 128)) cut each tile's wgmma N to the columns it uses (on, the default: an
 * expert's last block of a few rows then costs about those rows instead of 128 columns). The
 * same bits either way. */
moe_status kern_cuda_set_fit_n(kern_ctx_t *ctx, bool on);

/* The kernel lab and the tests: how the persistent tiles ((7, 128), (8, 128)) share out their
 * tiles: on (the default), in raster order as CTAs ask (a device counter per launch site), so
 * that the CTAs in flight stay on neighbouring tiles whatever each costs; off, a fixed share per
 * CTA (tiles i, i + grid, ..). The cut N of kern_cuda_set_fit_n applies to these tiles only
 * when on. The same bits either way. */
moe_status kern_cuda_set_dyn_sched(kern_ctx_t *ctx, bool on);

/* SMs lent to other streams while they ask (the GPU worker's exchange during dual-batch overlap):
 * while the device word *flag (4-byte aligned; the other stream sets it, e.g. by
 * cudaMemsetAsync, and clears it) is nonzero, the last n CTAs (never the first) of a routed
 * product's persistent grid take no more tiles and leave, the others take the tiles left (with
 * kern_cuda_set_dyn_sched on, the default). A CTA that has left does not come back in that
 * launch. n in [1, SMs - 8]; flag NULL: off (the default). The same tiles: the same bits. While
 * a flag is set the kernels launch without PDL, as with kern_cuda_set_sm_reserve. */
moe_status kern_cuda_set_yield(kern_ctx_t *ctx, const int32_t *flag, int32_t n);

/* The kernel lab only: the router logits' warp tile (kern_router_logits): -1 (the default) picks
 * by the batch's size, 0 .. n-1 forces the n-th tile of kern_cuda_router_tiles, which writes the
 * (tokens, experts) pairs of the tiles into out[2 i], out[2 i + 1] and returns how many there are
 * (at most cap written). Every tile sums each logit in the same order: same bits. */
moe_status kern_cuda_set_router_tile(kern_ctx_t *ctx, int32_t tile);
int32_t kern_cuda_router_tiles(int32_t *out, int32_t cap);

/* Programmatic dependent launch between the kernels of a call (on by default on sm_90: the
 * next kernel starts streaming its weights while the previous one finishes). */
moe_status kern_cuda_set_pdl(kern_ctx_t *ctx, bool on);

/* The context's cudaStream_t (as void *), for callers that order their own work with it. */
void *kern_cuda_stream(kern_ctx_t *ctx);

#ifdef __cplusplus
}
#endif
#endif /* KERN_CUDA_KERN_CUDA_H */
