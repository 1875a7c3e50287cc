/*
 * test_make_model.c: the synthetic model writer and the loader together: every family is
 * written sharded, opened and loaded, and the loaded layout is checked against the raw bytes
 * of each tensor read straight from the shard files (stdio, not the loader's mapping); weights
 * have the promised scale; the same seed gives the same bytes and the shard size does not
 * change any value; per-rank loads (contiguous and round-robin placements, layer subsets,
 * dtype conversion) hold exactly the right experts; bad requests and bad command lines are
 * clear errors. The writer streams: writing a ~50 MB model must not grow the process by more
 * than a small buffer.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/model/model.h"
#include "tests/model/st_build.h"

static void small_params(eng_synth_params *p, eng_model_family f, const char *dir) {
    assert_int_equal(eng_synth_params_default(p, f), MOE_OK);
    p->out_dir = dir;
    p->n_layers = 3;
    p->n_experts = 8;
    p->top_k = 2;
    p->hidden = 64;
    p->intermediate = 32;
    if (f == ENG_FAMILY_QWEN2_MOE)
        p->shared_intermediate = 48;
    if (f == ENG_FAMILY_DEEPSEEK_V2 || f == ENG_FAMILY_DEEPSEEK_V3)
        p->dense_layers = 1;
    p->shard_bytes = 20000; /* several shards */
    p->seed = 42;
}

/* Reads `n` bytes at `off` of dir/file with stdio. */
static void raw_read(const char *dir, const char *file, uint64_t off, void *dst, size_t n) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, (long)off, SEEK_SET), 0);
    assert_int_equal(fread(dst, 1, n, f), n);
    fclose(f);
}

/* The raw bytes of a checkpoint tensor, converted to float (bf16/f16/f32 by hand). */
static float *raw_tensor(const eng_ckpt_t *ck, const char *name, size_t *numel) {
    const char *file = NULL;
    const eng_st_tensor *t = eng_ckpt_find(ck, name, &file);
    if (!t)
        fail_msg("tensor %s not found", name);
    uint8_t *b = malloc(t->nbytes);
    raw_read(eng_ckpt_dir(ck), file, t->offset, b, t->nbytes);
    size_t es = t->dtype == ENG_ST_F32 ? 4 : 2;
    size_t n = t->nbytes / es;
    float *f = malloc(n * sizeof *f);
    for (size_t i = 0; i < n; i++) {
        if (t->dtype == ENG_ST_F32) {
            memcpy(&f[i], b + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, b + 2 * i, 2);
            if (t->dtype == ENG_ST_BF16) {
                uint32_t u = (uint32_t)h << 16;
                memcpy(&f[i], &u, 4);
            } else {
                f[i] = moe_f16_to_f32(h);
            }
        }
    }
    free(b);
    *numel = n;
    return f;
}

/* Compares n floats of a loaded tensor (at element offset `at`) with a raw tensor. */
static void expect_slice(const moe_tensor *t, size_t at, const float *ref, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float v = moe_load_f32(t->dtype, t->data, at + i);
        if (v != ref[i] && !(isnan(v) && isnan(ref[i])))
            fail_msg("element %zu: loaded %g, file %g", i, (double)v, (double)ref[i]);
    }
}

