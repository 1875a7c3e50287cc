/*
 * model.h: the public face of engine/model: Hugging Face MoE checkpoints as people download
 * them (a directory with config.json, one or more *.safetensors shards and
 * model.safetensors.index.json), read for one rank of the engine.
 *
 *   eng_st_*        a safetensors reader: the header validated before any use, files mapped
 *                   read-only, only the byte ranges of the tensors asked for touched
 *   eng_model_*     config.json of the five supported families (Mixtral, Qwen2-MoE,
 *                   Qwen3-MoE, DeepSeek-V2, DeepSeek-V3) -> one description of the MoE part of
 *                   the model (which layers are MoE layers, E, K, I, shared experts, routing)
 *   eng_ckpt_*      a checkpoint directory: the shards and the name -> (file, tensor) table
 *   eng_model_load  one rank's weights: its experts of the served layers laid out for the
 *                   kernels (w13 [E_local, 2I, H], w2 [E_local, H, I]), and where asked the
 *                   router, the correction bias and the shared expert
 *   eng_synth_*     the synthetic model writer (a real checkpoint directory from a seed)
 *
 * Threads and processes: nothing here has global state. A checkpoint handle belongs to one
 * thread at a time; loaded weights are plain read-only memory afterwards and may be shared.
 * The loader runs in a worker process (or any thread that may block on disk): never on the
 * coordinator's loop.
 *
 * Invariants: every header entry that this module hands out has been validated (dtype
 * known, shape x dtype size == byte length, the byte range inside the file, no two ranges
 * overlapping); every tensor the loader reads has been checked to exist with the expected
 * shape and a supported dtype before any data is read. Safetensors data is little-endian,
 * as is every host we build for.
 */
#ifndef ENG_MODEL_MODEL_H
#define ENG_MODEL_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/base/moe_base.h"
#include "kernels/kern.h"
#include "parallel/par.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------
 * Progress: the loader and the writer report bytes done out of a total. `stage` is a short
 * constant word ("load", "write"). Called from the thread doing the work, at most once per
 * tensor; done == total exactly once, at the end.
 * ---------------------------------------------------------------------------------------- */
typedef void (*eng_progress_fn)(void *arg, const char *stage, uint64_t done, uint64_t total);

/* A progress printer for a terminal: one line redrawn in place ("\r") at most every 100 ms on
 * `fd`, finished with a newline. Prints nothing when fd is not a terminal (logs say the rest).
 * Initialise with eng_progress_line_init; pass eng_progress_line_cb as the callback and the struct
 * as its argument. */
typedef struct eng_progress_line {
    int fd;
    bool is_tty;
    double t_start;
    double t_last;
} eng_progress_line;

void eng_progress_line_init(eng_progress_line *p, int fd);
void eng_progress_line_cb(void *arg, const char *stage, uint64_t done, uint64_t total);

/* ------------------------------------------------------------------------------------------
 * safetensors: 8 bytes little-endian N, N bytes of JSON ({"name": {"dtype", "shape",
 * "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the data; offsets are
 * relative to the first byte after the header.
 * ---------------------------------------------------------------------------------------- */
typedef enum eng_st_dtype {
    ENG_ST_BOOL = 0,
    ENG_ST_U8,
    ENG_ST_I8,
    ENG_ST_I16,
    ENG_ST_U16,
    ENG_ST_I32,
    ENG_ST_U32,
    ENG_ST_I64,
    ENG_ST_U64,
    ENG_ST_F16,
    ENG_ST_BF16,
    ENG_ST_F32,
    ENG_ST_F64,
    ENG_ST_C64,
    ENG_ST_F8_E4M3,
    ENG_ST_F8_E5M2,
    ENG_ST_F8_E8M0,
    ENG_ST_F6_E2M3,
    ENG_ST_F6_E3M2,
    ENG_ST_F4,
    ENG_ST_DTYPE_COUNT_
} eng_st_dtype;

#define ENG_ST_MAX_DIMS 8
/* The reference implementation's limit on N (safetensors' MAX_HEADER_SIZE). */
#define ENG_ST_MAX_HEADER (100u * 1000u * 1000u)

const char *eng_st_dtype_name(eng_st_dtype t); /* "BF16" */
int eng_st_dtype_bits(eng_st_dtype t);         /* bits per element: 16 for BF16, 4 for F4 */
/* The engine's dtype for BF16, F16, F32; false for every other one. */
bool eng_st_dtype_to_moe(eng_st_dtype t, moe_dtype *out);

