#!/usr/bin/python3
"""write_checkpoints.py: tiny Hugging Face checkpoints of every MoE family, written with numpy
only (safetensors by hand: it is an 8-byte length, a JSON header and the raw data), plus the
expected output of every MoE layer computed by the independent numpy reference
(tests/ref/moe_ref.py). The C test tests/model/test_ckpt_ref.c loads each checkpoint with the
engine's loader, runs the kernels and compares.

Nothing here shares code with the C side: the tensor names are transformers' module paths
typed out below, the config.json files are written the way each family's config class saves
them (some with fields left out, so that the loader's defaults are exercised), the shards
hold the other tensors of a real checkpoint too (embeddings, attention, norms, the dense MLP
of dense layers) in an order unlike the one the C side reads them in.

    /usr/bin/python3 tests/model/write_checkpoints.py --moe-ref tests/ref/moe_ref.py --out DIR

writes DIR/<case>/{config.json, shards, index, expected.safetensors} for every case in CASES;
the shard files of each case are fixed (the BUILD file lists them as genrule outputs).
expected.safetensors holds, for each MoE layer L: "L.x" [T, H] (the case's dtype),
"L.logits" [T, E] F32 (x . router^T in float64, rounded once), "L.topk_ids" [T, K] I32,
"L.topk_w" [T, K] F32 (moe_ref's routing), "L.y" [T, H] (moe_ref's whole layer: routed
experts plus the shared expert).
"""
import argparse
import importlib.util
import json
import os
import struct
import sys

import numpy as np

T = 24  # tokens per layer

# name, family, dtype, shards (1: model.safetensors without an index), shape and routing
CASES = [
    dict(name="mixtral_f32", family="mixtral", dtype="f32", shards=3, H=64, I=32, E=8, K=2, layers=2),
    dict(name="mixtral_bf16", family="mixtral", dtype="bf16", shards=2, H=64, I=48, E=8, K=2, layers=2),
    dict(name="mixtral_f16", family="mixtral", dtype="f16", shards=2, H=32, I=32, E=4, K=2, layers=1),
    # Qwen1.5-MoE style: shared expert with its sigmoid gate; mlp_only_layers [2] is dense;
    # norm_topk_prob left out (Qwen2MoeConfig default false)
    dict(name="qwen2_moe_f32", family="qwen2_moe", dtype="f32", shards=3, H=64, I=32, E=8, K=4, layers=4,
         shared=48, mlp_only=[2], omit=["norm_topk_prob", "decoder_sparse_step"]),
    dict(name="qwen2_moe_bf16", family="qwen2_moe", dtype="bf16", shards=3, H=64, I=32, E=8, K=2, layers=2,
         shared=64, norm=True),
    # Qwen3: decoder_sparse_step 2 (layers 1, 3 sparse), renormalized, one file without an index
    dict(name="qwen3_moe_f32", family="qwen3_moe", dtype="f32", shards=1, H=64, I=32, E=16, K=4, layers=4,
         step=2, norm=True),
    dict(name="qwen3_moe_bf16", family="qwen3_moe", dtype="bf16", shards=2, H=128, I=32, E=16, K=8, layers=1,
         norm=True),
    # DeepSeek-V2 group_limited_greedy (max groups), not renormalized: scaled by 2.0
    dict(name="deepseek_v2_f32", family="deepseek_v2", dtype="f32", shards=3, H=64, I=32, E=16, K=3, layers=3,
         n_shared=2, dense=1, groups=4, topk_group=2, method="group_limited_greedy", rsf=2.0, norm=False),
    # DeepSeek-V2 renormalized: DeepSeek's MoEGate then does not scale (rsf 16 must be ignored)
    dict(name="deepseek_v2_bf16", family="deepseek_v2", dtype="bf16", shards=2, H=64, I=32, E=8, K=2, layers=2,
         n_shared=1, dense=0, method="greedy", rsf=16.0, norm=True),
    # DeepSeek-V3 as transformers 5 saves it: no scoring_func, topk_method, moe_layer_freq
    # (sigmoid, noaux_tc with the correction bias, top-2-sum groups); renormalize then scale
    dict(name="deepseek_v3_f32", family="deepseek_v3", dtype="f32", shards=3, H=64, I=32, E=16, K=4, layers=3,
         n_shared=1, dense=1, groups=4, topk_group=2, rsf=2.5, norm=True,
         omit=["scoring_func", "topk_method", "moe_layer_freq"]),
    dict(name="deepseek_v3_bf16", family="deepseek_v3", dtype="bf16", shards=3, H=64, I=32, E=32, K=4, layers=2,
         n_shared=2, dense=0, groups=8, topk_group=3, rsf=1.5, norm=True),
    # transformers 5 with save_original_format=False: each layer's experts fused into
    # mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and mlp.experts.down_proj
    # [E, H, I]; Mixtral's router renamed from block_sparse_moe.gate to mlp.gate
    dict(name="mixtral_fused_bf16", family="mixtral", dtype="bf16", shards=2, H=64, I=32, E=8, K=2, layers=2,
         fused=True),
    dict(name="deepseek_v3_fused_f32", family="deepseek_v3", dtype="f32", shards=2, H=64, I=32, E=16, K=4,
         layers=2, n_shared=1, dense=1, groups=4, topk_group=2, rsf=2.5, norm=True, fused=True),
]


