/*
 * coord.c: `moe-engine serve`, the coordinator. One libuv loop on one thread owns everything
 * here: the client ROUTER socket, the worker ROUTER socket, the ZAP handler, the probe server,
 * the timers, the signal handlers, the worker processes, the queues and the stats. Nothing on
 * the loop blocks: sockets are behind the ZeroMQ-in-libuv watcher (ipc/), weights are read
 * only by the workers, the checkpoint's headers are checked before the loop starts.
 *
 * A request's life: decoded and validated against the model and the limits (a bad one is
 * answered at once) -> queued on its layer (bounded: BUSY beyond max-queue) -> coalesced with
 * others of its layer into a step (up to max-step-tokens) -> sent to every worker (the client's
 * message forwarded with zmq_msg_copy, no tensor bytes copied) -> answered by rank 0's REPLY,
 * forwarded to the client unchanged; or failed with an error reply. Invariant: every accepted
 * request gets exactly one reply (result or error); a request lives in exactly one place: a
 * layer queue, a step in flight, or nowhere once answered.
 *
 * Supervision: a worker that exits, misses its heartbeats while idle, or leaves a step past
 * its deadline fails the whole group: the steps in flight are answered with MOE_ERR_WORKER,
 * every worker of the group is killed (a result of a failed collective can never come back:
 * messages of an old epoch are ignored), and a new group is started; queued requests wait for
 * it (bounded by start-timeout-ms). SIGTERM/SIGINT drain; a second signal stops at once.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdatomic.h>
#include <inttypes.h>
#include <pthread.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>
#include <zmq.h>

#include "engine/engine.h"
#include "engine/http.h"
#include "engine/model/model.h"
#include "engine/ctl.h"
#include "engine/shm.h"
#include "engine/step.h"
#include "engine/wire.h"
#include "ipc/ipc.h"
#include "kernels/kern.h"
#include "parallel/par.h"

#define MAX_WORKERS 256
#define N_LAT_BUCKETS 18

static const double lat_bounds_s[N_LAT_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                   0.1,    0.25,    0.5,    1.0,   2.5,    5.0,   10.0, 30.0,  60.0};

typedef struct coord_req {
    struct coord_req *next;
    zmq_msg_t ident;   /* the client's routing id */
    zmq_msg_t body;    /* the SUBMIT request as received */
    bool has_delim;    /* a REQ client: an empty delimiter frame goes before the reply */
    uint64_t client_id;
    int32_t layer;
    uint32_t n_tokens;
    uint64_t t_accept;
    bool answered;
    /* where the sections are inside body (offsets from its first byte), for the data path */
    uint8_t src;           /* eng_route_src */
    uint8_t logits_dtype;
    size_t x_off, ids_off, w_off, lg_off;
} coord_req;

typedef struct coord_step {
    uint64_t id;
    uint64_t epoch;
    int32_t layer;
    int32_t n_reqs;
    coord_req **reqs;
    uint64_t t_dispatch;
    uint32_t n_tokens;
    int32_t slot;   /* shared-memory data path: the slot (-1: ZeroMQ data path) */
    bool copied;    /* the slot holds the step's inputs (the copy job finished) */
    bool sent;      /* STEP sent to the workers */
    int32_t results; /* RESULTs received: the step is done when every rank has answered (GPU
                        workers each write the rows they own of the replies) */
    float gpu_step_us, gpu_compute_us, gpu_h2d_us, gpu_host_us, gpu_plan_us, gpu_gather_us,
        gpu_wait_us; /* the slowest rank's */
    int32_t gpu_staged_ranks; /* ranks whose inputs went up during the step before */
    /* Where the step's time went (STATS "path"): formed, STEP sent, the RESULT's trace of the
     * rank that answered last (ENG_SEC_TRACE), and when that RESULT arrived. */
    uint64_t t_formed, t_sent, t_results;
    uint64_t trace[ENG_TRACE_N];
} coord_step;

/* A slot of the shared-memory data path. refs: the step using it (from dispatch to its end),
 * its copy job (until the job's after-callback), and every reply message handed to ZeroMQ
 * (until ZeroMQ releases it, from its own thread). Free when 0. */
typedef struct coord_slot {
    atomic_int refs;
    struct coord *co;
} coord_slot;

typedef enum group_state {
    GROUP_STARTING = 0, /* spawned, waiting for READY from every rank */
    GROUP_READY = 1,
    GROUP_STOPPING = 2, /* killed or told to shut down; waiting for the exits */
    GROUP_FAILED = 3    /* gave up: too many restarts, or a load error */
} group_state;

typedef struct coord_worker {
    struct coord *co;
    int32_t rank;
    uv_process_t proc;
    bool running;   /* spawned and not yet exited */
    bool hello;     /* said HELLO */
    bool id_sent;   /* got the NCCL id (GPU groups) */
    bool ready;
    uint64_t last_seen;
    uint64_t steps;
    int pid;
    char ident[32];
} coord_worker;

typedef struct layer_queue {
    coord_req *head, *tail;
    int32_t n;
} layer_queue;

typedef struct coord_stats {
    uint64_t accepted, ok, failed, rejected, busy, shutdown_refused;
    uint64_t tokens, steps, step_tokens;
    uint64_t lat_buckets[N_LAT_BUCKETS + 1];
    double lat_sum;
    uint64_t pings, infos, stats_calls;
    uint64_t restarts;
    int64_t *expert_tokens; /* [E] */
    /* GPU workers' device times (rank 0's RESULT; combine: every rank's) */
    uint64_t gpu_steps, gpu_step_tokens, gpu_staged_steps;
    double gpu_step_us, gpu_compute_us, gpu_combine_us, gpu_combine_bytes, gpu_h2d_us, gpu_host_us, gpu_plan_us,
        gpu_gather_us, gpu_wait_us;
    uint64_t errors_by_status[32];
    /* STATS "path": each answered step's time, split (path_names); sums in microseconds */
    uint64_t path_steps;
    double path_us[8];
} coord_stats;

/* The parts of a step's time in STATS "path", in order; they add up to the time from the
 * step's oldest request's arrival to the moment its replies are handed to ZeroMQ. */
static const char *const path_names[8] = {"queue",          "stage",         "to_worker",  "worker_start",
                                          "worker_compute", "worker_answer", "from_worker", "reply"};

typedef struct coord {
    eng_config cfg;
    uv_loop_t loop;
    void *zctx;
    ipc_zwatch_t *cw, *ww; /* client and worker watchers */
    ipc_zap_t *zap;
    eng_http_t *http;
    uv_timer_t tick;
    uv_signal_t sig_term, sig_int, sig_hup;

    /* model */
    eng_ckpt_t *ckpt;
    const eng_model_desc *desc;
    char model_dir[ENG_PATH_MAX];
    uint8_t *layer_served;    /* [n_layers] */
    int32_t *served;          /* served MoE layer indices */
    int32_t n_served;
    ipc_limits lim;
    par_placement placement;

    /* workers */
    int32_t world;
    coord_worker workers[MAX_WORKERS];
    group_state gstate;
    uint64_t epoch;
    uint64_t group_started;
    uint64_t respawn_at;
    int32_t restarts;
    int32_t running;
    char fail_reason[512];
    char exe[PATH_MAX];
    char rundir[ENG_PATH_MAX];
    char worker_ep[ENG_PATH_MAX + 16];
    char worker_threads[16];
    char hb_str[16], step_to_str[16], start_to_str[16], step_tokens_str[16], dbo_min_str[16], busy_str[16],
        dbo_rows_str[16];
    char dbo_sm_str[16];
    char dbo_share_str[16];
    uv_idle_t spin;      /* --busy-poll-us: active while hot, so the loop polls without sleeping */
    uint64_t t_active;   /* the last step dispatched or answered */
    int32_t gpu_ids[MAX_WORKERS];
    uint8_t nccl_id[PAR_NCCL_ID_BYTES];
    bool has_nccl_id;

    /* work */
    layer_queue *queues;      /* [n_layers] */
    int32_t n_queued;
    coord_step *inflight;     /* [max_inflight_steps] */
    int32_t n_inflight;
    uint64_t next_step_id;

    /* shared-memory data path (one host) */
    bool use_shm;
    eng_shm shm;
    eng_shm_layout lay;
    coord_slot *slots; /* [max_inflight_steps] */
    uv_async_t slot_async;
    pthread_mutex_t wake_mu; /* guards wake_ok: ZeroMQ's thread may release a reply at any time */
    bool wake_ok;            /* slot_async may be signalled (false once it is closing) */
    char shm_slots_str[16];
    /* The control rings (engine/ctl.h): STEP and RESULT beside ZeroMQ, with busy polling on the
     * shared-memory data path */
    bool use_ctl;
    eng_shm ctl_map;
    uint64_t ctl_down, ctl_up;
    char ctl_down_str[24], ctl_up_str[24];

    /* lifecycle */
    bool draining, stopping, closed;
    bool loop_inited, handles_inited;
    uint64_t drain_deadline, kill_deadline;
    uint64_t t_start;
    int exit_code;
    coord_stats st;
} coord;

