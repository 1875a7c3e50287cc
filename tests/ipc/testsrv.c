/*
 * testsrv.c: the test server of testsrv.h. One libuv loop owns everything: the ZeroMQ
 * context's sockets (ROUTER frontend, ZAP REP), the held replies (timers), the async handle
 * that carries commands from the test thread, and signal handles in the foreground mode.
 * Invariants: every request gets exactly one reply (result or error) unless the server stops
 * first; at stop every handle is closed before the loop is closed.
 */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "tests/ipc/testsrv.h"

#define LAT_RING 4096

typedef struct held {
    uv_timer_t t;
    struct testsrv *s;
    zmq_msg_t f[IPC_ZWATCH_MAX_FRAMES];
    int n;
    uint64_t t_recv_ns;
    struct held *prev, *next;
} held;

struct testsrv {
    testsrv_opts o;
    char endpoint[256];
    uv_loop_t loop;
    void *ctx;
    ipc_zwatch_t *front;
    ipc_zap_t *zap;
    uv_async_t async;
    uv_signal_t sig[3];
    bool foreground, stopping;
    ipc_limits lim;
    /* thread handshake */
    pthread_t thr;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; /* 0 starting, 1 running, 2 failed, 3 stopped */
    moe_status start_st;
    char start_err[512];
    atomic_int cmd_stop, cmd_reload;
    bool reload_done;
    moe_status reload_st;
    moe_status close_st;
    /* stats (loop thread; the two atomics are read by the test thread) */
    atomic_uint_fast64_t n_req, n_ok;
    uint64_t t0_ns, by_op[5], errors, busy, tokens, steps;
    uint64_t *per_expert;
    uint32_t lat_us[LAT_RING];
    uint64_t n_lat;
    held *held_head;
    uint32_t n_held;
};

void testsrv_opts_default(testsrv_opts *o) {
    memset(o, 0, sizeof *o);
    o->endpoint = "tcp://127.0.0.1:*";
    o->n_layers = 4;
    o->n_experts = 8;
    o->hidden = 64;
    o->top_k = 2;
    o->max_tokens = 256;
    o->max_msg_bytes = 16u << 20;
    o->max_queue = 1024;
}

/* ------------------------------------------------------------------------------------------
 * The toy model.
 * ---------------------------------------------------------------------------------------- */
static float coef_a(int32_t L, int32_t e) { return (float)(e + 1 + L) / 8.0f; }
static float coef_b(int32_t L, int32_t e, int64_t h) {
    return (float)((int)((e * 31 + h * 7 + L * 13) % 17) - 8) / 64.0f;
}
static float coef_r(int32_t e, int64_t h) { return (float)((int)((e * 5 + h * 3) % 11) - 5) / 16.0f; }

/* softmax over E, the K largest (ties: lower id), renormalized. */
static void route_row(const float *logit, uint32_t E, uint32_t K, int32_t *ids, float *w) {
    float mx = -INFINITY;
    for (uint32_t e = 0; e < E; e++)
        mx = logit[e] > mx ? logit[e] : mx;
    float p[1024], sum = 0.0f;
    for (uint32_t e = 0; e < E; e++) {
        p[e] = expf(logit[e] - mx);
        sum += p[e];
    }
    for (uint32_t e = 0; e < E; e++)
        p[e] /= sum;
    bool taken[1024] = {false};
    float wsum = 0.0f;
    for (uint32_t k = 0; k < K; k++) {
        int32_t best = -1;
        for (uint32_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best]))
                best = (int32_t)e;
        taken[best] = true;
        ids[k] = best;
        w[k] = p[best];
        wsum += p[best];
    }
    for (uint32_t k = 0; k < K; k++)
        w[k] /= wsum;
}