static void check_layout(const eng_ckpt_t *ck, const eng_model_weights *w) {
    const eng_model_desc *d = eng_ckpt_desc(ck);
    size_t H = (size_t)d->hidden_size, I = (size_t)d->moe_intermediate, Is = (size_t)d->shared_intermediate;
    char name[256];
    size_t n;
    for (int32_t li = 0; li < w->n_layers; li++) {
        const eng_model_layer *L = &w->layers[li];
        assert_int_equal(L->w13.ndim, 3);
        assert_int_equal(L->w13.shape[0], w->n_local);
        assert_int_equal(L->w13.shape[1], 2 * (int64_t)I);
        assert_int_equal(L->w13.shape[2], (int64_t)H);
        assert_int_equal(L->w2.shape[1], (int64_t)H);
        assert_int_equal(L->w2.shape[2], (int64_t)I);
        assert_int_equal((uintptr_t)L->w13.data % 64, 0);
        assert_int_equal((uintptr_t)L->w2.data % 64, 0);
        for (int32_t s = 0; s < w->n_local; s++) {
            int32_t e = w->experts[s];
            float *r;
            eng_model_tensor_name(d, ENG_TENSOR_EXPERT_GATE, L->layer, e, name, sizeof name);
            r = raw_tensor(ck, name, &n);
            assert_int_equal(n, I * H);
            expect_slice(&L->w13, (size_t)s * 2 * I * H, r, n);
            free(r);
            eng_model_tensor_name(d, ENG_TENSOR_EXPERT_UP, L->layer, e, name, sizeof name);
            r = raw_tensor(ck, name, &n);
            expect_slice(&L->w13, (size_t)s * 2 * I * H + I * H, r, n);
            free(r);
            eng_model_tensor_name(d, ENG_TENSOR_EXPERT_DOWN, L->layer, e, name, sizeof name);
            r = raw_tensor(ck, name, &n);
            expect_slice(&L->w2, (size_t)s * I * H, r, n);
            free(r);
        }
        if (L->router.data) {
            assert_int_equal(L->router.dtype, MOE_DTYPE_F32);
            eng_model_tensor_name(d, ENG_TENSOR_ROUTER, L->layer, 0, name, sizeof name);
            float *r = raw_tensor(ck, name, &n);
            assert_int_equal(n, (size_t)d->n_experts * H);
            expect_slice(&L->router, 0, r, n);
            free(r);
        }
        if (L->correction_bias.data) {
            eng_model_tensor_name(d, ENG_TENSOR_CORRECTION_BIAS, L->layer, 0, name, sizeof name);
            float *r = raw_tensor(ck, name, &n);
            expect_slice(&L->correction_bias, 0, r, n);
            free(r);
        }
        if (L->shared_w13.data) {
            eng_model_tensor_name(d, ENG_TENSOR_SHARED_GATE_PROJ, L->layer, 0, name, sizeof name);
            float *r = raw_tensor(ck, name, &n);
            assert_int_equal(n, Is * H);
            expect_slice(&L->shared_w13, 0, r, n);
            free(r);
            eng_model_tensor_name(d, ENG_TENSOR_SHARED_UP_PROJ, L->layer, 0, name, sizeof name);
            r = raw_tensor(ck, name, &n);
            expect_slice(&L->shared_w13, Is * H, r, n);
            free(r);
            eng_model_tensor_name(d, ENG_TENSOR_SHARED_DOWN_PROJ, L->layer, 0, name, sizeof name);
            r = raw_tensor(ck, name, &n);
            expect_slice(&L->shared_w2, 0, r, n);
            free(r);
        }
        if (L->shared_gate.data) {
            assert_int_equal(L->shared_gate.ndim, 1);
            assert_int_equal(L->shared_gate.shape[0], (int64_t)H);
            eng_model_tensor_name(d, ENG_TENSOR_SHARED_EXPERT_GATE, L->layer, 0, name, sizeof name);
            float *r = raw_tensor(ck, name, &n);
            expect_slice(&L->shared_gate, 0, r, n);
            free(r);
        }
    }
}

typedef struct prog_rec {
    int calls, finals;
    uint64_t last, total;
    bool monotonic;
} prog_rec;

static void prog_cb(void *arg, const char *stage, uint64_t done, uint64_t total) {
    prog_rec *r = arg;
    assert_non_null(stage);
    if (done < r->last)
        r->monotonic = false;
    r->last = done;
    r->total = total;
    r->calls++;
    if (done == total)
        r->finals++;
}

/* Writing ~50 MB must not need ~50 MB of memory: runs first, while the high-water mark of the
 * process is still low. */
static void test_streaming(void **state) {
    (void)state;
    char *dir = stb_tmpdir("mm_stream");
    eng_synth_params p;
    assert_int_equal(eng_synth_params_default(&p, ENG_FAMILY_QWEN3_MOE), MOE_OK);
    p.out_dir = dir;
    p.n_layers = 2;
    p.n_experts = 16;
    p.hidden = 512;
    p.intermediate = 512; /* 2 x 16 x 3 x 512 x 512 x 2 bytes = 48 MiB */
    p.shard_bytes = 16u << 20;
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    double t0 = moe_now_s();
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    double el = moe_now_s() - t0;
    getrusage(RUSAGE_SELF, &r1);
    long grew_kb = r1.ru_maxrss - r0.ru_maxrss;
    print_message("wrote 48 MiB in %.3fs; peak RSS grew by %ld KiB\n", el, grew_kb);
    assert_true(grew_kb < 16 * 1024);
    eng_ckpt_t *ck;
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    assert_int_equal(eng_ckpt_n_files(ck), 4);
    eng_ckpt_close(ck);
    free(dir);
}

