/*
 * moeclient.c: libmoeclient (moeclient.h). One ZeroMQ context and DEALER socket per client,
 * plus a PAIR socket on the DEALER's monitor (to turn refused handshakes into MOEC_ERR_AUTH
 * at once instead of a timeout). Messages are encoded and decoded with ipc/proto.c.
 *
 * Owner: the thread using the client (one at a time). State: a table of outstanding
 * requests (slots), each with its deadline and where its result goes. Everything happens in
 * the calling thread inside pump(): zmq_poll until a reply, a monitor event or the nearest
 * deadline; replies are matched by request id (and op); expired requests end with
 * MOEC_ERR_TIMEOUT; late replies (no slot) are dropped.
 *
 * Invariants: a slot ends exactly once (finish()); y is written only for a successful
 * SUBMIT reply whose dtype and shape are exactly the request's.
 *
 * Request buffers: a request of REQBUF_MIN_BYTES or more is encoded into a buffer of the
 * client's pool and sent without a copy (zmq_msg_init_data); ZeroMQ's I/O thread hands the
 * buffer back once it is written out (reqbuf_release, under the pool's lock), and the next
 * request reuses it. A fresh allocation per request touched every page anew: at 4 MiB a request
 * the calling thread took ~500 page faults each and was the pipeline's busiest thread
 * (docs/PERF.md, engine runs 48-49). At most REQBUF_KEEP buffers are kept; the pool is freed
 * after the context is terminated (every message released).
 */
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "ipc/ipc_proto.h"
#include "ipc/moeclient.h"

_Static_assert(MOEC_ERR_INVALID_ARG == (int)MOE_ERR_INVALID_ARG && MOEC_ERR_TIMEOUT == (int)MOE_ERR_TIMEOUT &&
                   MOEC_ERR_AUTH == (int)MOE_ERR_AUTH && MOEC_ERR_LIMIT == (int)MOE_ERR_LIMIT &&
                   MOEC_ERR_LIMIT == (int)MOE_STATUS_MIN_,
               "moec_status mirrors moe_status");
_Static_assert(MOEC_F32 == (int)MOE_DTYPE_F32 && MOEC_F16 == (int)MOE_DTYPE_F16 && MOEC_BF16 == (int)MOE_DTYPE_BF16 &&
                   MOEC_I32 == (int)MOE_DTYPE_I32,
               "moec_dtype mirrors moe_dtype");

#define DEFAULT_TIMEOUT_MS 10000
#define DEFAULT_IN_FLIGHT 1024

typedef struct slot {
    bool used, done, async;
    uint64_t id;
    uint16_t op;
    uint64_t t_send_ns, deadline_ns;
    int32_t timeout_ms;
    void *y;
    size_t y_bytes;
    int64_t T, H;
    int32_t dtype;
    char *json;
    int32_t status;
    char msg[256];
    uint64_t done_seq;
} slot;

#define REQBUF_MIN_BYTES (64u * 1024u)
#define REQBUF_KEEP 8

typedef struct reqbuf {
    struct reqbuf *next;
    struct reqpool *pool;
    size_t cap;
    max_align_t data[]; /* the encoded request */
} reqbuf;

typedef struct reqpool {
    pthread_mutex_t mu; /* ZeroMQ's I/O thread returns buffers */
    bool inited;
    reqbuf *free;
    int n_free;
} reqpool;

