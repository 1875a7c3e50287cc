/*
 * par.h: the public face of parallel/: ranks, expert placement, the communicator interface
 * (a host backend for CPU workers, an NCCL backend for GPU workers), and the plans of
 * dispatch (which rows of a step go to which rank) and combine (summing per-slot
 * contributions in the fixed slot order of kern.h, so that results do not depend on the world
 * size or the placement).
 *
 * Threads: a placement is immutable after init and may be shared. A communicator belongs to
 * one thread (the worker's step loop).
 */
#ifndef PAR_PAR_H
#define PAR_PAR_H

#include "engine/base/moe_base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------
 * Expert placement: which rank holds which global experts (the same for every MoE layer).
 * ---------------------------------------------------------------------------------------- */
typedef enum par_place_policy {
    PAR_PLACE_CONTIGUOUS = 0, /* rank r holds a contiguous block; the first E % W ranks one more */
    PAR_PLACE_ROUND_ROBIN = 1 /* expert e on rank e % W */
} par_place_policy;

const char *par_place_policy_name(par_place_policy p);
moe_status par_place_policy_parse(const char *s, par_place_policy *out);

typedef struct par_placement {
    int32_t n_experts;   /* E */
    int32_t world_size;  /* W */
    par_place_policy policy;
    int32_t *owner;      /* [E]: rank holding expert e */
    int32_t *local_slot; /* [E]: slot of expert e on its owner */
    int32_t *n_local;    /* [W]: experts per rank */
    int32_t **experts;   /* [W][n_local[r]]: the global ids of rank r, ascending slot order */
} par_placement;

/* 1 <= W <= E is required (every rank holds at least one expert). */
moe_status par_placement_init(par_placement *pl, int32_t n_experts, int32_t world_size, par_place_policy policy);
void par_placement_free(par_placement *pl);
/* The expert map of rank r for kern_experts_params: map[e] = local slot or -1; [E] int32. */
moe_status par_placement_expert_map(const par_placement *pl, int32_t rank, int32_t *map);

#ifdef __cplusplus
}
#endif
#endif /* PAR_PAR_H */
