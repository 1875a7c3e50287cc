/*
 * comm_host.c: the host communicator, for CPU workers on one host. ZeroMQ over ipc://: each
 * rank binds a PULL socket at <endpoint_dir>/comm-<rank> and connects one PUSH socket to every
 * other rank. A message is two frames: a header {magic, rank, seq, bytes} and the payload.
 *
 * Owned by one thread (the worker's step loop). Waits are bounded by the caller's deadline and
 * sliced (50 ms) so that par_comm_abort from another thread takes effect quickly; an optional
 * interrupt socket is polled too, so a control message from the coordinator ends a wait.
 *
 * Invariants: messages of an earlier sequence number (an aborted or timed-out step) are
 * dropped; messages of a later one are kept (bounded) until their step runs; a size or rank
 * that does not match the plan is a protocol error, never a wrong write.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "parallel/comm_impl.h"

#define HOST_MAGIC 0x434d4f4du /* "MOMC" */
#define HOST_MAX_STASH 64
#define HOST_SLICE_MS 50

typedef struct host_hdr {
    uint32_t magic;
    int32_t rank;
    uint64_t seq;
    uint64_t bytes;
} host_hdr;

typedef struct host_stash {
    uint64_t seq;
    int32_t rank;
    zmq_msg_t body;
} host_stash;

typedef struct host_comm {
    void *ctx;
    bool own_ctx;
    void *pull;
    void **push; /* [W], NULL at own rank */
    void *interrupt;
    host_stash stash[HOST_MAX_STASH];
    int n_stash;
} host_comm;

static void host_free(par_comm_t *c) {
    host_comm *h = c->impl;
    if (h) {
        for (int i = 0; i < h->n_stash; i++)
            zmq_msg_close(&h->stash[i].body);
        if (h->pull)
            zmq_close(h->pull);
        if (h->push) {
            for (int32_t q = 0; q < c->world_size; q++)
                if (h->push[q])
                    zmq_close(h->push[q]);
            free(h->push);
        }
        if (h->own_ctx && h->ctx)
            zmq_ctx_term(h->ctx);
        free(h);
    }
    free(c);
}

static void host_abort(par_comm_t *c) { (void)c; /* waits check the flag every slice */ }

static moe_status set_common_opts(void *s) {
    int linger = 0, hwm = 1024;
    MOE_ZMQ_CHECK(zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger));
    MOE_ZMQ_CHECK(zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm));
    MOE_ZMQ_CHECK(zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm));
    return MOE_OK;
}

static int remaining_ms(uint64_t deadline_ns) {
    uint64_t now = moe_now_ns();
    if (now >= deadline_ns)
        return 0;
    uint64_t ms = (deadline_ns - now + 999999) / 1000000;
    return ms > HOST_SLICE_MS ? HOST_SLICE_MS : (int)ms;
}

/* Waits until `s` has `ev` or the deadline passes, the communicator is aborted or the
 * interrupt socket becomes readable. */
static moe_status host_wait(par_comm_t *c, void *s, short ev, uint64_t deadline_ns, const char *what) {
    host_comm *h = c->impl;
    for (;;) {
        if (atomic_load(&c->aborted))
            return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
        zmq_pollitem_t items[2] = {{s, 0, ev, 0}, {h->interrupt, 0, ZMQ_POLLIN, 0}};
        int slice = remaining_ms(deadline_ns);
        if (slice == 0)
            return moe_fail(MOE_ERR_TIMEOUT, "rank %d: %s timed out", (int)c->rank, what);
        int n = zmq_poll(items, h->interrupt ? 2 : 1, slice);
        if (n == -1) {
            if (zmq_errno() == EINTR)
                continue;
            return moe_fail(MOE_ERR_ZMQ, "rank %d: zmq_poll: %s", (int)c->rank, zmq_strerror(zmq_errno()));
        }
        if (items[0].revents & ev)
            return MOE_OK;
        if (h->interrupt && (items[1].revents & ZMQ_POLLIN))
            return moe_fail(MOE_ERR_SHUTDOWN, "rank %d: %s interrupted by a control message", (int)c->rank, what);
    }
}

static moe_status host_send(par_comm_t *c, int32_t to, uint64_t seq, const void *buf, size_t n, uint64_t deadline) {
    host_comm *h = c->impl;
    host_hdr hdr = {HOST_MAGIC, c->rank, seq, (uint64_t)n};
    MOE_CHECK(host_wait(c, h->push[to], ZMQ_POLLOUT, deadline, "send"));
    /* POLLOUT guarantees room for at least one message: both frames go together. */
    MOE_ZMQ_CHECK(zmq_send(h->push[to], &hdr, sizeof hdr, ZMQ_SNDMORE | ZMQ_DONTWAIT));
    MOE_ZMQ_CHECK(zmq_send(h->push[to], buf, n, ZMQ_DONTWAIT));
    return MOE_OK;
}