static void group_fail(coord *co, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void schedule(coord *co);
static void begin_close(coord *co);
static void slot_release(coord_slot *sl);
static void maybe_respawn(coord *co);

/* ------------------------------------------------------------------------------------------
 * Replies.
 * ---------------------------------------------------------------------------------------- */
static uint64_t now_ns(void) { return moe_now_ns(); }

/* Sends [ident][(empty)][body] to a client; takes body. */
static void send_to_client(coord *co, zmq_msg_t *ident, bool delim, zmq_msg_t *body) {
    zmq_msg_t f[3];
    int n = 0;
    zmq_msg_init(&f[n]);
    zmq_msg_copy(&f[n++], ident);
    if (delim)
        zmq_msg_init(&f[n++]);
    zmq_msg_init(&f[n]);
    zmq_msg_move(&f[n++], body);
    zmq_msg_close(body);
    moe_status st = ipc_zwatch_send(co->cw, f, n);
    if (st != MOE_OK)
        MOE_DEBUG(MOE_SUB_ENG, "reply not sent: %s", moe_errmsg());
}

static void send_msg_to_client(coord *co, zmq_msg_t *ident, bool delim, const ipc_msg *m) {
    zmq_msg_t body;
    if (ipc_encode_zmq(m, &body) != MOE_OK) {
        MOE_ERROR(MOE_SUB_ENG, "cannot encode a reply: %s", moe_errmsg());
        return;
    }
    send_to_client(co, ident, delim, &body);
}

static void send_error(coord *co, zmq_msg_t *ident, bool delim, uint16_t op, uint64_t id, moe_status status,
                       const char *text) {
    ipc_msg m;
    /* An error reply carries an op a client can read (0x01..0x7f): the request's, else 0x01
     * (protocol.md: a message whose op could not be read, or an internal op). */
    if (op == 0 || op >= IPC_OP_INTERNAL_FIRST)
        op = IPC_OP_PING;
    if (ipc_error_init(&m, op, id, status, text) != MOE_OK)
        return;
    send_msg_to_client(co, ident, delim, &m);
    int idx = -(int)status;
    if (idx >= 0 && idx < 32)
        co->st.errors_by_status[idx]++;
}

static void req_free(coord_req *r) {
    zmq_msg_close(&r->ident);
    zmq_msg_close(&r->body);
    free(r);
}

static void lat_record(coord *co, uint64_t t_accept) {
    double s = (double)(now_ns() - t_accept) * 1e-9;
    int b = 0;
    while (b < N_LAT_BUCKETS && s > lat_bounds_s[b])
        b++;
    co->st.lat_buckets[b]++;
    co->st.lat_sum += s;
}

/* Answers a request with an error and frees it. */
static void req_fail(coord *co, coord_req *r, moe_status status, const char *text) {
    if (!r->answered) {
        send_error(co, &r->ident, r->has_delim, IPC_OP_SUBMIT, r->client_id, status, text);
        co->st.failed++;
        lat_record(co, r->t_accept);
    }
    req_free(r);
}

/* ------------------------------------------------------------------------------------------
 * INFO and STATS.
 * ---------------------------------------------------------------------------------------- */
static char *info_json(coord *co) {
    const eng_model_desc *d = co->desc;
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", ENG_VERSION);
    cJSON_AddNumberToObject(root, "protocol", IPC_VERSION);
    cJSON *m = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(m, "name", co->cfg.model[0] ? co->cfg.model : "embedded-default");
    cJSON_AddStringToObject(m, "path", co->model_dir);
    cJSON_AddStringToObject(m, "family", eng_model_family_name(d->family));
    cJSON_AddStringToObject(m, "architecture", d->architecture);
    cJSON_AddStringToObject(m, "dtype", moe_dtype_name(d->dtype));
    cJSON_AddNumberToObject(m, "hidden", d->hidden_size);
    cJSON_AddNumberToObject(m, "n_layers", d->n_layers);
    cJSON *ml = cJSON_AddArrayToObject(m, "moe_layers");
    for (int32_t i = 0; i < co->n_served; i++)
        cJSON_AddItemToArray(ml, cJSON_CreateNumber(co->served[i]));
    cJSON_AddNumberToObject(m, "n_experts", d->n_experts);
    cJSON_AddNumberToObject(m, "top_k", d->top_k);
    cJSON_AddNumberToObject(m, "intermediate", d->moe_intermediate);
    cJSON_AddNumberToObject(m, "shared_intermediate", d->shared_intermediate);
    cJSON_AddBoolToObject(m, "shared_gate", d->has_shared_gate);
    cJSON_AddStringToObject(m, "activation", kern_act_name(d->act));
    cJSON_AddStringToObject(m, "scoring", d->scoring_func);
    cJSON_AddBoolToObject(m, "can_route", co->lim.can_route);
    cJSON *p = cJSON_AddObjectToObject(root, "placement");
    cJSON_AddNumberToObject(p, "world_size", co->world);
    cJSON_AddStringToObject(p, "policy", par_place_policy_name(co->placement.policy));
    cJSON *epr = cJSON_AddArrayToObject(p, "experts_per_rank");
    cJSON *own = cJSON_AddArrayToObject(p, "owner");
    for (int32_t r = 0; r < co->world; r++)
        cJSON_AddItemToArray(epr, cJSON_CreateNumber(co->placement.n_local[r]));
    for (int32_t e = 0; e < co->placement.n_experts; e++)
        cJSON_AddItemToArray(own, cJSON_CreateNumber(co->placement.owner[e]));
    cJSON_AddStringToObject(p, "backend", co->cfg.backend);
    cJSON *l = cJSON_AddObjectToObject(root, "limits");
    cJSON_AddNumberToObject(l, "max_tokens", co->cfg.max_tokens);
    cJSON_AddNumberToObject(l, "max_step_tokens", co->cfg.max_step_tokens);
    cJSON_AddNumberToObject(l, "max_msg_bytes", (double)co->cfg.max_msg_bytes);
    cJSON_AddNumberToObject(l, "max_queue", co->cfg.max_queue);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

static double lat_quantile(const coord *co, double q) {
    uint64_t total = 0;
    for (int b = 0; b <= N_LAT_BUCKETS; b++)
        total += co->st.lat_buckets[b];
    if (total == 0)
        return 0;
    uint64_t want = (uint64_t)(q * (double)total + 0.5), acc = 0;
    if (want == 0)
        want = 1;
    for (int b = 0; b <= N_LAT_BUCKETS; b++) {
        acc += co->st.lat_buckets[b];
        if (acc >= want)
            return b < N_LAT_BUCKETS ? lat_bounds_s[b] : lat_bounds_s[N_LAT_BUCKETS - 1];
    }
    return lat_bounds_s[N_LAT_BUCKETS - 1];
}

static const char *gstate_name(group_state g) {
    static const char *n[] = {"starting", "ready", "stopping", "failed"};
    return n[g];
}

static char *stats_json(coord *co) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "uptime_s", (double)(now_ns() - co->t_start) * 1e-9);
    cJSON_AddStringToObject(root, "state", co->draining ? "draining" : gstate_name(co->gstate));
    cJSON *r = cJSON_AddObjectToObject(root, "requests");
    cJSON_AddNumberToObject(r, "accepted", (double)co->st.accepted);
    cJSON_AddNumberToObject(r, "ok", (double)co->st.ok);
    cJSON_AddNumberToObject(r, "failed", (double)co->st.failed);
    cJSON_AddNumberToObject(r, "rejected", (double)co->st.rejected);
    cJSON_AddNumberToObject(r, "busy", (double)co->st.busy);
    cJSON_AddNumberToObject(r, "queued", co->n_queued);
    cJSON_AddNumberToObject(r, "inflight_steps", co->n_inflight);
    cJSON_AddNumberToObject(root, "tokens", (double)co->st.tokens);
    cJSON_AddNumberToObject(root, "steps", (double)co->st.steps);
    cJSON_AddNumberToObject(root, "queue_depth", co->n_queued);
    cJSON *q = cJSON_AddArrayToObject(root, "queue_depth_per_layer");
    for (int32_t i = 0; i < co->n_served; i++)
        cJSON_AddItemToArray(q, cJSON_CreateNumber(co->queues[co->served[i]].n));
    cJSON *lat = cJSON_AddObjectToObject(root, "latency_s");
    cJSON_AddNumberToObject(lat, "p50", lat_quantile(co, 0.5));
    cJSON_AddNumberToObject(lat, "p90", lat_quantile(co, 0.9));
    cJSON_AddNumberToObject(lat, "p99", lat_quantile(co, 0.99));
    uint64_t n = co->st.ok + co->st.failed;
    cJSON_AddNumberToObject(lat, "mean", n ? co->st.lat_sum / (double)n : 0.0);
    cJSON *bk = cJSON_AddArrayToObject(lat, "buckets");
    for (int b = 0; b <= N_LAT_BUCKETS; b++) {
        cJSON *o = cJSON_CreateObject();
        if (b < N_LAT_BUCKETS)
            cJSON_AddNumberToObject(o, "le", lat_bounds_s[b]);
        else
            cJSON_AddStringToObject(o, "le", "+Inf");
        cJSON_AddNumberToObject(o, "count", (double)co->st.lat_buckets[b]);
        cJSON_AddItemToArray(bk, o);
    }
    cJSON *et = cJSON_AddArrayToObject(root, "per_expert_tokens");
    for (int32_t e = 0; e < co->desc->n_experts; e++)
        cJSON_AddItemToArray(et, cJSON_CreateNumber((double)co->st.expert_tokens[e]));
    if (co->st.gpu_steps) {
        cJSON *gp = cJSON_AddObjectToObject(root, "gpu");
        cJSON_AddNumberToObject(gp, "steps", (double)co->st.gpu_steps);
        cJSON_AddNumberToObject(gp, "step_tokens", (double)co->st.gpu_step_tokens);
        cJSON_AddNumberToObject(gp, "step_us_sum", co->st.gpu_step_us);
        cJSON_AddNumberToObject(gp, "compute_us_sum", co->st.gpu_compute_us);
        cJSON_AddNumberToObject(gp, "combine_us_sum", co->st.gpu_combine_us);
        cJSON_AddNumberToObject(gp, "combine_bytes_sum", co->st.gpu_combine_bytes);
        cJSON_AddNumberToObject(gp, "h2d_us_sum", co->st.gpu_h2d_us);
        cJSON_AddNumberToObject(gp, "host_us_sum", co->st.gpu_host_us);
        cJSON_AddNumberToObject(gp, "plan_us_sum", co->st.gpu_plan_us);
        cJSON_AddNumberToObject(gp, "staged_steps", (double)co->st.gpu_staged_steps);
        cJSON_AddNumberToObject(gp, "gather_us_sum", co->st.gpu_gather_us);
        cJSON_AddNumberToObject(gp, "wait_us_sum", co->st.gpu_wait_us);
    }
    cJSON *pa = cJSON_AddObjectToObject(root, "path");
    cJSON_AddNumberToObject(pa, "steps", (double)co->st.path_steps);
    for (int k = 0; k < 8; k++) {
        char key[48];
        snprintf(key, sizeof key, "%s_us_sum", path_names[k]);
        cJSON_AddNumberToObject(pa, key, co->st.path_us[k]);
    }
    cJSON *w = cJSON_AddObjectToObject(root, "workers");
    cJSON_AddNumberToObject(w, "world_size", co->world);
    cJSON_AddNumberToObject(w, "running", co->running);
    cJSON_AddNumberToObject(w, "restarts", (double)co->st.restarts);
    cJSON_AddNumberToObject(w, "epoch", (double)co->epoch);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

static int http_handler(void *user, const char *path, char **body, const char **ctype) {
    coord *co = user;
    if (strcmp(path, "/health") == 0) {
        bool ok = co->gstate == GROUP_READY && !co->draining;
        char buf[640];
        snprintf(buf, sizeof buf, "%s %s%s%s\n", ok ? "ok" : "unavailable",
                 co->draining ? "draining" : gstate_name(co->gstate), co->fail_reason[0] ? ": " : "",
                 co->fail_reason[0] && !ok ? co->fail_reason : "");
        *body = strdup(buf);
        return ok ? 200 : 503;
    }
    if (strcmp(path, "/metrics") != 0) {
        *body = strdup("not found: try /metrics or /health\n");
        return 404;
    }
    *ctype = "text/plain; version=0.0.4; charset=utf-8";
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return 500;
    fprintf(f, "# HELP moe_requests_total SUBMIT requests by outcome.\n# TYPE moe_requests_total counter\n");
    fprintf(f, "moe_requests_total{outcome=\"ok\"} %" PRIu64 "\n", co->st.ok);
    fprintf(f, "moe_requests_total{outcome=\"failed\"} %" PRIu64 "\n", co->st.failed);
    fprintf(f, "moe_requests_total{outcome=\"rejected\"} %" PRIu64 "\n", co->st.rejected);
    fprintf(f, "moe_requests_total{outcome=\"busy\"} %" PRIu64 "\n", co->st.busy);
    fprintf(f, "# HELP moe_tokens_total Tokens computed.\n# TYPE moe_tokens_total counter\nmoe_tokens_total %" PRIu64 "\n",
            co->st.tokens);
    fprintf(f, "# HELP moe_steps_total Steps computed.\n# TYPE moe_steps_total counter\nmoe_steps_total %" PRIu64 "\n",
            co->st.steps);
    fprintf(f, "# HELP moe_queue_depth Requests waiting for a step.\n# TYPE moe_queue_depth gauge\nmoe_queue_depth %d\n",
            (int)co->n_queued);
    for (int32_t i = 0; i < co->n_served; i++)
        fprintf(f, "moe_queue_depth_layer{layer=\"%d\"} %d\n", (int)co->served[i], (int)co->queues[co->served[i]].n);
    fprintf(f, "# HELP moe_inflight_steps Steps sent to the workers and not answered.\n# TYPE moe_inflight_steps gauge\n"
               "moe_inflight_steps %d\n",
            (int)co->n_inflight);
    fprintf(f, "# HELP moe_workers_running Worker processes alive.\n# TYPE moe_workers_running gauge\n"
               "moe_workers_running %d\n",
            (int)co->running);
    fprintf(f, "# HELP moe_worker_restarts_total Worker group restarts.\n# TYPE moe_worker_restarts_total counter\n"
               "moe_worker_restarts_total %" PRIu64 "\n",
            co->st.restarts);
    fprintf(f, "# HELP moe_up 1 when the workers are ready and the engine accepts work.\n# TYPE moe_up gauge\n"
               "moe_up %d\n",
            co->gstate == GROUP_READY && !co->draining ? 1 : 0);
    fprintf(f, "# HELP moe_request_latency_seconds From acceptance to reply.\n"
               "# TYPE moe_request_latency_seconds histogram\n");
    uint64_t acc = 0;
    for (int b = 0; b < N_LAT_BUCKETS; b++) {
        acc += co->st.lat_buckets[b];
        fprintf(f, "moe_request_latency_seconds_bucket{le=\"%g\"} %" PRIu64 "\n", lat_bounds_s[b], acc);
    }
    acc += co->st.lat_buckets[N_LAT_BUCKETS];
    fprintf(f, "moe_request_latency_seconds_bucket{le=\"+Inf\"} %" PRIu64 "\n", acc);
    fprintf(f, "moe_request_latency_seconds_sum %.6f\nmoe_request_latency_seconds_count %" PRIu64 "\n", co->st.lat_sum,
            acc);
    fprintf(f, "# HELP moe_step_path_seconds_total Where the answered steps' time went (STATS path), by part.\n"
               "# TYPE moe_step_path_seconds_total counter\n");
    for (int k = 0; k < 8; k++)
        fprintf(f, "moe_step_path_seconds_total{part=\"%s\"} %.6f\n", path_names[k], co->st.path_us[k] * 1e-6);
    fprintf(f, "# HELP moe_step_path_steps_total Steps counted in moe_step_path_seconds_total.\n"
               "# TYPE moe_step_path_steps_total counter\nmoe_step_path_steps_total %" PRIu64 "\n",
            co->st.path_steps);
    fprintf(f, "# HELP moe_expert_tokens_total Tokens routed to each expert.\n# TYPE moe_expert_tokens_total counter\n");
    for (int32_t e = 0; e < co->desc->n_experts; e++)
        fprintf(f, "moe_expert_tokens_total{expert=\"%d\"} %" PRId64 "\n", (int)e, co->st.expert_tokens[e]);
    fclose(f);
    *body = buf;
    return 200;
}

/* ------------------------------------------------------------------------------------------
 * Clients.
 * ---------------------------------------------------------------------------------------- */
static void on_client_msg(ipc_zwatch_t *w, zmq_msg_t *frames, int n, void *user) {
    (void)w;
    coord *co = user;
    if (n < 2) /* a ROUTER always delivers the identity first */
        return;
    bool delim = n == 3 && zmq_msg_size(&frames[1]) == 0;
    if (n > 3 || (n == 3 && !delim)) {
        co->st.rejected++;
        send_error(co, &frames[0], false, IPC_OP_PING, 0, MOE_ERR_FORMAT,
                   "a request is one frame (a REQ client may add one empty delimiter)");
        return;
    }
    zmq_msg_t *body = &frames[n - 1];
    ipc_msg m;
    moe_status st = ipc_decode(zmq_msg_data(body), zmq_msg_size(body), &co->lim, &m);
    if (st != MOE_OK) {
        co->st.rejected++;
        MOE_DEBUG(MOE_SUB_ENG, "rejected a message of %zu bytes: %s", zmq_msg_size(body), moe_errmsg());
        send_error(co, &frames[0], delim, m.op, m.request_id, st, moe_errmsg());
        return;
    }
    switch (m.op) {
    case IPC_OP_PING: {
        co->st.pings++;
        ipc_msg rep;
        ipc_reply_init(&rep, IPC_OP_PING, m.request_id);
        send_msg_to_client(co, &frames[0], delim, &rep);
        return;
    }
    case IPC_OP_INFO:
    case IPC_OP_STATS: {
        char *js = m.op == IPC_OP_INFO ? info_json(co) : stats_json(co);
        if (m.op == IPC_OP_INFO)
            co->st.infos++;
        else
            co->st.stats_calls++;
        ipc_msg rep;
        ipc_reply_init(&rep, m.op, m.request_id);
        if (!js || ipc_msg_add_bytes(&rep, IPC_SEC_JSON, js, strlen(js)) != MOE_OK)
            send_error(co, &frames[0], delim, m.op, m.request_id, MOE_ERR_NOMEM, "cannot build the reply");
        else
            send_msg_to_client(co, &frames[0], delim, &rep);
        free(js);
        return;
    }
    case IPC_OP_SUBMIT:
        break;
    default:
        co->st.rejected++;
        send_error(co, &frames[0], delim, m.op, m.request_id, MOE_ERR_PROTOCOL, "unknown op");
        return;
    }
    if (co->draining || co->stopping) {
        co->st.shutdown_refused++;
        send_error(co, &frames[0], delim, m.op, m.request_id, MOE_ERR_SHUTDOWN,
                   "the engine is shutting down and accepts no new requests");
        return;
    }
    if (co->gstate == GROUP_FAILED) {
        send_error(co, &frames[0], delim, m.op, m.request_id, MOE_ERR_WORKER, co->fail_reason);
        return;
    }
    if (co->n_queued >= co->cfg.max_queue) {
        co->st.busy++;
        char msg[128];
        snprintf(msg, sizeof msg, "busy: %d requests are queued (max-queue); retry later", (int)co->n_queued);
        send_error(co, &frames[0], delim, m.op, m.request_id, MOE_ERR_BUSY, msg);
        return;
    }
    coord_req *r = calloc(1, sizeof *r);
    if (!r) {
        send_error(co, &frames[0], delim, m.op, m.request_id, MOE_ERR_NOMEM, "out of memory");
        return;
    }
    /* Section offsets for the data path (relative, so they hold after the move). */
    const uint8_t *base = zmq_msg_data(body);
    const ipc_section *sx = ipc_msg_find(&m, IPC_SEC_X), *si = ipc_msg_find(&m, IPC_SEC_TOPK_IDS),
                      *sw = ipc_msg_find(&m, IPC_SEC_TOPK_W), *sl = ipc_msg_find(&m, IPC_SEC_LOGITS);
    r->x_off = (size_t)((const uint8_t *)sx->data - base);
    if (si && sw) {
        r->src = ENG_ROUTE_IDS;
        r->ids_off = (size_t)((const uint8_t *)si->data - base);
        r->w_off = (size_t)((const uint8_t *)sw->data - base);
    } else if (sl) {
        r->src = ENG_ROUTE_LOGITS;
        r->lg_off = (size_t)((const uint8_t *)sl->data - base);
        r->logits_dtype = sl->dtype;
    } else {
        r->src = ENG_ROUTE_HIDDEN;
    }
    zmq_msg_init(&r->ident);
    zmq_msg_init(&r->body);
    zmq_msg_move(&r->ident, &frames[0]);
    zmq_msg_move(&r->body, body);
    r->has_delim = delim;
    r->client_id = m.request_id;
    r->layer = m.layer;
    r->n_tokens = m.n_tokens;
    r->t_accept = now_ns();
    layer_queue *q = &co->queues[m.layer];
    if (q->tail)
        q->tail->next = r;
    else
        q->head = r;
    q->tail = r;
    q->n++;
    co->n_queued++;
    co->st.accepted++;
    schedule(co);
}

/* ------------------------------------------------------------------------------------------
 * Steps.
 * ---------------------------------------------------------------------------------------- */
static moe_status send_to_worker(coord *co, int32_t rank, const ipc_msg *m, zmq_msg_t *extra) {
    zmq_msg_t f[3];
    int n = 0;
    coord_worker *wk = &co->workers[rank];
    zmq_msg_init_size(&f[n], strlen(wk->ident));
    memcpy(zmq_msg_data(&f[n++]), wk->ident, strlen(wk->ident));
    moe_status st = ipc_encode_zmq(m, &f[n]);
    if (st != MOE_OK) {
        zmq_msg_close(&f[0]);
        if (extra)
            zmq_msg_close(extra);
        return st;
    }
    n++;
    if (extra) {
        zmq_msg_init(&f[n]);
        zmq_msg_move(&f[n++], extra);
        zmq_msg_close(extra);
    }
    return ipc_zwatch_send(co->ww, f, n);
}

static coord_step *find_step(coord *co, uint64_t id) {
    for (int32_t i = 0; i < co->n_inflight; i++)
        if (co->inflight[i].id == id)
            return &co->inflight[i];
    return NULL;
}

static void step_remove(coord *co, coord_step *s) {
    if (s->slot >= 0)
        slot_release(&co->slots[s->slot]);
    free(s->reqs);
    int32_t i = (int32_t)(s - co->inflight);
    memmove(&co->inflight[i], &co->inflight[i + 1], sizeof(coord_step) * (size_t)(co->n_inflight - i - 1));
    co->n_inflight--;
}

/* Fails every request of a step and removes it. */
static void step_fail(coord *co, coord_step *s, moe_status status, const char *text) {
    for (int32_t i = 0; i < s->n_reqs; i++)
        req_fail(co, s->reqs[i], status, text);
    step_remove(co, s);
}

/* ---- the shared-memory data path ---- */

static void slot_release(coord_slot *sl) {
    if (atomic_fetch_sub(&sl->refs, 1) != 1)
        return;
    /* any thread: wake the loop to schedule, unless the loop is closing (ZeroMQ releases the
     * last replies during zmq_ctx_term, after the loop is gone) */
    coord *co = sl->co;
    pthread_mutex_lock(&co->wake_mu);
    if (co->wake_ok)
        uv_async_send(&co->slot_async);
    pthread_mutex_unlock(&co->wake_mu);
}

/* ZeroMQ's free callback of a reply sent from a slot (runs on ZeroMQ's thread or ours). */
static void reply_release(void *data, void *hint) {
    (void)data;
    slot_release(hint);
}

static int32_t free_slot(coord *co) {
    for (int32_t i = 0; i < co->cfg.max_inflight_steps; i++)
        if (atomic_load(&co->slots[i].refs) == 0)
            return i;
    return -1;
}

#define COORD_INLINE_COPY_BYTES (128u * 1024u) /* steps up to this many input bytes: copied on the loop */
/* A larger step's copy is split by tokens into up to COORD_COPY_PARTS parts of at least
 * COORD_COPY_PART_BYTES, run by as many threadpool threads at once: one thread copies at what one
 * core's share of the memory system allows (4 MiB took 630-730 us on the GPU hosts, engine run
 * 45), and the worker cannot start before the last byte is in. */
#define COORD_COPY_PARTS 4
#define COORD_COPY_PART_BYTES (256u * 1024u)

/* The copy of a step's inputs into its slot, run by the libuv threadpool in parts. It holds its
 * own references to the request messages, so a request answered (failed) meanwhile cannot free
 * the bytes it reads. */
struct copy_job;
typedef struct copy_part {
    uv_work_t work;
    struct copy_job *job;
    int32_t idx;
} copy_part;
typedef struct copy_job {
    coord *co;
    uint64_t step_id;
    int32_t slot;
    int32_t n;
    int32_t n_parts, parts_left; /* parts_left: touched on the loop thread only */
    bool cancelled;
    int64_t tokens;
    zmq_msg_t *bodies;
    copy_part parts[COORD_COPY_PARTS];
    coord_req snap[]; /* the offsets and sizes of each request (no ownership) */
} copy_job;

/* Tokens [lo, hi) of the step (the requests' tokens one after the other) into the slot. */
static void copy_tokens(const copy_job *j, size_t lo, size_t hi) {
    const eng_shm_layout *l = &j->co->lay;
    uint8_t *slot = eng_shm_slot(&j->co->shm, l, j->slot);
    const size_t es = moe_dtype_size(l->dtype);
    const size_t H = (size_t)l->hidden, K = (size_t)l->top_k, E = (size_t)l->n_experts;
    size_t t0 = 0;
    for (int32_t i = 0; i < j->n && t0 < hi; i++) {
        const coord_req *r = &j->snap[i];
        const uint8_t *b = zmq_msg_data(&j->bodies[i]);
        const size_t T = r->n_tokens, a = lo > t0 ? lo : t0, e = hi < t0 + T ? hi : t0 + T;
        if (a < e) {
            const size_t n = e - a, o = a - t0; /* tokens, and the first one's place in the request */
            memcpy(slot + l->x_off + a * H * es, b + r->x_off + o * H * es, n * H * es);
            if (r->src == ENG_ROUTE_IDS) {
                memcpy(slot + l->ids_off + a * K * 4, b + r->ids_off + o * K * 4, n * K * 4);
                memcpy(slot + l->w_off + a * K * 4, b + r->w_off + o * K * 4, n * K * 4);
            } else if (r->src == ENG_ROUTE_LOGITS) {
                /* a request's logits sit packed in their own dtype from its first token's fp32 place */
                const size_t ls = E * moe_dtype_size((moe_dtype)r->logits_dtype);
                memcpy(slot + l->lg_off + t0 * E * 4 + o * ls, b + r->lg_off + o * ls, n * ls);
            }
        }
        t0 += T;
    }
}

static void copy_work(uv_work_t *w) {
    const copy_part *p = w->data;
    const copy_job *j = p->job;
    const size_t T = (size_t)j->tokens, P = (size_t)j->n_parts, k = (size_t)p->idx;
    copy_tokens(j, T * k / P, T * (k + 1) / P);
}

static coord_step *find_step(coord *co, uint64_t id);
static void send_ready_steps(coord *co);

/* Adds a finished step's time, split (path_names), to STATS "path". The worker's marks come
 * from its own clock: CLOCK_MONOTONIC, the same on every process of the host. Every mark is
 * taken before the message it precedes is sent (a preempted sender must not stretch one part
 * over the next), so the parts add up to at most the client's round trip. */
static void path_record(coord *co, const coord_step *s, uint64_t t_reply) {
    if (!s->trace[0] || !s->t_results || s->n_reqs < 1)
        return;
    uint64_t oldest = UINT64_MAX;
    for (int32_t i = 0; i < s->n_reqs; i++)
        if (s->reqs[i]->t_accept < oldest)
            oldest = s->reqs[i]->t_accept;
    const uint64_t marks[9] = {oldest,      s->t_formed, s->t_sent,    s->trace[0], s->trace[1],
                               s->trace[2], s->trace[3], s->t_results, t_reply};
    for (int k = 0; k < 8; k++)
        co->st.path_us[k] += marks[k + 1] > marks[k] ? (double)(marks[k + 1] - marks[k]) * 1e-3 : 0.0;
    co->st.path_steps++;
}

/* After each part, on the loop; the last one hands the step on. */
static void copy_done(uv_work_t *w, int status) {
    copy_part *p = w->data;
    copy_job *j = p->job;
    if (status != 0)
        j->cancelled = true;
    if (--j->parts_left > 0)
        return;
    coord *co = j->co;
    for (int32_t i = 0; i < j->n; i++)
        zmq_msg_close(&j->bodies[i]);
    coord_step *s = find_step(co, j->step_id);
    if (s && !j->cancelled)
        s->copied = true;
    slot_release(&co->slots[j->slot]);
    free(j->bodies);
    free(j);
    if (s)
        send_ready_steps(co);
}

static moe_status start_copy(coord *co, coord_step *s) {
    copy_job *j = calloc(1, sizeof *j + sizeof(coord_req) * (size_t)s->n_reqs);
    zmq_msg_t *bodies = calloc((size_t)s->n_reqs, sizeof(zmq_msg_t));
    if (!j || !bodies) {
        free(j);
        free(bodies);
        return moe_fail(MOE_ERR_NOMEM, "copy job");
    }
    j->co = co;
    j->step_id = s->id;
    j->slot = s->slot;
    j->n = s->n_reqs;
    j->tokens = (int64_t)s->n_tokens;
    j->bodies = bodies;
    for (int32_t i = 0; i < s->n_reqs; i++) {
        j->snap[i] = *s->reqs[i];
        j->snap[i].next = NULL;
        zmq_msg_init(&bodies[i]);
        zmq_msg_copy(&bodies[i], &s->reqs[i]->body); /* reference counted */
    }
    atomic_fetch_add(&co->slots[s->slot].refs, 1);
    /* A small step is copied here, on the loop: the two thread hops of the threadpool (tens of
     * microseconds) would cost more than the copy itself. */
    const eng_shm_layout *l = &co->lay;
    const uint64_t bytes = (uint64_t)s->n_tokens * ((uint64_t)l->hidden * moe_dtype_size(l->dtype) +
                                                    8ull * (uint64_t)l->top_k + 4ull * (uint64_t)l->n_experts);
    uint64_t parts = bytes / COORD_COPY_PART_BYTES;
    parts = parts < 1 ? 1 : parts > COORD_COPY_PARTS ? COORD_COPY_PARTS : parts;
    if (parts > (uint64_t)s->n_tokens)
        parts = s->n_tokens > 0 ? s->n_tokens : 1;
    const int32_t np = (int32_t)parts; /* j is freed by the last part's copy_done */
    j->n_parts = j->parts_left = np;
    for (int32_t k = 0; k < np; k++) {
        j->parts[k].job = j;
        j->parts[k].idx = k;
        j->parts[k].work.data = &j->parts[k];
    }
    if (bytes <= COORD_INLINE_COPY_BYTES) {
        for (int32_t k = 0; k < np; k++) {
            copy_work(&j->parts[k].work);
            copy_done(&j->parts[k].work, 0);
        }
        return MOE_OK;
    }
    MOE_DEBUG(MOE_SUB_ENG, "step %llu: %d requests, %llu input bytes copied in %d parts", (unsigned long long)s->id,
              (int)s->n_reqs, (unsigned long long)bytes, (int)np);
    for (int32_t k = 0; k < np; k++) {
        int rc = uv_queue_work(&co->loop, &j->parts[k].work, copy_work, copy_done);
        if (rc == 0)
            continue;
        if (k == 0) { /* nothing queued: no callback will come */
            atomic_fetch_sub(&co->slots[s->slot].refs, 1);
            for (int32_t i = 0; i < j->n; i++)
                zmq_msg_close(&bodies[i]);
            free(bodies);
            free(j);
            return moe_fail(MOE_ERR_UV, "uv_queue_work: %s", uv_strerror(rc));
        }
        /* parts already queued will finish the job: the rest is copied here */
        MOE_WARN(MOE_SUB_ENG, "uv_queue_work: %s: step %llu's copy part %d of %d on the loop", uv_strerror(rc),
                 (unsigned long long)s->id, (int)k + 1, (int)np);
        copy_work(&j->parts[k].work);
        copy_done(&j->parts[k].work, 0);
    }
    return MOE_OK;
}

/* A STEP, encoded once, through every rank's control ring; a WAKE over ZeroMQ to a worker that
 * said it was going to sleep (it publishes that before its last look at the ring, and we read
 * it after publishing: one of the two sees the other). Reading the flag clears it: one WAKE per
 * sleep, not one per STEP put in the ring meanwhile (stale WAKEs once the worker is busy; its
 * hook drops any that still arrive). */
static moe_status send_step_ctl(coord *co, const ipc_msg *m) {
    void *buf = NULL;
    size_t len = 0;
    MOE_CHECK(ipc_encode_alloc(m, &buf, &len));
    moe_status st = len < CTL_WRAP ? MOE_OK : moe_fail(MOE_ERR_LIMIT, "a STEP of %zu bytes", len);
    for (int32_t rank = 0; rank < co->world && st == MOE_OK; rank++) {
        ctl_ring d, u;
        ctl_rings(co->ctl_map.base, rank, co->ctl_down, co->ctl_up, &d, &u);
        if (ctl_push(&d, buf, (uint32_t)len) != MOE_OK) { /* sized for every STEP in flight: a bug */
            st = moe_fail(MOE_ERR_INTERNAL, "control ring of worker %d: %s", (int)rank, moe_errmsg());
            break;
        }
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_exchange(&d.h->sleeping, 0)) {
            ipc_msg wake;
            ipc_msg_init(&wake, ENG_OP_WAKE, 0);
            st = send_to_worker(co, rank, &wake, NULL);
        }
    }
    moe_free(buf);
    return st;
}

