/*
 * test_moeclient.c: libmoeclient end to end over real TCP sockets on 127.0.0.1 against the
 * test server (testsrv.h, a real libuv loop on its own thread): every op, the three SUBMIT
 * forms in every dtype (outputs compared bit for bit with the toy model computed here), the
 * server's refusals arriving as the right codes and messages, the asynchronous interface
 * (many in flight, completion order, limits), timeouts, BUSY, a server restart (in-flight
 * requests time out with a clear error, later ones succeed), and protocol versions both ways
 * (a client of another version gets a clear error, never a misparse).
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "ipc/moeclient.h"
#include "tests/ipc/testsrv.h"

static testsrv_t *start_server(const testsrv_opts *o) {
    testsrv_t *s = NULL;
    moe_status st = testsrv_start(&s, o);
    if (st != MOE_OK)
        fail_msg("testsrv_start: %s", moe_errmsg());
    return s;
}

static void stop_server(testsrv_t *s) { assert_int_equal(testsrv_stop(s), MOE_OK); /* loop closed cleanly */ }

static moec_client_t *connect_to(const char *ep, int32_t timeout_ms) {
    moec_options o;
    moec_options_default(&o);
    o.timeout_ms = timeout_ms;
    moec_client_t *c = NULL;
    assert_int_equal(moec_client_init(&c, ep, &o), MOEC_OK);
    return c;
}

/* Random inputs for the default toy model (E 8, K 2, H 64). */
typedef struct batch {
    int64_t T, H;
    int32_t dtype;
    void *x;
    int32_t *ids;
    float *w;
    float *logits;
    void *y;
    size_t y_bytes;
} batch;

static void batch_make(batch *b, int64_t T, int32_t dtype, uint64_t seed) {
    moe_rng r;
    moe_rng_seed(&r, seed);
    b->T = T;
    b->H = 64;
    b->dtype = dtype;
    size_t es = moec_dtype_size(dtype);
    b->x = malloc((size_t)(T * b->H) * es);
    for (int64_t i = 0; i < T * b->H; i++)
        moe_store_f32((moe_dtype)dtype, b->x, (size_t)i, moe_rng_normal(&r));
    b->ids = malloc(sizeof(int32_t) * (size_t)T * 2);
    b->w = malloc(sizeof(float) * (size_t)T * 2);
    b->logits = malloc(sizeof(float) * (size_t)T * 8);
    for (int64_t t = 0; t < T; t++) {
        b->ids[2 * t] = (int32_t)moe_rng_below(&r, 8);
        b->ids[2 * t + 1] = (b->ids[2 * t] + 1 + (int32_t)moe_rng_below(&r, 7)) % 8;
        b->w[2 * t] = (float)moe_rng_uniform(&r);
        b->w[2 * t + 1] = 1.0f - b->w[2 * t];
        for (int e = 0; e < 8; e++)
            b->logits[8 * t + e] = moe_rng_normal(&r);
    }
    b->y_bytes = (size_t)(T * b->H) * es;
    b->y = calloc(1, b->y_bytes);
}

static void batch_free(batch *b) {
    free(b->x);
    free(b->ids);
    free(b->w);
    free(b->logits);
    free(b->y);
}

static moec_request batch_request(const batch *b, int32_t layer, int mode /* 0 ids, 1 logits, 2 route */) {
    moec_request r;
    memset(&r, 0, sizeof r);
    r.layer = layer;
    r.dtype = b->dtype;
    r.n_tokens = b->T;
    r.hidden = b->H;
    r.x = b->x;
    if (mode == 0) {
        r.top_k = 2;
        r.topk_ids = b->ids;
        r.topk_w = b->w;
    } else if (mode == 1) {
        r.n_experts = 8;
        r.logits_dtype = MOEC_F32;
        r.logits = b->logits;
    }
    return r;
}

