/*
 * test_kernels.c: every op of kernels/kern.h on every available backend, against the
 * independent numpy reference (tests/ref/moe_ref.py, golden cases written by gen_golden.py),
 * and the properties kern.h promises:
 *
 *   - golden cases (five model families x T in {1, 7, 64} x f32/bf16, f16, expert map, weight
 *     on input, GELU, a large batch, exact ties): routing ids equal numpy's exactly, weights and
 *     outputs within a normalized error ||out - ref|| / ||ref|| of 1e-5 (f32), 2e-3 (f16),
 *     1e-2 (bf16); no NaN/Inf; every output poisoned (NaN bytes) before the call and fenced by
 *     guard bytes (a canary pattern checked after the call); inputs unmodified (checksums);
 *   - slot mode + kern_moe_sum equals sum mode and kern_moe_forward, bit for bit, per backend;
 *   - the two CPU backends give the same bits (a property of our fast backend: its products
 *     keep the reference's order of operations, kernels/cpu/cpu_gemm.h);
 *   - a row's result does not depend on the rest of the batch (alone, in other batches, in other
 *     positions, across the fast backend's chunks), bit for bit;
 *   - the fast backend is deterministic run to run and across thread counts;
 *   - the product kernel itself is batch-invariant; OpenBLAS's sgemm is probed the same way
 *     and its mismatches reported (it is not what we use: see cpu_gemm.h);
 *   - bad arguments, one test each: the right status, and nothing written.
 *
 * Backends plug in through tk_backends[]: a backend, the memory its tensors live in (tk_mem:
 * alloc, free, upload, download), and a label. Host backends use host memory. A device backend
 * (CUDA) adds an entry with its own tk_mem; every check here goes through upload/download, so
 * guards, poison and checksums work the same way for it. Contexts that fail to init with
 * MOE_ERR_UNSUPPORTED are skipped, and the test says so.
 *
 * Usage: test_kernels [GOLDEN_FILE] (default: $MOE_GOLDEN, else tests/ref/golden.bin, the
 * genrule's output in the runfiles).
 *
 * Threads: single-threaded test; the fast backend runs its own pool.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <cmocka.h>
#undef I /* OpenBLAS's cblas.h pulls in <complex.h>, whose I would clash with our sizes */

#include "kernels/cpu/cpu_gemm.h"
#include "kernels/kern.h"

/* ==========================================================================================
 * Backend memory.
 * ======================================================================================== */
typedef struct tk_mem {
    const char *name;
    void *(*alloc)(size_t n);
    void (*free)(void *p);
    void (*upload)(void *dst, const void *src, size_t n);   /* host -> backend */
    void (*download)(void *dst, const void *src, size_t n); /* backend -> host */
} tk_mem;

static void *host_alloc(size_t n) { return moe_alloc(n ? n : 1); }
static void host_free(void *p) { moe_free(p); }
static void host_copy(void *dst, const void *src, size_t n) {
    if (n)
        memcpy(dst, src, n);
}
static const tk_mem tk_host_mem = {"host", host_alloc, host_free, host_copy, host_copy};

typedef struct tk_backend {
    kern_backend kind;
    const tk_mem *mem;
    int32_t n_threads;
    const char *label;
    kern_ctx_t *ctx; /* NULL: not available here */
} tk_backend;

static tk_backend tk_backends[] = {
    {KERN_BACKEND_CPU_REF, &tk_host_mem, 1, "cpu-ref", NULL},
    {KERN_BACKEND_CPU, &tk_host_mem, 0, "cpu", NULL},
    /* A CUDA entry goes here: {KERN_BACKEND_CUDA, &tk_cuda_mem, 0, "cuda", NULL}, with tk_cuda_mem
     * doing cudaMalloc/cudaMemcpy. */
};
#define N_BACKENDS ((int)(sizeof tk_backends / sizeof tk_backends[0]))

/* ==========================================================================================
 * Guarded buffers in backend memory: [guard | data | guard], guards hold a canary pattern,
 * data starts poisoned (0xFF bytes: NaN in every float dtype, -1 as int32).
 * ======================================================================================== */
#define TK_GUARD 256

typedef struct tk_buf {
    const tk_mem *mem;
    char *base;
    size_t n;
    void *data;
} tk_buf;

static uint8_t canary_byte(size_t i) { return (uint8_t)(0xA5 ^ (i * 131u + 7u)); }

static void tk_buf_init(tk_buf *b, const tk_mem *mem, size_t n) {
    b->mem = mem;
    b->n = n;
    b->base = mem->alloc(n + 2 * TK_GUARD);
    assert_non_null(b->base);
    b->data = b->base + TK_GUARD;
    uint8_t *h = malloc(n + 2 * TK_GUARD);
    assert_non_null(h);
    for (size_t i = 0; i < TK_GUARD; i++) {
        h[i] = canary_byte(i);
        h[TK_GUARD + n + i] = canary_byte(i + 1000);
    }
    memset(h + TK_GUARD, 0xFF, n);
    mem->upload(b->base, h, n + 2 * TK_GUARD);
    free(h);
}

/* An input buffer with contents (no guards needed, but kept for uniformity). */
static void tk_buf_from(tk_buf *b, const tk_mem *mem, const void *src, size_t n) {
    tk_buf_init(b, mem, n);
    mem->upload(b->data, src, n);
}

static void tk_buf_free(tk_buf *b) {
    if (b->base)
        b->mem->free(b->base);
    memset(b, 0, sizeof *b);
}

/* Downloads the data into out (n bytes, may be NULL) and checks both guards; returns false
 * (after printing) when a guard was overwritten. */
static bool tk_buf_fetch(const tk_buf *b, void *out, const char *what) {
    uint8_t *h = malloc(b->n + 2 * TK_GUARD);
    assert_non_null(h);
    b->mem->download(h, b->base, b->n + 2 * TK_GUARD);
    bool ok = true;
    for (size_t i = 0; i < TK_GUARD; i++) {
        if (h[i] != canary_byte(i) || h[TK_GUARD + b->n + i] != canary_byte(i + 1000)) {
            print_error("%s: guard byte %s the buffer overwritten (offset %zu)\n", what,
                        h[i] != canary_byte(i) ? "before" : "after", i);
            ok = false;
            break;
        }
    }
    if (out)
        memcpy(out, h + TK_GUARD, b->n);
    free(h);
    return ok;
}

/* True when the data is still all poison (nothing written). */
static bool tk_buf_untouched(const tk_buf *b, const char *what) {
    uint8_t *h = malloc(b->n ? b->n : 1);
    assert_non_null(h);
    bool ok = tk_buf_fetch(b, h, what);
    for (size_t i = 0; ok && i < b->n; i++)
        if (h[i] != 0xFF) {
            print_error("%s: byte %zu written (0x%02x) by a call that failed\n", what, i, h[i]);
            ok = false;
        }
    free(h);
    return ok;
}

static uint64_t fnv1a(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static uint64_t tk_buf_hash(const tk_buf *b) {
    void *h = malloc(b->n ? b->n : 1);
    assert_non_null(h);
    b->mem->download(h, b->data, b->n);
    uint64_t r = fnv1a(h, b->n);
    free(h);
    return r;
}

/* ==========================================================================================
 * Host tensors and comparisons.
 * ======================================================================================== */
static moe_tensor host_tensor(moe_dtype dt, int32_t ndim, const int64_t *shape) {
    moe_tensor t;
    assert_int_equal(moe_tensor_alloc(&t, dt, ndim, shape), MOE_OK);
    return t;
}

/* A backend copy of a host tensor (fresh buffer with the same contents). */
static tk_buf upload_tensor(const tk_backend *be, const moe_tensor *t, moe_tensor *view) {
    tk_buf b;
    tk_buf_from(&b, be->mem, t->data, moe_tensor_nbytes(t));
    *view = moe_tensor_view(b.data, t->dtype, t->ndim, t->shape);
    return b;
}

/* A poisoned, guarded output on the backend. */
static tk_buf output_buf(const tk_backend *be, moe_dtype dt, int32_t ndim, const int64_t *shape, moe_tensor *view) {
    moe_tensor probe = moe_tensor_view(NULL, dt, ndim, shape);
    tk_buf b;
    tk_buf_init(&b, be->mem, moe_tensor_nbytes(&probe));
    *view = moe_tensor_view(b.data, dt, ndim, shape);
    return b;
}

static double tol_for(moe_dtype dt) {
    switch (dt) {
    case MOE_DTYPE_BF16:
        return 1e-2;
    case MOE_DTYPE_F16:
        return 2e-3;
    default:
        return 1e-5;
    }
}

/* Normalized error of `out` (n values of dtype dt, host memory) against ref (f32); fails on
 * NaN/Inf in out. */
static double norm_err(moe_dtype dt, const void *out, const float *ref, size_t n, const char *what) {
    double e2 = 0.0, r2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        float v = moe_load_f32(dt, out, i);
        if (!isfinite(v)) {
            print_error("%s: element %zu is %g (NaN/Inf check)\n", what, i, (double)v);
            return INFINITY;
        }
        double d = (double)v - (double)ref[i];
        e2 += d * d;
        r2 += (double)ref[i] * (double)ref[i];
    }
    if (r2 == 0.0)
        return e2 == 0.0 ? 0.0 : INFINITY;
    return sqrt(e2 / r2);
}

