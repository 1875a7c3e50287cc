/*
 * main.c: the moe-engine binary: dispatches to the subcommands (engine.h).
 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/model/model.h"
#include "ipc/ipc.h"

static void usage(FILE *f) {
    fprintf(f,
            "moe-engine %s: an expert-serving daemon for Mixture-of-Experts inference\n\n"
            "usage: moe-engine COMMAND [FLAGS]\n\n"
            "commands:\n"
            "  serve        serve a checkpoint's MoE layers to ZeroMQ clients (see serve --help)\n"
            "  make-model   write a synthetic checkpoint of one of the five families (see make-model --help)\n"
            "  keygen PREFIX  write a CURVE keypair: PREFIX.pub (public) and PREFIX.key (secret, mode 0600)\n"
            "  worker       one rank of the engine (started by serve; not for use by hand)\n"
            "  --version    print the version\n"
            "  --help       this text\n\n"
            "environment: MOE_LOG_LEVEL (error, warn, info, debug, trace), MOE_LOG_SUBSYS; every serve\n"
            "setting as MOE_<SETTING>; MOE_MALLOC_DEFAULT=1 keeps glibc's malloc thresholds (serve and its\n"
            "workers otherwise keep freed buffers of up to 32 MiB for the next message).\n",
            ENG_VERSION);
}

/* The daemon's processes (serve and its workers) receive requests of megabytes: ZeroMQ's I/O
 * thread allocates each message afresh, and with glibc's default thresholds such a buffer is
 * mmapped or trimmed off the heap when freed, so every message's pages fault in again (the
 * coordinator's I/O thread took ~290 faults per 4 MiB request, 92% of a core at 4 requests in
 * flight: engine run 50). Buffers up to 32 MiB (glibc's largest threshold) come from the heap and
 * stay there for the next message, at the cost of keeping up to 256 MiB of freed memory.
 * MOE_MALLOC_DEFAULT=1 keeps glibc's defaults (a diagnostic). */
static void tune_malloc(void) {
    const char *e = getenv("MOE_MALLOC_DEFAULT");
    if (e && strcmp(e, "1") == 0)
        return;
    if (mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) != 1 || mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024) != 1)
        MOE_WARN(MOE_SUB_ENG, "mallopt refused the daemon's thresholds: large messages may fault in anew");
}

int main(int argc, char **argv) {
    if (moe_log_init_from_env() != MOE_OK)
        fprintf(stderr, "moe-engine: %s (ignored)\n", moe_errmsg());
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("moe-engine %s (protocol %d)\n", ENG_VERSION, IPC_VERSION);
        return 0;
    }
    if (strcmp(cmd, "serve") == 0) {
        tune_malloc();
        return eng_serve_main(argc - 2, argv + 2);
    }
    if (strcmp(cmd, "worker") == 0) {
        tune_malloc();
        return eng_worker_main(argc - 2, argv + 2);
    }
    if (strcmp(cmd, "make-model") == 0)
        return eng_make_model_main(argc - 1, argv + 1);
    if (strcmp(cmd, "keygen") == 0) {
        if (argc != 3 || argv[2][0] == '-') {
            fprintf(stderr, "usage: moe-engine keygen PREFIX   (writes PREFIX.pub and PREFIX.key)\n");
            return 2;
        }
        if (ipc_keys_generate(argv[2]) != MOE_OK) {
            fprintf(stderr, "moe-engine keygen: %s\n", moe_errmsg());
            return 1;
        }
        printf("wrote %s.pub and %s.key\n", argv[2], argv[2]);
        return 0;
    }
    fprintf(stderr, "moe-engine: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
