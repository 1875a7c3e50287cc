/*
 * test_ckpt_errors.c: broken checkpoint directories. Each must fail at eng_ckpt_open with a
 * clear error that names what is wrong (the tensor, the file, the field), never crash and
 * never leak (the suite also runs under --config=asan). Broken variants are made two ways:
 * by editing a good checkpoint from the synthetic writer (index, config, shard files), and by
 * writing small checkpoints by hand (st_build.h) where a tensor must be made wrong in one
 * precise way (dtype, shape, overlap).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "engine/model/model.h"
#include "tests/model/st_build.h"

static void expect_open_error(const char *dir, moe_status want, const char *w1, const char *w2) {
    eng_ckpt_t *ck = (eng_ckpt_t *)0x1;
    moe_errmsg_clear();
    moe_status st = eng_ckpt_open(&ck, dir);
    if (st == MOE_OK)
        eng_ckpt_close(ck);
    if (st != want)
        fail_msg("%s: expected %s, got %s (%s)", dir, moe_status_name(want), moe_status_name(st), moe_errmsg());
    assert_null(ck);
    const char *m = moe_errmsg();
    if ((w1 && !strstr(m, w1)) || (w2 && !strstr(m, w2)))
        fail_msg("message '%s' lacks '%s' / '%s'", m, w1 ? w1 : "", w2 ? w2 : "");
    print_message("  ok: %s\n", m);
}

static int32_t g_shards; /* shards of the last good_ckpt() */

/* dir/model-0000i-of-0000n.safetensors of the last good checkpoint. */
static void shard_path(char *buf, size_t cap, const char *dir, int i) {
    snprintf(buf, cap, "%s/model-%05d-of-%05d.safetensors", dir, i, (int)g_shards);
}

/* A good qwen2_moe checkpoint (shared expert + gate) in several shards. */
static char *good_ckpt(void) {
    char *dir = stb_tmpdir("ck_err");
    eng_synth_params p;
    assert_int_equal(eng_synth_params_default(&p, ENG_FAMILY_QWEN2_MOE), MOE_OK);
    p.out_dir = dir;
    p.n_layers = 2;
    p.n_experts = 4;
    p.hidden = 32;
    p.intermediate = 16;
    p.shared_intermediate = 24;
    p.shard_bytes = 6000;
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    eng_ckpt_t *ck;
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    g_shards = eng_ckpt_n_files(ck);
    assert_true(g_shards >= 3);
    eng_ckpt_close(ck);
    return dir;
}

static cJSON *load_json(const char *dir, const char *name) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *buf = malloc(1 << 20);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    fclose(f);
    buf[n] = '\0';
    cJSON *j = cJSON_Parse(buf);
    free(buf);
    assert_non_null(j);
    return j;
}

static void save_json(const char *dir, const char *name, cJSON *j) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *txt = cJSON_Print(j);
    assert_int_equal(stb_write_text(path, txt), 0);
    free(txt);
    cJSON_Delete(j);
}

#define INDEX "model.safetensors.index.json"
#define E0_UP "model.layers.1.mlp.experts.2.up_proj.weight"

static void test_index_problems(void **state) {
    (void)state;
    /* a tensor missing from the index */
    char *dir = good_ckpt();
    cJSON *ix = load_json(dir, INDEX);
    cJSON_DeleteItemFromObjectCaseSensitive(cJSON_GetObjectItem(ix, "weight_map"), E0_UP);
    save_json(dir, INDEX, ix);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "'" E0_UP "'", "not in " INDEX);
    free(dir);

    /* the index puts a tensor in the wrong shard */
    dir = good_ckpt();
    ix = load_json(dir, INDEX);
    cJSON *wm = cJSON_GetObjectItem(ix, "weight_map");
    const char *first = cJSON_GetObjectItem(wm, "model.layers.0.mlp.gate.weight")->valuestring;
    cJSON *last_shard = NULL;
    for (cJSON *e = wm->child; e; e = e->next)
        if (strcmp(e->valuestring, first) != 0)
            last_shard = e;
    assert_non_null(last_shard);
    char moved[256];
    snprintf(moved, sizeof moved, "%s", last_shard->valuestring);
    cJSON_ReplaceItemInObjectCaseSensitive(wm, "model.layers.0.mlp.gate.weight", cJSON_CreateString(moved));
    save_json(dir, INDEX, ix);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "'model.layers.0.mlp.gate.weight' is not in", moved);
    free(dir);

    /* a shard the index names is gone */
    dir = good_ckpt();
    char path[4200];
    shard_path(path, sizeof path, dir, 2);
    assert_int_equal(unlink(path), 0);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, strrchr(path, '/') + 1, "missing");
    free(dir);

    /* bad JSON, no weight_map, a path that leaves the directory, a non-string entry */
    dir = good_ckpt();
    snprintf(path, sizeof path, "%s/" INDEX, dir);
    assert_int_equal(stb_write_text(path, "{\"weight_map\": {\"a\": \"x.safetensors\""), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, INDEX, "not valid JSON");
    assert_int_equal(stb_write_text(path, "{\"metadata\": {}}"), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, "weight_map", NULL);
    assert_int_equal(stb_write_text(path, "{\"weight_map\": {\"a\": \"../../etc/passwd\"}}"), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, "../../etc/passwd", "not a plain file name");
    assert_int_equal(stb_write_text(path, "{\"weight_map\": {\"a\": \".hidden.safetensors\"}}"), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, "not a plain file name", NULL);
    assert_int_equal(stb_write_text(path, "{\"weight_map\": {\"a\": 3}}"), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, "weight_map value for 'a'", NULL);
    free(dir);
}