/* Fetches an output (guards checked) into a host tensor and compares it with ref. */
static void check_output(const tk_buf *b, moe_tensor *host_out, const float *ref, const char *what) {
    assert_true(tk_buf_fetch(b, host_out->data, what));
    size_t n = (size_t)moe_tensor_numel(host_out);
    double err = norm_err(host_out->dtype, host_out->data, ref, n, what);
    double tol = tol_for(host_out->dtype);
    if (!(err <= tol)) {
        print_error("%s: normalized error %.3g > %.1g\n", what, err, tol);
        fail();
    }
}

/* ==========================================================================================
 * Golden file.
 * ======================================================================================== */
#define MAX_TENSORS 24

typedef struct gtensor {
    char name[32];
    moe_tensor t;
} gtensor;

typedef struct gcase {
    char name[64];
    char meta[1024];
    int n;
    gtensor tensors[MAX_TENSORS];
} gcase;

static gcase *g_cases;
static int g_ncases;
static char g_golden_path[512] = "tests/ref/golden.bin";

typedef struct reader {
    const uint8_t *p, *end;
    bool bad;
} reader;

static bool rd(reader *r, void *out, size_t n) {
    if (r->bad || (size_t)(r->end - r->p) < n) {
        r->bad = true;
        return false;
    }
    memcpy(out, r->p, n);
    r->p += n;
    return true;
}

static bool rd_str(reader *r, char *out, size_t cap) {
    uint32_t len;
    if (!rd(r, &len, 4) || len >= cap) {
        r->bad = true;
        return false;
    }
    if (!rd(r, out, len))
        return false;
    out[len] = 0;
    return true;
}

static bool load_golden(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "test_kernels: cannot open golden file %s\n", path);
        return false;
    }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)sz);
    bool ok = buf && fread(buf, 1, (size_t)sz, f) == (size_t)sz;
    fclose(f);
    if (!ok) {
        free(buf);
        return false;
    }
    reader r = {buf, buf + sz, false};
    char magic[8];
    uint32_t version = 0, n = 0;
    rd(&r, magic, 8);
    rd(&r, &version, 4);
    rd(&r, &n, 4);
    if (r.bad || memcmp(magic, "MOEGOLD1", 8) != 0 || version != 1 || n > 10000) {
        fprintf(stderr, "test_kernels: %s is not a golden file of version 1\n", path);
        free(buf);
        return false;
    }
    g_cases = calloc(n, sizeof(gcase));
    g_ncases = (int)n;
    for (uint32_t c = 0; c < n && !r.bad; c++) {
        gcase *gc = &g_cases[c];
        uint32_t nt = 0;
        rd_str(&r, gc->name, sizeof gc->name);
        rd_str(&r, gc->meta, sizeof gc->meta);
        rd(&r, &nt, 4);
        if (nt > MAX_TENSORS)
            r.bad = true;
        for (uint32_t i = 0; i < nt && !r.bad; i++) {
            gtensor *gt = &gc->tensors[gc->n];
            uint32_t dt = 0, ndim = 0;
            int64_t shape[MOE_MAX_DIMS] = {0};
            uint64_t nb = 0;
            rd_str(&r, gt->name, sizeof gt->name);
            rd(&r, &dt, 4);
            rd(&r, &ndim, 4);
            if (ndim > MOE_MAX_DIMS || !moe_dtype_valid((int)dt)) {
                r.bad = true;
                break;
            }
            for (uint32_t d = 0; d < ndim; d++)
                rd(&r, &shape[d], 8);
            rd(&r, &nb, 8);
            if (r.bad || moe_tensor_alloc(&gt->t, (moe_dtype)dt, (int32_t)ndim, shape) != MOE_OK ||
                moe_tensor_nbytes(&gt->t) != nb) {
                r.bad = true;
                break;
            }
            rd(&r, gt->t.data, nb);
            gc->n++;
        }
    }
    free(buf);
    if (r.bad) {
        fprintf(stderr, "test_kernels: %s is truncated or malformed\n", path);
        return false;
    }
    return true;
}

static const moe_tensor *gget(const gcase *gc, const char *name) {
    for (int i = 0; i < gc->n; i++)
        if (strcmp(gc->tensors[i].name, name) == 0)
            return &gc->tensors[i].t;
    return NULL;
}

static const char *meta_str(const gcase *gc, const char *key, char *out, size_t cap) {
    size_t kl = strlen(key);
    for (const char *p = gc->meta; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len > kl && strncmp(p, key, kl) == 0 && p[kl] == '=') {
            size_t vl = len - kl - 1 < cap - 1 ? len - kl - 1 : cap - 1;
            memcpy(out, p + kl + 1, vl);
            out[vl] = 0;
            return out;
        }
        p += len + (nl ? 1 : 0);
    }
    print_error("case %s: meta key %s missing\n", gc->name, key);
    fail();
    return NULL;
}

static long meta_int(const gcase *gc, const char *key) {
    char b[64];
    return strtol(meta_str(gc, key, b, sizeof b), NULL, 10);
}

static double meta_double(const gcase *gc, const char *key) {
    char b[64];
    return strtod(meta_str(gc, key, b, sizeof b), NULL);
}

static void free_golden(void) {
    for (int c = 0; c < g_ncases; c++)
        for (int i = 0; i < g_cases[c].n; i++)
            moe_tensor_free(&g_cases[c].tensors[i].t);
    free(g_cases);
    g_cases = NULL;
    g_ncases = 0;
}

/* ==========================================================================================
 * The golden test of one case on every backend.
 * ======================================================================================== */
static kern_route_params golden_route_params(const gcase *gc) {
    kern_route_params p = kern_route_params_default((int32_t)meta_int(gc, "E"), (int32_t)meta_int(gc, "K"));
    char b[64];
    p.scoring = strcmp(meta_str(gc, "scoring", b, sizeof b), "sigmoid") == 0 ? KERN_SCORE_SIGMOID : KERN_SCORE_SOFTMAX;
    meta_str(gc, "group_mode", b, sizeof b);
    p.group_mode = strcmp(b, "max") == 0 ? KERN_GROUP_MAX : strcmp(b, "top2_sum") == 0 ? KERN_GROUP_TOP2_SUM : KERN_GROUP_NONE;
    p.n_group = (int32_t)meta_int(gc, "n_group");
    p.topk_group = (int32_t)meta_int(gc, "topk_group");
    p.renormalize = meta_int(gc, "renormalize") != 0;
    p.routed_scaling_factor = (float)meta_double(gc, "routed_scaling_factor");
    return p;
}

/* Results of one backend on one case (host copies), for cross-backend comparisons. */
typedef struct case_out {
    moe_tensor ids, w, y, slots, shared, fwd;
    bool have_ids, have_experts, have_shared;
} case_out;

static void case_out_free(case_out *o) {
    moe_tensor_free(&o->ids);
    moe_tensor_free(&o->w);
    moe_tensor_free(&o->y);
    moe_tensor_free(&o->slots);
    moe_tensor_free(&o->shared);
    moe_tensor_free(&o->fwd);
}

static void run_golden_route(const tk_backend *be, const gcase *gc, case_out *out, char *what, size_t wcap) {
    const moe_tensor *logits = gget(gc, "logits"), *ids_ref = gget(gc, "ids"), *w_ref = gget(gc, "weights");
    const moe_tensor *bias = gget(gc, "correction_bias");
    assert_non_null(logits);
    kern_route_params p = golden_route_params(gc);
    moe_tensor dl, dbias = {0}, dids, dw;
    tk_buf bl = upload_tensor(be, logits, &dl), bb = {0};
    if (bias) {
        bb = upload_tensor(be, bias, &dbias);
        p.correction_bias = dbias.data;
    }
    tk_buf bi = output_buf(be, MOE_DTYPE_I32, 2, ids_ref->shape, &dids);
    tk_buf bw = output_buf(be, MOE_DTYPE_F32, 2, w_ref->shape, &dw);
    uint64_t hl = tk_buf_hash(&bl);
    snprintf(what, wcap, "%s [%s] route", gc->name, be->label);
    moe_status st = kern_route(be->ctx, &p, &dl, &dids, &dw);
    if (st != MOE_OK) {
        print_error("%s: %s: %s\n", what, moe_status_name(st), moe_errmsg());
        fail();
    }
    out->ids = host_tensor(MOE_DTYPE_I32, 2, ids_ref->shape);
    out->w = host_tensor(MOE_DTYPE_F32, 2, w_ref->shape);
    out->have_ids = true;
    assert_true(tk_buf_fetch(&bi, out->ids.data, what));
    const int32_t *gi = out->ids.data, *ri = ids_ref->data;
    int64_t n = moe_tensor_numel(ids_ref), K = ids_ref->shape[1];
    for (int64_t i = 0; i < n; i++)
        if (gi[i] != ri[i]) {
            print_error("%s: token %lld slot %lld: id %d, numpy %d\n", what, (long long)(i / K), (long long)(i % K),
                        gi[i], ri[i]);
            fail();
        }
    check_output(&bw, &out->w, w_ref->data, what);
    assert_true(tk_buf_hash(&bl) == hl);
    tk_buf_free(&bl);
    tk_buf_free(&bb);
    tk_buf_free(&bi);
    tk_buf_free(&bw);
}

