/*
 * config.c: the config table and its loaders (defaults, file, environment, flags).
 * Main thread only, at start.
 */
#include "engine/config.h"

#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define S(field) ENG_CFG_STRING, offsetof(eng_config, field), sizeof(((eng_config *)0)->field)
#define E(field) ENG_CFG_ENUM, offsetof(eng_config, field), sizeof(((eng_config *)0)->field)
#define I(field) ENG_CFG_INT, offsetof(eng_config, field), sizeof(int32_t)
#define L(field) ENG_CFG_INT64, offsetof(eng_config, field), sizeof(int64_t)

const eng_cfg_entry eng_cfg_table[] = {
    {"model", S(model), "", 0, 0, NULL, "checkpoint folder (config.json + *.safetensors); empty: the embedded default model"},
    {"workers", I(workers), "2", 1, 256, NULL, "worker processes in CPU mode (with --gpus: one per GPU)"},
    {"gpus", S(gpus), "", 0, 0, NULL, "comma list of GPU ordinals, one worker each; empty: CPU workers"},
    {"backend", E(backend), "auto", 0, 0, "auto|cpu|cpu-ref|cuda", "kernel backend of the workers (auto: cuda with --gpus, else cpu)"},
    {"placement", E(placement), "contiguous", 0, 0, "contiguous|round-robin", "which worker holds which experts"},
    {"layers", S(layers), "all", 0, 0, NULL, "served MoE layers: all, or a comma list of layer indices"},
    {"worker-threads", I(worker_threads), "0", 0, 1024, NULL, "threads per CPU worker (0: cores / workers)"},
    {"data-path", E(data_path), "shm", 0, 0, "shm|zmq",
     "how step tensors reach the workers: shared memory (one copy) or ZeroMQ messages"},
    {"bind", S(bind), "tcp://127.0.0.1:5555", 0, 0, NULL, "client endpoint (ZeroMQ); bound to localhost unless told otherwise"},
    {"http", S(http), "127.0.0.1:9464", 0, 0, NULL, "host:port of the /metrics and /health endpoints; empty: off"},
    {"runtime-dir", S(runtime_dir), "", 0, 0, NULL, "folder for worker sockets and the embedded model (default $XDG_RUNTIME_DIR or /tmp)"},
    {"curve-secret-file", S(curve_secret_file), "", 0, 0, NULL, "server CURVE key file (public + secret, Z85); empty: no encryption"},
    {"curve-allow-file", S(curve_allow_file), "", 0, 0, NULL, "allow-list of client public keys (Z85, one per line); needs CURVE"},
    {"max-tokens", I(max_tokens), "8192", 1, 1 << 20, NULL, "tokens per request"},
    {"max-step-tokens", I(max_step_tokens), "16384", 1, 1 << 22, NULL, "tokens per step: requests of one layer are coalesced up to this"},
    {"max-msg-bytes", L(max_msg_bytes), "268435456", 4096, (int64_t)1 << 36, NULL, "largest client message (ZMQ_MAXMSGSIZE)"},
    {"max-queue", I(max_queue), "1024", 1, 1 << 20, NULL, "requests waiting for a step; beyond it the reply is BUSY"},
    {"max-inflight-steps", I(max_inflight_steps), "2", 1, 64, NULL, "steps dispatched to the workers and not yet answered"},
    {"io-threads", I(io_threads), "2", 1, 63, NULL,
     "ZeroMQ I/O threads of the coordinator for the clients: their connections are spread over them (one TCP stream "
     "carries ~2-3 GB/s); the workers' connections have one more of their own"},
    {"heartbeat-ms", I(heartbeat_ms), "200", 10, 60000, NULL, "worker heartbeat period"},
    {"busy-poll-us", I(busy_poll_us), "-1", -1, 10000000, NULL,
     "after each step (and while steps are in flight) the coordinator and the workers look for the next message "
     "without sleeping for this long: lower latency for small requests (no wake-up from an idle core), at the cost of "
     "a busy core each; 0: off; -1: 1000 with GPU workers (a GPU worker spins during its steps anyway), off with CPU "
     "workers (their cores compute)"},
    {"worker-timeout-ms", I(worker_timeout_ms), "3000", 50, 3600000, NULL, "no heartbeat for this long: the worker is hung"},
    {"step-timeout-ms", I(step_timeout_ms), "30000", 50, 3600000, NULL, "a step unanswered this long fails and restarts the workers"},
    {"start-timeout-ms", I(start_timeout_ms), "120000", 100, 3600000, NULL, "workers not ready this long after a (re)start: queued work fails"},
    {"drain-timeout-ms", I(drain_timeout_ms), "10000", 0, 3600000, NULL, "on SIGTERM: time to finish the work in flight"},
    {"max-restarts", I(max_restarts), "100", 0, 1000000, NULL, "worker group restarts before the engine gives up"},
    {"dbo", E(dbo), "auto", 0, 0, "on|off|auto", "dual-batch overlap (GPU workers)"},
    {"dbo-split", E(dbo_split), "tokens", 0, 0, "tokens|experts",
     "how DBO halves a step: the first and second half of the tokens (each half reads every local expert's "
     "weights; the first half's rows go to the host while the second computes), or every token with the first "
     "and second half of each rank's experts (the weights read once; no gain measured: runs 81-87)"},
    {"dbo-min-tokens", I(dbo_min_tokens), "8192", 1, 1 << 22, NULL,
     "with --dbo auto: overlap only at and above this many tokens per step (and --dbo-min-rows)"},
    {"dbo-min-rows", I(dbo_min_rows), "256", 0, 1 << 22, NULL,
     "with --dbo auto: overlap only where each micro-batch has at least this many rows per expert (T K / E / 2 "
     "split by tokens, T K / E by experts): there the second read of the weights costs little (2x H200, runs "
     "86-87, Qwen3 shape at W = 2, split by tokens: 128 rows slower than off, 192 even, 256 and 512 5-16% "
     "faster; DeepSeek-V3 shape at 32 rows 49% slower, run 6)"},
    {"dbo-sm-reserve", I(dbo_sm_reserve), "16", 0, 112, NULL,
     "with DBO: SMs that micro-batch 1's products lend to micro-batch 0's exchange (NCCL kernels) while it runs "
     "(0: none, the exchange then waits for the products to end; 2x H200, run 81: 16 took a DBO step at 4096 "
     "tokens per GPU from 1958 to 1723 us; docs/PERF.md)"},
    {"dbo-first-share", I(dbo_first_share), "50", 10, 90, NULL,
     "with DBO split by experts: the percent of each rank's experts in the first micro-batch (its exchange runs "
     "beside the second's products; the second's exchange runs alone, so a larger first part leaves less of the "
     "exchange exposed)"},
    {"combine-parts", E(combine_parts), "auto", 0, 0, "auto|1|2|3|4",
     "GPU workers at W > 1: the exchange, the sum and the copy of the rows out in this many parts by tokens (the "
     "products stay one call; with DBO by tokens each micro-batch's, at most 2 each), so that each part's copy to "
     "the host runs beside the next part's exchange; auto: 2 where a rank's output rows of the call are at least "
     "8 MiB (16 with DBO), else 1 (2x H200, runs 87 and 92: Qwen3 shape, W = 2, 5-8% off the step from 4096 "
     "tokens a step, 7% more at 2048; with DBO 1-4% off from 16384 tokens, 2-3% more at 8192)"},
    {"exchange", E(exchange), "p2p", 0, 0, "p2p|ce",
     "GPU workers at W > 1: how the slot rows are exchanged: p2p, NCCL's grouped send/recv (SM kernels); ce, "
     "ncclAlltoAll on symmetric windows with NCCL's zero-CTA policy (the copy engines, no SM: a DBO step lends "
     "none; NCCL 2.28 and newer), parts padded to the largest pair's rows"},
    {"log-level", E(log_level), "info", 0, 0, "error|warn|info|debug|trace|none", "the lowest level of log lines written"},
    {"log-subsys", S(log_subsys), "all", 0, 0, NULL, "log subsystems: all, or a list of base,kern,par,ipc,eng,tool (^ excludes)"},
};
const size_t eng_cfg_table_len = sizeof eng_cfg_table / sizeof eng_cfg_table[0];

