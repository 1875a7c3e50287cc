/*
 * kern_cuda_impl.h: private to kernels/cuda. The C interface between the host half of the
 * CUDA backend (kern_cuda.c, plain C11) and the device code (*.cu, CUDA C behind extern "C"
 * launchers). Every launcher enqueues work on the given stream and returns the cudaError_t of
 * the launch (0 = cudaSuccess) as an int; none synchronizes with the host.
 *
 * Ownership: the buffers passed in belong to the caller (the context's workspace or the
 * user's tensors); launchers keep no state between calls.
 *
 * Invariants the launchers rely on (kern_cuda.c checks them before a launch): H and I are
 * multiples of 8 (16-byte rows of bf16/fp16), dtypes are bf16 or fp16 for the matrix
 * products, and the workspace is at least as large as kc_ws_sizes() says.
 */
#ifndef KERN_CUDA_KERN_CUDA_IMPL_H
#define KERN_CUDA_KERN_CUDA_IMPL_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/kern.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The first bad value a kernel met. The record lives in mapped pinned host memory, written
 * with plain stores (no atomics over the bus); the first writer is chosen by an atomicCAS on a
 * claim word in device memory. The host reads the record after the stream's work finished
 * (kern_ctx_sync, or the next call) and turns it into MOE_ERR_INVALID_ARG. */
typedef struct kc_err {
    int32_t code;  /* KC_ERR_* */
    int32_t token;
    int32_t slot;
    int32_t value; /* the bad id / map entry */
    float fvalue;  /* the bad weight */
} kc_err;

typedef struct kc_errsink {
    kc_err *rec;    /* device view of the mapped host record */
    int32_t *claim; /* device memory, 0 = free */
} kc_errsink;

enum {
    KC_ERR_NONE = 0,
    KC_ERR_ID = 1,     /* expert id out of [0, n_experts) */
    KC_ERR_MAP = 2,    /* expert_map[id] out of [-1, n_local) */
    KC_ERR_WEIGHT = 3  /* routing weight not finite */
};

/* Which matrix instructions the products use. */
enum {
    KC_PATH_MMA = 1,   /* mma.sync m16n8k16 (HMMA): sm_80 and newer */
    KC_PATH_WGMMA = 2  /* wgmma m64nNk16 (HGMMA): sm_90a only */
};

enum { KC_MODE_GATE_UP = 0, KC_MODE_DOWN = 1 };

/* One grouped product, in the "weights as A" orientation (swap-AB): for each expert e and each
 * block of BN routed rows, D[rows of W_e, BN] = W_e[rows, K] . B[BN rows, K]^T, then the
 * epilogue. Column n of a tile is position pos = nb * BN + n of the expert-sorted order:
 *   routed (dense == 0): pair = sorted_rows[pos] (-1: padding, skipped);
 *        B row = b_by_pos ? pos : pair / b_div;  out row = out_by_pos ? pos : pair;
 *        scale = topk_w ? topk_w[pair] : none;   expert = block_expert[nb]
 *   dense (shared expert): t = pos (< n_dense), B row = t, out row = t,
 *        scale = row_scale ? row_scale[t] : none; expert 0
 * Gate-up epilogue: out[row, j] = round(act(D[j]) * D[I + j]) for j < M = I.
 * Down epilogue:    out[row, h] = round(D[h] * scale) for h < M = H. */
/* Pairs up to which the alignment-free ("small") mode can be used: a CTA per (pair, row
 * block) finds its expert's pairs itself. */
#define KC_SMALL_MAX_PAIRS 256

