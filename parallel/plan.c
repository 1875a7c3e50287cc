/*
 * plan.c: the combine plan of a step. Every rank builds it from the same routing and the same
 * placement, so all ranks agree on who computes which (token, slot) pair and on the sizes of
 * the gather without exchanging them. Pure; any thread.
 */
#include <stdlib.h>
#include <string.h>

#include "parallel/par.h"

void par_combine_plan_free(par_combine_plan *plan) {
    if (!plan)
        return;
    if (plan->pairs)
        for (int32_t r = 0; r < plan->world_size; r++)
            free(plan->pairs[r]);
    free(plan->pairs);
    free(plan->n_pairs);
    free(plan->n_rows);
    memset(plan, 0, sizeof *plan);
}

moe_status par_combine_plan_init(par_combine_plan *plan, const par_placement *pl, const int32_t *ids,
                                 int64_t n_tokens, int32_t top_k) {
    MOE_REQUIRE(plan && pl, MOE_ERR_INVALID_ARG, "combine plan: NULL argument");
    memset(plan, 0, sizeof *plan);
    MOE_REQUIRE(n_tokens >= 0 && top_k >= 1, MOE_ERR_INVALID_ARG, "combine plan: T %lld, K %d", (long long)n_tokens,
                (int)top_k);
    MOE_REQUIRE(ids || n_tokens == 0, MOE_ERR_INVALID_ARG, "combine plan: NULL ids");
    const int32_t W = pl->world_size;
    const int64_t n = n_tokens * top_k;
    for (int64_t i = 0; i < n; i++)
        MOE_REQUIRE(ids[i] >= 0 && ids[i] < pl->n_experts, MOE_ERR_INVALID_ARG,
                    "combine plan: expert id %d out of range [0, %d) at token %lld, slot %lld", (int)ids[i],
                    (int)pl->n_experts, (long long)(i / top_k), (long long)(i % top_k));
    plan->world_size = W;
    plan->n_tokens = n_tokens;
    plan->top_k = top_k;
    plan->n_pairs = calloc((size_t)W, sizeof(int64_t));
    plan->n_rows = calloc((size_t)W, sizeof(int64_t));
    plan->pairs = calloc((size_t)W, sizeof(int64_t *));
    if (!plan->n_pairs || !plan->n_rows || !plan->pairs)
        goto nomem;
    for (int64_t i = 0; i < n; i++)
        plan->n_pairs[pl->owner[ids[i]]]++;
    for (int32_t r = 0; r < W; r++) {
        plan->pairs[r] = malloc(sizeof(int64_t) * (size_t)(plan->n_pairs[r] ? plan->n_pairs[r] : 1));
        if (!plan->pairs[r])
            goto nomem;
        plan->n_pairs[r] = 0;
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        for (int32_t k = 0; k < top_k; k++) {
            int32_t r = pl->owner[ids[t * top_k + k]];
            /* a token counts once per rank: its first pair on that rank */
            bool first = true;
            for (int32_t j = 0; j < k; j++)
                if (pl->owner[ids[t * top_k + j]] == r)
                    first = false;
            if (first)
                plan->n_rows[r]++;
            plan->pairs[r][plan->n_pairs[r]++] = t * top_k + k;
        }
    }
    return MOE_OK;
nomem:
    par_combine_plan_free(plan);
    return moe_fail(MOE_ERR_NOMEM, "combine plan");
}

void par_exchange_plan_free(par_exchange_plan *p) {
    if (!p)
        return;
    free(p->bound);
    free(p->send_count);
    free(p->send_off);
    free(p->recv_count);
    free(p->recv_off);
    if (p->own_idx) {
        free(p->send_idx);
        free(p->recv_idx);
    }
    memset(p, 0, sizeof *p);
}

