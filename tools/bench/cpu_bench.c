/*
 * cpu_bench.c: the CPU benchmark of the fused experts. For a few model shapes and batch sizes
 * T it times, in one run on one machine:
 *
 *   cpu-ref   the reference backend (plain loops; only where a call takes < ~3 s)
 *   cpu       the fast backend (kern_cpu_ops: fixed-order packed products, all cores)
 *   openblas  a lab variant of the same grouping with OpenBLAS sgemm on fp32 copies of each
 *             touched expert's weights (converted per call). Not batch-invariant (see
 *             kernels/cpu/cpu_gemm.h), so not a backend: it shows what the fixed order costs
 *   numpy     the per-expert loop of the Hugging Face models in numpy float32
 *             (tools/bench/bench_numpy.py, a subprocess serving one shape's weights and timing
 *             one T per request; numpy's BLAS is OpenBLAS)
 *
 * and prints each time next to the two floors of this machine:
 *   memory floor  = weight bytes touched / memcpy bandwidth (measured here, all threads);
 *                   bytes touched = distinct experts hit x 3*H*I x dtype size (+ the shared
 *                   expert's 3*H*I_s), the activations being small next to them;
 *   compute floor = 2*T*K*3*H*I (+ 2*T*3*H*I_s) flops / OpenBLAS sgemm rate (measured here,
 *                   1024^3, all threads).
 * "x floor" is the time over the larger floor. numpy reads fp32 weights (twice the bytes of
 * bf16); its floor is not scaled for that. The header also prints the read bandwidth (a sum
 * over 256 MiB): a stream that only reads can beat the memcpy floor by up to that ratio.
 *
 * Noise: on a shared machine the load changes from minute to minute, so the implementations of
 * one cell run back to back, the whole table is repeated --rounds times, and each cell keeps
 * its best round (cpu-ref runs in the first round only); the ceilings are re-measured after
 * each shape and the best seen is used.
 *
 * Run (it is a program, not a test; it takes a few minutes at the default sizes):
 *   bazel run -c opt //tools/bench:cpu_bench -- [options]
 *   (or bazel build -c opt //tools/bench:cpu_bench && bazel-bin/tools/bench/cpu_bench)
 * Options:
 *   --shapes a,b       among: mixtral-s qwen3-s qwen3-s-f32 dsv2-s qwen3-30b (default: all)
 *   --tokens 1,16,128  batch sizes T
 *   --threads N        threads of the fast backend (default: all cores)
 *   --no-numpy --no-ref --no-openblas   skip a column
 *   --rounds N         repetitions of each shape's table, best kept (default 3)
 *   --min-time S       seconds of timed calls per cell and round (default 0.5; their median counts)
 *   --numpy-script P   path of bench_numpy.py (default: found in the runfiles)
 *   --lab              only the product kernel against OpenBLAS sgemm, one thread (the inner
 *                      loop of the fast backend; see run_lab)
 *
 * Threads: single-threaded driver; the fast backend and OpenBLAS run their own threads (not
 * at the same time). The program re-executes itself once with OPENBLAS_THREAD_TIMEOUT=4 (idle
 * OpenBLAS threads sleep at once instead of spinning into the next measurement; the numpy
 * subprocess inherits it).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cblas.h>
#undef I /* OpenBLAS's cblas.h pulls in <complex.h> */

#include "kernels/cpu/cpu_gemm.h"
#include "kernels/kern.h"

extern void openblas_set_num_threads(int);
extern int openblas_get_num_threads(void);
extern char *openblas_get_corename(void);
extern int openblas_get_num_procs(void);

typedef struct bench_shape {
    const char *name;
    const char *what;
    int64_t H, I, E, K, Is;
    moe_dtype dt;
} bench_shape;

static const bench_shape SHAPES[] = {
    {"mixtral-s", "Mixtral-8x7B, H and I / 4", 1024, 3584, 8, 2, 0, MOE_DTYPE_BF16},
    {"qwen3-s", "Qwen3-30B-A3B, H and I / 2, E / 2", 1024, 384, 64, 8, 0, MOE_DTYPE_BF16},
    {"qwen3-s-f32", "the same in f32", 1024, 384, 64, 8, 0, MOE_DTYPE_F32},
    {"dsv2-s", "DeepSeek-V2-Lite, H and I / 2, 2 shared experts", 1024, 704, 64, 6, 1408, MOE_DTYPE_BF16},
    {"qwen3-30b", "Qwen3-30B-A3B (real: H 2048, I 768, E 128, K 8)", 2048, 768, 128, 8, 0, MOE_DTYPE_BF16},
};
#define N_SHAPES ((int)(sizeof SHAPES / sizeof SHAPES[0]))

typedef struct options {
    char shapes[256];
    int64_t tokens[16];
    int n_tokens;
    int32_t threads;
    bool numpy, ref, openblas, lab;
    double min_time;
    int rounds;
    char numpy_script[1200];
    char argv0[900];
} options;

/* ------------------------------------------------------------------------------------------
 * Machine ceilings.
 * ---------------------------------------------------------------------------------------- */
