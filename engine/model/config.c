/*
 * config.c: config.json of the five supported MoE families -> eng_model_desc, and the
 * tensor names of each family.
 *
 * Sources of truth, cited where each value is used:
 *   - defaults: transformers' configuration classes (MixtralConfig, Qwen2MoeConfig,
 *     Qwen3MoeConfig, DeepseekV2Config, DeepseekV3Config); a field that a config.json leaves
 *     out takes the class's default. Fields those classes do not have (DeepSeek's
 *     scoring_func, topk_method for V3, moe_layer_freq) take the value that transformers'
 *     modeling code hard-codes, which is also the default of DeepSeek's own
 *     configuration_deepseek.py.
 *   - which layers are MoE layers and how routing weights are formed: transformers' modeling
 *     code (Qwen2MoeDecoderLayer, DeepseekV3MoE.route_tokens_to_experts, ...) and, for
 *     DeepSeek, DeepSeek's own modeling_deepseek.py (MoEGate), which vLLM follows too.
 *
 * Threads: pure functions. Invariants: a description that parses has 1 <= K <= E, I >= 1,
 * H >= 1, at least one MoE layer, and routing parameters that kern_route_params_check
 * accepts.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cjson/cJSON.h>

#include "engine/model/model.h"
#include "engine/model/model_impl.h"

static const struct {
    const char *model_type;
    const char *arch;       /* what transformers writes in "architectures" */
    const char *arch_stem;  /* any "<stem>For..." architecture belongs to the family */
    const char *config_cls; /* named in messages about defaults */
} families[ENG_FAMILY_COUNT_] = {
    [ENG_FAMILY_MIXTRAL] = {"mixtral", "MixtralForCausalLM", "MixtralFor", "MixtralConfig"},
    [ENG_FAMILY_QWEN2_MOE] = {"qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeFor", "Qwen2MoeConfig"},
    [ENG_FAMILY_QWEN3_MOE] = {"qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeFor", "Qwen3MoeConfig"},
    [ENG_FAMILY_DEEPSEEK_V2] = {"deepseek_v2", "DeepseekV2ForCausalLM", "DeepseekV2For", "DeepseekV2Config"},
    [ENG_FAMILY_DEEPSEEK_V3] = {"deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3For", "DeepseekV3Config"},
};

const char *eng_model_family_name(eng_model_family f) {
    return (int)f >= 0 && f < ENG_FAMILY_COUNT_ ? families[f].model_type : "invalid";
}

const char *eng_model_family_arch(eng_model_family f) {
    return (int)f >= 0 && f < ENG_FAMILY_COUNT_ ? families[f].arch : "invalid";
}

static bool family_from_arch(const char *s, eng_model_family *out) {
    for (int i = 0; i < ENG_FAMILY_COUNT_; i++) {
        if (strncmp(s, families[i].arch_stem, strlen(families[i].arch_stem)) == 0) {
            *out = (eng_model_family)i;
            return true;
        }
    }
    return false;
}

static bool family_from_type(const char *s, eng_model_family *out) {
    char norm[32];
    size_t n = strlen(s);
    if (n >= sizeof norm)
        return false;
    for (size_t k = 0; k <= n; k++) /* "deepseek-v3" names the same family as "deepseek_v3" */
        norm[k] = s[k] == '-' ? '_' : s[k];
    for (int i = 0; i < ENG_FAMILY_COUNT_; i++) {
        if (strcasecmp(norm, families[i].model_type) == 0) {
            *out = (eng_model_family)i;
            return true;
        }
    }
    return false;
}

moe_status eng_model_family_parse(const char *s, eng_model_family *out) {
    MOE_REQUIRE(s && out, MOE_ERR_INVALID_ARG, "family: missing");
    if (family_from_type(s, out) || family_from_arch(s, out))
        return MOE_OK;
    char b[64];
    return moe_fail(MOE_ERR_INVALID_ARG,
                    "unknown model family '%s' (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3)",
                    eng_sanitize(s, b, sizeof b));
}

/* ------------------------------------------------------------------------------------------
 * Field access. A field is absent, null, or has a value; "absent" takes the class default,
 * which may itself be None (unset).
 * ---------------------------------------------------------------------------------------- */
typedef struct cfg {
    const cJSON *root;
    eng_model_family fam;
} cfg;

typedef enum fstate { F_UNSET_ABSENT = 0, F_UNSET_NULL = 1, F_SET = 2 } fstate;

