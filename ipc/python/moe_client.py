"""moe_client: the Python client of moe-engine (wire protocol v1, docs/protocol.md).

Needs pyzmq and numpy (Debian: python3-zmq, python3-numpy). Accepts torch tensors where torch
is installed (returns torch tensors for torch inputs). It encodes and decodes the protocol
itself (it does not wrap libmoeclient), so it doubles as a second implementation of the spec.

    from moe_client import Client
    with Client("tcp://127.0.0.1:5555") as c:
        print(c.info()["model"])
        y = c.submit(layer=3, x=x, topk_ids=ids, topk_w=w)   # x [T, H] float32/float16/bf16

bf16 in numpy: numpy has no bfloat16, so bf16 data travels as uint16 bit patterns: pass a
uint16 array with dtype="bf16" (you get uint16 back), or a torch.bfloat16 tensor.

Threads: a Client belongs to one thread at a time (its ZeroMQ socket is not thread-safe).
Failures raise MoeError with the server's status code (.code, .name) and message; a request
with no reply within its timeout raises MoeError(MOE_ERR_TIMEOUT). The DEALER socket
reconnects by itself after a server restart.
"""

import json
import os
import struct
import time

import numpy as np
import zmq

try:  # optional
    import torch  # noqa: F401
    _HAVE_TORCH = True
except Exception:  # pragma: no cover - depends on the machine
    torch = None
    _HAVE_TORCH = False

PROTOCOL_VERSION = 1
MAGIC = b"MOEW"
HEADER = struct.Struct("<4sHHIIQQiiIIIBBHII")  # 64 bytes
DESC = struct.Struct("<HBBIQQ4QQ")  # 64 bytes
ALIGN = 64
MAX_SECTIONS = 16

OP_PING, OP_INFO, OP_STATS, OP_SUBMIT = 1, 2, 3, 4
FLAG_REPLY = 1
SEC_X, SEC_TOPK_IDS, SEC_TOPK_W, SEC_LOGITS, SEC_Y, SEC_JSON, SEC_TEXT = 1, 2, 3, 4, 5, 6, 7
DT_F32, DT_F16, DT_BF16, DT_I32, DT_BYTES, DT_NONE = 0, 1, 2, 3, 0x80, 0xFF
_DT_SIZE = {DT_F32: 4, DT_F16: 2, DT_BF16: 2, DT_I32: 4, DT_BYTES: 1}
_DT_NAME = {"f32": DT_F32, "float32": DT_F32, "f16": DT_F16, "float16": DT_F16, "bf16": DT_BF16,
            "bfloat16": DT_BF16}

STATUS_NAMES = [
    "MOE_OK", "MOE_ERR_INVALID_ARG", "MOE_ERR_NOMEM", "MOE_ERR_IO", "MOE_ERR_SYSTEM", "MOE_ERR_CUDA",
    "MOE_ERR_CUBLAS", "MOE_ERR_NCCL", "MOE_ERR_ZMQ", "MOE_ERR_UV", "MOE_ERR_UNSUPPORTED", "MOE_ERR_FORMAT",
    "MOE_ERR_PROTOCOL", "MOE_ERR_TIMEOUT", "MOE_ERR_BUSY", "MOE_ERR_NOT_FOUND", "MOE_ERR_SHUTDOWN",
    "MOE_ERR_ALIAS", "MOE_ERR_WORKER", "MOE_ERR_AUTH", "MOE_ERR_INTERNAL", "MOE_ERR_LIMIT",
]
for _i, _n in enumerate(STATUS_NAMES):
    globals()[_n] = -_i


def status_name(code):
    return STATUS_NAMES[-code] if -len(STATUS_NAMES) < code <= 0 else "MOE_ERR_UNKNOWN(%d)" % code


class MoeError(Exception):
    """A failed request: .code is the moe_status value (negative), .name its name."""

    def __init__(self, code, message):
        self.code = int(code)
        self.name = status_name(self.code)
        self.message = message
        super().__init__("%s: %s" % (self.name, message))


