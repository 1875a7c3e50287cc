/*
 * proto.c: wire protocol v1 (ipc_proto.h, docs/protocol.md): building, encoding, decoding and
 * validating messages. Pure functions, any thread, no global state; the only allocations are
 * ipc_encode_alloc's and ipc_msg_realign's, made after every size was checked.
 *
 * Layout (all little-endian, offsets in bytes):
 *   header     0 u32 magic "MOEW"   4 u16 version   6 u16 op   8 u32 flags
 *             12 u32 header_bytes (64 + 64 * n_sections)   16 u64 request_id
 *             24 u64 total_bytes   32 i32 status   36 i32 layer   40 u32 n_tokens
 *             44 u32 hidden   48 u32 top_k   52 u8 dtype   53 u8 n_sections
 *             54 u16 reserved (0)   56 u32 timeout_ms   60 u32 reserved (0)
 *   section    0 u16 kind   2 u8 dtype   3 u8 ndim   4 u32 reserved (0)   8 u64 offset
 *   descriptor 16 u64 nbytes   24 u64 shape[4] (dims past ndim 0)   56 u64 reserved (0)
 *   sections   section i at offset align64(end of section i-1) (the first at
 *              align64(header_bytes)); total_bytes = the end of the last section (or
 *              header_bytes when there is none) = the frame length.
 * The decoder reads every integer with explicit little-endian loads (no casts of buf), so an
 * unaligned or hostile buffer is never dereferenced as a wider type.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ipc/ipc_proto.h"

/* ------------------------------------------------------------------------------------------
 * Little-endian loads and stores.
 * ---------------------------------------------------------------------------------------- */
static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (uint16_t)p[1] << 8); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static inline void wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void wr64(uint8_t *p, uint64_t v) {
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

static inline uint64_t align_up(uint64_t v) { return (v + (IPC_ALIGN - 1)) & ~(uint64_t)(IPC_ALIGN - 1); }

/* ------------------------------------------------------------------------------------------
 * Names.
 * ---------------------------------------------------------------------------------------- */
const char *ipc_op_name(uint16_t op) {
    switch (op) {
    case IPC_OP_PING:
        return "PING";
    case IPC_OP_INFO:
        return "INFO";
    case IPC_OP_STATS:
        return "STATS";
    case IPC_OP_SUBMIT:
        return "SUBMIT";
    default:
        return op >= IPC_OP_INTERNAL_FIRST ? "internal" : "unknown";
    }
}

const char *ipc_sec_kind_name(uint16_t kind) {
    static const char *names[] = {"none", "x", "topk_ids", "topk_w", "logits", "y", "json", "text"};
    return kind < sizeof names / sizeof names[0] ? names[kind] : "generic";
}

static const char *wire_dtype_name(uint8_t dt) {
    if (dt == IPC_DTYPE_BYTES)
        return "bytes";
    if (dt == IPC_DTYPE_NONE)
        return "none";
    return moe_dtype_name((moe_dtype)dt);
}

ipc_limits ipc_limits_default(void) {
    ipc_limits l;
    memset(&l, 0, sizeof l);
    l.max_msg_bytes = IPC_DEFAULT_MAX_MSG_BYTES;
    return l;
}

/* ------------------------------------------------------------------------------------------
 * Building.
 * ---------------------------------------------------------------------------------------- */
void ipc_msg_init(ipc_msg *m, uint16_t op, uint64_t request_id) {
    memset(m, 0, sizeof *m);
    m->version = IPC_VERSION;
    m->op = op;
    m->request_id = request_id;
    m->dtype = IPC_DTYPE_NONE;
}

static size_t wire_dtype_size(uint8_t dt) { return dt == IPC_DTYPE_BYTES ? 1 : moe_dtype_size((moe_dtype)dt); }

static bool wire_dtype_valid(uint8_t dt) { return dt == IPC_DTYPE_BYTES || moe_dtype_valid(dt); }

/* nbytes of a shape, with every dimension in [0, IPC_MAX_DIM] and no overflow. */
static bool shape_nbytes(uint8_t dt, int32_t ndim, const int64_t *shape, uint64_t *out) {
    size_t n = wire_dtype_size(dt);
    for (int32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0 || shape[i] > IPC_MAX_DIM || !moe_mul_size(n, (size_t)shape[i], &n))
            return false;
    }
    *out = n;
    return true;
}

moe_status ipc_msg_add(ipc_msg *m, uint16_t kind, uint8_t dtype, int32_t ndim, const int64_t *shape,
                       const void *data) {
    MOE_REQUIRE(m, MOE_ERR_INVALID_ARG, "ipc_msg_add: NULL message");
    MOE_REQUIRE(m->n_sections < IPC_MAX_SECTIONS, MOE_ERR_LIMIT, "ipc_msg_add: already %d sections (the most)",
                IPC_MAX_SECTIONS);
    MOE_REQUIRE(kind != 0, MOE_ERR_INVALID_ARG, "ipc_msg_add: section kind 0 is reserved");
    MOE_REQUIRE(wire_dtype_valid(dtype), MOE_ERR_INVALID_ARG, "ipc_msg_add: invalid dtype %u", (unsigned)dtype);
    MOE_REQUIRE(ndim >= 0 && ndim <= MOE_MAX_DIMS && (ndim == 0 || shape), MOE_ERR_INVALID_ARG,
                "ipc_msg_add: rank %d not in [0, %d]", (int)ndim, MOE_MAX_DIMS);
    MOE_REQUIRE(dtype != IPC_DTYPE_BYTES || ndim == 1, MOE_ERR_INVALID_ARG,
                "ipc_msg_add: a bytes section has rank 1, not %d", (int)ndim);
    uint64_t nb;
    MOE_REQUIRE(shape_nbytes(dtype, ndim, shape, &nb), MOE_ERR_INVALID_ARG,
                "ipc_msg_add: %s section: a dimension is negative or over %lld, or the size overflows",
                ipc_sec_kind_name(kind), (long long)IPC_MAX_DIM);
    MOE_REQUIRE(nb == 0 || data, MOE_ERR_INVALID_ARG, "ipc_msg_add: %s section of %llu bytes has NULL data",
                ipc_sec_kind_name(kind), (unsigned long long)nb);
    ipc_section *s = &m->sec[m->n_sections++];
    memset(s, 0, sizeof *s);
    s->kind = kind;
    s->dtype = dtype;
    s->ndim = (uint8_t)ndim;
    for (int32_t i = 0; i < ndim; i++)
        s->shape[i] = shape[i];
    s->data = data;
    s->nbytes = nb;
    return MOE_OK;
}

