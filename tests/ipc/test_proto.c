/*
 * test_proto.c: unit tests of the wire protocol (ipc/proto.c): round trips of every op,
 * golden bytes written by hand from docs/protocol.md (not with the encoder), every structural
 * rejection, the semantic checks against a model, internal ops, UTF-8, unaligned buffers, and
 * a bounded random-mutation pass (the libFuzzer target goes further under ASan/UBSan).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ipc/ipc_proto.h"

/* ---- little helpers to write bytes by hand (independent of proto.c) ---- */
static void put16(uint8_t *p, uint16_t v) {
    p[0] = v & 0xff;
    p[1] = v >> 8;
}
static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (v >> (8 * i)) & 0xff;
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (v >> (8 * i)) & 0xff;
}

/* Writes the golden SUBMIT of docs/protocol.md's example: T=1, H=2, K=1, layer 3, request 7,
 * x = f32 {1.5, -2}, ids = {3}, w = {0.25}. Returns its length (388). */
static size_t golden_submit(uint8_t *b) {
    memset(b, 0, 388);
    memcpy(b, "MOEW", 4);
    put16(b + 4, 1);         /* version */
    put16(b + 6, 4);         /* SUBMIT */
    put32(b + 8, 0);         /* flags */
    put32(b + 12, 64 + 3 * 64);
    put64(b + 16, 7);        /* request id */
    put64(b + 24, 388);      /* total */
    put32(b + 32, 0);        /* status */
    put32(b + 36, 3);        /* layer */
    put32(b + 40, 1);        /* T */
    put32(b + 44, 2);        /* H */
    put32(b + 48, 1);        /* K */
    b[52] = 0;               /* f32 */
    b[53] = 3;               /* sections */
    /* descriptors */
    uint8_t *d = b + 64;
    put16(d, 1), d[2] = 0, d[3] = 2, put64(d + 8, 256), put64(d + 16, 8), put64(d + 24, 1), put64(d + 32, 2);
    d += 64;
    put16(d, 2), d[2] = 3, d[3] = 2, put64(d + 8, 320), put64(d + 16, 4), put64(d + 24, 1), put64(d + 32, 1);
    d += 64;
    put16(d, 3), d[2] = 0, d[3] = 2, put64(d + 8, 384), put64(d + 16, 4), put64(d + 24, 1), put64(d + 32, 1);
    float x[2] = {1.5f, -2.0f}, w = 0.25f;
    uint32_t u;
    memcpy(&u, &x[0], 4), put32(b + 256, u);
    memcpy(&u, &x[1], 4), put32(b + 260, u);
    put32(b + 320, 3);
    memcpy(&u, &w, 4), put32(b + 384, u);
    return 388;
}

static ipc_limits model_limits(void) {
    ipc_limits l = ipc_limits_default();
    l.n_layers = 8;
    l.n_experts = 16;
    l.hidden = 32;
    l.top_k = 2;
    l.max_tokens = 64;
    return l;
}

/* A valid SUBMIT for model_limits with ids mode; arrays owned by the caller. */
typedef struct sub_fixture {
    float x[4 * 32];
    int32_t ids[4 * 2];
    float w[4 * 2];
    moe_tensor tx, ti, tw;
    ipc_msg m;
    void *buf;
    size_t len;
} sub_fixture;

static void make_submit(sub_fixture *f, int T) {
    memset(f, 0, sizeof *f);
    for (int i = 0; i < T * 32; i++)
        f->x[i] = (float)i * 0.5f - 3.0f;
    for (int i = 0; i < T * 2; i++) {
        f->ids[i] = (i * 5) % 16;
        f->w[i] = 0.5f + 0.01f * (float)i;
    }
    f->tx = moe_tensor_view2(f->x, MOE_DTYPE_F32, T, 32);
    f->ti = moe_tensor_view2(f->ids, MOE_DTYPE_I32, T, 2);
    f->tw = moe_tensor_view2(f->w, MOE_DTYPE_F32, T, 2);
    assert_int_equal(ipc_submit_init(&f->m, 99, 5, &f->tx, &f->ti, &f->tw, NULL), MOE_OK);
    assert_int_equal(ipc_encode_alloc(&f->m, &f->buf, &f->len), MOE_OK);
}

