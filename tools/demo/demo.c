/*
 * demo.c: `moe-demo`, what `tools/moe demo` runs. It starts the engine on the embedded default
 * model (a synthetic Qwen2-MoE: 16 experts, top-4, H=256, a gated shared expert), submits
 * batches of several sizes through the C client (libmoeclient), checks every output against
 * the reference kernels run in this process on the same checkpoint, prints a table (T, p50/p99
 * latency, tokens/s, max error, expert load), and shuts the engine down with SIGTERM, checking
 * that it exits 0.
 *
 *   moe-demo --engine PATH [--workers N | --gpus LIST] [--requests N] [--concurrency N] [--keep-dir]
 *
 * With --gpus the engine runs one GPU worker per listed GPU (the CUDA backend: outputs match
 * the CPU reference within bf16 tolerance); otherwise N CPU workers.
 *
 * Exit status 0 when every output matched and the engine stopped cleanly.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/base/moe_base.h"
#include "engine/model/model.h"
#include "ipc/moeclient.h"
#include "kernels/kern.h"
#include "tools/common/engine_proc.h"

typedef struct demo_args {
    const char *engine;
    const char *gpus;
    int workers, requests, concurrency;
    bool keep;
} demo_args;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The reference of one request: the in-process kernels on the whole model. */
typedef struct ref_model {
    eng_ckpt_t *ck;
    const eng_model_desc *d;
    eng_model_weights w;
    kern_ctx_t *k;
} ref_model;

static moe_status ref_init(ref_model *r, const char *dir) {
    memset(r, 0, sizeof *r);
    MOE_CHECK(eng_ckpt_open(&r->ck, dir));
    r->d = eng_ckpt_desc(r->ck);
    eng_model_load_params lp = eng_model_load_params_default();
    MOE_CHECK(eng_model_load(r->ck, &lp, &r->w));
    return kern_ctx_init(&r->k, KERN_BACKEND_CPU_REF, NULL);
}

static moe_status ref_run(ref_model *r, int32_t layer, const moe_tensor *x, float *y) {
    const eng_model_layer *l = eng_model_weights_layer(&r->w, layer);
    MOE_REQUIRE(l, MOE_ERR_NOT_FOUND, "layer %d", (int)layer);
    const int64_t T = x->shape[0], K = r->d->top_k, E = r->d->n_experts, H = r->d->hidden_size;
    moe_tensor lg = {0}, ids = {0}, w = {0}, out = {0};
    moe_status st = MOE_OK;
    MOE_CHECK_GOTO(moe_tensor_alloc(&lg, MOE_DTYPE_F32, 2, (int64_t[]){T, E}), st, done);
    MOE_CHECK_GOTO(moe_tensor_alloc(&ids, MOE_DTYPE_I32, 2, (int64_t[]){T, K}), st, done);
    MOE_CHECK_GOTO(moe_tensor_alloc(&w, MOE_DTYPE_F32, 2, (int64_t[]){T, K}), st, done);
    MOE_CHECK_GOTO(moe_tensor_alloc(&out, x->dtype, 2, (int64_t[]){T, H}), st, done);
    MOE_CHECK_GOTO(eng_model_router_logits(l, x, &lg), st, done);
    kern_route_params rp = eng_model_route_params(r->d, l);
    MOE_CHECK_GOTO(kern_route(r->k, &rp, &lg, &ids, &w), st, done);
    kern_experts_params ep = {.n_experts = (int32_t)E, .n_local = (int32_t)E, .act = r->d->act};
    kern_shared_expert se;
    bool has = eng_model_shared_expert(r->d, l, &se);
    MOE_CHECK_GOTO(kern_moe_forward(r->k, &ep, x, &l->w13, &l->w2, &ids, &w, has ? &se : NULL, &out), st, done);
    moe_to_f32(x->dtype, out.data, y, (size_t)(T * H));
done:
    moe_tensor_free(&lg);
    moe_tensor_free(&ids);
    moe_tensor_free(&w);
    moe_tensor_free(&out);
    return st;
}

static void ref_free(ref_model *r) {
    kern_ctx_free(r->k);
    eng_model_weights_free(&r->w);
    eng_ckpt_close(r->ck);
}