moe_status ipc_msg_add_tensor(ipc_msg *m, uint16_t kind, const moe_tensor *t) {
    MOE_REQUIRE(t, MOE_ERR_INVALID_ARG, "ipc_msg_add_tensor: NULL tensor");
    MOE_REQUIRE(moe_dtype_valid((int)t->dtype), MOE_ERR_INVALID_ARG, "ipc_msg_add_tensor: invalid dtype %d",
                (int)t->dtype);
    return ipc_msg_add(m, kind, (uint8_t)t->dtype, t->ndim, t->shape, t->data);
}

moe_status ipc_msg_add_bytes(ipc_msg *m, uint16_t kind, const void *data, size_t nbytes) {
    int64_t n = (int64_t)nbytes;
    MOE_REQUIRE(nbytes <= (size_t)IPC_MAX_DIM, MOE_ERR_LIMIT, "ipc_msg_add_bytes: %zu bytes is over %lld", nbytes,
                (long long)IPC_MAX_DIM);
    return ipc_msg_add(m, kind, IPC_DTYPE_BYTES, 1, &n, data);
}

const ipc_section *ipc_msg_find(const ipc_msg *m, uint16_t kind) {
    if (!m)
        return NULL;
    for (uint32_t i = 0; i < m->n_sections && i < IPC_MAX_SECTIONS; i++)
        if (m->sec[i].kind == kind)
            return &m->sec[i];
    return NULL;
}

moe_tensor ipc_section_tensor(const ipc_section *s) {
    if (!s || !moe_dtype_valid(s->dtype)) {
        moe_tensor t;
        memset(&t, 0, sizeof t);
        return t;
    }
    return moe_tensor_view((void *)s->data, (moe_dtype)s->dtype, s->ndim, s->shape);
}

moe_status ipc_submit_init(ipc_msg *m, uint64_t request_id, int32_t layer, const moe_tensor *x,
                           const moe_tensor *topk_ids, const moe_tensor *topk_w, const moe_tensor *logits) {
    MOE_REQUIRE(m && x, MOE_ERR_INVALID_ARG, "ipc_submit_init: NULL message or x");
    MOE_REQUIRE(x->ndim == 2 && moe_dtype_is_float(x->dtype), MOE_ERR_INVALID_ARG,
                "ipc_submit_init: x must be a float tensor [T, H]");
    MOE_REQUIRE(!topk_ids == !topk_w, MOE_ERR_INVALID_ARG, "ipc_submit_init: topk ids and weights go together");
    MOE_REQUIRE(!(topk_ids && logits), MOE_ERR_INVALID_ARG,
                "ipc_submit_init: give topk ids and weights, or logits, not both");
    MOE_REQUIRE(x->shape[0] >= 0 && x->shape[0] <= IPC_MAX_DIM && x->shape[1] >= 0 && x->shape[1] <= IPC_MAX_DIM,
                MOE_ERR_INVALID_ARG, "ipc_submit_init: x shape out of range");
    ipc_msg_init(m, IPC_OP_SUBMIT, request_id);
    m->layer = layer;
    m->n_tokens = (uint32_t)x->shape[0];
    m->hidden = (uint32_t)x->shape[1];
    m->dtype = (uint8_t)x->dtype;
    MOE_CHECK(ipc_msg_add_tensor(m, IPC_SEC_X, x));
    if (topk_ids) {
        MOE_REQUIRE(topk_ids->ndim == 2 && topk_ids->shape[1] >= 0 && topk_ids->shape[1] <= IPC_MAX_DIM,
                    MOE_ERR_INVALID_ARG, "ipc_submit_init: topk_ids must be [T, K]");
        m->top_k = (uint32_t)topk_ids->shape[1];
        MOE_CHECK(ipc_msg_add_tensor(m, IPC_SEC_TOPK_IDS, topk_ids));
        MOE_CHECK(ipc_msg_add_tensor(m, IPC_SEC_TOPK_W, topk_w));
    }
    if (logits)
        MOE_CHECK(ipc_msg_add_tensor(m, IPC_SEC_LOGITS, logits));
    return MOE_OK;
}

void ipc_reply_init(ipc_msg *m, uint16_t op, uint64_t request_id) {
    ipc_msg_init(m, op, request_id);
    m->flags = IPC_FLAG_REPLY;
}