/* The expected y, from the toy model run here. */
static void expect_y(const batch *b, int32_t layer, int mode) {
    moe_tensor x = moe_tensor_view2(b->x, (moe_dtype)b->dtype, b->T, b->H);
    moe_tensor ids = moe_tensor_view2(b->ids, MOE_DTYPE_I32, b->T, 2);
    moe_tensor w = moe_tensor_view2(b->w, MOE_DTYPE_F32, b->T, 2);
    moe_tensor lg = moe_tensor_view2(b->logits, MOE_DTYPE_F32, b->T, 8);
    moe_tensor y;
    assert_int_equal(testsrv_compute(8, 2, layer, &x, mode == 0 ? &ids : NULL, mode == 0 ? &w : NULL,
                                     mode == 1 ? &lg : NULL, &y),
                     MOE_OK);
    assert_memory_equal(y.data, b->y, b->y_bytes);
    moe_tensor_free(&y);
}

/* ---------------------------------------------------------------------------------------- */
static void test_ping_info_stats(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    testsrv_t *s = start_server(&o);
    moec_client_t *c = connect_to(testsrv_endpoint(s), 5000);
    assert_int_equal(moec_ping(c, 0), MOEC_OK);
    assert_string_equal(moec_errmsg(c), "");
    char *js = NULL;
    assert_int_equal(moec_info(c, &js, 0), MOEC_OK);
    cJSON *doc = cJSON_Parse(js);
    assert_non_null(doc);
    assert_int_equal(cJSON_GetObjectItem(doc, "protocol")->valueint, 1);
    cJSON *m = cJSON_GetObjectItem(doc, "model");
    assert_int_equal(cJSON_GetObjectItem(m, "n_experts")->valueint, 8);
    assert_int_equal(cJSON_GetObjectItem(m, "hidden")->valueint, 64);
    assert_int_equal(cJSON_GetObjectItem(m, "top_k")->valueint, 2);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(m, "moe_layers")), 4);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(m, "can_route")));
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "limits"), "max_tokens")->valueint, 256);
    cJSON_Delete(doc);
    moec_free(js);
    batch b;
    batch_make(&b, 5, MOEC_F32, 1);
    moec_request r = batch_request(&b, 1, 0);
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_OK);
    batch_free(&b);
    assert_int_equal(moec_stats(c, &js, 0), MOEC_OK);
    doc = cJSON_Parse(js);
    assert_non_null(doc);
    cJSON *req = cJSON_GetObjectItem(doc, "requests");
    assert_int_equal(cJSON_GetObjectItem(req, "ok")->valueint, 1);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(req, "by_op"), "PING")->valueint, 1);
    assert_int_equal(cJSON_GetObjectItem(doc, "tokens")->valueint, 5);
    cJSON *pe = cJSON_GetObjectItem(doc, "per_expert_tokens");
    int sum = 0;
    for (int i = 0; i < cJSON_GetArraySize(pe); i++)
        sum += cJSON_GetArrayItem(pe, i)->valueint;
    assert_int_equal(sum, 10); /* T * K */
    cJSON_Delete(doc);
    moec_free(js);
    assert_int_equal(moec_info(c, NULL, 0), MOEC_ERR_INVALID_ARG);
    moec_client_free(c);
    stop_server(s);
}

static void test_submit_all_forms_and_dtypes(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    testsrv_t *s = start_server(&o);
    moec_client_t *c = connect_to(testsrv_endpoint(s), 5000);
    int32_t dts[3] = {MOEC_F32, MOEC_F16, MOEC_BF16};
    for (int d = 0; d < 3; d++) {
        for (int mode = 0; mode < 3; mode++) {
            batch b;
            batch_make(&b, 7 + d, dts[d], 100 + (uint64_t)(d * 3 + mode));
            moec_request r = batch_request(&b, mode + 1, mode);
            int st = moec_submit(c, &r, b.y, b.y_bytes, 0);
            if (st != MOEC_OK)
                fail_msg("dtype %d mode %d: %s: %s", dts[d], mode, moec_status_name(st), moec_errmsg(c));
            expect_y(&b, mode + 1, mode);
            batch_free(&b);
        }
    }
    assert_int_equal(testsrv_submits_ok(s), 9);
    moec_client_free(c);
    stop_server(s);
}