typedef struct opt_int {
    fstate st;
    int64_t v;
} opt_int;

typedef struct opt_def {
    bool has; /* false: the class default is None */
    double v;
} opt_def;

#define DEF(x) ((opt_def){true, (double)(x)})
#define DEF_NONE ((opt_def){false, 0.0})

/* The item for `key`, or for `alias` (another name transformers maps to the same attribute
 * through the class's attribute_map). Both present with different values is an error. */
static moe_status cfg_item(const cfg *c, const char *key, const char *alias, const cJSON **out, const char **used) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(c->root, key);
    const cJSON *b = alias ? cJSON_GetObjectItemCaseSensitive(c->root, alias) : NULL;
    if (a && b && !cJSON_Compare(a, b, true))
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' and '%s' name the same setting but differ", key, alias);
    *out = a ? a : b;
    *used = a ? key : alias;
    return MOE_OK;
}

static moe_status cfg_int(const cfg *c, const char *key, const char *alias, opt_def def, int64_t lo, int64_t hi,
                          opt_int *out) {
    const cJSON *j = NULL;
    const char *used = key;
    MOE_CHECK(cfg_item(c, key, alias, &j, &used));
    out->st = F_SET;
    if (!j) {
        out->st = def.has ? F_SET : F_UNSET_ABSENT;
        out->v = (int64_t)def.v;
        return MOE_OK;
    }
    if (cJSON_IsNull(j)) {
        out->st = F_UNSET_NULL;
        out->v = 0;
        return MOE_OK;
    }
    double d = j->valuedouble;
    if (!cJSON_IsNumber(j) || !(d >= -9.0e15 && d <= 9.0e15) || d != floor(d))
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' must be an integer", used);
    if (d < (double)lo || d > (double)hi)
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' = %lld is out of range [%lld, %lld]", used, (long long)d,
                        (long long)lo, (long long)hi);
    out->v = (int64_t)d;
    return MOE_OK;
}

/* An integer the model cannot do without: unset is an error naming the field. */
static moe_status cfg_int_req(const cfg *c, const char *key, const char *alias, opt_def def, int64_t lo, int64_t hi,
                              int32_t *out) {
    opt_int v;
    MOE_CHECK(cfg_int(c, key, alias, def, lo, hi, &v));
    if (v.st == F_UNSET_ABSENT)
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' is missing and %s has no default for it", key,
                        families[c->fam].config_cls);
    if (v.st == F_UNSET_NULL)
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' is null; a MoE model needs a value", key);
    *out = (int32_t)v.v;
    return MOE_OK;
}

static moe_status cfg_float(const cfg *c, const char *key, double def, double *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(c->root, key);
    if (!j || cJSON_IsNull(j)) {
        *out = def;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble))
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' must be a finite number", key);
    *out = j->valuedouble;
    return MOE_OK;
}

static moe_status cfg_bool(const cfg *c, const char *key, bool def, bool *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(c->root, key);
    if (!j) {
        *out = def;
        return MOE_OK;
    }
    if (cJSON_IsNull(j)) { /* `bool | None`: None is falsy where the modeling code tests it */
        *out = false;
        return MOE_OK;
    }
    if (!cJSON_IsBool(j))
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' must be true or false", key);
    *out = cJSON_IsTrue(j);
    return MOE_OK;
}

static moe_status cfg_str(const cfg *c, const char *key, const char *def, char *out, size_t cap) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(c->root, key);
    const char *v = def;
    if (j && !cJSON_IsNull(j)) {
        if (!cJSON_IsString(j))
            return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' must be a string", key);
        v = j->valuestring;
    }
    char b[64];
    if (strlen(v) >= cap)
        return moe_fail(MOE_ERR_FORMAT, "config.json: '%s' value '%s' is too long", key, eng_sanitize(v, b, sizeof b));
    snprintf(out, cap, "%s", v);
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Families.
 * ---------------------------------------------------------------------------------------- */
static moe_status set_moe_layers_all(eng_model_desc *d) {
    d->n_moe_layers = 0;
    for (int32_t l = 0; l < d->n_layers; l++)
        d->moe_layers[d->n_moe_layers++] = l;
    return MOE_OK;
}

