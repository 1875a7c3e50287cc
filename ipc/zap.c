/*
 * zap.c: the ZAP handler (ZeroMQ RFC 27) of one ZeroMQ context, served on the coordinator's
 * libuv loop through a watcher on a REP socket bound to inproc://zeromq.zap.01. No thread of
 * its own: the handshakes of the context's CURVE servers wait for our answer, which comes on
 * the next loop turn (libzmq runs the handshake asynchronously in its I/O thread, so nothing
 * blocks while the loop is busy; a loop stalled for seconds would stall new handshakes too).
 *
 * Owner: the loop's thread. The allow-list is a sorted array of Z85 public keys, replaced
 * whole on reload (a failed reload keeps the old list).
 *
 * Policy: mechanism CURVE with a 32-byte key found in the list: "200 OK" with the key's Z85
 * text as the user id; CURVE with any other key, and every other mechanism (NULL, PLAIN):
 * "400"; a request that is not ZAP 1.0: "500" when it can be answered at all.
 */
#include <stdlib.h>
#include <string.h>

#include "ipc/ipc.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"

typedef char zkey[IPC_Z85_KEY_LEN + 1];

struct ipc_zap {
    ipc_zwatch_t *w;
    char *path;
    zkey *keys; /* sorted */
    size_t n_keys;
    ipc_zap_stats st;
    void (*close_cb)(void *);
    void *close_user;
};

static int key_cmp(const void *a, const void *b) { return strcmp((const char *)a, (const char *)b); }

static moe_status load_list(ipc_zap_t *z) {
    zkey *keys = NULL;
    size_t n = 0;
    MOE_CHECK(ipc_keys_load_list(z->path, &keys, &n));
    if (n > 1)
        qsort(keys, n, sizeof *keys, key_cmp);
    free(z->keys);
    z->keys = keys;
    z->n_keys = n;
    z->st.n_keys = n;
    return MOE_OK;
}

bool ipc_zap_allows(const ipc_zap_t *z, const char *key) {
    if (!z || !key || !z->n_keys || strlen(key) != IPC_Z85_KEY_LEN)
        return false;
    return bsearch(key, z->keys, z->n_keys, sizeof *z->keys, key_cmp) != NULL;
}

static bool frame_is(zmq_msg_t *f, const char *s) {
    size_t n = strlen(s);
    return zmq_msg_size(f) == n && memcmp(zmq_msg_data(f), s, n) == 0;
}

static void reply(ipc_zap_t *z, zmq_msg_t *req_id, const char *code, const char *text, const char *user_id) {
    const void *bufs[6] = {"1.0", req_id ? zmq_msg_data(req_id) : "", code, text, user_id, ""};
    size_t lens[6] = {3, req_id ? zmq_msg_size(req_id) : 0, strlen(code), strlen(text), strlen(user_id), 0};
    moe_status st = ipc_zwatch_send_bufs(z->w, bufs, lens, 6);
    if (st != MOE_OK)
        MOE_WARN(MOE_SUB_IPC, "zap: reply not sent: %s", moe_errmsg());
}

static void on_request(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)w;
    ipc_zap_t *z = user;
    /* version, request id, domain, address, identity, mechanism, credentials... */
    if (n < 6 || !frame_is(&f[0], "1.0")) {
        z->st.malformed++;
        MOE_WARN(MOE_SUB_IPC, "zap: a request that is not ZAP 1.0 (%d frames)", n);
        reply(z, n >= 2 ? &f[1] : NULL, "500", "not a ZAP 1.0 request", "");
        return;
    }
    char addr[64] = "?";
    size_t an = zmq_msg_size(&f[3]) < sizeof addr - 1 ? zmq_msg_size(&f[3]) : sizeof addr - 1;
    memcpy(addr, zmq_msg_data(&f[3]), an);
    addr[an] = '\0';
    for (size_t i = 0; i < an; i++)
        if ((unsigned char)addr[i] < 0x20 || (unsigned char)addr[i] > 0x7e)
            addr[i] = '?'; /* peer-supplied text goes to the log sanitized */
    if (!frame_is(&f[5], "CURVE") || n != 7 || zmq_msg_size(&f[6]) != 32) {
        z->st.denied++;
        MOE_INFO(MOE_SUB_IPC, "zap: denied a client from %s: mechanism %.*s (only CURVE with a known key)", addr,
                 (int)(zmq_msg_size(&f[5]) < 16 ? zmq_msg_size(&f[5]) : 16), (const char *)zmq_msg_data(&f[5]));
        reply(z, &f[1], "400", "only CURVE clients with an allowed key", "");
        return;
    }
    zkey key;
    if (!zmq_z85_encode(key, zmq_msg_data(&f[6]), 32)) {
        z->st.malformed++;
        reply(z, &f[1], "500", "bad credentials", "");
        return;
    }
    if (ipc_zap_allows(z, key)) {
        z->st.allowed++;
        MOE_DEBUG(MOE_SUB_IPC, "zap: allowed key %s from %s", key, addr);
        reply(z, &f[1], "200", "OK", key);
    } else {
        z->st.denied++;
        MOE_INFO(MOE_SUB_IPC, "zap: denied key %s from %s: not in the allow-list %s", key, addr, z->path);
        reply(z, &f[1], "400", "key not allowed", "");
    }
}

