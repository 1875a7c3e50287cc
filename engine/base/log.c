/*
 * log.c: leveled, subsystem-filtered logging.
 *
 * The filter (moe_log_level_g, moe_log_subsys_mask_g) is checked by the MOE_LOG macro before
 * any argument is formatted. Configuration is set at start, before threads; afterwards it is
 * only read. Each line is formatted into one buffer and written with one write(2), so lines
 * from threads and processes sharing a file do not interleave.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "engine/base/moe_base.h"

int moe_log_level_g = MOE_LOG_INFO;
unsigned moe_log_subsys_mask_g = MOE_SUB_ALL;

static int log_fd = 2;
static char log_role[16] = "";
static int log_rank = -1;

static const char *level_names[] = {"none", "error", "warn", "info", "debug", "trace"};
static const char level_chars[] = "-EWIDT";

static const struct {
    const char *name;
    unsigned bit;
} subsys_names[] = {
    {"base", MOE_SUB_BASE}, {"kern", MOE_SUB_KERN}, {"par", MOE_SUB_PAR},
    {"ipc", MOE_SUB_IPC},   {"eng", MOE_SUB_ENG},   {"tool", MOE_SUB_TOOL},
};

const char *moe_log_level_name(moe_log_level l) {
    if ((int)l < 0 || (int)l > MOE_LOG_TRACE)
        return "invalid";
    return level_names[l];
}

void moe_log_set_level(moe_log_level l) {
    if ((int)l >= MOE_LOG_NONE && (int)l <= MOE_LOG_TRACE)
        moe_log_level_g = (int)l;
}

moe_status moe_log_set_level_str(const char *s) {
    if (!s)
        return moe_fail(MOE_ERR_INVALID_ARG, "log level: missing");
    for (int i = 0; i <= MOE_LOG_TRACE; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            moe_log_level_g = i;
            return MOE_OK;
        }
    }
    if (strcasecmp(s, "warning") == 0) {
        moe_log_level_g = MOE_LOG_WARN;
        return MOE_OK;
    }
    return moe_fail(MOE_ERR_INVALID_ARG, "unknown log level '%.32s' (error, warn, info, debug, trace, none)", s);
}

moe_status moe_log_set_subsys_str(const char *s) {
    if (!s)
        return moe_fail(MOE_ERR_INVALID_ARG, "log subsystems: missing");
    bool exclude = s[0] == '^';
    if (exclude)
        s++;
    unsigned mask = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ')
            tok++;
        if (strcasecmp(tok, "all") == 0) {
            mask |= MOE_SUB_ALL;
            continue;
        }
        bool found = false;
        for (size_t i = 0; i < sizeof subsys_names / sizeof subsys_names[0]; i++) {
            if (strcasecmp(tok, subsys_names[i].name) == 0) {
                mask |= subsys_names[i].bit;
                found = true;
            }
        }
        if (!found)
            return moe_fail(MOE_ERR_INVALID_ARG,
                            "unknown log subsystem '%.32s' (all, base, kern, par, ipc, eng, tool)", tok);
    }
    moe_log_subsys_mask_g = exclude ? (MOE_SUB_ALL & ~mask) : mask;
    return MOE_OK;
}

moe_status moe_log_init_from_env(void) {
    moe_status st = MOE_OK;
    const char *lv = getenv("MOE_LOG_LEVEL");
    if (lv && *lv) {
        moe_status s = moe_log_set_level_str(lv);
        if (s != MOE_OK)
            st = s;
    }
    const char *ss = getenv("MOE_LOG_SUBSYS");
    if (ss && *ss) {
        moe_status s = moe_log_set_subsys_str(ss);
        if (s != MOE_OK)
            st = s;
    }
    return st;
}

void moe_log_set_identity(const char *role, int rank) {
    snprintf(log_role, sizeof log_role, "%s", role ? role : "");
    log_rank = rank;
}

void moe_log_set_fd(int fd) { log_fd = fd; }

static const char *subsys_name(moe_log_subsys sub) {
    for (size_t i = 0; i < sizeof subsys_names / sizeof subsys_names[0]; i++)
        if (subsys_names[i].bit == (unsigned)sub)
            return subsys_names[i].name;
    return "moe";
}

void moe_log_write(moe_log_level l, moe_log_subsys sub, const char *file, int line, const char *fmt, ...) {
    char buf[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = (int)strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    n += snprintf(buf + n, sizeof buf - (size_t)n, ".%06ldZ %c %s[", ts.tv_nsec / 1000,
                  level_chars[(int)l >= 0 && (int)l <= MOE_LOG_TRACE ? (int)l : 0], subsys_name(sub));
    if (log_role[0])
        n += snprintf(buf + n, sizeof buf - (size_t)n, "%s ", log_role);
    if (log_rank >= 0)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "r%d ", log_rank);
    n += snprintf(buf + n, sizeof buf - (size_t)n, "p%d] ", (int)getpid());
    if (n >= (int)sizeof buf)
        n = (int)sizeof buf - 1;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    n += m;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    /* Debug and trace lines carry their source location. */
    if (l >= MOE_LOG_DEBUG && file) {
        const char *base = strrchr(file, '/');
        int k = snprintf(buf + n, sizeof buf - (size_t)n, " (%s:%d)", base ? base + 1 : file, line);
        if (k > 0)
            n += k;
        if (n > (int)sizeof buf - 2)
            n = (int)sizeof buf - 2;
    }
    buf[n++] = '\n';
    ssize_t w = write(log_fd, buf, (size_t)n);
    (void)w;
}
