/*
 * test_config.c: the config table: defaults, file, environment and flag precedence, and a
 * clear error for every kind of bad value.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/config.h"

static void test_defaults(void **state) {
    (void)state;
    eng_config c;
    assert_int_equal(eng_config_defaults(&c), MOE_OK);
    assert_int_equal(c.workers, 2);
    assert_string_equal(c.bind, "tcp://127.0.0.1:5555");
    assert_string_equal(c.placement, "contiguous");
    assert_int_equal(c.max_msg_bytes, 268435456);
    assert_int_equal(c.dbo_sm_reserve, 16); /* SMs lent to DBO's first exchange while it runs (run 81) */
    assert_int_equal(c.dbo_first_share, 50); /* DBO by experts: halves unless asked */
    assert_string_equal(c.exchange, "p2p"); /* NCCL's grouped send/recv unless asked */
    assert_string_equal(c.combine_parts, "auto"); /* 2 parts where a rank's rows are >= 8 MiB */
    assert_string_equal(c.dbo_split, "tokens");     /* the split that measured a gain (runs 83-87) */
    assert_int_equal(c.dbo_min_tokens, 8192);
    assert_int_equal(c.dbo_min_rows, 256);
    assert_int_equal(eng_config_validate(&c), MOE_OK);
    /* every entry has a doc and a default that validates */
    for (size_t i = 0; i < eng_cfg_table_len; i++) {
        assert_true(strlen(eng_cfg_table[i].doc) > 10);
        assert_int_equal(eng_config_set(&c, eng_cfg_table[i].name, eng_cfg_table[i].dflt), MOE_OK);
    }
}

static void test_precedence(void **state) {
    (void)state;
    char path[] = "/tmp/moe-cfg-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "# comment\nworkers 3\nmax_queue = 77   # trailing comment\n\nplacement \"round-robin\"\n"
                       "bind tcp://127.0.0.1:6000\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    setenv("MOE_MAX_QUEUE", "88", 1);
    setenv("MOE_HEARTBEAT_MS", "150", 1);
    char *argv[] = {"--config", path, "--workers=4", "--bind", "tcp://127.0.0.1:7000"};
    eng_config c;
    assert_int_equal(eng_config_load(&c, 5, argv), MOE_OK);
    assert_int_equal(c.workers, 4);          /* flag beats file */
    assert_int_equal(c.max_queue, 88);       /* env beats file */
    assert_int_equal(c.heartbeat_ms, 150);   /* env */
    assert_string_equal(c.placement, "round-robin"); /* file */
    assert_string_equal(c.bind, "tcp://127.0.0.1:7000");
    unsetenv("MOE_MAX_QUEUE");
    unsetenv("MOE_HEARTBEAT_MS");
    unlink(path);
}

static void expect_status(int argc, char **argv, moe_status want, const char *needle) {
    eng_config c;
    moe_status st = eng_config_load(&c, argc, argv);
    assert_int_equal(st, want);
    if (!strstr(moe_errmsg(), needle))
        fprintf(stderr, "message '%s' lacks '%s'\n", moe_errmsg(), needle);
    assert_non_null(strstr(moe_errmsg(), needle));
}

static void expect_error(int argc, char **argv, const char *needle) { expect_status(argc, argv, MOE_ERR_INVALID_ARG, needle); }

static void test_errors(void **state) {
    (void)state;
    expect_error(2, (char *[]){"--workers", "0"}, "outside [1, 256]");
    expect_error(2, (char *[]){"--workers", "two"}, "not an integer");
    expect_error(2, (char *[]){"--workers", "3x"}, "not an integer");
    expect_error(1, (char *[]){"--workers"}, "needs a value");
    expect_error(2, (char *[]){"--nope", "1"}, "unknown flag --nope");
    expect_error(1, (char *[]){"positional"}, "unexpected argument");
    expect_error(2, (char *[]){"--placement", "random"}, "not one of contiguous|round-robin");
    expect_error(2, (char *[]){"--dbo", "maybe"}, "not one of on|off|auto");
    expect_error(2, (char *[]){"--busy-poll-us", "-2"}, "outside [-1, 10000000]");
    expect_error(2, (char *[]){"--dbo-sm-reserve", "113"}, "outside [0, 112]");
    expect_error(2, (char *[]){"--dbo-sm-reserve", "-1"}, "outside [0, 112]");
    expect_error(2, (char *[]){"--dbo-first-share", "95"}, "outside [10, 90]");
    expect_error(2, (char *[]){"--dbo-first-share", "9"}, "outside [10, 90]");
    expect_error(2, (char *[]){"--exchange", "dma"}, "not one of p2p|ce");
    expect_error(2, (char *[]){"--dbo-min-rows", "-1"}, "outside [0, 4194304]");
    expect_error(2, (char *[]){"--combine-parts", "5"}, "not one of auto|1|2|3|4");
    expect_error(2, (char *[]){"--combine-parts", "two"}, "not one of auto|1|2|3|4");
    expect_error(4, (char *[]){"--max-tokens", "100", "--max-step-tokens", "50"}, "must be >= max-tokens");
    expect_error(2, (char *[]){"--gpus", "0,a"}, "comma list of GPU ordinals");
    expect_error(2, (char *[]){"--layers", "1;2"}, "comma list of layer indices");
    expect_error(2, (char *[]){"--curve-allow-file", "/x"}, "needs curve-secret-file");
    expect_status(2, (char *[]){"--config", "/nonexistent/moe.conf"}, MOE_ERR_IO, "/nonexistent/moe.conf: No such file");
    char longv[600];
    memset(longv, 'a', sizeof longv - 1);
    longv[sizeof longv - 1] = '\0';
    expect_error(2, (char *[]){"--model", longv}, "longer than");
    setenv("MOE_WORKERS", "-5", 1);
    expect_error(0, NULL, "environment MOE_WORKERS");
    unsetenv("MOE_WORKERS");
}

static void test_help_lists_everything(void **state) {
    (void)state;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    eng_config_help(f);
    fclose(f);
    for (size_t i = 0; i < eng_cfg_table_len; i++) {
        char flag[80];
        snprintf(flag, sizeof flag, "--%s ", eng_cfg_table[i].name);
        assert_non_null(strstr(buf, flag));
    }
    free(buf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_help_lists_everything),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
