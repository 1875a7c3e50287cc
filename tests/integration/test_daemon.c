/*
 * test_daemon.c: the real daemon, real processes, real sockets. Each test starts
 * `moe-engine serve` on the embedded default model (Qwen2-MoE shape: E=16, K=4, H=256, bf16,
 * a gated shared expert, MoE layers 0 and 1) and talks to it with raw protocol messages:
 *   - outputs against the reference kernels computed in-process from the same checkpoint,
 *     for ids, logits and hidden-state routing, single and pipelined;
 *   - identical output bits with 1, 2, 3 and 4 workers, both placements and both data paths
 *     (shared memory, ZeroMQ messages);
 *   - more than 30 malformed or hostile messages, each answered with an error, and a good
 *     request served after each;
 *   - kill -9 of a worker with requests in flight: every request answered, later ones served;
 *   - SIGTERM with requests in flight: every request answered, exit 0, no orphan worker;
 *   - a flood past the queue bound: BUSY replies, every request answered, memory bounded;
 *   - /health and /metrics.
 */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <zmq.h>

#include "tests/integration/harness.h"

#define H 256
#define E 16
#define K 4

/* ------------------------------------------------------------------------------------------
 * Request builders.
 * ---------------------------------------------------------------------------------------- */
typedef struct req {
    moe_tensor x, ids, w, logits;
} req;

static void req_make(req *r, int64_t T, uint64_t seed, int mode /* 0 ids, 1 logits, 2 hidden */) {
    memset(r, 0, sizeof *r);
    moe_rng g;
    moe_rng_seed(&g, seed);
    assert_int_equal(moe_tensor_alloc(&r->x, MOE_DTYPE_BF16, 2, (int64_t[]){T, H}), MOE_OK);
    for (int64_t i = 0; i < T * H; i++)
        moe_store_f32(MOE_DTYPE_BF16, r->x.data, (size_t)i, moe_rng_normal(&g));
    if (mode == 0) {
        assert_int_equal(moe_tensor_alloc(&r->ids, MOE_DTYPE_I32, 2, (int64_t[]){T, K}), MOE_OK);
        assert_int_equal(moe_tensor_alloc(&r->w, MOE_DTYPE_F32, 2, (int64_t[]){T, K}), MOE_OK);
        int32_t *id = r->ids.data;
        float *w = r->w.data;
        for (int64_t t = 0; t < T; t++) {
            /* K distinct experts */
            for (int k = 0; k < K; k++) {
                int32_t e;
                bool dup;
                do {
                    e = (int32_t)moe_rng_below(&g, E);
                    dup = false;
                    for (int j = 0; j < k; j++)
                        dup |= id[t * K + j] == e;
                } while (dup);
                id[t * K + k] = e;
                w[t * K + k] = (float)moe_rng_uniform(&g);
            }
        }
    } else if (mode == 1) {
        assert_int_equal(moe_tensor_alloc(&r->logits, MOE_DTYPE_F32, 2, (int64_t[]){T, E}), MOE_OK);
        for (int64_t i = 0; i < T * E; i++)
            ((float *)r->logits.data)[i] = moe_rng_normal(&g);
    }
}

static void req_free(req *r) {
    moe_tensor_free(&r->x);
    moe_tensor_free(&r->ids);
    moe_tensor_free(&r->w);
    moe_tensor_free(&r->logits);
}

static void req_msg(const req *r, uint64_t id, int32_t layer, ipc_msg *m) {
    assert_int_equal(ipc_submit_init(m, id, layer, &r->x, r->ids.data ? &r->ids : NULL, r->w.data ? &r->w : NULL,
                                     r->logits.data ? &r->logits : NULL),
                     MOE_OK);
}

/* Encodes a request into a malloc'd buffer (for byte-level mutations). */
static uint8_t *req_bytes(const req *r, uint64_t id, int32_t layer, size_t *len) {
    ipc_msg m;
    req_msg(r, id, layer, &m);
    void *buf = NULL;
    assert_int_equal(ipc_encode_alloc(&m, &buf, len), MOE_OK);
    return buf;
}

