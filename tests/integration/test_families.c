/*
 * test_families.c: the real daemon serving a checkpoint of each model family written by the
 * independent numpy writer (tests/model/write_checkpoints.py), against the numpy reference's
 * expected outputs (tests/ref/moe_ref.py): for every MoE layer, the engine routes from the
 * hidden states itself, then from the reference's own top-k ids and weights; both outputs must
 * match the reference's y (fp32 <= 1e-5, bf16/fp16 <= 1e-2 normalized error). (The two paths
 * are not compared with each other bit for bit: the engine's fp32 routing weights may differ in
 * the last bit from the reference's float64 ones; tests/model/test_ckpt_ref checks the routed
 * ids themselves.)
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/integration/harness.h"

static const char *ckpt_root(void) {
    static char path[1024];
    const char *src = getenv("TEST_SRCDIR"), *ws = getenv("TEST_WORKSPACE");
    snprintf(path, sizeof path, "%s/%s/tests/model/ckpt", src ? src : ".", ws ? ws : "moe_engine");
    return path;
}

/* Reads tensor `name` of an open safetensors file into a fresh tensor of its own dtype. */
static bool read_tensor(eng_st_file *f, const char *name, moe_tensor *out) {
    const eng_st_tensor *t = eng_st_header_find(&f->hdr, name);
    if (!t)
        return false;
    moe_dtype dt;
    if (!eng_st_dtype_to_moe(t->dtype, &dt)) {
        if (t->dtype != ENG_ST_I32)
            return false;
        dt = MOE_DTYPE_I32;
    }
    int64_t shape[4] = {t->shape[0], t->ndim > 1 ? t->shape[1] : 1, 1, 1};
    if (moe_tensor_alloc(out, dt, t->ndim, shape) != MOE_OK)
        return false;
    if (dt == MOE_DTYPE_I32) {
        if (eng_st_file_map(f) != MOE_OK)
            return false;
        memcpy(out->data, f->map + t->offset, t->nbytes);
        return true;
    }
    return eng_st_file_read(f, t, dt, out->data) == MOE_OK;
}

static void run_case(const char *name, const char *workers) {
    char dir[1200], exp_path[1200];
    snprintf(dir, sizeof dir, "%s/%s", ckpt_root(), name);
    snprintf(exp_path, sizeof exp_path, "%s/%s.expected.safetensors", ckpt_root(), name);
    eng_ckpt_t *ck = NULL;
    assert_int_equal(eng_ckpt_open(&ck, dir), MOE_OK);
    const eng_model_desc *d = eng_ckpt_desc(ck);
    eng_st_file ef;
    memset(&ef, 0, sizeof ef);
    assert_int_equal(eng_st_file_open(&ef, exp_path), MOE_OK);

    daemon_proc dp;
    assert_true(h_daemon_start(&dp, (const char *[]){"--model", dir, "--workers", workers, NULL}, 60));
    h_client c;
    assert_true(h_client_open(&c, dp.endpoint));
    const double tol = d->dtype == MOE_DTYPE_F32 ? 1e-5 : 1e-2;
    for (int32_t li = 0; li < d->n_moe_layers; li++) {
        int32_t L = d->moe_layers[li];
        char nm[64];
        moe_tensor x = {0}, ids = {0}, w = {0}, y = {0};
        snprintf(nm, sizeof nm, "%d.x", (int)L);
        assert_true(read_tensor(&ef, nm, &x));
        snprintf(nm, sizeof nm, "%d.topk_ids", (int)L);
        assert_true(read_tensor(&ef, nm, &ids));
        snprintf(nm, sizeof nm, "%d.topk_w", (int)L);
        assert_true(read_tensor(&ef, nm, &w));
        snprintf(nm, sizeof nm, "%d.y", (int)L);
        assert_true(read_tensor(&ef, nm, &y));
        const size_t n = (size_t)moe_tensor_numel(&y);
        float *ref = malloc(n * sizeof(float));
        moe_to_f32(y.dtype, y.data, ref, n);
        for (int path = 0; path < 2; path++) { /* 0: the engine routes; 1: the reference's ids */
            ipc_msg m;
            assert_int_equal(ipc_submit_init(&m, (uint64_t)(L * 2 + path), L, &x, path ? &ids : NULL, path ? &w : NULL,
                                             NULL),
                             MOE_OK);
            assert_true(h_send_msg(&c, &m));
            void *buf = NULL;
            size_t len;
            ipc_msg rep;
            assert_true(h_recv(&c, 20000, &buf, &len, &rep));
            if (rep.status != 0) {
                const ipc_section *t = ipc_msg_find(&rep, IPC_SEC_TEXT);
                fprintf(stderr, "%s layer %d: error %d: %.*s\n", name, (int)L, (int)rep.status,
                        t ? (int)t->nbytes : 0, t ? (const char *)t->data : "");
            }
            assert_int_equal(rep.status, 0);
            const ipc_section *s = ipc_msg_find(&rep, IPC_SEC_Y);
            assert_non_null(s);
            assert_int_equal(s->dtype, y.dtype);
            assert_int_equal(s->nbytes, moe_tensor_nbytes(&y));
            float *got = malloc(n * sizeof(float));
            moe_to_f32(y.dtype, s->data, got, n);
            double err = h_rel_err(got, ref, n);
            fprintf(stderr, "%-22s layer %d (%s routing, %s workers): normalized error %.2e (tolerance %.0e)\n", name,
                    (int)L, path ? "given" : "engine", workers, err, tol);
            assert_true(err <= tol);
            free(got);
            moe_free(buf);
        }
        free(ref);
        moe_tensor_free(&x);
        moe_tensor_free(&ids);
        moe_tensor_free(&w);
        moe_tensor_free(&y);
    }
    h_client_close(&c);
    assert_int_equal(h_daemon_stop(&dp, 20), 0);
    eng_st_file_close(&ef);
    eng_ckpt_close(ck);
}

