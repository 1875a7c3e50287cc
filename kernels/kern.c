/*
 * kern.c: the backend-independent front of kernels/: context creation, the name tables, and
 * every argument check (shapes, dtypes, ranges, aliasing) done once here before a backend
 * runs. For host backends it also checks the data that decides memory accesses (expert ids,
 * the expert map) and the weights (finite), so a bad id is an error, never a wild read.
 *
 * Threads: stateless apart from the context passed in.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kernels/kern_impl.h"

static const kern_backend_ops *backend_ops(kern_backend b) {
    switch (b) {
    case KERN_BACKEND_CPU_REF:
        return &kern_cpu_ref_ops;
    case KERN_BACKEND_CPU:
        return &kern_cpu_ops;
    case KERN_BACKEND_CUDA:
        return &kern_cuda_ops;
    default:
        return NULL;
    }
}

const char *kern_backend_name(kern_backend b) {
    switch (b) {
    case KERN_BACKEND_CPU_REF:
        return "cpu-ref";
    case KERN_BACKEND_CPU:
        return "cpu";
    case KERN_BACKEND_CUDA:
        return "cuda";
    default:
        return "invalid";
    }
}

moe_status kern_backend_parse(const char *s, kern_backend *out) {
    if (!s || !out)
        return moe_fail(MOE_ERR_INVALID_ARG, "backend: missing");
    for (int b = 0; b < KERN_BACKEND_COUNT_; b++) {
        if (strcasecmp(s, kern_backend_name((kern_backend)b)) == 0) {
            *out = (kern_backend)b;
            return MOE_OK;
        }
    }
    if (strcasecmp(s, "gpu") == 0) {
        *out = KERN_BACKEND_CUDA;
        return MOE_OK;
    }
    return moe_fail(MOE_ERR_INVALID_ARG, "unknown backend '%.32s' (cpu-ref, cpu, cuda)", s);
}

const char *kern_op_name(kern_op op) {
    static const char *names[] = {"route", "fused_experts", "shared_expert", "moe_sum"};
    return (int)op >= 0 && op < KERN_OP_COUNT_ ? names[op] : "invalid";
}

const char *kern_act_name(kern_act a) {
    switch (a) {
    case KERN_ACT_SILU:
        return "silu";
    case KERN_ACT_GELU_TANH:
        return "gelu_tanh";
    case KERN_ACT_GELU:
        return "gelu";
    default:
        return "invalid";
    }
}

moe_status kern_act_parse(const char *s, kern_act *out) {
    static const struct {
        const char *name;
        kern_act a;
    } names[] = {
        {"silu", KERN_ACT_SILU},           {"swish", KERN_ACT_SILU},
        {"gelu_tanh", KERN_ACT_GELU_TANH}, {"gelu_pytorch_tanh", KERN_ACT_GELU_TANH},
        {"gelu_new", KERN_ACT_GELU_TANH},  {"gelu_fast", KERN_ACT_GELU_TANH},
        {"gelu", KERN_ACT_GELU},
    };
    if (!s || !out)
        return moe_fail(MOE_ERR_INVALID_ARG, "activation: missing");
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].a;
            return MOE_OK;
        }
    }
    return moe_fail(MOE_ERR_UNSUPPORTED, "activation '%.32s' not supported (silu, gelu, gelu_tanh)", s);
}

float kern_act_f32(kern_act a, float x) {
    switch (a) {
    case KERN_ACT_SILU:
        return x / (1.0f + expf(-x));
    case KERN_ACT_GELU_TANH: {
        const float k0 = 0.7978845608028654f; /* sqrt(2/pi) */
        return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
    }
    case KERN_ACT_GELU:
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    default:
        return NAN;
    }
}

/* ------------------------------------------------------------------------------------------
 * Contexts.
 * ---------------------------------------------------------------------------------------- */
moe_status kern_ctx_init(kern_ctx_t **out, kern_backend b, const kern_ctx_params *p) {
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "kern_ctx_init: NULL out");
    *out = NULL;
    const kern_backend_ops *ops = backend_ops(b);
    MOE_REQUIRE(ops, MOE_ERR_INVALID_ARG, "kern_ctx_init: invalid backend %d", (int)b);
    kern_ctx_t *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return moe_fail(MOE_ERR_NOMEM, "kern_ctx_init");
    ctx->ops = ops;
    ctx->kind = b;
    if (p)
        ctx->params = *p;
    moe_status st = ops->init(ctx);
    if (st != MOE_OK) {
        free(ctx);
        return st;
    }
    *out = ctx;
    return MOE_OK;
}

