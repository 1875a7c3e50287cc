/*
 * par.h: the public face of parallel/: ranks, expert placement, the communicator interface
 * (a host backend for CPU workers, an NCCL backend for GPU workers), and the plans of
 * dispatch (which rows of a step go to which rank) and combine (summing per-slot
 * contributions in the fixed slot order of kern.h, so that results do not depend on the world
 * size or the placement).
 *
 * Threads: a placement is immutable after init and may be shared. A communicator belongs to
 * one thread (the worker's step loop).
 */
#ifndef PAR_PAR_H
#define PAR_PAR_H

#include "engine/base/moe_base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------
 * Expert placement: which rank holds which global experts (the same for every MoE layer).
 * ---------------------------------------------------------------------------------------- */
typedef enum par_place_policy {
    PAR_PLACE_CONTIGUOUS = 0, /* rank r holds a contiguous block; the first E % W ranks one more */
    PAR_PLACE_ROUND_ROBIN = 1 /* expert e on rank e % W */
} par_place_policy;

const char *par_place_policy_name(par_place_policy p);
moe_status par_place_policy_parse(const char *s, par_place_policy *out);

typedef struct par_placement {
    int32_t n_experts;   /* E */
    int32_t world_size;  /* W */
    par_place_policy policy;
    int32_t *owner;      /* [E]: rank holding expert e */
    int32_t *local_slot; /* [E]: slot of expert e on its owner */
    int32_t *n_local;    /* [W]: experts per rank */
    int32_t **experts;   /* [W][n_local[r]]: the global ids of rank r, ascending slot order */
} par_placement;

/* 1 <= W <= E is required (every rank holds at least one expert). */
moe_status par_placement_init(par_placement *pl, int32_t n_experts, int32_t world_size, par_place_policy policy);
void par_placement_free(par_placement *pl);
/* The expert map of rank r for kern_experts_params: map[e] = local slot or -1; [E] int32. */
moe_status par_placement_expert_map(const par_placement *pl, int32_t rank, int32_t *map);
/* The first part of a step split by experts (dual-batch overlap): in_first[e] = 1 where expert e
 * is among the first round(n_local share_pct / 100) local slots of its rank (at least one; at
 * most all but one where the rank holds two or more), else 0; [E] bytes. share_pct in
 * [1, 99]. */
moe_status par_placement_first_part(const par_placement *pl, int32_t share_pct, uint8_t *in_first);

/* ------------------------------------------------------------------------------------------
 * Communicators. One per worker process (rank r of W), used by its step loop only.
 *   host backend: ZeroMQ over ipc:// between the workers of one host (CPU workers);
 *   NCCL backend: GPU workers (device buffers, a CUDA stream), in parallel/nccl.
 * Every operation has a deadline; a peer that does not answer in time gives MOE_ERR_TIMEOUT,
 * and after par_comm_abort every operation fails at once with MOE_ERR_SHUTDOWN. Sequence
 * numbers tie the messages of one operation together, so a late message of an aborted step is
 * recognized and dropped, never taken for the next step's.
 * ---------------------------------------------------------------------------------------- */
typedef struct par_comm par_comm_t; /* opaque */

typedef enum par_comm_kind {
    PAR_COMM_HOST = 0,
    PAR_COMM_NCCL = 1
} par_comm_kind;

typedef struct par_comm_host_params {
    int32_t rank;
    int32_t world_size;
    const char *endpoint_dir; /* folder for the ipc:// endpoints ("comm-<rank>"), same for all ranks */
    void *zmq_ctx;            /* a ZeroMQ context to use (NULL: the communicator makes its own) */
    void *interrupt_socket;   /* optional ZeroMQ socket polled while waiting: readable -> the wait
                                 returns MOE_ERR_SHUTDOWN so the caller can read its control message */
} par_comm_host_params;

moe_status par_comm_host_init(par_comm_t **out, const par_comm_host_params *p);
void par_comm_free(par_comm_t *c);
par_comm_kind par_comm_get_kind(const par_comm_t *c);
int32_t par_comm_rank(const par_comm_t *c);
int32_t par_comm_world_size(const par_comm_t *c);

/*
 * Gather with per-rank sizes to `root`: every rank sends `send_bytes` bytes; the root receives
 * rank q's bytes into recv[q] (recv_bytes[q] bytes, which must equal what q sends: a mismatch
 * is MOE_ERR_PROTOCOL). The root's own part is copied locally. recv/recv_bytes are read only on
 * the root. `seq` must increase by one per operation on every rank. `stream`: a cudaStream_t
 * for the NCCL backend (buffers in device memory), ignored by the host backend.
 */
moe_status par_comm_gatherv(par_comm_t *c, uint64_t seq, const void *send, size_t send_bytes, void *const *recv,
                            const size_t *recv_bytes, int32_t root, int32_t timeout_ms, void *stream);

