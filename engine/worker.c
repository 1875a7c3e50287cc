/*
 * worker.c: `moe-engine worker`, one process per rank, spawned by the coordinator.
 *
 * One thread runs everything: connect to the coordinator (a DEALER socket whose routing id
 * names the rank and epoch), load this rank's experts of the served layers (the router on
 * every rank, so every rank routes the same; the shared expert on the answering rank 0), then
 * the step loop: wait for STEP messages (heartbeating while idle), compute the local
 * contributions, gather them on rank 0 through the communicator, and have rank 0 sum them and
 * send one reply frame per request back in a RESULT.
 *
 * Lifetime: the worker dies with its coordinator (PR_SET_PDEATHSIG, and a check of the
 * parent pid while idle), so no worker outlives the engine. Exit status 0 after SHUTDOWN,
 * 1 on a failure before READY (reported in READY as well), 2 on bad arguments.
 */
#include "engine/engine.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <zmq.h>

#include "engine/gpu_step.h"
#include "engine/model/model.h"
#include "engine/ctl.h"
#include "engine/shm.h"
#include "engine/step.h"
#include "engine/wire.h"
#include "parallel/par.h"

typedef struct worker_args {
    int32_t rank, world;
    uint64_t epoch;
    const char *coord;      /* endpoint of the coordinator's worker socket */
    const char *comm_dir;   /* folder of the communicator's endpoints */
    const char *model;      /* checkpoint folder */
    const char *backend;    /* cpu | cpu-ref | cuda */
    const char *placement;
    const char *layers;     /* "all" or a comma list */
    int32_t threads;
    int32_t heartbeat_ms;
    int32_t busy_poll_us;   /* look for the next message without sleeping this long after a step */
    int32_t step_timeout_ms;
    int32_t device;         /* GPU ordinal (backend cuda) */
    int32_t dbo;            /* 0 off, 1 on, 2 auto */
    int32_t dbo_min_tokens;
    int32_t dbo_min_rows;   /* auto: rows per expert and micro-batch at least */
    int32_t dbo_split;      /* 0 tokens, 1 experts */
    int32_t dbo_sm_reserve; /* SMs left to the exchange while a DBO step's products run */
    int32_t dbo_first_share; /* DBO by experts: percent of each rank's experts in the first part */
    int32_t exchange;       /* 0 p2p (grouped send/recv), 1 ce (ncclAlltoAll, zero-CTA policy) */
    int32_t combine_parts;  /* W > 1: each product call's exchange and copy-out in 1 .. 4 parts (0: auto) */
    int64_t max_step_tokens;
    int32_t start_timeout_ms;
    int32_t shm_fd;    /* the shared-memory data path's descriptor (-1: ZeroMQ data path) */
    int32_t shm_slots;
    int32_t ctl_fd;    /* the control rings' descriptor (-1: STEP and RESULT over ZeroMQ) */
    int64_t ctl_down, ctl_up; /* their data bytes per rank (engine/ctl.h) */
} worker_args;

typedef struct worker {
    worker_args a;
    void *zctx, *sock;
    eng_ckpt_t *ckpt;
    const eng_model_desc *desc;
    par_placement placement;
    eng_model_weights weights;
    eng_layer *layers; /* [weights.n_layers] */
    eng_step_model model;
    kern_ctx_t *kctx;
    par_comm_t *comm;
    bool gpu;           /* backend cuda: the step runs in eng_gpu */
    eng_shm shm;        /* the data path's mapping (base NULL: ZeroMQ data path) */
    eng_shm_layout lay;
    eng_shm ctl_map;    /* the control rings (base NULL: STEP and RESULT over ZeroMQ) */
    ctl_ring ctl_in, ctl_out; /* this rank's: STEPs in, RESULTs out */
    eng_gpu_t *g;
    uint8_t nccl_id[PAR_NCCL_ID_BYTES];
    pid_t parent;
    uint64_t steps_done;
    struct job *jobs; /* [2]: the step running, and the next one received during it */
    int next_job;
} worker;

static void usage_worker(void) {
    fprintf(stderr, "moe-engine worker is started by `moe-engine serve`; it is not meant to be run by hand.\n"
                    "flags: --rank R --world W --epoch N --coord ENDPOINT --comm-dir DIR --model DIR\n"
                    "       --backend cpu|cpu-ref|cuda --placement P --layers L --threads N\n"
                    "       --heartbeat-ms N --busy-poll-us N --step-timeout-ms N --device N --dbo on|off|auto\n"
                    "       --dbo-min-tokens N --dbo-min-rows N --dbo-split tokens|experts --dbo-sm-reserve N --dbo-first-share PCT\n"
                    "       --exchange p2p|ce --combine-parts auto|1..4 --max-step-tokens N\n"
                    "       --start-timeout-ms N\n");
}

static moe_status parse_int(const char *flag, const char *v, int64_t lo, int64_t hi, int64_t *out) {
    char *end = NULL;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || !end || *end || end == v || x < lo || x > hi)
        return moe_fail(MOE_ERR_INVALID_ARG, "worker: %s '%s' is not an integer in [%lld, %lld]", flag, v,
                        (long long)lo, (long long)hi);
    *out = x;
    return MOE_OK;
}