moe_status ipc_submit_reply_init(ipc_msg *m, uint64_t request_id, const moe_tensor *y) {
    MOE_REQUIRE(m && y, MOE_ERR_INVALID_ARG, "ipc_submit_reply_init: NULL argument");
    MOE_REQUIRE(y->ndim == 2 && moe_dtype_is_float(y->dtype) && y->shape[0] >= 0 && y->shape[0] <= IPC_MAX_DIM &&
                    y->shape[1] >= 0 && y->shape[1] <= IPC_MAX_DIM,
                MOE_ERR_INVALID_ARG, "ipc_submit_reply_init: y must be a float tensor [T, H]");
    ipc_reply_init(m, IPC_OP_SUBMIT, request_id);
    m->n_tokens = (uint32_t)y->shape[0];
    m->hidden = (uint32_t)y->shape[1];
    m->dtype = (uint8_t)y->dtype;
    return ipc_msg_add_tensor(m, IPC_SEC_Y, y);
}

moe_status ipc_error_init(ipc_msg *m, uint16_t op, uint64_t request_id, moe_status status, const char *text) {
    static const char not_utf8[] = "(the error message was not valid UTF-8)";
    MOE_REQUIRE(m, MOE_ERR_INVALID_ARG, "ipc_error_init: NULL message");
    MOE_REQUIRE(status < 0, MOE_ERR_INVALID_ARG, "ipc_error_init: status %d is not an error", (int)status);
    ipc_reply_init(m, op ? op : IPC_OP_PING, request_id);
    m->status = status;
    if (!text || !*text)
        text = moe_status_str(status);
    size_t n = strlen(text);
    if (n > IPC_MAX_TEXT) {
        n = IPC_MAX_TEXT;
        while (n > 0 && ((uint8_t)text[n] & 0xC0) == 0x80) /* do not split a character */
            n--;
    }
    if (!ipc_utf8_valid(text, n)) {
        text = not_utf8;
        n = sizeof not_utf8 - 1;
    }
    return ipc_msg_add_bytes(m, IPC_SEC_TEXT, text, n);
}

/* ------------------------------------------------------------------------------------------
 * Encoding.
 * ---------------------------------------------------------------------------------------- */
moe_status ipc_encoded_size(const ipc_msg *m, size_t *out) {
    MOE_REQUIRE(m && out, MOE_ERR_INVALID_ARG, "ipc_encoded_size: NULL argument");
    MOE_REQUIRE(m->n_sections <= IPC_MAX_SECTIONS, MOE_ERR_INVALID_ARG, "ipc_encoded_size: %u sections (most %d)",
                (unsigned)m->n_sections, IPC_MAX_SECTIONS);
    uint64_t end = IPC_HEADER_BYTES + (uint64_t)IPC_DESC_BYTES * m->n_sections;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        const ipc_section *s = &m->sec[i];
        uint64_t nb;
        MOE_REQUIRE(s->ndim <= MOE_MAX_DIMS && wire_dtype_valid(s->dtype) &&
                        shape_nbytes(s->dtype, s->ndim, s->shape, &nb) && nb == s->nbytes,
                    MOE_ERR_INVALID_ARG, "ipc_encode: section %u (%s): shape, dtype and nbytes disagree", (unsigned)i,
                    ipc_sec_kind_name(s->kind));
        MOE_REQUIRE(s->nbytes == 0 || s->data, MOE_ERR_INVALID_ARG, "ipc_encode: section %u (%s) has NULL data",
                    (unsigned)i, ipc_sec_kind_name(s->kind));
        end = align_up(end);
        MOE_REQUIRE(end + s->nbytes >= end && end + s->nbytes <= ((uint64_t)1 << 48), MOE_ERR_LIMIT,
                    "ipc_encode: message size overflows");
        end += s->nbytes;
    }
    *out = (size_t)end;
    return MOE_OK;
}

/* Writes the header, the descriptors and the padding; copies each section's data unless
 * in_place, where the data must already be at its offset (section data pointers must then be
 * NULL or point exactly there). */
static moe_status encode_impl(const ipc_msg *m, void *buf, size_t cap, size_t *out_len, bool in_place) {
    size_t total;
    MOE_CHECK(ipc_encoded_size(m, &total));
    MOE_REQUIRE(buf, MOE_ERR_INVALID_ARG, "ipc_encode: NULL buffer");
    MOE_REQUIRE(cap >= total, MOE_ERR_LIMIT, "ipc_encode: buffer of %zu bytes, the message needs %zu", cap, total);
    uint8_t *p = buf;
    uint32_t header_bytes = IPC_HEADER_BYTES + IPC_DESC_BYTES * m->n_sections;
    memset(p, 0, header_bytes);
    wr32(p + 0, IPC_MAGIC);
    wr16(p + 4, m->version);
    wr16(p + 6, m->op);
    wr32(p + 8, m->flags);
    wr32(p + 12, header_bytes);
    wr64(p + 16, m->request_id);
    wr64(p + 24, total);
    wr32(p + 32, (uint32_t)m->status);
    wr32(p + 36, (uint32_t)m->layer);
    wr32(p + 40, m->n_tokens);
    wr32(p + 44, m->hidden);
    wr32(p + 48, m->top_k);
    p[52] = m->dtype;
    p[53] = (uint8_t)m->n_sections;
    wr32(p + 56, m->timeout_ms);
    uint64_t off = header_bytes;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        const ipc_section *s = &m->sec[i];
        uint8_t *d = p + IPC_HEADER_BYTES + IPC_DESC_BYTES * i;
        uint64_t start = align_up(off);
        memset(p + off, 0, (size_t)(start - off)); /* padding */
        wr16(d + 0, s->kind);
        d[2] = s->dtype;
        d[3] = s->ndim;
        wr64(d + 8, start);
        wr64(d + 16, s->nbytes);
        for (int k = 0; k < s->ndim; k++)
            wr64(d + 24 + 8 * k, (uint64_t)s->shape[k]);
        if (in_place) {
            MOE_REQUIRE(!s->data || s->data == p + start, MOE_ERR_INVALID_ARG,
                        "ipc_encode_in_place: section %u's data is not at its offset %llu", (unsigned)i,
                        (unsigned long long)start);
        } else if (s->nbytes) {
            memcpy(p + start, s->data, (size_t)s->nbytes);
        }
        off = start + s->nbytes;
    }
    MOE_ASSERT(off == total);
    if (out_len)
        *out_len = total;
    return MOE_OK;
}