typedef struct kc_gemm_args {
    int32_t mode;  /* KC_MODE_* */
    int32_t dtype; /* MOE_DTYPE_BF16 or MOE_DTYPE_F16 */
    int32_t act;   /* kern_act (gate-up) */
    const void *w; /* [E_local][w_rows][K] */
    int64_t w_rows;
    int32_t M; /* I (gate-up) or H (down) */
    int32_t K; /* H (gate-up) or I (down) */
    const void *b;
    int32_t b_div;
    int32_t b_by_pos;
    int32_t out_by_pos;
    int32_t dense;
    int32_t n_dense;
    const int32_t *sorted_rows;
    const int32_t *block_expert;
    const int32_t *n_blocks; /* device scalar: blocks in use */
    int32_t max_blocks;      /* the grid's bound on n_blocks */
    void *out;
    int32_t out_ld;
    const float *topk_w;
    const float *row_scale;
    /* Small mode (no alignment): CTA row nb is pair nb; it computes the pairs of that pair's
     * expert (if nb is the expert's first pair) in chunks of BN; positions are pair indices
     * (B row = b_by_pos ? pair : pair / b_div, out row = pair). The gate-up launch checks each
     * pair (ids, map, topk_w_check finite) into err. */
    int32_t small;
    const int32_t *ids;
    const int32_t *map;
    int32_t n_experts;
    int32_t n_local;
    int32_t n_pairs;
    int32_t top_k;
    const float *topk_w_check;
    kc_errsink err;
    /* Launch with programmatic stream serialization (sm_90): the kernel waits for its inputs
     * with griddepcontrol.wait and lets the next kernel launch early. */
    int32_t pdl;
    /* Small-mode extras (kc_gemm_kernel only; all zero = off; docs/PERF.md runs 15-16).
     * Gate-up: pf_w != NULL: each working CTA (expert e, row block rb of n_rb) prefetches into
     * the L2 (cp.async.bulk.prefetch, sm_90, evict_last) the rows [rb pf_rows / n_rb,
     * (rb + 1) pf_rows / n_rb) of pf_w[e] ([E_local][pf_rows][pf_row_bytes], the down weights),
     * the last pf_tail bytes of each row (pf_tail == pf_row_bytes: whole rows).
     * evict_first: the weight loads with the L2 evict_first policy (streamed once).
     * early_a: the first weight stages issued before the duplicate check and the compaction. */
    const void *pf_w;
    int32_t pf_rows;
    int32_t pf_row_bytes;
    int32_t pf_tail;
    int32_t evict_first;
    int32_t early_a;
    /* Down, small mode: the sum over top-k folded in. fold_y != NULL: after writing its
     * contributions, the CTA counts them per (token, row block) on fold_ctr[t * n_rb + rb]
     * ((seq << 32) | arrivals, seq = fold_seq, new each call: never reset); the CTA whose arrival
     * completes a token's held pairs sums that token's slots of the row block in slot order from
     * +0.0 (as kc_sum_kernel) into fold_y [T, M]. Tokens with no held pair get +0.0 rows. */
    void *fold_y;
    unsigned long long *fold_ctr;
    uint32_t fold_seq;
    /* Lab only, wrong outputs (MOE_CUDA_LAB_BREAK; the TMA-fed tiles): what a part of the kernel
     * costs, by leaving it out. 1: no epilogue (nothing stored); 2: no proxy fence before the
     * wgmma of each k block; 4: the routed rows not read (zero-filled stages); 8: the epilogue's
     * global stores left out; 16: its shared-memory writes (and the activation) left out. */
    int32_t lab_break;
    /* The persistent tiles ((7 .. 9, 128)): at most this many CTAs (0: one per SM); the SMs
     * left over run other streams' kernels meanwhile (kern_cuda_set_sm_reserve). */
    int32_t grid_cap;
    /* The 128-column TMA-fed tiles ((5, 128) .. (9, 128)): each tile's wgmma N cut to its columns
     * in use, rounded up to 16 (an expert's last block of a few rows costs those rows, not 128
     * columns); the same bits either way (kern_cuda_set_fit_n; 0 for the lab's A/B). */
    int32_t fit_n;
    /* The persistent tiles ((7, 128), (8, 128)): sched != NULL hands the tiles out in raster
     * order as CTAs ask (two device counters, 0 before the launch and left 0 after it; one pair
     * per launch site of a context: see kc_sched_next); NULL: a fixed share per CTA. fit_n takes
     * effect in these tiles only with sched (kern_cuda_set_dyn_sched). */
    unsigned int *sched;
    /* With sched: while the word at yield_flag is nonzero, the last yield_n CTAs of the grid take
     * no more tiles (kern_cuda_set_yield; NULL: never). The same tiles, the same bits. */
    const int32_t *yield_flag;
    int32_t yield_n;
} kc_gemm_args;

/* Tile configurations: NWG consumer warpgroups (128 weight rows each), BN routed rows. */
typedef struct kc_tile_cfg {
    int32_t nwg;
    int32_t bn;
} kc_tile_cfg;

/* Whether (path, nwg, bn) is compiled in. */
int kc_gemm_has_cfg(int path, int nwg, int bn);
int kc_launch_gemm(const kc_gemm_args *a, int path, int nwg, int bn, cudaStream_t st);

/* The small mode's gate-up and down products in one persistent launch (at most one CTA per SM,
 * n_sm of them): down tiles wait on per-expert counters ctr[KC_SMALL_MAX_PAIRS] (device
 * memory, never reset: seq must differ from the previous call's). Tiles (1, bn). */
int kc_launch_small_fused(const kc_gemm_args *gu, const kc_gemm_args *dn, int path, int bn, unsigned long long *ctr,
                          uint32_t seq, int n_sm, cudaStream_t st);

/* Routing: logits [T, E] (f32/f16/bf16) -> ids [T, K], w [T, K]. E <= KC_ROUTE_MAX_E. */
#define KC_ROUTE_MAX_E 1024
int kc_launch_route(const kern_route_params *p, const void *logits, int32_t dtype, int64_t T, int32_t *ids,
                    float *w, cudaStream_t st);

