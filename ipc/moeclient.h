/*
 * moeclient.h: libmoeclient, the C client of moe-engine (wire protocol v1, docs/protocol.md).
 * Link with -lmoeclient -lzmq (or the static //ipc:moeclient). Plain C, no other headers of
 * ours: this file is all a user needs.
 *
 *   moec_client_t *c;
 *   if (moec_client_init(&c, "tcp://127.0.0.1:5555", NULL) != MOEC_OK) ...
 *   moec_request r = {.layer = 3, .dtype = MOEC_BF16, .n_tokens = T, .hidden = H, .x = x,
 *                     .top_k = K, .topk_ids = ids, .topk_w = w};
 *   int st = moec_submit(c, &r, y, y_bytes, 5000);      // y [T, H] bf16
 *   if (st != MOEC_OK) fprintf(stderr, "%s: %s\n", moec_status_name(st), moec_errmsg(c));
 *   moec_client_free(c);
 *
 * Threads: a client belongs to one thread at a time (its ZeroMQ socket is not thread-safe);
 * use one client per thread. Different clients are independent.
 *
 * Failure model: every request ends exactly once: with its result, with the server's error
 * (the status codes below, the server's message in moec_errmsg / moec_result.message), or
 * with MOEC_ERR_TIMEOUT when no reply came within its timeout (the server is down, restarted
 * and lost it, or is overloaded). The connection re-establishes itself after a server
 * restart: later requests succeed without any call from the user. A reply that arrives after
 * its request timed out is dropped.
 */
#ifndef MOECLIENT_H
#define MOECLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOEC_PROTOCOL_VERSION 1

/* Status codes: 0 ok, negative errors. The values are the server's status codes (they travel
 * in error replies) and never change. */
typedef enum moec_status {
    MOEC_OK = 0,
    MOEC_ERR_INVALID_ARG = -1,  /* a bad argument, or a request that does not fit the model */
    MOEC_ERR_NOMEM = -2,
    MOEC_ERR_IO = -3,
    MOEC_ERR_SYSTEM = -4,
    MOEC_ERR_CUDA = -5,         /* server side */
    MOEC_ERR_CUBLAS = -6,       /* server side */
    MOEC_ERR_NCCL = -7,         /* server side */
    MOEC_ERR_ZMQ = -8,
    MOEC_ERR_UV = -9,           /* server side */
    MOEC_ERR_UNSUPPORTED = -10, /* e.g. routing asked of a server without router weights */
    MOEC_ERR_FORMAT = -11,      /* a malformed message or file */
    MOEC_ERR_PROTOCOL = -12,    /* protocol violation or version mismatch */
    MOEC_ERR_TIMEOUT = -13,     /* no reply within the timeout */
    MOEC_ERR_BUSY = -14,        /* the server's (or this client's) queue is full: retry later */
    MOEC_ERR_NOT_FOUND = -15,   /* e.g. a layer that is not served; moec_collect: nothing in flight */
    MOEC_ERR_SHUTDOWN = -16,    /* the server is stopping */
    MOEC_ERR_ALIAS = -17,
    MOEC_ERR_WORKER = -18,      /* a server worker failed; the request was not computed */
    MOEC_ERR_AUTH = -19,        /* the server refused this client's key or mechanism */
    MOEC_ERR_INTERNAL = -20,
    MOEC_ERR_LIMIT = -21        /* over a server limit (tokens per request, message size) */
} moec_status;

const char *moec_status_name(int status); /* "MOEC_ERR_TIMEOUT" */
const char *moec_status_str(int status);  /* "timed out" */

/* Element types (the wire's dtype values). bf16 and f16 are 16-bit patterns (uint16_t). */
typedef enum moec_dtype {
    MOEC_F32 = 0,
    MOEC_F16 = 1,
    MOEC_BF16 = 2,
    MOEC_I32 = 3
} moec_dtype;

size_t moec_dtype_size(int dtype); /* 0 for an unknown dtype */