moe_status ipc_encode(const ipc_msg *m, void *buf, size_t cap, size_t *out_len) {
    return encode_impl(m, buf, cap, out_len, false);
}

moe_status ipc_encode_in_place(const ipc_msg *m, void *buf, size_t cap, size_t *out_len) {
    return encode_impl(m, buf, cap, out_len, true);
}

moe_status ipc_section_offsets(const ipc_msg *m, uint64_t *offsets, size_t *total) {
    MOE_REQUIRE(m && offsets, MOE_ERR_INVALID_ARG, "ipc_section_offsets: NULL argument");
    size_t t;
    MOE_CHECK(ipc_encoded_size(m, &t));
    uint64_t off = IPC_HEADER_BYTES + IPC_DESC_BYTES * (uint64_t)m->n_sections;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        offsets[i] = align_up(off);
        off = offsets[i] + m->sec[i].nbytes;
    }
    if (total)
        *total = t;
    return MOE_OK;
}

moe_status ipc_encode_alloc(const ipc_msg *m, void **out, size_t *out_len) {
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "ipc_encode_alloc: NULL output");
    size_t total;
    MOE_CHECK(ipc_encoded_size(m, &total));
    void *buf = moe_alloc(total);
    if (!buf)
        return moe_fail(MOE_ERR_NOMEM, "ipc_encode_alloc: %zu bytes", total);
    moe_status st = ipc_encode(m, buf, total, out_len);
    if (st != MOE_OK) {
        moe_free(buf);
        return st;
    }
    *out = buf;
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * UTF-8.
 * ---------------------------------------------------------------------------------------- */
bool ipc_utf8_valid(const void *sv, size_t n) {
    const uint8_t *s = sv;
    size_t i = 0;
    if (n && !s)
        return false;
    while (i < n) {
        uint8_t c = s[i];
        if (c == 0)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false; /* continuation byte, overlong lead (C0, C1) or > F4 */
        }
        if (n - i < len)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* ------------------------------------------------------------------------------------------
 * Decoding.
 * ---------------------------------------------------------------------------------------- */
static moe_status check_empty_submit_fields(const ipc_msg *m) {
    if (m->layer != 0 || m->n_tokens != 0 || m->hidden != 0 || m->top_k != 0 || m->dtype != IPC_DTYPE_NONE)
        return moe_fail(MOE_ERR_FORMAT,
                        "%s %s: layer, n_tokens, hidden, top_k must be 0 and dtype none (have %d, %u, %u, %u, %s)",
                        ipc_op_name(m->op), m->flags & IPC_FLAG_REPLY ? "reply" : "request", (int)m->layer,
                        (unsigned)m->n_tokens, (unsigned)m->hidden, (unsigned)m->top_k, wire_dtype_name(m->dtype));
    return MOE_OK;
}

static moe_status expect_sections(const ipc_msg *m, uint32_t n) {
    if (m->n_sections != n)
        return moe_fail(MOE_ERR_FORMAT, "%s %s: %u sections, expected %u", ipc_op_name(m->op),
                        m->flags & IPC_FLAG_REPLY ? "reply" : "request", (unsigned)m->n_sections, (unsigned)n);
    return MOE_OK;
}

/* A float [T, H] section matching the header. */
static moe_status check_th_section(const ipc_msg *m, const ipc_section *s, const char *what) {
    if (!moe_dtype_is_float((moe_dtype)s->dtype) || s->dtype >= MOE_DTYPE_COUNT_)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT: %s dtype %s is not a float dtype (f32, f16, bf16)", what,
                        wire_dtype_name(s->dtype));
    if (s->ndim != 2)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT: %s has rank %u, expected 2 [T, H]", what, (unsigned)s->ndim);
    if (s->shape[0] != (int64_t)m->n_tokens || s->shape[1] != (int64_t)m->hidden || s->dtype != m->dtype)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT: %s is %s[%lld, %lld] but the header says %s[T = %u, H = %u]", what,
                        wire_dtype_name(s->dtype), (long long)s->shape[0], (long long)s->shape[1],
                        wire_dtype_name(m->dtype), (unsigned)m->n_tokens, (unsigned)m->hidden);
    return MOE_OK;
}