static void run_golden_experts(const tk_backend *be, const gcase *gc, case_out *out, char *what, size_t wcap) {
    const moe_tensor *x = gget(gc, "x"), *w13 = gget(gc, "w13"), *w2 = gget(gc, "w2");
    const moe_tensor *ids = gget(gc, "ids"), *wts = gget(gc, "weights"), *emap = gget(gc, "expert_map");
    const moe_tensor *slots_ref = gget(gc, "slots"), *y_routed = gget(gc, "y_routed"), *y_ref = gget(gc, "y");
    const moe_tensor *sw13 = gget(gc, "shared_w13"), *sw2 = gget(gc, "shared_w2"), *sgate = gget(gc, "shared_gate");
    const moe_tensor *s_ref = gget(gc, "shared_out");
    assert_true(x && w13 && w2 && ids && wts && slots_ref && y_routed && y_ref);
    const moe_dtype dt = x->dtype;
    const int64_t T = x->shape[0], H = x->shape[1], K = ids->shape[1];
    char actname[32];
    kern_act act;
    assert_int_equal(kern_act_parse(meta_str(gc, "act", actname, sizeof actname), &act), MOE_OK);

    moe_tensor dx, dw13, dw2, dids, dwts, dmap = {0}, dsw13 = {0}, dsw2 = {0}, dsgate = {0};
    tk_buf in[9] = {0};
    in[0] = upload_tensor(be, x, &dx);
    in[1] = upload_tensor(be, w13, &dw13);
    in[2] = upload_tensor(be, w2, &dw2);
    in[3] = upload_tensor(be, ids, &dids);
    in[4] = upload_tensor(be, wts, &dwts);
    if (emap)
        in[5] = upload_tensor(be, emap, &dmap);
    if (sw13) {
        in[6] = upload_tensor(be, sw13, &dsw13);
        in[7] = upload_tensor(be, sw2, &dsw2);
        if (sgate)
            in[8] = upload_tensor(be, sgate, &dsgate);
    }
    uint64_t hash[9];
    for (int i = 0; i < 9; i++)
        hash[i] = in[i].base ? tk_buf_hash(&in[i]) : 0;

    kern_experts_params p = {.n_experts = (int32_t)meta_int(gc, "E"),
                             .n_local = (int32_t)meta_int(gc, "n_local"),
                             .expert_map = emap ? dmap.data : NULL,
                             .act = act,
                             .weight_on_input = meta_int(gc, "weight_on_input") != 0};
    kern_shared_expert se = {.w13 = &dsw13, .w2 = &dsw2, .gate = sgate ? &dsgate : NULL, .act = act};
    moe_status st;

    /* sum mode */
    moe_tensor dy;
    tk_buf by = output_buf(be, dt, 2, (int64_t[]){T, H}, &dy);
    snprintf(what, wcap, "%s [%s] fused_experts (sum mode)", gc->name, be->label);
    st = kern_fused_experts(be->ctx, &p, &dx, &dw13, &dw2, &dids, &dwts, &dy);
    if (st != MOE_OK) {
        print_error("%s: %s: %s\n", what, moe_status_name(st), moe_errmsg());
        fail();
    }
    assert_int_equal(kern_ctx_sync(be->ctx), MOE_OK);
    out->y = host_tensor(dt, 2, (int64_t[]){T, H});
    check_output(&by, &out->y, y_routed->data, what);

    /* slot mode */
    moe_tensor dslots;
    tk_buf bs = output_buf(be, dt, 3, (int64_t[]){T, K, H}, &dslots);
    snprintf(what, wcap, "%s [%s] fused_experts (slot mode)", gc->name, be->label);
    st = kern_fused_experts(be->ctx, &p, &dx, &dw13, &dw2, &dids, &dwts, &dslots);
    assert_int_equal(st, MOE_OK);
    assert_int_equal(kern_ctx_sync(be->ctx), MOE_OK);
    out->slots = host_tensor(dt, 3, (int64_t[]){T, K, H});
    check_output(&bs, &out->slots, slots_ref->data, what);
    if (emap) { /* slots held elsewhere are exactly +0.0 */
        const int32_t *id = ids->data, *m = emap->data;
        size_t es = moe_dtype_size(dt);
        for (int64_t i = 0; i < T * K; i++)
            if (m[id[i]] < 0)
                for (int64_t j = 0; j < H; j++) {
                    uint32_t bits = 0;
                    memcpy(&bits, (char *)out->slots.data + (size_t)(i * H + j) * es, es);
                    if (bits != 0) {
                        print_error("%s: slot %lld of an expert held elsewhere is not +0.0\n", what, (long long)i);
                        fail();
                    }
                }
    }
    out->have_experts = true;

    /* shared expert */
    tk_buf bsh = {0};
    moe_tensor dsh = {0};
    if (sw13) {
        assert_non_null(s_ref);
        bsh = output_buf(be, dt, 2, (int64_t[]){T, H}, &dsh);
        snprintf(what, wcap, "%s [%s] shared_expert", gc->name, be->label);
        st = kern_shared_expert_forward(be->ctx, &se, &dx, &dsh);
        assert_int_equal(st, MOE_OK);
        assert_int_equal(kern_ctx_sync(be->ctx), MOE_OK);
        out->shared = host_tensor(dt, 2, (int64_t[]){T, H});
        check_output(&bsh, &out->shared, s_ref->data, what);
        out->have_shared = true;
    }

    /* the whole layer */
    moe_tensor dfwd;
    tk_buf bf = output_buf(be, dt, 2, (int64_t[]){T, H}, &dfwd);
    snprintf(what, wcap, "%s [%s] moe_forward", gc->name, be->label);
    st = kern_moe_forward(be->ctx, &p, &dx, &dw13, &dw2, &dids, &dwts, sw13 ? &se : NULL, &dfwd);
    if (st != MOE_OK) {
        print_error("%s: %s: %s\n", what, moe_status_name(st), moe_errmsg());
        fail();
    }
    assert_int_equal(kern_ctx_sync(be->ctx), MOE_OK);
    out->fwd = host_tensor(dt, 2, (int64_t[]){T, H});
    check_output(&bf, &out->fwd, y_ref->data, what);

    /* slot mode + moe_sum == sum mode / moe_forward, bit for bit */
    moe_tensor dsum;
    tk_buf bsum = output_buf(be, dt, 2, (int64_t[]){T, H}, &dsum);
    snprintf(what, wcap, "%s [%s] moe_sum", gc->name, be->label);
    st = kern_moe_sum(be->ctx, &dslots, sw13 ? &dsh : NULL, &dsum);
    assert_int_equal(st, MOE_OK);
    assert_int_equal(kern_ctx_sync(be->ctx), MOE_OK);
    moe_tensor hsum = host_tensor(dt, 2, (int64_t[]){T, H});
    check_output(&bsum, &hsum, y_ref->data, what);
    const moe_tensor *want = sw13 ? &out->fwd : &out->y;
    if (memcmp(hsum.data, want->data, moe_tensor_nbytes(&hsum)) != 0) {
        print_error("%s: slot mode + moe_sum differs from %s\n", what, sw13 ? "moe_forward" : "sum mode");
        fail();
    }
    if (!sw13 && memcmp(out->fwd.data, out->y.data, moe_tensor_nbytes(&hsum)) != 0) {
        print_error("%s: moe_forward without a shared expert differs from fused_experts\n", what);
        fail();
    }
    moe_tensor_free(&hsum);

    /* inputs unmodified */
    for (int i = 0; i < 9; i++)
        if (in[i].base && tk_buf_hash(&in[i]) != hash[i]) {
            print_error("%s [%s]: input %d was modified\n", gc->name, be->label, i);
            fail();
        }
    for (int i = 0; i < 9; i++)
        tk_buf_free(&in[i]);
    tk_buf_free(&by);
    tk_buf_free(&bs);
    tk_buf_free(&bsh);
    tk_buf_free(&bf);
    tk_buf_free(&bsum);
}

