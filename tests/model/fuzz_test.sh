#!/usr/bin/env bash
# fuzz_test.sh: builds the safetensors header fuzzer (fuzz_st_header.c + st_check.c +
# engine/model/safetensors.c + the base) with clang -fsanitize=fuzzer,address,undefined
# (Bazel's toolchain is gcc, so it is compiled here from the explicit source list that
# tests/model/BUILD carries as data), replays the kept corpus (tests/model/st_corpus), then
# fuzzes fresh for a few seconds. Fails on any crash, leak, sanitizer report or broken
# property (st_check.c).
# Environment: MOE_FUZZ_SECONDS (default 6), MOE_FUZZ_SEED (default: random, printed).
# To grow the corpus by hand: run with MOE_FUZZ_KEEP=DIR, then merge DIR into st_corpus with
#   fuzz_st_header -merge=1 tests/model/st_corpus DIR
set -euo pipefail
ROOT="${TEST_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/${TEST_WORKSPACE:-}"
[ -d "$ROOT/engine/model" ] || ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
CLANG="${CLANG:-clang}"
command -v "$CLANG" >/dev/null || { echo "fuzz_test: clang not found (tools/moe setup installs it)"; exit 1; }
if ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n){(void)d;(void)n;return 0;}' |
     "$CLANG" -x c -fsanitize=fuzzer - -o "$TMP/probe" 2>"$TMP/probe.err"; then
  cat "$TMP/probe.err"
  echo "fuzz_test: clang's libFuzzer runtime is missing (apt-get install libclang-rt-14-dev; tools/moe setup does it)"
  exit 1
fi
SRCS=("$ROOT/tests/model/fuzz_st_header.c" "$ROOT/tests/model/st_check.c" "$ROOT/engine/model/safetensors.c"
      "$ROOT/engine/base/dtype.c" "$ROOT/engine/base/log.c" "$ROOT/engine/base/status.c" "$ROOT/engine/base/tensor.c")
"$CLANG" -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Werror \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I"$ROOT" "${SRCS[@]}" -lcjson -lm -o "$TMP/fuzz_st_header"
CORPUS="$ROOT/tests/model/st_corpus"
n=$(ls "$CORPUS" | wc -l)
echo "fuzz_test: replaying $n corpus files"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run() { # runs the fuzzer, shows the end of its log, and more of it on a failure
  if ! "$TMP/fuzz_st_header" "$@" >"$TMP/log" 2>&1; then
    tail -150 "$TMP/log"; echo "fuzz_test: FAILED (the input is under $TMP/, see above)"; exit 1
  fi
  tail -3 "$TMP/log"
}
run -runs=0 "$CORPUS"
SEED="${MOE_FUZZ_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
SECS="${MOE_FUZZ_SECONDS:-6}"
NEW="${MOE_FUZZ_KEEP:-$TMP/new}"
mkdir -p "$NEW"
echo "fuzz_test: fresh fuzzing for ${SECS}s with -seed=$SEED (reproduce: MOE_FUZZ_SEED=$SEED)"
run -seed="$SEED" -max_total_time="$SECS" -max_len=2048 -timeout=10 -rss_limit_mb=2048 \
  -dict="$ROOT/tests/model/st_header.dict" -artifact_prefix="$TMP/" "$NEW" "$CORPUS"
echo "moe-test: 2 passed, 0 failed"
