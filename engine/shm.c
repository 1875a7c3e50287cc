/*
 * shm.c: the data path's layout and mapping (shm.h).
 */
#include "engine/shm.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static size_t align64(size_t v) { return (v + 63) & ~(size_t)63; }

size_t eng_shm_reply_size(const eng_shm_layout *l, int64_t n_tokens) {
    return ENG_SHM_REPLY_HEAD + (size_t)n_tokens * (size_t)l->hidden * moe_dtype_size(l->dtype);
}

moe_status eng_shm_layout_init(eng_shm_layout *l, int64_t max_tokens, int32_t hidden, int32_t n_experts,
                               int32_t top_k, moe_dtype dt, int32_t n_slots) {
    MOE_REQUIRE(l && max_tokens >= 1 && hidden >= 1 && n_experts >= 1 && top_k >= 1 && n_slots >= 1,
                MOE_ERR_INVALID_ARG, "shm layout: bad sizes");
    memset(l, 0, sizeof *l);
    l->max_tokens = max_tokens;
    l->hidden = hidden;
    l->n_experts = n_experts;
    l->top_k = top_k;
    l->dtype = dt;
    l->n_slots = n_slots;
    const size_t T = (size_t)max_tokens, es = moe_dtype_size(dt);
    size_t off = 0;
    l->x_off = off;
    off = align64(off + T * (size_t)hidden * es);
    l->ids_off = off;
    off = align64(off + T * (size_t)top_k * 4);
    l->w_off = off;
    off = align64(off + T * (size_t)top_k * 4);
    l->lg_off = off;
    off = align64(off + T * (size_t)n_experts * 4);
    l->out_off = off;
    /* every request has at least one token: at most T replies, each with its header and at most
     * 63 bytes of padding */
    l->out_bytes = T * (size_t)hidden * es + T * (ENG_SHM_REPLY_HEAD + 64);
    off = align64(off + l->out_bytes);
    l->slot_bytes = (off + 4095) & ~(size_t)4095;
    size_t total;
    MOE_REQUIRE(moe_mul_size(l->slot_bytes, (size_t)n_slots, &total) && total < ((size_t)1 << 42),
                MOE_ERR_LIMIT, "shm layout: %zu bytes a slot x %d slots is too much", l->slot_bytes, (int)n_slots);
    l->total_bytes = total;
    return MOE_OK;
}

moe_status eng_shm_create(eng_shm *s, size_t bytes) {
    MOE_REQUIRE(s && bytes > 0, MOE_ERR_INVALID_ARG, "shm: bad size");
    memset(s, 0, sizeof *s);
    s->fd = -1;
    int fd = memfd_create("moe-engine-data", 0); /* inherited by the workers as fd 3 */
    if (fd < 0)
        return moe_fail(MOE_ERR_SYSTEM, "memfd_create: %s", strerror(errno));
    if (ftruncate(fd, (off_t)bytes) != 0) {
        int e = errno;
        close(fd);
        return moe_fail(MOE_ERR_SYSTEM, "ftruncate of the data path to %zu bytes: %s", bytes, strerror(e));
    }
    moe_status st = eng_shm_map(s, fd, bytes);
    if (st != MOE_OK)
        close(fd);
    return st;
}

moe_status eng_shm_map(eng_shm *s, int fd, size_t bytes) {
    MOE_REQUIRE(s && fd >= 0 && bytes > 0, MOE_ERR_INVALID_ARG, "shm: bad mapping request");
    off_t size = lseek(fd, 0, SEEK_END);
    MOE_REQUIRE(size >= (off_t)bytes, MOE_ERR_INVALID_ARG, "shm: descriptor %d holds %lld bytes, expected %zu", fd,
                (long long)size, bytes);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return moe_fail(MOE_ERR_SYSTEM, "mmap of %zu bytes: %s", bytes, strerror(errno));
    s->fd = fd;
    s->base = p;
    s->bytes = bytes;
    return MOE_OK;
}

void eng_shm_unmap(eng_shm *s) {
    if (!s)
        return;
    if (s->base)
        munmap(s->base, s->bytes);
    if (s->fd >= 0)
        close(s->fd);
    s->base = NULL;
    s->fd = -1;
}