/* Receives one message: header into *hdr, body into msg (initialized here on success). */
static moe_status host_recv(par_comm_t *c, host_hdr *hdr, zmq_msg_t *body, uint64_t deadline) {
    host_comm *h = c->impl;
    MOE_CHECK(host_wait(c, h->pull, ZMQ_POLLIN, deadline, "receive"));
    zmq_msg_t head;
    zmq_msg_init(&head);
    moe_status st = MOE_OK;
    if (zmq_msg_recv(&head, h->pull, ZMQ_DONTWAIT) == -1) {
        st = moe_fail(MOE_ERR_ZMQ, "comm receive: %s", zmq_strerror(zmq_errno()));
        zmq_msg_close(&head);
        return st;
    }
    bool more = zmq_msg_more(&head);
    bool ok = zmq_msg_size(&head) == sizeof *hdr && more;
    if (ok)
        memcpy(hdr, zmq_msg_data(&head), sizeof *hdr);
    zmq_msg_close(&head);
    zmq_msg_init(body);
    if (more && zmq_msg_recv(body, h->pull, ZMQ_DONTWAIT) == -1) {
        zmq_msg_close(body);
        return moe_fail(MOE_ERR_ZMQ, "comm receive body: %s", zmq_strerror(zmq_errno()));
    }
    /* Drain any extra frames of a malformed message. */
    while (zmq_msg_more(body)) {
        zmq_msg_t extra;
        zmq_msg_init(&extra);
        int r = zmq_msg_recv(&extra, h->pull, ZMQ_DONTWAIT);
        zmq_msg_close(&extra);
        ok = false;
        if (r == -1)
            break;
    }
    if (!ok || hdr->magic != HOST_MAGIC || hdr->rank < 0 || hdr->rank >= c->world_size || hdr->rank == c->rank ||
        hdr->bytes != zmq_msg_size(body)) {
        zmq_msg_close(body);
        return moe_fail(MOE_ERR_PROTOCOL, "rank %d: malformed communicator message", (int)c->rank);
    }
    return MOE_OK;
}

static moe_status host_gatherv(par_comm_t *c, uint64_t seq, const void *send, size_t send_bytes, void *const *recv,
                               const size_t *recv_bytes, int32_t root, int32_t timeout_ms, void *stream) {
    (void)stream;
    host_comm *h = c->impl;
    uint64_t deadline = moe_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    if (c->rank != root)
        return host_send(c, root, seq, send, send_bytes, deadline);

    if (send_bytes)
        memcpy(recv[root], send, send_bytes);
    int32_t need = c->world_size - 1;
    bool got[c->world_size];
    memset(got, 0, sizeof got);
    moe_status st = MOE_OK;

    /* Messages of this step that arrived early. */
    for (int i = 0; i < h->n_stash;) {
        host_stash *s = &h->stash[i];
        if (s->seq < seq) { /* stale: a step that was aborted */
            zmq_msg_close(&s->body);
            h->stash[i] = h->stash[--h->n_stash];
            continue;
        }
        if (s->seq == seq) {
            int32_t q = s->rank;
            size_t n = zmq_msg_size(&s->body);
            if (got[q] || n != recv_bytes[q]) {
                st = moe_fail(MOE_ERR_PROTOCOL, "gatherv seq %llu: rank %d sent %zu bytes, expected %zu%s",
                              (unsigned long long)seq, (int)q, n, recv_bytes[q], got[q] ? " (twice)" : "");
            } else {
                if (n)
                    memcpy(recv[q], zmq_msg_data(&s->body), n);
                got[q] = true;
                need--;
            }
            zmq_msg_close(&s->body);
            h->stash[i] = h->stash[--h->n_stash];
            if (st != MOE_OK)
                return st;
            continue;
        }
        i++;
    }

    while (need > 0) {
        host_hdr hdr;
        zmq_msg_t body;
        MOE_CHECK(host_recv(c, &hdr, &body, deadline));
        int32_t q = hdr.rank;
        if (hdr.seq < seq) {
            MOE_DEBUG(MOE_SUB_PAR, "rank %d: dropped stale message of seq %llu from rank %d", (int)c->rank,
                      (unsigned long long)hdr.seq, (int)q);
            zmq_msg_close(&body);
            continue;
        }
        if (hdr.seq > seq) {
            if (h->n_stash == HOST_MAX_STASH) {
                zmq_msg_close(&body);
                return moe_fail(MOE_ERR_PROTOCOL, "rank %d: too many early messages (seq %llu while at %llu)",
                                (int)c->rank, (unsigned long long)hdr.seq, (unsigned long long)seq);
            }
            host_stash *s = &h->stash[h->n_stash++];
            s->seq = hdr.seq;
            s->rank = q;
            zmq_msg_init(&s->body);
            zmq_msg_move(&s->body, &body);
            zmq_msg_close(&body);
            continue;
        }
        size_t n = zmq_msg_size(&body);
        if (got[q] || n != recv_bytes[q]) {
            zmq_msg_close(&body);
            return moe_fail(MOE_ERR_PROTOCOL, "gatherv seq %llu: rank %d sent %zu bytes, expected %zu%s",
                            (unsigned long long)seq, (int)q, n, recv_bytes[q], got[q] ? " (twice)" : "");
        }
        if (n)
            memcpy(recv[q], zmq_msg_data(&body), n);
        zmq_msg_close(&body);
        got[q] = true;
        need--;
    }
    return MOE_OK;
}

