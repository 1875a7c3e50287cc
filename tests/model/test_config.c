/*
 * test_config.c: config.json of the five families -> eng_model_desc (engine/model/config.c).
 *
 * The references are the published config.json files of real checkpoints (Mixtral-8x7B,
 * Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, DeepSeek-V2-Lite, DeepSeek-V3; the fields that matter
 * copied here) and the defaults of transformers' config classes, each written out below with
 * the expected result worked out by hand from the class and modeling code, not from our
 * parser. Broken configs must each fail with a message naming the field.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/model/model.h"

static moe_status parse(const char *json, eng_model_desc *d) { return eng_model_config_parse(json, strlen(json), d); }

static void expect_error(const char *json, moe_status want, const char *w1, const char *w2) {
    eng_model_desc d;
    moe_errmsg_clear();
    moe_status st = parse(json, &d);
    if (st != want)
        fail_msg("expected %s, got %s (%s) for %s", moe_status_name(want), moe_status_name(st), moe_errmsg(), json);
    if ((w1 && !strstr(moe_errmsg(), w1)) || (w2 && !strstr(moe_errmsg(), w2)))
        fail_msg("message '%s' lacks '%s' / '%s'", moe_errmsg(), w1 ? w1 : "", w2 ? w2 : "");
}

static void expect_layers(const eng_model_desc *d, const int32_t *want, int32_t n) {
    assert_int_equal(d->n_moe_layers, n);
    for (int32_t i = 0; i < n; i++)
        assert_int_equal(d->moe_layers[i], want[i]);
}

/* mistralai/Mixtral-8x7B-v0.1 */
static void test_mixtral_real(void **state) {
    (void)state;
    const char *j =
        "{\"architectures\": [\"MixtralForCausalLM\"], \"attention_dropout\": 0.0, \"bos_token_id\": 1,"
        " \"eos_token_id\": 2, \"hidden_act\": \"silu\", \"hidden_size\": 4096, \"initializer_range\": 0.02,"
        " \"intermediate_size\": 14336, \"max_position_embeddings\": 32768, \"model_type\": \"mixtral\","
        " \"num_attention_heads\": 32, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 32,"
        " \"num_key_value_heads\": 8, \"num_local_experts\": 8, \"output_router_logits\": false,"
        " \"rms_norm_eps\": 1e-05, \"rope_theta\": 1000000.0, \"router_aux_loss_coef\": 0.02,"
        " \"sliding_window\": null, \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\","
        " \"transformers_version\": \"4.36.0.dev0\", \"use_cache\": true, \"vocab_size\": 32000}";
    eng_model_desc d;
    assert_int_equal(parse(j, &d), MOE_OK);
    assert_int_equal(d.family, ENG_FAMILY_MIXTRAL);
    assert_string_equal(d.architecture, "MixtralForCausalLM");
    assert_int_equal(d.dtype, MOE_DTYPE_BF16);
    assert_int_equal(d.hidden_size, 4096);
    assert_int_equal(d.n_layers, 32);
    assert_int_equal(d.n_moe_layers, 32);
    assert_int_equal(d.moe_layers[31], 31);
    assert_int_equal(d.n_experts, 8);
    assert_int_equal(d.top_k, 2);
    assert_int_equal(d.moe_intermediate, 14336);
    assert_int_equal(d.shared_intermediate, 0);
    assert_false(d.has_shared_gate);
    assert_false(d.has_correction_bias);
    assert_int_equal(d.act, KERN_ACT_SILU);
    assert_int_equal(d.route.scoring, KERN_SCORE_SOFTMAX);
    assert_int_equal(d.route.group_mode, KERN_GROUP_NONE);
    assert_true(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 1.0f);
    assert_int_equal(d.route.n_experts, 8);
    assert_int_equal(d.route.top_k, 2);
    assert_null(d.route.correction_bias);
    char name[200];
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_EXPERT_GATE, 3, 7, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.3.block_sparse_moe.experts.7.w1.weight");
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_EXPERT_UP, 3, 7, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.3.block_sparse_moe.experts.7.w3.weight");
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_EXPERT_DOWN, 3, 7, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.3.block_sparse_moe.experts.7.w2.weight");
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_ROUTER, 0, 0, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.0.block_sparse_moe.gate.weight");
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_SHARED_UP_PROJ, 0, 0, name, sizeof name),
                     MOE_ERR_INVALID_ARG);
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_ROUTER, 0, 0, name, 10), MOE_ERR_INVALID_ARG);
}

