/*
 * test_zwatch.c: the ZeroMQ-in-libuv watcher on real loops and real sockets (inproc and TCP
 * on 127.0.0.1). Every test ends with uv_loop_close() == 0 (every handle closed).
 *   - 1000 messages queued before the loop runs (and before the watcher exists) all arrive,
 *     in order, in bounded batches (the edge of ZMQ_FD fired long before anyone listened);
 *   - one DEALER socket interleaves sends and receives with an echoing ROUTER on the same
 *     loop, with sends made from inside receive callbacks (each one may consume the edge);
 *   - tiny high-water marks force EAGAIN: messages wait in the out-queue and all arrive in
 *     order; a full queue answers MOE_ERR_BUSY; close drops what waits and counts it;
 *   - closing from inside a callback; messages of too many frames are dropped and counted.
 * A watchdog timer fails a test that hangs instead of hanging the suite.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ipc/ipc.h"

typedef struct watchdog {
    uv_timer_t t;
    bool fired;
} watchdog;

static void on_watchdog(uv_timer_t *t) {
    watchdog *w = t->data;
    w->fired = true;
    uv_stop(t->loop);
}

static void watchdog_start(watchdog *w, uv_loop_t *loop, uint64_t ms) {
    memset(w, 0, sizeof *w);
    uv_timer_init(loop, &w->t);
    w->t.data = w;
    uv_timer_start(&w->t, on_watchdog, ms, 0);
    uv_unref((uv_handle_t *)&w->t); /* does not keep the loop alive by itself */
}

/* Closes whatever is left (after a watchdog stop too) and checks the loop closes cleanly. */
static void walk_close(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void finish_loop(uv_loop_t *loop, watchdog *wd) {
    uv_timer_stop(&wd->t);
    uv_close((uv_handle_t *)&wd->t, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    if (uv_loop_close(loop) != 0) {
        uv_walk(loop, walk_close, NULL);
        uv_run(loop, UV_RUN_DEFAULT);
        fail_msg("uv_loop_close: handles were left open");
    }
    assert_false(wd->fired);
}

static void *bind_any(void *ctx, int type, const char *ep, char *out, size_t cap) {
    void *s = zmq_socket(ctx, type);
    assert_non_null(s);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_bind(s, ep), 0);
    size_t n = cap;
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, out, &n);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
typedef struct count_ctx {
    int got, expect;
    bool in_order;
    ipc_zwatch_t *w;
} count_ctx;

static void on_count(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    count_ctx *c = user;
    assert_int_equal(n, 1);
    uint32_t seq;
    assert_int_equal(zmq_msg_size(&f[0]), 64);
    memcpy(&seq, zmq_msg_data(&f[0]), 4);
    if (seq != (uint32_t)c->got)
        c->in_order = false;
    if (++c->got == c->expect)
        ipc_zwatch_close(w, NULL, NULL);
}

static void queued_before_loop(const char *ep_pattern) {
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    void *ctx = zmq_ctx_new();
    char ep[256];
    void *pull = bind_any(ctx, ZMQ_PULL, ep_pattern, ep, sizeof ep);
    int hwm = 0; /* unlimited: all 1000 sit in the pipe before anyone reads */
    zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    int zero = 0;
    zmq_setsockopt(push, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_connect(push, ep), 0);
    uint8_t buf[64] = {0};
    for (uint32_t i = 0; i < 1000; i++) {
        memcpy(buf, &i, 4);
        assert_int_equal(zmq_send(push, buf, sizeof buf, 0), 64);
    }
    /* Let them all reach the receiving side (TCP): wait until ZMQ_EVENTS says POLLIN, which
     * also consumes the fd's edge: the watcher must not depend on it. */
    zmq_pollitem_t it = {pull, 0, ZMQ_POLLIN, 0};
    assert_int_equal(zmq_poll(&it, 1, 5000), 1);
    if (strncmp(ep, "tcp", 3) == 0)
        uv_sleep(200); /* give the I/O thread time to move the whole batch across */
    count_ctx c = {.expect = 1000, .in_order = true};
    ipc_zwatch_params p = {.batch = 64};
    assert_int_equal(ipc_zwatch_init(&c.w, &loop, pull, &p, on_count, &c), MOE_OK);
    watchdog wd;
    watchdog_start(&wd, &loop, 10000);
    uv_run(&loop, UV_RUN_DEFAULT);
    finish_loop(&loop, &wd);
    assert_int_equal(c.got, 1000);
    assert_true(c.in_order);
    zmq_close(push);
    zmq_ctx_term(ctx);
}

static void test_1000_queued_before_loop_inproc(void **state) {
    (void)state;
    queued_before_loop("inproc://zw-1000");
}

static void test_1000_queued_before_loop_tcp(void **state) {
    (void)state;
    queued_before_loop("tcp://127.0.0.1:*");
}

/* Bounded batches: with batch 10 and 200 messages waiting, it takes >= 20 turns. */
typedef struct turns_ctx {
    int got;
    uint64_t turns_seen;
} turns_ctx;

static void on_turns(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)f;
    (void)n;
    turns_ctx *c = user;
    if (++c->got == 200) {
        c->turns_seen = ipc_zwatch_get_stats(w).turns;
        ipc_zwatch_close(w, NULL, NULL);
    }
}

