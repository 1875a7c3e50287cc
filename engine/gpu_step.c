/*
 * gpu_step.c: a GPU worker's step (gpu_step.h says what it does and why). Plain C11 over the
 * CUDA runtime; every kernel comes from kernels/ (kern.h, the CUDA backend), every collective
 * from parallel/ (the NCCL communicator).
 *
 * Streams: s_copy (the inputs' copies to the device, a step ahead when the hook stages the
 * next step), s_main (routing, the routed experts, W = 1's copy-out), s_side (the shared expert
 * at W > 1), s_comm (highest priority: the x all-gather, the exchanges, the fixed-order sum and
 * the copy-out of a rank's rows). Events order them; the host waits once per step, polling with
 * a deadline (never an unbounded cudaStreamSynchronize), so a hung device or peer turns into an
 * error the coordinator acts on; the hook runs between the looks.
 *
 * Buffers, all sized once for max_tokens: two input sets (pinned staging and device x, ids,
 * weights, logits; at W > 1 also the exchange plans and their indices), the pinned output, and
 * on the device the slots, the packed rows sent and received, the shared expert's output and y.
 */
#include "engine/gpu_step.h"

#include <cuda_runtime.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/gpu_rows.h"
#include "kernels/cuda/kern_cuda.h"

typedef struct gpu_layer {
    int32_t layer;
    moe_tensor w13, w2, router;   /* device; router fp32 [E, H] or empty */
    float *bias;                  /* device [E] or NULL */
    bool has_shared;
    moe_tensor sw13, sw2, sgate;  /* device (every rank: each adds it to the rows it owns) */
} gpu_layer;

/* One set of a step's inputs on the device, and its staging in pinned memory (used when the
 * inputs are not in registered memory). Two sets: the next step's inputs are copied into one
 * (eng_gpu_stage, on s_copy) while the current step computes from the other. */
/* The parts of a step's combine at most: 2 with DBO, up to 4 with --combine-parts. */
#define GPU_MAX_PARTS 4
/* --combine-parts auto: two parts from this many bytes of a rank's output rows (2x H200, run 87,
 * Qwen3 shape at W = 2: a step of 4096 tokens (8 MiB a rank) 744 -> 709 us, 16384 2331 -> 2154; of
 * 2048 tokens 465 -> 497: the second part's fixed costs, ~30-45 us, over the overlap it buys) */
#define GPU_COMBINE_AUTO_BYTES ((uint64_t)8 << 20)
/* (With DBO by tokens, a micro-batch's combine in two parts from twice that, 16 MiB of a rank's
 * rows: run 92, 2x H200, Qwen3 shape at W = 2, DBO by tokens with 2 parts a micro-batch against
 * 1 (run 90): 8192 tokens a step (8 MiB a call) 1161-1178 against 1136-1149 us, 16384 (16 MiB)
 * 1927-1953 against 1964-1977, 32768 3489-3526 against 3625-3643.) */

typedef struct gpu_inputs {
    void *x_h, *lg_h;
    int32_t *ids_h;
    float *w_h;
    void *x_d, *lg_d;
    int32_t *ids_d;
    float *w_d;
    cudaEvent_t ready;    /* the copies done (s_copy) */
    cudaEvent_t released; /* the step that used the set last is done with it (s_main) */
    cudaEvent_t tm0, tm1; /* the copies' own duration */
    bool staged;          /* holds the next step's inputs */
    bool ahead;           /* they were copied on the copy stream, ahead of the step (else on the
                             main stream at the step's entry: `ready` is then not recorded at
                             W = 1, and tm1 is where the step's device time starts) */
    bool routed;          /* some request needs routing on the device */
    uint64_t tag;         /* the staged step (checked by the step) */
    int64_t T;
    const int32_t *ids_src; /* the step's ids on the host as they came */
    /* W > 1: the x all-gather, enqueued with the copies (gathered: done, on s_comm; tm_g0/1 its
     * duration), and the exchange plans of the micro-batches, built with the copies when the
     * ids came with the requests (their indices in idx_h, sent to idx_d by the combine) */
    cudaEvent_t gathered, tm_g0, tm_g1;
    bool gather_enqueued;
    par_exchange_plan plan[GPU_MAX_PARTS];
    int64_t part[GPU_MAX_PARTS]; /* --exchange ce: each part's pairs to each rank, the plan's largest */
    bool idx_up[GPU_MAX_PARTS];  /* the part's plan indices are on their way to idx_d (this step) */
    int32_t *idx_h, *idx_d;
    bool planned;
    uint64_t plan_ns;
} gpu_inputs;

struct eng_gpu {
    eng_gpu_params p;
    eng_step_model m;
    int32_t world;
    int32_t n_layers;
    gpu_layer *layers;
    kern_ctx_t *k, *kside, *kcomm;
    cudaStream_t s_main, s_side, s_comm, s_copy, s_out;
    cudaEvent_t ev_in, ev_side[GPU_MAX_PARTS], ev_mb[GPU_MAX_PARTS], ev_red[2], ev_done, ev_sum[GPU_MAX_PARTS], ev_out;
    cudaEvent_t tm_start, tm_x, tm_compute, tm_end, tm_cs[GPU_MAX_PARTS], tm_ce[GPU_MAX_PARTS]; /* timing */
    /* timing of each part: products done, packed, exchanged */
    cudaEvent_t tm_pd[GPU_MAX_PARTS], tm_pk[GPU_MAX_PARTS], tm_a2[GPU_MAX_PARTS];
    gpu_inputs in[2];
    int32_t next;                 /* the set the next step uses */
    uint64_t hmark[6];            /* host clock marks of the step (timing.host_split_us) */
    void (*hook)(void *);         /* called between the looks of a step's wait */
    void *hook_arg;
    /* pinned host: the output (ZeroMQ data path) */
    void *y_h;
    /* the registered data path (eng_gpu_register_host): its host range and the device's address
     * of its first byte */
    char *reg_h, *reg_d;
    size_t reg_bytes;
    /* device */
    void *slots_d, *sh_d, *y_d;
    int32_t *map_d;
    /* DBO split by experts (W > 1): each half of every rank's experts (in_set[h][e] on the
     * host, for the plans) and this rank's expert map of each half (on the device) */
    uint8_t *in_set[2];
    int32_t *map_half_d[2];
    uint64_t min_step_ns; /* MOE_GPU_MIN_STEP_US (a test knob): a step returns no sooner, the hook
                             running meanwhile, so a test can count on the next STEP arriving
                             while one computes (the inputs staged ahead) */
    bool sm_cap;     /* MOE_DBO_SM_MODE=cap (a diagnostic): --dbo-sm-reserve caps the products' grid for the
                        whole DBO step (session 8, run 80) instead of lending the SMs while the exchange
                        runs (yield_d) */
    int32_t *yield_d;   /* device word: nonzero while micro-batch 0's exchange wants SMs (kern_cuda_set_yield) */
    int32_t *flag01_h;  /* pinned {0, 1}: copied into yield_d on the exchange's stream (a copy engine, no SM) */
    bool dbo_serial; /* MOE_DBO_SERIAL=1 (a diagnostic): the exchanges wait for every micro-batch's
                        products, so DBO's step shows the split's own cost without the overlap */
    int64_t *cnt;                 /* [E + 1] scratch of count_experts */
    /* the combine (W > 1): the packed rows sent and received (the plans are per input set);
     * with --exchange ce symmetric windows of the communicator, rank q's part at q x part rows */
    void *send_d, *recv_d;
    bool ce;
    int64_t sym_pairs; /* --exchange ce: the windows' rows */
    int32_t *recv_of_d; /* [max_tokens K]: for the sum, each own pair's received row or -1 */
    /* the per-peer sizes and offsets of the all-to-alls ([4][W]: send bytes, send offsets,
     * receive bytes, receive offsets) and of the gather to rank 0 ([W] pointers, [W] bytes) */
    size_t *a2a;
    void **gv_ptr;
    size_t *gv_bytes;
};

bool eng_gpu_available(void) { return true; }

moe_status eng_gpu_register_host(eng_gpu_t *g, void *p, size_t bytes) {
    MOE_REQUIRE(g && p && bytes, MOE_ERR_INVALID_ARG, "gpu register: NULL argument");
    MOE_REQUIRE(!g->reg_h, MOE_ERR_INVALID_ARG, "gpu register: a region is registered already");
    MOE_CUDA_CHECK(cudaSetDevice(g->p.device));
    MOE_CUDA_CHECK(cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped));
    void *d = NULL;
    cudaError_t e = cudaHostGetDevicePointer(&d, p, 0);
    if (e != cudaSuccess) {
        (void)cudaHostUnregister(p);
        return moe_fail(MOE_ERR_CUDA, "gpu register: the device's address of %zu registered bytes: %s", bytes,
                        cudaGetErrorString(e));
    }
    g->reg_h = p;
    g->reg_d = d;
    g->reg_bytes = bytes;
    return MOE_OK;
}

/* The device's address of [p, p + n) in the registered region, or NULL if it is not all there. */
static void *reg_dev(const eng_gpu_t *g, const void *p, size_t n) {
    const char *c = p;
    if (!g->reg_h || c < g->reg_h || n > g->reg_bytes || (size_t)(c - g->reg_h) > g->reg_bytes - n)
        return NULL;
    return g->reg_d + (c - g->reg_h);
}

/* Where the device writes a W = 1 step's output straight into the registered data path: the
 * requests' outputs one after another there (a single request, or outputs that abut), and the
 * step small (the device's last kernel then writes the few rows over PCIe itself; a large
 * output goes by the copy engine). NULL otherwise. */
