/*
 * step.c: one step's computation on a worker (see step.h). Owned by the step loop thread.
 *
 * Router logits from hidden states are computed in fp32 (kern_router_logits: x widened, the
 * fp32 router, one fixed-order sum per logit), as DeepSeek's gate does; they are not rounded
 * to the model dtype. Every rank computes them the same way, so every rank routes the same.
 */
#include "engine/step.h"

#include <stdlib.h>
#include <string.h>

void eng_step_free(eng_step *s) {
    if (!s)
        return;
    moe_tensor_free(&s->x);
    moe_tensor_free(&s->ids);
    moe_tensor_free(&s->weights);
    moe_tensor_free(&s->contrib);
    moe_tensor_free(&s->y);
    par_combine_plan_free(&s->plan);
    free(s->expert_tokens);
    memset(s, 0, sizeof *s);
}

moe_status eng_step_init(eng_step *s, const eng_step_model *m, const eng_layer *layer, int32_t rank,
                         const eng_step_req *reqs, int32_t n_reqs, kern_ctx_t *kctx) {
    MOE_REQUIRE(s && m && layer && (reqs || n_reqs == 0) && kctx, MOE_ERR_INVALID_ARG, "step: NULL argument");
    memset(s, 0, sizeof *s);
    s->model = m;
    s->layer = layer;
    s->rank = rank;
    const int64_t H = m->hidden, K = m->top_k, E = m->n_experts;
    const size_t es = moe_dtype_size(m->dtype);
    int64_t T = 0;
    for (int32_t i = 0; i < n_reqs; i++)
        T += reqs[i].n_tokens;
    s->n_tokens = T;
    moe_status st = MOE_OK;
    float *logits = NULL;
    MOE_CHECK_GOTO(moe_tensor_alloc(&s->x, m->dtype, 2, (int64_t[]){T, H}), st, fail);
    MOE_CHECK_GOTO(moe_tensor_alloc(&s->ids, MOE_DTYPE_I32, 2, (int64_t[]){T, K}), st, fail);
    MOE_CHECK_GOTO(moe_tensor_alloc(&s->weights, MOE_DTYPE_F32, 2, (int64_t[]){T, K}), st, fail);
    s->expert_tokens = calloc((size_t)E, sizeof(int64_t));
    if (!s->expert_tokens) {
        st = moe_fail(MOE_ERR_NOMEM, "step");
        goto fail;
    }
    kern_route_params rp = m->route;
    rp.correction_bias = layer->correction_bias;
    int64_t row = 0;
    for (int32_t i = 0; i < n_reqs; i++) {
        const eng_step_req *r = &reqs[i];
        const int64_t t0 = row, n = r->n_tokens;
        memcpy((char *)s->x.data + (size_t)(t0 * H) * es, r->x, (size_t)(n * H) * es);
        int32_t *ids = (int32_t *)s->ids.data + t0 * K;
        float *w = (float *)s->weights.data + t0 * K;
        if (r->src == ENG_ROUTE_IDS) {
            memcpy(ids, r->ids, sizeof(int32_t) * (size_t)(n * K));
            memcpy(w, r->weights, sizeof(float) * (size_t)(n * K));
        } else if (n > 0) {
            moe_tensor lg;
            if (r->src == ENG_ROUTE_LOGITS) {
                lg = moe_tensor_view2((void *)r->logits, r->logits_dtype, n, E);
            } else {
                if (!layer->router.data) {
                    st = moe_fail(MOE_ERR_UNSUPPORTED,
                                  "layer %d: this engine has no router weights: send topk ids and weights, or router "
                                  "logits",
                                  (int)layer->layer);
                    goto fail;
                }
                logits = malloc(sizeof(float) * (size_t)(n * E));
                if (!logits) {
                    st = moe_fail(MOE_ERR_NOMEM, "router logits");
                    goto fail;
                }
                lg = moe_tensor_view2(logits, MOE_DTYPE_F32, n, E);
                moe_tensor xv = moe_tensor_view2((void *)r->x, m->dtype, n, H);
                MOE_CHECK_GOTO(kern_router_logits(kctx, &xv, &layer->router, &lg), st, fail);
            }
            moe_tensor ti = moe_tensor_view2(ids, MOE_DTYPE_I32, n, K);
            moe_tensor tw = moe_tensor_view2(w, MOE_DTYPE_F32, n, K);
            MOE_CHECK_GOTO(kern_route(kctx, &rp, &lg, &ti, &tw), st, fail);
            free(logits);
            logits = NULL;
        }
        row += n;
    }
    const int32_t *ids = s->ids.data;
    for (int64_t i = 0; i < T * K; i++) {
        if (ids[i] < 0 || ids[i] >= E) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "step: expert id %d out of range [0, %d)", (int)ids[i], (int)E);
            goto fail;
        }
        s->expert_tokens[ids[i]]++;
    }
    MOE_CHECK_GOTO(par_combine_plan_init(&s->plan, m->placement, ids, T, (int32_t)K), st, fail);
    return MOE_OK;
