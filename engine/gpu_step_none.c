/*
 * gpu_step_none.c: the GPU worker's step in a build without the CUDA toolkit or NCCL: every
 * entry point says the build has no GPU workers.
 */
#include "engine/gpu_step.h"

bool eng_gpu_available(void) { return false; }

moe_status eng_gpu_init(eng_gpu_t **out, const eng_gpu_params *p, const eng_layer *layers, int32_t n_layers) {
    (void)p;
    (void)layers;
    (void)n_layers;
    if (out)
        *out = NULL;
    return moe_fail(MOE_ERR_UNSUPPORTED, "this build has no GPU workers (no CUDA toolkit or NCCL at build time)");
}

void eng_gpu_free(eng_gpu_t *g) { (void)g; }

moe_status eng_gpu_step(eng_gpu_t *g, uint64_t tag, int32_t layer, const eng_step_req *reqs, int32_t n,
                        const void **y, int64_t *expert_tokens, eng_gpu_timing *timing, const eng_gpu_io *io) {
    (void)timing;
    (void)io;
    (void)g;
    (void)tag;
    (void)layer;
    (void)reqs;
    (void)n;
    (void)y;
    (void)expert_tokens;
    return moe_fail(MOE_ERR_UNSUPPORTED, "this build has no GPU workers");
}

moe_status eng_gpu_stage(eng_gpu_t *g, uint64_t tag, const eng_step_req *reqs, int32_t n, const eng_gpu_io *io) {
    (void)g;
    (void)tag;
    (void)reqs;
    (void)n;
    (void)io;
    return moe_fail(MOE_ERR_UNSUPPORTED, "this build has no GPU workers");
}

void eng_gpu_set_hook(eng_gpu_t *g, void (*fn)(void *), void *arg) {
    (void)g;
    (void)fn;
    (void)arg;
}

moe_status eng_gpu_register_host(eng_gpu_t *g, void *p, size_t bytes) {
    (void)g;
    (void)p;
    (void)bytes;
    return moe_fail(MOE_ERR_UNSUPPORTED, "this build has no GPU workers");
}