static moe_status check_submit_request(const ipc_msg *m) {
    const ipc_section *x = NULL, *ids = NULL, *w = NULL, *lg = NULL;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        const ipc_section *s = &m->sec[i];
        const ipc_section **slot;
        switch (s->kind) {
        case IPC_SEC_X:
            slot = &x;
            break;
        case IPC_SEC_TOPK_IDS:
            slot = &ids;
            break;
        case IPC_SEC_TOPK_W:
            slot = &w;
            break;
        case IPC_SEC_LOGITS:
            slot = &lg;
            break;
        default:
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: section %u has kind %u (%s), not allowed here",
                            (unsigned)i, (unsigned)s->kind, ipc_sec_kind_name(s->kind));
        }
        if (*slot)
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: two %s sections", ipc_sec_kind_name(s->kind));
        *slot = s;
    }
    if (!x)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: no x (hidden states) section");
    if (m->n_tokens == 0 || m->hidden == 0)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: T = %u, H = %u: both must be >= 1", (unsigned)m->n_tokens,
                        (unsigned)m->hidden);
    MOE_CHECK(check_th_section(m, x, "x"));
    if (!ids != !w)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: topk_ids and topk_w go together (only %s given)",
                        ids ? "topk_ids" : "topk_w");
    if (ids && lg)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: give topk_ids/topk_w or logits, not both");
    if (ids) {
        if (ids->dtype != MOE_DTYPE_I32 || ids->ndim != 2 || ids->shape[0] != (int64_t)m->n_tokens ||
            ids->shape[1] != (int64_t)m->top_k || m->top_k == 0)
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: topk_ids must be i32[T = %u, K = %u] with K >= 1 (is %s, rank %u, [%lld, %lld])",
                            (unsigned)m->n_tokens, (unsigned)m->top_k, wire_dtype_name(ids->dtype), (unsigned)ids->ndim,
                            (long long)ids->shape[0], (long long)ids->shape[1]);
        if (w->dtype != MOE_DTYPE_F32 || w->ndim != 2 || w->shape[0] != (int64_t)m->n_tokens ||
            w->shape[1] != (int64_t)m->top_k)
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: topk_w must be f32[T = %u, K = %u] (is %s, rank %u, [%lld, %lld])",
                            (unsigned)m->n_tokens, (unsigned)m->top_k, wire_dtype_name(w->dtype), (unsigned)w->ndim,
                            (long long)w->shape[0], (long long)w->shape[1]);
    } else if (m->top_k != 0) {
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: top_k %u in the header but no topk_ids", (unsigned)m->top_k);
    }
    if (lg) {
        if (!moe_dtype_is_float((moe_dtype)lg->dtype) || lg->dtype >= MOE_DTYPE_COUNT_ || lg->ndim != 2 ||
            lg->shape[0] != (int64_t)m->n_tokens || lg->shape[1] < 1)
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: logits must be a float [T = %u, E >= 1] (is %s, rank %u, [%lld, %lld])",
                            (unsigned)m->n_tokens, wire_dtype_name(lg->dtype), (unsigned)lg->ndim,
                            (long long)lg->shape[0], (long long)lg->shape[1]);
    }
    if (m->layer < 0)
        return moe_fail(MOE_ERR_FORMAT, "SUBMIT request: layer %d is negative", (int)m->layer);
    return MOE_OK;
}

static moe_status check_client_op(const ipc_msg *m) {
    bool reply = m->flags & IPC_FLAG_REPLY;
    if (!reply) {
        if (m->status != 0)
            return moe_fail(MOE_ERR_FORMAT, "%s request: status %d, must be 0", ipc_op_name(m->op), (int)m->status);
        if (m->op == IPC_OP_SUBMIT)
            return check_submit_request(m);
        MOE_CHECK(check_empty_submit_fields(m));
        return expect_sections(m, 0);
    }
    if (m->timeout_ms != 0)
        return moe_fail(MOE_ERR_FORMAT, "%s reply: timeout_ms %u, must be 0", ipc_op_name(m->op), (unsigned)m->timeout_ms);
    if (m->status > 0)
        return moe_fail(MOE_ERR_FORMAT, "%s reply: status %d is positive", ipc_op_name(m->op), (int)m->status);
    if (m->status < 0) {
        MOE_CHECK(check_empty_submit_fields(m));
        MOE_CHECK(expect_sections(m, 1));
        const ipc_section *t = &m->sec[0];
        if (t->kind != IPC_SEC_TEXT || t->dtype != IPC_DTYPE_BYTES)
            return moe_fail(MOE_ERR_FORMAT, "error reply: the section is %s/%s, expected text/bytes",
                            ipc_sec_kind_name(t->kind), wire_dtype_name(t->dtype));
        if (t->nbytes > IPC_MAX_TEXT)
            return moe_fail(MOE_ERR_LIMIT, "error reply: message of %llu bytes (most %d)",
                            (unsigned long long)t->nbytes, IPC_MAX_TEXT);
        if (!ipc_utf8_valid(t->data, (size_t)t->nbytes))
            return moe_fail(MOE_ERR_FORMAT, "error reply: the message is not valid UTF-8");
        return MOE_OK;
    }
    switch (m->op) {
    case IPC_OP_PING:
        MOE_CHECK(check_empty_submit_fields(m));
        return expect_sections(m, 0);
    case IPC_OP_INFO:
    case IPC_OP_STATS: {
        MOE_CHECK(check_empty_submit_fields(m));
        MOE_CHECK(expect_sections(m, 1));
        const ipc_section *j = &m->sec[0];
        if (j->kind != IPC_SEC_JSON || j->dtype != IPC_DTYPE_BYTES)
            return moe_fail(MOE_ERR_FORMAT, "%s reply: the section is %s/%s, expected json/bytes", ipc_op_name(m->op),
                            ipc_sec_kind_name(j->kind), wire_dtype_name(j->dtype));
        if (!ipc_utf8_valid(j->data, (size_t)j->nbytes))
            return moe_fail(MOE_ERR_FORMAT, "%s reply: the JSON document is not valid UTF-8", ipc_op_name(m->op));
        return MOE_OK;
    }
    case IPC_OP_SUBMIT: {
        MOE_CHECK(expect_sections(m, 1));
        const ipc_section *y = &m->sec[0];
        if (y->kind != IPC_SEC_Y)
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT reply: the section is %s, expected y", ipc_sec_kind_name(y->kind));
        if (m->top_k != 0 || m->layer < 0)
            return moe_fail(MOE_ERR_FORMAT, "SUBMIT reply: top_k %u must be 0 and layer %d >= 0", (unsigned)m->top_k,
                            (int)m->layer);
        return check_th_section(m, y, "y");
    }
    default:
        return moe_fail(MOE_ERR_INTERNAL, "check_client_op: op %u", (unsigned)m->op);
    }
}

