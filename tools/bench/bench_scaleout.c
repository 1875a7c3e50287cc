/*
 * bench_scaleout.c: the engine with GPU workers at world sizes 1, 2, 4 .. W, weak scaling: each
 * GPU gets the same tokens per step (W x T_gpu tokens a request), the experts are split over
 * the GPUs.
 *
 *   bench_scaleout --engine PATH --gpus 0,1,2,3 [--shape qwen3|dsv3] [--model DIR]
 *                  [--tokens 1024,4096] [--requests 30] [--clients 4] [--dbo off,on,experts,auto] [--log-level warn]
 *                  [--exchange p2p|ce] [--combine-parts auto|1..4]
 *
 * Shapes (without --model, a synthetic checkpoint of one MoE layer is written once into
 * /tmp/moe-scaleout-SHAPE):
 *   qwen3  Qwen3-30B-A3B's experts: E=128, top-8, H=2048, I=768, no shared expert (1.2 GB)
 *   dsv3   DeepSeek-V3's: E=256, top-8, H=7168, I=2048, one shared expert of I=2048 (22.6 GB;
 *          32 experts a GPU at W = 8)
 * Requests carry their own top-k ids (uniform over the experts), so routing is the client's.
 * `--clients` client threads, each with its own connection and 2 requests in flight, send
 * W x T_gpu tokens a request: one TCP stream cannot feed several GPUs (bench_engine's echo
 * column shows what one stream carries).
 *
 * Per world size, DBO setting and tokens per GPU it prints:
 *   T/step        tokens per step, measured (the scheduler may coalesce queued requests)
 *   tok/s         engine throughput, client to client
 *   eff           weak-scaling efficiency end to end: tok/s(W) / (W x tok/s(1)), same T_gpu
 *   dev eff       weak-scaling efficiency of the GPU step: device microseconds per token and
 *                 GPU at W = 1 over the same at W (from the steps' own times below)
 *   step/compute  device times (CUDA events) of the slowest rank: the step from its inputs
 *                 on the device to its rows copied out, and the routed products
 *   combine us    the exchange (pack, NCCL all-to-all, unpack), per rank, summed over the
 *                 micro-batches
 *   bytes/rank    bytes a rank sent in the exchange; comb GB/s = bytes/rank / combine us:
 *                 compare with bench_nccl --op alltoall's busbw on the same bytes
 *   ideal us      max(compute, combine): what perfect overlap would give; step/ideal
 *   h2d us        the inputs' copy to the device before the step (the copies' own time, not in
 *                 step us)
 *   gather us     W > 1: the all-gather of x over NVLink, from this rank's block on the device
 *                 (it includes waiting for the other ranks to reach it; not in step us)
 *   ahead         the steps whose inputs every rank copied during the step before (double-
 *                 buffered inputs: that copy overlaps the step before's compute)
 *   host us       the worker's host time from the step's start to its one wait (enqueueing,
 *                 the exchange plan: plan us)
 * Napkin math, Qwen3, T_gpu = 1024, W = 2: each GPU's products are 2*1024*8*3*2048*768 = 77
 * GFLOP (~0.1 ms at 800 TFLOP/s) and its experts' weights 0.6 GB (~0.2 ms at 3 TB/s); in the
 * exchange, half of the 2048 rows belong to the other rank and half of their 8 pairs are
 * computed here: 4096 rows of 4 KB = 16.8 MB sent per rank, ~0.1 ms at ~170 GB/s.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/base/moe_base.h"
#include "engine/model/model.h"
#include "ipc/moeclient.h"
#include "tools/common/engine_proc.h"

static engine_gpu_sums read_sums(moec_client_t *c) {
    char *js = NULL;
    engine_gpu_sums s = engine_gpu_sums_of(moec_stats(c, &js, 10000) == MOEC_OK ? js : NULL);
    moec_free(js);
    return s;
}

/* One client thread: its own connection, `inflight` requests in flight, `requests` in all. */
typedef struct client_job {
    const char *endpoint;
    const moec_request *req;
    size_t ybytes;
    int requests, inflight;
    pthread_barrier_t *start;
    int failed;
    char err[320];
} client_job;