static void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void wr64(uint8_t *p, uint64_t v) {
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

/* Submits and waits for the reply; returns its status; y (T*H floats) filled on success. */
static int32_t submit(h_client *c, const req *r, uint64_t id, int32_t layer, float *y) {
    ipc_msg m;
    req_msg(r, id, layer, &m);
    assert_true(h_send_msg(c, &m));
    void *buf = NULL;
    size_t len;
    ipc_msg rep;
    assert_true(h_recv(c, 20000, &buf, &len, &rep));
    assert_true(rep.request_id == id);
    int32_t st = rep.status;
    if (st == 0 && y) {
        const ipc_section *s = ipc_msg_find(&rep, IPC_SEC_Y);
        assert_non_null(s);
        assert_int_equal(s->dtype, MOE_DTYPE_BF16);
        assert_int_equal(s->shape[0], r->x.shape[0]);
        assert_int_equal(s->shape[1], H);
        moe_to_f32(MOE_DTYPE_BF16, s->data, y, (size_t)(r->x.shape[0] * H));
    }
    moe_free(buf);
    return st;
}

static const char *model_dir(const daemon_proc *d, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/moe-engine-default-model-v1", d->rundir);
    return buf;
}

/* ------------------------------------------------------------------------------------------
 * Tests.
 * ---------------------------------------------------------------------------------------- */
static void test_serve_and_reference(void **state) {
    (void)state;
    daemon_proc d;
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "2", NULL}, 60));
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    /* PING and INFO */
    ipc_msg m;
    ipc_msg_init(&m, IPC_OP_PING, 7);
    assert_true(h_send_msg(&c, &m));
    void *buf = NULL;
    size_t len;
    ipc_msg rep;
    assert_true(h_recv(&c, 5000, &buf, &len, &rep));
    assert_int_equal(rep.status, 0);
    assert_int_equal(rep.op, IPC_OP_PING);
    assert_true(rep.request_id == 7);
    moe_free(buf);
    ipc_msg_init(&m, IPC_OP_INFO, 8);
    assert_true(h_send_msg(&c, &m));
    assert_true(h_recv(&c, 5000, &buf, &len, &rep));
    char *js = h_json(&rep);
    assert_non_null(js);
    assert_non_null(strstr(js, "\"family\":\"qwen2_moe\""));
    assert_non_null(strstr(js, "\"n_experts\":16"));
    assert_non_null(strstr(js, "\"top_k\":4"));
    assert_non_null(strstr(js, "\"hidden\":256"));
    assert_non_null(strstr(js, "\"world_size\":2"));
    assert_non_null(strstr(js, "\"moe_layers\":[0,1]"));
    free(js);
    moe_free(buf);

    char dir[512];
    model_dir(&d, dir, sizeof dir);
    const int64_t Ts[] = {1, 5, 33};
    for (int mode = 0; mode < 3; mode++) {
        for (int i = 0; i < 3; i++) {
            req r;
            req_make(&r, Ts[i], 100 + (uint64_t)(mode * 10 + i), mode);
            int32_t layer = i % 2;
            float *y = malloc(sizeof(float) * (size_t)(Ts[i] * H));
            float *ref = malloc(sizeof(float) * (size_t)(Ts[i] * H));
            assert_int_equal(submit(&c, &r, 1000 + (uint64_t)i, layer, y), 0);
            assert_true(h_reference(dir, layer, &r.x, r.ids.data ? &r.ids : NULL, r.w.data ? &r.w : NULL,
                                    r.logits.data ? &r.logits : NULL, ref));
            double err = h_rel_err(y, ref, (size_t)(Ts[i] * H));
            fprintf(stderr, "mode %d T %lld layer %d: rel err %.2e\n", mode, (long long)Ts[i], (int)layer, err);
            assert_true(err <= 1e-2);
            free(y);
            free(ref);
            req_free(&r);
        }
    }

    /* STATS "path": one request at a time makes one step each; the parts of each step's time
     * are nested inside the client's own round trips, so their sum cannot exceed the client's
     * wall time, and the worker's compute is part of it. */
    {
        static const char *const parts[] = {"\"queue_us_sum\"",          "\"stage_us_sum\"",
                                            "\"to_worker_us_sum\"",      "\"worker_start_us_sum\"",
                                            "\"worker_compute_us_sum\"", "\"worker_answer_us_sum\"",
                                            "\"from_worker_us_sum\"",    "\"reply_us_sum\""};
        char *a = h_stats(&c, 5000), *b;
        assert_non_null(a);
        const char *pa = strstr(a, "\"path\":");
        assert_non_null(pa);
        req r;
        req_make(&r, 7, 4242, 0);
        enum { NS = 12 };
        double t0 = moe_now_s();
        for (int i = 0; i < NS; i++)
            assert_int_equal(submit(&c, &r, 3000 + (uint64_t)i, i % 2, NULL), 0);
        const double wall_us = (moe_now_s() - t0) * 1e6;
        b = h_stats(&c, 5000);
        assert_non_null(b);
        const char *pb = strstr(b, "\"path\":");
        assert_non_null(pb);
        assert_int_equal((int)(h_json_num(pb, "\"steps\"") - h_json_num(pa, "\"steps\"")), NS);
        double sum = 0;
        for (int k = 0; k < 8; k++) {
            const double dv = h_json_num(pb, parts[k]) - h_json_num(pa, parts[k]);
            assert_true(dv >= 0);
            sum += dv;
        }
        const double comp = h_json_num(pb, parts[4]) - h_json_num(pa, parts[4]);
        fprintf(stderr, "path: %d steps, %.0f us of %.0f us client wall time inside the engine, compute %.0f us\n",
                NS, sum, wall_us, comp);
        assert_true(comp > 0);
        assert_true(sum > comp && sum <= wall_us);
        free(a);
        free(b);
        req_free(&r);
    }

    /* Pipelined: 64 requests of both layers in flight at once; each answered once, by id. */
    enum { NP = 64 };
    req rs[NP];
    for (int i = 0; i < NP; i++) {
        req_make(&rs[i], 1 + i % 9, 500 + (uint64_t)i, i % 3);
        ipc_msg q;
        req_msg(&rs[i], 10000 + (uint64_t)i, i % 2, &q);
        assert_true(h_send_msg(&c, &q));
    }
    int seen[NP] = {0};
    void *got[NP] = {0};
    for (int i = 0; i < NP; i++) {
        assert_true(h_recv(&c, 20000, &buf, &len, &rep));
        assert_int_equal(rep.status, 0);
        int idx = (int)(rep.request_id - 10000);
        assert_true(idx >= 0 && idx < NP);
        assert_int_equal(seen[idx], 0);
        seen[idx] = 1;
        assert_int_equal(rep.n_tokens, rs[idx].x.shape[0]);
        const ipc_section *ys = ipc_msg_find(&rep, IPC_SEC_Y);
        assert_non_null(ys);
        got[idx] = malloc(ys->nbytes);
        memcpy(got[idx], ys->data, ys->nbytes);
        moe_free(buf);
    }
    /* the same request alone gives the same bits (coalescing does not change results) */
    for (int i = 0; i < NP; i += 7) {
        ipc_msg q;
        req_msg(&rs[i], 20000 + (uint64_t)i, i % 2, &q);
        assert_true(h_send_msg(&c, &q));
        assert_true(h_recv(&c, 20000, &buf, &len, &rep));
        assert_int_equal(rep.status, 0);
        const ipc_section *ys = ipc_msg_find(&rep, IPC_SEC_Y);
        assert_non_null(ys);
        assert_memory_equal(ys->data, got[i], ys->nbytes);
        moe_free(buf);
    }
    for (int i = 0; i < NP; i++)
        free(got[i]);
    for (int i = 0; i < NP; i++)
        req_free(&rs[i]);
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&d, 20), 0);
}

