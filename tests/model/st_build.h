/*
 * st_build.h: test helpers (header-only, tests/model only) that write safetensors bytes by
 * hand, independently of engine/model's writer: an 8-byte little-endian length, the JSON text
 * exactly as given, then the data. Tests use it to make valid files and every kind of broken
 * one.
 */
#ifndef TESTS_MODEL_ST_BUILD_H
#define TESTS_MODEL_ST_BUILD_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A buffer: le64(strlen(json)), json, then `data_len` bytes of `data` (or a byte pattern when
 * data is NULL). Caller frees. */
static inline uint8_t *stb_bytes(const char *json, const void *data, size_t data_len, size_t *len) {
    size_t n = strlen(json);
    uint8_t *b = malloc(8 + n + data_len + 1);
    if (!b)
        abort();
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(b + 8, json, n);
    for (size_t i = 0; i < data_len; i++)
        b[8 + n + i] = data ? ((const uint8_t *)data)[i] : (uint8_t)(i * 7 + 1);
    *len = 8 + n + data_len;
    return b;
}

static inline int stb_write_bytes(const char *path, const void *b, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(b, 1, len, f);
    int rc = fclose(f);
    return (w == len && rc == 0) ? 0 : -1;
}

static inline int stb_write(const char *path, const char *json, const void *data, size_t data_len) {
    size_t len;
    uint8_t *b = stb_bytes(json, data, data_len, &len);
    int rc = stb_write_bytes(path, b, len);
    free(b);
    return rc;
}

static inline int stb_write_text(const char *path, const char *text) {
    return stb_write_bytes(path, text, strlen(text));
}

/* A fresh directory under $TEST_TMPDIR (or /tmp). Returns a static-lifetime copy per call. */
static inline char *stb_tmpdir(const char *tag) {
    const char *base = getenv("TEST_TMPDIR");
    if (!base || !*base)
        base = "/tmp";
    static int seq;
    char *p = malloc(4096);
    if (!p)
        abort();
    snprintf(p, 4096, "%s/%s-%d-%d", base, tag, (int)getpid(), seq++);
    mkdir(p, 0755);
    return p;
}

#endif /* TESTS_MODEL_ST_BUILD_H */