/* ZeroMQ's free callback of a pooled request (its I/O thread, or ours on a failed send). */
static void reqbuf_release(void *data, void *hint) {
    (void)data;
    reqbuf *b = hint;
    reqpool *p = b->pool;
    pthread_mutex_lock(&p->mu);
    if (p->n_free < REQBUF_KEEP) {
        b->next = p->free;
        p->free = b;
        p->n_free++;
        b = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    free(b);
}

/* A buffer of at least n bytes: a kept one that fits (a kept one too small for it is freed, so
 * that the pool follows the requests' size), else a new one. NULL when out of memory. */
static reqbuf *reqbuf_get(reqpool *p, size_t n) {
    reqbuf *b = NULL, *small = NULL;
    pthread_mutex_lock(&p->mu);
    for (reqbuf **pp = &p->free; *pp; pp = &(*pp)->next)
        if ((*pp)->cap >= n) {
            b = *pp;
            *pp = b->next;
            p->n_free--;
            break;
        }
    if (!b && p->free) {
        small = p->free;
        p->free = small->next;
        p->n_free--;
    }
    pthread_mutex_unlock(&p->mu);
    free(small);
    if (!b) {
        b = malloc(sizeof *b + n);
        if (!b)
            return NULL;
        b->pool = p;
        b->cap = n;
    }
    return b;
}

static void reqpool_free(reqpool *p) {
    if (!p->inited)
        return;
    while (p->free) {
        reqbuf *b = p->free;
        p->free = b->next;
        free(b);
    }
    pthread_mutex_destroy(&p->mu);
    p->inited = false;
}

struct moec_client {
    void *ctx, *sock, *mon;
    reqpool pool;
    char endpoint[256];
    moec_options o;
    slot *tab;
    int cap, n_async, n_used;
    uint64_t next_id, done_seq;
    int32_t busy_poll_us;
    char err[512];
};

static const char *const status_names[] = {
    "MOEC_OK",           "MOEC_ERR_INVALID_ARG", "MOEC_ERR_NOMEM",     "MOEC_ERR_IO",        "MOEC_ERR_SYSTEM",
    "MOEC_ERR_CUDA",     "MOEC_ERR_CUBLAS",      "MOEC_ERR_NCCL",      "MOEC_ERR_ZMQ",       "MOEC_ERR_UV",
    "MOEC_ERR_UNSUPPORTED", "MOEC_ERR_FORMAT",   "MOEC_ERR_PROTOCOL",  "MOEC_ERR_TIMEOUT",   "MOEC_ERR_BUSY",
    "MOEC_ERR_NOT_FOUND", "MOEC_ERR_SHUTDOWN",   "MOEC_ERR_ALIAS",     "MOEC_ERR_WORKER",    "MOEC_ERR_AUTH",
    "MOEC_ERR_INTERNAL", "MOEC_ERR_LIMIT",
};

const char *moec_status_name(int st) {
    return st <= 0 && -st < (int)(sizeof status_names / sizeof status_names[0]) ? status_names[-st]
                                                                                : "MOEC_ERR_UNKNOWN";
}

const char *moec_status_str(int st) { return moe_status_str((moe_status)st); }

size_t moec_dtype_size(int dtype) { return moe_dtype_size((moe_dtype)dtype); }

void moec_options_default(moec_options *o) {
    memset(o, 0, sizeof *o);
    o->timeout_ms = DEFAULT_TIMEOUT_MS;
    o->max_msg_bytes = IPC_DEFAULT_MAX_MSG_BYTES;
    o->max_in_flight = DEFAULT_IN_FLIGHT;
}

/* Stores the outcome of an API call: the message of a failure, "" on success. */
static int ret(moec_client_t *c, moe_status st) {
    if (c) {
        if (st == MOE_OK)
            c->err[0] = '\0';
        else
            snprintf(c->err, sizeof c->err, "%s", moe_errmsg()[0] ? moe_errmsg() : moe_status_str(st));
    }
    return (int)st;
}

const char *moec_errmsg(const moec_client_t *c) { return c ? c->err : "no client"; }

void moec_free(void *p) { free(p); }

int moec_load_public_key(const char *path, char out[41]) { return (int)ipc_keys_load_public(path, out); }

int moec_load_secret_key(const char *path, char pub[41], char sec[41]) {
    return (int)ipc_keys_load_secret(path, pub, sec);
}

/* ------------------------------------------------------------------------------------------
 * Set-up.
 * ---------------------------------------------------------------------------------------- */
static moe_status setup_curve(moec_client_t *c) {
    const moec_options *o = &c->o;
    char pub[IPC_Z85_KEY_LEN + 1], sec[IPC_Z85_KEY_LEN + 1];
    MOE_REQUIRE(ipc_key_z85_valid(o->server_public_key), MOE_ERR_INVALID_ARG,
                "server_public_key: not a 40-character Z85 key");
    if (o->client_public_key || o->client_secret_key) {
        MOE_REQUIRE(ipc_key_z85_valid(o->client_public_key) && ipc_key_z85_valid(o->client_secret_key),
                    MOE_ERR_INVALID_ARG, "client keys: both the public and the secret key, 40 Z85 characters each");
        char derived[IPC_Z85_KEY_LEN + 1];
        MOE_REQUIRE(zmq_curve_public(derived, o->client_secret_key) == 0 &&
                        strcmp(derived, o->client_public_key) == 0,
                    MOE_ERR_INVALID_ARG, "client keys: the public key does not belong to the secret key");
        memcpy(pub, o->client_public_key, sizeof pub);
        memcpy(sec, o->client_secret_key, sizeof sec);
    } else {
        MOE_REQUIRE(zmq_curve_keypair(pub, sec) == 0, MOE_ERR_UNSUPPORTED, "zmq_curve_keypair: %s",
                    zmq_strerror(zmq_errno()));
    }
    moe_status st = MOE_OK;
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, o->server_public_key, IPC_Z85_KEY_LEN), st, done);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, pub, IPC_Z85_KEY_LEN), st, done);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, sec, IPC_Z85_KEY_LEN), st, done);
done:
    memset(sec, 0, sizeof sec);
    return st;
}

