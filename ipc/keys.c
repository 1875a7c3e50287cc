/*
 * keys.c: CURVE key files in Z85 text (ipc_proto.h gives the formats): generate, load, and
 * read allow-lists. Used by the daemon (server key, ZAP allow-list), libmoeclient and the CLI.
 * Any thread; no global state. Files are read whole with a size bound before parsing; a
 * malformed line is an error naming the file and the line, never skipped silently (a
 * mistyped key in an allow-list must not pass unnoticed).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

#include "ipc/ipc_proto.h"

#define KEYFILE_MAX_BYTES (16u << 20)

bool ipc_key_z85_valid(const char *s) {
    if (!s || strlen(s) != IPC_Z85_KEY_LEN)
        return false;
    uint8_t raw[32];
    return zmq_z85_decode(raw, s) != NULL;
}

/* Reads a whole file (at most KEYFILE_MAX_BYTES) into a NUL-terminated buffer. */
static moe_status read_file(const char *path, char **out, size_t *out_len) {
    moe_status st = MOE_OK;
    char *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_fail(errno == ENOENT ? MOE_ERR_NOT_FOUND : MOE_ERR_IO, "%s: %s", path, moe_strerror_(errno));
    struct stat sb;
    MOE_SYS_CHECK_GOTO(fstat(fd, &sb), st, done);
    if (sb.st_size < 0 || (uint64_t)sb.st_size > KEYFILE_MAX_BYTES) {
        st = moe_fail(MOE_ERR_LIMIT, "%s: %lld bytes is over %u for a key file", path, (long long)sb.st_size,
                      KEYFILE_MAX_BYTES);
        goto done;
    }
    buf = malloc((size_t)sb.st_size + 1);
    if (!buf) {
        st = moe_fail(MOE_ERR_NOMEM, "%s: %lld bytes", path, (long long)sb.st_size);
        goto done;
    }
    size_t got = 0;
    while (got < (size_t)sb.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)sb.st_size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            st = moe_fail(MOE_ERR_IO, "%s: %s", path, moe_strerror_(errno));
            goto done;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    buf[got] = '\0';
    if (memchr(buf, '\0', got)) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: contains NUL bytes: not a key file", path);
        goto done;
    }
    *out = buf;
    *out_len = got;
    buf = NULL;
done:
    free(buf);
    close(fd);
    return st;
}