moe_status testsrv_compute(uint32_t E, uint32_t K, int32_t L, const moe_tensor *x, const moe_tensor *ids,
                           const moe_tensor *w, const moe_tensor *logits, moe_tensor *y) {
    MOE_REQUIRE(E >= 1 && E <= 1024 && K >= 1 && K <= E, MOE_ERR_INVALID_ARG, "toy model: E %u, K %u", E, K);
    int64_t T = x->shape[0], H = x->shape[1];
    if (ids)
        K = (uint32_t)ids->shape[1];
    MOE_CHECK(moe_tensor_alloc(y, x->dtype, 2, (int64_t[]){T, H}));
    float *xr = malloc(sizeof(float) * (size_t)H), *lg = malloc(sizeof(float) * E), *acc = malloc(sizeof(float) * (size_t)H);
    int32_t rid[1024];
    float rw[1024];
    for (int64_t t = 0; t < T; t++) {
        moe_to_f32(x->dtype, (const uint8_t *)x->data + (size_t)(t * H) * moe_dtype_size(x->dtype), xr, (size_t)H);
        const int32_t *ti;
        const float *tw;
        if (ids) {
            ti = (const int32_t *)ids->data + t * K;
            tw = (const float *)w->data + t * K;
        } else {
            if (logits) {
                moe_to_f32(logits->dtype, (const uint8_t *)logits->data + (size_t)(t * E) * moe_dtype_size(logits->dtype),
                           lg, E);
            } else {
                for (uint32_t e = 0; e < E; e++) {
                    float s = 0.0f;
                    for (int64_t h = 0; h < H; h++)
                        s += xr[h] * coef_r((int32_t)e, h);
                    lg[e] = s;
                }
            }
            route_row(lg, E, K, rid, rw);
            ti = rid;
            tw = rw;
        }
        for (int64_t h = 0; h < H; h++)
            acc[h] = 0.0f;
        for (uint32_t k = 0; k < K; k++) {
            float a = coef_a(L, ti[k]);
            for (int64_t h = 0; h < H; h++)
                acc[h] += tw[k] * (a * xr[h] + coef_b(L, ti[k], h));
        }
        moe_from_f32(x->dtype, acc, (uint8_t *)y->data + (size_t)(t * H) * moe_dtype_size(x->dtype), (size_t)H);
    }
    free(xr);
    free(lg);
    free(acc);
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * JSON documents (the schema of docs/protocol.md).
 * ---------------------------------------------------------------------------------------- */
static char *info_json(testsrv_t *s) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "version", "0.1.0-testsrv");
    cJSON_AddNumberToObject(r, "protocol", IPC_VERSION);
    cJSON *m = cJSON_AddObjectToObject(r, "model");
    cJSON_AddStringToObject(m, "name", "toy");
    cJSON_AddStringToObject(m, "family", "testsrv");
    cJSON_AddStringToObject(m, "dtype", "f32");
    cJSON_AddNumberToObject(m, "hidden", s->o.hidden);
    cJSON_AddNumberToObject(m, "n_layers", s->o.n_layers);
    cJSON *ml = cJSON_AddArrayToObject(m, "moe_layers");
    for (uint32_t l = 0; l < s->o.n_layers; l++)
        cJSON_AddItemToArray(ml, cJSON_CreateNumber(l));
    cJSON_AddNumberToObject(m, "n_experts", s->o.n_experts);
    cJSON_AddNumberToObject(m, "top_k", s->o.top_k);
    cJSON_AddNumberToObject(m, "intermediate", 0);
    cJSON_AddNumberToObject(m, "shared_intermediate", 0);
    cJSON_AddBoolToObject(m, "can_route", !s->o.no_route);
    cJSON *dts = cJSON_AddArrayToObject(m, "activation_dtypes");
    cJSON_AddItemToArray(dts, cJSON_CreateString("f32"));
    cJSON_AddItemToArray(dts, cJSON_CreateString("f16"));
    cJSON_AddItemToArray(dts, cJSON_CreateString("bf16"));
    cJSON *p = cJSON_AddObjectToObject(r, "placement");
    cJSON_AddNumberToObject(p, "world_size", 1);
    cJSON_AddStringToObject(p, "policy", "contiguous");
    cJSON *epr = cJSON_AddArrayToObject(p, "experts_per_rank");
    cJSON_AddItemToArray(epr, cJSON_CreateNumber(s->o.n_experts));
    cJSON *lim = cJSON_AddObjectToObject(r, "limits");
    cJSON_AddNumberToObject(lim, "max_tokens", s->o.max_tokens);
    cJSON_AddNumberToObject(lim, "max_msg_bytes", (double)s->o.max_msg_bytes);
    cJSON_AddNumberToObject(lim, "max_queue", s->o.max_queue);
    char *out = cJSON_PrintUnformatted(r);
    cJSON_Delete(r);
    return out;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static char *stats_json(testsrv_t *s) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddNumberToObject(r, "uptime_s", (double)(moe_now_ns() - s->t0_ns) * 1e-9);
    cJSON *q = cJSON_AddObjectToObject(r, "requests");
    cJSON_AddNumberToObject(q, "received", (double)atomic_load(&s->n_req));
    cJSON_AddNumberToObject(q, "ok", (double)atomic_load(&s->n_ok));
    cJSON_AddNumberToObject(q, "errors", (double)s->errors);
    cJSON_AddNumberToObject(q, "busy", (double)s->busy);
    cJSON_AddNumberToObject(q, "in_flight", s->n_held);
    cJSON *by = cJSON_AddObjectToObject(q, "by_op");
    for (uint16_t op = IPC_OP_PING; op <= IPC_OP_SUBMIT; op++)
        cJSON_AddNumberToObject(by, ipc_op_name(op), (double)s->by_op[op]);
    cJSON_AddNumberToObject(r, "tokens", (double)s->tokens);
    cJSON_AddNumberToObject(r, "steps", (double)s->steps);
    cJSON_AddNumberToObject(r, "queue_depth", s->n_held);
    cJSON *pe = cJSON_AddArrayToObject(r, "per_expert_tokens");
    for (uint32_t e = 0; e < s->o.n_experts; e++)
        cJSON_AddItemToArray(pe, cJSON_CreateNumber((double)s->per_expert[e]));
    cJSON *lat = cJSON_AddObjectToObject(r, "latency_us");
    cJSON *sub = cJSON_AddObjectToObject(lat, "submit");
    size_t n = s->n_lat < LAT_RING ? (size_t)s->n_lat : LAT_RING;
    cJSON_AddNumberToObject(sub, "count", (double)s->n_lat);
    if (n) {
        uint32_t *v = malloc(n * sizeof *v);
        memcpy(v, s->lat_us, n * sizeof *v);
        qsort(v, n, sizeof *v, cmp_u32);
        cJSON_AddNumberToObject(sub, "p50", v[(n - 1) * 50 / 100]);
        cJSON_AddNumberToObject(sub, "p90", v[(n - 1) * 90 / 100]);
        cJSON_AddNumberToObject(sub, "p99", v[(n - 1) * 99 / 100]);
        cJSON_AddNumberToObject(sub, "max", v[n - 1]);
        free(v);
    }
    char *out = cJSON_PrintUnformatted(r);
    cJSON_Delete(r);
    return out;
}

