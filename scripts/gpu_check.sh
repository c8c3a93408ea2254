#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): one process on one GPU, <= ~8 minutes, one JSON line on stdout's
# last line. `--dry-run`: the same paths on CPU at tiny sizes (CI). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
