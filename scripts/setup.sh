#!/usr/bin/env bash
# Creates .venv (once) and installs fmn with its test and benchmark extras into it.
# torch is pinned first so that pip does not pull a multi-GB build when a local one exists.
# fmn_kernels' native CPU kernels are compiled against that torch (CMakeLists.txt via setup.py),
# so the build runs without isolation, with its build tools installed into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
fi
if ! .venv/bin/python -c "import fmn, pytest, matplotlib; from fmn_kernels.ops.cpu_attention import cpu_backend_available as ok; assert ok()" 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/pip install -q --disable-pip-version-check "setuptools>=68" wheel "cmake>=3.18" ninja
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
fi
