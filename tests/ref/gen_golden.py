#!/usr/bin/python3
"""gen_golden.py: writes the golden cases of the kernel tests (inputs and the numpy
reference's outputs, moe_ref.py) into one binary file that tests/kernels/test_kernels.c reads.

Run by Bazel (tests/ref:golden genrule) with a fixed seed: the same file on every machine.
By hand:  /usr/bin/python3 tests/ref/gen_golden.py --out /tmp/golden.bin [--list]

Cases: the five families (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3) x T in
{1, 7, 64} x {f32, bf16}, f16 at T = 7, and: an expert-map case (some experts held elsewhere,
with slot-mode outputs), weight-on-input cases (K = 1 and K = 2), GELU (exact and tanh) cases,
routing-only cases with many exact ties, and a large-T case that spans several chunks of the
fast backend. Each case is a whole MoE layer: hidden states x, the router weights, the
router logits (x @ router_w.T rounded to the logits dtype: the model dtype for Mixtral/Qwen,
fp32 for DeepSeek, as the models compute them), the routing (ids, weights), the routed
experts' per-slot contributions and their sum, the shared expert's output and the layer
output. Inputs are drawn so that the routing decisions have a clear margin (or exact ties):
a float32 implementation must reproduce the ids exactly.

File format (little-endian):
  "MOEGOLD1", u32 version (1), u32 n_cases
  per case:   str name, str meta ("key=value" lines), u32 n_tensors
  per tensor: str name, u32 dtype (moe_dtype: 0 f32, 1 f16, 2 bf16, 3 i32), u32 ndim,
              i64 shape[ndim], u64 nbytes, the data (row-major)
  str:        u32 length, bytes (no terminator)
bf16/f16 tensors hold bit patterns (uint16). Expected outputs are f32 tensors holding the
values of the case's dtype.
"""

import argparse
import math
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_ref  # noqa: E402

MAGIC = b"MOEGOLD1"
VERSION = 1
DT_F32, DT_F16, DT_BF16, DT_I32 = 0, 1, 2, 3
DT_CODE = {"f32": DT_F32, "f16": DT_F16, "bf16": DT_BF16}
MIN_GAP = 2e-5  # relative margin of every routing decision (float32 error is ~1e-7)


def encode(values, dtype):
    """(dtype code, raw array) of float values in an activation dtype."""
    if dtype == "f32":
        return DT_F32, np.asarray(values, dtype=np.float32)
    if dtype == "bf16":
        return DT_BF16, moe_ref.bf16_bits(values)
    if dtype == "f16":
        return DT_F16, moe_ref.f16_bits(values)
    raise ValueError(dtype)


class Case:
    def __init__(self, name):
        self.name = name
        self.meta = {}
        self.tensors = []

    def put(self, name, code, arr):
        self.tensors.append((name, code, np.ascontiguousarray(arr)))

    def put_act(self, name, values, dtype):
        code, raw = encode(values, dtype)
        self.put(name, code, raw)

    def put_f32(self, name, values):
        self.put(name, DT_F32, np.asarray(values, dtype=np.float32))

    def put_i32(self, name, values):
        self.put(name, DT_I32, np.asarray(values, dtype=np.int32))


def draw_routable(rng, shape, router_w, logits_dtype, dtype, route_kw, tries=200):
    """Hidden states whose routing has a clear margin in every decision (redrawn per row)."""
    x = moe_ref.round_to(rng.standard_normal(shape), dtype)
    for _ in range(tries):
        logits = moe_ref.round_to(x @ router_w.T, logits_dtype)
        gap = moe_ref.route_decision_gap(logits, **route_kw)
        bad = gap < MIN_GAP
        if not bad.any():
            return x
        x[bad] = moe_ref.round_to(rng.standard_normal((int(bad.sum()), shape[1])), dtype)
    raise RuntimeError("could not draw inputs with a clear routing margin")


