/*
 * util.c: small helpers of engine/model: whole-file reads of small JSON files, path joins,
 * the terminal progress line, the compact printing of expert id lists, and the placement
 * report (each rank's experts and weight bytes).
 *
 * Threads: pure functions, except eng_progress_line_cb, which writes to the fd it was given and
 * keeps its state in the caller's struct (one struct per thread).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/model.h"
#include "engine/model/model_impl.h"

moe_status eng_read_file(const char *path, size_t limit, char **out, size_t *len) {
    MOE_REQUIRE(path && out && len, MOE_ERR_INVALID_ARG, "read_file: NULL argument");
    moe_status st = MOE_OK;
    char *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_fail(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: cannot open: %s", path,
                        moe_strerror_(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = moe_fail(MOE_ERR_IO, "%s: not a readable regular file", path);
        goto done;
    }
    if ((uint64_t)sb.st_size > limit) {
        st = moe_fail(MOE_ERR_LIMIT, "%s: %lld bytes, more than the %zu allowed for this file", path,
                      (long long)sb.st_size, limit);
        goto done;
    }
    size_t n = (size_t)sb.st_size, got = 0;
    buf = malloc(n + 1);
    if (!buf) {
        st = moe_fail(MOE_ERR_NOMEM, "%s: %zu bytes", path, n);
        goto done;
    }
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            st = moe_fail(MOE_ERR_IO, "%s: read: %s", path, moe_strerror_(errno));
            goto done;
        }
        if (r == 0)
            break; /* shrank while reading: parse what is there */
        got += (size_t)r;
    }
    buf[got] = '\0';
    *out = buf;
    *len = got;
    buf = NULL;
done:
    free(buf);
    close(fd);
    return st;
}

moe_status eng_path_join(char *buf, size_t cap, const char *dir, const char *name) {
    size_t dl = strlen(dir);
    bool slash = dl > 0 && dir[dl - 1] == '/';
    int n = snprintf(buf, cap, "%s%s%s", dir, slash || dl == 0 ? "" : "/", name);
    MOE_REQUIRE(n >= 0 && (size_t)n < cap, MOE_ERR_INVALID_ARG, "path too long: %s/%s", dir, name);
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Progress on a terminal.
 * ---------------------------------------------------------------------------------------- */
void eng_progress_line_init(eng_progress_line *p, int fd) {
    memset(p, 0, sizeof *p);
    p->fd = fd;
    p->is_tty = isatty(fd) == 1;
    p->t_start = moe_now_s();
    p->t_last = 0.0;
}

void eng_progress_line_cb(void *arg, const char *stage, uint64_t done, uint64_t total) {
    eng_progress_line *p = arg;
    if (!p || !p->is_tty)
        return;
    double now = moe_now_s();
    bool last = done >= total;
    if (!last && now - p->t_last < 0.1)
        return;
    p->t_last = now;
    double el = now - p->t_start;
    double mib = 1024.0 * 1024.0;
    double pct = total ? 100.0 * (double)done / (double)total : 100.0;
    double rate = el > 0 ? (double)done / mib / el : 0.0;
    char line[160];
    int n = snprintf(line, sizeof line, "\r%s: %5.1f%%  %.1f / %.1f MiB  %.0f MiB/s  %.1fs%s", stage ? stage : "", pct,
                     (double)done / mib, (double)total / mib, rate, el, last ? "\n" : "\033[K");
    if (n > 0) {
        ssize_t w = write(p->fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w; /* a progress line that cannot be written is not an error */
    }
}

/* ------------------------------------------------------------------------------------------
 * Placement report.
 * ---------------------------------------------------------------------------------------- */
const char *eng_model_ids_str(const int32_t *ids, int32_t n, char *buf, size_t cap) {
    if (!cap)
        return buf;
    buf[0] = '\0';
    size_t used = 0;
    for (int32_t i = 0; i < n;) {
        int32_t j = i;
        while (j + 1 < n && ids[j + 1] == ids[j] + 1)
            j++;
        char item[32];
        if (j > i)
            snprintf(item, sizeof item, "%s%d-%d", i ? "," : "", (int)ids[i], (int)ids[j]);
        else
            snprintf(item, sizeof item, "%s%d", i ? "," : "", (int)ids[i]);
        size_t l = strlen(item);
        if (used + l + 4 >= cap) { /* keep room for "..." */
            if (used + 4 <= cap) {
                memcpy(buf + used, "...", 4);
            }
            return buf;
        }
        memcpy(buf + used, item, l + 1);
        used += l;
        i = j + 1;
    }
    return buf;
}

uint64_t eng_model_rank_bytes(const eng_model_desc *d, int32_t n_local, int32_t n_layers, bool router, bool shared,
                              moe_dtype dt) {
    uint64_t es = moe_dtype_size(dt);
    uint64_t H = (uint64_t)d->hidden_size, I = (uint64_t)d->moe_intermediate, E = (uint64_t)d->n_experts;
    uint64_t per_layer = (uint64_t)n_local * 3u * H * I * es;
    if (router) {
        per_layer += E * H * 4u;
        if (d->has_correction_bias)
            per_layer += E * 4u;
    }
    if (shared && d->shared_intermediate > 0) {
        per_layer += 3u * H * (uint64_t)d->shared_intermediate * es;
        if (d->has_shared_gate)
            per_layer += H * es;
    }
    return per_layer * (uint64_t)n_layers;
}

void eng_model_log_placement(const eng_model_desc *d, const par_placement *pl, int32_t n_layers, bool router,
                             bool shared, moe_dtype dt) {
    if (!moe_log_enabled(MOE_LOG_INFO, MOE_SUB_ENG))
        return;
    uint64_t total = 0;
    for (int32_t r = 0; r < pl->world_size; r++)
        total += eng_model_rank_bytes(d, pl->n_local[r], n_layers, router, shared, dt);
    MOE_INFO(MOE_SUB_ENG, "placement: %s, %d experts over %d ranks, %d MoE layers, %s, %.1f MiB in all",
             par_place_policy_name(pl->policy), (int)pl->n_experts, (int)pl->world_size, (int)n_layers,
             moe_dtype_name(dt), (double)total / (1024.0 * 1024.0));
    for (int32_t r = 0; r < pl->world_size; r++) {
        char ids[200];
        uint64_t b = eng_model_rank_bytes(d, pl->n_local[r], n_layers, router, shared, dt);
        MOE_INFO(MOE_SUB_ENG, "  rank %d: %d experts [%s], %.1f MiB (%" PRIu64 " bytes)", (int)r, (int)pl->n_local[r],
                 eng_model_ids_str(pl->experts[r], pl->n_local[r], ids, sizeof ids), (double)b / (1024.0 * 1024.0), b);
    }
}