moe_status ipc_decode(const void *buf, size_t len, const ipc_limits *lim_in, ipc_msg *out) {
    MOE_REQUIRE(out, MOE_ERR_INVALID_ARG, "ipc_decode: NULL output");
    memset(out, 0, sizeof *out);
    out->dtype = IPC_DTYPE_NONE;
    MOE_REQUIRE(buf || len == 0, MOE_ERR_INVALID_ARG, "ipc_decode: NULL buffer of %zu bytes", len);
    ipc_limits lim = lim_in ? *lim_in : ipc_limits_default();
    uint64_t max_msg = lim.max_msg_bytes ? lim.max_msg_bytes : IPC_DEFAULT_MAX_MSG_BYTES;
    const uint8_t *p = buf;
    ipc_msg m;
    memset(&m, 0, sizeof m);

    if (len < 8)
        return moe_fail(MOE_ERR_PROTOCOL, "message of %zu bytes: too short to be a moe-engine message", len);
    uint32_t magic = rd32(p);
    if (magic != IPC_MAGIC)
        return moe_fail(MOE_ERR_PROTOCOL,
                        "not a moe-engine message: magic bytes %02x %02x %02x %02x, expected \"MOEW\"", p[0], p[1],
                        p[2], p[3]);
    /* Best-effort identity for the error reply: the fields that sit at fixed places. */
    out->version = rd16(p + 4);
    out->op = rd16(p + 6);
    if (len >= 12)
        out->flags = rd32(p + 8);
    if (len >= 24)
        out->request_id = rd64(p + 16);
    if (out->version != IPC_VERSION)
        return moe_fail(MOE_ERR_PROTOCOL, "protocol version %u is not supported: this side speaks version %d",
                        (unsigned)out->version, IPC_VERSION);
    if (len < IPC_HEADER_BYTES)
        return moe_fail(MOE_ERR_FORMAT, "message of %zu bytes is shorter than the %d-byte header", len,
                        IPC_HEADER_BYTES);
    if (len > max_msg)
        return moe_fail(MOE_ERR_LIMIT, "message of %zu bytes is over the limit of %llu bytes", len,
                        (unsigned long long)max_msg);

    m.version = out->version;
    m.op = out->op;
    m.flags = out->flags;
    m.request_id = out->request_id;
    uint32_t header_bytes = rd32(p + 12);
    uint64_t total = rd64(p + 24);
    m.status = (int32_t)rd32(p + 32);
    m.layer = (int32_t)rd32(p + 36);
    m.n_tokens = rd32(p + 40);
    m.hidden = rd32(p + 44);
    m.top_k = rd32(p + 48);
    m.dtype = p[52];
    m.n_sections = p[53];
    m.timeout_ms = rd32(p + 56);

    bool internal = m.op >= IPC_OP_INTERNAL_FIRST;
    /* An error reply may name any client op (0x01..0x7f): a server answers ops it does not
     * know (a newer client's) with an error that an older client can still read. */
    bool error_reply = (m.flags & IPC_FLAG_REPLY) && m.status < 0 && !internal;
    if (m.op == 0 || (m.op > IPC_OP_CLIENT_LAST_ && !internal && !error_reply))
        return moe_fail(MOE_ERR_PROTOCOL, "unknown op 0x%04x", (unsigned)m.op);
    if (internal && !lim.allow_internal)
        return moe_fail(MOE_ERR_PROTOCOL, "op 0x%04x is reserved for the engine's internal messages", (unsigned)m.op);
    if (m.flags & ~(IPC_FLAGS_KNOWN | (internal ? IPC_FLAGS_INTERNAL : 0u)))
        return moe_fail(MOE_ERR_PROTOCOL, "unknown flags 0x%08x on op %s", (unsigned)m.flags, ipc_op_name(m.op));
    if (!internal) {
        bool reply = m.flags & IPC_FLAG_REPLY;
        if (reply && lim.accept == IPC_ACCEPT_REQUESTS)
            return moe_fail(MOE_ERR_PROTOCOL, "%s: a reply where a request was expected", ipc_op_name(m.op));
        if (!reply && lim.accept == IPC_ACCEPT_REPLIES)
            return moe_fail(MOE_ERR_PROTOCOL, "%s: a request where a reply was expected", ipc_op_name(m.op));
    }
    if (rd16(p + 54) != 0 || rd32(p + 60) != 0)
        return moe_fail(MOE_ERR_FORMAT, "header: reserved bytes are not zero");
    if (total != len)
        return moe_fail(MOE_ERR_FORMAT, "header says %llu bytes, the frame has %zu", (unsigned long long)total, len);
    if (m.n_sections > IPC_MAX_SECTIONS)
        return moe_fail(MOE_ERR_FORMAT, "%u sections (most %d)", (unsigned)m.n_sections, IPC_MAX_SECTIONS);
    if (header_bytes != IPC_HEADER_BYTES + IPC_DESC_BYTES * m.n_sections)
        return moe_fail(MOE_ERR_FORMAT, "header_bytes %u, expected %u for %u sections", (unsigned)header_bytes,
                        (unsigned)(IPC_HEADER_BYTES + IPC_DESC_BYTES * m.n_sections), (unsigned)m.n_sections);
    if (header_bytes > len)
        return moe_fail(MOE_ERR_FORMAT, "%u section descriptors do not fit in %zu bytes", (unsigned)m.n_sections, len);
    if (m.dtype != IPC_DTYPE_NONE && !moe_dtype_valid(m.dtype))
        return moe_fail(MOE_ERR_FORMAT, "header: invalid dtype %u", (unsigned)m.dtype);

    uint64_t end = header_bytes;
    for (uint32_t i = 0; i < m.n_sections; i++) {
        const uint8_t *d = p + IPC_HEADER_BYTES + IPC_DESC_BYTES * i;
        ipc_section *s = &m.sec[i];
        s->kind = rd16(d);
        s->dtype = d[2];
        s->ndim = d[3];
        uint64_t off = rd64(d + 8);
        s->nbytes = rd64(d + 16);
        if (s->kind == 0)
            return moe_fail(MOE_ERR_FORMAT, "section %u: kind 0 is reserved", (unsigned)i);
        if (!wire_dtype_valid(s->dtype))
            return moe_fail(MOE_ERR_FORMAT, "section %u (%s): invalid dtype %u", (unsigned)i,
                            ipc_sec_kind_name(s->kind), (unsigned)s->dtype);
        if (s->ndim > MOE_MAX_DIMS || (s->dtype == IPC_DTYPE_BYTES && s->ndim != 1))
            return moe_fail(MOE_ERR_FORMAT, "section %u (%s): rank %u not allowed for dtype %s", (unsigned)i,
                            ipc_sec_kind_name(s->kind), (unsigned)s->ndim, wire_dtype_name(s->dtype));
        if (rd32(d + 4) != 0 || rd64(d + 56) != 0)
            return moe_fail(MOE_ERR_FORMAT, "section %u: reserved bytes are not zero", (unsigned)i);
        for (int k = 0; k < MOE_MAX_DIMS; k++) {
            uint64_t dim = rd64(d + 24 + 8 * k);
            if (k >= s->ndim ? dim != 0 : dim > (uint64_t)IPC_MAX_DIM)
                return moe_fail(MOE_ERR_FORMAT, "section %u (%s): dimension %d is %llu (%s)", (unsigned)i,
                                ipc_sec_kind_name(s->kind), k, (unsigned long long)dim,
                                k >= s->ndim ? "past the rank: must be 0" : "over 2^31 - 1");
            s->shape[k] = (int64_t)dim;
        }
        uint64_t nb;
        if (!shape_nbytes(s->dtype, s->ndim, s->shape, &nb) || nb != s->nbytes)
            return moe_fail(MOE_ERR_FORMAT, "section %u (%s): %llu bytes, but its shape and dtype make %llu",
                            (unsigned)i, ipc_sec_kind_name(s->kind), (unsigned long long)s->nbytes,
                            (unsigned long long)nb);
        uint64_t want = align_up(end);
        if (off != want)
            return moe_fail(MOE_ERR_FORMAT, "section %u (%s): offset %llu, expected %llu (packed, 64-byte aligned)",
                            (unsigned)i, ipc_sec_kind_name(s->kind), (unsigned long long)off,
                            (unsigned long long)want);
        if (off > len || s->nbytes > len - off)
            return moe_fail(MOE_ERR_FORMAT, "section %u (%s): bytes [%llu, +%llu) run past the message end %zu",
                            (unsigned)i, ipc_sec_kind_name(s->kind), (unsigned long long)off,
                            (unsigned long long)s->nbytes, len);
        s->data = p + off;
        end = off + s->nbytes;
    }
    if (end != len)
        return moe_fail(MOE_ERR_FORMAT, "%zu bytes, but the sections end at %llu", len, (unsigned long long)end);

    if (!internal) {
        if (m.flags & IPC_FLAG_REPLY ? m.status == 0 && m.op == IPC_OP_SUBMIT : m.op == IPC_OP_SUBMIT) {
            if (lim.max_tokens && m.n_tokens > lim.max_tokens)
                return moe_fail(MOE_ERR_LIMIT, "SUBMIT: %u tokens is over the limit of %u per request",
                                (unsigned)m.n_tokens, (unsigned)lim.max_tokens);
        }
        MOE_CHECK(check_client_op(&m));
        if (m.op == IPC_OP_SUBMIT && !(m.flags & IPC_FLAG_REPLY) && lim.n_experts > 0)
            MOE_CHECK(ipc_validate_submit(&m, &lim));
    }
    *out = m;
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Semantic checks of a SUBMIT request against the model.
 * ---------------------------------------------------------------------------------------- */
static bool value_finite(uint8_t dt, const uint8_t *p, size_t i) {
    switch (dt) {
    case MOE_DTYPE_F32: {
        uint32_t u = rd32(p + 4 * i);
        return (u & 0x7f800000u) != 0x7f800000u;
    }
    case MOE_DTYPE_F16:
        return (rd16(p + 2 * i) & 0x7c00u) != 0x7c00u;
    case MOE_DTYPE_BF16:
        return (rd16(p + 2 * i) & 0x7f80u) != 0x7f80u;
    default:
        return false;
    }
}

moe_status ipc_validate_submit(const ipc_msg *m, const ipc_limits *lim) {
    MOE_REQUIRE(m && lim, MOE_ERR_INVALID_ARG, "ipc_validate_submit: NULL argument");
    MOE_REQUIRE(m->op == IPC_OP_SUBMIT, MOE_ERR_INVALID_ARG, "ipc_validate_submit: op %s", ipc_op_name(m->op));
    const ipc_section *x = ipc_msg_find(m, IPC_SEC_X);
    const ipc_section *ids = ipc_msg_find(m, IPC_SEC_TOPK_IDS);
    const ipc_section *w = ipc_msg_find(m, IPC_SEC_TOPK_W);
    const ipc_section *lg = ipc_msg_find(m, IPC_SEC_LOGITS);
    MOE_REQUIRE(x, MOE_ERR_INVALID_ARG, "SUBMIT: no x section");
    if (m->layer < 0 || (uint32_t)m->layer >= lim->n_layers)
        return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: layer %d out of range [0, %u)", (int)m->layer,
                        (unsigned)lim->n_layers);
    if (lim->layer_served && !lim->layer_served[m->layer])
        return moe_fail(MOE_ERR_NOT_FOUND, "SUBMIT: layer %d is not a MoE layer served here", (int)m->layer);
    if (lim->max_tokens && m->n_tokens > lim->max_tokens)
        return moe_fail(MOE_ERR_LIMIT, "SUBMIT: %u tokens is over the limit of %u per request", (unsigned)m->n_tokens,
                        (unsigned)lim->max_tokens);
    if (lim->hidden && m->hidden != lim->hidden)
        return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: hidden size %u, the model's is %u", (unsigned)m->hidden,
                        (unsigned)lim->hidden);
    uint32_t mask = lim->dtype_mask ? lim->dtype_mask
                                    : (1u << MOE_DTYPE_F32) | (1u << MOE_DTYPE_F16) | (1u << MOE_DTYPE_BF16);
    if (x->dtype >= 32 || !(mask & (1u << x->dtype)) || !moe_dtype_is_float((moe_dtype)x->dtype))
        return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: activation dtype %s is not served here (mask 0x%x)",
                        wire_dtype_name(x->dtype), (unsigned)mask);
    uint32_t E = lim->n_experts;
    if (ids) {
        uint32_t K = m->top_k;
        if (lim->top_k && K != lim->top_k)
            return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: top_k %u, the model's is %u", (unsigned)K,
                            (unsigned)lim->top_k);
        if (K < 1 || K > E)
            return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: top_k %u not in [1, n_experts = %u]", (unsigned)K,
                            (unsigned)E);
        const uint8_t *pi = ids->data, *pw = w->data;
        size_t n = (size_t)m->n_tokens * K;
        for (size_t i = 0; i < n; i++) {
            int32_t id = (int32_t)rd32(pi + 4 * i);
            if (id < 0 || (uint32_t)id >= E)
                return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: expert id %d out of range [0, %u) at token %zu, slot %zu",
                                (int)id, (unsigned)E, i / K, i % K);
            if (!value_finite(MOE_DTYPE_F32, pw, i)) {
                float f;
                uint32_t u = rd32(pw + 4 * i);
                memcpy(&f, &u, 4);
                return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: weight %g at token %zu, slot %zu is not finite",
                                (double)f, i / K, i % K);
            }
        }
    } else if (lg) {
        if ((uint64_t)lg->shape[1] != E)
            return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: logits have %lld experts, the model has %u",
                            (long long)lg->shape[1], (unsigned)E);
        size_t n = (size_t)m->n_tokens * E;
        for (size_t i = 0; i < n; i++)
            if (!value_finite(lg->dtype, lg->data, i))
                return moe_fail(MOE_ERR_INVALID_ARG, "SUBMIT: logit of token %zu, expert %zu is not finite", i / E,
                                i % E);
    } else if (!lim->can_route) {
        return moe_fail(MOE_ERR_UNSUPPORTED,
                        "SUBMIT: this engine has no router weights: send topk_ids and topk_w, or router logits");
    }
    return MOE_OK;
}