/* Mixtral: MixtralConfig defaults (hidden_size 4096, intermediate_size 14336 is the expert
 * size, num_hidden_layers 32, num_local_experts 8 -- attribute_map also takes "num_experts" --,
 * num_experts_per_tok 2). Every layer is a MoE layer (MixtralDecoderLayer), routing is softmax,
 * top-k, then division by the sum of the top-k (MixtralTopKRouter / the sparse MoE block). */
static moe_status parse_mixtral(const cfg *c, eng_model_desc *d) {
    MOE_CHECK(cfg_int_req(c, "hidden_size", NULL, DEF(4096), 1, 1 << 20, &d->hidden_size));
    MOE_CHECK(cfg_int_req(c, "num_hidden_layers", NULL, DEF(32), 1, ENG_MODEL_MAX_LAYERS, &d->n_layers));
    MOE_CHECK(cfg_int_req(c, "num_local_experts", "num_experts", DEF(8), 1, 1 << 16, &d->n_experts));
    MOE_CHECK(cfg_int_req(c, "num_experts_per_tok", NULL, DEF(2), 1, 1 << 16, &d->top_k));
    MOE_CHECK(cfg_int_req(c, "intermediate_size", NULL, DEF(14336), 1, 1 << 22, &d->moe_intermediate));
    d->route.renormalize = true;
    snprintf(d->scoring_func, sizeof d->scoring_func, "softmax");
    return set_moe_layers_all(d);
}

/* Qwen2-MoE and Qwen3-MoE. Defaults: Qwen2MoeConfig (hidden_size 2048, num_hidden_layers 24,
 * num_experts 60, num_experts_per_tok 4, moe_intermediate_size 1408,
 * shared_expert_intermediate_size 5632, norm_topk_prob false, decoder_sparse_step 1,
 * mlp_only_layers []), Qwen3MoeConfig (2048, 24, num_experts 128 -- attribute_map also takes
 * "num_local_experts" --, top-k 8, moe_intermediate_size 768, norm_topk_prob false,
 * decoder_sparse_step 1, mlp_only_layers [], no shared expert).
 * MoE layers (Qwen2MoeDecoderLayer, which Qwen3MoeDecoderLayer reuses): layer l is sparse when
 * l is not in mlp_only_layers and num_experts > 0 and (l + 1) % decoder_sparse_step == 0.
 * Routing (Qwen2MoeTopKRouter): softmax, top-k, divided by the top-k sum iff norm_topk_prob.
 * Qwen2-MoE's shared expert output is sigmoid(shared_expert_gate(x)) * shared_expert(x). */
static moe_status parse_qwen(const cfg *c, eng_model_desc *d, bool qwen2) {
    MOE_CHECK(cfg_int_req(c, "hidden_size", NULL, DEF(2048), 1, 1 << 20, &d->hidden_size));
    MOE_CHECK(cfg_int_req(c, "num_hidden_layers", NULL, DEF(24), 1, ENG_MODEL_MAX_LAYERS, &d->n_layers));
    opt_int e;
    MOE_CHECK(cfg_int(c, "num_experts", qwen2 ? NULL : "num_local_experts", DEF(qwen2 ? 60 : 128), 0, 1 << 16, &e));
    if (e.st != F_SET || e.v == 0)
        return moe_fail(MOE_ERR_FORMAT, "config.json: 'num_experts' is %s: a dense model, no MoE layers to serve",
                        e.st == F_SET ? "0" : "null");
    d->n_experts = (int32_t)e.v;
    MOE_CHECK(cfg_int_req(c, "num_experts_per_tok", NULL, DEF(qwen2 ? 4 : 8), 1, 1 << 16, &d->top_k));
    MOE_CHECK(cfg_int_req(c, "moe_intermediate_size", NULL, DEF(qwen2 ? 1408 : 768), 1, 1 << 22, &d->moe_intermediate));
    if (qwen2) {
        MOE_CHECK(
            cfg_int_req(c, "shared_expert_intermediate_size", NULL, DEF(5632), 0, 1 << 24, &d->shared_intermediate));
        d->n_shared_experts = d->shared_intermediate > 0 ? 1 : 0;
        d->has_shared_gate = d->shared_intermediate > 0;
    }
    MOE_CHECK(cfg_bool(c, "norm_topk_prob", false, &d->route.renormalize));
    int32_t step;
    MOE_CHECK(cfg_int_req(c, "decoder_sparse_step", NULL, DEF(1), 1, 1 << 20, &step));
    const cJSON *mlp_only = cJSON_GetObjectItemCaseSensitive(c->root, "mlp_only_layers");
    if (mlp_only && !cJSON_IsNull(mlp_only) && !cJSON_IsArray(mlp_only))
        return moe_fail(MOE_ERR_FORMAT, "config.json: 'mlp_only_layers' must be a list of layer indices");
    if (cJSON_IsArray(mlp_only)) {
        int i = 0;
        for (const cJSON *x = mlp_only->child; x; x = x->next, i++) {
            if (!cJSON_IsNumber(x) || x->valuedouble != floor(x->valuedouble))
                return moe_fail(MOE_ERR_FORMAT, "config.json: 'mlp_only_layers'[%d] is not an integer", i);
        }
    }
    d->n_moe_layers = 0;
    for (int32_t l = 0; l < d->n_layers; l++) {
        bool dense = false;
        if (cJSON_IsArray(mlp_only)) {
            for (const cJSON *x = mlp_only->child; x && !dense; x = x->next)
                dense = x->valuedouble == (double)l;
        }
        if (!dense && (l + 1) % step == 0)
            d->moe_layers[d->n_moe_layers++] = l;
    }
    snprintf(d->scoring_func, sizeof d->scoring_func, "softmax");
    return MOE_OK;
}