static bool same_tensor(const moe_tensor *a, const moe_tensor *b) {
    return moe_tensor_nbytes(a) == moe_tensor_nbytes(b) && memcmp(a->data, b->data, moe_tensor_nbytes(a)) == 0;
}

static void test_golden_case(void **state) {
    const gcase *gc = *state;
    char what[256];
    case_out outs[N_BACKENDS];
    memset(outs, 0, sizeof outs);
    int ran = 0;
    for (int b = 0; b < N_BACKENDS; b++) {
        const tk_backend *be = &tk_backends[b];
        if (!be->ctx)
            continue;
        ran++;
        run_golden_route(be, gc, &outs[b], what, sizeof what);
        if (!meta_int(gc, "routing_only"))
            run_golden_experts(be, gc, &outs[b], what, sizeof what);
    }
    assert_true(ran >= 2);
    /* The two CPU backends: the same bits (tk_backends[0] and [1]). */
    if (tk_backends[0].ctx && tk_backends[1].ctx) {
        const case_out *r = &outs[0], *f = &outs[1];
        const struct {
            const moe_tensor *a, *b;
            bool have;
            const char *name;
        } pairs[] = {
            {&r->ids, &f->ids, r->have_ids, "route ids"},
            {&r->w, &f->w, r->have_ids, "route weights"},
            {&r->y, &f->y, r->have_experts, "fused_experts"},
            {&r->slots, &f->slots, r->have_experts, "slot mode"},
            {&r->shared, &f->shared, r->have_shared, "shared_expert"},
            {&r->fwd, &f->fwd, r->have_experts, "moe_forward"},
        };
        for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
            if (pairs[i].have && !same_tensor(pairs[i].a, pairs[i].b)) {
                print_error("%s: %s: cpu and cpu-ref differ\n", gc->name, pairs[i].name);
                fail();
            }
    }
    for (int b = 0; b < N_BACKENDS; b++)
        case_out_free(&outs[b]);
}

/* ==========================================================================================
 * Random problems for the property tests.
 * ======================================================================================== */
typedef struct problem {
    moe_dtype dt;
    int64_t T, H, I, E, K;
    moe_tensor x, w13, w2, ids, w;
    kern_experts_params p;
} problem;

static void fill_normal(moe_rng *r, moe_tensor *t, float scale) {
    int64_t n = moe_tensor_numel(t);
    for (int64_t i = 0; i < n; i++)
        moe_store_f32(t->dtype, t->data, (size_t)i, scale * moe_rng_normal(r));
}

static void problem_init(problem *pb, moe_dtype dt, int64_t T, int64_t H, int64_t I, int64_t E, int64_t K,
                         uint64_t seed) {
    memset(pb, 0, sizeof *pb);
    pb->dt = dt;
    pb->T = T;
    pb->H = H;
    pb->I = I;
    pb->E = E;
    pb->K = K;
    moe_rng r;
    moe_rng_seed(&r, seed);
    pb->x = host_tensor(dt, 2, (int64_t[]){T, H});
    pb->w13 = host_tensor(dt, 3, (int64_t[]){E, 2 * I, H});
    pb->w2 = host_tensor(dt, 3, (int64_t[]){E, H, I});
    pb->ids = host_tensor(MOE_DTYPE_I32, 2, (int64_t[]){T, K});
    pb->w = host_tensor(MOE_DTYPE_F32, 2, (int64_t[]){T, K});
    fill_normal(&r, &pb->x, 1.0f);
    fill_normal(&r, &pb->w13, 1.0f / sqrtf((float)H));
    fill_normal(&r, &pb->w2, 1.0f / sqrtf((float)I));
    int32_t *id = pb->ids.data;
    float *w = pb->w.data;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            int32_t e;
            bool dup;
            do { /* distinct experts per token */
                e = (int32_t)moe_rng_below(&r, (uint32_t)E);
                dup = false;
                for (int64_t q = 0; q < k; q++)
                    dup |= id[t * K + q] == e;
            } while (dup);
            id[t * K + k] = e;
            w[t * K + k] = (float)moe_rng_uniform(&r);
        }
    pb->p = (kern_experts_params){.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = KERN_ACT_SILU};
}

static void problem_free(problem *pb) {
    moe_tensor_free(&pb->x);
    moe_tensor_free(&pb->w13);
    moe_tensor_free(&pb->w2);
    moe_tensor_free(&pb->ids);
    moe_tensor_free(&pb->w);
}

/* Runs fused experts (sum mode) on rows `rows[0..n)` of the problem as one batch (host
 * backends only); y gets [n, H]. */
static void run_rows(kern_ctx_t *ctx, const problem *pb, const int64_t *rows, int64_t n, moe_tensor *y) {
    const size_t es = moe_dtype_size(pb->dt);
    moe_tensor x = host_tensor(pb->dt, 2, (int64_t[]){n, pb->H});
    moe_tensor ids = host_tensor(MOE_DTYPE_I32, 2, (int64_t[]){n, pb->K});
    moe_tensor w = host_tensor(MOE_DTYPE_F32, 2, (int64_t[]){n, pb->K});
    for (int64_t i = 0; i < n; i++) {
        memcpy((char *)x.data + (size_t)(i * pb->H) * es, (const char *)pb->x.data + (size_t)(rows[i] * pb->H) * es,
               (size_t)pb->H * es);
        memcpy((int32_t *)ids.data + i * pb->K, (const int32_t *)pb->ids.data + rows[i] * pb->K,
               sizeof(int32_t) * (size_t)pb->K);
        memcpy((float *)w.data + i * pb->K, (const float *)pb->w.data + rows[i] * pb->K,
               sizeof(float) * (size_t)pb->K);
    }
    *y = host_tensor(pb->dt, 2, (int64_t[]){n, pb->H});
    moe_status st = kern_fused_experts(ctx, &pb->p, &x, &pb->w13, &pb->w2, &ids, &w, y);
    if (st != MOE_OK)
        print_error("run_rows: %s\n", moe_errmsg());
    assert_int_equal(st, MOE_OK);
    moe_tensor_free(&x);
    moe_tensor_free(&ids);
    moe_tensor_free(&w);
}

static bool row_equal(const problem *pb, const moe_tensor *a, int64_t ra, const moe_tensor *b, int64_t rb) {
    size_t es = moe_dtype_size(pb->dt), rowb = (size_t)pb->H * es;
    return memcmp((const char *)a->data + (size_t)ra * rowb, (const char *)b->data + (size_t)rb * rowb, rowb) == 0;
}

/* A row's result is the same bits alone, in the full batch, in a reversed batch and among
 * other rows, on every host backend; the large problem spans several chunks of the fast
 * backend. */
static void test_batch_invariance(void **state) {
    (void)state;
    const struct {
        moe_dtype dt;
        int64_t T, H, I, E, K;
    } shapes[] = {
        {MOE_DTYPE_BF16, 150, 200, 130, 16, 4},
        {MOE_DTYPE_F32, 97, 77, 45, 8, 2},
        {MOE_DTYPE_F16, 40, 64, 48, 12, 3},
        {MOE_DTYPE_BF16, 1100, 24, 20, 64, 8}, /* 8800 pairs: two chunks of the fast backend */
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        problem pb;
        problem_init(&pb, shapes[s].dt, shapes[s].T, shapes[s].H, shapes[s].I, shapes[s].E, shapes[s].K, 77 + s);
        int64_t T = pb.T;
        int64_t *all = malloc(sizeof(int64_t) * (size_t)T), *rev = malloc(sizeof(int64_t) * (size_t)T);
        for (int64_t t = 0; t < T; t++) {
            all[t] = t;
            rev[t] = T - 1 - t;
        }
        for (int b = 0; b < N_BACKENDS; b++) {
            const tk_backend *be = &tk_backends[b];
            if (!be->ctx || be->mem != &tk_host_mem)
                continue;
            moe_tensor yall, yrev;
            run_rows(be->ctx, &pb, all, T, &yall);
            run_rows(be->ctx, &pb, rev, T, &yrev);
            for (int64_t t = 0; t < T; t++)
                if (!row_equal(&pb, &yall, t, &yrev, T - 1 - t)) {
                    print_error("[%s] shape %zu: row %lld differs in the reversed batch\n", be->label, s, (long long)t);
                    fail();
                }
            /* a few rows alone and among a few others */
            int64_t probe[] = {0, 1, T / 2, T - 1};
            for (size_t q = 0; q < 4; q++) {
                int64_t r = probe[q];
                moe_tensor y1, y3;
                run_rows(be->ctx, &pb, &r, 1, &y1);
                int64_t trio[3] = {(r + 5) % T, r, (r + 11) % T};
                run_rows(be->ctx, &pb, trio, 3, &y3);
                if (!row_equal(&pb, &yall, r, &y1, 0) || !row_equal(&pb, &yall, r, &y3, 1)) {
                    print_error("[%s] shape %zu: row %lld alone or in a batch of 3 differs from the full batch\n",
                                be->label, s, (long long)r);
                    fail();
                }
                moe_tensor_free(&y1);
                moe_tensor_free(&y3);
            }
            moe_tensor_free(&yall);
            moe_tensor_free(&yrev);
        }
        free(all);
        free(rev);
        problem_free(&pb);
    }
}