# ------------------------------------------------------------------------------------------
# Keys (the files of `moe-client keygen`).
# ------------------------------------------------------------------------------------------
def _key_lines(path):
    with open(path, "r", encoding="ascii") as f:
        for line in f:
            # '#' starts a comment only at the start or after a blank: Z85 keys may contain '#'
            out = []
            for i, ch in enumerate(line):
                if ch == "#" and (i == 0 or line[i - 1] in " \t"):
                    break
                out.append(ch)
            s = "".join(out).strip()
            if s:
                yield s.split()


def load_public_key(path):
    for parts in _key_lines(path):
        if parts[0] == "secret":
            continue
        key = parts[-1]
        if len(key) != 40:
            raise MoeError(MOE_ERR_FORMAT, "%s: not a 40-character Z85 key" % path)
        return key
    raise MoeError(MOE_ERR_FORMAT, "%s: no public key" % path)


def load_secret_key(path):
    pub = sec = None
    for parts in _key_lines(path):
        if len(parts) == 2 and parts[0] == "public":
            pub = parts[1]
        elif len(parts) == 2 and parts[0] == "secret":
            sec = parts[1]
        else:
            raise MoeError(MOE_ERR_FORMAT, "%s: expected 'public <key>' / 'secret <key>' lines" % path)
    if not sec or len(sec) != 40:
        raise MoeError(MOE_ERR_FORMAT, "%s: no secret key" % path)
    derived = zmq.curve_public(sec.encode()).decode()
    if pub and pub != derived:
        raise MoeError(MOE_ERR_FORMAT, "%s: the public key does not belong to the secret key" % path)
    return derived, sec


# ------------------------------------------------------------------------------------------
# Encoding and decoding.
# ------------------------------------------------------------------------------------------
def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode(op, request_id, sections=(), flags=0, status=0, layer=0, n_tokens=0, hidden=0, top_k=0,
           dtype=DT_NONE, timeout_ms=0):
    """sections: (kind, wire_dtype, shape tuple, bytes-like)."""
    if len(sections) > MAX_SECTIONS:
        raise MoeError(MOE_ERR_LIMIT, "%d sections (most %d)" % (len(sections), MAX_SECTIONS))
    header_bytes = 64 + 64 * len(sections)
    layout, end = [], header_bytes
    for kind, dt, shape, data in sections:
        mv = memoryview(data).cast("B")
        n = _DT_SIZE[dt]
        for d in shape:
            n *= d
        if n != mv.nbytes:
            raise MoeError(MOE_ERR_INVALID_ARG, "section %d: %d bytes, shape makes %d" % (kind, mv.nbytes, n))
        off = _align(end)
        layout.append((kind, dt, shape, mv, off))
        end = off + mv.nbytes
    buf = bytearray(end)
    HEADER.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, op, flags, header_bytes, request_id, end, status, layer,
                     n_tokens, hidden, top_k, dtype, len(sections), 0, timeout_ms, 0)
    for i, (kind, dt, shape, mv, off) in enumerate(layout):
        dims = list(shape) + [0] * (4 - len(shape))
        DESC.pack_into(buf, 64 + 64 * i, kind, dt, len(shape), 0, off, mv.nbytes, *dims, 0)
        buf[off:off + mv.nbytes] = mv
    return bytes(buf)


class Message:
    __slots__ = ("version", "op", "flags", "request_id", "status", "layer", "n_tokens", "hidden", "top_k",
                 "dtype", "timeout_ms", "sections")