static void test_bounded_batches(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    void *ctx = zmq_ctx_new();
    char ep[64];
    void *pull = bind_any(ctx, ZMQ_PULL, "inproc://zw-batch", ep, sizeof ep);
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    zmq_connect(push, ep);
    for (int i = 0; i < 200; i++)
        zmq_send(push, "m", 1, 0);
    turns_ctx c = {0};
    ipc_zwatch_t *w;
    ipc_zwatch_params p = {.batch = 10};
    assert_int_equal(ipc_zwatch_init(&w, &loop, pull, &p, on_turns, &c), MOE_OK);
    watchdog wd;
    watchdog_start(&wd, &loop, 10000);
    uv_run(&loop, UV_RUN_DEFAULT);
    finish_loop(&loop, &wd);
    assert_int_equal(c.got, 200);
    assert_true(c.turns_seen >= 20);
    zmq_close(push);
    zmq_ctx_term(ctx);
}

/* ---------------------------------------------------------------------------------------- */
/* Interleaved: DEALER (watched) <-> ROUTER echo (watched), same loop. */
typedef struct ping_ctx {
    ipc_zwatch_t *dealer, *router;
    int sent, got, total, window;
    size_t size;
    bool ok;
    uint64_t queued_max;
} ping_ctx;

static moe_status send_seq(ping_ctx *c) {
    zmq_msg_t m;
    zmq_msg_init_size(&m, c->size);
    uint8_t *d = zmq_msg_data(&m);
    for (size_t i = 0; i < c->size; i++)
        d[i] = (uint8_t)(c->sent * 31 + (int)i);
    memcpy(d, &c->sent, 4);
    c->sent++;
    return ipc_zwatch_send(c->dealer, &m, 1);
}

static void on_echo(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)user;
    assert_int_equal(n, 2); /* identity, body */
    assert_int_equal(ipc_zwatch_send(w, f, 2), MOE_OK); /* the frames move back out */
}

static void on_reply(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)w;
    ping_ctx *c = user;
    assert_int_equal(n, 1);
    int seq;
    memcpy(&seq, zmq_msg_data(&f[0]), 4);
    const uint8_t *d = zmq_msg_data(&f[0]);
    if (seq != c->got || zmq_msg_size(&f[0]) != c->size)
        c->ok = false;
    for (size_t i = 4; i < c->size; i++)
        if (d[i] != (uint8_t)(seq * 31 + (int)i))
            c->ok = false;
    c->got++;
    if (c->sent < c->total)
        assert_int_equal(send_seq(c), MOE_OK);
    if (c->got == c->total) {
        c->queued_max = ipc_zwatch_get_stats(c->dealer).queued_max + ipc_zwatch_get_stats(c->router).queued_max;
        ipc_zwatch_close(c->dealer, NULL, NULL);
        ipc_zwatch_close(c->router, NULL, NULL);
    }
}

