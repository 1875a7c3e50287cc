/*
 * ipc.h: the public face of ipc/ for the engine: the wire protocol (ipc_proto.h, included),
 * the ZeroMQ-in-libuv watcher, the ZAP handler with its allow-list of CURVE client keys, and
 * small ZeroMQ helpers. libmoeclient (moeclient.h) is the users' side and does not use this.
 *
 * Threads and loops: a watcher and a ZAP handler belong to the libuv loop they were made on
 * and to that loop's thread; their socket is touched by no other thread (ZeroMQ sockets are
 * not thread-safe). Every callback runs on that loop.
 *
 * Invariants of the watcher (docs/protocol.md, "Serving from a libuv loop"):
 *   - ZMQ_FD is registered with uv_poll for UV_READABLE only; it is a level of "something
 *     changed", never read or closed by us. After every poll callback, and after every send,
 *     the watcher sends what is queued, receives, and re-reads ZMQ_EVENTS: it stops only when
 *     ZMQ_EVENTS, read after the last operation, shows nothing to receive (and nothing it can
 *     send), because each zmq call may consume the fd's edge.
 *   - It receives at most `batch` messages per loop turn; when more wait it keeps an idle
 *     handle active (so the loop polls without blocking) and a check handle drains the rest.
 *   - Outgoing messages that meet EAGAIN (high-water mark) wait in a bounded FIFO queue of
 *     `max_queue` messages, sent in order when ZMQ_EVENTS shows POLLOUT; a send that finds the
 *     queue full is dropped and answered MOE_ERR_BUSY (the caller bounds what it has in flight
 *     below max_queue so that replies never meet a full queue).
 *   - Close: every uv handle is closed with uv_close before the memory is freed; the socket
 *     gets ZMQ_LINGER = linger_ms and is closed; queued messages are dropped (counted).
 */
#ifndef IPC_IPC_H
#define IPC_IPC_H

#include <uv.h>
#include <zmq.h>

#include "ipc/ipc_proto.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------
 * ZeroMQ helpers.
 * ---------------------------------------------------------------------------------------- */
/* Encodes m into a fresh zmq message (one frame). On error the message is left closed. */
moe_status ipc_encode_zmq(const ipc_msg *m, zmq_msg_t *out);
/* Sets the socket options every moe-engine socket gets from its limits: ZMQ_MAXMSGSIZE
 * (max_msg_bytes; ZeroMQ then drops a peer that sends more), ZMQ_LINGER. */
moe_status ipc_socket_limits(void *sock, const ipc_limits *lim, int linger_ms);
/* Turns `sock` into a CURVE server with the secret key file at `secret_key_path` and
 * ZMQ_ZAP_DOMAIN `domain` (NULL: "moe-engine"). Call before bind. The ZAP handler of the same
 * context (ipc_zap_init) must exist first, or CURVE lets every client key in. */
moe_status ipc_curve_server(void *sock, const char *secret_key_path, const char *domain);

/* ------------------------------------------------------------------------------------------
 * The watcher: one ZeroMQ socket on one libuv loop.
 * ---------------------------------------------------------------------------------------- */
#define IPC_ZWATCH_MAX_FRAMES 8

typedef struct ipc_zwatch ipc_zwatch_t;

/* One received message: its frames (a ROUTER delivers [identity, body]; a REQ peer adds an
 * empty delimiter). The watcher closes the frames after the callback returns; to keep one,
 * move it out with zmq_msg_move. The callback may send, and may close the watcher. */
typedef void (*ipc_zwatch_msg_cb)(ipc_zwatch_t *w, zmq_msg_t *frames, int n_frames, void *user);
typedef void (*ipc_zwatch_close_cb)(ipc_zwatch_t *w, void *user);

typedef struct ipc_zwatch_params {
    int32_t batch;      /* messages received per loop turn (0: 64) */
    int32_t max_queue;  /* outgoing messages held on EAGAIN (0: 1024) */
    int32_t linger_ms;  /* ZMQ_LINGER set at close (default 0: drop what is unsent) */
    bool keep_socket;   /* true: close leaves the socket open (the caller closes it) */
} ipc_zwatch_params;