static void test_server_refusals(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    o.max_tokens = 16;
    o.no_route = true;
    testsrv_t *s = start_server(&o);
    moec_client_t *c = connect_to(testsrv_endpoint(s), 5000);
    batch b;
    batch_make(&b, 4, MOEC_BF16, 7);
    moec_request r = batch_request(&b, 0, 0);
    b.ids[5] = 8; /* token 2, slot 1 */
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_ERR_INVALID_ARG);
    assert_non_null(strstr(moec_errmsg(c), "expert id 8 out of range [0, 8) at token 2, slot 1"));
    b.ids[5] = 3;
    r.layer = 4;
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_ERR_INVALID_ARG);
    assert_non_null(strstr(moec_errmsg(c), "layer 4"));
    r.layer = 0;
    r.hidden = 32; /* x re-read as [8, 32]: the model's hidden is 64 */
    r.n_tokens = 8;
    r.top_k = 1;
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_ERR_INVALID_ARG);
    assert_non_null(strstr(moec_errmsg(c), "hidden size 32"));
    r = batch_request(&b, 0, 2); /* route: this server has no router */
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_ERR_UNSUPPORTED);
    batch_free(&b);
    batch_make(&b, 17, MOEC_F32, 8);
    r = batch_request(&b, 0, 0);
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_ERR_LIMIT);
    assert_non_null(strstr(moec_errmsg(c), "17 tokens"));
    /* checked on this side before sending */
    r.dtype = MOEC_I32;
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_ERR_INVALID_ARG);
    r = batch_request(&b, 0, 0);
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes - 1, 0), MOEC_ERR_INVALID_ARG);
    assert_non_null(strstr(moec_errmsg(c), "y buffer"));
    /* and the server still serves */
    r.n_tokens = 16;
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_OK);
    batch_free(&b);
    moec_client_free(c);
    stop_server(s);
}

