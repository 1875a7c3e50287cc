/*
 * test_safetensors.c: the safetensors reader (engine/model/safetensors.c): a valid header and
 * every kind of broken one (each a clear MOE_ERR_FORMAT naming the problem, never a crash),
 * files on disk (truncated, header length past the end, not regular, changed size), and the
 * data reads with dtype conversion against values computed by hand.
 *
 * Inputs are made by st_build.h (bytes written by hand), not by the engine's writer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/model/model.h"
#include "tests/model/st_build.h"

/* Parses json + data_len bytes as a whole file; returns the status, frees on success. */
static moe_status parse_json(const char *json, size_t data_len, eng_st_header *h) {
    size_t len;
    uint8_t *b = stb_bytes(json, NULL, data_len, &len);
    eng_st_header tmp;
    memset(&tmp, 0x5a, sizeof tmp);
    moe_status st = eng_st_header_parse(b, len, len, "t.safetensors", h ? h : &tmp);
    if (st == MOE_OK && !h)
        eng_st_header_free(&tmp);
    free(b);
    return st;
}

/* Expects a FORMAT error whose message contains every given word. */
static void expect_format(const char *json, size_t data_len, const char *w1, const char *w2) {
    moe_errmsg_clear();
    moe_status st = parse_json(json, data_len, NULL);
    if (st != MOE_ERR_FORMAT)
        fail_msg("expected MOE_ERR_FORMAT for %s, got %s (%s)", json, moe_status_name(st), moe_errmsg());
    const char *m = moe_errmsg();
    if (!strstr(m, "t.safetensors") || (w1 && !strstr(m, w1)) || (w2 && !strstr(m, w2)))
        fail_msg("message '%s' lacks '%s' / '%s' (input %s)", m, w1 ? w1 : "", w2 ? w2 : "", json);
}

static void test_valid_header(void **state) {
    (void)state;
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"b.weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]},"
                       "\"a.weight\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
                       "\"empty\":{\"dtype\":\"F16\",\"shape\":[0,5],\"data_offsets\":[28,28]}}   ";
    eng_st_header h;
    assert_int_equal(parse_json(json, 28, &h), MOE_OK);
    assert_int_equal(h.n_tensors, 3);
    uint64_t ds = 8 + strlen(json);
    assert_int_equal(h.data_start, ds);
    assert_int_equal(h.header_len, strlen(json));
    /* sorted by name */
    assert_string_equal(h.tensors[0].name, "a.weight");
    assert_string_equal(h.tensors[1].name, "b.weight");
    assert_string_equal(h.tensors[2].name, "empty");
    const eng_st_tensor *a = eng_st_header_find(&h, "a.weight");
    assert_non_null(a);
    assert_int_equal(a->dtype, ENG_ST_BF16);
    assert_int_equal(a->ndim, 2);
    assert_int_equal(a->shape[0], 2);
    assert_int_equal(a->shape[1], 3);
    assert_int_equal(a->offset, ds + 0);
    assert_int_equal(a->nbytes, 12);
    const eng_st_tensor *b = eng_st_header_find(&h, "b.weight");
    assert_int_equal(b->dtype, ENG_ST_F32);
    assert_int_equal(b->offset, ds + 12);
    assert_int_equal(b->nbytes, 16);
    assert_null(eng_st_header_find(&h, "c.weight"));
    assert_null(eng_st_header_find(&h, "a.weigh"));
    char buf[64];
    assert_string_equal(eng_st_tensor_desc(a, buf, sizeof buf), "BF16[2, 3]");
    eng_st_header_free(&h);
    /* a scalar (shape []) of one element; an empty object is a valid file with no tensors */
    assert_int_equal(parse_json("{\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]}}", 8, NULL), MOE_OK);
    assert_int_equal(parse_json("{}", 0, NULL), MOE_OK);
    /* data past the last tensor (padding) is allowed, and so are gaps */
    assert_int_equal(parse_json("{\"s\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}", 16, NULL), MOE_OK);
    /* sub-byte dtypes: 4 F4 values are 2 bytes */
    assert_int_equal(parse_json("{\"s\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]}}", 2, NULL), MOE_OK);
    /* zero-size tensors overlap nothing, even at the same offset as data */
    assert_int_equal(parse_json("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                                "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
                                "\"y\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[2,2]}}",
                                4, NULL),
                     MOE_OK);
}