static moe_status parse_args(worker_args *a, int argc, char **argv) {
    memset(a, 0, sizeof *a);
    a->backend = "cpu";
    a->placement = "contiguous";
    a->layers = "all";
    a->heartbeat_ms = 200;
    a->step_timeout_ms = 30000;
    a->dbo = 2;
    a->dbo_min_tokens = 8192;
    a->dbo_min_rows = 256;
    a->dbo_split = 0;
    a->dbo_sm_reserve = 0;
    a->dbo_first_share = 50;
    a->max_step_tokens = 16384;
    a->start_timeout_ms = 120000;
    a->shm_fd = -1;
    a->shm_slots = 2;
    a->ctl_fd = -1;
    a->world = -1;
    a->rank = -1;
    for (int i = 0; i < argc; i++) {
        const char *f = argv[i];
        if (i + 1 >= argc)
            return moe_fail(MOE_ERR_INVALID_ARG, "worker: flag %s needs a value", f);
        const char *v = argv[++i];
        int64_t x;
        if (strcmp(f, "--rank") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 1023, &x));
            a->rank = (int32_t)x;
        } else if (strcmp(f, "--world") == 0) {
            MOE_CHECK(parse_int(f, v, 1, 1024, &x));
            a->world = (int32_t)x;
        } else if (strcmp(f, "--epoch") == 0) {
            MOE_CHECK(parse_int(f, v, 0, INT64_MAX, &x));
            a->epoch = (uint64_t)x;
        } else if (strcmp(f, "--threads") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 1024, &x));
            a->threads = (int32_t)x;
        } else if (strcmp(f, "--heartbeat-ms") == 0) {
            MOE_CHECK(parse_int(f, v, 1, 3600000, &x));
            a->heartbeat_ms = (int32_t)x;
        } else if (strcmp(f, "--busy-poll-us") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 10000000, &x));
            a->busy_poll_us = (int32_t)x;
        } else if (strcmp(f, "--step-timeout-ms") == 0) {
            MOE_CHECK(parse_int(f, v, 1, 3600000, &x));
            a->step_timeout_ms = (int32_t)x;
        } else if (strcmp(f, "--device") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 1023, &x));
            a->device = (int32_t)x;
        } else if (strcmp(f, "--dbo") == 0) {
            if (strcmp(v, "off") == 0)
                a->dbo = 0;
            else if (strcmp(v, "on") == 0)
                a->dbo = 1;
            else if (strcmp(v, "auto") == 0)
                a->dbo = 2;
            else
                return moe_fail(MOE_ERR_INVALID_ARG, "worker: --dbo '%s' is not on, off or auto", v);
        } else if (strcmp(f, "--dbo-split") == 0) {
            if (strcmp(v, "tokens") == 0)
                a->dbo_split = 0;
            else if (strcmp(v, "experts") == 0)
                a->dbo_split = 1;
            else
                return moe_fail(MOE_ERR_INVALID_ARG, "worker: --dbo-split '%s' is not tokens or experts", v);
        } else if (strcmp(f, "--exchange") == 0) {
            if (strcmp(v, "p2p") == 0)
                a->exchange = 0;
            else if (strcmp(v, "ce") == 0)
                a->exchange = 1;
            else
                return moe_fail(MOE_ERR_INVALID_ARG, "worker: --exchange '%s' is not p2p or ce", v);
        } else if (strcmp(f, "--combine-parts") == 0) {
            if (strcmp(v, "auto") == 0) {
                a->combine_parts = 0;
            } else {
                MOE_CHECK(parse_int(f, v, 1, 4, &x));
                a->combine_parts = (int32_t)x;
            }
        } else if (strcmp(f, "--dbo-min-rows") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 1 << 22, &x));
            a->dbo_min_rows = (int32_t)x;
        } else if (strcmp(f, "--dbo-min-tokens") == 0) {
            MOE_CHECK(parse_int(f, v, 1, INT32_MAX, &x));
            a->dbo_min_tokens = (int32_t)x;
        } else if (strcmp(f, "--dbo-sm-reserve") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 112, &x));
            a->dbo_sm_reserve = (int32_t)x;
        } else if (strcmp(f, "--dbo-first-share") == 0) {
            MOE_CHECK(parse_int(f, v, 10, 90, &x));
            a->dbo_first_share = (int32_t)x;
        } else if (strcmp(f, "--max-step-tokens") == 0) {
            MOE_CHECK(parse_int(f, v, 1, 1 << 24, &x));
            a->max_step_tokens = x;
        } else if (strcmp(f, "--shm-fd") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 1 << 20, &x));
            a->shm_fd = (int32_t)x;
        } else if (strcmp(f, "--ctl-fd") == 0) {
            MOE_CHECK(parse_int(f, v, 0, 1 << 20, &x));
            a->ctl_fd = (int32_t)x;
        } else if (strcmp(f, "--ctl-down") == 0) {
            MOE_CHECK(parse_int(f, v, 64, (int64_t)1 << 34, &x));
            a->ctl_down = x;
        } else if (strcmp(f, "--ctl-up") == 0) {
            MOE_CHECK(parse_int(f, v, 64, (int64_t)1 << 34, &x));
            a->ctl_up = x;
        } else if (strcmp(f, "--shm-slots") == 0) {
            MOE_CHECK(parse_int(f, v, 1, 64, &x));
            a->shm_slots = (int32_t)x;
        } else if (strcmp(f, "--start-timeout-ms") == 0) {
            MOE_CHECK(parse_int(f, v, 1, 3600000, &x));
            a->start_timeout_ms = (int32_t)x;
        } else if (strcmp(f, "--coord") == 0) {
            a->coord = v;
        } else if (strcmp(f, "--comm-dir") == 0) {
            a->comm_dir = v;
        } else if (strcmp(f, "--model") == 0) {
            a->model = v;
        } else if (strcmp(f, "--backend") == 0) {
            a->backend = v;
        } else if (strcmp(f, "--placement") == 0) {
            a->placement = v;
        } else if (strcmp(f, "--layers") == 0) {
            a->layers = v;
        } else {
            return moe_fail(MOE_ERR_INVALID_ARG, "worker: unknown flag %s", f);
        }
    }
    MOE_REQUIRE(a->rank >= 0 && a->world >= 1 && a->rank < a->world, MOE_ERR_INVALID_ARG,
                "worker: --rank and --world are required, 0 <= rank < world");
    MOE_REQUIRE(a->coord && a->model && a->comm_dir, MOE_ERR_INVALID_ARG,
                "worker: --coord, --model and --comm-dir are required");
    return MOE_OK;
}

/* Sends one internal message (single frame, or with `more` set: more frames follow). */
static moe_status send_msg(worker *w, const ipc_msg *m, bool more) {
    void *buf = NULL;
    size_t len = 0;
    MOE_CHECK(ipc_encode_alloc(m, &buf, &len));
    int rc = zmq_send(w->sock, buf, len, more ? ZMQ_SNDMORE : 0);
    moe_free(buf);
    if (rc == -1)
        return moe_fail(MOE_ERR_ZMQ, "worker %d: send to the coordinator: %s", (int)w->a.rank, zmq_strerror(zmq_errno()));
    return MOE_OK;
}

/* A RESULT: through the control ring when there is one (a full ring, which its sizing rules
 * out, falls back to ZeroMQ: the coordinator takes RESULTs in any order). */
static moe_status send_result(worker *w, const ipc_msg *m) {
    if (!w->ctl_map.base)
        return send_msg(w, m, false);
    void *buf = NULL;
    size_t len = 0;
    MOE_CHECK(ipc_encode_alloc(m, &buf, &len));
    moe_status st = len < CTL_WRAP ? ctl_push(&w->ctl_out, buf, (uint32_t)len) : MOE_ERR_LIMIT;
    if (st != MOE_OK) {
        MOE_WARN(MOE_SUB_ENG, "worker %d: result of %zu bytes over ZeroMQ: %s", (int)w->a.rank, len, moe_errmsg());
        int rc = zmq_send(w->sock, buf, len, 0);
        st = rc == -1 ? moe_fail(MOE_ERR_ZMQ, "worker %d: send to the coordinator: %s", (int)w->a.rank,
                                 zmq_strerror(zmq_errno()))
                      : MOE_OK;
    }
    moe_free(buf);
    return st;
}

static moe_status send_simple(worker *w, uint16_t op, moe_status status, const char *text, uint32_t n_tokens) {
    ipc_msg m;
    ipc_msg_init(&m, op, w->a.epoch);
    m.layer = w->a.rank;
    m.n_tokens = n_tokens;
    m.status = status;
    if (text && text[0])
        MOE_CHECK(ipc_msg_add_bytes(&m, IPC_SEC_TEXT, text, strnlen(text, IPC_MAX_TEXT)));
    return send_msg(w, &m, false);
}

static void free_zmq_buf(void *data, void *hint) {
    (void)hint;
    moe_free(data);
}

/* Parses "all" or "1,3,5" into the served MoE layers. */
static moe_status parse_layers(const char *s, const eng_model_desc *d, int32_t **out, int32_t *n) {
    *out = NULL;
    *n = 0;
    if (strcmp(s, "all") == 0)
        return MOE_OK;
    int32_t *v = calloc(strlen(s) + 1, sizeof(int32_t));
    if (!v)
        return moe_fail(MOE_ERR_NOMEM, "layers");
    const char *p = s;
    while (*p) {
        char *end = NULL;
        long x = strtol(p, &end, 10);
        if (end == p || x < 0 || x >= d->n_layers || !eng_model_is_moe_layer(d, (int32_t)x)) {
            free(v);
            return moe_fail(MOE_ERR_INVALID_ARG, "layers: '%s' is not a list of MoE layers of this model", s);
        }
        v[(*n)++] = (int32_t)x;
        p = *end == ',' ? end + 1 : end;
    }
    *out = v;
    return MOE_OK;
}