int moec_client_init(moec_client_t **out, const char *endpoint, const moec_options *opt) {
    moe_errmsg_clear();
    if (!out || !endpoint || !*endpoint)
        return ret(NULL, moe_fail(MOE_ERR_INVALID_ARG, "moec_client_init: NULL output or empty endpoint"));
    *out = NULL;
    moe_status st = MOE_OK;
    moec_client_t *c = calloc(1, sizeof *c);
    if (!c)
        return MOEC_ERR_NOMEM;
    if (pthread_mutex_init(&c->pool.mu, NULL) != 0) {
        free(c);
        return MOEC_ERR_SYSTEM;
    }
    c->pool.inited = true;
    if (opt)
        c->o = *opt;
    else
        moec_options_default(&c->o);
    if (c->o.timeout_ms <= 0)
        c->o.timeout_ms = DEFAULT_TIMEOUT_MS;
    if (!c->o.max_msg_bytes)
        c->o.max_msg_bytes = IPC_DEFAULT_MAX_MSG_BYTES;
    if (c->o.max_in_flight <= 0)
        c->o.max_in_flight = DEFAULT_IN_FLIGHT;
    snprintf(c->endpoint, sizeof c->endpoint, "%s", endpoint);
    c->cap = c->o.max_in_flight + 4; /* + room for the synchronous calls */
    c->tab = calloc((size_t)c->cap, sizeof *c->tab);
    c->next_id = 1;
    c->ctx = zmq_ctx_new();
    if (!c->tab || !c->ctx) {
        st = moe_fail(MOE_ERR_NOMEM, "moec_client_init");
        goto fail;
    }
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) {
        st = moe_fail(MOE_ERR_ZMQ, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    int zero = 0, ivl = 100, ivl_max = 1000;
    int64_t maxmsg = (int64_t)c->o.max_msg_bytes;
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_LINGER, &zero, sizeof zero), st, fail);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg), st, fail);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl), st, fail);
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof ivl_max), st, fail);
    if (c->o.server_public_key)
        MOE_CHECK_GOTO(setup_curve(c), st, fail);
    else if (c->o.client_public_key || c->o.client_secret_key) {
        st = moe_fail(MOE_ERR_INVALID_ARG, "client keys given without server_public_key (needed for CURVE)");
        goto fail;
    }
    /* The monitor: refused handshakes become MOEC_ERR_AUTH without waiting for a timeout. */
    char mon_ep[64];
    snprintf(mon_ep, sizeof mon_ep, "inproc://moec-monitor");
    MOE_ZMQ_CHECK_GOTO(zmq_socket_monitor(c->sock, mon_ep,
                                          ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                              ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED),
                       st, fail);
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    if (!c->mon) {
        st = moe_fail(MOE_ERR_ZMQ, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(c->mon, ZMQ_LINGER, &zero, sizeof zero), st, fail);
    MOE_ZMQ_CHECK_GOTO(zmq_connect(c->mon, mon_ep), st, fail);
    if (zmq_connect(c->sock, endpoint) != 0) {
        st = moe_fail(MOE_ERR_INVALID_ARG, "connect %s: %s", endpoint, zmq_strerror(zmq_errno()));
        goto fail;
    }
    *out = c;
    return MOEC_OK;
fail:
    moec_client_free(c);
    return ret(NULL, st);
}

