/*
 * testsrv.h: the project's test server for ipc/ until the daemon serves the same protocol: a
 * real server (ROUTER socket, ipc watcher, protocol decode/validate, ZAP + CURVE when asked)
 * on a real libuv loop, answering PING, INFO, STATS and SUBMIT with a toy model whose
 * output is easy to recompute independently (below; tests/ipc/toy_model.py). The C client
 * tests run it in a thread (testsrv_start); the CLI and Python tests run it as a process
 * (test_server, which prints "endpoint <ep>" on stdout once bound).
 *
 * The toy model (every layer is a MoE layer; f32 arithmetic, inputs read as f32, output
 * rounded once to the dtype of x):
 *   expert e of layer L:  f_{L,e}(x)[h] = a_{L,e} * x[h] + b_{L,e,h}
 *                         a_{L,e} = (e + 1 + L) / 8
 *                         b_{L,e,h} = (((e * 31 + h * 7 + L * 13) mod 17) - 8) / 64
 *   y[t] = sum over k = 0..K-1, in that order, starting from 0, of w[t,k] * f_{L,ids[t,k]}(x[t])
 *          (each term a f32 product a*x+b then w*(...), then added: y += w * (a * x + b))
 *   routing (logits given, or computed as logits[t,e] = sum_h x[t,h] * r_{e,h} with
 *   r_{e,h} = (((e * 5 + h * 3) mod 11) - 5) / 16 when only x is sent): softmax over E in
 *   f32, the K largest (ties: lower id), weights renormalized to sum 1.
 *
 * Threads: a started server runs its loop on its own thread; testsrv_* calls from the test
 * thread reach it through uv_async only. Counters are read with atomics.
 */
#ifndef TESTS_IPC_TESTSRV_H
#define TESTS_IPC_TESTSRV_H

#include "ipc/ipc.h"

typedef struct testsrv_opts {
    const char *endpoint;        /* default "tcp://127.0.0.1:*" (a free port) */
    const char *secret_key_path; /* CURVE server secret key file; NULL: no CURVE */
    const char *allow_list_path; /* ZAP allow-list (required with CURVE) */
    uint32_t n_layers, n_experts, hidden, top_k, max_tokens;
    uint64_t max_msg_bytes;
    uint32_t delay_ms;  /* SUBMIT replies are held this long (on timers) */
    uint32_t max_queue; /* held replies at most; more: BUSY (0: 1024) */
    bool no_route;      /* refuse SUBMIT with x alone (no router weights) */
} testsrv_opts;

typedef struct testsrv testsrv_t;

/* Fills the defaults: 4 layers, 8 experts, hidden 64, top_k 2, 256 tokens, 16 MiB. */
void testsrv_opts_default(testsrv_opts *o);

/* Starts a server on its own thread; returns once it is bound (or failed). */
moe_status testsrv_start(testsrv_t **out, const testsrv_opts *o);
const char *testsrv_endpoint(const testsrv_t *s);
/* Asks the loop to reload the ZAP allow-list; waits until done; returns its status. */
moe_status testsrv_reload_keys(testsrv_t *s);
uint64_t testsrv_submits_ok(const testsrv_t *s);
uint64_t testsrv_requests(const testsrv_t *s); /* messages received on the frontend */
/* Stops the loop, joins the thread; MOE_OK when uv_loop_close returned 0. */
moe_status testsrv_stop(testsrv_t *s);

/* Runs a server on the calling thread until SIGINT/SIGTERM (SIGHUP reloads the allow-list);
 * prints "endpoint <ep>" on stdout once bound. Returns MOE_OK after a clean shutdown. */
moe_status testsrv_run_foreground(const testsrv_opts *o);

/* The toy model's SUBMIT, shared by the server and the C tests: y [T, H] in x's dtype. */
moe_status testsrv_compute(uint32_t n_experts, uint32_t top_k, int32_t layer, const moe_tensor *x,
                           const moe_tensor *ids, const moe_tensor *w, const moe_tensor *logits, moe_tensor *y);

#endif
