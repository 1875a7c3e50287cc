/*
 * gpu_step.h: a GPU worker's step (rank r of W on one device): the weights of its experts
 * resident on the device, pinned staging buffers, a compute stream, a side stream for the
 * shared expert and a communication stream for the NCCL combine.
 *
 * One step: the requests are staged into pinned memory and copied to the device; routing runs
 * on the device where a request did not bring ids; then
 *   W = 1, no DBO  the unwrapped fast path: one kern_moe_forward on one stream, straight into y;
 *   W > 1          each rank computes its slots (kern_fused_experts in slot mode: zero where
 *                  another rank holds the expert) and the combine is an NCCL sum-reduce of the
 *                  [T, K, H] slot tensors to rank 0 (exact: every slot is non-zero on one rank
 *                  only), which adds the shared expert (run beside, on its own stream) and sums
 *                  the slots in fixed order (kern_moe_sum);
 *   DBO            the rows split in two micro-batches: the reduce of the first runs on the
 *                  communication stream while the second computes.
 * The only host wait of a step is the one that hands the result back (polled against the
 * step's deadline, with NCCL's asynchronous errors), except when the engine routes: then the
 * routed ids are copied back for the per-expert counts after that same wait.
 *
 * Results are the same bits for every W, placement and DBO setting: slots are placement-
 * independent (a row's contribution never depends on the other rows) and the sum is in fixed
 * slot order.
 *
 * Threads: the worker's step loop only.
 */
#ifndef ENG_GPU_STEP_H
#define ENG_GPU_STEP_H

#include "engine/step.h"

typedef struct eng_gpu eng_gpu_t;

typedef struct eng_gpu_params {
    int32_t device;
    int32_t rank;
    const eng_step_model *model; /* dtype, H, E, K, act, routing, placement */
    int64_t max_tokens;          /* a step's tokens at most (buffers are sized for it) */
    par_comm_t *comm;            /* NCCL communicator (NULL at world size 1) */
    int32_t timeout_ms;          /* a step's deadline */
    int32_t dbo;                 /* 0 off, 1 on, 2 auto */
    int32_t dbo_min_tokens;      /* auto: DBO at and above this many tokens (W > 1) */
} eng_gpu_params;

/* Uploads the layers (host weights as the loader gives them; the host copies may be freed
 * afterwards) and allocates every buffer for max_tokens. MOE_ERR_UNSUPPORTED without CUDA. */
moe_status eng_gpu_init(eng_gpu_t **out, const eng_gpu_params *p, const eng_layer *layers, int32_t n_layers);
void eng_gpu_free(eng_gpu_t *g);

/* Device-side times of a step (CUDA events): from the inputs on the device to the end, the
 * routed experts' products, and the reduces (their own durations, summed over micro-batches),
 * with the bytes each reduce moved from this rank. */
typedef struct eng_gpu_timing {
    float step_us;
    float compute_us;
    float combine_us;
    float combine_bytes;
} eng_gpu_timing;

/* The step's inputs and outputs in host memory registered with CUDA (the shared-memory data
 * path): inputs contiguous for the whole step (x [T, H], ids and w [T, K], logits at E * 4
 * bytes per token), outputs one pointer per request ([T_i, H]). The step then copies to and
 * from the device straight from there, with no staging copy. */
typedef struct eng_gpu_io {
    const void *x;
    const int32_t *ids;
    const float *w;
    const void *logits;
    void *const *y; /* [n] (rank 0) */
} eng_gpu_io;

/* Registers host memory with CUDA (page-locked, for direct copies); the memory stays mapped
 * by the caller. */
moe_status eng_gpu_register_host(void *p, size_t bytes);

/*
 * Runs one step of `n` requests on layer `layer`. With io, the inputs are read from io (the
 * reqs still give each request's size and routing form) and rank 0 writes each request's
 * output to io->y[i]; without io, the inputs are staged from reqs, and on rank 0 *y points (on
 * success) at the output [T, H] in pinned host memory, valid until the next call; expert_tokens [E] (may be
 * NULL) gets the tokens routed to each expert. On error nothing is returned, and a
 * communicator error leaves the communicator aborted (the group must be restarted).
 */
moe_status eng_gpu_step(eng_gpu_t *g, int32_t layer, const eng_step_req *reqs, int32_t n, const void **y,
                        int64_t *expert_tokens, eng_gpu_timing *timing, const eng_gpu_io *io);

/* Whether this build has GPU workers. */
bool eng_gpu_available(void);

#endif /* ENG_GPU_STEP_H */