/* ------------------------------------------------------------------------------------------
 * Requests.
 * ---------------------------------------------------------------------------------------- */
static void send_frames(testsrv_t *s, zmq_msg_t *f, int n) {
    if (ipc_zwatch_send(s->front, f, n) != MOE_OK)
        MOE_WARN(MOE_SUB_IPC, "testsrv: reply dropped: %s", moe_errmsg());
}

static void on_held_closed(uv_handle_t *h) { free(h->data); }

static void held_unlink(testsrv_t *s, held *hd) {
    if (hd->prev)
        hd->prev->next = hd->next;
    else
        s->held_head = hd->next;
    if (hd->next)
        hd->next->prev = hd->prev;
    s->n_held--;
}

static void on_held_timer(uv_timer_t *t) {
    held *hd = t->data;
    testsrv_t *s = hd->s;
    held_unlink(s, hd);
    s->lat_us[s->n_lat++ % LAT_RING] = (uint32_t)((moe_now_ns() - hd->t_recv_ns) / 1000);
    send_frames(s, hd->f, hd->n);
    uv_close((uv_handle_t *)t, on_held_closed);
}

static void on_front(ipc_zwatch_t *w, zmq_msg_t *f, int n, void *user) {
    (void)w;
    testsrv_t *s = user;
    atomic_fetch_add(&s->n_req, 1);
    if (n < 2 || s->stopping)
        return; /* a ROUTER always gives an identity; nothing to answer to otherwise */
    uint64_t t_recv = moe_now_ns();
    zmq_msg_t *body = &f[n - 1];
    ipc_msg m, rep;
    moe_tensor y;
    memset(&y, 0, sizeof y);
    char *json = NULL, errbuf[600];
    void *owned = NULL;
    moe_status st = ipc_decode(zmq_msg_data(body), zmq_msg_size(body), &s->lim, &m);
    if (st == MOE_OK) {
        s->by_op[m.op]++;
        switch (m.op) {
        case IPC_OP_PING:
            ipc_reply_init(&rep, m.op, m.request_id);
            break;
        case IPC_OP_INFO:
        case IPC_OP_STATS:
            json = m.op == IPC_OP_INFO ? info_json(s) : stats_json(s);
            ipc_reply_init(&rep, m.op, m.request_id);
            st = ipc_msg_add_bytes(&rep, IPC_SEC_JSON, json, strlen(json));
            break;
        case IPC_OP_SUBMIT: {
            if (s->o.delay_ms && s->n_held >= s->o.max_queue) {
                s->busy++;
                st = moe_fail(MOE_ERR_BUSY, "%u requests are queued (max_queue): retry later", s->n_held);
                break;
            }
            st = ipc_msg_realign(&m, &owned);
            if (st != MOE_OK)
                break;
            const ipc_section *ids = ipc_msg_find(&m, IPC_SEC_TOPK_IDS), *lg = ipc_msg_find(&m, IPC_SEC_LOGITS);
            moe_tensor tx = ipc_section_tensor(ipc_msg_find(&m, IPC_SEC_X));
            moe_tensor ti = ipc_section_tensor(ids), tw = ipc_section_tensor(ipc_msg_find(&m, IPC_SEC_TOPK_W));
            moe_tensor tl = ipc_section_tensor(lg);
            st = testsrv_compute(s->o.n_experts, s->o.top_k, m.layer, &tx, ids ? &ti : NULL, ids ? &tw : NULL,
                                 lg ? &tl : NULL, &y);
            if (st != MOE_OK)
                break;
            s->tokens += m.n_tokens;
            s->steps++;
            if (ids)
                for (size_t i = 0; i < (size_t)m.n_tokens * m.top_k; i++)
                    s->per_expert[((const int32_t *)ti.data)[i]]++;
            st = ipc_submit_reply_init(&rep, m.request_id, &y);
            rep.layer = m.layer;
            break;
        }
        default:
            st = moe_fail(MOE_ERR_INTERNAL, "testsrv: op %u", (unsigned)m.op);
        }
    }
    if (st != MOE_OK) {
        s->errors++;
        snprintf(errbuf, sizeof errbuf, "%s", moe_errmsg());
        MOE_DEBUG(MOE_SUB_IPC, "testsrv: request %llu refused: %s: %s", (unsigned long long)m.request_id,
                  moe_status_name(st), errbuf);
        ipc_error_init(&rep, m.op <= IPC_OP_CLIENT_MAX ? m.op : 0, m.request_id, st, errbuf);
    }
    zmq_msg_t out[IPC_ZWATCH_MAX_FRAMES];
    int k = 0;
    for (; k < n - 1; k++) { /* the envelope goes back as it came */
        zmq_msg_init(&out[k]);
        zmq_msg_move(&out[k], &f[k]);
    }
    if (ipc_encode_zmq(&rep, &out[k]) != MOE_OK) {
        MOE_ERROR(MOE_SUB_IPC, "testsrv: encode: %s", moe_errmsg());
        for (int i = 0; i <= k; i++)
            zmq_msg_close(&out[i]);
        goto done;
    }
    k++;
    if (st == MOE_OK && m.op == IPC_OP_SUBMIT)
        atomic_fetch_add(&s->n_ok, 1);
    if (st == MOE_OK && m.op == IPC_OP_SUBMIT && s->o.delay_ms) {
        held *hd = calloc(1, sizeof *hd);
        hd->s = s;
        hd->n = k;
        hd->t_recv_ns = t_recv;
        for (int i = 0; i < k; i++) {
            zmq_msg_init(&hd->f[i]);
            zmq_msg_move(&hd->f[i], &out[i]);
        }
        uv_timer_init(&s->loop, &hd->t);
        hd->t.data = hd;
        uv_timer_start(&hd->t, on_held_timer, s->o.delay_ms, 0);
        hd->next = s->held_head;
        if (s->held_head)
            s->held_head->prev = hd;
        s->held_head = hd;
        s->n_held++;
    } else {
        if (m.op == IPC_OP_SUBMIT)
            s->lat_us[s->n_lat++ % LAT_RING] = (uint32_t)((moe_now_ns() - t_recv) / 1000);
        send_frames(s, out, k);
    }
done:
    moe_tensor_free(&y);
    moe_free(owned);
    cJSON_free(json);
}

