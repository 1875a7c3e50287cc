/*
 * make_model_main.c: the standalone make-model program (bazel run //engine/model:make-model --
 * --help). The daemon's `moe-engine make-model` subcommand runs the same eng_make_model_main.
 */
#include <stdio.h>

#include "engine/model/model.h"

int main(int argc, char **argv) {
    if (moe_log_init_from_env() != MOE_OK)
        fprintf(stderr, "make-model: %s (logging keeps its defaults)\n", moe_errmsg());
    return eng_make_model_main(argc, argv);
}