typedef struct moec_options {
    int32_t timeout_ms;     /* default timeout of a request (0: 10000) */
    uint64_t max_msg_bytes; /* largest reply accepted (0: 256 MiB) */
    int32_t max_in_flight;  /* requests outstanding at most (0: 1024); more: MOEC_ERR_BUSY */
    /* CURVE (encryption + authentication); all NULL: none. The server's public key enables it;
     * the client's keypair is the one on the server's allow-list (NULL: a fresh keypair, which
     * an allow-list will refuse). Keys are 40-character Z85 strings. */
    const char *server_public_key;
    const char *client_public_key;
    const char *client_secret_key;
} moec_options;

void moec_options_default(moec_options *o);
/* Key files as the server uses them: "NAME.pub" (one Z85 line), "NAME.key" ("public <Z85>" and
 * "secret <Z85>" lines). out/pub/sec get 41 bytes (NUL-terminated). */
int moec_load_public_key(const char *path, char out[41]);
int moec_load_secret_key(const char *path, char pub[41], char sec[41]);

typedef struct moec_client moec_client_t; /* opaque */

/* Connects (in the background: this returns at once; the first request waits for the
 * connection within its timeout). opt may be NULL. */
int moec_client_init(moec_client_t **out, const char *endpoint, const moec_options *opt);
void moec_client_free(moec_client_t *c);
/* Waiting for a reply, look for it without sleeping for up to `us` microseconds first (then
 * block as usual): a lower round trip for small requests (no wake-up of an idle core), at the
 * cost of a busy core while waiting. 0 (the default): off. */
int moec_client_set_busy_poll(moec_client_t *c, int32_t us);
/* The message of this client's last failed call ("" after a success). */
const char *moec_errmsg(const moec_client_t *c);

/* timeout_ms <= 0: the client's default. */
int moec_ping(moec_client_t *c, int32_t timeout_ms);
/* INFO / STATS: a JSON document (docs/protocol.md lists the fields); free with moec_free. */
int moec_info(moec_client_t *c, char **json, int32_t timeout_ms);
int moec_stats(moec_client_t *c, char **json, int32_t timeout_ms);
void moec_free(void *p);

/* One MoE layer's token batch. Three forms:
 *   top_k > 0:                  topk_ids [T, K] int32 and topk_w [T, K] float are given;
 *   logits != NULL:             router logits [T, n_experts] of logits_dtype, the server routes;
 *   neither:                    the server routes with the model's router (if it has one). */
typedef struct moec_request {
    int32_t layer;
    int32_t dtype;          /* of x, and of y: MOEC_F32, MOEC_F16 or MOEC_BF16 */
    int64_t n_tokens;       /* T >= 1 */
    int64_t hidden;         /* H, the model's hidden size */
    const void *x;          /* [T, H] */
    int32_t top_k;
    const int32_t *topk_ids;
    const float *topk_w;
    int32_t n_experts;
    int32_t logits_dtype;
    const void *logits;
} moec_request;

/* Sends r and waits for y [T, H] (r->dtype; y_bytes >= T * H * size). */
int moec_submit(moec_client_t *c, const moec_request *r, void *y, size_t y_bytes, int32_t timeout_ms);

/* Asynchronous: sends r and returns at once with its request id. The request's inputs may be
 * reused on return (they were copied into the message); y must stay valid until the request
 * is collected (its result is written there). */
int moec_submit_async(moec_client_t *c, const moec_request *r, void *y, size_t y_bytes, int32_t timeout_ms,
                      uint64_t *request_id);

typedef struct moec_result {
    uint64_t request_id;
    int32_t status;      /* MOEC_OK: y holds the output */
    double latency_ms;   /* from send to reply (or to the timeout) */
    char message[256];   /* the error, "" when ok */
} moec_result;

/* Waits up to wait_ms (0: just look; < 0: until the next completion) for any asynchronous
 * request to complete, in completion order. MOEC_OK with *res filled; MOEC_ERR_TIMEOUT when
 * none completed in time; MOEC_ERR_NOT_FOUND when none is outstanding. */
int moec_collect(moec_client_t *c, int32_t wait_ms, moec_result *res);
/* Asynchronous requests not yet collected. */
int moec_in_flight(const moec_client_t *c);

#ifdef __cplusplus
}
#endif
#endif /* MOECLIENT_H */
