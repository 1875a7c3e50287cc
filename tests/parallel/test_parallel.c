/*
 * test_parallel.c: placement, combine plans, and the host communicator with real processes
 * (fork) over real ipc:// sockets.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "parallel/par.h"

/* The first part of a step split by experts (DBO, --dbo-first-share): on every rank the lowest
 * local slots, as many as the share of its experts rounded, at least one and at most all but
 * one; the rest form the second part. Checked against a count per rank for every W and E up to
 * 20, both policies and several shares; bad arguments refused. */
static void test_placement_first_part(void **state) {
    (void)state;
    static const int32_t shares[] = {1, 10, 34, 50, 67, 75, 90, 99};
    for (int policy = 0; policy < 2; policy++)
        for (int32_t E = 1; E <= 20; E++)
            for (int32_t W = 1; W <= E && W <= 8; W++) {
                par_placement pl;
                assert_int_equal(par_placement_init(&pl, E, W, (par_place_policy)policy), MOE_OK);
                uint8_t in_first[20];
                for (size_t si = 0; si < sizeof shares / sizeof shares[0]; si++) {
                    const int32_t sh = shares[si];
                    assert_int_equal(par_placement_first_part(&pl, sh, in_first), MOE_OK);
                    for (int32_t r = 0; r < W; r++) {
                        const int32_t nl = pl.n_local[r];
                        /* the expected count: the share rounded half up, clamped */
                        int32_t want = (nl * sh * 2 + 100) / 200;
                        if (want < 1)
                            want = 1;
                        if (nl > 1 && want > nl - 1)
                            want = nl - 1;
                        if (nl == 1)
                            want = 1;
                        int32_t got = 0;
                        for (int32_t j = 0; j < nl; j++) {
                            const int32_t e = pl.experts[r][j]; /* slot j of rank r */
                            got += in_first[e];
                            /* the lowest slots: a slot in the first part has every lower one in it */
                            if (j > 0 && in_first[e])
                                assert_true(in_first[pl.experts[r][j - 1]]);
                        }
                        assert_int_equal(got, want);
                    }
                }
                assert_int_equal(par_placement_first_part(&pl, 0, in_first), MOE_ERR_INVALID_ARG);
                assert_int_equal(par_placement_first_part(&pl, 100, in_first), MOE_ERR_INVALID_ARG);
                assert_int_equal(par_placement_first_part(NULL, 50, in_first), MOE_ERR_INVALID_ARG);
                par_placement_free(&pl);
            }
}

static void test_placement_policies(void **state) {
    (void)state;
    for (int policy = 0; policy < 2; policy++) {
        for (int32_t E = 1; E <= 67; E += 3) {
            for (int32_t W = 1; W <= E && W <= 9; W++) {
                par_placement pl;
                assert_int_equal(par_placement_init(&pl, E, W, (par_place_policy)policy), MOE_OK);
                int32_t total = 0, minn = E, maxn = 0;
                for (int32_t r = 0; r < W; r++) {
                    total += pl.n_local[r];
                    if (pl.n_local[r] < minn)
                        minn = pl.n_local[r];
                    if (pl.n_local[r] > maxn)
                        maxn = pl.n_local[r];
                    for (int32_t s = 0; s < pl.n_local[r]; s++) {
                        int32_t e = pl.experts[r][s];
                        assert_int_equal(pl.owner[e], r);
                        assert_int_equal(pl.local_slot[e], s);
                        if (s > 0)
                            assert_true(pl.experts[r][s - 1] < e);
                    }
                }
                assert_int_equal(total, E);
                assert_true(maxn - minn <= 1); /* balanced */
                assert_true(minn >= 1);
                if (policy == PAR_PLACE_CONTIGUOUS)
                    for (int32_t e = 1; e < E; e++)
                        assert_true(pl.owner[e] >= pl.owner[e - 1]);
                else
                    for (int32_t e = 0; e < E; e++)
                        assert_int_equal(pl.owner[e], e % W);
                int32_t map[67];
                for (int32_t r = 0; r < W; r++) {
                    assert_int_equal(par_placement_expert_map(&pl, r, map), MOE_OK);
                    for (int32_t e = 0; e < E; e++)
                        assert_int_equal(map[e], pl.owner[e] == r ? pl.local_slot[e] : -1);
                }
                par_placement_free(&pl);
            }
        }
    }
    par_placement pl;
    assert_int_equal(par_placement_init(&pl, 4, 5, PAR_PLACE_CONTIGUOUS), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "every rank holds at least one expert"));
    assert_int_equal(par_placement_init(&pl, 0, 1, PAR_PLACE_CONTIGUOUS), MOE_ERR_INVALID_ARG);
    par_place_policy p;
    assert_int_equal(par_place_policy_parse("round-robin", &p), MOE_OK);
    assert_int_equal(p, PAR_PLACE_ROUND_ROBIN);
    assert_int_equal(par_place_policy_parse("random", &p), MOE_ERR_INVALID_ARG);
}

