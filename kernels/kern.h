/*
 * kern.h: the public face of kernels/, the math of a MoE layer behind one C interface that
 * every backend implements (ggml's manner: one table of functions per backend, a query of
 * what each supports, one test program that runs every op on every backend).
 *
 * Backends:
 *   KERN_BACKEND_CPU_REF  plain loops, easy to read: the reference for everything else
 *   KERN_BACKEND_CPU      fast CPU: rows grouped by expert, OpenBLAS products, all cores
 *   KERN_BACKEND_CUDA     NVIDIA GPUs (Hopper sm_90a first, sm_80 too); tensors in device memory
 *
 * Threads: a kern_ctx_t belongs to one thread at a time (it owns scratch memory and, for CUDA,
 * a stream). Several contexts may share read-only weights.
 *
 * Numerics, the same for every backend (the CUDA backend matches the CPU within the dtype's
 * tolerance; bit-exactness is promised only within one backend):
 *   - routing in fp32 from logits of any float dtype; ties broken by the lower expert id (and,
 *     for group selection, the lower group id);
 *   - products accumulate in fp32; the gated activation a = act(gate) * up is computed in fp32
 *     and rounded to the activation dtype (the dtype of x) before the down product;
 *   - each (token, slot) contribution c = w * (W2 a) (or W2 a when the weight went on the input)
 *     is rounded to the activation dtype;
 *   - the sum over the top-k slots is done in fp32, in slot order k = 0 .. K-1, starting from
 *     +0.0, then (where a shared-expert output s is given) + s, and rounded once to the output
 *     dtype. This fixed order is what makes a result independent of placement and world size:
 *     a rank can produce per-slot contributions (KERN slot mode below) and another sums them
 *     with kern_moe_sum, giving the same bits as one rank doing everything.
 *   - a row's result never depends on the other rows of the batch.
 *
 * Out-of-place: every output is a distinct buffer; an output that overlaps any input is
 * MOE_ERR_ALIAS and nothing is written. Any error found before the work starts (shapes,
 * dtypes, aliasing; on host backends also ids, the map and the weights): nothing is written.
 * The exception is what only a device can see: the CUDA backend checks ids, map entries and
 * weights on the device without a host synchronization, skips a bad pair (it never reads or
 * writes out of bounds) and reports MOE_ERR_INVALID_ARG from kern_ctx_sync or the next call;
 * the outputs of that call are then written but must not be used. The engine validates every
 * id and weight at the protocol, before a step, so its requests never reach that case.
 */
#ifndef KERN_KERN_H
#define KERN_KERN_H

#include "engine/base/moe_base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kern_backend {
    KERN_BACKEND_CPU_REF = 0,
    KERN_BACKEND_CPU = 1,
    KERN_BACKEND_CUDA = 2,
    KERN_BACKEND_COUNT_
} kern_backend;

const char *kern_backend_name(kern_backend b); /* "cpu-ref", "cpu", "cuda" */
moe_status kern_backend_parse(const char *s, kern_backend *out);

typedef enum kern_op {
    KERN_OP_ROUTE = 0,
    KERN_OP_FUSED_EXPERTS = 1,
    KERN_OP_SHARED_EXPERT = 2,
    KERN_OP_MOE_SUM = 3,
    KERN_OP_COUNT_
} kern_op;

const char *kern_op_name(kern_op op);

/* Options of a context. */
typedef struct kern_ctx_params {
    int32_t device;     /* CUDA device ordinal; ignored by CPU backends */
    int32_t n_threads;  /* CPU: worker threads (0 = all online cores); ignored by CUDA */
    void *stream;       /* CUDA: a cudaStream_t to run on (NULL = the context makes its own) */
} kern_ctx_params;

typedef struct kern_ctx kern_ctx_t; /* opaque */

/* MOE_ERR_UNSUPPORTED when the backend was not built (CUDA without nvcc) or finds no device. */
moe_status kern_ctx_init(kern_ctx_t **out, kern_backend b, const kern_ctx_params *p);
void kern_ctx_free(kern_ctx_t *ctx);
kern_backend kern_ctx_backend(const kern_ctx_t *ctx);
/* Whether `ctx` implements `op` for activations (x, logits) of dtype `dt`. */
bool kern_ctx_supports(const kern_ctx_t *ctx, kern_op op, moe_dtype dt);
/* Waits for the context's queued work (CUDA: its stream); no-op on CPU backends. */
moe_status kern_ctx_sync(kern_ctx_t *ctx);

