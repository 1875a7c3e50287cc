"""moe_ref.py: the independent numpy reference of a MoE layer (routing, routed experts,
shared experts), written from the model definitions and not from our C:

  - Mixtral (transformers MixtralSparseMoeBlock): softmax over the router logits, top-k,
    weights renormalized to sum 1;
  - Qwen2-MoE (Qwen2MoeSparseMoeBlock): softmax, top-k, renormalized only with
    norm_topk_prob (False in Qwen1.5-MoE-A2.7B), plus a shared expert scaled by
    sigmoid(shared_expert_gate(x)) (a Linear H -> 1);
  - Qwen3-MoE (Qwen3MoeSparseMoeBlock): softmax, top-k, norm_topk_prob True;
  - DeepSeek-V2 (DeepseekV2MoE / MoEGate "group_limited_greedy"): softmax scores, the experts
    cut into n_group groups, a group scored by its max, the topk_group best groups kept, top-k
    among their experts, weights times routed_scaling_factor (no renormalization in V2), plus
    n_shared_experts shared experts (one MLP of n_shared * moe_intermediate_size);
  - DeepSeek-V3 (DeepseekV3TopkRouter / MoEGate "noaux_tc"): sigmoid scores, the
    e_score_correction_bias added for the choice only, a group scored by the sum of its two best
    biased scores, top-k among the kept groups, weights = the unbiased scores, renormalized,
    times routed_scaling_factor (2.5), plus one shared expert;
  - vLLM's grouped_topk: the same selection, excluded experts masked to -inf.

Every expert is the gated MLP of those models: down(act(gate(x)) * up(x)), with the gate and
up projections stored stacked as w13[e] = [gate rows; up rows] ([2I, H], the Hugging Face
gate_up_proj layout) and down as w2[e] ([H, I]).

Two choices follow our contract (kernels/kern.h) where the models differ among themselves:
  - top-k results are sorted, best first, ties to the lower expert id (and the lower group id);
    the models call torch.topk(sorted=False), which fixes no order;
  - experts outside the kept groups are excluded (masked to -inf, as vLLM and DeepSeek's own
    V3 code do); transformers' ports fill them with 0.0, which differs only when every kept
    score is negative (impossible with softmax scores).
  - routing weights stay fp32 (the models cast them to the activation dtype).

Precision: everything is computed in float64. Where the activation dtype is bf16 or f16, the
rounding points of kern.h are emulated: the activation a = act(g) * u, each (token, slot)
contribution c = w * (W2 a), the shared expert's output, the input times its routing weight
(when the weight goes on the input), and the final sum are rounded to that dtype (round to
nearest, ties to even, straight from float64: no double rounding). With dtype "f32" the same
points are rounded to float32.

The API (numpy arrays in, numpy arrays out):
  FAMILIES                              defaults per family (routing and small test shapes)
  route(logits, *, top_k, scoring, correction_bias, n_group, topk_group, group_mode,
        renormalize, routed_scaling_factor) -> (ids int32 [T, K], weights float32 [T, K])
  fused_experts(x, w13, w2, ids, weights, *, act, expert_map, weight_on_input, dtype,
                slot_mode=False) -> y float32 [T, H] (or [T, K, H] in slot mode)
  shared_expert(x, w13, w2, gate=None, act="silu", dtype="f32") -> s float32 [T, H]
  moe_sum(slots, shared=None, dtype="f32") -> y float32 [T, H]
  moe_layer(x, router_w, w13, w2, *, family=None, shared=None, ...) -> dict of every stage
  round_to(a, dtype), bf16_bits(a), bf16_from_bits(u), f16_bits(a), f16_from_bits(u)

Imported by the golden-data writer (gen_golden.py) and by other tests (the models' tests
write tiny checkpoints and expected layer outputs with it). Python 3 + numpy only.
"""

import math

import numpy as np

