/*
 * fuzz_check.c: see fuzz_check.h. Single-threaded; no global state.
 */
#include <stdlib.h>
#include <string.h>

#include "tests/ipc/fuzz_check.h"

#define FUZZ_REQUIRE(c)              \
    do {                             \
        if (!(c))                    \
            __builtin_trap();        \
    } while (0)

static void check_views(const ipc_msg *m, const uint8_t *data, size_t size) {
    FUZZ_REQUIRE(m->n_sections <= IPC_MAX_SECTIONS);
    for (uint32_t i = 0; i < m->n_sections; i++) {
        const uint8_t *p = m->sec[i].data;
        FUZZ_REQUIRE(m->sec[i].nbytes <= size);
        if (m->sec[i].nbytes)
            FUZZ_REQUIRE(p >= data && p + m->sec[i].nbytes <= data + size);
        FUZZ_REQUIRE(((size_t)(p - data)) % IPC_ALIGN == 0);
    }
}

static void check_reencode(const ipc_msg *m, const ipc_limits *lim) {
    void *buf = NULL;
    size_t len = 0;
    FUZZ_REQUIRE(ipc_encode_alloc(m, &buf, &len) == MOE_OK);
    ipc_msg d;
    FUZZ_REQUIRE(ipc_decode(buf, len, lim, &d) == MOE_OK);
    FUZZ_REQUIRE(d.version == m->version && d.op == m->op && d.flags == m->flags);
    FUZZ_REQUIRE(d.request_id == m->request_id && d.status == m->status && d.layer == m->layer);
    FUZZ_REQUIRE(d.n_tokens == m->n_tokens && d.hidden == m->hidden && d.top_k == m->top_k);
    FUZZ_REQUIRE(d.dtype == m->dtype && d.timeout_ms == m->timeout_ms && d.n_sections == m->n_sections);
    for (uint32_t i = 0; i < m->n_sections; i++) {
        const ipc_section *a = &m->sec[i], *b = &d.sec[i];
        FUZZ_REQUIRE(a->kind == b->kind && a->dtype == b->dtype && a->ndim == b->ndim && a->nbytes == b->nbytes);
        FUZZ_REQUIRE(memcmp(a->shape, b->shape, sizeof a->shape) == 0);
        FUZZ_REQUIRE(a->nbytes == 0 || memcmp(a->data, b->data, (size_t)a->nbytes) == 0);
    }
    moe_free(buf);
}

moe_status fuzz_check_one(const uint8_t *data, size_t size) {
    static const uint8_t served[4] = {1, 0, 1, 1};
    ipc_limits lims[4];
    lims[0] = ipc_limits_default();
    lims[1] = ipc_limits_default();
    lims[1].n_layers = 4;
    lims[1].layer_served = served;
    lims[1].n_experts = 8;
    lims[1].hidden = 16;
    lims[1].top_k = 2;
    lims[1].max_tokens = 64;
    lims[1].can_route = true;
    lims[1].max_msg_bytes = 1 << 20;
    lims[2] = ipc_limits_default();
    lims[2].allow_internal = true;
    lims[3] = ipc_limits_default();
    lims[3].accept = IPC_ACCEPT_REPLIES;
    moe_status first = MOE_OK;
    for (int k = 0; k < 4; k++) {
        ipc_msg m;
        moe_status st = ipc_decode(size ? data : NULL, size, &lims[k], &m);
        if (k == 0)
            first = st;
        FUZZ_REQUIRE(st <= 0 && st >= MOE_STATUS_MIN_);
        if (st == MOE_OK) {
            check_views(&m, data, size);
            check_reencode(&m, &lims[k]);
        }
    }
    return first;
}
