/*
 * comm_nccl.c: the NCCL communicator of GPU workers (par.h). The communicator is created
 * non-blocking (ncclConfig_t.blocking = 0): its creation returns at once, and this file polls
 * ncclCommGetAsyncError against a deadline. The steps' collectives then go through a blocking
 * child of it (ncclCommSplit with blocking = 1; its connections made up front by a warm-up
 * all-to-all), because a non-blocking communicator launches every group from a new thread
 * (about 300 us of host time per collective on the 2x H200 machine, docs/PERF.md); a blocking
 * enqueue with its connections made returns without waiting for any peer (a connection NCCL
 * makes later, for a transfer larger than the warm-up's, could wait for one: then the step's
 * deadline, enforced by the coordinator, restarts the group). Completion is
 * polled (ncclCommGetAsyncError and a CUDA event on the caller's stream) against a deadline.
 * So a peer that died or hangs never blocks the worker's step loop: the wait times out, the
 * communicators are aborted (ncclCommAbort), and the error goes up; the coordinator then
 * restarts the whole group. Nothing of a failed collective is ever used. MOE_NCCL_SPLIT=0
 * keeps every collective on the non-blocking communicator.
 *
 * The gather is point to point: the root posts one ncclRecv per other rank and copies its own
 * part on the stream; the others post one ncclSend; all inside one NCCL group, so the transfers
 * of all ranks run concurrently.
 *
 * Owner: the worker's step loop thread (one communicator per process, one device).
 */
#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "parallel/comm_impl.h"

#if NCCL_VERSION_CODE >= 22800
#define PAR_NCCL_HAS_SYM 1 /* ncclAlltoAll, windows, CTA policies */
#endif

#define PAR_NCCL_MAX_SYM 16 /* symmetric buffers a communicator holds at once */

typedef struct nccl_sym {
    void *ptr;
#ifdef PAR_NCCL_HAS_SYM
    ncclWindow_t win;
#endif
} nccl_sym;

typedef struct nccl_comm {
    ncclComm_t comm;    /* the collectives' communicator: `split`, or `base` */
    ncclComm_t base;    /* the non-blocking one */
    ncclComm_t split;   /* its blocking child, or NULL */
    int32_t device;
    cudaEvent_t done;
    bool nccl_aborted;
    int32_t cta_policy; /* PAR_NCCL_CTA_* of both communicators */
    nccl_sym sym[PAR_NCCL_MAX_SYM];
} nccl_comm;

/* The CTA policy into a communicator's config (NCCL 2.28; older: only the default). */
static moe_status set_cta_policy(ncclConfig_t *cfg, int32_t policy) {
#ifdef PAR_NCCL_HAS_SYM
    static const int map[] = {NCCL_CTA_POLICY_DEFAULT, NCCL_CTA_POLICY_EFFICIENCY, NCCL_CTA_POLICY_ZERO};
    MOE_REQUIRE(policy >= 0 && policy <= 2, MOE_ERR_INVALID_ARG, "nccl: CTA policy %d not in [0, 2]", (int)policy);
    if (policy != PAR_NCCL_CTA_DEFAULT)
        cfg->CTAPolicy = map[policy];
    return MOE_OK;
#else
    (void)cfg;
    MOE_REQUIRE(policy == PAR_NCCL_CTA_DEFAULT, MOE_ERR_UNSUPPORTED,
                "nccl: CTA policies need NCCL 2.28 or newer (built with %d)", NCCL_VERSION_CODE);
    return MOE_OK;
#endif
}

int par_comm_nccl_version(void) {
    int v = 0;
    if (ncclGetVersion(&v) != ncclSuccess)
        return 0;
    return v;
}

moe_status par_comm_nccl_unique_id(uint8_t out[PAR_NCCL_ID_BYTES]) {
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "nccl unique id: NULL");
    ncclUniqueId id;
    MOE_NCCL_CHECK(ncclGetUniqueId(&id));
    memcpy(out, id.internal, PAR_NCCL_ID_BYTES);
    return MOE_OK;
}

static void abort_nccl(par_comm_t *c) {
    nccl_comm *n = c->impl;
    if (!n->nccl_aborted) {
        if (n->split)
            ncclCommAbort(n->split);
        if (n->base)
            ncclCommAbort(n->base);
        n->nccl_aborted = true;
    }
    atomic_store(&c->aborted, 1);
}

