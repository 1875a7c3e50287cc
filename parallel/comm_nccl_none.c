/*
 * comm_nccl_none.c: the NCCL backend's entry points in a build without NCCL (the repository
 * rule found no nccl.h / libnccl): they say so.
 */
#include "parallel/par.h"

int par_comm_nccl_version(void) { return 0; }

moe_status par_comm_nccl_unique_id(uint8_t out[PAR_NCCL_ID_BYTES]) {
    (void)out;
    return moe_fail(MOE_ERR_UNSUPPORTED, "this build has no NCCL (set NCCL_PATH and rebuild)");
}

moe_status par_comm_nccl_init(par_comm_t **out, const par_comm_nccl_params *p) {
    (void)p;
    if (out)
        *out = NULL;
    return moe_fail(MOE_ERR_UNSUPPORTED, "this build has no NCCL (set NCCL_PATH and rebuild)");
}
