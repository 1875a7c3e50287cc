/*
 * kern_impl.h: private to kernels/. The table of functions each backend implements, the
 * context layout, and the argument checks shared by all backends (kern.c runs them before a
 * backend is called, so backends see only valid shapes, dtypes and non-aliasing outputs).
 */
#ifndef KERN_KERN_IMPL_H
#define KERN_KERN_IMPL_H

#include "kernels/kern.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kern_backend_ops {
    const char *name;
    /* Whether the backend can read tensor data on the host (CPU backends): kern.c then checks
     * expert ids, weights and the expert map before the call. Device backends check on the
     * device and never read out of bounds. */
    bool host_data;
    moe_status (*init)(kern_ctx_t *ctx);
    void (*free)(kern_ctx_t *ctx);
    bool (*supports)(const kern_ctx_t *ctx, kern_op op, moe_dtype dt);
    moe_status (*sync)(kern_ctx_t *ctx);
    moe_status (*route)(kern_ctx_t *ctx, const kern_route_params *p, const moe_tensor *logits, moe_tensor *ids,
                        moe_tensor *w);
    moe_status (*fused_experts)(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                const moe_tensor *w, moe_tensor *y);
    moe_status (*shared_expert)(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x, moe_tensor *s);
    moe_status (*moe_sum)(kern_ctx_t *ctx, const moe_tensor *slots, const moe_tensor *shared, moe_tensor *y);
    /* Optional: the whole layer at once (NULL: kern.c composes fused_experts, shared_expert
     * and moe_sum, which costs a [T, K, H] slot buffer). */
    /* Optional: router logits (NULL: host backends use kern.c's loop; a device backend
     * without it reports MOE_ERR_UNSUPPORTED). */
    moe_status (*router_logits)(kern_ctx_t *ctx, const moe_tensor *x, const moe_tensor *router, moe_tensor *logits);
    moe_status (*moe_forward)(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                              const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                              const moe_tensor *w, const kern_shared_expert *se, moe_tensor *y);
} kern_backend_ops;

struct kern_ctx {
    const kern_backend_ops *ops;
    kern_backend kind;
    kern_ctx_params params;
    void *impl; /* backend state */
};

extern const kern_backend_ops kern_cpu_ref_ops;
extern const kern_backend_ops kern_cpu_ops;
/* Defined by the CUDA backend when built with nvcc, else by kern_cuda_none.c. */
extern const kern_backend_ops kern_cuda_ops;

/* Host-side helpers shared by the CPU backends. */
/* Selects the top k of v[0..n) (descending; ties to the lower index) among entries with
 * keep[i] (NULL: all); writes indices to out[0..k). Returns how many were written (< k only
 * when fewer than k entries are kept). O(n k), fine for n <= a few hundred. */
int32_t kern_topk_indices(const float *v, const bool *keep, int32_t n, int32_t k, int32_t *out);

/* Local slot of global id `id` under p (the map, or identity); -1 when held elsewhere. */
static inline int32_t kern_local_slot(const kern_experts_params *p, int32_t id) {
    return p->expert_map ? p->expert_map[id] : id;
}

#ifdef __cplusplus
}
#endif
#endif /* KERN_KERN_IMPL_H */