void kern_ctx_free(kern_ctx_t *ctx) {
    if (!ctx)
        return;
    if (ctx->ops->free)
        ctx->ops->free(ctx);
    free(ctx);
}

kern_backend kern_ctx_backend(const kern_ctx_t *ctx) { return ctx->kind; }

bool kern_ctx_supports(const kern_ctx_t *ctx, kern_op op, moe_dtype dt) {
    return ctx && ctx->ops->supports(ctx, op, dt);
}

moe_status kern_ctx_sync(kern_ctx_t *ctx) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "kern_ctx_sync: NULL context");
    return ctx->ops->sync ? ctx->ops->sync(ctx) : MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Argument checks.
 * ---------------------------------------------------------------------------------------- */
static moe_status check_float_act(const moe_tensor *t, const char *what) {
    if (!t)
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: missing tensor", what);
    if (!moe_dtype_is_float(t->dtype))
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: dtype %s is not a float type (f32, f16, bf16)", what,
                        moe_dtype_name(t->dtype));
    return MOE_OK;
}

static moe_status check_support(const kern_ctx_t *ctx, kern_op op, moe_dtype dt) {
    if (!ctx->ops->supports(ctx, op, dt))
        return moe_fail(MOE_ERR_UNSUPPORTED, "backend %s does not support %s on %s", ctx->ops->name,
                        kern_op_name(op), moe_dtype_name(dt));
    return MOE_OK;
}

/* The output must not overlap any input (nin inputs, NULL entries skipped). */
static moe_status check_no_alias(const moe_tensor *out, const char *out_name, const moe_tensor *const *ins,
                                 const char *const *names, int nin) {
    for (int i = 0; i < nin; i++) {
        if (ins[i] && moe_tensors_overlap(out, ins[i]))
            return moe_fail(MOE_ERR_ALIAS, "%s overlaps input %s: fused experts are out-of-place", out_name, names[i]);
    }
    return MOE_OK;
}

moe_status kern_route_params_check(const kern_route_params *p) {
    MOE_REQUIRE(p, MOE_ERR_INVALID_ARG, "route: NULL params");
    MOE_REQUIRE(p->n_experts >= 1, MOE_ERR_INVALID_ARG, "route: n_experts %d < 1", (int)p->n_experts);
    MOE_REQUIRE(p->top_k >= 1 && p->top_k <= p->n_experts, MOE_ERR_INVALID_ARG,
                "route: top_k %d not in [1, n_experts = %d]", (int)p->top_k, (int)p->n_experts);
    MOE_REQUIRE(p->scoring == KERN_SCORE_SOFTMAX || p->scoring == KERN_SCORE_SIGMOID, MOE_ERR_INVALID_ARG,
                "route: unknown scoring function %d", (int)p->scoring);
    MOE_REQUIRE(isfinite(p->routed_scaling_factor) && p->routed_scaling_factor > 0.0f, MOE_ERR_INVALID_ARG,
                "route: routed_scaling_factor %g must be finite and > 0", (double)p->routed_scaling_factor);
    switch (p->group_mode) {
    case KERN_GROUP_NONE:
        break;
    case KERN_GROUP_MAX:
    case KERN_GROUP_TOP2_SUM: {
        MOE_REQUIRE(p->n_group >= 1 && p->n_experts % p->n_group == 0, MOE_ERR_INVALID_ARG,
                    "route: n_group %d does not divide n_experts %d", (int)p->n_group, (int)p->n_experts);
        MOE_REQUIRE(p->topk_group >= 1 && p->topk_group <= p->n_group, MOE_ERR_INVALID_ARG,
                    "route: topk_group %d not in [1, n_group = %d]", (int)p->topk_group, (int)p->n_group);
        int32_t per = p->n_experts / p->n_group;
        MOE_REQUIRE(p->top_k <= p->topk_group * per, MOE_ERR_INVALID_ARG,
                    "route: top_k %d exceeds the %d experts of the %d kept groups", (int)p->top_k,
                    (int)(p->topk_group * per), (int)p->topk_group);
        MOE_REQUIRE(p->group_mode != KERN_GROUP_TOP2_SUM || per >= 2, MOE_ERR_INVALID_ARG,
                    "route: top-2-sum group scores need >= 2 experts per group (have %d)", (int)per);
        break;
    }
    default:
        return moe_fail(MOE_ERR_INVALID_ARG, "route: unknown group mode %d", (int)p->group_mode);
    }
    return MOE_OK;
}

