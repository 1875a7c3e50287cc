/*
 * moe_client.c: the moe-client CLI, a thin shell over libmoeclient (ipc/moeclient.h).
 *
 *   moe-client [--endpoint EP] [--timeout-ms N] [--server-key F.pub] [--client-key F.key] CMD ...
 *     ping [--count N]
 *     info | stats                      the server's JSON document, pretty-printed
 *     submit --layer L (--x X.npy [--ids I.npy --weights W.npy | --logits G.npy] | --input IN.safetensors)
 *            [--dtype f32|f16|bf16] --out Y.npy|Y.safetensors
 *     bench [--concurrency C] [--tokens T] [--layer L] [--duration S] [--dtype D] [--mode ids|logits|route]
 *     keygen PREFIX                     writes PREFIX.pub and PREFIX.key (CURVE keypair)
 * Environment: MOE_ENDPOINT (default tcp://127.0.0.1:5555).
 *
 * .npy holding bf16: '<u2' bit patterns (tensorfile.h); --dtype f16 reads '<u2' as f16
 * instead. --dtype converts x (and logits) to that dtype before sending; y comes back in the
 * dtype of x. safetensors input: tensors named x, topk_ids, topk_w, logits.
 *
 * Exit status: 0 ok, 1 a failure (the server's or ours, with its message on stderr), 2 usage.
 * Single-threaded; one client.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ipc/cli/tensorfile.h"
#include "ipc/ipc_proto.h"
#include "ipc/moeclient.h"

typedef struct args {
    const char *endpoint, *server_key, *client_key, *cmd, *prefix;
    int32_t timeout_ms;
    int32_t busy_poll_us;
    int count;
    int32_t layer;
    const char *x, *ids, *weights, *logits, *input, *out, *dtype, *mode;
    int concurrency, tokens;
    double duration;
    uint64_t seed;
} args;

static void usage(void) {
    fprintf(stderr,
            "usage: moe-client [--endpoint EP] [--timeout-ms N] [--busy-poll-us N] [--server-key F.pub]\n"
            "                  [--client-key F.key] CMD\n"
            "  ping [--count N]\n"
            "  info | stats\n"
            "  submit --layer L (--x X.npy [--ids I.npy --weights W.npy | --logits G.npy] | --input IN.safetensors)\n"
            "         [--dtype f32|f16|bf16] --out Y.npy|Y.safetensors\n"
            "  bench [--concurrency C] [--tokens T] [--layer L] [--duration S] [--dtype D] [--mode ids|logits|route]\n"
            "  keygen PREFIX\n"
            "MOE_ENDPOINT sets the default endpoint (tcp://127.0.0.1:5555).\n");
}

static int fail(const char *what, int st, const char *msg) {
    fprintf(stderr, "moe-client: %s: %s: %s\n", what, moec_status_name(st), msg && *msg ? msg : moec_status_str(st));
    return 1;
}

static bool parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static int parse_args(int argc, char **argv, args *a) {
    memset(a, 0, sizeof *a);
    a->endpoint = getenv("MOE_ENDPOINT") && *getenv("MOE_ENDPOINT") ? getenv("MOE_ENDPOINT") : "tcp://127.0.0.1:5555";
    a->count = 1;
    a->concurrency = 4;
    a->tokens = 16;
    a->duration = 5.0;
    a->mode = "ids";
    a->seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (o[0] != '-') {
            if (!a->cmd)
                a->cmd = o;
            else if (!a->prefix)
                a->prefix = o;
            else
                return -1;
            continue;
        }
        if (strcmp(o, "-h") == 0 || strcmp(o, "--help") == 0)
            return -1;
        if (i + 1 >= argc) {
            fprintf(stderr, "moe-client: %s needs a value\n", o);
            return -1;
        }
        const char *v = argv[++i];
        long n;
        if (strcmp(o, "--endpoint") == 0)
            a->endpoint = v;
        else if (strcmp(o, "--server-key") == 0)
            a->server_key = v;
        else if (strcmp(o, "--client-key") == 0)
            a->client_key = v;
        else if (strcmp(o, "--x") == 0)
            a->x = v;
        else if (strcmp(o, "--ids") == 0)
            a->ids = v;
        else if (strcmp(o, "--weights") == 0)
            a->weights = v;
        else if (strcmp(o, "--logits") == 0)
            a->logits = v;
        else if (strcmp(o, "--input") == 0)
            a->input = v;
        else if (strcmp(o, "--out") == 0)
            a->out = v;
        else if (strcmp(o, "--dtype") == 0)
            a->dtype = v;
        else if (strcmp(o, "--mode") == 0)
            a->mode = v;
        else if (strcmp(o, "--timeout-ms") == 0 && parse_int(v, 1, 86400000, &n))
            a->timeout_ms = (int32_t)n;
        else if (strcmp(o, "--busy-poll-us") == 0 && parse_int(v, 0, 10000000, &n))
            a->busy_poll_us = (int32_t)n;
        else if (strcmp(o, "--count") == 0 && parse_int(v, 1, 1000000, &n))
            a->count = (int)n;
        else if (strcmp(o, "--layer") == 0 && parse_int(v, 0, 1 << 30, &n))
            a->layer = (int32_t)n;
        else if (strcmp(o, "--concurrency") == 0 && parse_int(v, 1, 4096, &n))
            a->concurrency = (int)n;
        else if (strcmp(o, "--tokens") == 0 && parse_int(v, 1, 1 << 24, &n))
            a->tokens = (int)n;
        else if (strcmp(o, "--seed") == 0 && parse_int(v, 0, 1L << 30, &n))
            a->seed = (uint64_t)n;
        else if (strcmp(o, "--duration") == 0) {
            char *end;
            a->duration = strtod(v, &end);
            if (*end || !(a->duration > 0 && a->duration <= 86400)) {
                fprintf(stderr, "moe-client: --duration %s: seconds in (0, 86400]\n", v);
                return -1;
            }
        } else {
            fprintf(stderr, "moe-client: unknown option or bad value: %s %s\n", o, v);
            return -1;
        }
    }
    return a->cmd ? 0 : -1;
}

static int connect_client(const args *a, moec_client_t **c) {
    moec_options o;
    moec_options_default(&o);
    if (a->timeout_ms)
        o.timeout_ms = a->timeout_ms;
    char spub[41], cpub[41], csec[41];
    if (a->server_key) {
        int st = moec_load_public_key(a->server_key, spub);
        if (st != MOEC_OK)
            return fail("--server-key", st, moe_errmsg());
        o.server_public_key = spub;
    }
    if (a->client_key) {
        if (!a->server_key) {
            fprintf(stderr, "moe-client: --client-key needs --server-key (CURVE)\n");
            return 2;
        }
        int st = moec_load_secret_key(a->client_key, cpub, csec);
        if (st != MOEC_OK)
            return fail("--client-key", st, moe_errmsg());
        o.client_public_key = cpub;
        o.client_secret_key = csec;
    }
    int st = moec_client_init(c, a->endpoint, &o);
    memset(csec, 0, sizeof csec);
    if (st != MOEC_OK)
        return fail("connect", st, moe_errmsg());
    /* waiting for replies, look without sleeping this long first (lower latency, a busy core) */
    if (a->busy_poll_us && (st = moec_client_set_busy_poll(*c, a->busy_poll_us)) != MOEC_OK)
        return fail("--busy-poll-us", st, moec_errmsg(*c));
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
static int cmd_ping(const args *a, moec_client_t *c) {
    for (int i = 0; i < a->count; i++) {
        uint64_t t0 = moe_now_ns();
        int st = moec_ping(c, a->timeout_ms);
        if (st != MOEC_OK)
            return fail("ping", st, moec_errmsg(c));
        printf("pong from %s: %.3f ms\n", a->endpoint, (double)(moe_now_ns() - t0) * 1e-6);
    }
    return 0;
}

