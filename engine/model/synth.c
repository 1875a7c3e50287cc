/*
 * synth.c: the synthetic model writer. It writes a real Hugging Face checkpoint directory of
 * one of the five families: config.json in the family's own format, safetensors shards in
 * transformers' naming, and model.safetensors.index.json when there is more than one shard.
 * Only the tensors the engine reads are present (router, routed experts, shared expert and
 * its gate, correction bias); attention, norms and embeddings are not.
 *
 * Values: every tensor has its own generator, seeded from the model seed and the tensor's
 * name, so a tensor's values do not depend on the shard size or on the other tensors. With
 * fused_experts (transformers 5's gate_up_proj / down_proj per layer) each expert's slice is
 * generated from the per-expert name, so both forms of a model hold the same weights. A value
 * is normal(0, 1) / sqrt(fan_in) (in_features of the Linear), the normal drawn as a scaled
 * Irwin-Hall sum of four 16-bit uniforms of one 64-bit draw: integer arithmetic and exact
 * float operations only, so the same seed gives the same bits on every machine and libm (a
 * Box-Muller draw would go through log/cos, whose last bits vary between libms), and one
 * draw per value keeps the writer at disk speed. The correction bias is 0.05 x normal, fp32
 * as transformers keeps it.
 *
 * Memory: streaming; one 1 MiB buffer and the table of tensor names whatever the model's
 * size. Files are written as hidden ".NAME.partial" and renamed when complete; config.json is
 * written last, so an interrupted run never leaves a directory that looks complete.
 *
 * Threads: pure apart from the files it writes; any thread.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "engine/model/model.h"
#include "engine/model/model_impl.h"

#define OUT_BUF (1u << 20)

moe_status eng_synth_params_default(eng_synth_params *p, eng_model_family family) {
    MOE_REQUIRE(p, MOE_ERR_INVALID_ARG, "synth_params_default: NULL");
    MOE_REQUIRE((int)family >= 0 && family < ENG_FAMILY_COUNT_, MOE_ERR_INVALID_ARG, "synth: family %d", (int)family);
    memset(p, 0, sizeof *p);
    p->family = family;
    p->n_layers = 2;
    p->n_experts = 8;
    p->top_k = 2;
    p->hidden = 256;
    p->intermediate = 512;
    p->moe_layer_freq = 1;
    p->sparse_step = 1;
    p->routed_scaling_factor = 1.0f;
    p->hidden_act = "silu";
    p->dtype = MOE_DTYPE_BF16;
    p->seed = 0;
    p->shard_bytes = 1ull << 30;
    switch (family) {
    case ENG_FAMILY_QWEN2_MOE:
        p->shared_intermediate = 2 * p->intermediate;
        p->norm_topk_prob = false; /* as Qwen1.5-MoE-A2.7B's config.json */
        break;
    case ENG_FAMILY_QWEN3_MOE:
        p->norm_topk_prob = true; /* as Qwen3-30B-A3B's config.json */
        break;
    case ENG_FAMILY_DEEPSEEK_V2:
        p->n_shared_experts = 2;
        p->topk_method = "greedy";
        p->scoring_func = "softmax";
        break;
    case ENG_FAMILY_DEEPSEEK_V3:
        p->n_shared_experts = 1;
        p->n_group = 4;
        p->topk_group = 2;
        p->topk_method = "noaux_tc";
        p->scoring_func = "sigmoid";
        p->routed_scaling_factor = 2.5f;
        p->norm_topk_prob = true;
        break;
    default:
        break;
    }
    return MOE_OK;
}

static const char *torch_dtype(moe_dtype dt) {
    return dt == MOE_DTYPE_F32 ? "float32" : dt == MOE_DTYPE_F16 ? "float16" : "bfloat16";
}

/* config.json, as the family's transformers config class would save it (the fields that
 * matter to the MoE part, plus enough of the rest to look like the real thing). */