/* The same requests, alone and pipelined together, on 1..4 workers and both placements: the
 * same output bits everywhere. */
static void test_bits_across_world_sizes(void **state) {
    (void)state;
    enum { NR = 12 };
    req rs[NR];
    size_t total = 0;
    for (int i = 0; i < NR; i++) {
        /* three large ones (logits, hidden states, ids): a step of them is over 1 MiB of inputs,
         * which the coordinator copies into its slot in parts, split by tokens across requests */
        const int64_t T = i == 4 ? 600 : i == 5 ? 900 : i == 6 ? 500 : 1 + (i * 5) % 17;
        req_make(&rs[i], T, 900 + (uint64_t)i, i % 3);
        total += (size_t)rs[i].x.shape[0] * H * 2;
    }
    uint8_t *base = NULL;
    /* workers, placement, data path (shared memory, or the tensors in ZeroMQ messages), busy
     * polling (coordinator and workers look for messages without sleeping for that many us) */
    const char *configs[][4] = {{"1", "contiguous", "shm", "0"},   {"2", "contiguous", "zmq", "0"},
                                {"3", "round-robin", "shm", "0"},  {"4", "contiguous", "shm", "0"},
                                {"4", "round-robin", "zmq", "0"}, {"1", "contiguous", "zmq", "0"},
                                {"2", "round-robin", "shm", "300"}};
    for (size_t ci = 0; ci < sizeof configs / sizeof configs[0]; ci++) {
        daemon_proc d;
        assert_true(h_daemon_start(&d, (const char *[]){"--workers", configs[ci][0], "--placement", configs[ci][1],
                                                        "--data-path", configs[ci][2], "--busy-poll-us",
                                                        configs[ci][3], NULL},
                                   60));
        h_client c;
        assert_true(h_client_open(&c, d.endpoint));
        for (int i = 0; i < NR; i++) { /* all in flight together: coalesced into steps */
            ipc_msg q;
            req_msg(&rs[i], (uint64_t)i, 1, &q);
            assert_true(h_send_msg(&c, &q));
        }
        uint8_t *out = calloc(1, total);
        size_t off[NR];
        size_t o = 0;
        for (int i = 0; i < NR; i++) {
            off[i] = o;
            o += (size_t)rs[i].x.shape[0] * H * 2;
        }
        for (int i = 0; i < NR; i++) {
            void *buf = NULL;
            size_t len;
            ipc_msg rep;
            assert_true(h_recv(&c, 20000, &buf, &len, &rep));
            assert_int_equal(rep.status, 0);
            const ipc_section *s = ipc_msg_find(&rep, IPC_SEC_Y);
            assert_non_null(s);
            memcpy(out + off[rep.request_id], s->data, s->nbytes);
            moe_free(buf);
        }
        if (!base) {
            base = out;
        } else {
            if (memcmp(out, base, total) != 0)
                fprintf(stderr, "outputs differ with %s workers, %s placement, %s data path\n", configs[ci][0],
                        configs[ci][1], configs[ci][2]);
            assert_memory_equal(out, base, total);
            free(out);
        }
        /* one request alone: its bits equal its bits in company (bf16 -> f32 is exact) */
        const size_t n3 = (size_t)(rs[3].x.shape[0] * H);
        float *alone = malloc(sizeof(float) * n3), *company = malloc(sizeof(float) * n3);
        assert_int_equal(submit(&c, &rs[3], 99, 1, alone), 0);
        moe_to_f32(MOE_DTYPE_BF16, base + off[3], company, n3);
        assert_memory_equal(alone, company, sizeof(float) * n3);
        free(alone);
        free(company);
        h_client_close(&c);
        assert_int_equal(h_daemon_stop(&d, 20), 0);
    }
    free(base);
    for (int i = 0; i < NR; i++)
        req_free(&rs[i]);
}

