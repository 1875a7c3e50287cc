/*
 * cuda_none.c: the CUDA backend's table when this build has no CUDA toolkit (the repository
 * rule found no nvcc). Every context creation fails with a message that says so, and the
 * kern_cuda.h knobs answer MOE_ERR_UNSUPPORTED; nothing else can be reached.
 */
#include "kernels/cuda/kern_cuda.h"
#include "kernels/kern_impl.h"

static moe_status none_init(kern_ctx_t *ctx) {
    (void)ctx;
    return moe_fail(MOE_ERR_UNSUPPORTED,
                    "the CUDA backend was not built: no CUDA toolkit was found at build time "
                    "(set CUDA_PATH and rebuild)");
}

static bool none_supports(const kern_ctx_t *ctx, kern_op op, moe_dtype dt) {
    (void)ctx;
    (void)op;
    (void)dt;
    return false;
}

const kern_backend_ops kern_cuda_ops = {
    .name = "cuda (not built)",
    .host_data = false,
    .init = none_init,
    .supports = none_supports,
};

static moe_status not_built(void) { return moe_fail(MOE_ERR_UNSUPPORTED, "the CUDA backend was not built"); }

moe_status kern_cuda_reserve(kern_ctx_t *ctx, int64_t max_tokens, int32_t top_k, int64_t hidden, int64_t inter,
                             int32_t n_local, int64_t shared_inter) {
    (void)ctx, (void)max_tokens, (void)top_k, (void)hidden, (void)inter, (void)n_local, (void)shared_inter;
    return not_built();
}

moe_status kern_cuda_set_path(kern_ctx_t *ctx, kern_cuda_path path) {
    (void)ctx, (void)path;
    return not_built();
}

kern_cuda_path kern_cuda_get_path(const kern_ctx_t *ctx) {
    (void)ctx;
    return KERN_CUDA_PATH_AUTO;
}

moe_status kern_cuda_set_tile(kern_ctx_t *ctx, int32_t nwg, int32_t bn) {
    (void)ctx, (void)nwg, (void)bn;
    return not_built();
}

int32_t kern_cuda_tiles(kern_cuda_path path, int32_t *out, int32_t cap) {
    (void)path, (void)out, (void)cap;
    return 0;
}

moe_status kern_cuda_set_small_max(kern_ctx_t *ctx, int32_t max_pairs) {
    (void)ctx, (void)max_pairs;
    return not_built();
}

moe_status kern_cuda_set_fused(kern_ctx_t *ctx, bool on) {
    (void)ctx, (void)on;
    return not_built();
}

moe_status kern_cuda_set_small_opts(kern_ctx_t *ctx, uint32_t opts) {
    (void)ctx, (void)opts;
    return not_built();
}

uint32_t kern_cuda_get_small_opts(const kern_ctx_t *ctx) {
    (void)ctx;
    return 0;
}

moe_status kern_cuda_set_router_tile(kern_ctx_t *ctx, int32_t tile) {
    (void)ctx, (void)tile;
    return not_built();
}

int32_t kern_cuda_router_tiles(int32_t *out, int32_t cap) {
    (void)out, (void)cap;
    return 0;
}

moe_status kern_cuda_set_lab_stop(kern_ctx_t *ctx, int32_t kernels) {
    (void)ctx, (void)kernels;
    return not_built();
}

moe_status kern_cuda_set_sm_reserve(kern_ctx_t *ctx, int32_t n) {
    (void)ctx, (void)n;
    return not_built();
}

moe_status kern_cuda_set_yield(kern_ctx_t *ctx, const int32_t *flag, int32_t n) {
    (void)ctx, (void)flag, (void)n;
    return not_built();
}

moe_status kern_cuda_set_dyn_sched(kern_ctx_t *ctx, bool on) {
    (void)ctx, (void)on;
    return not_built();
}

moe_status kern_cuda_set_fit_n(kern_ctx_t *ctx, bool on) {
    (void)ctx, (void)on;
    return not_built();
}

moe_status kern_cuda_set_align(kern_ctx_t *ctx, int32_t mode) {
    (void)ctx, (void)mode;
    return not_built();
}

moe_status kern_cuda_set_pdl(kern_ctx_t *ctx, bool on) {
    (void)ctx, (void)on;
    return not_built();
}

moe_status kern_cuda_moe_sum_recv(kern_ctx_t *ctx, const moe_tensor *slots, const int32_t *recv_of,
                                  const void *recv_rows, const moe_tensor *shared, moe_tensor *y) {
    (void)ctx, (void)slots, (void)recv_of, (void)recv_rows, (void)shared, (void)y;
    return not_built();
}

void *kern_cuda_stream(kern_ctx_t *ctx) {
    (void)ctx;
    return NULL;
}