static moe_status build_config(const eng_synth_params *p, char **out) {
    MOE_REQUIRE(p->n_layers >= 1 && p->n_layers <= ENG_MODEL_MAX_LAYERS, MOE_ERR_INVALID_ARG,
                "make-model: layers %d not in [1, %d]", (int)p->n_layers, ENG_MODEL_MAX_LAYERS);
    MOE_REQUIRE(p->n_experts >= 1 && p->n_experts <= (1 << 16), MOE_ERR_INVALID_ARG,
                "make-model: experts %d not in [1, 65536]", (int)p->n_experts);
    MOE_REQUIRE(p->top_k >= 1 && p->top_k <= p->n_experts, MOE_ERR_INVALID_ARG,
                "make-model: top-k %d not in [1, experts = %d]", (int)p->top_k, (int)p->n_experts);
    MOE_REQUIRE(p->hidden >= 1 && p->hidden <= (1 << 20), MOE_ERR_INVALID_ARG, "make-model: hidden %d not in [1, 2^20]",
                (int)p->hidden);
    MOE_REQUIRE(p->intermediate >= 1 && p->intermediate <= (1 << 22), MOE_ERR_INVALID_ARG,
                "make-model: intermediate %d not in [1, 2^22]", (int)p->intermediate);
    MOE_REQUIRE(moe_dtype_is_float(p->dtype), MOE_ERR_INVALID_ARG, "make-model: dtype %s is not bf16, f16 or f32",
                moe_dtype_name(p->dtype));
    MOE_REQUIRE(p->shard_bytes >= 1, MOE_ERR_INVALID_ARG, "make-model: shard size must be >= 1 byte");
    MOE_REQUIRE(p->shared_intermediate >= 0 && p->n_shared_experts >= 0 && p->dense_layers >= 0 && p->n_mlp_only >= 0 &&
                    p->n_mlp_only <= ENG_MODEL_MAX_LAYERS,
                MOE_ERR_INVALID_ARG, "make-model: negative count");
    cJSON *c = cJSON_CreateObject();
    if (!c)
        return moe_fail(MOE_ERR_NOMEM, "make-model: config");
    cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(eng_model_family_arch(p->family)));
    cJSON_AddStringToObject(c, "model_type", eng_model_family_name(p->family));
    cJSON_AddNumberToObject(c, "hidden_size", p->hidden);
    cJSON_AddNumberToObject(c, "num_hidden_layers", p->n_layers);
    int heads = p->hidden >= 64 ? p->hidden / 64 : 1;
    cJSON_AddNumberToObject(c, "num_attention_heads", heads);
    cJSON_AddNumberToObject(c, "num_key_value_heads", heads);
    cJSON_AddNumberToObject(c, "vocab_size", 32000);
    cJSON_AddNumberToObject(c, "max_position_embeddings", 4096);
    cJSON_AddNumberToObject(c, "rms_norm_eps", 1e-6);
    cJSON_AddStringToObject(c, "hidden_act", p->hidden_act ? p->hidden_act : "silu");
    cJSON_AddStringToObject(c, "torch_dtype", torch_dtype(p->dtype));
    cJSON_AddBoolToObject(c, "tie_word_embeddings", false);
    cJSON_AddNumberToObject(c, "num_experts_per_tok", p->top_k);
    switch (p->family) {
    case ENG_FAMILY_MIXTRAL:
        cJSON_AddNumberToObject(c, "intermediate_size", p->intermediate);
        cJSON_AddNumberToObject(c, "num_local_experts", p->n_experts);
        cJSON_AddNumberToObject(c, "router_aux_loss_coef", 0.02);
        cJSON_AddNumberToObject(c, "rope_theta", 1e6);
        break;
    case ENG_FAMILY_QWEN2_MOE:
    case ENG_FAMILY_QWEN3_MOE:
        cJSON_AddNumberToObject(c, "intermediate_size", 4 * p->intermediate); /* the dense layers' MLP */
        cJSON_AddNumberToObject(c, "moe_intermediate_size", p->intermediate);
        if (p->family == ENG_FAMILY_QWEN2_MOE)
            cJSON_AddNumberToObject(c, "shared_expert_intermediate_size", p->shared_intermediate);
        cJSON_AddNumberToObject(c, "num_experts", p->n_experts);
        cJSON_AddBoolToObject(c, "norm_topk_prob", p->norm_topk_prob);
        cJSON_AddNumberToObject(c, "decoder_sparse_step", p->sparse_step);
        {
            cJSON *mo = cJSON_AddArrayToObject(c, "mlp_only_layers");
            for (int32_t i = 0; i < p->n_mlp_only; i++)
                cJSON_AddItemToArray(mo, cJSON_CreateNumber(p->mlp_only[i]));
        }
        cJSON_AddNumberToObject(c, "router_aux_loss_coef", 0.001);
        cJSON_AddNumberToObject(c, "rope_theta", 1e6);
        break;
    case ENG_FAMILY_DEEPSEEK_V2:
    case ENG_FAMILY_DEEPSEEK_V3:
        cJSON_AddNumberToObject(c, "intermediate_size", 4 * p->intermediate);
        cJSON_AddNumberToObject(c, "moe_intermediate_size", p->intermediate);
        cJSON_AddNumberToObject(c, "n_routed_experts", p->n_experts);
        cJSON_AddNumberToObject(c, "n_shared_experts", p->n_shared_experts);
        cJSON_AddNumberToObject(c, "first_k_dense_replace", p->dense_layers);
        cJSON_AddNumberToObject(c, "moe_layer_freq", p->moe_layer_freq);
        if (p->n_group > 0) {
            cJSON_AddNumberToObject(c, "n_group", p->n_group);
            cJSON_AddNumberToObject(c, "topk_group", p->topk_group);
        } else {
            cJSON_AddNullToObject(c, "n_group");
            cJSON_AddNullToObject(c, "topk_group");
        }
        cJSON_AddStringToObject(c, "topk_method", p->topk_method ? p->topk_method : "greedy");
        cJSON_AddStringToObject(c, "scoring_func", p->scoring_func ? p->scoring_func : "softmax");
        cJSON_AddBoolToObject(c, "norm_topk_prob", p->norm_topk_prob);
        cJSON_AddNumberToObject(c, "routed_scaling_factor", p->routed_scaling_factor);
        cJSON_AddNumberToObject(c, "kv_lora_rank", 64);
        cJSON_AddNullToObject(c, "q_lora_rank");
        cJSON_AddNumberToObject(c, "qk_nope_head_dim", 32);
        cJSON_AddNumberToObject(c, "qk_rope_head_dim", 16);
        cJSON_AddNumberToObject(c, "v_head_dim", 32);
        cJSON_AddNumberToObject(c, "rope_theta", 10000);
        break;
    default:
        cJSON_Delete(c);
        return moe_fail(MOE_ERR_INVALID_ARG, "make-model: family %d", (int)p->family);
    }
    cJSON *me = cJSON_AddObjectToObject(c, "moe_engine");
    cJSON_AddStringToObject(me, "generator", "moe-engine make-model (synthetic weights)");
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)p->seed);
    cJSON_AddStringToObject(me, "seed", seed);
    char *txt = cJSON_Print(c);
    cJSON_Delete(c);
    if (!txt)
        return moe_fail(MOE_ERR_NOMEM, "make-model: config");
    *out = txt;
    return MOE_OK;
}

