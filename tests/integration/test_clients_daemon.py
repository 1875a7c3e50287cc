"""test_clients_daemon.py: the Python client (ipc/python/moe_client.py) and the moe-client CLI
against the real daemon (moe-engine serve) serving checkpoints written by the independent numpy
writer (tests/model/write_checkpoints.py), compared with the numpy reference's expected outputs
(tests/ref/moe_ref.py, stored in <case>.expected.safetensors):

  - ping, info (the model as served), stats (counters move);
  - SUBMIT with the engine routing from hidden states, with the reference's ids and weights,
    and with router logits: each against the reference's y (fp32 1e-5, bf16 1e-2);
  - the C CLI's `submit` gives the same bits as the Python client for the same request;
  - the asynchronous interface with many requests in flight;
  - server errors arrive as MoeError with the server's code (unknown layer, bad expert id,
    wrong hidden size);
  - `moe-client bench` runs against the daemon and prints its table.

Run by test_clients_daemon.sh; prints "moe-test: N passed, M failed".
"""
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

ROOT = os.environ["MOE_ROOT"]
sys.path.insert(0, os.path.join(ROOT, "ipc", "python"))
import moe_client as mc  # noqa: E402

ENGINE = os.path.join(ROOT, "engine", "moe-engine")
CLI = os.path.join(ROOT, "ipc", "cli", "moe-client")
CKPT = os.path.join(ROOT, "tests", "model", "ckpt")
TMP = tempfile.mkdtemp(prefix="clients.", dir=os.environ.get("TEST_TMPDIR") if len(os.environ.get("TEST_TMPDIR", "")) < 60 else "/tmp")


