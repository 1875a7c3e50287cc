/*
 * checkpoint.c: checkpoint directories (config.json + safetensors shards + the index) and the
 * loading of one rank's weights into the kernels' layout.
 *
 * Layout produced (kern.h): per served MoE layer
 *   w13 [E_local, 2I, H]  slot s holds expert experts[s]: rows 0..I-1 its gate projection
 *                         (w1 / gate_proj), rows I..2I-1 its up projection (w3 / up_proj)
 *   w2  [E_local, H, I]   down projection (w2 / down_proj)
 *   router [E, H] fp32, correction_bias [E] fp32, shared_w13 [2 I_s, H] (gate then up),
 *   shared_w2 [H, I_s], shared_gate [H] (Qwen2-MoE's [1, H]).
 * A transformers Linear weight is [out_features, in_features], which is exactly a row of
 * these (y = W x), so tensors are copied as they are, with no transposition. Layers saved by
 * transformers 5 with fused experts (mlp.experts.gate_up_proj [E, 2I, H], down_proj
 * [E, H, I]) already have this layout: a rank copies its experts' slices of them.
 *
 * Threads and processes: a checkpoint handle and a load belong to the calling thread; no
 * global state, so a worker process opens its own handle. Memory: the shards are mapped
 * read-only and only the byte ranges of the requested tensors are read, in file order, so a
 * rank holding 1/W of the experts reads about 1/W of the expert bytes. Mappings are dropped
 * at the end of every load.
 *
 * Invariants: the entry table is sorted by name with unique names, each entry pointing at a
 * validated header entry of an open shard; eng_ckpt_open has checked every tensor of every
 * MoE layer (exists, shape, supported dtype) and fixed, per layer, which of the two expert
 * forms it has (fused[]); eng_model_load checks its own subset again before it reads a byte.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "engine/model/model.h"
#include "engine/model/model_impl.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define NAME_CAP 256

typedef struct ck_entry {
    const char *name; /* points into the shard's header */
    int32_t file;
    const eng_st_tensor *t;
} ck_entry;

struct eng_ckpt {
    char *dir;
    eng_model_desc desc;
    bool has_index;
    int32_t n_files;
    eng_st_file *files;
    char **file_names; /* base names */
    int32_t n_entries;
    ck_entry *entries; /* sorted by name */
    /* per model layer: the routed experts are transformers 5's fused tensors */
    bool fused[ENG_MODEL_MAX_LAYERS];
};

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const ck_entry *)a)->name, ((const ck_entry *)b)->name);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

const eng_st_tensor *eng_ckpt_find(const eng_ckpt_t *ck, const char *name, const char **file) {
    if (!ck || !name || ck->n_entries == 0)
        return NULL;
    ck_entry key = {.name = name};
    const ck_entry *e = bsearch(&key, ck->entries, (size_t)ck->n_entries, sizeof key, cmp_entry);
    if (!e)
        return NULL;
    if (file)
        *file = ck->file_names[e->file];
    return e->t;
}

const eng_model_desc *eng_ckpt_desc(const eng_ckpt_t *ck) { return &ck->desc; }
const char *eng_ckpt_dir(const eng_ckpt_t *ck) { return ck->dir; }
int32_t eng_ckpt_n_files(const eng_ckpt_t *ck) { return ck->n_files; }

void eng_ckpt_close(eng_ckpt_t *ck) {
    if (!ck)
        return;
    for (int32_t i = 0; i < ck->n_files; i++) {
        eng_st_file_close(&ck->files[i]);
        free(ck->file_names[i]);
    }
    free(ck->files);
    free(ck->file_names);
    free(ck->entries);
    free(ck->dir);
    free(ck);
}

/* A shard name from the index must be a plain file of the directory: no path separators,
 * no "..", nothing hidden (the index is as untrusted as the shards). */
static moe_status check_shard_name(const char *dir, const char *name) {
    char b[96];
    if (!name[0] || name[0] == '.' || strchr(name, '/') || strchr(name, '\\') || strlen(name) >= NAME_CAP)
        return moe_fail(MOE_ERR_FORMAT, "%s/%s: shard name '%s' is not a plain file name of the directory", dir,
                        INDEX_NAME, eng_sanitize(name, b, sizeof b));
    return MOE_OK;
}

/* The index of a shard by name (file_names is sorted: it was built from a sorted list). */
static moe_status find_file(const eng_ckpt_t *ck, const char *name, int32_t *idx) {
    const char *key = name;
    char *const *hit = bsearch(&key, ck->file_names, (size_t)ck->n_files, sizeof *ck->file_names, cmp_str);
    MOE_REQUIRE(hit, MOE_ERR_INTERNAL, "find_file: %s not listed", name);
    *idx = (int32_t)(hit - ck->file_names);
    return MOE_OK;
}

