/*
 * kern_cuda.c: the host half of the CUDA backend (kern_cuda_ops): contexts, the workspace,
 * the choice of tile and instruction path, and the sequence of launches of each op. Plain C11
 * over the CUDA runtime; the kernels are behind the extern "C" launchers of kern_cuda_impl.h.
 *
 * Ownership and threads: a context belongs to one thread at a time (kern.h). It owns a stream
 * (or uses the caller's), a side stream for the shared expert, two events, the workspace
 * buffers and the error record. Nothing here synchronizes with the device except
 * kern_ctx_sync, context creation and free: each op only enqueues work.
 *
 * Invariants: tensors are device pointers; kern.c has checked shapes, dtypes and aliasing
 * (host_data = false, so ids, the map and the weights are checked on the device: a bad pair is
 * skipped, never read out of bounds, and reported as MOE_ERR_INVALID_ARG by kern_ctx_sync or
 * the next call). Workspace buffers only grow, stream-ordered (cudaMallocAsync/cudaFreeAsync on
 * the context's stream), so no call waits for the device.
 */
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "kernels/cuda/kern_cuda.h"
#include "kernels/cuda/kern_cuda_impl.h"
#include "kernels/kern_impl.h"

/* Pairs (T * K) up to which the products run without the alignment kernel (measured in the
 * kernel lab, docs/PERF.md). */
#define KC_SMALL_DEFAULT 64
/* The small-T options on by default (kern_cuda_set_small_opts; docs/PERF.md runs 15-16):
 * evict_first alone. In run 16's lab it was the only mask faster than none on average (Qwen3
 * T = 1 44.3 -> 41.1 us, DeepSeek T = 1 53.7 -> 49.7; bench 51.3 -> 46.9 and 58.9 -> 53.6), and
 * only where the call's weights are a few L2s at most (KC_EVF_MAX_L2). The folded sum, the W2
 * prefetch and the early stages were each slower (PERF.md). */
#define KC_SMALL_OPTS_DEFAULT ((uint32_t)KERN_CUDA_SMALL_EVICT_FIRST)
/* evict_first only where the most weight bytes a call can read (min(pairs, local experts) x
 * 3 H I) are at most this many L2s: run 16 measured it 1-9% faster up to 302 MB (Qwen3 T = 1-4,
 * DeepSeek T = 1) and 1.7-2.2% slower from 604 MB (Qwen3 and DeepSeek T = 8, Mixtral T = 1). */
#define KC_EVF_MAX_L2 8
/* The share of the L2 that the prefetched down weights may take (the gate-up stream and the
 * routed rows need the rest). */
#define KC_PF_L2_SHARE 0.6
/* The wgmma N cut to a tile's columns in use (kern_cuda_set_fit_n) only in products whose k
 * walk is at most this long. Run 72 (lab --fit, H100): faster on Qwen3-30B-A3B and
 * DeepSeek-V2-Lite (K = 768 .. 2048) at 48 .. 768 rows per expert (-3 to -6%), slower on
 * Mixtral (K = 4096 and 14336) at 128 and 256 rows (+2 to +6%): there an expert's last, cut tile
 * runs through its k walk ahead of the full tiles that read the same weight rows, which are
 * then read from memory again (a weight stage's lifetime in the L2 is about the L2 over the
 * streaming rate, ~15 us; a full tile's k walk at K = 4096 is about that). */
#define KC_FIT_N_MAX_K 3072

typedef struct kc_buf {
    void *p;
    size_t cap;
} kc_buf;

typedef struct kc_state {
    int device;
    int cc_major, cc_minor;
    int n_sm;
    cudaStream_t stream;
    bool own_stream;
    cudaStream_t side;
    cudaEvent_t ev_fork, ev_join;
    kern_cuda_path path;
    int32_t force_nwg, force_bn;
    int32_t small_max; /* pairs up to which the alignment-free mode is used */
    bool fused;        /* small mode: both products in one persistent launch */
    unsigned long long *fuse_ctr; /* [KC_SMALL_MAX_PAIRS] device counters of the fused launch */
    unsigned int *sched; /* [KC_SCHED_SITES][2] tile counters of the persistent tiles (kc_gemm_args.sched) */
    bool dyn_sched;      /* kern_cuda_set_dyn_sched, on by default */
    const int32_t *yield_flag; /* kern_cuda_set_yield (kc_gemm_args.yield_flag, yield_n) */
    int32_t yield_n;
    uint32_t fuse_seq;            /* the last call's sequence number (never 0 after the first) */
    int pdl;           /* programmatic dependent launch (sm_90), as the launches use it: pdl_want, and
                          no SMs lent (pdl_update) */
    bool pdl_want;     /* kern_cuda_set_pdl (on by default on sm_90) */
    uint32_t small_opts; /* KERN_CUDA_SMALL_* (alignment-free mode only) */
    int64_t l2_bytes;    /* the device's L2 */
    uint32_t fold_seq;   /* the last folded call's sequence number (never 0 after the first) */
    int32_t lab_stop;    /* kern_cuda_set_lab_stop */
    int32_t router_tile; /* kern_cuda_set_router_tile: -1 automatic */
    int32_t lab_break;   /* MOE_CUDA_LAB_BREAK (kc_gemm_args.lab_break) */
    int32_t sm_reserve;  /* kern_cuda_set_sm_reserve */
    bool fit_n;          /* kern_cuda_set_fit_n (kc_gemm_args.fit_n), on by default */
    kc_err *err_host; /* mapped pinned */
    kc_err *err_dev;  /* its device view */
    int32_t *claim;   /* device */
    kc_buf pair_pos, sorted_rows, block_expert, n_blocks, abuf, slots, xw, sh_abuf, sh_out, gate, align_scratch;
    int32_t align_mode; /* kern_cuda_set_align: 0 automatic */
    kc_buf fold_ctr; /* [T * ceil(H / 64)] counters of the folded sum, zeroed when (re)allocated */
} kc_state;

static kc_state *st_of(kern_ctx_t *ctx) { return (kc_state *)ctx->impl; }

/* Kernels launch early (PDL) unless SMs are lent to other streams (kern_cuda_set_sm_reserve,
 * kern_cuda_set_yield): a kernel launched early puts its CTAs on the SMs set free, to wait there
 * for its predecessor, and the other stream finds none (engine runs 79-80, docs/PERF.md). */
static void pdl_update(kc_state *s) { s->pdl = s->pdl_want && !s->yield_flag && s->sm_reserve == 0; }

/* The launch sites of the persistent tiles, each with its own pair of tile counters (the shared
 * expert's products may run on another stream beside the routed ones). */
enum { KC_SCHED_GATE_UP, KC_SCHED_DOWN, KC_SCHED_SHARED_GATE_UP, KC_SCHED_SHARED_DOWN, KC_SCHED_SITES };
static unsigned int *sched_of(const kc_state *s, int site) { return s->dyn_sched ? s->sched + 2 * site : NULL; }

/* ------------------------------------------------------------------------------------------
 * Workspace.
 * ---------------------------------------------------------------------------------------- */
