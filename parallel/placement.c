/*
 * placement.c: expert placement over ranks. Immutable after init; any thread may read it.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "parallel/par.h"

const char *par_place_policy_name(par_place_policy p) {
    switch (p) {
    case PAR_PLACE_CONTIGUOUS:
        return "contiguous";
    case PAR_PLACE_ROUND_ROBIN:
        return "round-robin";
    default:
        return "invalid";
    }
}

moe_status par_place_policy_parse(const char *s, par_place_policy *out) {
    if (!s || !out)
        return moe_fail(MOE_ERR_INVALID_ARG, "placement: missing policy");
    if (strcasecmp(s, "contiguous") == 0 || strcasecmp(s, "block") == 0) {
        *out = PAR_PLACE_CONTIGUOUS;
        return MOE_OK;
    }
    if (strcasecmp(s, "round-robin") == 0 || strcasecmp(s, "round_robin") == 0 || strcasecmp(s, "rr") == 0) {
        *out = PAR_PLACE_ROUND_ROBIN;
        return MOE_OK;
    }
    return moe_fail(MOE_ERR_INVALID_ARG, "unknown placement '%.32s' (contiguous, round-robin)", s);
}

void par_placement_free(par_placement *pl) {
    if (!pl)
        return;
    if (pl->experts)
        for (int32_t r = 0; r < pl->world_size; r++)
            free(pl->experts[r]);
    free(pl->experts);
    free(pl->owner);
    free(pl->local_slot);
    free(pl->n_local);
    memset(pl, 0, sizeof *pl);
}

moe_status par_placement_init(par_placement *pl, int32_t n_experts, int32_t world_size, par_place_policy policy) {
    MOE_REQUIRE(pl, MOE_ERR_INVALID_ARG, "placement: NULL");
    memset(pl, 0, sizeof *pl);
    MOE_REQUIRE(n_experts >= 1, MOE_ERR_INVALID_ARG, "placement: %d experts", (int)n_experts);
    MOE_REQUIRE(world_size >= 1 && world_size <= n_experts, MOE_ERR_INVALID_ARG,
                "placement: world size %d must be in [1, %d experts]: every rank holds at least one expert",
                (int)world_size, (int)n_experts);
    MOE_REQUIRE(policy == PAR_PLACE_CONTIGUOUS || policy == PAR_PLACE_ROUND_ROBIN, MOE_ERR_INVALID_ARG,
                "placement: unknown policy %d", (int)policy);
    pl->n_experts = n_experts;
    pl->world_size = world_size;
    pl->policy = policy;
    pl->owner = calloc((size_t)n_experts, sizeof(int32_t));
    pl->local_slot = calloc((size_t)n_experts, sizeof(int32_t));
    pl->n_local = calloc((size_t)world_size, sizeof(int32_t));
    pl->experts = calloc((size_t)world_size, sizeof(int32_t *));
    if (!pl->owner || !pl->local_slot || !pl->n_local || !pl->experts) {
        par_placement_free(pl);
        return moe_fail(MOE_ERR_NOMEM, "placement");
    }
    int32_t base = n_experts / world_size, extra = n_experts % world_size;
    for (int32_t e = 0; e < n_experts; e++) {
        int32_t r;
        if (policy == PAR_PLACE_ROUND_ROBIN) {
            r = e % world_size;
        } else {
            /* ranks 0..extra-1 hold base+1 experts, the others base */
            int32_t big = extra * (base + 1);
            r = e < big ? e / (base + 1) : extra + (e - big) / base;
        }
        pl->owner[e] = r;
        pl->local_slot[e] = pl->n_local[r]++;
    }
    for (int32_t r = 0; r < world_size; r++) {
        pl->experts[r] = calloc((size_t)pl->n_local[r], sizeof(int32_t));
        if (!pl->experts[r]) {
            par_placement_free(pl);
            return moe_fail(MOE_ERR_NOMEM, "placement");
        }
    }
    for (int32_t e = 0; e < n_experts; e++)
        pl->experts[pl->owner[e]][pl->local_slot[e]] = e;
    return MOE_OK;
}

moe_status par_placement_first_part(const par_placement *pl, int32_t share_pct, uint8_t *in_first) {
    MOE_REQUIRE(pl && in_first, MOE_ERR_INVALID_ARG, "placement: NULL");
    MOE_REQUIRE(share_pct >= 1 && share_pct <= 99, MOE_ERR_INVALID_ARG, "placement: first part %d%% not in [1, 99]",
                (int)share_pct);
    for (int32_t e = 0; e < pl->n_experts; e++) {
        const int32_t nl = pl->n_local[pl->owner[e]];
        int32_t first = (int32_t)(((int64_t)nl * share_pct + 50) / 100);
        const int32_t hi = nl > 1 ? nl - 1 : 1;
        first = first < 1 ? 1 : first > hi ? hi : first;
        in_first[e] = (uint8_t)(pl->local_slot[e] < first);
    }
    return MOE_OK;
}

moe_status par_placement_expert_map(const par_placement *pl, int32_t rank, int32_t *map) {
    MOE_REQUIRE(pl && map, MOE_ERR_INVALID_ARG, "placement: NULL");
    MOE_REQUIRE(rank >= 0 && rank < pl->world_size, MOE_ERR_INVALID_ARG, "placement: rank %d not in [0, %d)",
                (int)rank, (int)pl->world_size);
    for (int32_t e = 0; e < pl->n_experts; e++)
        map[e] = pl->owner[e] == rank ? pl->local_slot[e] : -1;
    return MOE_OK;
}