__all__ = [
    "FAMILIES",
    "DTYPES",
    "round_to",
    "bf16_round",
    "bf16_bits",
    "bf16_from_bits",
    "f16_bits",
    "f16_from_bits",
    "softmax",
    "sigmoid",
    "act_fn",
    "route",
    "route_decision_gap",
    "route_kwargs",
    "fused_experts",
    "shared_expert",
    "moe_sum",
    "moe_layer",
]

DTYPES = ("f32", "bf16", "f16")

# ---------------------------------------------------------------------------------------------
# Families. "routing" holds route()'s keyword arguments (correction_bias: whether the family
# has one); "test" small shapes for golden data (H and I not multiples of 8); "real" the
# published model's sizes (Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, DeepSeek-V2,
# DeepSeek-V3) for benchmarks. "shared": None, or {"n": number of shared experts (their MLP
# has n * inter features), "gate": whether a sigmoid gate scales it} with the real model's
# shared intermediate size in real["shared_inter"].
# ---------------------------------------------------------------------------------------------
FAMILIES = {
    "mixtral": {
        "hf_model_type": "mixtral",
        "routing": dict(top_k=2, scoring="softmax", n_group=1, topk_group=1, group_mode=None,
                        renormalize=True, routed_scaling_factor=1.0),
        "n_experts": 8,
        "correction_bias": False,
        "act": "silu",
        "shared": None,
        "test": dict(hidden=52, inter=38, shared_inter=0),
        "real": dict(hidden=4096, inter=14336, shared_inter=0),
    },
    "qwen2_moe": {
        "hf_model_type": "qwen2_moe",
        "routing": dict(top_k=4, scoring="softmax", n_group=1, topk_group=1, group_mode=None,
                        renormalize=False, routed_scaling_factor=1.0),
        "n_experts": 60,
        "correction_bias": False,
        "act": "silu",
        "shared": {"n": 1, "gate": True},
        "test": dict(hidden=36, inter=22, shared_inter=90),
        "real": dict(hidden=2048, inter=1408, shared_inter=5632),
    },
    "qwen3_moe": {
        "hf_model_type": "qwen3_moe",
        "routing": dict(top_k=8, scoring="softmax", n_group=1, topk_group=1, group_mode=None,
                        renormalize=True, routed_scaling_factor=1.0),
        "n_experts": 128,
        "correction_bias": False,
        "act": "silu",
        "shared": None,
        "test": dict(hidden=46, inter=30, shared_inter=0),
        "real": dict(hidden=2048, inter=768, shared_inter=0),
    },
    "deepseek_v2": {
        "hf_model_type": "deepseek_v2",
        "routing": dict(top_k=6, scoring="softmax", n_group=8, topk_group=3, group_mode="max",
                        renormalize=False, routed_scaling_factor=16.0),
        "n_experts": 40,  # real: 160 (8 groups of 20); test: 8 groups of 5
        "correction_bias": False,
        "act": "silu",
        "shared": {"n": 2, "gate": False},
        "test": dict(hidden=42, inter=26, shared_inter=52),
        "real": dict(hidden=5120, inter=1536, shared_inter=3072, n_experts=160),
    },
    "deepseek_v3": {
        "hf_model_type": "deepseek_v3",
        "routing": dict(top_k=8, scoring="sigmoid", n_group=8, topk_group=4, group_mode="top2_sum",
                        renormalize=True, routed_scaling_factor=2.5),
        "n_experts": 64,  # real: 256 (8 groups of 32); test: 8 groups of 8
        "correction_bias": True,
        "act": "silu",
        "shared": {"n": 1, "gate": False},
        "test": dict(hidden=50, inter=34, shared_inter=34),
        "real": dict(hidden=7168, inter=2048, shared_inter=2048, n_experts=256),
    },
}


def route_kwargs(family, correction_bias=None):
    """route()'s keyword arguments for a family (plus the given bias, if any)."""
    kw = dict(FAMILIES[family]["routing"])
    kw["correction_bias"] = correction_bias
    return kw


