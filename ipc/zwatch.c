/*
 * zwatch.c: one ZeroMQ socket on one libuv loop (ipc.h states the contract), and the small
 * ZeroMQ helpers of ipc.h.
 *
 * Owner: the loop's thread; the socket is touched by nothing else. State machine:
 *   - `dirty` means "ZMQ_EVENTS may show work": set at init, by every poll callback and by
 *     every send (a zmq call can swallow the fd's edge, so after one we must look again).
 *   - process() runs from the poll callback and from the check callback (when dirty): it
 *     flushes the out-queue on POLLOUT and receives up to `batch` messages, re-reading
 *     ZMQ_EVENTS after each operation; it clears `dirty` only when the last ZMQ_EVENTS read
 *     shows nothing more to do, else it keeps the idle handle active so that the loop comes
 *     back without blocking in epoll.
 *   - close: handles stopped and closed with uv_close; when the last close callback has run,
 *     the queue is dropped, ZMQ_LINGER set, the socket closed, the user's callback run and the
 *     memory freed.
 * The out-queue is a ring of at most max_queue entries; an entry holds the frames of one
 * message and how many of them ZeroMQ already took (a multipart message is atomic in ZeroMQ,
 * but we never rely on that to avoid sending half a message twice).
 */
#include <stdlib.h>
#include <string.h>

#include "ipc/ipc.h"

typedef struct out_entry {
    zmq_msg_t frames[IPC_ZWATCH_MAX_FRAMES];
    int n;
    int next; /* first frame not yet taken by ZeroMQ */
} out_entry;

struct ipc_zwatch {
    uv_loop_t *loop;
    void *sock;
    uv_poll_t poll;
    uv_idle_t idle;
    uv_check_t check;
    ipc_zwatch_params p;
    ipc_zwatch_msg_cb cb;
    void *user;
    out_entry **ring; /* [max_queue] */
    size_t q_head, q_len;
    bool dirty, idle_on, closing;
    int open_handles;
    ipc_zwatch_close_cb close_cb;
    void *close_user;
    ipc_zwatch_stats st;
};

/* ------------------------------------------------------------------------------------------
 * ZeroMQ helpers.
 * ---------------------------------------------------------------------------------------- */
moe_status ipc_encode_zmq(const ipc_msg *m, zmq_msg_t *out) {
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "ipc_encode_zmq: NULL output");
    size_t n;
    moe_status st = ipc_encoded_size(m, &n);
    if (st != MOE_OK) {
        zmq_msg_init(out);
        return st;
    }
    if (zmq_msg_init_size(out, n) != 0) {
        zmq_msg_init(out);
        return moe_fail(MOE_ERR_NOMEM, "zmq_msg_init_size(%zu): %s", n, zmq_strerror(zmq_errno()));
    }
    st = ipc_encode(m, zmq_msg_data(out), n, NULL);
    if (st != MOE_OK) {
        zmq_msg_close(out);
        zmq_msg_init(out);
    }
    return st;
}

moe_status ipc_socket_limits(void *sock, const ipc_limits *lim, int linger_ms) {
    MOE_REQUIRE(sock, MOE_ERR_INVALID_ARG, "ipc_socket_limits: NULL socket");
    int64_t max = (int64_t)(lim && lim->max_msg_bytes ? lim->max_msg_bytes : IPC_DEFAULT_MAX_MSG_BYTES);
    MOE_ZMQ_CHECK(zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max, sizeof max));
    MOE_ZMQ_CHECK(zmq_setsockopt(sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms));
    return MOE_OK;
}

moe_status ipc_curve_server(void *sock, const char *secret_key_path, const char *domain) {
    MOE_REQUIRE(sock && secret_key_path, MOE_ERR_INVALID_ARG, "ipc_curve_server: NULL argument");
    char pub[IPC_Z85_KEY_LEN + 1], sec[IPC_Z85_KEY_LEN + 1];
    MOE_CHECK(ipc_keys_load_secret(secret_key_path, pub, sec));
    moe_status st = MOE_OK;
    int one = 1;
    const char *dom = domain ? domain : "moe-engine";
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one), st, done);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, sec, IPC_Z85_KEY_LEN), st, done);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, dom, strlen(dom)), st, done);
done:
    memset(sec, 0, sizeof sec);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * The watcher.
 * ---------------------------------------------------------------------------------------- */
static void on_idle(uv_idle_t *h) { (void)h; /* only keeps the loop from blocking; check drains */ }