typedef struct eng_st_tensor {
    const char *name; /* NUL-terminated, owned by the header */
    eng_st_dtype dtype;
    int32_t ndim;
    int64_t shape[ENG_ST_MAX_DIMS];
    uint64_t offset;  /* absolute offset of the first byte in the file */
    uint64_t nbytes;
} eng_st_tensor;

typedef struct eng_st_header {
    uint64_t header_len; /* N */
    uint64_t data_start; /* 8 + N */
    uint64_t file_size;
    int32_t n_tensors;
    eng_st_tensor *tensors; /* sorted by name (strcmp) */
    char *names;            /* storage of the names */
} eng_st_header;

/*
 * Parses and validates the header of a safetensors file of `file_size` bytes whose first
 * `len` bytes are in `buf` (len >= 8 + N is needed; more is ignored). Checks: the 8-byte
 * length against the file size and ENG_ST_MAX_HEADER, the JSON (an object; trailing
 * whitespace only), every entry (known dtype, shape of non-negative integers, at most
 * ENG_ST_MAX_DIMS dimensions, [begin, end] with begin <= end, the range inside the data,
 * shape x dtype size == end - begin), unique non-empty names, no two ranges overlapping, and
 * "__metadata__" (an object of strings). `what` (a path) names the file in every message.
 * MOE_ERR_FORMAT on any violation; nothing is written to `out` on failure.
 */
moe_status eng_st_header_parse(const uint8_t *buf, size_t len, uint64_t file_size, const char *what,
                               eng_st_header *out);
void eng_st_header_free(eng_st_header *h);
/* The entry named `name`, or NULL. O(log n). */
const eng_st_tensor *eng_st_header_find(const eng_st_header *h, const char *name);
/* "BF16[64, 32]" into buf; returns buf. */
const char *eng_st_tensor_desc(const eng_st_tensor *t, char *buf, size_t cap);

/* One open safetensors file: the header read with pread and validated; the data mapped on
 * demand. */
typedef struct eng_st_file {
    char *path;
    int fd;
    eng_st_header hdr;
    const uint8_t *map; /* the whole file, PROT_READ, or NULL while unmapped */
    size_t map_len;
} eng_st_file;

/* Opens, checks the size and parses the header. The file stays open (not mapped). */
moe_status eng_st_file_open(eng_st_file *f, const char *path);
/* Maps the file read-only (idempotent). Fails if the file's size changed since open. */
moe_status eng_st_file_map(eng_st_file *f);
void eng_st_file_unmap(eng_st_file *f);
void eng_st_file_close(eng_st_file *f); /* unmaps and closes; safe on a zeroed struct */
/*
 * Copies tensor `t` (an entry of f->hdr) into `dst`, converting to `dst_dt` (BF16, F16 and
 * F32 sources; conversions round to nearest even). `dst` holds numel(t) elements of dst_dt.
 * Maps the file if needed. MOE_ERR_UNSUPPORTED naming the tensor for any other source dtype.
 */
moe_status eng_st_file_read(eng_st_file *f, const eng_st_tensor *t, moe_dtype dst_dt, void *dst);
/* The same for elements [first, first + n) of the tensor (row-major order), e.g. one expert
 * of a fused [E, 2I, H] tensor. MOE_ERR_INVALID_ARG when the range is not inside the tensor. */
moe_status eng_st_file_read_part(eng_st_file *f, const eng_st_tensor *t, uint64_t first, uint64_t n,
                                 moe_dtype dst_dt, void *dst);

/* ------------------------------------------------------------------------------------------
 * Model description from config.json.
 * ---------------------------------------------------------------------------------------- */
typedef enum eng_model_family {
    ENG_FAMILY_MIXTRAL = 0,
    ENG_FAMILY_QWEN2_MOE = 1,
    ENG_FAMILY_QWEN3_MOE = 2,
    ENG_FAMILY_DEEPSEEK_V2 = 3,
    ENG_FAMILY_DEEPSEEK_V3 = 4,
    ENG_FAMILY_COUNT_
} eng_model_family;

/* The model_type: "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3". */
const char *eng_model_family_name(eng_model_family f);
/* The architecture transformers saves: "MixtralForCausalLM", ... */
const char *eng_model_family_arch(eng_model_family f);
/* Accepts the model_type, the architecture name, or the name with '-' for '_'. */
moe_status eng_model_family_parse(const char *s, eng_model_family *out);

#define ENG_MODEL_MAX_LAYERS 1024