/* ------------------------------------------------------------------------------------------
 * Malformed and hostile messages.
 * ---------------------------------------------------------------------------------------- */
typedef struct bad_case {
    const char *name;
    uint8_t *buf;
    size_t len;
    int32_t want; /* expected status, or 1 for "any error" */
} bad_case;

static void good_request_served(h_client *c, const char *after) {
    req r;
    req_make(&r, 3, 4242, 0);
    int32_t st = submit(c, &r, 777777, 0, NULL);
    if (st != 0)
        fprintf(stderr, "a good request failed (%d) after case '%s'\n", (int)st, after);
    assert_int_equal(st, 0);
    req_free(&r);
}

static void test_malformed_requests(void **state) {
    (void)state;
    daemon_proc d;
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "2", "--layers", "0", "--max-tokens", "64", NULL}, 60));
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    bad_case cases[48];
    int n = 0;
    req r;
    req_make(&r, 4, 1, 0);
    size_t len;
    uint8_t *good = req_bytes(&r, 5, 0, &len);
#define CASE(nm, want_, ...)                                  \
    do {                                                      \
        uint8_t *b = malloc(len + 4096);                      \
        memcpy(b, good, len);                                 \
        size_t l = len;                                       \
        __VA_ARGS__;                                          \
        cases[n++] = (bad_case){(nm), b, l, (want_)};         \
    } while (0)
    /* sections: x at 64*(1+3)=256 .. ; descriptors at 64, 128, 192 */
    CASE("empty frame", 1, l = 0);
    CASE("three bytes", 1, l = 3);
    CASE("bad magic", MOE_ERR_PROTOCOL, wr32(b, 0x12345678));
    CASE("version 2", MOE_ERR_PROTOCOL, b[4] = 2);
    CASE("version 0", MOE_ERR_PROTOCOL, b[4] = 0);
    CASE("unknown op", MOE_ERR_PROTOCOL, b[6] = 0x7f);
    CASE("internal op from a client", MOE_ERR_PROTOCOL, b[6] = 0x83);
    CASE("reply flag in a request", 1, b[8] = 1);
    CASE("unknown flag", 1, b[9] = 0x80);
    CASE("truncated frame", 1, l = len / 2);
    CASE("frame longer than total_bytes", 1, l = len + 64; memset(b + len, 0, 64));
    CASE("total_bytes past the frame", 1, wr64(b + 24, len + 4096));
    CASE("too many sections", 1, b[53] = 17);
    CASE("header_bytes inconsistent", 1, wr32(b + 12, 64));
    CASE("section offset past the end", 1, wr64(b + 64 + 8, len + 1000000));
    CASE("section length past the end", 1, wr64(b + 64 + 16, (uint64_t)1 << 40));
    CASE("misaligned section offset", 1, wr64(b + 64 + 8, 256 + 8));
    CASE("overlapping sections", 1, { uint64_t o; memcpy(&o, b + 64 + 8, 8); wr64(b + 128 + 8, o); });
    CASE("huge T", 1, wr32(b + 40, 0x7fffffff));
    CASE("T over max-tokens", 1, wr32(b + 40, 65));
    CASE("x dtype f32 for a bf16 model", 1, b[52] = MOE_DTYPE_F32; b[64 + 2] = MOE_DTYPE_F32);
    CASE("invalid dtype 9", 1, b[52] = 9; b[64 + 2] = 9);
    CASE("expert id = E", MOE_ERR_INVALID_ARG, { uint64_t o; memcpy(&o, b + 128 + 8, 8); wr32(b + o, E); });
    CASE("expert id negative", MOE_ERR_INVALID_ARG, { uint64_t o; memcpy(&o, b + 128 + 8, 8); wr32(b + o + 4, 0xffffffffu); });
    CASE("NaN weight", MOE_ERR_INVALID_ARG, { uint64_t o; memcpy(&o, b + 192 + 8, 8); wr32(b + o, 0x7fc00000u); });
    CASE("Inf weight", MOE_ERR_INVALID_ARG, { uint64_t o; memcpy(&o, b + 192 + 8, 8); wr32(b + o + 8, 0x7f800000u); });
    CASE("unknown layer", 1, wr32(b + 36, 9));
    CASE("negative layer", 1, wr32(b + 36, 0xffffffffu));
    CASE("layer not served", MOE_ERR_NOT_FOUND, wr32(b + 36, 1));
    CASE("hidden size mismatch", 1, wr32(b + 44, H + 1));
    CASE("top-k mismatch", 1, wr32(b + 48, K + 1));
    CASE("ids without weights", 1, b[53] = 2; wr32(b + 12, 64 * 3));
    CASE("ids shape disagrees with T", 1, wr64(b + 128 + 24, 5));
    CASE("reserved bytes set", 1, b[60] = 1);
    CASE("nonzero padding shape", 1, wr64(b + 64 + 24 + 16, 3));
    /* Two frames in one message. */
    int n_single = n;
    for (int i = 0; i < n; i++) {
        assert_true(h_send_raw(&c, cases[i].buf, cases[i].len));
        void *buf = NULL;
        size_t rl;
        ipc_msg rep;
        if (!h_recv(&c, 10000, &buf, &rl, &rep)) {
            fprintf(stderr, "no reply to case '%s'\n", cases[i].name);
            fail();
        }
        if (rep.status >= 0 || (cases[i].want != 1 && rep.status != cases[i].want)) {
            const ipc_section *t = ipc_msg_find(&rep, IPC_SEC_TEXT);
            fprintf(stderr, "case '%s': status %d (want %d): %.*s\n", cases[i].name, (int)rep.status,
                    (int)cases[i].want, t ? (int)t->nbytes : 0, t ? (const char *)t->data : "");
        }
        assert_true(rep.status < 0);
        if (cases[i].want != 1)
            assert_int_equal(rep.status, cases[i].want);
        assert_non_null(ipc_msg_find(&rep, IPC_SEC_TEXT));
        moe_free(buf);
        good_request_served(&c, cases[i].name);
    }
    /* a multipart message */
    assert_int_equal(zmq_send(c.sock, good, len, ZMQ_SNDMORE), (int)len);
    assert_int_equal(zmq_send(c.sock, good, len, 0), (int)len);
    {
        void *buf = NULL;
        size_t rl;
        ipc_msg rep;
        assert_true(h_recv(&c, 10000, &buf, &rl, &rep));
        assert_true(rep.status < 0);
        moe_free(buf);
        good_request_served(&c, "two frames");
    }
    fprintf(stderr, "%d malformed messages, each answered with an error\n", n_single + 1);
    assert_true(n_single + 1 >= 30);
    /* Over max-msg-bytes: ZeroMQ drops that connection (no reply is possible); others go on. */
    for (int i = 0; i < n; i++)
        free(cases[i].buf);
    moe_free(good);
    req_free(&r);
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&d, 20), 0);
}

