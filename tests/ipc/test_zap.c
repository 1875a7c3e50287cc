/*
 * test_zap.c: CURVE with the ZAP allow-list, end to end over TCP on 127.0.0.1 (the test
 * server on its own loop thread with ipc_zap; libmoeclient clients on the test thread), and
 * the key files.
 *   - an allowed key is served;
 *   - a client without a key (no CURVE), a client with a key not on the list, a client that
 *     has the wrong server key, and a client whose key was revoked (list edited + reload) are
 *     refused, and the server computed nothing for any of them;
 *   - a broken allow-list on reload keeps the old list in force.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "ipc/moeclient.h"
#include "tests/ipc/testsrv.h"

static char dir[4096];

static void path_of(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

static void write_text(const char *name, const char *text) {
    char p[4300];
    path_of(p, sizeof p, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

typedef struct keypair {
    char pub[41], sec[41];
} keypair;

static void gen(const char *name, keypair *k) {
    char p[4300];
    path_of(p, sizeof p, name);
    char kp[4400];
    snprintf(kp, sizeof kp, "%s.key", p);
    if (access(kp, F_OK) != 0)
        assert_int_equal(ipc_keys_generate(p), MOE_OK);
    assert_int_equal(ipc_keys_load_secret(kp, k->pub, k->sec), MOE_OK);
}

static keypair server_k, alice, bob, carol, other_server;

static int setup(void **state) {
    (void)state;
    const char *t = getenv("TEST_TMPDIR");
    snprintf(dir, sizeof dir, "%s/zap.%d", t ? t : "/tmp", (int)getpid());
    mkdir(dir, 0700);
    gen("server", &server_k);
    gen("alice", &alice);
    gen("bob", &bob);
    gen("carol", &carol);
    gen("other_server", &other_server);
    return 0;
}

/* alice always; carol as "public <key>" when allowed, as a comment once revoked */
static void write_allow(bool with_carol) {
    char text[1024];
    snprintf(text, sizeof text, "# clients allowed on the test server\n%s   # alice\n\n%s%s\n", alice.pub,
             with_carol ? "public " : "# revoked: ", carol.pub);
    write_text("allow.txt", text);
}

static testsrv_t *start_curve_server(void) {
    char sk[4300], al[4300];
    path_of(sk, sizeof sk, "server.key");
    path_of(al, sizeof al, "allow.txt");
    static char skp[4300], alp[4300];
    snprintf(skp, sizeof skp, "%s", sk);
    snprintf(alp, sizeof alp, "%s", al);
    testsrv_opts o;
    testsrv_opts_default(&o);
    o.secret_key_path = skp;
    o.allow_list_path = alp;
    testsrv_t *s = NULL;
    if (testsrv_start(&s, &o) != MOE_OK)
        fail_msg("testsrv_start: %s", moe_errmsg());
    return s;
}

static moec_client_t *client(const char *ep, const char *server_pub, const keypair *k) {
    moec_options o;
    moec_options_default(&o);
    o.timeout_ms = 1500;
    o.server_public_key = server_pub;
    if (k) {
        o.client_public_key = k->pub;
        o.client_secret_key = k->sec;
    }
    moec_client_t *c = NULL;
    assert_int_equal(moec_client_init(&c, ep, &o), MOEC_OK);
    return c;
}

/* A SUBMIT the toy model serves. */
static int submit_one(moec_client_t *c) {
    float x[64], w[2] = {0.5f, 0.5f}, y[64];
    int32_t ids[2] = {1, 2};
    for (int i = 0; i < 64; i++)
        x[i] = (float)i / 64.0f;
    moec_request r = {.layer = 0, .dtype = MOEC_F32, .n_tokens = 1, .hidden = 64, .x = x, .top_k = 2,
                      .topk_ids = ids, .topk_w = w};
    return moec_submit(c, &r, y, sizeof y, 0);
}

static void expect_refused(int st, const moec_client_t *c, const char *who) {
    if (st != MOEC_ERR_AUTH && st != MOEC_ERR_TIMEOUT)
        fail_msg("%s: expected a refusal, got %s (%s)", who, moec_status_name(st), moec_errmsg(c));
}

static void test_allowed_and_refused(void **state) {
    (void)state;
    write_allow(true);
    testsrv_t *s = start_curve_server();
    const char *ep = testsrv_endpoint(s);

    moec_client_t *a = client(ep, server_k.pub, &alice);
    assert_int_equal(moec_ping(a, 0), MOEC_OK);
    assert_int_equal(submit_one(a), MOEC_OK);
    assert_int_equal(testsrv_submits_ok(s), 1);

    /* no key at all: a plain client meets a CURVE server */
    moec_client_t *n = client(ep, NULL, NULL);
    int st = submit_one(n);
    expect_refused(st, n, "no key");
    moec_client_free(n);

    /* a key that is not on the list: the ZAP handler answers 400, the client says AUTH */
    moec_client_t *b = client(ep, server_k.pub, &bob);
    st = submit_one(b);
    assert_int_equal(st, MOEC_ERR_AUTH);
    assert_non_null(strstr(moec_errmsg(b), "allow-list"));
    moec_client_free(b);

    /* an ephemeral key (no client keypair given) is not on the list either */
    moec_client_t *e = client(ep, server_k.pub, NULL);
    assert_int_equal(submit_one(e), MOEC_ERR_AUTH);
    moec_client_free(e);

    /* the wrong server key: the server cannot read the handshake */
    moec_client_t *w = client(ep, other_server.pub, &alice);
    st = submit_one(w);
    expect_refused(st, w, "wrong server key");
    moec_client_free(w);

    assert_int_equal(testsrv_submits_ok(s), 1); /* nothing was computed for them */
    assert_int_equal(submit_one(a), MOEC_OK);   /* and alice is still served */
    moec_client_free(a);
    assert_int_equal(testsrv_stop(s), MOE_OK);
}