typedef struct copy_arg {
    char *dst;
    const char *src;
    size_t n;
} copy_arg;

static void *copy_thread(void *a) {
    copy_arg *c = a;
    memcpy(c->dst, c->src, c->n);
    return NULL;
}

/* Bytes copied per second by memcpy over 256 MiB with `threads` threads (best of 5). */
static double memcpy_bw(int threads) {
    const size_t n = (size_t)256 << 20;
    char *src = moe_alloc(n), *dst = moe_alloc(n);
    if (!src || !dst) {
        moe_free(src);
        moe_free(dst);
        return 0.0;
    }
    memset(src, 1, n);
    memset(dst, 2, n);
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[64];
        copy_arg ca[64];
        int nt = threads < 64 ? threads : 64;
        double t0 = moe_now_s();
        for (int i = 0; i < nt; i++) {
            size_t a = n / (size_t)nt * (size_t)i, b = i == nt - 1 ? n : n / (size_t)nt * (size_t)(i + 1);
            ca[i] = (copy_arg){dst + a, src + a, b - a};
            if (i > 0)
                pthread_create(&th[i], NULL, copy_thread, &ca[i]);
        }
        copy_thread(&ca[0]);
        for (int i = 1; i < nt; i++)
            pthread_join(th[i], NULL);
        double t = moe_now_s() - t0;
        if (t < best)
            best = t;
    }
    moe_free(src);
    moe_free(dst);
    return (double)n / best;
}

typedef struct read_arg {
    const float *src;
    size_t n;
    float sum;
} read_arg;

static void *read_thread(void *a) {
    read_arg *r = a;
    float acc[16] = {0};
    for (size_t i = 0; i + 16 <= r->n; i += 16)
        for (int q = 0; q < 16; q++)
            acc[q] += r->src[i + q];
    for (int q = 0; q < 16; q++)
        r->sum += acc[q];
    return NULL;
}

/* Bytes read per second (a sum over 256 MiB) with `threads` threads (best of 5): the ceiling of
 * a weight stream, about twice what memcpy reports (a copy also writes every byte). */
static double read_bw(int threads) {
    const size_t n = ((size_t)256 << 20) / sizeof(float);
    float *src = moe_alloc(n * sizeof(float));
    if (!src)
        return 0.0;
    for (size_t i = 0; i < n; i++)
        src[i] = 1.0f;
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[64];
        read_arg ra[64];
        int nt = threads < 64 ? threads : 64;
        double t0 = moe_now_s();
        for (int i = 0; i < nt; i++) {
            size_t a = n / (size_t)nt * (size_t)i, b = i == nt - 1 ? n : n / (size_t)nt * (size_t)(i + 1);
            ra[i] = (read_arg){src + a, b - a, 0.0f};
            if (i > 0)
                pthread_create(&th[i], NULL, read_thread, &ra[i]);
        }
        read_thread(&ra[0]);
        for (int i = 1; i < nt; i++)
            pthread_join(th[i], NULL);
        double t = moe_now_s() - t0;
        if (t < best)
            best = t;
    }
    moe_free(src);
    return (double)(n * sizeof(float)) / best;
}

/* OpenBLAS sgemm flop/s on 1024^3 with its default threads (best of 5). */
static double sgemm_rate(void) {
    const int n = 1024;
    float *a = moe_alloc(sizeof(float) * (size_t)n * n), *b = moe_alloc(sizeof(float) * (size_t)n * n),
          *c = moe_alloc(sizeof(float) * (size_t)n * n);
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)(i % 17) * 0.01f;
        b[i] = (float)(i % 13) * 0.02f;
    }
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = moe_now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double t = moe_now_s() - t0;
        if (t < best)
            best = t;
    }
    moe_free(a);
    moe_free(b);
    moe_free(c);
    return 2.0 * n * n * n / best;
}

static void cpu_model(char *out, size_t cap) {
    snprintf(out, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *p = strchr(line, ':');
            if (p) {
                p++;
                while (*p == ' ')
                    p++;
                p[strcspn(p, "\n")] = 0;
                snprintf(out, cap, "%s", p);
            }
            break;
        }
    }
    fclose(f);
}

/* ------------------------------------------------------------------------------------------
 * Problems.
 * ---------------------------------------------------------------------------------------- */