static void test_broken_lengths(void **state) {
    (void)state;
    eng_st_header h;
    uint8_t small[5] = {1, 2, 3, 4, 5};
    assert_int_equal(eng_st_header_parse(small, 5, 5, "t.safetensors", &h), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "too short"));
    assert_int_equal(eng_st_header_parse(small, 0, 0, "t.safetensors", &h), MOE_ERR_FORMAT);
    /* header length past the end of the file */
    uint8_t b[64];
    memset(b, ' ', sizeof b);
    uint64_t n = 1000;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(n >> (8 * i));
    b[8] = '{';
    assert_int_equal(eng_st_header_parse(b, sizeof b, sizeof b, "t.safetensors", &h), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "runs past the end of the file"));
    assert_non_null(strstr(moe_errmsg(), "1000"));
    /* over the 100 MB limit */
    n = 200000000ull;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(n >> (8 * i));
    assert_int_equal(eng_st_header_parse(b, sizeof b, 300000000ull, "t.safetensors", &h), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "exceeds the limit"));
    /* a huge value (all bits set) */
    memset(b, 0xff, 8);
    assert_int_equal(eng_st_header_parse(b, sizeof b, sizeof b, "t.safetensors", &h), MOE_ERR_FORMAT);
    /* caller gave fewer bytes than the header needs: an argument error, not a misparse */
    n = 40;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(n >> (8 * i));
    assert_int_equal(eng_st_header_parse(b, 20, 64, "t.safetensors", &h), MOE_ERR_INVALID_ARG);
}