static void *client_main(void *arg) {
    client_job *j = arg;
    moec_client_t *c = NULL;
    moec_options o;
    moec_options_default(&o);
    o.timeout_ms = 120000;
    o.max_msg_bytes = 1ull << 32;
    void *ys[4] = {NULL};
    int ok = moec_client_init(&c, j->endpoint, &o) == MOEC_OK;
    for (int i = 0; i < j->inflight; i++)
        ok = ok && (ys[i] = malloc(j->ybytes)) != NULL;
    if (!ok)
        snprintf(j->err, sizeof j->err, "client: %s", c ? moec_errmsg(c) : "init");
    pthread_barrier_wait(j->start);
    int sent = 0, done = 0;
    while (ok && done < j->requests) {
        while (sent < j->requests && sent - done < j->inflight) {
            uint64_t id;
            if (moec_submit_async(c, j->req, ys[sent % j->inflight], j->ybytes, 0, &id) != MOEC_OK) {
                snprintf(j->err, sizeof j->err, "submit: %s", moec_errmsg(c));
                ok = 0;
                break;
            }
            sent++;
        }
        if (!ok)
            break;
        moec_result res;
        if (moec_collect(c, -1, &res) != MOEC_OK) {
            snprintf(j->err, sizeof j->err, "collect: %s", moec_errmsg(c));
            ok = 0;
            break;
        }
        if (res.status != MOEC_OK) {
            snprintf(j->err, sizeof j->err, "request failed: %s", res.message);
            ok = 0;
            break;
        }
        done++;
    }
    j->failed = !ok;
    for (int i = 0; i < 4; i++)
        free(ys[i]);
    moec_client_free(c);
    return NULL;
}

static int parse_list(const char *s, int64_t *out, int cap) {
    int n = 0;
    for (const char *p = s; *p && n < cap;) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v <= 0)
            return -1;
        out[n++] = v;
        if (*end != ',' && *end != '\0')
            return -1;
        p = *end == ',' ? end + 1 : end;
    }
    return n;
}

static void usage(void) {
    fprintf(stderr,
            "usage: bench_scaleout --engine PATH --gpus 0,1[,..] [--shape qwen3|dsv3] [--model DIR]\n"
            "                      [--tokens 1024,4096] [--requests 30] [--clients 4] [--dbo off,on,experts,auto]\n"
            "                      [--log-level warn]   (debug: one line per GPU step and rank, for\n"
            "                                            tools/gpu/step_trace.py)\n"
            "                      [--exchange p2p|ce]  (the engine's --exchange: NCCL send/recv, or ncclAlltoAll\n"
            "                                            on the copy engines)\n"
            "                      [--combine-parts auto|1..4] (the engine's: without DBO, the exchange and the copy\n"
            "                                            out in parts)\n"
            "  weak scaling of the engine's GPU workers at world sizes 1, 2, 4, .. up to the GPUs given;\n"
            "  --tokens are tokens per GPU and step; see the head of tools/bench/bench_scaleout.c.\n");
}