static void log_progress(void *arg, const char *stage, uint64_t done, uint64_t total) {
    worker *w = arg;
    static int last = -1;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (pct / 25 != last / 25 || done == total) {
        last = pct;
        MOE_INFO(MOE_SUB_ENG, "%s: %d%% (%.1f of %.1f MB)", stage, pct, (double)done / 1e6, (double)total / 1e6);
    }
    (void)w;
}

/* Waits for the coordinator's NCCL_ID message (the unique id made by rank 0). */
static moe_status wait_nccl_id(worker *w) {
    uint64_t deadline = moe_now_ns() + (uint64_t)w->a.start_timeout_ms * 1000000ull;
    while (moe_now_ns() < deadline) {
        zmq_pollitem_t it = {w->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 100) <= 0)
            continue;
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->sock, 0) == -1) {
            zmq_msg_close(&m);
            continue;
        }
        ipc_msg h;
        ipc_limits lim = ipc_limits_default();
        lim.allow_internal = true;
        bool ok = ipc_decode(zmq_msg_data(&m), zmq_msg_size(&m), &lim, &h) == MOE_OK && h.op == ENG_OP_NCCL_ID;
        const ipc_section *id = ok ? ipc_msg_find(&h, ENG_SEC_NCCL_ID) : NULL;
        if (id && id->nbytes == PAR_NCCL_ID_BYTES) {
            memcpy(w->nccl_id, id->data, PAR_NCCL_ID_BYTES);
            zmq_msg_close(&m);
            return MOE_OK;
        }
        zmq_msg_close(&m);
    }
    return moe_fail(MOE_ERR_TIMEOUT, "worker %d: no NCCL id from the coordinator within %d ms", (int)w->a.rank,
                    (int)w->a.start_timeout_ms);
}

/* GPU mode: the NCCL communicator (world > 1), the weights uploaded, the host copies freed. */
static void worker_hook(void *arg);

static moe_status worker_gpu_setup(worker *w) {
    MOE_REQUIRE(eng_gpu_available(), MOE_ERR_UNSUPPORTED,
                "this build has no GPU workers (no CUDA toolkit or NCCL at build time)");
    if (w->a.world > 1) {
        if (w->a.rank != 0)
            MOE_CHECK(wait_nccl_id(w));
        par_comm_nccl_params np = {.rank = w->a.rank,
                                   .world_size = w->a.world,
                                   .device = w->a.device,
                                   .init_timeout_ms = w->a.start_timeout_ms,
                                   .cta_policy = w->a.exchange == 1 ? PAR_NCCL_CTA_ZERO : PAR_NCCL_CTA_DEFAULT};
        memcpy(np.unique_id, w->nccl_id, PAR_NCCL_ID_BYTES);
        MOE_CHECK(par_comm_nccl_init(&w->comm, &np));
    }
    eng_gpu_params gp = {.device = w->a.device,
                         .rank = w->a.rank,
                         .model = &w->model,
                         .max_tokens = w->a.max_step_tokens,
                         .comm = w->comm,
                         .timeout_ms = w->a.step_timeout_ms,
                         .dbo = w->a.dbo,
                         .dbo_min_tokens = w->a.dbo_min_tokens,
                         .dbo_min_rows = w->a.dbo_min_rows,
                         .dbo_split = w->a.dbo_split,
                         .dbo_sm_reserve = w->a.dbo_sm_reserve,
                         .dbo_first_share = w->a.dbo_first_share,
                         .exchange = w->a.exchange,
                         .combine_parts = w->a.combine_parts};
    MOE_CHECK(eng_gpu_init(&w->g, &gp, w->layers, w->weights.n_layers));
    eng_gpu_set_hook(w->g, worker_hook, w); /* the next step received and staged while one computes */
    if (w->shm.base) /* copies to and from the device straight from the data path */
        MOE_CHECK(eng_gpu_register_host(w->g, w->shm.base, w->shm.bytes));
    /* The host copies of the weights are no longer needed; the layer list stays (it names the
     * served layers), its tensors cleared. */
    for (int32_t i = 0; i < w->weights.n_layers; i++) {
        int32_t keep = w->layers[i].layer;
        memset(&w->layers[i], 0, sizeof w->layers[i]);
        w->layers[i].layer = keep;
    }
    uint64_t bytes = w->weights.bytes;
    int32_t n_layers = w->weights.n_layers;
    eng_model_weights_free(&w->weights);
    w->weights.bytes = bytes;
    w->weights.n_layers = n_layers;
    return MOE_OK;
}

static moe_status worker_load(worker *w, char *why, size_t whycap) {
    moe_status st = MOE_OK;
    double t0 = moe_now_s();
    MOE_CHECK_GOTO(eng_ckpt_open(&w->ckpt, w->a.model), st, fail);
    w->desc = eng_ckpt_desc(w->ckpt);
    par_place_policy pol;
    MOE_CHECK_GOTO(par_place_policy_parse(w->a.placement, &pol), st, fail);
    MOE_CHECK_GOTO(par_placement_init(&w->placement, w->desc->n_experts, w->a.world, pol), st, fail);
    int32_t *layers = NULL, n_layers = 0;
    MOE_CHECK_GOTO(parse_layers(w->a.layers, w->desc, &layers, &n_layers), st, fail);
    eng_model_load_params lp = eng_model_load_params_default();
    lp.experts = w->placement.experts[w->a.rank];
    lp.n_local = w->placement.n_local[w->a.rank];
    lp.layers = layers;
    lp.n_layers = n_layers;
    lp.router = true;
    /* CPU workers: rank 0 adds the shared expert after the gather; GPU workers: every rank
     * adds it to the rows it owns in the combine. */
    lp.shared = w->a.rank == 0 || strcmp(w->a.backend, "cuda") == 0;
    lp.progress = log_progress;
    lp.progress_arg = w;
    st = eng_model_load(w->ckpt, &lp, &w->weights);
    free(layers);
    if (st != MOE_OK)
        goto fail;
    w->layers = calloc((size_t)w->weights.n_layers, sizeof(eng_layer));
    if (!w->layers) {
        st = moe_fail(MOE_ERR_NOMEM, "worker layers");
        goto fail;
    }
    for (int32_t i = 0; i < w->weights.n_layers; i++) {
        const eng_model_layer *ml = &w->weights.layers[i];
        eng_layer *l = &w->layers[i];
        l->layer = ml->layer;
        l->w13 = ml->w13;
        l->w2 = ml->w2;
        l->router = ml->router;
        l->correction_bias = ml->correction_bias.data;
        l->has_shared = ml->shared_w13.data != NULL;
        l->shared_w13 = ml->shared_w13;
        l->shared_w2 = ml->shared_w2;
        l->shared_gate = ml->shared_gate;
        /* views: the weights struct owns the memory */
        l->w13.owns = l->w2.owns = l->router.owns = false;
        l->shared_w13.owns = l->shared_w2.owns = l->shared_gate.owns = false;
    }
    w->model = (eng_step_model){
        .dtype = w->weights.dtype,
        .hidden = w->desc->hidden_size,
        .n_experts = w->desc->n_experts,
        .top_k = w->desc->top_k,
        .act = w->desc->act,
        .route = w->desc->route,
        .placement = &w->placement,
    };
    if (w->a.shm_fd >= 0) {
        MOE_CHECK_GOTO(eng_shm_layout_init(&w->lay, w->a.max_step_tokens, w->model.hidden, w->model.n_experts,
                                           w->model.top_k, w->model.dtype, w->a.shm_slots),
                       st, fail);
        MOE_CHECK_GOTO(eng_shm_map(&w->shm, w->a.shm_fd, w->lay.total_bytes), st, fail);
    }
    if (w->a.ctl_fd >= 0) {
        MOE_CHECK_GOTO(eng_shm_map(&w->ctl_map, w->a.ctl_fd,
                                   ctl_map_bytes(w->a.world, (uint64_t)w->a.ctl_down, (uint64_t)w->a.ctl_up)),
                       st, fail);
        ctl_rings(w->ctl_map.base, w->a.rank, (uint64_t)w->a.ctl_down, (uint64_t)w->a.ctl_up, &w->ctl_in,
                  &w->ctl_out);
    }
    kern_backend kb;
    MOE_CHECK_GOTO(kern_backend_parse(w->a.backend, &kb), st, fail);
    if (kb == KERN_BACKEND_CUDA) {
        w->gpu = true;
        MOE_CHECK_GOTO(worker_gpu_setup(w), st, fail);
        MOE_INFO(MOE_SUB_ENG, "ready on GPU %d: %d experts, %d layers, %.1f MB uploaded, in %.2f s", (int)w->a.device,
                 (int)w->placement.n_local[w->a.rank], (int)w->weights.n_layers, (double)w->weights.bytes / 1e6,
                 moe_now_s() - t0);
        return MOE_OK;
    }
    kern_ctx_params kp = {.device = 0, .n_threads = w->a.threads, .stream = NULL};
    MOE_CHECK_GOTO(kern_ctx_init(&w->kctx, kb, &kp), st, fail);
    if (w->a.world > 1) {
        par_comm_host_params cp = {
            .rank = w->a.rank, .world_size = w->a.world, .endpoint_dir = w->a.comm_dir, .zmq_ctx = w->zctx};
        MOE_CHECK_GOTO(par_comm_host_init(&w->comm, &cp), st, fail);
    }
    MOE_INFO(MOE_SUB_ENG, "ready: %d experts, %d layers, %.1f MB, backend %s, loaded in %.2f s",
             (int)w->placement.n_local[w->a.rank], (int)w->weights.n_layers, (double)w->weights.bytes / 1e6,
             kern_backend_name(kb), moe_now_s() - t0);
    return MOE_OK;
fail:
    snprintf(why, whycap, "worker %d: %s", (int)w->a.rank, moe_errmsg());
    return st;
}