static void test_golden_submit(void **state) {
    (void)state;
    uint8_t gold[388];
    size_t glen = golden_submit(gold);
    /* The encoder writes exactly the hand-made bytes. */
    float x[2] = {1.5f, -2.0f}, w = 0.25f;
    int32_t id = 3;
    moe_tensor tx = moe_tensor_view2(x, MOE_DTYPE_F32, 1, 2);
    moe_tensor ti = moe_tensor_view2(&id, MOE_DTYPE_I32, 1, 1);
    moe_tensor tw = moe_tensor_view2(&w, MOE_DTYPE_F32, 1, 1);
    ipc_msg m;
    assert_int_equal(ipc_submit_init(&m, 7, 3, &tx, &ti, &tw, NULL), MOE_OK);
    uint8_t enc[512];
    size_t elen = 0;
    assert_int_equal(ipc_encode(&m, enc, sizeof enc, &elen), MOE_OK);
    assert_int_equal(elen, glen);
    assert_memory_equal(enc, gold, glen);
    /* And the decoder reads them back. */
    ipc_msg d;
    assert_int_equal(ipc_decode(gold, glen, NULL, &d), MOE_OK);
    assert_int_equal(d.op, IPC_OP_SUBMIT);
    assert_int_equal(d.request_id, 7);
    assert_int_equal(d.layer, 3);
    assert_int_equal(d.n_tokens, 1);
    assert_int_equal(d.hidden, 2);
    assert_int_equal(d.top_k, 1);
    assert_int_equal(d.n_sections, 3);
    const ipc_section *sx = ipc_msg_find(&d, IPC_SEC_X);
    assert_non_null(sx);
    assert_ptr_equal(sx->data, gold + 256);
    moe_tensor vx = ipc_section_tensor(sx);
    assert_int_equal(vx.ndim, 2);
    assert_int_equal(vx.shape[1], 2);
    assert_true(moe_load_f32(MOE_DTYPE_F32, vx.data, 1) == -2.0f);
    /* Too small a buffer for the encoder is an error, nothing more. */
    assert_int_equal(ipc_encode(&m, enc, 387, &elen), MOE_ERR_LIMIT);
}

static void test_golden_ping(void **state) {
    (void)state;
    uint8_t b[64];
    memset(b, 0, sizeof b);
    memcpy(b, "MOEW", 4);
    put16(b + 4, 1);
    put16(b + 6, 1);
    put32(b + 12, 64);
    put64(b + 16, 0x0102030405060708ull);
    put64(b + 24, 64);
    b[52] = 0xff;
    ipc_msg m;
    ipc_msg_init(&m, IPC_OP_PING, 0x0102030405060708ull);
    uint8_t enc[64];
    size_t n;
    assert_int_equal(ipc_encode(&m, enc, sizeof enc, &n), MOE_OK);
    assert_int_equal(n, 64);
    assert_memory_equal(enc, b, 64);
    ipc_msg d;
    assert_int_equal(ipc_decode(b, 64, NULL, &d), MOE_OK);
    assert_int_equal(d.op, IPC_OP_PING);
    assert_int_equal(d.request_id, 0x0102030405060708ull);
}

static void roundtrip(const ipc_msg *m, ipc_accept acc, ipc_msg *out, void **buf) {
    size_t len;
    assert_int_equal(ipc_encode_alloc(m, buf, &len), MOE_OK);
    ipc_limits l = ipc_limits_default();
    l.accept = acc;
    moe_status st = ipc_decode(*buf, len, &l, out);
    if (st != MOE_OK)
        fail_msg("decode: %s: %s", moe_status_name(st), moe_errmsg());
}