typedef struct eng_model_desc {
    eng_model_family family;
    char architecture[64];       /* architectures[0] (or the family's default) */
    char model_type[32];         /* as written in config.json */
    moe_dtype dtype;             /* the routed experts' dtype in the checkpoint (eng_ckpt_open
                                    sets it from the tensors; config parsing alone takes
                                    torch_dtype / dtype, default bf16) */
    int32_t hidden_size;         /* H */
    int32_t n_layers;            /* num_hidden_layers */
    int32_t n_moe_layers;
    int32_t moe_layers[ENG_MODEL_MAX_LAYERS]; /* ascending layer indices of the MoE layers */
    int32_t n_experts;           /* E, routed experts */
    int32_t top_k;               /* K */
    int32_t moe_intermediate;    /* I of one routed expert */
    int32_t shared_intermediate; /* I_s of the shared expert (DeepSeek: n_shared * I); 0: none */
    int32_t n_shared_experts;    /* DeepSeek n_shared_experts; Qwen2-MoE 1 when I_s > 0; else 0 */
    bool has_shared_gate;        /* Qwen2-MoE shared_expert_gate [1, H] */
    bool has_correction_bias;    /* e_score_correction_bias [E] (DeepSeek noaux_tc) */
    kern_act act;                /* hidden_act */
    char hidden_act[32];
    /* The routing template of every MoE layer; correction_bias is NULL here (each layer has
     * its own: eng_model_route_params). */
    kern_route_params route;
    char scoring_func[16];       /* "softmax" / "sigmoid" (as resolved) */
    char topk_method[24];        /* DeepSeek: "greedy", "group_limited_greedy", "noaux_tc"; else "" */
} eng_model_desc;

/* Parses config.json text (len bytes, no NUL needed). Fields a config leaves out take the
 * default of the family's transformers config class; an unknown architecture, a missing field
 * without a default, a value of the wrong type or out of range is an error naming it. */
moe_status eng_model_config_parse(const char *json, size_t len, eng_model_desc *out);
moe_status eng_model_config_load(const char *path, eng_model_desc *out);
bool eng_model_is_moe_layer(const eng_model_desc *d, int32_t layer);
/* A one-line summary into buf ("qwen2_moe (Qwen2MoeForCausalLM) bf16: H=2048, 24 layers (24
 * MoE), E=60, K=4, I=1408, shared I=5632 gated, softmax top-4"); returns buf. */
const char *eng_model_desc_str(const eng_model_desc *d, char *buf, size_t cap);

/* The tensors of a MoE layer that the engine reads, in transformers' naming. */
typedef enum eng_model_tensor {
    ENG_TENSOR_ROUTER = 0,        /* [E, H]   mlp.gate.weight / block_sparse_moe.gate.weight */
    ENG_TENSOR_CORRECTION_BIAS,   /* [E]      mlp.gate.e_score_correction_bias */
    ENG_TENSOR_EXPERT_GATE,       /* [I, H]   experts.{e}.gate_proj.weight / w1.weight */
    ENG_TENSOR_EXPERT_UP,         /* [I, H]   experts.{e}.up_proj.weight / w3.weight */
    ENG_TENSOR_EXPERT_DOWN,       /* [H, I]   experts.{e}.down_proj.weight / w2.weight */
    ENG_TENSOR_SHARED_GATE_PROJ,  /* [I_s, H] shared_expert(s).gate_proj.weight */
    ENG_TENSOR_SHARED_UP_PROJ,    /* [I_s, H] shared_expert(s).up_proj.weight */
    ENG_TENSOR_SHARED_DOWN_PROJ,  /* [H, I_s] shared_expert(s).down_proj.weight */
    ENG_TENSOR_SHARED_EXPERT_GATE,/* [1, H]   mlp.shared_expert_gate.weight (Qwen2-MoE) */
    ENG_TENSOR_COUNT_
} eng_model_tensor;

/* Writes the checkpoint name of a tensor ("model.layers.3.mlp.experts.7.up_proj.weight");
 * `expert` is used by the per-expert kinds only. MOE_ERR_INVALID_ARG when buf is too small or
 * the kind does not exist in this family.
 *
 * These are the per-expert names of the checkpoints the families were published with (and
 * that transformers saves by default). transformers 5 can also save the routed experts fused
 * per layer: "model.layers.L.mlp.experts.gate_up_proj" [E, 2I, H] (gate rows, then up rows)
 * and "model.layers.L.mlp.experts.down_proj" [E, H, I], with Mixtral's router renamed to
 * "model.layers.L.mlp.gate.weight"; eng_ckpt_open accepts either form, layer by layer. */
