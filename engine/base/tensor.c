/*
 * tensor.c: aligned allocation, tensor views and argument checks, overflow-checked sizes,
 * clocks and the deterministic random generator. Pure functions; any thread.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/base/moe_base.h"

#define MOE_MAX_ALLOC ((size_t)1 << 48)

bool moe_mul_size(size_t a, size_t b, size_t *out) { return !__builtin_mul_overflow(a, b, out); }

bool moe_add_size(size_t a, size_t b, size_t *out) { return !__builtin_add_overflow(a, b, out); }

void *moe_alloc(size_t nbytes) {
    if (nbytes > MOE_MAX_ALLOC)
        return NULL;
    size_t n = (nbytes + MOE_ALIGN - 1) / MOE_ALIGN * MOE_ALIGN;
    if (n == 0)
        n = MOE_ALIGN;
    return aligned_alloc(MOE_ALIGN, n);
}

void *moe_calloc(size_t nbytes) {
    void *p = moe_alloc(nbytes);
    if (p)
        memset(p, 0, nbytes);
    return p;
}

void moe_free(void *p) { free(p); }

static bool shape_bytes(moe_dtype dt, int32_t ndim, const int64_t *shape, size_t *out) {
    size_t n = moe_dtype_size(dt);
    for (int32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0 || !moe_mul_size(n, (size_t)shape[i], &n))
            return false;
    }
    *out = n;
    return true;
}

moe_status moe_tensor_alloc(moe_tensor *t, moe_dtype dt, int32_t ndim, const int64_t *shape) {
    MOE_REQUIRE(t && (shape || ndim == 0), MOE_ERR_INVALID_ARG, "tensor_alloc: NULL argument");
    MOE_REQUIRE(moe_dtype_valid((int)dt), MOE_ERR_INVALID_ARG, "tensor_alloc: invalid dtype %d", (int)dt);
    MOE_REQUIRE(ndim >= 0 && ndim <= MOE_MAX_DIMS, MOE_ERR_INVALID_ARG, "tensor_alloc: rank %d not in [0, %d]",
                (int)ndim, MOE_MAX_DIMS);
    size_t nb;
    MOE_REQUIRE(shape_bytes(dt, ndim, shape, &nb) && nb <= MOE_MAX_ALLOC, MOE_ERR_INVALID_ARG,
                "tensor_alloc: negative or too large shape");
    void *p = moe_alloc(nb);
    if (!p)
        return moe_fail(MOE_ERR_NOMEM, "tensor_alloc: %zu bytes", nb);
    memset(t, 0, sizeof *t);
    t->data = p;
    t->dtype = dt;
    t->ndim = ndim;
    for (int32_t i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    t->owns = true;
    return MOE_OK;
}

void moe_tensor_free(moe_tensor *t) {
    if (!t)
        return;
    if (t->owns)
        moe_free(t->data);
    memset(t, 0, sizeof *t);
}

moe_tensor moe_tensor_view(void *data, moe_dtype dt, int32_t ndim, const int64_t *shape) {
    moe_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dt;
    t.ndim = ndim < 0 ? 0 : (ndim > MOE_MAX_DIMS ? MOE_MAX_DIMS : ndim);
    for (int32_t i = 0; i < t.ndim; i++)
        t.shape[i] = shape[i];
    return t;
}

moe_tensor moe_tensor_view1(void *data, moe_dtype dt, int64_t d0) { return moe_tensor_view(data, dt, 1, &d0); }

moe_tensor moe_tensor_view2(void *data, moe_dtype dt, int64_t d0, int64_t d1) {
    int64_t s[2] = {d0, d1};
    return moe_tensor_view(data, dt, 2, s);
}

moe_tensor moe_tensor_view3(void *data, moe_dtype dt, int64_t d0, int64_t d1, int64_t d2) {
    int64_t s[3] = {d0, d1, d2};
    return moe_tensor_view(data, dt, 3, s);
}

int64_t moe_tensor_numel(const moe_tensor *t) {
    int64_t n = 1;
    for (int32_t i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

size_t moe_tensor_nbytes(const moe_tensor *t) {
    size_t nb = 0;
    if (!shape_bytes(t->dtype, t->ndim, t->shape, &nb))
        return 0;
    return nb;
}

const char *moe_tensor_desc(const moe_tensor *t, char *buf, size_t cap) {
    if (!t) {
        snprintf(buf, cap, "(null)");
        return buf;
    }
    int n = snprintf(buf, cap, "%s[", moe_dtype_name(t->dtype));
    for (int32_t i = 0; i < t->ndim && n > 0 && (size_t)n < cap; i++)
        n += snprintf(buf + n, cap - (size_t)n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (n > 0 && (size_t)n < cap)
        snprintf(buf + n, cap - (size_t)n, "]");
    return buf;
}

moe_status moe_tensor_expect(const moe_tensor *t, const char *what, moe_dtype dt, int32_t ndim,
                             const int64_t *shape) {
    if (!t)
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: missing tensor", what);
    char d[96];
    if (t->dtype != dt)
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: dtype %s, expected %s", what, moe_dtype_name(t->dtype),
                        moe_dtype_name(dt));
    if (t->ndim != ndim)
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: %s has rank %d, expected %d", what,
                        moe_tensor_desc(t, d, sizeof d), (int)t->ndim, (int)ndim);
    for (int32_t i = 0; i < ndim; i++) {
        if (t->shape[i] < 0)
            return moe_fail(MOE_ERR_INVALID_ARG, "%s: negative dimension %d", what, (int)i);
        if (shape && shape[i] >= 0 && t->shape[i] != shape[i])
            return moe_fail(MOE_ERR_INVALID_ARG, "%s: %s, dimension %d should be %lld", what,
                            moe_tensor_desc(t, d, sizeof d), (int)i, (long long)shape[i]);
    }
    size_t nb;
    if (!shape_bytes(t->dtype, t->ndim, t->shape, &nb))
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: size overflows", what);
    if (nb > 0 && !t->data)
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: NULL data", what);
    return MOE_OK;
}

bool moe_ranges_overlap(const void *a, size_t na, const void *b, size_t nb) {
    if (!a || !b || na == 0 || nb == 0)
        return false;
    uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    return a0 < b0 + nb && b0 < a0 + na;
}

bool moe_tensors_overlap(const moe_tensor *a, const moe_tensor *b) {
    if (!a || !b)
        return false;
    return moe_ranges_overlap(a->data, moe_tensor_nbytes(a), b->data, moe_tensor_nbytes(b));
}

uint64_t moe_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double moe_now_s(void) { return (double)moe_now_ns() * 1e-9; }

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void moe_rng_seed(moe_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t moe_rng_next(moe_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double moe_rng_uniform(moe_rng *r) { return (double)(moe_rng_next(r) >> 11) * 0x1p-53; }

float moe_rng_normal(moe_rng *r) {
    double u1 = moe_rng_uniform(r), u2 = moe_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

uint32_t moe_rng_below(moe_rng *r, uint32_t n) {
    if (n == 0)
        return 0;
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do
        x = moe_rng_next(r);
    while (x >= lim);
    return (uint32_t)(x % n);
}
