/*
 * test_step.c: the step computation of the workers (engine/step.c) without transport:
 * the output of every request is the same bit for bit for world sizes 1..4, both placements,
 * the unwrapped single-rank call and the wrapped (gather + combine) path, and in any company of
 * other requests; and it equals a direct kern_moe_forward on the same inputs.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/step.h"

typedef struct model_fixture {
    moe_dtype dt;
    int32_t H, E, K, I, Is;
    kern_route_params route;
    moe_tensor w13, w2, router, sw13, sw2, sgate;
    float *bias;
} model_fixture;

static void fill(moe_tensor *t, moe_rng *r, float scale) {
    int64_t n = moe_tensor_numel(t);
    for (int64_t i = 0; i < n; i++)
        moe_store_f32(t->dtype, t->data, (size_t)i, moe_rng_normal(r) * scale);
}

static void model_init(model_fixture *f, moe_dtype dt, bool shared, bool grouped) {
    memset(f, 0, sizeof *f);
    f->dt = dt;
    f->H = 40;
    f->E = 12;
    f->K = 3;
    f->I = 24;
    f->Is = 20;
    moe_rng r;
    moe_rng_seed(&r, 7);
    assert_int_equal(moe_tensor_alloc(&f->w13, dt, 3, (int64_t[]){f->E, 2 * f->I, f->H}), MOE_OK);
    assert_int_equal(moe_tensor_alloc(&f->w2, dt, 3, (int64_t[]){f->E, f->H, f->I}), MOE_OK);
    assert_int_equal(moe_tensor_alloc(&f->router, MOE_DTYPE_F32, 2, (int64_t[]){f->E, f->H}), MOE_OK);
    fill(&f->w13, &r, 0.2f);
    fill(&f->w2, &r, 0.2f);
    fill(&f->router, &r, 0.3f);
    if (shared) {
        assert_int_equal(moe_tensor_alloc(&f->sw13, dt, 2, (int64_t[]){2 * f->Is, f->H}), MOE_OK);
        assert_int_equal(moe_tensor_alloc(&f->sw2, dt, 2, (int64_t[]){f->H, f->Is}), MOE_OK);
        assert_int_equal(moe_tensor_alloc(&f->sgate, dt, 1, (int64_t[]){f->H}), MOE_OK);
        fill(&f->sw13, &r, 0.2f);
        fill(&f->sw2, &r, 0.2f);
        fill(&f->sgate, &r, 0.2f);
    }
    f->route = kern_route_params_default(f->E, f->K);
    f->route.renormalize = true;
    if (grouped) { /* DeepSeek-V3 style */
        f->route.scoring = KERN_SCORE_SIGMOID;
        f->route.group_mode = KERN_GROUP_TOP2_SUM;
        f->route.n_group = 4;
        f->route.topk_group = 2;
        f->route.routed_scaling_factor = 2.5f;
        f->bias = malloc(sizeof(float) * (size_t)f->E);
        for (int32_t e = 0; e < f->E; e++)
            f->bias[e] = 0.05f * moe_rng_normal(&r);
    }
}

static void model_free(model_fixture *f) {
    moe_tensor_free(&f->w13);
    moe_tensor_free(&f->w2);
    moe_tensor_free(&f->router);
    moe_tensor_free(&f->sw13);
    moe_tensor_free(&f->sw2);
    moe_tensor_free(&f->sgate);
    free(f->bias);
}

/* The layer as rank r holds it under placement pl: its experts' weights copied out. */
static void layer_for_rank(const model_fixture *f, const par_placement *pl, int32_t r, eng_layer *l) {
    memset(l, 0, sizeof *l);
    const size_t es = moe_dtype_size(f->dt);
    int32_t nl = pl->n_local[r];
    assert_int_equal(moe_tensor_alloc(&l->w13, f->dt, 3, (int64_t[]){nl, 2 * f->I, f->H}), MOE_OK);
    assert_int_equal(moe_tensor_alloc(&l->w2, f->dt, 3, (int64_t[]){nl, f->H, f->I}), MOE_OK);
    size_t b13 = (size_t)(2 * f->I * f->H) * es, b2 = (size_t)(f->H * f->I) * es;
    for (int32_t s = 0; s < nl; s++) {
        int32_t e = pl->experts[r][s];
        memcpy((char *)l->w13.data + s * b13, (char *)f->w13.data + (size_t)e * b13, b13);
        memcpy((char *)l->w2.data + s * b2, (char *)f->w2.data + (size_t)e * b2, b2);
    }
    l->router = f->router;
    l->router.owns = false;
    l->correction_bias = f->bias;
    l->has_shared = f->sw13.data != NULL;
    if (l->has_shared) {
        l->shared_w13 = f->sw13;
        l->shared_w2 = f->sw2;
        l->shared_gate = f->sgate;
        l->shared_w13.owns = l->shared_w2.owns = l->shared_gate.owns = false;
    }
}

static void layer_free(eng_layer *l) {
    moe_tensor_free(&l->w13);
    moe_tensor_free(&l->w2);
}