static void test_roundtrip_ops(void **state) {
    (void)state;
    ipc_msg m, d;
    void *buf;
    size_t len;
    for (uint16_t op = IPC_OP_PING; op <= IPC_OP_SUBMIT; op++) {
        if (op == IPC_OP_SUBMIT)
            continue;
        ipc_msg_init(&m, op, 1000 + op);
        m.timeout_ms = 250;
        roundtrip(&m, IPC_ACCEPT_REQUESTS, &d, &buf);
        assert_int_equal(d.op, op);
        assert_int_equal(d.request_id, 1000 + op);
        assert_int_equal(d.timeout_ms, 250);
        assert_int_equal(d.n_sections, 0);
        moe_free(buf);
    }
    /* replies */
    ipc_reply_init(&m, IPC_OP_PING, 5);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    assert_true(d.flags & IPC_FLAG_REPLY);
    moe_free(buf);
    const char *js = "{\"version\":\"0.1\",\"name\":\"caf\xc3\xa9\"}";
    ipc_reply_init(&m, IPC_OP_INFO, 6);
    assert_int_equal(ipc_msg_add_bytes(&m, IPC_SEC_JSON, js, strlen(js)), MOE_OK);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    const ipc_section *j = ipc_msg_find(&d, IPC_SEC_JSON);
    assert_non_null(j);
    assert_int_equal(j->nbytes, strlen(js));
    assert_memory_equal(j->data, js, strlen(js));
    moe_free(buf);
    uint16_t y[3 * 4];
    for (int i = 0; i < 12; i++)
        y[i] = moe_f32_to_bf16((float)i - 4.0f);
    moe_tensor ty = moe_tensor_view2(y, MOE_DTYPE_BF16, 3, 4);
    assert_int_equal(ipc_submit_reply_init(&m, 77, &ty), MOE_OK);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    const ipc_section *sy = ipc_msg_find(&d, IPC_SEC_Y);
    assert_non_null(sy);
    assert_int_equal(sy->dtype, MOE_DTYPE_BF16);
    assert_memory_equal(sy->data, y, sizeof y);
    assert_int_equal(d.n_tokens, 3);
    assert_int_equal(d.hidden, 4);
    moe_free(buf);
    assert_int_equal(ipc_error_init(&m, IPC_OP_SUBMIT, 78, MOE_ERR_INVALID_ARG, "expert id 99 out of range"), MOE_OK);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    assert_int_equal(d.status, MOE_ERR_INVALID_ARG);
    const ipc_section *t = ipc_msg_find(&d, IPC_SEC_TEXT);
    assert_non_null(t);
    assert_int_equal(t->nbytes, strlen("expert id 99 out of range"));
    moe_free(buf);
    /* An error reply to an op this side does not know (a newer client's) still decodes. */
    assert_int_equal(ipc_error_init(&m, 0x33, 79, MOE_ERR_PROTOCOL, "unknown op 0x0033"), MOE_OK);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    assert_int_equal(d.op, 0x33);
    moe_free(buf);
    assert_int_equal(ipc_error_init(&m, 0, 80, MOE_ERR_PROTOCOL, "not a moe-engine message"), MOE_OK);
    assert_int_equal(m.op, IPC_OP_PING);
    /* but a successful reply of an unknown op does not */
    ipc_reply_init(&m, 0x33, 81);
    assert_int_equal(ipc_encode_alloc(&m, &buf, &len), MOE_OK);
    ipc_limits rl = ipc_limits_default();
    rl.accept = IPC_ACCEPT_REPLIES;
    assert_int_equal(ipc_decode(buf, len, &rl, &d), MOE_ERR_PROTOCOL);
    moe_free(buf);
}

