/*
 * st_check.c: see st_check.h. Pure; any thread.
 */
#include "tests/model/st_check.h"

#include <stdlib.h>
#include <string.h>

#include "engine/model/model.h"

const char *st_check_input(const uint8_t *data, size_t size) {
    eng_st_header h;
    moe_status st = eng_st_header_parse(data, size, size, "fuzz.safetensors", &h);
    if (st != MOE_OK) {
        /* a refusal must say why, and be a format error (the whole file was given) */
        if (st != MOE_ERR_FORMAT)
            return "refused with a status other than MOE_ERR_FORMAT";
        if (!moe_errmsg()[0])
            return "refused without a message";
        if (!strstr(moe_errmsg(), "fuzz.safetensors"))
            return "a message that does not name the file";
        return NULL;
    }
    const char *bad = NULL;
    if (h.data_start != 8 + h.header_len || h.data_start > size || h.file_size != size)
        bad = "header bounds";
    for (int32_t i = 0; !bad && i < h.n_tensors; i++) {
        const eng_st_tensor *t = &h.tensors[i];
        if (!t->name || !t->name[0])
            bad = "empty name";
        else if (i > 0 && strcmp(h.tensors[i - 1].name, t->name) >= 0)
            bad = "names not sorted and unique";
        else if (t->offset < h.data_start || t->offset > size || t->nbytes > size - t->offset)
            bad = "a tensor outside the file";
        else if ((int)t->dtype < 0 || t->dtype >= ENG_ST_DTYPE_COUNT_ || t->ndim < 0 || t->ndim > ENG_ST_MAX_DIMS)
            bad = "dtype or rank out of range";
        else if (eng_st_header_find(&h, t->name) != t)
            bad = "find does not return the entry";
        if (bad)
            break;
        unsigned __int128 bits = (unsigned __int128)eng_st_dtype_bits(t->dtype);
        for (int32_t k = 0; k < t->ndim; k++) {
            if (t->shape[k] < 0)
                bad = "negative dimension";
            bits *= (unsigned __int128)(uint64_t)t->shape[k];
        }
        if (!bad && (bits % 8 != 0 || bits / 8 != t->nbytes))
            bad = "shape x dtype size != byte length";
        char buf[200];
        eng_st_tensor_desc(t, buf, sizeof buf);
        if (!bad && t->nbytes > 0) {
            /* touch the first and last byte: inside the buffer (ASan checks it) */
            volatile uint8_t x = data[t->offset] ^ data[t->offset + t->nbytes - 1];
            (void)x;
        }
    }
    /* no two non-empty ranges overlap: O(n^2) is fine for fuzz-sized inputs */
    for (int32_t i = 0; !bad && i < h.n_tensors && h.n_tensors <= 4096; i++) {
        for (int32_t j = i + 1; j < h.n_tensors; j++) {
            const eng_st_tensor *a = &h.tensors[i], *b = &h.tensors[j];
            if (a->nbytes && b->nbytes && a->offset < b->offset + b->nbytes && b->offset < a->offset + a->nbytes) {
                bad = "overlapping tensors accepted";
                break;
            }
        }
    }
    eng_st_header_free(&h);
    return bad;
}