/* Requests: three of T = 1, 5, 9 with ids, logits and hidden-only routing. */
typedef struct reqs_fixture {
    moe_tensor x[3], ids, w, logits;
    eng_step_req req[3];
} reqs_fixture;

static void reqs_init(reqs_fixture *q, const model_fixture *f, kern_ctx_t *ref) {
    moe_rng r;
    moe_rng_seed(&r, 99);
    const int64_t T[3] = {1, 5, 9};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(moe_tensor_alloc(&q->x[i], f->dt, 2, (int64_t[]){T[i], f->H}), MOE_OK);
        fill(&q->x[i], &r, 1.0f);
    }
    /* request 0 brings ids and weights (routed here by the reference on random logits) */
    moe_tensor lg0;
    assert_int_equal(moe_tensor_alloc(&lg0, MOE_DTYPE_F32, 2, (int64_t[]){T[0], f->E}), MOE_OK);
    fill(&lg0, &r, 1.0f);
    assert_int_equal(moe_tensor_alloc(&q->ids, MOE_DTYPE_I32, 2, (int64_t[]){T[0], f->K}), MOE_OK);
    assert_int_equal(moe_tensor_alloc(&q->w, MOE_DTYPE_F32, 2, (int64_t[]){T[0], f->K}), MOE_OK);
    kern_route_params rp = f->route;
    rp.correction_bias = f->bias;
    assert_int_equal(kern_route(ref, &rp, &lg0, &q->ids, &q->w), MOE_OK);
    moe_tensor_free(&lg0);
    /* request 1 brings logits */
    assert_int_equal(moe_tensor_alloc(&q->logits, MOE_DTYPE_F32, 2, (int64_t[]){T[1], f->E}), MOE_OK);
    fill(&q->logits, &r, 1.0f);
    q->req[0] = (eng_step_req){.n_tokens = T[0], .src = ENG_ROUTE_IDS, .x = q->x[0].data, .ids = q->ids.data, .weights = q->w.data};
    q->req[1] = (eng_step_req){.n_tokens = T[1], .src = ENG_ROUTE_LOGITS, .x = q->x[1].data, .logits = q->logits.data, .logits_dtype = MOE_DTYPE_F32};
    q->req[2] = (eng_step_req){.n_tokens = T[2], .src = ENG_ROUTE_HIDDEN, .x = q->x[2].data};
}

static void reqs_free(reqs_fixture *q) {
    for (int i = 0; i < 3; i++)
        moe_tensor_free(&q->x[i]);
    moe_tensor_free(&q->ids);
    moe_tensor_free(&q->w);
    moe_tensor_free(&q->logits);
}

/* Runs the step on W in-process ranks (each its own eng_step) and returns y (caller frees). */
static moe_tensor run_world(const model_fixture *f, const reqs_fixture *q, const eng_step_req *reqs, int nreq,
                            int32_t W, par_place_policy pol, kern_ctx_t *k, bool single) {
    par_placement pl;
    assert_int_equal(par_placement_init(&pl, f->E, W, pol), MOE_OK);
    (void)q;
    eng_step_model m = {.dtype = f->dt, .hidden = f->H, .n_experts = f->E, .top_k = f->K, .act = KERN_ACT_SILU,
                        .route = f->route, .placement = &pl};
    eng_layer layers[4];
    eng_step steps[4];
    const void *contribs[4];
    for (int32_t r = 0; r < W; r++) {
        layer_for_rank(f, &pl, r, &layers[r]);
        assert_int_equal(eng_step_init(&steps[r], &m, &layers[r], r, reqs, nreq, k), MOE_OK);
        if (!single) {
            assert_int_equal(eng_step_local(&steps[r], k), MOE_OK);
            contribs[r] = steps[r].contrib.data;
        }
    }
    if (single)
        assert_int_equal(eng_step_single(&steps[0], k), MOE_OK);
    else
        assert_int_equal(eng_step_combine(&steps[0], contribs, k), MOE_OK);
    moe_tensor y = steps[0].y;
    steps[0].y.data = NULL;
    steps[0].y.owns = false;
    for (int32_t r = 1; r < W; r++) { /* every rank routed the same */
        assert_memory_equal(steps[r].ids.data, steps[0].ids.data, moe_tensor_nbytes(&steps[0].ids));
        assert_memory_equal(steps[r].weights.data, steps[0].weights.data, moe_tensor_nbytes(&steps[0].weights));
    }
    for (int32_t r = 0; r < W; r++) {
        eng_step_free(&steps[r]);
        layer_free(&layers[r]);
    }
    par_placement_free(&pl);
    return y;
}

