/*
 * safetensors.c: the safetensors reader. The header is untrusted input: it is validated
 * completely (length, JSON, every entry, ranges, overlaps) before anything uses it, and every
 * error names the file and the entry. Data is reached through a read-only mapping of the
 * file, and only the byte ranges of the tensors asked for are touched (pages of other
 * tensors are never faulted in).
 *
 * Threads: an eng_st_file belongs to one thread at a time. cJSON keeps the position of its
 * last parse error in a global (cJSON_GetErrorPtr); we never read that global (the position
 * comes back through cJSON_ParseWithLengthOpts), so concurrent parses only race on a value
 * nobody reads.
 *
 * Invariants: a parsed header's entries satisfy data_start <= offset, offset + nbytes <=
 * file_size, nbytes == numel x bits / 8, and no two non-empty ranges overlap; entries are
 * sorted by name and names are unique.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "engine/model/model.h"
#include "engine/model/model_impl.h"

static const struct {
    const char *name;
    int bits;
} st_dtypes[ENG_ST_DTYPE_COUNT_] = {
    [ENG_ST_BOOL] = {"BOOL", 8},       [ENG_ST_U8] = {"U8", 8},           [ENG_ST_I8] = {"I8", 8},
    [ENG_ST_I16] = {"I16", 16},        [ENG_ST_U16] = {"U16", 16},        [ENG_ST_I32] = {"I32", 32},
    [ENG_ST_U32] = {"U32", 32},        [ENG_ST_I64] = {"I64", 64},        [ENG_ST_U64] = {"U64", 64},
    [ENG_ST_F16] = {"F16", 16},        [ENG_ST_BF16] = {"BF16", 16},      [ENG_ST_F32] = {"F32", 32},
    [ENG_ST_F64] = {"F64", 64},        [ENG_ST_C64] = {"C64", 64},        [ENG_ST_F8_E4M3] = {"F8_E4M3", 8},
    [ENG_ST_F8_E5M2] = {"F8_E5M2", 8}, [ENG_ST_F8_E8M0] = {"F8_E8M0", 8}, [ENG_ST_F6_E2M3] = {"F6_E2M3", 6},
    [ENG_ST_F6_E3M2] = {"F6_E3M2", 6}, [ENG_ST_F4] = {"F4", 4},
};

const char *eng_st_dtype_name(eng_st_dtype t) {
    return (int)t >= 0 && t < ENG_ST_DTYPE_COUNT_ ? st_dtypes[t].name : "invalid";
}

int eng_st_dtype_bits(eng_st_dtype t) { return (int)t >= 0 && t < ENG_ST_DTYPE_COUNT_ ? st_dtypes[t].bits : 0; }

bool eng_st_dtype_to_moe(eng_st_dtype t, moe_dtype *out) {
    switch (t) {
    case ENG_ST_BF16:
        *out = MOE_DTYPE_BF16;
        return true;
    case ENG_ST_F16:
        *out = MOE_DTYPE_F16;
        return true;
    case ENG_ST_F32:
        *out = MOE_DTYPE_F32;
        return true;
    default:
        return false;
    }
}

static bool parse_st_dtype(const char *s, eng_st_dtype *out) {
    for (int i = 0; i < ENG_ST_DTYPE_COUNT_; i++) {
        if (strcmp(s, st_dtypes[i].name) == 0) {
            *out = (eng_st_dtype)i;
            return true;
        }
    }
    return false;
}

const char *eng_sanitize(const char *s, char *buf, size_t cap) {
    /* Names come from files: keep messages one printable line, and short. */
    if (!cap)
        return "";
    size_t j = 0, lim = cap - 1;
    bool cut = false;
    for (size_t i = 0; s && s[i]; i++) {
        if (j >= lim) {
            cut = true;
            break;
        }
        unsigned char c = (unsigned char)s[i];
        buf[j++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (cut && lim >= 3)
        memcpy(buf + lim - 3, "...", 3);
    buf[j] = '\0';
    return buf;
}

const char *eng_st_tensor_desc(const eng_st_tensor *t, char *buf, size_t cap) {
    size_t n = 0;
    n += (size_t)snprintf(buf + n, n < cap ? cap - n : 0, "%s[", eng_st_dtype_name(t->dtype));
    for (int32_t i = 0; i < t->ndim; i++)
        n += (size_t)snprintf(buf + n, n < cap ? cap - n : 0, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    snprintf(buf + n, n < cap ? cap - n : 0, "]");
    return buf;
}

/* ------------------------------------------------------------------------------------------
 * Header parsing.
 * ---------------------------------------------------------------------------------------- */
static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* A JSON number that is an integer in [0, 2^53] (exact in a double). */
static bool json_u53(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j))
        return false;
    double d = j->valuedouble;
    if (!(d >= 0.0 && d <= 9007199254740992.0))
        return false;
    uint64_t v = (uint64_t)d;
    if ((double)v != d)
        return false;
    *out = v;
    return true;
}

