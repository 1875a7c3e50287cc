/*
 * bench_engine.c: the whole path against its parts, same machine, same run.
 *
 *   bazel build -c opt //engine:moe-engine //tools/bench:bench_engine
 *   bazel-bin/tools/bench/bench_engine --engine bazel-bin/engine/moe-engine [--workers 2]
 *       [--iters 50] [--model DIR] [--gpu N] [--tokens 1,16,1024] [--busy-poll-us N] [--ipc] [--cpu]
 *
 * With --ipc the engine's clients connect over ipc:// and the overhead is taken against the ipc
 * echo (the "same transport"; default tcp loopback).
 * With --cpu it also prints, after each request size's row, the CPU time of every thread of this
 * program (the client), the engine's coordinator and its workers that was busier than 5% of a
 * core during the 4-in-flight run, and its minor page faults (from /proc): the thread a pipelined
 * run saturates.
 * With --busy-poll-us N the engine, the client (moec_client_set_busy_poll) and both ends of the
 * bare echo poll without sleeping for up to N us while they wait (default: the engine's own
 * default, 1000 with --gpu, else 0).
 * With --gpu N the engine runs one GPU worker on GPU N, and the in-process column is the CUDA
 * kernels on device-resident data (routing from the hidden states + kern_moe_forward, timed
 * with a device synchronize per call): the kernel time the engine's round trip must contain.
 *
 * For each request size T it prints:
 *   in-proc   the same kernels called in this process on the whole model (route from the hidden
 *             states + kern_moe_forward, cpu backend, all cores): the compute the engine must do;
 *   echo      a bare ZeroMQ round trip of the same request and reply sizes over tcp loopback
 *             (DEALER -> ROUTER that answers with a reply of the output's size): the transport;
 *             and the same over ipc:// (what a client on the engine's host could use); both with
 *             client and server in one ZeroMQ context (one I/O thread does both ends: the
 *             cheapest case), and "tcp 2 ctx" with a context each (two I/O threads on the
 *             way, as between a client process and the engine);
 *   engine    the engine's round trip, one request at a time (p50 and p99), and its throughput
 *             with 4 requests in flight; the echoes and the engine's one-at-a-time requests are
 *             measured in five rounds that take turns, so that both see the same moments;
 *   echo 4 fl the echo's throughput with 4 requests outstanding, client and server in a context
 *             each, on the engine's transport, right after the engine's 4-in-flight row, and
 *             eng/echo the engine's 4-in-flight throughput over it (the T >= 1024 goal:
 *             80% of the transport's own throughput, measured the same way);
 *   overhead  engine p50 - in-proc - echo: what the coordinator, the scheduling, the worker
 *             hops and the gather add on top of compute and one transport round trip.
 * and then where the engine's round trip went, one request at a time (means per request, from
 * the engine's STATS "path" and "gpu" read before and after): the client's side (its encode,
 * both transport hops, its decode), the coordinator's queue and staging, the hop to the worker,
 * the worker's start, compute and answer, the hop back and the reply's hand-off; with --gpu
 * also the device's step time inside the worker's compute, and the in-process call split into
 * router, routing, experts (device time, CUDA events) and the host's wait.
 * Napkin math for the default model (E=16, K=4, H=256, I=128, shared I=256, bf16): per token
 * 2*K*3*H*I + 2*3*H*I_s = 1.6 + 0.4 MFLOP; the weights are 7 MiB, so the CPU stays compute-bound.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include <cuda_runtime.h>

#include "engine/base/moe_base.h"
#include "engine/model/model.h"
#include "ipc/moeclient.h"
#include "kernels/cuda/kern_cuda.h"
#include "kernels/kern.h"
#include "tools/common/engine_proc.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double q) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int i = (int)(q * (n - 1) + 0.5);
    return v[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

/* ---- the engine's STATS: "path" (where a step's time went) and the GPU step's device time ---- */
#define N_PATH 8
static const char *const path_keys[N_PATH] = {"queue",          "stage",         "to_worker",  "worker_start",
                                              "worker_compute", "worker_answer", "from_worker", "reply"};
typedef struct path_sums {
    double steps, us[N_PATH];
    engine_gpu_sums gpu;
} path_sums;

static path_sums read_path(moec_client_t *c) {
    path_sums s;
    memset(&s, 0, sizeof s);
    char *js = NULL;
    if (moec_stats(c, &js, 10000) != MOEC_OK)
        return s;
    const char *p = strstr(js, "\"path\":");
    if (p) {
        s.steps = engine_json_num(p, "\"steps\"");
        for (int k = 0; k < N_PATH; k++) {
            char key[64];
            snprintf(key, sizeof key, "\"%s_us_sum\"", path_keys[k]);
            s.us[k] = engine_json_num(p, key);
        }
    }
    s.gpu = engine_gpu_sums_of(js);
    moec_free(js);
    return s;
}

