/*
 * ipc_proto.h: moe-engine wire protocol v1 (docs/protocol.md is the contract): encode, decode
 * and validate, as pure functions, plus CURVE key files. Part of ipc.h, the public face of
 * ipc/; kept in its own header so that libmoeclient and the fuzzer need neither libuv nor the
 * watcher. Depends on engine/base only (key files also on libzmq, in keys.c).
 *
 * One message = one ZeroMQ frame:
 *   [64-byte header][n_sections x 64-byte section descriptors][sections, each at a 64-byte
 *   aligned offset, in descriptor order, packed: offset_i = align64(end_{i-1})]
 * All integers little-endian. The frame length must equal the header's total_bytes.
 *
 * Threads: every function here is pure (no global state) and may run on any thread.
 *
 * Invariants: ipc_decode reads nothing past buf + len and checks every field (length, offset,
 * count, dtype, shape, op, flags, reserved bytes; with a model in the limits also the layer,
 * the hidden size, every expert id and every weight) before anything is used. A decoded
 * ipc_msg holds views into buf: the caller keeps buf (the zmq_msg) alive while it uses them.
 * Section data may be unaligned (ZeroMQ hands out frames at any address): read it with
 * memcpy, or call ipc_msg_realign first.
 */
#ifndef IPC_IPC_PROTO_H
#define IPC_IPC_PROTO_H

#include "engine/base/moe_base.h"