static const par_comm_ops host_ops = {
    .name = "host",
    .gatherv = host_gatherv,
    .abort = host_abort,
    .free = host_free,
};

moe_status par_comm_host_init(par_comm_t **out, const par_comm_host_params *p) {
    MOE_REQUIRE(out && p, MOE_ERR_INVALID_ARG, "comm_host_init: NULL argument");
    *out = NULL;
    MOE_REQUIRE(p->world_size >= 1 && p->world_size <= 1024, MOE_ERR_INVALID_ARG,
                "comm_host_init: world size %d not in [1, 1024]", (int)p->world_size);
    MOE_REQUIRE(p->rank >= 0 && p->rank < p->world_size, MOE_ERR_INVALID_ARG, "comm_host_init: rank %d not in [0, %d)",
                (int)p->rank, (int)p->world_size);
    MOE_REQUIRE(p->endpoint_dir && p->endpoint_dir[0], MOE_ERR_INVALID_ARG, "comm_host_init: no endpoint folder");
    moe_status st = MOE_OK;
    par_comm_t *c = calloc(1, sizeof *c);
    host_comm *h = calloc(1, sizeof *h);
    if (!c || !h) {
        free(c);
        free(h);
        return moe_fail(MOE_ERR_NOMEM, "comm_host_init");
    }
    c->ops = &host_ops;
    c->kind = PAR_COMM_HOST;
    c->rank = p->rank;
    c->world_size = p->world_size;
    atomic_init(&c->aborted, 0);
    c->impl = h;
    h->interrupt = p->interrupt_socket;
    h->ctx = p->zmq_ctx;
    if (!h->ctx) {
        h->ctx = zmq_ctx_new();
        h->own_ctx = true;
        if (!h->ctx) {
            st = moe_fail(MOE_ERR_ZMQ, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    char ep[512];
    h->push = calloc((size_t)p->world_size, sizeof(void *));
    if (!h->push) {
        st = moe_fail(MOE_ERR_NOMEM, "comm_host_init");
        goto fail;
    }
    h->pull = zmq_socket(h->ctx, ZMQ_PULL);
    if (!h->pull) {
        st = moe_fail(MOE_ERR_ZMQ, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    MOE_CHECK_GOTO(set_common_opts(h->pull), st, fail);
    int n = snprintf(ep, sizeof ep, "ipc://%s/comm-%d", p->endpoint_dir, (int)p->rank);
    if (n < 0 || n >= (int)sizeof ep || n - 6 >= 107) { /* sun_path limit */
        st = moe_fail(MOE_ERR_INVALID_ARG, "comm_host_init: endpoint path too long: %s", p->endpoint_dir);
        goto fail;
    }
    MOE_ZMQ_CHECK_GOTO(zmq_bind(h->pull, ep), st, fail);
    for (int32_t q = 0; q < p->world_size; q++) {
        if (q == p->rank)
            continue;
        h->push[q] = zmq_socket(h->ctx, ZMQ_PUSH);
        if (!h->push[q]) {
            st = moe_fail(MOE_ERR_ZMQ, "zmq_socket: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
        MOE_CHECK_GOTO(set_common_opts(h->push[q]), st, fail);
        snprintf(ep, sizeof ep, "ipc://%s/comm-%d", p->endpoint_dir, (int)q);
        MOE_ZMQ_CHECK_GOTO(zmq_connect(h->push[q], ep), st, fail);
    }
    *out = c;
    return MOE_OK;
fail:
    host_free(c);
    return st;
}