static void set_idle(ipc_zwatch_t *w, bool on) {
    if (on == w->idle_on || w->closing)
        return;
    w->idle_on = on;
    if (on)
        uv_idle_start(&w->idle, on_idle);
    else
        uv_idle_stop(&w->idle);
}

static uint32_t zevents(ipc_zwatch_t *w) {
    uint32_t ev = 0; /* ZMQ_EVENTS is an int on every platform libzmq supports */
    int iev = 0;
    size_t sz = sizeof iev;
    if (zmq_getsockopt(w->sock, ZMQ_EVENTS, &iev, &sz) != 0) {
        MOE_WARN(MOE_SUB_IPC, "zwatch: ZMQ_EVENTS: %s", zmq_strerror(zmq_errno()));
        return 0;
    }
    ev = (uint32_t)iev;
    return ev;
}

static void entry_drop(out_entry *e) {
    for (int i = e->next; i < e->n; i++)
        zmq_msg_close(&e->frames[i]);
    free(e);
}

/* Gives an entry's remaining frames to ZeroMQ. Returns 1 when the whole message went, 0 on
 * EAGAIN (nothing lost: resume later), -1 when it had to be dropped (counted). */
static int entry_send(ipc_zwatch_t *w, out_entry *e) {
    while (e->next < e->n) {
        int more = e->next < e->n - 1 ? ZMQ_SNDMORE : 0;
        if (zmq_msg_send(&e->frames[e->next], w->sock, ZMQ_DONTWAIT | more) < 0) {
            int err = zmq_errno();
            if (err == EAGAIN)
                return 0;
            if (err == EINTR)
                continue;
            MOE_DEBUG(MOE_SUB_IPC, "zwatch: send dropped: %s", zmq_strerror(err));
            w->st.dropped_out++;
            return err == EHOSTUNREACH ? -2 : -1;
        }
        e->next++; /* ZeroMQ took the frame and emptied our zmq_msg_t */
    }
    w->st.sent++;
    return 1;
}

/* Sends queued messages in order until the queue is empty or ZeroMQ says EAGAIN. */
static int flush_queue(ipc_zwatch_t *w) {
    int progressed = 0;
    size_t cap = (size_t)w->p.max_queue;
    while (w->q_len) {
        out_entry *e = w->ring[w->q_head];
        int r = entry_send(w, e);
        if (r == 0)
            break;
        entry_drop(e); /* sent (nothing left to close) or dropped */
        w->ring[w->q_head] = NULL;
        w->q_head = (w->q_head + 1) % cap;
        w->q_len--;
        progressed++;
    }
    w->st.queued_now = w->q_len;
    return progressed;
}

/* Receives one whole message (all its frames) and hands it to the callback. 0: none waiting. */
static int recv_one(ipc_zwatch_t *w) {
    zmq_msg_t f[IPC_ZWATCH_MAX_FRAMES];
    int n = 0;
    bool too_many = false;
    for (;;) {
        zmq_msg_t tmp;
        zmq_msg_init(&tmp);
        if (zmq_msg_recv(&tmp, w->sock, ZMQ_DONTWAIT) < 0) {
            int err = zmq_errno();
            zmq_msg_close(&tmp);
            if (n == 0 && (err == EAGAIN || err == EINTR))
                return 0;
            /* Frames after the first never block in ZeroMQ; anything else is a broken socket. */
            MOE_WARN(MOE_SUB_IPC, "zwatch: receive failed after %d frames: %s", n, zmq_strerror(err));
            for (int i = 0; i < n; i++)
                zmq_msg_close(&f[i]);
            return n ? 1 : 0;
        }
        bool more = zmq_msg_more(&tmp);
        if (n < IPC_ZWATCH_MAX_FRAMES) {
            zmq_msg_init(&f[n]);
            zmq_msg_move(&f[n], &tmp);
            n++;
        } else {
            too_many = true;
        }
        zmq_msg_close(&tmp);
        if (!more)
            break;
    }
    if (too_many) {
        w->st.dropped_in++;
        MOE_WARN(MOE_SUB_IPC, "zwatch: dropped a message of more than %d frames", IPC_ZWATCH_MAX_FRAMES);
    } else {
        w->st.received++;
        w->cb(w, f, n, w->user);
    }
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
    return 1;
}

