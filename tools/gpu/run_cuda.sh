#!/usr/bin/env bash
# tools/gpu/run_cuda.sh: the CUDA backend's GPU run, on a GPU host, from a bundle made here:
#
#   here:       tools/gpu/run_cuda.sh --bundle         (builds and bundles into .bundle/cuda)
#   GPU host:   tools/gpu/run_cuda.sh [STEPS...]       (STEPS: env sass tests lab router bench;
#                                                     default all)
#
# On the GPU host it runs, in this order, each step's output into $OUT (default /tmp/moe-gpu):
#   env    nvidia-smi, the bundle's MANIFEST, ldd of each binary           -> env.txt
#   sass   cuobjdump: HGMMA/HMMA counts and local-memory use per kernel    -> sass.txt
#   tests  the GPU tests (tests/cuda), every cmocka case                    -> tests.log
#   lab    the kernel lab (kernels/dev/lab_experts): checks, then timings    -> lab.log
#   router the router logits' lab (kernels/dev/lab_router): checks, timings   -> router.log
#   bench  the BASELINES benchmark (kernels/dev/bench_moe)                   -> bench.log
#   prof   (not in the default list) Nsight Compute per-kernel times of a few cases -> prof.txt
# and prints a summary last: the test counts, the lab's checks, the benchmark's table.
# Environment: BUNDLE (default .bundle/cuda), OUT, LAB_ARGS, BENCH_ARGS, MOE_TEST_SEED,
# ROUTER_ARGS,
# TEST_TIMEOUT / LAB_TIMEOUT / ROUTER_TIMEOUT / BENCH_TIMEOUT (seconds; 150 / 200 / 120 / 200).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BUNDLE="${BUNDLE:-.bundle/cuda}"

if [ "${1:-}" = "--bundle" ]; then
  exec tools/bundle --out "$BUNDLE" //tests/cuda:test_cuda_kern //kernels/dev:bench_moe //kernels/dev:lab_experts \
    //kernels/dev:lab_router
fi

OUT="${OUT:-/tmp/moe-gpu}"
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env sass tests lab router bench)
want() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
[ -x "$BUNDLE/bin/test_cuda_kern" ] || { echo "run_cuda: no bundle at $BUNDLE (make it with --bundle)"; exit 2; }
export NCCL_NVLS_ENABLE=0
rc=0

if want env; then
  { nvidia-smi; cat "$BUNDLE/MANIFEST"; for b in "$BUNDLE"/bin/*; do echo "== ldd $b"; ldd "$b"; done; ldd --version | head -1; } \
    >"$OUT/env.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
fi

if want sass; then
  {
    echo "== kernels: HGMMA (wgmma) / HMMA (mma.sync) instruction counts in the sm_90a SASS, local memory"
    cuobjdump -sass -arch sm_90a "$BUNDLE/bin/test_cuda_kern" 2>/dev/null | awk '
      /Function : / { if (name) printf "%-100s HGMMA %4d HMMA %4d LDL/STL %d\n", name, g, h, l; name=$3; g=0; h=0; l=0 }
      /HGMMA/ { g++ } /HMMA/ { h++ } /LDL|STL/ { l++ }
      END { if (name) printf "%-100s HGMMA %4d HMMA %4d LDL/STL %d\n", name, g, h, l }' | grep -i gemm
    echo "== resource usage"
    cuobjdump -res-usage "$BUNDLE/bin/test_cuda_kern" 2>/dev/null | grep -A1 gemm | grep -o 'Function [^ ]*\|REG:[0-9]*\|STACK:[0-9]*\|LOCAL:[0-9]*' | paste - - - - | head -80
  } >"$OUT/sass.txt" 2>&1
  head -30 "$OUT/sass.txt"
fi

if want tests; then
  echo "== tests"
  timeout "${TEST_TIMEOUT:-150}" "$BUNDLE/bin/test_cuda_kern" >"$OUT/tests.log" 2>&1
  trc=$?
  [ $trc -ne 0 ] && rc=1
  grep -E "^\[ +(PASSED|FAILED|  ERROR) +\]|FAILED|Error|error|info|seed|device" "$OUT/tests.log" | head -40
  echo "tests exit $trc"
fi

# run_prog STEP BINARY TIMEOUT [ARGS...]: stdout to STEP.log, stderr to STEP.err, its last lines shown
run_prog() {
  local step="$1" bin="$2" to="$3" prc
  shift 3
  echo "== $step"
  timeout "$to" "$BUNDLE/bin/$bin" "$@" >"$OUT/$step.log" 2>"$OUT/$step.err"
  prc=$?
  [ $prc -ne 0 ] && rc=1
  tail -3 "$OUT/$step.err"
  echo "$step exit $prc"
}

# shellcheck disable=SC2086
want lab && run_prog lab lab_experts "${LAB_TIMEOUT:-200}" ${LAB_ARGS:-}
# shellcheck disable=SC2086
want router && run_prog router lab_router "${ROUTER_TIMEOUT:-120}" ${ROUTER_ARGS:-}

if want prof; then
  # per-kernel time and DRAM traffic of the automatic variant, a few cases (Nsight Compute)
  echo "== prof"
  for c in "qwen3-a3b 1" "mixtral 1" "dsv2-lite 1"; do
    echo "--- $c"
    timeout 120 ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__pipe_tensor_op_hgmma_cycles_active.avg.pct_of_peak_sustained_active \
      --print-summary per-kernel "$BUNDLE/bin/lab_experts" --one $c 2>&1 | grep -E "kc_|gpu__time|dram__bytes|hgmma" | grep -v "^==PROF" | sed 's/  */ /g'
  done >"$OUT/prof.txt" 2>&1
  # where the large-tile product stalls: one gate-up launch of Mixtral at T = 8192
  timeout 200 ncu -k regex:kc_gemm_kernel -c 1 --launch-skip 2 --section SpeedOfLight --section WarpStateStats \
    --section Occupancy --section MemoryWorkloadAnalysis "$BUNDLE/bin/lab_experts" --one mixtral 8192 \
    >"$OUT/prof_detail.txt" 2>&1
  head -c 5000 "$OUT/prof.txt"
fi

# shellcheck disable=SC2086
want bench && run_prog bench bench_moe "${BENCH_TIMEOUT:-200}" ${BENCH_ARGS:-}

echo
echo "================ summary ================"
want tests && { grep -E "^\[  (PASSED|FAILED)  \]" "$OUT/tests.log"; grep -E "^\[  FAILED  \] test_" "$OUT/tests.log"; }
want lab && sed -n '/^part 1/,/^part 1: /p' "$OUT/lab.log" | head -40
want lab && sed -n '/^part 2/,$p' "$OUT/lab.log" | head -200 >"$OUT/lab_table.md"
want router && { grep -E "^part 1: |FAIL|NO \|" "$OUT/router.log" | head -20; sed -n '/^part 2/,$p' "$OUT/router.log"; }
want bench && cat "$OUT/bench.log"
exit $rc
