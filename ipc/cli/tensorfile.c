/*
 * tensorfile.c: .npy and safetensors for the moe-client CLI (tensorfile.h). Every size and
 * offset is checked before it is used; errors name the file and what was wrong.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "ipc/cli/tensorfile.h"

moe_status tf_read_file(const char *path, uint64_t max, uint8_t **out, size_t *len) {
    moe_status st = MOE_OK;
    uint8_t *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_fail(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: %s", path, moe_strerror_(errno));
    struct stat sb;
    MOE_SYS_CHECK_GOTO(fstat(fd, &sb), st, done);
    if (!S_ISREG(sb.st_mode) || (uint64_t)sb.st_size > max) {
        st = moe_fail(MOE_ERR_LIMIT, "%s: not a regular file of at most %llu bytes", path, (unsigned long long)max);
        goto done;
    }
    buf = moe_alloc((size_t)sb.st_size);
    if (!buf) {
        st = moe_fail(MOE_ERR_NOMEM, "%s: %lld bytes", path, (long long)sb.st_size);
        goto done;
    }
    size_t got = 0;
    while (got < (size_t)sb.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)sb.st_size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            st = moe_fail(MOE_ERR_IO, "%s: read: %s", path, r < 0 ? moe_strerror_(errno) : "short file");
            goto done;
        }
        got += (size_t)r;
    }
    *out = buf;
    *len = got;
    buf = NULL;
done:
    moe_free(buf);
    close(fd);
    return st;
}

static moe_status write_all(const char *path, const void *const *parts, const size_t *lens, int n) {
    moe_status st = MOE_OK;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return moe_fail(MOE_ERR_IO, "%s: %s", tmp, moe_strerror_(errno));
    for (int i = 0; i < n; i++) {
        const uint8_t *p = parts[i];
        size_t left = lens[i];
        while (left) {
            ssize_t w = write(fd, p, left);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                st = moe_fail(MOE_ERR_IO, "%s: write: %s", tmp, moe_strerror_(errno));
                goto fail;
            }
            p += w;
            left -= (size_t)w;
        }
    }
    if (close(fd) != 0) {
        fd = -1;
        st = moe_fail(MOE_ERR_IO, "%s: close: %s", tmp, moe_strerror_(errno));
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) != 0) { /* the output appears whole or not at all */
        st = moe_fail(MOE_ERR_IO, "%s: rename: %s", path, moe_strerror_(errno));
        goto fail;
    }
    return MOE_OK;
fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return st;
}

static bool shape_nbytes(moe_dtype dt, int32_t ndim, const int64_t *shape, size_t *out) {
    size_t n = moe_dtype_size(dt);
    for (int32_t i = 0; i < ndim; i++)
        if (shape[i] < 0 || shape[i] > (int64_t)1 << 40 || !moe_mul_size(n, (size_t)shape[i], &n))
            return false;
    *out = n;
    return true;
}

/* ------------------------------------------------------------------------------------------
 * .npy
 * ---------------------------------------------------------------------------------------- */
typedef struct cursor {
    const char *p, *end;
} cursor;

static void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t'))
        c->p++;
}

static bool eat(cursor *c, char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return true;
    }
    return false;
}

/* A Python string literal in ' or " (no escapes are needed by any key or descr we accept). */
static bool parse_str(cursor *c, char *out, size_t cap) {
    skip_ws(c);
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
        return false;
    char q = *c->p++;
    size_t n = 0;
    while (c->p < c->end && *c->p != q) {
        if (*c->p == '\\' || n + 1 >= cap)
            return false;
        out[n++] = *c->p++;
    }
    if (c->p >= c->end)
        return false;
    c->p++;
    out[n] = '\0';
    return true;
}

static bool parse_word(cursor *c, const char *w) {
    skip_ws(c);
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) >= n && memcmp(c->p, w, n) == 0) {
        c->p += n;
        return true;
    }
    return false;
}