static void test_async_many(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    o.delay_ms = 20; /* replies are held: many are truly in flight together */
    testsrv_t *s = start_server(&o);
    moec_options opt;
    moec_options_default(&opt);
    opt.max_in_flight = 64;
    moec_client_t *c = NULL;
    assert_int_equal(moec_client_init(&c, testsrv_endpoint(s), &opt), MOEC_OK);
    /* busy polling (looks without sleeping for 0.5 ms, then blocks): the same results */
    assert_int_equal(moec_client_set_busy_poll(c, -1), MOEC_ERR_INVALID_ARG);
    assert_non_null(strstr(moec_errmsg(c), "busy poll"));
    assert_int_equal(moec_client_set_busy_poll(NULL, 5), MOEC_ERR_INVALID_ARG);
    assert_int_equal(moec_client_set_busy_poll(c, 500), MOEC_OK);
    enum { N = 200 };
    batch *b = calloc(N, sizeof *b);
    uint64_t *ids = calloc(N, sizeof *ids);
    bool *seen = calloc(N, sizeof *seen);
    int sent = 0, got = 0, max_in_flight = 0;
    moec_result res;
    assert_int_equal(moec_collect(c, 0, &res), MOEC_ERR_NOT_FOUND);
    while (got < N) {
        while (sent < N && moec_in_flight(c) < 64) {
            batch_make(&b[sent], 1 + sent % 9, sent % 2 ? MOEC_BF16 : MOEC_F32, 1000 + (uint64_t)sent);
            moec_request r = batch_request(&b[sent], sent % 4, sent % 3);
            assert_int_equal(moec_submit_async(c, &r, b[sent].y, b[sent].y_bytes, 5000, &ids[sent]), MOEC_OK);
            sent++;
        }
        if (moec_in_flight(c) > max_in_flight)
            max_in_flight = moec_in_flight(c);
        if (sent == N && got == 0) {
            /* over the limit */
            batch extra;
            batch_make(&extra, 1, MOEC_F32, 5);
            moec_request r = batch_request(&extra, 0, 0);
            uint64_t id;
            if (moec_in_flight(c) == 64)
                assert_int_equal(moec_submit_async(c, &r, extra.y, extra.y_bytes, 0, &id), MOEC_ERR_BUSY);
            batch_free(&extra);
        }
        int st = moec_collect(c, -1, &res);
        assert_int_equal(st, MOEC_OK);
        int k = -1;
        for (int i = 0; i < sent; i++)
            if (ids[i] == res.request_id)
                k = i;
        assert_true(k >= 0);
        assert_false(seen[k]);
        seen[k] = true;
        if (res.status != MOEC_OK)
            fail_msg("request %d: %s %s", k, moec_status_name(res.status), res.message);
        assert_true(res.latency_ms >= 15.0);
        expect_y(&b[k], k % 4, k % 3);
        batch_free(&b[k]);
        got++;
    }
    assert_int_equal(max_in_flight, 64);
    assert_int_equal(moec_in_flight(c), 0);
    assert_int_equal(moec_collect(c, 10, &res), MOEC_ERR_NOT_FOUND);
    /* a synchronous call in the middle of asynchronous ones does not steal their results */
    batch x1, x2;
    batch_make(&x1, 3, MOEC_F32, 9);
    batch_make(&x2, 3, MOEC_F32, 10);
    moec_request r1 = batch_request(&x1, 0, 0), r2 = batch_request(&x2, 1, 0);
    uint64_t id1;
    assert_int_equal(moec_submit_async(c, &r1, x1.y, x1.y_bytes, 0, &id1), MOEC_OK);
    assert_int_equal(moec_submit(c, &r2, x2.y, x2.y_bytes, 0), MOEC_OK);
    assert_int_equal(moec_collect(c, 2000, &res), MOEC_OK);
    assert_int_equal(res.request_id, id1);
    expect_y(&x1, 0, 0);
    expect_y(&x2, 1, 0);
    batch_free(&x1);
    batch_free(&x2);
    free(b);
    free(ids);
    free(seen);
    moec_client_free(c);
    stop_server(s);
}

/* Requests of 64 KiB and more go out from the client's pool of reused buffers: requests that
 * grow and shrink (a kept buffer too small is replaced), one at a time and eight in flight,
 * each output bit-exact; a client freed with pooled requests still unanswered. */