/* ------------------------------------------------------------------------------------------
 * Faults.
 * ---------------------------------------------------------------------------------------- */
static void test_kill_worker_in_flight(void **state) {
    (void)state;
    daemon_proc d;
    /* busy polling: STEP and RESULT go through the control rings, which a restart resets */
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "3", "--max-inflight-steps", "2", "--max-step-tokens",
                                                    "8192", "--busy-poll-us", "200", NULL},
                               60));
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    enum { NQ = 120 };
    req rs[NQ];
    for (int i = 0; i < NQ; i++)
        req_make(&rs[i], 64, 3000 + (uint64_t)i, i % 3);
    pid_t kids[8];
    int nk = h_daemon_workers(&d, kids, 8);
    assert_int_equal(nk, 3);
    for (int i = 0; i < NQ; i++) {
        ipc_msg q;
        req_msg(&rs[i], (uint64_t)i, i % 2, &q);
        assert_true(h_send_msg(&c, &q));
    }
    /* The kill lands while a step is in flight: a second connection watches STATS for one (a
     * step of many 64-token requests takes milliseconds on these CPU workers; killing at a
     * fixed point of the sends raced with them, and once every request was served before the
     * kill). */
    h_client c2;
    assert_true(h_client_open(&c2, d.endpoint));
    bool in_flight = false;
    for (double t0 = moe_now_s(); !in_flight && moe_now_s() - t0 < 10;) {
        char *js = h_stats(&c2, 2000);
        in_flight = js && h_json_num(js, "\"inflight_steps\"") >= 1;
        free(js);
    }
    assert_true(in_flight);
    kill(kids[1], SIGKILL);
    h_client_close(&c2);
    int ok = 0, err = 0;
    assert_true(h_recv_after_fault(&c, NQ, 30000, &ok, &err));
    fprintf(stderr, "after kill -9 of a worker: %d ok, %d failed with MOE_ERR_WORKER, none lost\n", ok, err);
    assert_int_equal(ok + err, NQ);
    assert_true(err > 0);
    /* Service resumes with a new group. */
    double t0 = moe_now_s();
    int32_t st;
    do {
        st = submit(&c, &rs[0], 5000, 0, NULL);
    } while (st != 0 && moe_now_s() - t0 < 30);
    assert_int_equal(st, 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(submit(&c, &rs[i], 6000 + (uint64_t)i, i % 2, NULL), 0);
    char *js = h_stats(&c, 5000);
    assert_non_null(js);
    assert_non_null(strstr(js, "\"restarts\":1"));
    free(js);
    for (int i = 0; i < NQ; i++)
        req_free(&rs[i]);
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&d, 20), 0);
}

