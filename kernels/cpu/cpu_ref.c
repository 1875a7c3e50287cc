/*
 * cpu_ref.c: the reference backend. Plain loops over tokens, slots and rows, written to be read
 * next to the model definitions; every other backend is checked against it (and it against the
 * independent numpy reference in tests/). No threads, no blocking, no cleverness.
 *
 * Arguments arrive checked by kern.c (shapes, dtypes, ids in range, finite weights, no
 * aliasing). Numerics follow kern.h: fp32 accumulation, the gated activation and each slot's
 * contribution rounded to the activation dtype, the sum over slots in slot order from +0.0.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern_impl.h"

static moe_status ref_init(kern_ctx_t *ctx) {
    ctx->impl = NULL;
    return MOE_OK;
}

static void ref_free(kern_ctx_t *ctx) { (void)ctx; }

static bool ref_supports(const kern_ctx_t *ctx, kern_op op, moe_dtype dt) {
    (void)ctx;
    (void)op;
    return moe_dtype_is_float(dt);
}

/* ------------------------------------------------------------------------------------------
 * Routing.
 * ---------------------------------------------------------------------------------------- */
static void scores_row(kern_score_func f, const float *logit, int32_t E, float *score) {
    if (f == KERN_SCORE_SIGMOID) {
        for (int32_t e = 0; e < E; e++)
            score[e] = 1.0f / (1.0f + expf(-logit[e]));
        return;
    }
    float m = -INFINITY;
    for (int32_t e = 0; e < E; e++)
        if (logit[e] > m)
            m = logit[e];
    float sum = 0.0f;
    for (int32_t e = 0; e < E; e++) {
        score[e] = expf(logit[e] - m);
        sum += score[e];
    }
    for (int32_t e = 0; e < E; e++)
        score[e] /= sum;
}

static moe_status ref_route(kern_ctx_t *ctx, const kern_route_params *p, const moe_tensor *logits, moe_tensor *ids,
                            moe_tensor *w) {
    (void)ctx;
    const int32_t E = p->n_experts, K = p->top_k;
    const int64_t T = logits->shape[0];
    const int32_t G = p->group_mode == KERN_GROUP_NONE ? 1 : p->n_group;
    const int32_t per = E / G;
    moe_status st = MOE_OK;
    float *logit = malloc(sizeof(float) * (size_t)E);
    float *score = malloc(sizeof(float) * (size_t)E);
    float *choice = malloc(sizeof(float) * (size_t)E);
    bool *keep = malloc(sizeof(bool) * (size_t)E);
    float *gscore = malloc(sizeof(float) * (size_t)G);
    int32_t *gsel = malloc(sizeof(int32_t) * (size_t)G);
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)K);
    int32_t top2[2];
    if (!logit || !score || !choice || !keep || !gscore || !gsel || !sel) {
        st = moe_fail(MOE_ERR_NOMEM, "route: scratch");
        goto done;
    }
    int32_t *out_id = ids->data;
    float *out_w = w->data;
    for (int64_t t = 0; t < T; t++) {
        moe_to_f32(logits->dtype, (const char *)logits->data + (size_t)t * (size_t)E * moe_dtype_size(logits->dtype),
                   logit, (size_t)E);
        scores_row(p->scoring, logit, E, score);
        for (int32_t e = 0; e < E; e++)
            choice[e] = score[e] + (p->correction_bias ? p->correction_bias[e] : 0.0f);

        /* Group-limited selection: keep the experts of the topk_group best groups. */
        for (int32_t e = 0; e < E; e++)
            keep[e] = true;
        if (p->group_mode != KERN_GROUP_NONE && G > 1) {
            for (int32_t g = 0; g < G; g++) {
                const float *c = choice + (size_t)g * (size_t)per;
                if (p->group_mode == KERN_GROUP_MAX) {
                    float m = c[0];
                    for (int32_t i = 1; i < per; i++)
                        if (c[i] > m)
                            m = c[i];
                    gscore[g] = m;
                } else {
                    kern_topk_indices(c, NULL, per, 2, top2);
                    gscore[g] = c[top2[0]] + c[top2[1]];
                }
            }
            kern_topk_indices(gscore, NULL, G, p->topk_group, gsel);
            for (int32_t e = 0; e < E; e++)
                keep[e] = false;
            for (int32_t j = 0; j < p->topk_group; j++)
                for (int32_t i = 0; i < per; i++)
                    keep[gsel[j] * per + i] = true;
        }

        int32_t got = kern_topk_indices(choice, keep, E, K, sel);
        if (got != K) {
            st = moe_fail(MOE_ERR_INTERNAL, "route: selected %d of %d experts", (int)got, (int)K);
            goto done;
        }
        float sum = 0.0f;
        for (int32_t k = 0; k < K; k++)
            sum += score[sel[k]];
        for (int32_t k = 0; k < K; k++) {
            float v = score[sel[k]];
            if (p->renormalize && sum > 0.0f)
                v /= sum;
            out_id[t * K + k] = sel[k];
            out_w[t * K + k] = v * p->routed_scaling_factor;
        }
    }
done:
    free(logit);
    free(score);
    free(choice);
    free(keep);
    free(gscore);
    free(gsel);
    free(sel);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * Experts.
 * ---------------------------------------------------------------------------------------- */
static float dot_row(moe_dtype dt, const void *row, const float *v, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++)
        acc += moe_load_f32(dt, row, (size_t)i) * v[i];
    return acc;
}

