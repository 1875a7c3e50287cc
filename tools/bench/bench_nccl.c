/*
 * bench_nccl.c: the NCCL collectives of the GPU workers, measured alone through the same
 * communicator code (parallel/comm_nccl.c), one process per GPU, printed in nccl-tests'
 * columns so the numbers compare with everyone's:
 *
 *   bench_nccl --gpus 0,1 [--op alltoall|alltoall-sym|reduce] [--cta-policy default|efficiency|zero]
 *              [--sizes 1048576,16777216,...] [--iters 20]
 *
 *   size (bytes)  count (elements)  type  redop  root  time (us)  algbw (GB/s)  busbw (GB/s)  #wrong  sent/rank (B)
 *
 * alltoall (the combine of the GPU workers, par_comm_alltoallv): size is nccl-tests' size, the
 *   bytes of one rank's send buffer, size / W to each rank, its own part included (it stays in
 *   place, as in the combine); busbw = algbw * (W - 1) / W = the bytes that leave a rank / time,
 *   the figure to set beside bench_scaleout's "comb GB/s" (bytes a rank sent / its duration).
 *   #wrong counts received elements that are not (sender + 1).
 * alltoall-sym: ncclAlltoAll (equal parts, the own part copied too) on buffers registered as
 *   symmetric windows (par_comm_sym_alloc); with --cta-policy zero NCCL 2.28 runs it on the copy
 *   engines, without SMs. The same columns.
 * reduce (the earlier combine, kept for comparison): bus bandwidth = algorithm bandwidth =
 *   bytes / time; #wrong counts elements of the root's result that differ from the exact sum
 *   (each rank sends (rank + 1) at even positions and 0 elsewhere, so the sum is exact in bf16).
 */
#include <cuda_runtime.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/base/moe_base.h"
#include "parallel/par.h"