/* ------------------------------------------------------------------------------------------
 * Routing: router logits [T, E] -> topk_ids [T, K] (int32), topk_w [T, K] (fp32).
 *
 *   scores  = softmax(logits) over E, or sigmoid(logits) elementwise
 *   choice  = scores + correction_bias (when given; used for selection only)
 *   groups  (n_group > 1): E experts in n_group contiguous groups; a group's score is the max
 *           of its choice values (KERN_GROUP_MAX, DeepSeek-V2 group_limited_greedy) or the sum
 *           of its top-2 choice values (KERN_GROUP_TOP2_SUM, DeepSeek-V3 noaux_tc); the
 *           topk_group best groups are kept, the experts of the others are excluded
 *   ids     = the K largest choice values among the kept experts, in descending order
 *   w       = scores[ids] (unbiased); if renormalize, w /= sum(w) (when the sum is > 0);
 *             then w *= routed_scaling_factor
 * Ties: equal values go to the lower expert id (lower group id for groups).
 * ---------------------------------------------------------------------------------------- */
typedef enum kern_score_func {
    KERN_SCORE_SOFTMAX = 0,
    KERN_SCORE_SIGMOID = 1
} kern_score_func;

typedef enum kern_group_mode {
    KERN_GROUP_NONE = 0,
    KERN_GROUP_MAX = 1,      /* DeepSeek-V2: group score = max */
    KERN_GROUP_TOP2_SUM = 2  /* DeepSeek-V3: group score = sum of the group's top 2 */
} kern_group_mode;

typedef struct kern_route_params {
    int32_t n_experts;             /* E: must equal logits' second dimension */
    int32_t top_k;                 /* K: 1 <= K <= E (and <= topk_group * E / n_group) */
    kern_score_func scoring;
    kern_group_mode group_mode;
    int32_t n_group;               /* groups (> 1 with a group mode); must divide E */
    int32_t topk_group;            /* 1 <= topk_group <= n_group */
    bool renormalize;
    float routed_scaling_factor;   /* 1.0 for none; must be finite and > 0 */
    const float *correction_bias;  /* [E] fp32 or NULL (backend memory: device for CUDA) */
} kern_route_params;

/* A params struct with neutral defaults (softmax, no groups, no renormalize, scaling 1). */
kern_route_params kern_route_params_default(int32_t n_experts, int32_t top_k);
/* Checks the parameters alone (no tensors). */
moe_status kern_route_params_check(const kern_route_params *p);

moe_status kern_route(kern_ctx_t *ctx, const kern_route_params *p, const moe_tensor *logits,
                      moe_tensor *topk_ids, moe_tensor *topk_w);

/* ------------------------------------------------------------------------------------------
 * Fused experts: for each token t and slot k with local slot e = map(topk_ids[t, k]) >= 0,
 *   h   = x[t] (times topk_w[t, k] when weight_on_input)
 *   a   = act(W1_e h) * (W3_e h)             W1 = w13[e, 0:I, :], W3 = w13[e, I:2I, :]
 *   c   = W2_e a (times topk_w[t, k] unless weight_on_input)    W2 = w2[e] : [H, I]
 * Output y (dtype of x):
 *   y [T, H]:     y[t] = sum over k (slot order) of c[t, k], slots with map < 0 contribute
 *                 nothing (sum mode);
 *   y [T, K, H]:  y[t, k] = c[t, k], and exactly +0.0 where map < 0 (slot mode: per-slot
 *                 contributions for a combine on another rank); with slots_local_only the
 *                 rows where map < 0 are unspecified: the CUDA backend leaves them as they
 *                 are (a caller that fills them itself or never reads them saves writing
 *                 T K H zeros), the CPU backends still write the zeros.
 * The expert map takes global ids (0 <= id < n_experts, checked) to local slots; NULL means
 * identity (then n_local == n_experts). Ids are checked: out of range is MOE_ERR_INVALID_ARG
 * naming the token and slot. Weights must be finite.
 * ---------------------------------------------------------------------------------------- */