static moe_status buf_ensure(kc_state *s, kc_buf *b, size_t bytes) {
    if (bytes <= b->cap && b->p)
        return MOE_OK;
    size_t want = bytes < 256 ? 256 : bytes;
    if (b->cap && want < b->cap + b->cap / 2)
        want = b->cap + b->cap / 2; /* grow by half at least: few regrowths */
    if (b->p) {
        MOE_CUDA_CHECK(cudaFreeAsync(b->p, s->stream));
        b->p = NULL;
        b->cap = 0;
    }
    cudaError_t e = cudaMallocAsync(&b->p, want, s->stream);
    if (e != cudaSuccess) {
        b->p = NULL;
        (void)cudaGetLastError();
        return moe_fail(MOE_ERR_CUDA, "cuda backend: workspace of %zu bytes: %s", want, cudaGetErrorString(e));
    }
    b->cap = want;
    return MOE_OK;
}

static void buf_free(kc_state *s, kc_buf *b) {
    if (b->p)
        (void)cudaFreeAsync(b->p, s->stream);
    b->p = NULL;
    b->cap = 0;
}

/* Rows of the expert-sorted order for n_pairs pairs in blocks of bn (each expert padded). */
static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Blocks an alignment can use: ceil(P / bn) + one partial block per busy expert (pair: + one
 * more, each expert's count rounded up to even for the cluster tile). */
static int64_t max_blocks_for(int64_t n_pairs, int32_t n_local, int32_t bn, bool pair) {
    int64_t busy = n_local < n_pairs ? n_local : n_pairs;
    return (n_pairs + bn - 1) / bn + (pair ? 2 : 1) * busy;
}

/* ------------------------------------------------------------------------------------------
 * Device-side errors.
 * ---------------------------------------------------------------------------------------- */
static moe_status check_device_errors(kc_state *s) {
    volatile kc_err *r = s->err_host;
    int32_t code = r->code;
    if (code <= 0)
        return MOE_OK;
    kc_err e = {code, r->token, r->slot, r->value, r->fvalue};
    r->code = 0;
    MOE_CUDA_CHECK(cudaMemsetAsync(s->claim, 0, sizeof(int32_t), s->stream));
    switch (e.code) {
    case KC_ERR_ID:
        return moe_fail(MOE_ERR_INVALID_ARG,
                        "fused_experts: expert id %d out of range at token %d, slot %d (found on the device; the "
                        "pair was skipped)",
                        (int)e.value, (int)e.token, (int)e.slot);
    case KC_ERR_MAP:
        return moe_fail(MOE_ERR_INVALID_ARG,
                        "fused_experts: expert_map entry %d not in [-1, n_local) for the id at token %d, slot %d "
                        "(found on the device; the pair was skipped)",
                        (int)e.value, (int)e.token, (int)e.slot);
    case KC_ERR_WEIGHT:
        return moe_fail(MOE_ERR_INVALID_ARG,
                        "fused_experts: routing weight %g is not finite at token %d, slot %d (found on the device)",
                        (double)e.fvalue, (int)e.token, (int)e.slot);
    default:
        return moe_fail(MOE_ERR_INTERNAL, "cuda backend: unknown device error code %d", (int)e.code);
    }
}

/* ------------------------------------------------------------------------------------------
 * Context.
 * ---------------------------------------------------------------------------------------- */
static void cuda_free(kern_ctx_t *ctx);

static moe_status cuda_init(kern_ctx_t *ctx) {
    moe_status st = MOE_OK;
    int n = 0;
    cudaError_t ce = cudaGetDeviceCount(&n);
    if (ce != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        return moe_fail(MOE_ERR_UNSUPPORTED, "cuda backend: no CUDA device (%s)",
                        ce != cudaSuccess ? cudaGetErrorString(ce) : "device count 0");
    }
    const int dev = ctx->params.device;
    MOE_REQUIRE(dev >= 0 && dev < n, MOE_ERR_INVALID_ARG, "cuda backend: device %d not in [0, %d)", dev, n);
    kc_state *s = calloc(1, sizeof *s);
    if (!s)
        return moe_fail(MOE_ERR_NOMEM, "cuda backend: context");
    ctx->impl = s;
    s->device = dev;
    MOE_CUDA_CHECK_GOTO(cudaSetDevice(dev), st, fail);
    struct cudaDeviceProp prop;
    MOE_CUDA_CHECK_GOTO(cudaGetDeviceProperties(&prop, dev), st, fail);
    s->cc_major = prop.major;
    s->cc_minor = prop.minor;
    s->n_sm = prop.multiProcessorCount;
    if (s->cc_major < 8) {
        st = moe_fail(MOE_ERR_UNSUPPORTED, "cuda backend: device %d (%s) is sm_%d%d; sm_80 or newer is needed", dev,
                      prop.name, s->cc_major, s->cc_minor);
        goto fail;
    }
    if (ctx->params.stream) {
        s->stream = (cudaStream_t)ctx->params.stream;
    } else {
        MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), st, fail);
        s->own_stream = true;
    }
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&s->side, cudaStreamNonBlocking), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&s->ev_fork, cudaEventDisableTiming), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&s->ev_join, cudaEventDisableTiming), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaHostAlloc((void **)&s->err_host, sizeof(kc_err), cudaHostAllocMapped), st, fail);
    memset(s->err_host, 0, sizeof(kc_err));
    MOE_CUDA_CHECK_GOTO(cudaHostGetDevicePointer((void **)&s->err_dev, s->err_host, 0), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&s->claim, sizeof(int32_t)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMemset(s->claim, 0, sizeof(int32_t)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&s->fuse_ctr, KC_SMALL_MAX_PAIRS * sizeof(unsigned long long)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMemset(s->fuse_ctr, 0, KC_SMALL_MAX_PAIRS * sizeof(unsigned long long)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&s->sched, KC_SCHED_SITES * 2 * sizeof(unsigned int)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMemset(s->sched, 0, KC_SCHED_SITES * 2 * sizeof(unsigned int)), st, fail);
    s->fused = false; /* measured slower than two launches with PDL (docs/PERF.md, lab run 6) */

    s->path = (s->cc_major == 9 && s->cc_minor == 0) ? KERN_CUDA_PATH_WGMMA : KERN_CUDA_PATH_MMA;
    s->pdl_want = s->cc_major >= 9;
    pdl_update(s);
    s->small_max = KC_SMALL_DEFAULT;
    s->small_opts = KC_SMALL_OPTS_DEFAULT;
    s->router_tile = -1;
    s->fit_n = true;
    s->dyn_sched = true;
    s->l2_bytes = prop.l2CacheSize;
    const char *env = getenv("MOE_CUDA_SMALL_OPTS"); /* the lab's and the bench's before/after */
    if (env && env[0]) {
        char *end = NULL;
        const unsigned long v = strtoul(env, &end, 0);
        if (*end != '\0' || v > KERN_CUDA_SMALL_ALL) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "MOE_CUDA_SMALL_OPTS='%.16s': expected a mask of 0..%d", env,
                          (int)KERN_CUDA_SMALL_ALL);
            goto fail;
        }
        s->small_opts = (uint32_t)v;
    }
    env = getenv("MOE_CUDA_LAB_BREAK"); /* the lab's decomposition of the TMA-fed tiles: wrong outputs */
    if (env && env[0]) {
        char *end = NULL;
        const unsigned long v = strtoul(env, &end, 0);
        if (*end != '\0' || v > 31) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "MOE_CUDA_LAB_BREAK='%.16s': expected a mask of 0..31", env);
            goto fail;
        }
        s->lab_break = (int32_t)v;
        if (v)
            MOE_WARN(MOE_SUB_KERN, "cuda backend: MOE_CUDA_LAB_BREAK=%lu: the large tiles leave parts out, outputs "
                                   "are wrong (a lab measurement only)", v);
    }
    env = getenv("MOE_CUDA_PATH");
    if (env && env[0]) {
        if (strcmp(env, "mma") == 0) {
            s->path = KERN_CUDA_PATH_MMA;
        } else if (strcmp(env, "wgmma") == 0) {
            if (s->path != KERN_CUDA_PATH_WGMMA) {
                st = moe_fail(MOE_ERR_UNSUPPORTED, "MOE_CUDA_PATH=wgmma needs an sm_90 device (this is sm_%d%d)",
                              s->cc_major, s->cc_minor);
                goto fail;
            }
        } else if (strcmp(env, "auto") != 0) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "MOE_CUDA_PATH='%.16s': expected auto, mma or wgmma", env);
            goto fail;
        }
    }
    MOE_DEBUG(MOE_SUB_KERN, "cuda backend: device %d %s sm_%d%d, %d SMs, path %s", dev, prop.name, s->cc_major,
              s->cc_minor, s->n_sm, s->path == KERN_CUDA_PATH_WGMMA ? "wgmma" : "mma");
    return MOE_OK;