moe_status npy_parse(const void *bufv, size_t len, int u2_as, moe_tensor *out) {
    const uint8_t *buf = bufv;
    MOE_REQUIRE(len >= 10 && memcmp(buf, "\x93NUMPY", 6) == 0, MOE_ERR_FORMAT, "not a .npy file (magic)");
    uint8_t major = buf[6], minor = buf[7];
    MOE_REQUIRE((major == 1 || major == 2 || major == 3) && minor == 0, MOE_ERR_FORMAT,
                ".npy format version %u.%u is not supported (1.0, 2.0, 3.0)", major, minor);
    size_t hlen, hstart;
    if (major == 1) {
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8;
        hstart = 10;
    } else {
        MOE_REQUIRE(len >= 12, MOE_ERR_FORMAT, ".npy: truncated header");
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 | (size_t)buf[11] << 24;
        hstart = 12;
    }
    MOE_REQUIRE(hlen <= len - hstart && hlen <= 1u << 20, MOE_ERR_FORMAT, ".npy: header of %zu bytes runs past the file",
                hlen);
    const char *h = (const char *)buf + hstart;
    MOE_REQUIRE(hlen >= 1 && h[hlen - 1] == '\n', MOE_ERR_FORMAT, ".npy: the header does not end with a newline");
    cursor c = {h, h + hlen - 1};
    char descr[16] = "", key[32];
    int fortran = -1;
    int32_t ndim = -1;
    int64_t shape[MOE_MAX_DIMS] = {0};
    MOE_REQUIRE(eat(&c, '{'), MOE_ERR_FORMAT, ".npy: the header is not a dict");
    for (;;) {
        if (eat(&c, '}'))
            break;
        MOE_REQUIRE(parse_str(&c, key, sizeof key) && eat(&c, ':'), MOE_ERR_FORMAT, ".npy: malformed header key");
        if (strcmp(key, "descr") == 0 && !descr[0]) {
            MOE_REQUIRE(parse_str(&c, descr, sizeof descr), MOE_ERR_FORMAT, ".npy: malformed descr");
        } else if (strcmp(key, "fortran_order") == 0 && fortran < 0) {
            if (parse_word(&c, "False"))
                fortran = 0;
            else if (parse_word(&c, "True"))
                fortran = 1;
            else
                return moe_fail(MOE_ERR_FORMAT, ".npy: fortran_order is neither True nor False");
        } else if (strcmp(key, "shape") == 0 && ndim < 0) {
            MOE_REQUIRE(eat(&c, '('), MOE_ERR_FORMAT, ".npy: shape is not a tuple");
            ndim = 0;
            for (;;) {
                if (eat(&c, ')'))
                    break;
                skip_ws(&c);
                int64_t v = 0;
                int digits = 0;
                while (c.p < c.end && *c.p >= '0' && *c.p <= '9' && digits < 13) {
                    v = v * 10 + (*c.p++ - '0');
                    digits++;
                }
                MOE_REQUIRE(digits > 0 && digits < 13, MOE_ERR_FORMAT, ".npy: a shape entry is not a small integer");
                MOE_REQUIRE(ndim < MOE_MAX_DIMS, MOE_ERR_FORMAT, ".npy: rank over %d", MOE_MAX_DIMS);
                shape[ndim++] = v;
                if (eat(&c, ')'))
                    break;
                MOE_REQUIRE(eat(&c, ','), MOE_ERR_FORMAT, ".npy: malformed shape tuple");
            }
        } else {
            return moe_fail(MOE_ERR_FORMAT, ".npy: unexpected or repeated header key '%s'", key);
        }
        if (eat(&c, '}'))
            break;
        MOE_REQUIRE(eat(&c, ','), MOE_ERR_FORMAT, ".npy: malformed header (expected ',')");
    }
    skip_ws(&c);
    MOE_REQUIRE(c.p == c.end, MOE_ERR_FORMAT, ".npy: bytes after the header dict");
    MOE_REQUIRE(descr[0] && fortran >= 0 && ndim >= 0, MOE_ERR_FORMAT,
                ".npy: the header lacks descr, fortran_order or shape");
    MOE_REQUIRE(fortran == 0, MOE_ERR_UNSUPPORTED, ".npy: Fortran order is not supported (use np.ascontiguousarray)");
    moe_dtype dt;
    if (strcmp(descr, "<f4") == 0)
        dt = MOE_DTYPE_F32;
    else if (strcmp(descr, "<f2") == 0)
        dt = MOE_DTYPE_F16;
    else if (strcmp(descr, "<i4") == 0)
        dt = MOE_DTYPE_I32;
    else if (strcmp(descr, "<u2") == 0 && (u2_as == MOE_DTYPE_BF16 || u2_as == MOE_DTYPE_F16))
        dt = (moe_dtype)u2_as;
    else
        return moe_fail(MOE_ERR_UNSUPPORTED,
                        ".npy: dtype '%s' is not supported ('<f4', '<f2', '<i4', '<u2' for bf16 bit patterns)", descr);
    size_t nb;
    MOE_REQUIRE(shape_nbytes(dt, ndim, shape, &nb), MOE_ERR_FORMAT, ".npy: shape too large");
    size_t dstart = hstart + hlen;
    MOE_REQUIRE(len - dstart == nb, MOE_ERR_FORMAT, ".npy: %zu data bytes, the shape and dtype make %zu",
                len - dstart, nb);
    MOE_CHECK(moe_tensor_alloc(out, dt, ndim, shape));
    if (nb)
        memcpy(out->data, buf + dstart, nb);
    return MOE_OK;
}

