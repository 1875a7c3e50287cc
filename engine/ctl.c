/*
 * ctl.c: the control rings (ctl.h).
 */
#include "engine/ctl.h"

#include <string.h>

static uint64_t pad8(uint64_t v) { return (v + 7) & ~(uint64_t)7; }

uint64_t ctl_ring_bytes(uint64_t n, uint64_t max_msg) {
    const uint64_t one = pad8(4 + max_msg);
    /* n messages, and at most one message's worth lost to a wrap */
    return (n + 1) * one + 64;
}

size_t ctl_map_bytes(int32_t ranks, uint64_t down, uint64_t up) {
    const size_t per = 2 * sizeof(ctl_ring_hdr) + (size_t)pad8(down) + (size_t)pad8(up);
    return ((size_t)ranks * per + 4095) & ~(size_t)4095;
}

void ctl_rings(uint8_t *base, int32_t r, uint64_t down, uint64_t up, ctl_ring *d, ctl_ring *u) {
    down = pad8(down);
    up = pad8(up);
    uint8_t *p = base + (size_t)r * (2 * sizeof(ctl_ring_hdr) + down + up);
    d->h = (ctl_ring_hdr *)p;
    d->data = p + sizeof(ctl_ring_hdr);
    d->cap = down;
    u->h = (ctl_ring_hdr *)(d->data + down);
    u->data = (uint8_t *)u->h + sizeof(ctl_ring_hdr);
    u->cap = up;
}

void ctl_reset(ctl_ring *q) {
    atomic_store(&q->h->head, 0);
    atomic_store(&q->h->tail, 0);
    atomic_store(&q->h->sleeping, 0);
}

moe_status ctl_push(ctl_ring *q, const void *msg, uint32_t len) {
    MOE_REQUIRE(q && (msg || len == 0) && len < CTL_WRAP, MOE_ERR_INVALID_ARG, "ctl_push: bad arguments");
    const uint64_t head = atomic_load_explicit(&q->h->head, memory_order_relaxed);
    const uint64_t tail = atomic_load_explicit(&q->h->tail, memory_order_acquire);
    const uint64_t need = pad8(4 + (uint64_t)len), at = head % q->cap, to_end = q->cap - at;
    /* a message never straddles the end: a wrap marker (when 4 bytes fit) and the start */
    const uint64_t skip = need <= to_end ? 0 : to_end;
    if (head + skip + need - tail > q->cap)
        return moe_fail(MOE_ERR_LIMIT, "control ring: %u bytes do not fit (%llu of %llu in use)", len,
                        (unsigned long long)(head - tail), (unsigned long long)q->cap);
    uint64_t w = head;
    if (skip) {
        const uint32_t wrap = CTL_WRAP;
        memcpy(q->data + at, &wrap, 4); /* to_end is a multiple of 8: 4 bytes always fit */
        w += skip;
    }
    uint8_t *p = q->data + w % q->cap;
    memcpy(p, &len, 4);
    if (len)
        memcpy(p + 4, msg, len);
    atomic_store_explicit(&q->h->head, w + need, memory_order_release);
    return MOE_OK;
}

moe_status ctl_peek(ctl_ring *q, const uint8_t **msg, uint32_t *len, bool *have) {
    *have = false;
    const uint64_t head = atomic_load_explicit(&q->h->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&q->h->tail, memory_order_relaxed);
    if (head == tail)
        return MOE_OK;
    uint32_t n;
    memcpy(&n, q->data + tail % q->cap, 4);
    if (n == CTL_WRAP) {
        tail += q->cap - tail % q->cap;
        atomic_store_explicit(&q->h->tail, tail, memory_order_release);
        if (head == tail)
            return moe_fail(MOE_ERR_INTERNAL, "control ring: a wrap marker with no message after it");
        memcpy(&n, q->data + tail % q->cap, 4);
    }
    MOE_REQUIRE(n != CTL_WRAP && pad8(4 + (uint64_t)n) <= head - tail && tail % q->cap + 4 + n <= q->cap,
                MOE_ERR_INTERNAL, "control ring: a message of %u bytes at %llu is corrupt", n,
                (unsigned long long)tail);
    *msg = q->data + tail % q->cap + 4;
    *len = n;
    *have = true;
    return MOE_OK;
}

void ctl_pop(ctl_ring *q) {
    const uint64_t tail = atomic_load_explicit(&q->h->tail, memory_order_relaxed);
    uint32_t n;
    memcpy(&n, q->data + tail % q->cap, 4);
    atomic_store_explicit(&q->h->tail, tail + pad8(4 + (uint64_t)n), memory_order_release);
}
