/*
 * comm.c: the backend-independent front of the communicators: argument checks, the abort
 * flag, accessors. Owned by the worker's step loop thread; par_comm_abort may be called from
 * any thread (it only sets an atomic flag and lets the backend wake its waits).
 */
#include <stdlib.h>

#include "parallel/comm_impl.h"

par_comm_kind par_comm_get_kind(const par_comm_t *c) { return c->kind; }
int32_t par_comm_rank(const par_comm_t *c) { return c->rank; }
int32_t par_comm_world_size(const par_comm_t *c) { return c->world_size; }

void par_comm_free(par_comm_t *c) {
    if (!c)
        return;
    c->ops->free(c);
}

void par_comm_abort(par_comm_t *c) {
    if (!c)
        return;
    atomic_store(&c->aborted, 1);
    if (c->ops->abort)
        c->ops->abort(c);
}

moe_status par_comm_gatherv(par_comm_t *c, uint64_t seq, const void *send, size_t send_bytes, void *const *recv,
                            const size_t *recv_bytes, int32_t root, int32_t timeout_ms, void *stream) {
    MOE_REQUIRE(c, MOE_ERR_INVALID_ARG, "gatherv: NULL communicator");
    MOE_REQUIRE(root >= 0 && root < c->world_size, MOE_ERR_INVALID_ARG, "gatherv: root %d not in [0, %d)",
                (int)root, (int)c->world_size);
    MOE_REQUIRE(send || send_bytes == 0, MOE_ERR_INVALID_ARG, "gatherv: NULL send buffer");
    if (c->rank == root) {
        MOE_REQUIRE(recv && recv_bytes, MOE_ERR_INVALID_ARG, "gatherv: root needs receive buffers");
        for (int32_t q = 0; q < c->world_size; q++)
            MOE_REQUIRE(recv[q] || recv_bytes[q] == 0, MOE_ERR_INVALID_ARG, "gatherv: NULL receive buffer of rank %d",
                        (int)q);
        MOE_REQUIRE(recv_bytes[root] == send_bytes, MOE_ERR_INVALID_ARG,
                    "gatherv: root sends %zu bytes but expects %zu from itself", send_bytes, recv_bytes[root]);
    }
    MOE_REQUIRE(timeout_ms > 0, MOE_ERR_INVALID_ARG, "gatherv: timeout %d ms", (int)timeout_ms);
    if (atomic_load(&c->aborted))
        return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
    moe_status st = c->ops->gatherv(c, seq, send, send_bytes, recv, recv_bytes, root, timeout_ms, stream);
    if (st != MOE_OK && st != MOE_ERR_SHUTDOWN && st != MOE_ERR_INVALID_ARG)
        MOE_WARN(MOE_SUB_PAR, "rank %d: gatherv seq %llu failed: %s: %s", (int)c->rank, (unsigned long long)seq,
                 moe_status_str(st), moe_errmsg());
    return st;
}

moe_status par_comm_wait_idle(par_comm_t *c, void *stream, int32_t timeout_ms, void (*idle)(void *),
                              void *idle_arg) {
    MOE_REQUIRE(c, MOE_ERR_INVALID_ARG, "comm_wait: NULL communicator");
    MOE_REQUIRE(timeout_ms > 0, MOE_ERR_INVALID_ARG, "comm_wait: timeout %d ms", (int)timeout_ms);
    if (atomic_load(&c->aborted))
        return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
    return c->ops->wait ? c->ops->wait(c, stream, timeout_ms, idle, idle_arg) : MOE_OK;
}

moe_status par_comm_wait(par_comm_t *c, void *stream, int32_t timeout_ms) {
    return par_comm_wait_idle(c, stream, timeout_ms, NULL, NULL);
}

moe_status par_comm_reduce_sum(par_comm_t *c, const void *send, void *recv, size_t count, moe_dtype dt, int32_t root,
                               int32_t timeout_ms, void *stream) {
    MOE_REQUIRE(c, MOE_ERR_INVALID_ARG, "reduce_sum: NULL communicator");
    MOE_REQUIRE(root >= 0 && root < c->world_size, MOE_ERR_INVALID_ARG, "reduce_sum: root %d not in [0, %d)",
                (int)root, (int)c->world_size);
    MOE_REQUIRE(moe_dtype_is_float(dt), MOE_ERR_INVALID_ARG, "reduce_sum: dtype %s is not a float type",
                moe_dtype_name(dt));
    MOE_REQUIRE((send && (recv || c->rank != root)) || count == 0, MOE_ERR_INVALID_ARG, "reduce_sum: NULL buffer");
    MOE_REQUIRE(timeout_ms > 0, MOE_ERR_INVALID_ARG, "reduce_sum: timeout %d ms", (int)timeout_ms);
    MOE_REQUIRE(c->ops->reduce_sum, MOE_ERR_UNSUPPORTED, "reduce_sum: the %s communicator has none", c->ops->name);
    if (atomic_load(&c->aborted))
        return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
    return c->ops->reduce_sum(c, send, recv, count, dt, root, timeout_ms, stream);
}

