/*
 * http.h: a minimal HTTP/1.0 server on a libuv loop for the probes: GET /metrics (Prometheus
 * text format) and GET /health. One request per connection; the request head is capped at
 * 8 KiB and must arrive within 5 s; anything else gets 400, 404 or 405 and the connection is
 * closed. Owned by the coordinator's loop thread.
 */
#ifndef ENG_HTTP_H
#define ENG_HTTP_H

#include <uv.h>

#include "engine/base/moe_base.h"

typedef struct eng_http eng_http_t;

/* Fills *body (malloc'd, the server frees it) and returns the HTTP status code. */
typedef int (*eng_http_handler)(void *user, const char *path, char **body, const char **content_type);

/* Listens on "host:port" (port 0: any free port; eng_http_port tells which). */
moe_status eng_http_init(eng_http_t **out, uv_loop_t *loop, const char *hostport, eng_http_handler h, void *user);
int eng_http_port(const eng_http_t *s);
/* Stops listening and closes every connection; cb runs when all handles are closed. */
void eng_http_close(eng_http_t *s, void (*cb)(void *user), void *user);

#endif /* ENG_HTTP_H */