/* Qwen/Qwen1.5-MoE-A2.7B */
static void test_qwen2_real(void **state) {
    (void)state;
    const char *j =
        "{\"architectures\": [\"Qwen2MoeForCausalLM\"], \"attention_dropout\": 0.0, \"bos_token_id\": 151643,"
        " \"eos_token_id\": 151643, \"hidden_act\": \"silu\", \"hidden_size\": 2048,"
        " \"initializer_range\": 0.02, \"intermediate_size\": 5632, \"max_position_embeddings\": 8192,"
        " \"max_window_layers\": 21, \"model_type\": \"qwen2_moe\", \"num_attention_heads\": 16,"
        " \"num_hidden_layers\": 24, \"num_key_value_heads\": 16, \"rms_norm_eps\": 1e-06,"
        " \"rope_theta\": 1000000.0, \"sliding_window\": 32768, \"tie_word_embeddings\": false,"
        " \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.39.0.dev0\", \"use_cache\": true,"
        " \"use_sliding_window\": false, \"vocab_size\": 151936, \"decoder_sparse_step\": 1,"
        " \"moe_intermediate_size\": 1408, \"shared_expert_intermediate_size\": 5632,"
        " \"num_experts_per_tok\": 4, \"num_experts\": 60, \"norm_topk_prob\": false,"
        " \"output_router_logits\": false, \"router_aux_loss_coef\": 0.001}";
    eng_model_desc d;
    assert_int_equal(parse(j, &d), MOE_OK);
    assert_int_equal(d.family, ENG_FAMILY_QWEN2_MOE);
    assert_int_equal(d.n_moe_layers, 24);
    assert_int_equal(d.n_experts, 60);
    assert_int_equal(d.top_k, 4);
    assert_int_equal(d.moe_intermediate, 1408);
    assert_int_equal(d.shared_intermediate, 5632);
    assert_int_equal(d.n_shared_experts, 1);
    assert_true(d.has_shared_gate);
    assert_false(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 1.0f);
    char name[200];
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_SHARED_EXPERT_GATE, 5, 0, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.5.mlp.shared_expert_gate.weight");
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_SHARED_DOWN_PROJ, 5, 0, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.5.mlp.shared_expert.down_proj.weight");
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_EXPERT_GATE, 5, 59, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.5.mlp.experts.59.gate_proj.weight");
    int32_t nd;
    int64_t sh[2];
    eng_model_tensor_shape(&d, ENG_TENSOR_SHARED_EXPERT_GATE, &nd, sh);
    assert_true(nd == 2 && sh[0] == 1 && sh[1] == 2048);
    eng_model_tensor_shape(&d, ENG_TENSOR_EXPERT_DOWN, &nd, sh);
    assert_true(nd == 2 && sh[0] == 2048 && sh[1] == 1408);
}

/* Qwen/Qwen3-30B-A3B */
static void test_qwen3_real(void **state) {
    (void)state;
    const char *j =
        "{\"architectures\": [\"Qwen3MoeForCausalLM\"], \"attention_bias\": false, \"attention_dropout\": 0.0,"
        " \"bos_token_id\": 151643, \"decoder_sparse_step\": 1, \"eos_token_id\": 151645, \"head_dim\": 128,"
        " \"hidden_act\": \"silu\", \"hidden_size\": 2048, \"initializer_range\": 0.02,"
        " \"intermediate_size\": 6144, \"max_position_embeddings\": 40960, \"max_window_layers\": 48,"
        " \"mlp_only_layers\": [], \"model_type\": \"qwen3_moe\", \"moe_intermediate_size\": 768,"
        " \"norm_topk_prob\": true, \"num_attention_heads\": 32, \"num_experts\": 128,"
        " \"num_experts_per_tok\": 8, \"num_hidden_layers\": 48, \"num_key_value_heads\": 4,"
        " \"output_router_logits\": false, \"rms_norm_eps\": 1e-06, \"rope_scaling\": null,"
        " \"rope_theta\": 1000000.0, \"router_aux_loss_coef\": 0.001, \"sliding_window\": null,"
        " \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\", \"use_cache\": true,"
        " \"use_sliding_window\": false, \"vocab_size\": 151936}";
    eng_model_desc d;
    assert_int_equal(parse(j, &d), MOE_OK);
    assert_int_equal(d.family, ENG_FAMILY_QWEN3_MOE);
    assert_int_equal(d.n_layers, 48);
    assert_int_equal(d.n_moe_layers, 48);
    assert_int_equal(d.n_experts, 128);
    assert_int_equal(d.top_k, 8);
    assert_int_equal(d.moe_intermediate, 768);
    assert_int_equal(d.shared_intermediate, 0);
    assert_false(d.has_shared_gate);
    assert_true(d.route.renormalize);
}