fail:
    cuda_free(ctx);
    ctx->impl = NULL;
    return st;
}

static void cuda_free(kern_ctx_t *ctx) {
    kc_state *s = st_of(ctx);
    if (!s)
        return;
    (void)cudaSetDevice(s->device);
    if (s->stream) {
        kc_buf *bufs[] = {&s->pair_pos, &s->sorted_rows, &s->block_expert, &s->n_blocks,
                          &s->abuf,     &s->slots,       &s->xw,           &s->sh_abuf,
                          &s->sh_out,   &s->gate,        &s->align_scratch, &s->fold_ctr};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
            buf_free(s, bufs[i]);
        (void)cudaStreamSynchronize(s->stream);
    }
    if (s->side)
        (void)cudaStreamDestroy(s->side);
    if (s->own_stream && s->stream)
        (void)cudaStreamDestroy(s->stream);
    if (s->ev_fork)
        (void)cudaEventDestroy(s->ev_fork);
    if (s->ev_join)
        (void)cudaEventDestroy(s->ev_join);
    if (s->err_host)
        (void)cudaFreeHost(s->err_host);
    if (s->claim)
        (void)cudaFree(s->claim);
    if (s->fuse_ctr)
        (void)cudaFree(s->fuse_ctr);
    if (s->sched)
        (void)cudaFree(s->sched);
    free(s);
    ctx->impl = NULL;
}

static bool cuda_supports(const kern_ctx_t *ctx, kern_op op, moe_dtype dt) {
    (void)ctx;
    switch (op) {
    case KERN_OP_ROUTE:
    case KERN_OP_MOE_SUM:
        return dt == MOE_DTYPE_F32 || dt == MOE_DTYPE_F16 || dt == MOE_DTYPE_BF16;
    case KERN_OP_FUSED_EXPERTS:
    case KERN_OP_SHARED_EXPERT:
        return dt == MOE_DTYPE_F16 || dt == MOE_DTYPE_BF16; /* tensor-core products only */
    default:
        return false;
    }
}

static moe_status cuda_sync(kern_ctx_t *ctx) {
    kc_state *s = st_of(ctx);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return check_device_errors(s);
}

/* ------------------------------------------------------------------------------------------
 * Tile choice. Every tile gives the same bits (gemm.cuh), so the choice follows the rows per
 * expert alone: small tiles stream weights over many CTAs, the large one is compute-bound.
 * ---------------------------------------------------------------------------------------- */
/* max_k: the longer k walk of the call's two products (the cut N of KC_FIT_N_MAX_K applies to
 * both when it is at most that). */
static void choose_tile(const kc_state *s, int64_t n_pairs, int32_t n_local, int64_t max_k, int32_t *nwg,
                        int32_t *bn) {
    if (s->force_bn) {
        *nwg = s->force_nwg;
        *bn = s->force_bn;
        return;
    }
    int64_t busy = n_local < n_pairs ? n_local : n_pairs;
    int64_t m = busy > 0 ? (n_pairs + busy - 1) / busy : 1;
    /* About 1.5 m columns: the rows per expert scatter around their mean m, and an expert
     * that overflows its block pays a second pass over its weights (lab run 1, docs/PERF.md). */
    const bool hopper = s->path == KERN_CUDA_PATH_WGMMA;
    /* the persistent (8, 128) with its tiles handed out as asked and N cut to the columns in use */
    const bool fit = s->fit_n && s->dyn_sched && max_k <= KC_FIT_N_MAX_K;
    if (m <= 5) {
        *nwg = 1, *bn = 8;
    } else if (m <= 10) {
        *nwg = 1, *bn = 16;
    } else if (m <= 21) {
        *nwg = 1, *bn = 32;
    } else if (m <= 42 && !hopper) {
        *nwg = 1, *bn = 64;
    } else if ((m <= 48 && !(hopper && fit)) || (m <= 80 && !hopper)) {
        /* lab run 52 (H100, --ab): Qwen3 T = 512 (32 rows per expert) 493 us against (1, 64)'s
         * 562; DeepSeek-V2-Lite T = 512 (48) 457 against (8, 128)'s 484 (before the cut N) */
        *nwg = 2, *bn = 64;
    } else if (hopper) {
        /* (8, 128): (5, 128) in a persistent grid, the producer running on into the next tile
         * during the epilogue; the same bits. Since run 72 its tiles are handed out in raster
         * order as CTAs ask (kc_sched_next) and, where the k walks are short, each tile's N is
         * cut to its columns in use. Lab runs 72 (--ab and --fit, H100), against (5, 128):
         * Mixtral T = 8192 (2048 rows per expert) 9056 us against 9607 (the fixed share of
         * tiles per CTA was 9807: the cause of (5, 128)'s lead there since run 69), T = 512 (128
         * rows) 1151 against 1178; Qwen3 T = 8192 (512) 1241 against 1360, T = 2048 (128) 562
         * against 572; DeepSeek-V2-Lite T = 8192 (768) 1528 against 1606. With the cut it also
         * beats (2, 64) at 32-48 rows on Qwen3 and DeepSeek (T = 512: 451 against 472, 422
         * against 440; DeepSeek T = 352 (33 rows) 412 against 434); Mixtral there keeps (2, 64)
         * (no cut at K = 4096). Before run 72: (5, 128) at 97-160 rows and above 1024
         * (docs/PERF.md, runs 9-70). (7, 128) is the same kernel. */
        *nwg = 8, *bn = 128;
    } else {
        *nwg = 2, *bn = 128;
    }
}

