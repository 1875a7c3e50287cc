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
