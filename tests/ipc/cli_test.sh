#!/usr/bin/env bash
# cli_test.sh: the moe-client CLI end to end against the test server (a real process on
# 127.0.0.1): ping, info, stats, submit from .npy (f32, bf16 as '<u2', f16) and from
# .safetensors (written by numpy here), output checked against tests/ipc/toy_model.py (numpy,
# independent of the C), bench's table, the errors a user meets (bad files, refused requests),
# and CURVE (keygen; with keys served, without refused). Prints "moe-test: N passed, M failed".
set -uo pipefail
ROOT="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-}"
[ -d "$ROOT/ipc" ] || ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CLIENT="$ROOT/ipc/cli/moe-client"
SERVER="$ROOT/tests/ipc/test_server"
PY=/usr/bin/python3
TMP="${TEST_TMPDIR:-$(mktemp -d)}/cli"
mkdir -p "$TMP" && cd "$TMP"
pass=0; failed=0
ok()  { pass=$((pass + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; }
trap cleanup EXIT

start_server() { # name args...: starts a server, sets EP
  local name=$1; shift
  "$SERVER" "$@" >"$name.out" 2>"$name.err" &
  PIDS+=($!)
  for _ in $(seq 100); do
    EP=$(awk '/^endpoint/{print $2}' "$name.out" 2>/dev/null)
    [ -n "$EP" ] && return 0
    sleep 0.05
  done
  echo "server $name did not start:"; cat "$name.err"; exit 1
}

start_server plain --layers 4 --experts 8 --hidden 64 --top-k 2 --max-tokens 64
C=("$CLIENT" --endpoint "$EP" --timeout-ms 5000)

"${C[@]}" ping --count 3 >ping.txt 2>&1 && [ "$(grep -c '^pong from' ping.txt)" = 3 ] && ok ping || { bad ping; cat ping.txt; }
"${C[@]}" info >info.json 2>&1 && $PY -c "
import json,sys; d=json.load(open('info.json')); m=d['model']
assert d['protocol']==1 and m['n_experts']==8 and m['hidden']==64 and m['top_k']==2, d" && ok info || { bad info; cat info.json; }

$PY - <<'PYEOF'
import json, struct, numpy as np, sys
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
rng = np.random.default_rng(7)
T, H, E, K = 6, 64, 8, 2
x = rng.standard_normal((T, H)).astype(np.float32)
np.save("x_f32.npy", x)
u = x.view(np.uint32)
np.save("x_bf16.npy", ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16))  # bf16 as '<u2'
np.save("x_f16.npy", x.astype(np.float16))
ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
w = rng.random((T, K)).astype(np.float32)
np.save("ids.npy", ids); np.save("w.npy", w)
np.save("logits.npy", rng.standard_normal((T, E)).astype(np.float32))
np.save("ids_bad.npy", np.where(ids == ids[2, 1], 9, ids).astype(np.int32))
np.save("x_f64.npy", x.astype(np.float64))
np.save("x_fortran.npy", np.asfortranarray(rng.standard_normal((T, H)).astype(np.float32)))
np.save("x_big_endian.npy", x.astype(">f4"))
# safetensors, written by hand from the format's description
def st_write(path, tensors):
    hdr, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        b = a.tobytes(); hdr[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    h = json.dumps(hdr).encode(); h += b" " * ((8 - len(h) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
st_write("in_ids.safetensors", {"x": ("F32", x), "topk_ids": ("I32", ids), "topk_w": ("F32", w)})
st_write("in_route_bf16.safetensors", {"x": ("BF16", np.load("x_bf16.npy"))})
open("not_npy.npy", "wb").write(b"hello")
PYEOF

check() { # name y_file dtype mode layer [x_file]
  $PY - "$ROOT/tests/ipc" "$@" <<'PYEOF'
import sys, json, struct, numpy as np
sys.path.insert(0, sys.argv[1])
import toy_model as tm
name, yfile, dtype, mode, layer = sys.argv[2:7]
layer = int(layer)
x = np.load("x_f32.npy")
if dtype == "bf16": xin = tm.bf16_to_f32(np.load("x_bf16.npy"))
elif dtype == "f16": xin = np.load("x_f16.npy").astype(np.float32)
else: xin = x
kw = {}
if mode == "ids": kw = dict(ids=np.load("ids.npy"), w=np.load("w.npy"))
if mode == "logits": kw = dict(logits=np.load("logits.npy"))
ref = tm.to_dtype(tm.forward(xin, layer, 8, 2, **kw), dtype)
if yfile.endswith(".safetensors"):
    b = open(yfile, "rb").read(); n = struct.unpack_from("<Q", b)[0]; h = json.loads(b[8:8 + n])
    e = h["y"]; s, t = e["data_offsets"]
    y = np.frombuffer(b[8 + n + s:8 + n + t], {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[e["dtype"]]).reshape(e["shape"])
else:
    y = np.load(yfile)
assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
if mode == "ids":
    assert np.array_equal(y.view(np.uint8), ref.view(np.uint8)), "%s: not bit-exact" % name
else:
    yf = tm.bf16_to_f32(y) if dtype == "bf16" else y.astype(np.float32)
    rf = tm.bf16_to_f32(ref) if dtype == "bf16" else ref.astype(np.float32)
    tol = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.6e-2}[dtype]
    assert np.allclose(yf, rf, rtol=tol, atol=tol), "%s: max err %g" % (name, np.abs(yf - rf).max())
PYEOF
}

sub() { # name dtype mode layer out args...
  local name=$1 dtype=$2 mode=$3 layer=$4 out=$5; shift 5
  if "${C[@]}" submit --layer "$layer" --out "$out" "$@" >"$name.log" 2>&1 && check "$name" "$out" "$dtype" "$mode" "$layer"; then
    ok "submit $name"; else bad "submit $name"; cat "$name.log"; fi
}
sub ids_f32   f32  ids    1 y1.npy --x x_f32.npy --ids ids.npy --weights w.npy
sub ids_bf16  bf16 ids    2 y2.npy --x x_bf16.npy --ids ids.npy --weights w.npy
sub ids_f16   f16  ids    3 y3.safetensors --x x_f16.npy --ids ids.npy --weights w.npy
sub conv_bf16 bf16 ids    0 y4.npy --x x_f32.npy --dtype bf16 --ids ids.npy --weights w.npy
sub logits    f32  logits 1 y5.npy --x x_f32.npy --logits logits.npy
sub route     f32  route  2 y6.npy --x x_f32.npy
sub st_ids    f32  ids    3 y7.npy --input in_ids.safetensors
sub st_route  bf16 route  0 y8.safetensors --input in_route_bf16.safetensors

fails_with() { # name expected-text args...
  local name=$1 want=$2; shift 2
  if "${C[@]}" "$@" >"$name.log" 2>&1; then bad "$name: exit 0"; cat "$name.log"; return; fi
  if grep -q -- "$want" "$name.log"; then ok "$name refused"; else bad "$name: no '$want'"; cat "$name.log"; fi
}
fails_with bad_id      "expert id 9 out of range"      submit --layer 0 --x x_f32.npy --ids ids_bad.npy --weights w.npy --out e.npy
fails_with bad_layer   "layer 7 out of range"          submit --layer 7 --x x_f32.npy --out e.npy
fails_with f64         "'<f8' is not supported"        submit --layer 0 --x x_f64.npy --out e.npy
fails_with fortran     "Fortran order"                 submit --layer 0 --x x_fortran.npy --out e.npy
fails_with big_endian  "'>f4' is not supported"        submit --layer 0 --x x_big_endian.npy --out e.npy
fails_with not_npy     "not a .npy file"               submit --layer 0 --x not_npy.npy --out e.npy
fails_with missing     "No such file"                  submit --layer 0 --x nope.npy --out e.npy
fails_with ids_only    "go together"                   submit --layer 0 --x x_f32.npy --ids ids.npy --out e.npy
[ ! -e e.npy ] && ok "no output file after a failure" || bad "an output file after a failure"
"$CLIENT" bogus >bogus.log 2>&1; [ $? = 2 ] && ok "usage error exits 2" || bad "usage error exit code"

if "${C[@]}" bench --duration 1 --tokens 8 --concurrency 4 --dtype f32 >bench.txt 2>&1 &&
   grep -q 'tokens/s' bench.txt && grep -q 'p99_ms' bench.txt &&
   awk '/tokens\/s/{getline; exit !($2 > 0 && $3 == 0)}' bench.txt; then ok bench; else bad bench; fi
cat bench.txt
"${C[@]}" stats >stats.json 2>&1 && $PY -c "
import json; d=json.load(open('stats.json')); assert d['requests']['ok'] > 8 and d['latency_us']['submit']['count'] > 0, d" \
  && ok stats || { bad stats; cat stats.json; }

# CURVE: keys made by the CLI, a server that allows one client
"$CLIENT" keygen server >/dev/null && "$CLIENT" keygen alice >/dev/null && "$CLIENT" keygen mallory >/dev/null &&
  [ "$(stat -c %a alice.key)" = 600 ] && ok keygen || bad keygen
cp alice.pub allow.txt
start_server curve --curve-secret server.key --allow allow.txt
"$CLIENT" --endpoint "$EP" --timeout-ms 3000 --server-key server.pub --client-key alice.key ping >c1.log 2>&1 \
  && ok "curve: allowed key served" || { bad "curve: allowed key"; cat c1.log curve.err; }
"$CLIENT" --endpoint "$EP" --timeout-ms 3000 --server-key server.pub --client-key mallory.key ping >c2.log 2>&1
[ $? = 1 ] && grep -q MOEC_ERR_AUTH c2.log && ok "curve: unknown key refused" || { bad "curve: unknown key"; cat c2.log; }
"$CLIENT" --endpoint "$EP" --timeout-ms 1500 ping >c3.log 2>&1
[ $? = 1 ] && ok "curve: no key refused" || { bad "curve: no key"; cat c3.log; }

echo "moe-test: $pass passed, $failed failed"
[ "$failed" = 0 ]