static void test_each_family(void **state) {
    (void)state;
    for (int f = 0; f < ENG_FAMILY_COUNT_; f++) {
        char *dir = stb_tmpdir("mm_family");
        eng_synth_params p;
        small_params(&p, (eng_model_family)f, dir);
        prog_rec pr = {.monotonic = true};
        p.progress = prog_cb;
        p.progress_arg = &pr;
        assert_int_equal(eng_synth_write(&p), MOE_OK);
        assert_true(pr.monotonic);
        assert_int_equal(pr.finals, 1);
        assert_true(pr.total > 0);
        eng_model_desc want;
        assert_int_equal(eng_synth_desc(&p, &want), MOE_OK);
        eng_ckpt_t *ck;
        if (eng_ckpt_open(&ck, dir) != MOE_OK)
            fail_msg("%s: %s", eng_model_family_name((eng_model_family)f), moe_errmsg());
        const eng_model_desc *d = eng_ckpt_desc(ck);
        assert_int_equal(d->family, f);
        assert_string_equal(d->architecture, eng_model_family_arch((eng_model_family)f));
        assert_int_equal(d->dtype, MOE_DTYPE_BF16);
        assert_int_equal(d->n_moe_layers, want.n_moe_layers);
        assert_int_equal(d->n_moe_layers, f >= ENG_FAMILY_DEEPSEEK_V2 ? 2 : 3);
        assert_int_equal(d->shared_intermediate, want.shared_intermediate);
        assert_true(eng_ckpt_n_files(ck) > 1);
        char idx[4200];
        snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
        assert_int_equal(access(idx, R_OK), 0);
        eng_model_weights w;
        prog_rec lr = {.monotonic = true};
        eng_model_load_params lp = eng_model_load_params_default();
        lp.progress = prog_cb;
        lp.progress_arg = &lr;
        assert_int_equal(eng_model_load(ck, &lp, &w), MOE_OK);
        assert_true(lr.monotonic);
        assert_int_equal(lr.finals, 1);
        assert_int_equal(w.n_layers, d->n_moe_layers);
        assert_int_equal(w.n_local, 8);
        assert_int_equal(w.dtype, MOE_DTYPE_BF16);
        assert_int_equal(w.bytes, eng_model_rank_bytes(d, 8, w.n_layers, true, true, MOE_DTYPE_BF16));
        check_layout(ck, &w);
        for (int32_t li = 0; li < w.n_layers; li++) {
            const eng_model_layer *L = &w.layers[li];
            assert_true(eng_model_weights_layer(&w, L->layer) == L);
            assert_int_equal(L->correction_bias.data != NULL, f == ENG_FAMILY_DEEPSEEK_V3);
            assert_int_equal(L->shared_w13.data != NULL, f == ENG_FAMILY_QWEN2_MOE || f >= ENG_FAMILY_DEEPSEEK_V2);
            assert_int_equal(L->shared_gate.data != NULL, f == ENG_FAMILY_QWEN2_MOE);
            kern_route_params rp = eng_model_route_params(d, L);
            assert_true(rp.correction_bias == (f == ENG_FAMILY_DEEPSEEK_V3 ? L->correction_bias.data : NULL));
            kern_shared_expert se;
            assert_int_equal(eng_model_shared_expert(d, L, &se), L->shared_w13.data != NULL);
        }
        assert_int_equal(eng_model_weights_layer(&w, 0) != NULL, f < ENG_FAMILY_DEEPSEEK_V2); /* DeepSeek: dense */
        eng_model_weights_free(&w);
        eng_ckpt_close(ck);
        free(dir);
    }
}

static void stats(const moe_tensor *t, size_t at, size_t n, double *mean, double *sd) {
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        double v = moe_load_f32(t->dtype, t->data, at + i);
        s += v;
        s2 += v * v;
    }
    *mean = s / (double)n;
    *sd = sqrt(s2 / (double)n - *mean * *mean);
}

static bool files_equal(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    bool eq = fa && fb;
    while (eq) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb)
            eq = false;
        if (ca == EOF || cb == EOF)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return eq;
}