typedef struct ipc_zwatch_stats {
    uint64_t received;     /* messages handed to the callback */
    uint64_t sent;         /* messages handed to ZeroMQ */
    uint64_t queued_now;   /* waiting for POLLOUT */
    uint64_t queued_max;
    uint64_t dropped_out;  /* sends dropped: queue full, peer unreachable, closed with messages queued */
    uint64_t dropped_in;   /* received messages dropped: more than IPC_ZWATCH_MAX_FRAMES frames */
    uint64_t turns;        /* processing passes (poll or check callbacks that did work) */
} ipc_zwatch_stats;

/* Starts watching `zsock` (any socket type) on `loop`. The watcher owns the socket from now
 * on (unless keep_socket) and closes it when it closes; on failure the socket is untouched. */
moe_status ipc_zwatch_init(ipc_zwatch_t **out, uv_loop_t *loop, void *zsock, const ipc_zwatch_params *p,
                           ipc_zwatch_msg_cb cb, void *user);
/* Sends one message of n frames (1 <= n <= IPC_ZWATCH_MAX_FRAMES). Always takes the frames:
 * on MOE_OK they are sent or queued; on an error they are closed (the message is dropped):
 * MOE_ERR_BUSY (the queue is full), MOE_ERR_NOT_FOUND (a ROUTER peer that is gone, with
 * ZMQ_ROUTER_MANDATORY), MOE_ERR_SHUTDOWN (closing), MOE_ERR_ZMQ (another ZeroMQ error). */
moe_status ipc_zwatch_send(ipc_zwatch_t *w, zmq_msg_t *frames, int n);
/* Copies n buffers into frames and sends them (as above). */
moe_status ipc_zwatch_send_bufs(ipc_zwatch_t *w, const void *const *bufs, const size_t *lens, int n);
/* Closes the handles, then the socket; cb (may be NULL) runs once all is freed. Idempotent. */
void ipc_zwatch_close(ipc_zwatch_t *w, ipc_zwatch_close_cb cb, void *user);
void *ipc_zwatch_socket(const ipc_zwatch_t *w);
ipc_zwatch_stats ipc_zwatch_get_stats(const ipc_zwatch_t *w);

/* ------------------------------------------------------------------------------------------
 * ZAP: the authentication handler of a ZeroMQ context, on the loop (no extra thread). It binds
 * a REP socket to inproc://zeromq.zap.01 and answers every CURVE handshake of the context's
 * CURVE servers: 200 when the client's public key is in the allow-list, 400 otherwise (and for
 * any other mechanism). Make it before the server socket binds.
 * ---------------------------------------------------------------------------------------- */
typedef struct ipc_zap ipc_zap_t;

typedef struct ipc_zap_stats {
    uint64_t allowed;
    uint64_t denied;
    uint64_t malformed; /* ZAP requests that were not ZAP 1.0 (answered 500) */
    uint64_t n_keys;    /* keys in the allow-list now */
    uint64_t reloads;
} ipc_zap_stats;

/* Loads the allow-list file (ipc_proto.h gives the format) and starts answering. */
moe_status ipc_zap_init(ipc_zap_t **out, uv_loop_t *loop, void *zmq_ctx, const char *allow_list_path);
/* Reads the allow-list file again: revocations and additions take effect for the next
 * handshakes (connections already authenticated stay up; the daemon may close them). On an
 * error the old list stays in force. */
moe_status ipc_zap_reload(ipc_zap_t *z);
bool ipc_zap_allows(const ipc_zap_t *z, const char *z85_public_key);
ipc_zap_stats ipc_zap_get_stats(const ipc_zap_t *z);
void ipc_zap_close(ipc_zap_t *z, void (*cb)(void *user), void *user);

#ifdef __cplusplus
}
#endif
#endif /* IPC_IPC_H */