moe_status eng_synth_desc(const eng_synth_params *p, eng_model_desc *out) {
    MOE_REQUIRE(p && out, MOE_ERR_INVALID_ARG, "synth_desc: NULL argument");
    char *txt = NULL;
    MOE_CHECK(build_config(p, &txt));
    moe_status st = eng_model_config_parse(txt, strlen(txt), out);
    free(txt);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * Values.
 * ---------------------------------------------------------------------------------------- */
static uint64_t fnv1a64(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) {
        h ^= (uint8_t)*s;
        h *= 1099511628211ull;
    }
    return h;
}

/* Irwin-Hall(4) scaled to unit variance: sum of four uniforms in (0, 1) has mean 2 and
 * variance 1/3. The uniforms are (k + 0.5) / 65536 for 16-bit k: exact in float. */
static inline float ih_normal(uint64_t r) {
    float s = 0.0f;
    for (int i = 0; i < 4; i++) {
        s += ((float)(r & 0xffff) + 0.5f) * (1.0f / 65536.0f);
        r >>= 16;
    }
    return (s - 2.0f) * 1.7320508075688772f;
}

/* ------------------------------------------------------------------------------------------
 * Layout.
 * ---------------------------------------------------------------------------------------- */
typedef struct syn_tensor {
    char name[160];      /* on disk */
    char seed_name[160]; /* the published per-expert name its values are seeded from */
    eng_model_tensor kind;
    int32_t layer;
    int fused; /* 0: one tensor; 1: fused gate_up_proj [E, 2I, H]; 2: down_proj [E, H, I] */
    moe_dtype dt;
    int32_t ndim;
    int64_t shape[3];
    float scale;
    uint64_t nbytes;
    int32_t shard;
    uint64_t begin; /* data offset within the shard */
} syn_tensor;