static void test_values_and_seeds(void **state) {
    (void)state;
    char *d1 = stb_tmpdir("mm_seed"), *d2 = stb_tmpdir("mm_seed"), *d3 = stb_tmpdir("mm_seed");
    eng_synth_params p;
    small_params(&p, ENG_FAMILY_MIXTRAL, d1);
    p.dtype = MOE_DTYPE_F32;
    p.hidden = 128;
    p.intermediate = 256;
    p.shard_bytes = 1u << 30; /* one shard: model.safetensors, no index */
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    p.out_dir = d2;
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/model.safetensors", d1);
    snprintf(b, sizeof b, "%s/model.safetensors", d2);
    assert_true(files_equal(a, b)); /* the same seed, the same bytes */
    snprintf(b, sizeof b, "%s/model.safetensors.index.json", d1);
    assert_int_not_equal(access(b, F_OK), 0);
    /* another shard size: other files, the same tensors */
    p.out_dir = d3;
    p.shard_bytes = 100000;
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    eng_ckpt_t *c1, *c3;
    assert_int_equal(eng_ckpt_open(&c1, d1), MOE_OK);
    assert_int_equal(eng_ckpt_open(&c3, d3), MOE_OK);
    assert_int_equal(eng_ckpt_n_files(c1), 1);
    assert_true(eng_ckpt_n_files(c3) > 3);
    eng_model_weights w1, w3;
    assert_int_equal(eng_model_load(c1, NULL, &w1), MOE_OK);
    assert_int_equal(eng_model_load(c3, NULL, &w3), MOE_OK);
    for (int32_t i = 0; i < w1.n_layers; i++) {
        assert_memory_equal(w1.layers[i].w13.data, w3.layers[i].w13.data, moe_tensor_nbytes(&w1.layers[i].w13));
        assert_memory_equal(w1.layers[i].w2.data, w3.layers[i].w2.data, moe_tensor_nbytes(&w1.layers[i].w2));
        assert_memory_equal(w1.layers[i].router.data, w3.layers[i].router.data,
                            moe_tensor_nbytes(&w1.layers[i].router));
    }
    /* the scale: normal(0, 1/sqrt(fan_in)); fan_in = H for w1/w3 and the router, I for w2 */
    double mean, sd;
    size_t n13 = (size_t)w1.n_local * 2 * 256 * 128, n2 = (size_t)w1.n_local * 128 * 256;
    stats(&w1.layers[0].w13, 0, n13, &mean, &sd);
    assert_true(fabs(mean) < 0.01 / sqrt(128.0) * 10);
    assert_true(fabs(sd * sqrt(128.0) - 1.0) < 0.02);
    stats(&w1.layers[0].w2, 0, n2, &mean, &sd);
    assert_true(fabs(sd * sqrt(256.0) - 1.0) < 0.02);
    stats(&w1.layers[0].router, 0, 8 * 128, &mean, &sd);
    assert_true(fabs(sd * sqrt(128.0) - 1.0) < 0.1);
    /* experts and layers differ from each other */
    assert_memory_not_equal(w1.layers[0].w13.data, (uint8_t *)w1.layers[0].w13.data + 2 * 256 * 128 * 4, 256);
    assert_memory_not_equal(w1.layers[0].w13.data, w1.layers[1].w13.data, 256);
    eng_model_weights_free(&w1);
    eng_model_weights_free(&w3);
    eng_ckpt_close(c1);
    eng_ckpt_close(c3);
    /* another seed, other values */
    p.out_dir = d2;
    p.seed = 43;
    p.shard_bytes = 1u << 30;
    p.force = true;
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    snprintf(b, sizeof b, "%s/model.safetensors", d2);
    assert_false(files_equal(a, b));
    free(d1);
    free(d2);
    free(d3);
}

