/*
 * fuzz_st_header.c: libFuzzer target for the safetensors header parser. Built by
 * fuzz_test.sh with clang -fsanitize=fuzzer,address,undefined (Bazel's toolchain is gcc).
 * Any crash, sanitizer report or broken property (st_check.c) aborts.
 */
#include <stdio.h>
#include <stdlib.h>

#include "tests/model/st_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *bad = st_check_input(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_st_header: property broken: %s\n", bad);
        abort();
    }
    return 0;
}
