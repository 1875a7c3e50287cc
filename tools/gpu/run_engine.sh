#!/usr/bin/env bash
# tools/gpu/run_engine.sh: the GPU workers' run (issue 7), on a GPU host, from a bundle made here:
#
#   here:       tools/gpu/run_engine.sh --bundle       (builds and bundles into .bundle/engine)
#   GPU host:   tools/gpu/run_engine.sh [STEPS...]     (STEPS: env test demo nccl scaleout dsv3 e2e;
#                                                       default: all but dsv3)
#
#   env       nvidia-smi topology, the bundle's MANIFEST                         -> env.txt
#   test      tests/integration:test_gpu_engine on every GPU (MOE_TEST_GPUS)     -> test.log
#   demo      the demo (tools/demo:moe-demo) with GPU workers on 2 GPUs           -> demo.log
#   nccl      bench_nccl --op alltoall at 2, 4 .. N ranks: the bare collective of
#             the combine, on sizes around the combine's bytes                   -> nccl.log
#   scaleout  bench_scaleout: weak scaling 1 .. N GPUs, DBO off/on, combine      -> scaleout.log
#   dsv3      bench_scaleout --shape dsv3 (DeepSeek-V3's experts; writes 22.6 GB
#             of weights once into /tmp/moe-scaleout-dsv3)                       -> dsv3.log
#   e2e       bench_engine --gpu 0: the engine vs the kernels in-process vs a bare
#             ZeroMQ echo per request size, clients over tcp and over ipc  -> e2e_tcp.log, e2e_ipc.log
#   ab        (not in the default list) the same bench against two engines on the same machine,
#             taking turns: this bundle's and the one in $BUNDLE_B (an older build: copy just its
#             bin/moe-engine and lib/ there), AB_REPS rounds over tcp and ipc; the
#             p50 rows of each side, the full outputs                          -> ab.log
#   timeline  (not in the default list) DBO's timeline: bench_scaleout at --log-level debug with
#             DBO off, by experts and by tokens (TL_DBO), each worker's micro-batches (products
#             done, exchange begun, packed, all-to-all done, exchange done), summarized per rank
#             by tools/gpu/step_trace.py; the env of the run applies (MOE_DBO_SM_RESERVE,
#             MOE_DBO_FIRST_SHARE, MOE_DBO_SM_MODE)                           -> timeline_*.log.gz
#   ncu       (not in the default list) Nsight Compute: each kernel's time of the in-process
#             call at T = 1 (cold L2; gpu__time_duration, the busiest SM's cycles) -> ncu_t1.log
# Output in $OUT (default /tmp/moe-gpu-engine); a summary is printed last.
# Environment: BUNDLE (default .bundle/engine), OUT, GPUS (default: every GPU), TOKENS, CLIENTS, SCALE_DBO, TL_DBO,
# TEST_TIMEOUT, SCALE_TIMEOUT, DSV3_TIMEOUT, E2E_TIMEOUT (seconds), E2E_TOKENS, E2E_ITERS, BUNDLE_B, AB_REPS.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
BUNDLE="${BUNDLE:-.bundle/engine}"

if [ "${1:-}" = "--bundle" ]; then
  exec tools/bundle --out "$BUNDLE" //engine:moe-engine //tests/integration:test_gpu_engine //tools/demo:moe-demo \
    //tools/bench:bench_engine //tools/bench:bench_nccl //tools/bench:bench_scaleout
fi

OUT="${OUT:-/tmp/moe-gpu-engine}"
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env test demo nccl scaleout e2e)
want() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
[ -x "$BUNDLE/bin/moe-engine" ] || { echo "run_engine: no bundle at $BUNDLE (make it with --bundle)"; exit 2; }
export NCCL_NVLS_ENABLE=0
export MOE_ENGINE="$ROOT/$BUNDLE/bin/moe-engine"
n=$(nvidia-smi -L | grep -c '^GPU')
GPUS="${GPUS:-$(seq -s, 0 $((n - 1)))}"
rc=0