moe_status eng_model_tensor_name(const eng_model_desc *d, eng_model_tensor kind, int32_t layer, int32_t expert,
                                 char *buf, size_t cap);
/* The expected shape of a tensor of this model (ndim into *ndim, up to 2 dims). */
void eng_model_tensor_shape(const eng_model_desc *d, eng_model_tensor kind, int32_t *ndim, int64_t shape[2]);
/* Whether a MoE layer of this model has the tensor (the router always; the correction bias,
 * shared expert and shared gate where the family and the config say so). */
bool eng_model_has_tensor(const eng_model_desc *d, eng_model_tensor kind);

/* ------------------------------------------------------------------------------------------
 * Checkpoint directories.
 * ---------------------------------------------------------------------------------------- */
typedef struct eng_ckpt eng_ckpt_t; /* opaque */

/*
 * Opens a checkpoint directory: config.json, then model.safetensors.index.json (when present:
 * every shard it names; else every *.safetensors file of the directory), every shard's header,
 * and checks that every tensor of every MoE layer exists with its expected shape and a
 * supported dtype (so a broken checkpoint fails here, before a worker is started). Sets
 * desc.dtype from the routed experts' tensors. Reads no tensor data.
 */
moe_status eng_ckpt_open(eng_ckpt_t **out, const char *dir);
void eng_ckpt_close(eng_ckpt_t *ck);
const eng_model_desc *eng_ckpt_desc(const eng_ckpt_t *ck);
const char *eng_ckpt_dir(const eng_ckpt_t *ck);
int32_t eng_ckpt_n_files(const eng_ckpt_t *ck);
/* The header entry of tensor `name` and its file's base name, or NULL when absent. */
const eng_st_tensor *eng_ckpt_find(const eng_ckpt_t *ck, const char *name, const char **file);

/* What one rank loads. */
typedef struct eng_model_load_params {
    const int32_t *experts; /* global expert ids held by this rank, in local slot order (a
                               placement's experts[r]); NULL: all E in id order */
    int32_t n_local;        /* entries of `experts` (ignored when experts is NULL) */
    const int32_t *layers;  /* the MoE layer indices (model layer numbers) served; NULL: all */
    int32_t n_layers;
    bool router;            /* load the router weight and the correction bias */
    bool shared;            /* load the shared expert and its gate */
    int32_t dtype;          /* moe_dtype of the expert and shared weights; -1: the checkpoint's */
    eng_progress_fn progress;
    void *progress_arg;
} eng_model_load_params;

/* Defaults: all experts, all MoE layers, router and shared expert, the checkpoint's dtype. */
eng_model_load_params eng_model_load_params_default(void);

typedef struct eng_model_layer {
    int32_t layer;               /* the model layer number */
    moe_tensor w13;              /* [E_local, 2I, H]: gate rows, then up rows */
    moe_tensor w2;               /* [E_local, H, I] */
    moe_tensor router;           /* [E, H] fp32 (exact from bf16/f16), or empty */
    moe_tensor correction_bias;  /* [E] fp32, or empty */
    moe_tensor shared_w13;       /* [2 I_s, H], or empty */
    moe_tensor shared_w2;        /* [H, I_s], or empty */
    moe_tensor shared_gate;      /* [H] (Qwen2-MoE shared_expert_gate [1, H]), or empty */
} eng_model_layer;

typedef struct eng_model_weights {
    eng_model_desc desc;
    moe_dtype dtype;     /* of w13, w2 and the shared expert */
    int32_t n_local;
    int32_t *experts;    /* [n_local] global ids, slot order */
    int32_t n_layers;
    eng_model_layer *layers; /* [n_layers], in the order of the request */
    uint64_t bytes;      /* bytes of all loaded tensors */
} eng_model_weights;

/*
 * Loads one rank's weights. Validates the request (ids in [0, E) and distinct, layers that are
 * MoE layers and distinct) and every tensor it needs (exists, shape, dtype; errors name the
 * tensor and its file) before reading any data; then copies/converts each tensor's byte range
 * from the mapped shards into 64-byte aligned buffers. On failure nothing is kept.
 */
moe_status eng_model_load(eng_ckpt_t *ck, const eng_model_load_params *p, eng_model_weights *out);
void eng_model_weights_free(eng_model_weights *w);
/* The loaded layer with model layer number `layer`, or NULL. */
const eng_model_layer *eng_model_weights_layer(const eng_model_weights *w, int32_t layer);

/* The layer's routing parameters: the model's template with the layer's correction bias
 * (host memory; NULL when the model has none or the router was not loaded). */
