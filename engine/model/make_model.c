/*
 * make_model.c: the `make-model` command: flags -> eng_synth_params -> eng_synth_write, with a
 * progress line on a terminal and a one-paragraph summary. The daemon's `moe-engine
 * make-model` subcommand calls eng_make_model_main; bazel-bin/engine/model/make-model is the
 * same as a standalone program.
 *
 * Every flag is checked: an unknown flag, a missing or malformed value, a value out of range,
 * or a flag that does not apply to the chosen family is a usage error (exit 2) that names
 * it. Threads: runs on the caller's thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "engine/model/model.h"

static const char usage_text[] =
    "usage: make-model --family FAMILY --out DIR [options]\n"
    "\n"
    "Writes a synthetic Hugging Face MoE checkpoint: config.json in the family's format,\n"
    "safetensors shards in transformers' tensor naming, model.safetensors.index.json when\n"
    "there is more than one shard. Weights are normal(0, 1/sqrt(fan_in)) from --seed; only the\n"
    "tensors the engine reads are written (router, routed experts, shared experts, shared\n"
    "expert gate, e_score_correction_bias).\n"
    "\n"
    "  --family F              mixtral | qwen2_moe | qwen3_moe | deepseek_v2 | deepseek_v3 (required)\n"
    "  --out DIR               output directory, created if missing (required)\n"
    "  --layers N              num_hidden_layers (default 2)\n"
    "  --experts E             routed experts (default 8)\n"
    "  --top-k K               experts per token, num_experts_per_tok (default 2)\n"
    "  --hidden H              hidden_size (default 256)\n"
    "  --intermediate I        intermediate size of one routed expert (default 512)\n"
    "  --shared-intermediate N qwen2_moe: shared_expert_intermediate_size (default 2*I; 0: none)\n"
    "  --shared-experts N      deepseek_*: n_shared_experts (default 2 for v2, 1 for v3; 0: none)\n"
    "  --dense-layers N        deepseek_*: first_k_dense_replace (default 0)\n"
    "  --moe-layer-freq N      deepseek_*: moe_layer_freq (default 1)\n"
    "  --sparse-step N         qwen*: decoder_sparse_step (default 1)\n"
    "  --mlp-only-layers L     qwen*: comma-separated layers with a dense MLP (default none)\n"
    "  --groups G              deepseek_*: n_group (default for v3: 4, or fewer where 4 does not\n"
    "                          divide --experts; none for v2; 0: none)\n"
    "  --topk-group G          deepseek_*: topk_group (default 2 for v3)\n"
    "  --topk-method M         deepseek_*: greedy | group_limited_greedy | noaux_tc\n"
    "                          (default greedy for v2, noaux_tc for v3)\n"
    "  --scoring S             deepseek_*: scoring_func softmax | sigmoid (default softmax for v2,\n"
    "                          sigmoid for v3)\n"
    "  --scaling F             deepseek_*: routed_scaling_factor (default 1.0 for v2, 2.5 for v3)\n"
    "  --norm-topk-prob B      qwen*, deepseek_*: true | false (default false for qwen2_moe and\n"
    "                          deepseek_v2, true for qwen3_moe and deepseek_v3)\n"
    "  --act A                 hidden_act: silu | gelu | gelu_pytorch_tanh (default silu)\n"
    "  --dtype D               bf16 | f16 | f32 (default bf16)\n"
    "  --seed N                random seed, 0 .. 2^64-1 (default 0)\n"
    "  --shard-size S          largest shard in bytes, suffix K, M or G for KiB, MiB, GiB (default 1G)\n"
    "  --fused-experts         write each layer's routed experts as transformers 5's fused\n"
    "                          experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]\n"
    "                          (same values as the per-expert tensors of the same seed)\n"
    "  --force                 replace the checkpoint files of an existing DIR\n"
    "  --quiet                 no progress line and no summary\n"
    "  -h, --help              this text\n";

typedef struct opt {
    const char *name;
    bool has_value;
    unsigned families; /* bit per eng_model_family; 0: all */
} opt;

#define F_MIX (1u << ENG_FAMILY_MIXTRAL)
#define F_Q2 (1u << ENG_FAMILY_QWEN2_MOE)
#define F_Q3 (1u << ENG_FAMILY_QWEN3_MOE)
#define F_DS2 (1u << ENG_FAMILY_DEEPSEEK_V2)
#define F_DS3 (1u << ENG_FAMILY_DEEPSEEK_V3)
#define F_DS (F_DS2 | F_DS3)
#define F_QW (F_Q2 | F_Q3)