kern_route_params kern_route_params_default(int32_t n_experts, int32_t top_k) {
    kern_route_params p;
    memset(&p, 0, sizeof p);
    p.n_experts = n_experts;
    p.top_k = top_k;
    p.scoring = KERN_SCORE_SOFTMAX;
    p.group_mode = KERN_GROUP_NONE;
    p.n_group = 1;
    p.topk_group = 1;
    p.renormalize = false;
    p.routed_scaling_factor = 1.0f;
    p.correction_bias = NULL;
    return p;
}

moe_status kern_route(kern_ctx_t *ctx, const kern_route_params *p, const moe_tensor *logits, moe_tensor *topk_ids,
                      moe_tensor *topk_w) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "route: NULL context");
    MOE_CHECK(kern_route_params_check(p));
    MOE_CHECK(check_float_act(logits, "route: logits"));
    MOE_CHECK(moe_tensor_expect(logits, "route: logits", logits->dtype, 2, (int64_t[]){-1, p->n_experts}));
    int64_t T = logits->shape[0];
    MOE_CHECK(moe_tensor_expect(topk_ids, "route: topk_ids", MOE_DTYPE_I32, 2, (int64_t[]){T, p->top_k}));
    MOE_CHECK(moe_tensor_expect(topk_w, "route: topk_w", MOE_DTYPE_F32, 2, (int64_t[]){T, p->top_k}));
    MOE_CHECK(check_support(ctx, KERN_OP_ROUTE, logits->dtype));
    moe_tensor bias = moe_tensor_view1((void *)p->correction_bias, MOE_DTYPE_F32, p->n_experts);
    const moe_tensor *ins[] = {logits, p->correction_bias ? &bias : NULL};
    const char *names[] = {"logits", "correction_bias"};
    MOE_CHECK(check_no_alias(topk_ids, "topk_ids", ins, names, 2));
    MOE_CHECK(check_no_alias(topk_w, "topk_w", ins, names, 2));
    if (moe_tensors_overlap(topk_ids, topk_w))
        return moe_fail(MOE_ERR_ALIAS, "route: topk_ids overlaps topk_w");
    if (T == 0)
        return MOE_OK;
    return ctx->ops->route(ctx, p, logits, topk_ids, topk_w);
}