static void test_rank_loads(void **state) {
    (void)state;
    char *dir = stb_tmpdir("mm_rank");
    eng_synth_params p;
    small_params(&p, ENG_FAMILY_DEEPSEEK_V3, dir);
    p.n_layers = 4; /* MoE layers 1, 2, 3 */
    assert_int_equal(eng_synth_write(&p), MOE_OK);
    eng_ckpt_t *ck;
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    const eng_model_desc *d = eng_ckpt_desc(ck);
    assert_int_equal(d->n_moe_layers, 3);
    for (int pol = 0; pol < 2; pol++) {
        par_placement pl;
        assert_int_equal(par_placement_init(&pl, 8, 3, (par_place_policy)pol), MOE_OK);
        eng_model_log_placement(d, &pl, 2, true, true, d->dtype);
        for (int32_t r = 0; r < 3; r++) {
            eng_model_load_params lp = eng_model_load_params_default();
            lp.experts = pl.experts[r];
            lp.n_local = pl.n_local[r];
            int32_t layers[] = {3, 1};
            lp.layers = layers;
            lp.n_layers = 2;
            lp.router = r == 0; /* only the answering rank routes */
            lp.shared = r == 0;
            eng_model_weights w;
            assert_int_equal(eng_model_load(ck, &lp, &w), MOE_OK);
            assert_int_equal(w.n_local, pl.n_local[r]);
            assert_int_equal(w.n_layers, 2);
            assert_int_equal(w.layers[0].layer, 3);
            assert_int_equal(w.layers[1].layer, 1);
            assert_null(eng_model_weights_layer(&w, 2));
            assert_int_equal(w.layers[0].router.data != NULL, r == 0);
            assert_int_equal(w.layers[0].correction_bias.data != NULL, r == 0);
            assert_int_equal(w.layers[0].shared_w13.data != NULL, r == 0);
            assert_int_equal(w.bytes, eng_model_rank_bytes(d, pl.n_local[r], 2, r == 0, r == 0, d->dtype));
            check_layout(ck, &w);
            int32_t map[8], want[8];
            assert_int_equal(eng_model_expert_map(&w, map), MOE_OK);
            assert_int_equal(par_placement_expert_map(&pl, r, want), MOE_OK);
            assert_memory_equal(map, want, sizeof map);
            eng_model_weights_free(&w);
        }
        par_placement_free(&pl);
    }
    /* another dtype: exact widening to f32 */
    eng_model_load_params lp = eng_model_load_params_default();
    lp.dtype = MOE_DTYPE_F32;
    eng_model_weights w;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_OK);
    assert_int_equal(w.dtype, MOE_DTYPE_F32);
    assert_int_equal(w.layers[0].w13.dtype, MOE_DTYPE_F32);
    assert_int_equal(w.layers[0].shared_w13.dtype, MOE_DTYPE_F32);
    check_layout(ck, &w);
    eng_model_weights_free(&w);
    /* bad requests */
    int32_t bad_ids[] = {0, 8}, dup_ids[] = {1, 1}, ok_ids[] = {2}, dense[] = {0}, dup_layers[] = {1, 1};
    lp = eng_model_load_params_default();
    lp.experts = bad_ids;
    lp.n_local = 2;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "expert id 8"));
    lp.experts = dup_ids;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "twice"));
    lp.experts = ok_ids;
    lp.n_local = 1;
    lp.layers = dense;
    lp.n_layers = 1;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "layer 0 is not a MoE layer"));
    lp.layers = dup_layers;
    lp.n_layers = 2;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "twice"));
    lp.layers = NULL;
    lp.dtype = MOE_DTYPE_I32;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_ERR_INVALID_ARG);
    /* router logits need the router */
    lp = eng_model_load_params_default();
    lp.router = false;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_OK);
    moe_tensor x, lg;
    assert_int_equal(moe_tensor_alloc(&x, MOE_DTYPE_BF16, 2, (int64_t[]){2, 64}), MOE_OK);
    assert_int_equal(moe_tensor_alloc(&lg, MOE_DTYPE_F32, 2, (int64_t[]){2, 8}), MOE_OK);
    assert_int_equal(eng_model_router_logits(&w.layers[0], &x, &lg), MOE_ERR_INVALID_ARG);
    moe_tensor_free(&x);
    moe_tensor_free(&lg);
    eng_model_weights_free(&w);
    eng_ckpt_close(ck);
    free(dir);
}

static void expect_same_weights(const eng_model_weights *a, const eng_model_weights *b) {
    assert_int_equal(a->n_layers, b->n_layers);
    for (int32_t i = 0; i < a->n_layers; i++) {
        const eng_model_layer *x = &a->layers[i], *y = &b->layers[i];
        const moe_tensor *tx[] = {&x->w13,        &x->w2,        &x->router,     &x->correction_bias,
                                  &x->shared_w13, &x->shared_w2, &x->shared_gate};
        const moe_tensor *ty[] = {&y->w13,        &y->w2,        &y->router,     &y->correction_bias,
                                  &y->shared_w13, &y->shared_w2, &y->shared_gate};
        for (int k = 0; k < 7; k++) {
            assert_int_equal(moe_tensor_nbytes(tx[k]), moe_tensor_nbytes(ty[k]));
            assert_int_equal(tx[k]->data != NULL, ty[k]->data != NULL);
            if (tx[k]->data)
                assert_memory_equal(tx[k]->data, ty[k]->data, moe_tensor_nbytes(tx[k]));
        }
    }
}