static int kc_path(const kc_state *s) { return s->path == KERN_CUDA_PATH_WGMMA ? KC_PATH_WGMMA : KC_PATH_MMA; }

static moe_status launch_gemm(kc_state *s, const kc_gemm_args *a, int32_t nwg, int32_t bn, cudaStream_t stream,
                              const char *what) {
    int e = kc_launch_gemm(a, kc_path(s), nwg, bn, stream);
    if (e != 0)
        return moe_fail(MOE_ERR_CUDA, "cuda backend: %s product (tile %d x %d, %s): %s", what, (int)nwg, (int)bn,
                        s->path == KERN_CUDA_PATH_WGMMA ? "wgmma" : "mma", cudaGetErrorString((cudaError_t)e));
    return MOE_OK;
}

#define KC_LAUNCH(call, what)                                                                            \
    do {                                                                                                 \
        int le_ = (call);                                                                                \
        if (le_ != 0)                                                                                    \
            return moe_fail(MOE_ERR_CUDA, "cuda backend: %s: %s", (what), cudaGetErrorString((cudaError_t)le_)); \
    } while (0)

/* ------------------------------------------------------------------------------------------
 * Routing.
 * ---------------------------------------------------------------------------------------- */
static moe_status cuda_route(kern_ctx_t *ctx, const kern_route_params *p, const moe_tensor *logits, moe_tensor *ids,
                             moe_tensor *w) {
    kc_state *s = st_of(ctx);
    MOE_REQUIRE(p->n_experts <= KC_ROUTE_MAX_E, MOE_ERR_UNSUPPORTED,
                "cuda route: n_experts %d over the backend's limit %d", (int)p->n_experts, KC_ROUTE_MAX_E);
    MOE_REQUIRE(p->top_k <= 32, MOE_ERR_UNSUPPORTED, "cuda route: top_k %d over the backend's limit 32",
                (int)p->top_k);
    MOE_REQUIRE(p->group_mode == KERN_GROUP_NONE || p->n_group <= 64, MOE_ERR_UNSUPPORTED,
                "cuda route: n_group %d over the backend's limit 64", (int)p->n_group);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    KC_LAUNCH(kc_launch_route(p, logits->data, logits->dtype, logits->shape[0], ids->data, w->data, s->stream),
              "route");
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Routed experts: align (unless small), (scale x), gate-up, down into per-slot contributions
 * `slots_out` ([T*K, H], by pair). The caller sums or zero-fills the pairs not held here, as
 * `loc` says, unless *folded comes back true: then the down product has also written the sum
 * over slots into fold_y ([T, H]; asked for with fold_y != NULL, done in the alignment-free
 * mode with KERN_CUDA_SMALL_FOLD_SUM).
 * ---------------------------------------------------------------------------------------- */
static moe_status routed(kc_state *s, const kern_experts_params *p, const moe_tensor *x, const moe_tensor *w13,
                         const moe_tensor *w2, const moe_tensor *ids, const moe_tensor *w, void *slots_out,
                         kc_locality *loc, void *fold_y, bool *folded) {
    if (folded)
        *folded = false;
    const moe_dtype dt = x->dtype;
    const size_t es = moe_dtype_size(dt);
    const int64_t T = x->shape[0], H = x->shape[1], K = ids->shape[1], I = w13->shape[1] / 2;
    const int64_t P = T * K;
    MOE_REQUIRE(H % 8 == 0 && I % 8 == 0, MOE_ERR_UNSUPPORTED,
                "cuda fused_experts: hidden %lld and intermediate %lld must be multiples of 8 (16-byte rows)",
                (long long)H, (long long)I);
    MOE_REQUIRE(p->n_local <= KC_ALIGN_MAX_LOCAL, MOE_ERR_UNSUPPORTED,
                "cuda fused_experts: n_local %d over the backend's limit %d", (int)p->n_local, KC_ALIGN_MAX_LOCAL);
    MOE_REQUIRE(P <= INT32_MAX / 2 && H <= INT32_MAX && I <= INT32_MAX, MOE_ERR_LIMIT,
                "cuda fused_experts: %lld pairs over the backend's limit", (long long)P);
    MOE_REQUIRE(aligned16(x->data) && aligned16(w13->data) && aligned16(w2->data) && aligned16(slots_out),
                MOE_ERR_UNSUPPORTED,
                "cuda fused_experts: x, w13, w2 and y must be 16-byte aligned device pointers (16-byte loads and "
                "stores)");
    int32_t nwg, bn;
    /* The tile follows the rows per local expert: with an expert map only about P n_local /
     * n_experts of the pairs are held here (expert parallelism), not all P. */
    const int64_t P_held = p->expert_map && p->n_experts > 0 ? P * p->n_local / p->n_experts : P;
    choose_tile(s, P_held > 0 ? P_held : 1, p->n_local, H > I ? H : I, &nwg, &bn);
    const bool small = P <= s->small_max && P <= KC_SMALL_MAX_PAIRS;
    if (small && nwg >= 3)
        nwg = 2; /* the (3 .. 6, 128) variants have no small mode; (2, 128) gives the same bits */
    /* (9, 128): CTA pairs of a cluster share the weight stages of one expert's blocks 2i, 2i + 1 */
    const bool pair = !small && nwg == 9;
    const int64_t max_nb = small ? P : max_blocks_for(P, p->n_local, bn, pair);
    const int64_t rows = small ? P : max_nb * bn;
    if (!small) {
        MOE_CHECK(buf_ensure(s, &s->pair_pos, (size_t)P * 4));
        MOE_CHECK(buf_ensure(s, &s->sorted_rows, (size_t)rows * 4));
        MOE_CHECK(buf_ensure(s, &s->block_expert, (size_t)max_nb * 4));
        MOE_CHECK(buf_ensure(s, &s->n_blocks, 4));
    }
    MOE_CHECK(buf_ensure(s, &s->abuf, (size_t)rows * (size_t)I * es));
    if (p->weight_on_input)
        MOE_CHECK(buf_ensure(s, &s->xw, (size_t)P * (size_t)H * es));

    kc_errsink sink = {s->err_dev, s->claim};
    /* The alignment: one CTA below KC_ALIGN_ONE_CTA_BELOW pairs, three launches from there
     * (kern_cuda_set_align forces either; the one CTA holds at most KC_ALIGN_MC_MIN_PAIRS) */
    int align = s->align_mode;
    if (align == 0)
        align = P < KC_ALIGN_ONE_CTA_BELOW ? 1 : 2;
    if (align == 1 && P >= KC_ALIGN_MC_MIN_PAIRS)
        align = 2;
    if (!small && align == 2) {
        MOE_CHECK(buf_ensure(s, &s->align_scratch, (size_t)p->n_local * 2 * sizeof(int32_t)));
        KC_LAUNCH(kc_launch_align_mc(ids->data, w->data, P, (int32_t)K, p->expert_map, p->n_experts, p->n_local, bn, pair,
                                     s->pair_pos.p, s->sorted_rows.p, s->block_expert.p, s->n_blocks.p,
                                     s->align_scratch.p, sink, s->pdl, s->stream),
                  "align");
    } else if (!small) {
        KC_LAUNCH(kc_launch_align(ids->data, w->data, P, (int32_t)K, p->expert_map, p->n_experts, p->n_local, bn, pair,
                                  s->pair_pos.p, s->sorted_rows.p, s->block_expert.p, s->n_blocks.p, sink, s->pdl,
                                  s->stream),
                  "align");
    }
    if (p->weight_on_input)
        KC_LAUNCH(kc_launch_scale_x(dt, x->data, w->data, s->xw.p, P, (int32_t)K, H, s->pdl, s->stream), "scale x");
    memset(loc, 0, sizeof *loc); /* every field: the ones below and those of other uses (recv_of) */
    loc->pair_pos = small ? NULL : s->pair_pos.p;
    loc->ids = ids->data;
    loc->map = p->expert_map;
    loc->n_experts = p->n_experts;
    loc->n_local = p->n_local;

    kc_gemm_args a;
    memset(&a, 0, sizeof a);
    a.mode = KC_MODE_GATE_UP;
    a.dtype = dt;
    a.act = p->act;
    a.w = w13->data;
    a.w_rows = 2 * I;
    a.M = (int32_t)I;
    a.K = (int32_t)H;
    a.b = p->weight_on_input ? s->xw.p : x->data;
    a.b_div = p->weight_on_input ? 1 : (int32_t)K;
    a.b_by_pos = 0;
    a.out_by_pos = 1;
    a.sorted_rows = s->sorted_rows.p;
    a.block_expert = s->block_expert.p;
    a.n_blocks = s->n_blocks.p;
    a.max_blocks = (int32_t)max_nb;
    a.out = s->abuf.p;
    a.out_ld = (int32_t)I;
    a.small = small;
    a.ids = ids->data;
    a.map = p->expert_map;
    a.n_experts = p->n_experts;
    a.n_local = p->n_local;
    a.n_pairs = (int32_t)P;
    a.top_k = (int32_t)K;
    a.topk_w_check = w->data;
    if (small)
        a.err = sink;
    a.pdl = s->pdl;
    a.lab_break = s->lab_break;
    a.grid_cap = s->sm_reserve > 0 ? s->n_sm - s->sm_reserve : 0;
    a.fit_n = s->fit_n && a.K <= KC_FIT_N_MAX_K;
    a.sched = sched_of(s, KC_SCHED_GATE_UP);
    a.yield_flag = s->yield_flag;
    a.yield_n = s->yield_n;
    kc_gemm_args gu = a;
    const bool fused = small && s->fused && nwg == 1;
    const bool hopper = s->cc_major >= 9;
    if (small && !fused && hopper && (s->small_opts & KERN_CUDA_SMALL_PREFETCH_W2)) {
        /* The down weights of the experts in use into the L2 during gate-up, as much of each
         * row (its tail: the down CTAs that start early load the head themselves) as fits in
         * KC_PF_L2_SHARE of the L2 for the most experts this call can touch. */
        const int64_t n_exp = P < p->n_local ? P : p->n_local;
        const double all = (double)n_exp * (double)H * (double)I * (double)es;
        const double budget = KC_PF_L2_SHARE * (double)s->l2_bytes;
        const int64_t row_bytes = I * (int64_t)es;
        int64_t tail = all <= budget ? row_bytes : (int64_t)((double)row_bytes * budget / all) / 16 * 16;
        if (tail >= row_bytes * 3 / 4) { /* run 15: partial prefetches (Qwen3 T = 2, 4) lost 6-14 us */
            a.pf_w = w2->data;
            a.pf_rows = (int32_t)H;
            a.pf_row_bytes = (int32_t)row_bytes;
            a.pf_tail = (int32_t)tail;
        }
    }
    if (small && !fused) {
        const int64_t n_exp = P < p->n_local ? P : p->n_local;
        const double w_bytes = (double)n_exp * 3.0 * (double)H * (double)I * (double)es;
        a.evict_first = (s->small_opts & KERN_CUDA_SMALL_EVICT_FIRST) != 0 &&
                        w_bytes <= (double)KC_EVF_MAX_L2 * (double)s->l2_bytes;
        a.early_a = (s->small_opts & KERN_CUDA_SMALL_EARLY_A) != 0;
    }
    if (!fused)
        MOE_CHECK(launch_gemm(s, &a, nwg, bn, s->stream, "gate-up"));
    if (s->lab_stop == 1 && folded) {
        *folded = true; /* the lab's partial call: no down product, no sum */
        return MOE_OK;
    }
    a.err.rec = NULL;
    a.err.claim = NULL;
    a.pf_w = NULL;
    a.pf_rows = a.pf_row_bytes = a.pf_tail = 0;

    a.mode = KC_MODE_DOWN;
    a.sched = sched_of(s, KC_SCHED_DOWN);
    a.w = w2->data;
    a.w_rows = H;
    a.M = (int32_t)H;
    a.K = (int32_t)I;
    a.fit_n = s->fit_n && a.K <= KC_FIT_N_MAX_K;
    a.b = s->abuf.p;
    a.b_div = 1;
    a.b_by_pos = 1;
    a.out_by_pos = 0;
    a.out = slots_out;
    a.out_ld = (int32_t)H;
    a.topk_w = p->weight_on_input ? NULL : w->data;
    if (small && !fused) {
        if (fold_y && (s->small_opts & KERN_CUDA_SMALL_FOLD_SUM)) {
            /* counters per (token, row block of at least 64 rows), zeroed when (re)allocated */
            const size_t need = (size_t)T * (size_t)((H + 63) / 64) * sizeof(unsigned long long);
            void *old = s->fold_ctr.p;
            const size_t old_cap = s->fold_ctr.cap;
            MOE_CHECK(buf_ensure(s, &s->fold_ctr, need));
            if (s->fold_ctr.p != old || s->fold_ctr.cap != old_cap)
                MOE_CUDA_CHECK(cudaMemsetAsync(s->fold_ctr.p, 0, s->fold_ctr.cap, s->stream));
            s->fold_seq = s->fold_seq + 1 ? s->fold_seq + 1 : 1;
            a.fold_y = fold_y;
            a.fold_ctr = s->fold_ctr.p;
            a.fold_seq = s->fold_seq;
            if (folded)
                *folded = true;
        }
    }
    if (fused) {
        /* one persistent launch for both products (gemm.cuh, kc_small_fused_kernel) */
        s->fuse_seq = s->fuse_seq + 1 ? s->fuse_seq + 1 : 1;
        int e = kc_launch_small_fused(&gu, &a, kc_path(s), bn, s->fuse_ctr, s->fuse_seq, s->n_sm, s->stream);
        if (e != 0)
            return moe_fail(MOE_ERR_CUDA, "cuda backend: fused small-T products (tile 1 x %d): %s", (int)bn,
                            cudaGetErrorString((cudaError_t)e));
        return MOE_OK;
    }
    MOE_CHECK(launch_gemm(s, &a, nwg, bn, s->stream, "down"));
    if (s->lab_stop == 2 && folded)
        *folded = true; /* the lab's partial call: no sum */
    return MOE_OK;
}

/* Shared expert on `stream`: out[T, H] = g * W2 (act(W1 x) * (W3 x)). Buffers must be ready. */
static moe_status shared_run(kc_state *s, const kern_shared_expert *se, const moe_tensor *x, void *out,
                             cudaStream_t stream) {
    const moe_dtype dt = x->dtype;
    const int64_t T = x->shape[0], H = x->shape[1], Is = se->w13->shape[0] / 2;
    int32_t nwg, bn;
    choose_tile(s, T, 1, H > Is ? H : Is, &nwg, &bn);
    if (se->gate)
        KC_LAUNCH(kc_launch_gate_dot(dt, x->data, se->gate->data, s->gate.p, T, H, s->pdl, stream), "shared gate");
    kc_gemm_args a;
    memset(&a, 0, sizeof a);
    a.mode = KC_MODE_GATE_UP;
    a.dtype = dt;
    a.act = se->act;
    a.w = se->w13->data;
    a.w_rows = 2 * Is;
    a.M = (int32_t)Is;
    a.K = (int32_t)H;
    a.b = x->data;
    a.dense = 1;
    a.n_dense = (int32_t)T;
    a.out = s->sh_abuf.p;
    a.out_ld = (int32_t)Is;
    a.pdl = s->pdl;
    a.fit_n = s->fit_n && a.K <= KC_FIT_N_MAX_K;
    a.sched = sched_of(s, KC_SCHED_SHARED_GATE_UP);
    MOE_CHECK(launch_gemm(s, &a, nwg, bn, stream, "shared gate-up"));
    a.mode = KC_MODE_DOWN;
    a.w = se->w2->data;
    a.w_rows = H;
    a.M = (int32_t)H;
    a.K = (int32_t)Is;
    a.fit_n = s->fit_n && a.K <= KC_FIT_N_MAX_K;
    a.b = s->sh_abuf.p;
    a.out = out;
    a.out_ld = (int32_t)H;
    a.row_scale = se->gate ? s->gate.p : NULL;
    a.sched = sched_of(s, KC_SCHED_SHARED_DOWN);
    MOE_CHECK(launch_gemm(s, &a, nwg, bn, stream, "shared down"));
    return MOE_OK;
}

static moe_status shared_prepare(kc_state *s, const kern_shared_expert *se, const moe_tensor *x, const void *out) {
    const int64_t T = x->shape[0], H = x->shape[1], Is = se->w13->shape[0] / 2;
    MOE_REQUIRE(aligned16(x->data) && aligned16(se->w13->data) && aligned16(se->w2->data) && (!out || aligned16(out)),
                MOE_ERR_UNSUPPORTED, "cuda shared_expert: x, the weights and the output must be 16-byte aligned");
    MOE_REQUIRE(H % 8 == 0 && Is % 8 == 0, MOE_ERR_UNSUPPORTED,
                "cuda shared_expert: hidden %lld and intermediate %lld must be multiples of 8", (long long)H,
                (long long)Is);
    MOE_REQUIRE(T <= INT32_MAX && Is <= INT32_MAX, MOE_ERR_LIMIT, "cuda shared_expert: %lld tokens over the limit",
                (long long)T);
    MOE_CHECK(buf_ensure(s, &s->sh_abuf, (size_t)T * (size_t)Is * moe_dtype_size(x->dtype)));
    if (se->gate)
        MOE_CHECK(buf_ensure(s, &s->gate, (size_t)T * sizeof(float)));
    return MOE_OK;
}

static moe_status cuda_fused_experts(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                     const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                     const moe_tensor *w, moe_tensor *y) {
    kc_state *s = st_of(ctx);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    const int64_t T = x->shape[0], H = x->shape[1], K = ids->shape[1];
    kc_locality loc = {0};
    if (y->ndim == 3) { /* slot mode: contributions straight into y, zeros where not local */
        MOE_CHECK(routed(s, p, x, w13, w2, ids, w, y->data, &loc, NULL, NULL));
        if (!p->slots_local_only)
            KC_LAUNCH(kc_launch_zero_nonlocal(x->dtype, loc, y->data, T * K, H, s->pdl, s->stream), "slot zeros");
        return MOE_OK;
    }
    MOE_CHECK(buf_ensure(s, &s->slots, (size_t)(T * K) * (size_t)H * moe_dtype_size(x->dtype)));
    bool folded = false;
    MOE_CHECK(routed(s, p, x, w13, w2, ids, w, s->slots.p, &loc, y->data, &folded));
    if (!folded)
        KC_LAUNCH(kc_launch_sum(x->dtype, s->slots.p, loc, NULL, y->data, T, (int32_t)K, H, s->pdl, s->stream),
                  "sum");
    return MOE_OK;
}

static moe_status cuda_shared_expert(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x,
                                     moe_tensor *out) {
    kc_state *s = st_of(ctx);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    MOE_CHECK(shared_prepare(s, se, x, out->data));
    return shared_run(s, se, x, out->data, s->stream);
}

static moe_status cuda_moe_sum(kern_ctx_t *ctx, const moe_tensor *slots, const moe_tensor *shared, moe_tensor *y) {
    kc_state *s = st_of(ctx);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    kc_locality all = {0};
    KC_LAUNCH(kc_launch_sum(slots->dtype, slots->data, all, shared ? shared->data : NULL, y->data, slots->shape[0],
                            (int32_t)slots->shape[1], slots->shape[2], s->pdl, s->stream),
              "moe_sum");
    return MOE_OK;
}

/* Routed + shared in one call: the shared expert runs on the side stream while the routed
 * products run on the main one; the sum joins them. No host synchronization. */
static moe_status cuda_moe_forward(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                   const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                   const moe_tensor *w, const kern_shared_expert *se, moe_tensor *y) {
    kc_state *s = st_of(ctx);
    if (!se)
        return cuda_fused_experts(ctx, p, x, w13, w2, ids, w, y);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    const int64_t T = x->shape[0], H = x->shape[1], K = ids->shape[1];
    const size_t es = moe_dtype_size(x->dtype);
    MOE_CHECK(shared_prepare(s, se, x, NULL));
    MOE_CHECK(buf_ensure(s, &s->sh_out, (size_t)T * (size_t)H * es));
    MOE_CHECK(buf_ensure(s, &s->slots, (size_t)(T * K) * (size_t)H * es));
    MOE_CUDA_CHECK(cudaEventRecord(s->ev_fork, s->stream));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(s->side, s->ev_fork, 0));
    MOE_CHECK(shared_run(s, se, x, s->sh_out.p, s->side));
    MOE_CUDA_CHECK(cudaEventRecord(s->ev_join, s->side));
    kc_locality loc = {0};
    MOE_CHECK(routed(s, p, x, w13, w2, ids, w, s->slots.p, &loc, NULL, NULL));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(s->stream, s->ev_join, 0));
    KC_LAUNCH(kc_launch_sum(x->dtype, s->slots.p, loc, s->sh_out.p, y->data, T, (int32_t)K, H, s->pdl, s->stream),
              "sum");
    return MOE_OK;
}