#ifdef __cplusplus
extern "C" {
#endif

#define IPC_MAGIC 0x57454F4Du /* the bytes "MOEW" */
#define IPC_VERSION 1
#define IPC_HEADER_BYTES 64
#define IPC_DESC_BYTES 64
#define IPC_ALIGN 64
#define IPC_MAX_SECTIONS 16
#define IPC_MAX_DIM 0x7fffffffLL                   /* every dimension fits an int32 */
#define IPC_MAX_TEXT 4096                          /* error message bytes */
#define IPC_DEFAULT_MAX_MSG_BYTES (256ull << 20)   /* 256 MiB */
#define IPC_MIN_MAX_MSG_BYTES (IPC_HEADER_BYTES + IPC_MAX_SECTIONS * IPC_DESC_BYTES + IPC_MAX_TEXT + IPC_ALIGN)

/* Operations. 0x01..0x7f: client-facing (documented); 0x80..0xffff: reserved for the
 * daemon's internal coordinator <-> worker messages, refused by a client-facing decode. */
typedef enum ipc_op {
    IPC_OP_PING = 0x01,
    IPC_OP_INFO = 0x02,
    IPC_OP_STATS = 0x03,
    IPC_OP_SUBMIT = 0x04,
    IPC_OP_CLIENT_LAST_ = 0x04,
    IPC_OP_CLIENT_MAX = 0x7f, /* error replies may carry any op up to this one */
    IPC_OP_INTERNAL_FIRST = 0x80
} ipc_op;

const char *ipc_op_name(uint16_t op); /* "SUBMIT", "internal", "unknown" */

/* Header flags. Bits 0..15 belong to the protocol (unknown ones are refused); bits 16..31 are
 * free for internal ops and must be 0 on client-facing ops. */
#define IPC_FLAG_REPLY 0x1u
#define IPC_FLAGS_KNOWN 0x1u
#define IPC_FLAGS_INTERNAL 0xffff0000u

/* Section kinds of the client-facing ops. Internal ops may use any kind != 0. */
typedef enum ipc_sec_kind {
    IPC_SEC_X = 1,        /* SUBMIT request: hidden states [T, H], float dtype */
    IPC_SEC_TOPK_IDS = 2, /* SUBMIT request: expert ids [T, K], i32 */
    IPC_SEC_TOPK_W = 3,   /* SUBMIT request: routing weights [T, K], f32 */
    IPC_SEC_LOGITS = 4,   /* SUBMIT request: router logits [T, E], float dtype */
    IPC_SEC_Y = 5,        /* SUBMIT reply: output [T, H], the dtype of x */
    IPC_SEC_JSON = 6,     /* INFO/STATS reply: a UTF-8 JSON document (bytes) */
    IPC_SEC_TEXT = 7      /* error reply: a UTF-8 message (bytes) */
} ipc_sec_kind;

const char *ipc_sec_kind_name(uint16_t kind);

/* Wire dtypes: the moe_dtype values (0..3), raw bytes, and "none" (header only). */
#define IPC_DTYPE_BYTES 0x80
#define IPC_DTYPE_NONE 0xff

typedef struct ipc_section {
    uint16_t kind;
    uint8_t dtype;                 /* a moe_dtype value or IPC_DTYPE_BYTES */
    uint8_t ndim;                  /* 0..4; BYTES sections: 1 (shape[0] = nbytes) */
    int64_t shape[MOE_MAX_DIMS];   /* dims past ndim are 0 */
    const void *data;              /* decode: a view into the message; encode: the source */
    uint64_t nbytes;
} ipc_section;

typedef struct ipc_msg {
    uint16_t version;
    uint16_t op;
    uint32_t flags;
    uint64_t request_id;
    int32_t status;      /* replies: a moe_status (0 ok, < 0 error); requests: 0 */
    int32_t layer;       /* SUBMIT: the MoE layer; otherwise 0 */
    uint32_t n_tokens;   /* SUBMIT: T; otherwise 0 */
    uint32_t hidden;     /* SUBMIT: H; otherwise 0 */
    uint32_t top_k;      /* SUBMIT request with ids: K; otherwise 0 */
    uint8_t dtype;       /* SUBMIT: the dtype of x and y; otherwise IPC_DTYPE_NONE */
    uint32_t timeout_ms; /* requests: the client's deadline (0: none), a hint the server may use */
    uint32_t n_sections;
    ipc_section sec[IPC_MAX_SECTIONS];
} ipc_msg;

/* What a decode accepts and checks. A zeroed struct (or ipc_limits_default) accepts requests
 * with structural checks only. A model (n_experts > 0) turns on the semantic checks of
 * SUBMIT requests. */
typedef enum ipc_accept {
    IPC_ACCEPT_REQUESTS = 0, /* a server: REPLY flag refused */
    IPC_ACCEPT_REPLIES = 1   /* a client: REPLY flag required */
} ipc_accept;

typedef struct ipc_limits {
    uint64_t max_msg_bytes;       /* 0: IPC_DEFAULT_MAX_MSG_BYTES; also set as ZMQ_MAXMSGSIZE */
    uint32_t max_tokens;          /* 0: no limit but the message size */
    ipc_accept accept;
    bool allow_internal;          /* accept ops >= IPC_OP_INTERNAL_FIRST (structure only) */
    /* The model; n_experts == 0: no model checks. */
    uint32_t n_layers;            /* layer must be < n_layers */
    const uint8_t *layer_served;  /* [n_layers]: nonzero where the layer is served; NULL: all */
    uint32_t n_experts;           /* E: expert ids in [0, E), logits [T, E] */
    uint32_t hidden;              /* H: x [T, H] */
    uint32_t top_k;               /* K must equal it when nonzero; else 1 <= K <= E */
    uint32_t dtype_mask;          /* allowed activation dtypes: bit (1u << moe_dtype); 0: every float */
    bool can_route;               /* the engine holds router weights: SUBMIT with x alone is allowed */
} ipc_limits;

ipc_limits ipc_limits_default(void);

/* ------------------------------------------------------------------------------------------
 * Building and encoding.
 * ---------------------------------------------------------------------------------------- */
/* A message of op `op` with no sections (version 1, flags 0, dtype NONE). */
void ipc_msg_init(ipc_msg *m, uint16_t op, uint64_t request_id);
/* Appends a section (data is not copied: it must outlive the encode). */
moe_status ipc_msg_add(ipc_msg *m, uint16_t kind, uint8_t dtype, int32_t ndim, const int64_t *shape,
                       const void *data);
moe_status ipc_msg_add_tensor(ipc_msg *m, uint16_t kind, const moe_tensor *t);
moe_status ipc_msg_add_bytes(ipc_msg *m, uint16_t kind, const void *data, size_t nbytes);
/* The first section of `kind`, or NULL. */
const ipc_section *ipc_msg_find(const ipc_msg *m, uint16_t kind);
/* A tensor view of a numeric section (data cast from const: do not write through it). */
moe_tensor ipc_section_tensor(const ipc_section *s);

/* A SUBMIT request: x [T, H], and either ids [T, K] i32 + w [T, K] f32, or logits [T, E],
 * or neither (the engine routes). Sets the header fields from the tensors. */
moe_status ipc_submit_init(ipc_msg *m, uint64_t request_id, int32_t layer, const moe_tensor *x,
                           const moe_tensor *topk_ids, const moe_tensor *topk_w, const moe_tensor *logits);
/* The reply header to request `req` (op, request id, REPLY flag); add sections after. */
void ipc_reply_init(ipc_msg *m, uint16_t op, uint64_t request_id);
/* A SUBMIT reply carrying y [T, H]. */
moe_status ipc_submit_reply_init(ipc_msg *m, uint64_t request_id, const moe_tensor *y);
/* An error reply: status < 0 and a TEXT section (the message, truncated to IPC_MAX_TEXT bytes
 * at a UTF-8 character boundary; `text` must stay alive until encoded). Op 0 (a message whose
 * op could not be read) becomes IPC_OP_PING so that any client can decode the reply. */
moe_status ipc_error_init(ipc_msg *m, uint16_t op, uint64_t request_id, moe_status status, const char *text);

/* Bytes the encoding of m takes. */
moe_status ipc_encoded_size(const ipc_msg *m, size_t *out);
/* Encodes into buf[0, cap); *out_len = bytes written. Padding bytes are zero. */
moe_status ipc_encode(const ipc_msg *m, void *buf, size_t cap, size_t *out_len);
/* Where each section's data goes in the encoding of m (offsets[n_sections]) and the total. */
moe_status ipc_section_offsets(const ipc_msg *m, uint64_t *offsets, size_t *total);
/* Like ipc_encode, for a message whose section data the caller already wrote at the offsets
 * ipc_section_offsets gives (a device copied y straight there, say): writes the header, the
 * descriptors and the padding only. Section data pointers must be NULL or point at their
 * offset in buf. */
moe_status ipc_encode_in_place(const ipc_msg *m, void *buf, size_t cap, size_t *out_len);
/* Encodes into a fresh 64-byte aligned allocation (free with moe_free). */
moe_status ipc_encode_alloc(const ipc_msg *m, void **out, size_t *out_len);

/* ------------------------------------------------------------------------------------------
 * Decoding.
 * ---------------------------------------------------------------------------------------- */
/* Decodes and validates buf[0, len). On MOE_OK, `out` holds views into buf. On an error, the
 * status says what kind (MOE_ERR_PROTOCOL: magic/version/op/flags; MOE_ERR_FORMAT: malformed
 * header or sections; MOE_ERR_LIMIT: over a limit; MOE_ERR_INVALID_ARG: a SUBMIT that does not
 * fit the model; MOE_ERR_NOT_FOUND: a layer not served; MOE_ERR_UNSUPPORTED: routing asked of
 * an engine without router weights), moe_errmsg says which field and value, and, as the one
 * exception to "no output on failure", out->version, op, flags and request_id hold what the
 * header said (0 where it was too short) so that the error reply can name the request. */
moe_status ipc_decode(const void *buf, size_t len, const ipc_limits *lim, ipc_msg *out);

/* The semantic checks of a SUBMIT request against the model in `lim` (ipc_decode runs them
 * when lim->n_experts > 0). Reads the section data with unaligned loads. */
moe_status ipc_validate_submit(const ipc_msg *m, const ipc_limits *lim);

/* True when every section's data is aligned to 64 bytes. */
bool ipc_msg_aligned(const ipc_msg *m);
/* Copies every section into one fresh 64-byte aligned block and points the views at it; the
 * caller frees *owned with moe_free (NULL when nothing needed copying). */
moe_status ipc_msg_realign(ipc_msg *m, void **owned);

/* UTF-8 well-formed (no overlongs, no surrogates, <= U+10FFFF) and free of NUL bytes. */
bool ipc_utf8_valid(const void *s, size_t n);

/* ------------------------------------------------------------------------------------------
 * CURVE key files (keys.c; needs libzmq). Z85 text, 40 characters a key.
 *   public key file ("NAME.pub"):  one line, the Z85 public key
 *   secret key file ("NAME.key"):  lines "public <Z85>" and "secret <Z85>" (mode 0600)
 *   allow-list file:               one Z85 public key per line (optionally "public <key>");
 *                                  '#' at the start of a line or after a blank starts a comment
 *                                  (Z85 keys may contain '#'); blank lines ignored
 * ---------------------------------------------------------------------------------------- */
#define IPC_Z85_KEY_LEN 40

/* Writes a fresh keypair to "<prefix>.pub" and "<prefix>.key" (refuses to overwrite). */
moe_status ipc_keys_generate(const char *prefix);
/* Reads a secret key file; pub/sec get 41 bytes (NUL-terminated Z85). The public key is
 * checked against the secret key. */
moe_status ipc_keys_load_secret(const char *path, char pub[IPC_Z85_KEY_LEN + 1], char sec[IPC_Z85_KEY_LEN + 1]);
/* Reads a public key file (or the "public" line of a secret key file). */
moe_status ipc_keys_load_public(const char *path, char pub[IPC_Z85_KEY_LEN + 1]);
/* Reads an allow-list file: *keys (free()) gets *n_keys NUL-terminated Z85 keys. A line that is
 * not a key is an error naming the line (a typo must not silently lock someone out or in). */
moe_status ipc_keys_load_list(const char *path, char (**keys)[IPC_Z85_KEY_LEN + 1], size_t *n_keys);
/* True when s is a 40-character Z85 string that decodes to 32 bytes. */
bool ipc_key_z85_valid(const char *s);

#ifdef __cplusplus
}
#endif
#endif /* IPC_IPC_PROTO_H */