int moec_client_set_busy_poll(moec_client_t *c, int32_t us) {
    if (!c)
        return MOEC_ERR_INVALID_ARG;
    if (us < 0 || us > 10000000) {
        snprintf(c->err, sizeof c->err, "busy poll: %d us is outside 0 .. 10000000", (int)us);
        return MOEC_ERR_INVALID_ARG;
    }
    c->busy_poll_us = us;
    return MOEC_OK;
}

void moec_client_free(moec_client_t *c) {
    if (!c)
        return;
    if (c->sock)
        zmq_socket_monitor(c->sock, NULL, 0);
    if (c->mon)
        zmq_close(c->mon);
    if (c->sock)
        zmq_close(c->sock);
    if (c->ctx)
        zmq_ctx_term(c->ctx); /* every message released: no pooled buffer is out any more */
    reqpool_free(&c->pool);
    if (c->tab)
        for (int i = 0; i < c->cap; i++)
            free(c->tab[i].json);
    free(c->tab);
    free(c);
}

/* ------------------------------------------------------------------------------------------
 * Slots.
 * ---------------------------------------------------------------------------------------- */
static slot *find_slot(moec_client_t *c, uint64_t id) {
    for (int i = 0; i < c->cap; i++)
        if (c->tab[i].used && c->tab[i].id == id)
            return &c->tab[i];
    return NULL;
}

static void release(moec_client_t *c, slot *s) {
    free(s->json);
    if (s->async)
        c->n_async--;
    c->n_used--;
    memset(s, 0, sizeof *s);
}

static void finish(moec_client_t *c, slot *s, int32_t status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void finish(moec_client_t *c, slot *s, int32_t status, const char *fmt, ...) {
    if (s->done)
        return;
    s->done = true;
    s->status = status;
    s->done_seq = ++c->done_seq;
    s->msg[0] = '\0';
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->msg, sizeof s->msg, fmt, ap);
        va_end(ap);
    }
    uint64_t now = moe_now_ns();
    s->deadline_ns = now; /* reused as the completion time for latency */
}

static void fail_outstanding(moec_client_t *c, int32_t status, const char *msg) {
    for (int i = 0; i < c->cap; i++)
        if (c->tab[i].used && !c->tab[i].done)
            finish(c, &c->tab[i], status, "%s", msg);
}

/* ------------------------------------------------------------------------------------------
 * Receiving.
 * ---------------------------------------------------------------------------------------- */
