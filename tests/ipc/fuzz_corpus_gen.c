/*
 * fuzz_corpus_gen.c: writes the seed files of tests/ipc/fuzz_corpus (one message each, named
 * "<STATUS>-<what>" where STATUS is what ipc_decode must answer under the default limits:
 * OK, PROTOCOL, FORMAT, LIMIT). test_corpus.c checks those names; libFuzzer adds files
 * named by hash (property checks only). Run by hand when the protocol grows:
 *   bazel run //tests/ipc:fuzz_corpus_gen -- $PWD/tests/ipc/fuzz_corpus
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ipc/ipc_proto.h"

static const char *dir;

static void put(const char *name, const void *buf, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

static void put_msg(const char *name, const ipc_msg *m) {
    void *buf;
    size_t len;
    if (ipc_encode_alloc(m, &buf, &len) != MOE_OK) {
        fprintf(stderr, "%s: %s\n", name, moe_errmsg());
        exit(1);
    }
    put(name, buf, len);
    moe_free(buf);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_corpus_gen DIR\n");
        return 2;
    }
    dir = argv[1];
    ipc_msg m;
    for (uint16_t op = IPC_OP_PING; op <= IPC_OP_STATS; op++) {
        char name[64];
        ipc_msg_init(&m, op, op);
        snprintf(name, sizeof name, "OK-%s_request", ipc_op_name(op));
        put_msg(name, &m);
    }
    float x[2 * 16];
    for (int i = 0; i < 32; i++)
        x[i] = (float)i / 4.0f - 2.0f;
    int32_t ids[4] = {0, 7, 3, 1};
    float w[4] = {0.75f, 0.25f, 0.5f, 0.5f};
    uint16_t lg[2 * 8], xb[2 * 16];
    for (int i = 0; i < 16; i++)
        lg[i] = moe_f32_to_bf16((float)(i % 5) - 2.0f);
    for (int i = 0; i < 32; i++)
        xb[i] = moe_f32_to_f16((float)i / 8.0f);
    moe_tensor tx = moe_tensor_view2(x, MOE_DTYPE_F32, 2, 16);
    moe_tensor tx16 = moe_tensor_view2(xb, MOE_DTYPE_F16, 2, 16);
    moe_tensor ti = moe_tensor_view2(ids, MOE_DTYPE_I32, 2, 2);
    moe_tensor tw = moe_tensor_view2(w, MOE_DTYPE_F32, 2, 2);
    moe_tensor tl = moe_tensor_view2(lg, MOE_DTYPE_BF16, 2, 8);
    ipc_submit_init(&m, 10, 0, &tx, &ti, &tw, NULL);
    put_msg("OK-submit_ids_f32", &m);
    ipc_submit_init(&m, 11, 2, &tx16, NULL, NULL, &tl);
    put_msg("OK-submit_logits_bf16", &m);
    ipc_submit_init(&m, 12, 3, &tx16, NULL, NULL, NULL);
    m.timeout_ms = 1000;
    put_msg("OK-submit_route_f16", &m);
    /* replies (refused where requests are expected) */
    ipc_reply_init(&m, IPC_OP_PING, 1);
    put_msg("PROTOCOL-ping_reply", &m);
    const char *js = "{\"version\":\"0.1.0\",\"protocol\":1,\"model\":{\"n_experts\":8}}";
    ipc_reply_init(&m, IPC_OP_INFO, 2);
    ipc_msg_add_bytes(&m, IPC_SEC_JSON, js, strlen(js));
    put_msg("PROTOCOL-info_reply", &m);
    ipc_submit_reply_init(&m, 10, &tx);
    put_msg("PROTOCOL-submit_reply", &m);
    ipc_error_init(&m, IPC_OP_SUBMIT, 10, MOE_ERR_INVALID_ARG, "expert id 9 out of range [0, 8) at token 0, slot 1");
    put_msg("PROTOCOL-error_reply", &m);
    /* internal op with generic sections */
    ipc_msg_init(&m, 0x81, 99);
    int64_t s3[3] = {2, 2, 4};
    ipc_msg_add(&m, 0x100, MOE_DTYPE_F32, 3, s3, x);
    ipc_msg_add(&m, 0x101, MOE_DTYPE_I32, 2, (int64_t[]){2, 2}, ids);
    put_msg("PROTOCOL-internal_op", &m);
    /* broken ones */
    void *buf;
    size_t len;
    ipc_submit_init(&m, 13, 1, &tx, &ti, &tw, NULL);
    ipc_encode_alloc(&m, &buf, &len);
    uint8_t *b = buf;
    b[4] = 2;
    put("PROTOCOL-version_2", b, len);
    b[4] = 1;
    b[0] = 'X';
    put("PROTOCOL-bad_magic", b, len);
    b[0] = 'M';
    put("FORMAT-truncated", b, len - 5);
    put("FORMAT-header_only", b, 64);
    b[64 + 8] += 64; /* x section offset */
    put("FORMAT-bad_offset", b, len);
    b[64 + 8] -= 64;
    b[53] = 17;
    put("FORMAT-too_many_sections", b, len);
    b[53] = 3;
    b[64 + 64 + 2] = 0; /* ids as f32 */
    put("FORMAT-ids_dtype", b, len);
    moe_free(buf);
    return 0;
}