/* deepseek-ai/DeepSeek-V2-Lite (its config.json, remote-code format) */
static void test_deepseek_v2_lite_real(void **state) {
    (void)state;
    const char *j =
        "{\"architectures\": [\"DeepseekV2ForCausalLM\"], \"attention_bias\": false,"
        " \"attention_dropout\": 0.0, \"auto_map\": {\"AutoConfig\": \"configuration_deepseek.DeepseekV2Config\"},"
        " \"aux_loss_alpha\": 0.001, \"bos_token_id\": 100000, \"eos_token_id\": 100001,"
        " \"first_k_dense_replace\": 1, \"hidden_act\": \"silu\", \"hidden_size\": 2048,"
        " \"initializer_range\": 0.02, \"intermediate_size\": 10944, \"kv_lora_rank\": 512,"
        " \"max_position_embeddings\": 163840, \"model_type\": \"deepseek_v2\","
        " \"moe_intermediate_size\": 1408, \"moe_layer_freq\": 1, \"n_group\": 1, \"n_routed_experts\": 64,"
        " \"n_shared_experts\": 2, \"norm_topk_prob\": false, \"num_attention_heads\": 16,"
        " \"num_experts_per_tok\": 6, \"num_hidden_layers\": 27, \"num_key_value_heads\": 16,"
        " \"pretraining_tp\": 1, \"q_lora_rank\": null, \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64,"
        " \"rms_norm_eps\": 1e-06, \"rope_theta\": 10000, \"routed_scaling_factor\": 1.0,"
        " \"scoring_func\": \"softmax\", \"seq_aux\": true, \"tie_word_embeddings\": false,"
        " \"topk_group\": 1, \"topk_method\": \"greedy\", \"torch_dtype\": \"bfloat16\","
        " \"transformers_version\": \"4.33.1\", \"use_cache\": true, \"v_head_dim\": 128,"
        " \"vocab_size\": 102400}";
    eng_model_desc d;
    assert_int_equal(parse(j, &d), MOE_OK);
    assert_int_equal(d.family, ENG_FAMILY_DEEPSEEK_V2);
    assert_int_equal(d.n_layers, 27);
    assert_int_equal(d.n_moe_layers, 26); /* layer 0 dense */
    assert_int_equal(d.moe_layers[0], 1);
    assert_int_equal(d.moe_layers[25], 26);
    assert_false(eng_model_is_moe_layer(&d, 0));
    assert_true(eng_model_is_moe_layer(&d, 1));
    assert_int_equal(d.n_experts, 64);
    assert_int_equal(d.top_k, 6);
    assert_int_equal(d.moe_intermediate, 1408);
    assert_int_equal(d.n_shared_experts, 2);
    assert_int_equal(d.shared_intermediate, 2 * 1408);
    assert_false(d.has_shared_gate);
    assert_false(d.has_correction_bias);
    assert_int_equal(d.route.scoring, KERN_SCORE_SOFTMAX);
    assert_int_equal(d.route.group_mode, KERN_GROUP_NONE);
    assert_false(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 1.0f);
    char name[200];
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_SHARED_GATE_PROJ, 1, 0, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.1.mlp.shared_experts.gate_proj.weight");
}