static void worker_msg(coord *co, coord_worker *wk, const void *data, size_t len, zmq_msg_t *reply);

/* The RESULTs waiting in the workers' control rings, handled where they lie (the ring keeps a
 * message until it is popped, and nothing keeps pointers into it after the handler). */
static void poll_ctl(coord *co) {
    if (!co->use_ctl || co->closed)
        return;
    for (int32_t r = 0; r < co->world; r++) {
        coord_worker *wk = &co->workers[r];
        if (!wk->running)
            continue;
        ctl_ring d, u;
        ctl_rings(co->ctl_map.base, r, co->ctl_down, co->ctl_up, &d, &u);
        const uint64_t epoch = co->epoch;
        for (int k = 0; k < 64 && wk->running && co->epoch == epoch; k++) {
            const uint8_t *msg;
            uint32_t len;
            bool have = false;
            if (ctl_peek(&u, &msg, &len, &have) != MOE_OK) {
                group_fail(co, "worker %d: %s", (int)r, moe_errmsg());
                return;
            }
            if (!have)
                break;
            worker_msg(co, wk, msg, len, NULL);
            ctl_pop(&u);
        }
    }
}

/* Sends the STEP messages of the steps whose inputs are in place, in dispatch order (every
 * rank must see the steps in one order). */