bool ipc_msg_aligned(const ipc_msg *m) {
    for (uint32_t i = 0; i < m->n_sections && i < IPC_MAX_SECTIONS; i++)
        if (m->sec[i].nbytes && ((uintptr_t)m->sec[i].data % IPC_ALIGN) != 0)
            return false;
    return true;
}

moe_status ipc_msg_realign(ipc_msg *m, void **owned) {
    MOE_REQUIRE(m && owned, MOE_ERR_INVALID_ARG, "ipc_msg_realign: NULL argument");
    MOE_REQUIRE(m->n_sections <= IPC_MAX_SECTIONS, MOE_ERR_INVALID_ARG, "ipc_msg_realign: %u sections",
                (unsigned)m->n_sections);
    *owned = NULL;
    if (ipc_msg_aligned(m))
        return MOE_OK;
    uint64_t total = 0;
    for (uint32_t i = 0; i < m->n_sections; i++)
        total = align_up(total) + m->sec[i].nbytes;
    uint8_t *blk = moe_alloc((size_t)total);
    if (!blk)
        return moe_fail(MOE_ERR_NOMEM, "ipc_msg_realign: %llu bytes", (unsigned long long)total);
    uint64_t off = 0;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        off = align_up(off);
        if (m->sec[i].nbytes)
            memcpy(blk + off, m->sec[i].data, (size_t)m->sec[i].nbytes);
        m->sec[i].data = blk + off;
        off += m->sec[i].nbytes;
    }
    *owned = blk;
    return MOE_OK;
}