static int cmd_json(const args *a, moec_client_t *c, bool info) {
    char *js = NULL;
    int st = info ? moec_info(c, &js, a->timeout_ms) : moec_stats(c, &js, a->timeout_ms);
    if (st != MOEC_OK)
        return fail(info ? "info" : "stats", st, moec_errmsg(c));
    cJSON *doc = cJSON_Parse(js);
    char *pretty = doc ? cJSON_Print(doc) : NULL;
    printf("%s\n", pretty ? pretty : js);
    cJSON_free(pretty);
    cJSON_Delete(doc);
    moec_free(js);
    return 0;
}

static bool ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

/* Converts t (owned or view) to dtype dt in place (replacing it with an owned copy). */
static moe_status convert_to(moe_tensor *t, moe_dtype dt) {
    if (t->dtype == dt)
        return MOE_OK;
    MOE_REQUIRE(moe_dtype_is_float(t->dtype) && moe_dtype_is_float(dt), MOE_ERR_INVALID_ARG,
                "cannot convert %s to %s", moe_dtype_name(t->dtype), moe_dtype_name(dt));
    moe_tensor o;
    MOE_CHECK(moe_tensor_alloc(&o, dt, t->ndim, t->shape));
    size_t n = (size_t)moe_tensor_numel(t);
    for (size_t i = 0; i < n; i++)
        moe_store_f32(dt, o.data, i, moe_load_f32(t->dtype, t->data, i));
    moe_tensor_free(t);
    *t = o;
    return MOE_OK;
}

