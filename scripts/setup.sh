#!/usr/bin/env bash
# Creates .venv (once) and installs fmn with its test and benchmark extras into it.
# torch is pinned first so that pip does not pull a multi-GB build when a local one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
fi
if ! .venv/bin/python -c "import fmn, fmn_kernels, pytest, matplotlib" 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,bench]"
fi