# The bare all-to-all on the same bytes as each W > 1 row of a bench_scaleout table (its
# bytes/rank column), right after it in the same run: bench_nccl's busbw for an all-to-all is
# the bytes a rank sends over the time, the same measure as the table's comb GB/s.
bare_compare() {
  local table="$1" out="$2" w sizes
  : >"$out"
  if [ ! -x "$BUNDLE/bin/bench_nccl" ]; then
    # a bundle pruned to fit a size limit: the table stands, only this column is missing
    echo "-- the combine against the bare all-to-all: skipped (no bin/bench_nccl in $BUNDLE)" | tee "$out"
    return 0
  fi
  for w in $(awk '$1 ~ /^[0-9]+$/ && $1 > 1 {print $1}' "$table" | sort -un); do
    sizes=$(awk -v w="$w" '$1 == w && $11 > 0 {q = 4096 * w; printf "%s%d", n++ ? "," : "", int($11 * w / (w - 1) / q + 0.5) * q}' "$table")
    [ -n "$sizes" ] || continue
    timeout 90 "$BUNDLE/bin/bench_nccl" --gpus "$(echo "$GPUS" | cut -d, -f1-"$w")" --op alltoall --sizes "$sizes" \
      >>"$out" 2>&1 || rc=1
  done
  python3 - "$out" "$table" <<'PY'
import re, sys
bare = {}  # (ranks, bytes sent a rank) -> busbw
ranks = 0
for ln in open(sys.argv[1], errors="replace"):
    m = re.search(r"(\d+) ranks \(GPUs", ln)
    if m:
        ranks = int(m.group(1))
    f = ln.split()
    if len(f) >= 10 and f[0].isdigit() and f[9].isdigit():
        bare[(ranks, int(f[9]))] = float(f[7])
print("-- the combine against the bare all-to-all on the same bytes (busbw: bytes a rank sends / time)")
print("%3s %4s %7s %12s %10s %12s %7s" % ("W", "dbo", "T/GPU", "bytes/rank", "comb GB/s", "bare busbw", "ratio"))
for ln in open(sys.argv[2], errors="replace"):
    f = ln.split()
    if len(f) < 12 or not f[0].isdigit() or int(f[0]) < 2 or float(f[10]) <= 0:
        continue
    w, sent, comb = int(f[0]), float(f[10]), float(f[11])
    near = [k for k in bare if k[0] == w]
    if not near:
        continue
    k = min(near, key=lambda k: abs(k[1] - sent))
    print("%3d %4s %7s %12.0f %10.1f %12.1f %6.0f%%" % (w, f[1], f[2], sent, comb, bare[k], 100 * comb / bare[k]))
PY
}

if want env; then
  { nvidia-smi; nvidia-smi topo -m; cat "$BUNDLE/MANIFEST"; } >"$OUT/env.txt" 2>&1
  echo "== GPUs: $GPUS"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
if want test; then
  echo "== test_gpu_engine (MOE_TEST_GPUS=$GPUS)"
  MOE_TEST_GPUS="$GPUS" MOE_LOG_LEVEL=warn timeout "${TEST_TIMEOUT:-240}" "$BUNDLE/bin/test_gpu_engine" >"$OUT/test.log" 2>&1
  t=$?; [ $t -ne 0 ] && rc=1
  grep -E "^\[ +(PASSED|FAILED|  ERROR|   LINE) +\]|GPU|differ|error|kill|service" "$OUT/test.log" | grep -v "^20.*Z [IW]" | head -40
  echo "test exit $t"
fi
if want demo; then
  echo "== demo"
  dg=0; [ "$n" -ge 2 ] && dg=0,1
  timeout 120 "$BUNDLE/bin/moe-demo" --engine "$MOE_ENGINE" --gpus "$dg" >"$OUT/demo.log" 2>&1 || rc=1
  grep -v "^20.*Z [IW]" "$OUT/demo.log" | tail -16