/* Fills with uniform values in [-scale, scale): cheap enough for a billion weights. */
static void fill_fast(moe_tensor *t, uint64_t seed, float scale) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    float buf[4096];
    int64_t n = moe_tensor_numel(t);
    size_t es = moe_dtype_size(t->dtype);
    for (int64_t i = 0; i < n; i += 4096) {
        int64_t m = n - i < 4096 ? n - i : 4096;
        for (int64_t j = 0; j < m; j++) {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            uint64_t r = s * 2685821657736338717ull;
            buf[j] = ((float)(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale;
        }
        moe_from_f32(t->dtype, buf, (char *)t->data + (size_t)i * es, (size_t)m);
    }
}

typedef struct problem {
    const bench_shape *sh;
    int64_t T;
    moe_tensor x, ids, w, y;
    const moe_tensor *w13, *w2;
    kern_shared_expert *se;
    kern_experts_params p;
    int64_t touched; /* distinct experts hit */
} problem;

static void problem_init(problem *pb, const bench_shape *sh, int64_t T, const moe_tensor *w13, const moe_tensor *w2,
                         kern_shared_expert *se, uint64_t seed) {
    memset(pb, 0, sizeof *pb);
    pb->sh = sh;
    pb->T = T;
    pb->w13 = w13;
    pb->w2 = w2;
    pb->se = se;
    moe_tensor_alloc(&pb->x, sh->dt, 2, (int64_t[]){T, sh->H});
    moe_tensor_alloc(&pb->ids, MOE_DTYPE_I32, 2, (int64_t[]){T, sh->K});
    moe_tensor_alloc(&pb->w, MOE_DTYPE_F32, 2, (int64_t[]){T, sh->K});
    moe_tensor_alloc(&pb->y, sh->dt, 2, (int64_t[]){T, sh->H});
    fill_fast(&pb->x, seed, 1.0f);
    moe_rng r;
    moe_rng_seed(&r, seed);
    int32_t *id = pb->ids.data;
    float *wt = pb->w.data;
    bool *hit = calloc((size_t)sh->E, 1);
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < sh->K; k++) {
            int32_t e;
            bool dup;
            do {
                e = (int32_t)moe_rng_below(&r, (uint32_t)sh->E);
                dup = false;
                for (int64_t q = 0; q < k; q++)
                    dup |= id[t * sh->K + q] == e;
            } while (dup);
            id[t * sh->K + k] = e;
            wt[t * sh->K + k] = (float)moe_rng_uniform(&r) / (float)sh->K;
            hit[e] = true;
        }
    for (int64_t e = 0; e < sh->E; e++)
        pb->touched += hit[e];
    free(hit);
    pb->p = (kern_experts_params){.n_experts = (int32_t)sh->E, .n_local = (int32_t)sh->E, .act = KERN_ACT_SILU};
}

static void problem_free(problem *pb) {
    moe_tensor_free(&pb->x);
    moe_tensor_free(&pb->ids);
    moe_tensor_free(&pb->w);
    moe_tensor_free(&pb->y);
}

/* ------------------------------------------------------------------------------------------
 * The OpenBLAS lab variant: per touched expert, gather its rows, convert its weights to fp32,
 * sgemm gate/up, activation, sgemm down, weighted scatter-add. Same math, other order.
 * ---------------------------------------------------------------------------------------- */
typedef struct blas_scratch {
    float *w13f, *w2f, *xg, *g, *a, *o, *yf;
    int32_t *rows;
    float *rw;
} blas_scratch;

static void blas_scratch_init(blas_scratch *s, const bench_shape *sh, int64_t T) {
    int64_t H = sh->H, I = sh->I, P = T * sh->K;
    int64_t Imax = sh->Is > I ? sh->Is : I;
    s->w13f = moe_alloc(sizeof(float) * (size_t)(2 * Imax * H));
    s->w2f = moe_alloc(sizeof(float) * (size_t)(H * Imax));
    s->xg = moe_alloc(sizeof(float) * (size_t)((P > T ? P : T) * H));
    s->g = moe_alloc(sizeof(float) * (size_t)((P > T ? P : T) * 2 * Imax));
    s->a = moe_alloc(sizeof(float) * (size_t)((P > T ? P : T) * Imax));
    s->o = moe_alloc(sizeof(float) * (size_t)((P > T ? P : T) * H));
    s->yf = moe_alloc(sizeof(float) * (size_t)(T * H));
    s->rows = moe_alloc(sizeof(int32_t) * (size_t)P);
    s->rw = moe_alloc(sizeof(float) * (size_t)P);
}

static void blas_scratch_free(blas_scratch *s) {
    moe_free(s->w13f);
    moe_free(s->w2f);
    moe_free(s->xg);
    moe_free(s->g);
    moe_free(s->a);
    moe_free(s->o);
    moe_free(s->yf);
    moe_free(s->rows);
    moe_free(s->rw);
}

/* One expert (M gathered rows in s->xg) through sgemm; adds scale[m] * out into yf rows. */
static void blas_expert(const problem *pb, blas_scratch *s, const void *w13, const void *w2, int64_t I, int64_t M,
                        const int32_t *tok, const float *scale) {
    const bench_shape *sh = pb->sh;
    const int64_t H = sh->H;
    moe_to_f32(sh->dt, w13, s->w13f, (size_t)(2 * I * H));
    moe_to_f32(sh->dt, w2, s->w2f, (size_t)(H * I));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)(2 * I), (int)H, 1.0f, s->xg, (int)H, s->w13f,
                (int)H, 0.0f, s->g, (int)(2 * I));
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i++)
            s->a[m * I + i] = moe_round_to(sh->dt, kern_act_f32(KERN_ACT_SILU, s->g[m * 2 * I + i]) * s->g[m * 2 * I + I + i]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)H, (int)I, 1.0f, s->a, (int)I, s->w2f, (int)I,
                0.0f, s->o, (int)H);
    for (int64_t m = 0; m < M; m++) {
        float *yr = s->yf + (size_t)tok[m] * (size_t)H;
        float c = scale ? scale[m] : 1.0f;
        for (int64_t j = 0; j < H; j++)
            yr[j] += moe_round_to(sh->dt, c * s->o[m * H + j]);
    }
}

