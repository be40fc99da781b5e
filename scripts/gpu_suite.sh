#!/usr/bin/env bash
# The GPU run in one command; see scripts/gpu_suite.py --help. PYTHON picks the interpreter.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_suite.py" "$@"