static const eng_layer *find_layer(const worker *w, int32_t layer) {
    for (int32_t i = 0; i < w->weights.n_layers; i++)
        if (w->layers[i].layer == layer)
            return &w->layers[i];
    return NULL;
}

typedef struct step_frames {
    int n;
    zmq_msg_t *msg;   /* [n] the request frames */
    ipc_msg *dec;     /* [n] decoded views */
    void **owned;     /* [n] realigned copies */
} step_frames;

static void step_frames_free(step_frames *f) {
    for (int i = 0; i < f->n; i++) {
        zmq_msg_close(&f->msg[i]);
        moe_free(f->owned[i]);
    }
    free(f->msg);
    free(f->dec);
    free(f->owned);
    memset(f, 0, sizeof *f);
}

/* Rank 0 on the shared-memory data path: each request's reply written in place in the slot
 * (y was copied there by the caller, or is copied here from a host buffer). */
static moe_status write_slot_replies(worker *w, int32_t slot, const eng_step_req *reqs, const uint64_t *ids, int n,
                                     const void *y_host) {
    uint8_t *out = eng_shm_slot(&w->shm, &w->lay, slot) + w->lay.out_off;
    const size_t row = (size_t)w->model.hidden * moe_dtype_size(w->model.dtype);
    size_t off = 0;
    int64_t t0 = 0;
    for (int i = 0; i < n; i++) {
        size_t len = eng_shm_reply_size(&w->lay, reqs[i].n_tokens);
        MOE_REQUIRE(off + len <= w->lay.out_bytes, MOE_ERR_INTERNAL, "slot output area overflow");
        uint8_t *yp = out + off + ENG_SHM_REPLY_HEAD;
        if (y_host)
            memcpy(yp, (const char *)y_host + (size_t)t0 * row, (size_t)reqs[i].n_tokens * row);
        moe_tensor yi = moe_tensor_view2(yp, w->model.dtype, reqs[i].n_tokens, w->model.hidden);
        ipc_msg rep;
        MOE_CHECK(ipc_submit_reply_init(&rep, ids[i], &yi));
        uint64_t so[IPC_MAX_SECTIONS];
        size_t total = 0;
        MOE_CHECK(ipc_section_offsets(&rep, so, &total));
        MOE_REQUIRE(total == len && so[0] == ENG_SHM_REPLY_HEAD, MOE_ERR_INTERNAL, "reply layout mismatch");
        MOE_CHECK(ipc_encode_in_place(&rep, out + off, len, NULL));
        t0 += reqs[i].n_tokens;
        off = (off + len + 63) & ~(size_t)63;
    }
    return MOE_OK;
}

/* One message from the coordinator, received whole: a STEP with its requests (the frames on
 * the ZeroMQ data path; the slot and its request table on the shared-memory one), or another
 * op. The step loop runs one while the next may already be received and staged (the GPU
 * step's hook), so each keeps its own error text. */
typedef struct job {
    bool valid;
    zmq_msg_t head;     /* the header frame (hdr's sections point into it) */
    ipc_msg hdr;
    moe_status st;      /* receiving or preparing it failed: answered with this */
    char why[600];
    step_frames fr;     /* ZeroMQ data path */
    int32_t slot;       /* shared-memory data path: the slot, else -1 */
    eng_shm_req *meta;  /* its request table */
    bool prepared;      /* the requests below are built */
    bool staged;        /* its inputs went to the GPU ahead of it */
    int n_reqs;
    eng_step_req *reqs;
    uint64_t *client_ids;
    void **y_dst;
    const eng_layer *layer;
    uint64_t t_recv;    /* when its receive ended (the RESULT's trace) */
} job;

static void job_fail(job *j, moe_status st) {
    j->st = st;
    snprintf(j->why, sizeof j->why, "%s", moe_errmsg());
}

static void job_free(job *j) {
    if (!j->valid)
        return;
    zmq_msg_close(&j->head);
    step_frames_free(&j->fr);
    free(j->meta);
    free(j->reqs);
    free(j->client_ids);
    free(j->y_dst);
    memset(j, 0, sizeof *j);
}