static void test_large_requests(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    o.max_tokens = 8192;
    testsrv_t *s = start_server(&o);
    moec_client_t *c = connect_to(testsrv_endpoint(s), 10000);
    /* f32, H 64: 256 bytes a token, so T >= 256 is pooled; bf16 T = 300 is not */
    const int64_t Ts[] = {300, 1200, 280, 4000, 600, 2000, 300};
    for (size_t i = 0; i < sizeof Ts / sizeof Ts[0]; i++) {
        for (int dt = 0; dt < 2; dt++) {
            batch b;
            batch_make(&b, Ts[i], dt ? MOEC_BF16 : MOEC_F32, 300 + 10 * (uint64_t)i + (uint64_t)dt);
            moec_request r = batch_request(&b, (int32_t)(i % 4), (int)(i % 3));
            assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_OK);
            expect_y(&b, (int32_t)(i % 4), (int)(i % 3));
            batch_free(&b);
        }
    }
    enum { N = 40 };
    batch *b = calloc(N, sizeof *b);
    uint64_t *ids = calloc(N, sizeof *ids);
    int sent = 0, got = 0;
    while (got < N) {
        while (sent < N && moec_in_flight(c) < 8) {
            batch_make(&b[sent], Ts[sent % 7] + sent, MOEC_F32, 900 + (uint64_t)sent);
            moec_request r = batch_request(&b[sent], sent % 4, sent % 3);
            assert_int_equal(moec_submit_async(c, &r, b[sent].y, b[sent].y_bytes, 0, &ids[sent]), MOEC_OK);
            sent++;
        }
        moec_result res;
        assert_int_equal(moec_collect(c, -1, &res), MOEC_OK);
        int k = -1;
        for (int i = 0; i < sent; i++)
            if (ids[i] == res.request_id)
                k = i;
        assert_true(k >= 0);
        if (res.status != MOEC_OK)
            fail_msg("request %d: %s %s", k, moec_status_name(res.status), res.message);
        expect_y(&b[k], k % 4, k % 3);
        batch_free(&b[k]);
        got++;
    }
    free(b);
    free(ids);
    moec_client_free(c);
    stop_server(s);

    /* freed with pooled requests unanswered (the server holds its replies) */
    o.delay_ms = 2000;
    s = start_server(&o);
    c = connect_to(testsrv_endpoint(s), 10000);
    batch big[4];
    for (int i = 0; i < 4; i++) {
        batch_make(&big[i], 3000, MOEC_F32, 70 + (uint64_t)i);
        moec_request r = batch_request(&big[i], 0, 0);
        uint64_t id;
        assert_int_equal(moec_submit_async(c, &r, big[i].y, big[i].y_bytes, 0, &id), MOEC_OK);
    }
    assert_int_equal(moec_in_flight(c), 4);
    moec_client_free(c);
    for (int i = 0; i < 4; i++)
        batch_free(&big[i]);
    stop_server(s);
}

static void test_timeout_and_busy(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    o.delay_ms = 800; /* far from the 100 ms timeout: a loaded machine cannot blur the two */
    o.max_queue = 2;
    testsrv_t *s = start_server(&o);
    moec_client_t *c = connect_to(testsrv_endpoint(s), 5000);
    batch b;
    batch_make(&b, 2, MOEC_F32, 3);
    moec_request r = batch_request(&b, 0, 0);
    uint64_t t0 = moe_now_ns();
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 100), MOEC_ERR_TIMEOUT);
    double dt = (double)(moe_now_ns() - t0) * 1e-6;
    assert_true(dt >= 95.0 && dt < 700.0);
    assert_non_null(strstr(moec_errmsg(c), "no reply within 100 ms"));
    /* The late reply of that request arrives and is dropped; this one gets its own. */
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 3000), MOEC_OK);
    expect_y(&b, 0, 0);
    /* BUSY: 2 held at most */
    batch more[5];
    int ok = 0, busy = 0;
    for (int i = 0; i < 5; i++) {
        batch_make(&more[i], 1, MOEC_F32, 50 + (uint64_t)i);
        moec_request ri = batch_request(&more[i], 0, 0);
        uint64_t id;
        assert_int_equal(moec_submit_async(c, &ri, more[i].y, more[i].y_bytes, 3000, &id), MOEC_OK);
    }
    moec_result res;
    while (moec_collect(c, -1, &res) == MOEC_OK) {
        if (res.status == MOEC_OK)
            ok++;
        else if (res.status == MOEC_ERR_BUSY)
            busy++;
        else
            fail_msg("unexpected %s: %s", moec_status_name(res.status), res.message);
        if (ok + busy == 5)
            break;
    }
    assert_int_equal(ok, 2);
    assert_int_equal(busy, 3);
    for (int i = 0; i < 5; i++)
        batch_free(&more[i]);
    batch_free(&b);
    moec_client_free(c);
    stop_server(s);
}