/* Shapes and dtypes of a fused-experts call; `slot_mode_ok` allows y [T, K, H]. */
static moe_status check_experts_args(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                     const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                     const moe_tensor *w, const moe_tensor *y, bool slot_mode_ok) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "fused_experts: NULL context");
    MOE_REQUIRE(p, MOE_ERR_INVALID_ARG, "fused_experts: NULL params");
    MOE_REQUIRE(p->n_experts >= 1, MOE_ERR_INVALID_ARG, "fused_experts: n_experts %d < 1", (int)p->n_experts);
    MOE_REQUIRE(p->n_local >= 0 && p->n_local <= p->n_experts, MOE_ERR_INVALID_ARG,
                "fused_experts: n_local %d not in [0, n_experts = %d]", (int)p->n_local, (int)p->n_experts);
    MOE_REQUIRE(p->expert_map || p->n_local == p->n_experts, MOE_ERR_INVALID_ARG,
                "fused_experts: without an expert map n_local (%d) must equal n_experts (%d)", (int)p->n_local,
                (int)p->n_experts);
    MOE_REQUIRE(p->act == KERN_ACT_SILU || p->act == KERN_ACT_GELU_TANH || p->act == KERN_ACT_GELU,
                MOE_ERR_INVALID_ARG, "fused_experts: unknown activation %d", (int)p->act);
    MOE_CHECK(check_float_act(x, "fused_experts: x"));
    moe_dtype dt = x->dtype;
    MOE_CHECK(moe_tensor_expect(x, "fused_experts: x", dt, 2, NULL));
    int64_t T = x->shape[0], H = x->shape[1];
    MOE_REQUIRE(H >= 1, MOE_ERR_INVALID_ARG, "fused_experts: hidden size %lld < 1", (long long)H);
    MOE_CHECK(moe_tensor_expect(w13, "fused_experts: w13", dt, 3, (int64_t[]){p->n_local, -1, H}));
    int64_t I2 = w13->shape[1];
    MOE_REQUIRE(I2 >= 2 && I2 % 2 == 0, MOE_ERR_INVALID_ARG,
                "fused_experts: w13 second dimension %lld must be 2*I with I >= 1", (long long)I2);
    int64_t I = I2 / 2;
    MOE_CHECK(moe_tensor_expect(w2, "fused_experts: w2", dt, 3, (int64_t[]){p->n_local, H, I}));
    MOE_CHECK(moe_tensor_expect(ids, "fused_experts: topk_ids", MOE_DTYPE_I32, 2, (int64_t[]){T, -1}));
    int64_t K = ids->shape[1];
    MOE_REQUIRE(K >= 1 && K <= p->n_experts, MOE_ERR_INVALID_ARG, "fused_experts: top-k %lld not in [1, %d]",
                (long long)K, (int)p->n_experts);
    MOE_CHECK(moe_tensor_expect(w, "fused_experts: topk_w", MOE_DTYPE_F32, 2, (int64_t[]){T, K}));
    if (!y)
        return moe_fail(MOE_ERR_INVALID_ARG, "fused_experts: missing output");
    if (slot_mode_ok && y->ndim == 3)
        MOE_CHECK(moe_tensor_expect(y, "fused_experts: y (slot mode)", dt, 3, (int64_t[]){T, K, H}));
    else
        MOE_CHECK(moe_tensor_expect(y, "fused_experts: y", dt, 2, (int64_t[]){T, H}));
    MOE_CHECK(check_support(ctx, KERN_OP_FUSED_EXPERTS, dt));

    moe_tensor map = moe_tensor_view1((void *)p->expert_map, MOE_DTYPE_I32, p->n_experts);
    const moe_tensor *ins[] = {x, w13, w2, ids, w, p->expert_map ? &map : NULL};
    const char *names[] = {"x", "w13", "w2", "topk_ids", "topk_w", "expert_map"};
    MOE_CHECK(check_no_alias(y, "output y", ins, names, 6));

    if (ctx->ops->host_data) {
        if (p->expert_map) {
            for (int32_t e = 0; e < p->n_experts; e++) {
                int32_t s = p->expert_map[e];
                MOE_REQUIRE(s >= -1 && s < p->n_local, MOE_ERR_INVALID_ARG,
                            "fused_experts: expert_map[%d] = %d not in [-1, n_local = %d)", (int)e, (int)s,
                            (int)p->n_local);
            }
        }
        const int32_t *id = ids->data;
        const float *wt = w->data;
        for (int64_t i = 0; i < T * K; i++) {
            MOE_REQUIRE(id[i] >= 0 && id[i] < p->n_experts, MOE_ERR_INVALID_ARG,
                        "fused_experts: expert id %d out of range [0, %d) at token %lld, slot %lld", (int)id[i],
                        (int)p->n_experts, (long long)(i / K), (long long)(i % K));
            MOE_REQUIRE(isfinite(wt[i]), MOE_ERR_INVALID_ARG,
                        "fused_experts: routing weight %g is not finite at token %lld, slot %lld", (double)wt[i],
                        (long long)(i / K), (long long)(i % K));
        }
    }
    return MOE_OK;
}

moe_status kern_fused_experts(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                              const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *topk_ids,
                              const moe_tensor *topk_w, moe_tensor *y) {
    MOE_CHECK(check_experts_args(ctx, p, x, w13, w2, topk_ids, topk_w, y, true));
    if (x->shape[0] == 0)
        return MOE_OK;
    return ctx->ops->fused_experts(ctx, p, x, w13, w2, topk_ids, topk_w, y);
}