static moe_status open_files(eng_ckpt_t *ck, char **names, int32_t n) {
    ck->files = calloc((size_t)(n ? n : 1), sizeof *ck->files);
    ck->file_names = calloc((size_t)(n ? n : 1), sizeof *ck->file_names);
    if (!ck->files || !ck->file_names)
        return moe_fail(MOE_ERR_NOMEM, "checkpoint: %d files", (int)n);
    char path[4096];
    for (int32_t i = 0; i < n; i++) {
        MOE_CHECK(eng_path_join(path, sizeof path, ck->dir, names[i]));
        moe_status st = eng_st_file_open(&ck->files[i], path);
        if (st != MOE_OK) {
            if (st == MOE_ERR_NOT_FOUND)
                return moe_fail(st, "%s: shard '%s' is missing%s", ck->dir, names[i],
                                ck->has_index ? " (named by " INDEX_NAME ")" : "");
            return st;
        }
        ck->file_names[i] = strdup(names[i]);
        ck->n_files = i + 1; /* from here eng_ckpt_close owns both */
        if (!ck->file_names[i])
            return moe_fail(MOE_ERR_NOMEM, "checkpoint");
    }
    return MOE_OK;
}

/* With an index: the files it names, and one entry per weight_map line. */
static moe_status open_indexed(eng_ckpt_t *ck, const char *index_path) {
    moe_status st = MOE_OK;
    char *text = NULL, **names = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    char b[96], b2[96];
    MOE_CHECK(eng_read_file(index_path, 512u << 20, &text, &len));
    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: not valid JSON (at byte %zu of %zu)", index_path,
                      end ? (size_t)(end - text) : (size_t)0, len);
        goto done;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: no \"weight_map\" object", index_path);
        goto done;
    }
    int32_t n_map = cJSON_GetArraySize(wm), n_names = 0;
    names = calloc((size_t)(n_map ? n_map : 1), sizeof *names);
    ck->entries = calloc((size_t)(n_map ? n_map : 1), sizeof *ck->entries);
    if (!names || !ck->entries) {
        st = moe_fail(MOE_ERR_NOMEM, "%s: %d entries", index_path, (int)n_map);
        goto done;
    }
    for (const cJSON *e = wm->child; e; e = e->next) {
        if (!cJSON_IsString(e) || !e->string) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: weight_map value for '%s' is not a file name", index_path,
                          eng_sanitize(e->string ? e->string : "", b, sizeof b));
            goto done;
        }
        MOE_CHECK_GOTO(check_shard_name(ck->dir, e->valuestring), st, done);
        names[n_names++] = e->valuestring; /* borrowed from the JSON; deduplicated below */
    }
    qsort(names, (size_t)n_names, sizeof *names, cmp_str);
    int32_t u = 0;
    for (int32_t i = 0; i < n_names; i++)
        if (u == 0 || strcmp(names[u - 1], names[i]) != 0)
            names[u++] = names[i];
    MOE_CHECK_GOTO(open_files(ck, names, u), st, done);
    int32_t k = 0;
    for (const cJSON *e = wm->child; e; e = e->next) {
        int32_t fi = -1;
        MOE_CHECK_GOTO(find_file(ck, e->valuestring, &fi), st, done);
        const eng_st_tensor *t = eng_st_header_find(&ck->files[fi].hdr, e->string);
        if (!t) {
            st =
                moe_fail(MOE_ERR_NOT_FOUND, "%s: tensor '%s' is not in %s, where %s puts it", ck->dir,
                         eng_sanitize(e->string, b, sizeof b), eng_sanitize(e->valuestring, b2, sizeof b2), INDEX_NAME);
            goto done;
        }
        ck->entries[k].name = t->name; /* the header's copy outlives the JSON */
        ck->entries[k].file = fi;
        ck->entries[k].t = t;
        k++;
    }
    ck->n_entries = k;
    qsort(ck->entries, (size_t)k, sizeof *ck->entries, cmp_entry);
    for (int32_t i = 1; i < k; i++) {
        if (strcmp(ck->entries[i - 1].name, ck->entries[i].name) == 0) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s' is listed twice", index_path,
                          eng_sanitize(ck->entries[i].name, b, sizeof b));
            goto done;
        }
    }
done:
    cJSON_Delete(root);
    free(text);
    free(names);
    return st;
}

