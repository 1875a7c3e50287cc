#!/usr/bin/python3
"""bench_numpy.py: the numpy peer of tools/bench/cpu_bench.c. Times the per-expert
computation of a MoE layer's routed experts in plain numpy (the loop over experts of the
Hugging Face models: gather the expert's rows, two matrix products, the gated activation,
scatter-add), in float32, with the reference's function moe_ref.fused_experts(acc=float32).
numpy's matrix products go to the system BLAS (Debian: OpenBLAS, all cores).

cpu_bench runs it as a subprocess (--serve: one request per line on stdin, so that numpy is
timed right next to the C implementations); by hand:
  /usr/bin/python3 tools/bench/bench_numpy.py --hidden 2048 --inter 768 --experts 128 --topk 8 --tokens 1,16,128
Prints one line per T: "T=<tokens> us=<median microseconds per call> reps=<n>".
Weights are float32 (numpy has no bf16): the bytes it reads are twice those of a bf16 model.
"""

import argparse
import os
import sys
import time

import numpy as np


def find_moe_ref(hint):
    here = os.path.dirname(os.path.abspath(__file__))
    for d in [hint, os.path.join(here, "..", "..", "tests", "ref"), os.path.join(os.getcwd(), "tests", "ref")]:
        if d and os.path.exists(os.path.join(d, "moe_ref.py")):
            sys.path.insert(0, d)
            return
    raise SystemExit("bench_numpy: cannot find tests/ref/moe_ref.py (pass --ref-dir)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--inter", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--topk", type=int, required=True)
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--shared-inter", type=int, default=0)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per T")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ref-dir", default=None)
    ap.add_argument("--serve", action="store_true", help="read 'T min_time' lines on stdin (cpu_bench uses this)")
    a = ap.parse_args()
    find_moe_ref(a.ref_dir)
    import moe_ref

    rng = np.random.default_rng(a.seed)
    H, I, E, K = a.hidden, a.inter, a.experts, a.topk
    w13 = rng.standard_normal((E, 2 * I, H), dtype=np.float32) * np.float32(1 / np.sqrt(H))
    w2 = rng.standard_normal((E, H, I), dtype=np.float32) * np.float32(1 / np.sqrt(I))
    sh = None
    if a.shared_inter:
        Is = a.shared_inter
        sh = (rng.standard_normal((2 * Is, H), dtype=np.float32) * np.float32(1 / np.sqrt(H)),
              rng.standard_normal((H, Is), dtype=np.float32) * np.float32(1 / np.sqrt(Is)))
    def measure(T, min_time):
        x = rng.standard_normal((T, H), dtype=np.float32)
        ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)  # K distinct experts per token
        w = rng.random((T, K), dtype=np.float32)

        def call():
            y = moe_ref.fused_experts(x, w13, w2, ids, w, act="silu", dtype="f32", acc=np.float32)
            if sh is not None:
                y = y + moe_ref.shared_expert(x, sh[0], sh[1], act="silu", dtype="f32", acc=np.float32)
            return y

        call()  # warm-up
        times = []
        t_end = time.perf_counter() + min_time
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < a.max_reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print("T=%d us=%.1f reps=%d" % (T, float(np.median(times)) * 1e6, len(times)), flush=True)

    if a.serve:
        # cpu_bench's protocol: "ready", then one request per line ("T min_time"), one result
        # line each, until end of input. Lets the C side interleave numpy with its own cells.
        print("ready", flush=True)
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 2:
                measure(int(parts[0]), float(parts[1]))
        return
    for T in [int(t) for t in a.tokens.split(",") if t]:
        measure(T, a.min_time)


if __name__ == "__main__":
    main()