/* ------------------------------------------------------------------------------------------
 * Set-up, commands, shutdown.
 * ---------------------------------------------------------------------------------------- */
static void begin_stop(testsrv_t *s) {
    if (s->stopping)
        return;
    s->stopping = true;
    while (s->held_head) { /* replies still held are dropped: the server is going away */
        held *hd = s->held_head;
        held_unlink(s, hd);
        uv_timer_stop(&hd->t);
        for (int i = 0; i < hd->n; i++)
            zmq_msg_close(&hd->f[i]);
        uv_close((uv_handle_t *)&hd->t, on_held_closed);
    }
    if (s->front)
        ipc_zwatch_close(s->front, NULL, NULL);
    if (s->zap)
        ipc_zap_close(s->zap, NULL, NULL);
    uv_close((uv_handle_t *)&s->async, NULL);
    if (s->foreground)
        for (int i = 0; i < 3; i++)
            uv_close((uv_handle_t *)&s->sig[i], NULL);
}

static void on_async(uv_async_t *a) {
    testsrv_t *s = a->data;
    if (atomic_exchange(&s->cmd_reload, 0)) {
        moe_status st = s->zap ? ipc_zap_reload(s->zap) : moe_fail(MOE_ERR_INVALID_ARG, "no ZAP handler");
        pthread_mutex_lock(&s->mu);
        s->reload_st = st;
        s->reload_done = true;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    if (atomic_load(&s->cmd_stop))
        begin_stop(s);
}

static void on_signal(uv_signal_t *h, int sig) {
    testsrv_t *s = h->data;
    if (sig == SIGHUP) {
        if (s->zap)
            ipc_zap_reload(s->zap);
        return;
    }
    MOE_INFO(MOE_SUB_IPC, "testsrv: signal %d: stopping", sig);
    begin_stop(s);
}

static moe_status setup(testsrv_t *s) {
    moe_status st = MOE_OK;
    void *sock = NULL;
    MOE_UV_CHECK(uv_loop_init(&s->loop));
    MOE_UV_CHECK_GOTO(uv_async_init(&s->loop, &s->async, on_async), st, fail_loop);
    s->async.data = s;
    s->ctx = zmq_ctx_new();
    s->per_expert = calloc(s->o.n_experts, sizeof *s->per_expert);
    s->t0_ns = moe_now_ns();
    s->lim = ipc_limits_default();
    s->lim.max_msg_bytes = s->o.max_msg_bytes;
    s->lim.max_tokens = s->o.max_tokens;
    s->lim.n_layers = s->o.n_layers;
    s->lim.n_experts = s->o.n_experts;
    s->lim.hidden = s->o.hidden;
    s->lim.top_k = s->o.top_k;
    s->lim.can_route = !s->o.no_route;
    if (s->o.secret_key_path) {
        if (!s->o.allow_list_path) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "testsrv: CURVE needs an allow-list");
            goto fail;
        }
        MOE_CHECK_GOTO(ipc_zap_init(&s->zap, &s->loop, s->ctx, s->o.allow_list_path), st, fail);
    }
    sock = zmq_socket(s->ctx, ZMQ_ROUTER);
    MOE_CHECK_GOTO(ipc_socket_limits(sock, &s->lim, 0), st, fail);
    int one = 1; /* a reply to a client that is gone fails at once instead of vanishing */
    MOE_ZMQ_CHECK_GOTO(zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one), st, fail);
    if (s->o.secret_key_path)
        MOE_CHECK_GOTO(ipc_curve_server(sock, s->o.secret_key_path, NULL), st, fail);
    if (zmq_bind(sock, s->o.endpoint) != 0) {
        st = moe_fail(MOE_ERR_ZMQ, "testsrv: bind %s: %s", s->o.endpoint, zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t n = sizeof s->endpoint;
    zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, s->endpoint, &n);
    MOE_CHECK_GOTO(ipc_zwatch_init(&s->front, &s->loop, sock, NULL, on_front, s), st, fail);
    return MOE_OK;
fail:
    if (sock)
        zmq_close(sock);
    begin_stop(s);
    uv_run(&s->loop, UV_RUN_DEFAULT);
fail_loop:
    uv_loop_close(&s->loop);
    if (s->ctx)
        zmq_ctx_term(s->ctx);
    s->ctx = NULL;
    return st;
}