/* DeepSeek-V2 and V3.
 * Defaults: DeepseekV2Config (hidden_size 4096, num_hidden_layers 32, n_routed_experts 64,
 * num_experts_per_tok None, moe_intermediate_size 1407, n_shared_experts 2,
 * first_k_dense_replace 0, n_group None, topk_group None, topk_method "greedy",
 * norm_topk_prob false, routed_scaling_factor 1.0); DeepseekV3Config (7168, 61, 256, 8, 2048,
 * 1, 3, n_group 8, topk_group 4, norm_topk_prob true, routed_scaling_factor 2.5). Neither class
 * has scoring_func or moe_layer_freq, and V3's has no topk_method: transformers'
 * DeepseekV2Moe always scores with softmax, DeepseekV3MoE always with sigmoid and noaux_tc
 * (top-2-sum groups, e_score_correction_bias); DeepSeek's configuration_deepseek.py has
 * moe_layer_freq 1 and scoring_func "softmax" (V2). A config that names these fields is
 * followed (DeepSeek's own checkpoints do: "scoring_func": "sigmoid", "topk_method":
 * "noaux_tc" for V3).
 * MoE layers (DeepSeek's DeepseekV2DecoderLayer / DeepseekV3DecoderLayer, and vLLM):
 * n_routed_experts set, l >= first_k_dense_replace and l % moe_layer_freq == 0 (transformers
 * checks the first two only: the same with the default moe_layer_freq 1).
 * Routing weights (DeepSeek's MoEGate): V2 renormalizes when top_k > 1 and norm_topk_prob,
 * and otherwise multiplies by routed_scaling_factor; V3 renormalizes under the same
 * condition and then always multiplies. */
