/*
 * step.h: the computation of one step on the workers, without the transport: routing (where
 * the requests did not bring ids), the combine plan, each rank's local contributions, and the
 * answering rank's combine (shared expert + fixed-order sum). The worker's step loop (worker.c)
 * moves the bytes between these calls; tests call them directly to check that the result is
 * the same bit for bit for every world size and placement.
 *
 * Threads: a step belongs to the worker's step loop thread. Weights are read-only.
 */
#ifndef ENG_STEP_H
#define ENG_STEP_H

#include "engine/base/moe_base.h"
#include "kernels/kern.h"
#include "parallel/par.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One MoE layer as a rank holds it (host memory for CPU backends). */
typedef struct eng_layer {
    int32_t layer;             /* index in the model */
    moe_tensor w13;            /* [E_local, 2I, H] */
    moe_tensor w2;             /* [E_local, H, I] */
    moe_tensor router;         /* [E, H] fp32 (as the loader gives it), or data == NULL when the rank
                                  cannot route */
    float *correction_bias;    /* [E] or NULL */
    bool has_shared;           /* shared expert present (used by the answering rank) */
    moe_tensor shared_w13;     /* [2I_s, H] */
    moe_tensor shared_w2;      /* [H, I_s] */
    moe_tensor shared_gate;    /* [H] or data == NULL */
} eng_layer;

/* What every rank needs to know about the model to run a step. */
typedef struct eng_step_model {
    moe_dtype dtype;
    int32_t hidden;            /* H */
    int32_t n_experts;         /* E */
    int32_t top_k;             /* K */
    kern_act act;
    kern_route_params route;   /* routing of the model (correction_bias filled per layer) */
    const par_placement *placement;
} eng_step_model;

typedef enum eng_route_src {
    ENG_ROUTE_IDS = 0,    /* the client sent topk_ids and topk_w */
    ENG_ROUTE_LOGITS = 1, /* the client sent router logits [T, E] */
    ENG_ROUTE_HIDDEN = 2  /* the engine computes logits = x . router^T */
} eng_route_src;

/* One request's part of a step: views into the request message (validated by the decoder). */
typedef struct eng_step_req {
    int64_t n_tokens;
    eng_route_src src;
    const void *x;         /* [T, H] model dtype */
    const int32_t *ids;    /* [T, K] (ENG_ROUTE_IDS) */
    const float *weights;  /* [T, K] (ENG_ROUTE_IDS) */
    const void *logits;    /* [T, E] (ENG_ROUTE_LOGITS) */
    moe_dtype logits_dtype;
} eng_step_req;

typedef struct eng_step {
    const eng_step_model *model;
    const eng_layer *layer;
    int32_t rank;
    int64_t n_tokens;       /* T: all requests */
    moe_tensor x;           /* [T, H] */
    moe_tensor ids;         /* [T, K] i32 */
    moe_tensor weights;     /* [T, K] f32 */
    par_combine_plan plan;
    moe_tensor contrib;     /* [n_pairs(rank), H]: this rank's contributions, canonical order */
    moe_tensor y;           /* [T, H] on the answering rank after eng_step_combine */
    int64_t *expert_tokens; /* [E] tokens routed to each expert (every rank; stats) */
} eng_step;

/* Concatenates the requests, routes what needs routing, builds the plan. Every rank calls it
 * with the same requests and gets the same ids, weights and plan. */
moe_status eng_step_init(eng_step *s, const eng_step_model *m, const eng_layer *layer, int32_t rank,
                         const eng_step_req *reqs, int32_t n_reqs, kern_ctx_t *kctx);
/* This rank's contributions into s->contrib. */
moe_status eng_step_local(eng_step *s, kern_ctx_t *kctx);
/* On the answering rank: contribs[r] holds rank r's contributions ([plan.n_pairs[r], H]);
 * runs the shared expert and the fixed-order sum into s->y. */
moe_status eng_step_combine(eng_step *s, const void *const *contribs, kern_ctx_t *kctx);
/* World size 1, no transport: the unwrapped call (kern_moe_forward) straight into s->y. */
moe_status eng_step_single(eng_step *s, kern_ctx_t *kctx);
void eng_step_free(eng_step *s);

#ifdef __cplusplus
}
#endif
#endif /* ENG_STEP_H */