#define MAX_GPUS 8

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int run_rank(int rank, int world, int device, const uint8_t *id, const size_t *sizes, int n_sizes, int iters,
                    int out_fd, bool a2a, bool sym, int cta_policy) {
    par_comm_t *c = NULL;
    par_comm_nccl_params p = {
        .rank = rank, .world_size = world, .device = device, .init_timeout_ms = 60000, .cta_policy = cta_policy};
    memcpy(p.unique_id, id, PAR_NCCL_ID_BYTES);
    if (par_comm_nccl_init(&c, &p) != MOE_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, moe_errmsg());
        return 1;
    }
    cudaStream_t s;
    cudaStreamCreate(&s);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int si = 0; si < n_sizes; si++) {
        size_t bytes = sizes[si], count = bytes / 2;
        const size_t chunk = (bytes / (size_t)world) & ~(size_t)15; /* alltoall: bytes to each rank */
        size_t sb[MAX_GPUS], so[MAX_GPUS], rb[MAX_GPUS], ro[MAX_GPUS];
        for (int q = 0; q < world; q++) {
            sb[q] = rb[q] = q == rank ? 0 : chunk;
            so[q] = ro[q] = (size_t)q * chunk;
        }
        uint16_t *h = malloc(bytes);
        for (size_t i = 0; i < count; i++)
            h[i] = a2a ? moe_f32_to_bf16((float)(rank + 1)) : (i % 2 == 0) ? moe_f32_to_bf16((float)(rank + 1)) : 0;
        void *send = NULL, *recv = NULL;
        int ok = 1;
        if (sym) {
            ok = par_comm_sym_alloc(c, bytes, &send) == MOE_OK && par_comm_sym_alloc(c, bytes, &recv) == MOE_OK;
            if (!ok) {
                fprintf(stderr, "rank %d: %s\n", rank, moe_errmsg());
                par_comm_sym_free(c, send);
                free(h);
                par_comm_free(c);
                return 1;
            }
        } else {
            cudaMalloc(&send, bytes);
            cudaMalloc(&recv, bytes);
        }
        cudaMemcpy(send, h, bytes, cudaMemcpyHostToDevice);
        double *t = calloc((size_t)iters, sizeof *t);
        for (int it = -3; it < iters && ok; it++) {
            cudaEventRecord(e0, s);
            if (sym)
                ok = par_comm_alltoall(c, send, recv, chunk, 30000, s) == MOE_OK;
            else if (a2a)
                ok = par_comm_alltoallv(c, send, sb, so, recv, rb, ro, 30000, s) == MOE_OK;
            else
                ok = par_comm_reduce_sum(c, send, rank == 0 ? recv : NULL, count, MOE_DTYPE_BF16, 0, 30000, s) ==
                     MOE_OK;
            cudaEventRecord(e1, s);
            ok = ok && par_comm_wait(c, s, 30000) == MOE_OK;
            float ms = 0;
            cudaEventElapsedTime(&ms, e0, e1);
            if (it >= 0)
                t[it] = ms * 1e3;
        }
        long wrong = 0;
        if (a2a && ok) {
            cudaMemcpy(h, recv, bytes, cudaMemcpyDeviceToHost);
            for (int q = 0; q < world; q++)
                for (size_t i = 0; (q != rank || sym) && i < chunk / 2; i++)
                    wrong += moe_bf16_to_f32(h[so[q] / 2 + i]) != (float)(q + 1);
        } else if (rank == 0 && ok) {
            cudaMemcpy(h, recv, bytes, cudaMemcpyDeviceToHost);
            float want = (float)(world * (world + 1) / 2);
            for (size_t i = 0; i < count; i++)
                wrong += moe_bf16_to_f32(h[i]) != (i % 2 == 0 ? want : 0.0f);
        }
        qsort(t, (size_t)iters, sizeof *t, cmp_double);
        double med = t[iters / 2];
        if (rank == 0) {
            char line[256];
            const double algbw = (double)bytes / med * 1e-3,
                         busbw = a2a ? algbw * (double)(world - 1) / (double)world : algbw;
            const size_t sent = a2a ? chunk * (size_t)(world - 1) : bytes;
            int n = snprintf(line, sizeof line, "%14zu %14zu %6s %6s %5d %11.1f %13.2f %13.2f %7ld %14zu%s\n", bytes,
                             count, "bf16", a2a ? "none" : "sum", a2a ? -1 : 0, med, algbw, busbw, wrong, sent,
                             ok ? "" : "  (failed)");
            if (write(out_fd, line, (size_t)n) != n)
                ok = 0;
        }
        free(t);
        free(h);
        if (sym) {
            par_comm_sym_free(c, send);
            par_comm_sym_free(c, recv);
        } else {
            cudaFree(send);
            cudaFree(recv);
        }
        if (!ok) {
            fprintf(stderr, "rank %d: %s\n", rank, moe_errmsg());
            par_comm_free(c);
            return 1;
        }
    }
    par_comm_free(c);
    return 0;
}