static void handle_reply(moec_client_t *c, const void *buf, size_t len) {
    ipc_limits l = ipc_limits_default();
    l.accept = IPC_ACCEPT_REPLIES;
    l.max_msg_bytes = c->o.max_msg_bytes;
    ipc_msg m;
    moe_status st = ipc_decode(buf, len, &l, &m);
    slot *s = find_slot(c, m.request_id);
    if (st != MOE_OK) {
        if (!s || s->done) {
            MOE_DEBUG(MOE_SUB_IPC, "moeclient: dropped an unreadable reply: %s", moe_errmsg());
            return;
        }
        if (m.version != IPC_VERSION && m.version != 0)
            finish(c, s, MOE_ERR_PROTOCOL,
                   "the server speaks protocol version %u, this client version %d: upgrade one of them",
                   (unsigned)m.version, IPC_VERSION);
        else
            finish(c, s, st, "unreadable reply from the server: %s", moe_errmsg());
        return;
    }
    if (!s || s->done) {
        MOE_DEBUG(MOE_SUB_IPC, "moeclient: dropped a late reply to request %llu", (unsigned long long)m.request_id);
        return;
    }
    if (m.op != s->op) {
        finish(c, s, MOE_ERR_PROTOCOL, "the reply is for op %s, the request was %s", ipc_op_name(m.op),
               ipc_op_name(s->op));
        return;
    }
    if (m.status < 0) {
        const ipc_section *t = ipc_msg_find(&m, IPC_SEC_TEXT);
        finish(c, s, m.status, "%.*s", t ? (int)t->nbytes : 0, t ? (const char *)t->data : "");
        return;
    }
    switch (m.op) {
    case IPC_OP_PING:
        finish(c, s, MOE_OK, NULL);
        return;
    case IPC_OP_INFO:
    case IPC_OP_STATS: {
        const ipc_section *j = ipc_msg_find(&m, IPC_SEC_JSON);
        s->json = malloc((size_t)j->nbytes + 1);
        if (!s->json) {
            finish(c, s, MOE_ERR_NOMEM, "reply of %llu bytes", (unsigned long long)j->nbytes);
            return;
        }
        memcpy(s->json, j->data, (size_t)j->nbytes);
        s->json[j->nbytes] = '\0';
        finish(c, s, MOE_OK, NULL);
        return;
    }
    case IPC_OP_SUBMIT: {
        const ipc_section *y = ipc_msg_find(&m, IPC_SEC_Y);
        if (y->dtype != s->dtype || y->shape[0] != s->T || y->shape[1] != s->H) {
            finish(c, s, MOE_ERR_PROTOCOL, "the reply's y is %s[%lld, %lld], expected %s[%lld, %lld]",
                   moe_dtype_name((moe_dtype)y->dtype), (long long)y->shape[0], (long long)y->shape[1],
                   moe_dtype_name((moe_dtype)s->dtype), (long long)s->T, (long long)s->H);
            return;
        }
        if (y->nbytes > s->y_bytes) {
            finish(c, s, MOE_ERR_INTERNAL, "y buffer of %zu bytes, reply of %llu", s->y_bytes,
                   (unsigned long long)y->nbytes);
            return;
        }
        memcpy(s->y, y->data, (size_t)y->nbytes);
        finish(c, s, MOE_OK, NULL);
        return;
    }
    default:
        finish(c, s, MOE_ERR_PROTOCOL, "unexpected op %u", (unsigned)m.op);
    }
}

static void handle_monitor(moec_client_t *c) {
    for (;;) {
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, c->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        uint16_t event = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&ev) >= 6) {
            memcpy(&event, zmq_msg_data(&ev), 2);
            memcpy(&value, (const uint8_t *)zmq_msg_data(&ev) + 2, 4);
        }
        bool more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        if (more) {
            zmq_msg_init(&addr);
            zmq_msg_recv(&addr, c->mon, 0);
            zmq_msg_close(&addr);
        }
        char msg[640];
        if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
            snprintf(msg, sizeof msg,
                     "the server at %s refused this client (ZAP status %u): its public key is not on the "
                     "server's allow-list",
                     c->endpoint, (unsigned)value);
            fail_outstanding(c, MOE_ERR_AUTH, msg);
        } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
            snprintf(msg, sizeof msg,
                     "handshake with %s failed (ZMTP error 0x%x): does the server use CURVE, and is the server "
                     "key right?",
                     c->endpoint, (unsigned)value);
            fail_outstanding(c, MOE_ERR_AUTH, msg);
        }
    }
}

static void expire(moec_client_t *c, uint64_t now) {
    for (int i = 0; i < c->cap; i++) {
        slot *s = &c->tab[i];
        if (s->used && !s->done && s->deadline_ns <= now)
            finish(c, s, MOE_ERR_TIMEOUT,
                   "no reply within %d ms from %s (server down, restarted, or overloaded?)", (int)s->timeout_ms,
                   c->endpoint);
    }
}

/* Waits up to wait_ms (< 0: no limit but the deadlines) for replies, monitor events or the
 * next deadline, and handles what came. */
