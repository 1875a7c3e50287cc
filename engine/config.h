/*
 * config.h: the daemon's one config table (Redis's manner): every setting has a name, a type,
 * bounds, a default and a line of documentation. Values come, in increasing priority, from the
 * defaults, a config file (--config FILE: "name value" lines, # comments), the environment
 * (MOE_<NAME>, upper case, '-' as '_') and the command line (--name value or --name=value).
 * Everything is validated at start; the effective configuration is logged once.
 *
 * Threads: filled once at start by the main thread, read-only afterwards.
 */
#ifndef ENG_CONFIG_H
#define ENG_CONFIG_H

#include <stdio.h>

#include "engine/base/moe_base.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ENG_PATH_MAX 512

typedef struct eng_config {
    /* model and placement */
    char model[ENG_PATH_MAX];      /* checkpoint folder, or "" for the embedded default model */
    int32_t workers;               /* worker processes (CPU mode) */
    char gpus[128];                /* comma list of GPU ordinals ("" = CPU workers) */
    char backend[16];              /* kernel backend of the workers: auto, cpu, cpu-ref, cuda */
    char placement[16];            /* contiguous | round-robin */
    char layers[256];              /* served MoE layers: "all" or a comma list of layer indices */
    int32_t worker_threads;        /* threads per CPU worker (0: cores / workers) */
    char data_path[8];             /* shm | zmq: how step tensors reach the workers */
    /* network */
    char bind[256];                /* client endpoint (ZeroMQ) */
    char http[128];                /* host:port of /metrics and /health ("" = off) */
    char runtime_dir[ENG_PATH_MAX]; /* sockets and the embedded model ("" = $XDG_RUNTIME_DIR or /tmp) */
    char curve_secret_file[ENG_PATH_MAX]; /* server's CURVE secret key file ("" = no CURVE) */
    char curve_allow_file[ENG_PATH_MAX];  /* allow-list of client public keys ("" = any key) */
    /* limits */
    int32_t max_tokens;            /* tokens per request */
    int32_t max_step_tokens;       /* tokens per step (requests of a layer are coalesced up to this) */
    int64_t max_msg_bytes;         /* ZMQ_MAXMSGSIZE of the client socket */
    int32_t max_queue;             /* requests waiting; over it: BUSY */
    int32_t max_inflight_steps;    /* steps dispatched and not yet answered */
    int32_t io_threads;            /* ZeroMQ I/O threads of the coordinator (client connections) */
    /* health */
    int32_t heartbeat_ms;          /* worker heartbeat period */
    int32_t busy_poll_us;          /* poll without sleeping this long after work (coordinator, workers); -1 auto */
    int32_t worker_timeout_ms;     /* no heartbeat for this long: the worker is declared hung */
    int32_t step_timeout_ms;       /* a step not answered in this time fails and restarts the group */
    int32_t start_timeout_ms;      /* workers not ready after (re)start in this time: fail queued work */
    int32_t drain_timeout_ms;      /* SIGTERM: time to finish work in flight */
    int32_t max_restarts;          /* restarts of the worker group before giving up (0 = never restart) */
    /* overlap */
    char dbo[8];                   /* on | off | auto */
    char dbo_split[8];             /* tokens | experts: how DBO halves a step */
    char exchange[8];              /* p2p | ce: how GPU workers exchange slot rows (W > 1) */
    char combine_parts[8];         /* auto | 1 .. 4: each product call's exchange and copy-out in parts (W > 1) */
    int32_t dbo_min_tokens;        /* auto: DBO at and above this many tokens per step */
    int32_t dbo_min_rows;          /* auto: ... and this many rows per expert and micro-batch */
    int32_t dbo_sm_reserve;        /* with DBO: SMs the persistent products leave to the exchange */
    int32_t dbo_first_share;       /* DBO by experts: percent of each rank's experts in the first part */
    /* logging */
    char log_level[16];
    char log_subsys[64];
} eng_config;

typedef enum eng_cfg_type {
    ENG_CFG_INT,
    ENG_CFG_INT64,
    ENG_CFG_STRING,
    ENG_CFG_ENUM
} eng_cfg_type;

typedef struct eng_cfg_entry {
    const char *name;
    eng_cfg_type type;
    size_t offset;
    size_t size;       /* for strings: capacity */
    const char *dflt;  /* default, as text */
    int64_t min, max;  /* integers */
    const char *enums; /* ENUM: '|'-separated values */
    const char *doc;
} eng_cfg_entry;

extern const eng_cfg_entry eng_cfg_table[];
extern const size_t eng_cfg_table_len;

/* Defaults, then MOE_* environment; no file, no flags. */
moe_status eng_config_defaults(eng_config *c);
/*
 * Full load for `serve`: defaults, --config file, environment, flags. `argv` holds the flags
 * after the subcommand; unknown flags, missing values, bad numbers and out-of-bounds values are
 * errors naming the setting and its bounds. Positional arguments are errors.
 */
moe_status eng_config_load(eng_config *c, int argc, char **argv);
/* Sets one setting from text, with validation. */
moe_status eng_config_set(eng_config *c, const char *name, const char *value);
/* Prints "--name VALUE  doc (default ...; bounds)" lines for --help. */
void eng_config_help(FILE *f);
/* Logs the effective configuration once (INFO, subsystem eng), or prints it to f. */
void eng_config_log(const eng_config *c);
void eng_config_print(const eng_config *c, FILE *f);
/* Cross-field checks (e.g. max_step_tokens >= max_tokens). */
moe_status eng_config_validate(const eng_config *c);

#ifdef __cplusplus
}
#endif
#endif /* ENG_CONFIG_H */