static void test_combine_plan(void **state) {
    (void)state;
    par_placement pl;
    assert_int_equal(par_placement_init(&pl, 8, 3, PAR_PLACE_CONTIGUOUS), MOE_OK); /* 0-2 | 3-5 | 6-7 */
    const int32_t ids[] = {0, 7, 1, /* token 0 */ 3, 4, 5, /* token 1 */ 6, 2, 7 /* token 2 */};
    par_combine_plan plan;
    assert_int_equal(par_combine_plan_init(&plan, &pl, ids, 3, 3), MOE_OK);
    assert_int_equal(plan.n_pairs[0], 3); /* (0,0) (0,2) (2,1) */
    assert_int_equal(plan.n_pairs[1], 3);
    assert_int_equal(plan.n_pairs[2], 3);
    assert_int_equal(plan.pairs[0][0], 0);
    assert_int_equal(plan.pairs[0][1], 2);
    assert_int_equal(plan.pairs[0][2], 7);
    assert_int_equal(plan.pairs[2][0], 1);
    assert_int_equal(plan.pairs[2][1], 6);
    assert_int_equal(plan.pairs[2][2], 8);
    assert_int_equal(plan.n_rows[0], 2);
    assert_int_equal(plan.n_rows[1], 1);
    assert_int_equal(plan.n_rows[2], 2);
    par_combine_plan_free(&plan);
    const int32_t bad[] = {0, 8, 1};
    assert_int_equal(par_combine_plan_init(&plan, &pl, bad, 1, 3), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "expert id 8 out of range [0, 8) at token 0, slot 1"));
    par_placement_free(&pl);
}

/* Payload of rank q at step s: bytes derived from (q, s), length varying with both. */
static size_t payload_len(int q, uint64_t s) { return (size_t)((q * 7919 + (int)s * 104729) % 5000) + (q == 1 ? 0 : 1); }
static unsigned char payload_byte(int q, uint64_t s, size_t i) { return (unsigned char)(q * 31 + s * 17 + i * 13); }

static char endpoint_dir[64];

/* Runs in a child: rank q of W takes part in `steps` gathers; returns 0 on success. */
static int child_rank(int q, int W, int steps, int skip_step) {
    par_comm_t *c = NULL;
    par_comm_host_params p = {.rank = q, .world_size = W, .endpoint_dir = endpoint_dir};
    if (par_comm_host_init(&c, &p) != MOE_OK)
        return 10;
    int rc = 0;
    for (int s = 0; s < steps; s++) {
        if (s == skip_step)
            continue; /* this rank misses one step: the root times out on it */
        size_t n = payload_len(q, (uint64_t)s);
        unsigned char *buf = malloc(n + 1);
        for (size_t i = 0; i < n; i++)
            buf[i] = payload_byte(q, (uint64_t)s, i);
        moe_status st = par_comm_gatherv(c, (uint64_t)s, buf, n, NULL, NULL, 0, 5000, NULL);
        free(buf);
        if (st != MOE_OK) {
            rc = 20 + s;
            break;
        }
    }
    /* Let the messages leave before closing (linger is 0). */
    usleep(200000);
    par_comm_free(c);
    return rc;
}

