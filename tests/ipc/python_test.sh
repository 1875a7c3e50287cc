#!/usr/bin/env bash
# python_test.sh: runs python_test.py with Debian's /usr/bin/python3 (python3-zmq,
# python3-numpy), with MOE_ROOT pointing at the runfiles tree (test server, moe-client, the
# module under ipc/python).
set -euo pipefail
ROOT="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-}"
[ -d "$ROOT/ipc" ] || ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export MOE_ROOT="$ROOT"
/usr/bin/python3 -c 'import zmq, numpy' || { echo "python_test: needs python3-zmq and python3-numpy (tools/moe setup)"; exit 1; }
exec /usr/bin/python3 "$ROOT/tests/ipc/python_test.py"