/* Without an index: every *.safetensors of the directory, every tensor in them. */
static moe_status open_unindexed(eng_ckpt_t *ck) {
    moe_status st = MOE_OK;
    char **names = NULL;
    int32_t n = 0, cap = 0;
    char b[96];
    DIR *dh = opendir(ck->dir);
    if (!dh)
        return moe_fail(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: cannot open the directory: %s", ck->dir,
                        moe_strerror_(errno));
    struct dirent *de;
    while ((de = readdir(dh))) {
        size_t l = strlen(de->d_name);
        if (de->d_name[0] == '.' || l <= 12 || strcmp(de->d_name + l - 12, ".safetensors") != 0 || l >= NAME_CAP)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 8;
            char **nn = realloc(names, (size_t)cap * sizeof *names);
            if (!nn) {
                st = moe_fail(MOE_ERR_NOMEM, "checkpoint");
                goto done;
            }
            names = nn;
        }
        names[n] = strdup(de->d_name);
        if (!names[n]) {
            st = moe_fail(MOE_ERR_NOMEM, "checkpoint");
            goto done;
        }
        n++;
    }
    if (n == 0) {
        st = moe_fail(MOE_ERR_NOT_FOUND, "%s: no %s and no *.safetensors files: not a checkpoint directory", ck->dir,
                      INDEX_NAME);
        goto done;
    }
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    MOE_CHECK_GOTO(open_files(ck, names, n), st, done);
    int64_t total = 0;
    for (int32_t i = 0; i < n; i++)
        total += ck->files[i].hdr.n_tensors;
    if (total > INT32_MAX) {
        st = moe_fail(MOE_ERR_LIMIT, "%s: too many tensors", ck->dir);
        goto done;
    }
    ck->entries = calloc((size_t)(total ? total : 1), sizeof *ck->entries);
    if (!ck->entries) {
        st = moe_fail(MOE_ERR_NOMEM, "checkpoint: %lld tensors", (long long)total);
        goto done;
    }
    int32_t k = 0;
    for (int32_t i = 0; i < n; i++) {
        for (int32_t j = 0; j < ck->files[i].hdr.n_tensors; j++) {
            ck->entries[k].t = &ck->files[i].hdr.tensors[j];
            ck->entries[k].name = ck->entries[k].t->name;
            ck->entries[k].file = i;
            k++;
        }
    }
    ck->n_entries = k;
    qsort(ck->entries, (size_t)k, sizeof *ck->entries, cmp_entry);
    for (int32_t i = 1; i < k; i++) {
        if (strcmp(ck->entries[i - 1].name, ck->entries[i].name) == 0) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s' is in both %s and %s (and no %s says which)", ck->dir,
                          eng_sanitize(ck->entries[i].name, b, sizeof b), ck->file_names[ck->entries[i - 1].file],
                          ck->file_names[ck->entries[i].file], INDEX_NAME);
            goto done;
        }
    }
done:
    closedir(dh);
    for (int32_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return st;
}

/* Where an expected shape comes from, for messages. */
static const char *shape_words(eng_model_tensor kind) {
    switch (kind) {
    case ENG_TENSOR_ROUTER:
        return "n_experts x hidden_size";
    case ENG_TENSOR_CORRECTION_BIAS:
        return "n_experts";
    case ENG_TENSOR_EXPERT_GATE:
    case ENG_TENSOR_EXPERT_UP:
        return "intermediate x hidden_size";
    case ENG_TENSOR_EXPERT_DOWN:
        return "hidden_size x intermediate";
    case ENG_TENSOR_SHARED_GATE_PROJ:
    case ENG_TENSOR_SHARED_UP_PROJ:
        return "shared intermediate x hidden_size";
    case ENG_TENSOR_SHARED_DOWN_PROJ:
        return "hidden_size x shared intermediate";
    case ENG_TENSOR_SHARED_EXPERT_GATE:
        return "1 x hidden_size";
    default:
        return "?";
    }
}

static const ck_entry *lookup(const eng_ckpt_t *ck, const char *name) {
    ck_entry key = {.name = name};
    return ck->n_entries ? bsearch(&key, ck->entries, (size_t)ck->n_entries, sizeof key, cmp_entry) : NULL;
}

static moe_status missing(const eng_ckpt_t *ck, const char *name, const char *also) {
    return moe_fail(MOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint (%s%s)", ck->dir, name,
                    ck->has_index ? "not in " INDEX_NAME : "in none of its .safetensors files", also ? also : "");
}