/* Between looks: yield for the first few thousand (a small collective ends in tens of
 * microseconds, and a nanosleep costs more than that in timer slack), then sleep briefly. */
static void short_pause(int i) {
    if (i < 5000) {
        sched_yield();
        return;
    }
    struct timespec ts = {0, 20000};
    nanosleep(&ts, NULL);
}

/* Polls until NCCL is no longer in progress and (when ev) the event has completed. */
static moe_status poll_until(par_comm_t *c, uint64_t deadline, cudaEvent_t ev, const char *what, void (*idle)(void *),
                             void *idle_arg) {
    nccl_comm *n = c->impl;
    for (int i = 0;; i++) {
        if (atomic_load(&c->aborted))
            return moe_fail(MOE_ERR_SHUTDOWN, "rank %d: %s: communicator aborted", (int)c->rank, what);
        ncclResult_t ar = ncclSuccess;
        ncclResult_t qr = ncclCommGetAsyncError(n->comm, &ar);
        if (qr != ncclSuccess)
            ar = qr;
        if (ar != ncclSuccess && ar != ncclInProgress) {
            moe_status st = moe_fail(MOE_ERR_NCCL, "rank %d: %s: %s (%s)", (int)c->rank, what, ncclGetErrorString(ar),
                                     ncclGetLastError(n->comm));
            abort_nccl(c);
            return st;
        }
        if (ar == ncclSuccess) {
            if (!ev)
                return MOE_OK;
            cudaError_t e = cudaEventQuery(ev);
            if (e == cudaSuccess)
                return MOE_OK;
            if (e != cudaErrorNotReady) {
                moe_status st = moe_fail(MOE_ERR_CUDA, "rank %d: %s: %s", (int)c->rank, what, cudaGetErrorString(e));
                abort_nccl(c);
                return st;
            }
        }
        if (moe_now_ns() > deadline) {
            abort_nccl(c);
            return moe_fail(MOE_ERR_TIMEOUT, "rank %d: %s did not finish in time: a peer is gone or hung", (int)c->rank,
                            what);
        }
        if (idle)
            idle(idle_arg);
        short_pause(i);
    }
}

static moe_status nccl_gatherv(par_comm_t *c, uint64_t seq, const void *send, size_t send_bytes, void *const *recv,
                               const size_t *recv_bytes, int32_t root, int32_t timeout_ms, void *stream) {
    (void)seq; /* NCCL orders the operations of one communicator itself */
    nccl_comm *n = c->impl;
    cudaStream_t s = (cudaStream_t)stream;
    uint64_t deadline = moe_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    moe_status st = MOE_OK;
    MOE_NCCL_CHECK_GOTO(ncclGroupStart(), st, fail);
    if (c->rank == root) {
        for (int32_t q = 0; q < c->world_size; q++) {
            if (q == root || recv_bytes[q] == 0)
                continue;
            MOE_NCCL_CHECK_GOTO(ncclRecv(recv[q], recv_bytes[q], ncclUint8, q, n->comm, s), st, fail_group);
        }
        if (send_bytes && recv[root] != send) /* in place: the root's part is already there */
            MOE_CUDA_CHECK_GOTO(cudaMemcpyAsync(recv[root], send, send_bytes, cudaMemcpyDeviceToDevice, s), st,
                                fail_group);
    } else if (send_bytes) {
        MOE_NCCL_CHECK_GOTO(ncclSend(send, send_bytes, ncclUint8, root, n->comm, s), st, fail_group);
    }
    MOE_NCCL_CHECK_GOTO(ncclGroupEnd(), st, fail);
    /* On the non-blocking parent the group is enqueued once NCCL leaves "in progress"; on the
     * blocking child this returns at once. */
    return poll_until(c, deadline, NULL, "gatherv enqueue", NULL, NULL);
fail_group:
    ncclGroupEnd();
fail:
    abort_nccl(c);
    return st;
}

static moe_status nccl_reduce_sum(par_comm_t *c, const void *send, void *recv, size_t count, moe_dtype dt,
                                  int32_t root, int32_t timeout_ms, void *stream) {
    nccl_comm *n = c->impl;
    ncclDataType_t t = dt == MOE_DTYPE_F32 ? ncclFloat32 : dt == MOE_DTYPE_F16 ? ncclFloat16 : ncclBfloat16;
    moe_status st = MOE_OK;
    MOE_NCCL_CHECK_GOTO(ncclReduce(send, recv, count, t, ncclSum, root, n->comm, (cudaStream_t)stream), st, fail);
    return poll_until(c, moe_now_ns() + (uint64_t)timeout_ms * 1000000ull, NULL, "reduce enqueue", NULL, NULL);
fail:
    abort_nccl(c);
    return st;
}