static void test_roundtrip_submit_modes(void **state) {
    (void)state;
    sub_fixture f;
    make_submit(&f, 4);
    ipc_limits l = model_limits();
    ipc_msg d;
    assert_int_equal(ipc_decode(f.buf, f.len, &l, &d), MOE_OK);
    assert_int_equal(d.layer, 5);
    assert_int_equal(d.top_k, 2);
    assert_memory_equal(ipc_msg_find(&d, IPC_SEC_X)->data, f.x, 4 * 32 * 4);
    assert_memory_equal(ipc_msg_find(&d, IPC_SEC_TOPK_IDS)->data, f.ids, 8 * 4);
    assert_memory_equal(ipc_msg_find(&d, IPC_SEC_TOPK_W)->data, f.w, 8 * 4);
    for (uint32_t i = 0; i < d.n_sections; i++)
        assert_int_equal(((const uint8_t *)d.sec[i].data - (const uint8_t *)f.buf) % 64, 0);
    moe_free(f.buf);

    /* logits mode, f16 x and bf16 logits */
    uint16_t x[2 * 32], lg[2 * 16];
    for (int i = 0; i < 64; i++)
        x[i] = moe_f32_to_f16((float)i / 8.0f);
    for (int i = 0; i < 32; i++)
        lg[i] = moe_f32_to_bf16((float)(i % 7) - 3.0f);
    moe_tensor tx = moe_tensor_view2(x, MOE_DTYPE_F16, 2, 32);
    moe_tensor tl = moe_tensor_view2(lg, MOE_DTYPE_BF16, 2, 16);
    ipc_msg m;
    void *buf;
    size_t len;
    assert_int_equal(ipc_submit_init(&m, 1, 0, &tx, NULL, NULL, &tl), MOE_OK);
    assert_int_equal(ipc_encode_alloc(&m, &buf, &len), MOE_OK);
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_OK);
    assert_int_equal(d.dtype, MOE_DTYPE_F16);
    assert_non_null(ipc_msg_find(&d, IPC_SEC_LOGITS));
    /* logits with the wrong expert count */
    l.n_experts = 15;
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "15"));
    moe_free(buf);

    /* x alone: only when the engine can route */
    l = model_limits();
    assert_int_equal(ipc_submit_init(&m, 2, 1, &tx, NULL, NULL, NULL), MOE_OK);
    assert_int_equal(ipc_encode_alloc(&m, &buf, &len), MOE_OK);
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_errmsg(), "router"));
    l.can_route = true;
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_OK);
    /* dtype not allowed */
    l.dtype_mask = 1u << MOE_DTYPE_BF16;
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "f16"));
    moe_free(buf);
}

/* Re-encodes a fixture after `edit` changed it, and returns the decode status. */
static moe_status decode_edited(sub_fixture *f, const ipc_limits *l) {
    void *buf;
    size_t len;
    assert_int_equal(ipc_encode_alloc(&f->m, &buf, &len), MOE_OK);
    ipc_msg d;
    moe_status st = ipc_decode(buf, len, l, &d);
    moe_free(buf);
    return st;
}

static void test_semantic_checks(void **state) {
    (void)state;
    ipc_limits l = model_limits();
    sub_fixture f;
    make_submit(&f, 4);
    moe_free(f.buf);
    assert_int_equal(decode_edited(&f, &l), MOE_OK);

    f.ids[5] = 16; /* token 2, slot 1 */
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "expert id 16 out of range [0, 16) at token 2, slot 1"));
    f.ids[5] = -1;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    f.ids[5] = 15;
    assert_int_equal(decode_edited(&f, &l), MOE_OK);

    f.w[3] = NAN;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "token 1, slot 1"));
    f.w[3] = -INFINITY;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    f.w[3] = 0.5f;

    f.m.layer = 8;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "layer 8 out of range [0, 8)"));
    f.m.layer = 2;
    uint8_t served[8] = {0, 0, 0, 1, 1, 1, 1, 1};
    l.layer_served = served;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_NOT_FOUND);
    f.m.layer = 3;
    assert_int_equal(decode_edited(&f, &l), MOE_OK);

    l.hidden = 64;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_errmsg(), "hidden size 32, the model's is 64"));
    l.hidden = 32;
    l.top_k = 4;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_INVALID_ARG);
    l.top_k = 0; /* any K in [1, E] */
    assert_int_equal(decode_edited(&f, &l), MOE_OK);
    l.max_tokens = 3;
    assert_int_equal(decode_edited(&f, &l), MOE_ERR_LIMIT);
    assert_non_null(strstr(moe_errmsg(), "4 tokens"));
    /* Without a model only the structure is checked: the bad id passes (the daemon always
     * gives a model; a client decoding replies does not). */
    f.ids[0] = 1000;
    ipc_limits none = ipc_limits_default();
    assert_int_equal(decode_edited(&f, &none), MOE_OK);
}

