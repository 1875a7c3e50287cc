/*
 * harness.c: see harness.h. Test-only code; single-threaded.
 */
#include "tests/integration/harness.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "kernels/kern.h"
#include "tools/common/engine_proc.h"

void h_tmpdir(char *out, size_t cap, const char *tag) {
    const char *base = getenv("TEST_TMPDIR");
    /* ipc:// paths must stay short: prefer /tmp when the Bazel folder is deep */
    if (!base || strlen(base) > 60)
        base = "/tmp";
    snprintf(out, cap, "%s/moe-%s-XXXXXX", base, tag);
    if (!mkdtemp(out)) {
        perror("mkdtemp");
        abort();
    }
}

int h_free_port(void) { return engine_free_port(); }

const char *h_engine_path(void) {
    static char path[1024];
    const char *env = getenv("MOE_ENGINE"); /* a bundle outside Bazel (tools/gpu) */
    if (env && *env)
        return env;
    const char *dirs[] = {getenv("TEST_SRCDIR"), ".", NULL};
    const char *ws = getenv("TEST_WORKSPACE");
    for (int i = 0; dirs[i] || i == 0; i++) {
        if (!dirs[i])
            continue;
        snprintf(path, sizeof path, "%s/%s/engine/moe-engine", dirs[i], ws ? ws : "moe_engine");
        if (access(path, X_OK) == 0)
            return path;
    }
    snprintf(path, sizeof path, "engine/moe-engine");
    return path;
}

bool h_client_open(h_client *c, const char *endpoint) {
    c->ctx = zmq_ctx_new();
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    return zmq_connect(c->sock, endpoint) == 0;
}

void h_client_close(h_client *c) {
    if (c->sock)
        zmq_close(c->sock);
    if (c->ctx)
        zmq_ctx_term(c->ctx);
    c->sock = c->ctx = NULL;
}

bool h_send_raw(h_client *c, const void *buf, size_t len) { return zmq_send(c->sock, buf, len, 0) == (int)len; }

bool h_send_msg(h_client *c, const ipc_msg *m) {
    void *buf = NULL;
    size_t len = 0;
    if (ipc_encode_alloc(m, &buf, &len) != MOE_OK)
        return false;
    bool ok = h_send_raw(c, buf, len);
    moe_free(buf);
    return ok;
}

bool h_recv(h_client *c, int timeout_ms, void **buf, size_t *len, ipc_msg *m) {
    zmq_pollitem_t it = {c->sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, timeout_ms) <= 0)
        return false;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, c->sock, 0) == -1) {
        zmq_msg_close(&msg);
        return false;
    }
    *len = zmq_msg_size(&msg);
    *buf = moe_alloc(*len ? *len : 1); /* aligned copy: views are aligned */
    memcpy(*buf, zmq_msg_data(&msg), *len);
    zmq_msg_close(&msg);
    ipc_limits lim = ipc_limits_default();
    lim.accept = IPC_ACCEPT_REPLIES;
    lim.max_msg_bytes = 1ull << 34;
    if (ipc_decode(*buf, *len, &lim, m) != MOE_OK) {
        fprintf(stderr, "harness: undecodable reply: %s\n", moe_errmsg());
        memset(m, 0, sizeof *m);
        m->status = -9999;
    }
    return true;
}

char *h_json(const ipc_msg *m) {
    const ipc_section *s = ipc_msg_find(m, IPC_SEC_JSON);
    if (!s)
        return NULL;
    char *out = malloc(s->nbytes + 1);
    memcpy(out, s->data, s->nbytes);
    out[s->nbytes] = '\0';
    return out;
}

char *h_stats(h_client *c, int timeout_ms) {
    ipc_msg m;
    ipc_msg_init(&m, IPC_OP_STATS, 1);
    if (!h_send_msg(c, &m))
        return NULL;
    void *buf = NULL;
    size_t len;
    ipc_msg rep;
    char *js = NULL;
    if (h_recv(c, timeout_ms, &buf, &len, &rep))
        js = h_json(&rep);
    moe_free(buf);
    return js;
}