typedef struct syn_writer {
    int fd;
    uint8_t *buf;
    size_t used;
    const char *path;
} syn_writer;

static moe_status wflush(syn_writer *w) {
    size_t off = 0;
    while (off < w->used) {
        ssize_t r = write(w->fd, w->buf + off, w->used - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return moe_fail(MOE_ERR_IO, "%s: write: %s", w->path, moe_strerror_(errno));
        off += (size_t)r;
    }
    w->used = 0;
    return MOE_OK;
}

static moe_status wput(syn_writer *w, const void *p, size_t n) {
    const uint8_t *s = p;
    while (n > 0) {
        size_t c = OUT_BUF - w->used < n ? OUT_BUF - w->used : n;
        memcpy(w->buf + w->used, s, c);
        w->used += c;
        s += c;
        n -= c;
        if (w->used == OUT_BUF)
            MOE_CHECK(wflush(w));
    }
    return MOE_OK;
}

static moe_status grow(syn_tensor **ts, int64_t n, int64_t *cap) {
    if (n < *cap)
        return MOE_OK;
    *cap = *cap ? 2 * *cap : 256;
    syn_tensor *nt = realloc(*ts, (size_t)*cap * sizeof **ts);
    if (!nt)
        return moe_fail(MOE_ERR_NOMEM, "make-model: tensor table");
    *ts = nt;
    return MOE_OK;
}

static moe_status add_tensor(syn_tensor **ts, int64_t *n, int64_t *cap, const eng_model_desc *d, eng_model_tensor kind,
                             int32_t layer, int32_t expert, moe_dtype dt, bool fused_names) {
    MOE_CHECK(grow(ts, *n, cap));
    syn_tensor *t = &(*ts)[*n];
    memset(t, 0, sizeof *t);
    MOE_CHECK(eng_model_tensor_name(d, kind, layer, expert, t->seed_name, sizeof t->seed_name));
    snprintf(t->name, sizeof t->name, "%s", t->seed_name);
    if (fused_names && kind == ENG_TENSOR_ROUTER && d->family == ENG_FAMILY_MIXTRAL)
        snprintf(t->name, sizeof t->name, "model.layers.%d.mlp.gate.weight", (int)layer); /* transformers 5 */
    t->kind = kind;
    t->layer = layer;
    eng_model_tensor_shape(d, kind, &t->ndim, t->shape);
    t->dt = dt;
    uint64_t numel = 1;
    for (int32_t i = 0; i < t->ndim; i++)
        numel *= (uint64_t)t->shape[i];
    t->nbytes = numel * moe_dtype_size(dt);
    t->scale = kind == ENG_TENSOR_CORRECTION_BIAS ? 0.05f : 1.0f / sqrtf((float)t->shape[t->ndim - 1]);
    (*n)++;
    return MOE_OK;
}

/* transformers 5's fused expert tensors of a layer (which 1: gate_up_proj, 2: down_proj). */
static moe_status add_fused(syn_tensor **ts, int64_t *n, int64_t *cap, const eng_model_desc *d, int32_t layer,
                            int which, moe_dtype dt) {
    MOE_CHECK(grow(ts, *n, cap));
    syn_tensor *t = &(*ts)[*n];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "model.layers.%d.mlp.experts.%s", (int)layer,
             which == 1 ? "gate_up_proj" : "down_proj");
    t->layer = layer;
    t->fused = which;
    t->dt = dt;
    t->ndim = 3;
    int64_t E = d->n_experts, H = d->hidden_size, I = d->moe_intermediate;
    t->shape[0] = E;
    t->shape[1] = which == 1 ? 2 * I : H;
    t->shape[2] = which == 1 ? H : I;
    t->nbytes = (uint64_t)(E * t->shape[1] * t->shape[2]) * moe_dtype_size(dt);
    (*n)++;
    return MOE_OK;
}