enum {
    O_FAMILY,
    O_OUT,
    O_LAYERS,
    O_EXPERTS,
    O_TOPK,
    O_HIDDEN,
    O_INTER,
    O_SHARED_INTER,
    O_SHARED_EXPERTS,
    O_DENSE,
    O_FREQ,
    O_STEP,
    O_MLP_ONLY,
    O_GROUPS,
    O_TOPK_GROUP,
    O_TOPK_METHOD,
    O_SCORING,
    O_SCALING,
    O_NORM,
    O_ACT,
    O_DTYPE,
    O_SEED,
    O_SHARD,
    O_FUSED,
    O_FORCE,
    O_QUIET,
    O_HELP,
    O_COUNT
};

static const opt opts[O_COUNT] = {
    [O_FAMILY] = {"family", true, 0},
    [O_OUT] = {"out", true, 0},
    [O_LAYERS] = {"layers", true, 0},
    [O_EXPERTS] = {"experts", true, 0},
    [O_TOPK] = {"top-k", true, 0},
    [O_HIDDEN] = {"hidden", true, 0},
    [O_INTER] = {"intermediate", true, 0},
    [O_SHARED_INTER] = {"shared-intermediate", true, F_Q2},
    [O_SHARED_EXPERTS] = {"shared-experts", true, F_DS},
    [O_DENSE] = {"dense-layers", true, F_DS},
    [O_FREQ] = {"moe-layer-freq", true, F_DS},
    [O_STEP] = {"sparse-step", true, F_QW},
    [O_MLP_ONLY] = {"mlp-only-layers", true, F_QW},
    [O_GROUPS] = {"groups", true, F_DS},
    [O_TOPK_GROUP] = {"topk-group", true, F_DS},
    [O_TOPK_METHOD] = {"topk-method", true, F_DS},
    [O_SCORING] = {"scoring", true, F_DS},
    [O_SCALING] = {"scaling", true, F_DS},
    [O_NORM] = {"norm-topk-prob", true, F_QW | F_DS},
    [O_ACT] = {"act", true, 0},
    [O_DTYPE] = {"dtype", true, 0},
    [O_SEED] = {"seed", true, 0},
    [O_SHARD] = {"shard-size", true, 0},
    [O_FUSED] = {"fused-experts", false, 0},
    [O_FORCE] = {"force", false, 0},
    [O_QUIET] = {"quiet", false, 0},
    [O_HELP] = {"help", false, 0},
};

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "make-model: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(make-model --help lists the flags)\n");
    va_end(ap);
    return 2;
}