#define ENG_GPU_DIRECT_OUT_MAX (64 * 1024)
static void *direct_out(const eng_gpu_t *g, const eng_step_req *reqs, int32_t n, const eng_gpu_io *io, int64_t T) {
    const size_t row = (size_t)g->m.hidden * moe_dtype_size(g->m.dtype);
    if (!io || n < 1 || (size_t)T * row > ENG_GPU_DIRECT_OUT_MAX)
        return NULL;
    for (int32_t i = 1; i < n; i++)
        if ((const char *)io->y[i] != (const char *)io->y[i - 1] + (size_t)reqs[i - 1].n_tokens * row)
            return NULL;
    return reg_dev(g, io->y[0], (size_t)T * row);
}

static void dfree(void *p) {
    if (p)
        cudaFree(p);
}

static moe_status upload(const moe_tensor *h, moe_tensor *d) {
    memset(d, 0, sizeof *d);
    if (!h->data)
        return MOE_OK;
    size_t n = moe_tensor_nbytes(h);
    void *p = NULL;
    MOE_CUDA_CHECK(cudaMalloc(&p, n ? n : 1));
    cudaError_t e = cudaMemcpy(p, h->data, n, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        cudaFree(p);
        return moe_fail(MOE_ERR_CUDA, "upload of %zu bytes: %s", n, cudaGetErrorString(e));
    }
    *d = moe_tensor_view(p, h->dtype, h->ndim, h->shape);
    return MOE_OK;
}

void eng_gpu_free(eng_gpu_t *g) {
    if (!g)
        return;
    cudaSetDevice(g->p.device);
    if (g->s_main)
        cudaStreamSynchronize(g->s_main);
    for (int32_t i = 0; i < g->n_layers && g->layers; i++) {
        gpu_layer *l = &g->layers[i];
        dfree(l->w13.data);
        dfree(l->w2.data);
        dfree(l->router.data);
        dfree(l->bias);
        dfree(l->sw13.data);
        dfree(l->sw2.data);
        dfree(l->sgate.data);
    }
    free(g->layers);
    kern_ctx_free(g->k);
    kern_ctx_free(g->kside);
    kern_ctx_free(g->kcomm);
    if (g->ce) { /* the communicator's windows (freed before the communicator is) */
        par_comm_sym_free(g->p.comm, g->send_d);
        par_comm_sym_free(g->p.comm, g->recv_d);
        g->send_d = g->recv_d = NULL;
    }
    void *dev[] = {g->slots_d,        g->sh_d,          g->y_d,           g->map_d,      g->send_d,
                   g->recv_d,         g->map_half_d[0], g->map_half_d[1], g->recv_of_d,  g->yield_d};
    free(g->in_set[0]);
    free(g->in_set[1]);
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        dfree(dev[i]);
    for (int b = 0; b < 2; b++) {
        gpu_inputs *in = &g->in[b];
        for (int q = 0; q < GPU_MAX_PARTS; q++)
            par_exchange_plan_free(&in->plan[q]);
        void *d[] = {in->x_d, in->lg_d, in->ids_d, in->w_d, in->idx_d};
        for (size_t i = 0; i < 5; i++)
            dfree(d[i]);
        void *h[] = {in->x_h, in->lg_h, in->ids_h, in->w_h, in->idx_h};
        for (size_t i = 0; i < 5; i++)
            if (h[i])
                cudaFreeHost(h[i]);
        cudaEvent_t e[] = {in->ready, in->released, in->tm0, in->tm1, in->gathered, in->tm_g0, in->tm_g1};
        for (size_t i = 0; i < 7; i++)
            if (e[i])
                cudaEventDestroy(e[i]);
    }
    if (g->reg_h)
        (void)cudaHostUnregister(g->reg_h);
    void *host[] = {g->y_h, g->flag01_h};
    free(g->a2a);
    free(g->cnt);
    free(g->gv_ptr);
    free(g->gv_bytes);
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        if (host[i])
            cudaFreeHost(host[i]);
    cudaEvent_t evs[] = {g->ev_in,    g->ev_red[0], g->ev_red[1], g->ev_done, g->tm_start,
                         g->tm_compute, g->tm_end,  g->tm_x,      g->ev_out};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++)
        if (evs[i])
            cudaEventDestroy(evs[i]);
    for (int q = 0; q < GPU_MAX_PARTS; q++) {
        cudaEvent_t pe[] = {g->ev_side[q], g->ev_mb[q], g->ev_sum[q], g->tm_cs[q],
                            g->tm_ce[q],   g->tm_pd[q], g->tm_pk[q],  g->tm_a2[q]};
        for (size_t i = 0; i < sizeof pe / sizeof pe[0]; i++)
            if (pe[i])
                cudaEventDestroy(pe[i]);
    }
    cudaStream_t ss[] = {g->s_main, g->s_side, g->s_comm, g->s_copy, g->s_out};
    for (size_t i = 0; i < sizeof ss / sizeof ss[0]; i++)
        if (ss[i])
            cudaStreamDestroy(ss[i]);
    free(g);
}