/* A safetensors view copied into an owned tensor. */
static moe_status st_take(const st_file *f, const char *name, moe_tensor *out, bool *present) {
    moe_tensor v;
    moe_status st = st_get(f, name, &v);
    if (st == MOE_ERR_NOT_FOUND) {
        *present = false;
        return MOE_OK;
    }
    MOE_CHECK(st);
    MOE_CHECK(moe_tensor_alloc(out, v.dtype, v.ndim, v.shape));
    memcpy(out->data, v.data, moe_tensor_nbytes(&v));
    *present = true;
    return MOE_OK;
}

static int cmd_submit(const args *a, moec_client_t *c) {
    int rc = 1;
    moe_status st = MOE_OK;
    moe_tensor x = {0}, ids = {0}, w = {0}, lg = {0}, y = {0};
    bool has_ids = false, has_w = false, has_lg = false;
    moe_dtype want = MOE_DTYPE_COUNT_;
    if (a->dtype && (moe_dtype_parse(a->dtype, &want) != MOE_OK || !moe_dtype_is_float(want))) {
        fprintf(stderr, "moe-client: --dtype %s: f32, f16 or bf16\n", a->dtype);
        return 2;
    }
    int u2_as = want == MOE_DTYPE_F16 ? MOE_DTYPE_F16 : MOE_DTYPE_BF16;
    if (!a->out || (!a->x == !a->input)) {
        fprintf(stderr, "moe-client: submit needs --out and one of --x or --input\n");
        return 2;
    }
    if (a->input) {
        st_file *f = NULL;
        bool has_x = false;
        MOE_CHECK_GOTO(st_open(a->input, &f), st, done);
        st = st_take(f, "x", &x, &has_x);
        if (st == MOE_OK)
            st = st_take(f, "topk_ids", &ids, &has_ids);
        if (st == MOE_OK)
            st = st_take(f, "topk_w", &w, &has_w);
        if (st == MOE_OK)
            st = st_take(f, "logits", &lg, &has_lg);
        st_close(f);
        if (st == MOE_OK && !has_x)
            st = moe_fail(MOE_ERR_NOT_FOUND, "%s: no tensor 'x'", a->input);
        if (st != MOE_OK)
            goto done;
    } else {
        MOE_CHECK_GOTO(npy_read(a->x, u2_as, &x), st, done);
        if (a->ids || a->weights) {
            if (!a->ids || !a->weights) {
                st = moe_fail(MOE_ERR_INVALID_ARG, "--ids and --weights go together");
                goto done;
            }
            MOE_CHECK_GOTO(npy_read(a->ids, -1, &ids), st, done);
            MOE_CHECK_GOTO(npy_read(a->weights, -1, &w), st, done);
            has_ids = has_w = true;
        }
        if (a->logits) {
            MOE_CHECK_GOTO(npy_read(a->logits, u2_as, &lg), st, done);
            has_lg = true;
        }
    }
    if (has_ids != has_w || (has_ids && has_lg)) {
        st = moe_fail(MOE_ERR_INVALID_ARG, "give topk ids and weights together, or logits, not both");
        goto done;
    }
    if (x.ndim != 2 || !moe_dtype_is_float(x.dtype)) {
        st = moe_fail(MOE_ERR_INVALID_ARG, "x must be a float [T, H] tensor (is %s, rank %d)", moe_dtype_name(x.dtype),
                      (int)x.ndim);
        goto done;
    }
    if (want != MOE_DTYPE_COUNT_)
        MOE_CHECK_GOTO(convert_to(&x, want), st, done);
    if (has_ids) {
        if (ids.dtype != MOE_DTYPE_I32 || ids.ndim != 2 || ids.shape[0] != x.shape[0]) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "topk ids must be int32 [T = %lld, K]", (long long)x.shape[0]);
            goto done;
        }
        MOE_CHECK_GOTO(convert_to(&w, MOE_DTYPE_F32), st, done);
        if (w.ndim != 2 || w.shape[0] != ids.shape[0] || w.shape[1] != ids.shape[1]) {
            st = moe_fail(MOE_ERR_INVALID_ARG, "topk weights must be [T, K] like the ids");
            goto done;
        }
    }
    if (has_lg && (lg.ndim != 2 || lg.shape[0] != x.shape[0] || !moe_dtype_is_float(lg.dtype))) {
        st = moe_fail(MOE_ERR_INVALID_ARG, "logits must be a float [T = %lld, E] tensor", (long long)x.shape[0]);
        goto done;
    }
    MOE_CHECK_GOTO(moe_tensor_alloc(&y, x.dtype, 2, x.shape), st, done);
    moec_request r = {.layer = a->layer, .dtype = (int32_t)x.dtype, .n_tokens = x.shape[0], .hidden = x.shape[1],
                      .x = x.data};
    if (has_ids) {
        r.top_k = (int32_t)ids.shape[1];
        r.topk_ids = ids.data;
        r.topk_w = w.data;
    }
    if (has_lg) {
        r.n_experts = (int32_t)lg.shape[1];
        r.logits_dtype = (int32_t)lg.dtype;
        r.logits = lg.data;
    }
    int cst = moec_submit(c, &r, y.data, moe_tensor_nbytes(&y), a->timeout_ms);
    if (cst != MOEC_OK) {
        rc = fail("submit", cst, moec_errmsg(c));
        goto out;
    }
    if (ends_with(a->out, ".safetensors")) {
        const char *names[1] = {"y"};
        const moe_tensor *ts[1] = {&y};
        MOE_CHECK_GOTO(st_write(a->out, names, ts, 1), st, done);
    } else {
        MOE_CHECK_GOTO(npy_write(a->out, &y), st, done);
    }
    char d[96];
    printf("y %s written to %s\n", moe_tensor_desc(&y, d, sizeof d), a->out);
    rc = 0;