static void run_gather(int W, int steps, int skip_rank, int skip_step) {
    snprintf(endpoint_dir, sizeof endpoint_dir, "/tmp/moe-test-comm-%d", (int)getpid());
    mkdir(endpoint_dir, 0700);
    pid_t kids[16];
    for (int q = 1; q < W; q++) {
        kids[q] = fork();
        assert_true(kids[q] >= 0);
        if (kids[q] == 0)
            _exit(child_rank(q, W, steps, q == skip_rank ? skip_step : -1));
    }
    par_comm_t *c = NULL;
    par_comm_host_params p = {.rank = 0, .world_size = W, .endpoint_dir = endpoint_dir};
    assert_int_equal(par_comm_host_init(&c, &p), MOE_OK);
    assert_int_equal(par_comm_rank(c), 0);
    assert_int_equal(par_comm_world_size(c), W);
    for (int s = 0; s < steps; s++) {
        void *recv[16];
        size_t sizes[16];
        for (int q = 0; q < W; q++) {
            sizes[q] = payload_len(q, (uint64_t)s);
            recv[q] = malloc(sizes[q] + 1);
            memset(recv[q], 0xEE, sizes[q] + 1);
        }
        unsigned char *mine = malloc(sizes[0] + 1);
        for (size_t i = 0; i < sizes[0]; i++)
            mine[i] = payload_byte(0, (uint64_t)s, i);
        moe_status st = par_comm_gatherv(c, (uint64_t)s, mine, sizes[0], recv, sizes, 0, s == skip_step ? 300 : 5000, NULL);
        if (s == skip_step) {
            assert_int_equal(st, MOE_ERR_TIMEOUT);
        } else {
            if (st != MOE_OK)
                fprintf(stderr, "W=%d step %d: %s: %s\n", W, s, moe_status_name(st), moe_errmsg());
            assert_int_equal(st, MOE_OK);
            for (int q = 0; q < W; q++) {
                unsigned char *b = recv[q];
                for (size_t i = 0; i < sizes[q]; i++)
                    assert_int_equal(b[i], payload_byte(q, (uint64_t)s, i));
                assert_int_equal(b[sizes[q]], 0xEE); /* nothing past the end */
            }
        }
        for (int q = 0; q < W; q++)
            free(recv[q]);
        free(mine);
    }
    for (int q = 1; q < W; q++) {
        int status = 0;
        assert_int_equal(waitpid(kids[q], &status, 0), kids[q]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    /* After abort every operation fails at once. */
    par_comm_abort(c);
    size_t ones[16];
    unsigned char b[16] = {0};
    void *rb[16];
    for (int q = 0; q < 16; q++) {
        ones[q] = 1;
        rb[q] = &b[q];
    }
    assert_int_equal(par_comm_gatherv(c, 999, b, 1, rb, ones, 0, 1000, NULL), MOE_ERR_SHUTDOWN);
    par_comm_free(c);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", endpoint_dir);
    assert_int_equal(system(cmd), 0);
}

/* The exchange plans of all ranks, simulated: every rank's slot rows hold a value only where it
 * holds the expert; packing by send_idx, moving each group to its destination and scattering by
 * recv_idx must leave every rank with every valid pair of its own rows, each exactly once, and
 * move no pair that stays on its rank. Random ids include invalid ones (-1, E). */
static void test_exchange_plan(void **state) {
    (void)state;
    uint64_t seed = 12345;
    for (int policy = 0; policy < 2; policy++) {
        for (int32_t W = 1; W <= 8; W++) {
            const int32_t E = 16 + W, K = 4;
            par_placement pl;
            assert_int_equal(par_placement_init(&pl, E, W, (par_place_policy)policy), MOE_OK);
            for (int trial = 0; trial < 6; trial++) {
                const int64_t T = (int64_t)(trial * 13 % 41), a = trial % 3 == 0 ? 0 : T / 3, b = T;
                int32_t *ids = malloc(sizeof(int32_t) * (size_t)(T * K + 1));
                for (int64_t i = 0; i < T * K; i++) {
                    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                    int32_t v = (int32_t)((seed >> 33) % (uint64_t)(E + 2)) - 1; /* -1 .. E */
                    ids[i] = v;
                }
                /* one plan of every expert, or two of complementary halves (DBO split by
                 * experts: build_set) applied one after the other */
                for (int split = 0; split < 2; split++) {
                    uint8_t *set = malloc((size_t)E);
                    for (int32_t e = 0; e < E; e++)
                        set[e] = (uint8_t)((e * 7 + trial) % 3 == 0);
                    par_exchange_plan *pp = calloc((size_t)W, sizeof *pp);
                    for (int32_t r = 0; r < W; r++)
                        assert_int_equal(par_exchange_plan_init(&pp[r], W, r, T * K, NULL, NULL), MOE_OK);
                    /* value of pair i: i + 1 on the rank holding its expert, 0 elsewhere */
                    int64_t **slots = calloc((size_t)W, sizeof(int64_t *));
                    for (int32_t r = 0; r < W; r++) {
                        slots[r] = calloc((size_t)(T * K + 1), sizeof(int64_t));
                        for (int64_t i = a * K; i < b * K; i++)
                            if (ids[i] >= 0 && ids[i] < E && pl.owner[ids[i]] == r)
                                slots[r][i] = i + 1;
                    }
                    for (int half = 0; half < (split ? 2 : 1); half++) {
                        if (split) {
                            for (int32_t e = 0; e < E; e++)
                                set[e] = (uint8_t)!set[e]; /* the first pass takes the complement */
                            for (int32_t r = 0; r < W; r++)
                                assert_int_equal(par_exchange_plan_build_set(&pp[r], &pl, ids, a, b, K, set), MOE_OK);
                        } else {
                            for (int32_t r = 0; r < W; r++)
                                assert_int_equal(par_exchange_plan_build(&pp[r], &pl, ids, a, b, K), MOE_OK);
                        }
                        for (int32_t q = 0; q < W; q++) {
                            for (int32_t r = 0; r < W; r++) {
                                /* pairwise agreement of sizes */
                                assert_int_equal(pp[q].send_count[r], pp[r].recv_count[q]);
                                if (q == r) {
                                    assert_int_equal(pp[q].send_count[r], 0);
                                    continue;
                                }
                                for (int64_t j = 0; j < pp[q].send_count[r]; j++) {
                                    int32_t si = pp[q].send_idx[pp[q].send_off[r] + j];
                                    int32_t di = pp[r].recv_idx[pp[r].recv_off[q] + j];
                                    assert_int_equal(si, di);
                                    if (j > 0)
                                        assert_true(si > pp[q].send_idx[pp[q].send_off[r] + j - 1]);
                                    assert_int_equal(slots[r][di], 0); /* never overwrites */
                                    assert_true(!split || set[ids[si]]); /* only the pass's half */
                                    slots[r][di] = slots[q][si];
                                }
                            }
                        }
                        /* the largest part of the exchange (an all-to-all of equal parts), as
                         * every rank computes it, against the send counts of all the plans */
                        int64_t want = 0;
                        for (int32_t q = 0; q < W; q++)
                            for (int32_t r = 0; r < W; r++)
                                if (q != r && pp[q].send_count[r] > want)
                                    want = pp[q].send_count[r];
                        for (int32_t r = 0; r < W; r++) {
                            int64_t got = -1;
                            assert_int_equal(
                                par_exchange_plan_max_part(&pp[r], ids, K, &got), MOE_OK);
                            assert_int_equal(got, want);
                        }
                    }
                    /* every valid pair of rank r's rows is now on r; rows are split in blocks */
                    for (int32_t r = 0; r < W; r++) {
                        assert_int_equal(pp[r].bound[0], a);
                        assert_int_equal(pp[r].bound[W], b);
                        for (int64_t t = pp[r].bound[r]; t < pp[r].bound[r + 1]; t++)
                            for (int32_t k = 0; k < K; k++) {
                                int64_t i = t * K + k;
                                bool valid = ids[i] >= 0 && ids[i] < E;
                                assert_int_equal(slots[r][i], valid ? i + 1 : 0);
                            }
                    }
                    for (int32_t r = 0; r < W; r++) {
                        par_exchange_plan_free(&pp[r]);
                        free(slots[r]);
                    }
                    free(slots);
                    free(pp);
                    free(set);
                }
                free(ids);
            }
            par_placement_free(&pl);
        }
    }
    /* bad arguments */
    par_exchange_plan p;
    assert_int_equal(par_exchange_plan_init(&p, 2, 2, 8, NULL, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_exchange_plan_init(&p, 2, 0, 8, NULL, NULL), MOE_OK);
    par_placement pl;
    assert_int_equal(par_placement_init(&pl, 4, 2, PAR_PLACE_CONTIGUOUS), MOE_OK);
    int32_t ids[8] = {3, 3, 3, 3, 3, 3, 3, 3}; /* all on rank 1, rows 0..1 owned by rank 0 */
    assert_int_equal(par_exchange_plan_build(&p, &pl, ids, 0, 4, 2), MOE_OK);
    assert_int_equal(p.n_recv, 4);
    assert_int_equal(par_exchange_plan_build(&p, &pl, ids, 3, 2, 2), MOE_ERR_INVALID_ARG);
    par_exchange_plan q;
    assert_int_equal(par_exchange_plan_init(&q, 2, 1, 7, NULL, NULL), MOE_OK);
    assert_int_equal(par_exchange_plan_build(&q, &pl, ids, 0, 4, 2), MOE_ERR_LIMIT); /* 8 pairs > 7 */
    assert_int_equal(par_exchange_plan_build(&q, &pl, ids, 0, 3, 2), MOE_OK);
    int64_t mp = -1;
    assert_int_equal(par_exchange_plan_max_part(&q, ids, 2, &mp), MOE_OK);
    assert_int_equal(mp, 2); /* row 0 is rank 0's: its 2 pairs go there; rows 1..2 stay on rank 1 */
    assert_int_equal(par_exchange_plan_max_part(&q, ids, 2, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(q.n_send, 2); /* row 0 of rank 0: 2 pairs; row 1 and 2 are rank 1's */
    par_exchange_plan_free(&q);
    par_exchange_plan_free(&p);
    par_placement_free(&pl);
}

static void test_gather_processes(void **state) {
    (void)state;
    run_gather(1, 3, -1, -1);
    run_gather(2, 20, -1, -1);
    run_gather(4, 20, -1, -1);
}

/* One rank misses a step: the root times out on it, and the next steps still line up. */
static void test_gather_timeout_then_recover(void **state) {
    (void)state;
    run_gather(3, 6, 2, 3);
}

static void test_gather_bad_args(void **state) {
    (void)state;
    snprintf(endpoint_dir, sizeof endpoint_dir, "/tmp/moe-test-comm-b%d", (int)getpid());
    mkdir(endpoint_dir, 0700);
    par_comm_t *c = NULL;
    par_comm_host_params p = {.rank = 0, .world_size = 2, .endpoint_dir = endpoint_dir};
    assert_int_equal(par_comm_host_init(&c, &p), MOE_OK);
    unsigned char b[4] = {0};
    size_t sizes[2] = {3, 4};
    void *recv[2] = {b, b};
    assert_int_equal(par_comm_gatherv(c, 0, b, 4, recv, sizes, 0, 100, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_gatherv(c, 0, b, 4, recv, sizes, 2, 100, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_gatherv(c, 0, b, 4, NULL, NULL, 0, 100, NULL), MOE_ERR_INVALID_ARG);
    /* the all-to-all: a rank's own part must be 0; sizes need buffers; the host backend has none */
    size_t ab[2] = {0, 4}, ao[2] = {0, 0}, self[2] = {4, 4};
    assert_int_equal(par_comm_alltoallv(c, b, self, ao, b, ab, ao, 100, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_alltoallv(c, NULL, ab, ao, b, ab, ao, 100, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_alltoallv(c, b, ab, ao, b, ab, ao, 0, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_alltoallv(c, b, NULL, ao, b, ab, ao, 100, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_alltoallv(c, b, ab, ao, b, ab, ao, 100, NULL), MOE_ERR_UNSUPPORTED);
    /* equal parts and symmetric windows: NCCL only */
    assert_int_equal(par_comm_alltoall(c, b, NULL, 4, 100, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_alltoall(c, b, b, 4, 0, NULL), MOE_ERR_INVALID_ARG);
    assert_int_equal(par_comm_alltoall(c, b, b, 4, 100, NULL), MOE_ERR_UNSUPPORTED);
    void *sym = b;
    assert_int_equal(par_comm_sym_alloc(c, 64, &sym), MOE_ERR_UNSUPPORTED);
    assert_null(sym);
    assert_int_equal(par_comm_sym_alloc(c, 0, &sym), MOE_ERR_INVALID_ARG);
    par_comm_sym_free(c, NULL);
    par_comm_free(c);
    p.rank = 2;
    assert_int_equal(par_comm_host_init(&c, &p), MOE_ERR_INVALID_ARG);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", endpoint_dir);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_placement_policies),
        cmocka_unit_test(test_placement_first_part),
        cmocka_unit_test(test_combine_plan),
        cmocka_unit_test(test_exchange_plan),
        cmocka_unit_test(test_gather_processes),
        cmocka_unit_test(test_gather_timeout_then_recover),
        cmocka_unit_test(test_gather_bad_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