static void test_server_restart(void **state) {
    (void)state;
    testsrv_opts o;
    testsrv_opts_default(&o);
    o.delay_ms = 400;
    testsrv_t *s = start_server(&o);
    char ep[256];
    snprintf(ep, sizeof ep, "%s", testsrv_endpoint(s));
    moec_client_t *c = connect_to(ep, 5000);
    batch b;
    batch_make(&b, 3, MOEC_F32, 11);
    moec_request r = batch_request(&b, 2, 0);
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 0), MOEC_OK);
    /* one in flight when the server goes away */
    uint64_t id;
    assert_int_equal(moec_submit_async(c, &r, b.y, b.y_bytes, 1500, &id), MOEC_OK);
    moec_result res;
    for (int i = 0; i < 100 && testsrv_requests(s) < 2; i++)
        assert_int_equal(moec_collect(c, 10, &res), MOEC_ERR_TIMEOUT); /* let it reach the server */
    assert_int_equal(testsrv_requests(s), 2);
    stop_server(s);
    /* the same endpoint, a new server process-like instance */
    o.endpoint = ep;
    o.delay_ms = 0;
    s = start_server(&o);
    assert_int_equal(moec_collect(c, -1, &res), MOEC_OK);
    assert_int_equal(res.request_id, id);
    assert_int_equal(res.status, MOEC_ERR_TIMEOUT);
    assert_non_null(strstr(res.message, "restarted"));
    /* the connection came back by itself */
    memset(b.y, 0, b.y_bytes);
    assert_int_equal(moec_submit(c, &r, b.y, b.y_bytes, 5000), MOEC_OK);
    expect_y(&b, 2, 0);
    batch_free(&b);
    moec_client_free(c);
    stop_server(s);
}

/* A fake server that answers every request with the same bytes but another version. */
typedef struct fake_srv {
    void *ctx, *sock;
    char ep[256];
    pthread_t thr;
} fake_srv;

static void *fake_main(void *arg) {
    fake_srv *f = arg;
    zmq_msg_t id, body;
    zmq_msg_init(&id);
    zmq_msg_init(&body);
    if (zmq_msg_recv(&id, f->sock, 0) >= 0 && zmq_msg_recv(&body, f->sock, 0) >= 0) {
        ipc_msg m;
        ipc_msg_init(&m, IPC_OP_PING, 0);
        memcpy(&m.request_id, (const uint8_t *)zmq_msg_data(&body) + 16, 8);
        m.flags = IPC_FLAG_REPLY;
        uint8_t buf[64];
        ipc_encode(&m, buf, sizeof buf, NULL);
        buf[4] = 2; /* version 2 */
        zmq_msg_send(&id, f->sock, ZMQ_SNDMORE);
        zmq_send(f->sock, buf, sizeof buf, 0);
    }
    zmq_msg_close(&id);
    zmq_msg_close(&body);
    return NULL;
}

