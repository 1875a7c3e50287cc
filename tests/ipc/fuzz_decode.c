/*
 * fuzz_decode.c: libFuzzer target for ipc_decode (built with clang by fuzz_test.sh:
 * -fsanitize=fuzzer,address,undefined). By hand:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -I. tests/ipc/fuzz_decode.c \
 *     tests/ipc/fuzz_check.c ipc/proto.c engine/base/{dtype,log,status,tensor}.c -lm -o /tmp/fuzz_decode
 *   /tmp/fuzz_decode -max_len=4096 /tmp/new_corpus tests/ipc/fuzz_corpus
 */
#include "tests/ipc/fuzz_check.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    moe_log_set_level(MOE_LOG_NONE);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    (void)fuzz_check_one(data, size);
    return 0;
}
