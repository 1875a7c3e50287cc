/*
 * test_base.c: unit tests of engine/base (status, error messages, logging filters, dtype
 * conversions against independent references, tensors, overflow checks, the RNG).
 *
 * Independent references: fp16 conversions are checked against the compiler's own _Float16
 * (IEEE round to nearest even, done by gcc's runtime); bf16 rounding against a computation in
 * double that picks the nearer of the two neighbouring bf16 values, ties to the even one.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/base/moe_base.h"

static void test_status_strings(void **state) {
    (void)state;
    assert_string_equal(moe_status_str(MOE_OK), "ok");
    assert_string_equal(moe_status_name(MOE_ERR_INVALID_ARG), "MOE_ERR_INVALID_ARG");
    for (int s = 0; s >= MOE_STATUS_MIN_; s--) {
        assert_non_null(moe_status_str((moe_status)s));
        assert_string_not_equal(moe_status_name((moe_status)s), "MOE_ERR_UNKNOWN");
    }
    assert_string_equal(moe_status_name((moe_status)-999), "MOE_ERR_UNKNOWN");
    assert_string_equal(moe_status_str((moe_status)-999), "unknown status");
}

static void test_errmsg(void **state) {
    (void)state;
    moe_errmsg_clear();
    assert_string_equal(moe_errmsg(), "");
    moe_status s = moe_fail(MOE_ERR_INVALID_ARG, "bad %s %d", "thing", 42);
    assert_int_equal(s, MOE_ERR_INVALID_ARG);
    assert_string_equal(moe_errmsg(), "bad thing 42");
    /* adding context to the message with the message itself as an argument */
    moe_fail(MOE_ERR_IO, "outer: %s", moe_errmsg());
    assert_string_equal(moe_errmsg(), "outer: bad thing 42");
    moe_fail(MOE_ERR_IO, "%s (again: %s)", moe_errmsg(), moe_errmsg());
    assert_string_equal(moe_errmsg(), "outer: bad thing 42 (again: outer: bad thing 42)");
}

static moe_status inner_fails(void) { return moe_fail(MOE_ERR_FORMAT, "inner"); }
static moe_status outer_checks(int *reached) {
    MOE_CHECK(inner_fails());
    *reached = 1;
    return MOE_OK;
}
static moe_status goto_checks(int *cleaned) {
    moe_status st = MOE_OK;
    MOE_CHECK_GOTO(inner_fails(), st, fail);
    return MOE_OK;
fail:
    *cleaned = 1;
    return st;
}
static moe_status sys_checks(void) {
    MOE_SYS_CHECK(close(-1));
    return MOE_OK;
}

static void test_check_macros(void **state) {
    (void)state;
    int reached = 0, cleaned = 0;
    assert_int_equal(outer_checks(&reached), MOE_ERR_FORMAT);
    assert_int_equal(reached, 0);
    assert_int_equal(goto_checks(&cleaned), MOE_ERR_FORMAT);
    assert_int_equal(cleaned, 1);
    assert_int_equal(sys_checks(), MOE_ERR_SYSTEM);
    assert_non_null(strstr(moe_errmsg(), "close(-1)"));
    assert_non_null(strstr(moe_errmsg(), "Bad file descriptor"));
}

static int side_effects;
static int count_call(void) { return ++side_effects; }