/* deepseek-ai/DeepSeek-V3 (its config.json: FP8 weights, but the config parses) */
static void test_deepseek_v3_real(void **state) {
    (void)state;
    const char *j =
        "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"attention_bias\": false,"
        " \"attention_dropout\": 0.0, \"bos_token_id\": 0, \"eos_token_id\": 1, \"ep_size\": 1,"
        " \"first_k_dense_replace\": 3, \"hidden_act\": \"silu\", \"hidden_size\": 7168,"
        " \"initializer_range\": 0.02, \"intermediate_size\": 18432, \"kv_lora_rank\": 512,"
        " \"max_position_embeddings\": 163840, \"model_type\": \"deepseek_v3\","
        " \"moe_intermediate_size\": 2048, \"moe_layer_freq\": 1, \"n_group\": 8, \"n_routed_experts\": 256,"
        " \"n_shared_experts\": 1, \"norm_topk_prob\": true, \"num_attention_heads\": 128,"
        " \"num_experts_per_tok\": 8, \"num_hidden_layers\": 61, \"num_key_value_heads\": 128,"
        " \"num_nextn_predict_layers\": 1, \"q_lora_rank\": 1536, \"qk_nope_head_dim\": 128,"
        " \"qk_rope_head_dim\": 64, \"quantization_config\": {\"activation_scheme\": \"dynamic\","
        " \"fmt\": \"e4m3\", \"quant_method\": \"fp8\", \"weight_block_size\": [128, 128]},"
        " \"rms_norm_eps\": 1e-06, \"rope_theta\": 10000, \"routed_scaling_factor\": 2.5,"
        " \"scoring_func\": \"sigmoid\", \"tie_word_embeddings\": false, \"topk_group\": 4,"
        " \"topk_method\": \"noaux_tc\", \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.46.3\","
        " \"use_cache\": true, \"v_head_dim\": 128, \"vocab_size\": 129280}";
    eng_model_desc d;
    assert_int_equal(parse(j, &d), MOE_OK);
    assert_int_equal(d.family, ENG_FAMILY_DEEPSEEK_V3);
    assert_int_equal(d.n_layers, 61);
    assert_int_equal(d.n_moe_layers, 58);
    assert_int_equal(d.moe_layers[0], 3);
    assert_int_equal(d.moe_layers[57], 60);
    assert_int_equal(d.n_experts, 256);
    assert_int_equal(d.top_k, 8);
    assert_int_equal(d.shared_intermediate, 2048);
    assert_true(d.has_correction_bias);
    assert_int_equal(d.route.scoring, KERN_SCORE_SIGMOID);
    assert_int_equal(d.route.group_mode, KERN_GROUP_TOP2_SUM);
    assert_int_equal(d.route.n_group, 8);
    assert_int_equal(d.route.topk_group, 4);
    assert_true(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 2.5f);
    char name[200];
    assert_int_equal(eng_model_tensor_name(&d, ENG_TENSOR_CORRECTION_BIAS, 3, 0, name, sizeof name), MOE_OK);
    assert_string_equal(name, "model.layers.3.mlp.gate.e_score_correction_bias");
    int32_t nd;
    int64_t sh[2];
    eng_model_tensor_shape(&d, ENG_TENSOR_CORRECTION_BIAS, &nd, sh);
    assert_true(nd == 1 && sh[0] == 256);
    char s[400];
    eng_model_desc_str(&d, s, sizeof s);
    assert_non_null(strstr(s, "E=256"));
    assert_non_null(strstr(s, "top2-sum groups 4/8"));
}

/* A DeepSeek-V3 config saved by transformers 5: no scoring_func, no topk_method, no
 * moe_layer_freq: sigmoid, noaux_tc, every layer from first_k_dense_replace on. */
static void test_deepseek_v3_transformers5_defaults(void **state) {
    (void)state;
    const char *j = "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\","
                    " \"hidden_size\": 64, \"num_hidden_layers\": 4, \"moe_intermediate_size\": 32,"
                    " \"n_routed_experts\": 16, \"num_experts_per_tok\": 4, \"first_k_dense_replace\": 1,"
                    " \"n_group\": 4, \"topk_group\": 2, \"dtype\": \"float32\"}";
    eng_model_desc d;
    assert_int_equal(parse(j, &d), MOE_OK);
    assert_int_equal(d.dtype, MOE_DTYPE_F32);
    assert_int_equal(d.route.scoring, KERN_SCORE_SIGMOID);
    assert_int_equal(d.route.group_mode, KERN_GROUP_TOP2_SUM);
    assert_true(d.has_correction_bias);
    assert_string_equal(d.topk_method, "noaux_tc");
    assert_true(d.route.renormalize);                   /* DeepseekV3Config norm_topk_prob=True */
    assert_true(d.route.routed_scaling_factor == 2.5f); /* DeepseekV3Config routed_scaling_factor */
    assert_int_equal(d.n_shared_experts, 1);            /* DeepseekV3Config n_shared_experts */
    int32_t want[] = {1, 2, 3};
    expect_layers(&d, want, 3);
    /* every default of DeepseekV3Config at once */
    assert_int_equal(parse("{\"model_type\": \"deepseek_v3\"}", &d), MOE_OK);
    assert_int_equal(d.hidden_size, 7168);
    assert_int_equal(d.n_layers, 61);
    assert_int_equal(d.n_moe_layers, 58);
    assert_int_equal(d.n_experts, 256);
    assert_int_equal(d.top_k, 8);
    assert_int_equal(d.moe_intermediate, 2048);
    assert_int_equal(d.route.n_group, 8);
    assert_int_equal(d.route.topk_group, 4);
    assert_string_equal(d.architecture, "DeepseekV3ForCausalLM");
}