static void send_ready_steps(coord *co) {
    for (int32_t k = 0; k < co->n_inflight; k++) {
        coord_step *s = &co->inflight[k];
        if (s->sent)
            continue;
        if (!s->copied)
            return;
        uint8_t *meta = malloc(sizeof(eng_shm_req) * (size_t)s->n_reqs);
        if (!meta) {
            group_fail(co, "out of memory sending step %llu", (unsigned long long)s->id);
            return;
        }
        for (int32_t i = 0; i < s->n_reqs; i++) {
            eng_shm_req q = {.client_id = s->reqs[i]->client_id,
                             .n_tokens = s->reqs[i]->n_tokens,
                             .src = s->reqs[i]->src,
                             .logits_dtype = s->reqs[i]->logits_dtype};
            memcpy(meta + sizeof q * (size_t)i, &q, sizeof q);
        }
        ipc_msg hdr;
        ipc_msg_init(&hdr, ENG_OP_STEP, s->id);
        hdr.layer = s->layer;
        hdr.n_tokens = s->n_tokens;
        hdr.top_k = (uint32_t)s->n_reqs;
        int32_t slot = s->slot;
        moe_status st = ipc_msg_add(&hdr, ENG_SEC_SLOT, MOE_DTYPE_I32, 1, (int64_t[]){1}, &slot);
        if (st == MOE_OK)
            st = ipc_msg_add_bytes(&hdr, ENG_SEC_STEP_REQS, meta, sizeof(eng_shm_req) * (size_t)s->n_reqs);
        s->t_sent = now_ns(); /* before the sends: a worker may have it before this thread runs again */
        if (st == MOE_OK && co->use_ctl)
            st = send_step_ctl(co, &hdr);
        for (int32_t rank = 0; rank < co->world && st == MOE_OK && !co->use_ctl; rank++)
            st = send_to_worker(co, rank, &hdr, NULL);
        free(meta);
        if (st != MOE_OK) {
            group_fail(co, "cannot send step %llu to the workers: %s", (unsigned long long)s->id, moe_errmsg());
            return;
        }
        s->sent = true;
        s->t_dispatch = now_ns();
    }
}

static void on_slot_free(uv_async_t *a) { schedule(a->data); }

/* --busy-poll-us: while steps are in flight, and that long after the last step went out or
 * came back, an active idle handle makes every loop turn poll without blocking, so a message
 * from a worker or a client is seen at once instead of after a wake-up. */
static void on_spin(uv_idle_t *h) {
    coord *co = h->data;
    poll_ctl(co);
    if (co->n_inflight == 0 && now_ns() - co->t_active > (uint64_t)co->cfg.busy_poll_us * 1000ull) {
        uv_idle_stop(h);
    } else {
        sched_yield(); /* ZeroMQ's I/O threads may need this core */
    }
}

static void coord_hot(coord *co) {
    co->t_active = now_ns();
    if (co->cfg.busy_poll_us > 0 && co->handles_inited && !co->closed && !uv_is_active((uv_handle_t *)&co->spin))
        uv_idle_start(&co->spin, on_spin);
}

/* Forms and starts one step of `layer`; false when no slot is free (retried when one frees). */
static bool dispatch(coord *co, int32_t layer) {
    int32_t slot = -1;
    if (co->use_shm) {
        slot = free_slot(co);
        if (slot < 0)
            return false; /* every slot still holds replies in flight */
    }
    layer_queue *q = &co->queues[layer];
    coord_step *s = &co->inflight[co->n_inflight];
    memset(s, 0, sizeof *s);
    uint32_t tokens = 0;
    int32_t n = 0;
    for (coord_req *r = q->head; r && (n == 0 || tokens + r->n_tokens <= (uint32_t)co->cfg.max_step_tokens); r = r->next) {
        tokens += r->n_tokens;
        n++;
    }
    s->reqs = malloc(sizeof(coord_req *) * (size_t)n);
    if (!s->reqs) {
        MOE_ERROR(MOE_SUB_ENG, "out of memory forming a step");
        return false;
    }
    for (int32_t i = 0; i < n; i++) {
        coord_req *r = q->head;
        q->head = r->next;
        r->next = NULL;
        s->reqs[i] = r;
    }
    if (!q->head)
        q->tail = NULL;
    q->n -= n;
    co->n_queued -= n;
    s->id = co->next_step_id++;
    s->epoch = co->epoch;
    s->layer = layer;
    s->n_reqs = n;
    s->n_tokens = tokens;
    s->t_dispatch = s->t_formed = now_ns();
    s->slot = slot;
    coord_hot(co);
    co->n_inflight++;
    moe_status st = MOE_OK;

    if (co->use_shm) {
        atomic_store(&co->slots[slot].refs, 1); /* the step's own reference */
        st = start_copy(co, s);
        if (st != MOE_OK)
            group_fail(co, "cannot stage step %llu: %s", (unsigned long long)s->id, moe_errmsg());
        return true;
    }
    ipc_msg hdr;
    ipc_msg_init(&hdr, ENG_OP_STEP, s->id);
    hdr.layer = layer;
    hdr.n_tokens = tokens;
    hdr.top_k = (uint32_t)n;
    s->t_sent = now_ns(); /* before the sends (as above) */
    for (int32_t rank = 0; rank < co->world && st == MOE_OK; rank++) {
        st = send_to_worker(co, rank, &hdr, NULL);
        for (int32_t i = 0; i < n && st == MOE_OK; i++) {
            ipc_msg rq;
            ipc_msg_init(&rq, ENG_OP_STEP_REQ, s->id);
            rq.n_tokens = (uint32_t)i;
            zmq_msg_t copy;
            zmq_msg_init(&copy);
            zmq_msg_copy(&copy, &s->reqs[i]->body); /* reference counted: no bytes copied */
            st = send_to_worker(co, rank, &rq, &copy);
        }
    }
    s->sent = true;
    if (st != MOE_OK)
        group_fail(co, "cannot send step %llu to the workers: %s", (unsigned long long)s->id, moe_errmsg());
    else
        MOE_TRACE(MOE_SUB_ENG, "step %llu: layer %d, %d requests, %u tokens", (unsigned long long)s->id, (int)layer,
                  (int)n, tokens);
    return true;
}