/* The fast backend: the same bits run to run and for 1, 2, 3, 5 and 8 threads, for every op. */
static void test_threads_determinism(void **state) {
    (void)state;
    problem pb;
    problem_init(&pb, MOE_DTYPE_BF16, 83, 150, 70, 16, 4, 4242);
    moe_rng r;
    moe_rng_seed(&r, 99);
    moe_tensor sw13 = host_tensor(MOE_DTYPE_BF16, 2, (int64_t[]){2 * 90, 150});
    moe_tensor sw2 = host_tensor(MOE_DTYPE_BF16, 2, (int64_t[]){150, 90});
    moe_tensor sg = host_tensor(MOE_DTYPE_BF16, 1, (int64_t[]){150});
    fill_normal(&r, &sw13, 0.08f);
    fill_normal(&r, &sw2, 0.1f);
    fill_normal(&r, &sg, 0.1f);
    kern_shared_expert se = {&sw13, &sw2, &sg, KERN_ACT_GELU_TANH};
    moe_tensor logits = host_tensor(MOE_DTYPE_F32, 2, (int64_t[]){pb.T, 16});
    fill_normal(&r, &logits, 2.0f);
    kern_route_params rp = kern_route_params_default(16, 4);
    rp.scoring = KERN_SCORE_SIGMOID;
    rp.group_mode = KERN_GROUP_TOP2_SUM;
    rp.n_group = 4;
    rp.topk_group = 2;
    rp.renormalize = true;

    const int32_t threads[] = {1, 2, 3, 5, 8, 2};
    moe_tensor first[4] = {{0}};
    for (size_t i = 0; i < sizeof threads / sizeof threads[0]; i++) {
        kern_ctx_t *ctx;
        kern_ctx_params cp = {.n_threads = threads[i]};
        assert_int_equal(kern_ctx_init(&ctx, KERN_BACKEND_CPU, &cp), MOE_OK);
        moe_tensor o[4];
        o[0] = host_tensor(MOE_DTYPE_BF16, 2, (int64_t[]){pb.T, pb.H});
        o[1] = host_tensor(MOE_DTYPE_BF16, 2, (int64_t[]){pb.T, pb.H});
        o[2] = host_tensor(MOE_DTYPE_I32, 2, (int64_t[]){pb.T, 4});
        o[3] = host_tensor(MOE_DTYPE_F32, 2, (int64_t[]){pb.T, 4});
        assert_int_equal(kern_fused_experts(ctx, &pb.p, &pb.x, &pb.w13, &pb.w2, &pb.ids, &pb.w, &o[0]), MOE_OK);
        assert_int_equal(kern_moe_forward(ctx, &pb.p, &pb.x, &pb.w13, &pb.w2, &pb.ids, &pb.w, &se, &o[1]), MOE_OK);
        assert_int_equal(kern_route(ctx, &rp, &logits, &o[2], &o[3]), MOE_OK);
        kern_ctx_free(ctx);
        for (int q = 0; q < 4; q++) {
            if (i == 0) {
                first[q] = o[q];
                continue;
            }
            if (!same_tensor(&first[q], &o[q])) {
                print_error("output %d with %d threads differs from 1 thread\n", q, (int)threads[i]);
                fail();
            }
            moe_tensor_free(&o[q]);
        }
    }
    for (int q = 0; q < 4; q++)
        moe_tensor_free(&first[q]);
    moe_tensor_free(&sw13);
    moe_tensor_free(&sw2);
    moe_tensor_free(&sg);
    moe_tensor_free(&logits);
    problem_free(&pb);
}

/* ==========================================================================================
 * The product kernel, and the OpenBLAS probe.
 * ======================================================================================== */
/* cpu_gemm_rows gives each row the bits of the plain loop (acc += a * p, k in order, from +0.0)
 * whatever the number of rows, the row's position, one panel or two, and the k blocks (kd
 * around and past CPU_KC); the fast packing
 * writes the same panel as the portable one, for every dtype, row count and length. */
static void test_gemm_tile_order(void **state) {
    (void)state;
    moe_rng r;
    moe_rng_seed(&r, 5);
    const int64_t kds[] = {1, 7, 8, 16, 33, 255, 256, 257, 300, 2051};
    const moe_dtype dts[] = {MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32};
    for (size_t q = 0; q < sizeof kds / sizeof kds[0]; q++) {
        int64_t kd = kds[q];
        float *a = moe_alloc(sizeof(float) * (size_t)(4 * kd));
        float *p = moe_alloc(sizeof(float) * (size_t)(16 * kd)), *p2 = moe_alloc(sizeof(float) * (size_t)(16 * kd));
        for (int64_t i = 0; i < 4 * kd; i++)
            a[i] = moe_rng_normal(&r);
        for (size_t d = 0; d < 3; d++) {
            moe_tensor bt = host_tensor(dts[d], 2, (int64_t[]){16, kd + 3}); /* row stride kd + 3 */
            fill_normal(&r, &bt, 1.0f);
            for (int32_t nr = 1; nr <= 16; nr += 5) {
                cpu_pack_panel(dts[d], bt.data, kd + 3, nr, kd, p);
                cpu_pack_panel_scalar(dts[d], bt.data, kd + 3, nr, kd, p2);
                assert_memory_equal(p, p2, sizeof(float) * (size_t)(16 * kd));
                for (int64_t k = 0; k < kd; k++)
                    for (int j = 0; j < 16; j++) {
                        float want = j < nr ? moe_load_f32(dts[d], bt.data, (size_t)(j * (kd + 3) + k)) : 0.0f;
                        assert_true(memcmp(&p[k * 16 + j], &want, 4) == 0);
                    }
            }
            moe_tensor_free(&bt);
        }
        /* p: a bf16 panel of 13 rows; p2: another panel */
        moe_tensor bt = host_tensor(MOE_DTYPE_BF16, 2, (int64_t[]){13, kd});
        fill_normal(&r, &bt, 1.0f);
        cpu_pack_panel(MOE_DTYPE_BF16, bt.data, kd, 13, kd, p);
        for (int64_t i = 0; i < 16 * kd; i++)
            p2[i] = moe_rng_normal(&r);
        /* every row count 1..9 (tiles of 4, pairs, singles), one and two panels; rows in any
         * order, some repeated */
        for (int32_t m = 1; m <= 9; m++) {
            const float *rows[9];
            for (int32_t i = 0; i < m; i++)
                rows[i] = a + (size_t)((i * 3 + 1) % 4) * (size_t)kd;
            float out[9 * 16], o0[9 * 16], o1[9 * 16];
            cpu_gemm_rows(rows, m, p, NULL, kd, out, NULL);
            cpu_gemm_rows(rows, m, p, p2, kd, o0, o1);
            for (int32_t i = 0; i < m; i++)
                for (int j = 0; j < 16; j++) {
                    float acc = 0.0f, acc2 = 0.0f;
                    for (int64_t k = 0; k < kd; k++) {
                        acc += rows[i][k] * p[k * 16 + j];
                        acc2 += rows[i][k] * p2[k * 16 + j];
                    }
                    if (memcmp(&acc, &out[i * 16 + j], 4) != 0 || memcmp(&acc, &o0[i * 16 + j], 4) != 0 ||
                        memcmp(&acc2, &o1[i * 16 + j], 4) != 0) {
                        print_error("rows m=%d kd=%lld row %d col %d: %a / %a %a, loop %a %a\n", (int)m,
                                    (long long)kd, (int)i, j, (double)out[i * 16 + j], (double)o0[i * 16 + j],
                                    (double)o1[i * 16 + j], (double)acc, (double)acc2);
                        fail();
                    }
                }
        }
        moe_free(a);
        moe_free(p);
        moe_free(p2);
        moe_tensor_free(&bt);
    }
}

/* OpenBLAS's sgemm, probed the way test_batch_invariance probes our backends: a row computed
 * in batches of different sizes and positions. Reported, not asserted: whether OpenBLAS keeps a
 * row's bits is OpenBLAS's business (it did not on the machine this was written on, which is
 * why the fast backend does not use it); the test fails only if the probe itself is broken
 * (a row in the same call twice must match). */
