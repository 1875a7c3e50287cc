/*
 * test_ctl.c: the control rings (engine/ctl.h) against a reference queue.
 *   - random message sizes through a small ring (many wraps): every message comes out once, in
 *     order, with its bytes; a push that does not fit says so and writes nothing;
 *   - a ring sized by ctl_ring_bytes always takes its n largest messages at once, whatever the
 *     position of the cursor;
 *   - across processes (a forked consumer on a shared mapping): 20000 messages in order;
 *   - a corrupt length is an error, never a read out of the ring.
 */
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/ctl.h"

static uint32_t rnd(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

static void fill(uint8_t *p, uint32_t len, uint32_t seq) {
    for (uint32_t i = 0; i < len; i++)
        p[i] = (uint8_t)(seq * 31u + i * 7u);
}

static int same(const uint8_t *p, uint32_t len, uint32_t seq) {
    for (uint32_t i = 0; i < len; i++)
        if (p[i] != (uint8_t)(seq * 31u + i * 7u))
            return 0;
    return 1;
}

static void *map_rings(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    return p;
}

/* A shared mapping of `ranks` ranks' rings and rank r's two, its down ring reset; *bytes: the size. */
static uint8_t *rings_of(int32_t ranks, int32_t r, uint64_t down, uint64_t up, ctl_ring *d, ctl_ring *u,
                         size_t *bytes) {
    *bytes = ctl_map_bytes(ranks, down, up);
    uint8_t *base = map_rings(*bytes);
    ctl_rings(base, r, down, up, d, u);
    ctl_reset(d);
    return base;
}

static void test_random_against_reference(void **state) {
    (void)state;
    ctl_ring d, u;
    size_t bytes;
    uint8_t *base = rings_of(3, 2, 1024, 512, &d, &u, &bytes);
    assert_true((uint8_t *)u.data + u.cap <= base + bytes);
    uint64_t s = 7;
    uint32_t lens[4096];
    uint32_t pushed = 0, popped = 0, refused = 0;
    uint8_t buf[400];
    for (int step = 0; step < 200000; step++) {
        if (rnd(&s) % 2 == 0) {
            uint32_t len = rnd(&s) % 300;
            fill(buf, len, pushed);
            uint64_t head = atomic_load(&d.h->head);
            moe_status st = ctl_push(&d, buf, len);
            if (st == MOE_OK) {
                lens[pushed % 4096] = len;
                pushed++;
            } else {
                assert_int_equal(st, MOE_ERR_LIMIT);
                assert_true(atomic_load(&d.h->head) == head); /* nothing written */
                refused++;
            }
        } else {
            const uint8_t *m;
            uint32_t len;
            bool have;
            assert_int_equal(ctl_peek(&d, &m, &len, &have), MOE_OK);
            assert_int_equal(have, popped < pushed);
            if (have) {
                assert_int_equal(len, lens[popped % 4096]);
                assert_true(same(m, len, popped));
                ctl_pop(&d);
                popped++;
            }
        }
        assert_int_equal(ctl_empty(&d), popped == pushed);
    }
    fprintf(stderr, "ring of %llu bytes: %u messages through, %u refused while full\n", (unsigned long long)d.cap,
            pushed, refused);
    assert_true(pushed > 10000 && refused > 100);
    munmap(base, bytes);
}

static void test_sized_ring_always_fits(void **state) {
    (void)state;
    for (uint64_t n = 1; n <= 5; n++) {
        const uint64_t max_msg = 100 + 37 * n, cap = ctl_ring_bytes(n, max_msg);
        ctl_ring d, u;
        size_t bytes;
        uint8_t *base = rings_of(1, 0, cap, 64, &d, &u, &bytes);
        uint8_t buf[400];
        /* every starting offset (8-byte steps), then n messages of the largest size at once */
        for (uint64_t off = 0; off < cap; off += 8) {
            ctl_reset(&d);
            atomic_store(&d.h->head, off);
            atomic_store(&d.h->tail, off);
            for (uint64_t k = 0; k < n; k++) {
                fill(buf, (uint32_t)max_msg, (uint32_t)k);
                assert_int_equal(ctl_push(&d, buf, (uint32_t)max_msg), MOE_OK);
            }
            for (uint64_t k = 0; k < n; k++) {
                const uint8_t *m;
                uint32_t len;
                bool have;
                assert_int_equal(ctl_peek(&d, &m, &len, &have), MOE_OK);
                assert_true(have && len == max_msg && same(m, len, (uint32_t)k));
                ctl_pop(&d);
            }
            assert_true(ctl_empty(&d));
        }
        munmap(base, bytes);
    }
}

static void test_across_processes(void **state) {
    (void)state;
    ctl_ring d, u;
    size_t bytes;
    uint8_t *base = rings_of(1, 0, 4096, 64, &d, &u, &bytes);
    enum { N = 20000 };
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* the consumer */
        uint32_t got = 0;
        uint64_t s = 99;
        while (got < N) {
            const uint8_t *m;
            uint32_t len;
            bool have;
            if (ctl_peek(&d, &m, &len, &have) != MOE_OK)
                _exit(2);
            if (!have) {
                sched_yield(); /* the producer may share this core */
                continue;
            }
            uint32_t want = rnd(&s) % 1000;
            if (len != want || !same(m, len, got))
                _exit(3);
            ctl_pop(&d);
            got++;
        }
        _exit(0);
    }
    uint64_t s = 99;
    uint8_t buf[1000];
    for (uint32_t i = 0; i < N; i++) {
        uint32_t len = rnd(&s) % 1000;
        fill(buf, len, i);
        while (ctl_push(&d, buf, len) != MOE_OK)
            sched_yield(); /* full: the consumer frees room */
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    munmap(base, bytes);
}

static void test_corrupt_length(void **state) {
    (void)state;
    ctl_ring d, u;
    size_t bytes;
    uint8_t *base = rings_of(1, 0, 256, 64, &d, &u, &bytes);
    uint8_t buf[16] = {0};
    assert_int_equal(ctl_push(&d, buf, 16), MOE_OK);
    uint32_t bad = 1000; /* longer than what was published */
    memcpy(d.data, &bad, 4);
    const uint8_t *m;
    uint32_t len;
    bool have;
    assert_int_equal(ctl_peek(&d, &m, &len, &have), MOE_ERR_INTERNAL);
    assert_false(have);
    assert_non_null(strstr(moe_errmsg(), "corrupt"));
    assert_int_equal(ctl_push(&d, NULL, 5), MOE_ERR_INVALID_ARG);
    munmap(base, bytes);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_against_reference),
        cmocka_unit_test(test_sized_ring_always_fits),
        cmocka_unit_test(test_across_processes),
        cmocka_unit_test(test_corrupt_length),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