static void process(ipc_zwatch_t *w) {
    if (w->closing)
        return;
    int budget = w->p.batch;
    bool more = false;
    w->dirty = false;
    w->st.turns++;
    for (;;) {
        uint32_t ev = zevents(w);
        int did = 0;
        if ((ev & ZMQ_POLLOUT) && w->q_len)
            did += flush_queue(w);
        if (ev & ZMQ_POLLIN) {
            if (budget == 0) {
                more = true; /* the rest waits for the check handle */
                break;
            }
            did += recv_one(w);
            budget--;
            if (w->closing)
                return; /* the callback closed us: touch nothing more */
        }
        if (!did)
            break; /* the ZMQ_EVENTS just read shows nothing we can do */
    }
    /* A send made by a callback during this pass set dirty again: look once more next turn. */
    if (more || w->dirty) {
        w->dirty = true;
        set_idle(w, true);
    } else {
        set_idle(w, false);
    }
}

static void on_poll(uv_poll_t *h, int status, int events) {
    (void)events;
    ipc_zwatch_t *w = h->data;
    if (status < 0)
        MOE_WARN(MOE_SUB_IPC, "zwatch: poll: %s", uv_strerror(status));
    process(w);
}

static void on_check(uv_check_t *h) {
    ipc_zwatch_t *w = h->data;
    if (w->dirty)
        process(w);
}

moe_status ipc_zwatch_init(ipc_zwatch_t **out, uv_loop_t *loop, void *zsock, const ipc_zwatch_params *p,
                           ipc_zwatch_msg_cb cb, void *user) {
    MOE_REQUIRE(out && loop && zsock && cb, MOE_ERR_INVALID_ARG, "zwatch_init: NULL argument");
    moe_status st = MOE_OK;
    ipc_zwatch_t *w = calloc(1, sizeof *w);
    if (!w)
        return moe_fail(MOE_ERR_NOMEM, "zwatch_init");
    w->loop = loop;
    w->sock = zsock;
    w->cb = cb;
    w->user = user;
    if (p)
        w->p = *p;
    if (w->p.batch <= 0)
        w->p.batch = 64;
    if (w->p.max_queue <= 0)
        w->p.max_queue = 1024;
    if (w->p.linger_ms < 0)
        w->p.linger_ms = 0;
    w->ring = calloc((size_t)w->p.max_queue, sizeof *w->ring);
    if (!w->ring) {
        st = moe_fail(MOE_ERR_NOMEM, "zwatch_init: queue of %d", (int)w->p.max_queue);
        goto fail;
    }
    int fd = -1;
    size_t fdsz = sizeof fd;
    MOE_ZMQ_CHECK_GOTO(zmq_getsockopt(zsock, ZMQ_FD, &fd, &fdsz), st, fail);
    MOE_UV_CHECK_GOTO(uv_poll_init(loop, &w->poll, fd), st, fail);
    /* From here the handles exist: the only way back is uv_close (ipc_zwatch_close). */
    uv_idle_init(loop, &w->idle);
    uv_check_init(loop, &w->check);
    w->poll.data = w->idle.data = w->check.data = w;
    w->open_handles = 3;
    int r = uv_poll_start(&w->poll, UV_READABLE, on_poll);
    if (r == 0)
        r = uv_check_start(&w->check, on_check);
    if (r < 0) {
        st = moe_fail(MOE_ERR_UV, "zwatch_init: %s", uv_strerror(r));
        w->p.keep_socket = true; /* on failure the socket stays the caller's */
        ipc_zwatch_close(w, NULL, NULL);
        return st;
    }
    /* Messages may be waiting already (queued before the loop ran): look at the first turn. */
    w->dirty = true;
    set_idle(w, true);
    *out = w;
    return MOE_OK;
fail:
    free(w->ring);
    free(w);
    return st;
}

