#!/usr/bin/env bash
# Runs test_clients_daemon.py with Debian's /usr/bin/python3 against the real daemon, with
# MOE_ROOT at the runfiles tree (moe-engine, moe-client, the Python module, the checkpoints).
set -euo pipefail
ROOT="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-}"
[ -d "$ROOT/engine" ] || ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export MOE_ROOT="$ROOT"
/usr/bin/python3 -c 'import zmq, numpy' || { echo "needs python3-zmq and python3-numpy (tools/moe setup)"; exit 1; }
exec /usr/bin/python3 "$ROOT/tests/integration/test_clients_daemon.py"