static void test_revocation_by_reload(void **state) {
    (void)state;
    write_allow(true);
    testsrv_t *s = start_curve_server();
    const char *ep = testsrv_endpoint(s);
    moec_client_t *c1 = client(ep, server_k.pub, &carol);
    assert_int_equal(submit_one(c1), MOEC_OK);
    moec_client_free(c1);
    write_allow(false);
    assert_int_equal(testsrv_reload_keys(s), MOE_OK);
    moec_client_t *c2 = client(ep, server_k.pub, &carol);
    assert_int_equal(submit_one(c2), MOEC_ERR_AUTH);
    moec_client_free(c2);
    assert_int_equal(testsrv_submits_ok(s), 1);
    /* a broken list does not replace the one in force: alice stays allowed, carol refused */
    write_text("allow.txt", "not-a-key\n");
    assert_int_equal(testsrv_reload_keys(s), MOE_ERR_FORMAT);
    moec_client_t *a = client(ep, server_k.pub, &alice);
    assert_int_equal(submit_one(a), MOEC_OK);
    moec_client_free(a);
    c2 = client(ep, server_k.pub, &carol);
    assert_int_equal(submit_one(c2), MOEC_ERR_AUTH);
    moec_client_free(c2);
    /* re-admitted after another reload */
    write_allow(true);
    assert_int_equal(testsrv_reload_keys(s), MOE_OK);
    c2 = client(ep, server_k.pub, &carol);
    assert_int_equal(submit_one(c2), MOEC_OK);
    moec_client_free(c2);
    assert_int_equal(testsrv_stop(s), MOE_OK);
}

static void test_key_files(void **state) {
    (void)state;
    char p[4300], q[4400];
    path_of(p, sizeof p, "server");
    assert_int_equal(ipc_keys_generate(p), MOE_ERR_IO); /* never overwrites */
    snprintf(q, sizeof q, "%s.pub", p);
    char pub[41], sec[41];
    assert_int_equal(ipc_keys_load_public(q, pub), MOE_OK);
    assert_string_equal(pub, server_k.pub);
    /* the public line of a secret key file works as a public key file */
    snprintf(q, sizeof q, "%s.key", p);
    assert_int_equal(ipc_keys_load_public(q, pub), MOE_OK);
    assert_string_equal(pub, server_k.pub);
    struct stat sb;
    assert_int_equal(stat(q, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    /* a secret file whose public key is someone else's */
    char text[256];
    snprintf(text, sizeof text, "public %s\nsecret %s\n", alice.pub, bob.sec);
    write_text("mixed.key", text);
    path_of(q, sizeof q, "mixed.key");
    assert_int_equal(ipc_keys_load_secret(q, pub, sec), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), "does not belong"));
    path_of(q, sizeof q, "alice.pub");
    assert_int_equal(ipc_keys_load_secret(q, pub, sec), MOE_ERR_FORMAT); /* no secret line */
    path_of(q, sizeof q, "missing.key");
    assert_int_equal(ipc_keys_load_secret(q, pub, sec), MOE_ERR_NOT_FOUND);
    /* allow-lists: comments, blank lines, "public" prefix; a bad line names its number */
    snprintf(text, sizeof text, "# a comment\n\n  %s  # alice\npublic %s\n", alice.pub, bob.pub);
    write_text("list.txt", text);
    path_of(q, sizeof q, "list.txt");
    char(*keys)[41] = NULL;
    size_t n = 0;
    assert_int_equal(ipc_keys_load_list(q, &keys, &n), MOE_OK);
    assert_int_equal(n, 2);
    assert_string_equal(keys[0], alice.pub);
    assert_string_equal(keys[1], bob.pub);
    free(keys);
    snprintf(text, sizeof text, "%s\n%.39s\n", alice.pub, bob.pub);
    write_text("list.txt", text);
    assert_int_equal(ipc_keys_load_list(q, &keys, &n), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_errmsg(), ":2:"));
    assert_true(ipc_key_z85_valid(alice.pub));
    assert_false(ipc_key_z85_valid("short"));
    /* through the client library's own helpers */
    path_of(q, sizeof q, "alice.key");
    assert_int_equal(moec_load_secret_key(q, pub, sec), MOEC_OK);
    assert_string_equal(pub, alice.pub);
}

int main(void) {
    moe_log_init_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_allowed_and_refused),
        cmocka_unit_test(test_revocation_by_reload),
        cmocka_unit_test(test_key_files),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