moe_status par_exchange_plan_init(par_exchange_plan *p, int32_t world_size, int32_t rank, int64_t max_pairs,
                                  int32_t *send_idx, int32_t *recv_idx) {
    MOE_REQUIRE(p, MOE_ERR_INVALID_ARG, "exchange plan: NULL plan");
    memset(p, 0, sizeof *p);
    MOE_REQUIRE(world_size >= 1 && rank >= 0 && rank < world_size, MOE_ERR_INVALID_ARG,
                "exchange plan: rank %d of %d", (int)rank, (int)world_size);
    MOE_REQUIRE(max_pairs >= 0 && max_pairs <= INT32_MAX, MOE_ERR_INVALID_ARG, "exchange plan: %lld pairs",
                (long long)max_pairs);
    MOE_REQUIRE(!send_idx == !recv_idx, MOE_ERR_INVALID_ARG, "exchange plan: give both index buffers or neither");
    p->world_size = world_size;
    p->rank = rank;
    p->cap = max_pairs;
    const size_t W = (size_t)world_size;
    p->bound = calloc(W + 1, sizeof(int64_t));
    p->send_count = calloc(W, sizeof(int64_t));
    p->send_off = calloc(W, sizeof(int64_t));
    p->recv_count = calloc(W, sizeof(int64_t));
    p->recv_off = calloc(W, sizeof(int64_t));
    if (send_idx) {
        p->send_idx = send_idx;
        p->recv_idx = recv_idx;
    } else {
        p->own_idx = true;
        p->send_idx = malloc(sizeof(int32_t) * (size_t)(max_pairs ? max_pairs : 1));
        p->recv_idx = malloc(sizeof(int32_t) * (size_t)(max_pairs ? max_pairs : 1));
    }
    if (!p->bound || !p->send_count || !p->send_off || !p->recv_count || !p->recv_off || !p->send_idx ||
        !p->recv_idx) {
        par_exchange_plan_free(p);
        return moe_fail(MOE_ERR_NOMEM, "exchange plan");
    }
    return MOE_OK;
}

moe_status par_exchange_plan_build(par_exchange_plan *p, const par_placement *pl, const int32_t *ids, int64_t a,
                                   int64_t b, int32_t top_k) {
    MOE_REQUIRE(p && pl && p->bound, MOE_ERR_INVALID_ARG, "exchange plan: NULL argument");
    MOE_REQUIRE(pl->world_size == p->world_size, MOE_ERR_INVALID_ARG,
                "exchange plan: placement of %d ranks, plan of %d", (int)pl->world_size, (int)p->world_size);
    MOE_REQUIRE(a >= 0 && b >= a && top_k >= 1 && (ids || a == b), MOE_ERR_INVALID_ARG,
                "exchange plan: rows [%lld, %lld), K %d", (long long)a, (long long)b, (int)top_k);
    MOE_REQUIRE(b * top_k <= (int64_t)INT32_MAX, MOE_ERR_LIMIT, "exchange plan: %lld slot rows",
                (long long)(b * top_k));
    const int32_t W = p->world_size, r = p->rank;
    const int64_t n = b - a;
    for (int32_t q = 0; q <= W; q++)
        p->bound[q] = a + n * q / W;
    memset(p->send_count, 0, sizeof(int64_t) * (size_t)W);
    memset(p->recv_count, 0, sizeof(int64_t) * (size_t)W);
    /* Counts, then offsets, then the indices in ascending order within each group. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            int64_t so = 0, ro = 0;
            for (int32_t q = 0; q < W; q++) {
                p->send_off[q] = so;
                p->recv_off[q] = ro;
                so += p->send_count[q];
                ro += p->recv_count[q];
                p->send_count[q] = p->recv_count[q] = 0;
            }
            MOE_REQUIRE(so <= p->cap && ro <= p->cap, MOE_ERR_LIMIT,
                        "exchange plan: %lld / %lld pairs over the capacity %lld", (long long)so, (long long)ro,
                        (long long)p->cap);
            p->n_send = so;
            p->n_recv = ro;
        }
        int32_t q = 0; /* the owner of row t */
        for (int64_t t = a; t < b; t++) {
            while (t >= p->bound[q + 1])
                q++;
            for (int32_t k = 0; k < top_k; k++) {
                int32_t e = ids[t * top_k + k];
                if (e < 0 || e >= pl->n_experts)
                    continue;
                int32_t src = pl->owner[e];
                int32_t i = (int32_t)(t * top_k + k);
                if (src == r && q != r) {
                    if (pass)
                        p->send_idx[p->send_off[q] + p->send_count[q]] = i;
                    p->send_count[q]++;
                } else if (q == r && src != r) {
                    if (pass)
                        p->recv_idx[p->recv_off[src] + p->recv_count[src]] = i;
                    p->recv_count[src]++;
                }
            }
        }
    }
    return MOE_OK;
}