/* Splits off the next line, strips comments and surrounding blanks; NULL at the end. */
static char *next_line(char **cursor, int *lineno) {
    char *s = *cursor;
    if (!s || !*s)
        return NULL;
    char *nl = strchr(s, '\n');
    if (nl) {
        *nl = '\0';
        *cursor = nl + 1;
    } else {
        *cursor = s + strlen(s);
    }
    (*lineno)++;
    /* '#' is a Z85 character too: it starts a comment only at the start of the line or after
     * a blank, never inside a key. */
    for (char *h = s; *h; h++) {
        if (*h == '#' && (h == s || h[-1] == ' ' || h[-1] == '\t')) {
            *h = '\0';
            break;
        }
    }
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

/* "KEY" or "LABEL KEY": the label (or "" when none) and the key. */
static void split_label(char *line, const char **label, const char **key) {
    char *sp = strpbrk(line, " \t");
    if (!sp) {
        *label = "";
        *key = line;
        return;
    }
    *sp = '\0';
    char *k = sp + 1;
    while (*k == ' ' || *k == '\t')
        k++;
    *label = line;
    *key = k;
}

moe_status ipc_keys_generate(const char *prefix) {
    MOE_REQUIRE(prefix && *prefix, MOE_ERR_INVALID_ARG, "keys_generate: empty path prefix");
    moe_status st = MOE_OK;
    char pub[IPC_Z85_KEY_LEN + 1], sec[IPC_Z85_KEY_LEN + 1];
    char ppath[4096], spath[4096];
    int pfd = -1, sfd = -1;
    bool made_pub = false, made_sec = false;
    if (zmq_curve_keypair(pub, sec) != 0)
        return moe_fail(MOE_ERR_UNSUPPORTED, "zmq_curve_keypair: %s (libzmq built without CURVE?)",
                        zmq_strerror(zmq_errno()));
    MOE_REQUIRE(snprintf(ppath, sizeof ppath, "%s.pub", prefix) < (int)sizeof ppath &&
                    snprintf(spath, sizeof spath, "%s.key", prefix) < (int)sizeof spath,
                MOE_ERR_INVALID_ARG, "keys_generate: path prefix too long");
    pfd = open(ppath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (pfd < 0) {
        st = moe_fail(MOE_ERR_IO, "%s: %s (not overwriting an existing key)", ppath, moe_strerror_(errno));
        goto fail;
    }
    made_pub = true;
    sfd = open(spath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (sfd < 0) {
        st = moe_fail(MOE_ERR_IO, "%s: %s (not overwriting an existing key)", spath, moe_strerror_(errno));
        goto fail;
    }
    made_sec = true;
    char text[256];
    int n = snprintf(text, sizeof text, "%s\n", pub);
    if (write(pfd, text, (size_t)n) != n) {
        st = moe_fail(MOE_ERR_IO, "%s: short write", ppath);
        goto fail;
    }
    n = snprintf(text, sizeof text,
                 "# moe-engine CURVE secret key: keep it private (mode 0600)\npublic %s\nsecret %s\n", pub, sec);
    if (write(sfd, text, (size_t)n) != n) {
        st = moe_fail(MOE_ERR_IO, "%s: short write", spath);
        goto fail;
    }
    close(pfd);
    close(sfd);
    return MOE_OK;
fail:
    if (pfd >= 0)
        close(pfd);
    if (sfd >= 0)
        close(sfd);
    if (made_pub)
        unlink(ppath);
    if (made_sec)
        unlink(spath);
    return st;
}

moe_status ipc_keys_load_secret(const char *path, char pub[IPC_Z85_KEY_LEN + 1], char sec[IPC_Z85_KEY_LEN + 1]) {
    MOE_REQUIRE(path && pub && sec, MOE_ERR_INVALID_ARG, "keys_load_secret: NULL argument");
    char *text = NULL, *cur, *line;
    size_t len;
    int lineno = 0;
    char p[IPC_Z85_KEY_LEN + 1] = "", s[IPC_Z85_KEY_LEN + 1] = "";
    moe_status st = read_file(path, &text, &len);
    if (st != MOE_OK)
        return st;
    cur = text;
    while ((line = next_line(&cur, &lineno))) {
        if (!*line)
            continue;
        const char *label, *key;
        split_label(line, &label, &key);
        char *dst = strcmp(label, "public") == 0 ? p : strcmp(label, "secret") == 0 ? s : NULL;
        if (!dst) {
            st = moe_fail(MOE_ERR_FORMAT, "%s:%d: expected 'public <key>' or 'secret <key>'", path, lineno);
            goto done;
        }
        if (!ipc_key_z85_valid(key)) {
            st = moe_fail(MOE_ERR_FORMAT, "%s:%d: the %s key is not 40 characters of Z85", path, lineno, label);
            goto done;
        }
        memcpy(dst, key, IPC_Z85_KEY_LEN + 1);
    }
    if (!s[0]) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: no 'secret <key>' line (is this a public key file?)", path);
        goto done;
    }
    char derived[IPC_Z85_KEY_LEN + 1];
    if (zmq_curve_public(derived, s) != 0) {
        st = moe_fail(MOE_ERR_UNSUPPORTED, "zmq_curve_public: %s", zmq_strerror(zmq_errno()));
        goto done;
    }
    if (p[0] && strcmp(p, derived) != 0) {
        st = moe_fail(MOE_ERR_FORMAT, "%s: the public key does not belong to the secret key", path);
        goto done;
    }
    memcpy(pub, derived, IPC_Z85_KEY_LEN + 1);
    memcpy(sec, s, IPC_Z85_KEY_LEN + 1);
done:
    if (text) {
        memset(text, 0, len); /* do not leave the secret in freed memory */
        free(text);
    }
    memset(s, 0, sizeof s);
    return st;
}

moe_status ipc_keys_load_public(const char *path, char pub[IPC_Z85_KEY_LEN + 1]) {
    MOE_REQUIRE(path && pub, MOE_ERR_INVALID_ARG, "keys_load_public: NULL argument");
    char *text = NULL, *cur, *line;
    size_t len;
    int lineno = 0;
    bool found = false;
    moe_status st = read_file(path, &text, &len);
    if (st != MOE_OK)
        return st;
    cur = text;
    while ((line = next_line(&cur, &lineno))) {
        if (!*line)
            continue;
        const char *label, *key;
        split_label(line, &label, &key);
        if (strcmp(label, "secret") == 0)
            continue;
        if (label[0] && strcmp(label, "public") != 0) {
            st = moe_fail(MOE_ERR_FORMAT, "%s:%d: expected a Z85 public key", path, lineno);
            goto done;
        }
        if (!ipc_key_z85_valid(key)) {
            st = moe_fail(MOE_ERR_FORMAT, "%s:%d: the public key is not 40 characters of Z85", path, lineno);
            goto done;
        }
        if (found) {
            st = moe_fail(MOE_ERR_FORMAT, "%s:%d: a second public key (one per file)", path, lineno);
            goto done;
        }
        memcpy(pub, key, IPC_Z85_KEY_LEN + 1);
        found = true;
    }
    if (!found)
        st = moe_fail(MOE_ERR_FORMAT, "%s: no public key in the file", path);
done:
    if (text) {
        memset(text, 0, len);
        free(text);
    }
    return st;
}

moe_status ipc_keys_load_list(const char *path, char (**keys)[IPC_Z85_KEY_LEN + 1], size_t *n_keys) {
    MOE_REQUIRE(path && keys && n_keys, MOE_ERR_INVALID_ARG, "keys_load_list: NULL argument");
    char *text = NULL, *cur, *line;
    size_t len, n = 0, cap = 0;
    int lineno = 0;
    char(*list)[IPC_Z85_KEY_LEN + 1] = NULL;
    moe_status st = read_file(path, &text, &len);
    if (st != MOE_OK)
        return st;
    cur = text;
    while ((line = next_line(&cur, &lineno))) {
        if (!*line)
            continue;
        const char *label, *key;
        split_label(line, &label, &key);
        if ((label[0] && strcmp(label, "public") != 0) || !ipc_key_z85_valid(key)) {
            st = moe_fail(MOE_ERR_FORMAT, "%s:%d: not a Z85 public key (40 characters; '#' starts a comment)", path,
                          lineno);
            goto fail;
        }
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 16;
            void *nl = realloc(list, nc * sizeof *list);
            if (!nl) {
                st = moe_fail(MOE_ERR_NOMEM, "%s: %zu keys", path, nc);
                goto fail;
            }
            list = nl;
            cap = nc;
        }
        memcpy(list[n++], key, IPC_Z85_KEY_LEN + 1);
    }
    free(text);
    *keys = list;
    *n_keys = n;
    return MOE_OK;
fail:
    free(text);
    free(list);
    return st;
}
