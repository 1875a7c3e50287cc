/*
 * cpu_gemm.c: the packed-panel product of the fast CPU backend (see cpu_gemm.h for the order
 * of operations it promises and why).
 *
 * The products are written once as always-inline bodies over 8-float vectors (GCC/clang vector
 * extensions) and instantiated twice: for AVX2 (256-bit vectors) and for the x86-64 baseline
 * (each 8-float vector becomes two SSE halves). Both do the same IEEE operations per element,
 * so the choice (made once, at the first call, from the CPU's feature bits) changes the speed,
 * never the bits. On other architectures only the baseline exists.
 *
 * Packing is pure data movement plus exact conversions (bf16 -> f32 is a shift, f16 -> f32 is
 * exact), so its fast path (AVX2 + F16C intrinsics: 8 rows x 8 columns transposed in registers)
 * and its scalar path produce the same panel.
 *
 * Threads: pure functions; the dispatch choice is a benign race (every thread computes the
 * same answer).
 */
#include "kernels/cpu/cpu_gemm.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------
 * Packing, portable: p[k * 16 + j] = B[j][k].
 * ---------------------------------------------------------------------------------------- */
static void pack_scalar(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p, int64_t k0) {
    for (int32_t j = 0; j < CPU_NR; j++) {
        for (int64_t k = k0; k < kd; k++) {
            float f = 0.0f;
            if (j < nr) {
                size_t i = (size_t)j * (size_t)ldb + (size_t)k;
                switch (dt) {
                case MOE_DTYPE_BF16: {
                    uint32_t u = (uint32_t)((const uint16_t *)b)[i] << 16;
                    memcpy(&f, &u, sizeof f);
                    break;
                }
                case MOE_DTYPE_F32:
                    f = ((const float *)b)[i];
                    break;
                default:
                    f = moe_f16_to_f32(((const uint16_t *)b)[i]);
                    break;
                }
            }
            p[k * CPU_NR + j] = f;
        }
    }
}

#ifdef HAVE_AVX2_PATH
/* 8 columns [k, k+8) of row j as fp32 (zeros for a row past nr). */
__attribute__((target("avx2,f16c"), always_inline)) static inline __m256 load8(moe_dtype dt, const void *b, int64_t ldb,
                                                                              int32_t j, int32_t nr, int64_t k) {
    if (j >= nr)
        return _mm256_setzero_ps();
    size_t i = (size_t)j * (size_t)ldb + (size_t)k;
    switch (dt) {
    case MOE_DTYPE_BF16: {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)b + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    case MOE_DTYPE_F32:
        return _mm256_loadu_ps((const float *)b + i);
    default:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + i)));
    }
}

/* Transposes the 8x8 block r[0..7] (r[i] = row i, 8 columns) into columns, stores column c
 * at dst + c * CPU_NR. */
