/*
 * comm_impl.h: private to parallel/. The communicator's table of functions; each backend
 * (comm_host.c; the NCCL one in parallel/nccl) fills one.
 */
#ifndef PAR_COMM_IMPL_H
#define PAR_COMM_IMPL_H

#include <stdatomic.h>

#include "parallel/par.h"

typedef struct par_comm_ops {
    const char *name;
    moe_status (*gatherv)(par_comm_t *c, uint64_t seq, const void *send, size_t send_bytes, void *const *recv,
                          const size_t *recv_bytes, int32_t root, int32_t timeout_ms, void *stream);
    moe_status (*reduce_sum)(par_comm_t *c, const void *send, void *recv, size_t count, moe_dtype dt, int32_t root,
                             int32_t timeout_ms, void *stream); /* NULL: not supported */
    moe_status (*alltoallv)(par_comm_t *c, const void *send, const size_t *send_bytes, const size_t *send_off,
                            void *recv, const size_t *recv_bytes, const size_t *recv_off, int32_t timeout_ms,
                            void *stream); /* NULL: not supported */
    moe_status (*alltoall)(par_comm_t *c, const void *send, void *recv, size_t bytes, int32_t timeout_ms,
                           void *stream); /* NULL: not supported */
    moe_status (*sym_alloc)(par_comm_t *c, size_t bytes, void **ptr); /* NULL: not supported */
    void (*sym_free)(par_comm_t *c, void *ptr);
    void (*abort)(par_comm_t *c);
    moe_status (*wait)(par_comm_t *c, void *stream, int32_t timeout_ms, void (*idle)(void *),
                       void *idle_arg); /* NULL: synchronous */
    void (*free)(par_comm_t *c);
} par_comm_ops;

struct par_comm {
    const par_comm_ops *ops;
    par_comm_kind kind;
    int32_t rank;
    int32_t world_size;
    atomic_int aborted;
    void *impl;
};

#endif /* PAR_COMM_IMPL_H */