/* transformers 5's fused experts: the same seed written both ways loads to the same
 * weights, for every family and for a rank's subset. */
static void test_fused_experts(void **state) {
    (void)state;
    for (int f = 0; f < ENG_FAMILY_COUNT_; f++) {
        char *d1 = stb_tmpdir("mm_unfused"), *d2 = stb_tmpdir("mm_fused");
        eng_synth_params p;
        small_params(&p, (eng_model_family)f, d1);
        assert_int_equal(eng_synth_write(&p), MOE_OK);
        p.out_dir = d2;
        p.fused_experts = true;
        assert_int_equal(eng_synth_write(&p), MOE_OK);
        eng_ckpt_t *c1, *c2;
        assert_int_equal(eng_ckpt_open(&c1, d1), MOE_OK);
        if (eng_ckpt_open(&c2, d2) != MOE_OK)
            fail_msg("%s fused: %s", eng_model_family_name((eng_model_family)f), moe_errmsg());
        const eng_model_desc *d = eng_ckpt_desc(c2);
        int32_t l = d->moe_layers[0];
        char name[200];
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.gate_up_proj", (int)l);
        const eng_st_tensor *t = eng_ckpt_find(c2, name, NULL);
        assert_non_null(t);
        assert_int_equal(t->ndim, 3);
        assert_int_equal(t->shape[1], 2 * (int64_t)d->moe_intermediate);
        eng_model_tensor_name(d, ENG_TENSOR_EXPERT_GATE, l, 0, name, sizeof name);
        assert_null(eng_ckpt_find(c2, name, NULL));
        snprintf(name, sizeof name, "model.layers.%d.mlp.gate.weight", (int)l); /* Mixtral's too */
        assert_non_null(eng_ckpt_find(c2, name, NULL));
        eng_model_weights w1, w2;
        assert_int_equal(eng_model_load(c1, NULL, &w1), MOE_OK);
        assert_int_equal(eng_model_load(c2, NULL, &w2), MOE_OK);
        expect_same_weights(&w1, &w2);
        eng_model_weights_free(&w1);
        eng_model_weights_free(&w2);
        int32_t ids[] = {6, 1, 3};
        eng_model_load_params lp = eng_model_load_params_default();
        lp.experts = ids;
        lp.n_local = 3;
        lp.dtype = MOE_DTYPE_F32;
        assert_int_equal(eng_model_load(c1, &lp, &w1), MOE_OK);
        assert_int_equal(eng_model_load(c2, &lp, &w2), MOE_OK);
        expect_same_weights(&w1, &w2);
        check_layout(c1, &w2);
        eng_model_weights_free(&w1);
        eng_model_weights_free(&w2);
        eng_ckpt_close(c1);
        eng_ckpt_close(c2);
        free(d1);
        free(d2);
    }
}

static void test_ids_str(void **state) {
    (void)state;
    char b[64];
    int32_t ids[] = {0, 1, 2, 3, 8, 10, 11};
    assert_string_equal(eng_model_ids_str(ids, 7, b, sizeof b), "0-3,8,10-11");
    int32_t rr[] = {1, 4, 7};
    assert_string_equal(eng_model_ids_str(rr, 3, b, sizeof b), "1,4,7");
    assert_string_equal(eng_model_ids_str(rr, 0, b, sizeof b), "");
    int32_t many[40];
    for (int i = 0; i < 40; i++)
        many[i] = 3 * i;
    eng_model_ids_str(many, 40, b, 16);
    assert_true(strlen(b) < 16);
    assert_non_null(strstr(b, "..."));
}

static int run_cli(const char *a0, ...) {
    char *argv[32];
    int argc = 0;
    va_list ap;
    va_start(ap, a0);
    argv[argc++] = (char *)"make-model";
    for (const char *a = a0; a && argc < 31; a = va_arg(ap, const char *))
        argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;
    return eng_make_model_main(argc, argv);
}