static const eng_cfg_entry *find_entry(const char *name) {
    for (size_t i = 0; i < eng_cfg_table_len; i++)
        if (strcmp(eng_cfg_table[i].name, name) == 0)
            return &eng_cfg_table[i];
    /* accept underscores for dashes (config files, env) */
    char alt[64];
    size_t n = strlen(name);
    if (n >= sizeof alt)
        return NULL;
    for (size_t i = 0; i <= n; i++)
        alt[i] = name[i] == '_' ? '-' : (char)tolower((unsigned char)name[i]);
    for (size_t i = 0; i < eng_cfg_table_len; i++)
        if (strcmp(eng_cfg_table[i].name, alt) == 0)
            return &eng_cfg_table[i];
    return NULL;
}

static bool enum_has(const char *enums, const char *v) {
    size_t n = strlen(v);
    for (const char *p = enums; *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0)
            return true;
        if (!bar)
            break;
        p = bar + 1;
    }
    return false;
}

static moe_status set_entry(eng_config *c, const eng_cfg_entry *e, const char *value) {
    char *base = (char *)c + e->offset;
    switch (e->type) {
    case ENG_CFG_INT:
    case ENG_CFG_INT64: {
        errno = 0;
        char *end = NULL;
        long long v = strtoll(value, &end, 0);
        if (errno || !end || end == value || *end != '\0')
            return moe_fail(MOE_ERR_INVALID_ARG, "config %s: '%.64s' is not an integer", e->name, value);
        if (v < e->min || v > e->max)
            return moe_fail(MOE_ERR_INVALID_ARG, "config %s: %lld is outside [%lld, %lld]", e->name, v,
                            (long long)e->min, (long long)e->max);
        if (e->type == ENG_CFG_INT)
            *(int32_t *)base = (int32_t)v;
        else
            *(int64_t *)base = (int64_t)v;
        return MOE_OK;
    }
    case ENG_CFG_ENUM:
        if (!enum_has(e->enums, value))
            return moe_fail(MOE_ERR_INVALID_ARG, "config %s: '%.64s' is not one of %s", e->name, value, e->enums);
        /* fallthrough */
    case ENG_CFG_STRING:
        if (strlen(value) >= e->size)
            return moe_fail(MOE_ERR_INVALID_ARG, "config %s: value longer than %zu bytes", e->name, e->size - 1);
        memcpy(base, value, strlen(value) + 1);
        return MOE_OK;
    }
    return moe_fail(MOE_ERR_INTERNAL, "config %s: unknown type", e->name);
}