moe_status npy_read(const char *path, int u2_as, moe_tensor *out) {
    uint8_t *buf;
    size_t len;
    MOE_CHECK(tf_read_file(path, TF_MAX_FILE_BYTES, &buf, &len));
    moe_status st = npy_parse(buf, len, u2_as, out);
    moe_free(buf);
    if (st != MOE_OK) {
        char why[512]; /* moe_fail must not format moe_errmsg()'s buffer into itself */
        snprintf(why, sizeof why, "%s", moe_errmsg());
        return moe_fail(st, "%s: %s", path, why);
    }
    return MOE_OK;
}

moe_status npy_write(const char *path, const moe_tensor *t) {
    static const char *descr[MOE_DTYPE_COUNT_] = {"<f4", "<f2", "<u2", "<i4"};
    MOE_REQUIRE(t && moe_dtype_valid((int)t->dtype) && t->ndim >= 0 && t->ndim <= MOE_MAX_DIMS, MOE_ERR_INVALID_ARG,
                "npy_write: bad tensor");
    char h[256];
    int n = snprintf(h, sizeof h, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr[t->dtype]);
    for (int32_t i = 0; i < t->ndim; i++)
        n += snprintf(h + n, sizeof h - (size_t)n, "%lld,%s", (long long)t->shape[i], i + 1 < t->ndim ? " " : "");
    n += snprintf(h + n, sizeof h - (size_t)n, "), }");
    size_t total = 10 + (size_t)n + 1;
    size_t pad = (64 - total % 64) % 64;
    uint8_t pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
    size_t hl = (size_t)n + pad + 1;
    pre[8] = (uint8_t)hl;
    pre[9] = (uint8_t)(hl >> 8);
    char hdr[256 + 64];
    memcpy(hdr, h, (size_t)n);
    memset(hdr + n, ' ', pad);
    hdr[(size_t)n + pad] = '\n';
    const void *parts[3] = {pre, hdr, t->data};
    size_t lens[3] = {10, hl, moe_tensor_nbytes(t)};
    return write_all(path, parts, lens, 3);
}

/* ------------------------------------------------------------------------------------------
 * safetensors
 * ---------------------------------------------------------------------------------------- */
struct st_file {
    uint8_t *buf;
    size_t len, data_off;
    cJSON *hdr;
};

static const char *st_dtype_name(moe_dtype t) {
    static const char *n[MOE_DTYPE_COUNT_] = {"F32", "F16", "BF16", "I32"};
    return moe_dtype_valid((int)t) ? n[t] : "?";
}

static bool st_dtype_parse(const char *s, moe_dtype *out) {
    for (int t = 0; t < MOE_DTYPE_COUNT_; t++)
        if (strcmp(s, st_dtype_name((moe_dtype)t)) == 0) {
            *out = (moe_dtype)t;
            return true;
        }
    return false;
}

/* Checks one entry and makes its view. */
static moe_status st_entry(const st_file *f, const cJSON *e, const char *name, moe_tensor *view) {
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    moe_dtype t;
    MOE_REQUIRE(cJSON_IsObject(e) && cJSON_IsString(dt) && cJSON_IsArray(sh) && cJSON_IsArray(of) &&
                    cJSON_GetArraySize(of) == 2,
                MOE_ERR_FORMAT, "safetensors: tensor '%.64s' lacks dtype, shape or data_offsets", name);
    MOE_REQUIRE(st_dtype_parse(dt->valuestring, &t), MOE_ERR_UNSUPPORTED,
                "safetensors: tensor '%.64s' has dtype %.16s (F32, F16, BF16, I32 supported)", name, dt->valuestring);
    int nd = cJSON_GetArraySize(sh);
    MOE_REQUIRE(nd <= MOE_MAX_DIMS, MOE_ERR_UNSUPPORTED, "safetensors: tensor '%.64s' has rank %d (most %d)", name, nd,
                MOE_MAX_DIMS);
    int64_t shape[MOE_MAX_DIMS];
    for (int i = 0; i < nd; i++) {
        const cJSON *d = cJSON_GetArrayItem(sh, i);
        MOE_REQUIRE(cJSON_IsNumber(d) && d->valuedouble >= 0 && d->valuedouble <= 1e12 &&
                        d->valuedouble == (double)(int64_t)d->valuedouble,
                    MOE_ERR_FORMAT, "safetensors: tensor '%.64s': bad dimension %d", name, i);
        shape[i] = (int64_t)d->valuedouble;
    }
    double b = cJSON_GetArrayItem(of, 0)->valuedouble, en = cJSON_GetArrayItem(of, 1)->valuedouble;
    size_t data_len = f->len - f->data_off, nb;
    MOE_REQUIRE(shape_nbytes(t, nd, shape, &nb), MOE_ERR_FORMAT, "safetensors: tensor '%.64s' too large", name);
    MOE_REQUIRE(cJSON_IsNumber(cJSON_GetArrayItem(of, 0)) && cJSON_IsNumber(cJSON_GetArrayItem(of, 1)) && b >= 0 &&
                    b <= en && en <= (double)data_len && b == (double)(size_t)b && en == (double)(size_t)en &&
                    (size_t)en - (size_t)b == nb,
                MOE_ERR_FORMAT, "safetensors: tensor '%.64s': data_offsets [%.0f, %.0f] do not hold %zu bytes in %zu",
                name, b, en, nb, data_len);
    *view = moe_tensor_view(f->buf + f->data_off + (size_t)b, t, nd, shape);
    return MOE_OK;
}