static bool is_json_space(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int cmp_by_name(const void *a, const void *b) {
    return strcmp(((const eng_st_tensor *)a)->name, ((const eng_st_tensor *)b)->name);
}

typedef struct range_ref {
    uint64_t begin, end;
    int32_t idx;
} range_ref;

static int cmp_by_begin(const void *a, const void *b) {
    const range_ref *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

/* Validates one entry into t (name not yet set). */
static moe_status parse_entry(const cJSON *e, const char *what, const char *sname, uint64_t data_len,
                              eng_st_tensor *t) {
    if (!cJSON_IsObject(e))
        return moe_fail(MOE_ERR_FORMAT, "%s: header entry '%s' is not an object", what, sname);
    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(jd))
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': missing or non-string \"dtype\"", what, sname);
    if (!parse_st_dtype(jd->valuestring, &t->dtype)) {
        char b[40];
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", what, sname,
                        eng_sanitize(jd->valuestring, b, sizeof b));
    }
    if (!cJSON_IsArray(js))
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': missing or non-array \"shape\"", what, sname);
    int nd = cJSON_GetArraySize(js);
    if (nd > ENG_ST_MAX_DIMS)
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': %d dimensions, more than the %d supported", what, sname, nd,
                        ENG_ST_MAX_DIMS);
    t->ndim = nd;
    uint64_t numel = 1;
    bool overflow = false;
    int i = 0;
    for (const cJSON *d = js->child; d; d = d->next, i++) {
        uint64_t v;
        if (!json_u53(d, &v))
            return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer", what, sname, i);
        t->shape[i] = (int64_t)v;
        if (!overflow && __builtin_mul_overflow(numel, v, &numel))
            overflow = true;
    }
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2)
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': \"data_offsets\" must be an array [begin, end]", what, sname);
    uint64_t begin, end;
    if (!json_u53(jo->child, &begin) || !json_u53(jo->child->next, &end))
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets are not non-negative integers", what, sname);
    if (begin > end)
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] has begin > end", what, sname,
                        (unsigned long long)begin, (unsigned long long)end);
    if (end > data_len)
        return moe_fail(MOE_ERR_FORMAT,
                        "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data (%llu bytes; file "
                        "truncated?)",
                        what, sname, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_len);
    uint64_t bits;
    if (overflow || __builtin_mul_overflow(numel, (uint64_t)eng_st_dtype_bits(t->dtype), &bits))
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': shape too large", what, sname);
    if (bits % 8 != 0)
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': %llu elements of %s do not fill whole bytes", what, sname,
                        (unsigned long long)numel, eng_st_dtype_name(t->dtype));
    if (bits / 8 != end - begin) {
        char b[160];
        return moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s': %s needs %llu bytes but data_offsets [%llu, %llu] hold %llu",
                        what, sname, eng_st_tensor_desc(t, b, sizeof b), (unsigned long long)(bits / 8),
                        (unsigned long long)begin, (unsigned long long)end, (unsigned long long)(end - begin));
    }
    t->offset = begin; /* relative until the caller adds data_start */
    t->nbytes = end - begin;
    return MOE_OK;
}

