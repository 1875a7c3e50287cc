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
#             ZeroMQ echo (tcp and ipc) per request size                          -> e2e.log
# Output in $OUT (default /tmp/moe-gpu-engine); a summary is printed last.
# Environment: BUNDLE (default .bundle/engine), OUT, GPUS (default: every GPU), TOKENS, CLIENTS,
# TEST_TIMEOUT, SCALE_TIMEOUT, DSV3_TIMEOUT, E2E_TIMEOUT (seconds).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
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
    --tokens "${TOKENS:-1024,4096}" --clients "${CLIENTS:-4}" --requests 20 >"$OUT/scaleout.log" 2>&1 || rc=1
  grep -v "^20.*Z [IW]" "$OUT/scaleout.log" | tail -16
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
  timeout "${E2E_TIMEOUT:-80}" "$BUNDLE/bin/bench_engine" --engine "$MOE_ENGINE" --gpu 0 $m --tokens 1,16,128,1024,4096 --iters 30 \
    >"$OUT/e2e.log" 2>&1 || rc=1
  grep -v "^20.*Z [IW]" "$OUT/e2e.log" | tail -10
fi
exit $rc