/* A worker that stops answering (SIGSTOP): idle, it misses its heartbeats; busy, its step
 * misses the deadline. Either way the requests in flight get MOE_ERR_WORKER within the bounded
 * time, the group is replaced, and service resumes. Without and with busy polling (then STEP
 * and RESULT go through the control rings, and a STEP for a stopped worker waits in its ring). */
static void hung_worker_case(const char *busy) {
    daemon_proc d;
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "2", "--heartbeat-ms", "50", "--worker-timeout-ms",
                                                    "600", "--step-timeout-ms", "1500", "--busy-poll-us", busy, NULL},
                               60));
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    req r;
    req_make(&r, 8, 77, 0);
    assert_int_equal(submit(&c, &r, 1, 0, NULL), 0);
    /* Idle hang: detected by heartbeats. */
    pid_t kids[8];
    assert_int_equal(h_daemon_workers(&d, kids, 8), 2);
    kill(kids[0], SIGSTOP);
    double t0 = moe_now_s();
    int32_t st;
    do { /* the new group takes over within worker-timeout + restart */
        usleep(100000);
        st = submit(&c, &r, 2, 0, NULL);
    } while (st != 0 && moe_now_s() - t0 < 20);
    fprintf(stderr, "busy poll %s us, idle hang: service back after %.2f s\n", busy, moe_now_s() - t0);
    assert_int_equal(st, 0);
    kill(kids[0], SIGCONT); /* it was killed with its group; harmless if gone */
    /* Busy hang: a step in flight on a stopped worker fails by the step deadline. */
    assert_int_equal(h_daemon_workers(&d, kids, 8), 2);
    kill(kids[1], SIGSTOP);
    ipc_msg m;
    req_msg(&r, 3, 0, &m);
    t0 = moe_now_s();
    assert_true(h_send_msg(&c, &m));
    void *buf = NULL;
    size_t len;
    ipc_msg rep;
    assert_true(h_recv(&c, 10000, &buf, &len, &rep));
    double dt = moe_now_s() - t0;
    fprintf(stderr, "busy poll %s us, busy hang: request answered %d after %.2f s\n", busy, (int)rep.status, dt);
    assert_int_equal(rep.status, MOE_ERR_WORKER);
    assert_true(dt < 5.0);
    moe_free(buf);
    t0 = moe_now_s();
    do {
        usleep(100000);
        st = submit(&c, &r, 4, 1, NULL);
    } while (st != 0 && moe_now_s() - t0 < 20);
    assert_int_equal(st, 0);
    kill(kids[1], SIGCONT);
    req_free(&r);
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&d, 20), 0);
}