def shard_files(case):
    """The files of a case's checkpoint directory (the BUILD file lists the same)."""
    n = case["shards"]
    if n == 1:
        return ["config.json", "model.safetensors"]
    return ["config.json", "model.safetensors.index.json"] + [
        "model-%05d-of-%05d.safetensors" % (i + 1, n) for i in range(n)]


# ------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------
def bf16_bits(a):
    """float32 -> bf16 bits, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to(a, dtype):
    """The values of `a` as the dtype holds them, as float32."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "f32":
        return a
    if dtype == "f16":
        return a.astype(np.float16).astype(np.float32)
    return bf16_to_f32(bf16_bits(a))


ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "i32": "I32"}


def to_bytes(a, dtype):
    if dtype == "f32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "f16":
        return np.ascontiguousarray(a, dtype="<f2").tobytes()
    if dtype == "i32":
        return np.ascontiguousarray(a, dtype="<i4").tobytes()
    return bf16_bits(a).astype("<u2").tobytes()


def write_safetensors(path, tensors, pad=True, data_order=None):
    """tensors: list of (name, float32 array, dtype). The header lists names sorted (as the
    safetensors library does); the data goes in `data_order` (default: reversed), so header
    order, data order and the reader's order all differ."""
    order = data_order if data_order is not None else list(reversed(range(len(tensors))))
    header, blobs, off = {}, [], 0
    for i in order:
        name, arr, dt = tensors[i]
        b = to_bytes(arr, dt)
        header[name] = {"dtype": ST_DTYPE[dt], "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header = {"__metadata__": {"format": "pt"}, **{k: header[k] for k in sorted(header)}}
    txt = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        txt += b" " * ((8 - (8 + len(txt)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(txt)))
        f.write(txt)
        for b in blobs:
            f.write(b)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def make_config(c):
    fam = c["family"]
    cfg = {"architectures": [ARCH[fam]], "model_type": fam, "hidden_size": c["H"],
           "num_hidden_layers": c["layers"], "num_attention_heads": 4, "num_key_value_heads": 4,
           "vocab_size": 96, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
           "torch_dtype": TORCH_DTYPE[c["dtype"]], "num_experts_per_tok": c["K"], "tie_word_embeddings": False}
    if fam == "mixtral":
        cfg.update(intermediate_size=c["I"], num_local_experts=c["E"], router_aux_loss_coef=0.02)
    elif fam in ("qwen2_moe", "qwen3_moe"):
        cfg.update(intermediate_size=2 * c["I"], moe_intermediate_size=c["I"], num_experts=c["E"],
                   norm_topk_prob=c.get("norm", False), decoder_sparse_step=c.get("step", 1),
                   mlp_only_layers=c.get("mlp_only", []))
        if fam == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = c["shared"]
    else:
        cfg.update(intermediate_size=2 * c["I"], moe_intermediate_size=c["I"], n_routed_experts=c["E"],
                   n_shared_experts=c["n_shared"], first_k_dense_replace=c["dense"], moe_layer_freq=1,
                   n_group=c.get("groups"), topk_group=c.get("topk_group"),
                   topk_method=c.get("method", "noaux_tc" if fam == "deepseek_v3" else "greedy"),
                   scoring_func="sigmoid" if fam == "deepseek_v3" else "softmax",
                   norm_topk_prob=c["norm"], routed_scaling_factor=c["rsf"], kv_lora_rank=16, q_lora_rank=None,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    for k in c.get("omit", []):
        del cfg[k]
    return cfg


def moe_layers(c):
    fam, n = c["family"], c["layers"]
    if fam == "mixtral":
        return list(range(n))
    if fam in ("qwen2_moe", "qwen3_moe"):
        step = c.get("step", 1)
        return [l for l in range(n) if l not in c.get("mlp_only", []) and (l + 1) % step == 0]
    return [l for l in range(n) if l >= c["dense"]]


def routing_of(c):
    """The routing rules of the family (written out from the modeling code, independently of
    the C parser): scoring, group mode, groups, renormalize, scaling, bias."""
    fam = c["family"]
    if fam == "mixtral":
        return dict(scoring="softmax", group=None, renorm=True, scale=1.0, bias=False)
    if fam in ("qwen2_moe", "qwen3_moe"):
        return dict(scoring="softmax", group=None, renorm=c.get("norm", False), scale=1.0, bias=False)
    renorm = c["norm"] and c["K"] > 1
    method = c.get("method", "noaux_tc" if fam == "deepseek_v3" else "greedy")
    group = {"greedy": None, "group_limited_greedy": "max", "noaux_tc": "top2_sum"}[method]
    if fam == "deepseek_v2":
        scale = 1.0 if renorm else c["rsf"]
        return dict(scoring="softmax", group=group, renorm=renorm, scale=scale, bias=False,
                    n_group=c.get("groups"), topk_group=c.get("topk_group"))
    return dict(scoring="sigmoid", group=group, renorm=renorm, scale=c["rsf"], bias=True,
                n_group=c.get("groups"), topk_group=c.get("topk_group"))


def names(c, l):
    fam = c["family"]
    p = "model.layers.%d." % l
    if fam == "mixtral" and not c.get("fused"):
        b = p + "block_sparse_moe."
        return dict(router=b + "gate.weight",
                    gate=lambda e: b + "experts.%d.w1.weight" % e, up=lambda e: b + "experts.%d.w3.weight" % e,
                    down=lambda e: b + "experts.%d.w2.weight" % e)
    d = dict(router=p + "mlp.gate.weight", gate=lambda e: p + "mlp.experts.%d.gate_proj.weight" % e,
             up=lambda e: p + "mlp.experts.%d.up_proj.weight" % e,
             down=lambda e: p + "mlp.experts.%d.down_proj.weight" % e)
    if fam == "qwen2_moe":
        d["shared"] = p + "mlp.shared_expert."
        d["shared_gate"] = p + "mlp.shared_expert_gate.weight"
    if fam.startswith("deepseek"):
        d["shared"] = p + "mlp.shared_experts."
        d["bias"] = p + "mlp.gate.e_score_correction_bias"
    return d


def build(c, rng):
    """All tensors of the checkpoint (name, float32 values as stored, dtype) and, per MoE
    layer, the weights for the reference."""
    dt, H, I, E = c["dtype"], c["H"], c["I"], c["E"]
    V = 96
    out, layers = [], {}

    def w(shape, fan_in, dtype=dt, scale=1.0):
        a = rng.standard_normal(shape).astype(np.float32) * np.float32(scale / np.sqrt(fan_in))
        return round_to(a, dtype)

    out.append(("model.embed_tokens.weight", w((V, H), 1), dt))
    out.append(("model.norm.weight", np.ones(H, np.float32), dt))
    out.append(("lm_head.weight", w((V, H), H), dt))
    mls = moe_layers(c)
    for l in range(c["layers"]):
        p = "model.layers.%d." % l
        out.append((p + "input_layernorm.weight", round_to(1 + 0.1 * rng.standard_normal(H), dt), dt))
        out.append((p + "post_attention_layernorm.weight", np.ones(H, np.float32), dt))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((p + "self_attn.%s.weight" % proj, w((H, H), H), dt))
        if l not in mls:  # a dense layer: its MLP shares the "mlp." prefix with MoE names
            out.append((p + "mlp.gate_proj.weight", w((2 * I, H), H), dt))
            out.append((p + "mlp.up_proj.weight", w((2 * I, H), H), dt))
            out.append((p + "mlp.down_proj.weight", w((H, 2 * I), 2 * I), dt))
            continue
        n = names(c, l)
        L = dict(router=w((E, H), H, scale=3.0))
        out.append((n["router"], L["router"], dt))
        if "bias" in n:  # fp32, as transformers keeps it (_keep_in_fp32_modules_strict)
            L["bias"] = (0.1 * rng.standard_normal(E)).astype(np.float32)
            out.append((n["bias"], L["bias"], "f32"))
        L["w1"] = np.stack([w((I, H), H) for _ in range(E)])
        L["w3"] = np.stack([w((I, H), H) for _ in range(E)])
        L["w2"] = np.stack([w((H, I), I) for _ in range(E)])
        if c.get("fused"):
            out.append((p + "mlp.experts.gate_up_proj", np.concatenate([L["w1"], L["w3"]], axis=1), dt))
            out.append((p + "mlp.experts.down_proj", L["w2"], dt))
        for e in range(E if not c.get("fused") else 0):
            out.append((n["gate"](e), L["w1"][e], dt))
            out.append((n["up"](e), L["w3"][e], dt))
            out.append((n["down"](e), L["w2"][e], dt))
        Is = c.get("shared", 0) if c["family"] == "qwen2_moe" else c.get("n_shared", 0) * I
        if "shared" in n and Is > 0:
            L["s1"], L["s3"], L["s2"] = w((Is, H), H), w((Is, H), H), w((H, Is), Is)
            out.append((n["shared"] + "gate_proj.weight", L["s1"], dt))
            out.append((n["shared"] + "up_proj.weight", L["s3"], dt))
            out.append((n["shared"] + "down_proj.weight", L["s2"], dt))
        if "shared_gate" in n:
            L["sg"] = w((1, H), H)
            out.append((n["shared_gate"], L["sg"], dt))
        layers[l] = L
    return out, layers


def split_shards(tensors, n):
    """n contiguous groups of about equal bytes, in state_dict order."""
    sizes = [a.size for _, a, _ in tensors]
    total, groups, cur, acc = sum(sizes), [], [], 0
    for t, s in zip(tensors, sizes):
        cur.append(t)
        acc += s
        if len(groups) < n - 1 and acc >= total * (len(groups) + 1) / n:
            groups.append(cur)
            cur = []
    groups.append(cur)
    while len(groups) < n:  # never for the cases above; keeps the file list fixed regardless
        groups.append([])
    return groups


# ------------------------------------------------------------------------------------------
# Inputs with a clear routing margin (so that fp32 rounding in the C logits cannot flip a
# choice), and the expectation from moe_ref.
# ------------------------------------------------------------------------------------------
def load_moe_ref(path):
    spec = importlib.util.spec_from_file_location("moe_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def route_args(c, L):
    """moe_ref.route()'s keyword arguments for a case (from routing_of, not from the C)."""
    r = routing_of(c)
    kw = dict(top_k=c["K"], scoring=r["scoring"], renormalize=r["renorm"], routed_scaling_factor=r["scale"],
              correction_bias=L.get("bias") if r["bias"] else None, n_group=1, topk_group=1, group_mode=None)
    if r["group"] and r["n_group"] > 1:
        kw.update(n_group=r["n_group"], topk_group=r["topk_group"], group_mode=r["group"])
    return kw


def expected_layer(ref, c, L, x):
    """logits, topk ids and weights, and y of one layer, all from moe_ref."""
    w13 = np.concatenate([L["w1"], L["w3"]], axis=1)  # [E, 2I, H]: gate rows, then up rows
    shared = None
    if "s1" in L:
        shared = dict(w13=np.concatenate([L["s1"], L["s3"]], axis=0), w2=L["s2"],
                      gate=L["sg"][0] if "sg" in L else None, act="silu")
    kw = route_args(c, L)
    out = ref.moe_layer(x, L["router"], w13, L["w2"], act="silu", shared=shared, dtype=c["dtype"],
                        logits_dtype="f32", **kw)
    return out


def write_case(c, out_dir, ref, seed):
    rng = np.random.default_rng(seed)
    d = os.path.join(out_dir, c["name"])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(make_config(c), f, indent=2)
    tensors, layers = build(c, rng)
    files = shard_files(c)[1:] if c["shards"] == 1 else shard_files(c)[2:]
    groups = split_shards(tensors, c["shards"])
    weight_map = {}
    for i, (fname, group) in enumerate(zip(files, groups)):
        # the first shard unpadded (data at an odd offset), the others padded to 8
        write_safetensors(os.path.join(d, fname), group, pad=(i != 0))
        for name, _, _ in group:
            weight_map[name] = fname
    if c["shards"] > 1:
        total = sum(len(to_bytes(a, dt)) for _, a, dt in tensors)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    exp = []
    for l, L in layers.items():
        # inputs whose routing decisions are well above float32 rounding, so that the C side
        # (fp32 logits from its own products, fp32 softmax) must pick the same experts
        for _ in range(1000):
            x = round_to(rng.standard_normal((T, c["H"])), c["dtype"])
            logits = (x.astype(np.float64) @ L["router"].astype(np.float64).T).astype(np.float32)
            if np.min(ref.route_decision_gap(logits, **route_args(c, L))) > 1e-4:
                break
        else:
            raise RuntimeError("%s layer %d: no input with a clear routing margin" % (c["name"], l))
        out = expected_layer(ref, c, L, x)
        assert np.array_equal(out["logits"], logits)
        p = "%d." % l
        exp += [(p + "x", x, c["dtype"]), (p + "logits", out["logits"], "f32"), (p + "topk_ids", out["ids"], "i32"),
                (p + "topk_w", out["weights"], "f32"), (p + "y", out["y"], c["dtype"])]
    write_safetensors(os.path.join(os.path.dirname(d), c["name"] + ".expected.safetensors"), exp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moe-ref", required=True, help="path of tests/ref/moe_ref.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261127)
    ap.add_argument("--list", action="store_true", help="print every output file and exit")
    a = ap.parse_args()
    if a.list:
        for c in CASES:
            for f in shard_files(c):
                print("%s/%s" % (c["name"], f))
            print("%s.expected.safetensors" % c["name"])
        return
    ref = load_moe_ref(a.moe_ref)
    os.makedirs(a.out, exist_ok=True)
    for i, c in enumerate(CASES):
        write_case(c, a.out, ref, a.seed + i)


if __name__ == "__main__":
    main()
