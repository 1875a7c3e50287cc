"""python_test.py: the Python client (ipc/python/moe_client.py) end to end against the test
server run as real processes on 127.0.0.1: every op, SUBMIT in every form and dtype checked
against toy_model.py (numpy, independent of the C), a bit-for-bit cross-check with the C
client (moe-client), errors with the server's codes and messages, the asynchronous interface,
timeouts and BUSY, CURVE with an allow-list, protocol versions, torch tensors (when torch is
installed). Run by python_test.sh; prints "moe-test: N passed, M failed".
"""
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("MOE_ROOT", os.path.abspath(os.path.join(HERE, "..", "..")))
sys.path.insert(0, os.path.join(ROOT, "ipc", "python"))
sys.path.insert(0, HERE)
import moe_client as mc  # noqa: E402
import toy_model as tm  # noqa: E402

SERVER = os.path.join(ROOT, "tests", "ipc", "test_server")
CLIENT = os.path.join(ROOT, "ipc", "cli", "moe-client")
TMP = tempfile.mkdtemp(prefix="pytest.", dir=os.environ.get("TEST_TMPDIR"))


class Server:
    def __init__(self, *args):
        self.p = subprocess.Popen([SERVER] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("endpoint "):
            raise RuntimeError("test server did not start: %r %s" % (line, self.p.stderr.read()))
        self.endpoint = line.split()[1]

    def stop(self):
        self.p.terminate()
        assert self.p.wait(10) == 0, "the test server did not exit cleanly"


def rand_batch(T, seed, E=8, K=2, H=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    return x, ids, w, rng.standard_normal((T, E)).astype(np.float32)


class TestClient(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--layers", "4", "--experts", "8", "--hidden", "64", "--top-k", "2", "--max-tokens", "64")
        cls.c = mc.Client(cls.srv.endpoint, timeout_ms=5000)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        cls.srv.stop()

    def test_ping_info_stats(self):
        self.assertGreater(self.c.ping(), 0.0)
        info = self.c.info()
        self.assertEqual(info["protocol"], 1)
        m = info["model"]
        self.assertEqual((m["n_experts"], m["hidden"], m["top_k"], m["n_layers"]), (8, 64, 2, 4))
        self.assertEqual(info["limits"]["max_tokens"], 64)
        st = self.c.stats()
        self.assertIn("requests", st)
        self.assertGreaterEqual(st["requests"]["by_op"]["INFO"], 1)

    def test_submit_ids_every_dtype_bit_exact(self):
        x, ids, w, _ = rand_batch(9, 1)
        y = self.c.submit(1, x, ids, w)
        self.assertEqual(y.dtype, np.float32)
        np.testing.assert_array_equal(y, tm.forward(x, 1, 8, 2, ids=ids, w=w))
        x16 = x.astype(np.float16)
        y16 = self.c.submit(2, x16, ids, w)
        self.assertEqual(y16.dtype, np.float16)
        np.testing.assert_array_equal(y16.view(np.uint16),
                                      tm.forward(x16.astype(np.float32), 2, 8, 2, ids=ids, w=w).astype(np.float16).view(np.uint16))
        xb = mc.f32_to_bf16(x)
        np.testing.assert_array_equal(xb, tm.f32_to_bf16(x))  # two independent conversions agree
        yb = self.c.submit(3, xb, ids, w, dtype="bf16")
        self.assertEqual(yb.dtype, np.uint16)
        np.testing.assert_array_equal(yb, tm.f32_to_bf16(tm.forward(tm.bf16_to_f32(xb), 3, 8, 2, ids=ids, w=w)))
        # converting on the way: float32 in, bf16 on the wire
        yb2 = self.c.submit(3, x, ids, w, dtype="bf16")
        np.testing.assert_array_equal(yb2, yb)

    def test_submit_routed(self):
        x, _, _, lg = rand_batch(7, 2)
        y = self.c.submit(0, x, logits=lg)
        np.testing.assert_allclose(y, tm.forward(x, 0, 8, 2, logits=lg), rtol=1e-5, atol=1e-5)
        y = self.c.submit(2, x)
        np.testing.assert_allclose(y, tm.forward(x, 2, 8, 2), rtol=1e-5, atol=1e-5)

    def test_same_bits_as_the_c_client(self):
        x, ids, w, _ = rand_batch(5, 3)
        d = tempfile.mkdtemp(dir=TMP)
        xb = mc.f32_to_bf16(x)
        np.save(os.path.join(d, "x.npy"), xb)
        np.save(os.path.join(d, "ids.npy"), ids)
        np.save(os.path.join(d, "w.npy"), w)
        out = os.path.join(d, "y.npy")
        subprocess.run([CLIENT, "--endpoint", self.srv.endpoint, "submit", "--layer", "2", "--x", d + "/x.npy",
                        "--ids", d + "/ids.npy", "--weights", d + "/w.npy", "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
        np.testing.assert_array_equal(np.load(out), self.c.submit(2, xb, ids, w, dtype="bf16"))

    def test_errors(self):
        x, ids, w, _ = rand_batch(4, 4)
        bad = ids.copy()
        bad[2, 1] = 8
        with self.assertRaises(mc.MoeError) as e:
            self.c.submit(0, x, bad, w)
        self.assertEqual(e.exception.code, mc.MOE_ERR_INVALID_ARG)
        self.assertIn("expert id 8 out of range [0, 8) at token 2, slot 1", e.exception.message)
        with self.assertRaises(mc.MoeError) as e:
            self.c.submit(4, x, ids, w)
        self.assertIn("layer 4", e.exception.message)
        wn = w.copy()
        wn[1, 0] = np.nan
        with self.assertRaises(mc.MoeError) as e:
            self.c.submit(0, x, ids, wn)
        self.assertIn("not finite", e.exception.message)
        big = np.zeros((65, 64), np.float32)
        with self.assertRaises(mc.MoeError) as e:
            self.c.submit(0, big)
        self.assertEqual(e.exception.name, "MOE_ERR_LIMIT")
        with self.assertRaises(mc.MoeError) as e:  # caught on this side
            self.c.submit(0, mc.f32_to_bf16(x), ids, w)
        self.assertIn("dtype='bf16'", e.exception.message)
        with self.assertRaises(mc.MoeError):
            self.c.submit(0, x, ids)
        with self.assertRaises(mc.MoeError):
            self.c.submit(0, x.astype(np.int32))
        self.assertGreater(self.c.ping(), 0.0)  # and still served

    def test_async(self):
        batches = {}
        for i in range(60):
            x, ids, w, _ = rand_batch(1 + i % 5, 100 + i)
            rid = self.c.submit_async(i % 4, x, ids, w)
            batches[rid] = (i % 4, x, ids, w)
        self.assertEqual(self.c.in_flight(), 60)
        got = 0
        while True:
            try:
                r = self.c.collect(5000)
            except mc.MoeError as e:
                self.assertEqual(e.code, mc.MOE_ERR_NOT_FOUND)
                break
            self.assertIsNotNone(r)
            rid, y, lat = r
            layer, x, ids, w = batches.pop(rid)
            self.assertNotIsInstance(y, mc.MoeError)
            np.testing.assert_array_equal(y, tm.forward(x, layer, 8, 2, ids=ids, w=w))
            got += 1
        self.assertEqual(got, 60)
        self.assertEqual(batches, {})

    def test_protocol_version_of_a_reply(self):
        msg = bytearray(mc.encode(mc.OP_PING, 7, flags=mc.FLAG_REPLY))
        msg[4] = 2
        with self.assertRaises(mc.MoeError) as e:
            mc.decode(bytes(msg))
        self.assertEqual(e.exception.code, mc.MOE_ERR_PROTOCOL)
        self.assertIn("protocol version 2", e.exception.message)
        # a v2 request to the server: a v1 error reply naming both versions
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.srv.endpoint)
        req = bytearray(mc.encode(mc.OP_PING, 99))
        req[4] = 2
        s.send(bytes(req))
        self.assertTrue(s.poll(5000))
        m = mc.decode(s.recv())
        self.assertEqual((m.request_id, m.status), (99, mc.MOE_ERR_PROTOCOL))
        self.assertIn(b"protocol version 2 is not supported", bytes(m.sections[0][3]))
        s.close()
        ctx.term()

    def test_torch(self):
        if not mc._HAVE_TORCH:
            self.skipTest("torch is not installed")
        import torch
        x, ids, w, _ = rand_batch(3, 5)
        xt = torch.from_numpy(x).to(torch.bfloat16)
        y = self.c.submit(1, xt, torch.from_numpy(ids).long(), torch.from_numpy(w))
        self.assertEqual(y.dtype, torch.bfloat16)
        ref = tm.f32_to_bf16(tm.forward(tm.bf16_to_f32(mc.f32_to_bf16(x)), 1, 8, 2, ids=ids, w=w))
        np.testing.assert_array_equal(y.view(torch.int16).numpy().view(np.uint16), ref)


class TestTimeouts(unittest.TestCase):
    def test_timeout_busy_and_late_reply(self):
        srv = Server("--delay-ms", "800", "--max-queue", "2")
        try:
            with mc.Client(srv.endpoint, timeout_ms=5000) as c:
                x, ids, w, _ = rand_batch(2, 6)
                t0 = time.monotonic()
                with self.assertRaises(mc.MoeError) as e:
                    c.submit(0, x, ids, w, timeout_ms=100)
                self.assertEqual(e.exception.code, mc.MOE_ERR_TIMEOUT)
                self.assertLess(time.monotonic() - t0, 0.7)
                np.testing.assert_array_equal(c.submit(0, x, ids, w, timeout_ms=3000),
                                              tm.forward(x, 0, 8, 2, ids=ids, w=w))
                for _ in range(5):
                    c.submit_async(0, x, ids, w, timeout_ms=3000)
                codes = []
                while len(codes) < 5:
                    rid, y, lat = c.collect()
                    codes.append(y.code if isinstance(y, mc.MoeError) else 0)
                self.assertEqual(sorted(codes), [mc.MOE_ERR_BUSY] * 3 + [0, 0])
        finally:
            srv.stop()


class TestCurve(unittest.TestCase):
    def test_allow_list(self):
        d = tempfile.mkdtemp(dir=TMP)
        keys = {}
        for name in ("server", "alice", "mallory"):
            pub, sec = (k.decode() for k in zmq.curve_keypair())
            with open(os.path.join(d, name + ".key"), "w") as f:
                f.write("# %s\npublic %s\nsecret %s\n" % (name, pub, sec))
            keys[name] = (pub, sec)
        with open(os.path.join(d, "allow.txt"), "w") as f:
            f.write("# allowed\n%s\n" % keys["alice"][0])
        self.assertEqual(mc.load_secret_key(os.path.join(d, "alice.key")), keys["alice"])
        srv = Server("--curve-secret", os.path.join(d, "server.key"), "--allow", os.path.join(d, "allow.txt"))
        try:
            spub = mc.load_public_key(os.path.join(d, "server.key"))
            with mc.Client(srv.endpoint, timeout_ms=3000, server_key=spub, client_public=keys["alice"][0],
                           client_secret=keys["alice"][1]) as c:
                self.assertGreater(c.ping(), 0.0)
            with mc.Client(srv.endpoint, timeout_ms=3000, server_key=spub, client_public=keys["mallory"][0],
                           client_secret=keys["mallory"][1]) as c:
                with self.assertRaises(mc.MoeError) as e:
                    c.ping()
                self.assertEqual(e.exception.code, mc.MOE_ERR_AUTH)
            with mc.Client(srv.endpoint, timeout_ms=1500) as c:
                with self.assertRaises(mc.MoeError) as e:
                    c.ping()
                self.assertIn(e.exception.code, (mc.MOE_ERR_AUTH, mc.MOE_ERR_TIMEOUT))
        finally:
            srv.stop()


if __name__ == "__main__":
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    res = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(res.failures) + len(res.errors)
    skipped = len(res.skipped)
    passed = res.testsRun - failed - skipped
    for t, why in res.skipped:
        print("skipped: %s: %s" % (t.id(), why))
    print("moe-test: %d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)