static void test_cli(void **state) {
    (void)state;
    char *dir = stb_tmpdir("mm_cli");
    assert_int_equal(run_cli("--help", NULL), 0);
    assert_int_equal(run_cli(NULL), 2);
    assert_int_equal(run_cli("--out", dir, NULL), 2);                                   /* no family */
    assert_int_equal(run_cli("--family", "llama", "--out", dir, NULL), 2);              /* unknown family */
    assert_int_equal(run_cli("--family", "mixtral", NULL), 2);                          /* no --out */
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--bogus", NULL), 2); /* unknown flag */
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--layers", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--layers", "two", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--layers", "0", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--layers", "2", "--layers", "3", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--top-k", "9", NULL), 2); /* > experts */
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--shared-experts", "1", NULL), 2);
    assert_int_equal(run_cli("--family", "qwen3_moe", "--out", dir, "--shared-intermediate", "64", NULL), 2);
    assert_int_equal(run_cli("--family", "deepseek_v3", "--out", dir, "--groups", "3", NULL), 2); /* 8 % 3 */
    assert_int_equal(run_cli("--family", "deepseek_v3", "--out", dir, "--scoring", "relu", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--dtype", "i32", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--shard-size", "12X", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--seed", "-1", NULL), 2);
    assert_int_equal(run_cli("--family", "mixtral", "--out", dir, "--force=yes", NULL), 2);
    /* a valid run, and a second one refused without --force */
    assert_int_equal(run_cli("--family", "qwen2_moe", "--out", dir, "--layers", "2", "--experts", "4", "--hidden", "32",
                             "--intermediate", "16", "--top-k=2", "--shard-size", "8K", "--seed", "7",
                             "--mlp-only-layers", "1", "--quiet", NULL),
                     0);
    eng_ckpt_t *ck;
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    const eng_model_desc *d = eng_ckpt_desc(ck);
    assert_int_equal(d->family, ENG_FAMILY_QWEN2_MOE);
    assert_int_equal(d->n_experts, 4);
    assert_int_equal(d->hidden_size, 32);
    assert_int_equal(d->moe_intermediate, 16);
    assert_int_equal(d->shared_intermediate, 32); /* default 2 x --intermediate */
    assert_int_equal(d->n_moe_layers, 1);
    assert_int_equal(d->moe_layers[0], 0);
    assert_true(eng_ckpt_n_files(ck) > 1);
    eng_ckpt_close(ck);
    assert_int_equal(run_cli("--family", "qwen2_moe", "--out", dir, "--quiet", NULL), 1);
    assert_non_null(strstr(moe_errmsg(), "--force"));
    assert_int_equal(run_cli("--family", "deepseek_v2", "--out", dir, "--quiet", "--force", "--topk-method",
                             "group_limited_greedy", "--groups", "4", "--topk-group", "2", "--scaling", "16",
                             "--dense-layers", "1", "--layers", "3", "--dtype", "f16", NULL),
                     0);
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    d = eng_ckpt_desc(ck);
    assert_int_equal(d->family, ENG_FAMILY_DEEPSEEK_V2);
    assert_int_equal(d->dtype, MOE_DTYPE_F16);
    assert_int_equal(d->route.group_mode, KERN_GROUP_MAX);
    assert_true(d->route.routed_scaling_factor == 16.0f);
    assert_int_equal(d->n_moe_layers, 2);
    assert_int_equal(eng_ckpt_n_files(ck), 1); /* the old shards were removed */
    eng_ckpt_close(ck);
    /* DeepSeek-V3's default 4 groups adapt to an expert count they do not divide */
    assert_int_equal(run_cli("--family", "deepseek_v3", "--out", dir, "--force", "--quiet", "--experts", "6", NULL), 0);
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    d = eng_ckpt_desc(ck);
    assert_int_equal(d->route.group_mode, KERN_GROUP_TOP2_SUM);
    assert_int_equal(d->route.n_group, 2);
    assert_int_equal(d->route.topk_group, 2);
    assert_true(d->has_correction_bias);
    eng_ckpt_close(ck);
    assert_int_equal(
        run_cli("--family", "deepseek_v3", "--out", dir, "--force", "--quiet", "--experts", "3", "--top-k", "3", NULL),
        0);
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    assert_int_equal(eng_ckpt_desc(ck)->route.group_mode, KERN_GROUP_NONE); /* one group */
    eng_ckpt_close(ck);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_streaming),
        cmocka_unit_test(test_each_family),
        cmocka_unit_test(test_values_and_seeds),
        cmocka_unit_test(test_rank_loads),
        cmocka_unit_test(test_fused_experts),
        cmocka_unit_test(test_ids_str),
        cmocka_unit_test(test_cli),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