moe_status eng_gpu_init(eng_gpu_t **out, const eng_gpu_params *p, const eng_layer *layers, int32_t n_layers) {
    MOE_REQUIRE(out && p && p->model && (layers || n_layers == 0), MOE_ERR_INVALID_ARG, "gpu: NULL argument");
    *out = NULL;
    MOE_REQUIRE(p->max_tokens >= 1, MOE_ERR_INVALID_ARG, "gpu: max_tokens %lld", (long long)p->max_tokens);
    MOE_REQUIRE(p->exchange == 0 || p->exchange == 1, MOE_ERR_INVALID_ARG, "gpu: exchange %d is not 0 (p2p) or 1 (ce)",
                (int)p->exchange);
    MOE_REQUIRE(p->combine_parts >= 0 && p->combine_parts <= GPU_MAX_PARTS, MOE_ERR_INVALID_ARG,
                "gpu: combine parts %d not in [0 (auto), %d]", (int)p->combine_parts, GPU_MAX_PARTS);
    MOE_REQUIRE(p->exchange == 0 || p->model->placement->world_size == 1 || p->comm, MOE_ERR_INVALID_ARG,
                "gpu: --exchange ce needs the NCCL communicator");
    eng_gpu_t *g = calloc(1, sizeof *g);
    if (!g)
        return moe_fail(MOE_ERR_NOMEM, "gpu");
    g->p = *p;
    g->dbo_serial = getenv("MOE_DBO_SERIAL") && strcmp(getenv("MOE_DBO_SERIAL"), "1") == 0;
    g->m = *p->model;
    g->world = g->m.placement->world_size;
    moe_status st = MOE_OK;
    const char *hold = getenv("MOE_GPU_MIN_STEP_US");
    if (hold) {
        char *end = NULL;
        const unsigned long long us = strtoull(hold, &end, 10);
        if (end == hold || *end != '\0' || us > 10000000ull) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "MOE_GPU_MIN_STEP_US '%s': microseconds in [0, 10000000]", hold);
            goto fail;
        }
        g->min_step_ns = us * 1000ull;
    }
    const int64_t H = g->m.hidden, E = g->m.n_experts, K = g->m.top_k, TM = p->max_tokens;
    const size_t es = moe_dtype_size(g->m.dtype);
    MOE_CUDA_CHECK_GOTO(cudaSetDevice(p->device), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&g->s_main, cudaStreamNonBlocking), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&g->s_side, cudaStreamNonBlocking), st, fail);
    /* The exchanges at the highest priority: with DBO, the NCCL kernels of micro-batch 0 get
     * the SMs the products of micro-batch 1 free, before the next product tiles. */
    int prio_lo = 0, prio_hi = 0;
    MOE_CUDA_CHECK_GOTO(cudaDeviceGetStreamPriorityRange(&prio_lo, &prio_hi), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithPriority(&g->s_comm, cudaStreamNonBlocking, prio_hi), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&g->s_copy, cudaStreamNonBlocking), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&g->s_out, cudaStreamNonBlocking), st, fail);
    cudaEvent_t *evs[] = {&g->ev_in, &g->ev_red[0], &g->ev_red[1], &g->ev_done, &g->ev_out};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++)
        MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(evs[i], cudaEventDisableTiming), st, fail);
    cudaEvent_t *tms[] = {&g->tm_start, &g->tm_compute, &g->tm_end, &g->tm_x};
    for (size_t i = 0; i < sizeof tms / sizeof tms[0]; i++)
        MOE_CUDA_CHECK_GOTO(cudaEventCreate(tms[i]), st, fail);
    for (int q = 0; q < GPU_MAX_PARTS; q++) {
        cudaEvent_t *pe[] = {&g->ev_side[q], &g->ev_mb[q], &g->ev_sum[q]};
        for (size_t i = 0; i < sizeof pe / sizeof pe[0]; i++)
            MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(pe[i], cudaEventDisableTiming), st, fail);
        cudaEvent_t *pt[] = {&g->tm_cs[q], &g->tm_ce[q], &g->tm_pd[q], &g->tm_pk[q], &g->tm_a2[q]};
        for (size_t i = 0; i < sizeof pt / sizeof pt[0]; i++)
            MOE_CUDA_CHECK_GOTO(cudaEventCreate(pt[i]), st, fail);
    }
    kern_ctx_params kp = {.device = p->device, .stream = g->s_main};
    MOE_CHECK_GOTO(kern_ctx_init(&g->k, KERN_BACKEND_CUDA, &kp), st, fail);
    kern_ctx_params kps = {.device = p->device, .stream = g->s_side};
    MOE_CHECK_GOTO(kern_ctx_init(&g->kside, KERN_BACKEND_CUDA, &kps), st, fail);
    kern_ctx_params kpc = {.device = p->device, .stream = g->s_comm};
    MOE_CHECK_GOTO(kern_ctx_init(&g->kcomm, KERN_BACKEND_CUDA, &kpc), st, fail);
    /* --dbo-sm-reserve against this device's SMs, now rather than at the first DBO step */
    MOE_CHECK_GOTO(kern_cuda_set_sm_reserve(g->k, p->dbo_sm_reserve), st, fail);
    MOE_CHECK_GOTO(kern_cuda_set_sm_reserve(g->k, 0), st, fail);
    {
        const char *mode = getenv("MOE_DBO_SM_MODE");
        g->sm_cap = mode && strcmp(mode, "cap") == 0;
    }
    MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&g->yield_d, sizeof(int32_t)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMemset(g->yield_d, 0, sizeof(int32_t)), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaHostAlloc((void **)&g->flag01_h, 2 * sizeof(int32_t), cudaHostAllocDefault), st, fail);
    g->flag01_h[0] = 0;
    g->flag01_h[1] = 1;
    if (p->dbo_sm_reserve > 0) { /* against this device's SMs, now */
        MOE_CHECK_GOTO(kern_cuda_set_yield(g->k, g->yield_d, p->dbo_sm_reserve), st, fail);
        MOE_CHECK_GOTO(kern_cuda_set_yield(g->k, NULL, 0), st, fail);
    }

    /* Weights. */
    g->layers = calloc((size_t)(n_layers ? n_layers : 1), sizeof(gpu_layer));
    if (!g->layers) {
        st = moe_fail(MOE_ERR_NOMEM, "gpu layers");
        goto fail;
    }
    g->n_layers = n_layers;
    int64_t I = 0, Is = 0;
    for (int32_t i = 0; i < n_layers; i++) {
        const eng_layer *hl = &layers[i];
        gpu_layer *l = &g->layers[i];
        l->layer = hl->layer;
        MOE_CHECK_GOTO(upload(&hl->w13, &l->w13), st, fail);
        MOE_CHECK_GOTO(upload(&hl->w2, &l->w2), st, fail);
        MOE_CHECK_GOTO(upload(&hl->router, &l->router), st, fail);
        I = hl->w13.shape[1] / 2;
        if (hl->correction_bias) {
            moe_tensor b = moe_tensor_view1(hl->correction_bias, MOE_DTYPE_F32, E), bd;
            MOE_CHECK_GOTO(upload(&b, &bd), st, fail);
            l->bias = bd.data;
        }
        l->has_shared = hl->has_shared;
        if (l->has_shared) {
            MOE_CHECK_GOTO(upload(&hl->shared_w13, &l->sw13), st, fail);
            MOE_CHECK_GOTO(upload(&hl->shared_w2, &l->sw2), st, fail);
            MOE_CHECK_GOTO(upload(&hl->shared_gate, &l->sgate), st, fail);
            if (hl->shared_w13.shape[0] / 2 > Is)
                Is = hl->shared_w13.shape[0] / 2;
        }
    }
    /* The expert map of this rank, on the device. */
    int32_t *map = malloc(sizeof(int32_t) * (size_t)E);
    if (!map) {
        st = moe_fail(MOE_ERR_NOMEM, "gpu map");
        goto fail;
    }
    st = par_placement_expert_map(g->m.placement, p->rank, map);
    if (st == MOE_OK) {
        moe_tensor mh = moe_tensor_view1(map, MOE_DTYPE_I32, E), md;
        st = upload(&mh, &md);
        g->map_d = md.data;
    }
    /* The parts of DBO split by experts: the first dbo_first_share percent of the local slots of
     * every rank (rounded, at least one and at most all but one), and the rest; each rank's map
     * of a part leaves the other part's experts out (-1). */
    const int32_t share = p->dbo_first_share > 0 ? p->dbo_first_share : 50;
    for (int h = 0; h < 2 && st == MOE_OK && g->world > 1; h++) {
        const par_placement *pl = g->m.placement;
        g->in_set[h] = calloc((size_t)E, 1);
        if (!g->in_set[h]) {
            st = moe_fail(MOE_ERR_NOMEM, "gpu expert halves");
            break;
        }
        st = par_placement_first_part(pl, share, g->in_set[h]);
        if (st != MOE_OK)
            break;
        for (int64_t e = 0; e < E; e++) {
            if (h == 1)
                g->in_set[h][e] = (uint8_t)!g->in_set[h][e];
            map[e] = pl->owner[e] == p->rank && g->in_set[h][e] ? pl->local_slot[e] : -1;
        }
        moe_tensor mh = moe_tensor_view1(map, MOE_DTYPE_I32, E), md;
        st = upload(&mh, &md);
        g->map_half_d[h] = md.data;
    }
    free(map);
    if (st != MOE_OK)
        goto fail;

    /* Buffers for max_tokens. */
    g->cnt = calloc((size_t)E + 1, sizeof(int64_t));
    if (!g->cnt) {
        st = moe_fail(MOE_ERR_NOMEM, "gpu counts");
        goto fail;
    }
    MOE_CUDA_CHECK_GOTO(cudaHostAlloc(&g->y_h, (size_t)(TM * H) * es, cudaHostAllocDefault), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&g->y_d, (size_t)(TM * H) * es), st, fail);
    for (int b = 0; b < 2; b++) {
        gpu_inputs *in = &g->in[b];
        MOE_CUDA_CHECK_GOTO(cudaHostAlloc(&in->x_h, (size_t)(TM * H) * es, cudaHostAllocDefault), st, fail);
        MOE_CUDA_CHECK_GOTO(
            cudaHostAlloc((void **)&in->ids_h, sizeof(int32_t) * (size_t)(TM * K), cudaHostAllocDefault), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaHostAlloc((void **)&in->w_h, sizeof(float) * (size_t)(TM * K), cudaHostAllocDefault),
                            st, fail);
        MOE_CUDA_CHECK_GOTO(cudaHostAlloc(&in->lg_h, sizeof(float) * (size_t)(TM * E), cudaHostAllocDefault), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaMalloc(&in->x_d, (size_t)(TM * H) * es), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&in->ids_d, sizeof(int32_t) * (size_t)(TM * K)), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&in->w_d, sizeof(float) * (size_t)(TM * K)), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaMalloc(&in->lg_d, sizeof(float) * (size_t)(TM * E)), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&in->ready, cudaEventDisableTiming), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&in->released, cudaEventDisableTiming), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaEventCreate(&in->tm0), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaEventCreate(&in->tm1), st, fail);
        MOE_CUDA_CHECK_GOTO(cudaEventRecord(in->released, g->s_main), st, fail);
    }
    if (g->world > 1) {
        const size_t pairs = (size_t)(TM * K);
        g->a2a = calloc(4 * (size_t)g->world, sizeof(size_t));
        g->gv_ptr = calloc((size_t)g->world, sizeof(void *));
        g->gv_bytes = calloc((size_t)g->world, sizeof(size_t));
        if (!g->a2a || !g->gv_ptr || !g->gv_bytes) {
            st = moe_fail(MOE_ERR_NOMEM, "gpu combine sizes");
            goto fail;
        }
        MOE_CUDA_CHECK_GOTO(cudaMalloc(&g->slots_d, pairs * (size_t)H * es), st, fail);
        if (p->exchange == 1) {
            /* a collective of the communicator: every rank the same bytes. W parts of at most
             * a rank's rows x K pairs each (a part holds pairs of the destination's rows). */
            g->sym_pairs = (int64_t)g->world * ((TM + g->world - 1) / g->world) * K;
            MOE_CHECK_GOTO(par_comm_sym_alloc(p->comm, (size_t)g->sym_pairs * (size_t)H * es, &g->send_d), st, fail);
            g->ce = true;
            MOE_CHECK_GOTO(par_comm_sym_alloc(p->comm, (size_t)g->sym_pairs * (size_t)H * es, &g->recv_d), st, fail);
        } else {
            MOE_CUDA_CHECK_GOTO(cudaMalloc(&g->send_d, pairs * (size_t)H * es), st, fail);
            MOE_CUDA_CHECK_GOTO(cudaMalloc(&g->recv_d, pairs * (size_t)H * es), st, fail);
        }
        MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&g->recv_of_d, pairs * sizeof(int32_t)), st, fail);
        for (int b = 0; b < 2; b++) {
            gpu_inputs *in = &g->in[b];
            MOE_CUDA_CHECK_GOTO(
                cudaHostAlloc((void **)&in->idx_h, 2 * GPU_MAX_PARTS * (pairs + 1) * sizeof(int32_t), cudaHostAllocDefault),
                st, fail);
            MOE_CUDA_CHECK_GOTO(cudaMalloc((void **)&in->idx_d, 2 * GPU_MAX_PARTS * (pairs + 1) * sizeof(int32_t)), st,
                                fail);
            for (int mb = 0; mb < GPU_MAX_PARTS; mb++)
                MOE_CHECK_GOTO(par_exchange_plan_init(&in->plan[mb], g->world, p->rank, (int64_t)pairs,
                                                      in->idx_h + (2 * mb) * (pairs + 1),
                                                      in->idx_h + (2 * mb + 1) * (pairs + 1)),
                               st, fail);
            MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&in->gathered, cudaEventDisableTiming), st, fail);
            MOE_CUDA_CHECK_GOTO(cudaEventCreate(&in->tm_g0), st, fail);
            MOE_CUDA_CHECK_GOTO(cudaEventCreate(&in->tm_g1), st, fail);
        }
        if (Is > 0)
            MOE_CUDA_CHECK_GOTO(cudaMalloc(&g->sh_d, (size_t)(TM * H) * es), st, fail);
    }
    MOE_CHECK_GOTO(kern_cuda_reserve(g->k, TM, (int32_t)K, H, I, g->m.placement->n_local[p->rank],
                                     g->world == 1 ? Is : 0),
                   st, fail);
    if (Is > 0 && g->world > 1)
        MOE_CHECK_GOTO(kern_cuda_reserve(g->kside, TM, (int32_t)K, H, I, 0, Is), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaDeviceSynchronize(), st, fail);
    *out = g;
    return MOE_OK;