static void on_start_burst(uv_timer_t *t) {
    ping_ctx *c = t->data;
    for (int i = 0; i < c->window && c->sent < c->total; i++)
        assert_int_equal(send_seq(c), MOE_OK);
    uv_close((uv_handle_t *)t, NULL);
}

static void interleave(const char *pattern, int total, int window, size_t size, int hwm) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    void *ctx = zmq_ctx_new();
    char ep[256];
    void *router = zmq_socket(ctx, ZMQ_ROUTER);
    void *dealer = zmq_socket(ctx, ZMQ_DEALER);
    if (hwm) {
        zmq_setsockopt(router, ZMQ_SNDHWM, &hwm, sizeof hwm);
        zmq_setsockopt(router, ZMQ_RCVHWM, &hwm, sizeof hwm);
        zmq_setsockopt(dealer, ZMQ_SNDHWM, &hwm, sizeof hwm);
        zmq_setsockopt(dealer, ZMQ_RCVHWM, &hwm, sizeof hwm);
        int one = 1; /* ROUTER: EAGAIN at the HWM instead of a silent drop */
        zmq_setsockopt(router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    }
    assert_int_equal(zmq_bind(router, pattern), 0);
    size_t n = sizeof ep;
    zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, ep, &n);
    assert_int_equal(zmq_connect(dealer, ep), 0);
    ping_ctx c = {.total = total, .window = window, .size = size, .ok = true};
    ipc_zwatch_params p = {.batch = 16, .max_queue = 4096};
    assert_int_equal(ipc_zwatch_init(&c.router, &loop, router, &p, on_echo, &c), MOE_OK);
    assert_int_equal(ipc_zwatch_init(&c.dealer, &loop, dealer, &p, on_reply, &c), MOE_OK);
    uv_timer_t start;
    uv_timer_init(&loop, &start);
    start.data = &c;
    uv_timer_start(&start, on_start_burst, 20, 0);
    watchdog wd;
    watchdog_start(&wd, &loop, 20000);
    uv_run(&loop, UV_RUN_DEFAULT);
    finish_loop(&loop, &wd);
    assert_int_equal(c.got, total);
    assert_true(c.ok);
    if (hwm)
        assert_true(c.queued_max > 0); /* the out-queue was used, and drained */
    zmq_ctx_term(ctx);
}

static void test_interleave_one_socket_tcp(void **state) {
    (void)state;
    interleave("tcp://127.0.0.1:*", 1000, 1, 64, 0); /* strict ping-pong */
    interleave("tcp://127.0.0.1:*", 1000, 32, 256, 0); /* 32 in flight */
}

static void test_interleave_with_hwm_queue(void **state) {
    (void)state;
    /* 300 messages of 64 KiB at once through pipes of 2 messages: most meet EAGAIN and wait in
     * the out-queue, then flush in order as POLLOUT comes back. */
    interleave("tcp://127.0.0.1:*", 300, 300, 65536, 2);
    interleave("inproc://zw-hwm", 300, 300, 4096, 2);
}

/* ---------------------------------------------------------------------------------------- */
static void on_never(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)w, (void)f, (void)n, (void)user;
    fail_msg("no message expected");
}

typedef struct close_ctx {
    bool closed;
    ipc_zwatch_stats st;
} close_ctx;

static void on_closed(ipc_zwatch_t *w, void *user) {
    close_ctx *c = user;
    c->st = ipc_zwatch_get_stats(w);
    c->closed = true;
}