/*
 * Sum-reduce to `root`: recv (root only) = sum over ranks of send, `count` elements of a float
 * dtype. Used by GPU workers to combine per-slot contributions: each rank's [T, K, H] slot
 * tensor is zero where another rank holds the slot, so the sum is exact (x + 0 = x) and its
 * bits do not depend on the order NCCL adds in. NCCL backend only (device buffers, `stream`).
 */
moe_status par_comm_reduce_sum(par_comm_t *c, const void *send, void *recv, size_t count, moe_dtype dt, int32_t root,
                               int32_t timeout_ms, void *stream);

/*
 * All-to-all with per-peer sizes: rank q's send_bytes[q] bytes at send + send_off[q] go to q,
 * where they land at recv + recv_off[r] (r = this rank); this rank receives recv_bytes[q]
 * bytes from q at recv + recv_off[q]. Sizes must agree pairwise; the entries of this rank
 * itself must be 0 (its own part stays where it is). NCCL backend only (device buffers,
 * `stream`: one NCCL group of point-to-point transfers).
 */
moe_status par_comm_alltoallv(par_comm_t *c, const void *send, const size_t *send_bytes, const size_t *send_off,
                              void *recv, const size_t *recv_bytes, const size_t *recv_off, int32_t timeout_ms,
                              void *stream);

/*
 * All-to-all of equal parts: the `bytes` at send + q * bytes go to rank q, where they land at
 * recv + r * bytes (r = this rank); this rank's own part is copied too. NCCL backend only
 * (ncclAlltoAll, NCCL 2.28 and newer). With buffers from par_comm_sym_alloc on every rank and
 * the communicator made with PAR_NCCL_CTA_ZERO, NCCL runs it on the copy engines (no SM).
 */
moe_status par_comm_alltoall(par_comm_t *c, const void *send, void *recv, size_t bytes, int32_t timeout_ms,
                             void *stream);

/*
 * Device memory registered with the communicator as a symmetric window (ncclMemAlloc, then
 * ncclCommWindowRegister with NCCL_WIN_COLL_SYMMETRIC): a collective call, every rank asks for
 * the same bytes in the same order. Freed with par_comm_sym_free (deregistered first) before
 * the communicator is. MOE_ERR_UNSUPPORTED on the host backend or before NCCL 2.28.
 */
moe_status par_comm_sym_alloc(par_comm_t *c, size_t bytes, void **ptr);
void par_comm_sym_free(par_comm_t *c, void *ptr);

/* Marks the communicator failed: waits in progress return, later operations fail at once.
 * The NCCL backend also aborts the NCCL communicator (ncclCommAbort), which ends the
 * collectives in flight on every rank that does the same. */
void par_comm_abort(par_comm_t *c);

/*
 * Waits until the operations enqueued on `stream` have finished, polling the communicator's
 * asynchronous error, until the deadline: MOE_ERR_TIMEOUT (and the communicator aborted) when a
 * peer does not take part in time, MOE_ERR_NCCL when NCCL reports an error. A result of a
 * failed or timed-out collective must never be used. The host backend's operations are
 * synchronous: there it returns at once.
 */
moe_status par_comm_wait(par_comm_t *c, void *stream, int32_t timeout_ms);
/* The same, calling idle(idle_arg) between two looks (on this thread; it must be short, and may
 * enqueue other work on other streams: the GPU worker receives and stages its next step there). */
moe_status par_comm_wait_idle(par_comm_t *c, void *stream, int32_t timeout_ms, void (*idle)(void *),
                              void *idle_arg);

/* ------------------------------------------------------------------------------------------
 * The NCCL backend (parallel/nccl). The unique id is made by rank 0 and handed to the others
 * by the coordinator over ZeroMQ; the communicator is non-blocking (every NCCL call returns at
 * once and completion is polled against a deadline), so no call can hang a worker forever.
 * ---------------------------------------------------------------------------------------- */
#define PAR_NCCL_ID_BYTES 128

typedef struct par_comm_nccl_params {
    int32_t rank;
    int32_t world_size;
    int32_t device;                                /* CUDA device ordinal of this rank */
    uint8_t unique_id[PAR_NCCL_ID_BYTES];          /* from par_comm_nccl_unique_id on rank 0 */
    int32_t init_timeout_ms;                       /* the communicator's creation deadline */
    int32_t cta_policy; /* PAR_NCCL_CTA_*: NCCL's CTA policy for the collectives (ncclConfig_t.CTAPolicy) */
} par_comm_nccl_params;

/* NCCL's CTA policies (NCCL 2.28): DEFAULT as NCCL chooses, EFFICIENCY fewer CTAs, ZERO no CTA
 * where NCCL can (the copy engines: ncclAlltoAll on symmetric windows). */
#define PAR_NCCL_CTA_DEFAULT 0
#define PAR_NCCL_CTA_EFFICIENCY 1
#define PAR_NCCL_CTA_ZERO 2