# ---------------------------------------------------------------------------------------------
# Rounding to bf16 / f16 / f32, from float64, round to nearest, ties to even.
# ---------------------------------------------------------------------------------------------
def _f32_round_to_odd(a):
    """float64 -> float32 with round-to-odd: truncate toward zero, then set the last bit when
    inexact. Rounding that to a format with at least 2 fewer significand bits (bf16: 8 of 24)
    gives the correctly rounded result of the float64 value (no double-rounding error)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = a.astype(np.float32)
        back = f.astype(np.float64)
        over = np.isfinite(a) & (np.abs(back) > np.abs(a))
        f = np.where(over, np.nextafter(f, np.float32(0.0)), f).astype(np.float32)
        inexact = np.isfinite(a) & (f.astype(np.float64) != a)
    bits = f.view(np.uint32).copy()
    bits |= inexact.astype(np.uint32)
    return bits


def bf16_bits(a):
    """The bf16 bit patterns (uint16) of a, rounded to nearest, ties to even. NaN stays NaN."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        bits = a.view(np.uint32).astype(np.uint64)
    else:
        bits = _f32_round_to_odd(a).astype(np.uint64)
    nan = np.isnan(np.asarray(a, dtype=np.float64))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = (rounded & 0xFFFF).astype(np.uint16)
    out = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), out)  # quiet NaN, sign kept
    return out.astype(np.uint16)


def bf16_from_bits(u):
    """float32 values of bf16 bit patterns."""
    u = np.asarray(u, dtype=np.uint16)
    return (u.astype(np.uint32).reshape(-1) << 16).view(np.float32).reshape(u.shape)


def bf16_round(a):
    """a rounded to bf16, as float64."""
    return bf16_from_bits(bf16_bits(a)).astype(np.float64)


def f16_bits(a):
    """The IEEE half bit patterns of a (numpy converts float64 -> float16 directly, round to
    nearest even, with subnormals and overflow to infinity)."""
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=np.float64).astype(np.float16).view(np.uint16)


def f16_from_bits(u):
    u = np.asarray(u, dtype=np.uint16)
    return u.reshape(-1).view(np.float16).astype(np.float32).reshape(u.shape)


def round_to(a, dtype):
    """a (any float array) rounded to the precision of dtype ("f32", "bf16", "f16"), returned
    as float64."""
    a = np.asarray(a, dtype=np.float64)
    if dtype == "f32":
        with np.errstate(over="ignore"):
            return a.astype(np.float32).astype(np.float64)
    if dtype == "bf16":
        return bf16_round(a)
    if dtype == "f16":
        return f16_from_bits(f16_bits(a)).astype(np.float64)
    raise ValueError("dtype %r (f32, bf16, f16)" % (dtype,))