fail:
    eng_gpu_free(g);
    return st;
}

/* Polls an event until done or the deadline: spins first (a step of small T ends in tens of
 * microseconds), then sleeps briefly between looks; idle (if any) runs between looks, at most
 * every ENG_GPU_IDLE_NS (the worker's hook looks for the next message: a system call, which
 * would otherwise stand between the device's end and the look that sees it). */
#define ENG_GPU_IDLE_NS 10000ull
static moe_status poll_event(cudaEvent_t ev, uint64_t deadline, const char *what, void (*idle)(void *), void *arg) {
    uint64_t next_idle = 0;
    for (int i = 0;; i++) {
        cudaError_t e = cudaEventQuery(ev);
        if (e == cudaSuccess)
            return MOE_OK;
        if (e != cudaErrorNotReady)
            return moe_fail(MOE_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
        const uint64_t now = moe_now_ns();
        if (now > deadline)
            return moe_fail(MOE_ERR_TIMEOUT, "%s: the device did not finish the step in time", what);
        if (idle && now >= next_idle) {
            idle(arg);
            next_idle = now + ENG_GPU_IDLE_NS;
        }
        if (i < 20000) {
            sched_yield();
        } else {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
}

/* expert_tokens[e] = how many of the n ids are e (ids out of range are not counted), with one
 * more counter for those so that the loop has no branch: cnt [E + 1] scratch. */
static void count_experts(const int32_t *ids, int64_t n, int64_t E, int64_t *cnt, int64_t *expert_tokens) {
    memset(cnt, 0, sizeof(int64_t) * (size_t)(E + 1));
    for (int64_t i = 0; i < n; i++) {
        const uint32_t c = (uint32_t)ids[i];
        cnt[c < (uint32_t)E ? c : (uint32_t)E]++;
    }
    memcpy(expert_tokens, cnt, sizeof(int64_t) * (size_t)E);
}

/* Rows [lo, hi) of y back to the host: with io, the part of each request that falls in them,
 * straight into its output; else (lo = 0, hi = T, rank 0) one copy into the pinned output. */
static moe_status copy_out(eng_gpu_t *g, const eng_step_req *reqs, int32_t n, int64_t lo, int64_t hi,
                           const eng_gpu_io *io, cudaStream_t s) {
    const size_t row = (size_t)g->m.hidden * moe_dtype_size(g->m.dtype);
    if (hi <= lo)
        return MOE_OK;
    if (!io) {
        MOE_CUDA_CHECK(cudaMemcpyAsync((char *)g->y_h + (size_t)lo * row, (char *)g->y_d + (size_t)lo * row,
                                       (size_t)(hi - lo) * row, cudaMemcpyDeviceToHost, s));
        return MOE_OK;
    }
    int64_t t0 = 0;
    for (int32_t i = 0; i < n && t0 < hi; i++) {
        const int64_t t1 = t0 + reqs[i].n_tokens, a = t0 > lo ? t0 : lo, b = t1 < hi ? t1 : hi;
        if (b > a)
            MOE_CUDA_CHECK(cudaMemcpyAsync((char *)io->y[i] + (size_t)(a - t0) * row, (char *)g->y_d + (size_t)a * row,
                                           (size_t)(b - a) * row, cudaMemcpyDeviceToHost, s));
        t0 = t1;
    }
    return MOE_OK;
}

static gpu_layer *find(eng_gpu_t *g, int32_t layer) {
    for (int32_t i = 0; i < g->n_layers; i++)
        if (g->layers[i].layer == layer)
            return &g->layers[i];
    return NULL;
}

static moe_status gather_x(eng_gpu_t *g, gpu_inputs *in, int64_t T);
static moe_status plan_step(eng_gpu_t *g, gpu_inputs *in);

/* Copies a step's inputs into the set `in` on s_copy, once the step that used the set last
 * is done with it: x (at W > 1 only this rank's block of rows [T r / W, T (r + 1) / W): the
 * other blocks come from the other ranks over NVLink, gather_x), ids and weights, and the
 * logits where a request is routed here. From the registered data path as they are, or staged
 * into the set's pinned memory first. */
static moe_status stage(eng_gpu_t *g, gpu_inputs *in, uint64_t tag, const eng_step_req *reqs, int32_t n,
                        const eng_gpu_io *io, bool ahead) {
    const eng_step_model *m = &g->m;
    const int64_t H = m->hidden, E = m->n_experts, K = m->top_k;
    const size_t es = moe_dtype_size(m->dtype), row = (size_t)H * es;
    const int32_t W = g->world, r = g->p.rank;
    int64_t T = 0;
    for (int32_t i = 0; i < n; i++)
        T += reqs[i].n_tokens;
    MOE_REQUIRE(T <= g->p.max_tokens, MOE_ERR_LIMIT, "gpu step: %lld tokens over the step's %lld", (long long)T,
                (long long)g->p.max_tokens);
    bool routed = false, any_ids = false, any_logits = false;
    int64_t t0 = 0;
    for (int32_t i = 0; i < n; i++) {
        const eng_step_req *q = &reqs[i];
        any_ids |= q->src == ENG_ROUTE_IDS;
        any_logits |= q->src == ENG_ROUTE_LOGITS;
        if (!io) {
            memcpy((char *)in->x_h + (size_t)(t0 * H) * es, q->x, (size_t)(q->n_tokens * H) * es);
            if (q->src == ENG_ROUTE_IDS) {
                memcpy(in->ids_h + t0 * K, q->ids, sizeof(int32_t) * (size_t)(q->n_tokens * K));
                memcpy(in->w_h + t0 * K, q->weights, sizeof(float) * (size_t)(q->n_tokens * K));
            } else if (q->src == ENG_ROUTE_LOGITS) {
                memcpy((char *)in->lg_h + (size_t)(t0 * E) * sizeof(float), q->logits,
                       (size_t)(q->n_tokens * E) * moe_dtype_size(q->logits_dtype));
            }
        }
        routed |= q->src != ENG_ROUTE_IDS;
        t0 += q->n_tokens;
    }
    const void *xs = io ? io->x : in->x_h, *lgs = io ? io->logits : in->lg_h;
    const int32_t *idss = io ? io->ids : in->ids_h;
    const float *ws = io ? io->w : in->w_h;
    /* Ahead of its step the copy runs on the copy stream, beside the step before; at the step's
     * own entry on the main stream, whose order already puts it after the set's last use (no
     * cross-stream wait in front of a small step's kernels). */
    cudaStream_t s = ahead ? g->s_copy : g->s_main;
    if (ahead)
        MOE_CUDA_CHECK(cudaStreamWaitEvent(s, in->released, 0));
    MOE_CUDA_CHECK(cudaEventRecord(in->tm0, s));
    if (T > 0) {
        const int64_t lo = W == 1 ? 0 : T * r / W, hi = W == 1 ? T : T * (r + 1) / W;
        if (hi > lo)
            MOE_CUDA_CHECK(cudaMemcpyAsync((char *)in->x_d + (size_t)lo * row, (const char *)xs + (size_t)lo * row,
                                           (size_t)(hi - lo) * row, cudaMemcpyHostToDevice, s));
        /* Only what the step's requests carry: the ids and weights of routed requests are made
         * on the device, and logits come only with requests that send them (a copy of a few
         * bytes still costs microseconds: at T = 1 four copies took 19 us, engine run 23). */
        if (any_ids) {
            MOE_CUDA_CHECK(
                cudaMemcpyAsync(in->ids_d, idss, sizeof(int32_t) * (size_t)(T * K), cudaMemcpyHostToDevice, s));
            MOE_CUDA_CHECK(cudaMemcpyAsync(in->w_d, ws, sizeof(float) * (size_t)(T * K), cudaMemcpyHostToDevice, s));
        }
        if (any_logits)
            MOE_CUDA_CHECK(cudaMemcpyAsync(in->lg_d, lgs, sizeof(float) * (size_t)(T * E), cudaMemcpyHostToDevice, s));
    }
    MOE_CUDA_CHECK(cudaEventRecord(in->tm1, s));
    if (ahead || W > 1) /* waited for by the step's main stream, or by the gather's */
        MOE_CUDA_CHECK(cudaEventRecord(in->ready, s));
    in->ahead = ahead;
    in->routed = routed;
    in->tag = tag;
    in->T = T;
    in->ids_src = idss;
    in->gather_enqueued = in->planned = false;
    if (W > 1 && T > 0) {
        MOE_CHECK(gather_x(g, in, T));
        in->staged = true; /* from here the set holds this step: its collective is enqueued */
        /* Ahead of the step, the plans too: they need only the ids when those came with the
         * requests (a private copy first: the client's ids may sit in memory of another NUMA
         * node; one streaming copy instead of two passes of scattered reads). Otherwise the step
         * builds them while its products run (routed steps after the routing); a plan that
         * fails here (a bad id) is built again, and its error reported, by the step. */
        if (ahead && !routed) {
            if (idss != in->ids_h)
                memcpy(in->ids_h, idss, sizeof(int32_t) * (size_t)(T * K));
            if (plan_step(g, in) != MOE_OK)
                in->planned = false;
        }
    }
    in->staged = true;
    return MOE_OK;
}

moe_status eng_gpu_stage(eng_gpu_t *g, uint64_t tag, const eng_step_req *reqs, int32_t n, const eng_gpu_io *io) {
    MOE_REQUIRE(g && (reqs || n == 0), MOE_ERR_INVALID_ARG, "gpu stage: NULL argument");
    gpu_inputs *in = &g->in[g->next];
    MOE_REQUIRE(!in->staged, MOE_ERR_INVALID_ARG, "gpu stage: the next step's inputs are already staged");
    MOE_CUDA_CHECK(cudaSetDevice(g->p.device));
    return stage(g, in, tag, reqs, n, io, true);
}

void eng_gpu_set_hook(eng_gpu_t *g, void (*fn)(void *), void *arg) {
    g->hook = fn;
    g->hook_arg = arg;
}

/* W > 1: the other ranks' blocks of x by an all-to-all on s_comm, once this rank's block is on
 * the device; in->gathered marks its end. Enqueued with the copies (stage): at the step's entry,
 * or ahead from the hook of the step before, after all of that step's collectives, so every
 * rank enqueues the same collectives in the same order either way. */
static moe_status gather_x(eng_gpu_t *g, gpu_inputs *in, int64_t T) {
    const int32_t W = g->world, r = g->p.rank;
    const size_t row = (size_t)g->m.hidden * moe_dtype_size(g->m.dtype);
    const int64_t lo = T * r / W, hi = T * (r + 1) / W;
    MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_comm, in->ready, 0));
    MOE_CUDA_CHECK(cudaEventRecord(in->tm_g0, g->s_comm));
    size_t *sbytes = g->a2a, *soff = g->a2a + W, *rbytes = g->a2a + 2 * W, *roff = g->a2a + 3 * W;
    for (int32_t q = 0; q < W; q++) {
        const int64_t a = T * q / W, b = T * (q + 1) / W;
        sbytes[q] = q == r ? 0 : (size_t)(hi - lo) * row;
        soff[q] = (size_t)lo * row;
        rbytes[q] = q == r ? 0 : (size_t)(b - a) * row;
        roff[q] = (size_t)a * row;
    }
    MOE_CHECK(par_comm_alltoallv(g->p.comm, in->x_d, sbytes, soff, in->x_d, rbytes, roff, g->p.timeout_ms, g->s_comm));
    MOE_CUDA_CHECK(cudaEventRecord(in->tm_g1, g->s_comm));
    MOE_CUDA_CHECK(cudaEventRecord(in->gathered, g->s_comm));
    in->gather_enqueued = true;
    return MOE_OK;
}

static bool use_dbo(const eng_gpu_t *g, int64_t T);

/* DBO halves the step's experts (every token in both micro-batches), not its tokens. */
static bool split_experts(const eng_gpu_t *g, int64_t T) { return use_dbo(g, T) && g->p.dbo_split == 1; }

/* The parts of a step of T tokens, the combine's, and their row bounds: rows [bounds[mb],
 * bounds[mb + 1]) split by tokens. The products run in *calls calls (2 with DBO: the
 * micro-batches; else 1), call c over parts [c parts / calls, (c + 1) parts / calls); each
 * call's rows have their exchange, sum and copy-out in --combine-parts parts (W > 1; auto: 2
 * where a rank's rows of the call are at least GPU_COMBINE_AUTO_BYTES, else 1; at most 2 a
 * call with DBO, 4 without, and at most the call's tokens), so that each part's copy to the
 * host runs beside the next part's exchange. DBO split by experts: 2 parts (the halves of the
 * experts), every one of all T rows (then only bounds[0] and bounds[2] apply). Returns the
 * number of parts. */
static int step_bounds(const eng_gpu_t *g, int64_t T, int64_t bounds[GPU_MAX_PARTS + 1], int *calls) {
    const bool dbo = use_dbo(g, T);
    const int nc = dbo ? 2 : 1;
    const int64_t Tc = T / nc; /* a call's tokens (the first's, with DBO) */
    int32_t want = g->p.combine_parts;
    if (want == 0) /* auto: two parts where a rank's rows are worth copying out beside an exchange
                      (a DBO call's, from twice that: run 92) */
        want = (uint64_t)(Tc / (g->world > 0 ? g->world : 1)) * (uint64_t)g->m.hidden * moe_dtype_size(g->m.dtype) >=
                       GPU_COMBINE_AUTO_BYTES * (uint64_t)nc
                   ? 2
                   : 1;
    if (want > GPU_MAX_PARTS / nc)
        want = GPU_MAX_PARTS / nc;
    if (g->world <= 1 || split_experts(g, T) || want < 1)
        want = 1;
    if (want > Tc)
        want = Tc > 0 ? (int32_t)Tc : 1;
    const int parts = nc * want;
    for (int q = 0; q <= parts; q++)
        bounds[q] = T * q / parts;
    if (calls)
        *calls = nc;
    return parts;
}

/* Part mb's rows: [*a, *b). */
static void mb_rows(const eng_gpu_t *g, int64_t T, int parts, const int64_t bounds[GPU_MAX_PARTS + 1], int mb, int64_t *a,
                    int64_t *b) {
    const bool xs = split_experts(g, T);
    *a = xs ? bounds[0] : bounds[mb];
    *b = xs ? bounds[parts] : bounds[mb + 1];
}

/* W > 1: the exchange plan of micro-batch mb of the set's step from its ids (in->ids_h, this
 * rank's private copy), its time added to in->plan_ns; plan_step: every micro-batch's. */
static moe_status plan_part(eng_gpu_t *g, gpu_inputs *in, int mb) {
    int64_t bounds[GPU_MAX_PARTS + 1];
    const int parts = step_bounds(g, in->T, bounds, NULL);
    const uint64_t t0 = moe_now_ns();
    int64_t a, b;
    mb_rows(g, in->T, parts, bounds, mb, &a, &b);
    const uint8_t *set = split_experts(g, in->T) ? g->in_set[mb] : NULL;
    MOE_CHECK(par_exchange_plan_build_set(&in->plan[mb], g->m.placement, in->ids_h, a, b, (int32_t)g->m.top_k, set));
    if (g->ce)
        MOE_CHECK(par_exchange_plan_max_part(&in->plan[mb], in->ids_h, (int32_t)g->m.top_k, &in->part[mb]));
    in->plan_ns += moe_now_ns() - t0;
    return MOE_OK;
}

static moe_status plan_step(eng_gpu_t *g, gpu_inputs *in) {
    int64_t bounds[GPU_MAX_PARTS + 1];
    const int parts = step_bounds(g, in->T, bounds, NULL);
    in->plan_ns = 0;
    for (int mb = 0; mb < parts; mb++)
        MOE_CHECK(plan_part(g, in, mb));
    in->planned = true;
    return MOE_OK;
}

static bool use_dbo(const eng_gpu_t *g, int64_t T) {
    if (g->world <= 1 || T < 2)
        return false;
    if (g->p.dbo != 2)
        return g->p.dbo == 1;
    /* auto: where the step is large, and each micro-batch's products so dense in rows per expert
     * that split by tokens, the second read of every weight costs little (config.c) */
    const int64_t rows = T * g->m.top_k / ((int64_t)g->m.n_experts * (g->p.dbo_split == 1 ? 1 : 2));
    return T >= g->p.dbo_min_tokens && rows >= g->p.dbo_min_rows;
}

/* Part mb's plan indices to the device on s_comm, once a step (the part's plan built): while
 * the products run, before any copy the next steps queue on the same copy engine (a staging copy
 * of the next step's inputs ahead of them delayed a later part's exchange by ~45 us, run 86). */
/* The device copy of a plan's index array (idx_d mirrors idx_h, where the plans keep theirs). */
static int32_t *dev_idx(const gpu_inputs *in, const int32_t *host) { return in->idx_d + (host - in->idx_h); }

static moe_status upload_idx(eng_gpu_t *g, gpu_inputs *in, int mb) {
    if (in->idx_up[mb])
        return MOE_OK;
    const par_exchange_plan *pl = &in->plan[mb];
    if (pl->n_send)
        MOE_CUDA_CHECK(cudaMemcpyAsync(dev_idx(in, pl->send_idx), pl->send_idx, sizeof(int32_t) * (size_t)pl->n_send,
                                       cudaMemcpyHostToDevice, g->s_comm));
    if (pl->n_recv)
        MOE_CUDA_CHECK(cudaMemcpyAsync(dev_idx(in, pl->recv_idx), pl->recv_idx, sizeof(int32_t) * (size_t)pl->n_recv,
                                       cudaMemcpyHostToDevice, g->s_comm));
    in->idx_up[mb] = true;
    return MOE_OK;
}

/*
 * The combine of micro-batch mb (rows [a, b)) on s_comm, once its products are done: this
 * rank's slot rows of other ranks' tokens packed and sent, the rows of its own tokens computed
 * elsewhere received, then the fixed-order sum over the slots (plus the shared expert) of the
 * rows it owns, reading each received row where it landed (the first half of a step split by
 * experts puts its received rows into the slots instead, for the sum after the second), and
 * those rows copied out. Returns the bytes sent.
 */
static moe_status combine_mb(eng_gpu_t *g, gpu_layer *l, gpu_inputs *in, int mb, int parts, const eng_step_req *reqs,
                             int32_t n, const eng_gpu_io *io, size_t *sent) {
    /* split by experts, the rows are summed after the last half's exchange only */
    const bool sum = !split_experts(g, in->T) || mb == parts - 1;
    const eng_step_model *m = &g->m;
    const int64_t H = m->hidden, K = m->top_k;
    const size_t es = moe_dtype_size(m->dtype), row = (size_t)H * es;
    const int32_t W = g->world, r = g->p.rank;
    par_exchange_plan *pl = &in->plan[mb];
    int32_t *sidx_d = dev_idx(in, pl->send_idx), *ridx_d = dev_idx(in, pl->recv_idx);
    cudaStream_t s = g->s_comm;
    MOE_CHECK(upload_idx(g, in, mb)); /* (unless they went up at the step's start) */
    MOE_CUDA_CHECK(cudaStreamWaitEvent(s, g->ev_mb[g->dbo_serial ? parts - 1 : mb], 0));
    /* micro-batch 0's exchange (its parts') borrows --dbo-sm-reserve SMs from micro-batch 1's
     * products while it runs: the flag goes up on this stream at its first part, by a copy (no
     * SM needed), and down after its last part's all-to-all (not with --exchange ce: the copy
     * engines need no SM) */
    const bool dbo = use_dbo(g, in->T);
    const int per_call = dbo ? parts / 2 : parts; /* the parts of each product call */
    const bool lending = dbo && mb < per_call && g->p.dbo_sm_reserve > 0 && !g->sm_cap && !g->ce;
    const bool lend = lending && mb == 0, lend_down = lending && mb == per_call - 1;
    /* --exchange ce: rank q's rows at q x part rows of the windows (the same part on every rank) */
    const int64_t part = g->ce ? in->part[mb] : 0;
    const size_t part_bytes = (size_t)part * row;
    MOE_REQUIRE(part * W <= g->sym_pairs || !g->ce, MOE_ERR_INTERNAL,
                "combine: a part of %lld rows over the exchange windows' %lld", (long long)part, (long long)g->sym_pairs);
    if (lend)
        MOE_CUDA_CHECK(cudaMemcpyAsync(g->yield_d, g->flag01_h + 1, sizeof(int32_t), cudaMemcpyHostToDevice, s));
    MOE_CUDA_CHECK(cudaEventRecord(g->tm_cs[mb], s));
    int ce = 0;
    if (g->ce) {
        for (int32_t q = 0; q < W && !ce; q++)
            if (q != r)
                ce = eng_gpu_copy_rows((char *)g->send_d + (size_t)q * part_bytes, NULL, g->slots_d,
                                       sidx_d + pl->send_off[q], pl->send_count[q], row, s);
    } else {
        ce = eng_gpu_copy_rows(g->send_d, NULL, g->slots_d, sidx_d, pl->n_send, row, s);
    }
    if (ce) {
        if (lending) /* down again whatever failed (else later products would keep lending) */
            (void)cudaMemcpyAsync(g->yield_d, g->flag01_h, sizeof(int32_t), cudaMemcpyHostToDevice, s);
        return moe_fail(MOE_ERR_CUDA, "combine: pack: %s", cudaGetErrorString((cudaError_t)ce));
    }
    MOE_CUDA_CHECK(cudaEventRecord(g->tm_pk[mb], s));
    size_t *sbp = g->a2a, *sop = g->a2a + W, *rbp = g->a2a + 2 * W, *rop = g->a2a + 3 * W;
    *sent = 0;
    for (int32_t q = 0; q < W; q++) {
        sbp[q] = (size_t)pl->send_count[q] * row;
        sop[q] = (size_t)pl->send_off[q] * row;
        rbp[q] = (size_t)pl->recv_count[q] * row;
        rop[q] = (size_t)pl->recv_off[q] * row;
        *sent += sbp[q];
    }
    const moe_status ast =
        g->ce ? (part ? par_comm_alltoall(g->p.comm, g->send_d, g->recv_d, part_bytes, g->p.timeout_ms, s) : MOE_OK)
              : par_comm_alltoallv(g->p.comm, g->send_d, sbp, sop, g->recv_d, rbp, rop, g->p.timeout_ms, s);
    if (lend_down || (lending && ast != MOE_OK)) { /* the all-to-all done (or failed): the SMs go back */
        const cudaError_t le = cudaMemcpyAsync(g->yield_d, g->flag01_h, sizeof(int32_t), cudaMemcpyHostToDevice, s);
        if (ast == MOE_OK && le != cudaSuccess)
            return moe_fail(MOE_ERR_CUDA, "combine: the exchange's SM flag: %s", cudaGetErrorString(le));
    }
    MOE_CHECK(ast);
    MOE_CUDA_CHECK(cudaEventRecord(g->tm_a2[mb], s));
    const int64_t lo = pl->bound[r], hi = pl->bound[r + 1];
    if (!sum) { /* split by experts, first half: into the slots, summed after the second exchange */
        if (g->ce) {
            for (int32_t q = 0; q < W && !ce; q++)
                if (q != r)
                    ce = eng_gpu_copy_rows(g->slots_d, ridx_d + pl->recv_off[q], (char *)g->recv_d + (size_t)q * part_bytes,
                                           NULL, pl->recv_count[q], row, s);
        } else {
            ce = eng_gpu_copy_rows(g->slots_d, ridx_d, g->recv_d, NULL, pl->n_recv, row, s);
        }
        if (ce)
            return moe_fail(MOE_ERR_CUDA, "combine: unpack: %s", cudaGetErrorString((cudaError_t)ce));
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_ce[mb], s));
        return MOE_OK;
    }
    /* The rows received stay where they landed: the sum reads each own pair from its received
     * row or its slot (recv_of), the same values in the same order as after an unpack. */
    if (g->ce) { /* each part where it landed: received row i of rank q at q x part + i */
        ce = eng_gpu_index_of(g->recv_of_d, (hi - lo) * K, NULL, 0, lo * K, 0, s);
        for (int32_t q = 0; q < W && !ce; q++)
            if (q != r)
                ce = eng_gpu_index_of(g->recv_of_d, 0, ridx_d + pl->recv_off[q], pl->recv_count[q], lo * K,
                                      (int64_t)q * part, s);
    } else {
        ce = eng_gpu_index_of(g->recv_of_d, (hi - lo) * K, ridx_d, pl->n_recv, lo * K, 0, s);
    }
    if (ce)
        return moe_fail(MOE_ERR_CUDA, "combine: received rows' index: %s", cudaGetErrorString((cudaError_t)ce));
    MOE_CUDA_CHECK(cudaEventRecord(g->tm_ce[mb], s));
    if (hi > lo) {
        if (l->has_shared)
            MOE_CUDA_CHECK(cudaStreamWaitEvent(s, g->ev_side[mb], 0));
        moe_tensor sv = moe_tensor_view3((char *)g->slots_d + (size_t)(lo * K) * row, m->dtype, hi - lo, K, H);
        moe_tensor shv = moe_tensor_view2((char *)g->sh_d + (size_t)lo * row, m->dtype, hi - lo, H);
        moe_tensor yv = moe_tensor_view2((char *)g->y_d + (size_t)lo * row, m->dtype, hi - lo, H);
        MOE_CHECK(kern_cuda_moe_sum_recv(g->kcomm, &sv, g->recv_of_d, g->recv_d, l->has_shared ? &shv : NULL, &yv));
    }
    if (io) { /* on its own stream: the next part's exchange goes on meanwhile */
        MOE_CUDA_CHECK(cudaEventRecord(g->ev_sum[mb], s));
        MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_out, g->ev_sum[mb], 0));
        return copy_out(g, reqs, n, lo, hi, io, g->s_out);
    }
    /* ZeroMQ data path: rank 0 answers for every row, so the owners' rows go to it */
    for (int32_t q = 0; q < W; q++) {
        g->gv_ptr[q] = (char *)g->y_d + (size_t)pl->bound[q] * row;
        g->gv_bytes[q] = (size_t)(pl->bound[q + 1] - pl->bound[q]) * row;
    }
    return par_comm_gatherv(g->p.comm, 0, (char *)g->y_d + (size_t)lo * row, (size_t)(hi - lo) * row, g->gv_ptr,
                            g->gv_bytes, 0, g->p.timeout_ms, s);
}