static moe_status run_openblas(void *arg) {
    problem *pb = ((void **)arg)[0];
    blas_scratch *s = ((void **)arg)[1];
    const bench_shape *sh = pb->sh;
    const int64_t T = pb->T, H = sh->H, K = sh->K, I = sh->I;
    const size_t es = moe_dtype_size(sh->dt);
    memset(s->yf, 0, sizeof(float) * (size_t)(T * H));
    const int32_t *id = pb->ids.data;
    const float *wt = pb->w.data;
    int32_t *cnt = calloc((size_t)sh->E + 1, sizeof(int32_t));
    for (int64_t i = 0; i < T * K; i++)
        cnt[id[i] + 1]++;
    for (int64_t e = 0; e < sh->E; e++)
        cnt[e + 1] += cnt[e];
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(T * K));
    for (int64_t e = 0; e < sh->E; e++) {
        int64_t M = 0;
        for (int64_t i = 0; i < T * K; i++)
            if (id[i] == e) {
                tok[M] = (int32_t)(i / K);
                s->rw[M] = wt[i];
                moe_to_f32(sh->dt, (const char *)pb->x.data + (size_t)(i / K * H) * es, s->xg + M * H, (size_t)H);
                M++;
            }
        if (M == 0)
            continue;
        blas_expert(pb, s, (const char *)pb->w13->data + (size_t)(e * 2 * I * H) * es,
                    (const char *)pb->w2->data + (size_t)(e * H * I) * es, I, M, tok, s->rw);
    }
    if (pb->se) {
        for (int64_t t = 0; t < T; t++) {
            tok[t] = (int32_t)t;
            moe_to_f32(sh->dt, (const char *)pb->x.data + (size_t)(t * H) * es, s->xg + t * H, (size_t)H);
        }
        blas_expert(pb, s, pb->se->w13->data, pb->se->w2->data, sh->Is, T, tok, NULL);
    }
    moe_from_f32(sh->dt, s->yf, pb->y.data, (size_t)(T * H));
    free(cnt);
    free(tok);
    return MOE_OK;
}