static void test_shard_problems(void **state) {
    (void)state;
    char *dir = good_ckpt();
    char path[4200];
    /* truncated shard */
    shard_path(path, sizeof path, dir, 3);
    const char *base = strrchr(path, '/') + 1;
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    assert_int_equal(truncate(path, size - 100), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, base, "past the end");
    /* header length past the end */
    assert_int_equal(truncate(path, 30), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, base, "runs past the end of the file");
    /* not a safetensors file at all */
    assert_int_equal(stb_write_text(path, "<html>404 Not Found</html>"), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, base, NULL);
    /* bad JSON in a header */
    assert_int_equal(stb_write(path, "{\"a\":{\"dtype\":\"F32\",", NULL, 16), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, base, "not valid JSON");
    free(dir);
}

static void test_config_problems(void **state) {
    (void)state;
    char *dir = good_ckpt();
    char path[4200];
    /* shapes that do not match config.json */
    cJSON *c = load_json(dir, "config.json");
    cJSON_ReplaceItemInObjectCaseSensitive(c, "moe_intermediate_size", cJSON_CreateNumber(20));
    save_json(dir, "config.json", c);
    expect_open_error(dir, MOE_ERR_FORMAT, "'model.layers.0.mlp.experts.0.gate_proj.weight' is BF16[16, 32]",
                      "expected [20, 32]");
    c = load_json(dir, "config.json");
    cJSON_ReplaceItemInObjectCaseSensitive(c, "moe_intermediate_size", cJSON_CreateNumber(16));
    cJSON_ReplaceItemInObjectCaseSensitive(c, "num_experts", cJSON_CreateNumber(5));
    save_json(dir, "config.json", c);
    expect_open_error(dir, MOE_ERR_FORMAT, "'model.layers.0.mlp.gate.weight' is BF16[4, 32]", "expected [5, 32]");
    /* more experts than the checkpoint holds is a missing tensor */
    c = load_json(dir, "config.json");
    cJSON_DeleteItemFromObjectCaseSensitive(c, "num_experts");
    cJSON_AddNumberToObject(c, "num_experts", 4);
    cJSON_ReplaceItemInObjectCaseSensitive(c, "shared_expert_intermediate_size", cJSON_CreateNumber(25));
    save_json(dir, "config.json", c);
    expect_open_error(dir, MOE_ERR_FORMAT, "shared_expert.gate_proj.weight", "expected [25, 32]");
    /* an architecture we do not serve */
    c = load_json(dir, "config.json");
    cJSON_ReplaceItemInObjectCaseSensitive(c, "architectures",
                                           cJSON_CreateStringArray((const char *[]){"GPT2LMHeadModel"}, 1));
    cJSON_ReplaceItemInObjectCaseSensitive(c, "model_type", cJSON_CreateString("gpt2"));
    save_json(dir, "config.json", c);
    expect_open_error(dir, MOE_ERR_UNSUPPORTED, "unknown architecture 'GPT2LMHeadModel'", "config.json");
    /* config.json missing, or not JSON */
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_int_equal(stb_write_text(path, "{\"model_type\": \"qwen2_moe\", "), 0);
    expect_open_error(dir, MOE_ERR_FORMAT, "config.json", "not valid JSON");
    assert_int_equal(unlink(path), 0);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "no config.json", NULL);
    free(dir);
    expect_open_error("/nonexistent/checkpoint", MOE_ERR_NOT_FOUND, "/nonexistent/checkpoint", NULL);
}