/* ---- bare echo: a ROUTER thread answering each request with `reply_bytes` bytes ---- */
typedef struct echo_srv {
    void *ctx;
    char ep[64];
    size_t reply_bytes;
    bool spin; /* --busy-poll-us: the echo's server and client poll without sleeping too */
    volatile int stop;
    pthread_t th;
} echo_srv;

/* The echo's sends go out without a copy from one constant buffer (never written while in
 * flight), as the engine's client sends from its reused buffers and the coordinator its replies
 * from the slot: the transport's own cost, without an allocation and page faults per message. */
static void send_const(void *sock, const void *buf, size_t n) {
    zmq_msg_t m;
    zmq_msg_init_data(&m, (void *)buf, n, NULL, NULL);
    if (zmq_msg_send(&m, sock, 0) < 0)
        zmq_msg_close(&m);
}

static void *echo_main(void *arg) {
    echo_srv *s = arg;
    void *r = zmq_socket(s->ctx, ZMQ_ROUTER);
    int linger = 0;
    zmq_setsockopt(r, ZMQ_LINGER, &linger, sizeof linger);
    zmq_bind(r, s->ep);
    void *reply = calloc(1, s->reply_bytes + 1);
    while (!s->stop) {
        zmq_pollitem_t it = {r, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, s->spin ? 0 : 50) <= 0) {
            if (s->spin)
                sched_yield();
            continue;
        }
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        zmq_msg_init(&body);
        zmq_msg_recv(&id, r, 0);
        zmq_msg_recv(&body, r, 0);
        zmq_msg_send(&id, r, ZMQ_SNDMORE);
        send_const(r, reply, s->reply_bytes);
        zmq_msg_close(&body);
    }
    free(reply);
    zmq_close(r);
    return NULL;
}

/* The echo: n requests after 5 unrecorded ones, `inflight` of them outstanding at a time;
 * returns the seconds the n took. With inflight 1, t (if not NULL) gets each round trip (us).
 * own_ctx: the client in a ZeroMQ context of its own (two I/O threads on the way, as between two
 * processes); else client and server share one context and its I/O thread. */
static double echo_run(size_t req_bytes, size_t reply_bytes, int n, int inflight, bool ipc, bool spin, bool own_ctx,
                       double *t) {
    echo_srv s = {.reply_bytes = reply_bytes, .spin = spin};
    s.ctx = zmq_ctx_new();
    void *cctx = own_ctx ? zmq_ctx_new() : s.ctx;
    if (ipc)
        snprintf(s.ep, sizeof s.ep, "ipc:///tmp/moe-echo-%d", (int)getpid());
    else
        snprintf(s.ep, sizeof s.ep, "tcp://127.0.0.1:%d", engine_free_port());
    pthread_create(&s.th, NULL, echo_main, &s);
    void *d = zmq_socket(cctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(d, s.ep);
    void *req = calloc(1, req_bytes + 1);
    double t0 = 0, t_sent = 0;
    int sent = 0, done = 0;
    const int total = n + 5;
    while (done < total) {
        while (sent < total && sent - done < inflight) {
            t_sent = moe_now_s();
            send_const(d, req, req_bytes);
            sent++;
        }
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (zmq_msg_recv(&m, d, spin ? ZMQ_DONTWAIT : 0) < 0 && zmq_errno() == EAGAIN)
            sched_yield();
        zmq_msg_close(&m);
        if (t && inflight == 1 && done >= 5)
            t[done - 5] = (moe_now_s() - t_sent) * 1e6;
        if (++done == 5)
            t0 = moe_now_s();
    }
    const double wall = moe_now_s() - t0;
    s.stop = 1;
    pthread_join(s.th, NULL);
    zmq_close(d);
    if (own_ctx)
        zmq_ctx_term(cctx);
    zmq_ctx_term(s.ctx);
    free(req);
    return wall;
}

/* ---- CPU time per thread (Linux /proc), to see which thread a pipelined run saturates ---- */
#define CPU_MAX_THREADS 512
typedef struct thr_cpu {
    int pid, tid;
    char name[48]; /* process/thread */
    double ticks;  /* utime + stime */
    double minflt; /* minor page faults */
} thr_cpu;

/* Reads a /proc stat file into buf; returns its fields after the command's ") " (the command
 * itself, between the parentheses, at *comm with length *comm_len where asked), NULL if the
 * file is gone or not in that form. */
static const char *proc_stat_read(const char *path, char *buf, size_t cap, const char **comm, int *comm_len) {
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t len = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[len] = '\0';
    char *lp = strchr(buf, '('), *rp = strrchr(buf, ')');
    if (!lp || !rp || rp < lp || rp[1] == '\0')
        return NULL;
    if (comm) {
        *comm = lp + 1;
        *comm_len = (int)(rp - lp - 1);
    }
    return rp + 2;
}

/* Appends the threads of process pid to out[*n] (up to cap). */
static void threads_of(int pid, const char *proc, thr_cpu *out, int *n, int cap) {
    char dir[64];
    snprintf(dir, sizeof dir, "/proc/%d/task", pid);
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) && *n < cap) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        char path[400], buf[1024];
        snprintf(path, sizeof path, "%s/%s/stat", dir, de->d_name);
        const char *comm = NULL;
        int comm_len = 0;
        const char *fields = proc_stat_read(path, buf, sizeof buf, &comm, &comm_len);
        /* state (field 3) ... minflt (10) ... utime (14), stime (15) */
        unsigned long long mf = 0, ut = 0, stt = 0;
        if (!fields || sscanf(fields, "%*c %*d %*d %*d %*d %*d %*u %llu %*u %*u %*u %llu %llu", &mf, &ut, &stt) != 3)
            continue;
        thr_cpu *t = &out[(*n)++];
        t->pid = pid;
        t->tid = atoi(de->d_name);
        snprintf(t->name, sizeof t->name, "%s/%.*s", proc, comm_len, comm);
        t->ticks = (double)(ut + stt);
        t->minflt = (double)mf;
    }
    closedir(d);
}