static void schedule(coord *co) {
    while (co->gstate == GROUP_READY && co->n_inflight < co->cfg.max_inflight_steps && co->n_queued > 0) {
        /* the layer whose oldest request waited longest */
        int32_t best = -1;
        uint64_t oldest = UINT64_MAX;
        for (int32_t i = 0; i < co->n_served; i++) {
            layer_queue *q = &co->queues[co->served[i]];
            if (q->head && q->head->t_accept < oldest) {
                oldest = q->head->t_accept;
                best = co->served[i];
            }
        }
        if (best < 0 || !dispatch(co, best))
            break;
    }
    if (co->draining && co->n_queued == 0 && co->n_inflight == 0)
        begin_close(co);
}

/* ------------------------------------------------------------------------------------------
 * Workers.
 * ---------------------------------------------------------------------------------------- */
static void kill_group(coord *co) {
    for (int32_t r = 0; r < co->world; r++)
        if (co->workers[r].running)
            uv_process_kill(&co->workers[r].proc, SIGKILL);
}

static void spawn_group(coord *co);

static void fail_queued(coord *co, moe_status status, const char *text) {
    for (int32_t i = 0; i < co->n_served; i++) {
        layer_queue *q = &co->queues[co->served[i]];
        while (q->head) {
            coord_req *r = q->head;
            q->head = r->next;
            req_fail(co, r, status, text);
        }
        q->tail = NULL;
        q->n = 0;
    }
    co->n_queued = 0;
}

static void group_fail(coord *co, const char *fmt, ...) {
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (co->gstate == GROUP_STOPPING || co->gstate == GROUP_FAILED)
        return;
    MOE_ERROR(MOE_SUB_ENG, "worker group (epoch %llu) failed: %s", (unsigned long long)co->epoch, why);
    snprintf(co->fail_reason, sizeof co->fail_reason, "%s", why);
    char text[600];
    snprintf(text, sizeof text, "the request was not computed: %s", why);
    while (co->n_inflight > 0)
        step_fail(co, &co->inflight[0], MOE_ERR_WORKER, text);
    co->gstate = GROUP_STOPPING;
    kill_group(co);
    maybe_respawn(co);
}

static void on_worker_closed(uv_handle_t *h) { (void)h; }

static void on_worker_exit(uv_process_t *p, int64_t status, int sig) {
    coord_worker *wk = p->data;
    coord *co = wk->co;
    wk->running = false;
    wk->ready = false;
    co->running--;
    uv_close((uv_handle_t *)p, on_worker_closed);
    if (co->stopping) {
        MOE_INFO(MOE_SUB_ENG, "worker %d (pid %d) exited%s%s", (int)wk->rank, wk->pid, sig ? " by signal " : "",
                 sig ? strsignal(sig) : "");
        if (co->running == 0)
            begin_close(co);
        return;
    }
    if (co->gstate == GROUP_STARTING || co->gstate == GROUP_READY) {
        if (sig)
            group_fail(co, "worker %d (pid %d) was killed by signal %d (%s)", (int)wk->rank, wk->pid, sig, strsignal(sig));
        else
            group_fail(co, "worker %d (pid %d) exited with status %lld", (int)wk->rank, wk->pid, (long long)status);
    }
    maybe_respawn(co);
}

static void spawn_group(coord *co) {
    if (co->stopping)
        return;
    if (co->epoch > 0) {
        if (co->restarts >= co->cfg.max_restarts) {
            co->gstate = GROUP_FAILED;
            char msg[700];
            snprintf(msg, sizeof msg, "the workers failed %d times; the engine gave up (last: %s)", (int)co->restarts,
                     co->fail_reason);
            memcpy(co->fail_reason, msg, sizeof co->fail_reason - 1);
            co->fail_reason[sizeof co->fail_reason - 1] = '\0';
            MOE_ERROR(MOE_SUB_ENG, "%s", msg);
            fail_queued(co, MOE_ERR_WORKER, msg);
            return;
        }
        co->restarts++;
        co->st.restarts++;
        MOE_WARN(MOE_SUB_ENG, "restarting the worker group (restart %d of at most %d)", (int)co->restarts,
                 (int)co->cfg.max_restarts);
    }
    co->epoch++;
    co->has_nccl_id = false;
    co->gstate = GROUP_STARTING;
    co->group_started = now_ns();
    char comm_dir[ENG_PATH_MAX + 32];
    snprintf(comm_dir, sizeof comm_dir, "%s/epoch-%llu", co->rundir, (unsigned long long)co->epoch);
    if (mkdir(comm_dir, 0700) != 0 && errno != EEXIST) {
        group_fail(co, "mkdir %s: %s", comm_dir, strerror(errno));
        return;
    }
    char epoch[24], world[16];
    snprintf(epoch, sizeof epoch, "%llu", (unsigned long long)co->epoch);
    snprintf(world, sizeof world, "%d", (int)co->world);
    const char *backend = strcmp(co->cfg.backend, "auto") == 0 ? (co->cfg.gpus[0] ? "cuda" : "cpu") : co->cfg.backend;
    for (int32_t r = 0; r < co->world; r++) {
        coord_worker *wk = &co->workers[r];
        memset(wk, 0, sizeof *wk);
        wk->co = co;
        wk->rank = r;
        snprintf(wk->ident, sizeof wk->ident, "w%d.%llu", (int)r, (unsigned long long)co->epoch);
        char rank[16], device[16];
        snprintf(rank, sizeof rank, "%d", (int)r);
        snprintf(device, sizeof device, "%d", (int)co->gpu_ids[r]);
        char *args[] = {co->exe,
                        "worker",
                        "--rank",
                        rank,
                        "--world",
                        world,
                        "--epoch",
                        epoch,
                        "--coord",
                        co->worker_ep,
                        "--comm-dir",
                        comm_dir,
                        "--model",
                        co->model_dir,
                        "--backend",
                        (char *)backend,
                        "--placement",
                        co->cfg.placement,
                        "--layers",
                        co->cfg.layers,
                        "--threads",
                        co->worker_threads,
                        "--heartbeat-ms",
                        co->hb_str,
                        "--step-timeout-ms",
                        co->step_to_str,
                        "--start-timeout-ms",
                        co->start_to_str,
                        "--max-step-tokens",
                        co->step_tokens_str,
                        "--device",
                        device,
                        "--dbo",
                        co->cfg.dbo,
                        "--dbo-min-tokens",
                        co->dbo_min_str,
                        "--dbo-min-rows",
                        co->dbo_rows_str,
                        "--dbo-sm-reserve",
                        co->dbo_sm_str,
                        "--dbo-first-share",
                        co->dbo_share_str,
                        "--dbo-split",
                        co->cfg.dbo_split,
                        "--exchange",
                        co->cfg.exchange,
                        "--combine-parts",
                        co->cfg.combine_parts,
                        "--busy-poll-us",
                        co->busy_str,
                        co->use_shm ? "--shm-fd" : NULL,
                        "3",
                        "--shm-slots",
                        co->shm_slots_str,
                        co->use_ctl ? "--ctl-fd" : NULL,
                        "4",
                        "--ctl-down",
                        co->ctl_down_str,
                        "--ctl-up",
                        co->ctl_up_str,
                        NULL};
        uv_stdio_container_t stdio[5] = {{.flags = UV_IGNORE},
                                         {.flags = UV_INHERIT_FD, .data.fd = 1},
                                         {.flags = UV_INHERIT_FD, .data.fd = 2},
                                         {.flags = UV_INHERIT_FD, .data.fd = co->use_shm ? co->shm.fd : 2},
                                         {.flags = UV_INHERIT_FD, .data.fd = co->use_ctl ? co->ctl_map.fd : 2}};
        if (co->use_ctl) { /* the rank's rings start empty (its previous worker has exited) */
            ctl_ring d, u;
            ctl_rings(co->ctl_map.base, r, co->ctl_down, co->ctl_up, &d, &u);
            ctl_reset(&d);
            ctl_reset(&u);
        }
        /* Detached: a new session, so a terminal's Ctrl-C reaches the coordinator alone, which
         * then drains; the workers still die with it (PR_SET_PDEATHSIG). */
        uv_process_options_t opt = {.exit_cb = on_worker_exit,
                                    .file = co->exe,
                                    .args = args,
                                    .stdio_count = co->use_ctl ? 5 : (co->use_shm ? 4 : 3),
                                    .stdio = stdio,
                                    .flags = UV_PROCESS_DETACHED};
        wk->proc.data = wk;
        int rc = uv_spawn(&co->loop, &wk->proc, &opt);
        if (rc != 0) {
            group_fail(co, "cannot start worker %d: %s", (int)r, uv_strerror(rc));
            return;
        }
        wk->running = true;
        wk->pid = wk->proc.pid;
        wk->last_seen = now_ns();
        co->running++;
    }
    MOE_INFO(MOE_SUB_ENG, "started %d workers (epoch %llu, backend %s)", (int)co->world, (unsigned long long)co->epoch,
             backend);
}

/* Starts the next group once every worker of the failed one has exited, no sooner than the
 * back-off allows (100 ms doubling per consecutive restart, at most 5 s), so a crash loop
 * cannot spin; the tick calls it again until it runs. */
static void maybe_respawn(coord *co) {
    if (co->stopping || co->gstate != GROUP_STOPPING || co->running > 0)
        return;
    if (co->respawn_at == 0) {
        uint64_t delay_ms = 100ull << (co->restarts < 6 ? co->restarts : 6);
        if (delay_ms > 5000)
            delay_ms = 5000;
        co->respawn_at = now_ns() + delay_ms * 1000000ull;
    }
    if (now_ns() < co->respawn_at)
        return;
    co->respawn_at = 0;
    spawn_group(co);
}

static coord_worker *worker_by_ident(coord *co, zmq_msg_t *ident) {
    size_t n = zmq_msg_size(ident);
    for (int32_t r = 0; r < co->world; r++) {
        coord_worker *wk = &co->workers[r];
        if (wk->running && strlen(wk->ident) == n && memcmp(wk->ident, zmq_msg_data(ident), n) == 0)
            return wk;
    }
    return NULL;
}

/* Rank 0 wrote each request's encoded reply into the step's slot: check each and hand it to
 * ZeroMQ without copying (the slot stays referenced until ZeroMQ releases the message). */
static bool send_slot_replies(coord *co, coord_step *s) {
    const eng_shm_layout *l = &co->lay;
    uint8_t *out = eng_shm_slot(&co->shm, l, s->slot) + l->out_off;
    size_t off = 0;
    for (int32_t i = 0; i < s->n_reqs; i++) {
        coord_req *r = s->reqs[i];
        size_t len = eng_shm_reply_size(l, r->n_tokens);
        ipc_msg rep;
        ipc_limits rl = ipc_limits_default();
        rl.accept = IPC_ACCEPT_REPLIES;
        rl.max_msg_bytes = UINT64_MAX >> 1;
        if (off + len > l->out_bytes || ipc_decode(out + off, len, &rl, &rep) != MOE_OK ||
            rep.request_id != r->client_id || rep.n_tokens != r->n_tokens) {
            group_fail(co, "worker 0 wrote a malformed reply for step %llu", (unsigned long long)s->id);
            return false;
        }
        zmq_msg_t m;
        atomic_fetch_add(&co->slots[s->slot].refs, 1);
        if (zmq_msg_init_data(&m, out + off, len, reply_release, &co->slots[s->slot]) != 0) {
            slot_release(&co->slots[s->slot]);
            group_fail(co, "zmq_msg_init_data: %s", zmq_strerror(zmq_errno()));
            return false;
        }
        r->answered = true;
        co->st.ok++;
        co->st.tokens += r->n_tokens;
        lat_record(co, r->t_accept);
        send_to_client(co, &r->ident, r->has_delim, &m);
        off = (off + len + 63) & ~(size_t)63;
    }
    return true;
}