/* The step proper, from inputs staged in `in`. */
static moe_status step_run(eng_gpu_t *g, gpu_layer *l, gpu_inputs *in, int32_t layer, const eng_step_req *reqs,
                           int32_t n, int64_t *expert_tokens, eng_gpu_timing *timing, const eng_gpu_io *io,
                           uint64_t t_entry) {
    const eng_step_model *m = &g->m;
    const int64_t H = m->hidden, E = m->n_experts, K = m->top_k, T = in->T;
    const size_t es = moe_dtype_size(m->dtype);
    const int32_t W = g->world, r = g->p.rank;
    const uint64_t deadline = t_entry + (uint64_t)g->p.timeout_ms * 1000000ull;
    uint64_t t_plan = 0, t_wait = 0;
    bool counted = false;
    const bool routed = in->routed;
    if (timing)
        memset(timing, 0, sizeof *timing);
    if (T == 0)
        return MOE_OK;
    if (in->ahead)
        MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_main, in->ready, 0));
    if (W > 1) /* at W = 1 the gather's start is its end (tm_x) */
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_start, g->s_main));
    /* At W > 1 the ranks all-gather the blocks of x each copied over PCIe (enqueued with the
     * copies): a GPU's PCIe traffic stays T H / W per step however many share the batch, and
     * the ranks start their products together. */
    if (W > 1) {
        if (!in->gather_enqueued)
            MOE_CHECK(gather_x(g, in, T));
        MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_main, in->gathered, 0));
    }
    /* where the step's device time starts: at W = 1 with the inputs copied at entry, the copies'
     * end on this stream (one event fewer on a small step's path) */
    const cudaEvent_t ev_x = W == 1 && !in->ahead ? in->tm1 : g->tm_x;
    if (ev_x == g->tm_x)
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_x, g->s_main));
    g->hmark[2] = g->hmark[3] = g->hmark[4] = moe_now_ns();

    /* Routing on the device, request by request. */
    kern_route_params rp = m->route;
    rp.correction_bias = l->bias;
    int64_t t0 = 0;
    for (int32_t i = 0; i < n; i++) {
        const eng_step_req *q = &reqs[i];
        const int64_t nt = q->n_tokens;
        if (q->src != ENG_ROUTE_IDS && nt > 0) {
            void *lgp = (char *)in->lg_d + (size_t)(t0 * E) * sizeof(float);
            moe_tensor lg = moe_tensor_view2(lgp, q->src == ENG_ROUTE_LOGITS ? q->logits_dtype : MOE_DTYPE_F32, nt, E);
            if (q->src == ENG_ROUTE_HIDDEN) {
                MOE_REQUIRE(l->router.data, MOE_ERR_UNSUPPORTED,
                            "layer %d: this engine has no router weights: send topk ids and weights, or router logits",
                            (int)layer);
                moe_tensor xv = moe_tensor_view2((char *)in->x_d + (size_t)(t0 * H) * es, m->dtype, nt, H);
                MOE_CHECK(kern_router_logits(g->k, &xv, &l->router, &lg));
            }
            moe_tensor ti = moe_tensor_view2(in->ids_d + t0 * K, MOE_DTYPE_I32, nt, K);
            moe_tensor tw = moe_tensor_view2(in->w_d + t0 * K, MOE_DTYPE_F32, nt, K);
            MOE_CHECK(kern_route(g->k, &rp, &lg, &ti, &tw));
        }
        t0 += nt;
    }
    /* W = 1: the ids the device chose go back on the copy stream while the products run (they
     * serve only the tokens per expert, read after the wait); at W > 1 below, on this stream */
    if (routed && W == 1) {
        MOE_CUDA_CHECK(cudaEventRecord(g->ev_in, g->s_main));
        MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_copy, g->ev_in, 0));
        MOE_CUDA_CHECK(cudaMemcpyAsync(in->ids_h, in->ids_d, sizeof(int32_t) * (size_t)(T * K), cudaMemcpyDeviceToHost,
                                       g->s_copy));
        MOE_CUDA_CHECK(cudaEventRecord(g->ev_red[0], g->s_copy));
    }
    /* The step's ids on the host: as they came (the client's), or copied back into the set's
     * pinned memory after the device routed them (read after the step's wait at W = 1; at
     * W > 1 the exchange plan needs them first: the one extra wait of a step the engine
     * routes). */
    const int32_t *ids_host = routed ? in->ids_h : in->ids_src;
    if (routed && W > 1) /* (at W = 1 on the copy stream, above) */
        MOE_CUDA_CHECK(cudaMemcpyAsync(in->ids_h, in->ids_d, sizeof(int32_t) * (size_t)(T * K), cudaMemcpyDeviceToHost,
                                       g->s_main));

    kern_shared_expert se;
    memset(&se, 0, sizeof se);
    if (l->has_shared) {
        se.w13 = &l->sw13;
        se.w2 = &l->sw2;
        se.gate = l->sgate.data ? &l->sgate : NULL;
        se.act = m->act;
    }
    moe_tensor x = moe_tensor_view2(in->x_d, m->dtype, T, H);
    moe_tensor ids = moe_tensor_view2(in->ids_d, MOE_DTYPE_I32, T, K);
    moe_tensor wt = moe_tensor_view2(in->w_d, MOE_DTYPE_F32, T, K);
    moe_tensor yd = moe_tensor_view2(g->y_d, m->dtype, T, H);
    const bool dbo = use_dbo(g, T);
    int parts = 1; /* the combine's parts (W > 1) */
    size_t sent_bytes = 0;

    if (W == 1) {
        /* The unwrapped fast path: one call on one stream, straight into y; a small step's y is
         * the requests' outputs in the registered data path themselves (the last kernel writes
         * them there over PCIe: no copy after it). */
        void *yo = direct_out(g, reqs, n, io, T);
        if (yo)
            yd = moe_tensor_view2(yo, m->dtype, T, H);
        kern_experts_params ep = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = m->act};
        MOE_CHECK(kern_moe_forward(g->k, &ep, &x, &l->w13, &l->w2, &ids, &wt, l->has_shared ? &se : NULL, &yd));
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_compute, g->s_main));
        if (!yo)
            MOE_CHECK(copy_out(g, reqs, n, 0, T, io, g->s_main));
        if (routed)
            MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_main, g->ev_red[0], 0));
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_end, g->s_main));
        t_wait = moe_now_ns();
        /* The tokens per expert while the device works, when the ids came with the requests. */
        if (expert_tokens && !routed) {
            count_experts(ids_host, T * K, E, g->cnt, expert_tokens);
            counted = true;
        }
        MOE_CHECK(poll_event(g->tm_end, deadline, "step", g->hook, g->hook_arg));
    } else {
        kern_experts_params ep = {.n_experts = (int32_t)E,
                                  .n_local = g->m.placement->n_local[r],
                                  .expert_map = g->map_d,
                                  .act = m->act,
                                  /* every slot of the rows this rank owns is computed here
                                   * or received; other rows' slots are never read (a bad id
                                   * fails the step) */
                                  .slots_local_only = true};
        int64_t bounds[GPU_MAX_PARTS + 1];
        int calls = 1;
        parts = step_bounds(g, T, bounds, &calls);
        const int per_call = parts / calls; /* the combine's parts of each product call */
        if (routed) /* the routed ids reach in->ids_h: the plan waits for this below */
            MOE_CUDA_CHECK(cudaEventRecord(g->ev_in, g->s_main));
        /* The shared expert of the rows this rank owns (the same blocks as the plan's), on its
         * own stream, beside the routed experts and the exchange. */
        if (l->has_shared) {
            MOE_CUDA_CHECK(cudaEventRecord(g->ev_done, g->s_main));
            MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_side, g->ev_done, 0));
            for (int mb = 0; mb < parts; mb++) {
                int64_t a, b;
                mb_rows(g, T, parts, bounds, mb, &a, &b);
                const int64_t nt = b - a, lo = a + nt * r / W, hi = a + nt * (r + 1) / W;
                if (split_experts(g, T) && mb > 0) { /* the rows were done with the first half */
                    MOE_CUDA_CHECK(cudaEventRecord(g->ev_side[mb], g->s_side));
                    continue;
                }
                if (hi > lo) {
                    moe_tensor xv = moe_tensor_view2((char *)in->x_d + (size_t)(lo * H) * es, m->dtype, hi - lo, H);
                    moe_tensor sh = moe_tensor_view2((char *)g->sh_d + (size_t)(lo * H) * es, m->dtype, hi - lo, H);
                    MOE_CHECK(kern_shared_expert_forward(g->kside, &se, &xv, &sh));
                }
                MOE_CUDA_CHECK(cudaEventRecord(g->ev_side[mb], g->s_side));
            }
        }
        /* The routed experts of every micro-batch on s_main, enqueued first so that the GPU
         * starts while the host builds the exchange plans. --dbo-sm-reserve N: the last N CTAs of the persistent products leave while micro-batch
         * 0's exchange has its flag up (kern_cuda_set_yield), so that its NCCL kernels find SMs;
         * MOE_DBO_SM_MODE=cap instead caps the grid for the whole step. Either way the backend
         * launches such steps' kernels without PDL (runs 79-80: with PDL a next kernel's CTAs,
         * launched early, sat on the SMs set free). */
        const bool lend_sms = dbo && g->p.dbo_sm_reserve > 0 && !g->ce; /* ce: the copy engines need none */
        MOE_CHECK(kern_cuda_set_sm_reserve(g->k, lend_sms && g->sm_cap ? g->p.dbo_sm_reserve : 0));
        MOE_CHECK(kern_cuda_set_yield(g->k, lend_sms && !g->sm_cap ? g->yield_d : NULL, g->p.dbo_sm_reserve));
        /* the product calls (2 with DBO, else 1), each over its parts' rows (every row when DBO
         * splits by experts: then the call's half of the experts) */
        for (int mb = 0; mb < calls; mb++) {
            const bool xs = split_experts(g, T);
            const int64_t a = xs ? 0 : bounds[mb * per_call], b = xs ? T : bounds[(mb + 1) * per_call];
            const int64_t nt = b - a;
            ep.expert_map = xs ? g->map_half_d[mb] : g->map_d;
            moe_tensor xv = moe_tensor_view2((char *)in->x_d + (size_t)(a * H) * es, m->dtype, nt, H);
            moe_tensor iv = moe_tensor_view2(in->ids_d + a * K, MOE_DTYPE_I32, nt, K);
            moe_tensor wv = moe_tensor_view2(in->w_d + a * K, MOE_DTYPE_F32, nt, K);
            moe_tensor sv = moe_tensor_view3((char *)g->slots_d + (size_t)(a * K * H) * es, m->dtype, nt, K, H);
            MOE_CHECK(kern_fused_experts(g->k, &ep, &xv, &l->w13, &l->w2, &iv, &wv, &sv));
            for (int q = mb * per_call; q < (mb + 1) * per_call; q++) {
                MOE_CUDA_CHECK(cudaEventRecord(g->ev_mb[q], g->s_main));
                MOE_CUDA_CHECK(cudaEventRecord(g->tm_pd[q], g->s_main));
            }
        }
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_compute, g->s_main));
        g->hmark[3] = moe_now_ns();
        /* The plans: built with the copies when the ids came with the requests (stage), else
         * here, from the routed ids (a private copy in the set's pinned memory), each micro-
         * batch's just before its exchange is enqueued, so that micro-batch 0's exchange does
         * not wait for micro-batch 1's plan (run 82: the two plans took 439 us of host time). */
        const bool plan_here = !in->planned;
        if (plan_here) {
            if (routed) {
                MOE_CHECK(poll_event(g->ev_in, deadline, "routing", NULL, NULL));
            } else if (in->ids_src != in->ids_h) {
                memcpy(in->ids_h, in->ids_src, sizeof(int32_t) * (size_t)(T * K));
            }
            in->plan_ns = 0;
        }
        ids_host = in->ids_h;
        for (int mb = 0; mb < parts; mb++) /* each part's indices: none up yet this step */
            in->idx_up[mb] = false;
        if (!plan_here) /* the plans were built with the copies: every part's indices go up now */
            for (int mb = 0; mb < parts; mb++)
                MOE_CHECK(upload_idx(g, in, mb));
        /* The exchange and sum of each micro-batch on s_comm, once its products are done: that
         * of micro-batch 0 runs while micro-batch 1 computes. */
        for (int mb = 0; mb < parts; mb++) {
            size_t sent = 0;
            moe_status cst = plan_here ? plan_part(g, in, mb) : MOE_OK;
            if (cst == MOE_OK)
                cst = combine_mb(g, l, in, mb, parts, reqs, n, io, &sent);
            if (cst != MOE_OK) {
                if (lend_sms && !g->sm_cap) /* a part's failure between the flag's up and down */
                    (void)cudaMemcpyAsync(g->yield_d, g->flag01_h, sizeof(int32_t), cudaMemcpyHostToDevice, g->s_comm);
                return cst;
            }
            sent_bytes += sent;
        }
        if (plan_here)
            in->planned = true;
        t_plan = in->plan_ns;
        /* the host split: the plans built here, then the exchanges' enqueueing */
        g->hmark[4] = g->hmark[3] + (plan_here ? in->plan_ns : 0);
        MOE_CUDA_CHECK(cudaEventRecord(g->ev_red[0], g->s_comm));
        MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_main, g->ev_red[0], 0));
        if (io) { /* the rows' copies out, on s_out (combine_mb) */
            MOE_CUDA_CHECK(cudaEventRecord(g->ev_out, g->s_out));
            MOE_CUDA_CHECK(cudaStreamWaitEvent(g->s_main, g->ev_out, 0));
        }
        if (!io && r == 0)
            MOE_CHECK(copy_out(g, reqs, n, 0, T, NULL, g->s_main));
        MOE_CUDA_CHECK(cudaEventRecord(g->tm_end, g->s_main));
        /* The one wait: the step's work, the exchanges included, against the deadline and
         * NCCL's asynchronous errors. */
        t_wait = moe_now_ns();
        if (expert_tokens) { /* while the device works: the ids are on the host (the plan's) */
            count_experts(ids_host, T * K, E, g->cnt, expert_tokens);
            counted = true;
        }
        int32_t left = (int32_t)((deadline > t_wait ? deadline - t_wait : 1000000) / 1000000);
        MOE_CHECK(par_comm_wait_idle(g->p.comm, g->s_main, left > 0 ? left : 1, g->hook, g->hook_arg));
    }
    const uint64_t t_done = moe_now_ns();
    /* Errors the kernels found on the device (a bad id is skipped there and reported here). */
    MOE_CHECK(kern_ctx_sync(g->k));
    if (W > 1) {
        MOE_CHECK(kern_ctx_sync(g->kcomm));
        if (l->has_shared)
            MOE_CHECK(kern_ctx_sync(g->kside));
    }
    if (expert_tokens && !counted) /* routed at W = 1: the ids came back with the step */
        count_experts(ids_host, T * K, E, g->cnt, expert_tokens);
    if (timing) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, ev_x, g->tm_end) == cudaSuccess)
            timing->step_us = ms * 1e3f;
        if (W > 1 && cudaEventElapsedTime(&ms, g->tm_start, g->tm_x) == cudaSuccess)
            timing->gather_us = ms * 1e3f;
        if (cudaEventElapsedTime(&ms, ev_x, g->tm_compute) == cudaSuccess)
            timing->compute_us = ms * 1e3f;
        if (cudaEventElapsedTime(&ms, in->tm0, in->tm1) == cudaSuccess)
            timing->h2d_us = ms * 1e3f;
        timing->host_us = (float)((double)(t_wait - t_entry) * 1e-3);
        timing->wait_us = (float)((double)(t_done - t_wait) * 1e-3);
        timing->plan_us = (float)((double)t_plan * 1e-3);
        g->hmark[5] = t_wait;
        for (int i = 0; i < 5; i++)
            timing->host_split_us[i] = g->hmark[i + 1] >= g->hmark[i] ? (float)((double)(g->hmark[i + 1] - g->hmark[i]) * 1e-3) : 0.0f;
        if (W > 1) {
            for (int mb = 0; mb < parts; mb++) {
                if (cudaEventElapsedTime(&ms, g->tm_cs[mb], g->tm_ce[mb]) == cudaSuccess)
                    timing->combine_us += ms * 1e3f;
                if (mb > 0 && mb < parts - 1)
                    continue; /* the timeline: the first part and the last */
                const cudaEvent_t at[5] = {g->tm_pd[mb], g->tm_cs[mb], g->tm_pk[mb], g->tm_a2[mb], g->tm_ce[mb]};
                for (int i = 0; i < 5; i++)
                    if (cudaEventElapsedTime(&ms, ev_x, at[i]) == cudaSuccess)
                        timing->mb_us[mb ? 1 : 0][i] = ms * 1e3f;
            }
            timing->combine_bytes = (float)sent_bytes;
        }
        (void)cudaGetLastError();
    }
    return MOE_OK;
}

