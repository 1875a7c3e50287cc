#!/usr/bin/python3
"""test_moe_ref.py: checks the numpy reference itself (moe_ref.py) against second, plainer
computations: exact rational rounding for bf16, hand-worked routing examples, a per-token
Python loop for routing and for the experts. Prints "moe-test: N passed, M failed" (the line
tools/moe counts) and exits non-zero on a failure.

Run: /usr/bin/python3 tests/ref/test_moe_ref.py
"""

import math
import os
import sys
import traceback
from fractions import Fraction

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_ref  # noqa: E402

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def bf16_nearest_exact(v):
    """The bf16 value nearest to float v (ties to the even significand), by exact rational
    arithmetic over the two bf16 neighbours: an independent check of moe_ref.bf16_round."""
    if v == 0.0 or not math.isfinite(v):
        return v
    m, e = math.frexp(abs(v))  # abs(v) = m * 2**e, 0.5 <= m < 1
    e = max(e, -125)  # bf16 shares float32's exponent range: below 2**-126 the spacing stays 2**-133
    ulp = Fraction(2) ** (e - 8)  # 8 significand bits
    x = Fraction(abs(v))
    lo = (x // ulp) * ulp
    hi = lo + ulp
    if x - lo < hi - x:
        r = lo
    elif x - lo > hi - x:
        r = hi
    else:
        r = lo if (lo / ulp) % 2 == 0 else hi
    return math.copysign(float(r), v)


@test
def bf16_rounding_matches_exact_arithmetic():
    rng = np.random.default_rng(1)
    vals = list(rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000))
    # exact midpoints between neighbouring bf16 values, and one float64 ulp either side
    for b in rng.integers(0x0080, 0x7F00, 500):
        lo = float(moe_ref.bf16_from_bits(np.uint16(b)))
        hi = float(moe_ref.bf16_from_bits(np.uint16(b + 1)))
        mid = (lo + hi) / 2
        vals += [mid, np.nextafter(mid, 0.0), np.nextafter(mid, np.inf), -mid]
    # float64 values whose float32 rounding lands exactly on a bf16 midpoint (double rounding traps)
    for b in rng.integers(0x3F00, 0x4100, 200):
        lo = float(moe_ref.bf16_from_bits(np.uint16(b)))
        hi = float(moe_ref.bf16_from_bits(np.uint16(b + 1)))
        mid = (lo + hi) / 2
        vals += [mid + (hi - lo) * 2.0 ** -30, mid - (hi - lo) * 2.0 ** -30]
    vals += [1e-40, -3e-39, 2.0 ** -133, 2.0 ** -134, 3 * 2.0 ** -135]  # subnormals
    got = moe_ref.bf16_round(np.array(vals))
    for v, g in zip(vals, got):
        want = bf16_nearest_exact(float(v))
        assert g == want, "bf16(%r) = %r, exact nearest %r" % (v, g, want)


@test
def bf16_special_values():
    assert moe_ref.bf16_bits(np.array([1.0]))[0] == 0x3F80
    assert moe_ref.bf16_bits(np.array([-2.0]))[0] == 0xC000
    assert moe_ref.bf16_bits(np.array([np.inf]))[0] == 0x7F80
    assert moe_ref.bf16_bits(np.array([3.4e38]))[0] == 0x7F80  # overflows to infinity
    assert np.isnan(moe_ref.bf16_from_bits(moe_ref.bf16_bits(np.array([np.nan])))[0])
    # 1 + 2**-8 is a tie between 1 and 1 + 2**-7: to even (1.0); 1 + 3 * 2**-8 rounds up to even
    assert moe_ref.bf16_round(np.array([1 + 2.0 ** -8]))[0] == 1.0
    assert moe_ref.bf16_round(np.array([1 + 3 * 2.0 ** -8]))[0] == 1 + 2.0 ** -6


@test
def f16_rounding():
    r = moe_ref.round_to(np.array([2049.0, 2051.0, 65520.0, 65519.0, 2.0 ** -25, 3 * 2.0 ** -26]), "f16")
    assert list(r[:2]) == [2048.0, 2052.0], r
    assert math.isinf(r[2]) and r[3] == 65504.0, r
    assert r[4] == 0.0 and r[5] == 2.0 ** -24, r  # ties to even at the subnormal end