/* ------------------------------------------------------------------------------------------
 * Hand-made checkpoints: Mixtral, H=4, I=2, E=2, K=1, one layer; every tensor F32 unless
 * changed.
 * ---------------------------------------------------------------------------------------- */
typedef struct hm_tensor {
    char name[96];
    char dtype[16];
    int64_t d0, d1;
} hm_tensor;

static const char *hm_config = "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\","
                               " \"hidden_size\": 4, \"intermediate_size\": 2, \"num_local_experts\": 2,"
                               " \"num_experts_per_tok\": 1, \"num_hidden_layers\": 1, \"torch_dtype\": \"float32\"}";

static int hm_list(hm_tensor *t) {
    int n = 0;
    snprintf(t[n].name, sizeof t[n].name, "model.layers.0.block_sparse_moe.gate.weight");
    t[n].d0 = 2, t[n].d1 = 4, n++;
    for (int e = 0; e < 2; e++) {
        const char *w[3] = {"w1", "w3", "w2"};
        for (int k = 0; k < 3; k++) {
            snprintf(t[n].name, sizeof t[n].name, "model.layers.0.block_sparse_moe.experts.%d.%s.weight", e, w[k]);
            t[n].d0 = k == 2 ? 4 : 2;
            t[n].d1 = k == 2 ? 2 : 4;
            n++;
        }
    }
    for (int i = 0; i < n; i++)
        snprintf(t[i].dtype, sizeof t[i].dtype, "F32");
    return n;
}

static size_t esize(const char *dt) { return !strcmp(dt, "F32") ? 4 : !strcmp(dt, "F8_E4M3") ? 1 : 2; }

/* Writes dir/file with tensors [from, to) of t, laid out in order; `overlap_at` >= 0 makes that
 * tensor start 4 bytes before the previous one ends. */
static void hm_write(const char *dir, const char *file, const hm_tensor *t, int from, int to, int overlap_at) {
    char json[8192];
    size_t used = (size_t)snprintf(json, sizeof json, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t off = 0;
    for (int i = from; i < to; i++) {
        uint64_t nb = (uint64_t)(t[i].d0 * t[i].d1) * esize(t[i].dtype);
        if (i == overlap_at)
            off -= 4;
        used += (size_t)snprintf(json + used, sizeof json - used,
                                 ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],\"data_offsets\":[%llu,%llu]}",
                                 t[i].name, t[i].dtype, (long long)t[i].d0, (long long)t[i].d1, (unsigned long long)off,
                                 (unsigned long long)(off + nb));
        off += nb;
    }
    snprintf(json + used, sizeof json - used, "}");
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    assert_int_equal(stb_write(path, json, NULL, (size_t)off), 0);
}

static char *hm_dir(void) {
    char *dir = stb_tmpdir("ck_hand");
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_int_equal(stb_write_text(path, hm_config), 0);
    return dir;
}