static void test_openblas_probe(void **state) {
    (void)state;
    moe_rng r;
    moe_rng_seed(&r, 11);
    const int N = 64, KD = 385, MM = 80;
    float *A = moe_alloc(sizeof(float) * (size_t)(MM * KD)), *B = moe_alloc(sizeof(float) * (size_t)(N * KD));
    float *C = moe_alloc(sizeof(float) * (size_t)(MM * N)), *C1 = moe_alloc(sizeof(float) * (size_t)N);
    float *C2 = moe_alloc(sizeof(float) * (size_t)(MM * N));
    for (int i = 0; i < MM * KD; i++)
        A[i] = moe_rng_normal(&r);
    for (int i = 0; i < N * KD; i++)
        B[i] = moe_rng_normal(&r);
    int rows = 0, differ = 0;
    const int Ms[] = {2, 4, 7, 16, 33, 80};
    for (size_t q = 0; q < sizeof Ms / sizeof Ms[0]; q++) {
        int M = Ms[q];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, KD, 1.0f, A, KD, B, KD, 0.0f, C, N);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, KD, 1.0f, A, KD, B, KD, 0.0f, C2, N);
        assert_memory_equal(C, C2, sizeof(float) * (size_t)(M * N)); /* same call, same bits */
        for (int m = 0; m < M; m++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 1, N, KD, 1.0f, A + (size_t)m * KD, KD, B, KD, 0.0f,
                        C1, N);
            rows++;
            differ += memcmp(C1, C + (size_t)m * N, sizeof(float) * (size_t)N) != 0;
        }
    }
    printf("[ INFO     ] OpenBLAS sgemm (%s): %d of %d rows differ between a batch and the row alone\n",
           OPENBLAS_VERSION, differ, rows);
    moe_free(A);
    moe_free(B);
    moe_free(C);
    moe_free(C1);
    moe_free(C2);
}

/* ==========================================================================================
 * Explicit ties and small cases, every backend.
 * ======================================================================================== */
static void route_on(const tk_backend *be, const kern_route_params *p, const float *logits, int64_t T, int32_t *ids,
                     float *w) {
    moe_tensor hl = moe_tensor_view2((void *)logits, MOE_DTYPE_F32, T, p->n_experts), dl, dids, dw, dbias = {0};
    tk_buf bl = upload_tensor(be, &hl, &dl), bb = {0};
    kern_route_params q = *p;
    if (p->correction_bias) {
        moe_tensor hb = moe_tensor_view1((void *)p->correction_bias, MOE_DTYPE_F32, p->n_experts);
        bb = upload_tensor(be, &hb, &dbias);
        q.correction_bias = dbias.data;
    }
    tk_buf bi = output_buf(be, MOE_DTYPE_I32, 2, (int64_t[]){T, p->top_k}, &dids);
    tk_buf bw = output_buf(be, MOE_DTYPE_F32, 2, (int64_t[]){T, p->top_k}, &dw);
    moe_status st = kern_route(be->ctx, &q, &dl, &dids, &dw);
    if (st != MOE_OK)
        print_error("[%s] route: %s\n", be->label, moe_errmsg());
    assert_int_equal(st, MOE_OK);
    assert_true(tk_buf_fetch(&bi, ids, "ids"));
    assert_true(tk_buf_fetch(&bw, w, "weights"));
    tk_buf_free(&bl);
    tk_buf_free(&bb);
    tk_buf_free(&bi);
    tk_buf_free(&bw);
}

static void test_route_ties(void **state) {
    (void)state;
    for (int b = 0; b < N_BACKENDS; b++) {
        const tk_backend *be = &tk_backends[b];
        if (!be->ctx)
            continue;
        int32_t ids[16];
        float w[16];
        /* all equal: ids 0..K-1, equal weights */
        float flat[8] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
        kern_route_params p = kern_route_params_default(8, 3);
        p.renormalize = true;
        route_on(be, &p, flat, 1, ids, w);
        assert_int_equal(ids[0], 0);
        assert_int_equal(ids[1], 1);
        assert_int_equal(ids[2], 2);
        assert_float_equal(w[0], 1.0f / 3.0f, 1e-6);
        /* ties among the best: 5 and 2 tie for first, 7 and 6 for third */
        float tie[8] = {0.0f, 0.0f, 3.0f, 0.0f, 0.0f, 3.0f, 1.0f, 1.0f};
        p.top_k = 4;
        route_on(be, &p, tie, 1, ids, w);
        assert_int_equal(ids[0], 2);
        assert_int_equal(ids[1], 5);
        assert_int_equal(ids[2], 6);
        assert_int_equal(ids[3], 7);
        /* groups (max): groups 1 and 3 tie on their max (2.0): group 1 is kept */
        float g[8] = {0.0f, 1.0f, 2.0f, 0.0f, 0.5f, 0.5f, 0.0f, 2.0f};
        kern_route_params pg = kern_route_params_default(8, 2);
        pg.group_mode = KERN_GROUP_MAX;
        pg.n_group = 4;
        pg.topk_group = 1;
        route_on(be, &pg, g, 1, ids, w);
        assert_int_equal(ids[0], 2);
        assert_int_equal(ids[1], 3);
        /* groups (top-2 sum, sigmoid, zero bias): groups 0 and 2 tie on equal pairs */
        float g2[8] = {1.0f, 2.0f, -1.0f, -1.0f, 2.0f, 1.0f, 0.0f, 0.0f};
        float zero[8] = {0};
        pg.scoring = KERN_SCORE_SIGMOID;
        pg.group_mode = KERN_GROUP_TOP2_SUM;
        pg.correction_bias = zero;
        pg.top_k = 2;
        route_on(be, &pg, g2, 1, ids, w);
        assert_int_equal(ids[0], 1);
        assert_int_equal(ids[1], 0);
        /* the bias decides the choice; the weights stay unbiased */
        float bias[8] = {0, 0, 0, 0, 0, 0, 5.0f, 0};
        pg.correction_bias = bias;
        pg.topk_group = 2;
        route_on(be, &pg, g2, 1, ids, w);
        assert_int_equal(ids[0], 6);
        assert_float_equal(w[0], 0.5f, 1e-7); /* sigmoid(0) */
    }
}

/* T = 0: OK and nothing written. */
static void test_empty_batch(void **state) {
    (void)state;
    for (int b = 0; b < N_BACKENDS; b++) {
        const tk_backend *be = &tk_backends[b];
        if (!be->ctx)
            continue;
        problem pb;
        problem_init(&pb, MOE_DTYPE_F32, 3, 8, 4, 4, 2, 1);
        moe_tensor x = moe_tensor_view2(pb.x.data, MOE_DTYPE_F32, 0, 8);
        moe_tensor ids = moe_tensor_view2(pb.ids.data, MOE_DTYPE_I32, 0, 2);
        moe_tensor w = moe_tensor_view2(pb.w.data, MOE_DTYPE_F32, 0, 2);
        moe_tensor dx, d13, d2, dids, dw, dy;
        tk_buf b0 = upload_tensor(be, &pb.x, &dx), b1 = upload_tensor(be, &pb.w13, &d13),
               b2 = upload_tensor(be, &pb.w2, &d2), b3 = upload_tensor(be, &pb.ids, &dids),
               b4 = upload_tensor(be, &pb.w, &dw);
        dx.shape[0] = x.shape[0];
        dids.shape[0] = ids.shape[0];
        dw.shape[0] = w.shape[0];
        tk_buf by = output_buf(be, MOE_DTYPE_F32, 2, (int64_t[]){1, 8}, &dy);
        dy.shape[0] = 0;
        assert_int_equal(kern_fused_experts(be->ctx, &pb.p, &dx, &d13, &d2, &dids, &dw, &dy), MOE_OK);
        assert_true(tk_buf_untouched(&by, "empty batch output"));
        tk_buf_free(&b0);
        tk_buf_free(&b1);
        tk_buf_free(&b2);
        tk_buf_free(&b3);
        tk_buf_free(&b4);
        tk_buf_free(&by);
        problem_free(&pb);
    }
}

/* ==========================================================================================
 * Bad arguments: each returns its status and writes nothing. A fixture holds a valid call on
 * one backend; each test breaks one thing.
 * ======================================================================================== */
typedef struct fx {
    const tk_backend *be;
    problem pb;
    tk_buf bx, b13, b2, bids, bw, by, blog, bri, brw;
    moe_tensor x, w13, w2, ids, w, y, logits, rids, rw;
    kern_experts_params p;
    kern_route_params rp;
    uint64_t hash[5];
} fx;

