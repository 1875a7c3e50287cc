/*
 * fuzz_check.h: the one property check of ipc_decode, shared by the libFuzzer target
 * (fuzz_decode.c, clang + ASan/UBSan) and the corpus regression test (test_corpus.c, the
 * normal gcc build). For any input it decodes under four limit sets (no model, a model,
 * internal ops allowed, replies), and for every input that decodes it checks that the views
 * lie inside the input and that encode(decode(x)) decodes to the same message. A violated
 * property traps (the fuzzer reports it; cmocka reports the signal).
 */
#ifndef TESTS_IPC_FUZZ_CHECK_H
#define TESTS_IPC_FUZZ_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "ipc/ipc_proto.h"

/* Returns the decode status under the default (client-facing request) limits. */
moe_status fuzz_check_one(const uint8_t *data, size_t size);

#endif