static void worker_msg(coord *co, coord_worker *wk, const void *data, size_t len, zmq_msg_t *reply);

static void on_worker_msg(ipc_zwatch_t *w, zmq_msg_t *frames, int n, void *user) {
    (void)w;
    coord *co = user;
    if (n < 2)
        return;
    coord_worker *wk = worker_by_ident(co, &frames[0]);
    if (!wk) /* a worker of an older epoch: its messages are ignored */
        return;
    worker_msg(co, wk, zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1]), n >= 3 ? &frames[2] : NULL);
}

/* One message of worker wk (from its socket or its control ring); reply: the second frame of a
 * REPLY (ZeroMQ data path), else NULL. */
static void worker_msg(coord *co, coord_worker *wk, const void *data, size_t len, zmq_msg_t *reply) {
    ipc_msg m;
    ipc_limits lim = ipc_limits_default();
    lim.allow_internal = true;
    lim.max_msg_bytes = UINT64_MAX >> 1;
    if (ipc_decode(data, len, &lim, &m) != MOE_OK) {
        group_fail(co, "malformed message from worker %d: %s", (int)wk->rank, moe_errmsg());
        return;
    }
    wk->last_seen = now_ns();
    const ipc_section *text = ipc_msg_find(&m, IPC_SEC_TEXT);
    char why[IPC_MAX_TEXT + 1] = "";
    if (text) {
        size_t tl = text->nbytes < IPC_MAX_TEXT ? (size_t)text->nbytes : IPC_MAX_TEXT;
        memcpy(why, text->data, tl);
        why[tl] = '\0';
    }
    switch (m.op) {
    case ENG_OP_HELLO: {
        MOE_DEBUG(MOE_SUB_ENG, "worker %d (pid %u) connected", (int)wk->rank, (unsigned)m.n_tokens);
        wk->hello = true;
        const ipc_section *id = ipc_msg_find(&m, ENG_SEC_NCCL_ID);
        if (wk->rank == 0 && id && id->nbytes == PAR_NCCL_ID_BYTES) {
            memcpy(co->nccl_id, id->data, PAR_NCCL_ID_BYTES);
            co->has_nccl_id = true;
        }
        /* Hand the NCCL id to every rank that has said hello and not got it yet. */
        if (co->has_nccl_id) {
            ipc_msg idm;
            ipc_msg_init(&idm, ENG_OP_NCCL_ID, co->epoch);
            ipc_msg_add(&idm, ENG_SEC_NCCL_ID, IPC_DTYPE_BYTES, 1, (int64_t[]){PAR_NCCL_ID_BYTES}, co->nccl_id);
            for (int32_t q = 1; q < co->world; q++) {
                coord_worker *o = &co->workers[q];
                if (o->running && o->hello && !o->id_sent) {
                    if (send_to_worker(co, q, &idm, NULL) == MOE_OK)
                        o->id_sent = true;
                }
            }
        }
        return;
    }
    case ENG_OP_HEARTBEAT:
        wk->steps = m.n_tokens;
        return;
    case ENG_OP_READY: {
        if (m.status != MOE_OK) {
            /* A load error is not cured by a restart: stop trying. */
            MOE_ERROR(MOE_SUB_ENG, "worker %d could not start: %s", (int)wk->rank, why);
            snprintf(co->fail_reason, sizeof co->fail_reason, "worker %d could not start: %s", (int)wk->rank, why);
            co->gstate = GROUP_FAILED;
            kill_group(co);
            fail_queued(co, MOE_ERR_WORKER, co->fail_reason);
            if (co->epoch == 1) { /* at start: the engine cannot serve this model */
                co->exit_code = 1;
                begin_close(co);
            }
            return;
        }
        wk->ready = true;
        int32_t ready = 0;
        for (int32_t r = 0; r < co->world; r++)
            ready += co->workers[r].ready;
        if (ready == co->world && co->gstate == GROUP_STARTING) {
            co->gstate = GROUP_READY;
            co->fail_reason[0] = '\0';
            MOE_INFO(MOE_SUB_ENG, "all %d workers ready in %.2f s (epoch %llu): serving on %s", (int)co->world,
                     (double)(now_ns() - co->group_started) * 1e-9, (unsigned long long)co->epoch, co->cfg.bind);
            schedule(co);
        }
        return;
    }
    case ENG_OP_REPLY: {
        coord_step *s = find_step(co, m.request_id);
        if (!s || !reply || m.n_tokens >= (uint32_t)s->n_reqs || wk->rank != 0) {
            MOE_DEBUG(MOE_SUB_ENG, "dropped a stale reply of step %llu", (unsigned long long)m.request_id);
            return;
        }
        coord_req *r = s->reqs[m.n_tokens];
        if (r->answered)
            return;
        /* Check that the reply is the right one before it reaches the client. */
        ipc_msg rep;
        ipc_limits rl = ipc_limits_default();
        rl.accept = IPC_ACCEPT_REPLIES;
        rl.max_msg_bytes = UINT64_MAX >> 1;
        if (ipc_decode(zmq_msg_data(reply), zmq_msg_size(reply), &rl, &rep) != MOE_OK ||
            rep.request_id != r->client_id || rep.n_tokens != r->n_tokens) {
            group_fail(co, "worker 0 sent a malformed reply for step %llu", (unsigned long long)s->id);
            return;
        }
        r->answered = true;
        co->st.ok++;
        co->st.tokens += r->n_tokens;
        lat_record(co, r->t_accept);
        send_to_client(co, &r->ident, r->has_delim, reply);
        return;
    }
    case ENG_OP_RESULT: {
        coord_step *s = find_step(co, m.request_id);
        if (!s)
            return;
        if (m.status != MOE_OK) {
            group_fail(co, "step %llu failed on worker %d: %s", (unsigned long long)s->id, (int)wk->rank, why);
            return;
        }
        const ipc_section *tm = ipc_msg_find(&m, ENG_SEC_TIMING);
        if (tm && tm->dtype == MOE_DTYPE_F32 && tm->shape[0] == ENG_GPU_TIMING_N) {
            float tv[ENG_GPU_TIMING_N];
            memcpy(tv, tm->data, sizeof tv);
            float *mx[] = {&s->gpu_step_us, &s->gpu_compute_us, NULL, NULL, &s->gpu_h2d_us, &s->gpu_host_us,
                           &s->gpu_plan_us, NULL, &s->gpu_gather_us, &s->gpu_wait_us};
            for (int k = 0; k < ENG_GPU_TIMING_N; k++)
                if (mx[k] && tv[k] > *mx[k])
                    *mx[k] = tv[k];
            co->st.gpu_combine_us += tv[2];
            co->st.gpu_combine_bytes += tv[3];
            s->gpu_staged_ranks += tv[7] > 0.5f;
        }
        const ipc_section *tr = ipc_msg_find(&m, ENG_SEC_TRACE);
        if (tr && tr->nbytes == sizeof s->trace) { /* the last rank to answer sets the pace */
            memcpy(s->trace, tr->data, sizeof s->trace);
            s->t_results = now_ns();
        }
        const ipc_section *et = wk->rank == 0 ? ipc_msg_find(&m, ENG_SEC_EXPERT_TOKENS) : NULL;
        if (et && et->dtype == MOE_DTYPE_I32 && et->shape[0] == co->desc->n_experts) {
            for (int32_t e = 0; e < co->desc->n_experts; e++) {
                int32_t v;
                memcpy(&v, (const char *)et->data + 4 * (size_t)e, 4);
                co->st.expert_tokens[e] += v;
            }
        }
        if (++s->results < co->world)
            return;
        co->st.gpu_step_us += s->gpu_step_us;
        co->st.gpu_compute_us += s->gpu_compute_us;
        co->st.gpu_h2d_us += s->gpu_h2d_us;
        co->st.gpu_host_us += s->gpu_host_us;
        co->st.gpu_plan_us += s->gpu_plan_us;
        co->st.gpu_gather_us += s->gpu_gather_us;
        co->st.gpu_wait_us += s->gpu_wait_us;
        if (s->gpu_step_us > 0) {
            co->st.gpu_steps++;
            co->st.gpu_staged_steps += s->gpu_staged_ranks == co->world;
            co->st.gpu_step_tokens += s->n_tokens;
        }
        co->st.steps++;
        co->st.step_tokens += s->n_tokens;
        const uint64_t t_reply = now_ns(); /* before the replies leave: every mark precedes their arrival */
        if (s->slot >= 0 && !send_slot_replies(co, s))
            return; /* the group failed: the step was answered with errors */
        path_record(co, s, t_reply);
        coord_hot(co);
        for (int32_t i = 0; i < s->n_reqs; i++) {
            if (!s->reqs[i]->answered) /* cannot happen: replies come before the result */
                req_fail(co, s->reqs[i], MOE_ERR_INTERNAL, "worker 0 finished the step without this reply");
            else
                req_free(s->reqs[i]);
        }
        step_remove(co, s);
        schedule(co);
        return;
    }
    default:
        MOE_WARN(MOE_SUB_ENG, "unexpected op 0x%x from worker %d", (unsigned)m.op, (int)wk->rank);
    }
}

/* ------------------------------------------------------------------------------------------
 * Timers, signals, shutdown.
 * ---------------------------------------------------------------------------------------- */
static void on_tick(uv_timer_t *t) {
    coord *co = t->data;
    poll_ctl(co); /* a safety net: while steps are in flight the loop polls them every turn */
    uint64_t now = now_ns();
    if (co->stopping) {
        if (co->running > 0 && now > co->kill_deadline) {
            MOE_WARN(MOE_SUB_ENG, "workers did not exit in time: killing them");
            kill_group(co);
            co->kill_deadline = UINT64_MAX;
        }
        return;
    }
    if (co->draining && now > co->drain_deadline) {
        MOE_WARN(MOE_SUB_ENG, "drain timeout: failing %d queued requests and %d steps in flight", (int)co->n_queued,
                 (int)co->n_inflight);
        fail_queued(co, MOE_ERR_SHUTDOWN, "the engine shut down before this request was computed");
        while (co->n_inflight > 0)
            step_fail(co, &co->inflight[0], MOE_ERR_SHUTDOWN, "the engine shut down before this request was computed");
        begin_close(co);
        return;
    }
    if (co->gstate == GROUP_STOPPING) {
        maybe_respawn(co);
        return;
    }
    if (co->gstate == GROUP_STARTING && now - co->group_started > (uint64_t)co->cfg.start_timeout_ms * 1000000ull) {
        fail_queued(co, MOE_ERR_WORKER, "the workers did not become ready in time (start-timeout-ms)");
        group_fail(co, "the workers did not become ready within %d ms", (int)co->cfg.start_timeout_ms);
        return;
    }
    if (co->gstate != GROUP_READY)
        return;
    for (int32_t i = 0; i < co->n_inflight; i++) {
        if (now - co->inflight[i].t_dispatch > (uint64_t)co->cfg.step_timeout_ms * 1000000ull) {
            group_fail(co, "step %llu was not answered within %d ms", (unsigned long long)co->inflight[i].id,
                       (int)co->cfg.step_timeout_ms);
            return;
        }
    }
    if (co->n_inflight == 0) { /* busy workers do not heartbeat; the step deadline covers them */
        for (int32_t r = 0; r < co->world; r++) {
            coord_worker *wk = &co->workers[r];
            if (now - wk->last_seen > (uint64_t)co->cfg.worker_timeout_ms * 1000000ull) {
                group_fail(co, "worker %d (pid %d) sent no heartbeat for %d ms", (int)r, wk->pid,
                           (int)co->cfg.worker_timeout_ms);
                return;
            }
        }
    }
}