/* MOE_ERR_UNSUPPORTED when the build has no NCCL. */
moe_status par_comm_nccl_unique_id(uint8_t out[PAR_NCCL_ID_BYTES]);
moe_status par_comm_nccl_init(par_comm_t **out, const par_comm_nccl_params *p);
/* NCCL's version code (22803 for 2.28.3), or 0 without NCCL. */
int par_comm_nccl_version(void);

/* ------------------------------------------------------------------------------------------
 * The combine plan of one step: which (token, slot) pairs each rank computes, in canonical
 * order (token-major, then slot), and where each lands in the [T, K, H] slot tensor. Every
 * rank builds the same plan from the step's routing, so sizes need no exchange.
 * ---------------------------------------------------------------------------------------- */
typedef struct par_combine_plan {
    int32_t world_size;
    int64_t n_tokens; /* T */
    int32_t top_k;    /* K */
    int64_t *n_pairs; /* [W]: pairs computed by each rank */
    int64_t **pairs;  /* [W][n_pairs[r]]: flat slot index t*K + k, ascending */
    int64_t *n_rows;  /* [W]: tokens with at least one pair on rank r */
} par_combine_plan;

/* ids [T*K] are global expert ids (checked: 0 <= id < E, else MOE_ERR_INVALID_ARG). */
moe_status par_combine_plan_init(par_combine_plan *plan, const par_placement *pl, const int32_t *ids,
                                 int64_t n_tokens, int32_t top_k);
void par_combine_plan_free(par_combine_plan *plan);

/* ------------------------------------------------------------------------------------------
 * The exchange plan of a GPU step's combine, on rank `rank`: the rows [a, b) of a step (or of
 * one micro-batch) belong to the ranks in contiguous blocks, rank q owning rows
 * [bound[q], bound[q + 1]) with bound[q] = a + (b - a) * q / W. Each (token, slot) pair is
 * computed on the rank holding its expert and summed, in slot order, on the rank owning its
 * row. So a rank sends the pairs it computed for other ranks' rows and receives the pairs of
 * its own rows computed elsewhere: T K (W - 1) / W rows per rank for uniform routing, the same
 * at every world size (a reduce of zero-padded [T, K, H] slot tensors moves W times that).
 *
 * send_idx: flat slot indices t * K + k (t absolute in the step) this rank computed for rows
 *           of other ranks, grouped by destination in rank order, ascending within a group;
 * recv_idx: the flat slot indices of this rank's rows computed elsewhere, grouped by source
 *           the same way. The i-th row q sends to r is the i-th row r receives from q.
 * Ids outside [0, E) belong to no rank (the kernels report them). Every rank builds its plan
 * from the same ids and placement, so the sizes need no exchange.
 * ---------------------------------------------------------------------------------------- */
typedef struct par_exchange_plan {
    int32_t world_size, rank;
    int64_t cap;                     /* capacity of send_idx / recv_idx (pairs) */
    int64_t *bound;                  /* [W + 1] */
    int64_t *send_count, *send_off;  /* [W] pairs, offsets in pairs */
    int64_t *recv_count, *recv_off;  /* [W] */
    int64_t n_send, n_recv;
    int32_t *send_idx, *recv_idx;    /* [cap + 1] each (the caller's memory, or allocated) */
    bool own_idx;
    int32_t *tab, tab_n;             /* lookup tables of the build (private) */
    int64_t *scratch;                /* [2 (W + 1)] counts and cursors of the build (private) */
} par_exchange_plan;

/* Sizes the plan for up to `max_pairs` pairs a step (rows x K of a build). send_idx /
 * recv_idx: memory of the caller (for instance pinned host memory) of max_pairs + 1 int32 each
 * (the build writes one scratch entry past the pairs), or NULL to allocate. */
moe_status par_exchange_plan_init(par_exchange_plan *p, int32_t world_size, int32_t rank, int64_t max_pairs,
                                  int32_t *send_idx, int32_t *recv_idx);
/* Builds the plan of rows [a, b) of ids [.., K] (absolute rows). */
moe_status par_exchange_plan_build(par_exchange_plan *p, const par_placement *pl, const int32_t *ids, int64_t a,
                                   int64_t b, int32_t top_k);
/* The same for the pairs whose expert e has in_set[e] != 0 only (in_set: [n_experts]; NULL: all):
 * the exchange of one half of the experts (DBO split by experts). */
moe_status par_exchange_plan_build_set(par_exchange_plan *p, const par_placement *pl, const int32_t *ids, int64_t a,
                                       int64_t b, int32_t top_k, const uint8_t *in_set);
/* After a build, of the same ids: the pairs of the largest part any rank sends to any other in
 * that exchange (every rank gets the same value from the same ids and set): the part size of an
 * all-to-all of equal parts. W = 2 reads it off the plan; larger W counts every pair of ranks
 * once more, with the build's table of who computes each expert. */
moe_status par_exchange_plan_max_part(const par_exchange_plan *p, const int32_t *ids, int32_t top_k, int64_t *out);
void par_exchange_plan_free(par_exchange_plan *p);

#ifdef __cplusplus
}
#endif
#endif /* PAR_PAR_H */
