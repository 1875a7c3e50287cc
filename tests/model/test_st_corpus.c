/*
 * test_st_corpus.c: every file of the kept fuzz corpus (tests/model/st_corpus/) through the
 * safetensors header parser under the normal build, with the fuzzer's property checks
 * (st_check.c): a regression test for every input the fuzzer ever found interesting. The
 * corpus also holds the hand-written seeds (gen_st_corpus.py): valid files, which must be
 * accepted, are named "valid-*".
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

#include "engine/model/model.h"
#include "tests/model/st_check.h"

#define CORPUS "tests/model/st_corpus"

static void test_corpus(void **state) {
    (void)state;
    DIR *d = opendir(CORPUS);
    if (!d)
        fail_msg("cannot open %s (run from the workspace root)", CORPUS);
    struct dirent *de;
    int n = 0, valid = 0;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", CORPUS, de->d_name);
        FILE *f = fopen(path, "rb");
        assert_non_null(f);
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *buf = malloc(len > 0 ? (size_t)len : 1);
        assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
        fclose(f);
        const char *bad = st_check_input(buf, (size_t)len);
        if (bad)
            fail_msg("%s: %s", path, bad);
        if (strncmp(de->d_name, "valid-", 6) == 0) {
            eng_st_header h;
            if (eng_st_header_parse(buf, (size_t)len, (uint64_t)len, path, &h) != MOE_OK)
                fail_msg("%s must parse: %s", path, moe_errmsg());
            eng_st_header_free(&h);
            valid++;
        }
        free(buf);
        n++;
    }
    closedir(d);
    print_message("%d corpus files (%d valid seeds)\n", n, valid);
    assert_true(n >= 20);
    assert_true(valid >= 3);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_corpus)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
