/*
 * test_tensorfile.c: the CLI's .npy and safetensors code (ipc/cli/tensorfile.c): round trips
 * of every dtype and rank, version 2.0 headers, and one rejection per malformed field. Files
 * written by numpy itself are read in cli_test.sh (an independent writer).
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

#include "ipc/cli/tensorfile.h"

static char dir[4096];

static const char *tmp_path(const char *name) {
    static char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

/* A .npy v1 image with the given header dict text and n data bytes. */
static size_t make_npy(uint8_t *buf, const char *dict, size_t ndata, int major) {
    size_t dl = strlen(dict), pre = major == 1 ? 10 : 12;
    size_t hl = dl + 1;
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (uint8_t)major;
    buf[7] = 0;
    if (major == 1) {
        buf[8] = (uint8_t)hl;
        buf[9] = (uint8_t)(hl >> 8);
    } else {
        buf[8] = (uint8_t)hl;
        buf[9] = (uint8_t)(hl >> 8);
        buf[10] = buf[11] = 0;
    }
    memcpy(buf + pre, dict, dl);
    buf[pre + dl] = '\n';
    memset(buf + pre + hl, 0x3f, ndata);
    return pre + hl + ndata;
}

static moe_status parse_dict(const char *dict, size_t ndata, int u2_as) {
    uint8_t buf[1024];
    size_t n = make_npy(buf, dict, ndata, 1);
    moe_tensor t;
    moe_status st = npy_parse(buf, n, u2_as, &t);
    if (st == MOE_OK)
        moe_tensor_free(&t);
    return st;
}

static void test_npy_roundtrip(void **state) {
    (void)state;
    for (int dt = 0; dt < MOE_DTYPE_COUNT_; dt++) {
        int64_t shape[4] = {2, 3, 1, 2};
        for (int32_t nd = 0; nd <= 4; nd++) {
            moe_tensor t, r;
            assert_int_equal(moe_tensor_alloc(&t, (moe_dtype)dt, nd, shape), MOE_OK);
            uint8_t *p = t.data;
            for (size_t i = 0; i < moe_tensor_nbytes(&t); i++)
                p[i] = (uint8_t)(i * 37 + 11);
            assert_int_equal(npy_write(tmp_path("t.npy"), &t), MOE_OK);
            assert_int_equal(npy_read(tmp_path("t.npy"), MOE_DTYPE_BF16, &r), MOE_OK);
            assert_int_equal(r.dtype, t.dtype);
            assert_int_equal(r.ndim, nd);
            for (int32_t i = 0; i < nd; i++)
                assert_int_equal(r.shape[i], shape[i]);
            assert_memory_equal(r.data, t.data, moe_tensor_nbytes(&t));
            moe_tensor_free(&r);
            moe_tensor_free(&t);
        }
    }
    /* the written header is 64-byte aligned and ends with a newline (numpy's own rule) */
    uint8_t *b;
    size_t n;
    assert_int_equal(tf_read_file(tmp_path("t.npy"), 1 << 20, &b, &n), MOE_OK);
    size_t hl = (size_t)b[8] | (size_t)b[9] << 8;
    assert_int_equal((10 + hl) % 64, 0);
    assert_int_equal(b[10 + hl - 1], '\n');
    moe_free(b);
}

static void test_npy_versions_and_forms(void **state) {
    (void)state;
    uint8_t buf[1024];
    moe_tensor t;
    size_t n = make_npy(buf, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, 2);
    assert_int_equal(npy_parse(buf, n, -1, &t), MOE_OK);
    assert_int_equal(t.shape[1], 3);
    moe_tensor_free(&t);
    /* any key order, double quotes, no trailing comma, a 1-tuple, extra blanks */
    assert_int_equal(parse_dict("{\"shape\": (5,), \"fortran_order\": False, \"descr\": \"<i4\"}", 20, -1), MOE_OK);
    assert_int_equal(parse_dict("{'descr':'<f2','fortran_order':False,'shape':()}   ", 2, -1), MOE_OK);
    /* '<u2': bf16 or f16 on request, refused otherwise */
    n = make_npy(buf, "{'descr': '<u2', 'fortran_order': False, 'shape': (4,), }", 8, 1);
    assert_int_equal(npy_parse(buf, n, MOE_DTYPE_F16, &t), MOE_OK);
    assert_int_equal(t.dtype, MOE_DTYPE_F16);
    moe_tensor_free(&t);
    assert_int_equal(npy_parse(buf, n, -1, &t), MOE_ERR_UNSUPPORTED);
}

