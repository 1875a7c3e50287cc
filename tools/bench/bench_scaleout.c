/*
 * bench_scaleout.c: the engine with GPU workers at world sizes 1 .. W, weak scaling: each GPU
 * gets the same tokens per step (T_total = W * T_gpu), the experts are split over the GPUs.
 *
 *   bench_scaleout --engine PATH --gpus 0,1 [--model DIR] [--tokens 256,1024,4096]
 *                  [--requests 40] [--shape qwen3]
 *
 * Without --model it writes a synthetic checkpoint of one MoE layer with Qwen3-30B-A3B's expert
 * shape (E=128, top-8, H=2048, I=768, bf16; 1.2 GB) into a temporary folder. Requests carry
 * their own top-k ids (uniform over the experts) so that routing is the client's.
 *
 * Per world size, DBO setting and tokens per GPU it prints:
 *   tok/s         engine throughput with 2 steps in flight (client to client)
 *   eff           weak-scaling efficiency: tok/s(W) / (W * tok/s(1)) at the same T_gpu
 *   step/compute/combine us   device times the workers report (CUDA events): the step from
 *                 inputs on the device to the output copied back, the routed products, the
 *                 reduces' own durations (per rank, summed over micro-batches)
 *   comb GB/s     bytes each rank's reduce moved / its duration (compare with bench_nccl's
 *                 busbw on the same bytes: the printed "bytes/rank" column)
 *   ideal us      max(compute, combine): what perfect overlap would give; step/ideal
 * Napkin math, Qwen3 shape, T_gpu = 1024, W = 2: each GPU's products are 2*1024*8*3*2048*768
 * = 77 GFLOP -> ~0.1 ms at 800 TFLOP/s, its experts' weights 0.6 GB -> ~0.2 ms at 3 TB/s; the
 * combine reduces 2048*8*2048*2 = 67 MB -> ~0.2 ms at ~350 GB/s.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/base/moe_base.h"
#include "engine/model/model.h"
#include "ipc/moeclient.h"
#include "tools/common/engine_proc.h"

static double json_num(const char *js, const char *key) {
    const char *p = strstr(js, key);
    if (!p)
        return 0;
    p = strchr(p, ':');
    return p ? strtod(p + 1, NULL) : 0;
}

typedef struct gpu_sums {
    double steps, step_us, compute_us, combine_us, combine_bytes;
} gpu_sums;

static gpu_sums read_sums(moec_client_t *c) {
    gpu_sums s = {0};
    char *js = NULL;
    if (moec_stats(c, &js, 10000) == MOEC_OK) {
        const char *g = strstr(js, "\"gpu\":");
        if (g) {
            s.steps = json_num(g, "\"steps\"");
            s.step_us = json_num(g, "\"step_us_sum\"");
            s.compute_us = json_num(g, "\"compute_us_sum\"");
            s.combine_us = json_num(g, "\"combine_us_sum\"");
            s.combine_bytes = json_num(g, "\"combine_bytes_sum\"");
        }
    }
    moec_free(js);
    return s;
}

int main(int argc, char **argv) {
    const char *engine = NULL, *model = NULL, *gpus = "0", *tokens_s = "256,1024,4096";
    int requests = 40;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--engine") == 0 && i + 1 < argc)
            engine = argv[++i];
        else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model = argv[++i];
        else if (strcmp(argv[i], "--gpus") == 0 && i + 1 < argc)
            gpus = argv[++i];
        else if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc)
            tokens_s = argv[++i];
        else if (strcmp(argv[i], "--requests") == 0 && i + 1 < argc)
            requests = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_scaleout --engine PATH --gpus 0,1 [--model DIR] [--tokens A,B] [--requests N]\n");
            return 2;
        }
    }
    if (!engine || requests < 4)
        return 2;
    moe_log_init_from_env();
    char model_dir[256];
    if (model) {
        snprintf(model_dir, sizeof model_dir, "%s", model);
    } else {
        snprintf(model_dir, sizeof model_dir, "/tmp/moe-scaleout-model");
        eng_synth_params p;
        eng_synth_params_default(&p, ENG_FAMILY_QWEN3_MOE);
        p.out_dir = model_dir;
        p.n_layers = 1;
        p.n_experts = 128;
        p.top_k = 8;
        p.hidden = 2048;
        p.intermediate = 768;
        p.sparse_step = 1;
        p.n_mlp_only = 0;
        p.dtype = MOE_DTYPE_BF16;
        p.seed = 7;
        p.force = true;
        double t0 = moe_now_s();
        if (eng_synth_write(&p) != MOE_OK) {
            fprintf(stderr, "model: %s\n", moe_errmsg());
            return 1;
        }
        fprintf(stderr, "wrote the Qwen3-30B-A3B-shape layer in %.1f s\n", moe_now_s() - t0);
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
    int nt = 0;
    for (const char *p = tokens_s; *p && nt < 16;) {
        char *end;
        tg[nt++] = strtoll(p, &end, 10);
        p = *end == ',' ? end + 1 : end;
    }
    char desc[512];
    printf("model: %s\nGPUs: %s; %d requests per row, 2 steps in flight; device times from the workers' CUDA events\n\n",
           eng_model_desc_str(d, desc, sizeof desc), gpus, requests);
    printf("%3s %4s %7s %8s %12s %6s %10s %11s %11s %11s %10s %10s %9s\n", "W", "dbo", "T/GPU", "T/step", "tok/s",
           "eff", "step us", "compute us", "combine us", "bytes/rank", "comb GB/s", "ideal us", "step/ideal");
    double base_tps[16] = {0};
    int rc = 0;
    moe_rng g;
    moe_rng_seed(&g, 11);
    for (int W = 1; W <= n_gpus; W *= 2) {
        char gl[64] = "";
        for (int r = 0; r < W; r++) {
            const char *p = gpus;
            for (int q = 0; q < r; q++)
                p = strchr(p, ',') + 1;
            size_t n = strcspn(p, ",");
            snprintf(gl + strlen(gl), sizeof gl - strlen(gl), "%s%.*s", r ? "," : "", (int)n, p);
        }
        for (int dbo = 0; dbo <= (W > 1 ? 1 : 0); dbo++) {
            engine_proc e;
            const char *flags[] = {"--model", model_dir, "--gpus", gl, "--dbo", dbo ? "on" : "off", "--max-tokens",
                                   "65536", "--max-step-tokens", "65536", "--log-level", "warn", NULL};
            if (!engine_start(&e, engine, flags))
                return 1;
            moec_client_t *c = NULL;
            moec_options o;
            moec_options_default(&o);
            o.timeout_ms = 120000;
            o.max_msg_bytes = 1ull << 31;
            if (moec_client_init(&c, e.endpoint, &o) != MOEC_OK || !engine_wait_ready(&e, c, 300)) {
                engine_stop(&e, false);
                return 1;
            }
            for (int ti = 0; ti < nt; ti++) {
                const int64_t T = tg[ti] * W;
                uint16_t *x = malloc(sizeof(uint16_t) * (size_t)(T * H));
                int32_t *ids = malloc(sizeof(int32_t) * (size_t)(T * K));
                float *w = malloc(sizeof(float) * (size_t)(T * K));
                void *ys[2] = {malloc(sizeof(uint16_t) * (size_t)(T * H)), malloc(sizeof(uint16_t) * (size_t)(T * H))};
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
                    if (moec_submit(c, &r, ys[0], sizeof(uint16_t) * (size_t)(T * H), 0) != MOEC_OK) {
                        fprintf(stderr, "submit: %s\n", moec_errmsg(c));
                        rc = 1;
                    }
                gpu_sums s0 = read_sums(c);
                double t0 = moe_now_s();
                int sent = 0, done = 0;
                while (done < requests) {
                    while (sent < requests && sent - done < 2) {
                        uint64_t id;
                        moec_submit_async(c, &r, ys[sent % 2], sizeof(uint16_t) * (size_t)(T * H), 0, &id);
                        sent++;
                    }
                    moec_result res;
                    if (moec_collect(c, -1, &res) != MOEC_OK || res.status != MOEC_OK) {
                        fprintf(stderr, "request failed: %s\n", res.message);
                        rc = 1;
                        break;
                    }
                    done++;
                }
                double wall = moe_now_s() - t0;
                gpu_sums s1 = read_sums(c);
                double steps = s1.steps - s0.steps;
                double step = steps ? (s1.step_us - s0.step_us) / steps : 0;
                double comp = steps ? (s1.compute_us - s0.compute_us) / steps : 0;
                double comb = steps ? (s1.combine_us - s0.combine_us) / (steps * W) : 0;
                double bytes = steps ? (s1.combine_bytes - s0.combine_bytes) / (steps * W) : 0;
                double tps = (double)(T * requests) / wall;
                if (W == 1)
                    base_tps[ti] = tps;
                double eff = base_tps[ti] > 0 ? tps / (W * base_tps[ti]) : 0;
                double ideal = comp > comb ? comp : comb;
                printf("%3d %4s %7lld %8lld %12.0f %5.0f%% %10.1f %11.1f %11.1f %11.0f %10.1f %10.1f %9.2f\n", W,
                       W > 1 ? (dbo ? "on" : "off") : "-", (long long)tg[ti], (long long)T, tps, 100 * eff, step, comp,
                       comb, bytes, comb > 0 ? bytes / comb * 1e-3 : 0.0, ideal, ideal > 0 ? step / ideal : 0.0);
                fflush(stdout);
                free(x);
                free(ids);
                free(w);
                free(ys[0]);
                free(ys[1]);
            }
            moec_client_free(c);
            if (!engine_stop(&e, false))
                rc = 1;
        }
    }
    eng_ckpt_close(ck);
    return rc;
}