@test
def route_softmax_by_hand():
    # probabilities 1/8, 2/8, 1/8, 4/8
    logits = np.log(np.array([[1.0, 2.0, 1.0, 4.0]]))
    ids, w = moe_ref.route(logits, top_k=2, renormalize=True)
    assert ids.tolist() == [[3, 1]], ids
    assert np.allclose(w, [[4 / 6, 2 / 6]], rtol=1e-7), w
    ids, w = moe_ref.route(logits, top_k=3, renormalize=False, routed_scaling_factor=2.0)
    assert ids.tolist() == [[3, 1, 0]], ids  # 0 and 2 tie: the lower id
    assert np.allclose(w, [[1.0, 0.5, 0.25]], rtol=1e-7), w


@test
def route_groups_by_hand():
    # 8 experts in 4 groups of 2; softmax of these logits keeps the order of the logits
    logits = np.array([[5.0, 0.0, 4.0, 3.9, 4.5, -5.0, 0.1, 0.2]])
    # max: groups score 5, 4, 4.5, 0.2 -> keep groups 0 and 2 -> experts 0, 1, 4, 5
    ids, _ = moe_ref.route(logits, top_k=3, n_group=4, topk_group=2, group_mode="max")
    assert ids.tolist() == [[0, 4, 1]], ids
    # top-2 sums (on sigmoid scores, no bias): group 1 (4, 3.9) beats group 2 (4.5, -5)
    ids, _ = moe_ref.route(logits, top_k=3, scoring="sigmoid", n_group=4, topk_group=2, group_mode="top2_sum")
    assert ids.tolist() == [[0, 2, 3]], ids
    # the bias moves the choice, not the weights
    bias = np.array([0, 0, 0, 0, 0, 0, 10.0, 0])
    ids, w = moe_ref.route(logits, top_k=2, scoring="sigmoid", correction_bias=bias, n_group=4, topk_group=1,
                           group_mode="top2_sum")
    assert ids.tolist() == [[6, 7]], ids
    assert np.allclose(w, [[moe_ref.sigmoid(0.1), moe_ref.sigmoid(0.2)]]), w