fail:
    free(logits);
    eng_step_free(s);
    return st;
}

moe_status eng_step_local(eng_step *s, kern_ctx_t *kctx) {
    const eng_step_model *m = s->model;
    const par_placement *pl = m->placement;
    const int64_t H = m->hidden, K = m->top_k, T = s->n_tokens;
    const size_t es = moe_dtype_size(m->dtype);
    const int32_t r = s->rank;
    const int64_t n_pairs = s->plan.n_pairs[r], n_rows = s->plan.n_rows[r];
    moe_status st = MOE_OK;
    moe_tensor xr = {0}, idr = {0}, wr = {0}, slots = {0};
    int32_t *map = NULL;
    int64_t *row_of = NULL;
    MOE_CHECK_GOTO(moe_tensor_alloc(&s->contrib, m->dtype, 2, (int64_t[]){n_pairs, H}), st, fail);
    if (n_pairs == 0)
        return MOE_OK;
    /* The rows this rank needs: tokens with at least one pair here, in token order. */
    MOE_CHECK_GOTO(moe_tensor_alloc(&xr, m->dtype, 2, (int64_t[]){n_rows, H}), st, fail);
    MOE_CHECK_GOTO(moe_tensor_alloc(&idr, MOE_DTYPE_I32, 2, (int64_t[]){n_rows, K}), st, fail);
    MOE_CHECK_GOTO(moe_tensor_alloc(&wr, MOE_DTYPE_F32, 2, (int64_t[]){n_rows, K}), st, fail);
    MOE_CHECK_GOTO(moe_tensor_alloc(&slots, m->dtype, 3, (int64_t[]){n_rows, K, H}), st, fail);
    map = malloc(sizeof(int32_t) * (size_t)m->n_experts);
    row_of = malloc(sizeof(int64_t) * (size_t)(T ? T : 1));
    if (!map || !row_of) {
        st = moe_fail(MOE_ERR_NOMEM, "step local");
        goto fail;
    }
    MOE_CHECK_GOTO(par_placement_expert_map(pl, r, map), st, fail);
    const int32_t *ids = s->ids.data;
    const float *w = s->weights.data;
    int64_t nr = 0;
    for (int64_t t = 0; t < T; t++) {
        row_of[t] = -1;
        for (int64_t k = 0; k < K; k++)
            if (map[ids[t * K + k]] >= 0) {
                row_of[t] = nr++;
                break;
            }
        if (row_of[t] >= 0) {
            memcpy((char *)xr.data + (size_t)(row_of[t] * H) * es, (const char *)s->x.data + (size_t)(t * H) * es,
                   (size_t)H * es);
            memcpy((int32_t *)idr.data + row_of[t] * K, ids + t * K, sizeof(int32_t) * (size_t)K);
            memcpy((float *)wr.data + row_of[t] * K, w + t * K, sizeof(float) * (size_t)K);
        }
    }
    MOE_ASSERT(nr == n_rows);
    kern_experts_params ep = {
        .n_experts = m->n_experts,
        .n_local = pl->n_local[r],
        .expert_map = map,
        .act = m->act,
        .weight_on_input = false,
    };
    MOE_CHECK_GOTO(kern_fused_experts(kctx, &ep, &xr, &s->layer->w13, &s->layer->w2, &idr, &wr, &slots), st, fail);
    MOE_CHECK_GOTO(kern_ctx_sync(kctx), st, fail);
    /* Pack this rank's pairs in canonical order. */
    for (int64_t i = 0; i < n_pairs; i++) {
        int64_t flat = s->plan.pairs[r][i], t = flat / K, k = flat % K;
        memcpy((char *)s->contrib.data + (size_t)(i * H) * es,
               (const char *)slots.data + (size_t)((row_of[t] * K + k) * H) * es, (size_t)H * es);
    }
fail:
    moe_tensor_free(&xr);
    moe_tensor_free(&idr);
    moe_tensor_free(&wr);
    moe_tensor_free(&slots);
    free(map);
    free(row_of);
    return st;
}

