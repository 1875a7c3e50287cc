/*
 * plan.c: the combine plan of a step. Every rank builds it from the same routing and the same
 * placement, so all ranks agree on who computes which (token, slot) pair and on the sizes of
 * the gather without exchanging them. Pure; any thread.
 */
#include <stdlib.h>
#include <string.h>

#include "parallel/par.h"

/* The exchange plan's receives by one compaction pass per rank up to this world size, by a count
 * and a fill above it (par_exchange_plan_build_set). */
#define PLAN_COMPACT_MAX_W 4

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
    free(p->tab);
    free(p->scratch);
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
    p->scratch = calloc(2 * (W + 1), sizeof(int64_t));
    if (send_idx) {
        p->send_idx = send_idx;
        p->recv_idx = recv_idx;
    } else {
        p->own_idx = true;
        p->send_idx = malloc(sizeof(int32_t) * (size_t)(max_pairs + 1));
        p->recv_idx = malloc(sizeof(int32_t) * (size_t)(max_pairs + 1));
    }
    if (!p->bound || !p->send_count || !p->send_off || !p->recv_count || !p->recv_off || !p->scratch ||
        !p->send_idx || !p->recv_idx) {
        par_exchange_plan_free(p);
        return moe_fail(MOE_ERR_NOMEM, "exchange plan");
    }
    return MOE_OK;
}

moe_status par_exchange_plan_build(par_exchange_plan *p, const par_placement *pl, const int32_t *ids, int64_t a,
                                   int64_t b, int32_t top_k) {
    return par_exchange_plan_build_set(p, pl, ids, a, b, top_k, NULL);
}

moe_status par_exchange_plan_build_set(par_exchange_plan *p, const par_placement *pl, const int32_t *ids, int64_t a,
                                       int64_t b, int32_t top_k, const uint8_t *in_set) {
    MOE_REQUIRE(p && pl && p->bound, MOE_ERR_INVALID_ARG, "exchange plan: NULL argument");
    MOE_REQUIRE(pl->world_size == p->world_size, MOE_ERR_INVALID_ARG,
                "exchange plan: placement of %d ranks, plan of %d", (int)pl->world_size, (int)p->world_size);
    MOE_REQUIRE(a >= 0 && b >= a && top_k >= 1 && (ids || a == b), MOE_ERR_INVALID_ARG,
                "exchange plan: rows [%lld, %lld), K %d", (long long)a, (long long)b, (int)top_k);
    MOE_REQUIRE(b * top_k <= (int64_t)INT32_MAX, MOE_ERR_LIMIT, "exchange plan: %lld slot rows",
                (long long)(b * top_k));
    const int32_t W = p->world_size, r = p->rank, E = pl->n_experts;
    const int64_t n = b - a, K = top_k;
    MOE_REQUIRE(n * K <= p->cap, MOE_ERR_LIMIT, "exchange plan: %lld pairs over the capacity %lld",
                (long long)(n * K), (long long)p->cap);
    if (p->tab_n != E) {
        int32_t *t = realloc(p->tab, sizeof(int32_t) * 3 * (size_t)(E + 1));
        if (!t)
            return moe_fail(MOE_ERR_NOMEM, "exchange plan");
        p->tab = t;
        p->tab_n = E;
    }
    /* Branch-free lookups (routing is random, so a branch per pair would mispredict half the
     * time): mine[c] is 1 where expert c is here (c = E stands for an invalid id: 0); from[c]
     * is the rank that computes expert c for this rank's rows, W (a group past the real ones)
     * where nothing is received: this rank's own experts and invalid ids. */
    int32_t *mine = p->tab, *from = p->tab + E + 1, *who = p->tab + 2 * (E + 1);
    for (int32_t e = 0; e < E; e++) {
        const bool in = !in_set || in_set[e]; /* pairs of experts outside the set: no one's here */
        mine[e] = in && pl->owner[e] == r;
        from[e] = !in || pl->owner[e] == r ? W : pl->owner[e];
        who[e] = in ? pl->owner[e] : W; /* the rank that computes it (par_exchange_plan_max_part) */
    }
    mine[E] = 0;
    from[E] = W;
    who[E] = W;
    for (int32_t q = 0; q <= W; q++)
        p->bound[q] = a + n * q / W;
    int64_t *rcnt = p->scratch, *cu = p->scratch + W + 1; /* receive counts, then cursors, per group */
    memset(rcnt, 0, sizeof(int64_t) * ((size_t)W + 1));
    /* Receives: this rank's own rows, grouped by the rank that computes each pair: counts, then
     * the fill. Sends: every other rank's rows, in one pass each (a group's offset is the sum
     * of the groups before it). Every pair is written at its group's cursor and the cursor
     * advances only for the pairs that belong there (so the next one overwrites the others);
     * the scratch writes land inside [0, n K], which the capacity covers: the trash group W of
     * the receives starts after the real groups, and a send group's overflow write is
     * overwritten by the next group, or lands just after the last one. */
    const int64_t o0 = p->bound[r] * K, o1 = p->bound[r + 1] * K;
    if (W <= PLAN_COMPACT_MAX_W) {
        /* A compaction pass over this rank's rows per rank to receive from, as the sends below:
         * at W <= 4 cheaper than counting and then filling, whose few counters and cursors are
         * incremented back to back (tools/bench/bench_plan on the build VM, in turns with the
         * count and fill: W = 2 2.9 -> 1.1-1.4 ns a pair, W = 4 about 5% less; at W = 8 the
         * count and fill stays ahead; plan time is host time before a step's first exchange can
         * be enqueued, docs/PERF.md) */
        int64_t pos = 0;
        for (int32_t q = 0; q < W; q++) {
            p->recv_off[q] = pos;
            if (q == r) {
                p->recv_count[q] = 0;
                continue;
            }
            const int64_t start = pos;
            for (int64_t i = o0; i < o1; i++) {
                uint32_t c = (uint32_t)ids[i] < (uint32_t)E ? (uint32_t)ids[i] : (uint32_t)E;
                p->recv_idx[pos] = (int32_t)i;
                pos += from[c] == q;
            }
            p->recv_count[q] = pos - start;
        }
        p->n_recv = pos;
    } else {
        for (int64_t i = o0; i < o1; i++) {
            uint32_t c = (uint32_t)ids[i] < (uint32_t)E ? (uint32_t)ids[i] : (uint32_t)E;
            rcnt[from[c]]++;
        }
        int64_t ro = 0;
        for (int32_t q = 0; q < W; q++) {
            p->recv_off[q] = ro;
            p->recv_count[q] = q == r ? 0 : rcnt[q];
            ro += p->recv_count[q];
            cu[q] = p->recv_off[q];
        }
        cu[W] = ro;
        p->n_recv = ro;
        for (int64_t i = o0; i < o1; i++) {
            uint32_t c = (uint32_t)ids[i] < (uint32_t)E ? (uint32_t)ids[i] : (uint32_t)E;
            p->recv_idx[cu[from[c]]++] = (int32_t)i;
        }
    }
    int64_t so = 0;
    int32_t *out = p->send_idx;
    for (int32_t q = 0; q < W; q++) {
        p->send_off[q] = so;
        if (q == r) {
            p->send_count[q] = 0;
            continue;
        }
        const int64_t i0 = p->bound[q] * K, i1 = p->bound[q + 1] * K;
        int64_t pos = so;
        for (int64_t i = i0; i < i1; i++) {
            uint32_t c = (uint32_t)ids[i] < (uint32_t)E ? (uint32_t)ids[i] : (uint32_t)E;
            out[pos] = (int32_t)i;
            pos += mine[c];
        }
        p->send_count[q] = pos - so;
        so = pos;
    }
    p->n_send = so;
    return MOE_OK;
}

