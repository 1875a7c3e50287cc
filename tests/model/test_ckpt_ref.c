/*
 * test_ckpt_ref.c: the loader + kernels reproduce the independent numpy reference on real
 * checkpoint directories. write_checkpoints.py (a genrule) writes a tiny checkpoint of every
 * family in transformers' naming (sharded with an index, or one file), with the other tensors
 * of a real model around the MoE ones, and the expected output of every MoE layer from
 * tests/ref/moe_ref.py (two in transformers 5's fused-experts form); here each checkpoint is
 * opened and loaded by engine/model and run
 * through the kernels:
 *   - router logits (eng_model_router_logits) against moe_ref's, relative 1e-5;
 *   - routing (kern_route with the description's routing parameters and the loaded
 *     correction bias) from the reference logits and from our own: the same expert ids, the
 *     same weights within 1e-5;
 *   - the whole layer (kern_moe_forward: routed experts + shared expert) against moe_ref's y:
 *     normalized error max|y - ref| / max|ref| <= 1e-5 for f32, 2e-3 for f16, 1e-2 for bf16;
 *   - on the cpu-ref and cpu backends, and split over 3 ranks (contiguous and round-robin
 *     placements, each rank loading only its experts, the answering rank the router and
 *     the shared expert), where the per-slot contributions summed by kern_moe_sum must give
 *     the same bits as the single-rank layer.
 */
#include <dirent.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/model/model.h"

#define CKPT "tests/model/ckpt"

static double tol_for(moe_dtype dt) { return dt == MOE_DTYPE_F32 ? 1e-5 : dt == MOE_DTYPE_F16 ? 2e-3 : 1e-2; }

/* Reads tensor `name` of the expected file into a fresh tensor of its own dtype. */
static void read_expected(eng_st_file *f, const char *name, moe_tensor *out) {
    const eng_st_tensor *t = eng_st_header_find(&f->hdr, name);
    if (!t)
        fail_msg("%s: no tensor %s", f->path, name);
    moe_dtype dt = MOE_DTYPE_I32;
    if (t->dtype != ENG_ST_I32)
        assert_true(eng_st_dtype_to_moe(t->dtype, &dt));
    int64_t shape[4] = {0};
    for (int32_t i = 0; i < t->ndim; i++)
        shape[i] = t->shape[i];
    assert_int_equal(moe_tensor_alloc(out, dt, t->ndim, shape), MOE_OK);
    if (dt == MOE_DTYPE_I32) {
        assert_int_equal(eng_st_file_map(f), MOE_OK);
        memcpy(out->data, f->map + t->offset, t->nbytes);
    } else {
        assert_int_equal(eng_st_file_read(f, t, dt, out->data), MOE_OK);
    }
}

/* max |a - b| / max(max |b|, floor) over all elements (as floats). */
static double norm_err(const moe_tensor *a, const moe_tensor *b, double floor) {
    int64_t n = moe_tensor_numel(b);
    assert_int_equal(moe_tensor_numel(a), n);
    double md = 0, mr = floor;
    for (int64_t i = 0; i < n; i++) {
        double x = moe_load_f32(a->dtype, a->data, (size_t)i), y = moe_load_f32(b->dtype, b->data, (size_t)i);
        if (!isfinite(x))
            return INFINITY;
        md = fmax(md, fabs(x - y));
        mr = fmax(mr, fabs(y));
    }
    return md / mr;
}

typedef struct layer_ref {
    moe_tensor x, logits, ids, w, y;
} layer_ref;

static void layer_ref_free(layer_ref *r) {
    moe_tensor_free(&r->x);
    moe_tensor_free(&r->logits);
    moe_tensor_free(&r->ids);
    moe_tensor_free(&r->w);
    moe_tensor_free(&r->y);
}