static void test_hung_worker(void **state) {
    (void)state;
    hung_worker_case("0");
    hung_worker_case("200");
}

/* SIGTERM with requests in flight: every request answered (computed or MOE_ERR_SHUTDOWN), exit 0,
 * no worker left; without and with busy polling (the control rings). */
static void sigterm_case(const char *busy) {
    daemon_proc d;
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "2", "--busy-poll-us", busy, NULL}, 60));
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    enum { NQ = 40 };
    req rs[NQ];
    for (int i = 0; i < NQ; i++) {
        req_make(&rs[i], 32, 7000 + (uint64_t)i, 0);
        ipc_msg q;
        req_msg(&rs[i], (uint64_t)i, 0, &q);
        assert_true(h_send_msg(&c, &q));
    }
    usleep(20000);
    pid_t pid = d.pid;
    kill(pid, SIGTERM);
    int ok = 0, down = 0;
    for (int i = 0; i < NQ; i++) {
        void *buf = NULL;
        size_t len;
        ipc_msg rep;
        if (!h_recv(&c, 20000, &buf, &len, &rep)) {
            fprintf(stderr, "only %d of %d requests answered during the drain\n", i, NQ);
            fail();
        }
        if (rep.status == 0)
            ok++;
        else {
            assert_int_equal(rep.status, MOE_ERR_SHUTDOWN);
            down++;
        }
        moe_free(buf);
    }
    fprintf(stderr, "busy poll %s us, SIGTERM with %d in flight: %d computed, %d refused\n", busy, NQ, ok, down);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    d.pid = 0;
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_true(h_no_children(pid));
    for (int i = 0; i < NQ; i++)
        req_free(&rs[i]);
    h_client_close(&c);
}

static void test_sigterm_drains(void **state) {
    (void)state;
    sigterm_case("0");
    sigterm_case("200");
}