moe_status eng_st_header_parse(const uint8_t *buf, size_t len, uint64_t file_size, const char *what,
                               eng_st_header *out) {
    MOE_REQUIRE(buf || len == 0, MOE_ERR_INVALID_ARG, "st_header_parse: NULL buffer");
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "st_header_parse: NULL out");
    if (!what)
        what = "safetensors";
    if (file_size < 8 || len < 8)
        return moe_fail(MOE_ERR_FORMAT, "%s: %llu bytes, too short for a safetensors file (8-byte header length)", what,
                        (unsigned long long)(file_size < len ? file_size : len));
    uint64_t n = le64(buf);
    if (n > ENG_ST_MAX_HEADER)
        return moe_fail(MOE_ERR_FORMAT,
                        "%s: header length %llu exceeds the limit of %u bytes (not a safetensors file?)", what,
                        (unsigned long long)n, ENG_ST_MAX_HEADER);
    if (n > file_size - 8)
        return moe_fail(MOE_ERR_FORMAT, "%s: header length %llu runs past the end of the file (%llu bytes)", what,
                        (unsigned long long)n, (unsigned long long)file_size);
    if (len - 8 < n)
        return moe_fail(MOE_ERR_INVALID_ARG, "%s: st_header_parse needs %llu bytes, was given %zu", what,
                        (unsigned long long)(n + 8), len);
    if (n < 2 || buf[8] != '{')
        return moe_fail(MOE_ERR_FORMAT, "%s: the header does not start with a JSON object '{'", what);

    moe_status st = MOE_OK;
    const char *json = (const char *)buf + 8;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)n, &end, 0);
    eng_st_tensor *ts = NULL;
    char *names = NULL;
    range_ref *rr = NULL;
    char sb[96], sb2[96];
    if (!root) {
        size_t pos = end ? (size_t)(end - json) : 0;
        char ctx[24];
        size_t k = 0;
        for (size_t i = pos; i < n && k < sizeof ctx - 1; i++)
            ctx[k++] = json[i];
        ctx[k] = '\0';
        st = moe_fail(MOE_ERR_FORMAT, "%s: the header is not valid JSON (at byte %zu of %llu: '%s')", what, pos,
                      (unsigned long long)n, eng_sanitize(ctx, sb, sizeof sb));
        goto done;
    }
    for (size_t i = (size_t)(end - json); i < n; i++) {
        if (!is_json_space((uint8_t)json[i])) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: trailing bytes after the header's JSON object (at byte %zu of %llu)",
                          what, i, (unsigned long long)n);
            goto done;
        }
    }
    if (!cJSON_IsObject(root)) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: the header is not a JSON object", what);
        goto done;
    }

    size_t count = 0, name_bytes = 0;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!e->string) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: header entry without a name", what);
            goto done;
        }
        if (strcmp(e->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(e)) {
                st = moe_fail(MOE_ERR_FORMAT, "%s: \"__metadata__\" is not an object", what);
                goto done;
            }
            for (const cJSON *m = e->child; m; m = m->next) {
                if (!cJSON_IsString(m)) {
                    st = moe_fail(MOE_ERR_FORMAT, "%s: \"__metadata__\" value '%s' is not a string", what,
                                  eng_sanitize(m->string, sb, sizeof sb));
                    goto done;
                }
            }
            continue;
        }
        if (!e->string[0]) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: a tensor with an empty name", what);
            goto done;
        }
        count++;
        name_bytes += strlen(e->string) + 1;
    }
    if (count > INT32_MAX) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: too many tensors", what);
        goto done;
    }
    ts = calloc(count ? count : 1, sizeof *ts);
    names = malloc(name_bytes ? name_bytes : 1);
    rr = malloc((count ? count : 1) * sizeof *rr);
    if (!ts || !names || !rr) {
        st = moe_fail(MOE_ERR_NOMEM, "%s: header of %zu tensors", what, count);
        goto done;
    }
    uint64_t data_start = 8 + n, data_len = file_size - data_start;
    size_t i = 0, np = 0;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0)
            continue;
        eng_sanitize(e->string, sb, sizeof sb);
        MOE_CHECK_GOTO(parse_entry(e, what, sb, data_len, &ts[i]), st, done);
        size_t l = strlen(e->string) + 1;
        memcpy(names + np, e->string, l);
        ts[i].name = names + np;
        np += l;
        rr[i].begin = ts[i].offset;
        rr[i].end = ts[i].offset + ts[i].nbytes;
        rr[i].idx = (int32_t)i;
        ts[i].offset += data_start;
        i++;
    }
    /* Overlaps: sorted by begin, every non-empty range must start at or after the furthest
     * end seen so far. Empty ranges hold no bytes and overlap nothing. */
    qsort(rr, count, sizeof *rr, cmp_by_begin);
    uint64_t far = 0;
    int32_t far_idx = -1;
    for (size_t k = 0; k < count; k++) {
        if (rr[k].begin == rr[k].end)
            continue;
        if (far_idx >= 0 && rr[k].begin < far) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap (bytes [%llu, %llu) and [%llu, %llu))",
                          what, eng_sanitize(ts[far_idx].name, sb, sizeof sb),
                          eng_sanitize(ts[rr[k].idx].name, sb2, sizeof sb2),
                          (unsigned long long)(ts[far_idx].offset - data_start),
                          (unsigned long long)(ts[far_idx].offset - data_start + ts[far_idx].nbytes),
                          (unsigned long long)rr[k].begin, (unsigned long long)rr[k].end);
            goto done;
        }
        if (rr[k].end > far || far_idx < 0) {
            far = rr[k].end;
            far_idx = rr[k].idx;
        }
    }
    /* Names must be unique (a JSON object may repeat a key; cJSON keeps both). Sorting
     * moves entries, so names[] stays valid (pointers into it). */
    qsort(ts, count, sizeof *ts, cmp_by_name);
    for (size_t k = 1; k < count; k++) {
        if (strcmp(ts[k - 1].name, ts[k].name) == 0) {
            st = moe_fail(MOE_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", what,
                          eng_sanitize(ts[k].name, sb, sizeof sb));
            goto done;
        }
    }
    memset(out, 0, sizeof *out);
    out->header_len = n;
    out->data_start = data_start;
    out->file_size = file_size;
    out->n_tensors = (int32_t)count;
    out->tensors = ts;
    out->names = names;
    ts = NULL;
    names = NULL;