# ---------------------------------------------------------------------------------------------
# Element-wise functions.
# ---------------------------------------------------------------------------------------------
def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def sigmoid(x):
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def act_fn(name, x):
    """silu (x * sigmoid(x)), gelu (exact, erf) and gelu_tanh (the tanh approximation,
    "gelu_pytorch_tanh"). Computed in x's precision when x is float32 (the benchmark's plain
    numpy path), else in float64."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    if name in ("silu", "swish"):
        return x * sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name in ("gelu_tanh", "gelu_pytorch_tanh", "gelu_new"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError("activation %r (silu, gelu, gelu_tanh)" % (name,))


# ---------------------------------------------------------------------------------------------
# Routing.
# ---------------------------------------------------------------------------------------------
def _topk_desc(v, k):
    """Indices of the k largest of each row, largest first, equal values by the lower index
    (a stable sort of -v); NaN last."""
    order = np.argsort(-v, axis=-1, kind="stable")
    return order[..., :k]


def _resolve_group_mode(group_mode, n_group, correction_bias):
    if n_group is None or n_group <= 1:
        return None
    if group_mode is None:
        # vLLM's grouped_topk: top-2 sums with a correction bias, the max without
        return "top2_sum" if correction_bias is not None else "max"
    if group_mode not in ("max", "top2_sum"):
        raise ValueError("group_mode %r (None, 'max', 'top2_sum')" % (group_mode,))
    return group_mode


def _scores_and_choice(logits, scoring, correction_bias):
    L = np.asarray(logits, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError("logits must be [T, E]")
    if scoring == "softmax":
        scores = softmax(L)
    elif scoring == "sigmoid":
        scores = sigmoid(L)
    else:
        raise ValueError("scoring %r (softmax, sigmoid)" % (scoring,))
    choice = scores
    if correction_bias is not None:
        b = np.asarray(correction_bias, dtype=np.float64).reshape(1, -1)
        if b.shape[1] != L.shape[1]:
            raise ValueError("correction_bias has %d entries, logits %d experts" % (b.shape[1], L.shape[1]))
        choice = scores + b
    return scores, choice


def _group_scores(choice, n_group, mode):
    T, E = choice.shape
    g = choice.reshape(T, n_group, E // n_group)
    if mode == "max":
        return g.max(axis=-1)
    top = -np.sort(-g, axis=-1)[..., :2]  # the two best of each group, best first
    return top[..., 0] + top[..., 1]


def route(logits, *, top_k, scoring="softmax", correction_bias=None, n_group=1, topk_group=1, group_mode=None,
          renormalize=False, routed_scaling_factor=1.0):
    """Router logits [T, E] -> (topk_ids int32 [T, K], topk_weights float32 [T, K]).

    scores = softmax(logits) or sigmoid(logits); choice = scores + correction_bias (selection
    only); with n_group > 1 the experts form n_group contiguous groups, scored by their max
    ("max", DeepSeek-V2) or the sum of their two best choices ("top2_sum", DeepSeek-V3;
    group_mode None picks like vLLM: top2_sum when there is a bias), and only the experts of
    the topk_group best groups stay; ids = the top_k best choices, best first, ties to the
    lower id; weights = the unbiased scores of those ids, divided by their sum when
    renormalize (and the sum is > 0), times routed_scaling_factor.
    """
    scores, choice = _scores_and_choice(logits, scoring, correction_bias)
    T, E = scores.shape
    if not 1 <= top_k <= E:
        raise ValueError("top_k %d not in [1, %d]" % (top_k, E))
    mode = _resolve_group_mode(group_mode, n_group, correction_bias)
    if mode is not None:
        if E % n_group != 0:
            raise ValueError("n_group %d does not divide %d experts" % (n_group, E))
        if not 1 <= topk_group <= n_group:
            raise ValueError("topk_group %d not in [1, %d]" % (topk_group, n_group))
        gsel = _topk_desc(_group_scores(choice, n_group, mode), topk_group)
        keep_g = np.zeros((T, n_group), dtype=bool)
        np.put_along_axis(keep_g, gsel, True, axis=-1)
        keep = np.repeat(keep_g, E // n_group, axis=-1)
        choice = np.where(keep, choice, -np.inf)
    ids = _topk_desc(choice, top_k)
    w = np.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        s = w.sum(axis=-1, keepdims=True)
        w = np.where(s > 0, w / np.where(s > 0, s, 1.0), w)
    w = w * routed_scaling_factor
    return ids.astype(np.int32), w.astype(np.float32)


def route_decision_gap(logits, *, top_k, scoring="softmax", correction_bias=None, n_group=1, topk_group=1,
                       group_mode=None, renormalize=False, routed_scaling_factor=1.0):
    """Per token, the smallest relative gap between two values whose order decides the routing
    (consecutive values among the top_k + 1 best kept choices, and among the topk_group + 1 best
    groups). Exact ties count as an infinite gap (both sides of a comparison break them by the
    lower id). A caller that wants ids a float32 implementation reproduces exactly draws inputs
    whose gap is well above float32 rounding (say > 1e-5)."""
    del renormalize, routed_scaling_factor
    scores, choice = _scores_and_choice(logits, scoring, correction_bias)
    T, E = scores.shape
    gap = np.full(T, np.inf)
    scale = np.maximum(np.max(np.abs(choice), axis=-1), 1e-30)

    def consider(sorted_vals):
        d = sorted_vals[:, :-1] - sorted_vals[:, 1:]
        d = np.where(d == 0, np.inf, d)
        return np.min(d, axis=-1) if d.shape[1] else np.full(T, np.inf)

    mode = _resolve_group_mode(group_mode, n_group, correction_bias)
    if mode is not None:
        gs = _group_scores(choice, n_group, mode)
        n = min(topk_group + 1, n_group)
        gap = np.minimum(gap, consider(-np.sort(-gs, axis=-1)[:, :n]) / np.maximum(np.max(np.abs(gs), -1), 1e-30))
        gsel = _topk_desc(gs, topk_group)
        keep_g = np.zeros((T, n_group), dtype=bool)
        np.put_along_axis(keep_g, gsel, True, axis=-1)
        choice = np.where(np.repeat(keep_g, E // n_group, axis=-1), choice, -np.inf)
    n = min(top_k + 1, E)
    top = -np.sort(-choice, axis=-1)[:, :n]
    top = np.where(np.isfinite(top), top, np.nan)
    d = top[:, :-1] - top[:, 1:]
    d = np.where((d == 0) | np.isnan(d), np.inf, d)
    gap = np.minimum(gap, np.min(d, axis=-1) / scale)
    return gap


# ---------------------------------------------------------------------------------------------
# Experts.
# ---------------------------------------------------------------------------------------------
def _rounder(dtype, acc):
    if acc == np.float32 and dtype == "f32":
        return lambda a: a  # the benchmark's plain float32 path: no extra rounding steps
    return lambda a: round_to(a, dtype).astype(acc)


def _mlp(h, w13_e, w2_e, act, rnd, acc):
    """down(round(act(gate(h)) * up(h))): h [n, H], w13_e [2I, H], w2_e [H, I]."""
    inter = w13_e.shape[0] // 2
    w13_e = np.asarray(w13_e, dtype=acc)
    gate = h @ w13_e[:inter].T
    up = h @ w13_e[inter:].T
    a = rnd(act_fn(act, gate).astype(acc) * up)
    return a @ np.asarray(w2_e, dtype=acc).T


def fused_experts(x, w13, w2, ids, weights, *, act="silu", expert_map=None, weight_on_input=False, dtype="f32",
                  slot_mode=False, acc=np.float64):
    """The routed experts, one expert at a time (the models' loop over experts).

    x [T, H]; w13 [E_local, 2I, H] (gate rows, then up rows); w2 [E_local, H, I];
    ids [T, K] global expert ids; weights [T, K]; expert_map [E] global id -> local slot or -1
    (None: identity). For each (t, k) with local slot e >= 0:
        h = x[t]  (round(x[t] * w[t, k]) with weight_on_input)
        c = round(w[t, k] * W2_e round(act(W1_e h) * (W3_e h)))  (no w with weight_on_input)
    Returns y[t] = round(sum over k in slot order of c[t, k]) as float32 [T, H], or with
    slot_mode the contributions c as [T, K, H] (exactly 0 where the slot is held elsewhere).
    acc=np.float32 computes in float32 without the rounding steps of f32 (the benchmark's
    "plain numpy" timing); the reference itself uses the float64 default.
    """
    rnd = _rounder(dtype, acc)
    X = np.asarray(x, dtype=acc)
    ids = np.asarray(ids)
    W = np.asarray(weights, dtype=np.float32).astype(acc)
    T, H = X.shape
    K = ids.shape[1]
    n_local = w13.shape[0]
    local = ids if expert_map is None else np.asarray(expert_map)[ids]
    slots = np.zeros((T, K, H), dtype=acc)
    for e in range(n_local):
        t_idx, k_idx = np.nonzero(local == e)
        if t_idx.size == 0:
            continue
        h = X[t_idx]
        wk = W[t_idx, k_idx][:, None]
        if weight_on_input:
            h = rnd(h * wk)
        out = _mlp(h, w13[e], w2[e], act, rnd, acc)
        if not weight_on_input:
            out = out * wk
        slots[t_idx, k_idx] = rnd(out)
    if slot_mode:
        return slots.astype(np.float32)
    y = np.zeros((T, H), dtype=acc)
    for k in range(K):
        y = y + slots[:, k]
    return rnd(y).astype(np.float32)


def shared_expert(x, w13, w2, gate=None, act="silu", dtype="f32", acc=np.float64):
    """s = round(g * W2 round(act(W1 x) * (W3 x))) with g = sigmoid(x . gate) (Qwen2-MoE's
    shared_expert_gate) or 1. w13 [2I, H], w2 [H, I], gate [H] or None."""
    rnd = _rounder(dtype, acc)
    X = np.asarray(x, dtype=acc)
    out = _mlp(X, w13, w2, act, rnd, acc)
    if gate is not None:
        g = sigmoid(X @ np.asarray(gate, dtype=acc)).astype(acc)
        out = g[:, None] * out
    return rnd(out).astype(np.float32)


def moe_sum(slots, shared=None, dtype="f32"):
    """y[t] = round(sum over k in slot order of slots[t, k] (+ shared[t]))."""
    S = np.asarray(slots, dtype=np.float64)
    y = np.zeros((S.shape[0], S.shape[2]))
    for k in range(S.shape[1]):
        y = y + S[:, k]
    if shared is not None:
        y = y + np.asarray(shared, dtype=np.float64)
    return round_to(y, dtype).astype(np.float32)


def moe_layer(x, router_w, w13, w2, *, family=None, top_k=None, scoring=None, correction_bias=None, n_group=None,
              topk_group=None, group_mode=None, renormalize=None, routed_scaling_factor=None, act=None,
              expert_map=None, weight_on_input=False, shared=None, dtype="f32", logits_dtype="f32"):
    """A whole MoE layer from hidden states x [T, H] (values representable in dtype).

    router logits = x @ router_w.T (router_w [E, H]), rounded to logits_dtype; routing as
    route(); the routed experts as fused_experts(); the shared expert (shared = dict(w13=,
    w2=, gate=None, act=None)) as shared_expert(); y = round(sum_k c[t, k] + s[t]).
    Routing arguments left None come from FAMILIES[family] (when given).
    Returns a dict: logits (float32), ids, weights, slots [T, K, H], shared (or None), y.
    """
    kw = dict(FAMILIES[family]["routing"]) if family else {}
    for name, val in (("top_k", top_k), ("scoring", scoring), ("n_group", n_group), ("topk_group", topk_group),
                      ("group_mode", group_mode), ("renormalize", renormalize),
                      ("routed_scaling_factor", routed_scaling_factor)):
        if val is not None or name not in kw:
            kw[name] = val
    kw = {k: v for k, v in kw.items() if v is not None}
    if act is None:
        act = FAMILIES[family]["act"] if family else "silu"
    X = np.asarray(x, dtype=np.float64)
    logits = round_to(X @ np.asarray(router_w, dtype=np.float64).T, logits_dtype).astype(np.float32)
    ids, weights = route(logits, correction_bias=correction_bias, **kw)
    slots = fused_experts(X, w13, w2, ids, weights, act=act, expert_map=expert_map,
                          weight_on_input=weight_on_input, dtype=dtype, slot_mode=True)
    s = None
    if shared is not None:
        s = shared_expert(X, shared["w13"], shared["w2"], gate=shared.get("gate"), act=shared.get("act") or act,
                          dtype=dtype)
    y = moe_sum(slots, s, dtype=dtype)
    return {"logits": logits, "ids": ids, "weights": weights, "slots": slots, "shared": s, "y": y}