/* kern_route on `logits`: ids must equal the reference's, weights within 1e-5. */
static void check_route(kern_ctx_t *ctx, const kern_route_params *rp, const moe_tensor *logits, const layer_ref *r,
                        const char *what) {
    int64_t T = r->ids.shape[0], K = r->ids.shape[1];
    moe_tensor ids, w;
    assert_int_equal(moe_tensor_alloc(&ids, MOE_DTYPE_I32, 2, (int64_t[]){T, K}), MOE_OK);
    assert_int_equal(moe_tensor_alloc(&w, MOE_DTYPE_F32, 2, (int64_t[]){T, K}), MOE_OK);
    if (kern_route(ctx, rp, logits, &ids, &w) != MOE_OK)
        fail_msg("%s: kern_route: %s", what, moe_errmsg());
    const int32_t *a = ids.data, *b = r->ids.data;
    for (int64_t i = 0; i < T * K; i++)
        if (a[i] != b[i])
            fail_msg("%s: token %lld slot %lld: expert %d, reference %d", what, (long long)(i / K), (long long)(i % K),
                     (int)a[i], (int)b[i]);
    double e = norm_err(&w, &r->w, 1.0);
    if (e > 1e-5)
        fail_msg("%s: routing weights differ by %g", what, e);
    moe_tensor_free(&ids);
    moe_tensor_free(&w);
}

/* One rank's per-slot contributions with its own experts; the answering rank (0) also
 * computes the shared expert. */
static void rank_slots(kern_ctx_t *ctx, eng_ckpt_t *ck, const par_placement *pl, int32_t r, int32_t layer,
                       const layer_ref *ref, moe_tensor *slots, moe_tensor *shared) {
    const eng_model_desc *d = eng_ckpt_desc(ck);
    eng_model_load_params lp = eng_model_load_params_default();
    lp.experts = pl->experts[r];
    lp.n_local = pl->n_local[r];
    lp.layers = &layer;
    lp.n_layers = 1;
    lp.router = r == 0;
    lp.shared = r == 0;
    eng_model_weights w;
    assert_int_equal(eng_model_load(ck, &lp, &w), MOE_OK);
    int32_t *map = malloc((size_t)d->n_experts * sizeof *map);
    assert_int_equal(eng_model_expert_map(&w, map), MOE_OK);
    kern_experts_params ep = {.n_experts = d->n_experts, .n_local = w.n_local, .expert_map = map, .act = d->act};
    if (kern_fused_experts(ctx, &ep, &ref->x, &w.layers[0].w13, &w.layers[0].w2, &ref->ids, &ref->w, slots) != MOE_OK)
        fail_msg("rank %d: fused_experts: %s", (int)r, moe_errmsg());
    kern_shared_expert se;
    if (r == 0 && eng_model_shared_expert(d, &w.layers[0], &se))
        assert_int_equal(kern_shared_expert_forward(ctx, &se, &ref->x, shared), MOE_OK);
    free(map);
    eng_model_weights_free(&w);
}

static void check_ranks(kern_ctx_t *ctx, eng_ckpt_t *ck, int32_t layer, const layer_ref *ref, const moe_tensor *y1,
                        const char *what) {
    const eng_model_desc *d = eng_ckpt_desc(ck);
    int64_t T = ref->x.shape[0], H = ref->x.shape[1], K = ref->ids.shape[1];
    moe_dtype dt = ref->x.dtype;
    size_t es = moe_dtype_size(dt);
    for (int pol = 0; pol < 2; pol++) {
        par_placement pl;
        assert_int_equal(par_placement_init(&pl, d->n_experts, 3, (par_place_policy)pol), MOE_OK);
        moe_tensor all, part, shared, y;
        assert_int_equal(moe_tensor_alloc(&all, dt, 3, (int64_t[]){T, K, H}), MOE_OK);
        assert_int_equal(moe_tensor_alloc(&part, dt, 3, (int64_t[]){T, K, H}), MOE_OK);
        assert_int_equal(moe_tensor_alloc(&shared, dt, 2, (int64_t[]){T, H}), MOE_OK);
        assert_int_equal(moe_tensor_alloc(&y, dt, 2, (int64_t[]){T, H}), MOE_OK);
        memset(all.data, 0, moe_tensor_nbytes(&all));
        for (int32_t r = 0; r < 3; r++) {
            rank_slots(ctx, ck, &pl, r, layer, ref, &part, &shared);
            /* the combine: each (t, k) comes from the rank that owns its expert */
            const int32_t *ids = ref->ids.data;
            for (int64_t i = 0; i < T * K; i++) {
                if (pl.owner[ids[i]] == r)
                    memcpy((uint8_t *)all.data + (size_t)i * (size_t)H * es,
                           (uint8_t *)part.data + (size_t)i * (size_t)H * es, (size_t)H * es);
            }
        }
        assert_int_equal(kern_moe_sum(ctx, &all, d->shared_intermediate > 0 ? &shared : NULL, &y), MOE_OK);
        if (memcmp(y.data, y1->data, moe_tensor_nbytes(&y)) != 0)
            fail_msg("%s: 3 ranks (%s) differ from one rank", what, par_place_policy_name((par_place_policy)pol));
        moe_tensor_free(&all);
        moe_tensor_free(&part);
        moe_tensor_free(&shared);
        moe_tensor_free(&y);
        par_placement_free(&pl);
    }
}