static moe_status pump(moec_client_t *c, int64_t wait_ms) {
    uint64_t now = moe_now_ns();
    int64_t tmo = wait_ms;
    for (int i = 0; i < c->cap; i++) {
        slot *s = &c->tab[i];
        if (s->used && !s->done) {
            int64_t left = s->deadline_ns > now ? (int64_t)((s->deadline_ns - now + 999999) / 1000000) : 0;
            if (tmo < 0 || left < tmo)
                tmo = left;
        }
    }
    zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
    int r = 0;
    if (c->busy_poll_us > 0 && tmo != 0) { /* moec_client_set_busy_poll: look without sleeping first */
        const uint64_t end = now + (uint64_t)c->busy_poll_us * 1000ull;
        while ((r = zmq_poll(items, 2, 0)) == 0 && moe_now_ns() < end)
            sched_yield(); /* the ZeroMQ I/O thread may need this core */
    }
    if (r == 0)
        r = zmq_poll(items, 2, (long)tmo);
    if (r < 0 && zmq_errno() != EINTR)
        return moe_fail(MOE_ERR_ZMQ, "zmq_poll: %s", zmq_strerror(zmq_errno()));
    if (r > 0 && (items[1].revents & ZMQ_POLLIN))
        handle_monitor(c);
    if (r > 0 && (items[0].revents & ZMQ_POLLIN)) {
        for (int k = 0; k < 256; k++) {
            zmq_msg_t msg;
            zmq_msg_init(&msg);
            if (zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&msg);
                break;
            }
            if (zmq_msg_more(&msg)) { /* not ours: a reply is one frame; drain the rest */
                MOE_DEBUG(MOE_SUB_IPC, "moeclient: dropped a multi-frame message");
                while (zmq_msg_more(&msg)) {
                    zmq_msg_close(&msg);
                    zmq_msg_init(&msg);
                    zmq_msg_recv(&msg, c->sock, 0);
                }
            } else {
                handle_reply(c, zmq_msg_data(&msg), zmq_msg_size(&msg));
            }
            zmq_msg_close(&msg);
        }
    }
    expire(c, moe_now_ns());
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Sending.
 * ---------------------------------------------------------------------------------------- */
