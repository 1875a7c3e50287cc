/*
 * shm.h: the shared-memory data path between the coordinator and the workers of its host.
 *
 * The coordinator makes one anonymous shared mapping (memfd) of n_slots step slots and hands
 * the descriptor to every worker it spawns. A step's requests are copied into a free slot once
 * (by the libuv threadpool, off the loop); ZeroMQ then carries only the STEP message (the slot
 * number and each request's size and routing form). Every worker reads its inputs from the
 * slot (a GPU worker registers the mapping with CUDA and copies to the device straight from
 * it); rank 0 writes each request's encoded reply into the slot's output area (a GPU worker
 * copies y there from the device), and the coordinator sends those bytes to the clients
 * without copying them (zmq_msg_init_data; the slot is free again when the last reply is
 * released). One copy in, none out, instead of four socket hops of the tensors.
 *
 * Slot layout (every area 64-byte aligned; the mapping is page aligned):
 *   x       [max_tokens, H]  model dtype   request i at token offset t0(i)
 *   ids     [max_tokens, K]  i32           (requests with ids)
 *   w       [max_tokens, K]  f32
 *   logits  [max_tokens, E]  4 bytes each  (requests with logits, in their own float dtype)
 *   out     replies: reply i at out_off + r(i), r(0) = 0, r(i+1) = align64(r(i) + 128 + T_i H es),
 *           each an encoded SUBMIT reply (64-byte header, one descriptor, y at +128)
 * Both sides compute the layout with eng_shm_layout_init from the same numbers.
 *
 * Threads: the layout is immutable; the mapping is written by the coordinator's copy jobs and
 * by workers of other processes, in an order the STEP/RESULT messages establish.
 */
#ifndef ENG_SHM_H
#define ENG_SHM_H

#include <stddef.h>
#include <stdint.h>

#include "engine/base/moe_base.h"

#define ENG_SHM_REPLY_HEAD 128 /* header + one descriptor: where y starts in an encoded reply */

typedef struct eng_shm_layout {
    int64_t max_tokens;
    int32_t hidden, n_experts, top_k;
    moe_dtype dtype;
    int32_t n_slots;
    size_t x_off, ids_off, w_off, lg_off, out_off, out_bytes;
    size_t slot_bytes;
    size_t total_bytes;
} eng_shm_layout;

/* One request of a step as the STEP message describes it (16 bytes, little-endian). */
typedef struct eng_shm_req {
    uint64_t client_id;
    uint32_t n_tokens;
    uint8_t src;          /* eng_route_src */
    uint8_t logits_dtype; /* for src == logits */
    uint16_t reserved;
} eng_shm_req;

moe_status eng_shm_layout_init(eng_shm_layout *l, int64_t max_tokens, int32_t hidden, int32_t n_experts,
                               int32_t top_k, moe_dtype dt, int32_t n_slots);
/* Offset of reply i's encoding within the out area, given the token counts of the requests
 * before it; and the bytes of reply i. */
size_t eng_shm_reply_size(const eng_shm_layout *l, int64_t n_tokens);

/* A mapping of the data path: made by the coordinator (memfd), or mapped by a worker from the
 * inherited descriptor. */
typedef struct eng_shm {
    int fd;
    uint8_t *base;
    size_t bytes;
} eng_shm;

moe_status eng_shm_create(eng_shm *s, size_t bytes);
moe_status eng_shm_map(eng_shm *s, int fd, size_t bytes);
void eng_shm_unmap(eng_shm *s);
static inline uint8_t *eng_shm_slot(const eng_shm *s, const eng_shm_layout *l, int32_t slot) {
    return s->base + (size_t)slot * l->slot_bytes;
}

#endif /* ENG_SHM_H */