double h_json_num(const char *js, const char *key) { return engine_json_num(js, key); }

bool h_recv_after_fault(h_client *c, int n, int timeout_ms, int *ok, int *worker_err) {
    bool good = true;
    char *seen = calloc((size_t)(n > 0 ? n : 1), 1);
    *ok = *worker_err = 0;
    for (int i = 0; i < n && good; i++) {
        void *buf = NULL;
        size_t len;
        ipc_msg rep;
        if (!h_recv(c, timeout_ms, &buf, &len, &rep)) {
            fprintf(stderr, "harness: only %d of %d requests answered\n", i, n);
            good = false;
        } else if (rep.request_id >= (uint64_t)n || seen[rep.request_id]) {
            fprintf(stderr, "harness: reply for request %llu unknown or repeated\n", (unsigned long long)rep.request_id);
            good = false;
        } else if (rep.status != 0 && rep.status != MOE_ERR_WORKER) {
            fprintf(stderr, "harness: request %llu answered with status %d, not 0 or MOE_ERR_WORKER\n",
                    (unsigned long long)rep.request_id, (int)rep.status);
            good = false;
        } else {
            seen[rep.request_id] = 1;
            if (rep.status == 0)
                (*ok)++;
            else
                (*worker_err)++;
        }
        moe_free(buf);
    }
    free(seen);
    return good;
}

static bool daemon_ready(daemon_proc *d) {
    h_client c;
    if (!h_client_open(&c, d->endpoint)) {
        h_client_close(&c);
        return false;
    }
    char *js = h_stats(&c, 500);
    bool ready = js && strstr(js, "\"state\":\"ready\"");
    free(js);
    h_client_close(&c);
    return ready;
}

bool h_daemon_start(daemon_proc *d, const char *const *flags, double timeout_s) {
    memset(d, 0, sizeof *d);
    h_tmpdir(d->rundir, sizeof d->rundir, "rt");
    int port = h_free_port();
    d->http_port = h_free_port();
    snprintf(d->endpoint, sizeof d->endpoint, "tcp://127.0.0.1:%d", port);
    snprintf(d->http, sizeof d->http, "127.0.0.1:%d", d->http_port);
    const char *args[64];
    int n = 0;
    args[n++] = h_engine_path();
    args[n++] = "serve";
    args[n++] = "--bind";
    args[n++] = d->endpoint;
    args[n++] = "--http";
    args[n++] = d->http;
    args[n++] = "--runtime-dir";
    args[n++] = d->rundir;
    for (int i = 0; flags && flags[i] && n < 62; i++)
        args[n++] = flags[i];
    args[n] = NULL;
    d->pid = fork();
    if (d->pid == 0) {
        execv(args[0], (char *const *)args);
        perror("execv moe-engine");
        _exit(127);
    }
    double t0 = moe_now_s();
    while (moe_now_s() - t0 < timeout_s) {
        int status;
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            fprintf(stderr, "harness: the daemon exited during start (status %d)\n", status);
            d->pid = 0;
            return false;
        }
        if (daemon_ready(d))
            return true;
        usleep(100000);
    }
    fprintf(stderr, "harness: the daemon was not ready within %.0f s\n", timeout_s);
    return false;
}