static int run_case(const char *name, eng_model_family *fam) {
    char dir[512], exp[512], what[160];
    snprintf(dir, sizeof dir, "%s/%s", CKPT, name);
    snprintf(exp, sizeof exp, "%s/%s.expected.safetensors", CKPT, name);
    eng_ckpt_t *ck;
    if (eng_ckpt_open(&ck, dir) != MOE_OK)
        fail_msg("%s: %s", name, moe_errmsg());
    const eng_model_desc *d = eng_ckpt_desc(ck);
    *fam = d->family;
    eng_st_file ef;
    assert_int_equal(eng_st_file_open(&ef, exp), MOE_OK);
    eng_model_weights w;
    assert_int_equal(eng_model_load(ck, NULL, &w), MOE_OK);
    assert_int_equal(w.dtype, d->dtype);
    char ds[400];
    print_message("%-22s %s, %d files\n", name, eng_model_desc_str(d, ds, sizeof ds), (int)eng_ckpt_n_files(ck));
    int checked = 0;
    for (int b = 0; b < 2; b++) {
        kern_ctx_t *ctx;
        kern_ctx_params cp = {.n_threads = 2};
        assert_int_equal(kern_ctx_init(&ctx, (kern_backend)b, &cp), MOE_OK);
        for (int32_t li = 0; li < d->n_moe_layers; li++) {
            int32_t l = d->moe_layers[li];
            const eng_model_layer *L = eng_model_weights_layer(&w, l);
            assert_non_null(L);
            layer_ref r;
            char tn[64];
            snprintf(tn, sizeof tn, "%d.x", (int)l);
            read_expected(&ef, tn, &r.x);
            snprintf(tn, sizeof tn, "%d.logits", (int)l);
            read_expected(&ef, tn, &r.logits);
            snprintf(tn, sizeof tn, "%d.topk_ids", (int)l);
            read_expected(&ef, tn, &r.ids);
            snprintf(tn, sizeof tn, "%d.topk_w", (int)l);
            read_expected(&ef, tn, &r.w);
            snprintf(tn, sizeof tn, "%d.y", (int)l);
            read_expected(&ef, tn, &r.y);
            assert_int_equal(r.x.dtype, d->dtype);
            int64_t T = r.x.shape[0], H = r.x.shape[1];
            snprintf(what, sizeof what, "%s layer %d %s", name, (int)l, kern_backend_name((kern_backend)b));

            moe_tensor lg, y;
            assert_int_equal(moe_tensor_alloc(&lg, MOE_DTYPE_F32, 2, (int64_t[]){T, d->n_experts}), MOE_OK);
            assert_int_equal(eng_model_router_logits(L, &r.x, &lg), MOE_OK);
            double e = norm_err(&lg, &r.logits, 1e-30);
            if (e > 1e-5)
                fail_msg("%s: router logits differ by %g", what, e);

            kern_route_params rp = eng_model_route_params(d, L);
            assert_int_equal(rp.correction_bias != NULL, d->has_correction_bias);
            check_route(ctx, &rp, &r.logits, &r, what);
            check_route(ctx, &rp, &lg, &r, what);

            kern_experts_params ep = {
                .n_experts = d->n_experts, .n_local = w.n_local, .expert_map = NULL, .act = d->act};
            kern_shared_expert se;
            bool has_se = eng_model_shared_expert(d, L, &se);
            assert_int_equal(has_se, d->shared_intermediate > 0);
            assert_int_equal(moe_tensor_alloc(&y, d->dtype, 2, (int64_t[]){T, H}), MOE_OK);
            if (kern_moe_forward(ctx, &ep, &r.x, &L->w13, &L->w2, &r.ids, &r.w, has_se ? &se : NULL, &y) != MOE_OK)
                fail_msg("%s: moe_forward: %s", what, moe_errmsg());
            e = norm_err(&y, &r.y, 1e-30);
            print_message("  layer %d %-7s y error %.2e (tolerance %.0e)\n", (int)l, kern_backend_name((kern_backend)b),
                          e, tol_for(d->dtype));
            if (e > tol_for(d->dtype))
                fail_msg("%s: y differs from moe_ref by %g (tolerance %g)", what, e, tol_for(d->dtype));
            check_ranks(ctx, ck, l, &r, &y, what);
            moe_tensor_free(&lg);
            moe_tensor_free(&y);
            layer_ref_free(&r);
            checked++;
        }
        kern_ctx_free(ctx);
    }
    eng_model_weights_free(&w);
    eng_st_file_close(&ef);
    eng_ckpt_close(ck);
    return checked;
}