/* Checks a found tensor's dtype and shape (nd <= 3); errors name the tensor and its file. */
static moe_status check_found(const eng_ckpt_t *ck, const ck_entry *e, int32_t nd, const int64_t *shape,
                              const char *dims) {
    const char *fname = ck->file_names[e->file];
    const eng_st_tensor *t = e->t;
    moe_dtype dt;
    if (!eng_st_dtype_to_moe(t->dtype, &dt))
        return moe_fail(MOE_ERR_UNSUPPORTED,
                        "%s/%s: tensor '%s' has dtype %s: not supported yet (BF16, F16 and F32 are; quantized "
                        "checkpoints such as FP8 with scales are not)",
                        ck->dir, fname, t->name, eng_st_dtype_name(t->dtype));
    bool ok = t->ndim == nd;
    for (int32_t i = 0; ok && i < nd; i++)
        ok = t->shape[i] == shape[i];
    if (!ok) {
        char got[160], want[96];
        int n = snprintf(want, sizeof want, "[");
        for (int32_t i = 0; i < nd; i++)
            n += snprintf(want + n, sizeof want - (size_t)n, "%s%lld", i ? ", " : "", (long long)shape[i]);
        snprintf(want + n, sizeof want - (size_t)n, "]");
        return moe_fail(MOE_ERR_FORMAT, "%s/%s: tensor '%s' is %s, expected %s (%s, from config.json)", ck->dir, fname,
                        t->name, eng_st_tensor_desc(t, got, sizeof got), want, dims);
    }
    return MOE_OK;
}

/* Looks up one expected tensor in the published naming (Mixtral's router also under
 * transformers 5's "mlp.gate.weight") and checks its dtype and shape. */
static moe_status expect_tensor(const eng_ckpt_t *ck, eng_model_tensor kind, int32_t layer, int32_t expert,
                                const eng_st_tensor **out, int32_t *file) {
    const eng_model_desc *d = &ck->desc;
    char name[NAME_CAP];
    MOE_CHECK(eng_model_tensor_name(d, kind, layer, expert, name, sizeof name));
    const ck_entry *e = lookup(ck, name);
    if (!e && kind == ENG_TENSOR_ROUTER && d->family == ENG_FAMILY_MIXTRAL) {
        char alt[NAME_CAP];
        snprintf(alt, sizeof alt, "model.layers.%d.mlp.gate.weight", (int)layer);
        e = lookup(ck, alt);
    }
    if (!e)
        return missing(ck, name, NULL);
    int32_t nd;
    int64_t shape[2];
    eng_model_tensor_shape(d, kind, &nd, shape);
    MOE_CHECK(check_found(ck, e, nd, shape, shape_words(kind)));
    *out = e->t;
    *file = e->file;
    return MOE_OK;
}

/* transformers 5's fused expert tensors of a layer: which = 0 for gate_up_proj [E, 2I, H], 1
 * for down_proj [E, H, I]. NULL name lookups are not errors: *out = NULL. */
static moe_status expect_fused(const eng_ckpt_t *ck, int32_t layer, int which, const eng_st_tensor **out,
                               int32_t *file) {
    const eng_model_desc *d = &ck->desc;
    char name[NAME_CAP];
    snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%s", (int)layer, which ? "down_proj" : "gate_up_proj");
    const ck_entry *e = lookup(ck, name);
    *out = NULL;
    if (!e)
        return MOE_OK;
    int64_t E = d->n_experts, H = d->hidden_size, I = d->moe_intermediate;
    int64_t shape[3] = {E, which ? H : 2 * I, which ? I : H};
    MOE_CHECK(
        check_found(ck, e, 3, shape,
                    which ? "n_experts x hidden_size x intermediate" : "n_experts x 2 intermediate x hidden_size"));
    *out = e->t;
    *file = e->file;
    return MOE_OK;
}

/* Every tensor of every MoE layer, before any worker relies on them; decides per layer
 * whether its experts are per-expert tensors or fused ones. */
static moe_status validate_all(eng_ckpt_t *ck) {
    const eng_model_desc *d = &ck->desc;
    const eng_st_tensor *t, *t2;
    int32_t f;
    char name[NAME_CAP];
    for (int32_t li = 0; li < d->n_moe_layers; li++) {
        int32_t l = d->moe_layers[li];
        MOE_CHECK(eng_model_tensor_name(d, ENG_TENSOR_EXPERT_GATE, l, 0, name, sizeof name));
        if (!lookup(ck, name)) {
            MOE_CHECK(expect_fused(ck, l, 0, &t, &f));
            if (!t) {
                char also[NAME_CAP + 32];
                snprintf(also, sizeof also, ", nor the fused model.layers.%d.mlp.experts.gate_up_proj", (int)l);
                return missing(ck, name, also);
            }
            MOE_CHECK(expect_fused(ck, l, 1, &t2, &f));
            if (!t2) {
                snprintf(name, sizeof name, "model.layers.%d.mlp.experts.down_proj", (int)l);
                return missing(ck, name, ", though its gate_up_proj is there");
            }
            ck->fused[l] = true;
        }
        for (int k = 0; k < ENG_TENSOR_COUNT_; k++) {
            if (!eng_model_has_tensor(d, (eng_model_tensor)k))
                continue;
            bool per_expert = k == ENG_TENSOR_EXPERT_GATE || k == ENG_TENSOR_EXPERT_UP || k == ENG_TENSOR_EXPERT_DOWN;
            if (per_expert && ck->fused[l])
                continue;
            for (int32_t e = 0; e < (per_expert ? d->n_experts : 1); e++)
                MOE_CHECK(expect_tensor(ck, (eng_model_tensor)k, l, e, &t, &f));
        }
    }
    return MOE_OK;
}