static void test_handmade(void **state) {
    (void)state;
    hm_tensor t[16];
    int n = hm_list(t);
    assert_int_equal(n, 7);

    /* the good one, one file, no index: loads, values as written */
    char *dir = hm_dir();
    hm_write(dir, "model.safetensors", t, 0, n, -1);
    eng_ckpt_t *ck;
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    assert_int_equal(eng_ckpt_desc(ck)->dtype, MOE_DTYPE_F32);
    eng_model_weights w;
    assert_int_equal(eng_model_load(ck, NULL, &w), MOE_OK);
    eng_model_weights_free(&w);
    eng_ckpt_close(ck);
    free(dir);

    /* two files without an index: fine; the same tensor in both: refused */
    dir = hm_dir();
    hm_write(dir, "a.safetensors", t, 0, 4, -1);
    hm_write(dir, "b.safetensors", t, 4, n, -1);
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    assert_int_equal(eng_ckpt_n_files(ck), 2);
    eng_ckpt_close(ck);
    hm_write(dir, "b.safetensors", t, 3, n, -1);
    expect_open_error(dir, MOE_ERR_FORMAT, "experts.0.w2.weight' is in both a.safetensors and b.safetensors", NULL);
    free(dir);

    /* a missing expert tensor, no index */
    dir = hm_dir();
    hm_write(dir, "model.safetensors", t, 0, n - 1, -1);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "'model.layers.0.block_sparse_moe.experts.1.w2.weight' is missing",
                      "none of its .safetensors");
    free(dir);

    /* an unsupported dtype (FP8 weights): "not supported yet", naming the tensor and file */
    dir = hm_dir();
    hm_tensor t2[16];
    memcpy(t2, t, sizeof t);
    snprintf(t2[5].dtype, sizeof t2[5].dtype, "F8_E4M3");
    hm_write(dir, "model.safetensors", t2, 0, n, -1);
    expect_open_error(dir, MOE_ERR_UNSUPPORTED,
                      "model.safetensors: tensor 'model.layers.0.block_sparse_moe.experts.1.w3",
                      "F8_E4M3: not supported yet");
    free(dir);

    /* a wrong shape (transposed down projection) */
    dir = hm_dir();
    memcpy(t2, t, sizeof t);
    t2[3].d0 = 2, t2[3].d1 = 4;
    hm_write(dir, "model.safetensors", t2, 0, n, -1);
    expect_open_error(dir, MOE_ERR_FORMAT, "experts.0.w2.weight' is F32[2, 4], expected [4, 2]",
                      "hidden_size x intermediate");
    free(dir);

    /* overlapping tensors in one shard */
    dir = hm_dir();
    hm_write(dir, "model.safetensors", t, 0, n, 4);
    expect_open_error(dir, MOE_ERR_FORMAT, "overlap", "experts.1.w1.weight");
    free(dir);

    /* an unknown dtype string */
    dir = hm_dir();
    memcpy(t2, t, sizeof t);
    snprintf(t2[1].dtype, sizeof t2[1].dtype, "BF32");
    hm_write(dir, "model.safetensors", t2, 0, n, -1);
    expect_open_error(dir, MOE_ERR_FORMAT, "unknown dtype 'BF32'", "experts.0.w1.weight");
    free(dir);

    /* a directory with config.json but no weights */
    dir = hm_dir();
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "no model.safetensors.index.json and no *.safetensors", NULL);
    free(dir);
}

/* transformers 5's fused experts with a wrong shape, or half of them */
static void test_fused_problems(void **state) {
    (void)state;
    hm_tensor t[8];
    memset(t, 0, sizeof t);
    snprintf(t[0].name, sizeof t[0].name, "model.layers.0.mlp.gate.weight");
    t[0].d0 = 2, t[0].d1 = 4;
    snprintf(t[1].name, sizeof t[1].name, "model.layers.0.mlp.experts.gate_up_proj");
    t[1].d0 = 2, t[1].d1 = 4 * 4; /* 2-d: should be [2, 4, 4] */
    snprintf(t[2].name, sizeof t[2].name, "model.layers.0.mlp.experts.down_proj");
    t[2].d0 = 2, t[2].d1 = 8;
    for (int i = 0; i < 3; i++)
        snprintf(t[i].dtype, sizeof t[i].dtype, "F32");
    char *dir = hm_dir();
    hm_write(dir, "model.safetensors", t, 0, 3, -1);
    expect_open_error(dir, MOE_ERR_FORMAT,
                      "'model.layers.0.mlp.experts.gate_up_proj' is F32[2, 16], expected [2, 4, 4]",
                      "n_experts x 2 intermediate x hidden_size");
    hm_write(dir, "model.safetensors", t, 0, 2, -1);
    expect_open_error(dir, MOE_ERR_FORMAT, "gate_up_proj", NULL);
    free(dir);
    /* gate_up_proj right, down_proj missing */
    dir = hm_dir();
    char json[1024];
    snprintf(json, sizeof json,
             "{\"model.layers.0.mlp.gate.weight\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[0,32]},"
             "\"model.layers.0.mlp.experts.gate_up_proj\":{\"dtype\":\"F32\",\"shape\":[2,4,4],"
             "\"data_offsets\":[32,160]}}");
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    assert_int_equal(stb_write(path, json, NULL, 160), 0);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "'model.layers.0.mlp.experts.down_proj' is missing",
                      "though its gate_up_proj is there");
    /* neither form: the per-expert name is reported, with the fused one */
    snprintf(json, sizeof json,
             "{\"model.layers.0.mlp.gate.weight\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[0,32]}}");
    assert_int_equal(stb_write(path, json, NULL, 32), 0);
    expect_open_error(dir, MOE_ERR_NOT_FOUND, "'model.layers.0.block_sparse_moe.experts.0.w1.weight' is missing",
                      "nor the fused model.layers.0.mlp.experts.gate_up_proj");
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_index_problems),  cmocka_unit_test(test_shard_problems),
        cmocka_unit_test(test_config_problems), cmocka_unit_test(test_handmade),
        cmocka_unit_test(test_fused_problems),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