static void test_family_defaults(void **state) {
    (void)state;
    eng_model_desc d;
    /* MixtralConfig */
    assert_int_equal(parse("{\"architectures\": [\"MixtralForCausalLM\"]}", &d), MOE_OK);
    assert_int_equal(d.hidden_size, 4096);
    assert_int_equal(d.n_layers, 32);
    assert_int_equal(d.n_experts, 8);
    assert_int_equal(d.top_k, 2);
    assert_int_equal(d.moe_intermediate, 14336);
    assert_string_equal(d.model_type, "mixtral");
    /* Qwen2MoeConfig */
    assert_int_equal(parse("{\"model_type\": \"qwen2_moe\"}", &d), MOE_OK);
    assert_int_equal(d.hidden_size, 2048);
    assert_int_equal(d.n_layers, 24);
    assert_int_equal(d.n_experts, 60);
    assert_int_equal(d.top_k, 4);
    assert_int_equal(d.moe_intermediate, 1408);
    assert_int_equal(d.shared_intermediate, 5632);
    assert_false(d.route.renormalize);
    /* Qwen3MoeConfig */
    assert_int_equal(parse("{\"model_type\": \"qwen3_moe\"}", &d), MOE_OK);
    assert_int_equal(d.n_experts, 128);
    assert_int_equal(d.top_k, 8);
    assert_int_equal(d.moe_intermediate, 768);
    assert_int_equal(d.shared_intermediate, 0);
    assert_false(d.route.renormalize);
    /* DeepseekV2Config: num_experts_per_tok has no default */
    expect_error("{\"model_type\": \"deepseek_v2\"}", MOE_ERR_FORMAT, "num_experts_per_tok", "no default");
    assert_int_equal(parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 6}", &d), MOE_OK);
    assert_int_equal(d.hidden_size, 4096);
    assert_int_equal(d.n_layers, 32);
    assert_int_equal(d.n_moe_layers, 32); /* first_k_dense_replace 0 */
    assert_int_equal(d.n_experts, 64);
    assert_int_equal(d.moe_intermediate, 1407);
    assert_int_equal(d.n_shared_experts, 2);
    assert_int_equal(d.shared_intermediate, 2814);
    assert_int_equal(d.route.scoring, KERN_SCORE_SOFTMAX);
    assert_int_equal(d.route.group_mode, KERN_GROUP_NONE);
    assert_false(d.has_correction_bias);
    assert_true(d.route.routed_scaling_factor == 1.0f);
    /* the dtype: torch_dtype, else transformers 5's "dtype", else bf16 */
    assert_int_equal(parse("{\"model_type\": \"mixtral\", \"torch_dtype\": \"float16\"}", &d), MOE_OK);
    assert_int_equal(d.dtype, MOE_DTYPE_F16);
    assert_int_equal(parse("{\"model_type\": \"mixtral\", \"torch_dtype\": \"float8_e4m3fn\"}", &d), MOE_OK);
    assert_int_equal(d.dtype, MOE_DTYPE_BF16);
}

static void test_moe_layer_rules(void **state) {
    (void)state;
    eng_model_desc d;
    /* Qwen: (l + 1) % decoder_sparse_step == 0 and l not in mlp_only_layers */
    assert_int_equal(parse("{\"model_type\": \"qwen2_moe\", \"num_hidden_layers\": 8, \"decoder_sparse_step\": 2,"
                           " \"mlp_only_layers\": [3, 6, 100]}",
                           &d),
                     MOE_OK);
    int32_t w1[] = {1, 5, 7};
    expect_layers(&d, w1, 3);
    assert_int_equal(parse("{\"model_type\": \"qwen3_moe\", \"num_hidden_layers\": 5, \"mlp_only_layers\": null}", &d),
                     MOE_OK);
    int32_t w2[] = {0, 1, 2, 3, 4};
    expect_layers(&d, w2, 5);
    /* DeepSeek: l >= first_k_dense_replace and l % moe_layer_freq == 0 */
    assert_int_equal(parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 2, \"num_hidden_layers\": 9,"
                           " \"first_k_dense_replace\": 3, \"moe_layer_freq\": 2}",
                           &d),
                     MOE_OK);
    int32_t w3[] = {4, 6, 8};
    expect_layers(&d, w3, 3);
    /* no MoE layer at all */
    expect_error("{\"model_type\": \"deepseek_v3\", \"num_hidden_layers\": 3}", MOE_ERR_FORMAT, "none of the 3 layers",
                 "DeepseekV3Config");
    expect_error("{\"model_type\": \"qwen2_moe\", \"num_hidden_layers\": 2, \"mlp_only_layers\": [0, 1]}",
                 MOE_ERR_FORMAT, "none of the 2 layers", NULL);
    expect_error("{\"model_type\": \"qwen2_moe\", \"num_experts\": 0}", MOE_ERR_FORMAT, "num_experts", "dense");
    expect_error("{\"model_type\": \"deepseek_v2\", \"n_routed_experts\": null, \"num_experts_per_tok\": 2}",
                 MOE_ERR_FORMAT, "n_routed_experts", "dense");
}