/* The threads of this process, of the engine (pid) and of its children (the workers). */
static int cpu_snapshot(int engine_pid, thr_cpu *out, int cap) {
    int n = 0;
    threads_of(getpid(), "client", out, &n, cap);
    threads_of(engine_pid, "coord", out, &n, cap);
    DIR *d = opendir("/proc");
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        const char *fields = proc_stat_read(path, buf, sizeof buf, NULL, NULL);
        int ppid = 0;
        if (fields && sscanf(fields, "%*c %d", &ppid) == 1 && ppid == engine_pid)
            threads_of(atoi(de->d_name), "worker", out, &n, cap);
    }
    if (d)
        closedir(d);
    return n;
}

/* Prints the threads busier than 5% of a core between two snapshots `secs` apart, busiest first. */
static void cpu_report(const thr_cpu *a, int na, const thr_cpu *b, int nb, double secs) {
    const double hz = (double)sysconf(_SC_CLK_TCK);
    typedef struct {
        const thr_cpu *t;
        double pct, faults;
    } row;
    row rows[CPU_MAX_THREADS];
    int nr = 0;
    for (int i = 0; i < nb; i++) {
        double before = 0, flt = 0;
        for (int j = 0; j < na; j++)
            if (a[j].tid == b[i].tid && a[j].pid == b[i].pid) {
                before = a[j].ticks;
                flt = a[j].minflt;
            }
        const double pct = 100.0 * (b[i].ticks - before) / hz / secs;
        if (pct >= 5.0 && nr < CPU_MAX_THREADS)
            rows[nr++] = (row){&b[i], pct, b[i].minflt - flt};
    }
    for (int i = 1; i < nr; i++) /* insertion sort, busiest first */
        for (int j = i; j > 0 && rows[j].pct > rows[j - 1].pct; j--) {
            row x = rows[j];
            rows[j] = rows[j - 1];
            rows[j - 1] = x;
        }
    for (int i = 0; i < nr; i++)
        printf("    %-32s %-12s %5.0f%% of a core, %8.0f page faults\n", rows[i].t->name,
               rows[i].t->tid == rows[i].t->pid ? "main thread" : "", rows[i].pct, rows[i].faults);
    if (nr == 0)
        printf("    (no thread above 5%%)\n");
}

/* In-process CUDA: the whole model on one GPU, kernels on device-resident data. */
typedef struct cuda_inproc {
    bool on;
    kern_ctx_t *k;
    moe_tensor w13, w2, router, sw13, sw2, sgate, x, lg, ids, wt, y;
} cuda_inproc;

static void *dup_dev(const moe_tensor *h, moe_tensor *d) {
    memset(d, 0, sizeof *d);
    if (!h->data)
        return NULL;
    void *p = NULL;
    if (cudaMalloc(&p, moe_tensor_nbytes(h)) != cudaSuccess)
        return NULL;
    cudaMemcpy(p, h->data, moe_tensor_nbytes(h), cudaMemcpyHostToDevice);
    *d = moe_tensor_view(p, h->dtype, h->ndim, h->shape);
    return p;
}

/* The in-process call split (medians, us): router, routing and experts on the device, and
 * the host's time from the call to the end of its synchronize. */