moe_status eng_ckpt_open(eng_ckpt_t **out, const char *dir) {
    MOE_REQUIRE(out && dir, MOE_ERR_INVALID_ARG, "ckpt_open: NULL argument");
    *out = NULL;
    moe_status st = MOE_OK;
    eng_ckpt_t *ck = calloc(1, sizeof *ck);
    if (!ck)
        return moe_fail(MOE_ERR_NOMEM, "ckpt_open");
    ck->dir = strdup(dir);
    if (!ck->dir) {
        st = moe_fail(MOE_ERR_NOMEM, "ckpt_open");
        goto fail;
    }
    size_t dl = strlen(ck->dir);
    while (dl > 1 && ck->dir[dl - 1] == '/')
        ck->dir[--dl] = '\0';
    char path[4096];
    MOE_CHECK_GOTO(eng_path_join(path, sizeof path, ck->dir, "config.json"), st, fail);
    st = eng_model_config_load(path, &ck->desc);
    if (st == MOE_ERR_NOT_FOUND) {
        st = moe_fail(st, "%s: no config.json: not a Hugging Face checkpoint directory", ck->dir);
        goto fail;
    }
    if (st != MOE_OK)
        goto fail;
    MOE_CHECK_GOTO(eng_path_join(path, sizeof path, ck->dir, INDEX_NAME), st, fail);
    FILE *probe = fopen(path, "rb");
    ck->has_index = probe != NULL;
    if (probe)
        fclose(probe);
    if (ck->has_index)
        MOE_CHECK_GOTO(open_indexed(ck, path), st, fail);
    else
        MOE_CHECK_GOTO(open_unindexed(ck), st, fail);
    MOE_CHECK_GOTO(validate_all(ck), st, fail);
    /* The engine computes in the experts' own dtype: take it from the first routed expert. */
    const eng_st_tensor *t;
    int32_t f;
    int32_t l0 = ck->desc.moe_layers[0];
    if (ck->fused[l0])
        MOE_CHECK_GOTO(expect_fused(ck, l0, 0, &t, &f), st, fail);
    else
        MOE_CHECK_GOTO(expect_tensor(ck, ENG_TENSOR_EXPERT_GATE, l0, 0, &t, &f), st, fail);
    MOE_ASSERT(eng_st_dtype_to_moe(t->dtype, &ck->desc.dtype));
    char sb[400];
    MOE_DEBUG(MOE_SUB_ENG, "checkpoint %s: %d files, %d tensors; %s", ck->dir, (int)ck->n_files, (int)ck->n_entries,
              eng_model_desc_str(&ck->desc, sb, sizeof sb));
    *out = ck;
    return MOE_OK;
fail:
    eng_ckpt_close(ck);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * Loading.
 * ---------------------------------------------------------------------------------------- */
eng_model_load_params eng_model_load_params_default(void) {
    eng_model_load_params p;
    memset(&p, 0, sizeof p);
    p.router = true;
    p.shared = true;
    p.dtype = -1;
    return p;
}

typedef struct load_task {
    const eng_st_tensor *t;
    int32_t file;
    moe_dtype dt;
    void *dst;
    uint64_t first, count; /* elements of t (all of it, or one expert of a fused tensor) */
    uint64_t src_off, src_bytes;
} load_task;

static int cmp_task(const void *a, const void *b) {
    const load_task *x = a, *y = b;
    if (x->file != y->file)
        return x->file < y->file ? -1 : 1;
    return x->src_off < y->src_off ? -1 : x->src_off > y->src_off;
}

void eng_model_weights_free(eng_model_weights *w) {
    if (!w)
        return;
    for (int32_t i = 0; w->layers && i < w->n_layers; i++) {
        eng_model_layer *l = &w->layers[i];
        moe_tensor_free(&l->w13);
        moe_tensor_free(&l->w2);
        moe_tensor_free(&l->router);
        moe_tensor_free(&l->correction_bias);
        moe_tensor_free(&l->shared_w13);
        moe_tensor_free(&l->shared_w2);
        moe_tensor_free(&l->shared_gate);
    }
    free(w->layers);
    free(w->experts);
    memset(w, 0, sizeof *w);
}

const eng_model_layer *eng_model_weights_layer(const eng_model_weights *w, int32_t layer) {
    for (int32_t i = 0; w && i < w->n_layers; i++)
        if (w->layers[i].layer == layer)
            return &w->layers[i];
    return NULL;
}

static moe_status alloc_t(moe_tensor *t, moe_dtype dt, int32_t nd, int64_t d0, int64_t d1, int64_t d2,
                          uint64_t *bytes) {
    int64_t shape[3] = {d0, d1, d2};
    MOE_CHECK(moe_tensor_alloc(t, dt, nd, shape));
    *bytes += moe_tensor_nbytes(t);
    return MOE_OK;
}

static void push(load_task *tasks, int64_t *n, const eng_st_tensor *t, int32_t f, uint64_t first, uint64_t count,
                 moe_dtype dt, void *dst, uint64_t *total) {
    uint64_t es = (uint64_t)eng_st_dtype_bits(t->dtype) / 8;
    tasks[*n] = (load_task){.t = t,
                            .file = f,
                            .dt = dt,
                            .dst = dst,
                            .first = first,
                            .count = count,
                            .src_off = t->offset + first * es,
                            .src_bytes = count * es};
    (*n)++;
    *total += count * es;
}

/* Queues one whole tensor for reading into dst (after checking it). */
static moe_status queue(const eng_ckpt_t *ck, load_task *tasks, int64_t *n, eng_model_tensor kind, int32_t layer,
                        int32_t expert, moe_dtype dt, void *dst, uint64_t *total) {
    const eng_st_tensor *t;
    int32_t f;
    MOE_CHECK(expect_tensor(ck, kind, layer, expert, &t, &f));
    push(tasks, n, t, f, 0, t->nbytes / ((uint64_t)eng_st_dtype_bits(t->dtype) / 8), dt, dst, total);
    return MOE_OK;
}

moe_status eng_model_load(eng_ckpt_t *ck, const eng_model_load_params *pin, eng_model_weights *out) {
    MOE_REQUIRE(ck && out, MOE_ERR_INVALID_ARG, "model_load: NULL argument");
    const eng_model_desc *d = &ck->desc;
    eng_model_load_params p = pin ? *pin : eng_model_load_params_default();
    moe_status st = MOE_OK;
    eng_model_weights w;
    memset(&w, 0, sizeof w);
    load_task *tasks = NULL;
    bool *seen = NULL;
    double t0 = moe_now_s();

    moe_dtype dt = d->dtype;
    if (p.dtype >= 0) {
        MOE_REQUIRE(moe_dtype_valid(p.dtype) && moe_dtype_is_float((moe_dtype)p.dtype), MOE_ERR_INVALID_ARG,
                    "model_load: dtype %d is not a float dtype (f32, f16, bf16)", (int)p.dtype);
        dt = (moe_dtype)p.dtype;
    }
    int32_t E = d->n_experts, H = d->hidden_size, I = d->moe_intermediate, Is = d->shared_intermediate;
    int32_t n_local = p.experts ? p.n_local : E;
    int32_t n_layers = p.layers ? p.n_layers : d->n_moe_layers;
    MOE_REQUIRE(n_local >= 0 && n_local <= E, MOE_ERR_INVALID_ARG, "model_load: %d local experts, not in [0, %d]",
                (int)n_local, (int)E);
    MOE_REQUIRE(n_layers >= 0 && n_layers <= d->n_moe_layers, MOE_ERR_INVALID_ARG,
                "model_load: %d layers requested, the model has %d MoE layers", (int)n_layers, (int)d->n_moe_layers);

    seen = calloc((size_t)(E > d->n_layers ? E : d->n_layers) + 1, sizeof *seen);
    w.experts = malloc((size_t)(n_local ? n_local : 1) * sizeof *w.experts);
    w.layers = calloc((size_t)(n_layers ? n_layers : 1), sizeof *w.layers);
    if (!seen || !w.experts || !w.layers) {
        st = moe_fail(MOE_ERR_NOMEM, "model_load");
        goto fail;
    }
    for (int32_t s = 0; s < n_local; s++) {
        int32_t e = p.experts ? p.experts[s] : s;
        if (e < 0 || e >= E) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "model_load: expert id %d at slot %d is out of range [0, %d)", (int)e,
                          (int)s, (int)E);
            goto fail;
        }
        if (seen[e]) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "model_load: expert id %d is listed twice (slot %d)", (int)e, (int)s);
            goto fail;
        }
        seen[e] = true;
        w.experts[s] = e;
    }
    memset(seen, 0, (size_t)(E > d->n_layers ? E : d->n_layers) + 1);
    for (int32_t i = 0; i < n_layers; i++) {
        int32_t l = p.layers ? p.layers[i] : d->moe_layers[i];
        if (l < 0 || l >= d->n_layers || !eng_model_is_moe_layer(d, l)) {
            st = moe_fail(MOE_ERR_INVALID_ARG,
                          "model_load: layer %d is not a MoE layer of this model (%d layers, %d MoE)", (int)l,
                          (int)d->n_layers, (int)d->n_moe_layers);
            goto fail;
        }
        if (seen[l]) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "model_load: layer %d is requested twice", (int)l);
            goto fail;
        }
        seen[l] = true;
        w.layers[i].layer = l;
    }
    w.n_local = n_local;
    w.n_layers = n_layers;
    w.desc = *d;
    w.dtype = dt;

    /* Every tensor checked and queued, every buffer allocated, before any data is read. */
    int64_t per_layer = 3 * (int64_t)n_local + 6;
    tasks = malloc((size_t)(per_layer * (n_layers ? n_layers : 1)) * sizeof *tasks);
    if (!tasks) {
        st = moe_fail(MOE_ERR_NOMEM, "model_load: task list");
        goto fail;
    }
    int64_t nt = 0;
    uint64_t total = 0;
    size_t es = moe_dtype_size(dt);
    for (int32_t i = 0; i < n_layers; i++) {
        eng_model_layer *L = &w.layers[i];
        int32_t l = L->layer;
        MOE_CHECK_GOTO(alloc_t(&L->w13, dt, 3, n_local, 2 * (int64_t)I, H, &w.bytes), st, fail);
        MOE_CHECK_GOTO(alloc_t(&L->w2, dt, 3, n_local, H, I, &w.bytes), st, fail);
        size_t mat = (size_t)I * (size_t)H * es; /* bytes of one [I, H] or [H, I] matrix */
        const eng_st_tensor *fgu = NULL, *fdn = NULL;
        int32_t ffgu = -1, ffdn = -1;
        if (ck->fused[l]) {
            MOE_CHECK_GOTO(expect_fused(ck, l, 0, &fgu, &ffgu), st, fail);
            MOE_CHECK_GOTO(expect_fused(ck, l, 1, &fdn, &ffdn), st, fail);
            MOE_ASSERT(fgu && fdn); /* eng_ckpt_open saw both */
        }
        for (int32_t s = 0; s < n_local; s++) {
            uint8_t *w13 = (uint8_t *)L->w13.data + (size_t)s * 2 * mat;
            uint8_t *w2 = (uint8_t *)L->w2.data + (size_t)s * mat;
            int32_t e = w.experts[s];
            if (fgu) { /* one expert of the fused tensors: already [2I, H] gate then up, and [H, I] */
                uint64_t n13 = 2 * (uint64_t)I * (uint64_t)H, n2 = (uint64_t)I * (uint64_t)H;
                push(tasks, &nt, fgu, ffgu, (uint64_t)e * n13, n13, dt, w13, &total);
                push(tasks, &nt, fdn, ffdn, (uint64_t)e * n2, n2, dt, w2, &total);
                continue;
            }
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_EXPERT_GATE, l, e, dt, w13, &total), st, fail);
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_EXPERT_UP, l, e, dt, w13 + mat, &total), st, fail);
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_EXPERT_DOWN, l, e, dt, w2, &total), st, fail);
        }
        if (p.router) {
            MOE_CHECK_GOTO(alloc_t(&L->router, MOE_DTYPE_F32, 2, E, H, 0, &w.bytes), st, fail);
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_ROUTER, l, 0, MOE_DTYPE_F32, L->router.data, &total), st,
                           fail);
            if (d->has_correction_bias) {
                MOE_CHECK_GOTO(alloc_t(&L->correction_bias, MOE_DTYPE_F32, 1, E, 0, 0, &w.bytes), st, fail);
                MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_CORRECTION_BIAS, l, 0, MOE_DTYPE_F32,
                                     L->correction_bias.data, &total),
                               st, fail);
            }
        }
        if (p.shared && Is > 0) {
            size_t smat = (size_t)Is * (size_t)H * es;
            MOE_CHECK_GOTO(alloc_t(&L->shared_w13, dt, 2, 2 * (int64_t)Is, H, 0, &w.bytes), st, fail);
            MOE_CHECK_GOTO(alloc_t(&L->shared_w2, dt, 2, H, Is, 0, &w.bytes), st, fail);
            uint8_t *s13 = L->shared_w13.data;
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_SHARED_GATE_PROJ, l, 0, dt, s13, &total), st, fail);
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_SHARED_UP_PROJ, l, 0, dt, s13 + smat, &total), st, fail);
            MOE_CHECK_GOTO(queue(ck, tasks, &nt, ENG_TENSOR_SHARED_DOWN_PROJ, l, 0, dt, L->shared_w2.data, &total), st,
                           fail);
            if (d->has_shared_gate) {
                MOE_CHECK_GOTO(alloc_t(&L->shared_gate, dt, 1, H, 0, 0, &w.bytes), st, fail);
                MOE_CHECK_GOTO(
                    queue(ck, tasks, &nt, ENG_TENSOR_SHARED_EXPERT_GATE, l, 0, dt, L->shared_gate.data, &total), st,
                    fail);
            }
        }
    }

    /* In file order: sequential reads of each shard. */
    qsort(tasks, (size_t)nt, sizeof *tasks, cmp_task);
    uint64_t done = 0;
    for (int64_t i = 0; i < nt; i++) {
        MOE_CHECK_GOTO(eng_st_file_read_part(&ck->files[tasks[i].file], tasks[i].t, tasks[i].first, tasks[i].count,
                                             tasks[i].dt, tasks[i].dst),
                       st, fail);
        done += tasks[i].src_bytes;
        if (p.progress && done < total)
            p.progress(p.progress_arg, "load", done, total);
    }
    if (p.progress)
        p.progress(p.progress_arg, "load", total, total);
    for (int32_t i = 0; i < ck->n_files; i++)
        eng_st_file_unmap(&ck->files[i]);
    double el = moe_now_s() - t0;
    MOE_INFO(MOE_SUB_ENG, "loaded %d experts x %d layers (%s) from %s: %.1f MiB read, %.1f MiB held, %.2fs",
             (int)n_local, (int)n_layers, moe_dtype_name(dt), ck->dir, (double)total / 1048576.0,
             (double)w.bytes / 1048576.0, el);
    free(tasks);
    free(seen);
    *out = w;
    return MOE_OK;
