/*
 * model_impl.h: private to engine/model: small helpers shared by its files (message
 * sanitising, whole-file reads, the family tables). Not a public interface.
 */
#ifndef ENG_MODEL_MODEL_IMPL_H
#define ENG_MODEL_MODEL_IMPL_H

#include <stddef.h>

#include "engine/model/model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Copies s into buf with non-printable bytes as '?', truncated with "..." to cap - 1 chars:
 * names and values from files go into messages through it. Returns buf. */
const char *eng_sanitize(const char *s, char *buf, size_t cap);

/* Reads a whole (small) file into a NUL-terminated malloc'd buffer; refuses files over
 * `limit` bytes. Errors name the path. */
moe_status eng_read_file(const char *path, size_t limit, char **out, size_t *len);

/* Joins dir and name into buf ("dir/name"); MOE_ERR_INVALID_ARG when it does not fit. */
moe_status eng_path_join(char *buf, size_t cap, const char *dir, const char *name);

#ifdef __cplusplus
}
#endif
#endif /* ENG_MODEL_MODEL_IMPL_H */