/* The step's requests from the frames or the slot, checked. */
static moe_status prepare_step(worker *w, job *j) {
    const ipc_msg *hdr = &j->hdr;
    const step_frames *fr = &j->fr;
    const int32_t slot = j->slot, r = w->a.rank;
    const eng_shm_req *meta = j->meta;
    j->prepared = true;
    j->layer = find_layer(w, hdr->layer);
    MOE_REQUIRE(j->layer, MOE_ERR_NOT_FOUND, "worker %d: layer %d is not loaded", (int)r, (int)hdr->layer);
    const int n_reqs = slot >= 0 ? (int)hdr->top_k : fr->n;
    j->n_reqs = n_reqs;
    eng_step_req *reqs = j->reqs = calloc((size_t)(n_reqs ? n_reqs : 1), sizeof *reqs);
    uint64_t *client_ids = j->client_ids = calloc((size_t)(n_reqs ? n_reqs : 1), sizeof *client_ids);
    void **y_dst = j->y_dst = calloc((size_t)(n_reqs ? n_reqs : 1), sizeof *y_dst);
    MOE_REQUIRE(reqs && client_ids && y_dst, MOE_ERR_NOMEM, "step");
    if (slot >= 0) {
        /* the slot's layout (engine/shm.h) */
        uint8_t *b = eng_shm_slot(&w->shm, &w->lay, slot);
        const size_t es = moe_dtype_size(w->model.dtype), H = (size_t)w->model.hidden, K = (size_t)w->model.top_k,
                     E = (size_t)w->model.n_experts;
        size_t t0 = 0, off = 0;
        for (int i = 0; i < n_reqs; i++) {
            const eng_shm_req *q = &meta[i];
            MOE_REQUIRE(!(q->n_tokens == 0 || t0 + q->n_tokens > (size_t)w->lay.max_tokens ||
                          q->src > ENG_ROUTE_HIDDEN ||
                          (q->src == ENG_ROUTE_LOGITS && !moe_dtype_is_float((moe_dtype)q->logits_dtype))),
                        MOE_ERR_INTERNAL, "worker %d: request %d of step %llu is malformed", (int)r, i,
                        (unsigned long long)hdr->request_id);
            reqs[i].n_tokens = q->n_tokens;
            reqs[i].src = (eng_route_src)q->src;
            reqs[i].x = b + w->lay.x_off + t0 * H * es;
            reqs[i].ids = (const int32_t *)(b + w->lay.ids_off + t0 * K * 4);
            reqs[i].weights = (const float *)(b + w->lay.w_off + t0 * K * 4);
            reqs[i].logits = b + w->lay.lg_off + t0 * E * 4;
            reqs[i].logits_dtype = (moe_dtype)q->logits_dtype;
            client_ids[i] = q->client_id;
            y_dst[i] = b + w->lay.out_off + off + ENG_SHM_REPLY_HEAD;
            off = (off + eng_shm_reply_size(&w->lay, q->n_tokens) + 63) & ~(size_t)63;
            t0 += q->n_tokens;
        }
    }
    for (int i = 0; slot < 0 && i < fr->n; i++) {
        const ipc_msg *m = &fr->dec[i];
        const ipc_section *x = ipc_msg_find(m, IPC_SEC_X), *ids = ipc_msg_find(m, IPC_SEC_TOPK_IDS),
                          *wt = ipc_msg_find(m, IPC_SEC_TOPK_W), *lg = ipc_msg_find(m, IPC_SEC_LOGITS);
        MOE_REQUIRE(x && x->dtype == (uint8_t)w->model.dtype && (int32_t)m->layer == hdr->layer, MOE_ERR_INTERNAL,
                    "worker %d: request %d of step %llu does not fit the model", (int)r, i,
                    (unsigned long long)hdr->request_id);
        client_ids[i] = m->request_id;
        reqs[i].n_tokens = m->n_tokens;
        reqs[i].x = x->data;
        if (ids && wt) {
            reqs[i].src = ENG_ROUTE_IDS;
            reqs[i].ids = ids->data;
            reqs[i].weights = wt->data;
        } else if (lg) {
            reqs[i].src = ENG_ROUTE_LOGITS;
            reqs[i].logits = lg->data;
            reqs[i].logits_dtype = (moe_dtype)lg->dtype;
        } else {
            reqs[i].src = ENG_ROUTE_HIDDEN;
        }
    }
    return MOE_OK;
}

/* The step's inputs in the data path's registered memory (shared-memory data path). */
static eng_gpu_io job_io(worker *w, const job *j) {
    uint8_t *b = eng_shm_slot(&w->shm, &w->lay, j->slot);
    return (eng_gpu_io){.x = b + w->lay.x_off,
                        .ids = (const int32_t *)(b + w->lay.ids_off),
                        .w = (const float *)(b + w->lay.w_off),
                        .logits = b + w->lay.lg_off,
                        .y = j->y_dst};
}

