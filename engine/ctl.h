/*
 * ctl.h: the control rings between the coordinator and the workers of its host.
 *
 * With busy polling on (--busy-poll-us > 0) and the shared-memory data path, the STEP messages
 * (coordinator -> worker) and the RESULT messages (worker -> coordinator) travel through two
 * single-producer single-consumer byte rings per rank in a second shared mapping (memfd,
 * inherited by the workers as fd 4) instead of ZeroMQ. Both ends already poll without sleeping
 * around a step, so a message is seen within a microsecond or so instead of after the hops of
 * two ZeroMQ I/O threads (22 and 29 us with busy polling on an H200 host, engine run 24). The
 * bytes are the same encoded messages (engine/wire.h) that ZeroMQ would carry, and the
 * receivers hand them to the same handlers. Everything else (HELLO, READY, heartbeats, NCCL id,
 * SHUTDOWN, and a WAKE for a worker that went to sleep) stays on ZeroMQ.
 *
 * A ring: a 64-byte header {head: bytes ever published by the producer; tail: bytes ever
 * consumed; sleeping: the consumer is about to block (the producer then wakes it another way)}
 * and `cap` data bytes. A message is a u32 length, the bytes, padded to 8; a length of
 * CTL_WRAP sends the reader back to the start. The producer writes the bytes first and
 * publishes them with a release store of head, so a producer that dies mid-message leaves
 * nothing visible; the consumer reads with an acquire load of head and frees with a release
 * store of tail.
 *
 * Sizes: every STEP in flight fits at once (ctl_ring_bytes): a producer finding no room is a
 * bug, reported as such, never a wait.
 *
 * Threads: one producer and one consumer per ring (different processes); the rings of a rank
 * are reset by the coordinator before it spawns the rank's worker, never while one runs.
 */
#ifndef ENG_CTL_H
#define ENG_CTL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/base/moe_base.h"

#define CTL_WRAP 0xffffffffu

typedef struct ctl_ring_hdr {
    _Atomic uint64_t head;
    _Atomic uint64_t tail;
    _Atomic uint32_t sleeping;
    uint8_t pad[64 - 20];
} ctl_ring_hdr;

typedef struct ctl_ring {
    ctl_ring_hdr *h;
    uint8_t *data;
    uint64_t cap; /* data bytes, a multiple of 8 */
} ctl_ring;

/* Bytes of the data area of a ring that holds `n` messages of at most `max_msg` bytes each at
 * once (plus the wrap slack). */
uint64_t ctl_ring_bytes(uint64_t n, uint64_t max_msg);
/* The mapping's size for `ranks` ranks, each with a down ring of `down` and an up ring of `up`
 * data bytes; and rank r's two rings in a mapping at `base`. */
size_t ctl_map_bytes(int32_t ranks, uint64_t down, uint64_t up);
void ctl_rings(uint8_t *base, int32_t r, uint64_t down, uint64_t up, ctl_ring *d, ctl_ring *u);
void ctl_reset(ctl_ring *q);

/* Publishes one message; MOE_ERR_LIMIT (nothing written) when it does not fit now. */
moe_status ctl_push(ctl_ring *q, const void *msg, uint32_t len);
/* The next message, if any: its bytes stay valid until ctl_pop. false: none. A corrupt length
 * (a bug or a stray writer) is an error. */
moe_status ctl_peek(ctl_ring *q, const uint8_t **msg, uint32_t *len, bool *have);
void ctl_pop(ctl_ring *q);
static inline bool ctl_empty(ctl_ring *q) {
    return atomic_load_explicit(&q->h->head, memory_order_acquire) ==
           atomic_load_explicit(&q->h->tail, memory_order_relaxed);
}

#endif /* ENG_CTL_H */
