/*
 * bench_plan.c: the host cost of a GPU step's exchange plan (par_exchange_plan_build, the
 * host part of the all-to-all combine that every rank runs per step at W > 1), per world size
 * and step size, on random top-k routing over uniform experts with the contiguous placement.
 *
 *   bench_plan [--experts 128] [--top-k 8] [--iters 200]
 *
 * Prints, per W and tokens per GPU (the step holds W times as many): pairs, the median build
 * time in microseconds, nanoseconds per pair, and the pairs sent and received by rank 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/base/moe_base.h"
#include "parallel/par.h"

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int32_t E = 128, K = 8, iters = 200;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--experts") == 0)
            E = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--top-k") == 0)
            K = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--iters") == 0)
            iters = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_plan [--experts 128] [--top-k 8] [--iters 200]\n");
            return 2;
        }
    }
    if (E < 8 || K < 1 || K > E || iters < 3 || iters > 100000) {
        fprintf(stderr, "bench_plan: --experts >= 8, 1 <= --top-k <= experts, 3 <= --iters <= 100000\n");
        return 2;
    }
    printf("exchange plan build, E = %d, top-%d, contiguous placement, median of %d (this host)\n", (int)E, (int)K,
           (int)iters);
    printf("%3s %7s %8s %9s %11s %10s %10s\n", "W", "T/GPU", "pairs", "build us", "ns / pair", "sent r0", "recv r0");
    const int32_t Ws[] = {2, 4, 8};
    const int64_t Ts[] = {1024, 4096};
    double *t = malloc(sizeof(double) * (size_t)iters);
    for (size_t wi = 0; wi < sizeof Ws / sizeof Ws[0]; wi++) {
        const int32_t W = Ws[wi];
        if (E % W != 0)
            continue;
        par_placement pl;
        if (par_placement_init(&pl, E, W, PAR_PLACE_CONTIGUOUS) != MOE_OK) {
            fprintf(stderr, "placement: %s\n", moe_errmsg());
            return 1;
        }
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            const int64_t T = Ts[ti] * W, P = T * K;
            int32_t *ids = malloc(sizeof(int32_t) * (size_t)P);
            uint64_t s = 0x9E3779B97F4A7C15ull ^ (uint64_t)(W * 131 + T);
            for (int64_t i = 0; i < T; i++) /* K distinct experts a token */
                for (int32_t k = 0; k < K; k++) {
                    int32_t e;
                    bool dup;
                    do {
                        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
                        e = (int32_t)(s % (uint64_t)E);
                        dup = false;
                        for (int32_t j = 0; j < k; j++)
                            dup |= ids[i * K + j] == e;
                    } while (dup);
                    ids[i * K + k] = e;
                }
            par_exchange_plan plan;
            if (par_exchange_plan_init(&plan, W, 0, P, NULL, NULL) != MOE_OK) {
                fprintf(stderr, "plan: %s\n", moe_errmsg());
                return 1;
            }
            for (int it = 0; it < iters; it++) {
                const uint64_t t0 = moe_now_ns();
                if (par_exchange_plan_build(&plan, &pl, ids, 0, T, K) != MOE_OK) {
                    fprintf(stderr, "plan: %s\n", moe_errmsg());
                    return 1;
                }
                t[it] = (double)(moe_now_ns() - t0) * 1e-3;
            }
            qsort(t, (size_t)iters, sizeof(double), cmp_d);
            printf("%3d %7lld %8lld %9.1f %11.2f %10lld %10lld\n", (int)W, (long long)Ts[ti], (long long)P,
                   t[iters / 2], t[iters / 2] * 1e3 / (double)P, (long long)plan.n_send, (long long)plan.n_recv);
            par_exchange_plan_free(&plan);
            free(ids);
        }
        par_placement_free(&pl);
    }
    free(t);
    return 0;
}