static moe_status check_shared_args(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x) {
    MOE_REQUIRE(se, MOE_ERR_INVALID_ARG, "shared_expert: NULL description");
    MOE_CHECK(check_float_act(x, "shared_expert: x"));
    moe_dtype dt = x->dtype;
    MOE_CHECK(moe_tensor_expect(x, "shared_expert: x", dt, 2, NULL));
    int64_t H = x->shape[1];
    MOE_CHECK(moe_tensor_expect(se->w13, "shared_expert: w13", dt, 2, (int64_t[]){-1, H}));
    int64_t I2 = se->w13->shape[0];
    MOE_REQUIRE(I2 >= 2 && I2 % 2 == 0, MOE_ERR_INVALID_ARG,
                "shared_expert: w13 first dimension %lld must be 2*I with I >= 1", (long long)I2);
    MOE_CHECK(moe_tensor_expect(se->w2, "shared_expert: w2", dt, 2, (int64_t[]){H, I2 / 2}));
    if (se->gate)
        MOE_CHECK(moe_tensor_expect(se->gate, "shared_expert: gate", dt, 1, (int64_t[]){H}));
    MOE_REQUIRE(se->act == KERN_ACT_SILU || se->act == KERN_ACT_GELU_TANH || se->act == KERN_ACT_GELU,
                MOE_ERR_INVALID_ARG, "shared_expert: unknown activation %d", (int)se->act);
    MOE_CHECK(check_support(ctx, KERN_OP_SHARED_EXPERT, dt));
    return MOE_OK;
}

moe_status kern_shared_expert_forward(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x,
                                      moe_tensor *s) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "shared_expert: NULL context");
    MOE_CHECK(check_shared_args(ctx, se, x));
    MOE_CHECK(moe_tensor_expect(s, "shared_expert: output", x->dtype, 2, x->shape));
    const moe_tensor *ins[] = {x, se->w13, se->w2, se->gate};
    const char *names[] = {"x", "shared w13", "shared w2", "shared gate"};
    MOE_CHECK(check_no_alias(s, "shared output", ins, names, 4));
    if (x->shape[0] == 0)
        return MOE_OK;
    return ctx->ops->shared_expert(ctx, se, x, s);
}

moe_status kern_moe_sum(kern_ctx_t *ctx, const moe_tensor *slots, const moe_tensor *shared, moe_tensor *y) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "moe_sum: NULL context");
    MOE_CHECK(check_float_act(slots, "moe_sum: slots"));
    MOE_CHECK(moe_tensor_expect(slots, "moe_sum: slots", slots->dtype, 3, NULL));
    int64_t T = slots->shape[0], H = slots->shape[2];
    if (shared)
        MOE_CHECK(moe_tensor_expect(shared, "moe_sum: shared", slots->dtype, 2, (int64_t[]){T, H}));
    MOE_CHECK(moe_tensor_expect(y, "moe_sum: y", slots->dtype, 2, (int64_t[]){T, H}));
    MOE_CHECK(check_support(ctx, KERN_OP_MOE_SUM, slots->dtype));
    const moe_tensor *ins[] = {slots, shared};
    const char *names[] = {"slots", "shared"};
    MOE_CHECK(check_no_alias(y, "output y", ins, names, 2));
    if (T == 0)
        return MOE_OK;
    return ctx->ops->moe_sum(ctx, slots, shared, y);
}