static void check_world_invariance(moe_dtype dt, bool shared, bool grouped, kern_backend b) {
    model_fixture f;
    model_init(&f, dt, shared, grouped);
    kern_ctx_t *k = NULL;
    assert_int_equal(kern_ctx_init(&k, b, NULL), MOE_OK);
    reqs_fixture q;
    reqs_init(&q, &f, k);
    moe_tensor base = run_world(&f, &q, q.req, 3, 1, PAR_PLACE_CONTIGUOUS, k, true);
    size_t nb = moe_tensor_nbytes(&base);
    /* no NaN, not all zero */
    double norm = 0;
    for (int64_t i = 0; i < moe_tensor_numel(&base); i++) {
        float v = moe_load_f32(dt, base.data, (size_t)i);
        assert_false(isnan(v) || isinf(v));
        norm += (double)v * v;
    }
    assert_true(norm > 0);
    for (int policy = 0; policy < 2; policy++) {
        for (int32_t W = 1; W <= 4; W++) {
            moe_tensor y = run_world(&f, &q, q.req, 3, W, (par_place_policy)policy, k, false);
            assert_memory_equal(y.data, base.data, nb);
            moe_tensor_free(&y);
        }
    }
    /* Each request alone gives its rows of the step, bit for bit. */
    int64_t off = 0;
    for (int i = 0; i < 3; i++) {
        moe_tensor y = run_world(&f, &q, &q.req[i], 1, 3, PAR_PLACE_ROUND_ROBIN, k, false);
        size_t rb = moe_tensor_nbytes(&y);
        assert_memory_equal(y.data, (char *)base.data + off, rb);
        off += (int64_t)rb;
        moe_tensor_free(&y);
    }
    /* And the step equals one direct call of the kernels on the concatenated, routed inputs. */
    par_placement pl;
    assert_int_equal(par_placement_init(&pl, f.E, 1, PAR_PLACE_CONTIGUOUS), MOE_OK);
    eng_step_model m = {.dtype = dt, .hidden = f.H, .n_experts = f.E, .top_k = f.K, .act = KERN_ACT_SILU,
                        .route = f.route, .placement = &pl};
    eng_layer l;
    layer_for_rank(&f, &pl, 0, &l);
    eng_step s;
    assert_int_equal(eng_step_init(&s, &m, &l, 0, q.req, 3, k), MOE_OK);
    moe_tensor y;
    assert_int_equal(moe_tensor_alloc(&y, dt, 2, (int64_t[]){s.n_tokens, f.H}), MOE_OK);
    kern_experts_params ep = {.n_experts = f.E, .n_local = f.E, .act = KERN_ACT_SILU};
    kern_shared_expert se = {.w13 = &f.sw13, .w2 = &f.sw2, .gate = &f.sgate, .act = KERN_ACT_SILU};
    assert_int_equal(kern_moe_forward(k, &ep, &s.x, &f.w13, &f.w2, &s.ids, &s.weights, shared ? &se : NULL, &y),
                     MOE_OK);
    assert_memory_equal(y.data, base.data, nb);
    moe_tensor_free(&y);
    eng_step_free(&s);
    layer_free(&l);
    par_placement_free(&pl);
    moe_tensor_free(&base);
    reqs_free(&q);
    kern_ctx_free(k);
    model_free(&f);
}

static void test_world_invariance_ref_f32(void **state) {
    (void)state;
    check_world_invariance(MOE_DTYPE_F32, true, false, KERN_BACKEND_CPU_REF);
}
static void test_world_invariance_ref_bf16_grouped(void **state) {
    (void)state;
    check_world_invariance(MOE_DTYPE_BF16, true, true, KERN_BACKEND_CPU_REF);
}
static void test_world_invariance_fast_bf16(void **state) {
    (void)state;
    check_world_invariance(MOE_DTYPE_BF16, true, false, KERN_BACKEND_CPU);
}
static void test_world_invariance_fast_noshared(void **state) {
    (void)state;
    check_world_invariance(MOE_DTYPE_F32, false, true, KERN_BACKEND_CPU);
}

static void test_hidden_without_router(void **state) {
    (void)state;
    model_fixture f;
    model_init(&f, MOE_DTYPE_F32, false, false);
    kern_ctx_t *k = NULL;
    assert_int_equal(kern_ctx_init(&k, KERN_BACKEND_CPU_REF, NULL), MOE_OK);
    par_placement pl;
    assert_int_equal(par_placement_init(&pl, f.E, 1, PAR_PLACE_CONTIGUOUS), MOE_OK);
    eng_step_model m = {.dtype = f.dt, .hidden = f.H, .n_experts = f.E, .top_k = f.K, .act = KERN_ACT_SILU,
                        .route = f.route, .placement = &pl};
    eng_layer l;
    layer_for_rank(&f, &pl, 0, &l);
    l.router.data = NULL;
    float x[40] = {0};
    eng_step_req req = {.n_tokens = 1, .src = ENG_ROUTE_HIDDEN, .x = x};
    eng_step s;
    assert_int_equal(eng_step_init(&s, &m, &l, 0, &req, 1, k), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_errmsg(), "no router weights"));
    layer_free(&l);
    par_placement_free(&pl);
    kern_ctx_free(k);
    model_free(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_world_invariance_ref_f32),
        cmocka_unit_test(test_world_invariance_ref_bf16_grouped),
        cmocka_unit_test(test_world_invariance_fast_bf16),
        cmocka_unit_test(test_world_invariance_fast_noshared),
        cmocka_unit_test(test_hidden_without_router),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