static moe_status cuda_router_logits(kern_ctx_t *ctx, const moe_tensor *x, const moe_tensor *router,
                                     moe_tensor *logits) {
    kc_state *s = st_of(ctx);
    const int64_t T = x->shape[0], H = x->shape[1], E = router->shape[0];
    MOE_REQUIRE(T <= INT32_MAX && E <= INT32_MAX && H <= INT32_MAX, MOE_ERR_LIMIT,
                "cuda router_logits: [%lld, %lld] x [%lld, %lld] over the backend's limit (2^31 - 1 a side)",
                (long long)T, (long long)H, (long long)E, (long long)H);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    KC_LAUNCH(kc_launch_router_logits(x->dtype, x->data, router->data, logits->data, T, E, H, s->router_tile, s->n_sm,
                                      s->stream),
              "router logits");
    return MOE_OK;
}

const kern_backend_ops kern_cuda_ops = {
    .name = "cuda",
    .host_data = false,
    .init = cuda_init,
    .free = cuda_free,
    .supports = cuda_supports,
    .sync = cuda_sync,
    .route = cuda_route,
    .fused_experts = cuda_fused_experts,
    .shared_expert = cuda_shared_expert,
    .moe_sum = cuda_moe_sum,
    .router_logits = cuda_router_logits,
    .moe_forward = cuda_moe_forward,
};