static moe_status parse_deepseek(const cfg *c, eng_model_desc *d, bool v3) {
    MOE_CHECK(cfg_int_req(c, "hidden_size", NULL, DEF(v3 ? 7168 : 4096), 1, 1 << 20, &d->hidden_size));
    MOE_CHECK(cfg_int_req(c, "num_hidden_layers", NULL, DEF(v3 ? 61 : 32), 1, ENG_MODEL_MAX_LAYERS, &d->n_layers));
    opt_int e;
    MOE_CHECK(
        cfg_int(c, "n_routed_experts", v3 ? "num_local_experts" : "num_experts", DEF(v3 ? 256 : 64), 0, 1 << 16, &e));
    if (e.st != F_SET || e.v == 0)
        return moe_fail(MOE_ERR_FORMAT, "config.json: 'n_routed_experts' is %s: a dense model, no MoE layers to serve",
                        e.st == F_SET ? "0" : "null");
    d->n_experts = (int32_t)e.v;
    MOE_CHECK(cfg_int_req(c, "num_experts_per_tok", NULL, v3 ? DEF(8) : DEF_NONE, 1, 1 << 16, &d->top_k));
    MOE_CHECK(cfg_int_req(c, "moe_intermediate_size", NULL, DEF(v3 ? 2048 : 1407), 1, 1 << 22, &d->moe_intermediate));
    opt_int ns;
    MOE_CHECK(cfg_int(c, "n_shared_experts", NULL, DEF(v3 ? 1 : 2), 0, 1 << 10, &ns));
    d->n_shared_experts = ns.st == F_SET ? (int32_t)ns.v : 0; /* None: no shared experts */
    int64_t is = (int64_t)d->n_shared_experts * d->moe_intermediate;
    if (is > (1 << 26))
        return moe_fail(MOE_ERR_FORMAT, "config.json: n_shared_experts x moe_intermediate_size = %lld is too large",
                        (long long)is);
    d->shared_intermediate = (int32_t)is;
    int32_t first_dense, freq;
    MOE_CHECK(cfg_int_req(c, "first_k_dense_replace", NULL, DEF(v3 ? 3 : 0), 0, 1 << 20, &first_dense));
    MOE_CHECK(cfg_int_req(c, "moe_layer_freq", NULL, DEF(1), 1, 1 << 20, &freq));
    opt_int ng, tg;
    MOE_CHECK(cfg_int(c, "n_group", NULL, v3 ? DEF(8) : DEF_NONE, 1, 1 << 16, &ng));
    MOE_CHECK(cfg_int(c, "topk_group", NULL, v3 ? DEF(4) : DEF_NONE, 1, 1 << 16, &tg));
    MOE_CHECK(cfg_str(c, "topk_method", v3 ? "noaux_tc" : "greedy", d->topk_method, sizeof d->topk_method));
    MOE_CHECK(cfg_str(c, "scoring_func", v3 ? "sigmoid" : "softmax", d->scoring_func, sizeof d->scoring_func));
    bool norm;
    MOE_CHECK(cfg_bool(c, "norm_topk_prob", v3, &norm));
    double rsf = 0.0;
    MOE_CHECK(cfg_float(c, "routed_scaling_factor", v3 ? 2.5 : 1.0, &rsf));
    if (!(rsf > 0.0 && rsf < 1e30))
        return moe_fail(MOE_ERR_FORMAT, "config.json: 'routed_scaling_factor' = %g must be > 0", rsf);

    char b[40];
    if (strcmp(d->scoring_func, "softmax") == 0)
        d->route.scoring = KERN_SCORE_SOFTMAX;
    else if (strcmp(d->scoring_func, "sigmoid") == 0)
        d->route.scoring = KERN_SCORE_SIGMOID;
    else
        return moe_fail(MOE_ERR_UNSUPPORTED, "config.json: scoring_func '%s' is not supported (softmax, sigmoid)",
                        eng_sanitize(d->scoring_func, b, sizeof b));

    /* "gready" is the default spelled in DeepSeek-V2's configuration_deepseek.py */
    if (strcmp(d->topk_method, "greedy") == 0 || strcmp(d->topk_method, "gready") == 0) {
        snprintf(d->topk_method, sizeof d->topk_method, "greedy");
        d->route.group_mode = KERN_GROUP_NONE;
    } else if (strcmp(d->topk_method, "group_limited_greedy") == 0 || strcmp(d->topk_method, "noaux_tc") == 0) {
        bool noaux = d->topk_method[0] == 'n';
        d->has_correction_bias = noaux;
        if (ng.st != F_SET || tg.st != F_SET)
            return moe_fail(MOE_ERR_FORMAT, "config.json: topk_method '%s' needs '%s' (it is %s)", d->topk_method,
                            ng.st != F_SET ? "n_group" : "topk_group",
                            (ng.st != F_SET ? ng.st : tg.st) == F_UNSET_NULL ? "null" : "missing");
        if (ng.v > 1) {
            d->route.group_mode = noaux ? KERN_GROUP_TOP2_SUM : KERN_GROUP_MAX;
            d->route.n_group = (int32_t)ng.v;
            d->route.topk_group = (int32_t)tg.v;
        } else {
            d->route.group_mode = KERN_GROUP_NONE; /* one group: group selection keeps everything */
        }
    } else {
        return moe_fail(MOE_ERR_UNSUPPORTED,
                        "config.json: topk_method '%s' is not supported (greedy, group_limited_greedy, noaux_tc)",
                        eng_sanitize(d->topk_method, b, sizeof b));
    }
    d->route.renormalize = norm && d->top_k > 1;
    if (v3)
        d->route.routed_scaling_factor = (float)rsf;
    else
        d->route.routed_scaling_factor = d->route.renormalize ? 1.0f : (float)rsf;

    d->n_moe_layers = 0;
    for (int32_t l = 0; l < d->n_layers; l++) {
        if (l >= first_dense && l % freq == 0)
            d->moe_layers[d->n_moe_layers++] = l;
    }
    return MOE_OK;
}

