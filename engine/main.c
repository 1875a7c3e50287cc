/*
 * main.c: the moe-engine binary: dispatches to the subcommands (engine.h).
 */
#include <stdio.h>
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
            "setting as MOE_<SETTING>.\n",
            ENG_VERSION);
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
    if (strcmp(cmd, "serve") == 0)
        return eng_serve_main(argc - 2, argv + 2);
    if (strcmp(cmd, "worker") == 0)
        return eng_worker_main(argc - 2, argv + 2);
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