int main(int argc, char **argv) {
    const char *engine = NULL, *model = NULL, *gpus = "0", *tokens_s = "1024,4096", *shape = "qwen3", *dbo_s = "off,on",
               *log_level = "warn", *exchange = "p2p", *cparts = "auto";
    int requests = 30, clients = 4;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        if (strcmp(a, "--engine") == 0)
            engine = v;
        else if (strcmp(a, "--model") == 0)
            model = v;
        else if (strcmp(a, "--gpus") == 0)
            gpus = v;
        else if (strcmp(a, "--tokens") == 0)
            tokens_s = v;
        else if (strcmp(a, "--shape") == 0)
            shape = v;
        else if (strcmp(a, "--dbo") == 0)
            dbo_s = v;
        else if (strcmp(a, "--requests") == 0)
            requests = atoi(v);
        else if (strcmp(a, "--clients") == 0)
            clients = atoi(v);
        else if (strcmp(a, "--log-level") == 0)
            log_level = v;
        else if (strcmp(a, "--exchange") == 0 && (strcmp(v, "p2p") == 0 || strcmp(v, "ce") == 0))
            exchange = v;
        else if (strcmp(a, "--combine-parts") == 0 &&
                 ((v[0] >= '1' && v[0] <= '4' && v[1] == '\0') || strcmp(v, "auto") == 0))
            cparts = v;
        else {
            usage();
            return 2;
        }
        i++;
    }
    const bool dsv3 = strcmp(shape, "dsv3") == 0;
    if (!engine || requests < 4 || clients < 1 || clients > 64 || (!dsv3 && strcmp(shape, "qwen3") != 0)) {
        usage();
        return 2;
    }
    const bool dbo_off = strstr(dbo_s, "off") != NULL, dbo_on = strstr(dbo_s, "on") != NULL,
               dbo_exp = strstr(dbo_s, "experts") != NULL, dbo_auto = strstr(dbo_s, "auto") != NULL;
    moe_log_init_from_env();
    char model_dir[256];
    if (model) {
        snprintf(model_dir, sizeof model_dir, "%s", model);
    } else {
        snprintf(model_dir, sizeof model_dir, "/tmp/moe-scaleout-%s", shape);
        char cfg[300];
        snprintf(cfg, sizeof cfg, "%s/config.json", model_dir);
        struct stat sb;
        if (stat(cfg, &sb) != 0) {
            eng_synth_params p;
            eng_synth_params_default(&p, dsv3 ? ENG_FAMILY_DEEPSEEK_V3 : ENG_FAMILY_QWEN3_MOE);
            p.out_dir = model_dir;
            p.n_layers = 1;
            p.n_experts = dsv3 ? 256 : 128;
            p.top_k = 8;
            p.hidden = dsv3 ? 7168 : 2048;
            p.intermediate = dsv3 ? 2048 : 768;
            if (dsv3) {
                p.n_shared_experts = 1;
                p.dense_layers = 0;
                p.moe_layer_freq = 1;
            } else {
                p.sparse_step = 1;
                p.n_mlp_only = 0;
            }
            p.dtype = MOE_DTYPE_BF16;
            p.seed = 7;
            p.force = true;
            double t0 = moe_now_s();
            if (eng_synth_write(&p) != MOE_OK) {
                fprintf(stderr, "model: %s\n", moe_errmsg());
                return 1;
            }
            fprintf(stderr, "wrote the %s-shape layer in %.1f s\n", shape, moe_now_s() - t0);
        }
    }
    eng_ckpt_t *ck = NULL;
    if (eng_ckpt_open(&ck, model_dir) != MOE_OK) {
        fprintf(stderr, "model: %s\n", moe_errmsg());
        return 1;
    }
    const eng_model_desc *d = eng_ckpt_desc(ck);
    const int64_t H = d->hidden_size, E = d->n_experts, K = d->top_k;
    const int32_t layer = d->moe_layers[0];
    int n_gpus = 1;
    for (const char *p = gpus; *p; p++)
        n_gpus += *p == ',';
    int64_t tg[16];
    int nt = parse_list(tokens_s, tg, 16);
    if (nt <= 0) {
        usage();
        return 2;
    }
    int64_t tmax = 0;
    for (int i = 0; i < nt; i++)
        tmax = tg[i] > tmax ? tg[i] : tmax;
    char desc[512];
    printf("model: %s\nGPUs: %s; %d clients x 2 requests in flight, %d requests per client and row; exchange %s, combine "
           "parts %s; device times from the workers' CUDA events (slowest rank)\n\n",
           eng_model_desc_str(d, desc, sizeof desc), gpus, clients, requests, exchange, cparts);
    printf("%3s %4s %7s %8s %12s %6s %8s %10s %11s %11s %11s %10s %10s %9s %8s %8s %8s %6s %9s\n", "W", "dbo", "T/GPU",
           "T/step", "tok/s", "eff", "dev eff", "step us", "compute us", "combine us", "bytes/rank", "comb GB/s",
           "ideal us", "step/ideal", "h2d us", "host us", "plan us", "ahead", "gather us");
    fflush(stdout);
    double base_tps[16] = {0}, base_us_per_tok[16] = {0};
    int rc = 0;
    moe_rng g;
    moe_rng_seed(&g, 11);
    for (int W = 1; W <= n_gpus; W *= 2) {
        char gl[128] = "";
        for (int r = 0; r < W; r++) {
            const char *p = gpus;
            for (int q = 0; q < r; q++)
                p = strchr(p, ',') + 1;
            size_t n = strcspn(p, ",");
            snprintf(gl + strlen(gl), sizeof gl - strlen(gl), "%s%.*s", r ? "," : "", (int)n, p);
        }
        for (int dbo = 0; dbo <= 3; dbo++) { /* off, on (split by tokens), on split by experts, auto */
            if (W == 1 && dbo >= 1)
                continue;
            if (W > 1 &&
                ((dbo == 0 && !dbo_off) || (dbo == 1 && !dbo_on) || (dbo == 2 && !dbo_exp) || (dbo == 3 && !dbo_auto)))
                continue;
            engine_proc e;
            char mst[32];
            snprintf(mst, sizeof mst, "%lld", (long long)(W * tmax * 2));
            const char *flags[] = {"--model",     model_dir, "--gpus",      gl,
                                   "--dbo",       dbo == 3 ? "auto" : dbo ? "on" : "off",
                                   "--dbo-split", dbo == 2 ? "experts" : "tokens",
                                   "--max-tokens", mst,     "--max-step-tokens", mst, "--io-threads", "4",
                                   "--log-level", log_level, "--exchange", exchange, "--combine-parts", cparts, NULL};
            if (!engine_start(&e, engine, flags))
                return 1;
            moec_client_t *c = NULL;
            moec_options o;
            moec_options_default(&o);
            o.timeout_ms = 120000;
            o.max_msg_bytes = 1ull << 32;
            if (moec_client_init(&c, e.endpoint, &o) != MOEC_OK || !engine_wait_ready(&e, c, 600)) {
                engine_stop(&e, false);
                return 1;
            }
            for (int ti = 0; ti < nt; ti++) {
                const int64_t T = tg[ti] * W;
                uint16_t *x = malloc(sizeof(uint16_t) * (size_t)(T * H));
                int32_t *ids = malloc(sizeof(int32_t) * (size_t)(T * K));
                float *w = malloc(sizeof(float) * (size_t)(T * K));
                void *y0 = malloc(sizeof(uint16_t) * (size_t)(T * H));
                if (!x || !ids || !w || !y0) {
                    fprintf(stderr, "out of memory\n");
                    return 1;
                }
                for (int64_t i = 0; i < T * H; i++)
                    x[i] = moe_f32_to_bf16(moe_rng_normal(&g));
                for (int64_t t = 0; t < T; t++) {
                    for (int64_t k = 0; k < K; k++) {
                        int32_t id;
                        bool dup;
                        do {
                            id = (int32_t)moe_rng_below(&g, (uint32_t)E);
                            dup = false;
                            for (int64_t j = 0; j < k; j++)
                                dup |= ids[t * K + j] == id;
                        } while (dup);
                        ids[t * K + k] = id;
                        w[t * K + k] = 1.0f / (float)K;
                    }
                }
                moec_request r = {.layer = layer, .dtype = MOEC_BF16, .n_tokens = T, .hidden = H, .x = x,
                                  .top_k = (int32_t)K, .topk_ids = ids, .topk_w = w};
                /* warm-up */
                for (int i = 0; i < 3; i++)
                    if (moec_submit(c, &r, y0, sizeof(uint16_t) * (size_t)(T * H), 0) != MOEC_OK) {
                        fprintf(stderr, "submit: %s\n", moec_errmsg(c));
                        rc = 1;
                    }
                engine_gpu_sums s0 = read_sums(c);
                pthread_barrier_t bar;
                pthread_barrier_init(&bar, NULL, (unsigned)clients + 1);
                client_job jobs[64];
                pthread_t th[64];
                for (int k = 0; k < clients; k++) {
                    jobs[k] = (client_job){.endpoint = e.endpoint, .req = &r,
                                           .ybytes = sizeof(uint16_t) * (size_t)(T * H), .requests = requests,
                                           .inflight = 2, .start = &bar};
                    pthread_create(&th[k], NULL, client_main, &jobs[k]);
                }
                pthread_barrier_wait(&bar);
                double t0 = moe_now_s();
                int failed = 0;
                for (int k = 0; k < clients; k++) {
                    pthread_join(th[k], NULL);
                    if (jobs[k].failed) {
                        fprintf(stderr, "client %d: %s\n", k, jobs[k].err);
                        failed = 1;
                    }
                }
                double wall = moe_now_s() - t0;
                pthread_barrier_destroy(&bar);
                if (failed)
                    rc = 1;
                engine_gpu_sums s1 = read_sums(c);
                double steps = s1.steps - s0.steps;
                double tsteps = steps ? (s1.step_tokens - s0.step_tokens) / steps : 0;
                double step = steps ? (s1.step_us - s0.step_us) / steps : 0;
                double comp = steps ? (s1.compute_us - s0.compute_us) / steps : 0;
                double comb = steps ? (s1.combine_us - s0.combine_us) / (steps * W) : 0;
                double bytes = steps ? (s1.combine_bytes - s0.combine_bytes) / (steps * W) : 0;
                double tps = failed ? 0 : (double)(T * requests * clients) / wall;
                /* device time per token and GPU: step / (tokens per step / W) */
                double us_per_tok = tsteps > 0 ? step / (tsteps / W) : 0;
                if (W == 1) {
                    base_tps[ti] = tps;
                    base_us_per_tok[ti] = us_per_tok;
                }
                double eff = base_tps[ti] > 0 ? tps / (W * base_tps[ti]) : 0;
                double deff = us_per_tok > 0 ? base_us_per_tok[ti] / us_per_tok : 0;
                double ideal = comp > comb ? comp : comb;
                double h2d = steps ? (s1.h2d_us - s0.h2d_us) / steps : 0, host = steps ? (s1.host_us - s0.host_us) / steps : 0,
                       plan = steps ? (s1.plan_us - s0.plan_us) / steps : 0,
                       ahead = steps ? (s1.staged - s0.staged) / steps : 0,
                       gather = steps ? (s1.gather_us - s0.gather_us) / steps : 0;
                printf("%3d %4s %7lld %8.0f %12.0f %5.0f%% %7.0f%% %10.1f %11.1f %11.1f %11.0f %10.1f %10.1f %9.2f %8.1f "
                       "%8.1f %8.1f %5.0f%% %9.1f\n",
                       W, W > 1 ? (dbo == 3 ? "auto" : dbo == 2 ? "exp" : dbo ? "on" : "off") : "-", (long long)tg[ti], tsteps, tps, 100 * eff, 100 * deff, step,
                       comp, comb, bytes, comb > 0 ? bytes / comb * 1e-3 : 0.0, ideal, ideal > 0 ? step / ideal : 0.0,
                       h2d, host, plan, 100 * ahead, gather);
                fflush(stdout);
                free(x);
                free(ids);
                free(w);
                free(y0);
            }
            moec_client_free(c);
            if (!engine_stop(&e, false))
                rc = 1;
        }
    }
    eng_ckpt_close(ck);
    return rc;
}