static void test_protocol_versions(void **state) {
    (void)state;
    /* 1. A server of another version answers this client: a clear error, not a misparse. */
    fake_srv f;
    f.ctx = zmq_ctx_new();
    f.sock = zmq_socket(f.ctx, ZMQ_ROUTER);
    assert_int_equal(zmq_bind(f.sock, "tcp://127.0.0.1:*"), 0);
    size_t n = sizeof f.ep;
    zmq_getsockopt(f.sock, ZMQ_LAST_ENDPOINT, f.ep, &n);
    pthread_create(&f.thr, NULL, fake_main, &f);
    moec_client_t *c = connect_to(f.ep, 3000);
    assert_int_equal(moec_ping(c, 0), MOEC_ERR_PROTOCOL);
    assert_non_null(strstr(moec_errmsg(c), "protocol version 2"));
    moec_client_free(c);
    pthread_join(f.thr, NULL);
    int zero = 0;
    zmq_setsockopt(f.sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(f.sock);
    zmq_ctx_term(f.ctx);

    /* 2. A client of another version talks to the server: it gets a v1 error reply naming
     * both versions, with its request id; then garbage; the server keeps serving. */
    testsrv_opts o;
    testsrv_opts_default(&o);
    testsrv_t *s = start_server(&o);
    void *ctx = zmq_ctx_new();
    void *d = zmq_socket(ctx, ZMQ_DEALER);
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    int rcvtimeo = 3000;
    zmq_setsockopt(d, ZMQ_RCVTIMEO, &rcvtimeo, sizeof rcvtimeo);
    assert_int_equal(zmq_connect(d, testsrv_endpoint(s)), 0);
    ipc_msg m;
    ipc_msg_init(&m, IPC_OP_PING, 4242);
    uint8_t req[64];
    ipc_encode(&m, req, sizeof req, NULL);
    req[4] = 2;
    assert_int_equal(zmq_send(d, req, sizeof req, 0), 64);
    uint8_t rep[8192];
    int rn = zmq_recv(d, rep, sizeof rep, 0);
    assert_true(rn > 0);
    ipc_limits l = ipc_limits_default();
    l.accept = IPC_ACCEPT_REPLIES;
    ipc_msg dm;
    assert_int_equal(ipc_decode(rep, (size_t)rn, &l, &dm), MOE_OK);
    assert_int_equal(dm.request_id, 4242);
    assert_int_equal(dm.status, MOE_ERR_PROTOCOL);
    const ipc_section *t = ipc_msg_find(&dm, IPC_SEC_TEXT);
    assert_non_null(memmem(t->data, t->nbytes, "protocol version 2 is not supported", 35));
    assert_int_equal(zmq_send(d, "GET / HTTP/1.1\r\n\r\n", 18, 0), 18);
    rn = zmq_recv(d, rep, sizeof rep, 0);
    assert_true(rn > 0);
    assert_int_equal(ipc_decode(rep, (size_t)rn, &l, &dm), MOE_OK);
    assert_int_equal(dm.status, MOE_ERR_PROTOCOL);
    t = ipc_msg_find(&dm, IPC_SEC_TEXT);
    assert_non_null(memmem(t->data, t->nbytes, "not a moe-engine message", 24));
    zmq_close(d);
    zmq_ctx_term(ctx);
    c = connect_to(testsrv_endpoint(s), 3000);
    assert_int_equal(moec_ping(c, 0), MOEC_OK);
    moec_client_free(c);
    stop_server(s);
}

static void test_status_names(void **state) {
    (void)state;
    assert_string_equal(moec_status_name(MOEC_ERR_TIMEOUT), "MOEC_ERR_TIMEOUT");
    assert_string_equal(moec_status_name(MOEC_OK), "MOEC_OK");
    assert_string_equal(moec_status_name(-99), "MOEC_ERR_UNKNOWN");
    for (int st = 0; st >= MOEC_ERR_LIMIT; st--) {
        /* the client's names are the server's with MOEC_ for MOE_ */
        char want[64];
        snprintf(want, sizeof want, "MOEC_%s", moe_status_name((moe_status)st) + 4);
        assert_string_equal(moec_status_name(st), want);
    }
    assert_int_equal(moec_dtype_size(MOEC_BF16), 2);
    moec_client_t *c = NULL;
    assert_int_equal(moec_client_init(&c, "", NULL), MOEC_ERR_INVALID_ARG);
    assert_int_equal(moec_client_init(&c, "nonsense://x", NULL), MOEC_ERR_INVALID_ARG);
    moec_options o;
    moec_options_default(&o);
    o.server_public_key = "too short";
    assert_int_equal(moec_client_init(&c, "tcp://127.0.0.1:1", &o), MOEC_ERR_INVALID_ARG);
}

int main(void) {
    moe_log_init_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ping_info_stats),   cmocka_unit_test(test_submit_all_forms_and_dtypes),
        cmocka_unit_test(test_server_refusals),   cmocka_unit_test(test_async_many),
        cmocka_unit_test(test_large_requests),
        cmocka_unit_test(test_timeout_and_busy),  cmocka_unit_test(test_server_restart),
        cmocka_unit_test(test_protocol_versions), cmocka_unit_test(test_status_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