moe_status st_open(const char *path, st_file **out) {
    moe_status st = MOE_OK;
    st_file *f = calloc(1, sizeof *f);
    if (!f)
        return moe_fail(MOE_ERR_NOMEM, "st_open");
    MOE_CHECK_GOTO(tf_read_file(path, TF_MAX_FILE_BYTES, &f->buf, &f->len), st, fail);
    if (f->len < 8) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: too short for safetensors", path);
        goto fail;
    }
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = hl << 8 | f->buf[i];
    if (hl > f->len - 8 || hl > (100u << 20)) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: header length %llu runs past the file", path, (unsigned long long)hl);
        goto fail;
    }
    f->data_off = 8 + (size_t)hl;
    f->hdr = cJSON_ParseWithLength((const char *)f->buf + 8, (size_t)hl);
    if (!cJSON_IsObject(f->hdr)) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: the header is not a JSON object", path);
        goto fail;
    }
    for (const cJSON *e = f->hdr->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0)
            continue;
        moe_tensor v;
        st = st_entry(f, e, e->string, &v);
        if (st != MOE_OK) {
            char why[512];
            snprintf(why, sizeof why, "%s", moe_errmsg());
            st = moe_fail(st, "%s: %s", path, why);
            goto fail;
        }
    }
    *out = f;
    return MOE_OK;
fail:
    st_close(f);
    return st;
}

moe_status st_get(const st_file *f, const char *name, moe_tensor *view) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(f->hdr, name);
    if (!e || strcmp(name, "__metadata__") == 0)
        return moe_fail(MOE_ERR_NOT_FOUND, "safetensors: no tensor '%.64s'", name);
    return st_entry(f, e, name, view);
}

void st_close(st_file *f) {
    if (!f)
        return;
    cJSON_Delete(f->hdr);
    moe_free(f->buf);
    free(f);
}

moe_status st_write(const char *path, const char *const *names, const moe_tensor *const *ts, int n) {
    moe_status st = MOE_OK;
    MOE_REQUIRE(n >= 0 && n <= 16, MOE_ERR_INVALID_ARG, "st_write: at most 16 tensors");
    cJSON *h = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *e = cJSON_AddObjectToObject(h, names[i]);
        cJSON_AddStringToObject(e, "dtype", st_dtype_name(ts[i]->dtype));
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        for (int32_t d = 0; d < ts[i]->ndim; d++)
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)ts[i]->shape[d]));
        size_t nb = moe_tensor_nbytes(ts[i]);
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + nb)));
        off += nb;
    }
    char *js = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!js)
        return moe_fail(MOE_ERR_NOMEM, "st_write");
    size_t jl = strlen(js), pad = (8 - jl % 8) % 8; /* data 8-byte aligned, padded with spaces */
    char *hdr = malloc(jl + pad);
    memcpy(hdr, js, jl);
    memset(hdr + jl, ' ', pad);
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++)
        lenb[i] = (uint8_t)((uint64_t)(jl + pad) >> (8 * i));
    const void *parts[2 + 16];
    size_t lens[2 + 16];
    parts[0] = lenb;
    lens[0] = 8;
    parts[1] = hdr;
    lens[1] = jl + pad;
    for (int i = 0; i < n; i++) {
        parts[2 + i] = ts[i]->data;
        lens[2 + i] = moe_tensor_nbytes(ts[i]);
    }
    st = write_all(path, parts, lens, 2 + n);
    free(hdr);
    cJSON_free(js);
    return st;
}
