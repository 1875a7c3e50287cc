/*
 * default_model.c: the embedded default model of `moe-engine serve` without --model: a small
 * synthetic Qwen2-MoE checkpoint (routed experts and a shared expert with its sigmoid gate,
 * bf16), written once by the synthetic model writer into the runtime folder and reused by later
 * runs (same seed, same bytes). Runs before the loop starts.
 */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/model/model.h"

/* Bump when the shape or the seed changes, so that an old copy is not reused. */
#define DEFAULT_MODEL_NAME "moe-engine-default-model-v1"

moe_status eng_default_model(const char *base_dir, char *out, size_t cap) {
    int n = snprintf(out, cap, "%s/%s", base_dir, DEFAULT_MODEL_NAME);
    MOE_REQUIRE(n > 0 && (size_t)n < cap, MOE_ERR_INVALID_ARG, "default model path too long");
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s/config.json", out);
    if (access(cfg, R_OK) == 0) {
        eng_ckpt_t *ck = NULL;
        if (eng_ckpt_open(&ck, out) == MOE_OK) { /* complete and valid: reuse */
            eng_ckpt_close(ck);
            return MOE_OK;
        }
        MOE_WARN(MOE_SUB_ENG, "the embedded default model at %s is damaged (%s): writing it again", out, moe_errmsg());
    }
    eng_synth_params p;
    MOE_CHECK(eng_synth_params_default(&p, ENG_FAMILY_QWEN2_MOE));
    p.out_dir = out;
    p.n_layers = 2;
    p.n_experts = 16;
    p.top_k = 4;
    p.hidden = 256;
    p.intermediate = 128;
    p.shared_intermediate = 256;
    p.sparse_step = 1;
    p.n_mlp_only = 0;
    p.norm_topk_prob = false;
    p.hidden_act = "silu";
    p.dtype = MOE_DTYPE_BF16;
    p.seed = 20261127;
    p.shard_bytes = 4u << 20;
    p.force = true;
    if (mkdir(out, 0755) != 0 && access(out, W_OK) != 0)
        return moe_fail(MOE_ERR_IO, "cannot create %s", out);
    MOE_INFO(MOE_SUB_ENG, "writing the embedded default model (qwen2_moe, 2 layers, 16 experts, H=256) to %s", out);
    MOE_CHECK(eng_synth_write(&p));
    return MOE_OK;
}
