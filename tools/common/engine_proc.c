/*
 * engine_proc.c: see engine_proc.h.
 */
#include "tools/common/engine_proc.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int engine_free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0) {
        if (s >= 0)
            close(s);
        return -1;
    }
    socklen_t l = sizeof a;
    getsockname(s, (struct sockaddr *)&a, &l);
    close(s);
    return ntohs(a.sin_port);
}

double engine_json_num(const char *js, const char *key) {
    const char *p = js && key ? strstr(js, key) : NULL;
    p = p ? strchr(p, ':') : NULL;
    return p ? strtod(p + 1, NULL) : 0;
}

engine_gpu_sums engine_gpu_sums_of(const char *stats_json) {
    engine_gpu_sums s;
    memset(&s, 0, sizeof s);
    const char *g = stats_json ? strstr(stats_json, "\"gpu\":") : NULL;
    if (!g)
        return s;
    s.steps = engine_json_num(g, "\"steps\"");
    s.step_tokens = engine_json_num(g, "\"step_tokens\"");
    s.step_us = engine_json_num(g, "\"step_us_sum\"");
    s.compute_us = engine_json_num(g, "\"compute_us_sum\"");
    s.combine_us = engine_json_num(g, "\"combine_us_sum\"");
    s.combine_bytes = engine_json_num(g, "\"combine_bytes_sum\"");
    s.h2d_us = engine_json_num(g, "\"h2d_us_sum\"");
    s.host_us = engine_json_num(g, "\"host_us_sum\"");
    s.plan_us = engine_json_num(g, "\"plan_us_sum\"");
    s.staged = engine_json_num(g, "\"staged_steps\"");
    s.gather_us = engine_json_num(g, "\"gather_us_sum\"");
    s.wait_us = engine_json_num(g, "\"wait_us_sum\"");
    return s;
}

bool engine_start(engine_proc *e, const char *engine, const char *const *flags) {
    return engine_start_on(e, engine, false, flags);
}

bool engine_start_on(engine_proc *e, const char *engine, bool ipc, const char *const *flags) {
    memset(e, 0, sizeof *e);
    snprintf(e->rundir, sizeof e->rundir, "/tmp/moe-engine-tool-XXXXXX");
    if (!mkdtemp(e->rundir)) {
        perror("mkdtemp");
        return false;
    }
    int p1 = engine_free_port(), p2 = engine_free_port();
    if (p1 < 0 || p2 < 0) {
        fprintf(stderr, "no free TCP port on 127.0.0.1\n");
        return false;
    }
    if (ipc)
        snprintf(e->endpoint, sizeof e->endpoint, "ipc://%s/client.sock", e->rundir);
    else
        snprintf(e->endpoint, sizeof e->endpoint, "tcp://127.0.0.1:%d", p1);
    snprintf(e->http, sizeof e->http, "127.0.0.1:%d", p2);
    const char *args[64];
    int n = 0;
    args[n++] = engine;
    args[n++] = "serve";
    args[n++] = "--bind";
    args[n++] = e->endpoint;
    args[n++] = "--http";
    args[n++] = e->http;
    args[n++] = "--runtime-dir";
    args[n++] = e->rundir;
    for (int i = 0; flags && flags[i] && n < 63; i++)
        args[n++] = flags[i];
    args[n] = NULL;
    e->pid = fork();
    if (e->pid < 0) {
        perror("fork");
        return false;
    }
    if (e->pid == 0) {
        execv(engine, (char *const *)args);
        perror("exec moe-engine");
        _exit(127);
    }
    return true;
}

bool engine_wait_ready(engine_proc *e, moec_client_t *c, double timeout_s) {
    double t0 = now_s();
    while (now_s() - t0 < timeout_s) {
        char *js = NULL;
        bool ready = moec_stats(c, &js, 1000) == MOEC_OK && strstr(js, "\"state\":\"ready\"");
        moec_free(js);
        if (ready)
            return true;
        int status;
        if (waitpid(e->pid, &status, WNOHANG) == e->pid) {
            fprintf(stderr, "the engine exited during start\n");
            e->pid = 0;
            return false;
        }
        usleep(100000);
    }
    fprintf(stderr, "the engine was not ready within %.0f s\n", timeout_s);
    return false;
}

bool engine_stop(engine_proc *e, bool keep) {
    bool clean = true;
    if (e->pid > 0) {
        kill(e->pid, SIGTERM);
        int status = 0;
        waitpid(e->pid, &status, 0);
        clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        e->pid = 0;
    }
    if (!keep && e->rundir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", e->rundir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", e->rundir);
    }
    return clean;
}

void engine_default_model_dir(const engine_proc *e, char *out, size_t cap) {
    snprintf(out, cap, "%s/moe-engine-default-model-v1", e->rundir);
}
