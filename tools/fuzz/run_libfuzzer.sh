#!/usr/bin/env bash
# run_libfuzzer.sh: the project's libFuzzer test runner. Bazel's toolchain is gcc, so the fuzz
# target is compiled here with clang (-fsanitize=fuzzer,address,undefined) from the explicit
# source list the calling sh_test carries as data; then the kept corpus is replayed, then the
# target fuzzes fresh for a few seconds. Fails on any crash, leak, sanitizer report or
# property violation; ends with "moe-test: 2 passed, 0 failed".
#
#   run_libfuzzer.sh --name NAME --corpus DIR [--max-len N] [--seconds S] [--dict FILE]
#                    [--lib -lX]... -- SOURCE...
# Paths are relative to the workspace root. Environment: MOE_FUZZ_SECONDS (overrides
# --seconds), MOE_FUZZ_SEED (default: random, printed), MOE_FUZZ_KEEP=DIR (keep the new inputs
# there, to merge into the corpus by hand: NAME -merge=1 CORPUS DIR).
set -euo pipefail
ROOT="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-}"
[ -d "$ROOT/engine/base" ] || ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
name="" corpus="" max_len=4096 secs=6 dict="" libs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --corpus) corpus="$2"; shift 2 ;;
    --max-len) max_len="$2"; shift 2 ;;
    --seconds) secs="$2"; shift 2 ;;
    --dict) dict="$2"; shift 2 ;;
    --lib) libs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "run_libfuzzer: unknown argument $1"; exit 2 ;;
  esac
done
[ -n "$name" ] && [ -n "$corpus" ] && [ $# -gt 0 ] || { echo "run_libfuzzer: --name, --corpus and sources are required"; exit 2; }
srcs=()
for s in "$@"; do srcs+=("$ROOT/$s"); done
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
CLANG="${CLANG:-clang}"
command -v "$CLANG" >/dev/null || { echo "run_libfuzzer: clang not found (tools/moe setup installs it)"; exit 1; }
if ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n){(void)d;(void)n;return 0;}' |
     "$CLANG" -x c -fsanitize=fuzzer - -o "$TMP/probe" 2>"$TMP/probe.err"; then
  cat "$TMP/probe.err"
  echo "run_libfuzzer: clang's libFuzzer runtime is missing (apt-get install libclang-rt-14-dev; tools/moe setup does it)"
  exit 1
fi
"$CLANG" -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Werror \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I"$ROOT" "${srcs[@]}" "${libs[@]}" -lm -o "$TMP/$name"
CORPUS="$ROOT/$corpus"
echo "$name: replaying $(ls "$CORPUS" | wc -l) corpus files"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run() { # runs the fuzzer, shows the end of its log, and more of it on a failure
  if ! "$TMP/$name" "$@" >"$TMP/log" 2>&1; then
    tail -150 "$TMP/log"; echo "$name: FAILED (the input is under $TMP/, see above)"; exit 1
  fi
  tail -3 "$TMP/log"
}
run -runs=0 "$CORPUS"
SEED="${MOE_FUZZ_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
SECS="${MOE_FUZZ_SECONDS:-$secs}"
NEW="${MOE_FUZZ_KEEP:-$TMP/new}"
mkdir -p "$NEW"
dict_arg=()
[ -n "$dict" ] && dict_arg=(-dict="$ROOT/$dict")
echo "$name: fresh fuzzing for ${SECS}s with -seed=$SEED (reproduce: MOE_FUZZ_SEED=$SEED)"
run -seed="$SEED" -max_total_time="$SECS" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
  "${dict_arg[@]}" -artifact_prefix="$TMP/" "$NEW" "$CORPUS"
echo "moe-test: 2 passed, 0 failed"