def make_layer_case(name, family, T, dtype, seed, act=None, expert_map=None, weight_on_input=False, top_k=None,
                    hidden=None, inter=None, n_experts=None):
    fam = moe_ref.FAMILIES[family]
    rng = np.random.default_rng(seed)
    E = n_experts or fam["n_experts"]
    H = hidden or fam["test"]["hidden"]
    I = inter or fam["test"]["inter"]
    Is = fam["test"]["shared_inter"]
    act = act or fam["act"]
    kw = dict(fam["routing"])
    if top_k is not None:
        kw["top_k"] = top_k
    K = kw["top_k"]
    logits_dtype = "f32" if family.startswith("deepseek") else dtype
    bias = rng.normal(0.0, 0.1, E).astype(np.float32) if fam["correction_bias"] else None
    route_kw = dict(kw, correction_bias=bias)

    router_w = moe_ref.round_to(rng.standard_normal((E, H)) * (2.0 / math.sqrt(H)), dtype)
    x = draw_routable(rng, (T, H), router_w, logits_dtype, dtype, route_kw)
    n_local = E if expert_map is None else int(np.max(expert_map)) + 1
    w13 = moe_ref.round_to(rng.standard_normal((n_local, 2 * I, H)) / math.sqrt(H), dtype)
    w2 = moe_ref.round_to(rng.standard_normal((n_local, H, I)) / math.sqrt(I), dtype)
    shared = None
    if fam["shared"] is not None:
        shared = {
            "w13": moe_ref.round_to(rng.standard_normal((2 * Is, H)) / math.sqrt(H), dtype),
            "w2": moe_ref.round_to(rng.standard_normal((H, Is)) / math.sqrt(Is), dtype),
            "gate": moe_ref.round_to(rng.standard_normal(H) / math.sqrt(H), dtype) if fam["shared"]["gate"] else None,
            "act": act,
        }

    res = moe_ref.moe_layer(x, router_w, w13, w2, expert_map=expert_map, weight_on_input=weight_on_input,
                            shared=shared, dtype=dtype, logits_dtype=logits_dtype, act=act, correction_bias=bias,
                            **kw)
    y_routed = moe_ref.moe_sum(res["slots"], None, dtype=dtype)
    # the sum-mode function on its own must agree with slots + sum (same reference, two routes)
    y_direct = moe_ref.fused_experts(x, w13, w2, res["ids"], res["weights"], act=act, expert_map=expert_map,
                                     weight_on_input=weight_on_input, dtype=dtype)
    assert np.array_equal(y_direct, y_routed), name

    c = Case(name)
    c.meta.update(family=family, dtype=dtype, act=act, T=T, H=H, I=I, E=E, n_local=n_local, K=K,
                  scoring=kw["scoring"], group_mode=kw["group_mode"] or "none", n_group=kw["n_group"],
                  topk_group=kw["topk_group"], renormalize=int(kw["renormalize"]),
                  routed_scaling_factor=repr(float(kw["routed_scaling_factor"])),
                  weight_on_input=int(weight_on_input), logits_dtype=logits_dtype,
                  shared_inter=Is if shared else 0, shared_gate=int(bool(shared and shared["gate"] is not None)),
                  routing_only=0)
    c.put_act("x", x, dtype)
    c.put_act("router_w", router_w, dtype)
    c.put_act("logits", res["logits"], logits_dtype)
    if bias is not None:
        c.put_f32("correction_bias", bias)
    c.put_act("w13", w13, dtype)
    c.put_act("w2", w2, dtype)
    if expert_map is not None:
        c.put_i32("expert_map", expert_map)
    c.put_i32("ids", res["ids"])
    c.put_f32("weights", res["weights"])
    c.put_f32("slots", res["slots"])
    c.put_f32("y_routed", y_routed)
    if shared is not None:
        c.put_act("shared_w13", shared["w13"], dtype)
        c.put_act("shared_w2", shared["w2"], dtype)
        if shared["gate"] is not None:
            c.put_act("shared_gate", shared["gate"], dtype)
        c.put_f32("shared_out", res["shared"])
    c.put_f32("y", res["y"])
    return c