/* Builds a valid message, applies a byte patch, decodes with expect. */
static void expect_patch(const char *what, size_t off, const void *bytes, size_t n, moe_status expect,
                         const char *msg_part) {
    sub_fixture f;
    make_submit(&f, 2);
    uint8_t *b = f.buf;
    memcpy(b + off, bytes, n);
    ipc_msg d;
    moe_status st = ipc_decode(b, f.len, NULL, &d);
    if (st != expect)
        fail_msg("%s: got %s (%s), expected %s", what, moe_status_name(st), moe_errmsg(), moe_status_name(expect));
    if (msg_part && !strstr(moe_errmsg(), msg_part))
        fail_msg("%s: message '%s' lacks '%s'", what, moe_errmsg(), msg_part);
    moe_free(f.buf);
}

static void test_structural_rejections(void **state) {
    (void)state;
    uint8_t u8;
    uint16_t v16 = 2;
    uint8_t le32[4], le64[8];
    expect_patch("magic", 0, "MOEX", 4, MOE_ERR_PROTOCOL, "not a moe-engine message");
    put16((uint8_t *)&v16, 2);
    expect_patch("version 2", 4, &v16, 2, MOE_ERR_PROTOCOL, "protocol version 2 is not supported");
    put16((uint8_t *)&v16, 0);
    expect_patch("version 0", 4, &v16, 2, MOE_ERR_PROTOCOL, "version 0");
    put16((uint8_t *)&v16, 9);
    expect_patch("op 9", 6, &v16, 2, MOE_ERR_PROTOCOL, "unknown op");
    put16((uint8_t *)&v16, 0x80);
    expect_patch("internal op", 6, &v16, 2, MOE_ERR_PROTOCOL, "internal");
    put32(le32, 4);
    expect_patch("unknown flag", 8, le32, 4, MOE_ERR_PROTOCOL, "flags");
    put32(le32, IPC_FLAG_REPLY);
    expect_patch("reply to a server", 8, le32, 4, MOE_ERR_PROTOCOL, "reply where a request");
    put32(le32, 64 + 64 * 2);
    expect_patch("header_bytes", 12, le32, 4, MOE_ERR_FORMAT, "header_bytes");
    put64(le64, 12345);
    expect_patch("total", 24, le64, 8, MOE_ERR_FORMAT, "the frame has");
    put32(le32, 5);
    expect_patch("status in a request", 32, le32, 4, MOE_ERR_FORMAT, "status");
    put32(le32, 0xffffffffu);
    expect_patch("negative layer", 36, le32, 4, MOE_ERR_FORMAT, "negative");
    put32(le32, 3);
    expect_patch("T disagrees", 40, le32, 4, MOE_ERR_FORMAT, "header says");
    put32(le32, 3);
    expect_patch("K disagrees", 48, le32, 4, MOE_ERR_FORMAT, "topk_ids");
    u8 = 1;
    expect_patch("dtype disagrees", 52, &u8, 1, MOE_ERR_FORMAT, "header says");
    u8 = 9;
    expect_patch("bad header dtype", 52, &u8, 1, MOE_ERR_FORMAT, "dtype");
    u8 = 17;
    expect_patch("too many sections", 53, &u8, 1, MOE_ERR_FORMAT, "sections");
    u8 = 1;
    expect_patch("reserved", 54, &u8, 1, MOE_ERR_FORMAT, "reserved");
    expect_patch("reserved2", 61, &u8, 1, MOE_ERR_FORMAT, "reserved");
    /* descriptors: the first at 64 */
    put16((uint8_t *)&v16, 0);
    expect_patch("kind 0", 64, &v16, 2, MOE_ERR_FORMAT, "kind 0");
    put16((uint8_t *)&v16, 9);
    expect_patch("unknown kind", 64, &v16, 2, MOE_ERR_FORMAT, "not allowed");
    put16((uint8_t *)&v16, 2);
    expect_patch("two ids sections", 64, &v16, 2, MOE_ERR_FORMAT, "two topk_ids");
    u8 = 7;
    expect_patch("bad dtype", 66, &u8, 1, MOE_ERR_FORMAT, "invalid dtype");
    u8 = 5;
    expect_patch("rank 5", 67, &u8, 1, MOE_ERR_FORMAT, "rank");
    u8 = 1;
    expect_patch("desc reserved", 68, &u8, 1, MOE_ERR_FORMAT, "reserved");
    put64(le64, 64 * 4 + 64);
    expect_patch("misplaced offset", 72, le64, 8, MOE_ERR_FORMAT, "offset");
    put64(le64, 64 * 4 + 1);
    expect_patch("unaligned offset", 72, le64, 8, MOE_ERR_FORMAT, "offset");
    put64(le64, 100);
    expect_patch("nbytes disagree", 80, le64, 8, MOE_ERR_FORMAT, "shape and dtype make");
    put64(le64, 1ull << 40);
    expect_patch("dim over 2^31", 88, le64, 8, MOE_ERR_FORMAT, "over 2^31");
    put64(le64, 1);
    expect_patch("dim past rank", 104, le64, 8, MOE_ERR_FORMAT, "past the rank");
    u8 = 1;
    expect_patch("desc reserved 2", 120, &u8, 1, MOE_ERR_FORMAT, "reserved");
}