static void test_routing_rules(void **state) {
    (void)state;
    eng_model_desc d;
    /* DeepSeek-V2: renormalizing replaces the scaling (DeepSeek's MoEGate) */
    assert_int_equal(parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 2, \"norm_topk_prob\": true,"
                           " \"routed_scaling_factor\": 16.0}",
                           &d),
                     MOE_OK);
    assert_true(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 1.0f);
    assert_int_equal(parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 2, \"norm_topk_prob\": false,"
                           " \"routed_scaling_factor\": 16.0}",
                           &d),
                     MOE_OK);
    assert_false(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 16.0f);
    /* ... and only when top_k > 1 */
    assert_int_equal(parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 1, \"norm_topk_prob\": true,"
                           " \"routed_scaling_factor\": 16.0}",
                           &d),
                     MOE_OK);
    assert_false(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 16.0f);
    /* DeepSeek-V3: renormalize, then always scale */
    assert_int_equal(
        parse("{\"model_type\": \"deepseek_v3\", \"norm_topk_prob\": true, \"routed_scaling_factor\": 1.5}", &d),
        MOE_OK);
    assert_true(d.route.renormalize);
    assert_true(d.route.routed_scaling_factor == 1.5f);
    /* group_limited_greedy: max-score groups, no bias */
    assert_int_equal(parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 6, \"n_routed_experts\": 160,"
                           " \"topk_method\": \"group_limited_greedy\", \"n_group\": 8, \"topk_group\": 3}",
                           &d),
                     MOE_OK);
    assert_int_equal(d.route.group_mode, KERN_GROUP_MAX);
    assert_int_equal(d.route.n_group, 8);
    assert_int_equal(d.route.topk_group, 3);
    assert_false(d.has_correction_bias);
    /* DeepSeek's own default spelling "gready" is greedy */
    assert_int_equal(
        parse("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 2, \"topk_method\": \"gready\"}", &d),
        MOE_OK);
    assert_int_equal(d.route.group_mode, KERN_GROUP_NONE);
    assert_string_equal(d.topk_method, "greedy");
    /* noaux_tc with one group: no group selection, but the bias */
    assert_int_equal(parse("{\"model_type\": \"deepseek_v3\", \"n_group\": 1, \"topk_group\": 1}", &d), MOE_OK);
    assert_int_equal(d.route.group_mode, KERN_GROUP_NONE);
    assert_true(d.has_correction_bias);
    /* Qwen norm_topk_prob, any top-k */
    assert_int_equal(parse("{\"model_type\": \"qwen3_moe\", \"num_experts_per_tok\": 1, \"norm_topk_prob\": true}", &d),
                     MOE_OK);
    assert_true(d.route.renormalize);
    /* aliases from the classes' attribute_map */
    assert_int_equal(parse("{\"model_type\": \"mixtral\", \"num_experts\": 4}", &d), MOE_OK);
    assert_int_equal(d.n_experts, 4);
    assert_int_equal(parse("{\"model_type\": \"qwen3_moe\", \"num_local_experts\": 32}", &d), MOE_OK);
    assert_int_equal(d.n_experts, 32);
    expect_error("{\"model_type\": \"qwen3_moe\", \"num_local_experts\": 32, \"num_experts\": 16}", MOE_ERR_FORMAT,
                 "num_experts", "differ");
    /* activations */
    assert_int_equal(parse("{\"model_type\": \"mixtral\", \"hidden_act\": \"gelu_pytorch_tanh\"}", &d), MOE_OK);
    assert_int_equal(d.act, KERN_ACT_GELU_TANH);
}