moe_status ipc_zwatch_send(ipc_zwatch_t *w, zmq_msg_t *frames, int n) {
    MOE_REQUIRE(w && frames, MOE_ERR_INVALID_ARG, "zwatch_send: NULL argument");
    if (n < 1 || n > IPC_ZWATCH_MAX_FRAMES) {
        for (int i = 0; i < n; i++)
            zmq_msg_close(&frames[i]);
        return moe_fail(MOE_ERR_INVALID_ARG, "zwatch_send: %d frames, allowed 1..%d", n, IPC_ZWATCH_MAX_FRAMES);
    }
    moe_status st = MOE_OK;
    out_entry *e = malloc(sizeof *e);
    if (!e) {
        for (int i = 0; i < n; i++)
            zmq_msg_close(&frames[i]);
        return moe_fail(MOE_ERR_NOMEM, "zwatch_send");
    }
    e->n = n;
    e->next = 0;
    for (int i = 0; i < n; i++) {
        zmq_msg_init(&e->frames[i]);
        zmq_msg_move(&e->frames[i], &frames[i]);
        zmq_msg_close(&frames[i]);
    }
    if (w->closing) {
        w->st.dropped_out++;
        entry_drop(e);
        return moe_fail(MOE_ERR_SHUTDOWN, "zwatch_send: the watcher is closing");
    }
    /* Try at once unless older messages wait (keeping the order). */
    if (w->q_len == 0) {
        int r = entry_send(w, e);
        if (r != 0) {
            entry_drop(e);
            if (r == -2)
                st = moe_fail(MOE_ERR_NOT_FOUND, "zwatch_send: the peer is gone");
            else if (r < 0)
                st = moe_fail(MOE_ERR_ZMQ, "zwatch_send: %s", zmq_strerror(zmq_errno()));
            e = NULL;
        }
    }
    if (e) {
        if (w->q_len >= (size_t)w->p.max_queue && e->next == 0) {
            w->st.dropped_out++;
            entry_drop(e);
            st = moe_fail(MOE_ERR_BUSY, "zwatch_send: %d messages already wait for the peer (the queue limit)",
                          (int)w->p.max_queue);
        } else if (w->q_len >= (size_t)w->p.max_queue) {
            /* Part of this message is already out: it must finish; it waits in the queue's
             * slack, which only a partial message can use. Cannot happen with ZeroMQ's atomic
             * multipart sends; kept correct all the same. */
            w->st.dropped_out++;
            entry_drop(e);
            st = moe_fail(MOE_ERR_BUSY, "zwatch_send: queue full with a partly sent message");
        } else {
            size_t cap = (size_t)w->p.max_queue;
            w->ring[(w->q_head + w->q_len) % cap] = e;
            w->q_len++;
            w->st.queued_now = w->q_len;
            if (w->q_len > w->st.queued_max)
                w->st.queued_max = w->q_len;
        }
    }
    /* The send may have consumed the fd's edge: look at ZMQ_EVENTS again this turn. */
    w->dirty = true;
    set_idle(w, true);
    return st;
}

moe_status ipc_zwatch_send_bufs(ipc_zwatch_t *w, const void *const *bufs, const size_t *lens, int n) {
    MOE_REQUIRE(w && bufs && lens && n >= 1 && n <= IPC_ZWATCH_MAX_FRAMES, MOE_ERR_INVALID_ARG,
                "zwatch_send_bufs: bad arguments (%d frames)", n);
    zmq_msg_t f[IPC_ZWATCH_MAX_FRAMES];
    for (int i = 0; i < n; i++) {
        if (zmq_msg_init_size(&f[i], lens[i]) != 0) {
            for (int k = 0; k < i; k++)
                zmq_msg_close(&f[k]);
            return moe_fail(MOE_ERR_NOMEM, "zwatch_send_bufs: %zu bytes", lens[i]);
        }
        if (lens[i])
            memcpy(zmq_msg_data(&f[i]), bufs[i], lens[i]);
    }
    return ipc_zwatch_send(w, f, n);
}

static void on_handle_closed(uv_handle_t *h) {
    ipc_zwatch_t *w = h->data;
    if (--w->open_handles > 0)
        return;
    size_t cap = (size_t)w->p.max_queue;
    while (w->q_len) {
        entry_drop(w->ring[w->q_head]);
        w->st.dropped_out++;
        w->q_head = (w->q_head + 1) % cap;
        w->q_len--;
    }
    if (!w->p.keep_socket) {
        int linger = w->p.linger_ms;
        zmq_setsockopt(w->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(w->sock);
    }
    if (w->close_cb)
        w->close_cb(w, w->close_user); /* w is still valid here, but must not be used after */
    free(w->ring);
    free(w);
}

void ipc_zwatch_close(ipc_zwatch_t *w, ipc_zwatch_close_cb cb, void *user) {
    if (!w || w->closing)
        return;
    w->closing = true;
    w->close_cb = cb;
    w->close_user = user;
    uv_poll_stop(&w->poll);
    uv_idle_stop(&w->idle);
    uv_check_stop(&w->check);
    uv_close((uv_handle_t *)&w->poll, on_handle_closed);
    uv_close((uv_handle_t *)&w->idle, on_handle_closed);
    uv_close((uv_handle_t *)&w->check, on_handle_closed);
}

void *ipc_zwatch_socket(const ipc_zwatch_t *w) { return w ? w->sock : NULL; }

ipc_zwatch_stats ipc_zwatch_get_stats(const ipc_zwatch_t *w) {
    ipc_zwatch_stats s;
    memset(&s, 0, sizeof s);
    if (w)
        s = w->st;
    return s;
}