/* Runs one prepared step: every rank computes its part; rank 0 answers. */
static moe_status run_step(worker *w, job *j) {
    moe_status st = MOE_OK;
    eng_step s;
    memset(&s, 0, sizeof s);
    const ipc_msg *hdr = &j->hdr;
    const int32_t slot = j->slot;
    const int n_reqs = j->n_reqs;
    const eng_step_req *reqs = j->reqs;
    const uint64_t *client_ids = j->client_ids;
    const eng_layer *layer = j->layer;
    void **recv = NULL;
    size_t *recv_bytes = NULL;
    moe_tensor *bufs = NULL;
    int64_t *gpu_counts = NULL;
    eng_gpu_timing timing;
    bool have_timing = false;
    const int32_t W = w->a.world, r = w->a.rank;
    const void *ydata = NULL;
    const int64_t *counts64 = NULL;
    uint64_t trace[ENG_TRACE_N] = {j->t_recv, moe_now_ns(), 0, 0};
    if (w->gpu) {
        if (r == 0) /* the tokens per expert: rank 0 reports them */
            gpu_counts = calloc((size_t)w->model.n_experts, sizeof(int64_t));
        if (r == 0 && !gpu_counts) {
            st = moe_fail(MOE_ERR_NOMEM, "step counts");
            goto done;
        }
        eng_gpu_io io;
        if (slot >= 0)
            io = job_io(w, j);
        const double t_in = moe_now_s();
        MOE_CHECK_GOTO(eng_gpu_step(w->g, hdr->request_id, hdr->layer, reqs, n_reqs, &ydata, gpu_counts, &timing,
                                    slot >= 0 ? &io : NULL),
                       st, done);
        /* One line per step and rank (monotonic clock: the ranks of a host compare): where the
         * time of a step goes, and how far apart the ranks start it. */
        MOE_DEBUG(MOE_SUB_ENG,
                  "gpu step %llu: %u tokens, entered at %.6f s, left after %.1f us; inputs %s (h2d %.1f us), "
                  "x gather %.1f us, step %.1f us (compute %.1f, combine %.1f), host %.1f us (inputs %.0f, "
                  "gather %.0f, products %.0f, plan %.0f, exchanges %.0f); micro-batches at (products done, "
                  "exchange begun, packed, all-to-all done, exchange done) %.0f %.0f %.0f %.0f %.0f | %.0f %.0f "
                  "%.0f %.0f %.0f us",
                  (unsigned long long)hdr->request_id, (unsigned)hdr->n_tokens, t_in, (moe_now_s() - t_in) * 1e6,
                  timing.staged > 0.5f ? "staged ahead" : "copied at entry", (double)timing.h2d_us,
                  (double)timing.gather_us, (double)timing.step_us, (double)timing.compute_us,
                  (double)timing.combine_us, (double)timing.host_us, (double)timing.host_split_us[0],
                  (double)timing.host_split_us[1], (double)timing.host_split_us[2], (double)timing.host_split_us[3],
                  (double)timing.host_split_us[4], (double)timing.mb_us[0][0], (double)timing.mb_us[0][1],
                  (double)timing.mb_us[0][2], (double)timing.mb_us[0][3], (double)timing.mb_us[0][4],
                  (double)timing.mb_us[1][0], (double)timing.mb_us[1][1], (double)timing.mb_us[1][2],
                  (double)timing.mb_us[1][3], (double)timing.mb_us[1][4]);
        have_timing = true;
        counts64 = gpu_counts;
        goto answer;
    }
    MOE_CHECK_GOTO(eng_step_init(&s, &w->model, layer, r, reqs, n_reqs, w->kctx), st, done);
    if (W == 1) {
        MOE_CHECK_GOTO(eng_step_single(&s, w->kctx), st, done);
    } else {
        MOE_CHECK_GOTO(eng_step_local(&s, w->kctx), st, done);
        const size_t row = (size_t)w->model.hidden * moe_dtype_size(w->model.dtype);
        if (r == 0) {
            recv = calloc((size_t)W, sizeof(void *));
            recv_bytes = calloc((size_t)W, sizeof(size_t));
            bufs = calloc((size_t)W, sizeof(moe_tensor));
            if (!recv || !recv_bytes || !bufs) {
                st = moe_fail(MOE_ERR_NOMEM, "step gather");
                goto done;
            }
            for (int32_t q = 0; q < W; q++) {
                MOE_CHECK_GOTO(moe_tensor_alloc(&bufs[q], w->model.dtype, 2,
                                                (int64_t[]){s.plan.n_pairs[q], w->model.hidden}),
                               st, done);
                recv[q] = bufs[q].data;
                recv_bytes[q] = (size_t)s.plan.n_pairs[q] * row;
            }
        }
        MOE_CHECK_GOTO(par_comm_gatherv(w->comm, hdr->request_id, s.contrib.data, (size_t)s.plan.n_pairs[r] * row,
                                        recv, recv_bytes, 0, w->a.step_timeout_ms, NULL),
                       st, done);
        if (r == 0)
            MOE_CHECK_GOTO(eng_step_combine(&s, (const void *const *)recv, w->kctx), st, done);
    }
    ydata = s.y.data;
    counts64 = s.expert_tokens;

answer:
    trace[2] = moe_now_ns();
    /* Rank 0, shared-memory data path: the replies in place in the slot. */
    if (r == 0 && slot >= 0)
        MOE_CHECK_GOTO(write_slot_replies(w, slot, reqs, client_ids, n_reqs, w->gpu ? NULL : ydata), st, done);
    /* Rank 0, ZeroMQ data path: one REPLY per request (forwarded to its client at once). */
    if (r == 0 && slot < 0) {
        const size_t row = (size_t)w->model.hidden * moe_dtype_size(w->model.dtype);
        int64_t t0 = 0;
        for (int i = 0; i < n_reqs; i++) {
            moe_tensor yi = moe_tensor_view2((char *)ydata + (size_t)t0 * row, w->model.dtype, reqs[i].n_tokens,
                                             w->model.hidden);
            t0 += reqs[i].n_tokens;
            ipc_msg rep, hdr_rep;
            void *buf = NULL;
            size_t len = 0;
            MOE_CHECK_GOTO(ipc_submit_reply_init(&rep, client_ids[i], &yi), st, done);
            MOE_CHECK_GOTO(ipc_encode_alloc(&rep, &buf, &len), st, done);
            ipc_msg_init(&hdr_rep, ENG_OP_REPLY, hdr->request_id);
            hdr_rep.layer = r;
            hdr_rep.n_tokens = (uint32_t)i;
            st = send_msg(w, &hdr_rep, true);
            if (st != MOE_OK) {
                moe_free(buf);
                goto done;
            }
            zmq_msg_t out;
            zmq_msg_init_data(&out, buf, len, free_zmq_buf, NULL);
            if (zmq_msg_send(&out, w->sock, 0) == -1) {
                zmq_msg_close(&out);
                st = moe_fail(MOE_ERR_ZMQ, "worker: send reply: %s", zmq_strerror(zmq_errno()));
                goto done;
            }
        }
    }
    /* RESULT last: the step is complete. */
    {
        ipc_msg res;
        ipc_msg_init(&res, ENG_OP_RESULT, hdr->request_id);
        res.layer = r;
        int32_t *counts = NULL;
        if (r == 0) {
            counts = malloc(sizeof(int32_t) * (size_t)w->model.n_experts);
            if (!counts) {
                st = moe_fail(MOE_ERR_NOMEM, "result");
                goto done;
            }
            for (int32_t e = 0; e < w->model.n_experts; e++)
                counts[e] = (int32_t)counts64[e];
            st = ipc_msg_add(&res, ENG_SEC_EXPERT_TOKENS, MOE_DTYPE_I32, 1, (int64_t[]){w->model.n_experts}, counts);
        }
        float tv[ENG_GPU_TIMING_N] = {timing.step_us, timing.compute_us, timing.combine_us, timing.combine_bytes,
                                      timing.h2d_us,  timing.host_us,    timing.plan_us,      timing.staged,
                                      timing.gather_us, timing.wait_us};
        if (st == MOE_OK && have_timing)
            st = ipc_msg_add(&res, ENG_SEC_TIMING, MOE_DTYPE_F32, 1, (int64_t[]){ENG_GPU_TIMING_N}, tv);
        trace[3] = moe_now_ns();
        if (st == MOE_OK)
            st = ipc_msg_add_bytes(&res, ENG_SEC_TRACE, trace, sizeof trace);
        if (st == MOE_OK)
            st = send_result(w, &res);
        free(counts);
    }
done:
    if (bufs)
        for (int32_t q = 0; q < W; q++)
            moe_tensor_free(&bufs[q]);
    free(bufs);
    free(recv);
    free(recv_bytes);
    free(gpu_counts);
    eng_step_free(&s);
    return st;
}

/* Receives the n STEP_REQ messages that follow a STEP ([header][request] each) into `fr` and
 * decodes each request. Reads all n even after an error, so the next message is a new one. */
static moe_status recv_step_frames(worker *w, const ipc_msg *step, step_frames *fr) {
    memset(fr, 0, sizeof *fr);
    const int32_t n = (int32_t)step->top_k;
    fr->msg = calloc((size_t)(n > 0 ? n : 1), sizeof(zmq_msg_t));
    fr->dec = calloc((size_t)(n > 0 ? n : 1), sizeof(ipc_msg));
    fr->owned = calloc((size_t)(n > 0 ? n : 1), sizeof(void *));
    if (!fr->msg || !fr->dec || !fr->owned)
        return moe_fail(MOE_ERR_NOMEM, "step frames");
    moe_status st = MOE_OK;
    ipc_limits lim = ipc_limits_default();
    lim.max_msg_bytes = UINT64_MAX >> 1;
    ipc_limits ilim = ipc_limits_default();
    ilim.allow_internal = true;
    for (int32_t i = 0; i < n; i++) {
        zmq_msg_t head, body;
        zmq_msg_init(&head);
        zmq_msg_init(&body);
        if (zmq_msg_recv(&head, w->sock, 0) == -1) {
            zmq_msg_close(&head);
            zmq_msg_close(&body);
            return moe_fail(MOE_ERR_ZMQ, "worker: receive step: %s", zmq_strerror(zmq_errno()));
        }
        bool two = zmq_msg_more(&head) && zmq_msg_recv(&body, w->sock, 0) != -1;
        /* drain anything past two frames */
        while (zmq_msg_more(two ? &body : &head)) {
            zmq_msg_t x;
            zmq_msg_init(&x);
            int rc = zmq_msg_recv(&x, w->sock, 0);
            zmq_msg_close(&x);
            two = false;
            if (rc == -1)
                break;
        }
        ipc_msg h;
        moe_status hs = ipc_decode(zmq_msg_data(&head), zmq_msg_size(&head), &ilim, &h);
        zmq_msg_close(&head);
        if (st == MOE_OK && (hs != MOE_OK || !two || h.op != ENG_OP_STEP_REQ || h.request_id != step->request_id ||
                             h.n_tokens != (uint32_t)i))
            st = moe_fail(MOE_ERR_INTERNAL, "worker: request %d of step %llu is malformed", (int)i,
                          (unsigned long long)step->request_id);
        fr->msg[fr->n++] = body;
        if (st == MOE_OK) {
            st = ipc_decode(zmq_msg_data(&fr->msg[i]), zmq_msg_size(&fr->msg[i]), &lim, &fr->dec[i]);
            if (st == MOE_OK && !ipc_msg_aligned(&fr->dec[i]))
                st = ipc_msg_realign(&fr->dec[i], &fr->owned[i]);
        }
    }
    return st;
}