def decode(buf, max_msg_bytes=256 << 20):
    """Decodes and checks the structure of one message; sections as (kind, dtype, shape, memoryview)."""
    mv = memoryview(buf)
    n = mv.nbytes
    if n < 8 or bytes(mv[:4]) != MAGIC:
        raise MoeError(MOE_ERR_PROTOCOL, "not a moe-engine message")
    version = struct.unpack_from("<H", mv, 4)[0]
    if version != PROTOCOL_VERSION:
        rid = struct.unpack_from("<Q", mv, 16)[0] if n >= 24 else 0
        e = MoeError(MOE_ERR_PROTOCOL, "the server speaks protocol version %d, this client version %d: "
                     "upgrade one of them" % (version, PROTOCOL_VERSION))
        e.request_id = rid
        raise e
    if n < 64:
        raise MoeError(MOE_ERR_FORMAT, "message of %d bytes is shorter than the header" % n)
    if n > max_msg_bytes:
        raise MoeError(MOE_ERR_LIMIT, "message of %d bytes over %d" % (n, max_msg_bytes))
    (_, ver, op, flags, hbytes, rid, total, status, layer, T, H, K, dt, nsec, r0, tmo, r1) = HEADER.unpack_from(mv, 0)
    m = Message()
    m.version, m.op, m.flags, m.request_id, m.status = ver, op, flags, rid, status
    m.layer, m.n_tokens, m.hidden, m.top_k, m.dtype, m.timeout_ms = layer, T, H, K, dt, tmo
    if r0 or r1 or total != n or nsec > MAX_SECTIONS or hbytes != 64 + 64 * nsec:
        raise MoeError(MOE_ERR_FORMAT, "malformed header (total %d, frame %d, %d sections)" % (total, n, nsec))
    end, secs = hbytes, []
    for i in range(nsec):
        kind, sdt, ndim, sr0, off, nbytes, d0, d1, d2, d3, sr1 = DESC.unpack_from(mv, 64 + 64 * i)
        dims = (d0, d1, d2, d3)
        if kind == 0 or sdt not in _DT_SIZE or ndim > 4 or sr0 or sr1 or any(dims[ndim:]):
            raise MoeError(MOE_ERR_FORMAT, "section %d: malformed descriptor" % i)
        size = _DT_SIZE[sdt]
        for d in dims[:ndim]:
            size *= d
        if size != nbytes or off != _align(end) or off + nbytes > n:
            raise MoeError(MOE_ERR_FORMAT, "section %d: bad size or offset" % i)
        secs.append((kind, sdt, dims[:ndim], mv[off:off + nbytes]))
        end = off + nbytes
    if end != n:
        raise MoeError(MOE_ERR_FORMAT, "%d bytes, the sections end at %d" % (n, end))
    m.sections = secs
    return m


# ------------------------------------------------------------------------------------------
# Arrays: numpy, or torch when given.
# ------------------------------------------------------------------------------------------
def _is_torch(a):
    return _HAVE_TORCH and isinstance(a, torch.Tensor)


def _to_numpy(a, dtype=None, what="x"):
    """-> (contiguous numpy array, wire dtype, torch dtype to give back or None)."""
    back = None
    if _is_torch(a):
        back = a.dtype
        t = a.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), DT_BF16, back
        a = t.numpy()
    a = np.ascontiguousarray(a)
    if dtype is not None:
        want = _DT_NAME[dtype] if isinstance(dtype, str) else dtype
        if a.dtype == np.uint16 and want in (DT_BF16, DT_F16):
            return (a if want == DT_BF16 else a.view(np.float16)), want, back
        if want == DT_F32:
            return a.astype("<f4"), DT_F32, back
        if want == DT_F16:
            return a.astype("<f2"), DT_F16, back
        if want == DT_BF16:
            return f32_to_bf16(a.astype("<f4")), DT_BF16, back
    if a.dtype == np.float32:
        return a.astype("<f4", copy=False), DT_F32, back
    if a.dtype == np.float16:
        return a.astype("<f2", copy=False), DT_F16, back
    if a.dtype == np.uint16:
        raise MoeError(MOE_ERR_INVALID_ARG, "%s is uint16: say dtype='bf16' (or 'f16') for its bit patterns" % what)
    if a.dtype == np.float64:
        return a.astype("<f4"), DT_F32, back
    raise MoeError(MOE_ERR_INVALID_ARG, "%s: dtype %s is not float32, float16 or bf16" % (what, a.dtype))