typedef struct inproc_split {
    double router, route, experts, wall;
} inproc_split;

static double cuda_inproc_us(cuda_inproc *ci, const eng_model_desc *d, const eng_model_layer *l, const moe_tensor *xh,
                             int iters, inproc_split *sp) {
    const int64_t T = xh->shape[0], H = d->hidden_size, E = d->n_experts, K = d->top_k;
    void *p;
    cudaMalloc(&p, moe_tensor_nbytes(xh));
    cudaMemcpy(p, xh->data, moe_tensor_nbytes(xh), cudaMemcpyHostToDevice);
    moe_tensor x = moe_tensor_view2(p, d->dtype, T, H), lg, ids, wt, y;
    cudaMalloc(&p, sizeof(float) * (size_t)(T * E));
    lg = moe_tensor_view2(p, MOE_DTYPE_F32, T, E);
    cudaMalloc(&p, sizeof(int32_t) * (size_t)(T * K));
    ids = moe_tensor_view2(p, MOE_DTYPE_I32, T, K);
    cudaMalloc(&p, sizeof(float) * (size_t)(T * K));
    wt = moe_tensor_view2(p, MOE_DTYPE_F32, T, K);
    cudaMalloc(&p, moe_tensor_nbytes(xh));
    y = moe_tensor_view2(p, d->dtype, T, H);
    kern_route_params rp = eng_model_route_params(d, l);
    float *bias_d = NULL;
    if (rp.correction_bias) {
        cudaMalloc((void **)&bias_d, sizeof(float) * (size_t)E);
        cudaMemcpy(bias_d, rp.correction_bias, sizeof(float) * (size_t)E, cudaMemcpyHostToDevice);
        rp.correction_bias = bias_d;
    }
    cudaDeviceSynchronize(); /* the uploads done before the backend's (non-blocking) stream reads them */
    kern_experts_params ep = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = d->act};
    kern_shared_expert se = {.w13 = &ci->sw13, .w2 = &ci->sw2, .gate = ci->sgate.data ? &ci->sgate : NULL, .act = d->act};
    double *t = calloc((size_t)iters * 4, sizeof *t);
    double *tr = t + iters, *tq = t + 2 * iters, *te = t + 3 * iters;
    cudaStream_t st = (cudaStream_t)kern_cuda_stream(ci->k);
    cudaEvent_t ev[4];
    for (int i = 0; i < 4; i++)
        cudaEventCreate(&ev[i]);
    for (int i = -3; i < iters; i++) {
        double t0 = moe_now_s();
        kern_router_logits(ci->k, &x, &ci->router, &lg);
        kern_route(ci->k, &rp, &lg, &ids, &wt);
        kern_moe_forward(ci->k, &ep, &x, &ci->w13, &ci->w2, &ids, &wt, ci->sw13.data ? &se : NULL, &y);
        kern_ctx_sync(ci->k);
        if (i >= 0)
            t[i] = (moe_now_s() - t0) * 1e6;
    }
    /* the split, in a pass of its own (the events between the kernels cost a little) */
    for (int i = -3; i < iters; i++) {
        cudaEventRecord(ev[0], st);
        kern_router_logits(ci->k, &x, &ci->router, &lg);
        cudaEventRecord(ev[1], st);
        kern_route(ci->k, &rp, &lg, &ids, &wt);
        cudaEventRecord(ev[2], st);
        kern_moe_forward(ci->k, &ep, &x, &ci->w13, &ci->w2, &ids, &wt, ci->sw13.data ? &se : NULL, &y);
        cudaEventRecord(ev[3], st);
        kern_ctx_sync(ci->k);
        float a = 0, b = 0, c = 0;
        cudaEventElapsedTime(&a, ev[0], ev[1]);
        cudaEventElapsedTime(&b, ev[1], ev[2]);
        cudaEventElapsedTime(&c, ev[2], ev[3]);
        if (i >= 0)
            tr[i] = a * 1e3, tq[i] = b * 1e3, te[i] = c * 1e3;
    }
    for (int i = 0; i < 4; i++)
        cudaEventDestroy(ev[i]);
    double med = pct(t, iters, 0.5);
    *sp = (inproc_split){pct(tr, iters, 0.5), pct(tq, iters, 0.5), pct(te, iters, 0.5), med};
    free(t);
    cudaFree(x.data);
    cudaFree(lg.data);
    cudaFree(ids.data);
    cudaFree(wt.data);
    cudaFree(y.data);
    cudaFree(bias_d);
    return med;
}