fail:
    for (int32_t i = 0; i < ck->n_files; i++)
        eng_st_file_unmap(&ck->files[i]);
    free(tasks);
    free(seen);
    eng_model_weights_free(&w);
    return st;
}

kern_route_params eng_model_route_params(const eng_model_desc *d, const eng_model_layer *l) {
    kern_route_params p = d->route;
    p.correction_bias = (d->has_correction_bias && l && l->correction_bias.data) ? l->correction_bias.data : NULL;
    return p;
}

bool eng_model_shared_expert(const eng_model_desc *d, const eng_model_layer *l, kern_shared_expert *se) {
    if (!l || !l->shared_w13.data || !se)
        return false;
    se->w13 = &l->shared_w13;
    se->w2 = &l->shared_w2;
    se->gate = l->shared_gate.data ? &l->shared_gate : NULL;
    se->act = d->act;
    return true;
}

moe_status eng_model_expert_map(const eng_model_weights *w, int32_t *map) {
    MOE_REQUIRE(w && map, MOE_ERR_INVALID_ARG, "expert_map: NULL argument");
    for (int32_t e = 0; e < w->desc.n_experts; e++)
        map[e] = -1;
    for (int32_t s = 0; s < w->n_local; s++)
        map[w->experts[s]] = s;
    return MOE_OK;
}