def f32_to_bf16(a):
    """float32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype="<f4").view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_to_f32(u):
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _from_wire(mv, dt, shape, torch_dtype):
    np_dt = {DT_F32: "<f4", DT_F16: "<f2", DT_BF16: "<u2", DT_I32: "<i4"}[dt]
    a = np.frombuffer(bytes(mv), dtype=np_dt).reshape(shape)
    if torch_dtype is not None:
        if dt == DT_BF16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())
    return a


# ------------------------------------------------------------------------------------------
# The client.
# ------------------------------------------------------------------------------------------
class Client:
    def __init__(self, endpoint=None, timeout_ms=10000, server_key=None, client_public=None,
                 client_secret=None, max_msg_bytes=256 << 20, context=None, busy_poll_us=0):
        self.endpoint = endpoint or os.environ.get("MOE_ENDPOINT") or "tcp://127.0.0.1:5555"
        self.timeout_ms = int(timeout_ms)
        # waiting for a reply, look without sleeping this long first (as moec_client_set_busy_poll)
        if not 0 <= int(busy_poll_us) <= 10000000:
            raise MoeError(MOE_ERR_INVALID_ARG, "busy_poll_us %r is outside 0 .. 10000000" % (busy_poll_us,))
        self.busy_poll_us = int(busy_poll_us)
        self.max_msg_bytes = int(max_msg_bytes)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_msg_bytes)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if server_key:
            if bool(client_public) != bool(client_secret):
                raise MoeError(MOE_ERR_INVALID_ARG, "give both client_public and client_secret, or neither")
            if not client_public:
                client_public, client_secret = (k.decode() for k in zmq.curve_keypair())
            self._sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
            self._sock.curve_publickey = client_public.encode() if isinstance(client_public, str) else client_public
            self._sock.curve_secretkey = client_secret.encode() if isinstance(client_secret, str) else client_secret
        elif client_public or client_secret:
            raise MoeError(MOE_ERR_INVALID_ARG, "client keys need server_key (CURVE)")
        self._mon = self._sock.get_monitor_socket(
            getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0x4000) | getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0x2000))
        self._sock.connect(self.endpoint)
        self._next_id = 1
        self._pending = {}   # id -> dict(op, deadline, t0, meta)
        self._done = []      # async results, in completion order: (id, result or MoeError, latency_ms)

    # -- lifecycle
    def close(self):
        if self._sock is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(0)
            self._sock.close(0)
            self._sock = None
            if self._own_ctx:
                self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals
    def _send(self, op, sections=(), timeout_ms=None, is_async=False, meta=None, **hdr):
        if self._sock is None:
            raise MoeError(MOE_ERR_INVALID_ARG, "the client is closed")
        tmo = int(timeout_ms or self.timeout_ms)
        rid = self._next_id
        self._next_id += 1
        msg = encode(op, rid, sections, timeout_ms=tmo, **hdr)
        if len(msg) > self.max_msg_bytes:
            raise MoeError(MOE_ERR_LIMIT, "request of %d bytes over max_msg_bytes %d" % (len(msg), self.max_msg_bytes))
        try:
            self._sock.send(msg, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise MoeError(MOE_ERR_BUSY, "the send queue is full (is the server reachable?)")
        now = time.monotonic()
        self._pending[rid] = dict(op=op, t0=now, deadline=now + tmo / 1000.0, tmo=tmo, meta=meta or {},
                                  is_async=is_async, done=False, result=None)
        return rid

    def _finish(self, rid, result):
        p = self._pending.get(rid)
        if p is None or p["done"]:
            return
        p["done"] = True
        p["result"] = result
        p["latency_ms"] = (time.monotonic() - p["t0"]) * 1000.0
        if p["is_async"]:
            del self._pending[rid]
            self._done.append((rid, result, p["latency_ms"]))

    def _handle(self, data):
        try:
            m = decode(data, self.max_msg_bytes)
        except MoeError as e:
            rid = getattr(e, "request_id", None)
            if rid is None and len(data) >= 24:
                rid = struct.unpack_from("<Q", data, 16)[0]
            if rid in self._pending:
                self._finish(rid, e)
            return
        p = self._pending.get(m.request_id)
        if p is None or p["done"]:
            return  # a late reply: its request already timed out
        if not (m.flags & FLAG_REPLY) or m.op != p["op"]:
            self._finish(m.request_id, MoeError(MOE_ERR_PROTOCOL, "reply op %d for a request of op %d" % (m.op, p["op"])))
            return
        if m.status < 0:
            text = b"".join(bytes(s[3]) for s in m.sections if s[0] == SEC_TEXT).decode("utf-8", "replace")
            self._finish(m.request_id, MoeError(m.status, text))
            return
        if m.status > 0:
            self._finish(m.request_id, MoeError(MOE_ERR_PROTOCOL, "positive status %d" % m.status))
            return
        if m.op == OP_PING:
            self._finish(m.request_id, None)
        elif m.op in (OP_INFO, OP_STATS):
            js = [s for s in m.sections if s[0] == SEC_JSON]
            if len(js) != 1:
                self._finish(m.request_id, MoeError(MOE_ERR_PROTOCOL, "no JSON section"))
            else:
                self._finish(m.request_id, json.loads(bytes(js[0][3]).decode("utf-8")))
        elif m.op == OP_SUBMIT:
            ys = [s for s in m.sections if s[0] == SEC_Y]
            meta = p["meta"]
            if len(ys) != 1 or ys[0][1] != meta["dtype"] or tuple(ys[0][2]) != meta["shape"]:
                self._finish(m.request_id, MoeError(MOE_ERR_PROTOCOL, "the reply's y does not match the request"))
            else:
                self._finish(m.request_id, _from_wire(ys[0][3], ys[0][1], ys[0][2], meta["torch"]))

    def _pump(self, wait_s):
        now = time.monotonic()
        waits = [p["deadline"] - now for p in self._pending.values() if not p["done"]]
        if wait_s is not None:
            waits.append(wait_s)
        tmo = max(0.0, min(waits)) if waits else 0.0
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        ev = {}
        if self.busy_poll_us and tmo > 0:
            end = now + self.busy_poll_us * 1e-6
            while not ev and time.monotonic() < end:
                ev = dict(poller.poll(0))
        if not ev:
            ev = dict(poller.poll(int(tmo * 1000) + (1 if tmo > 0 else 0)))
        if self._mon in ev:
            from zmq.utils.monitor import recv_monitor_message
            while True:
                try:
                    e = recv_monitor_message(self._mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if e["event"] == getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0x4000):
                    msg = "the server at %s refused this client (ZAP status %d): its public key is not on " \
                          "the server's allow-list" % (self.endpoint, e["value"])
                else:
                    msg = "handshake with %s failed (ZMTP error 0x%x): does the server use CURVE, and is the " \
                          "server key right?" % (self.endpoint, e["value"])
                for rid in [r for r, p in self._pending.items() if not p["done"]]:
                    self._finish(rid, MoeError(MOE_ERR_AUTH, msg))
        if self._sock in ev:
            for _ in range(256):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(frames) == 1:
                    self._handle(frames[0].buffer)
        now = time.monotonic()
        for rid, p in list(self._pending.items()):
            if not p["done"] and p["deadline"] <= now:
                self._finish(rid, MoeError(MOE_ERR_TIMEOUT, "no reply within %d ms from %s (server down, "
                                           "restarted, or overloaded?)" % (p["tmo"], self.endpoint)))

    def _wait(self, rid):
        p = self._pending[rid]
        while not p["done"]:
            self._pump(None)
        del self._pending[rid]
        if isinstance(p["result"], MoeError):
            raise p["result"]
        return p["result"]

    # -- operations
    def ping(self, timeout_ms=None):
        """Round trip in ms."""
        t0 = time.monotonic()
        self._wait(self._send(OP_PING, timeout_ms=timeout_ms))
        return (time.monotonic() - t0) * 1000.0

    def info(self, timeout_ms=None):
        return self._wait(self._send(OP_INFO, timeout_ms=timeout_ms))

    def stats(self, timeout_ms=None):
        return self._wait(self._send(OP_STATS, timeout_ms=timeout_ms))

    def _submit_msg(self, layer, x, topk_ids, topk_w, logits, dtype):
        xa, xdt, back = _to_numpy(x, dtype, "x")
        if xa.ndim != 2 or xa.shape[0] < 1 or xa.shape[1] < 1:
            raise MoeError(MOE_ERR_INVALID_ARG, "x must be [T, H] with T, H >= 1 (is %s)" % (xa.shape,))
        T, H = xa.shape
        secs = [(SEC_X, xdt, (T, H), xa)]
        K = 0
        if (topk_ids is None) != (topk_w is None):
            raise MoeError(MOE_ERR_INVALID_ARG, "topk_ids and topk_w go together")
        if topk_ids is not None and logits is not None:
            raise MoeError(MOE_ERR_INVALID_ARG, "give topk_ids/topk_w or logits, not both")
        if topk_ids is not None:
            ids = topk_ids.detach().cpu().numpy() if _is_torch(topk_ids) else np.asarray(topk_ids)
            w = topk_w.detach().cpu().float().numpy() if _is_torch(topk_w) else np.asarray(topk_w)
            if ids.ndim != 2 or ids.shape[0] != T or w.shape != ids.shape:
                raise MoeError(MOE_ERR_INVALID_ARG, "topk_ids and topk_w must be [T=%d, K]" % T)
            if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < -2**31 or ids.max() >= 2**31)):
                raise MoeError(MOE_ERR_INVALID_ARG, "topk_ids must be integers that fit int32")
            ids = np.ascontiguousarray(ids, dtype="<i4")
            w = np.ascontiguousarray(w, dtype="<f4")
            K = ids.shape[1]
            secs += [(SEC_TOPK_IDS, DT_I32, (T, K), ids), (SEC_TOPK_W, DT_F32, (T, K), w)]
        if logits is not None:
            la, ldt, _ = _to_numpy(logits, None if not (isinstance(logits, np.ndarray) and logits.dtype == np.uint16)
                                   else "bf16", "logits")
            if la.ndim != 2 or la.shape[0] != T:
                raise MoeError(MOE_ERR_INVALID_ARG, "logits must be [T=%d, E]" % T)
            secs.append((SEC_LOGITS, ldt, la.shape, la))
        meta = dict(dtype=xdt, shape=(T, H), torch=back)
        hdr = dict(layer=int(layer), n_tokens=T, hidden=H, top_k=K, dtype=xdt)
        return secs, meta, hdr

    def submit(self, layer, x, topk_ids=None, topk_w=None, logits=None, dtype=None, timeout_ms=None):
        """y [T, H] in the dtype of x (uint16 bit patterns for bf16 numpy input; torch for torch input)."""
        secs, meta, hdr = self._submit_msg(layer, x, topk_ids, topk_w, logits, dtype)
        return self._wait(self._send(OP_SUBMIT, secs, timeout_ms, meta=meta, **hdr))

    def submit_async(self, layer, x, topk_ids=None, topk_w=None, logits=None, dtype=None, timeout_ms=None):
        """Sends and returns the request id; results come from collect()."""
        secs, meta, hdr = self._submit_msg(layer, x, topk_ids, topk_w, logits, dtype)
        return self._send(OP_SUBMIT, secs, timeout_ms, is_async=True, meta=meta, **hdr)

    def in_flight(self):
        return sum(1 for p in self._pending.values() if p["is_async"]) + len(self._done)

    def collect(self, timeout_ms=None):
        """The next completed asynchronous request, in completion order: (request_id, y or MoeError,
        latency_ms). Waits up to timeout_ms (None: until one completes); None when none completed in
        time; raises MoeError(MOE_ERR_NOT_FOUND) when nothing is in flight."""
        end = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        while True:
            if self._done:
                return self._done.pop(0)
            if not any(p["is_async"] for p in self._pending.values()):
                raise MoeError(MOE_ERR_NOT_FOUND, "no request in flight")
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._pump(left)