done:
    if (st != MOE_OK)
        rc = fail("submit", st, moe_errmsg());
out:
    moe_tensor_free(&x);
    moe_tensor_free(&ids);
    moe_tensor_free(&w);
    moe_tensor_free(&lg);
    moe_tensor_free(&y);
    return rc;
}

/* ------------------------------------------------------------------------------------------
 * bench: keeps `concurrency` requests of `tokens` tokens in flight for `duration` seconds.
 * Napkin math printed with the table: bytes per request = T*H*s (x) + T*K*8 (ids + w) or
 * T*E*s (logits); reply = T*H*s.
 * ---------------------------------------------------------------------------------------- */
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int json_int(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valueint : -1;
}

static int cmd_bench(const args *a, moec_client_t *c) {
    moe_dtype dt = MOE_DTYPE_BF16;
    if (a->dtype && (moe_dtype_parse(a->dtype, &dt) != MOE_OK || !moe_dtype_is_float(dt))) {
        fprintf(stderr, "moe-client: --dtype %s: f32, f16 or bf16\n", a->dtype);
        return 2;
    }
    int mode = strcmp(a->mode, "ids") == 0 ? 0 : strcmp(a->mode, "logits") == 0 ? 1 : strcmp(a->mode, "route") == 0 ? 2 : -1;
    if (mode < 0) {
        fprintf(stderr, "moe-client: --mode %s: ids, logits or route\n", a->mode);
        return 2;
    }
    char *js = NULL;
    int st = moec_info(c, &js, a->timeout_ms);
    if (st != MOEC_OK)
        return fail("bench: info", st, moec_errmsg(c));
    cJSON *doc = cJSON_Parse(js);
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(doc, "model");
    int H = json_int(m, "hidden"), E = json_int(m, "n_experts"), K = json_int(m, "top_k");
    cJSON_Delete(doc);
    moec_free(js);
    if (H < 1 || E < 1 || K < 1 || K > E) {
        fprintf(stderr, "moe-client: bench: INFO lacks model.hidden/n_experts/top_k\n");
        return 1;
    }
    int T = a->tokens, C = a->concurrency;
    size_t es = moe_dtype_size(dt), xb = (size_t)T * (size_t)H * es;
    /* a few distinct inputs, reused round-robin; one output buffer per slot */
    enum { NIN = 8 };
    void *xs[NIN];
    int32_t *idss[NIN];
    float *ws[NIN], *lgs[NIN];
    moe_rng r;
    moe_rng_seed(&r, a->seed);
    for (int i = 0; i < NIN; i++) {
        xs[i] = malloc(xb);
        idss[i] = malloc(sizeof(int32_t) * (size_t)T * (size_t)K);
        ws[i] = malloc(sizeof(float) * (size_t)T * (size_t)K);
        lgs[i] = malloc(sizeof(float) * (size_t)T * (size_t)E);
        for (size_t j = 0; j < (size_t)T * (size_t)H; j++)
            moe_store_f32(dt, xs[i], j, moe_rng_normal(&r));
        for (int t = 0; t < T; t++) {
            for (int k = 0; k < K; k++) { /* K distinct experts */
                int32_t e;
                bool dup;
                do {
                    e = (int32_t)moe_rng_below(&r, (uint32_t)E);
                    dup = false;
                    for (int q = 0; q < k; q++)
                        dup |= idss[i][t * K + q] == e;
                } while (dup);
                idss[i][t * K + k] = e;
                ws[i][t * K + k] = 1.0f / (float)K;
            }
            for (int e = 0; e < E; e++)
                lgs[i][(size_t)t * (size_t)E + (size_t)e] = moe_rng_normal(&r);
        }
    }
    void **ys = calloc((size_t)C, sizeof *ys);
    uint64_t *slot_id = calloc((size_t)C, sizeof *slot_id);
    for (int i = 0; i < C; i++)
        ys[i] = malloc(xb);
    size_t lat_cap = 1 << 16, n_lat = 0;
    double *lat = malloc(lat_cap * sizeof *lat);
    uint64_t ok = 0, errors = 0, sent = 0;
    int last_err = 0;
    char last_msg[256] = "";
    uint64_t t0 = moe_now_ns(), t_end = t0 + (uint64_t)(a->duration * 1e9);
    int in_flight = 0;
    bool stop = false;
    while (!stop || in_flight > 0) {
        while (!stop && in_flight < C) {
            int slot = -1;
            for (int i = 0; i < C && slot < 0; i++)
                if (!slot_id[i])
                    slot = i;
            int in = (int)(sent % NIN);
            moec_request q = {.layer = a->layer, .dtype = (int32_t)dt, .n_tokens = T, .hidden = H, .x = xs[in]};
            if (mode == 0) {
                q.top_k = K;
                q.topk_ids = idss[in];
                q.topk_w = ws[in];
            } else if (mode == 1) {
                q.n_experts = E;
                q.logits_dtype = MOEC_F32;
                q.logits = lgs[in];
            }
            int s = moec_submit_async(c, &q, ys[slot], xb, a->timeout_ms, &slot_id[slot]);
            if (s != MOEC_OK) {
                fail("bench: submit", s, moec_errmsg(c));
                stop = true;
                errors++;
                break;
            }
            sent++;
            in_flight++;
        }
        if (in_flight == 0)
            break;
        moec_result res;
        int s = moec_collect(c, -1, &res);
        if (s != MOEC_OK) {
            fail("bench: collect", s, moec_errmsg(c));
            break;
        }
        for (int i = 0; i < C; i++)
            if (slot_id[i] == res.request_id)
                slot_id[i] = 0;
        in_flight--;
        if (res.status == MOEC_OK) {
            ok++;
            if (n_lat == lat_cap) {
                lat_cap *= 2;
                lat = realloc(lat, lat_cap * sizeof *lat);
            }
            lat[n_lat++] = res.latency_ms;
        } else {
            errors++;
            last_err = res.status;
            snprintf(last_msg, sizeof last_msg, "%s", res.message);
        }
        if (moe_now_ns() >= t_end)
            stop = true;
    }
    double secs = (double)(moe_now_ns() - t0) * 1e-9;
    qsort(lat, n_lat, sizeof *lat, cmp_double);
#define PCT(p) (n_lat ? lat[(size_t)((double)(n_lat - 1) * (p) / 100.0 + 0.5)] : NAN)
    size_t req_bytes = xb + (mode == 0 ? (size_t)T * (size_t)K * 8 : mode == 1 ? (size_t)T * (size_t)E * 4 : 0);
    printf("moe-client bench: %s, layer %d, %d tokens/request, concurrency %d, %s, mode %s, %.2f s\n", a->endpoint,
           (int)a->layer, T, C, moe_dtype_name(dt), a->mode, secs);
    printf("  model: H %d, E %d, K %d; request %zu bytes, reply %zu bytes (payload)\n", H, E, K, req_bytes, xb);
    printf("%10s %10s %8s %12s %10s %9s %9s %9s %9s %10s\n", "requests", "ok", "errors", "tokens/s", "req/s",
           "p50_ms", "p90_ms", "p99_ms", "max_ms", "MB/s_in");
    printf("%10llu %10llu %8llu %12.1f %10.1f %9.3f %9.3f %9.3f %9.3f %10.2f\n", (unsigned long long)sent,
           (unsigned long long)ok, (unsigned long long)errors, (double)ok * T / secs, (double)ok / secs, PCT(50),
           PCT(90), PCT(99), n_lat ? lat[n_lat - 1] : NAN, (double)ok * (double)req_bytes / secs / 1e6);
    if (errors)
        fprintf(stderr, "moe-client: bench: %llu errors, the last: %s: %s\n", (unsigned long long)errors,
                moec_status_name(last_err), last_msg);
    for (int i = 0; i < NIN; i++) {
        free(xs[i]);
        free(idss[i]);
        free(ws[i]);
        free(lgs[i]);
    }
    for (int i = 0; i < C; i++)
        free(ys[i]);
    free(ys);
    free(slot_id);
    free(lat);
    return errors ? 1 : 0;
}

