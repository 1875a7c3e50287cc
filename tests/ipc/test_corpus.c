/*
 * test_corpus.c: the fuzz corpus as a regression test under the normal (gcc) build: every
 * file of tests/ipc/fuzz_corpus goes through fuzz_check_one (decode under four limit sets,
 * views inside the input, encode/decode round trip). Seed files named "<STATUS>-<what>" must
 * decode to that status under the default limits.
 */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/ipc/fuzz_check.h"

static char corpus_dir[4096];

static int read_all(const char *path, uint8_t **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(n > 0 ? (size_t)n : 1);
    if (n > 0 && fread(b, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(b);
        return -1;
    }
    fclose(f);
    *out = b;
    *len = (size_t)n;
    return 0;
}

static void test_corpus(void **state) {
    (void)state;
    DIR *d = opendir(corpus_dir);
    if (!d)
        fail_msg("cannot open %s", corpus_dir);
    struct dirent *e;
    int files = 0, named = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", corpus_dir, e->d_name);
        uint8_t *b = NULL;
        size_t n = 0;
        if (read_all(path, &b, &n) != 0)
            fail_msg("cannot read %s", path);
        /* a private copy at an odd address too: the decoder must not assume alignment */
        uint8_t *odd = malloc(n + 1);
        memcpy(odd + 1, b, n);
        moe_status st = fuzz_check_one(b, n);
        moe_status st2 = fuzz_check_one(odd + 1, n);
        assert_int_equal(st, st2);
        const char *dash = strchr(e->d_name, '-');
        if (dash) {
            char want[64];
            snprintf(want, sizeof want, "MOE_%s%.*s", strncmp(e->d_name, "OK", 2) ? "ERR_" : "",
                     (int)(dash - e->d_name), e->d_name);
            if (strcmp(moe_status_name(st), want) != 0)
                fail_msg("%s: decode gave %s (%s), the name says %s", e->d_name, moe_status_name(st), moe_errmsg(),
                         want);
            named++;
        }
        files++;
        free(odd);
        free(b);
    }
    closedir(d);
    printf("corpus: %d files, %d with an expected status\n", files, named);
    assert_true(named >= 15);
}

int main(void) {
    const char *src = getenv("TEST_SRCDIR");
    const char *ws = getenv("TEST_WORKSPACE");
    if (src && ws)
        snprintf(corpus_dir, sizeof corpus_dir, "%s/%s/tests/ipc/fuzz_corpus", src, ws);
    else
        snprintf(corpus_dir, sizeof corpus_dir, "tests/ipc/fuzz_corpus");
    moe_log_set_level(MOE_LOG_NONE);
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_corpus)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