static moe_status nccl_alltoallv(par_comm_t *c, const void *send, const size_t *send_bytes, const size_t *send_off,
                                 void *recv, const size_t *recv_bytes, const size_t *recv_off, int32_t timeout_ms,
                                 void *stream) {
    nccl_comm *n = c->impl;
    cudaStream_t s = (cudaStream_t)stream;
    uint64_t deadline = moe_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    moe_status st = MOE_OK;
    MOE_NCCL_CHECK_GOTO(ncclGroupStart(), st, fail);
    for (int32_t q = 0; q < c->world_size; q++) {
        if (q == c->rank)
            continue;
        if (send_bytes[q])
            MOE_NCCL_CHECK_GOTO(
                ncclSend((const char *)send + send_off[q], send_bytes[q], ncclUint8, q, n->comm, s), st, fail_group);
        if (recv_bytes[q])
            MOE_NCCL_CHECK_GOTO(ncclRecv((char *)recv + recv_off[q], recv_bytes[q], ncclUint8, q, n->comm, s), st,
                                fail_group);
    }
    MOE_NCCL_CHECK_GOTO(ncclGroupEnd(), st, fail);
    return poll_until(c, deadline, NULL, "alltoallv enqueue", NULL, NULL);
fail_group:
    ncclGroupEnd();
fail:
    abort_nccl(c);
    return st;
}

#ifdef PAR_NCCL_HAS_SYM
static moe_status nccl_alltoall(par_comm_t *c, const void *send, void *recv, size_t bytes, int32_t timeout_ms,
                                void *stream) {
    nccl_comm *n = c->impl;
    moe_status st = MOE_OK;
    MOE_NCCL_CHECK_GOTO(ncclAlltoAll(send, recv, bytes, ncclUint8, n->comm, (cudaStream_t)stream), st, fail);
    return poll_until(c, moe_now_ns() + (uint64_t)timeout_ms * 1000000ull, NULL, "alltoall enqueue", NULL, NULL);
fail:
    abort_nccl(c);
    return st;
}

/* ncclMemAlloc, then the window (a collective of the communicator the collectives use). On the
 * blocking child the registration waits for every rank to register: a peer that dies meanwhile
 * leaves this worker waiting until the coordinator's start deadline (--start-timeout-ms) ends
 * the group and restarts it, as for a peer lost during the communicator's creation. */
static moe_status nccl_sym_alloc(par_comm_t *c, size_t bytes, void **ptr) {
    nccl_comm *n = c->impl;
    int slot = -1;
    for (int i = 0; i < PAR_NCCL_MAX_SYM && slot < 0; i++)
        if (!n->sym[i].ptr)
            slot = i;
    MOE_REQUIRE(slot >= 0, MOE_ERR_LIMIT, "sym_alloc: more than %d symmetric buffers", PAR_NCCL_MAX_SYM);
    MOE_CUDA_CHECK(cudaSetDevice(n->device));
    void *p = NULL;
    MOE_NCCL_CHECK(ncclMemAlloc(&p, bytes));
    ncclWindow_t win = NULL;
    ncclResult_t r = ncclCommWindowRegister(n->comm, p, bytes, &win, NCCL_WIN_COLL_SYMMETRIC);
    if (r == ncclInProgress) { /* the non-blocking parent (no split): poll it */
        moe_status st = poll_until(c, moe_now_ns() + 60000000000ull, NULL, "window registration", NULL, NULL);
        if (st != MOE_OK) {
            ncclMemFree(p);
            return st;
        }
    } else if (r != ncclSuccess) {
        moe_status st = moe_fail(MOE_ERR_NCCL, "rank %d: window registration of %zu bytes: %s (%s)", (int)c->rank,
                                 bytes, ncclGetErrorString(r), ncclGetLastError(n->comm));
        ncclMemFree(p);
        return st;
    }
    n->sym[slot].ptr = p;
    n->sym[slot].win = win;
    *ptr = p;
    return MOE_OK;
}

static void sym_release(nccl_comm *n, nccl_sym *y) {
    if (!n->nccl_aborted && y->win)
        ncclCommWindowDeregister(n->comm, y->win);
    ncclMemFree(y->ptr);
    y->ptr = NULL;
    y->win = NULL;
}