static void test_broken_json(void **state) {
    (void)state;
    expect_format("{\"a\": ", 0, "not valid JSON", NULL);
    expect_format("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, "not valid JSON", NULL);
    expect_format("[1, 2]", 0, "JSON object", NULL);
    expect_format("{} xx", 0, "trailing bytes", NULL);
    expect_format("{\"a\": 3}", 0, "'a'", "not an object");
    expect_format("{\"__metadata__\": [1]}", 0, "__metadata__", NULL);
    expect_format("{\"__metadata__\": {\"k\": 1}}", 0, "__metadata__", "'k'");
    expect_format("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "empty name", NULL);
}

static void test_broken_entries(void **state) {
    (void)state;
    expect_format("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "dtype");
    expect_format("{\"w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "dtype");
    expect_format("{\"w\":{\"dtype\":\"Q4_K\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype", "Q4_K");
    expect_format("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "'w'", "shape");
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape[0]", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "shape[0]", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,\"2\"],\"data_offsets\":[0,4]}}", 4, "shape[1]", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "9 dimensions",
                  NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4, "shape[0]", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4,
                  "too large", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "data_offsets", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "data_offsets", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "data_offsets", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "data_offsets", NULL);
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "begin > end", NULL);
    /* past the end of the data (a truncated file) */
    expect_format("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 12, "past the end", "'w'");
    /* shape x dtype size != byte length */
    expect_format("{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,10]}}", 12, "needs 12 bytes",
                  "BF16[2, 3]");
    expect_format("{\"w\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2, "whole bytes", NULL);
    /* overlapping ranges name both tensors */
    expect_format("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[8,20]}}",
                  20, "overlap", "'b'");
    expect_format("{\"a\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[0,32]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                  32, "overlap", "'a'");
    expect_format("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                  8, "overlap", NULL);
    /* a name given twice */
    expect_format("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                  8, "twice", "'a'");
}

static void test_hostile_json(void **state) {
    (void)state;
    /* deep nesting is refused by the JSON parser's depth limit, not a stack overflow */
    size_t n = 200000;
    char *s = malloc(n + 3);
    s[0] = '{';
    memcpy(s + 1, "\"a\":", 4);
    for (size_t i = 5; i < n; i++)
        s[i] = '[';
    s[n] = '\0';
    moe_status st = parse_json(s, 0, NULL);
    assert_int_equal(st, MOE_ERR_FORMAT);
    free(s);
    /* control characters in names come back sanitised in messages */
    expect_format("{\"a\\u001b[31m\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, "a?[31m", NULL);
}

/* ------------------------------------------------------------------------------------------
 * Files.
 * ---------------------------------------------------------------------------------------- */
static void test_file_errors(void **state) {
    (void)state;
    char *dir = stb_tmpdir("st_files");
    char path[4200];
    eng_st_file f;
    snprintf(path, sizeof path, "%s/missing.safetensors", dir);
    assert_int_equal(eng_st_file_open(&f, path), MOE_ERR_NOT_FOUND);
    assert_non_null(strstr(moe_errmsg(), "missing.safetensors"));
    assert_int_equal(eng_st_file_open(&f, dir), MOE_ERR_IO);
    assert_non_null(strstr(moe_errmsg(), "not a regular file"));

    /* truncated: the last tensor runs past the end */
    const char *json = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    snprintf(path, sizeof path, "%s/trunc.safetensors", dir);
    assert_int_equal(stb_write(path, json, NULL, 10), 0);
    assert_int_equal(eng_st_file_open(&f, path), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "trunc.safetensors"));
    assert_non_null(strstr(moe_errmsg(), "past the end"));
    /* cut inside the header */
    assert_int_equal(truncate(path, 20), 0);
    assert_int_equal(eng_st_file_open(&f, path), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "runs past the end of the file"));
    assert_int_equal(truncate(path, 3), 0);
    assert_int_equal(eng_st_file_open(&f, path), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "too short"));
    /* a text file */
    snprintf(path, sizeof path, "%s/text.safetensors", dir);
    assert_int_equal(stb_write_text(path, "this is not a safetensors file at all, just some text\n"), 0);
    assert_int_equal(eng_st_file_open(&f, path), MOE_ERR_FORMAT);
    free(dir);
}

static void test_file_read(void **state) {
    (void)state;
    char *dir = stb_tmpdir("st_read");
    char path[4200];
    /* bf16 bits of 1.0, -2.0, 0.5, 3.140625; f32 values with known bf16 roundings; header
     * of odd length so that the data is not aligned */
    uint16_t bf[4] = {0x3F80, 0xC000, 0x3F00, 0x4049};
    float f32[4] = {1.0f, 1.00390625f /* 1 + 2^-8: tie, to even 1.0 */, 1.01171875f /* 1 + 3*2^-8: tie, to
                                                                                      even 1.015625 */
                    ,
                    -0.0f};
    uint8_t data[8 + 16 + 2];
    memcpy(data, bf, 8);
    memcpy(data + 8, f32, 16);
    memset(data + 24, 0xAB, 2);
    const char *json = "{\"bf\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,8]},"
                       "\"f\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]},"
                       "\"q\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[24,26]}}";
    assert_int_equal(strlen(json) % 2, 1);
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    assert_int_equal(stb_write(path, json, data, sizeof data), 0);
    eng_st_file f;
    assert_int_equal(eng_st_file_open(&f, path), MOE_OK);
    assert_null(f.map); /* opening reads the header only */
    const eng_st_tensor *tb = eng_st_header_find(&f.hdr, "bf"), *tf = eng_st_header_find(&f.hdr, "f"),
                        *tq = eng_st_header_find(&f.hdr, "q");
    assert_non_null(tb);
    assert_non_null(tf);
    assert_non_null(tq);
    float out[4];
    assert_int_equal(eng_st_file_read(&f, tb, MOE_DTYPE_F32, out), MOE_OK);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.5f && out[3] == 3.140625f);
    uint16_t o16[4];
    assert_int_equal(eng_st_file_read(&f, tb, MOE_DTYPE_BF16, o16), MOE_OK);
    assert_memory_equal(o16, bf, 8);
    assert_int_equal(eng_st_file_read(&f, tf, MOE_DTYPE_BF16, o16), MOE_OK);
    assert_int_equal(o16[0], 0x3F80);
    assert_int_equal(o16[1], 0x3F80);
    assert_int_equal(o16[2], 0x3F82);
    assert_int_equal(o16[3], 0x8000);
    /* f16 bits: 1.0 = 0x3C00, 1 + 2^-8 rounds to 1.0 + 2^-10 * 0? 2^-8 = 4 ulps of fp16: exact */
    assert_int_equal(eng_st_file_read(&f, tf, MOE_DTYPE_F16, o16), MOE_OK);
    assert_int_equal(o16[0], 0x3C00);
    assert_int_equal(o16[1], 0x3C04);
    assert_int_equal(o16[2], 0x3C0C);
    assert_int_equal(o16[3], 0x8000);
    assert_int_equal(eng_st_file_read(&f, tq, MOE_DTYPE_F32, out), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_errmsg(), "'q'"));
    assert_non_null(strstr(moe_errmsg(), "F8_E4M3"));
    assert_non_null(strstr(moe_errmsg(), "not supported yet"));
    assert_non_null(f.map);
    eng_st_file_unmap(&f);
    assert_null(f.map);
    /* the file changes size after open: mapping refuses (a shrunk file would fault) */
    assert_int_equal(truncate(path, (off_t)(8 + strlen(json) + 8)), 0);
    assert_int_equal(eng_st_file_read(&f, tb, MOE_DTYPE_F32, out), MOE_ERR_IO);
    assert_non_null(strstr(moe_errmsg(), "changed size"));
    eng_st_file_close(&f);
    eng_st_file_close(&f); /* idempotent */
    eng_st_file zero;
    memset(&zero, 0, sizeof zero);
    eng_st_file_close(&zero);
    free(dir);
}

static void test_dtype_table(void **state) {
    (void)state;
    moe_dtype d;
    assert_true(eng_st_dtype_to_moe(ENG_ST_BF16, &d) && d == MOE_DTYPE_BF16);
    assert_true(eng_st_dtype_to_moe(ENG_ST_F16, &d) && d == MOE_DTYPE_F16);
    assert_true(eng_st_dtype_to_moe(ENG_ST_F32, &d) && d == MOE_DTYPE_F32);
    assert_false(eng_st_dtype_to_moe(ENG_ST_F8_E4M3, &d));
    assert_false(eng_st_dtype_to_moe(ENG_ST_I32, &d));
    assert_int_equal(eng_st_dtype_bits(ENG_ST_F64), 64);
    assert_int_equal(eng_st_dtype_bits(ENG_ST_F4), 4);
    assert_string_equal(eng_st_dtype_name(ENG_ST_F8_E5M2), "F8_E5M2");
    assert_string_equal(eng_st_dtype_name((eng_st_dtype)99), "invalid");
    /* every name round-trips through a header */
    for (int t = 0; t < ENG_ST_DTYPE_COUNT_; t++) {
        char json[200];
        int bits = eng_st_dtype_bits((eng_st_dtype)t);
        snprintf(json, sizeof json, "{\"x\":{\"dtype\":\"%s\",\"shape\":[8],\"data_offsets\":[0,%d]}}",
                 eng_st_dtype_name((eng_st_dtype)t), bits);
        eng_st_header h;
        assert_int_equal(parse_json(json, (size_t)bits, &h), MOE_OK);
        assert_int_equal(h.tensors[0].dtype, t);
        eng_st_header_free(&h);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_header), cmocka_unit_test(test_broken_lengths),
        cmocka_unit_test(test_broken_json),  cmocka_unit_test(test_broken_entries),
        cmocka_unit_test(test_hostile_json), cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_file_read),    cmocka_unit_test(test_dtype_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