/* Handles are closed with uv_close; uv_run returns once the last one is closed. */
static void on_handle_closed(uv_handle_t *h) { (void)h; }
static void on_zw_closed(ipc_zwatch_t *w, void *user) {
    (void)w;
    (void)user;
}
static void on_cb_closed(void *user) { (void)user; }

/* Stops the workers (SHUTDOWN, then SIGKILL after a grace period), then closes every handle. */
static void begin_close(coord *co) {
    if (!co->stopping) {
        co->stopping = true;
        co->kill_deadline = now_ns() + 3000000000ull;
        MOE_INFO(MOE_SUB_ENG, "stopping: %d workers", (int)co->running);
        ipc_msg m;
        ipc_msg_init(&m, ENG_OP_SHUTDOWN, 0);
        for (int32_t r = 0; r < co->world; r++)
            if (co->workers[r].running)
                send_to_worker(co, r, &m, NULL);
        if (co->gstate == GROUP_STARTING || co->gstate == GROUP_FAILED)
            kill_group(co);
    }
    if (co->running > 0 || co->closed)
        return;
    /* Every worker has exited: close the loop's handles. */
    co->closed = true;
    fail_queued(co, MOE_ERR_SHUTDOWN, "the engine shut down before this request was computed");
    while (co->n_inflight > 0)
        step_fail(co, &co->inflight[0], MOE_ERR_SHUTDOWN, "the engine shut down before this request was computed");
    if (co->cw)
        ipc_zwatch_close(co->cw, on_zw_closed, co);
    if (co->ww)
        ipc_zwatch_close(co->ww, on_zw_closed, co);
    if (co->zap)
        ipc_zap_close(co->zap, on_cb_closed, co);
    if (co->http)
        eng_http_close(co->http, on_cb_closed, co);
    if (co->handles_inited) {
        uv_close((uv_handle_t *)&co->tick, on_handle_closed);
        uv_close((uv_handle_t *)&co->spin, on_handle_closed);
        uv_close((uv_handle_t *)&co->sig_term, on_handle_closed);
        uv_close((uv_handle_t *)&co->sig_int, on_handle_closed);
        uv_close((uv_handle_t *)&co->sig_hup, on_handle_closed);
        pthread_mutex_lock(&co->wake_mu);
        co->wake_ok = false;
        pthread_mutex_unlock(&co->wake_mu);
        uv_close((uv_handle_t *)&co->slot_async, on_handle_closed);
    }
}

static void on_signal(uv_signal_t *h, int sig) {
    coord *co = h->data;
    if (sig == SIGHUP) {
        if (co->zap) {
            if (ipc_zap_reload(co->zap) == MOE_OK)
                MOE_INFO(MOE_SUB_ENG, "SIGHUP: reloaded the allow-list (%llu keys)",
                         (unsigned long long)ipc_zap_get_stats(co->zap).n_keys);
            else
                MOE_ERROR(MOE_SUB_ENG, "SIGHUP: allow-list not reloaded: %s", moe_errmsg());
        }
        return;
    }
    if (co->draining || co->stopping) {
        MOE_WARN(MOE_SUB_ENG, "%s again: stopping now", strsignal(sig));
        fail_queued(co, MOE_ERR_SHUTDOWN, "the engine was stopped");
        while (co->n_inflight > 0)
            step_fail(co, &co->inflight[0], MOE_ERR_SHUTDOWN, "the engine was stopped");
        kill_group(co);
        begin_close(co);
        return;
    }
    co->draining = true;
    co->drain_deadline = now_ns() + (uint64_t)co->cfg.drain_timeout_ms * 1000000ull;
    MOE_INFO(MOE_SUB_ENG, "%s: draining (%d queued, %d steps in flight, up to %d ms)", strsignal(sig),
             (int)co->n_queued, (int)co->n_inflight, (int)co->cfg.drain_timeout_ms);
    if (co->gstate != GROUP_READY) {
        fail_queued(co, MOE_ERR_SHUTDOWN, "the engine shut down before this request was computed");
    }
    schedule(co);
}

/* ------------------------------------------------------------------------------------------
 * Start-up.
 * ---------------------------------------------------------------------------------------- */
void eng_runtime_base(const eng_config *cfg, char *out, size_t cap) {
    const char *x = getenv("XDG_RUNTIME_DIR");
    if (cfg && cfg->runtime_dir[0])
        snprintf(out, cap, "%s", cfg->runtime_dir);
    else if (x && x[0] && access(x, W_OK) == 0)
        snprintf(out, cap, "%s", x);
    else
        snprintf(out, cap, "/tmp");
}

static moe_status parse_served(coord *co) {
    const eng_model_desc *d = co->desc;
    co->layer_served = calloc((size_t)d->n_layers, 1);
    co->served = calloc((size_t)d->n_layers + 1, sizeof(int32_t));
    co->queues = calloc((size_t)d->n_layers, sizeof(layer_queue));
    if (!co->layer_served || !co->served || !co->queues)
        return moe_fail(MOE_ERR_NOMEM, "layers");
    if (strcmp(co->cfg.layers, "all") == 0) {
        for (int32_t i = 0; i < d->n_moe_layers; i++) {
            co->layer_served[d->moe_layers[i]] = 1;
            co->served[co->n_served++] = d->moe_layers[i];
        }
        return MOE_OK;
    }
    const char *p = co->cfg.layers;
    while (*p) {
        char *end = NULL;
        long x = strtol(p, &end, 10);
        MOE_REQUIRE(end != p && x >= 0 && x < d->n_layers && eng_model_is_moe_layer(d, (int32_t)x),
                    MOE_ERR_INVALID_ARG, "--layers %s: layer %ld is not a MoE layer of this model", co->cfg.layers, x);
        if (!co->layer_served[x]) {
            co->layer_served[x] = 1;
            co->served[co->n_served++] = (int32_t)x;
        }
        p = *end == ',' ? end + 1 : end;
    }
    return MOE_OK;
}