#define FAMILY_TEST(fn, name, workers)  \
    static void fn(void **state) {      \
        (void)state;                    \
        run_case(name, workers);        \
    }

FAMILY_TEST(test_mixtral_f32, "mixtral_f32", "2")
FAMILY_TEST(test_mixtral_bf16, "mixtral_bf16", "3")
FAMILY_TEST(test_mixtral_f16, "mixtral_f16", "2")
FAMILY_TEST(test_qwen2_moe_f32, "qwen2_moe_f32", "2")
FAMILY_TEST(test_qwen2_moe_bf16, "qwen2_moe_bf16", "4")
FAMILY_TEST(test_qwen3_moe_f32, "qwen3_moe_f32", "3")
FAMILY_TEST(test_qwen3_moe_bf16, "qwen3_moe_bf16", "2")
FAMILY_TEST(test_deepseek_v2_f32, "deepseek_v2_f32", "2")
FAMILY_TEST(test_deepseek_v2_bf16, "deepseek_v2_bf16", "3")
FAMILY_TEST(test_deepseek_v3_f32, "deepseek_v3_f32", "4")
FAMILY_TEST(test_deepseek_v3_bf16, "deepseek_v3_bf16", "2")
FAMILY_TEST(test_mixtral_fused_bf16, "mixtral_fused_bf16", "2")
FAMILY_TEST(test_deepseek_v3_fused_f32, "deepseek_v3_fused_f32", "1")

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixtral_f32),       cmocka_unit_test(test_mixtral_bf16),
        cmocka_unit_test(test_mixtral_f16),       cmocka_unit_test(test_qwen2_moe_f32),
        cmocka_unit_test(test_qwen2_moe_bf16),    cmocka_unit_test(test_qwen3_moe_f32),
        cmocka_unit_test(test_qwen3_moe_bf16),    cmocka_unit_test(test_deepseek_v2_f32),
        cmocka_unit_test(test_deepseek_v2_bf16),  cmocka_unit_test(test_deepseek_v3_f32),
        cmocka_unit_test(test_deepseek_v3_bf16),  cmocka_unit_test(test_mixtral_fused_bf16),
        cmocka_unit_test(test_deepseek_v3_fused_f32),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