moe_status eng_model_config_parse(const char *json, size_t len, eng_model_desc *out) {
    MOE_REQUIRE(json && out, MOE_ERR_INVALID_ARG, "config_parse: NULL argument");
    moe_status st = MOE_OK;
    const char *end = NULL;
    char b[96];
    eng_model_desc *d = calloc(1, sizeof *d);
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!d) {
        st = moe_fail(MOE_ERR_NOMEM, "config_parse");
        goto done;
    }
    if (!root) {
        st = moe_fail(MOE_ERR_FORMAT, "config.json: not valid JSON (at byte %zu of %zu)",
                      end ? (size_t)(end - json) : (size_t)0, len);
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        st = moe_fail(MOE_ERR_FORMAT, "config.json: not a JSON object");
        goto done;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const char *arch = NULL;
    if (cJSON_IsArray(archs) && cJSON_IsString(archs->child))
        arch = archs->child->valuestring;
    const char *type = cJSON_IsString(mt) ? mt->valuestring : NULL;
    eng_model_family fa, ft;
    bool has_a = arch && family_from_arch(arch, &fa);
    bool has_t = type && family_from_type(type, &ft);
    if (!has_a && !has_t) {
        char b2[64];
        st = moe_fail(MOE_ERR_UNSUPPORTED,
                      "config.json: unknown architecture '%s' (model_type '%s'); supported: MixtralForCausalLM, "
                      "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM",
                      eng_sanitize(arch ? arch : "(none)", b, sizeof b),
                      eng_sanitize(type ? type : "(none)", b2, sizeof b2));
        goto done;
    }
    /* The architecture decides where both are known and disagree (checkpoints that reuse an
     * architecture under their own model_type, e.g. kimi_k2 with DeepseekV3ForCausalLM). */
    d->family = has_a ? fa : ft;
    eng_sanitize(arch ? arch : families[d->family].arch, d->architecture, sizeof d->architecture);
    eng_sanitize(type ? type : families[d->family].model_type, d->model_type, sizeof d->model_type);

    cfg c = {.root = root, .fam = d->family};
    d->dtype = MOE_DTYPE_BF16;
    char dts[32];
    const cJSON *jdt = cJSON_GetObjectItemCaseSensitive(root, "torch_dtype");
    MOE_CHECK_GOTO(cfg_str(&c, jdt ? "torch_dtype" : "dtype", "bfloat16", dts, sizeof dts), st, done);
    moe_dtype dt;
    if (moe_dtype_parse(dts, &dt) == MOE_OK && moe_dtype_is_float(dt))
        d->dtype = dt; /* others (e.g. fp8 checkpoints) are judged by their tensors */
    moe_errmsg_clear();

    d->route = kern_route_params_default(1, 1);
    switch (d->family) {
    case ENG_FAMILY_MIXTRAL:
        MOE_CHECK_GOTO(parse_mixtral(&c, d), st, done);
        break;
    case ENG_FAMILY_QWEN2_MOE:
    case ENG_FAMILY_QWEN3_MOE:
        MOE_CHECK_GOTO(parse_qwen(&c, d, d->family == ENG_FAMILY_QWEN2_MOE), st, done);
        break;
    case ENG_FAMILY_DEEPSEEK_V2:
    case ENG_FAMILY_DEEPSEEK_V3:
        MOE_CHECK_GOTO(parse_deepseek(&c, d, d->family == ENG_FAMILY_DEEPSEEK_V3), st, done);
        break;
    default:
        st = moe_fail(MOE_ERR_INTERNAL, "config_parse: family %d", (int)d->family);
        goto done;
    }
    MOE_CHECK_GOTO(cfg_str(&c, "hidden_act", "silu", d->hidden_act, sizeof d->hidden_act), st, done);
    if (kern_act_parse(d->hidden_act, &d->act) != MOE_OK) {
        st = moe_fail(MOE_ERR_UNSUPPORTED, "config.json: hidden_act '%s' is not supported (silu, gelu, gelu_tanh)",
                      eng_sanitize(d->hidden_act, b, sizeof b));
        goto done;
    }
    if (d->top_k > d->n_experts) {
        st = moe_fail(MOE_ERR_FORMAT, "config.json: num_experts_per_tok = %d exceeds the %d routed experts",
                      (int)d->top_k, (int)d->n_experts);
        goto done;
    }
    if (d->n_moe_layers == 0) {
        st = moe_fail(MOE_ERR_FORMAT, "config.json: none of the %d layers is a MoE layer under %s's rules",
                      (int)d->n_layers, families[d->family].config_cls);
        goto done;
    }
    d->route.n_experts = d->n_experts;
    d->route.top_k = d->top_k;
    d->route.correction_bias = NULL;
    if (kern_route_params_check(&d->route) != MOE_OK) {
        char m[200];
        snprintf(m, sizeof m, "%s", moe_errmsg());
        st = moe_fail(MOE_ERR_FORMAT, "config.json: the routing settings are inconsistent: %s", m);
        goto done;
    }
    *out = *d;
done:
    cJSON_Delete(root);
    free(d);
    return st;
}