static void nccl_sym_free(par_comm_t *c, void *ptr) {
    nccl_comm *n = c->impl;
    (void)cudaSetDevice(n->device);
    for (int i = 0; i < PAR_NCCL_MAX_SYM; i++)
        if (n->sym[i].ptr == ptr)
            sym_release(n, &n->sym[i]);
}
#endif

static moe_status nccl_wait(par_comm_t *c, void *stream, int32_t timeout_ms, void (*idle)(void *), void *idle_arg) {
    nccl_comm *n = c->impl;
    MOE_CUDA_CHECK(cudaEventRecord(n->done, (cudaStream_t)stream));
    return poll_until(c, moe_now_ns() + (uint64_t)timeout_ms * 1000000ull, n->done, "collective", idle, idle_arg);
}

static void nccl_abort_op(par_comm_t *c) { abort_nccl(c); }

/* Flush, then free; bounded so that a dead peer cannot hold us. */
static void close_comm(ncclComm_t comm) {
    ncclCommFinalize(comm);
    uint64_t deadline = moe_now_ns() + 5000000000ull;
    ncclResult_t ar = ncclInProgress;
    while (ar == ncclInProgress && moe_now_ns() < deadline) {
        ncclCommGetAsyncError(comm, &ar);
        if (ar == ncclInProgress)
            short_pause(5000);
    }
    if (ar == ncclSuccess)
        ncclCommDestroy(comm);
    else
        ncclCommAbort(comm);
}

static void nccl_free(par_comm_t *c) {
    nccl_comm *n = c->impl;
    if (n) {
#ifdef PAR_NCCL_HAS_SYM
        for (int i = 0; i < PAR_NCCL_MAX_SYM; i++)
            if (n->sym[i].ptr)
                sym_release(n, &n->sym[i]);
#endif
        if (!n->nccl_aborted) {
            if (n->split)
                close_comm(n->split);
            if (n->base)
                close_comm(n->base);
        }
        if (n->done)
            cudaEventDestroy(n->done);
        free(n);
    }
    free(c);
}

static const par_comm_ops nccl_ops = {
    .name = "nccl",
    .gatherv = nccl_gatherv,
    .reduce_sum = nccl_reduce_sum,
    .alltoallv = nccl_alltoallv,
#ifdef PAR_NCCL_HAS_SYM
    .alltoall = nccl_alltoall,
    .sym_alloc = nccl_sym_alloc,
    .sym_free = nccl_sym_free,
#endif
    .abort = nccl_abort_op,
    .wait = nccl_wait,
    .free = nccl_free,
};

/* The blocking child of the non-blocking communicator, and a warm-up all-to-all on it (every
 * pair of ranks, a small and a large size) so that its connections exist before the first
 * step. A split that NCCL refuses leaves the collectives on the non-blocking communicator. */
static moe_status make_split(par_comm_t *c, uint64_t deadline) {
    nccl_comm *n = c->impl;
    ncclConfig_t bc = NCCL_CONFIG_INITIALIZER;
    bc.blocking = 1;
    MOE_CHECK(set_cta_policy(&bc, n->cta_policy));
    ncclComm_t child = NULL;
    ncclResult_t r = ncclCommSplit(n->base, 0, c->rank, &child, &bc);
    if (r == ncclInProgress || r == ncclSuccess) {
        /* the split is a collective of the non-blocking parent: poll both */
        for (int i = 0;; i++) {
            ncclResult_t a = ncclSuccess, b = ncclSuccess;
            ncclCommGetAsyncError(n->base, &a);
            if (child)
                ncclCommGetAsyncError(child, &b);
            if ((a != ncclSuccess && a != ncclInProgress) || (b != ncclSuccess && b != ncclInProgress)) {
                r = a != ncclSuccess && a != ncclInProgress ? a : b;
                break;
            }
            if (a == ncclSuccess && b == ncclSuccess && child) {
                r = ncclSuccess;
                break;
            }
            if (moe_now_ns() > deadline)
                return moe_fail(MOE_ERR_TIMEOUT, "rank %d: the communicator's split did not finish in time",
                                (int)c->rank);
            short_pause(i);
        }
    }
    if (r != ncclSuccess || !child) {
        MOE_WARN(MOE_SUB_PAR, "rank %d: no blocking child communicator (%s): collectives stay non-blocking",
                 (int)c->rank, ncclGetErrorString(r));
        if (child)
            ncclCommAbort(child);
        return MOE_OK;
    }
    n->split = child;
    n->comm = child;
    /* warm-up: 4 KiB and 4 MiB to and from every other rank */
    const int32_t W = c->world_size;
    const size_t big = (size_t)4 << 20;
    void *buf = NULL;
    cudaStream_t s = NULL;
    moe_status st = MOE_OK;
    size_t *sz = calloc(4 * (size_t)W, sizeof(size_t));
    if (!sz)
        return moe_fail(MOE_ERR_NOMEM, "comm warm-up");
    MOE_CUDA_CHECK_GOTO(cudaMalloc(&buf, 2 * big * (size_t)W), st, out);
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), st, out);
    for (int round = 0; round < 2 && st == MOE_OK; round++) {
        const size_t b = round ? big : 4096;
        for (int32_t q = 0; q < W; q++) {
            sz[q] = q == c->rank ? 0 : b;
            sz[W + q] = (size_t)q * big;
            sz[2 * W + q] = q == c->rank ? 0 : b;
            sz[3 * W + q] = (size_t)W * big + (size_t)q * big;
        }
        st = c->ops->alltoallv(c, buf, sz, sz + W, buf, sz + 2 * W, sz + 3 * W, 60000, s);
        if (st == MOE_OK)
            st = c->ops->wait(c, s, (int32_t)((deadline > moe_now_ns() ? deadline - moe_now_ns() : 1000000) / 1000000) + 1,
                              NULL, NULL);
    }