__attribute__((target("avx2"), always_inline)) static inline void transpose8_store(__m256 r0, __m256 r1, __m256 r2,
                                                                                   __m256 r3, __m256 r4, __m256 r5,
                                                                                   __m256 r6, __m256 r7, float *dst) {
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_store_ps(dst + 0 * CPU_NR, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_store_ps(dst + 1 * CPU_NR, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_store_ps(dst + 2 * CPU_NR, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_store_ps(dst + 3 * CPU_NR, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_store_ps(dst + 4 * CPU_NR, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_store_ps(dst + 5 * CPU_NR, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_store_ps(dst + 6 * CPU_NR, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_store_ps(dst + 7 * CPU_NR, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* The packing loop for one dtype (dt is a constant after inlining, so load8's switch folds). */
__attribute__((target("avx2,f16c"), always_inline)) static inline int64_t pack_avx2_dt(moe_dtype dt, const void *b,
                                                                                      int64_t ldb, int32_t nr,
                                                                                      int64_t kd, float *p) {
    int64_t k = 0;
    for (; k + 8 <= kd; k += 8) {
        for (int32_t j0 = 0; j0 < CPU_NR; j0 += 8) {
            transpose8_store(load8(dt, b, ldb, j0 + 0, nr, k), load8(dt, b, ldb, j0 + 1, nr, k),
                             load8(dt, b, ldb, j0 + 2, nr, k), load8(dt, b, ldb, j0 + 3, nr, k),
                             load8(dt, b, ldb, j0 + 4, nr, k), load8(dt, b, ldb, j0 + 5, nr, k),
                             load8(dt, b, ldb, j0 + 6, nr, k), load8(dt, b, ldb, j0 + 7, nr, k),
                             p + k * CPU_NR + j0);
        }
    }
    return k;
}

__attribute__((target("avx2,f16c"))) static void pack_avx2(moe_dtype dt, const void *b, int64_t ldb, int32_t nr,
                                                           int64_t kd, float *p) {
    int64_t k;
    switch (dt) {
    case MOE_DTYPE_BF16:
        k = pack_avx2_dt(MOE_DTYPE_BF16, b, ldb, nr, kd, p);
        break;
    case MOE_DTYPE_F32:
        k = pack_avx2_dt(MOE_DTYPE_F32, b, ldb, nr, kd, p);
        break;
    default:
        k = pack_avx2_dt(MOE_DTYPE_F16, b, ldb, nr, kd, p);
        break;
    }
    if (k < kd)
        pack_scalar(dt, b, ldb, nr, kd, p, k);
}
#endif

/* ------------------------------------------------------------------------------------------
 * The tiles. One row of a tile against one panel is two accumulator vectors (columns 0-7 and
 * 8-15), updated once per k in k order: c = c + p[k] * a[k], over a range [k0, k1) of k. The
 * first range starts the accumulators at +0.0; later ranges continue from the partial sums
 * stored in the output (a store and a load of an fp32 value are exact, so cutting k into
 * blocks changes no bit). Written out per row (not as a loop over an array) so that the
 * accumulators live in registers.
 * ---------------------------------------------------------------------------------------- */
#define ACC_INIT(c, o, off)                         \
    do {                                            \
        if (first)                                  \
            c = (v8f){0};                           \
        else                                        \
            memcpy(&c, (o) + (off), sizeof(v8f));   \
    } while (0)
#define ROW_DECL(i)                                  \
    v8f c0_##i, c1_##i;                              \
    ACC_INIT(c0_##i, out, (i) * CPU_NR);             \
    ACC_INIT(c1_##i, out, (i) * CPU_NR + 8);         \
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

#define TILE_ARGS const float *const *a_rows, const float *p, int64_t k0, int64_t k1, bool first, float *out

ALWAYS_INLINE void tile4(TILE_ARGS) {
    ROW_DECL(0);
    ROW_DECL(1);
    ROW_DECL(2);
    ROW_DECL(3);
    for (int64_t k = k0; k < k1; k++) {
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

ALWAYS_INLINE void tile2(TILE_ARGS) {
    ROW_DECL(0);
    ROW_DECL(1);
    for (int64_t k = k0; k < k1; k++) {
        PANEL_LOAD;
        ROW_STEP(0);
        ROW_STEP(1);
    }
    ROW_STORE(0);
    ROW_STORE(1);
}

ALWAYS_INLINE void tile1(TILE_ARGS) {
    ROW_DECL(0);
    for (int64_t k = k0; k < k1; k++) {
        PANEL_LOAD;
        ROW_STEP(0);
    }
    ROW_STORE(0);
}

/* One or two rows against two panels at once: twice the independent accumulators of tile1/2,
 * which hides the add latency when there are few rows (decode). Same operations per element. */
#define ROW2_DECL(i)                                 \
    v8f c0_##i, c1_##i, d0_##i, d1_##i;              \
    ACC_INIT(c0_##i, out0, (i) * CPU_NR);            \
    ACC_INIT(c1_##i, out0, (i) * CPU_NR + 8);        \
    ACC_INIT(d0_##i, out1, (i) * CPU_NR);            \
    ACC_INIT(d1_##i, out1, (i) * CPU_NR + 8);        \
    const float *a_##i = a_rows[i]
#define ROW2_STEP(i)                      \
    do {                                  \
        const float av = a_##i[k];        \
        c0_##i = c0_##i + p0 * av;        \
        c1_##i = c1_##i + p1 * av;        \
        d0_##i = d0_##i + q0 * av;        \
        d1_##i = d1_##i + q1 * av;        \
    } while (0)
#define ROW2_STORE(i)                                         \
    do {                                                      \
        memcpy(out0 + (i) * CPU_NR, &c0_##i, sizeof(v8f));     \
        memcpy(out0 + (i) * CPU_NR + 8, &c1_##i, sizeof(v8f)); \
        memcpy(out1 + (i) * CPU_NR, &d0_##i, sizeof(v8f));     \
        memcpy(out1 + (i) * CPU_NR + 8, &d1_##i, sizeof(v8f)); \
    } while (0)
#define PANEL2_LOAD                                             \
    const v8f p0 = *(const v8f *)(pa + k * CPU_NR);             \
    const v8f p1 = *(const v8f *)(pa + k * CPU_NR + 8);         \
    const v8f q0 = *(const v8f *)(pb + k * CPU_NR);             \
    const v8f q1 = *(const v8f *)(pb + k * CPU_NR + 8)

#define PAIR_ARGS \
    const float *const *a_rows, const float *pa, const float *pb, int64_t k0, int64_t k1, bool first, float *out0, float *out1

ALWAYS_INLINE void pair2(PAIR_ARGS) {
    ROW2_DECL(0);
    ROW2_DECL(1);
    for (int64_t k = k0; k < k1; k++) {
        PANEL2_LOAD;
        ROW2_STEP(0);
        ROW2_STEP(1);
    }
    ROW2_STORE(0);
    ROW2_STORE(1);
}

ALWAYS_INLINE void pair1(PAIR_ARGS) {
    ROW2_DECL(0);
    for (int64_t k = k0; k < k1; k++) {
        PANEL2_LOAD;
        ROW2_STEP(0);
    }
    ROW2_STORE(0);
}

/* Rows [0, m) against one panel (pb NULL) or two, k in blocks of CPU_KC so that a block of the
 * panel stays in L1 while every 4-row tile passes over it. out0/out1 hold m x 16 floats. Rows
 * are independent: tiles of 4, then pairs and singles, all give the same bits per row. */
ALWAYS_INLINE void rows_body(const float *const *a_rows, int32_t m, const float *pa, const float *pb, int64_t kd,
                             float *out0, float *out1) {
    for (int64_t k0 = 0; k0 < kd || k0 == 0; k0 += CPU_KC) {
        int64_t k1 = kd - k0 < CPU_KC ? kd : k0 + CPU_KC;
        bool first = k0 == 0;
        int32_t i = 0;
        for (; i + 4 <= m; i += 4) {
            tile4(a_rows + i, pa, k0, k1, first, out0 + i * CPU_NR);
            if (pb)
                tile4(a_rows + i, pb, k0, k1, first, out1 + i * CPU_NR);
        }
        if (pb) {
            for (; i + 2 <= m; i += 2)
                pair2(a_rows + i, pa, pb, k0, k1, first, out0 + i * CPU_NR, out1 + i * CPU_NR);
            if (i < m)
                pair1(a_rows + i, pa, pb, k0, k1, first, out0 + i * CPU_NR, out1 + i * CPU_NR);
        } else {
            for (; i + 2 <= m; i += 2)
                tile2(a_rows + i, pa, k0, k1, first, out0 + i * CPU_NR);
            if (i < m)
                tile1(a_rows + i, pa, k0, k1, first, out0 + i * CPU_NR);
        }
        if (kd == 0)
            break;
    }
}

#ifdef HAVE_AVX2_PATH
__attribute__((target("avx2"))) static void rows_avx2(const float *const *a_rows, int32_t m, const float *pa,
                                                      const float *pb, int64_t kd, float *out0, float *out1) {
    rows_body(a_rows, m, pa, pb, kd, out0, out1);
}
#endif

static void rows_base(const float *const *a_rows, int32_t m, const float *pa, const float *pb, int64_t kd,
                      float *out0, float *out1) {
    rows_body(a_rows, m, pa, pb, kd, out0, out1);
}

static int use_avx2 = -1; /* -1: not decided yet */

static int have_avx2(void) {
    if (use_avx2 < 0) {
#ifdef HAVE_AVX2_PATH
        __builtin_cpu_init();
        use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") ? 1 : 0;
#else
        use_avx2 = 0;
#endif
    }
    return use_avx2;
}

const char *cpu_gemm_isa(void) { return have_avx2() ? "avx2" : "sse2"; }

void cpu_gemm_rows(const float *const *a_rows, int32_t m, const float *pa, const float *pb, int64_t kd, float *out0,
                   float *out1) {
#ifdef HAVE_AVX2_PATH
    if (have_avx2()) {
        rows_avx2(a_rows, m, pa, pb, kd, out0, out1);
        return;
    }
#endif
    rows_base(a_rows, m, pa, pb, kd, out0, out1);
}

void cpu_pack_panel(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p) {
#ifdef HAVE_AVX2_PATH
    if (have_avx2()) {
        pack_avx2(dt, b, ldb, nr, kd, p);
        return;
    }
#endif
    pack_scalar(dt, b, ldb, nr, kd, p, 0);
}

/* The portable packing, for the tests: the fast path must produce the same panel. */
void cpu_pack_panel_scalar(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p) {
    pack_scalar(dt, b, ldb, nr, kd, p, 0);
}