/* n values of the generator seeded by (seed, name), times scale, as dt. */
static moe_status write_values(syn_writer *w, const char *name, uint64_t n, float scale, moe_dtype dt, uint64_t seed) {
    moe_rng rng;
    moe_rng_seed(&rng, seed ^ fnv1a64(name));
    enum { CH = 16384 };
    float f[CH];
    uint8_t out[CH * 4];
    size_t es = moe_dtype_size(dt);
    for (uint64_t i = 0; i < n; i += CH) {
        size_t c = n - i < CH ? (size_t)(n - i) : CH;
        for (size_t k = 0; k < c; k++)
            f[k] = ih_normal(moe_rng_next(&rng)) * scale;
        moe_from_f32(dt, f, out, c);
        MOE_CHECK(wput(w, out, c * es));
    }
    return MOE_OK;
}

/* A fused tensor holds, expert by expert, exactly the values of the per-expert tensors of
 * the same seed: the two forms of one model load to the same weights. */
static moe_status write_tensor_data(syn_writer *w, const syn_tensor *t, const eng_model_desc *d, uint64_t seed) {
    if (!t->fused)
        return write_values(w, t->seed_name, t->nbytes / moe_dtype_size(t->dt), t->scale, t->dt, seed);
    uint64_t IH = (uint64_t)d->moe_intermediate * (uint64_t)d->hidden_size;
    char name[160];
    for (int32_t e = 0; e < d->n_experts; e++) {
        if (t->fused == 1) {
            float sc = 1.0f / sqrtf((float)d->hidden_size);
            MOE_CHECK(eng_model_tensor_name(d, ENG_TENSOR_EXPERT_GATE, t->layer, e, name, sizeof name));
            MOE_CHECK(write_values(w, name, IH, sc, t->dt, seed));
            MOE_CHECK(eng_model_tensor_name(d, ENG_TENSOR_EXPERT_UP, t->layer, e, name, sizeof name));
            MOE_CHECK(write_values(w, name, IH, sc, t->dt, seed));
        } else {
            MOE_CHECK(eng_model_tensor_name(d, ENG_TENSOR_EXPERT_DOWN, t->layer, e, name, sizeof name));
            MOE_CHECK(write_values(w, name, IH, 1.0f / sqrtf((float)d->moe_intermediate), t->dt, seed));
        }
    }
    return MOE_OK;
}

static const char *st_dtype_str(moe_dtype dt) {
    return dt == MOE_DTYPE_F32 ? "F32" : dt == MOE_DTYPE_F16 ? "F16" : "BF16";
}