static void fx_init(fx *f, const tk_backend *be) {
    memset(f, 0, sizeof *f);
    f->be = be;
    problem_init(&f->pb, MOE_DTYPE_BF16, 5, 24, 12, 8, 2, 31);
    f->bx = upload_tensor(be, &f->pb.x, &f->x);
    f->b13 = upload_tensor(be, &f->pb.w13, &f->w13);
    f->b2 = upload_tensor(be, &f->pb.w2, &f->w2);
    f->bids = upload_tensor(be, &f->pb.ids, &f->ids);
    f->bw = upload_tensor(be, &f->pb.w, &f->w);
    f->by = output_buf(be, MOE_DTYPE_BF16, 2, (int64_t[]){5, 24}, &f->y);
    moe_tensor hl = host_tensor(MOE_DTYPE_F32, 2, (int64_t[]){5, 8});
    moe_rng r;
    moe_rng_seed(&r, 3);
    fill_normal(&r, &hl, 1.0f);
    f->blog = upload_tensor(be, &hl, &f->logits);
    moe_tensor_free(&hl);
    f->bri = output_buf(be, MOE_DTYPE_I32, 2, (int64_t[]){5, 2}, &f->rids);
    f->brw = output_buf(be, MOE_DTYPE_F32, 2, (int64_t[]){5, 2}, &f->rw);
    f->p = f->pb.p;
    f->rp = kern_route_params_default(8, 2);
    const tk_buf *in[5] = {&f->bx, &f->b13, &f->b2, &f->bids, &f->bw};
    for (int i = 0; i < 5; i++)
        f->hash[i] = tk_buf_hash(in[i]);
}

/* Checks that nothing was written (outputs poisoned, guards intact, inputs unchanged). */
static void fx_check_clean(fx *f, const char *what) {
    assert_true(tk_buf_untouched(&f->by, what));
    assert_true(tk_buf_untouched(&f->bri, what));
    assert_true(tk_buf_untouched(&f->brw, what));
    const tk_buf *in[5] = {&f->bx, &f->b13, &f->b2, &f->bids, &f->bw};
    for (int i = 0; i < 5; i++)
        if (tk_buf_hash(in[i]) != f->hash[i]) {
            print_error("%s: input %d modified by a failing call\n", what, i);
            fail();
        }
}

static void fx_free(fx *f) {
    tk_buf *bufs[] = {&f->bx, &f->b13, &f->b2, &f->bids, &f->bw, &f->by, &f->blog, &f->bri, &f->brw};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        tk_buf_free(bufs[i]);
    problem_free(&f->pb);
}

static moe_status fx_experts(fx *f) {
    return kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &f->y);
}

static moe_status fx_route(fx *f) { return kern_route(f->be->ctx, &f->rp, &f->logits, &f->rids, &f->rw); }

/* Runs `body` (which makes one bad call and stores its status in st) on every backend and
 * checks the status and that nothing was written. */
