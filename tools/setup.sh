#!/usr/bin/env bash
# Creates .venv (Python 3.10+) and installs fer-dist with its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "fer-dist installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