static moe_status shard_name(char *buf, size_t cap, int32_t i, int32_t n) {
    int k = n == 1 ? snprintf(buf, cap, "model.safetensors")
                   : snprintf(buf, cap, "model-%05d-of-%05d.safetensors", (int)i + 1, (int)n);
    MOE_REQUIRE(k > 0 && (size_t)k < cap, MOE_ERR_INVALID_ARG, "shard name");
    return MOE_OK;
}

/* Writes `len` bytes to dir/name through dir/.name.partial and a rename. */
static moe_status write_small_file(const char *dir, const char *name, const char *txt, size_t len) {
    char path[4096], tmp[4096], tname[300];
    snprintf(tname, sizeof tname, ".%s.partial", name);
    MOE_CHECK(eng_path_join(path, sizeof path, dir, name));
    MOE_CHECK(eng_path_join(tmp, sizeof tmp, dir, tname));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return moe_fail(MOE_ERR_IO, "%s: cannot create: %s", tmp, moe_strerror_(errno));
    size_t off = 0;
    while (off < len) {
        ssize_t r = write(fd, txt + off, len - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            moe_status st = moe_fail(MOE_ERR_IO, "%s: write: %s", tmp, moe_strerror_(errno));
            close(fd);
            unlink(tmp);
            return st;
        }
        off += (size_t)r;
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        moe_status st = moe_fail(MOE_ERR_IO, "%s: cannot write: %s", path, moe_strerror_(errno));
        unlink(tmp);
        return st;
    }
    return MOE_OK;
}

/* Creates dir (and missing parents); refuses to overwrite a checkpoint unless forced, and then
 * removes the old checkpoint's files (only those: other files stay). */