static void test_log_filter(void **state) {
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    moe_log_set_fd(fds[1]);
    assert_int_equal(moe_log_set_level_str("warn"), MOE_OK);
    assert_int_equal(moe_log_set_subsys_str("all"), MOE_OK);
    side_effects = 0;
    /* Filtered out: the arguments are not evaluated at all. */
    MOE_INFO(MOE_SUB_ENG, "not shown %d", count_call());
    MOE_DEBUG(MOE_SUB_KERN, "not shown %d", count_call());
    assert_int_equal(side_effects, 0);
    MOE_WARN(MOE_SUB_ENG, "shown %d", count_call());
    assert_int_equal(side_effects, 1);
    /* Subsystem exclusion. */
    assert_int_equal(moe_log_set_subsys_str("^eng"), MOE_OK);
    MOE_ERROR(MOE_SUB_ENG, "excluded %d", count_call());
    assert_int_equal(side_effects, 1);
    MOE_ERROR(MOE_SUB_IPC, "included");
    moe_log_set_identity("worker", 3);
    MOE_ERROR(MOE_SUB_PAR, "with identity");
    close(fds[1]);
    char buf[4096] = {0};
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    assert_true(n > 0);
    assert_non_null(strstr(buf, " W eng["));
    assert_non_null(strstr(buf, "shown 1"));
    assert_null(strstr(buf, "not shown"));
    assert_null(strstr(buf, "excluded"));
    assert_non_null(strstr(buf, " E ipc["));
    assert_non_null(strstr(buf, "par[worker r3 p"));
    /* Three lines exactly. */
    int lines = 0;
    for (char *c = buf; *c; c++)
        lines += *c == '\n';
    assert_int_equal(lines, 3);
    /* Bad names are errors and keep the configuration. */
    assert_int_equal(moe_log_set_level_str("loud"), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "loud"));
    assert_int_equal(moe_log_set_subsys_str("eng,nope"), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_log_level_g, MOE_LOG_WARN);
    moe_log_set_fd(2);
    moe_log_set_identity("", -1);
    moe_log_set_subsys_str("all");
    moe_log_set_level(MOE_LOG_INFO);
}

static void test_dtypes(void **state) {
    (void)state;
    assert_int_equal(moe_dtype_size(MOE_DTYPE_BF16), 2);
    assert_int_equal(moe_dtype_size(MOE_DTYPE_F32), 4);
    assert_int_equal(moe_dtype_size((moe_dtype)99), 0);
    moe_dtype d;
    assert_int_equal(moe_dtype_parse("bfloat16", &d), MOE_OK);
    assert_int_equal(d, MOE_DTYPE_BF16);
    assert_int_equal(moe_dtype_parse("fp8", &d), MOE_ERR_INVALID_ARG);
    assert_false(moe_dtype_valid(-1));
    assert_false(moe_dtype_valid(MOE_DTYPE_COUNT_));
}

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Independent bf16 rounding: the two bf16 neighbours of f by truncation, the nearer in double,
 * ties to the even mantissa. */
static uint16_t bf16_reference(float f) {
    if (isnan(f))
        return 0; /* not used for NaN */
    uint32_t u = fbits(f);
    uint16_t lo = (uint16_t)(u >> 16); /* toward zero */
    uint16_t hi = (uint16_t)(lo + 1);  /* away from zero (next magnitude) */
    double vf = f, vlo = bitsf((uint32_t)lo << 16);
    if ((u & 0xffffu) == 0)
        return lo;
    double vhi = bitsf((uint32_t)hi << 16);
    if (isinf(vhi) || ((uint32_t)hi << 16 & 0x7f800000u) == 0x7f800000u) {
        /* next magnitude is inf: IEEE rounds to inf when |f| >= max + half ulp */
        double maxv = fabs(vlo), ulp = ldexp(1.0, ilogb(maxv) - 7);
        if (fabs(vf) > maxv + ulp / 2 || (fabs(vf) == maxv + ulp / 2 && (lo & 1)))
            return hi;
        return lo;
    }
    double dlo = fabs(vf - vlo), dhi = fabs(vhi - vf);
    if (dlo < dhi)
        return lo;
    if (dhi < dlo)
        return hi;
    return (lo & 1) ? hi : lo;
}

