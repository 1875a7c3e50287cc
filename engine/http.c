/*
 * http.c: the probe server (http.h). Loop thread only. Each connection owns a 8 KiB buffer
 * and a timer; it is closed after one response, on a malformed or oversized request, or when
 * its 5 s timer fires. Every handle is closed with uv_close before its memory is freed.
 */
#include "engine/http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HTTP_MAX_HEAD 8192
#define HTTP_TIMEOUT_MS 5000

typedef struct http_conn http_conn;

struct eng_http {
    uv_loop_t *loop;
    uv_tcp_t listener;
    eng_http_handler handler;
    void *user;
    int port;
    bool closing;
    int open_handles; /* listener + connections' handles */
    http_conn *conns;
    void (*close_cb)(void *);
    void *close_user;
};

struct http_conn {
    eng_http_t *srv;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    char buf[HTTP_MAX_HEAD];
    size_t len;
    char *resp;
    bool responded, closing;
    int open;
    http_conn *next, *prev;
};

static void srv_maybe_done(eng_http_t *s) {
    if (s->closing && s->open_handles == 0) {
        void (*cb)(void *) = s->close_cb;
        void *u = s->close_user;
        free(s);
        if (cb)
            cb(u);
    }
}

static void conn_handle_closed(uv_handle_t *h) {
    http_conn *c = h->data;
    eng_http_t *s = c->srv;
    s->open_handles--;
    if (--c->open == 0) {
        if (c->prev)
            c->prev->next = c->next;
        else
            s->conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
        free(c->resp);
        free(c);
    }
    srv_maybe_done(s);
}

static void conn_close(http_conn *c) {
    if (c->closing)
        return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
}

static void on_written(uv_write_t *req, int status) {
    (void)status;
    conn_close(req->data);
}

static void respond(http_conn *c, int code, const char *ctype, const char *body) {
    if (c->responded)
        return;
    c->responded = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    const char *reason = code == 200 ? "OK"
                         : code == 400 ? "Bad Request"
                         : code == 404 ? "Not Found"
                         : code == 405 ? "Method Not Allowed"
                         : code == 503 ? "Service Unavailable"
                                       : "Error";
    size_t blen = strlen(body);
    size_t cap = blen + 256;
    c->resp = malloc(cap);
    if (!c->resp) {
        conn_close(c);
        return;
    }
    int n = snprintf(c->resp, cap,
                     "HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s", code,
                     reason, ctype, blen, body);
    uv_buf_t b = uv_buf_init(c->resp, (unsigned)n);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0)
        conn_close(c);
}

static void handle_request(http_conn *c) {
    /* "GET /path HTTP/1.x" */
    char method[8], path[256];
    if (sscanf(c->buf, "%7s %255s", method, path) != 2) {
        respond(c, 400, "text/plain", "bad request\n");
        return;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        respond(c, 405, "text/plain", "only GET\n");
        return;
    }
    char *q = strchr(path, '?');
    if (q)
        *q = '\0';
    char *body = NULL;
    const char *ctype = "text/plain; charset=utf-8";
    int code = c->srv->handler(c->srv->user, path, &body, &ctype);
    respond(c, code, ctype, body ? body : "");
    free(body);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)suggested;
    http_conn *c = h->data;
    buf->base = c->buf + c->len;
    buf->len = sizeof c->buf - 1 - c->len;
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
    (void)buf;
    http_conn *c = st->data;
    if (n < 0) {
        conn_close(c);
        return;
    }
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    if (strstr(c->buf, "\r\n\r\n") || strstr(c->buf, "\n\n")) {
        handle_request(c);
        return;
    }
    if (c->len >= sizeof c->buf - 1)
        respond(c, 400, "text/plain", "request head too large\n");
}

static void on_timeout(uv_timer_t *t) { conn_close(t->data); }

static void on_connection(uv_stream_t *server, int status) {
    eng_http_t *s = server->data;
    if (status < 0 || s->closing)
        return;
    http_conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->srv = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open = 2;
    s->open_handles += 2;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timeout, HTTP_TIMEOUT_MS, 0);
}

moe_status eng_http_init(eng_http_t **out, uv_loop_t *loop, const char *hostport, eng_http_handler h, void *user) {
    MOE_REQUIRE(out && loop && hostport && h, MOE_ERR_INVALID_ARG, "http: NULL argument");
    *out = NULL;
    char host[128];
    const char *colon = strrchr(hostport, ':');
    MOE_REQUIRE(colon && (size_t)(colon - hostport) < sizeof host, MOE_ERR_INVALID_ARG,
                "http: '%s' is not host:port", hostport);
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = '\0';
    char *end = NULL;
    long port = strtol(colon + 1, &end, 10);
    MOE_REQUIRE(end && *end == '\0' && port >= 0 && port <= 65535, MOE_ERR_INVALID_ARG,
                "http: bad port in '%s'", hostport);
    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)&addr) != 0)
        return moe_fail(MOE_ERR_INVALID_ARG, "http: '%s' is not an IP address", host);
    eng_http_t *s = calloc(1, sizeof *s);
    if (!s)
        return moe_fail(MOE_ERR_NOMEM, "http");
    s->loop = loop;
    s->handler = h;
    s->user = user;
    moe_status st = MOE_OK;
    MOE_UV_CHECK_GOTO(uv_tcp_init(loop, &s->listener), st, fail_mem);
    s->listener.data = s;
    s->open_handles = 1;
    MOE_UV_CHECK_GOTO(uv_tcp_bind(&s->listener, (const struct sockaddr *)&addr, 0), st, fail);
    MOE_UV_CHECK_GOTO(uv_listen((uv_stream_t *)&s->listener, 64, on_connection), st, fail);
    struct sockaddr_storage bound;
    int blen = sizeof bound;
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &blen);
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    *out = s;
    return MOE_OK;
fail:
    moe_fail(st, "http: cannot listen on %s: %s", hostport, moe_errmsg());
    s->closing = true;
    uv_close((uv_handle_t *)&s->listener, (uv_close_cb)NULL);
    /* the handle's memory is freed after its close callback: run the loop briefly */
    uv_run(loop, UV_RUN_NOWAIT);
    free(s);
    return st;
fail_mem:
    free(s);
    return st;
}

int eng_http_port(const eng_http_t *s) { return s ? s->port : -1; }

static void listener_closed(uv_handle_t *h) {
    eng_http_t *s = h->data;
    s->open_handles--;
    srv_maybe_done(s);
}

void eng_http_close(eng_http_t *s, void (*cb)(void *user), void *user) {
    if (!s) {
        if (cb)
            cb(user);
        return;
    }
    if (s->closing)
        return;
    s->closing = true;
    s->close_cb = cb;
    s->close_user = user;
    for (http_conn *c = s->conns; c; c = c->next)
        conn_close(c);
    uv_close((uv_handle_t *)&s->listener, listener_closed);
}