static moe_status run_backend(void *arg) {
    problem *pb = ((void **)arg)[0];
    kern_ctx_t *ctx = ((void **)arg)[1];
    if (pb->se)
        return kern_moe_forward(ctx, &pb->p, &pb->x, pb->w13, pb->w2, &pb->ids, &pb->w, pb->se, &pb->y);
    return kern_fused_experts(ctx, &pb->p, &pb->x, pb->w13, pb->w2, &pb->ids, &pb->w, &pb->y);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median µs per call: one warm-up, then calls until min_time (at least 3, at most 200). */
static double time_median_us(moe_status (*fn)(void *), void *arg, double min_time, int *reps) {
    if (fn(arg) != MOE_OK) {
        fprintf(stderr, "cpu_bench: call failed: %s\n", moe_errmsg());
        return NAN;
    }
    double ts[200];
    int n = 0;
    double end = moe_now_s() + min_time;
    while (n < 3 || (n < 200 && moe_now_s() < end)) {
        double t0 = moe_now_s();
        fn(arg);
        ts[n++] = moe_now_s() - t0;
    }
    qsort(ts, (size_t)n, sizeof ts[0], cmp_double);
    *reps = n;
    return ts[n / 2] * 1e6;
}

/* ------------------------------------------------------------------------------------------
 * numpy, as a subprocess.
 * ---------------------------------------------------------------------------------------- */
static bool file_exists(const char *p) { return access(p, R_OK) == 0; }

static void find_numpy_script(options *o) {
    if (o->numpy_script[0])
        return;
    const char *rd = getenv("RUNFILES_DIR");
    char cand[3][1200];
    int n = 0;
    if (rd)
        snprintf(cand[n++], sizeof cand[0], "%s/moe_engine/tools/bench/bench_numpy.py", rd);
    snprintf(cand[n++], sizeof cand[0], "%s.runfiles/moe_engine/tools/bench/bench_numpy.py", o->argv0);
    snprintf(cand[n++], sizeof cand[0], "tools/bench/bench_numpy.py");
    for (int i = 0; i < n; i++)
        if (file_exists(cand[i]) && strlen(cand[i]) < sizeof o->numpy_script) {
            memcpy(o->numpy_script, cand[i], strlen(cand[i]) + 1);
            return;
        }
}

/* A numpy server (bench_numpy.py --serve) holding one shape's weights: asked for one T at a
 * time, so that its cells are timed next to the C implementations' cells. */
typedef struct np_server {
    pid_t pid;
    FILE *to, *from;
} np_server;

static bool np_start(np_server *s, const options *o, const bench_shape *sh) {
    memset(s, 0, sizeof *s);
    if (!o->numpy_script[0])
        return false;
    /* moe_ref.py sits in tests/ref next to tools/ in the runfiles and in the source tree */
    char refdir[1300];
    snprintf(refdir, sizeof refdir, "%s", o->numpy_script);
    char *at = strstr(refdir, "tools/bench/bench_numpy.py");
    if (at)
        snprintf(at, sizeof refdir - (size_t)(at - refdir), "tests/ref");
    else
        snprintf(refdir, sizeof refdir, "tests/ref");
    char h[32], i[32], e[32], k[32], is[32];
    snprintf(h, sizeof h, "%lld", (long long)sh->H);
    snprintf(i, sizeof i, "%lld", (long long)sh->I);
    snprintf(e, sizeof e, "%lld", (long long)sh->E);
    snprintf(k, sizeof k, "%lld", (long long)sh->K);
    snprintf(is, sizeof is, "%lld", (long long)sh->Is);
    int in[2], out[2];
    if (pipe(in) != 0)
        return false;
    if (pipe(out) != 0) {
        close(in[0]);
        close(in[1]);
        return false;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[0]);
        close(in[1]);
        close(out[0]);
        close(out[1]);
        execl("/usr/bin/python3", "python3", o->numpy_script, "--serve", "--hidden", h, "--inter", i, "--experts", e,
              "--topk", k, "--shared-inter", is, "--ref-dir", refdir, (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    if (pid < 0) {
        close(in[1]);
        close(out[0]);
        return false;
    }
    s->pid = pid;
    s->to = fdopen(in[1], "w");
    s->from = fdopen(out[0], "r");
    char line[256];
    while (fgets(line, sizeof line, s->from))
        if (strncmp(line, "ready", 5) == 0)
            return true;
    fprintf(stderr, "cpu_bench: the numpy server did not start\n");
    return false;
}

static double np_measure(np_server *s, int64_t T, double min_time) {
    if (!s->pid || !s->to || !s->from)
        return NAN;
    fprintf(s->to, "%lld %g\n", (long long)T, min_time);
    fflush(s->to);
    char line[256];
    long long t;
    double v;
    if (fgets(line, sizeof line, s->from) && sscanf(line, "T=%lld us=%lf", &t, &v) == 2 && t == T)
        return v;
    return NAN;
}

static void np_stop(np_server *s) {
    if (s->to)
        fclose(s->to);
    if (s->from)
        fclose(s->from);
    if (s->pid > 0)
        waitpid(s->pid, NULL, 0);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------------------------
 * --lab: the product kernel alone, one thread: cpu_gemm_rows over packed bf16 panels (the
 * fast backend's inner loop: pack two 16-row panels, multiply all M rows) against OpenBLAS
 * sgemm on the same matrices in fp32, alternating, best of 6 (thread CPU time, so that other
 * processes on the machine count less).
 * ---------------------------------------------------------------------------------------- */
static double thread_cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void run_lab(void) {
    const int shapes[][3] = {{1, 1536, 2048}, {8, 1536, 2048}, {32, 1536, 2048}, {128, 1536, 2048}, {256, 1536, 1024}};
    openblas_set_num_threads(1);
    printf("product lab, 1 thread: C[M,N] = A[M,K] B[N,K]^T; ours = pack bf16 B into 16-row fp32 panels + "
           "cpu_gemm_rows (%s), fixed k order; OpenBLAS sgemm on fp32 B. Best of 6, thread CPU time.\n",
           cpu_gemm_isa());
    printf("%6s %6s %6s %12s %12s %10s %12s %10s\n", "M", "N", "K", "ours us", "of which pack", "GFLOP/s",
           "openblas us", "GFLOP/s");
    for (size_t q = 0; q < sizeof shapes / sizeof shapes[0]; q++) {
        const int M = shapes[q][0], N = shapes[q][1], K = shapes[q][2];
        moe_tensor a, b, bf;
        moe_tensor_alloc(&a, MOE_DTYPE_F32, 2, (int64_t[]){M, K});
        moe_tensor_alloc(&b, MOE_DTYPE_BF16, 2, (int64_t[]){N, K});
        moe_tensor_alloc(&bf, MOE_DTYPE_F32, 2, (int64_t[]){N, K});
        fill_fast(&a, 1, 1.0f);
        fill_fast(&b, 2, 1.0f);
        moe_to_f32(MOE_DTYPE_BF16, b.data, bf.data, (size_t)N * (size_t)K);
        float *c = moe_alloc(sizeof(float) * (size_t)M * (size_t)N);
        float *p = moe_alloc(sizeof(float) * 2 * CPU_NR * (size_t)K);
        float *o0 = moe_alloc(sizeof(float) * CPU_MROWS * CPU_NR), *o1 = moe_alloc(sizeof(float) * CPU_MROWS * CPU_NR);
        const float **rows = malloc(sizeof(float *) * (size_t)M);
        for (int m = 0; m < M; m++)
            rows[m] = (const float *)a.data + (size_t)m * (size_t)K;
        const uint16_t *bh = b.data;
        double best_ours = 1e30, best_pack = 1e30, best_blas = 1e30;
        for (int rep = 0; rep < 6; rep++) {
            double t0 = thread_cpu_s();
            for (int n0 = 0; n0 < N; n0 += 2 * CPU_NR) {
                cpu_pack_panel(MOE_DTYPE_BF16, bh + (size_t)n0 * (size_t)K, K, CPU_NR, K, p);
                cpu_pack_panel(MOE_DTYPE_BF16, bh + (size_t)(n0 + CPU_NR) * (size_t)K, K, CPU_NR, K, p + CPU_NR * K);
                for (int m0 = 0; m0 < M; m0 += CPU_MROWS)
                    cpu_gemm_rows(rows + m0, M - m0 < CPU_MROWS ? M - m0 : CPU_MROWS, p, p + CPU_NR * K, K, o0, o1);
            }
            double t1 = thread_cpu_s();
            for (int n0 = 0; n0 < N; n0 += 2 * CPU_NR) {
                cpu_pack_panel(MOE_DTYPE_BF16, bh + (size_t)n0 * (size_t)K, K, CPU_NR, K, p);
                cpu_pack_panel(MOE_DTYPE_BF16, bh + (size_t)(n0 + CPU_NR) * (size_t)K, K, CPU_NR, K, p + CPU_NR * K);
            }
            double t2 = thread_cpu_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a.data, K, bf.data, K, 0.0f, c, N);
            double t3 = thread_cpu_s();
            best_ours = t1 - t0 < best_ours ? t1 - t0 : best_ours;
            best_pack = t2 - t1 < best_pack ? t2 - t1 : best_pack;
            best_blas = t3 - t2 < best_blas ? t3 - t2 : best_blas;
        }
        double fl = 2.0 * M * (double)N * K;
        printf("%6d %6d %6d %12.1f %12.1f %10.1f %12.1f %10.1f\n", M, N, K, best_ours * 1e6, best_pack * 1e6,
               fl / best_ours / 1e9, best_blas * 1e6, fl / best_blas / 1e9);
        free(rows);
        moe_free(c);
        moe_free(p);
        moe_free(o0);
        moe_free(o1);
        moe_tensor_free(&a);
        moe_tensor_free(&b);
        moe_tensor_free(&bf);
    }
    openblas_set_num_threads(openblas_get_num_procs());
}

/* ------------------------------------------------------------------------------------------
 * main
 * ---------------------------------------------------------------------------------------- */
static void usage(void) {
    fprintf(stderr, "usage: cpu_bench [--shapes a,b] [--tokens 1,16,128] [--threads N] [--no-numpy] [--no-ref] "
                    "[--no-openblas] [--rounds N] [--min-time S] [--numpy-script P] [--lab]\n");
}

static bool parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    snprintf(o->argv0, sizeof o->argv0, "%s", argv[0]);
    o->numpy = o->ref = o->openblas = true;
    o->min_time = 0.5;
    o->rounds = 3;
    int64_t def[] = {1, 16, 128};
    o->n_tokens = 3;
    memcpy(o->tokens, def, sizeof def);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--shapes") && v) {
            snprintf(o->shapes, sizeof o->shapes, ",%s,", v);
            i++;
        } else if (!strcmp(a, "--tokens") && v) {
            o->n_tokens = 0;
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *tok = strtok(buf, ","); tok && o->n_tokens < 16; tok = strtok(NULL, ","))
                o->tokens[o->n_tokens++] = atoll(tok);
            i++;
        } else if (!strcmp(a, "--threads") && v) {
            o->threads = atoi(v);
            i++;
        } else if (!strcmp(a, "--rounds") && v) {
            o->rounds = atoi(v) > 0 ? atoi(v) : 1;
            i++;
        } else if (!strcmp(a, "--min-time") && v) {
            o->min_time = atof(v);
            i++;
        } else if (!strcmp(a, "--numpy-script") && v) {
            snprintf(o->numpy_script, sizeof o->numpy_script, "%s", v);
            i++;
        } else if (!strcmp(a, "--no-numpy")) {
            o->numpy = false;
        } else if (!strcmp(a, "--no-ref")) {
            o->ref = false;
        } else if (!strcmp(a, "--no-openblas")) {
            o->openblas = false;
        } else if (!strcmp(a, "--lab")) {
            o->lab = true;
        } else {
            usage();
            return false;
        }
    }
    for (int i = 0; i < o->n_tokens; i++)
        if (o->tokens[i] < 1 || o->tokens[i] > 65536) {
            fprintf(stderr, "cpu_bench: T %lld not in [1, 65536]\n", (long long)o->tokens[i]);
            return false;
        }
    return true;
}

