/*
 * test_server.c: the test server (testsrv.h) as a process, for the CLI and Python tests and
 * for trying clients by hand:
 *   bazel run //tests/ipc:test_server -- --endpoint tcp://127.0.0.1:5555
 * Prints "endpoint <ep>" on stdout once bound; SIGINT/SIGTERM stop it, SIGHUP reloads the
 * allow-list. Exit 0 after a clean shutdown.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/ipc/testsrv.h"

static void usage(void) {
    fprintf(stderr,
            "usage: test_server [--endpoint EP] [--curve-secret FILE --allow FILE] [--layers N] [--experts N]\n"
            "                   [--hidden N] [--top-k N] [--max-tokens N] [--max-msg-bytes N] [--delay-ms N]\n"
            "                   [--max-queue N] [--no-route]\n");
}

int main(int argc, char **argv) {
    moe_log_init_from_env();
    testsrv_opts o;
    testsrv_opts_default(&o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool takes = true;
        if (strcmp(a, "--no-route") == 0) {
            o.no_route = true;
            takes = false;
        } else if (!v) {
            usage();
            return 2;
        } else if (strcmp(a, "--endpoint") == 0) {
            o.endpoint = v;
        } else if (strcmp(a, "--curve-secret") == 0) {
            o.secret_key_path = v;
        } else if (strcmp(a, "--allow") == 0) {
            o.allow_list_path = v;
        } else if (strcmp(a, "--layers") == 0) {
            o.n_layers = (uint32_t)strtoul(v, NULL, 10);
        } else if (strcmp(a, "--experts") == 0) {
            o.n_experts = (uint32_t)strtoul(v, NULL, 10);
        } else if (strcmp(a, "--hidden") == 0) {
            o.hidden = (uint32_t)strtoul(v, NULL, 10);
        } else if (strcmp(a, "--top-k") == 0) {
            o.top_k = (uint32_t)strtoul(v, NULL, 10);
        } else if (strcmp(a, "--max-tokens") == 0) {
            o.max_tokens = (uint32_t)strtoul(v, NULL, 10);
        } else if (strcmp(a, "--max-msg-bytes") == 0) {
            o.max_msg_bytes = strtoull(v, NULL, 10);
        } else if (strcmp(a, "--delay-ms") == 0) {
            o.delay_ms = (uint32_t)strtoul(v, NULL, 10);
        } else if (strcmp(a, "--max-queue") == 0) {
            o.max_queue = (uint32_t)strtoul(v, NULL, 10);
        } else {
            usage();
            return 2;
        }
        if (takes)
            i++;
    }
    if (o.n_experts < 1 || o.n_experts > 1024 || o.top_k < 1 || o.top_k > o.n_experts || o.hidden < 1 ||
        o.n_layers < 1) {
        fprintf(stderr, "test_server: need 1 <= top_k <= experts <= 1024, hidden >= 1, layers >= 1\n");
        return 2;
    }
    moe_status st = testsrv_run_foreground(&o);
    if (st != MOE_OK) {
        fprintf(stderr, "test_server: %s: %s\n", moe_status_name(st), moe_errmsg());
        return 1;
    }
    return 0;
}