#define BAD_ARG_CASE(name, want, ...)                                                                   \
    static void name(void **state) {                                                                    \
        (void)state;                                                                                    \
        for (int b_ = 0; b_ < N_BACKENDS; b_++) {                                                       \
            if (!tk_backends[b_].ctx)                                                                   \
                continue;                                                                               \
            fx fx_;                                                                                     \
            fx *f = &fx_;                                                                               \
            fx_init(f, &tk_backends[b_]);                                                               \
            moe_status st = MOE_OK;                                                                     \
            moe_errmsg_clear();                                                                         \
            __VA_ARGS__;                                                                                \
            if (st != (want)) {                                                                         \
                print_error("[%s] %s: %s, expected %s (%s)\n", tk_backends[b_].label, #name,          \
                            moe_status_name(st), moe_status_name(want), moe_errmsg());                  \
                fail();                                                                                 \
            }                                                                                           \
            assert_true(moe_errmsg()[0] != 0); /* a message says what was wrong */                     \
            fx_check_clean(f, #name);                                                                   \
            fx_free(f);                                                                                 \
        }                                                                                               \
    }

/* The fixture's ids live in backend memory; host backends let us poke them directly. Device
 * backends get the same edits through an upload. */
static void fx_set_id(fx *f, int64_t i, int32_t v) {
    int32_t *h = malloc(moe_tensor_nbytes(&f->ids));
    f->be->mem->download(h, f->ids.data, moe_tensor_nbytes(&f->ids));
    h[i] = v;
    f->be->mem->upload(f->ids.data, h, moe_tensor_nbytes(&f->ids));
    f->hash[3] = fnv1a(h, moe_tensor_nbytes(&f->ids));
    free(h);
}

static void fx_set_w(fx *f, int64_t i, float v) {
    float *h = malloc(moe_tensor_nbytes(&f->w));
    f->be->mem->download(h, f->w.data, moe_tensor_nbytes(&f->w));
    h[i] = v;
    f->be->mem->upload(f->w.data, h, moe_tensor_nbytes(&f->w));
    f->hash[4] = fnv1a(h, moe_tensor_nbytes(&f->w));
    free(h);
}

/* The device checks ids on the device and reports at sync: count both. */
static moe_status fx_experts_sync(fx *f) {
    moe_status st = fx_experts(f);
    if (st == MOE_OK)
        st = kern_ctx_sync(f->be->ctx);
    return st;
}

BAD_ARG_CASE(test_bad_topk_gt_e_route, MOE_ERR_INVALID_ARG, {
    f->rp.top_k = 9;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_topk_gt_e_experts, MOE_ERR_INVALID_ARG, {
    /* one token with the fixture's 10 ids as its slots: K = 10 > E = 8 */
    moe_tensor x1 = moe_tensor_view2(f->x.data, MOE_DTYPE_BF16, 1, 24);
    moe_tensor ids = moe_tensor_view2(f->ids.data, MOE_DTYPE_I32, 1, 10);
    moe_tensor w = moe_tensor_view2(f->w.data, MOE_DTYPE_F32, 1, 10);
    moe_tensor y1 = moe_tensor_view2(f->y.data, MOE_DTYPE_BF16, 1, 24);
    st = kern_fused_experts(f->be->ctx, &f->p, &x1, &f->w13, &f->w2, &ids, &w, &y1);
})
BAD_ARG_CASE(test_bad_topk_zero, MOE_ERR_INVALID_ARG, {
    f->rp.top_k = 0;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_id_negative, MOE_ERR_INVALID_ARG, {
    fx_set_id(f, 3, -1);
    st = fx_experts_sync(f);
})
BAD_ARG_CASE(test_bad_id_too_large, MOE_ERR_INVALID_ARG, {
    fx_set_id(f, 9, 8);
    st = fx_experts_sync(f);
})
BAD_ARG_CASE(test_bad_expert_map_entry, MOE_ERR_INVALID_ARG, {
    int32_t map[8] = {0, 1, 2, 3, 4, 5, 6, 8}; /* 8 >= n_local */
    moe_tensor hm = moe_tensor_view1(map, MOE_DTYPE_I32, 8), dm;
    tk_buf bm = upload_tensor(f->be, &hm, &dm);
    f->p.expert_map = dm.data;
    st = fx_experts_sync(f);
    tk_buf_free(&bm);
})
BAD_ARG_CASE(test_bad_shape_w13_hidden, MOE_ERR_INVALID_ARG, {
    f->w13.shape[2] = 23;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_w13_odd, MOE_ERR_INVALID_ARG, {
    f->w13.shape[1] = 23;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_w2_inter, MOE_ERR_INVALID_ARG, {
    f->w2.shape[2] = 11;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_w13_experts, MOE_ERR_INVALID_ARG, {
    f->w13.shape[0] = 7;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_weights, MOE_ERR_INVALID_ARG, {
    f->w.shape[1] = 1;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_ids_tokens, MOE_ERR_INVALID_ARG, {
    f->ids.shape[0] = 4;
    f->w.shape[0] = 4;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_output, MOE_ERR_INVALID_ARG, {
    f->y.shape[1] = 23;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_shape_slot_output, MOE_ERR_INVALID_ARG, {
    moe_tensor y3 = moe_tensor_view3(f->y.data, MOE_DTYPE_BF16, 5, 3, 8); /* [T, K, H] with K, H wrong */
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &y3);
})
BAD_ARG_CASE(test_bad_shape_logits, MOE_ERR_INVALID_ARG, {
    f->logits.shape[1] = 7;
    f->logits.shape[0] = 5;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_dtype_mismatch, MOE_ERR_INVALID_ARG, {
    f->w2.dtype = MOE_DTYPE_F16;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_alias_y_is_x, MOE_ERR_ALIAS, {
    moe_tensor y = moe_tensor_view2(f->x.data, MOE_DTYPE_BF16, 5, 24);
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &y);
})
BAD_ARG_CASE(test_bad_alias_y_partial_x, MOE_ERR_ALIAS, {
    /* y starts in x's last row: a partial overlap */
    moe_tensor y = moe_tensor_view2((char *)f->x.data + 4 * 24 * 2 + 10, MOE_DTYPE_BF16, 5, 24);
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &y);
})
BAD_ARG_CASE(test_bad_alias_y_in_w13, MOE_ERR_ALIAS, {
    moe_tensor y = moe_tensor_view2((char *)f->w13.data + 1000, MOE_DTYPE_BF16, 5, 24);
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &y);
})
BAD_ARG_CASE(test_bad_alias_y_over_ids, MOE_ERR_ALIAS, {
    /* y ends 4 bytes into ids */
    size_t yb = 5 * 24 * 2;
    moe_tensor y = moe_tensor_view2((char *)f->ids.data + 4 - yb, MOE_DTYPE_BF16, 5, 24);
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &y);
})
BAD_ARG_CASE(test_bad_alias_route_outputs, MOE_ERR_ALIAS, {
    moe_tensor w = moe_tensor_view2(f->logits.data, MOE_DTYPE_F32, 5, 2);
    st = kern_route(f->be->ctx, &f->rp, &f->logits, &f->rids, &w);
})
BAD_ARG_CASE(test_bad_alias_moe_sum, MOE_ERR_ALIAS, {
    moe_tensor slots = moe_tensor_view3(f->y.data, MOE_DTYPE_BF16, 5, 1, 24);
    st = kern_moe_sum(f->be->ctx, &slots, NULL, &f->y);
})
BAD_ARG_CASE(test_bad_n_group_divides, MOE_ERR_INVALID_ARG, {
    f->rp.group_mode = KERN_GROUP_MAX;
    f->rp.n_group = 3;
    f->rp.topk_group = 1;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_topk_group_gt_n_group, MOE_ERR_INVALID_ARG, {
    f->rp.group_mode = KERN_GROUP_TOP2_SUM;
    f->rp.n_group = 4;
    f->rp.topk_group = 5;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_topk_exceeds_kept_groups, MOE_ERR_INVALID_ARG, {
    f->rp.group_mode = KERN_GROUP_MAX;
    f->rp.n_group = 4;
    f->rp.topk_group = 1;
    f->rp.top_k = 3; /* one kept group holds 2 experts */
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_scaling_factor, MOE_ERR_INVALID_ARG, {
    f->rp.routed_scaling_factor = NAN;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_nan_weight, MOE_ERR_INVALID_ARG, {
    fx_set_w(f, 4, NAN);
    st = fx_experts_sync(f);
})
BAD_ARG_CASE(test_bad_inf_weight, MOE_ERR_INVALID_ARG, {
    fx_set_w(f, 0, -INFINITY);
    st = fx_experts_sync(f);
})
BAD_ARG_CASE(test_bad_null_ctx, MOE_ERR_INVALID_ARG, {
    st = kern_fused_experts(NULL, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &f->y);
})
BAD_ARG_CASE(test_bad_null_params, MOE_ERR_INVALID_ARG, {
    st = kern_fused_experts(f->be->ctx, NULL, &f->x, &f->w13, &f->w2, &f->ids, &f->w, &f->y);
})
BAD_ARG_CASE(test_bad_null_tensor, MOE_ERR_INVALID_ARG, {
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, NULL, &f->w2, &f->ids, &f->w, &f->y);
})
BAD_ARG_CASE(test_bad_null_data, MOE_ERR_INVALID_ARG, {
    f->w2.data = NULL;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_null_output, MOE_ERR_INVALID_ARG, {
    st = kern_fused_experts(f->be->ctx, &f->p, &f->x, &f->w13, &f->w2, &f->ids, &f->w, NULL);
})
BAD_ARG_CASE(test_bad_null_route_params, MOE_ERR_INVALID_ARG, {
    st = kern_route(f->be->ctx, NULL, &f->logits, &f->rids, &f->rw);
})
BAD_ARG_CASE(test_bad_dtype_int_activations, MOE_ERR_INVALID_ARG, {
    moe_tensor xi = moe_tensor_view2(f->x.data, MOE_DTYPE_I32, 5, 12);
    st = kern_fused_experts(f->be->ctx, &f->p, &xi, &f->w13, &f->w2, &f->ids, &f->w, &f->y);
})
BAD_ARG_CASE(test_bad_dtype_invalid, MOE_ERR_INVALID_ARG, {
    f->logits.dtype = (moe_dtype)99;
    st = fx_route(f);
})
BAD_ARG_CASE(test_bad_ids_dtype, MOE_ERR_INVALID_ARG, {
    f->ids.dtype = MOE_DTYPE_F32;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_activation, MOE_ERR_INVALID_ARG, {
    f->p.act = (kern_act)7;
    st = fx_experts(f);
})
BAD_ARG_CASE(test_bad_n_local_without_map, MOE_ERR_INVALID_ARG, {
    f->p.n_local = 4;
    st = fx_experts(f);
})

/* ==========================================================================================
 * main
 * ======================================================================================== */
static int group_setup(void **state) {
    (void)state;
    for (int b = 0; b < N_BACKENDS; b++) {
        kern_ctx_params p = {.n_threads = tk_backends[b].n_threads};
        moe_status st = kern_ctx_init(&tk_backends[b].ctx, tk_backends[b].kind, &p);
        if (st == MOE_ERR_UNSUPPORTED) {
            printf("[ SKIP     ] backend %s: %s\n", tk_backends[b].label, moe_errmsg());
            tk_backends[b].ctx = NULL;
        } else if (st != MOE_OK) {
            fprintf(stderr, "backend %s: %s\n", tk_backends[b].label, moe_errmsg());
            return -1;
        }
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    for (int b = 0; b < N_BACKENDS; b++) {
        kern_ctx_free(tk_backends[b].ctx);
        tk_backends[b].ctx = NULL;
    }
    return 0;
}

int main(int argc, char **argv) {
    moe_log_init_from_env();
    const char *path = argc > 1 ? argv[1] : getenv("MOE_GOLDEN");
    if (path)
        snprintf(g_golden_path, sizeof g_golden_path, "%s", path);
    if (!load_golden(g_golden_path))
        return 1;
    printf("[ INFO     ] %d golden cases from %s; fast CPU products: %s\n", g_ncases, g_golden_path, cpu_gemm_isa());

    const struct CMUnitTest fixed[] = {
        cmocka_unit_test(test_route_ties),
        cmocka_unit_test(test_empty_batch),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_threads_determinism),
        cmocka_unit_test(test_gemm_tile_order),
        cmocka_unit_test(test_openblas_probe),
        cmocka_unit_test(test_bad_topk_gt_e_route),
        cmocka_unit_test(test_bad_topk_gt_e_experts),
        cmocka_unit_test(test_bad_topk_zero),
        cmocka_unit_test(test_bad_id_negative),
        cmocka_unit_test(test_bad_id_too_large),
        cmocka_unit_test(test_bad_expert_map_entry),
        cmocka_unit_test(test_bad_shape_w13_hidden),
        cmocka_unit_test(test_bad_shape_w13_odd),
        cmocka_unit_test(test_bad_shape_w2_inter),
        cmocka_unit_test(test_bad_shape_w13_experts),
        cmocka_unit_test(test_bad_shape_weights),
        cmocka_unit_test(test_bad_shape_ids_tokens),
        cmocka_unit_test(test_bad_shape_output),
        cmocka_unit_test(test_bad_shape_slot_output),
        cmocka_unit_test(test_bad_shape_logits),
        cmocka_unit_test(test_bad_dtype_mismatch),
        cmocka_unit_test(test_bad_alias_y_is_x),
        cmocka_unit_test(test_bad_alias_y_partial_x),
        cmocka_unit_test(test_bad_alias_y_in_w13),
        cmocka_unit_test(test_bad_alias_y_over_ids),
        cmocka_unit_test(test_bad_alias_route_outputs),
        cmocka_unit_test(test_bad_alias_moe_sum),
        cmocka_unit_test(test_bad_n_group_divides),
        cmocka_unit_test(test_bad_topk_group_gt_n_group),
        cmocka_unit_test(test_bad_topk_exceeds_kept_groups),
        cmocka_unit_test(test_bad_scaling_factor),
        cmocka_unit_test(test_bad_nan_weight),
        cmocka_unit_test(test_bad_inf_weight),
        cmocka_unit_test(test_bad_null_ctx),
        cmocka_unit_test(test_bad_null_params),
        cmocka_unit_test(test_bad_null_tensor),
        cmocka_unit_test(test_bad_null_data),
        cmocka_unit_test(test_bad_null_output),
        cmocka_unit_test(test_bad_null_route_params),
        cmocka_unit_test(test_bad_dtype_int_activations),
        cmocka_unit_test(test_bad_dtype_invalid),
        cmocka_unit_test(test_bad_ids_dtype),
        cmocka_unit_test(test_bad_activation),
        cmocka_unit_test(test_bad_n_local_without_map),
    };
    size_t nfixed = sizeof fixed / sizeof fixed[0];
    size_t n = nfixed + (size_t)g_ncases;
    struct CMUnitTest *tests = calloc(n, sizeof *tests);
    memcpy(tests, fixed, sizeof fixed);
    for (int c = 0; c < g_ncases; c++) {
        struct CMUnitTest *t = &tests[nfixed + (size_t)c];
        t->name = g_cases[c].name;
        t->test_func = test_golden_case;
        t->initial_state = &g_cases[c];
    }
    int rc = _cmocka_run_group_tests("kernels", tests, n, group_setup, group_teardown);
    free(tests);
    free_golden();
    return rc;
}