/* ------------------------------------------------------------------------------------------
 * kern_cuda.h
 * ---------------------------------------------------------------------------------------- */
static moe_status require_cuda_ctx(kern_ctx_t *ctx) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "cuda backend: NULL context");
    MOE_REQUIRE(ctx->ops == &kern_cuda_ops && ctx->impl, MOE_ERR_INVALID_ARG,
                "cuda backend: the context is a %s context", ctx->ops->name);
    return MOE_OK;
}

moe_status kern_cuda_moe_sum_recv(kern_ctx_t *ctx, const moe_tensor *slots, const int32_t *recv_of,
                                  const void *recv_rows, const moe_tensor *shared, moe_tensor *y) {
    MOE_CHECK(require_cuda_ctx(ctx));
    MOE_REQUIRE(slots && y && slots->ndim == 3 && y->ndim == 2 && y->shape[0] == slots->shape[0] &&
                    y->shape[1] == slots->shape[2] && y->dtype == slots->dtype && (!shared || shared->dtype == y->dtype),
                MOE_ERR_INVALID_ARG, "kern_cuda_moe_sum_recv: slots [T, K, H] and y [T, H] of one dtype");
    MOE_REQUIRE(!recv_of == !recv_rows && ((uintptr_t)recv_rows % 16) == 0, MOE_ERR_INVALID_ARG,
                "kern_cuda_moe_sum_recv: recv_of and recv_rows (16-byte aligned) together");
    kc_state *s = st_of(ctx);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    MOE_CHECK(check_device_errors(s));
    kc_locality loc = {0};
    loc.recv_of = recv_of;
    loc.recv_rows = recv_rows;
    KC_LAUNCH(kc_launch_sum(slots->dtype, slots->data, loc, shared ? shared->data : NULL, y->data, slots->shape[0],
                            (int32_t)slots->shape[1], slots->shape[2], s->pdl, s->stream),
              "moe_sum_recv");
    return MOE_OK;
}