static moe_status shared_view(const eng_layer *l, kern_act act, kern_shared_expert *se) {
    se->w13 = &l->shared_w13;
    se->w2 = &l->shared_w2;
    se->gate = l->shared_gate.data ? &l->shared_gate : NULL;
    se->act = act;
    return MOE_OK;
}

moe_status eng_step_combine(eng_step *s, const void *const *contribs, kern_ctx_t *kctx) {
    const eng_step_model *m = s->model;
    const int64_t H = m->hidden, K = m->top_k, T = s->n_tokens;
    const size_t es = moe_dtype_size(m->dtype);
    moe_status st = MOE_OK;
    moe_tensor slots = {0}, sh = {0};
    MOE_CHECK_GOTO(moe_tensor_alloc(&s->y, m->dtype, 2, (int64_t[]){T, H}), st, fail);
    MOE_CHECK_GOTO(moe_tensor_alloc(&slots, m->dtype, 3, (int64_t[]){T, K, H}), st, fail);
    for (int32_t r = 0; r < s->plan.world_size; r++)
        for (int64_t i = 0; i < s->plan.n_pairs[r]; i++)
            memcpy((char *)slots.data + (size_t)(s->plan.pairs[r][i] * H) * es,
                   (const char *)contribs[r] + (size_t)(i * H) * es, (size_t)H * es);
    if (s->layer->has_shared) {
        kern_shared_expert se;
        shared_view(s->layer, m->act, &se);
        MOE_CHECK_GOTO(moe_tensor_alloc(&sh, m->dtype, 2, (int64_t[]){T, H}), st, fail);
        MOE_CHECK_GOTO(kern_shared_expert_forward(kctx, &se, &s->x, &sh), st, fail);
    }
    MOE_CHECK_GOTO(kern_moe_sum(kctx, &slots, s->layer->has_shared ? &sh : NULL, &s->y), st, fail);
    MOE_CHECK_GOTO(kern_ctx_sync(kctx), st, fail);
fail:
    moe_tensor_free(&slots);
    moe_tensor_free(&sh);
    return st;
}

moe_status eng_step_single(eng_step *s, kern_ctx_t *kctx) {
    const eng_step_model *m = s->model;
    MOE_REQUIRE(m->placement->world_size == 1, MOE_ERR_INTERNAL, "step_single with world size %d",
                (int)m->placement->world_size);
    MOE_CHECK(moe_tensor_alloc(&s->y, m->dtype, 2, (int64_t[]){s->n_tokens, m->hidden}));
    kern_experts_params ep = {
        .n_experts = m->n_experts,
        .n_local = m->n_experts,
        .expert_map = NULL,
        .act = m->act,
        .weight_on_input = false,
    };
    kern_shared_expert se;
    if (s->layer->has_shared)
        shared_view(s->layer, m->act, &se);
    MOE_CHECK(kern_moe_forward(kctx, &ep, &s->x, &s->layer->w13, &s->layer->w2, &s->ids, &s->weights,
                               s->layer->has_shared ? &se : NULL, &s->y));
    return kern_ctx_sync(kctx);
}