static bool parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    if (!s || !*s)
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static bool parse_u64(const char *s, uint64_t *out) {
    if (!s || !*s || *s == '-' || *s == '+')
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

static bool parse_size(const char *s, uint64_t *out) {
    if (!s || !*s || *s == '-' || *s == '+')
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return false;
    uint64_t mul = 1;
    if (*end) {
        switch (*end) {
        case 'k':
        case 'K':
            mul = 1ull << 10;
            break;
        case 'm':
        case 'M':
            mul = 1ull << 20;
            break;
        case 'g':
        case 'G':
            mul = 1ull << 30;
            break;
        default:
            return false;
        }
        end++;
        if (*end == 'i' || *end == 'I')
            end++;
        if (*end == 'b' || *end == 'B')
            end++;
        if (*end)
            return false;
    }
    if (v == 0 || v > UINT64_MAX / mul)
        return false;
    *out = v * mul;
    return true;
}

static bool parse_bool(const char *s, bool *out) {
    if (!strcasecmp(s, "true") || !strcmp(s, "1") || !strcasecmp(s, "yes")) {
        *out = true;
        return true;
    }
    if (!strcasecmp(s, "false") || !strcmp(s, "0") || !strcasecmp(s, "no")) {
        *out = false;
        return true;
    }
    return false;
}

static const char *family_list(unsigned mask) {
    static const char *names[] = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"};
    static _Thread_local char buf[96];
    buf[0] = '\0';
    for (int i = 0; i < ENG_FAMILY_COUNT_; i++) {
        if (mask & (1u << i)) {
            if (buf[0])
                strcat(buf, ", ");
            strcat(buf, names[i]);
        }
    }
    return buf;
}

/* The bytes of tensor data the writer puts on disk (the router in the model's dtype, the
 * correction bias in fp32). */
static uint64_t written_bytes(const eng_model_desc *d, moe_dtype dt) {
    uint64_t es = moe_dtype_size(dt), H = (uint64_t)d->hidden_size, E = (uint64_t)d->n_experts;
    uint64_t per = E * 3u * H * (uint64_t)d->moe_intermediate * es + E * H * es;
    per += d->has_correction_bias ? E * 4u : 0u;
    per += 3u * H * (uint64_t)d->shared_intermediate * es + (d->has_shared_gate ? H * es : 0u);
    return per * (uint64_t)d->n_moe_layers;
}

int eng_make_model_main(int argc, char **argv) {
    const char *val[O_COUNT] = {0};
    bool set[O_COUNT] = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h")) {
            set[O_HELP] = true;
            continue;
        }
        if (strncmp(a, "--", 2) != 0)
            return usage_error("unexpected argument '%s'", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nl = eq ? (size_t)(eq - name) : strlen(name);
        int o = -1;
        for (int k = 0; k < O_COUNT; k++) {
            if (strlen(opts[k].name) == nl && !strncmp(opts[k].name, name, nl)) {
                o = k;
                break;
            }
        }
        if (o < 0)
            return usage_error("unknown flag '%.*s'", (int)(nl + 2), a);
        if (set[o])
            return usage_error("--%s given twice", opts[o].name);
        set[o] = true;
        if (opts[o].has_value) {
            if (eq)
                val[o] = eq + 1;
            else if (i + 1 < argc)
                val[o] = argv[++i];
            else
                return usage_error("--%s needs a value", opts[o].name);
        } else if (eq) {
            return usage_error("--%s takes no value", opts[o].name);
        }
    }
    if (set[O_HELP]) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (!set[O_FAMILY])
        return usage_error("--family is required (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3)");
    if (!set[O_OUT] || !val[O_OUT][0])
        return usage_error("--out DIR is required");
    eng_model_family fam;
    if (eng_model_family_parse(val[O_FAMILY], &fam) != MOE_OK)
        return usage_error("--family: %s", moe_errmsg());
    for (int k = 0; k < O_COUNT; k++) {
        if (set[k] && opts[k].families && !(opts[k].families & (1u << fam)))
            return usage_error("--%s applies to %s only, not to %s", opts[k].name, family_list(opts[k].families),
                               eng_model_family_name(fam));
    }

    eng_synth_params p;
    eng_synth_params_default(&p, fam);
    p.out_dir = val[O_OUT];
    int64_t v;
    struct {
        int o;
        int32_t *dst;
        int64_t lo, hi;
    } ints[] = {
        {O_LAYERS, &p.n_layers, 1, ENG_MODEL_MAX_LAYERS},
        {O_EXPERTS, &p.n_experts, 1, 1 << 16},
        {O_TOPK, &p.top_k, 1, 1 << 16},
        {O_HIDDEN, &p.hidden, 1, 1 << 20},
        {O_INTER, &p.intermediate, 1, 1 << 22},
        {O_SHARED_INTER, &p.shared_intermediate, 0, 1 << 24},
        {O_SHARED_EXPERTS, &p.n_shared_experts, 0, 1 << 10},
        {O_DENSE, &p.dense_layers, 0, ENG_MODEL_MAX_LAYERS},
        {O_FREQ, &p.moe_layer_freq, 1, ENG_MODEL_MAX_LAYERS},
        {O_STEP, &p.sparse_step, 1, ENG_MODEL_MAX_LAYERS},
        {O_GROUPS, &p.n_group, 0, 1 << 16},
        {O_TOPK_GROUP, &p.topk_group, 1, 1 << 16},
    };
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
        if (!set[ints[k].o])
            continue;
        if (!parse_i64(val[ints[k].o], ints[k].lo, ints[k].hi, &v))
            return usage_error("--%s '%s': expected an integer in [%lld, %lld]", opts[ints[k].o].name, val[ints[k].o],
                               (long long)ints[k].lo, (long long)ints[k].hi);
        *ints[k].dst = (int32_t)v;
    }
    if (fam == ENG_FAMILY_QWEN2_MOE && !set[O_SHARED_INTER])
        p.shared_intermediate = 2 * p.intermediate; /* the default follows --intermediate */
    if (fam == ENG_FAMILY_DEEPSEEK_V3 && !set[O_GROUPS]) {
        /* The default 4 groups must divide --experts with >= 2 experts a group (top-2-sum
         * group scores); else fewer groups, down to 1 (no group selection). */
        int32_t g = p.n_group;
        while (g > 1 && (p.n_experts % g != 0 || p.n_experts / g < 2))
            g /= 2;
        p.n_group = g;
        if (!set[O_TOPK_GROUP])
            p.topk_group = g < 2 ? g : 2;
        /* enough experts in the kept groups for top-k */
        if (!set[O_TOPK_GROUP] && p.topk_group * (p.n_experts / g) < p.top_k)
            p.topk_group = g;
    }
    if (set[O_GROUPS] && p.n_group == 0)
        p.topk_group = 0;
    if (set[O_GROUPS] && p.n_group > 0 && !set[O_TOPK_GROUP] && p.topk_group > p.n_group)
        p.topk_group = p.n_group;
    if (set[O_TOPK_GROUP] && p.n_group == 0)
        return usage_error("--topk-group needs --groups G > 0");
    if (set[O_MLP_ONLY]) {
        const char *s = val[O_MLP_ONLY];
        p.n_mlp_only = 0;
        while (*s) {
            char item[32];
            size_t l = strcspn(s, ",");
            if (l == 0 || l >= sizeof item)
                return usage_error("--mlp-only-layers '%s': expected comma-separated layer numbers", val[O_MLP_ONLY]);
            memcpy(item, s, l);
            item[l] = '\0';
            if (p.n_mlp_only >= ENG_MODEL_MAX_LAYERS || !parse_i64(item, 0, ENG_MODEL_MAX_LAYERS - 1, &v))
                return usage_error("--mlp-only-layers: '%s' is not a layer number in [0, %d]", item,
                                   ENG_MODEL_MAX_LAYERS - 1);
            p.mlp_only[p.n_mlp_only++] = (int32_t)v;
            s += l;
            if (*s == ',')
                s++;
        }
    }
    if (set[O_TOPK_METHOD]) {
        const char *m = val[O_TOPK_METHOD];
        if (strcmp(m, "greedy") && strcmp(m, "group_limited_greedy") && strcmp(m, "noaux_tc"))
            return usage_error("--topk-method '%s': expected greedy, group_limited_greedy or noaux_tc", m);
        p.topk_method = m;
    }
    if (set[O_SCORING]) {
        const char *m = val[O_SCORING];
        if (strcmp(m, "softmax") && strcmp(m, "sigmoid"))
            return usage_error("--scoring '%s': expected softmax or sigmoid", m);
        p.scoring_func = m;
    }
    if (set[O_SCALING]) {
        char *end;
        errno = 0;
        double f = strtod(val[O_SCALING], &end);
        if (errno || *end || !val[O_SCALING][0] || !(f > 0.0 && f < 1e6))
            return usage_error("--scaling '%s': expected a number in (0, 1e6)", val[O_SCALING]);
        p.routed_scaling_factor = (float)f;
    }
    if (set[O_NORM] && !parse_bool(val[O_NORM], &p.norm_topk_prob))
        return usage_error("--norm-topk-prob '%s': expected true or false", val[O_NORM]);
    if (set[O_ACT]) {
        kern_act a;
        if (kern_act_parse(val[O_ACT], &a) != MOE_OK)
            return usage_error("--act '%s': expected silu, gelu or gelu_pytorch_tanh", val[O_ACT]);
        p.hidden_act = val[O_ACT];
    }
    if (set[O_DTYPE]) {
        moe_dtype dt;
        if (moe_dtype_parse(val[O_DTYPE], &dt) != MOE_OK || !moe_dtype_is_float(dt))
            return usage_error("--dtype '%s': expected bf16, f16 or f32", val[O_DTYPE]);
        p.dtype = dt;
    }
    if (set[O_SEED] && !parse_u64(val[O_SEED], &p.seed))
        return usage_error("--seed '%s': expected an integer in [0, 2^64)", val[O_SEED]);
    if (set[O_SHARD] && !parse_size(val[O_SHARD], &p.shard_bytes))
        return usage_error("--shard-size '%s': expected a positive size such as 500M or 2G", val[O_SHARD]);
    p.force = set[O_FORCE];
    p.fused_experts = set[O_FUSED];
    bool quiet = set[O_QUIET];

    /* Shape and routing consistency, worded by the config parser (the file it will write). */
    eng_model_desc d;
    if (eng_synth_desc(&p, &d) != MOE_OK) {
        const char *m = moe_errmsg();
        return usage_error("%s", strncmp(m, "make-model: ", 12) == 0 ? m + 12 : m);
    }

    eng_progress_line prog;
    eng_progress_line_init(&prog, STDERR_FILENO);
    if (!quiet) {
        p.progress = eng_progress_line_cb;
        p.progress_arg = &prog;
    }
    double t0 = moe_now_s();
    if (eng_synth_write(&p) != MOE_OK) {
        fprintf(stderr, "make-model: error: %s\n", moe_errmsg());
        return 1;
    }
    double el = moe_now_s() - t0;
    if (!quiet) {
        uint64_t bytes = written_bytes(&d, p.dtype);
        char desc[400];
        printf("wrote %s: %s\n", p.out_dir, eng_model_desc_str(&d, desc, sizeof desc));
        printf("  seed %" PRIu64 ", %.1f MiB of weights in %.2fs\n", p.seed, (double)bytes / 1048576.0, el);
    }
    return 0;
}
