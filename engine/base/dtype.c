/*
 * dtype.c: dtype table and exact float <-> bf16/fp16 conversions (round to nearest, ties to
 * even; NaN stays a quiet NaN with its sign; overflow goes to infinity; fp16 subnormals exact).
 * Pure functions; any thread.
 */
#include <math.h>
#include <string.h>
#include <strings.h>

#include "engine/base/moe_base.h"

static const struct {
    const char *name;
    size_t size;
} dtype_table[MOE_DTYPE_COUNT_] = {
    [MOE_DTYPE_F32] = {"f32", 4},
    [MOE_DTYPE_F16] = {"f16", 2},
    [MOE_DTYPE_BF16] = {"bf16", 2},
    [MOE_DTYPE_I32] = {"i32", 4},
};

bool moe_dtype_valid(int t) { return t >= 0 && t < MOE_DTYPE_COUNT_; }

size_t moe_dtype_size(moe_dtype t) { return moe_dtype_valid((int)t) ? dtype_table[t].size : 0; }

const char *moe_dtype_name(moe_dtype t) { return moe_dtype_valid((int)t) ? dtype_table[t].name : "invalid"; }

bool moe_dtype_is_float(moe_dtype t) { return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_BF16; }

moe_status moe_dtype_parse(const char *s, moe_dtype *out) {
    static const struct {
        const char *name;
        moe_dtype t;
    } names[] = {
        {"f32", MOE_DTYPE_F32},     {"fp32", MOE_DTYPE_F32},     {"float32", MOE_DTYPE_F32},
        {"float", MOE_DTYPE_F32},   {"f16", MOE_DTYPE_F16},      {"fp16", MOE_DTYPE_F16},
        {"float16", MOE_DTYPE_F16}, {"half", MOE_DTYPE_F16},     {"bf16", MOE_DTYPE_BF16},
        {"bfloat16", MOE_DTYPE_BF16}, {"i32", MOE_DTYPE_I32},    {"int32", MOE_DTYPE_I32},
    };
    if (!s || !out)
        return moe_fail(MOE_ERR_INVALID_ARG, "dtype: missing");
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].t;
            return MOE_OK;
        }
    }
    return moe_fail(MOE_ERR_INVALID_ARG, "unknown dtype '%.32s' (f32, f16, bf16, i32)", s);
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t moe_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep the sign, make it quiet */
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u); /* ties to even; carries into the exponent as it must */
    return (uint16_t)(u >> 16);
}

float moe_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t moe_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (exp == 0xffu) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (mant ? 0x0200u | (mant >> 13) : 0));
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        /* Half subnormal: value = m * 2^-24 with M = 1.mant * 2^23 scaled by 2^(exp-126). */
        if (exp == 0)
            return (uint16_t)sign; /* f32 subnormals are far below half's range */
        uint32_t M = mant | 0x800000u;
        int shift = 14 - e;
        if (shift > 24)
            return (uint16_t)sign;
        uint32_t m = M >> shift;
        uint32_t rem = M & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (m & 1u)))
            m++;
        return (uint16_t)(sign | m);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; /* may carry into the exponent, up to infinity: correct */
    return (uint16_t)h;
}

float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exp = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t mant = (uint32_t)h & 0x3ffu;
    if (exp == 0x1fu)
        return bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0)
            return bits_f32(sign);
        /* subnormal: mant * 2^-24, exact in float */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

float moe_round_to(moe_dtype t, float f) {
    switch (t) {
    case MOE_DTYPE_BF16:
        return moe_bf16_to_f32(moe_f32_to_bf16(f));
    case MOE_DTYPE_F16:
        return moe_f16_to_f32(moe_f32_to_f16(f));
    default:
        return f;
    }
}

float moe_load_f32(moe_dtype t, const void *p, size_t i) {
    switch (t) {
    case MOE_DTYPE_F32:
        return ((const float *)p)[i];
    case MOE_DTYPE_BF16:
        return moe_bf16_to_f32(((const uint16_t *)p)[i]);
    case MOE_DTYPE_F16:
        return moe_f16_to_f32(((const uint16_t *)p)[i]);
    case MOE_DTYPE_I32:
        return (float)((const int32_t *)p)[i];
    default:
        return NAN;
    }
}

void moe_store_f32(moe_dtype t, void *p, size_t i, float v) {
    switch (t) {
    case MOE_DTYPE_F32:
        ((float *)p)[i] = v;
        break;
    case MOE_DTYPE_BF16:
        ((uint16_t *)p)[i] = moe_f32_to_bf16(v);
        break;
    case MOE_DTYPE_F16:
        ((uint16_t *)p)[i] = moe_f32_to_f16(v);
        break;
    case MOE_DTYPE_I32:
        ((int32_t *)p)[i] = (int32_t)v;
        break;
    default:
        break;
    }
}

void moe_to_f32(moe_dtype t, const void *src, float *dst, size_t n) {
    switch (t) {
    case MOE_DTYPE_F32:
        memmove(dst, src, n * sizeof(float));
        break;
    case MOE_DTYPE_BF16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = moe_bf16_to_f32(s[i]);
        break;
    }
    case MOE_DTYPE_F16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = moe_f16_to_f32(s[i]);
        break;
    }
    default:
        for (size_t i = 0; i < n; i++)
            dst[i] = moe_load_f32(t, src, i);
    }
}

void moe_from_f32(moe_dtype t, const float *src, void *dst, size_t n) {
    switch (t) {
    case MOE_DTYPE_F32:
        memmove(dst, src, n * sizeof(float));
        break;
    case MOE_DTYPE_BF16: {
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = moe_f32_to_bf16(src[i]);
        break;
    }
    case MOE_DTYPE_F16: {
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = moe_f32_to_f16(src[i]);
        break;
    }
    default:
        for (size_t i = 0; i < n; i++)
            moe_store_f32(t, dst, i, src[i]);
    }
}
