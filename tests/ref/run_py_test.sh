#!/bin/sh
# Runs a Python test with Debian's python3 (the one with numpy); the python3 first on PATH may
# lack it. Usage: run_py_test.sh path/to/test.py [args]
exec /usr/bin/python3 "$@"
