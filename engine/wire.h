/*
 * wire.h: the daemon's internal messages between the coordinator and its workers. They use
 * the framing of protocol v1 (ipc/ipc_proto.h) with ops in the internal range (>= 0x80),
 * which a client-facing decode refuses. The worker socket is private to the engine (an ipc://
 * endpoint in the runtime folder, mode 0700), so these messages never meet a client.
 *
 * Header fields carry the small values (documented per op). Every message is one frame, but
 * two: STEP_REQ carries a client's SUBMIT request as a second frame (forwarded unchanged with
 * zmq_msg_copy: the coordinator copies no tensor bytes), and REPLY carries the encoded SUBMIT
 * reply as a second frame (forwarded unchanged to the client). A step is sent as one STEP
 * followed by its STEP_REQ messages; rank 0 answers with one REPLY per request (each forwarded
 * as soon as it arrives) and then one RESULT; the other ranks send only a RESULT. ZeroMQ keeps
 * the order of the messages between two peers, so no reassembly buffers are needed.
 */
#ifndef ENG_WIRE_H
#define ENG_WIRE_H

#include "ipc/ipc_proto.h"

/* HELLO, worker -> coordinator, at connect:   request_id = epoch, layer = rank, n_tokens = pid;
 * rank 0 of a GPU group with W > 1 adds its NCCL unique id (ENG_SEC_NCCL_ID) */
#define ENG_OP_HELLO 0x80
/* READY, worker -> coordinator, after loading: request_id = epoch, layer = rank, status;
 * sections: TEXT (error message) or JSON {"weight_bytes", "load_ms", "backend", "experts"} */
#define ENG_OP_READY 0x81
/* HEARTBEAT, worker -> coordinator, when idle: request_id = epoch, layer = rank,
 * n_tokens = steps done */
#define ENG_OP_HEARTBEAT 0x82
/* STEP, coordinator -> workers: request_id = step id, layer = layer, n_tokens = T (all
 * requests), top_k = number of requests. On the ZeroMQ data path, top_k STEP_REQ messages
 * follow; on the shared-memory data path (ENG_SEC_SLOT present) none do: the inputs are in the
 * slot (engine/shm.h), ENG_SEC_STEP_REQS describes the requests, and rank 0 writes the
 * encoded replies into the slot instead of sending REPLY messages. */
#define ENG_OP_STEP 0x83
/* STEP_REQ, coordinator -> workers: request_id = step id, n_tokens = index of the request in
 * the step; second frame: the client's SUBMIT request */
#define ENG_OP_STEP_REQ 0x86
/* REPLY, rank 0 -> coordinator: request_id = step id, n_tokens = index of the request; second
 * frame: the encoded SUBMIT reply for the client */
#define ENG_OP_REPLY 0x87
/* RESULT, worker -> coordinator, after the REPLY messages: request_id = step id, layer = rank,
 * status; on error a TEXT section; rank 0 on success: an i32 section ENG_SEC_EXPERT_TOKENS [E]
 * (tokens routed to each expert in the step) */
#define ENG_OP_RESULT 0x84
/* SHUTDOWN, coordinator -> workers: finish, free, exit 0 */
#define ENG_OP_SHUTDOWN 0x85
/* NCCL_ID, coordinator -> ranks 1..W-1 of a GPU group: the ENG_SEC_NCCL_ID section of rank 0's
 * HELLO, before their communicators are made */
#define ENG_OP_NCCL_ID 0x88
/* WAKE, coordinator -> worker: a STEP waits in the worker's control ring (engine/ctl.h) and the
 * worker said it was going to sleep; no fields */
#define ENG_OP_WAKE 0x89

/* Section kinds of the internal messages. */
#define ENG_SEC_EXPERT_TOKENS 0x100 /* RESULT: [E] tokens per expert in the step, i32 */
#define ENG_SEC_NCCL_ID 0x101       /* HELLO (rank 0), NCCL_ID: the 128-byte NCCL unique id */
#define ENG_SEC_SLOT 0x103          /* STEP on the shared-memory data path: i32 [1], the slot */
#define ENG_SEC_STEP_REQS 0x104     /* STEP on the shared-memory data path: bytes, one eng_shm_req
                                       (engine/shm.h) per request, in order */
#define ENG_SEC_TIMING 0x102        /* RESULT of a GPU worker: f32 [ENG_GPU_TIMING_N]: step_us,
                                       compute_us, combine_us, combine_bytes, h2d_us, host_us,
                                       plan_us, staged, gather_us, wait_us (eng_gpu_timing,
                                       engine/gpu_step.h) */
#define ENG_GPU_TIMING_N 10
#define ENG_SEC_TRACE 0x105         /* RESULT: bytes, u64 [ENG_TRACE_N] (host order), the worker's CLOCK_MONOTONIC (ns) when it
                                       had received the STEP, began computing it, had its
                                       output, and sent this RESULT (the coordinator's STATS
                                       "path" splits each step's time with them) */
#define ENG_TRACE_N 4

#endif /* ENG_WIRE_H */