moe_status kern_cuda_reserve(kern_ctx_t *ctx, int64_t max_tokens, int32_t top_k, int64_t hidden, int64_t inter,
                             int32_t n_local, int64_t shared_inter) {
    MOE_CHECK(require_cuda_ctx(ctx));
    MOE_REQUIRE(max_tokens >= 0 && top_k >= 1 && hidden >= 0 && inter >= 0 && n_local >= 0 && shared_inter >= 0,
                MOE_ERR_INVALID_ARG, "kern_cuda_reserve: negative size");
    kc_state *s = st_of(ctx);
    MOE_CUDA_CHECK(cudaSetDevice(s->device));
    const size_t es = 2;
    const int64_t P = max_tokens * top_k;
    const int64_t max_nb = max_blocks_for(P, n_local, 128, true); /* the largest: (9, 128)'s pairs */
    MOE_CHECK(buf_ensure(s, &s->pair_pos, (size_t)P * 4));
    MOE_CHECK(buf_ensure(s, &s->sorted_rows, (size_t)(max_nb * 128) * 4));
    MOE_CHECK(buf_ensure(s, &s->block_expert, (size_t)max_nb * 4));
    MOE_CHECK(buf_ensure(s, &s->n_blocks, 4));
    MOE_CHECK(buf_ensure(s, &s->abuf, (size_t)(max_nb * 128) * (size_t)inter * es));
    MOE_CHECK(buf_ensure(s, &s->slots, (size_t)P * (size_t)hidden * es));
    if (shared_inter > 0) {
        MOE_CHECK(buf_ensure(s, &s->sh_abuf, (size_t)max_tokens * (size_t)shared_inter * es));
        MOE_CHECK(buf_ensure(s, &s->sh_out, (size_t)max_tokens * (size_t)hidden * es));
        MOE_CHECK(buf_ensure(s, &s->gate, (size_t)max_tokens * sizeof(float)));
    }
    return MOE_OK;
}

moe_status kern_cuda_set_path(kern_ctx_t *ctx, kern_cuda_path path) {
    MOE_CHECK(require_cuda_ctx(ctx));
    kc_state *s = st_of(ctx);
    const bool hopper = s->cc_major == 9 && s->cc_minor == 0;
    switch (path) {
    case KERN_CUDA_PATH_AUTO:
        s->path = hopper ? KERN_CUDA_PATH_WGMMA : KERN_CUDA_PATH_MMA;
        return MOE_OK;
    case KERN_CUDA_PATH_MMA:
        s->path = path;
        return MOE_OK;
    case KERN_CUDA_PATH_WGMMA:
        MOE_REQUIRE(hopper, MOE_ERR_UNSUPPORTED, "cuda backend: wgmma needs an sm_90 device (this is sm_%d%d)",
                    s->cc_major, s->cc_minor);
        s->path = path;
        return MOE_OK;
    default:
        return moe_fail(MOE_ERR_INVALID_ARG, "cuda backend: unknown path %d", (int)path);
    }
}

kern_cuda_path kern_cuda_get_path(const kern_ctx_t *ctx) {
    if (!ctx || ctx->ops != &kern_cuda_ops || !ctx->impl)
        return KERN_CUDA_PATH_AUTO;
    return ((const kc_state *)ctx->impl)->path;
}