moe_status par_exchange_plan_max_part(const par_exchange_plan *p, const int32_t *ids, int32_t top_k, int64_t *out) {
    MOE_REQUIRE(p && out && p->bound && p->tab, MOE_ERR_INVALID_ARG,
                "exchange plan max part: NULL argument, or no build before it");
    MOE_REQUIRE(top_k >= 1, MOE_ERR_INVALID_ARG, "exchange plan max part: K %d", (int)top_k);
    const int32_t W = p->world_size, E = p->tab_n;
    int64_t best = 0;
    if (W <= 2) { /* the one pair each way: what this rank sends and receives */
        for (int32_t q = 0; q < W; q++) {
            if (p->send_count[q] > best)
                best = p->send_count[q];
            if (p->recv_count[q] > best)
                best = p->recv_count[q];
        }
        *out = best;
        return MOE_OK;
    }
    MOE_REQUIRE(ids || p->bound[W] == p->bound[0], MOE_ERR_INVALID_ARG, "exchange plan max part: NULL ids");
    /* who: the build's table of the rank computing each expert of its set (W: none);
     * cnt[s]: the pairs of destination q's rows that rank s computes */
    const int32_t *who = p->tab + 2 * (E + 1);
    int64_t *cnt = p->scratch; /* [2 (W + 1)], free after the build */
    for (int32_t q = 0; q < W; q++) {
        memset(cnt, 0, sizeof(int64_t) * ((size_t)W + 1));
        for (int64_t i = p->bound[q] * top_k; i < p->bound[q + 1] * top_k; i++)
            cnt[who[(uint32_t)ids[i] < (uint32_t)E ? (uint32_t)ids[i] : (uint32_t)E]]++;
        for (int32_t s = 0; s < W; s++)
            if (s != q && cnt[s] > best)
                best = cnt[s];
    }
    *out = best;
    return MOE_OK;
}