def make_tie_case(name, seed, T, E, K, scoring, group_mode, n_group, topk_group, renormalize, scaling, levels,
                  with_bias):
    """Routing only: logits from a few integer levels, so many values tie exactly."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, levels, size=(T, E)).astype(np.float64)
    bias = np.zeros(E, dtype=np.float32) if with_bias else None
    kw = dict(top_k=K, scoring=scoring, n_group=n_group, topk_group=topk_group, group_mode=group_mode,
              renormalize=renormalize, routed_scaling_factor=scaling, correction_bias=bias)
    ids, w = moe_ref.route(logits, **kw)
    c = Case(name)
    c.meta.update(family="ties", dtype="f32", act="silu", T=T, H=0, I=0, E=E, n_local=E, K=K, scoring=scoring,
                  group_mode=group_mode or "none", n_group=n_group, topk_group=topk_group,
                  renormalize=int(renormalize), routed_scaling_factor=repr(float(scaling)), weight_on_input=0,
                  logits_dtype="f32", shared_inter=0, shared_gate=0, routing_only=1)
    c.put_f32("logits", logits)
    if bias is not None:
        c.put_f32("correction_bias", bias)
    c.put_i32("ids", ids)
    c.put_f32("weights", w)
    return c


def all_cases():
    cases = []
    seed = 1000
    for family in moe_ref.FAMILIES:
        for T in (1, 7, 64):
            for dtype in ("f32", "bf16"):
                seed += 1
                cases.append(make_layer_case("%s/T%d/%s" % (family, T, dtype), family, T, dtype, seed))
        seed += 1
        cases.append(make_layer_case("%s/T7/f16" % family, family, 7, "f16", seed))
    # expert map: 16 experts, this rank holds 6 (global ids 1, 4, 7, 10, 13 and 15)
    emap = np.full(16, -1, dtype=np.int32)
    for slot, e in enumerate((1, 4, 7, 10, 13, 15)):
        emap[e] = slot
    fam = "qwen3_moe"
    for dtype in ("f32", "bf16"):
        seed += 1
        cases.append(make_layer_case("expert_map/T29/%s" % dtype, fam, 29, dtype, seed, expert_map=emap, top_k=4,
                                     hidden=40, inter=26, n_experts=16))
    # weight on input (Llama-4 style K = 1, and K = 2)
    for K in (1, 2):
        for dtype in ("f32", "bf16"):
            seed += 1
            cases.append(make_layer_case("weight_on_input/K%d/%s" % (K, dtype), "mixtral", 13, dtype, seed,
                                         weight_on_input=True, top_k=K))
    # GELU activations
    for act in ("gelu", "gelu_tanh"):
        for dtype in ("f32", "bf16"):
            seed += 1
            cases.append(make_layer_case("%s/T7/%s" % (act, dtype), "qwen2_moe", 7, dtype, seed, act=act))
    # large T: several chunks of the fast backend (8192 pairs per chunk)
    for dtype in ("f32", "bf16"):
        seed += 1
        cases.append(make_layer_case("large/T1100/%s" % dtype, "qwen3_moe", 1100, dtype, seed, hidden=20, inter=12))
    # exact ties
    seed += 1
    cases.append(make_tie_case("ties/softmax", seed, 64, 16, 4, "softmax", None, 1, 1, True, 1.0, 3, False))
    seed += 1
    cases.append(make_tie_case("ties/group_max", seed, 64, 16, 3, "softmax", "max", 4, 2, False, 16.0, 3, False))
    seed += 1
    cases.append(make_tie_case("ties/group_top2", seed, 64, 16, 4, "sigmoid", "top2_sum", 4, 2, True, 2.5, 2, True))
    seed += 1
    cases.append(make_tie_case("ties/all_equal", seed, 4, 8, 8, "softmax", None, 1, 1, True, 1.0, 1, False))
    return cases


def write_str(f, s):
    b = s.encode()
    f.write(struct.pack("<I", len(b)))
    f.write(b)


def write_file(path, cases):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<II", VERSION, len(cases)))
        for c in cases:
            write_str(f, c.name)
            write_str(f, "".join("%s=%s\n" % (k, v) for k, v in c.meta.items()))
            f.write(struct.pack("<I", len(c.tensors)))
            for name, code, arr in c.tensors:
                write_str(f, name)
                f.write(struct.pack("<II", code, arr.ndim))
                for d in arr.shape:
                    f.write(struct.pack("<q", d))
                data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
                f.write(struct.pack("<Q", len(data)))
                f.write(data)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--list", action="store_true", help="print the cases")
    args = ap.parse_args()
    cases = all_cases()
    write_file(args.out, cases)
    if args.list:
        for c in cases:
            print(c.name, " ".join("%s%s" % (n, list(a.shape)) for n, _, a in c.tensors))
    print("gen_golden: %d cases -> %s (%d bytes)" % (len(cases), args.out, os.path.getsize(args.out)))


if __name__ == "__main__":
    main()
