/*
 * engine.h: the public face of engine/: the subcommands of the moe-engine binary, each a
 * main-like function returning a process exit status.
 *
 *   moe-engine serve        the coordinator: one libuv loop (coord.c)
 *   moe-engine worker       one rank, spawned by serve (worker.c)
 *   moe-engine make-model   the synthetic checkpoint writer (engine/model)
 *   moe-engine keygen       a CURVE keypair for the server or a client
 */
#ifndef ENG_ENGINE_H
#define ENG_ENGINE_H

#include "engine/base/moe_base.h"
#include "engine/config.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ENG_VERSION "0.1.0"

int eng_serve_main(int argc, char **argv);
int eng_worker_main(int argc, char **argv);

/* The embedded default model: a small synthetic Qwen2-MoE checkpoint (shared expert with a
 * sigmoid gate) written once under `base_dir` and reused; its folder into `out`. */
moe_status eng_default_model(const char *base_dir, char *out, size_t cap);

/* The folder for runtime files: cfg->runtime_dir, else $XDG_RUNTIME_DIR, else /tmp. */
void eng_runtime_base(const eng_config *cfg, char *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif /* ENG_ENGINE_H */
