/*
 * tensorfile.h: the tensor files of the moe-client CLI: a strict .npy reader/writer and a
 * minimal safetensors reader/writer (internal to the CLI; the full checkpoint reader lives in
 * engine/model). Pure functions over whole files read into memory (bounded size); any thread.
 *
 * .npy: format versions 1.0 and 2.0 (3.0 too: same as 2.0 but a UTF-8 header), little-endian
 * only, C order only, rank 0..4, descr '<f4' (f32), '<f2' (f16), '<i4' (i32), and '<u2' for
 * 16-bit patterns that numpy has no type for: read as bf16 (or f16 when asked), the
 * convention of this project (`x.view(np.uint16)` of a bf16 tensor, or torch's
 * `t.view(torch.int16).numpy().view(np.uint16)`). Every header field is checked; the data
 * size must equal the file's remainder exactly. The writer writes version 1.0 with the
 * header padded to 64 bytes, bf16 as '<u2'.
 *
 * safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
 * data_offsets}, "__metadata__": {...}}, then the data. dtypes F32, F16, BF16, I32. Every
 * entry is checked (offsets inside the data, size = shape x dtype) when the file is opened.
 */
#ifndef IPC_CLI_TENSORFILE_H
#define IPC_CLI_TENSORFILE_H

#include "engine/base/moe_base.h"

#define TF_MAX_FILE_BYTES (4ull << 30)

/* Reads a .npy file into a fresh tensor (owned). u2_as: MOE_DTYPE_BF16 or MOE_DTYPE_F16 for
 * '<u2' data, or -1 to refuse it. */
moe_status npy_read(const char *path, int u2_as, moe_tensor *out);
/* The same from bytes in memory (copied). */
moe_status npy_parse(const void *buf, size_t len, int u2_as, moe_tensor *out);
moe_status npy_write(const char *path, const moe_tensor *t);

typedef struct st_file st_file;
moe_status st_open(const char *path, st_file **out);
/* A view into the file of the tensor `name`; MOE_ERR_NOT_FOUND when absent. */
moe_status st_get(const st_file *f, const char *name, moe_tensor *view);
void st_close(st_file *f);
/* Writes n named tensors. */
moe_status st_write(const char *path, const char *const *names, const moe_tensor *const *ts, int n);

/* Reads a whole file (at most max bytes) into a fresh allocation. */
moe_status tf_read_file(const char *path, uint64_t max, uint8_t **out, size_t *len);

#endif