fi
if want nccl && [ "$n" -ge 2 ]; then
  echo "== bench_nccl"
  : >"$OUT/nccl.log"
  IFS=, read -r -a gl <<<"$GPUS"
  for ((w = 2; w <= ${#gl[@]}; w *= 2)); do
    sub=$(IFS=,; echo "${gl[*]:0:$w}")
    timeout 90 "$BUNDLE/bin/bench_nccl" --gpus "$sub" --op alltoall \
      --sizes 4194304,16777216,33554432,67108864,134217728,268435456 >>"$OUT/nccl.log" 2>&1 || rc=1
  done
  cat "$OUT/nccl.log"
fi
if want scaleout; then
  echo "== bench_scaleout"
  timeout "${SCALE_TIMEOUT:-240}" "$BUNDLE/bin/bench_scaleout" --engine "$MOE_ENGINE" --gpus "$GPUS" \
    --tokens "${TOKENS:-1024,4096}" --clients "${CLIENTS:-4}" --requests 20 --dbo "${SCALE_DBO:-off,on,experts}" \
    >"$OUT/scaleout.log" 2>&1 || rc=1
  grep -v "^20.*Z [IW]" "$OUT/scaleout.log" | tail -16
  bare_compare "$OUT/scaleout.log" "$OUT/scaleout_bare.log"
fi
if want timeline; then
  for d in ${TL_DBO:-off experts on}; do
    echo "== timeline: DBO $d"
    timeout "${SCALE_TIMEOUT:-240}" "$BUNDLE/bin/bench_scaleout" --engine "$MOE_ENGINE" --gpus "$GPUS" \
      --tokens "${TOKENS:-1024,4096}" --clients "${CLIENTS:-4}" --requests 12 --dbo "$d" --log-level debug \
      >"$OUT/timeline_$d.log" 2>&1 || rc=1
    grep -E "^ +[0-9]+ +(-|off|on|exp) " "$OUT/timeline_$d.log"
    python3 "$ROOT/tools/gpu/step_trace.py" "$OUT/timeline_$d.log" | sed -n '/micro-batch timelines/,$p'
    gzip -f -9 "$OUT/timeline_$d.log"
  done
fi
if want dsv3; then
  echo "== bench_scaleout --shape dsv3"
  timeout "${DSV3_TIMEOUT:-420}" "$BUNDLE/bin/bench_scaleout" --engine "$MOE_ENGINE" --gpus "$GPUS" --shape dsv3 \
    --tokens "${DSV3_TOKENS:-1024}" --clients "${CLIENTS:-4}" --requests 8 --dbo "${DSV3_DBO:-off,on}" \
    >"$OUT/dsv3.log" 2>&1 || rc=1
  grep -v "^20.*Z [IW]" "$OUT/dsv3.log" | tail -12
fi
if want e2e; then
  echo "== bench_engine --gpu 0"
  m=""; [ -d /tmp/moe-scaleout-qwen3 ] && m="--model /tmp/moe-scaleout-qwen3"
  # shellcheck disable=SC2086
  for tr in tcp ipc; do
    x=""; [ "$tr" = ipc ] && x="--ipc"
    # shellcheck disable=SC2086
    timeout "${E2E_TIMEOUT:-80}" "$BUNDLE/bin/bench_engine" --engine "$MOE_ENGINE" --gpu 0 $m $x \
      --tokens "${E2E_TOKENS:-1,16,128,1024,4096}" --iters "${E2E_ITERS:-30}" >"$OUT/e2e_$tr.log" 2>&1 || rc=1
    grep -v "^20.*Z [IW]" "$OUT/e2e_$tr.log" | tail -20
  done
fi
# The Qwen3-30B-A3B expert shape for ab and ncu (one layer, 1.2 GB; written once).
qwen3_model() {
  [ -f /tmp/moe-qwen3-1l/config.json ] && return 0
  "$BUNDLE/bin/moe-engine" make-model --family qwen3_moe --out /tmp/moe-qwen3-1l --layers 1 --experts 128 \
    --top-k 8 --hidden 2048 --intermediate 768 --norm-topk-prob true >/dev/null 2>&1
}
if want ab; then
  echo "== bench_engine, this bundle vs ${BUNDLE_B:-(none)}, taking turns"
  if [ -z "${BUNDLE_B:-}" ] || [ ! -x "$BUNDLE_B/bin/moe-engine" ]; then
    echo "run_engine ab: set BUNDLE_B to a bundle with bin/moe-engine"
    rc=1
  elif ! qwen3_model; then
    echo "run_engine ab: make-model failed"
    rc=1
  else
    : >"$OUT/ab.log"
    for ((k = 1; k <= ${AB_REPS:-2}; k++)); do
      for side in B A; do
        eng="$MOE_ENGINE"; [ "$side" = B ] && eng="$(cd "$BUNDLE_B" && pwd)/bin/moe-engine"
        for tr in tcp ipc; do
          x=""; [ "$tr" = ipc ] && x="--ipc"
          # shellcheck disable=SC2086
          timeout "${E2E_TIMEOUT:-100}" "$BUNDLE/bin/bench_engine" --engine "$eng" --gpu 0 --model /tmp/moe-qwen3-1l $x \
            --tokens "${E2E_TOKENS:-1,16,1024}" --iters "${E2E_ITERS:-200}" >/tmp/moe-ab-one.log 2>&1 || rc=1
          { echo "=== side $side ($eng) $tr round $k"; cat /tmp/moe-ab-one.log; } >>"$OUT/ab.log"
          echo "-- side $side, $tr, round $k (T, in-proc, echo tcp, echo ipc, tcp 2 ctx, p50, p99, overhead, %, tok/s 1, tok/s 4, echo tok/s 4, eng/echo)"
          grep -v "^20.*Z [IWE]" /tmp/moe-ab-one.log | grep -E "^ +[0-9]+ " | awk 'NF >= 11'
        done
      done
    done
  fi
fi
if want ncu; then
  echo "== ncu, the in-process call at T = 1"
  if qwen3_model; then
    timeout 150 ncu --clock-control none --target-processes application-only \
      --metrics gpu__time_duration.sum,sm__cycles_active.max -k regex:kc_ --launch-count 12 \
      "$BUNDLE/bin/bench_engine" --engine "$MOE_ENGINE" --gpu 0 --model /tmp/moe-qwen3-1l --tokens 1 --iters 3 \
      >"$OUT/ncu_t1.log" 2>&1 || rc=1
    grep -E "^  [a-z].*\(|gpu__time|sm__cycles" "$OUT/ncu_t1.log" | head -40
  else
    rc=1
  fi
fi
exit $rc