moe_status eng_model_config_load(const char *path, eng_model_desc *out) {
    char *text = NULL;
    size_t len = 0;
    MOE_CHECK(eng_read_file(path, 16u << 20, &text, &len));
    moe_status st = eng_model_config_parse(text, len, out);
    if (st != MOE_OK) {
        /* the parser's messages say "config.json"; name the actual file */
        char m[400];
        snprintf(m, sizeof m, "%s", moe_errmsg());
        const char *rest = strncmp(m, "config.json: ", 13) == 0 ? m + 13 : m;
        moe_fail(st, "%s: %s", path, rest);
    }
    free(text);
    return st;
}

bool eng_model_is_moe_layer(const eng_model_desc *d, int32_t layer) {
    for (int32_t i = 0; i < d->n_moe_layers; i++)
        if (d->moe_layers[i] == layer)
            return true;
    return false;
}

const char *eng_model_desc_str(const eng_model_desc *d, char *buf, size_t cap) {
    char sh[64] = "";
    if (d->shared_intermediate > 0)
        snprintf(sh, sizeof sh, ", shared I=%d%s", (int)d->shared_intermediate, d->has_shared_gate ? " gated" : "");
    char grp[64] = "";
    if (d->route.group_mode != KERN_GROUP_NONE)
        snprintf(grp, sizeof grp, ", %s groups %d/%d", d->route.group_mode == KERN_GROUP_MAX ? "max" : "top2-sum",
                 (int)d->route.topk_group, (int)d->route.n_group);
    snprintf(buf, cap, "%s (%s) %s: H=%d, %d layers (%d MoE), E=%d, K=%d, I=%d%s, %s top-%d%s%s%s, scale %g, %s",
             d->model_type, d->architecture, moe_dtype_name(d->dtype), (int)d->hidden_size, (int)d->n_layers,
             (int)d->n_moe_layers, (int)d->n_experts, (int)d->top_k, (int)d->moe_intermediate, sh, d->scoring_func,
             (int)d->top_k, grp, d->has_correction_bias ? ", correction bias" : "",
             d->route.renormalize ? ", renormalized" : "", (double)d->route.routed_scaling_factor,
             kern_act_name(d->act));
    return buf;
}

/* ------------------------------------------------------------------------------------------
 * Tensor names (transformers' module paths; identical in the checkpoints DeepSeek, Qwen and
 * Mistral publish).
 * ---------------------------------------------------------------------------------------- */
bool eng_model_has_tensor(const eng_model_desc *d, eng_model_tensor kind) {
    switch (kind) {
    case ENG_TENSOR_ROUTER:
    case ENG_TENSOR_EXPERT_GATE:
    case ENG_TENSOR_EXPERT_UP:
    case ENG_TENSOR_EXPERT_DOWN:
        return true;
    case ENG_TENSOR_CORRECTION_BIAS:
        return d->has_correction_bias;
    case ENG_TENSOR_SHARED_GATE_PROJ:
    case ENG_TENSOR_SHARED_UP_PROJ:
    case ENG_TENSOR_SHARED_DOWN_PROJ:
        return d->shared_intermediate > 0;
    case ENG_TENSOR_SHARED_EXPERT_GATE:
        return d->has_shared_gate;
    default:
        return false;
    }
}