moe_status eng_config_set(eng_config *c, const char *name, const char *value) {
    MOE_REQUIRE(c && name && value, MOE_ERR_INVALID_ARG, "config: NULL argument");
    const eng_cfg_entry *e = find_entry(name);
    if (!e)
        return moe_fail(MOE_ERR_INVALID_ARG, "unknown setting '%.64s' (see --help)", name);
    return set_entry(c, e, value);
}

static moe_status apply_env(eng_config *c) {
    for (size_t i = 0; i < eng_cfg_table_len; i++) {
        char env[80] = "MOE_";
        size_t n = 4;
        for (const char *p = eng_cfg_table[i].name; *p && n < sizeof env - 1; p++)
            env[n++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
        env[n] = '\0';
        const char *v = getenv(env);
        if (v) {
            moe_status st = set_entry(c, &eng_cfg_table[i], v);
            if (st != MOE_OK)
                return moe_fail(st, "environment %s: %s", env, moe_errmsg());
        }
    }
    return MOE_OK;
}

moe_status eng_config_defaults(eng_config *c) {
    MOE_REQUIRE(c, MOE_ERR_INVALID_ARG, "config: NULL");
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < eng_cfg_table_len; i++)
        MOE_CHECK(set_entry(c, &eng_cfg_table[i], eng_cfg_table[i].dflt));
    return MOE_OK;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

static moe_status load_file(eng_config *c, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        return moe_fail(MOE_ERR_IO, "config file %s: %s", path, moe_strerror_(errno));
    char line[1024];
    int lineno = 0;
    moe_status st = MOE_OK;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        if (!strchr(line, '\n') && !feof(f)) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "config file %s:%d: line too long", path, lineno);
            break;
        }
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *s = trim(line);
        if (!*s)
            continue;
        char *sep = s;
        while (*sep && !isspace((unsigned char)*sep) && *sep != '=')
            sep++;
        char *value = sep;
        if (*sep) {
            *sep = '\0';
            value = trim(sep + 1);
            if (*value == '=')
                value = trim(value + 1);
        }
        size_t vl = strlen(value);
        if (vl >= 2 && value[0] == '"' && value[vl - 1] == '"') {
            value[vl - 1] = '\0';
            value++;
        }
        st = eng_config_set(c, s, value);
        if (st != MOE_OK) {
            st = moe_fail(st, "config file %s:%d: %s", path, lineno, moe_errmsg());
            break;
        }
    }
    fclose(f);
    return st;
}

moe_status eng_config_validate(const eng_config *c) {
    MOE_REQUIRE(c->max_step_tokens >= c->max_tokens, MOE_ERR_INVALID_ARG,
                "config: max-step-tokens (%d) must be >= max-tokens (%d): a request must fit in one step",
                (int)c->max_step_tokens, (int)c->max_tokens);
    MOE_REQUIRE(c->worker_timeout_ms > c->heartbeat_ms, MOE_ERR_INVALID_ARG,
                "config: worker-timeout-ms (%d) must exceed heartbeat-ms (%d)", (int)c->worker_timeout_ms,
                (int)c->heartbeat_ms);
    MOE_REQUIRE(!c->curve_allow_file[0] || c->curve_secret_file[0], MOE_ERR_INVALID_ARG,
                "config: curve-allow-file needs curve-secret-file (the allow-list is checked by CURVE)");
    if (c->gpus[0]) {
        for (const char *p = c->gpus; *p; p++)
            MOE_REQUIRE(isdigit((unsigned char)*p) || *p == ',', MOE_ERR_INVALID_ARG,
                        "config: gpus '%s' must be a comma list of GPU ordinals", c->gpus);
    }
    if (strcmp(c->layers, "all") != 0) {
        for (const char *p = c->layers; *p; p++)
            MOE_REQUIRE(isdigit((unsigned char)*p) || *p == ',', MOE_ERR_INVALID_ARG,
                        "config: layers '%s' must be 'all' or a comma list of layer indices", c->layers);
    }
    return MOE_OK;
}