int main(int argc, char **argv) {
    const char *gpus = "0,1", *sizes_s = "1048576,4194304,16777216,67108864,268435456";
    int iters = 20;
    bool a2a = true, sym = false;
    int cta_policy = PAR_NCCL_CTA_DEFAULT;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--gpus") == 0 && i + 1 < argc)
            gpus = argv[++i];
        else if (strcmp(argv[i], "--op") == 0 && i + 1 < argc &&
                 (strcmp(argv[i + 1], "alltoall") == 0 || strcmp(argv[i + 1], "alltoall-sym") == 0 ||
                  strcmp(argv[i + 1], "reduce") == 0)) {
            a2a = strcmp(argv[++i], "reduce") != 0;
            sym = strcmp(argv[i], "alltoall-sym") == 0;
        } else if (strcmp(argv[i], "--cta-policy") == 0 && i + 1 < argc &&
                   (strcmp(argv[i + 1], "default") == 0 || strcmp(argv[i + 1], "efficiency") == 0 ||
                    strcmp(argv[i + 1], "zero") == 0)) {
            i++;
            cta_policy = strcmp(argv[i], "zero") == 0         ? PAR_NCCL_CTA_ZERO
                         : strcmp(argv[i], "efficiency") == 0 ? PAR_NCCL_CTA_EFFICIENCY
                                                              : PAR_NCCL_CTA_DEFAULT;
        }
        else if (strcmp(argv[i], "--sizes") == 0 && i + 1 < argc)
            sizes_s = argv[++i];
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc)
            iters = atoi(argv[++i]);
        else {
            fprintf(stderr,
                    "usage: bench_nccl --gpus 0,1 [--op alltoall|alltoall-sym|reduce] [--cta-policy "
                    "default|efficiency|zero] [--sizes B,B,...] [--iters N]\n"
                    "  alltoall (default): the GPU workers' combine (grouped send/recv); alltoall-sym: ncclAlltoAll on\n"
                    "  symmetric windows (the copy engines with --cta-policy zero); reduce: the reduce to rank 0\n");
            return 2;
        }
    }
    int dev[MAX_GPUS], world = 0;
    for (const char *p = gpus; *p && world < MAX_GPUS;) {
        char *end;
        dev[world++] = (int)strtol(p, &end, 10);
        p = *end == ',' ? end + 1 : end;
    }
    size_t sizes[32];
    int n_sizes = 0;
    for (const char *p = sizes_s; *p && n_sizes < 32;) {
        char *end;
        sizes[n_sizes++] = (size_t)strtoull(p, &end, 10) & ~(size_t)1;
        p = *end == ',' ? end + 1 : end;
    }
    if (world < 2 || iters < 3) {
        fprintf(stderr, "bench_nccl: needs at least 2 GPUs (--gpus 0,1) and 3 iterations\n");
        return 2;
    }
    if (!getenv("NCCL_NVLS_ENABLE"))
        setenv("NCCL_NVLS_ENABLE", "0", 1);
    moe_log_init_from_env();
    /* Rank 0's process makes the unique id and hands it to the others through pipes: the
     * parent never touches CUDA or NCCL, so the forked children can. */
    int pipes[MAX_GPUS][2];
    for (int r = 1; r < world; r++)
        if (pipe(pipes[r]) != 0)
            return 1;
    static const char *pol[] = {"default", "efficiency", "zero"};
    if (sym)
        printf("NCCL %d, %d ranks (GPUs %s), all-to-all (ncclAlltoAll on symmetric windows, own part copied), CTA "
               "policy %s, bf16; median of %d\n",
               par_comm_nccl_version(), world, gpus, pol[cta_policy], iters);
    else if (a2a)
        printf("NCCL %d, %d ranks (GPUs %s), all-to-all (grouped send/recv, own part in place), CTA policy %s, bf16; "
               "median of %d\n",
               par_comm_nccl_version(), world, gpus, pol[cta_policy], iters);
    else
        printf("NCCL %d, %d ranks (GPUs %s), reduce to rank 0, bf16 sum; median of %d\n", par_comm_nccl_version(),
               world, gpus, iters);
    printf("%14s %14s %6s %6s %5s %11s %13s %13s %7s %14s\n", "size (B)", "count", "type", "redop", "root", "time (us)",
           "algbw (GB/s)", "busbw (GB/s)", "#wrong", "sent/rank (B)");
    fflush(stdout);
    pid_t kids[MAX_GPUS];
    for (int r = 0; r < world; r++) {
        kids[r] = fork();
        if (kids[r] == 0) {
            uint8_t id[PAR_NCCL_ID_BYTES];
            if (r == 0) {
                if (par_comm_nccl_unique_id(id) != MOE_OK) {
                    fprintf(stderr, "bench_nccl: %s\n", moe_errmsg());
                    _exit(1);
                }
                for (int q = 1; q < world; q++)
                    if (write(pipes[q][1], id, sizeof id) != (ssize_t)sizeof id)
                        _exit(1);
            } else if (read(pipes[r][0], id, sizeof id) != (ssize_t)sizeof id) {
                _exit(1);
            }
            _exit(run_rank(r, world, dev[r], id, sizes, n_sizes, iters, 1, a2a, sym, cta_policy));
        }
    }
    int rc = 0;
    for (int r = 0; r < world; r++) {
        int st = 0;
        waitpid(kids[r], &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            rc = 1;
    }
    return rc;
}
