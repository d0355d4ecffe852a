#!/usr/bin/env bash
# Create .venv/ at the repository root and install lossscale with every extra and the test tools.
# Idempotent: a second run only re-checks what pip already has. Torch is pinned to the CPU build
# in constraints.txt (the package itself keeps torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import torch, lossscale; print(f'lossscale {lossscale.__version__} ready (torch {torch.__version__})')"