int h_daemon_stop(daemon_proc *d, double timeout_s) {
    if (d->pid <= 0)
        return -1;
    kill(d->pid, SIGTERM);
    double t0 = moe_now_s();
    int status = 0;
    while (moe_now_s() - t0 < timeout_s) {
        pid_t r = waitpid(d->pid, &status, WNOHANG);
        if (r == d->pid) {
            d->pid = 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        usleep(20000);
    }
    kill(d->pid, SIGKILL);
    waitpid(d->pid, &status, 0);
    d->pid = 0;
    return -1;
}

int h_daemon_workers(const daemon_proc *d, pid_t *out, int cap) {
    int n = 0;
    DIR *dir = opendir("/proc");
    struct dirent *e;
    while (dir && (e = readdir(dir)) && n < cap) {
        pid_t p = (pid_t)atoi(e->d_name);
        if (p <= 0)
            continue;
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%d/stat", (int)p);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t k = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[k] = '\0';
        char *rp = strrchr(buf, ')');
        int ppid = 0;
        char state;
        if (rp && sscanf(rp + 2, "%c %d", &state, &ppid) == 2 && ppid == d->pid && state != 'Z')
            out[n++] = p;
    }
    if (dir)
        closedir(dir);
    return n;
}

bool h_no_children(pid_t pid) {
    daemon_proc d = {.pid = pid};
    pid_t kids[8];
    return h_daemon_workers(&d, kids, 8) == 0;
}

long h_rss_kib(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

bool h_reference(const char *dir, int32_t layer, const moe_tensor *x, const moe_tensor *ids, const moe_tensor *w,
                 const moe_tensor *logits, float *y) {
    eng_ckpt_t *ck = NULL;
    if (eng_ckpt_open(&ck, dir) != MOE_OK) {
        fprintf(stderr, "reference: %s\n", moe_errmsg());
        return false;
    }
    const eng_model_desc *d = eng_ckpt_desc(ck);
    eng_model_load_params lp = eng_model_load_params_default();
    lp.layers = &layer;
    lp.n_layers = 1;
    eng_model_weights wts;
    bool ok = false;
    kern_ctx_t *k = NULL;
    moe_tensor tid = {0}, tw = {0}, lg = {0}, out = {0};
    if (eng_model_load(ck, &lp, &wts) != MOE_OK) {
        fprintf(stderr, "reference: %s\n", moe_errmsg());
        eng_ckpt_close(ck);
        return false;
    }
    const eng_model_layer *l = &wts.layers[0];
    const int64_t T = x->shape[0], K = d->top_k, H = d->hidden_size;
    /* the fast CPU backend: bit-identical to cpu-ref (tests/kernels), much faster */
    if (kern_ctx_init(&k, KERN_BACKEND_CPU, NULL) != MOE_OK)
        goto done;
    if (!ids) {
        moe_tensor_alloc(&tid, MOE_DTYPE_I32, 2, (int64_t[]){T, K});
        moe_tensor_alloc(&tw, MOE_DTYPE_F32, 2, (int64_t[]){T, K});
        if (!logits) {
            moe_tensor_alloc(&lg, MOE_DTYPE_F32, 2, (int64_t[]){T, d->n_experts});
            if (eng_model_router_logits(l, x, &lg) != MOE_OK)
                goto done;
            logits = &lg;
        }
        kern_route_params rp = eng_model_route_params(d, l);
        if (kern_route(k, &rp, logits, &tid, &tw) != MOE_OK)
            goto done;
        ids = &tid;
        w = &tw;
    }
    moe_tensor_alloc(&out, x->dtype, 2, (int64_t[]){T, H});
    kern_experts_params ep = {.n_experts = d->n_experts, .n_local = d->n_experts, .act = d->act};
    kern_shared_expert se;
    bool has_se = eng_model_shared_expert(d, l, &se);
    if (kern_moe_forward(k, &ep, x, &l->w13, &l->w2, ids, w, has_se ? &se : NULL, &out) != MOE_OK) {
        fprintf(stderr, "reference: %s\n", moe_errmsg());
        goto done;
    }
    moe_to_f32(out.dtype, out.data, y, (size_t)(T * H));
    ok = true;
done:
    moe_tensor_free(&tid);
    moe_tensor_free(&tw);
    moe_tensor_free(&lg);
    moe_tensor_free(&out);
    kern_ctx_free(k);
    eng_model_weights_free(&wts);
    eng_ckpt_close(ck);
    return ok;
}

double h_rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]))
            return NAN;
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