def read_safetensors(path):
    """A small safetensors reader written here from the format's definition (numpy only)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    hdr = json.loads(data[8:8 + n])
    out = {}
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = data[8 + n + b:8 + n + e]
        dt = t["dtype"]
        if dt == "BF16":
            a = np.frombuffer(raw, dtype="<u2").reshape(t["shape"])
            out[name] = ("bf16", a.copy())
        else:
            np_dt = {"F32": "<f4", "F16": "<f2", "I32": "<i4"}[dt]
            out[name] = (dt.lower(), np.frombuffer(raw, dtype=np_dt).reshape(t["shape"]).copy())
    return out


def as_f32(kind, a):
    if kind == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Engine:
    def __init__(self, model, workers=2, extra=(), keys=None):
        self.endpoint = "tcp://127.0.0.1:%d" % free_port()
        self.rundir = tempfile.mkdtemp(prefix="rt.", dir=TMP)
        self.p = subprocess.Popen([ENGINE, "serve", "--model", model, "--workers", str(workers), "--bind", self.endpoint,
                                   "--http", "", "--runtime-dir", self.rundir, "--log-level", "warn"] + list(extra))
        c = mc.Client(self.endpoint, timeout_ms=1000, **(keys or {}))
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                if c.stats()["state"] == "ready":
                    break
            except mc.MoeError:
                pass
            if self.p.poll() is not None:
                raise RuntimeError("moe-engine exited during start")
            time.sleep(0.1)
        else:
            raise RuntimeError("moe-engine not ready in 60 s")
        c.close()

    def stop(self):
        self.p.terminate()
        assert self.p.wait(30) == 0, "moe-engine did not exit 0 on SIGTERM"


class CaseBase:
    case = None
    workers = 2
    tol = None

    @classmethod
    def setUpClass(cls):
        cls.eng = Engine(os.path.join(CKPT, cls.case), cls.workers)
        cls.c = mc.Client(cls.eng.endpoint, timeout_ms=20000)
        cls.exp = read_safetensors(os.path.join(CKPT, cls.case + ".expected.safetensors"))
        cls.layers = sorted({int(k.split(".")[0]) for k in cls.exp})

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        cls.eng.stop()

    def x_of(self, L):
        kind, x = self.exp["%d.x" % L]
        return kind, x

    def submit_py(self, L, **kw):
        kind, x = self.x_of(L)
        if kind == "bf16":  # bf16 travels as uint16 bit patterns both ways
            return mc.bf16_to_f32(self.c.submit(L, x, dtype="bf16", **kw))
        return np.asarray(self.c.submit(L, x, **kw), np.float32)

    def test_info_matches_checkpoint(self):
        info = self.c.info()
        with open(os.path.join(CKPT, self.case, "config.json")) as f:
            cfg = json.load(f)
        self.assertEqual(info["model"]["hidden"], cfg["hidden_size"])
        self.assertEqual(info["model"]["moe_layers"], self.layers)
        self.assertEqual(info["placement"]["world_size"], self.workers)
        self.c.ping()

    def test_engine_routing(self):
        for L in self.layers:
            y = self.submit_py(L)
            ref = as_f32(*self.exp["%d.y" % L])
            self.assertLessEqual(rel_err(y, ref), self.tol, "layer %d" % L)

    def test_given_routing_and_logits(self):
        for L in self.layers:
            ids = self.exp["%d.topk_ids" % L][1]
            w = self.exp["%d.topk_w" % L][1]
            lg = self.exp["%d.logits" % L][1]
            ref = as_f32(*self.exp["%d.y" % L])
            y1 = self.submit_py(L, topk_ids=ids, topk_w=w)
            y2 = self.submit_py(L, logits=lg)
            self.assertLessEqual(rel_err(y1, ref), self.tol)
            self.assertLessEqual(rel_err(y2, ref), self.tol)

    def test_cli_same_bits_as_python(self):
        L = self.layers[0]
        kind, x = self.x_of(L)
        xf = os.path.join(TMP, "%s_x.npy" % self.case)
        yf = os.path.join(TMP, "%s_y.npy" % self.case)
        # the CLI's .npy convention: bf16 as '<u2' bit patterns with --dtype bf16
        np.save(xf, x)
        args = [CLI, "--endpoint", self.eng.endpoint, "submit", "--layer", str(L), "--x", xf, "--out", yf]
        if kind == "bf16":
            args += ["--dtype", "bf16"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        y_cli = np.load(yf)
        y_py = self.submit_py(L)
        if kind == "bf16":
            y_cli = as_f32("bf16", y_cli)
        self.assertTrue(np.array_equal(y_cli.astype(np.float32), y_py), "CLI and Python differ")

    def test_async_many(self):
        L = self.layers[-1]
        kind, x = self.x_of(L)
        xs = as_f32(kind, x)
        ids = []
        for i in range(40):
            rows = xs[i % len(xs):][:1 + i % 7]
            ids.append((self.c.submit_async(L, rows, dtype=kind if kind == "bf16" else None), rows))
        got = {}
        while self.c.in_flight():
            rid, y, _latency_ms = self.c.collect()
            self.assertNotIsInstance(y, Exception)
            got[rid] = y
        self.assertEqual(len(got), 40)
        # each equals the same rows sent alone
        for rid, rows in ids[:6]:
            alone = self.c.submit(L, rows, dtype=kind if kind == "bf16" else None)
            self.assertTrue(np.array_equal(np.asarray(got[rid]), np.asarray(alone)))
        # a client that busy-polls for its replies gets the same bits; a bad setting is refused
        b = mc.Client(self.eng.endpoint, timeout_ms=20000, busy_poll_us=300)
        try:
            for rid, rows in ids[:3]:
                y = b.submit(L, rows, dtype=kind if kind == "bf16" else None)
                self.assertTrue(np.array_equal(np.asarray(got[rid]), np.asarray(y)))
        finally:
            b.close()
        with self.assertRaises(mc.MoeError):
            mc.Client(self.eng.endpoint, busy_poll_us=-1)

    def test_server_errors(self):
        L = self.layers[0]
        kind, x = self.x_of(L)
        xs = as_f32(kind, x)[:2]
        dt = kind if kind == "bf16" else None
        with self.assertRaises(mc.MoeError) as e:
            self.c.submit(999, xs, dtype=dt)
        self.assertIn(e.exception.code, (-1, -15))
        with self.assertRaises(mc.MoeError) as e:
            K = self.exp["%d.topk_ids" % L][1].shape[1]
            bad = np.full((2, K), 10 ** 6, np.int32)
            self.c.submit(L, xs, topk_ids=bad, topk_w=np.ones((2, K), np.float32), dtype=dt)
        self.assertEqual(e.exception.code, -1)
        self.assertIn("expert id", str(e.exception))
        with self.assertRaises(mc.MoeError):
            self.c.submit(L, np.zeros((2, xs.shape[1] + 1), np.float32), dtype=dt)
        # still serving
        self.submit_py(L)
        st = self.c.stats()
        self.assertGreater(st["requests"]["ok"], 0)
        self.assertGreater(st["requests"]["rejected"], 0)


class TestQwen2MoeBf16(CaseBase, unittest.TestCase):
    case = "qwen2_moe_bf16"
    workers = 3
    tol = 1e-2


class TestDeepseekV3F32(CaseBase, unittest.TestCase):
    case = "deepseek_v3_f32"
    workers = 2
    tol = 1e-5


class TestCurveDaemon(unittest.TestCase):
    """CURVE with the ZAP allow-list on the real daemon: an allowed key is served; no key, an
    unknown key, and a key revoked by SIGHUP (allow-list reloaded) are refused."""

    def test_allow_list(self):
        d = tempfile.mkdtemp(prefix="curve.", dir=TMP)
        for name in ("server", "alice", "mallory"):
            r = subprocess.run([ENGINE, "keygen", os.path.join(d, name)], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
        allow = os.path.join(d, "allow.txt")
        with open(allow, "w") as f:
            with open(os.path.join(d, "alice.pub")) as pub:
                f.write("# clients allowed\n" + pub.read())
        server_pub = mc.load_public_key(os.path.join(d, "server.pub"))
        alice = mc.load_secret_key(os.path.join(d, "alice.key"))
        mallory = mc.load_secret_key(os.path.join(d, "mallory.key"))
        eng = Engine(os.path.join(CKPT, "mixtral_bf16"), 2,
                     extra=["--curve-secret-file", os.path.join(d, "server.key"), "--curve-allow-file", allow],
                     keys=dict(server_key=server_pub, client_public=alice[0], client_secret=alice[1]))
        try:
            ok = mc.Client(eng.endpoint, timeout_ms=5000, server_key=server_pub, client_public=alice[0],
                           client_secret=alice[1])
            ok.ping()
            x = np.zeros((2, 64), np.float32)
            self.assertEqual(ok.submit(0, x, dtype="bf16").shape, (2, 64))
            ok.close()
            for kw in (dict(), dict(server_key=server_pub, client_public=mallory[0], client_secret=mallory[1])):
                bad = mc.Client(eng.endpoint, timeout_ms=2000, **kw)
                with self.assertRaises(mc.MoeError) as e:
                    bad.ping()
                self.assertIn(e.exception.code, (mc.MOE_ERR_AUTH, mc.MOE_ERR_TIMEOUT))
                bad.close()
            # revoke alice: empty the allow-list and reload it with SIGHUP
            with open(allow, "w") as f:
                f.write("# nobody\n")
            eng.p.send_signal(1)
            time.sleep(0.5)
            again = mc.Client(eng.endpoint, timeout_ms=2000, server_key=server_pub, client_public=alice[0],
                              client_secret=alice[1])
            with self.assertRaises(mc.MoeError) as e:
                again.ping()
            self.assertIn(e.exception.code, (mc.MOE_ERR_AUTH, mc.MOE_ERR_TIMEOUT))
            again.close()
        finally:
            eng.stop()


class TestCliBench(unittest.TestCase):
    def test_bench_against_daemon(self):
        eng = Engine(os.path.join(CKPT, "mixtral_bf16"), 2)
        try:
            r = subprocess.run([CLI, "--endpoint", eng.endpoint, "bench", "--concurrency", "4", "--tokens", "8",
                                "--layer", "0", "--duration", "1", "--dtype", "bf16", "--mode", "route"],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("tokens/s", r.stdout + r.stderr)
            sys.stderr.write(r.stdout)
            for cmd in (["ping"], ["info"], ["stats"], ["--busy-poll-us", "200", "ping", "--count", "3"]):
                r = subprocess.run([CLI, "--endpoint", eng.endpoint] + cmd, capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 0, r.stderr)
            # a bad value is refused with a message, before any connection
            r = subprocess.run([CLI, "--endpoint", eng.endpoint, "--busy-poll-us", "-5", "ping"], capture_output=True,
                               text=True, timeout=30)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("--busy-poll-us", r.stderr)
        finally:
            eng.stop()


if __name__ == "__main__":
    res = unittest.main(exit=False, verbosity=2).result
    failed = len(res.failures) + len(res.errors)
    print("moe-test: %d passed, %d failed" % (res.testsRun - failed - len(res.skipped), failed))
    sys.exit(1 if failed else 0)