def route_loop(logits, top_k, scoring, bias, n_group, topk_group, group_mode, renormalize, scaling):
    """A plain per-token loop with Python sorting."""
    T, E = logits.shape
    ids = np.zeros((T, top_k), dtype=np.int32)
    ws = np.zeros((T, top_k))
    for t in range(T):
        row = [float(v) for v in logits[t]]
        if scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            s = sum(ex)
            sc = [v / s for v in ex]
        else:
            sc = [1 / (1 + math.exp(-v)) for v in row]
        ch = [sc[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        allowed = list(range(E))
        if group_mode:
            per = E // n_group
            gs = []
            for g in range(n_group):
                vals = sorted(ch[g * per:(g + 1) * per], reverse=True)
                gs.append(vals[0] if group_mode == "max" else vals[0] + vals[1])
            keep = sorted(range(n_group), key=lambda g: (-gs[g], g))[:topk_group]
            allowed = [e for e in range(E) if e // per in keep]
        sel = sorted(allowed, key=lambda e: (-ch[e], e))[:top_k]
        w = [sc[e] for e in sel]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        ids[t] = sel
        ws[t] = [v * scaling for v in w]
    return ids, ws


@test
def route_matches_loop_for_every_family():
    rng = np.random.default_rng(2)
    for family, fam in moe_ref.FAMILIES.items():
        E = fam["n_experts"]
        logits = rng.standard_normal((40, E)) * 2
        bias = rng.normal(0, 0.1, E) if fam["correction_bias"] else None
        kw = moe_ref.route_kwargs(family, bias)
        ids, w = moe_ref.route(logits, **kw)
        r = fam["routing"]
        lids, lw = route_loop(logits, r["top_k"], r["scoring"], bias, r["n_group"], r["topk_group"], r["group_mode"],
                              r["renormalize"], r["routed_scaling_factor"])
        assert np.array_equal(ids, lids), family
        assert np.allclose(w, lw, rtol=1e-6), family


@test
def route_ties_match_loop():
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 3, size=(50, 16)).astype(np.float64)
    for mode, scoring in ((None, "softmax"), ("max", "softmax"), ("top2_sum", "sigmoid")):
        ng = 1 if mode is None else 4
        ids, _ = moe_ref.route(logits, top_k=3, scoring=scoring, n_group=ng, topk_group=2, group_mode=mode)
        lids, _ = route_loop(logits, 3, scoring, None, ng, 2, mode, False, 1.0)
        assert np.array_equal(ids, lids), mode


def experts_loop(x, w13, w2, ids, weights, act, expert_map, woi, dtype):
    """Per (token, slot), dense, with the same rounding points."""
    T, H = x.shape
    K = ids.shape[1]
    I = w13.shape[1] // 2
    y = np.zeros((T, H))
    for t in range(T):
        acc = np.zeros(H)
        for k in range(K):
            e = ids[t, k] if expert_map is None else expert_map[ids[t, k]]
            if e < 0:
                continue
            h = x[t].astype(np.float64)
            wk = float(weights[t, k])
            if woi:
                h = moe_ref.round_to(h * wk, dtype)
            g = w13[e, :I] @ h
            u = w13[e, I:] @ h
            a = moe_ref.round_to(moe_ref.act_fn(act, g) * u, dtype)
            o = w2[e] @ a
            acc = acc + moe_ref.round_to(o if woi else o * wk, dtype)
        y[t] = moe_ref.round_to(acc, dtype)
    return y


@test
def fused_experts_match_loop():
    rng = np.random.default_rng(4)
    T, H, I, E, K = 9, 13, 7, 6, 3
    for dtype in ("f32", "bf16", "f16"):
        for act in ("silu", "gelu", "gelu_tanh"):
            for woi in (False, True):
                x = moe_ref.round_to(rng.standard_normal((T, H)), dtype)
                w13 = moe_ref.round_to(rng.standard_normal((4, 2 * I, H)) * 0.3, dtype)
                w2 = moe_ref.round_to(rng.standard_normal((4, H, I)) * 0.3, dtype)
                emap = np.array([0, -1, 1, 2, -1, 3], dtype=np.int32)
                ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
                w = rng.random((T, K)).astype(np.float32)
                y = moe_ref.fused_experts(x, w13, w2, ids, w, act=act, expert_map=emap, weight_on_input=woi,
                                          dtype=dtype)
                want = experts_loop(x, w13, w2, ids, w, act, emap, woi, dtype)
                # the two differ only where float64 sums in another order land on a rounding edge
                err = np.linalg.norm(y - want) / np.linalg.norm(want)
                assert err < 1e-12 if dtype == "f32" else err < 1e-3, (dtype, act, woi, err)
                slots = moe_ref.fused_experts(x, w13, w2, ids, w, act=act, expert_map=emap, weight_on_input=woi,
                                              dtype=dtype, slot_mode=True)
                assert np.all(slots[emap[ids] < 0] == 0)
                assert np.array_equal(moe_ref.moe_sum(slots, None, dtype), y)


@test
def activations():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 2.0])
    assert np.allclose(moe_ref.act_fn("silu", x), x / (1 + np.exp(-x)))
    assert np.allclose(moe_ref.act_fn("gelu", x), [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.allclose(moe_ref.act_fn("gelu_tanh", x), moe_ref.act_fn("gelu", x), atol=1e-3)


@test
def moe_layer_composes():
    rng = np.random.default_rng(5)
    fam = moe_ref.FAMILIES["qwen2_moe"]
    T, H, I, Is, E = 5, 12, 6, 10, fam["n_experts"]
    x = rng.standard_normal((T, H))
    rw = rng.standard_normal((E, H))
    w13 = rng.standard_normal((E, 2 * I, H)) * 0.3
    w2 = rng.standard_normal((E, H, I)) * 0.3
    sh = {"w13": rng.standard_normal((2 * Is, H)) * 0.3, "w2": rng.standard_normal((H, Is)) * 0.3,
          "gate": rng.standard_normal(H)}
    r = moe_ref.moe_layer(x, rw, w13, w2, family="qwen2_moe", shared=sh)
    ids, w = moe_ref.route(x @ rw.T, **moe_ref.route_kwargs("qwen2_moe"))
    assert np.array_equal(r["ids"], ids)
    y = moe_ref.fused_experts(x, w13, w2, ids, w)
    s = moe_ref.shared_expert(x, sh["w13"], sh["w2"], sh["gate"])
    assert np.allclose(r["y"], y + s, rtol=1e-6, atol=1e-6)
    # the gate scales the shared expert by sigmoid(x . g)
    s_nogate = moe_ref.shared_expert(x, sh["w13"], sh["w2"], None)
    assert np.allclose(s, s_nogate * moe_ref.sigmoid(x @ sh["gate"])[:, None], rtol=1e-6)


def main():
    passed = failed = 0
    for fn in TESTS:
        try:
            fn()
            passed += 1
            print("[ OK ] %s" % fn.__name__)
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print("[FAIL] %s" % fn.__name__)
            traceback.print_exc()
    print("moe-test: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
