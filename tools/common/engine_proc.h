/*
 * engine_proc.h: start a `moe-engine serve` process for the project's tools (demo,
 * benchmarks), wait until its workers are ready, and stop it with SIGTERM. Used by one thread.
 */
#ifndef TOOLS_COMMON_ENGINE_PROC_H
#define TOOLS_COMMON_ENGINE_PROC_H

#include <stdbool.h>
#include <sys/types.h>

#include "ipc/moeclient.h"

typedef struct engine_proc {
    pid_t pid;
    char rundir[64];   /* a fresh temporary folder (its runtime dir) */
    char endpoint[96]; /* tcp://127.0.0.1:PORT or ipc://RUNDIR/client.sock */
    char http[64];
} engine_proc;

/* The number after the first `key` (quoted, as "\"steps\"") in the JSON text js, or 0 where
 * there is none (the benchmarks read the engine's STATS sums with it). */
double engine_json_num(const char *js, const char *key);

/* The sums of STATS "gpu" (docs/protocol.md): read before and after a run, their differences
 * divided by the steps give the run's means. Zeros where the engine has no GPU workers. */
typedef struct engine_gpu_sums {
    double steps, step_tokens, step_us, compute_us, combine_us, combine_bytes, h2d_us, host_us, plan_us, staged,
        gather_us, wait_us;
} engine_gpu_sums;
engine_gpu_sums engine_gpu_sums_of(const char *stats_json);
/* A free TCP port of 127.0.0.1 (bind to 0 and read it back). */
int engine_free_port(void);
/* Starts `engine serve --bind ... --http ... --runtime-dir ...` plus the NULL-terminated extra
 * flags. Returns false (with a message on stderr) when it cannot start. */
bool engine_start(engine_proc *e, const char *engine, const char *const *flags);
/* The same with the client endpoint on ipc:// (a socket file in the runtime folder) when ipc. */
bool engine_start_on(engine_proc *e, const char *engine, bool ipc, const char *const *flags);
/* Waits until STATS says "ready" through client c (timeout_s); false if the engine exited. */
bool engine_wait_ready(engine_proc *e, moec_client_t *c, double timeout_s);
/* SIGTERM, wait; returns true when it exited with status 0. Removes the runtime folder unless
 * keep. */
bool engine_stop(engine_proc *e, bool keep);
/* The embedded default model's folder of a running engine. */
void engine_default_model_dir(const engine_proc *e, char *out, size_t cap);

#endif