static void teardown(testsrv_t *s) {
    int r = uv_loop_close(&s->loop);
    s->close_st = r == 0 ? MOE_OK : moe_fail(MOE_ERR_UV, "testsrv: uv_loop_close: %s", uv_strerror(r));
    zmq_ctx_term(s->ctx);
    free(s->per_expert);
}

static void *thread_main(void *arg) {
    testsrv_t *s = arg;
    moe_status st = setup(s);
    pthread_mutex_lock(&s->mu);
    s->start_st = st;
    snprintf(s->start_err, sizeof s->start_err, "%s", moe_errmsg());
    s->state = st == MOE_OK ? 1 : 2;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (st != MOE_OK)
        return NULL;
    uv_run(&s->loop, UV_RUN_DEFAULT);
    teardown(s);
    return NULL;
}

moe_status testsrv_start(testsrv_t **out, const testsrv_opts *o) {
    testsrv_t *s = calloc(1, sizeof *s);
    if (!s)
        return moe_fail(MOE_ERR_NOMEM, "testsrv");
    s->o = *o;
    if (!s->o.endpoint)
        s->o.endpoint = "tcp://127.0.0.1:*";
    if (!s->o.max_queue)
        s->o.max_queue = 1024;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->thr, NULL, thread_main, s) != 0) {
        free(s);
        return moe_fail(MOE_ERR_SYSTEM, "testsrv: pthread_create");
    }
    pthread_mutex_lock(&s->mu);
    while (s->state == 0)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    if (s->state != 1) {
        moe_status st = s->start_st;
        pthread_join(s->thr, NULL);
        moe_fail(st, "%s", s->start_err);
        free(s);
        return st;
    }
    *out = s;
    return MOE_OK;
}