static bool shape_selected(const options *o, const char *name) {
    if (!o->shapes[0])
        return true;
    char key[64];
    snprintf(key, sizeof key, ",%s,", name);
    return strstr(o->shapes, key) != NULL;
}

static void print_row(const char *shape, const char *dt, int64_t T, const char *impl, double us, double flops,
                      double mem_us, double comp_us, int reps) {
    if (isnan(us)) {
        printf("%-12s %-5s %5lld  %-9s %12s\n", shape, dt, (long long)T, impl, "-");
        return;
    }
    double floor_us = mem_us > comp_us ? mem_us : comp_us;
    char r[16] = "-";
    if (reps > 0)
        snprintf(r, sizeof r, "%d", reps);
    printf("%-12s %-5s %5lld  %-9s %12.1f %11.1f %8.2f %11.1f %11.1f %8.2f %5s\n", shape, dt, (long long)T, impl, us,
           (double)T / (us * 1e-6), flops / (us * 1e-6) / 1e9, mem_us, comp_us, us / floor_us, r);
}

int main(int argc, char **argv) {
    /* OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each parallel call before they
     * sleep; on a 2-core machine that spinning (ours after the openblas cell, numpy's in its
     * subprocess) eats into the next cell's time. OpenBLAS reads the timeout when it loads, so
     * set it and start again. */
    if (!getenv("OPENBLAS_THREAD_TIMEOUT")) {
        setenv("OPENBLAS_THREAD_TIMEOUT", "4", 1);
        execv("/proc/self/exe", argv);
        /* if the exec fails, carry on with the spinning threads */
    }
    options o;
    if (!parse_args(argc, argv, &o))
        return 2;
    moe_log_init_from_env();
    if (o.lab) {
        run_lab();
        return 0;
    }
    if (o.numpy)
        find_numpy_script(&o);

    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nthreads = o.threads > 0 ? o.threads : (int)(ncpu > 0 ? ncpu : 1);
    char model[256];
    cpu_model(model, sizeof model);
    double bw1 = memcpy_bw(1), bwn = memcpy_bw(nthreads), gemm = sgemm_rate(), rdn = read_bw(nthreads);
    printf("moe-engine CPU benchmark: %s, %ld cores online, fast backend: %d threads, %s products\n", model, ncpu,
           nthreads, cpu_gemm_isa());
    printf("%s(core %s, %d threads); at start: sgemm 1024^3 %.1f GFLOP/s, memcpy %.1f GB/s (1 thread), %.1f GB/s "
           "(%d threads), read %.1f GB/s (%d threads)\n",
           OPENBLAS_VERSION, openblas_get_corename(), openblas_get_num_threads(), gemm / 1e9, bw1 / 1e9, bwn / 1e9,
           nthreads, rdn / 1e9, nthreads);
    if (o.numpy && !o.numpy_script[0])
        printf("numpy: bench_numpy.py not found (--numpy-script), column skipped\n");
    printf("Each cell: the median of its timed calls, the best of %d rounds (the implementations of a cell run back to "
           "back, round after round). Floors: the best ceilings measured so far in this run.\n",
           o.rounds);

    kern_ctx_t *ref = NULL, *fast = NULL;
    kern_ctx_params fp = {.n_threads = nthreads};
    if (kern_ctx_init(&ref, KERN_BACKEND_CPU_REF, NULL) != MOE_OK || kern_ctx_init(&fast, KERN_BACKEND_CPU, &fp) != MOE_OK) {
        fprintf(stderr, "cpu_bench: %s\n", moe_errmsg());
        return 1;
    }
    enum { IMPL_REF, IMPL_CPU, IMPL_BLAS, IMPL_NUMPY, N_IMPL };
    static const char *impl_name[N_IMPL] = {"cpu-ref", "cpu", "openblas", "numpy"};
    for (int s = 0; s < N_SHAPES; s++) {
        const bench_shape *sh = &SHAPES[s];
        if (!shape_selected(&o, sh->name))
            continue;
        const char *dtn = moe_dtype_name(sh->dt);
        moe_tensor w13, w2, sw13 = {0}, sw2 = {0};
        if (moe_tensor_alloc(&w13, sh->dt, 3, (int64_t[]){sh->E, 2 * sh->I, sh->H}) != MOE_OK ||
            moe_tensor_alloc(&w2, sh->dt, 3, (int64_t[]){sh->E, sh->H, sh->I}) != MOE_OK) {
            fprintf(stderr, "cpu_bench: %s: %s\n", sh->name, moe_errmsg());
            return 1;
        }
        fill_fast(&w13, 11, 1.0f / sqrtf((float)sh->H));
        fill_fast(&w2, 12, 1.0f / sqrtf((float)sh->I));
        kern_shared_expert se = {0}, *sep = NULL;
        if (sh->Is) {
            moe_tensor_alloc(&sw13, sh->dt, 2, (int64_t[]){2 * sh->Is, sh->H});
            moe_tensor_alloc(&sw2, sh->dt, 2, (int64_t[]){sh->H, sh->Is});
            fill_fast(&sw13, 13, 1.0f / sqrtf((float)sh->H));
            fill_fast(&sw2, 14, 1.0f / sqrtf((float)sh->Is));
            se = (kern_shared_expert){&sw13, &sw2, NULL, KERN_ACT_SILU};
            sep = &se;
        }
        np_server nps = {0};
        if (o.numpy)
            np_start(&nps, &o, sh);
        problem pbs[16];
        double best[16][N_IMPL];
        int reps_of[16][N_IMPL];
        for (int ti = 0; ti < o.n_tokens; ti++) {
            problem_init(&pbs[ti], sh, o.tokens[ti], &w13, &w2, sep, 100 + (uint64_t)o.tokens[ti]);
            for (int q = 0; q < N_IMPL; q++) {
                best[ti][q] = NAN;
                reps_of[ti][q] = 0;
            }
        }
        for (int round = 0; round < o.rounds; round++) {
            for (int ti = 0; ti < o.n_tokens; ti++) {
                problem *pb = &pbs[ti];
                double flops = 2.0 * (double)pb->T * (double)sh->K * 3.0 * (double)(sh->H * sh->I) +
                               2.0 * (double)pb->T * 3.0 * (double)(sh->H * sh->Is);
                double us[N_IMPL] = {NAN, NAN, NAN, NAN};
                int reps[N_IMPL] = {0};
                void *args[2] = {pb, NULL};
                /* cpu-ref runs at ~0.2-0.4 GFLOP/s: only where a call takes < ~3 s, in round 0 */
                if (o.ref && round == 0 && flops / 0.3e9 < 3.0) {
                    args[1] = ref;
                    us[IMPL_REF] = time_median_us(run_backend, args, o.min_time, &reps[IMPL_REF]);
                }
                args[1] = fast;
                us[IMPL_CPU] = time_median_us(run_backend, args, o.min_time, &reps[IMPL_CPU]);
                if (o.openblas) {
                    blas_scratch bs;
                    blas_scratch_init(&bs, sh, pb->T);
                    args[1] = &bs;
                    us[IMPL_BLAS] = time_median_us(run_openblas, args, o.min_time, &reps[IMPL_BLAS]);
                    blas_scratch_free(&bs);
                }
                if (o.numpy)
                    us[IMPL_NUMPY] = np_measure(&nps, pb->T, o.min_time);
                for (int q = 0; q < N_IMPL; q++)
                    if (!isnan(us[q]) && (isnan(best[ti][q]) || us[q] < best[ti][q])) {
                        best[ti][q] = us[q];
                        reps_of[ti][q] = reps[q];
                    }
            }
        }
        np_stop(&nps);
        /* re-measure the ceilings: the best seen in the run is the closest to the idle machine */
        double b = memcpy_bw(nthreads), g = sgemm_rate(), r = read_bw(nthreads);
        bwn = b > bwn ? b : bwn;
        gemm = g > gemm ? g : gemm;
        rdn = r > rdn ? r : rdn;

        printf("\n-- %s: %s; H %lld, I %lld, E %lld, K %lld%s; floors: memcpy %.1f GB/s, sgemm %.1f GFLOP/s (read "
               "%.1f GB/s)\n",
               sh->name, sh->what, (long long)sh->H, (long long)sh->I, (long long)sh->E, (long long)sh->K,
               sh->Is ? ", shared expert" : "", bwn / 1e9, gemm / 1e9, rdn / 1e9);
        printf("%-12s %-5s %5s  %-9s %12s %11s %8s %11s %11s %8s %5s\n", "shape", "dtype", "T", "impl", "us/call",
               "tokens/s", "GFLOP/s", "mem floor", "comp floor", "x floor", "reps");
        for (int ti = 0; ti < o.n_tokens; ti++) {
            problem *pb = &pbs[ti];
            int64_t T = pb->T;
            const double es = (double)moe_dtype_size(sh->dt);
            double bytes = (double)pb->touched * 3.0 * (double)(sh->H * sh->I) * es + 3.0 * (double)(sh->H * sh->Is) * es;
            double flops = 2.0 * (double)T * (double)sh->K * 3.0 * (double)(sh->H * sh->I) +
                           2.0 * (double)T * 3.0 * (double)(sh->H * sh->Is);
            double mem_us = bytes / bwn * 1e6, comp_us = flops / gemm * 1e6;
            for (int q = 0; q < N_IMPL; q++) {
                if ((q == IMPL_REF && !o.ref) || (q == IMPL_BLAS && !o.openblas) || (q == IMPL_NUMPY && !o.numpy))
                    continue;
                print_row(sh->name, q == IMPL_NUMPY ? "f32" : dtn, T, impl_name[q], best[ti][q], flops, mem_us, comp_us,
                          reps_of[ti][q]);
            }
            printf("%-12s %-5s %5lld  (%lld of %lld experts touched: %.1f MB of weights, %.2f GFLOP)\n", "", "",
                   (long long)T, (long long)pb->touched, (long long)sh->E, bytes / 1e6, flops / 1e9);
            problem_free(pb);
        }
        fflush(stdout);
        moe_tensor_free(&w13);
        moe_tensor_free(&w2);
        moe_tensor_free(&sw13);
        moe_tensor_free(&sw2);
    }
    kern_ctx_free(ref);
    kern_ctx_free(fast);
    return 0;
}