typedef enum kern_act {
    KERN_ACT_SILU = 0,
    KERN_ACT_GELU_TANH = 1, /* gelu with the tanh approximation ("gelu_pytorch_tanh") */
    KERN_ACT_GELU = 2       /* exact gelu (erf) */
} kern_act;

const char *kern_act_name(kern_act a);
moe_status kern_act_parse(const char *s, kern_act *out); /* "silu", "gelu_tanh", "gelu", ... */

typedef struct kern_experts_params {
    int32_t n_experts;         /* E: the global id range */
    int32_t n_local;           /* E_local: w13/w2 first dimension */
    const int32_t *expert_map; /* [E] global -> local slot or -1; NULL = identity. Host memory
                                  for CPU backends, device memory for CUDA. */
    kern_act act;
    bool weight_on_input;      /* apply topk_w to x instead of to the output */
    bool slots_local_only;     /* slot mode: the rows of pairs not held here may be left untouched */
} kern_experts_params;

/*
 * x [T, H] (bf16/f16/f32), w13 [E_local, 2I, H] and w2 [E_local, H, I] of x's dtype,
 * topk_ids [T, K] int32, topk_w [T, K] fp32, y [T, H] or [T, K, H] of x's dtype (fresh).
 */
moe_status kern_fused_experts(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                              const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *topk_ids,
                              const moe_tensor *topk_w, moe_tensor *y);

/* ------------------------------------------------------------------------------------------
 * Shared expert: a dense gated MLP on every token,
 *   s[t] = g(t) * W2 (act(W1 x[t]) * (W3 x[t])),  W13 = w13 [2I_s, H], W2 = w2 [H, I_s]
 * with g(t) = sigmoid(x[t] . gate) when gate [H] is given (Qwen2-MoE shared_expert_gate), else
 * 1. The activation a is rounded to x's dtype as above; s is written in x's dtype. Several
 * shared experts (DeepSeek n_shared_experts) are one expert of I_s = n * moe_intermediate.
 * ---------------------------------------------------------------------------------------- */
typedef struct kern_shared_expert {
    const moe_tensor *w13;  /* [2*I_s, H] */
    const moe_tensor *w2;   /* [H, I_s] */
    const moe_tensor *gate; /* [H] (same dtype), or NULL */
    kern_act act;
} kern_shared_expert;

moe_status kern_shared_expert_forward(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x,
                                      moe_tensor *s);

/* ------------------------------------------------------------------------------------------
 * The sum over slots, in fixed order: y[t] = round(sum_k slots[t, k] + shared[t]) with
 * slots [T, K, H], shared [T, H] or NULL, y [T, H], all of one float dtype. The combine of a
 * multi-rank step uses it, and kern_fused_experts' sum mode is defined to equal it.
 * ---------------------------------------------------------------------------------------- */
moe_status kern_moe_sum(kern_ctx_t *ctx, const moe_tensor *slots, const moe_tensor *shared, moe_tensor *y);

/* ------------------------------------------------------------------------------------------
 * A whole MoE layer in one call: routed experts (sum mode) plus the shared expert (when
 * `se` is non-NULL), y = sum_k c[t, k] + s[t] with the fixed order above. Routing is the
 * caller's (kern_route) so that ids and weights can come from a client.
 * ---------------------------------------------------------------------------------------- */
moe_status kern_moe_forward(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                            const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *topk_ids,
                            const moe_tensor *topk_w, const kern_shared_expert *se, moe_tensor *y);

/* ------------------------------------------------------------------------------------------
 * Router logits from hidden states: logits[t, e] = sum_h x[t, h] * router[e, h], products and
 * sums in fp32, x of any float dtype, router fp32 [E, H], logits fp32 [T, E] (fresh). Each
 * logit is one fixed-order sum (the CPU backends in index order h = 0 .. H-1, as
 * eng_model_router_logits; the CUDA backend in its own fixed order), so a row's logits never
 * depend on the other rows of the batch.
 * ---------------------------------------------------------------------------------------- */
moe_status kern_router_logits(kern_ctx_t *ctx, const moe_tensor *x, const moe_tensor *router, moe_tensor *logits);

/* Scalar activations, exposed so that every backend and test uses one definition. */
float kern_act_f32(kern_act a, float x);

#ifdef __cplusplus
}
#endif
#endif /* KERN_KERN_H */