static void test_broken_configs(void **state) {
    (void)state;
    expect_error("{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\"}", MOE_ERR_UNSUPPORTED,
                 "unknown architecture 'LlamaForCausalLM'", "llama");
    expect_error("{\"hidden_size\": 4}", MOE_ERR_UNSUPPORTED, "unknown architecture", "(none)");
    expect_error("{\"model_type\": \"mixtral\", ", MOE_ERR_FORMAT, "not valid JSON", NULL);
    expect_error("[\"mixtral\"]", MOE_ERR_FORMAT, "not a JSON object", NULL);
    expect_error("{\"model_type\": \"mixtral\", \"hidden_size\": \"4096\"}", MOE_ERR_FORMAT, "'hidden_size'",
                 "integer");
    expect_error("{\"model_type\": \"mixtral\", \"hidden_size\": 40.5}", MOE_ERR_FORMAT, "'hidden_size'", "integer");
    expect_error("{\"model_type\": \"mixtral\", \"hidden_size\": 0}", MOE_ERR_FORMAT, "'hidden_size'", "out of range");
    expect_error("{\"model_type\": \"mixtral\", \"num_hidden_layers\": 5000}", MOE_ERR_FORMAT, "'num_hidden_layers'",
                 "5000");
    expect_error("{\"model_type\": \"mixtral\", \"num_experts_per_tok\": 9}", MOE_ERR_FORMAT, "num_experts_per_tok",
                 "exceeds");
    expect_error("{\"model_type\": \"mixtral\", \"num_experts_per_tok\": null}", MOE_ERR_FORMAT,
                 "'num_experts_per_tok' is null", NULL);
    expect_error("{\"model_type\": \"qwen2_moe\", \"norm_topk_prob\": \"yes\"}", MOE_ERR_FORMAT, "'norm_topk_prob'",
                 NULL);
    expect_error("{\"model_type\": \"qwen2_moe\", \"decoder_sparse_step\": 0}", MOE_ERR_FORMAT, "decoder_sparse_step",
                 NULL);
    expect_error("{\"model_type\": \"qwen2_moe\", \"mlp_only_layers\": \"3\"}", MOE_ERR_FORMAT, "mlp_only_layers",
                 NULL);
    expect_error("{\"model_type\": \"qwen2_moe\", \"mlp_only_layers\": [1, \"x\"]}", MOE_ERR_FORMAT,
                 "mlp_only_layers'[1]", NULL);
    expect_error("{\"model_type\": \"mixtral\", \"hidden_act\": \"relu2\"}", MOE_ERR_UNSUPPORTED, "hidden_act 'relu2'",
                 NULL);
    expect_error("{\"model_type\": \"deepseek_v3\", \"scoring_func\": \"sqrtsoftplus\"}", MOE_ERR_UNSUPPORTED,
                 "scoring_func 'sqrtsoftplus'", NULL);
    expect_error("{\"model_type\": \"deepseek_v3\", \"topk_method\": \"magic\"}", MOE_ERR_UNSUPPORTED,
                 "topk_method 'magic'", NULL);
    expect_error("{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 2, \"topk_method\": "
                 "\"group_limited_greedy\"}",
                 MOE_ERR_FORMAT, "needs 'n_group'", "missing");
    expect_error("{\"model_type\": \"deepseek_v3\", \"n_group\": 5}", MOE_ERR_FORMAT, "routing", "n_group 5");
    expect_error("{\"model_type\": \"deepseek_v3\", \"topk_group\": 9}", MOE_ERR_FORMAT, "routing", "topk_group");
    expect_error("{\"model_type\": \"deepseek_v3\", \"routed_scaling_factor\": -1}", MOE_ERR_FORMAT,
                 "routed_scaling_factor", NULL);
    expect_error("{\"model_type\": \"deepseek_v3\", \"routed_scaling_factor\": \"2\"}", MOE_ERR_FORMAT,
                 "routed_scaling_factor", NULL);
}

static void test_family_names(void **state) {
    (void)state;
    eng_model_family f;
    assert_int_equal(eng_model_family_parse("qwen2_moe", &f), MOE_OK);
    assert_int_equal(f, ENG_FAMILY_QWEN2_MOE);
    assert_int_equal(eng_model_family_parse("deepseek-v3", &f), MOE_OK);
    assert_int_equal(f, ENG_FAMILY_DEEPSEEK_V3);
    assert_int_equal(eng_model_family_parse("MixtralForCausalLM", &f), MOE_OK);
    assert_int_equal(f, ENG_FAMILY_MIXTRAL);
    assert_int_equal(eng_model_family_parse("llama", &f), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "llama"));
    for (int i = 0; i < ENG_FAMILY_COUNT_; i++) {
        assert_int_equal(eng_model_family_parse(eng_model_family_name((eng_model_family)i), &f), MOE_OK);
        assert_int_equal(f, i);
        assert_int_equal(eng_model_family_parse(eng_model_family_arch((eng_model_family)i), &f), MOE_OK);
        assert_int_equal(f, i);
    }
    /* kimi_k2 ships DeepseekV3ForCausalLM under its own model_type: the architecture decides */
    eng_model_desc d;
    assert_int_equal(parse("{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"kimi_k2\","
                           " \"n_routed_experts\": 384, \"first_k_dense_replace\": 1, \"n_group\": 1,"
                           " \"topk_group\": 1}",
                           &d),
                     MOE_OK);
    assert_int_equal(d.family, ENG_FAMILY_DEEPSEEK_V3);
    assert_string_equal(d.model_type, "kimi_k2");
}

/* config.json is untrusted input: random mutations of real configs (flipped bytes, cuts,
 * insertions) must each parse or fail with a message, never crash (run under --config=asan
 * too). The deterministic generator makes failures reproducible. */