static void test_lengths_and_limits(void **state) {
    (void)state;
    sub_fixture f;
    make_submit(&f, 4);
    ipc_msg d;
    /* Every truncation fails cleanly; the request id is reported once the header is there. */
    for (size_t n = 0; n < f.len; n++) {
        moe_status st = ipc_decode(f.buf, n, NULL, &d);
        assert_true(st == MOE_ERR_PROTOCOL || st == MOE_ERR_FORMAT);
        if (n >= 24)
            assert_int_equal(d.request_id, 99);
    }
    /* A longer frame with the same header is refused too (total_bytes). */
    uint8_t *big = calloc(1, f.len + 64);
    memcpy(big, f.buf, f.len);
    assert_int_equal(ipc_decode(big, f.len + 64, NULL, &d), MOE_ERR_FORMAT);
    free(big);
    ipc_limits l = ipc_limits_default();
    l.max_msg_bytes = f.len - 1;
    assert_int_equal(ipc_decode(f.buf, f.len, &l, &d), MOE_ERR_LIMIT);
    assert_non_null(strstr(moe_errmsg(), "over the limit"));
    l.max_msg_bytes = f.len;
    assert_int_equal(ipc_decode(f.buf, f.len, &l, &d), MOE_OK);
    l.max_tokens = 3;
    assert_int_equal(ipc_decode(f.buf, f.len, &l, &d), MOE_ERR_LIMIT);
    assert_int_equal(ipc_decode(NULL, 10, NULL, &d), MOE_ERR_INVALID_ARG);
    /* A request where a reply is expected. */
    l = ipc_limits_default();
    l.accept = IPC_ACCEPT_REPLIES;
    assert_int_equal(ipc_decode(f.buf, f.len, &l, &d), MOE_ERR_PROTOCOL);
    moe_free(f.buf);
}

static void test_internal_ops(void **state) {
    (void)state;
    ipc_msg m, d;
    ipc_msg_init(&m, 0x0101, 42);
    m.flags = 0x00030000u; /* internal flag bits are free */
    m.layer = 7;
    m.n_tokens = 123; /* header fields are free for internal ops */
    int32_t rows[5] = {1, 2, 3, 4, 5};
    int64_t s1[1] = {5};
    float big[3][2][2];
    for (int i = 0; i < 12; i++)
        ((float *)big)[i] = (float)i;
    int64_t s3[3] = {3, 2, 2};
    for (int i = 0; i < IPC_MAX_SECTIONS - 1; i++)
        assert_int_equal(ipc_msg_add(&m, (uint16_t)(0x100 + i), MOE_DTYPE_I32, 1, s1, rows), MOE_OK);
    assert_int_equal(ipc_msg_add(&m, 0x200, MOE_DTYPE_F32, 3, s3, big), MOE_OK);
    assert_int_equal(ipc_msg_add(&m, 0x201, MOE_DTYPE_F32, 3, s3, big), MOE_ERR_LIMIT); /* 17th */
    void *buf;
    size_t len;
    assert_int_equal(ipc_encode_alloc(&m, &buf, &len), MOE_OK);
    assert_int_equal(ipc_decode(buf, len, NULL, &d), MOE_ERR_PROTOCOL);
    assert_int_equal(d.request_id, 42);
    ipc_limits l = ipc_limits_default();
    l.allow_internal = true;
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_OK);
    assert_int_equal(d.n_sections, IPC_MAX_SECTIONS);
    assert_int_equal(d.flags, 0x00030000u);
    assert_int_equal(d.n_tokens, 123);
    const ipc_section *s = ipc_msg_find(&d, 0x200);
    assert_non_null(s);
    assert_int_equal(s->ndim, 3);
    assert_int_equal(s->shape[0], 3);
    assert_memory_equal(s->data, big, sizeof big);
    moe_free(buf);
    /* Internal flag bits on a client op are refused. */
    ipc_msg_init(&m, IPC_OP_PING, 1);
    m.flags = 0x00010000u;
    assert_int_equal(ipc_encode_alloc(&m, &buf, &len), MOE_OK);
    assert_int_equal(ipc_decode(buf, len, &l, &d), MOE_ERR_PROTOCOL);
    moe_free(buf);
}