moe_status kern_cuda_set_tile(kern_ctx_t *ctx, int32_t nwg, int32_t bn) {
    MOE_CHECK(require_cuda_ctx(ctx));
    kc_state *s = st_of(ctx);
    if (nwg == 0 && bn == 0) {
        s->force_nwg = s->force_bn = 0;
        return MOE_OK;
    }
    MOE_REQUIRE(kc_gemm_has_cfg(kc_path(s), nwg, bn), MOE_ERR_INVALID_ARG,
                "cuda backend: tile (%d warpgroups, %d rows) is not compiled in", (int)nwg, (int)bn);
    s->force_nwg = nwg;
    s->force_bn = bn;
    return MOE_OK;
}

int32_t kern_cuda_tiles(kern_cuda_path path, int32_t *out, int32_t cap) {
    static const int32_t cand[][2] = {{1, 8}, {1, 16}, {1, 32}, {1, 64}, {2, 64}, {2, 128},
                                      {3, 128}, {4, 128}, {5, 128}, {6, 128},
                                      {7, 128}, {8, 128}, {9, 128}};
    const int kp = path == KERN_CUDA_PATH_WGMMA ? KC_PATH_WGMMA : KC_PATH_MMA;
    int32_t n = 0;
    for (size_t i = 0; i < sizeof cand / sizeof cand[0]; i++) {
        if (!kc_gemm_has_cfg(kp, cand[i][0], cand[i][1]))
            continue;
        if (out && n < cap) {
            out[2 * n] = cand[i][0];
            out[2 * n + 1] = cand[i][1];
        }
        n++;
    }
    return n;
}

moe_status kern_cuda_set_small_max(kern_ctx_t *ctx, int32_t max_pairs) {
    MOE_CHECK(require_cuda_ctx(ctx));
    MOE_REQUIRE(max_pairs >= 0 && max_pairs <= KC_SMALL_MAX_PAIRS, MOE_ERR_INVALID_ARG,
                "kern_cuda_set_small_max: %d not in [0, %d]", (int)max_pairs, KC_SMALL_MAX_PAIRS);
    st_of(ctx)->small_max = max_pairs;
    return MOE_OK;
}

moe_status kern_cuda_set_fused(kern_ctx_t *ctx, bool on) {
    MOE_CHECK(require_cuda_ctx(ctx));
    st_of(ctx)->fused = on;
    return MOE_OK;
}

moe_status kern_cuda_set_small_opts(kern_ctx_t *ctx, uint32_t opts) {
    MOE_CHECK(require_cuda_ctx(ctx));
    MOE_REQUIRE(opts <= KERN_CUDA_SMALL_ALL, MOE_ERR_INVALID_ARG, "kern_cuda_set_small_opts: unknown bits in 0x%x",
                (unsigned)opts);
    st_of(ctx)->small_opts = opts;
    return MOE_OK;
}

uint32_t kern_cuda_get_small_opts(const kern_ctx_t *ctx) {
    if (!ctx || ctx->ops != &kern_cuda_ops || !ctx->impl)
        return 0;
    return ((const kc_state *)ctx->impl)->small_opts;
}

moe_status kern_cuda_set_router_tile(kern_ctx_t *ctx, int32_t tile) {
    MOE_CHECK(require_cuda_ctx(ctx));
    int32_t n = kc_router_logits_tiles(NULL, 0);
    MOE_REQUIRE(tile >= -1 && tile < n, MOE_ERR_INVALID_ARG, "kern_cuda_set_router_tile: %d not in [-1, %d]", (int)tile,
                (int)n - 1);
    st_of(ctx)->router_tile = tile;
    return MOE_OK;
}

int32_t kern_cuda_router_tiles(int32_t *out, int32_t cap) { return kc_router_logits_tiles(out, cap); }

/* SMs that the persistent products may give to other streams: lo .. all but 8 of the device's. */
static moe_status check_sms_lent(const kc_state *s, int32_t n, int32_t lo, const char *what) {
    MOE_REQUIRE(n >= lo && n <= s->n_sm - 8, MOE_ERR_INVALID_ARG, "%s: %d SMs not in [%d, %d] (this device has %d SMs)",
                what, (int)n, (int)lo, (int)(s->n_sm - 8), (int)s->n_sm);
    return MOE_OK;
}

moe_status kern_cuda_set_sm_reserve(kern_ctx_t *ctx, int32_t n) {
    MOE_CHECK(require_cuda_ctx(ctx));
    kc_state *s = st_of(ctx);
    MOE_CHECK(check_sms_lent(s, n, 0, "kern_cuda_set_sm_reserve"));
    s->sm_reserve = n;
    pdl_update(s);
    return MOE_OK;
}

moe_status kern_cuda_set_yield(kern_ctx_t *ctx, const int32_t *flag, int32_t n) {
    MOE_CHECK(require_cuda_ctx(ctx));
    kc_state *s = st_of(ctx);
    if (flag)
        MOE_CHECK(check_sms_lent(s, n, 1, "kern_cuda_set_yield"));
    MOE_REQUIRE(!flag || ((uintptr_t)flag & 3) == 0, MOE_ERR_INVALID_ARG,
                "kern_cuda_set_yield: the flag must be a 4-byte aligned device word");
    s->yield_flag = flag;
    s->yield_n = flag ? n : 0;
    pdl_update(s);
    return MOE_OK;
}

moe_status kern_cuda_set_dyn_sched(kern_ctx_t *ctx, bool on) {
    MOE_CHECK(require_cuda_ctx(ctx));
    st_of(ctx)->dyn_sched = on;
    return MOE_OK;
}

moe_status kern_cuda_set_fit_n(kern_ctx_t *ctx, bool on) {
    MOE_CHECK(require_cuda_ctx(ctx));
    st_of(ctx)->fit_n = on;
    return MOE_OK;
}

moe_status kern_cuda_set_align(kern_ctx_t *ctx, int32_t mode) {
    MOE_CHECK(require_cuda_ctx(ctx));
    MOE_REQUIRE(mode >= 0 && mode <= 2, MOE_ERR_INVALID_ARG, "kern_cuda_set_align: %d not in [0, 2]", (int)mode);
    st_of(ctx)->align_mode = mode;
    return MOE_OK;
}

moe_status kern_cuda_set_lab_stop(kern_ctx_t *ctx, int32_t kernels) {
    MOE_CHECK(require_cuda_ctx(ctx));
    MOE_REQUIRE(kernels >= 0 && kernels <= 2, MOE_ERR_INVALID_ARG, "kern_cuda_set_lab_stop: %d not in [0, 2]",
                (int)kernels);
    st_of(ctx)->lab_stop = kernels;
    return MOE_OK;
}

moe_status kern_cuda_set_pdl(kern_ctx_t *ctx, bool on) {
    MOE_CHECK(require_cuda_ctx(ctx));
    kc_state *s = st_of(ctx);
    MOE_REQUIRE(!on || s->cc_major >= 9, MOE_ERR_UNSUPPORTED, "cuda backend: programmatic dependent launch needs sm_90");
    s->pdl_want = on;
    pdl_update(s);
    return MOE_OK;
}

void *kern_cuda_stream(kern_ctx_t *ctx) {
    if (!ctx || ctx->ops != &kern_cuda_ops || !ctx->impl)
        return NULL;
    return (void *)st_of(ctx)->stream;
}