out:
    if (s)
        cudaStreamDestroy(s);
    if (buf)
        cudaFree(buf);
    free(sz);
    return st;
}

moe_status par_comm_nccl_init(par_comm_t **out, const par_comm_nccl_params *p) {
    MOE_REQUIRE(out && p, MOE_ERR_INVALID_ARG, "comm_nccl_init: NULL argument");
    *out = NULL;
    MOE_REQUIRE(p->world_size >= 1 && p->rank >= 0 && p->rank < p->world_size, MOE_ERR_INVALID_ARG,
                "comm_nccl_init: rank %d of %d", (int)p->rank, (int)p->world_size);
    MOE_REQUIRE(p->init_timeout_ms > 0, MOE_ERR_INVALID_ARG, "comm_nccl_init: timeout %d ms", (int)p->init_timeout_ms);
    par_comm_t *c = calloc(1, sizeof *c);
    nccl_comm *n = calloc(1, sizeof *n);
    if (!c || !n) {
        free(c);
        free(n);
        return moe_fail(MOE_ERR_NOMEM, "comm_nccl_init");
    }
    c->ops = &nccl_ops;
    c->kind = PAR_COMM_NCCL;
    c->rank = p->rank;
    c->world_size = p->world_size;
    atomic_init(&c->aborted, 0);
    c->impl = n;
    n->device = p->device;
    moe_status st = MOE_OK;
    MOE_CUDA_CHECK_GOTO(cudaSetDevice(p->device), st, fail);
    MOE_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&n->done, cudaEventDisableTiming), st, fail);
    ncclUniqueId id;
    memcpy(id.internal, p->unique_id, PAR_NCCL_ID_BYTES);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    n->cta_policy = p->cta_policy;
    MOE_CHECK_GOTO(set_cta_policy(&cfg, p->cta_policy), st, fail);
    const uint64_t deadline = moe_now_ns() + (uint64_t)p->init_timeout_ms * 1000000ull;
    MOE_NCCL_CHECK_GOTO(ncclCommInitRankConfig(&n->base, p->world_size, id, p->rank, &cfg), st, fail);
    n->comm = n->base;
    MOE_CHECK_GOTO(poll_until(c, deadline, NULL, "communicator init", NULL, NULL), st, fail);
    const char *sp = getenv("MOE_NCCL_SPLIT");
    if (p->world_size > 1 && !(sp && strcmp(sp, "0") == 0))
        MOE_CHECK_GOTO(make_split(c, deadline), st, fail);
    MOE_INFO(MOE_SUB_PAR, "rank %d of %d: NCCL %d communicator on device %d (%s, CTA policy %d)", (int)p->rank,
             (int)p->world_size, par_comm_nccl_version(), (int)p->device,
             n->split ? "collectives on a blocking child, connections made" : "non-blocking", (int)p->cta_policy);
    *out = c;
    return MOE_OK;
fail:
    abort_nccl(c);
    n->comm = n->base = n->split = NULL;
    nccl_free(c);
    return st;
}