moe_status ipc_zap_init(ipc_zap_t **out, uv_loop_t *loop, void *zmq_ctx, const char *allow_list_path) {
    MOE_REQUIRE(out && loop && zmq_ctx && allow_list_path, MOE_ERR_INVALID_ARG, "zap_init: NULL argument");
    moe_status st = MOE_OK;
    void *sock = NULL;
    ipc_zap_t *z = calloc(1, sizeof *z);
    if (!z)
        return moe_fail(MOE_ERR_NOMEM, "zap_init");
    z->path = strdup(allow_list_path);
    if (!z->path) {
        st = moe_fail(MOE_ERR_NOMEM, "zap_init");
        goto fail;
    }
    MOE_CHECK_GOTO(load_list(z), st, fail);
    sock = zmq_socket(zmq_ctx, ZMQ_REP);
    if (!sock) {
        st = moe_fail(MOE_ERR_ZMQ, "zap_init: zmq_socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    int zero = 0;
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero), st, fail);
    if (zmq_bind(sock, ZAP_ENDPOINT) != 0) {
        st = moe_fail(MOE_ERR_ZMQ, "zap_init: bind %s: %s (a ZAP handler already runs in this context?)",
                      ZAP_ENDPOINT, zmq_strerror(zmq_errno()));
        goto fail;
    }
    ipc_zwatch_params wp = {.batch = 64, .max_queue = 256, .linger_ms = 0};
    MOE_CHECK_GOTO(ipc_zwatch_init(&z->w, loop, sock, &wp, on_request, z), st, fail);
    MOE_INFO(MOE_SUB_IPC, "zap: serving %s with %zu allowed client key(s) from %s", ZAP_ENDPOINT, z->n_keys,
             z->path);
    *out = z;
    return MOE_OK;
fail:
    if (sock)
        zmq_close(sock);
    free(z->keys);
    free(z->path);
    free(z);
    return st;
}

moe_status ipc_zap_reload(ipc_zap_t *z) {
    MOE_REQUIRE(z, MOE_ERR_INVALID_ARG, "zap_reload: NULL handler");
    size_t before = z->n_keys;
    moe_status st = load_list(z);
    if (st != MOE_OK) {
        MOE_WARN(MOE_SUB_IPC, "zap: reload of %s failed, keeping %zu key(s): %s", z->path, before, moe_errmsg());
        return st;
    }
    z->st.reloads++;
    MOE_INFO(MOE_SUB_IPC, "zap: reloaded %s: %zu key(s) (was %zu)", z->path, z->n_keys, before);
    return MOE_OK;
}

ipc_zap_stats ipc_zap_get_stats(const ipc_zap_t *z) {
    ipc_zap_stats s;
    memset(&s, 0, sizeof s);
    if (z)
        s = z->st;
    return s;
}

static void on_watch_closed(ipc_zwatch_t *w, void *user) {
    (void)w;
    ipc_zap_t *z = user;
    void (*cb)(void *) = z->close_cb;
    void *u = z->close_user;
    free(z->keys);
    free(z->path);
    free(z);
    if (cb)
        cb(u);
}

void ipc_zap_close(ipc_zap_t *z, void (*cb)(void *user), void *user) {
    if (!z)
        return;
    z->close_cb = cb;
    z->close_user = user;
    ipc_zwatch_close(z->w, on_watch_closed, z);
}