static void test_npy_rejections(void **state) {
    (void)state;
    const char *good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
    assert_int_equal(parse_dict(good, 16, -1), MOE_OK);
    assert_int_equal(parse_dict(good, 15, -1), MOE_ERR_FORMAT);  /* short data */
    assert_int_equal(parse_dict(good, 17, -1), MOE_ERR_FORMAT);  /* trailing data */
    assert_int_equal(parse_dict("{'descr': '<f4', 'shape': (2, 2), }", 16, -1), MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 2)}", 16, -1),
                     MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'x': 1}", 16, -1),
                     MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16, -1),
                     MOE_ERR_UNSUPPORTED);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 2), }", 16, -1), MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16, -1),
                     MOE_ERR_UNSUPPORTED);
    assert_int_equal(parse_dict("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }", 16, -1),
                     MOE_ERR_UNSUPPORTED);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1), }", 4, -1),
                     MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -2), }", 16, -1),
                     MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999, 2), }", 16, -1),
                     MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), } x", 16, -1),
                     MOE_ERR_FORMAT);
    assert_int_equal(parse_dict("['descr']", 16, -1), MOE_ERR_FORMAT);
    uint8_t buf[256];
    size_t n = make_npy(buf, good, 16, 1);
    moe_tensor t;
    buf[6] = 4; /* version 4.0 */
    assert_int_equal(npy_parse(buf, n, -1, &t), MOE_ERR_FORMAT);
    buf[6] = 1;
    buf[8] = 0xff; /* header length past the file */
    assert_int_equal(npy_parse(buf, n, -1, &t), MOE_ERR_FORMAT);
    n = make_npy(buf, good, 16, 1);
    buf[10 + strlen(good)] = ' '; /* no final newline */
    assert_int_equal(npy_parse(buf, n, -1, &t), MOE_ERR_FORMAT);
    assert_int_equal(npy_parse("\x93NUMPX\x01\x00\x00\x00", 10, -1, &t), MOE_ERR_FORMAT);
    assert_int_equal(npy_read(tmp_path("missing.npy"), -1, &t), MOE_ERR_NOT_FOUND);
    assert_non_null(strstr(moe_errmsg(), "missing.npy"));
}

static void test_safetensors(void **state) {
    (void)state;
    float a[6] = {1, 2, 3, 4, 5, 6};
    int32_t b[2] = {7, -8};
    moe_tensor ta = moe_tensor_view2(a, MOE_DTYPE_F32, 2, 3), tb = moe_tensor_view1(b, MOE_DTYPE_I32, 2);
    const char *names[2] = {"x", "topk_ids"};
    const moe_tensor *ts[2] = {&ta, &tb};
    assert_int_equal(st_write(tmp_path("t.safetensors"), names, ts, 2), MOE_OK);
    st_file *f;
    assert_int_equal(st_open(tmp_path("t.safetensors"), &f), MOE_OK);
    moe_tensor v;
    assert_int_equal(st_get(f, "x", &v), MOE_OK);
    assert_int_equal(v.ndim, 2);
    assert_int_equal(v.shape[1], 3);
    assert_memory_equal(v.data, a, sizeof a);
    assert_int_equal(st_get(f, "topk_ids", &v), MOE_OK);
    assert_memory_equal(v.data, b, sizeof b);
    assert_int_equal(st_get(f, "logits", &v), MOE_ERR_NOT_FOUND);
    assert_int_equal(st_get(f, "__metadata__", &v), MOE_ERR_NOT_FOUND);
    st_close(f);
    /* hand-made broken headers */
    struct {
        const char *json;
        moe_status want;
    } cases[] = {
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", MOE_OK},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", MOE_ERR_FORMAT},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", MOE_ERR_FORMAT},
        {"{\"x\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", MOE_ERR_UNSUPPORTED},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", MOE_ERR_FORMAT},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}", MOE_ERR_FORMAT},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,0]}}", MOE_ERR_FORMAT},
        {"[1, 2]", MOE_ERR_FORMAT},
        {"{\"x\":", MOE_ERR_FORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t img[512];
        uint64_t hl = strlen(cases[i].json);
        for (int k = 0; k < 8; k++)
            img[k] = (uint8_t)(hl >> (8 * k));
        memcpy(img + 8, cases[i].json, hl);
        memset(img + 8 + hl, 0, 8);
        FILE *fp = fopen(tmp_path("h.safetensors"), "wb");
        fwrite(img, 1, 8 + hl + 8, fp);
        fclose(fp);
        moe_status st = st_open(tmp_path("h.safetensors"), &f);
        if (st != cases[i].want)
            fail_msg("case %zu: %s (%s)", i, moe_status_name(st), moe_errmsg());
        if (st == MOE_OK)
            st_close(f);
    }
    FILE *fp = fopen(tmp_path("short.safetensors"), "wb");
    fwrite("\xff\x00\x00\x00\x00\x00\x00\x00{}", 1, 10, fp);
    fclose(fp);
    assert_int_equal(st_open(tmp_path("short.safetensors"), &f), MOE_ERR_FORMAT);
}

int main(void) {
    const char *t = getenv("TEST_TMPDIR");
    snprintf(dir, sizeof dir, "%s", t ? t : "/tmp");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_npy_roundtrip),
        cmocka_unit_test(test_npy_versions_and_forms),
        cmocka_unit_test(test_npy_rejections),
        cmocka_unit_test(test_safetensors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
