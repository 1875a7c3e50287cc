/*
 * gpu_step.h: a GPU worker's step (rank r of W on one device): the weights of its experts
 * resident on the device, pinned staging buffers, a compute stream, a side stream for the
 * shared expert and a communication stream for the NCCL combine.
 *
 * One step: the requests are staged into pinned memory (or read in place from the registered
 * shared-memory data path) and copied to the device on a copy stream, into one of two input
 * sets: the next step's inputs can go up (eng_gpu_stage, called from the step's hook while the
 * current step computes) while this one runs from the other set. At W > 1 staging also
 * enqueues the x all-gather, and ahead of the step it builds the exchange plans when the ids
 * came with the requests, so a step staged ahead starts with its products. Routing runs on the device
 * where a request did not bring ids; then
 *   W = 1, no DBO  the unwrapped fast path: one kern_moe_forward on one stream, straight into y;
 *   W > 1          the rows of the step belong to the ranks in contiguous blocks. Each rank
 *                  computes the (token, slot) pairs of its experts for every row
 *                  (kern_fused_experts in slot mode), sends the pairs of other ranks' rows to
 *                  their owners and receives those of its own rows (one NCCL all-to-all of
 *                  exactly those rows: par_exchange_plan), sums the slots of its rows in fixed
 *                  order with the shared expert it computed for them on its own stream
 *                  (kern_moe_sum), and copies its rows out: straight into the requests'
 *                  outputs on the shared-memory data path (every rank writes its part), or to
 *                  rank 0 (an NCCL gather) on the ZeroMQ data path;
 *   DBO            the rows split in two micro-batches: the exchange and sum of the first run
 *                  on the communication stream while the second computes.
 * The only host wait of a step is the one that hands the result back (polled against the
 * step's deadline, with NCCL's asynchronous errors), except when the engine routes at W > 1:
 * the exchange plan needs the routed ids on the host, so the step waits once for the routing.
 *
 * Results are the same bits for every W, placement and DBO setting: a slot's contribution
 * never depends on the other rows, the exchange moves rows without touching their bits, and
 * each row's sum is in fixed slot order from +0.0, as at W = 1.
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
    int32_t dbo_min_rows;        /* auto: ... where a micro-batch has this many rows per expert */
    int32_t dbo_split;           /* 0: the micro-batches are the two halves of the tokens; 1: every
                                    token, each half of every rank's experts */
    int32_t dbo_sm_reserve;      /* with DBO: SMs the products' persistent grid leaves to the exchange */
    int32_t dbo_first_share;     /* DBO by experts: percent (10-90; 0 = 50) of each rank's experts in
                                    the first micro-batch */
    int32_t combine_parts;       /* W > 1: each product call's exchange, sum and copy-out in 1 .. 4 parts
                                    by tokens (at most 2 with DBO by tokens; 1 by experts); 0 = auto:
                                    2 where a rank's output rows of the call are at least
                                    GPU_COMBINE_AUTO_BYTES, else 1 */
    int32_t exchange;            /* W > 1: 0 grouped send/recv (p2p); 1 ncclAlltoAll on symmetric windows
                                    (ce: the communicator made with PAR_NCCL_CTA_ZERO), parts padded
                                    to the step's largest pair */
} eng_gpu_params;

/* Uploads the layers (host weights as the loader gives them; the host copies may be freed
 * afterwards) and allocates every buffer for max_tokens. MOE_ERR_UNSUPPORTED without CUDA. */
moe_status eng_gpu_init(eng_gpu_t **out, const eng_gpu_params *p, const eng_layer *layers, int32_t n_layers);
void eng_gpu_free(eng_gpu_t *g);

/* Device-side times of a step (CUDA events): from the inputs on the device to the end, the
 * routed experts' products, and the exchanges (pack, all-to-all, unpack: their own durations,
 * summed over micro-batches), with the bytes this rank sent in them. */
typedef struct eng_gpu_timing {
    float step_us;       /* from the whole x on the device to the end */
    float compute_us;    /* the routed products (and routing), from the whole x on the device */
    float combine_us;
    float combine_bytes;
    float h2d_us;        /* the inputs' copy to the device: the copies' own time, not in step_us
                            (overlapped with the step before when the step was staged ahead) */
    float host_us;       /* host time from the step's start to its one wait (enqueueing) */
    float plan_us;       /* host time building the exchange plans (W > 1; when the step was staged
                            ahead, spent in the hook during the step before) */
    float staged;        /* 1 when the inputs went up ahead, during the step before (the hook) */
    float gather_us;     /* W > 1: the x all-gather, from this rank's inputs on the device (it
                            includes waiting for the other ranks to reach it; not in step_us) */
    float wait_us;       /* host time in the one wait, until the device is done (the rest of the
                            step's host time after host_us: its check of the device's errors
                            and these timings, then returning) */
    float host_split_us[5]; /* host_us and the input copy at entry split: copying the inputs (when
                               not staged ahead), enqueueing the x all-gather, the products, the
                               plans (= plan_us), the exchanges and copies (worker debug log only) */
    float mb_us[2][5];      /* W > 1, the first micro-batch or part of the combine and the last (one
                               without DBO and --combine-parts), from the whole x on the device:
                               its products done (main stream), its exchange begun (after them and the
                               micro-batch before's exchange), its rows packed, its all-to-all done, its
                               exchange done (worker debug log only) */
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
    void *const *y; /* [n] (every rank writes the rows it owns) */
} eng_gpu_io;

/* Registers host memory with CUDA (page-locked, for direct copies, and mapped into the device's
 * address space: a small step's output is written there by the device's last kernel, with no
 * copy); the memory stays mapped by the caller. One region per context. */
moe_status eng_gpu_register_host(eng_gpu_t *g, void *p, size_t bytes);

/*
 * Copies the inputs of the step `tag` to the device ahead of it, on the copy stream, into the
 * input set the next eng_gpu_step uses (as that step would: reqs and io as it will get them;
 * they must stay valid and unchanged until it runs). Meant for the hook, while the current
 * step computes; at most one step ahead (MOE_ERR_INVALID_ARG if one is already staged).
 */
moe_status eng_gpu_stage(eng_gpu_t *g, uint64_t tag, const eng_step_req *reqs, int32_t n, const eng_gpu_io *io);

/* A function called while a step waits for its work on the device (between two looks, on the
 * step's thread; it must return quickly): the place to receive the next step and stage it. */
void eng_gpu_set_hook(eng_gpu_t *g, void (*fn)(void *), void *arg);

/*
 * Runs the step `tag` of `n` requests on layer `layer`, from its staged inputs (eng_gpu_stage
 * with the same tag) or copying them now. With io, the inputs are read from io (the
 * reqs still give each request's size and routing form) and every rank writes the rows it owns
 * of each request's output to io->y[i] (the step is answered when all ranks have finished); without io, the inputs are staged from reqs, and on rank 0 *y points (on
 * success) at the output [T, H] in pinned host memory, valid until the next call; expert_tokens [E] (may be
 * NULL) gets the tokens routed to each expert. On error nothing is returned, and a
 * communicator error leaves the communicator aborted (the group must be restarted).
 */
moe_status eng_gpu_step(eng_gpu_t *g, uint64_t tag, int32_t layer, const eng_step_req *reqs, int32_t n,
                        const void **y, int64_t *expert_tokens, eng_gpu_timing *timing, const eng_gpu_io *io);

/* Whether this build has GPU workers. */
bool eng_gpu_available(void);

#endif /* ENG_GPU_STEP_H */