static int usage(void) {
    fprintf(stderr, "usage: moe-demo --engine PATH [--workers N | --gpus LIST] [--requests N] [--concurrency N] "
                    "[--keep-dir]\n"
                    "Starts the engine on its embedded default model, checks its outputs, prints a table.\n");
    return 2;
}

int main(int argc, char **argv) {
    demo_args a = {.engine = NULL, .workers = 2, .requests = 24, .concurrency = 4};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--engine") == 0 && i + 1 < argc)
            a.engine = argv[++i];
        else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc)
            a.workers = atoi(argv[++i]);
        else if (strcmp(argv[i], "--gpus") == 0 && i + 1 < argc)
            a.gpus = argv[++i];
        else if (strcmp(argv[i], "--requests") == 0 && i + 1 < argc)
            a.requests = atoi(argv[++i]);
        else if (strcmp(argv[i], "--concurrency") == 0 && i + 1 < argc)
            a.concurrency = atoi(argv[++i]);
        else if (strcmp(argv[i], "--keep-dir") == 0)
            a.keep = true;
        else
            return usage();
    }
    if (!a.engine || a.workers < 1 || a.requests < 1 || a.concurrency < 1)
        return usage();
    moe_log_init_from_env();

    char workers[16];
    snprintf(workers, sizeof workers, "%d", a.workers);
    const char *level = getenv("MOE_LOG_LEVEL") ? getenv("MOE_LOG_LEVEL") : "warn";
    engine_proc e;
    int rc = 1;
    moec_client_t *c = NULL;
    ref_model ref;
    memset(&ref, 0, sizeof ref);
    printf("== moe-engine demo ==\n");
    const char *wflag = a.gpus ? "--gpus" : "--workers", *wval = a.gpus ? a.gpus : workers;
    if (!engine_start(&e, a.engine, (const char *[]){wflag, wval, "--log-level", level, NULL}))
        return 1;
    printf("started: %s serve %s %s --bind %s --http %s --runtime-dir %s\n", a.engine, wflag, wval, e.endpoint, e.http,
           e.rundir);
    fflush(stdout);
    moec_options o;
    moec_options_default(&o);
    o.timeout_ms = 30000;
    if (moec_client_init(&c, e.endpoint, &o) != MOEC_OK) {
        fprintf(stderr, "client: %s\n", moec_errmsg(c));
        goto stop;
    }
    double t0 = moe_now_s();
    if (!engine_wait_ready(&e, c, 60))
        goto stop;
    printf("engine ready in %.2f s\n", moe_now_s() - t0);
    char model_dir[512];
    engine_default_model_dir(&e, model_dir, sizeof model_dir);
    if (ref_init(&ref, model_dir) != MOE_OK) {
        fprintf(stderr, "reference: %s\n", moe_errmsg());
        goto stop;
    }
    const eng_model_desc *d = ref.d;
    char desc[512];
    printf("model: %s\n\n", eng_model_desc_str(d, desc, sizeof desc));
    printf("%6s %8s %10s %10s %12s %12s %10s\n", "T", "requests", "p50 (ms)", "p99 (ms)", "tokens/s", "max |err|",
           "rel err");
    const int64_t Ts[] = {1, 4, 16, 64, 256};
    const int64_t H = d->hidden_size;
    moe_rng g;
    moe_rng_seed(&g, 2026);
    bool all_ok = true;
    for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
        const int64_t T = Ts[ti];
        const int n = a.requests;
        uint16_t **xs = calloc((size_t)n, sizeof *xs), **ys = calloc((size_t)n, sizeof *ys);
        double *lat = calloc((size_t)n, sizeof *lat);
        int32_t *layer = calloc((size_t)n, sizeof *layer);
        for (int i = 0; i < n; i++) {
            xs[i] = malloc(sizeof(uint16_t) * (size_t)(T * H));
            ys[i] = malloc(sizeof(uint16_t) * (size_t)(T * H));
            for (int64_t j = 0; j < T * H; j++)
                xs[i][j] = moe_f32_to_bf16(moe_rng_normal(&g));
            layer[i] = d->moe_layers[(size_t)i % (size_t)d->n_moe_layers];
        }
        int sent = 0, done = 0, failed = 0;
        double start = moe_now_s();
        uint64_t *ids = calloc((size_t)n, sizeof *ids);
        while (done < n) {
            while (sent < n && sent - done < a.concurrency) {
                moec_request r = {.layer = layer[sent], .dtype = MOEC_BF16, .n_tokens = T, .hidden = H, .x = xs[sent]};
                if (moec_submit_async(c, &r, ys[sent], sizeof(uint16_t) * (size_t)(T * H), 0, &ids[sent]) != MOEC_OK) {
                    fprintf(stderr, "submit: %s\n", moec_errmsg(c));
                    failed++;
                    done++;
                }
                sent++;
            }
            moec_result res;
            if (moec_collect(c, -1, &res) != MOEC_OK)
                break;
            int idx = -1;
            for (int i = 0; i < sent; i++)
                if (ids[i] == res.request_id)
                    idx = i;
            if (res.status != MOEC_OK) {
                fprintf(stderr, "request failed: %s: %s\n", moec_status_name(res.status), res.message);
                failed++;
            }
            if (idx >= 0)
                lat[idx] = res.status == MOEC_OK ? res.latency_ms : NAN;
            done++;
        }
        double wall = moe_now_s() - start;
        /* Check every output. */
        double max_abs = 0, max_rel = 0;
        float *ref_y = malloc(sizeof(float) * (size_t)(T * H));
        for (int i = 0; i < n; i++) {
            moe_tensor x = moe_tensor_view2(xs[i], MOE_DTYPE_BF16, T, H);
            if (isnan(lat[i]) || ref_run(&ref, layer[i], &x, ref_y) != MOE_OK) {
                all_ok = false;
                continue;
            }
            double num = 0, den = 0;
            for (int64_t j = 0; j < T * H; j++) {
                double got = moe_bf16_to_f32(ys[i][j]), e = fabs(got - ref_y[j]);
                if (!isfinite(got))
                    e = INFINITY;
                if (e > max_abs)
                    max_abs = e;
                num += e * e;
                den += (double)ref_y[j] * ref_y[j];
            }
            double rel = den > 0 ? sqrt(num / den) : sqrt(num);
            if (rel > max_rel)
                max_rel = rel;
        }
        qsort(lat, (size_t)n, sizeof *lat, cmp_double);
        double p50 = lat[n / 2], p99 = lat[(size_t)((n - 1) * 0.99)];
        bool ok = failed == 0 && max_rel <= 1e-2;
        all_ok &= ok;
        printf("%6lld %8d %10.3f %10.3f %12.0f %12.3g %10.2e %s\n", (long long)T, n, p50, p99,
               (double)(n * T) / wall, max_abs, max_rel, ok ? "ok" : "MISMATCH");
        fflush(stdout);
        free(ref_y);
        for (int i = 0; i < n; i++) {
            free(xs[i]);
            free(ys[i]);
        }
        free(xs);
        free(ys);
        free(lat);
        free(layer);
        free(ids);
    }
    /* Expert load, from the engine's own counters. */
    char *js = NULL;
    if (moec_stats(c, &js, 5000) == MOEC_OK) {
        const char *p = strstr(js, "\"per_expert_tokens\":[");
        if (p) {
            p += strlen("\"per_expert_tokens\":[");
            double v[1024];
            int ne = 0;
            double sum = 0, mx = 0;
            while (*p && *p != ']' && ne < 1024) {
                v[ne] = strtod(p, (char **)&p);
                sum += v[ne];
                if (v[ne] > mx)
                    mx = v[ne];
                ne++;
                if (*p == ',')
                    p++;
            }
            printf("\nexpert load (tokens routed per expert, from the engine's STATS):\n ");
            for (int e = 0; e < ne; e++)
                printf(" %d:%.0f", e, v[e]);
            printf("\n  max/mean = %.2f\n", ne && sum > 0 ? mx / (sum / ne) : 0.0);
        }
    }
    moec_free(js);
    rc = all_ok ? 0 : 1;
stop:
    moec_client_free(c);
    ref_free(&ref);
    bool clean = engine_stop(&e, a.keep);
    printf("\nengine stopped with SIGTERM: %s\n", clean ? "exit 0" : "FAILED (not a clean exit 0)");
    if (!clean)
        rc = 1;
    printf("%s\n", rc == 0 ? "demo: every output matched the reference" : "demo: FAILED");
    return rc;
}