moe_status eng_model_tensor_name(const eng_model_desc *d, eng_model_tensor kind, int32_t layer, int32_t expert,
                                 char *buf, size_t cap) {
    MOE_REQUIRE(d && buf, MOE_ERR_INVALID_ARG, "tensor_name: NULL argument");
    MOE_REQUIRE(eng_model_has_tensor(d, kind), MOE_ERR_INVALID_ARG, "tensor_name: kind %d does not exist in %s",
                (int)kind, d->model_type);
    bool mix = d->family == ENG_FAMILY_MIXTRAL;
    const char *blk = mix ? "block_sparse_moe" : "mlp";
    const char *shared = d->family == ENG_FAMILY_QWEN2_MOE ? "shared_expert" : "shared_experts";
    int n;
    switch (kind) {
    case ENG_TENSOR_ROUTER:
        n = snprintf(buf, cap, "model.layers.%d.%s.gate.weight", (int)layer, blk);
        break;
    case ENG_TENSOR_CORRECTION_BIAS:
        n = snprintf(buf, cap, "model.layers.%d.%s.gate.e_score_correction_bias", (int)layer, blk);
        break;
    case ENG_TENSOR_EXPERT_GATE:
        n = snprintf(buf, cap, "model.layers.%d.%s.experts.%d.%s.weight", (int)layer, blk, (int)expert,
                     mix ? "w1" : "gate_proj");
        break;
    case ENG_TENSOR_EXPERT_UP:
        n = snprintf(buf, cap, "model.layers.%d.%s.experts.%d.%s.weight", (int)layer, blk, (int)expert,
                     mix ? "w3" : "up_proj");
        break;
    case ENG_TENSOR_EXPERT_DOWN:
        n = snprintf(buf, cap, "model.layers.%d.%s.experts.%d.%s.weight", (int)layer, blk, (int)expert,
                     mix ? "w2" : "down_proj");
        break;
    case ENG_TENSOR_SHARED_GATE_PROJ:
        n = snprintf(buf, cap, "model.layers.%d.mlp.%s.gate_proj.weight", (int)layer, shared);
        break;
    case ENG_TENSOR_SHARED_UP_PROJ:
        n = snprintf(buf, cap, "model.layers.%d.mlp.%s.up_proj.weight", (int)layer, shared);
        break;
    case ENG_TENSOR_SHARED_DOWN_PROJ:
        n = snprintf(buf, cap, "model.layers.%d.mlp.%s.down_proj.weight", (int)layer, shared);
        break;
    case ENG_TENSOR_SHARED_EXPERT_GATE:
        n = snprintf(buf, cap, "model.layers.%d.mlp.shared_expert_gate.weight", (int)layer);
        break;
    default:
        return moe_fail(MOE_ERR_INVALID_ARG, "tensor_name: kind %d", (int)kind);
    }
    MOE_REQUIRE(n > 0 && (size_t)n < cap, MOE_ERR_INVALID_ARG, "tensor_name: buffer of %zu bytes too small", cap);
    return MOE_OK;
}

void eng_model_tensor_shape(const eng_model_desc *d, eng_model_tensor kind, int32_t *ndim, int64_t shape[2]) {
    int64_t H = d->hidden_size, E = d->n_experts, I = d->moe_intermediate, Is = d->shared_intermediate;
    *ndim = 2;
    switch (kind) {
    case ENG_TENSOR_ROUTER:
        shape[0] = E, shape[1] = H;
        break;
    case ENG_TENSOR_CORRECTION_BIAS:
        *ndim = 1;
        shape[0] = E, shape[1] = 0;
        break;
    case ENG_TENSOR_EXPERT_GATE:
    case ENG_TENSOR_EXPERT_UP:
        shape[0] = I, shape[1] = H;
        break;
    case ENG_TENSOR_EXPERT_DOWN:
        shape[0] = H, shape[1] = I;
        break;
    case ENG_TENSOR_SHARED_GATE_PROJ:
    case ENG_TENSOR_SHARED_UP_PROJ:
        shape[0] = Is, shape[1] = H;
        break;
    case ENG_TENSOR_SHARED_DOWN_PROJ:
        shape[0] = H, shape[1] = Is;
        break;
    case ENG_TENSOR_SHARED_EXPERT_GATE:
        shape[0] = 1, shape[1] = H;
        break;
    default:
        *ndim = 0;
        shape[0] = shape[1] = 0;
        break;
    }
}