/* Router logits: logits[t, e] = x[t] . router[e] in fp32 (one fixed order per logit, whatever
 * the tile). tile: -1 picks by T, E and the SM count n_sm; 0 .. n-1 forces one of the warp tiles
 * kc_router_logits_tiles lists as (tokens, experts) pairs (returns how many there are). */
int kc_router_logits_tiles(int32_t *out, int32_t cap);
int kc_launch_router_logits(int32_t dtype, const void *x, const float *router, float *logits, int64_t T, int64_t E,
                            int64_t H, int tile, int n_sm, cudaStream_t st);

/* Alignment: sorts the (token, slot) pairs by local expert into blocks of bn rows (each
 * expert's rows padded to a multiple of bn with -1), checks ids, the map and the weights
 * (errors into err; a bad pair is skipped), and writes:
 *   pair_pos[p]      position of pair p in sorted order, or -1 (expert held elsewhere / bad)
 *   sorted_rows[i]   pair at position i, or -1 (padding); i < n_blocks * bn
 *   block_expert[b]  local expert of block b; n_blocks[0] = blocks in use
 * pair != 0: every expert's block count rounded up to even (an all-padding block added), for
 * the 2-CTA cluster tile (9, 128), whose CTA pairs take blocks 2i and 2i + 1 of one expert.
 * One CTA; n_local <= KC_ALIGN_MAX_LOCAL (shared-memory counters). */
#define KC_ALIGN_MAX_LOCAL 8192
int kc_launch_align(const int32_t *ids, const float *w, int64_t n_pairs, int32_t top_k, const int32_t *map,
                    int32_t n_experts, int32_t n_local, int32_t bn, int32_t pair, int32_t *pair_pos, int32_t *sorted_rows,
                    int32_t *block_expert, int32_t *n_blocks, kc_errsink err, int pdl, cudaStream_t st);

/* Which pairs are held here, for the kernels after the products: pair_pos[p] < 0 (after an
 * alignment), else the expert of ids[p] under map (small mode); neither: all pairs. */
typedef struct kc_locality {
    const int32_t *pair_pos;
    const int32_t *ids;
    const int32_t *map;
    int32_t n_experts;
    int32_t n_local;
    /* the sum only: pair p's row is recv_rows[recv_of[p]] where recv_of[p] >= 0, else the slot
     * (kern_cuda_moe_sum_recv: rows received by an exchange, summed where they landed) */
    const int32_t *recv_of;
    const void *recv_rows;
} kc_locality;

/* The misc launchers take `pdl` (launch with programmatic stream serialization, sm_90 only). */

/* The same for large batches, in three launches (count with many CTAs, scan, place);
 * scratch: 2 * n_local int32. */
int kc_launch_align_mc(const int32_t *ids, const float *w, int64_t n_pairs, int32_t top_k, const int32_t *map,
                       int32_t n_experts, int32_t n_local, int32_t bn, int32_t pair, int32_t *pair_pos, int32_t *sorted_rows,
                       int32_t *block_expert, int32_t *n_blocks, int32_t *scratch, kc_errsink err, int pdl,
                       cudaStream_t st);
/* From here on the three-launch version; below it, the one-CTA kernel holds every pair in
 * registers (KC_ALIGN_MC_MIN_PAIRS / 1024 per thread). */
#define KC_ALIGN_MC_MIN_PAIRS 16384 /* the one-CTA kernel's most (its registers) */
/* The automatic choice: one CTA below this, three launches from it (lab --align, run 64: one
 * CTA 470 against 477 us at Qwen3 T = 512 (4096 pairs); three launches 465 against 481 at
 * DeepSeek-V2-Lite T = 1024 (6144), 490 against 506 at Qwen3 T = 1024 (8192)). */
#define KC_ALIGN_ONE_CTA_BELOW 6144

/* y[t, h] = round(sum_k slots[t, k, h] (k ascending, from +0.0, skipping pairs not held here)
 * + shared[t, h] (when given)); all of dtype. */
int kc_launch_sum(int32_t dtype, const void *slots, kc_locality loc, const void *shared, void *y, int64_t T, int32_t K,
                  int64_t H, int pdl, cudaStream_t st);

/* Slot mode: y[p, :] = +0.0 for each pair p not held here. */
int kc_launch_zero_nonlocal(int32_t dtype, kc_locality loc, void *y, int64_t n_pairs, int64_t H, int pdl,
                            cudaStream_t st);

/* weight_on_input: xw[p, :] = round(x[p / K, :] * w[p]) for every pair. */
int kc_launch_scale_x(int32_t dtype, const void *x, const float *w, void *xw, int64_t n_pairs, int32_t K, int64_t H,
                      int pdl, cudaStream_t st);

/* Shared-expert gate: g[t] = sigmoid(x[t] . gate) in fp32. */
int kc_launch_gate_dot(int32_t dtype, const void *x, const void *gate, float *g, int64_t T, int64_t H, int pdl,
                       cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif /* KERN_CUDA_KERN_CUDA_IMPL_H */