static moe_status coord_init(coord *co) {
    moe_status st = MOE_OK;
    co->t_start = now_ns();
    co->next_step_id = 1;
    ssize_t n = readlink("/proc/self/exe", co->exe, sizeof co->exe - 1);
    MOE_REQUIRE(n > 0, MOE_ERR_SYSTEM, "readlink /proc/self/exe: %s", strerror(errno));
    co->exe[n] = '\0';

    /* Runtime folder for the worker sockets. */
    char base[ENG_PATH_MAX];
    eng_runtime_base(&co->cfg, base, sizeof base);
    int k = snprintf(co->rundir, sizeof co->rundir, "%s/moe-engine-%d", base, (int)getpid());
    MOE_REQUIRE(k > 0 && k < 80, MOE_ERR_INVALID_ARG, "runtime folder path too long for sockets: %s", base);
    MOE_REQUIRE(mkdir(co->rundir, 0700) == 0 || errno == EEXIST, MOE_ERR_SYSTEM, "mkdir %s: %s", co->rundir,
                strerror(errno));
    snprintf(co->worker_ep, sizeof co->worker_ep, "ipc://%s/workers", co->rundir);

    /* The model: the embedded default or the folder given; headers checked here, before any
     * worker starts, so that a broken checkpoint is one clear error. */
    if (co->cfg.model[0]) {
        snprintf(co->model_dir, sizeof co->model_dir, "%s", co->cfg.model);
    } else {
        MOE_CHECK(eng_default_model(base, co->model_dir, sizeof co->model_dir));
    }
    MOE_CHECK(eng_ckpt_open(&co->ckpt, co->model_dir));
    co->desc = eng_ckpt_desc(co->ckpt);
    char desc[512];
    MOE_INFO(MOE_SUB_ENG, "model %s: %s", co->model_dir, eng_model_desc_str(co->desc, desc, sizeof desc));
    MOE_CHECK(parse_served(co));
    MOE_REQUIRE(co->n_served > 0, MOE_ERR_INVALID_ARG, "the model has no MoE layer to serve");

    /* Workers and placement. */
    if (co->cfg.gpus[0]) {
        co->world = 0;
        const char *p = co->cfg.gpus;
        while (*p && co->world < MAX_WORKERS) {
            char *end = NULL;
            long g = strtol(p, &end, 10);
            MOE_REQUIRE(end != p && g >= 0 && g < 1024, MOE_ERR_INVALID_ARG, "--gpus %s: not a list of GPU ordinals",
                        co->cfg.gpus);
            for (int32_t q = 0; q < co->world; q++)
                MOE_REQUIRE(co->gpu_ids[q] != (int32_t)g, MOE_ERR_INVALID_ARG, "--gpus %s: GPU %ld twice",
                            co->cfg.gpus, g);
            co->gpu_ids[co->world++] = (int32_t)g;
            p = *end == ',' ? end + 1 : end;
        }
        MOE_REQUIRE(strcmp(co->cfg.backend, "auto") == 0 || strcmp(co->cfg.backend, "cuda") == 0,
                    MOE_ERR_INVALID_ARG, "--gpus needs the cuda backend (not --backend %s)", co->cfg.backend);
    } else {
        co->world = co->cfg.workers;
        MOE_REQUIRE(strcmp(co->cfg.backend, "cuda") != 0, MOE_ERR_INVALID_ARG,
                    "--backend cuda needs --gpus (the GPU of each worker)");
    }
    MOE_REQUIRE(co->world <= co->desc->n_experts && co->world <= MAX_WORKERS, MOE_ERR_INVALID_ARG,
                "%d workers for %d experts: every worker must hold at least one expert", (int)co->world,
                (int)co->desc->n_experts);
    par_place_policy pol;
    MOE_CHECK(par_place_policy_parse(co->cfg.placement, &pol));
    MOE_CHECK(par_placement_init(&co->placement, co->desc->n_experts, co->world, pol));
    eng_model_log_placement(co->desc, &co->placement, co->n_served, true, true, co->desc->dtype);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = co->cfg.worker_threads ? co->cfg.worker_threads : (int)(cores / co->world > 0 ? cores / co->world : 1);
    snprintf(co->worker_threads, sizeof co->worker_threads, "%d", threads);
    snprintf(co->hb_str, sizeof co->hb_str, "%d", (int)co->cfg.heartbeat_ms);
    snprintf(co->step_to_str, sizeof co->step_to_str, "%d", (int)co->cfg.step_timeout_ms);
    snprintf(co->start_to_str, sizeof co->start_to_str, "%d", (int)co->cfg.start_timeout_ms);
    snprintf(co->step_tokens_str, sizeof co->step_tokens_str, "%d", (int)co->cfg.max_step_tokens);
    snprintf(co->dbo_min_str, sizeof co->dbo_min_str, "%d", (int)co->cfg.dbo_min_tokens);
    snprintf(co->dbo_rows_str, sizeof co->dbo_rows_str, "%d", (int)co->cfg.dbo_min_rows);
    snprintf(co->dbo_sm_str, sizeof co->dbo_sm_str, "%d", (int)co->cfg.dbo_sm_reserve);
    snprintf(co->dbo_share_str, sizeof co->dbo_share_str, "%d", (int)co->cfg.dbo_first_share);
    if (co->cfg.busy_poll_us < 0) /* auto */
        co->cfg.busy_poll_us = co->cfg.gpus[0] ? 1000 : 0;
    snprintf(co->busy_str, sizeof co->busy_str, "%d", (int)co->cfg.busy_poll_us);
    co->st.expert_tokens = calloc((size_t)co->desc->n_experts, sizeof(int64_t));
    co->inflight = calloc((size_t)co->cfg.max_inflight_steps + 1, sizeof(coord_step));
    MOE_REQUIRE(co->st.expert_tokens && co->inflight, MOE_ERR_NOMEM, "stats");

    /* Limits of the client-facing decode. */
    co->lim = ipc_limits_default();
    co->lim.max_msg_bytes = (uint64_t)co->cfg.max_msg_bytes;
    co->lim.max_tokens = (uint32_t)co->cfg.max_tokens;
    co->lim.accept = IPC_ACCEPT_REQUESTS;
    co->lim.n_layers = (uint32_t)co->desc->n_layers;
    co->lim.layer_served = co->layer_served;
    co->lim.n_experts = (uint32_t)co->desc->n_experts;
    co->lim.hidden = (uint32_t)co->desc->hidden_size;
    co->lim.top_k = (uint32_t)co->desc->top_k;
    co->lim.dtype_mask = 1u << co->desc->dtype;
    co->lim.can_route = true; /* every worker loads the router */

    /* The shared-memory data path: one slot per step in flight. */
    co->use_shm = strcmp(co->cfg.data_path, "shm") == 0;
    if (co->use_shm) {
        MOE_CHECK(eng_shm_layout_init(&co->lay, co->cfg.max_step_tokens, co->desc->hidden_size, co->desc->n_experts,
                                      co->desc->top_k, co->desc->dtype, co->cfg.max_inflight_steps));
        MOE_CHECK(eng_shm_create(&co->shm, co->lay.total_bytes));
        co->slots = calloc((size_t)co->cfg.max_inflight_steps, sizeof(coord_slot));
        MOE_REQUIRE(co->slots, MOE_ERR_NOMEM, "slots");
        for (int32_t i = 0; i < co->cfg.max_inflight_steps; i++) {
            atomic_init(&co->slots[i].refs, 0);
            co->slots[i].co = co;
        }
        snprintf(co->shm_slots_str, sizeof co->shm_slots_str, "%d", (int)co->cfg.max_inflight_steps);
        MOE_INFO(MOE_SUB_ENG, "data path: shared memory, %d slots of %.1f MiB (pages are used as steps need them)",
                 (int)co->lay.n_slots, (double)co->lay.slot_bytes / (1 << 20));
        /* With busy polling, STEP and RESULT go through rings in shared memory: every STEP in
         * flight fits in a rank's down ring at once (a step has at most one request per token
         * and per queue place), every RESULT in its up ring. */
        if (co->cfg.busy_poll_us > 0) {
            const uint64_t n = (uint64_t)co->cfg.max_inflight_steps + 1;
            const uint64_t reqs = (uint64_t)(co->cfg.max_step_tokens < co->cfg.max_queue ? co->cfg.max_step_tokens
                                                                                        : co->cfg.max_queue);
            co->ctl_down = ctl_ring_bytes(n, 1024 + sizeof(eng_shm_req) * reqs);
            co->ctl_up = ctl_ring_bytes(n, 4096 + 4ull * (uint64_t)co->desc->n_experts);
            const size_t bytes = ctl_map_bytes(co->world, co->ctl_down, co->ctl_up);
            if (bytes <= ((size_t)1 << 30)) {
                MOE_CHECK(eng_shm_create(&co->ctl_map, bytes));
                co->use_ctl = true;
                snprintf(co->ctl_down_str, sizeof co->ctl_down_str, "%llu", (unsigned long long)co->ctl_down);
                snprintf(co->ctl_up_str, sizeof co->ctl_up_str, "%llu", (unsigned long long)co->ctl_up);
                MOE_INFO(MOE_SUB_ENG, "control: STEP and RESULT through shared-memory rings (%.1f KiB a rank), "
                         "busy polling %d us", (double)bytes / 1024.0 / co->world, (int)co->cfg.busy_poll_us);
            } else {
                MOE_WARN(MOE_SUB_ENG, "control: rings of %zu bytes would be too large: STEP and RESULT over ZeroMQ",
                         bytes);
            }
        }
    } else {
        MOE_INFO(MOE_SUB_ENG, "data path: ZeroMQ messages");
    }

    /* Loop, sockets, handles. */
    MOE_UV_CHECK(uv_loop_init(&co->loop));
    co->loop_inited = true;
    co->zctx = zmq_ctx_new();
    MOE_REQUIRE(co->zctx, MOE_ERR_ZMQ, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
    /* I/O thread 0 carries the workers' connections alone, threads 1 .. io_threads the clients':
     * a STEP to a worker never waits behind megabytes of replies being written to a client
     * (GPU run, docs/PERF.md: the ranks received a step up to 15 ms apart, and the first one's
     * x all-gather waited for the last). */
    MOE_REQUIRE(zmq_ctx_set(co->zctx, ZMQ_IO_THREADS, co->cfg.io_threads + 1) == 0, MOE_ERR_ZMQ,
                "zmq_ctx_set(ZMQ_IO_THREADS, %d): %s", (int)co->cfg.io_threads + 1, zmq_strerror(zmq_errno()));
    const uint64_t client_threads = ((1ull << co->cfg.io_threads) - 1) << 1, worker_threads = 1;
    if (co->cfg.curve_secret_file[0] && co->cfg.curve_allow_file[0]) {
        MOE_CHECK(ipc_zap_init(&co->zap, &co->loop, co->zctx, co->cfg.curve_allow_file));
    }
    void *cs = zmq_socket(co->zctx, ZMQ_ROUTER);
    MOE_REQUIRE(cs, MOE_ERR_ZMQ, "zmq_socket: %s", zmq_strerror(zmq_errno()));
    int one = 1, zero = 0;
    zmq_setsockopt(cs, ZMQ_AFFINITY, &client_threads, sizeof client_threads);
    zmq_setsockopt(cs, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(cs, ZMQ_SNDHWM, &zero, sizeof zero);
    MOE_CHECK_GOTO(ipc_socket_limits(cs, &co->lim, 0), st, fail_cs);
    if (co->cfg.curve_secret_file[0])
        MOE_CHECK_GOTO(ipc_curve_server(cs, co->cfg.curve_secret_file, NULL), st, fail_cs);
    if (zmq_bind(cs, co->cfg.bind) != 0) {
        st = moe_fail(MOE_ERR_ZMQ, "cannot bind the client endpoint %s: %s", co->cfg.bind, zmq_strerror(zmq_errno()));
        goto fail_cs;
    }
    ipc_zwatch_params wp = {.batch = 64, .max_queue = co->cfg.max_queue * 2 + 1024, .linger_ms = 1000};
    MOE_CHECK_GOTO(ipc_zwatch_init(&co->cw, &co->loop, cs, &wp, on_client_msg, co), st, fail_cs);

    void *ws = zmq_socket(co->zctx, ZMQ_ROUTER);
    MOE_REQUIRE(ws, MOE_ERR_ZMQ, "zmq_socket: %s", zmq_strerror(zmq_errno()));
    zmq_setsockopt(ws, ZMQ_AFFINITY, &worker_threads, sizeof worker_threads);
    zmq_setsockopt(ws, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(ws, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(ws, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_bind(ws, co->worker_ep) != 0) {
        st = moe_fail(MOE_ERR_ZMQ, "cannot bind the worker endpoint %s: %s", co->worker_ep, zmq_strerror(zmq_errno()));
        zmq_close(ws);
        return st;
    }
    ipc_zwatch_params wwp = {.batch = 256, .max_queue = 1 << 16, .linger_ms = 0};
    MOE_CHECK(ipc_zwatch_init(&co->ww, &co->loop, ws, &wwp, on_worker_msg, co));

    if (co->cfg.http[0]) {
        MOE_CHECK(eng_http_init(&co->http, &co->loop, co->cfg.http, http_handler, co));
        const char *colon = strrchr(co->cfg.http, ':');
        MOE_INFO(MOE_SUB_ENG, "probes on http://%.*s:%d/metrics and /health", (int)(colon - co->cfg.http), co->cfg.http,
                 eng_http_port(co->http));
    }
    uv_async_init(&co->loop, &co->slot_async, on_slot_free);
    co->slot_async.data = co;
    pthread_mutex_lock(&co->wake_mu);
    co->wake_ok = true;
    pthread_mutex_unlock(&co->wake_mu);
    uv_timer_init(&co->loop, &co->tick);
    co->tick.data = co;
    uv_idle_init(&co->loop, &co->spin);
    co->spin.data = co;
    int period = co->cfg.heartbeat_ms < 100 ? co->cfg.heartbeat_ms : 100;
    uv_timer_start(&co->tick, on_tick, (uint64_t)period, (uint64_t)period);
    uv_signal_init(&co->loop, &co->sig_term);
    uv_signal_init(&co->loop, &co->sig_int);
    uv_signal_init(&co->loop, &co->sig_hup);
    co->sig_term.data = co->sig_int.data = co->sig_hup.data = co;
    uv_signal_start(&co->sig_term, on_signal, SIGTERM);
    uv_signal_start(&co->sig_int, on_signal, SIGINT);
    uv_signal_start(&co->sig_hup, on_signal, SIGHUP);
    co->handles_inited = true;
    spawn_group(co);
    return MOE_OK;
fail_cs:
    zmq_close(cs);
    return st;
}

static void coord_free(coord *co) {
    if (co->zctx) /* waits for ZeroMQ to release every reply that points into the slots */
        zmq_ctx_term(co->zctx);
    eng_shm_unmap(&co->shm);
    eng_shm_unmap(&co->ctl_map);
    free(co->slots);
    pthread_mutex_destroy(&co->wake_mu);
    par_placement_free(&co->placement);
    eng_ckpt_close(co->ckpt);
    free(co->layer_served);
    free(co->served);
    free(co->queues);
    free(co->inflight);
    free(co->st.expert_tokens);
    if (co->rundir[0]) {
        char path[ENG_PATH_MAX + 64];
        for (uint64_t e = 1; e <= co->epoch; e++) {
            snprintf(path, sizeof path, "%s/epoch-%llu", co->rundir, (unsigned long long)e);
            for (int32_t r = 0; r < co->world; r++) {
                char sock[ENG_PATH_MAX + 96];
                snprintf(sock, sizeof sock, "%s/comm-%d", path, (int)r);
                unlink(sock);
            }
            rmdir(path);
        }
        snprintf(path, sizeof path, "%s/workers", co->rundir);
        unlink(path);
        rmdir(co->rundir);
    }
}

static void usage_serve(FILE *f) {
    fprintf(f,
            "usage: moe-engine serve [--config FILE] [--SETTING VALUE ...]\n\n"
            "Serves the MoE layers of a checkpoint (or of the embedded default model) to ZeroMQ clients.\n"
            "Every setting can also come from a config file (\"setting value\" lines) or the environment\n"
            "(MOE_SETTING, upper case, '-' as '_'); flags win over the environment, which wins over the file.\n\n"
            "settings:\n");
    eng_config_help(f);
    fprintf(f, "\nsignals: SIGTERM/SIGINT drain and exit 0 (a second one stops at once); SIGHUP reloads the\n"
               "CURVE allow-list.\n");
}

int eng_serve_main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage_serve(stdout);
            return 0;
        }
    }
    coord *co = calloc(1, sizeof *co);
    if (co) {
        co->shm.fd = -1;
        pthread_mutex_init(&co->wake_mu, NULL);
    }
    if (!co) {
        fprintf(stderr, "moe-engine: out of memory\n");
        return 1;
    }
    moe_status st = eng_config_load(&co->cfg, argc, argv);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-engine serve: %s\n(see moe-engine serve --help)\n", moe_errmsg());
        free(co);
        return 2;
    }
    moe_log_set_level_str(co->cfg.log_level);
    if (moe_log_set_subsys_str(co->cfg.log_subsys) != MOE_OK) {
        fprintf(stderr, "moe-engine serve: %s\n", moe_errmsg());
        free(co);
        return 2;
    }
    /* Workers inherit the environment: pass the log settings on. */
    setenv("MOE_LOG_LEVEL", co->cfg.log_level, 1);
    setenv("MOE_LOG_SUBSYS", co->cfg.log_subsys, 1);
    moe_log_set_identity("coord", -1);
    signal(SIGPIPE, SIG_IGN);
    MOE_INFO(MOE_SUB_ENG, "moe-engine %s starting (pid %d)", ENG_VERSION, (int)getpid());
    eng_config_log(&co->cfg);
    int rc = 1;
    st = coord_init(co);
    if (st != MOE_OK) {
        MOE_ERROR(MOE_SUB_ENG, "cannot start: %s", moe_errmsg());
        fprintf(stderr, "moe-engine serve: %s\n", moe_errmsg());
        /* close whatever was opened, and wait for any worker that was started */
        if (co->loop_inited) {
            co->stopping = true;
            kill_group(co);
            begin_close(co);
            uv_run(&co->loop, UV_RUN_DEFAULT);
            uv_loop_close(&co->loop);
        }
        coord_free(co);
        free(co);
        return 1;
    }
    uv_run(&co->loop, UV_RUN_DEFAULT);
    int lc = uv_loop_close(&co->loop);
    if (lc != 0)
        MOE_ERROR(MOE_SUB_ENG, "the loop did not close cleanly: %s", uv_strerror(lc));
    rc = co->exit_code;
    MOE_INFO(MOE_SUB_ENG, "stopped: %llu requests served, %llu failed, %llu steps", (unsigned long long)co->st.ok,
             (unsigned long long)co->st.failed, (unsigned long long)co->st.steps);
    coord_free(co);
    free(co);
    return rc;
}
