/*
 * cpu_gemm.c: the packed-panel product of the fast CPU backend (see cpu_gemm.h for the order
 * of operations it promises and why).
 *
 * Each routine is written once as an always-inline body and instantiated twice: for AVX2
 * (256-bit vectors) and for the x86-64 baseline (the compiler splits each 8-float vector into two
 * SSE halves). Both do the same IEEE operations per element, so the choice (made once, at the
 * first call, from the CPU's feature bits) changes the speed, never the bits. On other
 * architectures only the baseline exists.
 *
 * Threads: pure functions; the dispatch choice is a benign race (every thread computes the
 * same answer).
 */
#include "kernels/cpu/cpu_gemm.h"

#include <string.h>

typedef float v8f __attribute__((vector_size(32)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------
 * Packing: p[k * 16 + j] = B[j][k]. Rows are read in blocks of 8 columns and written as one
 * 16-float line per k, so both sides stream.
 * ---------------------------------------------------------------------------------------- */
ALWAYS_INLINE void pack_body(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p) {
    if (nr < CPU_NR)
        memset(p, 0, sizeof(float) * (size_t)kd * CPU_NR);
    switch (dt) {
    case MOE_DTYPE_BF16: {
        const uint16_t *src = b;
        for (int32_t j = 0; j < nr; j++) {
            const uint16_t *row = src + (size_t)j * (size_t)ldb;
            for (int64_t k = 0; k < kd; k++) {
                uint32_t u = (uint32_t)row[k] << 16;
                float f;
                memcpy(&f, &u, sizeof f);
                p[k * CPU_NR + j] = f;
            }
        }
        break;
    }
    case MOE_DTYPE_F32: {
        const float *src = b;
        for (int32_t j = 0; j < nr; j++) {
            const float *row = src + (size_t)j * (size_t)ldb;
            for (int64_t k = 0; k < kd; k++)
                p[k * CPU_NR + j] = row[k];
        }
        break;
    }
    default: { /* F16: exact conversion through the base library */
        const uint16_t *src = b;
        for (int32_t j = 0; j < nr; j++) {
            const uint16_t *row = src + (size_t)j * (size_t)ldb;
            for (int64_t k = 0; k < kd; k++)
                p[k * CPU_NR + j] = moe_f16_to_f32(row[k]);
        }
        break;
    }
    }
}

/* ------------------------------------------------------------------------------------------
 * The tile: MR rows x 16 columns, two accumulator vectors per row, k in order.
 * ---------------------------------------------------------------------------------------- */
/* One row of the tile: two accumulator vectors (columns 0-7 and 8-15). Written out per row
 * (not as a loop over an array) so that the accumulators live in registers. */
#define ROW_DECL(i)               \
    v8f c0_##i = (v8f){0};         \
    v8f c1_##i = (v8f){0};         \
    const float *a_##i = a_rows[i]
#define ROW_STEP(i)                       \
    do {                                  \
        const float av = a_##i[k];        \
        c0_##i = c0_##i + p0 * av;        \
        c1_##i = c1_##i + p1 * av;        \
    } while (0)
#define ROW_STORE(i)                                           \
    do {                                                       \
        memcpy(out + (i) * CPU_NR, &c0_##i, sizeof(v8f));      \
        memcpy(out + (i) * CPU_NR + 8, &c1_##i, sizeof(v8f));  \
    } while (0)
#define PANEL_LOAD                                          \
    const v8f p0 = *(const v8f *)(p + k * CPU_NR);          \
    const v8f p1 = *(const v8f *)(p + k * CPU_NR + 8)

ALWAYS_INLINE void tile4(const float *const *a_rows, const float *p, int64_t kd, float *out) {
    ROW_DECL(0);
    ROW_DECL(1);
    ROW_DECL(2);
    ROW_DECL(3);
    for (int64_t k = 0; k < kd; k++) {
        PANEL_LOAD;
        ROW_STEP(0);
        ROW_STEP(1);
        ROW_STEP(2);
        ROW_STEP(3);
    }
    ROW_STORE(0);
    ROW_STORE(1);
    ROW_STORE(2);
    ROW_STORE(3);
}

ALWAYS_INLINE void tile2(const float *const *a_rows, const float *p, int64_t kd, float *out) {
    ROW_DECL(0);
    ROW_DECL(1);
    for (int64_t k = 0; k < kd; k++) {
        PANEL_LOAD;
        ROW_STEP(0);
        ROW_STEP(1);
    }
    ROW_STORE(0);
    ROW_STORE(1);
}

ALWAYS_INLINE void tile1(const float *const *a_rows, const float *p, int64_t kd, float *out) {
    ROW_DECL(0);
    for (int64_t k = 0; k < kd; k++) {
        PANEL_LOAD;
        ROW_STEP(0);
    }
    ROW_STORE(0);
}

/* Any mr in 1..4: the rows are independent, so 3 = 2 + 1 gives the same bits as one tile. */
ALWAYS_INLINE void tile_body(const float *const *a_rows, int32_t mr, const float *p, int64_t kd, float *out) {
    switch (mr) {
    case 4:
        tile4(a_rows, p, kd, out);
        break;
    case 3:
        tile2(a_rows, p, kd, out);
        tile1(a_rows + 2, p, kd, out + 2 * CPU_NR);
        break;
    case 2:
        tile2(a_rows, p, kd, out);
        break;
    default:
        tile1(a_rows, p, kd, out);
        break;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static void tile_avx2(const float *const *a_rows, int32_t mr, const float *p,
                                                      int64_t kd, float *out) {
    tile_body(a_rows, mr, p, kd, out);
}
__attribute__((target("avx2"))) static void pack_avx2(moe_dtype dt, const void *b, int64_t ldb, int32_t nr,
                                                      int64_t kd, float *p) {
    pack_body(dt, b, ldb, nr, kd, p);
}
#endif

static void tile_base(const float *const *a_rows, int32_t mr, const float *p, int64_t kd, float *out) {
    tile_body(a_rows, mr, p, kd, out);
}
static void pack_base(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p) {
    pack_body(dt, b, ldb, nr, kd, p);
}

static int use_avx2 = -1; /* -1: not decided yet */

static int have_avx2(void) {
    if (use_avx2 < 0) {
#ifdef HAVE_AVX2_PATH
        __builtin_cpu_init();
        use_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
#else
        use_avx2 = 0;
#endif
    }
    return use_avx2;
}

const char *cpu_gemm_isa(void) { return have_avx2() ? "avx2" : "sse2"; }

void cpu_gemm_tile(const float *const *a_rows, int32_t mr, const float *p, int64_t kd, float *out) {
#ifdef HAVE_AVX2_PATH
    if (have_avx2()) {
        tile_avx2(a_rows, mr, p, kd, out);
        return;
    }
#endif
    tile_base(a_rows, mr, p, kd, out);
}

void cpu_pack_panel(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p) {
#ifdef HAVE_AVX2_PATH
    if (have_avx2()) {
        pack_avx2(dt, b, ldb, nr, kd, p);
        return;
    }
#endif
    pack_base(dt, b, ldb, nr, kd, p);
}