moe_status par_comm_alltoallv(par_comm_t *c, const void *send, const size_t *send_bytes, const size_t *send_off,
                              void *recv, const size_t *recv_bytes, const size_t *recv_off, int32_t timeout_ms,
                              void *stream) {
    MOE_REQUIRE(c, MOE_ERR_INVALID_ARG, "alltoallv: NULL communicator");
    MOE_REQUIRE(send_bytes && send_off && recv_bytes && recv_off, MOE_ERR_INVALID_ARG, "alltoallv: NULL size array");
    MOE_REQUIRE(send_bytes[c->rank] == 0 && recv_bytes[c->rank] == 0, MOE_ERR_INVALID_ARG,
                "alltoallv: rank %d sends %zu and receives %zu bytes to and from itself (must be 0)", (int)c->rank,
                send_bytes[c->rank], recv_bytes[c->rank]);
    for (int32_t q = 0; q < c->world_size; q++) {
        MOE_REQUIRE(send || send_bytes[q] == 0, MOE_ERR_INVALID_ARG, "alltoallv: NULL send buffer");
        MOE_REQUIRE(recv || recv_bytes[q] == 0, MOE_ERR_INVALID_ARG, "alltoallv: NULL receive buffer");
    }
    MOE_REQUIRE(timeout_ms > 0, MOE_ERR_INVALID_ARG, "alltoallv: timeout %d ms", (int)timeout_ms);
    MOE_REQUIRE(c->ops->alltoallv, MOE_ERR_UNSUPPORTED, "alltoallv: the %s communicator has none", c->ops->name);
    if (atomic_load(&c->aborted))
        return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
    moe_status st = c->ops->alltoallv(c, send, send_bytes, send_off, recv, recv_bytes, recv_off, timeout_ms, stream);
    if (st != MOE_OK && st != MOE_ERR_SHUTDOWN)
        MOE_WARN(MOE_SUB_PAR, "rank %d: alltoallv failed: %s: %s", (int)c->rank, moe_status_str(st), moe_errmsg());
    return st;
}

moe_status par_comm_alltoall(par_comm_t *c, const void *send, void *recv, size_t bytes, int32_t timeout_ms,
                             void *stream) {
    MOE_REQUIRE(c, MOE_ERR_INVALID_ARG, "alltoall: NULL communicator");
    MOE_REQUIRE((send && recv) || bytes == 0, MOE_ERR_INVALID_ARG, "alltoall: NULL buffer");
    MOE_REQUIRE(timeout_ms > 0, MOE_ERR_INVALID_ARG, "alltoall: timeout %d ms", (int)timeout_ms);
    MOE_REQUIRE(c->ops->alltoall, MOE_ERR_UNSUPPORTED, "alltoall: the %s communicator has none", c->ops->name);
    if (atomic_load(&c->aborted))
        return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
    moe_status st = c->ops->alltoall(c, send, recv, bytes, timeout_ms, stream);
    if (st != MOE_OK && st != MOE_ERR_SHUTDOWN)
        MOE_WARN(MOE_SUB_PAR, "rank %d: alltoall failed: %s: %s", (int)c->rank, moe_status_str(st), moe_errmsg());
    return st;
}

moe_status par_comm_sym_alloc(par_comm_t *c, size_t bytes, void **ptr) {
    MOE_REQUIRE(c && ptr, MOE_ERR_INVALID_ARG, "sym_alloc: NULL argument");
    *ptr = NULL;
    MOE_REQUIRE(bytes > 0, MOE_ERR_INVALID_ARG, "sym_alloc: 0 bytes");
    MOE_REQUIRE(c->ops->sym_alloc, MOE_ERR_UNSUPPORTED, "sym_alloc: the %s communicator has no symmetric memory",
                c->ops->name);
    if (atomic_load(&c->aborted))
        return moe_fail(MOE_ERR_SHUTDOWN, "communicator aborted");
    return c->ops->sym_alloc(c, bytes, ptr);
}

void par_comm_sym_free(par_comm_t *c, void *ptr) {
    if (c && ptr && c->ops->sym_free)
        c->ops->sym_free(c, ptr);
}
