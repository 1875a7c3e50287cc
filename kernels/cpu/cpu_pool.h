/*
 * cpu_pool.h: private to kernels/cpu. A small fixed pool of worker threads for the fast CPU
 * backend: the calling thread hands out the items [0, n) of one job, takes part in it, and
 * returns when every item has run (a fork-join barrier per job).
 *
 * Threads: a pool belongs to one kern_ctx and is driven by the one thread that owns the
 * context (kern.h: a context belongs to one thread at a time); its workers only run items.
 *
 * Invariants: which thread runs which item is not deterministic, so an item must write only
 * its own outputs and compute them the same way whoever runs it (then the results are the same
 * bits for any thread count). Items cannot fail: they get all memory they need up front.
 */
#ifndef KERN_CPU_POOL_H
#define KERN_CPU_POOL_H

#include <stdint.h>

#include "engine/base/moe_base.h"

typedef struct cpu_pool cpu_pool;

/* fn(arg, item, worker): worker is in [0, cpu_pool_size) (0 = the calling thread), for
 * per-thread scratch. */
typedef void (*cpu_pool_fn)(void *arg, int64_t item, int32_t worker);

/* n_threads >= 1 threads in all, the caller included (n_threads - 1 are started). */
moe_status cpu_pool_init(cpu_pool **out, int32_t n_threads);
void cpu_pool_free(cpu_pool *p);
int32_t cpu_pool_size(const cpu_pool *p);
/* Runs fn for every item in [0, n_items); returns when all have run. */
void cpu_pool_run(cpu_pool *p, cpu_pool_fn fn, void *arg, int64_t n_items);

#endif /* KERN_CPU_POOL_H */