const char *testsrv_endpoint(const testsrv_t *s) { return s->endpoint; }
uint64_t testsrv_submits_ok(const testsrv_t *s) { return atomic_load(&((testsrv_t *)s)->n_ok); }
uint64_t testsrv_requests(const testsrv_t *s) { return atomic_load(&((testsrv_t *)s)->n_req); }

moe_status testsrv_reload_keys(testsrv_t *s) {
    pthread_mutex_lock(&s->mu);
    s->reload_done = false;
    pthread_mutex_unlock(&s->mu);
    atomic_store(&s->cmd_reload, 1);
    uv_async_send(&s->async);
    pthread_mutex_lock(&s->mu);
    while (!s->reload_done)
        pthread_cond_wait(&s->cv, &s->mu);
    moe_status st = s->reload_st;
    pthread_mutex_unlock(&s->mu);
    return st;
}

moe_status testsrv_stop(testsrv_t *s) {
    if (!s)
        return MOE_OK;
    atomic_store(&s->cmd_stop, 1);
    uv_async_send(&s->async);
    pthread_join(s->thr, NULL);
    moe_status st = s->close_st;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
    return st;
}

moe_status testsrv_run_foreground(const testsrv_opts *o) {
    testsrv_t *s = calloc(1, sizeof *s);
    if (!s)
        return moe_fail(MOE_ERR_NOMEM, "testsrv");
    s->o = *o;
    if (!s->o.endpoint)
        s->o.endpoint = "tcp://127.0.0.1:*";
    if (!s->o.max_queue)
        s->o.max_queue = 1024;
    s->foreground = true;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    moe_status st = setup(s);
    if (st != MOE_OK) {
        free(s);
        return st;
    }
    int sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    for (int i = 0; i < 3; i++) {
        uv_signal_init(&s->loop, &s->sig[i]);
        s->sig[i].data = s;
        uv_signal_start(&s->sig[i], on_signal, sigs[i]);
    }
    printf("endpoint %s\n", s->endpoint);
    fflush(stdout);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    teardown(s);
    st = s->close_st;
    free(s);
    return st;
}