static void test_flood_busy(void **state) {
    (void)state;
    daemon_proc d;
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "2", "--max-queue", "16", "--max-inflight-steps", "1",
                                                    "--max-step-tokens", "256", "--max-tokens", "256", NULL},
                               60));
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    req r;
    req_make(&r, 128, 31337, 0);
    size_t len;
    uint8_t *bytes = req_bytes(&r, 0, 0, &len);
    long rss0 = h_rss_kib(d.pid);
    enum { NQ = 3000 };
    int ok = 0, busy = 0;
    int answered = 0;
    for (int i = 0; i < NQ; i++) {
        wr64(bytes + 16, (uint64_t)i);
        assert_true(h_send_raw(&c, bytes, len));
        /* read what is there without waiting */
        void *buf = NULL;
        size_t rl;
        ipc_msg rep;
        while (h_recv(&c, 0, &buf, &rl, &rep)) {
            answered++;
            if (rep.status == 0)
                ok++;
            else if (rep.status == MOE_ERR_BUSY)
                busy++;
            moe_free(buf);
        }
    }
    long rss_peak = h_rss_kib(d.pid);
    while (answered < NQ) {
        void *buf = NULL;
        size_t rl;
        ipc_msg rep;
        if (!h_recv(&c, 30000, &buf, &rl, &rep))
            break;
        answered++;
        if (rep.status == 0)
            ok++;
        else if (rep.status == MOE_ERR_BUSY)
            busy++;
        moe_free(buf);
    }
    fprintf(stderr, "flood of %d: %d ok, %d BUSY; coordinator RSS %ld -> %ld KiB\n", NQ, ok, busy, rss0, rss_peak);
    assert_int_equal(answered, NQ);
    assert_int_equal(ok + busy, NQ);
    assert_true(busy > 0);
    assert_true(ok >= 16);
    /* 3000 requests of 64 KiB went through: the queue bound keeps the coordinator small */
    assert_true(rss_peak - rss0 < 64 * 1024);
    assert_int_equal(submit(&c, &r, 123456, 0, NULL), 0);
    moe_free(bytes);
    req_free(&r);
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&d, 20), 0);
}

static char *http_get(int port, const char *path) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        close(s);
        return NULL;
    }
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    if (write(s, req, (size_t)n) != n) {
        close(s);
        return NULL;
    }
    size_t cap = 1 << 20, got = 0;
    char *buf = malloc(cap);
    ssize_t k;
    while ((k = read(s, buf + got, cap - 1 - got)) > 0)
        got += (size_t)k;
    buf[got] = '\0';
    close(s);
    return buf;
}

static void test_probes(void **state) {
    (void)state;
    daemon_proc d;
    assert_true(h_daemon_start(&d, (const char *[]){"--workers", "2", NULL}, 60));
    char *h = http_get(d.http_port, "/health");
    assert_non_null(h);
    assert_non_null(strstr(h, "HTTP/1.0 200"));
    assert_non_null(strstr(h, "ok ready"));
    free(h);
    h_client c;
    assert_true(h_client_open(&c, d.endpoint));
    req r;
    req_make(&r, 9, 5, 0);
    assert_int_equal(submit(&c, &r, 1, 0, NULL), 0);
    char *m = http_get(d.http_port, "/metrics");
    assert_non_null(m);
    assert_non_null(strstr(m, "moe_requests_total{outcome=\"ok\"} 1"));
    assert_non_null(strstr(m, "moe_tokens_total 9"));
    assert_non_null(strstr(m, "# TYPE moe_request_latency_seconds histogram"));
    assert_non_null(strstr(m, "moe_expert_tokens_total{expert=\"15\"}"));
    /* the one step's time, split: every part there, the worker's compute above zero */
    assert_non_null(strstr(m, "moe_step_path_steps_total 1"));
    static const char *const parts[] = {"queue",          "stage",         "to_worker",   "worker_start",
                                        "worker_compute", "worker_answer", "from_worker", "reply"};
    for (int k = 0; k < 8; k++) {
        char key[96];
        snprintf(key, sizeof key, "moe_step_path_seconds_total{part=\"%s\"} ", parts[k]);
        const char *p = strstr(m, key);
        assert_non_null(p);
        const double v = strtod(p + strlen(key), NULL);
        assert_true(v >= 0 && v < 60);
        if (k == 4)
            assert_true(v > 0);
    }
    free(m);
    char *nf = http_get(d.http_port, "/nope");
    assert_non_null(strstr(nf, "404"));
    free(nf);
    req_free(&r);
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&d, 20), 0);
}

static void test_bad_config_exits(void **state) {
    (void)state;
    /* A model folder that does not exist: a clear error and exit status 1, nothing left behind. */
    daemon_proc d;
    assert_false(h_daemon_start(&d, (const char *[]){"--model", "/nonexistent/model", NULL}, 10));
    assert_false(h_daemon_start(&d, (const char *[]){"--workers", "17", NULL}, 10)); /* 16 experts */
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_serve_and_reference),
        cmocka_unit_test(test_bits_across_world_sizes),
        cmocka_unit_test(test_malformed_requests),
        cmocka_unit_test(test_kill_worker_in_flight),
        cmocka_unit_test(test_hung_worker),
        cmocka_unit_test(test_sigterm_drains),
        cmocka_unit_test(test_flood_busy),
        cmocka_unit_test(test_probes),
        cmocka_unit_test(test_bad_config_exits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