moe_status eng_model_router_logits(const eng_model_layer *l, const moe_tensor *x, moe_tensor *logits) {
    MOE_REQUIRE(l && x && logits, MOE_ERR_INVALID_ARG, "router_logits: NULL argument");
    MOE_REQUIRE(l->router.data, MOE_ERR_INVALID_ARG, "router_logits: layer %d was loaded without its router",
                (int)l->layer);
    int64_t E = l->router.shape[0], H = l->router.shape[1];
    MOE_REQUIRE(moe_dtype_is_float(x->dtype), MOE_ERR_INVALID_ARG, "router_logits: x must be a float tensor");
    MOE_CHECK(moe_tensor_expect(x, "router_logits: x", x->dtype, 2, (int64_t[]){-1, H}));
    int64_t T = x->shape[0];
    MOE_CHECK(moe_tensor_expect(logits, "router_logits: logits", MOE_DTYPE_F32, 2, (int64_t[]){T, E}));
    MOE_REQUIRE(!moe_tensors_overlap(x, logits), MOE_ERR_ALIAS, "router_logits: logits overlap x");
    float *row = moe_alloc((size_t)H * sizeof(float));
    if (!row)
        return moe_fail(MOE_ERR_NOMEM, "router_logits");
    const float *wr = l->router.data;
    float *out = logits->data;
    size_t xs = moe_dtype_size(x->dtype);
    for (int64_t t = 0; t < T; t++) {
        moe_to_f32(x->dtype, (const uint8_t *)x->data + (size_t)t * (size_t)H * xs, row, (size_t)H);
        for (int64_t e = 0; e < E; e++) {
            const float *we = wr + e * H;
            float acc = 0.0f;
            for (int64_t h = 0; h < H; h++)
                acc += row[h] * we[h];
            out[t * E + e] = acc;
        }
    }
    moe_free(row);
    return MOE_OK;
}