/* Receives the next message from the coordinator into j (the header, then the requests of a
 * STEP): from the control ring when it holds one, else from the socket. False when there was
 * none, or it was dropped (undecodable: logged); true with j valid, its receive errors in
 * j->st. */
static bool recv_job(worker *w, job *j) {
    memset(j, 0, sizeof *j);
    j->slot = -1;
    zmq_msg_init(&j->head);
    const uint8_t *cm = NULL;
    uint32_t cl = 0;
    bool have = false;
    if (w->ctl_map.base && ctl_peek(&w->ctl_in, &cm, &cl, &have) != MOE_OK) {
        /* a corrupt ring cannot be read past: the coordinator's step deadline restarts us */
        MOE_ERROR(MOE_SUB_ENG, "%s", moe_errmsg());
        zmq_msg_close(&j->head);
        return false;
    }
    if (have) {
        int rc = zmq_msg_init_size(&j->head, cl);
        if (rc == 0 && cl)
            memcpy(zmq_msg_data(&j->head), cm, cl);
        ctl_pop(&w->ctl_in);
        if (rc != 0) {
            MOE_ERROR(MOE_SUB_ENG, "out of memory receiving a step of %u bytes", cl);
            return false;
        }
    } else if (zmq_msg_recv(&j->head, w->sock, 0) == -1) {
        zmq_msg_close(&j->head);
        return false;
    }
    bool more = !have && zmq_msg_more(&j->head);
    ipc_limits lim = ipc_limits_default();
    lim.allow_internal = true;
    if (ipc_decode(zmq_msg_data(&j->head), zmq_msg_size(&j->head), &lim, &j->hdr) != MOE_OK) {
        MOE_ERROR(MOE_SUB_ENG, "bad message from the coordinator: %s", moe_errmsg());
        zmq_msg_close(&j->head);
        while (more) { /* drop the rest of the message */
            zmq_msg_t x;
            zmq_msg_init(&x);
            int r2 = zmq_msg_recv(&x, w->sock, 0);
            more = r2 != -1 && zmq_msg_more(&x);
            zmq_msg_close(&x);
        }
        return false;
    }
    j->valid = true;
    if (j->hdr.op != ENG_OP_STEP)
        return true;
    const ipc_section *slot_sec = ipc_msg_find(&j->hdr, ENG_SEC_SLOT), *meta = ipc_msg_find(&j->hdr, ENG_SEC_STEP_REQS);
    if (slot_sec) { /* shared-memory data path */
        int32_t slot = -1;
        if (slot_sec->nbytes == 4)
            memcpy(&slot, slot_sec->data, 4);
        if (!w->shm.base || slot < 0 || slot >= w->lay.n_slots || !meta ||
            meta->nbytes != sizeof(eng_shm_req) * (uint64_t)j->hdr.top_k ||
            !(j->meta = malloc(meta->nbytes ? (size_t)meta->nbytes : 1))) {
            job_fail(j, moe_fail(MOE_ERR_INTERNAL, "worker %d: step %llu names no usable slot", (int)w->a.rank,
                                 (unsigned long long)j->hdr.request_id));
        } else {
            memcpy(j->meta, meta->data, (size_t)meta->nbytes);
            j->slot = slot;
        }
    } else {
        moe_status st = recv_step_frames(w, &j->hdr, &j->fr);
        if (st != MOE_OK)
            job_fail(j, st);
    }
    j->t_recv = moe_now_ns();
    return true;
}

/* The GPU step's hook, between its enqueue and its wait: receives the next message if one is
 * there, and stages a step's inputs on the device while this step computes. */
static void worker_hook(void *arg) {
    worker *w = arg;
    job *j = &w->jobs[w->next_job];
    if (j->valid)
        return;
    for (;;) {
        if (!w->ctl_map.base || ctl_empty(&w->ctl_in)) {
            zmq_pollitem_t it = {w->sock, 0, ZMQ_POLLIN, 0};
            if (zmq_poll(&it, 1, 0) <= 0 || !(it.revents & ZMQ_POLLIN))
                return;
        }
        if (!recv_job(w, j))
            return;
        /* A WAKE is stale once we are busy (the coordinator sends one per sleep; we may have
         * found the STEP in the ring before it arrived). Held here, it would keep the next STEP
         * from being received and staged during this step (engine run 36 saw a step held 20 ms
         * without its successor staged); dropped, the look goes on. */
        if (j->hdr.op != ENG_OP_WAKE)
            break;
        job_free(j);
    }
    if (j->hdr.op != ENG_OP_STEP || j->st != MOE_OK)
        return;
    moe_status st = prepare_step(w, j);
    if (st != MOE_OK) {
        job_fail(j, st);
        return;
    }
    eng_gpu_io io;
    if (j->slot >= 0)
        io = job_io(w, j);
    st = eng_gpu_stage(w->g, j->hdr.request_id, j->reqs, j->n_reqs, j->slot >= 0 ? &io : NULL);
    if (st == MOE_OK)
        j->staged = true;
    else /* the step copies its inputs itself, and reports the error then */
        MOE_DEBUG(MOE_SUB_ENG, "step %llu not staged ahead: %s", (unsigned long long)j->hdr.request_id, moe_errmsg());
}

/* Runs one received message; false on SHUTDOWN. */
static bool process_job(worker *w, job *j) {
    w->next_job ^= 1; /* the hook receives into the other one */
    if (j->hdr.op == ENG_OP_WAKE) { /* the coordinator saw us asleep with a STEP in the ring */
        job_free(j);
        return true;
    }
    if (j->hdr.op == ENG_OP_SHUTDOWN && w->ctl_map.base && !ctl_empty(&w->ctl_in)) {
        /* steps sent before it through the ring come first (the coordinator fails any it no
         * longer waits for) */
        job_free(j);
        job *k = &w->jobs[w->next_job];
        while (!ctl_empty(&w->ctl_in) && recv_job(w, k))
            if (!process_job(w, k))
                return false;
        MOE_INFO(MOE_SUB_ENG, "shutdown after %llu steps", (unsigned long long)w->steps_done);
        return false;
    }
    if (j->hdr.op == ENG_OP_SHUTDOWN) {
        job_free(j);
        MOE_INFO(MOE_SUB_ENG, "shutdown after %llu steps", (unsigned long long)w->steps_done);
        return false;
    }
    if (j->hdr.op != ENG_OP_STEP) {
        MOE_WARN(MOE_SUB_ENG, "unexpected op 0x%x from the coordinator", (unsigned)j->hdr.op);
        job_free(j);
        return true;
    }
    double t0 = moe_now_s();
    if (j->st == MOE_OK && !j->prepared) {
        moe_status st = prepare_step(w, j);
        if (st != MOE_OK)
            job_fail(j, st);
    }
    if (j->st == MOE_OK) {
        moe_status st = run_step(w, j);
        if (st != MOE_OK)
            job_fail(j, st);
    }
    if (j->st != MOE_OK) {
        char msg[700];
        snprintf(msg, sizeof msg, "worker %d, step %llu: %s", (int)w->a.rank, (unsigned long long)j->hdr.request_id,
                 j->why);
        MOE_WARN(MOE_SUB_ENG, "%s", msg);
        ipc_msg res;
        ipc_msg_init(&res, ENG_OP_RESULT, j->hdr.request_id);
        res.layer = w->a.rank;
        res.status = j->st;
        if (ipc_msg_add_bytes(&res, IPC_SEC_TEXT, msg, strlen(msg)) == MOE_OK)
            send_result(w, &res);
    } else {
        w->steps_done++;
        MOE_DEBUG(MOE_SUB_ENG, "step %llu: %u tokens in %.3f ms%s", (unsigned long long)j->hdr.request_id,
                  (unsigned)j->hdr.n_tokens, (moe_now_s() - t0) * 1e3, j->staged ? " (inputs staged ahead)" : "");
    }
    job_free(j);
    return true;
}

