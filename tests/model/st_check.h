/*
 * st_check.h: the properties every input must keep through eng_st_header_parse, shared by the
 * libFuzzer harness (fuzz_st_header.c) and the plain corpus test (test_st_corpus.c): the parse
 * never crashes, and when it accepts a file, every entry it hands out is sane (inside the
 * file, sizes consistent, sorted, unique, found by name, non-overlapping).
 */
#ifndef TESTS_MODEL_ST_CHECK_H
#define TESTS_MODEL_ST_CHECK_H

#include <stddef.h>
#include <stdint.h>

/* Parses data[0..size) as a whole safetensors file. Returns NULL when every property holds
 * (whether or not the file was accepted), else a constant string naming the one broken. */
const char *st_check_input(const uint8_t *data, size_t size);

#endif /* TESTS_MODEL_ST_CHECK_H */