static moe_status prepare_dir(const char *dir, bool force) {
    char path[4096];
    snprintf(path, sizeof path, "%s", dir);
    for (char *s = path + 1; *s; s++) {
        if (*s == '/') {
            *s = '\0';
            if (mkdir(path, 0755) != 0 && errno != EEXIST)
                return moe_fail(MOE_ERR_IO, "%s: cannot create: %s", path, moe_strerror_(errno));
            *s = '/';
        }
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        return moe_fail(MOE_ERR_IO, "%s: cannot create: %s", path, moe_strerror_(errno));
    DIR *dh = opendir(dir);
    if (!dh)
        return moe_fail(MOE_ERR_IO, "%s: cannot open: %s", dir, moe_strerror_(errno));
    moe_status st = MOE_OK;
    struct dirent *de;
    while ((de = readdir(dh))) {
        const char *n = de->d_name;
        size_t l = strlen(n);
        bool ours = strcmp(n, "config.json") == 0 || strcmp(n, "model.safetensors.index.json") == 0 ||
                    strcmp(n, "model.safetensors") == 0 ||
                    (strncmp(n, "model-", 6) == 0 && l > 12 && strcmp(n + l - 12, ".safetensors") == 0);
        if (!ours)
            continue;
        if (!force) {
            st =
                moe_fail(MOE_ERR_INVALID_ARG, "%s already holds a checkpoint (%s); pass --force to replace it", dir, n);
            break;
        }
        MOE_CHECK_GOTO(eng_path_join(path, sizeof path, dir, n), st, done);
        if (unlink(path) != 0) {
            st = moe_fail(MOE_ERR_IO, "%s: cannot remove: %s", path, moe_strerror_(errno));
            break;
        }
    }
done:
    closedir(dh);
    return st;
}

moe_status eng_synth_write(const eng_synth_params *p) {
    MOE_REQUIRE(p && p->out_dir && p->out_dir[0], MOE_ERR_INVALID_ARG, "make-model: no output directory");
    moe_status st = MOE_OK;
    char *cfg = NULL, *hdr = NULL, *idx = NULL;
    syn_tensor *ts = NULL;
    syn_writer w = {.fd = -1};
    cJSON *hj = NULL, *ij = NULL;
    char tmp[4096], path[4096], sname[64], tname[96];
    eng_model_desc *d = calloc(1, sizeof *d);
    w.buf = malloc(OUT_BUF);
    if (!d || !w.buf) {
        st = moe_fail(MOE_ERR_NOMEM, "make-model");
        goto done;
    }
    MOE_CHECK_GOTO(build_config(p, &cfg), st, done);
    MOE_CHECK_GOTO(eng_model_config_parse(cfg, strlen(cfg), d), st, done);
    MOE_CHECK_GOTO(prepare_dir(p->out_dir, p->force), st, done);

    /* The tensor table, in transformers' state_dict order (layer by layer). */
    int64_t n = 0, cap = 0;
    for (int32_t li = 0; li < d->n_moe_layers; li++) {
        int32_t l = d->moe_layers[li];
        bool fz = p->fused_experts;
        MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_ROUTER, l, 0, p->dtype, fz), st, done);
        if (d->has_correction_bias)
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_CORRECTION_BIAS, l, 0, MOE_DTYPE_F32, fz), st, done);
        if (fz) {
            MOE_CHECK_GOTO(add_fused(&ts, &n, &cap, d, l, 1, p->dtype), st, done);
            MOE_CHECK_GOTO(add_fused(&ts, &n, &cap, d, l, 2, p->dtype), st, done);
        }
        for (int32_t e = 0; e < d->n_experts && !fz; e++) {
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_EXPERT_GATE, l, e, p->dtype, fz), st, done);
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_EXPERT_UP, l, e, p->dtype, fz), st, done);
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_EXPERT_DOWN, l, e, p->dtype, fz), st, done);
        }
        if (d->shared_intermediate > 0) {
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_SHARED_GATE_PROJ, l, 0, p->dtype, fz), st, done);
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_SHARED_UP_PROJ, l, 0, p->dtype, fz), st, done);
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_SHARED_DOWN_PROJ, l, 0, p->dtype, fz), st, done);
        }
        if (d->has_shared_gate)
            MOE_CHECK_GOTO(add_tensor(&ts, &n, &cap, d, ENG_TENSOR_SHARED_EXPERT_GATE, l, 0, p->dtype, fz), st, done);
    }
    /* Shards: a new one when the next tensor would push the current one over the limit
     * (transformers' shard_checkpoint rule; a tensor larger than the limit gets its own). */
    int32_t n_shards = 1;
    uint64_t in_shard = 0, total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (in_shard > 0 && in_shard + ts[i].nbytes > p->shard_bytes) {
            n_shards++;
            in_shard = 0;
        }
        ts[i].shard = n_shards - 1;
        ts[i].begin = in_shard;
        in_shard += ts[i].nbytes;
        total += ts[i].nbytes;
    }
    if (n_shards > 99999) {
        st = moe_fail(MOE_ERR_INVALID_ARG, "make-model: %d shards; raise the shard size", (int)n_shards);
        goto done;
    }

    uint64_t done_bytes = 0;
    int64_t i = 0;
    ij = cJSON_CreateObject();
    cJSON *wm = NULL;
    if (!ij) {
        st = moe_fail(MOE_ERR_NOMEM, "make-model: index");
        goto done;
    }
    cJSON *meta = cJSON_AddObjectToObject(ij, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    wm = cJSON_AddObjectToObject(ij, "weight_map");
    for (int32_t s = 0; s < n_shards; s++) {
        MOE_CHECK_GOTO(shard_name(sname, sizeof sname, s, n_shards), st, done);
        snprintf(tname, sizeof tname, ".%s.partial", sname);
        MOE_CHECK_GOTO(eng_path_join(tmp, sizeof tmp, p->out_dir, tname), st, done);
        MOE_CHECK_GOTO(eng_path_join(path, sizeof path, p->out_dir, sname), st, done);
        hj = cJSON_CreateObject();
        cJSON *md = cJSON_AddObjectToObject(hj, "__metadata__");
        cJSON_AddStringToObject(md, "format", "pt");
        int64_t first = i, last = i;
        while (last < n && ts[last].shard == s)
            last++;
        for (int64_t k = first; k < last; k++) {
            cJSON *e = cJSON_AddObjectToObject(hj, ts[k].name);
            cJSON_AddStringToObject(e, "dtype", st_dtype_str(ts[k].dt));
            cJSON *sh = cJSON_AddArrayToObject(e, "shape");
            for (int32_t q = 0; q < ts[k].ndim; q++)
                cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)ts[k].shape[q]));
            cJSON *off = cJSON_AddArrayToObject(e, "data_offsets");
            cJSON_AddItemToArray(off, cJSON_CreateNumber((double)ts[k].begin));
            cJSON_AddItemToArray(off, cJSON_CreateNumber((double)(ts[k].begin + ts[k].nbytes)));
            cJSON_AddStringToObject(wm, ts[k].name, sname);
        }
        hdr = cJSON_PrintUnformatted(hj);
        cJSON_Delete(hj);
        hj = NULL;
        if (!hdr) {
            st = moe_fail(MOE_ERR_NOMEM, "make-model: shard header");
            goto done;
        }
        /* Pad with spaces so that the data starts 8-byte aligned, as safetensors does. */
        size_t hl = strlen(hdr), pad = (8 - (hl % 8)) % 8;
        uint64_t nn = hl + pad;
        uint8_t len8[8];
        for (int q = 0; q < 8; q++)
            len8[q] = (uint8_t)(nn >> (8 * q));
        w.fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        w.path = tmp;
        w.used = 0;
        if (w.fd < 0) {
            st = moe_fail(MOE_ERR_IO, "%s: cannot create: %s", tmp, moe_strerror_(errno));
            goto done;
        }
        MOE_CHECK_GOTO(wput(&w, len8, 8), st, done);
        MOE_CHECK_GOTO(wput(&w, hdr, hl), st, done);
        MOE_CHECK_GOTO(wput(&w, "        ", pad), st, done);
        free(hdr);
        hdr = NULL;
        for (int64_t k = first; k < last; k++) {
            MOE_CHECK_GOTO(write_tensor_data(&w, &ts[k], d, p->seed), st, done);
            done_bytes += ts[k].nbytes;
            if (p->progress && done_bytes < total)
                p->progress(p->progress_arg, "write", done_bytes, total);
        }
        MOE_CHECK_GOTO(wflush(&w), st, done);
        if (close(w.fd) != 0) {
            w.fd = -1;
            st = moe_fail(MOE_ERR_IO, "%s: close: %s", tmp, moe_strerror_(errno));
            goto done;
        }
        w.fd = -1;
        if (rename(tmp, path) != 0) {
            st = moe_fail(MOE_ERR_IO, "%s: rename to %s: %s", tmp, path, moe_strerror_(errno));
            goto done;
        }
        i = last;
    }
    if (n_shards > 1) {
        idx = cJSON_Print(ij);
        if (!idx) {
            st = moe_fail(MOE_ERR_NOMEM, "make-model: index");
            goto done;
        }
        MOE_CHECK_GOTO(write_small_file(p->out_dir, "model.safetensors.index.json", idx, strlen(idx)), st, done);
    }
    MOE_CHECK_GOTO(write_small_file(p->out_dir, "config.json", cfg, strlen(cfg)), st, done);
    if (p->progress)
        p->progress(p->progress_arg, "write", total, total);
done:
    if (w.fd >= 0) {
        close(w.fd);
        unlink(w.path);
    }
    cJSON_Delete(hj);
    cJSON_Delete(ij);
    free(w.buf);
    free(cfg);
    free(hdr);
    free(idx);
    free(ts);
    free(d);
    return st;
}