done:
    cJSON_Delete(root);
    free(ts);
    free(names);
    free(rr);
    return st;
}

void eng_st_header_free(eng_st_header *h) {
    if (!h)
        return;
    free(h->tensors);
    free(h->names);
    memset(h, 0, sizeof *h);
}

const eng_st_tensor *eng_st_header_find(const eng_st_header *h, const char *name) {
    if (!h || !name || h->n_tensors == 0)
        return NULL;
    eng_st_tensor key;
    memset(&key, 0, sizeof key);
    key.name = name;
    return bsearch(&key, h->tensors, (size_t)h->n_tensors, sizeof key, cmp_by_name);
}

/* ------------------------------------------------------------------------------------------
 * Files.
 * ---------------------------------------------------------------------------------------- */
static moe_status pread_all(int fd, void *buf, size_t n, uint64_t off, const char *path) {
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return moe_fail(MOE_ERR_IO, "%s: read at offset %llu: %s", path, (unsigned long long)off,
                            moe_strerror_(errno));
        }
        if (r == 0)
            return moe_fail(MOE_ERR_IO, "%s: unexpected end of file at offset %llu (truncated while reading?)", path,
                            (unsigned long long)off);
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return MOE_OK;
}

moe_status eng_st_file_open(eng_st_file *f, const char *path) {
    MOE_REQUIRE(f && path, MOE_ERR_INVALID_ARG, "st_file_open: NULL argument");
    memset(f, 0, sizeof *f);
    f->fd = -1;
    moe_status st = MOE_OK;
    uint8_t *hbuf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_fail(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: cannot open: %s", path,
                        moe_strerror_(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = moe_fail(MOE_ERR_IO, "%s: stat: %s", path, moe_strerror_(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = moe_fail(MOE_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    uint64_t size = (uint64_t)sb.st_size;
    if (size < 8) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: %llu bytes, too short for a safetensors file (8-byte header length)", path,
                      (unsigned long long)size);
        goto fail;
    }
    uint8_t lenbuf[8];
    MOE_CHECK_GOTO(pread_all(fd, lenbuf, 8, 0, path), st, fail);
    uint64_t n = le64(lenbuf);
    if (n > ENG_ST_MAX_HEADER || n > size - 8) {
        /* let the parser word the error from the 8 bytes alone */
        st = eng_st_header_parse(lenbuf, 8, size, path, &f->hdr);
        if (st == MOE_OK) /* cannot happen: n does not fit */
            st = moe_fail(MOE_ERR_INTERNAL, "%s: header length check", path);
        goto fail;
    }
    hbuf = malloc((size_t)n + 8);
    if (!hbuf) {
        st = moe_fail(MOE_ERR_NOMEM, "%s: header of %llu bytes", path, (unsigned long long)n);
        goto fail;
    }
    memcpy(hbuf, lenbuf, 8);
    MOE_CHECK_GOTO(pread_all(fd, hbuf + 8, (size_t)n, 8, path), st, fail);
    MOE_CHECK_GOTO(eng_st_header_parse(hbuf, (size_t)n + 8, size, path, &f->hdr), st, fail);
    free(hbuf);
    f->path = strdup(path);
    if (!f->path) {
        eng_st_header_free(&f->hdr);
        st = moe_fail(MOE_ERR_NOMEM, "st_file_open");
        goto fail;
    }
    f->fd = fd;
    return MOE_OK;
fail:
    free(hbuf);
    close(fd);
    memset(f, 0, sizeof *f);
    f->fd = -1;
    return st;
}

moe_status eng_st_file_map(eng_st_file *f) {
    MOE_REQUIRE(f && f->fd >= 0, MOE_ERR_INVALID_ARG, "st_file_map: file not open");
    if (f->map)
        return MOE_OK;
    struct stat sb;
    if (fstat(f->fd, &sb) != 0)
        return moe_fail(MOE_ERR_IO, "%s: stat: %s", f->path, moe_strerror_(errno));
    /* A file that shrank since its header was read would fault (SIGBUS) on access. */
    if ((uint64_t)sb.st_size != f->hdr.file_size)
        return moe_fail(MOE_ERR_IO, "%s: the file changed size since it was opened (%llu -> %llu bytes)", f->path,
                        (unsigned long long)f->hdr.file_size, (unsigned long long)sb.st_size);
    void *p = mmap(NULL, (size_t)f->hdr.file_size, PROT_READ, MAP_PRIVATE, f->fd, 0);
    if (p == MAP_FAILED)
        return moe_fail(MOE_ERR_SYSTEM, "%s: mmap of %llu bytes: %s", f->path, (unsigned long long)f->hdr.file_size,
                        moe_strerror_(errno));
    f->map = p;
    f->map_len = (size_t)f->hdr.file_size;
    return MOE_OK;
}

void eng_st_file_unmap(eng_st_file *f) {
    if (f && f->map) {
        munmap((void *)f->map, f->map_len);
        f->map = NULL;
        f->map_len = 0;
    }
}

void eng_st_file_close(eng_st_file *f) {
    if (!f)
        return;
    eng_st_file_unmap(f);
    if (f->fd > 0 || (f->fd == 0 && f->path))
        close(f->fd);
    eng_st_header_free(&f->hdr);
    free(f->path);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

moe_status eng_st_file_read(eng_st_file *f, const eng_st_tensor *t, moe_dtype dst_dt, void *dst) {
    MOE_REQUIRE(f && t, MOE_ERR_INVALID_ARG, "st_file_read: NULL argument");
    int bits = eng_st_dtype_bits(t->dtype);
    return eng_st_file_read_part(f, t, 0, bits ? t->nbytes * 8 / (uint64_t)bits : 0, dst_dt, dst);
}

moe_status eng_st_file_read_part(eng_st_file *f, const eng_st_tensor *t, uint64_t first, uint64_t n, moe_dtype dst_dt,
                                 void *dst) {
    MOE_REQUIRE(f && t && (dst || n == 0), MOE_ERR_INVALID_ARG, "st_file_read: NULL argument");
    moe_dtype src_dt;
    char sb[96];
    if (!eng_st_dtype_to_moe(t->dtype, &src_dt))
        return moe_fail(MOE_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s: not supported yet (BF16, F16, F32)",
                        f->path, eng_sanitize(t->name, sb, sizeof sb), eng_st_dtype_name(t->dtype));
    MOE_REQUIRE(moe_dtype_is_float(dst_dt), MOE_ERR_INVALID_ARG, "st_file_read: destination dtype %s",
                moe_dtype_name(dst_dt));
    size_t es = moe_dtype_size(src_dt);
    uint64_t numel = t->nbytes / es;
    MOE_REQUIRE(first <= numel && n <= numel - first, MOE_ERR_INVALID_ARG,
                "%s: tensor '%s': elements [%llu, %llu) are outside its %llu", f->path,
                eng_sanitize(t->name, sb, sizeof sb), (unsigned long long)first, (unsigned long long)(first + n),
                (unsigned long long)numel);
    MOE_CHECK(eng_st_file_map(f));
    MOE_ASSERT(t->offset >= f->hdr.data_start && t->offset <= f->map_len && t->nbytes <= f->map_len - t->offset);
    const uint8_t *src = f->map + t->offset + first * es;
    if (src_dt == dst_dt) {
        memcpy(dst, src, (size_t)(n * es));
        return MOE_OK;
    }
    /* Convert through an aligned fp32 chunk: the mapped source may be at any byte offset (the
     * format does not align data), so it is copied before being read as 16/32-bit words. */
    enum { CHUNK = 4096 };
    _Alignas(64) float fbuf[CHUNK];
    _Alignas(64) uint8_t raw[CHUNK * 4];
    size_t ds = moe_dtype_size(dst_dt);
    for (size_t i = 0; i < (size_t)n; i += CHUNK) {
        size_t c = (size_t)n - i < CHUNK ? (size_t)n - i : CHUNK;
        memcpy(raw, src + i * es, c * es);
        moe_to_f32(src_dt, raw, fbuf, c);
        moe_from_f32(dst_dt, fbuf, (uint8_t *)dst + i * ds, c);
    }
    return MOE_OK;
}