static void test_utf8(void **state) {
    (void)state;
    assert_true(ipc_utf8_valid("", 0));
    assert_true(ipc_utf8_valid("plain ascii", 11));
    assert_true(ipc_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9)); /* é € 😀 */
    assert_false(ipc_utf8_valid("a\0b", 3));
    assert_false(ipc_utf8_valid("\xc0\xaf", 2));          /* overlong */
    assert_false(ipc_utf8_valid("\xe0\x80\xaf", 3));      /* overlong */
    assert_false(ipc_utf8_valid("\xed\xa0\x80", 3));      /* surrogate */
    assert_false(ipc_utf8_valid("\xf4\x90\x80\x80", 4));  /* > U+10FFFF */
    assert_false(ipc_utf8_valid("\xc3", 1));              /* truncated */
    assert_false(ipc_utf8_valid("\x80", 1));              /* lone continuation */
    assert_false(ipc_utf8_valid("\xff", 1));
    /* error replies: long messages cut at a character boundary; bad UTF-8 replaced */
    char *longmsg = malloc(IPC_MAX_TEXT + 10);
    memset(longmsg, 'a', IPC_MAX_TEXT + 9);
    longmsg[IPC_MAX_TEXT - 1] = '\xc3';
    longmsg[IPC_MAX_TEXT] = '\xa9';
    longmsg[IPC_MAX_TEXT + 9] = '\0';
    ipc_msg m, d;
    void *buf;
    assert_int_equal(ipc_error_init(&m, IPC_OP_PING, 1, MOE_ERR_BUSY, longmsg), MOE_OK);
    assert_int_equal(m.sec[0].nbytes, IPC_MAX_TEXT - 1);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    moe_free(buf);
    assert_int_equal(ipc_error_init(&m, IPC_OP_PING, 1, MOE_ERR_BUSY, "bad \xff byte"), MOE_OK);
    roundtrip(&m, IPC_ACCEPT_REPLIES, &d, &buf);
    assert_non_null(memmem(d.sec[0].data, d.sec[0].nbytes, "not valid UTF-8", 15));
    moe_free(buf);
    free(longmsg);
    assert_int_equal(ipc_error_init(&m, IPC_OP_PING, 1, MOE_OK, "x"), MOE_ERR_INVALID_ARG);
}

static void test_unaligned_and_realign(void **state) {
    (void)state;
    sub_fixture f;
    make_submit(&f, 3);
    uint8_t *raw = malloc(f.len + 1);
    memcpy(raw + 1, f.buf, f.len); /* as ZeroMQ may hand a frame out: at an odd address */
    ipc_limits l = model_limits();
    ipc_msg d;
    assert_int_equal(ipc_decode(raw + 1, f.len, &l, &d), MOE_OK);
    assert_false(ipc_msg_aligned(&d));
    void *owned = NULL;
    assert_int_equal(ipc_msg_realign(&d, &owned), MOE_OK);
    assert_non_null(owned);
    assert_true(ipc_msg_aligned(&d));
    moe_tensor tx = ipc_section_tensor(ipc_msg_find(&d, IPC_SEC_X));
    assert_memory_equal(tx.data, f.x, 3 * 32 * 4);
    assert_memory_equal(ipc_msg_find(&d, IPC_SEC_TOPK_IDS)->data, f.ids, 6 * 4);
    moe_free(owned);
    /* An aligned message needs no copy. */
    assert_int_equal(ipc_decode(f.buf, f.len, &l, &d), MOE_OK);
    assert_true(ipc_msg_aligned(&d));
    assert_int_equal(ipc_msg_realign(&d, &owned), MOE_OK);
    assert_null(owned);
    free(raw);
    moe_free(f.buf);
}