static int cmp_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* What the per-checkpoint tests saw, for the coverage check that runs last. */
static int g_families[ENG_FAMILY_COUNT_], g_layers, g_cases;

/* One cmocka test per checkpoint of the genrule's output; the state is its name. */
static void test_checkpoint(void **state) {
    eng_model_family f;
    g_layers += run_case((const char *)*state, &f);
    g_families[f]++;
    g_cases++;
}

static void test_coverage(void **state) {
    (void)state;
    print_message("%d checkpoints, %d layer x backend checks\n", g_cases, g_layers);
    for (int f = 0; f < ENG_FAMILY_COUNT_; f++)
        if (g_families[f] < 2)
            fail_msg("family %s: %d checkpoints passed, expected f32 and bf16 at least",
                     eng_model_family_name((eng_model_family)f), g_families[f]);
}

int main(void) {
    /* each rank's load logs a line at info level: keep the test log to the results */
    if (!getenv("MOE_LOG_LEVEL"))
        moe_log_set_level(MOE_LOG_WARN);
    DIR *dh = opendir(CKPT);
    if (!dh) {
        fprintf(stderr, "cannot open %s (the genrule's output; run from the workspace root)\n", CKPT);
        return 1;
    }
    enum { MAX_CASES = 64 };
    char *names[MAX_CASES];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dh)) && n < MAX_CASES) {
        const char *suf = ".expected.safetensors";
        size_t l = strlen(de->d_name), ls = strlen(suf);
        if (l > ls && strcmp(de->d_name + l - ls, suf) == 0)
            names[n++] = strndup(de->d_name, l - ls);
    }
    closedir(dh);
    qsort(names, (size_t)n, sizeof *names, cmp_name);
    struct CMUnitTest tests[MAX_CASES + 1];
    memset(tests, 0, sizeof tests);
    for (int i = 0; i < n; i++) {
        tests[i].name = names[i];
        tests[i].test_func = test_checkpoint;
        tests[i].initial_state = names[i];
    }
    tests[n].name = "test_coverage";
    tests[n].test_func = test_coverage;
    int rc = _cmocka_run_group_tests("test_ckpt_ref", tests, (size_t)n + 1, NULL, NULL);
    for (int i = 0; i < n; i++)
        free(names[i]);
    return rc;
}
