"""toy_model.py: the test server's toy model (tests/ipc/testsrv.h) recomputed with numpy, from
its written description and sharing no code with the C: the independent reference of the CLI
and Python client tests. In f32 with ids and weights given, the elementwise order is the C's
(y += w * (a * x + b), slots in order), so outputs match bit for bit; routing uses numpy's exp
and sums, so routed outputs match within a tolerance.
"""
import numpy as np


def bf16_to_f32(u):
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def route(logits, K):
    lg = logits.astype(np.float32)
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :K].astype(np.int32)  # ties: lower id first
    w = np.take_along_axis(p, ids, axis=1)
    return ids, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def router_logits(x, E):
    H = x.shape[1]
    e = np.arange(E)[:, None]
    h = np.arange(H)[None, :]
    r = (((e * 5 + h * 3) % 11) - 5).astype(np.float32) / np.float32(16)
    return x.astype(np.float32) @ r.T


def forward(x, layer, E, K, ids=None, w=None, logits=None):
    """x: float32 [T, H] (already read from its dtype); returns float32 y before the final rounding."""
    x = x.astype(np.float32)
    T, H = x.shape
    if ids is None:
        ids, w = route(router_logits(x, E) if logits is None else logits, K)
    L = int(layer)
    y = np.zeros((T, H), np.float32)
    h = np.arange(H)
    for k in range(ids.shape[1]):
        e = ids[:, k].astype(np.int64)
        a = ((e + 1 + L).astype(np.float32) / np.float32(8))[:, None]
        b = ((((e[:, None] * 31 + h[None, :] * 7 + L * 13) % 17) - 8).astype(np.float32) / np.float32(64))
        y = y + w[:, k:k + 1].astype(np.float32) * (a * x + b)
    return y


def to_dtype(y, dtype):
    if dtype == "f32":
        return y.astype(np.float32)
    if dtype == "f16":
        return y.astype(np.float16)
    return f32_to_bf16(y)