moe_status eng_gpu_step(eng_gpu_t *g, uint64_t tag, int32_t layer, const eng_step_req *reqs, int32_t n,
                        const void **y, int64_t *expert_tokens, eng_gpu_timing *timing, const eng_gpu_io *io) {
    MOE_REQUIRE(g && (reqs || n == 0), MOE_ERR_INVALID_ARG, "gpu step: NULL argument");
    if (y)
        *y = NULL;
    gpu_layer *l = find(g, layer);
    MOE_REQUIRE(l, MOE_ERR_NOT_FOUND, "gpu step: layer %d is not loaded", (int)layer);
    const uint64_t t_entry = moe_now_ns();
    MOE_CUDA_CHECK(cudaSetDevice(g->p.device));
    gpu_inputs *in = &g->in[g->next];
    if (in->staged && in->tag != tag) { /* staged for another step: this one's inputs go up now */
        in->staged = false;
        if (in->gather_enqueued) { /* the collectives would differ between the ranks */
            par_comm_abort(g->p.comm);
            return moe_fail(MOE_ERR_INTERNAL,
                            "gpu step %llu: the inputs staged are step %llu's, whose all-gather is enqueued: the "
                            "communicator is aborted",
                            (unsigned long long)tag, (unsigned long long)in->tag);
        }
    }
    const bool ahead = in->staged;
    g->hmark[0] = t_entry;
    if (!in->staged)
        MOE_CHECK(stage(g, in, tag, reqs, n, io, false));
    g->hmark[1] = moe_now_ns();
    in->staged = false;
    g->next ^= 1; /* the next step's inputs go to the other set, while this one runs */
    moe_status st = step_run(g, l, in, layer, reqs, n, expert_tokens, timing, io, t_entry);
    if (timing)
        timing->staged = ahead ? 1.0f : 0.0f;
    /* The set is free again once everything this step enqueued is done, on every stream (also
     * after an error: a staging copy must never overwrite inputs a failed step still reads). */
    if (g->world > 1) {
        (void)cudaEventRecord(g->ev_red[1], g->s_comm);
        (void)cudaStreamWaitEvent(g->s_main, g->ev_red[1], 0);
        (void)cudaEventRecord(g->ev_side[1], g->s_side);
        (void)cudaStreamWaitEvent(g->s_main, g->ev_side[1], 0);
        (void)cudaEventRecord(g->ev_out, g->s_out); /* the rows' copies out (a failed step's too) */
        (void)cudaStreamWaitEvent(g->s_main, g->ev_out, 0);
    } else if (st != MOE_OK) { /* W = 1: a failed step's routed ids may still be on their way
                                  back on the copy stream (a step that ends well waited for them) */
        (void)cudaEventRecord(g->ev_red[1], g->s_copy);
        (void)cudaStreamWaitEvent(g->s_main, g->ev_red[1], 0);
    }
    (void)cudaEventRecord(in->released, g->s_main);
    if (st == MOE_OK && y && g->p.rank == 0 && !io)
        *y = g->y_h;
    while (st == MOE_OK && g->min_step_ns && moe_now_ns() - t_entry < g->min_step_ns) {
        if (g->hook)
            g->hook(g->hook_arg);
        sched_yield();
    }
    return st;
}