static void test_mutated_configs(void **state) {
    (void)state;
    static const char *seeds[] = {
        "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\", \"hidden_size\": 64,"
        " \"num_hidden_layers\": 4, \"moe_intermediate_size\": 32, \"n_routed_experts\": 16, \"num_experts_per_tok\": "
        "4,"
        " \"first_k_dense_replace\": 1, \"n_group\": 4, \"topk_group\": 2, \"topk_method\": \"noaux_tc\","
        " \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": true, \"routed_scaling_factor\": 2.5}",
        "{\"model_type\": \"qwen2_moe\", \"num_hidden_layers\": 8, \"decoder_sparse_step\": 2,"
        " \"mlp_only_layers\": [3, 6], \"shared_expert_intermediate_size\": 64, \"num_experts\": 8,"
        " \"num_experts_per_tok\": 2, \"hidden_act\": \"silu\", \"torch_dtype\": \"bfloat16\"}",
        "{\"architectures\": [\"MixtralForCausalLM\"], \"num_local_experts\": 8, \"num_experts_per_tok\": 2,"
        " \"intermediate_size\": 14336, \"hidden_size\": 4096, \"num_hidden_layers\": 32}",
        "{\"model_type\": \"deepseek_v2\", \"num_experts_per_tok\": 6, \"topk_method\": \"group_limited_greedy\","
        " \"n_group\": 8, \"topk_group\": 3, \"n_routed_experts\": 160, \"n_shared_experts\": null}",
    };
    moe_rng rng;
    moe_rng_seed(&rng, 20261127);
    const char junk[] = "{}[]\":,0123456789-.eE tfnul\\\x01\xff";
    int ok = 0, refused = 0;
    for (size_t k = 0; k < sizeof seeds / sizeof seeds[0]; k++) {
        size_t n0 = strlen(seeds[k]);
        char *buf = malloc(2 * n0 + 16);
        for (int it = 0; it < 600; it++) {
            size_t n = n0;
            memcpy(buf, seeds[k], n0);
            int edits = 1 + (int)moe_rng_below(&rng, 4);
            for (int e = 0; e < edits && n > 0; e++) {
                size_t at = moe_rng_below(&rng, (uint32_t)n);
                switch (moe_rng_below(&rng, 4)) {
                case 0: /* replace a byte */
                    buf[at] = junk[moe_rng_below(&rng, sizeof junk - 1)];
                    break;
                case 1: /* cut the text */
                    n = at;
                    break;
                case 2: /* insert a byte */
                    if (n < 2 * n0 + 8) {
                        memmove(buf + at + 1, buf + at, n - at);
                        buf[at] = junk[moe_rng_below(&rng, sizeof junk - 1)];
                        n++;
                    }
                    break;
                default: /* delete a byte */
                    memmove(buf + at, buf + at + 1, n - at - 1);
                    n--;
                    break;
                }
            }
            eng_model_desc d;
            moe_errmsg_clear();
            moe_status st = eng_model_config_parse(buf, n, &d);
            if (st == MOE_OK) {
                ok++;
                assert_true(d.n_moe_layers >= 1 && d.top_k >= 1 && d.top_k <= d.n_experts);
                assert_int_equal(kern_route_params_check(&d.route), MOE_OK);
            } else {
                refused++;
                if (st != MOE_ERR_FORMAT && st != MOE_ERR_UNSUPPORTED)
                    fail_msg("status %s for %.*s", moe_status_name(st), (int)n, buf);
                assert_true(strlen(moe_errmsg()) > 10);
            }
        }
        free(buf);
    }
    print_message("%d mutated configs parsed, %d refused\n", ok, refused);
    assert_true(ok > 100 && refused > 100);
}

static void test_config_file(void **state) {
    (void)state;
    eng_model_desc d;
    assert_int_equal(eng_model_config_load("/nonexistent/dir/config.json", &d), MOE_ERR_NOT_FOUND);
    assert_non_null(strstr(moe_errmsg(), "/nonexistent/dir/config.json"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixtral_real),     cmocka_unit_test(test_qwen2_real),
        cmocka_unit_test(test_qwen3_real),       cmocka_unit_test(test_deepseek_v2_lite_real),
        cmocka_unit_test(test_deepseek_v3_real), cmocka_unit_test(test_deepseek_v3_transformers5_defaults),
        cmocka_unit_test(test_family_defaults),  cmocka_unit_test(test_moe_layer_rules),
        cmocka_unit_test(test_routing_rules),    cmocka_unit_test(test_broken_configs),
        cmocka_unit_test(test_family_names),     cmocka_unit_test(test_mutated_configs),
        cmocka_unit_test(test_config_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