static void worker_free(worker *w) {
    if (w->jobs) {
        job_free(&w->jobs[0]);
        job_free(&w->jobs[1]);
        free(w->jobs);
    }
    eng_gpu_free(w->g);
    eng_shm_unmap(&w->shm);
    eng_shm_unmap(&w->ctl_map);
    par_comm_free(w->comm);
    kern_ctx_free(w->kctx);
    free(w->layers);
    eng_model_weights_free(&w->weights);
    par_placement_free(&w->placement);
    eng_ckpt_close(w->ckpt);
    if (w->sock)
        zmq_close(w->sock);
    if (w->zctx)
        zmq_ctx_term(w->zctx);
}

int eng_worker_main(int argc, char **argv) {
    worker w;
    memset(&w, 0, sizeof w);
    w.shm.fd = -1;
    moe_status st = parse_args(&w.a, argc, argv);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-engine worker: %s\n", moe_errmsg());
        usage_worker();
        return 2;
    }
    moe_log_set_identity("worker", w.a.rank);
    w.jobs = calloc(2, sizeof(job));
    if (!w.jobs) {
        fprintf(stderr, "moe-engine worker: out of memory\n");
        return 1;
    }
    /* Die with the coordinator. */
    w.parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != w.parent)
        return 1;
    signal(SIGPIPE, SIG_IGN);

    int rc = 1;
    char why[768] = "";
    w.zctx = zmq_ctx_new();
    w.sock = w.zctx ? zmq_socket(w.zctx, ZMQ_DEALER) : NULL;
    if (!w.sock) {
        MOE_ERROR(MOE_SUB_ENG, "zmq: %s", zmq_strerror(zmq_errno()));
        goto out;
    }
    char id[64];
    int idn = snprintf(id, sizeof id, "w%d.%llu", (int)w.a.rank, (unsigned long long)w.a.epoch);
    int linger = 2000;
    zmq_setsockopt(w.sock, ZMQ_ROUTING_ID, id, (size_t)idn);
    zmq_setsockopt(w.sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(w.sock, w.a.coord) == -1) {
        MOE_ERROR(MOE_SUB_ENG, "connect %s: %s", w.a.coord, zmq_strerror(zmq_errno()));
        goto out;
    }
    {
        /* Rank 0 of a GPU group makes the NCCL unique id; the coordinator hands it out. */
        ipc_msg hello;
        ipc_msg_init(&hello, ENG_OP_HELLO, w.a.epoch);
        hello.layer = w.a.rank;
        hello.n_tokens = (uint32_t)getpid();
        if (strcmp(w.a.backend, "cuda") == 0 && !getenv("NCCL_NVLS_ENABLE"))
            setenv("NCCL_NVLS_ENABLE", "0", 1); /* no NVLink multicast unless the user asks for it */
        if (strcmp(w.a.backend, "cuda") == 0 && w.a.world > 1 && w.a.rank == 0) {
            if (par_comm_nccl_unique_id(w.nccl_id) != MOE_OK) {
                MOE_ERROR(MOE_SUB_ENG, "%s", moe_errmsg());
                snprintf(why, sizeof why, "worker 0: %s", moe_errmsg());
                send_msg(&w, &hello, false);
                send_simple(&w, ENG_OP_READY, MOE_ERR_NCCL, why, 0);
                goto out;
            }
            ipc_msg_add(&hello, ENG_SEC_NCCL_ID, IPC_DTYPE_BYTES, 1, (int64_t[]){PAR_NCCL_ID_BYTES}, w.nccl_id);
        }
        if (send_msg(&w, &hello, false) != MOE_OK)
            goto out;
    }
    st = worker_load(&w, why, sizeof why);
    if (st != MOE_OK) {
        MOE_ERROR(MOE_SUB_ENG, "%s", why);
        send_simple(&w, ENG_OP_READY, st, why, 0);
        goto out;
    }
    char info[256];
    snprintf(info, sizeof info, "{\"weight_bytes\": %llu, \"experts\": %d, \"backend\": \"%s\"}",
             (unsigned long long)w.weights.bytes, (int)w.placement.n_local[w.a.rank], w.a.backend);
    {
        ipc_msg m;
        ipc_msg_init(&m, ENG_OP_READY, w.a.epoch);
        m.layer = w.a.rank;
        if (ipc_msg_add_bytes(&m, IPC_SEC_JSON, info, strlen(info)) != MOE_OK || send_msg(&w, &m, false) != MOE_OK)
            goto out;
    }

    uint64_t last_beat = moe_now_ns(), last_step = 0;
    for (;;) {
        /* A step the previous one's hook already received (and staged) runs at once. */
        if (w.jobs[w.next_job].valid) {
            if (!process_job(&w, &w.jobs[w.next_job])) {
                rc = 0;
                goto out;
            }
            last_beat = last_step = moe_now_ns();
            continue;
        }
        /* --busy-poll-us: right after a step, look without sleeping (no wake-up latency) */
        const bool hot = w.a.busy_poll_us > 0 && moe_now_ns() - last_step < (uint64_t)w.a.busy_poll_us * 1000ull;
        bool ring = w.ctl_map.base && !ctl_empty(&w.ctl_in);
        if (w.ctl_map.base && !ring && !hot) {
            /* about to sleep: say so, then look once more (the coordinator publishes a STEP
             * before it reads the flag, and sends a WAKE over ZeroMQ when it is set) */
            atomic_store(&w.ctl_in.h->sleeping, 1);
            atomic_thread_fence(memory_order_seq_cst);
            ring = !ctl_empty(&w.ctl_in);
        }
        zmq_pollitem_t it = {w.sock, 0, ZMQ_POLLIN, 0};
        int n = zmq_poll(&it, 1, hot || ring ? 0 : w.a.heartbeat_ms);
        if (w.ctl_map.base) {
            atomic_store(&w.ctl_in.h->sleeping, 0);
            ring = ring || !ctl_empty(&w.ctl_in);
        }
        if (n == -1 && zmq_errno() != EINTR) {
            MOE_ERROR(MOE_SUB_ENG, "poll: %s", zmq_strerror(zmq_errno()));
            goto out;
        }
        if (getppid() != w.parent) {
            MOE_WARN(MOE_SUB_ENG, "the coordinator is gone: exiting");
            goto out;
        }
        uint64_t now = moe_now_ns();
        if (now - last_beat >= (uint64_t)w.a.heartbeat_ms * 1000000ull) {
            send_simple(&w, ENG_OP_HEARTBEAT, MOE_OK, NULL, (uint32_t)w.steps_done);
            last_beat = now;
        }
        if (!ring && (n <= 0 || !(it.revents & ZMQ_POLLIN))) {
            if (hot)
                sched_yield(); /* ZeroMQ's I/O thread may need this core */
            continue;
        }
        job *j = &w.jobs[w.next_job];
        if (!recv_job(&w, j))
            continue;
        if (!process_job(&w, j)) {
            rc = 0;
            goto out;
        }
        last_beat = last_step = moe_now_ns();
    }
out:
    worker_free(&w);
    return rc;
}
