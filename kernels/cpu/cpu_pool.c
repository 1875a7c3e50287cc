/*
 * cpu_pool.c: the fork-join worker pool of the fast CPU backend (see cpu_pool.h).
 *
 * Threads: the owner thread publishes a job (function, argument, item count) under the mutex
 * and bumps the generation; workers take items from one atomic counter until it runs past the
 * end, then report done. A worker spins briefly on the generation before sleeping on the
 * condition variable, because the backend runs several short jobs back to back (gather, gate/up,
 * down, sum) and a futex wake-up per job would cost more than the job at small sizes.
 *
 * Invariants: `active` counts the workers still inside the current job; the owner does not
 * publish the next job before it is 0, so a job's fields are stable while any worker reads them.
 */
#include "kernels/cpu/cpu_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define POOL_SPIN 4000 /* polls of the generation before a worker sleeps (~50-250 µs) */

struct cpu_pool {
    int32_t n;          /* threads in all, the owner included */
    pthread_t *threads; /* [n - 1] */
    int32_t started;
    pthread_mutex_t mu;
    pthread_cond_t cv_start;
    pthread_cond_t cv_done;
    atomic_uint_fast64_t gen; /* bumped per job (and on stop) */
    bool stop;
    cpu_pool_fn fn;
    void *arg;
    int64_t n_items;
    atomic_int_fast64_t next;
    int32_t active;
};

typedef struct worker_arg {
    cpu_pool *pool;
    int32_t index;
} worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_items(cpu_pool *p, cpu_pool_fn fn, void *arg, int64_t n, int32_t worker) {
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (i >= n)
            break;
        fn(arg, i, worker);
    }
}

static void *worker_main(void *varg) {
    worker_arg *wa = varg;
    cpu_pool *p = wa->pool;
    const int32_t index = wa->index;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        /* Spin a little, then sleep until the generation moves. */
        for (int i = 0; i < POOL_SPIN && atomic_load_explicit(&p->gen, memory_order_acquire) == seen; i++)
            cpu_relax();
        pthread_mutex_lock(&p->mu);
        while (!p->stop && atomic_load_explicit(&p->gen, memory_order_relaxed) == seen)
            pthread_cond_wait(&p->cv_start, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            break;
        }
        seen = atomic_load_explicit(&p->gen, memory_order_relaxed);
        cpu_pool_fn fn = p->fn;
        void *arg = p->arg;
        int64_t n = p->n_items;
        pthread_mutex_unlock(&p->mu);

        run_items(p, fn, arg, n, index);

        pthread_mutex_lock(&p->mu);
        if (--p->active == 0)
            pthread_cond_signal(&p->cv_done);
        pthread_mutex_unlock(&p->mu);
    }
    return NULL;
}

moe_status cpu_pool_init(cpu_pool **out, int32_t n_threads) {
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "cpu_pool_init: NULL out");
    MOE_REQUIRE(n_threads >= 1 && n_threads <= 1024, MOE_ERR_INVALID_ARG, "cpu pool: %d threads not in [1, 1024]",
                (int)n_threads);
    *out = NULL;
    moe_status st = MOE_OK;
    cpu_pool *p = calloc(1, sizeof *p);
    if (!p)
        return moe_fail(MOE_ERR_NOMEM, "cpu pool");
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_start, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->next, 0);
    if (n_threads > 1) {
        p->threads = calloc((size_t)(n_threads - 1), sizeof(pthread_t));
        if (!p->threads) {
            st = moe_fail(MOE_ERR_NOMEM, "cpu pool: %d threads", (int)n_threads);
            goto fail;
        }
    }
    for (int32_t i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) {
            st = moe_fail(MOE_ERR_NOMEM, "cpu pool: thread %d", (int)i);
            goto fail;
        }
        wa->pool = p;
        wa->index = i;
        int rc = pthread_create(&p->threads[i - 1], NULL, worker_main, wa);
        if (rc != 0) {
            free(wa);
            st = moe_fail(MOE_ERR_SYSTEM, "cpu pool: pthread_create of thread %d: %s", (int)i, moe_strerror_(rc));
            goto fail;
        }
        p->started++;
    }
    *out = p;
    return MOE_OK;
fail:
    cpu_pool_free(p);
    return st;
}

void cpu_pool_free(cpu_pool *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 0; i < p->started; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_start);
    pthread_cond_destroy(&p->cv_done);
    free(p);
}

int32_t cpu_pool_size(const cpu_pool *p) { return p->n; }

void cpu_pool_run(cpu_pool *p, cpu_pool_fn fn, void *arg, int64_t n_items) {
    if (n_items <= 0)
        return;
    if (p->n == 1 || n_items == 1) {
        for (int64_t i = 0; i < n_items; i++)
            fn(arg, i, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_items = n_items;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    p->active = p->n - 1;
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);

    run_items(p, fn, arg, n_items, 0);

    pthread_mutex_lock(&p->mu);
    while (p->active > 0)
        pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
