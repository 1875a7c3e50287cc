/*
 * bench_model_io.c: how fast the synthetic writer writes a checkpoint and the loader loads it
 * (all experts on one rank, and one rank's quarter), for a few model sizes. Prints one table.
 *
 *   bazel run //engine/model:bench_model_io -- [--dir DIR] [--sizes 16,64,256] [--dtype bf16]
 *
 * Model: qwen3_moe, H = 1024, I = 512, E = 32, K = 4, as many layers as the size needs
 * (one layer = 32 x 3 x 1024 x 512 x 2 bytes = 96 MiB in bf16; smaller sizes cut E).
 * Napkin math: the writer draws one 64-bit random number per value and converts it (~2-4 ns
 * a value on one core), so ~0.5-1 GB/s before the disk; loading is a copy out of the page
 * cache (the files were just written, so it is warm: this measures memory bandwidth and the
 * loader's overhead, not the disk), ~2-10 GB/s for a same-dtype copy on one core, less where
 * it converts. A rank of a 4-way placement reads a quarter of the expert bytes.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/model/model.h"

static int usage(void) {
    fprintf(stderr, "usage: bench_model_io [--dir DIR] [--sizes MiB,MiB,...] [--dtype bf16|f16|f32]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *dir = NULL, *sizes = "16,64,256";
    moe_dtype dt = MOE_DTYPE_BF16;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--sizes") && i + 1 < argc)
            sizes = argv[++i];
        else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            if (moe_dtype_parse(argv[++i], &dt) != MOE_OK || !moe_dtype_is_float(dt))
                return usage();
        } else
            return usage();
    }
    moe_log_set_level(MOE_LOG_WARN);
    char tmpl[] = "/tmp/bench_model_io.XXXXXX";
    if (!dir) {
        dir = mkdtemp(tmpl);
        if (!dir) {
            perror("mkdtemp");
            return 1;
        }
    }
    printf("# bench_model_io: qwen3_moe %s, H=1024 I=512, shards <= 1 GiB, in %s (warm page cache)\n",
           moe_dtype_name(dt), dir);
    printf("%8s %4s %4s %9s %10s %8s %10s %10s %12s %10s\n", "MiB", "E", "L", "write_s", "write_MB/s", "open_ms",
           "load_s", "load_MB/s", "rank1of4_s", "rank_MB/s");
    const char *s = sizes;
    while (*s) {
        int mib = atoi(s);
        if (mib <= 0)
            return usage();
        eng_synth_params p;
        eng_synth_params_default(&p, ENG_FAMILY_QWEN3_MOE);
        p.out_dir = dir;
        p.force = true;
        p.hidden = 1024;
        p.intermediate = 512;
        p.top_k = 4;
        p.dtype = dt;
        uint64_t per_expert = 3ull * 1024 * 512 * moe_dtype_size(dt);
        uint64_t want = (uint64_t)mib << 20;
        int32_t E = 32;
        int32_t L = (int32_t)((want + 32 * per_expert - 1) / (32 * per_expert));
        if (want < 32 * per_expert)
            E = (int32_t)(want / per_expert) < 4 ? 4 : (int32_t)(want / per_expert), L = 1;
        p.n_experts = E;
        p.n_layers = L;
        double t0 = moe_now_s();
        if (eng_synth_write(&p) != MOE_OK) {
            fprintf(stderr, "write: %s\n", moe_errmsg());
            return 1;
        }
        double tw = moe_now_s() - t0;
        t0 = moe_now_s();
        eng_ckpt_t *ck;
        if (eng_ckpt_open(&ck, dir) != MOE_OK) {
            fprintf(stderr, "open: %s\n", moe_errmsg());
            return 1;
        }
        double to = moe_now_s() - t0;
        eng_model_weights w;
        t0 = moe_now_s();
        if (eng_model_load(ck, NULL, &w) != MOE_OK) {
            fprintf(stderr, "load: %s\n", moe_errmsg());
            return 1;
        }
        double tl = moe_now_s() - t0;
        uint64_t bytes = w.bytes;
        eng_model_weights_free(&w);
        par_placement pl;
        par_placement_init(&pl, E, 4, PAR_PLACE_CONTIGUOUS);
        eng_model_load_params lp = eng_model_load_params_default();
        lp.experts = pl.experts[1];
        lp.n_local = pl.n_local[1];
        lp.router = lp.shared = false;
        t0 = moe_now_s();
        if (eng_model_load(ck, &lp, &w) != MOE_OK) {
            fprintf(stderr, "load rank: %s\n", moe_errmsg());
            return 1;
        }
        double tr = moe_now_s() - t0;
        uint64_t rbytes = w.bytes;
        eng_model_weights_free(&w);
        par_placement_free(&pl);
        eng_ckpt_close(ck);
        double mb = (double)bytes / 1e6;
        printf("%8.1f %4d %4d %9.3f %10.0f %8.2f %10.3f %10.0f %12.3f %10.0f\n", (double)bytes / 1048576.0, (int)E,
               (int)L, tw, mb / tw, to * 1e3, tl, mb / tl, tr, (double)rbytes / 1e6 / tr);
        s += strcspn(s, ",");
        if (*s == ',')
            s++;
    }
    if (dir == tmpl) { /* ours: remove what the writer put there, then the folder */
        DIR *dh = opendir(dir);
        struct dirent *de;
        char path[512];
        while (dh && (de = readdir(dh))) {
            if (!strcmp(de->d_name, "config.json") || !strncmp(de->d_name, "model", 5)) {
                snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
                unlink(path);
            }
        }
        if (dh)
            closedir(dh);
        if (rmdir(dir) != 0)
            fprintf(stderr, "bench_model_io: could not remove %s\n", dir);
    }
    return 0;
}
