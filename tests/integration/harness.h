/*
 * harness.h: helpers of the integration tests: start the real moe-engine daemon as a process
 * (the binary built by Bazel, from the test's runfiles), talk to it over real ZeroMQ sockets
 * with raw protocol messages, stop it, and compute reference outputs in-process from the same
 * checkpoint with the reference kernels.
 */
#ifndef TESTS_INTEGRATION_HARNESS_H
#define TESTS_INTEGRATION_HARNESS_H

#include <stdbool.h>
#include <sys/types.h>

#include "engine/base/moe_base.h"
#include "engine/model/model.h"
#include "ipc/ipc_proto.h"

typedef struct daemon_proc {
    pid_t pid;
    char endpoint[256];
    char http[64];
    char rundir[256];
    int http_port;
} daemon_proc;

/* A fresh temporary folder (mkdtemp) under $TEST_TMPDIR or /tmp. */
void h_tmpdir(char *out, size_t cap, const char *tag);
/* A free TCP port on 127.0.0.1 (bind to 0, read it, close). */
int h_free_port(void);
/* The moe-engine binary: $MOE_ENGINE, else the one in the test's runfiles. */
const char *h_engine_path(void);

/* Starts `moe-engine serve` with the given extra flags (NULL-terminated), a fresh runtime
 * folder, a client endpoint on a free tcp port and the probes on another; waits until STATS
 * says "ready" (or fails the test after timeout_s). */
bool h_daemon_start(daemon_proc *d, const char *const *flags, double timeout_s);
/* SIGTERM and wait; returns the exit status (or -1 when killed after timeout_s). */
int h_daemon_stop(daemon_proc *d, double timeout_s);
/* The pids of d's worker processes (children of the daemon), up to cap; returns the count. */
int h_daemon_workers(const daemon_proc *d, pid_t *out, int cap);
/* The resident set of a process in KiB (0 when gone). */
long h_rss_kib(pid_t pid);
/* True when no process whose parent is `pid` exists. */
bool h_no_children(pid_t pid);

/* A DEALER socket connected to d (own context). */
typedef struct h_client {
    void *ctx, *sock;
} h_client;
bool h_client_open(h_client *c, const char *endpoint);
void h_client_close(h_client *c);
/* Sends raw bytes as one frame. */
bool h_send_raw(h_client *c, const void *buf, size_t len);
bool h_send_msg(h_client *c, const ipc_msg *m);
/* Receives one reply frame within timeout_ms into a malloc'd buffer (caller frees); decodes it
 * (as a reply) into *m whose views point into *buf. Returns false on timeout. */
bool h_recv(h_client *c, int timeout_ms, void **buf, size_t *len, ipc_msg *m);

/* The JSON section of a reply as a NUL-terminated string (malloc'd). */
char *h_json(const ipc_msg *m);

/* The engine's STATS as a NUL-terminated JSON string (malloc'd), or NULL when no reply came
 * within timeout_ms. */
char *h_stats(h_client *c, int timeout_ms);
/* The number after the first `key` (quoted, as "\"steps\"") in js, or 0 where there is none. */
double h_json_num(const char *js, const char *key);

/* Receives the replies of n requests with ids 0 .. n - 1 (each within timeout_ms) after a fault:
 * every id answered exactly once, each reply a result (status 0, counted in *ok) or
 * MOE_ERR_WORKER (counted in *worker_err). False, saying why, on a missing, repeated or unknown
 * reply or any other status. */
bool h_recv_after_fault(h_client *c, int n, int timeout_ms, int *ok, int *worker_err);

/* Reference output of one SUBMIT computed in-process with the CPU kernels (cpu: bit-identical
 * to cpu-ref)
 * from the checkpoint at `dir`: y [T, H] as floats. ids/w may be NULL (routing from logits or,
 * when logits is NULL too, from x with the model's router). */
bool h_reference(const char *dir, int32_t layer, const moe_tensor *x, const moe_tensor *ids, const moe_tensor *w,
                 const moe_tensor *logits, float *y);

/* Normalized error ||a - b|| / ||b|| of n floats; NaN when a has NaN/Inf. */
double h_rel_err(const float *a, const float *b, size_t n);

#endif