kern_route_params eng_model_route_params(const eng_model_desc *d, const eng_model_layer *l);
/* The layer's shared expert for kern_moe_forward; false (and *se untouched) when none. */
bool eng_model_shared_expert(const eng_model_desc *d, const eng_model_layer *l, kern_shared_expert *se);
/* The expert map of a loaded rank for kern_experts_params: map[e] = slot or -1; [E] int32. */
moe_status eng_model_expert_map(const eng_model_weights *w, int32_t *map);
/* Host helper: router logits [T, E] fp32 = x [T, H] (any float dtype) . router^T, products
 * and sums in fp32 in index order h = 0 .. H-1. Needs the router loaded. */
moe_status eng_model_router_logits(const eng_model_layer *l, const moe_tensor *x, moe_tensor *logits);

/* Bytes one rank holds for n_local experts of n_layers MoE layers (plus router / shared). */
uint64_t eng_model_rank_bytes(const eng_model_desc *d, int32_t n_local, int32_t n_layers, bool router, bool shared,
                              moe_dtype dt);
/* Logs the placement at info level: the policy, then one line per rank with its experts
 * (ranges) and its weight bytes for the served layers. */
void eng_model_log_placement(const eng_model_desc *d, const par_placement *pl, int32_t n_layers, bool router,
                             bool shared, moe_dtype dt);
/* "0-3,8,10-11" (ascending runs of ids) into buf, truncated with "..." at cap; returns buf. */
const char *eng_model_ids_str(const int32_t *ids, int32_t n, char *buf, size_t cap);

/* ------------------------------------------------------------------------------------------
 * The synthetic model writer.
 * ---------------------------------------------------------------------------------------- */
typedef struct eng_synth_params {
    eng_model_family family;
    const char *out_dir;
    int32_t n_layers;          /* num_hidden_layers */
    int32_t n_experts;         /* E */
    int32_t top_k;             /* K */
    int32_t hidden;            /* H */
    int32_t intermediate;      /* I of a routed expert */
    int32_t shared_intermediate; /* Qwen2-MoE shared_expert_intermediate_size (0: none) */
    int32_t n_shared_experts;  /* DeepSeek n_shared_experts (0: none) */
    int32_t dense_layers;      /* DeepSeek first_k_dense_replace */
    int32_t moe_layer_freq;    /* DeepSeek moe_layer_freq */
    int32_t sparse_step;       /* Qwen decoder_sparse_step */
    int32_t n_mlp_only;        /* Qwen mlp_only_layers */
    int32_t mlp_only[ENG_MODEL_MAX_LAYERS];
    int32_t n_group;           /* DeepSeek n_group (0: none) */
    int32_t topk_group;
    const char *topk_method;   /* DeepSeek: "greedy", "group_limited_greedy", "noaux_tc" */
    const char *scoring_func;  /* DeepSeek: "softmax", "sigmoid" */
    float routed_scaling_factor;
    bool norm_topk_prob;
    bool fused_experts;        /* write transformers 5's fused expert tensors (see above) */
    const char *hidden_act;
    moe_dtype dtype;
    uint64_t seed;
    uint64_t shard_bytes;      /* the largest shard's data (transformers' max_shard_size) */
    bool force;                /* replace the files of an existing checkpoint in out_dir */
    eng_progress_fn progress;
    void *progress_arg;
} eng_synth_params;

/* The family's small default model (what make-model writes without shape flags). */
moe_status eng_synth_params_default(eng_synth_params *p, eng_model_family family);
/* The description the written config.json will parse to (validates the parameters). */
moe_status eng_synth_desc(const eng_synth_params *p, eng_model_desc *out);
/*
 * Writes config.json, the shards ("model.safetensors", or "model-0000i-of-0000n.safetensors"
 * with model.safetensors.index.json) with the tensors of every MoE layer (router, routed
 * experts, shared expert, shared gate, correction bias) in transformers' naming, random
 * normal(0, 1/sqrt(fan_in)) weights from `seed` (each tensor seeded from the seed and its
 * name, so a tensor's values do not depend on the sharding). Streams: memory use is bounded
 * by a small buffer whatever the model's size. Files are written under temporary names and
 * renamed when complete.
 */
moe_status eng_synth_write(const eng_synth_params *p);

/* The `make-model` command: parses argv (argv[0] is the program name), writes the model,
 * prints a summary. Returns a process exit status (0 ok, 2 usage error, 1 failure). */
int eng_make_model_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif
#endif /* ENG_MODEL_MODEL_H */