static void test_queue_full_busy_and_close_drops(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    void *ctx = zmq_ctx_new();
    void *push = zmq_socket(ctx, ZMQ_PUSH); /* no peer: every send is EAGAIN */
    ipc_zwatch_t *w;
    ipc_zwatch_params p = {.max_queue = 4};
    assert_int_equal(ipc_zwatch_init(&w, &loop, push, &p, on_never, NULL), MOE_OK);
    for (int i = 0; i < 4; i++) {
        const void *b[1] = {"abc"};
        size_t l[1] = {3};
        assert_int_equal(ipc_zwatch_send_bufs(w, b, l, 1), MOE_OK);
    }
    const void *b[1] = {"abc"};
    size_t l[1] = {3};
    assert_int_equal(ipc_zwatch_send_bufs(w, b, l, 1), MOE_ERR_BUSY);
    ipc_zwatch_stats st = ipc_zwatch_get_stats(w);
    assert_int_equal(st.queued_now, 4);
    assert_int_equal(st.dropped_out, 1);
    /* zero frames and too many frames are refused */
    zmq_msg_t f[IPC_ZWATCH_MAX_FRAMES + 1];
    for (int i = 0; i < IPC_ZWATCH_MAX_FRAMES + 1; i++)
        zmq_msg_init(&f[i]);
    assert_int_equal(ipc_zwatch_send(w, f, IPC_ZWATCH_MAX_FRAMES + 1), MOE_ERR_INVALID_ARG);
    watchdog wd;
    watchdog_start(&wd, &loop, 5000);
    uv_run(&loop, UV_RUN_NOWAIT); /* a few turns: nothing can go out */
    uv_run(&loop, UV_RUN_NOWAIT);
    close_ctx c = {0};
    ipc_zwatch_close(w, on_closed, &c);
    ipc_zwatch_close(w, on_closed, &c); /* idempotent */
    finish_loop(&loop, &wd);
    assert_true(c.closed);
    assert_int_equal(c.st.dropped_out, 5); /* 1 refused + 4 dropped at close */
    assert_int_equal(c.st.sent, 0);
    zmq_ctx_term(ctx); /* returns: the watcher closed the socket with linger 0 */
}

static void on_first_close(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)f;
    int *got = user;
    (*got) += n;
    ipc_zwatch_close(w, NULL, NULL);
}

static void test_close_inside_callback_and_many_frames(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    void *ctx = zmq_ctx_new();
    char ep[64];
    void *pull = bind_any(ctx, ZMQ_PULL, "inproc://zw-close", ep, sizeof ep);
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    zmq_connect(push, ep);
    /* first: a message of 9 frames (dropped), then 3 of one frame */
    for (int i = 0; i < 9; i++)
        zmq_send(push, "f", 1, i < 8 ? ZMQ_SNDMORE : 0);
    for (int i = 0; i < 3; i++)
        zmq_send(push, "g", 1, 0);
    int got = 0;
    ipc_zwatch_t *w;
    assert_int_equal(ipc_zwatch_init(&w, &loop, pull, NULL, on_first_close, &got), MOE_OK);
    watchdog wd;
    watchdog_start(&wd, &loop, 5000);
    uv_run(&loop, UV_RUN_DEFAULT);
    finish_loop(&loop, &wd);
    assert_int_equal(got, 1); /* the 9-frame message never reached the callback */
    zmq_close(push);
    zmq_ctx_term(ctx);
}

int main(void) {
    moe_log_init_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_1000_queued_before_loop_inproc),
        cmocka_unit_test(test_1000_queued_before_loop_tcp),
        cmocka_unit_test(test_bounded_batches),
        cmocka_unit_test(test_interleave_one_socket_tcp),
        cmocka_unit_test(test_interleave_with_hwm_queue),
        cmocka_unit_test(test_queue_full_busy_and_close_drops),
        cmocka_unit_test(test_close_inside_callback_and_many_frames),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
