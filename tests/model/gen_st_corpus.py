#!/usr/bin/python3
"""gen_st_corpus.py: writes the hand-made seed files of the safetensors header fuzzer's
corpus (tests/model/st_corpus/): valid files ("valid-*", which the corpus test requires to be
accepted) and one file per way of being broken ("bad-*"). Files the fuzzer itself found are
kept beside them under their libFuzzer hash names.

    /usr/bin/python3 tests/model/gen_st_corpus.py tests/model/st_corpus
"""
import json
import os
import struct
import sys


def st(header, data=b"", raw_len=None):
    """A safetensors file: le64 length, the header text, the data."""
    h = header if isinstance(header, bytes) else header.encode()
    n = len(h) if raw_len is None else raw_len
    return struct.pack("<Q", n) + h + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def main(out):
    os.makedirs(out, exist_ok=True)
    seeds = {}
    meta = {"format": "pt"}
    # valid
    h = {"__metadata__": meta, "a.weight": entry("BF16", [2, 3], 0, 12), "b": entry("F32", [4], 12, 28)}
    seeds["valid-two"] = st(json.dumps(h), bytes(range(28)))
    h = {"model.layers.0.mlp.gate.weight": entry("F32", [4, 8], 0, 128),
         "model.layers.0.mlp.experts.0.gate_proj.weight": entry("BF16", [2, 8], 128, 160),
         "model.layers.0.mlp.gate.e_score_correction_bias": entry("F32", [4], 160, 176)}
    txt = json.dumps(h, separators=(",", ":"))
    txt += " " * ((8 - (len(txt) + 8) % 8) % 8)
    seeds["valid-moe-padded"] = st(txt, bytes(176))
    seeds["valid-empty"] = st("{}")
    h = {"s": entry("I64", [], 0, 8), "z": entry("F16", [0, 3], 8, 8), "q": entry("F8_E4M3", [4], 8, 12),
         "f4": entry("F4", [2, 2], 12, 14), "c": entry("C64", [1], 14, 22)}
    seeds["valid-dtypes"] = st(json.dumps(h), bytes(22))
    seeds["valid-unicode"] = st(json.dumps({"caf\u00e9.w": entry("U8", [3], 0, 3)}), b"abc")
    # broken
    seeds["bad-short"] = b"\x05\x00\x00"
    seeds["bad-len-past-end"] = st("{}", raw_len=4096)
    seeds["bad-len-huge"] = st("{}", raw_len=(1 << 63))
    seeds["bad-json"] = st('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', bytes(4))
    seeds["bad-not-object"] = st("[1, 2, 3]")
    seeds["bad-trailing"] = st('{} {"x": 1}')
    seeds["bad-entry-type"] = st('{"a": 1}')
    seeds["bad-dtype"] = st(json.dumps({"a": entry("Q4_K", [1], 0, 4)}), bytes(4))
    seeds["bad-shape-neg"] = st(json.dumps({"a": entry("F32", [-1], 0, 4)}), bytes(4))
    seeds["bad-shape-float"] = st(json.dumps({"a": entry("F32", [1.5], 0, 4)}), bytes(4))
    seeds["bad-shape-big"] = st(json.dumps({"a": entry("F32", [2**40, 2**40], 0, 4)}), bytes(4))
    seeds["bad-rank"] = st(json.dumps({"a": entry("F32", [1] * 9, 0, 4)}), bytes(4))
    seeds["bad-size"] = st(json.dumps({"a": entry("BF16", [2, 3], 0, 10)}), bytes(12))
    seeds["bad-past-data"] = st(json.dumps({"a": entry("F32", [4], 0, 16)}), bytes(10))
    seeds["bad-begin-gt-end"] = st(json.dumps({"a": entry("F32", [0], 8, 4)}), bytes(8))
    seeds["bad-overlap"] = st(json.dumps({"a": entry("F32", [3], 0, 12), "b": entry("F32", [3], 8, 20)}), bytes(20))
    seeds["bad-dup"] = st('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                          ' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8))
    seeds["bad-metadata"] = st(json.dumps({"__metadata__": {"k": 1}}))
    seeds["bad-offsets-shape"] = st(json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), bytes(4))
    seeds["bad-deep"] = st('{"a":' + "[" * 5000)
    seeds["bad-empty-name"] = st(json.dumps({"": entry("F32", [1], 0, 4)}), bytes(4))
    seeds["bad-subbyte"] = st(json.dumps({"a": entry("F4", [3], 0, 2)}), bytes(2))
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds)} seeds to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "st_corpus"))