int main(int argc, char **argv) {
    const char *engine = NULL, *model = NULL, *tokens_s = "1,4,16,64,256,1024";
    int workers = 2, iters = 50, gpu = -1, busy_us = -1;
    bool ipc = false; /* --ipc: the engine's client endpoint on ipc://, measured against the ipc echo */
    bool cpu_verbose = false; /* --cpu: each thread's CPU time during the 4-in-flight runs */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--engine") == 0 && i + 1 < argc)
            engine = argv[++i];
        else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc)
            workers = atoi(argv[++i]);
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model = argv[++i];
        else if (strcmp(argv[i], "--gpu") == 0 && i + 1 < argc)
            gpu = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc)
            tokens_s = argv[++i];
        else if (strcmp(argv[i], "--busy-poll-us") == 0 && i + 1 < argc)
            busy_us = atoi(argv[++i]);
        else if (strcmp(argv[i], "--ipc") == 0)
            ipc = true;
        else if (strcmp(argv[i], "--cpu") == 0)
            cpu_verbose = true;
        else {
            fprintf(stderr, "usage: bench_engine --engine PATH [--workers N] [--iters N] [--model DIR] [--gpu N] [--tokens LIST] "
                            "[--busy-poll-us N] [--ipc] [--cpu]\n");
            return 2;
        }
    }
    if (!engine || workers < 1 || iters < 3) {
        fprintf(stderr, "usage: bench_engine --engine PATH [--workers N] [--iters N] [--model DIR] [--gpu N] [--tokens LIST] "
                            "[--busy-poll-us N] [--ipc] [--cpu]\n");
        return 2;
    }
    moe_log_init_from_env();
    if (busy_us < 0) /* the engine's own default (--busy-poll-us auto) */
        busy_us = gpu >= 0 ? 1000 : 0;
    char wk[16], gs[16], bs[16];
    snprintf(wk, sizeof wk, "%d", workers);
    snprintf(gs, sizeof gs, "%d", gpu);
    snprintf(bs, sizeof bs, "%d", busy_us);
    engine_proc e;
    const char *flags[] = {gpu >= 0 ? "--gpus" : "--workers", gpu >= 0 ? gs : wk, "--log-level", "warn",
                           "--max-tokens", "16384", "--busy-poll-us", bs, model ? "--model" : NULL, model, NULL};
    if (!engine_start_on(&e, engine, ipc, flags))
        return 1;
    moec_client_t *c = NULL;
    moec_options o;
    moec_options_default(&o);
    o.timeout_ms = 60000;
    int rc = 1;
    eng_ckpt_t *ck = NULL;
    eng_model_weights w;
    memset(&w, 0, sizeof w);
    kern_ctx_t *k = NULL;
    if (moec_client_init(&c, e.endpoint, &o) != MOEC_OK || moec_client_set_busy_poll(c, busy_us) != MOEC_OK ||
        !engine_wait_ready(&e, c, 120))
        goto out;
    char dir[512];
    if (model)
        snprintf(dir, sizeof dir, "%s", model);
    else
        engine_default_model_dir(&e, dir, sizeof dir);
    eng_model_load_params lp = eng_model_load_params_default();
    cuda_inproc ci;
    memset(&ci, 0, sizeof ci);
    kern_ctx_params kp = {.device = gpu};
    if (eng_ckpt_open(&ck, dir) != MOE_OK || eng_model_load(ck, &lp, &w) != MOE_OK ||
        kern_ctx_init(&k, gpu >= 0 ? KERN_BACKEND_CUDA : KERN_BACKEND_CPU, gpu >= 0 ? &kp : NULL) != MOE_OK) {
        fprintf(stderr, "in-process model: %s\n", moe_errmsg());
        goto out;
    }
    const eng_model_desc *d = eng_ckpt_desc(ck);
    const eng_model_layer *l = &w.layers[0];
    const int64_t H = d->hidden_size, E = d->n_experts, K = d->top_k;
    if (gpu >= 0) {
        ci.on = true;
        ci.k = k;
        cudaSetDevice(gpu);
        dup_dev(&l->w13, &ci.w13);
        dup_dev(&l->w2, &ci.w2);
        dup_dev(&l->router, &ci.router);
        dup_dev(&l->shared_w13, &ci.sw13);
        dup_dev(&l->shared_w2, &ci.sw2);
        dup_dev(&l->shared_gate, &ci.sgate);
    }
    const size_t es = moe_dtype_size(d->dtype);
    char desc[512];
    if (gpu >= 0)
        printf("model: %s\nengine: one GPU worker on GPU %d; in-process: the CUDA kernels on device data; %d "
               "iterations per row\n",
               eng_model_desc_str(d, desc, sizeof desc), gpu, iters);
    else
        printf("model: %s\nengine: %d CPU workers; in-process: one process, all %ld cores; %d iterations per row\n",
               eng_model_desc_str(d, desc, sizeof desc), workers, sysconf(_SC_NPROCESSORS_ONLN), iters);
    printf("busy polling (engine, client, echo): %d us; the engine's clients connect over %s (overhead: against "
           "the %s echo)\n\n",
           busy_us, ipc ? "ipc" : "tcp", ipc ? "ipc" : "tcp");
    printf("%6s %12s %10s %10s %10s %12s %12s %12s %10s %14s %14s %14s %9s\n", "T", "in-proc us", "echo tcp", "echo ipc",
           "tcp 2 ctx", "engine p50", "engine p99", "overhead us", "overhead", "tok/s (1 in fl)", "tok/s (4 in fl)",
           ipc ? "ipc echo 4 fl" : "tcp echo 4 fl", "eng/echo");
    int64_t Ts[16];
    int n_ts = 0;
    for (const char *p = tokens_s; *p && n_ts < 16;) {
        char *end;
        Ts[n_ts++] = strtoll(p, &end, 10);
        p = *end == ',' ? end + 1 : end;
    }
    moe_rng g;
    moe_rng_seed(&g, 1);
    /* the breakdown table's rows, printed after the main table */
    double rtt_mean[16] = {0}, parts[16][N_PATH], dev_step[16] = {0}, h2d[16] = {0}, enq[16] = {0}, gwait[16] = {0};
    /* the same with 4 in flight: per step (a step may hold several requests) */
    double lat4[16] = {0}, wall4_req[16] = {0}, steps4[16] = {0}, tok_step4[16] = {0}, parts4[16][N_PATH],
           dev4[16] = {0};
    memset(parts4, 0, sizeof parts4);
    inproc_split isp[16];
    memset(parts, 0, sizeof parts);
    memset(isp, 0, sizeof isp);
    for (int ti = 0; ti < n_ts; ti++) {
        const int64_t T = Ts[ti];
        moe_tensor x = {0}, lg = {0}, ids = {0}, wt = {0}, y = {0};
        moe_tensor_alloc(&x, d->dtype, 2, (int64_t[]){T, H});
        moe_tensor_alloc(&lg, MOE_DTYPE_F32, 2, (int64_t[]){T, E});
        moe_tensor_alloc(&ids, MOE_DTYPE_I32, 2, (int64_t[]){T, K});
        moe_tensor_alloc(&wt, MOE_DTYPE_F32, 2, (int64_t[]){T, K});
        moe_tensor_alloc(&y, d->dtype, 2, (int64_t[]){T, H});
        for (int64_t i = 0; i < T * H; i++)
            moe_store_f32(d->dtype, x.data, (size_t)i, moe_rng_normal(&g));
        /* in-process */
        double *t = calloc((size_t)iters, sizeof *t);
        kern_route_params rp = eng_model_route_params(d, l);
        kern_experts_params ep = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = d->act};
        kern_shared_expert se;
        bool has = eng_model_shared_expert(d, l, &se);
        for (int i = -3; i < iters && !ci.on; i++) {
            double t0 = moe_now_s();
            eng_model_router_logits(l, &x, &lg);
            kern_route(k, &rp, &lg, &ids, &wt);
            kern_moe_forward(k, &ep, &x, &l->w13, &l->w2, &ids, &wt, has ? &se : NULL, &y);
            if (i >= 0)
                t[i] = (moe_now_s() - t0) * 1e6;
        }
        double inproc = pct(t, iters, 0.5);
        if (ci.on)
            inproc = cuda_inproc_us(&ci, d, l, &x, iters, &isp[ti]);
        /* The transport and the engine one request at a time, in rounds that take turns (each
         * echo, then the engine, five times over): the machine's state drifts over a run (the
         * echo's own p50 moved 31-47 us between runs, engine runs 35-39), and the overhead
         * compares the engine with an echo of the same moments. */
        size_t req_bytes = 64 + 64 + (size_t)(T * H) * es + 64, rep_bytes = req_bytes;
        double *te = calloc((size_t)iters * 3, sizeof *te), *te_ipc = te + iters, *te_2c = te + 2 * iters;
        moec_request r = {.layer = l->layer, .dtype = d->dtype, .n_tokens = T, .hidden = H, .x = x.data};
        path_sums before;
        memset(&before, 0, sizeof before);
        for (int i = 0; i < 3; i++) /* warm-up */
            if (moec_submit(c, &r, y.data, moe_tensor_nbytes(&y), 0) != MOEC_OK) {
                fprintf(stderr, "submit: %s\n", moec_errmsg(c));
                free(te);
                goto out;
            }
        before = read_path(c);
        const int rounds = iters >= 25 ? 5 : 1;
        for (int rd = 0, i0 = 0; rd < rounds; rd++) {
            const int i1 = iters * (rd + 1) / rounds;
            echo_run(req_bytes, rep_bytes, i1 - i0, 1, false, busy_us > 0, false, te + i0);
            echo_run(req_bytes, rep_bytes, i1 - i0, 1, true, busy_us > 0, false, te_ipc + i0);
            echo_run(req_bytes, rep_bytes, i1 - i0, 1, false, busy_us > 0, true, te_2c + i0);
            for (int i = i0; i < i1; i++) {
                double t0 = moe_now_s();
                if (moec_submit(c, &r, y.data, moe_tensor_nbytes(&y), 0) != MOEC_OK) {
                    fprintf(stderr, "submit: %s\n", moec_errmsg(c));
                    free(te);
                    goto out;
                }
                t[i] = (moe_now_s() - t0) * 1e6;
            }
            i0 = i1;
        }
        const double echo = pct(te, iters, 0.5), echo_ipc = pct(te_ipc, iters, 0.5), echo_2c = pct(te_2c, iters, 0.5);
        free(te);
        double wall1 = 0;
        for (int i = 0; i < iters; i++)
            wall1 += t[i];
        path_sums after = read_path(c);
        rtt_mean[ti] = wall1 / iters;
        const double nst = after.steps - before.steps;
        for (int k = 0; k < N_PATH && nst > 0; k++)
            parts[ti][k] = (after.us[k] - before.us[k]) / nst;
        const double ngs = after.gpu.steps - before.gpu.steps;
        if (ngs > 0) {
            dev_step[ti] = (after.gpu.step_us - before.gpu.step_us) / ngs;
            h2d[ti] = (after.gpu.h2d_us - before.gpu.h2d_us) / ngs;
            enq[ti] = (after.gpu.host_us - before.gpu.host_us) / ngs;
            gwait[ti] = (after.gpu.wait_us - before.gpu.wait_us) / ngs;
        }
        double p50 = pct(t, iters, 0.5), p99 = pct(t, iters, 0.99);
        /* engine, 4 in flight */
        void *ys[4];
        for (int j = 0; j < 4; j++)
            ys[j] = malloc(moe_tensor_nbytes(&y));
        const path_sums b4 = read_path(c);
        double lat_sum = 0;
        static thr_cpu cpu_a[CPU_MAX_THREADS], cpu_b[CPU_MAX_THREADS];
        const int n_cpu_a = cpu_snapshot((int)e.pid, cpu_a, CPU_MAX_THREADS);
        double t0 = moe_now_s();
        int sent = 0, done = 0;
        while (done < iters) {
            while (sent < iters && sent - done < 4) {
                uint64_t id;
                moec_submit_async(c, &r, ys[sent % 4], moe_tensor_nbytes(&y), 0, &id);
                sent++;
            }
            moec_result res;
            if (moec_collect(c, -1, &res) != MOEC_OK || res.status != MOEC_OK) {
                fprintf(stderr, "async: %s\n", res.message);
                goto out;
            }
            lat_sum += res.latency_ms * 1e3;
            done++;
        }
        double wall4 = moe_now_s() - t0;
        const int n_cpu_b = cpu_snapshot((int)e.pid, cpu_b, CPU_MAX_THREADS);
        const path_sums a4 = read_path(c);
        lat4[ti] = lat_sum / iters;
        wall4_req[ti] = wall4 * 1e6 / iters;
        steps4[ti] = a4.steps - b4.steps;
        for (int k = 0; k < N_PATH && steps4[ti] > 0; k++)
            parts4[ti][k] = (a4.us[k] - b4.us[k]) / steps4[ti];
        if (steps4[ti] > 0)
            tok_step4[ti] = (double)(T * iters) / steps4[ti];
        if (cpu_verbose) {
            printf("  T = %lld, 4 in flight, %.2f s: the threads' CPU time (client = this program)\n", (long long)T,
                   wall4);
            cpu_report(cpu_a, n_cpu_a, cpu_b, n_cpu_b, wall4);
        }
        if (a4.gpu.steps > b4.gpu.steps)
            dev4[ti] = (a4.gpu.step_us - b4.gpu.step_us) / (a4.gpu.steps - b4.gpu.steps);
        for (int j = 0; j < 4; j++)
            free(ys[j]);
        /* the echo the same way, right after: 4 outstanding on the engine's transport */
        const double wall_e4 = echo_run(req_bytes, rep_bytes, iters, 4, ipc, busy_us > 0, true, NULL);
        double over = p50 - inproc - (ipc ? echo_ipc : echo);
        printf("%6lld %12.1f %10.1f %10.1f %10.1f %12.1f %12.1f %12.1f %9.0f%% %14.0f %14.0f %14.0f %8.0f%%\n",
               (long long)T, inproc, echo, echo_ipc, echo_2c, p50, p99, over, 100.0 * over / p50,
               (double)(T * iters) / (wall1 * 1e-6), (double)(T * iters) / wall4, (double)(T * iters) / wall_e4,
               100.0 * wall_e4 / wall4);
        fflush(stdout);
        free(t);
        moe_tensor_free(&x);
        moe_tensor_free(&lg);
        moe_tensor_free(&ids);
        moe_tensor_free(&wt);
        moe_tensor_free(&y);
    }
    /* Where the round trip went. */
    printf("\nwhere the engine's round trip went, one request at a time (means per request, us; engine STATS "
           "\"path\"):\n");
    printf("%6s %9s %9s %7s %7s %9s %9s %9s %9s %9s %9s %7s", "T", "rtt", "client+", "queue", "stage", "to wkr",
           "w.start", "w.comp", "w.answer", "from wkr", "reply", "sum");
    if (ci.on)
        printf(" %9s %7s %7s %7s | %9s %7s %8s %9s %9s", "dev step", "h2d", "enqueue", "wait", "in-proc", "router",
               "route", "experts", "host wait");
    printf("\n");
    for (int ti = 0; ti < n_ts; ti++) {
        double sum = 0;
        for (int k = 0; k < N_PATH; k++)
            sum += parts[ti][k];
        printf("%6lld %9.1f %9.1f", (long long)Ts[ti], rtt_mean[ti], rtt_mean[ti] - sum);
        for (int k = 0; k < N_PATH; k++)
            printf(k < 2 ? " %7.1f" : " %9.1f", parts[ti][k]);
        printf(" %7.1f", sum);
        if (ci.on)
            printf(" %9.1f %7.1f %7.1f %7.1f | %9.1f %7.1f %8.1f %9.1f %9.1f", dev_step[ti], h2d[ti], enq[ti], gwait[ti],
                   isp[ti].wall, isp[ti].router,
                   isp[ti].route, isp[ti].experts,
                   isp[ti].wall - isp[ti].router - isp[ti].route - isp[ti].experts);
        printf("\n");
    }
    printf("client+ = rtt - sum: the client's encode and decode and both hops between it and the coordinator; "
           "queue: arrival to the step's forming; stage: its inputs into the data path; to wkr: STEP sent to its "
           "receipt by the worker that answered last; w.start: to its compute (waiting for the step before, "
           "preparing); w.comp: the step (GPU: inputs up, kernels, outputs down, the wait); w.answer: replies "
           "and RESULT made; from wkr: RESULT sent to received; reply: to the replies' hand-off to ZeroMQ (client+ includes the hand-off).%s\n",
           ci.on ? " dev step: the GPU step's device time inside w.comp (events); h2d: the inputs' copy (events, "
                   "before dev step); enqueue: the worker's host time from the step's start to its one wait; wait: "
                   "in that wait (w.comp - enqueue - wait: checks and timings after it); in-proc: the host's time per "
                   "call, split into router, routing and experts on the device (events) and the host's wait "
                   "beyond them (launch, synchronize)."
                 : "");
    printf("\nwith 4 requests in flight (engine STATS \"path\", means per step; a step may hold several requests):\n");
    printf("%6s %9s %9s %7s %9s %7s %7s %9s %9s %9s %9s %9s %7s", "T", "latency", "wall/req", "steps", "tok/step",
           "queue", "stage", "to wkr", "w.start", "w.comp", "w.answer", "from wkr", "reply");
    if (ci.on)
        printf(" %9s", "dev step");
    printf("\n");
    for (int ti = 0; ti < n_ts; ti++) {
        printf("%6lld %9.1f %9.1f %7.0f %9.0f", (long long)Ts[ti], lat4[ti], wall4_req[ti], steps4[ti], tok_step4[ti]);
        for (int k = 0; k < N_PATH; k++)
            printf(k < 2 ? " %7.1f" : " %9.1f", parts4[ti][k]);
        if (ci.on)
            printf(" %9.1f", dev4[ti]);
        printf("\n");
    }
    printf("latency: a request's mean round trip seen by the client; wall/req: the run's time over its requests "
           "(the throughput's inverse); the parts as above, per step.\n");
    rc = 0;
out:
    if (ci.on) {
        cudaFree(ci.w13.data);
        cudaFree(ci.w2.data);
        cudaFree(ci.router.data);
        cudaFree(ci.sw13.data);
        cudaFree(ci.sw2.data);
        cudaFree(ci.sgate.data);
    }
    kern_ctx_free(k);
    eng_model_weights_free(&w);
    eng_ckpt_close(ck);
    moec_client_free(c);
    if (!engine_stop(&e, false))
        rc = 1;
    return rc;
}