static moe_status start(moec_client_t *c, ipc_msg *m, bool async, int32_t timeout_ms, slot **out) {
    if (async && c->n_async >= c->o.max_in_flight)
        return moe_fail(MOE_ERR_BUSY, "%d requests already in flight (max_in_flight): collect some first",
                        c->n_async);
    slot *s = NULL;
    for (int i = 0; i < c->cap && !s; i++)
        if (!c->tab[i].used)
            s = &c->tab[i];
    if (!s)
        return moe_fail(MOE_ERR_BUSY, "no free request slot");
    if (timeout_ms <= 0)
        timeout_ms = c->o.timeout_ms;
    m->request_id = c->next_id++;
    m->timeout_ms = (uint32_t)timeout_ms;
    size_t n;
    MOE_CHECK(ipc_encoded_size(m, &n));
    if (n > c->o.max_msg_bytes)
        return moe_fail(MOE_ERR_LIMIT, "the request is %zu bytes, over max_msg_bytes %llu", n,
                        (unsigned long long)c->o.max_msg_bytes);
    zmq_msg_t zm;
    if (n >= REQBUF_MIN_BYTES) { /* from the pool, sent without a copy */
        reqbuf *b = reqbuf_get(&c->pool, n);
        if (!b)
            return moe_fail(MOE_ERR_NOMEM, "request of %zu bytes", n);
        moe_status st = ipc_encode(m, b->data, n, NULL);
        if (st == MOE_OK && zmq_msg_init_data(&zm, b->data, n, reqbuf_release, b) != 0)
            st = moe_fail(MOE_ERR_NOMEM, "request of %zu bytes", n);
        if (st != MOE_OK) {
            reqbuf_release(b->data, b);
            return st;
        }
    } else {
        if (zmq_msg_init_size(&zm, n) != 0)
            return moe_fail(MOE_ERR_NOMEM, "request of %zu bytes", n);
        moe_status st = ipc_encode(m, zmq_msg_data(&zm), n, NULL);
        if (st != MOE_OK) {
            zmq_msg_close(&zm);
            return st;
        }
    }
    if (zmq_msg_send(&zm, c->sock, ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(&zm);
        return moe_fail(e == EAGAIN ? MOE_ERR_BUSY : MOE_ERR_ZMQ, "send to %s: %s%s", c->endpoint, zmq_strerror(e),
                        e == EAGAIN ? " (the send queue is full: is the server reachable?)" : "");
    }
    memset(s, 0, sizeof *s);
    s->used = true;
    s->async = async;
    s->id = m->request_id;
    s->op = m->op;
    s->timeout_ms = timeout_ms;
    s->t_send_ns = moe_now_ns();
    s->deadline_ns = s->t_send_ns + (uint64_t)timeout_ms * 1000000ull;
    c->n_used++;
    if (async)
        c->n_async++;
    *out = s;
    return MOE_OK;
}

/* Runs a synchronous call to its end; the slot is released by the caller. */
static moe_status wait_slot(moec_client_t *c, slot *s) {
    while (!s->done)
        MOE_CHECK(pump(c, -1));
    if (s->status != MOE_OK)
        return moe_fail((moe_status)s->status, "%s", s->msg[0] ? s->msg : moe_status_str((moe_status)s->status));
    return MOE_OK;
}

static int simple_call(moec_client_t *c, uint16_t op, char **json, int32_t timeout_ms) {
    moe_errmsg_clear();
    if (!c)
        return MOEC_ERR_INVALID_ARG;
    ipc_msg m;
    ipc_msg_init(&m, op, 0);
    slot *s;
    moe_status st = start(c, &m, false, timeout_ms, &s);
    if (st != MOE_OK)
        return ret(c, st);
    st = wait_slot(c, s);
    if (st == MOE_OK && json) {
        *json = s->json;
        s->json = NULL;
    }
    release(c, s);
    return ret(c, st);
}

int moec_ping(moec_client_t *c, int32_t timeout_ms) { return simple_call(c, IPC_OP_PING, NULL, timeout_ms); }

int moec_info(moec_client_t *c, char **json, int32_t timeout_ms) {
    if (!json)
        return ret(c, moe_fail(MOE_ERR_INVALID_ARG, "moec_info: NULL output"));
    return simple_call(c, IPC_OP_INFO, json, timeout_ms);
}

int moec_stats(moec_client_t *c, char **json, int32_t timeout_ms) {
    if (!json)
        return ret(c, moe_fail(MOE_ERR_INVALID_ARG, "moec_stats: NULL output"));
    return simple_call(c, IPC_OP_STATS, json, timeout_ms);
}

static moe_status build_submit(const moec_request *r, void *y, size_t y_bytes, ipc_msg *m) {
    MOE_REQUIRE(r, MOE_ERR_INVALID_ARG, "NULL request");
    MOE_REQUIRE(r->dtype == MOEC_F32 || r->dtype == MOEC_F16 || r->dtype == MOEC_BF16, MOE_ERR_INVALID_ARG,
                "request: dtype %d is not f32, f16 or bf16", (int)r->dtype);
    MOE_REQUIRE(r->n_tokens >= 1 && r->n_tokens <= IPC_MAX_DIM && r->hidden >= 1 && r->hidden <= IPC_MAX_DIM,
                MOE_ERR_INVALID_ARG, "request: n_tokens %lld and hidden %lld must be >= 1",
                (long long)r->n_tokens, (long long)r->hidden);
    MOE_REQUIRE(r->x, MOE_ERR_INVALID_ARG, "request: NULL x");
    MOE_REQUIRE(r->layer >= 0, MOE_ERR_INVALID_ARG, "request: layer %d is negative", (int)r->layer);
    size_t need;
    MOE_REQUIRE(moe_mul_size((size_t)r->n_tokens * (size_t)r->hidden, moe_dtype_size((moe_dtype)r->dtype), &need),
                MOE_ERR_INVALID_ARG, "request: size overflows");
    MOE_REQUIRE(y && y_bytes >= need, MOE_ERR_INVALID_ARG, "request: y buffer of %zu bytes, the output needs %zu",
                y ? y_bytes : 0, need);
    bool with_ids = r->top_k > 0, with_logits = r->logits != NULL;
    MOE_REQUIRE(!(with_ids && with_logits), MOE_ERR_INVALID_ARG,
                "request: give top_k with topk_ids/topk_w, or logits, not both");
    MOE_REQUIRE(!with_ids || (r->topk_ids && r->topk_w), MOE_ERR_INVALID_ARG,
                "request: top_k %d needs topk_ids and topk_w", (int)r->top_k);
    MOE_REQUIRE(!with_logits || (r->n_experts >= 1 && moe_dtype_is_float((moe_dtype)r->logits_dtype) &&
                                 moe_dtype_valid(r->logits_dtype)),
                MOE_ERR_INVALID_ARG, "request: logits need n_experts >= 1 and a float logits_dtype");
    moe_tensor x = moe_tensor_view2((void *)r->x, (moe_dtype)r->dtype, r->n_tokens, r->hidden);
    moe_tensor ids = moe_tensor_view2((void *)r->topk_ids, MOE_DTYPE_I32, r->n_tokens, r->top_k);
    moe_tensor w = moe_tensor_view2((void *)r->topk_w, MOE_DTYPE_F32, r->n_tokens, r->top_k);
    moe_tensor lg = moe_tensor_view2((void *)r->logits, (moe_dtype)r->logits_dtype, r->n_tokens, r->n_experts);
    return ipc_submit_init(m, 0, r->layer, &x, with_ids ? &ids : NULL, with_ids ? &w : NULL,
                           with_logits ? &lg : NULL);
}

static moe_status submit_start(moec_client_t *c, const moec_request *r, void *y, size_t y_bytes, int32_t timeout_ms,
                               bool async, slot **out) {
    ipc_msg m;
    MOE_CHECK(build_submit(r, y, y_bytes, &m));
    slot *s;
    MOE_CHECK(start(c, &m, async, timeout_ms, &s));
    s->y = y;
    s->y_bytes = y_bytes;
    s->T = r->n_tokens;
    s->H = r->hidden;
    s->dtype = r->dtype;
    *out = s;
    return MOE_OK;
}

int moec_submit(moec_client_t *c, const moec_request *r, void *y, size_t y_bytes, int32_t timeout_ms) {
    moe_errmsg_clear();
    if (!c)
        return MOEC_ERR_INVALID_ARG;
    slot *s;
    moe_status st = submit_start(c, r, y, y_bytes, timeout_ms, false, &s);
    if (st != MOE_OK)
        return ret(c, st);
    st = wait_slot(c, s);
    release(c, s);
    return ret(c, st);
}

int moec_submit_async(moec_client_t *c, const moec_request *r, void *y, size_t y_bytes, int32_t timeout_ms,
                      uint64_t *request_id) {
    moe_errmsg_clear();
    if (!c)
        return MOEC_ERR_INVALID_ARG;
    slot *s;
    moe_status st = submit_start(c, r, y, y_bytes, timeout_ms, true, &s);
    if (st == MOE_OK && request_id)
        *request_id = s->id;
    return ret(c, st);
}

int moec_in_flight(const moec_client_t *c) { return c ? c->n_async : 0; }

int moec_collect(moec_client_t *c, int32_t wait_ms, moec_result *res) {
    moe_errmsg_clear();
    if (!c || !res)
        return MOEC_ERR_INVALID_ARG;
    uint64_t t_end = moe_now_ns() + (wait_ms > 0 ? (uint64_t)wait_ms * 1000000ull : 0);
    bool looked = false;
    for (;;) {
        slot *best = NULL;
        for (int i = 0; i < c->cap; i++) {
            slot *s = &c->tab[i];
            if (s->used && s->async && s->done && (!best || s->done_seq < best->done_seq))
                best = s;
        }
        if (best) {
            memset(res, 0, sizeof *res);
            res->request_id = best->id;
            res->status = best->status;
            res->latency_ms = (double)(best->deadline_ns - best->t_send_ns) * 1e-6;
            snprintf(res->message, sizeof res->message, "%s", best->msg);
            release(c, best);
            return ret(c, MOE_OK);
        }
        if (c->n_async == 0)
            return ret(c, moe_fail(MOE_ERR_NOT_FOUND, "no request in flight"));
        uint64_t now = moe_now_ns();
        if (wait_ms >= 0 && looked && now >= t_end)
            return ret(c, moe_fail(MOE_ERR_TIMEOUT, "no request completed within %d ms", (int)wait_ms));
        int64_t left = wait_ms < 0 ? -1 : (now >= t_end ? 0 : (int64_t)((t_end - now) / 1000000));
        moe_status st = pump(c, left);
        if (st != MOE_OK)
            return ret(c, st);
        looked = true;
    }
}
