/*
 * cpu_gemm.h: private to kernels/cpu. The matrix product of the fast CPU backend: a packed
 * panel of 16 weight rows times a few activation rows, with one fixed order of operations.
 *
 * Why not OpenBLAS: kern.h promises that a row's result never depends on the other rows of
 * the batch. OpenBLAS 0.3.21's sgemm (Zen kernels, DYNAMIC_ARCH) gives a row different bits
 * depending on M and on the row's position in the batch, with one thread as with two: a
 * probe of 1.5 million rows (K from 1 to 2051, N from 1 to 1536, M from 1 to 300) found 24% of
 * them differing from the same row computed alone, and fixed-size blocks were position
 * dependent from M = 16 on. tests/kernels/test_kernels.c (test_openblas_probe) repeats a small
 * probe on every run and prints what it finds. So the products here are our own, with the
 * order of operations written in the C:
 *
 *   out[m][j] = ((((+0.0f + a[m][0] * p[0][j]) + a[m][1] * p[1][j]) + ...) + a[m][kd-1] * p[kd-1][j])
 *
 * each product rounded to fp32, then each sum rounded to fp32 (no fused multiply-add: the
 * library is built with -ffp-contract=off and the vector code uses separate multiplies and
 * adds). That is exactly the loop of the reference backend (cpu_ref.c: acc += w * v), so the two
 * CPU backends give the same bits, every lane of a vector computes the same thing a scalar
 * would, and a row's result depends on nothing but its own data: not on M, the row's
 * position, the panel it shares, the tile shape, or the thread that runs it.
 *
 * Speed comes from register blocking (4 rows x 16 columns = 8 accumulator vectors; 1-2 rows
 * against two panels at once for decode), k blocking (a 16 KiB block of the panel stays in L1
 * while every row tile passes over it), the packed panel (contiguous 16-float lines, one per
 * k, written by an in-register 8x8 transpose), and AVX2 where the CPU has it (chosen at run
 * time; the SSE2 path computes the same bits, more slowly). On AMD Zen the separate multiply
 * and add issue on separate pipes, so they cost the same as an FMA would.
 *
 * Threads: pure functions; any thread.
 */
#ifndef KERN_CPU_GEMM_H
#define KERN_CPU_GEMM_H

#include <stdint.h>

#include "engine/base/moe_base.h"

#define CPU_NR 16     /* columns of a packed panel (weight rows) */
#define CPU_MR 4      /* activation rows per register tile */
#define CPU_KC 256    /* k per block: 16 KiB of panel, kept in L1 across the row tiles */
#define CPU_MROWS 64  /* rows per cpu_gemm_rows call (its outputs: 4 KiB per panel) */

/* Packs nr (1..16) rows of a row-major matrix of dtype dt, starting at `b` with row stride ldb
 * (elements), columns [0, kd), into p[k * 16 + j] as fp32 (exact conversion); lanes j >= nr are
 * zero. p must be 32-byte aligned and hold kd * 16 floats. */
void cpu_pack_panel(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p);

/* out0[i * 16 + j] = the fixed-order product above of row a_rows[i] (fp32, kd long) and column
 * j of panel pa, for i < m (m <= CPU_MROWS); the same into out1 for panel pb when pb is not
 * NULL. k runs in blocks of CPU_KC (partial sums kept in out0/out1 between blocks), which
 * changes no bit. */
void cpu_gemm_rows(const float *const *a_rows, int32_t m, const float *pa, const float *pb, int64_t kd, float *out0,
                   float *out1);

/* cpu_pack_panel's portable path (the tests check that the fast path packs the same panel). */
void cpu_pack_panel_scalar(moe_dtype dt, const void *b, int64_t ldb, int32_t nr, int64_t kd, float *p);

/* Which code path cpu_gemm_rows and cpu_pack_panel use on this CPU ("avx2" or "sse2"). */
const char *cpu_gemm_isa(void);

#endif /* KERN_CPU_GEMM_H */