moe_status eng_config_load(eng_config *c, int argc, char **argv) {
    MOE_CHECK(eng_config_defaults(c));
    /* The config file first (flags override it), wherever --config stands. */
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--config") == 0) {
            if (i + 1 >= argc)
                return moe_fail(MOE_ERR_INVALID_ARG, "--config needs a file");
            MOE_CHECK(load_file(c, argv[i + 1]));
        } else if (strncmp(a, "--config=", 9) == 0) {
            MOE_CHECK(load_file(c, a + 9));
        }
    }
    MOE_CHECK(apply_env(c));
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0)
            return moe_fail(MOE_ERR_INVALID_ARG, "unexpected argument '%.64s' (see --help)", a);
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        char key[64];
        const char *value;
        if (eq) {
            size_t n = (size_t)(eq - name);
            if (n >= sizeof key)
                return moe_fail(MOE_ERR_INVALID_ARG, "unknown flag '%.64s'", a);
            memcpy(key, name, n);
            key[n] = '\0';
            value = eq + 1;
        } else {
            if (strlen(name) >= sizeof key)
                return moe_fail(MOE_ERR_INVALID_ARG, "unknown flag '%.64s'", a);
            strcpy(key, name);
            if (i + 1 >= argc)
                return moe_fail(MOE_ERR_INVALID_ARG, "flag --%s needs a value", key);
            value = argv[++i];
        }
        if (strcmp(key, "config") == 0)
            continue;
        const eng_cfg_entry *e = find_entry(key);
        if (!e)
            return moe_fail(MOE_ERR_INVALID_ARG, "unknown flag --%s (see --help)", key);
        MOE_CHECK(set_entry(c, e, value));
    }
    return eng_config_validate(c);
}

static void value_text(const eng_config *c, const eng_cfg_entry *e, char *buf, size_t cap) {
    const char *base = (const char *)c + e->offset;
    switch (e->type) {
    case ENG_CFG_INT:
        snprintf(buf, cap, "%d", (int)*(const int32_t *)base);
        break;
    case ENG_CFG_INT64:
        snprintf(buf, cap, "%lld", (long long)*(const int64_t *)base);
        break;
    default:
        snprintf(buf, cap, "%s", base);
    }
}

void eng_config_help(FILE *f) {
    for (size_t i = 0; i < eng_cfg_table_len; i++) {
        const eng_cfg_entry *e = &eng_cfg_table[i];
        char flag[96];
        snprintf(flag, sizeof flag, "--%s %s", e->name,
                 e->type == ENG_CFG_ENUM ? e->enums : (e->type == ENG_CFG_STRING ? "TEXT" : "N"));
        fprintf(f, "  %-34s %s\n", flag, e->doc);
        if (e->type == ENG_CFG_INT || e->type == ENG_CFG_INT64)
            fprintf(f, "  %-34s (default %s; %lld..%lld)\n", "", e->dflt, (long long)e->min, (long long)e->max);
        else
            fprintf(f, "  %-34s (default \"%s\")\n", "", e->dflt);
    }
}

void eng_config_print(const eng_config *c, FILE *f) {
    for (size_t i = 0; i < eng_cfg_table_len; i++) {
        char v[ENG_PATH_MAX];
        value_text(c, &eng_cfg_table[i], v, sizeof v);
        fprintf(f, "%s %s\n", eng_cfg_table[i].name, v);
    }
}

void eng_config_log(const eng_config *c) {
    if (!moe_log_enabled(MOE_LOG_INFO, MOE_SUB_ENG))
        return;
    char line[1800];
    size_t n = 0;
    for (size_t i = 0; i < eng_cfg_table_len; i++) {
        char v[ENG_PATH_MAX];
        value_text(c, &eng_cfg_table[i], v, sizeof v);
        int k = snprintf(line + n, sizeof line - n, "%s%s=%s", i ? " " : "", eng_cfg_table[i].name, v[0] ? v : "\"\"");
        if (k < 0 || (size_t)k >= sizeof line - n)
            break;
        n += (size_t)k;
    }
    MOE_INFO(MOE_SUB_ENG, "config: %s", line);
}