static void test_random_mutations(void **state) {
    (void)state;
    moe_rng r;
    moe_rng_seed(&r, 1234);
    sub_fixture f;
    make_submit(&f, 4);
    ipc_limits l = model_limits();
    uint8_t *b = malloc(f.len);
    int ok = 0;
    for (int it = 0; it < 20000; it++) {
        memcpy(b, f.buf, f.len);
        int flips = 1 + (int)moe_rng_below(&r, 4);
        for (int k = 0; k < flips; k++) {
            uint32_t pos = moe_rng_below(&r, it % 2 ? 320 : (uint32_t)f.len); /* header-heavy */
            b[pos] ^= (uint8_t)(1u << moe_rng_below(&r, 8));
        }
        size_t len = f.len - (it % 7 == 0 ? moe_rng_below(&r, 64) : 0);
        ipc_msg d;
        moe_status st = ipc_decode(b, len, &l, &d);
        if (st == MOE_OK) {
            ok++;
            /* whatever passed is internally consistent */
            for (uint32_t i = 0; i < d.n_sections; i++) {
                const uint8_t *p = d.sec[i].data;
                assert_true(p >= b && p + d.sec[i].nbytes <= b + len);
            }
        } else {
            assert_true(st < 0 && st >= MOE_STATUS_MIN_);
        }
    }
    assert_true(ok > 0); /* flips inside x's payload stay valid */
    free(b);
    moe_free(f.buf);
}

/* ipc_encode_in_place over data already at its offsets gives the bytes of ipc_encode. */
static void test_encode_in_place(void **state) {
    (void)state;
    uint16_t y[5 * 24];
    for (int i = 0; i < 5 * 24; i++)
        y[i] = (uint16_t)(i * 2654435761u >> 7);
    moe_tensor yt = moe_tensor_view2(y, MOE_DTYPE_BF16, 5, 24);
    ipc_msg m;
    assert_int_equal(ipc_submit_reply_init(&m, 42, &yt), MOE_OK);
    void *ref = NULL;
    size_t ref_len = 0;
    assert_int_equal(ipc_encode_alloc(&m, &ref, &ref_len), MOE_OK);
    uint64_t offs[IPC_MAX_SECTIONS];
    size_t total = 0;
    assert_int_equal(ipc_section_offsets(&m, offs, &total), MOE_OK);
    assert_int_equal(total, ref_len);
    uint8_t *buf = moe_alloc(total);
    memset(buf, 0xAB, total); /* garbage where the header and padding go */
    memcpy(buf + offs[0], y, sizeof y);
    ipc_msg m2 = m;
    m2.sec[0].data = buf + offs[0];
    size_t len = 0;
    assert_int_equal(ipc_encode_in_place(&m2, buf, total, &len), MOE_OK);
    assert_int_equal(len, ref_len);
    assert_memory_equal(buf, ref, ref_len);
    /* data elsewhere than its offset is refused */
    assert_int_equal(ipc_encode_in_place(&m, buf, total, &len), MOE_ERR_INVALID_ARG);
    assert_int_equal(ipc_encode_in_place(&m2, buf, total - 1, &len), MOE_ERR_LIMIT);
    moe_free(buf);
    moe_free(ref);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_in_place),
        cmocka_unit_test(test_golden_submit),        cmocka_unit_test(test_golden_ping),
        cmocka_unit_test(test_roundtrip_ops),        cmocka_unit_test(test_roundtrip_submit_modes),
        cmocka_unit_test(test_semantic_checks),      cmocka_unit_test(test_structural_rejections),
        cmocka_unit_test(test_lengths_and_limits),   cmocka_unit_test(test_internal_ops),
        cmocka_unit_test(test_utf8),                 cmocka_unit_test(test_unaligned_and_realign),
        cmocka_unit_test(test_random_mutations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