/* One gated MLP on one row: out[j] = sum_i W2[j, i] * a[i] with a = round(act(W1 h) * (W3 h)).
 * w13 points at [2I, H], w2 at [H, I]. */
static void mlp_row(moe_dtype dt, kern_act act, const void *w13, const void *w2, const float *h, int64_t H,
                    int64_t I, float *a, float *out) {
    const size_t es = moe_dtype_size(dt);
    for (int64_t i = 0; i < I; i++) {
        float g = dot_row(dt, (const char *)w13 + (size_t)i * (size_t)H * es, h, H);
        float u = dot_row(dt, (const char *)w13 + (size_t)(I + i) * (size_t)H * es, h, H);
        a[i] = moe_round_to(dt, kern_act_f32(act, g) * u);
    }
    for (int64_t j = 0; j < H; j++)
        out[j] = dot_row(dt, (const char *)w2 + (size_t)j * (size_t)I * es, a, I);
}

static moe_status ref_fused_experts(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                    const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                    const moe_tensor *w, moe_tensor *y) {
    (void)ctx;
    const moe_dtype dt = x->dtype;
    const size_t es = moe_dtype_size(dt);
    const int64_t T = x->shape[0], H = x->shape[1], K = ids->shape[1], I = w13->shape[1] / 2;
    const bool slot_mode = y->ndim == 3;
    moe_status st = MOE_OK;
    float *h = malloc(sizeof(float) * (size_t)H);
    float *a = malloc(sizeof(float) * (size_t)I);
    float *o = malloc(sizeof(float) * (size_t)H);
    float *acc = malloc(sizeof(float) * (size_t)H);
    if (!h || !a || !o || !acc) {
        st = moe_fail(MOE_ERR_NOMEM, "fused_experts: scratch");
        goto done;
    }
    const int32_t *id = ids->data;
    const float *wt = w->data;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < H; j++)
            acc[j] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int32_t e = kern_local_slot(p, id[t * K + k]);
            float wk = wt[t * K + k];
            if (e < 0) {
                if (slot_mode)
                    for (int64_t j = 0; j < H; j++)
                        moe_store_f32(dt, y->data, (size_t)((t * K + k) * H + j), 0.0f);
                continue;
            }
            for (int64_t j = 0; j < H; j++) {
                float xv = moe_load_f32(dt, x->data, (size_t)(t * H + j));
                h[j] = p->weight_on_input ? moe_round_to(dt, xv * wk) : xv;
            }
            mlp_row(dt, p->act, (const char *)w13->data + (size_t)e * (size_t)(2 * I * H) * es,
                    (const char *)w2->data + (size_t)e * (size_t)(H * I) * es, h, H, I, a, o);
            for (int64_t j = 0; j < H; j++) {
                float c = moe_round_to(dt, p->weight_on_input ? o[j] : o[j] * wk);
                if (slot_mode)
                    moe_store_f32(dt, y->data, (size_t)((t * K + k) * H + j), c);
                else
                    acc[j] += c;
            }
        }
        if (!slot_mode)
            for (int64_t j = 0; j < H; j++)
                moe_store_f32(dt, y->data, (size_t)(t * H + j), acc[j]);
    }
done:
    free(h);
    free(a);
    free(o);
    free(acc);
    return st;
}

static moe_status ref_shared_expert(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x,
                                    moe_tensor *s) {
    (void)ctx;
    const moe_dtype dt = x->dtype;
    const int64_t T = x->shape[0], H = x->shape[1], I = se->w13->shape[0] / 2;
    moe_status st = MOE_OK;
    float *h = malloc(sizeof(float) * (size_t)H);
    float *a = malloc(sizeof(float) * (size_t)I);
    float *o = malloc(sizeof(float) * (size_t)H);
    if (!h || !a || !o) {
        st = moe_fail(MOE_ERR_NOMEM, "shared_expert: scratch");
        goto done;
    }
    for (int64_t t = 0; t < T; t++) {
        moe_to_f32(dt, (const char *)x->data + (size_t)(t * H) * moe_dtype_size(dt), h, (size_t)H);
        mlp_row(dt, se->act, se->w13->data, se->w2->data, h, H, I, a, o);
        float g = 1.0f;
        if (se->gate)
            g = 1.0f / (1.0f + expf(-dot_row(dt, se->gate->data, h, H)));
        for (int64_t j = 0; j < H; j++)
            moe_store_f32(dt, s->data, (size_t)(t * H + j), g * o[j]);
    }
done:
    free(h);
    free(a);
    free(o);
    return st;
}

static moe_status ref_moe_sum(kern_ctx_t *ctx, const moe_tensor *slots, const moe_tensor *shared, moe_tensor *y) {
    (void)ctx;
    const moe_dtype dt = slots->dtype;
    const int64_t T = slots->shape[0], K = slots->shape[1], H = slots->shape[2];
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < H; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += moe_load_f32(dt, slots->data, (size_t)((t * K + k) * H + j));
            if (shared)
                acc += moe_load_f32(dt, shared->data, (size_t)(t * H + j));
            moe_store_f32(dt, y->data, (size_t)(t * H + j), acc);
        }
    }
    return MOE_OK;
}

const kern_backend_ops kern_cpu_ref_ops = {
    .name = "cpu-ref",
    .host_data = true,
    .init = ref_init,
    .free = ref_free,
    .supports = ref_supports,
    .sync = NULL,
    .route = ref_route,
    .fused_experts = ref_fused_experts,
    .shared_expert = ref_shared_expert,
    .moe_sum = ref_moe_sum,
    .moe_forward = NULL,
};