int main(int argc, char **argv) {
    moe_log_init_from_env();
    args a;
    if (parse_args(argc, argv, &a) != 0) {
        usage();
        return 2;
    }
    if (strcmp(a.cmd, "keygen") == 0) {
        if (!a.prefix) {
            usage();
            return 2;
        }
        moe_status st = ipc_keys_generate(a.prefix);
        if (st != MOE_OK)
            return fail("keygen", st, moe_errmsg());
        printf("wrote %s.pub (give it to the server's allow-list or to clients) and %s.key (keep it private)\n",
               a.prefix, a.prefix);
        return 0;
    }
    bool known = strcmp(a.cmd, "ping") == 0 || strcmp(a.cmd, "info") == 0 || strcmp(a.cmd, "stats") == 0 ||
                 strcmp(a.cmd, "submit") == 0 || strcmp(a.cmd, "bench") == 0;
    if (!known || a.prefix) {
        fprintf(stderr, "moe-client: unknown command or extra argument: %s %s\n", a.cmd, a.prefix ? a.prefix : "");
        usage();
        return 2;
    }
    moec_client_t *c = NULL;
    int rc = connect_client(&a, &c);
    if (rc)
        return rc;
    if (strcmp(a.cmd, "ping") == 0)
        rc = cmd_ping(&a, c);
    else if (strcmp(a.cmd, "info") == 0)
        rc = cmd_json(&a, c, true);
    else if (strcmp(a.cmd, "stats") == 0)
        rc = cmd_json(&a, c, false);
    else if (strcmp(a.cmd, "submit") == 0)
        rc = cmd_submit(&a, c);
    else
        rc = cmd_bench(&a, c);
    moec_client_free(c);
    return rc;
}