moe_status kern_moe_forward(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                            const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *topk_ids,
                            const moe_tensor *topk_w, const kern_shared_expert *se, moe_tensor *y) {
    MOE_CHECK(check_experts_args(ctx, p, x, w13, w2, topk_ids, topk_w, y, false));
    if (se) {
        MOE_CHECK(check_shared_args(ctx, se, x));
        const moe_tensor *ins[] = {se->w13, se->w2, se->gate};
        const char *names[] = {"shared w13", "shared w2", "shared gate"};
        MOE_CHECK(check_no_alias(y, "output y", ins, names, 3));
    }
    int64_t T = x->shape[0], K = topk_ids->shape[1], H = x->shape[1];
    if (T == 0)
        return MOE_OK;
    if (ctx->ops->moe_forward)
        return ctx->ops->moe_forward(ctx, p, x, w13, w2, topk_ids, topk_w, se, y);
    if (!se)
        return ctx->ops->fused_experts(ctx, p, x, w13, w2, topk_ids, topk_w, y);

    /* Composition on a host backend: slots, shared output, fixed-order sum. */
    MOE_REQUIRE(ctx->ops->host_data, MOE_ERR_INTERNAL, "moe_forward: backend %s must implement moe_forward",
                ctx->ops->name);
    moe_status st = MOE_OK;
    moe_tensor slots = {0}, s = {0};
    MOE_CHECK_GOTO(moe_tensor_alloc(&slots, x->dtype, 3, (int64_t[]){T, K, H}), st, done);
    MOE_CHECK_GOTO(moe_tensor_alloc(&s, x->dtype, 2, (int64_t[]){T, H}), st, done);
    MOE_CHECK_GOTO(ctx->ops->fused_experts(ctx, p, x, w13, w2, topk_ids, topk_w, &slots), st, done);
    MOE_CHECK_GOTO(ctx->ops->shared_expert(ctx, se, x, &s), st, done);
    MOE_CHECK_GOTO(ctx->ops->moe_sum(ctx, &slots, &s, y), st, done);
done:
    moe_tensor_free(&slots);
    moe_tensor_free(&s);
    return st;
}

moe_status kern_router_logits(kern_ctx_t *ctx, const moe_tensor *x, const moe_tensor *router, moe_tensor *logits) {
    MOE_REQUIRE(ctx, MOE_ERR_INVALID_ARG, "router_logits: NULL context");
    MOE_CHECK(check_float_act(x, "router_logits: x"));
    MOE_CHECK(moe_tensor_expect(x, "router_logits: x", x->dtype, 2, NULL));
    const int64_t T = x->shape[0], H = x->shape[1];
    MOE_CHECK(moe_tensor_expect(router, "router_logits: router", MOE_DTYPE_F32, 2, (int64_t[]){-1, H}));
    const int64_t E = router->shape[0];
    MOE_REQUIRE(E >= 1, MOE_ERR_INVALID_ARG, "router_logits: router has no expert");
    MOE_CHECK(moe_tensor_expect(logits, "router_logits: logits", MOE_DTYPE_F32, 2, (int64_t[]){T, E}));
    const moe_tensor *ins[] = {x, router};
    const char *names[] = {"x", "router"};
    MOE_CHECK(check_no_alias(logits, "logits", ins, names, 2));
    if (T == 0)
        return MOE_OK;
    if (ctx->ops->router_logits)
        return ctx->ops->router_logits(ctx, x, router, logits);
    MOE_REQUIRE(ctx->ops->host_data, MOE_ERR_UNSUPPORTED, "backend %s has no router_logits", ctx->ops->name);
    /* Host backends: one fixed-order dot product per logit (h = 0 .. H-1). */
    float *xr = malloc(sizeof(float) * (size_t)H);
    if (!xr)
        return moe_fail(MOE_ERR_NOMEM, "router_logits");
    const float *rw = router->data;
    float *out = logits->data;
    const size_t es = moe_dtype_size(x->dtype);
    for (int64_t t = 0; t < T; t++) {
        moe_to_f32(x->dtype, (const char *)x->data + (size_t)(t * H) * es, xr, (size_t)H);
        for (int64_t e = 0; e < E; e++) {
            const float *r = rw + e * H;
            float acc = 0.0f;
            for (int64_t h = 0; h < H; h++)
                acc += xr[h] * r[h];
            out[t * E + e] = acc;
        }
    }
    free(xr);
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Host helpers.
 * ---------------------------------------------------------------------------------------- */
int32_t kern_topk_indices(const float *v, const bool *keep, int32_t n, int32_t k, int32_t *out) {
    int32_t got = 0;
    for (int32_t j = 0; j < k; j++) {
        int32_t best = -1;
        for (int32_t i = 0; i < n; i++) {
            if (keep && !keep[i])
                continue;
            bool taken = false;
            for (int32_t q = 0; q < got; q++)
                if (out[q] == i) {
                    taken = true;
                    break;
                }
            if (taken)
                continue;
            /* strictly greater: the first (lowest index) of equal values wins; NaN never wins
             * over a number, but a NaN entry is still taken when nothing else is left */
            if (best < 0 || v[i] > v[best] || (isnan(v[best]) && !isnan(v[i])))
                best = i;
        }
        if (best < 0)
            break;
        out[got++] = best;
    }
    return got;
}
