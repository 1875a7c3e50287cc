/*
 * cuda_none.c: the CUDA backend's table when this build has no CUDA toolkit (the repository
 * rule found no nvcc). Every context creation fails with a message that says so; nothing else
 * can be reached.
 */
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