static void test_bf16_conversion(void **state) {
    (void)state;
    /* Every bf16 value: exact round trip; NaN stays NaN. */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = moe_bf16_to_f32((uint16_t)h);
        assert_int_equal(fbits(f), h << 16);
        if (isnan(f))
            assert_true(isnan(moe_bf16_to_f32(moe_f32_to_bf16(f))));
        else
            assert_int_equal(moe_f32_to_bf16(f), h);
    }
    /* Every tie, and the values on either side of it, for every bf16 value. */
    for (uint32_t h = 0; h < 65536; h++) {
        if (((h << 16) & 0x7f800000u) == 0x7f800000u)
            continue;
        static const uint32_t lows[] = {0x0001, 0x7fff, 0x8000, 0x8001, 0xffff};
        for (size_t i = 0; i < 5; i++) {
            float f = bitsf((h << 16) | lows[i]);
            assert_int_equal(moe_f32_to_bf16(f), bf16_reference(f));
        }
    }
    /* Random bit patterns. */
    moe_rng r;
    moe_rng_seed(&r, 1);
    for (int i = 0; i < 2000000; i++) {
        float f = bitsf((uint32_t)moe_rng_next(&r));
        if (isnan(f)) {
            assert_true(isnan(moe_bf16_to_f32(moe_f32_to_bf16(f))));
            continue;
        }
        assert_int_equal(moe_f32_to_bf16(f), bf16_reference(f));
    }
    assert_int_equal(moe_f32_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(moe_f32_to_bf16(-INFINITY), 0xff80);
    assert_int_equal(moe_f32_to_bf16(3.4028235e38f), 0x7f80); /* FLT_MAX rounds up to inf */
    assert_int_equal(moe_f32_to_bf16(1.0f), 0x3f80);
}

static uint16_t h_bits(_Float16 h) {
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static void test_f16_conversion(void **state) {
    (void)state;
    /* Every half value: matches the compiler's widening, exact round trip. */
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t hb = (uint16_t)h;
        _Float16 hv;
        memcpy(&hv, &hb, 2);
        float f = moe_f16_to_f32(hb);
        float ref = (float)hv;
        if (isnan(ref)) {
            assert_true(isnan(f));
            continue;
        }
        assert_int_equal(fbits(f), fbits(ref));
        assert_int_equal(moe_f32_to_f16(f), hb);
    }
    /* Narrowing against the compiler's _Float16 (IEEE round to nearest even): random bit
     * patterns, then a dense sweep of the range where half has its normals and subnormals. */
    moe_rng r;
    moe_rng_seed(&r, 2);
    for (int i = 0; i < 2000000; i++) {
        float f = bitsf((uint32_t)moe_rng_next(&r));
        if (isnan(f))
            continue;
        assert_int_equal(moe_f32_to_f16(f), h_bits((_Float16)f));
    }
    for (uint32_t u = 0x33000000u; u < 0x47800000u + 0x100000u; u += 97) { /* 2^-25 .. past 65520 */
        float f = bitsf(u);
        assert_int_equal(moe_f32_to_f16(f), h_bits((_Float16)f));
        assert_int_equal(moe_f32_to_f16(-f), h_bits((_Float16)(-f)));
    }
    assert_int_equal(moe_f32_to_f16(65520.0f), 0x7c00); /* halfway to 65536: rounds to inf */
    assert_int_equal(moe_f32_to_f16(65519.0f), 0x7bff);
    assert_true(isnan(moe_f16_to_f32(moe_f32_to_f16(NAN))));
}

static void test_bulk_and_round(void **state) {
    (void)state;
    float src[5] = {1.0f, -2.5f, 1e-3f, 65504.0f, 0.1f};
    uint16_t b[5];
    float back[5];
    moe_from_f32(MOE_DTYPE_BF16, src, b, 5);
    moe_to_f32(MOE_DTYPE_BF16, b, back, 5);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(b[i], moe_f32_to_bf16(src[i]));
        assert_true(fbits(back[i]) == fbits(moe_round_to(MOE_DTYPE_BF16, src[i])));
        assert_true(fabsf(back[i] - src[i]) <= fabsf(src[i]) * 0x1p-8f);
    }
    assert_true(moe_round_to(MOE_DTYPE_F32, 0.1f) == 0.1f);
    assert_true(moe_load_f32(MOE_DTYPE_F16, (uint16_t[]){0x3c00}, 0) == 1.0f);
}

static void test_tensors(void **state) {
    (void)state;
    moe_tensor t;
    assert_int_equal(moe_tensor_alloc(&t, MOE_DTYPE_BF16, 2, (int64_t[]){7, 33}), MOE_OK);
    assert_true(((uintptr_t)t.data % MOE_ALIGN) == 0);
    assert_int_equal(moe_tensor_numel(&t), 231);
    assert_int_equal(moe_tensor_nbytes(&t), 462);
    char d[64];
    assert_string_equal(moe_tensor_desc(&t, d, sizeof d), "bf16[7, 33]");
    assert_int_equal(moe_tensor_expect(&t, "x", MOE_DTYPE_BF16, 2, (int64_t[]){-1, 33}), MOE_OK);
    assert_int_equal(moe_tensor_expect(&t, "x", MOE_DTYPE_F32, 2, NULL), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "dtype bf16, expected f32"));
    assert_int_equal(moe_tensor_expect(&t, "x", MOE_DTYPE_BF16, 2, (int64_t[]){7, 32}), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "dimension 1 should be 32"));
    assert_int_equal(moe_tensor_expect(&t, "x", MOE_DTYPE_BF16, 3, NULL), MOE_ERR_INVALID_ARG);
    moe_tensor v = moe_tensor_view2((char *)t.data + 100, MOE_DTYPE_BF16, 1, 10);
    assert_true(moe_tensors_overlap(&t, &v));
    moe_tensor w = moe_tensor_view2((char *)t.data + 462, MOE_DTYPE_BF16, 1, 10);
    assert_false(moe_tensors_overlap(&t, &w));
    moe_tensor empty = moe_tensor_view2((char *)t.data, MOE_DTYPE_BF16, 0, 10);
    assert_false(moe_tensors_overlap(&t, &empty));
    moe_tensor nulld = moe_tensor_view2(NULL, MOE_DTYPE_F32, 2, 2);
    assert_int_equal(moe_tensor_expect(&nulld, "n", MOE_DTYPE_F32, 2, NULL), MOE_ERR_INVALID_ARG);
    moe_tensor neg = moe_tensor_view2(t.data, MOE_DTYPE_F32, -1, 2);
    assert_int_equal(moe_tensor_expect(&neg, "n", MOE_DTYPE_F32, 2, NULL), MOE_ERR_INVALID_ARG);
    moe_tensor huge = moe_tensor_view2(t.data, MOE_DTYPE_F32, INT64_MAX / 2, 4);
    assert_int_equal(moe_tensor_expect(&huge, "h", MOE_DTYPE_F32, 2, NULL), MOE_ERR_INVALID_ARG);
    moe_tensor_free(&t);
    assert_null(t.data);
    moe_tensor big;
    assert_int_equal(moe_tensor_alloc(&big, MOE_DTYPE_F32, 2, (int64_t[]){1LL << 40, 1LL << 20}), MOE_ERR_INVALID_ARG);
    size_t out;
    assert_false(moe_mul_size(SIZE_MAX / 2, 3, &out));
    assert_true(moe_mul_size(1000, 1000, &out) && out == 1000000);
    assert_false(moe_add_size(SIZE_MAX, 1, &out));
}

static void test_rng(void **state) {
    (void)state;
    moe_rng a, b;
    moe_rng_seed(&a, 42);
    moe_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++)
        assert_true(moe_rng_next(&a) == moe_rng_next(&b));
    /* Uniform mean and normal variance within loose statistical bounds. */
    double s = 0, s2 = 0;
    int counts[10] = {0};
    for (int i = 0; i < 100000; i++) {
        s += moe_rng_uniform(&a);
        float n = moe_rng_normal(&a);
        s2 += (double)n * n;
        counts[moe_rng_below(&a, 10)]++;
    }
    assert_true(fabs(s / 100000 - 0.5) < 0.01);
    assert_true(fabs(s2 / 100000 - 1.0) < 0.03);
    for (int i = 0; i < 10; i++)
        assert_true(counts[i] > 9000 && counts[i] < 11000);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_strings), cmocka_unit_test(test_errmsg),
        cmocka_unit_test(test_check_macros),   cmocka_unit_test(test_log_filter),
        cmocka_unit_test(test_dtypes),         cmocka_unit_test(test_bf16_conversion),
        cmocka_unit_test(test_f16_conversion), cmocka_unit_test(test_bulk_and_round),
        cmocka_unit_test(test_tensors),        cmocka_unit_test(test_rng),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
